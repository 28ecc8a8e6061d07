//! The kNN's inner loop: squared distances of a block of queries to a bank block, each offered to the
//! query's running selection only when below its current bound. Where the processor has AVX-512 or AVX2
//! with FMA, a register-blocked micro-kernel of our own ([`tiles`]) computes the products and the
//! distances and compares them in registers, so no product matrix is written; elsewhere `gemm`'s sgemm
//! fills a product block that is then scanned.
//!
//! The queries are packed once per block, a tile's rows interleaved value by value (pass by pass, where
//! rows are wider than a pass); each bank block is packed a tile of rows at a time the same way, so that
//! both stream in order through the micro-kernel.

mod tiles;

use tiles::{Fused, Tiles};

/// Dimensions per pass over a bank tile: its rows of them (32 KiB for AVX-512's 32 rows) stay in the L1
/// cache while every query tile passes; wider rows (1024 for WRN50-2) are summed in passes, the partial
/// sums kept per tile.
const PASS_DIMS: usize = 256;

/// Where the scan offers what it finds: each query's current bound (the k-th best squared distance so
/// far, infinite before k are held) and the candidates below it.
pub trait Candidates {
    fn bound(&self, query: usize) -> f32;
    /// A bank row (global `index`) at `squared` distance of `query`, below its bound when it was read.
    fn offer(&mut self, query: usize, squared: f32, index: u32);
}

/// A block of queries ready to be scanned against bank blocks, holding its packing buffers.
pub struct QueryBlock<'a> {
    queries: &'a [f32],
    m: usize,
    d: usize,
    /// The fused micro-kernel that computes the products, or `None` for sgemm.
    fused: Option<Fused>,
    /// The queries in the kernel's tiles (zero-padded), `[pass][tile][dimension][query]` ([`pack_queries`]);
    /// empty for sgemm.
    packed: Vec<f32>,
    /// One bank block in the kernel's tiles (zero-padded), `[tile][dimension][row]`, or the block's
    /// products with the queries (sgemm).
    scratch: Vec<f32>,
    /// Each query tile's partial sums between passes (fused kernels, rows wider than [`PASS_DIMS`]).
    partial: Vec<f32>,
}

impl<'a> QueryBlock<'a> {
    /// `queries`: `m × d`, row-major. Scans with the processor's fastest fused kernel, else with sgemm.
    pub fn new(queries: &'a [f32], m: usize, d: usize) -> Self {
        Self::with_kernel(queries, m, d, Fused::available().first().copied())
    }

    /// `new` with a chosen kernel (`None`: sgemm), so that tests run every one the processor has.
    fn with_kernel(queries: &'a [f32], m: usize, d: usize, fused: Option<Fused>) -> Self {
        assert!(queries.len() >= m * d, "{} values are fewer than {m} queries of {d}", queries.len());
        let mut packed = Vec::new();
        if let Some(kernel) = fused {
            pack_queries(&mut packed, queries, m, d, kernel.tile_queries());
        }
        let partial = fused.map_or_else(Vec::new, |kernel| vec![0.0; kernel.partial_len(m, d)]);
        Self { queries, m, d, fused, packed, scratch: Vec::new(), partial }
    }

