use std::path::{Path, PathBuf};

use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::resample::resize_crop_bilinear;
use crate::{DataError, ImageLimits, load_mask, load_rgb8};

/// How an image becomes a network input, following torchvision's `Resize(resize)`, `CenterCrop(crop)`,
/// `ToTensor()`, `Normalize(mean, std)` on PIL images, so that weights trained in PyTorch see the same pixels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Length of the shorter side after the antialiased bilinear resize.
    pub resize: u32,
    /// Side of the square center crop taken after resizing.
    pub crop: u32,
    /// Per-channel mean subtracted from pixels scaled to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation the centred pixels are divided by.
    pub std: [f32; 3],
}

/// One preprocessed image: normalised pixels in CHW order, `3 × crop × crop` values.
#[derive(Clone, Debug)]
pub struct PreprocessedImage {
    /// Normalised pixels, channel-major (CHW).
    pub pixels: Vec<f32>,
    /// Width and height of the original image, before resizing.
    pub original_size: (u32, u32),
}

impl Preprocess {
    /// The torchvision ImageNet recipe: resize 256, crop 224, ImageNet mean and std.
    pub fn imagenet() -> Self {
        Self { resize: 256, crop: 224, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] }
    }

    /// Checks that the settings can produce an image, before any file is read.
    pub fn validate(&self) -> Result<(), DataError> {
        if self.crop == 0 || self.resize < self.crop {
            return Err(DataError::InvalidPreprocess(format!(
                "crop ({}) must be at least 1 and no larger than resize ({})",
                self.crop, self.resize
            )));
        }
        if self.std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return Err(DataError::InvalidPreprocess(format!("std {:?} must be positive", self.std)));
        }
        Ok(())
    }

    /// Number of f32 values in one preprocessed image.
    pub fn values_per_image(&self) -> usize {
        3 * (self.crop as usize) * (self.crop as usize)
    }

    /// Decodes (within `limits`) and preprocesses one file.
    pub fn load(&self, path: &Path, limits: &ImageLimits) -> Result<PreprocessedImage, DataError> {
        let image = load_rgb8(path, limits)?;
        self.apply(&image, limits).map_err(|e| e.at(path))
    }

    /// Decodes (within `limits`) a ground-truth mask and brings it into the input's geometry ([`Self::mask`]).
    pub fn read_mask(&self, path: &Path, limits: &ImageLimits) -> Result<Vec<bool>, DataError> {
        self.mask(&load_mask(path, limits)?, limits).map_err(|e| e.at(path))
    }

    /// Preprocesses a decoded RGB image; an image so elongated that resizing it would cost more than
    /// `limits` allow is refused.
    pub fn apply(&self, image: &RgbImage, limits: &ImageLimits) -> Result<PreprocessedImage, DataError> {
        self.validate()?;
        let (width, height) = image.dimensions();
        let (new_width, new_height) = self.resized_size(width, height, limits)?;
        let crop = self.crop as usize;
        // torchvision rounds the crop offset with Python's round(), which rounds halves to even.
        let top = ((new_height - self.crop) as f64 / 2.0).round_ties_even() as usize;
        let left = ((new_width - self.crop) as f64 / 2.0).round_ties_even() as usize;
        // Only the kept square is computed; its pixels are those of the whole resized image.
        let resized = resize_crop_bilinear(image, (new_width as usize, new_height as usize), (left, top), crop);
        let row_stride = crop * 3;
        let mut pixels = vec![0.0f32; 3 * crop * crop];
        let (red, rest) = pixels.split_at_mut(crop * crop);
        let (green, blue) = rest.split_at_mut(crop * crop);
        let planes = [red, green, blue];
        for y in 0..crop {
            let row = &resized[y * row_stride..][..row_stride];
            for (x, rgb) in row.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    // The same f32 operations as ToTensor (x / 255) and Normalize ((x - mean) / std).
                    planes[c][y * crop + x] = (rgb[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
                }
            }
        }
        Ok(PreprocessedImage { pixels, original_size: (width, height) })
    }
}

