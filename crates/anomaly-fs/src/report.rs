//! Report folders written whole, by one run at a time, and only over folders anomaly wrote: the run takes
//! the folder's lock and checks the target before any work, keeps the report's files in memory while it
//! computes, and at the end builds them in a staging folder beside the target and swaps it in.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::{FsError, OLD, OutputLock, STAGING, parent, replace_dir, set_readable, staging_dir, temp_prefix};

/// The hidden file every report folder holds: anomaly replaces a folder with it (or an empty one) and
/// refuses any other, so that `--report` pointed at the wrong folder never deletes someone's files.
pub const REPORT_MARKER: &str = ".anomaly-report";

/// Why an output cannot be written where it was asked for.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Another run holds the output's lock.
    #[error(
        "{}: another anomaly run{} is writing this report; wait for it or choose another --report folder",
        path.display(),
        pid.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    Locked { path: PathBuf, pid: Option<u32> },
    /// A report was asked for where a file (or a link) is.
    #[error("{}: is a file (or a link), not a report folder; choose a folder for --report, or remove the file", path.display())]
    NotAFolder { path: PathBuf },
    /// A report was asked for in a folder with files that anomaly did not write as a report.
    #[error(
        "{}: a folder with files that is not an anomaly report; a report replaces its whole folder, so choose a new or empty folder for --report (or remove this one)",
        path.display()
    )]
    NotAReport { path: PathBuf },
    /// A report was asked for at a path that does not name a folder of its own (`.`, `..`, `/`).
    #[error("{}: name the report folder itself (e.g. {}), not . or .. or the root", path.display(), path.join("report").display())]
    Unnamed { path: PathBuf },
    /// A folder of outputs was asked for where a file (or a link to one) is.
    #[error("{}: is a file, not a folder; choose a folder for {option}", path.display())]
    FileNotFolder { path: PathBuf, option: &'static str },
    /// A file was asked for where a folder is.
    #[error("{}: is a folder; give the path of a file to write (e.g. {})", path.display(), path.join("model.safetensors").display())]
    IsAFolder { path: PathBuf },
}

/// A report's files, relative to its folder, kept in memory while the run computes and written at its end.
#[derive(Debug, Default)]
pub struct ReportContent {
    files: BTreeMap<PathBuf, Vec<u8>>,
}

impl ReportContent {
    /// Adds (or replaces) the file `name` (a path relative to the report folder).
    pub fn add(&mut self, name: impl Into<PathBuf>, bytes: impl Into<Vec<u8>>) {
        self.files.insert(name.into(), bytes.into());
    }

    /// Adds another report as the subfolder `folder` (an `eval --all` category), with its own marker, so
    /// that it can later be written over on its own.
    pub fn nest(&mut self, folder: &str, inner: ReportContent) {
        for (name, bytes) in inner.files {
            self.files.insert(Path::new(folder).join(name), bytes);
        }
        self.files.insert(Path::new(folder).join(REPORT_MARKER), marker());
    }

    /// Whether the report holds the file `name`.
    pub fn contains(&self, name: impl AsRef<Path>) -> bool {
        self.files.contains_key(name.as_ref())
    }
}

/// A report folder being made by this run: its lock taken and its target checked at the start, its content
/// put in place whole at the end ([`ReportWriter::finish`]). Dropped without finishing (an error), it
/// leaves the target as it was and releases the lock.
#[derive(Debug)]
pub struct ReportWriter {
    target: PathBuf,
    _lock: OutputLock,
}

impl ReportWriter {
    /// Takes the lock of the report folder `target` (failing at once if another run holds it), checks that
    /// a report can go there (a new, empty or report folder, with a writable parent), and removes what
    /// killed runs left beside it (staging folders, old content moved aside).
    pub fn start(target: &Path) -> Result<Self, OutputError> {
        if target.file_name().is_none() {
            return Err(OutputError::Unnamed { path: target.to_path_buf() });
        }
        let lock = OutputLock::acquire(target)?;
        check_report_target(target)?;
        remove_leftovers(target)?;
        Ok(Self { target: target.to_path_buf(), _lock: lock })
    }

