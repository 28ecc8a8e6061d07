//! What a person reads: t-SNE keeps separated clusters apart and is reproducible from its seed; the
//! figures are PNGs with their text drawn.

use anomaly_report::{PointGroup, RocPlot, TsneConfig, confusion, confusion_png, roc_curve, roc_png, tsne, tsne_png};

use crate::common::Rng;

/// Three Gaussian clusters in 40 dimensions, 30 points each, centres 10 σ apart.
fn clusters() -> (Vec<f32>, Vec<usize>) {
    let mut rng = Rng::new(5);
    let dim = 40;
    let mut points = Vec::new();
    let mut labels = Vec::new();
    for cluster in 0..3 {
        for _ in 0..30 {
            points.extend((0..dim).map(|d| if d % 3 == cluster { 10.0 } else { 0.0 } + rng.normal()));
            labels.push(cluster);
        }
    }
    (points, labels)
}

#[test]
fn tsne_keeps_separated_clusters_apart_and_is_reproducible() {
    let (points, labels) = clusters();
    let config = TsneConfig { seed: 3, ..TsneConfig::default() };
    let layout = tsne(&points, 40, &config);
    assert_eq!(layout.len(), 90);
    assert!(layout.iter().all(|p| p[0].is_finite() && p[1].is_finite()));
    // Every point's nearest neighbour in the plane is from its own cluster ...
    let distance = |a: [f64; 2], b: [f64; 2]| (a[0] - b[0]).hypot(a[1] - b[1]);
    for i in 0..layout.len() {
        let nearest = (0..layout.len())
            .filter(|&j| j != i)
            .min_by(|&a, &b| distance(layout[i], layout[a]).total_cmp(&distance(layout[i], layout[b])))
            .unwrap();
        assert_eq!(labels[nearest], labels[i], "point {i}");
    }
    // ... and the clusters' centres are further apart than any cluster is wide.
    let centre = |c: usize| {
        let members: Vec<[f64; 2]> = (0..90).filter(|&i| labels[i] == c).map(|i| layout[i]).collect();
        let n = members.len() as f64;
        [members.iter().map(|p| p[0]).sum::<f64>() / n, members.iter().map(|p| p[1]).sum::<f64>() / n]
    };
    let spread = (0..90).map(|i| distance(layout[i], centre(labels[i]))).fold(0.0, f64::max);
    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        assert!(distance(centre(a), centre(b)) > spread, "clusters {a} and {b} overlap");
    }
    assert_eq!(tsne(&points, 40, &config), layout, "same seed, same layout");
    assert_ne!(tsne(&points, 40, &TsneConfig { seed: 4, ..config }), layout, "another seed, another layout");
}

/// Decodes a PNG and counts its pixels darker than light grey (text, lines, markers).
fn dark_pixels(png: &[u8], expected: (u32, u32)) -> usize {
    let image = image::load_from_memory_with_format(png, image::ImageFormat::Png).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), expected);
    image.pixels().filter(|p| p.0.iter().all(|&c| c < 100)).count()
}

#[test]
fn figures_are_pngs_with_their_text_drawn() {
    let scores = [0.1, 0.4, 0.35, 0.8, 0.9, 0.2];
    let labels = [false, false, true, true, true, false];
    let roc = roc_curve(&scores, &labels).unwrap();
    let counts = confusion(&scores, &labels, 0.5).unwrap();
    let roc_figure = roc_png(&RocPlot { title: "ROC", roc: &roc, auroc: 0.89, threshold: 0.5, operating_point: (0.0, 0.67) }).unwrap();
    let confusion_figure = confusion_png("Confusion", &counts, 0.5).unwrap();
    let groups = [
        PointGroup { name: "train good".into(), points: vec![(0.0, 0.0), (1.0, 1.0)] },
        PointGroup { name: "hole".into(), points: vec![(5.0, 5.0)] },
    ];
    let tsne_figure = tsne_png("t-SNE", &groups).unwrap();
    // The bundled font draws text: a title adds dark pixels.
    let untitled = confusion_png("", &counts, 0.5).unwrap();
    let titled = dark_pixels(&confusion_figure, (640, 600));
    assert!(titled > dark_pixels(&untitled, (640, 600)) + 200, "the title is drawn");
    assert!(dark_pixels(&roc_figure, (720, 640)) > 2000);
    assert!(dark_pixels(&tsne_figure, (820, 700)) > 1000);
}
