//! Detection metrics against scikit-learn (tools/make_metrics_fixture.py): ROC points, AUROC, confusion
//! matrix, precision / recall / F1 and the F1-optimal threshold, on scores with ties.

use anomaly_report::{MetricsError, auroc, best_f1, confusion, roc_curve};
use serde_json::Value;

use crate::common::fixture;

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
