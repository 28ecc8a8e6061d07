//! One module per subcommand: argument parsing at the edge, the work in the library crates.

pub mod bench;
pub mod bench_kernels;
pub mod devices;
pub mod features;
pub mod fetch;
