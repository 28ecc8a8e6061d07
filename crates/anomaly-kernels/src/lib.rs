//! The memory bank's two hot operations, as our own WGSL compute shaders on wgpu: per-column statistics
//! (to keep the columns of highest std-dev) and the k nearest bank rows of every query. Each GPU kernel
//! has a plain f64 CPU reference (for tests) and a fast multithreaded CPU path (for machines without a GPU).
//!
//! PatchCore's greedy coreset (`coreset`) selects the memory bank's points the same way on every path:
//! the CPU reference, the multithreaded CPU path and the GPU pick the same points for the same seed.
//!
//! One module per shader file of the top-level `shaders/` folder holds that shader's host side (its
//! typed `Params`, its pipelines, its dispatches); `context` holds what they share, and `knn` composes
//! the distance and top-k kernels.

mod column_stats;
mod context;
mod coreset;
pub mod cpu;
mod distance;
mod distance_subgroup;
mod gather_columns;
mod knn;
#[cfg(test)]
mod layout;
mod peak;
mod row_norms;
mod topk;

pub use context::{GpuKernels, GpuMatrix, KernelError, KernelLimits};
pub use coreset::{CoresetChunking, CoresetSettings, CoresetSpace, GRID_MAX, STEPS_PER_SUBMISSION};
pub use distance::DistanceKernel;
pub use peak::Peak;

/// Mean and standard deviation (population, ddof = 0, as numpy's `std`) of every column.
#[derive(Clone, Debug, PartialEq)]
pub struct ColumnStats {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// The k nearest bank rows of each query: row-major `queries × k`, nearest first, ties by lower index.
#[derive(Clone, Debug, PartialEq)]
pub struct Neighbours {
    pub k: usize,
    /// Euclidean distances.
    pub distances: Vec<f32>,
    /// Bank row indices.
    pub indices: Vec<u32>,
}

impl Neighbours {
    /// The distances of query `row`.
    pub fn row_distances(&self, row: usize) -> &[f32] {
        &self.distances[row * self.k..(row + 1) * self.k]
    }

    /// The bank indices of query `row`.
    pub fn row_indices(&self, row: usize) -> &[u32] {
        &self.indices[row * self.k..(row + 1) * self.k]
    }
}

/// The `count` columns of highest std-dev, in ascending column order (ties: the lower column first).
pub fn top_columns(std: &[f32], count: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..std.len() as u32).collect();
    order.sort_by(|&a, &b| std[b as usize].total_cmp(&std[a as usize]).then(a.cmp(&b)));
    order.truncate(count);
    order.sort_unstable();
    order
}
