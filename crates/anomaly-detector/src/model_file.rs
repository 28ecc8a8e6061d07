//! The model file: a fitted bank and everything needed to apply it to new images, in one safetensors file
//! (the bank, its columns and training scores as tensors; how it was made as versioned JSON in the
//! header), so that other tools can read it and a stale or foreign file is refused with a clear reason.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anomaly_data::Preprocess;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::{DetectorConfig, MemoryBank};

/// The `format` every model file declares in its header.
pub const MODEL_FORMAT: &str = "anomaly-model";
/// The model file layout this build writes and reads; bumped whenever a field's meaning changes.
pub const MODEL_VERSION: u32 = 1;

/// The method name of memory-bank models.
pub const MEMORY_BANK: &str = "memory-bank";

/// What every model file's header says, whichever method wrote it.
#[derive(Clone, Debug)]
pub struct ModelHeader {
    /// The detection method ("memory-bank", "autoencoder").
    pub method: String,
    /// The method's `info` JSON.
    pub info: String,
}

/// Reads and checks the header every model file shares (format and version), so that any method's
/// loader refuses a foreign, truncated or stale file the same way; returns the method and its info.
pub fn read_model_header(bytes: &[u8], path: &Path) -> Result<ModelHeader, ModelError> {
    let invalid = |reason: String| ModelError::Invalid { path: path.into(), reason };
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| invalid(format!("not a readable safetensors file, perhaps truncated: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    if metadata.get("format").map(String::as_str) != Some(MODEL_FORMAT) {
        return Err(invalid(format!("its header has no `format: {MODEL_FORMAT}`")));
    }
    let version: u32 =
        metadata.get("version").and_then(|v| v.parse().ok()).ok_or_else(|| invalid("its header has no format version".into()))?;
    if version != MODEL_VERSION {
        return Err(ModelError::Version { path: path.into(), found: version });
    }
    let info = metadata.get("info").cloned().ok_or_else(|| invalid("its header has no `info`".into()))?;
    let method = serde_json::from_str::<serde_json::Value>(&info)
        .ok()
        .and_then(|v| v["method"].as_str().map(str::to_string))
        .ok_or_else(|| invalid("its `info` names no method".into()))?;
    Ok(ModelHeader { method, info })
}

/// The header metadata of a model file: format, version and the method's info JSON.
pub fn model_metadata(info_json: String) -> HashMap<String, String> {
    HashMap::from([
        ("format".to_string(), MODEL_FORMAT.to_string()),
        ("version".to_string(), MODEL_VERSION.to_string()),
        ("info".to_string(), info_json),
    ])
}

/// A safetensors file's bytes with its header's keys in sorted order, so that the same tensors and
/// metadata always make the same file (and the same sha256, which `serve` names a model by): safetensors
/// writes its metadata map in hash order, which changes from run to run. Bytes that are not a readable
/// safetensors header come back as they are.
pub fn canonical_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let Some(len) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize) else { return bytes };
    let Some(header) = bytes.get(8..).and_then(|rest| rest.get(..len)) else { return bytes };
    let Ok(text) = std::str::from_utf8(header) else { return bytes };
    let text = text.trim_end_matches(' ');
    // serde_json's maps are sorted by key (its `preserve_order` feature is off, which a test checks).
    let Ok(sorted) = serde_json::from_str::<serde_json::Value>(text).map(|value| value.to_string()) else { return bytes };
    if sorted.len() == text.len() {
        bytes[8..8 + sorted.len()].copy_from_slice(sorted.as_bytes());
    }
    bytes
}

/// Why a model file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not an anomaly model file ({reason})", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "{}: model format version {found}, but this anomaly reads version {MODEL_VERSION}; refit the model with `anomaly fit`{}",
        path.display(),
        if *found > MODEL_VERSION { " or upgrade anomaly" } else { "" }
    )]
    Version { path: PathBuf, found: u32 },
    /// A value the model cannot hold (NaN, ±Inf, a negative threshold…): scoring with it would give
    /// verdicts that mean nothing.
    #[error("{}: {reason}: the file is corrupt; fit the model again", path.display())]
    Corrupt { path: PathBuf, reason: String },
}

