//! Outputs under faults: `fit` and `eval` killed with SIGKILL at several points, two runs into one report
//! folder, reports pointed at folders anomaly did not write. The autoencoder needs no downloaded weights,
//! so these run anywhere; every wait is on a sign from the process (a stderr line, a file it writes), never
//! on a fixed sleep.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long to wait for a sign from a run before failing (a hang fails the test instead of stalling CI).
const PATIENCE: Duration = Duration::from_secs(600);

/// More epochs than a test ever waits for: the run is killed long before.
const FOREVER: &str = "100000";

/// A small synthetic category: 8 training images, 10 test images.
fn synthetic(root: &Path) {
    let config = anomaly_data::SyntheticConfig { seed: 31, size: 64, train: 8, test_good: 2, per_defect: 2 };
    anomaly_data::write_synthetic_dataset(root, &config).unwrap();
}

/// `anomaly <command> --method autoencoder`, small and on the CPU, with `extra` arguments.
fn autoencoder(command: &str, epochs: &str, extra: &[&Path]) -> Vec<String> {
    let mut args: Vec<String> = [command, "--method", "autoencoder", "--image-size", "32", "--train-batch-size", "4", "--device", "cpu"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.extend(["--epochs".to_string(), epochs.to_string()]);
    args.extend(extra.iter().map(|a| a.to_string_lossy().into_owned()));
    args
}

/// `anomaly eval` of a saved model.
fn eval_model(data: &Path, model: &Path, report: &Path, seed: &str) -> Vec<String> {
    let (data, model, report) = (data.display().to_string(), model.display().to_string(), report.display().to_string());
    ["eval", "--data", &data, "--model", &model, "--report", &report, "--seed", seed, "--device", "cpu"].map(String::from).to_vec()
}

/// A running `anomaly`, its stderr read line by line on a thread.
struct Run {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Run {
    fn start(args: &[String]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_anomaly"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the anomaly binary starts");
        let stderr = child.stderr.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines, seen: Vec::new() }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stderr line containing `needle`.
    fn wait_for_line(&mut self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => panic!("no stderr line with '{needle}'; stderr so far: {:#?}", self.seen),
            }
        }
    }

    /// Polls `ready` until it holds or the run ends; whether it held.
    fn wait_until(&mut self, mut ready: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if ready() {
                return true;
            }
            if self.child.try_wait().unwrap().is_some() {
                return ready();
            }
            assert!(Instant::now() < deadline, "the run neither got there nor ended; stderr: {:#?}", self.seen);
            std::thread::yield_now();
        }
    }

    /// SIGKILL; whether the signal is what ended the run (it may have finished just before).
    fn kill(mut self) -> bool {
        self.child.kill().unwrap();
        self.child.wait().unwrap().signal() == Some(9)
    }

    /// Waits for the end: the exit status, stdout and all of stderr.
    fn finish(mut self) -> (ExitStatus, String, String) {
        let mut stdout = String::new();
        std::io::Read::read_to_string(self.child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
        let status = self.child.wait().unwrap();
        self.seen.extend(self.lines.iter());
        (status, stdout, self.seen.join("\n"))
    }

    /// Waits for a successful end; stdout.
    fn succeeds(self) -> String {
        let (status, stdout, stderr) = self.finish();
        assert!(status.success(), "{stderr}");
        stdout
    }
}

/// Every file under `folder`, hidden ones too, with its bytes (nothing when there is no folder).
fn snapshot(folder: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(folder) else { return files };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(snapshot(&path).into_iter().map(|(name, bytes)| (Path::new(path.file_name().unwrap()).join(name), bytes)));
        } else {
            files.insert(PathBuf::from(path.file_name().unwrap()), std::fs::read(&path).unwrap());
        }
    }
    files
}

