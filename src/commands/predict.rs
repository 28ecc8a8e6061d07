use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anomaly_eval::BoundingBox;
use anomaly_fs::{FileBytes, MAP_FILES_ABOVE};
use anomaly_method::{ImageOutput, image_progress};
use anyhow::{Context, Result};

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
    /// For methods with anomaly maps: write each image with its map over it to DIR/<file stem>.png (heat
    /// from clear at 0 to red at twice the model's pixel threshold, or at the image's own maximum for
    /// methods without one).
    #[arg(long, value_name = "DIR")]
    maps: Option<PathBuf>,
    /// With --maps: also each map at the image's size as a float32 TIFF, DIR/<file stem>.tiff.
    #[arg(long, requires = "maps")]
    tiff: bool,
}

/// The exit status of `--fail-on-anomaly` when an image is anomalous.
const ANOMALY_FOUND: u8 = 3;

pub fn run(args: Args) -> Result<ExitCode> {
    let bytes = FileBytes::open(&args.model, MAP_FILES_ABOVE)?;
    anomaly_method::check_model_file(&bytes, &args.model)?;
    if let Some(dir) = &args.maps {
        anomaly_fs::check_folder_output(dir, "--maps")?;
    }
    let mut paths = Vec::new();
    for path in &args.paths {
        let found = anomaly_data::collect_images(path)?;
        anomaly_eval::note_skipped(&found.skipped);
        paths.extend(found.files);
    }
    if let Some(dir) = &args.maps {
        check_distinct_stems(&paths, dir)?;
    }
    let runtime = args.run.runtime()?;
    let detector = anomaly_method::load(&bytes, &args.model, &runtime)?;
    let threshold = detector.threshold();
    note!("{} on {}: {} images, threshold {threshold:.4}", detector.title(), detector.device(), paths.len());
    let progress = image_progress(paths.len(), "predict");
    let mut printer = Printer::new(args.json, threshold);
    let maps = MapOutputs {
        wanted: args.json || args.maps.is_some(),
        dir: args.maps.as_deref(),
        tiff: args.tiff,
        pixel_threshold: detector.pixel_threshold(),
    };
    let limits = runtime.image_limits();
    let mut mapped = false;
    let scored = anomaly_method::score_paths(detector.as_ref(), paths.clone(), runtime.batch_size(), limits, |batch, outputs| {
        mapped |= outputs.iter().any(|o| o.map.is_some());
        let mut details = Vec::with_capacity(outputs.len());
        for ((path, &size), output) in batch.paths.iter().zip(&batch.original_sizes).zip(&outputs) {
            details.push(maps.image(path, size, output, detector.preprocess(), &limits)?);
        }
        progress.inc(batch.len() as u64);
        let scores: Vec<f32> = outputs.iter().map(|o| o.score).collect();
        progress.suspend(|| printer.print(&batch.paths, &scores, &details))
    });
    progress.finish_and_clear();
    if maps.dir.is_some() && !mapped && scored.is_ok() {
        note!("note: {} gives no anomaly maps; nothing written in --maps", detector.title());
    }
    match scored {
        Ok(()) => Ok(printer.finish(paths.len(), args.fail_on_anomaly)),
        // The reader took what it wanted (`| head`): the verdicts it got decide the status.
        Err(error) if error.is::<StdoutClosed>() => Ok(printer.status(args.fail_on_anomaly)),
        Err(error) => Err(error),
    }
}

/// Refuses, before any work, images whose overlays would overwrite each other in `dir` (the same file
/// stem in two folders).
fn check_distinct_stems(paths: &[PathBuf], dir: &Path) -> Result<()> {
    let mut seen: HashMap<OsString, &Path> = HashMap::new();
    for path in paths {
        let stem = path.file_stem().unwrap_or_default().to_os_string();
        if let Some(earlier) = seen.insert(stem.clone(), path) {
            anyhow::bail!(
                "{} and {} would both be written to {}: --maps names files by the image's stem; predict them in separate runs",
                earlier.display(),
                path.display(),
                map_file(dir, path, "png").display()
            );
        }
    }
    Ok(())
}

/// `dir/<image's file stem>.<extension>`.
fn map_file(dir: &Path, image: &Path, extension: &str) -> PathBuf {
    let mut name = image.file_stem().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(extension);
    dir.join(name)
}

/// What an image's anomaly map adds to its prediction: the map's largest value and, for methods with a
/// pixel threshold, the box around the pixels above it (`None` inside when no pixel is).
struct MapDetail {
    max: f32,
    bbox: Option<Option<BoundingBox>>,
}

/// Where and how `predict` writes maps.
struct MapOutputs<'a> {
    /// Whether anything reads the maps (`--json` or `--maps`): otherwise putting them back onto the
    /// images is skipped.
    wanted: bool,
    dir: Option<&'a Path>,
    tiff: bool,
    pixel_threshold: Option<f32>,
}

impl MapOutputs<'_> {
    /// An image's map put back onto the image (its `size`), summarised, and written where asked (`None`
    /// without a map, or when nothing reads it).
    fn image(
        &self,
        path: &Path,
        size: (u32, u32),
        output: &ImageOutput,
        preprocess: &anomaly_data::Preprocess,
        limits: &anomaly_data::ImageLimits,
    ) -> Result<Option<MapDetail>> {
        let Some(map) = output.map.as_ref().filter(|_| self.wanted) else { return Ok(None) };
        let map = preprocess.map_to_original(map, size).with_context(|| format!("{}: its anomaly map", path.display()))?;
        let max = map.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let bbox = self.pixel_threshold.map(|t| anomaly_eval::bounding_box(&map, size.0, t));
        if let Some(dir) = self.dir {
            let scale = anomaly_eval::single_map_scale(max, self.pixel_threshold);
            anomaly_eval::write_map_overlay(&map_file(dir, path, "png"), path, &map, scale, limits)?;
            if self.tiff {
                anomaly_eval::write_float_tiff(&map_file(dir, path, "tiff"), size.0, size.1, &map)?;
            }
        }
        Ok(Some(MapDetail { max, bbox }))
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

    fn print(&mut self, paths: &[PathBuf], scores: &[f32], details: &[Option<MapDetail>]) -> Result<()> {
        let (mut lines, mut flagged) = (String::new(), 0);
        for ((path, &score), detail) in paths.iter().zip(scores).zip(details) {
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
                if let Some(detail) = detail {
                    line["map_max"] = serde_json::json!(detail.max);
                    if let Some(bbox) = detail.bbox {
                        line["bbox"] = serde_json::json!(bbox);
                    }
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
