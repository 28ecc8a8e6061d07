// The k smallest entries of every row, with their indices, ties broken by the lower index.
//
// A row is the concatenation of the running best list of the previous bank chunks (`prev` entries,
// already sorted, lower indices than anything in this chunk) and this chunk's `width` distances, so
// calling this once per chunk keeps the k nearest bank rows without ever holding all distances.
//
// One workgroup per row. For k ≤ 256, the k-th smallest of the invocations' own minima bounds the row's
// k-th smallest, and the entries at or below it (about k, on data without a pattern) are collected in a
// second read. Otherwise, or when more than MAX_K are at or below the bound, a radix select on the float
// bits (non-negative floats order like their u32 bits) finds the k-th smallest key in four 8-bit passes,
// and the entries below it, and the first entries equal to it in row order, are collected. A bitonic sort
// orders what was collected by (distance, index). (`nearest`, below, serves k = 1 in one pass.)

struct Params {
    rows: u32,
    width: u32,
    k: u32,
    prev: u32,
    index_offset: u32,
    // Power of two ≥ k: the sort's length.
    capacity: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> distances: array<f32>;     // [rows][width]
@group(0) @binding(2) var<storage, read> prev_values: array<f32>;   // [rows][k]
@group(0) @binding(3) var<storage, read> prev_indices: array<u32>;  // [rows][k]
@group(0) @binding(4) var<storage, read_write> out_values: array<f32>;
@group(0) @binding(5) var<storage, read_write> out_indices: array<u32>;

const THREADS: u32 = 256u;
// Largest k, a power of two ≥ every capacity: set by the host (topk.rs), which refuses larger k.
override MAX_K: u32;
// Padding when a row has fewer than k entries: +inf, and an index past any bank.
const PAD_KEY: u32 = 0x7f800000u;
const PAD_INDEX: u32 = 0xffffffffu;

var<workgroup> histogram: array<atomic<u32>, 256>;
var<workgroup> scan: array<u32, THREADS>;
var<workgroup> keys: array<u32, MAX_K>;
var<workgroup> indices: array<u32, MAX_K>;
var<workgroup> selected: atomic<u32>;
var<workgroup> prefix: u32;
var<workgroup> remaining: u32;
var<workgroup> equal_seen: u32;
// Entries equal to the k-th smallest key (counted by the last radix pass).
var<workgroup> equal_total: u32;

fn key_at(row: u32, position: u32) -> u32 {
    if (position < params.prev) {
        return bitcast<u32>(prev_values[row * params.k + position]);
    }
    // Clamped and sign-cleared, so that -0.0 orders as 0.
    return bitcast<u32>(max(distances[row * params.width + position - params.prev], 0.0)) & 0x7fffffffu;
}

fn index_at(row: u32, position: u32) -> u32 {
    if (position < params.prev) {
        return prev_indices[row * params.k + position];
    }
    return params.index_offset + position - params.prev;
}

// (key, index) lexicographic order.
fn before(key_a: u32, index_a: u32, key_b: u32, index_b: u32) -> bool {
    return key_a < key_b || (key_a == key_b && index_a < index_b);
}

// Sorts (keys, indices)[0 .. length] by (key, index), bitonically; `length` is a power of two, uniform.
fn bitonic_sort(lane: u32, length: u32) {
    for (var size = 2u; size <= length; size <<= 1u) {
        for (var stride = size >> 1u; stride > 0u; stride >>= 1u) {
            for (var i = lane; i < length / 2u; i += THREADS) {
                let low = 2u * stride * (i / stride) + (i % stride);
                let high = low + stride;
                let ascending = (low & size) == 0u;
                let swap = before(keys[high], indices[high], keys[low], indices[low]) == ascending;
                if (swap) {
                    let key = keys[low];
                    keys[low] = keys[high];
                    keys[high] = key;
                    let index = indices[low];
                    indices[low] = indices[high];
                    indices[high] = index;
                }
            }
            workgroupBarrier();
        }
    }
}

@compute @workgroup_size(256)
fn topk(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let row = group.x + group.y * groups.x;
    if (row >= params.rows) {
        return;
    }
    let total = params.prev + params.width;

    if (lane == 0u) {
        prefix = 0u;
        remaining = params.k;
        equal_seen = 0u;
        equal_total = 0u;
        atomicStore(&selected, 0u);
        if (total <= params.k) {
            remaining = total;
        }
    }
    workgroupBarrier();
    let select_all = total <= params.k;

    // Bound (k ≤ THREADS): the k-th smallest of the invocations' own smallest keys is a key of the row
    // with k keys at or below it, so every one of the k smallest is at or below it; and on data without a
    // pattern only about k keys are. Two reads of the row without atomics collect them all, unless more
    // than MAX_K are (then the radix select below starts over).
    var bounded = false;
    if (!select_all && params.k <= THREADS) {
        var least = PAD_KEY;
        for (var position = lane; position < total; position += THREADS) {
            least = min(least, key_at(row, position));
        }
        keys[lane] = least;
        indices[lane] = lane;
        workgroupBarrier();
        bitonic_sort(lane, THREADS);
        let bound = workgroupUniformLoad(&keys[params.k - 1u]);
        for (var position = lane; position < total; position += THREADS) {
            let key = key_at(row, position);
            if (key <= bound) {
                let slot = atomicAdd(&selected, 1u);
                if (slot < MAX_K) {
                    keys[slot] = key;
                    indices[slot] = index_at(row, position);
                }
            }
        }
        workgroupBarrier();
        if (lane == 0u) {
            equal_total = atomicLoad(&selected);
        }
        bounded = workgroupUniformLoad(&equal_total) <= MAX_K;
        if (!bounded && lane == 0u) {
            atomicStore(&selected, 0u);
            equal_total = 0u;
        }
        workgroupBarrier();
    }

    // Radix select: after the four passes, `prefix` is the k-th smallest key and `remaining` the number
    // of entries equal to it that belong to the k smallest. With k or fewer entries, all are taken.
    if (!select_all && !bounded) {
        for (var pass_index = 0u; pass_index < 4u; pass_index++) {
            let shift = 24u - 8u * pass_index;
            let high_mask = select(0u, 0xffffffffu << (shift + 8u), pass_index > 0u);
            atomicStore(&histogram[lane], 0u);
            workgroupBarrier();
            let wanted = workgroupUniformLoad(&prefix);
            for (var position = lane; position < total; position += THREADS) {
                let key = key_at(row, position);
                if ((key & high_mask) == (wanted & high_mask)) {
                    atomicAdd(&histogram[(key >> shift) & 0xffu], 1u);
                }
            }
            workgroupBarrier();
            if (lane == 0u) {
                var below = 0u;
                var digit = 0u;
                loop {
                    let count = atomicLoad(&histogram[digit]);
                    if (below + count >= remaining || digit == 255u) {
                        break;
                    }
                    below += count;
                    digit++;
                }
                remaining -= below;
                prefix = prefix | (digit << shift);
                if (pass_index == 3u) {
                    equal_total = atomicLoad(&histogram[digit]);
                }
            }
            workgroupBarrier();
        }
    }

    // Collect (unless bounded): every key below the threshold, and the first `remaining` keys equal to it
    // in row order. When every equal key is taken (no tie straddles the k-th place), in any order, the
    // sort orders them; otherwise their row order is found with a prefix sum over each block of 256
    // entries (16 barriers a block).
    let threshold = workgroupUniformLoad(&prefix);
    let take_equal = workgroupUniformLoad(&remaining);
    let take_all = select_all || workgroupUniformLoad(&equal_total) == take_equal;
    for (var position = lane; !bounded && take_all && position < total; position += THREADS) {
        let key = key_at(row, position);
        if (key <= threshold || select_all) {
            let slot = atomicAdd(&selected, 1u);
            keys[slot] = key;
            indices[slot] = index_at(row, position);
        }
    }
    for (var base = 0u; !bounded && !take_all && base < total; base += THREADS) {
        let position = base + lane;
        var key = PAD_KEY;
        if (position < total) {
            key = key_at(row, position);
        }
        let is_below = position < total && (key < threshold || select_all);
        let is_equal = position < total && key == threshold && !select_all;
        scan[lane] = u32(is_equal);
        workgroupBarrier();
        for (var offset = 1u; offset < THREADS; offset <<= 1u) {
            var add = 0u;
            if (lane >= offset) {
                add = scan[lane - offset];
            }
            workgroupBarrier();
            scan[lane] += add;
            workgroupBarrier();
        }
        let rank = equal_seen + scan[lane] - u32(is_equal);
        if (is_below || (is_equal && rank < take_equal)) {
            let slot = atomicAdd(&selected, 1u);
            keys[slot] = key;
            indices[slot] = index_at(row, position);
        }
        workgroupBarrier();
        if (lane == 0u) {
            equal_seen += scan[THREADS - 1u];
        }
        workgroupBarrier();
    }

    // Pad to the sort's length (a power of two ≥ k, and ≥ what the bound collected), then bitonic sort
    // by (key, index).
    workgroupBarrier();
    if (lane == 0u) {
        equal_total = atomicLoad(&selected);
    }
    let count = workgroupUniformLoad(&equal_total);
    let length = max(params.capacity, select(1u, 1u << (32u - countLeadingZeros(count - 1u)), count > 1u));
    for (var i = count + lane; i < length; i += THREADS) {
        keys[i] = PAD_KEY;
        indices[i] = PAD_INDEX;
    }
    workgroupBarrier();
    bitonic_sort(lane, length);
    for (var i = lane; i < params.k; i += THREADS) {
        out_values[row * params.k + i] = bitcast<f32>(keys[i]);
        out_indices[row * params.k + i] = indices[i];
    }
}

// k = 1, what PatchCore scores by: the nearest entry of every row (ties to the lower index) in one pass
// without atomics. Each invocation keeps the best of its strided share of the row, then a tree
// reduction in workgroup memory picks the row's. (The radix select above reads the row five times and
// counts every key with a workgroup atomic: on llvmpipe, where each is a loop over SIMD lanes, that is
// most of a k = 1 search's time.)
@compute @workgroup_size(256)
fn nearest(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
           @builtin(local_invocation_index) lane: u32) {
    let row = group.x + group.y * groups.x;
    if (row >= params.rows) {
        return;
    }
    let total = params.prev + params.width;
    var best_key = PAD_KEY;
    var best_index = PAD_INDEX;
    // An invocation's positions, and so its indices, only grow: a strictly smaller key is a better entry.
    for (var position = lane; position < total; position += THREADS) {
        let key = key_at(row, position);
        if (key < best_key) {
            best_key = key;
            best_index = index_at(row, position);
        }
    }
    keep_nearest(row, lane, best_key, best_index);
}

// The row's nearest of the invocations' own (`key`, `index`), by a tree reduction in workgroup memory,
// written as the row's best.
fn keep_nearest(row: u32, lane: u32, key: u32, index: u32) {
    keys[lane] = key;
    indices[lane] = index;
    workgroupBarrier();
    for (var stride = THREADS / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride && before(keys[lane + stride], indices[lane + stride], keys[lane], indices[lane])) {
            keys[lane] = keys[lane + stride];
            indices[lane] = indices[lane + stride];
        }
        workgroupBarrier();
    }
    if (lane == 0u) {
        out_values[row] = bitcast<f32>(keys[0]);
        out_indices[row] = indices[0];
    }
}

