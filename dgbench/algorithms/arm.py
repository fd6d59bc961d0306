"""ARM (ARM-CML): adapt to each domain through a context averaged over an unlabeled support set.

Zhang, Marklund, Dhawan, Gupta, Levine, Finn, "Adaptive Risk Minimization: Learning to Adapt to
Domain Shift", NeurIPS 2021, arXiv:2007.02931 (the contextual meta-learner, ARM-CML).
Reference (semantics only, no code copied): facebookresearch/DomainBed `domainbed/algorithms.py`
class `ARM`, `domainbed/networks.py` classes `ContextNet` and `ResNet` (the 4-channel stem) and
`domainbed/hparams_registry.py` (ARM's batch size), read at commit 22002ea.

Model: a context network c (three 5×5 convs at full resolution, 64-64-1 channels, BatchNorm +
ReLU between them) and the backbone with its stem widened to one more input channel. For a
support set S of images, the context is the pixel-wise mean  ĉ_S = (1/|S|) Σ_{x∈S} c(x), of shape
(1, H, W); every image of S is classified as  classifier(featurizer([x; ĉ_S])).

One step, as DomainBed's `ARM` (= `ERM.update` with ARM's `predict`):

1. Pool the domain minibatches; c runs once on the pooled batch (its BatchNorm sees the pooled
   batch, as in DomainBed).
2. The support sets are the training domains: each domain's minibatch gets the mean context of
   its own images. (DomainBed cuts the pooled batch into chunks of `batch_size`, which are the
   domain minibatches since every domain contributes exactly `batch_size` images.)
3. loss = mean cross-entropy of the pooled predictions; one Adam step.

Test time (`predict`): the batch is cut into support sets of `batch_size` images when its length
is a multiple of `batch_size`, otherwise the whole batch is one support set (DomainBed's rule).
dgbench evaluates one domain split at a time in batches of `trainer.eval_batch_size` (256) images,
in the split's order (DomainBed's shuffled split order, fixed across evaluations): with the
default support size 8, every full batch is 32 support sets of 8 images of one domain, and the
last, partial batch of a split is 32 sets of 8 if its length is a multiple of 8, else one support
set of all its images. DomainBed evaluates in reshuffled batches of 64 (8 sets of 8), so the
support sets differ in membership, not in size or domain, except in the last batch. Predictions
depend on the other images of the support set: accuracy is that of this adaptation protocol, and
an eval batch size that is not a multiple of `batch_size` changes it.

Stem surgery: dgbench builds the backbone for 3-channel images, so ARM widens its first
`nn.Conv2d` (module order; it must read the 3 image channels and have groups 1, which
`backbone_need` checks before anything is built) to 4 input channels, in place (the conv's class,
e.g. timm's padding variants, is kept). The original channels keep their weights, so with a zero
context the widened stem computes the original conv. The new channel's weights are a copy of
channel 0: DomainBed's rule for its pretrained ResNet stem (input channel i ← pretrained channel
i mod 3).

Deviations from DomainBed:
- The context network is trained with the rest (one Adam over all parameters), as in the paper.
  DomainBed builds ERM's optimizer before the context network exists, so its context network
  keeps its random init (the pattern of DomainBed issue #62 for SelfReg); `train_context=false`
  reproduces that (the context network is then frozen, its BatchNorm statistics still update).
- Training support sets are the domain minibatches themselves, also when they differ in size
  (a skipped corrupt image); DomainBed's reshape assumes `batch_size` images per domain.
- Random-init backbones (small_cnn, ...) also get the channel-0 copy; DomainBed builds its small
  networks with a freshly initialised 4-channel first conv.
- On RotatedMNIST / ColoredMNIST the batch size defaults to DomainBed's 64; its search there,
  int(2^U(3, 9)), is not reproduced (dgbench's search spaces do not depend on the dataset), so
  hparams_seed keeps 64. Elsewhere 8, not searched, as DomainBed.
- The context is cast to the input dtype before concatenation (under bf16 autocast c runs in
  bf16). The backbone's auxiliary loss is added to the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.algorithms.base import Algorithm, AlgorithmHParams, BackboneNeed, DomainBatch, Metrics
from dgbench.backbones.auxiliary import auxiliary_loss
from dgbench.hparams import hparam
from dgbench.registry import ALGORITHMS

IMAGE_CHANNELS = 3
CONTEXT_WIDTH = 64  # DomainBed ContextNet: 64 channels, 5×5 kernels, "same" padding
CONTEXT_KERNEL = 5


def stem_conv(featurizer: nn.Module) -> nn.Conv2d | None:
    """The first `nn.Conv2d` in module order if it reads the image channels (groups 1); else None."""
    conv = next((m for m in featurizer.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.in_channels != IMAGE_CHANNELS or conv.groups != 1:
        return None
    return conv


def widen_stem(conv: nn.Conv2d, extra: int = 1) -> None:
    """Give `conv` `extra` more input channels, in place; new channel j copies channel j mod C."""
    old = conv.weight.detach()
    copies = [old[:, j % old.shape[1]] for j in range(extra)]
    conv.weight = nn.Parameter(torch.cat([old, torch.stack(copies, dim=1)], dim=1))
    conv.in_channels += extra


def context_network(in_channels: int = IMAGE_CHANNELS) -> nn.Sequential:
    """DomainBed's ContextNet: conv-BN-ReLU, conv-BN-ReLU, conv to one channel, sizes preserved."""
    pad = CONTEXT_KERNEL // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, CONTEXT_WIDTH, CONTEXT_KERNEL, padding=pad),
        nn.BatchNorm2d(CONTEXT_WIDTH),
        nn.ReLU(),
        nn.Conv2d(CONTEXT_WIDTH, CONTEXT_WIDTH, CONTEXT_KERNEL, padding=pad),
        nn.BatchNorm2d(CONTEXT_WIDTH),
        nn.ReLU(),
        nn.Conv2d(CONTEXT_WIDTH, 1, CONTEXT_KERNEL, padding=pad),
    )


