"""Run logs: metrics as JSON lines and TensorBoard events (no TensorFlow needed), curves as PNG."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path



class MetricWriter:
    """Appends `{"step": s, "split": ..., name: value}` rows to metrics.jsonl and TensorBoard."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), flush_secs=10)

    def truncate_after(self, step: int) -> None:
        """Drops rows newer than `step` (logged by a run that died before its next checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        rows = [r for r in read_metrics(self.path) if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for name, value in metrics.items():
            self._tb.add_scalar(f"{split}/{name}", float(value), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All rows of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(metrics_path: str | os.PathLike, out_path: str | os.PathLike, train_panels: tuple[str, ...] = ()) -> Path:
    """PNG of training loss, of each train metric named in `train_panels` (e.g. SSL's collapse
    monitors), and of every validation metric, against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    panels = [("train", name) for name in train_panels if any(name in r for r in train)]
    panels += [("val", name) for name in sorted({k for r in val for k in r if k not in ("step", "split")})]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(4.5 * (1 + len(panels)), 3.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val and "loss" in val[0]:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log"), ax.legend(), ax.grid(alpha=0.3)
    for ax, (split, name) in zip(axes[0, 1:], panels):
        points = [(r["step"], r[name]) for r in (train if split == "train" else val) if name in r]
        ax.plot(*zip(*points), "-" if split == "train" else "o-")
        ax.set_xlabel("step"), ax.set_title(f"{split} {name}"), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return Path(out_path)


def environment_versions() -> dict:
    """Versions of the stack a run used, saved in its workdir for reproducibility."""
    from importlib.metadata import PackageNotFoundError, version

    import jax

    packages = ("jaxem", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorstore", "grain", "numpy")
    versions = {}
    for name in packages:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return {**versions, "python": platform.python_version(), "devices": [str(d) for d in jax.devices()],
            "process_count": jax.process_count()}
