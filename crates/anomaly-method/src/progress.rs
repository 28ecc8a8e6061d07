//! Progress bars over images: drawn on stderr when it is a terminal, hidden otherwise.

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar over `total` images labelled `message`.
pub fn image_progress(total: usize, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} images ({per_sec}, eta {eta})").expect("valid progress template"),
    );
    bar.set_message(message.to_string());
    bar
}
