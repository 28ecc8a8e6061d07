//! PatchCore end to end on the synthetic fabric with the real EfficientNet-Lite0 weights: fit, eval
//! (image and pixel metrics), predict, and maps that point at the defect.

use std::path::{Path, PathBuf};

use anomaly_data::{Dataset, ImageLimits, Label, Split, SyntheticConfig, write_synthetic_dataset};
use anomaly_method::{MethodName, MethodSettings, Runtime};

use crate::cli::{anomaly, predict_as_reported, stderr, weights_dir};
use crate::common::lite0_weights;

fn synthetic(root: &Path, seed: u64) {
    let config = SyntheticConfig { seed, size: 96, train: 8, test_good: 3, per_defect: 2 };
    write_synthetic_dataset(root, &config).unwrap();
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn patchcore_fits_evaluates_with_pixel_metrics_and_predicts_the_same_scores() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fabric");
    synthetic(&data, 31);
    let (model, weights) = (dir.path().join("pc.safetensors"), weights_dir());
    let common = ["--device", "cpu", "--offline", "--weights-dir", weights.to_str().unwrap()];
    let fit =
        [&["fit", "--method", "patchcore", "--data", data.to_str().unwrap(), "--model", model.to_str().unwrap(), "--json"], &common[..]];
    let output = anomaly(&fit.concat());
    assert!(output.status.success(), "{}", stderr(&output));
    let fitted: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let info = &fitted["info"];
    assert_eq!(info["method"], "patchcore");
    assert_eq!(info["taps"], serde_json::json!(["block4", "block10"]));
    // 8 images of 28 × 28 patches, 10% kept.
    assert_eq!(info["train_patches"].as_u64(), Some(8 * 784));
    assert_eq!(info["bank_rows"].as_u64(), Some((8 * 784usize).div_ceil(10) as u64));
    assert!(info["threshold"].as_f64().unwrap() > 0.0 && info["pixel_threshold"].as_f64().unwrap() > 0.0);

    let report = dir.path().join("report");
    let eval = [
        &["eval", "--data", data.to_str().unwrap(), "--model", model.to_str().unwrap(), "--report", report.to_str().unwrap()],
        &common[..],
    ];
    let output = anomaly(&eval.concat());
    assert!(output.status.success(), "{}", stderr(&output));
    let metrics = read_json(&report.join("metrics.json"));
    assert_eq!(metrics["method"], "patchcore");
    assert_eq!(metrics["bank_rows"], info["bank_rows"]);
    for key in ["image_auroc", "pixel_auroc", "pixel_auroc_crop", "aupro", "threshold", "pixel_threshold"] {
        assert!(metrics[key].is_number(), "{key}: {metrics}");
    }
    assert!(metrics["pixel_threshold_f1"]["threshold"].is_number(), "{metrics}");
    assert!(report.join("heatmaps.png").is_file());
    // The fabric's defects are plain to see: PatchCore finds them all.
    assert!(metrics["image_auroc"].as_f64().unwrap() > 0.9, "{metrics}");
    assert!(metrics["pixel_auroc"].as_f64().unwrap() > 0.9, "{metrics}");
    assert!(metrics["aupro"].as_f64().unwrap() > 0.5, "{metrics}");

    for prediction in predict_as_reported(&model, &data.join("test"), &common, &report) {
        // Every map peaks at or below its image's worst patch (the blur averages), and an anomalous
        // image's region above the pixel threshold is boxed inside the image.
        assert!(prediction["map_max"].as_f64().unwrap() <= prediction["score"].as_f64().unwrap() + 1e-4, "{prediction}");
        if prediction["map_max"].as_f64().unwrap() > info["pixel_threshold"].as_f64().unwrap() {
            let bbox = &prediction["bbox"];
            let (x, width) = (bbox["x"].as_u64().unwrap(), bbox["width"].as_u64().unwrap());
            let (y, height) = (bbox["y"].as_u64().unwrap(), bbox["height"].as_u64().unwrap());
            assert!(width > 0 && height > 0 && x + width <= 96 && y + height <= 96, "{prediction}");
        } else {
            assert!(prediction["bbox"].is_null(), "{prediction}");
        }
    }

    // A test image of another size and shape than the training images is scored all the same.
    let odd = dir.path().join("odd.png");
    let image = image::open(data.join("test/good/000.png")).unwrap();
    image.resize_exact(150, 70, image::imageops::FilterType::Triangle).save(&odd).unwrap();
    let output = anomaly(&[&["predict", "--model", model.to_str().unwrap(), odd.to_str().unwrap(), "--json"], &common[..]].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    let prediction: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(prediction["score"].as_f64().unwrap() > 0.0, "{prediction}");

    // One training image cannot give a leave-one-out threshold: one line says so, and no model is written.
    let single = dir.path().join("single");
    std::fs::create_dir(&single).unwrap();
    std::fs::copy(data.join("train/good/000.png"), single.join("only.png")).unwrap();
    let never = dir.path().join("never.safetensors");
    let fit_one = [&["fit", "--method", "patchcore", "--data", single.to_str().unwrap(), "--model", never.to_str().unwrap()], &common[..]];
    let output = anomaly(&fit_one.concat());
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("PatchCore needs at least 2 training images") && message.lines().count() == 1, "{message}");
    assert!(!never.exists());
}

