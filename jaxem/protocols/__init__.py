"""jaxem.protocols: benchmark protocols that train, predict, segment and score (above train/infer/segment/metrics).

- `common`: the shared held-out path: predict a labelled volume with a run, read it back, the Otsu
  raw-threshold baseline, results.json, the score table, the overlay PNG, means over seeds.
- `isbi2012`: membranes, segmented and scored per z-slice (ISBI 2012).
- `neurons`: neurons in 3D from affinities (SNEMI3D; protocol="cremi" adds CREMI's scores).
- `lucchi`: mitochondria, foreground and object scores over the whole volume (Lucchi).
- `report`: the `jaxem evaluate` protocol (blockwise scores, report.json/.md, morphology).
"""
