//! The integration tests, in one binary to keep CI's build lean.

mod autoencoder;
mod backbone;
mod cli;
mod common;
mod data;
mod detector;
mod efficientnet;
mod kernels;
mod metrics;
mod outputs;
mod report;
mod weights;
