//! The convolutional autoencoder behind the [`Detector`] interface: trained on the good images, it scores
//! an image by its reconstruction error (the mean of its worst 1% of pixels) and maps where a defect is.

use std::path::{Path, PathBuf};

use anomaly_autoencoder::{AutoencoderModel, Checkpoint, ConvAutoencoder, ConvAutoencoderConfig, Reconstruction, TrainConfig};
use anomaly_data::{Batch, BatchLoader, ImageLimits, Preprocess};
use anomaly_detector::ScoreStats;
use anomaly_device::ResolvedDevice;
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::{Detector, Embedding, ImageOutput, MethodName, Runtime, Scorer, count_in, image_progress};

/// The autoencoder's settings on the command line.
#[derive(clap::Args, Clone, Debug)]
pub struct AutoencoderSettings {
    /// Autoencoder: side of its square input images (a multiple of 16).
    #[arg(long, default_value_t = 128, value_parser = count_in(16, 1024))]
    pub image_size: usize,
    /// Autoencoder: length of the latent code.
    #[arg(long, default_value_t = 128, value_parser = count_in(1, 65_536))]
    pub latent: usize,
    /// Autoencoder: training epochs.
    #[arg(long, default_value_t = 30, value_parser = count_in(1, 1_000_000))]
    pub epochs: usize,
    /// Autoencoder: images per training step.
    #[arg(long, default_value_t = 16, value_parser = count_in(1, 4096))]
    pub train_batch_size: usize,
    /// Autoencoder: Adam's learning rate.
    #[arg(long, default_value_t = 1e-3, value_parser = positive_rate)]
    pub learning_rate: f64,
    /// Autoencoder: seed of the initial weights, the image order and the augmentation.
    #[arg(long, default_value_t = 0)]
    pub train_seed: u64,
    /// Autoencoder: train without flips and brightness changes.
    #[arg(long)]
    pub no_augment: bool,
    /// Autoencoder: checkpoint folder, written after every epoch.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,
    /// Autoencoder: continue from the checkpoint folder's last epoch.
    #[arg(long, requires = "checkpoint")]
    pub resume: bool,
}

impl Default for AutoencoderSettings {
    /// The command line's defaults: 128 px, latent 128, 30 epochs of 16 images, Adam at 1e-3, seed 0.
    fn default() -> Self {
        let train = TrainConfig::default();
        Self {
            image_size: 128,
            latent: 128,
            epochs: train.epochs,
            train_batch_size: train.batch_size,
            learning_rate: train.learning_rate,
            train_seed: train.seed,
            no_augment: !train.augment,
            checkpoint: None,
            resume: false,
        }
    }
}

impl AutoencoderSettings {
    /// Checks the settings can build an autoencoder, before any image is read.
    pub fn check(&self) -> Result<()> {
        self.configs().0.check().map_err(anyhow::Error::msg)
    }

    fn configs(&self) -> (ConvAutoencoderConfig, TrainConfig) {
        let model = ConvAutoencoderConfig::new().with_image_size(self.image_size).with_latent(self.latent);
        let train = TrainConfig {
            epochs: self.epochs,
            batch_size: self.train_batch_size,
            learning_rate: self.learning_rate,
            seed: self.train_seed,
            augment: !self.no_augment,
        };
        (model, train)
    }
}

/// A trained autoencoder on its device, with the training images' latent codes when it was trained here.
pub struct AutoencoderDetector {
    model: AutoencoderModel,
    device: ResolvedDevice,
    train_codes: Vec<f32>,
}

impl AutoencoderDetector {
    /// Trains on the good images at `train` and sets the threshold from their own scores.
    pub fn fit(settings: &AutoencoderSettings, train: &[PathBuf], dataset: &str, runtime: &Runtime) -> Result<Self> {
        settings.check()?;
        let device = runtime.device().clone();
        let (model_config, train_config) = settings.configs();
        let images = load_images(train, model_config.image_size, runtime.batch_size(), runtime.image_limits(), "train images")?;
        let steps = train_config.epochs * images.len().div_ceil(train_config.batch_size.max(1));
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template("training {bar:30} {pos}/{len} steps, epoch {msg} ({per_sec}, eta {eta})")
                .expect("valid progress template"),
        );
        let checkpoint = settings.checkpoint.as_ref().map(|dir| Checkpoint { dir: dir.clone(), resume: settings.resume });
        let trained =
            anomaly_autoencoder::train(&images, &model_config, &train_config, &device.device, checkpoint.as_ref(), |epoch, loss| {
                bar.inc(1);
                bar.set_message(format!("{}/{}, loss {loss:.5}", epoch + 1, train_config.epochs));
            })?;
        bar.finish_and_clear();
        let reconstructions = reconstruct_all(&trained.model, model_config.image_size, &images, &device, 16)?;
        let scores: Vec<f32> = reconstructions.iter().map(|r| r.score).collect();
        let train_codes = reconstructions.iter().flat_map(|r| r.code.iter().copied()).collect();
        let model = AutoencoderModel::new(trained, model_config, train_config, &scores, dataset);
        model.check_values().map_err(crate::unusable_fit)?;
        Ok(Self { model, device, train_codes })
    }

    /// Reads an autoencoder model file onto the runtime's device.
    pub fn load(bytes: &[u8], path: &Path, runtime: &Runtime) -> Result<Self> {
        let device = runtime.device().clone();
        let model = AutoencoderModel::from_bytes(bytes, path, &device.device)?;
        Ok(Self { model, device, train_codes: Vec::new() })
    }
}

