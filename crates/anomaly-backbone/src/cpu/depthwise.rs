//! Depthwise k×k convolutions over NHWC activations with TensorFlow "SAME" padding, the bias and ReLU6
//! applied in the same pass: each channel is its own filter, so the channels of a pixel, side by side in
//! memory, are the vector lanes. An output row is summed in place, one filter tap at a time over the whole
//! row (each tap's input row is read in order), then clamped while it is still in the cache.

use rayon::prelude::*;

use super::Extent;
use super::unfold::Window;

/// A depthwise convolution with its BatchNorm folded in, followed by ReLU6.
#[derive(Debug)]
pub(crate) struct Depthwise {
    channels: usize,
    kernel: usize,
    stride: usize,
    /// `[ky][kx][channel]`.
    weights: Vec<f32>,
    bias: Vec<f32>,
}

impl Depthwise {
    /// `weight`: `[channels, 1, kernel, kernel]` row-major, as the convolution holds it.
    pub(crate) fn new(weight: &[f32], bias: &[f32], channels: usize, kernel: usize, stride: usize) -> Self {
        assert_eq!(weight.len(), channels * kernel * kernel, "a {channels} × {kernel} × {kernel} weight");
        assert_eq!(bias.len(), channels, "a bias of {channels}");
        let mut weights = vec![0.0; weight.len()];
        for (c, filter) in weight.chunks_exact(kernel * kernel).enumerate() {
            for (tap, &w) in filter.iter().enumerate() {
                weights[tap * channels + c] = w;
            }
        }
        Self { channels, kernel, stride, weights, bias: bias.to_vec() }
    }

    /// Its window over an input of `extent` ("SAME" padding).
    pub(crate) fn window(&self, extent: Extent) -> Window {
        Window::same(extent, self.kernel, self.stride)
    }

    /// `out = relu6(depthwise(input) + b)`, in parallel over output rows. `input` holds `extent` pixels of
    /// `channels` values, `out` those of the window's output.
    pub(crate) fn forward(&self, input: &[f32], extent: Extent, out: &mut [f32]) {
        let window = self.window(extent);
        let (output, c) = (window.output(), self.channels);
        assert!(input.len() >= extent.pixels() * c && out.len() >= output.pixels() * c, "a depthwise pass over {extent:?} × {c}");
        let image_len = extent.height * extent.width * c;
        out[..output.pixels() * c].par_chunks_mut(output.width * c).enumerate().for_each(|(row, out)| {
            let (image, y) = (row / output.height, row % output.height);
            self.row(&window, &input[image * image_len..][..image_len], y, out);
        });
    }

    /// Output row `y` of one image, with whichever vector instructions this processor has.
    fn row(&self, window: &Window, image: &[f32], y: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            use anomaly_device::CpuIsa;
            match CpuIsa::active() {
                // SAFETY: `active` is at most what the CPU has: AVX-512F here.
                CpuIsa::Avx512 => return unsafe { self.row_avx512(window, image, y, out) },
                // SAFETY: `active` is at most what the CPU has: AVX2 here.
                CpuIsa::Avx2 => return unsafe { self.row_avx2(window, image, y, out) },
                CpuIsa::Baseline => {}
            }
        }
        self.row_portable(window, image, y, out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn row_avx512(&self, window: &Window, image: &[f32], y: usize, out: &mut [f32]) {
        self.row_portable(window, image, y, out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn row_avx2(&self, window: &Window, image: &[f32], y: usize, out: &mut [f32]) {
        self.row_portable(window, image, y, out);
    }

    /// The row in plain Rust, inlined into the callers above so that each compiles it for its vector width.
    #[inline(always)]
    fn row_portable(&self, window: &Window, image: &[f32], y: usize, out: &mut [f32]) {
        let (c, k) = (self.channels, self.kernel);
        let width = window.input().width;
        for pixel in out.chunks_exact_mut(c) {
            pixel.copy_from_slice(&self.bias);
        }
        for ky in 0..k {
            let Some(iy) = window.input_row(y, ky) else { continue };
            let input_row = &image[iy * width * c..][..width * c];
            for kx in 0..k {
                let tap = &self.weights[(ky * k + kx) * c..][..c];
                for x in window.columns(kx) {
                    let source = &input_row[window.input_column(x, kx) * c..][..c];
                    let target = &mut out[x * c..][..c];
                    for ((sum, &value), &w) in target.iter_mut().zip(source).zip(tap) {
                        *sum += value * w;
                    }
                }
            }
        }
        for value in out.iter_mut() {
            *value = value.clamp(0.0, 6.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::tests::{random, reference_close};

    /// Equals a plain f64 sum with TensorFlow's padding, for Lite's kernels and strides on even and odd sizes.
    #[test]
    fn depthwise_equals_the_plain_sum_with_same_padding() {
        for &(kernel, stride) in &[(3, 1), (3, 2), (5, 1), (5, 2)] {
            for &(height, width, channels) in &[(1, 1, 16), (7, 7, 32), (8, 6, 48), (14, 13, 16), (5, 9, 20)] {
                let extent = Extent { batch: 2, height, width };
                let (weight, bias) = (random(channels * kernel * kernel, 5), random(channels, 6));
                let input = random(extent.pixels() * channels, 7);
                let layer = Depthwise::new(&weight, &bias, channels, kernel, stride);
                let output = layer.window(extent).output();
                let pad = |size: usize, out: usize| ((out - 1) * stride + kernel).saturating_sub(size) / 2;
                let (pad_top, pad_left) = (pad(height, output.height), pad(width, output.width));
                let mut expected = Vec::new();
                for n in 0..2 {
                    for y in 0..output.height {
                        for x in 0..output.width {
                            for c in 0..channels {
                                let mut sum = f64::from(bias[c]);
                                for ky in 0..kernel {
                                    for kx in 0..kernel {
                                        let (iy, ix) =
                                            ((y * stride + ky) as isize - pad_top as isize, (x * stride + kx) as isize - pad_left as isize);
                                        if (0..height as isize).contains(&iy) && (0..width as isize).contains(&ix) {
                                            let at = ((n * height + iy as usize) * width + ix as usize) * channels + c;
                                            sum += f64::from(input[at]) * f64::from(weight[(c * kernel + ky) * kernel + kx]);
                                        }
                                    }
                                }
                                expected.push(sum.clamp(0.0, 6.0));
                            }
                        }
                    }
                }
                let mut out = vec![f32::NAN; output.pixels() * channels];
                layer.forward(&input, extent, &mut out);
                reference_close(
                    &out,
                    &expected,
                    kernel * kernel,
                    &format!("{kernel}×{kernel} stride {stride} over {height}×{width}×{channels}"),
                );
            }
        }
    }
}
