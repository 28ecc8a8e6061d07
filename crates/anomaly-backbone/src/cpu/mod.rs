//! The backbones' forward pass on the CPU in kernels of our own, for when they run on the CPU: the same
//! networks as the burn modules (whose folded weights they copy), computed in NHWC with each convolution's
//! bias, residual add and activation fused into it. burn's CPU backend runs each of those as a separate
//! pass over the activation (single-threaded), which made its forward pass about half as fast as
//! PyTorch's on the same processor; the burn networks stay the reference the tests hold these to.

mod depthwise;
mod lite;
mod pointwise;
mod resnet;
mod unfold;

use std::sync::Mutex;

use burn::nn::conv::Conv2d;
use rayon::prelude::*;

use crate::HostMap;
pub use lite::EfficientNetLiteCpu;
pub(crate) use lite::LiteBlock;
use pointwise::{Activation, Pointwise};
pub(crate) use resnet::ResNetBlock;
pub use resnet::ResNetCpu;

/// A backbone in our CPU kernels.
pub enum CpuBackbone {
    EfficientNet(EfficientNetLiteCpu),
    ResNet(ResNetCpu),
}

impl CpuBackbone {
    /// Names of the feature maps [`Self::features`] can return: as [`crate::Backbone::tap_names`].
    pub fn tap_names(&self) -> Vec<String> {
        match self {
            Self::EfficientNet(network) => network.tap_names(),
            Self::ResNet(_) => crate::RESNET_TAPS.iter().map(|t| t.to_string()).collect(),
        }
    }

    /// The pooled features (`[batch, channels]` row-major, when `pooled`) and the maps named in `taps`
    /// (NCHW, in network order) of `batch` preprocessed images (`pixels`: `[batch, 3, side, side]`). Without
    /// `pooled` the network runs only as far as the last tap.
    pub fn features(&self, pixels: &[f32], batch: usize, side: usize, taps: &[&str], pooled: bool) -> (Vec<f32>, Vec<HostMap>) {
        assert_eq!(pixels.len(), batch * 3 * side * side, "{batch} images of 3 × {side} × {side}");
        let input = Extent { batch, height: side, width: side };
        match self {
            Self::EfficientNet(network) => network.features(pixels, input, taps, pooled),
            Self::ResNet(network) => network.features(pixels, input, taps, pooled),
        }
    }
}

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

    fn kernel(&self) -> usize {
        self.dims[2]
    }

    /// As a product over rows in the weight's own input order: a 1×1 convolution's, or a k×k one's over
    /// patches unfolded from NCHW (`channel × k² + ky × k + kx`).
    fn product(&self, activation: Activation) -> Pointwise {
        let [outputs, inputs, kh, kw] = self.dims;
        Pointwise::new(&self.weight, &self.bias, inputs * kh * kw, outputs, activation)
    }

    /// As a product over patches unfolded from NHWC (`(ky × k + kx) × channels + channel`).
    fn product_nhwc(&self, activation: Activation) -> Pointwise {
        let [outputs, inputs, kh, kw] = self.dims;
        let taps = kh * kw;
        let mut weight = vec![0.0; self.weight.len()];
        for (o, filter) in self.weight.chunks_exact(inputs * taps).enumerate() {
            for (at, &w) in filter.iter().enumerate() {
                let (channel, tap) = (at / taps, at % taps);
                weight[o * inputs * taps + tap * inputs + channel] = w;
            }
        }
        Pointwise::new(&weight, &self.bias, inputs * taps, outputs, activation)
    }
}

/// An NHWC activation's batch, height and width.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Extent {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
}

impl Extent {
    pub(crate) fn pixels(self) -> usize {
        self.batch * self.height * self.width
    }
}

/// `N` activation buffers kept between calls (a batch's largest is tens of megabytes, which a fresh
/// allocation would fault in and zero every time); empty while a call holds them.
struct Buffers<const N: usize>(Mutex<Option<[Vec<f32>; N]>>);

impl<const N: usize> Buffers<N> {
    fn new() -> Self {
        Self(Mutex::new(None))
    }

    /// The kept buffers, or new ones while another call holds them.
    fn take(&self) -> [Vec<f32>; N] {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_else(|| std::array::from_fn(|_| Vec::new()))
    }

    fn keep(&self, buffers: [Vec<f32>; N]) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(buffers);
    }
}

/// The first `len` values of `buffer`, grown (never shrunk) to hold them.
fn room(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// The maps a caller asked for, gathered as the network passes them.
struct Taps<'a> {
    names: &'a [&'a str],
    wanted: usize,
    maps: Vec<HostMap>,
}

impl<'a> Taps<'a> {
    fn new(names: &'a [&'a str]) -> Self {
        Self { names, wanted: crate::distinct(names), maps: Vec::new() }
    }

    /// Keeps `values` (NHWC) as map `name`, in NCHW, if it was asked for.
    fn offer(&mut self, name: &str, values: &[f32], extent: Extent, channels: usize) {
        if self.names.contains(&name) {
            let map = HostMap {
                name: name.to_string(),
                shape: [extent.batch, channels, extent.height, extent.width],
                values: to_nchw(values, extent, channels),
            };
            self.maps.push(map);
        }
    }

    /// Whether every map asked for is kept.
    fn all_kept(&self) -> bool {
        self.maps.len() == self.wanted
    }
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
