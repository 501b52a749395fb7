"""Contrastive pretraining of an encoder on unlabelled EM: SimCLR, MoCo v2 and DenseCL.

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
- DenseCL (Wang et al. 2021): MoCo v2 plus a dense projection head (1x1 convolutions) on the
  encoder's last feature map. Each query location is paired with the key location whose *encoder*
  features are the most similar (no crop geometry needed), and must pick that key's dense vector
  against a second queue of globally pooled dense keys; loss = (1 - w) global + w dense,
  w = `dense_weight`.

The encoder's variables sit under 'encoder', exactly where every segmentation model keeps its
encoder, so `jaxem.models.transfer_encoder_params` copies them into a U-Net (or UNETR) to fine-tune.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxem.errors import UserError
from jaxem.models.heads import DenseProjectionHead, MLPHead, global_mean_pool
from jaxem.train.losses import dense_infonce, match_locations, moco_infonce, nt_xent, unit_vectors
from jaxem.train.state import TrainState

METHODS = ("simclr", "moco", "densecl", "mim", "mae")  # mim: jaxem.ssl.masked (whole network); mae: jaxem.ssl.mae
MOMENTUM_METHODS = ("moco", "densecl")  # a key encoder and a queue of keys


def default_ssl_config() -> ml_collections.ConfigDict:
    """Every `config.ssl` field with its default (MoCo v2's published settings, scaled to EM crops)."""
    return ml_collections.ConfigDict(dict(
        method="moco",           # 'moco' (v2: momentum encoder + queue) | 'simclr' (in-batch negatives)
                                 # | 'densecl' (MoCo v2 + a dense per-location loss)
                                 # | 'mim' (masked image modelling of the whole network, jaxem.ssl.masked)
                                 # | 'mae' (masked autoencoder of a ViT encoder, jaxem.ssl.mae)
        temperature=0.2,         # MoCo v2: 0.2; SimCLR: 0.1-0.5
        momentum=0.99,           # MoCo key encoder: key = m * key + (1 - m) * query after each step
        queue_size=4096,         # MoCo negatives; a multiple of data.batch_size
        projection_hidden=512,   # projection MLP: pooled encoder features -> hidden -> projection_dim
        projection_dim=128,
        projection_batch_norm=True,
        crop_scale=(0.3, 1.0),   # each view: a random window of this fraction of the (y, x) plane
        dense_weight=0.5,        # DenseCL: loss = (1 - w) * global + w * dense (the paper's lambda)
        mask_ratio=0.6,          # mim: fraction of mask_patch patches hidden per crop; mae: fraction of the
                                 # ViT's patch tokens dropped (configs/pretrain.py:mae sets the paper's 0.75)
        mask_patch=(16,),        # mim: patch size in voxels: (in-plane,) with 1 section in z for 3D, or one per axis
        mask_loss="masked",      # mim: 'masked' (MSE on hidden pixels, as MAE/SparK) | 'all'
        noise_std=0.0,           # mim: Gaussian noise on every input pixel (denoising), in normalised units
        decoder_dim=128,         # mae: width of the light transformer decoder
        decoder_depth=2,         # mae: its blocks
        decoder_heads=4,         # mae: its attention heads (decoder_dim must be a multiple)
        norm_pix_loss=True,      # mae: targets are each patch's pixels normalised to zero mean, unit variance
        # Linear probe (jaxem.ssl.probe), every train.eval_every steps: a ridge regression from the
        # frozen encoder's features to config.target, fitted on half the probe crops, scored on half.
        probe_images=(),         # image volumes with labels; () = no probe (jaxem pretrain on synthetic data fills both)
        probe_labels=(),         # one instance-label volume per probe image, like data.train_labels
        probe_crops=16,          # fixed crops of data.crop_shape, evenly spaced tiles of the probe volumes
        probe_pixels=2048,       # fixed pixels per crop at which features are read
        probe_ridge=1e-3,        # ridge lambda, on standardised features
    ))


def check_ssl_config(cfg: ml_collections.ConfigDict, batch_size: int) -> None:
    """UserError naming the `ssl` field that cannot work."""
    if cfg.method not in METHODS:
        raise UserError(f"ssl.method must be one of {', '.join(METHODS)}, got {cfg.method!r}.")
    if cfg.temperature <= 0:
        raise UserError(f"ssl.temperature must be > 0, got {cfg.temperature}.")
    if cfg.method == "densecl" and not 0 <= cfg.dense_weight <= 1:
        raise UserError(f"ssl.dense_weight must be in [0, 1] (loss = (1 - w) * global + w * dense), "
                        f"got {cfg.dense_weight}.")
    if cfg.method in MOMENTUM_METHODS:
        if not 0 <= cfg.momentum < 1:
            raise UserError(f"ssl.momentum must be in [0, 1), got {cfg.momentum}.")
        if cfg.queue_size <= 0 or cfg.queue_size % batch_size:
            raise UserError(f"ssl.queue_size={cfg.queue_size} must be a positive multiple of data.batch_size="
                            f"{batch_size} (the queue takes whole batches of keys), e.g. "
                            f"{max(1, cfg.queue_size // batch_size) * batch_size}.")


class Embeddings(NamedTuple):
    """What a ContrastiveModel with a dense head returns (all float32 but `features`)."""

    pooled: jax.Array    # (B, projection_dim): the global embedding
    dense: jax.Array     # (B, *S, projection_dim): the dense head at every location of the last map
    features: jax.Array  # (B, *S, C): the encoder's last feature map (DenseCL matches on it)


class ContrastiveModel(nn.Module):
    """encoder -> global mean of its last feature map -> projection MLP (and, for DenseCL, a dense
    projection head on the same map).

    __call__(x (B, *S_in, C_in) float32, train) -> (B, projection_dim) float32 embeddings, or with
    `dense_projector` an `Embeddings` (pooled, dense, features) with S the last map's spatial shape.
    Variables: 'encoder' (transferable into segmentation models), 'projector', 'dense_projector'.
    """

    encoder: nn.Module
    projector: nn.Module
    dense_projector: nn.Module | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | Embeddings:
        features = self.encoder(x, train)[-1]
        pooled = self.projector(global_mean_pool(features), train)
        if self.dense_projector is None:
            return pooled
        return Embeddings(pooled, self.dense_projector(features), features)


def build_contrastive_model(encoder: nn.Module, cfg: ml_collections.ConfigDict) -> ContrastiveModel:
    """The SSL network around `encoder` (e.g. `models.build(config.model).encoder`)."""
    projector = MLPHead(cfg.projection_hidden, cfg.projection_dim, layers=2, batch_norm=cfg.projection_batch_norm)
    dense = DenseProjectionHead(cfg.projection_hidden, cfg.projection_dim) if cfg.method == "densecl" else None
    return ContrastiveModel(encoder.clone(parent=None, name=None), projector, dense)


@flax.struct.dataclass
class ContrastiveState(TrainState):
    """TrainState plus MoCo's parts. For MoCo and DenseCL `ema_params` is the momentum (key)
    encoder and `key_batch_stats` its normalisation statistics; `queue` (K, D) holds unit-length
    keys, the oldest at `queue_ptr`; DenseCL's `dense_queue` (K, D) holds its pooled dense keys,
    written in step with `queue` (same pointer). SimCLR keeps `ema_params` = params; unused queues
    are (1, D) (orbax cannot save empty arrays)."""

    key_batch_stats: Any
    queue: jax.Array
    queue_ptr: jax.Array
    dense_queue: jax.Array


def create_contrastive_state(model: ContrastiveModel, tx: optax.GradientTransformation, rng: jax.Array,
                             input_shape: tuple[int, ...], cfg: ml_collections.ConfigDict) -> ContrastiveState:
    """Initial state for inputs of `input_shape` = (B, *spatial, C); MoCo's (and DenseCL's) queues
    start as random unit vectors (as in the papers) and the key encoder as a copy of the query one."""
    init_rng, queue_rng, state_rng = jax.random.split(rng, 3)
    variables = model.init(init_rng, jnp.zeros(input_shape, jnp.float32), train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    size = cfg.queue_size if cfg.method in MOMENTUM_METHODS else 1
    queue = _random_queue(queue_rng, size, cfg.projection_dim)
    dense_queue = (_random_queue(jax.random.fold_in(queue_rng, 1), size, cfg.projection_dim)
                   if cfg.method == "densecl" else jnp.zeros((1, cfg.projection_dim), jnp.float32))
    return ContrastiveState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                            opt_state=tx.init(params), ema_params=params, rng=state_rng, tx=tx,
                            key_batch_stats=batch_stats, queue=queue, queue_ptr=jnp.zeros((), jnp.int32),
                            dense_queue=dense_queue)


def _random_queue(rng: jax.Array, size: int, dim: int) -> jax.Array:
    """(size, dim) float32 random unit vectors: a queue before any keys were written."""
    return unit_vectors(jax.random.normal(rng, (size, dim), jnp.float32))


def train_mode_apply(model, params, batch_stats, x):
    """Train-mode forward; returns (outputs, updated batch_stats) (`batch_stats` as is without norm statistics)."""
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
    metrics: loss, accuracy (the contrastive task's top-1), positive_cosine, embedding_std, grad_norm;
    DenseCL adds loss_global, loss_dense (before weighting) and dense_accuracy.
    """
    check_ssl_config(cfg, 1)

    def simclr_loss(params, state, view1, view2):
        # One forward over both views: normalisation statistics see the 2N views together.
        z, batch_stats = train_mode_apply(model, params, state.batch_stats, jnp.concatenate([view1, view2]))
        z1, z2 = jnp.split(z, 2)
        loss, accuracy = nt_xent(z1, z2, cfg.temperature)
        return loss, ({"accuracy": accuracy}, batch_stats, state.key_batch_stats, z1, z2, {})

    def moco_loss(params, state, view1, view2):
        queries, batch_stats = train_mode_apply(model, params, state.batch_stats, view1)
        keys, key_batch_stats = train_mode_apply(model, state.ema_params, state.key_batch_stats, view2)
        keys = jax.lax.stop_gradient(keys)
        if cfg.method == "densecl":
            loss, metrics, enqueue = _densecl_loss(queries, keys, state, cfg)
            queries, keys = queries.pooled, keys.pooled
        else:
            loss, accuracy = moco_infonce(queries, keys, state.queue, cfg.temperature)
            metrics, enqueue = {"accuracy": accuracy}, {"queue": keys}
        return loss, (metrics, batch_stats, key_batch_stats, queries, keys, enqueue)

    loss_fn = simclr_loss if cfg.method == "simclr" else moco_loss

    def train_step(state: ContrastiveState, batch: dict) -> tuple[ContrastiveState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        view1, view2 = two_view_fn(rng, batch["image"])
        (loss, (task_metrics, batch_stats, key_batch_stats, z1, z2, enqueue)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params, state, view1, view2)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = dict(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        if cfg.method in MOMENTUM_METHODS:
            m = cfg.momentum
            new["ema_params"] = jax.tree.map(lambda k, q: m * k + (1.0 - m) * q, state.ema_params, params)
            new["key_batch_stats"] = key_batch_stats
            new.update(_enqueue(state, enqueue))
        else:
            new["ema_params"] = params
        metrics = {"loss": loss, **task_metrics, "grad_norm": optax.global_norm(grads), **_embedding_stats(z1, z2)}
        return state.replace(**new), metrics

    return train_step


def _densecl_loss(queries: Embeddings, keys: Embeddings, state: ContrastiveState,
                  cfg: ml_collections.ConfigDict) -> tuple[jax.Array, dict, dict]:
    """DenseCL's loss (1 - w) * global + w * dense for the query and (constant) key embeddings of
    the two views; returns (loss, metrics, {queue field: keys to enqueue (B, D)})."""
    global_loss, accuracy = moco_infonce(queries.pooled, keys.pooled, state.queue, cfg.temperature)
    match = match_locations(queries.features, keys.features)
    dense_loss, dense_accuracy = dense_infonce(queries.dense, keys.dense, match, state.dense_queue, cfg.temperature)
    w = cfg.dense_weight
    metrics = {"accuracy": accuracy, "loss_global": global_loss, "loss_dense": dense_loss,
               "dense_accuracy": dense_accuracy}
    enqueue = {"queue": keys.pooled, "dense_queue": global_mean_pool(keys.dense)}
    return (1.0 - w) * global_loss + w * dense_loss, metrics, enqueue


def _enqueue(state: ContrastiveState, keys: dict) -> dict:
    """New values of the queues named in `keys` ({field: (N, D) keys}, e.g. {"queue": ...}) with the
    unit keys written over their N oldest rows, and of the shared `queue_ptr`."""
    ptr = state.queue_ptr
    new = {name: _write_rows(getattr(state, name), ptr, k) for name, k in keys.items()}
    n, size = next(iter(keys.values())).shape[0], state.queue.shape[0]
    return {**new, "queue_ptr": (ptr + n) % size}


def _write_rows(queue: jax.Array, ptr: jax.Array, keys: jax.Array) -> jax.Array:
    """`queue` (K, D) with the unit `keys` (N, D) written at rows ptr .. ptr + N - 1."""
    keys = unit_vectors(keys.astype(jnp.float32))
    return jax.lax.dynamic_update_slice(queue, keys, (ptr, jnp.zeros((), ptr.dtype)))
