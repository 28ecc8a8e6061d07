//! PatchCore (Roth et al. 2022) on patch features, with no backbone in sight: the training images'
//! patches reduced to a bank by the greedy coreset (anomaly-kernels' `coreset`), each patch scored by
//! its distance to the nearest bank patch (the kNN kernels, k = 1), an image by its worst patch (or,
//! with `reweight`, PatchCore's reweighting by that patch's bank neighbourhood), and the anomaly map by
//! the patch scores upsampled and smoothed ([`anomaly_map`]).
//!
//! The threshold is the seed's rule on leave-one-out scores: each training image is scored against the
//! bank without the rows that came from its own patches (its k = 8 nearest bank rows are fetched, the
//! first from another image is its nearest; when all eight are its own, an exact scan decides), and the
//! threshold is their mean + 3σ. The pixel threshold is the same rule on the maxima of the training
//! images' leave-one-out maps.

mod bank_chunks;
mod maps;
mod model_file;
mod train_patches;

use anomaly_detector::{Compute, ScoreStats};
use anomaly_fs::FileBytes;
use anomaly_kernels::cpu::fast;
use anomaly_kernels::{CoresetChunking, CoresetSettings, CoresetSpace, GpuKernels, GpuMatrix, KernelError, Neighbours};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use bank_chunks::{BANK_CHUNK_BYTES, MappedRows, nearest_in_chunks};
pub use maps::{BLUR_SIGMA, anomaly_map, blur, upsample_bilinear};
pub use model_file::{PATCHCORE, PatchCoreInfo, PatchCoreModel, PatchSource};
pub use train_patches::{Chunks, MemoryPlan, TrainPatches, TrainPatchesWriter};

/// Bank rows (the nearest included) whose distances PatchCore's reweighting softmaxes, as anomalib.
pub const REWEIGHT_NEIGHBOURS: usize = 9;

/// Nearest bank rows fetched per training patch for its leave-one-out score.
pub(crate) const LEAVE_ONE_OUT_K: usize = 8;

/// How a PatchCore bank is made and applied.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PatchCoreConfig {
    /// Share of the training patches the coreset keeps, in (0, 1].
    pub coreset_ratio: f64,
    /// Dimensions of the coreset's random projection (0: none).
    pub projection: usize,
    /// Seed of the coreset's projection and start.
    pub seed: u64,
    /// Whether an image's score is reweighted by its worst patch's bank neighbourhood.
    pub reweight: bool,
}

impl Default for PatchCoreConfig {
    /// PatchCore's defaults: 10% of the patches, a 128-d projection, no reweighting.
    fn default() -> Self {
        let coreset = CoresetSettings::default();
        Self { coreset_ratio: coreset.ratio, projection: coreset.projection, seed: coreset.seed, reweight: false }
    }
}

impl PatchCoreConfig {
    pub(crate) fn coreset(&self) -> CoresetSettings {
        CoresetSettings { ratio: self.coreset_ratio, projection: self.projection, seed: self.seed }
    }

    /// Checks the settings against the number of training images, before any image is read.
    pub fn check(&self, train_images: usize) -> Result<(), PatchCoreError> {
        if !(self.coreset_ratio > 0.0 && self.coreset_ratio <= 1.0) {
            return Err(PatchCoreError::Kernel(KernelError::InvalidRatio(self.coreset_ratio)));
        }
        if train_images < 2 {
            return Err(PatchCoreError::TooFewImages(train_images));
        }
        Ok(())
    }
}

/// Where a bank's patches come from: their grid per image, their width, and the input crop's side the
/// maps are drawn at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchGeometry {
    /// Patch rows and columns per image.
    pub grid: (usize, usize),
    /// Values per patch.
    pub patch_dim: usize,
    /// Side of the square input crop.
    pub side: usize,
}

impl PatchGeometry {
    /// Patches per image.
    pub fn per_image(&self) -> usize {
        self.grid.0 * self.grid.1
    }
}

