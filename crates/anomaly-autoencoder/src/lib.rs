//! The seed's second approach: a convolutional autoencoder trained on the good images, whose
//! reconstruction error scores an image (the mean of its worst 1% of pixels) and maps where a defect is.
//! Trained with burn's autodiff on any burn device; saved in the same versioned model-file family as the
//! memory bank.

mod model;
mod train;

use std::path::{Path, PathBuf};

use anomaly_data::Preprocess;
use anomaly_detector::{
    ModelError, ScoreStats, canonical_header, check_finite, check_header_numbers, f32_values, model_metadata, read_model_header,
};
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

pub use model::{ConvAutoencoder, ConvAutoencoderConfig};
pub use train::{Checkpoint, TrainConfig, Trained, train};

/// The method name autoencoder model files carry.
pub const AUTOENCODER: &str = "autoencoder";

/// Share of an image's pixels whose mean error is its score.
pub const WORST_PIXEL_SHARE: f64 = 0.01;

/// Why an autoencoder could not be trained, saved, loaded or applied.
#[derive(Debug, thiserror::Error)]
pub enum AutoencoderError {
    #[error("{0}")]
    Config(String),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: unusable checkpoint: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    /// A checkpoint file could not be written.
    #[error(transparent)]
    Write(#[from] anomaly_fs::FsError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Backend(String),
}

/// How an autoencoder model was made, as its file records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AutoencoderInfo {
    pub format: String,
    pub version: u32,
    pub method: String,
    pub created_by: String,
    pub model: ConvAutoencoderConfig,
    pub train: TrainConfig,
    /// How images become inputs: resize, center crop, and [0, 1] pixels (mean 0, std 1).
    pub preprocess: Preprocess,
    pub threshold: f32,
    pub train_scores: ScoreStats,
    pub epoch_losses: Vec<f64>,
    pub dataset: String,
}

/// A trained autoencoder with its threshold.
#[derive(Debug)]
pub struct AutoencoderModel {
    pub info: AutoencoderInfo,
    pub network: ConvAutoencoder,
}

/// The preprocessing of an autoencoder of side `size`: shorter side resized to it, center square, [0, 1].
pub fn preprocess(size: usize) -> Preprocess {
    Preprocess { resize: size as u32, crop: size as u32, mean: [0.0; 3], std: [1.0; 3] }
}

impl AutoencoderModel {
    /// Wraps a trained network with its threshold: mean + 3σ of the training images' scores.
    pub fn new(trained: Trained, model: ConvAutoencoderConfig, train: TrainConfig, train_scores: &[f32], dataset: &str) -> Self {
        let stats = ScoreStats::of(train_scores);
        let info = AutoencoderInfo {
            format: anomaly_detector::MODEL_FORMAT.into(),
            version: anomaly_detector::MODEL_VERSION,
            method: AUTOENCODER.into(),
            created_by: concat!("anomaly ", env!("CARGO_PKG_VERSION")).into(),
            preprocess: preprocess(model.image_size),
            model,
            train,
            threshold: stats.threshold(),
            train_scores: stats,
            epoch_losses: trained.epoch_losses,
            dataset: dataset.into(),
        };
        Self { info, network: trained.model }
    }

    /// The model file's bytes: the network's tensors by their burn paths, and the shared header.
    pub fn to_bytes(&self) -> Result<Vec<u8>, AutoencoderError> {
        let info = serde_json::to_string(&self.info).expect("info serialises");
        weights_to_bytes(&self.network, &model_metadata(info).into_iter().collect::<Vec<_>>()).map(canonical_header)
    }

    /// Reads an autoencoder model file onto `device`.
    pub fn from_bytes(bytes: &[u8], path: &Path, device: &Device) -> Result<Self, AutoencoderError> {
        let invalid = |reason: String| ModelError::Invalid { path: path.into(), reason };
        let info = Self::check_bytes(bytes, path)?;
        let mut network = info.model.init(device);
        let mut store = SafetensorsStore::from_bytes(Some(bytes.to_vec()));
        let result = network.load_from(&mut store).map_err(|e| invalid(format!("its weights do not load: {e}")))?;
        if !result.missing.is_empty() || !result.errors.is_empty() {
            return Err(invalid(format!("its weights do not fit its own shape ({} missing)", result.missing.len())).into());
        }
        Ok(Self { info, network })
    }

