//! Binary detection metrics with scikit-learn's exact definitions, so that our figures can be checked
//! against the tool our users compare with. Labels are `true` for defective; an image is called
//! defective when its score is above the threshold.

use serde::Serialize;

/// Why a metric is undefined for these scores.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    #[error("{0} scores but {1} labels")]
    LengthMismatch(usize, usize),
    #[error("the ROC curve and AUROC are undefined: the test set has no {0} images")]
    SingleClass(&'static str),
    #[error("a score is NaN")]
    NotANumber,
}

/// Points of the ROC curve, as `sklearn.metrics.roc_curve` returns them (with `drop_intermediate`):
/// from (0, 0) at an infinite threshold to (1, 1), thresholds decreasing.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Roc {
    pub fpr: Vec<f64>,
    pub tpr: Vec<f64>,
    pub thresholds: Vec<f64>,
}

/// Counts of the 2 × 2 confusion matrix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Confusion {
    pub tn: usize,
    pub fp: usize,
    pub fn_: usize,
    pub tp: usize,
}

impl Confusion {
    /// Share of images classified correctly.
    pub fn accuracy(&self) -> f64 {
        ratio(self.tp + self.tn, self.tp + self.tn + self.fp + self.fn_)
    }

    /// Share of the images called defective that are defective (0 when none is called defective).
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }

    /// Share of the defective images that are called defective (0 when there are none).
    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }

    /// Harmonic mean of precision and recall (0 when both are 0), as sklearn's `f1_score`.
    pub fn f1(&self) -> f64 {
        ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

fn check(scores: &[f64], labels: &[bool]) -> Result<(), MetricsError> {
    if scores.len() != labels.len() {
        return Err(MetricsError::LengthMismatch(scores.len(), labels.len()));
    }
    if scores.iter().any(|s| s.is_nan()) {
        return Err(MetricsError::NotANumber);
    }
    Ok(())
}

/// Cumulative (false positives, true positives) at each distinct score, highest score first, with the
/// scores themselves: sklearn's `_binary_clf_curve`.
fn cumulative_counts(scores: &[f64], labels: &[bool]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut fps, mut tps, mut thresholds) = (Vec::new(), Vec::new(), Vec::new());
    let (mut fp, mut tp) = (0.0, 0.0);
    for (position, &i) in order.iter().enumerate() {
        if labels[i] {
            tp += 1.0
        } else {
            fp += 1.0
        }
        let last_of_value = order.get(position + 1).is_none_or(|&next| scores[next] != scores[i]);
        if last_of_value {
            fps.push(fp);
            tps.push(tp);
            thresholds.push(scores[i]);
        }
    }
    (fps, tps, thresholds)
}

/// The ROC curve; an error when the labels hold only one class.
pub fn roc_curve(scores: &[f64], labels: &[bool]) -> Result<Roc, MetricsError> {
    check(scores, labels)?;
    let positives = labels.iter().filter(|&&l| l).count();
    if positives == 0 {
        return Err(MetricsError::SingleClass("defective"));
    }
    if positives == labels.len() {
        return Err(MetricsError::SingleClass("good"));
    }
    let (fps, tps, thresholds) = cumulative_counts(scores, labels);
    // Drop points collinear with their neighbours, as sklearn's drop_intermediate does.
    let keep: Vec<usize> = (0..fps.len())
        .filter(|&i| {
            i == 0 || i + 1 == fps.len() || fps[i + 1] - 2.0 * fps[i] + fps[i - 1] != 0.0 || tps[i + 1] - 2.0 * tps[i] + tps[i - 1] != 0.0
        })
        .collect();
    let (total_fp, total_tp) = (fps[fps.len() - 1], tps[tps.len() - 1]);
    let mut roc = Roc { fpr: vec![0.0], tpr: vec![0.0], thresholds: vec![f64::INFINITY] };
    for i in keep {
        roc.fpr.push(fps[i] / total_fp);
        roc.tpr.push(tps[i] / total_tp);
        roc.thresholds.push(thresholds[i]);
    }
    Ok(roc)
}

/// Area under the ROC curve (trapezoidal rule, as `roc_auc_score`); ties count half.
pub fn auroc(scores: &[f64], labels: &[bool]) -> Result<f64, MetricsError> {
    let roc = roc_curve(scores, labels)?;
    Ok(roc.fpr.windows(2).zip(roc.tpr.windows(2)).map(|(x, y)| (x[1] - x[0]) * (y[1] + y[0]) / 2.0).sum())
}

/// The confusion matrix when images scoring above `threshold` are called defective.
pub fn confusion(scores: &[f64], labels: &[bool], threshold: f64) -> Result<Confusion, MetricsError> {
    check(scores, labels)?;
    let mut counts = Confusion::default();
    for (&score, &defective) in scores.iter().zip(labels) {
        match (defective, score > threshold) {
            (false, false) => counts.tn += 1,
            (false, true) => counts.fp += 1,
            (true, false) => counts.fn_ += 1,
            (true, true) => counts.tp += 1,
        }
    }
    Ok(counts)
}

/// The threshold with the best F1 when images scoring at or above it are called defective.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct F1Optimum {
    pub threshold: f64,
    pub f1: f64,
    /// Precision and recall at the threshold, which say how the F1 is made up.
    pub precision: f64,
    pub recall: f64,
}

/// The F1-optimal threshold over every distinct score, as read off sklearn's `precision_recall_curve`
/// (the lowest such threshold on ties).
pub fn best_f1(scores: &[f64], labels: &[bool]) -> Result<F1Optimum, MetricsError> {
    check(scores, labels)?;
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    if positives == 0.0 {
        return Err(MetricsError::SingleClass("defective"));
    }
    let (fps, tps, thresholds) = cumulative_counts(scores, labels);
    let mut best = F1Optimum { threshold: f64::INFINITY, f1: -1.0, precision: 0.0, recall: 0.0 };
    // Ascending thresholds, so that a later equal F1 does not replace the lower threshold.
    for i in (0..thresholds.len()).rev() {
        let precision = tps[i] / (tps[i] + fps[i]);
        let recall = tps[i] / positives;
        let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
        if f1 > best.f1 {
            best = F1Optimum { threshold: thresholds[i], f1, precision, recall };
        }
    }
    Ok(best)
}
