//! Host side of `shaders/distance.wgsl` (the tiled and naive pairwise-distance shaders), and the choice
//! between them and the subgroup shader of `distance_subgroup`: a block of queries is copied out of its
//! matrix, then its distances to one bank chunk are encoded with the chosen shader.

use burn::tensor::wgpu::wgpu;
use bytemuck::{Pod, Zeroable};

use crate::context::{GpuKernels, GpuMatrix, Kernel, KernelError, MatrixChunk, Slot, row_stride, shader_module};
use crate::distance_subgroup::{BankTexture, BankTextures, SubgroupOutput};
use crate::knn::MAX_QUERY_BLOCK;

/// Invocations per workgroup side (the shader's `SIDE`) of both shaders.
const SIDE: u32 = 16;
/// Rows and columns of the tiled shader's output tile: each invocation computes a vec4 of outputs
/// along each direction.
const TILE: u32 = 4 * SIDE;
const _: () = assert!(SIDE.is_multiple_of(4), "each invocation of the tiled shader stages 4 features");

/// Why the subgroup shader cannot run on a device.
const NO_SUBGROUPS: &str = "the subgroup distance kernel needs subgroup operations of a fixed size of 4, 8 or 16, which this device lacks";

/// Which pairwise-distance shader runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DistanceKernel {
    /// Shared-memory tiles, 4 × 4 outputs per invocation: for hardware GPUs.
    Tiled,
    /// 16 query rows × 4 bank rows per invocation, the query values shared through subgroup broadcasts
    /// and the bank read from a texture: for adapters that emulate a GPU on the CPU (llvmpipe), where
    /// storage reads are costly. Needs subgroup operations of a fixed size of 4, 8 or 16 and textures
    /// that hold a binding's worth of rows (`GpuKernels::has_subgroup_kernel`).
    Subgroup,
    /// One invocation per pair: the baseline the others are measured against.
    Naive,
}

/// The shader's `Params`, and the subgroup shader's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct Params {
    pub m: u32,
    pub n: u32,
    pub d: u32,
    /// Floats from one row's start to the next, in the queries and the bank.
    pub stride: u32,
}

/// The two entry points of `distance.wgsl`.
pub(crate) struct DistanceShaders {
    tiled: Kernel,
    naive: Kernel,
}

impl DistanceShaders {
    pub fn new(device: &wgpu::Device) -> Self {
        let module = shader_module(device, "distance", include_str!("../../../shaders/distance.wgsl"));
        let slots = [Slot::Uniform, Slot::Read, Slot::Read, Slot::Read, Slot::Read, Slot::Write];
        let constants = [("SIDE", SIDE as f64)];
        Self {
            tiled: Kernel::new(device, &module, "distance_tiled", &slots, &constants),
            naive: Kernel::new(device, &module, "distance_naive", &slots, &constants),
        }
    }
}

/// A block of query rows for one distance shader, with their squared norms.
pub(crate) struct QueryBlock {
    pub rows: usize,
    pub d: usize,
    pub kernel: DistanceKernel,
    pub values: QueryValues,
}

/// A query block's values and squared norms, laid out for its shader.
pub(crate) enum QueryValues {
    /// `rows × d`, row-major, rows [`row_stride`] of `d` apart (as in the bank's chunks), and the
    /// norms: for the tiled and naive shaders.
    Rows { values: wgpu::Buffer, norms: wgpu::Buffer },
    /// Packed in blocks of 16 rows, norms included, into a storage texture (`SubgroupShader::pack`):
    /// for the subgroup shader.
    Packed(wgpu::TextureView),
}

impl QueryBlock {
    /// The distance shaders' `Params` for this block against `n` bank rows of the same width.
    pub fn params(&self, n: usize) -> Params {
        Params { m: self.rows as u32, n: n as u32, d: self.d as u32, stride: row_stride(self.d) as u32 }
    }
}

impl GpuKernels {
    /// Encodes the copy of rows `first .. first + rows` of a query chunk (`d` wide) into a block for
    /// `kernel` (packed, for the subgroup shader). The copies run on the device: the queries never come
    /// back to the host.
    pub(crate) fn prepare_queries(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        chunk: &MatrixChunk,
        first: usize,
        rows: usize,
        d: usize,
        kernel: DistanceKernel,
    ) -> Result<QueryBlock, KernelError> {
        let values = match (kernel, &self.subgroup) {
            (DistanceKernel::Subgroup, Some(subgroup)) => QueryValues::Packed(subgroup.pack(&self.gpu, encoder, chunk, first, rows, d)?),
            (DistanceKernel::Subgroup, None) => return Err(KernelError::Shape(NO_SUBGROUPS.into())),
            _ => {
                let stride = row_stride(d);
                let values = self.gpu.storage(rows * stride * 4, "queries");
                encoder.copy_buffer_to_buffer(&chunk.values, (first * stride * 4) as u64, &values, 0, (rows * stride * 4) as u64);
                let norms = self.gpu.storage(rows * 4, "query norms");
                encoder.copy_buffer_to_buffer(&chunk.norms, (first * 4) as u64, &norms, 0, (rows * 4) as u64);
                QueryValues::Rows { values, norms }
            }
        };
        Ok(QueryBlock { rows, d, kernel, values })
    }

