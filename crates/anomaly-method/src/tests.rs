//! The device-free model-file check on hostile bytes and corrupt values, and scores that are not numbers.

use std::path::{Path, PathBuf};

use anomaly_autoencoder::{AutoencoderModel, ConvAutoencoderConfig, TrainConfig, Trained, seeded_network};
use anomaly_detector::{Compute, DetectorConfig, FeatureSource, MemoryBank, Model};
use anomaly_fs::FileBytes;
use burn::tensor::Device;

use super::*;

const PATH: &str = "m.safetensors";

/// A memory bank of 12 images fitted on features as wide as EfficientNet-Lite0's.
fn bank_file() -> Vec<u8> {
    let dim = BackboneName::EfficientNetLite0.feature_dim();
    let features: Vec<f32> = (0..12 * dim).map(|i| ((i * 7919) % 1013) as f32 / 1013.0).collect();
    let bank = MemoryBank::fit(&features, dim, DetectorConfig { k: 3, features: 20 }, &Compute::Cpu).unwrap();
    let source = FeatureSource {
        backbone: "efficientnet-lite0".into(),
        weights_file: "w.pth".into(),
        weights_sha256: "ab".repeat(32),
        preprocess: BackboneName::EfficientNetLite0.preprocess(),
        dataset: "unit".into(),
    };
    Model::new(bank, source).to_bytes()
}

fn autoencoder_file() -> Vec<u8> {
    let config = ConvAutoencoderConfig::new().with_image_size(32).with_latent(8).with_channels(vec![4, 8]);
    let network = seeded_network(&config, &Device::flex(), 1).unwrap();
    let trained = Trained { model: network, epoch_losses: vec![0.2, 0.1] };
    AutoencoderModel::new(trained, config, TrainConfig::default(), &[0.1, 0.3], "unit").to_bytes().unwrap()
}

/// The byte offset of a tensor's `index`th f32 value in a safetensors file.
fn value_offset(file: &[u8], tensor: &str, index: usize) -> usize {
    let (header, metadata) = safetensors::SafeTensors::read_metadata(file).unwrap();
    8 + header + metadata.info(tensor).unwrap().data_offsets.0 + 4 * index
}

fn with_value(file: &[u8], tensor: &str, index: usize, value: f32) -> Vec<u8> {
    let mut file = file.to_vec();
    let at = value_offset(&file, tensor, index);
    file[at..at + 4].copy_from_slice(&value.to_le_bytes());
    file
}

fn error(bytes: &[u8]) -> String {
    check_model_file(&FileBytes::from_vec(bytes.to_vec()), Path::new(PATH)).unwrap_err().to_string()
}

#[test]
fn hostile_bytes_are_refused_without_panicking() {
    let valid = bank_file();
    assert_eq!(check_model_file(&FileBytes::from_vec(valid.clone()), Path::new(PATH)).unwrap(), MethodName::MemoryBank);
    let mut past_the_end = valid.clone();
    past_the_end[..8].copy_from_slice(&(valid.len() as u64).to_le_bytes());
    // A tensor whose shape's product overflows, declared in an otherwise well-formed header.
    let header = r#"{"__metadata__":{"format":"anomaly-model","version":"1","info":"{\"method\":\"memory-bank\"}"},"bank":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#;
    let overflow = [&(header.len() as u64).to_le_bytes()[..], header.as_bytes(), &[0; 4]].concat();
    let mut seed = 7u64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        })
        .collect();
    for (name, bytes) in [
        ("empty", &b""[..]),
        ("eight bytes", &[0u8; 8][..]),
        ("truncated", &valid[..valid.len() / 2]),
        ("header past the end", &past_the_end[..]),
        ("overflowing shape", &overflow[..]),
        ("random", &random[..]),
    ] {
        let message = error(bytes);
        assert!(message.starts_with("m.safetensors: "), "{name}: {message}");
    }
    let autoencoder = autoencoder_file();
    assert_eq!(check_model_file(&FileBytes::from_vec(autoencoder.clone()), Path::new(PATH)).unwrap(), MethodName::Autoencoder);
    assert!(error(&autoencoder[..autoencoder.len() - 3]).contains("not an anomaly model file"));
}

