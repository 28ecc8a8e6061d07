//! A synthetic woven-fabric dataset in the MVTec AD layout, with pixel masks: something to run the whole
//! pipeline on in a minute on a fresh machine, where no real dataset may be at hand. A seed gives the same
//! images byte for byte.

use std::f64::consts::PI;
use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, Rgb, RgbImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::DataError;

/// The defect types drawn into the test images.
pub const SYNTHETIC_DEFECTS: [&str; 4] = ["cut", "hole", "missing_thread", "stain"];

/// The marker file that identifies a folder as a synthetic dataset (and records how it was made).
const MARKER: &str = "synthetic.json";

/// How many images, of what size, from which seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyntheticConfig {
    pub seed: u64,
    /// Side of the square images, in pixels.
    pub size: u32,
    /// Good images in `train/good`.
    pub train: usize,
    /// Good images in `test/good`.
    pub test_good: usize,
    /// Images per defect type in `test/<defect>`.
    pub per_defect: usize,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self { seed: 7, size: 256, train: 60, test_good: 16, per_defect: 8 }
    }
}

/// Writes the dataset to `root` whole or not at all: built in a temporary folder beside it, flushed to disk,
/// then renamed. An existing `root` is replaced only if it is an earlier synthetic dataset, and is removed
/// only once the new one is in place.
pub fn write_synthetic_dataset(root: &Path, config: &SyntheticConfig) -> Result<(), DataError> {
    if config.size < 32 {
        return Err(DataError::InvalidSynthetic(format!("images need a size of at least 32, got {}", config.size)));
    }
    if config.train == 0 {
        return Err(DataError::InvalidSynthetic("at least one training image is needed".into()));
    }
    if root.exists() && !root.join(MARKER).is_file() {
        return Err(DataError::io(
            root,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a synthetic dataset; choose another folder or remove it",
            ),
        ));
    }
    let staging = anomaly_fs::staging_dir(root)?;
    let fabric = Fabric::new(config.seed, config.size);

    let mut jobs: Vec<Job> = Vec::new();
    let mut add = |folder: &str, count: usize, defect: Option<&'static str>| {
        for i in 0..count {
            let name = format!("{i:03}.png");
            let path = staging.path().join(folder).join(&name);
            let mask = defect.map(|d| (d, staging.path().join("ground_truth").join(d).join(format!("{i:03}_mask.png"))));
            jobs.push((path, mask, jobs.len() as u64));
        }
    };
    add("train/good", config.train, None);
    add("test/good", config.test_good, None);
    for defect in SYNTHETIC_DEFECTS {
        add(&format!("test/{defect}"), config.per_defect, Some(defect));
    }
    jobs.par_iter().try_for_each(|(path, mask, index)| {
        let mut rng = SplitMix(config.seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
        let (image, defect_mask) = fabric.draw(&mut rng, mask.as_ref().map(|(d, _)| *d));
        save(&image, path)?;
        if let (Some((_, mask_path)), Some(defect_mask)) = (mask, defect_mask) {
            save(&defect_mask, mask_path)?;
        }
        Ok::<(), DataError>(())
    })?;
    let marker = serde_json::to_string_pretty(config).expect("config serialises");
    let marker_path = staging.path().join(MARKER);
    std::fs::write(&marker_path, marker).map_err(|e| DataError::io(marker_path, e))?;
    anomaly_fs::replace_dir(staging, root)?;
    Ok(())
}

