//! The fused micro-kernel: an `MR × NR` tile of products held in vector registers while packed queries
//! and bank rows stream in order (`MR` broadcasts and 2 vector loads feed `2·MR` FMAs per dimension), then
//! turned into squared distances and compared with each query's bound in registers, so that only the pairs
//! below it leave them and no product matrix is written. Written once over [`Lanes`] and instantiated
//! for AVX-512 (8 × 32 tiles: 16 accumulators of 32) and AVX2 with FMA (6 × 16 tiles: 12 accumulators
//! of 16), each inside a function compiled for its instruction set.
// Only x86-64 instantiates the generic kernel so far; elsewhere `Fused::available` is empty.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use super::{Candidates, PASS_DIMS};

/// A fused micro-kernel this processor can run: a value exists only where its instructions were
/// detected, which is what makes [`Fused::scan`] and [`Fused::pack_bank`] sound to call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fused(Isa);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

/// What a scan reads: a packed query block and bank block, `queries` holding `ceil(m / MR) × d × MR`
/// values (`[pass][tile][dimension][query]`, `super::pack_queries`) and `bank` `ceil(n / NR) × d × NR`
/// (`[tile][dimension][row]`) for the kernel's `MR` ([`Fused::tile_queries`]) and `NR`
/// ([`Fused::tile_rows`]); the rows' squared norms (`m` and `n` values); and the number of the bank block's
/// first row.
pub struct Tiles<'a> {
    pub queries: &'a [f32],
    pub bank: &'a [f32],
    pub m: usize,
    pub n: usize,
    pub d: usize,
    pub query_norms: &'a [f32],
    pub bank_norms: &'a [f32],
    pub first: usize,
}

impl Fused {
    /// Every fused kernel this processor runs (up to [`anomaly_device::CpuIsa::active`]), the fastest
    /// first.
    pub fn available() -> Vec<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            use anomaly_device::CpuIsa;
            let isa = CpuIsa::active();
            [(CpuIsa::Avx512, Isa::Avx512), (CpuIsa::Avx2, Isa::Avx2)]
                .into_iter()
                .filter(|(needs, _)| isa >= *needs)
                .map(|(_, kernel)| Self(kernel))
                .collect()
        }
        #[cfg(not(target_arch = "x86_64"))]
        Vec::new()
    }

    /// Queries per tile (each broadcast in turn).
    pub fn tile_queries(self) -> usize {
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => 8,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => 6,
        }
    }

    /// Bank rows per tile: two vectors.
    pub fn tile_rows(self) -> usize {
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => 32,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => 16,
        }
    }

    /// Values of partial sums a query block of `m` keeps between passes over rows of `d` dimensions.
    pub fn partial_len(self, m: usize, d: usize) -> usize {
        if d > PASS_DIMS { m.div_ceil(self.tile_queries()) * self.tile_queries() * self.tile_rows() } else { 0 }
    }

    /// [`super::pack_into`] of a bank block (`rows × d` values, asserted) in tiles of [`Self::tile_rows`].
    pub fn pack_bank(self, packed: &mut Vec<f32>, values: &[f32], rows: usize, d: usize) {
        assert!(values.len() >= rows * d, "{} values are fewer than {rows} rows of {d}", values.len());
        match self.0 {
            // SAFETY (both): each kernel exists only where its instructions were detected, AVX2 among them
            // (`CpuIsa::detected` counts AVX-512 only with AVX2); `values` holds the rows (asserted above).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::pack_bank_in_transposes::<32>(packed, values, rows, d) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::pack_bank_in_transposes::<16>(packed, values, rows, d) },
        }
    }

    /// Offers `candidates` every pair of `tiles` whose squared distance `max(|q|² + |r|² − 2 q·r, 0)` is
    /// below its query's bound, in ascending row order per query (bank rows numbered from `tiles.first`).
    /// Rows wider than [`PASS_DIMS`] are summed in passes, through `partial` ([`Self::partial_len`]
    /// values).
    ///
    /// # Safety
    /// `tiles` must hold the packings [`Tiles`] describes for this kernel.
    pub unsafe fn scan(self, tiles: &Tiles, partial: &mut [f32], candidates: &mut impl Candidates) {
        let Tiles { queries, bank, m, n, d, query_norms, bank_norms, .. } = *tiles;
        debug_assert!(queries.len() >= m.div_ceil(self.tile_queries()) * d * self.tile_queries());
        debug_assert!(bank.len() >= n.div_ceil(self.tile_rows()) * d * self.tile_rows());
        assert!(bank_norms.len() >= n && query_norms.len() >= m && partial.len() >= self.partial_len(m, d));
        match self.0 {
            // SAFETY: each kernel exists only where its instructions were detected; the caller vouches for
            // the packings, and the norms and partial sums were asserted above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::scan_avx512(tiles, partial, candidates) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::scan_avx2(tiles, partial, candidates) },
        }
    }
}

