//! Host side of `shaders/distance_subgroup.wgsl`, the distance shader for adapters that emulate a GPU
//! on the CPU (llvmpipe), where storage-buffer reads are loops over SIMD lanes, storage-texture reads
//! inline gathers and subgroup broadcasts register shuffles: each invocation keeps 16 query rows × 4
//! bank rows of sums and reads its bank rows from a storage texture each bank chunk is copied into
//! (`BankTexture`), and the lanes of a subgroup share the query values they read, from query blocks
//! packed feature by feature into a storage texture too (`SubgroupShader::pack`). For k = 1 a second
//! entry point writes, instead of the distances, each subgroup's nearest bank row per query
//! (`NearestSlots`), which the top-k merges; for larger k a third writes the distances and each
//! subgroup's least distance per query, which bound the top-k's reads.

use burn::tensor::wgpu::wgpu;
use bytemuck::{Pod, Zeroable};

use crate::context::{Gpu, GpuMatrix, Kernel, KernelError, KernelLimits, MatrixChunk, Slot, row_stride, shader_module};
use crate::distance::{QueryBlock, QueryValues};

/// Invocations per workgroup (the shader's `WG`): a multiple of every subgroup size the shader takes.
const WORKGROUP: u32 = 64;
/// Query rows per workgroup row of the grid and bank rows per invocation (the shader's `QUERIES` and
/// `BANK_ROWS`).
const QUERIES: usize = 16;
const BANK_ROWS: u32 = 4;
/// Subgroup sizes the shader is written for (its unrolled broadcasts): the SIMD widths of llvmpipe
/// (128-, 256- and 512-bit vectors of f32).
const SUBGROUP_SIZES: [u32; 3] = [4, 8, 16];

/// Features per query row of a packed block (the shader's `packed_features`): the bank's row stride
/// rounded up to a multiple of the largest subgroup size, so that the shader's steps of SG features
/// never run past the block (the values past the last feature are zero).
fn packed_features(stride: usize) -> usize {
    stride.next_multiple_of(FEATURES_MULTIPLE)
}

/// The shader's `FEATURES_MULTIPLE`.
const FEATURES_MULTIPLE: usize = 16;

