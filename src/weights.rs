//! Finding a backbone's weights file, fetching it when it is missing.

use std::path::{Path, PathBuf};

use anomaly_backbone::BackboneName;
use anomaly_weights::{FetchOptions, WeightsError};
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

/// The weights-related options every command that runs a backbone takes.
#[derive(clap::Args, Clone, Debug)]
pub struct WeightsArgs {
    /// Folder holding the weights files; missing ones are downloaded into it.
    #[arg(long, default_value = "weights", value_name = "DIR")]
    pub weights_dir: PathBuf,
    /// Fail instead of downloading weights that are missing.
    #[arg(long)]
    pub offline: bool,
    /// A weights file to use instead of the published one: a fine-tuned (or any other) checkpoint in the
    /// same layout. Its sha256 goes into a fitted model, whose predict and eval then need the same file.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
}

/// The weights file of `backbone`, downloaded into `dir` if it is not there yet.
pub fn weights_file(backbone: BackboneName, args: &WeightsArgs) -> Result<PathBuf> {
    if let Some(file) = &args.weights {
        anyhow::ensure!(file.is_file(), "{}: no such weights file (--weights)", file.display());
        return Ok(file.clone());
    }
    let spec = anomaly_weights::find(backbone.as_str()).expect("every backbone has a catalog entry");
    let path = args.weights_dir.join(spec.file_name);
    if args.offline && !path.is_file() {
        anyhow::bail!(
            "{}: weights for {backbone} are missing; run `anomaly fetch-weights {backbone} --dir {}` or put the file there by hand",
            path.display(),
            args.weights_dir.display()
        );
    }
    fetch(backbone.as_str(), &args.weights_dir, &FetchOptions::default())
}

/// Fetches weights by catalog name with a progress bar, returning the file's path.
pub fn fetch(name: &str, dir: &Path, options: &FetchOptions) -> Result<PathBuf> {
    let spec = anomaly_weights::find(name).ok_or_else(|| WeightsError::Unknown(name.into()))?;
    let bar = ProgressBar::hidden();
    bar.set_style(ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} ({bytes_per_sec})").expect("valid progress template"));
    bar.set_message(format!("downloading {}", spec.file_name));
    let mut progress = |done: u64, total: Option<u64>| {
        if bar.is_hidden() {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        if let Some(total) = total {
            bar.set_length(total);
        }
        bar.set_position(done);
    };
    let path = anomaly_weights::ensure(spec, dir, options, &mut progress).with_context(|| format!("getting the {name} weights"))?;
    bar.finish_and_clear();
    Ok(path)
}
