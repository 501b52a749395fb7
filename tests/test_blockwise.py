"""Blockwise prediction equals a whole-volume forward pass; resume; TTA; ensembles; flat memory."""

import itertools
import math
import json
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxem.data.volume import create_volume, open_volume
from jaxem.infer.device import (block_geometry, block_inputs, chunks_per_block, ensemble_forward, forward_fn, make_block_fn,
                                predict_block, predict_blocks, predict_volume, tta_forward)
from jaxem.infer.ensemble import transform, tta_transforms
from jaxem.infer.output import DoneLog, create_output
from jaxem.infer.tiling import make_tiling


class SmallNet(nn.Module):
    """Two 3-wide convs: receptive radius 2 (<= halo in the tests); (logits, aux) as every jaxem model."""

    kernel: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        k = (self.kernel,) * (x.ndim - 2)
        return nn.Conv(2, k)(nn.relu(nn.Conv(4, k)(x))), {}


def setup(tmp_path, vol, net=SmallNet(), ndim=None, voxel=None, seed=0, normalize=None):
    """The input volume, the net's tile forward (`device.forward_fn`) and `whole(v)`: the net's
    sigmoid on the whole volume v at once, (2, *v.shape) (normalised by the forward)."""
    ndim = ndim or vol.ndim
    variables = net.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + (8,) * ndim + (1,)))
    src = create_volume(tmp_path / f"in{seed}", vol.shape, vol.dtype, voxel or (1.0,) * vol.ndim)
    src.write(vol)
    forward = forward_fn(lambda x: net.apply(variables, x)[0], model_ndim=ndim, normalize=normalize)
    whole = lambda v: np.moveaxis(np.asarray(forward(np.asarray(v)[None, ..., None]))[0], -1, 0)  # noqa: E731
    return src, forward, whole


def run(tmp_path, src, forward, tiling, name="out", dtype=np.float32, **kw):
    axes = ("c",) + ("z", "y", "x")[-tiling.ndim:]
    out, _ = create_output(str(tmp_path / name), (2, *tiling.roi_shape), dtype, (1.0,) * tiling.ndim,
                           (2, *tiling.chunk), axes, [r[0] for r in tiling.roi], {"t": name}, True)
    stats = predict_volume(forward, src, out, tiling, 2, dtype, **kw)
    return out, stats


@pytest.mark.parametrize("shape,block,halo,roi,strides", [
    ((21, 37, 30), (8, 16, 16), (2, 4, 4), None, 2),
    ((21, 37, 30), (8, 16, 16), (2, 4, 4), ((3, 20), (5, 36), (0, 17)), 2),
    ((45, 70), (16, 16), (3, 3), None, 2),
    ((45, 70), (16, 16), (3, 3), None, 3),  # chunks larger than the block
])
def test_center_blend_equals_whole_volume_forward(tmp_path, shape, block, halo, roi, strides):
    vol = np.random.default_rng(0).random(shape).astype(np.float32)
    src, fn, whole = setup(tmp_path, vol)
    chunk = tuple(strides * (b - 2 * h) for b, h in zip(block, halo))
    tiling = make_tiling(shape, roi, block, halo, chunk=chunk, blend="center")
    out, stats = run(tmp_path, src, fn, tiling)
    ref = whole(vol)
    if roi:
        ref = ref[(slice(None),) + tuple(slice(a, b) for a, b in roi)]
    np.testing.assert_allclose(out.read(), ref, atol=1e-5)
    assert stats["chunks"] == len(tiling.chunks()) > 1


def test_2d_model_runs_slice_by_slice_on_3d_volume(tmp_path):
    vol = np.random.default_rng(1).random((5, 30, 27)).astype(np.float32)
    src, fn, whole = setup(tmp_path, vol, ndim=2)
    tiling = make_tiling(vol.shape, None, (1, 16, 16), (0, 3, 3), blend="center")
    out, _ = run(tmp_path, src, fn, tiling)
    ref = np.stack([whole(s) for s in vol], axis=1)
    np.testing.assert_allclose(out.read(), ref, atol=1e-5)


def test_gaussian_blend_is_exact_for_a_pointwise_model_and_smooth_for_convs(tmp_path):
    vol = np.random.default_rng(2).random((40, 50)).astype(np.float32)
    src, fn, whole = setup(tmp_path, vol, net=SmallNet(kernel=1))
    tiling = make_tiling(vol.shape, None, (16, 16), (4, 4), blend="gaussian")
    out, stats = run(tmp_path, src, fn, tiling)
    np.testing.assert_allclose(out.read(), whole(vol), atol=1e-5)
    assert stats["tiles_predicted"] == len(tiling.tile_starts(0)) * len(tiling.tile_starts(1))  # each tile once


