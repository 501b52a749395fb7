"""Prediction of a volume on the device: one jitted sliding window per block of output chunks (issue #24).

The host reads one raw region per block (the union of the block's tiles, in the source dtype, e.g.
uint8 EM) on a reader thread and moves it to the device; `make_block_fn`'s jitted function cuts the
tiles out of it (dynamic_slice), normalises them, runs the forwards batch by batch (fori_loop), with
TTA (`tta_forward`) and ensembles (`ensemble_forward`) inside, weights each tile by its share
(`Tiling.share_factors`, so the shares of a voxel add up to 1), adds it into a device accumulator,
crops the block and converts it to the output dtype: only the raw region goes in and the finished
block comes out, which a writer thread writes chunk by chunk, marking each chunk done once its write
has landed (`output.DoneLog`: a killed run resumes with the same bytes).

`predict_volume` drives it over a volume: blocks sized from a byte budget (`chunks_per_block`),
column by column (a column: the blocks that share their place in the axes after the first, columns
in Morton order), spread over the local devices, the next block's read and the previous block's
writes overlapping the device work through bounded queues, so host memory is a few blocks whatever
the volume's shape. Along axis 0 a block hands the rim of its accumulator (the weighted sums of its
tiles that reach into the next block) to the next block of its column (`carries`), so tiles that
cross those borders run once; a tile that touches two blocks across the other axes runs once per
block (`recompute_factor`), which `chunks_per_block` keeps small by choosing the block shape.
"""

from __future__ import annotations

import collections
import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm import tqdm

from jaxem.infer.ensemble import check_reduction, combine, transform, tta_transforms
from jaxem.infer.output import DoneLog
from jaxem.infer.tiling import Tiling, morton_key

DEFAULT_BLOCK_BYTES = 1 << 30  # a block's window on the device: raw region + float32 accumulator + output
AUTO_BLOCK_FRACTION = 8  # predict.block_gib=0 on an accelerator: this share of its memory per block's window
MAX_AUTO_BLOCK_BYTES = 16 << 30  # (two windows can be in flight, and the model's activations come on top)


def forward_fn(apply: Callable, activation: str = "sigmoid", model_ndim: int | None = None,
               normalize: tuple[float, float] | None = None) -> Callable:
    """The traceable forward `f(x) -> probabilities`: x (B, *block, C) of any real dtype is cast
    to float32 and normalised, (x - a) / b, when `normalize` = (a, b); returns (B, *block, K)
    float32. A 2D model (`model_ndim=2`) on 3D tiles (B, 1, y, x, C) runs on the (B, y, x, C) slices."""

    def forward(x):
        x = x.astype(jnp.float32)
        if normalize is not None:
            x = (x - jnp.float32(normalize[0])) / jnp.float32(normalize[1])
        squeeze = model_ndim is not None and x.ndim - 2 > model_ndim
        y = apply(x[:, 0] if squeeze else x)
        y = jax.nn.softmax(y, axis=-1) if activation == "softmax" else jax.nn.sigmoid(y) if activation == "sigmoid" else y
        return (y[:, None] if squeeze else y).astype(jnp.float32)

    return forward


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


def carries(tiling: Tiling, per_block: Sequence[int]) -> bool:
    """Whether blocks of `per_block` chunks carry their accumulator rim along axis 0 to the next
    block of their column: when there are several blocks along axis 0 and each but the last is at
    least a tile long there, so a tile reaches at most into the next block, and a block's carried-in
    rim (its first block[0] voxels) never overlaps the rim it hands on (past its end)."""
    return tiling.grid()[0] > per_block[0] and per_block[0] * tiling.chunk[0] >= tiling.block[0]


def tiles_of_block(tiling: Tiling, axis: int, lo: int, hi: int, carry: bool = False) -> list[int]:
    """The tile starts along `axis` that a block of chunks lo <= i < hi there runs: those touching
    it, less (along axis 0 when `carry`) those touching the previous block, whose share of this
    block arrives in the carried rim."""
    tiles = tiling.tiles_touching(axis, lo, hi)
    if carry and axis == 0 and lo > 0:
        before = set(tiling.tiles_along(axis, lo - 1))
        tiles = [t for t in tiles if t not in before]
    return tiles


