//! The detection methods behind one interface: each fits a model to good images, scores batches of
//! images (per-image scores and, for methods that localise, per-pixel maps) and saves itself as a
//! versioned model file. The commands only ever see [`Detector`]; the model file's `method` picks the
//! loader once.
//!
//! Adding a method: one module implementing [`Detector`] and [`Scorer`], and one registration here (a
//! [`MethodName`] variant, its settings in [`MethodSettings`], and its arms in [`fit`] and [`load`]).

mod autoencoder;
mod extractor;
mod memory_bank;
pub mod patch_features;
mod patchcore;
mod progress;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anomaly_backbone::BackboneName;
use anomaly_data::{Batch, ImageLimits, Preprocess};
use anomaly_detector::{ScoreStats, find_non_finite};
use anomaly_device::ResolvedDevice;
use anomaly_fs::FileBytes;
use anyhow::Result;

pub use anomaly_backbone::HostMap;
pub use autoencoder::AutoencoderSettings;
pub use extractor::{Extractor, to_vec};
pub use memory_bank::MemoryBankSettings;
pub use patch_features::{PatchLayout, Patches};
pub use patchcore::PatchCoreSettings;
pub use progress::{image_progress, stage_spinner};

/// The detection methods, as `--method` names them and model files record them.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MethodName {
    /// ImageNet features of a pretrained backbone, k nearest neighbours in a memory bank of good images.
    #[default]
    MemoryBank,
    /// PatchCore: patch features of a pretrained backbone in a coreset bank; an image's worst patch's
    /// distance to the bank scores, and the patches' distances map where the defect is.
    Patchcore,
    /// A convolutional autoencoder trained on the good images; the reconstruction error scores.
    Autoencoder,
}

impl MethodName {
    /// Every method, in the order help texts list them.
    pub const ALL: [MethodName; 3] = [Self::MemoryBank, Self::Patchcore, Self::Autoencoder];

    /// The name on the command line and in model files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MemoryBank => anomaly_detector::MEMORY_BANK,
            Self::Patchcore => anomaly_patchcore::PATCHCORE,
            Self::Autoencoder => anomaly_autoencoder::AUTOENCODER,
        }
    }
}

impl std::fmt::Display for MethodName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every method's settings, as the commands that fit take them (each method reads its own).
#[derive(clap::Args, Clone, Debug)]
pub struct MethodSettings {
    /// The ImageNet backbone the memory bank and PatchCore take their features from.
    #[arg(long, value_enum, ignore_case = true, default_value_t = BackboneName::EfficientNetLite0)]
    pub backbone: BackboneName,
    #[command(flatten)]
    pub memory_bank: MemoryBankSettings,
    #[command(flatten)]
    pub patchcore: PatchCoreSettings,
    #[command(flatten)]
    pub autoencoder: AutoencoderSettings,
}

impl Default for MethodSettings {
    /// The command line's defaults: EfficientNet-Lite0 and each method's own.
    fn default() -> Self {
        Self {
            backbone: BackboneName::EfficientNetLite0,
            memory_bank: MemoryBankSettings::default(),
            patchcore: PatchCoreSettings::default(),
            autoencoder: AutoencoderSettings::default(),
        }
    }
}

/// What one image's scoring produced.
#[derive(Clone, Debug, Default)]
pub struct ImageOutput {
    /// The anomaly score: above the model's threshold means anomalous.
    pub score: f32,
    /// The vector the t-SNE map places the image by (kept features, latent code, …).
    pub embedding: Vec<f32>,
    /// Per-pixel anomaly map over the input crop (`side × side`, row-major), for methods that localise.
    pub map: Option<Vec<f32>>,
    /// The method's reconstruction of the input (`3 × side × side`, values in [0, 1]), for methods that
    /// reconstruct.
    pub reconstruction: Option<Vec<f32>>,
}

/// Training images' embeddings for the t-SNE map (row-major, `width` values each).
#[derive(Clone, Copy, Debug)]
pub struct Embedding<'a> {
    pub width: usize,
    pub rows: &'a [f32],
}

