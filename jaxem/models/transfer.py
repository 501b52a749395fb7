"""Copy a pretrained encoder's variables into a segmentation model's 'encoder' subtree, or a
pretrained network's parts (encoder, decoder; not the head) into the same parts of the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax.core import FrozenDict, unfreeze

from jaxem.errors import UserError

# The exported-encoder layout (`jaxem pretrain`, `jaxem convert-weights`): DIR/model.json + DIR/variables/,
# DIR being a pretraining workdir's encoder/ or any directory that holds them.
ENCODER_DIR, MODEL_FILE, VARIABLES_DIR = "encoder", "model.json", "variables"


def exported_encoder_dir(path: str | Path) -> Path:
    """The exported-encoder directory `path` names: `path` itself when it holds model.json, else its
    encoder/ (a pretraining workdir). Not checked to exist."""
    path = Path(path)
    return path if (path / MODEL_FILE).is_file() else path / ENCODER_DIR


def transfer_encoder(seg_variables: Mapping, encoder_variables: Mapping, encoder_only: bool = False) -> dict:
    """See jaxem.models.transfer_encoder_params. Returns a new (unfrozen) variables dict."""
    seg = _plain(seg_variables)
    source = _plain(encoder_variables)
    copied = 0
    for collection, tree in source.items():
        parts = network_parts(tree) if "encoder" in tree else {"encoder": tree}
        parts = {"encoder": parts["encoder"]} if encoder_only else parts
        for part, subtree in parts.items():
            target = seg.get(collection, {}).get(part)
            if target is None:
                raise UserError(f"the segmentation model has no {collection}/{part} subtree to copy the "
                                f"pretrained {part} into (does its config use the same model, encoder type and norm?).")
            seg[collection][part] = _copy(target, subtree, f"{collection}/{part}")
        copied += 1
    if not copied:
        raise UserError("the pretrained encoder variables are empty.")
    return seg


HEAD_PREFIXES = ("head", "aux")  # output layers: task-specific, never transferred


def network_parts(tree: Mapping) -> dict:
    """The transferable subtrees of one variable collection of a network: every top-level part but
    the output heads ({"encoder": ..., "up0": ..., "dec0": ...} as `ssl.method=mim` exports; just
    {"encoder": ...} for an encoder model's variables)."""
    return {name: sub for name, sub in tree.items() if not name.startswith(HEAD_PREFIXES)}


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
