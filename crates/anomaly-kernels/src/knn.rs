//! The k nearest bank rows of every query, composed from the distance and top-k kernels: for each block
//! of queries and each bank chunk, a distance dispatch and a top-k dispatch that merges into the
//! running best, so at most one chunk's distances exist at a time (and, for the subgroup shader, one
//! chunk's texture copy).

use std::sync::{Mutex, PoisonError};

use burn::tensor::wgpu::wgpu;

use crate::Neighbours;
use crate::context::{Gpu, GpuKernels, GpuMatrix, KernelError, storage_size};
use crate::distance::DistanceKernel;
use crate::distance_subgroup::{NearestSlots, RunningValues, SubgroupOutput, SubgroupShader, packed_block_rows};
use crate::topk::{ChunkEntries, MAX_BOUNDED_K, MAX_K, RunningBest, SlotMinima};

/// Most queries per block (one top-k workgroup each).
pub(crate) const MAX_QUERY_BLOCK: usize = 1024;

/// Output buffers that finished kNN calls left for later ones, the most recent `KEPT_OUTPUTS`: a new
/// buffer is zero-filled before its first use and its memory faulted in page by page, which llvmpipe does
/// on one thread while the compute threads wait (k 50, 1000 queries against 20k × 1024 rows: a median
/// 712–723 against 776–801 ms a call with new buffers). A call takes the buffers it keeps, so calls at
/// the same time never share one.
#[derive(Default)]
pub(crate) struct KeptOutputs(Mutex<Vec<(&'static str, wgpu::Buffer)>>);

/// Most buffers kept: two calls' worth, at most two buffers each (a kNN at k 1 and one at k 50 alternate
/// without a new allocation).
const KEPT_OUTPUTS: usize = 4;

impl KeptOutputs {
    /// A kept buffer for `label` of `bytes` bytes (its contents those a finished call left), or a new one.
    fn take(&self, gpu: &Gpu, bytes: usize, label: &'static str) -> wgpu::Buffer {
        let found = {
            let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let at = kept.iter().position(|(kept_label, buffer)| *kept_label == label && buffer.size() == storage_size(bytes));
            at.map(|at| kept.remove(at).1)
        };
        found.unwrap_or_else(|| gpu.storage(bytes, label))
    }

    /// Keeps `buffers` for later calls, the oldest dropped past `KEPT_OUTPUTS`.
    fn keep(&self, buffers: Vec<(&'static str, wgpu::Buffer)>) {
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        kept.extend(buffers);
        let excess = kept.len().saturating_sub(KEPT_OUTPUTS);
        kept.drain(..excess);
    }
}

/// Where a kNN's distance dispatches write.
enum Output<'a> {
    /// Every distance of a query block to a bank chunk.
    Distances(wgpu::Buffer),
    /// At k = 1 on the subgroup shader (the first), each slot's nearest.
    Nearest(&'a SubgroupShader, NearestSlots),
    /// At larger k, up to `MAX_BOUNDED_K`, on the subgroup shader: every distance, 4 query rows to a vec4
    /// (the first buffer), and each slot's least.
    DistancesAndMinima(&'a SubgroupShader, wgpu::Buffer, wgpu::Buffer),
}

/// Labels of the output buffers, by which `KeptOutputs` tells them apart.
const DISTANCES: &str = "distances";
const SLOT_MINIMA: &str = "slot minima";
const NEAREST_KEYS: &str = "nearest keys";
const NEAREST_ROWS: &str = "nearest rows";

impl Output<'_> {
    /// The buffers, labelled, for `KeptOutputs::keep`.
    fn into_buffers(self) -> Vec<(&'static str, wgpu::Buffer)> {
        match self {
            Self::Distances(distances) => vec![(DISTANCES, distances)],
            Self::Nearest(_, found) => vec![(NEAREST_KEYS, found.keys), (NEAREST_ROWS, found.rows)],
            Self::DistancesAndMinima(_, distances, minima) => vec![(DISTANCES, distances), (SLOT_MINIMA, minima)],
        }
    }
}

impl GpuKernels {
    /// The `k` nearest rows of `bank` for every row of `queries`, both on the device (so a bank scored
    /// against itself, or features the GPU produced, need not pass through the host).
    pub fn knn(&self, bank: &GpuMatrix, queries: &GpuMatrix, k: usize) -> Result<Neighbours, KernelError> {
        let gpu = &self.gpu;
        let d = bank.cols;
        if queries.cols != d {
            return Err(KernelError::Shape(format!("queries must be rows of {d} values, got rows of {}", queries.cols)));
        }
        if k == 0 || k > bank.rows.min(MAX_K) {
            return Err(KernelError::InvalidK { k, max: bank.rows.min(MAX_K), rows: bank.rows });
        }
        let width = bank.chunks.iter().map(|c| c.rows).max().unwrap_or(1);
        let binding_rows = |row_bytes: usize| (gpu.limits.max_binding_bytes / row_bytes as u64) as usize;
        let kernel = self.distance_kernel();
        let query_rows = match kernel {
            DistanceKernel::Subgroup => packed_block_rows(gpu.limits.max_binding_bytes, bank.stride()),
            _ => binding_rows(bank.stride() * 4),
        };
        let mut block = queries.rows.min(MAX_QUERY_BLOCK).min(binding_rows(width * 4)).min(query_rows).min(binding_rows(k * 4)).max(1);
        // The slot-bounded top-k's distances lie 4 query rows to a vec4, so a block's rows rounded up to
        // a multiple of 4 must fit a binding: fewer rows a block where that takes it, the plain top-k
        // where even 4 rows do not fit.
        let bounded_by_slots = kernel == DistanceKernel::Subgroup && (2..=MAX_BOUNDED_K).contains(&k);
        let by_4_rows_fit = |rows: usize| rows.next_multiple_of(4) <= binding_rows(width * 4);
        if bounded_by_slots && !by_4_rows_fit(block) && block >= 4 {
            block = block / 4 * 4;
        }
        // At k = 1 the subgroup shader keeps only each slot's nearest, about 1/32 of the distances; up to
        // MAX_BOUNDED_K it adds each slot's least to the distances.
        let output = match (&self.subgroup, kernel) {
            (Some(subgroup), DistanceKernel::Subgroup) if k == 1 => {
                let bytes = block * subgroup.slots(gpu, width)? * 4;
                let kept = &self.kept_outputs;
                Output::Nearest(
                    subgroup,
                    NearestSlots { keys: kept.take(gpu, bytes, NEAREST_KEYS), rows: kept.take(gpu, bytes, NEAREST_ROWS) },
                )
            }
            (Some(subgroup), DistanceKernel::Subgroup) if bounded_by_slots && by_4_rows_fit(block) => Output::DistancesAndMinima(
                subgroup,
                self.kept_outputs.take(gpu, block.next_multiple_of(4) * width * 4, DISTANCES),
                self.kept_outputs.take(gpu, block * subgroup.slots(gpu, width)? * 4, SLOT_MINIMA),
            ),
            _ => Output::Distances(self.kept_outputs.take(gpu, block * width * 4, DISTANCES)),
        };
        let mut textures = self.bank_textures(bank, kernel)?;
        let mut best = RunningBest::new(gpu, block, k);
        let mut result = Neighbours { k, distances: Vec::with_capacity(queries.rows * k), indices: Vec::with_capacity(queries.rows * k) };
        for chunk in &queries.chunks {
            for first in (0..chunk.rows).step_by(block) {
                let rows = block.min(chunk.rows - first);
                let mut encoder = gpu.device.create_command_encoder(&Default::default());
                let block_queries = self.prepare_queries(&mut encoder, chunk, first, rows, d, kernel)?;
                best.restart();
                for bank_chunk in &bank.chunks {
                    let texture = textures.as_mut().map(|t| t.holding(&mut encoder, bank_chunk, bank.stride()));
                    if matches!(output, Output::DistancesAndMinima(..)) {
                        best.clear_listing(&mut encoder);
                    }
                    let mut pass = encoder.begin_compute_pass(&Default::default());
                    let entries = match (&output, texture) {
                        (Output::Nearest(subgroup, found), Some(texture)) => {
                            subgroup.encode(gpu, &mut pass, &block_queries, bank_chunk, texture, SubgroupOutput::Nearest(found))?;
                            ChunkEntries::Nearest { found, slots: subgroup.slots(gpu, bank_chunk.rows)?, start: bank_chunk.start }
                        }
                        (Output::DistancesAndMinima(subgroup, distances, minima), Some(texture)) => {
                            let running = RunningValues { values: best.current().0, k, merged: best.has_merged() };
                            let out = SubgroupOutput::DistancesAndMinima { distances, minima, running };
                            subgroup.encode(gpu, &mut pass, &block_queries, bank_chunk, texture, out)?;
                            let slots = subgroup.slots(gpu, bank_chunk.rows)?;
                            ChunkEntries::Distances(
                                distances,
                                bank_chunk,
                                Some(SlotMinima { keys: minima, slots, width: subgroup.slot_width() }),
                            )
                        }
                        (Output::Distances(distances), ..) => {
                            self.encode_distances(&mut pass, &block_queries, bank_chunk, texture, distances)?;
                            ChunkEntries::Distances(distances, bank_chunk, None)
                        }
                        (Output::Nearest(..) | Output::DistancesAndMinima(..), None) => {
                            return Err(KernelError::Shape("the subgroup shader's slots need its bank texture".into()));
                        }
                    };
                    self.topk.encode_merge(gpu, &mut pass, &mut best, entries, rows);
                }
                let bytes = (rows * k * 4) as u64;
                let (values, indices) = best.current();
                let parts = gpu.read_back(encoder, &[(values, bytes), (indices, bytes)])?;
                result.distances.extend(bytemuck::cast_slice::<u8, f32>(&parts[0]).iter().map(|s| s.sqrt()));
                result.indices.extend_from_slice(bytemuck::cast_slice::<u8, u32>(&parts[1]));
            }
        }
        self.kept_outputs.keep(output.into_buffers());
        Ok(result)
    }

    /// `knn` for queries on the host (row-major, `bank.cols` wide), uploaded
    /// [`KernelLimits::max_upload_bytes`](crate::KernelLimits::max_upload_bytes) at a time.
    pub fn knn_host(&self, bank: &GpuMatrix, queries: &[f32], k: usize) -> Result<Neighbours, KernelError> {
        let d = bank.cols;
        if queries.is_empty() || !queries.len().is_multiple_of(d) {
            return Err(KernelError::Shape(format!("queries must be rows of {d} values, got {} values", queries.len())));
        }
        let rows_per_upload = usize::try_from(self.gpu.limits.max_upload_bytes / (d as u64 * 4)).unwrap_or(usize::MAX).max(1);
        let mut found =
            Neighbours { k, distances: Vec::with_capacity(queries.len() / d * k), indices: Vec::with_capacity(queries.len() / d * k) };
        for part in queries.chunks(rows_per_upload.saturating_mul(d)) {
            let part_found = self.knn(bank, &self.upload(part, part.len() / d, d)?, k)?;
            found.distances.extend(part_found.distances);
            found.indices.extend(part_found.indices);
        }
        Ok(found)
    }
}
