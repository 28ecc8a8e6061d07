"""Make tests/fixtures/metrics/aupro.json: pixel AUROC and AUPRO of seeded anomaly maps and masks, computed
by an independent NumPy/SciPy port of MVTec AD's evaluation code (`pro_curve_util.compute_pro` and
`generic_util.trapezoid`), which the Rust pixel metrics (crates/anomaly-report/src/pixel_metrics.rs) must
reproduce.

The port follows MVTec's definition: regions are the 8-connected components of each mask
(`scipy.ndimage.label` with a 3 × 3 structure), every distinct score is a threshold, FPR is over all
anomaly-free pixels of all images, PRO is the mean over all regions of their share at or above the
threshold, the curve starts at (0, 0) and ends at (1, 1), and `trapezoid(..., x_max)` interpolates the
point at the limit. One deliberate difference: MVTec casts the FPRs to float32 after the cumulative sum;
here they stay float64 (the exact value). The tool prints how far MVTec's float32 variant lands from it.
The `pyaupro` package (built on torchmetrics and PyTorch) was not used: this port needs only NumPy and SciPy.
The curve is checked against a brute-force evaluation at every threshold, and the pixel AUROC (from
ranks: the Mann-Whitney statistic, ties counting half) against a pairwise count, before anything is written.

Scores are stored as integers times a power-of-two `scale`, so that they are the same exact values as
float32 in Rust and float64 here; masks as one string of 0/1 per row, `null` for an image without defects.

Run from the repository root, in a virtual environment with NumPy and SciPy:
    python3 -m venv /tmp/aupro-venv && /tmp/aupro-venv/bin/pip install numpy scipy
    /tmp/aupro-venv/bin/python tools/aupro_fixture.py
"""
import json
import os
from bisect import bisect

import numpy as np
import scipy
from scipy.ndimage import gaussian_filter, label
from scipy.stats import rankdata

OUT = os.path.join("tests", "fixtures", "metrics", "aupro.json")
LIMITS = [0.3, 0.05, 1.0]


def compute_pro(anomaly_maps, ground_truth_maps, fpr_dtype=np.float64):
    """MVTec's compute_pro, for maps of any sizes: the (FPR, PRO) curve, one point per distinct score."""
    structure = np.ones((3, 3), dtype=int)
    num_ok_pixels = 0
    num_gt_regions = 0
    fp_changes, pro_changes = [], []
    for gt_map in ground_truth_maps:
        labeled, n_components = label(gt_map, structure)
        num_gt_regions += n_components
        ok_mask = labeled == 0
        num_ok_pixels += int(np.sum(ok_mask))
        fp_change = np.zeros(gt_map.shape, dtype=np.uint64)
        fp_change[ok_mask] = 1
        pro_change = np.zeros(gt_map.shape, dtype=np.float64)
        for k in range(n_components):
            region_mask = labeled == (k + 1)
            pro_change[region_mask] = 1.0 / np.sum(region_mask)
        fp_changes.append(fp_change.ravel())
        pro_changes.append(pro_change.ravel())
    scores = np.concatenate([m.ravel() for m in anomaly_maps])
    order = np.argsort(scores, kind="stable")[::-1]
    scores_sorted = scores[order]
    fprs = np.cumsum(np.concatenate(fp_changes)[order]).astype(fpr_dtype) / fpr_dtype(num_ok_pixels)
    pros = np.cumsum(np.concatenate(pro_changes)[order]) / num_gt_regions
    keep = np.append(np.diff(scores_sorted) != 0, np.True_)
    fprs = np.clip(fprs[keep], None, 1.0)
    pros = np.clip(pros[keep], None, 1.0)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))


def trapezoid(x, y, x_max=None):
    """MVTec's generic_util.trapezoid: the area under (x, y) up to x_max, interpolating y at x_max."""
    x = np.array(x, dtype=np.float64)
    y = np.array(y, dtype=np.float64)
    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            ins = bisect(x, x_max)
            assert 0 < ins < len(x)
            y_interp = y[ins - 1] + ((y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1]))
            correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
        mask = x <= x_max
        x = x[mask]
        y = y[mask]
    return np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction


def aupro(maps, masks, limit, fpr_dtype=np.float64):
    fprs, pros = compute_pro(maps, masks, fpr_dtype)
    return float(trapezoid(fprs, pros, x_max=limit) / limit)


def pixel_auroc(maps, masks):
    """AUROC from ranks (Mann-Whitney U with average ranks): ties count half."""
    scores = np.concatenate([m.ravel() for m in maps])
    labels = np.concatenate([k.ravel() for k in masks])
    ranks = rankdata(scores)
    p, n = int(labels.sum()), int((~labels).sum())
    return float((ranks[labels].sum() - p * (p + 1) / 2) / (p * n))


def check_by_brute_force(maps, masks):
    """The curve and the AUROC again, straight from their definitions, at every threshold."""
    structure = np.ones((3, 3), dtype=int)
    negatives = np.concatenate([m[~k] for m, k in zip(maps, masks)])
    regions = []
    for m, k in zip(maps, masks):
        labeled, n = label(k, structure)
        regions += [m[labeled == r + 1] for r in range(n)]
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    fprs = [0.0] + [float(np.mean(negatives >= t)) for t in thresholds] + [1.0]
    pros = [0.0] + [float(np.mean([np.mean(r >= t) for r in regions])) for t in thresholds] + [1.0]
    x, y = compute_pro(maps, masks)
    assert np.allclose(x, fprs, rtol=0, atol=1e-12) and np.allclose(y, pros, rtol=0, atol=1e-12)
    positives = np.concatenate([m[k] for m, k in zip(maps, masks)])
    pairs = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()
    assert abs(pairs / (len(positives) * len(negatives)) - pixel_auroc(maps, masks)) < 1e-12


