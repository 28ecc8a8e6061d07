//! The WGSL kernels against the f64 CPU reference (and the fast CPU path against it too): odd shapes,
//! D = 1, k = 1 and k = N, exact ties, large magnitudes, and inputs split past a (lowered) binding limit.

use anomaly_kernels::cpu::{fast, reference};
use anomaly_kernels::{
    CoresetChunking, CoresetSettings, CoresetSpace, DistanceKernel, GpuKernels, KernelError, KernelLimits, Neighbours, top_columns,
};

use crate::common::{Rng, wgpu_device};

fn kernels() -> GpuKernels {
    wgpu_device();
    GpuKernels::shared().unwrap()
}

/// The device's limits with bindings and host uploads of `bytes`.
fn small_limits(kernels: &GpuKernels, bytes: u64) -> KernelLimits {
    KernelLimits { max_binding_bytes: bytes, max_upload_bytes: bytes, ..kernels.limits() }
}

/// Relative error with a floor, so that values near zero are judged against the data's scale.
fn close(ours: f64, exact: f64, floor: f64, tolerance: f64) -> bool {
    (ours - exact).abs() <= tolerance * exact.abs().max(floor)
}

/// The scale squared distances are judged against near zero: 1% of the mean squared row norm. The kernels
/// compute ‖q‖² + ‖b‖² − 2 q·b, whose rounding error is relative to the norms, not to the distance.
fn floor_of(values: &[f32], d: usize) -> f64 {
    let rows = values.len() / d;
    1e-2 * values.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / rows as f64
}

/// Checks neighbours against the f64 reference: squared distances within 1e-4 relative (floored), and the
/// same indices, except where two bank rows are numerically (not exactly) equally near.
fn check_neighbours(case: &str, ours: &Neighbours, queries: &[f32], bank: &[f32], d: usize) {
    let floor = floor_of(queries, d).max(floor_of(bank, d));
    let exact = reference::knn(queries, bank, d, ours.k);
    let squared = reference::squared_distances(queries, bank, d);
    let n = bank.len() / d;
    assert_eq!(ours.indices.len(), exact.indices.len(), "{case}");
    let mut worst = 0f64;
    for row in 0..queries.len() / d {
        for i in 0..ours.k {
            let (ours_index, exact_index) = (ours.row_indices(row)[i], exact.row_indices(row)[i]);
            let exact_squared = squared[row * n + exact_index as usize];
            let ours_squared = (ours.row_distances(row)[i] as f64).powi(2);
            worst = worst.max((ours_squared - exact_squared).abs() / exact_squared.max(floor));
            assert!(
                close(ours_squared, exact_squared, floor, 1e-4),
                "{case}: query {row} neighbour {i}: squared distance {ours_squared} vs {exact_squared}"
            );
            if ours_index != exact_index {
                let chosen = squared[row * n + ours_index as usize];
                // Only a numerical near-tie may swap; an exact tie must go to the lower index.
                assert!(
                    chosen != exact_squared && close(chosen, exact_squared, floor, 1e-4),
                    "{case}: query {row} neighbour {i}: index {ours_index} (at {chosen}) instead of {exact_index} (at {exact_squared})"
                );
            }
        }
    }
    eprintln!("{case}: worst relative error of squared distances {worst:.1e}");
}

struct Case {
    name: &'static str,
    m: usize,
    n: usize,
    d: usize,
    k: usize,
    scale: f32,
    offset: f32,
    duplicates: bool,
}

fn data(case: &Case, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let d = case.d;
    let mut queries = rng.normals(case.m * d, case.offset, case.scale);
    let mut bank = rng.normals(case.n * d, case.offset, case.scale);
    if case.duplicates {
        // Bank rows in groups of three equal copies, and every fourth query equal to a bank row:
        // exact ties (broken by the lower index) and exact zeros.
        for row in 0..case.n {
            let source = row / 3 * 3;
            bank.copy_within(source * d..(source + 1) * d, row * d);
        }
        for q in (0..case.m).step_by(4) {
            let source = (q * 7) % case.n;
            queries[q * d..(q + 1) * d].copy_from_slice(&bank[source * d..(source + 1) * d]);
        }
    }
    (queries, bank)
}

const CASES: [Case; 13] = [
    Case { name: "odd shapes", m: 37, n: 1001, d: 70, k: 9, scale: 1.0, offset: 0.0, duplicates: false },
    Case { name: "d = 1", m: 20, n: 300, d: 1, k: 5, scale: 1.0, offset: 0.0, duplicates: false },
    Case { name: "k = 1", m: 65, n: 129, d: 33, k: 1, scale: 1.0, offset: 0.0, duplicates: false },
    Case { name: "k = n", m: 9, n: 200, d: 17, k: 200, scale: 1.0, offset: 0.0, duplicates: false },
    Case { name: "k = 1024", m: 5, n: 1500, d: 8, k: 1024, scale: 1.0, offset: 0.0, duplicates: false },
    Case { name: "duplicates", m: 40, n: 300, d: 24, k: 50, scale: 1.0, offset: 0.0, duplicates: true },
    Case { name: "nearest of duplicates", m: 40, n: 300, d: 24, k: 1, scale: 1.0, offset: 0.0, duplicates: true },
    Case { name: "large magnitudes", m: 30, n: 500, d: 40, k: 20, scale: 1000.0, offset: 3000.0, duplicates: false },
    // Banks of fewer rows than one subgroup's slot (SG × 4 rows: 32 on llvmpipe's 256-bit vectors), and
    // of one slot and a part.
    Case { name: "bank within a slot", m: 7, n: 5, d: 6, k: 3, scale: 1.0, offset: 0.0, duplicates: false },
    Case { name: "k = n − 1", m: 7, n: 40, d: 6, k: 39, scale: 1.0, offset: 0.0, duplicates: false },
    // Rows of 512 features lie 528 floats apart on the device.
    Case { name: "padded rows", m: 19, n: 400, d: 512, k: 5, scale: 1.0, offset: 0.0, duplicates: false },
    // The subgroup shader's blocks of 16 query rows ending in one of 9 to 12 rows, for the two outputs the
    // cases above leave out there (k = n covers the slot minima): each slot's nearest, every distance.
    Case { name: "last block of 11 rows, k = 1", m: 27, n: 700, d: 37, k: 1, scale: 1.0, offset: 0.0, duplicates: false },
    Case { name: "last block of 12 rows, k = 300", m: 12, n: 700, d: 37, k: 300, scale: 1.0, offset: 0.0, duplicates: false },
];

