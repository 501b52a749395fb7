"""CREMI's neuron-segmentation protocol: a border mask on the ground truth, VOI, adapted Rand, CREMI score.

Reproduces the reference code of the challenge, cremi_python (github.com/cremi/cremi_python,
`cremi/evaluation/NeuronIds.py`, `border_mask.py`, `voi.py`, `rand.py`; read for this module):

- **Border mask** (`create_border_mask_2d`): per section, a pixel is a border pixel when one of its
  4 in-plane neighbours has another label (the image is edge-padded, so the volume's edge is no
  border); every pixel whose Euclidean in-plane distance (in pixels) to the nearest border pixel is
  <= threshold / in-plane voxel size is masked, border pixels included. `NeuronIds` sets masked
  pixels to uint64(-1), then adds 1 to every label so that uint64(-1) wraps to 0, and 0 is the
  ground-truth id both metrics ignore. `NeuronIds` masks only when `border_threshold` is truthy
  and asserts equal y and x resolution. Other labels of the ground truth, 0 included, are
  neurons there; jaxem's prepared labels use 0 for "no label" instead (see `cremi_scores`).
- **VOI** (`voi(seg, gt, ignore_groundtruth=[0])`, from gala): conditional entropies in bits
  (log2) over the voxels whose ground truth is not ignored; prediction ids are never ignored
  (prediction 0 is an ordinary label). split = H(pred | gt), merge = H(gt | pred). This is
  `jaxem.metrics.clustering.voi_scores` exactly.
- **Adapted Rand** (`adapted_rand`, a port of the SNEMI3D MATLAB script): from the counts n_ij of
  (gt j != 0, pred i) voxels, with n the number of *all* voxels (ignored ones included) and c the
  number of gt-foreground voxels predicted 0: sumA = sum_j (sum_i n_ij)^2, sumB = sum_{i != 0}
  (sum_j n_ij)^2 + c / n, sumAB = sum_{i != 0, j} n_ij^2 + c / n; precision = sumAB / sumB,
  recall = sumAB / sumA, error = 1 - 2pr / (p + r). It counts ordered voxel pairs with
  self-pairs (no "- n" as in scikit-image's `adapted_rand_error`, which
  `jaxem.metrics.clustering` follows) and gives prediction-0 voxels only a c / n term, so it is
  implemented here (`cremi_adapted_rand`) rather than taken from `clustering`.
- **CREMI score** = sqrt(adapted Rand error x (VOI split + VOI merge)), the geometric mean of the
  two. cremi_python does not compute it; the formula is the one of constantinpape/elf
  (`elf/evaluation/cremi_score.py`, "geometric mean of the variation of information and the
  adapted rand score"). The leaderboard page of cremi.org could not be read from here.

One deliberate difference: in a section with no border pixel at all (a single label), scipy's
`distance_transform_edt` (which cremi_python calls) measures distances to a virtual pixel at
(-1, 0) and so masks a quarter disc in the section's corner; here such a section is not masked.
Real CREMI sections always hold many neurons.
"""

from __future__ import annotations

import math

import numpy as np

from jaxem.data.datasets import clear_special_ids
from jaxem.errors import UserError
from jaxem.metrics.clustering import _f_score, _marginal, _sum_sq, contingency_table, voi_scores

# cremi_python has no default threshold (its example_evaluation.py passes 200 nm, the variable it
# also uses for clefts); 25 nm is what evaluation scripts built on cremi_python and waterz call
# "in nm, equivalent to CREMI metric" (found by code search, repository not identified). cremi.org's
# metrics page says only "within a threshold distance". Corroborated, not confirmed: docs/recipes.md.
BORDER_THRESHOLD_NM = 25.0
KEYS = ("voi_split", "voi_merge", "adapted_rand_error", "cremi_score")


def check_voxel_size(voxel_size, ndim: int) -> float:
    """The in-plane voxel size (nm) of a (z, y, x) or (y, x) `voxel_size`; UserError unless it has
    `ndim` positive entries with y == x (cremi_python's NeuronIds asserts equal y and x)."""
    size = tuple(float(v) for v in voxel_size)
    if len(size) != ndim or min(size) <= 0:
        raise UserError(f"voxel_size {size} must hold {ndim} positive sizes in nm, one per axis of the labels.")
    if size[-1] != size[-2]:
        raise UserError(f"voxel_size {size} has y {size[-2]} != x {size[-1]} nm; the CREMI border mask needs square pixels.")
    return size[-1]


def border_pixels(labels: np.ndarray) -> np.ndarray:
    """Bool array of `labels`' shape ((z, y, x) or (y, x)): True where a 4-neighbour in the same
    section (y or x, not z) has another label; pixels outside the image count as equal."""
    border = np.zeros(labels.shape, bool)
    for axis in (-2, -1):
        n = labels.shape[axis]
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
        differs = labels[tuple(lo)] != labels[tuple(hi)]
        border[tuple(lo)] |= differs
        border[tuple(hi)] |= differs
    return border


