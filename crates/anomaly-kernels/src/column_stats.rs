//! Host side of `shaders/column_stats.wgsl`: mean and population std-dev of every column, Welford within
//! row pieces on the GPU and Chan's merge across them, so that the memory bank keeps the columns of
//! highest std-dev without the matrix leaving the device.

use burn::tensor::wgpu::wgpu;
use bytemuck::{Pod, Zeroable};

use crate::ColumnStats;
use crate::context::{GpuKernels, GpuMatrix, Kernel, KernelError, Slot, shader_module};

/// Invocations per workgroup (the shader's `WG`), one column each.
const WORKGROUP: u32 = 64;
/// Most row pieces the statistics of one stored chunk are split into before merging.
const MAX_PIECES: usize = 1024;

/// The shader's `Params`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    rows_per_chunk: u32,
    chunks: u32,
    /// Floats from one row's start to the next.
    stride: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

pub(crate) struct ColumnStatsKernel {
    partial: Kernel,
    merge: Kernel,
}

impl ColumnStatsKernel {
    pub fn new(device: &wgpu::Device) -> Self {
        let module = shader_module(device, "column_stats", include_str!("../../../shaders/column_stats.wgsl"));
        let slots = [Slot::Uniform, Slot::Read, Slot::Write, Slot::Write];
        let constants = [("WG", WORKGROUP as f64)];
        Self {
            partial: Kernel::new(device, &module, "partial_stats", &slots, &constants),
            merge: Kernel::new(device, &module, "merge_stats", &slots, &constants),
        }
    }
}

impl GpuKernels {
    /// Mean and population std-dev of every column: Welford within row pieces on the GPU, Chan's merge
    /// across them (on the GPU within a stored chunk, then on the host across stored chunks, in f64).
    pub fn column_stats(&self, matrix: &GpuMatrix) -> Result<ColumnStats, KernelError> {
        let gpu = &self.gpu;
        let cols = matrix.cols;
        let partial_limit = (gpu.limits.max_binding_bytes / (cols as u64 * 16)).max(1) as usize;
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        let mut merged = Vec::new();
        for chunk in &matrix.chunks {
            let pieces = chunk.rows.min(MAX_PIECES).min(partial_limit).min(gpu.limits.max_workgroups as usize);
            let rows_per_piece = chunk.rows.div_ceil(pieces);
            let pieces = chunk.rows.div_ceil(rows_per_piece);
            let params = gpu.uniform(&Params {
                rows: chunk.rows as u32,
                cols: cols as u32,
                rows_per_chunk: rows_per_piece as u32,
                chunks: pieces as u32,
                stride: matrix.stride() as u32,
                _pad0: 0,
                _pad1: 0,
                _pad2: 0,
            });
            let partials = gpu.storage(pieces * cols * 16, "partial stats");
            let result = gpu.storage(cols * 16, "merged stats");
            let buffers = [&params, &chunk.values, &partials, &result];
            let groups = gpu.groups_1d(cols, WORKGROUP)?;
            let mut pass = encoder.begin_compute_pass(&Default::default());
            gpu.dispatch(&mut pass, &self.column_stats.partial, &buffers, (groups.0, pieces as u32));
            gpu.dispatch(&mut pass, &self.column_stats.merge, &buffers, groups);
            drop(pass);
            merged.push(result);
        }
        let sources: Vec<(&wgpu::Buffer, u64)> = merged.iter().map(|b| (b, (cols * 16) as u64)).collect();
        let parts = gpu.read_back(encoder, &sources)?;
        let mut acc = vec![(0f64, 0f64, 0f64); cols];
        for bytes in &parts {
            let stats: &[[f32; 4]] = bytemuck::cast_slice(bytes);
            for (a, s) in acc.iter_mut().zip(stats) {
                // Each stored chunk's statistics are relative to its own shift (its first row).
                *a = chan_merge(*a, (s[0] as f64, s[3] as f64 + s[1] as f64, s[2] as f64));
            }
        }
        Ok(ColumnStats {
            mean: acc.iter().map(|a| a.1 as f32).collect(),
            std: acc.iter().map(|a| (a.2 / a.0).max(0.0).sqrt() as f32).collect(),
        })
    }
}

/// Chan et al.'s merge of two (count, mean, M2) summaries.
fn chan_merge(a: (f64, f64, f64), b: (f64, f64, f64)) -> (f64, f64, f64) {
    if b.0 == 0.0 {
        return a;
    }
    if a.0 == 0.0 {
        return b;
    }
    let count = a.0 + b.0;
    let delta = b.1 - a.1;
    (count, a.1 + delta * b.0 / count, a.2 + b.2 + delta * delta * a.0 * b.0 / count)
}

#[cfg(test)]
mod tests {
    use crate::layout::assert_layout;

    #[test]
    fn params_match_the_shader() {
        assert_layout!(
            super::Params { rows, cols, rows_per_chunk, chunks, stride, _pad0, _pad1, _pad2 },
            include_str!("../../../shaders/column_stats.wgsl"),
            32
        );
    }
}
