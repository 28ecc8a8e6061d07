// Pairwise squared Euclidean distances between queries Q (m × d) and bank rows B (n × d), row-major:
// D[i, j] = ‖q_i‖² + ‖b_j‖² − 2 q_i·b_j, clamped at 0. A tiled matrix product: each workgroup computes a
// 64 × 64 tile of D, staging 64 × 16 slices of Q and B in workgroup memory; each of its 16 × 16
// invocations accumulates 4 × 4 outputs in registers.

struct Params {
    m: u32,
    n: u32,
    d: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> queries: array<f32>;
@group(0) @binding(2) var<storage, read> bank: array<f32>;
@group(0) @binding(3) var<storage, read> query_norms: array<f32>;
@group(0) @binding(4) var<storage, read> bank_norms: array<f32>;
@group(0) @binding(5) var<storage, read_write> distances: array<f32>;

const TILE: u32 = 64u;
const DEPTH: u32 = 16u;
const SIDE: u32 = 16u;    // invocations per tile side
const PER: u32 = 4u;      // outputs per invocation per side

// Transposed slices: [k][row of tile], so the inner loop reads a row of each.
var<workgroup> q_tile: array<array<f32, TILE>, DEPTH>;
var<workgroup> b_tile: array<array<f32, TILE>, DEPTH>;

@compute @workgroup_size(16, 16)
fn distance_tiled(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_id) local: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let row0 = group.y * TILE;
    let col0 = group.x * TILE;
    var acc: array<array<f32, PER>, PER>;
    for (var i = 0u; i < PER; i++) {
        for (var j = 0u; j < PER; j++) {
            acc[i][j] = 0.0;
        }
    }
    for (var k0 = 0u; k0 < params.d; k0 += DEPTH) {
        // 256 invocations load 64 × 16 values of each matrix, 4 apiece, 16 consecutive per row.
        for (var e = lane; e < TILE * DEPTH; e += SIDE * SIDE) {
            let r = e / DEPTH;
            let kk = e % DEPTH;
            let k = k0 + kk;
            var q = 0.0;
            if (row0 + r < params.m && k < params.d) {
                q = queries[(row0 + r) * params.d + k];
            }
            q_tile[kk][r] = q;
            var b = 0.0;
            if (col0 + r < params.n && k < params.d) {
                b = bank[(col0 + r) * params.d + k];
            }
            b_tile[kk][r] = b;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < DEPTH; kk++) {
            var a: array<f32, PER>;
            var b: array<f32, PER>;
            for (var i = 0u; i < PER; i++) {
                a[i] = q_tile[kk][local.y + i * SIDE];
                b[i] = b_tile[kk][local.x + i * SIDE];
            }
            for (var i = 0u; i < PER; i++) {
                for (var j = 0u; j < PER; j++) {
                    acc[i][j] = fma(a[i], b[j], acc[i][j]);
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < PER; i++) {
        let row = row0 + local.y + i * SIDE;
        if (row >= params.m) {
            continue;
        }
        for (var j = 0u; j < PER; j++) {
            let col = col0 + local.x + j * SIDE;
            if (col < params.n) {
                let d2 = query_norms[row] + bank_norms[col] - 2.0 * acc[i][j];
                distances[row * params.n + col] = max(d2, 0.0);
            }
        }
    }
}

// The straightforward kernel, one invocation per (query, bank row) pair reading both rows from
// memory: kept as the baseline the benchmark measures the tiled kernel against.
@compute @workgroup_size(16, 16)
fn distance_naive(@builtin(global_invocation_id) id: vec3<u32>) {
    let row = id.y;
    let col = id.x;
    if (row >= params.m || col >= params.n) {
        return;
    }
    var sum = 0.0;
    for (var k = 0u; k < params.d; k++) {
        let diff = queries[row * params.d + k] - bank[col * params.d + k];
        sum = fma(diff, diff, sum);
    }
    distances[row * params.n + col] = sum;
}
