//! EfficientNet-Lite's forward pass on the CPU in kernels of our own, for when the backbone runs on the
//! CPU: the same network as [`crate::EfficientNetLite`] (whose folded weights it copies), computed in NHWC
//! with each convolution's bias, ReLU6 and residual add fused into it. burn's CPU backend runs each of
//! those as a separate pass over the activation (single-threaded), which made its forward pass half as
//! fast as PyTorch's on the same processor; the burn model stays the reference the tests hold this to.

mod depthwise;
mod pointwise;

use std::sync::Mutex;

use burn::nn::conv::Conv2d;
use rayon::prelude::*;

use crate::HostMap;
use depthwise::{Depthwise, Extent};
use pointwise::Pointwise;

/// Input channels of the stem (RGB) and its kernel and stride.
const STEM_INPUTS: usize = 3;
const STEM_KERNEL: usize = 3;
const STEM_STRIDE: usize = 2;

/// One convolution's folded weights as burn holds them, read back to the host.
pub(crate) struct ConvWeights {
    /// `[outputs, inputs / groups, kernel, kernel]` row-major.
    weight: Vec<f32>,
    bias: Vec<f32>,
    /// `[outputs, inputs / groups, kernel, kernel]`.
    dims: [usize; 4],
    stride: usize,
}

impl ConvWeights {
    /// The weights of a convolution whose BatchNorm was folded into it (so that it has a bias).
    pub(crate) fn read(conv: &Conv2d) -> Self {
        let values = |data: burn::tensor::TensorData| data.try_into_vec_as::<f32>().expect("f32 weights");
        let bias = conv.bias.as_ref().expect("a folded convolution has a bias");
        Self {
            weight: values(conv.weight.val().into_data()),
            bias: values(bias.val().into_data()),
            dims: conv.weight.dims(),
            stride: conv.stride[0],
        }
    }

    fn pointwise(&self, relu6: bool) -> Pointwise {
        let [outputs, inputs, kh, kw] = self.dims;
        Pointwise::new(&self.weight, &self.bias, inputs * kh * kw, outputs, relu6)
    }
}

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
            expand: expand.map(|conv| conv.pointwise(true)),
            depthwise: Depthwise::new(&depthwise.weight, &depthwise.bias, channels, kernel, depthwise.stride),
            project: project.pointwise(false),
            skip,
        }
    }
}

/// EfficientNet-Lite (BatchNorms folded) for our CPU kernels; see the module's documentation.
pub struct EfficientNetLiteCpu {
    stem: Pointwise,
    blocks: Vec<LiteBlock>,
    head: Pointwise,
    /// Activation buffers kept between calls (a batch's largest is tens of megabytes, which a fresh
    /// allocation would fault in and zero every time); `None` while a call holds them.
    scratch: Mutex<Option<Scratch>>,
}

#[derive(Default)]
struct Scratch {
    unfolded: Vec<f32>,
    current: Vec<f32>,
    next: Vec<f32>,
    expanded: Vec<f32>,
    filtered: Vec<f32>,
}

impl EfficientNetLiteCpu {
    pub(crate) fn new(stem: ConvWeights, blocks: Vec<LiteBlock>, head: ConvWeights) -> Self {
        assert_eq!(stem.dims[1..], [STEM_INPUTS, STEM_KERNEL, STEM_KERNEL], "the Lite stem");
        assert_eq!(stem.stride, STEM_STRIDE, "the Lite stem");
        Self { stem: stem.pointwise(true), blocks, head: head.pointwise(true), scratch: Mutex::new(None) }
    }

    /// The pooled features (`[batch, 1280]` row-major, when `pooled`) and the maps named in `taps`
    /// (`block0` … and `head`, NCHW) of `batch` preprocessed images (`pixels`: `[batch, 3, side, side]`).
    /// Without `pooled` the network runs only as far as the last tap.
    pub fn features(&self, pixels: &[f32], batch: usize, side: usize, taps: &[&str], pooled: bool) -> (Vec<f32>, Vec<HostMap>) {
        assert_eq!(pixels.len(), batch * STEM_INPUTS * side * side, "{batch} images of 3 × {side} × {side}");
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
        let wanted = crate::distinct(taps);
        let mut maps = Vec::new();
        let keep = |name: String, values: &[f32], extent: Extent, channels: usize, maps: &mut Vec<HostMap>| {
            if taps.contains(&name.as_str()) {
                maps.push(HostMap {
                    shape: [extent.batch, channels, extent.height, extent.width],
                    values: to_nchw(values, extent, channels),
                    name,
                });
            }
        };

        let input = Extent { batch, height: side, width: side };
        let mut extent = Extent { batch, height: side.div_ceil(STEM_STRIDE), width: side.div_ceil(STEM_STRIDE) };
        let unfolded = room(&mut scratch.unfolded, extent.pixels() * STEM_INPUTS * STEM_KERNEL * STEM_KERNEL);
        unfold_stem(pixels, input, extent, unfolded);
        let mut channels = self.stem.outputs();
        self.stem.forward(unfolded, extent.pixels(), None, room(&mut scratch.current, extent.pixels() * channels));

        for (index, block) in self.blocks.iter().enumerate() {
            if !pooled && maps.len() == wanted {
                break;
            }
            let Scratch { current, next, expanded, filtered, .. } = &mut scratch;
            let hidden = match &block.expand {
                Some(expand) => {
                    let out = room(expanded, extent.pixels() * expand.outputs());
                    expand.forward(current, extent.pixels(), None, out);
                    &*out
                }
                None => &current[..extent.pixels() * channels],
            };
            let hidden_channels = hidden.len() / extent.pixels();
            let filtered_extent = block.depthwise.output(extent);
            let filtered = room(filtered, filtered_extent.pixels() * hidden_channels);
            block.depthwise.forward(hidden, extent, filtered);
            let residual = block.skip.then_some(&current[..extent.pixels() * channels]);
            let outputs = block.project.outputs();
            block.project.forward(filtered, filtered_extent.pixels(), residual, room(next, filtered_extent.pixels() * outputs));
            std::mem::swap(current, next);
            (extent, channels) = (filtered_extent, outputs);
            keep(format!("block{index}"), current, extent, channels, &mut maps);
        }

        let mut features = Vec::new();
        if pooled || maps.len() < wanted {
            let head = room(&mut scratch.next, extent.pixels() * self.head.outputs());
            self.head.forward(&scratch.current, extent.pixels(), None, head);
            keep("head".to_string(), head, extent, self.head.outputs(), &mut maps);
            if pooled {
                features = average_pool(head, extent, self.head.outputs());
            }
        }
        *self.scratch.lock().unwrap_or_else(|e| e.into_inner()) = Some(scratch);
        (features, maps)
    }
}

