// Pairwise squared Euclidean distances between queries Q (m × d) and bank rows B (n × d), row-major
// with rows `stride` floats apart:
// D[i, j] = ‖q_i‖² + ‖b_j‖² − 2 q_i·b_j, clamped at 0. A tiled matrix product: each workgroup of
// SIDE × SIDE invocations computes a TILE × TILE tile of D, each invocation 4 × 4 outputs in registers,
// staging TILE × SIDE slices of Q and B in workgroup memory.

struct Params {
    m: u32,
    n: u32,
    d: u32,
    // Floats from one row's start to the next, in the queries and the bank (the host's row_stride).
    stride: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> queries: array<f32>;
@group(0) @binding(2) var<storage, read> bank: array<f32>;
@group(0) @binding(3) var<storage, read> query_norms: array<f32>;
@group(0) @binding(4) var<storage, read> bank_norms: array<f32>;
@group(0) @binding(5) var<storage, read_write> distances: array<f32>;

// Invocations per workgroup side, a multiple of 4: set by the host (distance.rs), which sizes the grid
// by it. A tile's side is four times as many rows (one vec4 of outputs per invocation and direction),
// and SIDE features are staged at a time, so that every invocation loads four values of Q and of B.
override SIDE: u32;
override TILE: u32 = 4u * SIDE;

// Transposed slices, [k][row of tile] flattened: queries as scalars, bank rows as groups of four
// neighbours, so that an invocation's 4 × 4 block needs four scalar and one vector read per k.
var<workgroup> q_tile: array<f32, SIDE * TILE>;
var<workgroup> b_tile: array<vec4<f32>, SIDE * SIDE>;

// Invocation (x, y) computes rows y + SIDE · i (i < 4) and columns 4x … 4x + 3 of the tile,
// in four vec4 accumulators (no arrays indexed at run time, which some compilers keep in memory).
@compute @workgroup_size(SIDE, SIDE)
fn distance_tiled(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_id) local: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let row0 = group.y * TILE;
    let col0 = group.x * TILE;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    // Each invocation stages one row of 4 consecutive k values of Q and of B (TILE rows × SIDE k each).
    let load_row = lane / (SIDE / 4u);
    let load_k = (lane % (SIDE / 4u)) * 4u;
    for (var k0 = 0u; k0 < params.d; k0 += SIDE) {
        var q = vec4<f32>(0.0);
        var b = vec4<f32>(0.0);
        for (var t = 0u; t < 4u; t++) {
            let k = k0 + load_k + t;
            if (k < params.d) {
                if (row0 + load_row < params.m) {
                    q[t] = queries[(row0 + load_row) * params.stride + k];
                }
                if (col0 + load_row < params.n) {
                    b[t] = bank[(col0 + load_row) * params.stride + k];
                }
            }
        }
        for (var t = 0u; t < 4u; t++) {
            q_tile[(load_k + t) * TILE + load_row] = q[t];
            b_tile[(load_k + t) * SIDE + load_row / 4u][load_row % 4u] = b[t];
        }
        workgroupBarrier();
        for (var kk = 0u; kk < SIDE; kk++) {
            let bv = b_tile[kk * SIDE + local.x];
            let qi = kk * TILE + local.y;
            acc0 = fma(vec4<f32>(q_tile[qi]), bv, acc0);
            acc1 = fma(vec4<f32>(q_tile[qi + SIDE]), bv, acc1);
            acc2 = fma(vec4<f32>(q_tile[qi + 2u * SIDE]), bv, acc2);
            acc3 = fma(vec4<f32>(q_tile[qi + 3u * SIDE]), bv, acc3);
        }
        workgroupBarrier();
    }
    store_row(row0 + local.y, col0 + 4u * local.x, acc0);
    store_row(row0 + local.y + SIDE, col0 + 4u * local.x, acc1);
    store_row(row0 + local.y + 2u * SIDE, col0 + 4u * local.x, acc2);
    store_row(row0 + local.y + 3u * SIDE, col0 + 4u * local.x, acc3);
}

fn store_row(row: u32, col: u32, dots: vec4<f32>) {
    if (row >= params.m) {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        if (col + j < params.n) {
            let d2 = query_norms[row] + bank_norms[col + j] - 2.0 * dots[j];
            distances[row * params.n + col + j] = max(d2, 0.0);
        }
    }
}

// The straightforward kernel, one invocation per (query, bank row) pair reading both rows from
// memory: kept as the baseline the benchmark measures the tiled kernel against.
@compute @workgroup_size(SIDE, SIDE)
fn distance_naive(@builtin(global_invocation_id) id: vec3<u32>) {
    let row = id.y;
    let col = id.x;
    if (row >= params.m || col >= params.n) {
        return;
    }
    var sum = 0.0;
    for (var k = 0u; k < params.d; k++) {
        let diff = queries[row * params.stride + k] - bank[col * params.stride + k];
        sum = fma(diff, diff, sum);
    }
    distances[row * params.n + col] = sum;
}

