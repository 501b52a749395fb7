"""`jaxem demo [--workdir DIR]`: synthetic EM -> train a 2D U-Net -> predict -> instances -> scores.

Writes to the workdir: data/*.zarr (the synthetic volumes), config.json, versions.json,
metrics.jsonl, tensorboard/, checkpoints/, training_curves.png, predictions.zarr, overlay.png,
results.json. Running the same command again resumes training from the latest checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxem.config import apply_overrides, load_config


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", default="runs/demo", help="run directory (default: runs/demo)")
    parser.add_argument("--config", default="demo", help="config file, default configs/demo.py (FILE[:ARG])")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def write_synthetic_data(config, data_dir: Path, first_seed: int | None = None, raw_transform=None,
                         **generate_args) -> dict[str, tuple[str, str]]:
    """Generates the train/val/test synthetic volumes (shapes and voxel size of `config.demo`) as
    zarr, once; returns split -> (raw, labels) paths. Split k uses seed `first_seed` + k (default
    config.seed * 1000); `generate_args` go to jaxem.data.synthetic.generate (another "microscope":
    noise, blur, membrane_thickness...) and `raw_transform(uint8 raw) -> uint8 raw` runs last."""
    # deferred: keeps CLI start-up light
    from jaxem.data.synthetic import generate
    from jaxem.data.volume import create_volume

    first_seed = config.seed * 1000 if first_seed is None else first_seed
    paths = {}
    for seed_offset, split in enumerate(("train", "val", "test")):
        raw_path, labels_path = data_dir / f"{split}_raw.zarr", data_dir / f"{split}_instances.zarr"
        paths[split] = (str(raw_path), str(labels_path))
        if (labels_path / ".zattrs").exists():
            continue
        em = generate(shape=tuple(config.demo[f"{split}_shape"]), voxel_size=tuple(config.demo.voxel_size),
                      seed=first_seed + seed_offset, **generate_args)
        raw = raw_transform(em.raw) if raw_transform else em.raw
        for path, array in ((raw_path, raw), (labels_path, em.instances)):
            create_volume(path, array.shape, array.dtype, voxel_size=config.demo.voxel_size, overwrite=True).write(array)
    return paths


def with_data_paths(config, paths):
    """The config with data.{train,val}_{images,labels} pointing at the written volumes."""
    import ml_collections

    config = ml_collections.ConfigDict(config.to_dict())
    config.data.train_images, config.data.train_labels = (paths["train"][0],), (paths["train"][1],)
    config.data.val_images, config.data.val_labels = (paths["val"][0],), (paths["val"][1],)
    config.lock()
    return config


def run(args, overrides) -> int:
    # deferred: keeps CLI start-up light
    from jaxem.protocols.isbi2012 import format_table, score_run
    from jaxem.train.trainer import train

    workdir = Path(args.workdir)
    config = apply_overrides(load_config(args.config), overrides)
    paths = write_synthetic_data(config, workdir / "data")
    config = with_data_paths(config, paths)
    summary = train(config, workdir, progress=not args.no_progress)
    # segmentation settings are also tuned on the validation volume (never on the scored one)
    results = score_run(workdir, *paths["test"], out_dir=workdir, progress=not args.no_progress, tune_on=paths["val"])
    results["training"] = summary
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\nheld-out synthetic volume, scores averaged over z-slices:\n" + format_table(results))
    print(f"\nwrote {workdir}/results.json, overlay.png, tuning.json, tuning.png, training_curves.png, metrics.jsonl, checkpoints/")
    return 0
