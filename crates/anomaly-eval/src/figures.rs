//! Pixel-level results of methods that localise: pixel AUROC from the masks, and the figure of inputs,
//! reconstructions and anomaly maps.

use std::collections::{BTreeMap, BTreeSet};

use anomaly_data::{ImageLimits, Preprocess, Sample};
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

    use anomaly_data::{Label, Split};

    use super::*;

    fn sample(defect: &str) -> Sample {
        let label = if defect == "good" { Label::Good } else { Label::Defective };
        Sample { path: PathBuf::from(format!("{defect}.png")), split: Split::Test, label, defect: defect.into(), mask: None }
    }

    #[test]
    fn two_images_of_each_type_are_shown() {
        let test = [sample("good"), sample("good"), sample("good"), sample("cut"), sample("hole"), sample("cut"), sample("cut")];
        let refs: Vec<&Sample> = test.iter().collect();
        assert_eq!(shown_images(&refs).into_iter().collect::<Vec<_>>(), [0, 1, 3, 4, 5]);
    }
}
