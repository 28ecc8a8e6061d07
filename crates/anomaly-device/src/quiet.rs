//! Muting standard error around the driver calls that print to it: Mesa's Vulkan device-select layer
//! writes `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` straight to file descriptor 2
//! (through libwayland) whenever adapters are enumerated outside a Wayland session, which is noise for a
//! run that then works on the CPU or on the adapter it found anyway.

use std::sync::{Mutex, PoisonError};

/// Runs `f` with file descriptor 2 pointed at the null device, and points it back afterwards (on a panic
/// too). Anything else the process writes to stderr meanwhile is lost as well, so `f` must be short and
/// run where nothing else reports (device start-up); errors of `f` travel in its return value.
pub(crate) fn stderr_muted<T>(f: impl FnOnce() -> T) -> T {
    // One muting at a time: overlapping ones would each put back what the other had put in place.
    static MUTING: Mutex<()> = Mutex::new(());
    let _one = MUTING.lock().unwrap_or_else(PoisonError::into_inner);
    let _muted = imp::Muted::start();
    f()
}

#[cfg(unix)]
mod imp {
    use std::fs::OpenOptions;
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};

    /// Standard error redirected; holds a duplicate of the original to put back.
    pub(super) struct Muted {
        original: OwnedFd,
    }

    impl Muted {
        /// Redirects stderr to the null device; `None` (and stderr left alone) if that cannot be done.
        pub(super) fn start() -> Option<Self> {
            let original = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
            let null = OpenOptions::new().write(true).open("/dev/null").ok()?;
            // SAFETY: `dup2` only makes descriptor 2 refer to the open file `null` refers to; both
            // descriptors are valid for the whole call, and no Rust object owns descriptor 2's file.
            let redirected = unsafe { libc::dup2(null.as_raw_fd(), libc::STDERR_FILENO) };
            (redirected == libc::STDERR_FILENO).then_some(Self { original })
        }
    }

    impl Drop for Muted {
        fn drop(&mut self) {
            // SAFETY: as above, with the duplicate of the original stderr this guard owns.
            unsafe { libc::dup2(self.original.as_raw_fd(), libc::STDERR_FILENO) };
        }
    }
}

#[cfg(not(unix))]
mod imp {
    /// Elsewhere the drivers do not print this noise; nothing is redirected.
    pub(super) struct Muted;

    impl Muted {
        pub(super) fn start() -> Option<Self> {
            Some(Self)
        }
    }
}
