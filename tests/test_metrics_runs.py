"""The instance protocol's one pass over runs: the same numbers as the per-voxel path and
scikit-image, blockwise reads of each volume once, and the benchmark's JSON."""

import numpy as np
import pytest
from skimage.metrics import adapted_rand_error, variation_of_information

from benchmarks import metrics as metrics_bench
from jaxem.metrics import runs
from jaxem.protocols import report
from jaxem.metrics.clustering import clustering_scores
from jaxem.metrics.detection import detection_scores
from jaxem.segment import morphology


def _volumes(kind: str, shape, seed: int = 0):
    """(pred, gt): random ids (runs of length ~1) or the benchmark's cells (long runs)."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.integers(0, 6, shape).astype(np.uint64), rng.integers(0, 4, shape).astype(np.uint32)
    return metrics_bench.make_inputs(shape[0], seed)


@pytest.mark.parametrize("shape", [(9, 7, 11), (13, 17), (24, 24, 24)])
@pytest.mark.parametrize("kind", ["random", "cells"])
def test_run_morphology_equals_voxel_morphology(shape, kind):
    if kind == "cells" and len(shape) != 3:
        pytest.skip("cells are 3D")
    labels = _volumes(kind, shape)[1]
    voxel_size = (40.0, 4.0, 5.0)[-len(shape):]
    voxels, by_runs = morphology.MorphologyAccumulator(len(shape)), report.RunMorphology(len(shape))
    for start in range(0, shape[0], 4):
        block, offset = labels[start:start + 4], [start] + [0] * (len(shape) - 1)
        voxels.add(block, offset)
        flat = block.reshape(-1)
        starts = runs.run_starts(flat, block.shape[-1])
        by_runs.add_runs(flat[starts], np.flatnonzero(starts), block.shape, offset)
    expected, got = voxels.table(voxel_size), by_runs.table(voxel_size)
    assert list(got) == list(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-9, atol=1e-9, err_msg=key)


class _CountingSource(report.ArraySource):
    """An ArraySource that records the boxes read."""

    def __init__(self, array, path):
        super().__init__(array, path, (1.0,) * array.ndim)
        self.boxes = []

    def read(self, box=None):
        self.boxes.append(box)
        return super().read(box)


@pytest.mark.parametrize("kind", ["random", "cells"])
@pytest.mark.parametrize("masked", [False, True])
def test_instance_protocol_equals_per_voxel_path_and_skimage(kind, masked):
    pred, gt = _volumes(kind, (24, 24, 24), seed=3)
    mask = (np.random.default_rng(1).random(gt.shape) > 0.3) if masked else None
    block = 24 * 24 * 5  # 5 planes a slab: 5 slabs
    sources = [_CountingSource(pred, "p"), _CountingSource(gt, "g")]
    mask_source = report.ArraySource(mask.astype(np.uint8), "m", (1.0,) * 3) if masked else None
    scores, shapes = report.evaluate(*sources, "instance", mask_source, block_voxels=block, progress=False)
    for source in sources:  # each slab of each volume read once, never more than a block
        assert [b[0] for b in source.boxes] == [slice(s, min(s + 5, 24)) for s in range(0, 24, 5)]
    p, g = (pred[mask], gt[mask]) if masked else (pred, gt)
    expected = {**clustering_scores(p, g), **detection_scores(p, g)}
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert scores["adapted_rand_error"] == pytest.approx(adapted_rand_error(g, p)[0], abs=1e-12)
    assert [scores["voi_split"], scores["voi_merge"]] == pytest.approx(
        list(variation_of_information(g, p, ignore_labels=[0])), abs=1e-9)
    tp = np.sum((p != 0) & (g != 0))
    assert scores["dice"] == pytest.approx(2 * tp / (np.sum(p != 0) + np.sum(g != 0)))
    table = shapes["gt"].table((1.0, 1.0, 1.0))
    ids, sizes = np.unique(gt[gt != 0], return_counts=True)
    np.testing.assert_array_equal(table["label"], ids)
    np.testing.assert_allclose(table["volume_nm3"], sizes)


def test_benchmark_json_shape(tmp_path):
    """The benchmark's record at 16^3: both times, their ratio, machine and versions."""
    record = metrics_bench.benchmark(16, "tiff", 1, str(tmp_path))
    assert set(record["seconds"]) == {"jaxem", "skimage"}
    assert record["ratio_skimage_over_jaxem"] == pytest.approx(
        record["seconds"]["skimage"] / record["seconds"]["jaxem"], abs=0.01)
    assert {"platform", "processor", "cores"} <= set(record["machine"])
    assert {"numpy", "scikit-image", "fastremap"} <= set(record["versions"])
    assert set(record["scores"]) == {"adapted_rand_error", "voi_split", "voi_merge"}


def test_uncompressed_tiff_is_memory_mapped_and_compressed_tiff_read(tmp_path):
    """The protocol pages an uncompressed TIFF in slab by slab instead of reading it whole."""
    import tifffile

    array = np.arange(2 * 3 * 4, dtype=np.uint32).reshape(2, 3, 4)
    tifffile.imwrite(tmp_path / "plain.tif", array)
    tifffile.imwrite(tmp_path / "zlib.tif", array, compression="zlib")
    plain, packed = report.open_source(str(tmp_path / "plain.tif")), report.open_source(str(tmp_path / "zlib.tif"))
    assert isinstance(plain.array, np.memmap) and not isinstance(packed.array, np.memmap)
    np.testing.assert_array_equal(plain.read((slice(1, 2),)), packed.read((slice(1, 2),)))
