use std::path::Path;

use anomaly_data::Preprocess;
use anomaly_fs::FileBytes;

use super::*;

/// Seeded values in [-1, 1).
fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn geometry() -> PatchGeometry {
    PatchGeometry { grid: (3, 4), patch_dim: 6, side: 16 }
}

/// The leave-one-out scores written out plainly: each image's worst patch's distance to the nearest
/// bank row (by index into `picks`, ascending) from another image.
fn plain_leave_one_out(patches: &[f32], picks: &[u32], geometry: PatchGeometry) -> Vec<f32> {
    let (per_image, dim) = (geometry.per_image(), geometry.patch_dim);
    let images = patches.len() / (per_image * dim);
    (0..images)
        .map(|image| {
            (0..per_image)
                .map(|p| {
                    let patch = &patches[(image * per_image + p) * dim..][..dim];
                    picks
                        .iter()
                        .filter(|&&pick| pick as usize / per_image != image)
                        .map(|&pick| squared_distance(patch, &patches[pick as usize * dim..][..dim]) as f64)
                        .fold(f64::INFINITY, f64::min)
                        .sqrt()
                })
                .fold(0.0, f64::max) as f32
        })
        .collect()
}

#[test]
fn leave_one_out_scores_skip_the_images_own_bank_rows() {
    let geometry = geometry();
    // Eight images whose patches repeat within an image (so an image's nearest bank rows are often all
    // its own and the exact scan is needed), at several coreset ratios.
    let mut patches = Vec::new();
    for image in 0..8u64 {
        let base = random(4 * geometry.patch_dim, image + 1);
        for p in 0..geometry.per_image() {
            let jitter = random(geometry.patch_dim, 100 + image * 31 + p as u64);
            patches.extend(base[(p % 4) * geometry.patch_dim..][..geometry.patch_dim].iter().zip(&jitter).map(|(b, j)| b + 0.01 * j));
        }
    }
    for ratio in [1.0, 0.5, 0.2] {
        let config = PatchCoreConfig { coreset_ratio: ratio, ..PatchCoreConfig::default() };
        let bank = PatchBank::fit(&patches, geometry, config, &Compute::Cpu).unwrap();
        let n = 8 * geometry.per_image();
        let mut picks = fast::coreset(&patches, n, geometry.patch_dim, &config.coreset()).unwrap();
        picks.sort_unstable();
        assert_eq!(bank.len(), picks.len());
        let expected = plain_leave_one_out(&patches, &picks, geometry);
        for (ours, plain) in bank.train_scores().iter().zip(&expected) {
            assert!((ours - plain).abs() <= 1e-4 * plain.max(1.0), "ratio {ratio}: {ours} vs {plain}");
        }
        assert!(bank.threshold() > 0.0 && bank.pixel_threshold() > 0.0);
        assert!(
            bank.train_map_maxima().iter().zip(bank.train_scores()).all(|(m, s)| *m <= s + 1e-5),
            "a blurred map peaks below its worst patch"
        );
    }
}

#[test]
fn an_image_scores_its_worst_patch_and_its_map_peaks_there() {
    let geometry = PatchGeometry { grid: (4, 4), patch_dim: 5, side: 32 };
    let patches = random(6 * 16 * 5, 7);
    let bank =
        PatchBank::fit(&patches, geometry, PatchCoreConfig { coreset_ratio: 1.0, ..PatchCoreConfig::default() }, &Compute::Cpu).unwrap();
    // A training image scores 0 against the whole bank (itself included); one patch moved far away makes
    // its image's score that patch's distance, and the map peak where the patch is.
    let mut query = patches[..16 * 5].to_vec();
    for v in &mut query[9 * 5..10 * 5] {
        *v += 3.0;
    }
    let scorer = bank.scorer(&Compute::Cpu).unwrap();
    let scored = scorer.score(&query).unwrap();
    assert_eq!(scored.len(), 1);
    let nearest = bank.rows().chunks_exact(5).map(|row| squared_distance(&query[9 * 5..10 * 5], row)).fold(f32::INFINITY, f32::min).sqrt();
    assert!((scored[0].score - nearest).abs() < 1e-4, "{} vs {nearest}", scored[0].score);
    let map = &scored[0].map;
    assert_eq!(map.len(), 32 * 32);
    let peak = map.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
    // Patch (2, 1) covers input rows 16..24 and columns 8..16.
    assert!((16..24).contains(&(peak / 32)) && (8..16).contains(&(peak % 32)), "peak at {peak}");
    assert!(scorer.score(&patches[..16 * 5]).unwrap()[0].score < 1e-3);
}

