//! The options several commands share, and turning them into the libraries' runtime.

use std::path::PathBuf;
use std::sync::Arc;

use anomaly_backbone::BackboneName;
use anomaly_device::DeviceChoice;
use anomaly_method::{Extractor, Runtime};
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
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

impl RunArgs {
    /// Resolves the device and sets up the methods' runtime (weights found, or fetched, on first use).
    pub fn runtime(&self) -> Result<Runtime> {
        let device = anomaly_device::resolve(self.device)?;
        let weights = self.weights.clone();
        let resolver = Box::new(move |name: BackboneName| weights_file(name, &weights));
        Ok(Runtime::new(device, &self.weights.weights_dir, resolver, self.batch_size))
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
    /// At most this many images in the t-SNE map (an even subsample of each group beyond it).
    #[arg(long, default_value_t = 2000)]
    pub tsne_points: usize,
    /// Print the metrics (or, with --all, the summary) as JSON.
    #[arg(long)]
    pub json: bool,
}

impl ReportArgs {
    /// The evaluation options for a report in `report`.
    pub fn options(&self, report: PathBuf) -> anomaly_eval::EvalOptions {
        anomaly_eval::EvalOptions { report, seed: self.seed, tsne_points: self.tsne_points.max(2) }
    }
}
