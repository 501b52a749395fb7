"""One segmentation setting (jaxem.segment.setting): SegmentSetting, its JSON form, segment_volume."""

import json

import numpy as np
import pytest

from conftest import grid_boundaries
from jaxem.cli import main
from jaxem.data.volume import create_volume, open_volume
from jaxem.errors import UserError
from jaxem.segment import instances
from jaxem.segment.setting import SETTING_KEYS, SegmentSetting, segment_volume
from jaxem.segment.tune import read_setting, tune


def boundary_case():
    """A (3, 33, 33) boundary map of 4 x 4 cells per slice, one membrane weak (0.45), and its noise."""
    prob = np.stack([grid_boundaries((33, 33), 8)] * 3).astype(np.float32)
    prob[:, 1:8, 8] = 0.45
    return prob + np.random.default_rng(0).uniform(0, 0.05, prob.shape).astype(np.float32)


def true_affinities(gt, offsets):
    """(K, *gt.shape) float32: 1 where voxel p and p + offset (non-negative) share an id, else 0."""
    out = np.zeros((len(offsets),) + gt.shape, np.float32)
    for k, offset in enumerate(offsets):
        here = tuple(slice(0, s - d) for s, d in zip(gt.shape, offset))
        there = tuple(slice(d, s) for s, d in zip(gt.shape, offset))
        out[(k,) + here] = gt[here] == gt[there]
    return out


BOUNDARY_SETTINGS = [
    SegmentSetting("cc", threshold=0.4),
    SegmentSetting("watershed", threshold=0.6, h=2.0, min_size=10),
    SegmentSetting("watershed", seeds="threshold", threshold=0.5),
    SegmentSetting("agglomerate", threshold=0.3, h=1.0, merge=0.5),
]


@pytest.mark.parametrize("setting", BOUNDARY_SETTINGS, ids=lambda s: s.method)
@pytest.mark.parametrize("per_slice", [False, True])
def test_boundary_methods_equal_the_method_functions(setting, per_slice):
    prob, voxel = boundary_case(), (40.0, 4.0, 4.0)
    got = segment_volume(prob, setting, "boundary", per_slice=per_slice, voxel_size=voxel)
    expected = instances.instances_from_boundaries(prob, setting.method, setting.threshold, setting.min_size, per_slice,
                                                   setting.seeds, setting.h, voxel, setting.merge)
    assert got.dtype == np.uint64 and got.shape == prob.shape and got.max() > 1
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("setting", BOUNDARY_SETTINGS, ids=lambda s: s.method)
def test_foreground_methods_equal_the_method_functions(setting):
    foreground = 1.0 - boundary_case()
    got = segment_volume(foreground, setting, "foreground")
    expected = instances.instances_from_foreground(foreground, setting.method, setting.threshold, setting.min_size,
                                                   seeds=setting.seeds, h=setting.h, merge=setting.merge)
    assert got.max() > 1
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("setting", [SegmentSetting("mws", min_size=5), SegmentSetting("mws", strides=(1, 2, 2)),
                                     SegmentSetting("watershed", threshold=0.5, h=1.0, min_size=5),
                                     SegmentSetting("agglomerate", merge=0.4, min_size=5)], ids=lambda s: s.method)
def test_affinity_methods_equal_the_method_functions(setting):
    gt = np.repeat(np.repeat(np.arange(1, 5).reshape(2, 2), 8, 0), 8, 1)[None].repeat(4, 0).astype(np.uint64)
    offsets = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 3, 0], [0, 0, 3]]
    aff = true_affinities(gt, offsets)
    aff = 0.05 + 0.9 * aff  # not quite certain
    got = segment_volume(aff, setting, "affinities", voxel_size=(1.0, 1.0, 1.0), offsets=offsets)
    expected = instances.instances_from_affinities(aff, offsets, setting.method, setting.min_size, setting.strides,
                                                   setting.threshold, setting.h, (1.0, 1.0, 1.0), setting.merge)
    assert got.shape == gt.shape and got.max() >= 4
    np.testing.assert_array_equal(got, expected)


