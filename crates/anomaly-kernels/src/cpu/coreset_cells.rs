//! The multithreaded coreset selection (`fast::select`), pruned by the triangle inequality.
//!
//! Done plainly, each greedy step of `coreset.rs` streams every point (84 MB at 164k × 128): memory
//! bound. But once a few picks are made, a new pick lowers only the minima of points near it. So every
//! point is kept in the **cell** of the pick it is nearest to (the one that set its running minimum: its
//! minimum is exactly that pick's f32 distance), and a step goes through the cells:
//! - the new pick's distance to every earlier pick (32 picks side by side, as the plain loop did with
//!   points) decides for each cell at once: a point `i` of cell `a` is at least `d(pick, a) − d(i, a)`
//!   from the pick, so where `d(pick, a) ≥ 2·√min_i` its minimum cannot change. A cell whose largest
//!   minimum passes is skipped whole; in the others only the points that fail are measured;
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

use rayon::prelude::*;

use crate::coreset::CoresetSpace;

/// Picks per block of the pick-to-pick distances: a block stores its picks' coordinates dimension by
/// dimension, so 32 distances are summed side by side, each in order.
const LANES: usize = 32;
/// Blocks of picks per task of the pick-to-pick distances.
const TASK_BLOCKS: usize = 16;
/// Points whose distances are summed side by side (independent sums, each in order).
const GROUP: usize = 8;

/// The larger (running minimum, then lower original index): the order every path's arg-max follows.
fn higher(a: (f32, u32), b: (f32, u32)) -> (f32, u32) {
    if b.0 > a.0 || (b.0 == a.0 && b.1 < a.1) { b } else { a }
}

/// The points nearest to one pick, with their running minima (their f32 distances to it) and their
/// coordinates (row-major, so that a step reads a cell's points from one stretch of memory).
struct Cell {
    points: Vec<u32>,
    mins: Vec<f32>,
    rows: Vec<f32>,
}

impl Cell {
    /// (largest minimum, lowest index holding it); (−∞, `u32::MAX`) when empty.
    fn best(&self) -> (f32, u32) {
        self.points.iter().zip(&self.mins).fold((f32::NEG_INFINITY, u32::MAX), |best, (&i, &m)| higher(best, (m, i)))
    }

    /// Takes out point `k` (the last one takes its place).
    fn swap_remove(&mut self, k: usize, dims: usize) {
        let last = self.points.len() - 1;
        self.points.swap_remove(k);
        self.mins.swap_remove(k);
        self.rows.copy_within(last * dims..(last + 1) * dims, k * dims);
        self.rows.truncate(last * dims);
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
        let points: Vec<u32> = (0..space.rows() as u32).filter(|&i| i as usize != start).collect();
        let mut rows = space.values()[..start * dims].to_vec();
        rows.extend_from_slice(&space.values()[(start + 1) * dims..]);
        let mut mins = vec![0f32; points.len()];
        let center = space.row(start);
        mins.par_chunks_mut(1024).zip(rows.par_chunks(1024 * dims)).for_each(|(mins, rows)| distances(rows, center, mins));
        let mut state = Self { dims, cells: Vec::new(), bests: Vec::new(), picks: Vec::new(), margin: dims as f64 / (1u64 << 22) as f64 };
        state.push(center, Cell { points, mins, rows });
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
        let center = cell.rows[at * dims..(at + 1) * dims].to_vec();
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
        let moved: Vec<(Cell, usize)> = tested
            .into_par_iter()
            .map(|(cell, best, reach)| {
                let moved = lower(cell, &center, reach, dims);
                *best = cell.best();
                moved
            })
            .collect();
        let measured = moved.iter().map(|m| m.1).sum();
        let mut cell = Cell { points: Vec::new(), mins: Vec::new(), rows: Vec::new() };
        for (m, _) in moved {
            cell.points.extend(m.points);
            cell.mins.extend(m.mins);
            cell.rows.extend(m.rows);
        }
        self.push(&center, cell);
        measured
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

/// Measures the points of `cell` whose minimum exceeds `reach`, and takes out those the pick at `center`
/// brings nearer: returns them (with their new minima) and the number measured.
fn lower(cell: &mut Cell, center: &[f32], reach: f64, dims: usize) -> (Cell, usize) {
    let candidates: Vec<usize> = (0..cell.points.len()).filter(|&k| cell.mins[k] as f64 > reach).collect();
    let mut rows = Vec::with_capacity(candidates.len() * dims);
    for &k in &candidates {
        rows.extend_from_slice(&cell.rows[k * dims..(k + 1) * dims]);
    }
    let mut sums = vec![0f32; candidates.len()];
    distances(&rows, center, &mut sums);
    let mut moved = Cell { points: Vec::new(), mins: Vec::new(), rows: Vec::new() };
    // From the last, so that each removal leaves the candidates before it in place.
    for (&k, &d) in candidates.iter().zip(&sums).rev() {
        if d < cell.mins[k] {
            moved.points.push(cell.points[k]);
            moved.mins.push(d);
            moved.rows.extend_from_slice(&cell.rows[k * dims..(k + 1) * dims]);
            cell.swap_remove(k, dims);
        }
    }
    (moved, candidates.len())
}

/// The f32 squared distances of the rows of `rows` (row-major, as wide as `center`) to `center`, each
/// summed over j = 0, 1, … as the reference sums it; `GROUP` rows side by side.
fn distances(rows: &[f32], center: &[f32], out: &mut [f32]) {
    let dims = center.len();
    let mut groups = rows.chunks_exact(GROUP * dims);
    let mut outs = out.chunks_exact_mut(GROUP);
    for (group, out) in (&mut groups).zip(&mut outs) {
        let rows: [&[f32]; GROUP] = std::array::from_fn(|l| &group[l * dims..(l + 1) * dims]);
        let mut sums = [0f32; GROUP];
        for (j, &c) in center.iter().enumerate() {
            for l in 0..GROUP {
                let t = rows[l][j] - c;
                sums[l] += t * t;
            }
        }
        out.copy_from_slice(&sums);
    }
    for (row, out) in groups.remainder().chunks_exact(dims).zip(outs.into_remainder()) {
        let mut sum = 0f32;
        for (&x, &c) in row.iter().zip(center) {
            let t = x - c;
            sum += t * t;
        }
        *out = sum;
    }
}

/// The f32 squared distances of one block of picks to `center`, summed in order.
fn pick_distances(block: &[f32], center: &[f32], out: &mut [f32]) {
    let mut sums = [0f32; LANES];
    let (rows, _) = block.as_chunks::<LANES>();
    for (row, &c) in rows.iter().zip(center) {
        for l in 0..LANES {
            let t = row[l] - c;
            sums[l] += t * t;
        }
    }
    out.copy_from_slice(&sums);
}
