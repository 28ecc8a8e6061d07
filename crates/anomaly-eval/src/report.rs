//! The report an evaluation writes: metrics.json, scores.csv, roc.png, confusion.png and tsne.png.

use std::collections::BTreeMap;

use anomaly_data::{Label, Sample};
use anomaly_detector::ScoreStats;
use anomaly_fs::ReportContent;
use anomaly_method::note;
use anomaly_report::{MetricsError, PointGroup, RocPlot, TsneConfig};
use anyhow::Result;
use serde_json::json;

use crate::{EvalOptions, EvalSummary, Stopwatch};

/// Every file a report may hold, in the order the closing message lists them.
const REPORT_FILES: [&str; 8] =
    ["metrics.json", "scores.csv", "roc.png", "confusion.png", "tsne.png", "reconstructions.png", "heatmaps.png", "model.safetensors"];

/// A method's scores of a dataset's test images and what the report needs to say about them.
pub struct Outcome<'a> {
    pub test: &'a [&'a Sample],
    pub scores: Vec<f64>,
    pub threshold: f64,
    pub threshold_rule: &'a str,
    pub train_scores: &'a ScoreStats,
    /// Names the dataset, the method and its settings in the figures' titles.
    pub title: String,
    pub tsne_title: String,
    /// Values per embedding row.
    pub embedding_width: usize,
    /// Training images' embeddings (row-major; empty when unknown).
    pub train_embedding: &'a [f32],
    /// Test images' embeddings, in the order of `test`.
    pub test_embedding: &'a [f32],
    /// Method-specific fields of metrics.json (method, backbone, k, pixel AUROC, …).
    pub method: serde_json::Value,
}

/// Per defect type (`good` included): images, mean score, and how many score above the threshold.
pub fn per_defect(test: &[&Sample], scores: &[f64], threshold: f64) -> BTreeMap<String, (usize, f64, usize)> {
    let mut groups: BTreeMap<String, (usize, f64, usize)> = BTreeMap::new();
    for (sample, &score) in test.iter().zip(scores) {
        let entry = groups.entry(sample.defect.clone()).or_default();
        entry.0 += 1;
        entry.1 += score;
        entry.2 += usize::from(score > threshold);
    }
    groups.values_mut().for_each(|(count, sum, _)| *sum /= *count as f64);
    groups
}

