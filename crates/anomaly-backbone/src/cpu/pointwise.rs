//! 1×1 convolutions, and k×k ones over their unfolded patches: a product of the NHWC activations
//! `[pixels, inputs]` by the weights `[inputs, outputs]`, with the bias, the residual add and the activation
//! applied while each tile is still in registers, so an activation is written once and never passed over
//! again. Unfolded patches are made a block of pixels at a time, by the thread that multiplies them, so
//! they stay in its cache and never exist for the whole image.
//!
//! On processors with AVX-512 an 8 × 32 tile of outputs (8 pixels, 32 channels) lives in 16 registers: per
//! input channel, 2 vector loads of the packed weights and 8 broadcasts of the pixels' values feed 16 FMAs.
//! Elsewhere the `gemm` crate's sgemm (AVX2 and FMA, or NEON, picked at run time: what burn's CPU backend
//! multiplies with) adds each block's product to its bias and residual, and one pass over the block, still
//! in the cache, activates it.

use rayon::prelude::*;

/// Pixels per tile (each broadcast), output channels per tile (two 16-lane vectors).
const TILE_PIXELS: usize = 8;
const TILE_OUTPUTS: usize = 32;

/// What follows the sum (and the residual add).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Activation {
    None,
    Relu,
    /// Clamped to `[0, 6]` (EfficientNet-Lite).
    Relu6,
}

impl Activation {
    fn apply(self, value: f32) -> f32 {
        match self {
            Self::None => value,
            Self::Relu => value.max(0.0),
            Self::Relu6 => value.clamp(0.0, 6.0),
        }
    }
}