/// The most rows of a query block whose packed copy (`SubgroupShader::pack`: whole blocks of 16 rows,
/// each `packed_features` wide and one more feature, its rows' norms) takes no more room than a binding
/// of `binding_bytes`: whole blocks where one fits, else as many rows as fit unpacked (fewer than 16
/// rows fit a binding only at hundreds of thousands of features).
pub(crate) fn packed_block_rows(binding_bytes: u64, stride: usize) -> usize {
    match binding_bytes / (QUERIES * (packed_features(stride) + 1) * 4) as u64 {
        0 => (binding_bytes / (stride * 4) as u64) as usize,
        blocks => usize::try_from(blocks).unwrap_or(usize::MAX / QUERIES) * QUERIES,
    }
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

/// The shader's entry points, built for the device's subgroup size, and the shape of the textures they
/// read and write.
pub(crate) struct SubgroupShader {
    distances: Kernel,
    distances_and_minima: Kernel,
    nearest: Kernel,
    pack: Kernel,
    /// The subgroup size the shader is built for (its `SG`).
    subgroup_size: u32,
    /// The textures are `1 << texture_shift` texels wide (the shader's `TEXTURE_SHIFT`)…
    texture_shift: u32,
    /// … and at most this many tall.
    max_texture_rows: u32,
}

/// Each query row's nearest bank row in each slot of a bank chunk, a slot being one subgroup's bank rows
/// (`SubgroupShader::encode` with `SubgroupOutput::Nearest`): keys (distance bits, as the top-k orders them) and chunk rows,
/// row-major, `slots` per query row.
pub(crate) struct NearestSlots {
    pub keys: wgpu::Buffer,
    pub rows: wgpu::Buffer,
}

/// What `SubgroupShader::encode` writes.
pub(crate) enum SubgroupOutput<'a> {
    /// Every squared distance, `queries.rows × chunk.rows`, row-major.
    Distances(&'a wgpu::Buffer),
    /// For k = 1, each query row's nearest bank row in each slot (`SubgroupShader::slots`).
    Nearest(&'a NearestSlots),
    /// Every squared distance, 4 query rows to a vec4 (rows 4i … 4i + 3 to bank row j at vec4 i × chunk
    /// rows + j; `queries.rows` rounded up to 4 rows), and each query row's least key (distance bits, as
    /// the top-k orders them) in each slot, `queries.rows × slots`.
    /// Past a bank's first chunk, a slot's distances only for the query rows whose k-th best in
    /// `running` its least key does not exceed (the top-k reads no others).
    DistancesAndMinima { distances: &'a wgpu::Buffer, minima: &'a wgpu::Buffer, running: RunningValues<'a> },
}

/// The running best a chunk's top-k merges into (`RunningBest`), as the distance shader reads it to leave
/// out the distances no query row needs.
pub(crate) struct RunningValues<'a> {
    /// Squared distances, ascending, `k` to a query row of the block.
    pub values: &'a wgpu::Buffer,
    pub k: usize,
    /// Whether a chunk was merged into them yet: before that they are stale, and every distance is stored.
    pub merged: bool,
}

/// The shader's `RunningParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct RunningParams {
    k: u32,
    merged: u32,
    _pad0: u32,
    _pad1: u32,
}

/// Bytes of one texel of the bank texture: 4 features of f32.
const TEXEL_BYTES: u64 = 16;

/// The rgba32float storage texture `distance_subgroup` reads a bank chunk from: a single-chunk bank's,
/// kept with it, or one per `knn` call that each chunk's buffer is copied into in turn (`BankTextures`).
/// A chunk's rows lie one after another (`row_stride` / 4 texels each), wrapped at the texture's width.
/// On llvmpipe a storage-texture read is one inline, branch-free gather of the lanes' texels, where a
/// storage-buffer read is a loop over the lanes and a sampled-texture read a function call around which
/// the shader's sums are stored and reloaded: the bank's reads are most of the shader's time.
pub(crate) struct BankTexture {
    texture: wgpu::Texture,
    view: wgpu::TextureView,
    /// The first row of the chunk it holds, once a copy is encoded.
    holds: Option<usize>,
}

/// Where a kNN's subgroup distance dispatches read the bank's chunks from.
pub(crate) enum BankTextures<'a> {
    /// A single-chunk bank's texture, kept with the bank (`GpuMatrix::kept_texture`): copied once, when
    /// it was made, in a submission of its own, which the queue runs before any later one.
    Kept(&'a BankTexture),
    /// A texture of this call's that each chunk is copied into in turn.
    EachChunk(BankTexture),
}

impl BankTextures<'_> {
    /// The texture holding `chunk` once `encoder`'s commands so far have run: the kept one, or this
    /// call's, with the chunk's copy encoded first where it holds another.
    pub fn holding(&mut self, encoder: &mut wgpu::CommandEncoder, chunk: &MatrixChunk, stride: usize) -> &BankTexture {
        match self {
            Self::Kept(texture) => texture,
            Self::EachChunk(texture) => {
                texture.load(encoder, chunk, stride);
                texture
            }
        }
    }
}

