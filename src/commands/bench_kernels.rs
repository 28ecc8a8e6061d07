//! `anomaly bench kernels`: the memory-bank kernels over a sweep of bank sizes, widths and k, against
//! the naive shader and a tuned CPU sgemm measured in the same run, and against the device's own peak:
//! an FMA probe and a read-bandwidth probe, measured first on each device the rows run on.

use std::time::Instant;

use crate::output::{note, outln};
use anomaly_kernels::cpu::{fast, peak};
use anomaly_kernels::{CoresetChunking, CoresetSettings, CoresetSpace, DistanceKernel, GpuKernels, Peak};
use anomaly_method::count_in;
use anyhow::Result;
use serde::Serialize;

/// Which kernels the sweep runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelDevice {
    /// Our WGSL kernels on wgpu (and the CPU paths, for the ratios).
    Wgpu,
    /// The CPU paths only.
    Cpu,
}

impl KernelDevice {
    /// The GPU kernels on `wgpu` (none on the CPU), and the device's description for the report.
    pub(crate) fn resolve(self) -> Result<(Option<GpuKernels>, String)> {
        Ok(match self {
            Self::Wgpu => (Some(GpuKernels::shared()?), format!("wgpu: {}", anomaly_device::GpuContext::get()?.adapter)),
            Self::Cpu => (None, format!("cpu: {} threads, {}", rayon::current_num_threads(), anomaly_device::CpuIsa::active())),
        })
    }
}

#[derive(clap::Args)]
pub struct KernelArgs {
    #[arg(long, value_enum, default_value = "wgpu")]
    device: KernelDevice,
    /// The representative subset: bank 20k × D 1024, 1k queries, k 50.
    #[arg(long)]
    quick: bool,
    /// Bank sizes (rows) to sweep.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000", value_parser = count_in(1, 10_000_000))]
    banks: Vec<usize>,
    /// Feature widths to sweep.
    #[arg(long, value_delimiter = ',', default_value = "512,1024,2048", value_parser = count_in(1, 8192))]
    dims: Vec<usize>,
    /// k values to sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,9,50", value_parser = count_in(1, 1024))]
    ks: Vec<usize>,
    /// Queries per case.
    #[arg(long, default_value_t = 1000, value_parser = count_in(1, 100_000))]
    queries: usize,
    /// Bank rows of the tiled-versus-naive distance comparison (the naive shader is slow).
    #[arg(long, default_value_t = 4096, value_parser = count_in(1, 1_000_000))]
    naive_bank: usize,
    /// Print a JSON array (one object per case) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    kernel: &'static str,
    device: String,
    m: usize,
    n: usize,
    d: usize,
    k: Option<usize>,
    ms: f64,
    gflops: Option<f64>,
    gbs: Option<f64>,
    /// Time of a blocked distance shader over the naive one (<1: faster): on a shader's own row, that
    /// shader's; on knn rows, the one knn ran (tiled on GPUs, subgroup on CPU adapters).
    tiled_over_naive: Option<f64>,
    /// Time of the GPU path over the fast CPU path (<1: the GPU is faster).
    gpu_over_cpu_fast: Option<f64>,
    /// Time of the GPU path over a tuned CPU sgemm of the same product.
    gpu_over_cpu_sgemm: Option<f64>,
    /// The FMA probe of the row's device, on rows judged by GFLOP/s (compute-bound).
    peak_gflops: Option<f64>,
    /// The read-bandwidth probe of the row's device, on rows judged by GB/s alone (memory-bound).
    peak_gbs: Option<f64>,
    /// The row's GFLOP/s (or GB/s) as a percentage of that probe.
    pct_of_peak: Option<f64>,
}

