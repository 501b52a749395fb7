"""Sliding window on the device: one jitted function per block of output chunks (issue #24).

The host reads one raw region (the union of the block's tiles, in the source dtype, e.g. uint8)
and moves it to the device once; `make_block_fn`'s jitted function cuts the tiles out of it
(dynamic_slice), normalises them, runs the forwards batch by batch (lax.map), weights each tile
by its share (`Tiling.share_factors`, so the shares of a voxel add up to 1) and adds it into a
device buffer, crops the block and converts it to the output dtype: only the raw region goes in
and the finished output comes back. Tiles are added in the order of `Tiling.tiles_for_chunk`
with the same float32 arithmetic as `blockwise._blend_chunk`, so the output equals the host
path's up to the forward pass itself (tested to 1e-6 for float32 output).

`predict_blocks` drives it over a volume (Morton order of blocks, next region read during the
device work, per-chunk writes and done markers, resume); it is not yet what `jaxem predict`
runs (see docs/inference.md, "What remains of issue #24").
"""

from __future__ import annotations

import collections
import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np

from jaxem.infer.blockwise import DoneLog
from jaxem.infer.ensemble import check_reduction, combine, transform, tta_transforms
from jaxem.infer.tiling import Tiling, morton_key


@dataclass(frozen=True)
class BlockGeometry:
    """Where a block of chunks lies and which tiles it needs; all in voxels, absolute unless said.

    out_box: the block's output box relative to the ROI (chunk-aligned slices).
    region: the absolute input box to read (the union of its tiles).
    tiles: (n, ndim) int32 tile starts relative to `region`.
    place: (n, ndim) int32 tile starts relative to the output box, plus `block` (so >= 0).
    first: (n, block[0]) float32 share profile along axis 0; rest: (n, *block[1:]) float32.
    """

    out_box: tuple[slice, ...]
    region: tuple[slice, ...]
    tiles: np.ndarray
    place: np.ndarray
    first: np.ndarray
    rest: np.ndarray


def block_geometry(tiling: Tiling, lo: tuple[int, ...], hi: tuple[int, ...]) -> BlockGeometry:
    """The geometry of the block of chunks with indices lo <= index < hi (per axis)."""
    per_axis = [sorted({t for i in range(a, b) for t in tiling._tiles_along(axis, i)})
                for axis, (a, b) in enumerate(zip(lo, hi))]
    starts = np.array(list(itertools.product(*per_axis)), np.int32).reshape(-1, tiling.ndim)
    out_box = tuple(slice(a * c, min(b * c, s)) for a, b, c, s in zip(lo, hi, tiling.chunk, tiling.roi_shape))
    region = tuple(slice(int(p[0]), int(p[-1]) + k) for p, k in zip(per_axis, tiling.block))
    origin = np.array([b.start + r[0] for b, r in zip(out_box, tiling.roi)], np.int32)
    factors = [tiling.share_factors(tuple(int(v) for v in t)) for t in starts]
    return BlockGeometry(out_box, region, starts - np.array([r.start for r in region], np.int32),
                         starts - origin + np.array(tiling.block, np.int32),
                         np.stack([f for f, _ in factors]), np.stack([r for _, r in factors]))


def make_block_fn(forward: Callable, block: tuple[int, ...], batch: int, out_dtype=np.float32) -> Callable:
    """A jitted `fn(region, tiles, place, first, rest, count, out_shape) -> (K, *out_shape)` in `out_dtype`.

    forward: jax function (B, *block, C) raw tiles -> (B, *block, K) float32 probabilities (it
    casts and normalises, see `blockwise.forward_fn`). region: (*R) or (C, *R) raw input on the
    device; the other arguments as in `BlockGeometry`, of which the first `count` tiles are used
    (the rest pad them to a fixed count, see `run_block`; out_shape is static).
    Tiles run `batch` per forward (the last batch padded, its padding adding nothing), each batch
    blended into the accumulator before the next runs: device memory is the region, the
    accumulator ((*out_shape + 2 * block, K) float32) and one batch, whatever the tile count.
    """
    import jax

    return jax.jit(partial(_blend_block, forward, tuple(block), int(batch), np.dtype(out_dtype)),
                   static_argnames="out_shape")


