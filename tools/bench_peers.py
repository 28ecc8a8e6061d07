"""Our CPU k-nearest-neighbour kernel against FAISS and PyTorch on the same shapes and thread count.

For each shape (bank rows n, width d, k; m = 1000 queries by default) it times, in milliseconds:
  * ours: the `cpu_knn` row of `anomaly bench kernels --device cpu --json` (exact k-NN, squared L2,
    bank norms and all inside the timing), with RAYON_NUM_THREADS = --threads; each run of the binary
    (one per repeat and (n, d)) reports one timed call after a warm-up call;
  * FAISS: `IndexFlatL2` (PyPI `faiss-cpu`), `index.search(queries, k)`; the bank is added once outside
    the timing (`add` only copies rows; the search computes everything it needs);
  * torch: `torch.cdist(queries, bank)` + `topk(k, largest=False)`, and for k = 1 also
    `torch.cdist(...).min(dim=1)`, the way the seed notebook finds neighbours.
Each peer runs once as a warm-up; then --repeats rounds each run the binary once and each peer once
(interleaved, so that load from elsewhere falls on all alike); the table shows medians, the JSON
every time as well. The data are Gaussian N(0, 1) float32 from a fixed seed (the binary draws its own
uniform [-1, 1) data from its own seed: exact k-NN's cost does not depend on the values). ours/FAISS and ours/torch are time ratios (<1: ours
is faster); ours/torch is against the faster of torch's variants for that k.

--isa avx2 caps all three at AVX2, each through its own switches: ANOMALY_CPU_ISA for ours; FAISS's
dispatch level (faiss.SIMDConfig; its flat search below 128,000 queries runs its own loops) and its
OpenBLAS's OPENBLAS_CORETYPE=Haswell; for torch ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS and
ONEDNN_MAX_CPU_ISA (cdist's product is MKL's sgemm). An AVX-512 processor then shows how each fares
where only AVX2 is to be had. The header prints what each runs (FAISS's level, torch's capability,
the binary's device line).

Default sweep: issue 13's shapes (20k x 128 k1, 20k x 1024 k50, 100k x 128 k50, 100k x 1024 k1) plus
d = 128 (PatchCore's projection) and d = 152 (Lite0's patch width) at k = 1 for 20k and 100k banks.

Run from the repository root, with a Python that has torch and faiss-cpu:
    python tools/bench_peers.py --binary target/release/anomaly [--threads 2] [--repeats 5] \
        [--shapes 20000x128:1,100000x1024:50] [--isa avx2] [--json peers.json]
"""
import argparse
import json
import os
import statistics
import subprocess
import time
from collections import OrderedDict

import numpy as np

DEFAULT_SHAPES = ("20000x128:1,20000x1024:50,100000x128:50,100000x1024:1,"
                  "20000x152:1,100000x128:1,100000x152:1")


def parse_shapes(text):
    """'NxD:K,...' -> [(n, d, k)], duplicates dropped, order kept."""
    shapes = []
    for item in text.split(","):
        size, k = item.strip().split(":")
        n, d = size.lower().split("x")
        shape = (int(n), int(d), int(k))
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def wall_ms(work):
    start = time.perf_counter()
    work()
    return (time.perf_counter() - start) * 1e3


