//! Loading PyTorch `.pth` files (modern zip and legacy pickle) into our models by torchvision's and
//! EfficientNet-PyTorch's own key names, with errors that say what does not fit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::store::pytorch_reader::PytorchReader;
use burn::store::{ApplyError, BurnToPyTorchAdapter, ModuleSnapshot, ModuleStore, PytorchStore};
use burn::tensor::{DType, bf16, f16};
use regex::Regex;

use crate::Backbone;

/// Why a weights file could not be loaded into a backbone; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    /// The file is missing, unreadable, or not a PyTorch checkpoint at all.
    #[error("{path}: not a readable PyTorch weights file: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    /// The file is a checkpoint, but not of this architecture (missing, extra or misshapen tensors).
    #[error("{path}: does not fit {architecture}: {details}")]
    Mismatch { path: PathBuf, architecture: &'static str, details: String },
    /// A weight is NaN or ±Inf: every feature computed with it would be.
    #[error("{path}: tensor \"{tensor}\" holds {value} at index {index}: the weights file is corrupt; fetch it again")]
    NonFinite { path: PathBuf, tensor: String, value: &'static str, index: usize },
}

/// State-dict entries PyTorch keeps that inference has no use for.
const IGNORED_SUFFIXES: [&str; 1] = ["num_batches_tracked"];

/// Loads a PyTorch state_dict file into `backbone`, requiring every tensor to be present with the right
/// shape and no tensor of the file to be left over.
pub fn load_weights(backbone: &mut Backbone, path: &Path) -> Result<(), BackboneError> {
    let unreadable = |reason: String| BackboneError::Unreadable { path: path.into(), reason };
    if !path.is_file() {
        return Err(unreadable("no such file".into()));
    }
    let store = key_patterns(backbone).iter().fold(PytorchStore::from_file(path), |store, &(from, to)| store.with_key_remapping(from, to));
    let mut store = store.skip_enum_variants(true).map_indices_contiguous(false).allow_partial(true).validate(false);
    check_finite_weights(&mut store, backbone, path)?;
    let result = backbone.load_from(&mut store).map_err(|e| unreadable(e.to_string()))?;

    let missing: Vec<String> = result.missing.iter().map(|(path, _)| torch_name(backbone, path)).collect();
    let file_names = original_names(backbone, path);
    let unused: Vec<String> = result
        .unused
        .iter()
        .filter(|name| !IGNORED_SUFFIXES.iter().any(|s| name.ends_with(s)))
        .map(|name| file_names.get(name).cloned().unwrap_or_else(|| name.clone()))
        .collect();
    let misfits: Vec<String> = result.errors.iter().map(|e| describe_error(backbone, e)).collect();
    if missing.is_empty() && unused.is_empty() && misfits.is_empty() {
        return Ok(());
    }
    let mut details = Vec::new();
    if !missing.is_empty() {
        details.push(format!("{} tensor(s) missing ({})", missing.len(), first_few(&missing)));
    }
    if !misfits.is_empty() {
        details.push(format!("{} tensor(s) of the wrong shape or type ({})", misfits.len(), first_few(&misfits)));
    }
    if !unused.is_empty() {
        details.push(format!("{} tensor(s) the model has no place for ({})", unused.len(), first_few(&unused)));
    }
    Err(BackboneError::Mismatch {
        path: path.into(),
        architecture: backbone.architecture(),
        details: format!("{}; is it the weights file of another backbone?", details.join(", ")),
    })
}

/// Refuses a file holding a NaN or ±Inf weight, naming the tensor by the file's own key: one pass over its
/// float tensors before they are loaded.
fn check_finite_weights(store: &mut PytorchStore, backbone: &Backbone, path: &Path) -> Result<(), BackboneError> {
    let unreadable = |reason: String| BackboneError::Unreadable { path: path.into(), reason };
    let tensors = store.get_all_tensors().map_err(|e| unreadable(e.to_string()))?;
    for (name, tensor) in tensors {
        let bytes = tensor.to_bytes().map_err(|e| unreadable(format!("tensor {name}: {e}")))?;
        let values: Box<dyn Iterator<Item = f64> + '_> = match tensor.dtype {
            DType::F64 => Box::new(bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap_or_default()))),
            DType::F32 | DType::Flex32 => {
                Box::new(bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap_or_default()) as f64))
            }
            DType::F16 => Box::new(bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f64())),
            DType::BF16 => Box::new(bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f64())),
            _ => continue,
        };
        let mut values = values.enumerate();
        if let Some((index, value)) = values.find(|(_, v)| !v.is_finite()) {
            let value = if value.is_nan() {
                "NaN"
            } else if value > 0.0 {
                "+Inf"
            } else {
                "-Inf"
            };
            let tensor = original_names(backbone, path).remove(name).unwrap_or_else(|| name.clone());
            return Err(BackboneError::NonFinite { path: path.into(), tensor, value, index });
        }
    }
    Ok(())
}

