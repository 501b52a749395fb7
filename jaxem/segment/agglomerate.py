"""Agglomeration: merge an over-segmentation into objects by the boundary evidence between fragments.

A watershed with many seeds splits every neuron into several fragments but rarely merges two
neurons: where it errs, it errs by splits. Agglomeration repairs the splits. It builds the region
adjacency graph of the fragments, scores each edge by the mean boundary probability over the
voxel faces the two fragments share, and merges the pair with the weakest boundary first,
re-scoring the merged fragment's edges (sums and face counts add), until every remaining edge
scores at least `merge`. This is the mean-affinity agglomeration of waterz (Funke et al. 2018),
as the MALA and LSD pipelines run it on CREMI. The edge score is
one minus the affinity across the face when affinities are given, else the larger of the two
voxels' boundary values (a face next to a membrane voxel sees the membrane).

Labels are (y, x) or (z, y, x) uint64 with 0 = background (never merged); results are relabelled
to 1..N.
"""

from __future__ import annotations

import heapq
from typing import NamedTuple

import numpy as np

from jaxem.errors import UserError
from jaxem.segment.labels import relabel


class RegionGraph(NamedTuple):
    """Edges between face-adjacent fragments: uv (E, 2) uint64 with u < v, the summed boundary
    value over their shared faces (E,) float64, and the number of faces (E,) int64."""

    uv: np.ndarray
    sums: np.ndarray
    counts: np.ndarray


def region_graph(fragments: np.ndarray, boundary: np.ndarray | None = None,
                 affinities: np.ndarray | None = None, offsets=None, axes=None) -> RegionGraph:
    """The region adjacency graph of `fragments` (*spatial, ids >= 1, 0 = background) with boundary
    evidence from a boundary map (*spatial, high on membranes) or from affinities (K, *spatial) and
    their offsets (only the nearest-neighbour ones, one step along one axis, are used). `axes`
    limits the faces to those across these axes (default all).
    """
    fragments = np.asarray(fragments)
    if (boundary is None) == (affinities is None):
        raise UserError("region_graph takes either a boundary map or affinities, not both or neither.")
    axes = tuple(range(fragments.ndim)) if axes is None else tuple(axes)
    faces = []  # (source voxels, their neighbours one step along one axis, the face values)
    if boundary is not None:
        boundary = np.asarray(boundary, np.float32)
        for axis in axes:
            src, dst = _shifted(tuple(int(a == axis) for a in range(fragments.ndim)), fragments.shape)
            faces.append((src, dst, np.maximum(boundary[src], boundary[dst])))
    else:
        nearest = [(k, tuple(int(v) for v in o)) for k, o in enumerate(offsets) if sum(abs(int(v)) for v in o) == 1]
        if not nearest:
            raise UserError(f"affinity offsets {[list(o) for o in offsets]} have no nearest-neighbour offset, "
                            "which agglomeration scores edges with.")
        for k, step in nearest:
            if any(step[a] for a in axes):
                src, dst = _shifted(step, fragments.shape)
                faces.append((src, dst, 1.0 - np.asarray(affinities[k], np.float32)[src]))
    us, vs, values = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)], [np.zeros(0, np.float32)]
    for src, dst, value in faces:
        a, b = fragments[src], fragments[dst]
        across = (a != b) & (a != 0) & (b != 0)
        a, b = a[across], b[across]
        us.append(np.minimum(a, b))
        vs.append(np.maximum(a, b))
        values.append(value[across])
    u, v, value = (np.concatenate(x) for x in (us, vs, values))
    return sum_edges(u, v, value.astype(np.float64), np.ones(u.size, np.int64))


