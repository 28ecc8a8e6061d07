//! The `anomaly` binary end to end: features files, devices, and bad input failing with one clear line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::{fixture, lite0_weights, read_safetensors};

pub(crate) fn anomaly(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_anomaly")).args(args).output().expect("the anomaly binary runs")
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The folder holding the real Lite0 weights (fetched on first use).
pub(crate) fn weights_dir() -> PathBuf {
    lite0_weights().parent().unwrap().to_path_buf()
}

pub(crate) fn write_png(path: &Path, seed: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_fn(300, 260, |x, y| image::Rgb([(x as u8).wrapping_mul(seed), y as u8, seed])).save(path).unwrap();
}

/// Runs `features` and expects failure with a single `error:` line containing `needle`.
fn expect_one_line_error(args: &[&str], needle: &str) {
    let output = anomaly(args);
    let message = stderr(&output);
    assert!(!output.status.success(), "should fail: {args:?}");
    let lines: Vec<&str> = message.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line: {message}");
    assert!(lines[0].contains(needle), "'{needle}' named in: {message}");
}

#[test]
fn features_are_saved_with_paths_and_taps() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("images/a.png"), 3);
    write_png(&dir.path().join("images/b.png"), 5);
    let out = dir.path().join("out/features.safetensors");
    let weights = weights_dir();
    let output = anomaly(&[
        "features",
        "--backbone",
        "efficientnet-lite0",
        "--device",
        "cpu",
        "--offline",
        "--weights-dir",
        weights.to_str().unwrap(),
        "--data",
        dir.path().join("images").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--taps",
        "block4",
        "--batch-size",
        "1",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let tensors = read_safetensors(&out);
    assert_eq!(tensors["pooled"].shape, vec![2, 1280]);
    assert_eq!(tensors["tap.block4"].shape, vec![2, 40, 28, 28]);
    assert!(tensors["pooled"].values.iter().all(|v| v.is_finite()));
    assert!(tensors["pooled"].values.iter().any(|v| *v != 0.0));
    let bytes = std::fs::read(&out).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = metadata.metadata().clone().unwrap();
    let paths: Vec<String> = serde_json::from_str(&metadata["paths"]).unwrap();
    assert!(paths[0].ends_with("a.png") && paths[1].ends_with("b.png"));
    assert_eq!(metadata["backbone"], "efficientnet-lite0");
}

#[test]
fn bad_images_and_folders_fail_with_one_line_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let weights = weights_dir();
    let weights = weights.to_str().unwrap();
    let run = |data: &Path, needle: &str| {
        let out = dir.path().join("never-written.safetensors");
        expect_one_line_error(
            &[
                "features",
                "--backbone",
                "efficientnet-lite0",
                "--device",
                "cpu",
                "--offline",
                "--weights-dir",
                weights,
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
            needle,
        );
        assert!(!out.exists(), "no output written on failure");
    };
    let truncated = dir.path().join("truncated/bad.png");
    std::fs::create_dir_all(truncated.parent().unwrap()).unwrap();
    let full = std::fs::read(fixture("preprocess/rgba.png")).unwrap();
    std::fs::write(&truncated, &full[..full.len() / 3]).unwrap();
    run(truncated.parent().unwrap(), "bad.png");

    let text = dir.path().join("text/readme.png");
    std::fs::create_dir_all(text.parent().unwrap()).unwrap();
    std::fs::write(&text, "hello").unwrap();
    run(&text, "readme.png");

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    run(&empty, "no images found");
}

#[test]
fn weights_that_fail_their_checksum_are_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("resnet/tiny_resnet.pth"), dir.path().join("resnet50-0676ba61.pth")).unwrap();
    write_png(&dir.path().join("images/a.png"), 1);
    expect_one_line_error(
        &[
            "features",
            "--backbone",
            "resnet50",
            "--device",
            "cpu",
            "--weights-dir",
            dir.path().to_str().unwrap(),
            "--data",
            dir.path().join("images").to_str().unwrap(),
            "--out",
            dir.path().join("f.safetensors").to_str().unwrap(),
        ],
        "resnet50-0676ba61.pth: sha256 is",
    );
    expect_one_line_error(&["fetch-weights", "resnet51"], "unknown weights 'resnet51'");
    let missing = dir.path().join("nothing-here");
    expect_one_line_error(
        &[
            "features",
            "--backbone",
            "resnet50",
            "--offline",
            "--weights-dir",
            missing.to_str().unwrap(),
            "--data",
            dir.path().join("images").to_str().unwrap(),
            "--out",
            dir.path().join("f.safetensors").to_str().unwrap(),
        ],
        "anomaly fetch-weights resnet50",
    );
}

