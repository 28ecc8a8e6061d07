//! A seeded mutation fuzzer on stable Rust over what a hostile user controls: image files (decoded within
//! a pixel limit), model files, and folder trees with links. Each case must end in a clean result or one
//! error line naming the file: a panic, or a case running past its deadline (a hang), fails the test with
//! the seed and case that reproduce it, and the input kept in a file.
//!
//! `ANOMALY_FUZZ_CASES` sets the cases per target (CI runs the defaults, a few thousand in all) and
//! `ANOMALY_FUZZ_SEED` the seed: `ANOMALY_FUZZ_CASES=100000 cargo test --release --test it fuzz -- --nocapture`.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use anomaly_data::{Dataset, ImageLimits, collect_images, load_mask, load_rgb8, load_rgb8_and_color};
use anomaly_fs::FileBytes;

use crate::common::{Rng, bank_model_bytes, fixture};
use crate::serve_faults::{Exchange, RawReply, answer, exchange_then, multipart, post, read_answer, wait_idle};

/// Cases per target and the seed, from the environment or the defaults.
fn budget(default_cases: usize) -> (usize, u64) {
    let read = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    (read("ANOMALY_FUZZ_CASES").map_or(default_cases, |n| n as usize), read("ANOMALY_FUZZ_SEED").unwrap_or(0x00A1_0A11))
}

/// What one case did, for the closing count.
enum Verdict {
    Accepted,
    Refused,
    /// An HTTP case: the status answered, or `None` where the connection ended without an answer (a
    /// request that was not well-formed HTTP, or a client that left).
    Http(Option<u16>),
}

impl Verdict {
    fn label(&self) -> String {
        match self {
            Self::Accepted => "accepted".into(),
            Self::Refused => "refused with one line".into(),
            Self::Http(Some(status)) => format!("HTTP {status}"),
            Self::Http(None) => "no answer (malformed or abandoned request)".into(),
        }
    }
}

/// Runs `cases` cases of `target` on a worker thread, each within `deadline`. `case` gets the case's own
/// generator and a scratch folder, and says whether the input was accepted or refused (with one line).
fn fuzz(target: &str, default_cases: usize, deadline: Duration, case: fn(&mut Rng, &Path) -> Result<Verdict, String>) {
    let (cases, seed) = budget(default_cases);
    let scratch = tempfile::tempdir().unwrap();
    let (to_worker, work) = mpsc::channel::<(usize, PathBuf)>();
    let (to_main, results) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        for (index, folder) in work {
            let mut rng = Rng::new(seed ^ (index as u64).wrapping_mul(0x9E37_79B9));
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&mut rng, &folder)));
            if matches!(outcome, Ok(Ok(_))) {
                let _ = std::fs::remove_dir_all(&folder);
            }
            if to_main.send(outcome.map_err(|panic| panic_text(&panic))).is_err() {
                return;
            }
        }
    });
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for index in 0..cases {
        let folder = scratch.path().join(format!("case-{index}"));
        std::fs::create_dir(&folder).unwrap();
        to_worker.send((index, folder)).unwrap();
        let failure = match results.recv_timeout(deadline) {
            Ok(Ok(Ok(verdict))) => {
                *counts.entry(verdict.label()).or_default() += 1;
                continue;
            }
            Ok(Ok(Err(broken))) => broken,
            Ok(Err(panic)) => format!("panicked: {panic}"),
            Err(_) => format!("still running after {deadline:?} (a hang)"),
        };
        let kept = scratch.keep().join(format!("case-{index}"));
        panic!("ANOMALY_FUZZ_SEED={seed}, case {index} of {target} (input kept in {}): {failure}", kept.display());
    }
    drop(to_worker);
    worker.join().unwrap();
    let counts: Vec<String> = counts.iter().map(|(label, count)| format!("{count} {label}")).collect();
    eprintln!("fuzz {target}: {cases} cases (seed {seed}): {}, 0 panics, 0 hangs", counts.join(", "));
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// Checks a refusal: one line, naming `file` (a file name or folder).
fn one_line(error: &dyn std::fmt::Display, file: &Path) -> Result<Verdict, String> {
    let message = error.to_string();
    let name = file.file_name().unwrap().to_string_lossy();
    if message.contains('\n') || !message.contains(name.as_ref()) {
        return Err(format!("an error that is not one line naming {name}: {message:?}"));
    }
    Ok(Verdict::Refused)
}

/// Below `n` (n > 0).
fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

