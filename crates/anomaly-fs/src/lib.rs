//! PLACEHOLDER (replaced by the platform branch's crate at merge).

use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("writing {}: {source}", path.display())]
pub struct FsError {
    path: PathBuf,
    source: std::io::Error,
}

/// Writes `bytes` to `path` whole or not at all.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    let fail = |source| FsError { path: path.into(), source };
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let mut staged = tempfile::NamedTempFile::new_in(dir).map_err(fail)?;
    staged.write_all(bytes).and_then(|()| staged.as_file().sync_all()).map_err(fail)?;
    staged.persist(path).map_err(|e| fail(e.error))?;
    Ok(())
}
