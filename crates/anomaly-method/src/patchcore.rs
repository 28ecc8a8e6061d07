//! PatchCore behind the [`Detector`] interface: the backbone's patch features ([`PatchLayout`]) of the good
//! images go to anomaly-patchcore's [`PatchBank`] (coreset, leave-one-out thresholds); an image scores its
//! worst patch's distance to the bank, and its map shows every patch's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anomaly_backbone::BackboneName;
use anomaly_data::{Batch, Preprocess};
use anomaly_detector::{Compute, ScoreStats};
use anomaly_fs::FileBytes;
use anomaly_patchcore::{
    BankScorer, MemoryPlan, PatchBank, PatchCoreConfig, PatchCoreModel, PatchGeometry, PatchSource, TrainPatchesWriter, bytes_text,
};
use anyhow::Result;
use serde_json::json;

use crate::{
    Detector, Embedding, Extractor, ImageOutput, MethodName, PatchLayout, Runtime, Scorer, count_in, image_progress, stage_spinner,
};

/// PatchCore's settings on the command line (its backbone is [`crate::MethodSettings`]'s).
#[derive(clap::Args, Clone, Debug)]
pub struct PatchCoreSettings {
    /// PatchCore: share of the training patches its greedy coreset keeps in the bank (1 keeps all).
    #[arg(long, default_value_t = 0.1, value_parser = coreset_ratio)]
    pub coreset_ratio: f64,
    /// PatchCore: dimensions of the coreset's seeded random projection (0: select on the patches as they are).
    #[arg(long, default_value_t = 128, value_parser = count_in(0, 65_536))]
    pub projection: usize,
    /// PatchCore: seed of the coreset's projection and first pick.
    #[arg(long, default_value_t = 0)]
    pub coreset_seed: u64,
    /// PatchCore: values per patch, pooled from the two feature maps' channels [default: 1024 for the
    /// ResNets, all channels for EfficientNet-Lite].
    #[arg(long, value_parser = count_in(1, 65_536))]
    pub patch_dim: Option<usize>,
    /// PatchCore: weigh an image's score by its worst patch's neighbourhood in the bank, as the paper's
    /// reweighting.
    #[arg(long)]
    pub reweight: bool,
    /// PatchCore: memory the fit may hold of training patches, coreset and bank, like 512MiB or 8GiB;
    /// patches beyond it spill to a file in --spill-dir [default: half of this machine's memory].
    #[arg(long, value_name = "SIZE", value_parser = byte_size)]
    pub memory_budget: Option<u64>,
    /// PatchCore: folder of the spill file when the training patches exceed --memory-budget (put it on a
    /// disk, not a RAM-backed tmpfs) [default: the system's temporary folder, $TMPDIR].
    #[arg(long, value_name = "DIR")]
    pub spill_dir: Option<PathBuf>,
}

impl Default for PatchCoreSettings {
    /// PatchCore's defaults: 10% coreset, 128-d projection, seed 0, the backbone's patch width.
    fn default() -> Self {
        let config = PatchCoreConfig::default();
        Self {
            coreset_ratio: config.coreset_ratio,
            projection: config.projection,
            coreset_seed: config.seed,
            patch_dim: None,
            reweight: false,
            memory_budget: None,
            spill_dir: None,
        }
    }
}

/// `--memory-budget`: bytes, with an optional unit (B, KB, MB, GB, TB in powers of 1000; K, KiB, M, MiB,
/// G, GiB, T, TiB in powers of 1024).
pub(crate) fn byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        _ => return Err(format!("unknown unit {unit:?}: expected a size like 512MiB, 8GiB or 2GB")),
    };
    match number.parse::<f64>() {
        Ok(value) if value > 0.0 && (value * scale as f64) < u64::MAX as f64 => Ok((value * scale as f64) as u64),
        _ => Err("expected a size above 0, like 512MiB, 8GiB or 2GB".into()),
    }
}

