//! The service over real loopback HTTP, with a stand-in model whose scorer the tests steer (hold a batch,
//! fail one): every status code, batching, backpressure, reload, authentication and graceful shutdown.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anomaly_data::{Batch, Preprocess};
use anomaly_detector::ScoreStats;
use anomaly_method::{Detector, Embedding, ImageOutput, MethodName, Scorer};

use super::*;

/// What the tests steer the stand-in scorer by, and what it saw.
#[derive(Default)]
struct Control {
    /// While true, a batch waits in the scorer (the service is busy).
    hold: Mutex<bool>,
    released: Condvar,
    /// The next batch fails, as a lost device would.
    fail_next: AtomicBool,
    /// Batches that reached the scorer (the warm-up included), and their sizes.
    batches: Mutex<Vec<usize>>,
    entered: AtomicUsize,
}

impl Control {
    fn hold(&self) {
        *self.hold.lock().unwrap() = true;
    }

    fn release(&self) {
        *self.hold.lock().unwrap() = false;
        self.released.notify_all();
    }

    /// Waits until `count` batches have reached the scorer.
    fn wait_entered(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.entered.load(Ordering::SeqCst) < count {
            assert!(Instant::now() < deadline, "no batch reached the scorer");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A model that scores an image by the mean of its first channel, maps every pixel with that score,
/// and has threshold 0.
struct StandIn {
    preprocess: Preprocess,
    stats: ScoreStats,
    control: Arc<Control>,
    localises: bool,
}

impl Detector for StandIn {
    fn method(&self) -> MethodName {
        if self.localises { MethodName::Patchcore } else { MethodName::MemoryBank }
    }
    fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }
    fn threshold(&self) -> f32 {
        0.0
    }
    fn threshold_rule(&self) -> &'static str {
        "stand-in"
    }
    fn pixel_threshold(&self) -> Option<f32> {
        self.localises.then_some(0.0)
    }
    fn train_scores(&self) -> &ScoreStats {
        &self.stats
    }
    fn title(&self) -> String {
        "stand-in".into()
    }
    fn describe(&self) -> String {
        "stand-in".into()
    }
    fn embedding_name(&self) -> &'static str {
        "nothing"
    }
    fn report_fields(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    fn info(&self) -> serde_json::Value {
        serde_json::json!({"stand_in": true})
    }
    fn train_embedding(&self) -> Option<Embedding<'_>> {
        None
    }
    fn device(&self) -> String {
        "test".into()
    }
    fn scorer(&self) -> anyhow::Result<Box<dyn Scorer + '_>> {
        Ok(Box::new(StandInScorer { model: self }))
    }
    fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        Ok(Vec::new())
    }
}

struct StandInScorer<'a> {
    model: &'a StandIn,
}

impl Scorer for StandInScorer<'_> {
    fn score(&mut self, batch: &Batch) -> anyhow::Result<Vec<ImageOutput>> {
        let control = &self.model.control;
        control.entered.fetch_add(1, Ordering::SeqCst);
        let mut held = control.hold.lock().unwrap();
        while *held {
            held = control.released.wait(held).unwrap();
        }
        drop(held);
        control.batches.lock().unwrap().push(batch.len());
        anyhow::ensure!(!control.fail_next.swap(false, Ordering::SeqCst), "the device was lost");
        let plane = (self.model.preprocess.crop * self.model.preprocess.crop) as usize;
        Ok(batch
            .pixels
            .chunks_exact(3 * plane)
            .map(|pixels| {
                let score = expected_score(pixels, plane);
                ImageOutput { score, embedding: vec![score], map: self.model.localises.then(|| vec![score; plane]), reconstruction: None }
            })
            .collect())
    }
}

fn expected_score(pixels: &[f32], plane: usize) -> f32 {
    pixels[..plane].iter().sum::<f32>() / plane as f32
}

