//! Datasets and preprocessing: torchvision parity, layouts, and bad input.

use std::path::Path;

use anomaly_data::{DataError, Dataset, ImageLimits, Label, Preprocess, Split, collect_images, load_rgb8};

use crate::common::{fixture, max_abs_diff, read_safetensors, shared_mvtec};

#[test]
fn preprocessing_matches_torchvision_exactly() {
    let expected = read_safetensors(&fixture("preprocess/expected.safetensors"));
    let imagenet = Preprocess::imagenet();
    let small = Preprocess { resize: 64, crop: 56, ..Preprocess::imagenet() };
    for (file, name, preprocess) in [("rgb.jpg", "rgb", &imagenet), ("gray16.png", "gray16", &small), ("rgba.png", "rgba", &small)] {
        let ours = preprocess.load(&fixture(&format!("preprocess/{file}")), &ImageLimits::default()).unwrap();
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
        let image = load_rgb8(&fixture(&format!("preprocess/{file}")), &ImageLimits::default()).unwrap();
        assert!(image.width() > 0 && image.height() > 0);
    }
    let gray = load_rgb8(&fixture("preprocess/gray16.png"), &ImageLimits::default()).unwrap();
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
    assert_eq!(dataset.split(Split::Train).count(), 2, "folders() reads subfolders too");
    assert_eq!(dataset.split(Split::Test).count(), 1);
    assert_eq!(collect_images(&root.path().join("good")).unwrap().files.len(), 2, "collect_images recurses");
    let single = root.path().join("bad/c.png");
    assert_eq!(collect_images(&single).unwrap().files, vec![single]);
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
        let error = Preprocess::imagenet().load(path, &ImageLimits::default()).unwrap_err();
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
            let mask = anomaly_data::load_mask(sample.mask.as_ref().expect("every defect has a mask"), &ImageLimits::default()).unwrap();
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

/// CRC-32 (IEEE), for rewriting a PNG chunk so that only its declared size is hostile.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A small real image of `format`, then the same file with its header claiming 65000 × 65000 pixels.
fn image_and_bomb(format: image::ImageFormat) -> (Vec<u8>, Vec<u8>) {
    let image = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 90]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, format).unwrap();
    let real = bytes.into_inner();
    let mut bomb = real.clone();
    let side = 65000u32;
    match format {
        image::ImageFormat::Jpeg => {
            let sof = bomb.windows(2).position(|w| w == [0xFF, 0xC0]).expect("a baseline JPEG");
            bomb[sof + 5..sof + 7].copy_from_slice(&(side as u16).to_be_bytes());
            bomb[sof + 7..sof + 9].copy_from_slice(&(side as u16).to_be_bytes());
        }
        image::ImageFormat::Png => {
            bomb[16..20].copy_from_slice(&side.to_be_bytes());
            bomb[20..24].copy_from_slice(&side.to_be_bytes());
            let crc = crc32(&bomb[12..29]);
            bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        }
        image::ImageFormat::Bmp => {
            bomb[18..22].copy_from_slice(&(side as i32).to_le_bytes());
            bomb[22..26].copy_from_slice(&(side as i32).to_le_bytes());
        }
        image::ImageFormat::Tiff => {
            assert_eq!(&bomb[..2], b"II", "the image crate writes little-endian TIFF");
            let ifd = u32::from_le_bytes(bomb[4..8].try_into().unwrap()) as usize;
            let entries = u16::from_le_bytes(bomb[ifd..ifd + 2].try_into().unwrap()) as usize;
            for entry in (0..entries).map(|i| ifd + 2 + 12 * i) {
                let tag = u16::from_le_bytes(bomb[entry..entry + 2].try_into().unwrap());
                let kind = u16::from_le_bytes(bomb[entry + 2..entry + 4].try_into().unwrap());
                if tag == 256 || tag == 257 {
                    match kind {
                        3 => bomb[entry + 8..entry + 10].copy_from_slice(&(side as u16).to_le_bytes()),
                        _ => bomb[entry + 8..entry + 12].copy_from_slice(&side.to_le_bytes()),
                    }
                }
            }
        }
        other => panic!("no bomb for {other:?}"),
    }
    (real, bomb)
}

