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
//!   side by side, four blocks at a time);
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
//! themselves are summed as the reference sums them (over j = 0, 1, … in f32), so the minima are the
//! same bits as on every other path.
//!
//! A cell keeps its points' coordinates as i16: the grid's values are integers of at most 2047 in
//! magnitude, so they are exact, and the cells (which hold every point once more beside the projection)
//! take half the memory of f32, and half the memory traffic per step (on 1 M clustered 128-d points: 1.64
//! GB peak against 2.21, and 590 picks/s against 555).
//!
//! What it saves depends on the points. On clustered points, as patch features are, the minima soon
//! shrink below the clusters' spacing and a step measures a small share of the points (5% over the
//! coreset of 10% of 40k points, 1–2% of 164k: `bench coreset --data clusters`). On structureless noise
//! in 128 dimensions nothing is skipped, and a step costs two to three times a plain scan's (the cells'
//! blocks lie apart in memory, and the moves and the bookkeeping add to the same sums): there
//! `fast::select_with_updates` gives up after a few hundred picks and finishes as a plain scan from the
//! cells' minima (`into_mins`).

use rayon::prelude::*;

use crate::coreset::CoresetSpace;

/// Picks per block of the pick-to-pick distances: a block stores its picks' coordinates dimension by
/// dimension, so 32 distances are summed side by side, each in order.
const LANES: usize = 32;
/// Blocks of picks per task of the pick-to-pick distances.
const TASK_BLOCKS: usize = 16;
/// Points per block of a cell (`Cell::rows`).
const GROUP: usize = 8;
/// Blocks of a cell measured side by side.
const BATCH: usize = 4;

/// The larger (running minimum, then lower original index): the order every path's arg-max follows.
fn higher(a: (f32, u32), b: (f32, u32)) -> (f32, u32) {
    if b.0 > a.0 || (b.0 == a.0 && b.1 < a.1) { b } else { a }
}

/// The points nearest to one pick, with their running minima (their f32 distances to it) and their
/// coordinates: blocks of `GROUP` points, dimension by dimension, so that a step reads a cell's points
/// from one stretch of memory and sums `GROUP` distances side by side (SIMD lanes), each in order.
#[derive(Default)]
struct Cell {
    points: Vec<u32>,
    mins: Vec<f32>,
    /// `⌈points / GROUP⌉ × dims × GROUP`; lanes past the last point hold stale values, never read back.
    /// The grid's integers (|x| ≤ 2047) as i16: exact, and half the memory of f32.
    rows: Vec<i16>,
}

impl Cell {
    /// (largest minimum, lowest index holding it); (−∞, `u32::MAX`) when empty.
    fn best(&self) -> (f32, u32) {
        self.points.iter().zip(&self.mins).fold((f32::NEG_INFINITY, u32::MAX), |best, (&i, &m)| higher(best, (m, i)))
    }

    /// Coordinate `j` of point `k`'s row.
    fn at(k: usize, j: usize, dims: usize) -> usize {
        (k / GROUP * dims + j) * GROUP + k % GROUP
    }

    /// Adds point `point` (running minimum `min`) whose coordinate `j` is `row(j)`.
    fn push(&mut self, point: u32, min: f32, dims: usize, row: impl Fn(usize) -> f32) {
        let k = self.points.len();
        if k.is_multiple_of(GROUP) {
            self.rows.resize(self.rows.len() + dims * GROUP, 0);
        }
        for j in 0..dims {
            let x = row(j);
            debug_assert!(x.fract() == 0.0 && x.abs() <= crate::GRID_MAX, "{x} is not on the grid");
            self.rows[Self::at(k, j, dims)] = x as i16;
        }
        self.points.push(point);
        self.mins.push(min);
    }

    /// Adds the points of `other`.
    fn append(&mut self, other: &Cell, dims: usize) {
        for (k, (&point, &min)) in other.points.iter().zip(&other.mins).enumerate() {
            self.push(point, min, dims, |j| other.rows[Self::at(k, j, dims)] as f32);
        }
    }

