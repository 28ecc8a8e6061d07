//! Pixel-level localisation metrics at the images' own resolution, as MVTec AD reports them: pixel AUROC
//! and AUPRO (the area under the per-region-overlap curve up to a false positive rate, MVTec's
//! `pro_curve_util.py` and `generic_util.trapezoid`). PatchCore's report uses them; a full category
//! (tens of millions of pixels) is sorted once, so both come from one pass.
//!
//! Every distinct score is a threshold and a pixel counts as flagged when its score is at or above it.
//! Negatives are the anomaly-free pixels of every test image (good images' pixels included); the defect
//! regions are the 8-connected components of each mask.

use rayon::prelude::*;
use serde::Serialize;

/// MVTec AD's integration limit for AUPRO: the PRO curve up to a false positive rate of 30 %.
pub const AUPRO_MAX_FPR: f64 = 0.3;

/// One image's anomaly map: a score per pixel, row by row, `width × height` of them.
#[derive(Clone, Copy, Debug)]
pub struct AnomalyMap<'a> {
    pub width: usize,
    pub height: usize,
    pub scores: &'a [f32],
}

/// Pixel AUROC, AUPRO and the F1-optimal pixel threshold of one set of maps, computed from one sort.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PixelMetrics {
    pub auroc: f64,
    pub aupro: f64,
    /// The threshold that flags the pixels best by F1 over all pixels (a pixel at or above it is flagged).
    pub f1_optimal: PixelF1,
}

/// A pixel threshold and the F1 of flagging the pixels at or above it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PixelF1 {
    pub threshold: f32,
    pub f1: f64,
}

/// Why pixel metrics cannot be computed for these maps and masks.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PixelMetricsError {
    #[error("{maps} anomaly maps but {masks} masks")]
    CountMismatch { maps: usize, masks: usize },
    #[error("image {index}: the anomaly map holds {len} scores, not {width}×{height}")]
    MapSize { index: usize, len: usize, width: usize, height: usize },
    #[error("image {index}: the mask holds {len} pixels, not {width}×{height} as its anomaly map")]
    MaskSize { index: usize, len: usize, width: usize, height: usize },
    #[error("image {index}: an anomaly score is NaN")]
    NotANumber { index: usize },
    #[error("{0} pixels in all are more than the pixel metrics handle ({max})", max = u32::MAX)]
    TooManyPixels(u64),
    #[error("the AUPRO limit {0} is not a false positive rate in (0, 1]")]
    MaxFpr(f64),
    #[error("pixel metrics are undefined: no mask marks a defective pixel")]
    NoDefects,
    #[error("pixel metrics are undefined: no pixel is anomaly-free")]
    NoNegatives,
}

/// Pixel AUROC over every pixel of every image, ties counting half (as `roc_auc_score` and [`crate::auroc`]).
/// A mask of `None` is an image without defects; a mask is `true` where the pixel is defective.
pub fn pixel_auroc(maps: &[AnomalyMap], masks: &[Option<&[bool]>]) -> Result<f64, PixelMetricsError> {
    Ok(pixel_metrics(maps, masks, 1.0)?.auroc)
}

/// AUPRO up to `max_fpr` (MVTec uses [`AUPRO_MAX_FPR`]), normalised by `max_fpr` so that 1 is perfect.
pub fn aupro(maps: &[AnomalyMap], masks: &[Option<&[bool]>], max_fpr: f64) -> Result<f64, PixelMetricsError> {
    Ok(pixel_metrics(maps, masks, max_fpr)?.aupro)
}

/// Pixel AUROC and AUPRO up to `max_fpr` together, for the price of one sort.
pub fn pixel_metrics(maps: &[AnomalyMap], masks: &[Option<&[bool]>], max_fpr: f64) -> Result<PixelMetrics, PixelMetricsError> {
    if maps.len() != masks.len() {
        return Err(PixelMetricsError::CountMismatch { maps: maps.len(), masks: masks.len() });
    }
    let mut pixels = PixelScores::with_capacity(maps.iter().map(|m| m.scores.len()).sum());
    for (map, mask) in maps.iter().zip(masks) {
        pixels.add(*map, *mask)?;
    }
    pixels.metrics(max_fpr)
}

