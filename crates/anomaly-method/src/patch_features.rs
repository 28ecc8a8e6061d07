//! PatchCore's patch features (Roth et al. 2022): two intermediate maps of the backbone, each locally
//! aggregated by a 3×3 average pool (stride 1, padding 1, always divided by 9), the deeper one bilinearly
//! upsampled to the shallower grid (half-pixel centres, PyTorch's `align_corners=False`), concatenated per
//! position and reduced to `patch_dim` by adaptive average pooling over the channels (bin `i` covers
//! `[floor(i·C/D), ceil((i+1)·C/D))`). The PatchCore method builds its memory bank from these.
//!
//! The math runs on the host with rayon, on the maps [`Extractor::run`] already brings back: measured on
//! our 2-core CPU it is faster than the same four steps in burn-flex (see the `timing` test), and the
//! maps are read back either way.

use std::path::PathBuf;

use anomaly_backbone::{BackboneName, HostMap};
use anomaly_data::{Batch, ImageLimits};
use anyhow::{Result, bail, ensure};
use indicatif::ProgressBar;
use rayon::prelude::*;

use crate::extractor::Extractor;

/// The patch width PatchCore uses for the ResNets (layer2 + layer3 give 1536 channels).
pub const RESNET_PATCH_DIM: usize = 1024;

/// Which two maps of a backbone make its patches, on which grid, and how wide a patch is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchLayout {
    backbone: BackboneName,
    taps: [&'static str; 2],
    strides: [usize; 2],
    channels: [usize; 2],
    grid: (usize, usize),
    patch_dim: usize,
}

impl PatchLayout {
    /// The layout of `backbone` at its own input crop, with the default patch width: 1024 for the ResNets
    /// (PatchCore's), and for EfficientNet-Lite the concatenated width itself (152 for Lite0, 168 for
    /// Lite2): pooling to more channels than there are only repeats values, which costs bank memory and
    /// distance time without adding information.
    pub fn new(backbone: BackboneName) -> Self {
        // The last output at stride 8 and the last at stride 16, with their widths.
        let (taps, channels) = match backbone {
            BackboneName::ResNet50 | BackboneName::ResNet50V2 | BackboneName::WideResNet50_2 => (["layer2", "layer3"], [512, 1024]),
            BackboneName::EfficientNetLite0 => (["block4", "block10"], [40, 112]),
            BackboneName::EfficientNetLite2 => (["block6", "block14"], [48, 120]),
        };
        let patch_dim = match backbone {
            BackboneName::EfficientNetLite0 | BackboneName::EfficientNetLite2 => channels[0] + channels[1],
            _ => RESNET_PATCH_DIM,
        };
        // Every stride-2 stage of these backbones maps a side n to ceil(n / 2) (padding 1 or 3 in the
        // ResNets, TensorFlow "SAME" in Lite), so three of them give ceil(n / 8).
        let side = backbone.preprocess().crop as usize;
        let grid = (side.div_ceil(8), side.div_ceil(8));
        Self { backbone, taps, strides: [8, 16], channels, grid, patch_dim }
    }

    /// The same layout with patches `patch_dim` wide, which must be from 1 to the concatenated width
    /// (adaptive pooling to more channels would only repeat them).
    pub fn with_patch_dim(mut self, patch_dim: usize) -> Result<Self> {
        let width = self.concat_dim();
        ensure!((1..=width).contains(&patch_dim), "a patch width of {patch_dim} for {}: it must be from 1 to {width}", self.backbone);
        self.patch_dim = patch_dim;
        Ok(self)
    }

    /// The backbone the layout is for.
    pub fn backbone(&self) -> BackboneName {
        self.backbone
    }

    /// The two tap names, shallower (stride 8) first.
    pub fn taps(&self) -> [&'static str; 2] {
        self.taps
    }

    /// The taps' strides in input pixels.
    pub fn strides(&self) -> [usize; 2] {
        self.strides
    }

    /// The taps' channel counts.
    pub fn channels(&self) -> [usize; 2] {
        self.channels
    }

    /// Patches per image as (rows, columns): the shallower map's grid at the backbone's input crop.
    pub fn grid(&self) -> (usize, usize) {
        self.grid
    }

    /// Values per patch.
    pub fn patch_dim(&self) -> usize {
        self.patch_dim
    }

