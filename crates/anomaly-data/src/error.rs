use std::path::PathBuf;

/// Why an image or a dataset could not be read; every variant names the file or folder at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file or folder could not be opened or listed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not an image we can decode (corrupt, truncated, or another kind of file).
    #[error("{path}: cannot decode image: {reason}")]
    Decode { path: PathBuf, reason: String },
    /// An image whose header says it is larger than the pixel limit; refused before decoding.
    #[error(
        "{}: the image is {width}×{height} pixels, more than the limit of {max_pixels}; \
         raise it with --max-pixels if this image is genuine",
        path.display()
    )]
    TooLarge { path: PathBuf, width: u64, height: u64, max_pixels: u64 },
    /// An image so elongated that resizing its shorter side to the network's input would make it larger
    /// than the limit (the resize alone would exhaust memory).
    #[error(
        "{}: the image is {width}×{height} pixels; resizing its shorter side for the network makes it {}×{}, \
         more than {max_pixels} pixels: crop it to a sensible aspect ratio first",
        path.display(),
        resized.0,
        resized.1
    )]
    Elongated { path: PathBuf, width: u32, height: u32, resized: (u64, u64), max_pixels: u64 },
    /// A file larger than any image within the pixel limit could be; refused before it is read.
    #[error(
        "{}: {bytes} bytes is more than any image of at most {max_pixels} pixels needs; \
         raise --max-pixels if this image is genuine",
        path.display()
    )]
    FileTooLarge { path: PathBuf, bytes: u64, max_pixels: u64 },
    /// A folder that should hold images holds none.
    #[error("{path}: no images found (looked for .png, .jpg, .jpeg, .bmp, .tif, .tiff)")]
    NoImages { path: PathBuf },
    /// A category folder without the MVTec AD `train/good` subfolder.
    #[error(
        "{path}: not an MVTec AD category (no train/good folder); expected <category>/train/good/*.png, \
         <category>/test/<defect>/*.png and optionally <category>/ground_truth/<defect>/<name>_mask.png"
    )]
    NotMvtec { path: PathBuf },
    /// A folder with parts of the MVTec AD layout but no `train/good`: fitting to it would learn its
    /// defects and masks as good images.
    #[error(
        "{path}: looks like an MVTec AD category (it has {found}) but has no train/good folder of good images; \
         put the good training images in {path}/train/good, or point --data at a plain folder of good images"
    )]
    IncompleteMvtec { path: PathBuf, found: String },
    /// A path that is neither an image file nor a folder.
    #[error("{path}: not an image file or a folder")]
    NotImage { path: PathBuf },
    /// Synthetic-dataset settings that cannot produce a dataset.
    #[error("invalid synthetic dataset settings: {0}")]
    InvalidSynthetic(String),
    /// Preprocessing settings that cannot produce an image.
    #[error("invalid preprocessing: {0}")]
    InvalidPreprocess(String),
    /// A dataset that was built could not be put in place.
    #[error(transparent)]
    Write(#[from] anomaly_fs::FsError),
}

impl DataError {
    /// A decoding failure of the file at `path`, its reason on one line (decoders' messages may hold
    /// line breaks).
    pub(crate) fn decode(path: impl Into<PathBuf>, reason: impl AsRef<str>) -> Self {
        Self::Decode { path: path.into(), reason: reason.as_ref().split_whitespace().collect::<Vec<_>>().join(" ") }
    }

    /// The error, naming `path` where it was made without one (preprocessing a decoded image).
    pub fn at(self, path: &std::path::Path) -> Self {
        match self {
            Self::Decode { reason, .. } => Self::Decode { path: path.into(), reason },
            Self::Elongated { width, height, resized, max_pixels, .. } => {
                Self::Elongated { path: path.into(), width, height, resized, max_pixels }
            }
            other => other,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}
