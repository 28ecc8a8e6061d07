//! The kernels on the CPU: `reference` is plain and exact enough to judge the GPU by (f64 accumulation;
//! the coreset, whose picks must equal the GPU's, in the f32 order `coreset.rs` defines); `fast` is what
//! `--device cpu` runs (an optimised sgemm and a partial selection, on all cores).

use rayon::prelude::*;

mod coreset_cells;
mod product;

use crate::coreset::{self, CoresetSettings, CoresetSpace};
use crate::{ColumnStats, KernelError, Neighbours};

/// (distance, index) order: the nearest first, ties by the lower index.
fn nearer(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
}

pub mod reference {
    //! Straightforward f64 implementations, for tests.

    use super::*;

    /// Two-pass column mean and population std-dev, accumulated in f64.
    pub fn column_stats(matrix: &[f32], rows: usize, cols: usize) -> ColumnStats {
        let mut mean = vec![0f64; cols];
        for row in matrix.chunks_exact(cols).take(rows) {
            for (m, &x) in mean.iter_mut().zip(row) {
                *m += x as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= rows as f64);
        let mut var = vec![0f64; cols];
        for row in matrix.chunks_exact(cols).take(rows) {
            for ((v, &x), m) in var.iter_mut().zip(row).zip(&mean) {
                *v += (x as f64 - m).powi(2);
            }
        }
        ColumnStats { mean: mean.iter().map(|&m| m as f32).collect(), std: var.iter().map(|&v| (v / rows as f64).sqrt() as f32).collect() }
    }

    /// Squared Euclidean distance of every (query, bank row) pair, `m × n`, from differences in f64.
    pub fn squared_distances(queries: &[f32], bank: &[f32], d: usize) -> Vec<f64> {
        let mut out = Vec::new();
        for q in queries.chunks_exact(d) {
            for b in bank.chunks_exact(d) {
                out.push(q.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum());
            }
        }
        out
    }

    /// The k nearest bank rows of each query by a full sort of the exact distances.
    pub fn knn(queries: &[f32], bank: &[f32], d: usize, k: usize) -> Neighbours {
        let n = bank.len() / d;
        let squared = squared_distances(queries, bank, d);
        let mut distances = Vec::new();
        let mut indices = Vec::new();
        for row in squared.chunks_exact(n) {
            let mut order: Vec<(f64, u32)> = row.iter().enumerate().map(|(i, &s)| (s, i as u32)).collect();
            order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            for &(s, i) in order.iter().take(k) {
                distances.push(s.sqrt() as f32);
                indices.push(i);
            }
        }
        Neighbours { k, distances, indices }
    }

    /// PatchCore's coreset of `rows × dims` row-major features, written out plainly on one thread: the
    /// projection, the grid and the greedy selection as `coreset.rs` defines them. Picks in pick order.
    pub fn coreset(features: &[f32], rows: usize, dims: usize, settings: &CoresetSettings) -> Result<Vec<u32>, KernelError> {
        let plan = coreset::Plan::new(features, rows, dims, settings)?;
        let p = plan.dims;
        let mut values = vec![0f32; rows * p];
        match &plan.matrix {
            None => values.copy_from_slice(features),
            Some(w) => {
                for i in 0..rows {
                    for k in 0..dims {
                        let x = features[i * dims + k];
                        for j in 0..p {
                            values[i * p + j] += x * w[k * p + j];
                        }
                    }
                }
            }
        }
        let mut max_abs = 0f32;
        for &y in &values {
            max_abs = max_abs.max(y.abs());
        }
        let scale = coreset::grid_scale(max_abs)?;
        for y in &mut values {
            *y = coreset::to_grid(*y, scale);
        }
        Ok(greedy_rows(&values, rows, p, plan.start, plan.picks))
    }

    /// The reference's greedy selection on a prepared space (for tests: the reference's own projection
    /// is `coreset`'s).
    pub fn greedy(space: &CoresetSpace) -> Vec<u32> {
        greedy_rows(&space.to_rows(), space.rows(), space.dims(), space.start(), space.picks())
    }

    /// The greedy selection on `rows × dims` grid points from `start`, until `picks` points are picked:
    /// running minima of squared distances summed over j = 0, 1, …; the largest minimum is picked, the
    /// first (lowest index) of equal ones. (Benchmarks time it on `CoresetSpace::to_rows`, made before
    /// the clock starts.)
    pub fn greedy_rows(values: &[f32], rows: usize, dims: usize, start: usize, picks: usize) -> Vec<u32> {
        let mut mins = vec![f32::MAX; rows];
        let mut picked = vec![start as u32];
        while picked.len() < picks {
            let last = *picked.last().unwrap_or(&0) as usize;
            mins[last] = -1.0;
            let center = &values[last * dims..(last + 1) * dims];
            let mut best = (f32::NEG_INFINITY, 0u32);
            for i in 0..rows {
                let mut sum = 0f32;
                for j in 0..dims {
                    let t = values[i * dims + j] - center[j];
                    sum += t * t;
                }
                mins[i] = mins[i].min(sum);
                if mins[i] > best.0 {
                    best = (mins[i], i as u32);
                }
            }
            picked.push(best.1);
        }
        picked
    }
}

pub mod fast {
    //! Multithreaded CPU paths for users without a GPU.