#[test]
fn gpu_neighbours_match_the_reference_with_either_distance_shader() {
    for kernel in [DistanceKernel::Tiled, DistanceKernel::Subgroup] {
        let kernels = kernels().with_distance_kernel(kernel);
        for (seed, case) in CASES.iter().enumerate() {
            let (queries, bank) = data(case, seed as u64);
            let gpu_bank = kernels.upload(&bank, case.n, case.d).unwrap();
            let ours = kernels.knn_host(&gpu_bank, &queries, case.k).unwrap();
            check_neighbours(&format!("{kernel:?} {}", case.name), &ours, &queries, &bank, case.d);
        }
    }
}

#[test]
fn nearest_rows_tie_to_the_lowest_index_within_and_across_invocations() {
    // 8 distinct rows repeated 128 times: each copy 8 positions after the last, so the copies fall to
    // one invocation of the k = 1 pass (which reads its share of a row 8 positions apart) and to every
    // other, and with one extra row in front (as a chunk's merged best is) at other offsets.
    let d = 5;
    let mut rng = Rng::new(41);
    let queries = rng.normals(30 * d, 0.0, 1.0);
    let distinct = rng.normals(8 * d, 0.0, 1.0);
    for lead in [0, 1] {
        let mut bank = rng.normals(lead * d, 0.0, 1.0);
        (0..128).for_each(|_| bank.extend_from_slice(&distinct));
        let n = bank.len() / d;
        for kernel in [DistanceKernel::Tiled, DistanceKernel::Subgroup] {
            let kernels = kernels().with_distance_kernel(kernel);
            let ours = kernels.knn_host(&kernels.upload(&bank, n, d).unwrap(), &queries, 1).unwrap();
            for (row, &index) in ours.indices.iter().enumerate() {
                assert!((index as usize) < lead + 8, "{kernel:?}, lead {lead}: query {row} took copy {index}");
            }
            check_neighbours(&format!("{kernel:?} lead {lead}"), &ours, &queries, &bank, d);
        }
    }
}

#[test]
fn rows_of_equal_distances_give_the_lowest_indices() {
    // Every bank row alike: every distance ties, so the top-k's bound collects more than it can hold and
    // the radix select takes over, whose ties straddle the k-th place (the ordered collection).
    let d = 4;
    let bank = [0.25f32, -1.0, 2.0, 0.5].repeat(3000);
    let queries = [1.0f32, 1.0, 1.0, 1.0, -2.0, 0.0, 3.0, 1.0].to_vec();
    for kernel in [DistanceKernel::Tiled, DistanceKernel::Subgroup] {
        let kernels = kernels().with_distance_kernel(kernel);
        let gpu_bank = kernels.upload(&bank, 3000, d).unwrap();
        for k in [1, 10, 300] {
            let ours = kernels.knn_host(&gpu_bank, &queries, k).unwrap();
            for row in 0..2 {
                assert_eq!(ours.row_indices(row), (0..k as u32).collect::<Vec<_>>().as_slice(), "{kernel:?} k {k} query {row}");
            }
        }
    }
}

#[test]
fn rows_the_bound_serves_and_rows_it_leaves_share_a_block() {
    // Every bank row is a signed permutation of (1, 2, 3, 4), so each lies at exactly 30 from the origin:
    // a query at the origin ties with all of them, more than the slot-bounded top-k's first pass ranks,
    // and goes to its second pass, listed; the other queries do not. Whole, and in 4 KiB bindings (bank
    // chunks and query blocks of a few rows), whose merges must each start from an empty listing: one
    // that kept growing would overflow and lose rows.
    let d = 4;
    let mut bank = Vec::new();
    for permutation in 0..24 {
        let mut values = [1.0f32, 2.0, 3.0, 4.0];
        let mut rest = permutation;
        for i in 0..d {
            values.swap(i, i + rest % (d - i));
            rest /= d - i;
        }
        for signs in 0..16 {
            bank.extend(values.iter().enumerate().map(|(i, v)| if signs >> i & 1 == 1 { -v } else { *v }));
        }
    }
    let bank = bank.repeat(3);
    let n = bank.len() / d;
    let mut queries = Rng::new(43).normals(9 * d, 0.0, 1.0);
    let at_origin = [0, 4, 5, 8];
    for row in at_origin {
        queries[row * d..(row + 1) * d].fill(0.0);
    }
    for kernel in [DistanceKernel::Tiled, DistanceKernel::Subgroup] {
        let whole = kernels().with_distance_kernel(kernel);
        let small = GpuKernels::shared().unwrap().with_limits(small_limits(&whole, 4096)).with_distance_kernel(kernel);
        for (name, kernels) in [("whole", whole), ("chunked", small)] {
            let gpu_bank = kernels.upload(&bank, n, d).unwrap();
            for k in [2, 50] {
                let ours = kernels.knn_host(&gpu_bank, &queries, k).unwrap();
                for row in at_origin {
                    assert_eq!(ours.row_indices(row), (0..k as u32).collect::<Vec<_>>().as_slice(), "{kernel:?} {name} k {k} query {row}");
                }
                check_neighbours(&format!("{kernel:?} {name} k {k}"), &ours, &queries, &bank, d);
            }
        }
    }
}

#[test]
fn rows_shorter_than_the_invocations_give_k_neighbours() {
    // 300 bank rows, k = 200: the top-k's 256 invocations read 16-entry segments 8 at a time, so only
    // 152 of them hold entries, and each holds a near row (positions 0–7 of a segment) and a far one
    // (8–15). Their minima, all near, are fewer than k and bound none of the far rows the answer needs.
    let d = 1;
    let bank: Vec<f32> = (0..300).map(|c| if c % 16 < 8 { 1.0 + c as f32 / 1024.0 } else { 1000.0 + c as f32 }).collect();
    let queries = vec![0.0f32, 0.5];
    for kernel in [DistanceKernel::Tiled, DistanceKernel::Subgroup] {
        let kernels = kernels().with_distance_kernel(kernel);
        let ours = kernels.knn_host(&kernels.upload(&bank, 300, d).unwrap(), &queries, 200).unwrap();
        check_neighbours(&format!("{kernel:?} k 200 of 300"), &ours, &queries, &bank, d);
    }
}