/// The pixels of a set of maps, gathered one image at a time, so that a caller never holds every map
/// at once: each pixel is kept as 4 bytes (8 for defective ones) whatever the map's type, and the map
/// can be dropped once added. A full MVTec AD category at its own resolution (83 images of 900 × 900)
/// holds about 270 MB here.
#[derive(Default)]
pub struct PixelScores {
    /// Score keys ([`score_key`]) of the anomaly-free pixels.
    negatives: Vec<u32>,
    /// Score key in the high half, region index in the low half, of the defective pixels.
    positives: Vec<u64>,
    /// Size of each region, by region index.
    sizes: Vec<u32>,
    /// Images added so far (named in errors).
    images: usize,
}

impl PixelScores {
    /// Room for `pixels` pixels in all, so that gathering a known number reallocates nothing.
    pub fn with_capacity(pixels: usize) -> Self {
        Self { negatives: Vec::with_capacity(pixels), ..Self::default() }
    }

    /// Adds one image's map; `mask` is `None` for an image without defects, else `true` where a pixel is
    /// defective, of the map's size. A bad image is refused whole, leaving what was added before.
    pub fn add(&mut self, map: AnomalyMap, mask: Option<&[bool]>) -> Result<(), PixelMetricsError> {
        let (index, width, height) = (self.images, map.width, map.height);
        if width.checked_mul(height) != Some(map.scores.len()) {
            return Err(PixelMetricsError::MapSize { index, len: map.scores.len(), width, height });
        }
        if let Some(mask) = mask
            && mask.len() != map.scores.len()
        {
            return Err(PixelMetricsError::MaskSize { index, len: mask.len(), width, height });
        }
        if map.scores.iter().any(|s| s.is_nan()) {
            return Err(PixelMetricsError::NotANumber { index });
        }
        let total = (self.negatives.len() + self.positives.len()) as u64 + map.scores.len() as u64;
        if total > u32::MAX as u64 {
            return Err(PixelMetricsError::TooManyPixels(total));
        }
        self.images += 1;
        let Some(mask) = mask.filter(|m| m.contains(&true)) else {
            self.negatives.extend(map.scores.iter().map(|&s| score_key(s)));
            return Ok(());
        };
        let first_region = self.sizes.len() as u32;
        let regions = label_regions(mask, width, height, &mut self.sizes);
        for (&score, &region) in map.scores.iter().zip(&regions) {
            match region {
                0 => self.negatives.push(score_key(score)),
                r => self.positives.push((score_key(score) as u64) << 32 | (first_region + r - 1) as u64),
            }
        }
        Ok(())
    }

    /// Pixel AUROC, AUPRO up to `max_fpr` (normalised by it) and the F1-optimal threshold of the pixels added.
    pub fn metrics(self, max_fpr: f64) -> Result<PixelMetrics, PixelMetricsError> {
        if !(max_fpr > 0.0 && max_fpr <= 1.0) {
            return Err(PixelMetricsError::MaxFpr(max_fpr));
        }
        let pixels = SortedPixels::new(self);
        let (negatives, positives) = (pixels.negatives.len() as u64, pixels.positives.len() as u64);
        if positives == 0 {
            return Err(PixelMetricsError::NoDefects);
        }
        if negatives == 0 {
            return Err(PixelMetricsError::NoNegatives);
        }
        let regions = pixels.inverse_sizes.len() as f64;
        let mut roc_area = RocArea::default();
        let mut pro_area = ProArea::new(max_fpr);
        let mut best = PixelF1 { threshold: f32::INFINITY, f1: -1.0 };
        pixels.for_each_threshold(|threshold, fp, tp, overlap| {
            roc_area.add(fp, tp);
            pro_area.add(fp as f64 / negatives as f64, (overlap / regions).min(1.0));
            // F1 = 2·tp / (2·tp + fp + fn), with fn = positives − tp; the lowest threshold wins ties.
            let f1 = 2.0 * tp as f64 / (tp + fp + positives) as f64;
            if f1 >= best.f1 {
                best = PixelF1 { threshold: key_score(threshold), f1 };
            }
        });
        pro_area.add(1.0, 1.0);
        Ok(PixelMetrics {
            auroc: roc_area.twice_area as f64 / (2 * positives * negatives) as f64,
            aupro: pro_area.area / max_fpr,
            f1_optimal: best,
        })
    }
}

