
// ---- topk_slots.wgsl, appended to topk.wgsl (its bindings and helpers) where subgroups have a fixed
// size SG: the slot-bounded top-k with one subgroup a row.
//
// `topk_bounded` gives a row a workgroup of 256 invocations, which llvmpipe runs as 32 SIMD groups in
// turn: its barriers switch between them, its workgroup atomics and workgroup-memory reads are loops
// over the lanes, and the paths no row takes run anyway, masked. Here a row's SG invocations are one
// SIMD group, they hold what they collect in registers, and they share it through subgroup shuffles;
// there is no workgroup memory, no barrier and no atomic but the listing of a row left over.
//
// 1. Each lane keeps the KEPT least of its share of the candidates (the running best's entries and
//    the slots' least keys, as in `select_row`).
// 2. The bound is the k-th least of all lanes' kept candidates, by bisection over the key bits: at
//    least k candidates, distinct entries, lie at or below it, so the k nearest of the row do too.
// 3. A second read of the candidates holds the running best's entries at or below the bound and lists
//    the slots whose least key is.
// 4. Every lane reads every SG-th distance of each listed slot and holds those at or below the bound.
// 5. Each held entry's place is the number of held entries before it in (key, index) order, over all
//    lanes; those placed below k are written.
//
// A row whose bound is not finite (fewer than k finite candidates kept), or whose lanes list more
// than LISTED slots or hold more than HELD entries, is listed for `topk_listed` instead.

override SG: u32;

// Candidates a lane keeps for the bound (two vec4s, ascending), slots it lists and entries it holds
// (four vec4s each). The host takes this path only for k ≤ KEPT × SG (`TopKKernel`).
const KEPT: u32 = 8u;
const LISTED: u32 = 16u;
const HELD: u32 = 16u;

@compute @workgroup_size(SG)
fn topk_slots(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
              @builtin(subgroup_invocation_id) lane: u32) {
    let row = group.x + group.y * groups.x;
    if (row >= params.rows) {
        return;
    }
    if (!select_by_slots(row, lane) && lane == 0u) {
        listing.rows[atomicAdd(&listing.count, 1u)] = row;
    }
}

// The sum of `v` over the subgroup's lanes, every lane getting it.
fn lanes_sum(v: u32) -> u32 {
    var sum = 0u;
    for (var j = 0u; j < SG; j++) {
        sum += subgroupShuffle(v, j);
    }
    return sum;
}

// The largest `v` of the subgroup's lanes, every lane getting it.
fn lanes_max(v: u32) -> u32 {
    var largest = 0u;
    for (var j = 0u; j < SG; j++) {
        largest = max(largest, subgroupShuffle(v, j));
    }
    return largest;
}

// Inserts `key` into the ascending `kept`; returns the largest of the five, which drops out.
fn insert_sorted(kept: ptr<function, vec4<u32>>, key: u32) -> u32 {
    let v = *kept;
    var carry = key;
    let x = min(v.x, carry);
    carry = max(v.x, carry);
    let y = min(v.y, carry);
    carry = max(v.y, carry);
    let z = min(v.z, carry);
    carry = max(v.z, carry);
    *kept = vec4<u32>(x, y, z, min(v.w, carry));
    return max(v.w, carry);
}

// How many of the lane's kept candidates (`low`, `high`) are at or below `bound`.
fn kept_at_or_below(low: vec4<u32>, high: vec4<u32>, bound: u32) -> u32 {
    let counts = select(vec4<u32>(0u), vec4<u32>(1u), low <= vec4<u32>(bound)) + select(vec4<u32>(0u), vec4<u32>(1u), high <= vec4<u32>(bound));
    return counts.x + counts.y + counts.z + counts.w;
}

// 16 values in four vec4s, the registers a lane lists slots and holds entries in.
struct Sixteen {
    v0: vec4<u32>,
    v1: vec4<u32>,
    v2: vec4<u32>,
    v3: vec4<u32>,
}

// `values` with `value` at place `at` (0 … 15), by selects: a per-lane index would go through memory.
fn put(values: Sixteen, at: u32, value: u32) -> Sixteen {
    let place = vec4<u32>(at);
    let v = vec4<u32>(value);
    return Sixteen(
        select(values.v0, v, place == vec4<u32>(0u, 1u, 2u, 3u)),
        select(values.v1, v, place == vec4<u32>(4u, 5u, 6u, 7u)),
        select(values.v2, v, place == vec4<u32>(8u, 9u, 10u, 11u)),
        select(values.v3, v, place == vec4<u32>(12u, 13u, 14u, 15u)),
    );
}

