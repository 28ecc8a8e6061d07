//! Images in: datasets in the MVTec AD or plain-folder layout, decoding of every common format to RGB,
//! and preprocessing that matches torchvision's (PIL) transforms, in parallel with the consumer.

mod dataset;
mod decode;
mod error;
mod loader;
mod preprocess;
mod resample;
mod stats;
mod synthetic;
mod walk;

pub use dataset::{Dataset, Label, Sample, Split, collect_images, mvtec_parts};
pub use decode::{ImageLimits, decode_rgb8_bytes, load_mask, load_rgb8, load_rgb8_and_color};
pub use error::DataError;
pub use loader::{Batch, BatchLoader};
pub use preprocess::{Preprocess, PreprocessedImage, mask_at_size};
pub use stats::{DefectArea, HISTOGRAM_BINS, ImageStats, defect_area, image_stats};
pub use synthetic::{SYNTHETIC_DEFECTS, SplitMix, SyntheticConfig, write_synthetic_dataset};
pub use walk::{ImageFiles, SkipReason, Skipped};
