//! Corrupt model and weights files fail closed: a NaN or ±Inf cell is refused at load with one line naming
//! the file and the tensor, instead of every image scoring "good".

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Output;

use anomaly_backbone::{Backbone, ResNetConfig, load_weights};
use burn::tensor::Device;

use crate::cli::anomaly;
use crate::common::{bank_model_bytes, fixture};

/// A memory bank fitted on 12 images' worth of EfficientNet-Lite0-wide features, as `fit` would write it.
fn bank_model(path: &Path) {
    std::fs::write(path, bank_model_bytes()).unwrap();
}

/// Sets the `index`th f32 value of a tensor of a safetensors file, in place.
fn set_value(path: &Path, tensor: &str, index: usize, value: f32) {
    let mut bytes = std::fs::read(path).unwrap();
    let (header, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let at = 8 + header + metadata.info(tensor).unwrap().data_offsets.0 + 4 * index;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

fn write_png(path: &Path) {
    image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 3, y as u8 * 3, 90])).save(path).unwrap();
}

/// Runs a command that must fail on the model with exactly one stderr line naming it and `needle`, and
/// no verdict on stdout.
fn expect_refusal(args: &[&str], model: &Path, needle: &str) {
    let output = anomaly(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{args:?} must fail as an error: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    let line = stderr.lines().next().unwrap();
    assert!(line.starts_with("error: ") && line.contains(&model.display().to_string()) && line.contains(needle), "{needle} in: {line}");
    assert!(line.ends_with("the file is corrupt; fit the model again"), "{line}");
    assert!(output.stdout.is_empty(), "no verdict: {}", String::from_utf8_lossy(&output.stdout));
}

fn predict_args<'a>(model: &'a str, image: &'a str, weights: &'a str) -> Vec<&'a str> {
    vec!["predict", "--model", model, image, "--fail-on-anomaly", "--device", "cpu", "--offline", "--weights-dir", weights]
}

#[test]
fn a_memory_bank_with_a_nan_or_inf_cell_is_refused_by_predict_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("part.png");
    write_png(&image);
    // No weights are needed: the file is refused before any backbone is looked for.
    let weights = dir.path().join("no-weights");
    std::fs::create_dir(&weights).unwrap();
    for (name, value, kind) in [("nan.safetensors", f32::NAN, "NaN"), ("inf.safetensors", f32::INFINITY, "+Inf")] {
        let model = dir.path().join(name);
        bank_model(&model);
        set_value(&model, "bank", 3 * 50 + 17, value);
        let args = predict_args(model.to_str().unwrap(), image.to_str().unwrap(), weights.to_str().unwrap());
        expect_refusal(&args, &model, &format!("tensor \"bank\" holds {kind} at row 3, column 17"));
    }
}

/// `fit --method autoencoder` of a small network (32 px, latent 8) on the CPU, with `extra` options.
fn fit_autoencoder(data: &Path, model: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["fit", "--method", "autoencoder", "--data", data.to_str().unwrap(), "--model", model.to_str().unwrap()];
    args.extend(["--image-size", "32", "--latent", "8", "--device", "cpu"]);
    args.extend(extra);
    anomaly(&args)
}

#[test]
fn an_autoencoder_with_a_nan_weight_is_refused_by_predict_and_eval() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fabric");
    let config = anomaly_data::SyntheticConfig { seed: 4, size: 48, train: 4, test_good: 1, per_defect: 1 };
    anomaly_data::write_synthetic_dataset(&data, &config).unwrap();
    let model = dir.path().join("ae.safetensors");
    let fit = fit_autoencoder(&data, &model, &["--epochs", "1", "--train-batch-size", "4"]);
    assert!(fit.status.success(), "{}", String::from_utf8_lossy(&fit.stderr));
    set_value(&model, "to_latent.weight", 9, f32::NAN);
    let image = anomaly_data::collect_images(&data.join("test")).unwrap().files.remove(0);
    let weights = dir.path().to_str().unwrap();
    let needle = "tensor \"to_latent.weight\" holds NaN at row 1, column 1";
    expect_refusal(&predict_args(model.to_str().unwrap(), image.to_str().unwrap(), weights), &model, needle);
    let report = dir.path().join("report");
    let eval = [
        "eval",
        "--data",
        data.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    expect_refusal(&eval, &model, needle);
    assert!(!report.join("metrics.json").exists());

    // A training that diverges (an absurd learning rate) leaves NaN or ±Inf weights: the fit says so and
    // writes no model.
    let diverged = dir.path().join("diverged.safetensors");
    let fit = fit_autoencoder(&data, &diverged, &["--epochs", "2", "--train-batch-size", "2", "--learning-rate", "1e30"]);
    let stderr = String::from_utf8_lossy(&fit.stderr);
    assert_eq!(fit.status.code(), Some(1), "{stderr}");
    let line = stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_default();
    assert!(
        line.starts_with("error: the fit produced an unusable model: its training losses hold ")
            && line.ends_with("; no model file was written"),
        "{stderr}"
    );
    assert!(!diverged.exists());
}

/// `tiny_resnet.pth` with its first stored tensor's first value replaced, as a stored (uncompressed) zip.
fn tiny_resnet_with(value: f32, path: &PathBuf) {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(fixture("resnet/tiny_resnet.pth")).unwrap()).unwrap();
    let mut out = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..archive.len() {
        let mut member = archive.by_index(i).unwrap();
        let mut bytes = Vec::new();
        member.read_to_end(&mut bytes).unwrap();
        let name = member.name().unwrap().to_string();
        if name == "tiny_resnet/data/0" {
            bytes[..4].copy_from_slice(&value.to_le_bytes());
        }
        out.start_file(name, options).unwrap();
        out.write_all(&bytes).unwrap();
    }
    out.finish().unwrap();
}

#[test]
fn backbone_weights_with_a_non_finite_value_are_refused_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::flex();
    // The fixture's architecture: tools/make_resnet_fixture.py.
    let config = ResNetConfig::new()
        .with_stem_channels(8)
        .with_planes([8, 16, 32, 32])
        .with_blocks([2, 2, 1, 1])
        .with_base_width(128)
        .with_num_classes(10);
    let intact = dir.path().join("intact.pth");
    tiny_resnet_with(0.5, &intact);
    load_weights(&mut Backbone::ResNet(config.init(&device)), &intact).unwrap();
    let corrupt = dir.path().join("corrupt.pth");
    tiny_resnet_with(f32::NEG_INFINITY, &corrupt);
    let message = load_weights(&mut Backbone::ResNet(config.init(&device)), &corrupt).unwrap_err().to_string();
    assert!(message.starts_with(&corrupt.display().to_string()), "{message}");
    assert!(message.contains("tensor \"conv1.weight\" holds -Inf at index 0: the weights file is corrupt"), "{message}");
}