// The value at place `at` (0 … 15) of `values`, by selects.
fn value_at(values: Sixteen, at: u32) -> u32 {
    let four = select(select(values.v0, values.v1, at >= 4u), select(values.v2, values.v3, at >= 12u), at >= 8u);
    let i = at % 4u;
    return select(select(four.x, four.y, i == 1u), select(four.z, four.w, i == 3u), i >= 2u);
}

// One place per held entry of one vec4 (`keys`, `indices`): how many of the other entries
// (`other_key`, `other_index`, one of another lane's or this lane's) come before it.
fn before_count(keys: vec4<u32>, indices: vec4<u32>, other_key: u32, other_index: u32) -> vec4<u32> {
    let key = vec4<u32>(other_key);
    let earlier = (key < keys) | ((key == keys) & (vec4<u32>(other_index) < indices));
    return select(vec4<u32>(0u), vec4<u32>(1u), earlier);
}

// The k smallest entries of `row` merged into the output; false (nothing written) where the row is
// left to `topk_listed`.
fn select_by_slots(row: u32, lane: u32) -> bool {
    let candidates = params.prev + params.slots;
    let k = params.k;

    // 1. The lane's KEPT least candidates, ascending (+inf where it has fewer).
    var low = vec4<u32>(PAD_KEY);
    var high = vec4<u32>(PAD_KEY);
    for (var c = lane; c < candidates; c += SG) {
        let key = candidate_key(row, c);
        if (key < high.w) {
            _ = insert_sorted(&high, insert_sorted(&low, key));
        }
    }

    // 2. The bound: the least key with k kept candidates at or below it, found bit by bit.
    if (lanes_sum(kept_at_or_below(low, high, PAD_KEY - 1u)) < k) {
        return false;
    }
    var bound = 0u;
    for (var bit = 1u << 30u; bit > 0u; bit >>= 1u) {
        // Below `bound` + `bit` lie fewer than k: the k-th least is at or above it.
        if (lanes_sum(kept_at_or_below(low, high, bound + bit - 1u)) < k) {
            bound += bit;
        }
    }

    // 3. The candidates at or below the bound: running-best entries held, slots listed.
    var keys = Sixteen(vec4<u32>(PAD_KEY), vec4<u32>(PAD_KEY), vec4<u32>(PAD_KEY), vec4<u32>(PAD_KEY));
    var indices = Sixteen(vec4<u32>(PAD_INDEX), vec4<u32>(PAD_INDEX), vec4<u32>(PAD_INDEX), vec4<u32>(PAD_INDEX));
    var held = 0u;
    var listed = keys;
    var listed_count = 0u;
    for (var c = lane; c < candidates; c += SG) {
        let key = candidate_key(row, c);
        if (key <= bound) {
            if (c < params.prev) {
                keys = put(keys, held, key);
                indices = put(indices, held, prev_indices[row * k + c]);
                held++;
            } else {
                listed = put(listed, listed_count, c - params.prev);
                listed_count++;
            }
        }
    }
    if (lanes_max(listed_count) > LISTED) {
        return false;
    }

    // 4. The listed slots' entries at or below the bound, every lane reading every SG-th of a slot.
    for (var j = 0u; j < SG; j++) {
        let count = subgroupShuffle(listed_count, j);
        for (var i = 0u; i < count; i++) {
            let first = subgroupShuffle(value_at(listed, i), j) * params.slot_width;
            let end = min(first + params.slot_width, params.width);
            for (var column = first + lane; column < end; column += SG) {
                let key = key_at(row, params.prev + column);
                if (key <= bound) {
                    keys = put(keys, held, key);
                    indices = put(indices, held, params.index_offset + column);
                    held++;
                }
            }
        }
    }
    let most = lanes_max(held);
    if (most > HELD) {
        return false;
    }

    // 5. Places: every held entry of every lane (`most` a lane at most, the rest padding, which comes
    // after every entry) counted against the lane's own.
    var places = Sixteen(vec4<u32>(0u), vec4<u32>(0u), vec4<u32>(0u), vec4<u32>(0u));
    for (var j = 0u; j < SG; j++) {
        for (var i = 0u; i < most; i++) {
            let other_key = subgroupShuffle(value_at(keys, i), j);
            let other_index = subgroupShuffle(value_at(indices, i), j);
            places.v0 += before_count(keys.v0, indices.v0, other_key, other_index);
            if (most > 4u) {
                places.v1 += before_count(keys.v1, indices.v1, other_key, other_index);
            }
            if (most > 8u) {
                places.v2 += before_count(keys.v2, indices.v2, other_key, other_index);
                places.v3 += before_count(keys.v3, indices.v3, other_key, other_index);
            }
        }
    }
    for (var i = 0u; i < held; i++) {
        let place = value_at(places, i);
        if (place < k) {
            out_values[row * k + place] = bitcast<f32>(value_at(keys, i));
            out_indices[row * k + place] = value_at(indices, i);
        }
    }
    return true;
}
