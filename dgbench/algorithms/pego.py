"""PEGO: Parameter-Efficient Group with Orthogonal regularisation.

Hu, Zhang, Qi, Huang, Wang, Gao, "Learn to Preserve and Diversify: Parameter-Efficient Group with
Orthogonal Regularization for Domain Generalization", ECCV 2024, arXiv:2407.15085. Reference code
(semantics only; no code copied): JudgingH/PEGO, commit fb8700b, `domainbed/algorithms/algorithms.py`
class `PEGO`, `domainbed/networks/lora.py` (`_LoRA_qkv_timm`, `LoRA_ViT_timm`), `run.sh`.

Model: a frozen pretrained ViT (CLIP ViT-B/16 image tower, projected 512-d CLS feature) with a
group of N LoRA adapters of rank r on the q and v slices of every block's fused qkv projection
(`dgbench.backbones.lora`), then the trainable linear head. Only the adapters and the head train.

One step (x, y = the pooled domain minibatches):
1. ce = CE(head(f(x)), y)
2. L_o = Σ_blocks Σ_{t∈{q,v}} [ Σ_i ‖W_t ΔWᵗᵢᵀ‖₁  (preserve: adapters ⟂ pretrained rows)
                              + Σ_{i<j} ‖ΔWᵗᵢ ΔWᵗⱼᵀ‖₁ ]  (diversify: adapters ⟂ each other)
   with ΔWᵗᵢ = Bᵗᵢ Aᵗᵢ and ‖·‖₁ the entrywise L1 (reference/algorithms.md §7.2)
3. loss = ce + λ·L_o (+ the backbone's auxiliary loss, zero for a plain ViT); one Adam step over
   the adapters and the head (lr 5e-4, no weight decay, no schedule).

Logged: "loss" = ce (comparable with ERM), "ortho_loss" = λ·L_o (what is added to ce), and the two
parts of L_o before λ: "ortho_preserve" and "ortho_diversify".

Deviations from the reference:
- fp32 master weights. The reference casts every Linear weight of CLIP (adapters and head included)
  to fp16, steps Adam on fp32 copies and casts back, so its weights never hold more than fp16
  precision. dgbench keeps fp32 parameters; on CUDA the trainer's bf16 autocast covers the
  forward, and the regulariser is always computed in fp32 (autocast off).
- Backbone: timm `vit_base_patch16_clip_quickgelu_224.openai` with `projection=true` (the CLIP
  projection kept as the frozen head, 512-d output) instead of OpenAI's `clip` package. It loads
  the same weights as `vit_base_patch16_clip_224.openai`, whose timm definition uses exact GELU
  although the weights were trained with QuickGELU; the quickgelu variant is the faithful one.
- Input normalisation: the model's own (CLIP mean/std, from timm's pretrained config), as every
  dgbench algorithm on that backbone uses, so PEGO and ERM see identical inputs. The reference
  normalises with ImageNet mean/std (its DomainBed transforms), which CLIP was not trained with.
- Search space: the reference defines none. Here N and r stay fixed (they set the parameter
  budget, which the paper compares at), λ ~ 10^U(−4, −2) (a decade either side of the 1e-3 of
  `run.sh`), lr ~ 10^U(−4, −3) (around 5e-4; LoRA needs larger steps than DomainBed's full
  fine-tuning range), weight decay fixed at 0 as in the reference; batch size and head dropout
  are searched as in DomainBed.
- Evaluation runs on a merged weight per block (`merge_for_eval`), the same function as the
  unmerged adapters up to float rounding, at the cost of the plain ViT.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dgbench.algorithms.base import Algorithm, AlgorithmHParams, BackboneNeed, DomainBatch, Metrics
from dgbench.backbones.auxiliary import auxiliary_loss
from dgbench.backbones.lora import add_lora_group, is_vit_with_fused_qkv, orthogonality_terms
from dgbench.hparams import LogUniform, hparam
from dgbench.registry import ALGORITHMS

PEGO_BACKBONES = BackboneNeed(
    family="a ViT with a fused qkv attention projection (timm VisionTransformer)",
    fits=is_vit_with_fused_qkv,
    paper={
        "arch": "timm",
        "name": "vit_base_patch16_clip_quickgelu_224.openai",
        "pretrained": True,
        "projection": True,
    },
    small={
        "arch": "timm",
        "name": "test_vit",
        "pretrained": False,
        "kwargs": {"img_size": 32, "patch_size": 4, "dynamic_img_size": True},
    },
    examples=(
        "backbone=timm backbone.name=vit_small_patch14_dinov2.lvd142m",
        "backbone=timm backbone.name=vit_base_patch16_224.augreg_in21k",
    ),
)


@dataclass(kw_only=True)
class PEGOHParams(AlgorithmHParams):
    """PEGO's hparams (reference `run.sh`: N = 2 on PACS, 4 elsewhere; r = 4; λ = 1e-3; Adam 5e-4)."""

    dataset_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {"pacs": {"num_lora": 2}}

    lr: float = hparam(5e-4, LogUniform(-4, -3), "Adam learning rate (adapters and head)")
    weight_decay: float = hparam(0.0, None, "Adam weight decay (0 in the reference)")
    num_lora: int = hparam(4, None, "N: LoRA adapters per q and v projection, summed")
    rank: int = hparam(4, None, "r: rank of each adapter")
    ortho_weight: float = hparam(1e-3, LogUniform(-4, -2), "λ: weight of the orthogonal regulariser")
    merge_for_eval: bool = hparam(True, None, "evaluate with adapters merged into the frozen weights")


@ALGORITHMS.register("pego", PEGOHParams)
class PEGO(Algorithm):
    """A frozen ViT with a LoRA group on q/v, trained with CE plus the orthogonal regulariser."""

    paper = (
        "Hu, Zhang, Qi, Huang, Wang, Gao, Learn to Preserve and Diversify: Parameter-Efficient Group with "
        "Orthogonal Regularization for Domain Generalization, ECCV 2024, arXiv:2407.15085"
    )
    reference = "JudgingH/PEGO@fb8700b domainbed/algorithms/algorithms.py:PEGO"

    backbone_need = PEGO_BACKBONES

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, num_domains, cfg)
        self.lora_layers = add_lora_group(
            self.featurizer.model,
            cfg.num_lora,
            cfg.rank,
            targets=("q", "v"),
            merge_in_eval=cfg.merge_for_eval,
        )
        self.optimizer = self.make_optimizer([p for p in self.parameters() if p.requires_grad])

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        x = torch.cat([x for x, _ in batches])
        y = torch.cat([y for _, y in batches])
        ce = F.cross_entropy(self.predict(x), y)
        preserve, diversify = orthogonality_terms(self.lora_layers)
        ortho = self.cfg.ortho_weight * (preserve + diversify)
        loss = ce + ortho + auxiliary_loss(self)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        values = torch.stack([v.detach().float() for v in (ce, ortho, preserve, diversify)]).unbind()
        return dict(zip(("loss", "ortho_loss", "ortho_preserve", "ortho_diversify"), values, strict=True))
