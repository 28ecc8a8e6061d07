//! Host side of `shaders/distance_subgroup.wgsl`, the distance shader for adapters that emulate a GPU
//! on the CPU (llvmpipe), where storage reads are loops over SIMD lanes and subgroup broadcasts are
//! register shuffles: each invocation keeps 8 query rows × 3 bank rows of sums, and the lanes of a
//! subgroup share the query values they read, from query blocks packed feature by feature.

use burn::tensor::wgpu::wgpu;
use bytemuck::{Pod, Zeroable};

use crate::context::{Gpu, Kernel, KernelError, MatrixChunk, Slot, row_stride, shader_module};
use crate::distance::QueryBlock;

/// Invocations per workgroup (the shader's `WG`): a multiple of every subgroup size the shader takes.
const WORKGROUP: u32 = 64;
/// Query rows per workgroup row of the grid and bank rows per invocation (the shader's `QUERIES` and
/// `BANK_ROWS`).
const QUERIES: usize = 8;
const BANK_ROWS: u32 = 3;
/// Subgroup sizes the shader is written for (its unrolled broadcasts): the SIMD widths of llvmpipe
/// (128-, 256- and 512-bit vectors of f32).
const SUBGROUP_SIZES: [u32; 3] = [4, 8, 16];

/// The most rows of a query block whose packed copy (`SubgroupShader::pack`, whole blocks of 8 rows)
/// takes no more room than `rows` unpacked rows: `rows` rounded down to a multiple of 8, where that
/// leaves any (fewer than 8 rows fit a binding only at millions of features).
pub(crate) fn packed_block_rows(rows: usize) -> usize {
    if rows >= QUERIES { rows / QUERIES * QUERIES } else { rows }
}

/// The device's subgroup size, where it has subgroup operations, the size is fixed, and it is one the
/// subgroup shaders' unrolled broadcasts are written for (this one's and the coreset's `update_subgroup`).
pub(crate) fn fixed_subgroup_size(device: &wgpu::Device) -> Option<u32> {
    let info = device.adapter_info();
    let size = info.subgroup_min_size;
    (device.features().contains(wgpu::Features::SUBGROUP) && size == info.subgroup_max_size && SUBGROUP_SIZES.contains(&size))
        .then_some(size)
}

/// The shader's `PackParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct PackParams {
    rows: u32,
    first: u32,
    stride: u32,
    _pad: u32,
}

/// The shader's two entry points, built for the device's subgroup size.
pub(crate) struct SubgroupShader {
    distances: Kernel,
    pack: Kernel,
}

impl SubgroupShader {
    /// The shader, where the device has subgroup operations and a fixed subgroup size it is written
    /// for; `None` elsewhere.
    pub fn new(device: &wgpu::Device) -> Option<Self> {
        fixed_subgroup_size(device).map(|size| {
            let module = shader_module(device, "distance_subgroup", include_str!("../../../shaders/distance_subgroup.wgsl"));
            let constants = [("SG", size as f64), ("WG", WORKGROUP as f64)];
            let slots = [Slot::Uniform, Slot::Read, Slot::Read, Slot::Read, Slot::Read, Slot::Write];
            Self {
                distances: Kernel::new(device, &module, "distance_subgroup", &slots, &constants),
                pack: Kernel::new(device, &module, "pack_queries", &[Slot::Uniform, Slot::Read, Slot::Write], &constants),
            }
        })
    }

    /// Encodes the packing of rows `first .. first + rows` of a query chunk (`d` wide) into a new buffer,
    /// as `encode` reads them: per block of 8 rows, per feature, the 8 rows' values (zero past the last
    /// row), so that one lane's values of a feature are two vec4 reads instead of 8 scalar ones.
    pub fn pack(
        &self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        chunk: &MatrixChunk,
        first: usize,
        rows: usize,
        d: usize,
    ) -> wgpu::Buffer {
        let stride = row_stride(d);
        let blocks = rows.div_ceil(QUERIES);
        let packed = gpu.storage(blocks * QUERIES * stride * 4, "packed queries");
        let params = gpu.uniform(&PackParams { rows: rows as u32, first: first as u32, stride: stride as u32, _pad: 0 });
        let groups = (stride.div_ceil(WORKGROUP as usize) as u32, blocks as u32);
        let mut pass = encoder.begin_compute_pass(&Default::default());
        gpu.dispatch(&mut pass, &self.pack, &[&params, &chunk.values, &packed], groups);
        packed
    }

    /// Encodes the squared distances of a block of queries to one bank chunk into `out`
    /// (`queries.rows × chunk.rows`).
    pub fn encode(
        &self,
        gpu: &Gpu,
        pass: &mut wgpu::ComputePass,
        queries: &QueryBlock,
        chunk: &MatrixChunk,
        out: &wgpu::Buffer,
    ) -> Result<(), KernelError> {
        let n = chunk.rows;
        // Query rows along x, bank rows along y (see the shader).
        let (bank_groups, _) = gpu.groups_1d(n.div_ceil(BANK_ROWS as usize), WORKGROUP)?;
        let params = gpu.uniform(&queries.params(n));
        let buffers = [&params, &queries.values, &chunk.values, &queries.norms, &chunk.norms, out];
        gpu.dispatch(pass, &self.distances, &buffers, (queries.rows.div_ceil(QUERIES) as u32, bank_groups));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // The shader's `Params` are the tiled shader's (QueryBlock::params); this checks the layout here too.
    use crate::distance::Params;
    use crate::layout::{assert_layout, u32_constant};

    const SOURCE: &str = include_str!("../../../shaders/distance_subgroup.wgsl");

    #[test]
    fn params_match_the_shader() {
        assert_layout!(Params { m, n, d, stride }, SOURCE, 16);
        assert_layout!(PackParams { rows, first, stride, _pad }, SOURCE, 16);
    }

    #[test]
    fn the_grid_constants_are_the_shaders() {
        assert_eq!(u32_constant(SOURCE, "QUERIES") as usize, QUERIES);
        assert_eq!(u32_constant(SOURCE, "BANK_ROWS"), BANK_ROWS);
        assert!(SUBGROUP_SIZES.iter().all(|size| WORKGROUP.is_multiple_of(*size)));
    }
}