impl Preprocess {
    /// A ground-truth mask in the geometry of the network input: resized with nearest-neighbour sampling
    /// (PIL's `NEAREST`, as torchvision resizes masks) and center-cropped like the image; `crop × crop`
    /// values, row-major, `true` where the part is defective.
    pub fn mask(&self, mask: &GrayImage, limits: &ImageLimits) -> Result<Vec<bool>, DataError> {
        self.validate()?;
        let (width, height) = mask.dimensions();
        let (new_width, new_height) = self.resized_size(width, height, limits)?;
        let top = ((new_height - self.crop) as f64 / 2.0).round_ties_even() as u32;
        let left = ((new_width - self.crop) as f64 / 2.0).round_ties_even() as u32;
        // PIL samples the source pixel under the centre of each target pixel.
        let source = |target: u32, from: u32, to: u32| (((target as f64 + 0.5) * from as f64 / to as f64) as u32).min(from - 1);
        let mut out = Vec::with_capacity((self.crop * self.crop) as usize);
        for y in top..top + self.crop {
            let sy = source(y, height, new_height);
            for x in left..left + self.crop {
                out.push(mask.get_pixel(source(x, width, new_width), sy)[0] > 0);
            }
        }
        Ok(out)
    }
}

impl Preprocess {
    /// A map over the network input (`crop × crop` values, row-major: an anomaly map) put back onto the
    /// original `width × height` image, undoing the resize and the centre crop, so that maps can be
    /// compared with masks and shown over images at their own resolution (as MVTec AD evaluates them).
    /// Each original pixel's centre is carried into the resized image (`(x + 0.5)·new/old − 0.5`); where
    /// it lands inside the crop the map is sampled bilinearly there (edges held), elsewhere the value is 0
    /// (the network never saw those pixels). Returns `width × height` values, row-major.
    pub fn map_to_original(&self, map: &[f32], (width, height): (u32, u32)) -> Result<Vec<f32>, DataError> {
        self.validate()?;
        let crop = self.crop as usize;
        if map.len() != crop * crop {
            return Err(DataError::InvalidPreprocess(format!("a map of {} values is not {crop}×{crop}", map.len())));
        }
        if width == 0 || height == 0 {
            return Ok(Vec::new());
        }
        // As `resized_size`, in u64 and without the limit: only the scale matters here, and the output is
        // the original's size, which was decoded within the limit.
        let (width64, height64, short) = (u64::from(width), u64::from(height), u64::from(self.resize));
        let (new_width, new_height) =
            if width64 <= height64 { (short, short * height64 / width64) } else { (short * width64 / height64, short) };
        let offset = |new: u64| ((new.saturating_sub(u64::from(self.crop))) as f64 / 2.0).round_ties_even();
        let columns = uncrop_axis(width as usize, new_width as f64, offset(new_width), crop);
        let rows = uncrop_axis(height as usize, new_height as f64, offset(new_height), crop);
        let mut out = vec![0.0f32; width as usize * height as usize];
        for (out_row, row) in out.chunks_exact_mut(width as usize).zip(&rows) {
            let Some((y0, y1, wy)) = *row else { continue };
            let (top, bottom) = (&map[y0 * crop..][..crop], &map[y1 * crop..][..crop]);
            for (value, column) in out_row.iter_mut().zip(&columns) {
                if let Some((x0, x1, wx)) = *column {
                    let upper = top[x0] + (top[x1] - top[x0]) * wx;
                    let lower = bottom[x0] + (bottom[x1] - bottom[x0]) * wx;
                    *value = upper + (lower - upper) * wy;
                }
            }
        }
        Ok(out)
    }
}

/// Per original pixel along one axis: `None` outside the crop, else the two crop cells it lies between and
/// the weight of the second, for an image of `original` pixels resized to `new` and cropped to `crop` from `offset`.
fn uncrop_axis(original: usize, new: f64, offset: f64, crop: usize) -> Vec<Option<(usize, usize, f32)>> {
    let scale = new / original as f64;
    (0..original)
        .map(|x| {
            let at = (x as f64 + 0.5) * scale - 0.5 - offset;
            // The crop's pixels cover [-0.5, crop - 0.5) in these coordinates (their centres at 0 … crop - 1).
            if !(-0.5..crop as f64 - 0.5).contains(&at) {
                return None;
            }
            let at = at.clamp(0.0, (crop - 1) as f64);
            let first = (at.floor() as usize).min(crop - 1);
            Some((first, (first + 1).min(crop - 1), (at - first as f64) as f32))
        })
        .collect()
}

