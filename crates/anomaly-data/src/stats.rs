//! What a dataset holds, for exploratory analysis before any model: per image its size, colour mode,
//! channel sums and luminance histogram, and the defect's area and number of regions from its mask.

use image::GrayImage;

use crate::{DataError, ImageLimits, Sample, load_mask, load_rgb8_and_color};

/// Bins of the luminance histograms.
pub const HISTOGRAM_BINS: usize = 64;

/// One image's contribution to its dataset's statistics.
#[derive(Clone, Debug)]
pub struct ImageStats {
    pub width: u32,
    pub height: u32,
    /// The colour mode stored in the file (e.g. `Rgb8`, `L8`, `L16`, `Rgba8`), before conversion to RGB.
    pub color: String,
    /// Per-channel sums of the RGB values scaled to [0, 1], and of their squares.
    pub channel_sum: [f64; 3],
    pub channel_sum_sq: [f64; 3],
    pub pixels: u64,
    /// Counts of luminance (PIL's `convert("L")`: 0.299 R + 0.587 G + 0.114 B) in equal bins over 0–255.
    pub histogram: [u64; HISTOGRAM_BINS],
    /// The defect as its mask shows it, where the image has one.
    pub defect: Option<DefectArea>,
}

/// The extent of a defect in its ground-truth mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DefectArea {
    /// Share of the image's pixels the mask marks.
    pub fraction: f64,
    /// Separate marked regions (8-connected).
    pub regions: usize,
}

/// Reads one sample (and its mask) within `limits` and measures it.
pub fn image_stats(sample: &Sample, limits: &ImageLimits) -> Result<ImageStats, DataError> {
    let (image, color) = load_rgb8_and_color(&sample.path, limits)?;
    let mut channel_sum = [0.0f64; 3];
    let mut channel_sum_sq = [0.0f64; 3];
    let mut histogram = [0u64; HISTOGRAM_BINS];
    for pixel in image.pixels() {
        for c in 0..3 {
            let v = pixel[c] as f64 / 255.0;
            channel_sum[c] += v;
            channel_sum_sq[c] += v * v;
        }
        // PIL's L conversion, in its fixed point: (R·19595 + G·38470 + B·7471 + 0x8000) >> 16.
        let [r, g, b] = pixel.0.map(u32::from);
        let luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
        histogram[luma as usize * HISTOGRAM_BINS / 256] += 1;
    }
    let defect = match &sample.mask {
        Some(path) => Some(defect_area(&load_mask(path, limits)?)),
        None => None,
    };
    Ok(ImageStats {
        width: image.width(),
        height: image.height(),
        color,
        channel_sum,
        channel_sum_sq,
        pixels: image.width() as u64 * image.height() as u64,
        histogram,
        defect,
    })
}

/// The marked share of a mask and its number of 8-connected regions.
pub fn defect_area(mask: &GrayImage) -> DefectArea {
    let (width, height) = (mask.width() as usize, mask.height() as usize);
    let marked: Vec<bool> = mask.pixels().map(|p| p[0] > 127).collect();
    let area = marked.iter().filter(|&&m| m).count();
    let mut seen = vec![false; marked.len()];
    let mut regions = 0;
    let mut stack = Vec::new();
    for start in 0..marked.len() {
        if !marked[start] || seen[start] {
            continue;
        }
        regions += 1;
        seen[start] = true;
        stack.push(start);
        while let Some(at) = stack.pop() {
            let (x, y) = ((at % width) as isize, (at / width) as isize);
            for (dx, dy) in [(-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1)] {
                let (nx, ny) = (x + dx, y + dy);
                if nx < 0 || ny < 0 || nx >= width as isize || ny >= height as isize {
                    continue;
                }
                let next = ny as usize * width + nx as usize;
                if marked[next] && !seen[next] {
                    seen[next] = true;
                    stack.push(next);
                }
            }
        }
    }
    DefectArea { fraction: area as f64 / marked.len().max(1) as f64, regions }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_counted_with_diagonal_neighbours_joined() {
        // Two blobs: one L-shape joined diagonally, one single pixel far away.
        let mut mask = GrayImage::new(10, 10);
        for (x, y) in [(1, 1), (2, 2), (2, 3), (8, 8)] {
            mask.put_pixel(x, y, image::Luma([255]));
        }
        assert_eq!(defect_area(&mask), DefectArea { fraction: 0.04, regions: 2 });
        assert_eq!(defect_area(&GrayImage::new(4, 4)).regions, 0);
    }
}
