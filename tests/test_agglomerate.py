"""Agglomeration of over-segmentations by mean boundary evidence (jaxem.segment.agglomerate)."""

import numpy as np
import pytest

from benchmarks.merge_speed import grid_graph
from jaxem.errors import UserError
from jaxem.metrics.clustering import clustering_scores
from jaxem.segment import agglomerate as agg
from jaxem.segment import instances


def three_fragments():
    """Fragments 1 | 2 | 3 in columns of a 2 x 6 slice, 0 in the last column; a boundary map with
    the values the faces between them read."""
    fragments = np.array([[1, 1, 2, 2, 3, 0],
                          [1, 1, 2, 2, 3, 0]], np.uint64)
    boundary = np.array([[0.0, 0.1, 0.3, 0.2, 0.6, 0.0],
                         [0.0, 0.2, 0.0, 0.4, 0.1, 0.9]], np.float32)
    return fragments, boundary


def test_region_graph_sums_the_larger_voxel_over_shared_faces():
    graph = agg.region_graph(*three_fragments())
    edges = {tuple(uv): (s, c) for uv, s, c in zip(graph.uv.tolist(), graph.sums, graph.counts)}
    # 1-2 faces: max(0.1, 0.3) and max(0.2, 0.0); 2-3: max(0.2, 0.6) and max(0.4, 0.1); 3-0 is no edge
    assert set(edges) == {(1, 2), (2, 3)}
    assert edges[(1, 2)][0] == pytest.approx(0.5) and edges[(1, 2)][1] == 2
    assert edges[(2, 3)][0] == pytest.approx(1.0) and edges[(2, 3)][1] == 2


@pytest.mark.parametrize("sign", [1, -1])
def test_region_graph_from_affinities_reads_the_face_each_offset_points_across(sign):
    fragments = np.array([[1, 1, 2]], np.uint64)
    aff = np.zeros((2, 1, 3), np.float32)  # channel 0: offset (sign, 0), never across a fragment face
    if sign == 1:
        aff[1, 0] = [0.9, 0.25, 0.0]  # offset (0, 1): voxel x pairs with x + 1, so x = 1 sees the 1|2 face
    else:
        aff[1, 0] = [0.0, 0.9, 0.25]  # offset (0, -1): voxel x pairs with x - 1, so x = 2 sees it
    graph = agg.region_graph(fragments, affinities=aff, offsets=[(sign, 0), (0, sign)])
    assert graph.uv.tolist() == [[1, 2]] and graph.sums[0] == pytest.approx(0.75) and graph.counts[0] == 1


