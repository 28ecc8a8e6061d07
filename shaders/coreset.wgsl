// PatchCore's approximate greedy coreset: repeatedly pick the point farthest from the picked set.
//
// One step is three dispatches, all on the device: `fetch` (once per chunk; the chunk holding the last pick
// copies its coordinates to `center` and marks it picked), `update` (once per chunk; every point's distance
// to `center` lowers its running minimum, and each workgroup writes its arg-max), and `reduce` (one
// workgroup: the global arg-max becomes the next pick, read by the next step's `fetch`). The host encodes
// thousands of steps per submission and reads `picks` back once per submission.
//
// Points are integers on an 8-bit grid (|x| ≤ 127, see coreset.rs), so every squared difference is exact in
// f32 and a fused multiply-add rounds the sum exactly as a multiply then an add does: the distance depends
// only on the order of the sum over dimensions, j = 0, 1, …, the order of the CPU paths.
//
// A chunk stores them a byte a coordinate, as the space does, four points to a word (a quad): word
// `quad_base(q) + j * BLOCK` holds dimension j of points 4q … 4q + 3, in blocks of BLOCK quads laid out
// dimension by dimension (the chunk is padded to whole blocks). Each invocation reads four adjacent words
// at once, one vec4<u32> a dimension, and sums their 16 points side by side, each lane still summing
// j = 0, 1, …. The invocations of a block read adjacent words (coalesced on hardware GPUs), and a block's
// words over j are one contiguous run of memory. On llvmpipe, where a storage read is a loop over the SIMD
// lanes, that gives each SIMD group a few page-long streams the CPU's prefetcher follows, and one loop
// per 16 points and dimension: a quarter of the bytes of f32 points, and a quarter of the time.

// Arg-max order: the larger running minimum, ties to the lower index. It is a total order, so any
// reduction tree finds the same point.

struct Params {
    // Points in this chunk (the last quad may be padding).
    rows: u32,
    // Global index of the chunk's first point.
    start: u32,
    dims: u32,
    // This chunk's first slot in `partials`.
    partial_offset: u32,
    // Slots in `partials` over all chunks (read by `reduce`).
    partials: u32,
    // Length of `picks`: a step writes its pick at `count % block`.
    block: u32,
    _pad0: u32,
    _pad1: u32,
}

struct Best {
    value: f32,
    index: u32,
}

struct State {
    // The last pick (the first: the seeded start).
    pick: u32,
    // Steps run so far.
    count: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> data: array<vec4<u32>>;  // this chunk: blocks of [dims][BLOCK] words of 4 × i8
@group(0) @binding(2) var<storage, read_write> center: array<f32>;  // [dims]
@group(0) @binding(3) var<storage, read_write> mins: array<vec4<f32>>;  // this chunk, [quads]
@group(0) @binding(4) var<storage, read_write> partials: array<Best>;
@group(0) @binding(5) var<storage, read_write> state: State;
@group(0) @binding(6) var<storage, read_write> picks: array<u32>;

// Invocations per workgroup, a power of two: set by the host (coreset.rs).
override WG: u32;
// Quads per block of `data`, a multiple of 4: set by the host (coreset.rs), which lays the chunks out.
override BLOCK: u32;
// Running minimum of a picked point: below every distance, so it is never picked again.
const PICKED: f32 = -1.0;
// An empty slot: below `PICKED`.
const NONE: f32 = -2.0;
const NO_INDEX: u32 = 0xffffffffu;

var<workgroup> best_value: array<f32, WG>;
var<workgroup> best_index: array<u32, WG>;

fn better(value_a: f32, index_a: u32, value_b: f32, index_b: u32) -> bool {
    return value_a > value_b || (value_a == value_b && index_a < index_b);
}

// Leaves the workgroup's best (value, index) in slot 0.
fn reduce_workgroup(lane: u32) {
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half >>= 1u) {
        if (lane < half && better(best_value[lane + half], best_index[lane + half], best_value[lane], best_index[lane])) {
            best_value[lane] = best_value[lane + half];
            best_index[lane] = best_index[lane + half];
        }
        workgroupBarrier();
    }
}

fn quads() -> u32 {
    return (params.rows + 3u) / 4u;
}

// Where dimension 0 of quad `q` lies in `data`, in words; dimension j lies j * BLOCK words further on.
fn quad_base(q: u32) -> u32 {
    return q / BLOCK * params.dims * BLOCK + q % BLOCK;
}

// The running sums of an invocation's four quads (16 points).
struct Sums {
    q0: vec4<f32>,
    q1: vec4<f32>,
    q2: vec4<f32>,
    q3: vec4<f32>,
}

