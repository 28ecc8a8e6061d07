use std::path::{Path, PathBuf};

use anomaly_data::Dataset;
use anomaly_detector::Model;
use anyhow::{Context, Result};

use crate::autoencode::{AutoencoderArgs, AutoencoderSource, Method};
use crate::evaluate::{DetectorArgs, EvalOptions, EvalSummary, ModelSource, describe, evaluate, extractor_for_model, report_files};
use crate::extract::{BackboneArgs, Extractor};
use crate::output::write_atomic;

/// `anomaly eval`.
#[derive(clap::Args)]
pub struct Args {
    /// An MVTec AD category: train/good, test/<defect>, and masks in ground_truth/ where there are any.
    #[arg(long, value_name = "CATEGORY_DIR", required_unless_present = "all")]
    data: Option<PathBuf>,
    /// Evaluate every category under an MVTec AD root (each fitted on its own train/good).
    #[arg(long, value_name = "MVTEC_ROOT", conflicts_with_all = ["data", "model"])]
    all: Option<PathBuf>,
    /// Evaluate this fitted model instead of fitting one (the backbone and k come from the model).
    #[arg(long, value_name = "FILE.safetensors", conflicts_with_all = ["backbone", "k", "features"])]
    model: Option<PathBuf>,
    #[command(flatten)]
    backbone: BackboneArgs,
    #[command(flatten)]
    detector: DetectorArgs,
    /// memory-bank (backbone features, k nearest neighbours) or autoencoder (reconstruction error);
    /// with --model, the model file says.
    #[arg(long, value_enum, default_value = "memory-bank", conflicts_with = "model")]
    method: Method,
    #[command(flatten)]
    autoencoder: AutoencoderArgs,
    /// Folder for metrics.json, scores.csv, roc.png, confusion.png, tsne.png (and model.safetensors when
    /// fitted); with --all, one folder per category and summary.md / summary.json.
    #[arg(long, value_name = "DIR")]
    report: PathBuf,
    #[command(flatten)]
    options: ReportArgs,
}

/// How a report is made.
#[derive(clap::Args)]
pub struct ReportArgs {
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
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
    pub fn options(&self, report: &Path) -> EvalOptions {
        EvalOptions { report: report.to_path_buf(), batch_size: self.batch_size, seed: self.seed, tsne_points: self.tsne_points.max(2) }
    }
}

pub fn run(args: Args) -> Result<()> {
    if let Some(root) = &args.all {
        return run_all(root, &args);
    }
    let data = args.data.as_ref().expect("clap requires --data without --all");
    let dataset = Dataset::mvtec(data)?;
    let options = args.options.options(&args.report);
    let (extractor, source) = match &args.model {
        Some(path) => {
            // One read of the file: its header says which method's loader parses the rest.
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            if anomaly_detector::read_model_header(&bytes, path)?.method == anomaly_autoencoder::AUTOENCODER {
                let device = anomaly_device::resolve(args.backbone.device)?;
                let model = anomaly_autoencoder::AutoencoderModel::from_bytes(&bytes, path, &device.device)?;
                eprintln!("autoencoder on {}: {}", device.describe(), data.display());
                let summary = crate::autoencode::evaluate(&dataset, AutoencoderSource::Loaded(Box::new(model)), &device, &options)?;
                return print_summary(&summary, args.options.json);
            }
            let model = Model::from_bytes(&bytes, path)?;
            let extractor = extractor_for_model(&model, path, &args.backbone.weights, args.backbone.device)?;
            (extractor, ModelSource::Loaded(Box::new(model)))
        }
        None if args.method == Method::Autoencoder => {
            let device = anomaly_device::resolve(args.backbone.device)?;
            eprintln!("autoencoder on {}: {}", device.describe(), data.display());
            let summary = crate::autoencode::evaluate(&dataset, AutoencoderSource::Fit(args.autoencoder.clone()), &device, &options)?;
            return print_summary(&summary, args.options.json);
        }
        None => {
            let config = args.detector.config();
            config.check(dataset.split(anomaly_data::Split::Train).count())?;
            (Extractor::new(&args.backbone)?, ModelSource::Fit(config))
        }
    };
    eprintln!("{} on {}: {}", extractor.name, extractor.device.describe(), data.display());
    let summary = evaluate(&extractor, &dataset, source, &options)?;
    print_summary(&summary, args.options.json)
}

/// Prints an evaluation's result: the metrics file as JSON, or a line and the report's files.
pub fn print_summary(summary: &EvalSummary, json: bool) -> Result<()> {
    if json {
        let metrics = summary.report.join("metrics.json");
        print!("{}", std::fs::read_to_string(&metrics).with_context(|| format!("reading {}", metrics.display()))?);
        println!();
    } else {
        println!("{}", describe(summary));
        for file in report_files(&summary.report) {
            println!("  {}", file.display());
        }
    }
    Ok(())
}

