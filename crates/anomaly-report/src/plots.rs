//! The report's figures as PNG images: the ROC curve, the confusion matrix and the t-SNE map. Text is drawn
//! with a bundled DejaVu Sans, so the plots render on machines without any system font packages.

use std::sync::Once;

use image::{ImageFormat, RgbImage};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::{Confusion, Roc};

pub(crate) const FONT: &str = "sans-serif";
static DEJAVU_SANS: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

/// Why a figure could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("drawing {figure}: {message}")]
pub struct PlotError {
    figure: &'static str,
    message: String,
}

/// Colours of the series, in order (matplotlib's tab10, which most readers already know).
pub(crate) const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The ROC curve with the chance diagonal, AUROC in the legend, and the detector's operating point marked.
pub struct RocPlot<'a> {
    pub title: &'a str,
    pub roc: &'a Roc,
    pub auroc: f64,
    /// The threshold in use and its (false positive rate, true positive rate).
    pub threshold: f64,
    pub operating_point: (f64, f64),
}

/// Draws `plot` as a PNG (encoded in memory).
pub fn roc_png(plot: &RocPlot) -> Result<Vec<u8>, PlotError> {
    render("roc.png", (720, 640), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(plot.title, (FONT, 24))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0f64..1.0, 0.0f64..1.02)?;
        chart
            .configure_mesh()
            .x_desc("False positive rate (good images flagged)")
            .y_desc("True positive rate (defects caught)")
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .max_light_lines(1)
            .light_line_style(RGBColor(240, 240, 240))
            .draw()?;
        let grey = RGBColor(150, 150, 150);
        chart
            .draw_series(DashedLineSeries::new([(0.0, 0.0), (1.0, 1.0)], 6, 5, grey.stroke_width(1)))?
            .label("chance (AUROC 0.5)")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], grey));
        let points: Vec<(f64, f64)> = plot.roc.fpr.iter().copied().zip(plot.roc.tpr.iter().copied()).collect();
        chart
            .draw_series(LineSeries::new(points, PALETTE[0].stroke_width(3)))?
            .label(format!("ROC, AUROC = {:.4}", plot.auroc))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], PALETTE[0].stroke_width(3)));
        let (fpr, tpr) = plot.operating_point;
        chart
            .draw_series([Circle::new((fpr, tpr), 7, PALETTE[3].filled())])?
            .label(format!("threshold {:.4}: FPR {:.2}, TPR {:.2}", plot.threshold, fpr, tpr))
            .legend(|(x, y)| Circle::new((x + 12, y), 6, PALETTE[3].filled()));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
}

/// Draws the 2×2 confusion matrix: counts, and each cell's share of its true class, shaded by that share.
pub fn confusion_png(title: &str, confusion: &Confusion, threshold: f64) -> Result<Vec<u8>, PlotError> {
    render("confusion.png", (640, 600), |root| {
        root.draw_text(title, &(FONT, 24).into_font().color(&BLACK), (24, 16))?;
        root.draw_text(&format!("flagged when score > {threshold:.4}"), &(FONT, 16).into_font().color(&RGBColor(90, 90, 90)), (24, 48))?;
        let (left, top, cell) = (170i32, 130i32, 200i32);
        let label = (FONT, 17).into_font().color(&BLACK);
        root.draw(&Text::new("predicted", (left + cell, top - 56), centred(18.0, &BLACK)))?;
        root.draw(&Text::new("good", (left + cell / 2, top - 24), centred(17.0, &BLACK)))?;
        root.draw(&Text::new("defective", (left + 3 * cell / 2, top - 24), centred(17.0, &BLACK)))?;
        root.draw_text("actual", &label, (24, top + cell - 10))?;
        root.draw(&Text::new("good", (left - 50, top + cell / 2), centred(17.0, &BLACK)))?;
        root.draw(&Text::new("defective", (left - 50, top + 3 * cell / 2), centred(17.0, &BLACK)))?;
        let good = (confusion.tn + confusion.fp).max(1) as f64;
        let defective = (confusion.fn_ + confusion.tp).max(1) as f64;
        let cells = [
            (0, 0, "true negatives", confusion.tn, confusion.tn as f64 / good, true),
            (1, 0, "false positives", confusion.fp, confusion.fp as f64 / good, false),
            (0, 1, "false negatives", confusion.fn_, confusion.fn_ as f64 / defective, false),
            (1, 1, "true positives", confusion.tp, confusion.tp as f64 / defective, true),
        ];
        for (column, row, name, count, rate, correct) in cells {
            let (x, y) = (left + column * cell, top + row * cell);
            // Correct cells shade green, mistakes red, both by their share of the true class.
            let base = if correct { PALETTE[2] } else { PALETTE[3] };
            let shade = |c: u8| (255.0 - (255.0 - c as f64) * (0.15 + 0.75 * rate)) as u8;
            let fill = RGBColor(shade(base.0), shade(base.1), shade(base.2));
            root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], fill.filled()))?;
            root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], BLACK.stroke_width(1)))?;
            let ink: &'static RGBColor = if rate > 0.6 { &WHITE } else { &BLACK };
            root.draw(&Text::new(count.to_string(), (x + cell / 2, y + cell / 2 - 24), centred(40.0, ink)))?;
            root.draw(&Text::new(format!("{:.1}%", 100.0 * rate), (x + cell / 2, y + cell / 2 + 16), centred(18.0, ink)))?;
            root.draw(&Text::new(name, (x + cell / 2, y + cell / 2 + 44), centred(15.0, ink)))?;
        }
        Ok(())
    })
}

