//! A convolution's window over an activation (kernel, stride, padding) and its unfolded patches: one row of
//! `channels × k × k` values per output pixel, zeros where the window hangs over the edge, so that the
//! convolution is a product of those rows by its weights (`pointwise.rs`). Rows are made a block of output
//! pixels at a time, on demand.

use super::Extent;

/// Where a k×k convolution at a stride reads its input, and the extent it produces.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    kernel: usize,
    stride: usize,
    /// Padding before the first row and before the first column.
    pad: (usize, usize),
    input: Extent,
    output: Extent,
}

impl Window {
    /// TensorFlow's "SAME" padding (EfficientNet-Lite): `ceil(size / stride)` outputs each way, half of the
    /// padding the kernel needs before the first pixel (rounded down), the rest after the last.
    pub(crate) fn same(input: Extent, kernel: usize, stride: usize) -> Self {
        let output = Extent { batch: input.batch, height: input.height.div_ceil(stride), width: input.width.div_ceil(stride) };
        let before = |size: usize, out: usize| ((out - 1) * stride + kernel).saturating_sub(size) / 2;
        Self { kernel, stride, pad: (before(input.height, output.height), before(input.width, output.width)), input, output }
    }

    /// `pad` on every side (PyTorch's `padding`, the ResNets): `(size + 2 pad − kernel) / stride + 1` outputs.
    pub(crate) fn padded(input: Extent, kernel: usize, stride: usize, pad: usize) -> Self {
        let out = |size: usize| (size + 2 * pad).saturating_sub(kernel) / stride + 1;
        let output = Extent { batch: input.batch, height: out(input.height), width: out(input.width) };
        Self { kernel, stride, pad: (pad, pad), input, output }
    }

    pub(crate) fn kernel(&self) -> usize {
        self.kernel
    }

    pub(crate) fn input(&self) -> Extent {
        self.input
    }

    pub(crate) fn output(&self) -> Extent {
        self.output
    }

    /// The input row of output row `y` and kernel row `ky`, if it lies within the image.
    pub(crate) fn input_row(&self, y: usize, ky: usize) -> Option<usize> {
        (y * self.stride + ky).checked_sub(self.pad.0).filter(|&iy| iy < self.input.height)
    }

    /// The output columns whose input column for kernel column `kx` lies within the image, and that input
    /// column for each: `x * stride + kx − pad`.
    pub(crate) fn columns(&self, kx: usize) -> std::ops::Range<usize> {
        let first = self.pad.1.saturating_sub(kx).div_ceil(self.stride);
        let last = (self.input.width + self.pad.1).saturating_sub(kx).div_ceil(self.stride).min(self.output.width);
        first..last.max(first)
    }

    pub(crate) fn input_column(&self, x: usize, kx: usize) -> usize {
        x * self.stride + kx - self.pad.1
    }

    /// The input column of output column `x` and kernel column `kx`, if it lies within the image.
    fn input_column_within(&self, x: usize, kx: usize) -> Option<usize> {
        (x * self.stride + kx).checked_sub(self.pad.1).filter(|&ix| ix < self.input.width)
    }

    /// The output pixel `pixel` (counted over the batch) as (image, row, column).
    fn position(&self, pixel: usize) -> (usize, usize, usize) {
        let plane = self.output.height * self.output.width;
        (pixel / plane, pixel % plane / self.output.width, pixel % self.output.width)
    }

    /// Rows from output pixel `first` on (as many as `out` holds) of the patches of NCHW `pixels`, each in
    /// the order `channel × k² + ky × k + kx`: a `[outputs, channels, k, k]` weight's own.
    pub(crate) fn unfold_nchw(&self, pixels: &[f32], channels: usize, first: usize, out: &mut [f32]) {
        let k = self.kernel;
        let (height, width) = (self.input.height, self.input.width);
        for (offset, row) in out.chunks_exact_mut(channels * k * k).enumerate() {
            let (image, y, x) = self.position(first + offset);
            let image = &pixels[image * channels * height * width..][..channels * height * width];
            for (at, slot) in row.iter_mut().enumerate() {
                let (channel, ky, kx) = (at / (k * k), at % (k * k) / k, at % k);
                *slot = match (self.input_row(y, ky), self.input_column_within(x, kx)) {
                    (Some(iy), Some(ix)) => image[(channel * height + iy) * width + ix],
                    _ => 0.0,
                };
            }
        }
    }