#[test]
fn fast_cpu_neighbours_match_the_reference() {
    for (seed, case) in CASES.iter().enumerate() {
        let (queries, bank) = data(case, seed as u64);
        let ours = fast::knn(&queries, &bank, case.d, case.k);
        check_neighbours(case.name, &ours, &queries, &bank, case.d);
    }
}

#[test]
fn chunked_runs_equal_the_unchunked_run() {
    let kernels = kernels();
    let case = Case { name: "chunked", m: 70, n: 2500, d: 12, k: 40, scale: 1.0, offset: 0.0, duplicates: true };
    let (queries, bank) = data(&case, 11);
    let kernels = kernels.with_distance_kernel(DistanceKernel::Tiled);
    let whole = kernels.knn_host(&kernels.upload(&bank, case.n, case.d).unwrap(), &queries, case.k).unwrap();
    // 16 KiB bindings: bank chunks of 341 rows, query blocks of at most 4 rows, distances in pieces.
    let small = GpuKernels::shared().unwrap().with_limits(small_limits(&kernels, 16 * 1024)).with_distance_kernel(DistanceKernel::Tiled);
    let chunked_bank = small.upload(&bank, case.n, case.d).unwrap();
    assert!(chunked_bank.chunk_count() >= 7, "{} chunks", chunked_bank.chunk_count());
    let chunked = small.knn_host(&chunked_bank, &queries, case.k).unwrap();
    assert_eq!(chunked, whole, "chunked and unchunked runs differ");
    check_neighbours(case.name, &chunked, &queries, &bank, case.d);
    // k = 1 has its own top-k pass, which merges the chunks' nearest rows as well.
    let nearest = small.knn_host(&chunked_bank, &queries, 1).unwrap();
    assert_eq!(
        nearest,
        kernels.knn_host(&kernels.upload(&bank, case.n, case.d).unwrap(), &queries, 1).unwrap(),
        "k = 1: chunked and unchunked runs differ"
    );
    check_neighbours("chunked, k = 1", &nearest, &queries, &bank, case.d);
    // The subgroup shader, with query blocks of a few rows; the result must not change.
    let subgroup = small.with_distance_kernel(DistanceKernel::Subgroup);
    let chunked_bank = subgroup.upload(&bank, case.n, case.d).unwrap();
    let subgroup_whole = GpuKernels::shared().unwrap().with_distance_kernel(DistanceKernel::Subgroup);
    let expected = subgroup_whole.knn_host(&subgroup_whole.upload(&bank, case.n, case.d).unwrap(), &queries, case.k).unwrap();
    assert_eq!(subgroup.knn_host(&chunked_bank, &queries, case.k).unwrap(), expected, "subgroup: chunked and unchunked runs differ");
    // Its k = 1 pass keeps only each subgroup's nearest of a chunk, which the top-k merges chunk by chunk.
    let nearest_subgroup = subgroup.knn_host(&chunked_bank, &queries, 1).unwrap();
    assert_eq!(nearest_subgroup, nearest, "subgroup, k = 1: chunked runs differ from the tiled shader's");
    assert_eq!(
        nearest_subgroup,
        subgroup_whole.knn_host(&subgroup_whole.upload(&bank, case.n, case.d).unwrap(), &queries, 1).unwrap(),
        "subgroup, k = 1: chunked and unchunked runs differ"
    );

    let exact = reference::column_stats(&bank, case.n, case.d);
    let stats = subgroup.column_stats(&chunked_bank).unwrap();
    for (ours, theirs) in stats.std.iter().zip(&exact.std) {
        assert!(close(*ours as f64, *theirs as f64, 1e-6, 1e-4), "std {ours} vs {theirs}");
    }
}

#[test]
fn bank_chunks_smaller_than_k_merge_exactly() {
    // 16 KiB bindings and 300 features: bank chunks of 13 rows, so the running best holds padding (fewer
    // than k = 40 rows seen) through the first three merges, and query blocks of 13 rows, so the second
    // block's merges reuse the buffers the first one filled.
    let case = Case { name: "chunks smaller than k", m: 20, n: 60, d: 300, k: 40, scale: 1.0, offset: 0.0, duplicates: false };
    let (queries, bank) = data(&case, 12);
    for kernel in [DistanceKernel::Tiled, DistanceKernel::Subgroup] {
        let whole = kernels().with_distance_kernel(kernel);
        let expected = whole.knn_host(&whole.upload(&bank, case.n, case.d).unwrap(), &queries, case.k).unwrap();
        let small = GpuKernels::shared().unwrap().with_limits(small_limits(&whole, 16 * 1024)).with_distance_kernel(kernel);
        let chunked_bank = small.upload(&bank, case.n, case.d).unwrap();
        assert!(chunked_bank.chunk_count() >= 4, "{} chunks", chunked_bank.chunk_count());
        let chunked = small.knn_host(&chunked_bank, &queries, case.k).unwrap();
        assert_eq!(chunked, expected, "{kernel:?}: chunked and unchunked runs differ");
        check_neighbours(&format!("{kernel:?} {}", case.name), &chunked, &queries, &bank, case.d);
    }
}

