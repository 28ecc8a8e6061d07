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
    if args.json {
        let list: Vec<_> = adapters
            .iter()
            .map(|a| {
                serde_json::json!({
                    "name": a.name, "backend": a.backend, "device_type": a.device_type, "hardware": a.is_hardware
                })
            })
            .collect();
        outln!("{}", serde_json::json!({ "adapters": list, "auto": auto }))?;
        return Ok(());
    }
    if adapters.is_empty() {
        outln!("no wgpu adapter found")?;
    }
    for adapter in &adapters {
        let kind = if adapter.is_hardware { "GPU" } else { "software" };
        outln!("{adapter}  [{kind}]")?;
    }
    match auto {
        "wgpu" => outln!("--device auto picks wgpu (a hardware adapter is present)")?,
        _ => outln!("--device auto picks cpu: no hardware GPU adapter; software Vulkan is slower than the CPU")?,
    }
    Ok(())
}
