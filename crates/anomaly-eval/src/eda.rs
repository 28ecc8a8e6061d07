//! The exploratory analysis of a dataset (`anomaly eda`): counts, sizes, colour modes, channel
//! statistics, defect areas and regions from the masks, luminance histograms and a sample grid, written
//! as summary.md, eda.json and figures.

use std::collections::BTreeMap;
use std::path::Path;

use anomaly_data::{Dataset, HISTOGRAM_BINS, ImageLimits, ImageStats, Label, Sample, Split, image_stats, load_mask, load_rgb8};
use anomaly_fs::ReportContent;
use anomaly_method::image_progress;
use anomaly_report::{GridImage, defect_area_png, histogram_png, sample_grid_png};
use anyhow::Result;
use rayon::prelude::*;
use serde_json::json;

use crate::Stopwatch;

/// Analyses an MVTec AD category, or every category of a root (each in its own subfolder of the report,
/// with an index summary.md), and returns each category's eda.json and the report's files. Each image is
/// decoded within `limits`.
pub fn analyse_dataset(data: &Path, per_row: usize, limits: ImageLimits) -> Result<(Vec<serde_json::Value>, ReportContent)> {
    let mut report = ReportContent::default();
    if data.join("train").join("good").is_dir() {
        let stats = category(&open_category(data)?, &mut report, per_row, limits)?;
        return Ok((vec![stats], report));
    }
    let roots = crate::mvtec_categories(data)
        .map_err(|_| anyhow::anyhow!("{}: neither an MVTec AD category (no train/good) nor a root holding categories", data.display()))?;
    let mut all = Vec::new();
    let mut index = String::from(
        "# Dataset analysis\n\n| category | train | test good | test defective | defect types | report |\n|---|---|---|---|---|---|\n",
    );
    for root in &roots {
        let dataset = open_category(root)?;
        let mut files = ReportContent::default();
        let stats = category(&dataset, &mut files, per_row, limits)?;
        report.nest(&dataset.name, files);
        index.push_str(&format!(
            "| {0} | {1} | {2} | {3} | {4} | [{0}/summary.md]({0}/summary.md) |\n",
            dataset.name, stats["n_train"], stats["n_test_good"], stats["n_test_defective"], stats["defect_types"]
        ));
        all.push(stats);
    }
    report.add("summary.md", index);
    Ok((all, report))
}

/// An MVTec AD category, with a note of what reading it passed over.
fn open_category(root: &Path) -> Result<Dataset> {
    let dataset = Dataset::mvtec(root)?;
    crate::note_skipped(&dataset.skipped);
    Ok(dataset)
}

