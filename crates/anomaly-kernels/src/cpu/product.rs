//! The kNN's inner loop: squared distances of a block of queries to a bank block, each offered to the
//! query's running selection only when below its current bound. On processors with AVX-512 a
//! register-blocked micro-kernel of our own computes the products and the distances and compares them
//! in registers, so no product matrix is written (the `gemm` crate reaches only AVX2 on stable Rust, half
//! the FMA width FAISS's BLAS uses); elsewhere `gemm`'s sgemm fills a product block that is then scanned.
//!
//! The queries are packed once per block, 8 rows interleaved value by value; each bank block is packed
//! 32 rows at a time the same way. An 8 × 32 tile of products then lives in 16 registers while the
//! packed values stream in order: 2 vector loads and 8 broadcasts feed 16 FMAs per dimension.

/// Queries per tile (broadcast), bank rows per tile (two 16-lane vectors).
const TILE_QUERIES: usize = 8;
const TILE_ROWS: usize = 32;
/// Dimensions per pass over a bank tile: its 32 rows of them (32 KiB) stay in the L1 cache while every
/// query tile passes; wider rows (1024 for WRN50-2) are summed in passes, the partial sums kept per tile.
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
    /// The queries in tiles of [`TILE_QUERIES`] (zero-padded), `[tile][dimension][query]`; `None` where
    /// AVX-512 is missing.
    packed: Option<Vec<f32>>,
    /// One bank block in tiles of [`TILE_ROWS`] (zero-padded), `[tile][dimension][row]` (AVX-512), or the
    /// block's products with the queries (sgemm).
    scratch: Vec<f32>,
    /// Each query tile's 8 × 32 partial sums between passes (AVX-512).
    partial: Vec<f32>,
}

impl<'a> QueryBlock<'a> {
    /// `queries`: `m × d`, row-major.
    pub fn new(queries: &'a [f32], m: usize, d: usize) -> Self {
        Self::with_tiles(queries, m, d, anomaly_device::cpu_has_avx512())
    }

