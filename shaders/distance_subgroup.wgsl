// Pairwise squared Euclidean distances for adapters that emulate a GPU on the CPU (llvmpipe). There
// the invocations of a subgroup are the lanes of one SIMD register, arithmetic is cheap, and every
// read a lane makes on its own costs tens of cycles: a storage-buffer read is a loop over the lanes
// (Mesa 22's llvmpipe; a uniform-buffer read, even at a constant offset, is a per-lane gather of scalar
// loads), a storage-texture read one branch-free gather of the lanes' texels, inline. A
// sampled-texture read (`texture_2d`) is a call to a function that looks up the mip level per lane, and
// the call makes the caller store and reload the sums it keeps in registers: reading the bank from a
// storage texture instead made this shader 1.1–1.2 times faster (README). Reads, not multiply-adds,
// bound it.
//
// So each invocation keeps the sums of QUERIES query rows with BANK_ROWS bank rows (64 sums), and per
// step of SG features reads SG features of each of its bank rows, 4 at a time, from a read-only storage
// texture the host copies each bank chunk into, plus a single feature of each query row (feature
// `step + lane`), the 16 rows' values of that feature in four texel reads from a second one (the
// queries are packed into it first: `pack_queries`); subgroup broadcasts, register shuffles there, hand
// every lane the query values its neighbours read. Each bank value read feeds 16 multiply-adds, each
// query value 4 × SG. Any width: past the last feature the query values are zero, and the bank reads
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

// Features per query row in a packed block: the bank's `stride` rounded up to a multiple of
// FEATURES_MULTIPLE, the largest SG, so that every step of SG features reads inside the block, the
// values past the last feature being zero (`pack_queries`). The host's `packed_features`.
const FEATURES_MULTIPLE: u32 = 16u;
fn packed_features(stride: u32) -> u32 {
    return (stride + FEATURES_MULTIPLE - 1u) / FEATURES_MULTIPLE * FEATURES_MULTIPLE;
}

// Invocations per subgroup (4, 8 or 16) and per workgroup (a multiple of SG): set by the host
// (distance_subgroup.rs), which picks this shader only where the subgroup size is fixed at SG.
override SG: u32;
override WG: u32;
// Both textures are 2^TEXTURE_SHIFT texels wide (set by the host), their texels in a line wrapped at
// that width: texel t lies at (t mod width, t / width). In the bank's, rows are `stride` / 4 texels
// apart one after another.
override TEXTURE_SHIFT: u32;
// Query rows per workgroup row of the grid, and bank rows per invocation: the host sizes the grid by them.
const QUERIES: u32 = 16u;
const BANK_ROWS: u32 = 4u;

@group(0) @binding(0) var<uniform> params: Params;
// The queries as `pack_queries` wrote them, a texel per 4 rows: per block of QUERIES rows, per
// feature, the rows' values (rows 0–3, 4–7, 8–11, then 12–15), zero past the last feature up to
// `packed_features`, and after those their squared norms.
@group(0) @binding(1) var queries: texture_storage_2d<rgba32float, read>;
// The bank chunk, 4 features to a texel (an rgba32float storage texture the host copied the chunk's
// buffer into).
@group(0) @binding(2) var bank: texture_storage_2d<rgba32float, read>;
@group(0) @binding(3) var<storage, read> bank_norms: array<f32>;
@group(0) @binding(4) var<storage, read_write> distances: array<f32>;

// Values of the block's 16 query rows, 4 rows to a vec4: the rows' values of one feature, their squared
// norms, or their dot products with one bank row.
struct QueryRows {
    rows_0_3: vec4<f32>,
    rows_4_7: vec4<f32>,
    rows_8_11: vec4<f32>,
    rows_12_15: vec4<f32>,
}

// Dot products so far of one group of 4 query rows with the invocation's bank rows 0 to 3.
struct GroupSums {
    bank_row_0: vec4<f32>,
    bank_row_1: vec4<f32>,
    bank_row_2: vec4<f32>,
    bank_row_3: vec4<f32>,
}

