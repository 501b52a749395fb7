"""The `jaxem evaluate` protocol: one call scores a prediction volume against ground truth, blockwise,
and writes report.json (flat metric keys), report.md, and per-object morphology (CSV + plots).

Tasks:
- semantic: foreground = nonzero (or > threshold for float predictions): dice, iou, precision,
  recall, accuracy, pixel_error, conformity; per-class macro/micro means when gt has > 2 classes.
- instance: instance ids (0 = background): the pixel metrics on foreground, all clustering
  metrics (jaxem.metrics.clustering) and detection metrics (jaxem.metrics.detection), from one
  contingency table accumulated over blocks; morphology of pred and gt objects.
- boundary: 2D boundary maps, slice by slice (ISBI 2012): pixel metrics on boundary pixels,
  warping error, and the clustering metrics of the cells (4-connected non-boundary regions).
Voxels outside the mask (where given) are left out of every metric; for the warping error the
prediction takes the ground truth's values there, and the error is per masked voxel.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from jaxem.data.volume import as_probabilities, open_volume, read_attributes
from jaxem.errors import UserError
from jaxem.metrics import clustering, detection, pixel, runs, topology
from jaxem.segment import morphology
from jaxem.segment.labels import connected_components

TASKS = ("semantic", "instance", "boundary")
BLOCK_VOXELS = 1 << 24

DEFINITIONS = {
    "dice": "2TP / (2TP + FP + FN)", "iou": "TP / (TP + FP + FN)", "precision": "TP / (TP + FP)",
    "recall": "TP / (TP + FN)", "accuracy": "(TP + TN) / N", "pixel_error": "(FP + FN) / N",
    "conformity": "1 - (FP + FN) / TP (Chang et al. 2009)",
    "rand_index": "Rand index over all voxel pairs", "rand_error": "1 - rand_index",
    "adapted_rand_error": "1 - Rand F-score, gt 0 ignored (SNEMI3D)",
    "vrand": "ISBI 2012 foreground-restricted Rand F-score (1 best)",
    "vinfo": "ISBI 2012 foreground-restricted information F-score (1 best)",
    "voi_split": "H(pred | gt) in bits, gt 0 ignored", "voi_merge": "H(gt | pred) in bits, gt 0 ignored",
    "warping_error": "topological mismatches / pixels (Jain et al. 2010)",
    "ap50": "TP / (TP + FP + FN) at IoU > 0.5", "ap75": "same at IoU > 0.75", "map": "mean AP over IoU 0.5:0.95",
    "aji": "aggregated Jaccard index (Kumar et al. 2017)", "pq": "panoptic quality SQ x RQ",
    "sq": "mean IoU of matches", "rq": "TP / (TP + FP/2 + FN/2)",
}


@dataclass
class ArraySource:
    """An in-memory array with the read(box) / shape / voxel_size interface of a Volume."""

    array: np.ndarray
    path: str
    voxel_size: tuple[float, ...]

    @property
    def shape(self):
        return self.array.shape

    @property
    def dtype(self):
        return self.array.dtype

    def read(self, box=None):
        return self.array[tuple(box) if box is not None else ()]


class RunMorphology(morphology.MorphologyAccumulator):
    """`morphology.MorphologyAccumulator` fed with runs of ids (`add_runs`) instead of voxels: the
    same table (`table(voxel_size)`), its moments summed per run (`runs.label_moments`)."""

    def add_runs(self, values: np.ndarray, starts: np.ndarray, shape, offset=None) -> None:
        """Adds the runs (`starts` (k,) flat start indices, `values` (k,) ids) of a block of `shape`
        voxels whose first voxel sits at `offset` (voxel indices) in the volume."""
        self._parts.append(runs.label_moments(values, starts, shape, offset))


def open_source(path: str):
    """Opens a TIFF (.tif/.tiff), anything else as a tensorstore volume (read blockwise). An
    uncompressed contiguous TIFF is memory-mapped (slabs are paged in as they are read); any other
    TIFF is read into memory."""
    if str(path).lower().endswith((".tif", ".tiff")):
        if not os.path.exists(path):
            raise UserError(f"volume {path} does not exist.")
        import tifffile

        try:
            array = tifffile.memmap(path, mode="r")
        except ValueError:  # compressed or scattered pages
            array = tifffile.imread(path)
        return ArraySource(array, str(path), (1.0,) * array.ndim)
    return open_volume(path)


class ChannelSource:
    """A `jaxem predict` map (c, *spatial) read as one (*spatial) volume: channel `channel` as
    probabilities (with `probabilities`, uint8 as v / 255: `jaxem predict --dtype uint8` writes
    rint(255 p)), or with `channel` None the argmax over channels, as class ids (a multiclass map)."""

    def __init__(self, source, channel: int | None, probabilities: bool):
        self.source, self.channel, self.probabilities = source, channel, probabilities
        self.path, self.voxel_size = source.path, tuple(source.voxel_size)[-(len(source.shape) - 1):]

    @property
    def shape(self):
        return tuple(self.source.shape[1:])

    @property
    def dtype(self):
        if self.channel is None:
            return np.dtype(np.uint8 if self.source.shape[0] <= 256 else np.int32)
        return np.dtype(np.float32) if self.probabilities else np.dtype(self.source.dtype)

    def read(self, box=None):
        box = tuple(box) if box is not None else (slice(None),) * len(self.shape)
        if self.channel is None:
            return np.argmax(self.source.read((slice(None),) + box), axis=0).astype(self.dtype)
        data = self.source.read((self.channel,) + box)
        return as_probabilities(data) if self.probabilities else data


def prediction_source(pred, gt, channel: int | None = None):
    """`pred` as scored against `gt`: itself when it has `gt`'s shape; a prediction map (c,
    *spatial) whose spatial shape is `gt`'s as one volume (`ChannelSource`): channel `channel`
    (default: the only one), or the argmax class of a `jaxem predict` multiclass map; the uint8
    values of `jaxem predict --dtype uint8` read as probabilities. UserError when no channel is
    named where several could be meant, or `channel` is not one of the map's."""
    shape, spatial = tuple(pred.shape), tuple(gt.shape)
    if len(shape) != len(spatial) + 1 or shape[1:] != spatial:
        if channel is not None:
            raise UserError(f"--channel {channel} picks a channel of a (c, *spatial) prediction map; {pred.path} has "
                            f"shape {shape} and ground truth {gt.path} has {spatial}.")
        return pred
    target = {} if str(pred.path).lower().endswith((".tif", ".tiff")) else read_attributes(pred.path).get("jaxem_target", {})
    probabilities = bool(target) and np.dtype(pred.dtype) == np.uint8
    if channel is None and target.get("kind") == "multiclass":
        return ChannelSource(pred, None, probabilities)
    if channel is None and shape[0] > 1:
        raise UserError(f"prediction {pred.path} has {shape[0]} channels (shape {shape}); choose the one to score "
                        "against the ground truth with --channel.")
    channel = 0 if channel is None else channel
    if not 0 <= channel < shape[0]:
        raise UserError(f"--channel {channel} is not a channel of {pred.path}, which has {shape[0]} (shape {shape}).")
    return ChannelSource(pred, channel, probabilities)


