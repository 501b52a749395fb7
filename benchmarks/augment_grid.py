"""Visual check and speed of the on-device augmentation; prints JSON, writes a PNG grid.

Row 0 is a synthetic 3D crop (z-sections left to right, label boundaries in red); every other row
is an independent augmentation of it with the default config (section defects made likely).

    .venv/bin/python benchmarks/augment_grid.py --out /tmp/augment_grid.png [--small]
"""

import argparse
import json
import time

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxem.data import augment, synthetic, targets  # noqa: E402
from jaxem.data.sampling import normalize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="/tmp/augment_grid.png")
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--small", action="store_true", help="smaller crops and fewer timing repeats")
    args = parser.parse_args()
    shape = (6, 96, 96) if args.small else (6, 160, 160)
    em = synthetic.generate(shape, (40.0, 4.0, 4.0), seed=3)
    raw = em.raw.astype(np.float32)
    image = normalize(raw, (raw.mean(), raw.std()))
    labels = em.instances.astype(np.int32)
    rows = args.rows
    batch = {"image": np.repeat(image[None, ..., None], rows, 0), "labels": np.repeat(labels[None], rows, 0),
             "mask": np.ones((rows,) + shape, np.float32)}
    cfg = augment.default_augment_config(3)
    for op in ("missing_section", "blurred_section", "misalign"):
        cfg[op].p = 0.5
    fn = jax.jit(augment.make_augment_fn(cfg, 3))
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(jax.random.key(0), batch))
    compile_s = time.perf_counter() - t0
    repeats = 2 if args.small else 5
    t0 = time.perf_counter()
    for i in range(repeats):
        out = jax.block_until_ready(fn(jax.random.key(i + 1), batch))
    per_batch = (time.perf_counter() - t0) / repeats
    bounds = make_boundaries(out["labels"])
    plot(batch, out, bounds, make_boundaries(batch["labels"]), args.out)
    print(json.dumps({"benchmark": "augment_grid", "png": args.out, "batch_shape": list(batch["image"].shape),
                      "device": jax.devices()[0].platform, "compile_s": round(compile_s, 2),
                      "seconds_per_batch": round(per_batch, 4),
                      "examples_per_s": round(rows / per_batch, 1)}))


def make_boundaries(labels):
    cfg = targets.default_target_config(3)
    cfg.width = (0, 1, 1)
    target, _ = targets.make_target_fn(cfg, 3)(labels, np.ones(labels.shape, np.float32))
    return np.asarray(target[..., 0])


def plot(batch, out, bounds, bounds0, path):
    rows, nz = out["image"].shape[0] + 1, out["image"].shape[1]
    fig, axes = plt.subplots(rows, nz, figsize=(1.6 * nz, 1.6 * rows))
    for r in range(rows):
        img = batch["image"][0] if r == 0 else np.asarray(out["image"][r - 1])
        edge = bounds0[0] if r == 0 else bounds[r - 1]
        mask = np.ones(img.shape[:-1]) if r == 0 else np.asarray(out["mask"][r - 1])
        for z in range(nz):
            ax = axes[r, z]
            ax.imshow(img[z, ..., 0], cmap="gray", vmin=-2.5, vmax=2.5)
            overlay = np.zeros(edge.shape[1:] + (4,))
            overlay[..., 0], overlay[..., 3] = 1.0, 0.35 * edge[z]
            overlay[mask[z] == 0] = (0.0, 0.4, 1.0, 0.5)  # unlabelled (misalignment border) in blue
            ax.imshow(overlay)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"z={z}", fontsize=8)
        axes[r, 0].set_ylabel("input" if r == 0 else f"aug {r}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