// `distance_subgroup.wgsl`'s `nearest_subgroup` output, in place of `distances`: per row, `width` slots
// (a subgroup's bank rows each, in row order) of the nearest one's key and chunk row.
@group(0) @binding(1) var<storage, read> slot_keys: array<u32>;
@group(0) @binding(6) var<storage, read> slot_rows: array<u32>;

// k = 1 from slots: `nearest`, reading each slot's key and row instead of every distance.
@compute @workgroup_size(256)
fn nearest_of_slots(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                    @builtin(local_invocation_index) lane: u32) {
    let row = group.x + group.y * groups.x;
    if (row >= params.rows) {
        return;
    }
    let total = params.prev + params.width;
    var best_key = PAD_KEY;
    var best_index = PAD_INDEX;
    // As in `nearest`, an invocation's indices only grow (the slots' rows do, and the slots past the
    // chunk's end hold +inf keys at rows past it).
    for (var position = lane; position < total; position += THREADS) {
        var key: u32;
        var index: u32;
        if (position < params.prev) {
            key = bitcast<u32>(prev_values[row * params.k + position]);
            index = prev_indices[row * params.k + position];
        } else {
            let at = row * params.width + position - params.prev;
            key = slot_keys[at];
            index = params.index_offset + slot_rows[at];
        }
        if (key < best_key) {
            best_key = key;
            best_index = index;
        }
    }
    keep_nearest(row, lane, best_key, best_index);
}
