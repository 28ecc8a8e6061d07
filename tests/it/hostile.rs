//! The binary against careless and hostile input: decompression bombs, link loops, layouts that would
//! train on defects, names that are not UTF-8, closed or full standard output, out-of-range arguments.
//! Each ends in a correct result or one error line, never a panic, a hang or a half-written output.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cli::{anomaly, demo, stderr, weights_dir, write_png};

/// The demo's fitted model (built once for the test binary).
fn model() -> PathBuf {
    demo().join("report/model.safetensors")
}

/// `predict` arguments that need no network: the shared weights, offline, on the CPU.
fn predict_args<'a>(model: &'a Path, weights: &'a Path) -> Vec<&'a str> {
    vec!["predict", "--model", model.to_str().unwrap(), "--device", "cpu", "--offline", "--weights-dir", weights.to_str().unwrap()]
}

/// Asserts a failed run with exactly one `error:` line containing every needle, and no panic.
fn assert_one_error_line(output: &std::process::Output, needles: &[&str]) {
    let message = stderr(output);
    assert!(!output.status.success() && output.status.code() != Some(101), "{:?}: {message}", output.status);
    assert!(!message.contains("panicked"), "{message}");
    let errors: Vec<&str> = message.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{message}");
    for needle in needles {
        assert!(errors[0].contains(needle), "'{needle}' in {message}");
    }
}

#[test]
fn a_jpeg_claiming_65000_squared_pixels_is_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.jpg");
    image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8, y as u8, 7])).save(&good).unwrap();
    let mut bytes = std::fs::read(&good).unwrap();
    let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    bytes[sof + 5..sof + 9].copy_from_slice(&[0xFD, 0xE8, 0xFD, 0xE8]);
    let bomb = dir.path().join("bomb.jpg");
    std::fs::write(&bomb, &bytes).unwrap();
    let (model, weights) = (model(), weights_dir());
    let mut args = predict_args(&model, &weights);
    args.push(bomb.to_str().unwrap());
    let output = anomaly(&args);
    assert_one_error_line(&output, &["bomb.jpg", "65000×65000", "--max-pixels"]);
    assert!(output.stdout.is_empty(), "no verdict for a refused image");
    // The limit is the user's: a genuine image over a lowered one is refused the same way.
    let mut args = predict_args(&model, &weights);
    args.extend(["--max-pixels", "1000", good.to_str().unwrap()]);
    assert_one_error_line(&anomaly(&args), &["good.jpg", "64×64", "1000"]);
}

#[cfg(unix)]
#[test]
fn link_loops_neither_repeat_images_nor_hang_and_are_named() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    for i in 0..12 {
        write_png(&dir.path().join(format!("{i:02}.png")), i as u8 + 1);
    }
    symlink(".", dir.path().join("x")).unwrap();
    symlink(".", dir.path().join("y")).unwrap();
    let (model, weights) = (model(), weights_dir());
    let mut args = predict_args(&model, &weights);
    args.push(dir.path().to_str().unwrap());
    let output = anomaly(&args);
    let message = stderr(&output);
    assert!(output.status.success(), "{message}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 12);
    assert!(message.contains("12 images"), "{message}");
    assert_eq!(message.lines().filter(|l| l.starts_with("note: skipped")).count(), 2, "{message}");
}

#[test]
fn fit_refuses_a_category_without_train_good_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cat = dir.path().join("cat");
    write_png(&cat.join("train/goood/a.png"), 1);
    write_png(&cat.join("test/crack/c.png"), 2);
    write_png(&cat.join("ground_truth/crack/c_mask.png"), 3);
    let model = dir.path().join("m.safetensors");
    let weights = weights_dir();
    let output = anomaly(&[
        "fit",
        "--data",
        cat.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--offline",
        "--weights-dir",
        weights.to_str().unwrap(),
    ]);
    assert_one_error_line(&output, &["cat", "train/good", "MVTec"]);
    assert!(!model.exists());
}

