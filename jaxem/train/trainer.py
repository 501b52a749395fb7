"""Supervised training of a segmentation model: config checks, state and steps, validation.

    summary = train(config, workdir)     # resumes from workdir's checkpoints; see jaxem.train.loop

`validate_training_config` checks the whole config once, before anything is built; `build_training`
makes the model, the initial state (a pretrained encoder from `train.init_encoder`, the
discriminator of adversarial adaptation, the domain classifier of DANN) and the jitted steps
(jaxem.train.supervised); `evaluate` scores the validation crops (`crop_segmenter`: their instances
too). The loop is jaxem.train.loop's.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxem import models
from jaxem.data import augment, pipeline, targets
from jaxem.errors import UserError
from jaxem.metrics.clustering import clustering_scores
from jaxem.models import convert
from jaxem.segment.setting import SegmentSetting, segment_volume
from jaxem.semi import adversarial, dann, unlabelled
from jaxem.train import checkpoint, parallel
from jaxem.train.defaults import with_dataset_volumes
from jaxem.train.loop import RunShape, check_loop_config, check_workdir, has_checkpoints, run_loop, section_shape
from jaxem.train.state import create_train_state, hold_frozen_batch_stats, make_optimizer, with_add_ons
from jaxem.train.supervised import make_eval_step, make_train_step

# Sections whose change makes old checkpoints unusable (parameter shapes or target meaning);
# 'ssl' marks a self-supervised run, whose checkpoints a supervised run cannot resume (and back).
SHAPE_SECTIONS = ("model", "target", "ssl")


def run_shape(config: ml_collections.ConfigDict) -> RunShape:
    """What a supervised run's checkpoints depend on: the shape sections and what the `semi`
    add-ons keep in the train state (the discriminator, the domain classifier)."""
    return {**section_shape(config, SHAPE_SECTIONS), **unlabelled.checkpoint_shape(config.get("semi"))}


def validate_training_config(config: ml_collections.ConfigDict, mesh) -> None:
    """UserError naming the first setting of `config` that supervised training on `mesh` cannot
    run with: loop minimums, `semi`, batch sizes against devices and micro-batches, the model's
    input shape, out_channels against the target's channels. Nothing is built or written."""
    if "ssl" in config:
        raise UserError("the config has an `ssl` section: it describes self-supervised pretraining, run it with "
                        "`jaxem pretrain` (fine-tune its encoder with --config.train.init_encoder=WORKDIR).")
    tc, devices = config.train, int(mesh.devices.size)
    check_loop_config(tc)
    batch_sizes = {"data.batch_size": config.data.batch_size}
    if "semi" in config:
        unlabelled.check_semi_config(config)
    if unlabelled.enabled(config.get("semi")):
        batch_sizes["semi.batch_size"] = config.semi.batch_size  # split into micro-batches alike
    parallel.check_batch_size(config.data.batch_size, mesh)
    for field, size in batch_sizes.items():
        if size % (devices * tc.accumulate_steps):
            raise UserError(f"{field}={size} must split into train.accumulate_steps={tc.accumulate_steps} "
                            f"micro-batches on each of {devices} devices.")
    models.check_input_shape(config.model, tuple(config.data.crop_shape))
    channels = targets.num_target_channels(config.target, config.model.ndim)
    if config.model.out_channels != channels:
        raise UserError(f"model.out_channels={config.model.out_channels} but target kind "
                        f"{config.target.kind!r} has {channels} channels; set --config.model.out_channels={channels}.")


