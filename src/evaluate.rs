//! Fitting a memory bank to a dataset's good images and evaluating it on its test images: the work behind
//! `fit`, `eval` and `demo`, and the report an evaluation writes (metrics.json, scores.csv, roc.png,
//! confusion.png, tsne.png, and the fitted model).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anomaly_data::{Dataset, Label, Sample, Split};
use anomaly_detector::{DetectorConfig, FeatureSource, MemoryBank, Model};
use anomaly_report::{MetricsError, PointGroup, RocPlot, TsneConfig};
use anyhow::Result;
use serde::Serialize;
use serde_json::json;

use crate::extract::Extractor;
use crate::output::write_atomic;

/// The memory bank's settings on the command line.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct DetectorArgs {
    /// Nearest bank rows an image's score averages over.
    #[arg(long, default_value_t = 50)]
    pub k: usize,
    /// Feature columns kept: those of highest std-dev across the training images.
    #[arg(long, default_value_t = 500)]
    pub features: usize,
}

impl DetectorArgs {
    pub fn config(self) -> DetectorConfig {
        DetectorConfig { k: self.k, features: self.features }
    }
}

/// Wall time per stage, in the order the stages ran.
pub struct Stopwatch {
    start: Instant,
    last: Instant,
    stages: Vec<(String, f64)>,
}

impl Stopwatch {
    pub fn start() -> Self {
        let now = Instant::now();
        Self { start: now, last: now, stages: Vec::new() }
    }

    /// Records the time since the previous lap as `stage`.
    pub fn lap(&mut self, stage: &str) {
        let now = Instant::now();
        self.stages.push((stage.to_string(), (now - self.last).as_secs_f64()));
        self.last = now;
    }

    /// Seconds per stage and in total, rounded to milliseconds.
    pub fn seconds(&self) -> BTreeMap<String, f64> {
        let round = |s: f64| (s * 1000.0).round() / 1000.0;
        let mut map: BTreeMap<String, f64> = self.stages.iter().map(|(k, v)| (k.clone(), round(*v))).collect();
        map.insert("total".into(), round(self.start.elapsed().as_secs_f64()));
        map
    }
}

/// Fits a bank to training features and records where they came from.
pub fn fit_model(extractor: &Extractor, train: &[f32], config: DetectorConfig, dataset: &str) -> Result<Model> {
    let compute = extractor.compute()?;
    let bank = MemoryBank::fit(train, extractor.name.feature_dim(), config, compute)?;
    Ok(Model::new(
        bank,
        FeatureSource {
            backbone: extractor.name.to_string(),
            weights_file: extractor.weights_name(),
            weights_sha256: extractor.weights_sha256()?.to_string(),
            preprocess: extractor.preprocess.clone(),
            dataset: dataset.to_string(),
        },
    ))
}

/// Loads the backbone a model was fitted with, refusing weights other than the model's.
pub fn extractor_for_model(
    model: &Model,
    model_path: &Path,
    weights: &crate::weights::WeightsArgs,
    device: anomaly_device::DeviceChoice,
) -> Result<Extractor> {
    let name: anomaly_backbone::BackboneName =
        model.info.backbone.parse().map_err(|e: String| anyhow::anyhow!("{}: {e}", model_path.display()))?;
    let mut extractor = Extractor::load(name, weights, device)?;
    let sha = extractor.weights_sha256()?;
    if sha != model.info.weights_sha256 {
        anyhow::bail!(
            "{}: the model was fitted with {} weights {} (sha256 {}…), but {} has sha256 {}…; put the weights it was \
             fitted with in {} or refit the model",
            model_path.display(),
            model.info.backbone,
            model.info.weights_file,
            &model.info.weights_sha256[..model.info.weights_sha256.len().min(12)],
            extractor.weights.display(),
            &sha[..12],
            weights.weights_dir.display()
        );
    }
    // The model's features were made with its own preprocessing: use exactly that.
    extractor.preprocess = model.info.preprocess.clone();
    Ok(extractor)
}

/// How the model to evaluate is had.
pub enum ModelSource {
    /// A fitted model.
    Loaded(Box<Model>),
    /// Fitted here on the dataset's train/good images, and saved into the report folder.
    Fit(DetectorConfig),
}

