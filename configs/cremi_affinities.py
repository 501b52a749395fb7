"""CREMI neurons in 3D: the SNEMI3D affinity recipe adjusted to CREMI's 40x4x4 nm sections.

CREMI (adult Drosophila brain, ssTEM, samples A, B, C of 125 x 1250 x 1250 voxels at 40 x 4 x 4
nm): the sections are 10x thicker than the pixels (SNEMI3D: 5x), so the U-Net convolves and pools
in-plane only for three levels instead of two ((1,3,3) kernels, (1,2,2) pooling: 40x4x4 ->
40x8x8 -> 40x16x16 -> 40x32x32 nm, then 3D), the rule nnU-Net uses (pool an axis while its
voxel is under half the coarsest one). Everything else (SNEMI3D's 12 long-range affinities after
Wolf et al. 2018, not tuned for CREMI; residual blocks, group norm, losses, augmentation with section
defects, schedule) is configs/snemi3d_affinities.py.

    jaxem data download cremi
    python benchmarks/cremi.py --run runs/cremi --config cremi_affinities   # CREMI score on z 100-124 of A, B, C

Arguments (comma-separated): cpu (a small net that trains on a 2-core CPU); synthetic (the
embedded synthetic neuropil, itself 40x4x4 nm: no download); tiny (seconds, for tests).
"""

from jaxem.config import config_args, load_config

ARGS = ("cpu", "synthetic", "tiny")


def get_config(arg: str = ""):
    options = config_args(arg, ARGS, "cremi_affinities")
    config = load_config("snemi3d_affinities:" + ",".join(sorted(options)))
    config.unlock()
    config.data.dataset = "synthetic" if "synthetic" in options else "cremi"
    if "tiny" in options:  # two levels only: SNEMI3D's tiny net already pools in-plane first
        return config
    if "cpu" in options:  # widths 8-64 in four levels, all pooling in-plane
        config.model.kernel_sizes = ((1, 3, 3), (1, 3, 3), (1, 3, 3), (3, 3, 3))
        config.model.pool_factors = ((1, 2, 2), (1, 2, 2), (1, 2, 2))
    else:  # five levels: three in-plane, then 3D
        config.model.kernel_sizes = ((1, 3, 3), (1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3))
        config.model.pool_factors = ((1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2))
    return config
