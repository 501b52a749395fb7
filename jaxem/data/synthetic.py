"""Deterministic synthetic serial-section TEM of neuropil, with exact ground truth.

`generate(shape, voxel_size, seed)` builds, in physical units (nm), a tessellation of neurite-like
cells and renders what a serial-section transmission electron microscope would show:

- cells: a power (weighted) Voronoi tessellation of Poisson-disk-ish seeds whose spacing varies
  smoothly across the volume; distances are measured with z compressed by `elongation`, so cells
  are tubes running across the sections like neurites; a smooth random displacement field makes
  the boundaries irregular;
- membranes: dark bands around every cell, `membrane_thickness` nm thick in-plane; a membrane that is
  oblique to the section plane is projected through the section thickness, so it appears wider and
  fainter, as in real ssTEM; contrast varies per cell pair and along the membrane;
- mitochondria: dark elongated ellipsoids with a darker outer membrane and lighter cristae inside
  some cells;
- cytoplasm: per-cell brightness, low-frequency texture, vesicle clusters (small dark rings) and
  dark speckles (glycogen, dense-core vesicles) that a plain threshold confuses with membranes;
- acquisition: in-plane Gaussian PSF, Poisson (shot) and Gaussian (read) noise and per-section
  brightness/contrast drift.

Everything is vectorised numpy/scipy; loops run over objects (mitochondria), never voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cc3d
import fastremap
import numpy as np
from scipy import ndimage, signal, spatial

MEMBRANE, CYTOPLASM, MITOCHONDRION = 0, 1, 2
SEMANTIC_NAMES = ("membrane", "cytoplasm", "mitochondria")


@dataclass
class SyntheticEM:
    """A synthetic EM volume with its ground truth.

    raw: uint8 (z, y, x) [2D: (y, x)] image; instances: uint64 cell ids, 0 = membrane;
    semantic: uint8 classes 0 membrane, 1 cytoplasm, 2 mitochondria; voxel_size: nm per axis.
    """

    raw: np.ndarray
    instances: np.ndarray
    semantic: np.ndarray
    voxel_size: tuple[float, ...]

    @property
    def foreground(self) -> np.ndarray:
        """bool mask of cell interiors (everything that is not membrane)."""
        return self.instances > 0


def generate(
    shape=(16, 256, 256),
    voxel_size=(40.0, 4.0, 4.0),
    seed: int = 0,
    mitochondria: bool = True,
    vesicles: bool = True,
    cell_diameter=(150.0, 550.0),
    elongation: float = 3.0,
    membrane_thickness: float = 14.0,
    noise: float = 1.0,
    blur: float = 1.0,
) -> SyntheticEM:
    """Generates a synthetic ssTEM volume of `shape` (z, y, x) or a single section of shape (y, x).

    voxel_size: nm per axis, (z, y, x) or, for 2D, (y, x) or (z, y, x) where z is the section
    thickness. cell_diameter: (min, max) in-plane neurite diameter in nm; elongation: how many
    times longer cells are along z than across; membrane_thickness: labelled in-plane membrane
    width in nm; noise, blur: multipliers of the default noise level and PSF width (0 disables).
    Deterministic for a given seed and arguments.
    """
    shape3, vs3 = _as_3d(shape, voxel_size)
    rng = np.random.default_rng(seed)
    coords = _displaced_coords(shape3, vs3, cell_diameter, elongation, rng)
    seeds, weights = _seeds(shape3, vs3, cell_diameter, elongation, rng)
    nearest, gap, normal_z = (a.reshape(shape3) for a in _power_voronoi(coords, seeds, weights))
    del coords
    section = vs3[0] / elongation  # section thickness in the z-compressed space
    # distance from the voxel's column through the section to the membrane plane
    column_gap = np.maximum(gap - normal_z * np.minimum(section / 2, 2 * membrane_thickness), 0)
    membrane = column_gap < membrane_thickness / 2
    instances = _instances(nearest, membrane)
    semantic = np.where(membrane, MEMBRANE, CYTOPLASM).astype(np.uint8)
    image = _cytoplasm(instances, shape3, vs3, vesicles, rng)
    image = _membranes(image, nearest, column_gap, normal_z, section, membrane_thickness, vs3, rng)
    if mitochondria:
        image = _mitochondria(image, semantic, instances, gap, vs3, cell_diameter, rng)
    raw = _acquire(image, vs3, noise, blur, rng)
    squeeze = len(shape) == 2
    out = (raw, instances, semantic)
    out = tuple(a[0] for a in out) if squeeze else out
    vs = tuple(vs3[1:]) if squeeze else tuple(vs3)
    return SyntheticEM(raw=out[0], instances=out[1], semantic=out[2], voxel_size=vs)


def _as_3d(shape, voxel_size):
    shape = tuple(int(s) for s in shape)
    voxel_size = tuple(float(v) for v in voxel_size)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"shape must be (z, y, x) or (y, x) with positive sizes, got {shape}")
    if len(voxel_size) not in (len(shape), 3):
        raise ValueError(f"voxel_size {voxel_size} must have {len(shape)} values (or 3 for a 2D section)")
    if len(shape) == 2:
        shape = (1, *shape)
        voxel_size = voxel_size if len(voxel_size) == 3 else (40.0, *voxel_size)
    return shape, np.asarray(voxel_size)


def smooth_noise(shape, voxel_size, length_nm: float, rng, coarse: int = 4) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field of correlation length `length_nm`, float32 `shape`.

    Built on a grid `coarse` times finer than the correlation length and linearly upsampled, so the
    cost does not grow with the output resolution.
    """
    shape = np.asarray(shape)
    step = np.maximum(np.ones(3), length_nm / coarse / np.asarray(voxel_size))
    small = np.maximum(2, np.ceil(shape / step).astype(int) + 2)
    field = ndimage.gaussian_filter(rng.standard_normal(small), sigma=coarse / 2, mode="wrap")
    field /= field.std() + 1e-12
    grid = np.meshgrid(*[np.arange(n) / s for n, s in zip(shape, step)], indexing="ij", sparse=True)
    return _interp_linear(field.astype(np.float32), grid)


