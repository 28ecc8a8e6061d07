//! `anomaly bench coreset`: picks per second of PatchCore's greedy coreset on the CPU reference, the
//! multithreaded CPU path and the WGSL kernel, for a sweep of patch counts, widths and ratios.

use std::time::Instant;

use crate::commands::bench::median;
use crate::commands::bench_kernels::{KernelDevice, random};
use crate::output::{note, outln};
use anomaly_kernels::cpu::{fast, reference};
use anomaly_kernels::{CoresetChunking, CoresetSettings, CoresetSpace, GpuKernels};
use anomaly_method::count_in;
use anyhow::Result;
use serde::Serialize;

#[derive(clap::Args)]
pub struct CoresetArgs {
    #[arg(long, value_enum, default_value = "wgpu")]
    device: KernelDevice,
    /// Patch counts (points) to sweep.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000", value_parser = count_in(1, 100_000_000))]
    patches: Vec<usize>,
    /// Feature widths to sweep.
    #[arg(long, value_delimiter = ',', default_value = "128", value_parser = count_in(1, 8192))]
    dims: Vec<usize>,
    /// Coreset ratios to sweep, each in (0, 1].
    #[arg(long, value_delimiter = ',', default_value = "0.01,0.1", value_parser = unit_ratio)]
    ratio: Vec<f64>,
    /// Dimensions of the random projection (0: none; ≥ the width: none).
    #[arg(long, default_value_t = 128, value_parser = count_in(0, 8192))]
    projection: usize,
    /// Timed runs per path; the median is printed.
    #[arg(long, default_value_t = 3, value_parser = count_in(1, 100))]
    repeats: usize,
    /// Stop the multithreaded CPU and GPU runs after this many picks; default: the whole coreset. A GPU
    /// pick costs the same throughout, but the CPU path prunes more as the coreset grows: its rate over
    /// the first picks is below its rate over the whole coreset.
    #[arg(long, value_parser = count_in(2, 100_000_000))]
    max_picks: Option<usize>,
    /// Picks the single-threaded reference runs (it is slow; its rate is per pick like the others').
    #[arg(long, default_value_t = 20, value_parser = count_in(2, 100_000_000))]
    reference_picks: usize,
    /// The points: `uniform` noise in [−1, 1) (no structure: the worst case for the CPU path's pruning),
    /// or `clusters`, shaped like patch features (see `clustered`).
    #[arg(long, value_enum, default_value = "uniform")]
    data: CoresetData,
    /// Print a JSON array (one object per case) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CoresetData {
    Uniform,
    Clusters,
}

/// Clusters of `clustered`: patches of one category's images fall into a few kinds (background, rim,
/// label, …), each spread along a few directions.
const CLUSTERS: usize = 64;
/// Directions each cluster spreads along.
const CLUSTER_RANK: usize = 8;

/// `n × d` points like a backbone's patch features: `CLUSTERS` centres uniform in [−1, 1)ᵈ, cluster sizes
/// skewed (cluster ⌊K·u²⌋ for uniform u: a few large kinds, many rare ones), each point its centre plus
/// a uniform mix of its cluster's `CLUSTER_RANK` directions (each spanning about a quarter of the
/// centres' spacing) plus uniform noise of 0.05.
fn clustered(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let centres = random(CLUSTERS * d, seed);
    let directions: Vec<f32> = random(CLUSTERS * CLUSTER_RANK * d, seed + 1).iter().map(|x| x * 0.3).collect();
    let picks = random(n, seed + 2);
    let mixes = random(n * CLUSTER_RANK, seed + 3);
    let mut points: Vec<f32> = random(n * d, seed + 4).iter().map(|x| x * 0.05).collect();
    for (i, point) in points.chunks_exact_mut(d).enumerate() {
        let u = (picks[i] + 1.0) / 2.0;
        let cluster = ((u * u * CLUSTERS as f32) as usize).min(CLUSTERS - 1);
        point.iter_mut().zip(&centres[cluster * d..(cluster + 1) * d]).for_each(|(x, c)| *x += c);
        for (r, &mix) in mixes[i * CLUSTER_RANK..(i + 1) * CLUSTER_RANK].iter().enumerate() {
            let direction = &directions[(cluster * CLUSTER_RANK + r) * d..(cluster * CLUSTER_RANK + r + 1) * d];
            point.iter_mut().zip(direction).for_each(|(x, v)| *x += mix * v);
        }
    }
    points
}

fn unit_ratio(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(ratio) if ratio > 0.0 && ratio <= 1.0 => Ok(ratio),
        _ => Err("expected a number above 0 and at most 1".into()),
    }
}

#[derive(Serialize)]
struct Row {
    patches: usize,
    dims: usize,
    projected_dims: usize,
    ratio: f64,
    /// Picks of the whole coreset.
    coreset: usize,
    /// Picks timed per run of the multithreaded CPU and GPU paths.
    picks_timed: usize,
    projection_ms: f64,
    reference_picks_s: f64,
    cpu_picks_s: f64,
    wgpu_picks_s: Option<f64>,
    /// Share of a plain scan's distances the multithreaded CPU path computed (what its pruning left).
    cpu_updated_share: f64,
    /// Multithreaded CPU over the reference (>1: faster).
    cpu_over_reference: f64,
    /// GPU over the multithreaded CPU (>1: faster).
    wgpu_over_cpu: Option<f64>,
    /// Whether the paths picked the same points (the reference over its own, shorter, run).
    picks_agree: bool,
}