/// A few random edits of `seed`: bit flips, interesting bytes and integers (sizes, lengths, offsets),
/// truncation, deletion, duplication, insertion, and splices from `donor`.
fn mutate(rng: &mut Rng, seed: &[u8], donor: &[u8]) -> Vec<u8> {
    const INTERESTING: [u64; 10] = [0, 1, 2, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 65000, 0x7FFF_FFFF, 0xFFFF_FFFF];
    let mut data = seed.to_vec();
    for _ in 0..1 + below(rng, 6) {
        if data.is_empty() {
            data.push(0);
        }
        let at = below(rng, data.len());
        match below(rng, 8) {
            0 => data[at] ^= 1 << below(rng, 8),
            1 => data[at] = INTERESTING[below(rng, 5)] as u8,
            2 => {
                let value = if below(rng, 4) == 0 { rng.next_u64() } else { INTERESTING[below(rng, INTERESTING.len())] };
                let width = [2, 4][below(rng, 2)];
                let bytes =
                    if below(rng, 2) == 0 { value.to_be_bytes()[8 - width..].to_vec() } else { value.to_le_bytes()[..width].to_vec() };
                for (i, byte) in bytes.into_iter().enumerate() {
                    if let Some(slot) = data.get_mut(at + i) {
                        *slot = byte;
                    }
                }
            }
            3 => data.truncate(at),
            4 => {
                let end = (at + 1 + below(rng, 64)).min(data.len());
                data.drain(at..end);
            }
            5 => {
                let end = (at + 1 + below(rng, 64)).min(data.len());
                let copy = data[at..end].to_vec();
                let to = below(rng, data.len());
                data.splice(to..to, copy);
            }
            6 => {
                let random: Vec<u8> = (0..1 + below(rng, 16)).map(|_| rng.next_u64() as u8).collect();
                data.splice(at..at, random);
            }
            _ => {
                if !donor.is_empty() {
                    let from = below(rng, donor.len());
                    let end = (from + 1 + below(rng, 256)).min(donor.len());
                    let to = at.min(data.len());
                    let len = (end - from).min(data.len() - to);
                    data[to..to + len].copy_from_slice(&donor[from..from + len]);
                }
            }
        }
    }
    data
}

/// Small real images of every format we read: the seeds of the image fuzzer.
fn image_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let encode = |image: image::DynamicImage, format| {
        let mut bytes = std::io::Cursor::new(Vec::new());
        image.write_to(&mut bytes, format).unwrap();
        bytes.into_inner()
    };
    let rgb = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 13, 77])));
    let gray = image::DynamicImage::ImageLuma16(image::ImageBuffer::from_fn(12, 20, |x, y| image::Luma([(x * 3000 + y * 7) as u16])));
    vec![
        ("jpg", std::fs::read(fixture("preprocess/rgb.jpg")).unwrap()),
        ("png", std::fs::read(fixture("preprocess/rgba.png")).unwrap()),
        ("png", std::fs::read(fixture("preprocess/gray16.png")).unwrap()),
        ("jpg", encode(rgb.clone(), image::ImageFormat::Jpeg)),
        ("png", encode(rgb.clone(), image::ImageFormat::Png)),
        ("bmp", encode(rgb.clone(), image::ImageFormat::Bmp)),
        ("tif", encode(rgb, image::ImageFormat::Tiff)),
        ("tif", encode(gray, image::ImageFormat::Tiff)),
    ]
}

/// The limit the fuzzer decodes under: small, so that a mutated size within it still decodes quickly.
const FUZZ_LIMITS: u64 = 2_000_000;

