//! Detection metrics against scikit-learn (tools/make_metrics_fixture.py): ROC points, AUROC, confusion
//! matrix, precision / recall / F1 and the F1-optimal threshold, on scores with ties. Pixel AUROC and
//! AUPRO against an independent port of MVTec AD's evaluation code (tools/aupro_fixture.py) and by hand.

use anomaly_report::{
    AUPRO_MAX_FPR, AnomalyMap, MetricsError, PixelMetricsError, aupro, auroc, best_f1, confusion, pixel_auroc, pixel_metrics, roc_curve,
};
use serde_json::Value;

use crate::common::{Rng, fixture};

fn floats(value: &Value) -> Vec<f64> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap_or(f64::INFINITY)).collect()
}

fn assert_close(name: &str, ours: &[f64], theirs: &[f64]) {
    assert_eq!(ours.len(), theirs.len(), "{name}: {ours:?} vs {theirs:?}");
    for (a, b) in ours.iter().zip(theirs) {
        assert!(a == b || (a - b).abs() <= 1e-12, "{name}: {ours:?} vs {theirs:?}");
    }
}

#[test]
fn metrics_match_scikit_learn() {
    let text = std::fs::read_to_string(fixture("metrics/sklearn.json")).unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let scores = floats(&case["scores"]);
        let labels: Vec<bool> = case["labels"].as_array().unwrap().iter().map(|l| l.as_i64() == Some(1)).collect();

        let roc = roc_curve(&scores, &labels).unwrap();
        assert_close(&format!("{name} fpr"), &roc.fpr, &floats(&case["roc_fpr"]));
        assert_close(&format!("{name} tpr"), &roc.tpr, &floats(&case["roc_tpr"]));
        assert_close(&format!("{name} thresholds"), &roc.thresholds, &floats(&case["roc_thresholds"]));
        let ours = auroc(&scores, &labels).unwrap();
        assert!((ours - case["auroc"].as_f64().unwrap()).abs() < 1e-12, "{name} auroc {ours}");

        let counts = confusion(&scores, &labels, case["threshold"].as_f64().unwrap()).unwrap();
        let expected = &case["confusion"];
        assert_eq!(
            [counts.tn, counts.fp, counts.fn_, counts.tp],
            ["tn", "fp", "fn", "tp"].map(|k| expected[k].as_u64().unwrap() as usize),
            "{name} confusion"
        );
        for (metric, ours) in [("precision", counts.precision()), ("recall", counts.recall()), ("f1", counts.f1())] {
            assert!((ours - case[metric].as_f64().unwrap()).abs() < 1e-12, "{name} {metric} {ours}");
        }

        let optimum = best_f1(&scores, &labels).unwrap();
        assert!((optimum.f1 - case["best_f1"].as_f64().unwrap()).abs() < 1e-12, "{name} best f1 {optimum:?}");
        assert_eq!(optimum.threshold, case["best_f1_threshold"].as_f64().unwrap(), "{name} best f1 threshold");
        // Precision and recall of flagging the scores at or above the optimum.
        let flagged = |defective: bool| {
            scores.iter().zip(&labels).filter(|&(&score, &label)| score >= optimum.threshold && label == defective).count() as f64
        };
        let positives = labels.iter().filter(|&&label| label).count() as f64;
        assert!((optimum.precision - flagged(true) / (flagged(true) + flagged(false))).abs() < 1e-12, "{name} {optimum:?}");
        assert!((optimum.recall - flagged(true) / positives).abs() < 1e-12, "{name} {optimum:?}");
    }
}

#[test]
fn undefined_metrics_are_errors_not_nan() {
    let scores = [0.1, 0.5, 0.9];
    assert_eq!(auroc(&scores, &[false; 3]), Err(MetricsError::SingleClass("defective")));
    assert_eq!(auroc(&scores, &[true; 3]), Err(MetricsError::SingleClass("good")));
    assert!(auroc(&scores, &[true, false]).is_err());
    assert_eq!(auroc(&[f64::NAN, 1.0], &[true, false]), Err(MetricsError::NotANumber));
    let message = auroc(&scores, &[false; 3]).unwrap_err().to_string();
    assert!(message.contains("no defective images"), "{message}");
}

