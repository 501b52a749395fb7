"""Crops per second through the real input pipeline (tensorstore -> grain -> sharded jax.Array).

Writes an image volume of >= 2 GiB (uint8 zarr, 64^3 chunks, zstd) plus labels under --dir,
then times `next(loader)` for 2D and 3D crops with 0 and 2 worker processes, and deletes the
volumes. Prints one JSON object.

    .venv/bin/python benchmarks/loader.py              # 2 GiB volume (a few minutes)
    .venv/bin/python benchmarks/loader.py --small      # 16 MiB volume, seconds
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import jax
import numpy as np
from jax.sharding import Mesh

from jaxem.data import pipeline
from jaxem.data.volume import create_volume


def write_volumes(root: str, shape: tuple[int, int, int]) -> tuple[str, str, float]:
    """Noise-like uint8 image and blocky uint8 labels of `shape`, written in z-slabs; returns seconds."""
    t0 = time.perf_counter()
    image = create_volume(os.path.join(root, "image"), shape, np.uint8, (40.0, 4.0, 4.0), chunks=(64, 64, 64))
    labels = create_volume(os.path.join(root, "labels"), shape, np.uint8, (40.0, 4.0, 4.0), chunks=(64, 64, 64))
    rng = np.random.default_rng(0)
    slab = 16
    yy, xx = np.meshgrid(np.arange(shape[1]) // 48, np.arange(shape[2]) // 48, indexing="ij")
    cells = ((yy * 7 + xx * 13) % 255 + 1).astype(np.uint8)
    cells[(np.arange(shape[1]) % 48 < 4)[:, None] | (np.arange(shape[2]) % 48 < 4)[None, :]] = 0
    for z in range(0, shape[0], slab):
        n = min(slab, shape[0] - z)
        texture = rng.integers(0, 64, (n,) + shape[1:], dtype=np.uint8)
        image.write(texture + (cells > 0).astype(np.uint8) * 128, (z, 0, 0))
        labels.write(np.broadcast_to(cells, (n,) + shape[1:]), (z, 0, 0))
    return image.path, labels.path, time.perf_counter() - t0


def measure(cfg, mesh, ndim: int, batches: int) -> dict:
    """Crops/s over `batches` batches after one warm-up batch (loader start + stats excluded)."""
    t0 = time.perf_counter()
    loader = pipeline.make_loader(cfg, mesh=mesh, ndim=ndim, seed=0)
    jax.block_until_ready(next(loader))
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        jax.block_until_ready(next(loader))
    seconds = time.perf_counter() - t0
    loader.close()
    crops = batches * cfg.batch_size
    return {"crop_shape": list(cfg.crop_shape), "num_workers": cfg.num_workers, "batch_size": cfg.batch_size,
            "crops_per_s": round(crops / seconds, 1),
            "MB_per_s": round(crops * np.prod(cfg.crop_shape) / seconds / 1e6, 1),
            "first_batch_s": round(start_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--dir", default=None, help="where to write the volumes (default: a new folder in /tmp)")
    parser.add_argument("--workers", default="0,2")
    args = parser.parse_args()
    shape = (16, 1024, 1024) if args.small else (128, 4096, 4096)
    batches = 5 if args.small else 40
    root = tempfile.mkdtemp(prefix="jaxem_loader_", dir=args.dir)
    try:
        image, labels, write_s = write_volumes(root, shape)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        results = []
        for crop in ((256, 256), (16, 128, 128)):
            for workers in (int(w) for w in args.workers.split(",")):
                cfg = pipeline.default_data_config()
                cfg.train_images, cfg.train_labels = (image,), (labels,)
                cfg.crop_shape, cfg.batch_size, cfg.num_workers, cfg.prefetch = crop, 8, workers, 4
                results.append(measure(cfg, mesh, len(crop), batches))
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
        print(json.dumps({"benchmark": "loader", "volume_shape": list(shape),
                          "volume_GiB_uncompressed": round(np.prod(shape) / 2**30, 2),
                          "on_disk_GiB": round(size / 2**30, 2), "write_s": round(write_s, 1),
                          "devices": len(jax.devices()), "platform": jax.devices()[0].platform,
                          "cpus": os.cpu_count(), "batches_timed": batches, "results": results}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
