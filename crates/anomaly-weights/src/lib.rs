//! Getting the published weights files: a catalog of where each one lives and its checksum, downloads
//! that are verified and written atomically, and errors that say how to put a file in place by hand
//! where the host cannot be reached.

mod catalog;
mod fetch;

pub use catalog::{CATALOG, Checksum, Source, WeightsSpec, find};
pub use fetch::{FetchOptions, Progress, WeightsError, ensure, sha256_file};