def sum_edges(u: np.ndarray, v: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> RegionGraph:
    """One edge per distinct (u, v) pair (u < v, any uint64 ids), with the sums and face counts of
    its duplicates added: how per-face values, or the partial graphs of blocks, become one graph."""
    if u.size == 0:
        return RegionGraph(np.zeros((0, 2), np.uint64), np.zeros(0), np.zeros(0, np.int64))
    ids, compact = np.unique(np.concatenate([u, v]).astype(np.uint64), return_inverse=True)
    n = np.uint64(ids.size)  # keys of compact ids cannot overflow, whatever the ids are
    keys, edge = np.unique(compact[:u.size].astype(np.uint64) * n + compact[u.size:].astype(np.uint64),
                           return_inverse=True)
    return RegionGraph(np.stack([ids[keys // n], ids[keys % n]], axis=1),
                       np.bincount(edge, weights=sums, minlength=keys.size),
                       np.bincount(edge, weights=counts, minlength=keys.size).astype(np.int64))


def _shifted(step, shape):
    """Slices (source, destination) pairing every voxel p with p + step inside `shape`."""
    src = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(step, shape))
    dst = tuple(slice(max(0, s), n - max(0, -s)) for s, n in zip(step, shape))
    return src, dst


def merge_regions(graph: RegionGraph, merge: float, num_ids: int) -> np.ndarray:
    """Mean-boundary agglomeration of `graph`: repeatedly merges the two fragments whose shared
    faces have the lowest mean boundary value, while it is below `merge`. Returns a lookup table
    (num_ids,) uint64 from fragment id to the id of the fragment it joined (0 stays 0).

    The mean over faces is a reducible linkage (a merged edge's mean lies between its parts'), so
    merging every pair of fragments that are each other's weakest edge at once gives the same
    merges as one at a time (the nearest-neighbour-chain argument of average linkage, Muellner
    2011). Rounds of such pairs run vectorised while they merge many fragments; the heap finishes
    the rest. Results match the heap alone except where edge scores tie exactly."""
    parent = np.arange(num_ids, dtype=np.uint64)
    uv, sums, counts = graph.uv.astype(np.uint64), graph.sums.astype(np.float64), graph.counts.astype(np.int64)
    while uv.size:
        pairs = _mutual_weakest(uv, sums / counts, merge, num_ids)
        if len(pairs) < max(_MIN_ROUND_MERGES, len(uv) // 100):
            break  # too few per round for numpy to beat the heap
        parent[pairs[:, 1]] = pairs[:, 0]
        uv, sums, counts = _contract(uv, sums, counts, pairs, num_ids)
    table = _merge_heap(RegionGraph(uv, sums, counts), merge, num_ids)
    return table[_roots(parent)]


_MIN_ROUND_MERGES = 64


def _mutual_weakest(uv: np.ndarray, score: np.ndarray, merge: float, num_ids: int) -> np.ndarray:
    """The edges (P, 2) below `merge` that are the weakest edge of both their fragments (ties go
    to the lower edge index, so every fragment has one weakest edge and the pairs are disjoint).
    Only edges below `merge` matter: a fragment whose weakest edge is above has none to merge."""
    live = np.flatnonzero(score < merge)
    u, v, s = uv[live, 0], uv[live, 1], score[live]
    weakest = np.full(num_ids, np.inf)
    np.minimum.at(weakest, u, s)
    np.minimum.at(weakest, v, s)
    first = np.full(num_ids, live.size, np.int64)  # per fragment, the first edge at its weakest score
    at_u, at_v = np.flatnonzero(s == weakest[u]), np.flatnonzero(s == weakest[v])
    np.minimum.at(first, u[at_u], at_u)
    np.minimum.at(first, v[at_v], at_v)
    edges = np.arange(live.size)
    return uv[live[(first[u] == edges) & (first[v] == edges)]]


def _contract(uv, sums, counts, pairs, num_ids):
    """The graph after each pair's second fragment joins its first: edges between the same two
    fragments add up, edges inside a merged pair go."""
    into = np.arange(num_ids, dtype=np.uint64)
    into[pairs[:, 1]] = pairs[:, 0]
    u, v = into[uv[:, 0]], into[uv[:, 1]]
    keep = u != v
    graph = sum_edges(np.minimum(u, v)[keep], np.maximum(u, v)[keep], sums[keep], counts[keep])
    return graph.uv, graph.sums, graph.counts


def _roots(parent: np.ndarray) -> np.ndarray:
    """Follows merge chains in a parent table to their final fragment."""
    while True:
        root = parent[parent]
        if np.array_equal(root, parent):
            return parent
        parent = root


def _merge_heap(graph: RegionGraph, merge: float, num_ids: int) -> np.ndarray:
    """`merge_regions` one merge at a time: a heap of edge means with lazy deletion."""
    parent = np.arange(num_ids, dtype=np.uint64)
    adjacency: dict[int, dict[int, tuple[float, int]]] = {}
    heap = []
    for (u, v), s, c in zip(graph.uv.tolist(), graph.sums.tolist(), graph.counts.tolist()):
        adjacency.setdefault(u, {})[v] = adjacency.setdefault(v, {})[u] = (s, c)
        heap.append((s / c, u, v))
    heapq.heapify(heap)
    while heap and heap[0][0] < merge:
        mean, u, v = heapq.heappop(heap)
        edge = adjacency.get(u, {}).get(v)
        if edge is None or edge[0] / edge[1] != mean:
            continue  # stale: an endpoint was merged away, or the edge was re-scored since
        if len(adjacency[u]) < len(adjacency[v]):
            u, v = v, u  # fold the fragment with fewer neighbours into the other
        parent[v] = u
        neighbours = adjacency.pop(v)
        del adjacency[u][v]
        for n, (s, c) in neighbours.items():
            if n == u:
                continue
            del adjacency[n][v]
            if n in adjacency[u]:
                s, c = s + adjacency[u][n][0], c + adjacency[u][n][1]
            adjacency[u][n] = adjacency[n][u] = (s, c)
            heapq.heappush(heap, (s / c, min(u, n), max(u, n)))
    return _roots(parent)


def merge_ids(graph: RegionGraph, merge: float) -> tuple[np.ndarray, np.ndarray]:
    """`merge_regions` for a graph of any uint64 ids (e.g. block-unique ones): (ids, roots), the
    sorted ids of the graph's fragments and the id of the fragment each one joined."""
    ids, compact = np.unique(graph.uv, return_inverse=True)
    compact_graph = RegionGraph(compact.reshape(graph.uv.shape).astype(np.uint64), graph.sums, graph.counts)
    return ids, ids[merge_regions(compact_graph, merge, ids.size)]


def agglomerate(fragments: np.ndarray, merge: float, boundary: np.ndarray | None = None,
                affinities: np.ndarray | None = None, offsets=None) -> np.ndarray:
    """Merges `fragments` (*spatial) whose shared faces have a mean boundary value below `merge`
    (in [0, 1]; 0 merges nothing), by a boundary map (*spatial) or by affinities (K, *spatial) with
    their offsets -> uint64 labels 1..N (0 stays 0)."""
    _check_merge(merge)
    return merge_fragments(*fragment_graph(fragments, boundary, affinities, offsets), merge)


def fragment_graph(fragments: np.ndarray, boundary: np.ndarray | None = None, affinities: np.ndarray | None = None,
                   offsets=None) -> tuple[np.ndarray, RegionGraph]:
    """`fragments` (*spatial) relabelled 1..N and their `region_graph`: what `merge_fragments` needs
    for any merge threshold (a sweep over thresholds builds it once)."""
    fragments = relabel(fragments)
    return fragments, region_graph(fragments, boundary, affinities, offsets)


def merge_fragments(fragments: np.ndarray, graph: RegionGraph, merge: float) -> np.ndarray:
    """`agglomerate` from `fragment_graph`'s (fragments, graph) -> uint64 labels 1..N (0 stays 0)."""
    _check_merge(merge)
    table = merge_regions(graph, merge, int(fragments.max()) + 1)
    return relabel(table[fragments])


def _check_merge(merge: float) -> None:
    if not 0.0 <= merge <= 1.0:
        raise UserError(f"the merge threshold must lie in [0, 1] (a boundary probability), got {merge}.")