impl SubgroupShader {
    /// The shader, where the device has subgroup operations, a fixed subgroup size it is written for,
    /// and textures large enough to hold any bank chunk (one binding's worth of rows); `None` elsewhere.
    pub fn new(device: &wgpu::Device) -> Option<Self> {
        let size = fixed_subgroup_size(device)?;
        let side = device.limits().max_texture_dimension_2d;
        // The widest power of two the device allows, so that the shader splits a texel index with a
        // mask and a shift.
        let texture_shift = side.checked_ilog2()?;
        let max_texels = (1u64 << texture_shift) * side as u64;
        if max_texels * TEXEL_BYTES < KernelLimits::of(device).max_binding_bytes || texture_shift < 4 {
            return None;
        }
        let module = shader_module(device, "distance_subgroup", include_str!("../../../shaders/distance_subgroup.wgsl"));
        let constants = [("SG", size as f64), ("WG", WORKGROUP as f64), ("TEXTURE_SHIFT", texture_shift as f64)];
        let slots = [Slot::Uniform, Slot::ReadTexture, Slot::ReadTexture, Slot::Read, Slot::Write];
        let nearest_slots = [Slot::Uniform, Slot::ReadTexture, Slot::ReadTexture, Slot::Read, Slot::Write, Slot::Write];
        let minima_slots = [nearest_slots.as_slice(), &[Slot::Read, Slot::Uniform]].concat();
        let pack_slots = [Slot::Uniform, Slot::Read, Slot::WriteTexture, Slot::Read];
        Some(Self {
            distances: Kernel::new(device, &module, "distance_subgroup", &slots, &constants),
            distances_and_minima: Kernel::new(device, &module, "distance_minima_subgroup", &minima_slots, &constants),
            nearest: Kernel::new(device, &module, "nearest_subgroup", &nearest_slots, &constants),
            subgroup_size: size,
            pack: Kernel::new(device, &module, "pack_queries", &pack_slots, &constants),
            texture_shift,
            max_texture_rows: side,
        })
    }

