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
