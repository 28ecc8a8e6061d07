//! The binary's output, written so that it never panics: `println!` panics when standard output is a
//! closed pipe (`anomaly predict … | head`) or a full disk. Results go through [`outln!`], which turns a
//! closed pipe into [`StdoutClosed`] (the run then ends quietly, as `head` expects) and any other failure
//! into an error; messages go through `anomaly_method::note!`, which drops what a closed stderr cannot take.

use std::io::Write;

/// Standard output was closed by its reader: not a failure of the run, which stops quietly.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct StdoutClosed;

/// Writes `text` to standard output and flushes it.
pub fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).map_err(|error| match error.kind() {
        std::io::ErrorKind::BrokenPipe => anyhow::Error::new(StdoutClosed),
        _ => anyhow::anyhow!("writing to standard output: {error}"),
    })
}

/// A path as one line of text: lossy where it is not UTF-8, control characters (a newline in a file name
/// would split a verdict line) escaped as Rust writes them (`\n`, `\u{1b}`).
pub fn one_line_path(path: &std::path::Path) -> String {
    path.to_string_lossy().chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// Writes one line to standard output (a result): `Err(StdoutClosed)` when the reader has gone.
macro_rules! outln {
    () => {
        $crate::output::write_stdout("\n")
    };
    ($($arg:tt)*) => {
        $crate::output::write_stdout(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// Writes text to standard output without a line end.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_stdout(&format!($($arg)*))
    };
}

pub(crate) use anomaly_method::note;
pub(crate) use {out, outln};
