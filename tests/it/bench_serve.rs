//! `anomaly bench serve`: its report's shape on a small run against the in-process service, and its
//! refusal of any address off this machine.

use crate::cli::{anomaly, stderr, weights_dir, write_png};

#[test]
fn bench_serve_reports_every_row_and_every_request_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = anomaly_data::SyntheticConfig { seed: 5, size: 64, train: 8, test_good: 2, per_defect: 1 };
    anomaly_data::write_synthetic_dataset(&data, &config).unwrap();
    let model = dir.path().join("model.safetensors");
    let weights = weights_dir();
    let (weights, model_arg) = (weights.to_str().unwrap(), model.to_str().unwrap());
    let common = ["--device", "cpu", "--offline", "--weights-dir", weights];
    let output = anomaly(&[&["fit", "--data", data.to_str().unwrap(), "--model", model_arg, "--k", "3"][..], &common].concat());
    assert!(output.status.success(), "{}", stderr(&output));

    let test = data.join("test");
    let output = anomaly(
        &[
            &["bench", "serve", "--model", model_arg, "--data", test.to_str().unwrap(), "--concurrency", "1,4", "--requests", "12"][..],
            &["--max-batch", "4", "--rss-every-s", "1", "--predict-seconds", "1", "--json"],
            &common,
        ]
        .concat(),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["in_process"], true, "{report}");
    assert!(report["url"].as_str().unwrap().starts_with("http://127.0.0.1:"), "{report}");
    assert_eq!(report["service"]["max_batch"], 4);
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.iter().map(|r| r["concurrency"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 4]);
    for row in rows {
        assert_eq!((row["requests"].as_u64(), row["ok"].as_u64(), row["rejected_503"].as_u64()), (Some(12), Some(12), Some(0)), "{row}");
        assert_eq!(row["errors"], serde_json::json!({"timeout": 0, "connection": 0, "status": 0}), "{row}");
        for key in ["p50", "p95", "p99", "max"] {
            assert!(row["latency_ms"][key].as_f64().unwrap() > 0.0, "{row}");
        }
        let batch = row["mean_batch"].as_f64().unwrap();
        assert!((1.0..=4.0).contains(&batch), "{row}");
        assert!(row["img_s"].as_f64().unwrap() > 0.0 && row["vs_predict"].as_f64().unwrap() > 0.0, "{row}");
    }
    assert_eq!(report["predict"]["batch_size"], 4);
    assert!(report["predict"]["img_s"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["peak_rss_mib"].as_f64().unwrap() > 0.0, "{report}");
    assert!(!report["rss_samples"].as_array().unwrap().is_empty(), "{report}");

    // More clients than queue places: every request is answered, scored or refused with 503 (how many of
    // each depends on timing), none fails.
    let output = anomaly(
        &[
            &["bench", "serve", "--model", model_arg, "--data", test.to_str().unwrap(), "--concurrency", "4", "--requests", "8"][..],
            &["--queue", "1", "--max-batch", "4", "--seconds", "30", "--predict-seconds", "1", "--json"],
            &common,
        ]
        .concat(),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let row = &report["rows"][0];
    assert_eq!(row["over_queue"], true, "{row}");
    assert_eq!(row["errors"], serde_json::json!({"timeout": 0, "connection": 0, "status": 0}), "{row}");
    assert_eq!(row["ok"].as_u64().unwrap() + row["rejected_503"].as_u64().unwrap(), 8, "{row}");
}

#[test]
fn bench_serve_refuses_addresses_off_this_machine_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("images");
    std::fs::create_dir(&data).unwrap();
    write_png(&data.join("one.png"), 1);
    for url in ["http://10.1.2.3:80", "http://example.com:8080", "https://127.0.0.1:8080", "http://user@127.0.0.1:80", "http://[::2]:80"] {
        let started = std::time::Instant::now();
        let output = anomaly(&["bench", "serve", "--url", url, "--data", data.to_str().unwrap()]);
        assert!(!output.status.success(), "{url}");
        assert!(stderr(&output).contains("only loads a service on this machine"), "{url}: {}", stderr(&output));
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "{url}: refused only after {:?}", started.elapsed());
    }
    // A loopback URL with nothing listening is accepted, and then finds no service.
    let output = anomaly(&["bench", "serve", "--url", "http://localhost:9", "--data", data.to_str().unwrap()]);
    assert!(!output.status.success() && stderr(&output).contains("http://127.0.0.1:9: no service answers"), "{}", stderr(&output));
}