fn image_case(rng: &mut Rng, folder: &Path) -> Result<Verdict, String> {
    static SEEDS: std::sync::OnceLock<Vec<(&'static str, Vec<u8>)>> = std::sync::OnceLock::new();
    let seeds = SEEDS.get_or_init(image_seeds);
    let (extension, seed) = &seeds[below(rng, seeds.len())];
    let donor = &seeds[below(rng, seeds.len())].1;
    let path = folder.join(format!("case.{extension}"));
    std::fs::write(&path, mutate(rng, seed, donor)).unwrap();
    let limits = ImageLimits::new(FUZZ_LIMITS);
    let rgb = match load_rgb8(&path, &limits) {
        Ok(image) => image,
        Err(error) => return one_line(&error, &path),
    };
    let pixels = u64::from(rgb.width()) * u64::from(rgb.height());
    if pixels > FUZZ_LIMITS || rgb.as_raw().len() as u64 != pixels * 3 {
        return Err(format!("decoded {}×{} past the limit or with a wrong buffer", rgb.width(), rgb.height()));
    }
    // The network input too: an elongated image within the pixel limit must not blow up the resize.
    let preprocessed = anomaly_data::Preprocess::imagenet().load(&path, &limits).map(|image| image.pixels.len());
    if let Ok(values) = preprocessed
        && values != 3 * 224 * 224
    {
        return Err(format!("{values} input values, not 3 × 224 × 224"));
    }
    for result in [load_mask(&path, &limits).map(|_| ()), load_rgb8_and_color(&path, &limits).map(|_| ()), preprocessed.map(|_| ())] {
        if let Err(error) = result {
            one_line(&error, &path)?;
        }
    }
    Ok(Verdict::Accepted)
}

#[test]
fn fuzz_image_decoding_within_the_pixel_limit() {
    fuzz("image decoding", 2000, Duration::from_secs(20), image_case);
}

/// Names a random tree is built from: the MVTec AD layout's own, images, other files, links' names.
const TREE_NAMES: [&str; 14] =
    ["train", "good", "test", "ground_truth", "crack", "a.png", "b.jpg", "c_mask.png", "notes.txt", "x", "y", "deep", ".hidden", "z.PNG"];

/// A random tree of folders, images, other files, links (to ancestors, siblings, themselves, nothing,
/// absolute paths) and FIFOs; returns how many image-named entries it made (an upper bound on what a walk
/// that never repeats can find).
#[cfg(unix)]
fn random_tree(rng: &mut Rng, root: &Path) -> usize {
    use std::os::unix::fs::symlink;
    let mut folders = vec![root.to_path_buf()];
    let mut image_entries = 0;
    for _ in 0..4 + below(rng, 28) {
        let parent = folders[below(rng, folders.len())].clone();
        let name = TREE_NAMES[below(rng, TREE_NAMES.len())];
        let path = parent.join(name);
        if std::fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        let is_image = ["png", "jpg", "PNG"].iter().any(|e| name.ends_with(e));
        match below(rng, 10) {
            0..=2 => {
                std::fs::create_dir(&path).unwrap();
                folders.push(path);
                continue;
            }
            3..=5 => std::fs::write(&path, [0x89, b'P', b'N', b'G']).unwrap(),
            6..=8 => {
                let target: PathBuf = match below(rng, 6) {
                    0 => ".".into(),
                    1 => "..".into(),
                    2 => "../..".into(),
                    3 => folders[below(rng, folders.len())].clone(),
                    4 => name.into(),
                    _ => "missing".into(),
                };
                symlink(target, &path).unwrap();
            }
            _ => {
                let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: a valid NUL-terminated path; mkfifo only creates a file system entry.
                if unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) } != 0 {
                    continue;
                }
            }
        }
        image_entries += usize::from(is_image);
    }
    image_entries
}

#[cfg(unix)]
fn walk_case(rng: &mut Rng, folder: &Path) -> Result<Verdict, String> {
    let root = folder.join("data");
    std::fs::create_dir(&root).unwrap();
    let bound = random_tree(rng, &root);
    let mut verdict = Verdict::Refused;
    match collect_images(&root) {
        Ok(found) => {
            let mut unique = found.files.clone();
            unique.dedup();
            if unique.len() != found.files.len() || found.files.len() > bound {
                return Err(format!("{} files from {bound} image entries, repeated or looped: {:?}", found.files.len(), found.files));
            }
            if let Some(odd) = found.files.iter().find(|f| !f.is_file()) {
                return Err(format!("{} is not a file", odd.display()));
            }
            verdict = Verdict::Accepted;
        }
        Err(error) => {
            one_line(&error, &root)?;
        }
    }
    for result in [Dataset::open(&root), Dataset::mvtec(&root)] {
        match result {
            Ok(dataset) if dataset.samples.len() > bound => {
                return Err(format!("{} samples from {bound} image entries", dataset.samples.len()));
            }
            Ok(_) => {}
            Err(error) => {
                let message = error.to_string();
                if message.contains('\n') || !message.contains(&*folder.to_string_lossy()) {
                    return Err(format!("not one line naming the data: {message:?}"));
                }
            }
        }
    }
    Ok(verdict)
}

#[cfg(unix)]
#[test]
fn fuzz_folder_walks_over_random_trees_with_links() {
    fuzz("folder walks", 400, Duration::from_secs(20), walk_case);
}

/// Real model files of every method: the seeds of the model-file fuzzer.
fn model_seeds() -> Vec<Vec<u8>> {
    use anomaly_autoencoder::{AutoencoderModel, ConvAutoencoderConfig, TrainConfig, Trained, seeded_network};
    let config = ConvAutoencoderConfig::new().with_image_size(32).with_latent(8).with_channels(vec![4, 8]);
    let network = seeded_network(&config, &burn::tensor::Device::flex(), 1).unwrap();
    let trained = Trained { model: network, epoch_losses: vec![0.2, 0.1] };
    let autoencoder = AutoencoderModel::new(trained, config, TrainConfig::default(), &[0.1, 0.3], "fuzz").to_bytes().unwrap();
    vec![bank_model_bytes(), autoencoder]
}

