//! ImageNet backbones in burn (ResNet50, WideResNet50-2, EfficientNet-Lite0/2) that load the published
//! PyTorch weights by their own key names and hand out pooled features and named intermediate maps.
//! The models run on any burn device: wgpu or the CPU backend, picked at run time.

mod cpu;
mod efficientnet;
mod fold;
mod load;
mod name;
mod resnet;

pub use cpu::{CpuBackbone, EfficientNetLiteCpu, ResNetCpu};
pub use efficientnet::{EfficientNetLite, EfficientNetLiteConfig};
pub use load::{BackboneError, load_weights, torch_state_dict_keys};
pub use name::BackboneName;
pub use resnet::{RESNET_TAPS, ResNet, ResNetConfig};

use burn::module::Module;
use burn::tensor::{Device, Tensor};

/// What a backbone hands out for a batch of images.
#[derive(Clone, Debug)]
pub struct Features {
    /// Global-average-pooled final features, `[batch, channels]`: the seed method's feature vector.
    pub pooled: Tensor<2>,
    /// The intermediate feature maps that were asked for, `[batch, channels, height, width]`, by tap name.
    pub maps: Vec<(String, Tensor<4>)>,
}

/// One feature map of a batch on the host.
#[derive(Clone, Debug)]
pub struct HostMap {
    pub name: String,
    /// `[batch, channels, height, width]`.
    pub shape: [usize; 4],
    pub values: Vec<f32>,
}

/// A loaded backbone, whichever architecture it is. Unboxed although the variants differ in size: a process
/// holds one or two backbones, and burn's `Module` derive walks the variants' fields directly.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Backbone {
    ResNet(ResNet),
    EfficientNet(EfficientNetLite),
}

impl Backbone {
    /// Builds the architecture for `name` with untrained weights (to be replaced by [`load_weights`]).
    pub fn init(name: BackboneName, device: &Device) -> Self {
        match name {
            BackboneName::ResNet50 | BackboneName::ResNet50V2 => Self::ResNet(ResNetConfig::resnet50().init(device)),
            BackboneName::WideResNet50_2 => Self::ResNet(ResNetConfig::wide_resnet50_2().init(device)),
            BackboneName::EfficientNetLite0 => Self::EfficientNet(EfficientNetLiteConfig::lite0().init(device)),
            BackboneName::EfficientNetLite2 => Self::EfficientNet(EfficientNetLiteConfig::lite2().init(device)),
        }
    }

    /// Builds `name` on `device` and loads its PyTorch weights file, ready for inference (BatchNorms folded
    /// into their convolutions).
    pub fn load(name: BackboneName, weights: &std::path::Path, device: &Device) -> Result<Self, BackboneError> {
        let mut backbone = Self::init(name, device);
        load_weights(&mut backbone, weights)?;
        backbone.fold_batch_norms();
        Ok(backbone)
    }

    /// Folds every BatchNorm into the convolution before it: the same function at inference, with four
    /// passes over each activation fewer. Weights cannot be loaded into a folded backbone.
    pub fn fold_batch_norms(&mut self) {
        match self {
            Self::ResNet(model) => model.fold_batch_norms(),
            Self::EfficientNet(model) => model.fold_batch_norms(),
        }
    }

    /// Names of the intermediate feature maps [`Backbone::features`] can return.
    pub fn tap_names(&self) -> Vec<String> {
        match self {
            Self::ResNet(_) => RESNET_TAPS.iter().map(|t| t.to_string()).collect(),
            Self::EfficientNet(model) => model.tap_names(),
        }
    }

    /// Pooled features and the requested taps of a `[batch, 3, height, width]` input.
    pub fn features(&self, input: Tensor<4>, taps: &[&str]) -> Features {
        match self {
            Self::ResNet(model) => model.features(input, taps),
            Self::EfficientNet(model) => model.features(input, taps),
        }
    }

    /// The feature maps named in `taps` (in network order), the network run only as far as the last of
    /// them and no pooled features: the same maps as [`Self::features`] gives, for less work.
    pub fn tap_maps(&self, input: Tensor<4>, taps: &[&str]) -> Vec<(String, Tensor<4>)> {
        match self {
            Self::ResNet(model) => model.tap_maps(input, taps),
            Self::EfficientNet(model) => model.tap_maps(input, taps),
        }
    }

    /// The same network in our CPU kernels, once its BatchNorms are folded (as [`Self::load`] leaves it;
    /// `None` before).
    pub fn on_cpu(&self) -> Option<CpuBackbone> {
        match self {
            Self::ResNet(model) => model.on_cpu().map(CpuBackbone::ResNet),
            Self::EfficientNet(model) => model.on_cpu().map(CpuBackbone::EfficientNet),
        }
    }

