"""Pure train and eval steps for dense supervised segmentation.

`train_step(state, batch) -> (state, metrics)`: augment on device, build targets from the
augmented labels, forward/backward (optionally over micro-batches), optimizer update, EMA.
The loop jits it with explicit shardings; nothing here does IO or reads the clock.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxem.models.heads import probabilities
from jaxem.train.losses import segmentation_loss
from jaxem.train.state import ENCODER, TrainState, encoder_frozen

Batch = dict[str, jax.Array]


def _deep_supervision_loss(loss_cfg, aux_logits, target, target_mask):
    """Aux outputs are upsampled to full size and weighted 1/2, 1/4, ... (as in nnU-Net)."""
    total = 0.0
    for i, aux in enumerate(aux_logits):
        aux = jax.image.resize(aux, aux.shape[:1] + target.shape[1:-1] + aux.shape[-1:], "linear")
        total = total + 0.5 ** (i + 1) * segmentation_loss(loss_cfg, aux, target, target_mask)[0]
    return total


def make_train_step(model, loss_cfg: ml_collections.ConfigDict, augment_fn: Callable, target_fn: Callable,
                    ema_decay: float = 0.0, accumulate_steps: int = 1, semi_cfg: ml_collections.ConfigDict | None = None,
                    target_kind: str = "boundary", freeze_encoder_steps: int = 0) -> Callable:
    """Builds `train_step(state, batch) -> (state, metrics)` for a model and a target kind.

    batch: {"image": (B, *spatial, 1) float32, "labels": (B, *spatial) int32, "mask": (B, *spatial)}.
    With `accumulate_steps` k > 1 the batch is split into k micro-batches whose gradients are
    averaged (one optimizer update per step, k times less activation memory). With a `semi_cfg`
    that turns on learning from unlabelled crops (jaxem.semi.unlabelled) the batch also holds
    "unlabelled" crops (B_u, *spatial, 1), and the loss a mean-teacher consistency term against
    `ema_params` (semi.weight > 0), an output-space adversarial term against the discriminator in
    `state.adversary` (semi.adversarial_weight > 0, jaxem.semi.adversarial), or both.
    While the encoder is frozen (`freeze_encoder_steps`, train.freeze_encoder_steps: the first N
    steps, -1 = all) its batch-norm statistics keep their values; the optimizer (make_optimizer with
    the train config) keeps its parameters. Inside the frozen encoder, train-mode batch norm still
    normalises with each batch's own statistics.
    """
    from jaxem.semi import adversarial, mean_teacher, unlabelled

    semi = unlabelled.enabled(semi_cfg)
    teacher_on, adversary_on = unlabelled.mean_teacher_on(semi_cfg), unlabelled.adversarial_on(semi_cfg)
    disc = adversarial.discriminator(semi_cfg) if adversary_on else None

    def forward(params, batch_stats, image, rng):
        """Train-mode outputs and the updated batch statistics."""
        variables = {"params": params}
        if not batch_stats:
            return model.apply(variables, image, train=True, rngs={"dropout": rng}), batch_stats
        variables["batch_stats"] = batch_stats
        outputs, updates = model.apply(variables, image, train=True, mutable=["batch_stats"], rngs={"dropout": rng})
        return outputs, updates["batch_stats"]

    def loss_fn(params, batch_stats, image, target, target_mask, rng, semi_inputs=None):
        """(loss, (loss parts, batch_stats, (source, target) probabilities when semi else ()))."""
        outputs, batch_stats = forward(params, batch_stats, image, rng)
        logits, aux = outputs
        aux = aux.get("deep_supervision", [])
        loss, parts = segmentation_loss(loss_cfg, logits, target, target_mask)
        if aux:
            parts["loss_deep_supervision"] = _deep_supervision_loss(loss_cfg, aux, target, target_mask)
            loss = loss + parts["loss_deep_supervision"]
        if semi_inputs is None:
            return loss, (parts, batch_stats, ())
        student_in, teacher_probs, weights, adversary_params = semi_inputs
        student, batch_stats = forward(params, batch_stats, student_in, rng)
        student_probs = probabilities(target_kind, student[0])
        if teacher_on:
            parts["consistency"] = mean_teacher.consistency(student_probs, teacher_probs)
            loss = loss + weights["consistency_weight"] * parts["consistency"]
        if adversary_on:
            parts["adversarial"] = adversarial.segmenter_loss(disc, adversary_params, student_probs)
            loss = loss + weights["adversarial_weight"] * parts["adversarial"]
        return loss, (parts, batch_stats, (probabilities(target_kind, logits), student_probs))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_batches(x):
        # Row i*k + j goes to micro-batch j, so every device keeps its rows (no resharding).
        return jnp.swapaxes(x.reshape((x.shape[0] // accumulate_steps, accumulate_steps) + x.shape[1:]), 0, 1)

    def accumulated_grads(params, batch_stats, image, target, target_mask, rng):
        if accumulate_steps == 1:
            return grad_fn(params, batch_stats, image, target, target_mask, rng)

        def body(carry, xs):
            grads_sum, loss_sum, parts_sum, stats = carry
            (loss, (parts, stats, _)), grads = grad_fn(params, stats, *xs, rng)
            add = lambda a, b: jax.tree.map(jnp.add, a, b)
            return (add(grads_sum, grads), loss_sum + loss, add(parts_sum, parts), stats), None

        xs = tuple(micro_batches(x) for x in (image, target, target_mask))
        (_, (parts_shape, _, _)), grads_shape = jax.eval_shape(grad_fn, params, batch_stats, *(x[0] for x in xs), rng)
        zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
        init = (zeros(grads_shape), jnp.zeros((), jnp.float32), zeros(parts_shape), batch_stats)
        (grads, loss, parts, batch_stats), _ = jax.lax.scan(body, init, xs)
        scale = lambda tree: jax.tree.map(lambda g: g / accumulate_steps, tree)
        return (loss / accumulate_steps, (scale(parts), batch_stats, ())), scale(grads)

    def unlabelled_inputs(state: TrainState, crops: jax.Array, rng: jax.Array):
        """(student input, teacher probabilities or None, {"consistency_weight" | "adversarial_weight":
        configured weight x ramp(step)} of the methods that are on, discriminator params or None)."""
        augment_rng, noise_rng = jax.random.split(rng)
        crops = augment_fn(augment_rng, {"image": crops})["image"]
        teacher_probs = None
        if teacher_on:
            crops, teacher_in = mean_teacher.noisy_pair(noise_rng, crops, semi_cfg.noise_std)
            teacher_logits, _ = model.apply(state.variables(use_ema=True), teacher_in, train=False)
            teacher_probs = probabilities(target_kind, teacher_logits)
        ramp = mean_teacher.rampup(state.step, semi_cfg.rampup_steps)
        weights = {**({"consistency_weight": semi_cfg.weight * ramp} if teacher_on else {}),
                   **({"adversarial_weight": semi_cfg.adversarial_weight * ramp} if adversary_on else {})}
        return crops, teacher_probs, weights, state.adversary["params"] if adversary_on else None

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, dropout_rng = jax.random.split(rng)
        augmented = augment_fn(aug_rng, batch)
        target, target_mask = target_fn(augmented["labels"], augmented["mask"])
        args = (state.params, state.batch_stats, augmented["image"], target, target_mask, dropout_rng)
        replace = {}
        if semi:
            # A stream of its own (fold_in), so the supervised part draws what it draws without it.
            semi_inputs = unlabelled_inputs(state, batch["unlabelled"], jax.random.fold_in(rng, 1))
            (loss, (parts, batch_stats, domain_probs)), grads = grad_fn(*args, semi_inputs)
            parts.update(semi_inputs[2])  # the weights, logged
            if adversary_on:
                replace["adversary"], disc_metrics = adversarial.update_discriminator(
                    state.adversary, semi_cfg, *domain_probs)
                parts.update(disc_metrics)
        else:
            (loss, (parts, batch_stats, _)), grads = accumulated_grads(*args)
        if freeze_encoder_steps and ENCODER in (batch_stats or {}):
            frozen = encoder_frozen(freeze_encoder_steps, state.step)
            held = jax.tree.map(lambda old, new: jnp.where(frozen, old, new),
                                state.batch_stats[ENCODER], batch_stats[ENCODER])
            batch_stats = {**batch_stats, ENCODER: held}
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if ema_decay > 0:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
        else:
            ema = params
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state, ema_params=ema, **replace)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **parts}
        return new_state, metrics

    return train_step


def make_eval_step(model, loss_cfg: ml_collections.ConfigDict, target_fn: Callable, target_kind: str,
                   use_ema: bool = False) -> Callable:
    """Builds `eval_step(state, batch) -> (metrics, probabilities)` on un-augmented batches.

    metrics: loss and the voxel-wise Dice of thresholded predictions (summed counts, so means over
    many batches are exact); probabilities: (B, *spatial, K) float32.
    """

    def eval_step(state: TrainState, batch: Batch):
        logits, _ = model.apply(state.variables(use_ema), batch["image"], train=False)
        target, target_mask = target_fn(batch["labels"], batch["mask"])
        loss, _ = segmentation_loss(loss_cfg, logits, target, target_mask)
        probs = probabilities(target_kind, logits)
        pred = (probs > 0.5).astype(jnp.float32)
        counts = {
            "tp": jnp.sum(pred * target * target_mask),
            "fp": jnp.sum(pred * (1 - target) * target_mask),
            "fn": jnp.sum((1 - pred) * target * target_mask),
        }
        return {"loss": loss, **counts}, probs

    return eval_step