// The sums of query rows 0–3, 4–7, 8–11 and 12–15 (module-scope private variables, which functions
// take by pointer). A step adds all its features to one group's 16 sums before it turns to the next
// group's, so that the 16 stay in registers through the step: llvmpipe's code runs in the order the
// shader is written, and a feature at a time over all the sums (more than the 32 vector registers)
// kept them on the stack, each multiply-add a load and a store (with 3 bank rows, 373 stores a step
// of 8 features against 53; 1.15 times slower). Four bank rows rather than three give each broadcast
// query value 4 multiply-adds instead of 3: a k = 1 kNN 1.04–1.06 times faster (1000 queries against
// 10,000 × 512 and × 1024 rows, with AVX-512 and, through GALLIUM_OVERRIDE_CPU_CAPS=avx, AVX2 alone).
var<private> sums_0_3: GroupSums;
var<private> sums_4_7: GroupSums;
var<private> sums_8_11: GroupSums;
var<private> sums_12_15: GroupSums;

// The bank values of one step of SG features: entry i of `features_0_3` is feature `step` + i of the
// invocation's 4 bank rows, and so on (those past SG stay zero).
struct StepBank {
    features_0_3: array<vec4<f32>, 4>,
    features_4_7: array<vec4<f32>, 4>,
    features_8_11: array<vec4<f32>, 4>,
    features_12_15: array<vec4<f32>, 4>,
}

// One feature: the group's 4 query values `q` times the 4 bank rows' values `b`, added to `sums`.
fn add_feature(sums: ptr<private, GroupSums>, q: vec4<f32>, b: vec4<f32>) {
    (*sums).bank_row_0 = fma(q, vec4<f32>(b.x), (*sums).bank_row_0);
    (*sums).bank_row_1 = fma(q, vec4<f32>(b.y), (*sums).bank_row_1);
    (*sums).bank_row_2 = fma(q, vec4<f32>(b.z), (*sums).bank_row_2);
    (*sums).bank_row_3 = fma(q, vec4<f32>(b.w), (*sums).bank_row_3);
}

// Where texel `t` lies in either texture.
fn texel_at(t: u32) -> vec2<u32> {
    return vec2<u32>(t & ((1u << TEXTURE_SHIFT) - 1u), t >> TEXTURE_SHIFT);
}

// The texel `t` of the bank chunk.
fn bank_texel(t: u32) -> vec4<f32> {
    return textureLoad(bank, texel_at(t));
}

// Features `feature` … `feature` + 3 (`feature` a multiple of 4) of the invocation's 4 bank rows
// (starting at texels `rows`), one vec4 per feature. Past the row's last feature (in a last, partial
// step) the texel holding that feature stands in, so that no read strays into the next row, whose
// values, were one not finite, the zero query values there would not cancel.
fn bank_features(rows: vec4<u32>, feature: u32) -> array<vec4<f32>, 4> {
    let at = min(feature, params.d - 1u) / 4u;
    let x = bank_texel(rows.x + at);
    let y = bank_texel(rows.y + at);
    let z = bank_texel(rows.z + at);
    let w = bank_texel(rows.w + at);
    return array<vec4<f32>, 4>(vec4<f32>(x.x, y.x, z.x, w.x), vec4<f32>(x.y, y.y, z.y, w.y), vec4<f32>(x.z, y.z, z.z, w.z), vec4<f32>(x.w, y.w, z.w, w.w));
}

// The step's features for one group of 4 query rows: lane j read feature `step` + j of the rows
// (`q`), and subgroup broadcasts hand its values to every lane; subgroupBroadcast takes a constant
// lane, hence the unrolling.
fn add_group(sums: ptr<private, GroupSums>, q: vec4<f32>, b: StepBank) {
    add_feature(sums, subgroupBroadcast(q, 0u), b.features_0_3[0]);
    add_feature(sums, subgroupBroadcast(q, 1u), b.features_0_3[1]);
    add_feature(sums, subgroupBroadcast(q, 2u), b.features_0_3[2]);
    add_feature(sums, subgroupBroadcast(q, 3u), b.features_0_3[3]);
    if (SG > 4u) {
        add_feature(sums, subgroupBroadcast(q, 4u), b.features_4_7[0]);
        add_feature(sums, subgroupBroadcast(q, 5u), b.features_4_7[1]);
        add_feature(sums, subgroupBroadcast(q, 6u), b.features_4_7[2]);
        add_feature(sums, subgroupBroadcast(q, 7u), b.features_4_7[3]);
    }
    if (SG > 8u) {
        add_feature(sums, subgroupBroadcast(q, 8u), b.features_8_11[0]);
        add_feature(sums, subgroupBroadcast(q, 9u), b.features_8_11[1]);
        add_feature(sums, subgroupBroadcast(q, 10u), b.features_8_11[2]);
        add_feature(sums, subgroupBroadcast(q, 11u), b.features_8_11[3]);
        add_feature(sums, subgroupBroadcast(q, 12u), b.features_12_15[0]);
        add_feature(sums, subgroupBroadcast(q, 13u), b.features_12_15[1]);
        add_feature(sums, subgroupBroadcast(q, 14u), b.features_12_15[2]);
        add_feature(sums, subgroupBroadcast(q, 15u), b.features_12_15[3]);
    }
}

