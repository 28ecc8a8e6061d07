// The coreset's `update` for adapters that emulate a GPU on the CPU (llvmpipe), appended to coreset.wgsl
// (its bindings and helpers) when the device has subgroups of a fixed size SG. There every storage read
// is a loop over the SIMD lanes, and `update` reads the centre's coordinate once per dimension beside
// the quad's. Here each lane of a subgroup reads one coordinate of SG, and subgroup broadcasts (register
// shuffles there) hand it to the others: each point's sum still runs over j = 0, 1, … in order.

// Invocations per subgroup (4, 8 or 16): set by the host (coreset.rs), which builds this entry point
// only where the subgroup size is fixed at SG.
override SG: u32;

// Adds dimension `j` of the quad at `base` (`quad_base`) to `sum`, unless `j` is past the last dimension
// (a condition the whole subgroup shares).
fn add_dimension(sum: vec4<f32>, base: u32, j: u32, c: f32) -> vec4<f32> {
    if (j >= params.dims) {
        return sum;
    }
    let t = quad_at(base + j * BLOCK) - vec4<f32>(c);
    return sum + t * t;
}

@compute @workgroup_size(WG)
fn update_subgroup(@builtin(global_invocation_id) id: vec3<u32>, @builtin(workgroup_id) group: vec3<u32>,
                   @builtin(local_invocation_index) lane: u32, @builtin(subgroup_invocation_id) sg_lane: u32) {
    let quads = quads();
    // A quad past the end is read clamped (every lane takes part in the broadcasts) and not stored.
    let q = min(id.x, quads - 1u);
    let base = quad_base(q);
    var sum = vec4<f32>(0.0);
    for (var step = 0u; step < params.dims; step += SG) {
        // subgroupBroadcast takes a constant lane, hence the unrolling.
        let c = center[min(step + sg_lane, params.dims - 1u)];
        sum = add_dimension(sum, base, step, subgroupBroadcast(c, 0u));
        sum = add_dimension(sum, base, step + 1u, subgroupBroadcast(c, 1u));
        sum = add_dimension(sum, base, step + 2u, subgroupBroadcast(c, 2u));
        sum = add_dimension(sum, base, step + 3u, subgroupBroadcast(c, 3u));
        if (SG > 4u) {
            sum = add_dimension(sum, base, step + 4u, subgroupBroadcast(c, 4u));
            sum = add_dimension(sum, base, step + 5u, subgroupBroadcast(c, 5u));
            sum = add_dimension(sum, base, step + 6u, subgroupBroadcast(c, 6u));
            sum = add_dimension(sum, base, step + 7u, subgroupBroadcast(c, 7u));
        }
        if (SG > 8u) {
            sum = add_dimension(sum, base, step + 8u, subgroupBroadcast(c, 8u));
            sum = add_dimension(sum, base, step + 9u, subgroupBroadcast(c, 9u));
            sum = add_dimension(sum, base, step + 10u, subgroupBroadcast(c, 10u));
            sum = add_dimension(sum, base, step + 11u, subgroupBroadcast(c, 11u));
            sum = add_dimension(sum, base, step + 12u, subgroupBroadcast(c, 12u));
            sum = add_dimension(sum, base, step + 13u, subgroupBroadcast(c, 13u));
            sum = add_dimension(sum, base, step + 14u, subgroupBroadcast(c, 14u));
            sum = add_dimension(sum, base, step + 15u, subgroupBroadcast(c, 15u));
        }
    }
    var best = Best(NONE, NO_INDEX);
    if (id.x < quads) {
        best = lower_quad(q, sum);
    }
    store_partial(lane, group.x, best);
}
