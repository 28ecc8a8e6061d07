//! `anomaly serve` under faults, the real binary with real Lite0 models fitted on the synthetic fabric:
//! SIGTERM under load loses no accepted request, SIGHUP refuses a bad model file and swaps a good one in,
//! clients that leave mid-upload or mid-answer cost nothing but their own request, and batched answers
//! give `predict`'s scores. Also the raw-socket client and the fitted models the HTTP fuzzer shares.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::cli::{anomaly, stderr, weights_dir};

/// A model fitted by `anomaly fit` on a synthetic fabric, and that fabric.
pub(crate) struct Fitted {
    pub model: PathBuf,
    pub data: PathBuf,
}

impl Fitted {
    /// The fabric's test images, in a stable order.
    pub(crate) fn test_images(&self) -> Vec<PathBuf> {
        let mut images = anomaly_data::collect_images(&self.data.join("test")).unwrap().files;
        images.sort();
        images
    }
}

/// Fits `method` (with `options`) on a 64-pixel synthetic fabric written from `seed`, in a folder kept
/// for the test run.
fn fit(method: &str, seed: u64, options: &[&str]) -> Fitted {
    let dir = crate::common::kept_dir();
    let data = dir.join("fabric");
    let config = anomaly_data::SyntheticConfig { seed, size: 64, train: 6, test_good: 2, per_defect: 2 };
    anomaly_data::write_synthetic_dataset(&data, &config).unwrap();
    let model = dir.join(format!("{method}.safetensors"));
    let weights = weights_dir();
    let args = [
        &["fit", "--method", method, "--data", data.to_str().unwrap(), "--model", model.to_str().unwrap()][..],
        &["--device", "cpu", "--offline", "--weights-dir", weights.to_str().unwrap()],
        options,
    ];
    let output = anomaly(&args.concat());
    assert!(output.status.success(), "{}", stderr(&output));
    Fitted { model, data }
}

/// The cheapest real model: a memory bank over Lite0 features, fitted once per test run.
pub(crate) fn bank() -> &'static Fitted {
    static FITTED: OnceLock<Fitted> = OnceLock::new();
    FITTED.get_or_init(|| fit("memory-bank", 41, &["--k", "3"]))
}

/// Another memory bank (other images, other k): another model id.
fn other_bank() -> &'static Fitted {
    static FITTED: OnceLock<Fitted> = OnceLock::new();
    FITTED.get_or_init(|| fit("memory-bank", 42, &["--k", "2"]))
}

/// A PatchCore model, whose answers can be overlays (large PNGs).
fn patchcore() -> &'static Fitted {
    static FITTED: OnceLock<Fitted> = OnceLock::new();
    FITTED.get_or_init(|| fit("patchcore", 43, &[]))
}

/// An answer read off a raw socket.
#[derive(Debug)]
pub(crate) struct RawReply {
    pub status: u16,
    /// Names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawReply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The one-line `error` of a JSON error answer, or why it is not one.
    pub(crate) fn error_line(&self) -> Result<String, String> {
        let body = String::from_utf8_lossy(&self.body);
        let json: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{} with a body that is not JSON ({e}): {body:?}", self.status))?;
        match json["error"].as_str() {
            Some(error) if !error.is_empty() && !error.contains('\n') => Ok(error.to_string()),
            _ => Err(format!("{} without a one-line error: {body}", self.status)),
        }
    }
}

/// What became of a request written to a raw socket.
#[derive(Debug)]
pub(crate) enum Exchange {
    Answered(RawReply),
    /// The connection ended (closed or reset) before a whole answer; says how, and what had come.
    Closed(String),
}

/// How long a raw exchange may wait for its answer: past it, the service hangs.
const ANSWER_WITHIN: Duration = Duration::from_secs(15);

/// Writes `request` (from another thread, so that an answer sent before the whole body is read still
/// arrives) and reads one answer. A write that fails is not an error: the answer may say why.
/// `Err` only when nothing ends the exchange within [`ANSWER_WITHIN`] (a hang).
pub(crate) fn exchange(address: SocketAddr, request: &[u8]) -> Result<Exchange, String> {
    exchange_then(address, request, false)
}

