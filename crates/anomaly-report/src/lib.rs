//! What a person reads after a run: detection metrics computed as scikit-learn computes them (ROC curve,
//! AUROC, confusion matrix, precision / recall / F1, the F1-optimal threshold), MVTec AD's pixel AUROC and
//! AUPRO of anomaly maps, a t-SNE map of the images' features, the figures that show them, and the figures of a dataset's exploratory analysis.

mod eda;
mod metrics;
mod pixel_metrics;
mod plots;
mod tsne;

pub use eda::{GridImage, defect_area_png, histogram_png, sample_grid_png, sample_grid_png_sized};
pub use metrics::{Confusion, F1Optimum, MetricsError, Roc, auroc, best_f1, confusion, roc_curve};
pub use pixel_metrics::{
    AUPRO_MAX_FPR, AnomalyMap, PixelF1, PixelMetrics, PixelMetricsError, PixelScores, aupro, pixel_auroc, pixel_metrics,
};
pub use plots::{PlotError, PointGroup, RocPlot, confusion_png, roc_png, tsne_png};
pub use tsne::{TsneConfig, tsne};
