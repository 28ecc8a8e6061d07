//! PatchCore's patch features: the same numbers as torch.nn.functional (a committed fixture), and the real
//! EfficientNet-Lite0 run over images giving its 28×28 grid of finite patches.

use anomaly_backbone::BackboneName;
use anomaly_data::ImageLimits;
use anomaly_device::ResolvedDevice;
use anomaly_method::patch_features::{PatchLayout, patch_features, reference};
use anomaly_method::{Extractor, HostMap};
use indicatif::ProgressBar;

use crate::common::{fixture, lite0_weights, max_abs_diff, read_safetensors};

#[test]
fn patch_features_match_pytorch() {
    let tensors = read_safetensors(&fixture("patchcore/patch_features.safetensors"));
    for case in ["odd", "even"] {
        let map = |part: &str| {
            let tensor = &tensors[&format!("{case}_{part}")];
            HostMap { name: part.into(), shape: tensor.shape.clone().try_into().unwrap(), values: tensor.values.clone() }
        };
        let (shallow, deep) = (map("shallow"), map("deep"));
        let expected = &tensors[&format!("{case}_patches")];
        let [images, positions, patch_dim] = expected.shape[..] else { panic!("{case}: patches of shape {:?}", expected.shape) };
        for (path, patches) in
            [("fast", patch_features(&shallow, &deep, patch_dim)), ("reference", reference::patch_features(&shallow, &deep, patch_dim))]
        {
            let patches = patches.unwrap();
            assert_eq!((patches.images, patches.per_image(), patches.patch_dim), (images, positions, patch_dim), "{case} {path}");
            assert_eq!(patches.grid, (shallow.shape[2], shallow.shape[3]));
            let diff = max_abs_diff(&patches.values, &expected.values);
            assert!(diff < 1e-5, "{case} {path}: off PyTorch by {diff}");
        }
    }
}

#[test]
fn lite0_gives_a_28_by_28_grid_of_finite_patches() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("fabric");
    let config = anomaly_data::SyntheticConfig { seed: 5, size: 64, train: 2, test_good: 0, per_defect: 0 };
    anomaly_data::write_synthetic_dataset(&root, &config).unwrap();
    let paths = anomaly_data::collect_images(&root.join("train/good")).unwrap().files;
    assert_eq!(paths.len(), 2);

    let device = ResolvedDevice { device: burn::tensor::Device::flex(), adapter: None };
    let extractor = Extractor::load(BackboneName::EfficientNetLite0, &lite0_weights(), device).unwrap();
    let layout = PatchLayout::new(BackboneName::EfficientNetLite0);
    assert_eq!((layout.grid(), layout.patch_dim()), ((28, 28), 152));
    let progress = ProgressBar::hidden();

    let mut batches = Vec::new();
    extractor
        .patches(&layout, paths.clone(), 2, ImageLimits::default(), &progress, |batch, patches| {
            batches.push((batch.len(), patches));
            Ok(())
        })
        .unwrap();
    assert_eq!(batches.len(), 1);
    let (count, patches) = &batches[0];
    assert_eq!((*count, patches.images, patches.grid, patches.patch_dim), (2, 2, (28, 28), 152));
    assert_eq!(patches.values.len(), 2 * 28 * 28 * 152);
    assert!(patches.values.iter().all(|v| v.is_finite()));
    // A backbone that did not run, or a grid filled once, would leave the patches all equal.
    let image = patches.image(0).unwrap();
    assert!(image.iter().any(|v| (v - image[0]).abs() > 1e-3));

    // The same maps through the reference.
    extractor
        .run(paths.clone(), &layout.taps(), 2, ImageLimits::default(), &progress, |_, _, maps| {
            let [shallow, deep] = layout.taps().map(|tap| maps.iter().find(|m| m.name == tap).unwrap());
            let expected = reference::patch_features(shallow, deep, layout.patch_dim()).unwrap();
            let diff = max_abs_diff(&patches.values, &expected.values);
            assert!(diff < 1e-5, "off the reference by {diff}");
            Ok(())
        })
        .unwrap();

    // A layout of another backbone is refused, not run.
    let other = PatchLayout::new(BackboneName::ResNet50);
    let error = extractor.patches(&other, paths, 2, ImageLimits::default(), &progress, |_, _| Ok(())).unwrap_err();
    assert!(error.to_string().contains("resnet50"), "{error}");
}
