"""`jaxem train --config FILE[:ARG] --workdir DIR [--config.a.b=value ...]`."""

from __future__ import annotations

import json

from jaxem.config import apply_overrides, load_config


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="config file (configs/NAME.py or a path), optionally FILE:ARG")
    parser.add_argument("--workdir", required=True, help="run directory: config, logs, checkpoints (resumes if present)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args, overrides) -> int:
    from jaxem.train.parallel import initialize_distributed

    initialize_distributed()  # before the config touches any device
    from jaxem.train.loop import train

    config = apply_overrides(load_config(args.config), overrides)
    summary = train(config, args.workdir, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    if "preempted_at" in summary:
        print(f"preempted at step {summary['preempted_at']}: run the same command to resume.")
    return 0