#[test]
fn reweighting_scales_the_score_by_a_weight_below_one() {
    let geometry = geometry();
    let patches = random(5 * geometry.per_image() * geometry.patch_dim, 3);
    let plain = PatchBank::fit(&patches, geometry, PatchCoreConfig::default(), &Compute::Cpu).unwrap();
    let config = PatchCoreConfig { reweight: true, ..PatchCoreConfig::default() };
    let reweighted = PatchBank::fit(&patches, geometry, config, &Compute::Cpu).unwrap();
    for (r, p) in reweighted.train_scores().iter().zip(plain.train_scores()) {
        assert!(*r > 0.0 && r < p, "{r} vs {p}");
    }
}

#[test]
fn too_few_images_or_a_bad_shape_are_errors_not_panics() {
    let geometry = geometry();
    let one = random(geometry.per_image() * geometry.patch_dim, 1);
    assert!(matches!(PatchBank::fit(&one, geometry, PatchCoreConfig::default(), &Compute::Cpu), Err(PatchCoreError::TooFewImages(1))));
    assert!(matches!(PatchBank::fit(&one[1..], geometry, PatchCoreConfig::default(), &Compute::Cpu), Err(PatchCoreError::Shape(_))));
    let bad_ratio = PatchCoreConfig { coreset_ratio: 0.0, ..PatchCoreConfig::default() };
    assert!(bad_ratio.check(10).is_err());
    // Two identical images: whichever the coreset starts from, the bank may hold one image's rows only.
    let twice = [one.clone(), one].concat();
    let tiny = PatchCoreConfig { coreset_ratio: 0.01, ..PatchCoreConfig::default() };
    assert!(matches!(PatchBank::fit(&twice, geometry, tiny, &Compute::Cpu), Err(PatchCoreError::OneImageBank { rows: 1, .. })));
}

fn source() -> PatchSource {
    PatchSource {
        backbone: "efficientnet-lite0".into(),
        weights_file: "w.pth".into(),
        weights_sha256: "ab".repeat(32),
        preprocess: Preprocess { resize: 18, crop: 16, mean: [0.5; 3], std: [0.5; 3] },
        taps: ["block4".into(), "block10".into()],
        dataset: "synthetic".into(),
    }
}

#[test]
fn the_model_file_round_trips_and_refuses_corruption() {
    let geometry = geometry();
    let patches = random(4 * geometry.per_image() * geometry.patch_dim, 9);
    let bank =
        PatchBank::fit(&patches, geometry, PatchCoreConfig { coreset_ratio: 0.5, ..PatchCoreConfig::default() }, &Compute::Cpu).unwrap();
    let model = PatchCoreModel::new(bank, source());
    model.check_values().unwrap();
    let bytes = model.to_bytes();
    let path = Path::new("model.safetensors");
    let read = PatchCoreModel::from_bytes(&bytes, path).unwrap();
    // (JSON may move an f64 statistic by its last bit; the tensors and thresholds are exact.)
    assert_eq!(read.bank().rows(), model.bank().rows());
    assert_eq!(read.bank().train_scores(), model.bank().train_scores());
    assert_eq!(read.bank().train_map_maxima(), model.bank().train_map_maxima());
    assert!(read.bank().fit_seconds().is_none() && model.bank().fit_seconds().is_some());
    assert_eq!(
        (read.info().threshold, read.info().pixel_threshold, &read.info().source),
        (model.info().threshold, model.info().pixel_threshold, &model.info().source)
    );

    // A NaN in the bank is named with its place.
    let mut rows = model.bank().rows().to_vec();
    rows[2 * geometry.patch_dim + 3] = f32::NAN;
    let corrupt = PatchBank::from_parts(
        *model.bank().config(),
        geometry,
        BankRows::Owned(rows),
        model.bank().train_patches(),
        model.bank().train_scores().to_vec(),
        model.bank().train_map_maxima().to_vec(),
    )
    .unwrap();
    let corrupt = PatchCoreModel { info: model.info().clone(), bank: corrupt }.to_bytes();
    let error = PatchCoreModel::from_bytes(&corrupt, path).unwrap_err().to_string();
    assert!(error.contains("tensor \"bank\" holds NaN at row 2, column 3"), "{error}");
    // The same when the file is memory-mapped and its bank read in place.
    let dir = tempfile::tempdir().unwrap();
    let mapped_path = dir.path().join("model.safetensors");
    std::fs::write(&mapped_path, &corrupt).unwrap();
    let error = PatchCoreModel::from_file(&FileBytes::open(&mapped_path, 0).unwrap(), &mapped_path).unwrap_err().to_string();
    assert!(error.contains("tensor \"bank\" holds NaN at row 2, column 3"), "{error}");

    // Every truncation is an error, never a panic.
    for cut in (0..bytes.len()).step_by(97) {
        assert!(PatchCoreModel::from_bytes(&bytes[..cut], path).is_err());
    }
    // A header declaring an impossible geometry is refused before any tensor is read.
    let mut info = model.info().clone();
    info.geometry.grid = (0, 4);
    let error = PatchCoreModel::from_bytes(&PatchCoreModel { info, bank: model.bank().clone() }.to_bytes(), path).unwrap_err().to_string();
    assert!(error.contains("patch geometry"), "{error}");
}

