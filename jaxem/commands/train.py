"""`jaxem train --config FILE[:ARG] --workdir DIR [--config.a.b=value ...]`.

A config with a `demo` section (configs/demo.py) and neither data.train_images nor data.dataset
trains on the demo's synthetic volumes, written once to DIR/data (as `jaxem demo` does).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jaxem.config import apply_overrides, load_config
from jaxem.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="config file (configs/NAME.py or a path), optionally FILE:ARG")
    parser.add_argument("--workdir", required=True, help="run directory: config, logs, checkpoints (resumes if present)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def needs_synthetic_data(config) -> bool:
    """Whether `config` names no training volumes but has a `demo` section to generate them from."""
    return "demo" in config and not config.data.train_images and not config.data.get("dataset", "")


def with_synthetic_data(config, data_dir: Path):
    """The config with data.{train,val}_{images,labels} set to the demo's synthetic volumes in
    `data_dir` (written once, by process 0 of a multi-process run while the others wait)."""
    import jax
    from jax.experimental import multihost_utils

    # deferred: keeps CLI start-up light
    from jaxem.commands.demo import with_data_paths, write_synthetic_data

    if jax.process_index() == 0:
        paths = write_synthetic_data(config, data_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxem train: synthetic volumes written")
    if jax.process_index() != 0:
        paths = write_synthetic_data(config, data_dir)  # already there: returns the paths only
    return with_data_paths(config, paths)


def run(args, overrides) -> int:
    # deferred: keeps CLI start-up light (and runs before the imports below touch any device)
    from jaxem.train.parallel import initialize_distributed

    initialize_distributed()  # before the config touches any device
    # deferred: keeps CLI start-up light
    from jaxem.data.guard import refuse_overlap, volume_fields
    from jaxem.train.loop import has_checkpoints
    from jaxem.train.trainer import train

    config = apply_overrides(load_config(args.config), overrides)
    refuse_overlap("--workdir", args.workdir, [(f"data.{k}", v) for k, v in volume_fields(config.data)], holding_ok=True)
    workdir, fresh = Path(args.workdir), not Path(args.workdir).exists()
    try:
        if needs_synthetic_data(config):
            print(f"no data.train_images: training on the demo's synthetic volumes in {workdir / 'data'}")
            config = with_synthetic_data(config, workdir / "data")
        summary = train(config, workdir, progress=not args.no_progress)
    except UserError:
        if fresh and workdir.exists() and not has_checkpoints(workdir):
            shutil.rmtree(workdir)  # this command made it (synthetic data, logs) and trained nothing: leave no trace
        raise
    print(json.dumps(summary, indent=2))
    if "preempted_at" in summary:
        print(f"preempted at step {summary['preempted_at']}: run the same command to resume.")
    return 0