/// The backbone's parameters as PyTorch would name and shape them in its state_dict (buffers such as
/// `num_batches_tracked`, which burn does not keep, excepted), in the model's order.
pub fn torch_state_dict_keys(backbone: &Backbone) -> Vec<(String, Vec<usize>)> {
    backbone
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .map(|tensor| (torch_name(backbone, &tensor.name), tensor.shape.to_vec()))
        .collect()
}

impl Backbone {
    /// The architecture family, for messages.
    pub fn architecture(&self) -> &'static str {
        match self {
            Backbone::ResNet(_) => "a bottleneck ResNet (torchvision layout)",
            Backbone::EfficientNet(_) => "EfficientNet-Lite (EfficientNet-PyTorch layout)",
        }
    }
}

/// How the file's keys become our parameter paths: torchvision's `downsample.0/1` are our
/// `downsample.conv/bn`; EfficientNet-PyTorch's leading underscores are dropped.
fn key_patterns(backbone: &Backbone) -> &'static [(&'static str, &'static str)] {
    match backbone {
        Backbone::ResNet(_) => &[(r"downsample\.0\.", "downsample.conv."), (r"downsample\.1\.", "downsample.bn.")],
        Backbone::EfficientNet(_) => &[(r"(^|\.)_", "$1")],
    }
}

/// The file's own key for each remapped key, so that left-over tensors are reported by the names the
/// file gives them (only called when loading failed; a file that cannot be listed gives no names).
fn original_names(backbone: &Backbone, path: &Path) -> HashMap<String, String> {
    let Ok(reader) = PytorchReader::new(path) else { return HashMap::new() };
    let patterns: Vec<(Regex, &str)> =
        key_patterns(backbone).iter().map(|(from, to)| (Regex::new(from).expect("valid pattern"), *to)).collect();
    reader
        .keys()
        .into_iter()
        .map(|key| {
            let remapped = patterns.iter().fold(key.clone(), |k, (re, to)| re.replace_all(&k, *to).into_owned());
            (remapped, key)
        })
        .collect()
}

/// Our parameter path in the file's naming (the inverse of the key remapping above).
fn torch_name(backbone: &Backbone, path: &str) -> String {
    let path = path.replace(".gamma", ".weight").replace(".beta", ".bias");
    match backbone {
        Backbone::ResNet(_) => path.replace("downsample.conv.", "downsample.0.").replace("downsample.bn.", "downsample.1."),
        Backbone::EfficientNet(_) => path
            .split('.')
            .map(|segment| {
                let is_leaf = ["weight", "bias", "running_mean", "running_var"].contains(&segment);
                if is_leaf || segment.starts_with('_') || segment.chars().all(|c| c.is_ascii_digit()) {
                    segment.to_string()
                } else {
                    format!("_{segment}")
                }
            })
            .collect::<Vec<_>>()
            .join("."),
    }
}

fn describe_error(backbone: &Backbone, error: &ApplyError) -> String {
    match error {
        ApplyError::ShapeMismatch { path, expected, found } => {
            format!("{}: file has {:?}, model needs {:?}", torch_name(backbone, path), found.to_vec(), expected.to_vec())
        }
        other => other.to_string(),
    }
}

fn first_few(names: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut text = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        text.push_str(", …");
    }
    text
}