#[test]
fn slots_left_unstored_past_the_first_chunk_are_never_read() {
    // Two bank chunks of 2048 rows (32 KiB bindings, 4 features), queries at the origin, so that a
    // distance is a row's squared norm. The first chunk's rows 0 .. k − 1 are nearest (k − 1 of them at
    // 0.01, row k − 1 at 0.25): the running k-th is 0.25. In the second chunk the slots over those
    // columns lie just above it, and the subgroup shader stores none of their distances, so that the
    // distances buffer still holds the first chunk's 0.01s there; read as the second chunk's, they would
    // displace the true neighbours.
    // - k = 200 (above what `topk_slots` takes): `select_row`, whose binned bound here takes in every
    //   candidate. Clamped to the running k-th it lists none of the unstored slots (at 0.25 + 2 ulps);
    //   unclamped, more than MAX_K entries send the row to the radix select of the next case.
    // - k = 5 and 1792 rows tied with the k-th in the second chunk: more than MAX_K entries at or below
    //   the bound, so the radix select reads the whole row, where the unstored slots (at 100) must count
    //   as padding.
    let d = 4;
    let chunk = 2048;
    let row = |x: f32, y: f32| [x, y, 0.0, 0.0];
    let just_above = row(0.5, 2f32.powi(-12));
    for (k, second_chunk_head, second_chunk_rest) in [(200, just_above, row(10.0, 0.0)), (5, row(10.0, 0.0), row(0.5, 0.0))] {
        let mut bank = Vec::with_capacity(2 * chunk * d);
        for i in 0..chunk {
            bank.extend(if i < k - 1 {
                row(0.1, 0.0)
            } else if i == k - 1 {
                row(0.5, 0.0)
            } else {
                row(10.0, 0.0)
            });
        }
        for i in 0..chunk {
            bank.extend(if i < 256 { second_chunk_head } else { second_chunk_rest });
        }
        let queries = vec![0.0; 3 * d];
        for kernel in [DistanceKernel::Tiled, DistanceKernel::Subgroup] {
            let whole = kernels().with_distance_kernel(kernel);
            let small = GpuKernels::shared().unwrap().with_limits(small_limits(&whole, 32 * 1024)).with_distance_kernel(kernel);
            let chunked_bank = small.upload(&bank, 2 * chunk, d).unwrap();
            assert_eq!(chunked_bank.chunk_count(), 2);
            let found = small.knn_host(&chunked_bank, &queries, k).unwrap();
            for query in 0..3 {
                let indices: Vec<u32> = (0..k as u32).collect();
                assert_eq!(found.row_indices(query), indices.as_slice(), "{kernel:?}, k = {k}, query {query}");
            }
            check_neighbours(&format!("{kernel:?} unstored slots, k = {k}"), &found, &queries, &bank, d);
        }
    }
}

#[test]
fn a_single_chunk_banks_kept_texture_serves_later_and_racing_calls() {
    // On the subgroup shader a single-chunk bank is copied into a texture kept with it, by the first
    // kNN that reads it; four threads race to be that one on a fresh bank, and every later call, at
    // k = 1 (each slot's nearest) and at k = 5 (the distances and slot minima), reads the kept copy.
    let kernels = kernels().with_distance_kernel(DistanceKernel::Subgroup);
    let case = Case { name: "kept texture", m: 40, n: 700, d: 20, k: 5, scale: 1.0, offset: 0.0, duplicates: false };
    let (_, bank) = data(&case, 41);
    let query_sets: Vec<Vec<f32>> = (0..4).map(|seed| Rng::new(50 + seed).normals(case.m * case.d, 0.0, 1.0)).collect();
    let gpu_bank = kernels.upload(&bank, case.n, case.d).unwrap();
    assert_eq!(gpu_bank.chunk_count(), 1);
    let racing: Vec<Neighbours> = std::thread::scope(|scope| {
        let calls: Vec<_> =
            query_sets.iter().map(|queries| scope.spawn(|| kernels.knn_host(&gpu_bank, queries, case.k).unwrap())).collect();
        calls.into_iter().map(|call| call.join().unwrap()).collect()
    });
    for (call, (queries, found)) in query_sets.iter().zip(&racing).enumerate() {
        check_neighbours(&format!("racing call {call}"), found, queries, &bank, case.d);
        assert_eq!(&kernels.knn_host(&gpu_bank, queries, case.k).unwrap(), found, "call {call} again");
        let nearest = kernels.knn_host(&gpu_bank, queries, 1).unwrap();
        check_neighbours(&format!("call {call}, k = 1"), &nearest, queries, &bank, case.d);
    }
}

#[test]
fn kept_output_buffers_give_later_calls_what_new_ones_give() {
    // A finished kNN leaves its output buffers to the next call of the same shape with its values in
    // them: here distances of (nearly) zero, from queries that are bank rows, which would win wherever a
    // later call read a value it had not written. Each shader, at k 9 (the slot-bounded top-k on the
    // subgroup shader) and k 1 (each slot's nearest), with a chunked bank too.
    let case = Case { name: "kept outputs", m: 40, n: 700, d: 20, k: 9, scale: 1.0, offset: 0.0, duplicates: true };
    let (queries, bank) = data(&case, 42);
    let bank_rows = bank[..case.m * case.d].to_vec();
    for kernel in [DistanceKernel::Tiled, DistanceKernel::Subgroup] {
        for bytes in [None, Some(16 * 1024)] {
            let with_limits = |kernels: GpuKernels| match bytes {
                Some(bytes) => {
                    let limits = small_limits(&kernels, bytes);
                    kernels.with_limits(limits)
                }
                None => kernels,
            };
            let kernels = with_limits(kernels().with_distance_kernel(kernel));
            let gpu_bank = kernels.upload(&bank, case.n, case.d).unwrap();
            for k in [case.k, 1, case.k] {
                let zeros = kernels.knn_host(&gpu_bank, &bank_rows, k).unwrap();
                assert!(zeros.distances.iter().step_by(k).all(|d| *d < 0.1), "{kernel:?}: bank rows are their own nearest");
                let found = kernels.knn_host(&gpu_bank, &queries, k).unwrap();
                let new = with_limits(GpuKernels::shared().unwrap().with_distance_kernel(kernel));
                assert_eq!(
                    found,
                    new.knn_host(&new.upload(&bank, case.n, case.d).unwrap(), &queries, k).unwrap(),
                    "{kernel:?} k {k} {bytes:?}"
                );
                check_neighbours(&format!("{kernel:?} k {k}, kept outputs, {bytes:?}"), &found, &queries, &bank, case.d);
            }
        }
    }
}

