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

from jaxem.data.augment import make_photometric_fn
from jaxem.models.heads import probabilities
from jaxem.semi import adversarial, dann, mean_teacher, pseudo_label, unlabelled
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
                    target_kind: str = "boundary", freeze_encoder_steps: int = 0, rounds: int = 1,
                    total_steps: int = 0, hold_frozen_batch_stats: bool = True) -> Callable:
    """Builds `train_step(state, batch) -> (state, metrics)` for a model and a target kind.

    batch: {"image": (B, *spatial, 1) float32, "labels": (B, *spatial) int32, "mask": (B, *spatial)}.
    With `accumulate_steps` k > 1 the batch is split into k micro-batches whose gradients are
    averaged (one optimizer update per step, k times less activation memory). With a `semi_cfg`
    that turns on learning from unlabelled crops (jaxem.semi.unlabelled) the batch also holds
    "unlabelled" crops (B_u, *spatial, 1), and the loss adds a mean-teacher consistency term against
    `ema_params` (semi.weight > 0), an output-space adversarial term against the discriminator in
    `state.adversary` (semi.adversarial_weight > 0, jaxem.semi.adversarial), or both. They are
    add-ons to the one loss every micro-batch is differentiated through (its share of the
    unlabelled crops with its labelled rows), so they accumulate like the supervised loss; the
    discriminator then takes one step on the whole batch's predictions. `semi.method` pseudo_label
    or fixmatch (jaxem.semi.pseudo_label) replaces the consistency term by a loss against confident
    hard labels, made for the whole batch before the micro-batches: from the teacher (EMA params, or
    the frozen run `train_step`'s third argument `teacher` holds, semi.teacher) on the crop, or for
    fixmatch from the model itself (current params, eval mode) on the weak view while the student sees
    a strong view (semi.strong_augment on top); semi.propagate_slices adds the teacher's labels of the
    unannotated sections next to annotated ones in the labelled crops (term "propagated").
    DANN (semi.dann_weight > 0, jaxem.semi.dann) adds the domain classifier's BCE on the encoder's
    deepest features of the labelled (source) and unlabelled (target) crops, through the gradient
    reversal of scale lambda(step / `total_steps`): the same gradient computation differentiates the
    loss in the model's params and in the classifier's (`state.domain_classifier`), which then takes
    its Adam step on its own part.
    While the encoder is frozen (`freeze_encoder_steps`, train.freeze_encoder_steps: the first N
    steps, -1 = all) its batch-norm statistics keep their values unless `hold_frozen_batch_stats` is
    False (train.freeze_encoder_batch_stats: then its running averages keep tracking the training
    crops, AdaBN); the optimizer (make_optimizer with the train config) keeps its parameters. Inside
    the frozen encoder, train-mode batch norm still normalises with each batch's own statistics. `rounds` > 1 (semi.rounds, pseudo_label): rounds of
    `total_steps // rounds` steps; the state's `round_teacher` (a RoundsState) labels the crops, and
    the step that begins each later round first replaces it by the student's inference variables
    (EMA weights when kept) as they are then. The first round's teacher is the run teacher
    (semi.teacher, put in `round_teacher` at the start) or, without one, the live EMA.
    """
    semi = unlabelled.enabled(semi_cfg)
    teacher_on, adversary_on = unlabelled.mean_teacher_on(semi_cfg), unlabelled.adversarial_on(semi_cfg)
    pseudo_on, method = unlabelled.pseudo_on(semi_cfg), unlabelled.method_on(semi_cfg)
    propagate = int(semi_cfg.get("propagate_slices", 0)) if pseudo_on else 0
    dann_on = unlabelled.dann_on(semi_cfg)
    disc = adversarial.discriminator(semi_cfg) if adversary_on else None
    domain_clf = dann.classifier(semi_cfg) if dann_on else None

    def forward(params, batch_stats, image, rng):
        """Train-mode outputs, the updated batch statistics and, with DANN, the encoder's deepest
        features (else None)."""
        variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
        mutable = (["batch_stats"] if batch_stats else []) + (["intermediates"] if dann_on else [])
        capture = dann.captures_encoder if dann_on else False
        kwargs = dict(train=True, rngs={"dropout": rng}, capture_intermediates=capture)
        if not mutable:
            return model.apply(variables, image, **kwargs), batch_stats, None
        outputs, updates = model.apply(variables, image, mutable=mutable, **kwargs)
        return outputs, updates.get("batch_stats", batch_stats), dann.deepest_features(updates) if dann_on else None

    def loss_fn(trainable, batch_stats, inputs: Batch, rng, context: dict):
        """(loss, (loss parts, batch_stats, (source, target) probabilities with the adversary else ())).

        trainable: (model params, domain classifier params or {} without DANN), both differentiated;
        inputs: "image", "target", "target_mask" and with semi "student_in" (+ "teacher_probs" with
        the mean teacher, "pseudo" {"target", "weight"} with pseudo-labels, "propagated" likewise
        with slice propagation) of one (micro-)batch; context: the step's semi weights and
        discriminator."""
        params, domain_params = trainable
        outputs, batch_stats, source_features = forward(params, batch_stats, inputs["image"], rng)
        logits, aux = outputs
        aux = aux.get("deep_supervision", [])
        loss, parts = segmentation_loss(loss_cfg, logits, inputs["target"], inputs["target_mask"])
        if aux:
            parts["loss_deep_supervision"] = _deep_supervision_loss(loss_cfg, aux, inputs["target"], inputs["target_mask"])
            loss = loss + parts["loss_deep_supervision"]
        if not semi:
            return loss, (parts, batch_stats, ())
        weights = context["weights"]
        if propagate:
            parts["propagated"] = pseudo_label.loss(target_kind, logits, **inputs["propagated"])
            loss = loss + weights["pseudo_label_weight"] * parts["propagated"]
        student, batch_stats, target_features = forward(params, batch_stats, inputs["student_in"], rng)
        student_probs = probabilities(target_kind, student[0])
        if teacher_on:
            parts["consistency"] = mean_teacher.consistency(student_probs, inputs["teacher_probs"])
            loss = loss + weights["consistency_weight"] * parts["consistency"]
        if pseudo_on:
            parts["pseudo_label"] = pseudo_label.loss(target_kind, student[0], **inputs["pseudo"])
            loss = loss + weights["pseudo_label_weight"] * parts["pseudo_label"]
        if dann_on:
            parts["dann"], parts["domain_accuracy"] = dann.domain_loss(
                domain_params, domain_clf, source_features, target_features, context["metrics"]["dann_lambda"])
            loss = loss + weights["dann_weight"] * parts["dann"]
        if adversary_on:
            parts["adversarial"] = adversarial.segmenter_loss(disc, context["adversary"], student_probs)
            loss = loss + weights["adversarial_weight"] * parts["adversarial"]
            return loss, (parts, batch_stats, (probabilities(target_kind, logits), student_probs))
        return loss, (parts, batch_stats, ())

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def teacher_probs(variables: dict, image: jax.Array) -> jax.Array:
        """Eval-mode probabilities (no gradient) of `variables` on `image`."""
        logits, _ = model.apply(variables, image, train=False)
        return jax.lax.stop_gradient(probabilities(target_kind, logits))

    def micro_grads(trainable, batch_stats, inputs: Batch, rng, context: dict):
        """loss_fn's value and gradient in `trainable` (model params, classifier params) on one
        (micro-)batch; the teacher's probabilities (eval mode, no gradient) are computed here, per
        micro-batch like the student's."""
        if teacher_on:
            inputs = dict(inputs)
            inputs["teacher_probs"] = teacher_probs(context["teacher"], inputs.pop("teacher_in"))
        return grad_fn(trainable, batch_stats, inputs, rng, context)

    def micro_batches(x):
        # Row i*k + j goes to micro-batch j, so every device keeps its rows (no resharding).
        return jnp.swapaxes(x.reshape((x.shape[0] // accumulate_steps, accumulate_steps) + x.shape[1:]), 0, 1)

    def whole_batch(x):
        # The inverse of micro_batches: (k, B/k, ...) -> (B, ...) in the original row order.
        return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])

    def accumulated_grads(trainable, batch_stats, inputs: Batch, rng, context: dict):
        """micro_grads over `accumulate_steps` micro-batches of every input, in sequence: the mean
        loss, parts and gradient; the probabilities put back in the whole batch's row order."""
        if accumulate_steps == 1:
            return micro_grads(trainable, batch_stats, inputs, rng, context)

        def body(carry, micro):
            grads_sum, loss_sum, parts_sum, stats = carry
            (loss, (parts, stats, probs)), grads = micro_grads(trainable, stats, micro, rng, context)
            add = lambda a, b: jax.tree.map(jnp.add, a, b)
            return (add(grads_sum, grads), loss_sum + loss, add(parts_sum, parts), stats), probs

        xs = jax.tree.map(micro_batches, inputs)
        first = jax.tree.map(lambda x: x[0], xs)
        (_, (parts_shape, _, _)), grads_shape = jax.eval_shape(micro_grads, trainable, batch_stats, first, rng, context)
        zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
        init = (zeros(grads_shape), jnp.zeros((), jnp.float32), zeros(parts_shape), batch_stats)
        (grads, loss, parts, batch_stats), probs = jax.lax.scan(body, init, xs)
        scale = lambda tree: jax.tree.map(lambda g: g / accumulate_steps, tree)
        return (loss / accumulate_steps, (scale(parts), batch_stats, jax.tree.map(whole_batch, probs))), scale(grads)

    round_steps = total_steps // rounds if rounds > 1 else 0
    first_round_ema = rounds > 1 and not semi_cfg.get("teacher")

    def with_round_teacher(state: TrainState) -> TrainState:
        """`state` whose `round_teacher` is the student's inference variables (EMA weights when kept;
        `ema_params` is `params` without EMA) when this step begins round 2, 3, ...: the student of
        the round that ended becomes the next round's frozen teacher."""
        begins = (state.step > 0) & (state.step % round_steps == 0) & (state.step < rounds * round_steps)
        snapshot = jax.lax.cond(begins, lambda: state.variables(use_ema=True), lambda: state.round_teacher)
        return state.replace(round_teacher=snapshot)

    def pseudo_teacher(state: TrainState, run_teacher) -> dict:
        """The variables that make pseudo-labels: fixmatch's current params; pseudo_label's EMA, the
        frozen run teacher, or with rounds the round's teacher (the live EMA in the first round when
        no run teacher is given)."""
        if method == "fixmatch":
            return state.variables(use_ema=False)
        if round_steps:
            if not first_round_ema:
                return state.round_teacher
            return jax.lax.cond(state.step < round_steps, lambda: state.variables(use_ema=True),
                                lambda: state.round_teacher)
        return state.variables(use_ema=True) if run_teacher is None else run_teacher

    def unlabelled_inputs(state: TrainState, crops: jax.Array, rng: jax.Array, labeller) -> tuple[Batch, dict]:
        """({"student_in", ["teacher_in" | "pseudo"]}: the augmented crops (with their own noise each
        for the mean teacher and pseudo_label; strong and weak views for fixmatch) and the whole
        batch's pseudo-labels, {"weights": {"consistency_weight" | "pseudo_label_weight" |
        "adversarial_weight" | "dann_weight": configured weight x ramp(step), DANN's unramped} of the
        methods that are on, ["teacher": EMA variables], ["adversary": discriminator params],
        "metrics": ["pseudo_confident"], ["dann_lambda": the gradient reversal's scale]}).
        `labeller`: the variables that make pseudo-labels (`pseudo_teacher`), None without them."""
        augment_rng, noise_rng = jax.random.split(rng)
        crops = augment_fn(augment_rng, {"image": crops})["image"]
        ramp = mean_teacher.rampup(state.step, semi_cfg.rampup_steps)
        inputs, context = {"student_in": crops}, {"weights": {}, "metrics": {}}
        if teacher_on:
            inputs["student_in"], inputs["teacher_in"] = mean_teacher.noisy_pair(noise_rng, crops, semi_cfg.noise_std)
            context["teacher"] = state.variables(use_ema=True)
            context["weights"]["consistency_weight"] = semi_cfg.weight * ramp
        if pseudo_on:
            if method == "fixmatch":  # weak view: the crop as augmented; strong: more photometric ops on it
                strong_fn = make_photometric_fn(semi_cfg.strong_augment, crops.ndim - 2)
                weak, inputs["student_in"] = crops, strong_fn(noise_rng, crops)
            else:
                inputs["student_in"], weak = mean_teacher.noisy_pair(noise_rng, crops, semi_cfg.noise_std)
            probs = teacher_probs(labeller, weak)
            inputs["pseudo"], context["metrics"]["pseudo_confident"] = pseudo_label.pseudo_targets(
                target_kind, probs, semi_cfg.confidence)
            context["weights"]["pseudo_label_weight"] = semi_cfg.weight * ramp
        if adversary_on:
            context["adversary"] = state.adversary["params"]
            context["weights"]["adversarial_weight"] = semi_cfg.adversarial_weight * ramp
        if dann_on:  # DANN ramps its reversal scale instead (Ganin & Lempitsky)
            context["weights"]["dann_weight"] = jnp.asarray(semi_cfg.dann_weight, jnp.float32)
            context["metrics"]["dann_lambda"] = dann.grl_lambda(state.step, total_steps)
        return inputs, context

    def train_step(state: TrainState, batch: Batch, teacher: dict | None = None) -> tuple[TrainState, dict]:
        """One optimizer step on `batch`; `teacher`: the frozen run teacher's variables (semi.teacher)."""
        rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, dropout_rng = jax.random.split(rng)
        augmented = augment_fn(aug_rng, batch)
        target, target_mask = target_fn(augmented["labels"], augmented["mask"])
        inputs, context = {"image": augmented["image"], "target": target, "target_mask": target_mask}, {}
        if round_steps:
            state = with_round_teacher(state)
        labeller = pseudo_teacher(state, teacher) if pseudo_on else None
        if semi:
            # A stream of its own (fold_in), so the supervised part draws what it draws without it.
            semi_inputs, context = unlabelled_inputs(state, batch["unlabelled"], jax.random.fold_in(rng, 1), labeller)
            inputs.update(semi_inputs)
        if propagate:
            probs = teacher_probs(labeller, augmented["image"])
            inputs["propagated"], context["metrics"]["propagated_fraction"] = pseudo_label.propagated_targets(
                target_kind, probs, augmented["mask"], propagate, semi_cfg.confidence)
        trainable = (state.params, state.domain_classifier["params"] if dann_on else {})
        (loss, (parts, batch_stats, domain_probs)), (grads, domain_grads) = accumulated_grads(
            trainable, state.batch_stats, inputs, dropout_rng, context)
        replace = {}
        if semi:
            parts.update(context["weights"], **context["metrics"])  # logged
        if adversary_on:
            replace["adversary"], disc_metrics = adversarial.update_discriminator(state.adversary, semi_cfg, *domain_probs)
            parts.update(disc_metrics)
        if dann_on:
            replace["domain_classifier"] = dann.update_classifier(state.domain_classifier, semi_cfg, domain_grads)
        if freeze_encoder_steps and hold_frozen_batch_stats and ENCODER in (batch_stats or {}):
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
