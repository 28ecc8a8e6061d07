//! Datasets and preprocessing: torchvision parity, layouts, and bad input.

use std::path::Path;

use anomaly_data::{DataError, Dataset, Label, Preprocess, Split, collect_images, load_rgb8};

use crate::common::{fixture, max_abs_diff, read_safetensors, shared_mvtec};

#[test]
fn preprocessing_matches_torchvision_exactly() {
    let expected = read_safetensors(&fixture("preprocess/expected.safetensors"));
    let imagenet = Preprocess::imagenet();
    let small = Preprocess { resize: 64, crop: 56, ..Preprocess::imagenet() };
    for (file, name, preprocess) in [("rgb.jpg", "rgb", &imagenet), ("gray16.png", "gray16", &small), ("rgba.png", "rgba", &small)] {
        let ours = preprocess.load(&fixture(&format!("preprocess/{file}"))).unwrap();
        let theirs = &expected[name];
        let side = preprocess.crop as usize;
        assert_eq!(theirs.shape, vec![3, side, side], "{name}");
        // Pillow's fixed-point resize and torchvision's f32 normalisation, reproduced: identical values.
        let worst = max_abs_diff(&ours.pixels, &theirs.values);
        assert_eq!(worst, 0.0, "{file}: max abs diff {worst} from torchvision");
    }
}

#[test]
fn gray_sixteen_bit_and_alpha_images_become_rgb() {
    for file in ["gray16.png", "rgba.png", "rgb.jpg"] {
        let image = load_rgb8(&fixture(&format!("preprocess/{file}"))).unwrap();
        assert!(image.width() > 0 && image.height() > 0);
    }
    let gray = load_rgb8(&fixture("preprocess/gray16.png")).unwrap();
    assert!(gray.pixels().all(|p| p[0] == p[1] && p[1] == p[2]), "gray replicated to three channels");
}

fn write_png(path: &Path, width: u32, height: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 7])).save(path).unwrap();
}

#[test]
fn mvtec_layout_is_read_with_labels_and_masks() {
    let root = tempfile::tempdir().unwrap();
    let cat = root.path().join("carpet");
    write_png(&cat.join("train/good/000.png"), 8, 8);
    write_png(&cat.join("train/good/001.png"), 8, 8);
    write_png(&cat.join("test/good/000.png"), 8, 8);
    write_png(&cat.join("test/cut/000.png"), 8, 8);
    write_png(&cat.join("test/cut/001.png"), 8, 8);
    write_png(&cat.join("ground_truth/cut/000_mask.png"), 8, 8);
    let dataset = Dataset::mvtec(&cat).unwrap();
    assert_eq!(dataset.name, "carpet");
    assert_eq!(dataset.split(Split::Train).count(), 2);
    let test: Vec<_> = dataset.split(Split::Test).collect();
    assert_eq!(test.len(), 3);
    let cut: Vec<_> = test.iter().filter(|s| s.defect == "cut").collect();
    assert!(cut.iter().all(|s| s.label == Label::Defective));
    assert!(cut[0].mask.is_some(), "mask found");
    assert!(cut[1].mask.is_none(), "a missing mask is allowed");
    assert_eq!(test.iter().filter(|s| s.label == Label::Good).count(), 1);
}

#[test]
fn the_shared_bottle_category_is_complete() {
    let Some(bottle) = shared_mvtec("bottle", "data::the_shared_bottle_category_is_complete") else { return };
    let dataset = Dataset::mvtec(&bottle).unwrap();
    assert_eq!(dataset.split(Split::Train).count(), 209);
    let test: Vec<_> = dataset.split(Split::Test).collect();
    assert_eq!(test.len(), 83);
    let defective = test.iter().filter(|s| s.label == Label::Defective).count();
    assert_eq!(defective, 63);
    assert_eq!(test.iter().filter(|s| s.mask.is_some()).count(), defective);
}

#[test]
fn a_missing_shared_category_is_skipped_not_failed() {
    assert_eq!(shared_mvtec("no-such-category", "data::a_missing_shared_category_is_skipped_not_failed"), None);
}

