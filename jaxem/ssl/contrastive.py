"""Contrastive pretraining of an encoder on unlabelled EM: SimCLR and MoCo v2.

    model = ContrastiveModel(encoder, MLPHead(...))      # encoder: any jaxem model's 'encoder'
    state = create_contrastive_state(model, tx, rng, input_shape, ssl_cfg)
    step = make_contrastive_step(model, ssl_cfg, two_view_fn)   # (state, batch) -> (state, metrics)

Both methods see two random views of each crop and learn embeddings in which the two views of a
crop are closer than views of other crops:
- SimCLR: both views through the same network; every other view in the global batch is a negative
  (under jit on a 'data'-sharded batch that includes the other devices' views, like an all-gather).
- MoCo v2: the second view goes through a momentum (key) encoder, an exponential moving average of
  the trained one, and the negatives are a queue of the last `queue_size` keys (the global batches
  of earlier steps), so small per-device batches still see many negatives.

The encoder's variables sit under 'encoder', exactly where every segmentation model keeps its
encoder, so `jaxem.models.transfer_encoder_params` copies them into a U-Net (or UNETR) to fine-tune.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxem.errors import UserError
from jaxem.models.heads import MLPHead, global_mean_pool
from jaxem.train.losses import moco_infonce, nt_xent, unit_vectors
from jaxem.train.state import TrainState

METHODS = ("simclr", "moco")


def default_ssl_config() -> ml_collections.ConfigDict:
    """Every `config.ssl` field with its default (MoCo v2's published settings, scaled to EM crops)."""
    return ml_collections.ConfigDict(dict(
        method="moco",           # 'moco' (v2: momentum encoder + queue) | 'simclr' (in-batch negatives)
        temperature=0.2,         # MoCo v2: 0.2; SimCLR: 0.1-0.5
        momentum=0.99,           # MoCo key encoder: key = m * key + (1 - m) * query after each step
        queue_size=4096,         # MoCo negatives; a multiple of data.batch_size
        projection_hidden=512,   # projection MLP: pooled encoder features -> hidden -> projection_dim
        projection_dim=128,
        projection_batch_norm=True,
        crop_scale=(0.3, 1.0),   # each view: a random window of this fraction of the (y, x) plane
    ))


def check_ssl_config(cfg: ml_collections.ConfigDict, batch_size: int) -> None:
    """UserError naming the `ssl` field that cannot work."""
    if cfg.method not in METHODS:
        raise UserError(f"ssl.method must be one of {', '.join(METHODS)}, got {cfg.method!r}.")
    if cfg.temperature <= 0:
        raise UserError(f"ssl.temperature must be > 0, got {cfg.temperature}.")
    if cfg.method == "moco":
        if not 0 <= cfg.momentum < 1:
            raise UserError(f"ssl.momentum must be in [0, 1), got {cfg.momentum}.")
        if cfg.queue_size <= 0 or cfg.queue_size % batch_size:
            raise UserError(f"ssl.queue_size={cfg.queue_size} must be a positive multiple of data.batch_size="
                            f"{batch_size} (the queue takes whole batches of keys), e.g. "
                            f"{max(1, cfg.queue_size // batch_size) * batch_size}.")


class ContrastiveModel(nn.Module):
    """encoder -> global mean of its last feature map -> projection MLP.

    __call__(x (B, *S, C_in) float32, train) -> (B, projection_dim) float32 embeddings.
    Variables: 'encoder' (transferable into segmentation models) and 'projector'.
    """

    encoder: nn.Module
    projector: nn.Module

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.projector(global_mean_pool(self.encoder(x, train)[-1]), train)


def build_contrastive_model(encoder: nn.Module, cfg: ml_collections.ConfigDict) -> ContrastiveModel:
    """The SSL network around `encoder` (e.g. `models.build(config.model).encoder`)."""
    projector = MLPHead(cfg.projection_hidden, cfg.projection_dim, layers=2, batch_norm=cfg.projection_batch_norm)
    return ContrastiveModel(encoder.clone(parent=None, name=None), projector)


@flax.struct.dataclass
class ContrastiveState(TrainState):
    """TrainState plus MoCo's parts. For MoCo `ema_params` is the momentum (key) encoder and
    `key_batch_stats` its normalisation statistics; `queue` (K, D) holds unit-length keys, the
    oldest at `queue_ptr`. SimCLR keeps `ema_params` = params and an unused (1, D) queue (orbax
    cannot save empty arrays)."""

    key_batch_stats: Any
    queue: jax.Array
    queue_ptr: jax.Array


def create_contrastive_state(model: ContrastiveModel, tx: optax.GradientTransformation, rng: jax.Array,
                             input_shape: tuple[int, ...], cfg: ml_collections.ConfigDict) -> ContrastiveState:
    """Initial state for inputs of `input_shape` = (B, *spatial, C); MoCo's queue starts as random
    unit vectors (as in the paper) and its key encoder as a copy of the query encoder."""
    init_rng, queue_rng, state_rng = jax.random.split(rng, 3)
    variables = model.init(init_rng, jnp.zeros(input_shape, jnp.float32), train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    size = cfg.queue_size if cfg.method == "moco" else 1
    queue = jax.random.normal(queue_rng, (size, cfg.projection_dim), jnp.float32)
    queue = unit_vectors(queue)
    return ContrastiveState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                            opt_state=tx.init(params), ema_params=params, rng=state_rng, tx=tx,
                            key_batch_stats=batch_stats, queue=queue, queue_ptr=jnp.zeros((), jnp.int32))


def _apply(model, params, batch_stats, x):
    """Train-mode forward; returns (embeddings, updated batch_stats)."""
    if not batch_stats:
        return model.apply({"params": params}, x, train=True), batch_stats
    z, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
    return z, updates["batch_stats"]


def _embedding_stats(z: jax.Array, partner: jax.Array) -> dict:
    """Collapse monitors: mean cosine of positive pairs, and the std over the batch of the unit
    embeddings averaged over dimensions (about 1/sqrt(D) when spread out, 0 when collapsed)."""
    u, p = unit_vectors(z.astype(jnp.float32)), unit_vectors(partner.astype(jnp.float32))
    return {"positive_cosine": jnp.mean(jnp.sum(u * p, axis=-1)), "embedding_std": jnp.mean(jnp.std(u, axis=0))}


def make_contrastive_step(model: ContrastiveModel, cfg: ml_collections.ConfigDict,
                          two_view_fn: Callable) -> Callable:
    """Builds `train_step(state, batch) -> (state, metrics)` for `cfg.method`.

    batch: {"image": (B, *spatial, 1) float32, ...}; the views come from `two_view_fn(rng, image)`.
    metrics: loss, accuracy (the contrastive task's top-1), positive_cosine, embedding_std, grad_norm.
    """
    check_ssl_config(cfg, 1)

    def simclr_loss(params, state, view1, view2):
        # One forward over both views: normalisation statistics see the 2N views together.
        z, batch_stats = _apply(model, params, state.batch_stats, jnp.concatenate([view1, view2]))
        z1, z2 = jnp.split(z, 2)
        loss, accuracy = nt_xent(z1, z2, cfg.temperature)
        return loss, (accuracy, batch_stats, state.key_batch_stats, z1, z2)

    def moco_loss(params, state, view1, view2):
        queries, batch_stats = _apply(model, params, state.batch_stats, view1)
        keys, key_batch_stats = _apply(model, state.ema_params, state.key_batch_stats, view2)
        keys = jax.lax.stop_gradient(keys)
        loss, accuracy = moco_infonce(queries, keys, state.queue, cfg.temperature)
        return loss, (accuracy, batch_stats, key_batch_stats, queries, keys)

    loss_fn = simclr_loss if cfg.method == "simclr" else moco_loss

    def train_step(state: ContrastiveState, batch: dict) -> tuple[ContrastiveState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        view1, view2 = two_view_fn(rng, batch["image"])
        (loss, (accuracy, batch_stats, key_batch_stats, z1, z2)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params, state, view1, view2)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = dict(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        if cfg.method == "moco":
            m = cfg.momentum
            new["ema_params"] = jax.tree.map(lambda k, q: m * k + (1.0 - m) * q, state.ema_params, params)
            new["key_batch_stats"] = key_batch_stats
            new.update(_enqueue(state.queue, state.queue_ptr, z2))
        else:
            new["ema_params"] = params
        metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.global_norm(grads),
                   **_embedding_stats(z1, z2)}
        return state.replace(**new), metrics

    return train_step


def _enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> dict:
    """The queue with the unit `keys` (N, D) written over its N oldest rows."""
    keys = unit_vectors(keys.astype(jnp.float32))
    queue = jax.lax.dynamic_update_slice(queue, keys, (ptr, jnp.zeros((), ptr.dtype)))
    return {"queue": queue, "queue_ptr": (ptr + keys.shape[0]) % queue.shape[0]}