/// Names in `folder`, sorted.
fn listing(folder: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(folder).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Hidden names in `folder`.
fn hidden(folder: &Path) -> Vec<String> {
    listing(folder).into_iter().filter(|n| n.starts_with('.')).collect()
}

/// The files a report's closing message lists (its own), by name.
fn listed_files(stdout: &str) -> Vec<String> {
    let mut names: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .map(|p| Path::new(p).file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The names a report folder should hold: its listed files and the marker.
fn with_marker(mut names: Vec<String>) -> Vec<String> {
    names.push(anomaly_fs::REPORT_MARKER.to_string());
    names.sort();
    names
}

/// A checkpoint folder after a kill: progress.json says epoch N, and the files of epoch N are there (the
/// killed epoch's may be there too, whole or as temporary files); `N`.
fn checkpoint_epoch(dir: &Path) -> usize {
    let progress: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("progress.json")).unwrap()).unwrap();
    let epoch = progress["epochs_done"].as_u64().unwrap() as usize;
    let files = listing(dir);
    for name in [format!("weights-{epoch}.bpk"), format!("optimizer-{epoch}.bpk")] {
        assert!(files.contains(&name), "{name} in {files:?}");
    }
    let next = epoch + 1;
    let expected = |f: &String| {
        f == "progress.json"
            || [epoch, next].iter().any(|e| f.ends_with(&format!("-{e}.bpk")))
            || [format!(".weights-{next}.bpk."), format!(".optimizer-{next}.bpk."), ".progress.json.".into()]
                .iter()
                .any(|p| f.starts_with(p))
    };
    assert!(files.iter().all(expected), "{files:?}");
    epoch
}

#[test]
fn a_killed_fit_leaves_no_model_and_a_whole_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fabric");
    synthetic(&data);
    let models = dir.path().join("models");
    let model = models.join("ae.safetensors");
    let checkpoint = dir.path().join("checkpoint");
    let fit = |epochs: &str, extra: &[&Path]| {
        let mut args = autoencoder("fit", epochs, &[Path::new("--data"), &data, Path::new("--model"), &model]);
        args.extend(extra.iter().map(|a| a.to_string_lossy().into_owned()));
        args
    };
    let nothing_written = |when: &str| {
        assert!(!model.exists(), "{when}: no model");
        assert!(!models.exists() || listing(&models).is_empty(), "{when}: {:?}", listing(&models));
    };

    // Right after the start.
    Run::start(&fit(FOREVER, &[])).kill();
    nothing_written("killed at once");
    // Once it says it fits (the images are being read and the training starts).
    let mut run = Run::start(&fit(FOREVER, &[]));
    run.wait_for_line("good images");
    assert!(run.kill(), "still fitting when killed");
    nothing_written("killed while fitting");
    // During the training, after it wrote a checkpoint.
    let mut run = Run::start(&fit(FOREVER, &[Path::new("--checkpoint"), &checkpoint]));
    assert!(run.wait_until(|| checkpoint.join("progress.json").is_file()), "a checkpoint is written");
    assert!(run.kill(), "still training when killed");
    nothing_written("killed while training");

    // The checkpoint is whole: the next run resumes it and ends with the next epoch's checkpoint only.
    let epoch = checkpoint_epoch(&checkpoint);
    let next = (epoch + 1).to_string();
    Run::start(&fit(&next, &[Path::new("--checkpoint"), &checkpoint, Path::new("--resume")])).succeeds();
    assert_eq!(listing(&models), ["ae.safetensors"]);
    assert_eq!(listing(&checkpoint), [format!("optimizer-{next}.bpk"), "progress.json".into(), format!("weights-{next}.bpk")]);
}

