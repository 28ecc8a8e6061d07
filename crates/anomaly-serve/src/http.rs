//! The routes, the shared state they read, admission, authentication and graceful shutdown.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anomaly_data::{DataError, ImageLimits, Preprocess};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State as Shared};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use image::RgbImage;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, oneshot, watch};

use crate::ServeConfig;
use crate::metrics::{Gauges, Metrics};
use crate::worker::{Job, ModelFile, ModelSummary, Outcome, Scored, Work};

/// The web page at `/`: drop an image, see its score, verdict and heat map (plain HTML and JS, no build
/// step, nothing fetched from elsewhere).
pub const PAGE: &str = include_str!("index.html");

/// How far the model's loading got.
#[derive(Clone, Debug)]
enum Start {
    Loading,
    Ready,
    Failed(String),
}

/// What the handlers, the scoring thread and the signal loop share.
pub(crate) struct State {
    config: ServeConfig,
    token_digest: Option<[u8; 32]>,
    jobs: Mutex<Option<Sender<Work>>>,
    /// One place per admitted request (more for a multipart upload of several images).
    admission: Arc<Semaphore>,
    model: RwLock<Option<Arc<ModelSummary>>>,
    start: watch::Sender<Start>,
    draining: watch::Sender<bool>,
    queued: AtomicUsize,
    reloading: tokio::sync::Mutex<()>,
    pub metrics: Metrics,
}

impl State {
    pub(crate) fn new(config: ServeConfig, jobs: Sender<Work>) -> Self {
        Self {
            token_digest: config.token.as_deref().map(digest),
            admission: Arc::new(Semaphore::new(config.queue)),
            config,
            jobs: Mutex::new(Some(jobs)),
            model: RwLock::new(None),
            start: watch::Sender::new(Start::Loading),
            draining: watch::Sender::new(false),
            queued: AtomicUsize::new(0),
            reloading: tokio::sync::Mutex::new(()),
            metrics: Metrics::new(),
        }
    }

    pub(crate) fn max_batch(&self) -> usize {
        self.config.max_batch
    }

    pub(crate) fn max_wait(&self) -> Duration {
        self.config.max_wait
    }

    pub(crate) fn set_model(&self, summary: Arc<ModelSummary>) {
        *self.model.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(summary);
    }

    fn model(&self) -> Option<Arc<ModelSummary>> {
        self.model.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub(crate) fn mark_ready(&self) {
        self.start.send_replace(Start::Ready);
    }

    pub(crate) fn fail_start(&self, reason: String) {
        self.start.send_replace(Start::Failed(reason));
    }

    fn is_ready(&self) -> bool {
        matches!(*self.start.borrow(), Start::Ready) && !self.is_draining()
    }

    fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// New requests get 503 from now on, and the listener closes once the accepted ones are answered.
    pub(crate) fn begin_draining(&self) {
        self.draining.send_replace(true);
    }

    /// Tells the scoring thread to stop once it has scored what is queued (once: the sender is taken).
    pub(crate) fn stop_worker(&self) {
        if let Some(jobs) = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            let _ = jobs.send(Work::Stop);
        }
    }