    /// Takes out point `k` (the last one takes its place).
    fn swap_remove(&mut self, k: usize, dims: usize) {
        let last = self.points.len() - 1;
        self.points.swap_remove(k);
        self.mins.swap_remove(k);
        for j in 0..dims {
            self.rows[Self::at(k, j, dims)] = self.rows[Self::at(last, j, dims)];
        }
        self.rows.truncate(last.div_ceil(GROUP) * dims * GROUP);
    }

    /// Gives back the room of a cell that has lost most of its points: the first cells start with nearly
    /// every point and soon hold few, and kept at their peak the cells' room grew to ten times the points'
    /// (a 1 GB fit of bottle's 164k patches).
    fn shrink_if_sparse(&mut self) {
        if self.points.capacity() > 4 * self.points.len().max(GROUP) {
            self.points.shrink_to_fit();
            self.mins.shrink_to_fit();
            self.rows.shrink_to_fit();
        }
    }
}

/// The greedy selection's state between steps.
pub(super) struct CoresetCells {
    dims: usize,
    /// One cell per pick, in pick order (picked points belong to none).
    cells: Vec<Cell>,
    /// Each cell's (largest minimum, lowest index holding it), apart so that finding the next pick reads
    /// little memory.
    bests: Vec<(f32, u32)>,
    /// The picks' coordinates, `LANES` picks per block, dimension by dimension.
    picks: Vec<f32>,
    /// The margin `s` of the skip test.
    margin: f64,
}

impl CoresetCells {
    /// The state after the first pick, `space.start()`: every other point in its cell.
    pub fn new(space: &CoresetSpace) -> Self {
        let (start, dims) = (space.start(), space.dims());
        let mut cell = Cell::default();
        for i in (0..space.rows()).filter(|&i| i != start) {
            let row = space.row(i);
            cell.push(i as u32, f32::MAX, dims, |j| row[j]);
        }
        let center = space.row(start);
        let mut sums = vec![0f32; cell.rows.len() / dims];
        sums.par_chunks_mut(GROUP * BATCH).zip(cell.rows.par_chunks(GROUP * BATCH * dims)).for_each(|(sums, blocks)| {
            let blocks: Vec<&[i16]> = blocks.chunks_exact(GROUP * dims).collect();
            let batch = distances(std::array::from_fn(|q| blocks[q.min(blocks.len() - 1)]), center);
            sums.iter_mut().zip(batch.as_flattened()).for_each(|(sum, &d)| *sum = d);
        });
        sums.truncate(cell.mins.len());
        cell.mins = sums;
        let mut state = Self { dims, cells: Vec::new(), bests: Vec::new(), picks: Vec::new(), margin: dims as f64 / (1u64 << 22) as f64 };
        state.push(center, cell);
        state
    }

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
        let cell = &mut self.cells[home];
        let at = cell.points.iter().position(|&i| i == pick).expect("a cell holds its best");
        let center: Vec<f32> = (0..dims).map(|j| cell.rows[Cell::at(at, j, dims)] as f32).collect();
        cell.swap_remove(at, dims);
        self.bests[home] = cell.best();

