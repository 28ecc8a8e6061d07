use std::path::Path;

use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::resample::resize_crop_bilinear;
use crate::{DataError, ImageLimits, load_rgb8};

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
        self.apply(&image).map_err(|e| match e {
            DataError::Decode { reason, .. } => DataError::Decode { path: path.into(), reason },
            other => other,
        })
    }

    /// Preprocesses a decoded RGB image.
    pub fn apply(&self, image: &RgbImage) -> Result<PreprocessedImage, DataError> {
        self.validate()?;
        let (width, height) = image.dimensions();
        let (new_width, new_height) = resized_size(width, height, self.resize);
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
    pub fn mask(&self, mask: &GrayImage) -> Result<Vec<bool>, DataError> {
        self.validate()?;
        let (width, height) = mask.dimensions();
        let (new_width, new_height) = resized_size(width, height, self.resize);
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

/// The size torchvision's `Resize(int)` gives: the shorter side becomes `short`, the longer one keeps the
/// aspect ratio, truncated.
fn resized_size(width: u32, height: u32, short: u32) -> (u32, u32) {
    if width <= height {
        (short, (short as u64 * height as u64 / width as u64) as u32)
    } else {
        ((short as u64 * width as u64 / height as u64) as u32, short)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resized_size_keeps_aspect_like_torchvision() {
        assert_eq!(resized_size(900, 900, 256), (256, 256));
        assert_eq!(resized_size(1024, 700, 256), (374, 256));
        assert_eq!(resized_size(300, 401, 256), (256, 342));
    }

    #[test]
    fn constant_image_normalises_to_known_value() {
        let image = RgbImage::from_pixel(40, 30, image::Rgb([255, 0, 128]));
        let p = Preprocess { resize: 20, crop: 16, mean: [0.5; 3], std: [0.5; 3] };
        let out = p.apply(&image).unwrap();
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
        let out = p.mask(&mask).unwrap();
        assert_eq!(out.len(), 400);
        let row: Vec<bool> = out[..20].to_vec();
        assert_eq!(row, (10..30).map(|x| x >= 20).collect::<Vec<_>>());
        assert!(out.chunks(20).all(|r| r == row.as_slice()));
    }

    #[test]
    fn crop_larger_than_resize_is_rejected() {
        let p = Preprocess { resize: 10, crop: 16, ..Preprocess::imagenet() };
        assert!(matches!(p.validate(), Err(DataError::InvalidPreprocess(_))));
    }
}
