//! `anomaly bench serve`: a bounded load generator for `anomaly serve`, on loopback only. C client
//! threads, each with its own keep-alive connection, post images held in memory until N requests or T
//! seconds (whichever comes first), waiting out each 503's Retry-After; each row gives throughput,
//! latency percentiles, 503s and errors by kind, and the ratio to `predict`'s path over the same images.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anomaly_device::DeviceChoice;
use anomaly_fs::{FileBytes, MAP_FILES_ABOVE};
use anomaly_method::count_in;
use anomaly_serve::{RunningService, ServeConfig};
use anyhow::{Context, Result};

use crate::args::{ImageArgs, RunArgs};
use crate::output::{note, outln};
use crate::weights::WeightsArgs;

#[derive(clap::Args)]
pub struct ServeBenchArgs {
    /// The model to serve in-process and to time `predict`'s path with (with --url: only for the
    /// `predict` row, which is left out without it).
    #[arg(long, value_name = "FILE.safetensors", required_unless_present = "url")]
    model: Option<PathBuf>,
    /// Folder of images (searched recursively), read into memory once and posted in turn.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Concurrent clients, one row each.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 64], value_parser = count_in(1, 4096))]
    concurrency: Vec<usize>,
    /// Requests per row, over all clients.
    #[arg(long, default_value_t = 200, value_parser = count_in(1, 100_000_000))]
    requests: usize,
    /// Seconds per row at most.
    #[arg(long, default_value_t = 60, value_parser = count_in(1, 86_400))]
    seconds: usize,
    /// A service already running, on this machine only (127.0.0.0/8, ::1 or localhost); without it the
    /// service runs in this process on a free loopback port.
    #[arg(long, value_name = "http://127.0.0.1:PORT")]
    url: Option<String>,
    /// In-process service: requests admitted at once (C above it shows the 503s).
    #[arg(long, default_value_t = 256, value_parser = count_in(1, 65_536))]
    queue: usize,
    /// In-process service: the most images scored together; also `predict`'s batch size.
    #[arg(long, default_value_t = 16, value_parser = count_in(1, 1024))]
    max_batch: usize,
    /// In-process service: how long the oldest waiting image waits for others to join its batch.
    #[arg(long, default_value_t = 5, value_parser = count_in(0, 60_000), value_name = "MS")]
    max_wait_ms: usize,
    /// `predict`'s path is timed in whole passes over the images for at least this many seconds, so that
    /// one pass over a small folder on a busy machine does not decide the ratio.
    #[arg(long, default_value_t = 10, value_parser = count_in(1, 3600), value_name = "S")]
    predict_seconds: usize,
    /// Where the in-process service and `predict`'s path run.
    #[arg(long, value_enum, ignore_case = true, default_value_t)]
    device: DeviceChoice,
    #[command(flatten)]
    weights: WeightsArgs,
    #[command(flatten)]
    images: ImageArgs,
    /// Every S seconds, note this process's resident memory (VmRSS) on stderr and keep it for the
    /// summary, to see whether it stays flat over a long run.
    #[arg(long, value_name = "S", value_parser = count_in(1, 3600))]
    rss_every_s: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// How long a client waits for one answer: past the service's own request timeout (30 s by default),
/// so a client timeout means the service failed to answer at all.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

pub fn run(args: ServeBenchArgs) -> Result<()> {
    let target = args.url.as_deref().map(loopback_address).transpose()?;
    let found = anomaly_data::collect_images(&args.data)?;
    anomaly_eval::note_skipped(&found.skipped);
    let paths = found.files;
    let bodies: Vec<Vec<u8>> = paths.iter().map(|p| anomaly_fs::read_regular_file(p)).collect::<std::result::Result<_, _>>()?;
    let held_mib = bodies.iter().map(|b| b.len()).sum::<usize>() as f64 / (1 << 20) as f64;
    let run_args = RunArgs { weights: args.weights.clone(), device: args.device, batch_size: args.max_batch, images: args.images.clone() };
    let rss = args.rss_every_s.map(|every| RssSampler::start(Duration::from_secs(every as u64)));

    let service = match target {
        Some(_) => None,
        None => {
            let model = args.model.clone().expect("clap requires --model without --url");
            let mut config = ServeConfig::new(model, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0));
            config.max_batch = args.max_batch;
            config.max_wait = Duration::from_millis(args.max_wait_ms as u64);
            config.queue = args.queue;
            config.image_limits = args.images.limits();
            let service = RunningService::start(config, super::serve::start_loader(run_args.clone()))?;
            service.wait_ready(Duration::from_secs(600))?;
            Some(service)
        }
    };
    let address = target.unwrap_or_else(|| service.as_ref().expect("started above").address());
    let served = describe_service(address)?;
    note!("bench serve: {} at http://{address}, {} images ({held_mib:.0} MiB held in memory)", served.title, paths.len());