/// Mutates a safetensors file where its structure is (the JSON header, half the time, keeping the length
/// prefix consistent now and then) or anywhere.
fn mutate_model(rng: &mut Rng, seed: &[u8], donor: &[u8]) -> Vec<u8> {
    let header_end = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    if below(rng, 2) == 0 {
        return mutate(rng, seed, donor);
    }
    let header = mutate(rng, &seed[8..header_end], &donor[8..]);
    let length = if below(rng, 2) == 0 { header.len() as u64 } else { (header_end - 8) as u64 };
    [&length.to_le_bytes()[..], &header, &seed[header_end..]].concat()
}

fn model_case(rng: &mut Rng, folder: &Path) -> Result<Verdict, String> {
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    let seeds = SEEDS.get_or_init(model_seeds);
    let (seed, donor) = (&seeds[below(rng, seeds.len())], &seeds[below(rng, seeds.len())]);
    let bytes = anomaly_fs::FileBytes::from_vec(mutate_model(rng, seed, donor));
    let path = folder.join("model.safetensors");
    match anomaly_method::check_model_file(&bytes, &path) {
        Ok(_) => {}
        Err(error) => return one_line(&format!("{error:#}"), &path),
    }
    // What the check accepts, the device-side load accepts or refuses cleanly too (a backbone's weights
    // are not at hand: a memory bank stops there, with one line).
    let device = anomaly_device::ResolvedDevice { device: burn::tensor::Device::flex(), adapter: None };
    let runtime = anomaly_method::Runtime::new(
        device,
        folder,
        Box::new(|name| anyhow::bail!("no weights for {name} in the fuzzer")),
        2,
        ImageLimits::default(),
    );
    match anomaly_method::load(&bytes, &path, &runtime) {
        Ok(detector) if !detector.threshold().is_finite() => Err(format!("loaded with threshold {}", detector.threshold())),
        Ok(_) => Ok(Verdict::Accepted),
        Err(error) if error.to_string().contains("no weights for") => Ok(Verdict::Accepted),
        Err(error) => one_line(&format!("{error:#}"), &path),
    }
}

#[test]
fn fuzz_model_file_loading() {
    fuzz("model files", 1500, Duration::from_secs(20), model_case);
}

/// The body limit of the service the HTTP fuzzer drives: small, so that oversized bodies stay cheap.
const FUZZ_BODY_LIMIT: usize = 256 << 10;

/// How long that service waits for an upload (then 408): short, so that a stalled upload costs little.
const FUZZ_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The service the HTTP fuzzer drives, over loopback: a memory bank fitted on the synthetic fabric with
/// the real Lite0 weights, loaded on the CPU by the loader `anomaly serve` builds.
struct Fuzzed {
    service: anomaly_serve::RunningService,
    agent: ureq::Agent,
    /// A test image of the fabric, which must score (200) between cases.
    good: Vec<u8>,
}

fn fuzzed() -> &'static Fuzzed {
    use anomaly_serve::{LoadModel, RunningService, ServeConfig, StartLoader};
    static SERVICE: std::sync::OnceLock<Fuzzed> = std::sync::OnceLock::new();
    SERVICE.get_or_init(|| {
        let fitted = crate::serve_faults::bank();
        let mut config = ServeConfig::new(fitted.model.clone(), "127.0.0.1:0".parse().unwrap());
        config.max_body_bytes = FUZZ_BODY_LIMIT;
        config.request_timeout = FUZZ_REQUEST_TIMEOUT;
        config.image_limits = ImageLimits::new(FUZZ_LIMITS);
        let (limits, max_batch) = (config.image_limits, config.max_batch);
        let weights = crate::common::lite0_weights();
        let start: StartLoader = Box::new(move || {
            let device = anomaly_device::resolve(anomaly_device::DeviceChoice::Cpu)?;
            let dir = weights.parent().unwrap().to_path_buf();
            let runtime = anomaly_method::Runtime::new(device, &dir, Box::new(move |_| Ok(weights.clone())), max_batch, limits);
            let load: LoadModel = Box::new(move |file: &FileBytes, path: &Path| anomaly_method::load(file, path, &runtime));
            Ok(load)
        });
        let service = RunningService::start(config, start).unwrap();
        service.wait_ready(Duration::from_secs(120)).unwrap();
        let agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(15))).build().into();
        let good = std::fs::read(&fitted.test_images()[0]).unwrap();
        Fuzzed { service, agent, good }
    })
}

