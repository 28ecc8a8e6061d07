//! Where the work runs: the choice between a GPU through wgpu and the CPU, and the one wgpu
//! context (instance, adapter, device, queue) that burn and our own kernels share.

use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock, PoisonError};

use burn::tensor::Device;
use burn::tensor::wgpu::{WgpuSetup, wgpu};
use clap::ValueEnum;

mod quiet;

/// What the user asked for with `--device`; clap parses it and lists the choices in help texts from
/// this one definition (the variant docs are the help lines).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// A real GPU adapter when there is one, else the CPU: a software Vulkan adapter (llvmpipe) runs
    /// convolutions far slower than the CPU does (~30× slower than burn's CPU backend, which ours outrun).
    #[default]
    #[value(name = "auto")]
    Auto,
    /// wgpu on whatever adapter it picks, software ones included.
    #[value(name = "wgpu", alias = "gpu")]
    Wgpu,
    /// The CPU: the backbones and methods in our own kernels, the autoencoder in burn's pure-Rust CPU backend (burn-flex).
    #[value(name = "cpu")]
    Cpu,
}

impl DeviceChoice {
    /// The name `--device` takes, as help texts and messages spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Wgpu => "wgpu",
            Self::Cpu => "cpu",
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    /// Case-insensitive, aliases included: the same names clap accepts.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <Self as ValueEnum>::from_str(s, true).map_err(|_| DeviceError::UnknownChoice(s.into()))
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The accepted `--device` names, for messages.
fn choice_names() -> String {
    let names: Vec<&str> = DeviceChoice::value_variants().iter().map(|choice| choice.as_str()).collect();
    names.join(", ")
}

/// Why no device could be had.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device '{0}': use {choices}", choices = choice_names())]
    UnknownChoice(String),
    #[error(
        "no wgpu adapter could be started ({0}); install a Vulkan, Metal or DX12 driver \
         (on Debian without a GPU: apt-get install mesa-vulkan-drivers), or use --device cpu"
    )]
    NoAdapter(String),
    #[error("{var} is '{0}': use avx512, avx2 or baseline, or unset it to use all this processor has", var = CpuIsa::ENV)]
    UnknownCpuIsa(String),
}

/// One graphics adapter as wgpu reports it.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    /// The driver's own version string (Vulkan's `driverInfo`: "Mesa 22.3.6 (LLVM 15.0.6)" for
    /// llvmpipe, the driver release on a GPU); empty where the backend gives none. llvmpipe's speed
    /// changes more with the Mesa release than the adapter name shows (see the README).
    pub driver: String,
    /// Whether it is real hardware rather than a software rasteriser such as llvmpipe.
    pub is_hardware: bool,
}

impl Adapter {
    fn from_info(info: &wgpu::AdapterInfo) -> Self {
        Self {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: info.driver_info.trim().to_owned(),
            is_hardware: !matches!(info.device_type, wgpu::DeviceType::Cpu),
        }
    }
}

impl fmt::Display for Adapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {}", self.name, self.backend, self.device_type)?;
        if !self.driver.is_empty() {
            write!(f, "; driver {}", self.driver)?;
        }
        write!(f, ")")
    }
}

/// The widest vector instructions our own CPU kernels (the kNN's products, the coreset's distances, the
/// backbones' convolutions) use, ordered so that `>=` reads "at least". The sgemm path (the `gemm`
/// crate) and burn's CPU backend pick their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuIsa {
    /// The build's baseline target (SSE2 on x86-64): the portable code.
    Baseline,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512F (with AVX2 and FMA).
    Avx512,
}

impl CpuIsa {
    /// The environment variable that caps the instruction set, as FAISS's `FAISS_OPT_LEVEL` and
    /// PyTorch's `ATEN_CPU_CAPABILITY` do theirs: to compare like with like, or to run the code another
    /// processor would.
    pub const ENV: &'static str = "ANOMALY_CPU_ISA";

    const ALL: [Self; 3] = [Self::Baseline, Self::Avx2, Self::Avx512];

