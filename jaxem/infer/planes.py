"""2D models on 3D volumes: orthoplane consensus (`jaxem predict --planes xy,xz,yz`).

A 2D model predicts a (z, y, x) volume section by section; on a near-isotropic volume it can also
read the volume along the other two axes, as empanada's MitoNet does: 'xy' sections are images over
(y, x) stacked in z, 'xz' sections images over (z, x) stacked in y, 'yz' sections images over
(z, y) stacked in x. `planes_forward` runs the 2D forward over the sections of every requested
orientation of a 3D tile and combines the three predictions voxel by voxel (mean, median or
majority vote, `ensemble.combine`), inside the one jitted window of `device.make_block_fn`: blocks,
blending, resume, several processes and output dtypes work as for any blockwise prediction.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from jaxem.errors import UserError
from jaxem.infer.device import tta_forward
from jaxem.infer.ensemble import REDUCTIONS, combine

# plane -> the tile axes (z=0, y=1, x=2) in the order (stack axis, image rows, image columns)
PLANES = {"xy": (0, 1, 2), "xz": (1, 0, 2), "yz": (2, 0, 1)}
DEFAULT_PLANES = ("xy",)
MAX_ANISOTROPY = 2.0  # largest / smallest voxel size above which xz and yz sections are stretched


def parse_planes(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """'xy,xz,yz' (or a sequence of names) -> ('xy', 'xz', 'yz'); None or '' = ('xy',). UserError
    for a name not in PLANES or one given twice."""
    names = DEFAULT_PLANES if not text else tuple(p.strip() for p in (text.split(",") if isinstance(text, str) else text))
    unknown = [p for p in names if p not in PLANES]
    if unknown or len(set(names)) != len(names):
        raise UserError(f"--planes {','.join(names)!r} must be distinct names among {', '.join(PLANES)}, "
                        "separated by commas (e.g. xy,xz,yz).")
    return names


def is_orthoplane(planes: Sequence[str]) -> bool:
    """True unless `planes` is today's section-by-section prediction ('xy' alone)."""
    return tuple(planes) != DEFAULT_PLANES


def check_planes(planes: Sequence[str], reduce: str, model_ndim: int, volume_ndim: int, target_kind: str) -> None:
    """UserError unless `planes` can run: a 2D model on a 3D volume, a reduction of REDUCTIONS
    (median and majority need several planes), and a target whose channels do not name in-plane
    directions (affinities of an xz section would be (dz, dx) offsets, not the model's (dy, dx))."""
    text = ",".join(planes)
    if reduce not in REDUCTIONS:
        raise UserError(f"--planes-reduce {reduce!r} is not one of {', '.join(REDUCTIONS)}.")
    if not is_orthoplane(planes):
        if reduce != "mean":
            raise UserError("--planes-reduce combines the predictions of several --planes; with xy alone leave it out.")
        return
    if model_ndim != 2:
        raise UserError(f"--planes {text} runs a 2D model along the volume's axes, but the model is {model_ndim}D.")
    if volume_ndim != 3:
        raise UserError(f"--planes {text} needs a (z, y, x) volume, but the input has {volume_ndim} spatial axes.")
    if target_kind == "affinities":
        raise UserError(f"--planes {text} cannot combine affinities: their channels are in-plane offsets, "
                        "which point along other axes in xz and yz sections.")
    if len(planes) == 1 and reduce != "mean":
        raise UserError(f"--planes-reduce {reduce} combines several planes, but --planes {text} is one.")


def plane_geometry(predict_cfg) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...] | None]:
    """The 3D tile (z, y, x), halo and output chunk (None: the default) of an orthoplane prediction:
    predict.block_shape, halo and chunk_shape as given when 3D, else the 2D (y, x) ones with z
    taking y's size (the z extent is an image axis of the xz and yz sections)."""
    block, halo = tuple(predict_cfg.block_shape), tuple(predict_cfg.halo)
    chunk = tuple(predict_cfg.get("chunk_shape", ()))
    lift = lambda v: (v[0], *v) if len(v) == 2 else tuple(v)  # noqa: E731
    block, halo, chunk = lift(block), lift(halo), lift(chunk) if chunk else None
    if len(block) != 3 or len(halo) != 3:
        raise UserError(f"predict.block_shape {block} and predict.halo {halo} need 2 or 3 axes for --planes.")
    return block, halo, chunk


