"""Hand-computed detection and warping-error cases."""

import numpy as np
import pytest

from jaxem.metrics.detection import detection_scores
from jaxem.metrics.topology import simple_table, warping_error


def test_detection_hand_case():
    # gt A (4 px), B (4 px); pred 5 = A (IoU 1), 6 overlaps B by 2 of union 6 (IoU 1/3), 7 on background.
    gt = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0]])
    pred = np.array([[5, 5, 5, 5, 0, 0, 6, 6, 6, 6, 7, 7]])
    s = detection_scores(pred, gt)
    assert s["ap50"] == pytest.approx(1 / 4)  # TP 1, FP 2, FN 1
    assert s["ap95"] == pytest.approx(1 / 4)
    assert s["map"] == pytest.approx(1 / 4)
    assert (s["sq"], s["rq"], s["pq"]) == pytest.approx((1.0, 0.4, 0.4))  # RQ = 1 / (1 + 3/2)
    assert s["aji"] == pytest.approx(6 / 12)  # C = 4 + 2; U = 4 + 6 + 2 (unused pred 7)


def test_detection_iou_threshold_boundary():
    # IoU exactly 0.75 (3 of 4) is not a match at 0.75 (strictly greater) but is at 0.7.
    gt = np.array([1, 1, 1, 1])
    pred = np.array([1, 1, 1, 0])
    s = detection_scores(pred, gt)
    assert s["ap70"] == 1 and s["ap75"] == 0


def test_simple_pixel_table():
    t = simple_table()
    assert not t[0]  # isolated pixel: flipping creates or removes a component
    assert not t[255]  # interior pixel: flipping makes a hole
    assert t[0b00000001]  # one boundary neighbour (corner): an end point, simple
    assert not t[0b00100010]  # neighbours above and below only: a bridge


def _line_image():
    img = np.zeros((9, 9), bool)
    img[:, 4] = True  # vertical membrane splitting two cells
    return img


def test_warping_ignores_displacement_but_counts_topology():
    gt = _line_image()
    shifted = np.roll(gt, 1, axis=1)
    assert warping_error(shifted, gt) == 0  # geometry only: warps away
    gap = gt.copy()
    gap[4, 4] = False  # the two cells merge through a one-pixel gap
    assert warping_error(gap, gt) == pytest.approx(1 / 81)
    dot = gt.copy()
    dot[2, 1] = True  # an isolated speck splits nothing but adds a component
    assert warping_error(dot, gt) == pytest.approx(1 / 81)
    assert warping_error(np.stack([gap, gt]), np.stack([gt, gt])) == pytest.approx(1 / 162)