    /// The width of the two maps concatenated, before the channel pooling.
    pub fn concat_dim(&self) -> usize {
        self.channels[0] + self.channels[1]
    }

    /// The patches of a batch from the maps [`Extractor::run`] returned for [`PatchLayout::taps`]; the maps'
    /// widths and the grid must be this layout's.
    pub fn patches(&self, maps: &[HostMap]) -> Result<Patches> {
        let find = |tap: &str| {
            maps.iter().find(|m| m.name == tap).ok_or_else(|| anyhow::anyhow!("no feature map '{tap}' among the {} given", maps.len()))
        };
        let (shallow, deep) = (find(self.taps[0])?, find(self.taps[1])?);
        for (map, channels) in [(shallow, self.channels[0]), (deep, self.channels[1])] {
            ensure!(
                map.shape[1] == channels,
                "feature map '{}' has {} channels; {} gives {channels}",
                map.name,
                map.shape[1],
                self.backbone
            );
        }
        let grid = (shallow.shape[2], shallow.shape[3]);
        ensure!(
            grid == self.grid,
            "feature map '{}' is {}×{}; the layout of {} expects {}×{}",
            shallow.name,
            grid.0,
            grid.1,
            self.backbone,
            self.grid.0,
            self.grid.1
        );
        patch_features(shallow, deep, self.patch_dim)
    }
}

/// The patches of a batch: `images × grid.0 × grid.1` patches of `patch_dim` values, row-major (patch
/// `y * grid.1 + x` of an image, then the next image).
#[derive(Clone, Debug, PartialEq)]
pub struct Patches {
    pub images: usize,
    pub grid: (usize, usize),
    pub patch_dim: usize,
    pub values: Vec<f32>,
}

impl Patches {
    /// Patches per image.
    pub fn per_image(&self) -> usize {
        self.grid.0 * self.grid.1
    }

    /// Image `index`'s patches (`per_image × patch_dim`, row-major), or `None` past the last image.
    pub fn image(&self, index: usize) -> Option<&[f32]> {
        let len = self.per_image() * self.patch_dim;
        self.values.get(index * len..(index + 1) * len)
    }
}

/// The shapes of a shallow and a deep map, checked: `(images, [c1, h, w], [c2, h2, w2])`.
fn checked_shapes(shallow: &HostMap, deep: &HostMap, patch_dim: usize) -> Result<(usize, [usize; 3], [usize; 3])> {
    for map in [shallow, deep] {
        let [_, c, h, w] = map.shape;
        ensure!(c > 0 && h > 0 && w > 0, "feature map '{}' is empty ({:?})", map.name, map.shape);
        let len = map.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        ensure!(
            len == Some(map.values.len()),
            "feature map '{}' holds {} values, not the {:?} its shape says",
            map.name,
            map.values.len(),
            map.shape
        );
    }
    ensure!(
        shallow.shape[0] == deep.shape[0],
        "feature maps '{}' and '{}' are of {} and {} images",
        shallow.name,
        deep.name,
        shallow.shape[0],
        deep.shape[0]
    );
    let width = shallow.shape[1] + deep.shape[1];
    ensure!((1..=width).contains(&patch_dim), "a patch width of {patch_dim}: it must be from 1 to the {width} channels of both maps");
    let [images, c1, h, w] = shallow.shape;
    let [_, c2, h2, w2] = deep.shape;
    Ok((images, [c1, h, w], [c2, h2, w2]))
}

