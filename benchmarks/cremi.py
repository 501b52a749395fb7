"""CREMI neuron recipe: train an affinity model (unless the run exists) and score it by CREMI's protocol.

    python benchmarks/cremi.py --run runs/cremi_cpu --config cremi_affinities:cpu,synthetic
    python benchmarks/cremi.py --run runs/cremi --config cremi_affinities      # CREMI A/B/C, a GPU
    python benchmarks/cremi.py --run R --config cremi_affinities:cpu,synthetic --seeds 0 1 2

The SNEMI3D benchmark (benchmarks/snemi3d.py) with protocol "cremi": every part of the config's
dataset's `val` split (CREMI: sections 100-124 of samples A, B and C, each scored on its own and
the scores averaged; the synthetic neuropil: its held-out volume) is segmented by mutex watershed
and the affinity watershed and scored over the whole 3D volume, beside the raw-threshold baseline:
the SNEMI3D scores plus CREMI's (jaxem/metrics/cremi.py): VOI split/merge and cremi_python's
adapted Rand error with the ground truth's 25 nm border mask ignored, and the CREMI score
sqrt(ARAND x (VOI split + VOI merge)). Prints JSON with training time and the machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.snemi3d import main  # noqa: E402

if __name__ == "__main__":
    from jaxem.errors import run_script

    run_script(lambda: main(default_config="cremi_affinities:cpu,synthetic", protocol="cremi", description=__doc__))