/// A fitted model of any method.
pub trait Detector {
    /// Which method this is.
    fn method(&self) -> MethodName;
    /// How images become the inputs [`Scorer::score`] takes (resize, crop, normalisation).
    fn preprocess(&self) -> &Preprocess;
    /// Images scoring above it are anomalous.
    fn threshold(&self) -> f32;
    /// How the threshold was set, for metrics.json.
    fn threshold_rule(&self) -> &'static str;
    /// For methods that localise: map values above it mark the anomalous region (`predict`'s bounding
    /// box); set from the training images alone, like [`Detector::threshold`].
    fn pixel_threshold(&self) -> Option<f32> {
        None
    }
    /// The training images' scores, which set the threshold.
    fn train_scores(&self) -> &ScoreStats;
    /// The method and its settings in a few words, for figure titles.
    fn title(&self) -> String;
    /// The closing line of `fit`: what was fitted and its threshold.
    fn describe(&self) -> String;
    /// What the t-SNE map is made of, for its title.
    fn embedding_name(&self) -> &'static str;
    /// The method's own fields of metrics.json (method, backbone, k, …).
    fn report_fields(&self) -> serde_json::Value;
    /// How the model was made, as its file records it (`fit --json`).
    fn info(&self) -> serde_json::Value;
    /// The training images' embeddings, when this process knows them.
    fn train_embedding(&self) -> Option<Embedding<'_>>;
    /// Where the model runs, in words.
    fn device(&self) -> String;
    /// A scorer holding whatever the model keeps on its device (a bank uploaded once, …).
    fn scorer(&self) -> Result<Box<dyn Scorer + '_>>;
    /// The model file's bytes.
    fn to_bytes(&self) -> Result<Vec<u8>>;
}

/// Scores batches of images with one model.
pub trait Scorer {
    /// One output per image of the batch, in order.
    fn score(&mut self, batch: &Batch) -> Result<Vec<ImageOutput>>;
}

/// A clap parser for a count option that accepts `min..=max` only, so that a typo (0, a negative number,
/// a huge one) is refused by the parser with the range, not met later as an empty result, an overflow or
/// an allocation that cannot succeed. Every count option of every command uses it.
pub fn count_in(min: usize, max: usize) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |text| match text.trim().parse::<usize>() {
        Ok(value) if (min..=max).contains(&value) => Ok(value),
        _ => Err(format!("expected a whole number from {min} to {max}")),
    }
}

/// Finds a backbone's weights file (fetching it if the command allows), for methods that run a backbone.
pub type WeightsResolver = Box<dyn Fn(BackboneName) -> Result<PathBuf>>;

/// Where methods run and what they may load: the resolved device, the weights files, and backbones
/// loaded once and shared by every model of the run (`eval --all` fits one per category).
pub struct Runtime {
    device: ResolvedDevice,
    weights: WeightsResolver,
    weights_dir: PathBuf,
    batch_size: usize,
    image_limits: ImageLimits,
    extractors: Mutex<Vec<Arc<Extractor>>>,
}

impl Runtime {
    /// A runtime on `device`; `weights` finds a backbone's weights file in `weights_dir`; images are read
    /// `batch_size` at a time, each within `image_limits`.
    pub fn new(device: ResolvedDevice, weights_dir: &Path, weights: WeightsResolver, batch_size: usize, image_limits: ImageLimits) -> Self {
        Self {
            device,
            weights,
            weights_dir: weights_dir.to_path_buf(),
            batch_size: batch_size.max(1),
            image_limits,
            extractors: Mutex::new(Vec::new()),
        }
    }

    /// What one image may cost to decode.
    pub fn image_limits(&self) -> ImageLimits {
        self.image_limits
    }

    /// The device everything runs on.
    pub fn device(&self) -> &ResolvedDevice {
        &self.device
    }

    /// Images per forward pass.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The folder weights are looked for in (named in errors).
    pub fn weights_dir(&self) -> &Path {
        &self.weights_dir
    }

    /// `name` loaded on the runtime's device (once per run).
    pub fn extractor(&self, name: BackboneName) -> Result<Arc<Extractor>> {
        let mut loaded = self.extractors.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(extractor) = loaded.iter().find(|e| e.name() == name) {
            return Ok(Arc::clone(extractor));
        }
        let path = (self.weights)(name)?;
        let extractor = Arc::new(Extractor::load(name, &path, self.device.clone())?);
        loaded.push(Arc::clone(&extractor));
        Ok(extractor)
    }
}

