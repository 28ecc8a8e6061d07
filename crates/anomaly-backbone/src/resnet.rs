//! ResNet with bottleneck blocks in torchvision's layout (ResNet50, WideResNet50-2), so that the official
//! `.pth` files load by their own key names.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use crate::cpu::{ConvWeights, ResNetBlock, ResNetCpu};
use crate::fold::{fold_batch_norm, normalise};
use crate::{Features, global_average_pool};

/// Shape of a bottleneck ResNet: torchvision's `ResNet(Bottleneck, blocks, width_per_group=base_width)`,
/// with the stem and stage widths open so that small models of the same architecture can be built.
#[derive(Config, Debug)]
pub struct ResNetConfig {
    /// Output channels of the 7×7 stem convolution (64 in torchvision).
    #[config(default = 64)]
    pub stem_channels: usize,
    /// `planes` of each of the four stages; a stage outputs `4 × planes` channels.
    #[config(default = "[64, 128, 256, 512]")]
    pub planes: [usize; 4],
    /// Bottleneck blocks per stage.
    #[config(default = "[3, 4, 6, 3]")]
    pub blocks: [usize; 4],
    /// torchvision's `width_per_group`: the bottleneck's inner width is `planes × base_width / 64`.
    #[config(default = 64)]
    pub base_width: usize,
    /// Classes of the ImageNet classifier head kept for completeness (features do not use it).
    #[config(default = 1000)]
    pub num_classes: usize,
}

impl ResNetConfig {
    /// torchvision's `resnet50`.
    pub fn resnet50() -> Self {
        Self::new()
    }

    /// torchvision's `wide_resnet50_2`: bottlenecks twice as wide.
    pub fn wide_resnet50_2() -> Self {
        Self::new().with_base_width(128)
    }

    /// Builds the network with freshly initialised weights, to be overwritten by a weights file.
    pub fn init(&self, device: &Device) -> ResNet {
        let mut in_channels = self.stem_channels;
        let mut stage = |index: usize| {
            let stride = if index == 0 { 1 } else { 2 };
            let planes = self.planes[index];
            let width = planes * self.base_width / 64;
            let out_channels = planes * EXPANSION;
            let layers = (0..self.blocks[index])
                .map(|block| {
                    let block_in = if block == 0 { in_channels } else { out_channels };
                    let block_stride = if block == 0 { stride } else { 1 };
                    Bottleneck::new(block_in, width, out_channels, block_stride, device)
                })
                .collect();
            in_channels = out_channels;
            layers
        };
        let (layer1, layer2, layer3, layer4) = (stage(0), stage(1), stage(2), stage(3));
        ResNet {
            conv1: Conv2dConfig::new([3, self.stem_channels], [7, 7])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(3, 3, 3, 3))
                .with_bias(false)
                .init(device),
            bn1: Some(BatchNormConfig::new(self.stem_channels).init(device)),
            maxpool: MaxPool2dConfig::new([3, 3]).with_strides([2, 2]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(),
            layer1,
            layer2,
            layer3,
            layer4,
            fc: LinearConfig::new(in_channels, self.num_classes).init(device),
        }
    }
}

const EXPANSION: usize = 4;

/// A bottleneck ResNet; field names are torchvision's state_dict names.
#[derive(Module, Debug)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: Option<BatchNorm>,
    maxpool: MaxPool2d,
    layer1: Vec<Bottleneck>,
    layer2: Vec<Bottleneck>,
    layer3: Vec<Bottleneck>,
    layer4: Vec<Bottleneck>,
    fc: Linear,
}

/// The feature maps a ResNet can hand out besides its pooled features.
pub const RESNET_TAPS: [&str; 4] = ["layer1", "layer2", "layer3", "layer4"];

impl ResNet {
    /// Runs the network up to global average pooling, keeping the stage outputs named in `taps`.
    pub fn features(&self, input: Tensor<4>, taps: &[&str]) -> Features {
        let x = relu(normalise(&self.bn1, self.conv1.forward(input)));
        let mut x = self.maxpool.forward(x);
        let mut maps = Vec::new();
        for (name, layer) in RESNET_TAPS.iter().zip([&self.layer1, &self.layer2, &self.layer3, &self.layer4]) {
            x = layer.iter().fold(x, |x, block| block.forward(x));
            if taps.contains(name) {
                maps.push((name.to_string(), x.clone()));
            }
        }
        Features { pooled: global_average_pool(x), maps }
    }

