use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anomaly_device::DeviceChoice;
use anomaly_fs::FileBytes;
use anomaly_method::count_in;
use anomaly_serve::{LoadModel, RunningService, ServeConfig, StartLoader};
use anyhow::Result;

use crate::args::{ImageArgs, RunArgs};
use crate::output::note;
use crate::weights::WeightsArgs;

/// `anomaly serve`.
#[derive(clap::Args)]
pub struct Args {
    /// A model written by `anomaly fit` or `anomaly eval` (any method); read again on SIGHUP or
    /// `POST /v1/reload`.
    #[arg(long, value_name = "FILE.safetensors")]
    model: PathBuf,
    /// The address to listen on. Loopback by default: to serve other hosts, listen on their interface
    /// and set --token-file.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDRESS:PORT")]
    listen: SocketAddr,
    /// Where the model runs.
    #[arg(long, value_enum, ignore_case = true, default_value_t)]
    device: DeviceChoice,
    #[command(flatten)]
    weights: WeightsArgs,
    /// The most images scored together in one batch.
    #[arg(long, default_value_t = 16, value_parser = count_in(1, 1024))]
    max_batch: usize,
    /// How long the oldest waiting image waits for others to join its batch.
    #[arg(long, default_value_t = 5, value_parser = count_in(0, 60_000), value_name = "MS")]
    max_wait_ms: usize,
    /// Requests admitted at once (being uploaded, decoded, queued or scored); one more gets 503 with
    /// Retry-After. Memory is bounded by about this many bodies and decoded images.
    #[arg(long, default_value_t = 256, value_parser = count_in(1, 65_536))]
    queue: usize,
    /// The largest request body accepted, in MiB (413 above it).
    #[arg(long, default_value_t = 32, value_parser = count_in(1, 4096), value_name = "MIB")]
    max_body_mb: usize,
    /// A request not answered within this many seconds, its upload included, gets 503 (or 408 while
    /// still uploading); a connection that sends no whole request head within it (idle, or stalled) is
    /// closed, and a shutdown waits at most this long for each connection.
    #[arg(long, default_value_t = 30, value_parser = count_in(1, 3600), value_name = "SECONDS")]
    request_timeout_s: usize,
    /// A file holding a secret token: every route but / and /healthz then needs
    /// `Authorization: Bearer <token>`.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    images: ImageArgs,
}

pub fn run(args: Args) -> Result<()> {
    let token = args.token_file.as_deref().map(anomaly_serve::read_token_file).transpose()?;
    if !args.listen.ip().is_loopback() && token.is_none() {
        note!("warning: listening on {} without --token-file: anyone who reaches it can score images and reload the model", args.listen);
    }
    let config = ServeConfig {
        model: args.model.clone(),
        listen: args.listen,
        max_batch: args.max_batch,
        max_wait: Duration::from_millis(args.max_wait_ms as u64),
        queue: args.queue,
        max_body_bytes: args.max_body_mb << 20,
        request_timeout: Duration::from_secs(args.request_timeout_s as u64),
        image_limits: args.images.limits(),
        token,
    };
    let run = RunArgs { weights: args.weights, device: args.device, batch_size: args.max_batch, images: args.images };
    let service = RunningService::start(config, start_loader(run))?;
    note!("anomaly serve: http://{} ({}); loading the model", service.address(), args.model.display());
    service.serve_until_signal(|line| note!("{line}"))?;
    note!("stopped: every accepted request was answered");
    Ok(())
}

/// The service's model loader, run on its scoring thread (where the device and backbones then live);
/// `anomaly bench serve` starts the service and times `predict`'s path with it too, so both measure the
/// same runtime.
pub(crate) fn start_loader(run: RunArgs) -> StartLoader {
    Box::new(move || {
        let runtime = run.runtime()?;
        let load: LoadModel = Box::new(move |file: &FileBytes, path: &Path| anomaly_method::load(file, path, &runtime));
        Ok(load)
    })
}
