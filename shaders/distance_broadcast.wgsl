// Pairwise squared Euclidean distances for adapters that emulate a GPU on the CPU (llvmpipe): there,
// the invocations of a workgroup run as SIMD lanes, storage-buffer reads are costly and uniform-buffer
// reads that all lanes share are nearly free. So a block of query rows (zero-padded to whole vec4s) is
// bound as a uniform buffer, every invocation takes one bank row, and each bank value read serves
// ROWS multiply-adds. Hardware GPUs use the shared-memory tiled kernel in distance.wgsl instead.

struct Params {
    // Query rows in this block (≤ ROWS), bank rows, features, features in vec4s.
    m: u32,
    n: u32,
    d: u32,
    d4: u32,
    // Index of the block's first row among the rows of `distances` and `query_norms`.
    row_offset: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// Query rows per block (16 or 8) and invocations per workgroup, one bank row each: set by the host
// (distance_broadcast.rs), which sizes the blocks and the grid by them.
override ROWS: u32;
override WG: u32;

@group(0) @binding(0) var<uniform> params: Params;
// ROWS rows of d4 vec4s each (64 KiB, the largest uniform binding every device offers; a uniform array
// cannot be sized by an override, so the host checks this length against its block size in a test).
@group(0) @binding(1) var<uniform> queries: array<vec4<f32>, 4096>;
@group(0) @binding(2) var<storage, read> bank: array<f32>;
@group(0) @binding(3) var<storage, read> query_norms: array<f32>;
@group(0) @binding(4) var<storage, read> bank_norms: array<f32>;
@group(0) @binding(5) var<storage, read_write> distances: array<f32>;

@compute @workgroup_size(WG)
fn distance_broadcast(@builtin(workgroup_id) group: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let col = group.x * WG + lane;
    let base = min(col, params.n - 1u) * params.d;
    let last = base + params.d - 1u;
    let d4 = params.d4;
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    var a4 = vec4<f32>(0.0);
    var a5 = vec4<f32>(0.0);
    var a6 = vec4<f32>(0.0);
    var a7 = vec4<f32>(0.0);
    var a8 = vec4<f32>(0.0);
    var a9 = vec4<f32>(0.0);
    var a10 = vec4<f32>(0.0);
    var a11 = vec4<f32>(0.0);
    var a12 = vec4<f32>(0.0);
    var a13 = vec4<f32>(0.0);
    var a14 = vec4<f32>(0.0);
    var a15 = vec4<f32>(0.0);
    for (var k = 0u; k < d4; k++) {
        // Past the row's end (the last, partial vec4) the query padding is zero: any finite value will do.
        let i = base + 4u * k;
        let b = vec4<f32>(bank[min(i, last)], bank[min(i + 1u, last)], bank[min(i + 2u, last)], bank[min(i + 3u, last)]);
        a0 = fma(queries[k], b, a0);
        a1 = fma(queries[d4 + k], b, a1);
        a2 = fma(queries[2u * d4 + k], b, a2);
        a3 = fma(queries[3u * d4 + k], b, a3);
        a4 = fma(queries[4u * d4 + k], b, a4);
        a5 = fma(queries[5u * d4 + k], b, a5);
        a6 = fma(queries[6u * d4 + k], b, a6);
        a7 = fma(queries[7u * d4 + k], b, a7);
        if (ROWS > 8u) {
            a8 = fma(queries[8u * d4 + k], b, a8);
            a9 = fma(queries[9u * d4 + k], b, a9);
            a10 = fma(queries[10u * d4 + k], b, a10);
            a11 = fma(queries[11u * d4 + k], b, a11);
            a12 = fma(queries[12u * d4 + k], b, a12);
            a13 = fma(queries[13u * d4 + k], b, a13);
            a14 = fma(queries[14u * d4 + k], b, a14);
            a15 = fma(queries[15u * d4 + k], b, a15);
        }
    }
    if (col >= params.n) {
        return;
    }
    let ones = vec4<f32>(1.0);
    store(0u, col, dot(a0, ones));
    store(1u, col, dot(a1, ones));
    store(2u, col, dot(a2, ones));
    store(3u, col, dot(a3, ones));
    store(4u, col, dot(a4, ones));
    store(5u, col, dot(a5, ones));
    store(6u, col, dot(a6, ones));
    store(7u, col, dot(a7, ones));
    if (ROWS > 8u) {
        store(8u, col, dot(a8, ones));
        store(9u, col, dot(a9, ones));
        store(10u, col, dot(a10, ones));
        store(11u, col, dot(a11, ones));
        store(12u, col, dot(a12, ones));
        store(13u, col, dot(a13, ones));
        store(14u, col, dot(a14, ones));
        store(15u, col, dot(a15, ones));
    }
}

fn store(i: u32, col: u32, dot_product: f32) {
    if (i < params.m) {
        let row = params.row_offset + i;
        let d2 = query_norms[row] + bank_norms[col] - 2.0 * dot_product;
        distances[row * params.n + col] = max(d2, 0.0);
    }
}
