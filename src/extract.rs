//! Running a backbone over many images: batches decoded in parallel ahead of the forward pass, a
//! progress bar, and features brought back as plain vectors.

use std::path::PathBuf;
use std::sync::OnceLock;

use anomaly_backbone::{Backbone, BackboneName};
use anomaly_data::{Batch, BatchLoader, Preprocess};
use anomaly_device::{DeviceChoice, ResolvedDevice};
use anyhow::{Context, Result};
use burn::tensor::{Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};

use crate::weights::{WeightsArgs, weights_file};

/// A backbone loaded on a device, with the preprocessing its weights expect.
pub struct Extractor {
    pub name: BackboneName,
    pub backbone: Backbone,
    pub device: ResolvedDevice,
    pub preprocess: Preprocess,
    /// The weights file the backbone was loaded from.
    pub weights: PathBuf,
    weights_sha256: OnceLock<String>,
    compute: OnceLock<anomaly_detector::Compute>,
}

/// One feature map of a batch, brought back to the host.
pub struct HostMap {
    pub name: String,
    /// `[batch, channels, height, width]`.
    pub shape: [usize; 4],
    pub values: Vec<f32>,
}

/// The options of every command that runs a backbone: which one, its weights, and where it runs.
#[derive(clap::Args)]
pub struct BackboneArgs {
    /// resnet50, resnet50-v2, wide_resnet50_2, efficientnet-lite0 or efficientnet-lite2.
    #[arg(long, default_value = "efficientnet-lite0")]
    pub backbone: BackboneName,
    #[command(flatten)]
    pub weights: WeightsArgs,
    /// auto (a real GPU if there is one, else the CPU), wgpu, or cpu.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

impl Extractor {
    /// Resolves the device, finds (or fetches) the weights and loads the backbone.
    pub fn new(args: &BackboneArgs) -> Result<Self> {
        Self::load(args.backbone, &args.weights, args.device)
    }

    /// As [`Extractor::new`], from the parts (for commands that read the backbone from a model file).
    pub fn load(name: BackboneName, weights: &WeightsArgs, device: DeviceChoice) -> Result<Self> {
        let path = weights_file(name, weights)?;
        let device = anomaly_device::resolve(device)?;
        let backbone = Backbone::load(name, &path, &device.device)?;
        Ok(Self {
            name,
            backbone,
            device,
            preprocess: name.preprocess(),
            weights: path,
            weights_sha256: OnceLock::new(),
            compute: OnceLock::new(),
        })
    }

    /// The pooled features of `paths` (row-major `images × dim`), with a progress bar labelled `message`.
    pub fn pooled(&self, paths: &[PathBuf], batch_size: usize, message: &str) -> Result<Vec<f32>> {
        let progress = image_progress(paths.len(), message);
        let mut pooled = Vec::with_capacity(paths.len() * self.name.feature_dim());
        self.run(paths.to_vec(), &[], batch_size, &progress, |_, batch, _| {
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
    pub fn compute(&self) -> Result<&anomaly_detector::Compute> {
        if let Some(compute) = self.compute.get() {
            return Ok(compute);
        }
        let compute = if self.device.is_wgpu() {
            anomaly_detector::Compute::Gpu(anomaly_kernels::GpuKernels::shared()?)
        } else {
            anomaly_detector::Compute::Cpu
        };
        Ok(self.compute.get_or_init(|| compute))
    }

    /// Runs the backbone over `paths`, `batch_size` images at a time, handing each batch's pooled features
    /// (`[batch, dim]`, row-major) and requested maps to `sink`.
    pub fn run(
        &self,
        paths: Vec<PathBuf>,
        taps: &[&str],
        batch_size: usize,
        progress: &ProgressBar,
        mut sink: impl FnMut(&Batch, Vec<f32>, Vec<HostMap>) -> Result<()>,
    ) -> Result<()> {
        for tap in taps {
            anyhow::ensure!(
                self.backbone.tap_names().iter().any(|t| t == tap),
                "{} has no feature map '{tap}'; it has: {}",
                self.name,
                self.backbone.tap_names().join(", ")
            );
        }
        let side = self.preprocess.crop as usize;
        for batch in BatchLoader::new(paths, self.preprocess.clone(), batch_size, 2) {
            let batch = batch?;
            let input = Tensor::<4>::from_data(TensorData::new(batch.pixels.clone(), [batch.len(), 3, side, side]), &self.device.device);
            let features = self.backbone.features(input, taps);
            let pooled = to_vec(features.pooled.into_data()).context("reading features back from the device")?;
            let maps = features
                .maps
                .into_iter()
                .map(|(name, map)| {
                    let shape = map.dims();
                    Ok(HostMap { name, shape, values: to_vec(map.into_data())? })
                })
                .collect::<Result<Vec<_>>>()?;
            progress.inc(batch.len() as u64);
            sink(&batch, pooled, maps)?;
        }
        Ok(())
    }
}

/// A tensor's values as f32.
pub fn to_vec(data: TensorData) -> Result<Vec<f32>> {
    let data = data.convert::<f32>();
    Ok(data.as_slice::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?.to_vec())
}

/// A progress bar over `total` images (hidden when stderr is not a terminal).
pub fn image_progress(total: usize, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} images ({per_sec}, eta {eta})").expect("valid progress template"),
    );
    bar.set_message(message.to_string());
    bar
}
