//! Where the work runs: the choice between a GPU through wgpu and burn's CPU backend, and the one wgpu
//! context (instance, adapter, device, queue) that burn and our own kernels share.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use burn::tensor::Device;
use burn::tensor::wgpu::{WgpuSetup, wgpu};

/// What the user asked for with `--device`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// A real GPU adapter when there is one, else the CPU backend: a software Vulkan adapter (llvmpipe)
    /// runs convolutions ~30× slower than burn's CPU backend.
    #[default]
    Auto,
    /// wgpu on whatever adapter it picks, software ones included.
    Wgpu,
    /// burn's pure-Rust CPU backend (burn-flex).
    Cpu,
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "wgpu" | "gpu" => Ok(Self::Wgpu),
            "cpu" => Ok(Self::Cpu),
            _ => Err(DeviceError::UnknownChoice(s.into())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Wgpu => "wgpu",
            Self::Cpu => "cpu",
        })
    }
}

/// Why no device could be had.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device '{0}': use auto, wgpu or cpu")]
    UnknownChoice(String),
    #[error(
        "no wgpu adapter could be started ({0}); install a Vulkan, Metal or DX12 driver \
         (on Debian without a GPU: apt-get install mesa-vulkan-drivers), or use --device cpu"
    )]
    NoAdapter(String),
}

/// One graphics adapter as wgpu reports it.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    /// Whether it is real hardware rather than a software rasteriser such as llvmpipe.
    pub is_hardware: bool,
}

impl Adapter {
    fn from_info(info: &wgpu::AdapterInfo) -> Self {
        Self {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            is_hardware: !matches!(info.device_type, wgpu::DeviceType::Cpu),
        }
    }
}

impl fmt::Display for Adapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {})", self.name, self.backend, self.device_type)
    }
}

/// Every adapter wgpu can see on this machine.
pub fn list_adapters() -> Vec<Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .iter()
        .map(|adapter| Adapter::from_info(&adapter.get_info()))
        .collect()
}

/// The device a choice resolves to, with a line that tells the user what was picked.
#[derive(Clone, Debug)]
pub struct ResolvedDevice {
    pub device: Device,
    /// The wgpu adapter, when the work runs on wgpu.
    pub adapter: Option<Adapter>,
}

impl ResolvedDevice {
    /// A short description such as `wgpu: llvmpipe (LLVM 15.0.6) (Vulkan, Cpu)` or `cpu: burn-flex`.
    pub fn describe(&self) -> String {
        match &self.adapter {
            Some(adapter) => format!("wgpu: {adapter}"),
            None => "cpu: burn-flex".into(),
        }
    }

    /// Whether the work runs on wgpu.
    pub fn is_wgpu(&self) -> bool {
        self.adapter.is_some()
    }
}

/// What `auto` would pick on this machine: the first hardware adapter, if any.
pub fn auto_picks_gpu(adapters: &[Adapter]) -> bool {
    adapters.iter().any(|a| a.is_hardware)
}

/// Resolves a `--device` choice to a device, starting the shared wgpu context if needed.
pub fn resolve(choice: DeviceChoice) -> Result<ResolvedDevice, DeviceError> {
    let use_wgpu = match choice {
        DeviceChoice::Cpu => false,
        DeviceChoice::Wgpu => true,
        DeviceChoice::Auto => auto_picks_gpu(&list_adapters()),
    };
    if !use_wgpu {
        return Ok(ResolvedDevice { device: Device::flex(), adapter: None });
    }
    let context = GpuContext::get()?;
    Ok(ResolvedDevice { device: context.device.clone(), adapter: Some(context.adapter.clone()) })
}

/// The process's one wgpu context: burn's device and the raw wgpu handles behind it, so that our own
/// compute shaders run on the same device and queue as the backbone.
pub struct GpuContext {
    /// burn's device on this adapter.
    pub device: Device,
    /// The instance, adapter, device and queue burn runs on.
    pub setup: WgpuSetup,
    /// What the adapter is.
    pub adapter: Adapter,
}

impl GpuContext {
    /// Starts the context on first use (wgpu's default adapter choice, high-performance first) and returns
    /// it on every later call.
    pub fn get() -> Result<&'static GpuContext, DeviceError> {
        static CONTEXT: OnceLock<Result<GpuContext, String>> = OnceLock::new();
        CONTEXT
            .get_or_init(|| {
                let (device, setup) = Device::wgpu_options().init_with_setup().map_err(|e| e.to_string())?;
                let adapter = Adapter::from_info(&setup.adapter.get_info());
                Ok(GpuContext { device, setup, adapter })
            })
            .as_ref()
            .map_err(|e| DeviceError::NoAdapter(e.clone()))
    }
}
