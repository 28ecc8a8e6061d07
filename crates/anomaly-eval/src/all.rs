//! `eval --all`: every category of an MVTec AD root fitted and evaluated with one runtime (backbones load
//! once), then one summary in Markdown and JSON.

use std::path::{Path, PathBuf};

use anomaly_data::Dataset;
use anomaly_fs::ReportContent;
use anomaly_method::{MethodName, MethodSettings, Runtime, note};
use anyhow::{Context, Result};
use serde_json::json;

use crate::{EvalOptions, EvalSummary, Evaluation, ModelSource, evaluate};

/// One category's evaluation, or why it failed.
pub enum CategoryResult {
    Done(EvalSummary),
    Failed { category: String, error: String },
}

/// The summary of an `eval --all` run, as written to summary.json and summary.md.
pub struct AllSummary {
    pub json: serde_json::Value,
    pub markdown: String,
    pub categories: Vec<CategoryResult>,
}

impl AllSummary {
    /// How many categories failed.
    pub fn failed(&self) -> usize {
        self.categories.iter().filter(|c| matches!(c, CategoryResult::Failed { .. })).count()
    }
}

/// The MVTec AD categories under `root` (folders holding train/good), sorted.
pub fn mvtec_categories(root: &Path) -> Result<Vec<PathBuf>> {
    let mut folders = Vec::new();
    for entry in std::fs::read_dir(root).with_context(|| format!("listing {}", root.display()))? {
        folders.push(entry.with_context(|| format!("listing {}", root.display()))?.path());
    }
    folders.sort();
    let mut categories = Vec::new();
    for folder in folders {
        if folder.join("train").join("good").is_dir() {
            categories.push(folder);
        } else if !anomaly_data::mvtec_parts(&folder).is_empty() {
            // Part of the layout without its good training images: said, not passed over in silence.
            note!("note: skipped {}: an MVTec AD category without train/good", folder.display());
        }
    }
    anyhow::ensure!(!categories.is_empty(), "{}: no MVTec AD categories found (folders holding train/good)", root.display());
    Ok(categories)
}

impl AllSummary {
    /// Fits and evaluates `method` on every category under `root`, and returns the summary with the whole
    /// report's files: one subfolder per category, and summary.json and summary.md. A failing category is
    /// reported (on stderr and in the summary) and the others still run.
    pub fn run(
        root: &Path,
        method: MethodName,
        settings: &MethodSettings,
        runtime: &Runtime,
        options: &EvalOptions,
    ) -> Result<(Self, ReportContent)> {
        let mut categories = Vec::new();
        let mut report = ReportContent::default();
        for category in mvtec_categories(root)? {
            let name = category.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let category_options = EvalOptions { report: options.report.join(&name), ..options.clone() };
            // The category is named by its folder under the root (the report subfolder's name), even
            // when that folder is a link to one named otherwise.
            let result = Dataset::mvtec(&category)
                .map(|dataset| Dataset { name: name.clone(), ..dataset })
                .map_err(anyhow::Error::from)
                .inspect(|dataset| crate::note_skipped(&dataset.skipped))
                .and_then(|dataset| evaluate(&dataset, ModelSource::Fit { method, settings }, runtime, &category_options));
            categories.push(match result {
                Ok(Evaluation { summary, report: files }) => {
                    note!("{}", summary.describe());
                    report.nest(&name, files);
                    CategoryResult::Done(summary)
                }
                Err(error) => {
                    note!("error: {name}: {error:#}");
                    CategoryResult::Failed { category: name, error: format!("{error:#}") }
                }
            });
        }
        let label = method_label(method, settings);
        let mut summary = Self::new(root, &label, &runtime.device().describe(), categories);
        if method == MethodName::MemoryBank {
            summary.json["k"] = json!(settings.memory_bank.k);
            summary.json["features"] = json!(settings.memory_bank.features);
        }
        report.add("summary.json", serde_json::to_string_pretty(&summary.json)?);
        report.add("summary.md", summary.markdown.clone());
        Ok((summary, report))
    }

