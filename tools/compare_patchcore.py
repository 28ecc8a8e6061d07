"""Back-to-back timing of `anomaly eval --method patchcore` against the PyTorch reference of the same recipe.

Runs, alternately and `--rounds` times each, on the same machine and thread count:
  * ours:   anomaly eval --method patchcore --backbone efficientnet-lite0 --device cpu (a fresh report folder
            each time; stage times from its metrics.json: fit, coreset, leave-one-out, scoring);
  * theirs: tools/reference_patchcore.py (PyTorch, the official ApproximateGreedyCoresetSampler loop;
            stage times from its JSON);
each under /usr/bin/time for its peak resident memory. Prints one row per run, then the medians and the
ratios ours / PyTorch (<1: ours faster or leaner) for the whole run and for the coreset.

Run from the repository root, with a Python that has torch, torchvision, scikit-learn, scipy and
efficientnet_lite_pytorch (see tools/reference_patchcore.py):
    python tools/compare_patchcore.py --data ../shared/data/mvtec/bottle \
        --weights weights/efficientnet-lite0-57934424.pth [--rounds 2] [--threads 2]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def timed(command, env):
    """Runs `command` under /usr/bin/time; returns (wall seconds, peak RSS in MB, stdout)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as record:
        start = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", record.name] + command,
                              env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        peak_kb = int(record.read().strip().splitlines()[-1])
    return wall, peak_kb / 1024, done.stdout


def ours(args, env, folder):
    report = os.path.join(folder, "report")
    wall, peak, _ = timed([args.binary, "eval", "--method", "patchcore", "--backbone", "efficientnet-lite0",
                           "--data", args.data, "--report", report, "--device", "cpu", "--offline",
                           "--weights-dir", os.path.dirname(args.weights) or "."], env)
    with open(os.path.join(report, "metrics.json")) as f:
        metrics = json.load(f)
    stages = metrics["timings_s"]
    return {"wall_s": wall, "peak_mb": peak, "coreset_s": metrics["fit_stages_s"]["coreset"],
            "leave_one_out_s": metrics["fit_stages_s"]["leave_one_out"], "fit_s": stages["fit"],
            "score_s": stages["score"], "image_auroc": metrics["image_auroc"],
            "pixel_auroc_crop": metrics["pixel_auroc_crop"]}


def theirs(args, env):
    wall, peak, out = timed([sys.executable, "tools/reference_patchcore.py", "--data", args.data,
                             "--weights", args.weights, "--threads", str(args.threads)], env)
    # The weights package prints a line of its own before the JSON.
    result = json.loads(out[out.index("{"):])
    t = result["timings"]
    return {"wall_s": wall, "peak_mb": peak, "coreset_s": t["coreset_s"], "leave_one_out_s": t["threshold_s"],
            "fit_s": t["train_features_s"] + t["coreset_s"] + t["threshold_s"], "score_s": t["test_s"],
            "image_auroc": result["image_auroc"], "pixel_auroc_crop": result["pixel_auroc_crop"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--binary", default="target/release/anomaly")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    runs = {"ours": [], "pytorch": []}
    keys = ["wall_s", "fit_s", "coreset_s", "leave_one_out_s", "score_s", "peak_mb", "image_auroc", "pixel_auroc_crop"]
    print("run      " + " ".join(f"{k:>16}" for k in keys), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(args.rounds):
            for name in ("ours", "pytorch"):
                load = open("/proc/loadavg").read().split()[0]
                row = ours(args, env, os.path.join(folder, str(round_index))) if name == "ours" else theirs(args, env)
                runs[name].append(row)
                print(f"{name:8} " + " ".join(f"{row[k]:16.4f}" for k in keys) + f"   (load {load})", flush=True)
    medians = {name: {k: statistics.median(r[k] for r in rows) for k in keys} for name, rows in runs.items()}
    for name in ("ours", "pytorch"):
        print(f"median {name:8} " + " ".join(f"{medians[name][k]:16.4f}" for k in keys))
    for k in ("wall_s", "fit_s", "coreset_s", "leave_one_out_s", "score_s", "peak_mb"):
        print(f"ratio ours/pytorch {k}: {medians['ours'][k] / medians['pytorch'][k]:.3f}")


if __name__ == "__main__":
    main()
