//! Evaluations and analyses written as report folders: a model of any method scored on a dataset's test
//! images (metrics.json, scores.csv, ROC, confusion matrix, t-SNE map, pixel metrics and figures for
//! methods that localise), the `eval --all` summary, and the exploratory analysis of a dataset (`eda`).

mod all;
mod eda;
mod figures;
mod maps;
mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anomaly_data::{Dataset, Sample, Skipped, Split};
use anomaly_fs::ReportContent;
use anomaly_method::{Detector, ImageOutput, MethodName, MethodSettings, Runtime, image_progress, note};
use anyhow::Result;
use serde::Serialize;

pub use all::{AllSummary, CategoryResult, mvtec_categories};
pub use eda::analyse_dataset;
pub use maps::{BoundingBox, bounding_box, map_overlay_png, single_map_scale, write_float_tiff, write_map_overlay};
pub use report::{Outcome, build_report, per_defect, scores_csv, tsne_groups};

/// Tells the user, on stderr, what reading a dataset or a folder passed over (at most ten lines and a
/// count), so that nothing is skipped silently.
pub fn note_skipped(skipped: &[Skipped]) {
    const SHOWN: usize = 10;
    for skip in skipped.iter().take(SHOWN) {
        note!("note: {skip}");
    }
    if skipped.len() > SHOWN {
        note!("note: … and {} more skipped", skipped.len() - SHOWN);
    }
}

/// Wall time per stage, in the order the stages ran.
pub struct Stopwatch {
    start: Instant,
    last: Instant,
    stages: Vec<(String, f64)>,
}

impl Stopwatch {
    /// Starts timing now.
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

/// Settings of an evaluation that do not change its numbers.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// The report folder the caller puts the evaluation's files in (named in the summary).
    pub report: PathBuf,
    /// Seed of the t-SNE layout.
    pub seed: u64,
    /// At most this many images in the t-SNE map (a stratified subsample beyond it).
    pub tsne_points: usize,
    /// Where to save every test image's anomaly map at its original size (float TIFF and overlay PNG, in
    /// MVTec AD's evaluation layout under a folder named after the dataset), for methods with maps.
    pub save_maps: Option<PathBuf>,
}

/// How the model to evaluate is had.
pub enum ModelSource<'a> {
    /// A fitted model.
    Loaded(Box<dyn Detector>),
    /// Fitted here on the dataset's train/good images, and saved with the report.
    Fit { method: MethodName, settings: &'a MethodSettings },
}

/// The figures of one evaluation, as `eval --all` gathers them.
#[derive(Clone, Debug, Serialize)]
pub struct EvalSummary {
    pub dataset: String,
    pub image_auroc: Option<f64>,
    /// Pixel AUROC and AUPRO at the test images' own resolution, for methods with maps.
    pub pixel_auroc: Option<f64>,
    pub aupro: Option<f64>,
    pub threshold: f64,
    pub f1: f64,
    pub accuracy: f64,
    pub n_train: usize,
    pub n_test: usize,
    pub timings_s: BTreeMap<String, f64>,
    pub report: PathBuf,
    /// The report's files (names in its folder), in the order the closing message lists them.
    #[serde(skip)]
    pub files: Vec<String>,
}

impl EvalSummary {
    /// A one-line human summary.
    pub fn describe(&self) -> String {
        let auroc = self.image_auroc.map_or("undefined".to_string(), |a| format!("{a:.4}"));
        let pixel = self.pixel_auroc.map_or(String::new(), |a| format!(", pixel AUROC {a:.4}"));
        let aupro = self.aupro.map_or(String::new(), |a| format!(", AUPRO {a:.4}"));
        format!(
            "{}: image AUROC {auroc}{pixel}{aupro}, threshold {:.4}, F1 {:.3}, accuracy {:.3} ({} train, {} test images, {:.1} s)",
            self.dataset,
            self.threshold,
            self.f1,
            self.accuracy,
            self.n_train,
            self.n_test,
            self.timings_s.get("total").copied().unwrap_or_default()
        )
    }

    /// The report's files, for the closing message: this run's only, whatever the folder held before.
    pub fn files(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| self.report.join(f)).collect()
    }
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

/// An evaluation's figures, and its report's files for the caller to put in place whole
/// ([`anomaly_fs::ReportWriter::finish`]).
pub struct Evaluation {
    pub summary: EvalSummary,
    pub report: ReportContent,
}