#[test]
fn device_queries_give_the_neighbours_host_queries_give() {
    let shared = kernels();
    // A width of 13 and one of 12 (a partial last step of the subgroup shader, and none), with exact
    // ties, and one of 256 (rows stored with a pad after each; without ties, as the rounding of
    // ‖q‖² + ‖b‖² − 2 q·b at that width passes the check's floor at an exact zero), with the
    // device's limits and with 16 KiB bindings and uploads: queries in three chunks (host queries in three
    // uploads), blocks of a few rows, a chunked bank.
    for (seed, d, duplicates) in [(31, 13, true), (32, 12, true), (33, 256, false)] {
        let case = Case { name: "device queries", m: 700, n: 900, d, k: 7, scale: 1.0, offset: 0.0, duplicates };
        let (queries, bank) = data(&case, seed);
        for kernel in [DistanceKernel::Tiled, DistanceKernel::Subgroup] {
            let mut results = Vec::new();
            for limits in [shared.limits(), small_limits(&shared, 16 * 1024)] {
                let kernels = GpuKernels::shared().unwrap().with_limits(limits).with_distance_kernel(kernel);
                let gpu_bank = kernels.upload(&bank, case.n, d).unwrap();
                let gpu_queries = kernels.upload(&queries, case.m, d).unwrap();
                let on_device = kernels.knn(&gpu_bank, &gpu_queries, case.k).unwrap();
                assert_eq!(on_device, kernels.knn_host(&gpu_bank, &queries, case.k).unwrap(), "{kernel:?} d {d} {limits:?}");
                check_neighbours(&format!("{kernel:?} d {d}, {} query chunks", gpu_queries.chunk_count()), &on_device, &queries, &bank, d);
                // A gathered bank as its own queries, as fitting does.
                let columns: Vec<u32> = (0..d as u32).rev().step_by(2).collect();
                let gathered = kernels.gather_columns(&gpu_bank, &columns).unwrap();
                let rows = kernels.download(&gathered).unwrap();
                assert_eq!(kernels.knn(&gathered, &gathered, case.k).unwrap(), kernels.knn_host(&gathered, &rows, case.k).unwrap());
                results.push((gpu_queries.chunk_count(), on_device));
            }
            assert!(results[1].0 >= 3, "{} query chunks under 16 KiB bindings", results[1].0);
            assert_eq!(results[0].1, results[1].1, "{kernel:?} d {d}: chunked and unchunked runs differ");
        }
    }
}

#[test]
fn column_statistics_match_the_reference() {
    let kernels = kernels();
    let mut rng = Rng::new(5);
    for (rows, cols, offset, scale) in
        [(1, 1, 0.0, 1.0), (37, 1, 0.0, 1.0), (1000, 65, 0.0, 1.0), (3001, 130, 0.0, 2.0), (500, 40, 10_000.0, 1.0), (300, 256, 0.0, 1.0)]
    {
        let matrix = rng.normals(rows * cols, offset, scale);
        let exact = reference::column_stats(&matrix, rows, cols);
        let gpu = kernels.column_stats(&kernels.upload(&matrix, rows, cols).unwrap()).unwrap();
        let cpu = fast::column_stats(&matrix, rows, cols);
        for (name, ours) in [("gpu", &gpu), ("fast cpu", &cpu)] {
            for c in 0..cols {
                assert!(close(ours.mean[c] as f64, exact.mean[c] as f64, scale as f64, 1e-4), "{name} {rows}×{cols} mean");
                assert!(
                    close(ours.std[c] as f64, exact.std[c] as f64, 1e-3 * scale as f64, 1e-4),
                    "{name} {rows}×{cols} (offset {offset}) std {} vs {}",
                    ours.std[c],
                    exact.std[c]
                );
            }
        }
    }
}

/// The given columns of a row-major matrix `cols` wide, row by row: what `gather_columns` must give.
fn columns_of(matrix: &[f32], cols: usize, columns: &[u32]) -> Vec<f32> {
    matrix.chunks_exact(cols).flat_map(|row| columns.iter().map(move |&c| row[c as usize])).collect()
}

#[test]
fn selected_columns_are_gathered_exactly() {
    let kernels = kernels();
    let mut rng = Rng::new(9);
    let (rows, cols) = (300, 50);
    let matrix = rng.normals(rows * cols, 0.0, 1.0);
    let std: Vec<f32> = (0..cols).map(|c| if c % 7 == 0 { 1.0 } else { (c % 5) as f32 }).collect();
    let columns = top_columns(&std, 12);
    // std 4 where c % 5 == 4 except the multiples of 7 (14, 49: std 1), then std 3 from the lowest columns.
    assert_eq!(columns, vec![3, 4, 8, 9, 13, 18, 19, 24, 29, 34, 39, 44]);
    let small = GpuKernels::shared().unwrap().with_limits(small_limits(&kernels, 4096));
    let gathered = small.download(&small.gather_columns(&small.upload(&matrix, rows, cols).unwrap(), &columns).unwrap()).unwrap();
    assert_eq!(gathered, columns_of(&matrix, cols, &columns));
}

#[test]
fn padded_rows_are_gathered_and_read_back_exactly() {
    // 256 and 512 columns are stored with a pad after each row; 300 and 12 without.
    let kernels = kernels();
    let small = GpuKernels::shared().unwrap().with_limits(small_limits(&kernels, 16 * 1024));
    let mut rng = Rng::new(10);
    for (rows, cols, selected) in [(70, 512, 256), (50, 256, 12), (40, 300, 256)] {
        let matrix = rng.normals(rows * cols, 0.0, 1.0);
        let columns: Vec<u32> = (0..selected as u32).map(|j| (j * 7 + 3) % cols as u32).collect();
        for kernels in [&kernels, &small] {
            let uploaded = kernels.upload(&matrix, rows, cols).unwrap();
            assert_eq!(kernels.download(&uploaded).unwrap(), matrix, "{rows} × {cols} read back");
            let gathered = kernels.download(&kernels.gather_columns(&uploaded, &columns).unwrap()).unwrap();
            assert_eq!(gathered, columns_of(&matrix, cols, &columns), "{rows} × {cols}, {selected} columns gathered");
        }
    }
}

