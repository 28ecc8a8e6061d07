//! `anomaly bench bank`: one image's patches scored against a bank far larger than a model usually
//! holds (1,000,000 × 1024 by default, 4 GB), written to a file on disk and memory-mapped, streamed a chunk
//! of rows at a time through the CPU's or the GPU's kNN: the time, the rate and the peak resident memory
//! (which stays near one chunk, not the bank), with a few queries checked by a plain scan.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use anomaly_detector::Compute;
use anomaly_fs::ScratchFile;
use anomaly_method::count_in;
use anomaly_patchcore::{BANK_CHUNK_BYTES, MappedRows, bytes_text, nearest_in_chunks};
use anyhow::{Context, Result};
use rayon::prelude::*;

use super::bench_kernels::{KernelDevice, random};
use crate::output::{note, outln};

/// Queries checked against a plain f64 scan of the whole bank.
const CHECKED_QUERIES: usize = 4;

#[derive(clap::Args)]
pub struct BankArgs {
    #[arg(long, value_enum, default_value = "cpu")]
    device: KernelDevice,
    /// Bank rows.
    #[arg(long, default_value_t = 1_000_000, value_parser = count_in(1, 1 << 31))]
    rows: usize,
    /// Values per row.
    #[arg(long, default_value_t = 1024, value_parser = count_in(1, 65_536))]
    dim: usize,
    /// Query patches (784: one image's 28 × 28 grid).
    #[arg(long, default_value_t = 784, value_parser = count_in(1, 1_000_000))]
    queries: usize,
    /// MiB of bank rows per chunk.
    #[arg(long, default_value_t = BANK_CHUNK_BYTES >> 20, value_parser = count_in(1, 1 << 20))]
    chunk_mib: usize,
    /// Folder of the bank file (removed afterwards) [default: the system's temporary folder].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Print one JSON object instead of lines.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BankArgs) -> Result<()> {
    let (gpu, device) = args.device.resolve()?;
    let compute = match gpu {
        Some(kernels) => Compute::Gpu(kernels),
        None => Compute::Cpu,
    };
    let (rows, dim) = (args.rows, args.dim);
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    // A scratch file: unnamed on Linux, so that not even a killed bench leaves its gigabytes behind.
    let mut file = ScratchFile::create_in(&dir, ".anomaly-bench-bank-", ".f32")
        .with_context(|| format!("creating the bench's bank file in {} (choose another folder with --dir)", dir.display()))?;
    let bytes = rows as u64 * dim as u64 * 4;
    if !args.json {
        note!("writing a {rows} × {dim} bank ({}) to {}", bytes_text(bytes), file.shown().display());
    }
    // Written in blocks of rows generated on all cores; the file is the bank, nothing of it stays in memory.
    let start = Instant::now();
    let block_rows = (4 << 20) / (dim * 4) + 1;
    let shown = file.shown().to_path_buf();
    let mut writer = BufWriter::with_capacity(1 << 20, &mut file);
    for first in (0..rows).step_by(block_rows * 16) {
        let blocks: Vec<Vec<f32>> = (first..(first + block_rows * 16).min(rows))
            .step_by(block_rows)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|block| random(block_rows.min(rows - block) * dim, block as u64))
            .collect();
        for block in blocks {
            writer.write_all(bytemuck::cast_slice(&block)).with_context(|| format!("writing {}", shown.display()))?;
        }
    }
    writer.flush().with_context(|| format!("writing {}", shown.display()))?;
    drop(writer);
    let write_s = start.elapsed().as_secs_f64();
    let bank = MappedRows::map(file.file(), &shown, dim)?;
    let queries = random(args.queries * dim, u64::MAX);

    let start = Instant::now();
    let nearest = nearest_in_chunks(&queries, dim, bank.chunks(args.chunk_mib << 20), &compute)?;
    let score_s = start.elapsed().as_secs_f64();
    let peak_rss_mib = super::bench::status_mib("VmHWM:");

    // A few queries by a plain scan in f64, chunk by chunk as well (so this check stays in bounded memory).
    let mut best = vec![(f64::INFINITY, usize::MAX); CHECKED_QUERIES.min(args.queries)];
    for (first, chunk) in bank.chunks(args.chunk_mib << 20) {
        for (q, best) in best.iter_mut().enumerate() {
            let query = &queries[q * dim..][..dim];
            for (r, row) in chunk.chunks_exact(dim).enumerate() {
                let squared: f64 = query.iter().zip(row).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                if squared < best.0 {
                    *best = (squared, first + r);
                }
            }
        }
    }
    let agree = best.iter().enumerate().all(|(q, &(squared, row))| {
        let distance = squared.sqrt();
        nearest.indices[q] as usize == row || (nearest.distances[q] as f64 - distance).abs() <= 1e-4 * distance.max(1.0)
    });
    anyhow::ensure!(agree, "the streamed nearest rows differ from a plain scan's: {:?} vs {best:?}", &nearest.indices[..best.len()]);

    let gflops = 2.0 * rows as f64 * dim as f64 * args.queries as f64 / score_s / 1e9;
    if args.json {
        outln!(
            "{}",
            serde_json::json!({
                "device": device, "rows": rows, "dim": dim, "queries": args.queries, "bank_bytes": bytes,
                "chunk_mib": args.chunk_mib, "write_s": write_s, "score_s": score_s, "gflops": gflops,
                "peak_rss_mib": peak_rss_mib, "checked_queries": best.len(),
            })
        )?;
    } else {
        outln!("bank {rows} × {dim} ({}) memory-mapped from disk, {} queries, {device}", bytes_text(bytes), args.queries)?;
        outln!("  written in           {write_s:8.1} s")?;
        outln!("  scored (k = 1) in    {score_s:8.1} s  ({gflops:.1} GFLOP/s), {} MiB chunks", args.chunk_mib)?;
        if let Some(mib) = peak_rss_mib {
            outln!("  peak resident memory {mib:8.0} MiB")?;
        }
        outln!("  {} queries agree with a plain f64 scan", best.len())?;
    }
    Ok(())
}