def ours_run(binary, n, d, ks, m, threads):
    """{k: ms} of the binary's cpu_knn rows from one run for one (n, d); the binary times one call
    after a warm-up call."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    cmd = [binary, "bench", "kernels", "--device", "cpu", "--banks", str(n), "--dims", str(d),
           "--ks", ",".join(map(str, ks)), "--queries", str(m), "--json"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    times = {}
    for row in json.loads(out):
        if row["kernel"] == "cpu_knn":
            # The binary reports the thread count it ran with; refuse to compare otherwise.
            assert row["device"].startswith(f"cpu: {threads} threads, "), row["device"]
            times["device"] = row["device"]
            times[row["k"]] = row["ms"]
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default="target/release/anomaly")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="NxD:K,... (bank rows x width : k)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--isa", choices=("avx2",),
                        help="cap ours, FAISS and torch at this instruction set (default: each uses all it finds)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows and the settings as JSON")
    args = parser.parse_args()
    if args.isa == "avx2":
        # Before the libraries load: each reads its switch once.
        os.environ.update(ANOMALY_CPU_ISA="avx2", OPENBLAS_CORETYPE="Haswell", ATEN_CPU_CAPABILITY="avx2",
                          MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")

    # Both peers use OpenMP; pin them before any work so that all three run on the same thread count.
    import faiss
    import torch
    faiss.omp_set_num_threads(args.threads)
    if args.isa == "avx2":
        faiss.SIMDConfig.set_level(faiss.SIMDLevel_AVX2)
    torch.set_num_threads(args.threads)

    shapes = parse_shapes(args.shapes)
    by_bank = OrderedDict()  # (n, d) -> [k]: one bank and one binary run per (n, d)
    for n, d, k in shapes:
        by_bank.setdefault((n, d), []).append(k)

    m = args.queries
    rng = np.random.default_rng(args.seed)
    loadavg = open("/proc/loadavg").read().split()[:3]
    results = {}
    ours_device = None
    for (n, d), ks in by_bank.items():
        bank = rng.standard_normal((n, d), dtype=np.float32)
        queries = rng.standard_normal((m, d), dtype=np.float32)
        index = faiss.IndexFlatL2(d)
        index.add(bank)
        bank_t, queries_t = torch.from_numpy(bank), torch.from_numpy(queries)
        # The callers of each k, as (column, work); k = 1 also times torch's min.
        peers = {}
        for k in ks:
            peers[k] = [("faiss", lambda k=k: index.search(queries, k)),
                        ("torch_topk", lambda k=k: torch.cdist(queries_t, bank_t).topk(k, dim=1, largest=False))]
            if k == 1:
                peers[k].append(("torch_min", lambda: torch.cdist(queries_t, bank_t).min(dim=1)))
        times = {(k, name): [] for k in ks for name, _ in peers[k]}
        with torch.no_grad():
            for k in ks:
                for _, work in peers[k]:
                    work()  # warm-up
            # Rounds interleave the three (one binary run, then each peer once), so that load from
            # elsewhere on a shared machine lands on all of them alike rather than on one.
            for _ in range(args.repeats):
                ours = ours_run(args.binary, n, d, ks, m, args.threads)
                ours_device = ours.pop("device")
                for k, ms in ours.items():
                    times.setdefault((k, "ours"), []).append(ms)
                for k in ks:
                    for name, work in peers[k]:
                        times[(k, name)].append(wall_ms(work))
        for k in ks:
            row = {"n": n, "d": d, "k": k, "m": m, "torch_min_ms": None}
            for (kk, name), values in times.items():
                if kk == k:
                    row[name + "_ms"] = statistics.median(values)
                    row[name + "_all_ms"] = values
            torch_best = min(t for t in (row["torch_topk_ms"], row["torch_min_ms"]) if t is not None)
            row["ours_over_faiss"] = row["ours_ms"] / row["faiss_ms"]
            row["ours_over_torch"] = row["ours_ms"] / torch_best
            results[(n, d, k)] = row
        del index, bank, queries, bank_t, queries_t

    rows = [results[s] for s in shapes]  # back in the order asked for
    faiss_isa = faiss.SIMDConfig.get_level_name()
    torch_isa = torch.backends.cpu.get_cpu_capability()
    print(f"m {m}, {args.threads} threads, median of {args.repeats}; loadavg at start {' '.join(loadavg)}; "
          f"faiss {faiss.__version__} ({faiss_isa}), torch {torch.__version__} ({torch_isa}); "
          f"ours {ours_device}")
    print(f"{'n':>7} {'d':>5} {'k':>3} {'ours':>9} {'faiss':>9} {'torch topk':>10} {'torch min':>9} "
          f"{'ours/faiss':>10} {'ours/torch':>10}")
    for r in rows:
        torch_min = "-" if r["torch_min_ms"] is None else f"{r['torch_min_ms']:.1f}"
        print(f"{r['n']:>7} {r['d']:>5} {r['k']:>3} {r['ours_ms']:>9.1f} {r['faiss_ms']:>9.1f} "
              f"{r['torch_topk_ms']:>10.1f} {torch_min:>9} {r['ours_over_faiss']:>10.3f} {r['ours_over_torch']:>10.3f}")
    print(f"loadavg at end {' '.join(open('/proc/loadavg').read().split()[:3])}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "repeats": args.repeats, "queries": m, "seed": args.seed,
                       "faiss": faiss.__version__, "torch": torch.__version__, "loadavg_start": loadavg,
                       "isa": args.isa, "faiss_simd_level": faiss_isa, "torch_cpu_capability": torch_isa,
                       "ours_device": ours_device,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