/// One fixture case: its maps' scores and its masks (`None` for an image without defects).
struct PixelCase {
    name: String,
    sizes: Vec<(usize, usize)>,
    scores: Vec<Vec<f32>>,
    masks: Vec<Option<Vec<bool>>>,
    pixel_auroc: f64,
    aupro: Vec<(f64, f64)>,
}

impl PixelCase {
    fn from_json(case: &Value) -> Self {
        let mut this = PixelCase {
            name: case["name"].as_str().unwrap().to_string(),
            sizes: Vec::new(),
            scores: Vec::new(),
            masks: Vec::new(),
            pixel_auroc: case["pixel_auroc"].as_f64().unwrap(),
            aupro: case["aupro"].as_array().unwrap().iter().map(|p| (p[0].as_f64().unwrap(), p[1].as_f64().unwrap())).collect(),
        };
        for image in case["images"].as_array().unwrap() {
            let (width, height) = (image["width"].as_u64().unwrap() as usize, image["height"].as_u64().unwrap() as usize);
            // Integers times a power of two: the same exact values as the fixture's float64 ones.
            let scale = image["scale"].as_f64().unwrap() as f32;
            this.scores.push(image["scores"].as_array().unwrap().iter().map(|q| q.as_i64().unwrap() as f32 * scale).collect());
            this.masks.push(
                image["mask"]
                    .as_array()
                    .map(|rows| rows.iter().flat_map(|row| row.as_str().unwrap().bytes().map(|b| b == b'1').collect::<Vec<_>>()).collect()),
            );
            this.sizes.push((width, height));
        }
        this
    }

    fn maps(&self) -> Vec<AnomalyMap<'_>> {
        self.sizes.iter().zip(&self.scores).map(|(&(width, height), scores)| AnomalyMap { width, height, scores }).collect()
    }

    fn masks(&self) -> Vec<Option<&[bool]>> {
        self.masks.iter().map(|m| m.as_deref()).collect()
    }
}

#[test]
fn pixel_auroc_and_aupro_match_mvtecs_definition() {
    let text = std::fs::read_to_string(fixture("metrics/aupro.json")).unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let cases: Vec<PixelCase> = fixture["cases"].as_array().unwrap().iter().map(PixelCase::from_json).collect();
    assert_eq!(cases.len(), 5);
    for case in &cases {
        let (maps, masks, name) = (case.maps(), case.masks(), &case.name);
        let ours = pixel_auroc(&maps, &masks).unwrap();
        assert!((ours - case.pixel_auroc).abs() <= 1e-12, "{name} pixel AUROC {ours} vs {}", case.pixel_auroc);
        for &(limit, expected) in &case.aupro {
            let ours = aupro(&maps, &masks, limit).unwrap();
            assert!((ours - expected).abs() <= 1e-12, "{name} AUPRO up to {limit}: {ours} vs {expected}");
        }
        let both = pixel_metrics(&maps, &masks, AUPRO_MAX_FPR).unwrap();
        assert_eq!((both.auroc, both.aupro), (pixel_auroc(&maps, &masks).unwrap(), aupro(&maps, &masks, 0.3).unwrap()), "{name}");
    }
}

#[test]
fn pixel_auroc_equals_the_image_auroc_of_all_pixels() {
    let mut rng = Rng::new(3);
    let scores: Vec<Vec<f32>> = (0..3).map(|_| rng.normals(12 * 9, 0.0, 1.0).iter().map(|s| (s * 4.0).round()).collect()).collect();
    let masks: Vec<Vec<bool>> = (0..3).map(|i| (0..12 * 9).map(|p| (p * 7 + i) % 5 == 0).collect()).collect();
    let maps: Vec<AnomalyMap> = scores.iter().map(|s| AnomalyMap { width: 12, height: 9, scores: s }).collect();
    let mask_refs: Vec<Option<&[bool]>> = masks.iter().map(|m| Some(m.as_slice())).collect();
    let ours = pixel_auroc(&maps, &mask_refs).unwrap();
    let flat: Vec<f64> = scores.concat().iter().map(|&s| s as f64).collect();
    let image_auroc = auroc(&flat, &masks.concat()).unwrap();
    assert!((ours - image_auroc).abs() < 1e-12, "{ours} vs {image_auroc}");
    // So are the F1-optimal threshold and its F1 (ties between scores abound: they are rounded).
    let optimum = pixel_metrics(&maps, &mask_refs, AUPRO_MAX_FPR).unwrap().f1_optimal;
    let image_optimum = best_f1(&flat, &masks.concat()).unwrap();
    assert_eq!(optimum.threshold as f64, image_optimum.threshold, "{optimum:?} vs {image_optimum:?}");
    assert!((optimum.f1 - image_optimum.f1).abs() < 1e-12, "{optimum:?} vs {image_optimum:?}");
}

