//! The PatchCore model file: the coreset bank and the training images' leave-one-out scores as
//! safetensors tensors, and how they were made (backbone, weights, preprocessing, taps, patch grid,
//! coreset settings, thresholds) as the versioned `info` JSON every model file carries.

use std::path::Path;

use anomaly_data::Preprocess;
use anomaly_detector::{
    MODEL_FORMAT, MODEL_VERSION, ModelError, ScoreStats, canonical_header, check_finite, check_header_numbers, f32_values, model_metadata,
    read_model_header,
};
use anomaly_fs::FileBytes;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::{BANK_CHUNK_BYTES, BankRows, PatchBank, PatchCoreConfig, PatchGeometry};

/// The method name of PatchCore models.
pub const PATCHCORE: &str = "patchcore";

/// The largest patch grid side, patch width and bank a model file may declare: far above any backbone's,
/// low enough that a corrupt header cannot make scoring allocate without bound.
const MAX_GRID_SIDE: usize = 1024;
const MAX_PATCH_DIM: usize = 65_536;

/// Where a bank's patches came from: what a later run needs to make the same patches of new images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PatchSource {
    /// The backbone's name (e.g. "efficientnet-lite0").
    pub backbone: String,
    /// The weights file's name and sha256: a bank only applies to patches from the same weights.
    pub weights_file: String,
    pub weights_sha256: String,
    pub preprocess: Preprocess,
    /// The two feature maps the patches are made of, shallow first.
    pub taps: [String; 2],
    /// The training data's name (its folder).
    pub dataset: String,
}

/// A PatchCore model file's `info`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PatchCoreInfo {
    pub format: String,
    pub version: u32,
    /// "patchcore".
    pub method: String,
    /// The program and version that wrote the file.
    pub created_by: String,
    #[serde(flatten)]
    pub source: PatchSource,
    pub config: PatchCoreConfig,
    pub geometry: PatchGeometry,
    /// Patches in the bank, and the training patches the coreset chose them from.
    pub bank_rows: usize,
    pub train_patches: usize,
    /// Images scoring above it are anomalous.
    pub threshold: f32,
    /// Map values above it mark the anomalous region.
    pub pixel_threshold: f32,
    /// The training images' leave-one-out scores and map maxima, which set the two thresholds.
    pub train_scores: ScoreStats,
    pub train_map_maxima: ScoreStats,
}

/// A fitted PatchCore bank with the facts needed to apply it.
#[derive(Clone, Debug, PartialEq)]
pub struct PatchCoreModel {
    pub(crate) info: PatchCoreInfo,
    pub(crate) bank: PatchBank,
}

impl PatchCoreModel {
    /// Wraps a fitted bank with where its patches came from.
    pub fn new(bank: PatchBank, source: PatchSource) -> Self {
        let info = PatchCoreInfo {
            format: MODEL_FORMAT.into(),
            version: MODEL_VERSION,
            method: PATCHCORE.into(),
            created_by: concat!("anomaly ", env!("CARGO_PKG_VERSION")).into(),
            source,
            config: *bank.config(),
            geometry: *bank.geometry(),
            bank_rows: bank.len(),
            train_patches: bank.train_patches(),
            threshold: bank.threshold(),
            pixel_threshold: bank.pixel_threshold(),
            train_scores: ScoreStats::of(bank.train_scores()),
            train_map_maxima: ScoreStats::of(bank.train_map_maxima()),
        };
        Self { info, bank }
    }

    /// How the model was made.
    pub fn info(&self) -> &PatchCoreInfo {
        &self.info
    }

    /// The bank.
    pub fn bank(&self) -> &PatchBank {
        &self.bank
    }

