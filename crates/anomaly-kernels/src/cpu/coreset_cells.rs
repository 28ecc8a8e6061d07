//! The multithreaded coreset selection (`fast::select`), pruned by the triangle inequality.
//!
//! Done plainly, each greedy step of `coreset.rs` streams every point (84 MB at 164k × 128): memory
//! bound. But once a few picks are made, a new pick lowers only the minima of points near it. So every
//! point is kept in the **cell** of the pick it is nearest to (the one that set its running minimum: its
//! minimum is exactly that pick's f32 distance), and a step goes through the cells:
//! - the new pick's distance to every earlier pick (32 picks side by side) decides for each cell at
//!   once: a point `i` of cell `a` is at least `d(pick, a) − d(i, a)` from the pick, so where
//!   `d(pick, a) ≥ 2·√min_i` its minimum cannot change. A cell whose largest minimum passes is skipped
//!   whole; in the others only the blocks of 8 points holding a point that fails are measured (8 sums
//!   side by side, four blocks to a call);
//! - the points the pick brings nearer move to its new cell;
//! - each cell keeps its largest minimum with the lowest original index holding it, and the next pick is
//!   the larger of the cells' (value, then lower index): a total order, so it is `reference::greedy`'s
//!   arg-max exactly.
//!
//! The test must never skip a point whose f32 distance would lower its minimum. A sum of `dims` squares,
//! each exact, in f32 is within `γ = dims · 2⁻²⁴` (relative) of the exact value; the test is done in f64
//! with a margin of `s = dims · 2⁻²²` (> γ/(1 − γ)) on both distances: skip when
//! `D²(1 − s) ≥ 4·min·(1 + s)`, where `D²` is the f32 distance between the picks. The exact distance to
//! the pick is then at least `√(min·(1 + s))`, so its f32 sum is at least `min`. The measured distances
//! themselves are the bits of the reference's sums (over j = 0, 1, … in f32): summed the same way, or,
//! up to [`EXACT_DIMS`] dimensions on AVX2, in exact integers where the f32 sums are exact too; so the
//! minima are the same bits as on every other path.
//!
//! The cells hold the space's own i8 blocks, not a copy: the plain scan the selection starts as takes the
//! space over, and its points are sorted into the cells from its end a piece at a time, its room handed
//! back as it goes. Each step then moves the points a pick brings nearer to the end of their cell
//! (swapping them with points that stay), then copies them into the new pick's cell, a piece at a time,
//! truncating the old cell and handing back its room (in place: a shrinking `realloc`) as it goes. A
//! cell never grows after it is made, and gives its room back once a fifth of it is empty, so the
//! points' coordinates take at most 1.25 copies of the space (1.08–1.15 measured over 20,000 picks of
//! 1 M clustered points) whatever the order of the moves: this is what lets a PatchCore fit of millions
//! of patches stay within a small memory budget.
//!
//! What it saves depends on the points, and on the step. A pruned step costs two to three times a plain
//! scan's for each point it measures (the cells' blocks lie apart in memory, and the moves and the
//! bookkeeping add to the same sums), and over the first picks nearly every point must be measured. So
//! the selection starts as a plain scan ([`PlainScan`]: every point measured at every step, in one
//! pass that also finds the next pick), which keeps each point's owner, the pick that set its minimum,
//! and counts the points the cells' test would still measure; once that share, over a window of steps
//! and in whole blocks, is small, `fast::select_with_updates` sorts the points into cells
//! ([`PlainScan::into_cells`]). On clustered points, as patch features are, the minima soon shrink
//! below the clusters' spacing and a step measures a small share of the points (5% over the coreset of
//! 10% of 40k points, 1–2% of 164k: `bench coreset --data clusters`); on structureless noise in 128
//! dimensions the test skips nothing and the selection stays a plain scan. Where a pruned selection
//! measures most points again it gives up for good ([`CoresetCells::into_plain`]).

use rayon::prelude::*;

use crate::coreset::{CoresetSpace, SPACE_GROUP as GROUP, space_index};

/// Picks per block of the pick-to-pick distances: a block stores its picks' coordinates dimension by
/// dimension, so 32 distances are summed side by side, each in order.
const LANES: usize = 32;
/// Blocks of picks per task of the pick-to-pick distances.
const TASK_BLOCKS: usize = 16;
/// Blocks of a cell measured side by side.
const BATCH: usize = 4;
/// Blocks per task of the plain scan.
const SCAN_TASK_BLOCKS: usize = 512;
/// Points copied into a new cell before the cell they leave is truncated (and its room maybe given back).
const MOVE_PIECE: usize = 1 << 14;