/// What an HTTP case sent, and what it may be answered.
enum Sent {
    /// A well-formed request: it must be answered with one of these statuses (or 503 with Retry-After),
    /// and every status but 200 with a JSON one-line `error`.
    WellFormed(Exchange, &'static [u16]),
    /// Not well-formed HTTP: any 4xx, or no answer; never a 5xx.
    Malformed(Exchange),
    /// The client left without waiting for an answer.
    Left,
}

fn http_case(rng: &mut Rng, folder: &Path) -> Result<Verdict, String> {
    let fuzzed = fuzzed();
    let address = fuzzed.service.address();
    // Each case keeps what it sends in its folder, for the failure message.
    let send = |request: &[u8], half_close: bool| {
        std::fs::write(folder.join("request.http"), request).unwrap();
        exchange_then(address, request, half_close)
    };
    let sent = match below(rng, 16) {
        0..=4 => {
            let (content_type, body) = mutated_image(rng, &fuzzed.good);
            if below(rng, 2) == 0 {
                Sent::WellFormed(send(&post("/v1/predict", content_type, &body), false)?, &[200, 400, 422])
            } else {
                std::fs::write(folder.join("body"), &body).unwrap();
                let mut request = fuzzed.agent.post(format!("http://{address}/v1/predict"));
                if let Some(content_type) = content_type {
                    request = request.header("Content-Type", content_type);
                }
                let mut response = request.send(&body[..]).map_err(|e| format!("the client got no answer: {e}"))?;
                let body = response.body_mut().read_to_vec().map_err(|e| format!("the answer broke off: {e}"))?;
                let headers =
                    response.headers().iter().map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()));
                let reply = RawReply { status: response.status().as_u16(), headers: headers.collect(), body };
                Sent::WellFormed(Exchange::Answered(reply), &[200, 400, 422])
            }
        }
        5 => Sent::WellFormed(send(&post("/v1/predict", Some("image/png"), &huge_dimensions(rng)), false)?, &[200, 422]),
        6 => Sent::WellFormed(send(&empty_body(rng), false)?, &[400]),
        7 => {
            let (request, allowed) = oversized(rng, &fuzzed.good);
            Sent::WellFormed(send(&request, false)?, allowed)
        }
        8 => {
            let content_type = wrong_content_type(rng);
            let mut request = post("/v1/predict", None, &fuzzed.good);
            let at = request.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
            request.splice(at..at, [&b"Content-Type: "[..], &content_type, b"\r\n"].concat());
            Sent::WellFormed(send(&request, false)?, &[400, 415])
        }
        9 | 10 => {
            let (content_type, body) = bad_multipart(rng, &fuzzed.good);
            Sent::WellFormed(send(&post("/v1/predict", Some(&content_type), &body), false)?, &[200, 400, 413, 422])
        }
        11 | 12 => Sent::Malformed(send(&malformed_head(rng, &fuzzed.good), true)?),
        13 => Sent::Malformed(send(&bad_framing(rng, &fuzzed.good), true)?),
        _ => cut_short(rng, address, &fuzzed.good, folder)?,
    };
    let verdict = judge(sent)?;
    let healthz = fuzzed.agent.get(format!("http://{address}/healthz")).call().map_err(|e| format!("/healthz after the case: {e}"))?;
    if healthz.status() != 200 {
        return Err(format!("/healthz after the case: {}", healthz.status()));
    }
    if below(rng, 16) == 0 {
        let reply = answer(address, &post("/v1/predict", Some("image/png"), &fuzzed.good));
        if reply.status != 200 {
            return Err(format!("a good image after the case: {} {}", reply.status, String::from_utf8_lossy(&reply.body)));
        }
    }
    Ok(verdict)
}

/// Checks an HTTP case's answer against what its request deserves.
fn judge(sent: Sent) -> Result<Verdict, String> {
    let reply = match sent {
        Sent::Left | Sent::Malformed(Exchange::Closed(_)) => return Ok(Verdict::Http(None)),
        // A head mutated or padded into another valid request (a long header on /healthz) may succeed.
        Sent::Malformed(Exchange::Answered(reply)) if reply.status < 300 => return Ok(Verdict::Http(Some(reply.status))),
        Sent::Malformed(Exchange::Answered(reply)) if reply.status < 500 => reply,
        Sent::Malformed(Exchange::Answered(reply)) => return Err(format!("a malformed request got {reply:?}")),
        Sent::WellFormed(Exchange::Closed(how), _) => return Err(format!("a well-formed request got no answer: {how}")),
        Sent::WellFormed(Exchange::Answered(reply), allowed) => {
            if !allowed.contains(&reply.status) && reply.status != 503 {
                return Err(format!("{} where {allowed:?} was due: {}", reply.status, String::from_utf8_lossy(&reply.body)));
            }
            reply
        }
    };
    // One request at a time fills no queue: a 503 here is a scoring slower than the request timeout.
    if reply.status == 503
        && (reply.header("retry-after").is_none() || !reply.error_line()?.contains("not scored within the request timeout"))
    {
        return Err(format!("503 but for a slow scoring, or without Retry-After: {reply:?}"));
    }
    if reply.status == 200 {
        let body: serde_json::Value = serde_json::from_slice(&reply.body).map_err(|e| format!("200 with no JSON ({e})"))?;
        let scores = body.get("images").and_then(|i| i.as_array()).cloned().unwrap_or_else(|| vec![body.clone()]);
        if !scores.iter().all(|image| image["score"].as_f64().is_some_and(f64::is_finite)) {
            return Err(format!("200 without a finite score: {body}"));
        }
    } else if !reply.body.is_empty() || reply.header("content-type") == Some("application/json") {
        // The service's own refusals are JSON with one line; hyper's (malformed HTTP) have no body.
        reply.error_line()?;
    }
    Ok(Verdict::Http(Some(reply.status)))
}

