"""GMoE: a sparse mixture-of-experts in place of the MLP of chosen ViT blocks.

Li et al., "Sparse Mixture-of-Experts are Domain Generalizable Learners", ICLR 2023
(https://arxiv.org/abs/2206.04046). Reference code: Luodian/Generalizable-Mixture-of-Experts
at 0689d55 (DeiT-S/16 with tutel MoE layers in blocks 8 and 10), whose MoE layer is
microsoft/tutel (read at 82af7aa: `gates/cosine_top.py`, `impls/moe_layer.py`,
`impls/fast_dispatch.py`, `impls/losses.py`). The reference code does not run as released,
so this is a re-implementation from the formulas, tested against the paper's invariants.

One MoE layer, for the T = B*N tokens of a batch flattened:

    logits  = cos(P x, E_j) * exp(min(t, ln 100))          cosine router, fp32
    scores  = softmax(logits + N(0,1) * gate_noise / E)    noise in training mode only
    expert  = top-k of scores; capacity = k * int(capacity_factor * ceil(T / E)) per expert
    slots   = batch-prioritised: within an expert, tokens with a larger max score come first
    y       = sum over kept choices of score * expert(x)   overflow tokens get 0 (the block's
                                                           residual passes them through)
    aux     = aux_weight * tutel load_importance_loss(softmax(logits), noisy top-k logits)

Experts are deep copies of the block's (pretrained) dense MLP, so a GMoE starts from the
dense ViT; the router is new. The score is not renormalised for k = 1, so the MoE block is
not function-preserving at initialisation (as in the reference).

For k > 1 the semantics are tutel's: the j-th choices of all tokens queue behind every
(j-1)-th choice routed to the same expert (priority by max score within each rank), the
capacity grows with k, and the k selected scores are renormalised to sum to 1 before any
choice is dropped (a dropped choice's weight is lost, not redistributed).

Deviations from the reference:
- Ties in the max score are broken by token index (a stable sort); tutel's argsort is unstable.
- E = 1 gives an aux loss of 0; tutel's unbiased variance of one value is NaN.
- gate_noise = 0 uses the step function (the limit of the Normal CDF) in the load term;
  tutel's Normal(0, 0) is invalid. Capacity factors <= 0 (tutel's dynamic capacity) are refused.
- Experts run one after another on their `capacity` rows (tutel's layout: the kept choices at
  their slots, the unused rows zero with a zero gate) through index_select / index_add instead of
  tutel's fused dispatch kernels: same results, no custom kernels. The shapes depend on the token
  count alone, so a GPU step reads nothing on the host (gathering each expert's tokens by a mask
  made the host wait about 16 times per layer and forward); the unused rows cost expert compute,
  up to capacity_factor * k * T rows in all against the kept choices (as in tutel).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.backbones.auxiliary import AuxiliaryLayer
from dgbench.backbones.base import Featurizer
from dgbench.backbones.timm_backbone import TimmConfig, create_timm_model, timm_featurizer
from dgbench.errors import ConfigError
from dgbench.registry import BACKBONES

MAX_LOGIT_SCALE = 100.0  # tutel clamps the learnable log-scale at ln(1 / 0.01)
CV_EPS = 1e-10  # tutel's epsilon in the coefficient of variation


# --- router ---------------------------------------------------------------------------------------


class CosineTopKRouter(nn.Module):
    """tutel's `cosine_top` gate: scaled cosine similarity of projected tokens and expert embeddings.

    Cosine logits are bounded by the scale, so no expert can win by growing its norm; the scale
    exp(t) is learned (t starts at ln(1 / init_temperature)) and capped at 100. Runs in fp32 with
    autocast off, since routing decisions are sensitive to rounding.
    """

    def __init__(
        self, dim: int, num_experts: int, proj_dim: int = 256, init_temperature: float = 0.5
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, proj_dim)
        self.expert_embeddings = nn.Parameter(torch.empty(proj_dim, num_experts).normal_(0.0, 0.01))
        self.log_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits (T, E) in fp32 for tokens (T, dim)."""
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            projected = F.linear(tokens.float(), self.proj.weight.float(), self.proj.bias.float())
            cosine = F.normalize(projected, dim=1) @ F.normalize(self.expert_embeddings.float(), dim=0)
            return cosine * self.logit_scale()

    def logit_scale(self) -> Tensor:
        return self.log_scale.float().clamp(max=math.log(MAX_LOGIT_SCALE)).exp()


