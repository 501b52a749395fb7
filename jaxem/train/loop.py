"""The one training loop: it owns time, IO, logging and checkpoints; the steps own the math.

    train(config, workdir) -> summary dict

Running the same command again resumes from the newest readable checkpoint (state, RNG and data
iterator position), so an interrupted run ends with the same parameters as an uninterrupted one.
SIGTERM (preemption) saves a checkpoint before exiting. A NaN/Inf loss stops the run with a clear
message; checkpoints are only written after the loss of that step was seen to be finite.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from jaxem import models
from jaxem.config import fingerprint, save_config
from jaxem.data import augment, pipeline, targets
from jaxem.data.volume import nonfinite_count, open_volume
from jaxem.errors import UserError
from jaxem.models import convert
from jaxem.semi import unlabelled
from jaxem.train import parallel
from jaxem.train.checkpoint import Checkpointer
from jaxem.train.defaults import with_dataset_volumes
from jaxem.train.logs import MetricWriter, environment_versions, plot_curves
from jaxem.train.state import create_train_state, make_optimizer, parameter_count
from jaxem.train.supervised import make_eval_step, make_train_step

# Sections whose change makes old checkpoints unusable (parameter shapes or target meaning);
# 'ssl' marks a self-supervised run, whose checkpoints a supervised run cannot resume (and back).
SHAPE_SECTIONS = ("model", "target", "ssl")


class TrainingDiverged(UserError):
    """The loss became NaN or Inf."""


def check_workdir(config: ml_collections.ConfigDict, workdir: Path, sections: tuple[str, ...] = SHAPE_SECTIONS,
                  ignore: tuple[str, ...] = ()) -> None:
    """UserError when `workdir` holds checkpoints of a run whose config differs in one of `sections`
    (a section present in only one of the two configs differs too). Fields named in `ignore`
    ("section.field", e.g. "ssl.probe_images") are left out: settings the checkpoints do not hold."""
    saved_path = workdir / "config.json"
    if not saved_path.exists():
        if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
            raise UserError(f"{workdir} holds checkpoints but no config.json; use a new --workdir.")
        return
    saved = ml_collections.ConfigDict(json.loads(saved_path.read_text()))
    for section in sections:
        if section not in saved and section not in config:
            continue
        if section not in saved or section not in config or (
                _section_fingerprint(saved, section, ignore) != _section_fingerprint(config, section, ignore)):
            raise UserError(
                f"{workdir} holds a run with a different `{section}` config; use a new --workdir "
                f"(or delete {workdir}) instead of mixing experiments.")
    if _discriminator_widths(saved) != _discriminator_widths(config):
        raise UserError(f"{workdir} holds a run whose domain discriminator (semi.adversarial_weight > 0, "
                        f"semi.discriminator_widths) differs from this config's; use a new --workdir.")


def _section_fingerprint(config: ml_collections.ConfigDict, section: str, ignore: tuple[str, ...]) -> str:
    """fingerprint of config[section] without the fields named in `ignore`."""
    fields = {k: v for k, v in config[section].to_dict().items() if f"{section}.{k}" not in ignore}
    return fingerprint(ml_collections.ConfigDict(fields))


def _discriminator_widths(config: ml_collections.ConfigDict) -> tuple[int, ...] | None:
    """The discriminator a run's checkpoints hold (None without adversarial adaptation)."""
    semi = config.get("semi")
    return tuple(semi.discriminator_widths) if unlabelled.adversarial_on(semi) else None


def has_checkpoints(workdir: Path) -> bool:
    """Whether `workdir` holds at least one finished checkpoint (a step directory)."""
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def run_meta(config: ml_collections.ConfigDict, sections: tuple[str, ...] = SHAPE_SECTIONS) -> dict:
    """What each checkpoint records of its run: the fingerprint of every shape section present."""
    return {section: fingerprint(config[section]) for section in sections if section in config}


# train.<field> -> the smallest value the loop can run with (eval_every 0 = no validation)
LOOP_MINIMUMS = {"steps": 1, "log_every": 1, "checkpoint_every": 1, "eval_every": 0, "keep_checkpoints": 1}