/// [`exchange`], closing the writing half after the request when `half_close` (so that the service
/// sees the end of a request that is not whole).
pub(crate) fn exchange_then(address: SocketAddr, request: &[u8], half_close: bool) -> Result<Exchange, String> {
    let mut stream = match TcpStream::connect_timeout(&address, Duration::from_secs(5)) {
        Ok(stream) => stream,
        Err(error) => return Ok(Exchange::Closed(format!("connect: {error}"))),
    };
    stream.set_read_timeout(Some(ANSWER_WITHIN)).unwrap();
    stream.set_write_timeout(Some(ANSWER_WITHIN)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let _ = writer.write_all(request).and_then(|()| writer.flush());
            if half_close {
                let _ = writer.shutdown(std::net::Shutdown::Write);
            }
        });
        read_answer(&mut stream)
    })
}

/// Reads one HTTP/1.1 answer (skipping `100 Continue`), to its Content-Length or the end of the stream.
pub(crate) fn read_answer(stream: &mut TcpStream) -> Result<Exchange, String> {
    let started = Instant::now();
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        if let Some(reply) = parse_answer(&mut bytes)? {
            return Ok(Exchange::Answered(reply));
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(closed(&bytes, "closed")),
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(error) if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(format!("no answer within {:?} ({} bytes came: {:?})", started.elapsed(), bytes.len(), head_text(&bytes)));
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Ok(closed(&bytes, &error.to_string())),
        }
    }
}

fn closed(bytes: &[u8], how: &str) -> Exchange {
    Exchange::Closed(format!("{how} after {} bytes of answer: {:?}", bytes.len(), head_text(bytes)))
}

fn head_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned()
}

/// A whole answer at the start of `bytes` (a `100 Continue` is dropped from it), or `None` for more.
fn parse_answer(bytes: &mut Vec<u8>) -> Result<Option<RawReply>, String> {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else { return Ok(None) };
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP/1.1 status line: {status_line:?}"))?;
    if status == 100 {
        bytes.drain(..end + 4);
        return parse_answer(bytes);
    }
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    let length = headers.iter().find(|(n, _)| n == "content-length").map(|(_, v)| v.parse::<usize>());
    let length = match length {
        Some(Ok(length)) => length,
        Some(Err(_)) => return Err(format!("a Content-Length that is not a number: {head:?}")),
        None => return Err(format!("an answer without a Content-Length: {head:?}")),
    };
    if bytes.len() < end + 4 + length {
        return Ok(None);
    }
    Ok(Some(RawReply { status, headers, body: bytes[end + 4..end + 4 + length].to_vec() }))
}

/// A `POST` of `body` on `path` with `Connection: close` and the exact Content-Length.
pub(crate) fn post(path: &str, content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut request = format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if let Some(content_type) = content_type {
        request.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    request.push_str("\r\n");
    [request.as_bytes(), body].concat()
}

pub(crate) fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").into_bytes()
}

/// The answer to a well-formed request, which must come whole.
pub(crate) fn answer(address: SocketAddr, request: &[u8]) -> RawReply {
    match exchange(address, request).unwrap() {
        Exchange::Answered(reply) => reply,
        Exchange::Closed(how) => panic!("no answer: {how}"),
    }
}