#[test]
fn a_killed_eval_leaves_the_earlier_report_whole_and_the_next_run_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fabric");
    synthetic(&data);
    let out = dir.path().join("out");
    let report = out.join("report");
    let checkpoint = dir.path().join("checkpoint");
    let eval_fit = |epochs: &str, seed: &str, extra: &[&Path]| {
        let mut args = autoencoder("eval", epochs, &[Path::new("--data"), &data, Path::new("--report"), &report]);
        args.extend(["--seed".to_string(), seed.to_string()]);
        args.extend(extra.iter().map(|a| a.to_string_lossy().into_owned()));
        args
    };

    // A first report, with the fitted model in it.
    let stdout = Run::start(&eval_fit("2", "0", &[])).succeeds();
    let own = listed_files(&stdout);
    assert!(own.contains(&"model.safetensors".to_string()), "{own:?}");
    assert_eq!(listing(&report), with_marker(own));
    let earlier = snapshot(&report);
    let model = dir.path().join("ae.safetensors");
    std::fs::copy(report.join("model.safetensors"), &model).unwrap();
    let unchanged = |when: &str| {
        assert!(snapshot(&report) == earlier, "{when}: the earlier report is whole and unchanged");
        let left = hidden(&out);
        assert!(left.iter().all(|n| n == ".report.lock"), "{when}: at most the unlocked lock file is left: {left:?}");
    };

    // Right after the start, once it fits, and during the training.
    Run::start(&eval_fit(FOREVER, "1", &[])).kill();
    unchanged("killed at once");
    let mut run = Run::start(&eval_fit(FOREVER, "1", &[]));
    run.wait_for_line("autoencoder on ");
    assert!(run.kill(), "still fitting when killed");
    unchanged("killed while fitting");
    let mut run = Run::start(&eval_fit(FOREVER, "1", &[Path::new("--checkpoint"), &checkpoint]));
    assert!(run.wait_until(|| checkpoint.join("progress.json").is_file()), "a checkpoint is written");
    assert!(run.kill(), "still training when killed");
    unchanged("killed while training");

    // While a saved model scores the test images (its start line is printed just before), and while the
    // report is put in place (as soon as its staging folder shows). The swap is one step, so the folder
    // then holds the earlier report or the whole new one (this run's files only: a loaded model is not
    // copied); the run may also have ended before the kill. Each is tried a few times to land inside.
    let mut current = earlier.clone();
    let mut landed = [0, 0];
    let mut new_reports = Vec::new();
    for seed in 2..12 {
        let mut run = Run::start(&eval_model(&data, &model, &report, &seed.to_string()));
        let while_writing = seed % 2 == 1;
        let seen = if while_writing {
            run.wait_until(|| hidden(&out).iter().any(|n| n.starts_with(".report.staging-")))
        } else {
            run.wait_for_line("autoencoder 32px");
            true
        };
        landed[usize::from(while_writing)] += usize::from(run.kill() && seen);
        let now = snapshot(&report);
        if now != current {
            serde_json::from_slice::<serde_json::Value>(&now[Path::new("metrics.json")]).unwrap();
            new_reports.push(now.keys().map(|p| p.display().to_string()).collect::<Vec<_>>());
            current = now;
        }
        let left = hidden(&out);
        assert!(left.iter().all(|n| n == ".report.lock" || n.starts_with(".report.staging-")), "{left:?}");
    }
    assert!(landed[0] > 0, "a kill landed while scoring");
    if landed[1] == 0 {
        eprintln!("note: no kill landed while the report was being put in place (each run ended first)");
    }

    // The next run succeeds, removes what the killed ones left, and its report holds its own files only:
    // not the first run's model.
    let stdout = Run::start(&eval_model(&data, &model, &report, "7")).succeeds();
    let own = listed_files(&stdout);
    assert!(!own.contains(&"model.safetensors".to_string()), "{own:?}");
    let whole = with_marker(own);
    assert_eq!(listing(&report), whole);
    assert_eq!(listing(&out), ["report"], "no lock, staging or old content left");
    // A killed run whose report did land put all of it in place: the same files as this whole run's.
    for names in new_reports {
        assert_eq!(names, whole, "the whole new report and nothing of the old");
    }
}

