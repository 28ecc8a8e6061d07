//! The plumbing every kernel shares: the device and queue, the limits work is split by, matrices stored
//! as row chunks, pipeline building, dispatch, timing and read-back, and the errors.

use std::borrow::Cow;
use std::sync::{OnceLock, mpsc};
use std::time::Instant;

use burn::tensor::wgpu::wgpu;
use bytemuck::Pod;
use wgpu::util::{BufferInitDescriptor, DeviceExt};

use crate::column_stats::ColumnStatsKernel;
use crate::coreset::CoresetKernels;
use crate::distance::{DistanceKernel, DistanceShaders};
use crate::distance_subgroup::{BankTexture, SubgroupShader};
use crate::gather_columns::GatherKernel;
use crate::knn::KeptOutputs;
use crate::peak::PeakKernels;
use crate::row_norms::RowNormsKernel;
use crate::topk::TopKKernel;

/// Why a kernel could not run.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("k = {k} is out of range: it must be at least 1 and at most {max} (the bank has {rows} rows)")]
    InvalidK { k: usize, max: usize, rows: usize },
    #[error("{0}")]
    Shape(String),
    #[error(
        "one row of {cols} features ({bytes} bytes) is larger than the GPU's storage binding limit of {limit} bytes; \
         keep fewer feature columns or use --device cpu"
    )]
    RowTooLarge { cols: usize, bytes: u64, limit: u64 },
    #[error(transparent)]
    Device(#[from] anomaly_device::DeviceError),
    #[error("reading results back from the GPU failed: {0}")]
    Readback(String),
    #[error("writing a matrix to the GPU failed: {0}")]
    Upload(String),
    #[error("the coreset ratio {0} is out of range: it must be above 0 and at most 1")]
    InvalidRatio(f64),
    #[error("the features hold a value that is not a finite number (row {row}, column {column})")]
    NonFinite { row: usize, column: usize },
}

/// The device limits the kernels split their work by; tests lower them to exercise chunking cheaply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLimits {
    /// Largest buffer a single binding may cover (the smaller of the binding and buffer size limits).
    pub max_binding_bytes: u64,
    /// Largest workgroup count along one dispatch dimension.
    pub max_workgroups: u32,
    /// Most bytes of host rows one call uploads at once ([`GpuKernels::knn_host`]'s queries): their
    /// device copy (host memory on a software adapter) and its staging stay this small however many rows
    /// a caller passes.
    pub max_upload_bytes: u64,
}

/// [`KernelLimits::max_upload_bytes`] on every device: large enough that the uploads' overhead vanishes
/// beside the distances.
const MAX_UPLOAD_BYTES: u64 = 64 << 20;

impl KernelLimits {
    /// The limits of a wgpu device.
    pub fn of(device: &wgpu::Device) -> Self {
        let limits = device.limits();
        Self {
            max_binding_bytes: limits.max_storage_buffer_binding_size.min(limits.max_buffer_size),
            max_workgroups: limits.max_compute_workgroups_per_dimension,
            max_upload_bytes: MAX_UPLOAD_BYTES,
        }
    }
}

/// Most bank rows per chunk: one chunk's distances for a block of queries fit comfortably in a binding.
const MAX_CHUNK_ROWS: usize = 32 * 1024;

/// Floats from one row's start to the next on the device: `cols` rounded up to a multiple of 4, plus one
/// cache line where that is a multiple of 1 KiB.
///
/// - A multiple of 4, so that every row starts on a 16-byte boundary and a shader can read it as
///   `vec4`s: on llvmpipe, where each storage read is a loop over the SIMD lanes, the subgroup distance
///   shader reads its bank rows 4 features at a time (1000 × 20000 × 1024: 338–384 ms against 519–560 ms
///   a feature at a time).
/// - Not a multiple of 1 KiB: rows 4 KiB apart (1024 features) all start in the same set of a CPU's 8-way
///   L1 cache, so a software adapter, whose SIMD lanes each read their own bank rows, evicts the lines it
///   has just loaded (1000 × 4096 × 1024: 674–695 ms with rows 4 KiB apart, 496–529 ms with the pad). A
///   padded row is an odd number of cache lines, so any 64 consecutive rows start in 64 different sets.
///
/// The pad is zero (buffers start zeroed and no kernel writes it); the subgroup distance shader reads it,
/// as part of a row's last `vec4`, and multiplies it by zero.
pub(crate) fn row_stride(cols: usize) -> usize {
    let aligned = cols.next_multiple_of(4);
    if aligned.is_multiple_of(256) { aligned + 16 } else { aligned }
}

