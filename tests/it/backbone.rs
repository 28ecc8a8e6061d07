//! ResNet in torchvision's layout: a reduced-width model saved by torchvision reproduced on the CPU and
//! wgpu backends, the full-size key lists, and weights files that do not fit.

use anomaly_backbone::{Backbone, BackboneError, ResNetConfig, load_weights, torch_state_dict_keys};
use burn::tensor::{Device, Tensor, TensorData};

use crate::common::{HostTensor, fixture, max_abs_diff, read_safetensors, wgpu_device};

/// The fixture's architecture: tools/make_resnet_fixture.py.
fn tiny_config() -> ResNetConfig {
    ResNetConfig::new()
        .with_stem_channels(8)
        .with_planes([8, 16, 32, 32])
        .with_blocks([2, 2, 1, 1])
        .with_base_width(128)
        .with_num_classes(10)
}

fn tiny_resnet(device: &Device) -> Backbone {
    let mut model = Backbone::ResNet(tiny_config().init(device));
    load_weights(&mut model, &fixture("resnet/tiny_resnet.pth")).unwrap();
    model
}

fn check_tiny_resnet(device: &Device, tolerance: f32) {
    let io = read_safetensors(&fixture("resnet/tiny_resnet_io.safetensors"));
    let model = tiny_resnet(device);
    let input = &io["input"];
    let input = Tensor::<4>::from_data(TensorData::new(input.values.clone(), input.shape.clone()), device);
    let features = model.features(input, &["layer1", "layer2", "layer3", "layer4"]);
    let compare = |name: &str, ours: Vec<f32>, shape: Vec<usize>, theirs: &HostTensor| {
        assert_eq!(shape, theirs.shape, "{name} shape");
        let diff = max_abs_diff(&ours, &theirs.values);
        eprintln!("tiny resnet {name}: max abs diff {diff:.2e}");
        assert!(diff <= tolerance, "{name}: max abs diff {diff} > {tolerance}");
    };
    for (name, map) in &features.maps {
        compare(name, host(map.clone().into_data()), map.dims().to_vec(), &io[name.as_str()]);
    }
    let pooled = features.pooled;
    compare("pooled", host(pooled.clone().into_data()), pooled.dims().to_vec(), &io["pooled"]);
    let logits = model.classify(pooled);
    compare("logits", host(logits.clone().into_data()), logits.dims().to_vec(), &io["logits"]);
}

fn host(data: TensorData) -> Vec<f32> {
    data.convert::<f32>().as_slice::<f32>().unwrap().to_vec()
}

#[test]
fn tiny_resnet_matches_torchvision_on_cpu() {
    check_tiny_resnet(&Device::flex(), 1e-4);
}

/// The same network in our CPU kernels (what `--device cpu` runs) against the same torchvision figures.
#[test]
fn tiny_resnet_in_our_cpu_kernels_matches_torchvision() {
    let io = read_safetensors(&fixture("resnet/tiny_resnet_io.safetensors"));
    let mut model = tiny_resnet(&Device::flex());
    model.fold_batch_norms();
    let network = model.on_cpu().expect("a folded ResNet runs in our CPU kernels");
    let input = &io["input"];
    let [batch, _, side, _] = input.shape[..] else { panic!("an NCHW input") };
    let (pooled, maps) = network.features(&input.values, batch, side, &["layer1", "layer2", "layer3", "layer4"], true);
    for map in &maps {
        assert_eq!(map.shape.to_vec(), io[map.name.as_str()].shape, "{} shape", map.name);
        let diff = max_abs_diff(&map.values, &io[map.name.as_str()].values);
        eprintln!("tiny resnet {}, our CPU kernels: max abs diff {diff:.2e}", map.name);
        assert!(diff <= 1e-4, "{}: max abs diff {diff}", map.name);
    }
    let diff = max_abs_diff(&pooled, &io["pooled"].values);
    eprintln!("tiny resnet pooled, our CPU kernels: max abs diff {diff:.2e}");
    assert!(diff <= 1e-4, "pooled: max abs diff {diff}");
}