/// Computes the metrics of an outcome and adds metrics.json, scores.csv, roc.png, confusion.png and
/// tsne.png to the report (which may hold the model and reconstructions already).
pub fn build_report(
    dataset: &str,
    outcome: Outcome,
    options: &EvalOptions,
    mut clock: Stopwatch,
    report: &mut ReportContent,
) -> Result<EvalSummary> {
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
    let groups = per_defect(test, scores, threshold);
    let with_masks = test.iter().filter(|s| s.label == Label::Defective && s.mask.is_some()).count();
    clock.lap("metrics");

    let title = &outcome.title;
    report.add("scores.csv", scores_csv(test, scores, threshold));
    if let Some(auroc) = auroc {
        let roc = anomaly_report::roc_curve(scores, &labels)?;
        let operating_point = (confusion.fp as f64 / (confusion.fp + confusion.tn).max(1) as f64, confusion.recall());
        let png = anomaly_report::roc_png(&RocPlot { title: &format!("ROC: {title}"), roc: &roc, auroc, threshold, operating_point })?;
        report.add("roc.png", png);
    }
    report.add("confusion.png", anomaly_report::confusion_png(&format!("Confusion matrix: {dataset}"), &confusion, threshold)?);
    clock.lap("plots");

    let groups_tsne = tsne_groups(outcome.embedding_width, outcome.train_embedding, outcome.test_embedding, test, options);
    report.add("tsne.png", anomaly_report::tsne_png(&format!("{}: {title}", outcome.tsne_title), &groups_tsne)?);
    clock.lap("tsne");

    let timings = clock.seconds();
    let mut metrics = json!({
        "dataset": dataset,
        "n_train": outcome.train_scores.count,
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
        "f1_optimal_precision": best.as_ref().map(|b| b.precision),
        "f1_optimal_recall": best.as_ref().map(|b| b.recall),
        "per_defect": groups.iter().map(|(name, &(count, mean, detected))| {
            (name.clone(), json!({ "count": count, "mean_score": mean, "detected": detected }))
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
    report.add("metrics.json", serde_json::to_string_pretty(&metrics)?);
    if let Some(note) = auroc_note {
        note!("note: {dataset}: {note}");
    }
    if with_masks < defective {
        note!(
            "note: {dataset}: {} of {defective} defective test images have no mask (masks are not needed for image scores)",
            defective - with_masks
        );
    }
    Ok(EvalSummary {
        dataset: dataset.to_string(),
        image_auroc: auroc,
        pixel_auroc: None,
        aupro: None,
        threshold,
        f1: confusion.f1(),
        accuracy: confusion.accuracy(),
        n_train: outcome.train_scores.count,
        n_test: test.len(),
        timings_s: timings,
        report: options.report.clone(),
        files: REPORT_FILES.iter().filter(|f| report.contains(f)).map(|f| f.to_string()).collect(),
    })
}

/// `path,defect,label,score,verdict` per test image, paths quoted as CSV needs.
pub fn scores_csv(test: &[&Sample], scores: &[f64], threshold: f64) -> String {
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

/// The t-SNE map's groups: train good, test good, then each defect type in order of appearance; beyond
/// `options.tsne_points` images, an even stride within each group keeps every group's share.
pub fn tsne_groups(width: usize, train: &[f32], test_rows: &[f32], test: &[&Sample], options: &EvalOptions) -> Vec<PointGroup> {
    if width == 0 {
        return Vec::new();
    }
    let mut names: Vec<String> = vec!["train good".into(), "test good".into()];
    let mut members: Vec<Vec<&[f32]>> = vec![train.chunks_exact(width).collect(), Vec::new()];
    for (sample, row) in test.iter().zip(test_rows.chunks_exact(width)) {
        let name = if sample.label == Label::Good { "test good".to_string() } else { sample.defect.clone() };
        match names.iter().position(|n| *n == name) {
            Some(i) => members[i].push(row),
            None => {
                names.push(name);
                members.push(vec![row]);
            }
        }
    }
    let total: usize = members.iter().map(Vec::len).sum();
    let budget = options.tsne_points.max(2);
    if total > budget {
        for group in &mut members {
            let keep = (group.len() * budget / total).max(1).min(group.len());
            let stride = group.len() as f64 / keep as f64;
            *group = (0..keep).map(|i| group[(i as f64 * stride) as usize]).collect();
        }
    }
    // Groups with no image (no training embeddings, no good test images) are left out of the legend.
    let (names, members): (Vec<String>, Vec<Vec<&[f32]>>) = names.into_iter().zip(members).filter(|(_, m)| !m.is_empty()).unzip();
    let points: Vec<f32> = members.iter().flatten().flat_map(|row| row.iter().copied()).collect();
    let layout = anomaly_report::tsne(&points, width, &TsneConfig { seed: options.seed, ..TsneConfig::default() });
    let mut layout = layout.into_iter();
    names
        .into_iter()
        .zip(&members)
        .map(|(name, group)| PointGroup { name, points: layout.by_ref().take(group.len()).map(|[x, y]| (x, y)).collect() })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use anomaly_data::Split;

    use super::*;

    fn sample(path: &str, defect: &str) -> Sample {
        let label = if defect == "good" { Label::Good } else { Label::Defective };
        Sample { path: PathBuf::from(path), split: Split::Test, label, defect: defect.into(), mask: None }
    }

    #[test]
    fn scores_csv_quotes_fields_that_need_it_and_gives_verdicts() {
        let test = [sample("a/good,1.png", "good"), sample("b/\"x\".png", "cut")];
        let refs: Vec<&Sample> = test.iter().collect();
        let csv = scores_csv(&refs, &[0.5, 2.0], 1.0);
        assert_eq!(
            csv,
            "path,defect,label,score,verdict\n\"a/good,1.png\",good,good,0.500000,good\n\"b/\"\"x\"\".png\",cut,defective,2.000000,anomalous\n"
        );
    }

    #[test]
    fn per_defect_counts_means_and_detections() {
        let test = [sample("1", "good"), sample("2", "cut"), sample("3", "cut")];
        let refs: Vec<&Sample> = test.iter().collect();
        let groups = per_defect(&refs, &[0.5, 2.0, 0.9], 1.0);
        assert_eq!(groups["good"], (1, 0.5, 0));
        assert_eq!(groups["cut"].0, 2);
        assert!((groups["cut"].1 - 1.45).abs() < 1e-12);
        assert_eq!(groups["cut"].2, 1);
    }

    #[test]
    fn tsne_groups_keep_every_group_and_its_share_within_the_budget() {
        let options = EvalOptions { report: PathBuf::new(), seed: 0, tsne_points: 10, save_maps: None };
        let train: Vec<f32> = (0..40).map(|i| i as f32).collect(); // 20 rows of 2
        let test = [sample("1", "good"), sample("2", "cut"), sample("3", "cut"), sample("4", "hole")];
        let refs: Vec<&Sample> = test.iter().collect();
        let rows: Vec<f32> = (0..8).map(|i| 100.0 + i as f32).collect();
        let groups = tsne_groups(2, &train, &rows, &refs, &options);
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["train good", "test good", "cut", "hole"]);
        let sizes: Vec<usize> = groups.iter().map(|g| g.points.len()).collect();
        assert_eq!(sizes, [8, 1, 1, 1]);
        // Without training embeddings (a loaded autoencoder), the empty group is left out.
        let groups = tsne_groups(2, &[], &rows, &refs, &options);
        assert_eq!(groups[0].name, "test good");
    }
}