/// One instruction set's vector of `f32` lanes, as the fused scan uses it (a tile row is two of them).
/// Every method is `#[inline(always)]`, so that it compiles inside the caller that enabled the
/// instruction set.
///
/// # Safety
/// The methods may be called only where the instruction set was detected.
trait Lanes: Copy {
    /// Lanes in a vector; at most 16, so that a tile row's lanes fit a `u32` of bits.
    const WIDTH: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(value: f32) -> Self;
    unsafe fn load(at: *const f32) -> Self;
    unsafe fn store(self, at: *mut f32);
    unsafe fn add(self, other: Self) -> Self;
    /// `self · b + c`, rounded once.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    /// The squared distances of products `self` whose squared norms add up to `norms`:
    /// `max(norms − 2·self, 0)`, lane by lane as [`super::squared_distance`] computes it (doubling is
    /// exact, so the fused subtraction rounds alike), a NaN made 0.
    unsafe fn squared(self, norms: Self) -> Self;
    /// The lanes below `bound`, as bits from lane 0 up.
    unsafe fn below(self, bound: Self) -> u32;
}

/// An `MR × NR` tile of sums: `MR` rows of two vectors.
type Tile<V, const MR: usize> = [[V; 2]; MR];

/// [`Fused::scan`] for one vector type and tile height. Inlined into each instruction set's entry point.
///
/// # Safety
/// As [`Fused::scan`], with `V`'s instruction set detected and `MR`, `2 · V::WIDTH` the tiles' shape.
#[inline(always)]
unsafe fn scan_tiles<V: Lanes, const MR: usize>(tiles: &Tiles, partial: &mut [f32], candidates: &mut impl Candidates) {
    let &Tiles { queries, bank, m, n, d, query_norms, bank_norms, first } = tiles;
    let (width, nr) = (V::WIDTH, 2 * V::WIDTH);
    let (passes, query_tiles) = (d.div_ceil(PASS_DIMS), m.div_ceil(MR));
    for (bank_tile, b) in bank.chunks_exact(d * nr).enumerate() {
        let first_column = bank_tile * nr;
        let columns = nr.min(n - first_column);
        let within = if columns >= 32 { u32::MAX } else { (1 << columns) - 1 };
        // Padded lanes compute distances of zero rows, which `within` leaves out.
        let mut padded_norms = [0f32; 32];
        padded_norms[..columns].copy_from_slice(&bank_norms[first_column..first_column + columns]);
        // SAFETY (this block and the scan's others): `V`'s instructions were detected (the caller's
        // contract); `padded_norms` holds two vectors; each query tile's `MR × NR` partial sums lie within
        // `partial` (passes after the first, `d` above `PASS_DIMS`); the tiles hold `d` dimensions of `MR`
        // and `NR` values, of which a pass reads `from..to`.
        let norms = unsafe { [V::load(padded_norms.as_ptr()), V::load(padded_norms.as_ptr().add(width))] };
        for pass in 0..passes {
            let (from, to) = (pass * PASS_DIMS, d.min((pass + 1) * PASS_DIMS));
            let last = pass + 1 == passes;
            let pass_queries = &queries[from * query_tiles * MR..to * query_tiles * MR];
            for (query_tile, a) in pass_queries.chunks_exact((to - from) * MR).enumerate() {
                let kept = partial.as_mut_ptr().wrapping_add(query_tile * MR * nr);
                let sums = unsafe {
                    let start = if pass > 0 { load_tile::<V, MR>(kept) } else { [[V::zero(); 2]; MR] };
                    tile_sums::<V, MR>(start, a.as_ptr(), b.as_ptr().add(from * nr), to - from)
                };
                if !last {
                    unsafe { store_tile(kept, &sums) };
                    continue;
                }
                let first_query = query_tile * MR;
                for (r, sum) in sums.iter().enumerate().take(MR.min(m - first_query)) {
                    let query = first_query + r;
                    unsafe {
                        let query_norm = V::splat(query_norms[query]);
                        let bound = V::splat(candidates.bound(query));
                        let squared = [sum[0].squared(query_norm.add(norms[0])), sum[1].squared(query_norm.add(norms[1]))];
                        let below = (squared[0].below(bound) | squared[1].below(bound) << width) & within;
                        if below != 0 {
                            let mut values = [0f32; 32];
                            squared[0].store(values.as_mut_ptr());
                            squared[1].store(values.as_mut_ptr().add(width));
                            offer_lanes(below, &values, query, first + first_column, candidates);
                        }
                    }
                }
            }
        }
    }
}

