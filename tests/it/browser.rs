//! A headless Chromium driven over the DevTools protocol on its pipe (`--remote-debugging-pipe`: commands in on
//! fd 3, replies out on fd 4, each message NUL-terminated JSON), so no websocket client is needed.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use anomaly_data::{ImageLimits, SyntheticConfig, write_synthetic_dataset};
use anomaly_fs::FileBytes;
use anomaly_method::{MethodName, MethodSettings, Runtime};
use anomaly_serve::{LoadModel, RunningService, ServeConfig, StartLoader};
use serde_json::{Value, json};

use crate::common::lite0_weights;

/// The longest any one wait lasts: a page that never gets there fails the test instead of hanging CI.
const DEADLINE: Duration = Duration::from_secs(60);

/// A running headless Chromium with one page attached; the whole process group is killed on drop.
struct Browser {
    child: Child,
    commands: std::io::PipeWriter,
    replies: Receiver<Value>,
    next_id: u64,
    session: String,
    profile: tempfile::TempDir,
}

/// `chromium` on PATH, or `None` after telling the log that `test` was skipped; in CI (`CI=true`) a missing
/// Chromium fails the test instead, so the page is never untested there.
fn find_chromium(test: &str) -> Option<PathBuf> {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).map(|dir| dir.join("chromium")).find(|p| p.is_file());
    if found.is_none() {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "{test}: chromium is not on PATH (CI installs it in .ci/run)");
        let note = format!("skipped {test}: chromium is not on PATH (apt-get install chromium)\n");
        // Best effort: a note that cannot be written changes nothing about the test.
        let _ = std::io::stderr().write_all(note.as_bytes());
    }
    found
}

