//! The options several commands share, and turning them into the libraries' runtime.

use std::path::PathBuf;
use std::sync::Arc;

use anomaly_backbone::BackboneName;
use anomaly_data::ImageLimits;
use anomaly_device::DeviceChoice;
use anomaly_method::{Extractor, Runtime, count_in};
use anyhow::Result;

use crate::weights::{WeightsArgs, weights_file};

/// Where the work runs and where weights are found: every command that runs a model takes these.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub weights: WeightsArgs,
    /// Where the work runs.
    #[arg(long, value_enum, ignore_case = true, default_value_t)]
    pub device: DeviceChoice,
    /// Images per forward pass (memory grows with it, not with the number of images).
    #[arg(long, default_value_t = 8, value_parser = count_in(1, 4096))]
    pub batch_size: usize,
    #[command(flatten)]
    pub images: ImageArgs,
}

/// What an input image may cost: every command that reads images takes it.
#[derive(clap::Args, Clone, Debug)]
pub struct ImageArgs {
    /// Refuse images of more pixels than this (width × height, read from the file's header before
    /// decoding), so that a small file claiming to be huge cannot exhaust memory.
    #[arg(long, value_name = "PIXELS", default_value_t = ImageLimits::DEFAULT_MAX_PIXELS, value_parser = clap::value_parser!(u64).range(1..=1 << 40))]
    pub max_pixels: u64,
}

impl ImageArgs {
    /// The decoding limits these options set.
    pub fn limits(&self) -> ImageLimits {
        ImageLimits::new(self.max_pixels)
    }
}

impl RunArgs {
    /// Resolves the device and sets up the methods' runtime (weights found, or fetched, on first use).
    pub fn runtime(&self) -> Result<Runtime> {
        let device = anomaly_device::resolve(self.device)?;
        let weights = self.weights.clone();
        let resolver = Box::new(move |name: BackboneName| weights_file(name, &weights));
        Ok(Runtime::new(device, &self.weights.weights_dir, resolver, self.batch_size, self.images.limits()))
    }
}

/// The options of the commands that run a backbone alone: which one, its weights, and where it runs.
#[derive(clap::Args)]
pub struct BackboneArgs {
    /// The ImageNet backbone.
    #[arg(long, value_enum, ignore_case = true, default_value_t = BackboneName::EfficientNetLite0)]
    pub backbone: BackboneName,
    #[command(flatten)]
    pub run: RunArgs,
}

impl BackboneArgs {
    /// Resolves the device, finds (or fetches) the weights and loads the backbone.
    pub fn extractor(&self) -> Result<Arc<Extractor>> {
        self.run.runtime()?.extractor(self.backbone)
    }
}

/// How a report is made.
#[derive(clap::Args)]
pub struct ReportArgs {
    /// Seed of the t-SNE layout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// At most this many images in the t-SNE map (an even subsample of each group beyond it); 2 to 5000,
    /// as the exact layout's memory grows with the square.
    #[arg(long, default_value_t = 2000, value_parser = count_in(2, 5000))]
    pub tsne_points: usize,
    /// Print the metrics (or, with --all, the summary) as JSON.
    #[arg(long)]
    pub json: bool,
}

impl ReportArgs {
    /// The evaluation options for a report in `report`.
    pub fn options(&self, report: PathBuf) -> anomaly_eval::EvalOptions {
        anomaly_eval::EvalOptions { report, seed: self.seed, tsne_points: self.tsne_points, save_maps: None }
    }
}
