use std::path::PathBuf;

use anomaly_backbone::BackboneName;
use anomaly_data::{Dataset, SyntheticConfig, write_synthetic_dataset};
use anomaly_eval::{Evaluation, ModelSource};
use anomaly_fs::ReportWriter;
use anomaly_method::{MemoryBankSettings, MethodName, MethodSettings};
use anyhow::Result;

use super::eval::print_summary;
use crate::args::{ReportArgs, RunArgs};
use crate::output::note;
use anomaly_method::count_in;

/// `anomaly demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Folder for the synthetic dataset (`data/`) and the report with the fitted model (`report/`).
    #[arg(long, default_value = "anomaly-demo", value_name = "DIR")]
    out: PathBuf,
    /// Seed of the synthetic images.
    #[arg(long = "data-seed", default_value_t = 7)]
    data_seed: u64,
    /// Side of the synthetic images, in pixels.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(32..=4096))]
    size: u32,
    /// Good training images.
    #[arg(long, default_value_t = 60, value_parser = count_in(1, 100_000))]
    train: usize,
    /// Good test images.
    #[arg(long, default_value_t = 16, value_parser = count_in(0, 100_000))]
    test_good: usize,
    /// Test images per defect type (cut, hole, missing_thread, stain).
    #[arg(long, default_value_t = 8, value_parser = count_in(0, 100_000))]
    per_defect: usize,
    /// The ImageNet backbone whose pooled features fill the bank.
    #[arg(long, value_enum, ignore_case = true, default_value_t = BackboneName::EfficientNetLite0)]
    backbone: BackboneName,
    #[command(flatten)]
    memory_bank: MemoryBankSettings,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    options: ReportArgs,
}

pub fn run(args: Args) -> Result<()> {
    let settings = MethodSettings { backbone: args.backbone, memory_bank: args.memory_bank, ..MethodSettings::default() };
    anomaly_method::check(MethodName::MemoryBank, &settings, args.train)?;
    let report = args.out.join("report");
    let writer = ReportWriter::start(&report)?;
    let data = args.out.join("data");
    let synthetic = SyntheticConfig {
        seed: args.data_seed,
        size: args.size,
        train: args.train,
        test_good: args.test_good,
        per_defect: args.per_defect,
    };
    write_synthetic_dataset(&data, &synthetic)?;
    note!("synthetic woven fabric: {} (seed {})", data.display(), synthetic.seed);
    let dataset = Dataset { name: "synthetic woven fabric".into(), ..Dataset::mvtec(&data)? };
    let runtime = args.run.runtime()?;
    note!("{} on {}", settings.backbone, runtime.device().describe());
    let source = ModelSource::Fit { method: MethodName::MemoryBank, settings: &settings };
    let Evaluation { summary, report } = anomaly_eval::evaluate(&dataset, source, &runtime, &args.options.options(report))?;
    writer.finish(&report)?;
    print_summary(&summary, args.options.json)
}
