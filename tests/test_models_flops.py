"""FLOPs from XLA's cost analysis agree with a hand count of multiply-adds."""

import pytest

from jaxem import models
from jaxem.models import flops


def test_unet_flops_per_voxel_matches_mac_count():
    cfg = models.default_config("unet", 2)
    a, b = 16, 32
    cfg.update(widths=(a, b), norm="none")
    cost = flops.model_cost(cfg, (64, 64))
    macs_fine = 9 * a + 9 * a * a + 18 * a * a + 9 * a * a + b * a + a  # enc, dec, transposed conv, head
    macs_coarse = (9 * a * b + 9 * b * b) / 4                            # quarter of the voxels
    expected = 2 * (macs_fine + macs_coarse)
    # XLA skips taps on zero padding (fewer) and counts bias/ReLU/concat ops (more): within 10%.
    assert cost["flops_per_voxel"] == pytest.approx(expected, rel=0.1)
    assert cost["params"] == sum(w for w in [9 * a + a, 9 * a * a + a, 9 * a * b + b, 9 * b * b + b,
                                             4 * b * a + a, 18 * a * a + a, 9 * a * a + a, a + 1])


def test_markdown_table_row():
    cfg, spatial = flops.preset("unet2d_demo")
    params = flops.model_cost(cfg, spatial)["params"]
    table = flops.markdown_table(["unet2d_demo"])
    assert f"| unet2d_demo | unet 2D | 256x256 | {params:,} |" in table


def test_matmul_flops_counts_training_convs_exactly():
    """The jaxpr count of a U-Net: forward MACs by hand (taps on 'SAME' padding left out), and a
    training step's convolutions and matmuls = 3x the forward (input and kernel gradients)."""
    import jax
    import jax.numpy as jnp

    cfg = models.default_config("unet", 3)
    a, b, s = 4, 8, 8
    cfg.update(widths=(a, b), norm="none")
    model = models.build(cfg, conv_form="xla")
    x = jnp.ones((2, s, s, s, 1))
    variables = model.init(jax.random.key(0), x, train=False)

    def forward(v, x):
        return model.apply(v, x, train=False)[0]

    def valid_taps(n):  # (output, tap) pairs of a 3-wide 'SAME' kernel that meet the n real inputs
        return 3 * n - 2

    fine, coarse = valid_taps(s) ** 3, valid_taps(s // 2) ** 3  # per batch item and channel pair
    macs = (fine * (1 * a + a * a + 2 * a * a + a * a)                # encoder level 0, decoder level 0
            + coarse * (a * b + b * b)                                 # bottom level
            + (s // 2) ** 3 * 8 * b * a + s ** 3 * a * 1)              # 2x2x2 up-conv, 1x1x1 head
    assert flops.matmul_flops(forward, variables, x) == 2 * 2 * macs

    def loss(v, x):
        return jnp.sum(forward(v, x))
    grads = jax.grad(loss, argnums=(0, 1))
    assert flops.matmul_flops(grads, variables, x) == 3 * flops.matmul_flops(forward, variables, x)
