use std::path::{Path, PathBuf};

use crate::DataError;

const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

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
}

impl Dataset {
    /// Reads an MVTec AD category: `train/good`, `test/<defect>`, and masks in
    /// `ground_truth/<defect>/<name>_mask.png` where they exist.
    pub fn mvtec(root: &Path) -> Result<Self, DataError> {
        let train_good = root.join("train").join("good");
        if !train_good.is_dir() {
            return Err(DataError::NotMvtec { path: root.into() });
        }
        let mut samples: Vec<Sample> = image_files(&train_good)?
            .into_iter()
            .map(|path| Sample { path, split: Split::Train, label: Label::Good, defect: "good".into(), mask: None })
            .collect();
        let test = root.join("test");
        if test.is_dir() {
            for defect_dir in sorted_entries(&test)?.into_iter().filter(|p| p.is_dir()) {
                let defect = file_name(&defect_dir);
                let label = if defect == "good" { Label::Good } else { Label::Defective };
                let mask_dir = root.join("ground_truth").join(&defect);
                for path in image_files_or_empty(&defect_dir)? {
                    let mask = mask_dir.join(format!("{}_mask.png", file_stem(&path)));
                    let mask = (label == Label::Defective && mask.is_file()).then_some(mask);
                    samples.push(Sample { path, split: Split::Test, label, defect: defect.clone(), mask });
                }
            }
        }
        Ok(Self { name: file_name(root), samples })
    }

    /// Plain folders: the good images to learn from and, optionally, defective ones to test with.
    pub fn folders(good: &Path, defective: Option<&Path>) -> Result<Self, DataError> {
        let mut samples: Vec<Sample> = image_files(good)?
            .into_iter()
            .map(|path| Sample { path, split: Split::Train, label: Label::Good, defect: "good".into(), mask: None })
            .collect();
        if let Some(defective) = defective {
            samples.extend(image_files(defective)?.into_iter().map(|path| Sample {
                path,
                split: Split::Test,
                label: Label::Defective,
                defect: "defective".into(),
                mask: None,
            }));
        }
        Ok(Self { name: file_name(good), samples })
    }

    /// Any input a user may point at: an MVTec AD category, a folder of images (all taken as good
    /// training images), or a single image file.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        if path.join("train").join("good").is_dir() {
            Self::mvtec(path)
        } else if path.is_dir() || path.is_file() {
            let samples = collect_images(path)?
                .into_iter()
                .map(|path| Sample { path, split: Split::Train, label: Label::Good, defect: "good".into(), mask: None })
                .collect();
            Ok(Self { name: file_name(path), samples })
        } else {
            Err(DataError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")))
        }
    }

    /// The samples of one split.
    pub fn split(&self, split: Split) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(move |s| s.split == split)
    }
}

/// The image files a path names: the file itself, or every image under a folder (recursively, sorted).
pub fn collect_images(path: &Path) -> Result<Vec<PathBuf>, DataError> {
    if path.is_file() {
        return Ok(vec![path.into()]);
    }
    if !path.is_dir() {
        if path.exists() {
            return Err(DataError::NotImage { path: path.into() });
        }
        return Err(DataError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")));
    }
    let mut found = Vec::new();
    let mut pending = vec![path.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in sorted_entries(&dir)? {
            if entry.is_dir() {
                pending.push(entry);
            } else if has_image_extension(&entry) {
                found.push(entry);
            }
        }
    }
    found.sort();
    if found.is_empty() {
        return Err(DataError::NoImages { path: path.into() });
    }
    Ok(found)
}

/// The image files directly inside a folder; an error if there are none.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let files = image_files_or_empty(dir)?;
    if files.is_empty() {
        return Err(DataError::NoImages { path: dir.into() });
    }
    Ok(files)
}

fn image_files_or_empty(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    Ok(sorted_entries(dir)?.into_iter().filter(|p| p.is_file() && has_image_extension(p)).collect())
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let read = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut entries = read.map(|entry| entry.map(|e| e.path())).collect::<Result<Vec<_>, _>>().map_err(|e| DataError::io(dir, e))?;
    entries.sort();
    Ok(entries)
}

fn has_image_extension(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|known| e.eq_ignore_ascii_case(known)))
}

fn file_name(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn file_stem(path: &Path) -> String {
    path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}
