//! `anomaly serve`: a fitted model behind HTTP, for inspection lines that ask about one image at a time,
//! from many cameras, for months, without reloading the backbone per image.
//!
//! Requests are decoded in parallel on tokio's blocking threads; one scoring thread owns the model (and
//! its device) and scores whatever is queued together, up to `max_batch` images or `max_wait` after the
//! oldest arrived ([`worker`]). Admission is bounded: a request holds one of `queue` places from before
//! its body is read until it is answered, and a full queue answers `503` with `Retry-After`, so memory
//! stays bounded whatever the load. The model file is swapped in whole on `SIGHUP` or `POST /v1/reload`
//! (a bad file is refused and the old model keeps serving); `SIGTERM`/`SIGINT` finish what was accepted
//! and refuse the rest.

mod http;
mod metrics;
mod worker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anomaly_data::ImageLimits;
use anomaly_fs::FileBytes;
use anomaly_method::Detector;
use anyhow::{Context, Result};

pub use http::PAGE;

/// Loads a model file's bytes (`path` names it in errors) into a detector, on the scoring thread.
pub type LoadModel = Box<dyn FnMut(&FileBytes, &Path) -> Result<Box<dyn Detector>>>;

/// Makes the [`LoadModel`] on the scoring thread (devices and backbones are set up there, and stay there).
pub type StartLoader = Box<dyn FnOnce() -> Result<LoadModel> + Send>;

/// How the service runs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The model file, read at start and again on every reload.
    pub model: PathBuf,
    /// The address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// The most images scored together.
    pub max_batch: usize,
    /// How long the oldest queued image waits for others to join its batch.
    pub max_wait: Duration,
    /// Requests admitted at once (being read, decoded, queued or scored); one more gets `503`.
    pub queue: usize,
    /// The largest request body accepted (`413` above it).
    pub max_body_bytes: usize,
    /// How long a request may take, from arrival to its answer (its upload included); also how long a
    /// connection may take to send a request's head, and how long a shutdown waits for each connection.
    pub request_timeout: Duration,
    /// What one image may cost to decode (`422` above it, from the header, before decoding).
    pub image_limits: ImageLimits,
    /// With a token, every route but `/` and `/healthz` needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

impl ServeConfig {
    /// The defaults of `anomaly serve` for `model` on `listen`.
    pub fn new(model: PathBuf, listen: SocketAddr) -> Self {
        Self {
            model,
            listen,
            max_batch: 16,
            max_wait: Duration::from_millis(5),
            queue: 256,
            max_body_bytes: 32 << 20,
            request_timeout: Duration::from_secs(30),
            image_limits: ImageLimits::default(),
            token: None,
        }
    }
}

/// Reads a token file: its content less surrounding white space, which must not be empty.
pub fn read_token_file(path: &Path) -> Result<String> {
    let bytes = anomaly_fs::read_regular_file(path)?;
    let text = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{}: the token is not UTF-8 text", path.display()))?;
    let token = text.trim();
    anyhow::ensure!(!token.is_empty(), "{}: the token file is empty; put a long random secret in it", path.display());
    anyhow::ensure!(
        token.bytes().all(|b| b.is_ascii_graphic()),
        "{}: the token holds spaces or control characters, which an Authorization header cannot carry",
        path.display()
    );
    Ok(token.to_string())
}

/// A service listening and serving; dropped, it shuts down as [`RunningService::shutdown`] does.
pub struct RunningService {
    runtime: Option<tokio::runtime::Runtime>,
    state: Arc<http::State>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    worker: Option<std::thread::JoinHandle<()>>,
    address: SocketAddr,
}

impl RunningService {
    /// Binds `config.listen` and starts serving; the model loads on the scoring thread meanwhile
    /// (`/readyz` answers 503 until it has, and a warm-up batch has run). The model file is checked
    /// (without a device) before anything starts.
    pub fn start(config: ServeConfig, start_loader: StartLoader) -> Result<Self> {
        anyhow::ensure!(config.max_batch >= 1 && config.queue >= 1, "--max-batch and --queue must be at least 1");
        let model = worker::ModelFile::read(&config.model)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("anomaly-serve")
            .build()
            .context("starting the service's threads")?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(config.listen))
            .with_context(|| format!("{}: cannot listen there (is another service on that port?)", config.listen))?;
        let address = listener.local_addr().context("reading the address listened on")?;
        let (jobs, queue) = std::sync::mpsc::channel();
        let state = Arc::new(http::State::new(config, jobs));
        let worker = worker::spawn(Arc::clone(&state), queue, model, start_loader)?;
        let server = runtime.spawn(http::serve(listener, Arc::clone(&state)));
        Ok(Self { runtime: Some(runtime), state, server: Some(server), worker: Some(worker), address })
    }

    /// Where the service listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Waits until the model is loaded and warmed up (`Ok`), or its loading failed (the error), at most
    /// `timeout`.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        self.state.wait_ready(timeout)
    }

    /// Serves until `SIGTERM` or `SIGINT` (then shuts down gracefully), reloading the model on `SIGHUP`;
    /// `log` hears of each event. Fails when the model cannot be loaded at start.
    pub fn serve_until_signal(mut self, log: impl Fn(&str) + Send + Sync + 'static) -> Result<()> {
        let runtime = self.runtime.as_ref().expect("the runtime is there until the service stops");
        let outcome = runtime.block_on(http::until_signal(Arc::clone(&self.state), log));
        self.stop();
        outcome
    }

    /// Stops taking requests (new ones get 503, the listener closes), lets every accepted request finish
    /// (each connection gets at most the request timeout more), then stops the scoring thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.state.begin_draining();
        if let (Some(runtime), Some(server)) = (self.runtime.as_ref(), self.server.take()) {
            // Only a panic in the accept loop ends it early; there is nothing left to drain then.
            let _ = runtime.block_on(server);
        }
        self.state.stop_worker();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

impl Drop for RunningService {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests;