#[cfg(unix)]
#[test]
fn names_that_are_not_utf8_are_printed_lossily_and_kept_exactly_in_json() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let name = std::ffi::OsStr::from_bytes(b"part\xff\xfe.png");
    write_png(&dir.path().join(name), 3);
    write_png(&dir.path().join("two\nlines.png"), 4);
    let (model, weights) = (model(), weights_dir());
    let mut args = predict_args(&model, &weights);
    args.extend(["--json", dir.path().to_str().unwrap()]);
    let output = anomaly(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines.iter().any(|line| line["path"].as_str().unwrap().ends_with("/two\nlines.png")), "{stdout}");
    let line = lines.iter().find(|line| line.get("path_bytes").is_some()).unwrap();
    assert!(line["path"].as_str().unwrap().ends_with("part\u{FFFD}\u{FFFD}.png"), "{line}");
    let bytes: Vec<u8> = line["path_bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
    assert_eq!(bytes, dir.path().join(name).as_os_str().as_bytes());
    args.retain(|a| *a != "--json");
    let output = anomaly(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(text.lines().count(), 2, "a newline in a name does not split its verdict line: {text}");
    assert!(text.contains("part\u{FFFD}\u{FFFD}.png") && text.contains("two\\nlines.png"), "{text}");
}

#[test]
fn a_closed_stdout_ends_quietly_and_a_full_one_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3 {
        write_png(&dir.path().join(format!("{i}.png")), i + 1);
    }
    let (model, weights) = (model(), weights_dir());
    let mut args = predict_args(&model, &weights);
    args.push(dir.path().to_str().unwrap());
    // The reader goes away before the first verdict, as `| head -0` would.
    let mut child = Command::new(env!("CARGO_BIN_EXE_anomaly")).args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{message}");
    assert!(!message.contains("panicked") && !message.contains("error"), "{message}");
    if Path::new("/dev/full").exists() {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_anomaly")).args(&args).stdout(full).output().unwrap();
        assert_one_error_line(&output, &["standard output", "No space left"]);
    }
}

#[test]
fn out_of_range_arguments_are_refused_by_the_parser() {
    let cases: [&[&str]; 8] = [
        &["predict", "--model", "m.safetensors", "--batch-size", "0", "x.png"],
        &["predict", "--model", "m.safetensors", "--batch-size", "99999999999999999999999", "x.png"],
        &["predict", "--model", "m.safetensors", "--max-pixels", "0", "x.png"],
        &["predict", "--model", "m.safetensors", "--max-pixels=-5", "x.png"],
        &["eval", "--data", "d", "--report", "r", "--tsne-points", "1"],
        &["eval", "--data", "d", "--report", "r", "--k", "0"],
        &["eval", "--data", "d", "--report", "r", "--image-size", "99999999999"],
        &["eval", "--data", "d", "--report", "r", "--learning-rate", "nan"],
    ];
    for args in cases {
        let output = anomaly(args);
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {message}");
        assert!(message.contains("error: invalid value"), "{args:?}: {message}");
    }
}

#[cfg(unix)]
#[test]
fn a_model_that_is_not_a_regular_file_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.png");
    write_png(&image, 1);
    let weights = weights_dir();
    for model in [Path::new("/dev/zero"), dir.path()] {
        let mut args = predict_args(model, &weights);
        args.push(image.to_str().unwrap());
        assert_one_error_line(&anomaly(&args), &[&model.display().to_string(), "not a regular file"]);
    }
}

/// A gray PNG of `width × height` pixels, all 128 (it compresses to almost nothing).
fn flat_png(path: &Path, width: u32, height: u32) {
    image::GrayImage::from_pixel(width, height, image::Luma([128])).save(path).unwrap();
}

#[test]
fn an_image_too_elongated_to_resize_is_refused_not_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let (wide, tall) = (dir.path().join("wide.png"), dir.path().join("tall.png"));
    // 60 megapixels, under the limit, but 256 × 15 360 000 000 once its short side is resized.
    flat_png(&wide, 60_000_000, 1);
    flat_png(&tall, 1, 60_000_000);
    let (model, weights) = (model(), weights_dir());
    for (path, name) in [(&wide, "wide.png"), (&tall, "tall.png")] {
        let mut args = predict_args(&model, &weights);
        args.push(path.to_str().unwrap());
        assert_one_error_line(&anomaly(&args), &[name, "60000000", "aspect ratio"]);
    }
}
