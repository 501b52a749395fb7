"""Blockwise prediction over volumes far larger than memory, resumable chunk by chunk.

The work is organised per output chunk (see `tiling.py`): for each chunk, the tiles whose
blending weight touches it are predicted (or taken from a small cache of recent tiles), their
weighted sum is divided by the weight sum, the chunk is written once, and only after that write
has finished is the chunk recorded as done. A run killed at any moment and rerun skips the done
chunks and produces the same output as an uninterrupted run; writes never overlap.

Memory is bounded by the block size: at any time we hold one chunk accumulator, one batch of
tiles, the reads prefetched for the next chunk and a tile cache capped by tile count and freed
as soon as no pending chunk needs a tile.

`predict_fn(x)` maps a float32 batch (B, *block, C) to probabilities (B, *block, K); use
`make_predict_fn` to build one from a flax module that shards batches over the local devices.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import tensorstore as ts

from jaxem.data.volume import Volume, kvstore_spec
from jaxem.infer.tiling import Tiling

DONE_PREFIX = "jaxem_done/"


def make_predict_fn(apply: Callable, batch_size: int, activation: str = "sigmoid", model_ndim: int | None = None):
    """Wraps `apply(x) -> logits` as a jitted, device-sharded `fn(x) -> probabilities`.

    x: (B, *block, C) float32 with B <= batch_size * local devices (padded inside). A 2D model
    (`model_ndim=2`) on 3D tiles (B, 1, y, x, C) runs on the squeezed (B, y, x, C) slices.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    total = batch_size * len(devices)

    def forward(x):
        squeeze = model_ndim is not None and x.ndim - 2 > model_ndim
        y = apply(x[:, 0] if squeeze else x)
        y = jax.nn.softmax(y, axis=-1) if activation == "softmax" else jax.nn.sigmoid(y) if activation == "sigmoid" else y
        return (y[:, None] if squeeze else y).astype(jnp.float32)

    jitted = jax.jit(forward, in_shardings=sharding, out_shardings=sharding)

    def fn(x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if n < total:
            x = np.concatenate([x, np.zeros((total - n, *x.shape[1:]), x.dtype)])
        return np.asarray(jitted(jax.device_put(x, sharding)))[:n]

    fn.batch = total
    return fn


class TileReader:
    """Reads tiles (float32, normalised, channels-last) through tensorstore; reads start early."""

    def __init__(self, source: Volume, tiling: Tiling, normalize: Callable | None = None):
        self.source, self.tiling, self.normalize = source, tiling, normalize
        self.channels = source.ndim > tiling.ndim
        self.pending: dict = {}

    def prefetch(self, starts: Sequence[tuple]) -> None:
        for start in starts:
            if start not in self.pending:
                box = self.tiling.tile_box(start)
                box = ((slice(None),) + box) if self.channels else box
                self.pending[start] = self.source.store[box].read()

    def read(self, start) -> np.ndarray:
        self.prefetch([start])
        x = np.asarray(self.pending.pop(start).result(), dtype=np.float32)
        x = np.moveaxis(x, 0, -1) if self.channels else x[..., None]
        if self.normalize is not None:
            x = self.normalize(x)
        pad = [(0, b - s) for b, s in zip(self.tiling.block, x.shape[:-1])] + [(0, 0)]
        return np.pad(x, pad, mode="reflect") if any(p[1] for p in pad) else x


class DoneLog:
    """Which output chunks are finished: one empty key per chunk next to the output array."""

    def __init__(self, output_path: str):
        self.kv = ts.KvStore.open(kvstore_spec(output_path)).result()

    @staticmethod
    def key(index) -> str:
        return DONE_PREFIX + "_".join(map(str, index))

    def done(self) -> set[tuple[int, ...]]:
        keys = self.kv.list(ts.KvStore.KeyRange(DONE_PREFIX, DONE_PREFIX[:-1] + "0")).result()
        return {tuple(int(v) for v in k.decode()[len(DONE_PREFIX):].split("_")) for k in keys}

    def mark(self, index) -> None:
        self.kv.write(self.key(index), b"").result()


def predict_volume(
    predict_fn: Callable,
    source: Volume,
    target: Volume,
    tiling: Tiling,
    normalize: Callable | None = None,
    out_dtype=np.float32,
    chunk_filter: Callable | None = None,
    cache_tiles: int | None = None,
    progress: bool = True,
) -> dict:
    """Predicts every not-yet-done output chunk of `target` (K, *roi_shape) from `source`.

    `chunk_filter(index) -> bool` selects this process's chunks (multi-host). Probabilities are
    stored as float32/float16, or uint8 scaled by 255. Returns timing statistics.
    """
    log = DoneLog(target.path)
    todo = [c for c in tiling.chunks() if c not in log.done() and (chunk_filter is None or chunk_filter(c))]
    tiles_of = {c: tiling.tiles_for_chunk(c) for c in todo}
    uses: dict = {}
    for c in todo:
        for t in tiles_of[c]:
            uses[t] = uses.get(t, 0) + 1
    reader = TileReader(source, tiling, normalize)
    cache: OrderedDict = OrderedDict()
    limit = cache_tiles or 4 * max((len(v) for v in tiles_of.values()), default=1)
    stats = {"chunks": len(todo), "tiles_predicted": 0, "forward_s": 0.0, "voxels": 0}
    bar = _progress(sum(np.prod(_box_shape(tiling.chunk_box(c))) for c in todo), progress)
    writes: list = []
    with ThreadPoolExecutor(1) as marker:
        for i, c in enumerate(todo):
            if i + 1 < len(todo):
                reader.prefetch([t for t in tiles_of[todo[i + 1]] if t not in cache])
            _predict_missing(predict_fn, reader, [t for t in tiles_of[c] if t not in cache], cache, stats)
            out = _blend_chunk(tiling, c, tiles_of[c], cache)
            writes.append(_write_chunk(target, tiling, c, out, out_dtype, log, marker))
            _release(tiles_of[c], uses, cache, limit)
            stats["voxels"] += int(np.prod(out.shape[1:]))
            bar.update(int(np.prod(out.shape[1:])))
            writes = [w for w in writes if not w.done()]
            while len(writes) > 4:  # bound memory held by in-flight writes
                writes.pop(0).result()
        for w in writes:
            w.result()
    bar.close()
    return stats


def _predict_missing(predict_fn, reader, missing, cache, stats) -> None:
    batch = getattr(predict_fn, "batch", 1)
    for i in range(0, len(missing), batch):
        group = missing[i:i + batch]
        x = np.stack([reader.read(t) for t in group])
        t0 = time.perf_counter()
        y = predict_fn(x)
        stats["forward_s"] += time.perf_counter() - t0
        stats["tiles_predicted"] += len(group)
        for t, pred in zip(group, y):
            cache[t] = pred


def _blend_chunk(tiling: Tiling, index, tiles, cache) -> np.ndarray:
    """The chunk (K, *chunk) as the weight-normalised sum of its tiles' predictions."""
    box = tiling.chunk_box(index)
    lo = [b.start + r[0] for b, r in zip(box, tiling.roi)]
    shape = _box_shape(box)
    k = next(iter(cache[t] for t in tiles)).shape[-1]
    acc = np.zeros((*shape, k), np.float32)
    wsum = np.zeros(shape, np.float32)
    for t in tiles:
        src, dst = [], []
        for a, (start, low, size) in enumerate(zip(t, lo, shape)):
            s0, s1 = max(start, low), min(start + tiling.block[a], low + size)
            src.append(slice(s0 - start, s1 - start))
            dst.append(slice(s0 - low, s1 - low))
        w = tiling.weight(t)[tuple(src)]
        acc[tuple(dst)] += cache[t][tuple(src)] * w[..., None]
        wsum[tuple(dst)] += w
    return np.moveaxis(acc / np.maximum(wsum, 1e-12)[..., None], -1, 0)


def _write_chunk(target, tiling, index, out, out_dtype, log, marker):
    """Starts the chunk write; a background thread records the chunk done once it lands."""
    out = to_dtype(out, out_dtype)
    offset = (0,) + tuple(b.start for b in tiling.chunk_box(index))
    future = target.write_async(out, offset)
    return marker.submit(lambda: (future.result(), log.mark(index)))


def to_dtype(prob: np.ndarray, dtype) -> np.ndarray:
    """Probabilities -> the output dtype: uint8 scales [0, 1] to [0, 255]; floats are cast."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)
    return prob.astype(dtype)


def _release(tiles, uses, cache, limit) -> None:
    for t in tiles:
        uses[t] -= 1
        if uses[t] == 0:
            cache.pop(t, None)
    while len(cache) > limit:
        cache.popitem(last=False)


def _box_shape(box) -> tuple[int, ...]:
    return tuple(b.stop - b.start for b in box)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=int(total), unit="vox", unit_scale=True, disable=not enabled, desc="predict")


def predict_run(run_dir, input_path: str, output_path: str, **kwargs) -> dict:
    """Predicts `input_path` with the model of a run workdir; see `jaxem.infer.job.run_prediction`."""
    from jaxem.infer.job import run_prediction

    return run_prediction([str(run_dir)], str(input_path), str(output_path), **kwargs)