/// One group of points in the t-SNE map (e.g. "train good", "test good", or a defect type).
pub struct PointGroup {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Draws the t-SNE map, one colour per group, with a legend.
pub fn tsne_png(title: &str, groups: &[PointGroup]) -> Result<Vec<u8>, PlotError> {
    render("tsne.png", (820, 700), |root| {
        let all = groups.iter().flat_map(|g| g.points.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in all {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (-1.0, 1.0, -1.0, 1.0);
        }
        let pad = |lo: f64, hi: f64| 0.05 * (hi - lo).max(1e-9);
        let (px, py) = (pad(x0, x1), pad(y0, y1));
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 24))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d((x0 - px)..(x1 + px), (y0 - py)..(y1 + py))?;
        chart
            .configure_mesh()
            .x_desc("t-SNE 1")
            .y_desc("t-SNE 2")
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .max_light_lines(1)
            .light_line_style(RGBColor(240, 240, 240))
            .draw()?;
        for (index, group) in groups.iter().enumerate() {
            let colour = PALETTE[index % PALETTE.len()];
            // Training images as hollow rings beneath, test images as filled dots.
            let hollow = index == 0 && group.name.starts_with("train");
            let style = if hollow { colour.stroke_width(1) } else { colour.mix(0.85).filled() };
            chart
                .draw_series(group.points.iter().map(|&p| Circle::new(p, 4, style)))?
                .label(format!("{} ({})", group.name, group.points.len()))
                .legend(move |(x, y)| Circle::new((x + 8, y), 5, style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
}

/// Text centred on its position.
fn centred(size: f64, colour: &'static RGBColor) -> TextStyle<'static> {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    TextStyle::from((FONT, size).into_font()).color(colour).pos(Pos::new(HPos::Center, VPos::Center))
}

pub(crate) type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Draws on a white canvas with the bundled font registered, then encodes it as PNG.
pub(crate) fn render(
    figure: &'static str,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> DrawResult,
) -> Result<Vec<u8>, PlotError> {
    render_over(figure, vec![255u8; (size.0 * size.1 * 3) as usize], size, draw)
}

/// Draws over an existing RGB canvas (row-major, 3 bytes per pixel) with the bundled font registered,
/// then encodes it as PNG.
pub(crate) fn render_over(
    figure: &'static str,
    mut pixels: Vec<u8>,
    (width, height): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> DrawResult,
) -> Result<Vec<u8>, PlotError> {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The font is compiled in and known to parse; a failure here would show as missing text, not a crash.
        let _ = register_font(FONT, FontStyle::Normal, DEJAVU_SANS);
    });
    let fail = |message: String| PlotError { figure, message };
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        draw(&root).map_err(|e| fail(e.to_string()))?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    let image = RgbImage::from_raw(width, height, pixels).expect("buffer matches the image size");
    let mut png = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png).map_err(|e| fail(e.to_string()))?;
    Ok(png)
}
