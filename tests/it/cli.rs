//! The `anomaly` binary end to end: features files, devices, and bad input failing with one clear line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::{fixture, lite0_weights, read_safetensors};

fn anomaly(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_anomaly")).args(args).output().expect("the anomaly binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The folder holding the real Lite0 weights (fetched on first use).
fn weights_dir() -> PathBuf {
    lite0_weights().parent().unwrap().to_path_buf()
}

fn write_png(path: &Path, seed: u8) {
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
        "features", "--backbone", "efficientnet-lite0", "--device", "cpu", "--offline",
        "--weights-dir", weights.to_str().unwrap(),
        "--data", dir.path().join("images").to_str().unwrap(),
        "--out", out.to_str().unwrap(), "--taps", "block4", "--batch-size", "1",
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
            &["features", "--backbone", "efficientnet-lite0", "--device", "cpu", "--offline", "--weights-dir", weights,
              "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()],
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
        &["features", "--backbone", "resnet50", "--device", "cpu", "--weights-dir", dir.path().to_str().unwrap(),
          "--data", dir.path().join("images").to_str().unwrap(), "--out", dir.path().join("f.safetensors").to_str().unwrap()],
        "resnet50-0676ba61.pth: sha256 is",
    );
    expect_one_line_error(&["fetch-weights", "resnet51"], "unknown weights 'resnet51'");
    let missing = dir.path().join("nothing-here");
    expect_one_line_error(
        &["features", "--backbone", "resnet50", "--offline", "--weights-dir", missing.to_str().unwrap(),
          "--data", dir.path().join("images").to_str().unwrap(), "--out", dir.path().join("f.safetensors").to_str().unwrap()],
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
    let auto = report["auto"].as_str().unwrap();
    let has_hardware = report["adapters"].as_array().unwrap().iter().any(|a| a["hardware"] == true);
    assert_eq!(auto, if has_hardware { "wgpu" } else { "cpu" });
}
