"""Backbones (featurizers). Importing this registers the built-in backbones."""

from dgbench.backbones import efficientnet_lite0, moe, small_cnn, timm_backbone  # noqa: F401  (registration)
from dgbench.backbones.base import BackboneConfig, BNPolicy, Featurizer, build_backbone
from dgbench.backbones.weights import load_weights

__all__ = ["BNPolicy", "BackboneConfig", "Featurizer", "build_backbone", "load_weights"]
