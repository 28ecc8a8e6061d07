// The k smallest entries of every row, with their indices, ties broken by the lower index.
//
// A row is the concatenation of the running best list of the previous bank chunks (`prev` entries,
// already sorted, lower indices than anything in this chunk) and this chunk's `width` distances, so
// calling this once per chunk keeps the k nearest bank rows without ever holding all distances.
//
// One workgroup per row. For k ≤ 256, the invocations' own minima bound the row's k-th smallest (a
// histogram of them gives the bound in two barriers), and the entries at or below it (little more than
// k, on data without a pattern) are collected in a second read. With slot minima from the subgroup
// distance shader (the least of each run of 32 distances or so; `SLOTTED`), the invocations take their
// minima over those instead, and only the runs whose minimum is at or below the bound are read.
// Otherwise, or when more than MAX_K are at or below the bound, a radix select on the float bits
// (non-negative floats order like their u32 bits) finds the k-th smallest key in four 8-bit passes, and
// the entries below it, and the first entries equal to it in row order, are collected. Up to 256
// collected entries each count the ones before them in (distance, index) order, which is their place in
// the output; more are sorted bitonically. (`nearest`, below, serves k = 1 in one pass.) Barriers are
// what this avoids: on llvmpipe each one switches between the workgroup's 32 SIMD groups, and the
// bitonic sorts it used instead (of the 256 minima for the bound, 36 barriers, and of the collected
// entries) took nearly half of a k = 50 top-k's time (1000 rows of 20,000: 574 of 1243 ms).