/// A 4 × 4 image, scores and mask given by the pixels' positions.
fn tiny(scores: &[(usize, usize, f32)], marked: &[(usize, usize)]) -> (Vec<f32>, Vec<bool>) {
    let (mut map, mut mask) = (vec![0.0; 16], vec![false; 16]);
    for &(x, y, s) in scores {
        map[y * 4 + x] = s;
    }
    for &(x, y) in marked {
        mask[y * 4 + x] = true;
    }
    (map, mask)
}

#[test]
fn aupro_by_hand() {
    // One region scored above every anomaly-free pixel: PRO is 1 from FPR 0 on, AUPRO and AUROC are 1.
    let (map, mask) = tiny(&[(1, 1, 1.0), (2, 1, 1.0), (1, 2, 1.0)], &[(1, 1), (2, 1), (1, 2)]);
    let maps = [AnomalyMap { width: 4, height: 4, scores: &map }];
    let metrics = pixel_metrics(&maps, &[Some(&mask)], AUPRO_MAX_FPR).unwrap();
    assert_eq!((metrics.auroc, metrics.aupro), (1.0, 1.0));

    // (0,0) and (1,1) touch at a corner: one region of 2, beside the region (3,3). The pixels scoring 3
    // cover half of the first and all of the second (PRO 0.75, where 4-connectivity would give 2/3),
    // then one anomaly-free pixel of 13 scores 2 and the rest of the first region 1.
    let (map, mask) = tiny(&[(0, 0, 3.0), (3, 3, 3.0), (2, 0, 2.0), (1, 1, 1.0)], &[(0, 0), (1, 1), (3, 3)]);
    let maps = [AnomalyMap { width: 4, height: 4, scores: &map }];
    let masks = [Some(mask.as_slice())];
    // Curve (0, 0) (0, .75) (1/13, .75) (1/13, 1) (1, 1).
    let expected = 0.75 / 13.0 + 12.0 / 13.0;
    assert!((aupro(&maps, &masks, 1.0).unwrap() - expected).abs() < 1e-15);
    // Up to 0.3 the curve is 1 past FPR 1/13.
    let expected = (0.75 / 13.0 + (0.3 - 1.0 / 13.0)) / 0.3;
    assert!((aupro(&maps, &masks, 0.3).unwrap() - expected).abs() < 1e-15);
    // The same pixels as a good image beside: 16 more negatives at 0 leave the curve's start unchanged in
    // shape but scale its FPRs by 13 / 29.
    let good = [0.0f32; 16];
    let maps = [maps[0], AnomalyMap { width: 4, height: 4, scores: &good }];
    let expected = 0.75 / 29.0 + 28.0 / 29.0;
    assert!((aupro(&maps, &[masks[0], None], 1.0).unwrap() - expected).abs() < 1e-15);

    // A map constant everywhere: one threshold, the diagonal from (0, 0) to (1, 1), AUROC one half.
    let (map, mask) = tiny(&[], &[(0, 0), (1, 0), (3, 2)]);
    let constant: Vec<f32> = map.iter().map(|_| 0.25).collect();
    let maps = [AnomalyMap { width: 4, height: 4, scores: &constant }];
    let metrics = pixel_metrics(&maps, &[Some(&mask)], AUPRO_MAX_FPR).unwrap();
    assert_eq!(metrics.auroc, 0.5);
    assert!((metrics.aupro - 0.15).abs() < 1e-15, "{metrics:?}"); // ½ · 0.3 · 0.3 / 0.3
    assert_eq!(aupro(&maps, &[Some(&mask)], 1.0).unwrap(), 0.5);
}

