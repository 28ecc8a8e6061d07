//! Writing files and folders whole or not at all, so that a crash, a full disk or a second process never
//! leaves a reader with half a model, half a weights file or half a dataset: everything is written under a
//! temporary name in the same folder, flushed to the disk, then renamed into place (a rename within one
//! file system is atomic); on Linux the content is written into an unnamed file (`O_TMPFILE`) and named
//! only once it is whole, so that even a kill leaves no temporary file behind. Report folders are built the same way as a whole, by one run at a time
//! ([`ReportWriter`]).

mod file_bytes;
mod lock;
mod report;
mod scratch;
#[cfg(target_os = "linux")]
mod unnamed;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use tempfile::{NamedTempFile, TempDir};

pub use file_bytes::{FileBytes, MAP_FILES_ABOVE};
pub use lock::OutputLock;
pub use report::{OutputError, REPORT_MARKER, ReportContent, ReportWriter, check_file_output, check_folder_output};
pub use scratch::ScratchFile;

/// A file or folder that could not be written, named, with what was being done to it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {action}: {source}", path.display())]
pub struct FsError {
    /// The file or folder the failure concerns.
    pub path: PathBuf,
    /// What was being done, e.g. "writing" or "renaming into place".
    pub action: &'static str,
    #[source]
    pub source: io::Error,
}

impl FsError {
    /// An error about `path` while doing `action`.
    pub fn new(path: impl Into<PathBuf>, action: &'static str, source: io::Error) -> Self {
        Self { path: path.into(), action, source }
    }
}

/// Reads a regular file whole: a folder, a FIFO or a device (`--model /dev/zero`) is refused instead of
/// blocking or filling memory.
pub fn read_regular_file(path: &Path) -> Result<Vec<u8>, FsError> {
    let (file, len) = open_regular_file(path)?;
    read_whole(file, len, path)
}

