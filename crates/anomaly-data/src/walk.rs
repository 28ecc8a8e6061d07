//! Finding the image files under a folder without ever looping: every folder is read at most once (by
//! device and inode, so a symbolic link back up the tree, or two links to one folder, cannot repeat or
//! hang a walk), and whatever is passed over is named, not dropped silently.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::DataError;

const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// Something a walk passed over, with why, for the user to see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The path as the walk met it.
    pub path: PathBuf,
    /// Why it was not read.
    pub reason: SkipReason,
}

/// Why a walk passed over a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// A link to a folder the walk has already read (at `first`): following it would repeat or loop.
    FolderAlreadyRead { first: PathBuf },
    /// A symbolic link whose target does not exist.
    BrokenLink,
    /// A name with an image extension that is not a regular file (a FIFO, socket or device).
    NotAFile,
    /// A file outside the folders a dataset layout reads (e.g. directly in `test/`).
    OutsideLayout,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.path.display();
        match &self.reason {
            SkipReason::FolderAlreadyRead { first } => {
                write!(f, "skipped {path}: the folder {} again (a link loop or a second link)", first.display())
            }
            SkipReason::BrokenLink => write!(f, "skipped {path}: a link to nothing"),
            SkipReason::NotAFile => write!(f, "skipped {path}: not a regular file"),
            SkipReason::OutsideLayout => write!(f, "skipped {path}: not inside a defect folder"),
        }
    }
}

/// The images a walk found (sorted) and what it passed over.
#[derive(Clone, Debug, Default)]
pub struct ImageFiles {
    pub files: Vec<PathBuf>,
    pub skipped: Vec<Skipped>,
}

/// A folder's identity: two paths to one folder (through links or bind mounts) have the same one.
#[derive(Clone, PartialEq, Eq, Hash)]
struct FolderId(#[cfg(unix)] (u64, u64), #[cfg(not(unix))] PathBuf);

impl FolderId {
    #[cfg(unix)]
    fn of(_path: &Path, metadata: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self((metadata.dev(), metadata.ino()))
    }

    #[cfg(not(unix))]
    fn of(path: &Path, _metadata: &std::fs::Metadata) -> Self {
        Self(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
    }
}

/// A walk over one or several folders that reads each folder at most once, remembering what it passed over.
pub(crate) struct Walk {
    read: HashMap<FolderId, PathBuf>,
    pub(crate) skipped: Vec<Skipped>,
}

impl Walk {
    /// A walk that never enters `layout` (the folders of a dataset's layout itself, which a link inside
    /// them could otherwise lead back to).
    pub(crate) fn new(layout: &[&Path]) -> Self {
        let read =
            layout.iter().filter_map(|path| Some((FolderId::of(path, &std::fs::metadata(path).ok()?), path.to_path_buf()))).collect();
        Self { read, skipped: Vec::new() }
    }

    /// Every image under `root` and all its subfolders, sorted, and what was passed over.
    pub(crate) fn walk(mut self, root: &Path) -> Result<ImageFiles, DataError> {
        let files = self.images(root)?;
        Ok(ImageFiles { files, skipped: self.skipped })
    }

    /// Every image under `root` and its subfolders (sorted), none of them in a folder this walk has read
    /// before; `root` itself already read gives none and is noted.
    pub(crate) fn images(&mut self, root: &Path) -> Result<Vec<PathBuf>, DataError> {
        let metadata = std::fs::metadata(root).map_err(|e| DataError::io(root, e))?;
        if !self.enter(root, &metadata) {
            return Ok(Vec::new());
        }
        let mut files = Vec::new();
        // Depth first, in name order, so that the first of two ways to one folder is the one read.
        let mut pending = vec![root.to_path_buf()];
        while let Some(folder) = pending.pop() {
            let mut subfolders = Vec::new();
            for entry in sorted_entries(&folder)? {
                match entry_kind(&entry)? {
                    EntryKind::Folder(metadata) => {
                        if self.enter(&entry, &metadata) {
                            subfolders.push(entry);
                        }
                    }
                    EntryKind::File if has_image_extension(&entry) => files.push(entry),
                    EntryKind::File => {}
                    EntryKind::Other if has_image_extension(&entry) => {
                        self.skipped.push(Skipped { path: entry, reason: SkipReason::NotAFile })
                    }
                    EntryKind::Other => {}
                    EntryKind::BrokenLink => self.skipped.push(Skipped { path: entry, reason: SkipReason::BrokenLink }),
                }
            }
            pending.extend(subfolders.into_iter().rev());
        }
        files.sort();
        Ok(files)
    }

    /// Marks a folder read; false (and noted) if it was read before under any name.
    fn enter(&mut self, path: &Path, metadata: &std::fs::Metadata) -> bool {
        match self.read.entry(FolderId::of(path, metadata)) {
            std::collections::hash_map::Entry::Occupied(first) => {
                self.skipped
                    .push(Skipped { path: path.to_path_buf(), reason: SkipReason::FolderAlreadyRead { first: first.get().clone() } });
                false
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(path.to_path_buf());
                true
            }
        }
    }
}

enum EntryKind {
    Folder(std::fs::Metadata),
    File,
    Other,
    BrokenLink,
}

/// What a folder entry is, following links.
fn entry_kind(path: &Path) -> Result<EntryKind, DataError> {
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_dir() => Ok(EntryKind::Folder(metadata)),
        Ok(metadata) if metadata.is_file() => Ok(EntryKind::File),
        Ok(_) => Ok(EntryKind::Other),
        Err(error) => match std::fs::symlink_metadata(path) {
            // A link to nothing, or a link loop (ELOOP) between links themselves.
            Ok(link) if link.file_type().is_symlink() => Ok(EntryKind::BrokenLink),
            _ => Err(DataError::io(path, error)),
        },
    }
}

/// A folder's entries, sorted by name.
pub(crate) fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let read = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut entries = read.map(|entry| entry.map(|e| e.path())).collect::<Result<Vec<_>, _>>().map_err(|e| DataError::io(dir, e))?;
    entries.sort();
    Ok(entries)
}

