// Copies the selected columns of a row-major rows × cols matrix into a rows × selected matrix,
// in the order given (the memory bank keeps the columns of highest std-dev).

struct Params {
    rows: u32,
    // Floats from one row's start to the next in `matrix` and in `gathered` (the host's row_stride).
    stride: u32,
    selected: u32,
    gathered_stride: u32,
}

// Invocations per workgroup, one selected column each: set by the host (gather_columns.rs).
override WG: u32;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> matrix: array<f32>;
@group(0) @binding(2) var<storage, read> columns: array<u32>;
@group(0) @binding(3) var<storage, read_write> gathered: array<f32>;

@compute @workgroup_size(WG)
fn gather_columns(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let j = id.x;
    if (j >= params.selected) {
        return;
    }
    let col = columns[j];
    // Rows past the dispatch limit are covered by striding over the grid's y extent.
    for (var row = id.y; row < params.rows; row += groups.y) {
        gathered[row * params.gathered_stride + j] = matrix[row * params.stride + col];
    }
}