/// Why PatchCore could not fit or score.
#[derive(Debug, thiserror::Error)]
pub enum PatchCoreError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("{0}")]
    Shape(String),
    #[error("PatchCore needs at least 2 training images (its threshold scores each against the others' patches), got {0}")]
    TooFewImages(usize),
    #[error(
        "the coreset's {rows} patches all come from training image {image}, which leaves it no bank to be scored against; \
         raise --coreset-ratio"
    )]
    OneImageBank { rows: usize, image: usize },
    #[error(
        "a memory budget of {} is too small for this fit: the coreset of {patches} patches in {space_dims} dimensions, its bank and \
         one image's patches need at least {}; raise --memory-budget to that, or lower --projection or --coreset-ratio",
        bytes_text(*budget), bytes_text(*minimum)
    )]
    BudgetTooSmall { budget: u64, minimum: u64, patches: u64, space_dims: usize },
    #[error("spilling the training patches to {}: {source}; free space there, or point --spill-dir at a disk with room", path.display())]
    Spill { path: std::path::PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    Read { path: std::path::PathBuf, source: std::io::Error },
}

/// Bytes as people read them: `512 B`, `1.50 MiB`, `3.20 GiB`.
pub fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

/// One image's result: its score and its anomaly map over the input crop.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageScore {
    /// The worst patch's distance (reweighted if asked).
    pub score: f32,
    /// `side × side`, row-major.
    pub map: Vec<f32>,
}

/// Seconds a fit spent in its two stages, for reports and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct FitSeconds {
    /// The coreset: projection and greedy selection.
    pub coreset: f64,
    /// The leave-one-out scores and maps of the training images.
    pub leave_one_out: f64,
}

/// A bank's rows: in memory (fitted, or read from a file), or in place in a memory-mapped model file.
#[derive(Clone)]
pub(crate) enum BankRows {
    Owned(Vec<f32>),
    /// `len` f32 values at byte `offset` of the file, which is mapped.
    Mapped {
        file: FileBytes,
        offset: usize,
        len: usize,
    },
}

impl BankRows {
    fn values(&self) -> &[f32] {
        match self {
            Self::Owned(values) => values,
            Self::Mapped { file, offset, len } => bytemuck::cast_slice(&file[*offset..][..len * 4]),
        }
    }

    /// The mapping the rows lie in, if they are read in place.
    fn map(&self) -> Option<&memmap2::Mmap> {
        match self {
            Self::Owned(_) => None,
            Self::Mapped { file, .. } => file.map(),
        }
    }
}

impl PartialEq for BankRows {
    fn eq(&self, other: &Self) -> bool {
        self.values() == other.values()
    }
}

impl std::fmt::Debug for BankRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Owned(values) => write!(f, "{} values in memory", values.len()),
            Self::Mapped { len, .. } => write!(f, "{len} values memory-mapped"),
        }
    }
}

/// A fitted PatchCore bank with its thresholds.
#[derive(Clone, Debug, PartialEq)]
pub struct PatchBank {
    config: PatchCoreConfig,
    geometry: PatchGeometry,
    rows: BankRows,
    train_patches: usize,
    train_scores: Vec<f32>,
    train_map_maxima: Vec<f32>,
    /// Known after a fit in this process, not kept in the file.
    fit_seconds: Option<FitSeconds>,
}

impl PatchBank {
    /// Fits a bank to the training images' patches (row-major `images × per_image × patch_dim`).
    pub fn fit(patches: &[f32], geometry: PatchGeometry, config: PatchCoreConfig, compute: &Compute) -> Result<Self, PatchCoreError> {
        Self::fit_from(&TrainPatches::in_memory(patches, geometry)?, config, compute)
    }

