//! The integration tests, in one binary to keep CI's build lean.

mod autoencoder;
mod backbone;
mod bench_serve;
mod browser;
mod cli;
mod common;
mod corrupt;
mod data;
mod detector;
mod efficientnet;
mod fuzz;
mod hostile;
mod kernels;
mod metrics;
mod outputs;
mod patch_features;
mod patchcore;
mod report;
mod serve_faults;
mod weights;
