"""Taking a trained model elsewhere: model bundles (`export-model`, read by `predict`) and feature interop."""