/// The default memory budget: half of this machine's memory (`MemTotal` in /proc/meminfo), with how it
/// was found, or 4 GiB where the machine does not say.
fn default_memory_budget() -> (u64, String) {
    match anomaly_device::host_memory("MemTotal") {
        Some(total) => (total / 2, format!("half of this machine's {}", anomaly_patchcore::bytes_text(total))),
        None => (4 << 30, "this machine's memory is not known".into()),
    }
}

/// `--coreset-ratio`: a number above 0 and at most 1.
fn coreset_ratio(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(ratio) if ratio > 0.0 && ratio <= 1.0 => Ok(ratio),
        _ => Err("expected a share of the patches above 0 and at most 1 (0.1 keeps 10%)".into()),
    }
}

impl PatchCoreSettings {
    fn config(&self) -> PatchCoreConfig {
        PatchCoreConfig { coreset_ratio: self.coreset_ratio, projection: self.projection, seed: self.coreset_seed, reweight: self.reweight }
    }

    fn layout(&self, backbone: BackboneName) -> Result<PatchLayout> {
        let layout = PatchLayout::new(backbone);
        match self.patch_dim {
            Some(dim) => layout.with_patch_dim(dim),
            None => Ok(layout),
        }
    }

    /// Checks the settings against the backbone and the number of training images, before any image is read.
    pub fn check(&self, backbone: BackboneName, train_images: usize) -> Result<()> {
        let layout = self.layout(backbone)?;
        self.config().check(train_images)?;
        if let Some(budget) = self.memory_budget {
            // Planned for the CPU's selection, the smaller need: the fit plans again for its device.
            MemoryPlan::new(train_images, geometry(&layout, &backbone.preprocess()), &self.config(), &Compute::Cpu, budget)?;
        }
        Ok(())
    }
}

/// The patches a layout makes of images preprocessed by `preprocess`: the bank's geometry.
fn geometry(layout: &PatchLayout, preprocess: &Preprocess) -> PatchGeometry {
    PatchGeometry { grid: layout.grid(), patch_dim: layout.patch_dim(), side: preprocess.crop as usize }
}

/// A fitted PatchCore model and the backbone that makes its patches.
pub struct PatchCoreDetector {
    model: PatchCoreModel,
    layout: PatchLayout,
    extractor: Arc<Extractor>,
    /// The training images' mean patches, for the t-SNE map (known after a fit, not in the file).
    train_embedding: Option<Vec<f32>>,
}

impl PatchCoreDetector {
    /// Extracts the good images' patches and fits the bank to them.
    pub fn fit(settings: &PatchCoreSettings, backbone: BackboneName, train: &[PathBuf], dataset: &str, runtime: &Runtime) -> Result<Self> {
        let layout = settings.layout(backbone)?;
        let extractor = runtime.extractor(backbone)?;
        let preprocess = extractor.preprocess();
        let (grid, dim) = (layout.grid(), layout.patch_dim());
        let per_image = grid.0 * grid.1;
        let geometry = geometry(&layout, &preprocess);
        let config = settings.config();
        let (budget, budget_source) = match settings.memory_budget {
            Some(budget) => (budget, "--memory-budget".to_string()),
            None => default_memory_budget(),
        };
        let plan = MemoryPlan::new(train.len(), geometry, &config, extractor.compute()?, budget)?;
        let spill_dir = settings.spill_dir.clone().unwrap_or_else(std::env::temp_dir);
        let mut patches = TrainPatchesWriter::new(&plan, geometry, train.len(), &spill_dir)?;
        let held = if let Some(path) = patches.spill_path() {
            format!(
                "its {} of training patches spill to {}, read back {} images at a time",
                bytes_text(plan.features_bytes()),
                path.display(),
                plan.chunk_images()
            )
        } else {
            "the training patches stay in memory".to_string()
        };
        crate::note!(
            "PatchCore: memory budget {} ({budget_source}); the coreset and bank need {}, {held}",
            bytes_text(plan.budget()),
            bytes_text(plan.working_bytes())
        );
        let mut embedding = Vec::with_capacity(train.len() * dim);
        let progress = image_progress(train.len(), "train patches");
        extractor.patches(&layout, train.to_vec(), runtime.batch_size(), runtime.image_limits(), &progress, |_, batch| {
            anyhow::ensure!(batch.grid == grid, "the backbone gave a {:?} patch grid, not the layout's {grid:?}", batch.grid);
            embedding.extend(mean_patches(&batch.values, per_image, dim));
            patches.push(&batch.values)?;
            Ok(())
        })?;
        progress.finish_and_clear();
        let patches = patches.finish()?;
        let spinner = stage_spinner(format!(
            "PatchCore: coreset of {} patches and leave-one-out threshold on {}",
            patches.rows(),
            if extractor.device().is_wgpu() { "wgpu" } else { "the CPU" }
        ));
        let bank = PatchBank::fit_from(&patches, config, extractor.compute()?)?;
        spinner.finish_and_clear();
        drop(patches);
        let source = PatchSource {
            backbone: extractor.name().to_string(),
            weights_file: extractor.weights_name(),
            weights_sha256: extractor.weights_sha256()?.to_string(),
            preprocess,
            taps: layout.taps().map(str::to_string),
            dataset: dataset.to_string(),
        };
        let model = PatchCoreModel::new(bank, source);
        model.check_values().map_err(crate::unusable_fit)?;
        Ok(Self { model, layout, extractor, train_embedding: Some(embedding) })
    }

