"""Output heads: per-voxel segmentation logits and SSL projection/prediction MLPs."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxem.models import layers


def output_activation(target_kind: str) -> str:
    """'softmax' over channels for multiclass targets, otherwise 'sigmoid' per channel."""
    return "softmax" if target_kind == "multiclass" else "sigmoid"


def probabilities(target_kind: str, logits: jax.Array) -> jax.Array:
    """Model outputs as probabilities, with the activation of `output_activation(target_kind)`."""
    if output_activation(target_kind) == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    return jax.nn.sigmoid(logits)


class SegmentationHead(nn.Module):
    """1x1 conv to `out_channels` logits. (B, *S, C) any dtype -> (B, *S, out_channels) float32.

    The head runs in float32 whatever the trunk's dtype: it is cheap, and logits feed losses.
    """

    out_channels: int
    dtype: Any = jnp.float32  # accepted for a uniform signature; the head always computes in float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ones = (1,) * (x.ndim - 2)
        return layers.Conv(self.out_channels, ones, dtype=jnp.float32)(x.astype(jnp.float32))


class MLPHead(nn.Module):
    """SSL projection (SimCLR/MoCo v2) or prediction (BYOL) head: (B, D_in) -> (B, out_features).

    `layers` Dense layers; all but the last are followed by an optional BatchNorm and ReLU.
    Output float32.
    """

    hidden: int = 2048
    out_features: int = 128
    layers: int = 2
    batch_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(jnp.float32)
        for _ in range(self.layers - 1):
            x = nn.Dense(self.hidden, use_bias=not self.batch_norm)(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=layers.BATCH_NORM_MOMENTUM)(x)
            x = nn.relu(x)
        return nn.Dense(self.out_features)(x)


class DenseProjectionHead(nn.Module):
    """DenseCL's dense projection: 1x1 conv -> ReLU -> 1x1 conv at every location of a feature map.

    (B, *S, C_in) any dtype, S of rank 1-3 -> (B, *S, out_features) float32; the same weights at
    every location (the dense counterpart of a 2-layer MLPHead without batch norm).
    """

    hidden: int = 2048
    out_features: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ones = (1,) * (x.ndim - 2)
        x = nn.relu(layers.Conv(self.hidden, ones, dtype=jnp.float32)(x.astype(jnp.float32)))
        return layers.Conv(self.out_features, ones, dtype=jnp.float32)(x)


class PooledEncoder(nn.Module):
    """An encoder model ('resnet', 'vit'): encoder + global mean over space (+ optional linear head).

    __call__(x (B, *S, C_in), train) -> ((B, D) float32, {}), D = out_channels if out_channels > 0, else
    the channels of the encoder's last feature map (the embedding SSL heads build on).
    `apply(..., method='features')` returns the encoder's list of feature maps.
    """

    encoder: nn.Module
    out_channels: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
        pooled = global_mean_pool(self.encoder(x, train)[-1])
        return (nn.Dense(self.out_channels, name="head")(pooled) if self.out_channels > 0 else pooled), {}

    def features(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        return self.encoder(x, train)


def global_mean_pool(features: jax.Array) -> jax.Array:
    """(B, *S, C) any dtype -> (B, C) float32: the mean over every spatial position (or token)."""
    return jnp.mean(features.astype(jnp.float32), axis=tuple(range(1, features.ndim - 1)))
