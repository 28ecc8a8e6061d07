//! Training the autoencoder on good images with burn's autodiff and Adam: seeded (the same seed gives the
//! same model on a given device), lightly augmented (flips and a small brightness change), checkpointed
//! after every epoch so that an interrupted run resumes where it stopped.

use std::path::{Path, PathBuf};

use anomaly_data::SplitMix;
use burn::module::Module;
use burn::optim::{
    Adam, AdamConfig, AdamState, GradientsParams, LearningRate, ModuleOptimizer, Optimizer, RecordState, StateSink, StateSource,
};
use burn::store::{BurnpackStore, ModuleSnapshot};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::{AutoencoderError, ConvAutoencoder, ConvAutoencoderConfig};

/// How the autoencoder is trained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// Seeds the initial weights, the order of the images and the augmentation.
    pub seed: u64,
    /// Random horizontal and vertical flips and a ±5% brightness change per image.
    pub augment: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self { epochs: 30, batch_size: 16, learning_rate: 1e-3, seed: 0, augment: true }
    }
}

/// Where an epoch-by-epoch checkpoint lives, and whether to continue from it.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub resume: bool,
}

/// What a checkpoint records besides the weights and the optimizer's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Progress {
    model: ConvAutoencoderConfig,
    train: TrainConfig,
    images: usize,
    epochs_done: usize,
    losses: Vec<f64>,
}

/// A trained autoencoder (for inference, off the autodiff device) and the mean loss of every epoch.
pub struct Trained {
    pub model: ConvAutoencoder,
    pub epoch_losses: Vec<f64>,
}

/// Trains on `images` (each `3 × size × size` values in [0, 1], CHW), calling `on_batch(epoch, loss)` after
/// every step. `device` is the plain device; training runs on its autodiff twin.
pub fn train(
    images: &[Vec<f32>],
    model_config: &ConvAutoencoderConfig,
    config: &TrainConfig,
    device: &Device,
    checkpoint: Option<&Checkpoint>,
    mut on_batch: impl FnMut(usize, f64),
) -> Result<Trained, AutoencoderError> {
    model_config.check().map_err(AutoencoderError::Config)?;
    let size = model_config.image_size;
    if images.is_empty() || config.batch_size == 0 || config.epochs == 0 {
        return Err(AutoencoderError::Config("training needs images, a batch size and epochs of at least 1".into()));
    }
    if let Some(bad) = images.iter().position(|image| image.len() != 3 * size * size) {
        return Err(AutoencoderError::Config(format!("image {bad} is not 3 × {size} × {size} values")));
    }
    let autodiff = device.clone().autodiff();
    let mut model = crate::seeded_network(model_config, &autodiff, config.seed)?;
    let mut optimizer = ModuleOptimizer::from(CpuLoadedAdam(AdamConfig::new().build()));
    let mut progress =
        Progress { model: model_config.clone(), train: config.clone(), images: images.len(), epochs_done: 0, losses: Vec::new() };
    if let Some(checkpoint) = checkpoint.filter(|c| c.resume && c.dir.join(PROGRESS).is_file()) {
        (model, optimizer, progress) = restore(checkpoint, model, optimizer, &progress)?;
    }

    for epoch in progress.epochs_done..config.epochs {
        let mut rng = SplitMix(config.seed ^ (epoch as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let order = permutation(images.len(), &mut rng);
        let (mut total, mut seen) = (0.0, 0usize);
        for batch in order.chunks(config.batch_size) {
            let mut values = Vec::with_capacity(batch.len() * 3 * size * size);
            for &index in batch {
                values.extend(augmented(&images[index], size, config.augment, &mut rng));
            }
            let input = Tensor::<4>::from_data(TensorData::new(values, [batch.len(), 3, size, size]), &autodiff);
            let (reconstruction, _) = model.forward(input.clone());
            let loss = (reconstruction - input).square().mean();
            let value =
                loss.clone().try_into_scalar::<f32>().map_err(|e| AutoencoderError::Backend(format!("reading the loss: {e:?}")))? as f64;
            let gradients = GradientsParams::from_grads(loss.backward(), &model);
            model = optimizer.step(config.learning_rate, model, gradients);
            total += value * batch.len() as f64;
            seen += batch.len();
            on_batch(epoch, value);
        }
        progress.losses.push(total / seen as f64);
        progress.epochs_done = epoch + 1;
        if let Some(checkpoint) = checkpoint {
            save(checkpoint, &model, &optimizer, &progress)?;
        }
    }
    Ok(Trained { model: model.valid(), epoch_losses: progress.losses })
}

/// Adam, with a checkpoint's optimizer state read onto the CPU. burn's `ModuleOptimizer::load` builds the
/// state tensors on `Device::default()`, which with the wgpu feature lazily starts burn's default wgpu
/// device: a second GPU device beside ours, a panic on a machine without an adapter, and (issue 9) the
/// reason our shared GPU context once failed to start. Each state moves to its parameter's device at the
/// next step, as before; the checkpoint format is Adam's own.
#[derive(Clone)]
struct CpuLoadedAdam(Adam);

/// Adam's state for one parameter, read back onto the CPU.
#[derive(Clone)]
struct CpuLoaded<const D: usize>(AdamState<D>);

impl<const D: usize> RecordState for CpuLoaded<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        self.0.state_flatten(prefix, out);
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, _default_device: &Device) -> Option<Self> {
        AdamState::state_unflatten(prefix, src, &Device::flex()).map(Self)
    }
}

