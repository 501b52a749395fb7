"""Blockwise prediction of volumes far larger than memory: the entry points.

`predict_run(run_dir, input, output, ...)` predicts a zarr volume with a trained run (what `jaxem
predict` runs, `jaxem.infer.job.run_prediction`); `jaxem.infer.device.predict_volume` predicts with
any jax forward. Both write an OME-Zarr output chunk by chunk, each chunk marked done once written
(`DoneLog`), so an interrupted run resumes with the same bytes. How: docs/inference.md, "Design".
"""

from __future__ import annotations

from jaxem.infer.job import run_prediction
from jaxem.infer.output import DoneLog

__all__ = ["DoneLog", "predict_run"]


def predict_run(run_dir, input_path: str, output_path: str, **kwargs) -> dict:
    """Predicts `input_path` with the model of a run workdir; see `jaxem.infer.job.run_prediction`."""
    return run_prediction([str(run_dir)], str(input_path), str(output_path), **kwargs)