#[test]
fn software_vulkan_adapters_run_the_subgroup_shader() {
    let kernels = kernels();
    let adapter = &anomaly_device::GpuContext::get().unwrap().adapter;
    if adapter.is_hardware || adapter.backend != "Vulkan" {
        eprintln!("skipping: {adapter} is not a software Vulkan adapter");
        return;
    }
    assert!(kernels.has_subgroup_kernel(), "{adapter} has no fixed subgroup size the subgroup shader takes");
    assert_eq!(kernels.distance_kernel(), DistanceKernel::Subgroup);
}

#[test]
fn every_distance_shader_agrees_with_the_reference() {
    let kernels = kernels();
    let mut rng = Rng::new(3);
    // 45 features, and 256 (rows stored with a pad after each).
    for (m, n, d) in [(67, 131, 45), (35, 70, 256)] {
        let queries = rng.normals(m * d, 0.0, 1.0);
        let bank = rng.normals(n * d, 0.0, 1.0);
        let exact = reference::squared_distances(&queries, &bank, d);
        let floor = floor_of(&queries, d);
        let (q, b) = (kernels.upload(&queries, m, d).unwrap(), kernels.upload(&bank, n, d).unwrap());
        let mut shaders = vec![DistanceKernel::Tiled, DistanceKernel::Naive];
        if kernels.has_subgroup_kernel() {
            shaders.push(DistanceKernel::Subgroup);
        } else {
            eprintln!("skipping the subgroup shader: this adapter has no fixed subgroup size of 4, 8 or 16");
            assert!(kernels.distance_matrix(&q, &b, DistanceKernel::Subgroup).is_err());
        }
        for kernel in shaders {
            let (ours, _) = kernels.distance_matrix(&q, &b, kernel).unwrap();
            for (o, e) in ours.iter().zip(&exact) {
                assert!(close(*o as f64, *e, floor, 1e-4), "{kernel:?} d {d}: {o} vs {e}");
            }
        }
    }
}

#[test]
fn invalid_requests_are_refused() {
    let kernels = kernels();
    let bank = kernels.upload(&[0.0; 20], 10, 2).unwrap();
    for k in [0, 11] {
        assert!(matches!(kernels.knn_host(&bank, &[0.0, 0.0], k), Err(KernelError::InvalidK { .. })), "k = {k}");
    }
    assert!(matches!(kernels.knn_host(&bank, &[0.0; 3], 1), Err(KernelError::Shape(_))));
    let queries = kernels.upload(&[0.0; 3], 1, 3).unwrap();
    assert!(matches!(kernels.knn(&bank, &queries, 1), Err(KernelError::Shape(_))));
    let tiny = GpuKernels::shared().unwrap().with_limits(small_limits(&kernels, 64));
    let error = tiny.upload(&[0.0; 100], 1, 100).unwrap_err();
    assert!(matches!(error, KernelError::RowTooLarge { .. }) && error.to_string().contains("--device cpu"), "{error}");
}

#[test]
fn the_peak_probes_run_on_the_test_adapter() {
    // A lowered binding limit keeps the bandwidth probe's buffer small; rates are not asserted, only sane.
    let kernels = kernels();
    let small = GpuKernels::shared().unwrap().with_limits(small_limits(&kernels, 1 << 20));
    let peak = small.peak().unwrap();
    assert!(peak.gflops.is_finite() && peak.gflops > 0.0, "{peak:?}");
    assert!(peak.gbs.is_finite() && peak.gbs > 0.0, "{peak:?}");
}

struct CoresetCase {
    name: &'static str,
    n: usize,
    d: usize,
    projection: usize,
    ratio: f64,
    /// Values from a few integers (many exactly equal distances) instead of normals.
    coarse: bool,
    /// Rows in groups of three equal copies (exact ties, zero distances).
    duplicates: bool,
}

const CORESET_CASES: [CoresetCase; 8] = [
    CoresetCase { name: "projected", n: 1000, d: 64, projection: 16, ratio: 0.1, coarse: false, duplicates: false },
    CoresetCase { name: "wide, projected to 128", n: 1500, d: 200, projection: 128, ratio: 0.03, coarse: false, duplicates: false },
    CoresetCase { name: "no projection", n: 777, d: 20, projection: 0, ratio: 0.05, coarse: false, duplicates: true },
    CoresetCase { name: "projection ≥ D, all points", n: 300, d: 5, projection: 128, ratio: 1.0, coarse: false, duplicates: true },
    CoresetCase { name: "coarse values, ties", n: 900, d: 3, projection: 0, ratio: 0.5, coarse: true, duplicates: false },
    CoresetCase { name: "coarse projected, all points", n: 257, d: 12, projection: 4, ratio: 1.0, coarse: true, duplicates: true },
    CoresetCase { name: "d = 1", n: 400, d: 1, projection: 128, ratio: 0.2, coarse: false, duplicates: false },
    CoresetCase { name: "one point", n: 1, d: 7, projection: 3, ratio: 1.0, coarse: false, duplicates: false },
];

fn coreset_data(case: &CoresetCase, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let d = case.d;
    let mut features: Vec<f32> =
        if case.coarse { (0..case.n * d).map(|_| (rng.next_u64() % 3) as f32).collect() } else { rng.normals(case.n * d, 2.0, 3.0) };
    if case.duplicates {
        for row in 0..case.n {
            let source = row / 3 * 3;
            features.copy_within(source * d..(source + 1) * d, row * d);
        }
    }
    features
}