def _interp_linear(field, grid):
    """Separable linear interpolation of `field` at the sparse (open-mesh) fractional `grid`."""
    out = field
    for axis, g in enumerate(grid):
        g = g.reshape(-1)
        i0 = np.floor(g).astype(int)
        frac = (g - i0).astype(np.float32)
        shape = [1] * out.ndim
        shape[axis] = -1
        frac = frac.reshape(shape)
        out = np.take(out, i0, axis=axis) * (1 - frac) + np.take(out, i0 + 1, axis=axis) * frac
    return out


def _displaced_coords(shape, vs, diameter, elongation, rng):
    """Physical voxel coordinates (z compressed by `elongation`) plus a smooth displacement, (N, 3)."""
    mean_d = float(np.mean(diameter))
    axes = [np.arange(n, dtype=np.float32) * v for n, v in zip(shape, vs)]
    axes[0] /= elongation
    z, y, x = np.meshgrid(*axes, indexing="ij")
    coords = np.stack([z, y, x], axis=-1).reshape(-1, 3)
    for axis in range(3):  # two scales: gently curved walls plus small wiggles
        d = 0.15 * mean_d * smooth_noise(shape, vs, 0.6 * mean_d, rng).reshape(-1)
        d += 0.025 * mean_d * smooth_noise(shape, vs, 0.25 * mean_d, rng).reshape(-1)
        coords[:, axis] += d / (elongation if axis == 0 else 1.0)
    return coords


def _seeds(shape, vs, diameter, elongation, rng):
    """Poisson-disk-ish cell seeds whose spacing varies smoothly; returns (points (N, 3), weights (N,))."""
    lo, hi = float(diameter[0]), float(diameter[1])
    extent = np.asarray(shape) * vs
    extent[0] /= elongation
    box_lo, box_hi = -hi * np.ones(3), extent + hi
    # dart throwing over uniform candidates, in random order, with a spatially varying radius
    densest = np.prod(box_hi - box_lo) / (np.pi / 6 * lo**3)
    n_candidates = int(min(60_000, 3 * densest + 64))
    cand = rng.uniform(box_lo, box_hi, size=(n_candidates, 3))
    # cell size varies smoothly over a few cell diameters (sum of two random plane waves)
    density = sum(np.sin(2 * np.pi * cand @ _unit(rng) / (wave * hi) + rng.uniform(0, 2 * np.pi)) for wave in (3, 5))
    frac = np.clip(0.5 + 0.25 * density + 0.15 * rng.standard_normal(n_candidates), 0, 1)
    radius = 0.5 * (lo + (hi - lo) * frac**1.5)
    keep = _dart_throw(cand, 0.8 * radius)
    points, radius = cand[keep], radius[keep]
    # power weights make neighbouring cells of different radius share a fair boundary
    weights = radius**2 * rng.uniform(0.6, 1.0, size=len(points))
    return points, weights