    /// Loads the backbone a checked model file ([`check_model`]) names, refusing weights other than the
    /// ones it was fitted with.
    pub fn load(model: PatchCoreModel, path: &Path, runtime: &Runtime) -> Result<Self> {
        let layout = model_layout(&model, path)?;
        let source = &model.info().source;
        let extractor = crate::fitted_extractor(layout.backbone(), &source.weights_file, &source.weights_sha256, path, runtime)?;
        Ok(Self { model, layout, extractor, train_embedding: None })
    }

    fn bank(&self) -> &PatchBank {
        self.model.bank()
    }
}

/// The patch layout a model file's header describes, if this build makes the same patches.
fn model_layout(model: &PatchCoreModel, path: &Path) -> Result<PatchLayout> {
    let info = model.info();
    let name = crate::recorded_backbone(&info.source.backbone, &info.source.weights_sha256, path)?;
    let layout = PatchLayout::new(name).with_patch_dim(info.geometry.patch_dim).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    anyhow::ensure!(
        layout.taps().map(str::to_string) == info.source.taps && layout.grid() == info.geometry.grid,
        "{}: its patches come from {:?} on a {:?} grid, but this anomaly makes {name}'s from {:?} on a {:?} grid; refit the model",
        path.display(),
        info.source.taps,
        info.geometry.grid,
        layout.taps(),
        layout.grid()
    );
    Ok(layout)
}

/// Reads a PatchCore model file without a device: the file's own checks and a layout this build makes.
pub(crate) fn check_model(file: &FileBytes, path: &Path) -> Result<PatchCoreModel> {
    let model = PatchCoreModel::from_file(file, path)?;
    model_layout(&model, path)?;
    Ok(model)
}

/// Each image's mean patch (`images × dim`): the vector the t-SNE map places it by.
fn mean_patches(values: &[f32], per_image: usize, dim: usize) -> Vec<f32> {
    values
        .chunks_exact(per_image * dim)
        .flat_map(|image| {
            let mut sum = vec![0f64; dim];
            for patch in image.chunks_exact(dim) {
                for (s, &v) in sum.iter_mut().zip(patch) {
                    *s += v as f64;
                }
            }
            sum.into_iter().map(move |s| (s / per_image as f64) as f32)
        })
        .collect()
}

impl Detector for PatchCoreDetector {
    fn method(&self) -> MethodName {
        MethodName::Patchcore
    }

    fn preprocess(&self) -> &Preprocess {
        &self.model.info().source.preprocess
    }