def _blend_block(forward, block, batch, out_dtype, region, tiles, place, first, rest, count, out_shape):
    import jax
    import jax.numpy as jnp
    from jax import lax

    x = region[..., None] if region.ndim == len(block) else jnp.moveaxis(region, 0, -1)
    n = tiles.shape[0]
    pad = lambda a: jnp.concatenate([a, jnp.zeros((-n % batch, *a.shape[1:]), a.dtype)])
    tiles, place, first, rest = (pad(a) for a in (tiles, place, first, rest))
    k = jax.eval_shape(forward, jax.ShapeDtypeStruct((batch, *block, x.shape[-1]), x.dtype)).shape[-1]
    acc = jnp.zeros((*(o + 2 * b for o, b in zip(out_shape, block)), k), jnp.float32)

    def add(i, acc, probs, j):  # the same float32 products, in the same order, as blockwise._blend_chunk
        part = probs[j] * rest[i][..., None]
        part = part * first[i].reshape(-1, *(1,) * len(block))
        part = jnp.where(i < count, part, 0.0)  # a padded tile adds nothing (acc + 0.0 == acc)
        at = (*place[i], 0)
        return lax.dynamic_update_slice(acc, lax.dynamic_slice(acc, at, part.shape) + part, at)

    def step(b, acc):  # one forward of `batch` tiles cut from the region, then their blending
        starts = lax.dynamic_slice_in_dim(tiles, b * batch, batch)
        cut = jax.vmap(lambda s: lax.dynamic_slice(x, (*s, 0), (*block, x.shape[-1])))(starts)
        probs = forward(cut)
        return lax.fori_loop(0, batch, lambda j, acc: add(b * batch + j, acc, probs, j), acc)

    acc = lax.fori_loop(0, tiles.shape[0] // batch, step, acc)
    out = jnp.moveaxis(acc[tuple(slice(b, b + o) for b, o in zip(block, out_shape))], -1, 0)
    if out_dtype == np.uint8:
        return jnp.clip(jnp.rint(out * 255.0), 0, 255).astype(jnp.uint8)
    return out.astype(out_dtype)


def tta_forward(forward: Callable, block: tuple[int, ...], rotations: bool = True) -> Callable:
    """`forward` averaged over `ensemble.tta_transforms(block)` inside the jitted function: the
    (B, *block, C) tiles are flipped / turned in y-x, predicted, turned back and averaged, in
    the order and with the float32 sums of `ensemble.with_tta` (which does it on the host)."""
    import jax.numpy as jnp

    transforms = tta_transforms(block, rotations)

    def averaged(x):
        total = None
        for t in transforms:
            y = transform(jnp, forward(transform(jnp, x, t)), t, inverse=True)
            total = y if total is None else total + y
        return total / len(transforms)

    return averaged


def ensemble_forward(forwards: Sequence[Callable], reduce: str = "mean", multiclass: bool = False) -> Callable:
    """The models' forwards combined inside the jitted function by `ensemble.combine` ('mean',
    'median' or 'majority', as `ensemble.ensemble` does on the host)."""
    import jax.numpy as jnp

    check_reduction(reduce, len(forwards))
    return lambda x: combine(jnp, jnp.stack([f(x) for f in forwards]), reduce, multiclass)


def read_region(source, geometry: BlockGeometry):
    """Starts reading the block's raw region from `source` (a Volume, channels first if it has
    them) in its own dtype; returns the tensorstore future (`source.wait` it)."""
    channels = source.ndim > len(geometry.region)
    return source.store[((slice(None),) + geometry.region) if channels else geometry.region].read()


def fixed_shapes(shapes) -> tuple:
    """(region shape, tile count, output shape), each the largest of `shapes` = [(geometry.region,
    tile count, geometry.out_box)]: padding every block to them compiles `block_fn` once for a
    whole volume (edge blocks are smaller)."""
    size = lambda boxes: tuple(max(b.stop - b.start for b in axis) for axis in zip(*boxes))
    return size([r for r, _, _ in shapes]), max(n for _, n, _ in shapes), size([o for _, _, o in shapes])


def run_block(block_fn: Callable, region: np.ndarray, geometry: BlockGeometry, fixed: tuple | None = None):
    """Dispatches `block_fn` on a read region (zero-padded to `fixed` = `fixed_shapes(...)` if
    given); returns the device array (K, *out shape), larger than the block's if padded (`crop`)."""
    shape = tuple(b.stop - b.start for b in geometry.out_box)
    arrays = [geometry.tiles, geometry.place, geometry.first, geometry.rest]
    if fixed is not None:
        grow, n, shape = fixed
        region = np.pad(region, [(0, 0)] * (region.ndim - len(grow)) + [(0, g - r) for g, r in
                                                                         zip(grow, region.shape[-len(grow):])])
        arrays = [np.pad(a, [(0, n - len(a))] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
    return block_fn(region, *arrays, np.int32(len(geometry.tiles)), out_shape=shape)


def crop(out: np.ndarray, geometry: BlockGeometry) -> np.ndarray:
    """A block's output (K, *out shape) without the padding `run_block` may have added."""
    return out[(slice(None),) + tuple(slice(0, b.stop - b.start) for b in geometry.out_box)]


def predict_block(block_fn: Callable, source, geometry: BlockGeometry) -> np.ndarray:
    """Reads the block's raw region, runs `block_fn` on the device and returns the block
    (K, *out_shape) on the host."""
    return np.asarray(run_block(block_fn, source.wait(read_region(source, geometry)), geometry))


def predict_blocks(block_fn: Callable, source, target, tiling: Tiling, chunks_per_block: tuple[int, ...],
                   chunk_filter: Callable | None = None) -> dict:
    """Predicts every not-yet-done chunk of `target` (K, *roi_shape) block by block: blocks of
    `chunks_per_block` chunks in Morton order, the next block's region read while the device
    runs this one, each chunk written alone and marked done (`blockwise.DoneLog`) once its write
    lands, at most two blocks' writes in flight. A block with some chunks done is recomputed and
    writes only the others; `chunk_filter(index) -> bool` selects this process's chunks. Every
    block is padded to the largest block's shapes, so `block_fn` compiles once per volume. Host
    memory: two regions and two blocks' outputs, whatever the volume's shape. Returns
    {"blocks", "chunks", "tiles_predicted", "recompute_factor"}."""

    log, work = DoneLog(target.path), []
    done = log.done()
    for lo in sorted(itertools.product(*(range(0, g, n) for g, n in zip(tiling.grid(), chunks_per_block))),
                     key=lambda lo: morton_key(tuple(a // n for a, n in zip(lo, chunks_per_block)))):
        hi = tuple(min(a + n, g) for a, n, g in zip(lo, chunks_per_block, tiling.grid()))
        todo = [c for c in itertools.product(*map(range, lo, hi))
                if c not in done and (chunk_filter is None or chunk_filter(c))]
        if todo:
            work.append((lo, hi, todo))
    geometry = lambda k: block_geometry(tiling, *work[k][:2])  # built when needed: O(1 block) memory
    shapes = [(g.region, len(g.tiles), g.out_box) for g in map(geometry, range(len(work)))]
    stats = {"blocks": len(work), "chunks": sum(len(w[2]) for w in work),
             "tiles_predicted": sum(n for _, n, _ in shapes)}
    stats["recompute_factor"] = round(stats["tiles_predicted"] / max(tiling.tile_count(), 1), 3)
    fixed = fixed_shapes(shapes) if work else None
    with ThreadPoolExecutor(1) as marker:
        marks: collections.deque = collections.deque()
        following = geometry(0) if work else None
        read = read_region(source, following) if work else None
        for k, (_, _, todo) in enumerate(work):
            current = following
            out = run_block(block_fn, source.wait(read), current, fixed)  # dispatched: runs on the device
            following = geometry(k + 1) if k + 1 < len(work) else None
            read = read_region(source, following) if following is not None else None
            out = crop(np.asarray(out), current)
            for c in todo:
                marks.append(marker.submit(_write_chunk, target, tiling, current, out, c, log))
            while len(marks) > 2 * len(todo):  # bounds the blocks held by writes in flight
                marks.popleft().result()
        for mark in marks:
            mark.result()
    return stats


def _write_chunk(target, tiling: Tiling, geometry: BlockGeometry, out: np.ndarray, index, log) -> None:
    """Writes chunk `index` of a block's output and marks it done once the write has landed."""
    box = tiling.chunk_box(index)
    part = out[(slice(None),) + tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, geometry.out_box))]
    target.write_async(part, (0,) + tuple(b.start for b in box)).result()
    log.mark(index)