#[test]
fn images_over_the_pixel_limit_are_refused_from_their_header_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    for (format, extension) in [
        (image::ImageFormat::Jpeg, "jpg"),
        (image::ImageFormat::Png, "png"),
        (image::ImageFormat::Bmp, "bmp"),
        (image::ImageFormat::Tiff, "tif"),
    ] {
        let (real, bomb) = image_and_bomb(format);
        let (real_path, bomb_path) = (dir.path().join(format!("real.{extension}")), dir.path().join(format!("bomb.{extension}")));
        std::fs::write(&real_path, &real).unwrap();
        std::fs::write(&bomb_path, &bomb).unwrap();
        // The real image decodes under the default limit and is refused under one smaller than it.
        assert_eq!(load_rgb8(&real_path, &ImageLimits::default()).unwrap().dimensions(), (64, 48), "{format:?}");
        let error = load_rgb8(&real_path, &ImageLimits::new(64 * 48 - 1)).unwrap_err();
        assert!(matches!(error, DataError::TooLarge { width: 64, height: 48, .. }), "{format:?}: {error}");
        // The bomb is refused before any pixel is decoded: a quick error, naming the file and the size.
        let start = std::time::Instant::now();
        for error in [
            load_rgb8(&bomb_path, &ImageLimits::default()).unwrap_err(),
            anomaly_data::load_mask(&bomb_path, &ImageLimits::default()).unwrap_err(),
        ] {
            if format == image::ImageFormat::Tiff && matches!(error, DataError::Decode { .. }) {
                // The TIFF reader already refuses a size its strips do not hold, before the limit is asked.
                assert!(error.to_string().contains("bomb.tif"), "{error}");
                continue;
            }
            assert!(matches!(error, DataError::TooLarge { width: 65000, height: 65000, .. }), "{format:?}: {error}");
            let message = error.to_string();
            assert!(
                message.contains(&bomb_path.display().to_string()) && message.contains("65000×65000") && message.contains("--max-pixels"),
                "{message}"
            );
        }
        assert!(start.elapsed().as_secs() < 5, "{format:?} bomb took {:?}", start.elapsed());
    }
}

#[cfg(unix)]
#[test]
fn walks_never_loop_and_say_what_they_skipped() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for i in 0..12 {
        crate::cli::write_png(&root.join(format!("{i:02}.png")), i as u8 + 1);
    }
    symlink(".", root.join("x")).unwrap();
    symlink(".", root.join("y")).unwrap();
    let found = collect_images(root).unwrap();
    assert_eq!(found.files.len(), 12, "{:?}", found.files);
    let skipped: Vec<String> = found.skipped.iter().map(ToString::to_string).collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(skipped[0].contains("/x") && skipped[0].contains("again"), "{skipped:?}");
}

#[cfg(unix)]
#[test]
fn mvtec_layouts_read_nested_folders_and_never_learn_defects_as_good() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let cat = dir.path().join("cat");
    crate::cli::write_png(&cat.join("train/good/a.png"), 1);
    crate::cli::write_png(&cat.join("train/good/batch2/b.png"), 2);
    crate::cli::write_png(&cat.join("test/crack/lot7/c.png"), 3);
    crate::cli::write_png(&cat.join("ground_truth/crack/lot7/c_mask.png"), 4);
    crate::cli::write_png(&cat.join("test/stray.png"), 5);
    symlink("../train/good", cat.join("test/good")).unwrap();
    symlink("..", cat.join("train/good/up")).unwrap();
    let dataset = Dataset::mvtec(&cat).unwrap();
    let train: Vec<_> = dataset.split(Split::Train).map(|s| s.path.strip_prefix(&cat).unwrap().to_path_buf()).collect();
    assert_eq!(train, [Path::new("train/good/a.png"), Path::new("train/good/batch2/b.png")]);
    let test: Vec<_> = dataset.split(Split::Test).collect();
    assert_eq!(test.len(), 1, "the good test folder is the training folder again: {test:?}");
    assert_eq!(test[0].mask.as_deref(), Some(cat.join("ground_truth/crack/lot7/c_mask.png").as_path()));
    let skipped: Vec<String> = dataset.skipped.iter().map(ToString::to_string).collect();
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert!(skipped.iter().any(|s| s.contains("stray.png") && s.contains("defect folder")), "{skipped:?}");

    // A category without train/good is never a folder of good images.
    let broken = dir.path().join("broken");
    crate::cli::write_png(&broken.join("train/Good/a.png"), 1);
    crate::cli::write_png(&broken.join("test/crack/c.png"), 3);
    crate::cli::write_png(&broken.join("ground_truth/crack/c_mask.png"), 4);
    let error = Dataset::open(&broken).unwrap_err();
    assert!(matches!(error, DataError::IncompleteMvtec { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("train, test, ground_truth") && message.contains("train/good"), "{message}");
}