    use super::*;
    use coreset_cells::{CoresetCells, PlainScan};

    /// Bank rows per distance block: the block's distances stay in cache-friendly sizes.
    const BANK_BLOCK: usize = 2048;
    /// Most queries per task: each task packs every bank block of its range once for its queries, so
    /// taller blocks spread that packing over more work (measured at 1000 queries on 2 threads,
    /// 100k × 1024, k 1, AVX-512: 785 ms with 256, 692 ms with 512). Splitting the bank between tasks
    /// instead of the queries (one block of 1000 queries, two ranges) was 3–8% faster again at PatchCore's
    /// shapes (784 queries × 16k × 152, 1000 × 100k × 152) and at 20k × 1024, k 50, and the same at
    /// 100k × 1024.
    const QUERY_BLOCK: usize = 1024;
    /// Fewest queries per task.
    const MIN_QUERY_BLOCK: usize = 32;
    /// Fewest bank rows per task when a query block's bank is split between tasks.
    const MIN_BANK_RANGE: usize = 4 * BANK_BLOCK;

    /// Column mean and population std-dev, accumulated in f64: blocks of whole rows in parallel, each
    /// read as one stream. (Blocks of 64 columns, each task reading 256 bytes of every row, read 1.5–2.5
    /// GB/s, 5–8% of a Zen 4's read probe: a strided read the prefetcher does not follow.) The blocks are
    /// a number of rows fixed by the matrix alone and their sums are added in block order, so the result
    /// does not depend on the thread count.
    pub fn column_stats(matrix: &[f32], rows: usize, cols: usize) -> ColumnStats {
        /// Most row blocks: their partial sums (two f64 a column each) are held until added.
        const MAX_BLOCKS: usize = 256;
        /// Fewest rows per block.
        const MIN_BLOCK_ROWS: usize = 256;
        let matrix = &matrix[..rows * cols];
        // Shifted sums (by the first row) keep the variance exact for data far from zero.
        let shift: Vec<f64> = match rows {
            0 => vec![0.0; cols],
            _ => matrix[..cols].iter().map(|&x| x as f64).collect(),
        };
        let block_rows = rows.div_ceil(MAX_BLOCKS).max(MIN_BLOCK_ROWS);
        let partials: Vec<(Vec<f64>, Vec<f64>)> = matrix
            .par_chunks(block_rows * cols.max(1))
            .map(|block| {
                let (mut sum, mut sum_sq) = (vec![0f64; cols], vec![0f64; cols]);
                #[cfg(target_arch = "x86_64")]
                if anomaly_device::CpuIsa::active() >= anomaly_device::CpuIsa::Avx2 {
                    // SAFETY: `active` is at most what the CPU has: AVX2 here.
                    unsafe { x86::add_shifted_sums_avx2(block, &shift, &mut sum, &mut sum_sq) };
                    return (sum, sum_sq);
                }
                add_shifted_sums(block, &shift, &mut sum, &mut sum_sq);
                (sum, sum_sq)
            })
            .collect();
        let (mut sum, mut sum_sq) = (vec![0f64; cols], vec![0f64; cols]);
        for (block_sum, block_sum_sq) in &partials {
            sum.iter_mut().zip(block_sum).for_each(|(s, b)| *s += b);
            sum_sq.iter_mut().zip(block_sum_sq).for_each(|(s, b)| *s += b);
        }
        let n = rows as f64;
        let (mean, std) = (0..cols)
            .map(|j| {
                let mean = sum[j] / n;
                ((shift[j] + mean) as f32, ((sum_sq[j] / n - mean * mean).max(0.0)).sqrt() as f32)
            })
            .unzip();
        ColumnStats { mean, std }
    }

