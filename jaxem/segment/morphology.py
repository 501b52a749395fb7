"""Per-object morphology in physical units: what biologists read off a segmentation.

For every instance id (0 = background is skipped) of a (z, y, x) or (y, x) label volume with
voxel size in nm: size (volume nm^3 or area nm^2), equivalent diameter (of the ball/disk of the
same size), major and minor axis lengths and their ratio, centroid (nm) and bounding box (voxel
indices, max exclusive). Axis lengths are those of the ellipse/ellipsoid with the same second
moments, 2 * sqrt((ndim + 2) * eigenvalue of the covariance), the convention of
skimage.measure.regionprops (axis_major_length / axis_minor_length).

Moments are sums, so blocks of a volume larger than memory are accumulated one at a time
(`MorphologyAccumulator.add(block, offset)`).
"""

from __future__ import annotations

import csv
import math
import os

import fastremap
import numpy as np

from jaxem.segment.labels import connected_components

AXES = "zyx"


class MorphologyAccumulator:
    """Accumulates voxel counts, first and second moments and bounding boxes per label."""

    def __init__(self, ndim: int):
        self.ndim = ndim
        self._parts: list[dict] = []
        self.columns: dict[str, np.ndarray] = {}  # extra columns: name -> value indexed by label id

    def add(self, labels: np.ndarray, offset=None) -> None:
        """Adds a block of labels whose first voxel sits at `offset` (voxel indices) in the volume."""
        offset = np.zeros(self.ndim, np.int64) if offset is None else np.asarray(offset, np.int64)
        local, mapping = fastremap.renumber(np.asarray(labels), preserve_zero=True, in_place=False)
        k = len(mapping) + (0 not in mapping)  # local ids 0..k-1
        ids = np.zeros(k, np.uint64)
        ids[np.fromiter(mapping.values(), np.int64, len(mapping))] = np.fromiter(mapping.keys(), np.uint64, len(mapping))
        flat = local.reshape(-1)
        count = np.bincount(flat, minlength=k).astype(np.int64)
        coords = [np.broadcast_to(self._axis(labels.shape, a) + offset[a], labels.shape).reshape(-1)
                  for a in range(self.ndim)]
        first = np.stack([np.bincount(flat, c, k) for c in coords], 1)
        second = np.stack([np.bincount(flat, coords[a] * coords[b], k)
                           for a in range(self.ndim) for b in range(self.ndim)], 1)
        # bounding boxes: reduce coordinates within the runs of one label in label-sorted order
        order = np.argsort(flat, kind="stable")
        starts = np.flatnonzero(np.r_[True, flat[order][1:] != flat[order][:-1]])
        present = flat[order][starts]
        lo = np.zeros((k, self.ndim), np.int64)
        hi = np.zeros((k, self.ndim), np.int64)
        for a, c in enumerate(coords):
            c = c[order].astype(np.int64)
            lo[present, a] = np.minimum.reduceat(c, starts)
            hi[present, a] = np.maximum.reduceat(c, starts)
        keep = (ids != 0) & (count > 0)
        self._parts.append(dict(ids=ids[keep], count=count[keep], first=first[keep], second=second[keep],
                                lo=lo[keep], hi=hi[keep] + 1))

    def relabel(self, mapping: np.ndarray) -> None:
        """Renames every id i added so far to mapping[i]; parts that now share an id are one object."""
        for part in self._parts:
            part["ids"] = np.asarray(mapping, np.uint64)[part["ids"].astype(np.int64)]

    @staticmethod
    def _axis(shape, a) -> np.ndarray:
        index = [1] * len(shape)
        index[a] = shape[a]
        return np.arange(shape[a], dtype=np.float64).reshape(index)

    def table(self, voxel_size) -> dict:
        """Column name -> (n_objects,) array, objects sorted by id (see module docstring)."""
        parts = {k: np.concatenate([p[k] for p in self._parts]) for k in self._parts[0]} if self._parts else None
        if parts is None or parts["ids"].size == 0:
            return _measure(np.zeros(0, np.uint64), np.zeros(0), np.zeros((0, self.ndim)),
                            np.zeros((0, self.ndim ** 2)), np.zeros((0, self.ndim)), np.zeros((0, self.ndim)), voxel_size)
        ids, inverse = np.unique(parts["ids"], return_inverse=True)
        n = len(ids)

        def total(x):
            return np.stack([np.bincount(inverse, x[:, j], n) for j in range(x.shape[1])], 1)

        lo = np.full((n, self.ndim), np.iinfo(np.int64).max)
        hi = np.full((n, self.ndim), -1)
        np.minimum.at(lo, inverse, parts["lo"])
        np.maximum.at(hi, inverse, parts["hi"])
        count = np.bincount(inverse, parts["count"], n)
        table = _measure(ids, count, total(parts["first"]), total(parts["second"]), lo, hi, voxel_size)
        return {"label": ids, **{k: v[ids.astype(np.int64)] for k, v in self.columns.items()}, **table}