def test_blocks_devices_and_batches_do_not_change_the_values(tmp_path):
    """One block of the whole volume, blocks of one chunk spread round-robin over 4 devices, one or
    3 tiles per forward: the same values to float32 rounding (each tile's sum is taken in the same
    order, but windows of other shapes compile to other programs, whose fused multiply-adds may
    round differently: 1 ulp seen in CI), and each tile runs once per block that it touches
    (`recompute_factor`)."""
    vol = np.random.default_rng(7).random((21, 37, 30)).astype(np.float32)
    src, forward, _ = setup(tmp_path, vol)
    tiling = make_tiling(vol.shape, None, (8, 16, 16), (2, 4, 4), chunk=(4, 8, 8), blend="gaussian")
    one, stats = run(tmp_path, src, forward, tiling, name="one")
    assert stats["blocks"] == 1 and stats["recompute_factor"] == 1.0 and stats["chunks"] == len(tiling.chunks())
    out, _ = create_output(str(tmp_path / "small"), (2, *tiling.roi_shape), np.float32, (1.0,) * 3, (2, *tiling.chunk),
                           ("c", "z", "y", "x"), (0, 0, 0), {}, True)
    assert len(jax.local_devices()) == 4
    small = predict_blocks(make_block_fn(forward, tiling.block, 3), src, out, tiling, (1, 1, 1))
    assert small["blocks"] == len(tiling.chunks()) and small["recompute_factor"] > 2
    np.testing.assert_allclose(out.read(), one.read(), rtol=0, atol=1e-6)
    assert DoneLog(out.path).done() == set(tiling.chunks())


