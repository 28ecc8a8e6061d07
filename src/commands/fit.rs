use std::path::PathBuf;

use anomaly_data::{Dataset, Split};
use anomaly_method::{MethodName, MethodSettings};
use anyhow::Result;

use crate::args::RunArgs;
use crate::output::{note, outln};

/// `anomaly fit`.
#[derive(clap::Args)]
pub struct Args {
    /// memory-bank (pooled backbone features, k nearest neighbours), patchcore (patch features in a coreset
    /// bank, anomaly maps) or autoencoder (reconstruction error).
    #[arg(long, value_enum, default_value_t)]
    method: MethodName,
    #[command(flatten)]
    settings: MethodSettings,
    #[command(flatten)]
    run: RunArgs,
    /// An MVTec AD category (its train/good images are used) or a folder of good images.
    #[arg(long, value_name = "PATH")]
    data: PathBuf,
    /// Where to write the model (tensors + JSON metadata, safetensors).
    #[arg(long, value_name = "FILE.safetensors")]
    model: PathBuf,
    /// Print the model's metadata and timings as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let mut clock = anomaly_eval::Stopwatch::start();
    // A model path that cannot be written fails now, not after the fitting.
    anomaly_fs::check_file_output(&args.model)?;
    let dataset = Dataset::open(&args.data)?;
    anomaly_eval::note_skipped(&dataset.skipped);
    let paths: Vec<PathBuf> = dataset.split(Split::Train).map(|s| s.path.clone()).collect();
    anomaly_method::check(args.method, &args.settings, paths.len())?;
    let runtime = args.run.runtime()?;
    note!("{} on {}: {} good images", args.method, runtime.device().describe(), paths.len());
    clock.lap("load");
    let detector = anomaly_method::fit(args.method, &args.settings, &paths, &dataset.name, &runtime)?;
    clock.lap("fit");
    anomaly_fs::write_atomic(&args.model, &detector.to_bytes()?)?;
    clock.lap("save");
    if args.json {
        let summary = serde_json::json!({ "model": args.model.to_string_lossy(), "info": detector.info(), "timings_s": clock.seconds() });
        outln!("{}", serde_json::to_string_pretty(&summary)?)?;
    } else {
        outln!("{}: {}", args.model.display(), detector.describe())?;
    }
    Ok(())
}