/// A memory-bank model file that passes the device-free checks (the stand-in ignores its content);
/// `seed` makes files of different ids.
fn model_file(dir: &Path, name: &str, seed: usize) -> std::path::PathBuf {
    use anomaly_detector::{Compute, DetectorConfig, FeatureSource, MemoryBank, Model};
    let dim = anomaly_backbone::BackboneName::EfficientNetLite0.feature_dim();
    let features: Vec<f32> = (0..6 * dim).map(|i| (((i + seed) * 7919) % 1013) as f32 / 1013.0).collect();
    let bank = MemoryBank::fit(&features, dim, DetectorConfig { k: 2, features: 20 }, &Compute::Cpu).unwrap();
    let source = FeatureSource {
        backbone: "efficientnet-lite0".into(),
        weights_file: "efficientnet-lite0.pth".into(),
        weights_sha256: "ab".repeat(32),
        preprocess: anomaly_backbone::BackboneName::EfficientNetLite0.preprocess(),
        dataset: "unit".into(),
    };
    let path = dir.join(name);
    std::fs::write(&path, Model::new(bank, source).to_bytes()).unwrap();
    path
}

/// Small inputs keep the tests fast.
fn small_preprocess() -> Preprocess {
    Preprocess { resize: 16, crop: 16, ..Preprocess::imagenet() }
}

struct Fixture {
    service: Option<RunningService>,
    control: Arc<Control>,
    dir: tempfile::TempDir,
    agent: ureq::Agent,
}

impl Fixture {
    fn start(localises: bool, configure: impl FnOnce(&mut ServeConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServeConfig::new(model_file(dir.path(), "model.safetensors", 0), "127.0.0.1:0".parse().unwrap());
        configure(&mut config);
        let control = Arc::new(Control::default());
        let shared = Arc::clone(&control);
        let start: StartLoader = Box::new(move || {
            let load: LoadModel = Box::new(move |bytes: &FileBytes, _: &Path| {
                anyhow::ensure!(!bytes.is_empty(), "empty model");
                Ok(Box::new(StandIn {
                    preprocess: small_preprocess(),
                    stats: ScoreStats::of(&[0.0]),
                    control: Arc::clone(&shared),
                    localises,
                }) as Box<dyn Detector>)
            });
            Ok(load)
        });
        let service = RunningService::start(config, start).unwrap();
        service.wait_ready(Duration::from_secs(10)).unwrap();
        let agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(20))).build().into();
        Self { service: Some(service), control, dir, agent }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.service.as_ref().unwrap().address())
    }

    fn post(&self, path: &str, content_type: &str, body: &[u8]) -> Reply {
        Reply::from(self.agent.post(&self.url(path)).header("Content-Type", content_type).send(body).unwrap())
    }

    fn get(&self, path: &str) -> Reply {
        Reply::from(self.agent.get(&self.url(path)).call().unwrap())
    }
}

/// A response read whole.
struct Reply {
    status: u16,
    headers: ureq::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn from(mut response: ureq::http::Response<ureq::Body>) -> Self {
        let body = response.body_mut().with_config().limit(64 << 20).read_to_vec().unwrap();
        Self { status: response.status().as_u16(), headers: response.headers().clone(), body }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap().to_string()
    }
}

/// A PNG of `width × height` filled with `shade`.
fn png(width: u32, height: u32, shade: u8) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([shade, (x % 256) as u8, (y % 256) as u8]));
    let mut bytes = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    bytes
}

/// The stand-in's score of a PNG, computed without the service.
fn score_of(png_bytes: &[u8]) -> f32 {
    let image = image::load_from_memory(png_bytes).unwrap().to_rgb8();
    let pixels = small_preprocess().apply(&image, &anomaly_data::ImageLimits::default()).unwrap().pixels;
    expected_score(&pixels, 16 * 16)
}

