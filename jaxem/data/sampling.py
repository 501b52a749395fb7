"""Host-side crop sampling: random boxes over volumes, read through tensorstore, as numpy.

No jax here, so the grain worker processes that run it start quickly. Everything is a pure
function of (seed, batch index, row): batch k of a run is the same however many workers, restarts
or processes produced it.

- Random boxes pick a volume with probability proportional to its size (voxels), then a uniform
  position. A 2D crop from a 3D volume is one z-section.
- Foreground-aware sampling redraws (up to `max_retries` times) until the labelled fraction
  (label > 0 and mask > 0) reaches `foreground_min_fraction`; when no draw does, a UserError.
- Masks: optional volumes with 1 = labelled, 0 = unlabelled (default: everything labelled).
- Images are normalized per volume with statistics computed once on a subsample (`normalize_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import fastremap
import numpy as np

from jaxem.data.volume import Volume, open_volume
from jaxem.errors import UserError

STATS_VOXELS = 1 << 22  # voxels read to estimate normalization statistics
_STATS_CACHE: dict[tuple, tuple[float, float]] = {}


def normalize_stats(volume: Volume, mode: str = "meanstd", percentiles=(1.0, 99.0), seed: int = 0):
    """(a, b) with normalized = (x - a) / b, from a deterministic subsample of `volume`; cached per path.

    "meanstd": a = mean, b = std (output ~ zero mean, unit variance).
    "percentile": the percentiles map to -1 and +1.
    """
    key = (str(volume.path), mode, tuple(percentiles), seed)
    if key not in _STATS_CACHE:
        sample = subsample(volume, seed).astype(np.float64)
        if mode == "meanstd":
            a, b = sample.mean(), sample.std()
        elif mode == "percentile":
            lo, hi = np.percentile(sample, percentiles)
            a, b = (lo + hi) / 2, (hi - lo) / 2
        else:
            raise UserError(f"data.normalize must be 'meanstd' or 'percentile', got {mode!r}.")
        _STATS_CACHE[key] = (float(a), float(max(b, 1e-6)))
    return _STATS_CACHE[key]


def normalize(array: np.ndarray, stats: tuple[float, float]) -> np.ndarray:
    """Applies `normalize_stats` output: (array - a) / b as float32 (any shape)."""
    a, b = stats
    return ((np.asarray(array, np.float32) - np.float32(a)) / np.float32(b)).astype(np.float32)


def subsample(volume: Volume, seed: int, voxels: int = STATS_VOXELS) -> np.ndarray:
    """The whole volume when small, else random boxes totalling about `voxels` voxels (flattened)."""
    shape = volume.shape
    if np.prod(shape) <= voxels:
        return volume.read().ravel()
    rng = np.random.default_rng(seed)
    side = tuple(min(s, 64 if len(shape) == 3 else 512) for s in shape)
    count = max(1, voxels // int(np.prod(side)))
    futures = [volume.store[_random_box(rng, shape, side)].read() for _ in range(count)]
    return np.concatenate([volume.wait(f).ravel() for f in futures])


def _random_box(rng, shape, crop) -> tuple[slice, ...]:
    start = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, crop)]
    return tuple(slice(o, o + c) for o, c in zip(start, crop))


@dataclass
class CropSource:
    """Paths and settings for crops of one split; picklable (volumes open lazily in each process)."""

    images: Sequence[str]
    labels: Sequence[str]
    masks: Sequence[str]
    crop_shape: tuple[int, ...]
    stats: Sequence[tuple[float, float]]
    shapes: Sequence[tuple[int, ...]]
    foreground_min_fraction: float = 0.0
    max_retries: int = 20
    renumber: bool = True
    _open: dict = field(default_factory=dict, repr=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def volume(self, kind: str, index: int) -> Volume:
        key = (kind, index)
        if key not in self._open:
            self._open[key] = open_volume(getattr(self, kind)[index])
        return self._open[key]

    @property
    def weights(self) -> np.ndarray:
        sizes = np.array([float(np.prod(s)) for s in self.shapes])
        return sizes / sizes.sum()

    def random_box(self, rng: np.random.Generator) -> tuple[int, tuple[slice, ...]]:
        """A volume index (size-weighted) and a crop box in it (full-rank; 2D crops have z size 1)."""
        index = int(rng.choice(len(self.shapes), p=self.weights))
        shape = self.shapes[index]
        crop = (1,) * (len(shape) - len(self.crop_shape)) + tuple(self.crop_shape)
        return index, _random_box(rng, shape, crop)

    def read(self, index: int, box: tuple[slice, ...]) -> dict[str, np.ndarray]:
        """One crop: image (*crop) float32 normalized, mask (*crop) float32 (1 = labelled) and, when
        the source has labels, labels (*crop) int32."""
        kinds = ["images"] + (["labels"] if self.labels else []) + (["masks"] if self.masks else [])
        reads = {kind: self.volume(kind, index).store[box].read() for kind in kinds}  # concurrent reads
        squeeze = tuple(range(len(box) - len(self.crop_shape)))
        arrays = {kind: np.squeeze(future.result(), squeeze) for kind, future in reads.items()}
        crop = {"image": normalize(arrays["images"], self.stats[index])}
        if self.labels:
            crop["labels"] = arrays["labels"]
        crop["mask"] = arrays["masks"].astype(np.float32) if self.masks else np.ones(crop["image"].shape, np.float32)
        return crop

    def sample(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """A random crop meeting `foreground_min_fraction` (UserError after `max_retries` failed draws)."""
        best = 0.0
        for _ in range(max(1, self.max_retries)):
            crop = self.read(*self.random_box(rng))
            if self.foreground_min_fraction <= 0 or not self.labels:
                return self.finish(crop)
            fraction = float(np.mean((crop["labels"] > 0) & (crop["mask"] > 0)))
            if fraction >= self.foreground_min_fraction:
                return self.finish(crop)
            best = max(best, fraction)
        raise UserError(
            f"data.foreground_min_fraction={self.foreground_min_fraction} was not reached in {self.max_retries} "
            f"random crops of {tuple(self.crop_shape)} from {', '.join(self.labels)} (best {best:.3f}); "
            f"lower it or raise data.max_retries.")

    def finish(self, crop: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "labels" not in crop:
            return crop
        labels = crop["labels"]
        if self.renumber:
            labels, _ = fastremap.renumber(np.ascontiguousarray(labels), preserve_zero=True, in_place=False)
        crop["labels"] = labels.astype(np.int32)
        return crop


def row_rng(seed: int, batch_index: int, row: int) -> np.random.Generator:
    """The random generator of one row of one global batch: a pure function of its arguments."""
    return np.random.default_rng([int(seed), int(batch_index), int(row)])


def grid_boxes(shape: Sequence[int], crop_shape: Sequence[int]) -> list[tuple[slice, ...]]:
    """Deterministic crops tiling `shape` (last tile flush with the far edge); 2D crops per z-section."""
    crop = (1,) * (len(shape) - len(crop_shape)) + tuple(crop_shape)
    starts = [sorted({*range(0, s - c + 1, c), s - c}) for s, c in zip(shape, crop)]
    grids = np.meshgrid(*starts, indexing="ij")
    return [tuple(slice(int(o), int(o) + c) for o, c in zip(origin, crop))
            for origin in zip(*(g.ravel() for g in grids))]


def volume_shapes(images: Sequence[str], labels: Sequence[str], masks: Sequence[str],
                  crop_shape: Sequence[int], split: str, labelled: bool = True) -> list[tuple[int, ...]]:
    """Opens and checks the volumes of one split; returns their shapes (UserError on any mismatch).

    With `labelled=False` (self-supervised training) `labels` are ignored.
    """
    if len(images) == 0:
        raise UserError(f"data.{split}_images is empty: name at least one image volume.")
    if labelled and len(images) != len(labels):
        raise UserError(f"data.{split}_images has {len(images)} volumes but data.{split}_labels has {len(labels)}.")
    if masks and len(masks) != len(images):
        raise UserError(f"data.{split}_masks has {len(masks)} volumes, expected one per image ({len(images)}).")
    shapes = []
    for i, image_path in enumerate(images):
        shape = open_volume(image_path).shape
        others = ([labels[i]] if labelled else []) + ([masks[i]] if masks else [])
        for other in others:
            if open_volume(other).shape != shape:
                raise UserError(f"{other} has shape {open_volume(other).shape} but its image {image_path} has {shape}.")
        if len(shape) < len(crop_shape) or any(c > s for c, s in zip(crop_shape[::-1], shape[::-1])):
            raise UserError(f"data.crop_shape {tuple(crop_shape)} does not fit in volume {image_path} of shape {shape}.")
        shapes.append(shape)
    return shapes