def blocks(shape, block_voxels: int = BLOCK_VOXELS):
    """Slabs along the first axis of about `block_voxels` voxels: tuples of slices."""
    plane = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    step = max(1, block_voxels // max(plane, 1))
    return [(slice(s, min(s + step, shape[0])),) for s in range(0, shape[0], step)]


def _foreground(block: np.ndarray, threshold: float) -> np.ndarray:
    if np.issubdtype(block.dtype, np.floating):
        return block > threshold
    return block != 0


class _Counts:
    """Running binary confusion counts."""

    def __init__(self):
        self.tp = self.fp = self.fn = self.tn = 0

    def add(self, pred_bool, gt_bool):
        c = pixel.confusion_counts(pred_bool, gt_bool)
        self.tp += c["tp"]
        self.fp += c["fp"]
        self.fn += c["fn"]
        self.tn += c["tn"]

    def scores(self):
        return pixel.scores_from_counts(self.tp, self.fp, self.fn, self.tn)


def _check_inputs(pred, gt, mask, task):
    if task not in TASKS:
        raise UserError(f"task {task!r} is not one of {', '.join(TASKS)}.")
    if tuple(pred.shape) != tuple(gt.shape):
        raise UserError(f"prediction {pred.path} has shape {tuple(pred.shape)} but ground truth {gt.path} has {tuple(gt.shape)}.")
    if mask is not None and tuple(mask.shape) != tuple(gt.shape):
        raise UserError(f"mask {mask.path} has shape {tuple(mask.shape)} but ground truth {gt.path} has {tuple(gt.shape)}.")
    if task == "boundary" and len(gt.shape) not in (2, 3):
        raise UserError(f"boundary task needs 2D (y,x) or a stack (z,y,x) of 2D maps; {gt.path} has shape {tuple(gt.shape)}.")
    if task == "instance":
        for name, vol in (("prediction", pred), ("ground truth", gt)):
            if not np.issubdtype(np.dtype(vol.dtype), np.integer):
                raise UserError(f"{name} {vol.path} has dtype {vol.dtype}; expected integer instance ids (0 = background).")


def _cells(boundary: np.ndarray, start: int) -> np.ndarray:
    """4-connected non-boundary regions of a 2D map, ids from start + 1 (0 on the boundary)."""
    cells = connected_components(~boundary, 4)
    cells[cells > 0] += start
    return cells


def evaluate(pred, gt, task: str, mask=None, threshold: float = 0.5, boundary_is_zero: bool = False,
             block_voxels: int = BLOCK_VOXELS, progress: bool = True) -> tuple[dict, dict]:
    """Scores `pred` against `gt` (sources with shape/dtype/path/read(box)) blockwise.

    Returns (scores, morphology tables {"pred": table, "gt": table} for the instance task).
    """
    _check_inputs(pred, gt, mask, task)
    counts, table = _Counts(), clustering.ContingencyAccumulator()
    accumulator = RunMorphology if task == "instance" else morphology.MorphologyAccumulator
    shapes = {"pred": accumulator(len(gt.shape)), "gt": accumulator(len(gt.shape))}
    components = {"pred": morphology.SlabComponents(), "gt": morphology.SlabComponents()}  # semantic objects
    warp_mismatch, warp_voxels, classes, n_cells = 0, 0, None, 0
    for box in tqdm(blocks(gt.shape, block_voxels), desc=f"evaluate {task}", disable=None if progress else True):
        p, g = pred.read(box), gt.read(box)
        m = np.asarray(mask.read(box), bool) if mask is not None else None
        if task == "instance":
            clustering.check_labels(p, f"prediction {pred.path}")
            clustering.check_labels(g, f"ground truth {gt.path}")
            _add_instances(table, shapes, p, g, m, [b.start for b in box] + [0] * (g.ndim - 1))
            continue
        pb, gb = _foreground(p, threshold), _foreground(g, threshold)
        if task == "semantic":  # objects = connected voxels of one class, joined across slabs
            offset = [b.start for b in box] + [0] * (g.ndim - 1)
            for name, fg, values in (("pred", pb, p), ("gt", gb, g)):
                class_map = np.where(fg, values, 0) if np.issubdtype(values.dtype, np.integer) else fg
                shapes[name].add(components[name].add(class_map), offset)
        if task == "boundary":
            if boundary_is_zero:
                pb, gb = ~pb, ~gb
            # Outside the mask the prediction takes the ground truth's values, so no mismatch can
            # arise there; the error is per masked voxel.
            warp_mismatch += topology.warping_mismatches(np.where(m, pb, gb) if m is not None else pb, gb)
            warp_voxels += int(m.sum()) if m is not None else pb.size
            n_cells = _add_cells(table, pb, gb, m, n_cells)
        if m is not None:
            pb, gb = pb[m], gb[m]
        counts.add(pb, gb)
        if task == "semantic" and np.issubdtype(g.dtype, np.integer) and np.issubdtype(p.dtype, np.integer):
            classes = _add_confusion(classes, p[m] if m is not None else p, g[m] if m is not None else g)
    if task == "semantic":
        for name in shapes:
            roots = components[name].roots()
            shapes[name].relabel(roots)
            shapes[name].columns["class"] = components[name].class_of_roots(roots)
    return _finish(task, counts, table, classes, warp_mismatch / max(warp_voxels, 1), gt), shapes


def _add_instances(table, shapes, p, g, m, offset) -> None:
    """Adds a block of instance ids `p`, `g` (same shape) at `offset` (voxel indices) in one pass
    over its runs: the contingency table (inside the mask `m`, when given) and the morphology of
    both (the whole block)."""
    p_flat, g_flat = p.reshape(-1), g.reshape(-1)
    row = p.shape[-1] if p.ndim else 1
    p_starts, g_starts = runs.run_starts(p_flat, row), runs.run_starts(g_flat, row)
    shapes["pred"].add_runs(p_flat[p_starts], np.flatnonzero(p_starts), p.shape, offset)
    shapes["gt"].add_runs(g_flat[g_starts], np.flatnonzero(g_starts), g.shape, offset)
    if m is not None:
        table.add(p[m], g[m])
        return
    p_starts |= g_starts  # runs of equal (pred, gt)
    starts = np.flatnonzero(p_starts)
    table.add_runs(p_flat[starts], g_flat[starts], runs.run_lengths(starts, p_flat.size))


def _instance_counts(t: clustering.Contingency) -> _Counts:
    """Foreground (id != 0) confusion counts from the contingency table."""
    counts, p, g = _Counts(), t.pred_ids != 0, t.gt_ids != 0
    counts.tp, counts.fp = int(t.counts[p & g].sum()), int(t.counts[p & ~g].sum())
    counts.fn, counts.tn = int(t.counts[~p & g].sum()), int(t.counts[~p & ~g].sum())
    return counts


def _add_cells(table, pb, gb, m, n_cells: int) -> int:
    """Adds the cells of each 2D slice of boundary maps to `table`; returns the ids used so far."""
    plane = pb.shape[-2:]
    pb, gb = pb.reshape((-1,) + plane), gb.reshape((-1,) + plane)
    m = m.reshape((-1,) + plane) if m is not None else np.ones_like(gb)
    for ps, gs, ms in zip(pb, gb, m):
        pc, gc = _cells(ps, n_cells), _cells(gs, n_cells)
        n_cells = int(max(pc.max(), gc.max(), n_cells))
        table.add(pc[ms], gc[ms])
    return n_cells


def _add_confusion(running, p, g):
    k = int(max(p.max(initial=0), g.max(initial=0))) + 1
    cm = pixel.confusion_matrix(p, g, k)
    if running is None:
        return cm
    size = max(len(running), k)
    out = np.zeros((size, size), np.int64)
    out[:len(running), :len(running)] += running
    out[:k, :k] += cm
    return out


def _finish(task, counts, table, classes, warping_error, gt) -> dict:
    t = table.table() if task in ("instance", "boundary") else None
    if task == "instance":
        counts = _instance_counts(t)
    scores = counts.scores()
    if counts.tp + counts.fn == 0:
        raise UserError(f"ground truth {gt.path} is empty: no foreground voxels to evaluate against.")
    if t is not None:
        if not (t.gt_ids != 0).any():
            raise UserError(f"ground truth {gt.path} has no labelled objects to evaluate against.")
        scores.update(clustering.scores_from_table(t))
        if task == "instance":
            scores.update(detection.scores_from_table(t))
    if task == "boundary":
        scores["warping_error"] = warping_error
    if classes is not None and len(classes) > 2:
        scores.update(_class_means(classes))
    return scores


def _class_means(cm: np.ndarray) -> dict:
    """macro_* and micro_* dice/iou/precision/recall from a (gt, pred) confusion matrix."""
    out, total = {}, int(cm.sum())
    per = []
    for c in range(len(cm)):
        tp = int(cm[c, c])
        fp, fn = int(cm[:, c].sum()) - tp, int(cm[c, :].sum()) - tp
        if tp + fp + fn:
            per.append((tp, fp, fn, total - tp - fp - fn))
    per_scores = [pixel.scores_from_counts(*c) for c in per]
    micro = pixel.scores_from_counts(*(int(v) for v in np.sum(per, axis=0)))
    for k in ("dice", "iou", "precision", "recall"):
        out[f"macro_{k}"] = float(np.mean([s[k] for s in per_scores]))
        out[f"micro_{k}"] = micro[k]
    return out


def _clean(value):
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _morphology_summary(table: dict) -> list[str]:
    """Markdown lines: object count, median size and equivalent diameter, per class when the
    table has a 'class' column (semantic objects)."""
    size_key = next(k for k in table if k.startswith(("volume", "area")))
    classes = np.asarray(table["class"]) if "class" in table else None
    rows = [("all", np.ones(len(table["label"]), bool))] if classes is None else \
        [(f"class {c}", classes == c) for c in np.unique(classes)]
    lines = [f"| objects | count | median {size_key} | median equivalent diameter (nm) |", "|---|---:|---:|---:|"]
    for name, keep in rows:
        lines.append(f"| {name} | {int(keep.sum())} | {np.median(table[size_key][keep]):.4g} | "
                     f"{np.median(table['equivalent_diameter_nm'][keep]):.4g} |")
    return lines


def write_report(out_dir, scores: dict, shapes: dict, meta: dict, voxel_size) -> dict:
    """Writes report.json, report.md and morphology_{pred,gt}.csv/.png (when objects exist)."""
    os.makedirs(out_dir, exist_ok=True)
    report = {k: _clean(v) for k, v in {**meta, **scores}.items()}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [f"# Evaluation: {meta['task']}", "", f"prediction `{meta['pred']}`, ground truth `{meta['gt']}`, "
             f"shape {meta['shape']}, voxel size {meta['voxel_size']} nm", "", "| metric | value | definition |", "|---|---|---|"]
    for k, v in scores.items():
        shown = "n/a" if _clean(v) is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
        lines.append(f"| {k} | {shown} | {DEFINITIONS.get(k, '')} |")
    for name, acc in shapes.items():
        if not acc._parts:
            continue
        table = acc.table(voxel_size)
        if len(table["label"]) == 0:
            continue
        morphology.write_csv(table, os.path.join(out_dir, f"morphology_{name}.csv"))
        morphology.plot_histograms(table, os.path.join(out_dir, f"morphology_{name}.png"), f"{name}: {len(table['label'])} objects")
        lines += ["", f"## Morphology of {name} objects", "", *_morphology_summary(table),
                  "", f"[CSV](morphology_{name}.csv), ![histograms](morphology_{name}.png)"]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return report


def run_protocol(pred_path, gt_path, task, out_dir, mask_path=None, channel: int | None = None, **options) -> dict:
    """Opens the volumes, evaluates them and writes the report; returns the report dict. A
    prediction map (c, *spatial) is read by `prediction_source` (`channel`)."""
    start = time.perf_counter()
    gt = open_source(gt_path)
    pred = prediction_source(open_source(pred_path), gt, channel)
    mask = open_source(mask_path) if mask_path else None
    scores, shapes = evaluate(pred, gt, task, mask, **options)
    voxel_size = tuple(gt.voxel_size)[-len(gt.shape):]
    meta = {"task": task, "pred": str(pred_path), "gt": str(gt_path), "mask": mask_path, "shape": list(gt.shape),
            "voxel_size": list(voxel_size), "seconds": round(time.perf_counter() - start, 3)}
    return write_report(out_dir, scores, shapes if task in ("instance", "semantic") else {}, meta, voxel_size)
