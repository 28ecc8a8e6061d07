//! One module per subcommand: argument parsing at the edge, the work in the library crates.

pub mod bench;
pub mod bench_bank;
pub mod bench_coreset;
pub mod bench_kernels;
pub mod bench_serve;
pub mod demo;
pub mod devices;
pub mod eda;
pub mod eval;
pub mod features;
pub mod fetch;
pub mod fit;
pub mod predict;
pub mod serve;
