//! PatchCore's anomaly map: the patch scores on their grid, bilinearly upsampled to the input crop
//! (half-pixel centres, PyTorch's `align_corners=False`) and smoothed by a Gaussian of σ = 4 px (kernel
//! `2·⌊4σ + 0.5⌋ + 1` taps, mirrored edges as PyTorch's `reflect` padding), as PatchCore and anomalib do.

/// PatchCore's smoothing of the upsampled map, in input pixels.
pub const BLUR_SIGMA: f32 = 4.0;

/// The anomaly map over a `side × side` input crop of the patch scores on a `grid` (rows, columns).
pub fn anomaly_map(scores: &[f32], grid: (usize, usize), side: usize, sigma: f32) -> Vec<f32> {
    let upsampled = upsample_bilinear(scores, grid, (side, side));
    blur(&upsampled, side, side, sigma)
}

/// Where output index `dst` samples an input of `from` values for an output of `to`: the two inputs
/// and the second one's weight (PyTorch's `area_pixel_compute_source_index`, negative sources clamped).
fn source(dst: usize, from: usize, to: usize) -> (usize, usize, f32) {
    let position = ((dst as f32 + 0.5) * (from as f32 / to as f32) - 0.5).max(0.0);
    let low = (position as usize).min(from - 1);
    (low, (low + 1).min(from - 1), position - low as f32)
}

/// Bilinear resampling of a row-major `from` (rows, columns) map to `to`.
pub fn upsample_bilinear(map: &[f32], from: (usize, usize), to: (usize, usize)) -> Vec<f32> {
    let columns: Vec<_> = (0..to.1).map(|x| source(x, from.1, to.1)).collect();
    let mut out = Vec::with_capacity(to.0 * to.1);
    for y in 0..to.0 {
        let (y0, y1, wy) = source(y, from.0, to.0);
        let (top, bottom) = (&map[y0 * from.1..][..from.1], &map[y1 * from.1..][..from.1]);
        for &(x0, x1, wx) in &columns {
            let upper = top[x0] + (top[x1] - top[x0]) * wx;
            let lower = bottom[x0] + (bottom[x1] - bottom[x0]) * wx;
            out.push(upper + (lower - upper) * wy);
        }
    }
    out
}

/// The normalised Gaussian kernel of `sigma` with `2·⌊4σ + 0.5⌋ + 1` taps.
fn gaussian_kernel(sigma: f32) -> Vec<f32> {
    let radius = (4.0 * sigma + 0.5) as isize;
    let weights: Vec<f64> = (-radius..=radius).map(|i| (-(i as f64).powi(2) / (2.0 * (sigma as f64).powi(2))).exp()).collect();
    let total: f64 = weights.iter().sum();
    weights.iter().map(|w| (w / total) as f32).collect()
}

/// Index `i` mirrored into `0..n` without repeating the edge (`reflect`: … 2 1 | 0 1 2 … n−1 | n−2 …).
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - m }) as usize
}

/// Separable Gaussian blur of a row-major `height × width` image.
pub fn blur(image: &[f32], height: usize, width: usize, sigma: f32) -> Vec<f32> {
    if sigma <= 0.0 {
        return image.to_vec();
    }
    let kernel = gaussian_kernel(sigma);
    let radius = (kernel.len() / 2) as isize;
    let mut rows = vec![0f32; image.len()];
    for y in 0..height {
        let line = &image[y * width..][..width];
        for x in 0..width {
            rows[y * width + x] = kernel.iter().enumerate().map(|(t, w)| w * line[reflect(x as isize + t as isize - radius, width)]).sum();
        }
    }
    let mut out = vec![0f32; image.len()];
    for y in 0..height {
        for (t, w) in kernel.iter().enumerate() {
            let source = &rows[reflect(y as isize + t as isize - radius, height) * width..][..width];
            for (o, s) in out[y * width..][..width].iter_mut().zip(source) {
                *o += w * s;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsampling_matches_pytorch_align_corners_false() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0., 1.], [2., 3.]]]]), size=(4, 4),
        // mode="bilinear", align_corners=False)
        let expected = [
            0.0, 0.25, 0.75, 1.0, //
            0.5, 0.75, 1.25, 1.5, //
            1.5, 1.75, 2.25, 2.5, //
            2.0, 2.25, 2.75, 3.0,
        ];
        assert_eq!(upsample_bilinear(&[0.0, 1.0, 2.0, 3.0], (2, 2), (4, 4)), expected);
        // A constant map stays constant at any ratio.
        assert!(upsample_bilinear(&[2.5; 6], (2, 3), (7, 11)).iter().all(|&v| (v - 2.5).abs() < 1e-6));
    }

    #[test]
    fn the_kernel_is_anomalibs() {
        let kernel = gaussian_kernel(4.0);
        assert_eq!(kernel.len(), 33);
        assert!((kernel.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(kernel.windows(2).take(16).all(|w| w[0] < w[1]) && kernel[16] == kernel.iter().copied().fold(0.0, f32::max));
    }

    #[test]
    fn reflection_mirrors_without_repeating_the_edge() {
        let mirrored: Vec<usize> = (-3..8).map(|i| reflect(i, 5)).collect();
        assert_eq!(mirrored, [3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]);
    }

    #[test]
    fn blurring_keeps_mass_and_constants_and_spreads_a_peak() {
        let side = 48;
        assert!(blur(&vec![1.5; side * side], side, side, 4.0).iter().all(|&v| (v - 1.5).abs() < 1e-5));
        let mut peak = vec![0f32; side * side];
        peak[24 * side + 24] = 1.0;
        let blurred = blur(&peak, side, side, 4.0);
        // Far from the edges no mass is reflected: the sum stays 1, the peak stays where it was.
        assert!((blurred.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        let arg_max = blurred.iter().enumerate().fold((0, 0.0f32), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
        assert_eq!(arg_max, 24 * side + 24);
        // One σ away the value is e^(−1/2) of the peak in each direction.
        let ratio = blurred[24 * side + 28] / blurred[24 * side + 24];
        assert!((ratio - (-0.5f32).exp()).abs() < 1e-3, "{ratio}");
    }
}