def _unit(rng):
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _dart_throw(points, radius):
    """Greedy thinning in order: keeps a point unless a kept one lies within twice its radius."""
    tree = spatial.cKDTree(points)
    neighbours = tree.query_ball_point(points, r=2 * radius, workers=-1)
    keep = np.zeros(len(points), bool)
    blocked = np.zeros(len(points), bool)
    for i, near in enumerate(neighbours):  # loops over candidate seeds (thousands), not voxels
        if not blocked[i]:
            keep[i] = True
            blocked[near] = True
    return keep


def _power_voronoi(coords, seeds, weights, k: int = 8):
    """Nearest seed under the power distance, distance (nm) to the nearest bisector, and |n_z| of it.

    coords (N, 3) -> (nearest (N,) int, gap (N,) float32, normal_z (N,) float32), reshaped by caller.
    """
    n = coords.shape[0]
    k = min(k, len(seeds))
    tree = spatial.cKDTree(seeds)
    nearest = np.empty(n, np.int64)
    gap = np.empty(n, np.float32)
    normal_z = np.empty(n, np.float32)
    for start in range(0, n, 1 << 19):  # bounded memory for large volumes
        p = coords[start:start + (1 << 19)]
        dist, idx = tree.query(p, k=k, workers=-1)
        power = dist.astype(np.float32) ** 2 - weights[idx].astype(np.float32)
        order = np.argsort(power, axis=1)[:, :2]
        first = np.take_along_axis(idx, order[:, :1], 1)[:, 0]
        second = np.take_along_axis(idx, order[:, 1:2], 1)[:, 0]
        p1 = np.take_along_axis(power, order[:, :1], 1)[:, 0]
        p2 = np.take_along_axis(power, order[:, 1:2], 1)[:, 0]
        delta = (seeds[second] - seeds[first]).astype(np.float32)
        length = np.linalg.norm(delta, axis=1) + 1e-6
        nearest[start:start + len(p)] = first
        gap[start:start + len(p)] = (p2 - p1) / (2 * length)
        normal_z[start:start + len(p)] = np.abs(delta[:, 0]) / length
    return nearest, gap, normal_z


def _instances(nearest, membrane):
    """Cell ids 1..N with membrane = 0; every id is one 6-connected component."""
    labels = nearest.astype(np.uint32) + 1
    labels[membrane] = 0
    labels = cc3d.connected_components(labels, connectivity=6)
    labels, _ = fastremap.renumber(labels, in_place=True)
    return labels.astype(np.uint64)


def _cytoplasm(instances, shape, vs, vesicles, rng):
    """Cytoplasm intensity in [0, 1]: per-cell brightness, texture, vesicle clusters and speckles."""
    n_cells = int(instances.max()) + 1
    cell_bright = rng.normal(0.6, 0.04, size=n_cells).astype(np.float32)
    image = cell_bright[instances.astype(np.int64)]
    image += 0.035 * smooth_noise(shape, vs, 150.0, rng)
    image += 0.02 * smooth_noise(shape, vs, 40.0, rng)
    image += 0.04 * smooth_noise(shape, vs, 12.0, rng, coarse=2)
    dark = np.zeros(shape, np.float32)
    # dark speckles: glycogen granules / dense-core vesicles, 15-40 nm, anywhere in cytoplasm
    _splat(dark, rng, density_per_um2=14.0, vs=vs, radius_nm=(8, 20), strength=(0.25, 0.6), ring=False)
    if vesicles:
        cluster = smooth_noise(shape, vs, 250.0, rng) > 0.5
        ves = np.zeros(shape, np.float32)
        _splat(ves, rng, density_per_um2=250.0, vs=vs, radius_nm=(16, 24), strength=(0.2, 0.35), ring=True)
        dark += ves * cluster
    image -= dark
    return image


def _splat(out, rng, density_per_um2, vs, radius_nm, strength, ring):
    """Adds small discs (or rings) of random radius at random positions in each section of `out`."""
    nz, ny, nx = out.shape
    area_um2 = ny * nx * vs[1] * vs[2] / 1e6
    for r_lo, r_hi in _bins(radius_nm, 3):  # a few radius classes, one FFT convolution each
        count = rng.poisson(density_per_um2 * area_um2 * nz / 3)
        impulses = np.zeros(out.shape, np.float32)
        idx = tuple(rng.integers(0, n, count) for n in out.shape)
        np.add.at(impulses, idx, rng.uniform(*strength, count).astype(np.float32))
        r_px = (r_lo + r_hi) / 2 / vs[1]
        half = int(np.ceil(r_px + 2))
        yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
        rr = np.hypot(yy, xx)
        kernel = np.exp(-0.5 * ((rr - r_px) / 0.9) ** 2) if ring else 1 / (1 + np.exp(3 * (rr - r_px)))
        out += signal.fftconvolve(impulses, kernel[None].astype(np.float32), mode="same", axes=(1, 2))