/// The larger (running minimum, then lower original index): the order every path's arg-max follows.
fn higher(a: (f32, u32), b: (f32, u32)) -> (f32, u32) {
    if b.0 > a.0 || (b.0 == a.0 && b.1 < a.1) { b } else { a }
}

/// Points with their running minima and their coordinates: blocks of `GROUP` points, dimension by
/// dimension (the space's layout), so that a step reads a cell's points from one stretch of memory and
/// sums `GROUP` distances side by side (SIMD lanes), each in order.
struct Cell {
    points: Vec<u32>,
    mins: Vec<f32>,
    /// `⌈points / GROUP⌉ × dims × GROUP` grid integers; lanes past the last point hold stale values,
    /// never read back.
    rows: Vec<i8>,
}

impl Cell {
    /// An empty cell with room for exactly `points` points.
    fn with_capacity(points: usize, dims: usize) -> Self {
        Self {
            points: Vec::with_capacity(points),
            mins: Vec::with_capacity(points),
            rows: Vec::with_capacity(points.div_ceil(GROUP) * dims * GROUP),
        }
    }

    /// (largest minimum, lowest index holding it) of the first `len` points, and where that point is;
    /// ((−∞, `u32::MAX`), 0) when none.
    fn best_at(&self, len: usize) -> ((f32, u32), usize) {
        self.points[..len].iter().zip(&self.mins).enumerate().fold(((f32::NEG_INFINITY, u32::MAX), 0), |best, (at, (&i, &m))| {
            if higher(best.0, (m, i)) != best.0 { ((m, i), at) } else { best }
        })
    }

    /// (largest minimum, lowest index holding it) of the first `len` points; (−∞, `u32::MAX`) when none.
    fn best_of(&self, len: usize) -> (f32, u32) {
        self.best_at(len).0
    }

    /// (largest minimum, lowest index holding it) of every point.
    fn best(&self) -> (f32, u32) {
        self.best_of(self.points.len())
    }

    /// Point `k`'s coordinates.
    fn row(&self, k: usize, dims: usize) -> Vec<f32> {
        (0..dims).map(|j| self.rows[space_index(k, j, dims)] as f32).collect()
    }

    /// Adds point `k` of `other`, with its running minimum.
    fn push_from(&mut self, other: &Cell, k: usize, dims: usize) {
        let to = self.points.len();
        if to.is_multiple_of(GROUP) {
            self.rows.resize(self.rows.len() + dims * GROUP, 0);
        }
        for j in 0..dims {
            self.rows[space_index(to, j, dims)] = other.rows[space_index(k, j, dims)];
        }
        self.points.push(other.points[k]);
        self.mins.push(other.mins[k]);
    }

    /// Exchanges points `a` and `b`.
    fn swap(&mut self, a: usize, b: usize, dims: usize) {
        self.points.swap(a, b);
        self.mins.swap(a, b);
        for j in 0..dims {
            self.rows.swap(space_index(a, j, dims), space_index(b, j, dims));
        }
    }

    /// Keeps the first `len` points.
    fn truncate(&mut self, len: usize, dims: usize) {
        self.points.truncate(len);
        self.mins.truncate(len);
        self.rows.truncate(len.div_ceil(GROUP) * dims * GROUP);
    }

    /// Takes out point `k` (the last one takes its place).
    fn swap_remove(&mut self, k: usize, dims: usize) {
        let last = self.points.len() - 1;
        self.swap(k, last, dims);
        self.truncate(last, dims);
    }

    /// Gives back the room of a cell once a fifth of it is empty. Cells only lose points after they are
    /// made, and the first ones start with nearly every point, so without this their room would stay at
    /// its peak (ten times the points on bottle's 164k patches). Shrinking reallocates in place.
    fn shrink_if_sparse(&mut self) {
        if is_sparse(&self.points) {
            self.points.shrink_to_fit();
            self.mins.shrink_to_fit();
            self.rows.shrink_to_fit();
        }
    }

    /// Copies the points from `from` on into `into`, the last first, truncating this cell (and giving
    /// back its room) a piece at a time, so that the moved points are never held twice for long.
    fn move_tail_into(&mut self, from: usize, into: &mut Cell, dims: usize) {
        while self.points.len() > from {
            let end = self.points.len();
            let piece = from.max(end.saturating_sub(MOVE_PIECE));
            for k in piece..end {
                into.push_from(self, k, dims);
            }
            self.truncate(piece, dims);
            self.shrink_if_sparse();
        }
    }
}

