"""Make tests/fixtures/patchcore/patch_features.safetensors: PatchCore's patch features computed by
torch.nn.functional for seeded random feature maps, which the Rust patch features must reproduce.

Per case: `<case>_shallow` [N, C1, H, W] and `<case>_deep` [N, C2, h, w] (f32 inputs), and
`<case>_patches` [N, H*W, D] (f32): avg_pool2d(3, 1, 1) of each map (count_include_pad=True), the deep
one upsampled to H x W (bilinear, align_corners=False), concatenated over channels, and reduced to D by
adaptive_avg_pool1d over the channels per position (patch index y*W + x).

Run from the repository root (a CPU is enough; any torch >= 2):
    python tools/patch_features_fixture.py
"""
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join("tests", "fixtures", "patchcore", "patch_features.safetensors")

# (name, shallow shape, deep shape, patch_dim): a non-integer upsampling ratio (9x11 from 5x6) with
# 7 + 12 = 19 channels to 10, and ratio 2 (8x8 from 4x4) with 6 + 10 = 16 channels to 7.
CASES = [
    ("odd", (2, 7, 9, 11), (2, 12, 5, 6), 10),
    ("even", (1, 6, 8, 8), (1, 10, 4, 4), 7),
]


def patches(shallow, deep, patch_dim):
    n, _, h, w = shallow.shape
    a = F.avg_pool2d(shallow, 3, 1, 1)
    b = F.interpolate(F.avg_pool2d(deep, 3, 1, 1), size=(h, w), mode="bilinear", align_corners=False)
    x = torch.cat([a, b], dim=1)
    c = x.shape[1]
    x = x.permute(0, 2, 3, 1).reshape(n * h * w, 1, c)
    return F.adaptive_avg_pool1d(x, patch_dim).reshape(n, h * w, patch_dim)


def main():
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(11)
    tensors = {}
    for name, shallow_shape, deep_shape, patch_dim in CASES:
        shallow = torch.randn(shallow_shape, generator=generator, dtype=torch.float32)
        deep = torch.randn(deep_shape, generator=generator, dtype=torch.float32)
        tensors[f"{name}_shallow"] = shallow.contiguous()
        tensors[f"{name}_deep"] = deep.contiguous()
        tensors[f"{name}_patches"] = patches(shallow, deep, patch_dim).contiguous()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors, OUT, metadata={"torch": torch.__version__, "script": "tools/patch_features_fixture.py"})
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes) with torch {torch.__version__}")


if __name__ == "__main__":
    main()
