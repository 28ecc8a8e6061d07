//! What a run shows on stderr: progress bars over images and spinners over stages (drawn when stderr is
//! a terminal, hidden otherwise), and one-line notes.

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

/// A spinner naming a stage that shows no count (drawn when stderr is a terminal).
pub fn stage_spinner(message: String) -> ProgressBar {
    let spinner = ProgressBar::new_spinner().with_message(message);
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    spinner
}

/// Writes one line to standard error (progress, notes), dropped if standard error cannot take it: a closed
/// pipe there (`… 2>&1 | head`) must not panic a run, as `eprintln!` would.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}