/// A mutated image of any format we read (or the fabric's), and a Content-Type that says image or none.
fn mutated_image(rng: &mut Rng, good: &[u8]) -> (Option<&'static str>, Vec<u8>) {
    static SEEDS: std::sync::OnceLock<Vec<(&'static str, Vec<u8>)>> = std::sync::OnceLock::new();
    let seeds = SEEDS.get_or_init(image_seeds);
    let seed = if below(rng, 4) == 0 { good } else { &seeds[below(rng, seeds.len())].1 };
    let donor = &seeds[below(rng, seeds.len())].1;
    let body = mutate(rng, seed, donor);
    let content_type = [Some("image/png"), Some("image/jpeg"), Some("application/octet-stream"), Some("IMAGE/TIFF; q=1"), None];
    (content_type[below(rng, content_type.len())], body)
}

/// A small PNG, BMP or JPEG whose header declares huge (or zero, or negative) dimensions.
fn huge_dimensions(rng: &mut Rng) -> Vec<u8> {
    const SIDES: [u32; 8] = [0, 1, 65_535, 65_536, 100_000, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF];
    let (width, height) = (SIDES[below(rng, SIDES.len())], SIDES[below(rng, SIDES.len())]);
    let encode = |format| {
        let mut bytes = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(8, 8, image::Rgb([9, 99, 199])).write_to(&mut bytes, format).unwrap();
        bytes.into_inner()
    };
    match below(rng, 3) {
        0 => {
            let mut png = encode(image::ImageFormat::Png);
            png[16..20].copy_from_slice(&width.to_be_bytes());
            png[20..24].copy_from_slice(&height.to_be_bytes());
            let crc = crc32(&png[12..29]);
            png[29..33].copy_from_slice(&crc.to_be_bytes());
            png
        }
        1 => {
            let mut bmp = encode(image::ImageFormat::Bmp);
            bmp[18..22].copy_from_slice(&width.to_le_bytes());
            bmp[22..26].copy_from_slice(&height.to_le_bytes());
            bmp
        }
        _ => {
            let mut jpeg = encode(image::ImageFormat::Jpeg);
            let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
            jpeg[sof + 5..sof + 7].copy_from_slice(&(height as u16).to_be_bytes());
            jpeg[sof + 7..sof + 9].copy_from_slice(&(width as u16).to_be_bytes());
            jpeg
        }
    }
}

/// The CRC-32 PNG chunks carry, so that a PNG's edited header is read rather than refused for its CRC.
fn crc32(bytes: &[u8]) -> u32 {
    !bytes
        .iter()
        .fold(!0u32, |crc, &byte| (0..8).fold(crc ^ u32::from(byte), |c, _| if c & 1 == 1 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 }))
}

/// A prediction with no body: Content-Length 0, an empty chunked body, or no length at all.
fn empty_body(rng: &mut Rng) -> Vec<u8> {
    let content_type = ["image/png", "multipart/form-data; boundary=x", "application/octet-stream"][below(rng, 3)];
    let framing = ["Content-Length: 0\r\n", "Transfer-Encoding: chunked\r\n", ""][below(rng, 3)];
    let body = if framing.starts_with("Transfer") { "0\r\n\r\n" } else { "" };
    format!("POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: {content_type}\r\n{framing}\r\n{body}")
        .into_bytes()
}

