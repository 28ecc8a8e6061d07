// The device's own ceilings, measured in the same run as the kernels that `bench kernels` judges by them.
// `fma_peak`: CHAINS independent vec4 fma chains per invocation, unrolled STEPS deep per loop iteration,
// so that latency is hidden by independent work rather than by occupancy alone; each invocation writes
// its sum, so that no chain can be dropped. The multiplier and addend come from `Params`, so that the
// compiler cannot fold the chains, and keep every value finite (the fixed point is addend / (1 − multiplier)).
// `stream_read`: a grid-stride sum of a large buffer in vec4 loads, adjacent invocations reading adjacent
// vec4s (coalesced); one vec4 written per invocation. Read bandwidth, as the memory-bound kernels it
// judges (column statistics, the bank streamed through the distances) read far more than they write.

struct Params {
    // vec4 elements of `source` that `stream_read` sums.
    count: u32,
    // Loop iterations of `fma_peak`, each CHAINS × STEPS vec4 fmas.
    iterations: u32,
    multiplier: f32,
    addend: f32,
}

// Invocations per workgroup: set by the host (peak.rs), which sizes the grid by it.
override WG: u32;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> source: array<vec4<f32>>;
// One vec4 per invocation of either entry point.
@group(0) @binding(2) var<storage, read_write> sink: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn fma_peak(@builtin(global_invocation_id) id: vec3<u32>) {
    let m = vec4<f32>(params.multiplier);
    let c = vec4<f32>(params.addend);
    let x = f32(id.x & 255u) * params.addend;
    var a0 = vec4<f32>(x, x + 0.1, x + 0.2, x + 0.3);
    var a1 = a0 + 0.01;
    var a2 = a0 + 0.02;
    var a3 = a0 + 0.03;
    var a4 = a0 + 0.04;
    var a5 = a0 + 0.05;
    var a6 = a0 + 0.06;
    var a7 = a0 + 0.07;
    // CHAINS = 8 accumulators, STEPS = 4 rounds: 32 vec4 fmas per iteration (peak.rs counts them so).
    for (var i = 0u; i < params.iterations; i++) {
        a0 = fma(a0, m, c); a1 = fma(a1, m, c); a2 = fma(a2, m, c); a3 = fma(a3, m, c);
        a4 = fma(a4, m, c); a5 = fma(a5, m, c); a6 = fma(a6, m, c); a7 = fma(a7, m, c);
        a0 = fma(a0, m, c); a1 = fma(a1, m, c); a2 = fma(a2, m, c); a3 = fma(a3, m, c);
        a4 = fma(a4, m, c); a5 = fma(a5, m, c); a6 = fma(a6, m, c); a7 = fma(a7, m, c);
        a0 = fma(a0, m, c); a1 = fma(a1, m, c); a2 = fma(a2, m, c); a3 = fma(a3, m, c);
        a4 = fma(a4, m, c); a5 = fma(a5, m, c); a6 = fma(a6, m, c); a7 = fma(a7, m, c);
        a0 = fma(a0, m, c); a1 = fma(a1, m, c); a2 = fma(a2, m, c); a3 = fma(a3, m, c);
        a4 = fma(a4, m, c); a5 = fma(a5, m, c); a6 = fma(a6, m, c); a7 = fma(a7, m, c);
    }
    sink[id.x] = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
}

@compute @workgroup_size(WG)
fn stream_read(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let stride = groups.x * WG;
    var s0 = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    var i = id.x;
    // Two loads in flight per iteration.
    for (; i + stride < params.count; i += 2u * stride) {
        s0 += source[i];
        s1 += source[i + stride];
    }
    if (i < params.count) {
        s0 += source[i];
    }
    sink[id.x] = s0 + s1;
}