    /// Rows from output pixel `first` on (as many as `out` holds) of the patches of NHWC `values`, each in
    /// the order `(ky × k + kx) × channels + channel` (each tap's channels side by side, as NHWC has them).
    pub(crate) fn unfold_nhwc(&self, values: &[f32], channels: usize, first: usize, out: &mut [f32]) {
        let k = self.kernel;
        let (height, width) = (self.input.height, self.input.width);
        for (offset, row) in out.chunks_exact_mut(channels * k * k).enumerate() {
            let (image, y, x) = self.position(first + offset);
            for (tap, target) in row.chunks_exact_mut(channels).enumerate() {
                let (ky, kx) = (tap / k, tap % k);
                match (self.input_row(y, ky), self.input_column_within(x, kx)) {
                    (Some(iy), Some(ix)) => target.copy_from_slice(&values[((image * height + iy) * width + ix) * channels..][..channels]),
                    _ => target.fill(0.0),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_puts_the_odd_pixel_after() {
        let extent = |side: usize| Extent { batch: 1, height: side, width: side };
        // 224 → 112 with a 3×3 kernel at stride 2 needs 1 pixel: none before, 1 after (TensorFlow's rule).
        assert_eq!(Window::same(extent(224), 3, 2).pad, (0, 0));
        assert_eq!(Window::same(extent(56), 5, 2).pad, (1, 1));
        assert_eq!(Window::same(extent(14), 5, 1).pad, (2, 2));
        assert_eq!(Window::padded(extent(224), 7, 2, 3).output().height, 112);
        assert_eq!(Window::padded(extent(112), 3, 2, 1).output().height, 56);
        assert_eq!(Window::padded(extent(7), 1, 2, 0).output().height, 4);
    }

    /// Both layouts give every output pixel the window's values (zeros off the edge) in their orders.
    #[test]
    fn unfolded_rows_hold_each_window_in_order() {
        let (channels, batch, height, width) = (3, 2, 5, 4);
        let input = Extent { batch, height, width };
        let nchw: Vec<f32> = (0..batch * channels * height * width).map(|i| i as f32 + 1.0).collect();
        let at = |n: usize, c: usize, y: isize, x: isize| {
            if (0..height as isize).contains(&y) && (0..width as isize).contains(&x) {
                nchw[((n * channels + c) * height + y as usize) * width + x as usize]
            } else {
                0.0
            }
        };
        let nhwc: Vec<f32> = (0..batch * height * width * channels)
            .map(|i| {
                let (pixel, c) = (i / channels, i % channels);
                let (n, y, x) = (pixel / (height * width), pixel % (height * width) / width, pixel % width);
                at(n, c, y as isize, x as isize)
            })
            .collect();
        for window in [Window::same(input, 3, 2), Window::padded(input, 3, 1, 1), Window::padded(input, 1, 2, 0), Window::same(input, 5, 1)]
        {
            let k = window.kernel;
            let output = window.output();
            let pixels = output.pixels();
            let (mut rows_nchw, mut rows_nhwc) = (vec![f32::NAN; pixels * channels * k * k], vec![f32::NAN; pixels * channels * k * k]);
            // In two pieces, the second from an odd pixel on.
            let split = pixels / 2 + 1;
            let row = channels * k * k;
            window.unfold_nchw(&nchw, channels, 0, &mut rows_nchw[..split * row]);
            window.unfold_nchw(&nchw, channels, split, &mut rows_nchw[split * row..]);
            window.unfold_nhwc(&nhwc, channels, 0, &mut rows_nhwc[..split * row]);
            window.unfold_nhwc(&nhwc, channels, split, &mut rows_nhwc[split * row..]);
            for pixel in 0..pixels {
                let (n, y, x) = window.position(pixel);
                for c in 0..channels {
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (y * window.stride + ky) as isize - window.pad.0 as isize;
                            let ix = (x * window.stride + kx) as isize - window.pad.1 as isize;
                            let expected = at(n, c, iy, ix);
                            assert_eq!(rows_nchw[pixel * row + c * k * k + ky * k + kx], expected, "{window:?} NCHW");
                            assert_eq!(rows_nhwc[pixel * row + (ky * k + kx) * channels + c], expected, "{window:?} NHWC");
                        }
                    }
                }
            }
        }
    }
}