    /// One image taken off the queue by the scoring thread.
    pub(crate) fn dequeued(&self) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
    }

    fn send(&self, work: Work) -> Result<(), ApiError> {
        let jobs = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let queued = matches!(work, Work::Score(_));
        if queued {
            self.queued.fetch_add(1, Ordering::Relaxed);
        }
        let sent = jobs.as_ref().is_some_and(|jobs| jobs.send(work).is_ok());
        if !sent {
            if queued {
                self.queued.fetch_sub(1, Ordering::Relaxed);
            }
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the scoring thread has stopped; the service is shutting down"));
        }
        Ok(())
    }

    /// Blocks until the model is ready (`Ok`) or failed to load, at most `timeout`.
    pub(crate) fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match &*self.start.borrow() {
                Start::Ready => return Ok(()),
                Start::Failed(reason) => anyhow::bail!("{reason}"),
                Start::Loading => {}
            }
            anyhow::ensure!(Instant::now() < deadline, "the model did not load within {timeout:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn gauges(&self) -> Gauges {
        Gauges {
            queue_depth: self.queued.load(Ordering::Relaxed),
            in_flight: self.config.queue - self.admission.available_permits(),
            ready: self.is_ready(),
        }
    }
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// Serves until the state starts draining, then until every accepted request is answered.
///
/// Each connection has `request_timeout` to send a request's head (hyper's header timeout, which
/// axum::serve leaves without a timer), so a client that stalls mid-head (slowloris) or idles between
/// requests neither holds its connection for ever nor delays a shutdown. Once draining, a connection gets
/// `request_timeout` more to finish (every request it had admitted is answered within that), so that a
/// client that never reads its answer cannot hold the shutdown either.
pub(crate) async fn serve(listener: tokio::net::TcpListener, state: Arc<State>) -> std::io::Result<()> {
    let service = hyper_util::service::TowerToHyperService::new(router(Arc::clone(&state)));
    let grace = state.config.request_timeout;
    let mut draining = state.draining.subscribe();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            () = draining_begins(&mut draining) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // A connection reset before it was accepted is its client's business; running out of
                // file descriptors passes once connections close.
                Err(error) if matches!(error.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset) => continue,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (service, mut draining) = (service.clone(), state.draining.subscribe());
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(grace);
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                () = draining_begins(&mut draining) => connection.as_mut().graceful_shutdown(),
            }
            let _ = tokio::time::timeout(grace, connection).await;
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Returns once the service drains (at once if it already does).
async fn draining_begins(draining: &mut watch::Receiver<bool>) {
    // An error means the state is gone, which drains everything too.
    let _ = draining.wait_for(|&d| d).await;
}

/// Waits for a signal: `SIGHUP` reloads the model, `SIGTERM` or `SIGINT` return (the caller then drains).
/// Returns the error when the model fails to load at start.
pub(crate) async fn until_signal(state: Arc<State>, log: impl Fn(&str)) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut start = state.start.subscribe();
    // The model may have loaded (or failed) before this loop started.
    start.mark_changed();
    let mut announced = false;
    loop {
        tokio::select! {
            _ = hangup.recv() => match reload(&state).await {
                Ok((model, previous)) => log(&format!("SIGHUP: reloaded {}: model {} (was {previous})", model.path.display(), short(&model.id))),
                Err(error) => log(&format!("SIGHUP: reload refused: {}", error.message)),
            },
            _ = terminate.recv() => {
                log("SIGTERM: finishing the accepted requests, refusing new ones");
                return Ok(());
            }
            _ = interrupt.recv() => {
                log("SIGINT: finishing the accepted requests, refusing new ones");
                return Ok(());
            }
            changed = start.changed(), if !announced => {
                let status = start.borrow_and_update().clone();
                match status {
                    Start::Failed(reason) => anyhow::bail!("{reason}"),
                    Start::Ready => {
                        announced = true;
                        if let Some(model) = state.model() {
                            log(&format!("ready: {} (model {}) on {}", model.title, short(&model.id), model.device));
                        }
                    }
                    Start::Loading if changed.is_err() => anyhow::bail!("the scoring thread stopped"),
                    Start::Loading => {}
                }
            }
        }
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn previous_id(state: &State) -> String {
    state.model().map_or_else(|| "none".into(), |m| short(&m.id).to_string())
}

/// The routes: `/` and `/healthz` open, the rest behind the token when there is one.
fn router(state: Arc<State>) -> Router {
    let guarded = Router::new()
        .route("/v1/predict", post(predict))
        .route("/v1/model", get(model_info))
        .route("/v1/reload", post(reload_route))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state), require_token));
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .merge(guarded)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(Arc::clone(&state), record))
        .with_state(state)
}