#[test]
fn non_finite_values_in_any_methods_file_are_refused_naming_tensor_and_place() {
    let bank = bank_file();
    let nan = with_value(&bank, "bank", 3 * 20 + 17, f32::NAN);
    assert_eq!(error(&nan), "m.safetensors: tensor \"bank\" holds NaN at row 3, column 17: the file is corrupt; fit the model again");
    let inf = with_value(&bank, "train_scores", 5, f32::INFINITY);
    assert!(error(&inf).contains("tensor \"train_scores\" holds +Inf at index 5"), "{}", error(&inf));
    let autoencoder = autoencoder_file();
    let nan = with_value(&autoencoder, "decoder.1.bias", 2, f32::NAN);
    assert_eq!(error(&nan), "m.safetensors: tensor \"decoder.1.bias\" holds NaN at index 2: the file is corrupt; fit the model again");
    let inf = with_value(&autoencoder, "encoder.0.weight", 4 * 3 * 4 * 4 - 1, f32::NEG_INFINITY);
    assert!(error(&inf).contains("tensor \"encoder.0.weight\" holds -Inf at index [3, 2, 3, 3]"), "{}", error(&inf));
}

/// A model file whose header's `info` is edited by `edit`, tensors kept.
fn with_info(file: &[u8], edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let header = anomaly_detector::read_model_header(file, Path::new(PATH)).unwrap();
    let mut info: serde_json::Value = serde_json::from_str(&header.info).unwrap();
    edit(&mut info);
    let tensors = safetensors::SafeTensors::deserialize(file).unwrap();
    safetensors::serialize(tensors.tensors(), Some(anomaly_detector::model_metadata(info.to_string()))).unwrap()
}

#[test]
fn senseless_header_numbers_are_refused() {
    let bank = bank_file();
    // 1e39 is beyond f32: it reads as +Inf.
    let inf_threshold = with_info(&bank, |info| info["threshold"] = serde_json::json!(1e39));
    assert!(error(&inf_threshold).contains("its threshold is inf"), "{}", error(&inf_threshold));
    let wide = with_info(&bank, |info| info["input_dim"] = serde_json::json!(2048));
    assert!(error(&wide).contains("features are 2048 wide, but efficientnet-lite0's are 1280"), "{}", error(&wide));
    let sha = with_info(&bank, |info| info["weights_sha256"] = serde_json::json!("a€€€€"));
    assert!(error(&sha).contains("not 64 hex digits"), "{}", error(&sha));
    let autoencoder = autoencoder_file();
    let std = with_info(&autoencoder, |info| info["preprocess"]["std"] = serde_json::json!([0.0, 1.0, 1.0]));
    assert!(error(&std).contains("preprocessing"), "{}", error(&std));
    let loss = with_info(&autoencoder, |info| info["epoch_losses"] = serde_json::json!([0.1, -1.0]));
    assert!(error(&loss).contains("training losses hold -1"), "{}", error(&loss));
    let deep = with_info(&autoencoder, |info| info["model"]["channels"] = serde_json::json!(vec![1; 70]));
    assert!(error(&deep).contains("1 to 16 stages"), "{}", error(&deep));
}

#[test]
fn a_score_or_map_that_is_not_a_number_is_an_error_naming_the_image() {
    let paths = [PathBuf::from("a.png"), PathBuf::from("b.png")];
    let good = ImageOutput { score: 0.5, embedding: vec![1.0], map: Some(vec![0.0; 4]), reconstruction: None };
    assert!(check_outputs(&paths, &[good.clone(), good.clone()]).is_ok());
    let nan = ImageOutput { score: f32::NAN, ..good.clone() };
    let message = check_outputs(&paths, &[good.clone(), nan]).unwrap_err().to_string();
    assert_eq!(message, "b.png: its score is NaN; no verdict (is the model file corrupt?)");
    let map = ImageOutput { map: Some(vec![0.0, 0.0, f32::INFINITY, 0.0]), ..good.clone() };
    let message = check_outputs(&paths, &[map, good]).unwrap_err().to_string();
    assert_eq!(message, "a.png: its anomaly map holds +Inf at row 1, column 0; no verdict (is the model file corrupt?)");
}

#[test]
fn memory_budgets_read_in_decimal_and_binary_units() {
    let size = |text: &str| patchcore::byte_size(text);
    assert_eq!(size("4096"), Ok(4096));
    assert_eq!(size("100MiB"), Ok(100 << 20));
    assert_eq!(size("8GiB"), Ok(8 << 30));
    assert_eq!(size("8g"), Ok(8 << 30));
    assert_eq!(size("1.5GB"), Ok(1_500_000_000));
    assert_eq!(size(" 512 kb "), Ok(512_000));
    for bad in ["", "0", "-1GB", "1.2.3MB", "12 apples", "GiB"] {
        assert!(size(bad).is_err(), "{bad:?}");
    }
}