/// A matrix on the GPU, stored as row chunks that each fit one binding, with squared row norms (which
/// the distance kernels need on both sides, so they are computed once, where the matrix is made). Rows
/// lie `row_stride` floats apart.
pub struct GpuMatrix {
    pub rows: usize,
    pub cols: usize,
    pub(crate) chunks: Vec<MatrixChunk>,
    /// The subgroup distance shader's copy of a single-chunk matrix, made the first time a kNN reads
    /// the matrix as its bank (`GpuKernels::bank_textures`) and read as it is by every later one, where
    /// each call once copied the bank into a new texture of its own (see `BankTexture`).
    pub(crate) kept_texture: OnceLock<BankTexture>,
}

/// Rows `start .. start + rows` of a matrix, each in its own buffers.
pub(crate) struct MatrixChunk {
    pub start: usize,
    pub rows: usize,
    pub values: wgpu::Buffer,
    pub norms: wgpu::Buffer,
}

impl std::fmt::Debug for GpuMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuMatrix({} × {} in {} chunks)", self.rows, self.cols, self.chunks.len())
    }
}

impl GpuMatrix {
    /// Number of chunks the matrix was split into.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Floats from one row's start to the next on the device: [`row_stride`] of `cols`.
    pub(crate) fn stride(&self) -> usize {
        row_stride(self.cols)
    }
}

/// The device, queue and limits behind every dispatch, with the helpers the kernel modules share.
pub(crate) struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub limits: KernelLimits,
    timestamps: Option<wgpu::QuerySet>,
}

/// The compiled kernels on one wgpu device and queue.
pub struct GpuKernels {
    pub(crate) gpu: Gpu,
    pub(crate) column_stats: ColumnStatsKernel,
    pub(crate) gather: GatherKernel,
    pub(crate) norms: RowNormsKernel,
    pub(crate) distance: DistanceShaders,
    /// `None` where the device lacks subgroup operations of a size the shader is written for.
    pub(crate) subgroup: Option<SubgroupShader>,
    pub(crate) topk: TopKKernel,
    pub(crate) coreset: CoresetKernels,
    /// Built on first use: only `bench kernels` runs the probes, and compiling them costs every other run.
    pub(crate) peak: std::sync::OnceLock<PeakKernels>,
    pub(crate) distance_kernel: DistanceKernel,
    /// The output buffers of finished kNN calls, for the next call of the same shape.
    pub(crate) kept_outputs: KeptOutputs,
}

impl GpuKernels {
    /// Kernels on the process's shared wgpu context, the one burn's backbone runs on, with the distance
    /// shader that suits its adapter.
    pub fn shared() -> Result<Self, KernelError> {
        let context = anomaly_device::GpuContext::get()?;
        let kernels = Self::new(context.setup.device.clone(), context.setup.queue.clone());
        let kernel =
            if context.adapter.is_hardware || !kernels.has_subgroup_kernel() { DistanceKernel::Tiled } else { DistanceKernel::Subgroup };
        Ok(kernels.with_distance_kernel(kernel))
    }