// Where dimension 0 of invocation `t`'s quads 4t … 4t + 3 lies in `data`; dimension j lies j * BLOCK / 4
// further on.
fn words_base(t: u32) -> u32 {
    return quad_base(4u * t) / 4u;
}

// Dimension j of invocation `t`'s four words, `base` being `words_base(t)`.
fn words_at(base: u32, j: u32) -> vec4<u32> {
    return data[base + j * (BLOCK / 4u)];
}

// Adds one dimension to `sums`: its four words and the centre's coordinate `c`. The words' bytes are grid
// integers, exact as f32.
fn add_words(sums: Sums, words: vec4<u32>, c: f32) -> Sums {
    let t0 = vec4<f32>(unpack4xI8(words.x)) - vec4<f32>(c);
    let t1 = vec4<f32>(unpack4xI8(words.y)) - vec4<f32>(c);
    let t2 = vec4<f32>(unpack4xI8(words.z)) - vec4<f32>(c);
    let t3 = vec4<f32>(unpack4xI8(words.w)) - vec4<f32>(c);
    return Sums(sums.q0 + t0 * t0, sums.q1 + t1 * t1, sums.q2 + t2 * t2, sums.q3 + t3 * t3);
}

@compute @workgroup_size(WG)
fn fetch(@builtin(local_invocation_index) lane: u32) {
    let pick = state.pick;
    if (pick < params.start || pick - params.start >= params.rows) {
        return;
    }
    let row = pick - params.start;
    let base = quad_base(row / 4u);
    for (var j = lane; j < params.dims; j += WG) {
        let word = base + j * BLOCK;
        center[j] = f32(unpack4xI8(data[word / 4u][word % 4u])[row % 4u]);
    }
    if (lane == 0u) {
        mins[row / 4u][row % 4u] = PICKED;
    }
}

// Lowers quad `q`'s running minima to `sum` where it is lower, and returns the quad's best.
fn lower_quad(q: u32, sum: vec4<f32>) -> Best {
    let m = min(mins[q], sum);
    mins[q] = m;
    // The quad's best, in index order: a later point wins only with a strictly larger minimum.
    var best = Best(NONE, NO_INDEX);
    for (var c = 0u; c < 4u; c++) {
        if (4u * q + c < params.rows && m[c] > best.value) {
            best = Best(m[c], params.start + 4u * q + c);
        }
    }
    return best;
}

// Lowers the running minima of invocation `t`'s quads to `sums`, and returns their best (quads past the
// chunk's last point, padding, give none).
fn lower_quads(t: u32, sums: Sums) -> Best {
    var best = lower_quad(4u * t, sums.q0);
    best = best_of(best, lower_quad(4u * t + 1u, sums.q1));
    best = best_of(best, lower_quad(4u * t + 2u, sums.q2));
    return best_of(best, lower_quad(4u * t + 3u, sums.q3));
}

// The better of `a` and `b`, in arg-max order.
fn best_of(a: Best, b: Best) -> Best {
    if (better(b.value, b.index, a.value, a.index)) {
        return b;
    }
    return a;
}

// Writes the workgroup's best of its invocations' `best` to its slot in `partials`.
fn store_partial(lane: u32, group: u32, best: Best) {
    best_value[lane] = best.value;
    best_index[lane] = best.index;
    reduce_workgroup(lane);
    if (lane == 0u) {
        partials[params.partial_offset + group] = Best(best_value[0], best_index[0]);
    }
}

@compute @workgroup_size(WG)
fn update(@builtin(global_invocation_id) id: vec3<u32>, @builtin(workgroup_id) group: vec3<u32>,
          @builtin(local_invocation_index) lane: u32) {
    let t = id.x;
    var best = Best(NONE, NO_INDEX);
    if (4u * t < quads()) {
        let base = words_base(t);
        let zero = vec4<f32>(0.0);
        var sums = Sums(zero, zero, zero, zero);
        for (var j = 0u; j < params.dims; j++) {
            sums = add_words(sums, words_at(base, j), center[j]);
        }
        best = lower_quads(t, sums);
    }
    store_partial(lane, group.x, best);
}

@compute @workgroup_size(WG)
fn reduce(@builtin(local_invocation_index) lane: u32) {
    var value = NONE;
    var index = NO_INDEX;
    for (var i = lane; i < params.partials; i += WG) {
        let slot = partials[i];
        if (better(slot.value, slot.index, value, index)) {
            value = slot.value;
            index = slot.index;
        }
    }
    best_value[lane] = value;
    best_index[lane] = index;
    reduce_workgroup(lane);
    if (lane == 0u) {
        let pick = best_index[0];
        picks[state.count % params.block] = pick;
        state.pick = pick;
        state.count = state.count + 1u;
    }
}