// Features `step` … `step` + SG − 1 of the 16 query rows (`q`, lane j's values of feature `step` + j)
// and the invocation's bank rows: every bank read first, then one group of query rows at a time.
fn add_step(rows: vec4<u32>, step: u32, q: QueryRows) {
    var b: StepBank;
    b.features_0_3 = bank_features(rows, step);
    if (SG > 4u) {
        b.features_4_7 = bank_features(rows, step + 4u);
    }
    if (SG > 8u) {
        b.features_8_11 = bank_features(rows, step + 8u);
        b.features_12_15 = bank_features(rows, step + 12u);
    }
    add_group(&sums_0_3, q.rows_0_3, b);
    add_group(&sums_4_7, q.rows_4_7, b);
    add_group(&sums_8_11, q.rows_8_11, b);
    add_group(&sums_12_15, q.rows_12_15, b);
}

// The packed query values of feature `feature` of the block whose feature 0 starts at texel `block_at`.
fn query_values(block_at: u32, feature: u32) -> QueryRows {
    let at = block_at + 4u * feature;
    return QueryRows(textureLoad(queries, texel_at(at)), textureLoad(queries, texel_at(at + 1u)), textureLoad(queries, texel_at(at + 2u)), textureLoad(queries, texel_at(at + 3u)));
}

// The squared distances of the workgroup row's 16 query rows to the invocation's 4 bank rows, one
// QueryRows per bank row, before they are clamped at zero; its first bank row is `bank_column(..)`.
fn block_distances(group: vec3<u32>, local: u32, lane: u32) -> array<QueryRows, 4> {
    let n = params.n;
    let d = params.d;
    let stride = params.stride;
    // The grid's x runs over the query rows and its y over the bank rows, so that the workgroups that
    // run one after another share their bank rows, which stay in the caches (at 128 features: 47–58 ms
    // against 69–87 ms the other way round, 100 × 32768). Rows past the end are read clamped (every
    // lane takes part in the broadcasts) and not stored.
    let col = bank_column(group, local);
    let rows = min(vec4<u32>(col) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(n - 1u)) * (stride / 4u);
    // The first of the 4 texels holding the block's query rows of feature `lane` (`pack_queries`).
    let features = packed_features(stride);
    let block_at = (group.x * (features + 1u) + lane) * 4u;
    let zero = vec4<f32>(0.0);
    sums_0_3 = GroupSums(zero, zero, zero, zero);
    sums_4_7 = sums_0_3;
    sums_8_11 = sums_0_3;
    sums_12_15 = sums_0_3;
    // One loop, its last step partial where SG does not divide d: the query values past the last
    // feature are zero (`pack_queries`) and cancel whatever the bank reads there. A partial step of its
    // own after the loop, as an `if`, cost a whole step's work on every width, since llvmpipe runs an
    // `if`'s body whatever its condition, under a mask (1/16 of the work at 128 features); as a second
    // loop, which llvmpipe leaves when no lane goes on, it cost 2.5% at 1024 features without running.
    // (Written `step < d`, the same loop ran 6% slower at 1024 features.)
    let end = (d + SG - 1u) / SG * SG;
    for (var step = 0u; step + SG <= end; step += SG) {
        add_step(rows, step, query_values(block_at, step));
    }
    // Each norm read once, where the sums are turned into distances: the bank rows' from a storage
    // buffer, a loop over the lanes each, the query rows' as 4 texels.
    let bank_norm = vec4<f32>(bank_norms[min(col, n - 1u)], bank_norms[min(col + 1u, n - 1u)], bank_norms[min(col + 2u, n - 1u)], bank_norms[min(col + 3u, n - 1u)]);
    let norms = query_values(group.x * (features + 1u) * 4u, features);
    return array<QueryRows, 4>(
        distances_to(norms, bank_norm.x, QueryRows(sums_0_3.bank_row_0, sums_4_7.bank_row_0, sums_8_11.bank_row_0, sums_12_15.bank_row_0)),
        distances_to(norms, bank_norm.y, QueryRows(sums_0_3.bank_row_1, sums_4_7.bank_row_1, sums_8_11.bank_row_1, sums_12_15.bank_row_1)),
        distances_to(norms, bank_norm.z, QueryRows(sums_0_3.bank_row_2, sums_4_7.bank_row_2, sums_8_11.bank_row_2, sums_12_15.bank_row_2)),
        distances_to(norms, bank_norm.w, QueryRows(sums_0_3.bank_row_3, sums_4_7.bank_row_3, sums_8_11.bank_row_3, sums_12_15.bank_row_3)),
    );
}