/// A tile's sums, less far in `dims` dimensions: 2 loads and `MR` broadcasts feed `2·MR` FMAs per
/// dimension, the sums held in registers.
///
/// # Safety
/// `V`'s instructions must be available; `a` must hold `dims × MR` values and `b` `dims × 2·V::WIDTH`.
#[inline(always)]
unsafe fn tile_sums<V: Lanes, const MR: usize>(mut sums: Tile<V, MR>, mut a: *const f32, mut b: *const f32, dims: usize) -> Tile<V, MR> {
    for _ in 0..dims {
        // SAFETY: within the `dims` dimensions the caller vouches for.
        unsafe {
            let (b0, b1) = (V::load(b), V::load(b.add(V::WIDTH)));
            for (r, sum) in sums.iter_mut().enumerate() {
                let x = V::splat(*a.add(r));
                sum[0] = x.mul_add(b0, sum[0]);
                sum[1] = x.mul_add(b1, sum[1]);
            }
            (a, b) = (a.add(MR), b.add(2 * V::WIDTH));
        }
    }
    sums
}

/// A tile's partial sums, kept between passes at `at` (`MR` rows of `2·V::WIDTH` values).
///
/// # Safety
/// `V`'s instructions must be available and `at` must hold the tile.
#[inline(always)]
unsafe fn load_tile<V: Lanes, const MR: usize>(at: *const f32) -> Tile<V, MR> {
    let nr = 2 * V::WIDTH;
    std::array::from_fn(|r| unsafe { [V::load(at.add(r * nr)), V::load(at.add(r * nr + V::WIDTH))] })
}

/// # Safety
/// As [`load_tile`], `at` writable.
#[inline(always)]
unsafe fn store_tile<V: Lanes, const MR: usize>(at: *mut f32, sums: &Tile<V, MR>) {
    let nr = 2 * V::WIDTH;
    for (r, sum) in sums.iter().enumerate() {
        unsafe {
            sum[0].store(at.add(r * nr));
            sum[1].store(at.add(r * nr + V::WIDTH));
        }
    }
}