impl Browser {
    /// Starts Chromium on about:blank and attaches to its page, or `None` where there is no Chromium (see
    /// `find_chromium`).
    fn launch(test: &str) -> Option<Self> {
        let chromium = find_chromium(test)?;
        let profile = tempfile::tempdir().unwrap();
        let (chromium_reads, commands) = std::io::pipe().unwrap();
        let (replies, chromium_writes) = std::io::pipe().unwrap();
        let (chromium_reads, chromium_writes): (OwnedFd, OwnedFd) = (chromium_reads.into(), chromium_writes.into());
        let (read_fd, write_fd) = (chromium_reads.as_raw_fd(), chromium_writes.as_raw_fd());
        let mut command = Command::new(chromium);
        command
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--window-size=1280,860", "--hide-scrollbars"])
            .args(["--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            // Chromium makes a temporary folder of its own (`org.chromium.Chromium.*`) and leaves it behind:
            // inside the profile, it goes with it.
            .env("TMPDIR", profile.path())
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(profile.path().join("stderr.log")).unwrap())
            .process_group(0);
        // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2). The pipes' ends are first
        // copied above fd 10, so moving them onto fds 3 and 4 cannot overwrite one with the other; dup2 leaves
        // the copies on 3 and 4 open across exec, and the F_DUPFD_CLOEXEC temporaries close there.
        unsafe {
            command.pre_exec(move || {
                let high_read = libc::fcntl(read_fd, libc::F_DUPFD_CLOEXEC, 10);
                let high_write = libc::fcntl(write_fd, libc::F_DUPFD_CLOEXEC, 10);
                if high_read < 0 || high_write < 0 || libc::dup2(high_read, 3) < 0 || libc::dup2(high_write, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        // Chromium holds its own ends now: with ours closed, its exit ends the reader below.
        drop((chromium_reads, chromium_writes));
        let (sender, receiver) = channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(replies);
            let mut message = Vec::new();
            while reader.read_until(0, &mut message).is_ok_and(|n| n > 0) {
                message.pop_if(|b| *b == 0);
                let Ok(value) = serde_json::from_slice(&message) else { return };
                if sender.send(value).is_err() {
                    return;
                }
                message.clear();
            }
        });
        let mut browser = Self { child, commands, replies: receiver, next_id: 0, session: String::new(), profile };
        let targets = browser.call(None, "Target.getTargets", json!({}));
        let page = targets["targetInfos"].as_array().unwrap().iter().find(|t| t["type"] == "page").expect("a page target").clone();
        let attached = browser.call(None, "Target.attachToTarget", json!({"targetId": page["targetId"], "flatten": true}));
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        browser.send("Page.enable", json!({}));
        browser.send("Runtime.enable", json!({}));
        Some(browser)
    }

    /// Chromium's stderr so far, for failure messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.profile.path().join("stderr.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// One command and its result; events that arrive in between are dropped (tests poll the page instead).
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).unwrap_or_else(|e| panic!("{method}: chromium is gone ({e}):\n{}", self.log_tail()));
        let deadline = Instant::now() + DEADLINE;
        loop {
            let reply = match self.replies.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(reply) => reply,
                Err(RecvTimeoutError::Timeout) => panic!("{method}: no reply within {DEADLINE:?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("{method}: chromium exited:\n{}", self.log_tail()),
            };
            if reply["id"] == id {
                assert!(reply["error"].is_null(), "{method}: {}", reply["error"]);
                return reply["result"].clone();
            }
        }
    }

    /// A command to the attached page.
    fn send(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.call(Some(&session), method, params)
    }

    fn navigate(&mut self, url: &str) {
        let result = self.send("Page.navigate", json!({"url": url}));
        assert!(result["errorText"].is_null(), "{url}: {}", result["errorText"]);
        self.wait_for("document.readyState === 'complete'", "the page to load");
    }

    /// The value of a JavaScript expression (promises awaited); a thrown exception fails the test.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.send("Runtime.evaluate", json!({"expression": expression, "returnByValue": true, "awaitPromise": true}));
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {}", exception["exception"]["description"].as_str().unwrap_or(&exception.to_string()));
        }
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it is truthy and returns its value; `what` names the wait when it times out.
    fn wait_for(&mut self, expression: &str, what: &str) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let value = self.eval(expression);
            if !matches!(value, Value::Null | Value::Bool(false)) && value != json!("") && value != json!(0) {
                return value;
            }
            let page = self.eval("document.body ? document.body.dataset.state + ': ' + document.body.innerText.slice(0, 400) : ''");
            assert!(Instant::now() < deadline, "waited {DEADLINE:?} for {what} ({expression}); the page: {page}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Puts `file` into the file input `selector`, as a person picking it would (Chromium fires `change`).
    fn set_file(&mut self, selector: &str, file: &Path) {
        let document = self.send("DOM.getDocument", json!({}));
        let node = self.send("DOM.querySelector", json!({"nodeId": document["root"]["nodeId"], "selector": selector}));
        assert_ne!(node["nodeId"], 0, "no {selector} on the page");
        self.send("DOM.setFileInputFiles", json!({"nodeId": node["nodeId"], "files": [file.to_str().unwrap()]}));
    }

    /// A PNG of the whole page.
    fn screenshot(&mut self, path: &Path) {
        let shot = self.send("Page.captureScreenshot", json!({"format": "png", "captureBeyondViewport": true}));
        std::fs::write(path, base64_decode(shot["data"].as_str().unwrap())).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The browser's renderer and helper processes share its process group.
        // SAFETY: kill has no memory effects; the group is the one spawned above.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Standard base64 (the screenshot's encoding), without pulling in a crate for it.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    let mut bytes = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let bits = chunk.iter().enumerate().fold(0u32, |acc, (i, &d)| acc | (d as u32) << (18 - 6 * i));
        bytes.extend(&bits.to_be_bytes()[1..chunk.len()]);
    }
    bytes
}

/// Loads the page at `url`, picks `image`, types `token` when the page asks for one, and returns the verdict
/// it then shows.
fn verdict_in_page(browser: &mut Browser, url: &str, image: &Path, token: Option<&str>) -> String {
    browser.navigate(url);
    assert_eq!(browser.eval("document.getElementById('verdict').textContent"), "", "a verdict before any image");
    browser.set_file("#file", image);
    if let Some(token) = token {
        // Without the token the request is refused: the page says so and asks for it, then sends the image again.
        browser.wait_for("!document.getElementById('token-box').hidden && document.body.dataset.state === 'error'", "the token prompt");
        let error = browser.eval("document.getElementById('error').textContent");
        assert!(error.as_str().unwrap().starts_with("HTTP 401"), "{error}");
        let typed =
            format!("document.getElementById('token').value = {}; document.getElementById('token-box').requestSubmit()", json!(token));
        browser.eval(&typed);
    }
    let state = browser.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state", "the verdict");
    let error = browser.eval("document.getElementById('error').textContent");
    assert_eq!(state, "done", "{error}");
    assert_eq!(browser.eval("document.getElementById('token-box').hidden"), true);
    browser.eval("document.getElementById('verdict').textContent").as_str().unwrap().to_string()
}

/// Drops a 64 × 48 PNG drawn on a canvas onto the drop zone, as a dragged file lands.
const DROP_CANVAS: &str = "(async () => {
    const canvas = Object.assign(document.createElement('canvas'), { width: 64, height: 48 });
    canvas.getContext('2d').fillRect(8, 8, 16, 16);
    const png = await new Promise((done) => canvas.toBlob(done, 'image/png'));
    const files = new DataTransfer();
    files.items.add(new File([png], 'dropped.png', { type: 'image/png' }));
    document.getElementById('drop').dispatchEvent(new DragEvent('drop', { dataTransfer: files, bubbles: true, cancelable: true }));
})()";

/// The CPU, with the EfficientNet-Lite0 weights, in batches of 4.
fn cpu_runtime() -> Runtime {
    let weights = lite0_weights();
    let device = anomaly_device::ResolvedDevice { device: burn::tensor::Device::flex(), adapter: None };
    let folder = weights.parent().unwrap().to_path_buf();
    Runtime::new(device, &folder, Box::new(move |_| Ok(weights.clone())), 4, ImageLimits::default())
}

