//! EfficientNet-Lite in the EfficientNet-PyTorch layout (`_conv_stem`, `_blocks.N._depthwise_conv`, …):
//! ReLU6, no squeeze-excitation, BatchNorm eps 1e-3, TensorFlow "SAME" padding, fixed stem and head.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor};

use crate::cpu::{ConvWeights, EfficientNetLiteCpu, LiteBlock};
use crate::fold::{fold_batch_norm, normalise};
use crate::{Features, distinct, global_average_pool};

/// The Lite family's stage list (TensorFlow's `efficientnet_lite_builder`): repeats, kernel, stride,
/// expand ratio, input and output channels, before width and depth scaling.
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];
const STEM_CHANNELS: usize = 32;
const HEAD_CHANNELS: usize = 1280;
const BN_EPSILON: f64 = 1e-3;

/// Size of an EfficientNet-Lite model: Lite0 is width 1.0 / depth 1.0, Lite2 width 1.1 / depth 1.2.
#[derive(Config, Debug)]
pub struct EfficientNetLiteConfig {
    /// Channel multiplier of the blocks (the stem and head stay fixed in the Lite family).
    pub width: f64,
    /// Repeat multiplier of the inner stages (the first and last stages stay fixed).
    pub depth: f64,
    /// Classes of the ImageNet classifier head.
    #[config(default = 1000)]
    pub num_classes: usize,
}

impl EfficientNetLiteConfig {
    /// EfficientNet-Lite0 (4.65M parameters, trained at 224 px).
    pub fn lite0() -> Self {
        Self::new(1.0, 1.0)
    }

    /// EfficientNet-Lite2 (6.09M parameters, trained at 260 px).
    pub fn lite2() -> Self {
        Self::new(1.1, 1.2)
    }

    /// The expanded list of blocks as (kernel, stride, expand ratio, input and output channels).
    fn blocks(&self) -> Vec<BlockShape> {
        let mut blocks = Vec::new();
        for (index, &(repeats, kernel, stride, expand, input, output)) in STAGES.iter().enumerate() {
            let fixed = index == 0 || index == STAGES.len() - 1;
            let repeats = if fixed { repeats } else { (self.depth * repeats as f64).ceil() as usize };
            let input = if index == 0 { STEM_CHANNELS } else { self.round_channels(input) };
            let output = self.round_channels(output);
            for repeat in 0..repeats {
                let (input, stride) = if repeat == 0 { (input, stride) } else { (output, 1) };
                blocks.push(BlockShape { kernel, stride, expand, input, output });
            }
        }
        blocks
    }

    /// TensorFlow's `round_filters`: scale, round to a multiple of 8, never more than 10% down.
    fn round_channels(&self, channels: usize) -> usize {
        const DIVISOR: usize = 8;
        let scaled = channels as f64 * self.width;
        let rounded = ((scaled + DIVISOR as f64 / 2.0) as usize / DIVISOR * DIVISOR).max(DIVISOR);
        if (rounded as f64) < 0.9 * scaled { rounded + DIVISOR } else { rounded }
    }

    /// Builds the network with freshly initialised weights, to be overwritten by a weights file.
    pub fn init(&self, device: &Device) -> EfficientNetLite {
        let blocks = self.blocks();
        let last = blocks.last().map_or(STEM_CHANNELS, |b| b.output);
        EfficientNetLite {
            conv_stem: same_conv([3, STEM_CHANNELS], 3, 2, 1, device),
            bn0: Some(batch_norm(STEM_CHANNELS, device)),
            blocks: blocks.iter().map(|shape| MbConvBlock::new(shape, device)).collect(),
            conv_head: same_conv([last, HEAD_CHANNELS], 1, 1, 1, device),
            bn1: Some(batch_norm(HEAD_CHANNELS, device)),
            fc: LinearConfig::new(HEAD_CHANNELS, self.num_classes).init(device),
        }
    }
}

struct BlockShape {
    kernel: usize,
    stride: usize,
    expand: usize,
    input: usize,
    output: usize,
}

fn same_conv(channels: [usize; 2], kernel: usize, stride: usize, groups: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new(channels, [kernel, kernel])
        .with_stride([stride, stride])
        .with_groups(groups)
        .with_padding(PaddingConfig2d::Same)
        .with_bias(false)
        .init(device)
}

fn batch_norm(channels: usize, device: &Device) -> BatchNorm {
    BatchNormConfig::new(channels).with_epsilon(BN_EPSILON).init(device)
}

fn relu6(x: Tensor<4>) -> Tensor<4> {
    x.clamp(0.0, 6.0)
}

/// EfficientNet-Lite; field names are the state_dict's with the leading underscores dropped.
#[derive(Module, Debug)]
pub struct EfficientNetLite {
    conv_stem: Conv2d,
    bn0: Option<BatchNorm>,
    blocks: Vec<MbConvBlock>,
    conv_head: Conv2d,
    bn1: Option<BatchNorm>,
    fc: Linear,
}

impl EfficientNetLite {
    /// Names of the feature maps this model can hand out: the output of every block, and the head.
    pub fn tap_names(&self) -> Vec<String> {
        (0..self.blocks.len()).map(|i| format!("block{i}")).chain(["head".to_string()]).collect()
    }

