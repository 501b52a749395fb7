"""jaxem.metrics: pure scoring of arrays (pixel, clustering, topology, detection, runs, cremi).

No training, prediction or segmentation here: the protocols that produce what is scored live in
`jaxem.protocols` (e.g. `jaxem.protocols.report`, the `jaxem evaluate` protocol). Import the
submodules directly, e.g. `from jaxem.metrics.clustering import clustering_scores`.
"""
