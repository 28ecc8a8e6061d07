//! Anomaly maps at the test images' own resolution, as MVTec AD evaluates them: each map over the network
//! input put back onto its original image ([`Preprocess::map_to_original`]), compared with the masks at
//! their own size (pixel AUROC, AUPRO, the F1-optimal pixel threshold), drawn over the images
//! (heatmaps.png) and saved as float TIFFs with overlays (`--save-maps`).

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use anomaly_data::{ImageLimits, Label, Preprocess, Sample, load_mask, load_rgb8, mask_at_size};
use anomaly_method::ImageOutput;
use anomaly_report::{AUPRO_MAX_FPR, AnomalyMap, GridImage, PixelMetrics, PixelMetricsError, PixelScores};
use anyhow::{Context, Result};
use image::{GrayImage, RgbImage};
use rayon::prelude::*;

/// Side of the images in heatmaps.png.
const HEATMAP_THUMB: u32 = 256;
/// Good images (the highest-scored) and images of each defect type (the first) heatmaps.png shows.
const HEATMAPS_PER_TYPE: usize = 3;
/// The share of map values below the top of the heat scale.
const HEAT_PERCENTILE: f64 = 0.999;
/// Opacity of the heat colour at the top of the scale (it fades to nothing at 0).
const HEAT_OPACITY: f32 = 0.6;
/// Colour of the mask outlines over the maps (absent from the heat ramp).
const OUTLINE: [u8; 3] = [255, 0, 255];

/// What an image's pixels are compared with.
enum Truth {
    /// A good image: every pixel anomaly-free.
    Good,
    /// A defective image's mask as decoded (any size; non-zero is defective).
    Mask(GrayImage),
    /// A defective image without a mask: left out of the pixel metrics.
    Unknown,
}

/// The pixel metrics of a method's maps of the test images.
pub(crate) struct PixelResults {
    /// At the images' own resolution, or why they are undefined (no defective pixel, no anomaly-free one).
    pub at_original: Result<PixelMetrics, String>,
    /// Pixel AUROC over the input crops against the masks brought into their geometry (`None` when undefined).
    pub crop_auroc: Option<f64>,
}

/// A method's anomaly maps of a dataset's test images, with what is needed to put them back onto the images.
pub(crate) struct TestMaps<'a> {
    pub test: &'a [&'a Sample],
    pub outputs: &'a [ImageOutput],
    /// Each test image's width and height as decoded.
    pub sizes: &'a [(u32, u32)],
    pub preprocess: &'a Preprocess,
    pub limits: ImageLimits,
}