/// A body over the limit, announced by its Content-Length (and not sent) or sent chunked, and the
/// statuses it may get: 413, or hyper's 431 for a length past what it represents (u64::MAX).
fn oversized(rng: &mut Rng, good: &[u8]) -> (Vec<u8>, &'static [u16]) {
    let head = "POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: image/png\r\n";
    if below(rng, 2) == 0 {
        const LENGTHS: [(u64, &[u16]); 3] = [(FUZZ_BODY_LIMIT as u64 + 1, &[413]), (1 << 32, &[413]), (u64::MAX, &[431])];
        let (length, allowed) = LENGTHS[below(rng, 3)];
        return (format!("{head}Content-Length: {length}\r\n\r\n").into_bytes(), allowed);
    }
    let mut request = format!("{head}Transfer-Encoding: chunked\r\n\r\n").into_bytes();
    let mut sent = 0;
    while sent <= FUZZ_BODY_LIMIT {
        request.extend_from_slice(format!("{:x}\r\n", good.len()).as_bytes());
        request.extend_from_slice(good);
        request.extend_from_slice(b"\r\n");
        sent += good.len();
    }
    request.extend_from_slice(b"0\r\n\r\n");
    (request, &[413])
}

/// A Content-Type that is not an image: another type, garbage text, or bytes that are not text.
fn wrong_content_type(rng: &mut Rng) -> Vec<u8> {
    const TYPES: [&str; 8] =
        ["text/plain", "application/json", "image/gif", "video/mp4", "", "multipart/mixed; boundary=x", "multipart/form-data", "image/"];
    match below(rng, 3) {
        0 => (0..1 + below(rng, 40)).map(|_| 0x21 + below(rng, 94) as u8).collect(),
        1 => (0..1 + below(rng, 8)).map(|_| 0x80 + below(rng, 128) as u8).collect(),
        _ => TYPES[below(rng, TYPES.len())].as_bytes().to_vec(),
    }
}

/// A multipart body of a few images, mutated, under a boundary that fits it or not; or one of more
/// tiny parts than the queue admits (256).
fn bad_multipart(rng: &mut Rng, good: &[u8]) -> (String, Vec<u8>) {
    if below(rng, 8) == 0 {
        let parts: Vec<&[u8]> = vec![b"x"; 1 + below(rng, 400)];
        return multipart(&parts);
    }
    let parts: Vec<Vec<u8>> =
        (0..1 + below(rng, 3)).map(|_| if below(rng, 2) == 0 { good.to_vec() } else { mutated_image(rng, good).1 }).collect();
    let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let (content_type, body) = multipart(&parts);
    let content_type = match below(rng, 5) {
        0 => "multipart/form-data; boundary=other".to_string(),
        1 => format!("multipart/form-data; boundary=\"{}\"", "b".repeat(1 + below(rng, 300))),
        2 => "multipart/form-data; boundary=".to_string(),
        _ => content_type,
    };
    let body = if below(rng, 4) == 0 { body } else { mutate(rng, &body, good) };
    (content_type, body)
}

/// A request whose head is mutated, or one of the classic malformed heads.
fn malformed_head(rng: &mut Rng, good: &[u8]) -> Vec<u8> {
    let classics: [&[u8]; 10] = [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/predict HTTP/9.9\r\nContent-Length: 0\r\n\r\n",
        b"POST /v1/predict\r\n\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
        b"POST  HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/predict HTTP/1.1\r\nHost x\r\nNo colon here\r\n\r\n",
        b"POST /v1/predict HTTP/1.1\r\nBad Name: 1\r\nContent-Length: 1\r\n\r\nx",
        b"POST /v1/predict HTTP/1.1\r\n Folded: header\r\n\r\n",
        b"POST /v1/predict HTTP/1.1\nHost: x\nContent-Length: 3\n\nabc",
        b"\r\n\r\n\r\n",
    ];
    match below(rng, 4) {
        0 => classics[below(rng, classics.len())].to_vec(),
        1 => {
            // Oversized heads: a long request line, one long header, or very many headers.
            let filler = "a".repeat(1000 + below(rng, 200_000));
            match below(rng, 3) {
                0 => format!("GET /{filler} HTTP/1.1\r\nHost: x\r\n\r\n"),
                1 => format!("GET /healthz HTTP/1.1\r\nX-Long: {filler}\r\n\r\n"),
                _ => format!("GET /healthz HTTP/1.1\r\n{}\r\n", "X-Many: 1\r\n".repeat(50 + below(rng, 5000))),
            }
            .into_bytes()
        }
        _ => {
            let request = post("/v1/predict", Some("image/png"), good);
            let end = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            [
                mutate(rng, &request[..end], b"\r\n: /?&%\x00\x7F\xFFHTTP/1.1 Content-Length Transfer-Encoding chunked"),
                request[end..].to_vec(),
            ]
            .concat()
        }
    }
}