    /// The textures a kNN reads `bank`'s chunks from. A single-chunk bank keeps its texture: the first
    /// call makes and fills it, and later ones skip the copy, which llvmpipe makes on one thread while
    /// the other cores wait (20k × 1024 rows, k 1: 1000 queries a median 817 against 959 ms, 16 queries
    /// 17–19 against 85–93 ms). A larger bank's chunks take turns in one texture of the call's, so at
    /// most one chunk's copy exists.
    pub fn bank_textures<'a>(&self, gpu: &Gpu, bank: &'a GpuMatrix) -> Result<BankTextures<'a>, KernelError> {
        if let [chunk] = bank.chunks.as_slice() {
            if let Some(kept) = bank.kept_texture.get() {
                return Ok(BankTextures::Kept(kept));
            }
            let mut texture = self.bank_texture(gpu, bank)?;
            let mut encoder = gpu.device.create_command_encoder(&Default::default());
            texture.load(&mut encoder, chunk, bank.stride());
            gpu.queue.submit([encoder.finish()]);
            // Two calls racing here each make one; the first kept is the one every call reads.
            return Ok(BankTextures::Kept(bank.kept_texture.get_or_init(|| texture)));
        }
        Ok(BankTextures::EachChunk(self.bank_texture(gpu, bank)?))
    }

    /// A texture large enough for any chunk of `bank`, holding none yet.
    fn bank_texture(&self, gpu: &Gpu, bank: &GpuMatrix) -> Result<BankTexture, KernelError> {
        let texels = bank.chunks.iter().map(|c| (c.rows * bank.stride() / 4) as u64).max().unwrap_or(1);
        let texture = self.texture(gpu, texels, "bank chunk texture", wgpu::TextureUsages::COPY_DST)?;
        let view = texture.create_view(&Default::default());
        Ok(BankTexture { texture, view, holds: None })
    }

    /// An rgba32float storage texture of at least `texels` texels, `1 << texture_shift` wide, as the
    /// shader indexes them, with `usage` besides storage binding.
    fn texture(&self, gpu: &Gpu, texels: u64, label: &str, usage: wgpu::TextureUsages) -> Result<wgpu::Texture, KernelError> {
        let width = 1u64 << self.texture_shift;
        let rows = texels.div_ceil(width).max(1);
        if rows > self.max_texture_rows as u64 {
            // `new` only builds the shader where a binding's worth of rows fits, and neither a bank
            // chunk nor a packed query block is larger.
            return Err(KernelError::Shape(format!("{texels} texels of the {label} exceed the device's largest texture")));
        }
        Ok(gpu.device.create_texture(&wgpu::TextureDescriptor {
            label: Some(label),
            size: wgpu::Extent3d { width: width as u32, height: rows as u32, depth_or_array_layers: 1 },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba32Float,
            usage: wgpu::TextureUsages::STORAGE_BINDING | usage,
            view_formats: &[],
        }))
    }

    /// Encodes the packing of rows `first .. first + rows` of a query chunk (`d` wide) into a new
    /// storage texture, as `encode` reads them: per block of 16 rows, per feature, the 16 rows' values
    /// (zero past the last row and past the last feature, up to `packed_features`), so that one lane's
    /// values of a feature are four texel reads, each a gather of the lanes' texels on llvmpipe, where
    /// from a storage buffer they were four loops over the lanes (in the harness, 1000 × 8192 × 1024:
    /// 300 against 402 ms for the whole shader). After each block's features come its rows' squared
    /// norms, as one more feature.
    pub fn pack(
        &self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        chunk: &MatrixChunk,
        first: usize,
        rows: usize,
        d: usize,
    ) -> Result<wgpu::TextureView, KernelError> {
        let stride = row_stride(d);
        let blocks = rows.div_ceil(QUERIES);
        let features = packed_features(stride) + 1;
        let packed = self.texture(gpu, (blocks * QUERIES * features / 4) as u64, "packed queries", wgpu::TextureUsages::empty())?;
        let view = packed.create_view(&Default::default());
        let params = gpu.uniform(&PackParams { rows: rows as u32, first: first as u32, stride: stride as u32, _pad: 0 });
        let groups = (features.div_ceil(WORKGROUP as usize) as u32, blocks as u32);
        let mut pass = encoder.begin_compute_pass(&Default::default());
        let resources = [
            params.as_entire_binding(),
            chunk.values.as_entire_binding(),
            wgpu::BindingResource::TextureView(&view),
            chunk.norms.as_entire_binding(),
        ];
        gpu.dispatch_resources(&mut pass, &self.pack, &resources, groups);
        Ok(view)
    }

    /// Slots per query row of `NearestSlots` (and of slot minima) for a bank chunk of `rows` rows.
    pub fn slots(&self, gpu: &Gpu, rows: usize) -> Result<usize, KernelError> {
        Ok(bank_groups(gpu, rows)? as usize * (WORKGROUP / self.subgroup_size) as usize)
    }

    /// Bank rows per slot: one subgroup's, consecutive, slot `s` starting at chunk row `s` × this.
    pub fn slot_width(&self) -> usize {
        (self.subgroup_size * BANK_ROWS) as usize
    }

    /// Encodes the distances of a block of queries to one bank chunk, which `texture` holds
    /// (`BankTexture::load`), into `out`: all of them, or for k = 1 only each slot's nearest.
    pub fn encode(
        &self,
        gpu: &Gpu,
        pass: &mut wgpu::ComputePass,
        queries: &QueryBlock,
        chunk: &MatrixChunk,
        texture: &BankTexture,
        out: SubgroupOutput,
    ) -> Result<(), KernelError> {
        if texture.holds != Some(chunk.start) {
            return Err(KernelError::Shape(format!("the bank texture does not hold the chunk at row {}", chunk.start)));
        }
        let QueryValues::Packed(packed) = &queries.values else {
            return Err(KernelError::Shape("the subgroup distance kernel reads packed queries, and the block was not packed".into()));
        };
        let params = gpu.uniform(&queries.params(chunk.rows));
        let running_params = match &out {
            SubgroupOutput::DistancesAndMinima { running, .. } => {
                Some(gpu.uniform(&RunningParams { k: running.k as u32, merged: u32::from(running.merged), _pad0: 0, _pad1: 0 }))
            }
            _ => None,
        };
        let mut resources = vec![
            params.as_entire_binding(),
            wgpu::BindingResource::TextureView(packed),
            wgpu::BindingResource::TextureView(&texture.view),
            chunk.norms.as_entire_binding(),
        ];
        let kernel = match out {
            SubgroupOutput::Distances(distances) => {
                resources.push(distances.as_entire_binding());
                &self.distances
            }
            SubgroupOutput::Nearest(slots) => {
                resources.extend([slots.keys.as_entire_binding(), slots.rows.as_entire_binding()]);
                &self.nearest
            }
            SubgroupOutput::DistancesAndMinima { distances, minima, running } => {
                resources.extend([distances.as_entire_binding(), minima.as_entire_binding(), running.values.as_entire_binding()]);
                resources.extend(running_params.as_ref().map(wgpu::Buffer::as_entire_binding));
                &self.distances_and_minima
            }
        };
        // Query rows along x, bank rows along y (see the shader).
        let groups = (queries.rows.div_ceil(QUERIES) as u32, bank_groups(gpu, chunk.rows)?);
        gpu.dispatch_resources(pass, kernel, &resources, groups);
        Ok(())
    }
}

