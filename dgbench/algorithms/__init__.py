"""Algorithms, one file each. Importing this registers the built-in algorithms."""

from dgbench.algorithms import (
    andmask,  # noqa: F401  (registration side effect)
    arm,  # noqa: F401  (registration side effect)
    coral,  # noqa: F401  (registration side effect)
    dann,  # noqa: F401  (registration side effect)
    domaindrop,  # noqa: F401  (registration side effect)
    erm,  # noqa: F401  (registration side effect)
    fish,  # noqa: F401  (registration side effect)
    fishr,  # noqa: F401  (registration side effect)
    groupdro,  # noqa: F401  (registration side effect)
    irm,  # noqa: F401  (registration side effect)
    mixup,  # noqa: F401  (registration side effect)
    mldg,  # noqa: F401  (registration side effect)
    mmd,  # noqa: F401  (registration side effect)
    mtl,  # noqa: F401  (registration side effect)
    pego,  # noqa: F401  (registration side effect)
    rsc,  # noqa: F401  (registration side effect)
    sagnet,  # noqa: F401  (registration side effect)
    sam,  # noqa: F401  (registration side effect)
    sd,  # noqa: F401  (registration side effect)
    selfreg,  # noqa: F401  (registration side effect)
    udim,  # noqa: F401  (registration side effect)
    vrex,  # noqa: F401  (registration side effect)
)
from dgbench.algorithms.base import Algorithm, AlgorithmHParams, DomainBatch

__all__ = ["Algorithm", "AlgorithmHParams", "DomainBatch"]
