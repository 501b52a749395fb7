"""TrainState (and its extensions by what semi-supervised add-ons keep: AdversarialState, the domain
discriminator; DannState, the DANN domain classifier too; RoundsState, the frozen teacher of
self-training rounds too) and the optimizer built from `config.optimizer`."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxem.errors import UserError


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; a pytree that orbax saves as is.

    `ema_params` equals `params` when EMA is off (decay 0), so the tree shape never changes.
    `rng` is the base key; each step folds in its step number, so a resumed run draws the same
    randomness as an uninterrupted one.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    def variables(self, use_ema: bool = False) -> dict:
        """The variables dict for `model.apply`."""
        variables = {"params": self.ema_params if use_ema else self.params}
        if self.batch_stats:
            variables["batch_stats"] = self.batch_stats
        return variables


@flax.struct.dataclass
class AdversarialState(TrainState):
    """TrainState plus the domain discriminator of adversarial adaptation (jaxem.semi.adversarial):
    adversary = {"params": ..., "opt_state": its Adam state}, checkpointed with the rest."""

    adversary: Any


@flax.struct.dataclass
class DannState(AdversarialState):
    """AdversarialState plus DANN's domain classifier (jaxem.semi.dann): domain_classifier =
    {"params": ..., "opt_state": its Adam state}; `adversary` is {} when that one is off. A class of
    its own so that runs without DANN keep the checkpoint layout they always had."""

    domain_classifier: Any


@flax.struct.dataclass
class RoundsState(DannState):
    """DannState plus the frozen teacher of self-training rounds (semi.rounds > 1, jaxem.semi.pseudo_label):
    round_teacher = the variables ({"params", ["batch_stats"]}) that label unlabelled crops in the
    current round; `adversary` and `domain_classifier` are {} when off."""

    round_teacher: Any


def with_add_ons(state: TrainState, adversary: dict | None = None, domain_classifier: dict | None = None,
                 round_teacher: dict | None = None) -> AdversarialState:
    """`state` carrying `adversary` (jaxem.semi.adversarial.init_adversary; None = {}, off) and, when
    given, `domain_classifier` (jaxem.semi.dann.init_domain_classifier: a DannState) and
    `round_teacher` (the first round's teacher variables: a RoundsState). Each add-on has a class of
    its own so that runs without it keep the checkpoint layout they always had."""
    fields = {name: getattr(state, name) for name in state.__dataclass_fields__}
    if round_teacher is not None:
        return RoundsState(**fields, adversary=adversary or {}, domain_classifier=domain_classifier or {},
                           round_teacher=round_teacher)
    if domain_classifier is None:
        return AdversarialState(**fields, adversary=adversary or {})
    return DannState(**fields, adversary=adversary or {}, domain_classifier=domain_classifier)


def learning_rate_schedule(opt_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """`constant`, `cosine`, `warmup_cosine` or `linear` (to 0) schedules from optax."""
    lr, warmup = opt_cfg.learning_rate, min(opt_cfg.warmup_steps, max(total_steps - 1, 0))
    name = opt_cfg.schedule
    if name == "constant":
        return optax.constant_schedule(lr) if not warmup else optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), lr * opt_cfg.final_lr_fraction)
    if name == "cosine":
        return optax.cosine_decay_schedule(lr, max(total_steps, 1), opt_cfg.final_lr_fraction)
    if name == "linear":
        return optax.linear_schedule(lr, lr * opt_cfg.final_lr_fraction, max(total_steps, 1))
    raise UserError(f"optimizer.schedule={name!r} is not one of constant, cosine, warmup_cosine, linear.")


def make_optimizer(opt_cfg: ml_collections.ConfigDict, total_steps: int,
                   train_cfg: ml_collections.ConfigDict | None = None) -> optax.GradientTransformation:
    """adamw / adam / sgd with gradient clipping; with `train_cfg` also the fine-tuning controls.

    The fine-tuning controls (`train.llrd`, `train.freeze_encoder_steps`,
    `optimizer.encoder_lr_scale`; see `encoder_controls`) apply when `train_cfg` is given (supervised
    training; pretraining passes none). When they are all off the optimizer is exactly the plain
    one. When one is on, the optimizer state is still the plain optimizer's tree (the controls keep
    no state of their own), so a run resumes whatever values they had before.
    """
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    if opt_cfg.name == "adamw":
        base = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay)
    elif opt_cfg.name == "adam":
        base = optax.adam(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2)
    elif opt_cfg.name == "sgd":
        base = optax.sgd(schedule, momentum=opt_cfg.momentum, nesterov=True)
    else:
        raise UserError(f"optimizer.name={opt_cfg.name!r} is not one of adamw, adam, sgd.")
    controls = encoder_controls(opt_cfg, train_cfg, total_steps)
    if controls is not None:
        return _with_encoder_controls(base, opt_cfg.grad_clip, controls)
    chain = [optax.clip_by_global_norm(opt_cfg.grad_clip)] if opt_cfg.grad_clip > 0 else []
    return optax.chain(*chain, base)


# --- fine-tuning a pretrained encoder: LLRD, freezing, encoder learning rate ----------------------

ENCODER = "encoder"  # the params subtree every model with an encoder holds it under (jaxem.models)


@dataclasses.dataclass(frozen=True)
class EncoderControls:
    """The per-parameter learning-rate controls of fine-tuning (see `encoder_controls`)."""

    llrd: float = 1.0
    freeze_steps: int = 0
    lr_scale: float = 1.0
    thaw_warmup: int = 0

    def fields_set(self) -> str:
        """The config fields that turned the controls on, for error messages."""
        names = [f"train.llrd={self.llrd}" if self.llrd != 1.0 else "",
                 f"train.freeze_encoder_steps={self.freeze_steps}" if self.freeze_steps else "",
                 f"optimizer.encoder_lr_scale={self.lr_scale}" if self.lr_scale != 1.0 else ""]
        return ", ".join(n for n in names if n)

    def gate(self, count: jax.Array) -> jax.Array:
        """The encoder's learning-rate factor at optimizer update `count` (0 while frozen, then a
        linear ramp over `thaw_warmup` updates: 1/W, 2/W, ..., 1)."""
        count = jnp.asarray(count, jnp.float32)
        if self.freeze_steps == 0:
            return jnp.ones((), jnp.float32)
        thawed = count - self.freeze_steps + 1  # 1 at the first update after the frozen ones
        ramp = jnp.minimum(thawed / self.thaw_warmup, 1.0) if self.thaw_warmup > 0 else 1.0
        return jnp.where(encoder_frozen(self.freeze_steps, count), 0.0, ramp).astype(jnp.float32)


def encoder_controls(opt_cfg: ml_collections.ConfigDict, train_cfg: ml_collections.ConfigDict | None,
                     total_steps: int) -> EncoderControls | None:
    """The validated fine-tuning controls, or None when they are all off (or `train_cfg` is None).

    - `train.llrd` (layer-wise learning-rate decay, BEiT/MAE fine-tuning), in (0, 1], 1 = off: the
      encoder's layers are numbered i = 0 (the input side: stem, patch and position embeddings) to
      L - 1 (the deepest level or transformer block); everything outside the encoder (decoder,
      heads) is layer L. Layer i learns at lr x llrd^(L - i): the deepest encoder layer at
      lr x llrd, the embeddings at lr x llrd^L, the decoder at lr. See `encoder_layers` for the
      numbering of each model.
    - `train.freeze_encoder_steps` N (0 = off, -1 = the whole run): the encoder's updates are exactly
      zero for the first N optimizer updates (weight decay included), and its gradients are left
      out of the global norm that `optimizer.grad_clip` clips. Then its learning rate ramps up
      linearly over `optimizer.warmup_steps` updates (1/W, 2/W, ..., 1; none when 0), so a thawing
      encoder does not jump. Adam's moment estimates keep tracking the frozen encoder's gradients,
      so it thaws with real statistics (no bias-correction jump). The train step also keeps the
      encoder's batch-norm statistics fixed while frozen (jaxem.train.supervised).
    - `optimizer.encoder_lr_scale` s > 0: the encoder learns at s x the schedule's rate (times the
      LLRD factor); the decoder at the schedule's rate.

    All three are multipliers of the base optimizer's update (adamw's decoupled weight decay
    included, as a per-group learning rate in PyTorch/BEiT would be), so they follow the schedule.
    """
    lr_scale = float(opt_cfg.get("encoder_lr_scale", 1.0))
    if not lr_scale > 0:
        raise UserError(f"optimizer.encoder_lr_scale={lr_scale} must be > 0 (a multiplier of optimizer.learning_rate "
                        f"for the encoder; to keep the encoder fixed use train.freeze_encoder_steps=-1).")
    if train_cfg is None:
        if lr_scale != 1.0:
            raise UserError(f"optimizer.encoder_lr_scale={lr_scale} applies to fine-tuning (jaxem train) only; "
                            f"pretraining trains the encoder alone: leave it at 1.")
        return None
    llrd = train_cfg.get("llrd", 1.0)
    if isinstance(llrd, bool) or not isinstance(llrd, (int, float)) or not 0.0 < llrd <= 1.0:
        raise UserError(f"train.llrd={llrd!r} must be a number in (0, 1] (layer-wise learning-rate decay of the "
                        f"encoder; 1 = off, 0.65-0.9 are usual).")
    freeze = train_cfg.get("freeze_encoder_steps", 0)
    if isinstance(freeze, bool) or not isinstance(freeze, int) or freeze < -1:
        raise UserError(f"train.freeze_encoder_steps={freeze!r} must be an integer >= -1 (steps without encoder "
                        f"updates; 0 = off, -1 = the whole run).")
    if llrd == 1.0 and freeze == 0 and lr_scale == 1.0:
        return None
    warmup = min(int(opt_cfg.warmup_steps), max(total_steps - 1, 0))
    return EncoderControls(float(llrd), int(freeze), lr_scale, warmup)


def hold_frozen_batch_stats(train_cfg: ml_collections.ConfigDict) -> bool:
    """`train.freeze_encoder_batch_stats`: whether a frozen encoder (`train.freeze_encoder_steps`)
    also keeps its batch-norm running statistics (True, the default), or they keep tracking the
    training crops while its weights stay fixed (False: AdaBN, for an encoder whose statistics were
    gathered on other inputs, e.g. a random initialisation's or masked pretraining crops')."""
    hold = train_cfg.get("freeze_encoder_batch_stats", True)
    if not isinstance(hold, bool):
        raise UserError(f"train.freeze_encoder_batch_stats={hold!r} must be True (a frozen encoder keeps its "
                        f"batch-norm statistics) or False (they keep tracking the training data).")
    return hold


_EMBEDDING_WORDS = ("pos", "position", "posemb", "cls", "token", "tokens")


def _is_embedding(name: str) -> bool:
    """Whether an encoder entry's name says it is an embedding (patch/position embedding, a class
    or register token): any '_'-separated word containing 'embed', or one of _EMBEDDING_WORDS."""
    words = name.lower().split("_")
    return any("embed" in w or w in _EMBEDDING_WORDS for w in words)


def encoder_layers(encoder_params) -> tuple[dict[str, int], int]:
    """({top-level name in the encoder's params: its layer}, number of encoder layers L).

    Layers count from the input side (the numbering `train.llrd` decays by), per model:
    - U-Net conv encoder (`level0` ... `level{n-1}`): level k is layer k; L = n (level 0, the
      full-resolution block, is the stem).
    - ResNet encoder (U-Net with model.encoder='resnet', or the 'resnet' model: `stem`,
      `level{k}_block{j}`): the stem is layer 0, every block of level k is layer k + 1; L = n + 1.
    - ViT (UNETR, the 'vit' model: `patch_embed`, `block0` ... `block{D-1}`, `final_norm`): the patch
      embedding is layer 0, block i is layer i + 1 (as in BEiT/MAE); L = D + 1.
    Any other top-level entry is layer 0 when its name says it is an embedding (`pos_embed`,
    `cls_token`, ...: see `_is_embedding`), otherwise layer L - 1 with the deepest layer (ViT's
    `final_norm`, a neck). UserError when none of the layered names is present.
    """
    names = list(encoder_params)
    matches = {pattern: {n: int(m[1]) for n in names if (m := re.fullmatch(pattern, n))}
               for pattern in (r"block(\d+)", r"level(\d+)_block\d+", r"level(\d+)")}
    vit, resnet, conv = matches.values()
    if vit or resnet:  # an input layer (patch embedding / stem) below the blocks
        known = {n: k + 1 for n, k in (vit or resnet).items()}
    elif conv:
        known = dict(conv)
    else:
        raise UserError(f"train.llrd needs an encoder whose layers jaxem knows (U-Net levels `level<k>`, ResNet "
                        f"stages `level<k>_block<j>`, ViT blocks `block<i>`); this model's encoder has {sorted(names)}.")
    num_layers = max(known.values()) + 1
    return {n: known.get(n, 0 if n == "stem" or _is_embedding(n) else num_layers - 1) for n in names}, num_layers


def _key_name(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


def encoder_lr_multipliers(params, controls: EncoderControls) -> Any:
    """A tree like `params` of Python floats: lr_scale x llrd^(L - layer) on encoder leaves, None
    elsewhere. UserError when the model has no 'encoder' subtree."""
    if not (hasattr(params, "keys") and ENCODER in params):
        raise UserError(f"{controls.fields_set()} set, but the model has no '{ENCODER}' parameters "
                        f"(top level: {sorted(params) if hasattr(params, 'keys') else type(params).__name__}).")
    layers, num_layers = encoder_layers(params[ENCODER]) if controls.llrd != 1.0 else ({}, 0)

    def multiplier(path, _):
        if not path or _key_name(path[0]) != ENCODER:
            return None
        layer = layers.get(_key_name(path[1]), num_layers) if len(path) > 1 else num_layers
        return controls.lr_scale * controls.llrd ** (num_layers - layer)

    return jax.tree_util.tree_map_with_path(multiplier, params)


def _schedule_count(base_state) -> jax.Array:
    """The number of updates applied so far: the count of the base optimizer's learning-rate schedule
    (every optimizer make_optimizer builds has one, since its learning rate is a schedule)."""
    counts = [s.count for s in jax.tree.leaves(base_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
              if isinstance(s, optax.ScaleByScheduleState)]
    if len(counts) != 1:
        raise ValueError(f"expected one ScaleByScheduleState in the optimizer state, found {len(counts)}")
    return counts[0]


def _with_encoder_controls(base: optax.GradientTransformation, grad_clip: float,
                           controls: EncoderControls) -> optax.GradientTransformation:
    """`chain(clip_by_global_norm(grad_clip), base)` (or `base` alone without clipping), whose
    encoder updates are multiplied per leaf by `encoder_lr_multipliers` x `controls.gate(count)`.

    The state is that chain's state, unchanged in structure: the update count comes from the base
    optimizer's schedule. While the encoder is frozen its gradients are left out of the clipping
    norm (all gradients are still scaled by the clip factor, so Adam's statistics stay consistent)
    and its updates are exactly zero.
    """
    clip = optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else None

    def init(params):
        encoder_lr_multipliers(params, controls)  # validates the model (UserError before any step)
        return (clip.init(params), base.init(params)) if clip else (base.init(params),)

    def update(updates, state, params=None):
        base_state = state[-1]
        multipliers = encoder_lr_multipliers(updates, controls)
        gate = controls.gate(_schedule_count(base_state))
        if clip is not None:
            counted = jax.tree.map(lambda g, m: g if m is None else jnp.where(gate > 0, g, jnp.zeros_like(g)),
                                   updates, multipliers, is_leaf=lambda x: x is None)
            norm = optax.tree.norm(counted)
            trigger = jnp.squeeze(norm < grad_clip)
            updates = jax.tree.map(lambda t: jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * grad_clip), updates)
        updates, base_state = base.update(updates, base_state, params)

        def scale(u, m):
            if m is None:
                return u
            return jnp.where(gate > 0, u * (m * gate).astype(u.dtype), jnp.zeros_like(u))

        updates = jax.tree.map(scale, updates, multipliers, is_leaf=lambda x: x is None)
        return updates, (*state[:-1], base_state)

    return optax.GradientTransformation(init, update)


def encoder_frozen(freeze_encoder_steps: int, step: jax.Array) -> jax.Array:
    """Whether the encoder is frozen at train step `step` (`train.freeze_encoder_steps`)."""
    if freeze_encoder_steps == -1:
        return jnp.ones((), bool)
    return jnp.asarray(step) < freeze_encoder_steps


def default_optimizer_config() -> ml_collections.ConfigDict:
    """Every optimizer field with a sensible default for EM segmentation."""
    return ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=1e-3, b1=0.9, b2=0.999, weight_decay=1e-4, momentum=0.9,
        schedule="warmup_cosine", warmup_steps=50, final_lr_fraction=0.01, grad_clip=1.0,
        # Fine-tuning (jaxem train): the encoder learns at encoder_lr_scale x the schedule's rate
        # (x the train.llrd factor of its layer); the decoder at the schedule's rate. 1 = same rate.
        encoder_lr_scale=1.0,
    ))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       input_shape: tuple[int, ...]) -> TrainState:
    """Initialises params (and batch_stats) for inputs of `input_shape` = (B, *spatial, C)."""
    init_rng, state_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros(input_shape, jnp.float32), train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        ema_params=params,
        rng=state_rng,
        tx=tx,
    )


def parameter_count(params) -> int:
    """Number of scalars in a parameter tree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