#[test]
fn tiny_resnet_matches_torchvision_on_wgpu() {
    check_tiny_resnet(&wgpu_device(), 1e-3);
}

/// `key<TAB>d0,d1,…` lines written by tools/list_resnet_keys.py.
fn torchvision_keys(file: &str) -> Vec<(String, Vec<usize>)> {
    std::fs::read_to_string(fixture(file))
        .unwrap()
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let (key, shape) = line.split_once('\t').unwrap_or((line, ""));
            let shape = shape.split(',').filter(|s| !s.is_empty()).map(|d| d.parse().unwrap()).collect();
            (key.to_string(), shape)
        })
        // burn's BatchNorm keeps no step counter; the loader ignores these buffers.
        .filter(|(key, _)| !key.ends_with("num_batches_tracked"))
        .collect()
}

#[test]
fn full_size_resnets_have_torchvision_keys_and_shapes() {
    let device = Device::flex();
    for (config, file) in [
        (ResNetConfig::resnet50(), "resnet/resnet50_state_dict.txt"),
        (ResNetConfig::wide_resnet50_2(), "resnet/wide_resnet50_2_state_dict.txt"),
    ] {
        let ours = torch_state_dict_keys(&Backbone::ResNet(config.init(&device)));
        let mut theirs = torchvision_keys(file);
        let mut ours_sorted = ours.clone();
        ours_sorted.sort();
        theirs.sort();
        let missing: Vec<_> = theirs.iter().filter(|k| !ours_sorted.contains(k)).take(5).collect();
        let extra: Vec<_> = ours_sorted.iter().filter(|k| !theirs.contains(k)).take(5).collect();
        assert!(missing.is_empty() && extra.is_empty(), "{file}: missing {missing:?}, extra {extra:?}");
        assert_eq!(ours_sorted.len(), theirs.len(), "{file}");
        eprintln!("{file}: {} tensors, all keys and shapes equal", theirs.len());
    }
}

#[test]
fn weights_of_another_architecture_are_refused_naming_the_file() {
    let device = Device::flex();
    let path = fixture("resnet/tiny_resnet.pth");
    let mut resnet50 = Backbone::ResNet(ResNetConfig::resnet50().init(&device));
    let error = load_weights(&mut resnet50, &path).unwrap_err();
    assert!(matches!(error, BackboneError::Mismatch { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("tiny_resnet.pth") && message.contains("wrong shape"), "{message}");
    assert!(!message.contains('\n'), "one line: {message}");

    let mut lite0 = Backbone::init(anomaly_backbone::BackboneName::EfficientNetLite0, &device);
    let message = load_weights(&mut lite0, &path).unwrap_err().to_string();
    assert!(
        message.contains("tiny_resnet.pth") && message.contains("missing (_blocks.0.") && message.contains("no place for (conv1.weight"),
        "{message}"
    );
}

#[test]
fn a_weights_file_with_a_missing_tensor_is_refused_naming_the_tensor() {
    let device = Device::flex();
    let path = fixture("resnet/tiny_resnet_missing_tensor.pth");
    let mut model = Backbone::ResNet(tiny_config().init(&device));
    let message = load_weights(&mut model, &path).unwrap_err().to_string();
    assert!(message.contains("tiny_resnet_missing_tensor.pth"), "{message}");
    assert!(message.contains("1 tensor(s) missing (layer2.0.conv2.weight)"), "{message}");
}

#[test]
fn files_that_are_not_checkpoints_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("resnet50-0676ba61.pth");
    std::fs::write(&text, "<html>404 not found</html>").unwrap();
    let mut model = Backbone::ResNet(ResNetConfig::resnet50().init(&Device::flex()));
    let error = load_weights(&mut model, &text).unwrap_err();
    assert!(matches!(error, BackboneError::Unreadable { .. }), "{error}");
    assert!(error.to_string().contains("resnet50-0676ba61.pth"), "{error}");
    let error = load_weights(&mut model, &dir.path().join("absent.pth")).unwrap_err();
    assert!(error.to_string().contains("absent.pth") && error.to_string().contains("no such file"), "{error}");
}
