"""The geometry of blockwise prediction: tiles with a halo, output chunks, blending weights.

Per axis: a region of interest [r0, r1) of a volume of size n is covered by tile cores of stride
S = block - 2 * halo starting at r0. Each tile is its core grown by `halo` on both sides and
shifted (clamped) to lie inside the volume, so a tile edge never lies outside the volume and
'same' padding at volume edges matches a whole-volume forward pass. Output chunks are multiples
of S aligned to the ROI origin; each chunk is blended from the tiles whose weight touches it.

Blending ('blend'):
  center   weight 1 on the tile's valid region (its core [halo, block - halo), extended to the
           tile edge where that edge is the volume edge), 0 elsewhere: exact for a network whose
           receptive radius is <= halo.
  gaussian Gaussian over the whole tile (sigma = block / 8), floored at 1e-3: smooth seams for
           deep nets, the MONAI default.
  linear   a ramp over the 2 * halo overlap, 1 in the core.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from jaxem.errors import UserError

BLENDS = ("center", "gaussian", "linear")


@dataclass(frozen=True)
class Tiling:
    """Tiles and chunks for a (z, y, x) or (y, x) volume; all shapes in voxels."""

    shape: tuple[int, ...]  # the whole volume
    roi: tuple[tuple[int, int], ...]  # (start, stop) per axis, absolute
    block: tuple[int, ...]  # model input tile
    halo: tuple[int, ...]
    chunk: tuple[int, ...]  # output chunk (a multiple of the stride)
    blend: str = "gaussian"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def stride(self) -> tuple[int, ...]:
        return tuple(b - 2 * h for b, h in zip(self.block, self.halo))

    @property
    def roi_shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.roi)

    def grid(self) -> tuple[int, ...]:
        """Number of output chunks per axis."""
        return tuple(-(-s // c) for s, c in zip(self.roi_shape, self.chunk))

    def chunks(self) -> list[tuple[int, ...]]:
        """All chunk indices in raster order."""
        return list(itertools.product(*(range(g) for g in self.grid())))

    def chunk_order(self) -> list[tuple[int, ...]]:
        """All chunk indices in Morton (Z-curve) order: neighbours in space are near in time at
        every scale, so blocks of neighbouring chunks stay compact."""
        return sorted(self.chunks(), key=morton_key)

    def chunks_for_tile(self, start) -> list[tuple[int, ...]]:
        """Chunk indices whose box the weight of the tile at `start` (absolute) touches."""
        per_axis = []
        for axis, t in enumerate(start):
            lo, hi = (s - self.roi[axis][0] for s in self._support(axis, t))
            lo, hi = max(lo, 0), min(hi, self.roi_shape[axis])
            c = self.chunk[axis]
            per_axis.append(range(lo // c, (hi - 1) // c + 1) if hi > lo else range(0))
        return list(itertools.product(*per_axis))

    def tile_count(self) -> int:
        """Number of distinct tiles covering the ROI."""
        return int(np.prod([len(self.tile_starts(axis)) for axis in range(self.ndim)]))

    def halo_factor(self) -> float:
        """Voxels through the model per output voxel when every tile is predicted once:
        tile_count * prod(block) / prod(roi_shape), about prod(block / stride) for large ROIs."""
        return self.tile_count() * float(np.prod(self.block)) / float(np.prod(self.roi_shape))

    def chunk_box(self, index) -> tuple[slice, ...]:
        """The chunk's box relative to the ROI (i.e. in output coordinates)."""
        return tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, self.chunk, self.roi_shape))

    def tile_starts(self, axis: int) -> tuple[int, ...]:
        """Absolute start of each tile along `axis` (deduplicated, increasing)."""
        return _tile_starts(self.shape[axis], *self.roi[axis], self.block[axis], self.halo[axis])

    def tiles_for_chunk(self, index) -> list[tuple[int, ...]]:
        """Tile starts (absolute, one tuple per tile) whose weight touches chunk `index`."""
        return list(itertools.product(*(self.tiles_along(axis, i) for axis, i in enumerate(index))))

    def tiles_along(self, axis: int, i: int) -> tuple[int, ...]:
        """The tile starts along `axis` whose support touches the chunk with index `i` there."""
        return _tiles_along(self.blend, self.shape[axis], self.roi[axis], self.block[axis], self.halo[axis],
                            self.chunk[axis], i)

    def tiles_touching(self, axis: int, lo: int, hi: int) -> list[int]:
        """The tile starts along `axis` (increasing) whose support touches a chunk lo <= i < hi there."""
        return sorted({t for i in range(lo, hi) for t in self.tiles_along(axis, i)})

    def tile_box(self, start) -> tuple[slice, ...]:
        """The absolute input box of a tile (may be smaller than `block` if the volume is)."""
        return tuple(slice(t, min(t + b, n)) for t, b, n in zip(start, self.block, self.shape))

    def weight(self, start) -> np.ndarray:
        """Blending weight of the tile at `start`, float32 of shape `block` (read-only, shared)."""
        edges = tuple((t == 0, t + b >= n) for t, b, n in zip(start, self.block, self.shape))
        return _weight(self.blend, self.block, self.halo, edges)

    def share(self, start) -> np.ndarray:
        """The tile's share of each voxel of the blended output: its weight divided by the sum of
        the weights of every tile at that voxel, so the shares at a voxel add up to 1. float32 of
        shape `block` (read-only, shared). Weights are outer products of per-axis profiles and the
        tile starts a product of per-axis lists, so the sum, and the share, factor by axis too."""
        first, rest = self.share_factors(start)
        return first.reshape(-1, *(1,) * rest.ndim) * rest

    def share_factors(self, start) -> tuple[np.ndarray, np.ndarray]:
        """`share(start)` as (profile along axis 0 (block[0],), share over the other axes
        (block[1:])), both float32 read-only and cached: multiplying by the two costs less than
        building (or caching) every distinct full-size share."""
        keys = tuple(_axis_share(self.blend, self.shape[a], self.roi[a], self.block[a], self.halo[a], t)
                     for a, t in enumerate(start))
        return _outer(keys[:1]), _outer(keys[1:])

    def _support(self, axis: int, t: int) -> tuple[int, int]:
        b, h, n = self.block[axis], self.halo[axis], self.shape[axis]
        lo, hi = _support(self.blend, b, h, t == 0, t + b >= n)
        return t + lo, t + hi