/// Analyses one category and adds its summary.md, eda.json and figures to `report`.
fn category(dataset: &Dataset, report: &mut ReportContent, per_row: usize, limits: ImageLimits) -> Result<serde_json::Value> {
    let mut clock = Stopwatch::start();
    let progress = image_progress(dataset.samples.len(), &format!("eda {}", dataset.name));
    let measured: Vec<ImageStats> = dataset
        .samples
        .par_iter()
        .map(|sample| {
            let stats = image_stats(sample, &limits);
            progress.inc(1);
            stats
        })
        .collect::<Result<_, _>>()?;
    progress.finish_and_clear();
    clock.lap("decode");

    // Keyed by split first (train before test), then type.
    let group = |s: &Sample| (if s.split == Split::Train { "1 train" } else { "2 test" }, s.defect.clone());
    let mut counts: BTreeMap<(&str, String), (usize, usize)> = BTreeMap::new();
    let mut sizes: BTreeMap<String, usize> = BTreeMap::new();
    let mut modes: BTreeMap<String, usize> = BTreeMap::new();
    let mut areas: BTreeMap<String, Vec<(f64, usize)>> = BTreeMap::new();
    let (mut sum, mut sum_sq, mut pixels) = ([0.0f64; 3], [0.0f64; 3], 0u64);
    let mut histograms = [[0u64; HISTOGRAM_BINS]; 2];
    for (sample, stats) in dataset.samples.iter().zip(&measured) {
        let entry = counts.entry(group(sample)).or_default();
        entry.0 += 1;
        entry.1 += usize::from(sample.mask.is_some());
        *sizes.entry(format!("{}×{}", stats.width, stats.height)).or_default() += 1;
        *modes.entry(stats.color.clone()).or_default() += 1;
        for c in 0..3 {
            sum[c] += stats.channel_sum[c];
            sum_sq[c] += stats.channel_sum_sq[c];
        }
        pixels += stats.pixels;
        let defective = usize::from(sample.label == Label::Defective);
        for (total, count) in histograms[defective].iter_mut().zip(stats.histogram) {
            *total += count;
        }
        if let Some(defect) = stats.defect {
            areas.entry(sample.defect.clone()).or_default().push((100.0 * defect.fraction, defect.regions));
        }
    }
    let mean: [f64; 3] = std::array::from_fn(|c| sum[c] / pixels.max(1) as f64);
    let std: [f64; 3] = std::array::from_fn(|c| (sum_sq[c] / pixels.max(1) as f64 - mean[c] * mean[c]).max(0.0).sqrt());
    let count_of = |split: &str, good: bool| {
        counts.iter().filter(|((s, d), _)| s.ends_with(split) && (d == "good") == good).map(|(_, (n, _))| n).sum::<usize>()
    };
    let defect_types: Vec<&String> = counts.keys().filter(|(s, d)| s.ends_with("test") && d != "good").map(|(_, d)| d).collect();

    let mut figures = Vec::new();
    let normalised = |h: &[u64; HISTOGRAM_BINS]| {
        let total = h.iter().sum::<u64>().max(1) as f64;
        h.iter().map(|&c| c as f64 / total).collect::<Vec<f64>>()
    };
    let mut series = vec![("good".to_string(), normalised(&histograms[0]))];
    if histograms[1].iter().any(|&c| c > 0) {
        series.push(("defective".to_string(), normalised(&histograms[1])));
    }
    report.add("histograms.png", histogram_png(&format!("Luminance: {}", dataset.name), &series)?);
    figures.push("histograms.png");
    if !areas.is_empty() {
        let groups: Vec<(String, Vec<f64>)> =
            areas.iter().map(|(name, a)| (name.clone(), a.iter().map(|(area, _)| *area).collect())).collect();
        report.add("defect_area.png", defect_area_png(&format!("Defect area per type: {}", dataset.name), &groups)?);
        figures.push("defect_area.png");
    }
    report.add("samples.png", sample_grid(dataset, per_row, limits)?);
    figures.push("samples.png");
    clock.lap("figures");

    let area_stats: serde_json::Map<String, serde_json::Value> = areas
        .iter()
        .map(|(name, values)| {
            let mut sorted: Vec<f64> = values.iter().map(|(a, _)| *a).collect();
            sorted.sort_by(f64::total_cmp);
            let n = sorted.len() as f64;
            let regions = values.iter().map(|(_, r)| *r as f64).sum::<f64>() / n;
            (
                name.clone(),
                json!({
                    "masks": sorted.len(),
                    "mean_area_percent": sorted.iter().sum::<f64>() / n,
                    "median_area_percent": sorted[sorted.len() / 2],
                    "min_area_percent": sorted[0],
                    "max_area_percent": sorted[sorted.len() - 1],
                    "mean_regions": regions,
                }),
            )
        })
        .collect();
    let stats = json!({
        "dataset": dataset.name,
        "n_train": count_of("train", true),
        "n_test_good": count_of("test", true),
        "n_test_defective": count_of("test", false),
        "defect_types": defect_types.len(),
        "counts": counts.iter().map(|((split, defect), (n, masks))| json!({ "split": &split[2..], "type": defect, "images": n, "masks": masks })).collect::<Vec<_>>(),
        "sizes": sizes,
        "color_modes": modes,
        "channel_mean": mean,
        "channel_std": std,
        "defect_area": area_stats,
        "luminance_histogram_bins": HISTOGRAM_BINS,
        "figures": figures,
        "timings_s": clock.seconds(),
    });
    report.add("eda.json", serde_json::to_string_pretty(&stats)?);
    report.add("summary.md", summary_markdown(&stats));
    Ok(stats)
}

