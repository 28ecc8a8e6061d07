use std::path::PathBuf;

use anyhow::Result;

use crate::args::ImageArgs;
use crate::output::outln;
use anomaly_method::count_in;

/// `anomaly eda`.
#[derive(clap::Args)]
pub struct Args {
    /// An MVTec AD category, or a root holding several (each gets its own report subfolder).
    #[arg(long, value_name = "CATEGORY_DIR|MVTEC_ROOT")]
    data: PathBuf,
    /// Folder for summary.md, eda.json and the figures (replaced whole: a new, empty or earlier report folder).
    #[arg(long, value_name = "DIR")]
    report: PathBuf,
    /// Sample images per row of the sample grid.
    #[arg(long, default_value_t = 6, value_parser = count_in(1, 64))]
    samples: usize,
    #[command(flatten)]
    images: ImageArgs,
    /// Print eda.json (or, for a root, every category's) instead of the summary's path.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let writer = anomaly_fs::ReportWriter::start(&args.report)?;
    let (stats, report) = anomaly_eval::analyse_dataset(&args.data, args.samples, args.images.limits())?;
    writer.finish(&report)?;
    if args.json {
        let value = if stats.len() == 1 { stats[0].clone() } else { serde_json::json!(stats) };
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        outln!("{}", args.report.join("summary.md").display())?;
    }
    Ok(())
}
