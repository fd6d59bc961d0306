"""MMD: feature alignment across training domains with a multi-bandwidth Gaussian-kernel MMD.

Li, Pan, Wang, Kot, "Domain Generalization with Adversarial Feature Learning", CVPR 2018
(MMD-AAE); DomainBed's `MMD` baseline keeps its MMD term only (no adversarial autoencoder).
Reference (semantics only; no code copied): facebookresearch/DomainBed `domainbed/algorithms.py`
classes `AbstractMMD` and `MMD` (`gaussian=True`) and `domainbed/hparams_registry.py` (read at
commit 22002ea; unchanged at b93c22a).

One step, as DomainBed's `AbstractMMD.update`:
1. one featurizer forward per training domain (not pooled);
2. nll = mean over domains of CE(classifier(f_e), y_e);
3. penalty = mean over domain pairs i < j of `mmd_penalty(f_i, f_j)`: the biased squared MMD
   with K = Σ_γ exp(−γ‖a − b‖²), γ ∈ {1e-3, 1e-2, 0.1, 1, 10, 100, 1000}, squared distances by
   expansion clamped at 1e-30 (DomainBed's `my_cdist`); 0 with one domain;
4. one Adam step on nll + `mmd_gamma`·penalty (+ the backbone's auxiliary loss, averaged over
   the per-domain forwards). No warm-up, no LR schedule.

`mmd_gamma` is DomainBed's name for the penalty weight, not a kernel bandwidth. Deviations: the
penalty is computed in fp32 with autocast off (DomainBed has no mixed precision); the metrics add
"objective" to DomainBed's "loss" (= nll) and "penalty".
"""

from __future__ import annotations

from dataclasses import dataclass

from dgbench.algorithms.penalties import mmd_penalty
from dgbench.algorithms.penalty_base import FeatureMatchingAlgorithm, FeatureMatchingHParams
from dgbench.registry import ALGORITHMS


@dataclass(kw_only=True)
class MMDHParams(FeatureMatchingHParams):
    """DomainBed's MMD hparams: the shared ones plus `mmd_gamma` (the penalty weight)."""


@ALGORITHMS.register("mmd", MMDHParams)
class MMD(FeatureMatchingAlgorithm):
    """Gaussian-kernel MMD matching with DomainBed semantics; see the module docstring."""

    paper = "Li, Pan, Wang, Kot, Domain Generalization with Adversarial Feature Learning, CVPR 2018"
    reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:MMD"

    feature_penalty = staticmethod(mmd_penalty)