/// Scores a dataset's test images with a model (fitting it first if asked) and makes the report's files,
/// in memory: nothing is written, so a run stopped before its end leaves no half report.
pub fn evaluate(dataset: &Dataset, source: ModelSource, runtime: &Runtime, options: &EvalOptions) -> Result<Evaluation> {
    let mut clock = Stopwatch::start();
    let mut report = ReportContent::default();
    let test = test_samples(dataset)?;
    let detector = match source {
        ModelSource::Loaded(detector) => detector,
        ModelSource::Fit { method, settings } => {
            let train: Vec<PathBuf> = dataset.split(Split::Train).map(|s| s.path.clone()).collect();
            let detector = anomaly_method::fit(method, settings, &train, &dataset.name, runtime)?;
            clock.lap("fit");
            report.add("model.safetensors", detector.to_bytes()?);
            detector
        }
    };
    let shown = figures::shown_images(&test);
    let paths: Vec<PathBuf> = test.iter().map(|s| s.path.clone()).collect();
    let progress = image_progress(paths.len(), "test images");
    let mut outputs: Vec<ImageOutput> = Vec::with_capacity(test.len());
    let mut sizes: Vec<(u32, u32)> = Vec::with_capacity(test.len());
    let mut inputs: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    anomaly_method::score_paths(detector.as_ref(), paths, runtime.batch_size(), runtime.image_limits(), |batch, batch_outputs| {
        let per_image = batch.pixels.len() / batch.len().max(1);
        for (i, output) in batch_outputs.into_iter().enumerate() {
            let index = outputs.len();
            if output.reconstruction.is_some() && shown.contains(&index) {
                inputs.insert(index, batch.pixels[i * per_image..(i + 1) * per_image].to_vec());
            }
            outputs.push(output);
        }
        sizes.extend_from_slice(&batch.original_sizes);
        progress.inc(batch.len() as u64);
        Ok(())
    })?;
    progress.finish_and_clear();
    clock.lap("score");

    let mut method = detector.report_fields();
    let maps =
        maps::TestMaps { test: &test, outputs: &outputs, sizes: &sizes, preprocess: detector.preprocess(), limits: runtime.image_limits() };
    let pixel = maps.pixel_metrics()?;
    if let Some(results) = &pixel {
        method["pixel_auroc_crop"] = serde_json::json!(results.crop_auroc);
    }
    match pixel.as_ref().map(|results| &results.at_original) {
        Some(Ok(metrics)) => {
            method["pixel_auroc"] = serde_json::json!(metrics.auroc);
            method["aupro"] = serde_json::json!(metrics.aupro);
            method["aupro_max_fpr"] = serde_json::json!(anomaly_report::AUPRO_MAX_FPR);
            method["pixel_threshold_f1"] = serde_json::json!(metrics.f1_optimal);
        }
        Some(Err(note)) => {
            for field in ["pixel_auroc", "aupro", "pixel_threshold_f1"] {
                method[field] = serde_json::Value::Null;
            }
            method["pixel_auroc_note"] = serde_json::json!(note);
        }
        None => {}
    }
    if pixel.is_some() {
        clock.lap("pixel metrics");
    }
    if outputs.iter().any(|o| o.reconstruction.is_some()) {
        let png = figures::reconstructions_png(&dataset.name, &test, &inputs, &outputs, detector.preprocess(), runtime.image_limits())?;
        report.add("reconstructions.png", png);
        clock.lap("reconstructions");
    }
    if maps.any() {
        let scale = maps.heat_scale();
        report.add("heatmaps.png", maps.heatmaps_png(&dataset.name, scale)?);
        clock.lap("heatmaps");
        if let Some(dir) = &options.save_maps {
            let saved = maps.save(dir, &dataset.name, scale)?;
            note!("{}: {saved} anomaly maps saved under {}", dataset.name, dir.join(&dataset.name).display());
            clock.lap("save maps");
        }
    } else if let Some(dir) = &options.save_maps {
        note!("note: {}: {} gives no anomaly maps; nothing saved in {}", dataset.name, detector.title(), dir.display());
    }
    let test_embedding: Vec<f32> = outputs.iter().flat_map(|o| o.embedding.iter().copied()).collect();
    let train_embedding = detector.train_embedding();
    let outcome = Outcome {
        test: &test,
        scores: outputs.iter().map(|o| o.score as f64).collect(),
        threshold: detector.threshold() as f64,
        threshold_rule: detector.threshold_rule(),
        train_scores: detector.train_scores(),
        title: format!("{} · {}", dataset.name, detector.title()),
        tsne_title: format!("t-SNE of {}", detector.embedding_name()),
        embedding_width: outputs.first().map_or(0, |o| o.embedding.len()),
        train_embedding: train_embedding.map_or(&[][..], |e| e.rows),
        test_embedding: &test_embedding,
        method,
    };
    let mut summary = build_report(&dataset.name, outcome, options, clock, &mut report)?;
    if let Some(Ok(metrics)) = pixel.map(|results| results.at_original) {
        (summary.pixel_auroc, summary.aupro) = (Some(metrics.auroc), Some(metrics.aupro));
    }
    Ok(Evaluation { summary, report })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use anomaly_data::{Batch, Preprocess, SyntheticConfig, write_synthetic_dataset};
    use anomaly_detector::ScoreStats;
    use anomaly_device::ResolvedDevice;
    use anomaly_method::{Embedding, Scorer};

    use super::*;

    /// A method in a few lines, as a new one would plug in: an image scores its pixels' largest
    /// distance from mid-grey, and its map is that distance per pixel.
    struct Brightness {
        preprocess: Preprocess,
        stats: ScoreStats,
    }

    struct BrightnessScorer;

    impl Scorer for BrightnessScorer {
        fn score(&mut self, batch: &Batch) -> Result<Vec<ImageOutput>> {
            let per_image = batch.pixels.len() / batch.len();
            Ok(batch
                .pixels
                .chunks_exact(per_image)
                .map(|image| {
                    let plane = per_image / 3;
                    let map: Vec<f32> = (0..plane).map(|p| (0..3).map(|c| (image[c * plane + p] - 0.5).abs()).sum::<f32>()).collect();
                    let score = map.iter().copied().fold(0.0, f32::max);
                    ImageOutput {
                        score,
                        embedding: vec![score, map.iter().sum::<f32>() / plane as f32],
                        map: Some(map),
                        reconstruction: None,
                    }
                })
                .collect())
        }
    }

    impl Detector for Brightness {
        fn method(&self) -> MethodName {
            MethodName::MemoryBank
        }
        fn preprocess(&self) -> &Preprocess {
            &self.preprocess
        }
        fn threshold(&self) -> f32 {
            1.0
        }
        fn threshold_rule(&self) -> &'static str {
            "fixed"
        }
        fn train_scores(&self) -> &ScoreStats {
            &self.stats
        }
        fn title(&self) -> String {
            "brightness".into()
        }
        fn describe(&self) -> String {
            "brightness".into()
        }
        fn embedding_name(&self) -> &'static str {
            "brightness"
        }
        fn report_fields(&self) -> serde_json::Value {
            serde_json::json!({ "method": "brightness" })
        }
        fn info(&self) -> serde_json::Value {
            serde_json::json!({})
        }
        fn train_embedding(&self) -> Option<Embedding<'_>> {
            None
        }
        fn device(&self) -> String {
            "cpu".into()
        }
        fn scorer(&self) -> Result<Box<dyn Scorer + '_>> {
            Ok(Box::new(BrightnessScorer))
        }
        fn to_bytes(&self) -> Result<Vec<u8>> {
            Ok(Vec::new())
        }
    }

    /// `detector` evaluated on a small synthetic dataset (40 × 40 images) in `dir`, its report written.
    fn evaluate_brightness(dir: &Path, detector: Brightness, save_maps: Option<PathBuf>) -> (Dataset, EvalSummary, EvalOptions) {
        let data = dir.join("data");
        write_synthetic_dataset(&data, &SyntheticConfig { seed: 5, size: 40, train: 3, test_good: 3, per_defect: 2 }).unwrap();
        let dataset = Dataset::mvtec(&data).unwrap();
        let device = ResolvedDevice { device: burn::tensor::Device::flex(), adapter: None };
        let runtime = Runtime::new(device, dir, Box::new(|_| anyhow::bail!("no weights needed")), 4, anomaly_data::ImageLimits::default());
        let options = EvalOptions { report: dir.join("report"), seed: 0, tsne_points: 100, save_maps };
        let Evaluation { summary, report } = evaluate(&dataset, ModelSource::Loaded(Box::new(detector)), &runtime, &options).unwrap();
        anomaly_fs::ReportWriter::start(&options.report).unwrap().finish(&report).unwrap();
        (dataset, summary, options)
    }

    fn brightness(resize: u32, crop: u32) -> Brightness {
        Brightness { preprocess: Preprocess { resize, crop, mean: [0.0; 3], std: [1.0; 3] }, stats: ScoreStats::of(&[0.5, 0.7, 0.6]) }
    }

    #[test]
    fn any_detector_is_evaluated_into_a_whole_report_with_pixel_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let (dataset, summary, options) = evaluate_brightness(dir.path(), brightness(32, 32), None);

        let test = test_samples(&dataset).unwrap();
        assert_eq!((summary.n_train, summary.n_test), (3, test.len()));
        assert!(summary.pixel_auroc.is_some_and(|a| (0.0..=1.0).contains(&a)), "{summary:?}");
        assert!(summary.aupro.is_some_and(|a| (0.0..=1.0).contains(&a)), "{summary:?}");
        assert!(summary.describe().contains(", AUPRO "), "{}", summary.describe());
        let metrics: serde_json::Value = serde_json::from_slice(&std::fs::read(options.report.join("metrics.json")).unwrap()).unwrap();
        assert_eq!(metrics["method"], "brightness");
        assert_eq!(metrics["threshold"], 1.0);
        assert_eq!(metrics["n_test"].as_u64(), Some(test.len() as u64));
        // serde_json reads numbers back to within an ulp.
        let same = |field: &str, value: Option<f64>| (metrics[field].as_f64().unwrap() - value.unwrap()).abs() < 1e-12;
        assert!(same("pixel_auroc", summary.pixel_auroc) && same("aupro", summary.aupro), "{metrics}");
        assert!(metrics["pixel_auroc_crop"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)), "{metrics}");
        let pixel_f1 = &metrics["pixel_threshold_f1"];
        assert!(pixel_f1["threshold"].is_number() && pixel_f1["f1"].as_f64().is_some_and(|f| (0.0..=1.0).contains(&f)), "{metrics}");
        let optimum = metrics["f1_optimal_threshold"].as_f64().unwrap();
        let scores: Vec<(f64, bool)> = std::fs::read_to_string(options.report.join("scores.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|line| {
                let fields: Vec<&str> = line.split(',').collect();
                (fields[3].parse().unwrap(), fields[2] == "defective")
            })
            .collect();
        // The F1-optimal image threshold's precision and recall are those of flagging the scores at or
        // above it (scores.csv rounds to 6 decimals, hence the tolerance).
        let flagged = |defective: bool| scores.iter().filter(|&&(s, d)| s >= optimum - 1e-6 && d == defective).count() as f64;
        let positives = scores.iter().filter(|&&(_, d)| d).count() as f64;
        assert!((metrics["f1_optimal_recall"].as_f64().unwrap() - flagged(true) / positives).abs() < 1e-12, "{metrics}");
        assert!(
            (metrics["f1_optimal_precision"].as_f64().unwrap() - flagged(true) / (flagged(true) + flagged(false))).abs() < 1e-12,
            "{metrics}"
        );
        let confusion = &metrics["confusion"];
        let counted: u64 = ["tn", "fp", "fn", "tp"].iter().map(|k| confusion[k].as_u64().unwrap()).sum();
        assert_eq!(counted, test.len() as u64);
        assert_eq!(scores.len(), test.len());
        let files: Vec<String> = summary.files().iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(files, ["metrics.json", "scores.csv", "roc.png", "confusion.png", "tsne.png", "heatmaps.png"]);
        let heatmaps = image::open(options.report.join("heatmaps.png")).unwrap();
        assert!(heatmaps.width() > 256 && heatmaps.height() > 256, "{:?}", (heatmaps.width(), heatmaps.height()));
    }

    #[test]
    fn saved_maps_are_the_maps_at_the_original_size_in_mvtecs_layout() {
        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join("maps");
        // Resize 32 and crop 24 of 40 × 40 images: a border of 5 original pixels lies outside the crop.
        let detector = brightness(32, 24);
        let preprocess = detector.preprocess.clone();
        let (dataset, summary, _) = evaluate_brightness(dir.path(), detector, Some(saved.clone()));
        assert!(summary.aupro.is_some(), "{summary:?}");
        let test = test_samples(&dataset).unwrap();
        for sample in &test {
            let name = sample.path.file_stem().unwrap().to_string_lossy();
            let path = saved.join("data/test").join(&sample.defect).join(format!("{name}.tiff"));
            let mut decoder = tiff::decoder::Decoder::new(std::fs::File::open(&path).unwrap()).unwrap();
            assert_eq!(decoder.dimensions().unwrap(), (40, 40), "{}", path.display());
            let tiff::decoder::DecodingResult::F32(values) = decoder.read_image().unwrap() else {
                panic!("{}: not float32", path.display())
            };
            // The brightness map of the input crop, put back onto the image.
            let input = preprocess.load(&sample.path, &anomaly_data::ImageLimits::default()).unwrap();
            let batch = Batch { paths: vec![sample.path.clone()], pixels: input.pixels, original_sizes: vec![input.original_size] };
            let map = BrightnessScorer.score(&batch).unwrap().remove(0).map.unwrap();
            assert_eq!(values, preprocess.map_to_original(&map, (40, 40)).unwrap(), "{}", path.display());
            assert!(values[..40 * 5].iter().all(|&v| v == 0.0), "outside the crop: {}", path.display());
            let overlay = image::open(path.with_extension("png")).unwrap();
            assert_eq!((overlay.width(), overlay.height()), (40, 40));
        }
    }
}
