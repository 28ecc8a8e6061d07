//! The scoring thread: it owns the model and its device, takes queued images in arrival order, and
//! scores together those that arrived within `max_wait` of the oldest, up to `max_batch`. Reloads go
//! through the same queue, so the images ahead of a reload are scored by the old model and those after
//! it by the new one.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant, SystemTime};

use anomaly_data::{Batch, Preprocess};
use anomaly_fs::{FileBytes, MAP_FILES_ABOVE};
use anomaly_method::{Detector, ImageOutput, MethodName, Scorer};
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::http::State;
use crate::{LoadModel, StartLoader};

/// A model file read and checked without a device, with its id (the sha256 of its bytes).
pub(crate) struct ModelFile {
    bytes: FileBytes,
    id: String,
    path: PathBuf,
}

impl ModelFile {
    /// Reads `path` and runs every check that needs no device, so that a bad file is refused at once.
    pub(crate) fn read(path: &Path) -> Result<Self> {
        let bytes = FileBytes::open(path, MAP_FILES_ABOVE)?;
        anomaly_method::check_model_file(&bytes, path)?;
        let id = Sha256::digest(&bytes[..]).iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self { bytes, id, path: path.to_path_buf() })
    }
}

/// What the service tells about the model that serves (`/v1/model`, and every answer's `model`).
#[derive(Debug)]
pub(crate) struct ModelSummary {
    pub id: String,
    pub method: MethodName,
    pub title: String,
    pub threshold: f32,
    pub pixel_threshold: Option<f32>,
    /// Whether the model gives anomaly maps (seen in the warm-up batch).
    pub localises: bool,
    pub device: String,
    pub info: serde_json::Value,
    pub path: PathBuf,
    /// Unix seconds.
    pub loaded_at: u64,
    pub preprocess: Preprocess,
}

impl ModelSummary {
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "method": self.method.as_str(),
            "title": self.title,
            "threshold": self.threshold,
            "pixel_threshold": self.pixel_threshold,
            "localises": self.localises,
            "device": self.device,
            "path": self.path.to_string_lossy(),
            "loaded_at": self.loaded_at,
            "input": {"resize": self.preprocess.resize, "crop": self.preprocess.crop},
            "info": self.info,
        })
    }
}

/// What the scoring thread is asked to do.
pub(crate) enum Work {
    Score(Job),
    /// Swap in this model if it loads and scores a warm-up batch; the answer is the new model, or why
    /// it was refused (the old one then keeps serving).
    Reload {
        model: ModelFile,
        reply: oneshot::Sender<Result<Arc<ModelSummary>, String>>,
    },
    /// Finish what is queued ahead, then stop.
    Stop,
}

/// One preprocessed image waiting to be scored.
pub(crate) struct Job {
    /// Names the image in errors.
    pub name: PathBuf,
    pub pixels: Vec<f32>,
    pub original_size: (u32, u32),
    /// The preprocessing the pixels went through: a model swapped in meanwhile with another makes the
    /// job stale.
    pub preprocess: Preprocess,
    pub queued_at: Instant,
    pub reply: oneshot::Sender<Outcome>,
}

/// How a job ended.
pub(crate) enum Outcome {
    Scored(Scored),
    /// A reload changed the model's input geometry while the image waited.
    Stale,
    /// The batch failed (a device error, a non-finite score, …); the message says why.
    Failed(String),
}

/// An image's output, with the model that scored it and where the time went.
pub(crate) struct Scored {
    pub output: ImageOutput,
    pub model: Arc<ModelSummary>,
    pub batch_size: usize,
    pub queued: Duration,
    pub scoring: Duration,
}

/// A loaded model and what the service tells of it.
struct Loaded {
    detector: Box<dyn Detector>,
    summary: Arc<ModelSummary>,
}

/// Starts the scoring thread: it makes the loader, loads `model` and warms it up (marking the service
/// ready, or failed), then serves `queue` until told to stop.
pub(crate) fn spawn(state: Arc<State>, queue: Receiver<Work>, model: ModelFile, start: StartLoader) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("anomaly-score".into())
        .spawn(move || {
            let started = catch(|| {
                let mut load = start()?;
                let loaded = load_and_warm_up(&mut load, &model)?;
                Ok((load, loaded))
            });
            let (mut load, mut loaded) = match started {
                Ok(started) => started,
                Err(error) => return state.fail_start(format!("{error:#}")),
            };
            state.set_model(Arc::clone(&loaded.summary));
            state.mark_ready();
            while let Some(next) = serve_model(&loaded, &queue, &state, &mut load) {
                loaded = next;
            }
        })
        .context("starting the scoring thread")
}

/// Runs `work`, turning a panic into an error (a bug in a kernel must not take the service down).
fn catch<T>(work: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let text = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
        Err(anyhow::anyhow!("internal error: {}", text.unwrap_or_else(|| "a panic".into())))
    })
}