def case(name, images):
    """images: (integer scores, scale, mask or None) per image."""
    maps = [q.astype(np.float64) * scale for q, scale, _ in images]
    masks = [np.zeros(q.shape, dtype=bool) if k is None else k.astype(bool) for q, _, k in images]
    for m in maps:  # the stored values are exact in float32
        assert np.array_equal(m.astype(np.float32).astype(np.float64), m)
    check_by_brute_force(maps, masks)
    values = [aupro(maps, masks, limit) for limit in LIMITS]
    worst = max(abs(aupro(maps, masks, limit, np.float32) - v) for limit, v in zip(LIMITS, values))
    print(f"{name}: {sum(m.size for m in maps)} pixels, AUPRO with MVTec's float32 FPRs differs by {worst:.2e}")
    return {
        "name": name,
        "images": [
            {
                "width": int(q.shape[1]),
                "height": int(q.shape[0]),
                "scale": scale,
                "scores": q.ravel().tolist(),
                "mask": None if k is None else ["".join("1" if v else "0" for v in row) for row in k],
            }
            for q, scale, k in images
        ],
        "pixel_auroc": pixel_auroc(maps, masks),
        "aupro": [[limit, value] for limit, value in zip(LIMITS, values)],
    }


def ellipses(rng, height, width, count):
    y, x = np.mgrid[0:height, 0:width]
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(count):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.8, height / 5), rng.uniform(0.8, width / 5)
        mask |= ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    return mask


def smooth_scores(rng, mask, scale_bits=10, blur=1.5, lift=1.2):
    """Blurred noise lifted on the defects, as integers of 2^-scale_bits: a plausible anomaly map."""
    noise = gaussian_filter(rng.normal(0.0, 1.0, mask.shape), blur) * 3
    lifted = noise + lift * gaussian_filter(mask.astype(float), 1.0) + rng.normal(0, 0.3, mask.shape)
    return np.round(lifted * 2**scale_bits).astype(np.int64), 2.0**-scale_bits


def main():
    rng = np.random.default_rng(11)
    cases = []

    # Coarse integer scores: many ties within and across classes; a good image without a mask and one
    # with an all-zero mask.
    images = []
    for mask in (ellipses(rng, 10, 12, 2), ellipses(rng, 10, 12, 3), None, np.zeros((10, 12), dtype=bool)):
        base = rng.integers(0, 7, (10, 12))
        images.append((base + (0 if mask is None else 3 * mask), 1.0, mask))
    cases.append(case("ties", images))

    # Regions that touch only at corners: one region under 8-connectivity.
    first = np.zeros((9, 9), dtype=bool)
    for y, x in [(1, 1), (2, 2), (3, 3), (3, 4), (4, 5), (7, 7)]:
        first[y, x] = True
    second = np.zeros((9, 9), dtype=bool)
    second[2:7, 2:7] = (np.add.outer(np.arange(5), np.arange(5)) % 2) == 0  # a checkerboard patch
    second[0, 8] = True
    images = [smooth_scores(rng, m, scale_bits=4, blur=0.8, lift=3.0) + (m,) for m in (first, second)]
    cases.append(case("diagonal", images))

    # Images of different sizes, two of them good.
    images = []
    for height, width, regions in [(8, 16, 2), (13, 7, 1), (20, 20, 4), (5, 5, 0), (3, 11, 0)]:
        mask = ellipses(rng, height, width, regions) if regions else None
        q, scale = smooth_scores(rng, np.zeros((height, width), dtype=bool) if mask is None else mask, scale_bits=6)
        images.append((q, scale, mask))
    cases.append(case("sizes", images))

    # 100 anomaly-free pixels with distinct scores: the curve has a point at FPR exactly 0.3 (and 0.05).
    mask = np.zeros((10, 11), dtype=bool)
    mask[1:3, 1:4] = True
    mask[6, 4:8] = True
    q = rng.permutation(200)[:110].reshape(10, 11) - 40 + 70 * mask
    assert {0.3, 0.05} <= set(compute_pro([q * 0.25], [mask])[0])
    cases.append(case("exact_limit", [(q, 0.25, mask)]))

    # A larger set: four 64 × 64 images, one good.
    images = []
    for regions in (3, 5, 1, 0):
        mask = ellipses(rng, 64, 64, regions) if regions else None
        q, scale = smooth_scores(rng, np.zeros((64, 64), dtype=bool) if mask is None else mask, scale_bits=12, blur=2.0)
        images.append((q, scale, mask))
    cases.append(case("large", images))

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(
            {"generator": "tools/aupro_fixture.py", "numpy_version": np.__version__, "scipy_version": scipy.__version__, "cases": cases},
            f,
            separators=(",", ":"),
        )
        f.write("\n")
    print(f"wrote {OUT} ({len(cases)} cases, {os.path.getsize(OUT)} bytes, NumPy {np.__version__}, SciPy {scipy.__version__})")


if __name__ == "__main__":
    main()