    /// The name [`Self::ENV`] takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    /// The widest this processor has.
    pub fn detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            // Every AVX-512 processor has AVX2 and FMA, which the AVX-512 kernels' helpers also use.
            let avx2 = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
            if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if avx2 {
                return Self::Avx2;
            }
        }
        Self::Baseline
    }

    /// The cap set in [`Self::ENV`], if any; an error names the variable and the accepted values. The
    /// binary checks it before any work, so that a typo fails rather than runs uncapped.
    pub fn requested() -> Result<Option<Self>, DeviceError> {
        match std::env::var(Self::ENV) {
            Ok(value) if value.trim().is_empty() => Ok(None),
            Ok(value) => value.parse().map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(value)) => Err(DeviceError::UnknownCpuIsa(value.to_string_lossy().into_owned())),
        }
    }

    /// What the kernels run: [`Self::detected`], capped by [`Self::requested`] (a value it rejects
    /// counts as no cap). Decided once per process.
    pub fn active() -> Self {
        static ACTIVE: OnceLock<CpuIsa> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let detected = Self::detected();
            Self::requested().ok().flatten().map_or(detected, |cap| cap.min(detected))
        })
    }
}

impl FromStr for CpuIsa {
    type Err = DeviceError;

    /// Case-insensitive; `avx-512` and `avx512f` are taken for `avx512`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim().to_ascii_lowercase().replace('-', "");
        let name = if name == "avx512f" { "avx512" } else { &name };
        Self::ALL.into_iter().find(|isa| isa.as_str() == name).ok_or_else(|| DeviceError::UnknownCpuIsa(s.into()))
    }
}

impl fmt::Display for CpuIsa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Baseline => "baseline",
            Self::Avx2 => "AVX2",
            Self::Avx512 => "AVX-512",
        })
    }
}

/// A figure of the host's memory in bytes from Linux's `/proc/meminfo` (`"MemTotal"`, `"MemAvailable"`);
/// `None` where the system does not say.
pub fn host_memory(field: &str) -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|line| line.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Every adapter wgpu can see on this machine. Quiet: the drivers' complaints about a missing display
/// (Mesa's Vulkan device-select layer prints `XDG_RUNTIME_DIR is invalid or not set` where there is no
/// Wayland session) are not shown, since `--device auto` probes even for runs that end up on the CPU.
pub fn list_adapters() -> Vec<Adapter> {
    quiet::stderr_muted(|| {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
            .iter()
            .map(|adapter| Adapter::from_info(&adapter.get_info()))
            .collect()
    })
}

/// The device a choice resolves to, with a line that tells the user what was picked.
#[derive(Clone, Debug)]
pub struct ResolvedDevice {
    pub device: Device,
    /// The wgpu adapter, when the work runs on wgpu.
    pub adapter: Option<Adapter>,
}

impl ResolvedDevice {
    /// A short description such as `wgpu: llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan, Cpu; driver Mesa 22.3.6 (LLVM 15.0.6))`
    /// or `cpu: our kernels and burn-flex`.
    pub fn describe(&self) -> String {
        match &self.adapter {
            Some(adapter) => format!("wgpu: {adapter}"),
            None => "cpu: our kernels and burn-flex".into(),
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
///
/// burn knows it under a runtime identity of its own (an `Existing` id that burn hands out once per
/// registration), never as wgpu's `DefaultDevice`: burn creates the `DefaultDevice` runtime lazily the
/// first time anything touches a tensor on `Device::default()` (burn-optim's `ModuleOptimizer::load`
/// does, for one), and registering the context under that name after it fails with "Service already
/// initialized". Under its own identity nothing else can have taken the name.
pub struct GpuContext {
    /// burn's device on this adapter.
    pub device: Device,
    /// The instance, adapter, device and queue burn runs on.
    pub setup: WgpuSetup,
    /// What the adapter is.
    pub adapter: Adapter,
}

impl GpuContext {
    /// Starts the context on first use (the graphics API and adapter burn's own automatic choice would
    /// take) and returns it on every later call. Concurrent first calls wait for one start; a failed start
    /// is not remembered, so a later call tries again.
    pub fn get() -> Result<&'static GpuContext, DeviceError> {
        static CONTEXT: Mutex<Option<&'static GpuContext>> = Mutex::new(None);
        let mut slot = CONTEXT.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(context) = *slot {
            return Ok(context);
        }
        let context: &'static GpuContext = Box::leak(Box::new(Self::start()?));
        *slot = Some(context);
        Ok(context)
    }

    fn start() -> Result<GpuContext, DeviceError> {
        let (instance, adapter, backend) = quiet::stderr_muted(pick_adapter)?;
        let (device, queue) = pollster::block_on(adapter.request_device(&device_descriptor(&adapter)))
            .map_err(|e| DeviceError::NoAdapter(format!("{}: {e}", adapter.get_info().name)))?;
        let setup = WgpuSetup { instance, adapter, device, queue, backend };
        let device = Device::wgpu_options().setup(setup.clone()).init().map_err(|e| DeviceError::NoAdapter(e.to_string()))?;
        let adapter = Adapter::from_info(&setup.adapter.get_info());
        Ok(GpuContext { device, setup, adapter })
    }
}

/// The graphics APIs burn's automatic choice tries, best first (cubecl-wgpu's `AutoGraphicsApi::chain`),
/// narrowed to those `WGPU_BACKEND` allows and this build of wgpu has.
fn api_candidates() -> Vec<wgpu::Backend> {
    let chain: &[wgpu::Backend] =
        if cfg!(target_os = "macos") { &[wgpu::Backend::Metal] } else { &[wgpu::Backend::Vulkan, wgpu::Backend::Dx12, wgpu::Backend::Gl] };
    let allowed = wgpu::InstanceDescriptor::new_without_display_handle_from_env().backends;
    let built = wgpu::Instance::enabled_backend_features();
    chain.iter().copied().filter(|&api| allowed.contains(api.into()) && built.contains(api.into())).collect()
}

/// The adapter burn would start on by itself: on the first graphics API with a hardware adapter, else the
/// first with any adapter, wgpu's high-performance choice.
fn pick_adapter() -> Result<(wgpu::Instance, wgpu::Adapter, wgpu::Backend), DeviceError> {
    let mut chosen = None;
    for api in api_candidates() {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: api.into(),
            ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
        });
        let adapters = pollster::block_on(instance.enumerate_adapters(api.into()));
        if adapters.iter().any(|adapter| Adapter::from_info(&adapter.get_info()).is_hardware) {
            chosen = Some((instance, api));
            break;
        }
        if chosen.is_none() && !adapters.is_empty() {
            chosen = Some((instance, api));
        }
    }
    let (instance, api) = chosen.ok_or_else(|| DeviceError::NoAdapter("no adapter on any graphics API".into()))?;
    let options = wgpu::RequestAdapterOptions { power_preference: wgpu::PowerPreference::HighPerformance, ..Default::default() };
    let adapter = pollster::block_on(instance.request_adapter(&options)).map_err(|e| DeviceError::NoAdapter(format!("{api:?}: {e}")))?;
    Ok((instance, adapter, api))
}

