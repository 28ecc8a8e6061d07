//! Unnamed files (Linux's `O_TMPFILE`): an output's content is written into a file that has no name in
//! its folder, so a process killed while writing leaves nothing, and it is linked to a name only once whole.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// An unnamed file in `folder`, open for reading and writing; `None` where the file system has none (the
/// caller then writes a named temporary file).
pub(crate) fn create_in(folder: &Path) -> Option<File> {
    let folder = CString::new(folder.as_os_str().as_bytes()).ok()?;
    // SAFETY: a valid NUL-terminated path; on success the descriptor is new and owned by the File below.
    let fd = unsafe { libc::open(folder.as_ptr(), libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC, 0o600) };
    // SAFETY: `fd` is an open descriptor no one else owns.
    (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
}

/// Gives the unnamed `file` the name `name` (in the folder it was made in), through `/proc/self/fd`, which
/// needs no privilege; an existing `name` is an `AlreadyExists` error.
pub(crate) fn link(file: &File, name: &Path) -> io::Result<()> {
    let source = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let name = CString::new(name.as_os_str().as_bytes())?;
    // SAFETY: both paths are valid NUL-terminated strings; linkat only adds a directory entry.
    let linked = unsafe { libc::linkat(libc::AT_FDCWD, source.as_ptr(), libc::AT_FDCWD, name.as_ptr(), libc::AT_SYMLINK_FOLLOW) };
    if linked == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}
