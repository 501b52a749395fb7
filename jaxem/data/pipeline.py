"""The input pipeline: grain reads crops (in worker processes) -> globally sharded jax.Array batches.

    loader = make_loader(config.data, mesh=mesh, ndim=2, seed=config.seed)
    batch = next(loader)   # {"image": (B, *crop, 1) f32, "labels": (B, *crop) i32, "mask": (B, *crop) f32}
    state = loader.get_state()   # {"batch": k, ...}: JSON, tiny; loader.set_state(state) resumes exactly

Batch k is a pure function of (seed, k): each of its rows draws from `row_rng(seed, k, row)`, so
the number of workers, restarts and processes never change what the model sees. Each process
reads only the rows of the global batch that live on its own devices (mesh axis 'data') and
assembles its part with `jax.make_array_from_process_local_data`. Batches are put on device
`prefetch` steps ahead (transfers are asynchronous).

split="val" gives a fixed list of crops tiling the validation volumes (at most `val_max_crops`,
evenly spaced): `loader.num_batches` batches make one pass (the last one padded with rows whose
mask is 0), after which the same batches repeat; `set_state({"batch": 0})` goes back to the start.
"""

from __future__ import annotations

import collections
import math

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxem.data import sampling
from jaxem.data.volume import slab_boxes
from jaxem.errors import UserError

AXIS = "data"
FOREVER = 1 << 40


def default_data_config() -> ml_collections.ConfigDict:
    """Every `config.data` field with its default (the lead's configs start from this)."""
    return ml_collections.ConfigDict({
        "train_images": (),
        "train_labels": (),
        "train_masks": (),  # optional, one per image: 1 = labelled, 0 = unlabelled
        "val_images": (),
        "val_labels": (),
        "val_masks": (),
        "crop_shape": (256, 256),  # len = model ndim; a 2D crop of a 3D volume is one z-section
        "batch_size": 8,  # global, divisible by the number of devices
        "num_workers": 0,  # grain worker processes; 0 = read in this process (threads)
        "prefetch": 2,  # batches read ahead per worker and put on device ahead
        "normalize": "meanstd",  # or "percentile"
        "percentiles": (1.0, 99.0),  # for normalize="percentile": mapped to -1 and +1
        "foreground_min_fraction": 0.0,  # redraw crops with a smaller labelled fraction
        "max_retries": 20,  # draws per crop before foreground_min_fraction is a UserError
        "renumber": True,  # renumber instance ids per crop (set False for semantic class maps)
        "val_max_crops": 64,
    })


def make_loader(data_cfg, *, mesh, ndim: int, seed: int, split: str = "train", labelled: bool = True) -> "BatchLoader":
    """A BatchLoader over `data_cfg.{split}_images/_labels/_masks`, sharded over mesh axis 'data'.

    `labelled=False` reads images only (self-supervised training): batches hold "image" and "mask".
    """
    if split not in ("train", "val"):
        raise UserError(f"loader split must be 'train' or 'val', got {split!r}.")
    crop_shape = tuple(int(c) for c in data_cfg.crop_shape)
    if len(crop_shape) != ndim:
        raise UserError(f"data.crop_shape {crop_shape} must have {ndim} values for a {ndim}D model.")
    images, labels = tuple(data_cfg[f"{split}_images"]), tuple(data_cfg[f"{split}_labels"]) if labelled else ()
    masks = tuple(data_cfg.get(f"{split}_masks", ()))
    shapes = sampling.volume_shapes(images, labels, masks, crop_shape, split, labelled)
    check_labels(labels)
    stats = [sampling.normalize_stats(sampling.open_volume(p), data_cfg.normalize, tuple(data_cfg.percentiles))
             for p in images]
    source = sampling.CropSource(
        images=images, labels=labels, masks=masks, crop_shape=crop_shape, stats=stats, shapes=shapes,
        foreground_min_fraction=float(data_cfg.foreground_min_fraction),
        max_retries=int(data_cfg.max_retries), renumber=bool(data_cfg.renumber))
    return BatchLoader(source, data_cfg, mesh=mesh, seed=seed, split=split)


def check_labels(paths) -> None:
    """UserError naming the first label volume whose values are not instance ids (integers >= 0).

    Float labels whose values are all whole numbers (e.g. ids saved as float64) are accepted and
    read as integer ids; any fractional, NaN or infinite value is refused, and so is a negative id.
    Unsigned integer (and boolean) volumes are not read; signed and float ones are read block by block.
    """
    for path in paths:
        volume = sampling.open_volume(path)
        if volume.dtype.kind not in "buif":
            raise UserError(f"{path} holds {volume.dtype.name} labels; label ids must be integers >= 0 (0 = background).")
        problem = label_problem(volume) if volume.dtype.kind in "if" else ""
        if problem:
            raise UserError(f"{path} holds {problem}; label ids must be integers >= 0 (0 = background).")


def label_problem(volume) -> str:
    """What is wrong with the values of a signed or float label volume ('' when nothing)."""
    fractional, lowest = 0, 0
    for box in slab_boxes(volume.shape):
        block = volume.read(box)
        if volume.dtype.kind == "f":
            fractional += int(np.count_nonzero(~np.isfinite(block) | (block != np.round(block))))
            block = block[np.isfinite(block)]
        lowest = min(lowest, block.min()) if block.size else lowest
    if fractional:
        return f"{fractional} {volume.dtype.name} label values that are not whole numbers (or are NaN/Inf)"
    if lowest < 0:
        return f"negative label ids (down to {lowest:g})"
    return ""