    /// Checks a model file without a device: its header, its network's shape, every tensor's name, dtype
    /// and shape against that shape (before anything is allocated by it), and that no value is NaN or ±Inf.
    pub fn check_bytes(bytes: &[u8], path: &Path) -> Result<AutoencoderInfo, ModelError> {
        let invalid = |reason: String| ModelError::Invalid { path: path.into(), reason };
        let header = read_model_header(bytes, path)?;
        if header.method != AUTOENCODER {
            return Err(invalid(format!("it holds a {} model, not an {AUTOENCODER}", header.method)));
        }
        let info: AutoencoderInfo = serde_json::from_str(&header.info).map_err(|e| invalid(format!("its `info` is malformed: {e}")))?;
        info.model.check().map_err(invalid)?;
        let expected = info.model.parameter_shapes().ok_or_else(|| invalid("its network's sizes overflow".into()))?;
        let tensors = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| invalid(format!("its tensors are unreadable, perhaps truncated: {e}")))?;
        for (name, shape) in &expected {
            let view = tensors.tensor(name).map_err(|_| invalid(format!("tensor `{name}` is missing")))?;
            if view.dtype() != safetensors::Dtype::F32 || view.shape() != shape.as_slice() {
                return Err(invalid(format!("tensor `{name}` is {:?} {:?}, expected F32 {shape:?}", view.dtype(), view.shape())));
            }
        }
        if let Some(extra) = tensors.names().into_iter().find(|name| !expected.iter().any(|(known, _)| known == *name)) {
            return Err(invalid(format!("tensor `{extra}` has no place in its network")));
        }
        let corrupt = |reason: String| ModelError::Corrupt { path: path.into(), reason };
        info.check_numbers().map_err(corrupt)?;
        check_tensors_finite(&tensors).map_err(corrupt)?;
        Ok(info)
    }

    /// Checks a trained model before it is written: no NaN or ±Inf in its weights or numbers (a diverged
    /// training), and a threshold that makes sense.
    pub fn check_values(&self) -> Result<(), AutoencoderError> {
        self.info.check_numbers().map_err(AutoencoderError::Config)?;
        let bytes = weights_to_bytes(&self.network, &[])?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| AutoencoderError::Backend(e.to_string()))?;
        check_tensors_finite(&tensors).map_err(AutoencoderError::Config)
    }

    /// Reconstructs images (`batch × 3 × size × size` values in [0, 1]).
    pub fn reconstruct(&self, images: &[f32], device: &Device) -> Result<Vec<Reconstruction>, AutoencoderError> {
        reconstruct(&self.network, self.info.model.image_size, images, device)
    }
}

impl AutoencoderInfo {
    /// The header's numbers a loaded model uses or shows: threshold, training score statistics, final
    /// losses, and the preprocessing its network's input size implies.
    fn check_numbers(&self) -> Result<(), String> {
        // First: a diverged training is what makes every other number NaN.
        if let Some(loss) = self.epoch_losses.iter().find(|l| !l.is_finite() || **l < 0.0) {
            return Err(format!("its training losses hold {loss}"));
        }
        check_header_numbers(self.threshold, &self.train_scores, &self.preprocess)?;
        if self.preprocess != preprocess(self.model.image_size) {
            return Err(format!("its preprocessing {:?} is not that of a {} px autoencoder", self.preprocess, self.model.image_size));
        }
        Ok(())
    }
}

/// Checks every f32 tensor of a file for NaN and ±Inf, in name order (the first one found is named).
fn check_tensors_finite(tensors: &safetensors::SafeTensors) -> Result<(), String> {
    let mut named = tensors.tensors();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named.iter().try_for_each(|(name, view)| check_finite(name, view.shape(), f32_values(view.data())))
}

/// Serialises a network's parameters as safetensors with the given header metadata.
pub(crate) fn weights_to_bytes(network: &ConvAutoencoder, metadata: &[(String, String)]) -> Result<Vec<u8>, AutoencoderError> {
    let mut store =
        metadata.iter().fold(SafetensorsStore::from_bytes(None), |store, (key, value)| store.metadata(key.clone(), value.clone()));
    network.save_into(&mut store).map_err(|e| AutoencoderError::Backend(e.to_string()))?;
    store.get_bytes().map_err(|e| AutoencoderError::Backend(e.to_string()))
}

