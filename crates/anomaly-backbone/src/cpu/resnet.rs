//! ResNet50 / WideResNet50-2 in our CPU kernels: the stem (7×7, stride 2) as a product over its unfolded
//! patches with ReLU, 3×3 max pooling, then four layers of bottlenecks (1×1 with ReLU, 3×3 at the layer's
//! stride over unfolded patches with ReLU, 1×1 with the shortcut added before its ReLU; the shortcut a
//! strided 1×1 convolution where the shape changes).

use rayon::prelude::*;

use super::pointwise::{Activation, Pointwise, Rows};
use super::unfold::Window;
use super::{Buffers, ConvWeights, Extent, Taps, average_pool, room};
use crate::HostMap;
use crate::resnet::RESNET_TAPS;

const STEM_INPUTS: usize = 3;

/// A bottleneck block; `conv2` is 3×3 over patches unfolded from NHWC.
pub(crate) struct ResNetBlock {
    conv1: Pointwise,
    conv2: Pointwise,
    conv2_kernel: usize,
    stride: usize,
    conv3: Pointwise,
    /// The shortcut's 1×1 convolution (at the block's stride), where the shape changes.
    downsample: Option<Pointwise>,
}

impl ResNetBlock {
    pub(crate) fn new(conv1: ConvWeights, conv2: ConvWeights, conv3: ConvWeights, downsample: Option<ConvWeights>) -> Self {
        let (conv2_kernel, stride) = (conv2.kernel(), conv2.stride);
        Self {
            conv1: conv1.product(Activation::Relu),
            conv2: conv2.product_nhwc(Activation::Relu),
            conv2_kernel,
            stride,
            conv3: conv3.product(Activation::Relu),
            downsample: downsample.map(|conv| conv.product(Activation::None)),
        }
    }
}

/// A ResNet (BatchNorms folded) in our CPU kernels; see the module's documentation.
pub struct ResNetCpu {
    stem: Pointwise,
    layers: [Vec<ResNetBlock>; 4],
    /// The block input and output, the two inner activations and the shortcut.
    buffers: Buffers<5>,
}

impl ResNetCpu {
    pub(crate) fn new(stem: ConvWeights, layers: [Vec<ResNetBlock>; 4]) -> Self {
        assert_eq!(stem.dims[1..], [STEM_INPUTS, 7, 7], "torchvision's ResNet stem");
        assert_eq!(stem.stride, 2, "torchvision's ResNet stem");
        Self { stem: stem.product(Activation::Relu), layers, buffers: Buffers::new() }
    }

    /// See [`super::CpuBackbone::features`]; the taps are `layer1` … `layer4`.
    pub(crate) fn features(&self, pixels: &[f32], input: Extent, taps: &[&str], pooled: bool) -> (Vec<f32>, Vec<HostMap>) {
        let [mut current, mut next, mut reduced, mut spread, mut shortcut] = self.buffers.take();
        let mut taps = Taps::new(taps);

        let stem = Window::padded(input, 7, 2, 3);
        let unfold = |first: usize, rows: &mut [f32]| stem.unfold_nchw(pixels, STEM_INPUTS, first, rows);
        let stem_pixels = stem.output().pixels();
        self.stem.forward(Rows::Unfolded(&unfold), stem_pixels, None, room(&mut next, stem_pixels * self.stem.outputs()));
        let mut channels = self.stem.outputs();
        let pool = Window::padded(stem.output(), 3, 2, 1);
        let mut extent = pool.output();
        max_pool(&next, &pool, channels, room(&mut current, extent.pixels() * channels));

        for (name, layer) in RESNET_TAPS.iter().zip(&self.layers) {
            if !pooled && taps.all_kept() {
                break;
            }
            for block in layer {
                let reduced = room(&mut reduced, extent.pixels() * block.conv1.outputs());
                block.conv1.forward(Rows::Given(&current), extent.pixels(), None, reduced);
                let window = Window::padded(extent, block.conv2_kernel, block.stride, block.conv2_kernel / 2);
                let output = window.output();
                let width = block.conv1.outputs();
                let unfold = |first: usize, rows: &mut [f32]| window.unfold_nhwc(reduced, width, first, rows);
                let spread = room(&mut spread, output.pixels() * block.conv2.outputs());
                block.conv2.forward(Rows::Unfolded(&unfold), output.pixels(), None, spread);
                let outputs = block.conv3.outputs();
                let identity = match &block.downsample {
                    Some(down) => {
                        let out = room(&mut shortcut, output.pixels() * outputs);
                        let strided = Window::padded(extent, 1, block.stride, 0);
                        let subsample = |first: usize, rows: &mut [f32]| strided.unfold_nhwc(&current, channels, first, rows);
                        let rows = if block.stride == 1 { Rows::Given(&current) } else { Rows::Unfolded(&subsample) };
                        down.forward(rows, output.pixels(), None, out);
                        &*out
                    }
                    None => &current[..extent.pixels() * channels],
                };
                block.conv3.forward(Rows::Given(spread), output.pixels(), Some(identity), room(&mut next, output.pixels() * outputs));
                std::mem::swap(&mut current, &mut next);
                (extent, channels) = (output, outputs);
            }
            taps.offer(name, &current, extent, channels);
        }

        let features = if pooled { average_pool(&current, extent, channels) } else { Vec::new() };
        self.buffers.keep([current, next, reduced, spread, shortcut]);
        (features, taps.maps)
    }
}

/// Max pooling over `window` (padding never wins: every window holds a pixel of the image), NHWC, in
/// parallel over output rows.
fn max_pool(input: &[f32], window: &Window, channels: usize, out: &mut [f32]) {
    let (source, output, k) = (window.input(), window.output(), window.kernel());
    let image_len = source.height * source.width * channels;
    out[..output.pixels() * channels].par_chunks_mut(output.width * channels).enumerate().for_each(|(row, out)| {
        let (image, y) = (row / output.height, row % output.height);
        let image = &input[image * image_len..][..image_len];
        out.fill(f32::NEG_INFINITY);
        for ky in 0..k {
            let Some(iy) = window.input_row(y, ky) else { continue };
            for kx in 0..k {
                for x in window.columns(kx) {
                    let ix = window.input_column(x, kx);
                    let values = &image[(iy * source.width + ix) * channels..][..channels];
                    for (best, &value) in out[x * channels..][..channels].iter_mut().zip(values) {
                        *best = best.max(value);
                    }
                }
            }
        }
    });
}
