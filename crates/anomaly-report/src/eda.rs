//! The figures of a dataset's exploratory analysis: luminance histograms of good vs defective images, the
//! defects' areas per type, and a grid of sample images with their mask outlines.

use image::{GrayImage, RgbImage, imageops::FilterType};
use plotters::prelude::*;

use crate::plots::{FONT, PALETTE, PlotError, render, render_over};

/// Draws normalised histograms (each series sums to 1) over `0..=255` as lines, one colour per series.
pub fn histogram_png(title: &str, series: &[(String, Vec<f64>)]) -> Result<Vec<u8>, PlotError> {
    render("histograms.png", (760, 520), |root| {
        let bins = series.first().map_or(1, |(_, counts)| counts.len().max(1));
        let top = series.iter().flat_map(|(_, c)| c.iter().copied()).fold(0.0, f64::max).max(1e-9) * 1.1;
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0f64..255.0, 0.0..top)?;
        chart
            .configure_mesh()
            .x_desc("luminance (0 = black, 255 = white)")
            .y_desc("share of pixels")
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .max_light_lines(1)
            .light_line_style(RGBColor(240, 240, 240))
            .draw()?;
        let width = 256.0 / bins as f64;
        for (index, (name, counts)) in series.iter().enumerate() {
            let colour = PALETTE[index % PALETTE.len()];
            let points = counts.iter().enumerate().map(|(bin, &share)| ((bin as f64 + 0.5) * width, share));
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], colour.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
}

/// Draws each defect type's mask areas (percent of the image) as a strip of points, one column per type.
pub fn defect_area_png(title: &str, groups: &[(String, Vec<f64>)]) -> Result<Vec<u8>, PlotError> {
    render("defect_area.png", (760, 520), |root| {
        let top = groups.iter().flat_map(|(_, a)| a.iter().copied()).fold(0.0, f64::max).max(1e-6) * 1.1;
        let columns = groups.len().max(1);
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.5f64..columns as f64 - 0.5, 0.0..top)?;
        let names: Vec<String> = groups.iter().map(|(name, _)| name.clone()).collect();
        chart
            .configure_mesh()
            .x_labels(columns)
            .x_label_formatter(&|x| {
                let index = x.round();
                if (x - index).abs() < 1e-6 && index >= 0.0 {
                    names.get(index as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .disable_x_mesh()
            .max_light_lines(1)
            .light_line_style(RGBColor(240, 240, 240))
            .y_desc("defect area (% of the image)")
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .draw()?;
        for (index, (_, areas)) in groups.iter().enumerate() {
            let colour = PALETTE[index % PALETTE.len()];
            // Spread the points sideways by rank so that equal areas do not hide each other.
            let n = areas.len().max(1) as f64;
            chart.draw_series(
                areas
                    .iter()
                    .enumerate()
                    .map(|(i, &a)| Circle::new((index as f64 + 0.5 * (i as f64 / n - 0.5), a), 4, colour.mix(0.8).filled())),
            )?;
        }
        Ok(())
    })
}

/// One sample image and, where there is one, its ground-truth mask (of the same size), with a caption
/// drawn under it (none when empty).
pub struct GridImage {
    pub image: RgbImage,
    pub mask: Option<GrayImage>,
    pub caption: String,
}

/// Side of a thumbnail in the sample grid.
const THUMB: u32 = 160;

/// Draws one row of thumbnails per group (e.g. per defect type), mask outlines in red, group names at left.
pub fn sample_grid_png(title: &str, rows: &[(String, Vec<GridImage>)]) -> Result<Vec<u8>, PlotError> {
    sample_grid_png_sized(title, rows, THUMB)
}

/// As [`sample_grid_png`], with thumbnails of `thumb` pixels on their longer side, for figures whose
/// images need the room (anomaly maps over the images).
pub fn sample_grid_png_sized(title: &str, rows: &[(String, Vec<GridImage>)], thumb: u32) -> Result<Vec<u8>, PlotError> {
    let thumb = thumb.max(16);
    let (gap, header) = (6u32, 44u32);
    let caption_height = if rows.iter().flat_map(|(_, samples)| samples).any(|s| !s.caption.is_empty()) { 20 } else { 0 };
    let cell = thumb + caption_height + gap;
    // Room for the longest row name at about 9 px per character.
    let label_width = 24 + 9 * rows.iter().map(|(name, _)| name.chars().count() as u32).max().unwrap_or(8).max(8);
    let columns = rows.iter().map(|(_, samples)| samples.len()).max().unwrap_or(1).max(1) as u32;
    // As wide as the title needs, at about 12 px per character.
    let width = (label_width + columns * (thumb + gap) + gap).max(24 + 12 * title.chars().count() as u32);
    let height = header + rows.len().max(1) as u32 * cell + gap;
    let mut canvas = RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    for (row, (_, samples)) in rows.iter().enumerate() {
        for (column, sample) in samples.iter().enumerate() {
            let small = thumbnail(sample, thumb);
            let (x, y) = (label_width + column as u32 * (thumb + gap) + gap, header + row as u32 * cell + gap);
            image::imageops::overlay(&mut canvas, &small, x as i64, y as i64);
        }
    }
    // About 7 px per character of the caption font.
    let caption_chars = (thumb / 7).max(4) as usize;
    let (w, h) = canvas.dimensions();
    render_over("samples.png", canvas.into_raw(), (w, h), |root| {
        root.draw_text(title, &(FONT, 22).into_font().color(&BLACK), (12, 10))?;
        for (row, (name, samples)) in rows.iter().enumerate() {
            let top = header + row as u32 * cell + gap;
            root.draw_text(name, &(FONT, 16).into_font().color(&BLACK), (12, (top + thumb / 2 - 8) as i32))?;
            for (column, sample) in samples.iter().enumerate().filter(|(_, s)| !s.caption.is_empty()) {
                let caption = if sample.caption.chars().count() > caption_chars {
                    format!("{}…", sample.caption.chars().take(caption_chars - 1).collect::<String>())
                } else {
                    sample.caption.clone()
                };
                let x = label_width + column as u32 * (thumb + gap) + gap;
                root.draw_text(&caption, &(FONT, 13).into_font().color(&BLACK), (x as i32, (top + thumb + 3) as i32))?;
            }
        }
        Ok(())
    })
}

/// A thumbnail that keeps the aspect ratio, with the mask's outline drawn in red.
fn thumbnail(sample: &GridImage, side: u32) -> RgbImage {
    let (w, h) = sample.image.dimensions();
    let scale = side as f64 / w.max(h).max(1) as f64;
    let (tw, th) = (((w as f64 * scale).round() as u32).max(1), ((h as f64 * scale).round() as u32).max(1));
    let mut thumb = image::imageops::resize(&sample.image, tw, th, FilterType::Triangle);
    if let Some(mask) = &sample.mask {
        let mask = image::imageops::resize(mask, tw, th, FilterType::Nearest);
        let inside = |x: i64, y: i64| x >= 0 && y >= 0 && x < tw as i64 && y < th as i64 && mask.get_pixel(x as u32, y as u32)[0] > 127;
        for y in 0..th as i64 {
            for x in 0..tw as i64 {
                let edge = inside(x, y) && [(-1, 0), (1, 0), (0, -1), (0, 1)].iter().any(|(dx, dy)| !inside(x + dx, y + dy));
                if edge {
                    thumb.put_pixel(x as u32, y as u32, image::Rgb([230, 20, 20]));
                }
            }
        }
    }
    thumb
}
