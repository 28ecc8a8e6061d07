//! The memory-bank detector on the GPU kernels and on the CPU path: the same bank, scores and threshold,
//! and outliers above the threshold; model files that round-trip, and bad ones refused with the reason.

use anomaly_detector::{Compute, DetectorConfig, DetectorError, FeatureSource, MODEL_VERSION, MemoryBank, Model, ModelError};
use anomaly_kernels::GpuKernels;

use crate::common::{Rng, wgpu_device};

#[test]
fn gpu_and_cpu_fits_agree_and_flag_outliers() {
    wgpu_device();
    let mut rng = Rng::new(21);
    let (images, dim) = (120, 64);
    // Half the columns vary a lot, half barely: the kept columns must be the first half.
    let features: Vec<f32> = (0..images * dim).map(|i| if i % dim < dim / 2 { 2.0 * rng.normal() } else { 0.01 * rng.normal() }).collect();
    let config = DetectorConfig { k: 5, features: dim / 2 };
    let cpu = MemoryBank::fit(&features, dim, config, &Compute::Cpu).unwrap();
    let gpu = MemoryBank::fit(&features, dim, config, &Compute::Gpu(GpuKernels::shared().unwrap())).unwrap();
    assert_eq!(cpu.columns, (0..dim as u32 / 2).collect::<Vec<_>>());
    assert_eq!(gpu.columns, cpu.columns);
    assert_eq!(gpu.rows, cpu.rows);
    for (g, c) in gpu.train_scores.iter().zip(&cpu.train_scores) {
        assert!((g - c).abs() <= 1e-4 * c.max(1.0), "{g} vs {c}");
    }
    assert!((gpu.threshold - cpu.threshold).abs() <= 1e-4 * cpu.threshold);

    let mut outlier: Vec<f32> = features[..dim].to_vec();
    outlier.iter_mut().take(dim / 2).for_each(|v| *v += 12.0);
    let typical: Vec<f32> = (0..dim).map(|c| if c < dim / 2 { 0.5 * rng.normal() } else { 0.0 }).collect();
    let queries = [outlier, typical].concat();
    let gpu_kernels = Compute::Gpu(GpuKernels::shared().unwrap());
    for (name, compute) in [("cpu", &Compute::Cpu), ("gpu", &gpu_kernels)] {
        let scores = cpu.score(&queries, compute).unwrap();
        assert!(scores[0] > cpu.threshold, "{name}: outlier {} vs threshold {}", scores[0], cpu.threshold);
        assert!(scores[1] < cpu.threshold, "{name}: typical {} vs threshold {}", scores[1], cpu.threshold);
    }
}

fn small_model() -> Model {
    let mut rng = Rng::new(8);
    let (images, dim) = (12, 16);
    let features: Vec<f32> = (0..images * dim).map(|_| rng.normal()).collect();
    let bank = MemoryBank::fit(&features, dim, DetectorConfig { k: 3, features: 10 }, &Compute::Cpu).unwrap();
    Model::new(
        bank,
        FeatureSource {
            backbone: "efficientnet-lite0".into(),
            weights_file: "efficientnet-lite0-57934424.pth".into(),
            weights_sha256: "ab".repeat(32),
            preprocess: anomaly_data::Preprocess::imagenet(),
            dataset: "unit".into(),
        },
    )
}

#[test]
fn model_files_round_trip_and_bad_ones_say_why() {
    let model = small_model();
    let bytes = model.to_bytes();
    let path = std::path::Path::new("model.safetensors");
    let read = Model::from_bytes(&bytes, path).unwrap();
    assert_eq!(read, model);
    assert_eq!(read.info.train_scores.count, 12);
    assert!((read.info.threshold as f64 - (read.info.train_scores.mean + 3.0 * read.info.train_scores.std)).abs() < 1e-4);

    let message = |result: Result<Model, ModelError>| result.unwrap_err().to_string();
    let truncated = message(Model::from_bytes(&bytes[..bytes.len() - 100], path));
    assert!(truncated.starts_with("model.safetensors: not an anomaly model file") && truncated.contains("truncated"), "{truncated}");
    assert!(message(Model::from_bytes(b"hello", path)).contains("not an anomaly model file"));

    // A safetensors file of another kind (e.g. a features file), and one from another format version.
    let values = [1.0f32, 2.0];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], bytemuck::cast_slice(&values)).unwrap();
    let features = safetensors::serialize([("pooled", view.clone())], None).unwrap();
    assert!(message(Model::from_bytes(&features, path)).contains("no `format: anomaly-model`"));
    let future = safetensors::serialize(
        [("pooled", view)],
        Some(std::collections::HashMap::from([
            ("format".to_string(), "anomaly-model".to_string()),
            ("version".to_string(), (MODEL_VERSION + 1).to_string()),
        ])),
    )
    .unwrap();
    let version = message(Model::from_bytes(&future, path));
    assert!(version.contains(&format!("version {}", MODEL_VERSION + 1)) && version.contains("upgrade anomaly"), "{version}");
}

#[test]
fn k_beyond_the_bank_is_refused_before_scoring() {
    let mut model = small_model();
    model.bank.config.k = 13;
    assert!(matches!(model.bank.score(&[0.0; 16], &Compute::Cpu), Err(DetectorError::KTooLarge { k: 13, rows: 12 })));
    model.info.config.k = 13;
    let error = Model::from_bytes(&model.to_bytes(), std::path::Path::new("m.safetensors")).unwrap_err().to_string();
    assert!(error.contains("k = 13 but the bank has 12 rows"), "{error}");
    let zero_features = DetectorConfig { k: 3, features: 0 }.check(100).unwrap_err().to_string();
    assert!(zero_features.contains("features ≥ 1"), "{zero_features}");
}

#[test]
fn a_scorer_on_the_gpu_matches_the_cpu_over_batches() {
    wgpu_device();
    let model = small_model();
    let mut rng = Rng::new(9);
    let queries: Vec<f32> = (0..5 * 16).map(|_| rng.normal()).collect();
    let gpu = Compute::Gpu(GpuKernels::shared().unwrap());
    let cpu_scores = model.bank.score(&queries, &Compute::Cpu).unwrap();
    let scorer = model.bank.scorer(&gpu).unwrap();
    let batched: Vec<f32> = queries.chunks(2 * 16).flat_map(|batch| scorer.score(batch).unwrap()).collect();
    for (g, c) in batched.iter().zip(&cpu_scores) {
        assert!((g - c).abs() <= 1e-4 * c.max(1.0), "{g} vs {c}");
    }
}