        let mut between = vec![0f32; self.picks.len() / dims];
        between.par_chunks_mut(TASK_BLOCKS * LANES).zip(self.picks.par_chunks(TASK_BLOCKS * LANES * dims)).for_each(|(out, blocks)| {
            for (out, block) in out.chunks_exact_mut(LANES).zip(blocks.chunks_exact(LANES * dims)) {
                pick_distances(block, &center, out);
            }
        });
        let margin = self.margin;
        // A point passes when its minimum is at most `reach` of its cell.
        let reach = |between: f32| between as f64 * (1.0 - margin) / (4.0 * (1.0 + margin));
        let tested: Vec<(&mut Cell, &mut (f32, u32), f64)> = self
            .cells
            .iter_mut()
            .zip(&mut self.bests)
            .zip(&between)
            .filter(|((_, best), between)| best.0 as f64 > reach(**between))
            .map(|((cell, best), &between)| (cell, best, reach(between)))
            .collect();
        let (cell, measured) = tested
            .into_par_iter()
            .map(|(cell, best, reach)| {
                let moved = lower(cell, &center, reach, dims);
                *best = cell.best();
                moved
            })
            .collect::<Vec<_>>()
            .into_iter()
            .fold((Cell::default(), 0), |(mut cell, measured), (moved, more)| {
                cell.append(&moved, dims);
                (cell, measured + more)
            });
        self.push(&center, cell);
        measured
    }

    /// Every point's running minimum, by original index (picked points: −1, as the plain scan marks them).
    pub fn into_mins(self, rows: usize) -> Vec<f32> {
        let mut mins = vec![-1f32; rows];
        for cell in &self.cells {
            for (&i, &m) in cell.points.iter().zip(&cell.mins) {
                mins[i as usize] = m;
            }
        }
        mins
    }

    /// Adds the pick at `center` with its cell.
    fn push(&mut self, center: &[f32], cell: Cell) {
        let dims = self.dims;
        let lane = self.cells.len() % LANES;
        if lane == 0 {
            self.picks.resize(self.picks.len() + LANES * dims, 0.0);
        }
        let block = self.picks.len() - LANES * dims;
        for (j, &x) in center.iter().enumerate() {
            self.picks[block + j * LANES + lane] = x;
        }
        self.bests.push(cell.best());
        self.cells.push(cell);
    }
}

/// Measures the points of `cell` in the blocks holding a minimum above `reach`, and takes out those the
/// pick at `center` brings nearer: returns them (with their new minima) and the number measured.
fn lower(cell: &mut Cell, center: &[f32], reach: f64, dims: usize) -> (Cell, usize) {
    let blocks: Vec<usize> = (0..cell.points.len().div_ceil(GROUP))
        .filter(|&b| cell.mins[b * GROUP..cell.points.len().min((b + 1) * GROUP)].iter().any(|&m| m as f64 > reach))
        .collect();
    let mut sums = vec![[0f32; GROUP]; blocks.len()];
    for (blocks, sums) in blocks.chunks(BATCH).zip(sums.chunks_mut(BATCH)) {
        let batch: [&[i16]; BATCH] = std::array::from_fn(|q| {
            let b = blocks[q.min(blocks.len() - 1)];
            &cell.rows[b * dims * GROUP..(b + 1) * dims * GROUP]
        });
        sums.copy_from_slice(&distances(batch, center)[..sums.len()]);
    }
    let mut moved = Cell::default();
    let mut measured = 0;
    // From the last block and lane, so that each removal (the last point takes its place) leaves the
    // points still to visit in place: the sums, taken before any removal, still match them.
    for (&b, sums) in blocks.iter().zip(&sums).rev() {
        let lanes = b * GROUP..cell.points.len().min((b + 1) * GROUP);
        measured += lanes.len();
        for k in lanes.rev() {
            let d = sums[k % GROUP];
            if d < cell.mins[k] {
                moved.push(cell.points[k], d, dims, |j| cell.rows[Cell::at(k, j, dims)] as f32);
                cell.swap_remove(k, dims);
            }
        }
    }
    cell.shrink_if_sparse();
    (moved, measured)
}

/// The f32 squared distances of `BATCH` blocks of `GROUP` points (each dimension by dimension) to
/// `center`, each summed over j = 0, 1, … as the reference sums it; the blocks side by side, so that
/// enough independent sums are in flight to hide the additions' latency.
fn distances(blocks: [&[i16]; BATCH], center: &[f32]) -> [[f32; GROUP]; BATCH] {
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

/// The f32 squared distances of one block of picks to `center`, summed in order.
fn pick_distances(block: &[f32], center: &[f32], out: &mut [f32]) {
    out.copy_from_slice(&super::lane_distances::<LANES>(block, center));
}
