"""Backbones (featurizers). Importing this registers the built-in backbones."""