    /// `new` with the AVX-512 tiles (`tiles`, where the CPU has them) or the sgemm path, so that tests
    /// run both on a processor that has AVX-512.
    fn with_tiles(queries: &'a [f32], m: usize, d: usize, tiles: bool) -> Self {
        assert!(queries.len() >= m * d, "{} values are fewer than {m} queries of {d}", queries.len());
        let packed = (tiles && anomaly_device::cpu_has_avx512()).then(|| {
            let mut packed = Vec::new();
            pack_into(&mut packed, queries, m, d, TILE_QUERIES);
            packed
        });
        let partial = if d > PASS_DIMS { vec![0.0; m.div_ceil(TILE_QUERIES) * TILE_QUERIES * TILE_ROWS] } else { Vec::new() };
        Self { queries, m, d, packed, scratch: Vec::new(), partial }
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
        match &self.packed {
            Some(queries) => {
                // SAFETY: `packed` exists only where AVX-512F was detected; `bank` holds `n × d` values and
                // both packings whole tiles of `d` values; the norms cover `m` and `n` rows (asserted above).
                unsafe { avx512::pack_bank(&mut self.scratch, bank, n, d) };
                let tiles = avx512::Tiles { queries, bank: &self.scratch, m, n, d };
                unsafe { avx512::scan(&tiles, first, bank_norms, query_norms, &mut self.partial, candidates) }
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

/// `rows × d` values in tiles of `tile` rows, `[tile][dimension][row]`, the last tile zero-padded.
fn pack_into(packed: &mut Vec<f32>, values: &[f32], rows: usize, d: usize, tile: usize) {
    packed.clear();
    packed.resize(rows.div_ceil(tile) * d * tile, 0.0);
    for (t, tile_values) in packed.chunks_exact_mut(d * tile).enumerate() {
        let rows_here = tile.min(rows - t * tile);
        let source = &values[t * tile * d..][..rows_here * d];
        // Written in order, read from the tile's rows side by side: each row's cache lines are read
        // whole over consecutive dimensions (a row-by-row loop scattered every write across the tile).
        for (j, out) in tile_values.chunks_exact_mut(tile).enumerate() {
            for (r, slot) in out.iter_mut().enumerate().take(rows_here) {
                *slot = source[r * d + j];
            }
        }
    }
}

mod avx512 {
    use super::Candidates;

    /// A packed query block and bank block: `queries` holds `ceil(m / 8) × d × 8` values, `bank`
    /// `ceil(n / 32) × d × 32`.
    pub struct Tiles<'a> {
        pub queries: &'a [f32],
        pub bank: &'a [f32],
        pub m: usize,
        pub n: usize,
        pub d: usize,
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn pack_bank(_: &mut Vec<f32>, _: &[f32], _: usize, _: usize) {
        unreachable!("AVX-512 is never detected off x86-64")
    }

    /// [`super::pack_into`] of a bank block in tiles of 32 rows, a dimension at a time in two masked
    /// gathers (16 rows `d` apart each) and two vector stores: the scalar packing's 32 loads and stores
    /// per dimension were a seventh of a d = 1024 search.
    ///
    /// # Safety
    /// AVX-512F must be available, and `values` must hold `rows × d` values.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_bank(packed: &mut Vec<f32>, values: &[f32], rows: usize, d: usize) {
        use std::arch::x86_64::*;

        use super::TILE_ROWS as NR;
        let Ok(stride) = i32::try_from(15 * d) else {
            return super::pack_into(packed, values, rows, d, NR);
        };
        debug_assert!(values.len() >= rows * d);
        packed.clear();
        packed.resize(rows.div_ceil(NR) * d * NR, 0.0);
        let offsets =
            _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(stride / 15));
        for (t, tile) in packed.chunks_exact_mut(d * NR).enumerate() {
            let rows_here = NR.min(rows - t * NR);
            let (low, high) = (lane_mask(rows_here), lane_mask(rows_here.saturating_sub(16)));
            let base = values.as_ptr().wrapping_add(t * NR * d);
            for (j, out) in tile.chunks_exact_mut(NR).enumerate() {
                // SAFETY: the masks leave only the tile's `rows_here` rows, whose dimension `j` lies within
                // `values`; `out` holds 32 values.
                unsafe {
                    let first = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), low, offsets, base.wrapping_add(j));
                    let second = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), high, offsets, base.wrapping_add(16 * d + j));
                    _mm512_storeu_ps(out.as_mut_ptr(), first);
                    _mm512_storeu_ps(out.as_mut_ptr().add(16), second);
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn scan(_: &Tiles, _: usize, _: &[f32], _: &[f32], _: &mut [f32], _: &mut impl Candidates) {
        unreachable!("AVX-512 is never detected off x86-64")
    }

    /// The scan of [`super::QueryBlock::scan`] from packed tiles: `max(|q|² + |b|² − 2 q·b, 0)` per pair,
    /// compared with the query's bound in registers; only the pairs below it leave them. Rows wider than
    /// [`super::PASS_DIMS`] are summed in passes, through `partial` (8 × 32 values per query tile).
    ///
    /// # Safety
    /// AVX-512F must be available; `tiles` must hold what [`Tiles`] says, `bank_norms` `n` values,
    /// `query_norms` `m`, and `partial` `ceil(m / 8) × 256` where `d` is above `PASS_DIMS`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scan(
        tiles: &Tiles,
        first: usize,
        bank_norms: &[f32],
        query_norms: &[f32],
        partial: &mut [f32],
        candidates: &mut impl Candidates,
    ) {
        use std::arch::x86_64::*;

        use super::{PASS_DIMS, TILE_QUERIES as MR, TILE_ROWS as NR};
        let &Tiles { queries, bank, m, n, d } = tiles;
        debug_assert!(queries.len() >= m.div_ceil(MR) * d * MR && bank.len() >= n.div_ceil(NR) * d * NR);
        debug_assert!(bank_norms.len() >= n && query_norms.len() >= m);
        debug_assert!(d <= PASS_DIMS || partial.len() >= m.div_ceil(MR) * MR * NR);
        let (two, zero) = (_mm512_set1_ps(2.0), _mm512_setzero_ps());
        let passes = d.div_ceil(PASS_DIMS);
        for (bank_tile, b) in bank.chunks_exact(d * NR).enumerate() {
            let first_column = bank_tile * NR;
            let columns = NR.min(n - first_column);
            let (low, high) = (lane_mask(columns), lane_mask(columns.saturating_sub(16)));
            // SAFETY: the masks cover the tile's `columns` rows, all within `bank_norms`.
            let (norms_low, norms_high) = unsafe {
                let norms = bank_norms.as_ptr().add(first_column);
                (_mm512_maskz_loadu_ps(low, norms), _mm512_maskz_loadu_ps(high, norms.wrapping_add(16)))
            };
            for pass in 0..passes {
                let (from, to) = (pass * PASS_DIMS, d.min((pass + 1) * PASS_DIMS));
                let last = pass + 1 == passes;
                for (query_tile, a) in queries.chunks_exact(d * MR).enumerate() {
                    let kept = partial.as_mut_ptr().wrapping_add(query_tile * MR * NR);
                    // SAFETY: each query tile's 8 × 32 partial sums lie within `partial` (passes after the
                    // first); the tiles hold `d` dimensions of 8 and 32 values, of which this pass reads
                    // `from..to`.
                    let sums = unsafe {
                        let start = if pass > 0 { load_tile(kept) } else { [[zero; 2]; MR] };
                        tile_sums(start, a.as_ptr().add(from * MR), b.as_ptr().add(from * NR), to - from)
                    };
                    if !last {
                        unsafe { store_tile(kept, &sums) };
                        continue;
                    }
                    let first_query = query_tile * MR;
                    for (r, sum) in sums.iter().enumerate().take(MR.min(m - first_query)) {
                        let query = first_query + r;
                        let query_norm = _mm512_set1_ps(query_norms[query]);
                        let bound = _mm512_set1_ps(candidates.bound(query));
                        let squared_low = _mm512_max_ps(_mm512_fnmadd_ps(two, sum[0], _mm512_add_ps(query_norm, norms_low)), zero);
                        let squared_high = _mm512_max_ps(_mm512_fnmadd_ps(two, sum[1], _mm512_add_ps(query_norm, norms_high)), zero);
                        let below = u32::from(_mm512_mask_cmp_ps_mask::<_CMP_LT_OQ>(low, squared_low, bound))
                            | u32::from(_mm512_mask_cmp_ps_mask::<_CMP_LT_OQ>(high, squared_high, bound)) << 16;
                        if below != 0 {
                            offer_lanes(below, squared_low, squared_high, query, first + first_column, candidates);
                        }
                    }
                }
            }
        }
    }

    /// A tile's 8 × 32 sums, less far in `dims` dimensions: 2 loads and 8 broadcasts feed 16 FMAs per
    /// dimension, the sums held in registers.
    ///
    /// # Safety
    /// `a` must hold `dims × 8` values and `b` `dims × 32`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile_sums(mut sums: Tile, mut a: *const f32, mut b: *const f32, dims: usize) -> Tile {
        use std::arch::x86_64::*;
        for _ in 0..dims {
            let (b0, b1) = unsafe { (_mm512_loadu_ps(b), _mm512_loadu_ps(b.add(16))) };
            for (r, sum) in sums.iter_mut().enumerate() {
                let x = _mm512_set1_ps(unsafe { *a.add(r) });
                sum[0] = _mm512_fmadd_ps(x, b0, sum[0]);
                sum[1] = _mm512_fmadd_ps(x, b1, sum[1]);
            }
            (a, b) = unsafe { (a.add(super::TILE_QUERIES), b.add(super::TILE_ROWS)) };
        }
        sums
    }

