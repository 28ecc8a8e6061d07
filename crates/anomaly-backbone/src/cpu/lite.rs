//! EfficientNet-Lite in our CPU kernels: the stem (3×3, stride 2, "SAME") as a product over its unfolded
//! patches, then mobile inverted bottlenecks (1×1 expansion with ReLU6, depthwise k×k with ReLU6, 1×1
//! projection with the identity shortcut added), then the 1×1 head with ReLU6.

use super::depthwise::Depthwise;
use super::pointwise::{Activation, Pointwise, Rows};
use super::unfold::Window;
use super::{Buffers, ConvWeights, Extent, Taps, average_pool, room};
use crate::HostMap;

const STEM_INPUTS: usize = 3;

/// A mobile inverted bottleneck: optional 1×1 expansion (ReLU6), depthwise k×k (ReLU6), 1×1 projection,
/// identity shortcut when the shape is kept.
pub(crate) struct LiteBlock {
    expand: Option<Pointwise>,
    depthwise: Depthwise,
    project: Pointwise,
    skip: bool,
}

impl LiteBlock {
    pub(crate) fn new(expand: Option<ConvWeights>, depthwise: ConvWeights, project: ConvWeights, skip: bool) -> Self {
        let [channels, _, kernel, _] = depthwise.dims;
        Self {
            expand: expand.map(|conv| conv.product(Activation::Relu6)),
            depthwise: Depthwise::new(&depthwise.weight, &depthwise.bias, channels, kernel, depthwise.stride),
            project: project.product(Activation::None),
            skip,
        }
    }
}

/// EfficientNet-Lite (BatchNorms folded) in our CPU kernels; see the module's documentation.
pub struct EfficientNetLiteCpu {
    stem: Pointwise,
    stem_kernel: usize,
    stem_stride: usize,
    blocks: Vec<LiteBlock>,
    head: Pointwise,
    /// The block input and output, the expansion and the depthwise output.
    buffers: Buffers<4>,
}

impl EfficientNetLiteCpu {
    pub(crate) fn new(stem: ConvWeights, blocks: Vec<LiteBlock>, head: ConvWeights) -> Self {
        assert_eq!(stem.dims[1], STEM_INPUTS, "an RGB stem");
        let (stem_kernel, stem_stride) = (stem.kernel(), stem.stride);
        Self {
            stem: stem.product(Activation::Relu6),
            stem_kernel,
            stem_stride,
            blocks,
            head: head.product(Activation::Relu6),
            buffers: Buffers::new(),
        }
    }

    /// The output of every block, and the head.
    pub(crate) fn tap_names(&self) -> Vec<String> {
        (0..self.blocks.len()).map(|i| format!("block{i}")).chain(["head".to_string()]).collect()
    }

    /// See [`super::CpuBackbone::features`]; the taps are `block0` … and `head`.
    pub(crate) fn features(&self, pixels: &[f32], input: Extent, taps: &[&str], pooled: bool) -> (Vec<f32>, Vec<HostMap>) {
        let [mut current, mut next, mut expanded, mut filtered] = self.buffers.take();
        let mut taps = Taps::new(taps);

        let stem = Window::same(input, self.stem_kernel, self.stem_stride);
        let mut extent = stem.output();
        let unfold = |first: usize, rows: &mut [f32]| stem.unfold_nchw(pixels, STEM_INPUTS, first, rows);
        let mut channels = self.stem.outputs();
        self.stem.forward(Rows::Unfolded(&unfold), extent.pixels(), None, room(&mut current, extent.pixels() * channels));

        for (index, block) in self.blocks.iter().enumerate() {
            if !pooled && taps.all_kept() {
                break;
            }
            let hidden = match &block.expand {
                Some(expand) => {
                    let out = room(&mut expanded, extent.pixels() * expand.outputs());
                    expand.forward(Rows::Given(&current), extent.pixels(), None, out);
                    &*out
                }
                None => &current[..extent.pixels() * channels],
            };
            let filtered_extent = block.depthwise.window(extent).output();
            let filtered = room(&mut filtered, filtered_extent.pixels() * block.project.inputs());
            block.depthwise.forward(hidden, extent, filtered);
            let residual = block.skip.then_some(&current[..extent.pixels() * channels]);
            let outputs = block.project.outputs();
            block.project.forward(
                Rows::Given(filtered),
                filtered_extent.pixels(),
                residual,
                room(&mut next, filtered_extent.pixels() * outputs),
            );
            std::mem::swap(&mut current, &mut next);
            (extent, channels) = (filtered_extent, outputs);
            taps.offer(&format!("block{index}"), &current, extent, channels);
        }

        let mut features = Vec::new();
        if pooled || !taps.all_kept() {
            let head = room(&mut next, extent.pixels() * self.head.outputs());
            self.head.forward(Rows::Given(&current), extent.pixels(), None, head);
            taps.offer("head", head, extent, self.head.outputs());
            if pooled {
                features = average_pool(head, extent, self.head.outputs());
            }
        }
        self.buffers.keep([current, next, expanded, filtered]);
        (features, taps.maps)
    }
}