/// Settings of an evaluation that do not change its numbers.
pub struct EvalOptions {
    pub report: PathBuf,
    pub batch_size: usize,
    /// Seed of the t-SNE layout.
    pub seed: u64,
    /// At most this many images in the t-SNE map (a stratified subsample beyond it).
    pub tsne_points: usize,
}

/// The figures of one evaluation, as `eval --all` gathers them.
#[derive(Clone, Debug, Serialize)]
pub struct EvalSummary {
    pub dataset: String,
    pub image_auroc: Option<f64>,
    pub threshold: f64,
    pub f1: f64,
    pub accuracy: f64,
    pub n_train: usize,
    pub n_test: usize,
    pub timings_s: BTreeMap<String, f64>,
    pub report: PathBuf,
}

/// A dataset's test images, which an evaluation cannot do without.
pub fn test_samples(dataset: &Dataset) -> Result<Vec<&Sample>> {
    let test: Vec<&Sample> = dataset.split(Split::Test).collect();
    anyhow::ensure!(
        !test.is_empty(),
        "{}: no test images; eval needs test/good and test/<defect> folders (`anomaly fit` fits without testing)",
        dataset.name
    );
    Ok(test)
}

/// Scores a dataset's test images with a model (fitting it first if asked) and writes the report.
pub fn evaluate(extractor: &Extractor, dataset: &Dataset, source: ModelSource, options: &EvalOptions) -> Result<EvalSummary> {
    let mut clock = Stopwatch::start();
    let train: Vec<&Sample> = dataset.split(Split::Train).collect();
    let test = test_samples(dataset)?;
    let test_paths: Vec<PathBuf> = test.iter().map(|s| s.path.clone()).collect();
    let dim = extractor.name.feature_dim();
    let (model, test_features) = match source {
        ModelSource::Loaded(model) => {
            let features = extractor.pooled(&test_paths, options.batch_size, "test features")?;
            clock.lap("features");
            (*model, features)
        }
        ModelSource::Fit(config) => {
            // One pass over train and test keeps decoding and the forward pass overlapped throughout.
            let mut paths: Vec<PathBuf> = train.iter().map(|s| s.path.clone()).collect();
            paths.extend(test_paths.iter().cloned());
            let mut features = extractor.pooled(&paths, options.batch_size, "features")?;
            clock.lap("features");
            let test_features = features.split_off(train.len() * dim);
            let model = fit_model(extractor, &features, config, &dataset.name)?;
            clock.lap("fit");
            write_atomic(&options.report.join("model.safetensors"), &model.to_bytes())?;
            (model, test_features)
        }
    };
    let compute = extractor.compute()?;
    let scores = model.bank.scorer(compute)?.score(&test_features)?;
    clock.lap("score");
    let bank = &model.bank;
    let test_rows = bank.select(&test_features)?;
    let outcome = Outcome {
        test: &test,
        scores: scores.iter().map(|&s| s as f64).collect(),
        threshold: bank.threshold as f64,
        threshold_rule: "mean + 3 sigma (population) of the training images' leave-one-out scores; anomalous when score > threshold",
        n_train: bank.len(),
        train_scores: &model.info.train_scores,
        title: format!("{} · {} · k={} · {} features", dataset.name, model.info.backbone, bank.config.k, bank.columns.len()),
        tsne_title: "t-SNE of the kept features",
        embedding: Embedding { width: bank.columns.len(), train: &bank.rows, test: &test_rows },
        method: json!({
            "method": anomaly_detector::MEMORY_BANK,
            "backbone": model.info.backbone,
            "weights_sha256": model.info.weights_sha256,
            "device": extractor.device.describe(),
            "k": bank.config.k,
            "features": bank.columns.len(),
        }),
    };
    write_report(&dataset.name, outcome, options, clock)
}

/// Vectors of the training and test images for the t-SNE map (row-major, `width` values each).
pub struct Embedding<'a> {
    pub width: usize,
    pub train: &'a [f32],
    pub test: &'a [f32],
}

/// A method's scores of a dataset's test images and what the report needs to say about them.
pub struct Outcome<'a> {
    pub test: &'a [&'a Sample],
    pub scores: Vec<f64>,
    pub threshold: f64,
    pub threshold_rule: &'static str,
    pub n_train: usize,
    pub train_scores: &'a anomaly_detector::ScoreStats,
    /// Names the dataset, the method and its settings in the figures' titles.
    pub title: String,
    pub tsne_title: &'static str,
    pub embedding: Embedding<'a>,
    /// Method-specific fields of metrics.json (method, backbone, k, pixel AUROC, …).
    pub method: serde_json::Value,
}

