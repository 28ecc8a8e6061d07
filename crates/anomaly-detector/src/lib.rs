//! The seed's memory-bank detector: the good images' feature vectors form a bank, the columns of highest
//! std-dev across it are kept, an image scores the mean Euclidean distance to its k nearest bank rows,
//! and the threshold is mean + 3σ of the training images' own (leave-one-out) scores.

mod model_file;

use anomaly_kernels::cpu::fast;
use anomaly_kernels::{GpuKernels, GpuMatrix, KernelError, Neighbours, top_columns};
use serde::{Deserialize, Serialize};

pub use model_file::{
    FeatureSource, MAX_IMAGE_SIDE, MEMORY_BANK, MODEL_FORMAT, MODEL_VERSION, Model, ModelError, ModelHeader, ModelInfo, ScoreStats,
    canonical_header, check_finite, check_header_numbers, f32_values, find_non_finite, model_metadata, read_model_header,
};

/// The detector's settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DetectorConfig {
    /// Neighbours an image's score averages over.
    pub k: usize,
    /// Feature columns kept (those of highest std-dev across the bank).
    pub features: usize,
}

impl DetectorConfig {
    /// Checks the settings against the number of training images, before any feature is computed.
    pub fn check(&self, images: usize) -> Result<(), DetectorError> {
        if self.features == 0 {
            return Err(DetectorError::Shape("at least one feature column must be kept (features ≥ 1)".into()));
        }
        if self.k == 0 {
            return Err(DetectorError::Shape("k must be at least 1".into()));
        }
        if images < self.k + 1 {
            return Err(DetectorError::TooFewImages { k: self.k, images });
        }
        Ok(())
    }
}

impl Default for DetectorConfig {
    /// The seed's settings: k = 50, 500 columns.
    fn default() -> Self {
        Self { k: 50, features: 500 }
    }
}

/// Why a detector could not be fitted or applied.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    #[error(
        "k = {k} needs at least {} training images (each is scored against the others), got {images}; lower --k",
        k + 1
    )]
    TooFewImages { k: usize, images: usize },
    #[error("k = {k} is more than the {rows} images in the bank")]
    KTooLarge { k: usize, rows: usize },
    #[error("{0}")]
    Shape(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// Where the bank's kernels run.
#[allow(clippy::large_enum_variant, reason = "one value per run, made once: boxing the GPU variant would save nothing")]
pub enum Compute {
    /// Our WGSL kernels.
    Gpu(GpuKernels),
    /// The multithreaded CPU paths.
    Cpu,
}

/// A fitted memory bank.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryBank {
    pub config: DetectorConfig,
    /// Width of the backbone's feature vectors.
    pub input_dim: usize,
    /// The kept columns, ascending.
    pub columns: Vec<u32>,
    /// The training images' kept features, row-major `rows × columns.len()`.
    pub rows: Vec<f32>,
    /// Leave-one-out scores of the training images.
    pub train_scores: Vec<f32>,
    /// mean + 3σ (population σ) of the training scores.
    pub threshold: f32,
}

impl MemoryBank {
    /// Fits the bank to the good images' features (row-major `images × dim`).
    pub fn fit(features: &[f32], dim: usize, config: DetectorConfig, compute: &Compute) -> Result<Self, DetectorError> {
        if dim == 0 || !features.len().is_multiple_of(dim) {
            return Err(DetectorError::Shape(format!("{} values are not rows of {dim} features", features.len())));
        }
        let images = features.len() / dim;
        config.check(images)?;
        let keep = config.features.min(dim);
        // Each training image is scored against the bank without itself: its k + 1 nearest include itself.
        let (columns, rows, neighbours) = match compute {
            Compute::Gpu(kernels) => {
                let matrix = kernels.upload(features, images, dim)?;
                let columns = top_columns(&kernels.column_stats(&matrix)?.std, keep);
                let bank = kernels.gather_columns(&matrix, &columns)?;
                // The bank is its own queries, on the device; it comes back once, for the model file.
                let neighbours = kernels.knn(&bank, &bank, config.k + 1)?;
                (columns, kernels.download(&bank)?, neighbours)
            }
            Compute::Cpu => {
                let columns = top_columns(&fast::column_stats(features, images, dim).std, keep);
                let rows = gather(features, dim, &columns);
                let neighbours = fast::knn(&rows, &rows, columns.len(), config.k + 1);
                (columns, rows, neighbours)
            }
        };
        let train_scores: Vec<f32> = (0..images)
            .map(|image| {
                let indices = neighbours.row_indices(image);
                let distances = neighbours.row_distances(image);
                // Drop the image itself (a duplicate of lower index may rank before it), else the farthest.
                let own = indices.iter().position(|&i| i as usize == image).unwrap_or(config.k);
                let sum: f64 = distances.iter().enumerate().filter(|&(j, _)| j != own).map(|(_, &d)| d as f64).sum();
                (sum / config.k as f64) as f32
            })
            .collect();
        let threshold = ScoreStats::of(&train_scores).threshold();
        Ok(Self { config, input_dim: dim, columns, rows, train_scores, threshold })
    }