#[test]
fn a_patchcore_map_peaks_inside_the_mask_of_each_defect() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fabric");
    synthetic(&data, 32);
    let dataset = Dataset::mvtec(&data).unwrap();
    let weights = lite0_weights();
    let device = anomaly_device::ResolvedDevice { device: burn::tensor::Device::flex(), adapter: None };
    let folder = weights.parent().unwrap().to_path_buf();
    let runtime = Runtime::new(device, &folder, Box::new(move |_| Ok(weights.clone())), 4, ImageLimits::default());
    let train: Vec<PathBuf> = dataset.split(Split::Train).map(|s| s.path.clone()).collect();
    let detector = anomaly_method::fit(MethodName::Patchcore, &MethodSettings::default(), &train, "fabric", &runtime).unwrap();
    assert_eq!(detector.method(), MethodName::Patchcore);
    let defective: Vec<_> = dataset.split(Split::Test).filter(|s| s.label == Label::Defective && s.mask.is_some()).collect();
    let paths = defective.iter().map(|s| s.path.clone()).collect();
    let mut outputs = Vec::new();
    anomaly_method::score_paths(detector.as_ref(), paths, 4, ImageLimits::default(), |_, batch| {
        outputs.extend(batch);
        Ok(())
    })
    .unwrap();
    let preprocess = detector.preprocess();
    let side = preprocess.crop as usize;
    for (sample, output) in defective.iter().zip(&outputs) {
        let map = output.map.as_ref().expect("PatchCore maps every image");
        assert_eq!(map.len(), side * side);
        let peak = map.iter().enumerate().fold((0, f32::MIN), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0;
        let mask = preprocess.read_mask(sample.mask.as_ref().unwrap(), &ImageLimits::default()).unwrap();
        // Within a patch (8 px) of the mask: the map is blurred and its grid is the patches'.
        let near = |i: usize| {
            let (y, x) = ((i / side) as isize, (i % side) as isize);
            (-8..=8).any(|dy| {
                (-8..=8).any(|dx| {
                    let (yy, xx) = (y + dy, x + dx);
                    (0..side as isize).contains(&yy) && (0..side as isize).contains(&xx) && mask[yy as usize * side + xx as usize]
                })
            })
        };
        assert!(near(peak), "{}: the map peaks at ({}, {}), away from the defect", sample.path.display(), peak / side, peak % side);
        assert!(output.score > detector.threshold(), "{}: {} ≤ threshold {}", sample.path.display(), output.score, detector.threshold());
    }
}

#[test]
fn a_patchcore_bank_is_the_same_on_wgpu_chunked_or_not_as_on_the_cpu() {
    use anomaly_detector::Compute;
    use anomaly_kernels::{GpuKernels, KernelLimits};
    use anomaly_patchcore::{PatchBank, PatchCoreConfig, PatchGeometry};

    crate::common::wgpu_device();
    let geometry = PatchGeometry { grid: (6, 6), patch_dim: 40, side: 48 };
    let mut rng = crate::common::Rng::new(12);
    // Six images of clustered patches, as real ones are: a few textures plus noise.
    let textures = rng.normals(5 * geometry.patch_dim, 0.0, 1.0);
    let patches: Vec<f32> = (0..6 * geometry.per_image())
        .flat_map(|p| {
            let texture = &textures[(p * 7 % 5) * geometry.patch_dim..][..geometry.patch_dim];
            texture.iter().zip(rng.normals(geometry.patch_dim, 0.0, 0.2)).map(|(t, n)| t + n).collect::<Vec<_>>()
        })
        .collect();
    let config = PatchCoreConfig { coreset_ratio: 0.25, projection: 16, ..PatchCoreConfig::default() };
    let cpu = PatchBank::fit(&patches, geometry, config, &Compute::Cpu).unwrap();
    let whole = GpuKernels::shared().unwrap();
    // 4 KiB bindings and uploads split the bank (54 rows of 160 bytes) into 3 chunks, the 216 training
    // patches into 9 uploads for the leave-one-out, and the coreset's projected points (64 bytes each)
    // into 4.
    let limits = KernelLimits { max_binding_bytes: 4096, max_upload_bytes: 4096, ..whole.limits() };
    let small = GpuKernels::shared().unwrap().with_limits(limits);
    for (name, kernels) in [("whole", whole), ("4 KiB bindings", small)] {
        let gpu = PatchBank::fit(&patches, geometry, config, &Compute::Gpu(kernels)).unwrap();
        assert_eq!(gpu.rows(), cpu.rows(), "{name}: the coreset picked other patches");
        for (g, c) in gpu.train_scores().iter().zip(cpu.train_scores()).chain(gpu.train_map_maxima().iter().zip(cpu.train_map_maxima())) {
            assert!((g - c).abs() <= 1e-4 * c.max(1.0), "{name}: {g} vs {c}");
        }
    }
    // A bank streamed through the GPU 10 rows at a time finds each patch's nearest row, as the CPU does.
    let streamed = anomaly_patchcore::nearest_in_chunks(
        &patches,
        geometry.patch_dim,
        cpu.row_chunks(10 * geometry.patch_dim * 4),
        &Compute::Gpu(GpuKernels::shared().unwrap()),
    )
    .unwrap();
    let expected = anomaly_kernels::cpu::fast::knn(&patches, cpu.rows(), geometry.patch_dim, 1);
    assert_eq!(streamed.indices, expected.indices);
    // (A patch that is itself a bank row is at 0, which the GPU's |q|² + |b|² - 2 q·b leaves at
    // rounding's square root: the squares agree within f32 rounding of the norms, ~40 here.)
    for (g, c) in streamed.distances.iter().zip(&expected.distances) {
        assert!((g - c).abs() <= 1e-4 * c.max(1.0) || (g * g - c * c).abs() <= 1e-4, "streamed: {g} vs {c}");
    }
}

