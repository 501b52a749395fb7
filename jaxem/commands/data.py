"""`jaxem data`: inspect, import, downsample and download EM volumes.

    jaxem data info PATH [--dataset NAME]
    jaxem data import SRC DST --voxel-size Z,Y,X [--dataset NAME] [--labels] [--format F] [--overwrite]
    jaxem data pyramid PATH [--levels N] [--labels] [--overwrite]
    jaxem data list [--root DIR]
    jaxem data download NAME [--url-base URL] [--root DIR] [--no-verify] [--overwrite]
"""

from __future__ import annotations

import argparse
import json

from jaxem.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    info = sub.add_parser("info", help="print shape, dtype, chunks, voxel size and format as JSON")
    info.add_argument("path")
    info.add_argument("--dataset", help="HDF5 dataset inside the file")
    imp = sub.add_parser("import", help="copy a TIFF stack, HDF5 dataset or volume into an OME-Zarr group")
    imp.add_argument("src")
    imp.add_argument("dst")
    imp.add_argument("--voxel-size", help="nm per axis, Z,Y,X (or Y,X); required unless SRC records it")
    imp.add_argument("--dataset", help="HDF5 dataset inside SRC")
    imp.add_argument("--labels", action="store_true", default=None, help="the volume holds labels (mode pyramids)")
    imp.add_argument("--format", default="ome-zarr", help="output format: ome-zarr (default), zarr, zarr3, n5, precomputed")
    imp.add_argument("--chunks", help="chunk shape, Z,Y,X")
    imp.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    pyr = sub.add_parser("pyramid", help="add downsampled levels to an OME-Zarr group")
    pyr.add_argument("path")
    pyr.add_argument("--levels", type=int, help="at most this many new levels")
    pyr.add_argument("--labels", action="store_true", default=None, help="use the mode (labels), not the mean")
    pyr.add_argument("--min-size", type=int, default=32, help="do not halve an axis below this many voxels")
    pyr.add_argument("--overwrite", action="store_true", help="rebuild existing levels")
    lst = sub.add_parser("list", help="registered datasets and which are present")
    lst.add_argument("--root", help="data folder (default $JAXEM_DATA or ~/.cache/jaxem)")
    dl = sub.add_parser("download", help="download, verify and prepare a registered dataset")
    dl.add_argument("name")
    dl.add_argument("--url-base", help="fetch files from this URL prefix (mirror or file://) instead")
    dl.add_argument("--root", help="data folder (default $JAXEM_DATA or ~/.cache/jaxem)")
    dl.add_argument("--no-verify", action="store_true", help="skip sha256 verification")
    dl.add_argument("--overwrite", action="store_true", help="prepare again even if present")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise UserError(f"jaxem data takes no config overrides, got {' '.join(overrides)}.")
    if args.action is None:
        raise UserError("jaxem data needs an action: info, import, pyramid, list or download.")
    return {"info": _info, "import": _import, "pyramid": _pyramid, "list": _list, "download": _download}[args.action](args)


def _numbers(text: str | None, flag: str, kind=float) -> tuple | None:
    if text is None:
        return None
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag} expects comma-separated numbers such as 40,4,4, got {text!r}.") from None


def _info(args) -> int:
    # deferred: keeps CLI start-up light
    from jaxem.data.formats import describe

    print(json.dumps(describe(args.path, args.dataset), indent=2))
    return 0


def _import(args) -> int:
    # deferred: keeps CLI start-up light
    from jaxem.data.formats import import_volume
    from jaxem.data.guard import refuse_overlap, staged
    from jaxem.data.volume import open_volume

    refuse_overlap("DST", args.dst, {"SRC": args.src})
    with staged(args.dst, args.overwrite, "DST") as dst:  # a crash leaves no partial DST
        import_volume(args.src, dst, voxel_size=_numbers(args.voxel_size, "--voxel-size"),
                      dataset=args.dataset, overwrite=args.overwrite, labels=args.labels,
                      chunks=_numbers(args.chunks, "--chunks", int), format=args.format)
    print(json.dumps(open_volume(args.dst, format=args.format).info(), indent=2))
    return 0


def _pyramid(args) -> int:
    # deferred: keeps CLI start-up light
    from jaxem.data.formats import pyramid

    levels = pyramid(args.path, levels=args.levels, labels=args.labels, min_size=args.min_size, overwrite=args.overwrite)
    print(json.dumps([{k: level[k] for k in ("level", "shape", "voxel_size")} for level in levels], indent=2))
    return 0


def _list(args) -> int:
    # deferred: keeps CLI start-up light
    from jaxem.data.datasets import data_root, list_datasets

    print(f"datasets in {data_root(args.root)}:")
    for row in list_datasets(args.root):
        mark = "present" if row["present"] else "-"
        vs = "x".join(f"{v:g}" for v in row["voxel_size"])
        print(f"  {row['name']:<10} {mark:<8} {vs:>9} nm  {row['description']}")
    return 0


def _download(args) -> int:
    # deferred: keeps CLI start-up light
    from jaxem.data.datasets import download

    folder = download(args.name, root=args.root, url_base=args.url_base, verify=not args.no_verify, overwrite=args.overwrite)
    print(f"{args.name} is ready in {folder}")
    return 0
