//! What a person reads after a run: detection metrics computed as scikit-learn computes them (ROC curve,
//! AUROC, confusion matrix, precision / recall / F1, the F1-optimal threshold).

mod metrics;

pub use metrics::{Confusion, F1Optimum, MetricsError, Roc, auroc, best_f1, confusion, roc_curve};