/// The pixels sorted by score, highest first: negatives as score keys alone, positives with their region.
struct SortedPixels {
    negatives: Vec<u32>,
    positives: Vec<u64>,
    /// 1 / size of each region, by region index.
    inverse_sizes: Vec<f64>,
}

impl SortedPixels {
    fn new(scores: PixelScores) -> Self {
        let PixelScores { mut negatives, mut positives, sizes, .. } = scores;
        negatives.par_sort_unstable_by(|a, b| b.cmp(a));
        positives.par_sort_unstable_by(|a, b| b.cmp(a));
        Self { negatives, positives, inverse_sizes: sizes.iter().map(|&s| 1.0 / s as f64).collect() }
    }

    /// Calls `visit(threshold key, false positives, true positives, Σ over regions of their flagged share)`
    /// at each distinct score, highest first, with every pixel at or above it flagged.
    fn for_each_threshold(&self, mut visit: impl FnMut(u32, u64, u64, f64)) {
        let (negatives, positives) = (&self.negatives, &self.positives);
        let (mut i, mut j) = (0, 0);
        let (mut fp, mut tp) = (0u64, 0u64);
        let mut overlap = CompensatedSum::default();
        while i < negatives.len() || j < positives.len() {
            let threshold = negatives.get(i).copied().max(positives.get(j).map(|&p| (p >> 32) as u32)).unwrap_or_default();
            while i < negatives.len() && negatives[i] == threshold {
                fp += 1;
                i += 1;
            }
            while j < positives.len() && (positives[j] >> 32) as u32 == threshold {
                tp += 1;
                overlap.add(self.inverse_sizes[positives[j] as u32 as usize]);
                j += 1;
            }
            visit(threshold, fp, tp, overlap.value());
        }
    }
}

/// A u32 ordered as the score (-0 and +0 one value), so that scores sort and tie as integers.
fn score_key(score: f32) -> u32 {
    let bits = (score + 0.0).to_bits(); // -0 + 0 is +0
    if bits >> 31 == 1 { !bits } else { bits | 1 << 31 }
}

/// The score a key stands for ([`score_key`] undone; -0 comes back as +0).
fn key_score(key: u32) -> f32 {
    f32::from_bits(if key >> 31 == 1 { key & !(1 << 31) } else { !key })
}

/// The 8-connected regions of `mask`: per pixel 0 outside, else the region's number from 1; each new
/// region's size is pushed onto `sizes`.
fn label_regions(mask: &[bool], width: usize, height: usize, sizes: &mut Vec<u32>) -> Vec<u32> {
    let mut labels = vec![0u32; mask.len()];
    let mut stack = Vec::new();
    let mut count = 0;
    for start in 0..mask.len() {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        count += 1;
        let mut size = 0;
        labels[start] = count;
        stack.push(start);
        while let Some(at) = stack.pop() {
            size += 1;
            let (x, y) = (at % width, at / width);
            for ny in y.saturating_sub(1)..(y + 2).min(height) {
                for nx in x.saturating_sub(1)..(x + 2).min(width) {
                    let next = ny * width + nx;
                    if mask[next] && labels[next] == 0 {
                        labels[next] = count;
                        stack.push(next);
                    }
                }
            }
        }
        sizes.push(size);
    }
    labels
}

/// Neumaier summation: the PRO sum adds up millions of 1 / size terms without drifting.
#[derive(Default)]
struct CompensatedSum {
    sum: f64,
    compensation: f64,
}

impl CompensatedSum {
    fn add(&mut self, value: f64) {
        let sum = self.sum + value;
        self.compensation += if self.sum.abs() >= value.abs() { (self.sum - sum) + value } else { (value - sum) + self.sum };
        self.sum = sum;
    }

    fn value(&self) -> f64 {
        self.sum + self.compensation
    }
}

/// Twice the area under the ROC curve in units of (false positives × true positives), exact in integers.
#[derive(Default)]
struct RocArea {
    twice_area: u128,
    last: (u64, u64),
}