    let mut rows = Vec::with_capacity(args.concurrency.len());
    for &clients in &args.concurrency {
        let row = load_row(address, &bodies, clients, args.requests, Duration::from_secs(args.seconds as u64));
        note!("  {clients} clients: {} requests, {} ok, {:.1} img/s", row.requests, row.ok, row.images_per_s());
        rows.push(row);
    }
    let serving_peak_mib = super::bench::status_mib("VmHWM:");
    if let Some(service) = service {
        service.shutdown();
    }

    let predict = match &args.model {
        Some(model) => Some(time_predict(model, paths.clone(), &run_args, Duration::from_secs(args.predict_seconds as u64))?),
        None => None,
    };
    let rss_samples = rss.map(RssSampler::stop).unwrap_or_default();
    let report = Report { address, in_process: args.url.is_none(), served, images: paths.len(), held_mib, args: &args, rows, predict };
    report.print(serving_peak_mib, &rss_samples)
}

/// The socket address of a loopback URL (`http://127.0.0.1:8080`, `http://[::1]:8080`,
/// `http://localhost:8080`, port 80 when none is given); anything else is refused before any connection
/// is made, as this load generator must never reach another host.
fn loopback_address(url: &str) -> Result<SocketAddr> {
    let refuse =
        |why: &str| anyhow::anyhow!("--url {url}: {why}; bench serve only loads a service on this machine (127.0.0.0/8, ::1 or localhost)");
    let rest = url.strip_prefix("http://").ok_or_else(|| refuse("not an http:// URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    anyhow::ensure!(!authority.contains('@'), refuse("user information is not accepted"));
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, port.parse::<u16>().map_err(|_| refuse("the port is not a number"))?),
        _ => (authority, 80),
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    // localhost is taken as 127.0.0.1 rather than resolved, so no hosts file can point it elsewhere.
    let ip = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse::<IpAddr>().map_err(|_| refuse("the host is not localhost or a loopback address"))?
    };
    anyhow::ensure!(ip.is_loopback(), refuse("not a loopback address"));
    Ok(SocketAddr::new(ip, port))
}

/// What the service says it serves (`GET /v1/model`), once it is ready.
struct Served {
    title: String,
    device: String,
    method: String,
}

fn describe_service(address: SocketAddr) -> Result<Served> {
    let agent = agent();
    let ready = agent.get(format!("http://{address}/readyz")).call().with_context(|| format!("http://{address}: no service answers"))?;
    anyhow::ensure!(ready.status() == 200, "http://{address}/readyz answers {}: the service is not ready", ready.status());
    let mut answer = agent.get(format!("http://{address}/v1/model")).call()?;
    anyhow::ensure!(
        answer.status() == 200,
        "http://{address}/v1/model answers {} (a service with a token is not supported)",
        answer.status()
    );
    let model: serde_json::Value = serde_json::from_slice(&answer.body_mut().read_to_vec()?)?;
    let text = |key: &str| model[key].as_str().unwrap_or("?").to_string();
    Ok(Served { title: text("title"), device: text("device"), method: text("method") })
}

