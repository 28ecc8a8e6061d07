//! A regular file's bytes, read whole or, when large, memory-mapped: model files with banks larger than
//! memory are read by the pages scoring touches, and those pages can be released again.

use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

use crate::FsError;

/// Files above this size are memory-mapped rather than read ([`FileBytes::open`]).
pub const MAP_FILES_ABOVE: u64 = 256 << 20;

/// A regular file's bytes, shared cheaply (clones share them).
#[derive(Clone)]
pub struct FileBytes(Arc<Storage>);

enum Storage {
    Read(Vec<u8>),
    Mapped(Mmap),
}

impl FileBytes {
    /// Reads `path` whole, or maps it read-only when it is larger than `map_above` bytes: a folder, a FIFO
    /// or a device (`--model /dev/zero`) is refused instead of blocking or filling memory. A mapped file
    /// must not be rewritten in place while in use (our writers replace files by renaming).
    pub fn open(path: &Path, map_above: u64) -> Result<Self, FsError> {
        let (file, len) = crate::open_regular_file(path)?;
        if len > map_above {
            // SAFETY: mapped read-only and never written through; the file is replaced by renaming, which
            // leaves this mapping's inode whole.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| FsError::new(path, "memory-mapping", e))?;
            return Ok(Self(Arc::new(Storage::Mapped(map))));
        }
        Ok(Self(Arc::new(Storage::Read(crate::read_whole(file, len, path)?))))
    }

    /// Bytes already in memory.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        Self(Arc::new(Storage::Read(bytes)))
    }

    /// The mapping, when the file is memory-mapped (for releasing pages read once).
    pub fn map(&self) -> Option<&Mmap> {
        match &*self.0 {
            Storage::Mapped(map) => Some(map),
            Storage::Read(_) => None,
        }
    }
}

impl Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &*self.0 {
            Storage::Read(bytes) => bytes,
            Storage::Mapped(map) => map,
        }
    }
}

impl std::fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileBytes({} bytes{})", self.len(), if self.map().is_some() { ", mapped" } else { "" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_files_are_read_large_ones_mapped_with_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let content: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let read = FileBytes::open(&path, MAP_FILES_ABOVE).unwrap();
        assert!(read.map().is_none());
        let mapped = FileBytes::open(&path, 100).unwrap();
        assert!(mapped.map().is_some());
        assert_eq!(&*read, &content[..]);
        assert_eq!(&*mapped, &content[..]);
        assert!(FileBytes::open(dir.path(), 0).unwrap_err().to_string().contains("not a regular file"));
    }
}
