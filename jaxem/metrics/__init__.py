"""jaxem.metrics: the evaluation protocol (pixel, clustering, topology, detection, report).

Import the submodules directly, e.g. `from jaxem.metrics.clustering import clustering_scores`.
"""