/// One image to draw: where it goes, its defect and mask file if it has one, and its index (which seeds it).
type Job = (PathBuf, Option<(&'static str, PathBuf)>, u64);

fn save<P: image::PixelWithColorType>(image: &image::ImageBuffer<P, Vec<P::Subpixel>>, path: &Path) -> Result<(), DataError>
where
    [P::Subpixel]: image::EncodableLayout,
{
    std::fs::create_dir_all(path.parent().expect("dataset files sit in folders")).map_err(|e| DataError::io(path, e))?;
    image.save(path).map_err(|e| DataError::io(path, std::io::Error::other(e)))
}

/// The fabric shared by all images of a dataset: thread pitch and colours.
struct Fabric {
    size: u32,
    /// Thread pitch in pixels.
    pitch: f64,
    /// Fraction of the pitch a thread covers.
    width: f64,
    warp: [f64; 3],
    weft: [f64; 3],
    gap: [f64; 3],
}

/// A stretch of one thread that is missing.
struct MissingThread {
    vertical: bool,
    index: i64,
    from: f64,
    to: f64,
}

impl Fabric {
    fn new(seed: u64, size: u32) -> Self {
        let mut rng = SplitMix(seed);
        let pitch = size as f64 / (14.0 + 4.0 * rng.uniform());
        let tint = 0.9 + 0.2 * rng.uniform();
        Self {
            size,
            pitch,
            width: 0.8,
            warp: [205.0 * tint, 178.0, 132.0 / tint],
            weft: [188.0, 166.0 * tint, 126.0],
            gap: [52.0, 40.0, 32.0],
        }
    }

    /// One image, and its mask when a defect is drawn.
    fn draw(&self, rng: &mut SplitMix, defect: Option<&str>) -> (RgbImage, Option<GrayImage>) {
        let size = self.size as f64;
        let (ox, oy) = (rng.uniform() * self.pitch, rng.uniform() * self.pitch);
        let jitter: Vec<f64> = (0..64).map(|_| 1.0 + 0.07 * (rng.uniform() - 0.5)).collect();
        let light = (0.92 + 0.12 * rng.uniform(), (rng.uniform() - 0.5) * 0.1, (rng.uniform() - 0.5) * 0.1);
        let centre = (size * (0.25 + 0.5 * rng.uniform()), size * (0.25 + 0.5 * rng.uniform()));
        let angle = rng.uniform() * PI;
        let scale = 0.8 + 0.4 * rng.uniform();
        let wobble = rng.uniform() * 2.0 * PI;
        let missing = (defect == Some("missing_thread")).then(|| {
            let vertical = rng.uniform() < 0.5;
            let across = if vertical { centre.0 + ox } else { centre.1 + oy };
            let along = if vertical { centre.1 } else { centre.0 };
            let half = size * (0.2 + 0.12 * rng.uniform());
            MissingThread { vertical, index: (across / self.pitch).floor() as i64, from: along - half, to: along + half }
        });
        let mut image = RgbImage::new(self.size, self.size);
        let mut mask = defect.map(|_| GrayImage::new(self.size, self.size));
        for y in 0..self.size {
            for x in 0..self.size {
                let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
                let (mut colour, in_missing) = self.weave(px + ox, py + oy, px, py, &jitter, missing.as_ref());
                let shade = light.0 + light.1 * (px / size - 0.5) + light.2 * (py / size - 0.5);
                colour = colour.map(|c| c * shade);
                let mut defective = in_missing;
                let (dx, dy) = (px - centre.0, py - centre.1);
                match defect {
                    Some("hole") => {
                        let r = size * 0.075 * scale * (1.0 + 0.18 * (3.0 * dy.atan2(dx) + wobble).sin());
                        if dx.hypot(dy) < r {
                            colour = self.gap.map(|c| c * 0.45);
                            defective = true;
                        }
                    }
                    Some("cut") => {
                        let (along, across) = (dx * angle.cos() + dy * angle.sin(), -dx * angle.sin() + dy * angle.cos());
                        if along.abs() < size * 0.16 * scale && across.abs() < 1.8 + 0.6 * (along * 0.3 + wobble).sin() {
                            colour = self.gap.map(|c| c * 0.5);
                            defective = true;
                        }
                    }
                    Some("stain") => {
                        let r = size * 0.11 * scale * (1.0 + 0.15 * (2.0 * dy.atan2(dx) + wobble).sin());
                        let alpha = 0.8 * (-(dx.hypot(dy) / r).powi(4)).exp();
                        let stain = [112.0, 70.0, 34.0];
                        colour = [0, 1, 2].map(|c| colour[c] * (1.0 - alpha) + stain[c] * alpha);
                        defective = alpha > 0.2;
                    }
                    _ => {}
                }
                let noise = 4.0 * (rng.uniform() - 0.5);
                image.put_pixel(x, y, Rgb(colour.map(|c| (c + noise).round().clamp(0.0, 255.0) as u8)));
                if let (Some(mask), true) = (mask.as_mut(), defective) {
                    mask.put_pixel(x, y, Luma([255]));
                }
            }
        }
        (image, mask)
    }

    /// The plain-weave colour at fabric coordinates (u, v) (image coordinates x, y), and whether the point
    /// lies where a missing thread should be.
    fn weave(&self, u: f64, v: f64, x: f64, y: f64, jitter: &[f64], missing: Option<&MissingThread>) -> ([f64; 3], bool) {
        let (i, j) = ((u / self.pitch).floor() as i64, (v / self.pitch).floor() as i64);
        let (fu, fv) = (u / self.pitch - i as f64, v / self.pitch - j as f64);
        let gone = |vertical: bool, index: i64, along: f64| {
            missing.is_some_and(|m| m.vertical == vertical && m.index == index && (m.from..m.to).contains(&along))
        };
        let warp_band = fu < self.width;
        let weft_band = fv < self.width;
        let warp_gone = warp_band && gone(true, i, y);
        let weft_gone = weft_band && gone(false, j, x);
        let in_warp = warp_band && !warp_gone;
        let in_weft = weft_band && !weft_gone;
        let warp_on_top = (i + j).rem_euclid(2) == 0;
        // A thread is brightest along its middle and darkens where it dives under a crossing thread.
        let profile = |t: f64| 0.55 + 0.45 * (PI * t / self.width).sin();
        let dive = |t: f64| 0.82 + 0.18 * (PI * t).sin();
        let fibre = |a: f64, index: i64| 1.0 + 0.035 * (a * 1.3 + index as f64 * 2.1).sin();
        let colour = if in_warp && (warp_on_top || !in_weft) {
            let k = jitter[i.rem_euclid(jitter.len() as i64) as usize] * profile(fu) * dive(fv) * fibre(v, i);
            self.warp.map(|c| c * k)
        } else if in_weft {
            let k = jitter[(j + 32).rem_euclid(jitter.len() as i64) as usize] * profile(fv) * dive(fu) * fibre(u, j);
            self.weft.map(|c| c * k)
        } else {
            self.gap
        };
        (colour, warp_gone || weft_gone)
    }
}

/// A small seeded generator (SplitMix64): the same numbers from a seed whatever crate versions are in use,
/// for the synthetic images and anything else that must be reproducible from a seed.
pub struct SplitMix(pub u64);

impl SplitMix {
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}