class TrainBatch:
    """Batch index k -> this process's rows of global batch k (numpy), drawn from row_rng(seed, k, row)."""

    def __init__(self, source, seed, rows):
        self.source, self.seed, self.rows = source, seed, rows

    def __call__(self, k):
        crops = [self.source.sample(sampling.row_rng(self.seed, k, r)) for r in self.rows]
        return _stack(crops)


class ValBatch:
    """Batch index k -> this process's rows of the fixed validation crops, repeating after one pass."""

    def __init__(self, source, boxes, batch_size, rows):
        self.source, self.boxes, self.batch_size, self.rows = source, boxes, batch_size, rows
        self.num_batches = math.ceil(len(boxes) / batch_size)

    def __call__(self, k):
        crops = []
        for r in self.rows:
            i = (k % self.num_batches) * self.batch_size + r
            crop = self.source.finish(self.source.read(*self.boxes[min(i, len(self.boxes) - 1)]))
            if i >= len(self.boxes):
                crop["mask"] = np.zeros_like(crop["mask"])
            crops.append(crop)
        return _stack(crops)


def _stack(crops):
    batch = {key: np.stack([c[key] for c in crops]) for key in crops[0]}
    batch["image"] = batch["image"][..., None]
    return batch


class BatchLoader:
    """Iterator of global batches; `get_state()`/`set_state()` resume at the exact batch."""

    def __init__(self, source, data_cfg, *, mesh, seed, split):
        self.source, self.seed, self.split = source, int(seed), split
        self.batch_size = int(data_cfg.batch_size)
        self.num_workers, self.prefetch = int(data_cfg.num_workers), max(1, int(data_cfg.prefetch))
        devices = mesh.shape[AXIS]
        if self.batch_size % devices:
            raise UserError(f"data.batch_size={self.batch_size} must be divisible by the {devices} devices of mesh axis '{AXIS}'.")
        self.sharding = NamedSharding(mesh, P(AXIS))
        self.rows = local_rows(self.sharding, self.batch_size)
        if split == "val":
            boxes = [(i, box) for i, shape in enumerate(source.shapes)
                     for box in sampling.grid_boxes(shape, source.crop_shape)]
            keep = np.unique(np.linspace(0, len(boxes) - 1, min(len(boxes), int(data_cfg.val_max_crops))).round().astype(int))
            self.boxes = [boxes[i] for i in keep]
            self.make_batch = ValBatch(source, self.boxes, self.batch_size, self.rows)
            self.num_batches = self.make_batch.num_batches
        else:
            self.num_batches = None
            self.make_batch = TrainBatch(source, self.seed, self.rows)
        self._iterator, self._queue = None, collections.deque()
        self._next = 0  # index of the next batch handed out by __next__
        self._start(0)

    def _start(self, k: int) -> None:
        """(Re)builds the grain pipeline so that its first element is batch k."""
        self.close()
        dataset = grain.MapDataset.range(k, k + FOREVER).map(self.make_batch)
        dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=self.prefetch, prefetch_buffer_size=self.prefetch))
        if self.num_workers > 0:
            _parse_absl_flags()
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.num_workers, per_worker_buffer_size=self.prefetch))
        self._iterator, self._next = iter(dataset), k

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while len(self._queue) < self.prefetch:
            self._fill()
        self._next += 1
        return self._queue.popleft()

    def _fill(self) -> None:
        try:
            local = next(self._iterator)
        except Exception as e:  # a UserError in a grain worker arrives wrapped; surface its sentence
            if isinstance(e, UserError) or "UserError" not in f"{e!r}{e.__cause__!r}":
                raise
            raise UserError(_user_message(e)) from None
        self._queue.append({key: self._to_device(value) for key, value in local.items()})

    def _to_device(self, local: np.ndarray) -> jax.Array:
        shape = (self.batch_size,) + local.shape[1:]
        return jax.make_array_from_process_local_data(self.sharding, local, shape)

    def get_state(self) -> dict:
        """JSON-serialisable position: the index of the next batch."""
        return {"batch": self._next, "seed": self.seed, "split": self.split}

    def set_state(self, state: dict) -> None:
        """Continues from `state` (from get_state): the next batch is exactly the one that followed."""
        if "batch" not in state:
            raise UserError(f"the checkpoint's data position {sorted(state)} does not fit this run's loader (was "
                            f"semi-supervised training turned on or off?); use a new --workdir.")
        if int(state.get("seed", self.seed)) != self.seed:
            raise UserError(f"loader state was saved with seed {state['seed']} but this run uses seed {self.seed}.")
        self._start(int(state["batch"]))

    def close(self) -> None:
        """Stops worker processes and drops prefetched batches."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None
        self._queue.clear()


def local_rows(sharding: NamedSharding, batch_size: int) -> list[int]:
    """Rows of the global batch that live on this process's devices (what this process reads)."""
    index_map = sharding.addressable_devices_indices_map((batch_size,))
    rows = set()
    for index in index_map.values():
        rows.update(range(*index[0].indices(batch_size)))
    return sorted(rows)


def _parse_absl_flags() -> None:
    """grain's worker processes read absl flags, which programs without absl.app never parse."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _user_message(error: BaseException) -> str:
    text = f"{error}"
    for line in text.splitlines():
        if "UserError:" in line:
            return line.split("UserError:", 1)[1].strip()
    return text.splitlines()[0] if text else repr(error)