/// Bilinear sampling along one axis, as PyTorch's `align_corners=False`: for each output index the two
/// source indices and their weights.
fn linear_taps(input: usize, output: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let source = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (source as usize).min(input - 1);
            let i1 = if i0 + 1 < input { i0 + 1 } else { i0 };
            let l1 = (source - i0 as f32).clamp(0.0, 1.0);
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// Sums of 3×3 neighbourhoods of an `h × w` plane, zero outside it, into `out`.
fn box_sum(plane: &[f32], h: usize, w: usize, rows: &mut [f32], out: &mut [f32]) {
    for y in 0..h {
        let row = &plane[y * w..(y + 1) * w];
        let dst = &mut rows[y * w..(y + 1) * w];
        for x in 0..w {
            let mut s = row[x];
            if x > 0 {
                s += row[x - 1];
            }
            if x + 1 < w {
                s += row[x + 1];
            }
            dst[x] = s;
        }
    }
    for y in 0..h {
        for x in 0..w {
            let mut s = rows[y * w + x];
            if y > 0 {
                s += rows[(y - 1) * w + x];
            }
            if y + 1 < h {
                s += rows[(y + 1) * w + x];
            }
            out[y * w + x] = s;
        }
    }
}

/// Scratch planes of one worker.
#[derive(Default)]
struct Scratch {
    shallow_sum: Vec<f32>,
    deep_sum: Vec<f32>,
    rows: Vec<f32>,
    pooled: Vec<f32>,
}

/// PatchCore's patch features of a batch from its shallower and deeper map (`[batch, channels, h, w]`
/// each): the output grid is the shallower map's. Every step is linear, so each output channel is pooled
/// and upsampled once from the sum of the input channels its bin covers (the same numbers as pooling each
/// input channel first, up to rounding). Shapes that do not fit together are an error.
pub fn patch_features(shallow: &HostMap, deep: &HostMap, patch_dim: usize) -> Result<Patches> {
    let (images, [c1, h, w], [c2, h2, w2]) = checked_shapes(shallow, deep, patch_dim)?;
    let channels = c1 + c2;
    let (plane, deep_plane) = (h * w, h2 * w2);
    let rows = linear_taps(h2, h);
    let cols = linear_taps(w2, w);
    // Channel-major result planes, [images, patch_dim, h * w], then transposed into patches.
    let mut planes = vec![0f32; images * patch_dim * plane];
    planes.par_chunks_mut(plane).enumerate().for_each_init(Scratch::default, |scratch, (index, out)| {
        let (image, bin) = (index / patch_dim, index % patch_dim);
        let start = bin * channels / patch_dim;
        let end = ((bin + 1) * channels).div_ceil(patch_dim);
        let scale = 1.0 / (9.0 * (end - start) as f32);
        out.fill(0.0);
        scratch.rows.resize(plane.max(deep_plane), 0.0);
        scratch.pooled.resize(plane.max(deep_plane), 0.0);
        if start < c1 {
            let sum = &mut scratch.shallow_sum;
            sum.clear();
            sum.resize(plane, 0.0);
            for c in start..end.min(c1) {
                let source = &shallow.values[(image * c1 + c) * plane..][..plane];
                sum.iter_mut().zip(source).for_each(|(s, v)| *s += v);
            }
            box_sum(sum, h, w, &mut scratch.rows, &mut scratch.pooled);
            out.iter_mut().zip(&scratch.pooled[..plane]).for_each(|(o, v)| *o += v);
        }
        if end > c1 {
            let sum = &mut scratch.deep_sum;
            sum.clear();
            sum.resize(deep_plane, 0.0);
            for c in start.max(c1) - c1..end - c1 {
                let source = &deep.values[(image * c2 + c) * deep_plane..][..deep_plane];
                sum.iter_mut().zip(source).for_each(|(s, v)| *s += v);
            }
            box_sum(sum, h2, w2, &mut scratch.rows, &mut scratch.pooled);
            let pooled = &scratch.pooled;
            for (y, &(y0, y1, wy0, wy1)) in rows.iter().enumerate() {
                let (r0, r1) = (&pooled[y0 * w2..][..w2], &pooled[y1 * w2..][..w2]);
                for (x, &(x0, x1, wx0, wx1)) in cols.iter().enumerate() {
                    out[y * w + x] += wy0 * (wx0 * r0[x0] + wx1 * r0[x1]) + wy1 * (wx0 * r1[x0] + wx1 * r1[x1]);
                }
            }
        }
        out.iter_mut().for_each(|o| *o *= scale);
    });
    let mut values = vec![0f32; images * plane * patch_dim];
    values.par_chunks_mut(plane * patch_dim).zip(planes.par_chunks(plane * patch_dim)).for_each(|(patches, planes)| {
        for (p, patch) in patches.chunks_mut(patch_dim).enumerate() {
            for (d, value) in patch.iter_mut().enumerate() {
                *value = planes[d * plane + p];
            }
        }
    });
    Ok(Patches { images, grid: (h, w), patch_dim, values })
}

/// A plain, obviously correct reference of [`patch_features`] (the four steps one after another, in f64
/// loops), for tests.
pub mod reference {
    use super::*;

    /// The four steps of PatchCore's patch features, one after another.
    pub fn patch_features(shallow: &HostMap, deep: &HostMap, patch_dim: usize) -> Result<Patches> {
        let (images, [c1, h, w], [c2, h2, w2]) = checked_shapes(shallow, deep, patch_dim)?;
        let value = |map: &HostMap, n: usize, c: usize, y: usize, x: usize| {
            let [_, channels, height, width] = map.shape;
            map.values[((n * channels + c) * height + y) * width + x] as f64
        };
        // 1. 3×3 average pool, stride 1, zero padding 1, divided by 9 everywhere.
        let pool = |map: &HostMap, n: usize, c: usize, y: usize, x: usize| {
            let [_, _, height, width] = map.shape;
            let mut sum = 0.0;
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (yy, xx) = (y as i64 + dy, x as i64 + dx);
                    if yy >= 0 && xx >= 0 && (yy as usize) < height && (xx as usize) < width {
                        sum += value(map, n, c, yy as usize, xx as usize);
                    }
                }
            }
            sum / 9.0
        };
        // 2. Bilinear, half-pixel centres, negative source coordinates clamped to 0, the last row repeated.
        let source = |o: usize, input: usize, output: usize| {
            let s = ((o as f64 + 0.5) * input as f64 / output as f64 - 0.5).max(0.0);
            let i0 = s.floor() as usize;
            let i1 = (i0 + 1).min(input - 1);
            (i0, i1, s - i0 as f64)
        };
        let mut values = Vec::with_capacity(images * h * w * patch_dim);
        for n in 0..images {
            for y in 0..h {
                for x in 0..w {
                    // 3. The concatenated vector at (y, x).
                    let mut concat = Vec::with_capacity(c1 + c2);
                    for c in 0..c1 {
                        concat.push(pool(shallow, n, c, y, x));
                    }
                    let (y0, y1, ly) = source(y, h2, h);
                    let (x0, x1, lx) = source(x, w2, w);
                    for c in 0..c2 {
                        let top = (1.0 - lx) * pool(deep, n, c, y0, x0) + lx * pool(deep, n, c, y0, x1);
                        let bottom = (1.0 - lx) * pool(deep, n, c, y1, x0) + lx * pool(deep, n, c, y1, x1);
                        concat.push((1.0 - ly) * top + ly * bottom);
                    }
                    // 4. Adaptive average pooling over the channels.
                    let channels = concat.len() as f64;
                    for i in 0..patch_dim {
                        let start = (i as f64 * channels / patch_dim as f64).floor() as usize;
                        let end = ((i + 1) as f64 * channels / patch_dim as f64).ceil() as usize;
                        let bin = &concat[start..end];
                        values.push((bin.iter().sum::<f64>() / bin.len() as f64) as f32);
                    }
                }
            }
        }
        Ok(Patches { images, grid: (h, w), patch_dim, values })
    }
}

