"""Our CPU backbone forward pass against PyTorch's, back to back, on the same images and thread count.

Each round runs, one after the other (so that load from elsewhere falls on both alike):
  * ours: `anomaly bench backbone --device cpu --json` over the first --batch-size images of --data, with
    RAYON_NUM_THREADS = --threads; its `forward_img_s` is the forward pass of one batch already in
    memory (a warm-up pass, then the median of --repeats timed passes), up to pooled features;
  * PyTorch: the same backbone and weights file in eval mode under `torch.inference_mode()`, with
    `torch.set_num_threads(--threads)`, on the same images preprocessed by torchvision; timed the same way
    (one warm-up pass, the median of --repeats passes of the batch). For EfficientNet-Lite the pass is
    `extract_features` + average pooling (PyPI `efficientnet-lite-pytorch`, as tools/reference_seed.py); for
    the ResNets torchvision's model up to `avgpool`.
The table shows each side's median over the rounds and ours/PyTorch as an img/s ratio (>1: ours is faster).

Run from the repository root, with a Python that has torch, torchvision, pillow and efficientnet-lite-pytorch:
    python tools/bench_backbone_peers.py --binary target/release/anomaly --data ../shared/data/mvtec/bottle/train/good \
        --weights-dir weights [--weights FILE] [--backbone efficientnet-lite0] [--batch-size 8] [--threads 2] [--rounds 5] [--json out.json]
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import time

import torch
from PIL import Image
from torchvision import transforms

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# backbone -> (weights file, resize, crop, mean, std), as `anomaly`'s BackboneName::preprocess.
BACKBONES = {
    "efficientnet-lite0": ("efficientnet-lite0-57934424.pth", 256, 224, (0.5,) * 3, (0.5,) * 3),
    "efficientnet-lite2": ("efficientnet-lite2-9656183e.pth", 297, 260, (0.5,) * 3, (0.5,) * 3),
    "resnet50": ("resnet50-0676ba61.pth", 256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "wide_resnet50_2": ("wide_resnet50_2-95faca4d.pth", 256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def torch_forward(backbone, weights):
    """The PyTorch pass up to pooled features, as a function of a [batch, 3, side, side] tensor."""
    if backbone.startswith("efficientnet"):
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_pretrained(backbone, weights_path=weights).eval()
        return lambda x: torch.flatten(model._avg_pooling(model.extract_features(x)), 1)
    import torchvision

    model = getattr(torchvision.models, backbone)()
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    model.fc = torch.nn.Identity()
    return model.eval()


def median_img_s(forward, x, repeats):
    with torch.inference_mode():
        forward(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            forward(x)
            times.append(time.perf_counter() - start)
    return x.shape[0] / statistics.median(times)


def ours(args):
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    out = subprocess.run(
        [args.binary, "bench", "backbone", "--device", "cpu", "--json", "--offline", "--backbone", args.backbone,
         "--weights-dir", args.weights_dir, "--data", args.data, "--limit", str(args.batch_size),
         "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
        + (["--weights", args.weights] if args.weights else []),
        env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["forward_img_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binary", default="target/release/anomaly")
    parser.add_argument("--data", required=True, help="a folder of images (the first --batch-size are used)")
    parser.add_argument("--weights-dir", default="weights")
    parser.add_argument("--weights", help="a weights file to use instead of the published one in --weights-dir "
                        "(for both sides; e.g. random weights, for speed alone)")
    parser.add_argument("--backbone", default="efficientnet-lite0", choices=sorted(BACKBONES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per side and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write every round's figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    weights_file, resize, crop, mean, std = BACKBONES[args.backbone]
    paths = sorted(p for p in glob.glob(os.path.join(args.data, "**", "*"), recursive=True)
                   if p.lower().endswith(EXTENSIONS))[:args.batch_size]
    preprocess = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop), transforms.ToTensor(),
                                     transforms.Normalize(mean, std)])
    x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
    forward = torch_forward(args.backbone, args.weights or os.path.join(args.weights_dir, weights_file))

    rounds = []
    for round_ in range(args.rounds):
        ours_ips = ours(args)
        torch_ips = median_img_s(forward, x, args.repeats)
        rounds.append({"ours_img_s": ours_ips, "torch_img_s": torch_ips})
        print(f"round {round_ + 1}: ours {ours_ips:6.1f} img/s, PyTorch {torch_ips:6.1f} img/s", flush=True)
    ours_median = statistics.median(r["ours_img_s"] for r in rounds)
    torch_median = statistics.median(r["torch_img_s"] for r in rounds)
    print(f"{args.backbone}, batch {len(paths)}, {args.threads} threads, {crop}px, medians of {args.rounds} rounds:")
    print(f"  ours    {ours_median:7.1f} img/s")
    print(f"  PyTorch {torch_median:7.1f} img/s  (torch {torch.__version__})")
    print(f"  ours/PyTorch {ours_median / torch_median:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backbone": args.backbone, "batch_size": len(paths), "threads": args.threads, "rounds": rounds,
                       "ours_img_s": ours_median, "torch_img_s": torch_median}, f, indent=1)


if __name__ == "__main__":
    main()