    /// 8 rows of 2 vectors: an 8 × 32 tile of sums.
    #[cfg(target_arch = "x86_64")]
    type Tile = [[std::arch::x86_64::__m512; 2]; super::TILE_QUERIES];

    /// A tile's partial sums, kept between passes at `at` (8 × 32 values).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_tile(at: *const f32) -> Tile {
        use std::arch::x86_64::*;
        std::array::from_fn(|r| unsafe { [_mm512_loadu_ps(at.add(r * 32)), _mm512_loadu_ps(at.add(r * 32 + 16))] })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_tile(at: *mut f32, sums: &Tile) {
        use std::arch::x86_64::*;
        for (r, sum) in sums.iter().enumerate() {
            unsafe {
                _mm512_storeu_ps(at.add(r * 32), sum[0]);
                _mm512_storeu_ps(at.add(r * 32 + 16), sum[1]);
            }
        }
    }

    /// Offers the lanes set in `below` of a query's 32 squared distances (bank rows from `first_row`), in
    /// lane order, each judged again against the bound, which an earlier lane's offer may have lowered.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn offer_lanes(
        below: u32,
        low: std::arch::x86_64::__m512,
        high: std::arch::x86_64::__m512,
        query: usize,
        first_row: usize,
        candidates: &mut impl Candidates,
    ) {
        use std::arch::x86_64::*;
        let mut values = [0f32; 32];
        // SAFETY: `values` holds the two vectors.
        unsafe {
            _mm512_storeu_ps(values.as_mut_ptr(), low);
            _mm512_storeu_ps(values.as_mut_ptr().add(16), high);
        }
        let mut lanes = below;
        while lanes != 0 {
            let lane = lanes.trailing_zeros() as usize;
            lanes &= lanes - 1;
            if values[lane] < candidates.bound(query) {
                candidates.offer(query, values[lane], (first_row + lane) as u32);
            }
        }
    }

    /// The first `lanes` (at most 16) lanes.
    #[cfg(target_arch = "x86_64")]
    fn lane_mask(lanes: usize) -> u16 {
        if lanes >= 16 { u16::MAX } else { (1u16 << lanes) - 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::fast::row_norms;

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

    /// With a bound that tightens, both paths (the AVX-512 tiles where the CPU has them, and the sgemm
    /// path with its skipping of whole pieces) find every query's nearest row: a query near each row of a
    /// bank whose rows lie far apart, at piece edges and past them, and queries far from all.
    #[test]
    fn scans_with_a_tightening_bound_find_the_nearest_row_on_both_paths() {
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
            for tiles in [false, true] {
                let mut block = QueryBlock::with_tiles(&queries, m, d, tiles);
                let mut found = Nearest { best: vec![(f32::INFINITY, u32::MAX); m] };
                block.scan(&bank, n, 0, &bank_norms, &query_norms, &mut found);
                for (i, &(squared, index)) in found.best.iter().enumerate() {
                    let nearest = (0..n).min_by(|&a, &b| exact(i, a).total_cmp(&exact(i, b))).unwrap();
                    let (want, got) = (exact(i, nearest), exact(i, index as usize));
                    // Rows within rounding of the nearest may stand in for it.
                    assert!(got - want <= 1e-3, "tiles {tiles}, {n} × {d}, query {i}: row {index} ({got}) against row {nearest} ({want})");
                    assert!(
                        (f64::from(squared) - got).abs() <= 1e-3 * (1.0 + got),
                        "tiles {tiles}, {n} × {d}, query {i}: {squared} vs {got}"
                    );
                    if i < n {
                        assert_eq!(index as usize, i, "tiles {tiles}, {n} × {d}: a row's twin finds the row");
                    }
                }
            }
        }
    }

    /// The gathering bank packing lays out tiles exactly as the plain one, padding included.
    #[test]
    fn gathered_bank_tiles_equal_the_plain_packing() {
        if !anomaly_device::cpu_has_avx512() {
            eprintln!("skipping: no AVX-512 here");
            return;
        }
        for &(rows, d) in &[(1, 1), (15, 3), (16, 7), (17, 1), (32, 5), (33, 64), (70, 130)] {
            let values: Vec<f32> = (0..rows * d).map(|i| i as f32 + 0.5).collect();
            let (mut plain, mut gathered) = (Vec::new(), vec![f32::NAN; 3]);
            pack_into(&mut plain, &values, rows, d, TILE_ROWS);
            // SAFETY: AVX-512F was detected; `values` holds `rows × d` values.
            unsafe { avx512::pack_bank(&mut gathered, &values, rows, d) };
            assert_eq!(gathered, plain, "{rows} × {d}");
        }
    }

    /// At every tile edge the scan offers every pair once, in ascending row order, with its squared
    /// distance to rounding.
    #[test]
    fn scans_offer_every_pair_at_every_tile_edge() {
        let mut next = seeded_values(0x1234_5678);
        for &(m, n, d) in &[(1, 1, 1), (7, 31, 3), (8, 32, 16), (9, 33, 17), (17, 70, 130), (3, 100, 1024), (9, 40, 600)] {
            let queries: Vec<f32> = (0..m * d).map(|_| next()).collect();
            let bank: Vec<f32> = (0..n * d).map(|_| next()).collect();
            let (query_norms, bank_norms) = (row_norms(&queries, d), row_norms(&bank, d));
            let mut block = QueryBlock::new(&queries, m, d);
            // Twice, as the kNN reuses a block over bank blocks: the bank packing must be redone whole.
            for first in [0, 1000] {
                let mut found = Everything { pairs: vec![Vec::new(); m] };
                block.scan(&bank, n, first, &bank_norms, &query_norms, &mut found);
                for (i, pairs) in found.pairs.iter().enumerate() {
                    assert_eq!(pairs.iter().map(|p| p.1 as usize).collect::<Vec<_>>(), (first..first + n).collect::<Vec<_>>());
                    for &(squared, index) in pairs {
                        let j = index as usize - first;
                        let exact: f64 = (0..d).map(|c| (f64::from(queries[i * d + c]) - f64::from(bank[j * d + c])).powi(2)).sum();
                        assert!(
                            (f64::from(squared) - exact).abs() <= 1e-4 * (d as f64).sqrt(),
                            "{m}×{n}×{d} ({i}, {j}): {squared} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}