// The invocation's first bank row (of the chunk).
fn bank_column(group: vec3<u32>, local: u32) -> u32 {
    return (group.y * WG + local) * BANK_ROWS;
}

// Squared distances of query rows (squared norms `norms`) to a bank row (squared norm `bank_norm`),
// from their dot products `sums`.
fn distances_to(norms: QueryRows, bank_norm: f32, sums: QueryRows) -> QueryRows {
    return QueryRows(
        norms.rows_0_3 + bank_norm - 2.0 * sums.rows_0_3,
        norms.rows_4_7 + bank_norm - 2.0 * sums.rows_4_7,
        norms.rows_8_11 + bank_norm - 2.0 * sums.rows_8_11,
        norms.rows_12_15 + bank_norm - 2.0 * sums.rows_12_15,
    );
}

@compute @workgroup_size(WG)
fn distance_subgroup(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_index) local: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    store_distances(group, local, block_distances(group, local, lane));
}

// The squared distances of the workgroup row's query rows to the invocation's bank rows (`block`, from
// `block_distances`), those inside the block.
fn store_distances(group: vec3<u32>, local: u32, block: array<QueryRows, 4>) {
    let col = bank_column(group, local);
    let row0 = group.x * QUERIES;
    store_bank_row(row0, col, block[0]);
    store_bank_row(row0, col + 1u, block[1]);
    store_bank_row(row0, col + 2u, block[2]);
    store_bank_row(row0, col + 3u, block[3]);
}

