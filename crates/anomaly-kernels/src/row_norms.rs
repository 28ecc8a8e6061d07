//! Host side of `shaders/row_norms.wgsl`: the squared norm of every row, which the distance kernels add
//! to −2 q·b. The shader's workgroup width stays in the shader: the host dispatches one workgroup per
//! row and never needs it.

use burn::tensor::wgpu::wgpu;
use bytemuck::{Pod, Zeroable};

use crate::context::{Gpu, Kernel, Slot, row_stride, shader_module};

/// The shader's `Params`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    /// Workgroups along x; rows past the per-dimension dispatch limit continue along y.
    groups_x: u32,
    /// Floats from one row's start to the next.
    stride: u32,
}

pub(crate) struct RowNormsKernel(Kernel);

impl RowNormsKernel {
    pub fn new(device: &wgpu::Device) -> Self {
        let module = shader_module(device, "row_norms", include_str!("../../../shaders/row_norms.wgsl"));
        Self(Kernel::new(device, &module, "row_norms", &[Slot::Uniform, Slot::Read, Slot::Write], &[]))
    }

    /// Encodes the squared norms of the `rows × cols` matrix in `values` (rows [`row_stride`] apart)
    /// into `norms`.
    pub fn encode(
        &self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        values: &wgpu::Buffer,
        norms: &wgpu::Buffer,
        rows: usize,
        cols: usize,
    ) {
        let (x, y) = gpu.row_groups(rows);
        let params = gpu.uniform(&Params { rows: rows as u32, cols: cols as u32, groups_x: x, stride: row_stride(cols) as u32 });
        let mut pass = encoder.begin_compute_pass(&Default::default());
        gpu.dispatch(&mut pass, &self.0, &[&params, values, norms], (x, y));
    }
}

#[cfg(test)]
mod tests {
    use crate::layout::assert_layout;

    #[test]
    fn params_match_the_shader() {
        assert_layout!(super::Params { rows, cols, groups_x, stride }, include_str!("../../../shaders/row_norms.wgsl"), 16);
    }
}
