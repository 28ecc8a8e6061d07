//! The service's counters, in Prometheus' text format (`GET /metrics`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters and histograms, updated by the handlers and the scoring thread.
pub(crate) struct Metrics {
    responses: Mutex<BTreeMap<(&'static str, u16), u64>>,
    predict_seconds: Mutex<Histogram>,
    batch_sizes: Mutex<Histogram>,
    scoring_failures: AtomicU64,
    abandoned: AtomicU64,
    reloads: [AtomicU64; 2],
}

/// The gauges read when the metrics are rendered.
pub(crate) struct Gauges {
    pub queue_depth: usize,
    pub in_flight: usize,
    pub ready: bool,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        Self {
            responses: Mutex::new(BTreeMap::new()),
            predict_seconds: Mutex::new(Histogram::new(&[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])),
            batch_sizes: Mutex::new(Histogram::new(&[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0])),
            scoring_failures: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            reloads: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// A response sent on `route` (a known route, or "other") with `status`; predictions' latency too.
    pub(crate) fn response(&self, route: &'static str, status: u16, took: Duration) {
        *lock(&self.responses).entry((route, status)).or_default() += 1;
        if route == "/v1/predict" {
            lock(&self.predict_seconds).observe(took.as_secs_f64());
        }
    }

    /// A batch of `size` images scored (or failed).
    pub(crate) fn batch(&self, size: usize) {
        lock(&self.batch_sizes).observe(size as f64);
    }

    pub(crate) fn scoring_failed(&self) {
        self.scoring_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// An image whose request was gone (timed out, or the client left) before its batch.
    pub(crate) fn abandoned(&self) {
        self.abandoned.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn reloaded(&self, ok: bool) {
        self.reloads[usize::from(ok)].fetch_add(1, Ordering::Relaxed);
    }

    /// Every metric, in Prometheus' text exposition format 0.0.4.
    pub(crate) fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP anomaly_http_responses_total HTTP responses sent, by route and status code.");
        let _ = writeln!(out, "# TYPE anomaly_http_responses_total counter");
        for ((route, status), count) in lock(&self.responses).iter() {
            let _ = writeln!(out, "anomaly_http_responses_total{{route=\"{route}\",status=\"{status}\"}} {count}");
        }
        lock(&self.predict_seconds).render(
            &mut out,
            "anomaly_predict_duration_seconds",
            "Time from a prediction request's arrival to its answer.",
        );
        lock(&self.batch_sizes).render(&mut out, "anomaly_batch_size", "Images scored together in one batch.");
        let mut gauge = |name: &str, help: &str, kind: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        gauge("anomaly_queue_depth", "Images decoded and waiting for the scoring thread.", "gauge", gauges.queue_depth as u64);
        gauge("anomaly_requests_in_flight", "Prediction requests admitted and not yet answered.", "gauge", gauges.in_flight as u64);
        gauge(
            "anomaly_ready",
            "1 once the model is loaded and warmed up, 0 before and while shutting down.",
            "gauge",
            u64::from(gauges.ready),
        );
        gauge(
            "anomaly_scoring_failures_total",
            "Batches whose scoring failed (each of their requests got 500).",
            "counter",
            self.scoring_failures.load(Ordering::Relaxed),
        );
        gauge(
            "anomaly_abandoned_images_total",
            "Images whose request was gone before their batch (timed out or disconnected).",
            "counter",
            self.abandoned.load(Ordering::Relaxed),
        );
        let _ = writeln!(out, "# HELP anomaly_model_reloads_total Model reloads, by result.\n# TYPE anomaly_model_reloads_total counter");
        for (result, count) in [("refused", &self.reloads[0]), ("ok", &self.reloads[1])] {
            let _ = writeln!(out, "anomaly_model_reloads_total{{result=\"{result}\"}} {}", count.load(Ordering::Relaxed));
        }
        out
    }
}

/// A counter can be read even if a thread panicked while holding it.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A cumulative histogram over fixed upper bounds.
struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, and one for values above them all.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0 }
    }

    fn observe(&mut self, value: f64) {
        let bucket = self.bounds.iter().position(|&b| value <= b).unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum += value;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let total: u64 = self.counts.iter().sum();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}\n{name}_sum {}\n{name}_count {total}", self.sum);
    }
}
