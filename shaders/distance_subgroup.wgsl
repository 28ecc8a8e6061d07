// Pairwise squared Euclidean distances for adapters that emulate a GPU on the CPU (llvmpipe). There
// the invocations of a subgroup are the lanes of one SIMD register, arithmetic is cheap, and every
// read of a storage buffer is a loop over the lanes (Mesa 22's llvmpipe; uniform-buffer reads at
// offsets that vary in a loop take the same path): reads, not multiply-adds, bound a kernel.
//
// So each invocation keeps the sums of QUERIES query rows with BANK_ROWS bank rows (24 sums), and per
// step of SG features reads SG features of each of its bank rows, 4 at a time (a vec4 read costs that
// loop once for 4 values; rows are whole vec4s apart, the host's row_stride), plus a single feature of
// each query row (feature `step + lane`), the 8 rows' values of that feature in two vec4 reads (the
// queries are packed for it first: `pack_queries`); subgroup broadcasts, register shuffles there, hand
// every lane the query values its neighbours read. Each bank value read feeds 8 multiply-adds, each
// query value 3 × SG. Any width: past the last feature the query values are zero, and the bank reads
// stay within the row (its last vec4 holds the row's zero pad).

struct Params {
    // Query rows, bank rows, features.
    m: u32,
    n: u32,
    d: u32,
    // Floats from one row's start to the next in the bank, and features per block of packed queries
    // (the host's row_stride, a multiple of 4).
    stride: u32,
}

// `pack_queries`: rows `first` … `first` + `rows` − 1 of a query matrix chunk, rows `stride` floats apart.
struct PackParams {
    rows: u32,
    first: u32,
    stride: u32,
    _pad: u32,
}

// Invocations per subgroup (4, 8 or 16) and per workgroup (a multiple of SG): set by the host
// (distance_subgroup.rs), which picks this shader only where the subgroup size is fixed at SG.
override SG: u32;
override WG: u32;
// Query rows per workgroup row of the grid, and bank rows per invocation: the host sizes the grid by them.
const QUERIES: u32 = 8u;
const BANK_ROWS: u32 = 3u;

@group(0) @binding(0) var<uniform> params: Params;
// The queries as `pack_queries` wrote them: per block of QUERIES rows, per feature, the rows' values
// (rows 0–3, then 4–7).
@group(0) @binding(1) var<storage, read> queries: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> bank: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> query_norms: array<f32>;
@group(0) @binding(4) var<storage, read> bank_norms: array<f32>;
@group(0) @binding(5) var<storage, read_write> distances: array<f32>;

// Dot products so far: sums_<bank row>_<query rows 0–3 or 4–7>, in registers (module-scope private
// variables, as WGSL functions cannot take them by reference).
var<private> sums_0_lo: vec4<f32>;
var<private> sums_0_hi: vec4<f32>;
var<private> sums_1_lo: vec4<f32>;
var<private> sums_1_hi: vec4<f32>;
var<private> sums_2_lo: vec4<f32>;
var<private> sums_2_hi: vec4<f32>;

// One feature: the 8 query rows' values `lo`, `hi` times the invocation's 3 bank rows' values `b`.
fn add(lo: vec4<f32>, hi: vec4<f32>, b: vec3<f32>) {
    sums_0_lo = fma(lo, vec4<f32>(b.x), sums_0_lo);
    sums_0_hi = fma(hi, vec4<f32>(b.x), sums_0_hi);
    sums_1_lo = fma(lo, vec4<f32>(b.y), sums_1_lo);
    sums_1_hi = fma(hi, vec4<f32>(b.y), sums_1_hi);
    sums_2_lo = fma(lo, vec4<f32>(b.z), sums_2_lo);
    sums_2_hi = fma(hi, vec4<f32>(b.z), sums_2_hi);
}