/// Computes the metrics of an outcome and writes metrics.json, scores.csv, roc.png, confusion.png and
/// tsne.png into the report folder.
pub fn write_report(dataset: &str, outcome: Outcome, options: &EvalOptions, mut clock: Stopwatch) -> Result<EvalSummary> {
    let Outcome { test, scores, threshold, .. } = &outcome;
    let threshold = *threshold;
    let labels: Vec<bool> = test.iter().map(|s| s.label == Label::Defective).collect();
    let defective = labels.iter().filter(|&&l| l).count();
    let (auroc, auroc_note) = match anomaly_report::auroc(scores, &labels) {
        Ok(value) => (Some(value), None),
        Err(MetricsError::SingleClass(missing)) => (None, Some(format!("image AUROC is undefined: the test set has no {missing} images"))),
        Err(error) => return Err(error.into()),
    };
    let confusion = anomaly_report::confusion(scores, &labels, threshold)?;
    let best = anomaly_report::best_f1(scores, &labels).ok();
    let mut per_defect: BTreeMap<String, (usize, f64, usize)> = BTreeMap::new();
    for (sample, &score) in test.iter().zip(scores) {
        let entry = per_defect.entry(sample.defect.clone()).or_default();
        entry.0 += 1;
        entry.1 += score;
        entry.2 += usize::from(score > threshold);
    }
    let with_masks = test.iter().filter(|s| s.label == Label::Defective && s.mask.is_some()).count();
    clock.lap("metrics");

    let report = &options.report;
    let title = &outcome.title;
    write_atomic(&report.join("scores.csv"), scores_csv(test, scores, threshold).as_bytes())?;
    if let Some(auroc) = auroc {
        let roc = anomaly_report::roc_curve(scores, &labels)?;
        let operating_point = (confusion.fp as f64 / (confusion.fp + confusion.tn).max(1) as f64, confusion.recall());
        let png = anomaly_report::roc_png(&RocPlot { title: &format!("ROC: {title}"), roc: &roc, auroc, threshold, operating_point })?;
        write_atomic(&report.join("roc.png"), &png)?;
    }
    write_atomic(
        &report.join("confusion.png"),
        &anomaly_report::confusion_png(&format!("Confusion matrix: {dataset}"), &confusion, threshold)?,
    )?;
    clock.lap("plots");

    let groups = tsne_groups(&outcome.embedding, test, options)?;
    write_atomic(&report.join("tsne.png"), &anomaly_report::tsne_png(&format!("{}: {title}", outcome.tsne_title), &groups)?)?;
    clock.lap("tsne");

    let timings = clock.seconds();
    let mut metrics = json!({
        "dataset": dataset,
        "n_train": outcome.n_train,
        "n_test": test.len(),
        "n_test_good": test.len() - defective,
        "n_test_defective": defective,
        "image_auroc": auroc,
        "threshold": threshold,
        "threshold_rule": outcome.threshold_rule,
        "train_scores": outcome.train_scores,
        "confusion": { "tn": confusion.tn, "fp": confusion.fp, "fn": confusion.fn_, "tp": confusion.tp },
        "accuracy": confusion.accuracy(),
        "precision": confusion.precision(),
        "recall": confusion.recall(),
        "f1": confusion.f1(),
        "f1_optimal_threshold": best.as_ref().map(|b| b.threshold),
        "f1_optimal": best.as_ref().map(|b| b.f1),
        "per_defect": per_defect.iter().map(|(name, &(count, sum, detected))| {
            (name.clone(), json!({ "count": count, "mean_score": sum / count as f64, "detected": detected }))
        }).collect::<serde_json::Map<_, _>>(),
        "masks": { "defective_images": defective, "with_mask": with_masks },
        "timings_s": timings,
    });
    if let (Some(fields), Some(method)) = (metrics.as_object_mut(), outcome.method.as_object()) {
        fields.extend(method.clone());
    }
    if let Some(note) = &auroc_note {
        metrics["image_auroc_note"] = json!(note);
    }
    write_atomic(&report.join("metrics.json"), serde_json::to_string_pretty(&metrics)?.as_bytes())?;
    if let Some(note) = auroc_note {
        eprintln!("note: {dataset}: {note}");
    }
    if with_masks < defective {
        eprintln!(
            "note: {dataset}: {} of {defective} defective test images have no mask (masks are not needed for image scores)",
            defective - with_masks
        );
    }
    Ok(EvalSummary {
        dataset: dataset.to_string(),
        image_auroc: auroc,
        threshold,
        f1: confusion.f1(),
        accuracy: confusion.accuracy(),
        n_train: outcome.n_train,
        n_test: test.len(),
        timings_s: timings,
        report: report.clone(),
    })
}

