"""Agglomeration of a volume larger than memory: one region graph over all blocks, one merge.

Agglomerating each block alone and stitching the blocks (`stitch.segment_blockwise`) lets a merge
near a block border see only that block. Here, as in lsd/daisy's pipelines, the blocks only
cut the work, not the graph:

1. Fragments per block: `fragment_fn` (e.g. the over-seeded watershed) on the block's core grown
   by `overlap` voxels of context, block-unique ids, the core written to the output
   (`stitch._segment_block`); fragments end at block borders.
2. Edges per block: the faces whose lower voxel lies in the block's core (each face of the volume
   is counted by exactly one block, those across a border included), read from the fragments
   written in step 1 and the prediction, summed into a partial region graph
   (`agglomerate.region_graph`). The partial graphs are added on the driver (`sum_edges`): the
   graph has a few numbers per pair of touching fragments, far smaller than the volume.
3. One mean-boundary merge over the whole graph (`agglomerate.merge_ids`), fragments cut by a
   border joining like any others; objects below `min_size` voxels become 0; ids consecutive.
4. Every block relabelled in place, given only its own ids (`stitch.relabel_blocks`).

Steps 1, 2 and 4 run on any executor (in-process or Dask). The result equals agglomerating the
same fragments of the whole volume at once (tests/test_agglomerate.py).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from jaxem.data.volume import as_probabilities, open_volume
from jaxem.segment.executors import InProcess
from jaxem.segment import stitch
from jaxem.segment.agglomerate import RegionGraph, merge_ids, region_graph, sum_edges

EVIDENCE = ("boundary", "foreground", "affinities")


def agglomerate_blockwise(input_path, output_path, block, fragment_fn, merge: float, evidence: str = "boundary",
                          offsets=None, axes=None, overlap: int = 8, min_size: int = 0, executor=None,
                          channel=None, overwrite: bool = False, read_as=as_probabilities) -> dict:
    """Fragments of `input_path` (a (z, y, x) / (y, x) map, or affinities (K, *spatial) with
    `channel='all'` and their `offsets`) made block by block with `fragment_fn(array) -> labels`,
    merged over the whole volume while the mean boundary over shared faces is below `merge`,
    written to a uint64 OME-Zarr label group at `output_path`.

    `evidence`: how the prediction reads as a boundary ('boundary'; 'foreground': 1 - p;
    'affinities'). `axes` limits merging to faces across these axes (e.g. (1, 2): within
    sections). `read_as(block) -> probabilities` (picklable) turns a block read from `input_path`
    into the merge evidence (default: uint8 as v / 255). Returns {'objects', 'blocks',
    'fragments', 'edges'}.
    """
    if evidence not in EVIDENCE:
        raise ValueError(f"evidence {evidence!r} is not one of {EVIDENCE}")
    executor = executor or InProcess()
    source = open_volume(input_path)
    shape = source.shape[1:] if channel is not None or source.ndim == len(block) + 1 else source.shape
    shape, block = tuple(shape), tuple(block)
    stitch.create_labels(input_path, output_path, shape, block, overwrite)
    blocks = stitch.block_grid(shape, block)
    made = executor.map(partial(_fragments_block, input_path, output_path, shape, block, fragment_fn, overlap,
                                channel), blocks, desc="fragments")
    partial_graphs = executor.map(partial(_block_graph, input_path, output_path, shape, block, channel, evidence,
                                          offsets, axes, read_as), blocks, desc="region graphs")
    uv = np.concatenate([g.uv for g in partial_graphs])
    graph = sum_edges(uv[:, 0], uv[:, 1], np.concatenate([g.sums for g in partial_graphs]),
                      np.concatenate([g.counts for g in partial_graphs]))
    ids, new_ids, count = _merged_ids(graph, made, merge, min_size)
    stitch.relabel_blocks(executor, output_path, shape, block, ids, new_ids)
    return {"objects": count, "blocks": len(blocks), "fragments": len(ids), "edges": len(graph.uv)}


def _fragments_block(*args) -> dict:
    """`stitch._segment_block` without the face strips that stitching needs."""
    made = stitch._segment_block(*args, store_faces=False)
    return {"ids": made["ids"], "counts": made["counts"]}


def _block_graph(input_path, fragments_path, shape, block, channel, evidence, offsets, axes, read_as,
                 index) -> RegionGraph:
    """The partial region graph of one block: faces whose lower voxel lies in the block's core."""
    core = stitch.core_box(index, shape, block)
    ext = tuple(slice(c.start, min(c.stop + 1, s)) for c, s in zip(core, shape))  # + the next voxel up
    fragments = open_volume(fragments_path).read(ext)
    source = open_volume(input_path)
    if source.ndim > len(shape):
        data = source.read(((slice(None) if channel == "all" else (channel or 0)),) + ext)
    else:
        data = source.read(ext)
    data = read_as(data)
    parts = []
    for axis in (range(len(shape)) if axes is None else axes):
        # along `axis` the core and the next voxel up; along the others the core alone
        sub = tuple(slice(0, (e.stop if a == axis else c.stop) - c.start) for a, (c, e) in enumerate(zip(core, ext)))
        if evidence == "affinities":
            parts.append(region_graph(fragments[sub], affinities=data[(slice(None),) + sub], offsets=offsets, axes=(axis,)))
        else:
            boundary = data[sub] if evidence == "boundary" else 1.0 - data[sub]
            parts.append(region_graph(fragments[sub], boundary=boundary, axes=(axis,)))
    return RegionGraph(*(np.concatenate([getattr(p, f) for p in parts]) for f in RegionGraph._fields))


def _merged_ids(graph: RegionGraph, made: list[dict], merge: float, min_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(the sorted block-unique fragment ids, the global object id of each (0 for objects below
    min_size), the object count)."""
    ids, counts = stitch.block_ids(made)
    root = ids.copy()
    merged, roots = merge_ids(graph, merge)
    root[np.searchsorted(ids, merged)] = roots
    _, component = np.unique(root, return_inverse=True)
    return ids, *stitch.consecutive_ids(ids, component, counts, min_size)