pub fn run(args: CoresetArgs) -> Result<()> {
    let gpu = match args.device {
        KernelDevice::Wgpu => Some(GpuKernels::shared()?),
        KernelDevice::Cpu => None,
    };
    let (threads, isa) = (rayon::current_num_threads(), anomaly_device::CpuIsa::active());
    let device = match &gpu {
        Some(_) => format!("wgpu: {}; cpu: {threads} threads, {isa}", anomaly_device::GpuContext::get()?.adapter),
        None => format!("cpu: {threads} threads, {isa}"),
    };
    if !args.json {
        note!(
            "device {device}; {:?} data; wall time, medians of {} runs; the projection is timed apart from the picks",
            args.data,
            args.repeats
        );
    }
    let mut rows = Vec::new();
    for &d in &args.dims {
        for &n in &args.patches {
            let seed = 1 + n as u64 + d as u64;
            let features = match args.data {
                CoresetData::Uniform => random(n * d, seed),
                CoresetData::Clusters => clustered(n, d, seed),
            };
            for &ratio in &args.ratio {
                let settings = CoresetSettings { ratio, projection: args.projection, seed: 0 };
                let mut projection_ms = Vec::new();
                let mut space = None;
                for _ in 0..args.repeats {
                    let start = Instant::now();
                    space = Some(CoresetSpace::new(&features, n, d, &settings)?);
                    projection_ms.push(start.elapsed().as_secs_f64() * 1e3);
                }
                let Some(mut space) = space else { continue };
                let coreset = space.picks();
                if coreset < 2 {
                    note!("skipping n {n} ratio {ratio}: a coreset of one point has no greedy step to time");
                    continue;
                }
                let picks_timed = args.max_picks.map_or(coreset, |max| coreset.min(max));
                let reference_picks = args.reference_picks.min(coreset);
                space.set_picks(reference_picks);
                let mut reference_run = Vec::new();
                // Converted once, apart from the timing: the reference runs on f32 rows.
                let points = space.to_rows();
                let reference_s = median_s(
                    args.repeats,
                    || (),
                    |()| reference_run = reference::greedy_rows(&points, n, space.dims(), space.start(), reference_picks),
                );
                drop(points);
                space.set_picks(picks_timed);
                let (mut cpu_run, mut cpu_updated_share) = (Vec::new(), 1.0);
                let cpu_s =
                    median_s(args.repeats, || space.clone(), |space| (cpu_run, cpu_updated_share) = fast::select_with_updates(space));
                let mut wgpu_s = None;
                let mut agree = cpu_run.starts_with(&reference_run) || reference_run.starts_with(&cpu_run);
                if let Some(gpu) = &gpu {
                    let mut gpu_run = Ok(Vec::new());
                    wgpu_s = Some(median_s(args.repeats, || (), |()| gpu_run = gpu.coreset_select(&space, CoresetChunking::default())));
                    agree &= gpu_run? == cpu_run;
                }
                // A run of p picks makes p − 1 greedy steps (the first pick is the seeded start).
                let rate = |picks: usize, s: f64| (picks - 1) as f64 / s;
                let (reference_picks_s, cpu_picks_s) = (rate(reference_picks, reference_s), rate(picks_timed, cpu_s));
                let wgpu_picks_s = wgpu_s.map(|s| rate(picks_timed, s));
                let row = Row {
                    patches: n,
                    dims: d,
                    projected_dims: space.dims(),
                    ratio,
                    coreset,
                    picks_timed,
                    projection_ms: median(projection_ms),
                    reference_picks_s,
                    cpu_picks_s,
                    wgpu_picks_s,
                    cpu_updated_share,
                    cpu_over_reference: cpu_picks_s / reference_picks_s,
                    wgpu_over_cpu: wgpu_picks_s.map(|g| g / cpu_picks_s),
                    picks_agree: agree,
                };
                if !args.json {
                    outln!(
                        "n {:>9} d {:>5}→{:<4} ratio {:<6} picks {:>7}/{:<7} projection {:>9.1} ms  reference {:>9.1}  cpu {:>9.1}  wgpu {:>9} picks/s  cpu updated {:>5.1}%  cpu/ref {:>6.1}  wgpu/cpu {:>6}  agree {}",
                        row.patches,
                        row.dims,
                        row.projected_dims,
                        row.ratio,
                        row.picks_timed,
                        row.coreset,
                        row.projection_ms,
                        row.reference_picks_s,
                        row.cpu_picks_s,
                        row.wgpu_picks_s.map_or("-".into(), |r| format!("{r:.1}")),
                        row.cpu_updated_share * 100.0,
                        row.cpu_over_reference,
                        row.wgpu_over_cpu.map_or("-".into(), |r| format!("{r:.2}")),
                        if row.picks_agree { "yes" } else { "NO" },
                    )?;
                }
                rows.push(row);
            }
        }
    }
    if args.json {
        outln!("{}", serde_json::json!({ "device": device, "cases": rows }))?;
    }
    Ok(())
}

/// Median wall time in seconds of `repeats` runs of `work`, each on what `setup` made before its clock
/// started.
fn median_s<T>(repeats: usize, mut setup: impl FnMut() -> T, mut work: impl FnMut(T)) -> f64 {
    let times = (0..repeats)
        .map(|_| {
            let input = setup();
            let start = Instant::now();
            work(input);
            start.elapsed().as_secs_f64()
        })
        .collect();
    median(times)
}