    /// Adds each column's shifted values and their squares over the rows of `block` (rows of `shift`'s
    /// width), row after row; inlined into its callers so that each compiles it for its vector width.
    #[inline(always)]
    fn add_shifted_sums(block: &[f32], shift: &[f64], sum: &mut [f64], sum_sq: &mut [f64]) {
        for row in block.chunks_exact(shift.len()) {
            for (((s, q), &x), &shift) in sum.iter_mut().zip(&mut *sum_sq).zip(row).zip(shift) {
                let x = x as f64 - shift;
                *s += x;
                *q += x * x;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        /// [`super::add_shifted_sums`] in AVX2 (four f64 lanes, not SSE2's two): the same operations in
        /// the same order (Rust never fuses the multiply and the add), so the same bits.
        #[target_feature(enable = "avx2")]
        pub(super) fn add_shifted_sums_avx2(block: &[f32], shift: &[f64], sum: &mut [f64], sum_sq: &mut [f64]) {
            super::add_shifted_sums(block, shift, sum, sum_sq)
        }
    }

    /// Squared norms of the rows of a row-major matrix.
    pub fn row_norms(matrix: &[f32], d: usize) -> Vec<f32> {
        matrix.par_chunks_exact(d).map(|row| row.iter().map(|x| x * x).sum()).collect()
    }

    /// The k nearest bank rows of every query: squared distances from the norms and −2·Q·Bᵀ, a query block
    /// against a bank block at a time (`product`: fused with the selection in AVX-512 or AVX2 registers, or
    /// sgemm and a scan), each offered to its query's running partial selection only below its k-th best so far.
    /// Few queries (fewer blocks than threads) split the bank between tasks instead, so that each bank
    /// block is packed once, and each query's selections from the ranges are merged.
    pub fn knn(queries: &[f32], bank: &[f32], d: usize, k: usize) -> Neighbours {
        if k == 0 {
            return Neighbours { k, distances: Vec::new(), indices: Vec::new() };
        }
        let (m, n) = (queries.len() / d, bank.len() / d);
        let bank_norms = row_norms(bank, d);
        let threads = rayon::current_num_threads();
        // A bank long enough to give every thread a range takes the queries in blocks as tall as they come;
        // a shorter one divides the queries between the threads.
        let splits = n.div_ceil(MIN_BANK_RANGE);
        let query_block = if splits >= threads { m.clamp(1, QUERY_BLOCK) } else { m.div_ceil(threads).clamp(MIN_QUERY_BLOCK, QUERY_BLOCK) };
        let query_blocks = m.div_ceil(query_block);
        let ranges = threads.div_ceil(query_blocks.max(1)).min(splits).max(1);
        let range_rows = n.div_ceil(ranges);
        let tasks: Vec<(usize, usize)> = (0..query_blocks).flat_map(|q| (0..ranges).map(move |r| (q, r))).collect();
        let found: Vec<Vec<Vec<(f32, u32)>>> = tasks
            .par_iter()
            .map(|&(q, r)| {
                let block = &queries[q * query_block * d..((q + 1) * query_block).min(m) * d];
                let (first, last) = ((r * range_rows).min(n), ((r + 1) * range_rows).min(n));
                let block_m = block.len() / d;
                let query_norms = row_norms_serial(block, d);
                let mut nearest = NearestSoFar::new(block_m, k);
                let mut block_scan = product::QueryBlock::new(block, block_m, d);
                for start in (first..last).step_by(BANK_BLOCK) {
                    let width = BANK_BLOCK.min(last - start);
                    let chunk = &bank[start * d..(start + width) * d];
                    block_scan.scan(chunk, width, start, &bank_norms[start..start + width], &query_norms, &mut nearest);
                }
                nearest.best
            })
            .collect();
        let mut distances = Vec::with_capacity(m * k);
        let mut indices = Vec::with_capacity(m * k);
        for block in found.chunks_exact(ranges) {
            for query in 0..block[0].len() {
                let mut candidates: Vec<(f32, u32)> = block.iter().flat_map(|range| range[query].iter().copied()).collect();
                candidates.sort_unstable_by(nearer);
                candidates.truncate(k);
                for (squared, index) in candidates {
                    distances.push(squared.sqrt());
                    indices.push(index);
                }
            }
        }
        Neighbours { k, distances, indices }
    }

    /// Each query's nearest bank rows so far, as the scan offers them.
    struct NearestSoFar {
        k: usize,
        /// Each query holds at most 2k candidates, cut back to its k best whenever full: its memory stays
        /// small (a whole bank block's room per query, kept for PatchCore's 164k leave-one-out queries,
        /// fragmented the heap into gigabytes).
        best: Vec<Vec<(f32, u32)>>,
        /// The k-th best squared distance so far (infinite until k are held): a later bank row enters only
        /// below it, since an equal one has a higher index and loses the tie. Most rows fail this one
        /// comparison, so the selection costs little beside the product.
        bounds: Vec<f32>,
    }

    impl NearestSoFar {
        fn new(queries: usize, k: usize) -> Self {
            Self { k, best: (0..queries).map(|_| Vec::with_capacity(2 * k)).collect(), bounds: vec![f32::INFINITY; queries] }
        }
    }

    impl product::Candidates for NearestSoFar {
        fn bound(&self, query: usize) -> f32 {
            self.bounds[query]
        }

        fn offer(&mut self, query: usize, squared: f32, index: u32) {
            let candidates = &mut self.best[query];
            candidates.push((squared, index));
            if candidates.len() == 2 * self.k {
                keep_nearest(candidates, self.k, &mut self.bounds[query]);
            }
        }
    }

    /// Cuts `candidates` back to their `k` nearest (by distance, then index: a total order, so the same
    /// set whenever it is cut) and sets `bound` to the k-th distance.
    fn keep_nearest(candidates: &mut Vec<(f32, u32)>, k: usize, bound: &mut f32) {
        candidates.select_nth_unstable_by(k - 1, nearer);
        candidates.truncate(k);
        *bound = candidates.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
    }

    fn row_norms_serial(matrix: &[f32], d: usize) -> Vec<f32> {
        matrix.chunks_exact(d).map(|row| row.iter().map(|x| x * x).sum()).collect()
    }

    /// `out = a · bᵀ` for row-major `a` (m × d) and `b` (n × d), single-threaded (callers parallelise).
    pub fn multiply_transposed(a: &[f32], b: &[f32], m: usize, n: usize, d: usize, out: &mut [f32]) {
        sgemm_transposed(a, b, m, n, d, out, gemm::Parallelism::None);
    }

    /// `out = a · bᵀ` using every core: the reference point the GPU kernels are benchmarked against.
    pub fn multiply_transposed_parallel(a: &[f32], b: &[f32], m: usize, n: usize, d: usize, out: &mut [f32]) {
        sgemm_transposed(a, b, m, n, d, out, gemm::Parallelism::Rayon(rayon::current_num_threads()));
    }

    fn sgemm_transposed(a: &[f32], b: &[f32], m: usize, n: usize, d: usize, out: &mut [f32], parallelism: gemm::Parallelism) {
        assert!(a.len() >= m * d && b.len() >= n * d && out.len() >= m * n);
        // SAFETY: the asserts above bound every access the strides below describe.
        unsafe {
            gemm::gemm(
                m,
                n,
                d,
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                d as isize,
                b.as_ptr(),
                d as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }

    /// PatchCore's coreset on all cores: the parallel projection of `CoresetSpace::new`, then `select`.
    pub fn coreset(features: &[f32], rows: usize, dims: usize, settings: &CoresetSettings) -> Result<Vec<u32>, KernelError> {
        Ok(select(CoresetSpace::new(features, rows, dims, settings)?))
    }

    /// The greedy selection on all cores, pruned by the triangle inequality (`coreset_cells`): the picks
    /// equal `reference::greedy`'s. It takes the space over (its cells are the space's memory).
    pub fn select(space: CoresetSpace) -> Vec<u32> {
        select_with_updates(space).0
    }

    /// `select`, with the share of the distances to points a plain scan sums that the pruned steps summed
    /// (1: nothing pruned; 0 without steps): how much the pruning saved on these points.
    pub fn select_with_updates(space: CoresetSpace) -> (Vec<u32>, f64) {
        let (n, picks) = (space.rows(), space.picks());
        let mut picked = vec![space.start() as u32];
        if picks < 2 {
            return (picked, 0.0);
        }
        // Distances to points summed, and those a plain scan sums.
        let (mut measured, mut plain) = (n - 1, n - 1);
        // The selection's state dies at the end of this block, before its pages are handed back.
        {
            let mut selection = Selection::Plain { scan: PlainScan::new(space), may_prune: true };
            // Points measured (or, plain, that the cells would have measured) over the last `WINDOW`
            // steps, with how many points there were: when to switch.
            let mut recent = std::collections::VecDeque::with_capacity(WINDOW);
            loop {
                let (pick, home) = match &selection {
                    Selection::Plain { scan, .. } => (scan.next(), 0),
                    Selection::Pruned(cells) => cells.next(),
                };
                picked.push(pick);
                if picked.len() == picks {
                    break;
                }
                let (step, tested) = match &mut selection {
                    Selection::Plain { scan, .. } => {
                        let tested = scan.step();
                        (scan.len(), tested)
                    }
                    Selection::Pruned(cells) => {
                        let step = cells.step(pick, home);
                        if picked.len().is_multiple_of(RELEASE_EVERY) {
                            release_free_memory();
                        }
                        (step, step)
                    }
                };
                measured += step;
                plain += n - picked.len();
                if recent.len() == WINDOW {
                    recent.pop_front();
                }
                recent.push_back((tested, n - picked.len()));
                let (window_tested, window_points) = recent.iter().fold((0, 0), |(t, p), &(tested, points)| (t + tested, p + points));
                let share = window_tested as f64 / window_points as f64;
                selection = match selection {
                    Selection::Plain { scan, may_prune: true } if recent.len() == WINDOW && cells_share(share) <= PRUNE_SHARE => {
                        recent.clear();
                        Selection::Pruned(scan.into_cells())
                    }
                    Selection::Pruned(cells) if recent.len() == WINDOW && share >= PLAIN_SHARE => {
                        recent.clear();
                        Selection::Plain { scan: cells.into_plain(), may_prune: false }
                    }
                    unchanged => unchanged,
                };
            }
        }
        release_free_memory();
        (picked, measured as f64 / plain as f64)
    }

    /// The share of points the cells would measure where the skip test fails for `share` of them: the
    /// cells measure whole blocks of 8 (`GROUP`) points, and a cell's points lie in its blocks in no
    /// order of their minima, so a block is measured unless all 8 pass.
    fn cells_share(share: f64) -> f64 {
        1.0 - (1.0 - share).powi(coreset::SPACE_GROUP as i32)
    }

    /// The greedy selection's state: a plain scan (`may_prune`: until the pruning has been tried and
    /// given up) or the pruned cells.
    enum Selection {
        Plain { scan: PlainScan, may_prune: bool },
        Pruned(CoresetCells),
    }

    /// Greedy steps between two hand-backs of the allocator's free pages.
    const RELEASE_EVERY: usize = 1024;

    /// Hands the allocator's free pages back to the system. The cells are tens of thousands of small
    /// allocations that shrink and die as points move, and glibc keeps the pages freed among them
    /// resident: on 1 M clustered 128-d points, trimming every 1024 picks held the process 35 MiB lower
    /// over 20,000 picks. A memory budget is a promise about the resident set, so the selection trims now
    /// and then (a walk of the free lists: about 8 ms a call there) and when it ends.
    fn release_free_memory() {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free memory to the system; it is safe to call at any time.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    /// Steps over which the share of points measured is judged, to switch between the plain scan and
    /// the pruned cells.
    const WINDOW: usize = 16;
    /// The share of the points the cells would measure, over the window, at or below which the plain
    /// scan sorts its points into cells: a pruned step costs more per point it measures than a plain one
    /// (scattered cells, moves, bookkeeping), so the pruning pays only once it skips most points.
    const PRUNE_SHARE: f64 = 0.4;
    /// The share measured over the window at or above which the pruned selection gives up for good and
    /// finishes as a plain scan, as on structureless data.
    const PLAIN_SHARE: f64 = 0.75;

    #[cfg(test)]
    mod tests {
        /// The column statistics add their row blocks' sums in one order whatever the thread count: the
        /// same bits on 1, 2 and 3 threads (over more blocks than threads, on values far from zero).
        #[test]
        fn column_stats_do_not_depend_on_the_thread_count() {
            let (rows, cols) = (20_000, 37);
            let mut state = 11u64;
            let matrix: Vec<f32> = (0..rows * cols)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    1000.0 + (state >> 40) as f32 / (1u64 << 20) as f32
                })
                .collect();
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| super::column_stats(&matrix, rows, cols))
            };
            let one = run(1);
            for threads in [2, 3] {
                assert_eq!(run(threads), one, "{threads} threads");
            }
        }

        /// Few queries split a long bank between threads and merge their selections: the same neighbours
        /// and distances, ties included, as one thread scanning the whole bank, and as the reference.
        #[test]
        fn a_bank_split_between_threads_gives_the_neighbours_of_one_scan() {
            let (m, n, d, k) = (37, 40_000, 12, 25);
            // Values on a coarse grid, so that many distances tie across the ranges.
            let values = |len: usize, seed: u64| -> Vec<f32> {
                let mut state = seed;
                (0..len)
                    .map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((state >> 60) as f32) - 8.0
                    })
                    .collect()
            };
            let (queries, bank) = (values(m * d, 1), values(n * d, 2));
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| super::knn(&queries, &bank, d, k))
            };
            let one = run(1);
            for threads in [2, 3, 8] {
                assert_eq!(run(threads), one, "{threads} threads");
            }
            let reference = super::super::reference::knn(&queries, &bank, d, k);
            assert_eq!(one.distances.len(), reference.distances.len());
            for (query, (ours, theirs)) in one.distances.chunks_exact(k).zip(reference.distances.chunks_exact(k)).enumerate() {
                for (a, b) in ours.iter().zip(theirs) {
                    assert!((a - b).abs() <= 1e-4 * b.max(1.0), "query {query}: {a} against {b}");
                }
            }
        }
    }
}