#[test]
fn a_mapped_model_file_scores_its_bank_in_place_as_one_read_into_memory() {
    let geometry = geometry();
    let patches = random(6 * geometry.per_image() * geometry.patch_dim, 13);
    for reweight in [false, true] {
        let config = PatchCoreConfig { coreset_ratio: 0.5, reweight, ..PatchCoreConfig::default() };
        let model = PatchCoreModel::new(PatchBank::fit(&patches, geometry, config, &Compute::Cpu).unwrap(), source());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, model.to_bytes()).unwrap();
        let read = PatchCoreModel::from_file(&FileBytes::open(&path, u64::MAX).unwrap(), &path).unwrap();
        let mapped = PatchCoreModel::from_file(&FileBytes::open(&path, 0).unwrap(), &path).unwrap();
        assert!(!read.bank().is_mapped() && mapped.bank().is_mapped());
        assert_eq!(mapped.bank(), read.bank());
        let queries = random(3 * geometry.per_image() * geometry.patch_dim, 14);
        let expected = read.bank().scorer(&Compute::Cpu).unwrap().score(&queries).unwrap();
        // Streamed a chunk of rows at a time (here the whole bank, as it is smaller than a chunk) and in
        // chunks of one row.
        assert_eq!(mapped.bank().scorer(&Compute::Cpu).unwrap().score(&queries).unwrap(), expected);
        let one_row = nearest_in_chunks(&queries, geometry.patch_dim, mapped.bank().row_chunks(1), &Compute::Cpu).unwrap();
        let whole = fast::knn(&queries, read.bank().rows(), geometry.patch_dim, 1);
        assert_eq!(one_row.indices, whole.indices);
    }
}

/// Writes `patches` through a writer planned with `budget`, `images_per_push` images at a time.
fn written(patches: &[f32], geometry: PatchGeometry, config: &PatchCoreConfig, budget: u64, dir: &Path) -> TrainPatches<'static> {
    let images = patches.len() / (geometry.per_image() * geometry.patch_dim);
    let plan = MemoryPlan::new(images, geometry, config, &Compute::Cpu, budget).unwrap();
    let mut writer = TrainPatchesWriter::new(&plan, geometry, images, dir).unwrap();
    for image in patches.chunks(3 * geometry.per_image() * geometry.patch_dim) {
        writer.push(image).unwrap();
    }
    writer.finish().unwrap()
}

#[test]
fn a_spilled_fit_read_in_chunks_gives_the_in_memory_bank_and_thresholds() {
    let geometry = geometry();
    let images = 11;
    let patches = random(images * geometry.per_image() * geometry.patch_dim, 5);
    let dir = tempfile::tempdir().unwrap();
    for reweight in [false, true] {
        let config = PatchCoreConfig { coreset_ratio: 0.3, projection: 4, reweight, ..PatchCoreConfig::default() };
        let in_memory = PatchBank::fit(&patches, geometry, config, &Compute::Cpu).unwrap();
        let whole = MemoryPlan::new(images, geometry, &config, &Compute::Cpu, u64::MAX).unwrap();
        assert!(!whole.spills() && whole.chunk_images() == images);
        // A budget that holds the coreset, the bank and two images' patches: read two at a time.
        let image_bytes = (geometry.per_image() * (geometry.patch_dim * 4 + LEAVE_ONE_OUT_K * 8)) as u64;
        let budget = whole.working_bytes() + 2 * image_bytes + image_bytes / 2;
        let plan = MemoryPlan::new(images, geometry, &config, &Compute::Cpu, budget).unwrap();
        assert!(plan.spills() && plan.chunk_images() == 2, "{plan:?}");
        let train = written(&patches, geometry, &config, budget, dir.path());
        assert!(train.spilled() && train.images() == images);
        // Unnamed on Linux: the folder shows nothing even while the spill file is open.
        assert!(std::fs::read_dir(dir.path()).unwrap().count() <= 1);
        let chunks: Vec<(usize, usize)> = train.chunks().map(|(first, values)| (first, values.len())).collect();
        let image_len = geometry.per_image() * geometry.patch_dim;
        assert_eq!(chunks, [(0, 2), (2, 2), (4, 2), (6, 2), (8, 2), (10, 1)].map(|(f, n)| (f, n * image_len)));
        let spilled = PatchBank::fit_from(&train, config, &Compute::Cpu).unwrap();
        assert_eq!(spilled.rows(), in_memory.rows(), "the same coreset picks");
        assert_eq!(spilled.train_scores(), in_memory.train_scores());
        assert_eq!(spilled.train_map_maxima(), in_memory.train_map_maxima());
        drop(train);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the spill file goes with the patches");
    }
}