    /// Number of training images in the bank.
    pub fn len(&self) -> usize {
        self.train_scores.len()
    }

    /// Whether the bank is empty (never, once fitted).
    pub fn is_empty(&self) -> bool {
        self.train_scores.is_empty()
    }

    /// Anomaly scores of images (row-major `images × input_dim` features): mean distance to the k nearest
    /// bank rows.
    pub fn score(&self, features: &[f32], compute: &Compute) -> Result<Vec<f32>, DetectorError> {
        self.scorer(compute)?.score(features)
    }

    /// A scorer that keeps the bank where `compute` runs, for scoring many batches without re-uploading it.
    pub fn scorer<'a>(&'a self, compute: &'a Compute) -> Result<Scorer<'a>, DetectorError> {
        if self.config.k == 0 || self.config.k > self.len() {
            return Err(DetectorError::KTooLarge { k: self.config.k, rows: self.len() });
        }
        let uploaded = match compute {
            Compute::Gpu(kernels) => Some((kernels, kernels.upload(&self.rows, self.len(), self.columns.len())?)),
            Compute::Cpu => None,
        };
        Ok(Scorer { bank: self, uploaded })
    }

    /// The kept columns of images' features (row-major `images × input_dim`), as the bank stores them.
    pub fn select(&self, features: &[f32]) -> Result<Vec<f32>, DetectorError> {
        if !features.len().is_multiple_of(self.input_dim) {
            return Err(DetectorError::Shape(format!(
                "{} values are not rows of the {} features this bank was fitted on",
                features.len(),
                self.input_dim
            )));
        }
        Ok(gather(features, self.input_dim, &self.columns))
    }
}

/// Scores images against a bank held on its compute device.
pub struct Scorer<'a> {
    bank: &'a MemoryBank,
    uploaded: Option<(&'a GpuKernels, GpuMatrix)>,
}

impl Scorer<'_> {
    /// Anomaly scores of images (row-major `images × input_dim` features).
    pub fn score(&self, features: &[f32]) -> Result<Vec<f32>, DetectorError> {
        self.score_kept(&self.bank.select(features)?)
    }

    /// Anomaly scores of images whose kept columns were already selected ([`MemoryBank::select`]), for
    /// callers that keep those rows too.
    pub fn score_kept(&self, queries: &[f32]) -> Result<Vec<f32>, DetectorError> {
        let width = self.bank.columns.len();
        if !queries.len().is_multiple_of(width) {
            return Err(DetectorError::Shape(format!("{} values are not rows of the bank's {width} kept columns", queries.len())));
        }
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        let k = self.bank.config.k;
        let neighbours: Neighbours = match &self.uploaded {
            Some((kernels, bank)) => kernels.knn_host(bank, queries, k)?,
            None => fast::knn(queries, &self.bank.rows, width, k),
        };
        Ok((0..queries.len() / width)
            .map(|image| {
                let distances = neighbours.row_distances(image);
                (distances.iter().map(|&d| d as f64).sum::<f64>() / distances.len() as f64) as f32
            })
            .collect())
    }
}

/// The given columns of a row-major matrix.
fn gather(matrix: &[f32], dim: usize, columns: &[u32]) -> Vec<f32> {
    matrix.chunks_exact(dim).flat_map(|row| columns.iter().map(move |&c| row[c as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_is_mean_plus_three_population_sigmas() {
        assert!((ScoreStats::of(&[1.0, 3.0]).threshold() - 5.0).abs() < 1e-6);
    }

    #[test]
    fn leave_one_out_scores_exclude_the_image_itself_even_with_duplicates() {
        // Rows 0 and 1 are equal; row 2 is 3 away on the first axis; row 3 is 4 away on the second.
        let features = [0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 4.0];
        let bank = MemoryBank::fit(&features, 2, DetectorConfig { k: 1, features: 2 }, &Compute::Cpu).unwrap();
        assert_eq!(bank.train_scores, vec![0.0, 0.0, 3.0, 4.0]);
        assert_eq!(bank.score(&[0.0, 1.0], &Compute::Cpu).unwrap(), vec![1.0]);
        assert!(matches!(
            MemoryBank::fit(&features, 2, DetectorConfig { k: 4, features: 2 }, &Compute::Cpu),
            Err(DetectorError::TooFewImages { k: 4, images: 4 })
        ));
    }
}