// Squared distances `d2` of the block's query rows (from `row0`) to bank row `col`.
fn store_bank_row(row0: u32, col: u32, d2: QueryRows) {
    store(row0, col, d2.rows_0_3);
    store(row0 + 4u, col, d2.rows_4_7);
    store(row0 + 8u, col, d2.rows_8_11);
    store(row0 + 12u, col, d2.rows_12_15);
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

// k > 1 on llvmpipe: the distances, and per query row of the block, per slot, the least key, which
// `topk.wgsl` bounds the k-th smallest with, so that it reads only the slots whose least key is at or
// below the bound instead of every distance twice (k = 50, 1000 rows of 20,000: 169 against 576 ms
// for the top-k). Past a bank's first chunk, a slot's distances are stored only for the query rows whose
// k-th best so far (the running best's) the slot's least key does not exceed: the others' slots cannot
// hold any of their k nearest, and the top-k reads none of them (`row_key` and the bounds in
// `topk.wgsl`). At 128 features, where a distance is stored for every 128 multiply-adds, that made a
// k = 50 kNN 7–9% faster (1000 × 100k, 100 × 1M).
@group(0) @binding(5) var<storage, read_write> slot_minima: array<u32>;
// Its distances, 4 query rows to a vec4, as `topk.wgsl` reads them with slot minima: query rows 4i … 4i + 3
// to bank row `col` at `i` × n + `col`. On llvmpipe each storage-buffer store is a loop over the lanes,
// and one a row made the stores of a k = 50 kNN nearly a tenth of its time (1000 × 20k × 1024: a median
// 679 against 716 ms for the whole kNN with a vec4 a store).
@group(0) @binding(4) var<storage, read_write> distances_by_4_rows: array<vec4<f32>>;
// The running best the top-k merges the chunk into: its values (squared distances, ascending, k to a
// query row of the block), and whether a chunk was merged into them yet (before that they are stale).
@group(0) @binding(6) var<storage, read> running_values: array<f32>;
@group(0) @binding(7) var<uniform> running: RunningParams;

// `RunningParams` on the host.
struct RunningParams {
    k: u32,
    merged: u32,
    _pad0: u32,
    _pad1: u32,
}

// The key above which query row `row`'s slots need no distances: its k-th best of the chunks merged
// before, or, in the first chunk, a key above every key.
fn running_kth(row: u32) -> u32 {
    if (running.merged == 0u) {
        return 0xffffffffu;
    }
    return bitcast<u32>(running_values[row * running.k + running.k - 1u]);
}

@compute @workgroup_size(WG)
fn distance_minima_subgroup(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) local: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let block = block_distances(group, local, lane);
    let col = bank_column(group, local);
    let least = subgroup_nearest(lanes_nearest(block, col), lane).keys;
    let place = slot_place(group, groups, local);
    // Bit i: the block's query row i needs the slot's distances. Each lane decides for the rows it holds
    // after the reduction, and an OR over the subgroup hands every lane all 16 decisions.
    var needs = 0u;
    for (var j = 0u; j < QUERIES / SG; j++) {
        let row = held_row(group, lane, j);
        if (row < params.m) {
            let key = component(least, j);
            slot_minima[row * place.y + place.x] = key;
            if (key <= running_kth(row)) {
                needs |= 1u << (lane * (QUERIES / SG) + j);
            }
        }
    }
    let needed = subgroupOr(needs);
    for (var b = 0u; b < BANK_ROWS; b++) {
        store_by_4_rows(group.x * QUERIES, col + b, block[b], needed);
    }
}

// Squared distances `d2` of the block's query rows to bank row `col`, 4 rows a store, for rows inside the
// block whose bit in `needed` (row i of the block, bit i) is set or shares its store with one that is;
// past the last row, up to the next multiple of 4, what the clamped reads give.
fn store_by_4_rows(row0: u32, col: u32, d2: QueryRows, needed: u32) {
    if (col >= params.n) {
        return;
    }
    let at = row0 / 4u * params.n + col;
    let groups = (params.m - row0 + 3u) / 4u;
    if (groups > 0u && (needed & 0xfu) != 0u) {
        distances_by_4_rows[at] = max(d2.rows_0_3, vec4<f32>(0.0));
    }
    if (groups > 1u && (needed & 0xf0u) != 0u) {
        distances_by_4_rows[at + params.n] = max(d2.rows_4_7, vec4<f32>(0.0));
    }
    if (groups > 2u && (needed & 0xf00u) != 0u) {
        distances_by_4_rows[at + 2u * params.n] = max(d2.rows_8_11, vec4<f32>(0.0));
    }
    if (groups > 3u && (needed & 0xf000u) != 0u) {
        distances_by_4_rows[at + 3u * params.n] = max(d2.rows_12_15, vec4<f32>(0.0));
    }
}

// The invocation's slot (x), its subgroup's, of the slots per query row (y): one a subgroup, in bank row
// order, as `topk.wgsl` reads them (`SubgroupShader::slots` and `slot_width` on the host).
fn slot_place(group: vec3<u32>, groups: vec3<u32>, local: u32) -> vec2<u32> {
    return vec2<u32>(group.y * (WG / SG) + local / SG, groups.y * (WG / SG));
}

// The k = 1 search's outputs (`nearest_subgroup`), in place of `distances`: per query row of the block,
// per slot (a subgroup's bank rows, in order), the nearest one's key and chunk row.
@group(0) @binding(4) var<storage, read_write> nearest_keys: array<u32>;
@group(0) @binding(5) var<storage, read_write> nearest_rows: array<u32>;

// A key that no distance's passes: +inf's bits.
const INFINITE_KEY: u32 = 0x7f800000u;