    /// The summary of finished categories: mean image AUROC over those where it is defined, and for methods
    /// with maps the pixel AUROC and AUPRO (at the images' own resolution) of each and their means.
    pub fn new(root: &Path, method: &str, device: &str, categories: Vec<CategoryResult>) -> Self {
        let done: Vec<&EvalSummary> =
            categories.iter().filter_map(|c| if let CategoryResult::Done(s) = c { Some(s) } else { None }).collect();
        let mean = |values: Vec<f64>| (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64);
        let mean_auroc = mean(done.iter().filter_map(|s| s.image_auroc).collect());
        let mean_pixel_auroc = mean(done.iter().filter_map(|s| s.pixel_auroc).collect());
        let mean_aupro = mean(done.iter().filter_map(|s| s.aupro).collect());
        let pixel_columns = mean_pixel_auroc.is_some() || mean_aupro.is_some();
        let mut json = json!({
            "root": root,
            "method": method,
            "device": device,
            "mean_image_auroc": mean_auroc,
            "categories": categories.iter().map(|c| match c {
                CategoryResult::Done(s) => serde_json::to_value(s).expect("summaries serialise"),
                CategoryResult::Failed { category, error } => json!({ "dataset": category, "error": error }),
            }).collect::<Vec<_>>(),
        });
        if pixel_columns {
            json["mean_pixel_auroc"] = json!(mean_pixel_auroc);
            json["mean_aupro"] = json!(mean_aupro);
        }
        let (pixel_head, pixel_rule, pixel_blank) =
            if pixel_columns { (" pixel AUROC | AUPRO |", "---|---|", " | |") } else { ("", "", "") };
        let mut markdown = format!(
            "# anomaly eval --all\n\n{method} on {device}; root `{}`.\n\n\
             | category | image AUROC |{pixel_head} threshold | F1 | accuracy | train | test | seconds |\n|---|---|{pixel_rule}---|---|---|---|---|---|\n",
            root.display()
        );
        let figure = |value: Option<f64>| value.map_or("undefined".to_string(), |a| format!("{a:.4}"));
        for category in &categories {
            match category {
                CategoryResult::Done(s) => {
                    let pixel = if pixel_columns { format!(" {} | {} |", figure(s.pixel_auroc), figure(s.aupro)) } else { String::new() };
                    markdown.push_str(&format!(
                        "| [{0}]({0}/metrics.json) | {1} |{pixel} {2:.4} | {3:.3} | {4:.3} | {5} | {6} | {7:.1} |\n",
                        s.dataset,
                        figure(s.image_auroc),
                        s.threshold,
                        s.f1,
                        s.accuracy,
                        s.n_train,
                        s.n_test,
                        s.timings_s.get("total").copied().unwrap_or_default()
                    ))
                }
                CategoryResult::Failed { category, error } => {
                    markdown.push_str(&format!("| {category} | failed: {} |{pixel_blank} | | | | | |\n", error.replace('|', "\\|")))
                }
            }
        }
        if let Some(mean) = mean_auroc {
            let pixel = if pixel_columns { format!(" {} | {} |", bold(mean_pixel_auroc), bold(mean_aupro)) } else { String::new() };
            markdown.push_str(&format!("| **mean** | **{mean:.4}** |{pixel} | | | | | |\n"));
        }
        Self { json, markdown, categories }
    }
}

/// A mean in bold, or nothing when there is none.
fn bold(value: Option<f64>) -> String {
    value.map_or(String::new(), |v| format!("**{v:.4}**"))
}

