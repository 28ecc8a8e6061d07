// Column statistics of a row-major rows × cols f32 matrix, numerically stable:
// `partial_stats` runs Welford's update down one column over a chunk of rows (count, mean, M2);
// `merge_stats` combines the chunks of a column with Chan's parallel formula.
// Values are shifted by the column's first value, so that data far from zero keeps its precision;
// the shift is returned beside the statistics and added back on the host in f64.
// Invocations of a workgroup take neighbouring columns, so each row is read contiguously.

struct Params {
    rows: u32,
    cols: u32,
    rows_per_chunk: u32,
    chunks: u32,
    // Floats from one row's start to the next (the host's row_stride).
    stride: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// Invocations per workgroup, one column each: set by the host (column_stats.rs), which sizes the grid by it.
override WG: u32;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> matrix: array<f32>;
// [chunk][col] → (count, mean − shift, M2, shift)
@group(0) @binding(2) var<storage, read_write> partials: array<vec4<f32>>;
// [col] → (count, mean − shift, M2, shift)
@group(0) @binding(3) var<storage, read_write> merged: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn partial_stats(@builtin(global_invocation_id) id: vec3<u32>) {
    let col = id.x;
    let chunk = id.y;
    if (col >= params.cols || chunk >= params.chunks) {
        return;
    }
    let start = chunk * params.rows_per_chunk;
    let end = min(start + params.rows_per_chunk, params.rows);
    let shift = matrix[col];
    var count = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    for (var row = start; row < end; row++) {
        let x = matrix[row * params.stride + col] - shift;
        count += 1.0;
        let delta = x - mean;
        mean += delta / count;
        m2 += delta * (x - mean);
    }
    partials[chunk * params.cols + col] = vec4<f32>(count, mean, m2, shift);
}

@compute @workgroup_size(WG)
fn merge_stats(@builtin(global_invocation_id) id: vec3<u32>) {
    let col = id.x;
    if (col >= params.cols) {
        return;
    }
    var acc = partials[col];
    for (var chunk = 1u; chunk < params.chunks; chunk++) {
        let other = partials[chunk * params.cols + col];
        let count = acc.x + other.x;
        if (other.x > 0.0) {
            let delta = other.y - acc.y;
            acc = vec4<f32>(
                count,
                acc.y + delta * other.x / count,
                acc.z + other.z + delta * delta * acc.x * other.x / count,
                acc.w,
            );
        }
    }
    merged[col] = acc;
}