impl TestMaps<'_> {
    /// Whether the method gave maps.
    pub fn any(&self) -> bool {
        self.outputs.iter().any(|o| o.map.is_some())
    }

    /// Test image `index`'s map at its original size (`None` without a map).
    fn original(&self, index: usize) -> Result<Option<Vec<f32>>> {
        let Some(map) = &self.outputs[index].map else { return Ok(None) };
        let map = self.preprocess.map_to_original(map, self.sizes[index]);
        Ok(Some(map.with_context(|| format!("{}: its anomaly map", self.test[index].path.display()))?))
    }

    /// What test image `index`'s pixels are compared with, at the image's size.
    fn truth(&self, index: usize) -> Result<Truth> {
        let sample = self.test[index];
        Ok(match (&sample.mask, sample.label) {
            (_, Label::Good) => Truth::Good,
            (Some(path), Label::Defective) => Truth::Mask(load_mask(path, &self.limits)?),
            (None, Label::Defective) => Truth::Unknown,
        })
    }

    /// Pixel AUROC, AUPRO (up to [`AUPRO_MAX_FPR`]) and the F1-optimal pixel threshold over every test
    /// pixel at the images' own resolution, and the pixel AUROC over the input crops: good images' pixels
    /// all negatives, defective images without a mask left out, each mask decoded once for both. The maps
    /// are put back onto their images one at a time, so that only 4 bytes a pixel are held (270 MB for
    /// MVTec AD's bottle, 83 images of 900 × 900). `None` without maps.
    pub fn pixel_metrics(&self) -> Result<Option<PixelResults>> {
        if !self.any() {
            return Ok(None);
        }
        let pixels: usize = self.sizes.iter().map(|&(w, h)| w as usize * h as usize).sum();
        let mut scores = PixelScores::with_capacity(pixels);
        let side = self.preprocess.crop as usize;
        let (mut crop_scores, mut crop_truth) = (Vec::new(), Vec::new());
        for index in 0..self.test.len() {
            let sample = self.test[index];
            let Some(crop_map) = &self.outputs[index].map else { continue };
            anyhow::ensure!(crop_map.len() == side * side, "an anomaly map of {} values is not {side}×{side}", crop_map.len());
            let (truth, truth_at_crop) = match self.truth(index)? {
                Truth::Good => (None, vec![false; side * side]),
                Truth::Mask(mask) => {
                    let at_crop =
                        self.preprocess.mask(&mask, &self.limits).map_err(|e| e.at(sample.mask.as_deref().unwrap_or(&sample.path)))?;
                    (Some(mask_at_size(&mask, self.sizes[index])), at_crop)
                }
                Truth::Unknown => continue,
            };
            crop_scores.extend(crop_map.iter().map(|&v| f64::from(v)));
            crop_truth.extend(truth_at_crop);
            let Some(map) = self.original(index)? else { continue };
            let (width, height) = self.sizes[index];
            let map = AnomalyMap { width: width as usize, height: height as usize, scores: &map };
            scores.add(map, truth.as_deref()).with_context(|| format!("{}: pixel metrics", sample.path.display()))?;
        }
        let at_original = match scores.metrics(AUPRO_MAX_FPR) {
            Ok(metrics) => Ok(metrics),
            Err(error @ (PixelMetricsError::NoDefects | PixelMetricsError::NoNegatives)) => Err(error.to_string()),
            Err(error) => return Err(error.into()),
        };
        Ok(Some(PixelResults { at_original, crop_auroc: anomaly_report::auroc(&crop_scores, &crop_truth).ok() }))
    }

    /// The top of the heat scale: the 99.9th percentile of every map value (over the input crops, which
    /// hold every value the maps at the original size take), so that a few extreme pixels do not wash out
    /// the rest. Never 0.
    pub fn heat_scale(&self) -> f32 {
        let mut values: Vec<f32> = self.outputs.iter().flat_map(|o| o.map.iter().flatten().copied()).collect();
        if values.is_empty() {
            return 1.0;
        }
        let at = ((values.len() - 1) as f64 * HEAT_PERCENTILE).round() as usize;
        let (_, top, _) = values.select_nth_unstable_by(at, f32::total_cmp);
        if *top > 0.0 { *top } else { f32::MIN_POSITIVE }
    }

    /// Test image `index` at its original size, its map over it in heat colours scaled to `scale`, its
    /// mask outlined ([`overlay`]).
    fn overlay(&self, index: usize, map: &[f32], scale: f32) -> Result<RgbImage> {
        let sample = self.test[index];
        let image = load_rgb8(&sample.path, &self.limits)?;
        anyhow::ensure!(
            image.dimensions() == self.sizes[index],
            "{}: the image changed while it was evaluated ({}×{}, was {}×{})",
            sample.path.display(),
            image.width(),
            image.height(),
            self.sizes[index].0,
            self.sizes[index].1
        );
        let mask = match self.truth(index)? {
            Truth::Mask(mask) => Some(mask_at_size(&mask, self.sizes[index])),
            Truth::Good | Truth::Unknown => None,
        };
        Ok(overlay(&image, map, mask.as_deref(), scale))
    }

    /// The test images heatmaps.png shows, by row: the [`HEATMAPS_PER_TYPE`] highest-scored good images
    /// (the likeliest false alarms), then the first of each defect type in test order.
    fn shown(&self) -> Vec<(String, Vec<usize>)> {
        let mut good: Vec<usize> = (0..self.test.len()).filter(|&i| self.test[i].label == Label::Good).collect();
        good.sort_by(|&a, &b| self.outputs[b].score.total_cmp(&self.outputs[a].score));
        good.truncate(HEATMAPS_PER_TYPE);
        let mut rows: Vec<(String, Vec<usize>)> = Vec::new();
        if !good.is_empty() {
            rows.push(("good (top scores)".into(), good));
        }
        for (index, sample) in self.test.iter().enumerate().filter(|(_, s)| s.label == Label::Defective) {
            match rows.iter_mut().find(|(name, _)| *name == sample.defect) {
                Some((_, members)) if members.len() < HEATMAPS_PER_TYPE => members.push(index),
                Some(_) => {}
                None => rows.push((sample.defect.clone(), vec![index])),
            }
        }
        rows
    }

    /// heatmaps.png: the shown test images ([`Self::shown`]), each its original image with its map over
    /// it in heat colours from 0 to `scale` and its mask outlined, captioned with its file name and score.
    /// Only these images' files are read again.
    pub fn heatmaps_png(&self, dataset: &str, scale: f32) -> Result<Vec<u8>> {
        let rows = self
            .shown()
            .into_iter()
            .map(|(name, members)| {
                let images = members
                    .par_iter()
                    .filter_map(|&index| self.original(index).transpose().map(|map| (index, map)))
                    .map(|(index, map)| {
                        let image = self.overlay(index, &map?, scale)?;
                        let file = self.test[index].path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                        Ok(GridImage { image, mask: None, caption: format!("{file} · {:.4}", self.outputs[index].score) })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok((name, images))
            })
            .collect::<Result<Vec<_>>>()?;
        let title =
            format!("{dataset}: anomaly maps, transparent at 0 to red at {scale:.4} (99.9th percentile of all maps); masks in magenta");
        Ok(anomaly_report::sample_grid_png_sized(&title, &rows, HEATMAP_THUMB)?)
    }

    /// Writes every test image's map at its original size as a float TIFF, in MVTec AD's evaluation layout
    /// `dir/<dataset>/test/<defect>/<name>.tiff`, and its overlay (as heatmaps.png draws it, at full
    /// size) beside it as `<name>.png`; each file written whole ([`anomaly_fs::write_atomic`]). Returns
    /// how many maps were written.
    pub fn save(&self, dir: &Path, dataset: &str, scale: f32) -> Result<usize> {
        (0..self.test.len())
            .into_par_iter()
            .map(|index| {
                let Some(map) = self.original(index)? else { return Ok(0) };
                let sample = self.test[index];
                let path = saved_map_path(dir, dataset, sample);
                let (width, height) = self.sizes[index];
                write_float_tiff(&path.with_extension("tiff"), width, height, &map)?;
                let overlay = self.overlay(index, &map, scale)?;
                write_png(&path.with_extension("png"), &overlay)?;
                Ok(1)
            })
            .sum()
    }
}

/// Where `--save-maps` puts a test image's map (without extension): `dir/<dataset>/test/`, then the
/// image's path below its dataset's `test` folder (`<defect>/<name>`, subfolders kept), as MVTec AD's
/// evaluation code looks for them.
fn saved_map_path(dir: &Path, dataset: &str, sample: &Sample) -> PathBuf {
    let parts: Vec<&std::ffi::OsStr> =
        sample.path.components().filter_map(|c| if let Component::Normal(part) = c { Some(part) } else { None }).collect();
    let below_test = parts.windows(2).rposition(|w| w[0] == "test" && w[1] == sample.defect.as_str()).map(|i| &parts[i + 1..]);
    let mut path = dir.join(dataset).join("test");
    match below_test {
        Some(relative) => relative.iter().for_each(|part| path.push(part)),
        None => {
            path.push(&sample.defect);
            path.push(sample.path.file_name().unwrap_or_default());
        }
    }
    path
}

/// The smallest rectangle (in the image's pixels) holding every pixel of `map` (row-major, `width` wide)
/// above `threshold`: where a method that localises says the defect is. `None` when no pixel is above.
pub fn bounding_box(map: &[f32], width: u32, threshold: f32) -> Option<BoundingBox> {
    let width = width.max(1) as usize;
    let (mut left, mut top, mut right, mut bottom) = (usize::MAX, usize::MAX, 0, 0);
    for (y, row) in map.chunks_exact(width).enumerate() {
        let (Some(first), Some(last)) = (row.iter().position(|&v| v > threshold), row.iter().rposition(|&v| v > threshold)) else {
            continue;
        };
        (left, right) = (left.min(first), right.max(last));
        (top, bottom) = (top.min(y), y);
    }
    (left != usize::MAX).then(|| BoundingBox {
        x: left as u32,
        y: top as u32,
        width: (right - left + 1) as u32,
        height: (bottom - top + 1) as u32,
    })
}

/// A rectangle of an image's pixels: its top-left corner and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BoundingBox {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// The top of the heat scale for one image's map (whose largest value is `map_max`) drawn alone, as
/// `predict --maps` and the service's overlay draw it: twice the model's pixel threshold, so that the
/// threshold shows half-way, or the map's own maximum for methods without one. Never 0.
pub fn single_map_scale(map_max: f32, pixel_threshold: Option<f32>) -> f32 {
    let scale = pixel_threshold.map_or(map_max, |t| 2.0 * t);
    if scale > 0.0 { scale } else { f32::MIN_POSITIVE }
}

/// Writes the image at `image_path` (read within `limits`) with `map` (at the image's size) over it in heat
/// colours from 0 to `scale`, as heatmaps.png and `eval --save-maps` draw them, as a PNG at `path`.
pub fn write_map_overlay(path: &Path, image_path: &Path, map: &[f32], scale: f32, limits: &ImageLimits) -> Result<()> {
    let image = load_rgb8(image_path, limits)?;
    anyhow::ensure!(
        image.width() as usize * image.height() as usize == map.len(),
        "{}: the image changed while it was scored ({}×{})",
        image_path.display(),
        image.width(),
        image.height()
    );
    write_png(path, &overlay(&image, map, None, scale))
}

/// Writes a single-channel float32 TIFF (what MVTec AD's evaluation code reads anomaly maps from).
pub fn write_float_tiff(path: &Path, width: u32, height: u32, values: &[f32]) -> Result<()> {
    anomaly_fs::write_atomic_with(path, |file| -> Result<()> {
        let mut writer = std::io::BufWriter::new(file);
        let mut encoder = tiff::encoder::TiffEncoder::new(&mut writer).with_context(|| format!("{}: writing", path.display()))?;
        encoder
            .write_image::<tiff::encoder::colortype::Gray32Float>(width, height, values)
            .with_context(|| format!("{}: writing a {width}×{height} float TIFF", path.display()))?;
        writer.flush().with_context(|| format!("{}: writing", path.display()))
    })
}

/// Writes an RGB image as PNG.
fn write_png(path: &Path, image: &RgbImage) -> Result<()> {
    let png = encode_png(image).with_context(|| format!("{}: encoding PNG", path.display()))?;
    Ok(anomaly_fs::write_atomic(path, &png)?)
}

/// `image` with `map` (at the image's size) over it in heat colours from 0 to `scale`, as
/// [`write_map_overlay`] draws it, encoded as PNG in memory (the service's `?overlay=png`).
pub fn map_overlay_png(image: &RgbImage, map: &[f32], scale: f32) -> Result<Vec<u8>> {
    anyhow::ensure!(
        image.width() as usize * image.height() as usize == map.len(),
        "the anomaly map has {} values for a {}×{} image",
        map.len(),
        image.width(),
        image.height()
    );
    Ok(encode_png(&overlay(image, map, None, scale))?)
}

fn encode_png(image: &RgbImage) -> image::ImageResult<Vec<u8>> {
    let mut png = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    Ok(png)
}

/// `image` with `map` (of its size) over it: a jet colour (blue → green → red as the value goes from 0
/// to `scale`) blended in with an opacity growing from nothing at 0 to [`HEAT_OPACITY`] at
/// `scale`, so that clear areas show the part as it is; the mask's outline, about one pixel in 256 of the
/// image's longer side thick, in [`OUTLINE`].
pub(crate) fn overlay(image: &RgbImage, map: &[f32], mask: Option<&[bool]>, scale: f32) -> RgbImage {
    let mut out = image.clone();
    for (pixel, &value) in out.pixels_mut().zip(map) {
        let v = (value / scale).clamp(0.0, 1.0);
        let alpha = HEAT_OPACITY * v;
        let heat = jet(v);
        for c in 0..3 {
            pixel[c] = (pixel[c] as f32 * (1.0 - alpha) + heat[c] * alpha).round() as u8;
        }
    }
    if let Some(mask) = mask {
        let (width, height) = (image.width() as usize, image.height() as usize);
        let thickness = width.max(height).div_ceil(256);
        for (pixel, edge) in out.pixels_mut().zip(outline(mask, width, height, thickness)) {
            if edge {
                pixel.0 = OUTLINE;
            }
        }
    }
    out
}

/// A jet-like colour at `v` in [0, 1] (blue, cyan, green, yellow, red at 0, ¼, ½, ¾, 1), channels in 0 … 255.
fn jet(v: f32) -> [f32; 3] {
    let red = (4.0 * v - 2.0).clamp(0.0, 1.0);
    let green = (4.0 * v).min(4.0 - 4.0 * v).clamp(0.0, 1.0);
    let blue = (2.0 - 4.0 * v).clamp(0.0, 1.0);
    [red * 255.0, green * 255.0, blue * 255.0]
}

/// The pixels of `mask` within `thickness` pixels (in x and y) of one outside it; the image's border does
/// not count as outside.
fn outline(mask: &[bool], width: usize, height: usize, thickness: usize) -> Vec<bool> {
    // Whether an outside pixel lies within `thickness` along each row, then along each column of that.
    let near = |line: &mut dyn Iterator<Item = bool>, len: usize| -> Vec<bool> {
        let mut counts = Vec::with_capacity(len + 1);
        counts.push(0u32);
        for outside in line {
            counts.push(counts[counts.len() - 1] + u32::from(outside));
        }
        (0..len).map(|i| counts[(i + thickness + 1).min(len)] > counts[i.saturating_sub(thickness)]).collect()
    };
    let mut across = vec![false; mask.len()];
    for (row, out) in mask.chunks_exact(width).zip(across.chunks_exact_mut(width)) {
        out.copy_from_slice(&near(&mut row.iter().map(|&m| !m), width));
    }
    let mut edges = vec![false; mask.len()];
    for x in 0..width {
        let column = near(&mut (0..height).map(|y| across[y * width + x]), height);
        for (y, near) in column.into_iter().enumerate() {
            edges[y * width + x] = near && mask[y * width + x];
        }
    }
    edges
}

#[cfg(test)]
mod tests {
    use anomaly_data::Split;

    use super::*;

    fn sample(path: PathBuf, defect: &str, mask: Option<PathBuf>) -> Sample {
        let label = if defect == "good" { Label::Good } else { Label::Defective };
        Sample { path, split: Split::Test, label, defect: defect.into(), mask }
    }

    fn output(score: f32, map: Vec<f32>) -> ImageOutput {
        ImageOutput { score, map: Some(map), ..ImageOutput::default() }
    }

    #[test]
    fn pixel_metrics_are_computed_at_the_original_size_with_masks_resized_to_it() {
        // 4 × 2 images resized to 4 × 2 and cropped 2 × 2 from x = 1: columns 0 and 3 are outside the crop
        // and score 0. The mask (8 × 4, resized nearest to 4 × 2) marks the right half, column 3 included.
        let dir = tempfile::tempdir().unwrap();
        let mask_path = dir.path().join("mask.png");
        GrayImage::from_fn(8, 4, |x, _| image::Luma([if x >= 4 { 255 } else { 0 }])).save(&mask_path).unwrap();
        let test = [
            sample(dir.path().join("test/good/0.png"), "good", None),
            sample(dir.path().join("test/cut/0.png"), "cut", Some(mask_path)),
            sample(dir.path().join("test/hole/0.png"), "hole", None),
        ];
        let refs: Vec<&Sample> = test.iter().collect();
        let outputs = [output(0.1, vec![0.05; 4]), output(0.9, vec![0.1, 0.9, 0.2, 0.8]), output(5.0, vec![5.0; 4])];
        let preprocess = Preprocess { resize: 2, crop: 2, mean: [0.0; 3], std: [1.0; 3] };
        let maps =
            TestMaps { test: &refs, outputs: &outputs, sizes: &[(4, 2); 3], preprocess: &preprocess, limits: ImageLimits::default() };
        let results = maps.pixel_metrics().unwrap().unwrap();
        let metrics = results.at_original.unwrap();
        // Defective pixels 0.9, 0.8, 0, 0 against 12 anomaly-free ones: 6 at 0, four at 0.05, 0.1 and 0.2
        // (the unmasked "hole" image is left out). (12 + 12 + 3 + 3) / 48; at the crop it would be 1.
        assert!((metrics.auroc - 0.625).abs() < 1e-12, "{metrics:?}");
        // F1 is best flagging 0.8 and above: 2·2 / (2·2 + 0 + 2).
        assert_eq!(metrics.f1_optimal.threshold, 0.8);
        assert!((metrics.f1_optimal.f1 - 2.0 / 3.0).abs() < 1e-12);
        assert!((0.0..=1.0).contains(&metrics.aupro));
        // Over the crops the defect's pixels score highest: the mask's right column against the rest.
        assert!((results.crop_auroc.unwrap() - 1.0).abs() < 1e-12, "{:?}", results.crop_auroc);
        // Without a defective image the metrics are undefined, which is said, not an error.
        let maps = TestMaps { test: &refs[..1], outputs: &outputs[..1], sizes: &[(4, 2)], ..maps };
        let undefined = maps.pixel_metrics().unwrap().unwrap();
        assert!(undefined.at_original.unwrap_err().contains("undefined"));
        assert_eq!(undefined.crop_auroc, None);
        let none = [ImageOutput::default()];
        assert!(TestMaps { outputs: &none, ..maps }.pixel_metrics().unwrap().is_none());
    }

    #[test]
    fn heatmaps_show_the_top_good_images_and_the_first_of_each_defect() {
        let test: Vec<Sample> = ["good", "good", "cut", "good", "cut", "cut", "cut", "good", "hole"]
            .iter()
            .enumerate()
            .map(|(i, d)| sample(PathBuf::from(format!("test/{d}/{i}.png")), d, None))
            .collect();
        let refs: Vec<&Sample> = test.iter().collect();
        let outputs: Vec<ImageOutput> = [0.1, 0.5, 1.0, 0.3, 1.0, 1.0, 1.0, 0.2, 1.0].iter().map(|&s| output(s, vec![0.0])).collect();
        let preprocess = Preprocess { resize: 1, crop: 1, mean: [0.0; 3], std: [1.0; 3] };
        let maps =
            TestMaps { test: &refs, outputs: &outputs, sizes: &[(1, 1); 9], preprocess: &preprocess, limits: ImageLimits::default() };
        let shown = maps.shown();
        assert_eq!(shown, [("good (top scores)".to_string(), vec![1, 3, 7]), ("cut".into(), vec![2, 4, 5]), ("hole".into(), vec![8])]);
    }

    #[test]
    fn maps_go_where_mvtecs_evaluation_looks_for_them() {
        let dir = Path::new("/maps");
        let nested = sample(PathBuf::from("/data/bottle/test/broken_large/sub/000.png"), "broken_large", None);
        assert_eq!(saved_map_path(dir, "bottle", &nested), Path::new("/maps/bottle/test/broken_large/sub/000.png"));
        assert_eq!(saved_map_path(dir, "bottle", &nested).with_extension("tiff"), Path::new("/maps/bottle/test/broken_large/sub/000.tiff"));
        let elsewhere = sample(PathBuf::from("../x/7.png"), "good", None);
        assert_eq!(saved_map_path(dir, "x", &elsewhere), Path::new("/maps/x/test/good/7.png"));
    }

    #[test]
    fn bounding_boxes_hold_the_pixels_above_the_threshold() {
        let mut map = vec![0.0f32; 5 * 4];
        assert_eq!(bounding_box(&map, 5, 0.5), None);
        map[5 + 3] = 0.9; // (3, 1)
        map[2 * 5 + 1] = 0.6; // (1, 2)
        map[3 * 5 + 4] = 0.5; // (4, 3): not above
        assert_eq!(bounding_box(&map, 5, 0.5), Some(BoundingBox { x: 1, y: 1, width: 3, height: 2 }));
        assert_eq!(bounding_box(&map, 5, 0.0), Some(BoundingBox { x: 1, y: 1, width: 4, height: 3 }));
    }

    #[test]
    fn float_tiffs_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b.tiff");
        let values: Vec<f32> = (0..15).map(|i| i as f32 * 0.37 - 1.5).collect();
        write_float_tiff(&path, 5, 3, &values).unwrap();
        let mut decoder = tiff::decoder::Decoder::new(std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(decoder.dimensions().unwrap(), (5, 3));
        assert_eq!(decoder.colortype().unwrap(), tiff::ColorType::Gray(32));
        match decoder.read_image().unwrap() {
            tiff::decoder::DecodingResult::F32(read) => assert_eq!(read, values),
            other => panic!("not float32: {:?}", std::mem::discriminant(&other)),
        }
    }

    #[test]
    fn overlays_fade_with_the_map_and_outline_masks() {
        let image = RgbImage::from_pixel(6, 4, image::Rgb([100, 100, 100]));
        let mut map = vec![0.0f32; 24];
        map[0] = 2.0; // at the top of the scale: 60 % red
        map[1] = 10.0; // beyond it: the same
        let mask: Vec<bool> = (0..24).map(|p| (2..5).contains(&(p % 6)) && (1..4).contains(&(p / 6))).collect();
        let out = overlay(&image, &map, Some(&mask), 2.0);
        assert_eq!(out.get_pixel(0, 0).0, [(100.0f32 * 0.4 + 255.0 * 0.6).round() as u8, 40, 40]);
        assert_eq!(out.get_pixel(1, 0), out.get_pixel(0, 0));
        assert_eq!(out.get_pixel(5, 0).0, [100, 100, 100], "0 leaves the image as it is");
        // The mask's pixels with an outside one among their 8 neighbours are outlined; the image's border
        // does not count as outside, so the middle of the mask's bottom row (3, 3) is not.
        let outlined: Vec<(u32, u32)> =
            (0..4).flat_map(|y| (0..6).map(move |x| (x, y))).filter(|&(x, y)| out.get_pixel(x, y).0 == OUTLINE).collect();
        assert_eq!(outlined, [(2, 1), (3, 1), (4, 1), (2, 2), (4, 2), (2, 3), (4, 3)]);
    }
}
