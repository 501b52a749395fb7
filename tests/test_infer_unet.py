"""Blockwise (gaussian blend, halo) vs one whole-volume forward pass of the real U-Net.

They cannot be equal: a deep 'same'-padded U-Net sees zero padding at tile borders where the whole
pass sees image, and GroupNorm (the U-Net default) normalises with each tile's own statistics.
The halo keeps the first effect away from the blended output, the gaussian weights downweight
what is left near tile borders; the second effect shrinks as tiles grow. Tolerances (max |error|
of the logits relative to their std over the whole volume) are measured values x ~2, see
docs/inference.md.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from jaxem.data.volume import create_volume
from jaxem.infer.device import forward_fn, predict_volume
from jaxem.infer.output import create_output
from jaxem.infer.tiling import make_tiling
from jaxem.models import build, default_config


def blockwise_error(tmp_path, norm, block, halo, blend="gaussian", shape=(96, 80)):
    """(max, mean) |blockwise - whole| / std(whole) of the U-Net logits on a smooth random image."""
    img = gaussian_filter(np.random.default_rng(0).standard_normal(shape), 2).astype(np.float32)
    img /= img.std()
    cfg = default_config("unet", 2)
    cfg.widths, cfg.groups, cfg.norm = (4, 8, 16), 2, norm  # 3 levels: sizes multiple of 4
    net = build(cfg)
    variables = net.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 1)), train=False)
    whole = np.asarray(net.apply(variables, img[None, ..., None], train=False)[0])[0, ..., 0]
    forward = forward_fn(lambda x: net.apply(variables, x, train=False)[0], activation="linear")
    name = f"{norm}_{block}_{halo}_{blend}"
    src = create_volume(tmp_path / f"in_{name}", shape, np.float32, (1.0, 1.0))
    src.write(img)
    tiling = make_tiling(shape, None, (block, block), (halo, halo), blend=blend)
    out, _ = create_output(str(tmp_path / name), (1, *shape), np.float32, (1.0, 1.0), (1, *tiling.chunk), ("c", "y", "x"), (0, 0), {}, True)
    predict_volume(forward, src, out, tiling, batch=2)
    err = np.abs(out.read()[0] - whole) / whole.std()
    return float(err.max()), float(err.mean())


@pytest.mark.parametrize("norm,block,halo,max_tol,mean_tol", [
    ("none", 32, 8, 0.5, 0.02),    # border effects only; halo 8 < receptive radius of 3 levels
    ("none", 64, 16, 0.05, 0.002),
    ("group", 64, 16, 1.0, 0.1),   # plus per-tile GroupNorm statistics
])
def test_unet_blockwise_close_to_whole_volume(tmp_path, norm, block, halo, max_tol, mean_tol):
    err_max, err_mean = blockwise_error(tmp_path, norm, block, halo)
    print(norm, block, halo, err_max, err_mean)
    assert err_max < max_tol and err_mean < mean_tol


def test_unet_error_shrinks_with_block_and_halo(tmp_path):
    small = blockwise_error(tmp_path, "group", 32, 8)
    large = blockwise_error(tmp_path, "group", 64, 16)
    assert large[0] < small[0] and large[1] < 0.5 * small[1]
