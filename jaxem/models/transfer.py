"""Copy a pretrained encoder's variables into a segmentation model's 'encoder' subtree."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax.core import FrozenDict, unfreeze

from jaxem.errors import UserError


def transfer_encoder(seg_variables: Mapping, encoder_variables: Mapping) -> dict:
    """See jaxem.models.transfer_encoder_params. Returns a new (unfrozen) variables dict."""
    seg = _plain(seg_variables)
    source = _plain(encoder_variables)
    copied = 0
    for collection, tree in source.items():
        tree = tree.get("encoder", tree)
        target = seg.get(collection, {}).get("encoder")
        if target is None:
            raise UserError(f"the segmentation model has no {collection}/encoder subtree to copy the "
                            f"pretrained encoder into (does its config use the same encoder type and norm?).")
        seg[collection]["encoder"] = _copy(target, tree, f"{collection}/encoder")
        copied += 1
    if not copied:
        raise UserError("the pretrained encoder variables are empty.")
    return seg


def _plain(variables: Mapping) -> dict:
    variables = unfreeze(variables) if isinstance(variables, FrozenDict) else variables
    return jax.tree.map(lambda a: a, dict(variables))


def _copy(target: Any, source: Any, path: str) -> Any:
    """`source` laid onto `target`: the same keys and shapes, else a UserError naming the path."""
    if isinstance(target, Mapping):
        if not isinstance(source, Mapping) or set(source) != set(target):
            have = sorted(source) if isinstance(source, Mapping) else type(source).__name__
            raise UserError(f"pretrained encoder does not match at {path}: it has {have}, the model "
                            f"expects {sorted(target)} (do both configs agree on widths, depth/blocks, "
                            f"kernels, pooling and norm?).")
        return {k: _copy(target[k], source[k], f"{path}/{k}") for k in target}
    if np.shape(source) != np.shape(target):
        raise UserError(f"pretrained encoder parameter {path} has shape {np.shape(source)}, the model "
                        f"expects {np.shape(target)} (do both configs agree on widths, kernels and in_channels?).")
    return jax.numpy.asarray(source, dtype=target.dtype)