/// The picks' coordinates, `LANES` picks per block, dimension by dimension, for their distances to a
/// new pick (the skip test's `D²`).
struct Picks {
    dims: usize,
    len: usize,
    coords: Vec<f32>,
}

impl Picks {
    /// Room for every pick at once: grown by doubling, the coordinates would hold up to twice what they need.
    fn with_capacity(picks: usize, dims: usize) -> Self {
        Self { dims, len: 0, coords: Vec::with_capacity(picks.div_ceil(LANES) * LANES * dims) }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, center: &[f32]) {
        let (dims, lane) = (self.dims, self.len % LANES);
        if lane == 0 {
            self.coords.resize(self.coords.len() + LANES * dims, 0.0);
        }
        let block = self.coords.len() - LANES * dims;
        for (j, &x) in center.iter().enumerate() {
            self.coords[block + j * LANES + lane] = x;
        }
        self.len += 1;
    }

    /// The f32 squared distance of every pick to `center`, in pick order (then unused lanes).
    fn distances_to(&self, center: &[f32]) -> Vec<f32> {
        let dims = self.dims;
        let mut between = vec![0f32; self.coords.len() / dims];
        between.par_chunks_mut(TASK_BLOCKS * LANES).zip(self.coords.par_chunks(TASK_BLOCKS * LANES * dims)).for_each(|(out, blocks)| {
            for (out, block) in out.chunks_exact_mut(LANES).zip(blocks.chunks_exact(LANES * dims)) {
                out.copy_from_slice(&lane_distances::<LANES>(block, center));
            }
        });
        between
    }
}

/// Within this of a cell's pick (`between`: the f32 squared distance from that pick to the new one), no
/// point's minimum can be lowered by the new pick: the skip test `D²(1 − s) ≥ 4·min·(1 + s)`.
fn reach(between: f32, margin: f64) -> f64 {
    between as f64 * (1.0 - margin) / (4.0 * (1.0 + margin))
}

/// Whether a fifth of a vector's room is empty (past a block's slack): when a cell, or the plain scan's
/// owners as its points are sorted into cells, gives its room back.
fn is_sparse<T>(values: &Vec<T>) -> bool {
    values.capacity() > values.len() + values.len() / 4 + GROUP
}

/// The selection as a plain scan: every point in one cell, each step measuring every point, on all cores,
/// and finding the next pick in the same pass (parallel chunks merged by larger minimum, then lower
/// index: a total order, so the picks are the same whatever the split). Each point's owner, the pick
/// that set its minimum, is kept, so that each step can count the points the cells' skip test would
/// still measure ([`PlainScan::step`]), and the points can be sorted into cells when that pays
/// ([`PlainScan::into_cells`]).
pub(super) struct PlainScan {
    dims: usize,
    all: Cell,
    /// Each point's owner, by its place in pick order.
    owners: Vec<u32>,
    picks: Picks,
    margin: f64,
    /// The next pick: its index, and where it is in `all`.
    next: (u32, usize),
}

impl PlainScan {
    /// The state after the first pick, `space.start()`: every other point measured from it, in a cell
    /// that takes the space's blocks over.
    pub fn new(space: CoresetSpace) -> Self {
        let (rows, start, dims, space_picks) = (space.rows(), space.start(), space.dims(), space.picks());
        let center = Center::new(space.row(start));
        let blocks = space.into_blocks();
        let mut mins = vec![0f32; rows.div_ceil(GROUP) * GROUP];
        mins.par_chunks_mut(GROUP * BATCH).zip(blocks.par_chunks(GROUP * BATCH * dims)).for_each(|(mins, blocks)| {
            let batch = consecutive_distances(blocks, &center);
            mins.iter_mut().zip(batch.as_flattened()).for_each(|(min, &d)| *min = d);
        });
        mins.truncate(rows);
        let mut all = Cell { points: (0..rows as u32).collect(), mins, rows: blocks };
        all.swap_remove(start, dims);
        let mut picks = Picks::with_capacity(space_picks, dims);
        picks.push(center.coords());
        let owners = vec![0; all.points.len()];
        Self::with_next(dims, all, owners, picks)
    }

    fn with_next(dims: usize, all: Cell, owners: Vec<u32>, picks: Picks) -> Self {
        let ((_, pick), at) = all.best_at(all.points.len());
        Self { dims, all, owners, picks, margin: dims as f64 / (1u64 << 22) as f64, next: (pick, at) }
    }

    /// The next pick.
    pub fn next(&self) -> u32 {
        self.next.0
    }

    /// Points not picked yet.
    pub fn len(&self) -> usize {
        self.all.points.len()
    }