#[test]
fn a_budget_below_the_coreset_and_one_image_is_refused_with_the_minimum() {
    let geometry = PatchGeometry { grid: (28, 28), patch_dim: 1024, side: 224 };
    let config = PatchCoreConfig::default();
    // 5,000 images of 784 patches: a 128-d projection of 3.92 M patches on the 8-bit grid with an index,
    // a minimum and its pick each (5/4 of it: the cells' room), the picks' coordinates, a 10% bank of
    // 1024-d rows (twice), and one image.
    let patches = 5000 * 784u64;
    let picks = patches.div_ceil(10);
    let image = 784 * (1024 * 4 + LEAVE_ONE_OUT_K as u64 * 8);
    let minimum = 5 * patches * (128 + 12) / 4 + picks * (128 * 4 + 1536) + 2 * picks * 1024 * 4 + image;
    match MemoryPlan::new(5000, geometry, &config, &Compute::Cpu, minimum - 1) {
        Err(error @ PatchCoreError::BudgetTooSmall { .. }) => {
            let text = error.to_string();
            assert!(text.contains(&bytes_text(minimum)) && text.contains("--memory-budget"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    let plan = MemoryPlan::new(5000, geometry, &config, &Compute::Cpu, minimum).unwrap();
    assert!(plan.spills() && plan.chunk_images() == 1);
    assert_eq!(bytes_text(100 << 20), "100.00 MiB");
    assert_eq!(bytes_text(1000), "1000 B");
}

#[test]
fn a_spill_folder_that_cannot_be_written_is_named() {
    let geometry = geometry();
    let config = PatchCoreConfig::default();
    let whole = MemoryPlan::new(100, geometry, &config, &Compute::Cpu, u64::MAX).unwrap();
    let plan = MemoryPlan::new(100, geometry, &config, &Compute::Cpu, whole.working_bytes() + whole.features_bytes() / 2).unwrap();
    assert!(plan.spills());
    let missing = Path::new("/nonexistent/spill");
    match TrainPatchesWriter::new(&plan, geometry, 100, missing) {
        Err(error @ PatchCoreError::Spill { .. }) => assert!(error.to_string().contains("/nonexistent/spill"), "{error}"),
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn a_bank_scored_in_chunks_from_a_mapped_file_gives_the_whole_banks_nearest_rows() {
    let dim = 37;
    let bank = random(1000 * dim, 21);
    // Queries near rows of the bank (so the nearest is plain), far from all, and a duplicate row's twin
    // (ties go to the lower row).
    let mut bank = bank;
    bank.copy_within(10 * dim..11 * dim, 700 * dim);
    let mut queries: Vec<f32> = bank[10 * dim..11 * dim].to_vec();
    queries.extend(random(40 * dim, 22));
    queries.extend(bank[999 * dim..1000 * dim].iter().map(|v| v + 0.001));
    let whole = fast::knn(&queries, &bank, dim, 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bank.f32");
    std::fs::write(&path, bytemuck::cast_slice::<f32, u8>(&bank)).unwrap();
    let mapped = MappedRows::map(&std::fs::File::open(&path).unwrap(), &path, dim).unwrap();
    assert_eq!(mapped.rows(), 1000);
    // The kNN expands |q − r|² into |q|² + |r|² − 2 q·r, summed in an order that depends on the tiling (and
    // on the CPU's vector width): a squared distance is exact to a few ulps of |q|² + |r|², not of itself.
    // A near-duplicate's distance (0.006 here) so differs by a few percent between chunkings.
    let (query_norms, bank_norms) = (fast::row_norms(&queries, dim), fast::row_norms(&bank, dim));
    for chunk_rows in [1000, 333, 64, 1] {
        let chunked = nearest_in_chunks(&queries, dim, mapped.chunks(chunk_rows * dim * 4), &Compute::Cpu).unwrap();
        assert_eq!(chunked.indices, whole.indices, "{chunk_rows} rows a chunk");
        for (q, (a, b)) in chunked.distances.iter().zip(&whole.distances).enumerate() {
            let scale = query_norms[q] + bank_norms[whole.indices[q] as usize];
            assert!((a * a - b * b).abs() <= 1e-6 * scale, "{chunk_rows} rows a chunk, query {q}: {a} vs {b}");
        }
    }
    assert_eq!(whole.indices[0], 10, "the duplicate's lower row");
    std::fs::write(&path, [0u8; 10]).unwrap();
    match MappedRows::map(&std::fs::File::open(&path).unwrap(), &path, dim) {
        Err(error @ PatchCoreError::Shape(_)) => assert!(error.to_string().contains("bank.f32"), "{error}"),
        other => panic!("{:?}", other.err()),
    }
}
