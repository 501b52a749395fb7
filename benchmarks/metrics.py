"""Benchmark: `jaxem evaluate --task instance` end to end vs reading the files + scikit-image.

Inputs: a size^3 uint32 pair of instance volumes written to disk (TIFF or zarr): gt is a
Voronoi-like tessellation (nearest of random seeds, computed at size/4 and upsampled) with
0 membranes between cells; pred is gt shifted by a few voxels, membranes filled, some
neighbouring cells merged and some cut in two (splits).

Measured in one process, interleaved, best of `--repeats`, both including reading the files:
- jaxem: `jaxem.protocols.report.run_protocol(pred, gt, "instance", out)`, the function the CLI
  runs: the whole default protocol (pixel, Rand, adapted Rand, VRand/VInfo, VOI, AP/AJI/PQ,
  morphology CSVs and plots, report.json/.md).
- skimage: read both files, then `adapted_rand_error(gt, pred)` and
  `variation_of_information(gt, pred, ignore_labels=[0])`.

    python benchmarks/metrics.py --size 64 --repeats 1     # seconds
    python benchmarks/metrics.py --size 512 --format tiff  # the issue's benchmark
Prints one JSON object (times, ratio, machine, package versions, scores of both).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np

PACKAGES = ("jaxem", "numpy", "scikit-image", "fastremap", "tifffile", "tensorstore", "scipy")


def make_inputs(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pred, gt): size^3 uint32 instance volumes (0 = background), see the module docstring."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    low = max(size // 4, 4)
    seeds = rng.random((max(low ** 3 // 512, 8), 3)) * low
    grid = np.stack(np.meshgrid(*(np.arange(low) + 0.5,) * 3, indexing="ij"), -1).reshape(-1, 3)
    cells = (cKDTree(seeds).query(grid)[1] + 1).astype(np.uint32).reshape((low,) * 3)
    ids = rng.permutation(np.arange(1, len(seeds) + 1, dtype=np.uint32) * 7 + 1000)  # not consecutive
    cells = np.insert(ids, 0, 0)[cells]
    full = np.repeat(np.repeat(np.repeat(cells, 4, 0), 4, 1), 4, 2)[:size, :size, :size]
    full = np.pad(full, [(0, size - s) for s in full.shape], mode="edge")
    gt = full.copy()
    for a in range(3):  # membranes: a voxel whose next neighbour along an axis differs
        edge = [slice(None)] * 3
        edge[a] = slice(0, -1)
        gt[tuple(edge)][np.diff(full, axis=a) != 0] = 0
    pred = np.roll(full, (1, 2, -1), (0, 1, 2))
    merge = np.arange(ids.max() + 1, dtype=np.uint32)
    k = len(ids) // 10
    merge[ids[:k]] = ids[k:2 * k]  # a tenth of the cells merged into others
    pred = merge[pred]
    half = pred.shape[0] // 2
    split = np.isin(pred[half:], ids[2::7])
    pred[half:][split] += np.uint32(1)  # ids are multiples of 7 (+1000): +1 is a new id
    return pred, gt


def write_inputs(pred: np.ndarray, gt: np.ndarray, folder: str, fmt: str) -> tuple[str, str]:
    """Writes pred and gt as TIFF files or zarr volumes (64^3 chunks) in `folder`; returns their paths."""
    paths = []
    for name, array in (("pred", pred), ("gt", gt)):
        if fmt == "tiff":
            import tifffile

            path = os.path.join(folder, f"{name}.tif")
            tifffile.imwrite(path, array)
        else:
            from jaxem.data.volume import create_volume

            path = os.path.join(folder, f"{name}.zarr")
            create_volume(path, array.shape, array.dtype, (8.0, 8.0, 8.0)).write(array)
        paths.append(path)
    return paths[0], paths[1]


def read_file(path: str) -> np.ndarray:
    """The whole volume at `path` (TIFF or zarr) in memory."""
    if path.endswith(".tif"):
        import tifffile

        return tifffile.imread(path)
    from jaxem.data.volume import open_volume

    return open_volume(path).read()


def run_jaxem(pred_path: str, gt_path: str, out: str) -> dict:
    """The instance task's whole protocol, as `jaxem evaluate` runs it; the scores compared."""
    from jaxem.protocols.report import run_protocol

    shutil.rmtree(out, ignore_errors=True)
    report = run_protocol(pred_path, gt_path, "instance", out, progress=False)
    return {k: report[k] for k in ("adapted_rand_error", "voi_split", "voi_merge")}


def run_skimage(pred_path: str, gt_path: str) -> dict:
    """Reads both files, then scikit-image's adapted Rand error and VOI (gt 0 ignored)."""
    from skimage.metrics import adapted_rand_error, variation_of_information

    pred, gt = read_file(pred_path), read_file(gt_path)
    are = adapted_rand_error(gt, pred)[0]
    split, merge = variation_of_information(gt, pred, ignore_labels=[0])
    return {"adapted_rand_error": float(are), "voi_split": float(split), "voi_merge": float(merge)}


def machine() -> dict:
    """Platform, processor, CPU count and load average at the start."""
    processor = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            processor = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "processor": processor, "cores": os.cpu_count(),
            "python": platform.python_version(), "load_average": list(os.getloadavg())}


def versions() -> dict:
    """Installed version of each package in PACKAGES (None when missing)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def benchmark(size: int, fmt: str, repeats: int, folder: str) -> dict:
    """Writes the inputs into `folder`, times both methods interleaved `repeats` times; the JSON report."""
    pred, gt = make_inputs(size)
    pred_path, gt_path = write_inputs(pred, gt, folder, fmt)
    del pred, gt
    times, scores = {"jaxem": [], "skimage": []}, {}
    for _ in range(repeats):
        for name in times:
            start = time.perf_counter()
            scores[name] = run_jaxem(pred_path, gt_path, os.path.join(folder, "report")) if name == "jaxem" \
                else run_skimage(pred_path, gt_path)
            times[name].append(round(time.perf_counter() - start, 3))
    for key, value in scores["jaxem"].items():
        assert abs(value - scores["skimage"][key]) < 1e-6, (key, value, scores["skimage"][key])
    best = {name: min(t) for name, t in times.items()}
    return {"size": size, "dtype": "uint32", "format": fmt, "repeats": repeats,
            "seconds": best, "all_seconds": times,
            "ratio_skimage_over_jaxem": round(best["skimage"] / best["jaxem"], 2),
            "scores": scores["jaxem"], "machine": machine(), "versions": versions()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--format", choices=("tiff", "zarr"), default="tiff")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each; the best is reported")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="jaxem_metrics_") as folder:
        report = benchmark(args.size, args.format, args.repeats, folder)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