    /// Writes `content` and the marker into a staging folder beside the target, flushes it to disk and
    /// puts it in place of the old report in one step ([`replace_dir`]); then releases the lock.
    pub fn finish(self, content: &ReportContent) -> Result<(), OutputError> {
        // The target was checked at the start; a folder put there since is not replaced either.
        check_report_target(&self.target)?;
        let staging = staging_dir(&self.target)?;
        let mut files: Vec<(PathBuf, &[u8])> = content.files.iter().map(|(name, bytes)| (name.clone(), bytes.as_slice())).collect();
        let mark = marker();
        files.push((PathBuf::from(REPORT_MARKER), &mark));
        for (name, bytes) in files {
            let path = staging.path().join(name);
            let folder = parent(&path);
            fs::create_dir_all(folder).map_err(|e| FsError::new(folder, "creating the folder", e))?;
            let written = fs::File::create(&path).and_then(|mut file| {
                io::Write::write_all(&mut file, bytes)?;
                set_readable(&file)
            });
            written.map_err(|e| FsError::new(&path, "writing", e))?;
        }
        replace_dir(staging, &self.target)?;
        Ok(())
    }
}

/// Checks early that a file can be written at `path`: that it is not a folder, and that its folder can be
/// created and written in. Commands call it before any work, so that a bad output path fails in a second,
/// not after the computing.
pub fn check_file_output(path: &Path) -> Result<(), OutputError> {
    if path.is_dir() {
        return Err(OutputError::IsAFolder { path: path.to_path_buf() });
    }
    let folder = parent(path);
    fs::create_dir_all(folder).map_err(|e| FsError::new(folder, "creating the folder", e))?;
    // An unnamed file where the system has them (O_TMPFILE on Linux), so that not even a kill leaves it.
    tempfile::tempfile_in(folder).map_err(|e| FsError::new(folder, "checking that files can be written in it", e))?;
    Ok(())
}

/// Checks early that files can be written in the folder `path` (the command-line `option` that named it,
/// for the message): that it is not a file, and that it can be created and written in. Commands that write
/// many files into a folder (`eval --save-maps`) call it before any work.
pub fn check_folder_output(path: &Path, option: &'static str) -> Result<(), OutputError> {
    if path.exists() && !path.is_dir() {
        return Err(OutputError::FileNotFolder { path: path.to_path_buf(), option });
    }
    fs::create_dir_all(path).map_err(|e| FsError::new(path, "creating the folder", e))?;
    tempfile::tempfile_in(path).map_err(|e| FsError::new(path, "checking that files can be written in it", e))?;
    Ok(())
}

/// What the marker file says.
fn marker() -> Vec<u8> {
    format!("a report folder written by anomaly {}; anomaly replaces it whole on the next run into it\n", env!("CARGO_PKG_VERSION"))
        .into_bytes()
}

/// A report may replace nothing, an empty folder, or a folder holding the marker.
fn check_report_target(target: &Path) -> Result<(), OutputError> {
    match fs::symlink_metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError::new(target, "reading", e).into()),
        Ok(meta) if !meta.is_dir() => Err(OutputError::NotAFolder { path: target.to_path_buf() }),
        Ok(_) if target.join(REPORT_MARKER).is_file() => Ok(()),
        Ok(_) if holds_only_unmarked_report_files(target) => Ok(()),
        Ok(_) => {
            let mut entries = fs::read_dir(target).map_err(|e| FsError::new(target, "listing", e))?;
            if entries.next().is_none() { Ok(()) } else { Err(OutputError::NotAReport { path: target.to_path_buf() }) }
        }
    }
}

/// The files reports held before they carried the marker (anomaly 0.1 up to the marker's introduction).
const UNMARKED_REPORT_FILES: [&str; 13] = [
    "metrics.json",
    "scores.csv",
    "roc.png",
    "confusion.png",
    "tsne.png",
    "model.safetensors",
    "reconstructions.png",
    "summary.md",
    "summary.json",
    "eda.json",
    "histograms.png",
    "defect_area.png",
    "samples.png",
];

