"""The one training loop every kind of training runs (supervised: jaxem.train.trainer; self-supervised:
jaxem.ssl.pretrain): it owns time, IO, logging and checkpoints; the steps own the math.

    check_workdir(config, workdir, shape)       # before building anything
    summary, state = run_loop(config, workdir, state=..., train_step=..., loader=..., meta=shape(config), ...)

Running the same command again resumes from the newest readable checkpoint (state, RNG and data
iterator position), so an interrupted run ends with the same parameters as an uninterrupted one.
A run continued with other settings (e.g. more train.steps) keeps a record of what changed at which
step in resumed.jsonl; a finished run asked for again trains nothing and keeps the config.json it
was trained with. SIGTERM (preemption) saves a checkpoint before exiting. A NaN/Inf loss stops the
run with a clear message; checkpoints are only written after the loss of that step was seen to be finite. Whether a
workdir's checkpoints fit a config is decided by the run's shape, {what: fingerprint} of everything
its checkpoints depend on, which the trainer computes (`section_shape` plus what add-ons contribute)
and each checkpoint records as its metadata.
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

from jaxem.config import config_differences, fingerprint, save_config
from jaxem.data.volume import nonfinite_count, open_volume
from jaxem.errors import UserError
from jaxem.train.checkpoint import Checkpointer, check_checkpoint_path
from jaxem.train.logs import MetricWriter, environment_versions, plot_curves
from jaxem.train.state import parameter_count

RunShape = dict[str, str]  # {what a run's checkpoints depend on, as an error names it: its fingerprint}


class TrainingDiverged(UserError):
    """The loss became NaN or Inf."""


# Settings a run can change on resume without changing what it computes (performance only).
PERFORMANCE_FIELDS = ("data.num_workers", "data.prefetch", "train.async_checkpoints")


def check_workdir(config: ml_collections.ConfigDict, workdir: Path,
                  shape: Callable[[ml_collections.ConfigDict], RunShape], exact: bool = False) -> None:
    """UserError when `workdir` holds checkpoints of a run whose shape differs from `config`'s:
    `shape(config)` (e.g. the trainer's `run_shape`) is applied to the run's saved config.json and
    to `config`; an entry present in only one of the two differs too; and when orbax could not
    write readable checkpoints there (`check_checkpoint_path`). `exact`: also when the run was
    trained with any other setting both configs have (PERFORMANCE_FIELDS aside), e.g. another
    learning rate or number of steps: for drivers that reuse finished runs and must not score one
    trained otherwise."""
    check_checkpoint_path(workdir)
    saved_path = workdir / "config.json"
    if not saved_path.exists():
        if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
            raise UserError(f"{workdir} holds checkpoints but no config.json; use a new --workdir.")
        return
    saved_config = json.loads(saved_path.read_text())
    saved, wanted = shape(ml_collections.ConfigDict(saved_config)), shape(config)
    for what in [*wanted, *(w for w in saved if w not in wanted)]:
        if saved.get(what) != wanted.get(what):
            raise UserError(f"{workdir} holds a run with a different {what}; use a new --workdir "
                            f"(or delete {workdir}) instead of mixing experiments.")
    # fields only one config has (added to jaxem since) are not compared: the run had none of them
    changed = config_differences(saved_config, config, ignore=PERFORMANCE_FIELDS, shared_only=True) if exact else {}
    if changed and has_checkpoints(workdir):
        raise UserError(f"{workdir} holds a run trained with other settings ({describe_changes(changed)}); "
                        "use another run directory for them (or delete this one) rather than reuse it.")


def describe_changes(changed: dict[str, tuple]) -> str:
    """"train.steps 2000 -> 4000, ..." for config_differences' result (at most five, then a count)."""
    shown = [f"{key} {old!r} -> {new!r}" for key, (old, new) in list(changed.items())[:5]]
    return ", ".join(shown) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")


def section_shape(config: ml_collections.ConfigDict, sections: tuple[str, ...], ignore: tuple[str, ...] = ()) -> RunShape:
    """{"`section` config": fingerprint} of each of `sections` that `config` has, without the fields
    named in `ignore` ("section.field", e.g. "ssl.probe_images": settings the checkpoints do not hold)."""
    shape = {}
    for section in sections:
        if section in config:
            fields = {k: v for k, v in config[section].to_dict().items() if f"{section}.{k}" not in ignore}
            shape[f"`{section}` config"] = fingerprint(ml_collections.ConfigDict(fields))
    return shape


def has_checkpoints(workdir: Path) -> bool:
    """Whether `workdir` holds at least one finished checkpoint (a step directory)."""
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


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


def record_settings(config: ml_collections.ConfigDict, workdir: Path, saved_config: dict | None, step: int) -> None:
    """Writes the config and versions a run (re)starts with to `workdir`; when it continues at
    `step` a run saved with `saved_config` and settings changed, says which and appends
    {"step", "changed": {field: [before, after]}} to resumed.jsonl (config.json then holds the
    newest settings, resumed.jsonl what the earlier steps ran with)."""
    changed = config_differences(saved_config, config, ignore=PERFORMANCE_FIELDS) if saved_config else {}
    if changed:
        print(f"{workdir}: continuing at step {step} with changed settings: {describe_changes(changed)}.")
        with open(workdir / "resumed.jsonl", "a") as log:
            log.write(json.dumps({"step": step, "changed": {k: list(v) for k, v in changed.items()}}) + "\n")
    save_config(config, workdir)
    (workdir / "versions.json").write_text(json.dumps(environment_versions(), indent=2) + "\n")


def run_loop(config: ml_collections.ConfigDict, workdir: Path, *, state, train_step: Callable, loader,
             meta: dict, devices: int, validate: Callable | None = None, progress: bool = True,
             train_panels: tuple[str, ...] = ()) -> tuple[dict, Any]:
    """Runs `train_step` over `loader` to `config.train.steps`, with logs, checkpoints and resume.

    The loop every kind of training shares (supervised, self-supervised); the caller has checked
    `config` (check_loop_config among its checks) and `workdir` (check_workdir) before building
    anything. `state` is the freshly initialised state (replaced by the newest readable checkpoint
    in `workdir` if there is one); `meta` (the run's shape) is recorded with every checkpoint;
    `validate(state) -> {name: float}` runs every `train.eval_every` steps when given. Writes the
    resolved config and versions (`record_settings`; not over a finished run's), metrics.jsonl/
    TensorBoard, checkpoints and training_curves.png; closes `loader`; `train_panels` names train metrics that get a panel of their own in the plot.
    Returns (summary dict: steps, time, last validation metrics; the final state).
    """
    tc = config.train
    is_main = jax.process_index() == 0
    saved_path = workdir / "config.json"
    saved_config = json.loads(saved_path.read_text()) if saved_path.is_file() else None
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
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
    elif is_main:
        record_settings(config, workdir, saved_config if restored is not None else None, start)

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