def block_geometry(tiling: Tiling, lo: tuple[int, ...], hi: tuple[int, ...], carry: bool = False) -> BlockGeometry:
    """The geometry of the block of chunks with indices lo <= index < hi (per axis); with `carry`
    (see `carries`) only the tiles it runs itself (`tiles_of_block`)."""
    per_axis = [tiles_of_block(tiling, axis, a, b, carry) for axis, (a, b) in enumerate(zip(lo, hi))]
    starts = np.array(list(itertools.product(*per_axis)), np.int32).reshape(-1, tiling.ndim)
    out_box = tuple(slice(a * c, min(b * c, s)) for a, b, c, s in zip(lo, hi, tiling.chunk, tiling.roi_shape))
    origin = [b.start + r[0] for b, r in zip(out_box, tiling.roi)]
    # A block may run no tile of its own (a short last block whose tiles all start in the one before).
    region = tuple(slice(p[0], p[-1] + k) if p else slice(o, o) for p, k, o in zip(per_axis, tiling.block, origin))
    factors = [tiling.share_factors(tuple(int(v) for v in t)) for t in starts]
    first = np.stack([f for f, _ in factors]) if factors else np.zeros((0, tiling.block[0]), np.float32)
    rest = np.stack([r for _, r in factors]) if factors else np.zeros((0, *tiling.block[1:]), np.float32)
    return BlockGeometry(out_box, region, starts - np.array([r.start for r in region], np.int32),
                         starts - np.array(origin, np.int32) + np.array(tiling.block, np.int32), first, rest)


def make_block_fn(forward: Callable, block: tuple[int, ...], batch: int, out_dtype=np.float32) -> Callable:
    """A jitted `fn(region, tiles, place, first, rest, count, carried=None, out_shape) -> (K, *out_shape)`
    in `out_dtype`, or with a `carried` rim `(output, rim)`.

    forward: jax function (B, *block, C) raw tiles -> (B, *block, K) float32 probabilities (it
    casts and normalises, see `forward_fn`). region: (*R) or (C, *R) raw input on the
    device; the other arguments as in `BlockGeometry`, of which the first `count` tiles are used
    (the rest pad them to a fixed count, see `block_inputs`; out_shape is static).
    Tiles run `batch` per forward (the last batch padded, its padding adding nothing), each batch
    blended into the accumulator before the next runs, a tile's part outside the output cut off
    (rolled and masked, then one dynamic_update_slice): device memory is the region, the
    accumulator ((*max(out_shape, block), K) float32) and one batch, whatever the tile count.
    carried: (block[0], *max(out_shape, block)[1:], K) float32, the previous block's rim (`rim_shape`):
    the accumulator starts from it and reaches block[0] voxels past the output along axis 0, and
    that part is returned as this block's rim. Each voxel's sum is taken tile by tile in the order
    of the tile starts, so carrying gives the bytes of running every tile in the block.
    """
    return jax.jit(partial(_blend_block, forward, tuple(block), int(batch), np.dtype(out_dtype)),
                   static_argnames="out_shape")