/// A body whose framing is wrong: a Content-Length that is not one, two that differ, one with
/// Transfer-Encoding, a length longer or shorter than the body, broken chunks.
fn bad_framing(rng: &mut Rng, good: &[u8]) -> Vec<u8> {
    let head = "POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: image/png\r\n";
    let length = good.len();
    let framing = match below(rng, 12) {
        0 => "Content-Length: abc\r\n".to_string(),
        1 => "Content-Length: -1\r\n".to_string(),
        2 => format!("Content-Length: {length}, {}\r\n", length + 1),
        3 => format!("Content-Length: {length}\r\nContent-Length: {}\r\n", length - 1),
        4 => "Content-Length: 99999999999999999999999\r\n".to_string(),
        5 => format!("Content-Length: {length}\r\nTransfer-Encoding: chunked\r\n"),
        6 => "Transfer-Encoding: gzip\r\n".to_string(),
        7 => format!("Content-Length: {}\r\n", below(rng, length)),
        8 => format!("Content-Length: {}\r\n", length + 1 + below(rng, 1000)),
        9 => format!("Content-Length: +{length}\r\n"),
        _ => "Transfer-Encoding: chunked\r\n".to_string(),
    };
    let body = if framing == "Transfer-Encoding: chunked\r\n" {
        let sizes = ["zz", "ffffffffffffffffffff", "-1", "10;ext=\"unterminated", "1 0"];
        format!("{}\r\n", sizes[below(rng, sizes.len())]).into_bytes()
    } else {
        good.to_vec()
    };
    [format!("{head}{framing}\r\n").as_bytes(), &body].concat()
}

/// A client that leaves mid-request (after part of the head or body, plain or chunked), or stalls
/// mid-upload, or drips it slowly, until the service answers 408; or stalls mid-head, until the
/// service cuts it off.
fn cut_short(rng: &mut Rng, address: std::net::SocketAddr, good: &[u8], folder: &Path) -> Result<Sent, String> {
    use std::io::Write;
    let chunked = below(rng, 2) == 0;
    let mut request = if chunked {
        let head = "POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n";
        [head.as_bytes(), format!("{:x}\r\n", good.len()).as_bytes(), good, b"\r\n0\r\n\r\n"].concat()
    } else {
        post("/v1/predict", Some("image/png"), good)
    };
    let head_end = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let (stall, stall_in_head) = (below(rng, 6) == 0, below(rng, 3) == 0);
    // A stalled upload has its whole head (or stops in it); one that leaves may go anywhere before the end.
    let cut = match (stall, stall_in_head) {
        (true, false) => head_end + below(rng, request.len() - head_end - 1),
        (true, true) => 1 + below(rng, head_end - 2),
        (false, _) => below(rng, request.len() - 1),
    };
    let request_length = request.len();
    request.truncate(cut);
    std::fs::write(folder.join("request.http"), &request).unwrap();
    let mut stream = std::net::TcpStream::connect(address).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(FUZZ_REQUEST_TIMEOUT + Duration::from_secs(10))).unwrap();
    let _ = stream.write_all(&request);
    if !stall {
        return Ok(Sent::Left);
    }
    if stall_in_head {
        // Cut off within the request timeout: hyper's 408 with no body, or the connection closed.
        let started = std::time::Instant::now();
        let stalled = read_answer(&mut stream)?;
        return match stalled {
            _ if started.elapsed() > FUZZ_REQUEST_TIMEOUT + Duration::from_secs(2) => {
                Err(format!("a head stalled for {:?} before it was cut off", started.elapsed()))
            }
            Exchange::Answered(reply) if reply.status == 408 && reply.body.is_empty() => Ok(Sent::Malformed(Exchange::Answered(reply))),
            Exchange::Closed(_) => Ok(Sent::Malformed(stalled)),
            other => Err(format!("a stalled head got {other:?}")),
        };
    }
    let missing = request_length - cut;
    if !chunked && missing > 1 && below(rng, 2) == 0 {
        // Slowloris: a byte now and then, never the whole body.
        let mut writer = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..(missing - 1).min(40) {
                std::thread::sleep(Duration::from_millis(100));
                if writer.write_all(b"\x00").is_err() {
                    return;
                }
            }
        });
    }
    let stalled = read_answer(&mut stream)?;
    match &stalled {
        Exchange::Answered(reply) if reply.status == 408 => Ok(Sent::WellFormed(stalled, &[408])),
        _ => Err(format!("a stalled upload got {stalled:?} instead of 408")),
    }
}

#[test]
fn fuzz_the_service_over_http_with_hostile_requests() {
    let fuzzed = fuzzed();
    fuzz("HTTP requests to anomaly serve", 300, Duration::from_secs(30), http_case);
    let address = fuzzed.service.address();
    let reply = answer(address, &post("/v1/predict", Some("image/png"), &fuzzed.good));
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    let metrics = wait_idle(address);
    let errors: Vec<&str> = metrics.lines().filter(|l| l.contains("status=\"5") && !l.contains("status=\"503\"")).collect();
    assert!(errors.is_empty(), "server errors: {errors:?}");
}
