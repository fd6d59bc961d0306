"""CORAL: Deep CORAL feature alignment across training domains.

Sun, Saenko, "Deep CORAL: Correlation Alignment for Deep Domain Adaptation", ECCV 2016 Workshops,
arXiv:1607.01719; as a domain-generalization baseline in DomainBed (Gulrajani & Lopez-Paz, ICLR
2021). Reference (semantics only; no code copied): facebookresearch/DomainBed
`domainbed/algorithms.py` classes `AbstractMMD` and `CORAL` (`gaussian=False`, kernel "mean_cov")
and `domainbed/hparams_registry.py` (read at commit 22002ea; unchanged at b93c22a).

One step, as DomainBed's `AbstractMMD.update`:
1. one featurizer forward per training domain (not pooled: BatchNorm sees each domain alone);
2. nll = mean over domains of CE(classifier(f_e), y_e);
3. penalty = mean over domain pairs i < j of `coral_penalty(f_i, f_j)` (mean squared difference
   of feature means plus of unbiased covariances); 0 with one domain;
4. one Adam step on nll + `mmd_gamma`·penalty (+ the backbone's auxiliary loss, averaged over
   the per-domain forwards). No warm-up, no LR schedule.

Deviations: the penalty is computed in fp32 with autocast off (DomainBed has no mixed precision);
the metrics add "objective" to DomainBed's "loss" (= nll) and "penalty".
"""

from __future__ import annotations

from dataclasses import dataclass

from dgbench.algorithms.penalties import coral_penalty
from dgbench.algorithms.penalty_base import FeatureMatchingAlgorithm, FeatureMatchingHParams
from dgbench.registry import ALGORITHMS


@dataclass(kw_only=True)
class CORALHParams(FeatureMatchingHParams):
    """DomainBed's CORAL hparams: the shared ones plus `mmd_gamma` (the penalty weight)."""


@ALGORITHMS.register("coral", CORALHParams)
class CORAL(FeatureMatchingAlgorithm):
    """Deep CORAL with DomainBed semantics; see the module docstring."""

    paper = (
        "Sun, Saenko, Deep CORAL: Correlation Alignment for Deep Domain Adaptation, ECCV Workshops 2016, "
        "arXiv:1607.01719"
    )
    reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:CORAL"

    feature_penalty = staticmethod(coral_penalty)