/// Builds the network on `device` with every parameter drawn from a generator seeded by `seed` and the
/// parameter's name (PyTorch's default bounds: uniform in ±1/√fan_in), so that the initial weights do not
/// depend on burn's process-wide random state, which concurrent work can advance.
pub fn seeded_network(config: &ConvAutoencoderConfig, device: &Device, seed: u64) -> Result<ConvAutoencoder, AutoencoderError> {
    let mut network = config.init(device);
    let template = weights_to_bytes(&network, &[])?;
    let tensors = safetensors::SafeTensors::deserialize(&template).map_err(|e| AutoencoderError::Backend(e.to_string()))?;
    let shapes: std::collections::BTreeMap<String, Vec<usize>> =
        tensors.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec())).collect();
    let fan_in = |layer: &str| -> usize {
        let shape = &shapes[&format!("{layer}.weight")];
        match shape.len() {
            // Convolutions are [out, in, k, k] and transposed ones [in, out, k, k]; PyTorch counts
            // dimension 1 × k × k for both.
            4 => shape[1] * shape[2] * shape[3],
            // burn stores linear weights as [in, out].
            _ => shape[0],
        }
    };
    let values: Vec<(String, Vec<usize>, Vec<f32>)> = shapes
        .iter()
        .map(|(name, shape)| {
            let layer = name.rsplit_once('.').map_or(name.as_str(), |(layer, _)| layer);
            let bound = 1.0 / (fan_in(layer).max(1) as f64).sqrt();
            let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
            let mut rng = anomaly_data::SplitMix(seed ^ hash);
            let count = shape.iter().product();
            (name.clone(), shape.clone(), (0..count).map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32).collect())
        })
        .collect();
    let views = values
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytemuck::cast_slice(data))
                .map(|view| (name.clone(), view))
                .map_err(|e| AutoencoderError::Backend(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(views, None).map_err(|e| AutoencoderError::Backend(e.to_string()))?;
    let result = network.load_from(&mut SafetensorsStore::from_bytes(Some(bytes))).map_err(|e| AutoencoderError::Backend(e.to_string()))?;
    if !result.missing.is_empty() || !result.errors.is_empty() {
        return Err(AutoencoderError::Backend(format!("seeded initialisation left {} tensors unset", result.missing.len())));
    }
    Ok(network)
}

/// One image through the autoencoder.
#[derive(Clone, Debug)]
pub struct Reconstruction {
    /// The reconstruction, `3 × size × size` in [0, 1].
    pub image: Vec<f32>,
    /// Squared error averaged over the channels, `size × size`.
    pub error_map: Vec<f32>,
    /// The latent code.
    pub code: Vec<f32>,
    /// The mean of the worst [`WORST_PIXEL_SHARE`] of the error map.
    pub score: f32,
}

/// Reconstructs a batch of images with `network`, with error maps, codes and scores.
pub fn reconstruct(
    network: &ConvAutoencoder,
    size: usize,
    images: &[f32],
    device: &Device,
) -> Result<Vec<Reconstruction>, AutoencoderError> {
    let plane = size * size;
    if images.is_empty() || !images.len().is_multiple_of(3 * plane) {
        return Err(AutoencoderError::Config(format!("images must be 3 × {size} × {size} values each")));
    }
    let batch = images.len() / (3 * plane);
    let input = Tensor::<4>::from_data(TensorData::new(images.to_vec(), [batch, 3, size, size]), device);
    let (output, codes) = network.forward(input);
    let read = |data: TensorData| -> Result<Vec<f32>, AutoencoderError> {
        data.convert::<f32>().try_to_vec::<f32>().map_err(|e| AutoencoderError::Backend(format!("{e:?}")))
    };
    let output = read(output.into_data())?;
    let codes = read(codes.into_data())?;
    let latent = codes.len() / batch;
    Ok((0..batch)
        .map(|b| {
            let original = &images[b * 3 * plane..(b + 1) * 3 * plane];
            let image = output[b * 3 * plane..(b + 1) * 3 * plane].to_vec();
            let error_map: Vec<f32> =
                (0..plane).map(|p| (0..3).map(|c| (image[c * plane + p] - original[c * plane + p]).powi(2)).sum::<f32>() / 3.0).collect();
            let score = worst_share_mean(&error_map);
            Reconstruction { image, error_map, code: codes[b * latent..(b + 1) * latent].to_vec(), score }
        })
        .collect())
}

/// The mean of the largest [`WORST_PIXEL_SHARE`] of the values (at least one).
pub fn worst_share_mean(values: &[f32]) -> f32 {
    let keep = ((values.len() as f64 * WORST_PIXEL_SHARE).ceil() as usize).clamp(1, values.len().max(1));
    let mut sorted = values.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    (sorted[..keep.min(sorted.len())].iter().map(|&v| v as f64).sum::<f64>() / keep as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_score_is_the_mean_of_the_worst_percent() {
        let mut values = vec![0.0f32; 1000];
        values[..10].iter_mut().for_each(|v| *v = 2.0);
        values[10] = 1.0;
        assert_eq!(worst_share_mean(&values), 2.0);
        assert_eq!(worst_share_mean(&[3.0]), 3.0);
    }

    #[test]
    fn the_declared_parameter_shapes_are_the_networks_own() {
        let config = ConvAutoencoderConfig::new().with_image_size(32).with_latent(16).with_channels(vec![8, 16]);
        let bytes = weights_to_bytes(&config.init(&Device::flex()), &[]).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut saved: Vec<(String, Vec<usize>)> =
            tensors.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec())).collect();
        let mut declared = config.parameter_shapes().unwrap();
        saved.sort();
        declared.sort();
        assert_eq!(declared, saved);
        let too_deep = ConvAutoencoderConfig::new().with_image_size(1 << 20).with_channels(vec![1; 64]);
        assert!(too_deep.check().unwrap_err().contains("1 to 16 stages"));
    }
}