#[test]
fn undefined_or_malformed_pixel_metrics_are_typed_errors() {
    let (map, mask) = tiny(&[(0, 0, 1.0)], &[(0, 0)]);
    let map = AnomalyMap { width: 4, height: 4, scores: &map };
    let none = [false; 16];
    assert_eq!(pixel_auroc(&[map, map], &[None, Some(&none)]), Err(PixelMetricsError::NoDefects));
    assert_eq!(aupro(&[], &[], 0.3), Err(PixelMetricsError::NoDefects));
    assert_eq!(aupro(&[map], &[Some(&[true; 16])], 0.3), Err(PixelMetricsError::NoNegatives));
    assert_eq!(aupro(&[map], &[Some(&mask), None], 0.3), Err(PixelMetricsError::CountMismatch { maps: 1, masks: 2 }));

    let short = AnomalyMap { width: 5, height: 4, scores: map.scores };
    let error = aupro(&[map, short], &[Some(&mask), None], 0.3).unwrap_err();
    assert_eq!(error, PixelMetricsError::MapSize { index: 1, len: 16, width: 5, height: 4 });
    assert!(error.to_string().contains("image 1"), "{error}");
    let overflowing = AnomalyMap { width: usize::MAX, height: 2, scores: map.scores };
    assert!(matches!(pixel_auroc(&[overflowing], &[None]), Err(PixelMetricsError::MapSize { index: 0, .. })));
    assert_eq!(
        pixel_auroc(&[map, map], &[None, Some(&mask[..15])]),
        Err(PixelMetricsError::MaskSize { index: 1, len: 15, width: 4, height: 4 })
    );

    let mut scores = map.scores.to_vec();
    scores[5] = f32::NAN;
    let with_nan = AnomalyMap { scores: &scores, ..map };
    assert_eq!(aupro(&[map, with_nan], &[Some(&mask), None], 0.3), Err(PixelMetricsError::NotANumber { index: 1 }));

    for limit in [0.0, -0.1, 1.5, f64::NAN] {
        assert!(matches!(aupro(&[map], &[Some(&mask)], limit), Err(PixelMetricsError::MaxFpr(_))), "{limit}");
    }
    let message = pixel_auroc(&[map], &[None]).unwrap_err().to_string();
    assert!(message.contains("no mask marks a defective pixel"), "{message}");
}

/// Time of both pixel metrics on a full MVTec category's worth of pixels (83 images of 900 × 900):
/// `cargo test --release --workspace aupro_time -- --ignored --nocapture`.
#[test]
#[ignore = "a timing, not a check: run it by name"]
fn aupro_time_on_a_full_category() {
    let (side, count) = (900, 83);
    let mut rng = Rng::new(9);
    let mut scores = Vec::new();
    let mut masks = Vec::new();
    for image in 0..count {
        let centre = (rng.uniform() * side as f32, rng.uniform() * side as f32, 20.0 + 80.0 * rng.uniform());
        let mask: Vec<bool> = (0..side * side)
            .map(|p| image % 4 != 0 && ((p % side) as f32 - centre.0).hypot((p / side) as f32 - centre.1) < centre.2)
            .collect();
        scores.push(mask.iter().map(|&m| rng.normal() + if m { 1.5 } else { 0.0 }).collect::<Vec<f32>>());
        masks.push(mask);
    }
    let maps: Vec<AnomalyMap> = scores.iter().map(|s| AnomalyMap { width: side, height: side, scores: s }).collect();
    let masks: Vec<Option<&[bool]>> = masks.iter().map(|m| Some(m.as_slice())).collect();
    let start = std::time::Instant::now();
    let metrics = pixel_metrics(&maps, &masks, AUPRO_MAX_FPR).unwrap();
    let seconds = start.elapsed().as_secs_f64();
    eprintln!(
        "pixel AUROC and AUPRO of {count} images of {side}×{side} ({} Mpixels): {seconds:.2} s, {metrics:?}",
        count * side * side / 1_000_000
    );
    assert!(metrics.auroc > 0.8 && metrics.aupro > 0.3, "{metrics:?}");
}
