use std::path::PathBuf;
use std::time::Instant;

use anomaly_data::{BatchLoader, collect_images};
use anyhow::Result;
use indicatif::ProgressBar;

use crate::args::BackboneArgs;
use crate::output::outln;
use anomaly_method::count_in;

/// `anomaly bench …`: benchmarks print figures and ratios; they assert nothing.
#[derive(clap::Subcommand)]
pub enum Bench {
    /// Images/s of decode + preprocess, of the forward pass alone and end to end, and peak memory.
    Backbone(BackboneBenchArgs),
    /// Column statistics, pairwise distance and k-nearest-neighbour kernels over a sweep of sizes.
    Kernels(super::bench_kernels::KernelArgs),
    /// Picks per second of PatchCore's greedy coreset: CPU reference, multithreaded CPU and wgpu.
    Coreset(super::bench_coreset::CoresetArgs),
    /// One image's patches against a bank larger than memory (1M × 1024 by default), memory-mapped from
    /// disk and streamed through the CPU's or wgpu's kNN: time, rate and peak resident memory.
    Bank(super::bench_bank::BankArgs),
    /// Load on `anomaly serve` (in-process, or one already running on loopback): throughput, latency
    /// percentiles, 503s and errors at each concurrency, against `predict`'s path, and resident memory.
    Serve(super::bench_serve::ServeBenchArgs),
}

#[derive(clap::Args)]
pub struct BackboneBenchArgs {
    #[command(flatten)]
    model: BackboneArgs,
    /// Folder of images (e.g. an MVTec AD category's train/good).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Use at most this many images.
    #[arg(long, value_parser = count_in(1, usize::MAX))]
    limit: Option<usize>,
    /// Forward passes of one batch timed for the forward-only figure.
    #[arg(long, default_value_t = 3, value_parser = count_in(1, 1000))]
    repeats: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::Backbone(args) => backbone(args),
        Bench::Kernels(args) => super::bench_kernels::run(args),
        Bench::Coreset(args) => super::bench_coreset::run(args),
        Bench::Serve(args) => super::bench_serve::run(args),
        Bench::Bank(args) => super::bench_bank::run(args),
    }
}

fn backbone(args: BackboneBenchArgs) -> Result<()> {
    let found = collect_images(&args.data)?;
    anomaly_eval::note_skipped(&found.skipped);
    let mut paths = found.files;
    if let Some(limit) = args.limit {
        paths.truncate(limit);
    }
    let batch_size = args.model.run.batch_size;
    let limits = args.model.run.images.limits();
    let extractor = args.model.extractor()?;
    let preprocess = extractor.preprocess();
    let side = preprocess.crop as usize;
    let threads = rayon::current_num_threads();

    // Decode + preprocess alone, in parallel as the pipeline does it.
    let start = Instant::now();
    let mut first_batch = None;
    for batch in BatchLoader::new(paths.clone(), preprocess.clone(), limits, batch_size, 2) {
        let batch = batch?;
        first_batch.get_or_insert(batch);
    }
    let decode_s = start.elapsed().as_secs_f64();
    let first_batch = first_batch.expect("collect_images returns at least one image");

    // Forward alone: one batch already decoded, as the pipeline runs it (burn's network, or ours on the
    // CPU), up to pooled features on the host; the median of the timed passes after a warm-up pass.
    let n = first_batch.len();
    extractor.pooled_batch(&first_batch, side)?;
    let times = (0..args.repeats.max(1))
        .map(|_| {
            let start = Instant::now();
            extractor.pooled_batch(&first_batch, side).map(|_| start.elapsed().as_secs_f64())
        })
        .collect::<Result<Vec<f64>>>()?;
    let forward_s = median(times);

    // End to end: decode overlapping the forward pass, features back on the host.
    let start = Instant::now();
    extractor.run(paths.clone(), &[], batch_size, limits, &ProgressBar::hidden(), |_, _, _| Ok(()))?;
    let end_to_end_s = start.elapsed().as_secs_f64();

    let images = paths.len() as f64;
    let decode_ips = images / decode_s;
    let forward_ips = n as f64 / forward_s;
    let end_to_end_ips = images / end_to_end_s;
    let peak_rss_mib = status_mib("VmHWM:");
    if args.json {
        outln!(
            "{}",
            serde_json::json!({
                "backbone": args.model.backbone.to_string(), "device": extractor.device().describe(), "images": paths.len(),
                "batch_size": batch_size, "threads": threads, "input": side,
                "decode_preprocess_img_s": decode_ips, "forward_img_s": forward_ips, "end_to_end_img_s": end_to_end_ips,
                "peak_rss_mib": peak_rss_mib,
            })
        )?;
    } else {
        outln!(
            "backbone {} on {}, {} images, batch {batch_size}, {threads} threads, input {side}px",
            args.model.backbone,
            extractor.device().describe(),
            paths.len()
        )?;
        outln!("  decode + preprocess  {decode_ips:8.1} img/s")?;
        outln!("  forward alone        {forward_ips:8.1} img/s")?;
        outln!(
            "  end to end           {end_to_end_ips:8.1} img/s  ({:.0}% of the forward-only rate)",
            100.0 * end_to_end_ips / forward_ips
        )?;
        if let Some(mib) = peak_rss_mib {
            outln!("  peak resident memory {mib:8.0} MiB")?;
        }
    }
    Ok(())
}

/// The median of `values` (NaN for none).
pub(super) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A memory figure of this process from `/proc/self/status` (`VmHWM:` its peak, `VmRSS:` now), in MiB,
/// where the platform reports it.
pub(super) fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib as f64 / 1024.0)
}
