"""Make the image-preprocessing fixture under tests/fixtures/preprocess/.

Produces three deterministic synthetic images (numpy, seed 0):
  rgb.jpg     RGB 400x300 (WxH), JPEG quality 95
  gray16.png  16-bit grayscale 240x180, values spanning 0..65535
  rgba.png    RGBA 200x160 with non-trivial alpha
and expected.safetensors with f32 CHW tensors `rgb` [3,224,224],
`gray16` [3,56,56], `rgba` [3,56,56], computed the torchvision way:
PIL open -> (16-bit: np.round(a/257).astype(uint8) -> fromarray -> RGB;
RGBA: .convert('RGB'), alpha dropped) -> Resize(resize) (PIL bilinear,
antialiased) -> CenterCrop(crop) -> ToTensor -> Normalize(ImageNet mean/std).
Sizes: rgb 256/224, gray16 64/56, rgba 64/56.

Run from the repository root:
    /root/venv/bin/python tools/make_preprocess_fixture.py
"""
import os

import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from torchvision import transforms

OUT = os.path.join("tests", "fixtures", "preprocess")
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def pattern(h, w, rng, phase=0.0):
    """Float pattern in [0,1]: gradient + sharp edges + stripes + noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    g = 0.5 * x / (w - 1) + 0.3 * y / (h - 1)  # smooth gradient
    # sharp-edged rectangle and disc
    g += 0.35 * ((x > w * 0.55) & (x < w * 0.8) & (y > h * 0.2) & (y < h * 0.6))
    g -= 0.3 * (((x - w * 0.3) ** 2 + (y - h * 0.7) ** 2) < (min(h, w) * 0.15) ** 2)
    # high-frequency stripes (period ~3 px) in one band, diagonal in another
    band = (y > h * 0.05) & (y < h * 0.25)
    g += 0.25 * band * np.sin(2 * np.pi * x / 3.1 + phase)
    band2 = (x < w * 0.25)
    g += 0.2 * band2 * np.sign(np.sin(2 * np.pi * (x + y) / 4.0 + phase))
    g += rng.normal(0.0, 0.03, size=(h, w))  # noise
    return np.clip(g, 0.0, 1.0)


def torchvision_tensor(img, resize, crop):
    tf = transforms.Compose([
        transforms.Resize(resize),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(mean=MEAN, std=STD),
    ])
    return tf(img).numpy().astype(np.float32)


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(0)

    # RGB 400x300 JPEG q95
    h, w = 300, 400
    rgb = np.stack([pattern(h, w, rng, p) for p in (0.0, 1.0, 2.0)], axis=-1)
    rgb[..., 1] = rgb[..., 1][:, ::-1]  # decorrelate channels
    rgb[..., 2] = rgb[..., 2][::-1, :]
    Image.fromarray(np.round(rgb * 255).astype(np.uint8), "RGB").save(
        os.path.join(OUT, "rgb.jpg"), quality=95)

    # 16-bit gray 240x180, spanning full range
    h, w = 180, 240
    g = pattern(h, w, rng, 0.5)
    g = (g - g.min()) / (g.max() - g.min())
    g16 = np.round(g * 65535).astype(np.uint16)
    assert g16.min() == 0 and g16.max() == 65535
    im16 = Image.fromarray(g16)  # uint16 array -> mode 'I;16'
    assert im16.mode == "I;16", im16.mode
    im16.save(os.path.join(OUT, "gray16.png"), optimize=True)

    # RGBA 200x160
    h, w = 160, 200
    rgba = np.stack([pattern(h, w, rng, p) for p in (0.3, 1.3, 2.3)], axis=-1)
    rgba[..., 0] = rgba[..., 0][:, ::-1]
    y, x = np.mgrid[0:h, 0:w]
    alpha = np.clip(0.2 + 0.8 * x / (w - 1), 0, 1)
    alpha[(y // 20 + x // 20) % 2 == 0] *= 0.5  # checker modulation
    rgba = np.concatenate([rgba, alpha[..., None]], axis=-1)
    Image.fromarray(np.round(rgba * 255).astype(np.uint8), "RGBA").save(
        os.path.join(OUT, "rgba.png"), optimize=True)

    # --- expected tensors, re-reading the files from disk ---
    out = {}
    img = Image.open(os.path.join(OUT, "rgb.jpg")).convert("RGB")
    out["rgb"] = torchvision_tensor(img, 256, 224)

    img16 = Image.open(os.path.join(OUT, "gray16.png"))
    a16 = np.array(img16)
    assert a16.dtype in (np.uint16, np.int32), a16.dtype
    assert a16.max() == 65535 and a16.min() == 0
    img = Image.fromarray(np.round(a16 / 257).astype(np.uint8)).convert("RGB")
    out["gray16"] = torchvision_tensor(img, 64, 56)

    img = Image.open(os.path.join(OUT, "rgba.png"))
    assert img.mode == "RGBA"
    out["rgba"] = torchvision_tensor(img.convert("RGB"), 64, 56)

    for k, v in out.items():
        print(k, v.shape, v.dtype, float(v.min()), float(v.max()))
    save_file(out, os.path.join(OUT, "expected.safetensors"))

    # verify PNG bit depth directly from the IHDR chunk
    with open(os.path.join(OUT, "gray16.png"), "rb") as f:
        head = f.read(33)
    assert head[12:16] == b"IHDR"
    bit_depth, color_type = head[24], head[25]
    print("gray16.png IHDR bit depth", bit_depth, "color type", color_type)
    assert bit_depth == 16 and color_type == 0

    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(
            "Made by `/root/venv/bin/python tools/make_preprocess_fixture.py`: "
            "synthetic seeded images (rgb.jpg 400x300 q95, gray16.png 16-bit "
            "240x180, rgba.png 200x160) and expected.safetensors holding the "
            "torchvision outputs (PIL -> RGB [16-bit: round(v/257) to u8; RGBA: "
            "alpha dropped] -> Resize (PIL bilinear antialias) -> CenterCrop -> "
            "ToTensor -> Normalize ImageNet), f32 CHW: rgb [3,224,224] "
            "(256/224), gray16 and rgba [3,56,56] (64/56).\n")


if __name__ == "__main__":
    main()