pub mod peak {
    //! The CPU's own ceilings, which `bench kernels` judges the CPU paths by: independent FMA chains on
    //! every thread, in the widest vectors the CPU has (picked at run time: the build targets baseline
    //! x86-64, where `mul_add` would call the libm `fmaf`), and a streaming read on every thread.

    use std::convert::Infallible;
    use std::hint::black_box;
    use std::time::Instant;

    use super::*;
    use crate::peak::{best_ms, calibrate};

    /// Independent accumulators per thread: FMA latency (4–5 cycles) × 2 FMA ports vectors in flight,
    /// with room to spare, and few enough to stay in 16 vector registers.
    const CHAINS: usize = 12;
    /// Bytes the bandwidth probe should read: past the last-level caches (server L3s reach
    /// hundreds of MiB), so that it measures memory.
    pub const STREAM_BYTES: usize = 1 << 30;

    /// Single-precision GFLOP/s of FMA chains on all threads (an FMA counts as 2 flops; the portable
    /// fallback's multiply and add, too).
    pub fn fma_gflops() -> f64 {
        let threads = rayon::current_num_threads();
        let (lanes, chains) = widest();
        let run = |iterations: u32| {
            let start = Instant::now();
            let sum: f32 =
                (0..threads).into_par_iter().map(|_| chains(black_box(iterations as usize), black_box(0.999_9), black_box(1e-4))).sum();
            black_box(sum);
            Ok::<_, Infallible>(start.elapsed().as_secs_f64() * 1e3)
        };
        let Ok(iterations) = calibrate(1 << 30, run);
        let Ok(ms) = best_ms(|| run(iterations));
        2.0 * (threads * CHAINS * lanes) as f64 * iterations as f64 / ms / 1e6
    }