/// An error answer: its status and one line, sent as `{"error": "…"}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    /// The request's body was left unread, so its connection cannot carry another request: the response
    /// says `Connection: close`, else a client could send its next request on a connection the server is
    /// closing, and lose it.
    body_unread: bool,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), body_unread: false }
    }

    fn with_body_unread(self) -> Self {
        Self { body_unread: true, ..self }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json(self.status, &serde_json::json!({ "error": self.message }));
        let headers = response.headers_mut();
        match self.status {
            StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        if self.body_unread {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

/// Counts every response by route and status.
async fn record(Shared(state): Shared<Arc<State>>, request: Request, next: Next) -> Response {
    let arrived = Instant::now();
    let route = match request.uri().path() {
        "/" => "/",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        "/v1/predict" => "/v1/predict",
        "/v1/model" => "/v1/model",
        "/v1/reload" => "/v1/reload",
        _ => "other",
    };
    let response = next.run(request).await;
    state.metrics.response(route, response.status().as_u16(), arrived.elapsed());
    response
}

/// Refuses a request without the bearer token (when the service has one); the comparison takes the
/// same time wherever the tokens differ.
async fn require_token(Shared(state): Shared<Arc<State>>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.token_digest {
        let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        let matches = given.is_some_and(|token| {
            let given = digest(token.trim());
            given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        });
        if !matches {
            let what = if given.is_some() { "the bearer token is wrong" } else { "this service needs a bearer token" };
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                format!("{what}: send Authorization: Bearer <token from the service's --token-file>"),
            )
            .into_response();
        }
    }
    next.run(request).await
}

async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], PAGE).into_response()
}

async fn healthz() -> Response {
    ([(header::CONTENT_TYPE, "text/plain")], "ok\n").into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such route: see GET /, POST /v1/predict, GET /v1/model, POST /v1/reload, /healthz, /readyz, /metrics",
    )
}

async fn readyz(Shared(state): Shared<Arc<State>>) -> Response {
    if state.is_ready() {
        let model = state.model().map(|m| m.id.clone());
        return json(StatusCode::OK, &serde_json::json!({ "ready": true, "model": model }));
    }
    let reason = match &*state.start.borrow() {
        _ if state.is_draining() => "shutting down".to_string(),
        Start::Failed(reason) => format!("the model failed to load: {reason}"),
        _ => "loading the model and warming it up".to_string(),
    };
    let mut response = json(StatusCode::SERVICE_UNAVAILABLE, &serde_json::json!({ "ready": false, "reason": reason }));
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

async fn metrics(Shared(state): Shared<Arc<State>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render(&state.gauges())).into_response()
}

async fn model_info(Shared(state): Shared<Arc<State>>) -> Result<Response, ApiError> {
    let model = state.model().ok_or_else(not_ready)?;
    Ok(json(StatusCode::OK, &model.to_json()))
}

fn not_ready() -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model is still loading; see GET /readyz")
}

async fn reload_route(Shared(state): Shared<Arc<State>>) -> Result<Response, ApiError> {
    let (model, previous) = reload(&state).await?;
    Ok(json(StatusCode::OK, &serde_json::json!({ "model": model.to_json(), "previous": previous })))
}

/// Reads the model file again and has the scoring thread swap it in; a file that fails any check, or
/// its warm-up batch, is refused (`422`) and the old model keeps serving. Returns the new model and the
/// previous one's id.
async fn reload(state: &Arc<State>) -> Result<(Arc<ModelSummary>, String), ApiError> {
    let _one_at_a_time = state.reloading.lock().await;
    let outcome = swap_model(state).await;
    state.metrics.reloaded(outcome.is_ok());
    outcome
}

async fn swap_model(state: &Arc<State>) -> Result<(Arc<ModelSummary>, String), ApiError> {
    let previous = previous_id(state);
    let path = state.config.model.clone();
    let refused = |message: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("{message}; model {previous} keeps serving"));
    let model = tokio::task::spawn_blocking(move || ModelFile::read(&path))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| refused(format!("{e:#}")))?;
    let (reply, answer) = oneshot::channel();
    state.send(Work::Reload { model, reply })?;
    let model =
        answer.await.map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the service is shutting down"))?.map_err(refused)?;
    Ok((model, previous))
}

/// What the request body holds.
enum Upload {
    /// One image's bytes.
    Raw,
    /// A `multipart/form-data` body with this boundary: one image per part.
    Multipart(String),
}

