"""Test-time adaptation of batch normalisation (AdaBN, Li et al. 2016) to the volume being predicted.

A network trained with batch norm normalises each layer with the mean and variance it saw on the
training EM. On EM from another microscope or staining those statistics are off, and so are the
predictions. `adapted_batch_stats` replaces every batch-norm layer's running statistics by those of
the new volume: random crops of it are run through the network in train mode (each layer
normalised with the crops' own statistics), and each layer's mean and variance are pooled over all
crops. Nothing is trained; parameters are untouched. `jaxem predict --adapt-batch-norm N` uses it.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxem.data.volume import Volume
from jaxem.errors import UserError
from jaxem.models.layers import BATCH_NORM_MOMENTUM


def random_crops(source: Volume, normalize, crop_shape: Sequence[int], count: int, seed: int = 0,
                 region: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """`count` normalised crops (count, *crop_shape, 1) float32 at random places of `source`'s
    `region` (default all of it); a 2D crop shape on a 3D volume takes (y, x) crops of random sections."""
    shape = tuple(s for s, a in zip(source.shape, source.axes) if a in "zyx")
    region = tuple(region or [(0, s) for s in shape])
    crop = (1,) * (len(shape) - len(crop_shape)) + tuple(crop_shape)
    if any(c > b - a for c, (a, b) in zip(crop, region)):
        raise UserError(f"--adapt-batch-norm takes crops of the training crop shape {tuple(crop_shape)}, larger than "
                        f"the region {tuple(b - a for a, b in region)} of {source.path}.")
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        start = [int(rng.integers(a, b - c + 1)) for c, (a, b) in zip(crop, region)]
        box = tuple(slice(o, o + c) for o, c in zip(start, crop))
        crops.append(normalize(source.read(box)).reshape(tuple(crop_shape)))
    return np.stack(crops)[..., None]


def adapted_batch_stats(model, variables: dict, crops: np.ndarray, batch_size: int = 8, seed: int = 0) -> dict:
    """`variables` with every batch-norm layer's running mean and variance replaced by their pooled
    values over `crops` (N, *spatial, C): mean = E[x], var = E[x^2] - E[x]^2 over all crops' voxels,
    each layer fed the outputs of the layers before it in train mode. UserError without batch norm."""
    if not variables.get("batch_stats"):
        raise UserError("--adapt-batch-norm needs a model with batch normalisation (model.norm='batch'); "
                        "this one has none.")
    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])

    @jax.jit
    def batch_moments(x, rng):
        # From zero running statistics one update leaves (1 - momentum) * the batch's own statistics.
        _, updates = model.apply({"params": variables["params"], "batch_stats": zeros}, x, train=True,
                                 mutable=["batch_stats"], rngs={"dropout": rng})
        stats = jax.tree.map(lambda s: s / (1.0 - BATCH_NORM_MOMENTUM), updates["batch_stats"])
        return jax.tree_util.tree_map_with_path(_second_moment, stats, is_leaf=_is_mean_var)

    sums, total = None, 0
    for i, start in enumerate(range(0, len(crops), batch_size)):
        x = jnp.asarray(crops[start:start + batch_size])
        moments = jax.tree.map(lambda m: m * x.shape[0], batch_moments(x, jax.random.key(seed + i)))
        sums = moments if sums is None else jax.tree.map(jnp.add, sums, moments)
        total += x.shape[0]
    means = jax.tree.map(lambda s: s / total, sums)
    pooled = jax.tree_util.tree_map_with_path(_variance, means, is_leaf=_is_mean_var)
    return {**variables, "batch_stats": pooled}


def _is_mean_var(node) -> bool:
    return isinstance(node, dict) and set(node) == {"mean", "var"}


def _second_moment(_, stats: dict) -> dict:
    """A batch-norm layer's {mean, var} -> {mean: E[x], var: E[x^2]}."""
    return {"mean": stats["mean"], "var": stats["var"] + stats["mean"] ** 2}


def _variance(_, moments: dict) -> dict:
    """{mean: E[x], var: E[x^2]} pooled over crops -> {mean, var = E[x^2] - E[x]^2}."""
    return {"mean": moments["mean"], "var": jnp.maximum(moments["var"] - moments["mean"] ** 2, 0.0)}