#[test]
fn of_two_evals_into_one_report_the_second_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fabric");
    synthetic(&data);
    let report = dir.path().join("report");
    let args = autoencoder("eval", "2", &[Path::new("--data"), &data, Path::new("--report"), &report]);
    let mut first = Run::start(&args);
    first.wait_for_line("autoencoder on ");
    // Held still while the second runs, so that the first is mid-run whatever the machine's speed.
    let signal = |name: &str, pid: u32| assert!(Command::new("kill").args([name, &pid.to_string()]).status().unwrap().success());
    signal("-STOP", first.pid());
    let (status, _, stderr) = Run::start(&args).finish();
    signal("-CONT", first.pid());
    assert!(!status.success());
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    let expected = format!(
        "error: {}: another anomaly run (pid {}) is writing this report; wait for it or choose another --report folder",
        report.display(),
        first.pid()
    );
    assert_eq!(errors, [expected.as_str()], "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "failed before any work: {stderr}");

    let stdout = first.succeeds();
    assert_eq!(listing(&report), with_marker(listed_files(&stdout)));
    assert_eq!(listing(dir.path()), ["fabric", "report"]);
}

#[test]
fn outputs_where_they_cannot_go_fail_before_any_work_and_touch_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fabric");
    synthetic(&data);
    let one_error = |args: Vec<String>, needle: &str| {
        let (status, _, stderr) = Run::start(&args).finish();
        assert!(!status.success(), "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "one line, before any work: {stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains(needle), "'{needle}' in: {stderr}");
    };

    // A folder with someone's files is not a report folder, whatever the command.
    let photos = dir.path().join("photos");
    std::fs::create_dir_all(photos.join("2024")).unwrap();
    std::fs::write(photos.join("2024/holiday.jpg"), "not a report").unwrap();
    let before = snapshot(&photos);
    let refused = format!("{}: a folder with files that is not an anomaly report", photos.display());
    one_error(autoencoder("eval", "2", &[Path::new("--data"), &data, Path::new("--report"), &photos]), &refused);
    let mut eda = vec!["eda".to_string(), "--data".into(), data.display().to_string(), "--report".into()];
    eda.push(photos.display().to_string());
    one_error(eda, &refused);
    assert!(snapshot(&photos) == before, "untouched");

    // A file where the report folder should be.
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "mine").unwrap();
    one_error(autoencoder("eval", "2", &[Path::new("--data"), &data, Path::new("--report"), &file]), "notes.txt: is a file");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");

    // A model path that is a folder, or under a file.
    one_error(autoencoder("fit", "2", &[Path::new("--data"), &data, Path::new("--model"), &photos]), "photos: is a folder");
    let under_file = file.join("ae.safetensors");
    one_error(autoencoder("fit", "2", &[Path::new("--data"), &data, Path::new("--model"), &under_file]), "notes.txt: creating the folder");
    assert_eq!(listing(dir.path()), ["fabric", "notes.txt", "photos"], "no lock or temporary file left");
}

/// A PatchCore fit killed while its training patches are spilled leaves neither a model nor its spill file
/// (on Linux the spill file never has a name).
#[cfg(target_os = "linux")]
#[test]
fn a_killed_fit_that_spills_leaves_no_spill_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fabric");
    synthetic(&data);
    let (spill, model, weights) = (dir.path().join("spill"), dir.path().join("pc.safetensors"), crate::cli::weights_dir());
    std::fs::create_dir(&spill).unwrap();
    let args: Vec<String> = [
        "fit",
        "--method",
        "patchcore",
        "--data",
        data.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--offline",
        "--weights-dir",
        weights.to_str().unwrap(),
        "--memory-budget",
        "4400KB",
        "--spill-dir",
        spill.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let mut run = Run::start(&args);
    run.wait_for_line("spill to");
    assert!(run.kill(), "still fitting when killed");
    assert!(listing(&spill).is_empty(), "{:?}", listing(&spill));
    assert!(!model.exists());
}
