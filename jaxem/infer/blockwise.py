"""Blockwise prediction over volumes far larger than memory, resumable chunk by chunk.

The work is organised per output chunk (see `tiling.py`): for each chunk, the tiles whose
blending weight touches it are predicted (or taken from a small cache of recent tiles), their
weighted sum is divided by the weight sum, the chunk is written once, and only after that write
has finished is the chunk recorded as done. A run killed at any moment and rerun skips the done
chunks and produces the same output as an uninterrupted run; writes never overlap.

The main thread only schedules: it reads and stacks tiles, dispatches forwards and hands each
chunk to a pool of worker threads (`finish_workers`), which copy predictions out of their batch,
blend, convert and write chunks side by side, so that the host keeps up with a GPU. Blending is
one multiply-add per predicted voxel: each tile's weight is pre-divided by the sum of all tiles'
weights there (`Tiling.share`).

Memory is bounded by the block and chunk shapes, whatever the volume's shape: at any time we
hold at most 2 x workers chunks being blended or written (with their tiles), one batch of tiles,
the reads prefetched for the next chunk, a cache of decoded input chunks (`read_cache_bytes`) and
a cache of predicted tiles capped in bytes (`cache_bytes`, see `plan`). Chunks run in Morton order so tiles shared by
neighbouring chunks are mostly still cached; a tile evicted under the cap is predicted again,
which gives the same values (so the output does not depend on the order).

`predict_fn(x)` maps a float32 batch (B, *block, C) to probabilities (B, *block, K); use
`make_predict_fn` to build one from a flax module that shards batches over the local devices.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import tensorstore as ts

from jaxem.data.volume import Volume, kvstore_spec
from jaxem.infer.ensemble import predictor, submitter
from jaxem.infer.output import DONE_PREFIX
from jaxem.infer.tiling import Tiling

DEFAULT_CACHE_BYTES = 2 << 30  # predicted tiles kept for neighbouring chunks
DEFAULT_READ_CACHE_BYTES = 256 << 20  # decoded input chunks shared by overlapping tile reads


def make_predict_fn(apply: Callable, batch_size: int, activation: str = "sigmoid", model_ndim: int | None = None,
                    normalize: tuple[float, float] | None = None):
    """Wraps `apply(x) -> logits` as a jitted, device-sharded `fn(x) -> probabilities`.

    x: (B, *block, C) with B <= batch_size * local devices (padded inside), float32, or any real
    dtype when `normalize` = (a, b) is given: then x is cast and normalised, (x - a) / b, on the
    device, so raw uint8 EM crosses to the device at a quarter of float32's bytes. A 2D model
    (`model_ndim=2`) on 3D tiles (B, 1, y, x, C) runs on the squeezed (B, y, x, C) slices.
    """
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    total = batch_size * len(devices)
    forward = forward_fn(apply, activation, model_ndim, normalize)
    jitted = jax.jit(forward, in_shardings=sharding, out_shardings=sharding)

    def submit(x: np.ndarray) -> Callable[[], np.ndarray]:
        """Starts the forward pass (jax dispatches asynchronously); returns a function that waits."""
        n = x.shape[0]
        if n < total:
            x = np.concatenate([x, np.zeros((total - n, *x.shape[1:]), x.dtype)])
        y = jitted(jax.device_put(x, sharding))
        return lambda: np.asarray(y)[:n]

    return predictor(submit, total)


def forward_fn(apply: Callable, activation: str = "sigmoid", model_ndim: int | None = None,
               normalize: tuple[float, float] | None = None) -> Callable:
    """The traceable forward `f(x) -> probabilities`: x (B, *block, C) of any real dtype is cast
    to float32 and normalised, (x - a) / b, when `normalize` = (a, b); returns (B, *block, K)
    float32. A 2D model (`model_ndim=2`) on 3D tiles (B, 1, y, x, C) runs on the (B, y, x, C) slices."""
    import jax
    import jax.numpy as jnp

    def forward(x):
        x = x.astype(jnp.float32)
        if normalize is not None:
            x = (x - jnp.float32(normalize[0])) / jnp.float32(normalize[1])
        squeeze = model_ndim is not None and x.ndim - 2 > model_ndim
        y = apply(x[:, 0] if squeeze else x)
        y = jax.nn.softmax(y, axis=-1) if activation == "softmax" else jax.nn.sigmoid(y) if activation == "sigmoid" else y
        return (y[:, None] if squeeze else y).astype(jnp.float32)

    return forward


class TileReader:
    """Reads tiles (channels-last) through tensorstore; reads start early. Tiles are float32,
    normalised by `normalize` if given, or with `raw` in the source's dtype where that is a real
    type of at most 4 bytes (for a predictor that normalises on the device)."""

    def __init__(self, source: Volume, tiling: Tiling, normalize: Callable | None = None, raw: bool = False):
        self.source, self.tiling, self.normalize = source, tiling, normalize
        self.channels = source.ndim > tiling.ndim
        dtype = np.dtype(source.dtype)
        self.dtype = dtype if raw and normalize is None and dtype.kind in "uif" and dtype.itemsize <= 4 else np.float32
        self.pending: dict = {}

    def prefetch(self, starts: Sequence[tuple]) -> None:
        for start in starts:
            if start not in self.pending:
                box = self.tiling.tile_box(start)
                box = ((slice(None),) + box) if self.channels else box
                self.pending[start] = self.source.store[box].read()

    def read(self, start) -> np.ndarray:
        self.prefetch([start])
        x = np.asarray(self.source.wait(self.pending.pop(start)), dtype=self.dtype)
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
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    cache_tiles: int | None = None,
    read_cache_bytes: int = DEFAULT_READ_CACHE_BYTES,
    progress: bool = True,
    raw_tiles: bool = False,
) -> dict:
    """Predicts every not-yet-done output chunk of `target` (K, *roi_shape) from `source`.

    Chunks run in Morton order; predicted tiles are kept between chunks up to `cache_bytes` of
    float32 (at least one chunk's tiles; `cache_tiles` sets an exact tile count instead), and
    decoded input chunks up to `read_cache_bytes`, so memory depends on these budgets and the
    block and chunk shapes, not on the volume's. `chunk_filter(index) -> bool` selects this
    process's chunks (multi-host). `raw_tiles` (with `normalize=None`) gives `predict_fn` tiles
    in the source's dtype, for predictors that normalise on the device (`make_predict_fn(normalize=)`).
    Probabilities are stored as float32/float16, or uint8 scaled by 255. Returns statistics:
    tiles_predicted, tiles_total (distinct tiles of the ROI), halo_factor (model voxels per output
    voxel if each tile ran once), recompute_factor (tiles_predicted / tiles_total, full runs only),
    forward_s (seconds spent dispatching forwards, on the main thread, plus waiting for their
    results, on the workers: the next chunk's forwards run while chunks are blended and written,
    so this is below their cost).
    """
    log = DoneLog(target.path)
    done = log.done()
    todo = [c for c in tiling.chunk_order() if c not in done and (chunk_filter is None or chunk_filter(c))]
    limit = cache_tiles or tile_cache_limit(tiling, target.shape[0], cache_bytes)
    reader = TileReader(source.with_read_cache(read_cache_bytes) if read_cache_bytes else source, tiling, normalize,
                        raw=raw_tiles)
    cache: dict = {}
    stats = {"chunks": len(todo), "tiles_predicted": 0, "tiles_total": tiling.tile_count(), "cache_tiles": limit,
             "peak_cached_tiles": 0, "halo_factor": round(tiling.halo_factor(), 3), "forward_s": 0.0, "voxels": 0}
    bar = _progress(sum(np.prod(_box_shape(tiling.chunk_box(c))) for c in todo), progress)
    schedule = _Lookahead(plan(tiling, todo, limit))
    workers = finish_workers()
    finishing: collections.deque = collections.deque()
    marks: collections.deque = collections.deque()
    with ThreadPoolExecutor(workers) as pool, ThreadPoolExecutor(workers) as feeders, ThreadPoolExecutor(1) as marker:
        forwards = _Forwards(predict_fn, reader, cache, stats, pool, feeders)
        for c, tiles, _, evict in schedule:
            forwards.start(schedule, tiles)
            # The next chunk's forwards run on the device while this chunk is blended and written.
            forwards.start(schedule, schedule.peek_missing())
            reader.prefetch(schedule.upcoming(2 * forwards.batch, skip=forwards.known))
            stats["peak_cached_tiles"] = max(stats["peak_cached_tiles"], len(cache))
            # The task holds its tiles, so dropping them from the cache below cannot free them early.
            finishing.append(pool.submit(_finish_chunk, target, tiling, c, tiles, [cache[t] for t in tiles],
                                         out_dtype, log, marker))
            for t in evict:
                del cache[t]
            while finishing and (finishing[0].done() or len(finishing) > 2 * workers):  # bounds memory
                _count(finishing.popleft(), marks, stats, bar)
            while len(marks) > 2 * workers:  # bounds the chunks held by writes in flight
                marks.popleft().result()
        for task in finishing:
            _count(task, marks, stats, bar)
        for mark in marks:
            mark.result()
    bar.close()
    if len(todo) == len(tiling.chunks()):
        stats["recompute_factor"] = round(stats["tiles_predicted"] / max(stats["tiles_total"], 1), 3)
    return stats


def plan(tiling: Tiling, todo: Sequence[tuple], limit: int):
    """The tile schedule for chunks `todo`, in that order, with at most `limit` tiles kept.

    Yields (chunk, its tiles, tiles to predict now, tiles to drop after blending it). Tiles no
    later chunk needs are dropped; beyond `limit`, those needed furthest in the future (Belady's
    rule) are dropped and predicted again when needed. Pure bookkeeping, no arrays.
    """
    rank = {c: i for i, c in enumerate(todo)}
    uses: dict = {}  # tile -> the ranks of the chunks that need it, ascending (while it has any left)
    next_use: dict = {}  # cached tile -> rank of the next chunk that needs it (None: none)
    for now, c in enumerate(todo):
        tiles = tiling.tiles_for_chunk(c)
        missing = [t for t in tiles if t not in next_use]
        for t in tiles:  # only the tiles of this chunk had their next use now
            if t not in uses:
                uses[t] = sorted(rank[u] for u in tiling.chunks_for_tile(t) if u in rank)
            later = uses[t][bisect.bisect_right(uses[t], now):]
            next_use[t] = later[0] if later else None
            if not later:
                del uses[t]
        evict = [t for t, n in next_use.items() if n is None]
        if len(next_use) - len(evict) > limit:
            alive = sorted((n, t) for t, n in next_use.items() if n is not None)
            evict += [t for _, t in alive[limit:]]
        for t in evict:
            del next_use[t]
        yield c, tiles, missing, evict


def tile_cache_limit(tiling: Tiling, channels: int, cache_bytes: int) -> int:
    """How many predicted tiles (float32, `channels` each) fit in `cache_bytes`, but at least the
    most tiles one chunk needs (plus one), since a chunk is blended from all of its tiles at once."""
    per_chunk = max((len(tiling.tiles_for_chunk(c)) for c in _corner_chunks(tiling)), default=1)
    tile_bytes = 4 * channels * int(np.prod(tiling.block))
    return max(per_chunk + 1, int(cache_bytes) // tile_bytes)


def _corner_chunks(tiling: Tiling) -> list[tuple[int, ...]]:
    """A few chunks that together need the most tiles any chunk needs (interior and edges)."""
    per_axis = [sorted({0, min(1, g - 1), g // 2, max(g - 2, 0), g - 1}) for g in tiling.grid()]
    return list(itertools.product(*per_axis))


class _Lookahead:
    """Iterates the steps of `plan` and lets the caller see which tiles later steps will predict.

    Predicting a few of those early fills the last batch of a chunk: chunks need 1-30 new tiles
    each, so batches padded to the device batch would otherwise waste up to half the forwards. A
    tile predicted early is only ever dropped by `plan` after the step that lists it as missing
    (`plan` drops only tiles it has scheduled), so early tiles add at most batch - 1 to the cache.
    """

    def __init__(self, steps):
        self.steps, self.window = steps, collections.deque()

    def __iter__(self):
        while self.window or self._extend():
            yield self.window.popleft()

    def _extend(self) -> bool:
        step = next(self.steps, None)
        if step is not None:
            self.window.append(step)
        return step is not None

    def peek_missing(self) -> list:
        """The tiles the next step lists as missing ([] after the last step)."""
        return self.window[0][2] if self.window or self._extend() else []

    def upcoming(self, n: int, skip: Callable) -> list:
        """The first `n` tiles that later steps list as missing, in order, except those `skip`s."""
        found: list = []
        i = 0
        while len(found) < n and (i < len(self.window) or self._extend()):
            for t in self.window[i][2]:
                if len(found) < n and t not in found and not skip(t):
                    found.append(t)
            i += 1
        return found


class _Forwards:
    """Forward passes: `start` reads and stacks tiles on `feeders`, dispatches full batches, and
    puts each tile into the cache at once as a future on `pool`: a worker waits for the batch
    and copies the tile out of it (a view would pin the whole batch array)."""

    def __init__(self, predict_fn, reader, cache: dict, stats: dict, pool, feeders):
        self.submit, self.batch = submitter(predict_fn), getattr(predict_fn, "batch", 1)
        self.reader, self.cache, self.stats, self.pool, self.feeders = reader, cache, stats, pool, feeders
        self.lock = threading.Lock()  # guards stats["forward_s"], added to by workers

    def known(self, tile) -> bool:
        return tile in self.cache

    def start(self, schedule: "_Lookahead", tiles: list) -> None:
        """Dispatches those of `tiles` not cached or in flight, the last batch filled with tiles
        later chunks need (no padding)."""
        tiles = [t for t in tiles if not self.known(t)]
        if not tiles:
            return
        batch = self.batch
        tiles = tiles + schedule.upcoming(-len(tiles) % batch, skip=lambda t: self.known(t) or t in tiles)
        self.reader.prefetch(tiles)  # every read in flight before the first batch waits for its own
        groups = [tiles[i:i + batch] for i in range(0, len(tiles), batch)]
        stacked = [self.feeders.submit(lambda g: np.stack([self.reader.read(t) for t in g]), g) for g in groups]
        for group, x in zip(groups, stacked):
            x = x.result()
            t0 = time.perf_counter()
            result = _Batch(self.submit(x), self)
            self._add_time(time.perf_counter() - t0)
            self.stats["tiles_predicted"] += len(group)
            for i, t in enumerate(group):
                self.cache[t] = self.pool.submit(result.tile, i)

    def _add_time(self, seconds: float) -> None:
        with self.lock:
            self.stats["forward_s"] += seconds


class _Batch:
    """One dispatched batch: the first `tile(i)` waits for it (once, for every tile of it)."""

    def __init__(self, wait, forwards: _Forwards):
        self.wait, self.forwards, self.lock, self.value = wait, forwards, threading.Lock(), None

    def tile(self, i: int) -> np.ndarray:
        with self.lock:
            if self.value is None:
                t0 = time.perf_counter()
                self.value = self.wait()
                self.forwards._add_time(time.perf_counter() - t0)
        return self.value[i].copy()


def _blend_chunk(tiling: Tiling, index, tiles, predictions) -> np.ndarray:
    """The chunk (K, *chunk): the sum of its tiles' predictions (each (*block, K)) times their
    shares (`Tiling.share`)."""
    box = tiling.chunk_box(index)
    lo = [b.start + r[0] for b, r in zip(box, tiling.roi)]
    shape = _box_shape(box)
    acc = np.zeros((*shape, predictions[0].shape[-1]), np.float32)
    scratch = np.empty_like(acc)  # one buffer for every weighted tile part
    for t, prediction in zip(tiles, predictions):
        src, dst = [], []
        for a, (start, low, size) in enumerate(zip(t, lo, shape)):
            s0, s1 = max(start, low), min(start + tiling.block[a], low + size)
            src.append(slice(s0 - start, s1 - start))
            dst.append(slice(s0 - low, s1 - low))
        src, dst = tuple(src), tuple(dst)
        part = scratch[tuple(slice(0, d.stop - d.start) for d in dst)]
        first, rest = tiling.share_factors(t)
        np.multiply(prediction[src], rest[src[1:]][..., None], out=part)
        part *= first[src[0]].reshape(-1, *(1,) * (rest.ndim + 1))
        acc[dst] += part
    return np.moveaxis(acc, -1, 0)


def _finish_chunk(target, tiling, index, tiles, predictions, out_dtype, log, marker):
    """Blends and converts one chunk and starts its write; `marker` records the chunk done once
    the write has landed. Returns (its voxel count, the marker's future). Runs on a worker thread
    (numpy and tensorstore release the GIL), chunks side by side; the tiles' copies were
    submitted to the same pool earlier, so they are done or running."""
    predictions = [p.result() for p in predictions]
    out = to_dtype(_blend_chunk(tiling, index, tiles, predictions), out_dtype)
    write = target.write_async(out, (0,) + tuple(b.start for b in tiling.chunk_box(index)))
    return int(np.prod(out.shape[1:])), marker.submit(lambda: (write.result(), log.mark(index)))


def _count(task, marks: collections.deque, stats: dict, bar) -> None:
    voxels, mark = task.result()
    marks.append(mark)
    stats["voxels"] += voxels
    bar.update(voxels)


def finish_workers() -> int:
    """Threads that blend and write chunks: the host's cores, up to 8 (a GPU host must keep up
    with the device; on a CPU-only host they share the cores with the model)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores))


def to_dtype(prob: np.ndarray, dtype) -> np.ndarray:
    """Probabilities -> the output dtype: uint8 scales [0, 1] to [0, 255]; floats are cast."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)
    return prob.astype(dtype)


def _box_shape(box) -> tuple[int, ...]:
    return tuple(b.stop - b.start for b in box)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=int(total), unit="vox", unit_scale=True, disable=not enabled, desc="predict")


def predict_run(run_dir, input_path: str, output_path: str, **kwargs) -> dict:
    """Predicts `input_path` with the model of a run workdir; see `jaxem.infer.job.run_prediction`."""
    from jaxem.infer.job import run_prediction

    return run_prediction([str(run_dir)], str(input_path), str(output_path), **kwargs)
