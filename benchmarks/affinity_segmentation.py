"""Affinities -> neurons without a model: ground-truth affinities of the synthetic neuropil plus
Gaussian noise, segmented by mutex watershed, by the affinity watershed and by agglomeration of
the over-seeded watershed (fragments at the smallest --h, merged at each --merge), scored in 3D.

    python benchmarks/affinity_segmentation.py [--noise 0 0.2 0.35] [--h 1 16 24] [--merge 0.3 0.5] [--min-size 50]

Separates the post-processing from the network: how much noise in the affinities each method
takes before it splits or merges, and how the watershed depends on its seed depth h (nm). Prints
JSON: per noise level and method, adapted Rand error, VOI split/merge, segment count, seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np


def noisy_affinities(gt: np.ndarray, offsets, noise: float, seed: int = 0) -> np.ndarray:
    """(K, z, y, x) float32: the affinity target of `gt` (z, y, x) plus N(0, noise), clipped to [0, 1]."""
    import jax.numpy as jnp

    from jaxem.data.targets import affinity_target

    target, _ = affinity_target(jnp.asarray(gt[None].astype(np.int32)), jnp.ones((1,) + gt.shape), offsets)
    aff = np.moveaxis(np.asarray(target[0]), -1, 0)
    rng = np.random.default_rng(seed)
    return np.clip(aff + rng.normal(0.0, noise, aff.shape), 0.0, 1.0).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.35])
    parser.add_argument("--h", type=float, nargs="+", default=[1.0, 16.0, 24.0], help="watershed seed depths, nm")
    parser.add_argument("--merge", type=float, nargs="*", default=[0.3, 0.5], help="agglomeration thresholds")
    parser.add_argument("--min-size", type=int, default=50)
    parser.add_argument("--shape", type=int, nargs=3, default=[16, 256, 256])
    args = parser.parse_args()

    from jaxem.config import load_config
    from jaxem.data import synthetic
    from jaxem.metrics.clustering import clustering_scores
    from jaxem.segment.instances import instances_from_affinities

    offsets = [tuple(o) for o in load_config("snemi3d_affinities").target.offsets]  # the recipe's 12
    voxel_size = (40.0, 4.0, 4.0)
    gt = synthetic.generate(tuple(args.shape), voxel_size=voxel_size, seed=1).instances
    rows = []
    for noise in args.noise:
        aff = noisy_affinities(gt, offsets, noise)
        runs = ([("mws", None, None)] + [("watershed", h, None) for h in args.h]
                + [("agglomerate", min(args.h), m) for m in args.merge])
        for method, h, merge in runs:
            start = time.time()
            seg = instances_from_affinities(aff, offsets, method, min_size=args.min_size, h=h or 1.0,
                                            anisotropy=voxel_size, merge=merge or 0.5)
            seconds = time.time() - start
            scores = clustering_scores(seg, gt)
            rows.append({"noise": noise, "method": method, "h_nm": h, "merge": merge, "segments": int(seg.max()),
                         "seconds": round(seconds, 2),
                         **{k: round(float(scores[k]), 4) for k in ("adapted_rand_error", "voi_split", "voi_merge")}})
            print(f"noise {noise:<5} {method:<11} h={h!s:<5} merge={merge!s:<4} ARE {rows[-1]['adapted_rand_error']:.3f} "
                  f"split {rows[-1]['voi_split']:.3f} merge {rows[-1]['voi_merge']:.3f} ({seconds:.1f} s)", flush=True)
    print(json.dumps({"benchmark": "affinity_segmentation_synthetic", "shape": args.shape, "voxel_size_nm": voxel_size,
                      "offsets": [list(o) for o in offsets], "min_size": args.min_size, "rows": rows,
                      "machine": {"platform": platform.platform(), "processor": platform.processor()}}, indent=2))


if __name__ == "__main__":
    main()