impl Detector for AutoencoderDetector {
    fn method(&self) -> MethodName {
        MethodName::Autoencoder
    }

    fn preprocess(&self) -> &Preprocess {
        &self.model.info.preprocess
    }

    fn threshold(&self) -> f32 {
        self.model.info.threshold
    }

    fn threshold_rule(&self) -> &'static str {
        "mean + 3 sigma (population) of the training images' scores; anomalous when score > threshold"
    }

    fn train_scores(&self) -> &ScoreStats {
        &self.model.info.train_scores
    }

    fn title(&self) -> String {
        format!("autoencoder {}px, latent {}", self.model.info.model.image_size, self.model.info.model.latent)
    }

    fn describe(&self) -> String {
        let info = &self.model.info;
        format!(
            "autoencoder {}px, latent {}, {} epochs (final loss {:.5}), threshold {:.5} (training scores: mean {:.5}, σ {:.5})",
            info.model.image_size,
            info.model.latent,
            info.train.epochs,
            info.epoch_losses.last().copied().unwrap_or(f64::NAN),
            info.threshold,
            info.train_scores.mean,
            info.train_scores.std
        )
    }

    fn embedding_name(&self) -> &'static str {
        if self.train_codes.is_empty() { "the latent codes (test images)" } else { "the latent codes" }
    }

    fn report_fields(&self) -> serde_json::Value {
        let info = &self.model.info;
        json!({
            "method": MethodName::Autoencoder.as_str(),
            "device": self.device(),
            "image_size": info.model.image_size,
            "latent": info.model.latent,
            "epochs": info.train.epochs,
            "final_loss": info.epoch_losses.last(),
            "score_rule": "mean of the worst 1% of the per-pixel squared reconstruction error",
        })
    }

    fn info(&self) -> serde_json::Value {
        serde_json::to_value(&self.model.info).expect("model info serialises")
    }

    fn train_embedding(&self) -> Option<Embedding<'_>> {
        (!self.train_codes.is_empty()).then_some(Embedding { width: self.model.info.model.latent, rows: &self.train_codes })
    }

    fn device(&self) -> String {
        self.device.describe()
    }

    fn scorer(&self) -> Result<Box<dyn Scorer + '_>> {
        Ok(Box::new(ReconstructionScorer { detector: self }))
    }

    fn to_bytes(&self) -> Result<Vec<u8>> {
        Ok(self.model.to_bytes()?)
    }
}

/// Scores batches by reconstructing them.
struct ReconstructionScorer<'a> {
    detector: &'a AutoencoderDetector,
}

impl Scorer for ReconstructionScorer<'_> {
    fn score(&mut self, batch: &Batch) -> Result<Vec<ImageOutput>> {
        let reconstructions = self.detector.model.reconstruct(&batch.pixels, &self.detector.device.device)?;
        Ok(reconstructions
            .into_iter()
            .map(|r| ImageOutput { score: r.score, embedding: r.code, map: Some(r.error_map), reconstruction: Some(r.image) })
            .collect())
    }
}

/// Decodes and resizes images to the autoencoder's input (`3 × size × size` values in [0, 1] each).
fn load_images(paths: &[PathBuf], size: usize, batch_size: usize, limits: ImageLimits, message: &str) -> Result<Vec<Vec<f32>>> {
    let progress = image_progress(paths.len(), message);
    let mut images = Vec::with_capacity(paths.len());
    for batch in BatchLoader::new(paths.to_vec(), anomaly_autoencoder::preprocess(size), limits, batch_size, 2) {
        let batch = batch?;
        progress.inc(batch.len() as u64);
        images.extend(batch.pixels.chunks_exact(3 * size * size).map(<[f32]>::to_vec));
    }
    progress.finish_and_clear();
    Ok(images)
}

/// Reconstructs images a batch at a time.
fn reconstruct_all(
    network: &ConvAutoencoder,
    size: usize,
    images: &[Vec<f32>],
    device: &ResolvedDevice,
    batch_size: usize,
) -> Result<Vec<Reconstruction>> {
    let mut out = Vec::with_capacity(images.len());
    for batch in images.chunks(batch_size.max(1)) {
        let flat: Vec<f32> = batch.concat();
        out.extend(anomaly_autoencoder::reconstruct(network, size, &flat, &device.device)?);
    }
    Ok(out)
}

/// A learning rate: a finite number above 0 (NaN, infinity, 0 or a negative rate would train nothing).
fn positive_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err("expected a finite number above 0".into()),
    }
}
