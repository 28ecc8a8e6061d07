//! Banks scored a chunk of rows at a time: each chunk goes through the kNN (the CPU's, or uploaded to
//! the GPU and dropped after) and each query keeps its nearest row so far. A bank larger than memory
//! (a memory-mapped file of rows, [`MappedRows`]) or than the device then scores in bounded memory.

use std::path::Path;

use anomaly_detector::Compute;
use anomaly_kernels::Neighbours;
use anomaly_kernels::cpu::fast;
use memmap2::Mmap;

use crate::{Chunks, PatchCoreError};

/// Bytes of bank rows scored at once when streaming: a quarter of a GiB keeps the kNN's tiles busy and
/// a GPU's buffers within the binding limits of any adapter.
pub const BANK_CHUNK_BYTES: usize = 256 << 20;

/// Each query's nearest bank row (k = 1), the bank's rows arriving in consecutive chunks of whole rows:
/// the same neighbours as one kNN over the whole bank (ties go to the lower row, as there).
pub fn nearest_in_chunks<'a>(
    queries: &[f32],
    dim: usize,
    chunks: impl IntoIterator<Item = (usize, &'a [f32])>,
    compute: &Compute,
) -> Result<Neighbours, PatchCoreError> {
    if dim == 0 || !queries.len().is_multiple_of(dim) {
        return Err(PatchCoreError::Shape(format!("{} query values are not rows of {dim}", queries.len())));
    }
    let rows = queries.len() / dim;
    let mut best = Neighbours { k: 1, distances: vec![f32::INFINITY; rows], indices: vec![u32::MAX; rows] };
    for (first_row, chunk) in chunks {
        if chunk.is_empty() || rows == 0 {
            continue;
        }
        let found = match compute {
            Compute::Gpu(kernels) => kernels.knn_host(&kernels.upload(chunk, chunk.len() / dim, dim)?, queries, 1)?,
            Compute::Cpu => fast::knn(queries, chunk, dim, 1),
        };
        for (q, (&distance, &index)) in found.distances.iter().zip(&found.indices).enumerate() {
            if distance < best.distances[q] {
                best.distances[q] = distance;
                best.indices[q] = (first_row + index as usize) as u32;
            }
        }
    }
    if best.indices.contains(&u32::MAX) {
        return Err(PatchCoreError::Shape("the bank has no row to compare with".into()));
    }
    Ok(best)
}

/// A file of raw little-endian f32 bank rows, memory-mapped read-only: scored a chunk at a time, its pages
/// released after each, so its size is bounded by the disk, not the memory.
pub struct MappedRows {
    map: Mmap,
    dim: usize,
}

impl MappedRows {
    /// Maps an open `file` (`path` names it in errors) as rows of `dim` values.
    pub fn map(file: &std::fs::File, path: &Path, dim: usize) -> Result<Self, PatchCoreError> {
        // SAFETY: mapped read-only; the caller owns the file for the map's life and does not write it.
        let map = unsafe { Mmap::map(file) }.map_err(|source| PatchCoreError::Read { path: path.to_path_buf(), source })?;
        if dim == 0 || map.is_empty() || !map.len().is_multiple_of(dim * 4) {
            return Err(PatchCoreError::Shape(format!("{}: {} bytes are not rows of {dim} f32 values", path.display(), map.len())));
        }
        Ok(Self { map, dim })
    }

    /// Rows in the file.
    pub fn rows(&self) -> usize {
        self.map.len() / (self.dim * 4)
    }

    /// The rows in chunks of about `chunk_bytes`: `(first row, values)`.
    pub fn chunks(&self, chunk_bytes: usize) -> Chunks<'_> {
        Chunks::new(&self.map, Some(&self.map), chunk_bytes, self.dim * 4)
    }
}
