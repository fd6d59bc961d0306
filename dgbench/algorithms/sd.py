"""SD (Spectral Decoupling): cross-entropy plus an L2 penalty on the logits.

Pezeshki, Kaba, Bengio, Courville, Precup, Lajoie, "Gradient Starvation: A Learning Proclivity
in Neural Networks", NeurIPS 2021, arXiv:2011.09468 (Eq. 25). Reference: facebookresearch/DomainBed
`domainbed/algorithms.py` class `SD` and `domainbed/hparams_registry.py` (`sd_reg`), read at
commit 22002ea.

One step, as in DomainBed's `SD.update`: concatenate the per-domain minibatches, one forward,
objective = mean CE + sd_reg · mean(logits²) (mean over every logit of the pooled batch), one
Adam step. With sd_reg = 0 this is exactly ERM's step.

Choices: the backbone's auxiliary loss is added to the objective. Metrics: `loss` is the CE
part (as DomainBed), `penalty` is mean(logits²) before the weight sd_reg.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dgbench.algorithms.base import AlgorithmHParams
from dgbench.algorithms.erm import ERM
from dgbench.hparams import LogUniform, hparam
from dgbench.registry import ALGORITHMS


@dataclass(kw_only=True)
class SDHParams(AlgorithmHParams):
    """DomainBed's SD hparams: the shared ones plus the weight of the logit penalty."""

    sd_reg: float = hparam(0.1, LogUniform(-5, -1), "weight of the spectral-decoupling penalty mean(logits²)")


def sd_penalty(logits: Tensor) -> Tensor:
    """mean(logits²) over the batch and the classes (DomainBed's `(all_p ** 2).mean()`)."""
    return (logits**2).mean()


@ALGORITHMS.register("sd", SDHParams)
class SD(ERM):
    """Spectral Decoupling with DomainBed semantics: ERM's step plus sd_reg·mean(logits²)."""

    paper = (
        "Pezeshki, Kaba, Bengio, Courville, Precup, Lajoie, Gradient Starvation: A Learning Proclivity in "
        "Neural Networks, NeurIPS 2021, arXiv:2011.09468"
    )
    reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:SD"

    def logit_penalty(self, logits: Tensor) -> Tensor:
        return sd_penalty(logits)

    def penalty_weight(self) -> float:
        return float(self.cfg.sd_reg)
