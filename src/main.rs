//! `anomaly`: learn what good parts look like from images, and flag the defective ones, on any GPU
//! through wgpu or on the CPU. The binary parses arguments, resolves the device, calls the libraries and
//! prints; see ARCHITECTURE.md.

mod args;
mod commands;
mod output;
mod weights;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::output::{StdoutClosed, note};

/// Industrial visual anomaly detection: ImageNet backbones, memory banks and GPU kernels, no Python.
#[derive(Parser)]
#[command(
    name = "anomaly",
    version,
    about,
    propagate_version = true,
    after_help = "Environment:\n  RAYON_NUM_THREADS  CPU threads (default: one per core)\n  \
                  ANOMALY_CPU_ISA    cap our CPU kernels' vector instructions: avx512, avx2 or baseline \
                  (default: all this processor has; `anomaly devices` shows which run)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a synthetic woven-fabric dataset, then fit, evaluate and write the report (fetching weights if needed).
    Demo(commands::demo::Args),
    /// Explore a dataset: counts, sizes, colour modes, channel statistics, defect areas, histograms, samples.
    Eda(commands::eda::Args),
    /// Fit a detector (the memory bank, or --method patchcore or autoencoder) to good images and save it.
    Fit(commands::fit::Args),
    /// Score images with a fitted model: score and verdict per image.
    Predict(commands::predict::Args),
    /// Serve a fitted model over HTTP (batched scoring, a web page at /, metrics, reload on SIGHUP).
    Serve(commands::serve::Args),
    /// Fit (or load) a model, score an MVTec AD category's test images, and write metrics, scores and plots.
    Eval(commands::eval::Args),
    /// Download a backbone's published weights into the weights folder (sha256-checked).
    FetchWeights(commands::fetch::Args),
    /// Run a backbone over images and save their features as safetensors.
    Features(commands::features::Args),
    /// List the GPU adapters wgpu sees, say which one `--device auto` picks, and which CPU kernels run.
    Devices(commands::devices::Args),
    /// Measure throughput (benchmarks print figures; nothing is asserted).
    #[command(subcommand)]
    Bench(commands::bench::Bench),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let done = |result: anyhow::Result<()>| result.map(|()| ExitCode::SUCCESS);
    // A cap on the CPU's instructions that does not parse would silently run uncapped: refuse it first.
    let result = anomaly_device::CpuIsa::requested().map_err(anyhow::Error::from).and_then(|_| match cli.command {
        Command::Demo(args) => done(commands::demo::run(args)),
        Command::Eda(args) => done(commands::eda::run(args)),
        Command::Fit(args) => done(commands::fit::run(args)),
        Command::Predict(args) => commands::predict::run(args),
        Command::Serve(args) => done(commands::serve::run(args)),
        Command::Eval(args) => done(commands::eval::run(args)),
        Command::FetchWeights(args) => done(commands::fetch::run(args)),
        Command::Features(args) => done(commands::features::run(args)),
        Command::Devices(args) => done(commands::devices::run(args)),
        Command::Bench(bench) => done(commands::bench::run(bench)),
    });
    match result {
        Ok(code) => code,
        // The reader of standard output has all it wanted (`| head`): stop quietly.
        Err(error) if error.is::<StdoutClosed>() => ExitCode::SUCCESS,
        Err(error) => {
            note!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
