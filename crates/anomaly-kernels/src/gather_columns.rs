//! Host side of `shaders/gather_columns.wgsl`: a new matrix of selected columns, so that the memory bank
//! is built on the device from the uploaded features.

use burn::tensor::wgpu::wgpu;
use bytemuck::{Pod, Zeroable};
use wgpu::util::{BufferInitDescriptor, DeviceExt};

use crate::context::{GpuKernels, GpuMatrix, Kernel, KernelError, MatrixChunk, Slot, shader_module};

/// Invocations per workgroup (the shader's `WG`), one selected column each.
const WORKGROUP: u32 = 64;

/// The shader's `Params`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct Params {
    rows: u32,
    /// Floats from one row's start to the next in the source matrix and in the gathered one.
    stride: u32,
    selected: u32,
    gathered_stride: u32,
}

pub(crate) struct GatherKernel(Kernel);

impl GatherKernel {
    pub fn new(device: &wgpu::Device) -> Self {
        let module = shader_module(device, "gather_columns", include_str!("../../../shaders/gather_columns.wgsl"));
        let slots = [Slot::Uniform, Slot::Read, Slot::Read, Slot::Write];
        Self(Kernel::new(device, &module, "gather_columns", &slots, &[("WG", WORKGROUP as f64)]))
    }
}

impl GpuKernels {
    /// A new matrix holding the given columns of `matrix`, in that order, with its row norms.
    pub fn gather_columns(&self, matrix: &GpuMatrix, columns: &[u32]) -> Result<GpuMatrix, KernelError> {
        let gpu = &self.gpu;
        if columns.is_empty() || columns.iter().any(|&c| c as usize >= matrix.cols) {
            return Err(KernelError::Shape(format!("column selection out of range for {} columns", matrix.cols)));
        }
        let selected = columns.len();
        let index = gpu.device.create_buffer_init(&BufferInitDescriptor {
            label: Some("selected columns"),
            contents: bytemuck::cast_slice(columns),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        let mut gathered = GpuMatrix { rows: matrix.rows, cols: selected, chunks: Vec::new(), kept_texture: Default::default() };
        let gathered_stride = gathered.stride();
        for chunk in &matrix.chunks {
            let params = gpu.uniform(&Params {
                rows: chunk.rows as u32,
                stride: matrix.stride() as u32,
                selected: selected as u32,
                gathered_stride: gathered_stride as u32,
            });
            let values = gpu.storage(chunk.rows * gathered_stride * 4, "gathered chunk");
            let norms = gpu.storage(chunk.rows * 4, "row norms");
            // Rows past the dispatch limit are covered by the shader striding over the grid's y extent.
            let groups = (gpu.groups_1d(selected, WORKGROUP)?.0, (chunk.rows as u32).min(gpu.limits.max_workgroups));
            let mut pass = encoder.begin_compute_pass(&Default::default());
            gpu.dispatch(&mut pass, &self.gather.0, &[&params, &chunk.values, &index, &values], groups);
            drop(pass);
            self.norms.encode(gpu, &mut encoder, &values, &norms, chunk.rows, selected);
            gathered.chunks.push(MatrixChunk { start: chunk.start, rows: chunk.rows, values, norms });
        }
        gpu.queue.submit([encoder.finish()]);
        Ok(gathered)
    }
}

#[cfg(test)]
mod tests {
    use crate::layout::assert_layout;

    #[test]
    fn params_match_the_shader() {
        assert_layout!(super::Params { rows, stride, selected, gathered_stride }, include_str!("../../../shaders/gather_columns.wgsl"), 16);
    }
}
