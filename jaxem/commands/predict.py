"""`jaxem predict`: blockwise prediction of a trained model (or ensemble) over a whole volume.

    jaxem predict --run runs/demo --input raw.zarr --output pred.zarr [--roi 0:8,0:512,0:512]
                  [--tta] [--dtype uint8|float16|float32] [--checkpoint CKPT ...] [--reduce mean]
                  [--planes xy,xz,yz [--planes-reduce mean|median|majority]]
                  [--config.predict.block_shape='(256,256)'] [--config.predict.block_gib=1.0] [--overwrite]

The sliding window runs on the device, one jitted function per block of output chunks
(`jaxem.infer.device`); `predict.block_gib` bounds a block's window. Rerunning the same command
after an interruption resumes: finished chunks are skipped.
"""

from __future__ import annotations

import json
import os

import jax

from jaxem.config import apply_overrides
from jaxem.data.guard import refuse_overlap
from jaxem.errors import UserError
from jaxem.infer.job import run_prediction
from jaxem.train.parallel import initialize_distributed


def add_arguments(parser) -> None:
    parser.add_argument("--run", action="append", default=[], help="run workdir (best, else latest checkpoint); repeat for an ensemble")
    parser.add_argument("--checkpoint", action="append", default=[], help="a checkpoint step directory; repeat for an ensemble")
    parser.add_argument("--input", required=True, help="input zarr volume (z, y, x) or (y, x)")
    parser.add_argument("--output", required=True, help="output OME-Zarr (channels, *spatial)")
    parser.add_argument("--roi", default=None, help="z0:z1,y0:y1,x0:x1 (absolute voxels)")
    parser.add_argument("--tta", action="store_true", help="average over flips and 90-degree rotations")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or uint8 (probability x 255)")
    parser.add_argument("--reduce", default="mean", help="ensemble reduction: mean, median or majority")
    parser.add_argument("--planes", default="xy",
                        help="a 2D model on a 3D volume: the section orientations to predict and combine, e.g. xy,xz,yz "
                             "(orthoplane consensus, for near-isotropic volumes); default xy (section by section)")
    parser.add_argument("--planes-reduce", default="mean", help="how --planes are combined: mean, median or majority")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output of a different job")
    parser.add_argument("--adapt-batch-norm", type=int, default=0, metavar="N",
                        help="re-estimate batch-norm statistics on N random crops of the input first (AdaBN: EM "
                             "from another microscope or staining than the training data); 0 = off")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args, overrides) -> int:
    initialize_distributed()  # several processes (JAXEM_COORDINATOR ...) share the volume's blocks
    checkpoints = list(args.run) + list(args.checkpoint)
    if not checkpoints:
        raise UserError("jaxem predict needs a trained model: pass --run WORKDIR or --checkpoint CKPT.")
    # an output inside a run's workdir is fine (the demo writes one there), inside its checkpoints not
    refuse_overlap("--output", args.output, [("--input", args.input), *[("--checkpoint", c) for c in args.checkpoint],
                                             *[("--run", os.path.join(r, "checkpoints")) for r in args.run]])
    apply = (lambda cfg: apply_overrides(cfg, overrides)) if overrides else None
    stats = run_prediction(checkpoints, args.input, args.output, roi=args.roi, tta=args.tta, dtype=args.dtype,
                           overwrite=args.overwrite, reduce=args.reduce, overrides=apply, progress=not args.no_progress,
                           adapt_batch_norm=args.adapt_batch_norm, planes=args.planes, planes_reduce=args.planes_reduce)
    if jax.process_index() == 0:
        print(json.dumps(stats))
    return 0
