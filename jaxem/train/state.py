"""TrainState and the optimizer built from `config.optimizer`."""

from __future__ import annotations

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


def make_optimizer(opt_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """adamw / adam / sgd with gradient clipping and optional micro-batch accumulation."""
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    if opt_cfg.name == "adamw":
        base = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay)
    elif opt_cfg.name == "adam":
        base = optax.adam(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2)
    elif opt_cfg.name == "sgd":
        base = optax.sgd(schedule, momentum=opt_cfg.momentum, nesterov=True)
    else:
        raise UserError(f"optimizer.name={opt_cfg.name!r} is not one of adamw, adam, sgd.")
    chain = [optax.clip_by_global_norm(opt_cfg.grad_clip)] if opt_cfg.grad_clip > 0 else []
    return optax.chain(*chain, base)


def default_optimizer_config() -> ml_collections.ConfigDict:
    """Every optimizer field with a sensible default for EM segmentation."""
    return ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=1e-3, b1=0.9, b2=0.999, weight_decay=1e-4, momentum=0.9,
        schedule="warmup_cosine", warmup_steps=50, final_lr_fraction=0.01, grad_clip=1.0,
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