def test_rims_carried_along_axis_0_give_the_values_of_one_block_and_run_each_tile_once_there(tmp_path):
    """Blocks of 2 chunks along z (each a tile long) hand their accumulator rim to the next block:
    the values of one whole-volume block (to float32 rounding: another window shape is another
    compiled program), the z-border tiles run once (fewer tiles than without the carry, where each
    ran in both blocks), the same bytes on 1 or 4 devices; a resumed run, whose blocks after done
    ones recompute only the previous block's rim, gives the same bytes as the uninterrupted one."""
    from jaxem.infer import device

    vol = np.random.default_rng(11).random((29, 37, 30)).astype(np.float32)
    src, forward, _ = setup(tmp_path, vol)
    tiling = make_tiling(vol.shape, None, (8, 16, 16), (2, 4, 4), chunk=(4, 8, 8), blend="gaussian")
    one, _ = run(tmp_path, src, forward, tiling, name="one")
    per = (2, tiling.grid()[1], tiling.grid()[2])  # z slabs of 8 voxels = one tile
    assert device.carries(tiling, per) and not device.carries(tiling, (1, *per[1:]))
    fn = make_block_fn(forward, tiling.block, 3)
    slabs = []
    for devices in (jax.local_devices()[:1], jax.local_devices()):
        out, _ = create_output(str(tmp_path / f"slabs{len(devices)}"), (2, *vol.shape), np.float32, (1.0,) * 3,
                               (2, *tiling.chunk), ("c", "z", "y", "x"), (0, 0, 0), {}, True)
        stats = predict_blocks(fn, src, out, tiling, per, devices=devices)
        assert stats["carried"] and stats["recompute_factor"] == 1.0 and stats["blocks"] == -(-tiling.grid()[0] // 2)
        slabs.append(out.read())
        np.testing.assert_allclose(slabs[-1], one.read(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(slabs[1], slabs[0])
    g = tiling.grid()[0]  # without the carry, a tile touching two slabs would run in both
    uncarried = sum(len(tiling.tiles_touching(0, lo, min(lo + 2, g))) for lo in range(0, g, 2))
    assert uncarried > len(tiling.tile_starts(0)) == stats["tiles_predicted"] // math.prod(map(len, map(tiling.tile_starts, (1, 2))))
    resumed, _ = create_output(str(tmp_path / "resumed"), (2, *vol.shape), np.float32, (1.0,) * 3, (2, *tiling.chunk),
                               ("c", "z", "y", "x"), (0, 0, 0), {}, True)
    odd = lambda rank, blocks: rank % 2 == 1  # noqa: E731  (every other slab: each needs a rim it did not make)
    first = predict_blocks(fn, src, resumed, tiling, per, block_filter=odd)
    assert first["tiles_predicted"] > tiling.tile_count() * first["blocks"] / stats["blocks"]  # the rims rerun
    predict_blocks(fn, src, resumed, tiling, per)
    np.testing.assert_array_equal(resumed.read(), slabs[0])


def test_raw_uint8_normalised_on_the_device_equals_host_normalisation(tmp_path):
    """A uint8 volume is read in its dtype and normalised in the jitted window: the same as a
    float32 volume normalised on the host, and the window's input really is uint8."""
    vol = (np.random.default_rng(8).random((21, 37, 30)) * 255).astype(np.uint8)
    stats = (117.5, 41.0)
    src8, forward8, whole = setup(tmp_path, vol, normalize=stats)
    src32, forward32, _ = setup(tmp_path / "f32", ((vol - stats[0]) / stats[1]).astype(np.float32))
    tiling = make_tiling(vol.shape, None, (8, 16, 16), (2, 4, 4), blend="center")
    geometry = block_geometry(tiling, (0, 0, 0), tiling.grid())
    assert block_inputs(src8, geometry, (tuple(vol.shape), len(geometry.tiles), tiling.roi_shape))[0].dtype == np.uint8
    device, _ = run(tmp_path, src8, forward8, tiling, name="device")
    host, _ = run(tmp_path, src32, forward32, tiling, name="host")
    np.testing.assert_allclose(device.read(), host.read(), atol=1e-6)
    np.testing.assert_allclose(device.read(), whole(vol), atol=1e-5)  # center blend, radius 2 <= halo


def test_a_failing_block_raises_and_a_rerun_completes_the_same_output(tmp_path):
    """An error in a block's window reaches the caller; chunks already recorded done are intact,
    so a rerun finishes the volume exactly as an uninterrupted run."""
    vol = np.random.default_rng(9).random((21, 37, 30)).astype(np.float32)
    src, forward, _ = setup(tmp_path, vol)
    tiling = make_tiling(vol.shape, None, (8, 16, 16), (2, 4, 4), chunk=(4, 8, 8), blend="gaussian")
    block_fn, calls = make_block_fn(forward, tiling.block, 2), []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("device lost in block 6")
        return block_fn(*args, **kw)

    full, _ = create_output(str(tmp_path / "full"), (2, *vol.shape), np.float32, (1.0,) * 3, (2, *tiling.chunk),
                            ("c", "z", "y", "x"), (0, 0, 0), {}, True)
    predict_blocks(block_fn, src, full, tiling, (2, 2, 2))
    broken, _ = create_output(str(tmp_path / "broken"), (2, *vol.shape), np.float32, (1.0,) * 3, (2, *tiling.chunk),
                              ("c", "z", "y", "x"), (0, 0, 0), {}, True)
    with pytest.raises(RuntimeError, match="block 6"):
        predict_blocks(failing, src, broken, tiling, (2, 2, 2))
    broken = open_volume(str(tmp_path / "broken"), "r+")  # the rerun goes on in the same output
    done = DoneLog(broken.path).done()
    assert 0 < len(done) < len(tiling.chunks())
    stats = predict_blocks(block_fn, src, broken, tiling, (2, 2, 2))
    assert stats["chunks"] == len(tiling.chunks()) - len(done)
    np.testing.assert_array_equal(broken.read(), full.read())


def test_resume_skips_done_chunks_and_matches_uninterrupted_run(tmp_path):
    """A process's share of the blocks (`block_filter`), then a rerun of everything: the same bytes
    as one run, every chunk marked done, and a third run has nothing to do."""
    vol = np.random.default_rng(3).random((30, 40)).astype(np.float32)
    src, forward, _ = setup(tmp_path, vol)
    tiling = make_tiling(vol.shape, None, (12, 12), (2, 2), chunk=(8, 8), blend="linear")
    full, _ = run(tmp_path, src, forward, tiling, name="full", budget=0)  # the resumed run's block shapes
    mine = lambda rank, blocks: rank < blocks // 2  # noqa: E731
    out, first = run(tmp_path, src, forward, tiling, name="part", budget=0, block_filter=mine)
    assert first["chunks_per_block"] == [1, 1] and len(DoneLog(out.path).done()) == first["chunks"] == len(tiling.chunks()) // 2
    second = predict_volume(forward, src, out, tiling, 2, budget=0)
    assert second["chunks"] == len(tiling.chunks()) - first["chunks"]
    np.testing.assert_array_equal(out.read(), full.read())
    assert predict_volume(forward, src, out, tiling, 2)["chunks"] == 0


def test_tta_inverts_transforms_and_ensembles_reduce():
    x = jnp.asarray(np.random.default_rng(4).random((2, 6, 6, 1)).astype(np.float32))
    identity = lambda a: jnp.concatenate([a, 1 - a], -1)  # noqa: E731
    np.testing.assert_allclose(tta_forward(identity, (6, 6))(x), identity(x), atol=1e-6)
    assert len(tta_transforms((6, 6))) == 8 and len(tta_transforms((4, 6, 6))) == 16 and len(tta_transforms((4, 6))) == 4
    shift = lambda a: jnp.roll(a, 1, axis=1)  # noqa: E731  (not equivariant: TTA averages differing outputs)
    assert not np.allclose(tta_forward(shift, (6, 6))(x), shift(x))
    fns = [lambda a, v=v: jnp.full(a.shape, v, jnp.float32) for v in (0.2, 0.6, 0.9)]
    assert np.allclose(ensemble_forward(fns, "mean")(x), (0.2 + 0.6 + 0.9) / 3)
    assert np.allclose(ensemble_forward(fns, "median")(x), 0.6)
    assert np.allclose(ensemble_forward(fns, "majority")(x), 1.0)


RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, numpy as np, jax, jax.numpy as jnp
    sys.path.insert(0, {root!r})
    from jaxem.data.volume import create_volume
    from jaxem.infer.device import make_block_fn, predict_blocks
    from jaxem.infer.output import create_output
    from jaxem.infer.tiling import make_tiling
    shape = tuple(json.loads(sys.argv[1])); path = sys.argv[2]
    src = create_volume(path + "/in", shape, np.float32, (1.0, 1.0, 1.0), chunks=(12, 64, 64))
    for z0 in range(0, shape[0], 12):
        src.write(np.random.default_rng(z0).random((12, *shape[1:])).astype(np.float32), (z0, 0, 0))
    t = make_tiling(src.shape, None, (16, 32, 32), (2, 4, 4), chunk=(12, 24, 24), blend="gaussian")
    out, _ = create_output(path + "/out", (8, *src.shape), np.float16, (1.0,) * 3, (8, *t.chunk), ("c", "z", "y", "x"), (0, 0, 0), {{}}, True)
    block_fn = make_block_fn(lambda x: jnp.concatenate([x.astype(jnp.float32)] * 8, -1), t.block, 2, np.float16)
    stats = predict_blocks(block_fn, src, out, t, (1, 1, 1))  # blocks of one chunk: interior ones in the smallest volume
    print(json.dumps([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, stats]))
""")


def test_peak_memory_is_flat_as_the_volume_grows_in_z_and_in_y_x(tmp_path):
    """4x the voxels along z or along y and x: the same peak RSS (within 10 %): blocks of one
    chunk (8 output channels), padded to one shape, so the device's working set is the largest
    block's, which the smallest volume already has; reads run ahead and writes behind by a
    bounded number of blocks; blocks go round-robin over the process's 4 (CPU) devices."""
    import jaxem

    root = str(__import__("pathlib").Path(jaxem.__file__).parents[1])
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT.format(root=root))
    peak = {}

    def measure(shape, attempt):
        res = subprocess.run([sys.executable, str(script), json.dumps(shape),
                              str(tmp_path / f"{attempt}_{'x'.join(map(str, shape))}")],
                             capture_output=True, text=True, check=True)
        rss, stats = json.loads(res.stdout.strip().splitlines()[-1])
        assert stats["chunks"] == stats["blocks"] > 1
        peak[shape] = min(rss, peak.get(shape, rss))

    base, shapes = (48, 96, 96), ((48, 96, 96), (192, 96, 96), (48, 192, 192))  # input 1.7 -> 6.8 MiB, 8 channels out
    for shape in shapes:
        measure(shape, 0)
    for attempt in (1, 2):  # subprocess RSS varies by ~10 % on a loaded host: the least of up to 3 runs
        if all(peak[s] <= 1.10 * peak[base] for s in shapes):  # (a leak shows in every run)
            break
        for shape in shapes:
            measure(shape, attempt)
    for shape in peak:
        assert peak[shape] <= 1.10 * peak[base], peak


def test_block_size_from_a_byte_budget():
    """`chunks_per_block`: the whole grid when it fits; else the axis longest in voxels is halved
    until the block's window (raw region + float32 accumulator + output) fits; at least
    `min_blocks` blocks; never below one chunk."""
    from jaxem.infer.device import block_bytes

    t = make_tiling((64, 256, 256), None, (16, 32, 32), (2, 4, 4), (12, 24, 24), blend="gaussian")  # grid (6, 11, 11)
    sizes = dict(channels_in=1, in_itemsize=1, channels_out=2, out_itemsize=2)
    assert chunks_per_block(t, 1 << 40, **sizes) == t.grid()
    for budget in (32 << 20, 8 << 20, 2 << 20):  # the whole grid takes 57 MiB
        per = chunks_per_block(t, budget, **sizes)
        assert block_bytes(t, per, **sizes) <= budget and per != t.grid(), (budget, per)
    assert chunks_per_block(t, 0, **sizes) == (1, 1, 1)
    assert np.prod([-(-g // m) for g, m in zip(t.grid(), chunks_per_block(t, 1 << 40, min_blocks=2, **sizes))]) >= 2
    whole = block_bytes(t, t.grid(), **sizes)
    assert whole == (64 + 32) * (256 + 64) ** 2 + 64 * 256 * 256 * (4 * 2 + 2 * 2)  # region, accumulator, output


class _Device:
    def __init__(self, platform, stats):
        self.platform, self._stats = platform, stats

    def memory_stats(self):
        if isinstance(self._stats, Exception):
            raise self._stats
        return self._stats


def test_auto_block_budget_is_a_share_of_the_accelerators_memory():
    """predict.block_gib=0: 1/8 of what a GPU reports, within [1 GiB, 16 GiB]; 1 GiB on a CPU or
    without memory statistics; a negative budget is refused by name."""
    from jaxem.infer.device import auto_block_bytes
    from jaxem.infer.job import block_budget
    from ml_collections import ConfigDict

    gib = 1 << 30
    assert auto_block_bytes(_Device("gpu", {"bytes_limit": 60 * gib})) == 60 * gib // 8
    assert auto_block_bytes(_Device("gpu", {"bytes_limit": 500 * gib})) == 16 * gib
    assert auto_block_bytes(_Device("gpu", {"bytes_limit": 4 * gib})) == gib
    for device in (_Device("gpu", None), _Device("tpu", {}), _Device("gpu", RuntimeError("no stats")),
                   _Device("cpu", {"bytes_limit": 500 * gib})):
        assert auto_block_bytes(device) == gib
    assert auto_block_bytes() == gib  # this machine's CPU
    assert block_budget(ConfigDict({"block_gib": 0.0})) == gib and block_budget(ConfigDict({"block_gib": 0.5})) == gib // 2
    with pytest.raises(ValueError, match=r"predict.block_gib=-1.0 must be >= 0"):
        block_budget(ConfigDict({"block_gib": -1.0}))


@pytest.mark.parametrize("blend", ["gaussian", "linear", "center"])
@pytest.mark.parametrize("shape,roi", [((21, 37, 30), None), ((21, 37, 30), ((3, 20), (5, 36), (0, 17))),
                                       ((45, 70), ((4, 40), (9, 70)))])
def test_tile_shares_are_weights_over_their_sum_and_add_up_to_one(blend, shape, roi):
    """Each tile's share is its weight over the sum of every tile's weight at the voxel, computed
    here the long way on the whole volume; over the ROI the shares add up to exactly 1."""
    tiling = make_tiling(shape, roi, (8, 16, 16)[-len(shape):], (2, 4, 4)[-len(shape):], blend=blend)
    total, shares = np.zeros(shape), np.zeros(shape)
    tiles = list(itertools.product(*(tiling.tile_starts(a) for a in range(len(shape)))))
    for t in tiles:
        total[tiling.tile_box(t)] += tiling.weight(t)
    for t in tiles:
        box = tiling.tile_box(t)
        share = tiling.share(t)
        inside = total[box] > 0
        np.testing.assert_allclose(share[inside], (tiling.weight(t) / np.where(inside, total[box], 1))[inside], rtol=1e-5)
        shares[box] += share
    in_roi = tuple(slice(a, b) for a, b in tiling.roi)
    np.testing.assert_allclose(shares[in_roi], 1.0, rtol=1e-5)




@pytest.mark.parametrize("block,halo,chunk,message", [
    ((8, 16, 16), (2, 4, 4), (4, 8), "chunk_shape (4, 8) must have one value per volume axis"),
    ((8, 16, 16), (2, 4, 4), (4, 8, 9), "multiple of the tile stride"),
    ((8, 16), (2, 4), None, "one value per volume axis"),
    ((8, 16, 16), (4, 4, 4), None, "less than half"),
])
def test_bad_tiling_settings_are_clear_errors(block, halo, chunk, message):
    from jaxem.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        make_tiling((16, 64, 64), None, block, halo, chunk)



def test_a_halo_too_large_for_an_axis_one_tile_spans_is_dropped(tmp_path):
    """A short stack (6 sections) under a tile of 8 with halo 4: the tile spans z whole, so its z
    halo is 0 (nothing to overlap) instead of a refusal; the other axes keep theirs, and the
    prediction equals the whole-volume forward."""
    vol = (np.random.default_rng(3).random((6, 37, 30)) * 255).astype(np.uint8)
    src, forward, whole = setup(tmp_path, vol, normalize=(117.5, 41.0), seed=0)
    tiling = make_tiling(vol.shape, None, (8, 16, 16), (4, 4, 4), blend="center")
    assert tiling.block == (6, 16, 16) and tiling.halo == (0, 4, 4) and tiling.stride == (6, 8, 8)
    g = block_geometry(tiling, (0, 0, 0), tiling.grid())
    got = predict_block(make_block_fn(forward, tiling.block, 3, np.float32), src, g)
    np.testing.assert_allclose(got, whole(vol)[(slice(None),) + g.out_box], atol=1e-5)


@pytest.mark.parametrize("shape,block,halo,roi,dtype,wrap", [
    ((21, 37, 30), (8, 16, 16), (2, 4, 4), None, np.float32, None),
    ((21, 37, 30), (8, 16, 16), (2, 4, 4), ((3, 20), (5, 36), (0, 17)), np.uint8, None),
    ((45, 70), (16, 16), (3, 3), None, np.float32, None),
    ((45, 70), (16, 16), (3, 3), None, np.float32, "tta"),
    ((45, 70), (16, 16), (3, 3), None, np.float32, "median"),
])
def test_device_blocks_equal_a_whole_volume_forward(tmp_path, shape, block, halo, roi, dtype, wrap):
    """Blocks of chunks at every corner of 2D and 3D volumes (and of an ROI), from raw uint8
    normalised on the device, with center blending (exact: receptive radius 2 <= halo): equal the
    whole-volume forward (TTA: averaged over the block's flips and turns, each on the whole volume;
    an ensemble of 2 nets: their median) within 1e-5, or 1 level in uint8 (rint(255 p))."""
    vol = (np.random.default_rng(9).random(shape) * 255).astype(np.uint8)
    stats = (117.5, 41.0)
    (src, first, whole), (_, second, whole2) = (setup(tmp_path, vol, normalize=stats, seed=s) for s in (0, 1))
    chunk = tuple(2 * (b - 2 * h) for b, h in zip(block, halo))
    tiling = make_tiling(vol.shape, roi, block, halo, chunk, blend="center")
    assert min(tiling.grid()) >= 2
    if wrap == "tta":
        forward = tta_forward(first, tiling.block)
        ts = tta_transforms(tiling.block)
        expected = sum(np.moveaxis(transform(np, np.moveaxis(whole(transform(np, vol[None, ..., None], t)[0, ..., 0]),
                                                             0, -1)[None], t, inverse=True)[0], -1, 0) for t in ts) / len(ts)
    elif wrap == "median":
        forward, expected = ensemble_forward([first, second], "median"), np.median([whole(vol), whole2(vol)], 0)
    else:
        forward, expected = first, whole(vol)
    if roi:
        expected = expected[(slice(None),) + tuple(slice(a, b) for a, b in roi)]
    fn = make_block_fn(forward, tiling.block, 3, dtype)
    halves = [((0, max(n // 2, 1)), (max(n // 2, 1), n)) for n in tiling.grid()]  # blocks of chunks
    for corner in itertools.product(*halves):
        lo, hi = zip(*corner)
        g = block_geometry(tiling, lo, hi)
        got = predict_block(fn, src, g)
        assert got.dtype == np.dtype(dtype)
        want = expected[(slice(None),) + g.out_box]
        if dtype == np.uint8:
            assert np.abs(got.astype(int) - np.rint(want * 255).astype(int)).max() <= 1
        else:
            np.testing.assert_allclose(got, want, atol=1e-5)