/// The body's kind from its `Content-Type`: none, an image type or `application/octet-stream` is one
/// image; `multipart/form-data` is several; anything else is `415`.
fn upload_kind(headers: &HeaderMap) -> Result<Upload, ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else { return Ok(Upload::Raw) };
    let text = value.to_str().map_err(|_| ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "the Content-Type header is not text"))?;
    let essence = text.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    match essence.as_str() {
        "image/png" | "image/jpeg" | "image/jpg" | "image/bmp" | "image/tiff" | "application/octet-stream" => Ok(Upload::Raw),
        "multipart/form-data" => multer::parse_boundary(text)
            .map(Upload::Multipart)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("multipart/form-data without a usable boundary: {e}"))),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "Content-Type {essence} is not an image: send the image bytes as image/png, image/jpeg, image/bmp, image/tiff or \
                 application/octet-stream, or several as multipart/form-data"
            ),
        )),
    }
}

/// Whether `?overlay=png` asks for the heat-map overlay instead of JSON.
fn wants_overlay(query: Option<&str>) -> Result<bool, ApiError> {
    let mut overlay = false;
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("overlay", "png") => overlay = true,
            ("overlay", other) => {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("overlay={other}: the only overlay format is png")));
            }
            (name, _) => {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("unknown query parameter {name}; the only one is overlay=png")));
            }
        }
    }
    Ok(overlay)
}

/// Reads the body, at most `max` bytes (`413` beyond), within `deadline` (`408` after).
async fn read_body(headers: &HeaderMap, body: Body, max: usize, deadline: tokio::time::Instant) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is larger than this service's limit of {max} bytes (--max-body-mb)"))
            .with_body_unread()
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max as u64) {
        return Err(too_large());
    }
    let collect = async {
        let mut body = body;
        let mut bytes = Vec::with_capacity(declared.unwrap_or(0) as usize);
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("the upload broke off: {e}")).with_body_unread())?;
            if let Ok(data) = frame.into_data() {
                if bytes.len() + data.len() > max {
                    return Err(too_large());
                }
                bytes.extend_from_slice(&data);
            }
        }
        Ok(Bytes::from(bytes))
    };
    tokio::time::timeout_at(deadline, collect).await.map_err(|_| {
        ApiError::new(StatusCode::REQUEST_TIMEOUT, "the upload did not finish within the request timeout").with_body_unread()
    })?
}

/// How long a request refused or rejected before its body is read (queue full, model loading, shutting
/// down, a bad query or type) may go on uploading before the answer is sent.
const REFUSED_UPLOAD_WAIT: Duration = Duration::from_secs(2);

/// `error`, once the rest of the request's body is read and dropped (at most `max` bytes, until
/// `deadline`), holding no place in the queue: a connection closed with unread bytes in it is reset, and
/// the reset can destroy the answer before the client reads it, which then sees "peer disconnected"
/// instead of, say, Retry-After. Read whole, the connection even stays open for the client's retry;
/// otherwise the answer says the connection closes.
async fn after_discarding_body(error: ApiError, body: Body, max: usize, deadline: tokio::time::Instant) -> ApiError {
    let drain = async {
        let mut body = body;
        let mut read = 0;
        while let Some(frame) = body.frame().await {
            read += frame.ok()?.data_ref().map_or(0, Bytes::len);
            if read > max {
                return None;
            }
        }
        Some(())
    };
    match tokio::time::timeout_at(deadline, drain).await {
        Ok(Some(())) => error,
        _ => error.with_body_unread(),
    }
}

/// The images of a multipart body, named by their file names (or field names).
async fn multipart_images(body: Bytes, boundary: String) -> Result<Vec<(String, Bytes)>, ApiError> {
    let bad = |e: multer::Error| ApiError::new(StatusCode::BAD_REQUEST, format!("malformed multipart/form-data: {e}"));
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut images = Vec::new();
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        let name = field
            .file_name()
            .or(field.name())
            .map_or_else(|| format!("part {}", images.len() + 1), |n| n.chars().filter(|c| !c.is_control()).take(200).collect());
        images.push((name, field.bytes().await.map_err(bad)?));
    }
    if images.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "the multipart/form-data body holds no part: add one image per part"));
    }
    Ok(images)
}

