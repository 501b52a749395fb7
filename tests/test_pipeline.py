"""The grain loader: sharded batches, determinism across workers, exact resume, validation crops."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxem.data import pipeline, sampling
from jaxem.data.volume import create_volume
from jaxem.errors import UserError


def _write(path, array):
    vol = create_volume(path, array.shape, array.dtype, (40.0, 4.0, 4.0)[-array.ndim:], chunks=(4, 32, 32)[-array.ndim:])
    vol.write(array)
    return str(path)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    paths = {}
    for name, shape in (("a", (6, 40, 48)), ("b", (4, 32, 32))):
        image = rng.integers(0, 255, shape).astype(np.uint8)
        labels = (rng.integers(0, 5, shape) * 7).astype(np.uint32)  # 0 (background), 7, ..., 28
        paths[name] = (_write(root / f"{name}_img", image), _write(root / f"{name}_lab", labels))
    return paths


@pytest.fixture(scope="module")
def mesh():
    return jax.sharding.Mesh(np.array(jax.devices()), ("data",))  # as jaxem.train.parallel.make_mesh


def _cfg(volumes, crop=(16, 16), **kw):
    cfg = pipeline.default_data_config()
    cfg.train_images = tuple(v[0] for v in volumes.values())
    cfg.train_labels = tuple(v[1] for v in volumes.values())
    cfg.val_images, cfg.val_labels = (volumes["b"][0],), (volumes["b"][1],)
    cfg.crop_shape, cfg.batch_size = crop, 8
    cfg.update(kw)
    return cfg


def _take(loader, n):
    batches = [jax.device_get(next(loader)) for _ in range(n)]
    return batches


@pytest.mark.parametrize("crop,ndim", [((16, 16), 2), ((4, 16, 16), 3)])
def test_batches_are_sharded_and_typed(volumes, mesh, crop, ndim):
    loader = pipeline.make_loader(_cfg(volumes, crop), mesh=mesh, ndim=ndim, seed=0)
    batch = next(loader)
    loader.close()
    assert batch["image"].shape == (8, *crop, 1) and batch["image"].dtype == np.float32
    assert batch["labels"].shape == (8, *crop) and batch["labels"].dtype == np.int32
    assert batch["mask"].shape == (8, *crop) and batch["mask"].dtype == np.float32
    for value in batch.values():
        assert value.sharding.spec == P("data") and len(value.sharding.device_set) == 4
    assert abs(float(batch["image"].mean())) < 0.3  # normalized per volume
    ids = np.unique(jax.device_get(batch["labels"])[0])
    np.testing.assert_array_equal(ids, np.arange(5))  # renumbered from 0, 7, ..., 28


def test_batch_k_depends_only_on_seed_and_k_and_resumes_exactly(volumes, mesh):
    cfg = _cfg(volumes)
    loader = pipeline.make_loader(cfg, mesh=mesh, ndim=2, seed=7)
    first = _take(loader, 3)
    state = loader.get_state()
    rest = _take(loader, 2)
    loader.close()
    assert state == {"batch": 3, "seed": 7, "split": "train"}
    resumed = pipeline.make_loader(cfg, mesh=mesh, ndim=2, seed=7)
    resumed.set_state(state)
    again = _take(resumed, 2)
    resumed.close()
    for a, b in zip(rest, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(first[0]["image"], first[1]["image"])
    other = pipeline.make_loader(cfg, mesh=mesh, ndim=2, seed=8)
    assert not np.array_equal(_take(other, 1)[0]["image"], first[0]["image"])
    other.close()


def test_worker_processes_give_the_same_batches(volumes, mesh):
    inline = pipeline.make_loader(_cfg(volumes, num_workers=0), mesh=mesh, ndim=2, seed=1)
    workers = pipeline.make_loader(_cfg(volumes, num_workers=2), mesh=mesh, ndim=2, seed=1)
    try:
        for a, b in zip(_take(inline, 3), _take(workers, 3)):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    finally:
        inline.close()
        workers.close()


def test_val_crops_are_fixed_and_padded(volumes, mesh):
    cfg = _cfg(volumes, val_max_crops=13)
    loader = pipeline.make_loader(cfg, mesh=mesh, ndim=2, seed=0, split="val")
    assert len(loader.boxes) == 13 and loader.num_batches == 2
    one = _take(loader, 2)
    two = _take(loader, 2)  # the next pass repeats the same crops
    loader.set_state({"batch": 0})
    three = _take(loader, 1)
    loader.close()
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(one[0]["labels"], three[0]["labels"])
    masks = one[1]["mask"].reshape(8, -1).max(1)
    np.testing.assert_array_equal(masks, [1, 1, 1, 1, 1, 0, 0, 0])  # 13 = 8 + 5 real rows
    index, box = loader.boxes[0]
    raw = sampling.open_volume(cfg.val_images[index]).read(box)[0]
    stats = sampling.normalize_stats(sampling.open_volume(cfg.val_images[index]))
    np.testing.assert_allclose(one[0]["image"][0, ..., 0], sampling.normalize(raw, stats))


def test_user_errors(volumes, mesh):
    with pytest.raises(UserError, match="divisible"):
        pipeline.make_loader(_cfg(volumes, batch_size=6), mesh=mesh, ndim=2, seed=0)
    with pytest.raises(UserError, match="crop_shape"):
        pipeline.make_loader(_cfg(volumes, (16, 16)), mesh=mesh, ndim=3, seed=0)
    with pytest.raises(UserError, match="does not fit"):
        pipeline.make_loader(_cfg(volumes, (36, 36)), mesh=mesh, ndim=2, seed=0)
    loader = pipeline.make_loader(_cfg(volumes, foreground_min_fraction=0.99, max_retries=2), mesh=mesh, ndim=2, seed=0)
    with pytest.raises(UserError, match="foreground_min_fraction"):
        next(loader)
    loader.close()


def test_real_isbi_slices(shared_data, tmp_path, mesh):
    tifffile = pytest.importorskip("tifffile")
    image = tifffile.imread(shared_data / "isbi2012" / "train-volume.tif")[:4]
    labels = (tifffile.imread(shared_data / "isbi2012" / "train-labels.tif")[:4] > 0).astype(np.uint8)
    cfg = pipeline.default_data_config()
    cfg.train_images, cfg.train_labels = (_write(tmp_path / "img", image),), (_write(tmp_path / "lab", labels),)
    cfg.crop_shape, cfg.batch_size, cfg.foreground_min_fraction = (128, 128), 4, 0.7
    loader = pipeline.make_loader(cfg, mesh=mesh, ndim=2, seed=0)
    batch = jax.device_get(next(loader))
    loader.close()
    assert np.all((batch["labels"] > 0).reshape(4, -1).mean(1) >= 0.7)
    assert abs(batch["image"].mean()) < 0.5 and 0.5 < batch["image"].std() < 1.5


def test_augment_and_targets_run_on_a_sharded_loader_batch(volumes, mesh):
    from jaxem.data import augment, targets

    loader = pipeline.make_loader(_cfg(volumes, (4, 16, 16)), mesh=mesh, ndim=3, seed=0)
    batch = next(loader)
    loader.close()
    augment_fn = augment.make_augment_fn(augment.default_augment_config(3), 3)
    target_cfg = targets.default_target_config(3)
    target_cfg.kind = "foreground"
    target_fn = targets.make_target_fn(target_cfg, 3)

    @jax.jit
    def step(rng, batch):
        batch = augment_fn(rng, batch)
        return batch, target_fn(batch["labels"], batch["mask"])

    out, (target, target_mask) = step(jax.random.key(0), batch)
    assert target.shape == (8, 4, 16, 16, 1) and out["image"].shape == batch["image"].shape
    np.testing.assert_array_equal(jax.device_get(target)[..., 0], jax.device_get(out["labels"]) > 0)
    np.testing.assert_array_equal(jax.device_get(target_mask)[..., 0], jax.device_get(out["mask"]))


def test_user_error_inside_a_worker_process_surfaces_as_user_error(volumes, mesh):
    cfg = _cfg(volumes, foreground_min_fraction=0.99, max_retries=2, num_workers=2)
    loader = pipeline.make_loader(cfg, mesh=mesh, ndim=2, seed=0)
    try:
        with pytest.raises(UserError, match="foreground_min_fraction=0.99 was not reached"):
            next(loader)
    finally:
        loader.close()
