"""`jaxem evaluate`: the standard evaluation protocol (jaxem.protocols.report) from the command line."""

from __future__ import annotations

import json
from pathlib import Path

from jaxem.data.guard import refuse_overlap, staged
from jaxem.data.volume import refuse_nonfinite
from jaxem.errors import UserError
from jaxem.protocols import report


def add_arguments(parser) -> None:
    parser.add_argument("--pred", required=True, help="prediction volume (zarr / tensorstore path or TIFF)")
    parser.add_argument("--gt", required=True, help="ground-truth volume (zarr / tensorstore path or TIFF)")
    parser.add_argument("--task", required=True, choices=report.TASKS)
    parser.add_argument("--mask", default=None, help="optional volume; voxels where it is 0 are ignored")
    parser.add_argument("--out", required=True, help="folder for report.json, report.md, morphology CSV and plots")
    parser.add_argument("--channel", type=int, default=None,
                        help="for a prediction map (c, *spatial) of `jaxem predict`: the channel to score (default: "
                             "the only one; a multiclass map is scored by its argmax class)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="foreground threshold for float predictions (and `jaxem predict --dtype uint8` maps, read as v / 255)")
    parser.add_argument("--boundary-is-zero", action="store_true",
                        help="boundary task: value 0 marks boundary (ISBI 2012 labels: 0 membrane, 255 cell)")
    parser.add_argument("--block-voxels", type=int, default=report.BLOCK_VOXELS, help="voxels read per block")
    parser.add_argument("--allow-nan", action="store_true",
                        help="score a float prediction holding NaN/Inf (refused otherwise): NaN counts as probability 0 "
                             "(background), +Inf as 1, -Inf as 0")
    parser.add_argument("--overwrite", action="store_true", help="replace the report already in --out")


def run(args, overrides) -> int:
    if overrides:
        raise UserError(f"unknown arguments {' '.join(overrides)}; see `jaxem evaluate --help`.")
    check_inputs(args)
    check_out(args)
    with staged(args.out, args.overwrite, "--out") as out:  # a crash leaves no partial report
        result = report.run_protocol(args.pred, args.gt, args.task, out, args.mask, args.channel, threshold=args.threshold,
                                     boundary_is_zero=args.boundary_is_zero, block_voxels=args.block_voxels)
    keys = [k for k in ("dice", "adapted_rand_error", "vrand", "vinfo", "voi_split", "voi_merge",
                        "warping_error", "map", "pq") if k in result]
    print(json.dumps({k: result[k] for k in keys}))
    print(f"wrote {args.out}/report.json and report.md")
    return 0


def check_inputs(args) -> None:
    """UserError for a --block-voxels below 1, a --channel that does not fit --pred, or a float
    --pred holding NaN/Inf without --allow-nan (with it, `_foreground`'s `p > threshold` reads NaN
    as background and +Inf as foreground)."""
    if args.block_voxels < 1:
        raise UserError(f"--block-voxels {args.block_voxels} must be at least 1 (voxels read per block).")
    pred = report.open_source(args.pred)
    report.prediction_source(pred, report.open_source(args.gt), args.channel)
    refuse_nonfinite(pred, args.pred, args.allow_nan, args.block_voxels)


def check_out(args) -> None:
    """Refuses an --out that overlaps the inputs, is a file, or is a non-empty folder holding no
    report (--overwrite replaces a previous report's folder, never some other folder)."""
    refuse_overlap("--out", args.out, {"--pred": args.pred, "--gt": args.gt, "--mask": args.mask})
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; --out names the folder to write report.json and report.md into.")
    if args.overwrite and out.is_dir() and any(out.iterdir()) and not (out / "report.json").exists():
        raise UserError(f"--out {out} is a folder holding no report.json; --overwrite replaces only an earlier "
                        "report, so choose a new or empty folder.")