    /// GB/s of summing a buffer of `bytes` on all threads.
    pub fn read_gbs(bytes: usize) -> f64 {
        // Written, so that its pages are mapped: a fresh zeroed allocation would read the shared zero page.
        let values = vec![1f32; (bytes / 4).max(1)];
        let Ok(ms) = best_ms(|| {
            let start = Instant::now();
            let sum: f32 = values.par_chunks(1 << 16).map(sum_lanes).sum();
            black_box(sum);
            Ok::<_, Infallible>(start.elapsed().as_secs_f64() * 1e3)
        });
        (values.len() * 4) as f64 / ms / 1e6
    }

    /// A sum in 16 lanes, which the compiler vectorises (one running sum would be a serial chain).
    fn sum_lanes(values: &[f32]) -> f32 {
        let mut lanes = [0f32; 16];
        let (blocks, rest) = values.as_chunks::<16>();
        for block in blocks {
            for (lane, x) in lanes.iter_mut().zip(block) {
                *lane += x;
            }
        }
        lanes.iter().chain(rest).sum()
    }

    /// A loop of `CHAINS` independent chains `a = a·m + c`, `iterations` long; returns their sum.
    type Chains = fn(usize, f32, f32) -> f32;

    /// The widest FMA this CPU has: (f32 lanes per chain, its loop).
    fn widest() -> (usize, Chains) {
        #[cfg(target_arch = "x86_64")]
        {
            use anomaly_device::CpuIsa;
            match CpuIsa::active() {
                // SAFETY: `active` is at most what the CPU has: AVX-512F here.
                CpuIsa::Avx512 => return (16, |n, m, c| unsafe { x86::avx512(n, m, c) }),
                // SAFETY: `active` is at most what the CPU has: AVX2 and FMA here.
                CpuIsa::Avx2 => return (8, |n, m, c| unsafe { x86::avx2(n, m, c) }),
                CpuIsa::Baseline => {}
            }
        }
        (8, portable)
    }

