"""`jaxem pretrain --workdir DIR [--config FILE[:ARG]] [--config.a.b=value ...]`: self-supervised
pretraining (MoCo v2 / SimCLR) of a model's encoder on unlabelled EM; exports DIR/encoder.

Without data.train_images it pretrains on a synthetic volume it writes to DIR/data (the config's
`synthetic` section) and, unless ssl.probe_images names others, probes the encoder with that
volume's labels (jaxem.ssl.probe). Running the same command again resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxem.config import apply_overrides, load_config
from jaxem.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="pretrain", help="config file, default configs/pretrain.py (FILE[:ARG])")
    parser.add_argument("--workdir", required=True, help="run directory: config, logs, checkpoints, encoder/ (resumes if present)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def with_synthetic_images(config, data_dir: Path):
    """The config with data.train_images set to a synthetic raw volume in `data_dir` and, when
    ssl.probe_images is empty, the linear probe's volumes set to that raw volume and its instance
    labels (written once, by process 0 of a multi-process run while the others wait; pretraining
    never reads the labels)."""
    import jax
    import ml_collections
    from jax.experimental import multihost_utils

    # deferred: keeps CLI start-up light
    from jaxem.data.synthetic import generate
    from jaxem.data.volume import create_volume

    synthetic = config.synthetic
    path, labels_path = data_dir / "pretrain_raw.zarr", data_dir / "pretrain_instances.zarr"
    if jax.process_index() == 0 and not all((p / ".zattrs").exists() for p in (path, labels_path)):
        em = generate(shape=tuple(synthetic.shape), voxel_size=tuple(synthetic.voxel_size), seed=synthetic.seed)
        for p, array in ((path, em.raw), (labels_path, em.instances)):
            volume = create_volume(p, array.shape, array.dtype, voxel_size=tuple(synthetic.voxel_size), overwrite=True)
            volume.write(array)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxem pretrain: synthetic volume written")
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.train_images = (str(path),)
    if "probe_images" in config.get("ssl", {}) and not config.ssl.probe_images and not config.ssl.probe_labels:
        config.ssl.probe_images, config.ssl.probe_labels = (str(path),), (str(labels_path),)
    config.lock()
    return config


def run(args, overrides) -> int:
    # deferred: keeps CLI start-up light (and runs before the imports below touch any device)
    from jaxem.train.parallel import initialize_distributed

    initialize_distributed()  # before the config touches any device
    # deferred: keeps CLI start-up light
    from jaxem.data.guard import refuse_overlap, volume_fields
    from jaxem.ssl.pretrain import pretrain

    config = apply_overrides(load_config(args.config), overrides)
    refuse_overlap("--workdir", args.workdir, [(f"data.{k}", v) for k, v in volume_fields(config.data)], holding_ok=True)
    if "ssl" not in config:
        raise UserError(f"config {args.config} has no `ssl` section; pretrain from configs/pretrain.py or a copy of it.")
    if not config.data.train_images:
        if "synthetic" not in config:
            raise UserError("data.train_images is empty and the config has no `synthetic` section; name image volumes.")
        config = with_synthetic_images(config, Path(args.workdir) / "data")
    summary = pretrain(config, args.workdir, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    if "preempted_at" in summary:
        print(f"preempted at step {summary['preempted_at']}: run the same command to resume.")
    else:
        print(f"encoder written to {summary['encoder_dir']}; fine-tune with --config.train.init_encoder={args.workdir}")
    return 0
