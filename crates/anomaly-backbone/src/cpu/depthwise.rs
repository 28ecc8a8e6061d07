//! Depthwise k×k convolutions over NHWC activations with TensorFlow "SAME" padding, the bias and ReLU6
//! applied in the same pass: each channel is its own filter, so the channels of a pixel, side by side in
//! memory, are the vector lanes. An output row is summed in place, one filter tap at a time over the whole
//! row (each tap's input row is read in order), then clamped while it is still in the cache.

use rayon::prelude::*;

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

    /// The output's extent: `ceil(size / stride)` each way, as "SAME" padding gives.
    pub(crate) fn output(&self, input: Extent) -> Extent {
        Extent { batch: input.batch, height: input.height.div_ceil(self.stride), width: input.width.div_ceil(self.stride) }
    }

    /// `out = relu6(depthwise(input) + b)`, in parallel over output rows. `input` holds `extent` pixels of
    /// `channels` values, `out` [`Self::output`]'s.
    pub(crate) fn forward(&self, input: &[f32], extent: Extent, out: &mut [f32]) {
        let output = self.output(extent);
        let c = self.channels;
        assert!(input.len() >= extent.pixels() * c && out.len() >= output.pixels() * c, "a depthwise pass over {extent:?} × {c}");
        let geometry = Geometry {
            channels: c,
            kernel: self.kernel,
            stride: self.stride,
            input: extent,
            output,
            pad: (
                same_padding(extent.height, output.height, self.kernel, self.stride),
                same_padding(extent.width, output.width, self.kernel, self.stride),
            ),
        };
        out[..output.pixels() * c].par_chunks_mut(output.width * c).enumerate().for_each(|(row, out)| {
            let (image, y) = (row / output.height, row % output.height);
            let image = &input[image * extent.height * extent.width * c..][..extent.height * extent.width * c];
            geometry.row(image, y, &self.weights, &self.bias, out);
        });
    }
}

/// TensorFlow's "SAME" padding before the first pixel: half of what the kernel needs beyond the input,
/// rounded down (the rest goes after the last pixel).
fn same_padding(size: usize, output: usize, kernel: usize, stride: usize) -> usize {
    ((output - 1) * stride + kernel).saturating_sub(size) / 2
}

struct Geometry {
    channels: usize,
    kernel: usize,
    stride: usize,
    input: Extent,
    output: Extent,
    /// Padding before the first row and column.
    pad: (usize, usize),
}

impl Geometry {
    /// Output row `y` of one image, with whichever vector instructions this processor has.
    fn row(&self, image: &[f32], y: usize, weights: &[f32], bias: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F was detected.
                return unsafe { self.row_avx512(image, y, weights, bias, out) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 was detected.
                return unsafe { self.row_avx2(image, y, weights, bias, out) };
            }
        }
        self.row_portable(image, y, weights, bias, out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn row_avx512(&self, image: &[f32], y: usize, weights: &[f32], bias: &[f32], out: &mut [f32]) {
        self.row_portable(image, y, weights, bias, out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn row_avx2(&self, image: &[f32], y: usize, weights: &[f32], bias: &[f32], out: &mut [f32]) {
        self.row_portable(image, y, weights, bias, out);
    }

    /// The row in plain Rust, inlined into the callers above so that each compiles it for its vector width.
    #[inline(always)]
    fn row_portable(&self, image: &[f32], y: usize, weights: &[f32], bias: &[f32], out: &mut [f32]) {
        let (c, k, s) = (self.channels, self.kernel, self.stride);
        let (height, width) = (self.input.height, self.input.width);
        for pixel in out.chunks_exact_mut(c) {
            pixel.copy_from_slice(bias);
        }
        for ky in 0..k {
            let Some(iy) = (y * s + ky).checked_sub(self.pad.0).filter(|&iy| iy < height) else { continue };
            let input_row = &image[iy * width * c..][..width * c];
            for kx in 0..k {
                let tap = &weights[(ky * k + kx) * c..][..c];
                // The output columns whose input column `x * s + kx - pad` lies within the image.
                let first = self.pad.1.saturating_sub(kx).div_ceil(s);
                let last = (width + self.pad.1).saturating_sub(kx).div_ceil(s).min(self.output.width);
                for x in first..last {
                    let ix = x * s + kx - self.pad.1;
                    let source = &input_row[ix * c..][..c];
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
                let output = layer.output(extent);
                let (pad_top, pad_left) =
                    (same_padding(height, output.height, kernel, stride), same_padding(width, output.width, kernel, stride));
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

    #[test]
    fn same_padding_puts_the_odd_pixel_after() {
        // 224 → 112 with a 3×3 kernel at stride 2 needs 1 pixel: none before, 1 after (TensorFlow's rule).
        assert_eq!(same_padding(224, 112, 3, 2), 0);
        assert_eq!(same_padding(56, 28, 5, 2), 1);
        assert_eq!(same_padding(14, 14, 5, 1), 2);
    }
}
