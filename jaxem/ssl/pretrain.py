"""Self-supervised pretraining runs and what of their network is exported for fine-tuning.

    summary = pretrain(config, workdir)     # config.ssl says how; config.model names the encoder
    variables = jaxem.train.checkpoint.load_encoder(workdir)   # {"params": ..., ["batch_stats": ...]}

`config.model` is the segmentation model the encoder will serve (a U-Net, or a 'resnet'/'vit'
encoder model): its 'encoder' is pretrained, so the result copies into the same config's model.
A run writes what a supervised run writes (config.json, metrics.jsonl, TensorBoard events,
checkpoints, training_curves.png) plus `encoder/`: the encoder's variables (orbax) and
`model.json`, the model config they fit. Fine-tune with `--config.train.init_encoder=WORKDIR`.
With `ssl.probe_images`/`probe_labels` a linear probe of the encoder (jaxem.ssl.probe) is logged
as the run's validation metrics every `train.eval_every` steps, from the random init at step 0.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections

from jaxem import models
from jaxem.data import augment, pipeline
from jaxem.models.transfer import ENCODER_DIR, network_parts
from jaxem.ssl import mae, masked
from jaxem.ssl.contrastive import (MOMENTUM_METHODS, build_contrastive_model, check_ssl_config,
                                   create_contrastive_state, make_contrastive_step)
from jaxem.ssl.probe import PROBE_FIELDS, encoder_variables, make_probe
from jaxem.train import checkpoint, parallel
from jaxem.train.loop import RunShape, check_loop_config, check_workdir, run_loop, section_shape
from jaxem.train.state import create_train_state, make_optimizer

SECTIONS = ("model", "ssl")  # a change here makes the workdir's checkpoints unusable


def run_shape(config: ml_collections.ConfigDict) -> RunShape:
    """What a pretraining run's checkpoints depend on: `model` and `ssl` but the probe's settings
    (the probe may change on resume)."""
    return section_shape(config, SECTIONS, ignore=PROBE_FIELDS)


def validate_pretraining_config(config: ml_collections.ConfigDict, mesh) -> None:
    """UserError naming the first setting of `config` that pretraining on `mesh` cannot run with
    (loop minimums, batch size, the `ssl` section, the model's input shape); nothing is built."""
    check_loop_config(config.train)
    parallel.check_batch_size(config.data.batch_size, mesh)
    check_ssl_config(config.ssl, config.data.batch_size)
    if config.ssl.method == "mim":
        masked.check_masked_config(config.ssl, tuple(config.data.crop_shape))
    if config.ssl.method == "mae":
        mae.check_mae_config(config)
    models.check_input_shape(config.model, tuple(config.data.crop_shape))


def pretrain(config: ml_collections.ConfigDict, workdir: str | Path, progress: bool = True, exact: bool = False) -> dict:
    """Pretrains `config.model`'s encoder with `config.ssl` on `config.data.train_images` (labels
    are not read); resumes from `workdir`'s checkpoints; exports the encoder when done. `exact`: a
    run in `workdir` pretrained with any other setting is a UserError rather than continued.

    Returns the loop's summary plus `encoder_dir`.
    """
    parallel.initialize_distributed()
    workdir = Path(workdir)
    check_workdir(config, workdir, run_shape, exact=exact)
    mesh = parallel.make_mesh(config.train.num_devices)
    validate_pretraining_config(config, mesh)
    if config.ssl.method in MOMENTUM_METHODS and config.model.get("norm") == "batch" and jax.process_index() == 0:
        name = "MoCo" if config.ssl.method == "moco" else "DenseCL (MoCo's key encoder and queue)"
        print(f"warning: {name} with a batch-norm encoder: MoCo half-collapsed on ISBI 2012 (docs/ssl.md); group "
              "norm (the U-Net default) or ssl.method=simclr trained well there.")

    probe = make_probe(config)  # the linear probe (jaxem.ssl.probe), the loop's `validate`; None when off
    state, train_step = build_pretraining(config, mesh)
    loader = pipeline.make_loader(config.data, mesh=mesh, ndim=config.model.ndim, seed=config.seed, split="train",
                                  labelled=False)
    baseline = probe.start(state, workdir) if probe else {}  # the random-init encoder, logged at step 0
    summary, state = run_loop(config, workdir, state=state, train_step=train_step, loader=loader,
                              meta=run_shape(config), devices=int(mesh.devices.size), progress=progress,
                              train_panels=train_panels(config.ssl), validate=probe)
    summary.update(baseline)
    if "preempted_at" not in summary:
        summary["encoder_dir"] = str(export_encoder(state, config, workdir / ENCODER_DIR))
    return summary


def train_panels(ssl_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The train metrics that get a panel of their own in training_curves.png beside the loss."""
    if ssl_cfg.method == "mim":
        return ("masked_r2", "visible_mse")
    if ssl_cfg.method == "mae":
        return ("masked_r2",)
    dense = ("dense_accuracy",) if ssl_cfg.method == "densecl" else ()
    return ("accuracy", "positive_cosine", "embedding_std") + dense


def build_pretraining(config: ml_collections.ConfigDict, mesh):
    """(initial state, jitted train_step) on `mesh`: state replicated, batches sharded. The state
    is a ContrastiveState for the contrastive methods, a TrainState of the whole network for mim,
    a TrainState of the ViT encoder and MAE's decoder for mae."""
    tx = make_optimizer(config.optimizer, config.train.steps)
    replicated, batch_sharded = parallel.replicated(mesh), parallel.data_sharding(mesh)
    init_shape = (1,) + tuple(config.data.crop_shape) + (1,)
    if config.ssl.method in ("mim", "mae"):  # a network that paints hidden patches: a plain TrainState
        if config.ssl.method == "mim":
            model, make_step = masked.build_reconstruction_model(config.model), masked.make_masked_step
        else:
            model, make_step = mae.build_mae_model(config.model, config.ssl), mae.make_mae_step
        state = jax.jit(lambda rng: create_train_state(model, tx, rng, init_shape), out_shardings=replicated)(
            jax.random.PRNGKey(config.seed))
        step = make_step(model, config.ssl, augment.make_augment_fn(config.augment, config.model.ndim))
        train_step = jax.jit(step, in_shardings=(replicated, batch_sharded), out_shardings=(replicated, replicated),
                             donate_argnums=0)
        return state, train_step
    model = build_contrastive_model(models.build(config.model).encoder, config.ssl)
    state = jax.jit(lambda rng: create_contrastive_state(model, tx, rng, init_shape, config.ssl),
                    out_shardings=replicated)(jax.random.PRNGKey(config.seed))
    two_views = augment.make_two_view_fn(config.augment, config.model.ndim, tuple(config.ssl.crop_scale))
    train_step = jax.jit(make_contrastive_step(model, config.ssl, two_views),
                         in_shardings=(replicated, batch_sharded), out_shardings=(replicated, replicated),
                         donate_argnums=0)
    return state, train_step


def export_encoder(state, config: ml_collections.ConfigDict, directory: str | Path) -> Path:
    """Exports the network of a pretraining `state` that fine-tuning starts from to `directory`
    (jaxem.train.checkpoint.export_encoder; model.json also records the ssl config, the step and
    `parts`, the transferred subtrees). The contrastive methods export the bare encoder tree (mae
    too: the ViT alone, without its decoder); mim exports the whole network but its head,
    {"encoder": ..., "dec0": ..., ...}, and fine-tuning copies every part. Every process of a
    multi-process run must call it. Returns `directory`."""
    if config.ssl.method == "mim":
        variables = {"params": network_parts(state.params)}
        if state.batch_stats:
            variables["batch_stats"] = network_parts(state.batch_stats)
        parts = sorted(variables["params"])
    else:
        variables, parts = encoder_variables(state), ["encoder"]
    record = {"model": config.model.to_dict(), "ssl": config.ssl.to_dict(), "step": int(state.step), "parts": parts}
    return checkpoint.export_encoder(directory, variables, record)
