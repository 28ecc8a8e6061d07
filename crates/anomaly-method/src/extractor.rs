//! A backbone loaded on a device, run over many images: batches decoded in parallel ahead of the forward
//! pass, and features brought back to the host as plain vectors.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anomaly_backbone::{Backbone, BackboneName, CpuBackbone, HostMap};
use anomaly_data::{Batch, BatchLoader, ImageLimits, Preprocess};
use anomaly_detector::Compute;
use anomaly_device::ResolvedDevice;
use anyhow::{Context, Result};
use burn::tensor::{Tensor, TensorData};
use indicatif::ProgressBar;

use crate::progress::image_progress;

/// A backbone loaded on a device, with the preprocessing its weights expect.
pub struct Extractor {
    name: BackboneName,
    network: Network,
    device: ResolvedDevice,
    weights: PathBuf,
    weights_sha256: OnceLock<String>,
    compute: OnceLock<Compute>,
}

/// The network an extractor runs: burn's on wgpu; on the CPU the same network in our kernels, burn's copy
/// of the weights dropped once they are copied (WRN50-2's are 276 MB).
enum Network {
    Burn(Box<Backbone>),
    Cpu(Box<CpuBackbone>),
}

impl Extractor {
    /// Loads backbone `name` from its weights file onto `device`.
    pub fn load(name: BackboneName, weights: &Path, device: ResolvedDevice) -> Result<Self> {
        let backbone = Backbone::load(name, weights, &device.device)?;
        let on_cpu = if device.is_wgpu() { None } else { backbone.on_cpu() };
        let network = match on_cpu {
            Some(network) => Network::Cpu(Box::new(network)),
            None => Network::Burn(Box::new(backbone)),
        };
        Ok(Self { name, network, device, weights: weights.to_path_buf(), weights_sha256: OnceLock::new(), compute: OnceLock::new() })
    }

    /// Which backbone this is.
    pub fn name(&self) -> BackboneName {
        self.name
    }

    /// Where it runs.
    pub fn device(&self) -> &ResolvedDevice {
        &self.device
    }

    /// How images become its inputs (the weights' own preprocessing).
    pub fn preprocess(&self) -> Preprocess {
        self.name.preprocess()
    }

    /// The weights file it was loaded from.
    pub fn weights(&self) -> &Path {
        &self.weights
    }

    /// The pooled features of `paths` (row-major `images × dim`), with a progress bar labelled `message`.
    pub fn pooled(&self, paths: &[PathBuf], batch_size: usize, limits: ImageLimits, message: &str) -> Result<Vec<f32>> {
        let progress = image_progress(paths.len(), message);
        let mut pooled = Vec::with_capacity(paths.len() * self.name.feature_dim());
        self.run(paths.to_vec(), &[], batch_size, limits, &progress, |_, batch, _| {
            pooled.extend(batch);
            Ok(())
        })?;
        progress.finish_and_clear();
        Ok(pooled)
    }

