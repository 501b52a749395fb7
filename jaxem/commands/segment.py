"""`jaxem segment`: predictions -> instance labels, blockwise with global ids, in-process or on Dask.

    jaxem segment --input pred.zarr --output seg.zarr --method cc|watershed|agglomerate|mws
                  [--kind boundary|foreground|affinities] [--channel 0] [--threshold 0.5] [--min-size 0] [--h NM]
                  [--merge 0.5]
                  [--seeds distance|threshold] [--[no-]per-slice] [--params tuned.json [--match-quantiles]]
                  [--block 64,256,256] [--overlap 8] [--offsets '[[1,0,0],...]'] [--strides 1,2,2]
                  [--dask local|ADDRESS] [--workers 2] [--labels-of IMAGE [--labels-name NAME]]
                  [--overwrite] [--no-progress]

--params takes the settings `jaxem tune` chose (method, threshold, seeds, h, merge, min_size, kind,
per-slice); flags given on the command line override them. --match-quantiles first maps the input's
values onto the distribution of the map they were tuned on (`jaxem.segment.calibration`).
--labels-of also writes the result as a multiscale OME-Zarr label image of IMAGE
(`jaxem.data.formats.write_labels_of`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from functools import partial

from jaxem.data.volume import as_probabilities, finite_probabilities
from jaxem.errors import UserError

# what a setting falls back to when neither the command line nor --params gives it
DEFAULTS = {"method": "watershed", "kind": "boundary", "threshold": 0.5, "min_size": 0, "seeds": "distance",
            "h": None, "merge": 0.5, "per_slice": False}


def add_arguments(parser) -> None:
    parser.add_argument("--input", required=True, help="prediction volume (OME-Zarr group or array): (c, *spatial) or (*spatial)")
    parser.add_argument("--output", required=True, help="output OME-Zarr label group (uint64)")
    parser.add_argument("--method", default=None, help="cc, watershed (default), agglomerate (watershed fragments merged "
                        "across weak boundaries, see --merge) or mws (mutex watershed on affinities)")
    parser.add_argument("--kind", default=None,
                        help="boundary (high on membranes), foreground (high inside objects) or affinities "
                             "(watershed on their nearest-neighbour boundary map; implied by --method mws)")
    parser.add_argument("--channel", type=int, default=0, help="channel of a (c, ...) prediction for cc/watershed")
    parser.add_argument("--threshold", type=float, default=None, help="default 0.5")
    parser.add_argument("--min-size", type=int, default=None,
                        help="objects below this many voxels become background; on affinities they are first "
                             "flooded from their neighbours within each block")
    parser.add_argument("--h", type=float, default=None,
                        help="watershed seeds: h-maxima depth of the distance transform, in the volume's voxel-size "
                             "units (nm); default 2 of its finest voxel size (2 in-plane pixels)")
    parser.add_argument("--merge", type=float, default=None,
                        help="agglomerate: join neighbouring fragments while the mean boundary probability (1 - affinity) "
                             "over their shared faces is below this (default 0.5)")
    parser.add_argument("--seeds", default=None, help="watershed seeds: distance (h-maxima of the distance transform, "
                        "default) or threshold (components of boundary < threshold / 2)")
    parser.add_argument("--per-slice", action=argparse.BooleanOptionalAction, default=None,
                        help="segment each z-slice on its own (--no-per-slice: in 3D, also over a --params file's choice)")
    parser.add_argument("--params", default=None, help="JSON of `jaxem tune`: its best setting, under any flags given here")
    parser.add_argument("--match-quantiles", action="store_true",
                        help="with --params: map the input's values per channel onto the distribution of the map "
                             "the settings were tuned on (its quantiles in the file) before segmenting, for a "
                             "network more confident on its training data than on this volume")
    parser.add_argument("--block", default=None, help="block shape, e.g. 64,256,256 (default: the whole volume)")
    parser.add_argument("--overlap", type=int, default=None, help="context voxels per side (default 0 for cc, 8 otherwise)")
    parser.add_argument("--offsets", default=None,
                        help="mws: JSON list of offsets, one per affinity channel (default: those `jaxem predict` recorded)")
    parser.add_argument("--strides", default=None, help="mws: subsample the long-range (repulsive) edges, e.g. 1,2,2")
    parser.add_argument("--dask", default=None, help="'local' (LocalCluster) or a scheduler address")
    parser.add_argument("--workers", type=int, default=2, help="workers of --dask local")
    parser.add_argument("--labels-of", default=None, metavar="IMAGE",
                        help="also write the result into the OME-Zarr image IMAGE (e.g. the raw EM) as the multiscale "
                             "label image IMAGE/labels/NAME, placed at the input's translation")
    parser.add_argument("--labels-name", default="segmentation", metavar="NAME", help="label image name for --labels-of")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--allow-nan", action="store_true",
                        help="segment a prediction holding NaN/Inf (refused otherwise): NaN is read as probability 0, "
                             "+Inf as 1, -Inf as 0 (not with --method agglomerate)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args, overrides) -> int:
    # deferred: keeps CLI start-up light
    from jaxem.data.guard import refuse_overlap, staged
    from jaxem.data.volume import open_volume, read_attributes, refuse_nonfinite
    from jaxem.segment import instances
    from jaxem.segment.executors import make_executor
    from jaxem.segment.setting import SegmentSetting, segment_volume
    from jaxem.segment.stitch import segment_blockwise

    if overrides:
        raise UserError(f"unexpected arguments {' '.join(overrides)}.")
    resolve_settings(args)
    if not 0.0 <= args.merge <= 1.0:
        raise UserError(f"--merge {args.merge} must lie in [0, 1]: it is a boundary probability.")
    refuse_overlap("--output", args.output, {"--input": args.input, "--params": args.params})
    source = open_volume(args.input)
    spatial = tuple(s for s, a in zip(source.shape, source.axes) if a in "zyx")
    _check_axes(source, args.input)
    nonfinite = refuse_nonfinite(source, args.input, args.allow_nan)
    _check_labels_of(args, source, spatial)
    # 1 nm (a fraction of a pixel) over-seeds EM: benchmarks/affinity_segmentation.py
    h = args.h if args.h is not None else 2.0 * min(source.voxel_size)
    setting = dict(method=args.method, threshold=args.threshold, seeds=args.seeds, h=h, merge=args.merge)
    if args.method == "mws" or args.kind == "affinities":
        if args.method not in instances.AFFINITY_METHODS:
            raise UserError(f"--method {args.method!r} does not take affinities; use {', '.join(instances.AFFINITY_METHODS)}.")
        offsets = _parse_offsets(args.offsets) if args.offsets else read_attributes(args.input).get("jaxem_target", {}).get("offsets")
        if not offsets:
            raise UserError(f"--method {args.method} on affinities needs --offsets, a JSON list with one offset per "
                            f"affinity channel ({args.input} records none: `jaxem predict` records them for affinity models).")
        strides = _parse_per_axis(args.strides, spatial, "--strides") if args.strides else None
        # on affinities min_size floods small fragments within each block
        setting = SegmentSetting(**setting, min_size=args.min_size, strides=strides)
        where = dict(kind="affinities", per_slice=False, offsets=offsets)
        channel = "all"
    elif args.method in instances.METHODS:
        if args.kind not in ("boundary", "foreground"):
            raise UserError(f"--kind {args.kind!r} is not boundary, foreground or affinities.")
        setting = SegmentSetting(**setting)  # min_size applies after stitching (segment_blockwise)
        where = dict(kind=args.kind, per_slice=args.per_slice, offsets=None)
        channel = args.channel if source.ndim > len(spatial) else None
        if channel is not None and not 0 <= channel < source.shape[0]:
            raise UserError(f"--channel {channel} is outside the {source.shape[0]} channels of {args.input}.")
    else:
        raise UserError(f"--method {args.method!r} is not one of {', '.join(instances.METHODS + ('mws',))}.")
    fn = partial(segment_volume, setting=setting, voxel_size=source.voxel_size, **where)
    if nonfinite and args.method == "agglomerate":  # --allow-nan
        raise UserError(f"--allow-nan does not apply to --method agglomerate (its merge scores read {args.input} "
                        "as it is); replace the NaN/Inf voxels first, or use another --method.")
    quantiles = _quantiles_to_match(args, source, channel)
    read_as = partial(_segmentation_input, finite=bool(nonfinite), quantiles=quantiles, channel_axis=channel == "all")
    fn = partial(_with_input, fn, read_as)
    block = _parse_per_axis(args.block, spatial)
    overlap = args.overlap if args.overlap is not None else (0 if args.method == "cc" else 8)
    executor = make_executor(args.dask, args.workers, progress=not args.no_progress)
    try:
        with staged(args.output, args.overwrite, "--output") as output:  # a crash leaves no partial output
            if args.method == "agglomerate":  # one region graph over all blocks: agglomerate_blocks
                # deferred: keeps CLI start-up light
                from jaxem.segment.agglomerate_blocks import agglomerate_blockwise

                fragments = partial(fn, setting=replace(setting, method="watershed", min_size=0))
                in_plane = (1, 2) if args.per_slice and len(spatial) == 3 else None
                stats = agglomerate_blockwise(args.input, output, block, fragments, args.merge, where["kind"],
                                              offsets=where["offsets"], axes=in_plane, overlap=overlap,
                                              min_size=args.min_size, executor=executor, channel=channel,
                                              overwrite=args.overwrite, read_as=read_as)
            else:
                stats = segment_blockwise(args.input, output, block, fn, overlap=overlap, min_size=args.min_size,
                                          executor=executor, channel=channel, overwrite=args.overwrite)
    finally:
        executor.close()
    if args.labels_of:
        # deferred: keeps CLI start-up light
        from jaxem.data.formats import write_labels_of

        levels = write_labels_of(args.output, args.labels_of, args.labels_name, overwrite=args.overwrite)
        stats["labels_of"] = {"path": levels[0]["path"], "levels": len(levels)}
    if quantiles is not None:
        stats["matched_quantiles"] = args.params
    print(json.dumps(stats))
    return 0


def _check_labels_of(args, source, spatial) -> None:
    """Refuses --labels-of before any work when the result could not be written into that image."""
    if args.labels_of:
        # deferred: keeps CLI start-up light
        from jaxem.data.formats import check_labels_of
        from jaxem.data.guard import refuse_overlap
        from jaxem.data.volume import join, ome_translation

        check_labels_of(args.labels_of, args.labels_name, spatial, source.voxel_size,
                        ome_translation(args.input) or (0.0,) * len(spatial),
                        tuple(a for a in source.axes if a in "zyx"), args.overwrite)
        refuse_overlap("--output", args.output, {"--labels-of": args.labels_of})
        refuse_overlap("--labels-of", join(args.labels_of, "labels", args.labels_name), {"--input": args.input})


def resolve_settings(args) -> None:
    """Fills every segmentation setting of `args` left unset on the command line from --params (a
    `jaxem tune` file), else from DEFAULTS."""
    # deferred: keeps CLI start-up light
    from jaxem.segment.tune import read_setting

    tuned = read_setting(args.params) if args.params else {}
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, tuned.get(key, default))


def _check_axes(source, path) -> None:
    """UserError unless the prediction at `path` is (y, x) or (z, y, x), optionally after a channel axis c."""
    axes = tuple(source.axes)
    spatial = sum(a in "zyx" for a in axes)
    if spatial not in (2, 3) or axes[: len(axes) - spatial] not in ((), ("c",)):
        raise UserError(f"--input {path} has axes ({', '.join(axes)}) of shape {source.shape}; segment takes "
                        "(z, y, x) or (y, x) predictions, optionally after a channel axis c.")


def _quantiles_to_match(args, source, channel):
    """(the input's quantiles, the tuned map's), both (C, LEVELS), with --match-quantiles; else None."""
    if not args.match_quantiles:
        return None
    if not args.params:
        raise UserError("--match-quantiles matches the input to the map of a `jaxem tune` file: pass --params tuned.json.")
    # deferred: keeps CLI start-up light
    from jaxem.segment.calibration import volume_quantiles
    from jaxem.segment.tune import read_quantiles

    tuned = read_quantiles(args.params)
    channels = source.shape[0] if channel == "all" else 1
    if len(tuned) != channels:
        raise UserError(f"--params {args.params} holds quantiles of {len(tuned)} channels; --input {args.input} is "
                        f"segmented from {channels}.")
    return volume_quantiles(source, channel, progress=not args.no_progress), tuned


def _segmentation_input(data, finite: bool = False, quantiles=None, channel_axis: bool = False):
    """A block of the prediction as segmentation reads it: uint8 (`jaxem predict --dtype uint8`:
    rint(255 p)) as v / 255; with `finite` (--allow-nan) NaN as 0, +Inf as 1, -Inf as 0; with
    `quantiles` (the input's, the tuned map's) mapped onto the tuned map's distribution."""
    # deferred: keeps CLI start-up light
    from jaxem.segment.calibration import match_quantiles

    data = as_probabilities(data)
    if finite:
        data = finite_probabilities(data)
    if quantiles is not None:
        data = match_quantiles(data, *quantiles, channel_axis=channel_axis)
    return data


def _with_input(segment_fn, read_as, data, **settings):
    """`segment_fn` (with `settings`, as agglomerate's fragments override them) of `read_as(data)`."""
    return segment_fn(read_as(data), **settings)


def _parse_offsets(text: str) -> list:
    try:
        offsets = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"--offsets {text!r} is not JSON; expected a list of offsets such as '[[1,0,0],[0,1,0],[0,0,1]]'.") from None
    if not isinstance(offsets, list) or not all(isinstance(o, list) and all(isinstance(v, int) for v in o) for o in offsets):
        raise UserError(f"--offsets {text!r} must be a JSON list of integer lists, one per affinity channel.")
    return offsets


def _parse_per_axis(text, spatial, flag="--block"):
    if not text:
        return tuple(spatial)
    try:
        block = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag} {text!r} must be integers separated by commas.") from None
    if len(block) != len(spatial) or min(block) < 1:
        raise UserError(f"{flag} {text!r} must have {len(spatial)} positive values, one per axis of {spatial}.")
    return block