/// Offers the lanes set in `below` of a query's squared distances (bank rows from `first_row`), in lane
/// order, each judged again against the bound, which an earlier lane's offer may have lowered.
fn offer_lanes(below: u32, values: &[f32; 32], query: usize, first_row: usize, candidates: &mut impl Candidates) {
    let mut lanes = below;
    while lanes != 0 {
        let lane = lanes.trailing_zeros() as usize;
        lanes &= lanes - 1;
        if values[lane] < candidates.bound(query) {
            candidates.offer(query, values[lane], (first_row + lane) as u32);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Candidates, Lanes, Tiles, scan_tiles};

    /// [`super::scan_tiles`] in 8 × 32 tiles, compiled for AVX-512F.
    ///
    /// # Safety
    /// AVX-512F must be available; otherwise as [`super::Fused::scan`].
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scan_avx512(tiles: &Tiles, partial: &mut [f32], candidates: &mut impl Candidates) {
        unsafe { scan_tiles::<__m512, 8>(tiles, partial, candidates) }
    }

    /// [`super::scan_tiles`] in 6 × 16 tiles, compiled for AVX2 and FMA.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; otherwise as [`super::Fused::scan`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scan_avx2(tiles: &Tiles, partial: &mut [f32], candidates: &mut impl Candidates) {
        unsafe { scan_tiles::<__m256, 6>(tiles, partial, candidates) }
    }

    /// Implements [`Lanes`] for one vector type from its intrinsics: the two instruction sets differ only
    /// in the names, and in how a comparison becomes bits.
    macro_rules! lanes {
        ($vector:ty, $width:literal, $zero:ident, $splat:ident, $load:ident, $store:ident, $add:ident,
         $fmadd:ident, $fnmadd:ident, $max:ident, |$value:ident, $bound:ident| $below:expr) => {
            impl Lanes for $vector {
                const WIDTH: usize = $width;
                #[inline(always)]
                unsafe fn zero() -> Self {
                    unsafe { $zero() }
                }
                #[inline(always)]
                unsafe fn splat(value: f32) -> Self {
                    unsafe { $splat(value) }
                }
                #[inline(always)]
                unsafe fn load(at: *const f32) -> Self {
                    unsafe { $load(at) }
                }
                #[inline(always)]
                unsafe fn store(self, at: *mut f32) {
                    unsafe { $store(at, self) }
                }
                #[inline(always)]
                unsafe fn add(self, other: Self) -> Self {
                    unsafe { $add(self, other) }
                }
                #[inline(always)]
                unsafe fn mul_add(self, b: Self, c: Self) -> Self {
                    unsafe { $fmadd(self, b, c) }
                }
                #[inline(always)]
                unsafe fn squared(self, norms: Self) -> Self {
                    // `max` returns its second operand where either is NaN: 0, as `f32::max` does.
                    unsafe { $max($fnmadd($splat(2.0), self, norms), $zero()) }
                }
                #[inline(always)]
                unsafe fn below(self, bound: Self) -> u32 {
                    let ($value, $bound) = (self, bound);
                    unsafe { $below }
                }
            }
        };
    }

    lanes!(
        __m512,
        16,
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_add_ps,
        _mm512_fmadd_ps,
        _mm512_fnmadd_ps,
        _mm512_max_ps,
        |value, bound| u32::from(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(value, bound))
    );
    lanes!(
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_add_ps,
        _mm256_fmadd_ps,
        _mm256_fnmadd_ps,
        _mm256_max_ps,
        |value, bound| _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(value, bound)) as u32
    );

    /// [`super::super::pack_into`] of a bank block in tiles of `NR` rows (a multiple of 8), eight
    /// dimensions of eight rows at a time transposed in registers (8 loads, 24 shuffles, 8 stores); the
    /// last tile's missing rows and the dimensions past the last multiple of 8 as the scalar packing does
    /// them ([`super::super::pack_tiles`]). The scalar packing's `NR` loads and stores per dimension were
    /// a seventh of a d = 1024 search; AVX-512's gathers, which replaced them there, were slower than these
    /// transposes on Zen 4 (medians of five alternations 5–11% slower at four of five `bench kernels`
    /// shapes, level at 20k × 128).
    ///
    /// # Safety
    /// AVX2 must be available.
    #[target_feature(enable = "avx2")]
    pub unsafe fn pack_bank_in_transposes<const NR: usize>(packed: &mut Vec<f32>, values: &[f32], rows: usize, d: usize) {
        super::super::pack_tiles(packed, values, rows, d, NR, |tile, source| {
            let whole = d / 8 * 8;
            for j in (0..whole).step_by(8) {
                for half in 0..NR / 8 {
                    // SAFETY: AVX2 is enabled here (the closure inherits it); `source` holds the tile's
                    // `NR` rows of `d` values, of which these read dimensions `j..j + 8` of rows
                    // `8·half..8·half + 8`, and `tile` holds `d` dimensions of `NR` values.
                    unsafe {
                        let at = |r: usize| _mm256_loadu_ps(source.as_ptr().add((8 * half + r) * d + j));
                        let columns = transpose8(std::array::from_fn(at));
                        for (c, column) in columns.into_iter().enumerate() {
                            _mm256_storeu_ps(tile.as_mut_ptr().add((j + c) * NR + 8 * half), column);
                        }
                    }
                }
            }
            whole
        })
    }

    /// The columns of an 8 × 8 block given by its rows.
    #[inline(always)]
    unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        unsafe {
            let t = [
                _mm256_unpacklo_ps(r[0], r[1]),
                _mm256_unpackhi_ps(r[0], r[1]),
                _mm256_unpacklo_ps(r[2], r[3]),
                _mm256_unpackhi_ps(r[2], r[3]),
                _mm256_unpacklo_ps(r[4], r[5]),
                _mm256_unpackhi_ps(r[4], r[5]),
                _mm256_unpacklo_ps(r[6], r[7]),
                _mm256_unpackhi_ps(r[6], r[7]),
            ];
            let s = [
                _mm256_shuffle_ps::<0x44>(t[0], t[2]),
                _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
                _mm256_shuffle_ps::<0x44>(t[1], t[3]),
                _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
                _mm256_shuffle_ps::<0x44>(t[4], t[6]),
                _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
                _mm256_shuffle_ps::<0x44>(t[5], t[7]),
                _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
            ];
            [
                _mm256_permute2f128_ps::<0x20>(s[0], s[4]),
                _mm256_permute2f128_ps::<0x20>(s[1], s[5]),
                _mm256_permute2f128_ps::<0x20>(s[2], s[6]),
                _mm256_permute2f128_ps::<0x20>(s[3], s[7]),
                _mm256_permute2f128_ps::<0x31>(s[0], s[4]),
                _mm256_permute2f128_ps::<0x31>(s[1], s[5]),
                _mm256_permute2f128_ps::<0x31>(s[2], s[6]),
                _mm256_permute2f128_ps::<0x31>(s[3], s[7]),
            ]
        }
    }
}
