//! Pixel-level results of methods that localise: pixel AUROC from the masks, and the figure of inputs,
//! reconstructions and anomaly maps.

use std::collections::{BTreeMap, BTreeSet};

use anomaly_data::{ImageLimits, Label, Preprocess, Sample};
use anomaly_method::ImageOutput;
use anomaly_report::GridImage;
use anyhow::Result;
use image::{GrayImage, RgbImage};

/// Images shown per test type in the figures.
const SHOWN_PER_TYPE: usize = 2;

/// Indices of the test images the figures show: the first two of each type, in test order.
pub(crate) fn shown_images(test: &[&Sample]) -> BTreeSet<usize> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut shown = BTreeSet::new();
    for (index, sample) in test.iter().enumerate() {
        let count = counts.entry(sample.defect.as_str()).or_default();
        if *count < SHOWN_PER_TYPE {
            *count += 1;
            shown.insert(index);
        }
    }
    shown
}

/// Pixel AUROC of the anomaly maps over the input crop against the masks brought into its geometry
/// (`pixel_auroc_crop`, beside the metrics at the images' own resolution): good images' pixels are all
/// negatives, defective images without a mask are left out. `None` when the method gives no maps; the
/// value is `None` when it is undefined (the metrics at the images' resolution say why).
pub(crate) fn pixel_auroc_crop(
    test: &[&Sample],
    outputs: &[ImageOutput],
    preprocess: &Preprocess,
    limits: ImageLimits,
) -> Result<Option<Option<f64>>> {
    if outputs.iter().all(|o| o.map.is_none()) {
        return Ok(None);
    }
    let side = preprocess.crop as usize;
    let (mut scores, mut labels) = (Vec::new(), Vec::new());
    for (sample, output) in test.iter().zip(outputs) {
        let Some(map) = &output.map else { continue };
        anyhow::ensure!(map.len() == side * side, "an anomaly map of {} values is not {side}×{side}", map.len());
        let truth = match (&sample.mask, sample.label) {
            (_, Label::Good) => vec![false; side * side],
            (Some(mask), Label::Defective) => preprocess.read_mask(mask, &limits)?,
            (None, Label::Defective) => continue,
        };
        scores.extend(map.iter().map(|&e| e as f64));
        labels.extend(truth);
    }
    Ok(Some(anomaly_report::auroc(&scores, &labels).ok()))
}

/// Input (mask outlined), reconstruction and anomaly map of the shown test images; `inputs` holds the
/// shown images' inputs (`3 × side × side`, values in [0, 1]) by test index, made with `preprocess`,
/// whose geometry the masks follow too.
pub(crate) fn reconstructions_png(
    dataset: &str,
    test: &[&Sample],
    inputs: &BTreeMap<usize, Vec<f32>>,
    outputs: &[ImageOutput],
    preprocess: &Preprocess,
    limits: ImageLimits,
) -> Result<Vec<u8>> {
    let side = preprocess.crop as usize;
    let peak = outputs.iter().flat_map(|o| o.map.iter().flatten().copied()).fold(1e-12f32, f32::max);
    let mut rows = Vec::new();
    for (&index, input) in inputs {
        let (sample, output) = (test[index], &outputs[index]);
        let (Some(reconstruction), Some(map)) = (&output.reconstruction, &output.map) else { continue };
        let mask = match &sample.mask {
            Some(path) => {
                let truth = preprocess.read_mask(path, &limits)?;
                Some(GrayImage::from_fn(side as u32, side as u32, |x, y| {
                    image::Luma([if truth[y as usize * side + x as usize] { 255 } else { 0 }])
                }))
            }
            None => None,
        };
        let name = format!("{} {}", sample.defect, sample.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
        rows.push((
            name,
            vec![
                GridImage { image: to_rgb(input, side), mask, caption: String::new() },
                GridImage { image: to_rgb(reconstruction, side), mask: None, caption: String::new() },
                GridImage { image: heat(map, side, peak), mask: None, caption: String::new() },
            ],
        ));
    }
    Ok(anomaly_report::sample_grid_png(&format!("{dataset}: input (mask in red) · reconstruction · error"), &rows)?)
}

/// A CHW image in [0, 1] as 8-bit RGB.
fn to_rgb(chw: &[f32], side: usize) -> RgbImage {
    let plane = side * side;
    RgbImage::from_fn(side as u32, side as u32, |x, y| {
        let p = y as usize * side + x as usize;
        image::Rgb([0, 1, 2].map(|c| (chw[c * plane + p] * 255.0).round().clamp(0.0, 255.0) as u8))
    })
}

/// A map in a black → red → yellow → white ramp, scaled to `peak`.
fn heat(map: &[f32], side: usize, peak: f32) -> RgbImage {
    RgbImage::from_fn(side as u32, side as u32, |x, y| {
        let v = (map[y as usize * side + x as usize] / peak).sqrt().clamp(0.0, 1.0) * 3.0;
        let channel = |offset: f32| ((v - offset).clamp(0.0, 1.0) * 255.0) as u8;
        image::Rgb([channel(0.0), channel(1.0), channel(2.0)])
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use anomaly_data::Split;

    use super::*;

    fn sample(defect: &str) -> Sample {
        let label = if defect == "good" { Label::Good } else { Label::Defective };
        Sample { path: PathBuf::from(format!("{defect}.png")), split: Split::Test, label, defect: defect.into(), mask: None }
    }

    fn output(map: Vec<f32>) -> ImageOutput {
        ImageOutput { map: Some(map), ..ImageOutput::default() }
    }

    #[test]
    fn two_images_of_each_type_are_shown() {
        let test = [sample("good"), sample("good"), sample("good"), sample("cut"), sample("hole"), sample("cut"), sample("cut")];
        let refs: Vec<&Sample> = test.iter().collect();
        assert_eq!(shown_images(&refs).into_iter().collect::<Vec<_>>(), [0, 1, 3, 4, 5]);
    }

    #[test]
    fn pixel_auroc_uses_masks_and_leaves_out_defects_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let mask_path = dir.path().join("m.png");
        // A 2×2 mask whose right column is defective.
        GrayImage::from_raw(2, 2, vec![0, 255, 0, 255]).unwrap().save(&mask_path).unwrap();
        let preprocess = Preprocess { resize: 2, crop: 2, mean: [0.0; 3], std: [1.0; 3] };
        let mut masked = sample("cut");
        masked.mask = Some(mask_path);
        let test = [sample("good"), masked, sample("hole")];
        let refs: Vec<&Sample> = test.iter().collect();
        // The defect's pixels score highest, the unmasked "hole" image would spoil it but is left out.
        let outputs = [output(vec![0.1, 0.2, 0.1, 0.2]), output(vec![0.0, 0.9, 0.1, 0.8]), output(vec![5.0; 4])];
        let value = pixel_auroc_crop(&refs, &outputs, &preprocess, ImageLimits::default()).unwrap().unwrap();
        assert!((value.unwrap() - 1.0).abs() < 1e-12, "{value:?}");
        // Methods without maps have no pixel AUROC at all; a set without defective pixels has an undefined one.
        assert!(
            pixel_auroc_crop(
                &refs,
                &[ImageOutput::default(), ImageOutput::default(), ImageOutput::default()],
                &preprocess,
                ImageLimits::default()
            )
            .unwrap()
            .is_none()
        );
        let value = pixel_auroc_crop(&refs[..1], &outputs[..1], &preprocess, ImageLimits::default()).unwrap().unwrap();
        assert!(value.is_none());
    }
}