/// What burn asks of a device it starts itself (cubecl-wgpu 0.11 `backend/wgsl.rs`, `try_request_device`):
/// every feature the adapter has but mappable primary buffers, the adapter's own limits (the defaults
/// would cap buffer sizes and workgroup memory), and memory hints that favour size. Without them burn's
/// kernels fall back to slower variants or fail to compile.
fn device_descriptor(adapter: &wgpu::Adapter) -> wgpu::DeviceDescriptor<'static> {
    wgpu::DeviceDescriptor {
        label: Some("anomaly"),
        required_features: adapter.features().difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS),
        required_limits: adapter.limits(),
        memory_hints: wgpu::MemoryHints::MemoryUsage,
        trace: wgpu::Trace::Off,
        // SAFETY: the opt-in cubecl makes for the devices it starts itself; only burn's kernel compiler
        // uses these features, and it is written against them.
        experimental_features: unsafe { wgpu::ExperimentalFeatures::enabled() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_names_are_the_display_names_and_aliases_parse() {
        for choice in DeviceChoice::value_variants() {
            assert_eq!(choice.to_possible_value().unwrap().get_name(), choice.to_string());
            assert_eq!(choice.as_str().to_uppercase().parse::<DeviceChoice>().unwrap(), *choice);
        }
        assert_eq!("gpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Wgpu);
        assert_eq!(<DeviceChoice as ValueEnum>::from_str("gpu", false), Ok(DeviceChoice::Wgpu));
        let error = "tpu".parse::<DeviceChoice>().unwrap_err().to_string();
        assert_eq!(error, "unknown device 'tpu': use auto, wgpu, cpu");
    }

    #[test]
    fn cpu_isa_names_parse_back_and_caps_order_widest_last() {
        for isa in CpuIsa::ALL {
            assert_eq!(isa.as_str().to_uppercase().parse::<CpuIsa>().unwrap(), isa);
        }
        assert_eq!("AVX-512".parse::<CpuIsa>().unwrap(), CpuIsa::Avx512);
        assert_eq!(" avx512f".parse::<CpuIsa>().unwrap(), CpuIsa::Avx512);
        assert!(CpuIsa::Baseline < CpuIsa::Avx2 && CpuIsa::Avx2 < CpuIsa::Avx512);
        assert!(CpuIsa::active() <= CpuIsa::detected());
        let error = "sse9".parse::<CpuIsa>().unwrap_err().to_string();
        assert_eq!(error, "ANOMALY_CPU_ISA is 'sse9': use avx512, avx2 or baseline, or unset it to use all this processor has");
    }
}