    /// Builds every pipeline on `device`; distances use the tiled shader unless told otherwise.
    pub fn new(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        // Not on a CPU adapter: llvmpipe stamps a query when its rasterizer next flushes, not where the
        // pass starts, and a test process's concurrent work once made every probe pass read 0.03–0.1
        // ms while it ran for seconds (the probe then scaled itself up 2^19 times). There the wall
        // time from submission to completion is the kernel's.
        let trusted = device.adapter_info().device_type != wgpu::DeviceType::Cpu;
        let timestamps = (trusted && device.features().contains(wgpu::Features::TIMESTAMP_QUERY)).then(|| {
            device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("kernel timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            })
        });
        Self {
            column_stats: ColumnStatsKernel::new(&device),
            gather: GatherKernel::new(&device),
            norms: RowNormsKernel::new(&device),
            distance: DistanceShaders::new(&device),
            subgroup: SubgroupShader::new(&device),
            topk: TopKKernel::new(&device),
            coreset: CoresetKernels::new(&device),
            peak: std::sync::OnceLock::new(),
            distance_kernel: DistanceKernel::Tiled,
            kept_outputs: KeptOutputs::default(),
            gpu: Gpu { limits: KernelLimits::of(&device), timestamps, device, queue },
        }
    }

    /// Uses `kernel` for the distances of `knn` (the subgroup shader falls back to the tiled one on a
    /// device that cannot run it).
    pub fn with_distance_kernel(mut self, kernel: DistanceKernel) -> Self {
        self.distance_kernel = kernel;
        self
    }

    /// The distance shader `knn` runs: the one asked for, unless that is the subgroup shader and the
    /// device cannot run it.
    pub fn distance_kernel(&self) -> DistanceKernel {
        match self.distance_kernel {
            DistanceKernel::Subgroup if self.subgroup.is_none() => DistanceKernel::Tiled,
            kernel => kernel,
        }
    }

    /// Whether the device can run `DistanceKernel::Subgroup`.
    pub fn has_subgroup_kernel(&self) -> bool {
        self.subgroup.is_some()
    }

    /// Splits work as if the device had these (smaller) limits.
    pub fn with_limits(mut self, limits: KernelLimits) -> Self {
        self.gpu.limits = limits;
        self
    }

    /// The limits work is split by.
    pub fn limits(&self) -> KernelLimits {
        self.gpu.limits
    }

    /// Whether kernel times come from GPU timestamps (else from submit-to-completion wall time, as on
    /// CPU adapters, whose timestamps need not bracket a pass).
    pub fn has_timestamps(&self) -> bool {
        self.gpu.timestamps.is_some()
    }

    /// Uploads a row-major `rows × cols` matrix in chunks that fit one binding each.
    pub fn upload(&self, values: &[f32], rows: usize, cols: usize) -> Result<GpuMatrix, KernelError> {
        if rows == 0 || cols == 0 || values.len() != rows * cols {
            return Err(KernelError::Shape(format!("a {rows} × {cols} matrix needs {} values, got {}", rows * cols, values.len())));
        }
        let stride = row_stride(cols);
        let chunk_rows = self.gpu.rows_per_chunk(cols)?;
        let mut chunks = Vec::new();
        let mut encoder = self.gpu.device.create_command_encoder(&Default::default());
        for start in (0..rows).step_by(chunk_rows) {
            let count = chunk_rows.min(rows - start);
            let chunk_values = &values[start * cols..(start + count) * cols];
            let buffer = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("matrix chunk"),
                size: (count * stride * 4) as u64,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: true,
            });
            {
                let mut mapped = buffer.get_mapped_range_mut(..).map_err(|e| KernelError::Upload(e.to_string()))?;
                if stride == cols {
                    mapped.copy_from_slice(bytemuck::cast_slice(chunk_values));
                } else {
                    // Row by row; the pads stay as the mapping starts them: zero.
                    for (row, from) in chunk_values.chunks_exact(cols).enumerate() {
                        let at = row * stride * 4;
                        mapped.slice(at..at + cols * 4).copy_from_slice(bytemuck::cast_slice(from));
                    }
                }
            }
            buffer.unmap();
            let norms = self.gpu.storage(count * 4, "row norms");
            self.norms.encode(&self.gpu, &mut encoder, &buffer, &norms, count, cols);
            chunks.push(MatrixChunk { start, rows: count, values: buffer, norms });
        }
        self.gpu.queue.submit([encoder.finish()]);
        Ok(GpuMatrix { rows, cols, chunks, kept_texture: OnceLock::new() })
    }

    /// Reads a matrix back to the host, row-major.
    pub fn download(&self, matrix: &GpuMatrix) -> Result<Vec<f32>, KernelError> {
        let stride = matrix.stride();
        let sources: Vec<(&wgpu::Buffer, u64)> = matrix.chunks.iter().map(|c| (&c.values, (c.rows * stride * 4) as u64)).collect();
        let parts = self.gpu.read_back(self.gpu.device.create_command_encoder(&Default::default()), &sources)?;
        let rows = parts.iter().flat_map(|bytes| bytemuck::cast_slice::<u8, f32>(bytes).chunks_exact(stride));
        Ok(rows.flat_map(|row| row[..matrix.cols].iter().copied()).collect())
    }
}