def _measure(ids, count, first, second, lo, hi, voxel_size) -> dict:
    """The morphology columns from summed moments (voxel units) and the voxel size (nm)."""
    ndim = first.shape[1]
    vs = np.asarray(voxel_size, np.float64)
    count = count.astype(np.float64)
    safe = np.maximum(count, 1)[:, None]
    mean = first / safe
    cov = second.reshape(-1, ndim, ndim) / safe[:, :, None] - mean[:, :, None] * mean[:, None, :]
    cov = cov * vs[None, :, None] * vs[None, None, :]
    eig = np.clip(np.linalg.eigvalsh(cov), 0, None) if len(ids) else np.zeros((0, ndim))
    major = 2 * np.sqrt((ndim + 2) * eig[:, -1]) if len(ids) else np.zeros(0)
    minor = 2 * np.sqrt((ndim + 2) * eig[:, 0]) if len(ids) else np.zeros(0)
    size = count * float(np.prod(vs))
    unit_ball = math.pi ** (ndim / 2) / math.gamma(ndim / 2 + 1)
    axes = AXES[-ndim:]
    table = {"label": ids, ("volume_nm3" if ndim == 3 else "area_nm2"): size,
             "equivalent_diameter_nm": 2 * (size / unit_ball) ** (1 / ndim),
             "major_axis_nm": major, "minor_axis_nm": minor,
             "axis_ratio": np.divide(major, minor, out=np.full_like(major, np.nan), where=minor > 0)}
    for a, name in enumerate(axes):
        table[f"centroid_{name}_nm"] = mean[:, a] * vs[a]
    for a, name in enumerate(axes):
        table[f"bbox_{name}_min"] = lo[:, a]
        table[f"bbox_{name}_max"] = hi[:, a]
    return table


class SlabComponents:
    """Connected components (4-connected in 2D, 6 in 3D) of a class map (0 = background; a bool
    mask is one class) given slab by slab along its first axis, as a volume larger than memory is
    read: each slab is labelled (cc3d: voxels of one class) with ids following the previous
    slabs', and components of the same class touching across a slab face are joined at the end
    (`roots`), also when the join shows only several slabs later (a U shape)."""

    def __init__(self):
        self.count, self.last, self.last_class, self.pairs, self.classes = 0, None, None, [], [np.zeros(1, np.int64)]

    def add(self, classes: np.ndarray) -> np.ndarray:
        """Labels of `classes` (uint64, 0 = background), unique across all slabs added so far."""
        classes = np.asarray(classes).astype(np.int64)
        labels = connected_components(classes)
        found = int(labels.max(initial=0))
        class_of = np.zeros(found + 1, np.int64)
        class_of[labels.ravel()] = classes.ravel()  # one class per component
        self.classes.append(class_of[1:])
        labels[labels > 0] += np.uint64(self.count)
        if self.last is not None:
            both = (self.last > 0) & (labels[0] > 0) & (self.last_class == classes[0])
            self.pairs.append(np.stack([self.last[both], labels[0][both]], 1).astype(np.int64))
        self.count += found
        self.last, self.last_class = labels[-1].copy(), classes[-1].copy()
        return labels

    def class_of_roots(self, roots: np.ndarray) -> np.ndarray:
        """The class of each joined object, indexed by its id in `roots` (from `roots()`; index 0:
        background)."""
        roots = np.asarray(roots, np.int64)
        out = np.zeros(int(roots.max(initial=0)) + 1, np.int64)
        out[roots] = np.concatenate(self.classes)
        return out

    def roots(self) -> np.ndarray:
        """mapping[id] = the consecutive id (1..N) of the joined object holding `id`; mapping[0] = 0."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        n = self.count + 1
        pairs = np.concatenate(self.pairs) if self.pairs else np.zeros((0, 2), np.int64)
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        _, component = connected_components(graph, directed=False)
        _, first = np.unique(component, return_index=True)  # consecutive in order of first id
        order = np.empty(len(first), np.int64)
        order[np.argsort(first)] = np.arange(len(first))
        return order[component].astype(np.uint64)  # id 0 is alone and first, so it maps to 0


def morphology(labels: np.ndarray, voxel_size) -> dict:
    """Morphology table (column -> (n_objects,) array) of an in-memory (z,y,x) or (y,x) label array."""
    acc = MorphologyAccumulator(np.ndim(labels))
    acc.add(np.asarray(labels))
    return acc.table(voxel_size)


def write_csv(table: dict, path: str | os.PathLike) -> None:
    """Writes a morphology table as CSV, one row per object."""
    names = list(table)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for row in zip(*(table[n].tolist() for n in names)):
            writer.writerow(row)


def plot_histograms(table: dict, path: str | os.PathLike, title: str = "") -> None:
    """Saves histograms of size, equivalent diameter, axis lengths and axis ratio as one PNG; with a
    'class' column (semantic objects), one colour per class over shared bins, with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in table if n.startswith(("volume", "area", "equivalent", "major", "minor", "axis_ratio"))]
    classes = np.asarray(table["class"]) if "class" in table else np.zeros(len(table["label"]), np.int64)
    labels = np.unique(classes)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3))
    for ax, name in zip(axes, names):
        values = np.asarray(table[name], np.float64)
        finite = np.isfinite(values)
        spread = finite.any() and np.ptp(values[finite]) > 1e-9 * np.abs(values[finite]).max()
        bins = np.histogram_bin_edges(values[finite], bins=40 if spread else 1) if finite.any() else 1
        per_class = [values[finite & (classes == c)] for c in labels]
        ax.hist(per_class, bins=bins, histtype="stepfilled" if len(labels) == 1 else "step",
                label=[f"class {c}" for c in labels])
        ax.set_xlabel(name)
    axes[0].set_ylabel("objects")
    if len(labels) > 1:
        axes[-1].legend(fontsize="small")
    fig.suptitle(title or f"{len(table['label'])} objects")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