/// Where a block of pixels' input rows come from.
pub(crate) enum Rows<'a> {
    /// `pixels × inputs` values, row-major.
    Given(&'a [f32]),
    /// Made on demand: `(first pixel, rows)` fills `rows × inputs` values (unfolded patches).
    Unfolded(&'a (dyn Fn(usize, &mut [f32]) + Sync)),
}

/// A 1×1 convolution (or a k×k one over unfolded patches) with its BatchNorm folded in, ready for the CPU.
#[derive(Debug)]
pub(crate) struct Pointwise {
    inputs: usize,
    outputs: usize,
    weights: Weights,
    /// The bias, zero-padded to whole tiles.
    bias: Vec<f32>,
    activation: Activation,
}

/// The weights laid out for the kernel this processor runs.
#[derive(Debug)]
enum Weights {
    /// In tiles of [`TILE_OUTPUTS`] output channels, `[tile][input][32]`, the last tile zero-padded: the
    /// AVX-512 micro-kernel's.
    Tiles(Vec<f32>),
    /// `[input][output]` row-major: sgemm's.
    Plain(Vec<f32>),
}

impl Pointwise {
    /// `weight`: `[outputs, inputs]` row-major (a `[outputs, inputs, 1, 1]` convolution's, or a k×k one's
    /// with its inputs in the order its unfolded patches have them).
    pub(crate) fn new(weight: &[f32], bias: &[f32], inputs: usize, outputs: usize, activation: Activation) -> Self {
        Self::with_layout(weight, bias, inputs, outputs, activation, anomaly_device::CpuIsa::active() >= anomaly_device::CpuIsa::Avx512)
    }

    /// [`Self::new`] for the AVX-512 micro-kernel (`tiles`) or for sgemm.
    fn with_layout(weight: &[f32], bias: &[f32], inputs: usize, outputs: usize, activation: Activation, tiles: bool) -> Self {
        assert_eq!(weight.len(), inputs * outputs, "a {outputs} × {inputs} weight");
        assert_eq!(bias.len(), outputs, "a bias of {outputs}");
        let columns = outputs.div_ceil(TILE_OUTPUTS) * TILE_OUTPUTS;
        let weights = if tiles {
            let mut packed = vec![0.0; columns * inputs];
            for (o, row) in weight.chunks_exact(inputs).enumerate() {
                let tile = &mut packed[o / TILE_OUTPUTS * inputs * TILE_OUTPUTS..][..inputs * TILE_OUTPUTS];
                for (i, &w) in row.iter().enumerate() {
                    tile[i * TILE_OUTPUTS + o % TILE_OUTPUTS] = w;
                }
            }
            Weights::Tiles(packed)
        } else {
            let mut plain = vec![0.0; inputs * outputs];
            for (o, row) in weight.chunks_exact(inputs).enumerate() {
                for (i, &w) in row.iter().enumerate() {
                    plain[i * outputs + o] = w;
                }
            }
            Weights::Plain(plain)
        };
        let mut padded_bias = vec![0.0; columns];
        padded_bias[..outputs].copy_from_slice(bias);
        Self { inputs, outputs, weights, bias: padded_bias, activation }
    }

    pub(crate) fn inputs(&self) -> usize {
        self.inputs
    }

    pub(crate) fn outputs(&self) -> usize {
        self.outputs
    }

    /// `out[p] = act(rows[p] · W + b + residual[p])` for `pixels` rows, in parallel over blocks of pixels.
    /// `residual` and `out` hold `pixels × outputs` values.
    pub(crate) fn forward(&self, rows: Rows, pixels: usize, residual: Option<&[f32]>, out: &mut [f32]) {
        let (inputs, outputs) = (self.inputs, self.outputs);
        assert!(out.len() >= pixels * outputs, "{pixels} pixels of {inputs} → {outputs}");
        assert!(residual.is_none_or(|r| r.len() >= pixels * outputs), "a residual of {pixels} × {outputs}");
        if let Rows::Given(input) = rows {
            assert!(input.len() >= pixels * inputs, "{pixels} pixels of {inputs} values");
        }
        let block = pixels_per_block(pixels);
        out[..pixels * outputs].par_chunks_mut(block * outputs).enumerate().for_each_init(Vec::new, |unfolded, (b, out)| {
            let (first, count) = (b * block, out.len() / outputs);
            let input = match rows {
                Rows::Given(input) => &input[first * inputs..][..count * inputs],
                Rows::Unfolded(unfold) => {
                    unfolded.resize(count * inputs, 0.0);
                    unfold(first, &mut unfolded[..]);
                    &unfolded[..]
                }
            };
            let residual = residual.map(|r| &r[first * outputs..][..count * outputs]);
            self.rows(input, count, residual, out);
        });
    }

    /// [`Self::forward`] of one block of pixels, on this thread.
    fn rows(&self, input: &[f32], rows: usize, residual: Option<&[f32]>, out: &mut [f32]) {
        match &self.weights {
            // SAFETY: tiles are laid out only where AVX-512F was detected; the slices hold `rows` pixels of
            // `inputs` and `outputs` values (checked by `forward`), the weights and bias whole tiles.
            Weights::Tiles(packed) => unsafe { avx512::rows(self, packed, input, rows, residual, out) },
            Weights::Plain(plain) => self.rows_sgemm(plain, input, rows, residual, out),
        }
    }

    /// The block's bias and residual, plus its product by sgemm, then activated in one pass.
    fn rows_sgemm(&self, plain: &[f32], input: &[f32], rows: usize, residual: Option<&[f32]>, out: &mut [f32]) {
        let (inputs, outputs) = (self.inputs, self.outputs);
        assert!(input.len() >= rows * inputs && out.len() >= rows * outputs && plain.len() == inputs * outputs);
        for (p, row) in out.chunks_exact_mut(outputs).take(rows).enumerate() {
            row.copy_from_slice(&self.bias[..outputs]);
            if let Some(residual) = residual {
                for (value, &r) in row.iter_mut().zip(&residual[p * outputs..][..outputs]) {
                    *value += r;
                }
            }
        }
        // SAFETY: the assert above bounds every access the strides below describe: `out` rows × outputs,
        // `input` rows × inputs and `plain` inputs × outputs, all row-major.
        unsafe {
            gemm::gemm(
                rows,
                outputs,
                inputs,
                out.as_mut_ptr(),
                1,
                outputs as isize,
                true,
                input.as_ptr(),
                1,
                inputs as isize,
                plain.as_ptr(),
                1,
                outputs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        if self.activation != Activation::None {
            for value in &mut out[..rows * outputs] {
                *value = self.activation.apply(*value);
            }
        }
    }
}

/// Pixels per parallel block: whole tiles, at least 4 blocks a thread for balance, at most 128 pixels so
/// that a block's inputs stay in the L2 cache while every tile of weights passes over them.
fn pixels_per_block(pixels: usize) -> usize {
    let blocks = 4 * rayon::current_num_threads();
    pixels.div_ceil(blocks).next_multiple_of(TILE_PIXELS).clamp(TILE_PIXELS, 128)
}

mod avx512 {
    use super::Pointwise;

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn rows(_: &Pointwise, _: &[f32], _: &[f32], _: usize, _: Option<&[f32]>, _: &mut [f32]) {
        unreachable!("AVX-512 is never detected off x86-64")
    }

    /// [`Pointwise::rows`] in 8 × 32 register tiles (fewer pixels in the last tile of a block).
    ///
    /// # Safety
    /// AVX-512F must be available; `packed` must hold the layer's weights in tiles, `input` `rows × inputs`
    /// values, `residual` and `out` `rows × outputs`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows(layer: &Pointwise, packed: &[f32], input: &[f32], rows: usize, residual: Option<&[f32]>, out: &mut [f32]) {
        use super::{TILE_OUTPUTS, TILE_PIXELS};
        let (inputs, outputs) = (layer.inputs, layer.outputs);
        debug_assert!(input.len() >= rows * inputs && out.len() >= rows * outputs);
        debug_assert!(residual.is_none_or(|r| r.len() >= rows * outputs));
        for (tile, weights) in packed.chunks_exact(inputs * TILE_OUTPUTS).enumerate() {
            let first = tile * TILE_OUTPUTS;
            let columns = TILE_OUTPUTS.min(outputs - first);
            let tile = Tile {
                weights: weights.as_ptr(),
                bias: layer.bias[first..].as_ptr(),
                inputs,
                outputs,
                masks: (lane_mask(columns), lane_mask(columns.saturating_sub(16))),
                activation: layer.activation,
            };
            let mut p = 0;
            while p < rows {
                let here = TILE_PIXELS.min(rows - p);
                let x = input[p * inputs..].as_ptr();
                let o = out[p * outputs + first..].as_mut_ptr();
                let r = residual.map(|r| r[p * outputs + first..].as_ptr());
                // SAFETY: pixels `p..p + here` lie within the slices, and columns `first..first + columns`
                // within each pixel's outputs (the masks stop the stores there).
                unsafe {
                    match here {
                        8 => tile.run::<8>(x, r, o),
                        7 => tile.run::<7>(x, r, o),
                        6 => tile.run::<6>(x, r, o),
                        5 => tile.run::<5>(x, r, o),
                        4 => tile.run::<4>(x, r, o),
                        3 => tile.run::<3>(x, r, o),
                        2 => tile.run::<2>(x, r, o),
                        _ => tile.run::<1>(x, r, o),
                    }
                }
                p += here;
            }
        }
    }

    /// One tile of 32 output channels: its packed weights and bias, and which of its lanes are real.
    #[cfg(target_arch = "x86_64")]
    struct Tile {
        weights: *const f32,
        bias: *const f32,
        inputs: usize,
        outputs: usize,
        masks: (u16, u16),
        activation: super::Activation,
    }

    #[cfg(target_arch = "x86_64")]
    impl Tile {
        /// `P` pixels of this tile, from the bias up, then added to the residual and activated in registers.
        ///
        /// # Safety
        /// `x` must hold `P` pixels of `inputs` values; `out` (and `residual`) `P` pixels `outputs` apart
        /// with this tile's masked lanes writable (readable) at each.
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn run<const P: usize>(&self, x: *const f32, residual: Option<*const f32>, out: *mut f32) {
            use std::arch::x86_64::*;
            let (low, high) = self.masks;
            // SAFETY (all blocks below): the tile holds `inputs × 32` weights and 32 bias values; the
            // pixel pointers stay within the `P` pixels the caller vouches for.
            let bias = unsafe { [_mm512_loadu_ps(self.bias), _mm512_loadu_ps(self.bias.add(16))] };
            let mut sums = [bias; P];
            let mut w = self.weights;
            for c in 0..self.inputs {
                let (w0, w1) = unsafe { (_mm512_loadu_ps(w), _mm512_loadu_ps(w.add(16))) };
                for (p, sum) in sums.iter_mut().enumerate() {
                    let value = _mm512_set1_ps(unsafe { *x.add(p * self.inputs + c) });
                    sum[0] = _mm512_fmadd_ps(value, w0, sum[0]);
                    sum[1] = _mm512_fmadd_ps(value, w1, sum[1]);
                }
                w = unsafe { w.add(super::TILE_OUTPUTS) };
            }
            let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
            for (p, sum) in sums.iter().enumerate() {
                let mut halves = *sum;
                let at = p * self.outputs;
                if let Some(residual) = residual {
                    unsafe {
                        halves[0] = _mm512_add_ps(halves[0], _mm512_maskz_loadu_ps(low, residual.add(at)));
                        halves[1] = _mm512_add_ps(halves[1], _mm512_maskz_loadu_ps(high, residual.add(at + 16)));
                    }
                }
                match self.activation {
                    super::Activation::None => {}
                    super::Activation::Relu => {
                        halves[0] = _mm512_max_ps(halves[0], zero);
                        halves[1] = _mm512_max_ps(halves[1], zero);
                    }
                    super::Activation::Relu6 => {
                        halves[0] = _mm512_min_ps(_mm512_max_ps(halves[0], zero), six);
                        halves[1] = _mm512_min_ps(_mm512_max_ps(halves[1], zero), six);
                    }
                }
                unsafe {
                    _mm512_mask_storeu_ps(out.add(at), low, halves[0]);
                    _mm512_mask_storeu_ps(out.add(at + 16), high, halves[1]);
                }
            }
        }
    }

    /// The first `lanes` (at most 16) lanes.
    #[cfg(target_arch = "x86_64")]
    fn lane_mask(lanes: usize) -> u16 {
        if lanes >= 16 { u16::MAX } else { (1u16 << lanes) - 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::tests::{random, reference_close};

    /// Both kernels (AVX-512 where the processor has it, and sgemm) equal a plain f64 sum at every tile
    /// edge, with each activation, with and without the residual, from given rows and from rows made on
    /// demand.
    #[test]
    fn pointwise_equals_the_plain_sum_at_every_tile_edge() {
        for &(pixels, inputs, outputs) in &[(1, 1, 1), (7, 3, 16), (8, 16, 32), (9, 27, 33), (17, 40, 240), (130, 96, 24), (300, 1152, 320)]
        {
            let (weight, bias) = (random(inputs * outputs, 1), random(outputs, 2));
            let (input, residual) = (random(pixels * inputs, 3), random(pixels * outputs, 4));
            for activation in [Activation::None, Activation::Relu, Activation::Relu6] {
                let layer = Pointwise::new(&weight, &bias, inputs, outputs, activation);
                let sgemm = Pointwise::with_layout(&weight, &bias, inputs, outputs, activation, false);
                for with_residual in [false, true] {
                    let residual = with_residual.then_some(residual.as_slice());
                    let expected: Vec<f64> = (0..pixels * outputs)
                        .map(|at| {
                            let (p, o) = (at / outputs, at % outputs);
                            let sum = f64::from(bias[o])
                                + (0..inputs).map(|i| f64::from(input[p * inputs + i]) * f64::from(weight[o * inputs + i])).sum::<f64>();
                            let sum = sum + residual.map_or(0.0, |r| f64::from(r[at]));
                            match activation {
                                Activation::None => sum,
                                Activation::Relu => sum.max(0.0),
                                Activation::Relu6 => sum.clamp(0.0, 6.0),
                            }
                        })
                        .collect();
                    let mut fast = vec![f32::NAN; pixels * outputs];
                    layer.forward(Rows::Given(&input), pixels, residual, &mut fast);
                    let mut made = vec![f32::NAN; pixels * outputs];
                    let unfold = |first: usize, rows: &mut [f32]| rows.copy_from_slice(&input[first * inputs..][..rows.len()]);
                    layer.forward(Rows::Unfolded(&unfold), pixels, residual, &mut made);
                    assert_eq!(made, fast);
                    let mut by_sgemm = vec![f32::NAN; pixels * outputs];
                    sgemm.forward(Rows::Given(&input), pixels, residual, &mut by_sgemm);
                    let what = format!("{pixels} × {inputs} → {outputs}, {activation:?}, residual {with_residual}");
                    reference_close(&fast, &expected, inputs, &what);
                    reference_close(&by_sgemm, &expected, inputs, &what);
                }
            }
        }
    }
}
