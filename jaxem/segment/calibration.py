"""Quantile matching: carry a tuned segmentation setting over to a map calibrated otherwise.

A network fitted on a few labelled sections is more confident on them than on new data: on ISBI
the frozen-encoder recipe marks 32 % of its training slices' pixels as membrane (p > 0.5) and
23-25 % of held-out slices', and a threshold or merge level tuned on the first map means something
else on the second (docs/ssl.md, "Matching the held-out map to the tuning map"). `jaxem tune`
stores the quantiles of the map it tuned on; `jaxem segment --params tuned.json --match-quantiles`
maps the new prediction through v -> Q_tuned(F_new(v)) (F: the new map's distribution function, Q:
the tuned map's quantile function) before segmenting it, so each setting cuts the same share of
voxels as it did where it was chosen. The map is monotone per channel: the ranking of voxels, and so
what the watershed floods first, is unchanged.

Quantiles come from a histogram of HISTOGRAM_BINS bins over [0, 1] (values outside are clipped),
filled block by block, so a volume larger than memory takes one pass and flat memory; quantile
levels are LEVELS evenly spaced in [0, 1], interpolated linearly within a bin.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from jaxem.data.volume import as_probabilities, finite_probabilities, slab_boxes
from jaxem.errors import UserError

LEVELS = 1001  # quantile levels 0, 0.001, ..., 1
HISTOGRAM_BINS = 65536  # bins of [0, 1]: a quantile is off by at most 1 / 65536
BLOCK_VOXELS = 1 << 24


def histogram(values: np.ndarray) -> np.ndarray:
    """Counts (HISTOGRAM_BINS,) int64 of `values` (probabilities, any shape) in equal bins of [0, 1]."""
    index = np.clip(np.asarray(values, np.float32) * HISTOGRAM_BINS, 0, HISTOGRAM_BINS - 1).astype(np.int64)
    return np.bincount(index.ravel(), minlength=HISTOGRAM_BINS)


def histogram_quantiles(counts: np.ndarray) -> np.ndarray:
    """The LEVELS quantiles (LEVELS,) float64 of a distribution given by its histogram `counts`
    (HISTOGRAM_BINS,): the bin where the level's share of the voxels is reached, and the point
    of that bin as far along as the share is within it (level 0: the lowest occupied bin's lower
    edge; level 1: the highest one's upper edge)."""
    cumulative = np.cumsum(counts, dtype=np.float64)
    if cumulative[-1] == 0:
        raise UserError("quantiles of an empty map: it holds no voxel.")
    wanted = np.maximum(np.linspace(0.0, 1.0, LEVELS) * cumulative[-1], 0.5)  # level 0: the first voxel
    bins = np.searchsorted(cumulative, wanted)  # first bin whose cumulative count reaches it
    before = cumulative[bins] - counts[bins]
    within = np.clip((wanted - before) / counts[bins], 0.0, 1.0)
    within[0] = 0.0
    return (bins + within) / HISTOGRAM_BINS


def map_quantiles(prediction: np.ndarray, channel_axis: bool = False) -> np.ndarray:
    """Quantiles (C, LEVELS) of an in-memory map: (C, *spatial) per channel with `channel_axis`,
    else (*spatial) as one channel (C = 1)."""
    channels = prediction if channel_axis else prediction[None]
    return np.stack([histogram_quantiles(histogram(c)) for c in channels])


def volume_quantiles(source, channel=None, block_voxels: int = BLOCK_VOXELS, progress: bool = True) -> np.ndarray:
    """Quantiles (C, LEVELS) of a prediction volume read `block_voxels` at a time (flat memory),
    as probabilities (uint8 as v / 255, NaN as 0, +Inf as 1): of each channel of a (c, *spatial)
    volume with `channel` 'all', of channel `channel` (default 0) of one, or of a (*spatial) one."""
    if source.ndim == 0 or (channel is not None and channel != "all" and not 0 <= channel < source.shape[0]):
        raise UserError(f"channel {channel} is outside the volume's shape {tuple(source.shape)}.")
    if channel == "all":
        picks = [(c,) for c in range(source.shape[0])]
    else:
        picks = [(channel or 0,)] if channel is not None else [()]
    spatial = source.shape[len(picks[0]):]
    boxes = list(slab_boxes(spatial, block_voxels))
    counts = np.zeros((len(picks), HISTOGRAM_BINS), np.int64)
    with tqdm(total=len(picks) * len(boxes), desc="quantiles", unit="block", disable=not progress) as bar:
        for row, pick in enumerate(picks):
            for box in boxes:
                counts[row] += histogram(finite_probabilities(as_probabilities(source.read(pick + box))))
                bar.update()
    return np.stack([histogram_quantiles(c) for c in counts])


def match_quantiles(values: np.ndarray, source: np.ndarray, target: np.ndarray, channel_axis: bool = False) -> np.ndarray:
    """`values` through v -> Q_target(F_source(v)) per channel: (C, *spatial) with `channel_axis`,
    else (*spatial) for C = 1; linear interpolation from its map's quantiles `source` (C, LEVELS)
    to the tuned map's `target` (C, LEVELS); a quantile of `source` that repeats (a value many
    voxels hold) takes the mean of its target quantiles. Returns float32 of `values`' shape,
    monotone per channel."""
    channels = values if channel_axis else values[None]
    if not len(channels) == len(source) == len(target):
        raise UserError(f"quantiles of {len(source)} and {len(target)} channels for a map of {len(channels)}.")
    out = np.empty(channels.shape, np.float32)
    for c, (src, tgt) in enumerate(zip(source, target)):
        knots, inverse = np.unique(src, return_inverse=True)
        means = np.bincount(inverse.ravel(), weights=tgt) / np.bincount(inverse.ravel())
        out[c] = np.interp(channels[c], knots, means)
    return out if channel_axis else out[0]