def _blend_block(forward, block, batch, out_dtype, region, tiles, place, first, rest, count, carried=None, *,
                 out_shape):
    x = region[..., None] if region.ndim == len(block) else jnp.moveaxis(region, 0, -1)
    n = tiles.shape[0]
    pad = lambda a: jnp.concatenate([a, jnp.zeros((-n % batch, *a.shape[1:]), a.dtype)])
    tiles, place, first, rest = (pad(a) for a in (tiles, place, first, rest))
    k = jax.eval_shape(forward, jax.ShapeDtypeStruct((batch, *block, x.shape[-1]), x.dtype)).shape[-1]
    size = tuple(max(o, b) for o, b in zip(out_shape, block))  # the block's output, at least one tile
    if carried is None:
        acc = jnp.zeros((*size, k), jnp.float32)
    else:  # room for the rim handed on; the carried rim is where the block starts
        size = (size[0] + block[0], *size[1:])
        acc = jnp.zeros((*size, k), jnp.float32).at[:block[0]].set(carried)

    def add(i, acc, probs, j):  # a tile's share times its prediction, tiles in tiles_for_chunk order
        part = probs[j] * rest[i][..., None]
        part = part * first[i].reshape(-1, *(1,) * len(block))
        part = jnp.where(i < count, part, 0.0)  # a padded tile adds nothing (acc + 0.0 == acc)
        at = []
        for axis, (b, a) in enumerate(zip(block, size)):  # a tile reaching past the output is cut there
            start = place[i][axis] - b
            clipped = jnp.clip(start, 0, a - b)
            index = jnp.arange(b) + (clipped - start)
            shape = [1] * (len(block) + 1)
            shape[axis] = b
            part = jnp.where(((index >= 0) & (index < b)).reshape(shape), jnp.roll(part, start - clipped, axis), 0.0)
            at.append(clipped)
        at = (*at, 0)
        return lax.dynamic_update_slice(acc, lax.dynamic_slice(acc, at, part.shape) + part, at)

    def step(b, acc):  # one forward of `batch` tiles cut from the region, then their blending
        starts = lax.dynamic_slice_in_dim(tiles, b * batch, batch)
        cut = jax.vmap(lambda s: lax.dynamic_slice(x, (*s, 0), (*block, x.shape[-1])))(starts)
        probs = forward(cut)
        return lax.fori_loop(0, batch, lambda j, acc: add(b * batch + j, acc, probs, j), acc)

    acc = lax.fori_loop(0, (count + batch - 1) // batch, step, acc)  # padding tiles past `count` never run
    out = jnp.moveaxis(acc[tuple(slice(0, o) for o in out_shape)], -1, 0)
    if out_dtype == np.uint8:
        out = jnp.clip(jnp.rint(out * 255.0), 0, 255).astype(jnp.uint8)
    out = out.astype(out_dtype)
    return out if carried is None else (out, acc[out_shape[0]:out_shape[0] + block[0]])


def rim_shape(tiling: Tiling, per_block: Sequence[int], channels_out: int) -> tuple[int, ...]:
    """The shape of a carried rim for blocks of `per_block` chunks (see `make_block_fn`)."""
    out = fixed_shapes(tiling, per_block)[2]
    return (tiling.block[0], *(max(o, b) for o, b in zip(out[1:], tiling.block[1:])), channels_out)


def tta_forward(forward: Callable, block: tuple[int, ...], rotations: bool = True) -> Callable:
    """`forward` averaged over `ensemble.tta_transforms(block)` inside the jitted function: the
    (B, *block, C) tiles are flipped / turned in y-x, predicted, turned back and averaged, in
    the order and with the float32 sums of the host TTA it replaced."""
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
    'median' or 'majority')."""
    check_reduction(reduce, len(forwards))
    return lambda x: combine(jnp, jnp.stack([f(x) for f in forwards]), reduce, multiclass)


def auto_block_bytes(device=None) -> int:
    """The block budget in bytes that `predict.block_gib=0` (the default) means on `device` (the
    first local device when None): 1/AUTO_BLOCK_FRACTION of the memory an accelerator reports
    (`memory_stats()["bytes_limit"]`), between DEFAULT_BLOCK_BYTES and MAX_AUTO_BLOCK_BYTES;
    DEFAULT_BLOCK_BYTES on a CPU or a device that reports no limit. Bigger blocks recompute fewer
    border tiles (`tiles_run`), so an 80 GB GPU should not be held to a CPU's 1 GiB."""
    device = device if device is not None else jax.local_devices()[0]
    if device.platform == "cpu":
        return DEFAULT_BLOCK_BYTES
    try:
        limit = int((device.memory_stats() or {}).get("bytes_limit", 0))
    except Exception:  # a backend without memory statistics
        limit = 0
    if limit <= 0:
        return DEFAULT_BLOCK_BYTES
    return int(min(max(limit // AUTO_BLOCK_FRACTION, DEFAULT_BLOCK_BYTES), MAX_AUTO_BLOCK_BYTES))


def block_budget_bytes(gib: float, device=None) -> int:
    """Bytes of one block's window for `predict.block_gib` = `gib` >= 0: `gib` GiB, or with 0 (auto)
    `auto_block_bytes(device)`."""
    return int(gib * 2**30) if gib > 0 else auto_block_bytes(device)


def block_bytes(tiling: Tiling, per_block: Sequence[int], channels_in: int, in_itemsize: int, channels_out: int,
                out_itemsize: int) -> int:
    """Device bytes of one block's window with `per_block` chunks per axis: the raw region (at
    most the block grown by a tile on every side, `channels_in` x `in_itemsize` bytes a voxel),
    the float32 accumulator (the block, at least one tile, `channels_out` channels; when blocks
    `carries`, a tile longer along axis 0, and the rims in and out) and the output
    (`out_itemsize` bytes). The model's activations for one batch come on top."""
    out = [min(m * c, s) for m, c, s in zip(per_block, tiling.chunk, tiling.roi_shape)]
    grown = math.prod(o + 2 * b for o, b in zip(out, tiling.block))
    size = [max(o, b) for o, b in zip(out, tiling.block)]
    acc = math.prod(size) + (3 * tiling.block[0] * math.prod(size[1:]) if carries(tiling, per_block) else 0)
    return grown * channels_in * in_itemsize + acc * 4 * channels_out + math.prod(out) * channels_out * out_itemsize


def tiles_run(tiling: Tiling, per_block: Sequence[int]) -> int:
    """Tiles run by all blocks of `per_block` chunks together (`tiles_of_block`, rims carried along
    axis 0 when the blocks `carries`): `tiling.tile_count()` when each tile runs once."""
    carry, total = carries(tiling, per_block), 1
    for axis, (g, m) in enumerate(zip(tiling.grid(), per_block)):
        total *= sum(len(tiles_of_block(tiling, axis, lo, min(lo + m, g), carry)) for lo in range(0, g, m))
    return total


def chunks_per_block(tiling: Tiling, budget: int, min_blocks: int = 1, **sizes) -> tuple[int, ...]:
    """Chunks per axis of the blocks that run the fewest tiles (`tiles_run`), then the fewest
    blocks, among ceil(grid / 2^k) chunks per axis within `budget` bytes (`block_bytes(**sizes)`)
    and with at least `min_blocks` blocks (one per process); one chunk per axis when none fits.
    Rims carried along axis 0 make slabs along axis 0 free of recomputation, so a volume too
    large for one block is cut along axis 0 first, and only past a slab's budget across the others."""
    grid = tiling.grid()
    options = [sorted({-(-g // 2**k) for k in range(g.bit_length() + 1)}, reverse=True) for g in grid]
    best = None
    for per in itertools.product(*options):
        blocks = math.prod(-(-g // m) for g, m in zip(grid, per))
        if blocks < min_blocks or block_bytes(tiling, per, **sizes) > budget:
            continue
        key = (tiles_run(tiling, per), blocks)
        if best is None or key < best[0]:
            best = (key, per)
    return best[1] if best else (1,) * tiling.ndim


def block_starts(tiling: Tiling, per_block: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(lo, hi) chunk indices of every block, lo <= index < hi per axis, column by column: columns
    (the blocks' indices after axis 0) in Morton order, each along axis 0 from its start."""
    grid = tiling.grid()
    starts = itertools.product(*(range(0, g, m) for g, m in zip(grid, per_block)))
    starts = sorted(starts, key=lambda lo: (morton_key(tuple(a // m for a, m in zip(lo[1:], per_block[1:]))), lo[0]))
    return [(lo, tuple(min(a + m, g) for a, m, g in zip(lo, per_block, grid))) for lo in starts]


def fixed_shapes(tiling: Tiling, per_block: Sequence[int]) -> tuple:
    """(region shape, tile count, output shape) that every block of `per_block` chunks fits:
    padding each block to them compiles `block_fn` once per volume, and the same shapes on a
    resumed run or in another process give the same bytes. Blocks are products of per-axis
    ranges, so the largest block is the per-axis largest."""
    region, count, out, carry = [], 1, [], carries(tiling, per_block)
    for axis, (g, m, c, s, b) in enumerate(zip(tiling.grid(), per_block, tiling.chunk, tiling.roi_shape, tiling.block)):
        tiles = [t for t in (tiles_of_block(tiling, axis, lo, min(lo + m, g), carry) for lo in range(0, g, m)) if t]
        region.append(max(t[-1] + b - t[0] for t in tiles))
        count *= max(len(t) for t in tiles)
        out.append(min(m * c, s))
    return tuple(region), count, tuple(out)


def block_inputs(source, geometry: BlockGeometry, fixed: tuple) -> tuple:
    """Reads the block's raw region from `source` (a Volume, channels first if it has them) in its
    own dtype (float32 if that is not a real type of at most 4 bytes) and zero-pads it and the tile
    arrays to `fixed`: the arguments of `block_fn` before the tile count."""
    channels = source.ndim > len(geometry.region)
    region = np.asarray(source.wait(source.store[((slice(None),) + geometry.region) if channels else geometry.region].read()))
    if region.dtype.kind not in "uif" or region.dtype.itemsize > 4:
        region = region.astype(np.float32)
    grow, n, _ = fixed
    region = np.pad(region, [(0, 0)] * (region.ndim - len(grow)) + [(0, g - r) for g, r in zip(grow, region.shape[-len(grow):])])
    arrays = [geometry.tiles, geometry.place, geometry.first, geometry.rest]
    return (region, *(np.pad(a, [(0, n - len(a))] + [(0, 0)] * (a.ndim - 1)) for a in arrays))


def crop(out: np.ndarray, geometry: BlockGeometry) -> np.ndarray:
    """A block's output (K, *fixed out shape) without the padding of `block_inputs`."""
    return out[(slice(None),) + tuple(slice(0, b.stop - b.start) for b in geometry.out_box)]


def predict_block(block_fn: Callable, source, geometry: BlockGeometry, fixed: tuple | None = None) -> np.ndarray:
    """One block on the default device: (K, *out_shape) on the host (no padding unless `fixed`)."""
    own = (tuple(r.stop - r.start for r in geometry.region), len(geometry.tiles),
           tuple(b.stop - b.start for b in geometry.out_box))
    fixed = fixed or own
    out = block_fn(*block_inputs(source, geometry, fixed), np.int32(len(geometry.tiles)), out_shape=fixed[2])
    return crop(np.asarray(out), geometry)


def predict_blocks(block_fn: Callable, source, target, tiling: Tiling, per_block: tuple[int, ...],
                   block_filter: Callable | None = None, devices: Sequence | None = None,
                   progress: bool = False) -> dict:
    """Predicts every not-yet-done chunk of `target` (K, *roi_shape) by blocks of `per_block`
    chunks (`block_starts` order; `block_filter(rank, blocks) -> bool` keeps this process's share).

    When the blocks `carries`, each block starts from the rim its column's previous block handed
    on; if that block is not run here (done before a resume, or another process's), it runs first
    for its rim only (its rim does not depend on what it was handed, so the bytes are the same).
    Columns go round-robin over the devices (default: the local devices), a column's blocks on
    one device, in groups of one column per device taken along axis 0 in step. A reader thread
    reads and pads up to two blocks ahead; the main thread fetches a block's output only once the
    next one is dispatched; a writer thread writes each chunk and marks it done (`DoneLog`) once
    its write has landed, at most two blocks behind. A block with some chunks done is recomputed
    and writes the others. Host memory: about 2 regions + (devices + 3) outputs, whatever the
    volume; device memory adds one rim per device.
    Returns {"blocks", "chunks", "chunks_per_block", "carried", "tiles_predicted", "tiles_total",
    "recompute_factor" (tiles_predicted / tiles_total, 1.0 when each tile ran once)}."""
    log, carry = DoneLog(target.path), carries(tiling, per_block)
    done, blocks = log.done(), block_starts(tiling, per_block)
    columns: dict = {}  # column -> [(lo, hi, chunks to write: [] = run for the rim only)]
    for rank, (lo, hi) in enumerate(blocks):
        todo = [c for c in itertools.product(*map(range, lo, hi)) if c not in done]
        if not todo or (block_filter is not None and not block_filter(rank, len(blocks))):
            continue
        column = columns.setdefault(lo[1:], [])
        previous = ((lo[0] - per_block[0], *lo[1:]), (lo[0], *hi[1:]))
        if carry and lo[0] > 0 and not (column and column[-1][:2] == previous):
            column.append((*previous, []))
        column.append((lo, hi, todo))
    devices = list(devices or jax.local_devices())
    work = _round_robin(list(columns.values()), devices)
    fixed = fixed_shapes(tiling, per_block)
    tiles = sum(math.prod(len(tiles_of_block(tiling, axis, a, b, carry)) for axis, (a, b) in enumerate(zip(lo, hi)))
                for lo, hi, _, _ in work)
    stats = {"blocks": sum(1 for w in work if w[2]), "chunks": sum(len(w[2]) for w in work),
             "chunks_per_block": list(per_block), "carried": carry, "tiles_predicted": tiles,
             "tiles_total": tiling.tile_count(), "recompute_factor": round(tiles / max(tiling.tile_count(), 1), 3)}
    zero_rims = {}
    if carry:
        shape = rim_shape(tiling, per_block, int(target.shape[0]))
        zero_rims = {d: jax.device_put(np.zeros(shape, np.float32), d) for d in devices}
    bar = tqdm(total=stats["chunks"], unit="chunk", disable=not progress, desc="predict")
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        read = lambda k: reader.submit(_read, source, tiling, work[k][:2], fixed, carry)  # noqa: E731
        reads = collections.deque(read(k) for k in range(min(2, len(work))))
        running, writes, rims = collections.deque(), collections.deque(), {}
        for k, (lo, hi, todo, device) in enumerate(work):
            geometry, inputs = reads.popleft().result()
            if k + 2 < len(work):
                reads.append(read(k + 2))
            inputs = (*jax.device_put(inputs, device), np.int32(len(geometry.tiles)))
            if carry:  # the rim of the column's previous block (just dispatched before it), or zeros
                out, rim = block_fn(*inputs, rims.pop(lo[1:], zero_rims[device]), out_shape=fixed[2])
                if hi[0] < tiling.grid()[0]:  # held for the column's next block only
                    rims[lo[1:]] = rim
            else:
                out = block_fn(*inputs, out_shape=fixed[2])
            if todo:
                running.append((geometry, todo, out))
            while len(running) > len(devices):  # the device works on the next block meanwhile
                _finish(running.popleft(), writer, writes, target, tiling, log, bar)
        while running:
            _finish(running.popleft(), writer, writes, target, tiling, log, bar)
        for write in writes:
            write.result()
    bar.close()
    return stats


def _round_robin(columns: list[list], devices: list) -> list[tuple]:
    """The blocks of `columns` as (lo, hi, todo, device): groups of len(devices) columns, one
    device each, interleaved along axis 0 so the devices work side by side."""
    work = []
    for g in range(0, len(columns), len(devices)):
        group = columns[g:g + len(devices)]
        for step in range(max(len(c) for c in group)):
            work += [(*c[step], devices[i]) for i, c in enumerate(group) if step < len(c)]
    return work


def _read(source, tiling: Tiling, lo_hi: tuple, fixed: tuple, carry: bool) -> tuple[BlockGeometry, tuple]:
    """On the reader thread: a block's geometry and its padded `block_fn` inputs."""
    geometry = block_geometry(tiling, *lo_hi, carry)
    return geometry, block_inputs(source, geometry, fixed)


def _finish(block, writer, writes: collections.deque, target, tiling: Tiling, log: DoneLog, bar) -> None:
    """Fetches a dispatched block's output (waiting for the device) and queues its writes, at most
    two blocks' writes in flight (bounds the outputs held)."""
    geometry, todo, out = block
    writes.append(writer.submit(_write_block, target, tiling, geometry, crop(np.asarray(out), geometry), todo, log, bar))
    while len(writes) > 2:
        writes.popleft().result()


def _write_block(target, tiling: Tiling, geometry: BlockGeometry, out: np.ndarray, todo, log: DoneLog, bar) -> None:
    """On the writer thread: starts every chunk's write, then marks each done once its write has landed."""
    writes = []
    for index in todo:
        box = tiling.chunk_box(index)
        part = out[(slice(None),) + tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, geometry.out_box))]
        writes.append((index, target.write_async(part, (0,) + tuple(b.start for b in box))))
    for index, write in writes:
        write.result()
        log.mark(index)
        bar.update(1)


def predict_volume(forward: Callable, source, target, tiling: Tiling, batch: int = 4, out_dtype=np.float32,
                   budget: int = DEFAULT_BLOCK_BYTES, block_filter: Callable | None = None, min_blocks: int = 1,
                   progress: bool = False) -> dict:
    """Predicts every not-yet-done chunk of `target` (K, *roi_shape) from `source` with `forward`
    ((B, *block, C) raw tiles -> (B, *block, K) float32 probabilities, see `forward_fn`,
    `tta_forward`, `ensemble_forward`), `batch` tiles per forward, stored as `out_dtype` (float32,
    float16, or uint8 = rint(255 p)): blocks of `chunks_per_block(tiling, budget, min_blocks)`,
    driven by `predict_blocks`. Returns its statistics."""
    sizes = dict(channels_in=source.shape[0] if source.ndim > tiling.ndim else 1,
                 in_itemsize=min(np.dtype(source.dtype).itemsize, 4), channels_out=int(target.shape[0]),
                 out_itemsize=np.dtype(out_dtype).itemsize)
    per_block = chunks_per_block(tiling, budget, min_blocks, **sizes)
    block_fn = make_block_fn(forward, tiling.block, batch, out_dtype)
    return predict_blocks(block_fn, source, target, tiling, per_block, block_filter, progress=progress)