    /// The file's bytes: tensors `bank` [rows, patch_dim], `train_scores` and `train_map_maxima` [images],
    /// all f32; header metadata `format`, `version` and `info` (JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        fn view(shape: Vec<usize>, data: &[f32]) -> TensorView<'_> {
            TensorView::new(Dtype::F32, shape, bytemuck::cast_slice(data)).expect("tensor shapes match their data")
        }
        let bank = &self.bank;
        let images = bank.train_scores().len();
        let tensors = [
            ("bank", view(vec![bank.len(), bank.geometry().patch_dim], bank.rows())),
            ("train_scores", view(vec![images], bank.train_scores())),
            ("train_map_maxima", view(vec![images], bank.train_map_maxima())),
        ];
        let metadata = model_metadata(serde_json::to_string(&self.info).expect("model info serialises"));
        canonical_header(safetensors::serialize(tensors, Some(metadata)).expect("model tensors serialise"))
    }

    /// Parses a model file's bytes, checking everything that needs no device: header, tensors against
    /// the header, values. `path` names it in errors. Never panics, whatever the bytes.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, ModelError> {
        Self::parse(bytes, None, path)
    }

    /// [`Self::from_bytes`] on a file's bytes; a memory-mapped file's bank stays in the file, read
    /// by the pages scoring touches, so a bank larger than memory scores.
    pub fn from_file(file: &FileBytes, path: &Path) -> Result<Self, ModelError> {
        Self::parse(file, Some(file), path)
    }

    fn parse(bytes: &[u8], file: Option<&FileBytes>, path: &Path) -> Result<Self, ModelError> {
        let invalid = |reason: String| ModelError::Invalid { path: path.into(), reason };
        let header = read_model_header(bytes, path)?;
        if header.method != PATCHCORE {
            return Err(invalid(format!("it holds a {} model, not a {PATCHCORE} one", header.method)));
        }
        let info: PatchCoreInfo = serde_json::from_str(&header.info).map_err(|e| invalid(format!("its `info` is malformed: {e}")))?;
        let PatchGeometry { grid, patch_dim, side } = info.geometry;
        if !(1..=MAX_GRID_SIDE).contains(&grid.0)
            || !(1..=MAX_GRID_SIDE).contains(&grid.1)
            || !(1..=MAX_PATCH_DIM).contains(&patch_dim)
            || side == 0
            || side != info.source.preprocess.crop as usize
        {
            return Err(invalid(format!(
                "its patch geometry ({}×{} patches of {patch_dim} values, maps {side} px for a {} px crop) is impossible",
                grid.0, grid.1, info.source.preprocess.crop
            )));
        }
        if !(info.config.coreset_ratio > 0.0 && info.config.coreset_ratio <= 1.0) || info.bank_rows > info.train_patches {
            return Err(invalid(format!(
                "its coreset ratio {} or bank of {} of {} patches is impossible",
                info.config.coreset_ratio, info.bank_rows, info.train_patches
            )));
        }
        let tensors =
            SafeTensors::deserialize(bytes).map_err(|e| invalid(format!("its tensors are unreadable, perhaps truncated: {e}")))?;
        let view = |name: &str, shape: &[usize]| {
            let view = tensors.tensor(name).map_err(|_| invalid(format!("tensor `{name}` is missing")))?;
            if view.dtype() != Dtype::F32 || view.shape() != shape {
                return Err(invalid(format!("tensor `{name}` is {:?} {:?}, expected F32 {shape:?}", view.dtype(), view.shape())));
            }
            Ok(view)
        };
        let tensor = |name: &str, shape: &[usize]| Ok::<_, ModelError>(f32_values(view(name, shape)?.data()).collect::<Vec<f32>>());
        let images = info.train_scores.count;
        let bank = view("bank", &[info.bank_rows, patch_dim])?;
        // In a mapped file the bank stays where it is, when its f32 values are aligned there.
        let offset = bank.data().as_ptr() as usize - bytes.as_ptr() as usize;
        let rows = match file.filter(|file| file.map().is_some()) {
            Some(file) if offset.is_multiple_of(4) => BankRows::Mapped { file: file.clone(), offset, len: bank.data().len() / 4 },
            _ => BankRows::Owned(f32_values(bank.data()).collect()),
        };
        let train_scores = tensor("train_scores", &[images])?;
        let train_map_maxima = tensor("train_map_maxima", &[images])?;
        if info.train_map_maxima.count != images || images < 2 {
            return Err(invalid(format!("its header counts {images} training scores and {} map maxima", info.train_map_maxima.count)));
        }
        let bank = PatchBank::from_parts(info.config, info.geometry, rows, info.train_patches, train_scores, train_map_maxima)
            .map_err(|e| invalid(e.to_string()))?;
        let model = Self { info, bank };
        model.check_values().map_err(|reason| ModelError::Corrupt { path: path.into(), reason })?;
        Ok(model)
    }

    /// Checks the values a file's structure cannot: no NaN or ±Inf in any tensor, and header numbers that
    /// make sense (run on load, and after a fit so that such a model is never written).
    pub fn check_values(&self) -> Result<(), String> {
        let bank = &self.bank;
        let images = bank.train_scores().len();
        let values = bank.row_chunks(BANK_CHUNK_BYTES).flat_map(|(_, chunk)| chunk.iter().copied());
        check_finite("bank", &[bank.len(), bank.geometry().patch_dim], values)?;
        check_finite("train_scores", &[images], bank.train_scores().iter().copied())?;
        check_finite("train_map_maxima", &[images], bank.train_map_maxima().iter().copied())?;
        check_header_numbers(self.info.threshold, &self.info.train_scores, &self.info.source.preprocess)?;
        check_header_numbers(self.info.pixel_threshold, &self.info.train_map_maxima, &self.info.source.preprocess)
            .map_err(|e| format!("pixel threshold: {e}"))
    }
}