impl Extractor {
    /// Runs the backbone over `paths`, `batch_size` images at a time, handing each batch's patches in
    /// `layout` to `sink`: the first building block of PatchCore's fit and scoring.
    pub fn patches(
        &self,
        layout: &PatchLayout,
        paths: Vec<PathBuf>,
        batch_size: usize,
        limits: ImageLimits,
        progress: &ProgressBar,
        mut sink: impl FnMut(&Batch, Patches) -> Result<()>,
    ) -> Result<()> {
        if layout.backbone() != self.name() {
            bail!("a patch layout for {} cannot run on {}", layout.backbone(), self.name());
        }
        self.run_maps(paths, &layout.taps(), batch_size, limits, progress, |batch, maps| sink(batch, layout.patches(&maps)?))
    }

    /// The patches in `layout` of a batch of images already preprocessed (a model file records the
    /// preprocessing it was fitted with).
    pub fn batch_patches(&self, layout: &PatchLayout, batch: &Batch, side: usize) -> Result<Patches> {
        if layout.backbone() != self.name() {
            bail!("a patch layout for {} cannot run on {}", layout.backbone(), self.name());
        }
        layout.patches(&self.forward_maps(batch, side, &layout.taps())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map of `shape` with seeded values in [-2, 2).
    fn random_map(name: &str, shape: [usize; 4], seed: u64) -> HostMap {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        let values = (0..shape.iter().product::<usize>())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        HostMap { name: name.into(), shape, values }
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn the_fast_path_matches_the_reference() {
        // (shallow, deep, patch_dim): ratio 2 on even and odd grids, non-integer ratios, a deep map of one
        // row, channel counts not divisible by the patch width, no reduction, and a width of 1.
        let cases: [([usize; 4], [usize; 4], usize); 8] = [
            ([2, 6, 8, 8], [2, 10, 4, 4], 7),
            ([1, 5, 7, 9], [1, 9, 4, 5], 14),
            ([2, 7, 9, 11], [2, 13, 5, 6], 10),
            ([1, 4, 33, 33], [1, 6, 17, 17], 9),
            ([1, 3, 5, 4], [1, 5, 1, 3], 3),
            ([3, 8, 6, 10], [3, 3, 3, 5], 11),
            ([1, 40, 28, 28], [1, 112, 14, 14], 152),
            ([1, 9, 4, 4], [1, 8, 2, 2], 1),
        ];
        for (seed, (a, b, dim)) in cases.into_iter().enumerate() {
            let shallow = random_map("s", a, 2 * seed as u64);
            let deep = random_map("d", b, 2 * seed as u64 + 1);
            let fast = patch_features(&shallow, &deep, dim).unwrap();
            let slow = reference::patch_features(&shallow, &deep, dim).unwrap();
            assert_eq!((fast.images, fast.grid, fast.patch_dim), (a[0], (a[2], a[3]), dim));
            assert_eq!(fast.values.len(), a[0] * a[2] * a[3] * dim);
            let diff = max_diff(&fast.values, &slow.values);
            assert!(diff < 1e-5, "{a:?} + {b:?} → {dim}: off by {diff}");
        }
    }

    /// The same four steps with burn's own operations on `device`: an independent implementation of the
    /// pooling and interpolation, and the alternative the host path was measured against.
    fn burn_patches(shallow: &HostMap, deep: &HostMap, patch_dim: usize, device: &burn::tensor::Device) -> Vec<f32> {
        use burn::tensor::module::{adaptive_avg_pool1d, avg_pool2d, interpolate};
        use burn::tensor::ops::{AvgPoolOptions, InterpolateMode, InterpolateOptions};
        use burn::tensor::{Tensor, TensorData};
        let tensor = |map: &HostMap| Tensor::<4>::from_data(TensorData::new(map.values.clone(), map.shape), device);
        let pool = AvgPoolOptions::new([3, 3]).with_stride([1, 1]).with_padding([1, 1]).with_count_include_pad(true);
        let [n, _, h, w] = shallow.shape;
        let a = avg_pool2d(tensor(shallow), pool.clone());
        let b = avg_pool2d(tensor(deep), pool);
        let b = interpolate(b, InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false).with_output_size([h, w]));
        let c = shallow.shape[1] + deep.shape[1];
        let x = Tensor::cat(vec![a, b], 1).permute([0, 2, 3, 1]).reshape([n * h * w, 1, c]);
        crate::to_vec(adaptive_avg_pool1d(x, patch_dim).into_data()).unwrap()
    }

    #[test]
    fn burn_flex_computes_the_same_patches() {
        let device = burn::tensor::Device::flex();
        for (a, b, dim) in [([2, 7, 9, 11], [2, 13, 5, 6], 10), ([1, 6, 8, 8], [1, 10, 4, 4], 16), ([1, 4, 33, 33], [1, 6, 17, 17], 7)] {
            let shallow = random_map("s", a, 11);
            let deep = random_map("d", b, 12);
            let diff = max_diff(&patch_features(&shallow, &deep, dim).unwrap().values, &burn_patches(&shallow, &deep, dim, &device));
            assert!(diff < 1e-5, "{a:?} + {b:?} → {dim}: off by {diff}");
        }
    }

    /// Host (rayon) against burn-flex on a batch of 8 at the real sizes; run by hand with
    /// `cargo test --release --workspace patch_features::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "a timing, not a check"]
    fn timing() {
        let device = burn::tensor::Device::flex();
        for (name, a, b, dim) in [("resnet", [8, 512, 28, 28], [8, 1024, 14, 14], 1024), ("lite0", [8, 40, 28, 28], [8, 112, 14, 14], 152)]
        {
            let shallow = random_map("s", a, 1);
            let deep = random_map("d", b, 2);
            let time = |f: &dyn Fn() -> Vec<f32>| {
                let _ = f();
                let start = std::time::Instant::now();
                for _ in 0..5 {
                    std::hint::black_box(f());
                }
                start.elapsed().as_secs_f64() / 5.0 * 1e3
            };
            let host = time(&|| patch_features(&shallow, &deep, dim).unwrap().values);
            let flex = time(&|| burn_patches(&shallow, &deep, dim, &device));
            eprintln!("{name} batch 8: host {host:.1} ms, burn-flex {flex:.1} ms");
        }
    }

    #[test]
    fn hand_computed_values() {
        // A 2×2 shallow map of ones: every position sees 4 of its 9 neighbours. A 1×1 deep map upsamples to
        // a constant. Channels [1, 3] pooled to 1: the mean of 4/9 and 3/9.
        let shallow = HostMap { name: "s".into(), shape: [1, 1, 2, 2], values: vec![1.0; 4] };
        let deep = HostMap { name: "d".into(), shape: [1, 1, 1, 1], values: vec![3.0] };
        for patches in [patch_features(&shallow, &deep, 1).unwrap(), reference::patch_features(&shallow, &deep, 1).unwrap()] {
            assert_eq!(patches.grid, (2, 2));
            for v in &patches.values {
                assert!((v - (4.0 / 9.0 + 3.0 / 9.0) / 2.0).abs() < 1e-6, "{v}");
            }
        }
        // Ratio 2 along a row of one: [9, 0, 0, 0] pools (3 of 9 neighbours inside) to [1, 1, 0, 0]; eight
        // half-pixel centres sample it at max(0, x/2 - 1/4): 0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25 (the
        // last clamped to the last column). Bin 0 is the shallow map (zeros), bin 1 the deep one.
        let shallow = HostMap { name: "s".into(), shape: [1, 1, 1, 8], values: vec![0.0; 8] };
        let deep = HostMap { name: "d".into(), shape: [1, 1, 1, 4], values: vec![9.0, 0.0, 0.0, 0.0] };
        let expected = [1.0, 1.0, 1.0, 0.75, 0.25, 0.0, 0.0, 0.0];
        for patches in [patch_features(&shallow, &deep, 2).unwrap(), reference::patch_features(&shallow, &deep, 2).unwrap()] {
            let bins: Vec<f32> = patches.values.iter().skip(1).step_by(2).copied().collect();
            assert!(max_diff(&bins, &expected) < 1e-6, "{bins:?}");
            assert!(patches.values.iter().step_by(2).all(|v| *v == 0.0));
        }
    }

    #[test]
    fn bins_follow_adaptive_average_pooling() {
        // Five channels to three bins: [0, 2), [1, 4), [3, 5). Constant planes make pooling and upsampling
        // vanish except the zero padding, so take a single interior position of a 3×3 grid.
        let shallow = HostMap { name: "s".into(), shape: [1, 2, 3, 3], values: [vec![1.0; 9], vec![2.0; 9]].concat() };
        let deep = HostMap { name: "d".into(), shape: [1, 3, 3, 3], values: [vec![4.0; 9], vec![8.0; 9], vec![16.0; 9]].concat() };
        let patches = patch_features(&shallow, &deep, 3).unwrap();
        let centre = &patches.values[4 * 3..5 * 3];
        let expected = [1.5, (2.0 + 4.0 + 8.0) / 3.0, 12.0];
        assert!(max_diff(centre, &expected) < 1e-5, "{centre:?}");
    }

    #[test]
    fn mismatched_maps_are_errors() {
        let shallow = random_map("s", [2, 4, 6, 6], 1);
        let deep = random_map("d", [2, 4, 3, 3], 2);
        let other_batch = random_map("d", [1, 4, 3, 3], 3);
        assert!(patch_features(&shallow, &other_batch, 4).unwrap_err().to_string().contains("images"));
        assert!(patch_features(&shallow, &deep, 0).is_err());
        assert!(patch_features(&shallow, &deep, 9).is_err());
        let mut short = random_map("d", [2, 4, 3, 3], 2);
        short.values.pop();
        assert!(patch_features(&shallow, &short, 4).unwrap_err().to_string().contains("values"));
        let empty = HostMap { name: "e".into(), shape: [2, 4, 0, 3], values: vec![] };
        assert!(patch_features(&shallow, &empty, 4).is_err());
        assert!(reference::patch_features(&shallow, &other_batch, 4).is_err());
    }

    #[test]
    fn layouts_per_backbone() {
        let layout = PatchLayout::new(BackboneName::WideResNet50_2);
        assert_eq!((layout.taps(), layout.grid(), layout.patch_dim(), layout.concat_dim()), (["layer2", "layer3"], (28, 28), 1024, 1536));
        assert_eq!(PatchLayout::new(BackboneName::ResNet50V2).grid(), (28, 28));
        let lite0 = PatchLayout::new(BackboneName::EfficientNetLite0);
        assert_eq!((lite0.taps(), lite0.grid(), lite0.patch_dim()), (["block4", "block10"], (28, 28), 152));
        let lite2 = PatchLayout::new(BackboneName::EfficientNetLite2);
        assert_eq!((lite2.taps(), lite2.grid(), lite2.patch_dim()), (["block6", "block14"], (33, 33), 168));
        assert_eq!(lite0.clone().with_patch_dim(64).unwrap().patch_dim(), 64);
        assert!(lite0.clone().with_patch_dim(0).is_err());
        assert!(lite0.with_patch_dim(153).is_err());
    }

    /// Each layout against its backbone's own maps (untrained weights at the input crop): the taps' widths
    /// and grids, and that each tap is the last one at its stride (the next tap is coarser).
    #[test]
    fn layouts_fit_their_backbones() {
        use anomaly_backbone::Backbone;
        use burn::tensor::Tensor;
        let device = burn::tensor::Device::flex();
        for name in [BackboneName::ResNet50, BackboneName::EfficientNetLite0, BackboneName::EfficientNetLite2] {
            let layout = PatchLayout::new(name);
            let backbone = Backbone::init(name, &device);
            let tap_names = backbone.tap_names();
            let next = |tap: &str| tap_names[tap_names.iter().position(|t| t == tap).unwrap() + 1].clone();
            let [shallow, deep] = layout.taps();
            let (after_shallow, after_deep) = (next(shallow), next(deep));
            let side = name.preprocess().crop as usize;
            let input = Tensor::<4>::zeros([1, 3, side, side], &device);
            let features = backbone.features(input, &[shallow, deep, &after_shallow, &after_deep]);
            let maps: Vec<HostMap> = features
                .maps
                .into_iter()
                .map(|(name, map)| HostMap { name, shape: map.dims(), values: crate::to_vec(map.into_data()).unwrap() })
                .collect();
            let shape = |tap: &str| maps.iter().find(|m| m.name == tap).unwrap().shape;
            let (grid, [c1, c2]) = (layout.grid(), layout.channels());
            assert_eq!(shape(shallow), [1, c1, grid.0, grid.1], "{name}");
            assert_eq!(shape(deep), [1, c2, grid.0.div_ceil(2), grid.1.div_ceil(2)], "{name}");
            assert_eq!(shape(&after_shallow)[2], grid.0.div_ceil(2), "{name}: {shallow} is not the last tap at stride 8");
            assert_eq!(shape(&after_deep)[2], grid.0.div_ceil(4), "{name}: {deep} is not the last tap at stride 16");
            let patches = layout.patches(&maps).unwrap();
            assert_eq!((patches.grid, patches.patch_dim), (grid, layout.patch_dim()));
        }
    }

    #[test]
    fn a_layout_checks_the_maps_it_is_given() {
        let layout = PatchLayout::new(BackboneName::EfficientNetLite0).with_patch_dim(16).unwrap();
        let shallow = random_map("block4", [1, 40, 28, 28], 1);
        let deep = random_map("block10", [1, 112, 14, 14], 2);
        let patches = layout.patches(&[deep, shallow]).unwrap();
        assert_eq!((patches.grid, patches.patch_dim, patches.per_image()), ((28, 28), 16, 784));
        assert_eq!(patches.image(0).unwrap().len(), 784 * 16);
        assert!(patches.image(1).is_none());
        let wrong_width = random_map("block10", [1, 80, 14, 14], 2);
        let shallow = random_map("block4", [1, 40, 28, 28], 1);
        assert!(layout.patches(&[shallow.clone(), wrong_width]).unwrap_err().to_string().contains("channels"));
        let deep = random_map("block10", [1, 112, 14, 14], 2);
        assert!(layout.patches(std::slice::from_ref(&shallow)).unwrap_err().to_string().contains("block10"));
        let wrong_grid = random_map("block4", [1, 40, 27, 28], 1);
        assert!(layout.patches(&[wrong_grid, deep]).unwrap_err().to_string().contains("expects"));
    }
}
