"""Hand-computed cases for the clustering and pixel metrics (derivations in comments)."""

import numpy as np
import pytest
from skimage.metrics import adapted_rand_error, variation_of_information

from jaxem.metrics.clustering import clustering_scores
from jaxem.metrics.pixel import average_precision, binary_scores, class_scores


def test_clustering_hand_case():
    # gt objects {0,1},{2,3}; pred {0,1,2},{3}. n_ij = 2,1,1; pred sizes 3,1; gt sizes 2,2.
    gt = np.array([1, 1, 2, 2])
    seg = np.array([1, 1, 1, 2])
    s = clustering_scores(seg, gt)
    # 6 pairs; (0,2),(1,2) merged wrongly, (2,3) split: 3 disagree.
    assert s["rand_index"] == pytest.approx(0.5)
    # pairs of distinct voxels: both 6-4=2, pred 10-4=6, gt 8-4=4 -> P=1/3, R=1/2, F=2/5.
    assert s["adapted_rand_precision"] == pytest.approx(1 / 3)
    assert s["adapted_rand_recall"] == pytest.approx(1 / 2)
    assert s["adapted_rand_error"] == pytest.approx(0.6)
    # sum p^2 = 6/16, sum s^2 = 10/16, sum t^2 = 8/16.
    assert s["vrand_split"] == pytest.approx(0.75)
    assert s["vrand_merge"] == pytest.approx(0.6)
    assert s["vrand"] == pytest.approx(2 / 3)
    # gt object 2 is split in half (1 bit, weight 1/2); H(S)=0.8113, H(T)=1, H(S,T)=1.5.
    h_s = -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25))
    assert s["voi_split"] == pytest.approx(0.5)
    assert s["voi_merge"] == pytest.approx(1.5 - h_s)
    assert s["vinfo_split"] == pytest.approx((h_s - 0.5) / h_s)
    assert s["vinfo_merge"] == pytest.approx(h_s - 0.5)


def test_isbi_pred_background_is_singletons_and_gt_background_ignored():
    # one gt object of 4 voxels; pred: two boundary voxels (0) and one segment of 2.
    gt = np.array([1, 1, 1, 1, 0, 0])
    seg = np.array([0, 0, 1, 1, 5, 1])
    s = clustering_scores(seg, gt)
    # pred segments {a},{b},{c,d}: sum s^2 = sum p^2 = 6/16, sum t^2 = 1.
    assert s["vrand_split"] == pytest.approx(6 / 16)
    assert s["vrand_merge"] == pytest.approx(1.0)
    assert s["vrand"] == pytest.approx(6 / 11)
    assert s["vinfo_split"] == pytest.approx(0.0)  # I(S;T) = 0, H(S) = 1.5
    assert s["vinfo"] == pytest.approx(0.0)


def test_matches_skimage_on_random_labels():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 6, (12, 20, 30))
    seg = rng.integers(0, 9, (12, 20, 30)).astype(np.uint64)
    s = clustering_scores(seg, gt)
    are, _, _ = adapted_rand_error(gt, seg.astype(np.int64))
    split, merge = variation_of_information(gt, seg.astype(np.int64), ignore_labels=[0])
    assert s["adapted_rand_error"] == pytest.approx(are)
    assert s["voi_split"] == pytest.approx(split)
    assert s["voi_merge"] == pytest.approx(merge)


def test_binary_hand_case_and_mask():
    pred = np.array([1, 1, 0, 0, 1], bool)
    gt = np.array([1, 0, 0, 1, 1], bool)
    s = binary_scores(pred, gt)  # TP=2 FP=1 FN=1 TN=1
    expected = dict(accuracy=0.6, precision=2 / 3, recall=2 / 3, dice=2 / 3, iou=0.5, pixel_error=0.4, conformity=0.0)
    assert s == pytest.approx(expected)
    mask = np.array([1, 0, 1, 1, 1], bool)  # drops the FP: TP=2 FN=1 TN=1
    s = binary_scores(pred, gt, mask)
    expected = dict(accuracy=0.75, precision=1.0, recall=2 / 3, dice=0.8, iou=2 / 3, pixel_error=0.25, conformity=0.5)
    assert s == pytest.approx(expected)


def test_class_scores_hand_case():
    gt = np.array([0, 1, 2, 2])
    pred = np.array([0, 2, 2, 1])
    s = class_scores(pred, gt, 3)
    assert [s["per_class"][c]["dice"] for c in range(3)] == pytest.approx([1.0, 0.0, 0.5])
    assert s["macro"]["dice"] == pytest.approx(0.5)
    assert s["micro"]["precision"] == pytest.approx(0.5)  # 2 of 4 voxels right


def test_average_precision_hand_case_mask_and_definition():
    # ranks 1..4 hold positive, negative, positive, negative: precisions at the hits 1/1 and 2/3
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0], bool)) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(np.array([[0.1, 0.9], [0.2, 0.3]]), np.array([[0, 1], [0, 1]], bool)) == 1.0
    mask = np.array([True, False, True, True])  # drops the negative ranked second: a perfect ranking remains
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0], bool), mask) == 1.0
    assert average_precision(np.ones(3), np.zeros(3, bool)) == 0.0
    # against the definition, threshold by threshold, on distinct random scores
    rng = np.random.default_rng(0)
    scores, gt = rng.random(200), rng.random(200) < 0.3
    ranked = gt[np.argsort(-scores)]
    expected = np.mean([ranked[:k + 1].mean() for k in range(200) if ranked[k]])
    assert average_precision(scores, gt) == pytest.approx(expected)
    # a map that is better than chance scores above the positive fraction, the inverted one below
    noisy = gt + rng.normal(0, 0.5, 200)
    assert average_precision(noisy, gt) > 0.6 > gt.mean() > average_precision(-noisy, gt)
