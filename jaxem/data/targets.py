"""Training targets from labels, computed on device after augmentation.

`make_target_fn(cfg, ndim)` returns `fn(labels (B, *S) int32, mask (B, *S) float32) ->
(target (B, *S, K) float32, target_mask (B, *S, K) float32)`; target_mask is 0 where the target is
undefined (unlabelled voxels, neighbourhoods that touch them, offsets that leave the crop).

Kinds:
- "foreground": 1 where label > 0 (K = 1).
- "boundary": 1 where label == 0 or a voxel within `width` (box neighbourhood; (w,) for every
  axis or one value per axis, e.g. (0, 2, 2) for anisotropic 3D) has a different id (K = 1).
- "affinities": one channel per offset; 1 where both ends are labelled (> 0) and share the id.
  Offsets follow the usual convention (negative = look back), e.g.
  [[-1,0,0],[0,-1,0],[0,0,-1],[0,-9,0],[0,0,-9]]; () means the nearest neighbours (-1 per axis).
- "distance": per instance, Euclidean distance to the instance boundary divided by the
  instance's maximum (0 on background, 1 at the centre), in voxels scaled by `anisotropy`
  (K = 1). Computed on the host with the `edt` package through `jax.pure_callback`, so it also
  works inside jit; see `distance_target` to compute it in loader workers instead.
- "multiclass": labels are semantic class ids in [0, num_classes); one-hot (K = num_classes);
  `ignore_label` voxels are masked. (Set data.renumber=False so class ids survive loading.)
"""

from __future__ import annotations

import edt
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.ndimage

from jaxem.errors import UserError

KINDS = ("foreground", "boundary", "affinities", "distance", "multiclass")


def default_target_config(ndim: int = 3) -> ml_collections.ConfigDict:
    """Defaults for `config.target` (boundary of width 1)."""
    return ml_collections.ConfigDict({
        "kind": "boundary",
        "width": (1,),  # boundary half-width in voxels: (w,) for every axis or one per axis
        "offsets": (),  # affinities; () = nearest neighbours along every axis
        "anisotropy": (1.0,) * ndim,  # distance: voxel size ratios (z, y, x)
        "num_classes": 2,  # multiclass
        "ignore_label": -1,  # multiclass
    })


def num_target_channels(cfg: ml_collections.ConfigDict, ndim: int) -> int:
    """K, the number of output channels the model needs for this target."""
    _check_kind(cfg)
    if cfg.kind == "affinities":
        return len(affinity_offsets(cfg, ndim))
    if cfg.kind == "multiclass":
        return int(cfg.num_classes)
    return 1


def make_target_fn(cfg: ml_collections.ConfigDict, ndim: int):
    """Returns the pure, jit-able `fn(labels, mask) -> (target, target_mask)` for `cfg.kind`."""
    _check_kind(cfg)
    if cfg.kind == "foreground":
        return lambda labels, mask: ((labels > 0)[..., None].astype(jnp.float32), mask[..., None])
    if cfg.kind == "boundary":
        width = _per_axis(cfg.width, ndim, "target.width")
        return lambda labels, mask: boundary_target(labels, mask, width)
    if cfg.kind == "affinities":
        offsets = affinity_offsets(cfg, ndim)
        return lambda labels, mask: affinity_target(labels, mask, offsets)
    if cfg.kind == "distance":
        anisotropy = tuple(float(a) for a in _per_axis(cfg.anisotropy, ndim, "target.anisotropy"))
        return lambda labels, mask: (_distance_callback(labels, anisotropy), mask[..., None])
    num_classes, ignore = int(cfg.num_classes), int(cfg.ignore_label)
    return lambda labels, mask: multiclass_target(labels, mask, num_classes, ignore)


def boundary_target(labels, mask, width):
    """labels, mask (B, *S); width per spatial axis -> (B, *S, 1) boundary map and its mask."""
    window = (1,) + tuple(2 * w + 1 for w in width)
    reduce = lambda x, init, op: jax.lax.reduce_window(x, init, op, window, (1,) * x.ndim, "SAME")  # noqa: E731
    big = jnp.iinfo(jnp.int32).max
    hi = reduce(labels, -big, jax.lax.max)
    lo = reduce(labels, big, jax.lax.min)
    target = ((labels == 0) | (hi != lo)).astype(jnp.float32)
    # Unknown near unlabelled voxels: the neighbourhood must be fully labelled.
    target_mask = reduce(mask, jnp.inf, jax.lax.min)
    return target[..., None], target_mask[..., None]


