//! One run at a time per output: an exclusive lock on a hidden file beside the output, taken before any
//! work and released (and the file removed) when the run ends; the kernel releases it if the run is killed.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::{FsError, OutputError, parent, temp_prefix};

/// The exclusive right to write one output path, held from the start of a run to its end: a second run
/// that asks for it fails at once instead of mixing its files with the first's. The lock is an OS file
/// lock on `.NAME.lock` beside the output (released by the kernel when a run dies), holding the pid of
/// the run that has it; the file is removed when the lock is dropped.
#[derive(Debug)]
pub struct OutputLock {
    file: File,
    path: PathBuf,
}

impl OutputLock {
    /// Takes the lock for `target`, creating the folders it goes in; fails with [`OutputError::Locked`]
    /// when another run holds it.
    pub fn acquire(target: &Path) -> Result<Self, OutputError> {
        let folder = parent(target);
        fs::create_dir_all(folder).map_err(|e| FsError::new(folder, "creating the folder", e))?;
        let path = folder.join(format!("{}lock", temp_prefix(target)));
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| FsError::new(&path, "creating the lock file", e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Err(OutputError::Locked { path: target.to_path_buf(), pid: holder(&mut file) }),
                Err(TryLockError::Error(e)) => return Err(FsError::new(&path, "locking", e).into()),
            }
            // The holder removes the file before it unlocks; if that happened between our open and our lock,
            // we hold a lock on a file nobody else will see: open the path again.
            if !names_file(&path, &file).map_err(|e| FsError::new(&path, "reading", e))? {
                continue;
            }
            let pid = std::process::id().to_string();
            file.set_len(0).and_then(|()| file.write_all(pid.as_bytes())).map_err(|e| FsError::new(&path, "writing", e))?;
            return Ok(Self { file, path });
        }
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked, so a run waiting on this file finds, after locking, that the path no
        // longer names it, and starts over. Best effort: a lock file left behind is reused by the next run.
        #[cfg(unix)]
        let _ = fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

/// The pid the holder wrote into the lock file, if it has written it yet.
fn holder(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Whether `path` still names the open `file` (the same inode).
#[cfg(unix)]
fn names_file(path: &Path, file: &File) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let opened = file.metadata()?;
    match fs::symlink_metadata(path) {
        Ok(named) => Ok(named.dev() == opened.dev() && named.ino() == opened.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Elsewhere the lock file is never removed (an open file cannot be), so the path always names it.
#[cfg(not(unix))]
fn names_file(_path: &Path, _file: &File) -> std::io::Result<bool> {
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_output_fails_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("report");
        let first = OutputLock::acquire(&target).unwrap();
        let error = OutputLock::acquire(&target).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, OutputError::Locked { pid: Some(pid), .. } if pid == std::process::id()), "{message}");
        assert!(message.contains(&format!("another anomaly run (pid {})", std::process::id())), "{message}");
        assert!(message.starts_with(&target.display().to_string()), "{message}");
        drop(first);
        assert!(!dir.path().join(".report.lock").exists(), "the lock file is removed on release");
        let again = OutputLock::acquire(&target).unwrap();
        drop(again);
    }

    #[test]
    fn a_stale_lock_file_of_a_killed_run_is_taken_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("report");
        fs::write(dir.path().join(".report.lock"), "123456").unwrap();
        let lock = OutputLock::acquire(&target).unwrap();
        assert_eq!(fs::read_to_string(dir.path().join(".report.lock")).unwrap(), std::process::id().to_string());
        drop(lock);
        assert!(fs::read_dir(dir.path()).unwrap().next().is_none());
    }

    #[cfg(unix)]
    #[test]
    fn a_lock_on_a_file_removed_meanwhile_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".report.lock");
        let file = File::create(&path).unwrap();
        assert!(names_file(&path, &file).unwrap());
        fs::remove_file(&path).unwrap();
        assert!(!names_file(&path, &file).unwrap());
        File::create(&path).unwrap();
        assert!(!names_file(&path, &file).unwrap());
    }
}
