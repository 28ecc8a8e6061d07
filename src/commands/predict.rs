use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anomaly_detector::Model;
use anomaly_device::DeviceChoice;
use anyhow::{Context, Result};

use crate::evaluate::extractor_for_model;
use crate::extract::image_progress;
use crate::weights::WeightsArgs;

/// `anomaly predict`.
#[derive(clap::Args)]
pub struct Args {
    /// A model written by `anomaly fit` or `anomaly eval` (memory bank or autoencoder).
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
    /// Exit with status 3 when any image is anomalous (errors exit with 1), for scripts and line gates.
    #[arg(long)]
    fail_on_anomaly: bool,
}

/// The exit status of `--fail-on-anomaly` when an image is anomalous.
const ANOMALY_FOUND: u8 = 3;

pub fn run(args: Args) -> Result<ExitCode> {
    let bytes = std::fs::read(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
    let method = anomaly_detector::read_model_header(&bytes, &args.model)?.method;
    let mut paths = Vec::new();
    for path in &args.paths {
        paths.extend(anomaly_data::collect_images(path)?);
    }
    if method == anomaly_autoencoder::AUTOENCODER {
        return predict_autoencoder(&args, &bytes, paths);
    }
    let model = Model::from_bytes(&bytes, &args.model)?;
    let extractor = extractor_for_model(&model, &args.model, &args.weights, args.device)?;
    let compute = extractor.compute()?;
    let scorer = model.bank.scorer(compute)?;
    let threshold = model.bank.threshold;
    eprintln!("{} on {}: {} images, threshold {threshold:.4}", extractor.name, extractor.device.describe(), paths.len());
    let progress = image_progress(paths.len(), "predict");
    let mut printer = Printer::new(args.json, threshold);
    extractor.run(paths.clone(), &[], args.batch_size, &progress, |batch, pooled, _| {
        let scores = scorer.score(&pooled)?;
        progress.suspend(|| printer.print(&batch.paths, &scores))
    })?;
    progress.finish_and_clear();
    Ok(printer.finish(paths.len(), args.fail_on_anomaly))
}

/// `predict` with an autoencoder model: images resized to its input, reconstructed batch by batch.
fn predict_autoencoder(args: &Args, bytes: &[u8], paths: Vec<std::path::PathBuf>) -> Result<ExitCode> {
    let device = anomaly_device::resolve(args.device)?;
    let model = anomaly_autoencoder::AutoencoderModel::from_bytes(bytes, &args.model, &device.device)?;
    let threshold = model.info.threshold;
    eprintln!("autoencoder on {}: {} images, threshold {threshold:.5}", device.describe(), paths.len());
    let progress = image_progress(paths.len(), "predict");
    let mut printer = Printer::new(args.json, threshold);
    for batch in anomaly_data::BatchLoader::new(paths.clone(), model.info.preprocess.clone(), args.batch_size, 2) {
        let batch = batch?;
        let scores: Vec<f32> = model.reconstruct(&batch.pixels, &device.device)?.iter().map(|r| r.score).collect();
        progress.inc(batch.len() as u64);
        progress.suspend(|| printer.print(&batch.paths, &scores))?;
    }
    progress.finish_and_clear();
    Ok(printer.finish(paths.len(), args.fail_on_anomaly))
}

/// Prints each image's score and verdict as its batch completes, and a closing count.
struct Printer {
    json: bool,
    threshold: f32,
    flagged: usize,
    stdout: std::io::Stdout,
}

impl Printer {
    fn new(json: bool, threshold: f32) -> Self {
        Self { json, threshold, flagged: 0, stdout: std::io::stdout() }
    }

    fn print(&mut self, paths: &[std::path::PathBuf], scores: &[f32]) -> Result<()> {
        let mut out = self.stdout.lock();
        for (path, &score) in paths.iter().zip(scores) {
            let anomalous = score > self.threshold;
            self.flagged += usize::from(anomalous);
            let line = if self.json {
                serde_json::json!({ "path": path, "score": score, "threshold": self.threshold, "anomalous": anomalous }).to_string()
            } else {
                format!("{score:>10.4}  {:<9}  {}", if anomalous { "anomalous" } else { "good" }, path.display())
            };
            writeln!(out, "{line}")?;
        }
        Ok(())
    }

    /// Prints the count of anomalous images and says how the process should exit.
    fn finish(&self, total: usize, fail_on_anomaly: bool) -> ExitCode {
        eprintln!("{} of {total} images anomalous (score > {:.4})", self.flagged, self.threshold);
        if fail_on_anomaly && self.flagged > 0 { ExitCode::from(ANOMALY_FOUND) } else { ExitCode::SUCCESS }
    }
}