/// The largest `resize` a model file may declare: every image is resized to it, so a corrupt header must
/// not make each one a multi-gigabyte buffer.
pub const MAX_IMAGE_SIDE: u32 = 4096;

/// Checks a tensor's values for NaN and ±Inf and names the first one found with its place (`tensor "bank"
/// holds NaN at row 3, column 17`), so that one bad cell in a model or a fit is named instead of shifting
/// every score.
pub fn check_finite(tensor: &str, shape: &[usize], values: impl IntoIterator<Item = f32>) -> Result<(), String> {
    find_non_finite(shape, values).map_or(Ok(()), |found| Err(format!("tensor \"{tensor}\" holds {found}")))
}

/// The first NaN or ±Inf among a row-major array's values, with its place: `NaN at row 3, column 17`.
pub fn find_non_finite(shape: &[usize], values: impl IntoIterator<Item = f32>) -> Option<String> {
    let (index, value) = values.into_iter().enumerate().find(|(_, v)| !v.is_finite())?;
    let kind = if value.is_nan() {
        "NaN"
    } else if value > 0.0 {
        "+Inf"
    } else {
        "-Inf"
    };
    // Last axis fastest; a zero-sized axis cannot hold the value, and `max(1)` keeps it from dividing by 0.
    let mut position = vec![0; shape.len()];
    let mut rest = index;
    for (axis, &size) in shape.iter().enumerate().rev() {
        position[axis] = rest % size.max(1);
        rest /= size.max(1);
    }
    let at = match position[..] {
        [i] => format!("index {i}"),
        [row, column] => format!("row {row}, column {column}"),
        _ => format!("index {position:?}"),
    };
    Some(format!("{kind} at {at}"))
}

