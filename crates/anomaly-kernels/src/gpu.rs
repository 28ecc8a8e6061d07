//! Host side of the WGSL kernels: pipelines built once, matrices uploaded in chunks that respect the
//! device's binding and dispatch limits, and dispatches encoded into one submission per query block.

use std::borrow::Cow;
use std::sync::mpsc;
use std::time::Instant;

use burn::tensor::wgpu::wgpu;
use wgpu::util::{BufferInitDescriptor, DeviceExt};

use crate::{ColumnStats, Neighbours};

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
}

/// The device limits the kernels split their work by; tests lower them to exercise chunking cheaply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLimits {
    /// Largest buffer a single binding may cover (the smaller of the binding and buffer size limits).
    pub max_binding_bytes: u64,
    /// Largest workgroup count along one dispatch dimension.
    pub max_workgroups: u32,
}

impl KernelLimits {
    /// The limits of a wgpu device.
    pub fn of(device: &wgpu::Device) -> Self {
        let limits = device.limits();
        Self {
            max_binding_bytes: limits.max_storage_buffer_binding_size.min(limits.max_buffer_size),
            max_workgroups: limits.max_compute_workgroups_per_dimension,
        }
    }
}

/// Which pairwise-distance shader runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DistanceKernel {
    /// Shared-memory tiles, 4 × 4 outputs per invocation: for hardware GPUs.
    Tiled,
    /// Query rows broadcast from a uniform buffer to one bank row per invocation: for adapters that
    /// emulate a GPU on the CPU (llvmpipe), where storage reads are costly; up to 2048 features.
    Broadcast,
    /// One invocation per pair: the baseline the others are measured against.
    Naive,
}

/// Bytes of one uniform query block of the broadcast shader (its `array<vec4<f32>, 4096>`).
const BROADCAST_BLOCK_BYTES: usize = 64 * 1024;
/// Widest rows the broadcast shader takes: 8 rows of 512 vec4s fill its block.
pub const BROADCAST_MAX_D: usize = 2048;

fn broadcast_fits(d: usize) -> bool {
    d <= BROADCAST_MAX_D
}

/// Query rows per uniform block: 16 up to 1024 features, else 8.
fn broadcast_rows(d: usize) -> usize {
    if d.div_ceil(4) <= 256 { 16 } else { 8 }
}

/// A block of queries on the device, with the broadcast shader's copy where it is used.
struct QueryBlock {
    rows: usize,
    d: usize,
    values: wgpu::Buffer,
    norms: wgpu::Buffer,
    broadcast: Option<BroadcastBlocks>,
}

struct BroadcastBlocks {
    buffer: wgpu::Buffer,
    stride: u64,
    rows_per_block: usize,
}

/// Largest k the top-k kernel keeps (its sort runs in workgroup memory).
pub const MAX_K: usize = 1024;
/// Most bank rows per chunk: one chunk's distances for a block of queries fit comfortably in a binding.
const MAX_CHUNK_ROWS: usize = 32 * 1024;
/// Most queries per block (one top-k workgroup each).
const MAX_QUERY_BLOCK: usize = 1024;
/// Most row chunks the column statistics split a matrix into before merging.
const MAX_STAT_CHUNKS: usize = 1024;

/// A matrix on the GPU, stored as row chunks that each fit one binding, with squared row norms.
pub struct GpuMatrix {
    pub rows: usize,
    pub cols: usize,
    chunks: Vec<MatrixChunk>,
}

struct MatrixChunk {
    start: usize,
    rows: usize,
    values: wgpu::Buffer,
    norms: wgpu::Buffer,
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
}

struct Kernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

enum Slot {
    Uniform,
    Read,
    Write,
}

/// The compiled kernels on one wgpu device and queue.
pub struct GpuKernels {
    device: wgpu::Device,
    queue: wgpu::Queue,
    limits: KernelLimits,
    partial_stats: Kernel,
    merge_stats: Kernel,
    gather: Kernel,
    norms: Kernel,
    tiled: Kernel,
    broadcast16: Kernel,
    broadcast8: Kernel,
    naive: Kernel,
    topk: Kernel,
    timestamps: Option<wgpu::QuerySet>,
    distance_kernel: DistanceKernel,
}