def support_sizes(batch: int, support_size: int) -> list[int]:
    """DomainBed's test-time support sets: chunks of `support_size` if they tile the batch, else one."""
    if batch % support_size == 0:
        return [support_size] * (batch // support_size)
    return [batch]


def support_mean(context: Tensor, sizes: Sequence[int]) -> Tensor:
    """Each row replaced by the mean of its support set (consecutive runs of `sizes` rows)."""
    return torch.cat([c.mean(dim=0, keepdim=True).expand_as(c) for c in context.split(list(sizes))])


@dataclass(kw_only=True)
class ARMHParams(AlgorithmHParams):
    """DomainBed's ARM hparams: the shared ones with batch size (= support size) 8, not searched."""

    dataset_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "rotated_mnist": {"batch_size": 64},
        "colored_mnist": {"batch_size": 64},
    }

    batch_size: int = hparam(8, None, "images per training domain per step, and the test-time support size")
    train_context: bool = hparam(
        True, None, "train the context network (paper); false: DomainBed@22002ea, which never updates it"
    )


ARM_BACKBONES = BackboneNeed(
    family="a backbone whose first nn.Conv2d reads the 3 image channels (ResNet, EfficientNet, ViT, ...)",
    fits=lambda featurizer: stem_conv(featurizer) is not None,
    paper={"arch": "timm", "name": "resnet50.tv_in1k", "pretrained": True, "bn": "frozen"},
    small={"arch": "small_cnn"},
    examples=("backbone=resnet50", "backbone=resnet18", "backbone=small_cnn"),
)


@ALGORITHMS.register("arm", ARMHParams)
class ARM(Algorithm):
    """ARM-CML with DomainBed semantics; see the module docstring."""

    paper = (
        "Zhang, Marklund, Dhawan, Gupta, Levine, Finn, Adaptive Risk Minimization: Learning to Adapt "
        "to Domain Shift, NeurIPS 2021, arXiv:2007.02931"
    )
    reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:ARM"

    backbone_need = ARM_BACKBONES

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, num_domains, cfg)
        stem = stem_conv(backbone)
        assert stem is not None  # backbone_need checked it
        widen_stem(stem)
        self.context_net = context_network().to(stem.weight.device)
        if not cfg.train_context:
            self.context_net.requires_grad_(False)
        self.optimizer = self.make_optimizer([p for p in self.parameters() if p.requires_grad])

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        x = torch.cat([x for x, _ in batches])
        y = torch.cat([y for _, y in batches])
        loss = F.cross_entropy(self.adapted_logits(x, [len(x) for x, _ in batches]), y)
        self.optimizer.zero_grad(set_to_none=True)
        (loss + auxiliary_loss(self)).backward()
        self.optimizer.step()
        return {"loss": loss.detach()}

    def predict(self, x: Tensor) -> Tensor:
        return self.adapted_logits(x, support_sizes(len(x), int(self.cfg.batch_size)))

    def adapted_logits(self, x: Tensor, sizes: Sequence[int]) -> Tensor:
        """Logits of x, each image with the mean context of its support set (runs of `sizes`)."""
        context = support_mean(self.context_net(x), sizes)
        return self.classifier(self.featurizer(torch.cat([x, context.to(x.dtype)], dim=1)))