/// `eval --all`: every category under the root, one backbone load, one summary (markdown + JSON).
fn run_all(root: &Path, args: &Args) -> Result<()> {
    let mut categories: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("listing {}", root.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.join("train").join("good").is_dir())
        .collect();
    categories.sort();
    anyhow::ensure!(!categories.is_empty(), "{}: no MVTec AD categories found (folders holding train/good)", root.display());
    let config = args.detector.config();
    let autoencoder = args.method == Method::Autoencoder;
    let (extractor, device) = if autoencoder {
        (None, anomaly_device::resolve(args.backbone.device)?)
    } else {
        let extractor = Extractor::new(&args.backbone)?;
        let device = extractor.device.clone();
        (Some(extractor), device)
    };
    let method_name = match &extractor {
        Some(extractor) => extractor.name.to_string(),
        None => format!("autoencoder {}px, latent {}", args.autoencoder.image_size, args.autoencoder.latent),
    };
    eprintln!("{method_name} on {}: {} categories under {}", device.describe(), categories.len(), root.display());
    let mut rows: Vec<Result<EvalSummary, (String, String)>> = Vec::new();
    for category in &categories {
        let name = category.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let result = Dataset::mvtec(category).map_err(anyhow::Error::from).and_then(|dataset| {
            let options = args.options.options(&args.report.join(&name));
            match &extractor {
                Some(extractor) => {
                    config.check(dataset.split(anomaly_data::Split::Train).count())?;
                    evaluate(extractor, &dataset, ModelSource::Fit(config), &options)
                }
                None => crate::autoencode::evaluate(&dataset, AutoencoderSource::Fit(args.autoencoder.clone()), &device, &options),
            }
        });
        match result {
            Ok(summary) => {
                eprintln!("{}", describe(&summary));
                rows.push(Ok(summary));
            }
            Err(error) => {
                eprintln!("error: {name}: {error:#}");
                rows.push(Err((name, format!("{error:#}"))));
            }
        }
    }
    let aurocs: Vec<f64> = rows.iter().filter_map(|r| r.as_ref().ok().and_then(|s| s.image_auroc)).collect();
    let mean_auroc = (!aurocs.is_empty()).then(|| aurocs.iter().sum::<f64>() / aurocs.len() as f64);
    let summary = serde_json::json!({
        "root": root,
        "method": method_name,
        "device": device.describe(),
        "k": (!autoencoder).then_some(config.k),
        "features": (!autoencoder).then_some(config.features),
        "mean_image_auroc": mean_auroc,
        "categories": rows.iter().map(|row| match row {
            Ok(s) => serde_json::to_value(s).expect("summaries serialise"),
            Err((name, error)) => serde_json::json!({ "dataset": name, "error": error }),
        }).collect::<Vec<_>>(),
    });
    let mut markdown = format!(
        "# anomaly eval --all\n\n{}{} on {}; root `{}`.\n\n\
         | category | image AUROC | threshold | F1 | accuracy | train | test | seconds |\n|---|---|---|---|---|---|---|---|\n",
        method_name,
        if autoencoder { String::new() } else { format!(" with k = {}, {} feature columns", config.k, config.features) },
        device.describe(),
        root.display()
    );
    for row in &rows {
        match row {
            Ok(s) => markdown.push_str(&format!(
                "| [{0}]({0}/metrics.json) | {1} | {2:.4} | {3:.3} | {4:.3} | {5} | {6} | {7:.1} |\n",
                s.dataset,
                s.image_auroc.map_or("undefined".into(), |a| format!("{a:.4}")),
                s.threshold,
                s.f1,
                s.accuracy,
                s.n_train,
                s.n_test,
                s.timings_s.get("total").copied().unwrap_or_default()
            )),
            Err((name, error)) => markdown.push_str(&format!("| {name} | failed: {} | | | | | | |\n", error.replace('|', "\\|"))),
        }
    }
    if let Some(mean) = mean_auroc {
        markdown.push_str(&format!("| **mean** | **{mean:.4}** | | | | | | |\n"));
    }
    let report = &args.report;
    write_atomic(&report.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    write_atomic(&report.join("summary.md"), markdown.as_bytes())?;
    if args.options.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{markdown}");
        println!("\n{}\n{}", report.join("summary.md").display(), report.join("summary.json").display());
    }
    let failed = rows.iter().filter(|r| r.is_err()).count();
    anyhow::ensure!(failed == 0, "{failed} of {} categories failed (see above)", rows.len());
    Ok(())
}
