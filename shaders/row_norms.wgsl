// Squared Euclidean norm of every row of a row-major rows × cols matrix, for ‖q‖² + ‖b‖² − 2 q·b.
// One workgroup per row: its invocations stride along the row (contiguous reads), then reduce.

struct Params {
    rows: u32,
    cols: u32,
    // Workgroups along x; rows past the per-dimension dispatch limit continue along y.
    groups_x: u32,
    // Floats from one row's start to the next (the host's row_stride).
    stride: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> matrix: array<f32>;
@group(0) @binding(2) var<storage, read_write> norms: array<f32>;

const WIDTH: u32 = 64u;
var<workgroup> partial: array<f32, WIDTH>;

@compute @workgroup_size(WIDTH)
fn row_norms(@builtin(workgroup_id) group: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let row = group.x + group.y * params.groups_x;
    var sum = 0.0;
    if (row < params.rows) {
        let base = row * params.stride;
        for (var c = lane; c < params.cols; c += WIDTH) {
            let x = matrix[base + c];
            sum += x * x;
        }
    }
    partial[lane] = sum;
    workgroupBarrier();
    for (var half = WIDTH / 2u; half > 0u; half >>= 1u) {
        if (lane < half) {
            partial[lane] += partial[lane + half];
        }
        workgroupBarrier();
    }
    if (lane == 0u && row < params.rows) {
        norms[row] = partial[0];
    }
}
