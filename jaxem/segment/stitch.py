"""Blockwise instance segmentation with globally consistent ids (union-find across block faces).

1. Each block is segmented on its core grown by `overlap` voxels (context), ids made unique per
   block (block number << 32), the core written to the output, and the labels of the strips
   along its faces stored next to the output (`jaxem_stitch/` keys in its group); the block
   returns its id counts.
2. Each pair of neighbouring blocks is matched on their shared strips (one task per pair):
   'touch' (overlap 0, for connected components) joins labels that are face-adjacent across the
   face, which makes the result equal to whole-volume connected components; 'overlap' (for
   watershed) joins labels that cover the majority of each other in the 2 * overlap strip both
   blocks segmented. The joins form a graph whose connected components (scipy) are the objects.
3. Each block is relabelled to consecutive global ids (objects below `min_size` become 0), given
   only its own ids' new ids; the strips are deleted.
Every step runs on any executor (in-process or Dask); the driver holds ids, counts and joins,
never voxels, so the volume may be far larger than its memory.
"""

from __future__ import annotations

import io
import itertools
from functools import partial

import fastremap
import numpy as np
import tensorstore as ts
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from jaxem.data.volume import copy_ome_translation, create_volume, kvstore_spec, open_volume
from jaxem.segment.executors import InProcess

SHIFT = 32  # block-unique ids: (block number << 32) + local id


