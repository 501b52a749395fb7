"""One segmentation setting and the one function that applies it: `segment_volume`.

`jaxem segment`, `jaxem tune`, the demo and the held-out protocols (`jaxem.protocols`) all turn
predictions into instances through `segment_volume`, so the method dispatch lives here only.
A setting's JSON form is the dict `jaxem tune` writes as "best" and `jaxem segment --params`
reads: {"method": ..., and any of "threshold", "seeds", "h", "merge", "min_size", "strides"}.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from jaxem.errors import UserError
from jaxem.segment import instances

KINDS = ("boundary", "foreground", "affinities")  # what a prediction map holds
METHODS = instances.METHODS + tuple(m for m in instances.AFFINITY_METHODS if m not in instances.METHODS)


@dataclass(frozen=True)
class SegmentSetting:
    """How predictions become instances (`jaxem.segment.instances` for each method's meaning).

    method: 'cc', 'watershed', 'agglomerate' (any kind) or 'mws' (affinities only).
    threshold: probability cutting interior from boundary. seeds: 'distance' (h-maxima of the
    distance transform) or 'threshold'. h: h-maxima depth, nm when a voxel size is given, else
    voxels. merge: mean boundary value below which 'agglomerate' joins neighbours, in [0, 1].
    min_size: objects below this many voxels are removed (flooded, on affinities). strides: 'mws'
    subsampling of the long-range edges, one per spatial axis, or None.
    """

    method: str = "watershed"
    threshold: float = 0.5
    seeds: str = "distance"
    h: float = 1.0
    merge: float = 0.5
    min_size: int = 0
    strides: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"segmentation method {self.method!r} is not one of {', '.join(METHODS)}.")
        if self.seeds not in instances.SEEDS:
            raise UserError(f"watershed seeds {self.seeds!r} is not one of {', '.join(instances.SEEDS)}.")
        if self.strides is not None:
            object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))

    @classmethod
    def from_dict(cls, setting: dict, where: str = "segmentation setting") -> "SegmentSetting":
        """The setting of a JSON-form dict (module docstring); UserError naming `where` when it
        is not a dict with a 'method' or has unknown keys. Absent keys take the defaults."""
        if not isinstance(setting, dict) or "method" not in setting:
            raise UserError(f"{where} must be a JSON object with a 'method' (and any of {', '.join(SETTING_KEYS[1:])}), "
                            f"got {setting!r}.")
        unknown = sorted(set(setting) - set(SETTING_KEYS))
        if unknown:
            raise UserError(f"{where} has unknown keys {unknown}; expected any of {', '.join(SETTING_KEYS)}.")
        return cls(**setting)

    def to_dict(self) -> dict:
        """The JSON form of every field (strides left out when None); `from_dict` inverts it."""
        out = dataclasses.asdict(self)
        if self.strides is None:
            del out["strides"]
        else:
            out["strides"] = list(self.strides)
        return out


SETTING_KEYS = tuple(f.name for f in dataclasses.fields(SegmentSetting))


def check_kind(kind: str) -> None:
    """UserError unless `kind` is one of KINDS."""
    if kind not in KINDS:
        raise UserError(f"prediction kind {kind!r} is not one of {', '.join(KINDS)}.")


def segment_volume(prediction: np.ndarray, setting: SegmentSetting, kind: str = "boundary", per_slice: bool = False,
                   voxel_size: Sequence[float] | None = None, offsets=None) -> np.ndarray:
    """Instances of one prediction with one `setting` -> uint64 labels (*spatial), 0 = background,
    ids 1..N.

    prediction: a boundary map (high on membranes) or a foreground map (high inside objects),
    (y, x) or (z, y, x) per `kind`; or affinities (K, *spatial) with their K `offsets` (kind
    'affinities'). `per_slice` segments each z-slice of a boundary or foreground volume alone,
    with ids unique over the volume. `voxel_size` (nm, z-y-x) makes the distance transform, and
    so `setting.h`, metric.
    """
    return instances.finish(setting_fragments(prediction, setting, kind, per_slice, voxel_size, offsets),
                            setting.method, setting.merge, setting.min_size)


def setting_fragments(prediction: np.ndarray, setting: SegmentSetting, kind: str = "boundary", per_slice: bool = False,
                      voxel_size: Sequence[float] | None = None, offsets=None,
                      flood: bool | None = None) -> instances.Fragments:
    """The first stage of `segment_volume` (same arguments): the fragments that every setting with
    the same `fragment_key` shares; `instances.finish(fragments, method, merge, min_size)` is the
    rest. `flood` (affinities): keep the boundary map that flooding small objects needs (default:
    when `setting.min_size` > 0)."""
    check_kind(kind)
    s = setting
    if kind == "affinities":
        if per_slice:
            raise UserError("per-slice segmentation takes boundary or foreground maps, not affinities.")
        flood = s.min_size > 0 if flood is None else flood
        return instances.affinity_fragments(prediction, offsets, s.method, s.threshold, s.h, voxel_size, s.strides, flood)
    return instances.map_fragments(prediction, kind, s.method, s.threshold, per_slice, s.seeds, s.h, voxel_size)


def fragment_key(setting: SegmentSetting) -> SegmentSetting:
    """Settings with equal keys have the same fragments (`setting_fragments`): they differ only in
    `merge` and `min_size`, and 'agglomerate' merges the fragments of 'watershed'."""
    method = "watershed" if setting.method == "agglomerate" else setting.method
    return dataclasses.replace(setting, method=method, merge=0.5, min_size=0)
