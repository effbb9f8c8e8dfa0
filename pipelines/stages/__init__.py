"""The stages of a run, one module each (tissue, tiles, features, distill, qc, mil, results, heatmaps, predict), and
:mod:`pipelines.stages.table`, the stage table handed to the engine. Stage functions are plain functions of
(slide entry or entries, config, run paths): they know nothing of Dask, state files or fingerprints."""