def train(config: ml_collections.ConfigDict, workdir: str | Path, progress: bool = True, exact: bool = False) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the loop's summary
    (steps, time, last validation metrics). `exact`: a run in `workdir` trained with any other
    setting is a UserError rather than continued (check_workdir)."""
    parallel.initialize_distributed()
    mesh = parallel.make_mesh(config.train.num_devices)
    validate_training_config(config, mesh)
    config = with_dataset_volumes(config)
    workdir = Path(workdir)
    check_workdir(config, workdir, run_shape, exact=exact)

    tc, ndim = config.train, config.model.ndim
    # A resumed run continues from its own checkpoint: the pretrained encoder is not needed again.
    model, state, train_step, eval_step = build_training(config, mesh, load_encoder=not has_checkpoints(workdir))
    # Open the data before writing anything, so bad data paths leave the workdir untouched.
    loader = pipeline.make_loader(config.data, mesh=mesh, ndim=ndim, seed=config.seed, split="train")
    if unlabelled.enabled(config.get("semi")):
        loader = unlabelled.PairedLoader(loader, unlabelled.make_unlabelled_loader(config, mesh))
    validate, val_loader = None, None
    if config.data.val_images and tc.eval_every > 0:
        val_loader = pipeline.make_loader(config.data, mesh=mesh, ndim=ndim, seed=config.seed, split="val")
        val_start = val_loader.get_state()
        segment_crop = crop_segmenter(config.target) if tc.eval_instances else None
        validate = lambda state: evaluate(state, eval_step, val_loader, val_start, tc.eval_batches, segment_crop)  # noqa: E731
    try:
        summary, _ = run_loop(config, workdir, state=state, train_step=train_step, loader=loader, meta=run_shape(config),
                              devices=int(mesh.devices.size), validate=validate, progress=progress)
        return summary
    finally:
        if val_loader is not None:
            val_loader.close()


def build_training(config: ml_collections.ConfigDict, mesh, load_encoder: bool = True, abstract: bool = False):
    """(model, initial state, jitted train_step, jitted eval_step) for a checked `config` on `mesh`.

    Params and optimizer state are replicated, batches sharded on 'data', and the train step
    donates the state buffers it replaces. With `train.init_encoder` set (and `load_encoder`) the
    encoder starts from that pretrained encoder. `abstract`: the state as shapes and dtypes only
    (jax.eval_shape: nothing initialised or compiled for it, no encoder loaded), enough to lower the
    steps, e.g. to measure their memory; supervised configs only (semi methods need a real state).
    """
    tc, ndim = config.train, config.model.ndim
    model = models.build(config.model)
    tx = make_optimizer(config.optimizer, tc.steps, tc)  # with the fine-tuning controls of `train`
    replicated, batch_sharded = parallel.replicated(mesh), parallel.data_sharding(mesh)
    init_shape = (1,) + tuple(config.data.crop_shape) + (1,)
    init = jax.jit(lambda rng: create_train_state(model, tx, rng, init_shape), out_shardings=replicated)
    key = jax.random.PRNGKey(config.seed)
    state = jax.eval_shape(init, key) if abstract else init(key)
    if tc.get("init_encoder") and load_encoder and not abstract:
        state = with_pretrained_encoder(state, tc.init_encoder, mesh, config.model,
                                        encoder_only=not tc.get("init_decoder", True))
    teacher, rounds = run_teacher(config, state, mesh), unlabelled.rounds_on(config.get("semi"))
    add_ons = init_adversaries(config, model, state, replicated)
    if rounds > 1:  # the rounds' teacher lives in the state; before the first round ends: the run teacher or a placeholder
        add_ons["round_teacher"] = teacher if teacher is not None else copy_on_devices(
            state.variables(use_ema=True), replicated)
        teacher = None
    if add_ons:
        state = with_add_ons(state, **add_ons)
    augment_fn = augment.make_augment_fn(config.augment, ndim)
    target_fn = targets.make_target_fn(config.target, ndim)
    step_fn = make_train_step(model, config.loss, augment_fn, target_fn, tc.ema_decay, tc.accumulate_steps,
                              semi_cfg=config.get("semi"), target_kind=config.target.kind,
                              freeze_encoder_steps=tc.get("freeze_encoder_steps", 0), total_steps=tc.steps,
                              rounds=rounds, hold_frozen_batch_stats=hold_frozen_batch_stats(tc))
    if teacher is None:
        train_step = jax.jit(step_fn, in_shardings=(replicated, batch_sharded), out_shardings=(replicated, replicated),
                             donate_argnums=0)
    else:  # the frozen teacher is an argument (not a constant baked into the compiled step)
        jitted = jax.jit(step_fn, in_shardings=(replicated, batch_sharded, replicated),
                         out_shardings=(replicated, replicated), donate_argnums=0)
        train_step = lambda state, batch: jitted(state, batch, teacher)  # noqa: E731
    eval_step = jax.jit(make_eval_step(model, config.loss, target_fn, config.target.kind, use_ema=tc.ema_decay > 0),
                        in_shardings=(replicated, batch_sharded), out_shardings=(replicated, batch_sharded))
    return model, state, train_step, eval_step


def init_adversaries(config: ml_collections.ConfigDict, model, state, replicated) -> dict:
    """{"adversary": the discriminator (semi.adversarial_weight > 0), "domain_classifier": DANN's
    (semi.dann_weight > 0)}, each freshly initialised and replicated; {} with neither."""
    semi, seed_rng = config.get("semi"), jax.random.PRNGKey(config.seed)
    init, crop = {}, tuple(config.data.crop_shape)
    if unlabelled.adversarial_on(semi):
        probs_shape = (1,) + crop + (config.model.out_channels,)
        init["adversary"] = lambda rng: adversarial.init_adversary(semi, rng, probs_shape)
    if unlabelled.dann_on(semi):
        capture = lambda image: model.apply(state.variables(), image, train=False, mutable=["intermediates"],  # noqa: E731
                                            capture_intermediates=dann.captures_encoder)[1]
        features = dann.deepest_features(jax.eval_shape(capture, jax.ShapeDtypeStruct((1,) + crop + (1,), "float32")))
        init["domain_classifier"] = lambda rng: dann.init_domain_classifier(semi, rng, features.shape)
    return {name: jax.jit(fn, out_shardings=replicated)(jax.random.fold_in(seed_rng, 2 + i))
            for i, (name, fn) in enumerate(init.items())}


def run_teacher(config: ml_collections.ConfigDict, state, mesh) -> dict | None:
    """The frozen teacher of `semi.teacher=WORKDIR` (pseudo_label): that run's inference variables
    (EMA weights when it kept them), replicated on `mesh`; None without one. UserError when its
    variables do not fit this run's model."""
    semi = config.get("semi")
    if not (unlabelled.method_on(semi) == "pseudo_label" and semi.get("teacher")):
        return None
    try:
        _, _, variables = checkpoint.restore_for_inference(semi.teacher)
    except UserError as e:
        raise UserError(f"semi.teacher={semi.teacher}: {e}") from None
    shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)  # noqa: E731
    if shapes(jax.device_get(variables)) != shapes(state.variables()):
        raise UserError(f"semi.teacher={semi.teacher} holds another network than this run's model.* (its parameter "
                        f"shapes differ); train the teacher with the same model section.")
    return parallel.replicate(jax.device_get(variables), mesh)


