"""Datasets, splits, transforms and loaders (registration happens in `dgbench.components`)."""