/// Whether a name ends in one of the image extensions (any case).
pub(crate) fn has_image_extension(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|known| e.eq_ignore_ascii_case(known)))
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"x").unwrap();
    }

    #[test]
    fn a_link_back_up_the_tree_is_read_once_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(&root.join("a.png"));
        touch(&root.join("sub/b.png"));
        symlink(".", root.join("x")).unwrap();
        symlink("..", root.join("sub/up")).unwrap();
        let walk = Walk::new(&[]).walk(root).unwrap();
        assert_eq!(walk.files, [root.join("a.png"), root.join("sub/b.png")]);
        let skipped: Vec<_> = walk.skipped.iter().map(|s| s.path.clone()).collect();
        assert_eq!(skipped, [root.join("x"), root.join("sub/up")]);
        assert_eq!(walk.skipped[0].reason, SkipReason::FolderAlreadyRead { first: root.to_path_buf() });
    }

    #[test]
    fn two_links_to_one_folder_read_it_once_under_the_first_name() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(&root.join("real/c.png"));
        symlink("real", root.join("alias")).unwrap();
        symlink("real", root.join("zz")).unwrap();
        let walk = Walk::new(&[]).walk(root).unwrap();
        assert_eq!(walk.files, [root.join("alias/c.png")]);
        assert_eq!(walk.skipped.len(), 2, "{:?}", walk.skipped);
    }

    #[test]
    fn broken_links_fifos_and_link_cycles_are_skipped_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(&root.join("ok.png"));
        symlink("missing.png", root.join("broken.png")).unwrap();
        symlink("loop_b", root.join("loop_a")).unwrap();
        symlink("loop_a", root.join("loop_b")).unwrap();
        let fifo = root.join("pipe.png");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
        let walk = Walk::new(&[]).walk(root).unwrap();
        assert_eq!(walk.files, [root.join("ok.png")]);
        let reasons: Vec<_> = walk.skipped.iter().map(|s| (s.path.file_name().unwrap().to_owned(), s.reason.clone())).collect();
        assert_eq!(
            reasons,
            [
                ("broken.png".into(), SkipReason::BrokenLink),
                ("loop_a".into(), SkipReason::BrokenLink),
                ("loop_b".into(), SkipReason::BrokenLink),
                ("pipe.png".into(), SkipReason::NotAFile),
            ]
        );
    }
}
