"""Agglomeration's merge step: vectorised rounds + heap (`merge_regions`) against the heap alone.

    python benchmarks/merge_speed.py [--side 70] [--volume 64 256 256] [--merge 0.5]

Two region graphs: a side^3 grid of fragments, 6-connected, with random face counts and mean
boundaries (~3 side^3 edges), and the watershed fragments of a smoothed-noise boundary map of
`--volume` voxels (seeds: its lowest 5 %). Prints JSON: edges, seconds of each method, and
whether both give the same partition.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np


def grid_graph(side: int, seed: int = 0):
    """Fragments 1..side^3 on a 6-connected grid; counts 1-49 faces, means uniform in [0, 1)."""
    from jaxem.segment.agglomerate import RegionGraph

    ids = np.arange(side**3).reshape((side,) * 3) + 1
    uv = np.concatenate([np.stack([np.take(ids, range(side - 1), axis=a).ravel(),
                                   np.take(ids, range(1, side), axis=a).ravel()], 1) for a in range(3)]).astype(np.uint64)
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 50, len(uv))
    return RegionGraph(uv, rng.random(len(uv)) * counts, counts), side**3 + 1


def watershed_graph(shape, seed: int = 0):
    """The region graph of the watershed fragments of a smoothed-noise boundary map."""
    from scipy import ndimage
    from skimage.segmentation import watershed

    from jaxem.segment.agglomerate import region_graph

    rng = np.random.default_rng(seed)
    boundary = ndimage.gaussian_filter(rng.random(shape).astype(np.float32), 1)
    boundary = (boundary - boundary.min()) / (boundary.max() - boundary.min())
    fragments = watershed(boundary, markers=ndimage.label(boundary < np.percentile(boundary, 5))[0]).astype(np.uint64)
    return region_graph(fragments, boundary=boundary), int(fragments.max()) + 1


def time_both(graph, num_ids: int, merge: float) -> dict:
    from jaxem.segment.agglomerate import _merge_heap, merge_regions

    result = {"edges": int(len(graph.uv))}
    tables = {}
    for name, merge_fn in [("rounds_s", merge_regions), ("heap_s", _merge_heap)]:
        t0 = time.perf_counter()
        tables[name] = merge_fn(graph, merge, num_ids)
        result[name] = float(f"{time.perf_counter() - t0:.3g}")  # 3 significant digits: a small merge takes < 1 ms
    fast, slow = tables["rounds_s"], tables["heap_s"]
    joint = np.unique(np.stack([fast, slow], 1), axis=0)
    result["objects"] = int(len(np.unique(fast)) - 1)
    result["same_partition"] = bool(len(joint) == len(np.unique(fast)) == len(np.unique(slow)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=70)
    parser.add_argument("--volume", type=int, nargs=3, default=[64, 256, 256])
    parser.add_argument("--merge", type=float, default=0.5)
    args = parser.parse_args()
    print(json.dumps({"benchmark": "merge_speed", "host": platform.node(), "merge": args.merge,
                      "grid": {"side": args.side, **time_both(*grid_graph(args.side), args.merge)},
                      "watershed": {"volume": args.volume, **time_both(*watershed_graph(tuple(args.volume)), args.merge)}}))


if __name__ == "__main__":
    main()