def _bins(bounds, n):
    edges = np.linspace(bounds[0], bounds[1], n + 1)
    return list(zip(edges[:-1], edges[1:]))


def _membranes(image, nearest, column_gap, normal_z, section, thickness, vs, rng):
    """Darkens membrane bands; oblique membranes are wider and fainter (projected through the section)."""
    shape = image.shape
    n_seeds = int(nearest.max()) + 1
    # each cell gets a membrane stain; both sides of a boundary see the darker of their two values
    cell_contrast = rng.uniform(0.32, 0.5, size=n_seeds).astype(np.float32)
    contrast = cell_contrast[nearest]
    contrast *= 1 + 0.25 * smooth_noise(shape, vs, 120.0, rng)
    gap = column_gap
    projected = (thickness / (thickness + normal_z * section)).astype(np.float32)
    sigma = thickness / 2.5
    profile = np.exp(-0.5 * (gap / sigma) ** 2)
    return image - contrast * profile * np.sqrt(projected)


def _mitochondria(image, semantic, instances, gap, vs, diameter, rng):
    """Paints mitochondria (dark ellipsoids with cristae) inside random cells; updates `semantic`."""
    shape = image.shape
    volume_um3 = np.prod(np.asarray(shape) * vs) / 1e9
    count = rng.poisson(30 * volume_um3) + 1  # mitochondria fill a few % of neuropil
    deep = np.flatnonzero(gap > 60.0)
    if len(deep) == 0:
        return image
    axes = [np.arange(n) * v for n, v in zip(shape, vs)]
    for center_flat in rng.choice(deep, size=min(count, len(deep)), replace=False):
        center = np.array(np.unravel_index(center_flat, shape)) * vs
        host = instances.flat[center_flat]
        radius_short = rng.uniform(35, 75)
        radii = np.array([rng.uniform(2.5, 6) * radius_short, radius_short, radius_short * rng.uniform(0.7, 1)])
        rotation = _random_rotation(rng)
        box = tuple(
            slice(max(0, int((c - radii[0]) // v)), min(n, int((c + radii[0]) // v) + 2))
            for c, v, n in zip(center, vs, shape)
        )
        sparse = np.meshgrid(*[a[b] - c for a, b, c in zip(axes, box, center)], indexing="ij", sparse=True)
        rel = np.stack(np.broadcast_arrays(*sparse), axis=-1)
        local = rel @ rotation.T / radii
        q = np.linalg.norm(local, axis=-1)
        inside = (q < 1) & (instances[box] == host) & (gap[box] > 20.0)
        if not inside.any() or (semantic[box][q < 1.3] == MITOCHONDRION).any():
            continue
        cristae = 0.08 * np.cos(2 * np.pi * local[..., 1] * radii[1] / 28.0 + rng.uniform(0, 6.3))
        interior = 0.4 + cristae + 0.04 * rng.standard_normal(inside.shape)
        rim = np.exp(-0.5 * ((q - 0.93) / 0.06) ** 2) * 0.25
        patch = image[box]
        patch[inside] = (interior - rim)[inside]
        semantic[box][inside] = MITOCHONDRION
    return image


def _random_rotation(rng):
    """A random rotation whose first (long) axis leans towards z, the neurite direction."""
    axis = rng.normal(size=3) * np.array([2.0, 1.0, 1.0])
    axis /= np.linalg.norm(axis)
    other = np.linalg.qr(np.column_stack([axis, rng.normal(size=(3, 2))]))[0]
    other[:, 0] = axis
    return other.T


def _acquire(image, vs, noise, blur, rng):
    """Section drift, in-plane PSF, shot and read noise; float image in ~[0, 1] -> uint8."""
    nz = image.shape[0]
    gain = (1 + 0.06 * rng.standard_normal(nz)).astype(np.float32)[:, None, None]
    offset = (0.04 * rng.standard_normal(nz)).astype(np.float32)[:, None, None]
    image = image * gain + offset
    if blur > 0:
        image = ndimage.gaussian_filter(image, sigma=(0, 0.8 * blur, 0.8 * blur))
    if noise > 0:
        dose = 100.0 / noise**2  # electrons per voxel at intensity 1
        image = rng.poisson(np.clip(image, 0, None) * dose).astype(np.float32) / dose
        image += (0.03 * noise * rng.standard_normal(image.shape)).astype(np.float32)
    return np.clip(image * 255, 0, 255).astype(np.uint8)
