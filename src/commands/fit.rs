use std::path::PathBuf;

use anomaly_data::{Dataset, Split};
use anyhow::Result;

use crate::evaluate::{DetectorArgs, Stopwatch, fit_model};
use crate::extract::{BackboneArgs, Extractor};

/// `anomaly fit`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    backbone: BackboneArgs,
    #[command(flatten)]
    detector: DetectorArgs,
    /// An MVTec AD category (its train/good images are used) or a folder of good images.
    #[arg(long, value_name = "PATH")]
    data: PathBuf,
    /// Where to write the model (safetensors bank + JSON metadata).
    #[arg(long, value_name = "FILE.safetensors")]
    model: PathBuf,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Print the model's metadata and timings as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let mut clock = Stopwatch::start();
    let dataset = Dataset::open(&args.data)?;
    let paths: Vec<PathBuf> = dataset.split(Split::Train).map(|s| s.path.clone()).collect();
    let config = args.detector.config();
    config.check(paths.len())?;
    let extractor = Extractor::new(&args.backbone)?;
    eprintln!("{} on {}: {} good images", extractor.name, extractor.device.describe(), paths.len());
    clock.lap("load_backbone");
    let features = extractor.pooled(&paths, args.batch_size, "features")?;
    clock.lap("features");
    let model = fit_model(&extractor, &features, config, &dataset.name)?;
    clock.lap("fit");
    crate::output::write_atomic(&args.model, &model.to_bytes())?;
    clock.lap("save");
    let info = &model.info;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "model": args.model, "info": info, "timings_s": clock.seconds() }))?);
    } else {
        println!(
            "{}: {} images, {} of {} feature columns, k {}, threshold {:.4} (training scores: mean {:.4}, σ {:.4}, max {:.4})",
            args.model.display(),
            model.bank.len(),
            model.bank.columns.len(),
            info.input_dim,
            info.config.k,
            info.threshold,
            info.train_scores.mean,
            info.train_scores.std,
            info.train_scores.max
        );
    }
    Ok(())
}
