"""`wsi-pipeline view`: a run's slides, heatmaps and predictions in the browser (docs/viewer.md)."""