/// Whether `folder` is a report written before reports carried the marker: it holds `metrics.json`,
/// `summary.json` or `eda.json`, and nothing but files such reports held, and subfolders (categories) that
/// are such reports too. A folder with any other file is never one, so nobody's files are replaced.
fn holds_only_unmarked_report_files(folder: &Path) -> bool {
    let Ok(entries) = fs::read_dir(folder) else { return false };
    let mut has_results = false;
    for entry in entries {
        let Ok(entry) = entry else { return false };
        let Ok(kind) = entry.file_type() else { return false };
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if kind.is_dir() {
            if !holds_only_unmarked_report_files(&entry.path()) {
                return false;
            }
            has_results = true;
        } else if kind.is_file() && UNMARKED_REPORT_FILES.contains(&name.as_ref()) {
            has_results |= matches!(name.as_ref(), "metrics.json" | "summary.json" | "eda.json");
        } else {
            return false;
        }
    }
    has_results
}

/// Removes the staging folders and moved-aside old content that runs killed while replacing `target` left
/// beside it. Only called with the target's lock held, so none of them is in use.
fn remove_leftovers(target: &Path) -> Result<(), FsError> {
    let folder = parent(target);
    let prefixes = [format!("{}{STAGING}", temp_prefix(target)), format!("{}{OLD}", temp_prefix(target))];
    for entry in fs::read_dir(folder).map_err(|e| FsError::new(folder, "listing", e))? {
        let entry = entry.map_err(|e| FsError::new(folder, "listing", e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // tempfile's six random letters and digits follow the prefix, and nothing else.
        let leftover = prefixes.iter().any(|prefix| {
            name.strip_prefix(prefix.as_str()).is_some_and(|rest| rest.len() == 6 && rest.chars().all(|c| c.is_ascii_alphanumeric()))
        });
        if !leftover {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| FsError::new(&path, "reading", e))?;
        let removed = if kind.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        removed.map_err(|e| FsError::new(&path, "removing what an interrupted run left", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::tests::listing;

    fn content(files: &[(&str, &str)]) -> ReportContent {
        let mut content = ReportContent::default();
        for (name, text) in files {
            content.add(*name, text.as_bytes());
        }
        content
    }

    #[test]
    fn a_report_replaces_the_old_one_whole_and_holds_only_its_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("report");
        ReportWriter::start(&target).unwrap().finish(&content(&[("metrics.json", "1"), ("model.safetensors", "m")])).unwrap();
        assert_eq!(listing(&target), [REPORT_MARKER, "metrics.json", "model.safetensors"]);
        let mut second = content(&[("metrics.json", "2")]);
        second.nest("carpet", content(&[("roc.png", "r")]));
        ReportWriter::start(&target).unwrap().finish(&second).unwrap();
        assert_eq!(listing(&target), [REPORT_MARKER, "carpet", "metrics.json"]);
        assert_eq!(listing(&target.join("carpet")), [REPORT_MARKER, "roc.png"]);
        assert_eq!(fs::read_to_string(target.join("metrics.json")).unwrap(), "2");
        assert_eq!(listing(dir.path()), ["report"], "no lock, staging or old content left");
        // A category folder is a report of its own.
        ReportWriter::start(&target.join("carpet")).unwrap().finish(&content(&[("roc.png", "s")])).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_report_folder_is_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("report");
        ReportWriter::start(&target).unwrap().finish(&content(&[("a", "1")])).unwrap();
        assert_eq!(fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o755);
    }

    #[test]
    fn a_report_written_before_the_marker_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("report");
        fs::create_dir_all(target.join("carpet")).unwrap();
        for name in ["summary.json", "summary.md", "carpet/metrics.json", "carpet/roc.png", "carpet/model.safetensors"] {
            fs::write(target.join(name), "old").unwrap();
        }
        ReportWriter::start(&target).unwrap().finish(&content(&[("metrics.json", "new")])).unwrap();
        assert_eq!(listing(&target), [REPORT_MARKER, "metrics.json"]);
    }

    #[test]
    fn a_folder_anomaly_did_not_write_or_a_file_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("photos");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("holiday.jpg"), "x").unwrap();
        let error = ReportWriter::start(&target).unwrap_err();
        assert!(matches!(error, OutputError::NotAReport { .. }), "{error}");
        assert!(error.to_string().starts_with(&format!("{}: ", target.display())), "{error}");
        assert_eq!(listing(&target), ["holiday.jpg"]);
        let file = dir.path().join("notes.txt");
        fs::write(&file, "x").unwrap();
        assert!(matches!(ReportWriter::start(&file).unwrap_err(), OutputError::NotAFolder { .. }));
        // A folder of report file names with one other file among them is not a report either.
        fs::remove_file(target.join("holiday.jpg")).unwrap();
        for name in ["metrics.json", "roc.png", "thesis.pdf"] {
            fs::write(target.join(name), "x").unwrap();
        }
        assert!(matches!(ReportWriter::start(&target).unwrap_err(), OutputError::NotAReport { .. }));
        assert_eq!(listing(&target), ["metrics.json", "roc.png", "thesis.pdf"]);
        assert_eq!(listing(dir.path()), ["notes.txt", "photos"], "no lock file left");
        // An empty folder may become a report.
        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        ReportWriter::start(&empty).unwrap().finish(&content(&[("a", "1")])).unwrap();
        assert_eq!(listing(&empty), [REPORT_MARKER, "a"]);
    }

    #[test]
    fn a_second_writer_of_the_same_report_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("report");
        let first = ReportWriter::start(&target).unwrap();
        assert!(matches!(ReportWriter::start(&target).unwrap_err(), OutputError::Locked { .. }));
        first.finish(&content(&[("a", "1")])).unwrap();
        assert_eq!(listing(dir.path()), ["report"]);
    }

    #[test]
    fn what_killed_runs_left_is_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("report");
        ReportWriter::start(&target).unwrap().finish(&content(&[("a", "1")])).unwrap();
        for leftover in [".report.staging-Ab12cd", ".report.old-XyZ789"] {
            fs::create_dir(dir.path().join(leftover)).unwrap();
            fs::write(dir.path().join(leftover).join("half.png"), "x").unwrap();
        }
        // Another output's names, which only look alike.
        for other in [".report.x.lock", ".report.staging-a.lock", ".report.model.abcdef"] {
            fs::write(dir.path().join(other), "").unwrap();
        }
        fs::write(dir.path().join(".report.lock"), "999999").unwrap();
        let writer = ReportWriter::start(&target).unwrap();
        assert_eq!(listing(dir.path()), [".report.lock", ".report.model.abcdef", ".report.staging-a.lock", ".report.x.lock", "report"]);
        writer.finish(&content(&[("b", "2")])).unwrap();
        assert_eq!(listing(dir.path()), [".report.model.abcdef", ".report.staging-a.lock", ".report.x.lock", "report"]);
        assert_eq!(listing(&target), [REPORT_MARKER, "b"]);
    }

    #[test]
    fn a_file_output_is_checked_before_the_work() {
        let dir = tempfile::tempdir().unwrap();
        let error = check_file_output(dir.path()).unwrap_err();
        assert!(matches!(error, OutputError::IsAFolder { .. }), "{error}");
        check_file_output(&dir.path().join("new/sub/model.safetensors")).unwrap();
        assert_eq!(listing(&dir.path().join("new/sub")), Vec::<String>::new(), "the check leaves no file");
    }

    #[test]
    fn a_folder_output_is_checked_before_the_work() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("file"), "x").unwrap();
        let error = check_folder_output(&dir.path().join("file"), "--save-maps").unwrap_err();
        assert!(matches!(error, OutputError::FileNotFolder { .. }) && error.to_string().contains("--save-maps"), "{error}");
        let error = check_folder_output(&dir.path().join("file/maps"), "--save-maps").unwrap_err();
        assert!(error.to_string().contains("creating the folder"), "{error}");
        check_folder_output(&dir.path().join("new/maps"), "--save-maps").unwrap();
        assert_eq!(listing(&dir.path().join("new/maps")), Vec::<String>::new(), "the check leaves no file");
    }

    #[cfg(unix)]
    #[test]
    fn an_output_whose_folder_cannot_be_made_fails_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("file"), "x").unwrap();
        let under_a_file = dir.path().join("file/model.safetensors");
        let error = check_file_output(&under_a_file).unwrap_err();
        assert!(error.to_string().contains(&dir.path().join("file").display().to_string()), "{error}");
        let error = ReportWriter::start(&dir.path().join("file/report")).unwrap_err();
        assert!(error.to_string().contains("creating the folder"), "{error}");
        for unnamed in [".", "..", "/"] {
            assert!(matches!(ReportWriter::start(Path::new(unnamed)).unwrap_err(), OutputError::Unnamed { .. }), "{unnamed}");
        }
    }
}
