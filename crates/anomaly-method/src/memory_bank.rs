//! The seed's memory-bank method behind the [`Detector`] interface: a backbone's pooled features of the
//! good images form the bank (anomaly-detector's [`MemoryBank`]); an image scores the mean distance to its
//! k nearest bank rows.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anomaly_backbone::BackboneName;
use anomaly_data::{Batch, Preprocess};
use anomaly_detector::{DetectorConfig, FeatureSource, MemoryBank, Model, ScoreStats};
use anyhow::Result;
use serde_json::json;

use crate::{Detector, Embedding, Extractor, ImageOutput, MethodName, Runtime, Scorer, count_in};

/// The memory bank's settings on the command line (its backbone is [`crate::MethodSettings`]'s).
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct MemoryBankSettings {
    /// Memory bank: nearest bank rows an image's score averages over.
    #[arg(long, default_value_t = 50, value_parser = count_in(1, 100_000))]
    pub k: usize,
    /// Memory bank: feature columns kept: those of highest std-dev across the training images.
    #[arg(long, default_value_t = 500, value_parser = count_in(1, 1_000_000))]
    pub features: usize,
}

impl Default for MemoryBankSettings {
    /// The seed's settings: k = 50, 500 columns.
    fn default() -> Self {
        let DetectorConfig { k, features } = DetectorConfig::default();
        Self { k, features }
    }
}

impl MemoryBankSettings {
    fn config(self) -> DetectorConfig {
        DetectorConfig { k: self.k, features: self.features }
    }

    /// Checks k and the column count against the number of training images.
    pub fn check(&self, train_images: usize) -> Result<()> {
        Ok(self.config().check(train_images)?)
    }
}

/// A fitted memory bank and the backbone that makes its features.
pub struct MemoryBankDetector {
    model: Model,
    extractor: Arc<Extractor>,
}

impl MemoryBankDetector {
    /// Extracts the good images' features with `backbone` and fits the bank to them.
    pub fn fit(settings: &MemoryBankSettings, backbone: BackboneName, train: &[PathBuf], dataset: &str, runtime: &Runtime) -> Result<Self> {
        let extractor = runtime.extractor(backbone)?;
        let features = extractor.pooled(train, runtime.batch_size(), runtime.image_limits(), "train features")?;
        let bank = MemoryBank::fit(&features, extractor.name().feature_dim(), settings.config(), extractor.compute()?)?;
        let source = FeatureSource {
            backbone: extractor.name().to_string(),
            weights_file: extractor.weights_name(),
            weights_sha256: extractor.weights_sha256()?.to_string(),
            preprocess: extractor.preprocess(),
            dataset: dataset.to_string(),
        };
        let model = Model::new(bank, source);
        model.check_values().map_err(crate::unusable_fit)?;
        Ok(Self { model, extractor })
    }

    /// Loads the backbone a checked model file ([`check_model`]) names, refusing weights other than the
    /// ones it was fitted with.
    pub fn load(model: Model, path: &Path, runtime: &Runtime) -> Result<Self> {
        let info = &model.info;
        let name = crate::recorded_backbone(&info.backbone, &info.weights_sha256, path)?;
        let extractor = crate::fitted_extractor(name, &info.weights_file, &info.weights_sha256, path, runtime)?;
        Ok(Self { model, extractor })
    }

    fn bank(&self) -> &MemoryBank {
        &self.model.bank
    }
}

impl Detector for MemoryBankDetector {
    fn method(&self) -> MethodName {
        MethodName::MemoryBank
    }

    fn preprocess(&self) -> &Preprocess {
        // The features were made with the model's own preprocessing: use exactly that.
        &self.model.info.preprocess
    }

    fn threshold(&self) -> f32 {
        self.bank().threshold
    }

    fn threshold_rule(&self) -> &'static str {
        "mean + 3 sigma (population) of the training images' leave-one-out scores; anomalous when score > threshold"
    }

    fn train_scores(&self) -> &ScoreStats {
        &self.model.info.train_scores
    }

    fn title(&self) -> String {
        format!("{} · k={} · {} features", self.model.info.backbone, self.bank().config.k, self.bank().columns.len())
    }

    fn describe(&self) -> String {
        let info = &self.model.info;
        format!(
            "{} images, {} of {} feature columns, k {}, threshold {:.4} (training scores: mean {:.4}, σ {:.4}, max {:.4})",
            self.bank().len(),
            self.bank().columns.len(),
            info.input_dim,
            info.config.k,
            info.threshold,
            info.train_scores.mean,
            info.train_scores.std,
            info.train_scores.max
        )
    }

    fn embedding_name(&self) -> &'static str {
        "the kept features"
    }

    fn report_fields(&self) -> serde_json::Value {
        json!({
            "method": MethodName::MemoryBank.as_str(),
            "backbone": self.model.info.backbone,
            "weights_sha256": self.model.info.weights_sha256,
            "device": self.device(),
            "k": self.bank().config.k,
            "features": self.bank().columns.len(),
        })
    }

    fn info(&self) -> serde_json::Value {
        serde_json::to_value(&self.model.info).expect("model info serialises")
    }

    fn train_embedding(&self) -> Option<Embedding<'_>> {
        Some(Embedding { width: self.bank().columns.len(), rows: &self.bank().rows })
    }

    fn device(&self) -> String {
        self.extractor.device().describe()
    }

    fn scorer(&self) -> Result<Box<dyn Scorer + '_>> {
        let scorer = self.bank().scorer(self.extractor.compute()?)?;
        Ok(Box::new(BankScorer { detector: self, scorer }))
    }

    fn to_bytes(&self) -> Result<Vec<u8>> {
        Ok(self.model.to_bytes())
    }
}

/// Reads a memory-bank model file without a device: the file's own checks ([`Model::from_bytes`]), a
/// backbone this build knows with the bank's feature width, and a weights checksum of 64 hex digits.
pub(crate) fn check_model(bytes: &[u8], path: &Path) -> Result<Model> {
    let model = Model::from_bytes(bytes, path)?;
    let info = &model.info;
    let name = crate::recorded_backbone(&info.backbone, &info.weights_sha256, path)?;
    anyhow::ensure!(
        info.input_dim == name.feature_dim(),
        "{}: not an anomaly model file (its features are {} wide, but {name}'s are {})",
        path.display(),
        info.input_dim,
        name.feature_dim()
    );
    Ok(model)
}

/// Scores batches against a bank uploaded once to the kernels' device.
struct BankScorer<'a> {
    detector: &'a MemoryBankDetector,
    scorer: anomaly_detector::Scorer<'a>,
}

impl Scorer for BankScorer<'_> {
    fn score(&mut self, batch: &Batch) -> Result<Vec<ImageOutput>> {
        let side = self.detector.preprocess().crop as usize;
        let features = self.detector.extractor.pooled_batch(batch, side)?;
        let kept = self.detector.bank().select(&features)?;
        let scores = self.scorer.score_kept(&kept)?;
        let width = self.detector.bank().columns.len();
        Ok(scores
            .into_iter()
            .zip(kept.chunks_exact(width))
            .map(|(score, row)| ImageOutput { score, embedding: row.to_vec(), map: None, reconstruction: None })
            .collect())
    }
}
