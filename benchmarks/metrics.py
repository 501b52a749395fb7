"""Benchmark: VOI + adapted Rand + Rand on a pair of size^3 uint64 label volumes, jaxem vs scikit-image.

Each method runs in its own subprocess that builds the inputs, then runs the metrics once, so
time and peak memory are measured cleanly: wall seconds, tracemalloc peak of Python/numpy
allocations during the metrics, and the process's peak RSS (ru_maxrss) relative to the inputs.
scikit-image computes adapted_rand_error and variation_of_information (it has no Rand index).

    python benchmarks/metrics.py --small          # 64^3, seconds
    python benchmarks/metrics.py --size 512       # the issue's benchmark
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def make_inputs(size: int):
    """gt: cubes of side size/16 with random ids < 2^20 and 0 walls; pred: shifted cubes, some merged."""
    import numpy as np

    rng = np.random.default_rng(0)
    side = max(size // 16, 2)
    n = (size // side + 2) ** 3
    gt_ids = rng.integers(1, 1 << 20, n, dtype=np.uint64)
    pred_ids = gt_ids // 2 + 1  # about one in four neighbouring ids collide: merges
    gt = np.empty((size,) * 3, np.uint64)
    pred = np.empty_like(gt)
    y, x = np.indices((size, size))
    cells = size // side + 2
    for z in range(size):
        gt[z] = gt_ids[((z // side) * cells + y // side) * cells + x // side]
        gt[z][(y % side == 0) | (x % side == 0)] = 0
        pred[z] = pred_ids[(((z + 3) // side) * cells + (y + 5) // side) * cells + (x + 2) // side]
    return pred, gt


def child(method: str, size: int) -> dict:
    import resource
    import time
    import tracemalloc

    pred, gt = make_inputs(size)
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    start = time.perf_counter()
    if method == "jaxem":
        from jaxem.metrics.clustering import clustering_scores

        s = clustering_scores(pred, gt)
        result = {k: s[k] for k in ("rand_index", "adapted_rand_error", "voi_split", "voi_merge")}
    else:
        from skimage.metrics import adapted_rand_error, variation_of_information

        are = adapted_rand_error(gt, pred)[0]
        split, merge = variation_of_information(gt, pred, ignore_labels=[0])
        result = {"adapted_rand_error": float(are), "voi_split": float(split), "voi_merge": float(merge)}
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    input_bytes = pred.nbytes + gt.nbytes
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": round(seconds, 3), "input_bytes": input_bytes,
            "tracemalloc_peak_over_inputs": round(peak / input_bytes, 3),
            "peak_rss_over_inputs": round(rss / input_bytes, 3),
            "rss_delta_bytes": rss - rss_inputs, "scores": result}


def run(method: str, size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", method, "--size", str(size)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--small", action="store_true", help="64^3: runs in seconds")
    parser.add_argument("--skip-skimage", action="store_true")
    parser.add_argument("--child", choices=("jaxem", "skimage"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = 64 if args.small else args.size
    if args.child:
        print(json.dumps(child(args.child, size)))
        return
    report = {"size": size, "dtype": "uint64", "jaxem": run("jaxem", size)}
    if not args.skip_skimage:
        report["skimage"] = run("skimage", size)
        report["speedup"] = round(report["skimage"]["seconds"] / report["jaxem"]["seconds"], 2)
        for key in ("adapted_rand_error", "voi_split", "voi_merge"):
            assert abs(report["skimage"]["scores"][key] - report["jaxem"]["scores"][key]) < 1e-6, key
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
