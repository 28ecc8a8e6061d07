// The coreset's `update` for adapters that emulate a GPU on the CPU (llvmpipe), appended to coreset.wgsl
// (its bindings and helpers) when the device has subgroups of a fixed size SG. There every storage read
// is a loop over the SIMD lanes, and `update` reads the centre's coordinate once per dimension beside
// the quads' words. Here each lane of a subgroup reads one coordinate of SG, and subgroup broadcasts
// (register shuffles there) hand it to the others: each point's sum still runs over j = 0, 1, … in order.

// Invocations per subgroup (4, 8 or 16): set by the host (coreset.rs), which builds this entry point
// only where the subgroup size is fixed at SG.
override SG: u32;

// Adds dimension `j` of the words at `base` (`words_base`) to `sums`, unless `j` is past the last
// dimension (a condition the whole subgroup shares).
fn add_dimension(sums: Sums, base: u32, j: u32, c: f32) -> Sums {
    if (j >= params.dims) {
        return sums;
    }
    return add_words(sums, words_at(base, j), c);
}

@compute @workgroup_size(WG)
fn update_subgroup(@builtin(global_invocation_id) id: vec3<u32>, @builtin(workgroup_id) group: vec3<u32>,
                   @builtin(local_invocation_index) lane: u32, @builtin(subgroup_invocation_id) sg_lane: u32) {
    let invocations = (quads() + 3u) / 4u;
    // An invocation past the end reads clamped (every lane takes part in the broadcasts) and stores nothing.
    let t = min(id.x, invocations - 1u);
    let base = words_base(t);
    let zero = vec4<f32>(0.0);
    var sums = Sums(zero, zero, zero, zero);
    for (var step = 0u; step < params.dims; step += SG) {
        // subgroupBroadcast takes a constant lane, hence the unrolling.
        let c = center[min(step + sg_lane, params.dims - 1u)];
        sums = add_dimension(sums, base, step, subgroupBroadcast(c, 0u));
        sums = add_dimension(sums, base, step + 1u, subgroupBroadcast(c, 1u));
        sums = add_dimension(sums, base, step + 2u, subgroupBroadcast(c, 2u));
        sums = add_dimension(sums, base, step + 3u, subgroupBroadcast(c, 3u));
        if (SG > 4u) {
            sums = add_dimension(sums, base, step + 4u, subgroupBroadcast(c, 4u));
            sums = add_dimension(sums, base, step + 5u, subgroupBroadcast(c, 5u));
            sums = add_dimension(sums, base, step + 6u, subgroupBroadcast(c, 6u));
            sums = add_dimension(sums, base, step + 7u, subgroupBroadcast(c, 7u));
        }
        if (SG > 8u) {
            sums = add_dimension(sums, base, step + 8u, subgroupBroadcast(c, 8u));
            sums = add_dimension(sums, base, step + 9u, subgroupBroadcast(c, 9u));
            sums = add_dimension(sums, base, step + 10u, subgroupBroadcast(c, 10u));
            sums = add_dimension(sums, base, step + 11u, subgroupBroadcast(c, 11u));
            sums = add_dimension(sums, base, step + 12u, subgroupBroadcast(c, 12u));
            sums = add_dimension(sums, base, step + 13u, subgroupBroadcast(c, 13u));
            sums = add_dimension(sums, base, step + 14u, subgroupBroadcast(c, 14u));
            sums = add_dimension(sums, base, step + 15u, subgroupBroadcast(c, 15u));
        }
    }
    var best = Best(NONE, NO_INDEX);
    if (id.x < invocations) {
        best = lower_quads(t, sums);
    }
    store_partial(lane, group.x, best);
}