/// The method and its settings in words, for the summary's heading.
fn method_label(method: MethodName, settings: &MethodSettings) -> String {
    match method {
        MethodName::MemoryBank => {
            let s = &settings.memory_bank;
            format!("{} with k = {}, {} feature columns", settings.backbone, s.k, s.features)
        }
        MethodName::Patchcore => {
            let s = &settings.patchcore;
            format!("PatchCore on {}, coreset {}{}", settings.backbone, s.coreset_ratio, if s.reweight { ", reweighted" } else { "" })
        }
        MethodName::Autoencoder => format!("autoencoder {}px, latent {}", settings.autoencoder.image_size, settings.autoencoder.latent),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn done(name: &str, auroc: Option<f64>) -> CategoryResult {
        with_pixels(name, auroc, None)
    }

    fn with_pixels(name: &str, auroc: Option<f64>, pixels: Option<(f64, f64)>) -> CategoryResult {
        CategoryResult::Done(EvalSummary {
            dataset: name.into(),
            image_auroc: auroc,
            pixel_auroc: pixels.map(|p| p.0),
            aupro: pixels.map(|p| p.1),
            threshold: 1.5,
            f1: 0.5,
            accuracy: 0.75,
            n_train: 10,
            n_test: 4,
            timings_s: BTreeMap::from([("total".to_string(), 2.0)]),
            report: PathBuf::from(name),
            files: Vec::new(),
        })
    }

    #[test]
    fn the_summary_averages_defined_aurocs_and_lists_failures() {
        let categories = vec![
            done("bottle", Some(0.9)),
            done("cable", None),
            CategoryResult::Failed { category: "grid".into(), error: "a | b".into() },
            done("hazelnut", Some(0.7)),
        ];
        let summary = AllSummary::new(Path::new("/mvtec"), "m", "cpu: burn-flex", categories);
        assert_eq!(summary.failed(), 1);
        assert!((summary.json["mean_image_auroc"].as_f64().unwrap() - 0.8).abs() < 1e-12);
        assert_eq!(summary.json["categories"][2]["error"], "a | b");
        assert!(summary.markdown.contains("| [bottle](bottle/metrics.json) | 0.9000 | 1.5000 | 0.500 | 0.750 | 10 | 4 | 2.0 |"));
        assert!(summary.markdown.contains("| cable | undefined") || summary.markdown.contains("[cable](cable/metrics.json) | undefined"));
        assert!(summary.markdown.contains("| grid | failed: a \\| b |"));
        assert!(summary.markdown.contains("| **mean** | **0.8000** |"));
        assert!(!summary.markdown.contains("AUPRO") && summary.json.get("mean_aupro").is_none(), "{}", summary.markdown);
    }

    #[test]
    fn methods_with_maps_get_pixel_auroc_and_aupro_columns() {
        let categories = vec![
            with_pixels("bottle", Some(0.9), Some((0.95, 0.8))),
            with_pixels("cable", Some(0.7), Some((0.85, 0.6))),
            CategoryResult::Failed { category: "grid".into(), error: "x".into() },
        ];
        let summary = AllSummary::new(Path::new("/mvtec"), "m", "cpu", categories);
        assert!(summary.markdown.contains("| category | image AUROC | pixel AUROC | AUPRO | threshold |"), "{}", summary.markdown);
        assert!(summary.markdown.contains("| [bottle](bottle/metrics.json) | 0.9000 | 0.9500 | 0.8000 | 1.5000 |"), "{}", summary.markdown);
        assert!(summary.markdown.contains("| **mean** | **0.8000** | **0.9000** | **0.7000** |"), "{}", summary.markdown);
        assert!((summary.json["mean_aupro"].as_f64().unwrap() - 0.7).abs() < 1e-12);
        assert_eq!(summary.json["categories"][0]["aupro"], 0.8);
        // Every row has as many cells as the header.
        let cells = |line: &str| line.matches('|').count();
        let header = summary.markdown.lines().find(|l| l.starts_with("| category")).unwrap();
        assert!(summary.markdown.lines().filter(|l| l.starts_with('|')).all(|l| cells(l) == cells(header)), "{}", summary.markdown);
    }
}