/// `/metrics` once no request is in flight and no image queued (each gauge is 0), or a panic after 10 s.
pub(crate) fn wait_idle(address: SocketAddr) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = String::from_utf8(answer(address, &get("/metrics")).body).unwrap();
        if metrics.contains("\nanomaly_requests_in_flight 0\n") && metrics.contains("\nanomaly_queue_depth 0\n") {
            return metrics;
        }
        assert!(Instant::now() < deadline, "requests stayed in flight or queued: {metrics}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `anomaly serve` running as a child process, its stderr gathered.
struct Served {
    child: Child,
    address: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Served {
    /// Starts `anomaly serve --model model` on a free loopback port (with `options`) and waits until
    /// `/readyz` says ready.
    fn start(model: &Path, options: &[&str]) -> Self {
        let weights = weights_dir();
        let mut child = Command::new(env!("CARGO_BIN_EXE_anomaly"))
            .args(["serve", "--model", model.to_str().unwrap(), "--listen", "127.0.0.1:0", "--device", "cpu", "--offline"])
            .args(["--weights-dir", weights.to_str().unwrap()])
            .args(options)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (said, address) = std::sync::mpsc::channel();
        let mut pipe = std::io::BufReader::new(child.stderr.take().unwrap());
        let gathered = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut line = String::new();
            while matches!(std::io::BufRead::read_line(&mut pipe, &mut line), Ok(n) if n > 0) {
                if let Some(rest) = line.strip_prefix("anomaly serve: http://") {
                    let _ = said.send(rest.split(' ').next().unwrap_or_default().parse::<SocketAddr>());
                }
                gathered.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let address = match address.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(address)) => address,
            outcome => {
                let _ = child.kill();
                panic!("no address printed ({outcome:?}): {}", log.lock().unwrap());
            }
        };
        let served = Self { child, address, log };
        let deadline = Instant::now() + Duration::from_secs(120);
        while answer(served.address, &get("/readyz")).status != 200 {
            assert!(Instant::now() < deadline, "not ready within 120 s: {}", served.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        served
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (at most 60 s) until the log says `needle`.
    fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < deadline, "the log never said {needle:?}: {log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, signal) }, 0);
    }

    /// Waits (at most 60 s) for the process to exit; its exit status.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the service did not exit within 60 s: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn model_id(&self) -> String {
        let reply = answer(self.address, &get("/v1/model"));
        assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
        serde_json::from_slice::<serde_json::Value>(&reply.body).unwrap()["id"].as_str().unwrap().to_string()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn json(reply: &RawReply) -> serde_json::Value {
    serde_json::from_slice(&reply.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&reply.body)))
}

#[test]
fn sigterm_under_load_answers_every_accepted_request_and_exits_cleanly() {
    let fitted = bank();
    let mut served = Served::start(&fitted.model, &["--max-batch", "4"]);
    let image = std::fs::read(&fitted.test_images()[0]).unwrap();
    let request = post("/v1/predict", Some("image/png"), &image);
    let address = served.address;
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let outcomes: Vec<Exchange> = std::thread::scope(|scope| {
        let senders: Vec<_> = (0..40)
            .map(|_| {
                scope.spawn(|| {
                    let outcome = exchange(address, &request).unwrap();
                    answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    outcome
                })
            })
            .collect();
        // Mid-way: once the first answers are back, most requests are queued or being scored.
        let deadline = Instant::now() + Duration::from_secs(60);
        while answered.load(std::sync::atomic::Ordering::SeqCst) < 4 {
            assert!(Instant::now() < deadline, "no answers within 60 s: {}", served.log());
            std::thread::sleep(Duration::from_millis(1));
        }
        served.signal(libc::SIGTERM);
        let at_signal = answered.load(std::sync::atomic::Ordering::SeqCst);
        assert!(at_signal < 40, "every request was answered before SIGTERM: nothing was in flight");
        eprintln!("SIGTERM under load: sent with {at_signal} of 40 requests answered");
        senders.into_iter().map(|sender| sender.join().unwrap()).collect()
    });
    let (mut scored, mut refused) = (0, 0);
    for outcome in &outcomes {
        match outcome {
            Exchange::Answered(reply) if reply.status == 200 => scored += 1,
            Exchange::Answered(reply) if reply.status == 503 => {
                assert_eq!(reply.header("retry-after"), Some("1"));
                assert!(reply.error_line().unwrap().contains("shutting down"), "{reply:?}");
                refused += 1;
            }
            other => panic!("a request sent before SIGTERM was lost: {other:?}\n{}", served.log()),
        }
    }
    assert!(scored > 4, "{scored} scored, {refused} refused");
    // After SIGTERM: an answer (200 before the drain begins, 503 after), or no connection once the
    // listener is closed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match exchange(address, &request).unwrap() {
            Exchange::Answered(reply) => {
                assert!(reply.status == 200 || (reply.status == 503 && reply.header("retry-after") == Some("1")), "{reply:?}");
            }
            Exchange::Closed(how) if how.starts_with("connect:") => break,
            Exchange::Closed(how) => panic!("a request sent while draining was dropped unanswered: {how}"),
        }
        assert!(Instant::now() < deadline, "still accepting connections 30 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = served.wait_exit();
    let log = served.log();
    assert!(status.success(), "{status}: {log}");
    assert!(
        log.contains("SIGTERM: finishing the accepted requests") && log.contains("stopped: every accepted request was answered"),
        "{log}"
    );
    eprintln!("SIGTERM under load: {scored} scored, {refused} refused with 503, of 40");
}

#[test]
fn sighup_refuses_a_garbage_model_file_and_swaps_a_good_one_in() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    std::fs::copy(&bank().model, &model).unwrap();
    let served = Served::start(&model, &[]);
    let first = served.model_id();
    let image = std::fs::read(&bank().test_images()[0]).unwrap();

    std::fs::write(&model, b"garbage, not a model").unwrap();
    served.signal(libc::SIGHUP);
    let log = served.wait_log("SIGHUP: reload refused");
    assert!(log.contains(&format!("model {} keeps serving", &first[..12])), "{log}");
    assert_eq!(served.model_id(), first);
    let reply = answer(served.address, &post("/v1/predict", Some("image/png"), &image));
    assert_eq!((reply.status, json(&reply)["model"].as_str().unwrap()), (200, first.as_str()));

    std::fs::copy(&other_bank().model, &model).unwrap();
    served.signal(libc::SIGHUP);
    let log = served.wait_log("SIGHUP: reloaded");
    let second = served.model_id();
    assert_ne!(second, first);
    assert!(log.contains(&format!("SIGHUP: reloaded {}: model {} (was {})", model.display(), &second[..12], &first[..12])), "{log}");
    let reply = answer(served.address, &post("/v1/predict", Some("image/png"), &image));
    assert_eq!((reply.status, json(&reply)["model"].as_str().unwrap()), (200, second.as_str()));
    let metrics = wait_idle(served.address);
    assert!(metrics.contains("anomaly_model_reloads_total{result=\"refused\"} 1"), "{metrics}");
    assert!(metrics.contains("anomaly_model_reloads_total{result=\"ok\"} 1"), "{metrics}");
}

/// A noisy PNG: large to send, and its overlay is large to answer.
fn noisy_png(side: u32) -> Vec<u8> {
    let mut rng = crate::common::Rng::new(u64::from(side));
    let image = image::RgbImage::from_fn(side, side, |_, _| {
        let v = rng.next_u64();
        image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
    });
    let mut bytes = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    bytes
}

#[test]
fn clients_that_leave_mid_upload_or_mid_answer_cost_only_their_own_request() {
    let fitted = patchcore();
    let served = Served::start(&fitted.model, &[]);
    let address = served.address;
    let good = std::fs::read(&fitted.test_images()[0]).unwrap();
    let big = noisy_png(1200);
    for round in 0..3 {
        // Mid-upload: 1000 of the 100000 bytes announced, then gone.
        let mut stream = TcpStream::connect(address).unwrap();
        stream
            .write_all(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n")
            .unwrap();
        stream.write_all(&big[..1000]).unwrap();
        drop(stream);

        // Mid-answer: an overlay of several MB, of which a few bytes are read.
        let mut stream = TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(ANSWER_WITHIN)).unwrap();
        stream.write_all(&post("/v1/predict?overlay=png", Some("image/png"), &big)).unwrap();
        let mut first = [0u8; 16];
        stream.read_exact(&mut first).unwrap();
        assert!(first.starts_with(b"HTTP/1.1 200"), "round {round}: {:?}", String::from_utf8_lossy(&first));
        drop(stream);

        // Mid-answer of several images' JSON, before reading anything.
        let (content_type, body) = multipart(&[&good, &good, &good]);
        let mut stream = TcpStream::connect(address).unwrap();
        stream.write_all(&post("/v1/predict", Some(&content_type), &body)).unwrap();
        drop(stream);

        let reply = answer(address, &post("/v1/predict", Some("image/png"), &good));
        assert_eq!(reply.status, 200, "round {round}: {}", String::from_utf8_lossy(&reply.body));
        let overlay = answer(address, &post("/v1/predict?overlay=png", Some("image/png"), &good));
        assert_eq!((overlay.status, overlay.header("content-type")), (200, Some("image/png")));
    }
    assert_eq!(answer(address, &get("/healthz")).status, 200);
    let metrics = wait_idle(address);
    assert!(!metrics.contains("route=\"/v1/predict\",status=\"5"), "{metrics}");
}

/// A `multipart/form-data` body of `images` and its Content-Type.
pub(crate) fn multipart(images: &[&[u8]]) -> (String, Vec<u8>) {
    let boundary = "serve-faults-boundary";
    let mut body = Vec::new();
    for (i, image) in images.iter().enumerate() {
        let head = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{i}.png\"\r\nContent-Type: image/png\r\n\r\n"
        );
        body.extend_from_slice(head.as_bytes());
        body.extend_from_slice(image);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[test]
fn concurrent_requests_are_batched_and_give_the_scores_predict_gives() {
    let fitted = bank();
    let images: Vec<PathBuf> = fitted.test_images().into_iter().cycle().take(12).collect();
    let weights = weights_dir();
    let mut args = vec!["predict", "--model", fitted.model.to_str().unwrap(), "--json", "--device", "cpu", "--offline"];
    args.extend(["--weights-dir", weights.to_str().unwrap()]);
    args.extend(images.iter().map(|p| p.to_str().unwrap()));
    let output = anomaly(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let predicted: Vec<serde_json::Value> =
        String::from_utf8_lossy(&output.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(predicted.len(), 12);

    let served = Served::start(&fitted.model, &["--max-wait-ms", "200", "--max-batch", "16"]);
    let replies: Vec<RawReply> = std::thread::scope(|scope| {
        let senders: Vec<_> = images
            .iter()
            .map(|path| {
                let request = post("/v1/predict", Some("image/png"), &std::fs::read(path).unwrap());
                scope.spawn(move || answer(served.address, &request))
            })
            .collect();
        senders.into_iter().map(|sender| sender.join().unwrap()).collect()
    });
    let mut largest_batch = 0;
    for ((path, reply), expected) in images.iter().zip(&replies).zip(&predicted) {
        assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
        let served = json(reply);
        assert!(expected["path"].as_str().unwrap().ends_with(path.file_name().unwrap().to_str().unwrap()), "{expected}");
        assert_eq!(served["score"], expected["score"], "{}: served {served} but predict said {expected}", path.display());
        assert_eq!(served["anomalous"], expected["anomalous"], "{}", path.display());
        largest_batch = largest_batch.max(served["batch_size"].as_u64().unwrap());
    }
    assert!(largest_batch > 1, "12 concurrent requests within 200 ms were scored one at a time");
    wait_idle(served.address);
}

#[test]
fn sigterm_is_not_held_up_by_a_client_stalled_mid_head() {
    let mut served = Served::start(&bank().model, &["--request-timeout-s", "2"]);
    let mut stalled = TcpStream::connect(served.address).unwrap();
    stalled.write_all(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    served.signal(libc::SIGTERM);
    let status = served.wait_exit();
    assert!(status.success(), "{status}: {}", served.log());
    assert!(started.elapsed() < Duration::from_secs(10), "the shutdown waited {:?} for a client that sends nothing", started.elapsed());
    drop(stalled);
}
