use std::path::PathBuf;

use anomaly_data::{Dataset, Split};
use anyhow::Result;

use crate::autoencode::{AutoencoderArgs, Method};
use crate::evaluate::{DetectorArgs, Stopwatch, fit_model};
use crate::extract::{BackboneArgs, Extractor};

/// `anomaly fit`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    backbone: BackboneArgs,
    #[command(flatten)]
    detector: DetectorArgs,
    /// memory-bank (backbone features, k nearest neighbours) or autoencoder (reconstruction error).
    #[arg(long, value_enum, default_value = "memory-bank")]
    method: Method,
    #[command(flatten)]
    autoencoder: AutoencoderArgs,
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
    if args.method == Method::Autoencoder {
        return fit_autoencoder(&args, &dataset.name, &paths, clock);
    }
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
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "model": args.model, "info": info, "timings_s": clock.seconds() }))?
        );
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

fn fit_autoencoder(args: &Args, dataset: &str, paths: &[PathBuf], mut clock: Stopwatch) -> Result<()> {
    args.autoencoder.check()?;
    let device = anomaly_device::resolve(args.backbone.device)?;
    eprintln!("autoencoder on {}: {} good images", device.describe(), paths.len());
    let images = crate::autoencode::load_images(paths, args.autoencoder.image_size, args.batch_size, "images")?;
    clock.lap("load");
    let (model, _) = crate::autoencode::fit(&images, &args.autoencoder, &device, dataset)?;
    clock.lap("train");
    crate::output::write_atomic(&args.model, &model.to_bytes()?)?;
    let info = &model.info;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "model": args.model, "info": info, "timings_s": clock.seconds() }))?
        );
    } else {
        println!(
            "{}: autoencoder {}px, latent {}, {} epochs (final loss {:.5}), threshold {:.5} (training scores: mean {:.5}, σ {:.5})",
            args.model.display(),
            info.model.image_size,
            info.model.latent,
            info.train.epochs,
            info.epoch_losses.last().copied().unwrap_or(f64::NAN),
            info.threshold,
            info.train_scores.mean,
            info.train_scores.std
        );
    }
    Ok(())
}