// Features `feature` … `feature` + 3 (`feature` a multiple of 4) of the invocation's 3 bank rows
// (starting at vec4 `rows`), one vec3 per feature. With `clamp` (the last, partial step) the vec4
// holding the row's last feature stands in past it, so that no read strays into the next row; its
// query values are zero.
fn bank_features(rows: vec3<u32>, feature: u32, clamp: bool) -> array<vec3<f32>, 4> {
    let at = select(feature, min(feature, params.d - 1u), clamp) / 4u;
    let x = bank[rows.x + at];
    let y = bank[rows.y + at];
    let z = bank[rows.z + at];
    return array<vec3<f32>, 4>(vec3<f32>(x.x, y.x, z.x), vec3<f32>(x.y, y.y, z.y), vec3<f32>(x.z, y.z, z.z), vec3<f32>(x.w, y.w, z.w));
}

// Features `step` … `step` + SG − 1: lane j read feature `step` + j of the 8 query rows (`lo`, `hi`);
// subgroupBroadcast takes a constant lane, hence the unrolling.
fn add_step(rows: vec3<u32>, step: u32, lo: vec4<f32>, hi: vec4<f32>, clamp: bool) {
    var b = bank_features(rows, step, clamp);
    add(subgroupBroadcast(lo, 0u), subgroupBroadcast(hi, 0u), b[0]);
    add(subgroupBroadcast(lo, 1u), subgroupBroadcast(hi, 1u), b[1]);
    add(subgroupBroadcast(lo, 2u), subgroupBroadcast(hi, 2u), b[2]);
    add(subgroupBroadcast(lo, 3u), subgroupBroadcast(hi, 3u), b[3]);
    if (SG > 4u) {
        b = bank_features(rows, step + 4u, clamp);
        add(subgroupBroadcast(lo, 4u), subgroupBroadcast(hi, 4u), b[0]);
        add(subgroupBroadcast(lo, 5u), subgroupBroadcast(hi, 5u), b[1]);
        add(subgroupBroadcast(lo, 6u), subgroupBroadcast(hi, 6u), b[2]);
        add(subgroupBroadcast(lo, 7u), subgroupBroadcast(hi, 7u), b[3]);
    }
    if (SG > 8u) {
        b = bank_features(rows, step + 8u, clamp);
        add(subgroupBroadcast(lo, 8u), subgroupBroadcast(hi, 8u), b[0]);
        add(subgroupBroadcast(lo, 9u), subgroupBroadcast(hi, 9u), b[1]);
        add(subgroupBroadcast(lo, 10u), subgroupBroadcast(hi, 10u), b[2]);
        add(subgroupBroadcast(lo, 11u), subgroupBroadcast(hi, 11u), b[3]);
        b = bank_features(rows, step + 12u, clamp);
        add(subgroupBroadcast(lo, 12u), subgroupBroadcast(hi, 12u), b[0]);
        add(subgroupBroadcast(lo, 13u), subgroupBroadcast(hi, 13u), b[1]);
        add(subgroupBroadcast(lo, 14u), subgroupBroadcast(hi, 14u), b[2]);
        add(subgroupBroadcast(lo, 15u), subgroupBroadcast(hi, 15u), b[3]);
    }
}