    /// Picks the next pick: takes it out, measures every point from it, lowering the minima it lowers,
    /// and finds the pick after it. Returns how many of the points the cells' skip test would have
    /// measured (each against its owner's reach; the cells measure whole blocks, so somewhat more).
    pub fn step(&mut self) -> usize {
        let dims = self.dims;
        let at = self.next.1;
        let center = Center::new(self.all.row(at, dims));
        self.all.swap_remove(at, dims);
        self.owners.swap_remove(at);
        let margin = self.margin;
        // In f32: only an estimate is made from them.
        let reaches: Vec<f32> = self.picks.distances_to(center.coords()).into_iter().map(|between| reach(between, margin) as f32).collect();
        let owner = self.picks.len() as u32;
        self.picks.push(center.coords());
        let task = SCAN_TASK_BLOCKS * GROUP;
        let Cell { points, mins, rows } = &mut self.all;
        let (best, tested) = mins
            .par_chunks_mut(task)
            .zip(rows.par_chunks(task * dims))
            .zip(points.par_chunks(task))
            .zip(self.owners.par_chunks_mut(task))
            .enumerate()
            .map(|(t, (((mins, rows), points), owners))| {
                let mut tested = 0;
                for ((mins, rows), owners) in
                    mins.chunks_mut(GROUP * BATCH).zip(rows.chunks(GROUP * BATCH * dims)).zip(owners.chunks_mut(GROUP * BATCH))
                {
                    let sums = consecutive_distances(rows, &center);
                    for ((min, &d), owned) in mins.iter_mut().zip(sums.as_flattened()).zip(owners) {
                        tested += (*min > reaches[*owned as usize]) as usize;
                        if d < *min {
                            *min = d;
                            *owned = owner;
                        }
                    }
                }
                // The task's largest minimum (never NaN: sums of squared integers), then the lowest index
                // holding it: a second pass over what is still in cache.
                let top = mins.iter().fold(f32::NEG_INFINITY, |top, &min| top.max(min));
                let (point, at) = points
                    .iter()
                    .zip(mins.iter())
                    .enumerate()
                    .filter(|&(_, (_, &min))| min == top)
                    .map(|(at, (&i, _))| (i, at))
                    .min()
                    .expect("a task has points");
                (((top, point), (point, t * task + at)), tested)
            })
            .reduce(
                || (((f32::NEG_INFINITY, u32::MAX), (u32::MAX, 0)), 0),
                |(a, tested_a), (b, tested_b)| (if higher(a.0, b.0) == a.0 { a } else { b }, tested_a + tested_b),
            );
        self.next = best.1;
        tested
    }

    /// The points sorted into one cell per pick, by owner: copied from the end a piece at a time, each
    /// piece's room given back, so that they are never held twice for long.
    pub fn into_cells(self) -> CoresetCells {
        let Self { dims, mut all, mut owners, picks, margin, .. } = self;
        let mut counts = vec![0; picks.len()];
        for &owner in &owners {
            counts[owner as usize] += 1;
        }
        let mut cells: Vec<Cell> = counts.iter().map(|&count| Cell::with_capacity(count, dims)).collect();
        while !all.points.is_empty() {
            let end = all.points.len();
            let piece = end.saturating_sub(MOVE_PIECE);
            for k in piece..end {
                cells[owners[k] as usize].push_from(&all, k, dims);
            }
            all.truncate(piece, dims);
            all.shrink_if_sparse();
            owners.truncate(piece);
            if is_sparse(&owners) {
                owners.shrink_to_fit();
            }
        }
        let bests = cells.iter().map(Cell::best).collect();
        CoresetCells { dims, cells, bests, picks, margin }
    }
}

/// The greedy selection's state between steps when it is pruned.
pub(super) struct CoresetCells {
    dims: usize,
    /// One cell per pick, in pick order (picked points belong to none).
    cells: Vec<Cell>,
    /// Each cell's (largest minimum, lowest index holding it), apart so that finding the next pick reads
    /// little memory.
    bests: Vec<(f32, u32)>,
    picks: Picks,
    /// The margin `s` of the skip test.
    margin: f64,
}

impl CoresetCells {
    /// The next pick, the largest minimum over the cells (ties to the lower index), and its cell.
    pub fn next(&self) -> (u32, usize) {
        let (mut best, mut home) = ((f32::NEG_INFINITY, u32::MAX), 0);
        for (a, &cell) in self.bests.iter().enumerate() {
            if higher(best, cell) != best {
                (best, home) = (cell, a);
            }
        }
        (best.1, home)
    }