    /// Fits a bank to training patches in memory or spilled to disk, reading them a chunk at a time: the
    /// coreset selects on their projection, its rows are gathered in one pass, and each chunk's images
    /// get their leave-one-out scores. Chunked or not, the bank and thresholds are the same.
    pub fn fit_from(train: &TrainPatches, config: PatchCoreConfig, compute: &Compute) -> Result<Self, PatchCoreError> {
        let geometry = train.geometry();
        let (per_image, dim) = (geometry.per_image(), geometry.patch_dim);
        let images = train.images();
        config.check(images)?;
        let n = train.rows();
        let clock = std::time::Instant::now();
        let space = CoresetSpace::from_chunks(n, dim, &config.coreset(), || train.chunks().map(|(_, chunk)| chunk))?;
        let mut picks = match compute {
            Compute::Gpu(kernels) => kernels.coreset_select(&space, CoresetChunking::default())?,
            Compute::Cpu => fast::select(space),
        };
        // Ascending order: bank rows then follow the images, and ties in the kNN go the same way on
        // every path.
        picks.sort_unstable();
        let rows = BankRows::Owned(train.gather(&picks));
        let sources: Vec<usize> = picks.iter().map(|&p| p as usize / per_image).collect();
        if let Some(&image) = sources.first().filter(|&&first| sources.iter().all(|&s| s == first)) {
            return Err(PatchCoreError::OneImageBank { rows: sources.len(), image });
        }
        let coreset_seconds = clock.elapsed().as_secs_f64();
        let mut bank =
            Self { config, geometry, rows, train_patches: n, train_scores: Vec::new(), train_map_maxima: Vec::new(), fit_seconds: None };
        let k = LEAVE_ONE_OUT_K.min(sources.len());
        let uploaded = match compute {
            Compute::Gpu(kernels) => Some((kernels, kernels.upload(bank.rows(), sources.len(), dim)?)),
            Compute::Cpu => None,
        };
        let mut scored: Vec<(f32, f32)> = Vec::with_capacity(images);
        // The GPU's kNN uploads the patches a bounded part at a time; the CPU's reads them in place.
        for (first_image, chunk) in train.chunks() {
            let neighbours = match &uploaded {
                Some((kernels, rows)) => kernels.knn_host(rows, chunk, k)?,
                None => fast::knn(chunk, bank.rows(), dim, k),
            };
            let bank = &bank;
            scored.par_extend((0..chunk.len() / (per_image * dim)).into_par_iter().map(|local| {
                let image = first_image + local;
                let others = |row: usize| sources[row] != image;
                let own = &chunk[local * per_image * dim..][..per_image * dim];
                let nearest: Vec<(f32, usize)> = (0..per_image)
                    .map(|p| {
                        let q = local * per_image + p;
                        let found = neighbours.row_indices(q).iter().zip(neighbours.row_distances(q)).find(|pair| others(*pair.0 as usize));
                        match found {
                            Some((&i, &d)) => (d, i as usize),
                            None => bank.nearest_exact(&own[p * dim..][..dim], others),
                        }
                    })
                    .collect();
                let image_score = bank.image_score(own, &nearest, others);
                let patch_scores: Vec<f32> = nearest.iter().map(|n| n.0).collect();
                let map_max = anomaly_map(&patch_scores, geometry.grid, geometry.side, BLUR_SIGMA).into_iter().fold(0.0, f32::max);
                (image_score, map_max)
            }));
        }
        drop(uploaded);
        (bank.train_scores, bank.train_map_maxima) = scored.into_iter().unzip();
        bank.fit_seconds = Some(FitSeconds { coreset: coreset_seconds, leave_one_out: clock.elapsed().as_secs_f64() - coreset_seconds });
        Ok(bank)
    }