pub fn run(mut args: KernelArgs) -> Result<()> {
    if args.quick {
        (args.banks, args.dims, args.ks, args.queries) = (vec![20_000], vec![1024], vec![50], 1000);
    }
    let (gpu, device) = args.device.resolve()?;
    if !args.json {
        note!(
            "device {device}; timing from {}",
            match &gpu {
                Some(g) if g.has_timestamps() => "GPU timestamps (distance shaders) and wall time (whole operations)",
                Some(_) => "wall time, submit to completion",
                None => "wall time",
            }
        );
    }
    // Probes first, on an otherwise idle device. The CPU one runs in wgpu runs too: its rows are there.
    let free = anomaly_device::host_memory("MemAvailable").unwrap_or(u64::MAX);
    let cpu_peak = Peak { gflops: peak::fma_gflops(), gbs: peak::read_gbs(peak::STREAM_BYTES.min((free / 4) as usize)) };
    let gpu_peak = gpu.as_ref().map(GpuKernels::peak).transpose()?;
    if !args.json {
        for (name, probe) in [("cpu", Some(cpu_peak)), ("wgpu", gpu_peak)] {
            if let Some(p) = probe {
                outln!("peak {name:<5} fma {:>10.1} GFLOP/s  read {:>8.1} GB/s", p.gflops, p.gbs)?;
            }
        }
    }
    let m = args.queries;
    let mut rows = Vec::new();
    let mut print = |row: Row| {
        if !args.json {
            outln!(
                "{:<18} m {:>5} n {:>8} d {:>5} k {:>5}  {:>10.2} ms {:>9} GFLOP/s {:>8} GB/s {:>6} of peak{}",
                row.kernel,
                row.m,
                row.n,
                row.d,
                row.k.map_or("-".into(), |k| k.to_string()),
                row.ms,
                row.gflops.map_or("-".into(), |g| format!("{g:.1}")),
                row.gbs.map_or("-".into(), |g| format!("{g:.1}")),
                row.pct_of_peak.map_or("-".into(), |p| format!("{p:.1}%")),
                ratios(&row)
            )?;
        }
        rows.push(row);
        anyhow::Ok(())
    };
    for &d in &args.dims {
        for &n in &args.banks {
            let needed = ((n + m) * d * 4) as u64 * if gpu.is_some() { 2 } else { 1 };
            if anomaly_device::host_memory("MemAvailable").is_some_and(|free| needed > free) {
                note!("skipping n {n} d {d}: needs ~{} MiB, more than is free", needed >> 20);
                continue;
            }
            let bank = random(n * d, 1 + n as u64 + d as u64);
            let queries = random(m * d, 7 + d as u64);
            let flops = 2.0 * m as f64 * n as f64 * d as f64;
            let bank_bytes = (n * d * 4) as f64;
            // Rows with GFLOP/s are judged by the FMA probe, rows with GB/s alone by the read probe; `cpu_`
            // rows by the CPU's, the others by the GPU's.
            let row = |kernel: &'static str, k, ms: f64, gflops: Option<f64>, gbs: Option<f64>| {
                let probe = if kernel.starts_with("cpu_") { Some(cpu_peak) } else { gpu_peak };
                let peak_gflops = gflops.and(probe.map(|p| p.gflops));
                let peak_gbs = if gflops.is_some() { None } else { gbs.and(probe.map(|p| p.gbs)) };
                let pct_of_peak = match (gflops, peak_gflops, gbs, peak_gbs) {
                    (Some(value), Some(peak), ..) | (_, _, Some(value), Some(peak)) => Some(100.0 * value / peak),
                    _ => None,
                };
                Row {
                    kernel,
                    device: device.clone(),
                    m,
                    n,
                    d,
                    k,
                    ms,
                    gflops,
                    gbs,
                    tiled_over_naive: None,
                    gpu_over_cpu_fast: None,
                    gpu_over_cpu_sgemm: None,
                    peak_gflops,
                    peak_gbs,
                    pct_of_peak,
                }
            };

            // Tuned CPU sgemm of the same product: the yardstick.
            let sgemm_ms = timed(|| {
                let mut out = vec![0f32; m * n.min(65_536)];
                let width = n.min(65_536);
                for start in (0..n).step_by(width) {
                    let w = width.min(n - start);
                    fast::multiply_transposed_parallel(&queries, &bank[start * d..(start + w) * d], m, w, d, &mut out[..m * w]);
                }
            });
            print(row("cpu_sgemm", None, sgemm_ms, Some(flops / sgemm_ms / 1e6), None))?;
            let cpu_stats_ms = timed(|| {
                fast::column_stats(&bank, n, d);
            });
            print(row("cpu_column_stats", None, cpu_stats_ms, None, Some(bank_bytes / cpu_stats_ms / 1e6)))?;
            let mut cpu_knn_ms = Vec::new();
            for &k in &args.ks {
                let ms = timed(|| {
                    fast::knn(&queries, &bank, d, k.min(n));
                });
                cpu_knn_ms.push(ms);
                print(row("cpu_knn", Some(k), ms, Some(flops / ms / 1e6), None))?;
            }

            // PatchCore's greedy coreset step on the bank as its points, projected as fitting projects
            // them: each step reads every point and its distance so far, and writes the distance. Both
            // read the grid's i8; the CPU reads each point's index too.
            let mut space = CoresetSpace::new(&bank, n, d, &CoresetSettings { ratio: 1.0, projection: CORESET_PROJECTION, seed: 0 })?;
            let steps = CORESET_STEPS.min(n - 1);
            space.set_picks(steps + 1);
            let gpu_step_bytes = (n * (space.dims() + 2 * 4)) as f64;
            let cpu_step_bytes = (n * (space.dims() + 3 * 4)) as f64;
            let coreset_row = |kernel, ms: f64, step_bytes: f64| Row {
                m: steps,
                d: space.dims(),
                ..row(kernel, None, ms, None, Some(step_bytes * steps as f64 / ms / 1e6))
            };
            // The selection takes its space over: each run gets a copy, made before the clock starts.
            fast::select_with_updates(space.clone());
            let cpu_space = space.clone();
            let start = Instant::now();
            fast::select_with_updates(cpu_space);
            let cpu_coreset_ms = start.elapsed().as_secs_f64() * 1e3;
            if steps > 0 {
                print(coreset_row("cpu_coreset_step", cpu_coreset_ms, cpu_step_bytes))?;
            }

            let Some(gpu) = &gpu else { continue };
            if steps > 0 {
                let coreset_ms = timed_result(|| gpu.coreset_select(&space, CoresetChunking::default()).map(drop))?;
                print(Row {
                    gpu_over_cpu_fast: Some(coreset_ms / cpu_coreset_ms),
                    ..coreset_row("coreset_step", coreset_ms, gpu_step_bytes)
                })?;
            }
            let gpu_bank = gpu.upload(&bank, n, d)?;
            let stats_ms = timed_result(|| gpu.column_stats(&gpu_bank).map(drop))?;
            print(Row {
                gpu_over_cpu_fast: Some(stats_ms / cpu_stats_ms),
                ..row("column_stats", None, stats_ms, None, Some(bank_bytes / stats_ms / 1e6))
            })?;

            // The distance shaders alone on a sub-bank (the naive one is slow), best of two runs each.
            let limit_rows = (gpu.limits().max_binding_bytes / (m as u64 * 4)) as usize;
            let naive_n = args.naive_bank.min(n).min(limit_rows);
            let sub_bank = gpu.upload(&bank[..naive_n * d], naive_n, d)?;
            let gpu_queries = gpu.upload(&queries, m, d)?;
            let sub_flops = 2.0 * m as f64 * naive_n as f64 * d as f64;
            let shader_ms = |kernel| -> Result<f64> {
                let first = gpu.distance_matrix(&gpu_queries, &sub_bank, kernel)?.1;
                Ok(first.min(gpu.distance_matrix(&gpu_queries, &sub_bank, kernel)?.1))
            };
            let naive_ms = shader_ms(DistanceKernel::Naive)?;
            let mut shaders = vec![("distance_tiled", DistanceKernel::Tiled)];
            if gpu.has_subgroup_kernel() {
                shaders.push(("distance_subgroup", DistanceKernel::Subgroup));
            }
            let mut used_ms = naive_ms;
            for (name, kernel) in shaders {
                let ms = shader_ms(kernel)?;
                if kernel == gpu.distance_kernel() {
                    used_ms = ms;
                }
                print(Row { n: naive_n, tiled_over_naive: Some(ms / naive_ms), ..row(name, None, ms, Some(sub_flops / ms / 1e6), None) })?;
            }
            print(Row { n: naive_n, ..row("distance_naive", None, naive_ms, Some(sub_flops / naive_ms / 1e6), None) })?;

            for (&k, &cpu_ms) in args.ks.iter().zip(&cpu_knn_ms) {
                // Host queries, uploaded inside the timing, as scoring images does.
                let ms = timed_result(|| gpu.knn_host(&gpu_bank, &queries, k.min(n)).map(drop))?;
                print(Row {
                    gpu_over_cpu_fast: Some(ms / cpu_ms),
                    gpu_over_cpu_sgemm: Some(ms / sgemm_ms),
                    tiled_over_naive: Some(used_ms / naive_ms),
                    ..row("knn", Some(k), ms, Some(flops / ms / 1e6), Some(bank_bytes / ms / 1e6))
                })?;
            }
        }
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}

fn ratios(row: &Row) -> String {
    let mut text = String::new();
    for (name, value) in
        [("tiled/naive", row.tiled_over_naive), ("gpu/cpu_fast", row.gpu_over_cpu_fast), ("gpu/cpu_sgemm", row.gpu_over_cpu_sgemm)]
    {
        if let Some(v) = value {
            text.push_str(&format!("  {name} {v:.3}"));
        }
    }
    text
}

/// Greedy coreset steps the `coreset_step` rows time, and the projection their points get (PatchCore's).
const CORESET_STEPS: usize = 100;
const CORESET_PROJECTION: usize = 128;

/// Milliseconds of one run after a warm-up run.
fn timed(mut work: impl FnMut()) -> f64 {
    work();
    let start = Instant::now();
    work();
    start.elapsed().as_secs_f64() * 1e3
}

fn timed_result(mut work: impl FnMut() -> Result<(), anomaly_kernels::KernelError>) -> Result<f64> {
    work()?;
    let start = Instant::now();
    work()?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

/// Uniform values in [-1, 1) from a seeded xorshift, fast enough for gigabyte banks.
pub(crate) fn random(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}