    /// Picks `pick`, of cell `home` (what `next` returned): takes it out of its cell, lowers the minima
    /// it lowers (moving those points into its new cell), and returns how many distances to points it
    /// summed.
    pub fn step(&mut self, pick: u32, home: usize) -> usize {
        let dims = self.dims;
        let center = Center::new(self.take(pick, home));
        let between = self.picks.distances_to(center.coords());
        let margin = self.margin;
        let tested: Vec<(usize, &mut Cell, &mut (f32, u32), f64)> = self
            .cells
            .iter_mut()
            .zip(&mut self.bests)
            .zip(&between)
            .enumerate()
            .map(|(a, ((cell, best), &between))| (a, cell, best, reach(between, margin)))
            .filter(|(_, _, best, reach)| best.0 as f64 > *reach)
            .collect();
        // Each tested cell, on its own core, moves the points the pick brings nearer to its end.
        let lowered: Vec<(usize, usize, usize)> = tested
            .into_par_iter()
            .map(|(a, cell, best, reach)| {
                let (moved, measured) = lower(cell, &center, reach, dims);
                let keep = cell.points.len() - moved;
                *best = cell.best_of(keep);
                (a, keep, measured)
            })
            .collect();
        let moved = lowered.iter().map(|&(a, keep, _)| self.cells[a].points.len() - keep).sum();
        let mut cell = Cell::with_capacity(moved, dims);
        for &(a, keep, _) in &lowered {
            self.cells[a].move_tail_into(keep, &mut cell, dims);
        }
        self.picks.push(center.coords());
        self.bests.push(cell.best());
        self.cells.push(cell);
        lowered.iter().map(|&(_, _, measured)| measured).sum()
    }

    /// Takes `pick` out of cell `home` and returns its coordinates.
    fn take(&mut self, pick: u32, home: usize) -> Vec<f32> {
        let dims = self.dims;
        let cell = &mut self.cells[home];
        let at = cell.points.iter().position(|&i| i == pick).expect("a cell holds its best");
        let center = cell.row(at, dims);
        cell.swap_remove(at, dims);
        self.bests[home] = cell.best();
        center
    }

    /// The cells merged into one (each given back once copied), as a plain scan: where the pruning no
    /// longer pays.
    pub fn into_plain(self) -> PlainScan {
        let Self { dims, cells, picks, .. } = self;
        let total = cells.iter().map(|cell| cell.points.len()).sum();
        let mut all = Cell::with_capacity(total, dims);
        let mut owners = Vec::with_capacity(total);
        for (a, mut cell) in cells.into_iter().enumerate() {
            owners.resize(owners.len() + cell.points.len(), a as u32);
            cell.move_tail_into(0, &mut all, dims);
        }
        PlainScan::with_next(dims, all, owners, picks)
    }
}

/// Measures the points of `cell` in the blocks holding a minimum above `reach`, lowers the minima the
/// pick at `center` lowers, and moves those points to the end of the cell: returns how many moved and
/// how many were measured.
fn lower(cell: &mut Cell, center: &Center, reach: f64, dims: usize) -> (usize, usize) {
    let len = cell.points.len();
    let blocks: Vec<usize> =
        (0..len.div_ceil(GROUP)).filter(|&b| cell.mins[b * GROUP..len.min((b + 1) * GROUP)].iter().any(|&m| m as f64 > reach)).collect();
    let mut moved = Vec::new();
    let mut measured = 0;
    for batch in blocks.chunks(BATCH) {
        let sums = distances(std::array::from_fn(|q| &cell.rows[batch[q.min(batch.len() - 1)] * dims * GROUP..][..dims * GROUP]), center);
        for (&b, sums) in batch.iter().zip(&sums) {
            let lanes = b * GROUP..len.min((b + 1) * GROUP);
            measured += lanes.len();
            for k in lanes {
                let d = sums[k % GROUP];
                if d < cell.mins[k] {
                    cell.mins[k] = d;
                    moved.push(k);
                }
            }
        }
    }
    // The moved points (ascending) in front of the tail swap places with the points that stay in it.
    let keep = len - moved.len();
    let split = moved.partition_point(|&k| k < keep);
    let mut moved_in_tail = moved[split..].iter().peekable();
    let staying_in_tail = (keep..len).filter(|&k| moved_in_tail.next_if_eq(&&k).is_none());
    for (&a, b) in moved[..split].iter().zip(staying_in_tail) {
        cell.swap(a, b, dims);
    }
    (moved.len(), measured)
}