impl RocArea {
    fn add(&mut self, fp: u64, tp: u64) {
        self.twice_area += (fp - self.last.0) as u128 * (tp + self.last.1) as u128;
        self.last = (fp, tp);
    }
}

/// The trapezoid area under the PRO curve from (0, 0) up to `max_fpr`, with the point at `max_fpr`
/// interpolated when the curve has none there, as MVTec's `trapezoid(x, y, x_max)`.
struct ProArea {
    max_fpr: f64,
    area: f64,
    last: (f64, f64),
    done: bool,
}

impl ProArea {
    fn new(max_fpr: f64) -> Self {
        Self { max_fpr, area: 0.0, last: (0.0, 0.0), done: false }
    }

    fn add(&mut self, fpr: f64, pro: f64) {
        if self.done {
            return;
        }
        let (x0, y0) = self.last;
        if fpr <= self.max_fpr {
            self.area += 0.5 * (pro + y0) * (fpr - x0);
            self.last = (fpr, pro);
        } else {
            if x0 < self.max_fpr {
                let y = y0 + (pro - y0) * (self.max_fpr - x0) / (fpr - x0);
                self.area += 0.5 * (y + y0) * (self.max_fpr - x0);
            }
            self.done = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_keys_order_as_the_scores() {
        let scores = [f32::NEG_INFINITY, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, f32::INFINITY];
        let keys: Vec<u32> = scores.iter().map(|&s| score_key(s)).collect();
        assert!(keys.windows(2).all(|w| w[0] <= w[1]), "{keys:?}");
        assert_eq!(score_key(-0.0), score_key(0.0));
        assert_eq!(keys.iter().collect::<std::collections::BTreeSet<_>>().len(), scores.len() - 1);
        for &score in &scores {
            assert_eq!(key_score(score_key(score)), score + 0.0);
        }
    }

    #[test]
    fn regions_join_diagonal_neighbours() {
        let mask = [
            true, false, false, false, true, //
            false, true, false, false, true, //
            false, false, false, false, false, //
            true, true, false, false, false,
        ];
        let mut sizes = vec![7];
        let labels = label_regions(&mask, 5, 4, &mut sizes);
        assert_eq!(sizes, [7, 2, 2, 2]);
        assert_eq!(labels[..10], [1, 0, 0, 0, 2, 0, 1, 0, 0, 2]);
        assert_eq!(labels[15..], [3, 3, 0, 0, 0]);
    }

    #[test]
    fn the_f1_optimal_pixel_threshold_is_the_lowest_of_the_best() {
        // Defective pixels score 3, 2, 0; anomaly-free ones 2.5, 1, 0, 0. At 3: F1 2/(1+0+3) = 0.5; at 2.5:
        // 2/5; at 2: 4/(2+1+3) = 2/3; at 1: 4/7; at 0: 6/10. Best 2/3 at 2.
        let scores = [3.0, 2.0, 0.0, 2.5, 1.0, 0.0, 0.0];
        let mask = [true, true, true, false, false, false, false];
        let mut pixels = PixelScores::default();
        pixels.add(AnomalyMap { width: 7, height: 1, scores: &scores }, Some(&mask)).unwrap();
        let metrics = pixels.metrics(AUPRO_MAX_FPR).unwrap();
        assert_eq!(metrics.f1_optimal, PixelF1 { threshold: 2.0, f1: 2.0 / 3.0 });
        // Two thresholds equally good, over two images: at 3, F1 2/(1+0+2) = 2/3; at 2, 2/(1+2+2); at 1,
        // 4/(2+2+2) = 2/3 again. The lower is taken, as the image-level best_f1 does.
        let mut tied = PixelScores::default();
        tied.add(AnomalyMap { width: 2, height: 1, scores: &[3.0, 2.0] }, Some(&[true, false])).unwrap();
        tied.add(AnomalyMap { width: 2, height: 1, scores: &[1.0, 2.0] }, Some(&[true, false])).unwrap();
        assert_eq!(tied.metrics(1.0).unwrap().f1_optimal, PixelF1 { threshold: 1.0, f1: 2.0 / 3.0 });
    }
}
