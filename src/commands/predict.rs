use std::io::Write;
use std::path::PathBuf;

use anomaly_detector::Model;
use anomaly_device::DeviceChoice;
use anyhow::Result;

use crate::evaluate::extractor_for_model;
use crate::extract::image_progress;
use crate::weights::WeightsArgs;

/// `anomaly predict`.
#[derive(clap::Args)]
pub struct Args {
    /// A model written by `anomaly fit` or `anomaly eval`.
    #[arg(long, value_name = "FILE.safetensors")]
    model: PathBuf,
    /// Image files and folders (searched recursively).
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    weights: WeightsArgs,
    /// auto (a real GPU if there is one, else the CPU), wgpu, or cpu.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Images per forward pass (memory grows with it, not with the number of images).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// One JSON object per image (JSON Lines) instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let model = Model::load(&args.model)?;
    let mut paths = Vec::new();
    for path in &args.paths {
        paths.extend(anomaly_data::collect_images(path)?);
    }
    let extractor = extractor_for_model(&model, &args.model, &args.weights, args.device)?;
    let compute = extractor.compute()?;
    let scorer = model.bank.scorer(&compute)?;
    let threshold = model.bank.threshold;
    eprintln!("{} on {}: {} images, threshold {threshold:.4}", extractor.name, extractor.device.describe(), paths.len());
    let progress = image_progress(paths.len(), "predict");
    let mut stdout = std::io::stdout().lock();
    let mut flagged = 0usize;
    extractor.run(paths.clone(), &[], args.batch_size, &progress, |batch, pooled, _| {
        let scores = scorer.score(&pooled)?;
        for (path, score) in batch.paths.iter().zip(scores) {
            let anomalous = score > threshold;
            flagged += usize::from(anomalous);
            let line = if args.json {
                serde_json::json!({ "path": path, "score": score, "threshold": threshold, "anomalous": anomalous }).to_string()
            } else {
                format!("{score:>10.4}  {:<9}  {}", if anomalous { "anomalous" } else { "good" }, path.display())
            };
            progress.suspend(|| writeln!(stdout, "{line}"))?;
        }
        Ok(())
    })?;
    progress.finish_and_clear();
    eprintln!("{flagged} of {} images anomalous (score > {threshold:.4})", paths.len());
    Ok(())
}