/// [`distances`] of up to `BATCH` consecutive blocks (`rows`, whole blocks); past the last block, its
/// sums are repeated (lanes the caller does not read).
fn consecutive_distances(rows: &[i8], center: &Center) -> [[f32; GROUP]; BATCH] {
    let block = GROUP * center.coords.len();
    let last = rows.len() / block - 1;
    distances(std::array::from_fn(|q| &rows[q.min(last) * block..][..block]), center)
}

/// A pick's coordinates as [`distances`] reads them: f32 and, where the processor has AVX2 and the sums
/// are exact integers, also as i16 pairs.
struct Center {
    coords: Vec<f32>,
    /// Coordinates `2p` and `2p + 1` as two i16 in word `p` (the last one's high half 0 for odd dims);
    /// `Some` only where AVX2 was detected and there are at most [`EXACT_DIMS`] dimensions.
    pairs: Option<Vec<i32>>,
}

/// Dimensions up to which a squared distance between two points of the grid is an exact integer below
/// 2²⁴: each term is at most 255², and 258 · 255² < 2²⁴. Every partial sum of the f32 path is then exact
/// too, so summing in i32 and converting once gives the same bits.
const EXACT_DIMS: usize = 258;

impl Center {
    fn new(coords: Vec<f32>) -> Self {
        #[cfg(target_arch = "x86_64")]
        let pairs = (coords.len() <= EXACT_DIMS && has_avx2()).then(|| {
            let half = |x: f32| x as i16 as u16 as u32;
            coords.chunks(2).map(|pair| (half(pair[0]) | half(pair.get(1).copied().unwrap_or(0.0)) << 16) as i32).collect()
        });
        #[cfg(not(target_arch = "x86_64"))]
        let pairs = None;
        Self { coords, pairs }
    }

    fn coords(&self) -> &[f32] {
        &self.coords
    }
}

/// Whether the AVX2 paths may run: [`anomaly_device::CpuIsa::active`] is at least AVX2 (which implies
/// the processor has it).
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    anomaly_device::CpuIsa::active() >= anomaly_device::CpuIsa::Avx2
}

