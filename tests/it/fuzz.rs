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

use crate::common::{Rng, bank_model_bytes, fixture};

/// Cases per target and the seed, from the environment or the defaults.
fn budget(default_cases: usize) -> (usize, u64) {
    let read = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    (read("ANOMALY_FUZZ_CASES").map_or(default_cases, |n| n as usize), read("ANOMALY_FUZZ_SEED").unwrap_or(0x00A1_0A11))
}

/// What one case did, for the closing count.
enum Verdict {
    Accepted,
    Refused,
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
    let (mut accepted, mut refused) = (0, 0);
    for index in 0..cases {
        let folder = scratch.path().join(format!("case-{index}"));
        std::fs::create_dir(&folder).unwrap();
        to_worker.send((index, folder)).unwrap();
        let failure = match results.recv_timeout(deadline) {
            Ok(Ok(Ok(Verdict::Accepted))) => {
                accepted += 1;
                continue;
            }
            Ok(Ok(Ok(Verdict::Refused))) => {
                refused += 1;
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
    eprintln!("fuzz {target}: {cases} cases (seed {seed}): {accepted} accepted, {refused} refused with one line, 0 panics, 0 hangs");
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
    let bytes = mutate_model(rng, seed, donor);
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