    /// A bank read back from its parts (a model file), checked for shape.
    pub(crate) fn from_parts(
        config: PatchCoreConfig,
        geometry: PatchGeometry,
        rows: BankRows,
        train_patches: usize,
        train_scores: Vec<f32>,
        train_map_maxima: Vec<f32>,
    ) -> Result<Self, PatchCoreError> {
        let dim = geometry.patch_dim;
        let values = rows.values();
        if dim == 0 || values.is_empty() || !values.len().is_multiple_of(dim) || geometry.per_image() == 0 || geometry.side == 0 {
            return Err(PatchCoreError::Shape(format!("a bank of {} values is not rows of {dim} patches", values.len())));
        }
        if train_scores.len() != train_map_maxima.len() {
            return Err(PatchCoreError::Shape(format!(
                "{} training scores but {} training map maxima",
                train_scores.len(),
                train_map_maxima.len()
            )));
        }
        Ok(Self { config, geometry, rows, train_patches, train_scores, train_map_maxima, fit_seconds: None })
    }

    /// The bank's rows in chunks of about `chunk_bytes`: `(first row, values)`. Rows in a mapped file
    /// have their pages released as the chunks go by.
    pub fn row_chunks(&self, chunk_bytes: usize) -> Chunks<'_> {
        Chunks::new(bytemuck::cast_slice(self.rows.values()), self.rows.map(), chunk_bytes, self.geometry.patch_dim * 4)
    }

    /// Whether the rows are read in place from a memory-mapped model file (and streamed when scoring).
    pub fn is_mapped(&self) -> bool {
        self.rows.map().is_some()
    }

    /// The nearest bank row among those `allowed`, by a plain scan: `(distance, row)`.
    fn nearest_exact(&self, patch: &[f32], allowed: impl Fn(usize) -> bool) -> (f32, usize) {
        let (squared, row) = self
            .rows()
            .chunks_exact(self.geometry.patch_dim)
            .enumerate()
            .filter(|&(row, _)| allowed(row))
            .map(|(row, values)| (squared_distance(patch, values), row))
            .fold((f32::INFINITY, usize::MAX), |best, c| if c.0 < best.0 { c } else { best });
        (squared.sqrt(), row)
    }

    /// An image's score from its patches and each one's nearest allowed bank row `(distance, row)`:
    /// the worst patch's distance, reweighted if the config asks (bank rows outside `allowed` are not
    /// the image's neighbourhood).
    fn image_score(&self, patches: &[f32], nearest: &[(f32, usize)], allowed: impl Fn(usize) -> bool) -> f32 {
        let Some((worst, &(score, row))) = nearest.iter().enumerate().max_by(|a, b| a.1.0.total_cmp(&b.1.0).then(b.0.cmp(&a.0))) else {
            return 0.0;
        };
        if !self.config.reweight {
            return score;
        }
        let dim = self.geometry.patch_dim;
        let patch = &patches[worst * dim..][..dim];
        // m*'s neighbourhood in the bank (itself first), then the patch's distances to it, softmaxed.
        let anchor = &self.rows()[row * dim..][..dim];
        let mut support: Vec<(f32, usize)> = self
            .rows()
            .chunks_exact(dim)
            .enumerate()
            .filter(|&(r, _)| allowed(r))
            .map(|(r, values)| (squared_distance(anchor, values), r))
            .collect();
        let take = REWEIGHT_NEIGHBOURS.min(support.len());
        support.select_nth_unstable_by(take - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        support.truncate(take);
        support.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let distances: Vec<f64> =
            support.iter().map(|&(_, r)| (squared_distance(patch, &self.rows()[r * dim..][..dim]) as f64).sqrt()).collect();
        let peak = distances.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = distances.iter().map(|d| (d - peak).exp()).sum();
        let weight = 1.0 - (distances[0] - peak).exp() / total;
        (weight * score as f64) as f32
    }

    /// A scorer keeping the bank where `compute` runs (uploaded once), or, for a bank in a mapped file,
    /// streaming it through `compute` a chunk at a time on every call.
    pub fn scorer<'a>(&'a self, compute: &'a Compute) -> Result<BankScorer<'a>, PatchCoreError> {
        let uploaded = match compute {
            Compute::Gpu(kernels) if !self.is_mapped() => {
                Some((kernels, kernels.upload(self.rows(), self.len(), self.geometry.patch_dim)?))
            }
            _ => None,
        };
        Ok(BankScorer { bank: self, compute, uploaded })
    }

    /// Patches in the bank.
    pub fn len(&self) -> usize {
        self.rows().len() / self.geometry.patch_dim
    }

    /// Whether the bank holds no patch (never, once fitted).
    pub fn is_empty(&self) -> bool {
        self.rows().is_empty()
    }

    /// The bank's patches, row-major.
    pub fn rows(&self) -> &[f32] {
        self.rows.values()
    }

    /// How it was made.
    pub fn config(&self) -> &PatchCoreConfig {
        &self.config
    }

    /// Its patches' grid, width and input side.
    pub fn geometry(&self) -> &PatchGeometry {
        &self.geometry
    }

    /// How long the fit's stages took, when this process fitted the bank.
    pub fn fit_seconds(&self) -> Option<FitSeconds> {
        self.fit_seconds
    }

    /// Training patches the coreset chose from.
    pub fn train_patches(&self) -> usize {
        self.train_patches
    }

    /// The training images' leave-one-out scores.
    pub fn train_scores(&self) -> &[f32] {
        &self.train_scores
    }

    /// The maxima of the training images' leave-one-out maps.
    pub fn train_map_maxima(&self) -> &[f32] {
        &self.train_map_maxima
    }

    /// Images scoring above it are anomalous: mean + 3σ of the leave-one-out scores.
    pub fn threshold(&self) -> f32 {
        ScoreStats::of(&self.train_scores).threshold()
    }

    /// Map values above it are anomalous: mean + 3σ of the leave-one-out maps' maxima.
    pub fn pixel_threshold(&self) -> f32 {
        ScoreStats::of(&self.train_map_maxima).threshold()
    }
}

