"""EM augmentations as pure, jittable JAX functions that run on device inside the train step.

A batch is a dict {"image": (B, *spatial, C) float32, "labels": (B, *spatial) int32 instance ids,
"mask": (B, *spatial) float32, 1 = labelled}. Every example draws its own random parameters
(the per-example function is vmapped over B). Geometric ops (flips, in-plane rot90, transposes,
small rotations, elastic deformation, slice misalignment) move image, labels and mask together:
linear interpolation for the image, nearest for labels and mask. Intensity ops and section
defects touch the image only.

Spatial axes are (z, y, x) or (y, x). For anisotropic 3D data (the usual EM case) rotations and
elastic displacements stay in the (y, x) plane and axis transposes are never applied; set
`isotropic=True` to allow transposes and 3D displacements (requires a cubic crop for transposes).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from jaxem.errors import UserError

OPS = ("flip", "rot90", "transpose", "rotate", "elastic", "contrast", "gamma", "blur", "noise",
       "missing_section", "blurred_section", "misalign")


def default_augment_config(ndim: int) -> ml_collections.ConfigDict:
    """Probabilities and strengths of every op; intensities are in normalized-image units (std)."""
    defects = 0.1 if ndim == 3 else 0.0
    return ml_collections.ConfigDict({
        "enabled": True,
        "isotropic": False,  # allow axis transposes and 3D elastic displacement (isotropic voxels only)
        "flip": {"p": 0.5},  # independently per spatial axis
        "rot90": {"p": 0.75},  # in-plane (y, x), k uniform in 1..3; square crops only
        "transpose": {"p": 0.5},  # random permutation of (z, y, x); only with isotropic=True
        "rotate": {"p": 0.3, "max_degrees": 15.0},  # in-plane, about the crop centre
        "elastic": {"p": 0.3, "sigma": 3.0, "spacing": 16},  # displacement std (px), control spacing (px)
        "contrast": {"p": 0.5, "brightness": 0.2, "contrast": 0.2},  # x*(1+U(-c,c)) + U(-b,b)
        "gamma": {"p": 0.3, "max_log_gamma": 0.3},  # gamma = exp(U(-m, m)) on the min-max range
        "blur": {"p": 0.2, "max_sigma": 1.5},  # in-plane Gaussian blur, sigma ~ U(0, max) px
        "noise": {"p": 0.3, "max_std": 0.1},  # additive Gaussian noise, std ~ U(0, max)
        "missing_section": {"p": defects, "fill": 0.0},  # 3D: one z-section replaced by `fill`
        "blurred_section": {"p": defects, "sigma": 3.0},  # 3D: one z-section strongly blurred
        "misalign": {"p": defects, "max_shift": 6},  # 3D: sections z >= z0 translated by (dy, dx) px
    })


def make_augment_fn(cfg: ml_collections.ConfigDict, ndim: int):
    """Returns `fn(rng, batch) -> batch`, pure and jit-able; keys other than image/labels/mask pass through."""
    if ndim not in (2, 3):
        raise UserError(f"augment: ndim must be 2 or 3, got {ndim}.")

    def fn(rng, batch):
        if not cfg.enabled:
            return batch
        image = batch["image"]
        spatial = image.shape[1:-1]
        labels = batch.get("labels", jnp.zeros(image.shape[:-1], jnp.int32))
        mask = batch.get("mask", jnp.ones(image.shape[:-1], jnp.float32))
        keys = jax.random.split(rng, image.shape[0])
        one = lambda k, i, l, m: _augment_example(cfg, ndim, spatial, k, i, l, m)  # noqa: E731
        image, labels, mask = jax.vmap(one)(keys, image, labels, mask)
        out = dict(batch, image=image)
        if "labels" in batch:
            out["labels"] = labels
        if "mask" in batch:
            out["mask"] = mask
        return out

    return fn


def make_two_view_fn(cfg: ml_collections.ConfigDict, ndim: int, crop_scale: tuple[float, float] = (1.0, 1.0)):
    """Returns `fn(rng, image (B, *spatial, C)) -> (view1, view2)`, two independent views per example
    for self-supervised training: each a random resized crop (see `random_resized_crop`) then the
    augmentations of `cfg`. `crop_scale` (1, 1) skips the crop."""
    augment = make_augment_fn(cfg, ndim)

    def view(rng, image):
        crop_rng, augment_rng = jax.random.split(rng)
        if tuple(crop_scale) != (1.0, 1.0):
            image = random_resized_crop(crop_rng, image, crop_scale)
        return augment(augment_rng, {"image": image})["image"]

    def fn(rng, image):
        k1, k2 = jax.random.split(rng)
        return view(k1, image), view(k2, image)

    return fn


PHOTOMETRIC = ("contrast", "gamma", "blur", "noise")


def strong_photometric_config() -> ml_collections.ConfigDict:
    """The photometric ops of `default_augment_config` turned up (FixMatch's strong view): every one
    more likely and wider; in normalized-image units (std) and px."""
    return ml_collections.ConfigDict({
        "contrast": {"p": 1.0, "brightness": 0.4, "contrast": 0.5},
        "gamma": {"p": 0.8, "max_log_gamma": 0.6},
        "blur": {"p": 0.5, "max_sigma": 2.0},
        "noise": {"p": 1.0, "max_std": 0.3},
    })


def make_photometric_fn(cfg: ml_collections.ConfigDict, ndim: int, isotropic: bool = False):
    """Returns `fn(rng, image (B, *spatial, C)) -> image`: the intensity ops of `cfg` (contrast,
    gamma, blur, noise; fields as in `default_augment_config`) with their own draw per example and
    no geometric op, so every voxel stays where it was. Blur is in-plane unless `isotropic`."""
    full = ml_collections.ConfigDict({**{op: cfg[op].to_dict() for op in PHOTOMETRIC}, "isotropic": isotropic})

    def one(key, image):
        return _intensity(full, dict(zip(PHOTOMETRIC, jax.random.split(key, len(PHOTOMETRIC)))), image, ndim)

    return lambda rng, image: jax.vmap(one)(jax.random.split(rng, image.shape[0]), image)


def random_resized_crop(rng: jax.Array, image: jax.Array, scale: tuple[float, float] = (0.3, 1.0),
                        aspect: tuple[float, float] = (0.75, 4 / 3)) -> jax.Array:
    """Per example, a random in-plane window resized back to the full crop (SimCLR's main view op).

    image (B, *spatial, C) -> same shape. The window covers a fraction U(scale) of the (y, x) plane
    with aspect ratio log-uniform in `aspect` (clipped to the crop), at a uniform position; 3D crops
    keep every z-section (EM sections are thick: zooming in z would mix resolutions). Linear
    interpolation.
    """
    lo, hi = float(scale[0]), float(scale[1])
    if not 0 < lo <= hi <= 1:
        raise UserError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}.")
    plane = (image.ndim - 3, image.ndim - 2)  # the (y, x) axes of one example (*spatial, C)

    def one(key, example):
        k_area, k_aspect, k_pos = jax.random.split(key, 3)
        area = jax.random.uniform(k_area, (), minval=lo, maxval=hi)
        log_ratio = jax.random.uniform(k_aspect, (), minval=math.log(aspect[0]), maxval=math.log(aspect[1]))
        ratio = jnp.exp(log_ratio)
        fraction = jnp.clip(jnp.sqrt(jnp.stack([area / ratio, area * ratio])), 0.0, 1.0)  # of (y, x)
        start = jax.random.uniform(k_pos, (2,)) * (1.0 - fraction) * jnp.array([example.shape[a] for a in plane])
        zoom = 1.0 / fraction
        return jax.image.scale_and_translate(example, example.shape, plane, zoom, -start * zoom, "linear",
                                             antialias=False)

    return jax.vmap(one)(jax.random.split(rng, image.shape[0]), image)


def _augment_example(cfg, ndim, spatial, key, image, labels, mask):
    """One example: image (*S, C), labels (*S), mask (*S) -> same shapes."""
    k = dict(zip(OPS, jax.random.split(key, len(OPS))))
    fields = (image, labels, mask)
    fields = _flips(cfg, k["flip"], fields, ndim)
    if spatial[-1] == spatial[-2]:
        fields = _rot90(cfg, k["rot90"], fields, ndim)
    if cfg.isotropic and ndim == 3 and cfg.transpose.p > 0:
        if len(set(spatial)) != 1:
            raise UserError(f"augment.isotropic transposes need a cubic crop, got crop shape {spatial}.")
        fields = _transpose(cfg, k["transpose"], fields)
    if cfg.rotate.p > 0 or cfg.elastic.p > 0:
        fields = _warp(cfg, k["rotate"], k["elastic"], fields, ndim, spatial)
    if ndim == 3 and cfg.misalign.p > 0:
        fields = _misalign(cfg, k["misalign"], fields)
    image, labels, mask = fields
    image = _intensity(cfg, k, image, ndim)
    if ndim == 3:
        image = _section_defects(cfg, k["missing_section"], k["blurred_section"], image)
    return image, labels, mask


def _coin(key, p):
    return jax.random.uniform(key) < p


def _select(flag, a, b):
    return jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)


def _flips(cfg, key, fields, ndim):
    for axis, k in enumerate(jax.random.split(key, ndim)):
        flipped = tuple(jnp.flip(f, axis) for f in fields)
        fields = _select(_coin(k, cfg.flip.p), flipped, fields)
    return fields


def _rot90(cfg, key, fields, ndim):
    k_apply, k_turns = jax.random.split(key)
    turns = jnp.where(_coin(k_apply, cfg.rot90.p), jax.random.randint(k_turns, (), 1, 4), 0)
    axes = (ndim - 2, ndim - 1)
    branches = [lambda fs, t=t: tuple(jnp.rot90(f, t, axes) for f in fs) for t in range(4)]
    return jax.lax.switch(turns, branches, fields)


def _transpose(cfg, key, fields):
    import itertools

    k_apply, k_perm = jax.random.split(key)
    perms = list(itertools.permutations(range(3)))
    index = jnp.where(_coin(k_apply, cfg.transpose.p), jax.random.randint(k_perm, (), 1, 6), 0)

    def permute(fs, perm):
        return tuple(jnp.transpose(f, perm + tuple(range(3, f.ndim))) for f in fs)

    return jax.lax.switch(index, [lambda fs, p=p: permute(fs, p) for p in perms], fields)


def _warp(cfg, k_rot, k_el, fields, ndim, spatial):
    """Small in-plane rotation plus smooth elastic displacement, as one resampling."""
    grid = jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in spatial], indexing="ij")
    coords = list(grid)
    ka, kb = jax.random.split(k_rot)
    angle = jax.random.uniform(kb, (), minval=-1.0, maxval=1.0) * math.radians(cfg.rotate.max_degrees)
    angle = jnp.where(_coin(ka, cfg.rotate.p), angle, 0.0)
    y, x = ndim - 2, ndim - 1
    cy, cx = (spatial[y] - 1) / 2, (spatial[x] - 1) / 2
    dy, dx = grid[y] - cy, grid[x] - cx
    coords[y] = cy + jnp.cos(angle) * dy - jnp.sin(angle) * dx
    coords[x] = cx + jnp.sin(angle) * dy + jnp.cos(angle) * dx
    if cfg.elastic.p > 0:
        ka, kb = jax.random.split(k_el)
        on = _coin(ka, cfg.elastic.p)
        axes = range(ndim) if cfg.isotropic else (y, x)
        field = _smooth_field(kb, spatial, len(axes), cfg.elastic.spacing) * cfg.elastic.sigma
        for i, axis in enumerate(axes):
            coords[axis] = coords[axis] + jnp.where(on, field[i], 0.0)
    coords = [_mirror(c, n) for c, n in zip(coords, spatial)]
    image, labels, mask = fields
    image = jax.vmap(lambda ch: jax.scipy.ndimage.map_coordinates(ch, coords, order=1, mode="nearest"),
                     in_axes=-1, out_axes=-1)(image)
    nearest = tuple(jnp.clip(jnp.round(c).astype(jnp.int32), 0, n - 1) for c, n in zip(coords, spatial))
    return image, labels[nearest], mask[nearest]


def _smooth_field(key, spatial, count, spacing):
    """`count` smooth random fields of shape `spatial`, unit std at control points `spacing` px apart."""
    coarse = tuple(max(2, math.ceil(n / spacing) + 1) for n in spatial)
    noise = jax.random.normal(key, (count,) + coarse)
    return jax.image.resize(noise, (count,) + tuple(spatial), method="cubic")


def _mirror(c, n):
    """Reflects coordinates into [0, n-1] (symmetric about the edge voxels)."""
    if n == 1:
        return jnp.zeros_like(c)
    period = 2.0 * (n - 1)
    c = jnp.mod(jnp.abs(c), period)
    return jnp.where(c > n - 1, period - c, c)


def _misalign(cfg, key, fields):
    """Translates sections z >= z0 by an integer (dy, dx); vacated voxels get mask 0."""
    image, labels, mask = fields
    nz, ny, nx = labels.shape
    ka, kz, ks = jax.random.split(key, 3)
    m = cfg.misalign.max_shift
    shift = jax.random.randint(ks, (2,), -m, m + 1)
    z0 = jax.random.randint(kz, (), 1, max(nz, 2))
    moved = (jnp.arange(nz) >= z0) & _coin(ka, cfg.misalign.p)
    sy = jnp.where(moved[:, None], jnp.arange(ny)[None, :] - shift[0], jnp.arange(ny)[None, :])
    sx = jnp.where(moved[:, None], jnp.arange(nx)[None, :] - shift[1], jnp.arange(nx)[None, :])
    inside = ((sy >= 0) & (sy < ny))[:, :, None] & ((sx >= 0) & (sx < nx))[:, None, :]
    zi = jnp.arange(nz)[:, None, None]
    yi, xi = jnp.clip(sy, 0, ny - 1)[:, :, None], jnp.clip(sx, 0, nx - 1)[:, None, :]
    return image[zi, yi, xi], labels[zi, yi, xi], mask[zi, yi, xi] * inside


def _intensity(cfg, k, image, ndim):
    """Contrast/brightness, gamma, blur, noise on one example image (*S, C)."""
    ka, kb, kc = jax.random.split(k["contrast"], 3)
    c = cfg.contrast
    scale = 1.0 + jax.random.uniform(kb, (), minval=-c.contrast, maxval=c.contrast)
    shift = jax.random.uniform(kc, (), minval=-c.brightness, maxval=c.brightness)
    image = jnp.where(_coin(ka, c.p), image * scale + shift, image)
    if cfg.gamma.p > 0:
        ka, kb = jax.random.split(k["gamma"])
        gamma = jnp.exp(jax.random.uniform(kb, (), minval=-1.0, maxval=1.0) * cfg.gamma.max_log_gamma)
        lo, hi = image.min(), image.max()
        unit = (image - lo) / jnp.maximum(hi - lo, 1e-6)
        image = jnp.where(_coin(ka, cfg.gamma.p), lo + (hi - lo) * unit ** gamma, image)
    if cfg.blur.p > 0:
        ka, kb = jax.random.split(k["blur"])
        sigma = jax.random.uniform(kb, (), maxval=cfg.blur.max_sigma)
        axes = tuple(range(ndim)) if cfg.isotropic else (ndim - 2, ndim - 1)
        image = jnp.where(_coin(ka, cfg.blur.p), gaussian_blur(image, sigma, axes, cfg.blur.max_sigma), image)
    ka, kb, kc = jax.random.split(k["noise"], 3)
    std = jax.random.uniform(kb, (), maxval=cfg.noise.max_std)
    noisy = image + std * jax.random.normal(kc, image.shape)
    return jnp.where(_coin(ka, cfg.noise.p), noisy, image)


def _section_defects(cfg, k_missing, k_blurred, image):
    """3D image (z, y, x, C): one missing section and/or one blurred section."""
    nz = image.shape[0]
    z = jnp.arange(nz)[:, None, None, None]
    ka, kb = jax.random.split(k_missing)
    missing = (z == jax.random.randint(kb, (), 0, nz)) & _coin(ka, cfg.missing_section.p)
    if cfg.blurred_section.p > 0:
        ka, kb = jax.random.split(k_blurred)
        section = (z == jax.random.randint(kb, (), 0, nz)) & _coin(ka, cfg.blurred_section.p)
        sigma = cfg.blurred_section.sigma
        image = jnp.where(section, gaussian_blur(image, sigma, (1, 2), sigma), image)
    return jnp.where(missing, cfg.missing_section.fill, image)


def gaussian_blur(image, sigma, axes, max_sigma):
    """Separable Gaussian blur of `image` along `axes` (sigma in px, may be traced; radius from max_sigma)."""
    radius = max(1, math.ceil(3 * max_sigma))
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * (taps / jnp.maximum(sigma, 1e-3)) ** 2)
    weights = weights / weights.sum()
    for axis in axes:
        n = image.shape[axis]
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(image, pad, mode="symmetric" if n > radius else "edge")
        image = sum(weights[i] * jax.lax.slice_in_dim(padded, i, i + n, axis=axis) for i in range(2 * radius + 1))
    return image