# --- routing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Routing:
    """Where the k choices of each token go; every tensor is (T, k), choice j in column j."""

    experts: Tensor  # expert index (long)
    gates: Tensor  # combine weight: the selected score (renormalised over the k choices if k > 1)
    slots: Tensor  # position in the expert's buffer; the choice is dropped if slot >= capacity
    capacity: int

    @property
    def kept(self) -> Tensor:
        return self.slots < self.capacity


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """tutel's capacity: k * int(capacity_factor * ceil(T / E)) slots per expert."""
    return top_k * int(capacity_factor * ((num_tokens + num_experts - 1) // num_experts))


def route(scores: Tensor, top_k: int, capacity_factor: float) -> Routing:
    """Top-k routing with batch-prioritised slots for scores (T, E) (softmax of the noisy logits)."""
    num_tokens, num_experts = scores.shape
    selected, experts = scores.topk(top_k, dim=1)
    gates = selected
    if top_k > 1:
        gates = selected / selected.sum(dim=1, keepdim=True).clamp(min=torch.finfo(selected.dtype).eps)
    slots = priority_slots(experts, scores.max(dim=1).values, num_experts)
    return Routing(experts, gates, slots, expert_capacity(num_tokens, num_experts, top_k, capacity_factor))


def _one_hot(index: Tensor, num_classes: int) -> Tensor:
    """F.one_hot(index, num_classes) as a scatter: one_hot checks its range on the host on CPU,
    which the host-read tests would count (on CUDA it does not)."""
    return index.new_zeros(*index.shape, num_classes).scatter_(-1, index[..., None], 1)


def priority_slots(experts: Tensor, priority: Tensor, num_experts: int) -> Tensor:
    """Slot of each choice (T, k): rank by descending `priority` among the tokens sent to the same
    expert with the same choice rank, after all earlier-rank choices for that expert."""
    order = torch.sort(priority, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    queued = experts.new_zeros(num_experts)  # choices of earlier ranks already queued per expert
    slots = []
    for choice in experts.unbind(dim=1):
        onehot = _one_hot(choice, num_experts)
        position = onehot[order].cumsum(dim=0)[rank] - 1  # (T, E): place among tokens in priority order
        slots.append(position.gather(1, choice[:, None]).squeeze(1) + queued[choice])
        queued = queued + onehot.sum(dim=0)
    return torch.stack(slots, dim=1)


# --- auxiliary loss -------------------------------------------------------------------------------


def load_importance_loss(clean_logits: Tensor, noisy_topk_logits: Tensor, gate_noise: float) -> Tensor:
    """tutel's `load_importance_loss` (Shazeer et al. 2017): ½ [CV²(importance) + CV²(load)].

    importance_e = Σ_t softmax(clean)_te; load_e = Σ_t Φ(softmax(clean)_te − threshold_t) with Φ the
    CDF of N(0, (gate_noise / E)²) and threshold_t the k-th selected *noisy logit*: tutel compares
    probabilities with logits here, and so does this port. Scale-invariant in the number of tokens.
    """
    probs = clean_logits.float().softmax(dim=1)
    num_experts = probs.shape[1]
    if num_experts == 1:
        return probs.new_zeros(())
    diff = probs - noisy_topk_logits[:, -1:].float()
    if gate_noise > 0:
        load = 0.5 * (1.0 + torch.erf(diff / (gate_noise / num_experts * math.sqrt(2.0))))
    else:
        load = (diff > 0).float() + 0.5 * (diff == 0).float()
    return 0.5 * (cv_squared(probs.sum(dim=0)) + cv_squared(load.sum(dim=0)))


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation with tutel's unbiased variance."""
    return values.var() / (values.mean() ** 2 + CV_EPS)


# --- the layer ------------------------------------------------------------------------------------


class SparseMoE(AuxiliaryLayer):
    """E copies of a dense MLP behind a cosine top-k router; records its aux loss and routing metrics.

    Args:
        mlp: the dense MLP to copy (a timm `Mlp`); its hidden dropout `drop1` is set to
            `expert_dropout` in every copy (None keeps it).
        num_experts, top_k, capacity_factor, gate_noise, router_dim, aux_weight: see the module
            docstring; GMoE uses 6, 1, 1.5, 1.0, 256, 0.01.
    """

    def __init__(
        self,
        mlp: nn.Module,
        num_experts: int = 6,
        top_k: int = 1,
        capacity_factor: float = 1.5,
        gate_noise: float = 1.0,
        router_dim: int = 256,
        expert_dropout: float | None = 0.1,
        aux_weight: float = 0.01,
    ) -> None:
        super().__init__()
        check_moe_args(
            num_experts, top_k, capacity_factor, gate_noise, router_dim, expert_dropout, aux_weight
        )
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.gate_noise, self.aux_weight = capacity_factor, gate_noise, aux_weight
        self.router = CosineTopKRouter(input_width(mlp), num_experts, router_dim)
        self.experts = nn.ModuleList(_expert_copy(mlp, expert_dropout) for _ in range(num_experts))

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        routing, aux = self.gate(tokens)
        self.record(aux * self.aux_weight if self.training else None, self.routing_metrics(routing, aux))
        return self.combine(tokens, routing).reshape(x.shape)

    def gate(self, tokens: Tensor) -> tuple[Routing, Tensor]:
        """Routing of tokens (T, D) and the unweighted aux loss, in fp32 (autocast off, as tutel)."""
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            logits = self.router(tokens)
            noisy = logits
            if self.training and self.gate_noise > 0:
                noisy = logits + torch.randn_like(logits) * (self.gate_noise / self.num_experts)
            routing = route(noisy.softmax(dim=1), self.top_k, self.capacity_factor)
            aux = load_importance_loss(logits, noisy.gather(1, routing.experts), self.gate_noise)
        return routing, aux

    def combine(self, tokens: Tensor, routing: Routing) -> Tensor:
        """Σ over kept choices of gate * expert(token); tokens with no kept choice stay 0.

        Expert e runs on rows e*C .. e*C + C - 1 of a buffer of C = `routing.capacity` rows per
        expert: the token of each kept choice at its slot, the zero row T (gate 0) elsewhere.
        """
        num_tokens, capacity = tokens.shape[0], routing.capacity
        spare = len(self.experts) * capacity  # where dropped choices point: a row no expert reads
        rows = torch.where(routing.kept, routing.experts * capacity + routing.slots, spare).flatten()
        token_ids = torch.arange(num_tokens, device=tokens.device)[:, None].expand_as(routing.kept).flatten()
        source = torch.full((spare + 1,), num_tokens, dtype=torch.long, device=tokens.device)
        source = source.scatter(0, rows, token_ids)
        gates = routing.gates.new_zeros(spare + 1).scatter(0, rows, routing.gates.flatten())
        padded = torch.cat([tokens, tokens.new_zeros(1, tokens.shape[1])])
        out = torch.zeros_like(padded)
        for index, expert in enumerate(self.experts):
            span = slice(index * capacity, (index + 1) * capacity)
            y = expert(padded.index_select(0, source[span])) * gates[span, None]
            out.index_add_(0, source[span], y.to(out.dtype))
        return out[:num_tokens]

    def routing_metrics(self, routing: Routing, aux: Tensor) -> dict[str, Tensor]:
        """Share of choices dropped by capacity, per-expert share before the drop, unweighted aux loss."""
        choices = routing.experts.numel()
        counts = _one_hot(routing.experts.flatten(), self.num_experts).sum(dim=0)
        metrics = {"dropped_fraction": (~routing.kept).sum() / choices, "aux_loss": aux}
        metrics.update({f"load_e{i}": counts[i] / choices for i in range(self.num_experts)})
        return metrics

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
            f"gate_noise={self.gate_noise}, aux_weight={self.aux_weight}"
        )


def check_moe_args(
    num_experts: int,
    top_k: int,
    capacity_factor: float,
    gate_noise: float,
    router_dim: int,
    expert_dropout: float | None,
    aux_weight: float,
) -> None:
    """Refuse settings the routing cannot honour, naming the backbone key to change."""
    rules = [
        ("num_experts", num_experts, num_experts >= 1, "at least 1"),
        ("top_k", top_k, 1 <= top_k <= num_experts, f"between 1 and num_experts={num_experts}"),
        ("capacity_factor", capacity_factor, capacity_factor > 0, "positive (no dynamic capacity)"),
        ("gate_noise", gate_noise, gate_noise >= 0, "at least 0"),
        ("router_dim", router_dim, router_dim >= 1, "at least 1"),
        ("expert_dropout", expert_dropout, expert_dropout is None or 0 <= expert_dropout < 1, "in [0, 1)"),
        ("aux_weight", aux_weight, aux_weight >= 0, "at least 0"),
    ]
    for key, value, ok, must in rules:
        if not ok:
            raise ConfigError(f"backbone.{key}={value!r}: must be {must}")


def input_width(mlp: nn.Module) -> int:
    """Token width of a dense MLP: the input width of its first Linear layer."""
    first = next((m for m in mlp.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise ConfigError(f"cannot turn {type(mlp).__name__} into experts: it has no nn.Linear layer")
    return first.in_features


def _expert_copy(mlp: nn.Module, dropout: float | None) -> nn.Module:
    expert = copy.deepcopy(mlp)
    if dropout is not None:
        if not isinstance(getattr(expert, "drop1", None), nn.Dropout):
            raise ConfigError(
                f"backbone.expert_dropout={dropout}: {type(mlp).__name__} has no hidden dropout `drop1` "
                "(a timm Mlp has one); set backbone.expert_dropout=null to keep the MLP as it is"
            )
        expert.drop1.p = dropout
    return expert


# --- surgery --------------------------------------------------------------------------------------


def resolve_moe_blocks(blocks: Sequence[int] | None, depth: int) -> list[int]:
    """Block indices for MoE layers: None = the paper's "last two", [depth-4, depth-2] (8 and 10 of
    12); otherwise the given indices (negative ones count from the end), sorted."""
    if blocks is None:
        if depth < 4:
            raise ConfigError(
                f"backbone.moe_blocks: the default placement [depth-4, depth-2] needs at least 4 blocks, "
                f"the model has {depth}; list the blocks explicitly, e.g. backbone.moe_blocks=[{depth - 1}]"
            )
        return [depth - 4, depth - 2]
    resolved = []
    for block in blocks:
        if not -depth <= int(block) < depth:
            raise ConfigError(
                f"backbone.moe_blocks={list(blocks)}: block {block} is out of range for a ViT of depth "
                f"{depth}; use indices 0..{depth - 1} (or -{depth}..-1 from the end)"
            )
        resolved.append(int(block) % depth)
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"backbone.moe_blocks={list(blocks)}: a block is listed twice")
    return sorted(resolved)


def moefy_vit(
    vit: nn.Module,
    blocks: Sequence[int] | None = None,
    num_experts: int = 6,
    top_k: int = 1,
    capacity_factor: float = 1.5,
    gate_noise: float = 1.0,
    router_dim: int = 256,
    expert_dropout: float | None = 0.1,
    aux_weight: float = 0.01,
) -> nn.Module:
    """Replace `vit.blocks[i].mlp` by a `SparseMoE` of copies of it, in place, for i in `blocks`
    (None: the last two of every-two). Load pretrained weights before, so experts copy them."""
    vit_blocks = getattr(vit, "blocks", None)
    if not isinstance(vit_blocks, nn.Sequential | nn.ModuleList):
        raise ConfigError(
            f"GMoE needs a ViT with a `.blocks` list of transformer blocks (timm VisionTransformer); "
            f"{type(vit).__name__} has none. Choose a ViT, e.g. backbone.name=deit_small_patch16_224"
        )
    for index in resolve_moe_blocks(blocks, len(vit_blocks)):
        block = vit_blocks[index]
        if not isinstance(getattr(block, "mlp", None), nn.Module) or isinstance(block.mlp, SparseMoE):
            raise ConfigError(
                f"backbone.moe_blocks: block {index} of {type(vit).__name__} has no dense `.mlp` to "
                f"replace (found {type(getattr(block, 'mlp', None)).__name__})"
            )
        moe = SparseMoE(
            block.mlp, num_experts, top_k, capacity_factor, gate_noise, router_dim, expert_dropout, aux_weight
        )
        moe.metric_prefix = f"moe/block{index}"
        block.mlp = moe
    return vit


# --- backbone -------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class GMoEConfig(TimmConfig):
    """A timm ViT whose chosen blocks get a sparse MoE (`backbone=gmoe`); defaults are the paper's."""

    name: str = "deit_small_patch16_224.fb_in1k"  # timm ViT; pretrained weights load before the copy
    kwargs: dict[str, Any] = field(default_factory=lambda: {"drop_path_rate": 0.1})
    moe_blocks: list[int] | None = None  # None: the last two of every-two, [depth-4, depth-2]
    num_experts: int = 6
    top_k: int = 1
    capacity_factor: float = 1.5  # capacity = top_k * int(capacity_factor * ceil(tokens / experts))
    gate_noise: float = 1.0  # training logits + N(0, 1) * gate_noise / num_experts
    router_dim: int = 256  # cosine router projection width
    expert_dropout: float = 0.1  # dropout on each expert's hidden layer
    aux_weight: float = 0.01  # weight of each layer's load/importance loss


def build_gmoe(cfg: GMoEConfig) -> Featurizer:
    """The dense timm ViT (with its pretrained weights), then MoE layers whose experts copy its MLPs."""
    model = create_timm_model(cfg.name, pretrained=cfg.pretrained, projection=cfg.projection, **cfg.kwargs)
    moefy_vit(
        model,
        cfg.moe_blocks,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        capacity_factor=cfg.capacity_factor,
        gate_noise=cfg.gate_noise,
        router_dim=cfg.router_dim,
        expert_dropout=cfg.expert_dropout,
        aux_weight=cfg.aux_weight,
    )
    return timm_featurizer(model, f"gmoe_{cfg.name}", projection=cfg.projection)


BACKBONES.register("gmoe", GMoEConfig, build_gmoe)