    fn threshold(&self) -> f32 {
        self.model.info().threshold
    }

    fn threshold_rule(&self) -> &'static str {
        "mean + 3 sigma (population) of the training images' leave-one-out scores (each against the bank without its own \
         patches); anomalous when score > threshold"
    }

    fn pixel_threshold(&self) -> Option<f32> {
        Some(self.model.info().pixel_threshold)
    }

    fn train_scores(&self) -> &ScoreStats {
        &self.model.info().train_scores
    }

    fn title(&self) -> String {
        let info = self.model.info();
        format!("{} · PatchCore · {} of {} patches", info.source.backbone, info.bank_rows, info.train_patches)
    }

    fn describe(&self) -> String {
        let info = self.model.info();
        format!(
            "{} images, a bank of {} of {} patches ({}-d, coreset {}), threshold {:.4} (training scores: mean {:.4}, σ {:.4}, max \
             {:.4}), pixel threshold {:.4}",
            info.train_scores.count,
            info.bank_rows,
            info.train_patches,
            info.geometry.patch_dim,
            info.config.coreset_ratio,
            info.threshold,
            info.train_scores.mean,
            info.train_scores.std,
            info.train_scores.max,
            info.pixel_threshold
        )
    }

    fn embedding_name(&self) -> &'static str {
        "the images' mean patch features"
    }

    fn report_fields(&self) -> serde_json::Value {
        let info = self.model.info();
        let mut fields = json!({
            "method": MethodName::Patchcore.as_str(),
            "backbone": info.source.backbone,
            "weights_sha256": info.source.weights_sha256,
            "device": self.device(),
            "taps": info.source.taps,
            "patch_dim": info.geometry.patch_dim,
            "patch_grid": [info.geometry.grid.0, info.geometry.grid.1],
            "coreset_ratio": info.config.coreset_ratio,
            "projection": info.config.projection,
            "coreset_seed": info.config.seed,
            "reweight": info.config.reweight,
            "bank_rows": info.bank_rows,
            "train_patches": info.train_patches,
            "pixel_threshold": info.pixel_threshold,
        });
        if let Some(seconds) = self.bank().fit_seconds() {
            fields["fit_stages_s"] = json!(seconds);
        }
        fields
    }

    fn info(&self) -> serde_json::Value {
        serde_json::to_value(self.model.info()).expect("model info serialises")
    }

    fn train_embedding(&self) -> Option<Embedding<'_>> {
        self.train_embedding.as_deref().map(|rows| Embedding { width: self.layout.patch_dim(), rows })
    }

    fn device(&self) -> String {
        self.extractor.device().describe()
    }

    fn scorer(&self) -> Result<Box<dyn Scorer + '_>> {
        Ok(Box::new(PatchScorer { detector: self, scorer: self.bank().scorer(self.extractor.compute()?)? }))
    }

    fn to_bytes(&self) -> Result<Vec<u8>> {
        Ok(self.model.to_bytes())
    }
}

/// Scores batches against a bank uploaded once to the kernels' device.
struct PatchScorer<'a> {
    detector: &'a PatchCoreDetector,
    scorer: BankScorer<'a>,
}

impl Scorer for PatchScorer<'_> {
    fn score(&mut self, batch: &Batch) -> Result<Vec<ImageOutput>> {
        let detector = self.detector;
        let side = detector.preprocess().crop as usize;
        let patches = detector.extractor.batch_patches(&detector.layout, batch, side)?;
        let dim = patches.patch_dim;
        let embeddings = mean_patches(&patches.values, patches.per_image(), dim);
        let scored = self.scorer.score(&patches.values)?;
        Ok(scored
            .into_iter()
            .zip(embeddings.chunks_exact(dim))
            .map(|(image, embedding)| ImageOutput {
                score: image.score,
                embedding: embedding.to_vec(),
                map: Some(image.map),
                reconstruction: None,
            })
            .collect())
    }
}
