//! Scratch files (a fit's spilled training patches): data a run writes and reads back, and that must not
//! outlive it.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::FsError;

/// A file in a folder that goes away with the run: unnamed (`O_TMPFILE`) on Linux where the file system
/// allows it, so that even a killed run leaves nothing; elsewhere a named temporary file, removed when
/// dropped.
pub struct ScratchFile {
    file: File,
    /// Removes the named file when dropped.
    _named: Option<tempfile::TempPath>,
    /// The file's name, or its folder's with a note that it has no name, for messages.
    shown: PathBuf,
}

impl ScratchFile {
    /// A new scratch file in `folder`; a named one is called `<prefix>XXXXXX<suffix>`.
    pub fn create_in(folder: &Path, prefix: &str, suffix: &str) -> Result<Self, FsError> {
        #[cfg(target_os = "linux")]
        if let Some(file) = crate::unnamed::create_in(folder) {
            let shown = folder.join(format!("(unnamed {prefix}…{suffix})"));
            return Ok(Self { file, _named: None, shown });
        }
        let named = tempfile::Builder::new()
            .prefix(prefix)
            .suffix(suffix)
            .tempfile_in(folder)
            .map_err(|e| FsError::new(folder, "creating a scratch file", e))?;
        let shown = named.path().to_path_buf();
        let (file, path) = named.into_parts();
        Ok(Self { file, _named: Some(path), shown })
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Where the file is, for messages.
    pub fn shown(&self) -> &Path {
        &self.shown
    }
}

impl Write for ScratchFile {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.file.write(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scratch_file_reads_back_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut scratch = ScratchFile::create_in(dir.path(), ".scratch-", ".bin").unwrap();
        scratch.write_all(b"spilled").unwrap();
        assert_eq!(scratch.file().metadata().unwrap().len(), 7);
        assert!(scratch.shown().starts_with(dir.path()));
        // Unnamed on Linux: nothing in the folder even while it is open.
        let visible = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(visible <= 1);
        drop(scratch);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(ScratchFile::create_in(&dir.path().join("missing"), ".scratch-", ".bin").is_err());
    }
}
