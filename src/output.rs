//! Writing result files whole or not at all: to a temporary file beside the target, then renamed.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path` atomically, so that an interrupted run never leaves a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut staged = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("writing in {}", dir.display()))?;
    // Temporary files are private (0600); a result file should be as readable as any other.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        staged.as_file().set_permissions(std::fs::Permissions::from_mode(0o644)).with_context(|| format!("writing {}", path.display()))?;
    }
    staged.write_all(bytes).and_then(|()| staged.as_file().sync_all()).with_context(|| format!("writing {}", path.display()))?;
    staged.persist(path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