/// What one binding of a kernel's bind group holds.
#[derive(Clone, Copy)]
pub(crate) enum Slot {
    Uniform,
    Read,
    Write,
    /// A 2D rgba32float storage texture, read with `textureLoad`.
    ReadTexture,
    /// A 2D rgba32float storage texture, written with `textureStore`.
    WriteTexture,
}

/// One compute pipeline with its bind group layout.
pub(crate) struct Kernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

impl Kernel {
    /// Builds the pipeline of `entry` in `module`, with values for the shader's `override` constants.
    pub fn new(device: &wgpu::Device, module: &wgpu::ShaderModule, entry: &str, slots: &[Slot], constants: &[(&str, f64)]) -> Self {
        let entries: Vec<wgpu::BindGroupLayoutEntry> = slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let buffer = |ty| wgpu::BindingType::Buffer { ty, has_dynamic_offset: false, min_binding_size: None };
                let ty = match slot {
                    Slot::Uniform => buffer(wgpu::BufferBindingType::Uniform),
                    Slot::Read => buffer(wgpu::BufferBindingType::Storage { read_only: true }),
                    Slot::Write => buffer(wgpu::BufferBindingType::Storage { read_only: false }),
                    Slot::ReadTexture | Slot::WriteTexture => wgpu::BindingType::StorageTexture {
                        access: if matches!(slot, Slot::ReadTexture) {
                            wgpu::StorageTextureAccess::ReadOnly
                        } else {
                            wgpu::StorageTextureAccess::WriteOnly
                        },
                        format: wgpu::TextureFormat::Rgba32Float,
                        view_dimension: wgpu::TextureViewDimension::D2,
                    },
                };
                wgpu::BindGroupLayoutEntry { binding: i as u32, visibility: wgpu::ShaderStages::COMPUTE, ty, count: None }
            })
            .collect();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(entry), entries: &entries });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(entry),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: Some(&pipeline_layout),
            module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions { constants, ..Default::default() },
            cache: None,
        });
        Self { pipeline, layout }
    }

    /// A bind group of whole `buffers` in order, for dispatches that reuse it (`Gpu::dispatch_bound`).
    pub fn bind_group(&self, device: &wgpu::Device, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> =
            buffers.iter().enumerate().map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() }).collect();
        device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &self.layout, entries: &entries })
    }
}

/// Compiles one of the WGSL files of the top-level `shaders/` folder.
pub(crate) fn shader_module(device: &wgpu::Device, label: &str, source: &'static str) -> wgpu::ShaderModule {
    device
        .create_shader_module(wgpu::ShaderModuleDescriptor { label: Some(label), source: wgpu::ShaderSource::Wgsl(Cow::Borrowed(source)) })
}

/// The size of `Gpu::storage`'s buffer for `bytes` bytes: no binding may be empty.
pub(crate) fn storage_size(bytes: usize) -> u64 {
    (bytes as u64).max(4)
}