/// The first `len` values of `buffer`, grown (never shrunk) to hold them.
fn room(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// The stem's 3×3 patches of NCHW `pixels` at stride 2 with "SAME" padding (none before, the odd pixel
/// after, for even sizes), one row of 27 values (`channel × 9 + ky × 3 + kx`, zeros outside the image)
/// per output pixel, NHWC order: the stem is then a 1×1 convolution over them.
fn unfold_stem(pixels: &[f32], input: Extent, output: Extent, out: &mut [f32]) {
    const TAPS: usize = STEM_KERNEL * STEM_KERNEL;
    let (height, width) = (input.height, input.width);
    let pad = |size: usize, out: usize| ((out - 1) * STEM_STRIDE + STEM_KERNEL).saturating_sub(size) / 2;
    let (pad_top, pad_left) = (pad(height, output.height), pad(width, output.width));
    out.par_chunks_mut(output.width * STEM_INPUTS * TAPS).enumerate().for_each(|(row, out)| {
        let (image, y) = (row / output.height, row % output.height);
        let image = &pixels[image * STEM_INPUTS * height * width..][..STEM_INPUTS * height * width];
        for (x, patch) in out.chunks_exact_mut(STEM_INPUTS * TAPS).enumerate() {
            for (at, slot) in patch.iter_mut().enumerate() {
                let (channel, ky, kx) = (at / TAPS, at % TAPS / STEM_KERNEL, at % STEM_KERNEL);
                let iy = (y * STEM_STRIDE + ky).checked_sub(pad_top).filter(|&iy| iy < height);
                let ix = (x * STEM_STRIDE + kx).checked_sub(pad_left).filter(|&ix| ix < width);
                *slot = match (iy, ix) {
                    (Some(iy), Some(ix)) => image[(channel * height + iy) * width + ix],
                    _ => 0.0,
                };
            }
        }
    });
}

/// NHWC activations as NCHW, the layout burn's maps have.
fn to_nchw(values: &[f32], extent: Extent, channels: usize) -> Vec<f32> {
    let plane = extent.height * extent.width;
    let mut out = vec![0.0; extent.batch * channels * plane];
    out.par_chunks_mut(channels * plane).enumerate().for_each(|(image, out)| {
        let image = &values[image * plane * channels..][..plane * channels];
        for (pixel, values) in image.chunks_exact(channels).enumerate() {
            for (channel, &value) in values.iter().enumerate() {
                out[channel * plane + pixel] = value;
            }
        }
    });
    out
}

/// The mean over each image's pixels, `[batch, channels]`.
fn average_pool(values: &[f32], extent: Extent, channels: usize) -> Vec<f32> {
    let plane = extent.height * extent.width;
    let mut pooled = vec![0.0; extent.batch * channels];
    for (image, sums) in pooled.chunks_exact_mut(channels).enumerate() {
        for pixel in values[image * plane * channels..][..plane * channels].chunks_exact(channels) {
            for (sum, &value) in sums.iter_mut().zip(pixel) {
                *sum += value;
            }
        }
        for sum in sums.iter_mut() {
            *sum /= plane as f32;
        }
    }
    pooled
}

#[cfg(test)]
pub(crate) mod tests {
    /// Seeded uniform values in [-1, 1).
    pub(crate) fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 23) as f32) - 1.0
            })
            .collect()
    }

    /// `actual` within f32 rounding of `expected`, for sums of `terms` products of values of about 1.
    pub(crate) fn reference_close(actual: &[f32], expected: &[f64], terms: usize, what: &str) {
        assert_eq!(actual.len(), expected.len(), "{what}");
        let tolerance = 1e-5 * (terms as f64 + 1.0).sqrt() * 4.0;
        for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
            assert!((f64::from(a) - e).abs() <= tolerance * e.abs().max(1.0), "{what}: value {i} is {a}, expected {e}");
        }
    }
}