#[test]
fn fetch_weights_prints_the_path_of_a_file_in_place() {
    let weights = weights_dir();
    let output = anomaly(&["fetch-weights", "efficientnet-lite0", "--dir", weights.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert_eq!(printed.trim(), lite0_weights().display().to_string());
}

#[test]
fn devices_lists_adapters_and_the_auto_choice() {
    let output = anomaly(&["devices", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    eprintln!("{report}");
    assert!(report["adapters"].is_array());
    assert!(report["adapters"].as_array().unwrap().iter().all(|a| a["driver"].is_string()), "every adapter has a driver field");
    let auto = report["auto"].as_str().unwrap();
    let has_hardware = report["adapters"].as_array().unwrap().iter().any(|a| a["hardware"] == true);
    assert_eq!(auto, if has_hardware { "wgpu" } else { "cpu" });
    assert!(report["cpu"]["threads"].as_u64().unwrap() >= 1);
    if std::env::var_os("ANOMALY_CPU_ISA").is_none() {
        assert_eq!(report["cpu"]["isa"], report["cpu"]["detected_isa"], "no cap set");
    }
}

/// `ANOMALY_CPU_ISA` caps our kernels (`devices` says so), the portable code gives the features the
/// widest does (to float rounding: FMA against separate multiply-add), `--help` names it, and a value it
/// does not know fails before any work, naming the variable.
#[test]
fn the_cpu_isa_cap_is_reported_and_the_portable_kernels_agree() {
    let with_isa =
        |isa: &str, args: &[&str]| Command::new(env!("CARGO_BIN_EXE_anomaly")).env("ANOMALY_CPU_ISA", isa).args(args).output().unwrap();
    let output = with_isa("baseline", &["devices", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["cpu"]["isa"], "baseline");

    let output = with_isa("", &["--help"]);
    assert!(String::from_utf8_lossy(&output.stdout).contains("ANOMALY_CPU_ISA    cap our CPU kernels"), "{}", stderr(&output));

    let output = with_isa("sse9", &["devices"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("ANOMALY_CPU_ISA is 'sse9': use avx512, avx2 or baseline"), "{}", stderr(&output));

    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("images/a.png"), 3);
    write_png(&dir.path().join("images/b.png"), 7);
    let weights = weights_dir();
    let pooled = |isa: &str| {
        let out = dir.path().join(format!("{isa}.safetensors"));
        let data = dir.path().join("images");
        let args = ["features", "--backbone", "efficientnet-lite0", "--device", "cpu", "--offline", "--weights-dir"];
        let args = [&args[..], &[weights.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()]].concat();
        let output = with_isa(isa, &args);
        assert!(output.status.success(), "{}", stderr(&output));
        read_safetensors(&out)["pooled"].values.clone()
    };
    let (widest, portable) = (pooled(""), pooled("baseline"));
    let scale = widest.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = crate::common::max_abs_diff(&widest, &portable);
    assert!(diff <= 1e-4 * scale, "portable kernels differ by {diff} (values up to {scale})");
}

/// A synthetic dataset written by the library, small enough for CI.
fn synthetic(root: &Path, seed: u64, train: usize) {
    let config = anomaly_data::SyntheticConfig { seed, size: 64, train, test_good: 2, per_defect: 2 };
    anomaly_data::write_synthetic_dataset(root, &config).unwrap();
}

/// `anomaly demo` on a tiny set, run once and shared by the tests that read its output.
pub(crate) fn demo() -> &'static Path {
    static DEMO: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DEMO.get_or_init(|| {
        let dir = crate::common::kept_dir();
        let weights = weights_dir();
        let output = anomaly(&[
            "demo",
            "--out",
            dir.to_str().unwrap(),
            "--train",
            "12",
            "--test-good",
            "4",
            "--per-defect",
            "2",
            "--size",
            "64",
            "--k",
            "5",
            "--features",
            "100",
            "--device",
            "cpu",
            "--offline",
            "--weights-dir",
            weights.to_str().unwrap(),
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        let printed = String::from_utf8_lossy(&output.stdout);
        assert!(printed.contains("image AUROC"), "{printed}");
        dir
    })
}

/// Runs `predict --json` with `model` on the test folder `test` (plus `options`) and checks that every
/// score equals the one `report`'s scores.csv gives, in the same order; returns the predictions.
pub(crate) fn predict_as_reported(model: &Path, test: &Path, options: &[&str], report: &Path) -> Vec<serde_json::Value> {
    let output = anomaly(&[&["predict", "--model", model.to_str().unwrap(), test.to_str().unwrap(), "--json"], options].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    let predicted: Vec<serde_json::Value> =
        String::from_utf8_lossy(&output.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let csv = std::fs::read_to_string(report.join("scores.csv")).unwrap();
    assert_eq!(predicted.len(), csv.lines().count() - 1);
    for (line, prediction) in csv.lines().skip(1).zip(&predicted) {
        let reported: f64 = line.split(',').nth(3).unwrap().parse().unwrap();
        assert!((prediction["score"].as_f64().unwrap() - reported).abs() < 1e-5, "{line} vs {prediction}");
    }
    predicted
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn demo_fits_evaluates_and_writes_the_whole_report() {
    let report = demo().join("report");
    let metrics = read_json(&report.join("metrics.json"));
    let auroc = metrics["image_auroc"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&auroc));
    assert_eq!((metrics["n_train"].as_u64(), metrics["n_test"].as_u64()), (Some(12), Some(12)));
    assert_eq!((metrics["k"].as_u64(), metrics["features"].as_u64()), (Some(5), Some(100)));
    let confusion = &metrics["confusion"];
    let total: u64 = ["tn", "fp", "fn", "tp"].iter().map(|k| confusion[k].as_u64().unwrap()).sum();
    assert_eq!(total, 12);
    for key in ["threshold", "accuracy", "precision", "recall", "f1", "f1_optimal_threshold", "f1_optimal"] {
        assert!(metrics[key].is_number(), "{key}: {metrics}");
    }
    let defects: Vec<&str> = metrics["per_defect"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(defects, ["cut", "good", "hole", "missing_thread", "stain"]);
    assert!(metrics["timings_s"]["total"].as_f64().unwrap() > 0.0);
    assert_eq!(metrics["masks"]["with_mask"].as_u64(), Some(8));

    let csv = std::fs::read_to_string(report.join("scores.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "path,defect,label,score,verdict");
    assert_eq!(lines.len(), 13);
    for (file, size) in [("roc.png", (720, 640)), ("confusion.png", (640, 600)), ("tsne.png", (820, 700))] {
        let image = image::open(report.join(file)).unwrap();
        assert_eq!((image.width(), image.height()), size, "{file}");
    }
    let model = anomaly_detector::Model::load(&report.join("model.safetensors")).unwrap();
    assert_eq!(model.info.backbone, "efficientnet-lite0");
    assert_eq!(model.info.weights_sha256, anomaly_weights::sha256_file(&lite0_weights()).unwrap());
    assert_eq!((model.bank.len(), model.bank.columns.len()), (12, 100));
}

#[test]
fn predict_streams_the_scores_eval_reported() {
    let demo = demo();
    let model = demo.join("report/model.safetensors");
    let weights = weights_dir();
    let output = anomaly(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        demo.join("data/test").to_str().unwrap(),
        "--json",
        "--device",
        "cpu",
        "--offline",
        "--weights-dir",
        weights.to_str().unwrap(),
        "--batch-size",
        "5",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let predicted: Vec<serde_json::Value> =
        String::from_utf8_lossy(&output.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(predicted.len(), 12);
    let csv = std::fs::read_to_string(demo.join("report/scores.csv")).unwrap();
    for (line, prediction) in csv.lines().skip(1).zip(&predicted) {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(prediction["path"].as_str().unwrap(), fields[0]);
        let (ours, reported) = (prediction["score"].as_f64().unwrap(), fields[3].parse::<f64>().unwrap());
        assert!((ours - reported).abs() < 1e-4, "{ours} vs {reported}");
        assert_eq!(prediction["anomalous"].as_bool().unwrap(), fields[4] == "anomalous");
    }
    // Text output, one image.
    let one = demo.join("data/test/hole/000.png");
    let output = anomaly(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        one.to_str().unwrap(),
        "--device",
        "cpu",
        "--offline",
        "--weights-dir",
        weights.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(text.lines().count(), 1);
    assert!(text.contains("hole/000.png"), "{text}");
    // --fail-on-anomaly: status 3 when an image is anomalous, 0 when none is.
    let flagged: Vec<&str> = csv.lines().skip(1).filter(|l| l.ends_with(",anomalous")).map(|l| l.split(',').next().unwrap()).collect();
    let passed: Vec<&str> = csv.lines().skip(1).filter(|l| l.ends_with(",good")).map(|l| l.split(',').next().unwrap()).collect();
    for (paths, status) in [(&flagged, 3), (&passed, 0)] {
        let path = paths.first().expect("the seeded demo has images of both verdicts");
        let output = anomaly(&[
            "predict",
            "--model",
            model.to_str().unwrap(),
            path,
            "--fail-on-anomaly",
            "--device",
            "cpu",
            "--offline",
            "--weights-dir",
            weights.to_str().unwrap(),
        ]);
        assert_eq!(output.status.code(), Some(status), "{path}: {}", stderr(&output));
    }
}

#[test]
fn eval_of_a_saved_model_reproduces_the_fitted_run() {
    let demo = demo();
    let report = tempfile::tempdir().unwrap();
    let weights = weights_dir();
    let output = anomaly(&[
        "eval",
        "--data",
        demo.join("data").to_str().unwrap(),
        "--model",
        demo.join("report/model.safetensors").to_str().unwrap(),
        "--report",
        report.path().to_str().unwrap(),
        "--device",
        "cpu",
        "--offline",
        "--weights-dir",
        weights.to_str().unwrap(),
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let fitted = read_json(&demo.join("report/metrics.json"));
    for key in ["image_auroc", "threshold", "confusion", "f1"] {
        assert_eq!(printed[key], fitted[key], "{key}");
    }
    assert!(!report.path().join("model.safetensors").exists(), "an evaluated model is not copied");
}

#[test]
fn models_that_do_not_fit_are_refused_with_one_line() {
    let demo = demo();
    let dir = tempfile::tempdir().unwrap();
    let weights = weights_dir();
    let weights = weights.to_str().unwrap();
    let image = demo.join("data/test/good/000.png");
    let predict = |model: &Path, needle: &str| {
        expect_one_line_error(
            &[
                "predict",
                "--model",
                model.to_str().unwrap(),
                image.to_str().unwrap(),
                "--device",
                "cpu",
                "--offline",
                "--weights-dir",
                weights,
            ],
            needle,
        )
    };
    let bytes = std::fs::read(demo.join("report/model.safetensors")).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    predict(&truncated, "truncated.safetensors: not an anomaly model file");

    let mut other = anomaly_detector::Model::from_bytes(&bytes, &truncated).unwrap();
    other.info.weights_sha256 = "0".repeat(64);
    let other_weights = dir.path().join("other-weights.safetensors");
    std::fs::write(&other_weights, other.to_bytes()).unwrap();
    predict(&other_weights, "the model was fitted with efficientnet-lite0 weights");

    // A model file of a method this build does not know (a newer anomaly's) is named, not misread.
    let metadata = anomaly_detector::model_metadata(r#"{"method":"normalizing-flow"}"#.into());
    let no_tensors: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    let unknown = dir.path().join("unknown-method.safetensors");
    std::fs::write(&unknown, safetensors::serialize(no_tensors, Some(metadata)).unwrap()).unwrap();
    predict(&unknown, "unknown-method.safetensors: a model of method 'normalizing-flow', which this anomaly does not know");

    // k larger than the bank: refused before any feature is computed, and no model written.
    let model = dir.path().join("never.safetensors");
    expect_one_line_error(
        &[
            "fit",
            "--data",
            demo.join("data").to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--k",
            "50",
            "--device",
            "cpu",
            "--offline",
            "--weights-dir",
            weights,
        ],
        "k = 50 needs at least 51 training images (each is scored against the others), got 12",
    );
    assert!(!model.exists());
}

#[test]
fn undefined_auroc_and_missing_masks_are_said_not_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("no-good-tests");
    synthetic(&data, 11, 6);
    std::fs::remove_dir_all(data.join("test/good")).unwrap();
    std::fs::remove_file(data.join("ground_truth/hole/000_mask.png")).unwrap();
    let report = dir.path().join("report");
    let weights = weights_dir();
    let output = anomaly(&[
        "eval",
        "--data",
        data.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--k",
        "2",
        "--features",
        "50",
        "--device",
        "cpu",
        "--offline",
        "--weights-dir",
        weights.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let notes = stderr(&output);
    assert!(notes.contains("image AUROC is undefined") && notes.contains("no good images"), "{notes}");
    assert!(notes.contains("1 of 8 defective test images have no mask"), "{notes}");
    let metrics = read_json(&report.join("metrics.json"));
    assert!(metrics["image_auroc"].is_null());
    assert!(metrics["image_auroc_note"].as_str().unwrap().contains("undefined"));
    assert!(!report.join("roc.png").exists() && report.join("confusion.png").exists());

    std::fs::remove_dir_all(data.join("test")).unwrap();
    expect_one_line_error(
        &[
            "eval",
            "--data",
            data.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
            "--k",
            "2",
            "--device",
            "cpu",
            "--offline",
            "--weights-dir",
            weights.to_str().unwrap(),
        ],
        "no test images",
    );
}

#[test]
fn eval_all_summarises_every_category() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("mvtec");
    synthetic(&root.join("carpet"), 1, 5);
    // A category reached through a link is named by the link, as its report folder is.
    synthetic(&dir.path().join("elsewhere"), 2, 5);
    #[cfg(unix)]
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), root.join("tile")).unwrap();
    #[cfg(not(unix))]
    synthetic(&root.join("tile"), 2, 5);
    std::fs::create_dir_all(root.join("not-a-category")).unwrap();
    std::fs::create_dir_all(root.join("half/test/crack")).unwrap();
    let report = dir.path().join("report");
    let weights = weights_dir();
    let output = anomaly(&[
        "eval",
        "--all",
        root.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--k",
        "2",
        "--features",
        "50",
        "--device",
        "cpu",
        "--offline",
        "--weights-dir",
        weights.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let summary = read_json(&report.join("summary.json"));
    let names: Vec<&str> = summary["categories"].as_array().unwrap().iter().map(|c| c["dataset"].as_str().unwrap()).collect();
    assert_eq!(names, ["carpet", "tile"]);
    assert!(summary["mean_image_auroc"].is_number());
    let markdown = std::fs::read_to_string(report.join("summary.md")).unwrap();
    assert!(markdown.contains("| [carpet](carpet/metrics.json) |") && markdown.contains("**mean**"), "{markdown}");
    assert!(report.join("tile/roc.png").is_file());
    assert!(markdown.contains("| [tile](tile/metrics.json) |"), "{markdown}");
    let message = stderr(&output);
    assert!(message.contains("note: skipped") && message.contains("half: an MVTec AD category without train/good"), "{message}");
    assert!(!message.contains("not-a-category"), "a plain folder is not a category to mention: {message}");
}

#[test]
fn eda_reports_counts_sizes_and_defect_areas() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("mvtec");
    synthetic(&root.join("weave"), 5, 3);
    synthetic(&root.join("weave2"), 6, 4);
    let report = dir.path().join("eda");
    let output = anomaly(&["eda", "--data", root.join("weave").to_str().unwrap(), "--report", report.to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stats: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!((stats["n_train"].as_u64(), stats["n_test_good"].as_u64(), stats["n_test_defective"].as_u64()), (Some(3), Some(2), Some(8)));
    assert_eq!(stats["sizes"]["64×64"].as_u64(), Some(13));
    assert_eq!(stats["color_modes"]["Rgb8"].as_u64(), Some(13));
    assert_eq!(stats["counts"][0]["split"], "train");
    let hole = &stats["defect_area"]["hole"];
    assert_eq!(hole["masks"].as_u64(), Some(2));
    assert!(hole["mean_area_percent"].as_f64().unwrap() > 0.5 && hole["mean_regions"].as_f64().unwrap() >= 1.0, "{hole}");
    for file in ["summary.md", "eda.json", "histograms.png", "defect_area.png", "samples.png"] {
        assert!(report.join(file).is_file(), "{file}");
    }
    let summary = std::fs::read_to_string(report.join("summary.md")).unwrap();
    assert!(summary.contains("![Samples with mask outlines](samples.png)") && summary.contains("| hole | 2 |"), "{summary}");

    // A root: one report per category and an index.
    let output = anomaly(&["eda", "--data", root.to_str().unwrap(), "--report", report.join("all").to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let index = std::fs::read_to_string(report.join("all/summary.md")).unwrap();
    assert!(index.contains("[weave/summary.md]") && index.contains("| weave2 | 4 | 2 | 8 | 4 |"), "{index}");
    expect_one_line_error(
        &["eda", "--data", dir.path().join("eda").to_str().unwrap(), "--report", report.to_str().unwrap()],
        "neither an MVTec AD category",
    );
}

#[test]
fn the_autoencoder_fits_evaluates_with_pixel_auroc_and_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fabric");
    synthetic(&data, 21, 8);
    let model = dir.path().join("ae.safetensors");
    let output = anomaly(&[
        "fit",
        "--method",
        "autoencoder",
        "--data",
        data.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--image-size",
        "32",
        "--epochs",
        "3",
        "--train-batch-size",
        "4",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let fitted: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(fitted["info"]["method"], "autoencoder");
    assert_eq!(fitted["info"]["epoch_losses"].as_array().unwrap().len(), 3);

    let report = dir.path().join("report");
    let maps = dir.path().join("maps");
    let eval = |report: &Path, maps: &Path| {
        anomaly(&[
            "eval",
            "--data",
            data.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
            "--device",
            "cpu",
            "--save-maps",
            maps.to_str().unwrap(),
        ])
    };
    let output = eval(&report, &maps);
    assert!(output.status.success(), "{}", stderr(&output));
    let metrics = read_json(&report.join("metrics.json"));
    assert_eq!(metrics["method"], "autoencoder");
    for field in ["pixel_auroc", "pixel_auroc_crop", "aupro", "f1_optimal_precision", "f1_optimal_recall"] {
        assert!(metrics[field].as_f64().is_some_and(|v| (0.0..=1.0).contains(&v)), "{field}: {metrics}");
    }
    assert!(metrics["pixel_threshold_f1"]["threshold"].is_number(), "{metrics}");
    assert!(metrics["image_auroc"].is_number());
    for file in ["reconstructions.png", "heatmaps.png", "roc.png", "confusion.png", "tsne.png", "scores.csv"] {
        assert!(report.join(file).is_file(), "{file}");
    }
    // One float map per test image at its size (64 × 64), where MVTec AD's evaluation looks, and its overlay.
    let csv = std::fs::read_to_string(report.join("scores.csv")).unwrap();
    for line in csv.lines().skip(1) {
        let image = Path::new(line.split(',').next().unwrap());
        let defect = image.parent().unwrap().file_name().unwrap();
        let saved = maps.join("fabric/test").join(defect).join(image.file_stem().unwrap()).with_extension("tiff");
        let mut decoder = tiff::decoder::Decoder::new(std::fs::File::open(&saved).unwrap()).unwrap();
        assert_eq!(decoder.dimensions().unwrap(), (64, 64), "{}", saved.display());
        let tiff::decoder::DecodingResult::F32(values) = decoder.read_image().unwrap() else { panic!("{}: not float32", saved.display()) };
        assert!(values.iter().all(|v| v.is_finite() && *v >= 0.0) && values.iter().any(|&v| v > 0.0), "{}", saved.display());
        assert_eq!(image::image_dimensions(saved.with_extension("png")).unwrap(), (64, 64));
    }
    // A maps folder that is a file, or inside the report (which is replaced whole), fails before any work.
    std::fs::write(dir.path().join("a-file"), "x").unwrap();
    let output = eval(&dir.path().join("report2"), &dir.path().join("a-file"));
    assert!(!output.status.success() && stderr(&output).contains("is a file, not a folder"), "{}", stderr(&output));
    let output = eval(&report, &report.join("maps"));
    assert!(!output.status.success() && stderr(&output).contains("must be outside the --report folder"), "{}", stderr(&output));
    assert!(!report.join("maps").exists() && !dir.path().join("report2").exists());

    // Settings that cannot build an autoencoder fail before any training.
    expect_one_line_error(
        &[
            "fit",
            "--method",
            "autoencoder",
            "--data",
            data.to_str().unwrap(),
            "--model",
            dir.path().join("never.safetensors").to_str().unwrap(),
            "--image-size",
            "100",
            "--device",
            "cpu",
        ],
        "image size 100 must be a multiple of 16",
    );

    let test = data.join("test");
    for prediction in predict_as_reported(&model, &test, &["--device", "cpu"], &report) {
        // The map's largest value; no box, as the autoencoder has no pixel threshold.
        assert!(prediction["map_max"].as_f64().is_some_and(|m| m > 0.0) && prediction.get("bbox").is_none(), "{prediction}");
    }

    // --maps writes each image's overlay (and with --tiff its float map) by file stem.
    let predicted_maps = dir.path().join("predicted");
    let good = data.join("test/good");
    let output = anomaly(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        good.to_str().unwrap(),
        "--device",
        "cpu",
        "--maps",
        predicted_maps.to_str().unwrap(),
        "--tiff",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let mut written: Vec<String> =
        std::fs::read_dir(&predicted_maps).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    written.sort();
    let mut expected: Vec<String> = std::fs::read_dir(&good)
        .unwrap()
        .flat_map(|e| {
            let stem = e.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned();
            [format!("{stem}.png"), format!("{stem}.tiff")]
        })
        .collect();
    expected.sort();
    assert_eq!(written, expected);
    assert_eq!(image::image_dimensions(predicted_maps.join(&expected[0])).unwrap(), (64, 64));
    // Images whose overlays would overwrite each other (the same name under two defect folders) are
    // refused before any work; --tiff needs --maps.
    let output = anomaly(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        data.join("test").to_str().unwrap(),
        "--device",
        "cpu",
        "--maps",
        predicted_maps.to_str().unwrap(),
    ]);
    assert!(!output.status.success() && stderr(&output).contains("would both be written to"), "{}", stderr(&output));
    let output = anomaly(&["predict", "--model", model.to_str().unwrap(), good.to_str().unwrap(), "--tiff"]);
    assert!(!output.status.success() && stderr(&output).contains("--maps"), "{}", stderr(&output));
}

#[test]
fn bench_coreset_prints_rates_of_paths_that_agree() {
    let output = anomaly(&[
        "bench",
        "coreset",
        "--patches",
        "600",
        "--dims",
        "24",
        "--ratio",
        "0.05,1",
        "--projection",
        "8",
        "--repeats",
        "1",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        assert_eq!(case["picks_agree"], true, "{case}");
        assert_eq!(case["projected_dims"], 8);
        assert!(case["wgpu_picks_s"].as_f64().unwrap() > 0.0 && case["cpu_picks_s"].as_f64().unwrap() > 0.0, "{case}");
    }
    assert_eq!((cases[0]["coreset"].as_u64(), cases[1]["coreset"].as_u64()), (Some(30), Some(600)));
    for bad in [["--ratio", "0"], ["--ratio", "1.5"], ["--patches", "0"]] {
        let output = anomaly(&["bench", "coreset", bad[0], bad[1]]);
        assert!(!output.status.success() && stderr(&output).contains(bad[0]), "{bad:?}: {}", stderr(&output));
    }
}

#[test]
fn weights_named_with_a_flag_are_used_recorded_and_needed_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fabric");
    synthetic(&data, 41, 6);
    let custom = dir.path().join("my-finetuned-lite0.pth");
    std::fs::copy(lite0_weights(), &custom).unwrap();
    let (model, empty) = (dir.path().join("m.safetensors"), dir.path().join("no-weights-here"));
    let common = ["--device", "cpu", "--offline", "--weights-dir", empty.to_str().unwrap()];
    let fit = [&["fit", "--data", data.to_str().unwrap(), "--model", model.to_str().unwrap(), "--k", "3", "--json"], &common[..]].concat();

    let missing = dir.path().join("missing.pth");
    let output = anomaly(&[&fit[..], &["--weights", missing.to_str().unwrap()]].concat());
    assert!(!output.status.success() && stderr(&output).contains("missing.pth: no such weights file"), "{}", stderr(&output));

    let output = anomaly(&[&fit[..], &["--weights", custom.to_str().unwrap()]].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    let fitted: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(fitted["info"]["weights_file"], "my-finetuned-lite0.pth", "{fitted}");
    // The model's predict finds no weights in the (empty) folder without the flag, and runs with it.
    let image = data.join("test/good/000.png");
    let predict = ["predict", "--model", model.to_str().unwrap(), image.to_str().unwrap()];
    assert!(!anomaly(&[&predict[..], &common[..]].concat()).status.success());
    let output = anomaly(&[&predict[..], &common[..], &["--weights", custom.to_str().unwrap()]].concat());
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn bench_bank_scores_a_mapped_bank_in_chunks_on_each_device_and_leaves_no_file() {
    // 8000 rows of 64 values are 1.95 MiB: two chunks at 1 MiB.
    crate::common::wgpu_device();
    let dir = tempfile::tempdir().unwrap();
    for device in ["cpu", "wgpu"] {
        let args = ["bench", "bank", "--device", device, "--rows", "8000", "--dim", "64", "--queries", "20", "--chunk-mib", "1"];
        let output = anomaly(&[&args[..], &["--dir", dir.path().to_str().unwrap(), "--json"]].concat());
        assert!(output.status.success(), "{device}: {}", stderr(&output));
        let row: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!((row["rows"].as_u64(), row["dim"].as_u64(), row["checked_queries"].as_u64()), (Some(8000), Some(64), Some(4)), "{row}");
        assert!(row["score_s"].as_f64().unwrap() > 0.0 && row["bank_bytes"].as_u64() == Some(8000 * 64 * 4), "{row}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{device}: the bank file is gone");
    }
}