    /// Runs the network up to global average pooling, keeping the block outputs named in `taps`.
    pub fn features(&self, input: Tensor<4>, taps: &[&str]) -> Features {
        let mut x = relu6(normalise(&self.bn0, self.conv_stem.forward(input)));
        let mut maps = Vec::new();
        for (index, block) in self.blocks.iter().enumerate() {
            x = block.forward(x);
            let name = format!("block{index}");
            if taps.contains(&name.as_str()) {
                maps.push((name, x.clone()));
            }
        }
        let x = relu6(normalise(&self.bn1, self.conv_head.forward(x)));
        if taps.contains(&"head") {
            maps.push(("head".to_string(), x.clone()));
        }
        Features { pooled: global_average_pool(x), maps }
    }

    /// The feature maps named in `taps` alone, running the network only as far as the last of them:
    /// PatchCore's taps are mid-network, and the blocks after them and the head are a third of the work.
    pub fn tap_maps(&self, input: Tensor<4>, taps: &[&str]) -> Vec<(String, Tensor<4>)> {
        let wanted = distinct(taps);
        let mut x = relu6(normalise(&self.bn0, self.conv_stem.forward(input)));
        let mut maps = Vec::new();
        for (index, block) in self.blocks.iter().enumerate() {
            if maps.len() == wanted {
                return maps;
            }
            x = block.forward(x);
            let name = format!("block{index}");
            if taps.contains(&name.as_str()) {
                maps.push((name, x.clone()));
            }
        }
        if maps.len() < wanted && taps.contains(&"head") {
            maps.push(("head".to_string(), relu6(normalise(&self.bn1, self.conv_head.forward(x)))));
        }
        maps
    }

    /// Folds every BatchNorm into its convolution, for inference.
    pub(crate) fn fold_batch_norms(&mut self) {
        fold_batch_norm(&mut self.conv_stem, &mut self.bn0);
        fold_batch_norm(&mut self.conv_head, &mut self.bn1);
        for block in &mut self.blocks {
            if let Some(conv) = &mut block.expand_conv {
                fold_batch_norm(conv, &mut block.bn0);
            }
            fold_batch_norm(&mut block.depthwise_conv, &mut block.bn1);
            fold_batch_norm(&mut block.project_conv, &mut block.bn2);
        }
    }

    /// The same network for our CPU kernels, once every BatchNorm is folded (`None` before).
    pub(crate) fn on_cpu(&self) -> Option<EfficientNetLiteCpu> {
        let folded =
            self.bn0.is_none() && self.bn1.is_none() && self.blocks.iter().all(|b| b.bn0.is_none() && b.bn1.is_none() && b.bn2.is_none());
        if !folded {
            return None;
        }
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                LiteBlock::new(
                    b.expand_conv.as_ref().map(ConvWeights::read),
                    ConvWeights::read(&b.depthwise_conv),
                    ConvWeights::read(&b.project_conv),
                    b.skip,
                )
            })
            .collect();
        Some(EfficientNetLiteCpu::new(ConvWeights::read(&self.conv_stem), blocks, ConvWeights::read(&self.conv_head)))
    }

    /// ImageNet logits from the classifier head (dropout is a no-op at inference).
    pub fn classify(&self, pooled: Tensor<2>) -> Tensor<2> {
        self.fc.forward(pooled)
    }
}

/// Mobile inverted bottleneck without squeeze-excitation: optional 1×1 expansion, depthwise k×k,
/// 1×1 projection, identity shortcut when the shape is kept.
#[derive(Module, Debug)]
pub struct MbConvBlock {
    expand_conv: Option<Conv2d>,
    bn0: Option<BatchNorm>,
    depthwise_conv: Conv2d,
    bn1: Option<BatchNorm>,
    project_conv: Conv2d,
    bn2: Option<BatchNorm>,
    skip: bool,
}

impl MbConvBlock {
    fn new(shape: &BlockShape, device: &Device) -> Self {
        let hidden = shape.input * shape.expand;
        let expands = shape.expand != 1;
        Self {
            expand_conv: expands.then(|| same_conv([shape.input, hidden], 1, 1, 1, device)),
            bn0: expands.then(|| batch_norm(hidden, device)),
            depthwise_conv: same_conv([hidden, hidden], shape.kernel, shape.stride, hidden, device),
            bn1: Some(batch_norm(hidden, device)),
            project_conv: same_conv([hidden, shape.output], 1, 1, 1, device),
            bn2: Some(batch_norm(shape.output, device)),
            skip: shape.stride == 1 && shape.input == shape.output,
        }
    }

    fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let x = match &self.expand_conv {
            Some(conv) => relu6(normalise(&self.bn0, conv.forward(input.clone()))),
            None => input.clone(),
        };
        let x = relu6(normalise(&self.bn1, self.depthwise_conv.forward(x)));
        let x = normalise(&self.bn2, self.project_conv.forward(x));
        if self.skip { x + input } else { x }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lite0_and_lite2_have_the_published_block_counts_and_widths() {
        let lite0 = EfficientNetLiteConfig::lite0().blocks();
        assert_eq!(lite0.len(), 16);
        assert_eq!(lite0[4].output, 40);
        assert_eq!(lite0[10].output, 112);
        let lite2 = EfficientNetLiteConfig::lite2().blocks();
        assert_eq!(lite2.len(), 1 + 3 + 3 + 4 + 4 + 5 + 1);
        let outputs: Vec<usize> = lite2.iter().map(|b| b.output).collect();
        assert!(outputs.contains(&120) && outputs.contains(&208) && outputs.ends_with(&[352]));
    }
}