/// A keep-alive client that reads error statuses as answers.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(CLIENT_TIMEOUT)).build().into()
}

/// One row: what C clients got.
#[derive(Default)]
struct Row {
    clients: usize,
    requests: usize,
    ok: usize,
    rejected: usize,
    timeouts: usize,
    connection_errors: usize,
    other_statuses: usize,
    seconds: f64,
    /// Latencies of the answered (200) requests, sorted.
    latencies_ms: Vec<f64>,
    batch_sizes: usize,
    /// What the first failed request (other than a 503) got, to say what went wrong.
    first_error: Option<String>,
}

impl Row {
    fn images_per_s(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    /// The nearest-rank percentile of the answered requests' latencies.
    fn percentile_ms(&self, p: f64) -> Option<f64> {
        let n = self.latencies_ms.len();
        (n > 0).then(|| self.latencies_ms[((p * n as f64).ceil() as usize).clamp(1, n) - 1])
    }

    fn mean_batch(&self) -> Option<f64> {
        (self.ok > 0).then(|| self.batch_sizes as f64 / self.ok as f64)
    }

    fn add(&mut self, other: Row) {
        self.requests += other.requests;
        self.ok += other.ok;
        self.rejected += other.rejected;
        self.timeouts += other.timeouts;
        self.connection_errors += other.connection_errors;
        self.other_statuses += other.other_statuses;
        self.latencies_ms.extend(other.latencies_ms);
        self.batch_sizes += other.batch_sizes;
        self.first_error = self.first_error.take().or(other.first_error);
    }
}

/// Runs `clients` threads posting `bodies` in turn until `requests` have been sent in all or `limit` has
/// passed.
fn load_row(address: SocketAddr, bodies: &[Vec<u8>], clients: usize, requests: usize, limit: Duration) -> Row {
    let url = format!("http://{address}/v1/predict");
    let sent = AtomicUsize::new(0);
    let started = Instant::now();
    let deadline = started + limit;
    let mut row = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let (url, sent) = (&url, &sent);
                scope.spawn(move || {
                    let agent = agent();
                    let mut row = Row::default();
                    loop {
                        let index = sent.fetch_add(1, Ordering::Relaxed);
                        if index >= requests || Instant::now() >= deadline {
                            return row;
                        }
                        if let Some(wait) = post(&agent, url, &bodies[index % bodies.len()], &mut row) {
                            std::thread::sleep(wait.min(deadline.saturating_duration_since(Instant::now())));
                        }
                    }
                })
            })
            .collect();
        let mut row = Row::default();
        for thread in threads {
            row.add(thread.join().expect("a client thread does not panic"));
        }
        row
    });
    row.clients = clients;
    row.seconds = started.elapsed().as_secs_f64();
    row.latencies_ms.sort_by(f64::total_cmp);
    row
}

/// Posts one image and counts its outcome in `row`; after a 503, returns how long its `Retry-After` asks
/// the client to wait, which it does, as a well-behaved client would (rather than spin on refusals).
fn post(agent: &ureq::Agent, url: &str, body: &[u8], row: &mut Row) -> Option<Duration> {
    row.requests += 1;
    let started = Instant::now();
    match agent.post(url).header("content-type", "application/octet-stream").send(body) {
        Ok(mut response) => {
            let status = response.status().as_u16();
            let answer = response.body_mut().read_to_vec().map(|body| serde_json::from_slice::<serde_json::Value>(&body));
            match (status, answer) {
                (200, Ok(Ok(answer))) if answer["score"].is_number() => {
                    row.ok += 1;
                    row.latencies_ms.push(started.elapsed().as_secs_f64() * 1e3);
                    row.batch_sizes += answer["batch_size"].as_u64().unwrap_or(0) as usize;
                }
                (503, _) => {
                    row.rejected += 1;
                    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.trim().parse().ok());
                    return Some(Duration::from_secs(retry_after.unwrap_or(1)));
                }
                (status, answer) => {
                    row.other_statuses += 1;
                    let body = answer.map_or_else(
                        |e| format!("unreadable body: {e}"),
                        |a| a.map_or_else(|e| format!("not JSON: {e}"), |a| a.to_string()),
                    );
                    row.first_error.get_or_insert_with(|| format!("status {status}: {body}"));
                }
            }
        }
        Err(ureq::Error::Timeout(timeout)) => {
            row.timeouts += 1;
            row.first_error.get_or_insert_with(|| format!("timeout: {timeout}"));
        }
        Err(error) => {
            row.connection_errors += 1;
            row.first_error.get_or_insert_with(|| format!("connection: {error}"));
        }
    }
    None
}