/// An uploaded image decoded and preprocessed for the model (and kept whole when an overlay is drawn on it).
struct Decoded {
    name: String,
    pixels: Vec<f32>,
    original_size: (u32, u32),
    image: Option<RgbImage>,
    took: Duration,
}

fn decode(name: String, bytes: &[u8], preprocess: &Preprocess, limits: &ImageLimits, keep: bool) -> Result<Decoded, ApiError> {
    let started = Instant::now();
    let path = PathBuf::from(&name);
    let unusable = |e: DataError| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string());
    let image = anomaly_data::decode_rgb8_bytes(bytes, &path, limits).map_err(unusable)?;
    let preprocessed = preprocess.apply(&image, limits).map_err(|e| unusable(e.at(&path)))?;
    Ok(Decoded {
        name,
        pixels: preprocessed.pixels,
        original_size: preprocessed.original_size,
        image: keep.then_some(image),
        took: started.elapsed(),
    })
}

/// `POST /v1/predict`: one image as the body (or several as multipart) → score, verdict, and for
/// methods that localise the map's maximum and box (or, with `?overlay=png`, the overlay itself).
async fn predict(Shared(state): Shared<Arc<State>>, request: Request) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let deadline = tokio::time::Instant::from_std(arrived + state.config.request_timeout);
    let full =
        || ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("the queue is full ({} requests); retry later", state.config.queue));
    let admitted = match state.model() {
        _ if state.is_draining() => {
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the service is shutting down; send the image to another replica"))
        }
        None => Err(not_ready()),
        Some(model) => Arc::clone(&state.admission).try_acquire_owned().map(|place| (model, place)).map_err(|_| full()),
    };
    let discard_until = deadline.min(tokio::time::Instant::now() + REFUSED_UPLOAD_WAIT);
    let (model, _place) = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => return Err(after_discarding_body(refusal, request.into_body(), state.config.max_body_bytes, discard_until).await),
    };
    let (parts, body) = request.into_parts();
    let checked = wants_overlay(parts.uri.query()).and_then(|overlay| {
        if overlay && !model.localises {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("this model ({}) gives no anomaly map to overlay; drop ?overlay=png", model.method),
            ));
        }
        Ok((overlay, upload_kind(&parts.headers)?))
    });
    let (overlay, kind) = match checked {
        Ok(checked) => checked,
        Err(rejection) => return Err(after_discarding_body(rejection, body, state.config.max_body_bytes, discard_until).await),
    };
    let body = read_body(&parts.headers, body, state.config.max_body_bytes, deadline).await?;
    if body.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "the body is empty: send the image's bytes (PNG, JPEG, BMP or TIFF)"));
    }
    let multipart = matches!(kind, Upload::Multipart(_));
    let uploads = match kind {
        Upload::Raw => vec![("upload".to_string(), body)],
        Upload::Multipart(boundary) => multipart_images(body, boundary).await?,
    };
    if overlay && uploads.len() != 1 {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "?overlay=png takes exactly one image"));
    }
    // More images than places could never be admitted: a 503 would have the client retry in vain.
    if uploads.len() > state.config.queue {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} images in one request, more than this service admits at once ({}, --queue); send fewer per request",
                uploads.len(),
                state.config.queue
            ),
        ));
    }
    let _more_places = match uploads.len() - 1 {
        0 => None,
        more => Some(Arc::clone(&state.admission).try_acquire_many_owned(more as u32).map_err(|_| full())?),
    };
    // Decoded in parallel, each on a blocking thread.
    let decoding: Vec<_> = uploads
        .into_iter()
        .map(|(name, bytes)| {
            let (model, limits) = (Arc::clone(&model), state.config.image_limits);
            tokio::task::spawn_blocking(move || decode(name, &bytes, &model.preprocess, &limits, overlay))
        })
        .collect();
    let mut decoded = Vec::with_capacity(decoding.len());
    for task in decoding {
        decoded.push(task.await.map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("decoding failed: {e}")))??);
    }
    let mut answers = Vec::with_capacity(decoded.len());
    for image in &mut decoded {
        let (reply, answer) = oneshot::channel();
        let pixels = std::mem::take(&mut image.pixels);
        let job = Job {
            name: PathBuf::from(&image.name),
            pixels,
            original_size: image.original_size,
            preprocess: model.preprocess.clone(),
            queued_at: Instant::now(),
            reply,
        };
        state.send(Work::Score(job))?;
        answers.push(answer);
    }
    let mut scored = Vec::with_capacity(answers.len());
    for answer in answers {
        let outcome = tokio::time::timeout_at(deadline, answer).await.map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not scored within the request timeout ({:?}): the service is overloaded", state.config.request_timeout),
            )
        })?;
        match outcome {
            Ok(Outcome::Scored(result)) => scored.push(result),
            Ok(Outcome::Stale) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the model was swapped for one with another input size while the image waited; send it again",
                ));
            }
            Ok(Outcome::Failed(reason)) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("scoring failed: {reason}")));
            }
            Err(_) => return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the service is shutting down")),
        }
    }
    // Putting maps back onto the images is pixel work: off the async threads.
    tokio::task::spawn_blocking(move || answer(decoded, scored, overlay, multipart, arrived))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("answering failed: {e}")))?
}

