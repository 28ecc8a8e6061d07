//! The autoencoder method end to end: images at the autoencoder's size, training with a progress bar,
//! scores and error maps, pixel AUROC from the masks, and the same report as the memory bank plus
//! reconstructions.png.

use std::path::PathBuf;

use anomaly_autoencoder::{AutoencoderModel, Checkpoint, ConvAutoencoderConfig, Reconstruction, TrainConfig, preprocess, train};
use anomaly_data::{BatchLoader, Dataset, Label, Sample, Split, load_mask};
use anomaly_device::ResolvedDevice;
use anomaly_report::GridImage;
use anyhow::Result;
use image::{GrayImage, RgbImage};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::evaluate::{Embedding, EvalOptions, EvalSummary, Outcome, Stopwatch, test_samples, write_report};
use crate::extract::image_progress;
use crate::output::write_atomic;

/// The detection method.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Method {
    /// ImageNet features of a pretrained backbone, k nearest neighbours in a memory bank of good images.
    #[default]
    MemoryBank,
    /// A convolutional autoencoder trained on the good images; the reconstruction error scores.
    Autoencoder,
}

/// The autoencoder's settings on the command line.
#[derive(clap::Args, Clone, Debug)]
pub struct AutoencoderArgs {
    /// Autoencoder: side of its square input images (a multiple of 16).
    #[arg(long, default_value_t = 128)]
    pub image_size: usize,
    /// Autoencoder: length of the latent code.
    #[arg(long, default_value_t = 128)]
    pub latent: usize,
    /// Autoencoder: training epochs.
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Autoencoder: images per training step.
    #[arg(long, default_value_t = 16)]
    pub train_batch_size: usize,
    /// Autoencoder: Adam's learning rate.
    #[arg(long, default_value_t = 1e-3)]
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

impl AutoencoderArgs {
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

/// Decodes and resizes images to the autoencoder's input (`3 × size × size` values in [0, 1] each).
pub fn load_images(paths: &[PathBuf], size: usize, batch_size: usize, message: &str) -> Result<Vec<Vec<f32>>> {
    let progress = image_progress(paths.len(), message);
    let mut images = Vec::with_capacity(paths.len());
    for batch in BatchLoader::new(paths.to_vec(), preprocess(size), batch_size, 2) {
        let batch = batch?;
        progress.inc(batch.len() as u64);
        images.extend(batch.pixels.chunks_exact(3 * size * size).map(<[f32]>::to_vec));
    }
    progress.finish_and_clear();
    Ok(images)
}

/// Trains an autoencoder on good images and sets its threshold from their own scores.
pub fn fit(
    images: &[Vec<f32>],
    args: &AutoencoderArgs,
    device: &ResolvedDevice,
    dataset: &str,
) -> Result<(AutoencoderModel, Vec<Reconstruction>)> {
    let (model_config, train_config) = args.configs();
    let steps = train_config.epochs * images.len().div_ceil(train_config.batch_size.max(1));
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("training {bar:30} {pos}/{len} steps, epoch {msg} ({per_sec}, eta {eta})")
            .expect("valid progress template"),
    );
    let checkpoint = args.checkpoint.as_ref().map(|dir| Checkpoint { dir: dir.clone(), resume: args.resume });
    let trained = train(images, &model_config, &train_config, &device.device, checkpoint.as_ref(), |epoch, loss| {
        bar.inc(1);
        bar.set_message(format!("{}/{}, loss {loss:.5}", epoch + 1, train_config.epochs));
    })?;
    bar.finish_and_clear();
    let network = trained.model.clone();
    let train_reconstructions = reconstruct_all(&network, model_config.image_size, images, &device.device, 16)?;
    let scores: Vec<f32> = train_reconstructions.iter().map(|r| r.score).collect();
    Ok((AutoencoderModel::new(trained, model_config, train_config, &scores, dataset), train_reconstructions))
}

/// Reconstructs images a batch at a time.
pub fn reconstruct_all(
    network: &anomaly_autoencoder::ConvAutoencoder,
    size: usize,
    images: &[Vec<f32>],
    device: &burn::tensor::Device,
    batch_size: usize,
) -> Result<Vec<Reconstruction>> {
    let mut out = Vec::with_capacity(images.len());
    for batch in images.chunks(batch_size.max(1)) {
        let flat: Vec<f32> = batch.concat();
        out.extend(anomaly_autoencoder::reconstruct(network, size, &flat, device)?);
    }
    Ok(out)
}

/// How the autoencoder to evaluate is had.
pub enum AutoencoderSource {
    Loaded(Box<AutoencoderModel>),
    Fit(AutoencoderArgs),
}

/// Scores a dataset's test images with an autoencoder (training it first if asked) and writes the report.
pub fn evaluate(dataset: &Dataset, source: AutoencoderSource, device: &ResolvedDevice, options: &EvalOptions) -> Result<EvalSummary> {
    let mut clock = Stopwatch::start();
    let test = test_samples(dataset)?;
    let (model, train_reconstructions) = match source {
        AutoencoderSource::Loaded(model) => (*model, None),
        AutoencoderSource::Fit(args) => {
            args.check()?;
            let paths: Vec<PathBuf> = dataset.split(Split::Train).map(|s| s.path.clone()).collect();
            let images = load_images(&paths, args.image_size, options.batch_size, "train images")?;
            clock.lap("load_train");
            let (model, reconstructions) = fit(&images, &args, device, &dataset.name)?;
            clock.lap("train");
            write_atomic(&options.report.join("model.safetensors"), &model.to_bytes()?)?;
            (model, Some(reconstructions))
        }
    };
    let size = model.info.model.image_size;
    let paths: Vec<PathBuf> = test.iter().map(|s| s.path.clone()).collect();
    let images = load_images(&paths, size, options.batch_size, "test images")?;
    let reconstructions = reconstruct_all(&model.network, size, &images, &device.device, options.batch_size)?;
    clock.lap("score");

    let (pixel_auroc, pixel_note) = pixel_auroc(&test, &reconstructions, size)?;
    write_atomic(
        &options.report.join("reconstructions.png"),
        &reconstructions_png(&dataset.name, &test, &images, &reconstructions, size)?,
    )?;
    clock.lap("reconstructions");

    let train_codes: Vec<f32> = train_reconstructions.iter().flatten().flat_map(|r| r.code.iter().copied()).collect();
    let test_codes: Vec<f32> = reconstructions.iter().flat_map(|r| r.code.iter().copied()).collect();
    let info = &model.info;
    let mut method = json!({
        "method": anomaly_autoencoder::AUTOENCODER,
        "device": device.describe(),
        "image_size": size,
        "latent": info.model.latent,
        "epochs": info.train.epochs,
        "final_loss": info.epoch_losses.last(),
        "score_rule": "mean of the worst 1% of the per-pixel squared reconstruction error",
        "pixel_auroc": pixel_auroc,
    });
    if let Some(note) = pixel_note {
        method["pixel_auroc_note"] = json!(note);
    }
    let outcome = Outcome {
        test: &test,
        scores: reconstructions.iter().map(|r| r.score as f64).collect(),
        threshold: info.threshold as f64,
        threshold_rule: "mean + 3 sigma (population) of the training images' scores; anomalous when score > threshold",
        n_train: info.train_scores.count,
        train_scores: &info.train_scores,
        title: format!("{} · autoencoder {}px, latent {}", dataset.name, size, info.model.latent),
        tsne_title: if train_codes.is_empty() { "t-SNE of the latent codes (test images)" } else { "t-SNE of the latent codes" },
        embedding: Embedding { width: info.model.latent, train: &train_codes, test: &test_codes },
        method,
    };
    let summary = write_report(&dataset.name, outcome, options, clock)?;
    if let Some(value) = pixel_auroc {
        eprintln!("{}: pixel AUROC {value:.4}", dataset.name);
    }
    Ok(summary)
}

/// Pixel AUROC of the error maps against the masks: good images' pixels are all negatives; defective
/// images without a mask are left out.
fn pixel_auroc(test: &[&Sample], reconstructions: &[Reconstruction], size: usize) -> Result<(Option<f64>, Option<String>)> {
    let geometry = preprocess(size);
    let (mut scores, mut labels) = (Vec::new(), Vec::new());
    for (sample, reconstruction) in test.iter().zip(reconstructions) {
        let truth = match (&sample.mask, sample.label) {
            (_, Label::Good) => vec![false; size * size],
            (Some(mask), Label::Defective) => geometry.mask(&load_mask(mask)?)?,
            (None, Label::Defective) => continue,
        };
        scores.extend(reconstruction.error_map.iter().map(|&e| e as f64));
        labels.extend(truth);
    }
    Ok(match anomaly_report::auroc(&scores, &labels) {
        Ok(value) => (Some(value), None),
        Err(error) => (None, Some(format!("pixel AUROC is undefined: {error}"))),
    })
}

/// Input (mask outlined), reconstruction and error map of two images per test type.
fn reconstructions_png(
    dataset: &str,
    test: &[&Sample],
    images: &[Vec<f32>],
    reconstructions: &[Reconstruction],
    size: usize,
) -> Result<Vec<u8>> {
    let peak = reconstructions.iter().flat_map(|r| r.error_map.iter().copied()).fold(1e-12f32, f32::max);
    let geometry = preprocess(size);
    let mut rows = Vec::new();
    let mut shown: Vec<(String, usize)> = Vec::new();
    for (index, sample) in test.iter().enumerate() {
        let count = match shown.iter_mut().find(|(d, _)| *d == sample.defect) {
            Some((_, n)) => n,
            None => {
                shown.push((sample.defect.clone(), 0));
                &mut shown.last_mut().expect("just pushed").1
            }
        };
        if *count >= 2 {
            continue;
        }
        *count += 1;
        let mask = match &sample.mask {
            Some(path) => {
                let truth = geometry.mask(&load_mask(path)?)?;
                Some(GrayImage::from_fn(size as u32, size as u32, |x, y| {
                    image::Luma([if truth[y as usize * size + x as usize] { 255 } else { 0 }])
                }))
            }
            None => None,
        };
        let name = format!("{} {}", sample.defect, sample.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
        rows.push((
            name,
            vec![
                GridImage { image: to_rgb(&images[index], size), mask },
                GridImage { image: to_rgb(&reconstructions[index].image, size), mask: None },
                GridImage { image: heat(&reconstructions[index].error_map, size, peak), mask: None },
            ],
        ));
    }
    Ok(anomaly_report::sample_grid_png(&format!("{dataset}: input (mask in red) · reconstruction · error"), &rows)?)
}

fn to_rgb(chw: &[f32], size: usize) -> RgbImage {
    let plane = size * size;
    RgbImage::from_fn(size as u32, size as u32, |x, y| {
        let p = y as usize * size + x as usize;
        image::Rgb([0, 1, 2].map(|c| (chw[c * plane + p] * 255.0).round().clamp(0.0, 255.0) as u8))
    })
}

/// An error map in a black → red → yellow → white ramp, scaled to the largest error of the set.
fn heat(map: &[f32], size: usize, peak: f32) -> RgbImage {
    RgbImage::from_fn(size as u32, size as u32, |x, y| {
        let v = (map[y as usize * size + x as usize] / peak).sqrt().clamp(0.0, 1.0) * 3.0;
        let channel = |offset: f32| ((v - offset).clamp(0.0, 1.0) * 255.0) as u8;
        image::Rgb([channel(0.0), channel(1.0), channel(2.0)])
    })
}