/// Checks picks against the greedy rule itself, in f64 on the grid points: distinct, starting at the
/// space's start, as many as the ratio asks, and each the farthest remaining point (within rounding).
fn check_greedy(case: &str, picks: &[u32], space: &CoresetSpace, ratio: f64) {
    assert_eq!(picks.len(), ((ratio * space.rows() as f64).ceil() as usize).max(1), "{case}: pick count");
    assert_eq!(picks[0] as usize, space.start(), "{case}: the first pick is the seeded start");
    let mut seen = vec![false; space.rows()];
    let mut mins = vec![f64::INFINITY; space.rows()];
    for (step, &pick) in picks.iter().enumerate() {
        let pick = pick as usize;
        assert!(pick < space.rows() && !seen[pick], "{case}: pick {step} ({pick}) is out of range or repeated");
        if step > 0 {
            let farthest = (0..space.rows()).filter(|&i| !seen[i]).map(|i| mins[i]).fold(f64::NEG_INFINITY, f64::max);
            assert!(mins[pick] >= farthest * (1.0 - 1e-6), "{case}: pick {step} ({pick}) at {} but a point lies at {farthest}", mins[pick]);
        }
        seen[pick] = true;
        let center = space.row(pick);
        for (i, min) in mins.iter_mut().enumerate() {
            let squared: f64 = space.row(i).iter().zip(&center).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
            *min = min.min(squared);
        }
    }
}

#[test]
fn coreset_picks_are_equal_on_every_path() {
    let kernels = kernels();
    // 16 KiB bindings: the points split across several chunks whatever their width. With the tiled
    // distance shader, the steps run the plain `update`; `kernels` runs `update_subgroup` where the
    // device has it (llvmpipe).
    let small = GpuKernels::shared().unwrap().with_distance_kernel(DistanceKernel::Tiled).with_limits(small_limits(&kernels, 16 * 1024));
    for (seed, case) in CORESET_CASES.iter().enumerate() {
        let features = coreset_data(case, 100 + seed as u64);
        let settings = CoresetSettings { ratio: case.ratio, projection: case.projection, seed: seed as u64 * 7 + 1 };
        let space = CoresetSpace::new(&features, case.n, case.d, &settings).unwrap();
        assert!(space.to_rows().iter().all(|v| v.fract() == 0.0 && v.abs() <= anomaly_kernels::GRID_MAX), "{}: grid", case.name);
        let expected = reference::coreset(&features, case.n, case.d, &settings).unwrap();
        check_greedy(case.name, &expected, &space, case.ratio);
        assert_eq!(fast::coreset(&features, case.n, case.d, &settings).unwrap(), expected, "{}: fast CPU", case.name);
        assert_eq!(kernels.coreset(&features, case.n, case.d, &settings).unwrap(), expected, "{}: GPU", case.name);
        // Forced chunks of 64 points (not a multiple of the workgroup) and 5 steps per submission.
        let chunking = CoresetChunking { chunk_rows: Some(64), steps_per_submission: 5 };
        assert_eq!(kernels.coreset_select(&space, chunking).unwrap(), expected, "{}: GPU, 64-point chunks", case.name);
        assert_eq!(small.coreset_select(&space, CoresetChunking::default()).unwrap(), expected, "{}: GPU, 16 KiB bindings", case.name);
        if case.ratio == 1.0 {
            let mut all = expected.clone();
            all.sort_unstable();
            assert_eq!(all, (0..case.n as u32).collect::<Vec<_>>(), "{}: ratio 1 keeps every point", case.name);
        }
    }
}

/// Points at the grid's corners (every coordinate ±127: the largest squares, and many exact ties) at
/// the widest the CPU sums in integers and one past it, and uniform points well past it, where the f32
/// sums round: every pick the reference's, whether the selection stays a plain scan or prunes.
#[test]
fn coreset_picks_at_the_grids_extremes_equal_the_reference() {
    let n = 300;
    for (d, corners) in [(258, true), (259, true), (1000, false)] {
        let mut rng = Rng::new(d as u64);
        let features: Vec<f32> = (0..n * d)
            .map(|_| {
                let bits = rng.next_u64();
                if corners { if bits.is_multiple_of(2) { -1.0 } else { 1.0 } } else { (bits % 255) as f32 - 127.0 }
            })
            .collect();
        let settings = CoresetSettings { ratio: 1.0, projection: 0, seed: 1 };
        let space = CoresetSpace::new(&features, n, d, &settings).unwrap();
        if corners {
            assert!(space.to_rows().iter().all(|v| v.abs() == anomaly_kernels::GRID_MAX), "d {d}: the grid's corners");
        }
        assert_eq!(fast::select(space.clone()), reference::greedy(&space), "d {d}");
    }
}

/// Points in tight clusters far apart, as patch features are: the CPU path prunes most of its work,
/// and must still pick exactly the reference's points, ties included (rows in pairs of equal copies,
/// offsets from a few integers).
#[test]
fn pruned_coreset_picks_equal_the_reference_on_clustered_points() {
    let (n, d, clusters) = (6000, 16, 24);
    let mut rng = Rng::new(41);
    let centres = rng.normals(clusters * d, 0.0, 100.0);
    let mut features = vec![0f32; n * d];
    for row in features.chunks_exact_mut(d) {
        let cluster = (rng.next_u64() % clusters as u64) as usize;
        for (x, &c) in row.iter_mut().zip(&centres[cluster * d..(cluster + 1) * d]) {
            *x = c + (rng.next_u64() % 3) as f32;
        }
    }
    for row in (1..n).step_by(2) {
        features.copy_within((row - 1) * d..row * d, row * d);
    }
    for (ratio, projection) in [(0.3, 0), (0.05, 8)] {
        let settings = CoresetSettings { ratio, projection, seed: 3 };
        let space = CoresetSpace::new(&features, n, d, &settings).unwrap();
        let (picks, updated) = fast::select_with_updates(space.clone());
        assert_eq!(picks, reference::greedy(&space), "ratio {ratio}, projection {projection}");
        assert!(updated < 0.2, "ratio {ratio}, projection {projection}: {updated} of a plain scan's distances summed");
    }
}

/// Structureless points in 64 dimensions: the cells would measure nearly every point, so the CPU path
/// stays a plain scan, and must still pick exactly the reference's points.
#[test]
fn unprunable_coreset_picks_equal_the_reference() {
    let (n, d) = (3000, 64);
    let features = Rng::new(43).normals(n * d, 0.0, 1.0);
    let space = CoresetSpace::new(&features, n, d, &CoresetSettings { ratio: 0.2, projection: 0, seed: 5 }).unwrap();
    let (picks, updated) = fast::select_with_updates(space.clone());
    assert_eq!(picks, reference::greedy(&space));
    assert!(updated > 0.9, "{updated} of a plain scan's distances summed");
}