def copy_on_devices(tree, sharding):
    """A copy of the array tree `tree` in fresh device buffers with `sharding` (state fields the train
    step donates must not share a buffer)."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=sharding)(tree)


def with_pretrained_encoder(state, path: str, mesh, model_cfg: ml_collections.ConfigDict | None = None,
                            encoder_only: bool = False):
    """`state` whose encoder variables (params and EMA copy; batch_stats with batch norm) come from
    the pretrained encoder at `path` (and its decoder's, where `path` holds a whole network as mim
    exports it, unless `encoder_only`), with a fresh optimizer state; UserError when they do not fit.
    `path` is an exported encoder, or a SAM/DINOv2/MAE/timm checkpoint file converted on the fly
    to fit `model_cfg` (jaxem.models.convert)."""
    variables = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
    try:
        pretrained = (convert.load_pretrained(path, model_cfg) if model_cfg is not None and convert.is_checkpoint(path)
                      else checkpoint.load_encoder(path))
        variables = models.transfer_encoder_params(variables, pretrained, encoder_only)
    except UserError as e:
        raise UserError(f"train.init_encoder={path}: {e}") from None
    variables = parallel.replicate(jax.device_get(variables), mesh)
    params, replicated = variables["params"], parallel.replicated(mesh)
    opt_state = jax.jit(state.tx.init, out_shardings=replicated)(params)
    # the EMA copy needs buffers of its own: the train step donates both trees
    return state.replace(params=params, ema_params=copy_on_devices(params, replicated),
                         batch_stats=variables.get("batch_stats", state.batch_stats), opt_state=opt_state)


def evaluate(state, eval_step, val_loader, val_start: dict, num_batches: int, segment_crop=None) -> dict:
    """Validation metrics over the same validation batches every time (the first `num_batches`, or
    one pass over the validation crops when that is fewer): loss and voxel Dice of the target, and
    with `segment_crop` (see `crop_segmenter`) VRand/VInfo/VOI of the instances in each crop."""
    num_batches = min(num_batches, val_loader.num_batches)
    val_loader.set_state(val_start)
    totals, crop_scores = {"loss": 0.0, "tp": 0.0, "fp": 0.0, "fn": 0.0}, []
    for _ in range(num_batches):
        batch = next(val_loader)
        metrics, probs = eval_step(state, batch)
        for k, v in jax.device_get(metrics).items():
            totals[k] += float(v)
        if segment_crop is not None:
            crop_scores += _instance_scores(probs, batch, segment_crop)
    tp, fp, fn = totals["tp"], totals["fp"], totals["fn"]
    result = {"loss": totals["loss"] / num_batches, "dice": 2 * tp / max(2 * tp + fp + fn, 1.0)}
    for key in ("vrand", "vinfo", "voi_split", "voi_merge"):
        if crop_scores:
            result[key] = float(np.mean([s[key] for s in crop_scores]))
    return result


MIN_FRAGMENT = 10  # voxels: smaller mutex-watershed fragments of a validation crop are flooded


def crop_segmenter(target_cfg):
    """`fn(probs (*S, K)) -> instance labels (*S)` for validation crops, or None where the target has
    no instances: boundary maps -> seeded watershed (per z-slice in 3D); affinities -> mutex watershed
    (both through `segment_volume`, with the default setting of the method)."""
    if target_cfg.kind == "boundary":
        setting = SegmentSetting(method="watershed")
        return lambda p: segment_volume(p[..., 0], setting, "boundary", per_slice=p.ndim == 4)
    if target_cfg.kind == "affinities":
        setting = SegmentSetting(method="mws", min_size=MIN_FRAGMENT)

        def mws(p):
            offsets = targets.affinity_offsets(target_cfg, p.ndim - 1)
            return segment_volume(np.moveaxis(p, -1, 0), setting, "affinities", offsets=offsets)
        return mws
    return None


def _instance_scores(probs, batch, segment_crop) -> list[dict]:
    """Clustering scores of the instances `segment_crop` makes from each labelled crop's probabilities."""
    probs, labels, mask = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                           for x in (probs, batch["labels"], batch["mask"]))
    scores = []
    for p, gt, m in zip(probs, labels, mask):
        if m.max() > 0 and gt.max() > 0:  # skip padding rows and crops without cells
            scores.append(clustering_scores(segment_crop(p), gt))
    return scores