// k = 1, what PatchCore scores by, without writing the distances: per query row, each subgroup's
// nearest of its SG × 4 bank rows, the lower row on ties, as `topk.wgsl`'s `nearest_of_slots` merges
// them into the running best. Its keys are the distances' bits after the same clamp at zero as
// `distance_subgroup` stores, with the sign cleared, as `topk.wgsl` orders them, so the merged result
// is the one `nearest` finds in the full distances. On llvmpipe each stored distance was a loop over
// the lanes, and each read in the top-k another: 1/32 of them remain. Each lane stores its own query
// rows' (`subgroup_nearest`), so that a store's loop over the lanes serves all of them.
@compute @workgroup_size(WG)
fn nearest_subgroup(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) local: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let block = block_distances(group, local, lane);
    let found = subgroup_nearest(lanes_nearest(block, bank_column(group, local)), lane);
    let place = slot_place(group, groups, local);
    for (var j = 0u; j < QUERIES / SG; j++) {
        let row = held_row(group, lane, j);
        if (row < params.m) {
            nearest_keys[row * place.y + place.x] = component(found.keys, j);
            nearest_rows[row * place.y + place.x] = component(found.rows, j);
        }
    }
}

// Keys of 4 query rows' squared distances `d2` to bank row `col`: +inf past the chunk's last row.
fn keys_of(d2: vec4<f32>, col: u32) -> vec4<u32> {
    let key = bitcast<vec4<u32>>(max(d2, vec4<f32>(0.0))) & vec4<u32>(0x7fffffffu);
    return select(key, vec4<u32>(INFINITE_KEY), col >= params.n);
}

// A candidate bank row for each of 4 query rows: its keys and its rows.
struct Nearest4 {
    keys: vec4<u32>,
    rows: vec4<u32>,
}

// The nearest of the invocation's 4 bank rows (from `col`, distances `d0` … `d3`) to each of 4 query
// rows, the lower row on ties. A row past the chunk's end has a +inf key and a higher row than every
// row inside, so it never stands in for one.
fn lane_nearest(d0: vec4<f32>, d1: vec4<f32>, d2: vec4<f32>, d3: vec4<f32>, col: u32) -> Nearest4 {
    var key = keys_of(d0, col);
    var row = vec4<u32>(col);
    let key_1 = keys_of(d1, col + 1u);
    let closer_1 = key_1 < key;
    key = select(key, key_1, closer_1);
    row = select(row, vec4<u32>(col + 1u), closer_1);
    let key_2 = keys_of(d2, col + 2u);
    let closer_2 = key_2 < key;
    key = select(key, key_2, closer_2);
    row = select(row, vec4<u32>(col + 2u), closer_2);
    let key_3 = keys_of(d3, col + 3u);
    let closer_3 = key_3 < key;
    key = select(key, key_3, closer_3);
    row = select(row, vec4<u32>(col + 3u), closer_3);
    return Nearest4(key, row);
}

// `lane_nearest` for the block's 16 query rows, a Nearest4 per group of 4 (rows 0–3, 4–7, …), from the
// squared distances to the invocation's bank rows (`block_distances`), the first of them `col`.
fn lanes_nearest(block: array<QueryRows, 4>, col: u32) -> array<Nearest4, 4> {
    return array<Nearest4, 4>(
        lane_nearest(block[0].rows_0_3, block[1].rows_0_3, block[2].rows_0_3, block[3].rows_0_3, col),
        lane_nearest(block[0].rows_4_7, block[1].rows_4_7, block[2].rows_4_7, block[3].rows_4_7, col),
        lane_nearest(block[0].rows_8_11, block[1].rows_8_11, block[2].rows_8_11, block[3].rows_8_11, col),
        lane_nearest(block[0].rows_12_15, block[1].rows_12_15, block[2].rows_12_15, block[3].rows_12_15, col),
    );
}

// One stage of `subgroup_nearest`: lanes `lane` and `lane` ^ `mask` (a power of two below SG) pair up,
// the one with that bit clear keeping the query rows of `low`, the other those of `high`; each hands
// its partner the candidates it does not keep and keeps the nearer of its own and its partner's, the
// lower row on ties.
fn exchange(low: Nearest4, high: Nearest4, mask: u32, lane: u32) -> Nearest4 {
    let upper = (lane & mask) != 0u;
    let kept = Nearest4(select(low.keys, high.keys, upper), select(low.rows, high.rows, upper));
    let keys = subgroupShuffleXor(select(high.keys, low.keys, upper), mask);
    let rows = subgroupShuffleXor(select(high.rows, low.rows, upper), mask);
    let take = (keys < kept.keys) | ((keys == kept.keys) & (rows < kept.rows));
    return Nearest4(select(kept.keys, keys, take), select(kept.rows, rows, take));
}

