use std::path::PathBuf;

use anomaly_data::Dataset;
use anomaly_eval::{AllSummary, EvalSummary, Evaluation, ModelSource};
use anomaly_fs::{FileBytes, MAP_FILES_ABOVE, ReportWriter};
use anomaly_method::{MethodName, MethodSettings};
use anyhow::{Context, Result};

use crate::args::{ReportArgs, RunArgs};
use crate::output::{note, out, outln};

/// `anomaly eval`.
#[derive(clap::Args)]
pub struct Args {
    /// An MVTec AD category: train/good, test/<defect>, and masks in ground_truth/ where there are any.
    #[arg(long, value_name = "CATEGORY_DIR", required_unless_present = "all")]
    data: Option<PathBuf>,
    /// Evaluate every category under an MVTec AD root (each fitted on its own train/good).
    #[arg(long, value_name = "MVTEC_ROOT", conflicts_with_all = ["data", "model"])]
    all: Option<PathBuf>,
    /// Evaluate this fitted model instead of fitting one (the method and its settings come from the model).
    #[arg(long, value_name = "FILE.safetensors", conflicts_with_all = ["backbone", "k", "features", "method"])]
    model: Option<PathBuf>,
    /// memory-bank (pooled backbone features, k nearest neighbours), patchcore (patch features in a coreset
    /// bank, anomaly maps) or autoencoder (reconstruction error).
    #[arg(long, value_enum, default_value_t)]
    method: MethodName,
    #[command(flatten)]
    settings: MethodSettings,
    #[command(flatten)]
    run: RunArgs,
    /// Folder for metrics.json, scores.csv, roc.png, confusion.png, tsne.png (and model.safetensors when
    /// fitted); with --all, one folder per category and summary.md / summary.json. Replaced whole: a new,
    /// empty or earlier report folder.
    #[arg(long, value_name = "DIR")]
    report: PathBuf,
    #[command(flatten)]
    options: ReportArgs,
    /// For methods with anomaly maps: save each test image's map at its original size as a float32 TIFF
    /// in MVTec AD's evaluation layout, DIR/<category>/test/<defect>/<name>.tiff, with an overlay PNG
    /// (<name>.png) beside it. Outside --report; files are replaced one by one.
    #[arg(long, value_name = "DIR")]
    save_maps: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    // The report folder is locked and checked before anything is read or computed.
    let writer = ReportWriter::start(&args.report)?;
    if let Some(maps) = &args.save_maps {
        check_maps_folder(maps, &args.report)?;
    }
    let options = anomaly_eval::EvalOptions { save_maps: args.save_maps.clone(), ..args.options.options(args.report.clone()) };
    if let Some(root) = &args.all {
        anomaly_method::check(args.method, &args.settings, usize::MAX)?;
        let runtime = args.run.runtime()?;
        note!("{} on {}: categories under {}", args.method, runtime.device().describe(), root.display());
        let (summary, report) = AllSummary::run(root, args.method, &args.settings, &runtime, &options)?;
        writer.finish(&report)?;
        if args.options.json {
            outln!("{}", serde_json::to_string_pretty(&summary.json)?)?;
        } else {
            out!("{}", summary.markdown)?;
            outln!("\n{}\n{}", args.report.join("summary.md").display(), args.report.join("summary.json").display())?;
        }
        let failed = summary.failed();
        anyhow::ensure!(failed == 0, "{failed} of {} categories failed (see above)", summary.categories.len());
        return Ok(());
    }
    let data = args.data.as_ref().expect("clap requires --data without --all");
    let dataset = Dataset::mvtec(data)?;
    anomaly_eval::note_skipped(&dataset.skipped);
    // Bad settings and bad model files are refused before the device starts.
    let model = match &args.model {
        Some(path) => {
            let bytes = FileBytes::open(path, MAP_FILES_ABOVE)?;
            anomaly_method::check_model_file(&bytes, path)?;
            Some((path, bytes))
        }
        None => {
            anomaly_method::check(args.method, &args.settings, dataset.split(anomaly_data::Split::Train).count())?;
            None
        }
    };
    let runtime = args.run.runtime()?;
    let source = match model {
        Some((path, bytes)) => ModelSource::Loaded(anomaly_method::load(&bytes, path, &runtime)?),
        None => ModelSource::Fit { method: args.method, settings: &args.settings },
    };
    let method = match &source {
        ModelSource::Loaded(detector) => detector.title(),
        ModelSource::Fit { method, .. } => method.to_string(),
    };
    note!("{method} on {}: {}", runtime.device().describe(), data.display());
    let Evaluation { summary, report } = anomaly_eval::evaluate(&dataset, source, &runtime, &options)?;
    writer.finish(&report)?;
    print_summary(&summary, args.options.json)
}

/// Fails before any work when `--save-maps` cannot be written, or lies inside the report folder (which
/// the report replaces whole, maps and all).
fn check_maps_folder(maps: &std::path::Path, report: &std::path::Path) -> Result<()> {
    let absolute = |path: &std::path::Path| std::path::absolute(path).with_context(|| format!("{}: resolving the path", path.display()));
    anyhow::ensure!(
        !absolute(maps)?.starts_with(absolute(report)?),
        "{}: --save-maps must be outside the --report folder {} (a report replaces its whole folder)",
        maps.display(),
        report.display()
    );
    anomaly_fs::check_folder_output(maps, "--save-maps")?;
    Ok(())
}

/// Prints an evaluation's result: the metrics file as JSON, or a line and the report's files.
pub fn print_summary(summary: &EvalSummary, json: bool) -> Result<()> {
    if json {
        let metrics = summary.report.join("metrics.json");
        out!("{}", std::fs::read_to_string(&metrics).with_context(|| format!("reading {}", metrics.display()))?)?;
        outln!()?;
    } else {
        outln!("{}", summary.describe())?;
        for file in summary.files() {
            outln!("  {}", file.display())?;
        }
    }
    Ok(())
}