/// Workgroups along the grid's bank axis for a chunk of `rows` bank rows (BANK_ROWS an invocation).
fn bank_groups(gpu: &Gpu, rows: usize) -> Result<u32, KernelError> {
    Ok(gpu.groups_1d(rows.div_ceil(BANK_ROWS as usize), WORKGROUP)?.0)
}

impl BankTexture {
    /// Encodes the copy of `chunk` (rows `stride` floats apart) into the texture, unless it holds it
    /// already: whole rows of the texture in one copy, then the last, partial row.
    fn load(&mut self, encoder: &mut wgpu::CommandEncoder, chunk: &MatrixChunk, stride: usize) {
        if self.holds == Some(chunk.start) {
            return;
        }
        let width = self.texture.width() as u64;
        let texels = (chunk.rows * stride / 4) as u64;
        let (whole_rows, rest) = (texels / width, texels % width);
        let mut copy = |first_row: u64, columns: u64, rows: u64| {
            encoder.copy_buffer_to_texture(
                wgpu::TexelCopyBufferInfo {
                    buffer: &chunk.values,
                    layout: wgpu::TexelCopyBufferLayout {
                        offset: first_row * width * TEXEL_BYTES,
                        bytes_per_row: Some((width * TEXEL_BYTES) as u32),
                        rows_per_image: None,
                    },
                },
                wgpu::TexelCopyTextureInfo {
                    texture: &self.texture,
                    mip_level: 0,
                    origin: wgpu::Origin3d { x: 0, y: first_row as u32, z: 0 },
                    aspect: wgpu::TextureAspect::All,
                },
                wgpu::Extent3d { width: columns as u32, height: rows as u32, depth_or_array_layers: 1 },
            );
        };
        if whole_rows > 0 {
            copy(0, width, whole_rows);
        }
        if rest > 0 {
            copy(whole_rows, rest, 1);
        }
        self.holds = Some(chunk.start);
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
        assert_layout!(RunningParams { k, merged, _pad0, _pad1 }, SOURCE, 16);
    }

    #[test]
    fn the_grid_constants_are_the_shaders() {
        assert_eq!(u32_constant(SOURCE, "QUERIES") as usize, QUERIES);
        assert_eq!(u32_constant(SOURCE, "BANK_ROWS"), BANK_ROWS);
        assert!(SUBGROUP_SIZES.iter().all(|size| WORKGROUP.is_multiple_of(*size)));
        assert_eq!(u32_constant(SOURCE, "FEATURES_MULTIPLE") as usize, FEATURES_MULTIPLE);
        assert!(SUBGROUP_SIZES.iter().all(|size| FEATURES_MULTIPLE.is_multiple_of(*size as usize)));
    }
}