#[test]
fn a_fit_over_its_memory_budget_spills_to_disk_and_writes_the_in_memory_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fabric");
    synthetic(&data, 33);
    let weights = weights_dir();
    let common = ["--device", "cpu", "--offline", "--weights-dir", weights.to_str().unwrap()];
    let fit = |model: &Path, extra: &[&str]| {
        let args =
            [&["fit", "--method", "patchcore", "--data", data.to_str().unwrap(), "--model", model.to_str().unwrap()], &common[..], extra];
        anomaly(&args.concat())
    };
    let in_memory = dir.path().join("in-memory.safetensors");
    let output = fit(&in_memory, &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("the training patches stay in memory"), "{}", stderr(&output));

    // 8 images of 784 patches: the coreset's 128-d projection on the 8-bit grid with an index, a minimum and
    // its pick each (5/4 of it), 2 KiB for each of its 628 picks, and its bank of 152-d patches (twice) take 3.1 MB;
    // each image's patches with their neighbours 0.53 MB. 4.4 MB leaves room for two at a time.
    let spill = dir.path().join("spill");
    std::fs::create_dir(&spill).unwrap();
    let spilled = dir.path().join("spilled.safetensors");
    let output = fit(&spilled, &["--memory-budget", "4400KB", "--spill-dir", spill.to_str().unwrap()]);
    let message = stderr(&output);
    assert!(output.status.success(), "{message}");
    assert!(message.contains("spill to") && message.contains("read back 2 images at a time"), "{message}");
    assert!(std::fs::read(&spilled).unwrap() == std::fs::read(&in_memory).unwrap(), "the same model file");
    assert_eq!(std::fs::read_dir(&spill).unwrap().count(), 0, "the spill file is removed");

    // Below the coreset, the bank and one image: refused before any image is read, naming the minimum.
    let never = dir.path().join("never.safetensors");
    let output = fit(&never, &["--memory-budget", "3MB"]);
    let message = stderr(&output);
    assert!(!output.status.success());
    assert!(message.contains("a memory budget of 2.86 MiB is too small") && message.contains("at least 3.50 MiB"), "{message}");
    assert!(!never.exists());

    // A disk that fills while spilling (a file-size limit, with its signal ignored so the write fails as
    // on a full disk): an error naming the spill file, which is removed, and no model.
    let script = "trap '' XFSZ; ulimit -f 1024; exec \"$0\" \"$@\"";
    let args = [
        &["fit", "--method", "patchcore", "--data", data.to_str().unwrap(), "--model", never.to_str().unwrap()],
        &common[..],
        &["--memory-budget", "4400KB", "--spill-dir", spill.to_str().unwrap()],
    ]
    .concat();
    let output = std::process::Command::new("sh").arg("-c").arg(script).arg(env!("CARGO_BIN_EXE_anomaly")).args(&args).output().unwrap();
    let message = stderr(&output);
    assert!(!output.status.success());
    assert!(message.contains(&format!("spilling the training patches to {}", spill.display())), "{message}");
    assert!(message.contains("--spill-dir"), "{message}");
    assert_eq!(std::fs::read_dir(&spill).unwrap().count(), 0, "the spill file is removed");
    assert!(!never.exists());
}