def affinity_target(labels, mask, offsets):
    """labels, mask (B, *S) -> (B, *S, K): affinity to voxel + offset, 0 mask where it leaves the crop."""
    targets, masks = [], []
    for offset in offsets:
        other, inside = _shifted(labels, offset)
        other_mask, _ = _shifted(mask, offset)
        targets.append(((labels == other) & (labels > 0)).astype(jnp.float32))
        masks.append(mask * other_mask * inside)
    return jnp.stack(targets, -1), jnp.stack(masks, -1)


def _shifted(x, offset):
    """x[b, p + offset] for every p (edge-clamped) and a float mask of positions where p + offset is inside."""
    spatial = x.shape[1:]
    index, inside = [slice(None)], jnp.ones(spatial, jnp.float32)
    for axis, (o, n) in enumerate(zip(offset, spatial)):
        pos = jnp.arange(n) + o
        shape = [1] * len(spatial)
        shape[axis] = n
        index.append(jnp.clip(pos, 0, n - 1).reshape(shape))
        inside = inside * ((pos >= 0) & (pos < n)).astype(jnp.float32).reshape(shape)
    return x[tuple(index)], inside[None]


def multiclass_target(labels, mask, num_classes, ignore_label):
    """Semantic labels (B, *S) -> one-hot (B, *S, num_classes); ignore_label and unlabelled voxels masked."""
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    target = jax.nn.one_hot(jnp.where(valid, labels, 0), num_classes, dtype=jnp.float32)
    target_mask = (mask * valid)[..., None] * jnp.ones((num_classes,), jnp.float32)
    return target, target_mask


def distance_target(labels: np.ndarray, anisotropy=None) -> np.ndarray:
    """Host-side numpy: one example's labels (*S) -> normalized per-instance distance (*S) float32.

    Runs wherever it is called (loader workers or a pure_callback); uses the `edt` package.
    `anisotropy` is the voxel size ratio per axis (None = isotropic).
    """
    ids = np.ascontiguousarray(np.asarray(labels).astype(np.uint32))
    dist = edt.edt(ids, anisotropy=anisotropy, black_border=False, parallel=1).astype(np.float32)
    if ids.max() == 0:
        return np.zeros(ids.shape, np.float32)
    peak = scipy.ndimage.maximum(dist, ids, np.arange(ids.max() + 1)).astype(np.float32)
    return np.where(ids > 0, dist / np.maximum(peak[ids], 1e-6), 0.0).astype(np.float32)


def _distance_callback(labels, anisotropy):
    def host(x):
        x = np.asarray(x)
        return np.stack([distance_target(e, anisotropy) for e in x])[..., None]

    shape = jax.ShapeDtypeStruct(labels.shape + (1,), jnp.float32)
    return jax.pure_callback(host, shape, labels, vmap_method="sequential")


def affinity_offsets(cfg, ndim: int) -> tuple[tuple[int, ...], ...]:
    """The configured offsets as int tuples of length ndim (nearest neighbours when empty)."""
    offsets = tuple(tuple(int(v) for v in o) for o in cfg.offsets)
    if not offsets:
        return tuple(tuple(-1 if i == axis else 0 for i in range(ndim)) for axis in range(ndim))
    for o in offsets:
        if len(o) != ndim:
            raise UserError(f"target.offsets entry {list(o)} must have {ndim} values, one per spatial axis.")
    return offsets


def _per_axis(value, ndim, name):
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    values = values * ndim if len(values) == 1 else values
    if len(values) != ndim:
        raise UserError(f"{name} must be one number or {ndim} numbers (one per axis), got {value!r}.")
    return values


def _check_kind(cfg):
    if cfg.kind not in KINDS:
        raise UserError(f"target.kind must be one of {', '.join(KINDS)}, got {cfg.kind!r}.")
