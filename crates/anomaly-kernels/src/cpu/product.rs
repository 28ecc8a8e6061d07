//! The product of a block of kNN queries with bank blocks, `queries · bankᵀ`: on processors with
//! AVX-512 a register-blocked micro-kernel of our own (the `gemm` crate reaches only AVX2 on stable
//! Rust, half the FMA width FAISS's BLAS uses), elsewhere `gemm`'s sgemm.
//!
//! The queries are packed once per block, 8 rows interleaved value by value; each bank block is packed
//! 32 rows at a time the same way. An 8 × 32 tile of products then lives in 16 registers while the
//! packed values stream in order: 2 vector loads and 8 broadcasts feed 16 FMAs per dimension.

/// Queries per tile (broadcast), bank rows per tile (two 16-lane vectors).
const TILE_QUERIES: usize = 8;
const TILE_ROWS: usize = 32;

/// A block of queries ready to be multiplied with bank blocks, holding its packing buffers.
pub struct QueryBlock<'a> {
    queries: &'a [f32],
    m: usize,
    d: usize,
    /// The queries in tiles of [`TILE_QUERIES`] (zero-padded), `[tile][dimension][query]`; `None` where
    /// AVX-512 is missing.
    packed: Option<Vec<f32>>,
    /// One bank block in tiles of [`TILE_ROWS`] (zero-padded), `[tile][dimension][row]`.
    packed_bank: Vec<f32>,
}

impl<'a> QueryBlock<'a> {
    /// `queries`: `m × d`, row-major.
    pub fn new(queries: &'a [f32], m: usize, d: usize) -> Self {
        assert!(queries.len() >= m * d, "{} values are fewer than {m} queries of {d}", queries.len());
        let packed = avx512::available().then(|| pack(queries, m, d, TILE_QUERIES));
        Self { queries, m, d, packed, packed_bank: Vec::new() }
    }

    /// `out = queries · bankᵀ` (`m × n`, row-major) for `bank`: `n × d`, row-major. Single-threaded:
    /// callers parallelise over query blocks.
    pub fn times_transposed(&mut self, bank: &[f32], n: usize, out: &mut [f32]) {
        let (m, d) = (self.m, self.d);
        assert!(bank.len() >= n * d && out.len() >= m * n, "a {m} × {n} product of {d}-dimensional rows does not fit");
        match &self.packed {
            Some(queries) => {
                pack_into(&mut self.packed_bank, bank, n, d, TILE_ROWS);
                // SAFETY: `packed` exists only where AVX-512F was detected; both packings hold whole tiles
                // of `d` values and `out` holds `m × n` values (asserted above).
                unsafe { avx512::product(queries, &self.packed_bank, m, n, d, out) }
            }
            None => super::fast::multiply_transposed(self.queries, bank, m, n, d, out),
        }
    }
}

/// `rows × d` values in tiles of `tile` rows, `[tile][dimension][row]`, the last tile zero-padded.
fn pack(values: &[f32], rows: usize, d: usize, tile: usize) -> Vec<f32> {
    let mut packed = Vec::new();
    pack_into(&mut packed, values, rows, d, tile);
    packed
}

fn pack_into(packed: &mut Vec<f32>, values: &[f32], rows: usize, d: usize, tile: usize) {
    packed.clear();
    packed.resize(rows.div_ceil(tile) * d * tile, 0.0);
    for (t, tile_values) in packed.chunks_exact_mut(d * tile).enumerate() {
        for r in 0..tile.min(rows - t * tile) {
            let row = &values[(t * tile + r) * d..][..d];
            for (j, &x) in row.iter().enumerate() {
                tile_values[j * tile + r] = x;
            }
        }
    }
}

mod avx512 {
    /// Whether this processor runs the AVX-512 micro-kernel (detected once; the standard library caches it).
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn product(_: &[f32], _: &[f32], _: usize, _: usize, _: usize, _: &mut [f32]) {
        unreachable!("AVX-512 is never detected off x86-64")
    }

    /// `out = queries · bankᵀ` from packed tiles.
    ///
    /// # Safety
    /// AVX-512F must be available; `queries` must hold `ceil(m / 8) × d × 8` values, `bank`
    /// `ceil(n / 32) × d × 32`, and `out` `m × n`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn product(queries: &[f32], bank: &[f32], m: usize, n: usize, d: usize, out: &mut [f32]) {
        use std::arch::x86_64::*;

        use super::{TILE_QUERIES as MR, TILE_ROWS as NR};
        debug_assert!(queries.len() >= m.div_ceil(MR) * d * MR && bank.len() >= n.div_ceil(NR) * d * NR && out.len() >= m * n);
        // Bank tiles outside: each (≤ 128 KiB at d = 1024) stays in cache while every query tile passes.
        for (bank_tile, b) in bank.chunks_exact(d * NR).enumerate() {
            let first_column = bank_tile * NR;
            let columns = NR.min(n - first_column);
            let (low, high) = (lane_mask(columns), lane_mask(columns.saturating_sub(16)));
            for (query_tile, a) in queries.chunks_exact(d * MR).enumerate() {
                let mut sums = [[_mm512_setzero_ps(); 2]; MR];
                let (mut a, mut b) = (a.as_ptr(), b.as_ptr());
                for _ in 0..d {
                    // SAFETY: `a` and `b` advance by one dimension of their tiles, `d` times.
                    let (b0, b1) = unsafe { (_mm512_loadu_ps(b), _mm512_loadu_ps(b.add(16))) };
                    for (r, sum) in sums.iter_mut().enumerate() {
                        let x = _mm512_set1_ps(unsafe { *a.add(r) });
                        sum[0] = _mm512_fmadd_ps(x, b0, sum[0]);
                        sum[1] = _mm512_fmadd_ps(x, b1, sum[1]);
                    }
                    (a, b) = unsafe { (a.add(MR), b.add(NR)) };
                }
                let first_query = query_tile * MR;
                for (r, sum) in sums.iter().enumerate().take(MR.min(m - first_query)) {
                    let row = &mut out[(first_query + r) * n + first_column..][..columns];
                    // SAFETY: the masks cover `columns` lanes, all within `row`.
                    unsafe {
                        _mm512_mask_storeu_ps(row.as_mut_ptr(), low, sum[0]);
                        if columns > 16 {
                            _mm512_mask_storeu_ps(row.as_mut_ptr().add(16), high, sum[1]);
                        }
                    }
                }
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

    /// Products of every tile edge case equal sgemm's to rounding.
    #[test]
    fn products_equal_sgemms_at_every_tile_edge() {
        let mut state = 0x1234_5678_u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for &(m, n, d) in &[(1, 1, 1), (7, 31, 3), (8, 32, 16), (9, 33, 17), (17, 70, 130), (256, 2048, 128), (3, 100, 1024)] {
            let queries: Vec<f32> = (0..m * d).map(|_| next()).collect();
            let bank: Vec<f32> = (0..n * d).map(|_| next()).collect();
            let mut expected = vec![0f32; m * n];
            super::super::fast::multiply_transposed(&queries, &bank, m, n, d, &mut expected);
            let mut block = QueryBlock::new(&queries, m, d);
            // Twice, as the kNN reuses a block over bank blocks: the bank packing must be redone whole.
            for _ in 0..2 {
                let mut out = vec![f32::NAN; m * n];
                block.times_transposed(&bank, n, &mut out);
                for (i, (&got, &want)) in out.iter().zip(&expected).enumerate() {
                    assert!((got - want).abs() <= 1e-5 * (d as f32).sqrt(), "{m}×{n}×{d} at {i}: {got} vs {want}");
                }
            }
        }
    }
}