    /// Offers `candidates` every bank row of `bank` (`n × d`, row-major; squared norms `bank_norms`; its
    /// first row is bank row `first`) whose squared distance to a query (squared norms `query_norms`) is
    /// below that query's bound, in ascending row order per query. Single-threaded: callers parallelise
    /// over query blocks.
    pub fn scan(
        &mut self,
        bank: &[f32],
        n: usize,
        first: usize,
        bank_norms: &[f32],
        query_norms: &[f32],
        candidates: &mut impl Candidates,
    ) {
        let (m, d) = (self.m, self.d);
        assert!(
            bank.len() >= n * d && bank_norms.len() >= n && query_norms.len() >= m && u32::try_from(first + n).is_ok(),
            "a scan of {n} bank rows from row {first} for {m} queries of {d} values does not fit its inputs"
        );
        match self.fused {
            Some(kernel) => {
                kernel.pack_bank(&mut self.scratch, bank, n, d);
                let tiles = Tiles { queries: &self.packed, bank: &self.scratch, m, n, d, query_norms, bank_norms, first };
                // SAFETY: both packings hold whole tiles of `d` values for this kernel.
                unsafe { kernel.scan(&tiles, &mut self.partial, candidates) }
            }
            None => {
                self.scratch.resize(m * n, 0.0);
                super::fast::multiply_transposed(self.queries, bank, m, n, d, &mut self.scratch);
                for (i, row) in self.scratch.chunks_exact(n).enumerate() {
                    let query_norm = query_norms[i];
                    let pieces = row.chunks(SKIP_PIECE).zip(bank_norms[..n].chunks(SKIP_PIECE));
                    for (c, (dots, norms)) in pieces.enumerate() {
                        // Once the bound is tight most pieces hold no candidate: their least distance,
                        // taken in vector lanes, skips them whole.
                        if least_squared(query_norm, dots, norms) >= candidates.bound(i) {
                            continue;
                        }
                        let start = first + c * SKIP_PIECE;
                        for (j, (&dot, &norm)) in dots.iter().zip(norms).enumerate() {
                            let squared = squared_distance(query_norm, norm, dot);
                            if squared < candidates.bound(i) {
                                candidates.offer(i, squared, (start + j) as u32);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Products of a query row that the sgemm path's scan compares with the query's bound as one piece.
const SKIP_PIECE: usize = 64;
/// Lanes in which a piece's least distance is taken: one vector.
const SKIP_LANES: usize = 8;

/// A squared distance from the norms and the product, clamped at 0 against rounding (and a NaN made 0).
#[inline]
fn squared_distance(query_norm: f32, norm: f32, dot: f32) -> f32 {
    (query_norm + norm - 2.0 * dot).max(0.0)
}

/// The least `squared_distance` over a piece of a product row, each computed as the scan computes it (so
/// a piece is skipped only when no distance in it is below the bound), in `SKIP_LANES` independent lanes
/// the compiler keeps in one vector.
fn least_squared(query_norm: f32, dots: &[f32], norms: &[f32]) -> f32 {
    let mut least = [f32::INFINITY; SKIP_LANES];
    let (dot_lanes, dot_rest) = dots.as_chunks::<SKIP_LANES>();
    let (norm_lanes, norm_rest) = norms.as_chunks::<SKIP_LANES>();
    for (dots, norms) in dot_lanes.iter().zip(norm_lanes) {
        for l in 0..SKIP_LANES {
            let value = squared_distance(query_norm, norms[l], dots[l]);
            least[l] = if value < least[l] { value } else { least[l] };
        }
    }
    for (&dot, &norm) in dot_rest.iter().zip(norm_rest) {
        least[0] = least[0].min(squared_distance(query_norm, norm, dot));
    }
    least.iter().fold(f32::INFINITY, |a, &b| a.min(b))
}

/// `rows × d` query values in tiles of `tile` rows, pass by pass: `[pass][tile][dimension][row]` (each
/// pass [`PASS_DIMS`] dimensions, the last the rest), the last tile zero-padded. A pass over a bank tile
/// then reads every query tile's values for it as one stream (a megabyte at 1024 queries), not a piece of
/// each tile `d · tile` values apart: measured with AVX2 (Zen 4 capped) at 1000 × 20k × 1024, four
/// alternations, 230–248 ms (median 240) against 228–274 (median 260); level at 100k rows and with
/// AVX-512.
fn pack_queries(packed: &mut Vec<f32>, values: &[f32], rows: usize, d: usize, tile: usize) {
    let tiles = rows.div_ceil(tile);
    packed.clear();
    packed.resize(tiles * d * tile, 0.0);
    for from in (0..d).step_by(PASS_DIMS) {
        let to = d.min(from + PASS_DIMS);
        let pass = &mut packed[from * tiles * tile..to * tiles * tile];
        for (t, tile_values) in pass.chunks_exact_mut((to - from) * tile).enumerate() {
            pack_values(tile_values, &values[t * tile * d + from..], d, tile, tile.min(rows - t * tile));
        }
    }
}

/// `rows × d` values in tiles of `tile` rows, `[tile][dimension][row]`, the last tile zero-padded, where
/// `whole_tile` packs the leading dimensions of each tile that has all its rows
/// (its `tile` rows of `source` into the tile's values) and returns how many; the rest, and the last
/// tile if short, are packed here a value at a time.
fn pack_tiles(
    packed: &mut Vec<f32>,
    values: &[f32],
    rows: usize,
    d: usize,
    tile: usize,
    mut whole_tile: impl FnMut(&mut [f32], &[f32]) -> usize,
) {
    packed.clear();
    packed.resize(rows.div_ceil(tile) * d * tile, 0.0);
    for (t, tile_values) in packed.chunks_exact_mut(d * tile).enumerate() {
        let rows_here = tile.min(rows - t * tile);
        let source = &values[t * tile * d..][..rows_here * d];
        let packed_dims = if rows_here == tile { whole_tile(tile_values, source) } else { 0 };
        pack_values(&mut tile_values[packed_dims * tile..], &source[packed_dims..], d, tile, rows_here);
    }
}

/// Packs `out` (`[dimension][row]`, `tile` values a dimension, as many dimensions as it holds) from
/// `rows` rows of `source`, `d` values apart, each row starting at the first dimension to pack; a value
/// at a time. Written in order, read from the rows side by side: each row's cache lines are read whole
/// over consecutive dimensions (a row-by-row loop scattered every write across the tile).
fn pack_values(out: &mut [f32], source: &[f32], d: usize, tile: usize, rows: usize) {
    for (j, out) in out.chunks_exact_mut(tile).enumerate() {
        for (r, slot) in out.iter_mut().enumerate().take(rows) {
            *slot = source[r * d + j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::fast::row_norms;

    /// The plain packing, a value at a time, that the kernels' bank packings must equal.
    fn pack_into(packed: &mut Vec<f32>, values: &[f32], rows: usize, d: usize, tile: usize) {
        pack_tiles(packed, values, rows, d, tile, |_, _| 0);
    }

    /// Every pair's squared distance, as offered with no bound.
    struct Everything {
        pairs: Vec<Vec<(f32, u32)>>,
    }

    impl Candidates for Everything {
        fn bound(&self, _: usize) -> f32 {
            f32::INFINITY
        }

        fn offer(&mut self, query: usize, squared: f32, index: u32) {
            self.pairs[query].push((squared, index));
        }
    }

    /// A seeded stream of values in [-0.5, 0.5).
    fn seeded_values(seed: u64) -> impl FnMut() -> f32 {
        let mut state = seed;
        move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        }
    }

    /// Each query's nearest row, as the kNN's k = 1 selection keeps it: the bound tightens as rows arrive.
    struct Nearest {
        best: Vec<(f32, u32)>,
    }

    impl Candidates for Nearest {
        fn bound(&self, query: usize) -> f32 {
            self.best[query].0
        }

        fn offer(&mut self, query: usize, squared: f32, index: u32) {
            self.best[query] = (squared, index);
        }
    }

    /// Every kernel this processor runs: sgemm (`None`) and each fused one.
    fn kernels() -> Vec<Option<Fused>> {
        std::iter::once(None).chain(Fused::available().into_iter().map(Some)).collect()
    }

    /// With a bound that tightens, every path (each fused kernel the CPU has, and the sgemm path with its
    /// skipping of whole pieces) finds every query's nearest row: a query near each row of a
    /// bank whose rows lie far apart, at piece edges and past them, and queries far from all.
    #[test]
    fn scans_with_a_tightening_bound_find_the_nearest_row_on_every_path() {
        let mut next = seeded_values(0x9e37_79b9);
        for &(n, d) in &[(1, 3), (63, 5), (64, 16), (65, 17), (200, 40), (517, 130)] {
            let bank: Vec<f32> = (0..n * d).map(|_| 8.0 * next()).collect();
            // Row j's twin, nudged; then queries from the same spread, whose nearest may be anywhere.
            let mut queries: Vec<f32> = bank.iter().map(|v| v + 0.01 * next()).collect();
            queries.extend((0..20 * d).map(|_| 8.0 * next()));
            let m = queries.len() / d;
            let (query_norms, bank_norms) = (row_norms(&queries, d), row_norms(&bank, d));
            let exact =
                |i: usize, j: usize| -> f64 { (0..d).map(|c| (f64::from(queries[i * d + c]) - f64::from(bank[j * d + c])).powi(2)).sum() };
            for kernel in kernels() {
                let mut block = QueryBlock::with_kernel(&queries, m, d, kernel);
                let mut found = Nearest { best: vec![(f32::INFINITY, u32::MAX); m] };
                block.scan(&bank, n, 0, &bank_norms, &query_norms, &mut found);
                for (i, &(squared, index)) in found.best.iter().enumerate() {
                    let nearest = (0..n).min_by(|&a, &b| exact(i, a).total_cmp(&exact(i, b))).unwrap();
                    let (want, got) = (exact(i, nearest), exact(i, index as usize));
                    // Rows within rounding of the nearest may stand in for it.
                    assert!(got - want <= 1e-3, "{kernel:?}, {n} × {d}, query {i}: row {index} ({got}) against row {nearest} ({want})");
                    assert!((f64::from(squared) - got).abs() <= 1e-3 * (1.0 + got), "{kernel:?}, {n} × {d}, query {i}: {squared} vs {got}");
                    if i < n {
                        assert_eq!(index as usize, i, "{kernel:?}, {n} × {d}: a row's twin finds the row");
                    }
                }
            }
        }
    }

    /// Each kernel's bank packing (in 8 × 8 transposes) lays out tiles exactly as the plain one, padding
    /// included, over what the buffer held before.
    #[test]
    fn kernels_bank_tiles_equal_the_plain_packing() {
        for kernel in Fused::available() {
            for &(rows, d) in &[(1, 1), (15, 3), (16, 7), (17, 1), (32, 5), (33, 64), (48, 19), (70, 130)] {
                let values: Vec<f32> = (0..rows * d).map(|i| i as f32 + 0.5).collect();
                let (mut plain, mut packed) = (Vec::new(), vec![f32::NAN; 3]);
                pack_into(&mut plain, &values, rows, d, kernel.tile_rows());
                kernel.pack_bank(&mut packed, &values, rows, d);
                assert_eq!(packed, plain, "{kernel:?}, {rows} × {d}");
            }
        }
    }

    /// At every tile edge (AVX-512's 8 × 32 and AVX2's 6 × 16) and pass edge, every kernel offers every pair
    /// once, in ascending row order, with its squared distance to rounding.
    #[test]
    fn scans_offer_every_pair_at_every_tile_edge() {
        let mut next = seeded_values(0x1234_5678);
        let shapes = [
            (1, 1, 1),
            (5, 15, 2),
            (6, 16, 9),
            (7, 31, 3),
            (8, 32, 16),
            (9, 33, 17),
            (13, 17, 256),
            (17, 70, 130),
            (3, 100, 1024),
            (9, 40, 600),
            (12, 48, 257),
        ];
        for &(m, n, d) in &shapes {
            let queries: Vec<f32> = (0..m * d).map(|_| next()).collect();
            let bank: Vec<f32> = (0..n * d).map(|_| next()).collect();
            let (query_norms, bank_norms) = (row_norms(&queries, d), row_norms(&bank, d));
            for kernel in kernels() {
                let mut block = QueryBlock::with_kernel(&queries, m, d, kernel);
                // Twice, as the kNN reuses a block over bank blocks: the bank packing must be redone whole.
                for first in [0, 1000] {
                    let mut found = Everything { pairs: vec![Vec::new(); m] };
                    block.scan(&bank, n, first, &bank_norms, &query_norms, &mut found);
                    for (i, pairs) in found.pairs.iter().enumerate() {
                        let rows: Vec<usize> = pairs.iter().map(|p| p.1 as usize).collect();
                        assert_eq!(rows, (first..first + n).collect::<Vec<_>>(), "{kernel:?}, {m}×{n}×{d}, query {i}");
                        for &(squared, index) in pairs {
                            let j = index as usize - first;
                            let exact: f64 = (0..d).map(|c| (f64::from(queries[i * d + c]) - f64::from(bank[j * d + c])).powi(2)).sum();
                            assert!(
                                (f64::from(squared) - exact).abs() <= 1e-4 * (d as f64).sqrt(),
                                "{kernel:?}, {m}×{n}×{d} ({i}, {j}): {squared} vs {exact}"
                            );
                        }
                    }
                }
            }
        }
    }
}