/// A model of `method` fitted on a small synthetic fabric (in `dir`, with the fabric) and served in-process, with
/// `token` if given.
fn fitted_service(dir: &Path, method: MethodName, token: Option<&str>) -> RunningService {
    let data = dir.join("fabric");
    write_synthetic_dataset(&data, &SyntheticConfig { seed: 41, size: 96, train: 8, test_good: 2, per_defect: 1 }).unwrap();
    let train: Vec<PathBuf> = std::fs::read_dir(data.join("train/good")).unwrap().map(|e| e.unwrap().path()).collect();
    let mut settings = MethodSettings::default();
    // Eight training images: a memory bank's k must be below that.
    settings.memory_bank.k = 3;
    let detector = anomaly_method::fit(method, &settings, &train, "fabric", &cpu_runtime()).unwrap();
    let model = dir.join("model.safetensors");
    std::fs::write(&model, detector.to_bytes().unwrap()).unwrap();
    let mut config = ServeConfig::new(model, "127.0.0.1:0".parse().unwrap());
    config.token = token.map(str::to_string);
    let start: StartLoader = Box::new(|| {
        let runtime = cpu_runtime();
        let load: LoadModel = Box::new(move |file: &FileBytes, path: &Path| anomaly_method::load(file, path, &runtime));
        Ok(load)
    });
    let service = RunningService::start(config, start).unwrap();
    service.wait_ready(DEADLINE).unwrap();
    service
}

/// What `POST /v1/predict` answers for `image`.
fn predicted(service: &RunningService, image: &Path, token: Option<&str>) -> Value {
    let mut request = ureq::post(format!("http://{}/v1/predict", service.address())).header("Content-Type", "image/png");
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let text = request.send(&std::fs::read(image).unwrap()).unwrap().body_mut().read_to_string().unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The page's verdict and score are the API's for the same file.
fn assert_page_shows(browser: &mut Browser, verdict: &str, prediction: &Value) {
    assert_eq!(verdict, prediction["verdict"].as_str().unwrap(), "{prediction}");
    let shown: f64 = browser.eval("document.getElementById('score').textContent").as_str().unwrap().parse().unwrap();
    let score = prediction["score"].as_f64().unwrap();
    assert!((shown - score).abs() <= 1e-3 * score.abs().max(1.0), "the page shows score {shown}, the API says {prediction}");
}

#[test]
fn the_served_page_scores_an_image_as_the_api_does_and_shows_its_heat_map() {
    let Some(mut browser) = Browser::launch("the_served_page_scores_an_image_as_the_api_does_and_shows_its_heat_map") else { return };
    let dir = tempfile::tempdir().unwrap();
    let service = fitted_service(dir.path(), MethodName::Patchcore, None);
    let image = dir.path().join("fabric/test/hole/000.png");
    let verdict = verdict_in_page(&mut browser, &format!("http://{}/", service.address()), &image, None);
    assert_page_shows(&mut browser, &verdict, &predicted(&service, &image, None));
    assert_eq!(browser.eval("document.getElementById('model-method').textContent"), "patchcore");
    // The heat map came back as a PNG the browser shows over the image, at the image's size.
    let overlay = browser.eval("(o => !o.hidden && o.complete && [o.naturalWidth, o.naturalHeight])(document.getElementById('overlay'))");
    assert_eq!(overlay, json!([96, 96]));
    let shot = std::env::temp_dir().join("anomaly-serve-page.png");
    browser.screenshot(&shot);
    eprintln!("the scored page: {}", shot.display());

    // An image dropped onto the page is scored as a picked one is.
    browser.eval(DROP_CANVAS);
    browser.wait_for(
        "document.body.dataset.state === 'done' && document.getElementById('size').textContent === '64 × 48 px'",
        "the dropped image",
    );

    // A file that is no image: the server's own words, with the status, in the error line.
    let bogus = dir.path().join("bogus.png");
    std::fs::write(&bogus, b"not a png").unwrap();
    browser.set_file("#file", &bogus);
    let error =
        browser.wait_for("document.body.dataset.state === 'error' && document.getElementById('error').textContent", "the error line");
    assert!(error.as_str().unwrap().starts_with("HTTP 422: "), "{error}");
    assert_eq!(browser.eval("document.getElementById('verdict').textContent"), "");
    service.shutdown();
}

#[test]
fn the_served_page_asks_for_the_token_and_scores_once_it_has_it() {
    let Some(mut browser) = Browser::launch("the_served_page_asks_for_the_token_and_scores_once_it_has_it") else { return };
    let dir = tempfile::tempdir().unwrap();
    let token = "page-test-token-5d0c";
    let service = fitted_service(dir.path(), MethodName::MemoryBank, Some(token));
    let image = dir.path().join("fabric/test/good/000.png");
    let verdict = verdict_in_page(&mut browser, &format!("http://{}/", service.address()), &image, Some(token));
    assert_page_shows(&mut browser, &verdict, &predicted(&service, &image, Some(token)));
    // A memory bank scores whole images: no heat map is asked for or shown.
    assert_eq!(browser.eval("document.getElementById('overlay').hidden"), true);
    service.shutdown();
}