    /// Plain multiply-adds on arrays of 8, which the compiler vectorises for the baseline target.
    fn portable(iterations: usize, m: f32, c: f32) -> f32 {
        let mut acc = [[0f32; 8]; CHAINS];
        for (i, chain) in acc.iter_mut().enumerate() {
            chain.iter_mut().enumerate().for_each(|(j, x)| *x = (i * 8 + j) as f32 * 1e-3);
        }
        for _ in 0..iterations {
            for x in acc.iter_mut().flatten() {
                *x = *x * m + c;
            }
        }
        acc.iter().flatten().sum()
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        use super::CHAINS;

        #[target_feature(enable = "avx512f")]
        pub fn avx512(iterations: usize, m: f32, c: f32) -> f32 {
            let (m, c) = (_mm512_set1_ps(m), _mm512_set1_ps(c));
            // Distinct starts, so that no two chains are the same computation.
            let mut acc = [_mm512_setzero_ps(); CHAINS];
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm512_set1_ps(i as f32 * 1e-3);
            }
            for _ in 0..iterations {
                for a in &mut acc {
                    *a = _mm512_fmadd_ps(*a, m, c);
                }
            }
            let sum = acc.into_iter().fold(_mm512_setzero_ps(), |s, a| _mm512_add_ps(s, a));
            // SAFETY: a __m512 is 16 f32s.
            unsafe { std::mem::transmute::<__m512, [f32; 16]>(sum) }.iter().sum()
        }

        #[target_feature(enable = "avx2,fma")]
        pub fn avx2(iterations: usize, m: f32, c: f32) -> f32 {
            let (m, c) = (_mm256_set1_ps(m), _mm256_set1_ps(c));
            let mut acc = [_mm256_setzero_ps(); CHAINS];
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm256_set1_ps(i as f32 * 1e-3);
            }
            for _ in 0..iterations {
                for a in &mut acc {
                    *a = _mm256_fmadd_ps(*a, m, c);
                }
            }
            let sum = acc.into_iter().fold(_mm256_setzero_ps(), |s, a| _mm256_add_ps(s, a));
            // SAFETY: a __m256 is 8 f32s.
            unsafe { std::mem::transmute::<__m256, [f32; 8]>(sum) }.iter().sum()
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn probes_return_positive_finite_rates() {
            let gflops = super::fma_gflops();
            let gbs = super::read_gbs(16 << 20);
            assert!(gflops.is_finite() && gflops > 0.0, "{gflops} GFLOP/s");
            assert!(gbs.is_finite() && gbs > 0.0, "{gbs} GB/s");
        }
    }
}
