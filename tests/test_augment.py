"""On-device augmentation: geometric ops move image, labels and mask together; per-example randomness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxem.data.augment import OPS, default_augment_config, make_augment_fn, make_two_view_fn

INTENSITY = ("contrast", "gamma", "blur", "noise", "missing_section", "blurred_section")


def _only(ndim, *ops, **overrides):
    """A config with every op off except `ops` (probability 1 unless given)."""
    cfg = default_augment_config(ndim)
    for op in OPS:
        cfg[op].p = 1.0 if op in ops else 0.0
    for key, value in overrides.items():
        section, field = key.split("__")
        cfg[section][field] = value
    return cfg


def _batch(shape, batch=4, seed=0, block=4):
    """Labels as blocks of distinct ids; the image is the same ids as float (so we can compare)."""
    rng = np.random.default_rng(seed)
    grid = tuple(max(1, s // block) for s in shape)
    coarse = rng.permutation(np.prod(grid) * batch).reshape((batch,) + grid) + 1
    labels = coarse
    for axis, s in enumerate(shape):
        labels = np.repeat(labels, s // coarse.shape[axis + 1], axis=axis + 1)
    labels = labels.astype(np.int32)
    return {"image": labels[..., None].astype(np.float32), "labels": labels,
            "mask": np.ones(labels.shape, np.float32)}


@pytest.mark.parametrize("ndim,shape", [(2, (16, 16)), (3, (4, 8, 8))])
def test_flips_rot90_misalign_move_everything_together(ndim, shape):
    ops = ("flip", "rot90") + (("misalign",) if ndim == 3 else ())
    cfg = _only(ndim, *ops, flip__p=0.5)
    batch = _batch(shape)
    out = jax.jit(make_augment_fn(cfg, ndim))(jax.random.key(1), batch)
    image, labels, mask = (np.asarray(out[k]) for k in ("image", "labels", "mask"))
    np.testing.assert_array_equal(image[..., 0], labels.astype(np.float32))
    assert not np.array_equal(labels, batch["labels"])
    if ndim == 2:  # pure permutations of the voxels of each example
        for b in range(len(labels)):
            np.testing.assert_array_equal(np.sort(labels[b].ravel()), np.sort(batch["labels"][b].ravel()))
    else:  # misalignment exposes voxels that are marked unlabelled
        assert mask.min() == 0 and mask.max() == 1


def test_transposes_only_when_isotropic():
    batch = _batch((8, 8, 8), batch=6)
    cfg = _only(3, "transpose")
    same = jax.jit(make_augment_fn(cfg, 3))(jax.random.key(0), batch)
    np.testing.assert_array_equal(np.asarray(same["labels"]), batch["labels"])
    cfg.isotropic = True
    out = jax.jit(make_augment_fn(cfg, 3))(jax.random.key(0), batch)
    labels = np.asarray(out["labels"])
    np.testing.assert_array_equal(np.asarray(out["image"])[..., 0], labels)
    perms = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    for b in range(6):
        matches = [p for p in perms if np.array_equal(labels[b], batch["labels"][b].transpose(p))]
        assert matches and matches[0] != (0, 1, 2)


@pytest.mark.parametrize("ndim,shape", [(2, (32, 32)), (3, (4, 24, 24))])
def test_rotation_and_elastic_keep_labels_on_image(ndim, shape):
    cfg = _only(ndim, "rotate", "elastic", rotate__max_degrees=20.0, elastic__sigma=2.0, elastic__spacing=8)
    batch = _batch(shape, block=8)
    out = jax.jit(make_augment_fn(cfg, ndim))(jax.random.key(2), batch)
    image, labels = np.asarray(out["image"])[..., 0], np.asarray(out["labels"])
    assert np.mean(labels != batch["labels"]) > 0.05  # it moved
    # Where linear interpolation gives a whole id, all neighbours had that id, so nearest must too.
    whole = np.isclose(image, np.round(image), atol=1e-3)
    assert whole.mean() > 0.5
    assert np.mean(labels[whole] == np.round(image[whole])) > 0.99
    # Nearest sampling never invents ids.
    for b in range(len(labels)):
        assert set(np.unique(labels[b])) <= set(np.unique(batch["labels"][b]))


def test_intensity_ops_leave_labels_and_mask_alone():
    cfg = _only(3, *INTENSITY)
    batch = _batch((4, 8, 8))
    batch["image"] = np.random.default_rng(0).normal(size=batch["image"].shape).astype(np.float32)
    out = jax.jit(make_augment_fn(cfg, 3))(jax.random.key(3), batch)
    np.testing.assert_array_equal(np.asarray(out["labels"]), batch["labels"])
    np.testing.assert_array_equal(np.asarray(out["mask"]), batch["mask"])
    image = np.asarray(out["image"])
    assert image.shape == batch["image"].shape and np.all(np.isfinite(image))
    # Missing section with p=1: exactly one z-section per example is the fill value.
    blank = np.all(image == cfg.missing_section.fill, axis=(2, 3, 4))
    assert np.all(blank.sum(1) >= 1)


def test_per_example_randomness_and_determinism():
    cfg = default_augment_config(2)
    one = _batch((16, 16), batch=1)
    batch = {k: np.repeat(v, 8, 0) for k, v in one.items()}
    fn = jax.jit(make_augment_fn(cfg, 2))
    a, b = fn(jax.random.key(5), batch), fn(jax.random.key(5), batch)
    np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    images = np.asarray(a["image"]).reshape(8, -1)
    assert len({img.tobytes() for img in images}) == 8


def test_two_views_differ_and_disabled_is_identity():
    cfg = default_augment_config(2)
    image = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 1)), jnp.float32)
    v1, v2 = jax.jit(make_two_view_fn(cfg, 2))(jax.random.key(0), image)
    assert v1.shape == v2.shape == image.shape
    assert float(jnp.abs(v1 - v2).mean()) > 0.01
    cfg.enabled = False
    out = make_augment_fn(cfg, 2)(jax.random.key(0), {"image": image})
    np.testing.assert_array_equal(np.asarray(out["image"]), np.asarray(image))