/// `predict`'s path over the same images: `score_paths` with the same runtime and batch size, after one
/// warm-up batch, in whole passes for at least `min_time`.
struct PredictRun {
    images: usize,
    batch_size: usize,
    seconds: f64,
}

fn time_predict(model: &std::path::Path, paths: Vec<PathBuf>, run: &RunArgs, min_time: Duration) -> Result<PredictRun> {
    let bytes = FileBytes::open(model, MAP_FILES_ABOVE)?;
    let mut load = super::serve::start_loader(run.clone())()?;
    let detector = load(&bytes, model)?;
    let (limits, batch_size) = (run.images.limits(), run.batch_size);
    let warm_up = paths.iter().take(batch_size).cloned().collect();
    anomaly_method::score_paths(detector.as_ref(), warm_up, batch_size, limits, |_, _| Ok(()))?;
    let (started, mut images) = (Instant::now(), 0);
    while images == 0 || started.elapsed() < min_time {
        anomaly_method::score_paths(detector.as_ref(), paths.clone(), batch_size, limits, |_, _| Ok(()))?;
        images += paths.len();
    }
    Ok(PredictRun { images, batch_size, seconds: started.elapsed().as_secs_f64() })
}

/// Samples this process's resident memory (VmRSS) on a thread, noting each sample as it is taken.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(f64, f64)>>,
}

impl RssSampler {
    fn start(every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut samples = Vec::new();
            let mut next = started;
            while !stopping.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    if let Some(mib) = super::bench::status_mib("VmRSS:") {
                        let at = started.elapsed().as_secs_f64();
                        note!("rss at {at:5.0} s: {mib:7.1} MiB");
                        samples.push((at, mib));
                    }
                    next += every;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        });
        Self { stop, thread }
    }

    fn stop(self) -> Vec<(f64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

struct Report<'a> {
    address: SocketAddr,
    in_process: bool,
    served: Served,
    images: usize,
    held_mib: f64,
    args: &'a ServeBenchArgs,
    rows: Vec<Row>,
    predict: Option<PredictRun>,
}