/// Checks `method`'s settings against the number of training images, before any image is read.
pub fn check(method: MethodName, settings: &MethodSettings, train_images: usize) -> Result<()> {
    match method {
        MethodName::MemoryBank => settings.memory_bank.check(train_images),
        MethodName::Patchcore => settings.patchcore.check(settings.backbone, train_images),
        MethodName::Autoencoder => settings.autoencoder.check(),
    }
}

/// Fits `method` to the good images at `train` (`dataset` names them in the model file).
pub fn fit(
    method: MethodName,
    settings: &MethodSettings,
    train: &[PathBuf],
    dataset: &str,
    runtime: &Runtime,
) -> Result<Box<dyn Detector>> {
    check(method, settings, train.len())?;
    Ok(match method {
        MethodName::MemoryBank => {
            Box::new(memory_bank::MemoryBankDetector::fit(&settings.memory_bank, settings.backbone, train, dataset, runtime)?)
        }
        MethodName::Patchcore => {
            Box::new(patchcore::PatchCoreDetector::fit(&settings.patchcore, settings.backbone, train, dataset, runtime)?)
        }
        MethodName::Autoencoder => Box::new(autoencoder::AutoencoderDetector::fit(&settings.autoencoder, train, dataset, runtime)?),
    })
}

/// The backbone a model file records, if this build knows it and the weights checksum beside it is one
/// (64 hex digits); `path` names the model in errors.
fn recorded_backbone(backbone: &str, weights_sha256: &str, path: &Path) -> Result<BackboneName> {
    let name: BackboneName = backbone.parse().map_err(|e: String| anyhow::anyhow!("{}: {e}", path.display()))?;
    anyhow::ensure!(
        weights_sha256.len() == 64 && weights_sha256.bytes().all(|b| b.is_ascii_hexdigit()),
        "{}: not an anomaly model file (its weights sha256 is not 64 hex digits)",
        path.display()
    );
    Ok(name)
}

/// The backbone a model file names, loaded, if its weights are the ones it was fitted with (`weights_file`,
/// `weights_sha256` as the file records them; `path` names the model in errors).
fn fitted_extractor(
    name: BackboneName,
    weights_file: &str,
    weights_sha256: &str,
    path: &Path,
    runtime: &Runtime,
) -> Result<Arc<Extractor>> {
    let extractor = runtime.extractor(name)?;
    let sha = extractor.weights_sha256()?;
    if sha != weights_sha256 {
        anyhow::bail!(
            "{}: the model was fitted with {name} weights {weights_file} (sha256 {}…), but {} has sha256 {}…; put the weights it \
             was fitted with in {} (or name them with --weights) or refit the model",
            path.display(),
            &weights_sha256[..weights_sha256.len().min(12)],
            extractor.weights().display(),
            &sha[..12],
            runtime.weights_dir().display()
        );
    }
    Ok(extractor)
}

/// The error of a fit whose model holds a NaN, ±Inf or senseless number, raised before anything is written.
fn unusable_fit(reason: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("the fit produced an unusable model: {reason}; no model file was written")
}

/// A model file that passed every check that needs no device, parsed as far as that went.
enum CheckedModel {
    MemoryBank(Box<anomaly_detector::Model>),
    Patchcore(Box<anomaly_patchcore::PatchCoreModel>),
    Autoencoder,
}

/// Runs every check [`load`] makes that needs no device or backbone weights, for any method: the header
/// (format, version, method), the tensors' names, dtypes and shapes against the header, NaN and ±Inf
/// in any tensor, and the header's numbers. Never panics, whatever the bytes (a fuzzer feeds it); sizes a
/// file declares are checked against its length before anything is allocated by them. `path` names the
/// file in errors; returns the model's method.
pub fn check_model_file(file: &FileBytes, path: &Path) -> Result<MethodName> {
    Ok(match checked_model(file, path)? {
        CheckedModel::MemoryBank(_) => MethodName::MemoryBank,
        CheckedModel::Patchcore(_) => MethodName::Patchcore,
        CheckedModel::Autoencoder => MethodName::Autoencoder,
    })
}