/// A ground-truth mask at `size` (an image's width and height): as it is when it has that size, else
/// resized with nearest-neighbour sampling (PIL's `NEAREST`, as [`Preprocess::mask`] resizes masks);
/// `true` where the part is defective, row-major.
pub fn mask_at_size(mask: &GrayImage, (width, height): (u32, u32)) -> Vec<bool> {
    let (from_width, from_height) = mask.dimensions();
    if from_width == 0 || from_height == 0 {
        return vec![false; width as usize * height as usize];
    }
    let source = |target: u32, from: u32, to: u32| (((target as f64 + 0.5) * from as f64 / to as f64) as u32).min(from - 1);
    let mut out = Vec::with_capacity(width as usize * height as usize);
    for y in 0..height {
        let sy = source(y, from_height, height);
        out.extend((0..width).map(|x| mask.get_pixel(source(x, from_width, width), sy)[0] > 0));
    }
    out
}

impl Preprocess {
    /// The size torchvision's `Resize(int)` gives: the shorter side becomes `resize`, the longer one keeps
    /// the aspect ratio, truncated. An image so elongated that the resized one would hold more pixels than
    /// `limits` allow (or than 16 crops, whichever is more) is refused: its resize alone would exhaust
    /// memory (a 60000000×1 PNG of 58 KB asked for 59 GB).
    fn resized_size(&self, width: u32, height: u32, limits: &ImageLimits) -> Result<(u32, u32), DataError> {
        let (width64, height64, short) = (u64::from(width), u64::from(height), u64::from(self.resize));
        let (new_width, new_height) =
            if width64 <= height64 { (short, short * height64 / width64.max(1)) } else { (short * width64 / height64.max(1), short) };
        let most = limits.max_pixels().max(16 * u64::from(self.crop) * u64::from(self.crop));
        match (u32::try_from(new_width), u32::try_from(new_height)) {
            (Ok(w), Ok(h)) if new_width.saturating_mul(new_height) <= most => Ok((w, h)),
            _ => Err(DataError::Elongated { path: PathBuf::new(), width, height, resized: (new_width, new_height), max_pixels: most }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resized_size_keeps_aspect_like_torchvision() {
        let imagenet = Preprocess::imagenet();
        let limits = ImageLimits::default();
        assert_eq!(imagenet.resized_size(900, 900, &limits).unwrap(), (256, 256));
        assert_eq!(imagenet.resized_size(1024, 700, &limits).unwrap(), (374, 256));
        assert_eq!(imagenet.resized_size(300, 401, &limits).unwrap(), (256, 342));
        // 256 × 15 360 000 000 pixels: refused before any resize is attempted.
        let error = imagenet.resized_size(60_000_000, 1, &limits).unwrap_err();
        assert!(matches!(error, DataError::Elongated { resized: (15_360_000_000, 256), .. }), "{error}");
    }

    #[test]
    fn constant_image_normalises_to_known_value() {
        let image = RgbImage::from_pixel(40, 30, image::Rgb([255, 0, 128]));
        let p = Preprocess { resize: 20, crop: 16, mean: [0.5; 3], std: [0.5; 3] };
        let out = p.apply(&image, &ImageLimits::default()).unwrap();
        assert_eq!(out.pixels.len(), 3 * 16 * 16);
        assert!((out.pixels[0] - 1.0).abs() < 1e-6);
        assert!((out.pixels[256] + 1.0).abs() < 1e-6);
        assert!((out.pixels[512] - (128.0 / 255.0 - 0.5) / 0.5).abs() < 1e-6);
    }

    #[test]
    fn masks_are_resized_nearest_and_cropped_like_images() {
        // A 100 × 50 mask, defective in its right half; resize 20 → 40 × 20, crop 20 from x = 10.
        let mask = GrayImage::from_fn(100, 50, |x, _| image::Luma([if x >= 50 { 255 } else { 0 }]));
        let p = Preprocess { resize: 20, crop: 20, ..Preprocess::imagenet() };
        let out = p.mask(&mask, &ImageLimits::default()).unwrap();
        assert_eq!(out.len(), 400);
        let row: Vec<bool> = out[..20].to_vec();
        assert_eq!(row, (10..30).map(|x| x >= 20).collect::<Vec<_>>());
        assert!(out.chunks(20).all(|r| r == row.as_slice()));
    }

    #[test]
    fn a_constant_map_is_the_constant_inside_the_crop_window_and_zero_outside() {
        // 32 × 16 resized to 16 × 8 (half scale), cropped 4 × 4 from (6, 2): original columns 12..20, rows 4..12.
        let p = Preprocess { resize: 8, crop: 4, ..Preprocess::imagenet() };
        let out = p.map_to_original(&[2.5; 16], (32, 16)).unwrap();
        assert_eq!(out.len(), 32 * 16);
        for y in 0..16 {
            for x in 0..32 {
                let inside = (12..20).contains(&x) && (4..12).contains(&y);
                assert_eq!(out[y * 32 + x], if inside { 2.5 } else { 0.0 }, "({x}, {y})");
            }
        }
        // Portrait, with the crop's offset rounded half to even as torchvision does: 10 × 21 resized to
        // 4 × 8 (8.4 truncated), cropped 4 × 4 from (0, 2); rows whose centres land in resized [1.5, 5.5).
        let p = Preprocess { resize: 4, crop: 4, ..Preprocess::imagenet() };
        let out = p.map_to_original(&[1.0; 16], (10, 21)).unwrap();
        let rows: Vec<usize> = (0..21).filter(|&y| out[y * 10] == 1.0).collect();
        let expected: Vec<usize> = (0..21).filter(|&y| (1.5..5.5).contains(&((y as f64 + 0.5) * 8.0 / 21.0 - 0.5))).collect();
        assert_eq!(rows, expected);
        assert!(out.chunks(10).all(|row| row.iter().all(|&v| v == row[0])));
        assert!(matches!(p.map_to_original(&[1.0; 15], (10, 21)), Err(DataError::InvalidPreprocess(_))));
    }

    #[test]
    fn a_smooth_map_comes_back_where_the_crop_took_it() {
        // A map linear in the resized image's coordinates: bilinear sampling gives it back exactly at every
        // original pixel that lands between crop pixel centres, and cropping the result again (each crop
        // pixel's nearest original pixel) gives the map back.
        let p = Preprocess { resize: 20, crop: 16, ..Preprocess::imagenet() };
        let (width, height) = (75u32, 50u32); // resized 30 × 20, crop from (7, 2)
        let (left, top) = (7.0, 2.0);
        let field = |rx: f64, ry: f64| (0.25 * rx + 0.5 * ry + 1.0) as f32;
        let map: Vec<f32> = (0..16 * 16).map(|i| field(left + (i % 16) as f64, top + (i / 16) as f64)).collect();
        let out = p.map_to_original(&map, (width, height)).unwrap();
        let scale = 30.0 / 75.0;
        for y in 0..height as usize {
            for x in 0..width as usize {
                let (rx, ry) = ((x as f64 + 0.5) * scale - 0.5, (y as f64 + 0.5) * scale - 0.5);
                if (left..=left + 15.0).contains(&rx) && (top..=top + 15.0).contains(&ry) {
                    assert!((out[y * 75 + x] - field(rx, ry)).abs() < 1e-4, "({x}, {y})");
                }
            }
        }
        for (i, &value) in map.iter().enumerate() {
            let (cx, cy) = ((i % 16) as f64 + left, (i / 16) as f64 + top);
            let (x, y) = (((cx + 0.5) / scale) as usize, ((cy + 0.5) / scale) as usize);
            let (rx, ry) = ((x as f64 + 0.5) * scale - 0.5, (y as f64 + 0.5) * scale - 0.5);
            assert!((out[y * 75 + x] - value).abs() <= 0.75 * ((rx - cx).abs() + (ry - cy).abs()) as f32 + 1e-5, "{i}");
        }
    }

    #[test]
    fn masks_of_another_size_are_resized_nearest_to_the_image() {
        let mask = GrayImage::from_fn(4, 2, |x, _| image::Luma([if x >= 2 { 255 } else { 0 }]));
        assert_eq!(mask_at_size(&mask, (4, 2)), [false, false, true, true, false, false, true, true]);
        assert_eq!(mask_at_size(&mask, (8, 1)), [false, false, false, false, true, true, true, true]);
    }

    #[test]
    fn crop_larger_than_resize_is_rejected() {
        let p = Preprocess { resize: 10, crop: 16, ..Preprocess::imagenet() };
        assert!(matches!(p.validate(), Err(DataError::InvalidPreprocess(_))));
    }
}