impl Gpu {
    /// Rows per chunk of a matrix `cols` wide: as many as one binding holds, at most `MAX_CHUNK_ROWS`.
    pub fn rows_per_chunk(&self, cols: usize) -> Result<usize, KernelError> {
        let row_bytes = row_stride(cols) as u64 * 4;
        if row_bytes > self.limits.max_binding_bytes {
            return Err(KernelError::RowTooLarge { cols, bytes: row_bytes, limit: self.limits.max_binding_bytes });
        }
        Ok(((self.limits.max_binding_bytes / row_bytes) as usize).min(MAX_CHUNK_ROWS))
    }

    /// Workgroups covering `items` invocations in groups of `workgroup`, along x only.
    pub fn groups_1d(&self, items: usize, workgroup: u32) -> Result<(u32, u32), KernelError> {
        let groups = items.div_ceil(workgroup as usize);
        if groups > self.limits.max_workgroups as usize {
            return Err(KernelError::Shape(format!("{groups} workgroups exceed the dispatch limit of {}", self.limits.max_workgroups)));
        }
        Ok((groups.max(1) as u32, 1))
    }

    /// A grid of one workgroup per row, folded into two dimensions past the per-dimension limit.
    pub fn row_groups(&self, rows: usize) -> (u32, u32) {
        let x = rows.min(self.limits.max_workgroups as usize).max(1);
        (x as u32, rows.div_ceil(x) as u32)
    }

    /// A uniform buffer holding a shader's `Params`.
    pub fn uniform<P: Pod>(&self, params: &P) -> wgpu::Buffer {
        self.device.create_buffer_init(&BufferInitDescriptor {
            label: Some("params"),
            contents: bytemuck::bytes_of(params),
            usage: wgpu::BufferUsages::UNIFORM,
        })
    }

    /// A zero-filled storage buffer of `storage_size(bytes)` bytes that can be copied from and to.
    pub fn storage(&self, bytes: usize, label: &str) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: storage_size(bytes),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Encodes one dispatch of `kernel` with whole `buffers` bound in order.
    pub fn dispatch(&self, pass: &mut wgpu::ComputePass, kernel: &Kernel, buffers: &[&wgpu::Buffer], groups: (u32, u32)) {
        let resources: Vec<wgpu::BindingResource> = buffers.iter().map(|b| b.as_entire_binding()).collect();
        self.dispatch_resources(pass, kernel, &resources, groups);
    }

    /// Encodes one dispatch of `kernel` with `resources` bound in order.
    pub fn dispatch_resources(
        &self,
        pass: &mut wgpu::ComputePass,
        kernel: &Kernel,
        resources: &[wgpu::BindingResource],
        groups: (u32, u32),
    ) {
        self.bind(pass, kernel, resources);
        pass.dispatch_workgroups(groups.0, groups.1, 1);
    }

    /// Encodes one dispatch of `kernel` with whole `buffers` bound in order, its workgroups read on the
    /// device from the first three u32 of `groups`.
    pub fn dispatch_indirect(&self, pass: &mut wgpu::ComputePass, kernel: &Kernel, buffers: &[&wgpu::Buffer], groups: &wgpu::Buffer) {
        let resources: Vec<wgpu::BindingResource> = buffers.iter().map(|b| b.as_entire_binding()).collect();
        self.bind(pass, kernel, &resources);
        pass.dispatch_workgroups_indirect(groups, 0);
    }