    /// ImageNet logits of pooled features, for sanity checks of the weights.
    pub fn classify(&self, pooled: Tensor<2>) -> Tensor<2> {
        match self {
            Self::ResNet(model) => model.classify(pooled),
            Self::EfficientNet(model) => model.classify(pooled),
        }
    }
}

/// Mean over the spatial dimensions: `[batch, channels, h, w]` → `[batch, channels]`.
pub(crate) fn global_average_pool(x: Tensor<4>) -> Tensor<2> {
    let [batch, channels, _, _] = x.dims();
    x.mean_dim(3).mean_dim(2).reshape([batch, channels])
}

/// How many different names `taps` holds (a tap asked for twice is computed once).
pub(crate) fn distinct(taps: &[&str]) -> usize {
    taps.iter().enumerate().filter(|(i, tap)| !taps[..*i].contains(tap)).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn tap_maps_stop_early_with_the_maps_features_gives() {
        let device = Device::flex();
        for (name, taps) in [
            (BackboneName::EfficientNetLite0, vec!["block4", "block10"]),
            (BackboneName::EfficientNetLite0, vec!["block10", "block4", "block4"]),
            (BackboneName::EfficientNetLite0, vec!["block2", "head"]),
            (BackboneName::ResNet50, vec!["layer2", "layer3"]),
        ] {
            let backbone = Backbone::init(name, &device);
            let input = Tensor::<4>::random([2, 3, 64, 64], Distribution::Normal(0.0, 1.0), &device);
            let full = backbone.features(input.clone(), &taps).maps;
            let early = backbone.tap_maps(input, &taps);
            assert_eq!(early.len(), full.len(), "{name} {taps:?}");
            for ((a_name, a), (b_name, b)) in early.into_iter().zip(full) {
                assert_eq!(a_name, b_name);
                assert_eq!(a.into_data(), b.into_data(), "{name}: {a_name}");
            }
        }
    }

    /// Our CPU kernels compute burn's networks: pooled features and every kind of tap (Lite: the first
    /// block, a strided one, a residual one, the head; the ResNets' layers), on odd sizes, at the last tap
    /// when not pooled.
    #[test]
    fn networks_on_cpu_equal_the_burn_networks() {
        let device = Device::flex();
        for (name, side, taps) in [
            (BackboneName::EfficientNetLite0, 67, ["block0", "block2", "block5", "head"]),
            (BackboneName::EfficientNetLite2, 48, ["block0", "block2", "block5", "head"]),
            (BackboneName::ResNet50, 61, ["layer1", "layer2", "layer3", "layer4"]),
            (BackboneName::WideResNet50_2, 32, ["layer1", "layer2", "layer3", "layer4"]),
        ] {
            let mut backbone = Backbone::init(name, &device);
            assert!(backbone.on_cpu().is_none(), "BatchNorms not folded yet");
            backbone.fold_batch_norms();
            let on_cpu = backbone.on_cpu().expect("a folded network");
            assert_eq!(on_cpu.tap_names(), backbone.tap_names());
            let input = Tensor::<4>::random([3, 3, side, side], Distribution::Normal(0.0, 1.0), &device);
            let pixels = input.clone().into_data().try_into_vec_as::<f32>().unwrap();
            let burn = backbone.features(input, &taps);
            let (pooled, maps) = on_cpu.features(&pixels, 3, side, &taps, true);
            let close = |ours: &[f32], theirs: burn::tensor::TensorData, what: &str| {
                let theirs = theirs.try_into_vec_as::<f32>().unwrap();
                assert_eq!(ours.len(), theirs.len(), "{name} {what}");
                let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = ours.iter().zip(&theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff <= 1e-4 * scale.max(1.0), "{name} {what}: differs by {diff} (values up to {scale})");
            };
            close(&pooled, burn.pooled.into_data(), "pooled");
            assert_eq!(maps.len(), taps.len());
            for (ours, (tap, theirs)) in maps.iter().zip(burn.maps) {
                assert_eq!((ours.name.as_str(), ours.shape), (tap.as_str(), theirs.dims()));
                close(&ours.values, theirs.into_data(), &tap);
            }
            let (none, early) = on_cpu.features(&pixels, 3, side, &[taps[1]], false);
            assert!(none.is_empty());
            assert_eq!(early[0].values, maps[1].values, "{name}: {} alone", taps[1]);
        }
    }
}