/// The answer to a prediction: JSON for each image (an object, or `{"images": [...]}` for multipart), or
/// the overlay PNG.
fn answer(decoded: Vec<Decoded>, scored: Vec<Scored>, overlay: bool, multipart: bool, arrived: Instant) -> Result<Response, ApiError> {
    let mut images = Vec::with_capacity(scored.len());
    for (image, result) in decoded.into_iter().zip(scored) {
        let model = &result.model;
        let score = result.output.score;
        let anomalous = score > model.threshold;
        let verdict = if anomalous { "anomalous" } else { "good" };
        let map = match &result.output.map {
            Some(map) => Some(
                model
                    .preprocess
                    .map_to_original(map, image.original_size)
                    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{}: its anomaly map: {e}", image.name)))?,
            ),
            None => None,
        };
        if overlay {
            let (Some(map), Some(picture)) = (map, image.image) else {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the model gave no anomaly map"));
            };
            let max = map.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let png = anomaly_eval::map_overlay_png(&picture, &map, anomaly_eval::single_map_scale(max, model.pixel_threshold))
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{}: drawing the overlay: {e:#}", image.name)))?;
            let headers = [
                (header::CONTENT_TYPE, "image/png".to_string()),
                (header::HeaderName::from_static("x-anomaly-score"), score.to_string()),
                (header::HeaderName::from_static("x-anomaly-verdict"), verdict.to_string()),
                (header::HeaderName::from_static("x-anomaly-model"), model.id.clone()),
            ];
            return Ok((StatusCode::OK, headers, png).into_response());
        }
        let millis = |d: Duration| d.as_secs_f64() * 1e3;
        let mut line = serde_json::json!({
            "score": score,
            "threshold": model.threshold,
            "anomalous": anomalous,
            "verdict": verdict,
            "model": model.id,
            "width": image.original_size.0,
            "height": image.original_size.1,
            "batch_size": result.batch_size,
            "timings_ms": {
                "decode": millis(image.took),
                "queue": millis(result.queued),
                "score": millis(result.scoring),
                "total": millis(arrived.elapsed()),
            },
        });
        if let Some(map) = &map {
            line["map_max"] = serde_json::json!(map.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            if let Some(threshold) = model.pixel_threshold {
                line["pixel_threshold"] = serde_json::json!(threshold);
                line["bbox"] = serde_json::json!(anomaly_eval::bounding_box(map, image.original_size.0, threshold));
            }
        }
        if multipart {
            line["name"] = serde_json::json!(image.name);
        }
        images.push(line);
    }
    let body = if multipart { serde_json::json!({ "images": images }) } else { images.pop().unwrap_or_default() };
    Ok(json(StatusCode::OK, &body))
}
