use std::path::PathBuf;
use std::process::ExitCode;

use anomaly_method::image_progress;
use anyhow::Result;

use crate::args::RunArgs;
use crate::output::{StdoutClosed, note, one_line_path, out};

/// `anomaly predict`.
#[derive(clap::Args)]
pub struct Args {
    /// A model written by `anomaly fit` or `anomaly eval` (any method).
    #[arg(long, value_name = "FILE.safetensors")]
    model: PathBuf,
    /// Image files and folders (searched recursively).
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
    /// One JSON object per image (JSON Lines) instead of text.
    #[arg(long)]
    json: bool,
    /// Exit with status 3 when any image is anomalous (errors exit with 1), for scripts and line gates.
    #[arg(long)]
    fail_on_anomaly: bool,
}

/// The exit status of `--fail-on-anomaly` when an image is anomalous.
const ANOMALY_FOUND: u8 = 3;

pub fn run(args: Args) -> Result<ExitCode> {
    let bytes = anomaly_fs::read_regular_file(&args.model)?;
    anomaly_method::check_model_file(&bytes, &args.model)?;
    let mut paths = Vec::new();
    for path in &args.paths {
        let found = anomaly_data::collect_images(path)?;
        anomaly_eval::note_skipped(&found.skipped);
        paths.extend(found.files);
    }
    let runtime = args.run.runtime()?;
    let detector = anomaly_method::load(&bytes, &args.model, &runtime)?;
    let threshold = detector.threshold();
    note!("{} on {}: {} images, threshold {threshold:.4}", detector.title(), detector.device(), paths.len());
    let progress = image_progress(paths.len(), "predict");
    let mut printer = Printer::new(args.json, threshold);
    let scored =
        anomaly_method::score_paths(detector.as_ref(), paths.clone(), runtime.batch_size(), runtime.image_limits(), |batch, outputs| {
            progress.inc(batch.len() as u64);
            let scores: Vec<f32> = outputs.iter().map(|o| o.score).collect();
            progress.suspend(|| printer.print(&batch.paths, &scores))
        });
    progress.finish_and_clear();
    match scored {
        Ok(()) => Ok(printer.finish(paths.len(), args.fail_on_anomaly)),
        // The reader took what it wanted (`| head`): the verdicts it got decide the status.
        Err(error) if error.is::<StdoutClosed>() => Ok(printer.status(args.fail_on_anomaly)),
        Err(error) => Err(error),
    }
}

/// Prints each image's score and verdict as its batch completes, and a closing count.
struct Printer {
    json: bool,
    threshold: f32,
    flagged: usize,
}

impl Printer {
    fn new(json: bool, threshold: f32) -> Self {
        Self { json, threshold, flagged: 0 }
    }

    fn print(&mut self, paths: &[PathBuf], scores: &[f32]) -> Result<()> {
        let (mut lines, mut flagged) = (String::new(), 0);
        for (path, &score) in paths.iter().zip(scores) {
            let anomalous = score > self.threshold;
            flagged += usize::from(anomalous);
            if self.json {
                let mut line = serde_json::json!({
                    "path": path.to_string_lossy(), "score": score, "threshold": self.threshold, "anomalous": anomalous
                });
                // A name that is not UTF-8 is shown lossily in "path"; its exact bytes are kept too.
                if path.to_str().is_none() {
                    line["path_bytes"] = serde_json::json!(path.as_os_str().as_encoded_bytes());
                }
                lines.push_str(&line.to_string());
            } else {
                lines.push_str(&format!("{score:>10.4}  {:<9}  {}", if anomalous { "anomalous" } else { "good" }, one_line_path(path)));
            }
            lines.push('\n');
        }
        out!("{lines}")?;
        // Counted once written: a reader that left early did not get these verdicts.
        self.flagged += flagged;
        Ok(())
    }

    /// Prints the count of anomalous images and says how the process should exit.
    fn finish(&self, total: usize, fail_on_anomaly: bool) -> ExitCode {
        note!("{} of {total} images anomalous (score > {:.4})", self.flagged, self.threshold);
        self.status(fail_on_anomaly)
    }

    /// The exit status the verdicts printed so far call for.
    fn status(&self, fail_on_anomaly: bool) -> ExitCode {
        if fail_on_anomaly && self.flagged > 0 { ExitCode::from(ANOMALY_FOUND) } else { ExitCode::SUCCESS }
    }
}