impl Report<'_> {
    fn predict_per_s(&self) -> Option<f64> {
        self.predict.as_ref().map(|p| p.images as f64 / p.seconds)
    }

    fn print(&self, serving_peak_mib: Option<f64>, rss_samples: &[(f64, f64)]) -> Result<()> {
        let predict_per_s = self.predict_per_s();
        let ratio = |row: &Row| predict_per_s.map(|p| row.images_per_s() / p);
        if self.args.json {
            let rows: Vec<_> = self
                .rows
                .iter()
                .map(|row| {
                    serde_json::json!({
                        "concurrency": row.clients, "requests": row.requests, "ok": row.ok, "rejected_503": row.rejected,
                        "errors": {"timeout": row.timeouts, "connection": row.connection_errors, "status": row.other_statuses},
                        "seconds": row.seconds, "img_s": row.images_per_s(),
                        "latency_ms": {
                            "p50": row.percentile_ms(0.50), "p95": row.percentile_ms(0.95), "p99": row.percentile_ms(0.99),
                            "max": row.latencies_ms.last(),
                        },
                        "mean_batch": row.mean_batch(), "vs_predict": ratio(row),
                        "over_queue": self.in_process && row.clients > self.args.queue, "first_error": row.first_error,
                    })
                })
                .collect();
            let predict = self
                .predict
                .as_ref()
                .map(|p| serde_json::json!({"images": p.images, "batch_size": p.batch_size, "seconds": p.seconds, "img_s": predict_per_s}));
            let service = self.in_process.then(
                || serde_json::json!({"queue": self.args.queue, "max_batch": self.args.max_batch, "max_wait_ms": self.args.max_wait_ms}),
            );
            let rss: Vec<_> = rss_samples.iter().map(|&(s, mib)| serde_json::json!({"s": s, "mib": mib})).collect();
            return outln!(
                "{}",
                serde_json::json!({
                    "url": format!("http://{}", self.address), "in_process": self.in_process, "service": service,
                    "model": self.served.title, "method": self.served.method, "device": self.served.device,
                    "images": self.images, "images_held_mib": self.held_mib, "requests_per_row": self.args.requests,
                    "seconds_per_row": self.args.seconds, "rows": rows, "predict": predict,
                    "peak_rss_mib": serving_peak_mib, "rss_samples": rss,
                })
            );
        }
        let how = if self.in_process {
            format!("in-process, queue {}, max batch {}, max wait {} ms", self.args.queue, self.args.max_batch, self.args.max_wait_ms)
        } else {
            "already running".to_string()
        };
        outln!("{} on {} at http://{} ({how})", self.served.title, self.served.device, self.address)?;
        outln!(
            "{} images ({:.0} MiB) posted in turn; each row stops after {} requests or {} s",
            self.images,
            self.held_mib,
            self.args.requests,
            self.args.seconds
        )?;
        outln!("clients  requests      ok     503  timeout  conn  status    img/s   p50 ms   p95 ms   p99 ms   max ms  batch  vs predict")?;
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
        for row in &self.rows {
            let over = if self.in_process && row.clients > self.args.queue { "  (clients > queue)" } else { "" };
            outln!(
                "{:>7}  {:>8}  {:>6}  {:>6}  {:>7}  {:>4}  {:>6}  {:>7.1}  {:>7}  {:>7}  {:>7}  {:>7}  {:>5}  {:>10}{over}",
                row.clients,
                row.requests,
                row.ok,
                row.rejected,
                row.timeouts,
                row.connection_errors,
                row.other_statuses,
                row.images_per_s(),
                ms(row.percentile_ms(0.50)),
                ms(row.percentile_ms(0.95)),
                ms(row.percentile_ms(0.99)),
                ms(row.latencies_ms.last().copied()),
                row.mean_batch().map_or_else(|| "-".to_string(), |b| format!("{b:.1}")),
                ratio(row).map_or_else(|| "-".to_string(), |r| format!("{r:.2}x")),
            )?;
        }
        for row in &self.rows {
            if let Some(error) = &row.first_error {
                outln!("{} clients, first failure: {error}", row.clients)?;
            }
        }
        match (&self.predict, predict_per_s) {
            (Some(p), Some(rate)) => {
                outln!("predict's path (score_paths, batch {}): {} images in {:.1} s = {rate:.1} img/s", p.batch_size, p.images, p.seconds)?
            }
            _ => outln!("predict's path: not timed (no --model)")?,
        }
        if let Some(mib) = serving_peak_mib {
            let whose = if self.in_process { "service and clients" } else { "clients only" };
            outln!("peak resident memory while serving (VmHWM, {whose}): {mib:.0} MiB")?;
        }
        if !rss_samples.is_empty() {
            let (low, high) = rss_samples.iter().fold((f64::INFINITY, 0.0f64), |(l, h), &(_, m)| (l.min(m), h.max(m)));
            let listed: Vec<String> = rss_samples.iter().map(|(s, mib)| format!("{s:.0}s {mib:.0}")).collect();
            outln!("resident memory (VmRSS, MiB) over time: {} (range {low:.0} to {high:.0})", listed.join(", "))?;
        }
        Ok(())
    }
}
