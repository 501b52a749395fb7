"""`jaxem <command>`: the one command-line entry point.

Each command lives in its own module, imported only when it runs, that defines
`add_arguments(parser)` and `run(args, overrides) -> int`. `overrides` are the
`--config.a.b=value` flags the command did not declare. Bad input raises `UserError`, which is
printed as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jaxem import xla
from jaxem.errors import UserError

# name -> (module, one-line help). Add a command by adding a line here.
COMMANDS = {
    "demo": ("jaxem.commands.demo", "train, predict and evaluate on synthetic EM end to end"),
    "train": ("jaxem.commands.train", "train a segmentation model from a config"),
    "pretrain": ("jaxem.commands.pretrain", "self-supervised pretraining (MoCo v2 / SimCLR) of an encoder on unlabelled EM"),
    "plan": ("jaxem.commands.plan", "plan a U-Net training config from the data and a memory budget (nnU-Net-style)"),
    "data": ("jaxem.commands.data", "inspect, import, downsample and download EM volumes and datasets"),
    "evaluate": ("jaxem.commands.evaluate", "score a prediction against ground truth: report.json, report.md, morphology"),
    "predict": ("jaxem.commands.predict", "blockwise prediction of a trained model over a whole volume"),
    "segment": ("jaxem.commands.segment", "predictions -> instances (cc, watershed, mutex watershed), blockwise and stitched"),
    "tune": ("jaxem.commands.tune", "choose segmentation settings (method, threshold, seeds) on a labelled prediction"),
    "convert-weights": ("jaxem.commands.convert_weights", "SAM / DINOv2 / MAE / timm ViT checkpoints -> a jaxem encoder for train.init_encoder"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxem", description="JAX/Flax segmentation of electron microscopy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            print(f"jaxem: error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)}).", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    xla.set_default_flags()  # before the command imports JAX
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"jaxem {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args, unknown = parser.parse_known_args(rest)
    try:
        return int(module.run(args, unknown) or 0)
    except UserError as e:
        print(f"jaxem {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxem {name}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