@lru_cache(maxsize=4096)
def _tile_starts(n: int, r0: int, r1: int, block: int, halo: int) -> tuple[int, ...]:
    stride = block - 2 * halo
    starts = []
    for core in range(r0, r1, stride):
        t = int(np.clip(core - halo, 0, max(n - block, 0)))
        if not starts or starts[-1] != t:
            starts.append(t)
    return tuple(starts)


def morton_key(index) -> int:
    """Interleaves the bits of a chunk index (first axis most significant within each bit)."""
    key, n = 0, len(index)
    for bit in range(max(int(v).bit_length() for v in index) if index else 0):
        for a, v in enumerate(index):
            key |= ((int(v) >> bit) & 1) << (bit * n + n - 1 - a)
    return key


@lru_cache(maxsize=4096)
def _support(blend: str, block: int, halo: int, at_low_edge: bool, at_high_edge: bool) -> tuple[int, int]:
    nz = np.nonzero(_profile(blend, block, halo, at_low_edge, at_high_edge))[0]
    return int(nz[0]), int(nz[-1]) + 1


@lru_cache(maxsize=4096)
def _profile(blend: str, block: int, halo: int, at_low_edge: bool, at_high_edge: bool) -> np.ndarray:
    x = np.arange(block, dtype=np.float64)
    if blend == "center":
        p = ((x >= halo) & (x < block - halo)).astype(np.float64)
        if at_low_edge:
            p[: block // 2] = 1.0
        if at_high_edge:
            p[block // 2:] = 1.0
    elif blend == "gaussian":
        sigma = block / 8.0
        p = np.maximum(np.exp(-((x - (block - 1) / 2) ** 2) / (2 * sigma**2)), 1e-3)
    elif blend == "linear":
        ramp = 2 * max(halo, 1)
        p = np.clip(np.minimum(x + 0.5, block - x - 0.5) / ramp, 1e-3, 1.0)
    else:
        raise UserError(f"predict.blend {blend!r} is not one of {', '.join(BLENDS)}.")
    p.setflags(write=False)
    return p


@lru_cache(maxsize=256)
def _weight(blend: str, block: tuple, halo: tuple, edges: tuple) -> np.ndarray:
    """The outer product of the per-axis profiles; only edge tiles differ, so few are distinct."""
    w = np.ones((), np.float64)
    for b, h, (low, high) in zip(block, halo, edges):
        w = np.multiply.outer(w, _profile(blend, b, h, low, high))
    w = w.astype(np.float32)
    w.setflags(write=False)
    return w


@lru_cache(maxsize=65536)
def _tiles_along(blend: str, n: int, roi: tuple[int, int], block: int, halo: int, chunk: int, i: int) -> tuple[int, ...]:
    lo, hi = roi[0] + i * chunk, min(roi[0] + (i + 1) * chunk, roi[1])
    found = []
    for t in _tile_starts(n, *roi, block, halo):
        s0, s1 = _support(blend, block, halo, t == 0, t + block >= n)
        if t + s0 < hi and t + s1 > lo:
            found.append(t)
    return tuple(found)


_SHARES: dict[bytes, np.ndarray] = {}  # distinct per-axis share profiles, by their bytes


@lru_cache(maxsize=65536)
def _axis_share(blend: str, n: int, roi: tuple[int, int], block: int, halo: int, t: int) -> bytes:
    """The share profile along one axis of the tile starting at t: its profile over the sum of
    every tile's profile there. Returned as a key into _SHARES (interior tiles share one)."""
    total = np.zeros(n, np.float64)
    for start in _tile_starts(n, *roi, block, halo):
        if start < t + block and start + block > t:
            total[start:start + block] += _profile(blend, block, halo, start == 0, start + block >= n)
    share = _profile(blend, block, halo, t == 0, t + block >= n) / np.maximum(total[t:t + block], 1e-12)
    key = share.tobytes()
    _SHARES.setdefault(key, share)
    return key


@lru_cache(maxsize=256)
def _outer(keys: tuple[bytes, ...]) -> np.ndarray:
    """The outer product of per-axis share profiles as float32 (read-only): few distinct, cached."""
    w = np.ones((), np.float64)
    for key in keys:
        w = np.multiply.outer(w, _SHARES[key])
    w = w.astype(np.float32)
    w.setflags(write=False)
    return w


def make_tiling(shape, roi, block, halo, chunk=None, blend="gaussian") -> Tiling:
    """Validates and builds a Tiling; `chunk` defaults to the stride times about 64 / stride."""
    shape, block, halo = tuple(map(int, shape)), tuple(map(int, block)), tuple(map(int, halo))
    roi = tuple((0, n) for n in shape) if roi is None else tuple((int(a), int(b)) for a, b in roi)
    if not (len(block) == len(halo) == len(shape) == len(roi)):
        raise UserError(f"predict.block_shape {block} and predict.halo {halo} must have one value per volume axis {shape}.")
    for axis, ((a, b), n) in enumerate(zip(roi, shape)):
        if not 0 <= a < b <= n:
            raise UserError(f"ROI {a}:{b} on axis {axis} lies outside the volume of shape {shape}.")
    block = tuple(min(b, n) for b, n in zip(block, shape))
    # An axis one tile spans whole has no neighbouring tiles to overlap: a halo too large for it
    # (a short stack, or the lifted z halo of `--planes`) is dropped rather than refused.
    halo = tuple(0 if b == n and b <= 2 * h else h for b, h, n in zip(block, halo, shape))
    stride = tuple(b - 2 * h for b, h in zip(block, halo))
    if min(stride) <= 0:
        raise UserError(f"predict.halo {halo} must be less than half of predict.block_shape {block} on every axis.")
    if chunk is None:
        chunk = tuple(s * max(1, round(64 / s)) for s in stride)
    chunk = tuple(int(c) for c in chunk)
    if len(chunk) != len(shape):
        raise UserError(f"predict.chunk_shape {chunk} must have one value per volume axis {shape}.")
    if any(c % s for c, s in zip(chunk, stride)):
        raise UserError(f"output chunk {chunk} must be a multiple of the tile stride {stride} (block - 2 * halo).")
    return Tiling(shape, roi, block, halo, chunk, blend)