/// The values of an f32 tensor's little-endian bytes (read in place: safetensors data need not be aligned).
pub fn f32_values(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Checks the numbers every model's header carries: a threshold and its training scores' statistics
/// (all finite, none negative: scores are distances or squared errors), and preprocessing that can
/// produce an image of a sane size.
pub fn check_header_numbers(threshold: f32, stats: &ScoreStats, preprocess: &Preprocess) -> Result<(), String> {
    if !threshold.is_finite() || threshold < 0.0 {
        return Err(format!("its threshold is {threshold}, not a finite score ≥ 0"));
    }
    let ScoreStats { mean, std, min, max, .. } = *stats;
    if [mean, std, min, max].iter().any(|v| !v.is_finite() || *v < 0.0) || min > max {
        return Err(format!("its training score statistics (mean {mean}, σ {std}, min {min}, max {max}) are not finite scores ≥ 0"));
    }
    preprocess.validate().map_err(|e| format!("its preprocessing is unusable: {e}"))?;
    if preprocess.mean.iter().any(|m| !m.is_finite()) || preprocess.resize > MAX_IMAGE_SIDE {
        return Err(format!(
            "its preprocessing (mean {:?}, resize {}) is not finite or exceeds {MAX_IMAGE_SIDE} px",
            preprocess.mean, preprocess.resize
        ));
    }
    Ok(())
}

/// Summary statistics of the training images' leave-one-out scores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreStats {
    pub count: usize,
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

impl ScoreStats {
    /// The statistics of `scores` (all zero when there are none).
    pub fn of(scores: &[f32]) -> Self {
        if scores.is_empty() {
            return Self { count: 0, mean: 0.0, std: 0.0, min: 0.0, max: 0.0 };
        }
        let n = scores.len() as f64;
        let mean = scores.iter().map(|&s| s as f64).sum::<f64>() / n;
        let std = (scores.iter().map(|&s| (s as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let min = scores.iter().fold(f64::INFINITY, |m, &s| m.min(s as f64));
        let max = scores.iter().fold(f64::NEG_INFINITY, |m, &s| m.max(s as f64));
        Self { count: scores.len(), mean, std, min, max }
    }

    /// The seed's threshold: mean + 3σ (population σ), above which an image is anomalous.
    pub fn threshold(&self) -> f32 {
        (self.mean + 3.0 * self.std) as f32
    }
}

/// How a model was made: what a later run needs to reproduce its features, and what a reader wants to know.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub format: String,
    pub version: u32,
    /// The detection method ("memory-bank").
    pub method: String,
    /// The program and version that wrote the file.
    pub created_by: String,
    /// The backbone's name (e.g. "efficientnet-lite0").
    pub backbone: String,
    /// The weights file's name and sha256: a model only applies to features from the same weights.
    pub weights_file: String,
    pub weights_sha256: String,
    pub preprocess: Preprocess,
    pub config: DetectorConfig,
    /// Width of the backbone's feature vectors.
    pub input_dim: usize,
    pub threshold: f32,
    pub train_scores: ScoreStats,
    /// The training data's name (its folder).
    pub dataset: String,
}

/// Where the bank's features came from, as recorded in the model file.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureSource {
    pub backbone: String,
    pub weights_file: String,
    pub weights_sha256: String,
    pub preprocess: Preprocess,
    pub dataset: String,
}

/// A fitted bank with the facts needed to apply it.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub info: ModelInfo,
    pub bank: MemoryBank,
}

impl Model {
    /// Wraps a fitted bank with where its features came from.
    pub fn new(bank: MemoryBank, source: FeatureSource) -> Self {
        let info = ModelInfo {
            format: MODEL_FORMAT.into(),
            version: MODEL_VERSION,
            method: MEMORY_BANK.into(),
            created_by: concat!("anomaly ", env!("CARGO_PKG_VERSION")).into(),
            backbone: source.backbone,
            weights_file: source.weights_file,
            weights_sha256: source.weights_sha256,
            preprocess: source.preprocess,
            config: bank.config,
            input_dim: bank.input_dim,
            threshold: bank.threshold,
            train_scores: ScoreStats::of(&bank.train_scores),
            dataset: source.dataset,
        };
        Self { info, bank }
    }

    /// The file's bytes: tensors `bank` [rows, columns] f32, `columns` [columns] u32, `train_scores` [rows]
    /// f32; header metadata `format`, `version` and `info` (JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> TensorView<'_> {
            TensorView::new(dtype, shape, data).expect("tensor shapes match their data")
        }
        let bank = &self.bank;
        let tensors = [
            ("bank", view(Dtype::F32, vec![bank.len(), bank.columns.len()], bytemuck::cast_slice(&bank.rows))),
            ("columns", view(Dtype::U32, vec![bank.columns.len()], bytemuck::cast_slice(&bank.columns))),
            ("train_scores", view(Dtype::F32, vec![bank.len()], bytemuck::cast_slice(&bank.train_scores))),
        ];
        let metadata = model_metadata(serde_json::to_string(&self.info).expect("model info serialises"));
        canonical_header(safetensors::serialize(tensors, Some(metadata)).expect("model tensors serialise"))
    }

    /// Reads a model file, checking its format, version and that its tensors agree with its header.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses a model file's bytes; `path` names it in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, ModelError> {
        let invalid = |reason: String| ModelError::Invalid { path: path.into(), reason };
        let header = read_model_header(bytes, path)?;
        if header.method != MEMORY_BANK {
            return Err(invalid(format!("it holds an {} model, not a {MEMORY_BANK} one", header.method)));
        }
        let info: ModelInfo = serde_json::from_str(&header.info).map_err(|e| invalid(format!("its `info` is malformed: {e}")))?;
        let tensors =
            SafeTensors::deserialize(bytes).map_err(|e| invalid(format!("its tensors are unreadable, perhaps truncated: {e}")))?;
        let tensor = |name: &str, dtype: Dtype| {
            let view = tensors.tensor(name).map_err(|_| invalid(format!("tensor `{name}` is missing")))?;
            if view.dtype() != dtype {
                return Err(invalid(format!("tensor `{name}` is {:?}, expected {dtype:?}", view.dtype())));
            }
            Ok((view.shape().to_vec(), view.data().to_vec()))
        };
        let (bank_shape, bank_bytes) = tensor("bank", Dtype::F32)?;
        let (columns_shape, columns_bytes) = tensor("columns", Dtype::U32)?;
        let (scores_shape, scores_bytes) = tensor("train_scores", Dtype::F32)?;
        let [rows, width] = bank_shape[..] else {
            return Err(invalid(format!("`bank` has shape {bank_shape:?}, expected [rows, columns]")));
        };
        if width == 0 {
            return Err(invalid("its bank keeps no feature column".into()));
        }
        if columns_shape != [width] || scores_shape != [rows] {
            return Err(invalid(format!("shapes disagree: bank {bank_shape:?}, columns {columns_shape:?}, train_scores {scores_shape:?}")));
        }
        let columns: Vec<u32> = bytemuck::pod_collect_to_vec(&columns_bytes);
        if columns.windows(2).any(|w| w[0] >= w[1]) || columns.last().is_some_and(|&c| c as usize >= info.input_dim) {
            return Err(invalid(format!("its columns are not ascending indices below {}", info.input_dim)));
        }
        if info.config.k == 0 || info.config.k > rows {
            return Err(invalid(format!("k = {} but the bank has {rows} rows", info.config.k)));
        }
        let bank = MemoryBank {
            config: info.config,
            input_dim: info.input_dim,
            columns,
            rows: bytemuck::pod_collect_to_vec(&bank_bytes),
            train_scores: bytemuck::pod_collect_to_vec(&scores_bytes),
            threshold: info.threshold,
        };
        let model = Self { info, bank };
        model.check_values().map_err(|reason| ModelError::Corrupt { path: path.into(), reason })?;
        Ok(model)
    }

    /// Checks the values a file's structure cannot: no NaN or ±Inf in the bank or the training scores, and
    /// header numbers that make sense (run on load, and after a fit so that such a model is never written).
    pub fn check_values(&self) -> Result<(), String> {
        let bank = &self.bank;
        check_finite("bank", &[bank.len(), bank.columns.len()], bank.rows.iter().copied())?;
        check_finite("train_scores", &[bank.len()], bank.train_scores.iter().copied())?;
        check_header_numbers(self.info.threshold, &self.info.train_scores, &self.info.preprocess)?;
        if self.info.train_scores.count != bank.len() {
            return Err(format!(
                "its header counts {} training scores, but the bank has {} rows",
                self.info.train_scores.count,
                bank.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Compute, DetectorConfig};

    #[test]
    fn a_header_is_written_with_sorted_keys_whatever_the_maps_order() {
        // The same header with its metadata in two orders (as hash maps iterate), padded as safetensors pads.
        let file = |header: &str| {
            let padded = format!("{header:<width$}", width = header.len().next_multiple_of(8));
            [&(padded.len() as u64).to_le_bytes()[..], padded.as_bytes(), &[1, 2, 3, 4]].concat()
        };
        let tensor = r#""t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}"#;
        let a = file(&format!(r#"{{"__metadata__":{{"version":"1","info":"{{}}","format":"x"}},{tensor}}}"#));
        let b = file(&format!(r#"{{"__metadata__":{{"format":"x","version":"1","info":"{{}}"}},{tensor}}}"#));
        assert_ne!(a, b);
        assert_eq!(canonical_header(a.clone()), canonical_header(b));
        let canonical = canonical_header(a);
        assert!(String::from_utf8_lossy(&canonical).contains(r#"{"format":"x","info":"{}","version":"1"}"#));
        safetensors::SafeTensors::deserialize(&canonical).unwrap();
        // Not a safetensors file: as it was.
        assert_eq!(canonical_header(vec![9, 9]), vec![9, 9]);
    }

    #[test]
    fn the_first_non_finite_value_is_named_with_its_position() {
        assert_eq!(check_finite("t", &[2, 3], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]), Ok(()));
        assert_eq!(
            check_finite("bank", &[2, 3], [0.0, 1.0, 2.0, 3.0, f32::NAN, f32::INFINITY]).unwrap_err(),
            "tensor \"bank\" holds NaN at row 1, column 1"
        );
        assert_eq!(check_finite("s", &[4], [0.0, 0.0, f32::NEG_INFINITY, 0.0]).unwrap_err(), "tensor \"s\" holds -Inf at index 2");
        let mut values = vec![0.0; 2 * 3 * 2 * 2];
        values[23] = f32::INFINITY;
        assert_eq!(check_finite("w", &[2, 3, 2, 2], values).unwrap_err(), "tensor \"w\" holds +Inf at index [1, 2, 1, 1]");
        assert_eq!(f32_values(&[0, 0, 128, 63, 0, 0, 0, 64, 1]).collect::<Vec<_>>(), vec![1.0, 2.0]);
    }

    fn model() -> Model {
        let features: Vec<f32> = (0..40).map(|i| (i * 7 % 11) as f32).collect();
        let bank = MemoryBank::fit(&features, 4, DetectorConfig { k: 2, features: 3 }, &Compute::Cpu).unwrap();
        let source = FeatureSource {
            backbone: "efficientnet-lite0".into(),
            weights_file: "w.pth".into(),
            weights_sha256: "0".repeat(64),
            preprocess: Preprocess::imagenet(),
            dataset: "unit".into(),
        };
        Model::new(bank, source)
    }

    #[test]
    fn non_finite_values_and_senseless_numbers_are_refused_at_fit_and_at_load() {
        let path = Path::new("m.safetensors");
        assert_eq!(Model::from_bytes(&model().to_bytes(), path).unwrap(), model());
        let mut nan_cell = model();
        nan_cell.bank.rows[2 * 3 + 1] = f32::NAN;
        assert_eq!(nan_cell.check_values().unwrap_err(), "tensor \"bank\" holds NaN at row 2, column 1");
        let error = Model::from_bytes(&nan_cell.to_bytes(), path).unwrap_err().to_string();
        assert_eq!(error, "m.safetensors: tensor \"bank\" holds NaN at row 2, column 1: the file is corrupt; fit the model again");
        let mut inf_score = model();
        inf_score.bank.train_scores[9] = f32::INFINITY;
        assert!(Model::from_bytes(&inf_score.to_bytes(), path).unwrap_err().to_string().contains("\"train_scores\" holds +Inf at index 9"));
        // Header numbers: a threshold out of f32's range reads as +Inf; a negative one flags every image.
        for (threshold, needle) in [(f32::INFINITY, "threshold is inf"), (-1.0, "threshold is -1")] {
            let mut bad = model();
            bad.info.threshold = threshold;
            let json = serde_json::to_string(&bad.info).unwrap().replace("null", "1e39");
            let bytes = model().to_bytes();
            let tensors = SafeTensors::deserialize(&bytes).unwrap();
            let file = safetensors::serialize(tensors.tensors(), Some(model_metadata(json))).unwrap();
            let error = Model::from_bytes(&file, path).unwrap_err().to_string();
            assert!(error.contains(needle) && error.ends_with("the file is corrupt; fit the model again"), "{error}");
        }
        let mut stats = model();
        stats.info.train_scores.std = -1.0;
        assert!(stats.check_values().unwrap_err().contains("training score statistics"));
        let mut huge = model();
        huge.info.preprocess.resize = MAX_IMAGE_SIDE + 1;
        assert!(huge.check_values().unwrap_err().contains("exceeds 4096 px"));
        let mut count = model();
        count.info.train_scores.count = 3;
        assert!(count.check_values().unwrap_err().contains("counts 3 training scores, but the bank has 10 rows"));
    }
}