def check_loop_config(tc: ml_collections.ConfigDict) -> None:
    """UserError naming the first `train` field below its minimum (LOOP_MINIMUMS)."""
    for name, minimum in LOOP_MINIMUMS.items():
        if name in tc and int(tc[name]) < minimum:
            raise UserError(f"train.{name}={tc[name]} must be at least {minimum}.")


def nonfinite_inputs(data_cfg: ml_collections.ConfigDict) -> str:
    """'FILE holds N NaN or infinite voxels' for the first training image volume that has any, else ''."""
    for path in data_cfg.get("train_images", ()):
        count = nonfinite_count(open_volume(path))
        if count:
            return f"{path} holds {count} NaN or infinite voxels"
    return ""


def divergence_message(loss: float, step: int, data_cfg: ml_collections.ConfigDict, checkpoints: Path) -> str:
    """Why the loss became `loss` at `step`: a training image holding NaN/Inf (named), else the optimizer."""
    bad_input = nonfinite_inputs(data_cfg)
    if bad_input:
        return (f"the training loss became {loss} at step {step}: {bad_input}; replace them in the data "
                "(the model cannot learn from NaN or Inf images).")
    return (f"the training loss became {loss} at step {step}; the last good checkpoint is kept in {checkpoints} "
            "(lower optimizer.learning_rate or raise optimizer.grad_clip).")


def _mean_metrics(history: list[dict]) -> dict:
    fetched = jax.device_get(history)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self._previous = None
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *_):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


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
    no instances: boundary maps -> seeded watershed (per z-slice in 3D); affinities -> mutex watershed."""
    from jaxem.data.targets import affinity_offsets
    from jaxem.segment.instances import instances_from_affinities, instances_from_boundaries

    if target_cfg.kind == "boundary":
        return lambda p: instances_from_boundaries(p[..., 0], method="watershed", per_slice=p.ndim == 4)
    if target_cfg.kind == "affinities":
        def mws(p):
            offsets = affinity_offsets(target_cfg, p.ndim - 1)
            return instances_from_affinities(np.moveaxis(p, -1, 0), offsets, "mws", min_size=MIN_FRAGMENT)
        return mws
    return None


def _instance_scores(probs, batch, segment_crop) -> list[dict]:
    """Clustering scores of the instances `segment_crop` makes from each labelled crop's probabilities."""
    from jax.experimental import multihost_utils

    from jaxem.metrics.clustering import clustering_scores

    probs, labels, mask = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                           for x in (probs, batch["labels"], batch["mask"]))
    scores = []
    for p, gt, m in zip(probs, labels, mask):
        if m.max() > 0 and gt.max() > 0:  # skip padding rows and crops without cells
            scores.append(clustering_scores(segment_crop(p), gt))
    return scores


def build_training(config: ml_collections.ConfigDict, mesh, load_encoder: bool = True):
    """(model, initial state, jitted train_step, jitted eval_step) for `config` on `mesh`.

    Params and optimizer state are replicated, batches sharded on 'data', and the train step
    donates the state buffers it replaces. With `train.init_encoder` set (and `load_encoder`) the
    encoder starts from that pretrained encoder.
    """
    tc, ndim = config.train, config.model.ndim
    model = models.build(config.model)
    tx = make_optimizer(config.optimizer, tc.steps, tc)  # with the fine-tuning controls of `train`
    replicated, batch_sharded = parallel.replicated(mesh), parallel.data_sharding(mesh)
    init_shape = (1,) + tuple(config.data.crop_shape) + (1,)
    state = jax.jit(lambda rng: create_train_state(model, tx, rng, init_shape), out_shardings=replicated)(
        jax.random.PRNGKey(config.seed))
    if tc.get("init_encoder") and load_encoder:
        state = with_pretrained_encoder(state, tc.init_encoder, mesh, config.model)
    if unlabelled.adversarial_on(config.get("semi")):
        from jaxem.semi.adversarial import with_adversary

        probs_shape = (1,) + tuple(config.data.crop_shape) + (config.model.out_channels,)
        state = jax.jit(lambda s, rng: with_adversary(s, config.semi, rng, probs_shape), out_shardings=replicated)(
            state, jax.random.fold_in(jax.random.PRNGKey(config.seed), 2))
    augment_fn = augment.make_augment_fn(config.augment, ndim)
    target_fn = targets.make_target_fn(config.target, ndim)
    train_step = jax.jit(
        make_train_step(model, config.loss, augment_fn, target_fn, tc.ema_decay, tc.accumulate_steps,
                        semi_cfg=config.get("semi"), target_kind=config.target.kind,
                        freeze_encoder_steps=tc.get("freeze_encoder_steps", 0)),
        in_shardings=(replicated, batch_sharded), out_shardings=(replicated, replicated), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(model, config.loss, target_fn, config.target.kind, use_ema=tc.ema_decay > 0),
                        in_shardings=(replicated, batch_sharded), out_shardings=(replicated, batch_sharded))
    return model, state, train_step, eval_step