fn checked_model(file: &FileBytes, path: &Path) -> Result<CheckedModel> {
    let bytes: &[u8] = file;
    let header = anomaly_detector::read_model_header(bytes, path)?;
    let method = MethodName::ALL.into_iter().find(|m| m.as_str() == header.method).ok_or_else(|| {
        anyhow::anyhow!(
            "{}: a model of method '{}', which this anomaly does not know (it knows {}); upgrade anomaly",
            path.display(),
            header.method,
            MethodName::ALL.map(MethodName::as_str).join(", ")
        )
    })?;
    Ok(match method {
        MethodName::MemoryBank => CheckedModel::MemoryBank(Box::new(memory_bank::check_model(bytes, path)?)),
        MethodName::Patchcore => CheckedModel::Patchcore(Box::new(patchcore::check_model(file, path)?)),
        MethodName::Autoencoder => {
            anomaly_autoencoder::AutoencoderModel::check_bytes(bytes, path)?;
            CheckedModel::Autoencoder
        }
    })
}

/// Reads a model file of any method (`path` names it in errors): [`check_model_file`]'s checks first,
/// then its header's `method` picks the loader, which loads what the model runs on.
pub fn load(file: &FileBytes, path: &Path, runtime: &Runtime) -> Result<Box<dyn Detector>> {
    Ok(match checked_model(file, path)? {
        CheckedModel::MemoryBank(model) => Box::new(memory_bank::MemoryBankDetector::load(*model, path, runtime)?),
        CheckedModel::Patchcore(model) => Box::new(patchcore::PatchCoreDetector::load(*model, path, runtime)?),
        CheckedModel::Autoencoder => Box::new(autoencoder::AutoencoderDetector::load(file, path, runtime)?),
    })
}

/// Scores every image at `paths` with a model, a batch at a time, handing each batch's paths and
/// outputs to `sink` (memory bounded by the batch size). Every output is checked first: a NaN or ±Inf
/// score, map or embedding is an error naming the image, never a verdict.
pub fn score_paths(
    detector: &dyn Detector,
    paths: Vec<PathBuf>,
    batch_size: usize,
    limits: ImageLimits,
    mut sink: impl FnMut(&Batch, Vec<ImageOutput>) -> Result<()>,
) -> Result<()> {
    let mut scorer = detector.scorer()?;
    for batch in anomaly_data::BatchLoader::new(paths, detector.preprocess().clone(), limits, batch_size, 2) {
        let batch = batch?;
        let outputs = score_batch(scorer.as_mut(), detector.method(), &batch)?;
        sink(&batch, outputs)?;
    }
    Ok(())
}

/// Scores one batch with `scorer` (of a `method` model), checked as [`score_paths`] checks every batch: one
/// output per image, and no NaN or ±Inf anywhere.
pub fn score_batch(scorer: &mut dyn Scorer, method: MethodName, batch: &Batch) -> Result<Vec<ImageOutput>> {
    let outputs = scorer.score(batch)?;
    anyhow::ensure!(outputs.len() == batch.len(), "{method} scored {} of {} images", outputs.len(), batch.len());
    check_outputs(&batch.paths, &outputs)?;
    Ok(outputs)
}

/// Refuses a NaN or ±Inf anywhere in images' outputs, naming the image: such a score compares false
/// with any threshold, so it would read as "good".
fn check_outputs(paths: &[PathBuf], outputs: &[ImageOutput]) -> Result<()> {
    for (path, output) in paths.iter().zip(outputs) {
        let bad = |reason: String| anyhow::anyhow!("{}: {reason}; no verdict (is the model file corrupt?)", path.display());
        if !output.score.is_finite() {
            return Err(bad(format!("its score is {}", output.score)));
        }
        if let Some(found) =
            output.map.as_ref().and_then(|map| find_non_finite(&[map.len().isqrt(), map.len().isqrt()], map.iter().copied()))
        {
            return Err(bad(format!("its anomaly map holds {found}")));
        }
        if let Some(found) = find_non_finite(&[output.embedding.len()], output.embedding.iter().copied()) {
            return Err(bad(format!("its embedding holds {found}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