def check_plane_tiles(planes: Sequence[str], block: Sequence[int], divisor: Sequence[int]) -> None:
    """UserError unless every section of a (z, y, x) tile `block` (after clipping to the volume)
    fits the 2D model, whose input sizes must be multiples of `divisor` (rows, columns)."""
    for plane in planes:
        image = tuple(int(block[a]) for a in PLANES[plane][1:])
        if any(s % d for s, d in zip(image, divisor)):
            raise UserError(f"--planes {','.join(planes)}: the {plane} sections of the tile {'x'.join(map(str, block))} "
                            f"(z, y, x) are {'x'.join(map(str, image))}, which the model cannot take (sizes must be "
                            f"multiples of {tuple(divisor)}); set --config.predict.block_shape to a valid 3D tile.")


def warn_if_anisotropic(planes: Sequence[str], voxel_size: Sequence[float]) -> float:
    """Warns on stderr when the voxel size's largest / smallest ratio exceeds MAX_ANISOTROPY (xz
    and yz sections would be stretched that much against the model's xy training); returns it."""
    sizes = [float(v) for v in voxel_size]
    ratio = max(sizes) / min(sizes) if min(sizes) > 0 else 1.0
    if ratio > MAX_ANISOTROPY and is_orthoplane(planes):
        print(f"warning: --planes {','.join(planes)} on voxels of {' x '.join(f'{v:g}' for v in sizes)} nm "
              f"(anisotropy {ratio:.1f}): xz/yz sections are stretched {ratio:.1f}x against the model's xy "
              "training; orthoplane consensus is meant for near-isotropic volumes.", file=sys.stderr)
    return ratio


def to_sections(xp, x, plane: str):
    """(B, z, y, x, C) tiles -> (B * S, H, W, C) sections of `plane` (S the stack axis' length,
    H, W its image axes, see PLANES), with `xp` = numpy or jax.numpy."""
    t = xp.transpose(x, (0, *(1 + a for a in PLANES[plane]), x.ndim - 1))
    return t.reshape(-1, *t.shape[2:])


def from_sections(xp, y, plane: str, batch: int):
    """The inverse of `to_sections`: (B * S, H, W, K) -> (B, z, y, x, K)."""
    y = y.reshape(batch, -1, *y.shape[1:])
    inverse = np.argsort(PLANES[plane])
    return xp.transpose(y, (0, *(1 + int(a) for a in inverse), y.ndim - 1))


def planes_forward(forward: Callable, block: Sequence[int], planes: Sequence[str], reduce: str = "mean",
                   multiclass: bool = False, tta: bool = False) -> Callable:
    """A 3D forward (B, z, y, x, C) raw tiles of shape `block` -> (B, z, y, x, K) float32 from a
    2D `forward` ((N, H, W, C) -> (N, H, W, K) probabilities, see `device.forward_fn`): the 2D
    forward over the sections of each of `planes`, each put back in place, then combined over the
    planes by `reduce` ('mean', 'median' or 'majority', `ensemble.combine`). With `tta` each
    plane's forward is averaged over its sections' flips and turns (`device.tta_forward`)."""
    per_plane = {p: tta_forward(forward, tuple(block[a] for a in PLANES[p][1:])) if tta else forward for p in planes}

    def combined(x):
        ys = [from_sections(jnp, per_plane[p](to_sections(jnp, x, p)), p, x.shape[0]) for p in planes]
        return ys[0] if len(ys) == 1 else combine(jnp, jnp.stack(ys), reduce, multiclass)

    return combined