def border_mask(labels: np.ndarray, voxel_size, threshold_nm: float | None = BORDER_THRESHOLD_NM) -> np.ndarray:
    """CREMI's border mask of ground-truth `labels` (z, y, x) or (y, x): True for every pixel within
    `threshold_nm` (Euclidean, in-plane, per section) of a border pixel (`border_pixels`), border
    pixels included. `voxel_size` in nm, (z, y, x) or (y, x), y == x. A falsy threshold (None or
    0) masks nothing, as in cremi_python."""
    import edt

    labels = np.asarray(labels)
    pixel = check_voxel_size(voxel_size, labels.ndim)
    if labels.ndim not in (2, 3):
        raise UserError(f"labels have shape {labels.shape}; expected (z, y, x) or (y, x).")
    if not threshold_nm:
        return np.zeros(labels.shape, bool)
    if threshold_nm < 0:
        raise UserError(f"border threshold {threshold_nm} nm is negative; give a distance >= 0 in nm.")
    max_dist_sq = (threshold_nm / pixel) ** 2
    border = border_pixels(labels).reshape((-1,) + labels.shape[-2:])
    mask = np.empty_like(border)
    for z, section in enumerate(border):  # squared distance of every pixel to the nearest border pixel
        mask[z] = edt.edtsq((~section).view(np.uint8), black_border=False) <= max_dist_sq
    return mask.reshape(labels.shape)


def cremi_adapted_rand(table) -> dict:
    """cremi_python's adapted Rand error, precision and recall from a contingency table
    (`jaxem.metrics.clustering.Contingency` of (pred, gt) over all voxels; gt 0 is ignored; formula
    in the module docstring). NaN when gt has no foreground."""
    n = float(table.counts.sum())
    fg = table.restrict(table.gt_ids != 0)
    objects = fg.restrict(fg.pred_ids != 0)
    pred_zero = float(fg.counts[fg.pred_ids == 0].sum()) / n if n else 0.0
    sum_a = _sum_sq(_marginal(fg.gt_ids, fg.counts))
    sum_b = _sum_sq(_marginal(objects.pred_ids, objects.counts)) + pred_zero
    sum_ab = _sum_sq(objects.counts) + pred_zero
    if sum_a == 0:
        nan = float("nan")
        return {"adapted_rand_error": nan, "adapted_rand_precision": nan, "adapted_rand_recall": nan}
    precision, recall = sum_ab / sum_b, sum_ab / sum_a
    return {"adapted_rand_error": 1.0 - _f_score(precision, recall),
            "adapted_rand_precision": precision, "adapted_rand_recall": recall}


def mask_ground_truth(gt: np.ndarray, voxel_size, threshold_nm: float | None = BORDER_THRESHOLD_NM) -> np.ndarray:
    """A copy of `gt` with its border mask (`border_mask`, computed with the special ids as labels,
    as cremi_python does) and its special ids (`clear_special_ids`) set to 0."""
    gt = np.asarray(gt)
    return clear_special_ids(np.where(border_mask(gt, voxel_size, threshold_nm), 0, gt).astype(gt.dtype))


def cremi_scores(pred: np.ndarray, gt: np.ndarray, voxel_size,
                 threshold_nm: float | None = BORDER_THRESHOLD_NM) -> dict:
    """CREMI's scores of instance ids `pred` against `gt` (same shape, (z, y, x) or (y, x), whole
    volume at once), `voxel_size` in nm (y == x).

    gt 0 means "no label" (jaxem's prepared labels; the registry maps CREMI's special uint64 ids to
    0, and `mask_ground_truth` does too): it is ignored, as are the voxels within `threshold_nm`
    of a ground-truth border. Returns voi_split, voi_merge (bits), adapted_rand_error (+ precision,
    recall; cremi_python's variant), cremi_score = sqrt(adapted_rand_error x (voi_split +
    voi_merge)), and masked_fraction (voxels ignored / all). NaN scores when nothing is left.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise UserError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}.")
    table = contingency_table(pred, mask_ground_truth(gt, voxel_size, threshold_nm))
    scores = cremi_adapted_rand(table)
    ignored = float(table.counts[table.gt_ids == 0].sum()) / max(int(table.counts.sum()), 1)
    if math.isnan(scores["adapted_rand_error"]):
        return {**scores, "voi_split": float("nan"), "voi_merge": float("nan"), "cremi_score": float("nan"),
                "masked_fraction": ignored}
    voi = voi_scores(table)
    score = math.sqrt(scores["adapted_rand_error"] * (voi["voi_split"] + voi["voi_merge"]))
    return {"voi_split": voi["voi_split"], "voi_merge": voi["voi_merge"], **scores, "cremi_score": score,
            "masked_fraction": ignored}