/// The f32 squared distances of `BATCH` blocks of `GROUP` points (each dimension by dimension) to
/// `center`, the same bits as the reference's sums over j = 0, 1, … in f32.
/// - Where `center` has its pairs (AVX2, at most [`EXACT_DIMS`] dimensions), in integers: two
///   dimensions of 8 points are one 16-byte load, interleaved, widened to i16, and squared and summed
///   pairwise into i32 by `vpmaddwd`, half the instructions of the f32 path for 16 terms; the sums are
///   exact, and so are the f32 path's. Block after block, each read through in one stream.
/// - Elsewhere in f32, compiled for AVX2 where the processor has it (which sign-extends the i8
///   coordinates eight at a time, the baseline build four at a time in SSE2 shuffles); the same
///   multiplications and additions in the same order (Rust never fuses them), so the same bits. The
///   blocks side by side, so that enough independent sums are in flight to hide the additions' latency.
fn distances(blocks: [&[i8]; BATCH], center: &Center) -> [[f32; GROUP]; BATCH] {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(pairs) = &center.pairs {
            // SAFETY: `pairs` exist only where AVX2 was detected.
            return unsafe { x86::distances_in_pairs(blocks, pairs) };
        }
        if has_avx2() {
            // SAFETY: AVX2 was detected.
            return unsafe { x86::distances_avx2(blocks, &center.coords) };
        }
    }
    distances_portable(blocks, &center.coords)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BATCH, GROUP, distances_portable};

    #[target_feature(enable = "avx2")]
    pub(super) fn distances_avx2(blocks: [&[i8]; BATCH], center: &[f32]) -> [[f32; GROUP]; BATCH] {
        distances_portable(blocks, center)
    }

    /// [`super::distances`] in i16 pairs: `pairs` as [`super::Center`] packs them.
    ///
    /// Each block is read from its start to its end before the next: consecutive blocks (the plain scan,
    /// a cell measured whole) are then one stream, which the processor's own prefetcher follows. Read
    /// side by side, 16 bytes of each block in turn, the blocks were four short streams (1 KiB each at
    /// 128 dimensions) that it never caught up with: on a Zen 4 EPYC, two threads over 1M × 128 points
    /// read 12.5–14.9 GB/s that way, even with the next batches prefetched in software, and 25.8–28.8
    /// GB/s this way with no software prefetch (which made it slower: 17.6 GB/s 8 KiB ahead), against
    /// 29.3–29.5 GB/s for the read probe. The sums are integers, so two running sums a block, added at
    /// the end, are the same sums.
    #[target_feature(enable = "avx2")]
    pub(super) fn distances_in_pairs(blocks: [&[i8]; BATCH], pairs: &[i32]) -> [[f32; GROUP]; BATCH] {
        let dims = blocks[0].len() / GROUP;
        assert!(pairs.len() == dims.div_ceil(2) && blocks.iter().all(|block| block.len() == dims * GROUP));
        // Bytes [x₀ of points 0‥7, x₁ of points 0‥7] to [x₀, x₁ of point 0, x₀, x₁ of point 1, …].
        let interleave = _mm_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
        let mut out = [[0f32; GROUP]; BATCH];
        for (out, block) in out.iter_mut().zip(blocks) {
            // Two running sums, so that each addition waits on the one two pairs back (named, not an
            // array indexed by the pair's parity, which would keep them in memory).
            let (mut even, mut odd) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            let whole = dims / 2;
            // SAFETY (all calls): AVX2 is enabled here, and the assert above sizes the block `dims · GROUP`.
            for p in (0..whole - whole % 2).step_by(2) {
                unsafe {
                    add_pair(&mut even, block, p, pairs[p], interleave, true);
                    add_pair(&mut odd, block, p + 1, pairs[p + 1], interleave, true);
                }
            }
            if whole % 2 == 1 {
                unsafe { add_pair(&mut even, block, whole - 1, pairs[whole - 1], interleave, true) };
            }
            if dims % 2 == 1 {
                unsafe { add_pair(&mut odd, block, whole, pairs[whole], interleave, false) };
            }
            // SAFETY: `out` holds 8 f32.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_cvtepi32_ps(_mm256_add_epi32(even, odd))) };
        }
        out
    }

    /// Adds the squares of dimensions `2p` and `2p + 1` (`center`: their pair word) of `block`'s 8 points
    /// to `sum`; `whole`: both dimensions are there, else only the last (its 8 bytes, the missing ones 0,
    /// as is the pair's high half). Inlined into the AVX2 caller.
    ///
    /// # Safety
    /// The processor has AVX2, and `block` holds at least `(2p + 2) · GROUP` bytes (`(2p + 1) · GROUP`
    /// when not `whole`).
    #[inline(always)]
    unsafe fn add_pair(sum: &mut __m256i, block: &[i8], p: usize, center: i32, interleave: __m128i, whole: bool) {
        // SAFETY: see the function's contract: the read is 16 bytes from `2p · GROUP` (8 when not whole).
        unsafe {
            let at = block.as_ptr().add(2 * p * GROUP);
            let bytes = if whole { _mm_loadu_si128(at.cast()) } else { _mm_loadl_epi64(at.cast()) };
            let t = _mm256_sub_epi16(_mm256_cvtepi8_epi16(_mm_shuffle_epi8(bytes, interleave)), _mm256_set1_epi32(center));
            *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(t, t));
        }
    }
}

/// [`distances`] in plain Rust, inlined into its callers so that each compiles it for its vector width.
#[inline(always)]
fn distances_portable(blocks: [&[i8]; BATCH], center: &[f32]) -> [[f32; GROUP]; BATCH] {
    let mut sums = [[0f32; GROUP]; BATCH];
    let [a, b, c, d] = blocks.map(|block| block.as_chunks::<GROUP>().0);
    for ((((&x, a), b), c), d) in center.iter().zip(a).zip(b).zip(c).zip(d) {
        for (sums, row) in sums.iter_mut().zip([a, b, c, d]) {
            for l in 0..GROUP {
                let t = row[l] as f32 - x;
                sums[l] += t * t;
            }
        }
    }
    sums
}

