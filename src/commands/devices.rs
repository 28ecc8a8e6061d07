use crate::output::outln;
use anyhow::Result;

/// `anomaly devices`.
#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let adapters = anomaly_device::list_adapters();
    let auto = if anomaly_device::auto_picks_gpu(&adapters) { "wgpu" } else { "cpu" };
    let (isa, detected) = (anomaly_device::CpuIsa::active(), anomaly_device::CpuIsa::detected());
    if args.json {
        let list: Vec<_> = adapters
            .iter()
            .map(|a| {
                serde_json::json!({
                    "name": a.name, "backend": a.backend, "device_type": a.device_type, "driver": a.driver, "hardware": a.is_hardware
                })
            })
            .collect();
        let cpu = serde_json::json!({
            "threads": rayon::current_num_threads(), "isa": isa.as_str(), "detected_isa": detected.as_str()
        });
        outln!("{}", serde_json::json!({ "adapters": list, "auto": auto, "cpu": cpu }))?;
        return Ok(());
    }
    if adapters.is_empty() {
        outln!("no wgpu adapter found")?;
    }
    for adapter in &adapters {
        let kind = if adapter.is_hardware { "GPU" } else { "software" };
        outln!("{adapter}  [{kind}]")?;
    }
    let capped = if isa < detected { format!(" ({} caps this {detected} processor)", anomaly_device::CpuIsa::ENV) } else { String::new() };
    outln!("cpu: {} threads, {isa} kernels{capped}", rayon::current_num_threads())?;
    match auto {
        "wgpu" => outln!("--device auto picks wgpu (a hardware adapter is present)")?,
        _ => outln!("--device auto picks cpu: no hardware GPU adapter; software Vulkan is slower than the CPU")?,
    }
    Ok(())
}