impl Optimizer for CpuLoadedAdam {
    type State<const D: usize> = CpuLoaded<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let (tensor, state) = self.0.step(lr, tensor, grad, state.map(|state| state.0));
        (tensor, state.map(CpuLoaded))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        CpuLoaded(Adam::to_device(state.0, device))
    }
}

const PROGRESS: &str = "progress.json";

/// The weights after `epochs` epochs. Burnpack keeps the parameters' ids, which the optimizer's state is
/// keyed by.
fn weights_file(dir: &Path, epochs: usize) -> PathBuf {
    dir.join(format!("weights-{epochs}.bpk"))
}

/// The optimizer's state after `epochs` epochs.
fn optimizer_file(dir: &Path, epochs: usize) -> PathBuf {
    dir.join(format!("optimizer-{epochs}.bpk"))
}

/// Writes the checkpoint. The weights and the optimizer's state go to files named by the epoch, each
/// written atomically, and progress.json, replaced atomically last, says which epoch is the checkpoint: a
/// run killed at any point leaves a whole checkpoint (the new epoch's or the previous one's), never the
/// weights of one epoch with the state of another. The files of other epochs are removed after.
fn save(
    checkpoint: &Checkpoint,
    model: &ConvAutoencoder,
    optimizer: &ModuleOptimizer,
    progress: &Progress,
) -> Result<(), AutoencoderError> {
    let dir = &checkpoint.dir;
    let failed = |path: &Path, reason: String| AutoencoderError::Checkpoint { path: path.to_path_buf(), reason };
    let weights = weights_file(dir, progress.epochs_done);
    let mut store = BurnpackStore::from_bytes(None);
    model.save_into(&mut store).map_err(|e| failed(&weights, e.to_string()))?;
    let bytes = store.get_bytes().map_err(|e| failed(&weights, e.to_string()))?;
    anomaly_fs::write_atomic(&weights, &bytes)?;
    let state = optimizer_file(dir, progress.epochs_done);
    let bytes = optimizer.into_bytes().map_err(|e| failed(&state, e.to_string()))?;
    anomaly_fs::write_atomic(&state, &bytes)?;
    let record = dir.join(PROGRESS);
    let bytes = serde_json::to_vec_pretty(progress).map_err(|e| failed(&record, e.to_string()))?;
    anomaly_fs::write_atomic(&record, &bytes)?;
    remove_other_epochs(dir, progress.epochs_done)
}