#[test]
fn coreset_seeds_change_the_picks_and_repeat_them() {
    let case = &CORESET_CASES[0];
    let features = coreset_data(case, 5);
    let picks = |seed| fast::coreset(&features, case.n, case.d, &CoresetSettings { ratio: 0.05, projection: 16, seed }).unwrap();
    assert_eq!(picks(1), picks(1));
    assert_ne!(picks(1), picks(2));
}

#[test]
fn invalid_coreset_requests_are_refused() {
    let kernels = kernels();
    let settings = CoresetSettings::default();
    let features = vec![1.0f32; 30];
    type Path<'a> = Box<dyn Fn(&[f32], usize, usize, &CoresetSettings) -> Result<Vec<u32>, KernelError> + 'a>;
    let paths: [(&str, Path); 3] = [
        ("reference", Box::new(reference::coreset)),
        ("fast", Box::new(fast::coreset)),
        ("gpu", Box::new(|f: &[f32], n, d, s: &CoresetSettings| kernels.coreset(f, n, d, s))),
    ];
    for (name, path) in &paths {
        assert!(matches!(path(&[], 0, 3, &settings), Err(KernelError::Shape(_))), "{name}: empty bank");
        assert!(matches!(path(&[], 10, 0, &settings), Err(KernelError::Shape(_))), "{name}: D = 0");
        assert!(matches!(path(&features, 11, 3, &settings), Err(KernelError::Shape(_))), "{name}: wrong length");
        for ratio in [0.0, 1.5, -1.0, f64::NAN] {
            let error = path(&features, 10, 3, &CoresetSettings { ratio, ..settings }).unwrap_err();
            assert!(matches!(error, KernelError::InvalidRatio(_)) && error.to_string().contains("ratio"), "{name}: ratio {ratio}");
        }
        let mut bad = features.clone();
        bad[7] = f32::INFINITY;
        assert!(matches!(path(&bad, 10, 3, &settings), Err(KernelError::NonFinite { row: 2, column: 1 })), "{name}: infinity");
        // All points equal: every distance is 0 and the picks run in index order after the start.
        let picks = path(&features, 10, 3, &CoresetSettings { ratio: 0.5, ..settings }).unwrap();
        let start = picks[0];
        let expected: Vec<u32> = std::iter::once(start).chain((0..10).filter(|&i| i != start).take(4)).collect();
        assert_eq!(picks, expected, "{name}: equal points");
    }
    // A device block (32 points of 600 unprojected dimensions, 19,200 bytes) over a 16 KiB binding.
    let small = GpuKernels::shared().unwrap().with_limits(small_limits(&kernels, 16 * 1024));
    let wide = CoresetSpace::new(&vec![1.0f32; 2 * 600], 2, 600, &CoresetSettings { ratio: 1.0, projection: 0, seed: 0 }).unwrap();
    let error = small.coreset_select(&wide, CoresetChunking::default()).unwrap_err();
    assert!(
        matches!(error, KernelError::Shape(_)) && error.to_string().contains("19200 bytes") && error.to_string().contains("--device cpu"),
        "{error}"
    );
}

/// Not a check but a measurement, printed: what handing burn's backbone output to our kernels through
/// the host costs (`into_data`, then `upload`, which also computes the row norms), for an
/// EfficientNet-Lite0 batch of 8: the pooled features and the two feature maps PatchCore takes. burn
/// 0.22 reaches a tensor's wgpu buffer only through internals (the dispatch tensor's cubecl variant,
/// then cubecl's `get_resource` for its wgpu server: a pooled buffer at an offset), so the handoff goes
/// through the host. Run it by name: `cargo test --release --test it host_copy -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement that prints figures; run it by name"]
fn host_copy_between_burn_and_the_kernels() {
    let device = wgpu_device();
    let context = anomaly_device::GpuContext::get().unwrap();
    let kernels = GpuKernels::shared().unwrap();
    eprintln!("adapter {}; median of 15 runs after a warm-up", context.adapter);
    measure(&kernels, &device, "pooled [8, 1280]", [8, 1280], 1280);
    // Maps become rows of channels (one per patch); the layout change is not part of the copy measured.
    measure(&kernels, &device, "map [8, 40, 28, 28]", [8, 40, 28, 28], 40);
    measure(&kernels, &device, "map [8, 112, 14, 14]", [8, 112, 14, 14], 112);
}

fn measure<const D: usize>(kernels: &GpuKernels, device: &burn::tensor::Device, name: &str, shape: [usize; D], cols: usize) {
    use burn::tensor::wgpu::wgpu;
    use burn::tensor::{Distribution, Tensor};
    use std::time::Instant;

    let median = |mut times: Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let wgpu_device = &anomaly_device::GpuContext::get().unwrap().setup.device;
    let tensor = Tensor::<D>::random(shape, Distribution::Normal(0.0, 1.0), device);
    let values: Vec<f32> = tensor.clone().into_data().try_into_vec().unwrap();
    let rows = values.len() / cols;
    let (mut read, mut upload, mut norms) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..16 {
        let start = Instant::now();
        let data: Vec<f32> = tensor.clone().into_data().try_into_vec().unwrap();
        read.push(start.elapsed().as_secs_f64() * 1e3);
        // The call copies the values into a new wgpu buffer and submits the row norms; the wait runs them.
        let start = Instant::now();
        let matrix = kernels.upload(&data, rows, cols).unwrap();
        upload.push(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        wgpu_device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
        norms.push(start.elapsed().as_secs_f64() * 1e3);
        drop(matrix);
    }
    let (read, upload, norms) = (median(read[1..].to_vec()), median(upload[1..].to_vec()), median(norms[1..].to_vec()));
    let mib = (values.len() * 4) as f64 / (1 << 20) as f64;
    eprintln!(
        "{name:<22} {mib:5.2} MiB: into_data {read:6.3} ms ({:5.2} GB/s), upload {upload:6.3} ms ({:5.2} GB/s), \
         then row norms {norms:6.3} ms",
        mib * 1.048576e-3 / (read * 1e-3),
        mib * 1.048576e-3 / (upload * 1e-3),
    );
}