#[test]
fn plain_folders_and_single_files_are_accepted() {
    let root = tempfile::tempdir().unwrap();
    write_png(&root.path().join("good/a.png"), 8, 8);
    write_png(&root.path().join("good/sub/b.PNG"), 8, 8);
    write_png(&root.path().join("bad/c.png"), 8, 8);
    let dataset = Dataset::folders(&root.path().join("good"), Some(&root.path().join("bad"))).unwrap();
    assert_eq!(dataset.split(Split::Train).count(), 1, "folders() takes the images directly inside");
    assert_eq!(dataset.split(Split::Test).count(), 1);
    assert_eq!(collect_images(&root.path().join("good")).unwrap().len(), 2, "collect_images recurses");
    let single = root.path().join("bad/c.png");
    assert_eq!(collect_images(&single).unwrap(), vec![single]);
}

#[test]
fn bad_images_and_folders_give_errors_naming_the_path() {
    let root = tempfile::tempdir().unwrap();
    let truncated = root.path().join("truncated.png");
    let full = std::fs::read(fixture("preprocess/rgba.png")).unwrap();
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    let truncated_jpeg = root.path().join("truncated.jpg");
    let full_jpeg = std::fs::read(fixture("preprocess/rgb.jpg")).unwrap();
    std::fs::write(&truncated_jpeg, &full_jpeg[..full_jpeg.len() / 2]).unwrap();
    let corrupt_jpeg = root.path().join("corrupt.jpg");
    let mut corrupt = full_jpeg.clone();
    corrupt[2..600].fill(0x55);
    std::fs::write(&corrupt_jpeg, &corrupt).unwrap();
    let text = root.path().join("notes.png");
    std::fs::write(&text, "this is not an image\n").unwrap();
    let empty = root.path().join("empty");
    std::fs::create_dir(&empty).unwrap();

    for path in [&truncated, &truncated_jpeg, &corrupt_jpeg, &text] {
        let error = Preprocess::imagenet().load(path).unwrap_err();
        assert!(matches!(error, DataError::Decode { .. }), "{error}");
        assert!(error.to_string().contains(&path.display().to_string()), "{error}");
    }
    let error = collect_images(&empty).unwrap_err();
    assert!(matches!(error, DataError::NoImages { .. }) && error.to_string().contains("empty"), "{error}");
    let error = Dataset::mvtec(&empty).unwrap_err();
    assert!(matches!(error, DataError::NotMvtec { .. }) && error.to_string().contains("train/good"), "{error}");
    let error = Dataset::open(&root.path().join("nowhere")).unwrap_err();
    assert!(error.to_string().contains("nowhere"), "{error}");
}

#[test]
fn synthetic_datasets_are_reproducible_masked_and_never_overwrite_other_folders() {
    use anomaly_data::{SYNTHETIC_DEFECTS, SyntheticConfig, write_synthetic_dataset};
    let dir = tempfile::tempdir().unwrap();
    let config = SyntheticConfig { seed: 3, size: 64, train: 3, test_good: 2, per_defect: 2 };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    write_synthetic_dataset(&a, &config).unwrap();
    write_synthetic_dataset(&b, &config).unwrap();
    let dataset = Dataset::mvtec(&a).unwrap();
    assert_eq!(dataset.split(Split::Train).count(), 3);
    assert_eq!(dataset.split(Split::Test).count(), 2 + 2 * SYNTHETIC_DEFECTS.len());
    for sample in dataset.split(Split::Test) {
        let twin = b.join(sample.path.strip_prefix(&a).unwrap());
        assert_eq!(std::fs::read(&sample.path).unwrap(), std::fs::read(&twin).unwrap(), "same seed, same bytes");
        if sample.label == Label::Defective {
            let mask = anomaly_data::load_mask(sample.mask.as_ref().expect("every defect has a mask")).unwrap();
            let marked = mask.pixels().filter(|p| p[0] > 0).count();
            assert!(marked > 0 && marked < 64 * 64 / 4, "{}: {marked} mask pixels", sample.path.display());
        }
    }
    // Regenerating replaces an earlier synthetic set; any other folder is left alone.
    write_synthetic_dataset(&a, &SyntheticConfig { seed: 4, ..config.clone() }).unwrap();
    assert_ne!(std::fs::read(a.join("train/good/000.png")).unwrap(), std::fs::read(b.join("train/good/000.png")).unwrap());
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("keep.txt"), "mine").unwrap();
    let error = write_synthetic_dataset(&other, &config).unwrap_err().to_string();
    assert!(error.contains("not a synthetic dataset"), "{error}");
    assert!(other.join("keep.txt").is_file());
    let leftovers =
        std::fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.')).count();
    assert_eq!(leftovers, 0, "no staging folders left behind");
}
