"""Test-time batch-norm adaptation (AdaBN): pooled statistics, invariance it restores, the CLI."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxem import models
from jaxem.cli import main
from jaxem.data.volume import open_volume, read_attributes
from jaxem.errors import UserError
from jaxem.infer.adapt import adapted_batch_stats, random_crops
from jaxem.models.layers import BATCH_NORM_MOMENTUM


class _NormFirst(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.BatchNorm(use_running_average=not train, momentum=BATCH_NORM_MOMENTUM)(x)
        return nn.Dense(2)(x)


def test_statistics_are_pooled_over_all_crops_in_uneven_batches():
    rng = np.random.default_rng(0)
    crops = (rng.normal(size=(10, 6, 6, 3)) * [1.0, 2.0, 0.5] + [0.0, 3.0, -1.0]).astype(np.float32)
    crops[:5] += 1.0  # batches differ, so averaging batch variances alone would be wrong
    model = _NormFirst()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))
    adapted = adapted_batch_stats(model, variables, crops, batch_size=4)  # batches of 4, 4, 2
    stats = adapted["batch_stats"]["BatchNorm_0"]
    flat = crops.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(stats["mean"], flat.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["var"], flat.var(0), rtol=1e-4)
    assert adapted["params"] is variables["params"]


def test_adapted_unet_is_blind_to_a_contrast_change_the_unadapted_one_sees():
    """conv(a x) is a per-channel affine map of conv(x), which batch norm with statistics of the
    same data removes: a U-Net adapted to 3x-contrast crops predicts on them what the network
    adapted to the original crops predicts on those. Without adaptation the outputs differ."""
    cfg = models.default_config("unet", 2)
    cfg.widths, cfg.norm, cfg.out_channels = (4, 8), "batch", 1
    model = models.build(cfg)
    crops = np.random.default_rng(1).normal(size=(8, 32, 32, 1)).astype(np.float32)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    predict = lambda v, x: np.asarray(model.apply(v, jnp.asarray(x), train=False)[0])  # noqa: E731
    on_original = predict(adapted_batch_stats(model, variables, crops), crops)
    on_contrast = predict(adapted_batch_stats(model, variables, 3 * crops), 3 * crops)
    np.testing.assert_allclose(on_contrast, on_original, atol=2e-3 * np.abs(on_original).max())
    assert np.abs(predict(adapted_batch_stats(model, variables, crops), 3 * crops) - on_original).max() > 0.1


def test_models_without_batch_norm_are_refused():
    cfg = models.default_config("unet", 2)
    cfg.widths = (4, 8)
    model = models.build(cfg)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
    with pytest.raises(UserError, match="needs a model with batch normalisation"):
        adapted_batch_stats(model, variables, np.zeros((2, 16, 16, 1), np.float32))


@pytest.mark.slow
def test_predict_cli_adapts_batch_norm_and_records_it(tmp_path, capsys):
    from jaxem.commands.demo import with_data_paths, write_synthetic_data
    from jaxem.config import apply_overrides, load_config
    from jaxem.infer.job import make_normalizer
    from jaxem.train.trainer import train

    config = apply_overrides(load_config("demo:tiny"), ["--config.model.norm=batch"])
    paths = write_synthetic_data(config, tmp_path / "data")
    train(with_data_paths(config, paths), tmp_path / "bn", progress=False)
    raw = paths["test"][0]  # (2, 64, 64): a 2D model's (32, 32) crops of random sections
    source = open_volume(raw)
    crops = random_crops(source, make_normalizer(source, config.data), (32, 32), 5, region=((0, 2), (8, 64), (0, 40)))
    assert crops.shape == (5, 32, 32, 1) and abs(float(crops.mean())) < 1.0

    args = ["predict", "--run", str(tmp_path / "bn"), "--input", raw, "--no-progress"]
    assert main(args + ["--output", str(tmp_path / "plain.zarr")]) == 0
    assert main(args + ["--output", str(tmp_path / "adapted.zarr"), "--adapt-batch-norm", "8"]) == 0
    plain, adapted = (open_volume(str(tmp_path / f"{n}.zarr")).read() for n in ("plain", "adapted"))
    assert plain.shape == adapted.shape and 1e-4 < np.abs(plain - adapted).max() < 1.0
    assert read_attributes(str(tmp_path / "adapted.zarr"))["jaxem_job"]["adapt_batch_norm"] == 8

    train(with_data_paths(load_config("demo:tiny"), paths), tmp_path / "gn", progress=False)  # group norm
    capsys.readouterr()
    assert main(["predict", "--run", str(tmp_path / "gn"), "--input", raw, "--output", str(tmp_path / "gn.zarr"),
                 "--adapt-batch-norm", "8", "--no-progress"]) == 2
    assert "needs a model with batch normalisation" in capsys.readouterr().err
    assert not (tmp_path / "gn.zarr").exists()