/// Removes the weights and optimizer files of epochs other than `epochs` (the previous checkpoint's, and a
/// killed run's that never got its progress.json) and the temporary files a run killed while writing one
/// left (`.weights-N.bpk.XXXXXX`; this run's own are all in place by now).
fn remove_other_epochs(dir: &Path, epochs: usize) -> Result<(), AutoencoderError> {
    let listing = |e| AutoencoderError::Io { path: dir.to_path_buf(), source: e };
    for entry in std::fs::read_dir(dir).map_err(listing)? {
        let name = entry.map_err(listing)?.file_name();
        let name = name.to_string_lossy();
        let epoch =
            ["weights-", "optimizer-"].iter().find_map(|prefix| name.strip_prefix(prefix)?.strip_suffix(".bpk")?.parse::<usize>().ok());
        let temporary = [".weights-", ".optimizer-", ".progress.json."].iter().any(|prefix| name.starts_with(prefix));
        if temporary || epoch.is_some_and(|epoch| epoch != epochs) {
            let path = dir.join(name.as_ref());
            std::fs::remove_file(&path).map_err(|e| AutoencoderError::Io { path, source: e })?;
        }
    }
    Ok(())
}

/// Reads a checkpoint back, refusing one made with other settings or other images.
fn restore(
    checkpoint: &Checkpoint,
    mut model: ConvAutoencoder,
    optimizer: ModuleOptimizer,
    wanted: &Progress,
) -> Result<(ConvAutoencoder, ModuleOptimizer, Progress), AutoencoderError> {
    let dir = &checkpoint.dir;
    let bad = |path: PathBuf, reason: String| AutoencoderError::Checkpoint { path, reason };
    let path = dir.join(PROGRESS);
    let text = std::fs::read_to_string(&path).map_err(|e| AutoencoderError::Io { path: path.clone(), source: e })?;
    let progress: Progress = serde_json::from_str(&text).map_err(|e| bad(path.clone(), e.to_string()))?;
    let mut same_run = progress.train.clone();
    same_run.epochs = wanted.train.epochs;
    if progress.model != wanted.model || same_run != wanted.train || progress.images != wanted.images {
        return Err(bad(
            path,
            "made with other settings or another number of images; remove it or resume with the settings it was made with".into(),
        ));
    }
    let weights = weights_file(dir, progress.epochs_done);
    let mut store = BurnpackStore::from_file(&weights);
    model.load_from(&mut store).map_err(|e| bad(weights.clone(), e.to_string()))?;
    let optimizer_path = optimizer_file(dir, progress.epochs_done);
    let optimizer = optimizer.load(&optimizer_path).map_err(|e| bad(optimizer_path.clone(), e.to_string()))?;
    Ok((model, optimizer, progress))
}

/// A seeded shuffle (Fisher–Yates).
fn permutation(n: usize, rng: &mut SplitMix) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.uniform() * (i + 1) as f64) as usize;
        order.swap(i, j.min(i));
    }
    order
}

/// An image flipped at random and slightly brightened or darkened.
fn augmented(image: &[f32], size: usize, augment: bool, rng: &mut SplitMix) -> Vec<f32> {
    if !augment {
        return image.to_vec();
    }
    let (flip_x, flip_y) = (rng.uniform() < 0.5, rng.uniform() < 0.5);
    let gain = 1.0 + 0.1 * (rng.uniform() as f32 - 0.5);
    let mut out = Vec::with_capacity(image.len());
    for c in 0..3 {
        for y in 0..size {
            let sy = if flip_y { size - 1 - y } else { y };
            for x in 0..size {
                let sx = if flip_x { size - 1 - x } else { x };
                out.push((image[(c * size + sy) * size + sx] * gain).clamp(0.0, 1.0));
            }
        }
    }
    out
}
