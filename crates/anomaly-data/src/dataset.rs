use std::path::{Path, PathBuf};

use crate::DataError;
use crate::walk::{ImageFiles, SkipReason, Skipped, Walk, has_image_extension, sorted_entries};

/// Whether an image shows a good part or a defective one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Label {
    Good,
    Defective,
}

/// Which part of a dataset an image belongs to: the good images a model learns from, or the held-out ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Test,
}

/// One image of a dataset with what is known about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub path: PathBuf,
    pub split: Split,
    pub label: Label,
    /// The defect type (the MVTec AD folder name), `"good"` for good images.
    pub defect: String,
    /// The ground-truth mask, where the dataset has one.
    pub mask: Option<PathBuf>,
}

/// A set of labelled images, in a stable (sorted) order.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// A short name for reports: the category folder's name.
    pub name: String,
    pub samples: Vec<Sample>,
    /// What reading the dataset passed over (link loops, broken links, stray files), for the user to see.
    pub skipped: Vec<Skipped>,
}

impl Dataset {
    /// Reads an MVTec AD category: `train/good`, `test/<defect>`, and masks in
    /// `ground_truth/<defect>/<name>_mask.png` where they exist. Subfolders of these are read too (their
    /// masks at the same relative place under `ground_truth/<defect>`); no folder is read twice.
    pub fn mvtec(root: &Path) -> Result<Self, DataError> {
        let train_good = root.join("train").join("good");
        if !train_good.is_dir() {
            return Err(DataError::NotMvtec { path: root.into() });
        }
        let mut walk = Walk::new(&[root, &root.join("train"), &root.join("test"), &root.join("ground_truth")]);
        let train = walk.images(&train_good)?;
        if train.is_empty() {
            return Err(DataError::NoImages { path: train_good });
        }
        let mut samples: Vec<Sample> = train
            .into_iter()
            .map(|path| Sample { path, split: Split::Train, label: Label::Good, defect: "good".into(), mask: None })
            .collect();
        let test = root.join("test");
        if test.is_dir() {
            for entry in sorted_entries(&test)? {
                if !entry.is_dir() {
                    if has_image_extension(&entry) {
                        walk.skipped.push(Skipped { path: entry, reason: SkipReason::OutsideLayout });
                    }
                    continue;
                }
                let defect = file_name(&entry);
                let label = if defect == "good" { Label::Good } else { Label::Defective };
                let mask_dir = root.join("ground_truth").join(&defect);
                for path in walk.images(&entry)? {
                    let mask = (label == Label::Defective).then(|| mask_path(&entry, &path, &mask_dir)).flatten();
                    samples.push(Sample { path, split: Split::Test, label, defect: defect.clone(), mask });
                }
            }
        }
        Ok(Self { name: file_name(root), samples, skipped: walk.skipped })
    }

    /// Plain folders: the good images to learn from and, optionally, defective ones to test with.
    pub fn folders(good: &Path, defective: Option<&Path>) -> Result<Self, DataError> {
        let found = collect_images(good)?;
        let mut skipped = found.skipped;
        let mut samples: Vec<Sample> = found
            .files
            .into_iter()
            .map(|path| Sample { path, split: Split::Train, label: Label::Good, defect: "good".into(), mask: None })
            .collect();
        if let Some(defective) = defective {
            let found = collect_images(defective)?;
            skipped.extend(found.skipped);
            samples.extend(found.files.into_iter().map(|path| Sample {
                path,
                split: Split::Test,
                label: Label::Defective,
                defect: "defective".into(),
                mask: None,
            }));
        }
        Ok(Self { name: file_name(good), samples, skipped })
    }

    /// Any input a user may point at: an MVTec AD category, a folder of images (all taken as good
    /// training images), or a single image file. A folder that looks like an MVTec AD category (it has
    /// `train/`, `test/` or `ground_truth/`) but lacks `train/good` is an error, never a folder of good
    /// images: its defects and masks would be learnt as good.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        if path.join("train").join("good").is_dir() {
            return Self::mvtec(path);
        }
        let parts = mvtec_parts(path);
        if !parts.is_empty() {
            return Err(DataError::IncompleteMvtec { path: path.into(), found: parts.join(", ") });
        }
        if path.is_dir() || path.is_file() {
            let found = collect_images(path)?;
            let samples = found
                .files
                .into_iter()
                .map(|path| Sample { path, split: Split::Train, label: Label::Good, defect: "good".into(), mask: None })
                .collect();
            Ok(Self { name: file_name(path), samples, skipped: found.skipped })
        } else {
            Err(DataError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")))
        }
    }

    /// The samples of one split.
    pub fn split(&self, split: Split) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(move |s| s.split == split)
    }
}

/// The folders of the MVTec AD layout (`train`, `test`, `ground_truth`) that `path` has: a folder with any
/// of them is meant as a category, never as a plain folder of good images.
pub fn mvtec_parts(path: &Path) -> Vec<&'static str> {
    ["train", "test", "ground_truth"].into_iter().filter(|part| path.join(part).is_dir()).collect()
}

/// The image files a path names: the file itself, or every image under a folder (recursively, sorted,
/// each folder once), with what the walk passed over. An error if there are none.
pub fn collect_images(path: &Path) -> Result<ImageFiles, DataError> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(DataError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")));
        }
        Err(error) => return Err(DataError::io(path, error)),
    };
    if metadata.is_file() {
        return Ok(ImageFiles { files: vec![path.into()], skipped: Vec::new() });
    }
    if !metadata.is_dir() {
        return Err(DataError::NotImage { path: path.into() });
    }
    let found = Walk::new(&[]).walk(path)?;
    if found.files.is_empty() {
        return Err(DataError::NoImages { path: path.into() });
    }
    Ok(found)
}

/// The ground-truth mask of a defective image at `image` under `defect_dir`, where it exists: the same
/// relative place under `mask_dir`, named `<stem>_mask.png`.
fn mask_path(defect_dir: &Path, image: &Path, mask_dir: &Path) -> Option<PathBuf> {
    let relative = image.strip_prefix(defect_dir).ok()?;
    let stem = relative.file_stem()?.to_string_lossy();
    let mask = mask_dir.join(relative.parent().unwrap_or(Path::new(""))).join(format!("{stem}_mask.png"));
    mask.is_file().then_some(mask)
}

fn file_name(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}