    /// The feature maps named in `taps` alone, running the network only as far as the last of them
    /// (PatchCore's layer2 and layer3 leave layer4 out).
    pub fn tap_maps(&self, input: Tensor<4>, taps: &[&str]) -> Vec<(String, Tensor<4>)> {
        let wanted = crate::distinct(taps);
        let x = relu(normalise(&self.bn1, self.conv1.forward(input)));
        let mut x = self.maxpool.forward(x);
        let mut maps = Vec::new();
        for (name, layer) in RESNET_TAPS.iter().zip([&self.layer1, &self.layer2, &self.layer3, &self.layer4]) {
            if maps.len() == wanted {
                break;
            }
            x = layer.iter().fold(x, |x, block| block.forward(x));
            if taps.contains(name) {
                maps.push((name.to_string(), x.clone()));
            }
        }
        maps
    }

    /// Folds every BatchNorm into its convolution, for inference.
    pub(crate) fn fold_batch_norms(&mut self) {
        fold_batch_norm(&mut self.conv1, &mut self.bn1);
        for block in [&mut self.layer1, &mut self.layer2, &mut self.layer3, &mut self.layer4].into_iter().flatten() {
            fold_batch_norm(&mut block.conv1, &mut block.bn1);
            fold_batch_norm(&mut block.conv2, &mut block.bn2);
            fold_batch_norm(&mut block.conv3, &mut block.bn3);
            if let Some(down) = &mut block.downsample {
                fold_batch_norm(&mut down.conv, &mut down.bn);
            }
        }
    }

    /// ImageNet logits from the classifier head.
    pub fn classify(&self, pooled: Tensor<2>) -> Tensor<2> {
        self.fc.forward(pooled)
    }

    /// The same network for our CPU kernels, once every BatchNorm is folded (`None` before).
    pub(crate) fn on_cpu(&self) -> Option<ResNetCpu> {
        let layers = [&self.layer1, &self.layer2, &self.layer3, &self.layer4];
        let folded = self.bn1.is_none()
            && layers
                .iter()
                .flat_map(|layer| layer.iter())
                .all(|b| b.bn1.is_none() && b.bn2.is_none() && b.bn3.is_none() && b.downsample.as_ref().is_none_or(|d| d.bn.is_none()));
        if !folded {
            return None;
        }
        let layer = |blocks: &Vec<Bottleneck>| {
            blocks
                .iter()
                .map(|b| {
                    ResNetBlock::new(
                        ConvWeights::read(&b.conv1),
                        ConvWeights::read(&b.conv2),
                        ConvWeights::read(&b.conv3),
                        b.downsample.as_ref().map(|d| ConvWeights::read(&d.conv)),
                    )
                })
                .collect()
        };
        Some(ResNetCpu::new(ConvWeights::read(&self.conv1), layers.map(layer)))
    }
}

/// torchvision's `Bottleneck`: 1×1 reduce, 3×3 (strided), 1×1 expand, plus a projection shortcut where
/// the shape changes.
#[derive(Module, Debug)]
pub struct Bottleneck {
    conv1: Conv2d,
    bn1: Option<BatchNorm>,
    conv2: Conv2d,
    bn2: Option<BatchNorm>,
    conv3: Conv2d,
    bn3: Option<BatchNorm>,
    downsample: Option<Downsample>,
}

/// The projection shortcut, torchvision's `downsample = Sequential(conv1x1, BatchNorm2d)`, whose keys
/// `downsample.0` / `downsample.1` are remapped to `downsample.conv` / `downsample.bn` on load.
#[derive(Module, Debug)]
pub struct Downsample {
    conv: Conv2d,
    bn: Option<BatchNorm>,
}

impl Bottleneck {
    fn new(in_channels: usize, width: usize, out_channels: usize, stride: usize, device: &Device) -> Self {
        let conv = |channels: [usize; 2], kernel: usize, stride: usize| {
            let pad = kernel / 2;
            Conv2dConfig::new(channels, [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_bias(false)
                .init(device)
        };
        let downsample = (stride != 1 || in_channels != out_channels).then(|| Downsample {
            conv: conv([in_channels, out_channels], 1, stride),
            bn: Some(BatchNormConfig::new(out_channels).init(device)),
        });
        Self {
            conv1: conv([in_channels, width], 1, 1),
            bn1: Some(BatchNormConfig::new(width).init(device)),
            conv2: conv([width, width], 3, stride),
            bn2: Some(BatchNormConfig::new(width).init(device)),
            conv3: conv([width, out_channels], 1, 1),
            bn3: Some(BatchNormConfig::new(out_channels).init(device)),
            downsample,
        }
    }

    fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let x = relu(normalise(&self.bn1, self.conv1.forward(input.clone())));
        let x = relu(normalise(&self.bn2, self.conv2.forward(x)));
        let x = normalise(&self.bn3, self.conv3.forward(x));
        let identity = match &self.downsample {
            Some(down) => normalise(&down.bn, down.conv.forward(input)),
            None => input,
        };
        relu(x + identity)
    }
}
