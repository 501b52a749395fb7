"""`jaxem plan --images A.zarr [B.zarr ...] [--labels ...] [--val-images ... --val-labels ...]
[--ndim 2|3] [--tune-after-training] --memory-gib 16 --output configs/x.py`:
nnU-Net-style planning of a U-Net training config from the data and a per-device memory budget
(see jaxem/plan/planner.py and decisions.py). Prints the plan as JSON, writes an editable config
file whose comments say why each field was chosen, and prints the commands that follow."""

from __future__ import annotations

import json
from pathlib import Path

from jaxem.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--images", nargs="+", required=True, help="image volumes to train on")
    parser.add_argument("--labels", nargs="*", default=[], help="their label volumes (one per image), optional")
    parser.add_argument("--val-images", nargs="*", default=[], help="validation volumes (data.val_images)")
    parser.add_argument("--val-labels", nargs="*", default=[], help="their label volumes (one per validation image)")
    parser.add_argument("--ndim", type=int, choices=(2, 3), default=None,
                        help="2 (per section) or 3 (volumes); default: chosen from voxel size, depth and objects")
    parser.add_argument("--tune-after-training", action="store_true",
                        help="plan `jaxem tune` on the validation split to choose the segmentation settings")
    parser.add_argument("--memory-gib", type=float, required=True, help="memory per device for one training step, GiB")
    parser.add_argument("--output", required=True, help="the config file to write, e.g. configs/my_plan.py")
    parser.add_argument("--target", default="boundary", help="target kind (boundary, affinities, ...); default boundary")
    parser.add_argument("--base-width", type=int, default=32, help="channels of the first level (default 32)")
    parser.add_argument("--max-levels", type=int, default=6, help="at most this many U-Net levels (default 6)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def run(args, overrides) -> int:
    # deferred: keeps CLI start-up light (the planner compiles training steps with jax)
    from jaxem.plan.decisions import follow_up
    from jaxem.plan.planner import check_validation, fingerprint, plan, write_config

    if overrides:
        raise UserError(f"unknown arguments {' '.join(overrides)} (jaxem plan takes no --config fields).")
    if Path(args.output).exists() and not args.overwrite:
        raise UserError(f"{args.output} exists; choose another --output or pass --overwrite.")
    if args.memory_gib <= 0:
        raise UserError(f"--memory-gib must be positive, got {args.memory_gib}.")
    check_validation(args.val_images, args.val_labels, args.tune_after_training)
    fp = fingerprint(args.images, args.labels)
    result = plan(fp, args.ndim, args.memory_gib, base_width=args.base_width, max_levels=args.max_levels,
                  target=args.target, val_images=args.val_images, val_labels=args.val_labels,
                  tune=args.tune_after_training)
    path = write_config(result, args.output, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in result.items() if k != "fingerprint"}, indent=2))
    print(f"wrote {path}; then:")
    for command in follow_up(str(path), result["segment"], args.val_images, args.val_labels):
        print(f"  {command}")
    return 0