    /// Sets `kernel`'s pipeline and a bind group of `resources`, in order, for the next dispatch.
    fn bind(&self, pass: &mut wgpu::ComputePass, kernel: &Kernel, resources: &[wgpu::BindingResource]) {
        let entries: Vec<wgpu::BindGroupEntry> = resources
            .iter()
            .enumerate()
            .map(|(i, resource)| wgpu::BindGroupEntry { binding: i as u32, resource: resource.clone() })
            .collect();
        let bind_group =
            self.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &kernel.layout, entries: &entries });
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
    }

    /// Encodes one dispatch of `kernel` with a bind group built by its `bind_group`.
    pub fn dispatch_bound(&self, pass: &mut wgpu::ComputePass, kernel: &Kernel, bind_group: &wgpu::BindGroup, groups: (u32, u32)) {
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, bind_group, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, 1);
    }

    /// Runs one compute pass and returns its duration in milliseconds: from GPU timestamps when the
    /// device has trustworthy ones, else from submission to completion.
    pub fn time(&self, encode: impl FnOnce(&mut wgpu::ComputePass)) -> Result<f64, KernelError> {
        let mut encoder = self.device.create_command_encoder(&Default::default());
        let writes = self.timestamps.as_ref().map(|query_set| wgpu::ComputePassTimestampWrites {
            query_set,
            beginning_of_pass_write_index: Some(0),
            end_of_pass_write_index: Some(1),
        });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: writes });
            encode(&mut pass);
        }
        let Some(query_set) = &self.timestamps else {
            // Not counting work submitted before.
            self.wait()?;
            let start = Instant::now();
            self.queue.submit([encoder.finish()]);
            self.wait()?;
            return Ok(start.elapsed().as_secs_f64() * 1e3);
        };
        let resolved = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        encoder.resolve_query_set(query_set, 0..2, &resolved, 0);
        let parts = self.read_back(encoder, &[(&resolved, 16)])?;
        let ticks: &[u64] = bytemuck::cast_slice(&parts[0]);
        Ok(ticks[1].saturating_sub(ticks[0]) as f64 * self.queue.get_timestamp_period() as f64 / 1e6)
    }

    /// Copies `sources` into mappable buffers, submits `encoder` and returns their bytes.
    pub fn read_back(&self, mut encoder: wgpu::CommandEncoder, sources: &[(&wgpu::Buffer, u64)]) -> Result<Vec<Vec<u8>>, KernelError> {
        let staging: Vec<wgpu::Buffer> = sources
            .iter()
            .map(|&(source, size)| {
                let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("readback"),
                    size,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                encoder.copy_buffer_to_buffer(source, 0, &buffer, 0, size);
                buffer
            })
            .collect();
        self.queue.submit([encoder.finish()]);
        let (sender, receiver) = mpsc::channel();
        for buffer in &staging {
            let sender = sender.clone();
            buffer.map_async(wgpu::MapMode::Read, .., move |result| {
                let _ = sender.send(result);
            });
        }
        self.wait()?;
        for _ in &staging {
            receiver.recv().map_err(|e| KernelError::Readback(e.to_string()))?.map_err(|e| KernelError::Readback(e.to_string()))?;
        }
        let bytes = staging
            .iter()
            .map(|buffer| {
                let view = buffer.get_mapped_range(..).map_err(|e| KernelError::Readback(e.to_string()))?;
                Ok(view.to_vec())
            })
            .collect();
        staging.iter().for_each(|b| b.unmap());
        bytes
    }

    fn wait(&self) -> Result<(), KernelError> {
        self.device.poll(wgpu::PollType::wait_indefinitely()).map(|_| ()).map_err(|e| KernelError::Readback(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::row_stride;

    #[test]
    fn row_strides_are_whole_vec4s_never_a_multiple_of_1_kib_and_padded_rows_are_an_odd_number_of_cache_lines() {
        for cols in 1..=8192 {
            let stride = row_stride(cols);
            assert!(stride.is_multiple_of(4), "{cols} columns: stride {stride}");
            assert!(!(stride * 4).is_multiple_of(1024), "{cols} columns: rows {} bytes apart", stride * 4);
            let aligned = cols.next_multiple_of(4);
            if stride == aligned {
                assert!(stride - cols < 4, "{cols}");
            } else {
                assert_eq!(stride - aligned, 16, "{cols}: one cache line of pad");
                assert_eq!(stride * 4 / 64 % 2, 1, "{cols}: an odd number of cache lines");
            }
        }
    }
}