def with_pretrained_encoder(state, path: str, mesh, model_cfg: ml_collections.ConfigDict | None = None):
    """`state` whose encoder variables (params and EMA copy; batch_stats with batch norm) come from
    the pretrained encoder at `path`, with a fresh optimizer state; UserError when they do not fit.
    `path` is an exported encoder, or a SAM/DINOv2/MAE/timm checkpoint file converted on the fly
    to fit `model_cfg` (jaxem.models.convert)."""
    from jaxem.ssl.pretrain import load_encoder

    variables = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
    try:
        pretrained = (convert.load_pretrained(path, model_cfg) if model_cfg is not None and convert.is_checkpoint(path)
                      else load_encoder(path))
        variables = models.transfer_encoder_params(variables, pretrained)
    except UserError as e:
        raise UserError(f"train.init_encoder={path}: {e}") from None
    variables = parallel.replicate(jax.device_get(variables), mesh)
    params = variables["params"]
    opt_state = jax.jit(state.tx.init, out_shardings=parallel.replicated(mesh))(params)
    return state.replace(params=params, ema_params=params, batch_stats=variables.get("batch_stats", state.batch_stats),
                         opt_state=opt_state)


def train(config: ml_collections.ConfigDict, workdir: str | Path, progress: bool = True) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns a summary dict."""
    parallel.initialize_distributed()
    if "ssl" in config:
        raise UserError("the config has an `ssl` section: it describes self-supervised pretraining, run it with "
                        "`jaxem pretrain` (fine-tune its encoder with --config.train.init_encoder=WORKDIR).")
    config = with_dataset_volumes(config)
    workdir = Path(workdir)
    check_workdir(config, workdir)
    check_loop_config(config.train)  # before compiling (run_loop checks again, for every kind of training)
    semi = unlabelled.enabled(config.get("semi"))
    if semi:
        unlabelled.check_semi_config(config)

    tc, ndim = config.train, config.model.ndim
    mesh = parallel.make_mesh(tc.num_devices)
    parallel.check_batch_size(config.data.batch_size, mesh)
    if config.data.batch_size % (mesh.devices.size * tc.accumulate_steps):
        raise UserError(f"data.batch_size={config.data.batch_size} must split into train.accumulate_steps="
                        f"{tc.accumulate_steps} micro-batches on each of {mesh.devices.size} devices.")
    models.check_input_shape(config.model, tuple(config.data.crop_shape))
    channels = targets.num_target_channels(config.target, ndim)
    if config.model.out_channels != channels:
        raise UserError(f"model.out_channels={config.model.out_channels} but target kind "
                        f"{config.target.kind!r} has {channels} channels; set --config.model.out_channels={channels}.")

    # A resumed run continues from its own checkpoint: the pretrained encoder is not needed again.
    model, state, train_step, eval_step = build_training(config, mesh, load_encoder=not has_checkpoints(workdir))
    # Open the data before writing anything, so bad data paths leave the workdir untouched.
    loader = pipeline.make_loader(config.data, mesh=mesh, ndim=ndim, seed=config.seed, split="train")
    if semi:
        loader = unlabelled.PairedLoader(loader, unlabelled.make_unlabelled_loader(config, mesh))
    validate, val_loader = None, None
    if config.data.val_images and tc.eval_every > 0:
        val_loader = pipeline.make_loader(config.data, mesh=mesh, ndim=ndim, seed=config.seed, split="val")
        val_start = val_loader.get_state()
        segment_crop = crop_segmenter(config.target) if tc.eval_instances else None
        validate = lambda state: evaluate(state, eval_step, val_loader, val_start, tc.eval_batches, segment_crop)  # noqa: E731
    try:
        summary, _ = run_loop(config, workdir, state=state, train_step=train_step, loader=loader, meta=run_meta(config),
                              devices=int(mesh.devices.size), validate=validate, progress=progress)
        return summary
    finally:
        if val_loader is not None:
            val_loader.close()


def run_loop(config: ml_collections.ConfigDict, workdir: Path, *, state, train_step: Callable, loader,
             meta: dict, devices: int, validate: Callable | None = None, progress: bool = True,
             train_panels: tuple[str, ...] = ()) -> tuple[dict, Any]:
    """Runs `train_step` over `loader` to `config.train.steps`, with logs, checkpoints and resume.

    The loop every kind of training shares (supervised, self-supervised). `state` is the freshly
    initialised state (replaced by the newest readable checkpoint in `workdir` if there is one);
    `validate(state) -> {name: float}` runs every `train.eval_every` steps when given. Writes the
    resolved config, versions, metrics.jsonl/TensorBoard, checkpoints and training_curves.png;
    closes `loader`; `train_panels` names train metrics that get a panel of their own in the plot.
    Returns (summary dict: steps, time, last validation metrics; the final state).
    """
    tc = config.train
    check_loop_config(tc)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        save_config(config, workdir)
        (workdir / "versions.json").write_text(json.dumps(environment_versions(), indent=2) + "\n")

    ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints, best_metric=tc.best_metric, best_mode=tc.best_mode,
                        async_save=tc.async_checkpoints)
    writer = MetricWriter(workdir, enabled=is_main)
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, data_state, _ = restored
        loader.set_state(data_state)
        writer.truncate_after(int(state.step))
    start = int(state.step)
    summary = {"start_step": start, "parameters": parameter_count(state.params), "devices": devices}
    if start >= tc.steps and is_main:
        print(f"{workdir} already holds a run trained to step {start} (train.steps={tc.steps}): nothing to train; "
              f"raise --config.train.steps to continue it, or use a new --workdir for another experiment.")

    def save(step: int, metrics: dict | None = None, force: bool = False):
        ckpt.save(step, state, loader.get_state(), meta, metrics=metrics, force=force)

    history, last_val, t0 = [], {}, time.time()
    bar = tqdm(total=tc.steps, initial=start, disable=not (progress and is_main), desc="train", unit="step",
               dynamic_ncols=True)
    with _Preemption() as preemption:
        step = start
        while step < tc.steps:
            state, metrics = train_step(state, next(loader))
            step += 1
            history.append(metrics)
            at_log = step % tc.log_every == 0 or step == tc.steps
            at_eval = validate is not None and (step % tc.eval_every == 0 or step == tc.steps)
            preempted = preemption.requested  # read once: a signal arriving later is handled next step
            at_save = step % tc.checkpoint_every == 0 or step == tc.steps or preempted
            if at_log or at_eval or at_save:
                mean = _mean_metrics(history)
                history = []
                if not np.isfinite(mean["loss"]):
                    ckpt.close()
                    loader.close()
                    raise TrainingDiverged(divergence_message(mean["loss"], step, config.data, ckpt.directory))
                writer.write(step, "train", mean)
                bar.set_postfix(loss=f"{mean['loss']:.4f}", **({"val_dice": f"{last_val['dice']:.3f}"} if "dice" in last_val else {}))
            if at_eval:
                last_val = validate(state)
                writer.write(step, "val", last_val)
            if at_save:
                save(step, {f"val_{k}": v for k, v in last_val.items()} if at_eval else None, force=preempted)
            bar.update(1)
            if preempted:
                summary["preempted_at"] = step
                break
    bar.close()
    ckpt.close()
    loader.close()
    writer.close()
    elapsed = time.time() - t0
    summary.update(final_step=step, seconds=elapsed, steps_per_second=(step - start) / max(elapsed, 1e-9),
                   **{f"val_{k}": v for k, v in last_val.items()})
    if is_main and (workdir / "metrics.jsonl").exists():
        plot_curves(workdir / "metrics.jsonl", workdir / "training_curves.png", train_panels)
    return summary, state