def block_grid(shape, block) -> list[tuple[int, ...]]:
    """Block indices in raster order."""
    return list(itertools.product(*(range(-(-s // b)) for s, b in zip(shape, block))))


def core_box(index, shape, block) -> tuple[slice, ...]:
    return tuple(slice(i * b, min((i + 1) * b, s)) for i, b, s in zip(index, block, shape))


def segment_blockwise(input_path, output_path, block, segment_fn, overlap=0, min_size=0, executor=None,
                      channel=None, overwrite=False) -> dict:
    """Segments a (z, y, x) or (y, x) map block by block into a uint64 OME-Zarr label group at `output_path`.

    `segment_fn(array) -> labels` must be picklable (e.g. functools.partial of a top-level
    function). `channel` picks one channel of a (c, ...) prediction ('all' passes every channel,
    for affinities). Returns {'objects': N, 'blocks': B}.
    """
    executor = executor or InProcess()
    source = open_volume(input_path)
    shape = source.shape[1:] if channel is not None or source.ndim == len(block) + 1 else source.shape
    create_labels(input_path, output_path, shape, block, overwrite)
    blocks = block_grid(shape, block)
    task = partial(_segment_block, input_path, output_path, tuple(shape), tuple(block), segment_fn, overlap, channel)
    results = dict(zip(blocks, executor.map(task, blocks, desc="segment blocks")))
    ids, counts = block_ids(results.values())
    joins = executor.map(partial(_match_pair, output_path, overlap), _neighbour_pairs(results, shape),
                         desc="match faces")
    new_ids, count = consecutive_ids(ids, _components(ids, joins), counts, min_size)
    relabel_blocks(executor, output_path, shape, block, ids, new_ids)
    _scratch(output_path).delete_range(ts.KvStore.KeyRange(SCRATCH, SCRATCH[:-1] + "0")).result()
    return {"objects": count, "blocks": len(blocks)}


def create_labels(input_path, output_path, shape, block, overwrite=False) -> None:
    """Creates the uint64 OME-Zarr label group for a segmentation of `input_path` (spatial `shape`,
    chunks `block`): its voxel size, axes and translation (nm) are the input's."""
    source = open_volume(input_path)
    create_volume(output_path, shape, np.uint64, source.voxel_size, chunks=block,
                  axes=tuple(a for a in source.axes if a in "zyx"), overwrite=overwrite, format="ome-zarr", labels=True)
    copy_ome_translation(input_path, output_path)


def _segment_block(input_path, output_path, shape, block, segment_fn, overlap, channel, index, store_faces=True):
    core = core_box(index, shape, block)
    ext = tuple(slice(max(c.start - overlap, 0), min(c.stop + overlap, s)) for c, s in zip(core, shape))
    source = open_volume(input_path)
    if source.ndim > len(shape):  # (c, *spatial): one channel, or all of them for affinities
        ext_read = ((slice(None) if channel == "all" else (channel or 0)),) + ext
    data = source.read(ext_read if source.ndim > len(shape) else ext)
    labels = np.asarray(segment_fn(data), np.uint64)
    number = int(np.ravel_multi_index(index, [-(-s // b) for s, b in zip(shape, block)]))
    labels = np.where(labels > 0, labels + np.uint64(number << SHIFT), np.uint64(0))
    inner = tuple(slice(c.start - e.start, c.stop - e.start) for c, e in zip(core, ext))
    out = labels[inner]
    open_volume(output_path, "r+").write(out, [c.start for c in core])
    ids, counts = fastremap.unique(out, return_counts=True)
    if store_faces:
        scratch = _scratch(output_path)
        writes = [scratch.write(_face_key(number, axis, side), _to_bytes(face))
                  for (axis, side), face in _faces(labels, core, ext, overlap).items()]
        for write in writes:
            write.result()
    return {"number": number, "ext": [(e.start, e.stop) for e in ext], "ids": ids, "counts": counts}


SCRATCH = "jaxem_stitch/"  # face strips between steps 1 and 2, inside the output group


def _scratch(output_path):
    return ts.KvStore.open(kvstore_spec(output_path)).result()


def _face_key(number: int, axis: int, side: str) -> str:
    return f"{SCRATCH}{number}_{axis}_{side}.npy"


def _to_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _read_face(scratch, number: int, axis: int, side: str) -> np.ndarray:
    return np.load(io.BytesIO(scratch.read(_face_key(number, axis, side)).result().value))


def _faces(labels, core, ext, overlap):
    """Strips along each face, in the extended block's frame.

    overlap 0: the core plane at the face (low: first, high: last). Else the 2 * overlap strip
    centred on the face, as far as this block's extended box reaches.
    """
    faces = {}
    for axis in range(labels.ndim):
        for side in ("low", "high"):
            edge = core[axis].start if side == "low" else core[axis].stop
            if overlap == 0:
                lo, hi = (edge, edge + 1) if side == "low" else (edge - 1, edge)
            else:
                lo, hi = max(edge - overlap, ext[axis].start), min(edge + overlap, ext[axis].stop)
            box = [slice(None)] * labels.ndim
            box[axis] = slice(lo - ext[axis].start, hi - ext[axis].start)
            faces[(axis, side)] = labels[tuple(box)]
    return faces


def _neighbour_pairs(results: dict, shape) -> list[tuple]:
    """(block A's number and extended box, block B's, axis) for each B one step up from A."""
    pairs = []
    for index, r in results.items():
        for axis in range(len(shape)):
            nb = tuple(i + (a == axis) for a, i in enumerate(index))
            if nb in results:
                pairs.append(((r["number"], r["ext"]), (results[nb]["number"], results[nb]["ext"]), axis))
    return pairs


def _match_pair(output_path, overlap, pair) -> np.ndarray:
    """The label pairs (J, 2) to join across the face between two neighbouring blocks."""
    (a, ext_a), (b, ext_b), axis = pair
    scratch = _scratch(output_path)
    return _match(_read_face(scratch, a, axis, "high"), _read_face(scratch, b, axis, "low"), overlap,
                  ext_a, ext_b, axis).astype(np.uint64)


def _components(ids: np.ndarray, joins: list[np.ndarray]) -> np.ndarray:
    """The connected component of each of `ids` (sorted) in the graph of `joins`."""
    pairs = np.concatenate([np.zeros((0, 2), np.uint64), *joins]).astype(np.uint64)
    pairs = pairs[np.isin(pairs[:, 0], ids) & np.isin(pairs[:, 1], ids)]  # labels seen only in context
    rows, cols = np.searchsorted(ids, pairs[:, 0]), np.searchsorted(ids, pairs[:, 1])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(ids), len(ids)))
    return connected_components(graph, directed=False)[1]


def relabel_blocks(executor, output_path, shape, block, ids: np.ndarray, new_ids: np.ndarray) -> None:
    """Rewrites every block with the new ids of its own ids (block-unique ids carry the block's
    number in their high bits, so a block's share of the sorted ids is one slice)."""
    blocks = block_grid(shape, block)
    grid = [-(-s // b) for s, b in zip(shape, block)]
    numbers = np.array([np.ravel_multi_index(i, grid) for i in blocks], np.uint64)
    lo = np.searchsorted(ids, numbers << np.uint64(SHIFT))
    hi = np.searchsorted(ids, (numbers + np.uint64(1)) << np.uint64(SHIFT))
    items = [(index, ids[a:b], new_ids[a:b]) for index, a, b in zip(blocks, lo, hi)]
    executor.map(partial(_relabel_block, output_path, tuple(shape), tuple(block)), items, desc="relabel blocks")


def block_ids(results) -> tuple[np.ndarray, np.ndarray]:
    """(sorted nonzero block-unique ids, their voxel counts) of the blocks' `_segment_block` results."""
    ids = np.concatenate([r["ids"] for r in results])
    counts = np.concatenate([r["counts"] for r in results])
    order = np.argsort(ids)
    keep = ids[order] > 0
    return ids[order][keep], counts[order][keep]


def consecutive_ids(ids, component, counts, min_size) -> tuple[np.ndarray, int]:
    """(the object number of each of `ids`, number of objects): objects are the `component`
    numbers of `ids`, numbered 1..N consecutively; objects of fewer than `min_size` voxels
    (`counts` summed) get 0."""
    sizes = np.bincount(component, weights=counts)
    alive = sizes >= max(min_size, 1)
    new_id = np.zeros(len(sizes), np.uint64)
    new_id[alive] = np.arange(1, alive.sum() + 1, dtype=np.uint64)
    return new_id[component], int(alive.sum())


def _match(a_face, b_face, overlap, ext_a, ext_b, axis) -> np.ndarray:
    """Label pairs to join between block A's high face and block B's low face."""
    if overlap == 0:
        both = (a_face > 0) & (b_face > 0)
        return np.unique(np.stack([a_face[both], b_face[both]], 1), axis=0)
    a, b = _common(a_face, b_face, ext_a, ext_b, axis)
    both = (a > 0) & (b > 0)
    pairs, n = np.unique(np.stack([a[both], b[both]], 1), axis=0, return_counts=True)
    if len(pairs) == 0:
        return pairs.reshape(0, 2).astype(np.uint64)
    ia, na = fastremap.unique(a, return_counts=True)
    ib, nb = fastremap.unique(b, return_counts=True)
    size_a, size_b = dict(zip(ia.tolist(), na.tolist())), dict(zip(ib.tolist(), nb.tolist()))
    ok = [2 * c > size_a[int(p)] and 2 * c > size_b[int(q)] for (p, q), c in zip(pairs, n)]
    return pairs[np.array(ok, bool)]


def _common(a_face, b_face, ext_a, ext_b, axis):
    """Crops two strips (in their own blocks' extended boxes, [(start, stop)] per axis) to the box
    both cover."""
    box_a, box_b = [], []
    for d in range(a_face.ndim):
        a0, b0 = ext_a[d][0], ext_b[d][0]
        if d == axis:
            a_lo, b_lo = a0 + _face_start(ext_a, d, "high", a_face.shape[d]), b0 + _face_start(ext_b, d, "low", b_face.shape[d])
        else:
            a_lo, b_lo = a0, b0
        lo, hi = max(a_lo, b_lo), min(a_lo + a_face.shape[d], b_lo + b_face.shape[d])
        box_a.append(slice(lo - a_lo, hi - a_lo))
        box_b.append(slice(lo - b_lo, hi - b_lo))
    return a_face[tuple(box_a)], b_face[tuple(box_b)]


def _face_start(ext, axis, side, width) -> int:
    """Offset of a strip within the block's extended box along `axis`."""
    ext_lo, ext_hi = ext[axis]
    return (ext_hi - ext_lo - width) if side == "high" else 0


def _relabel_block(output_path, shape, block, item):
    """Rewrites one block's labels: item = (block index, its ids, their new ids)."""
    index, ids, new_ids = item
    volume = open_volume(output_path, "r+")
    box = core_box(index, shape, block)
    labels = volume.read(box)
    local = dict(zip(ids.tolist(), new_ids.tolist()))
    local[0] = 0
    volume.write(fastremap.remap(labels, local, preserve_missing_labels=False).astype(np.uint64), [b.start for b in box])
