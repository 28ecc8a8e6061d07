//! Host side of `shaders/peak.wgsl`: the device's own peak FMA rate and read bandwidth, measured in the
//! same run as the kernels `bench kernels` judges by them, so that a software adapter, a laptop GPU and a
//! data-centre GPU (and the CPU paths, by `cpu::peak`) are compared by the share of their own ceiling.

use burn::tensor::wgpu::wgpu;
use bytemuck::{Pod, Zeroable};

use crate::context::{GpuKernels, Kernel, KernelError, Slot, shader_module};

/// Invocations per workgroup (the shader's `WG`).
const WORKGROUP: u32 = 256;
/// Workgroups of both probes: 262,144 invocations, enough to fill a data-centre GPU.
const GROUPS: u32 = 1024;
/// vec4 fmas per invocation and loop iteration of `fma_peak` (its 8 chains × 4 steps).
const FMAS_PER_ITERATION: f64 = 32.0;
/// Most bytes the bandwidth probe reads: far past the caches of current GPUs, within one binding.
const STREAM_BYTES: u64 = 256 << 20;
/// A probe run short enough to be swamped by launch overhead and timer resolution is scaled up until it
/// takes at least this long.
const MIN_MS: f64 = 50.0;
/// Runs of which the fastest counts (the first doubles as the warm-up); a few, as other work on the
/// machine only ever slows a run down.
const RUNS: usize = 5;

/// The shader's `Params`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct Params {
    count: u32,
    iterations: u32,
    multiplier: f32,
    addend: f32,
}

/// A device's measured ceilings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Peak {
    /// Single-precision GFLOP/s of independent FMA chains (an FMA counts as 2 flops).
    pub gflops: f64,
    /// GB/s of a streaming read of a buffer larger than the caches.
    pub gbs: f64,
}

pub(crate) struct PeakKernels {
    fma: Kernel,
    stream: Kernel,
}

impl PeakKernels {
    pub fn new(device: &wgpu::Device) -> Self {
        let module = shader_module(device, "peak", include_str!("../../../shaders/peak.wgsl"));
        let slots = [Slot::Uniform, Slot::Read, Slot::Write];
        let constants = [("WG", WORKGROUP as f64)];
        Self {
            fma: Kernel::new(device, &module, "fma_peak", &slots, &constants),
            stream: Kernel::new(device, &module, "stream_read", &slots, &constants),
        }
    }
}

impl GpuKernels {
    /// The device's peak FMA rate and read bandwidth: each probe the fastest of a few runs, timed by GPU
    /// timestamps where the device has them, else from submission to completion.
    pub fn peak(&self) -> Result<Peak, KernelError> {
        let gpu = &self.gpu;
        let kernels = self.peak.get_or_init(|| PeakKernels::new(&gpu.device));
        let groups = gpu.groups_1d((GROUPS * WORKGROUP) as usize, WORKGROUP)?;
        let invocations = (groups.0 * WORKGROUP) as usize;
        let sink = gpu.storage(invocations * 16, "peak sink");
        let bytes = (gpu.limits.max_binding_bytes.min(STREAM_BYTES) / 16 * 16).max(16);
        let source = gpu.storage(bytes as usize, "peak source");
        // Zero-filled here, not by wgpu before their first use inside a timed pass: timed by wall
        // clock (CPU adapters), the calibration's first run took the 256 MiB fill for the probe's own
        // time and stopped at one iteration (33–36 GFLOP/s on llvmpipe, against 117 when calibrated).
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        encoder.clear_buffer(&sink, 0, None);
        encoder.clear_buffer(&source, 0, None);
        gpu.queue.submit([encoder.finish()]);
        let params = |iterations: u32| gpu.uniform(&Params { count: (bytes / 16) as u32, iterations, multiplier: 0.999_9, addend: 1e-4 });

        let fma_ms = |iterations: u32| {
            let params = params(iterations);
            gpu.time(|pass| gpu.dispatch(pass, &kernels.fma, &[&params, &source, &sink], groups))
        };
        let iterations = calibrate(1 << 20, fma_ms)?;
        let flops = 2.0 * 4.0 * FMAS_PER_ITERATION * invocations as f64 * iterations as f64;
        let gflops = flops / best_ms(|| fma_ms(iterations))? / 1e6;

        let params = params(0);
        let stream_ms = best_ms(|| gpu.time(|pass| gpu.dispatch(pass, &kernels.stream, &[&params, &source, &sink], groups)))?;
        Ok(Peak { gflops, gbs: bytes as f64 / stream_ms / 1e6 })
    }
}

/// The smallest power of two up to `max` for which `work` takes at least `MIN_MS` milliseconds.
pub(crate) fn calibrate<E>(max: u32, mut work: impl FnMut(u32) -> Result<f64, E>) -> Result<u32, E> {
    let mut size = 1;
    while size < max && work(size)? < MIN_MS {
        size *= 2;
    }
    Ok(size)
}

/// The fastest of `RUNS` runs of `work`, in the milliseconds it reports.
pub(crate) fn best_ms<E>(mut work: impl FnMut() -> Result<f64, E>) -> Result<f64, E> {
    let mut best = f64::INFINITY;
    for _ in 0..RUNS {
        best = best.min(work()?);
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use crate::layout::assert_layout;

    #[test]
    fn params_match_the_shader() {
        assert_layout!(super::Params { count, iterations, multiplier, addend }, include_str!("../../../shaders/peak.wgsl"), 16);
    }
}