/// `path` opened for reading, with its length, if it is a regular file.
fn open_regular_file(path: &Path) -> Result<(File, u64), FsError> {
    let file = File::open(path).map_err(|e| FsError::new(path, "reading", e))?;
    let metadata = file.metadata().map_err(|e| FsError::new(path, "reading", e))?;
    if !metadata.is_file() {
        return Err(FsError::new(path, "reading", io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")));
    }
    Ok((file, metadata.len()))
}

/// The rest of `file` (of `len` bytes), read into memory; `path` names it in errors.
fn read_whole(mut file: File, len: u64, path: &Path) -> Result<Vec<u8>, FsError> {
    let mut bytes = Vec::with_capacity(len as usize);
    io::Read::read_to_end(&mut file, &mut bytes).map_err(|e| FsError::new(path, "reading", e))?;
    Ok(bytes)
}

/// Writes `bytes` to `path` atomically: readers see the old content or the new, never a mixture, and the
/// new content is on the disk when this returns. The file gets mode 0644 on Unix; missing parent folders
/// are created.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    write_atomic_with(path, |file| file.write_all(bytes).map_err(|e| FsError::new(path, "writing", e)))
}

/// As [`write_atomic`], with the content streamed by `write` into the temporary file (a download, an
/// encoder). If `write` fails, nothing is put in place and the temporary file is removed; its error is
/// returned as it is.
pub fn write_atomic_with<T, E: From<FsError>>(path: &Path, write: impl FnOnce(&mut File) -> Result<T, E>) -> Result<T, E> {
    let folder = parent(path);
    fs::create_dir_all(folder).map_err(|e| FsError::new(folder, "creating the folder", e))?;
    #[cfg(target_os = "linux")]
    if let Some(mut file) = unnamed::create_in(folder) {
        let value = write(&mut file)?;
        file.flush().and_then(|()| file.sync_all()).map_err(|e| FsError::new(path, "flushing to disk", e))?;
        set_readable(&file).map_err(|e| FsError::new(path, "setting its permissions", e))?;
        // Named only now that it is whole and on disk: a kill before this leaves nothing behind.
        let named = tempfile::Builder::new()
            .prefix(&temp_prefix(path))
            .make_in(folder, |temp| unnamed::link(&file, temp))
            .map_err(|e| FsError::new(folder, "naming the written file", e))?;
        named.persist(path).map_err(|e| FsError::new(path, "renaming into place", e.error))?;
        sync_folder(folder).map_err(|e| FsError::new(folder, "flushing to disk", e))?;
        return Ok(value);
    }
    let mut temp =
        NamedTempFile::with_prefix_in(temp_prefix(path), folder).map_err(|e| FsError::new(folder, "creating a temporary file", e))?;
    let value = write(temp.as_file_mut())?;
    let file = temp.as_file_mut();
    file.flush().and_then(|()| file.sync_all()).map_err(|e| FsError::new(path, "flushing to disk", e))?;
    set_readable(file).map_err(|e| FsError::new(path, "setting its permissions", e))?;
    temp.persist(path).map_err(|e| FsError::new(path, "renaming into place", e.error))?;
    sync_folder(folder).map_err(|e| FsError::new(folder, "flushing to disk", e))?;
    Ok(value)
}

/// An empty folder beside `target` (so on the same file system) to build a folder's new content in before
/// [`replace_dir`] puts it in place; removed when dropped, so a failed build leaves nothing behind. It is
/// named `.NAME.staging-XXXXXX` and readable by others (mode 0755 on Unix), as the folder it becomes.
pub fn staging_dir(target: &Path) -> Result<TempDir, FsError> {
    let folder = parent(target);
    fs::create_dir_all(folder).map_err(|e| FsError::new(folder, "creating the folder", e))?;
    let staging = tempfile::Builder::new()
        .prefix(&leftover_prefix(target, STAGING))
        .tempdir_in(folder)
        .map_err(|e| FsError::new(folder, "creating a staging folder", e))?;
    set_folder_readable(staging.path()).map_err(|e| FsError::new(staging.path(), "setting its permissions", e))?;
    Ok(staging)
}

/// Puts the folder built in `staging` at `target`, flushed to disk, replacing any folder there. On Linux an
/// existing folder is swapped with the new one in one step (`renameat2(RENAME_EXCHANGE)`), so that
/// `target` always names a whole folder, and the old content, now at the staging name, is removed.
/// Elsewhere (or on a file system without the swap) the old folder is moved aside, not deleted, until the
/// new one is in place, and moved back if that fails; only then is it removed. A crash in between leaves
/// the old content beside `target` under a hidden `.NAME.staging-*` or `.NAME.old-*` name, which
/// [`ReportWriter::start`] removes for reports.
pub fn replace_dir(staging: TempDir, target: &Path) -> Result<(), FsError> {
    sync_tree(staging.path())?;
    let folder = parent(target);
    if fs::symlink_metadata(target).is_ok_and(|old| old.is_dir()) {
        match exchange(staging.path(), target) {
            Ok(()) => {
                sync_folder(folder).map_err(|e| FsError::new(folder, "flushing to disk", e))?;
                // The staging name now holds the old content.
                let old = staging.keep();
                return fs::remove_dir_all(&old).map_err(|e| FsError::new(&old, "removing the old content", e));
            }
            // Dropping `staging` removes the new content.
            Err(e) if !swap_unsupported(&e) => return Err(FsError::new(target, "swapping the new content into place", e)),
            // The file system cannot swap: move the old folder aside instead.
            Err(_) => {}
        }
    }
    move_aside_and_replace(staging, target)
}

/// [`replace_dir`] without the swap: the old content moved aside, the new renamed into place, the old
/// removed.
fn move_aside_and_replace(staging: TempDir, target: &Path) -> Result<(), FsError> {
    let folder = parent(target);
    let aside = match fs::symlink_metadata(target) {
        Ok(old) => {
            let aside = tempfile::Builder::new()
                .prefix(&leftover_prefix(target, OLD))
                .tempdir_in(folder)
                .map_err(|e| FsError::new(folder, "creating a place for the old content", e))?
                .keep();
            // Renaming onto an empty folder works on Unix only; elsewhere the name has to be free.
            fs::remove_dir(&aside).map_err(|e| FsError::new(&aside, "preparing a place for the old content", e))?;
            fs::rename(target, &aside).map_err(|e| FsError::new(target, "moving the old content aside", e))?;
            Some((aside, old.is_dir()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(FsError::new(target, "reading", e)),
    };
    let staged = staging.keep();
    if let Err(e) = fs::rename(&staged, target) {
        if let Some((aside, _)) = &aside {
            // Best effort: the error below is what the caller needs to see.
            let _ = fs::rename(aside, target);
        }
        let _ = fs::remove_dir_all(&staged);
        return Err(FsError::new(target, "renaming into place", e));
    }
    sync_folder(folder).map_err(|e| FsError::new(folder, "flushing to disk", e))?;
    if let Some((aside, was_dir)) = aside {
        let removed = if was_dir { fs::remove_dir_all(&aside) } else { fs::remove_file(&aside) };
        removed.map_err(|e| FsError::new(&aside, "removing the old content", e))?;
    }
    Ok(())
}

/// The folder `path` is in; `.` for a bare file name.
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder,
        _ => Path::new("."),
    }
}

/// `.NAME.` — temporary names that say what they stand in for and stay hidden in listings.
fn temp_prefix(path: &Path) -> String {
    format!(".{}.", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default())
}

/// What a staging folder's name says after `.NAME.`.
const STAGING: &str = "staging-";
/// What the name of old content moved aside says after `.NAME.`.
const OLD: &str = "old-";

/// `.NAME.staging-` or `.NAME.old-`: the names a folder replacement leaves when it is interrupted, each
/// followed by tempfile's six random letters and digits.
fn leftover_prefix(target: &Path, kind: &str) -> String {
    format!("{}{kind}", temp_prefix(target))
}

/// Swaps two paths in one step.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let a = CString::new(a.as_os_str().as_bytes())?;
    let b = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths that live across the call; renameat2 reads nothing else.
    let status = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    if status == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Whether a failed swap means the kernel or file system cannot swap (rather than a real failure).
fn swap_unsupported(error: &io::Error) -> bool {
    #[cfg(target_os = "linux")]
    if matches!(error.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)) {
        return true;
    }
    error.kind() == io::ErrorKind::Unsupported
}

/// Mode 0644 on Unix: a temporary file starts at 0600, but results are meant to be read by others.
#[cfg(unix)]
fn set_readable(file: &File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(fs::Permissions::from_mode(0o644))
}

#[cfg(not(unix))]
fn set_readable(_file: &File) -> io::Result<()> {
    Ok(())
}

/// Mode 0755 on Unix: a temporary folder starts at 0700.
#[cfg(unix)]
fn set_folder_readable(folder: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(folder, fs::Permissions::from_mode(0o755))
}

#[cfg(not(unix))]
fn set_folder_readable(_folder: &Path) -> io::Result<()> {
    Ok(())
}

/// Flushes a folder's entries (a rename in it) to disk; Unix only, elsewhere a folder cannot be opened so.
#[cfg(unix)]
fn sync_folder(folder: &Path) -> io::Result<()> {
    File::open(folder)?.sync_all()
}

#[cfg(not(unix))]
fn sync_folder(_folder: &Path) -> io::Result<()> {
    Ok(())
}

/// Flushes every file and folder under `root` to disk, so that the rename that publishes it publishes
/// content that is there.
fn sync_tree(root: &Path) -> Result<(), FsError> {
    let entries = fs::read_dir(root).map_err(|e| FsError::new(root, "listing", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| FsError::new(root, "listing", e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| FsError::new(&path, "reading", e))?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            File::open(&path).and_then(|file| file.sync_all()).map_err(|e| FsError::new(&path, "flushing to disk", e))?;
        }
    }
    sync_folder(root).map_err(|e| FsError::new(root, "flushing to disk", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names in `folder`, hidden ones included, sorted.
    pub(crate) fn listing(folder: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(folder).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_file_is_written_with_its_folders_and_nothing_else_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/model.safetensors");
        write_atomic(&path, b"weights").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"weights");
        assert_eq!(listing(&dir.path().join("a/b")), ["model.safetensors"]);
    }

    #[cfg(unix)]
    #[test]
    fn a_written_file_has_mode_0644() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        write_atomic(&path, b"{}").unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
    }

    #[test]
    fn an_existing_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        fs::write(&path, "a much longer old content").unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(listing(dir.path()), ["out.txt"]);
    }

    #[test]
    fn a_failed_stream_leaves_the_old_file_and_no_temporary_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.pth");
        fs::write(&path, "old").unwrap();
        let result: Result<(), FsError> = write_atomic_with(&path, |file| {
            file.write_all(b"half a download").unwrap();
            Err(FsError::new(&path, "downloading", io::Error::other("connection reset")))
        });
        assert_eq!(result.unwrap_err().action, "downloading");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(listing(dir.path()), ["weights.pth"]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn while_content_is_written_the_folder_holds_no_new_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let seen = write_atomic_with(&path, |file| {
            file.write_all(b"half").map_err(|e| FsError::new(&path, "writing", e))?;
            Ok::<_, FsError>(listing(dir.path()))
        })
        .unwrap();
        assert!(seen.is_empty(), "a kill here would leave {seen:?}");
        assert_eq!(listing(dir.path()), ["model.safetensors"]);
        assert_eq!(fs::read(&path).unwrap(), b"half");
    }

    #[test]
    fn the_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // A folder stands where the file should go: the rename into place fails.
        let path = dir.path().join("taken");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), "x").unwrap();
        let error = write_atomic(&path, b"data").unwrap_err();
        assert_eq!(error.path, path);
        assert!(error.to_string().starts_with(&format!("{}: ", path.display())), "{error}");
        assert_eq!(listing(dir.path()), ["taken"]);
    }

    #[test]
    fn a_folder_replaces_the_old_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("dataset");
        fs::create_dir_all(target.join("old")).unwrap();
        fs::write(target.join("old/a.png"), "old").unwrap();
        let staging = staging_dir(&target).unwrap();
        fs::create_dir(staging.path().join("new")).unwrap();
        fs::write(staging.path().join("new/b.png"), "new").unwrap();
        replace_dir(staging, &target).unwrap();
        assert_eq!(listing(&target), ["new"]);
        assert_eq!(fs::read(target.join("new/b.png")).unwrap(), b"new");
        assert_eq!(listing(dir.path()), ["dataset"]);
    }

    #[test]
    fn a_folder_is_put_where_there_was_none() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("sub/dataset");
        let staging = staging_dir(&target).unwrap();
        fs::write(staging.path().join("marker"), "1").unwrap();
        replace_dir(staging, &target).unwrap();
        assert_eq!(listing(&target), ["marker"]);
        assert_eq!(listing(&dir.path().join("sub")), ["dataset"]);
    }

    #[test]
    fn a_dropped_staging_folder_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("dataset");
        let staging = staging_dir(&target).unwrap();
        fs::write(staging.path().join("half"), "x").unwrap();
        drop(staging);
        assert!(listing(dir.path()).is_empty());
    }
}