@compute @workgroup_size(WG)
fn distance_subgroup(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_index) local: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let m = params.m;
    let n = params.n;
    let d = params.d;
    let stride = params.stride;
    // The grid's x runs over the query rows and its y over the bank rows, so that the workgroups that
    // run one after another share their bank rows, which stay in the caches (at 128 features: 47–58 ms
    // against 69–87 ms the other way round, 100 × 32768). Rows past the end are read clamped (every
    // lane takes part in the broadcasts) and not stored.
    let col = (group.y * WG + local) * BANK_ROWS;
    let rows = vec3<u32>(min(col, n - 1u), min(col + 1u, n - 1u), min(col + 2u, n - 1u)) * (stride / 4u);
    let row0 = group.x * QUERIES;
    // The vec4 holding query rows 0–3 of feature `lane` of this block (rows 4–7: the next).
    let queries_at = (group.x * stride + lane) * 2u;
    sums_0_lo = vec4<f32>(0.0);
    sums_0_hi = vec4<f32>(0.0);
    sums_1_lo = vec4<f32>(0.0);
    sums_1_hi = vec4<f32>(0.0);
    sums_2_lo = vec4<f32>(0.0);
    sums_2_hi = vec4<f32>(0.0);
    // Whole steps, then the partial one, whose query values past the last feature are zero.
    var step = 0u;
    for (; step + SG <= d; step += SG) {
        add_step(rows, step, queries[queries_at + 2u * step], queries[queries_at + 2u * step + 1u], false);
    }
    if (step < d) {
        // A lane past the last feature reads the pad or the next block (or, at the buffer's end, what
        // the bounds checks clamp to) and drops it.
        let inside = step + lane < d;
        let lo = queries[queries_at + 2u * step];
        let hi = queries[queries_at + 2u * step + 1u];
        add_step(rows, step, select(vec4<f32>(0.0), lo, inside), select(vec4<f32>(0.0), hi, inside), true);
    }
    // Each norm read once, where the sums are turned into distances.
    let bank_norm = vec3<f32>(bank_norms[min(col, n - 1u)], bank_norms[min(col + 1u, n - 1u)], bank_norms[min(col + 2u, n - 1u)]);
    let norms_lo = vec4<f32>(query_norms[min(row0, m - 1u)], query_norms[min(row0 + 1u, m - 1u)], query_norms[min(row0 + 2u, m - 1u)], query_norms[min(row0 + 3u, m - 1u)]);
    let norms_hi = vec4<f32>(query_norms[min(row0 + 4u, m - 1u)], query_norms[min(row0 + 5u, m - 1u)], query_norms[min(row0 + 6u, m - 1u)], query_norms[min(row0 + 7u, m - 1u)]);
    store(row0, col, norms_lo + bank_norm.x - 2.0 * sums_0_lo);
    store(row0 + 4u, col, norms_hi + bank_norm.x - 2.0 * sums_0_hi);
    store(row0, col + 1u, norms_lo + bank_norm.y - 2.0 * sums_1_lo);
    store(row0 + 4u, col + 1u, norms_hi + bank_norm.y - 2.0 * sums_1_hi);
    store(row0, col + 2u, norms_lo + bank_norm.z - 2.0 * sums_2_lo);
    store(row0 + 4u, col + 2u, norms_hi + bank_norm.z - 2.0 * sums_2_hi);
}

// Squared distances `d2` of query rows `first` … `first` + 3 to bank row `col`, those inside the block.
fn store(first: u32, col: u32, d2: vec4<f32>) {
    if (col >= params.n) {
        return;
    }
    for (var i = 0u; i < 4u; i++) {
        let row = first + i;
        if (row < params.m) {
            distances[row * params.n + col] = max(d2[i], 0.0);
        }
    }
}

// The query matrix chunk `pack_queries` reads, and the packed block it writes: the distance shader's
// bindings 1 and 2 are its own, other variables at the same places (an entry point binds only what it uses).
@group(0) @binding(0) var<uniform> pack: PackParams;
@group(0) @binding(1) var<storage, read> unpacked: array<f32>;
@group(0) @binding(2) var<storage, read_write> packed: array<vec4<f32>>;

// Packs a block of query rows for `distance_subgroup`: feature `id.x` of the 8 rows of block `id.y`,
// as two vec4s, zero for rows past the last. The features past the last are the rows' zero pad.
@compute @workgroup_size(WG)
fn pack_queries(@builtin(global_invocation_id) id: vec3<u32>) {
    let feature = id.x;
    let block = id.y;
    if (feature >= pack.stride) {
        return;
    }
    var values: array<f32, 8>;
    for (var i = 0u; i < QUERIES; i++) {
        let row = block * QUERIES + i;
        values[i] = select(0.0, unpacked[(pack.first + min(row, pack.rows - 1u)) * pack.stride + feature], row < pack.rows);
    }
    let at = (block * pack.stride + feature) * 2u;
    packed[at] = vec4<f32>(values[0], values[1], values[2], values[3]);
    packed[at + 1u] = vec4<f32>(values[4], values[5], values[6], values[7]);
}