fn multipart(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "anomaly-test-boundary";
    let mut body = Vec::new();
    for (name, bytes) in parts {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[test]
fn concurrent_requests_are_scored_together_with_the_scores_of_one_at_a_time() {
    let fixture = Arc::new(Fixture::start(false, |c| {
        c.max_batch = 8;
        c.max_wait = Duration::from_millis(200);
    }));
    let images: Vec<Vec<u8>> = (0..8).map(|i| png(40 + i, 30, (i * 30) as u8)).collect();
    let replies: Vec<Reply> = std::thread::scope(|scope| {
        let handles: Vec<_> = images.iter().map(|image| scope.spawn(|| fixture.post("/v1/predict", "image/png", image))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut largest_batch = 0;
    for (image, reply) in images.iter().zip(&replies) {
        assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
        let json = reply.json();
        assert_eq!(json["score"].as_f64().unwrap() as f32, score_of(image));
        assert_eq!(json["verdict"], if score_of(image) > 0.0 { "anomalous" } else { "good" });
        assert_eq!(json["model"].as_str().unwrap().len(), 64);
        assert_eq!(json["width"], image::load_from_memory(image).unwrap().width());
        assert!(json["timings_ms"]["total"].as_f64().unwrap() >= json["timings_ms"]["score"].as_f64().unwrap());
        assert!(json.get("bbox").is_none(), "a model without maps gives no box");
        largest_batch = largest_batch.max(json["batch_size"].as_u64().unwrap());
    }
    assert!(largest_batch > 1, "8 concurrent requests within 200 ms were scored one at a time");
    let batches = fixture.control.batches.lock().unwrap().clone();
    assert_eq!(batches.iter().sum::<usize>(), 1 + 8, "the warm-up image and the 8: {batches:?}");
    let metrics = String::from_utf8(fixture.get("/metrics").body).unwrap();
    assert!(metrics.contains("anomaly_http_responses_total{route=\"/v1/predict\",status=\"200\"} 8"), "{metrics}");
    assert!(
        metrics.contains(&format!("anomaly_batch_size_count {}", batches.len() - 1))
            && metrics.contains("anomaly_batch_size_sum 8")
            && metrics.contains("anomaly_predict_duration_seconds_count 8"),
        "{metrics}"
    );
    assert!(metrics.contains("anomaly_queue_depth 0") && metrics.contains("anomaly_ready 1"), "{metrics}");
}

#[test]
fn multipart_uploads_are_answered_per_image_and_maps_give_boxes_and_overlays() {
    let fixture = Fixture::start(true, |_| {});
    let (a, b) = (png(20, 20, 250), png(30, 20, 200));
    let (content_type, body) = multipart(&[("a.png", &a), ("b.png", &b)]);
    let reply = fixture.post("/v1/predict", &content_type, &body);
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    let images = reply.json()["images"].as_array().unwrap().clone();
    assert_eq!(images.len(), 2);
    for (json, (name, bytes)) in images.iter().zip([("a.png", &a), ("b.png", &b)]) {
        assert_eq!(json["name"], name);
        assert_eq!(json["score"].as_f64().unwrap() as f32, score_of(bytes));
        assert_eq!(json["map_max"].as_f64().unwrap() as f32, score_of(bytes));
        assert_eq!(json["pixel_threshold"], 0.0);
    }
    // Every pixel of the bright image is above the pixel threshold 0: the box is the whole image.
    assert!(score_of(&a) > 0.0);
    assert_eq!(images[0]["bbox"], serde_json::json!({"x": 0, "y": 0, "width": 20, "height": 20}));

    let overlay = fixture.post("/v1/predict?overlay=png", "image/png", &a);
    assert_eq!(overlay.status, 200);
    assert_eq!(overlay.headers["content-type"], "image/png");
    assert_eq!(overlay.headers["x-anomaly-verdict"], "anomalous");
    let picture = image::load_from_memory(&overlay.body).unwrap();
    assert_eq!((picture.width(), picture.height()), (20, 20));
}

#[test]
fn each_bad_request_gets_its_own_status_and_one_line() {
    let fixture = Fixture::start(false, |c| {
        c.max_body_bytes = 65536;
        c.image_limits = anomaly_data::ImageLimits::new(10_000);
    });
    let cases: Vec<(Reply, u16, &str)> = vec![
        (fixture.post("/v1/predict", "image/png", b""), 400, "the body is empty"),
        (fixture.post("/v1/predict", "text/plain", b"hello"), 415, "is not an image"),
        (fixture.post("/v1/predict", "image/png", &vec![0u8; 70000]), 413, "larger than this service's limit of 65536 bytes"),
        (fixture.post("/v1/predict", "image/png", b"not an image at all"), 422, "upload: cannot decode image"),
        (fixture.post("/v1/predict", "image/png", &png(200, 60, 1)), 422, "more than the limit of 10000"),
        (fixture.post("/v1/predict", "image/png", &png(4, 2500, 1)), 422, "crop it to a sensible aspect ratio"),
        (fixture.post("/v1/predict?overlay=png", "image/png", &png(8, 8, 1)), 400, "gives no anomaly map"),
        (fixture.post("/v1/predict?size=2", "image/png", &png(8, 8, 1)), 400, "unknown query parameter size"),
        (fixture.post("/v1/predict", "multipart/form-data", b"x"), 400, "without a usable boundary"),
        (fixture.post("/v1/predict", "multipart/form-data; boundary=zz", b"--zz\r\nbroken"), 400, "malformed multipart"),
        (fixture.post("/v1/predict", "multipart/form-data; boundary=zz", b"--zz--\r\n"), 400, "holds no part"),
        (fixture.get("/v1/nothing"), 404, "no such route"),
    ];
    for (reply, status, says) in cases {
        assert_eq!(reply.status, status, "{}", String::from_utf8_lossy(&reply.body));
        let error = reply.error();
        assert!(error.contains(says) && !error.contains('\n'), "{status}: {error}");
    }
    assert_eq!(fixture.get("/v1/predict").status, 405);
    // The service still scores after all that.
    assert_eq!(fixture.post("/v1/predict", "image/png", &png(8, 8, 1)).status, 200);
}

#[test]
fn a_token_guards_every_route_but_the_page_and_healthz() {
    let fixture = Fixture::start(false, |c| c.token = Some("s3cret-token".into()));
    assert_eq!(fixture.get("/").status, 200);
    assert_eq!(fixture.get("/healthz").status, 200);
    for path in ["/v1/model", "/readyz", "/metrics"] {
        let reply = fixture.get(path);
        assert_eq!(reply.status, 401, "{path}");
        assert_eq!(reply.headers["www-authenticate"], "Bearer");
        assert!(reply.error().contains("needs a bearer token"));
    }
    assert_eq!(fixture.post("/v1/predict", "image/png", &png(8, 8, 1)).status, 401);
    assert_eq!(fixture.post("/v1/reload", "text/plain", b"").status, 401);
    let with = |token: &str| {
        let request = fixture.agent.get(&fixture.url("/v1/model")).header("Authorization", &format!("Bearer {token}"));
        Reply::from(request.call().unwrap())
    };
    let wrong = with("s3cret-tokeN");
    assert_eq!(wrong.status, 401);
    assert!(wrong.error().contains("the bearer token is wrong"));
    let right = with("s3cret-token");
    assert_eq!(right.status, 200);
    assert_eq!(right.json()["method"], "memory-bank");
}

/// A service with a queue of one place, taken by a request held in the scorer (release it with
/// `control.release()`; the thread answers that request).
fn queue_of_one_held_busy() -> (Arc<Fixture>, std::thread::JoinHandle<Reply>) {
    let fixture = Arc::new(Fixture::start(false, |c| c.queue = 1));
    fixture.control.hold();
    let busy = {
        let fixture = Arc::clone(&fixture);
        std::thread::spawn(move || fixture.post("/v1/predict", "image/png", &png(8, 8, 9)))
    };
    fixture.control.wait_entered(2);
    (fixture, busy)
}

#[test]
fn a_full_queue_answers_503_with_retry_after_and_the_admitted_request_is_answered() {
    let (fixture, busy) = queue_of_one_held_busy();
    let refused = fixture.post("/v1/predict", "image/png", &png(8, 8, 9));
    assert_eq!(refused.status, 503);
    assert_eq!(refused.headers["retry-after"], "1");
    assert!(refused.error().contains("the queue is full (1 requests)"));
    let metrics = String::from_utf8(fixture.get("/metrics").body).unwrap();
    assert!(metrics.contains("anomaly_requests_in_flight 1"), "{metrics}");
    fixture.control.release();
    assert_eq!(busy.join().unwrap().status, 200);
}

#[test]
fn an_upload_refused_for_a_full_queue_gets_its_503_not_a_reset() {
    let (fixture, busy) = queue_of_one_held_busy();
    // Refused before it is read, a large body left unread would reset the connection under the 503.
    let large = vec![7u8; 8 << 20];
    for _ in 0..3 {
        let sent = fixture.agent.post(&fixture.url("/v1/predict")).header("Content-Type", "application/octet-stream").send(&large[..]);
        let refused = Reply::from(sent.unwrap_or_else(|e| panic!("the client got no answer: {e}")));
        assert_eq!(refused.status, 503);
        assert_eq!(refused.headers["retry-after"], "1");
    }
    fixture.control.release();
    assert_eq!(busy.join().unwrap().status, 200);
}

#[test]
fn a_multipart_upload_of_more_images_than_the_queue_admits_is_refused_for_good_not_told_to_retry() {
    let fixture = Fixture::start(false, |c| c.queue = 2);
    let image = png(8, 8, 9);
    let (content_type, body) = multipart(&[("a.png", &image), ("b.png", &image), ("c.png", &image)]);
    let refused = fixture.post("/v1/predict", &content_type, &body);
    assert_eq!(refused.status, 413);
    assert!(refused.headers.get("retry-after").is_none());
    assert!(refused.error().contains("3 images in one request, more than this service admits at once (2, --queue)"), "{}", refused.error());
    let (content_type, body) = multipart(&[("a.png", &image), ("b.png", &image)]);
    assert_eq!(fixture.post("/v1/predict", &content_type, &body).status, 200);
}

#[test]
fn a_request_not_scored_in_time_gets_503_and_its_image_is_dropped() {
    let fixture = Arc::new(Fixture::start(false, |c| c.request_timeout = Duration::from_millis(300)));
    fixture.control.hold();
    let late = fixture.post("/v1/predict", "image/png", &png(8, 8, 9));
    assert_eq!(late.status, 503);
    assert!(late.error().contains("not scored within the request timeout"));
    fixture.control.release();
    assert_eq!(fixture.post("/v1/predict", "image/png", &png(8, 8, 9)).status, 200);
}

#[test]
fn a_failed_batch_gets_500_and_the_service_keeps_serving() {
    let fixture = Fixture::start(false, |_| {});
    fixture.control.fail_next.store(true, Ordering::SeqCst);
    let failed = fixture.post("/v1/predict", "image/png", &png(8, 8, 9));
    assert_eq!(failed.status, 500);
    assert!(failed.error().contains("scoring failed: the device was lost"), "{}", failed.error());
    assert_eq!(fixture.post("/v1/predict", "image/png", &png(8, 8, 9)).status, 200);
    let metrics = String::from_utf8(fixture.get("/metrics").body).unwrap();
    assert!(metrics.contains("anomaly_scoring_failures_total 1"), "{metrics}");
}

#[test]
fn reload_swaps_a_good_file_in_and_refuses_a_bad_one() {
    let fixture = Fixture::start(false, |_| {});
    let first = fixture.get("/v1/model").json()["id"].as_str().unwrap().to_string();
    let path = fixture.dir.path().join("model.safetensors");
    std::fs::write(&path, b"not a model").unwrap();
    let refused = fixture.post("/v1/reload", "text/plain", b"");
    assert_eq!(refused.status, 422);
    assert!(refused.error().contains("keeps serving"), "{}", refused.error());
    assert_eq!(fixture.get("/v1/model").json()["id"], first.as_str());
    assert_eq!(fixture.post("/v1/predict", "image/png", &png(8, 8, 9)).status, 200);

    model_file(fixture.dir.path(), "model.safetensors", 1);
    let swapped = fixture.post("/v1/reload", "text/plain", b"");
    assert_eq!(swapped.status, 200, "{}", String::from_utf8_lossy(&swapped.body));
    let second = swapped.json()["model"]["id"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    assert_eq!(swapped.json()["previous"], &first[..12]);
    assert_eq!(fixture.get("/v1/model").json()["id"], second.as_str());
    assert_eq!(fixture.post("/v1/predict", "image/png", &png(8, 8, 9)).json()["model"], second.as_str());
    let metrics = String::from_utf8(fixture.get("/metrics").body).unwrap();
    assert!(metrics.contains("anomaly_model_reloads_total{result=\"refused\"} 1"), "{metrics}");
    assert!(metrics.contains("anomaly_model_reloads_total{result=\"ok\"} 1"), "{metrics}");
}

#[test]
fn shutdown_answers_the_accepted_request_and_refuses_new_ones() {
    let mut fixture = Fixture::start(false, |_| {});
    fixture.control.hold();
    let address = fixture.service.as_ref().unwrap().address();
    let accepted = {
        let (agent, url) = (fixture.agent.clone(), fixture.url("/v1/predict"));
        std::thread::spawn(move || Reply::from(agent.post(&url).header("Content-Type", "image/png").send(&png(8, 8, 9)[..]).unwrap()))
    };
    fixture.control.wait_entered(2);
    let service = fixture.service.take().unwrap();
    let stopping = std::thread::spawn(move || service.shutdown());
    // Until the shutdown has begun, a new prediction would be admitted and queue behind the held one, which
    // is released only after this loop: so first wait for /readyz (answered without the scorer) to say so.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fixture.agent.get(&format!("http://{address}/readyz")).call().map(Reply::from) {
            Ok(reply) if reply.status == 503 => break,
            Ok(_) => std::thread::sleep(Duration::from_millis(1)),
            Err(_) => break,
        }
        assert!(Instant::now() < deadline, "the shutdown did not begin");
    }
    // New connections are refused once the listener closes; until then new requests get 503.
    loop {
        match fixture.agent.post(&format!("http://{address}/v1/predict")).send(&png(8, 8, 9)[..]) {
            Ok(response) => {
                let reply = Reply::from(response);
                if reply.status == 503 {
                    assert!(reply.error().contains("shutting down"));
                    break;
                }
            }
            Err(_) => break,
        }
        assert!(Instant::now() < deadline, "new requests were still accepted while shutting down");
    }
    fixture.control.release();
    assert_eq!(accepted.join().unwrap().status, 200, "the accepted request was lost");
    stopping.join().unwrap();
}

/// A connection that has sent part of a request's head, and stops there.
fn stalled_head(address: std::net::SocketAddr) -> std::net::TcpStream {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.write_all(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le").unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream
}

#[test]
fn a_stalled_head_is_cut_off_and_neither_it_nor_an_unread_answer_holds_the_shutdown() {
    use std::io::{Read, Write};
    let mut fixture = Fixture::start(true, |c| c.request_timeout = Duration::from_millis(500));
    let address = fixture.service.as_ref().unwrap().address();
    let started = Instant::now();
    let mut answer = Vec::new();
    // The connection ends (with hyper's 408, or closed) once the request timeout has passed.
    let _ = stalled_head(address).read_to_end(&mut answer);
    assert!(started.elapsed() < Duration::from_secs(5), "a stalled head held its connection for {:?}", started.elapsed());
    assert!(answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(fixture.post("/v1/predict", "image/png", &png(8, 8, 9)).status, 200);

    // A client that asks for a large overlay and never reads it, and another stalled mid-head.
    let noisy = {
        let mut rng = 0x2545_F491_u64;
        let image = image::RgbImage::from_fn(1500, 1500, |_, _| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            image::Rgb([rng as u8, (rng >> 8) as u8, (rng >> 16) as u8])
        });
        let mut bytes = Vec::new();
        image.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
        bytes
    };
    let mut unread = std::net::TcpStream::connect(address).unwrap();
    let head = format!(
        "POST /v1/predict?overlay=png HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n",
        noisy.len()
    );
    unread.write_all(&[head.as_bytes(), &noisy].concat()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8(fixture.get("/metrics").body).unwrap().contains("route=\"/v1/predict\",status=\"200\"} 2") {
        assert!(Instant::now() < deadline, "the overlay was not answered");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _stalled = stalled_head(address);
    let started = Instant::now();
    fixture.service.take().unwrap().shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the shutdown waited {:?} for clients that send or read nothing",
        started.elapsed()
    );
    drop(unread);
}

#[test]
fn readiness_waits_for_the_model_and_a_bad_model_fails_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServeConfig::new(model_file(dir.path(), "m.safetensors", 0), "127.0.0.1:0".parse().unwrap());
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let opened = Arc::clone(&gate);
    let start: StartLoader = Box::new(move || {
        let (open, changed) = &*opened;
        let mut open = open.lock().unwrap();
        while !*open {
            open = changed.wait(open).unwrap();
        }
        anyhow::bail!("no such backbone on this machine")
    });
    let service = RunningService::start(config.clone(), start).unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let get = |path: &str| Reply::from(agent.get(&format!("http://{}{path}", service.address())).call().unwrap());
    assert_eq!(get("/healthz").status, 200);
    let loading = get("/readyz");
    assert_eq!(loading.status, 503);
    assert!(loading.json()["reason"].as_str().unwrap().contains("loading"));
    assert_eq!(get("/v1/model").status, 503);
    let early = Reply::from(
        agent
            .post(&format!("http://{}/v1/predict", service.address()))
            .header("Content-Type", "image/png")
            .send(&png(8, 8, 1)[..])
            .unwrap(),
    );
    assert_eq!((early.status, early.headers["retry-after"].to_str().unwrap()), (503, "1"));
    assert!(early.error().contains("still loading"), "{}", early.error());
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    let error = service.wait_ready(Duration::from_secs(10)).unwrap_err();
    assert!(error.to_string().contains("no such backbone"), "{error}");
    assert!(get("/readyz").json()["reason"].as_str().unwrap().contains("failed to load"));

    std::fs::write(&config.model, b"garbage").unwrap();
    let refused = RunningService::start(config, Box::new(|| anyhow::bail!("not reached"))).err().unwrap();
    assert!(format!("{refused:#}").contains("m.safetensors"), "{refused:#}");
}

#[test]
fn the_page_is_served_without_a_token() {
    let fixture = Fixture::start(false, |c| c.token = Some("t".into()));
    let page = fixture.get("/");
    assert_eq!(page.status, 200);
    assert!(page.headers["content-type"].to_str().unwrap().starts_with("text/html"));
    assert_eq!(String::from_utf8(page.body).unwrap(), PAGE);
}

/// A request answered with an error (or a refusal) before its body was read whole: its connection either
/// carries the client's next request or the answer says `Connection: close`, so that a client keeping
/// connections alive never sends its next request on one the server is closing (where it was lost, now
/// and then, under load: "peer disconnected").
#[test]
fn a_connection_answered_before_its_body_was_read_carries_the_next_request_or_says_it_closes() {
    use std::io::{BufRead, BufReader, Read, Write};
    let fixture = Fixture::start(false, |c| c.max_body_bytes = 65536);
    let address = fixture.service.as_ref().unwrap().address();
    let cases: [(&str, &str, usize, &str); 6] = [
        ("/v1/predict", "image/png", 70_000, "413"),
        ("/v1/predict", "image/png", 300_000, "413"),
        ("/v1/predict?size=2", "image/png", 60_000, "400"),
        ("/v1/predict", "text/plain", 60_000, "415"),
        ("/v1/predict?overlay=png", "image/png", 60_000, "400"),
        ("/v1/predict", "text/plain", 200_000, "415"),
    ];
    for (path, content_type, size, status) in cases {
        let what = format!("{path} {content_type}, {size} bytes");
        let stream = std::net::TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let sending = std::thread::spawn(move || {
            let head = format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {size}\r\n\r\n");
            // The server may stop reading past its limit: then the rest fails to send, as it should.
            let _ = writer.write_all(head.as_bytes()).and_then(|()| writer.write_all(&vec![0u8; size]));
            writer
        });
        let mut reader = BufReader::new(stream);
        let (mut status_line, mut closes, mut length) = (String::new(), false, 0);
        reader.read_line(&mut status_line).unwrap();
        assert_eq!(&status_line[9..12], status, "{what}: {status_line}");
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let line = line.trim_end().to_ascii_lowercase();
            if line.is_empty() {
                break;
            }
            closes |= line == "connection: close";
            length = line.strip_prefix("content-length: ").map_or(length, |v| v.parse().unwrap());
        }
        reader.read_exact(&mut vec![0u8; length]).unwrap();
        let mut writer = sending.join().unwrap();
        if closes {
            continue;
        }
        writer.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut next = String::new();
        reader.read_line(&mut next).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(next.starts_with("HTTP/1.1 200"), "{what}: the connection did not carry the next request ({next:?})");
    }
}
