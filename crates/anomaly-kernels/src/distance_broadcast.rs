//! Host side of `shaders/distance_broadcast.wgsl`, the distance shader for adapters that emulate a GPU on
//! the CPU (llvmpipe): query rows are packed on the device into uniform blocks of zero-padded rows, and
//! every invocation takes one bank row.

use burn::tensor::wgpu::wgpu;
use bytemuck::{Pod, Zeroable};

use crate::context::{Gpu, Kernel, KernelError, MatrixChunk, Slot, shader_module};

/// Invocations per workgroup (the shader's `WG`), one bank row each.
const WORKGROUP: u32 = 64;
/// Bytes of one uniform query block: the shader's `array<vec4<f32>, 4096>` (a test checks the two agree).
const BLOCK_BYTES: u64 = 64 * 1024;
/// Query rows per block the shader is built for (its `ROWS`), most first: a block holds the most rows
/// of the query width that fit.
const ROWS: [usize; 2] = [16, 8];
/// Widest rows the broadcast shader takes: the fewest rows per block fill it.
pub const BROADCAST_MAX_D: usize = BLOCK_BYTES as usize / 4 / ROWS[1];

/// The shader's `Params`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct Params {
    m: u32,
    n: u32,
    d: u32,
    d4: u32,
    row_offset: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

/// The shader built for each entry of `ROWS`.
pub(crate) struct BroadcastShaders([Kernel; 2]);

/// `rows` queries of `d` features packed for the shader: blocks of `ROWS[variant]` rows, `stride`
/// bytes apart.
pub(crate) struct BroadcastBlocks {
    buffer: wgpu::Buffer,
    stride: u64,
    variant: usize,
    rows: usize,
    d: usize,
}

/// Whether rows of `d` features fit the shader's uniform block.
pub(crate) fn fits(d: usize) -> bool {
    d <= BROADCAST_MAX_D
}

impl BroadcastShaders {
    pub fn new(device: &wgpu::Device) -> Self {
        let module = shader_module(device, "distance_broadcast", include_str!("../../../shaders/distance_broadcast.wgsl"));
        let slots = [Slot::Uniform, Slot::Uniform, Slot::Read, Slot::Read, Slot::Read, Slot::Write];
        Self(
            ROWS.map(|rows| Kernel::new(device, &module, "distance_broadcast", &slots, &[("ROWS", rows as f64), ("WG", WORKGROUP as f64)])),
        )
    }

    /// Encodes the copy of rows `first .. first + rows` of `values` (`d` wide, `d` ≤ `BROADCAST_MAX_D`)
    /// into uniform blocks, each at an offset the device's uniform alignment allows; the padding stays
    /// zero, as the shader needs.
    pub fn pack(
        &self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        values: &wgpu::Buffer,
        first: usize,
        rows: usize,
        d: usize,
    ) -> BroadcastBlocks {
        let row_bytes = d.div_ceil(4) * 16;
        let variant = ROWS.iter().position(|&r| (r * row_bytes) as u64 <= BLOCK_BYTES).unwrap_or(ROWS.len() - 1);
        let per_block = ROWS[variant];
        let align = gpu.device.limits().min_uniform_buffer_offset_alignment as u64;
        let stride = ((per_block * row_bytes) as u64).div_ceil(align) * align;
        let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("query blocks"),
            size: (rows.div_ceil(per_block) - 1) as u64 * stride + BLOCK_BYTES,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        // Rows of a multiple of 4 features need no padding, so a whole block is one copy.
        let run = if d.is_multiple_of(4) { per_block } else { 1 };
        for start in (0..rows).step_by(run) {
            let count = run.min(rows - start);
            let to = (start / per_block) as u64 * stride + ((start % per_block) * row_bytes) as u64;
            encoder.copy_buffer_to_buffer(values, ((first + start) * d * 4) as u64, &buffer, to, (count * d * 4) as u64);
        }
        BroadcastBlocks { buffer, stride, variant, rows, d }
    }

    /// Encodes the squared distances of the packed queries (norms in `query_norms`) to one bank chunk
    /// into `out` (`queries × chunk.rows`), one dispatch per block.
    pub fn encode(
        &self,
        gpu: &Gpu,
        pass: &mut wgpu::ComputePass,
        blocks: &BroadcastBlocks,
        query_norms: &wgpu::Buffer,
        chunk: &MatrixChunk,
        out: &wgpu::Buffer,
    ) -> Result<(), KernelError> {
        let per_block = ROWS[blocks.variant];
        let (m, n, d) = (blocks.rows, chunk.rows, blocks.d);
        let groups = gpu.groups_1d(n, WORKGROUP)?;
        for (index, first) in (0..m).step_by(per_block).enumerate() {
            let params = gpu.uniform(&Params {
                m: per_block.min(m - first) as u32,
                n: n as u32,
                d: d as u32,
                d4: d.div_ceil(4) as u32,
                row_offset: first as u32,
                _pad0: 0,
                _pad1: 0,
                _pad2: 0,
            });
            let block = wgpu::BufferBinding {
                buffer: &blocks.buffer,
                offset: index as u64 * blocks.stride,
                size: std::num::NonZeroU64::new(BLOCK_BYTES),
            };
            let resources = [
                params.as_entire_binding(),
                wgpu::BindingResource::Buffer(block),
                chunk.values.as_entire_binding(),
                query_norms.as_entire_binding(),
                chunk.norms.as_entire_binding(),
                out.as_entire_binding(),
            ];
            gpu.dispatch_resources(pass, &self.0[blocks.variant], &resources, groups);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::wgpu::wgpu::naga;

    use super::*;
    use crate::layout::{assert_layout, parse};

    const SOURCE: &str = include_str!("../../../shaders/distance_broadcast.wgsl");

    #[test]
    fn params_match_the_shader() {
        assert_layout!(Params { m, n, d, d4, row_offset, _pad0, _pad1, _pad2 }, SOURCE, 32);
    }

    #[test]
    fn the_block_size_is_the_shaders_query_array() {
        let module = parse(SOURCE);
        let queries = module.global_variables.iter().find(|(_, v)| v.name.as_deref() == Some("queries")).expect("queries").1;
        let naga::TypeInner::Array { size: naga::ArraySize::Constant(length), stride, .. } = module.types[queries.ty].inner else {
            panic!("queries is not a fixed-size array");
        };
        assert_eq!(length.get() as u64 * stride as u64, BLOCK_BYTES);
        assert_eq!(BROADCAST_MAX_D, 2048);
    }
}