def test_json_form_round_trips():
    for setting in BOUNDARY_SETTINGS + [SegmentSetting("mws", min_size=25, strides=(1, 2, 2))]:
        text = json.dumps(setting.to_dict())
        assert SegmentSetting.from_dict(json.loads(text)) == setting
    # the sparse form a tuning grid holds takes the defaults for what it leaves out
    assert SegmentSetting.from_dict({"method": "cc", "threshold": 0.3}) == SegmentSetting("cc", threshold=0.3)
    assert set(SegmentSetting().to_dict()) == set(SETTING_KEYS) - {"strides"}


def test_the_setting_jaxem_tune_writes_is_the_one_segment_params_applies(tmp_path):
    """`jaxem tune` writes its best setting in the JSON form; `read_setting` and `jaxem segment
    --params` read it back, and segment_volume of that setting is what `jaxem segment` writes."""
    prob = boundary_case()
    gt = instances.instances_from_boundaries(grid_boundaries((33, 33), 8)[None].repeat(3, 0), "cc")
    voxel = (40.0, 4.0, 4.0)
    create_volume(tmp_path / "pred", prob.shape, np.float32, voxel).write(prob)
    create_volume(tmp_path / "gt", gt.shape, np.uint64, voxel).write(gt)
    tuned = tmp_path / "tuned.json"
    assert main(["tune", "--input", str(tmp_path / "pred"), "--labels", str(tmp_path / "gt"), "--output", str(tuned),
                 "--per-slice", "--no-progress", "--methods", "cc,watershed"]) == 0
    best = json.loads(tuned.read_text())["best"]
    read = read_setting(tuned)
    assert read["kind"] == "boundary" and read["per_slice"] is True
    setting = SegmentSetting.from_dict({k: v for k, v in read.items() if k in SETTING_KEYS})
    assert setting == SegmentSetting.from_dict(best)
    direct = tune(prob, gt, grid=[best], per_slice=True, voxel_size=voxel, progress=False)
    assert direct["best"] == best
    assert main(["segment", "--input", str(tmp_path / "pred"), "--output", str(tmp_path / "seg"),
                 "--params", str(tuned), "--no-progress"]) == 0
    expected = segment_volume(prob, setting, "boundary", per_slice=True, voxel_size=voxel)
    np.testing.assert_array_equal(open_volume(tmp_path / "seg").read(), expected)


def test_bad_settings_are_clear_errors():
    with pytest.raises(UserError, match="segmentation method 'wattershed' is not one of cc, watershed, agglomerate, mws"):
        SegmentSetting("wattershed")
    with pytest.raises(UserError, match="segmentation method 'blob'"):
        SegmentSetting.from_dict({"method": "blob"})
    with pytest.raises(UserError, match="watershed seeds 'peaks'"):
        SegmentSetting(seeds="peaks")
    with pytest.raises(UserError, match="unknown keys \\['sigma'\\]"):
        SegmentSetting.from_dict({"method": "cc", "sigma": 2})
    with pytest.raises(UserError, match="must be a JSON object with a 'method'"):
        SegmentSetting.from_dict({"threshold": 0.5})
    with pytest.raises(UserError, match="prediction kind 'membrane'"):
        segment_volume(boundary_case(), SegmentSetting(), "membrane")
    with pytest.raises(UserError, match="per-slice segmentation takes boundary or foreground"):
        segment_volume(np.zeros((3, 2, 4, 4), np.float32), SegmentSetting("mws"), "affinities", per_slice=True,
                       offsets=[[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    with pytest.raises(UserError, match="'mws' is not one of cc, watershed, agglomerate"):
        segment_volume(boundary_case(), SegmentSetting("mws"), "boundary")


def test_a_setting_is_frozen_and_hashable():
    setting = SegmentSetting("cc")
    with pytest.raises(AttributeError):
        setting.threshold = 0.3
    assert len({setting, SegmentSetting("cc"), SegmentSetting("cc", strides=[1, 2, 2])}) == 2
