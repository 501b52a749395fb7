"""`jaxem tune`: choose segmentation settings on a labelled prediction; `jaxem segment --params` applies them.

    jaxem tune --input pred.zarr --labels labels.zarr --output tuned.json
               [--kind boundary|foreground|affinities] [--channel 0] [--per-slice] [--metric vrand]
               [--methods watershed,agglomerate] [--overwrite] [--no-progress]

Writes tuned.json (the best setting, its score and the whole table) and tuned.png (the metric
against each setting's swept value); prints the best setting as JSON. `--methods` keeps only those
methods' settings of the default grid.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxem.errors import UserError


def add_arguments(parser) -> None:
    # deferred: keeps CLI start-up light
    from jaxem.segment.setting import KINDS
    from jaxem.segment.tune import METRICS

    parser.add_argument("--input", required=True, help="prediction volume of `jaxem predict` ((c, *spatial) or (*spatial))")
    parser.add_argument("--labels", required=True, help="ground-truth instance ids of the same region (0 = boundary / unlabelled)")
    parser.add_argument("--output", required=True, help="JSON file for the settings (a PNG of the sweep is written beside it)")
    parser.add_argument("--kind", default=None, choices=KINDS,
                        help="what the prediction holds (default: what `jaxem predict` recorded, else boundary)")
    parser.add_argument("--channel", type=int, default=0, help="channel of a (c, ...) boundary or foreground prediction")
    parser.add_argument("--per-slice", action="store_true", help="segment and score each z-slice on its own (ISBI 2012)")
    parser.add_argument("--metric", default="vrand", choices=tuple(METRICS), help="what the best setting maximises or minimises")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods whose default-grid settings to try (default: all of the kind's)")
    parser.add_argument("--allow-nan", action="store_true",
                        help="tune on a prediction holding NaN/Inf (refused otherwise): NaN read as probability 0, "
                             "+Inf as 1, -Inf as 0")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


def run(args, overrides) -> int:
    # deferred: keeps CLI start-up light
    from jaxem.data.guard import refuse_overlap
    from jaxem.data.volume import as_probabilities, finite_probabilities, open_volume, read_attributes, refuse_nonfinite, unwritable
    from jaxem.segment.setting import KINDS
    from jaxem.segment.tune import default_grid, plot_tuning, tune

    if overrides:
        raise UserError(f"unexpected arguments {' '.join(overrides)}.")
    output = Path(args.output)
    if output.suffix != ".json":
        raise UserError(f"--output {output} must be a .json file.")
    if output.exists() and not args.overwrite:
        raise UserError(f"--output {output} exists; pass --overwrite to replace it.")
    for written in (output, output.with_suffix(".png")):
        refuse_overlap("--output", written, {"--input": args.input, "--labels": args.labels})
    source = open_volume(args.input)
    target = read_attributes(args.input).get("jaxem_target", {})
    kind = args.kind or target.get("kind", "boundary")
    if kind not in KINDS:
        raise UserError(f"{args.input} holds {kind!r} predictions; pass --kind boundary, foreground or affinities.")
    refuse_nonfinite(source, args.input, args.allow_nan)
    prediction, offsets = finite_probabilities(as_probabilities(source.read())), target.get("offsets")
    channel_first = source.axes[0] == "c"
    if kind == "affinities":
        if not channel_first or not offsets:
            raise UserError(f"{args.input} has no affinity offsets recorded; tune affinities predicted by `jaxem predict`.")
    elif channel_first:
        if not 0 <= args.channel < prediction.shape[0]:
            raise UserError(f"--channel {args.channel} is outside the {prediction.shape[0]} channels of {args.input}.")
        prediction = prediction[args.channel]
    grid = default_grid(kind, source.voxel_size)
    if args.methods:
        known = sorted({s["method"] for s in grid})
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in known]
        if unknown or not methods:
            raise UserError(f"--methods {args.methods!r}: the {kind} grid's methods are {', '.join(known)}.")
        grid = [s for s in grid if s["method"] in methods]
    gt = open_volume(args.labels).read()
    if not gt.any():
        raise UserError(f"--labels {args.labels} holds no objects (every voxel is 0); tune needs labelled instances.")
    try:  # before the sweep, not after it
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise unwritable(output, e) from None
    result = tune(prediction.astype("float32"), gt, kind, grid, metric=args.metric, per_slice=args.per_slice,
                  voxel_size=source.voxel_size, offsets=offsets, progress=not args.no_progress)
    result.update(input=str(Path(args.input).resolve()), labels=str(Path(args.labels).resolve()))
    output.write_text(json.dumps(result, indent=2) + "\n")
    plot_tuning(result, output.with_suffix(".png"))
    print(json.dumps({"best": result["best"], args.metric: result["best_score"], "settings_tried": len(result["table"])}))
    return 0