/// Scores images' patches against a bank held where its compute runs.
pub struct BankScorer<'a> {
    bank: &'a PatchBank,
    compute: &'a Compute,
    uploaded: Option<(&'a GpuKernels, GpuMatrix)>,
}

impl BankScorer<'_> {
    /// Each image's score and map, from its patches (row-major `images × per_image × patch_dim`).
    pub fn score(&self, patches: &[f32]) -> Result<Vec<ImageScore>, PatchCoreError> {
        let geometry = self.bank.geometry;
        let (per_image, dim) = (geometry.per_image(), geometry.patch_dim);
        if !patches.len().is_multiple_of(per_image * dim) {
            return Err(PatchCoreError::Shape(format!(
                "{} values are not images of {per_image} patches of {dim}, as this bank's",
                patches.len()
            )));
        }
        if patches.is_empty() {
            return Ok(Vec::new());
        }
        let neighbours: Neighbours = match &self.uploaded {
            Some((kernels, bank)) => kernels.knn_host(bank, patches, 1)?,
            None if self.bank.is_mapped() => nearest_in_chunks(patches, dim, self.bank.row_chunks(BANK_CHUNK_BYTES), self.compute)?,
            None => fast::knn(patches, self.bank.rows(), dim, 1),
        };
        Ok(patches
            .par_chunks(per_image * dim)
            .enumerate()
            .map(|(image, own)| {
                let first = image * per_image;
                let nearest: Vec<(f32, usize)> =
                    (first..first + per_image).map(|q| (neighbours.distances[q], neighbours.indices[q] as usize)).collect();
                let score = self.bank.image_score(own, &nearest, |_| true);
                let patch_scores: Vec<f32> = nearest.iter().map(|n| n.0).collect();
                ImageScore { score, map: anomaly_map(&patch_scores, geometry.grid, geometry.side, BLUR_SIGMA) }
            })
            .collect())
    }
}

fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

#[cfg(test)]
mod tests;