/// `path,defect,label,score,verdict` per test image.
fn scores_csv(test: &[&Sample], scores: &[f64], threshold: f64) -> String {
    let mut csv = String::from("path,defect,label,score,verdict\n");
    for (sample, &score) in test.iter().zip(scores) {
        let label = if sample.label == Label::Defective { "defective" } else { "good" };
        let verdict = if score > threshold { "anomalous" } else { "good" };
        csv.push_str(&format!(
            "{},{},{label},{score:.6},{verdict}\n",
            csv_field(&sample.path.display().to_string()),
            csv_field(&sample.defect)
        ));
    }
    csv
}

/// A CSV field, quoted when it holds a comma, quote or line break.
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) { format!("\"{}\"", value.replace('"', "\"\"")) } else { value.to_string() }
}

/// The t-SNE map's groups: train good, test good, then each defect type, from the kept feature columns.
fn tsne_groups(embedding: &Embedding, test: &[&Sample], options: &EvalOptions) -> Result<Vec<PointGroup>> {
    let width = embedding.width;
    let mut names: Vec<String> = vec!["train good".into(), "test good".into()];
    let mut members: Vec<Vec<&[f32]>> = vec![embedding.train.chunks_exact(width).collect(), Vec::new()];
    for (sample, row) in test.iter().zip(embedding.test.chunks_exact(width)) {
        let name = if sample.label == Label::Good { "test good".to_string() } else { sample.defect.clone() };
        match names.iter().position(|n| *n == name) {
            Some(i) => members[i].push(row),
            None => {
                names.push(name);
                members.push(vec![row]);
            }
        }
    }
    // Keep every group's share of the map when the images exceed the budget: an even stride per group.
    let total: usize = members.iter().map(Vec::len).sum();
    if total > options.tsne_points {
        for group in &mut members {
            let keep = (group.len() * options.tsne_points / total).max(1);
            let stride = group.len() as f64 / keep as f64;
            *group = (0..keep).map(|i| group[(i as f64 * stride) as usize]).collect();
        }
    }
    if members[1].is_empty() {
        names.remove(1);
        members.remove(1);
    }
    let points: Vec<f32> = members.iter().flatten().flat_map(|row| row.iter().copied()).collect();
    let layout = anomaly_report::tsne(&points, width, &TsneConfig { seed: options.seed, ..TsneConfig::default() });
    let mut layout = layout.into_iter();
    Ok(names
        .into_iter()
        .zip(&members)
        .map(|(name, group)| PointGroup { name, points: layout.by_ref().take(group.len()).map(|[x, y]| (x, y)).collect() })
        .collect())
}

/// The report folder's files, for the closing message.
pub fn report_files(report: &Path) -> Vec<PathBuf> {
    ["metrics.json", "scores.csv", "roc.png", "confusion.png", "tsne.png", "model.safetensors"]
        .iter()
        .map(|f| report.join(f))
        .filter(|p| p.is_file())
        .collect()
}

/// A one-line human summary of an evaluation.
pub fn describe(summary: &EvalSummary) -> String {
    let auroc = summary.image_auroc.map_or("undefined".to_string(), |a| format!("{a:.4}"));
    format!(
        "{}: image AUROC {auroc}, threshold {:.4}, F1 {:.3}, accuracy {:.3} ({} train, {} test images, {:.1} s)",
        summary.dataset,
        summary.threshold,
        summary.f1,
        summary.accuracy,
        summary.n_train,
        summary.n_test,
        summary.timings_s.get("total").copied().unwrap_or_default()
    )
}