def test_merging_rescores_the_merged_fragment():
    """1-2 mean 0.1 (1 face), 2-3 mean 0.4 (2 faces), 1-3 mean 0.8 (2 faces). After 1 and 2 join,
    the joined fragment's edge to 3 reads (2 * 0.4 + 2 * 0.8) / 4 = 0.6, so merge = 0.5 keeps 3 apart
    although its face with 2 alone reads 0.4."""
    graph = agg.RegionGraph(np.array([[1, 2], [2, 3], [1, 3]], np.uint64), np.array([0.1, 0.8, 1.6]),
                            np.array([1, 2, 2]))
    table = agg.merge_regions(graph, 0.5, 4)
    assert table[1] == table[2] and table[3] != table[1] and table[0] == 0
    table = agg.merge_regions(graph, 0.61, 4)
    assert table[1] == table[2] == table[3]
    assert agg.merge_regions(graph, 0.05, 4).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("merge", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_rounds_merge_exactly_as_the_heap(merge, seed):
    """Merging all mutually weakest pairs at once (then the heap) gives the same partition as
    the heap alone, one merge at a time; the rounds do run here (thousands of pairs each)."""
    graph, _ = grid_graph(16, seed)  # fragments 1..16^3 on a 6-connected grid, random means
    pairs = agg._mutual_weakest(graph.uv, graph.sums / graph.counts, merge, 16**3 + 1)
    assert len(pairs) >= agg._MIN_ROUND_MERGES
    fast, slow = agg.merge_regions(graph, merge, 16**3 + 1), agg._merge_heap(graph, merge, 16**3 + 1)
    joint = np.unique(np.stack([fast, slow], 1), axis=0)
    assert len(joint) == len(np.unique(fast)) == len(np.unique(slow)) < 16**3 + 1


def test_a_chain_of_rising_scores_merges_in_order():
    """Fragments 1-2-3-4-5 with edge means 0.1 < 0.2 < 0.3 < 0.6: one mutual pair per round; all
    but the last edge merge at 0.5."""
    uv = np.array([[1, 2], [2, 3], [3, 4], [4, 5]], np.uint64)
    graph = agg.RegionGraph(uv, np.array([0.1, 0.2, 0.3, 0.6]), np.ones(4, np.int64))
    table = agg.merge_regions(graph, 0.5, 6)
    assert len(set(table[1:5].tolist())) == 1 and table[5] != table[1]


def test_agglomerate_keeps_background_and_merge_bounds():
    fragments, boundary = three_fragments()
    assert np.array_equal(agg.agglomerate(fragments, 0.0, boundary=boundary), fragments)
    merged = agg.agglomerate(fragments, 0.3, boundary=boundary)  # 1-2 (0.25) join, 2-3 (0.5) do not
    assert merged.tolist() == [[1, 1, 1, 1, 2, 0]] * 2
    everything = agg.agglomerate(fragments, 1.0, boundary=boundary)
    assert set(np.unique(everything)) == {0, 1}
    with pytest.raises(UserError, match="merge threshold"):
        agg.agglomerate(fragments, 1.5, boundary=boundary)
    with pytest.raises(UserError, match="either a boundary map or affinities"):
        agg.region_graph(fragments)


def split_cells_case():
    """(boundary map, ground truth) of 4 x 4 square cells, 40 x 40 pixels, each with a faint
    (0.3) crack across it that a watershed seeded on both sides of the crack splits it along."""
    from conftest import grid_boundaries

    prob = grid_boundaries((41, 41), 10) * 0.95
    gt = np.zeros(prob.shape, np.uint64)
    for y in range(4):
        for x in range(4):
            gt[10 * y + 1: 10 * y + 10, 10 * x + 1: 10 * x + 10] = 4 * y + x + 1
            prob[10 * y + 1: 10 * y + 10, 10 * x + 5] = 0.3
    return prob, gt


def test_agglomeration_repairs_the_splits_of_an_over_seeded_watershed():
    prob, gt = split_cells_case()
    fragments = instances.instances_from_boundaries(prob, "watershed", threshold=0.2, seeds="threshold")
    assert fragments.max() == 32  # every cell split in two along its crack
    merged = instances.instances_from_boundaries(prob, "agglomerate", threshold=0.2, seeds="threshold", merge=0.5)
    assert merged.max() == 16
    inside = gt > 0
    assert clustering_scores(merged, gt)["vrand"] == pytest.approx(1.0)
    assert len(np.unique(merged[inside])) == 16
    # a merge threshold above the real membranes (0.95) joins cells too
    assert instances.instances_from_boundaries(prob, "agglomerate", threshold=0.2, seeds="threshold", merge=0.99).max() == 1


def test_agglomerate_per_slice_and_on_affinities():
    prob, gt = split_cells_case()
    volume = np.stack([prob, prob])
    merged = instances.instances_from_boundaries(volume, "agglomerate", threshold=0.2, seeds="threshold",
                                                 merge=0.5, per_slice=True)
    assert merged.max() == 32 and not set(np.unique(merged[0])) & set(np.unique(merged[1]))
    # affinities: one minus the larger boundary value of the two voxels an edge joins
    offsets = [(0, 1, 0), (0, 0, 1), (1, 0, 0)]
    aff = np.ones((3,) + volume.shape, np.float32)
    aff[0, :, -1] = aff[1, :, :, -1] = 0.0  # no neighbour past the last row and column
    aff[0, :, :-1] = 1 - np.maximum(volume[:, :-1], volume[:, 1:])
    aff[1, :, :, :-1] = 1 - np.maximum(volume[:, :, :-1], volume[:, :, 1:])
    labels = instances.instances_from_affinities(aff, offsets, "agglomerate", threshold=0.2, h=0.5, merge=0.5)
    assert labels.max() == 16 and clustering_scores(labels, np.stack([gt, gt]))["vrand"] == pytest.approx(1.0)
    assert instances.instances_from_affinities(aff, offsets, "watershed", threshold=0.2, h=0.5).max() == 32


def test_tuning_chooses_agglomeration_where_the_watershed_splits():
    from jaxem.segment import tune

    prob, gt = split_cells_case()
    split = {"method": "watershed", "seeds": "threshold", "threshold": 0.2}
    grid = [split, dict(split, method="agglomerate", merge=0.5)]
    result = tune.tune(prob, gt, grid=grid, metric="vrand", progress=False, workers=1)
    assert result["best"] == grid[1] and result["best_score"] == pytest.approx(1.0)
    assert result["table"][0]["scores"]["vrand"] < 0.8


@pytest.mark.parametrize("evidence", ["boundary", "affinities"])
@pytest.mark.parametrize("fragments, block", [
    ("sections", (2, 41, 41)),  # per-section watershed: every cell split along its crack, 6 x 32 fragments
    ("components", (2, 16, 24)),  # 3D components of boundary < 0.25 (32), which the blocks cut up
])
def test_blockwise_agglomeration_equals_the_whole_volume(tmp_path, evidence, fragments, block):
    """One region graph over all blocks, one merge: the same partition as agglomerating the whole
    volume's fragments at once. Per-section watershed fragments do not depend on where z is cut,
    so the blocks see the whole volume's fragments; components cut by y/x borders rejoin first (the
    faces inside a component read below 0.25, those between components above), so the merge
    then runs as on the whole volume."""
    from functools import partial

    from jaxem.data.volume import create_volume, open_volume
    from jaxem.segment.agglomerate_blocks import agglomerate_blockwise

    prob, _ = split_cells_case()
    prob[prob == np.float32(0.3)] = 0.35  # the cracks, merged at 0.45
    rng = np.random.default_rng(0)
    volume = np.clip(np.stack([prob] * 6) + rng.normal(0, 0.02, (6,) + prob.shape), 0, 1).astype(np.float32)
    if fragments == "sections":
        fragment_fn = partial(instances.instances_from_boundaries, method="watershed", threshold=0.2,
                              seeds="threshold", per_slice=True)
    else:
        fragment_fn = partial(instances.instances_from_boundaries, method="cc", threshold=0.25)
    if evidence == "boundary":
        data, offsets, channel = volume, None, None
        whole = fragment_fn(volume)
        expected = agg.agglomerate(whole, 0.45, boundary=volume)
    else:
        offsets = [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]
        data = np.zeros((3,) + volume.shape, np.float32)  # affinity to the voxel one step back (none: 0)
        data[0] = 1 - volume  # (the first section reads its own boundary)
        data[0, 1:] = 1 - np.maximum(volume[1:], volume[:-1])
        data[1, :, 1:] = 1 - np.maximum(volume[:, 1:], volume[:, :-1])
        data[2, :, :, 1:] = 1 - np.maximum(volume[:, :, 1:], volume[:, :, :-1])
        channel = "all"
        fragment_fn = partial(_fragments_of_affinities, fragment_fn)
        whole = fragment_fn(data)
        expected = agg.agglomerate(whole, 0.45, affinities=data, offsets=offsets)
    axes = ("c", "z", "y", "x") if data.ndim == 4 else ("z", "y", "x")
    create_volume(tmp_path / "pred", data.shape, np.float32, (40.0, 4.0, 4.0), axes=axes).write(data)
    stats = agglomerate_blockwise(tmp_path / "pred", tmp_path / "seg", block, fragment_fn, 0.45, evidence,
                                  offsets=offsets, overlap=0, channel=channel)
    labels = open_volume(tmp_path / "seg").read()
    if fragments == "sections":
        assert whole.max() == 6 * 32 and expected.max() <= 18  # the sections' halves joined in 3D
    else:
        assert whole.max() == expected.max() == 32  # nothing to merge: the test is the pieces rejoining
    pairs = np.unique(np.stack([labels.ravel(), expected.ravel()]), axis=1)
    assert stats["objects"] == labels.max() == expected.max() == pairs.shape[1] - int((expected == 0).any())
    # blocks that cut only z leave the sections' fragments whole; y/x borders cut components into pieces
    assert stats["fragments"] == whole.max() if fragments == "sections" else stats["fragments"] > whole.max()


def _fragments_of_affinities(fragment_fn, affinities):
    return fragment_fn(1 - affinities.min(axis=0))