/// Evenly spaced samples of the training images and of each test type, masks outlined.
fn sample_grid(dataset: &Dataset, per_row: usize, limits: ImageLimits) -> Result<Vec<u8>> {
    let mut groups: Vec<(String, Vec<&Sample>)> = vec![("train good".into(), dataset.split(Split::Train).collect())];
    for sample in dataset.split(Split::Test) {
        let name = if sample.label == Label::Good { "test good".to_string() } else { sample.defect.clone() };
        match groups.iter_mut().find(|(n, _)| *n == name) {
            Some((_, members)) => members.push(sample),
            None => groups.push((name, vec![sample])),
        }
    }
    let rows = groups
        .into_iter()
        .map(|(name, members)| {
            let keep = members.len().min(per_row.max(1));
            let picked: Vec<&Sample> = (0..keep).map(|i| members[i * members.len() / keep]).collect();
            let images = picked
                .par_iter()
                .map(|s| {
                    let mask = s.mask.as_deref().map(|mask| load_mask(mask, &limits)).transpose()?;
                    Ok(GridImage { image: load_rgb8(&s.path, &limits)?, mask, caption: String::new() })
                })
                .collect::<Result<Vec<_>, anomaly_data::DataError>>()?;
            Ok((name, images))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(sample_grid_png(&format!("Samples: {} (mask outlines in red)", dataset.name), &rows)?)
}

fn summary_markdown(stats: &serde_json::Value) -> String {
    let mut md = format!(
        "# Dataset: {}\n\n## Images\n\n| split | type | images | masks |\n|---|---|---|---|\n",
        stats["dataset"].as_str().unwrap_or("")
    );
    for row in stats["counts"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            row["split"].as_str().unwrap_or(""),
            row["type"].as_str().unwrap_or(""),
            row["images"],
            row["masks"]
        ));
    }
    md.push_str("\n## Sizes and colour modes\n\n| size | images |\n|---|---|\n");
    for (size, n) in stats["sizes"].as_object().into_iter().flatten() {
        md.push_str(&format!("| {size} | {n} |\n"));
    }
    md.push_str("\n| colour mode in the file | images |\n|---|---|\n");
    for (mode, n) in stats["color_modes"].as_object().into_iter().flatten() {
        md.push_str(&format!("| {mode} | {n} |\n"));
    }
    md.push_str("\n## Channels (RGB scaled to [0, 1], over all pixels)\n\n| channel | mean | std |\n|---|---|---|\n");
    for (c, name) in ["red", "green", "blue"].iter().enumerate() {
        md.push_str(&format!(
            "| {name} | {:.4} | {:.4} |\n",
            stats["channel_mean"][c].as_f64().unwrap_or(0.0),
            stats["channel_std"][c].as_f64().unwrap_or(0.0)
        ));
    }
    let areas = stats["defect_area"].as_object();
    if areas.is_some_and(|a| !a.is_empty()) {
        md.push_str("\n## Defect area (from the masks)\n\n| type | masks | mean % | median % | min % | max % | mean regions |\n|---|---|---|---|---|---|---|\n");
        for (name, a) in areas.into_iter().flatten() {
            let f = |k: &str| a[k].as_f64().unwrap_or(0.0);
            md.push_str(&format!(
                "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                a["masks"],
                f("mean_area_percent"),
                f("median_area_percent"),
                f("min_area_percent"),
                f("max_area_percent"),
                f("mean_regions")
            ));
        }
        md.push_str("\n![Defect area per type](defect_area.png)\n");
    }
    md.push_str("\n## Luminance of good and defective images\n\n![Luminance histograms](histograms.png)\n\n## Samples\n\n![Samples with mask outlines](samples.png)\n");
    md
}

#[cfg(test)]
mod tests {
    use anomaly_data::{SyntheticConfig, write_synthetic_dataset};

    use super::*;

    #[test]
    fn a_category_is_counted_measured_and_written() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let config = SyntheticConfig { seed: 3, size: 48, train: 4, test_good: 2, per_defect: 1 };
        write_synthetic_dataset(&data, &config).unwrap();
        let (stats, report) = analyse_dataset(&data, 3, ImageLimits::default()).unwrap();
        let stats = &stats[0];
        assert_eq!((stats["n_train"].as_u64(), stats["n_test_good"].as_u64()), (Some(4), Some(2)));
        let types = stats["defect_types"].as_u64().unwrap() as usize;
        assert!(types >= 2, "{stats}");
        assert_eq!(stats["n_test_defective"].as_u64(), Some(types as u64));
        assert_eq!(stats["sizes"]["48×48"].as_u64(), Some(6 + types as u64));
        for (name, area) in stats["defect_area"].as_object().unwrap() {
            let mean = area["mean_area_percent"].as_f64().unwrap();
            assert!(mean > 0.0 && mean < 100.0, "{name}: {area}");
            assert!(area["mean_regions"].as_f64().unwrap() >= 1.0, "{name}: {area}");
        }
        for c in 0..3 {
            let (mean, std) = (stats["channel_mean"][c].as_f64().unwrap(), stats["channel_std"][c].as_f64().unwrap());
            assert!((0.0..=1.0).contains(&mean) && std > 0.0);
        }
        for file in ["summary.md", "eda.json", "histograms.png", "defect_area.png", "samples.png"] {
            assert!(report.contains(file), "{file}");
        }
        let folder = dir.path().join("report");
        anomaly_fs::ReportWriter::start(&folder).unwrap().finish(&report).unwrap();
        let markdown = std::fs::read_to_string(folder.join("summary.md")).unwrap();
        assert!(markdown.contains("| train | good | 4 | 0 |"), "{markdown}");
    }
}