// The subgroup's nearest bank row to each of the block's 16 query rows, from each lane's (`lanes`, a
// Nearest4 per group of 4 query rows), in a reduction that transposes as it goes: each stage pairs the
// lanes one bit apart, from the highest bit, and halves the candidates a lane holds, so that lane
// `lane` ends holding query rows `lane` × (16 / SG) + j in component j, j < 16 / SG. With SG = 8 that
// is 8 shuffles of a vec4 of keys or rows (register permutations on llvmpipe) where a minimum over the
// lanes for each group of 4 rows, keys then rows, took 64 broadcasts of one.
fn subgroup_nearest(lanes: array<Nearest4, 4>, lane: u32) -> Nearest4 {
    // Rows 0–7 against rows 8–15: a lane keeps rows 0–3 and 4–7, or 8–11 and 12–15; then the first
    // four of those against the second.
    let first_four = exchange(lanes[0], lanes[2], SG / 2u, lane);
    let second_four = exchange(lanes[1], lanes[3], SG / 2u, lane);
    var found = exchange(first_four, second_four, SG / 4u, lane);
    if (SG > 4u) {
        // Components x and y against z and w.
        found = exchange(Nearest4(found.keys.xyxy, found.rows.xyxy), Nearest4(found.keys.zwzw, found.rows.zwzw), SG / 8u, lane);
    }
    if (SG > 8u) {
        found = exchange(Nearest4(found.keys.xxxx, found.rows.xxxx), Nearest4(found.keys.yyyy, found.rows.yyyy), 1u, lane);
    }
    return found;
}

// The query row whose candidate lane `lane` holds in component `j` after `subgroup_nearest`.
fn held_row(group: vec3<u32>, lane: u32, j: u32) -> u32 {
    return group.x * QUERIES + lane * (QUERIES / SG) + j;
}

// Component `j` of `v`, by selects: a per-lane index would go through memory.
fn component(v: vec4<u32>, j: u32) -> u32 {
    return select(select(v.x, v.y, j == 1u), select(v.z, v.w, j == 3u), j >= 2u);
}

// The query matrix chunk `pack_queries` reads, with its rows' squared norms, and the packed block it
// writes: the distance shader's bindings 1 to 3 are its own, other variables at the same places (an
// entry point binds only what it uses).
@group(0) @binding(0) var<uniform> pack: PackParams;
@group(0) @binding(1) var<storage, read> unpacked: array<f32>;
@group(0) @binding(2) var packed: texture_storage_2d<rgba32float, write>;
@group(0) @binding(3) var<storage, read> unpacked_norms: array<f32>;

// Packs a block of query rows for `distance_subgroup`: feature `id.x` of the 16 rows of block `id.y`,
// as four texels, zero for rows past the last and for features past the row's (its zero pad, then up
// to `packed_features`). After a block's features come, as one more, the rows' squared norms, which
// the distance shaders read as 4 texels where from a storage buffer they were 16 loops over the lanes.
@compute @workgroup_size(WG)
fn pack_queries(@builtin(global_invocation_id) id: vec3<u32>) {
    let feature = id.x;
    let block = id.y;
    let features = packed_features(pack.stride);
    if (feature > features) {
        return;
    }
    var values: array<f32, 16>;
    for (var i = 0u; i < QUERIES; i++) {
        let row = block * QUERIES + i;
        let at = pack.first + min(row, pack.rows - 1u);
        let value = select(unpacked[at * pack.stride + min(feature, pack.stride - 1u)], 0.0, feature >= pack.stride);
        values[i] = select(0.0, select(value, unpacked_norms[at], feature == features), row < pack.rows);
    }
    let at = (block * (features + 1u) + feature) * 4u;
    textureStore(packed, texel_at(at), vec4<f32>(values[0], values[1], values[2], values[3]));
    textureStore(packed, texel_at(at + 1u), vec4<f32>(values[4], values[5], values[6], values[7]));
    textureStore(packed, texel_at(at + 2u), vec4<f32>(values[8], values[9], values[10], values[11]));
    textureStore(packed, texel_at(at + 3u), vec4<f32>(values[12], values[13], values[14], values[15]));
}