    /// The weights file's name, for records.
    pub fn weights_name(&self) -> String {
        self.weights.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// The weights file's sha256 (read once): models record it and refuse features from other weights.
    pub fn weights_sha256(&self) -> Result<&str> {
        if let Some(sha) = self.weights_sha256.get() {
            return Ok(sha);
        }
        let sha = anomaly_weights::sha256_file(&self.weights)?;
        Ok(self.weights_sha256.get_or_init(|| sha))
    }

    /// Where the detector's kernels run: our WGSL kernels when the backbone runs on wgpu, else the CPU.
    /// Built once (the GPU pipelines are compiled on first use) and shared by fitting and scoring.
    pub fn compute(&self) -> Result<&Compute> {
        if let Some(compute) = self.compute.get() {
            return Ok(compute);
        }
        let compute = if self.device.is_wgpu() { Compute::Gpu(anomaly_kernels::GpuKernels::shared()?) } else { Compute::Cpu };
        Ok(self.compute.get_or_init(|| compute))
    }

    /// The pooled features (`[batch, dim]`, row-major) of a batch of `side × side` images already
    /// preprocessed (a model file records the preprocessing it was fitted with).
    pub fn pooled_batch(&self, batch: &Batch, side: usize) -> Result<Vec<f32>> {
        let (pooled, _) = self.forward(batch, side, &[])?;
        Ok(pooled)
    }

    /// Runs the backbone over `paths`, `batch_size` images at a time, handing each batch's pooled features
    /// (`[batch, dim]`, row-major) and requested maps to `sink`.
    pub fn run(
        &self,
        paths: Vec<PathBuf>,
        taps: &[&str],
        batch_size: usize,
        limits: ImageLimits,
        progress: &ProgressBar,
        mut sink: impl FnMut(&Batch, Vec<f32>, Vec<HostMap>) -> Result<()>,
    ) -> Result<()> {
        self.check_taps(taps)?;
        let side = self.preprocess().crop as usize;
        self.each_batch(paths, batch_size, limits, progress, |batch| {
            let (pooled, maps) = self.forward(batch, side, taps)?;
            sink(batch, pooled, maps)
        })
    }

    /// [`Self::run`] for the maps alone: the backbone runs only as far as the last tap.
    pub fn run_maps(
        &self,
        paths: Vec<PathBuf>,
        taps: &[&str],
        batch_size: usize,
        limits: ImageLimits,
        progress: &ProgressBar,
        mut sink: impl FnMut(&Batch, Vec<HostMap>) -> Result<()>,
    ) -> Result<()> {
        self.check_taps(taps)?;
        let side = self.preprocess().crop as usize;
        self.each_batch(paths, batch_size, limits, progress, |batch| sink(batch, self.forward_maps(batch, side, taps)?))
    }

    fn check_taps(&self, taps: &[&str]) -> Result<()> {
        let names = match &self.network {
            Network::Burn(backbone) => backbone.tap_names(),
            Network::Cpu(network) => network.tap_names(),
        };
        for tap in taps {
            anyhow::ensure!(names.iter().any(|t| t == tap), "{} has no feature map '{tap}'; it has: {}", self.name, names.join(", "));
        }
        Ok(())
    }

    /// Loads `paths` in batches (decoding in parallel with the work on the last batch) and hands each to `work`.
    fn each_batch(
        &self,
        paths: Vec<PathBuf>,
        batch_size: usize,
        limits: ImageLimits,
        progress: &ProgressBar,
        mut work: impl FnMut(&Batch) -> Result<()>,
    ) -> Result<()> {
        for batch in BatchLoader::new(paths, self.preprocess(), limits, batch_size, 2) {
            let batch = batch?;
            work(&batch)?;
            progress.inc(batch.len() as u64);
        }
        Ok(())
    }

    fn input(&self, batch: &Batch, side: usize) -> Tensor<4> {
        Tensor::<4>::from_data(TensorData::new(batch.pixels.clone(), [batch.len(), 3, side, side]), &self.device.device)
    }

    /// The pooled features and the maps named in `taps` of a batch.
    pub(crate) fn forward(&self, batch: &Batch, side: usize, taps: &[&str]) -> Result<(Vec<f32>, Vec<HostMap>)> {
        match &self.network {
            Network::Cpu(network) => Ok(network.features(&batch.pixels, batch.len(), side, taps, true)),
            Network::Burn(backbone) => {
                let features = backbone.features(self.input(batch, side), taps);
                let pooled = to_vec(features.pooled.into_data()).context("reading features back from the device")?;
                Ok((pooled, host_maps(features.maps)?))
            }
        }
    }

    /// The maps named in `taps` of a batch, the backbone run only as far as the last of them.
    pub(crate) fn forward_maps(&self, batch: &Batch, side: usize, taps: &[&str]) -> Result<Vec<HostMap>> {
        match &self.network {
            Network::Cpu(network) => Ok(network.features(&batch.pixels, batch.len(), side, taps, false).1),
            Network::Burn(backbone) => host_maps(backbone.tap_maps(self.input(batch, side), taps)),
        }
    }
}

/// Feature maps read back to the host.
fn host_maps(maps: Vec<(String, Tensor<4>)>) -> Result<Vec<HostMap>> {
    maps.into_iter()
        .map(|(name, map)| {
            let shape = map.dims();
            Ok(HostMap { name, shape, values: to_vec(map.into_data()).context("reading feature maps back from the device")? })
        })
        .collect()
}

/// A tensor's values as f32.
pub fn to_vec(data: TensorData) -> Result<Vec<f32>> {
    let data = data.convert::<f32>();
    Ok(data.as_slice::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?.to_vec())
}