/// The f32 squared distances to `center` of `L` points stored dimension by dimension (`block[j·L + l]`),
/// side by side (SIMD lanes), each summed over j = 0, 1, … in order as the coreset's definition sums them.
fn lane_distances<const L: usize>(block: &[f32], center: &[f32]) -> [f32; L] {
    let mut sums = [0f32; L];
    let (rows, _) = block.as_chunks::<L>();
    for (row, &c) in rows.iter().zip(center) {
        for l in 0..L {
            let t = row[l] - c;
            sums[l] += t * t;
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::coreset::CoresetSettings;

    /// A seeded generator of integers.
    fn integers(seed: u64) -> impl FnMut() -> u64 {
        let mut state = seed;
        move || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            state >> 33
        }
    }

    /// The greedy selection of `picks` points, handed from the plain scan to the cells and back each time
    /// the picks made reach a number in `switches` (the first at the start, with 1); and the most points
    /// a pruned step moved into its new cell.
    fn select_switching(space: CoresetSpace, picks: usize, switches: &[usize]) -> (Vec<u32>, usize) {
        let mut picked = vec![space.start() as u32];
        let (mut plain, mut cells): (_, Option<CoresetCells>) = (Some(PlainScan::new(space)), None);
        let mut most_moved = 0;
        while picked.len() < picks {
            if switches.contains(&picked.len()) {
                (plain, cells) = match (plain, cells) {
                    (Some(scan), None) => (None, Some(scan.into_cells())),
                    (None, Some(state)) => (Some(state.into_plain()), None),
                    _ => unreachable!("one state at a time"),
                };
            }
            if let Some(scan) = &mut plain {
                picked.push(scan.next());
                if picked.len() < picks {
                    scan.step();
                }
            } else if let Some(state) = &mut cells {
                let (pick, home) = state.next();
                picked.push(pick);
                if picked.len() < picks {
                    state.step(pick, home);
                    most_moved = most_moved.max(state.cells.last().expect("a step adds a cell").points.len());
                }
            }
        }
        (picked, most_moved)
    }

    /// The plain scan and the cells handing the selection to each other at arbitrary steps, both ways,
    /// pick the reference's points, ties included (clustered points in pairs of equal copies).
    #[test]
    fn switching_between_the_plain_scan_and_the_cells_keeps_the_picks() {
        let (n, d, clusters) = (3000, 16, 12);
        let mut next = integers(7);
        let centres: Vec<f32> = (0..clusters * d).map(|_| (next() % 400) as f32).collect();
        let mut features = vec![0f32; n * d];
        for row in features.chunks_exact_mut(d) {
            let cluster = next() as usize % clusters;
            for (x, &c) in row.iter_mut().zip(&centres[cluster * d..]) {
                *x = c + (next() % 5) as f32;
            }
        }
        for row in (1..n).step_by(2) {
            features.copy_within((row - 1) * d..row * d, row * d);
        }
        let space = CoresetSpace::new(&features, n, d, &CoresetSettings { ratio: 0.1, projection: 0, seed: 3 }).unwrap();
        let expected = crate::cpu::reference::greedy(&space);
        let (picked, _) = select_switching(space, expected.len(), &[2, 30, 31, 60, 200]);
        assert_eq!(picked, expected);
    }

    /// Two large clusters, pruned from the first pick: the second pick moves tens of thousands of points
    /// at once, more than one piece of a move (a cell hands its room back as its points leave), and the
    /// picks stay the reference's.
    #[test]
    fn a_pick_moving_most_points_keeps_the_picks() {
        let (n, d) = (50_000, 8);
        let mut next = integers(47);
        let centres: Vec<f32> = (0..2 * d).map(|_| (next() % 200) as f32).collect();
        let features: Vec<f32> = (0..n * d).map(|i| centres[(i / d) % 2 * d + i % d] + (next() % 7) as f32).collect();
        let space = CoresetSpace::new(&features, n, d, &CoresetSettings { ratio: 0.002, projection: 0, seed: 11 }).unwrap();
        let expected = crate::cpu::reference::greedy(&space);
        let (picked, most_moved) = select_switching(space, expected.len(), &[1]);
        assert!(most_moved > MOVE_PIECE, "{most_moved} points moved at most");
        assert_eq!(picked, expected);
    }

    /// Every kernel `distances` may take gives the plain f32 sums' bits, at widths odd and even, at the
    /// widest the integers are exact and past it, with coordinates over the whole grid; and with the
    /// centre at a corner, whose sums pass 2²⁴ by 1000 dimensions, where f32 rounds them and only the
    /// f32 path gives its bits.
    #[test]
    fn distances_equal_the_f32_sums_bit_for_bit() {
        let mut next = integers(0x9e37_79b9_7f4a_7c15);
        let mut grid = || ((next() % 255) as i16 - 127) as i8;
        for (dims, corner) in [(1, false), (2, false), (7, false), (128, false), (257, false), (258, true), (259, false), (1000, true)] {
            let blocks: Vec<Vec<i8>> = (0..BATCH).map(|_| (0..dims * GROUP).map(|_| grid()).collect()).collect();
            let center: Vec<f32> = (0..dims).map(|_| if corner { -127.0 } else { grid() as f32 }).collect();
            let blocks: [&[i8]; BATCH] = std::array::from_fn(|q| blocks[q].as_slice());
            let expected = distances_portable(blocks, &center);
            let got = distances(blocks, &Center::new(center));
            assert_eq!(got.map(|sums| sums.map(f32::to_bits)), expected.map(|sums| sums.map(f32::to_bits)), "{dims} dims");
        }
    }
}
