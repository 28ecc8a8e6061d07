"""Make tests/fixtures/metrics/sklearn.json: scikit-learn's ROC curve, AUROC, confusion matrix and
F1 figures for seeded score/label sets with ties, which the Rust metrics must reproduce.

Run from the repository root:
    /root/venv/bin/python tools/make_metrics_fixture.py
"""
import json
import os

import numpy as np
import sklearn
from sklearn.metrics import (confusion_matrix, f1_score, precision_recall_curve, precision_score,
                             recall_score, roc_auc_score, roc_curve)

OUT = os.path.join("tests", "fixtures", "metrics", "sklearn.json")


def case(name, scores, labels, threshold):
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    fpr, tpr, thresholds = roc_curve(labels, scores)  # drop_intermediate=True, sklearn's default
    predicted = (scores > threshold).astype(np.int64)  # defective when the score exceeds the threshold
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    precision, recall, pr_thresholds = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
    return {
        "name": name,
        "scores": scores.tolist(),
        "labels": labels.tolist(),
        "roc_fpr": fpr.tolist(),
        "roc_tpr": tpr.tolist(),
        # sklearn >= 1.3 puts +inf first; JSON has no infinity, so it is written as null.
        "roc_thresholds": [None if np.isinf(t) else float(t) for t in thresholds],
        "auroc": float(roc_auc_score(labels, scores)),
        "threshold": float(threshold),
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        "precision": float(precision_score(labels, predicted, zero_division=0)),
        "recall": float(recall_score(labels, predicted, zero_division=0)),
        "f1": float(f1_score(labels, predicted, zero_division=0)),
        # Predicting defective for scores >= this threshold gives the best F1 on the curve.
        "best_f1": float(f1[best]),
        "best_f1_threshold": float(pr_thresholds[best]),
    }


def main():
    rng = np.random.default_rng(0)
    cases = []
    # Overlapping classes with many exact ties (scores rounded to one decimal).
    labels = np.r_[np.zeros(60, dtype=int), np.ones(40, dtype=int)]
    scores = np.round(np.r_[rng.normal(1.0, 0.5, 60), rng.normal(1.6, 0.6, 40)], 1)
    order = rng.permutation(100)
    cases.append(case("ties", scores[order], labels[order], threshold=1.45))
    # A handful of hand-written values: ties across classes, a perfect split, one reversed pair.
    cases.append(case("small", [0.1, 0.4, 0.35, 0.8, 0.4, 0.9, 0.2], [0, 0, 1, 1, 1, 1, 0], threshold=0.38))
    cases.append(case("separable", [1, 2, 3, 10, 11, 12], [0, 0, 0, 1, 1, 1], threshold=5.0))
    # Continuous scores, no ties.
    labels = (rng.random(300) < 0.3).astype(int)
    scores = rng.normal(0.0, 1.0, 300) + 1.2 * labels
    cases.append(case("continuous", scores, labels, threshold=0.9))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"sklearn_version": sklearn.__version__, "cases": cases}, f, indent=1)
    print(f"wrote {OUT} ({len(cases)} cases, scikit-learn {sklearn.__version__})")


if __name__ == "__main__":
    main()