    /// The textures the subgroup shader reads `bank`'s chunks from, where `kernel` is that shader; the
    /// other shaders read the chunks' buffers.
    pub(crate) fn bank_textures<'a>(&self, bank: &'a GpuMatrix, kernel: DistanceKernel) -> Result<Option<BankTextures<'a>>, KernelError> {
        match (kernel, &self.subgroup) {
            (DistanceKernel::Subgroup, Some(subgroup)) => subgroup.bank_textures(&self.gpu, bank).map(Some),
            (DistanceKernel::Subgroup, None) => Err(KernelError::Shape(NO_SUBGROUPS.into())),
            _ => Ok(None),
        }
    }

    /// Encodes the squared distances of a query block to one bank chunk into `out` (`rows × chunk.rows`);
    /// for the subgroup shader, from `texture` (`BankTexture::load`).
    pub(crate) fn encode_distances(
        &self,
        pass: &mut wgpu::ComputePass,
        queries: &QueryBlock,
        chunk: &MatrixChunk,
        texture: Option<&BankTexture>,
        out: &wgpu::Buffer,
    ) -> Result<(), KernelError> {
        let gpu = &self.gpu;
        let (m, n) = (queries.rows, chunk.rows);
        let (shader, outputs_per_group) = match (queries.kernel, &self.subgroup, texture) {
            (DistanceKernel::Subgroup, Some(subgroup), Some(texture)) => {
                return subgroup.encode(gpu, pass, queries, chunk, texture, SubgroupOutput::Distances(out));
            }
            (DistanceKernel::Subgroup, Some(_), None) => {
                return Err(KernelError::Shape("the subgroup distance kernel reads the bank from a texture, and none was given".into()));
            }
            (DistanceKernel::Subgroup, None, _) => return Err(KernelError::Shape(NO_SUBGROUPS.into())),
            (DistanceKernel::Naive, _, _) => (&self.distance.naive, SIDE),
            (DistanceKernel::Tiled, _, _) => (&self.distance.tiled, TILE),
        };
        let QueryValues::Rows { values, norms } = &queries.values else {
            return Err(KernelError::Shape("the query block was packed for the subgroup distance kernel".into()));
        };
        let params = gpu.uniform(&queries.params(n));
        let buffers = [&params, values, &chunk.values, norms, &chunk.norms, out];
        let groups = (n.div_ceil(outputs_per_group as usize) as u32, m.div_ceil(outputs_per_group as usize) as u32);
        gpu.dispatch(pass, shader, &buffers, groups);
        Ok(())
    }

    /// The full `m × n` matrix of squared distances between single-chunk `queries` (at most 1024 rows)
    /// and a single-chunk `bank`, with the given shader; for tests and for benchmarking the shaders
    /// against each other. Returns the values and the shader's time in milliseconds (GPU timestamps
    /// where available, else wall time).
    pub fn distance_matrix(&self, queries: &GpuMatrix, bank: &GpuMatrix, kernel: DistanceKernel) -> Result<(Vec<f32>, f64), KernelError> {
        let gpu = &self.gpu;
        let (m, n, d) = (queries.rows, bank.rows, bank.cols);
        if queries.cols != d || queries.chunks.len() != 1 || bank.chunks.len() != 1 || m > MAX_QUERY_BLOCK {
            return Err(KernelError::Shape(format!(
                "distance_matrix takes a single-chunk matrix of 1 to {MAX_QUERY_BLOCK} queries and a single-chunk bank, \
                 both {d} wide"
            )));
        }
        if (m * n * 4) as u64 > gpu.limits.max_binding_bytes {
            return Err(KernelError::Shape(format!("a {m} × {n} distance matrix exceeds one binding")));
        }
        let out = gpu.storage(m * n * 4, "distance matrix");
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        // Zero-filled before the timed pass, which would otherwise count wgpu's fill of it.
        encoder.clear_buffer(&out, 0, None);
        let block = self.prepare_queries(&mut encoder, &queries.chunks[0], 0, m, d, kernel)?;
        // The packing and the texture's copy are not timed (the kNN's times include them).
        let mut textures = self.bank_textures(bank, kernel)?;
        let texture = textures.as_mut().map(|t| t.holding(&mut encoder, &bank.chunks[0], bank.stride()));
        gpu.queue.submit([encoder.finish()]);
        let mut encoded = Ok(());
        let ms = gpu.time(|pass| encoded = self.encode_distances(pass, &block, &bank.chunks[0], texture, &out))?;
        encoded?;
        let parts = gpu.read_back(gpu.device.create_command_encoder(&Default::default()), &[(&out, (m * n * 4) as u64)])?;
        Ok((bytemuck::cast_slice(&parts[0]).to_vec(), ms))
    }
}

#[cfg(test)]
mod tests {
    use crate::layout::assert_layout;

    #[test]
    fn params_match_the_shader() {
        assert_layout!(super::Params { m, n, d, stride }, include_str!("../../../shaders/distance.wgsl"), 16);
    }
}
