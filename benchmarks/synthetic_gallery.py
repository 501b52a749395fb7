"""Renders a PNG gallery of synthetic EM next to real ISBI 2012 slices and prints timing as JSON.

    .venv/bin/python benchmarks/synthetic_gallery.py [--small] [--out synthetic_gallery.png]

Rows: synthetic raw sections, their instance labels, semantic classes, a plain Otsu threshold of
the raw image (what the demo's baseline sees), and, when ../shared/data/isbi2012 exists, real
ISBI slices at the same pixel size for comparison.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage.filters import threshold_otsu  # noqa: E402

from jaxem.data import synthetic  # noqa: E402

ISBI = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012" / "train-volume.tif"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a 8x192x192 volume (seconds)")
    parser.add_argument("--shape", default="16,256,256", help="z,y,x of the volume to time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="synthetic_gallery.png")
    args = parser.parse_args()
    shape = (8, 192, 192) if args.small else tuple(int(s) for s in args.shape.split(","))
    start = time.perf_counter()
    em = synthetic.generate(shape, seed=args.seed)
    seconds = time.perf_counter() - start
    sections = [0, shape[0] // 2, shape[0] - 1]
    rows = 5 if ISBI.exists() else 4
    fig, axes = plt.subplots(rows, 3, figsize=(12, 4 * rows))
    for col, z in enumerate(sections):
        raw = em.raw[z]
        axes[0, col].imshow(raw, cmap="gray", vmin=0, vmax=255)
        axes[0, col].set_title(f"synthetic raw z={z}")
        axes[1, col].imshow(_colour(em.instances[z]), interpolation="nearest")
        axes[1, col].set_title("instances (black = membrane)")
        axes[2, col].imshow(em.semantic[z], cmap="viridis", vmin=0, vmax=2, interpolation="nearest")
        axes[2, col].set_title("semantic: membrane / cytoplasm / mito")
        axes[3, col].imshow(raw > threshold_otsu(raw), cmap="gray")
        axes[3, col].set_title("Otsu threshold of raw")
    if ISBI.exists():
        import tifffile

        real = tifffile.imread(ISBI)
        for col, z in enumerate([0, 10, 19]):
            crop = real[z, : shape[1], : shape[2]]
            axes[4, col].imshow(crop, cmap="gray", vmin=0, vmax=255)
            axes[4, col].set_title(f"real ISBI 2012 slice {z} (same crop size)")
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(json.dumps(_stats(em, shape, seconds, args.out)))


def _colour(labels: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1)
    palette = rng.uniform(0.2, 1.0, size=(int(labels.max()) + 1, 3))
    palette[0] = 0
    return palette[labels.astype(np.int64)]


def _stats(em, shape, seconds, out):
    membrane = em.instances == 0
    raw = em.raw.astype(np.float32)
    return {
        "benchmark": "synthetic_gallery",
        "shape": list(shape),
        "seconds": round(seconds, 3),
        "cells": int(len(np.unique(em.instances)) - 1),
        "membrane_fraction": round(float(membrane.mean()), 4),
        "mito_fraction": round(float((em.semantic == 2).mean()), 4),
        "mean_raw_membrane": round(float(raw[membrane].mean()), 1),
        "mean_raw_cytoplasm": round(float(raw[em.semantic == 1].mean()), 1),
        "png": out,
    }


if __name__ == "__main__":
    main()
