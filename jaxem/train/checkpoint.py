"""Orbax checkpoints of a run: train state, data-iterator state and run metadata.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta,metrics}`. Kept: the last `keep` checkpoints plus the
best one by the chosen validation metric (`train.best_metric`, e.g. "val_loss" with best_mode
"min"): the validation metrics of a step are saved with its checkpoint (orbax's `metrics`, kept
only when `best_fn` is set), and inference loads the best step, or the newest when best_metric is
"" or no checkpoint has metrics. Saves are asynchronous (training continues while the previous
checkpoint is written). A checkpoint that cannot be read is skipped with a warning on stderr and
the one before it is used (by training, which also deletes the unreadable one so that it is
written again, and by inference, which changes nothing on disk), so a crash during a save never
costs more than one interval.

A pretrained encoder is exported beside a run's checkpoints, `WORKDIR/encoder/{variables/,model.json}`
(`export_encoder`), and read back by `load_encoder` to start fine-tuning from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from jaxem import models
from jaxem.config import load_saved_config
from jaxem.errors import UserError
from jaxem.models.transfer import MODEL_FILE, VARIABLES_DIR, exported_encoder_dir


def _array_fields(state) -> list[str]:
    """The pytree fields of a state dataclass (TrainState or a subclass): all but the optimizer."""
    return [f.name for f in dataclasses.fields(state) if f.metadata.get("pytree_node", True)]


def state_to_tree(state) -> dict:
    """The saved part of a TrainState (everything but the optimizer definition)."""
    return {name: getattr(state, name) for name in _array_fields(state)}


def tree_to_state(template, tree: dict):
    """A state like `template` holding the arrays of a restored tree."""
    return template.replace(**{name: tree[name] for name in _array_fields(template)})


def metric_score(best_metric: str, best_mode: str):
    """`fn(metrics) -> float`: the value of `best_metric`, the worst possible one for checkpoints
    saved without it (by an earlier run of the workdir that ranked another metric)."""
    worst = float("inf") if best_mode == "min" else float("-inf")
    return lambda metrics: float(metrics.get(best_metric, worst))


def check_checkpoint_path(directory: str | os.PathLike, what: str = "--workdir") -> None:
    """UserError when orbax cannot write checkpoints under `directory`: square brackets in its
    absolute path (orbax finds its per-process parts by glob, where `[...]` is a character class,
    and silently writes a checkpoint it cannot read)."""
    resolved = str(Path(directory).resolve())
    if "[" in resolved or "]" in resolved:
        raise UserError(f"{what} {directory} has square brackets in its path ({resolved}), where orbax cannot "
                        "write readable checkpoints; choose a path without '[' or ']'.")


class Checkpointer:
    """Saves and restores a run's checkpoints under `workdir/checkpoints`."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 3, best_metric: str = "",
                 best_mode: str = "min", async_save: bool = True, read_only: bool = False):
        """`read_only` (inference): nothing on disk is changed and the saved metrics are read only
        when asked for; otherwise step directories whose metrics file is torn are deleted first
        (orbax reads every step's metrics when it opens and fails on a torn one). A `workdir` whose
        path orbax cannot use (`check_checkpoint_path`) is refused before anything is touched."""
        check_checkpoint_path(workdir)
        self.directory = Path(workdir).resolve() / "checkpoints"
        if not read_only:
            remove_torn_metrics(self.directory)
        self.best_metric, self.best_mode = best_metric, best_mode
        keep_policies = [policies.LatestN(n=keep)]
        score = metric_score(best_metric, best_mode)
        if best_metric:
            keep_policies.append(policies.BestN(get_metric_fn=score, reverse=(best_mode == "min"), n=1,
                                                keep_checkpoints_without_metrics=False))
        # orbax writes a step's metrics only when best_fn is set; best_fn ranks, BestN keeps.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            best_fn=score if best_metric else None, best_mode=best_mode,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            lightweight_initialize=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def save(self, step: int, state, data_state: dict, meta: dict, metrics: dict | None = None,
             force: bool = False) -> bool:
        """Starts saving (asynchronously); `metrics` (floats) rank the best checkpoint, so they
        must hold `best_metric` when one is set (UserError otherwise)."""
        if metrics is not None and self.best_metric and self.best_metric not in metrics:
            raise UserError(f"train.best_metric={self.best_metric!r} is not one of the validation metrics "
                            f"({', '.join(sorted(metrics))}); set one of them, or '' to use the latest checkpoint.")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state_to_tree(state)),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, metrics=metrics, force=force)

    def steps(self) -> list[int]:
        """The steps of the checkpoints on disk, oldest first."""
        return sorted(self.manager.all_steps())

    def restore_latest(self, template_state) -> tuple[Any, dict, dict] | None:
        """(state, data_state, meta) of the newest readable checkpoint, or None when there is none.

        The state is restored onto the shardings of `template_state` (replicated on the mesh).
        Newer checkpoints that cannot be read (torn by a crash during a save) are deleted, so the
        resumed run writes those steps again and leaves no unreadable checkpoint behind.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_to_tree(template_state))
        for step in reversed(self.steps()):
            self._refuse_another_layout(step, abstract)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ))
            except Exception as e:  # a torn or corrupted checkpoint: fall back to the previous one
                warn_unreadable(self.directory / str(step), e, "deleted; resuming from the previous one")
                self.manager.delete(step)
                continue
            return tree_to_state(template_state, restored["state"]), restored["data"], restored["meta"]
        return None

    def _refuse_another_layout(self, step: int, abstract: dict) -> None:
        """UserError when checkpoint `step` is readable but holds a state of another layout than
        `abstract` (an array added, removed or reshaped by a change of config or of jaxem): such
        a checkpoint is not torn, and deleting it would lose the run. Unreadable metadata passes
        (the restore then treats the checkpoint as torn)."""
        try:
            saved = _leaf_shapes(ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state").tree)
        except Exception:
            return
        expected = _leaf_shapes(abstract)
        differences = sorted(p for p in saved.keys() | expected.keys() if saved.get(p) != expected.get(p))
        if differences:
            path, more = differences[0], f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
            raise UserError(
                f"checkpoint {self.directory / str(step)} holds a train state of another layout: "
                f"'{path}' is {_describe(saved.get(path))} there and {_describe(expected.get(path))} for this run"
                f"{more}; resume with the config that wrote it, or set another train.workdir.")

    def best_step(self) -> int | None:
        """The step with the best saved metric (None when no checkpoint has metrics)."""
        scored = [(s, self._metrics(s)) for s in self.steps()] if self.best_metric else []
        scored = [(s, m[self.best_metric]) for s, m in scored if m and self.best_metric in m]
        if not scored:
            return None
        pick = min if self.best_mode == "min" else max
        return pick(scored, key=lambda item: item[1])[0]

    def _metrics(self, step: int) -> dict | None:
        """The metrics saved with checkpoint `step` (None when it has none or they cannot be read)."""
        try:
            return self.manager.metrics(step)
        except Exception:  # a torn checkpoint's metrics rank nothing; restoring it warns
            return None

    def wait(self) -> None:
        """Blocks until the checkpoints being saved are written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the saves in flight and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def _leaf_shapes(tree) -> dict[str, tuple]:
    """{"params/encoder/.../kernel": shape} of every array leaf of a (metadata or abstract) tree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
            for path, leaf in leaves if hasattr(leaf, "shape")}


def _describe(shape: tuple | None) -> str:
    return "absent" if shape is None else f"an array of shape {shape}"


def remove_torn_metrics(directory: Path) -> None:
    """Deletes (with a warning) the step directories under `directory` whose saved metrics are not
    valid JSON: checkpoints torn during their save. Process 0 deletes, every process waits for it."""
    if jax.process_index() == 0 and directory.is_dir():
        for step_dir in sorted(p for p in directory.iterdir() if p.name.isdigit()):
            metrics = step_dir / "metrics" / "metrics"
            try:
                json.loads(metrics.read_text()) if metrics.is_file() else None
            except ValueError as e:
                warn_unreadable(step_dir, e, "deleted; resuming from the previous one")
                shutil.rmtree(step_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxem checkpoints: torn steps removed")


def warn_unreadable(directory: Path, error: Exception, action: str) -> None:
    """One warning line on stderr: checkpoint `directory` could not be read (`error`), and what is done."""
    reason = str(error).splitlines()[0] if str(error) else ""
    print(f"warning: checkpoint {directory} could not be read ({type(error).__name__}: {reason[:200]}); {action}.",
          file=sys.stderr)


def restore_for_inference(path: str | os.PathLike, step: int | None = None):
    """Loads a trained model from a run directory (best checkpoint, else latest) or a step directory.

    From a run directory, a checkpoint that cannot be read is skipped with a warning on stderr and
    the next candidate (the newest of the older ones) is loaded; a step directory named
    explicitly must be readable (UserError otherwise). Returns (config, model, variables) where variables = {"params": ..., ["batch_stats": ...]}
    (EMA weights when the run used EMA), ready for `model.apply(variables, x, train=False)`.
    """
    path = Path(path)
    if path.name.isdigit() and (path.parent.name == "checkpoints"):
        step, run_dir = int(path.name), path.parent.parent
    else:
        run_dir = path
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{path} is not a jaxem run directory or checkpoint (no config.json in {run_dir}).")
    config = load_saved_config(run_dir)
    if "ssl" in config:
        raise UserError(f"{run_dir} is a self-supervised pretraining run (its model has no segmentation output yet); "
                        f"fine-tune it first: jaxem train ... --config.train.init_encoder={run_dir}")
    train_cfg = config.train
    ckpt = Checkpointer(run_dir, best_metric=train_cfg.get("best_metric", ""), best_mode=train_cfg.get("best_mode", "min"),
                        async_save=False, read_only=True)
    if not ckpt.steps():
        raise UserError(f"{run_dir} holds no checkpoints yet (train first, or point at another run).")
    if step is not None and step not in ckpt.steps():
        raise UserError(f"{run_dir} has no checkpoint at step {step} (it has {ckpt.steps()}).")
    restored = _restore_first_readable(ckpt, [step] if step is not None else inference_steps(ckpt))
    ckpt.close()
    use_ema = float(train_cfg.get("ema_decay", 0.0)) > 0
    variables = {"params": restored["ema_params"] if use_ema else restored["params"]}
    if restored.get("batch_stats"):
        variables["batch_stats"] = restored["batch_stats"]
    model = models.build(config.model)
    _check_params_match(model, config, variables, run_dir)
    return config, model, variables


def inference_steps(ckpt: Checkpointer) -> list[int]:
    """The steps inference tries, in order: the best one (when best_metric ranks any), then the
    others newest first."""
    best, newest_first = ckpt.best_step(), ckpt.steps()[::-1]
    return ([best] if best is not None else []) + [s for s in newest_first if s != best]


def _restore_first_readable(ckpt: Checkpointer, steps: list[int]) -> dict:
    """The saved state tree of the first readable checkpoint of `steps`, on this process's first
    device; unreadable ones are skipped with a warning (the last one, or the only one, raises
    UserError instead)."""
    for i, step in enumerate(steps):
        directory = ckpt.directory / str(step)
        try:
            return restore_on_this_host(directory / "state")
        except Exception as e:  # torn or corrupted: the next candidate
            if i + 1 == len(steps):
                raise UserError(f"checkpoint {directory} cannot be read (truncated or corrupted: {type(e).__name__})"
                                f"{' and neither can the older ones' if i else ''}; train again or use another run.") from None
            warn_unreadable(directory, e, f"using checkpoint {steps[i + 1]} instead")
    raise UserError(f"{ckpt.directory.parent} holds no checkpoints.")


def restore_on_this_host(directory: str | os.PathLike) -> dict:
    """The tree saved by orbax in `directory` with every array on this process's first device,
    whatever the device count it was saved from (orbax otherwise refuses a checkpoint saved on
    another topology: a run trained on 8 GPUs could not predict on 1)."""
    directory = Path(directory).resolve()
    # The handler reads the tree's metadata without looking for the checkpoint-level metadata file,
    # which an item of a CheckpointManager step does not have (orbax would warn on every restore).
    metadata = ocp.StandardCheckpointHandler().metadata(directory)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    return ocp.StandardCheckpointer().restore(directory, target)


def save_tree(directory: str | os.PathLike, tree: Any) -> None:
    """Saves a pytree of arrays with orbax into `directory` (replacing what is there); every
    process of a multi-process job must call it."""
    check_checkpoint_path(directory, "the checkpoint directory")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(directory).resolve(), tree, force=True)
    checkpointer.wait_until_finished()


def _check_params_match(model, config: ml_collections.ConfigDict, variables: dict, where) -> None:
    """UserError when the checkpoint's parameter shapes do not fit the config's model."""
    ndim = config.model.ndim
    x = jnp.zeros((1,) + tuple(config.data.crop_shape)[-ndim:] + (1,), jnp.float32)
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))["params"]
    got = jax.tree.map(lambda a: tuple(a.shape), variables["params"])
    want = jax.tree.map(lambda a: tuple(a.shape), expected)
    if got != want:
        raise UserError(f"the checkpoint in {where} does not match its config's model (parameter shapes differ).")


def export_encoder(directory: str | os.PathLike, variables: dict, record: dict) -> Path:
    """Writes encoder `variables` ({"params", ["batch_stats"]}, orbax) to `directory`/variables and
    `record` (the model config they fit, the pretraining config, step, `parts`: the transferred
    subtrees) to `directory`/model.json. Every process of a multi-process run must call it (process
    0 writes model.json). Returns `directory`."""
    directory = Path(directory)
    save_tree(directory / VARIABLES_DIR, variables)
    if jax.process_index() == 0:
        (directory / MODEL_FILE).write_text(json.dumps(record, indent=2, default=list) + "\n")
    return directory


def load_encoder(path: str | os.PathLike) -> dict:
    """The encoder variables {"params": ..., ["batch_stats": ...]} from an exported encoder
    directory or a pretraining run directory (its `encoder/`), on this process's first device."""
    directory = exported_encoder_dir(path)
    if not (directory / MODEL_FILE).is_file() or not (directory / VARIABLES_DIR).is_dir():
        raise UserError(f"{path} holds no exported encoder (expected {directory}/{MODEL_FILE} and "
                        f"{VARIABLES_DIR}/; pretrain with `jaxem pretrain` first, to the end).")
    return restore_on_this_host(directory / VARIABLES_DIR)