/// Loads a model file and scores one mid-grey image through its whole scoring path, so that a model
/// that cannot score is refused before it serves, and the first request does not pay for warming up.
fn load_and_warm_up(load: &mut LoadModel, model: &ModelFile) -> Result<Loaded> {
    let detector = load(&model.bytes, &model.path)?;
    let preprocess = detector.preprocess().clone();
    let side = preprocess.crop as usize;
    let mut pixels = Vec::with_capacity(preprocess.values_per_image());
    for c in 0..3 {
        pixels.extend(std::iter::repeat_n((0.5 - preprocess.mean[c]) / preprocess.std[c], side * side));
    }
    let batch = Batch { paths: vec![PathBuf::from("warm-up image")], pixels, original_sizes: vec![(side as u32, side as u32)] };
    let outputs = {
        let mut scorer = detector.scorer()?;
        anomaly_method::score_batch(scorer.as_mut(), detector.method(), &batch)
            .with_context(|| format!("{}: the model failed its warm-up batch", model.path.display()))?
    };
    let loaded_at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let summary = ModelSummary {
        id: model.id.clone(),
        method: detector.method(),
        title: detector.title(),
        threshold: detector.threshold(),
        pixel_threshold: detector.pixel_threshold(),
        localises: outputs.first().is_some_and(|o| o.map.is_some()),
        device: detector.device(),
        info: detector.info(),
        path: model.path.clone(),
        loaded_at,
        preprocess,
    };
    Ok(Loaded { detector, summary: Arc::new(summary) })
}

/// Serves `loaded` until a reload succeeds (the new model is returned) or the service stops (`None`).
fn serve_model(loaded: &Loaded, queue: &Receiver<Work>, state: &State, load: &mut LoadModel) -> Option<Loaded> {
    // Made on the first batch, and again after a failed one (the device may need a fresh start).
    let mut scorer: Option<Box<dyn Scorer + '_>> = None;
    let mut held = None;
    loop {
        let first = match held.take().map_or_else(|| queue.recv().ok(), Some)? {
            Work::Stop => return None,
            Work::Reload { model, reply } => {
                match catch(|| load_and_warm_up(load, &model)) {
                    Ok(next) => {
                        state.set_model(Arc::clone(&next.summary));
                        let _ = reply.send(Ok(Arc::clone(&next.summary)));
                        return Some(next);
                    }
                    Err(error) => {
                        let _ = reply.send(Err(format!("{error:#}")));
                    }
                }
                continue;
            }
            Work::Score(job) => job,
        };
        state.dequeued();
        let deadline = first.queued_at + state.max_wait();
        let mut jobs = vec![first];
        while jobs.len() < state.max_batch() {
            let wait = deadline.saturating_duration_since(Instant::now());
            let next = if wait.is_zero() { queue.try_recv().ok() } else { queue.recv_timeout(wait).ok() };
            match next {
                Some(Work::Score(job)) => {
                    state.dequeued();
                    jobs.push(job);
                }
                Some(other) => {
                    held = Some(other);
                    break;
                }
                None => break,
            }
        }
        score(loaded, &mut scorer, jobs, state);
    }
}

/// Scores `jobs` as one batch and answers each; jobs whose requests are gone are skipped.
fn score<'d>(loaded: &'d Loaded, scorer: &mut Option<Box<dyn Scorer + 'd>>, jobs: Vec<Job>, state: &State) {
    let summary = &loaded.summary;
    let mut live = Vec::with_capacity(jobs.len());
    for job in jobs {
        if job.reply.is_closed() {
            state.metrics.abandoned();
        } else if job.preprocess != summary.preprocess {
            let _ = job.reply.send(Outcome::Stale);
        } else {
            live.push(job);
        }
    }
    if live.is_empty() {
        return;
    }
    let started = Instant::now();
    let mut batch = Batch { paths: Vec::new(), pixels: Vec::new(), original_sizes: Vec::new() };
    for job in &mut live {
        batch.paths.push(std::mem::take(&mut job.name));
        batch.pixels.append(&mut job.pixels);
        batch.original_sizes.push(job.original_size);
    }
    let scored = catch(|| {
        let scorer = match scorer {
            Some(scorer) => scorer,
            None => scorer.insert(loaded.detector.scorer()?),
        };
        anomaly_method::score_batch(scorer.as_mut(), summary.method, &batch)
    });
    let scoring = started.elapsed();
    state.metrics.batch(live.len());
    match scored {
        Ok(outputs) => {
            let batch_size = live.len();
            for (job, output) in live.into_iter().zip(outputs) {
                let scored = Scored {
                    output,
                    model: Arc::clone(summary),
                    batch_size,
                    queued: started.saturating_duration_since(job.queued_at),
                    scoring,
                };
                let _ = job.reply.send(Outcome::Scored(scored));
            }
        }
        Err(error) => {
            *scorer = None;
            state.metrics.scoring_failed();
            let message = format!("{error:#}");
            for job in live {
                let _ = job.reply.send(Outcome::Failed(message.clone()));
            }
        }
    }
}