impl GpuKernels {
    /// Kernels on the process's shared wgpu context, the one burn's backbone runs on, with the distance
    /// shader that suits its adapter.
    pub fn shared() -> Result<Self, KernelError> {
        let context = anomaly_device::GpuContext::get()?;
        let kernel = if context.adapter.is_hardware { DistanceKernel::Tiled } else { DistanceKernel::Broadcast };
        Ok(Self::new(context.setup.device.clone(), context.setup.queue.clone()).with_distance_kernel(kernel))
    }

    /// Builds every pipeline on `device`; distances use the tiled shader unless told otherwise.
    pub fn new(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        use Slot::*;
        let module = |label: &str, source: &'static str| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(Cow::Borrowed(source)),
            })
        };
        let stats = module("column_stats", include_str!("../../../shaders/column_stats.wgsl"));
        let gather = module("gather_columns", include_str!("../../../shaders/gather_columns.wgsl"));
        let norms = module("row_norms", include_str!("../../../shaders/row_norms.wgsl"));
        let distance = module("distance", include_str!("../../../shaders/distance.wgsl"));
        let broadcast = module("distance_broadcast", include_str!("../../../shaders/distance_broadcast.wgsl"));
        let topk = module("topk", include_str!("../../../shaders/topk.wgsl"));
        let timestamps = device.features().contains(wgpu::Features::TIMESTAMP_QUERY).then(|| {
            device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("kernel timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            })
        });
        Self {
            partial_stats: build(&device, &stats, "partial_stats", &[Uniform, Read, Write, Write]),
            merge_stats: build(&device, &stats, "merge_stats", &[Uniform, Read, Write, Write]),
            gather: build(&device, &gather, "gather_columns", &[Uniform, Read, Read, Write]),
            norms: build(&device, &norms, "row_norms", &[Uniform, Read, Write]),
            tiled: build(&device, &distance, "distance_tiled", &[Uniform, Read, Read, Read, Read, Write]),
            broadcast16: build_with(
                &device,
                &broadcast,
                "distance_broadcast",
                &[Uniform, Uniform, Read, Read, Read, Write],
                &[("ROWS", 16.0)],
            ),
            broadcast8: build_with(
                &device,
                &broadcast,
                "distance_broadcast",
                &[Uniform, Uniform, Read, Read, Read, Write],
                &[("ROWS", 8.0)],
            ),
            naive: build(&device, &distance, "distance_naive", &[Uniform, Read, Read, Read, Read, Write]),
            topk: build(&device, &topk, "topk", &[Uniform, Read, Read, Read, Write, Write]),
            limits: KernelLimits::of(&device),
            timestamps,
            distance_kernel: DistanceKernel::Tiled,
            device,
            queue,
        }
    }

    /// Uses `kernel` for the distances of `knn` (the broadcast shader falls back to the tiled one past
    /// its width limit).
    pub fn with_distance_kernel(mut self, kernel: DistanceKernel) -> Self {
        self.distance_kernel = kernel;
        self
    }

    /// The distance shader `knn` prefers.
    pub fn distance_kernel(&self) -> DistanceKernel {
        self.distance_kernel
    }

    /// Splits work as if the device had these (smaller) limits.
    pub fn with_limits(mut self, limits: KernelLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The limits work is split by.
    pub fn limits(&self) -> KernelLimits {
        self.limits
    }

    /// Whether kernel times come from GPU timestamps (else from submit-to-completion wall time).
    pub fn has_timestamps(&self) -> bool {
        self.timestamps.is_some()
    }

    /// Uploads a row-major `rows × cols` matrix in chunks that fit one binding each.
    pub fn upload(&self, values: &[f32], rows: usize, cols: usize) -> Result<GpuMatrix, KernelError> {
        if rows == 0 || cols == 0 || values.len() != rows * cols {
            return Err(KernelError::Shape(format!("a {rows} × {cols} matrix needs {} values, got {}", rows * cols, values.len())));
        }
        let chunk_rows = self.rows_per_chunk(cols)?;
        let mut chunks = Vec::new();
        let mut encoder = self.device.create_command_encoder(&Default::default());
        for start in (0..rows).step_by(chunk_rows) {
            let count = chunk_rows.min(rows - start);
            let values = self.device.create_buffer_init(&BufferInitDescriptor {
                label: Some("matrix chunk"),
                contents: bytemuck::cast_slice(&values[start * cols..(start + count) * cols]),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            });
            let norms = self.storage(count * 4, "row norms");
            self.encode_norms(&mut encoder, &values, &norms, count, cols);
            chunks.push(MatrixChunk { start, rows: count, values, norms });
        }
        self.queue.submit([encoder.finish()]);
        Ok(GpuMatrix { rows, cols, chunks })
    }

    /// Reads a matrix back to the host, row-major.
    pub fn download(&self, matrix: &GpuMatrix) -> Result<Vec<f32>, KernelError> {
        let sources: Vec<(&wgpu::Buffer, u64)> = matrix.chunks.iter().map(|c| (&c.values, (c.rows * matrix.cols * 4) as u64)).collect();
        let parts = self.read_back(self.device.create_command_encoder(&Default::default()), &sources)?;
        Ok(parts.iter().flat_map(|bytes| bytemuck::cast_slice::<u8, f32>(bytes).iter().copied()).collect())
    }

    fn rows_per_chunk(&self, cols: usize) -> Result<usize, KernelError> {
        let row_bytes = cols as u64 * 4;
        if row_bytes > self.limits.max_binding_bytes {
            return Err(KernelError::RowTooLarge { cols, bytes: row_bytes, limit: self.limits.max_binding_bytes });
        }
        Ok(((self.limits.max_binding_bytes / row_bytes) as usize).min(MAX_CHUNK_ROWS))
    }

    /// Mean and population std-dev of every column: Welford within row chunks on the GPU, Chan's merge
    /// across them (on the GPU within a stored chunk, then on the host across stored chunks, in f64).
    pub fn column_stats(&self, matrix: &GpuMatrix) -> Result<ColumnStats, KernelError> {
        let cols = matrix.cols;
        let partial_limit = (self.limits.max_binding_bytes / (cols as u64 * 16)).max(1) as usize;
        let mut encoder = self.device.create_command_encoder(&Default::default());
        let mut merged = Vec::new();
        for chunk in &matrix.chunks {
            let pieces = chunk.rows.min(MAX_STAT_CHUNKS).min(partial_limit).min(self.limits.max_workgroups as usize);
            let rows_per_piece = chunk.rows.div_ceil(pieces);
            let pieces = chunk.rows.div_ceil(rows_per_piece);
            let params = self.uniform(&[chunk.rows as u32, cols as u32, rows_per_piece as u32, pieces as u32]);
            let partials = self.storage(pieces * cols * 16, "partial stats");
            let result = self.storage(cols * 16, "merged stats");
            let buffers = [&params, &chunk.values, &partials, &result];
            let groups = dispatch_1d(cols.div_ceil(64), self.limits)?;
            let mut pass = encoder.begin_compute_pass(&Default::default());
            self.dispatch(&mut pass, &self.partial_stats, &buffers, (groups.0, pieces as u32));
            self.dispatch(&mut pass, &self.merge_stats, &buffers, groups);
            drop(pass);
            merged.push(result);
        }
        let sources: Vec<(&wgpu::Buffer, u64)> = merged.iter().map(|b| (b, (cols * 16) as u64)).collect();
        let parts = self.read_back(encoder, &sources)?;
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

    /// A new matrix holding the given columns of `matrix`, in that order.
    pub fn gather_columns(&self, matrix: &GpuMatrix, columns: &[u32]) -> Result<GpuMatrix, KernelError> {
        if columns.is_empty() || columns.iter().any(|&c| c as usize >= matrix.cols) {
            return Err(KernelError::Shape(format!("column selection out of range for {} columns", matrix.cols)));
        }
        let selected = columns.len();
        let index = self.device.create_buffer_init(&BufferInitDescriptor {
            label: Some("selected columns"),
            contents: bytemuck::cast_slice(columns),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        let mut chunks = Vec::new();
        for chunk in &matrix.chunks {
            let params = self.uniform(&[chunk.rows as u32, matrix.cols as u32, selected as u32, 0]);
            let values = self.storage(chunk.rows * selected * 4, "gathered chunk");
            let norms = self.storage(chunk.rows * 4, "row norms");
            let groups = (dispatch_1d(selected.div_ceil(64), self.limits)?.0, (chunk.rows as u32).min(self.limits.max_workgroups));
            let mut pass = encoder.begin_compute_pass(&Default::default());
            self.dispatch(&mut pass, &self.gather, &[&params, &chunk.values, &index, &values], groups);
            drop(pass);
            self.encode_norms(&mut encoder, &values, &norms, chunk.rows, selected);
            chunks.push(MatrixChunk { start: chunk.start, rows: chunk.rows, values, norms });
        }
        self.queue.submit([encoder.finish()]);
        Ok(GpuMatrix { rows: matrix.rows, cols: selected, chunks })
    }

    /// The `k` nearest rows of `bank` for every row of `queries` (row-major, `bank.cols` wide): for each
    /// block of queries and each bank chunk, a distance dispatch and a top-k dispatch that merges into
    /// the running best, so at most one chunk's distances exist at a time.
    pub fn knn(&self, bank: &GpuMatrix, queries: &[f32], k: usize) -> Result<Neighbours, KernelError> {
        let d = bank.cols;
        if queries.is_empty() || queries.len() % d != 0 {
            return Err(KernelError::Shape(format!("queries must be rows of {d} values, got {} values", queries.len())));
        }
        if k == 0 || k > bank.rows.min(MAX_K) {
            return Err(KernelError::InvalidK { k, max: bank.rows.min(MAX_K), rows: bank.rows });
        }
        let m = queries.len() / d;
        let width = bank.chunks.iter().map(|c| c.rows).max().unwrap_or(1);
        let binding_rows = |row_bytes: usize| (self.limits.max_binding_bytes / row_bytes as u64) as usize;
        let block = m.min(MAX_QUERY_BLOCK).min(binding_rows(width * 4)).min(binding_rows(d * 4)).min(binding_rows(k * 4)).max(1);
        let kernel = self.distance_kernel_for(d);
        let capacity = k.next_power_of_two() as u32;
        let distances = self.storage(block * width * 4, "distances");
        let best = [
            (self.storage(block * k * 4, "best values"), self.storage(block * k * 4, "best indices")),
            (self.storage(block * k * 4, "best values"), self.storage(block * k * 4, "best indices")),
        ];
        let mut result = Neighbours { k, distances: Vec::with_capacity(m * k), indices: Vec::with_capacity(m * k) };
        for start in (0..m).step_by(block) {
            let rows = block.min(m - start);
            let mut encoder = self.device.create_command_encoder(&Default::default());
            let block_queries = self.prepare_queries(&mut encoder, &queries[start * d..(start + rows) * d], d, kernel);
            let mut current = 0;
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                for (c, chunk) in bank.chunks.iter().enumerate() {
                    self.encode_distances(&mut pass, kernel, &block_queries, chunk, &distances);
                    let prev = if c == 0 { 0 } else { k };
                    let params = self.uniform(&[rows as u32, chunk.rows as u32, k as u32, prev as u32, chunk.start as u32, capacity, 0, 0]);
                    let (src, dst) = (&best[current], &best[1 - current]);
                    let buffers = [&params, &distances, &src.0, &src.1, &dst.0, &dst.1];
                    self.dispatch(&mut pass, &self.topk, &buffers, self.row_groups(rows));
                    current = 1 - current;
                }
            }
            let bytes = (rows * k * 4) as u64;
            let parts = self.read_back(encoder, &[(&best[current].0, bytes), (&best[current].1, bytes)])?;
            result.distances.extend(bytemuck::cast_slice::<u8, f32>(&parts[0]).iter().map(|s| s.sqrt()));
            result.indices.extend_from_slice(bytemuck::cast_slice::<u8, u32>(&parts[1]));
        }
        Ok(result)
    }

    /// The full `m × n` matrix of squared distances between `queries` (host, row-major) and a
    /// single-chunk `bank`, with the given shader; for tests and for benchmarking the shaders against
    /// each other. Returns the values and the shader's time in milliseconds (GPU timestamps where
    /// available, else wall time).
    pub fn distance_matrix(&self, queries: &[f32], bank: &GpuMatrix, kernel: DistanceKernel) -> Result<(Vec<f32>, f64), KernelError> {
        let d = bank.cols;
        let (m, n) = (queries.len() / d.max(1), bank.rows);
        if queries.len() != m * d || m == 0 || bank.chunks.len() != 1 || m > MAX_QUERY_BLOCK {
            return Err(KernelError::Shape(format!(
                "distance_matrix takes 1 to {MAX_QUERY_BLOCK} query rows of {d} values and a single-chunk bank"
            )));
        }
        if (m * n * 4) as u64 > self.limits.max_binding_bytes {
            return Err(KernelError::Shape(format!("a {m} × {n} distance matrix exceeds one binding")));
        }
        if kernel == DistanceKernel::Broadcast && !broadcast_fits(d) {
            return Err(KernelError::Shape(format!("the broadcast kernel takes at most {BROADCAST_MAX_D} features")));
        }
        let out = self.storage(m * n * 4, "distance matrix");
        let mut encoder = self.device.create_command_encoder(&Default::default());
        let block = self.prepare_queries(&mut encoder, queries, d, kernel);
        self.queue.submit([encoder.finish()]);
        let ms = self.time(|pass| self.encode_distances(pass, kernel, &block, &bank.chunks[0], &out))?;
        let parts = self.read_back(self.device.create_command_encoder(&Default::default()), &[(&out, (m * n * 4) as u64)])?;
        Ok((bytemuck::cast_slice(&parts[0]).to_vec(), ms))
    }

    /// The distance shader `knn` uses for `d` features: the preferred one, unless the broadcast shader's
    /// 64 KiB uniform block cannot hold 8 rows of that width.
    fn distance_kernel_for(&self, d: usize) -> DistanceKernel {
        match self.distance_kernel {
            DistanceKernel::Broadcast if !broadcast_fits(d) => DistanceKernel::Tiled,
            kernel => kernel,
        }
    }

    /// Uploads a block of query rows and encodes their norms; for the broadcast shader also a copy in
    /// uniform-buffer blocks of `ROWS` zero-padded rows, each at an aligned offset.
    fn prepare_queries(&self, encoder: &mut wgpu::CommandEncoder, queries: &[f32], d: usize, kernel: DistanceKernel) -> QueryBlock {
        let rows = queries.len() / d;
        let values = self.device.create_buffer_init(&BufferInitDescriptor {
            label: Some("queries"),
            contents: bytemuck::cast_slice(queries),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let norms = self.storage(rows * 4, "query norms");
        self.encode_norms(encoder, &values, &norms, rows, d);
        let broadcast = (kernel == DistanceKernel::Broadcast).then(|| {
            let d4 = d.div_ceil(4);
            let rows_per_block = broadcast_rows(d);
            let align = self.device.limits().min_uniform_buffer_offset_alignment as usize;
            let stride = (rows_per_block * d4 * 16).div_ceil(align) * align;
            let blocks = rows.div_ceil(rows_per_block);
            let mut padded = vec![0f32; ((blocks - 1) * stride + BROADCAST_BLOCK_BYTES) / 4];
            for (row, values) in queries.chunks_exact(d).enumerate() {
                let offset = (row / rows_per_block) * stride / 4 + (row % rows_per_block) * d4 * 4;
                padded[offset..offset + d].copy_from_slice(values);
            }
            let buffer = self.device.create_buffer_init(&BufferInitDescriptor {
                label: Some("query blocks"),
                contents: bytemuck::cast_slice(&padded),
                usage: wgpu::BufferUsages::UNIFORM,
            });
            BroadcastBlocks { buffer, stride: stride as u64, rows_per_block }
        });
        QueryBlock { rows, d, values, norms, broadcast }
    }

    /// Encodes the squared distances of a query block to one bank chunk into `out` (`rows × chunk.rows`).
    fn encode_distances(
        &self,
        pass: &mut wgpu::ComputePass,
        kernel: DistanceKernel,
        queries: &QueryBlock,
        chunk: &MatrixChunk,
        out: &wgpu::Buffer,
    ) {
        let (m, n, d) = (queries.rows, chunk.rows, queries.d);
        match (kernel, &queries.broadcast) {
            (DistanceKernel::Broadcast, Some(blocks)) => {
                let shader = if blocks.rows_per_block == 16 { &self.broadcast16 } else { &self.broadcast8 };
                for (index, first) in (0..m).step_by(blocks.rows_per_block).enumerate() {
                    let rows = blocks.rows_per_block.min(m - first);
                    let params = self.uniform(&[rows as u32, n as u32, d as u32, d.div_ceil(4) as u32, first as u32, 0, 0, 0]);
                    let block = wgpu::BufferBinding {
                        buffer: &blocks.buffer,
                        offset: index as u64 * blocks.stride,
                        size: std::num::NonZeroU64::new(BROADCAST_BLOCK_BYTES as u64),
                    };
                    let resources = [
                        params.as_entire_binding(),
                        wgpu::BindingResource::Buffer(block),
                        chunk.values.as_entire_binding(),
                        queries.norms.as_entire_binding(),
                        chunk.norms.as_entire_binding(),
                        out.as_entire_binding(),
                    ];
                    self.dispatch_resources(pass, shader, &resources, (n.div_ceil(64) as u32, 1));
                }
            }
            _ => {
                let params = self.uniform(&[m as u32, n as u32, d as u32, 0]);
                let buffers = [&params, &queries.values, &chunk.values, &queries.norms, &chunk.norms, out];
                let (shader, groups) = match kernel {
                    DistanceKernel::Naive => (&self.naive, (n.div_ceil(16) as u32, m.div_ceil(16) as u32)),
                    _ => (&self.tiled, (n.div_ceil(64) as u32, m.div_ceil(64) as u32)),
                };
                self.dispatch(pass, shader, &buffers, groups);
            }
        }
    }

    /// Runs one compute pass and returns its duration in milliseconds: from GPU timestamps when the
    /// device has them, else from submission to completion.
    fn time(&self, encode: impl FnOnce(&mut wgpu::ComputePass)) -> Result<f64, KernelError> {
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

    /// Encodes one dispatch of `kernel` with whole `buffers` bound in order.
    fn dispatch(&self, pass: &mut wgpu::ComputePass, kernel: &Kernel, buffers: &[&wgpu::Buffer], groups: (u32, u32)) {
        let resources: Vec<wgpu::BindingResource> = buffers.iter().map(|b| b.as_entire_binding()).collect();
        self.dispatch_resources(pass, kernel, &resources, groups);
    }

    /// Encodes one dispatch of `kernel` with `resources` bound in order.
    fn dispatch_resources(&self, pass: &mut wgpu::ComputePass, kernel: &Kernel, resources: &[wgpu::BindingResource], groups: (u32, u32)) {
        let entries: Vec<wgpu::BindGroupEntry> = resources
            .iter()
            .enumerate()
            .map(|(i, resource)| wgpu::BindGroupEntry { binding: i as u32, resource: resource.clone() })
            .collect();
        let bind_group =
            self.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &kernel.layout, entries: &entries });
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, 1);
    }

    fn encode_norms(&self, encoder: &mut wgpu::CommandEncoder, values: &wgpu::Buffer, norms: &wgpu::Buffer, rows: usize, cols: usize) {
        let (x, y) = self.row_groups(rows);
        let params = self.uniform(&[rows as u32, cols as u32, x, 0]);
        let mut pass = encoder.begin_compute_pass(&Default::default());
        self.dispatch(&mut pass, &self.norms, &[&params, values, norms], (x, y));
    }

    /// A grid of one workgroup per row, folded into two dimensions past the per-dimension limit.
    fn row_groups(&self, rows: usize) -> (u32, u32) {
        let x = rows.min(self.limits.max_workgroups as usize).max(1);
        (x as u32, rows.div_ceil(x) as u32)
    }

    fn uniform(&self, words: &[u32]) -> wgpu::Buffer {
        self.device.create_buffer_init(&BufferInitDescriptor {
            label: Some("params"),
            contents: bytemuck::cast_slice(words),
            usage: wgpu::BufferUsages::UNIFORM,
        })
    }

    fn storage(&self, bytes: usize, label: &str) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (bytes as u64).max(4),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Copies `sources` into mappable buffers, submits `encoder` and returns their bytes.
    fn read_back(&self, mut encoder: wgpu::CommandEncoder, sources: &[(&wgpu::Buffer, u64)]) -> Result<Vec<Vec<u8>>, KernelError> {
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

fn build(device: &wgpu::Device, module: &wgpu::ShaderModule, entry: &str, slots: &[Slot]) -> Kernel {
    build_with(device, module, entry, slots, &[])
}

/// Builds a pipeline with values for the shader's `override` constants.
fn build_with(device: &wgpu::Device, module: &wgpu::ShaderModule, entry: &str, slots: &[Slot], constants: &[(&str, f64)]) -> Kernel {
    let entries: Vec<wgpu::BindGroupLayoutEntry> = slots
        .iter()
        .enumerate()
        .map(|(i, slot)| wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: match slot {
                    Slot::Uniform => wgpu::BufferBindingType::Uniform,
                    Slot::Read => wgpu::BufferBindingType::Storage { read_only: true },
                    Slot::Write => wgpu::BufferBindingType::Storage { read_only: false },
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
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
    Kernel { pipeline, layout }
}

fn dispatch_1d(groups: usize, limits: KernelLimits) -> Result<(u32, u32), KernelError> {
    if groups > limits.max_workgroups as usize {
        return Err(KernelError::Shape(format!("{groups} workgroups exceed the dispatch limit of {}", limits.max_workgroups)));
    }
    Ok((groups.max(1) as u32, 1))
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