struct Params {
    rows: u32,
    width: u32,
    k: u32,
    prev: u32,
    index_offset: u32,
    // Slot minima (binding 6) per row, and distances per slot: 0 without them.
    slots: u32,
    slot_width: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
// [rows][width], or with slot minima [rows / 4][width][4] (rows rounded up to 4).
@group(0) @binding(1) var<storage, read> distances: array<f32>;
@group(0) @binding(2) var<storage, read> prev_values: array<f32>;   // [rows][k]
@group(0) @binding(3) var<storage, read> prev_indices: array<u32>;  // [rows][k]
@group(0) @binding(4) var<storage, read_write> out_values: array<f32>;
@group(0) @binding(5) var<storage, read_write> out_indices: array<u32>;
// With `slot_width` > 0, the least key of each slot of `slot_width` consecutive distances of a row
// (`distance_subgroup.wgsl`'s `distance_minima_subgroup`): [rows][slots]. Otherwise not read (the host
// binds the distances again).
@group(0) @binding(6) var<storage, read> slot_minima: array<u32>;

const THREADS: u32 = 256u;
// Most entries a row may collect, a power of two ≥ k: set by the host (topk.rs), which refuses larger k.
override MAX_K: u32;
// Whether `topk` bounds with slot minima (binding 6), which come with distances stored 4 rows to a
// vec4: set by the host, one pipeline each way, so that neither pays for the other's branches (on
// llvmpipe a branch's body runs masked, atomics and all). `nearest` reads rows of plain distances.
override SLOTTED: bool = false;
// Most slots a row lists: none without slot minima, so that the plain pipeline's workgroup memory stays
// what it was (on a GPU, more workgroups fit a core).
override SLOT_LIST: u32 = select(1u, MAX_K, SLOTTED);
// Most collected entries ordered by counting (each compares itself with all of them); more are sorted.
const RANKED: u32 = 256u;
// Padding when a row has fewer than k entries: +inf, and an index past any bank.
const PAD_KEY: u32 = 0x7f800000u;
const PAD_INDEX: u32 = 0xffffffffu;

var<workgroup> histogram: array<atomic<u32>, 256>;
var<workgroup> scan: array<u32, THREADS>;
var<workgroup> keys: array<u32, MAX_K>;
var<workgroup> indices: array<u32, MAX_K>;
var<workgroup> selected: atomic<u32>;
// The slots whose minimum is at or below the bound, in `slot_list`.
var<workgroup> listed: atomic<u32>;
var<workgroup> slot_list: array<u32, SLOT_LIST>;
var<workgroup> least_of_all: atomic<u32>;
var<workgroup> largest_least: atomic<u32>;
var<workgroup> prefix: u32;
// The bound's key (k ≤ THREADS): every key at or below it is collected.
var<workgroup> bound_key: u32;
var<workgroup> remaining: u32;
var<workgroup> equal_seen: u32;
// Entries equal to the k-th smallest key (counted by the last radix pass).
var<workgroup> equal_total: u32;

fn key_at(row: u32, position: u32) -> u32 {
    if (position < params.prev) {
        return bitcast<u32>(prev_values[row * params.k + position]);
    }
    // With slot minima the distances lie 4 rows to a vec4 (`distance_minima_subgroup`). Clamped and
    // sign-cleared, so that -0.0 orders as 0.
    let column = position - params.prev;
    let at = select(row * params.width + column, (row / 4u * params.width + column) * 4u + row % 4u, SLOTTED);
    return bitcast<u32>(max(distances[at], 0.0)) & 0x7fffffffu;
}

// The running best's k-th key with slot minima past the first chunk; elsewhere a key above every key.
fn running_kth(row: u32) -> u32 {
    if (SLOTTED && params.prev > 0u) {
        return bitcast<u32>(prev_values[row * params.k + params.k - 1u]);
    }
    return 0xffffffffu;
}

// `key_at` for the passes that read a whole row (the radix select and the collections after it). With
// slot minima, past the first chunk, an entry of a slot whose least key is above the running best's
// k-th is padding: `distance_minima_subgroup` stores no distance of such a slot, so its place holds an
// earlier chunk's, and none of its entries could be among the k smallest, each being above k entries
// of the running best. The bounded passes read only slots at or below their bound, which is never
// above that k-th (`topk_slots`' holds at least k running entries; `select_row`'s is clamped to it).
fn row_key(row: u32, position: u32) -> u32 {
    if (SLOTTED && position >= params.prev && slot_minima[row * params.slots + (position - params.prev) / params.slot_width] > running_kth(row)) {
        return PAD_KEY;
    }
    return key_at(row, position);
}

fn index_at(row: u32, position: u32) -> u32 {
    if (position < params.prev) {
        return prev_indices[row * params.k + position];
    }
    return params.index_offset + position - params.prev;
}

// The key of a candidate for the bound: an entry of the row, or with slot minima past the running
// best's entries, a slot's least key.
fn candidate_key(row: u32, position: u32) -> u32 {
    if (!SLOTTED || position < params.prev) {
        return key_at(row, position);
    }
    return slot_minima[row * params.slots + position - params.prev];
}

// (key, index) lexicographic order.
fn before(key_a: u32, index_a: u32, key_b: u32, index_b: u32) -> bool {
    return key_a < key_b || (key_a == key_b && index_a < index_b);
}

// Adds an entry to the collected ones, if there is room: the radix select collects exactly k, the bound
// may collect more than MAX_K, and the radix select then takes over.
fn collect(key: u32, index: u32) {
    let slot = atomicAdd(&selected, 1u);
    if (slot < MAX_K) {
        keys[slot] = key;
        indices[slot] = index;
    }
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

// Invocations that read consecutive entries: the row is split into one contiguous segment per SPAN
// invocations, which read it SPAN entries at a time. On llvmpipe, where 8 invocations are one SIMD
// group, each group then streams through its segment instead of striding across the whole row (the first
// read of a k = 50 search: 142 against 238 ms, 1000 rows of 20,000); a GPU reads whole 32-byte sectors
// either way.
const SPAN: u32 = 8u;

// The positions `lane` reads of a row of `total` entries: from `x` in steps of SPAN below `y`. They only
// grow, so an invocation meets its entries in index order.
fn lane_positions(lane: u32, total: u32) -> vec2<u32> {
    let segment = ((total + THREADS / SPAN - 1u) / (THREADS / SPAN) + SPAN - 1u) / SPAN * SPAN;
    let start = (lane / SPAN) * segment;
    return vec2(start + lane % SPAN, min(start + segment, total));
}

@compute @workgroup_size(256)
fn topk(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let row = group.x + group.y * groups.x;
    if (row >= params.rows) {
        return;
    }
    select_row(row, lane);
}

// With slot minima, the top-k in two passes: `topk_bounded` (built with `BOUNDED_ONLY`, which drops the
// other paths) finishes every row whose bound collects at most RANKED entries (on data without a
// pattern, all of them) and lists the others, which `topk_listed`, dispatched indirectly over the list
// alone, finishes by the paths left out: the radix select, the bitonic sort, rows of k entries or
// fewer. On llvmpipe the paths a workgroup does not take run anyway, masked, barriers and all: in one
// pass they took about a third of a k = 50 top-k's time. Where subgroups have a fixed size, the first
// pass for k up to 8 subgroups' worth is `topk_slots` (topk_slots.wgsl), a subgroup a row.
override BOUNDED_ONLY: bool = false;

// The rows `topk_bounded` leaves, as `topk_listed`'s indirect dispatch reads them: a workgroup per row.
struct Listing {
    count: atomic<u32>,
    groups_y: u32,
    groups_z: u32,
    rows: array<u32>,
}
@group(0) @binding(7) var<storage, read_write> listing: Listing;

@compute @workgroup_size(256)
fn topk_bounded(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                @builtin(local_invocation_index) lane: u32) {
    let row = group.x + group.y * groups.x;
    if (row >= params.rows) {
        return;
    }
    let finished = select_row(row, lane);
    if (!finished && lane == 0u) {
        listing.rows[atomicAdd(&listing.count, 1u)] = row;
    }
}

// `Listing` read back: the count is the dispatch's workgroups.
struct Listed {
    count: u32,
    groups_y: u32,
    groups_z: u32,
    rows: array<u32>,
}
@group(0) @binding(7) var<storage, read> listed_rows: Listed;

@compute @workgroup_size(256)
fn topk_listed(@builtin(workgroup_id) group: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    select_row(listed_rows.rows[group.x], lane);
}

// The k smallest entries of `row` merged into the output; with `BOUNDED_ONLY`, false (and nothing
// written) where the bound does not serve.
fn select_row(row: u32, lane: u32) -> bool {
    let total = params.prev + params.width;
    let share = lane_positions(lane, total);

    if (lane == 0u) {
        prefix = 0u;
        remaining = params.k;
        equal_seen = 0u;
        equal_total = 0u;
        atomicStore(&selected, 0u);
        atomicStore(&listed, 0u);
        atomicStore(&least_of_all, PAD_KEY);
        atomicStore(&largest_least, 0u);
        if (total <= params.k) {
            remaining = total;
        }
    }
    atomicStore(&histogram[lane], 0u);
    workgroupBarrier();
    let select_all = total <= params.k;

    // Bound (k ≤ THREADS): the invocations' own smallest keys, binned between the least and the largest
    // of them; every key up to the end of the bin that holds the k-th smallest has k keys at or below it
    // (those smallest keys), so the k smallest of the row are among them, and on data without a pattern
    // little more than k are. Two reads of the row collect them all, unless more than MAX_K are (then the
    // radix select below starts over).
    //
    // With slot minima the candidates are the running best's entries and the slots' least keys: the
    // bound is as valid (the invocations' minima are still distinct entries), the first read is 1/32
    // as long, and of the row's distances only the slots whose least key is at or below the bound are
    // read (on data without a pattern about as many as k), by all invocations side by side.
    let candidates = select(total, params.prev + params.slots, SLOTTED);
    let candidate_share = lane_positions(lane, candidates);
    var bounded = false;
    var collected = 0u;
    if (!select_all && params.k <= THREADS) {
        var least = PAD_KEY;
        for (var position = candidate_share.x; position < candidate_share.y; position += SPAN) {
            least = min(least, candidate_key(row, position));
        }
        // Only finite minima: an invocation whose candidates are all padding (+inf; past a chunk's last
        // slot, or a running best of fewer than k rows) would stretch the bins over the whole float range.
        let has_least = least < PAD_KEY;
        if (has_least) {
            atomicMin(&least_of_all, least);
            atomicMax(&largest_least, least);
        }
        workgroupBarrier();
        let low = atomicLoad(&least_of_all);
        let width = atomicLoad(&largest_least) - low;
        let shift = select(0u, 32u - countLeadingZeros(width) - 8u, width >= 256u);
        if (has_least) {
            atomicAdd(&histogram[(least - low) >> shift], 1u);
        }
        workgroupBarrier();
        if (lane == 0u) {
            var seen = 0u;
            var bin = 0u;
            loop {
                seen += atomicLoad(&histogram[bin]);
                if (seen >= params.k || bin == 255u) {
                    break;
                }
                bin++;
            }
            // Fewer than k invocations hold entries (a short row): their minima bound nothing, so every
            // entry is collected.
            bound_key = select(0xffffffffu, low + ((bin + 1u) << shift) - 1u, seen >= params.k);
        }
        // Past the first chunk, never above the running best's k-th (it has k entries at or below
        // it), so that no slot whose distances `distance_minima_subgroup` left unstored is read (see
        // `row_key`): the bins can reach past it.
        let bound = min(workgroupUniformLoad(&bound_key), running_kth(row));
        for (var position = candidate_share.x; position < candidate_share.y; position += SPAN) {
            let key = candidate_key(row, position);
            if (key <= bound) {
                if (SLOTTED && position >= params.prev) {
                    let listing = atomicAdd(&listed, 1u);
                    if (listing < SLOT_LIST) {
                        slot_list[listing] = position - params.prev;
                    } else {
                        // Unlisted, but its least entry counts: more than MAX_K are then collected.
                        atomicAdd(&selected, 1u);
                    }
                } else {
                    collect(key, index_at(row, position));
                }
            }
        }
        if (SLOTTED) {
            workgroupBarrier();
            let slot_entries = min(atomicLoad(&listed), SLOT_LIST) * params.slot_width;
            for (var entry = lane; entry < slot_entries; entry += THREADS) {
                let column = slot_list[entry / params.slot_width] * params.slot_width + entry % params.slot_width;
                if (column < params.width) {
                    let key = key_at(row, params.prev + column);
                    if (key <= bound) {
                        collect(key, params.index_offset + column);
                    }
                }
            }
        }
        workgroupBarrier();
        if (lane == 0u) {
            equal_total = atomicLoad(&selected);
        }
        collected = workgroupUniformLoad(&equal_total);
        bounded = collected <= MAX_K;
        if (!bounded && lane == 0u) {
            atomicStore(&selected, 0u);
            equal_total = 0u;
        }
        workgroupBarrier();
    }

    if (BOUNDED_ONLY && (select_all || !bounded || collected > RANKED)) {
        return false;
    }

    // Radix select: after the four passes, `prefix` is the k-th smallest key and `remaining` the number
    // of entries equal to it that belong to the k smallest. With k or fewer entries, all are taken.
    if (!BOUNDED_ONLY && !select_all && !bounded) {
        for (var pass_index = 0u; pass_index < 4u; pass_index++) {
            let shift = 24u - 8u * pass_index;
            let high_mask = select(0u, 0xffffffffu << (shift + 8u), pass_index > 0u);
            atomicStore(&histogram[lane], 0u);
            workgroupBarrier();
            let wanted = workgroupUniformLoad(&prefix);
            for (var position = share.x; position < share.y; position += SPAN) {
                let key = row_key(row, position);
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
    if (!BOUNDED_ONLY) {
        let threshold = workgroupUniformLoad(&prefix);
        let take_equal = workgroupUniformLoad(&remaining);
        let take_all = select_all || workgroupUniformLoad(&equal_total) == take_equal;
        for (var position = share.x; !bounded && take_all && position < share.y; position += SPAN) {
            let key = row_key(row, position);
            if (key <= threshold || select_all) {
                collect(key, index_at(row, position));
            }
        }
        for (var base = 0u; !bounded && !take_all && base < total; base += THREADS) {
            let position = base + lane;
            var key = PAD_KEY;
            if (position < total) {
                key = row_key(row, position);
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
                collect(key, index_at(row, position));
            }
            workgroupBarrier();
            if (lane == 0u) {
                equal_seen += scan[THREADS - 1u];
            }
            workgroupBarrier();
        }
    }

    // Ordered by (key, index) into the output: up to RANKED entries each by its place, the number of
    // collected entries before it, in one barrier; more by a bitonic sort. Entries differ in their index
    // but for padding (+inf past any bank, from a running best of fewer than k rows), whose copies are
    // placed in the order they were collected.
    workgroupBarrier();
    if (lane == 0u) {
        equal_total = atomicLoad(&selected);
    }
    let count = workgroupUniformLoad(&equal_total);
    if (BOUNDED_ONLY || count <= RANKED) {
        for (var entry = lane; entry < count; entry += THREADS) {
            let key = keys[entry];
            let index = indices[entry];
            var place = 0u;
            for (var other = 0u; other < count; other++) {
                // Each read once: on llvmpipe every workgroup-memory read is a loop over the lanes, and
                // repeated ones are not merged (k = 50, 1000 × 10,000 × 512: 203 against 204 ms a call).
                let other_key = keys[other];
                let other_index = indices[other];
                let same = other_key == key && other_index == index;
                place += u32(before(other_key, other_index, key, index) || (same && other < entry));
            }
            if (place < params.k) {
                out_values[row * params.k + place] = bitcast<f32>(key);
                out_indices[row * params.k + place] = index;
            }
        }
        for (var place = count + lane; place < params.k; place += THREADS) {
            out_values[row * params.k + place] = bitcast<f32>(PAD_KEY);
            out_indices[row * params.k + place] = PAD_INDEX;
        }
        return true;
    }
    let length = 1u << (32u - countLeadingZeros(max(count, params.k) - 1u));
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
    return true;
}

// k = 1, what PatchCore scores by: the nearest entry of every row (ties to the lower index) in one pass
// without atomics. Each invocation keeps the best of its share of the row (`lane_positions`), then a tree
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
    let share = lane_positions(lane, total);
    for (var position = share.x; position < share.y; position += SPAN) {
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

// Rows per workgroup of `nearest_of_slots`, one an invocation (the host's `SLOT_ROWS`).
const SLOT_ROWS: u32 = 64u;

// k = 1 from slots: the nearest of the running best and the row's slots, each invocation one row. Per
// row there are 32 times fewer slots than distances, too few to share among invocations: the workgroup
// of `nearest`, its barriers and its reduction (on llvmpipe each barrier a switch between the
// workgroup's 32 SIMD groups) took a quarter of a kNN's time (784 queries against 16,000 × 128 rows:
// 56 against 73 ms a call).
@compute @workgroup_size(SLOT_ROWS)
fn nearest_of_slots(@builtin(workgroup_id) group: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                    @builtin(local_invocation_index) lane: u32) {
    let row = (group.x + group.y * groups.x) * SLOT_ROWS + lane;
    if (row >= params.rows) {
        return;
    }
    var best_key = PAD_KEY;
    var best_index = PAD_INDEX;
    if (params.prev > 0u) {
        best_key = bitcast<u32>(prev_values[row]);
        best_index = prev_indices[row];
    }
    // The running best's index is below the chunk's, and the slots' rows grow (the slots past the
    // chunk's end hold +inf keys at rows past it): a strictly smaller key is a better entry.
    for (var slot = 0u; slot < params.width; slot++) {
        let at = row * params.width + slot;
        let key = slot_keys[at];
        if (key < best_key) {
            best_key = key;
            best_index = params.index_offset + slot_rows[at];
        }
    }
    out_values[row] = bitcast<f32>(best_key);
    out_indices[row] = best_index;
}
