"""GMoE sparse MoE layer: the invariants of the paper and tutel, and a naive per-token re-derivation.

`naive_moe` and `naive_aux_loss` re-derive routing, capacity, batch priority, the combine and the
load/importance loss one token at a time in float64 Python, independently of `dgbench.backbones.moe`;
tools/check_moe.py reuses them for a DeiT-S-sized layer. CPU only, tiny sizes, no downloads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from timm.layers import Mlp
from torch import Tensor, nn

from dgbench.backbones import build_backbone, moe
from dgbench.backbones.auxiliary import auxiliary_loss
from dgbench.backbones.moe import (
    CosineTopKRouter,
    SparseMoE,
    load_importance_loss,
    moefy_vit,
    resolve_moe_blocks,
)
from dgbench.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
VIT_32PX = {"img_size": 32, "patch_size": 4, "dynamic_img_size": True}

# --- naive re-derivation (float64, one token at a time) -------------------------------------------


def naive_softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [v / sum(exps) for v in exps]


def naive_logits(router: CosineTopKRouter, tokens: Tensor) -> list[list[float]]:
    """scale * cos(P x + b, E_j), scale = min(exp(t), 100)."""
    weight, bias = router.proj.weight.detach().double(), router.proj.bias.detach().double()
    embeddings = router.expert_embeddings.detach().double()
    scale = min(math.exp(router.log_scale.item()), 100.0)
    rows = []
    for x in tokens.detach().double():
        h = weight @ x + bias
        rows.append([scale * float(h @ e / (h.norm() * e.norm())) for e in embeddings.T])
    return rows


def naive_cv_squared(values: list[float]) -> float:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return var / (mean**2 + 1e-10)


def naive_aux_loss(clean: list[list[float]], noisy_selected: list[list[float]], gate_noise: float) -> float:
    """½[CV²(Σ_t p_t) + CV²(Σ_t Φ((p_t − k-th selected noisy logit) / (gate_noise / E)))]."""
    probs = [naive_softmax(row) for row in clean]
    experts = len(probs[0])
    sigma = gate_noise / experts
    importance = [sum(p[e] for p in probs) for e in range(experts)]
    load = [
        sum(
            0.5 * (1 + math.erf((p[e] - sel[-1]) / (sigma * math.sqrt(2))))
            for p, sel in zip(probs, noisy_selected, strict=True)
        )
        for e in range(experts)
    ]
    return 0.5 * (naive_cv_squared(importance) + naive_cv_squared(load))


class NaiveResult(NamedTuple):
    out: Tensor  # (T, D)
    dropped: set[tuple[int, int]]  # (token, choice rank) pairs past their expert's capacity
    aux: float  # unweighted load/importance loss
    loads: list[float]  # share of the T * k choices sent to each expert, before the drop


def naive_moe(layer: SparseMoE, tokens: Tensor, noise: Tensor | None = None) -> NaiveResult:
    """The MoE forward of `layer` on tokens (T, D), one token at a time; `noise` is added to the logits.

    Slots are handed out choice rank by choice rank; within a rank, tokens in order of decreasing
    max score (ties: lower index first); every choice takes a place in its expert's queue, and
    those past the capacity k * int(capacity_factor * ceil(T / E)) are dropped.
    """
    num_tokens, experts, k = tokens.shape[0], layer.num_experts, layer.top_k
    clean = naive_logits(layer.router, tokens)
    noisy = [list(row) for row in clean]
    if noise is not None:
        noisy = [
            [v + float(n) for v, n in zip(r, nr, strict=True)] for r, nr in zip(clean, noise, strict=True)
        ]
    scores = [naive_softmax(row) for row in noisy]
    choices = [sorted(range(experts), key=lambda e, s=s: -s[e])[:k] for s in scores]
    capacity = k * int(layer.capacity_factor * math.ceil(num_tokens / experts))
    priority = sorted(range(num_tokens), key=lambda t: (-max(scores[t]), t))
    queued, kept = [0] * experts, set()
    for j in range(k):
        for t in priority:
            expert = choices[t][j]
            if queued[expert] < capacity:
                kept.add((t, j))
            queued[expert] += 1
    out = torch.zeros_like(tokens)
    with torch.no_grad():
        for t, j in sorted(kept):
            e = choices[t][j]
            gate = scores[t][e] / sum(scores[t][c] for c in choices[t]) if k > 1 else scores[t][e]
            out[t] += gate * layer.experts[e](tokens[t : t + 1])[0]
    dropped = {(t, j) for t in range(num_tokens) for j in range(k)} - kept
    selected = [[noisy[t][e] for e in choices[t]] for t in range(num_tokens)]
    aux = naive_aux_loss(clean, selected, layer.gate_noise)
    return NaiveResult(out, dropped, aux, [n / (num_tokens * k) for n in queued])


# --- helpers --------------------------------------------------------------------------------------


def make_layer(seed: int = 0, dim: int = 16, **kw: object) -> SparseMoE:
    torch.manual_seed(seed)
    options = {"num_experts": 4, "router_dim": 8, "expert_dropout": 0.0, **kw}
    return SparseMoE(Mlp(dim, 2 * dim), **options)  # type: ignore[arg-type]


def tokens_for(seed: int, shape: tuple[int, ...] = (2, 13, 16)) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class RouteSpy:
    """Wraps moe.route to keep every Routing a forward computes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[moe.Routing] = []
        original = moe.route

        def spy(*args: object, **kw: object) -> moe.Routing:
            self.calls.append(original(*args, **kw))  # type: ignore[arg-type]
            return self.calls[-1]

        monkeypatch.setattr(moe, "route", spy)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- exact invariants -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_single_expert_equals_dense_mlp(mode: str) -> None:
    """E=1: the softmax is exactly 1 and capacity >= T, so nothing is dropped or scaled."""
    torch.manual_seed(0)
    mlp = Mlp(16, 32)
    layer = SparseMoE(mlp, num_experts=1, capacity_factor=1.0, gate_noise=0.0, expert_dropout=0.0)
    layer.train(mode == "train")
    mlp.train(mode == "train")
    x = tokens_for(1)
    assert torch.equal(layer(x), mlp(x))
    assert layer.metrics()[f"{layer.metric_prefix}/aux_loss"] == 0.0


def test_identical_experts_give_score_times_mlp_and_zero_when_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layer = make_layer(capacity_factor=0.75).eval()  # 26 tokens, 4 experts x 5 slots: >= 6 dropped
    spy = RouteSpy(monkeypatch)
    x = tokens_for(2)
    out = layer(x).reshape(-1, 16)
    routing = spy.calls[-1]
    kept = routing.kept[:, 0]
    expected = routing.gates[:, :1] * layer.experts[0](x.reshape(-1, 16))
    assert 6 <= int((~kept).sum()) < kept.numel()
    torch.testing.assert_close(out[kept], expected[kept])
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    scores = layer.router(x.reshape(-1, 16)).softmax(dim=1)
    assert torch.equal(routing.gates[:, 0], scores.max(dim=1).values)  # k=1: not renormalised


def test_dropped_count_and_priority_within_each_expert(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropped = Σ_e max(0, n_e − cap); in an over-full expert the dropped have the lowest max scores."""
    layer = make_layer(capacity_factor=0.75).train()
    spy = RouteSpy(monkeypatch)
    torch.manual_seed(3)
    layer(tokens_for(3))
    routing = spy.calls[-1]
    experts, kept = routing.experts[:, 0], routing.kept[:, 0]
    loads = torch.bincount(experts, minlength=4)
    assert routing.capacity == 1 * int(0.75 * math.ceil(26 / 4)) == 5
    assert int((~kept).sum()) == int((loads - routing.capacity).clamp(min=0).sum()) > 0
    priority = routing.gates[:, 0]  # k=1: the selected score is the max score
    for e in range(4):
        mine = experts == e
        if (mine & ~kept).any():
            assert priority[mine & kept].min() >= priority[mine & ~kept].max()
            assert int((mine & kept).sum()) == routing.capacity


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forward_matches_naive_rederivation(top_k: int, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Output, dropped choices and aux loss equal the per-token loop (train: the same noise draw)."""
    layer = make_layer(seed=top_k, top_k=top_k, capacity_factor=0.75).train(mode == "train")
    spy = RouteSpy(monkeypatch)
    x = tokens_for(4 + top_k)
    torch.manual_seed(7)
    out = layer(x).reshape(-1, 16)
    noise = None
    if mode == "train":
        torch.manual_seed(7)
        noise = torch.randn(26, 4) * (layer.gate_noise / 4)
    naive = naive_moe(layer, x.reshape(-1, 16), noise)
    routing = spy.calls[-1]
    assert {(t, j) for t, j in (~routing.kept).nonzero().tolist()} == naive.dropped != set()
    torch.testing.assert_close(out, naive.out, atol=1e-5, rtol=1e-5)
    metrics = {k.rsplit("/", 1)[1]: v for k, v in layer.metrics().items()}
    assert metrics["aux_loss"] == pytest.approx(naive.aux, rel=1e-4, abs=1e-7)
    assert metrics["dropped_fraction"] == pytest.approx(len(naive.dropped) / (26 * top_k))
    assert [metrics[f"load_e{i}"] for i in range(4)] == pytest.approx(naive.loads)


@pytest.mark.parametrize("top_k", [1, 2])
def test_a_training_step_reads_nothing_on_the_host(top_k: int, host_reads: type) -> None:
    """Routing, dispatch, combine, metrics and backward have shapes fixed by the token count, so
    on a GPU the host never waits for them (check_cuda counted 48 syncs in a GMoE step before)."""
    layer = make_layer(seed=top_k, top_k=top_k, capacity_factor=0.75).train()
    x = tokens_for(3).requires_grad_()
    with host_reads() as reads:
        layer(x).square().sum().backward()
    assert [op for op, _ in reads.reads] == []


def test_top2_gates_renormalised_and_second_choices_queue_behind_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layer = make_layer(top_k=2, capacity_factor=0.75).eval()
    spy = RouteSpy(monkeypatch)
    layer(tokens_for(8))
    routing = spy.calls[-1]
    torch.testing.assert_close(routing.gates.sum(dim=1), torch.ones(26))
    assert routing.capacity == 2 * 5
    for e in range(4):
        first = routing.slots[:, 0][routing.experts[:, 0] == e]
        second = routing.slots[:, 1][routing.experts[:, 1] == e]
        assert sorted(first.tolist()) == list(range(first.numel()))
        assert sorted(second.tolist()) == list(range(first.numel(), first.numel() + second.numel()))


# --- auxiliary loss -------------------------------------------------------------------------------


def test_aux_loss_nonnegative_and_matches_naive_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        clean = torch.randn(40, 6, generator=gen) * 2
        noisy = clean + torch.randn(40, 6, generator=gen) / 6
        selected = noisy.gather(1, noisy.topk(2, dim=1).indices)
        loss = load_importance_loss(clean, selected, gate_noise=1.0)
        assert loss >= 0
        assert float(loss) == pytest.approx(naive_aux_loss(clean.tolist(), selected.tolist(), 1.0), rel=1e-5)


def test_aux_loss_zero_when_uniform_and_invariant_to_token_count() -> None:
    uniform = torch.zeros(30, 6)  # every token: probabilities 1/6, the same threshold
    assert float(load_importance_loss(uniform, torch.full((30, 1), 0.3), 1.0)) == pytest.approx(0, abs=1e-12)
    clean = torch.randn(30, 6, generator=torch.Generator().manual_seed(1))
    selected = clean.max(dim=1, keepdim=True).values
    once = load_importance_loss(clean, selected, 1.0)
    thrice = load_importance_loss(clean.repeat(3, 1), selected.repeat(3, 1), 1.0)
    assert float(once) > 0
    torch.testing.assert_close(thrice, once, rtol=1e-5, atol=0)


def test_train_records_weighted_aux_loss_eval_records_none() -> None:
    layer = make_layer(aux_weight=0.25).train()
    layer(tokens_for(9))
    loss = layer.pop_loss()
    assert loss is not None and loss.requires_grad
    assert float(loss.detach()) == pytest.approx(
        0.25 * layer.metrics()[f"{layer.metric_prefix}/aux_loss"], rel=1e-6
    )
    layer.eval()(tokens_for(9))
    assert layer.pop_loss() is None and f"{layer.metric_prefix}/aux_loss" in layer.metrics()


# --- determinism, router, gradients ---------------------------------------------------------------


def test_eval_routing_deterministic_training_noise_changes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer().eval()
    spy = RouteSpy(monkeypatch)
    x = tokens_for(10)
    first, second = layer(x), layer(x)
    assert torch.equal(first, second) and torch.equal(spy.calls[0].experts, spy.calls[1].experts)
    layer.train()
    torch.manual_seed(0)
    layer(x)
    torch.manual_seed(1)
    layer(x)
    assert not torch.equal(spy.calls[2].experts, spy.calls[3].experts)


def test_router_scale_starts_at_two_and_is_capped_at_100() -> None:
    router = CosineTopKRouter(16, 4, proj_dim=8)
    assert router.logit_scale().item() == pytest.approx(2.0)
    x = torch.randn(50, 16)
    assert router(x).abs().max() <= 2.0 + 1e-6
    with torch.no_grad():
        router.log_scale.fill_(10.0)
    assert router.logit_scale().item() == pytest.approx(100.0)
    assert router(x).abs().max() <= 100.0 + 1e-4
    router(x).sum().backward()
    assert float(router.log_scale.grad) == 0.0  # above the cap the scale no longer learns


def test_router_runs_in_fp32_under_autocast() -> None:
    router = CosineTopKRouter(16, 4, proj_dim=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert router(torch.randn(5, 16)).dtype == torch.float32


def test_gradients_reach_router_and_routed_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer().train()
    spy = RouteSpy(monkeypatch)
    torch.manual_seed(0)
    out = layer(tokens_for(11))
    (out.square().sum() + layer.pop_loss()).backward()
    router = layer.router
    for p in (router.proj.weight, router.proj.bias, router.expert_embeddings, router.log_scale):
        assert p.grad is not None and p.grad.abs().sum() > 0
    routed = set(spy.calls[-1].experts[spy.calls[-1].kept].tolist())
    for e, expert in enumerate(layer.experts):
        grad = expert.fc1.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == (e in routed)


# --- parameter count, surgery, backbone -----------------------------------------------------------


def test_deit_small_gmoe_parameter_count() -> None:
    """Extra = 2 x [5 x FFN + router] (reference: FFN 1,181,568, router 100,097), total about 34 M."""
    vit = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=0)
    dense, ffn = param_count(vit), param_count(vit.blocks[8].mlp)
    router = param_count(CosineTopKRouter(384, 6, proj_dim=256))
    moefy_vit(vit, None)
    assert (ffn, router) == (1_181_568, 100_097)
    assert param_count(vit) - dense == 2 * (5 * ffn + router)
    assert 33.5e6 < param_count(vit) < 34.5e6
    assert [type(b.mlp) is SparseMoE for b in vit.blocks] == [i in (8, 10) for i in range(12)]


def test_resolve_moe_blocks() -> None:
    assert resolve_moe_blocks(None, 12) == [8, 10]
    assert resolve_moe_blocks(None, 6) == [2, 4]
    assert resolve_moe_blocks([3, -1, 0], 6) == [0, 3, 5]


@pytest.mark.parametrize(
    ("blocks", "match"),
    [([6], "out of range"), ([-7], "out of range"), ([1, 1], "twice")],
)
def test_moefy_vit_rejects_bad_blocks(blocks: list[int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        moefy_vit(timm.create_model("test_vit", num_classes=0), blocks)


def test_moefy_vit_rejects_models_without_blocks_or_mlp() -> None:
    with pytest.raises(ConfigError, match=r"\.blocks"):
        moefy_vit(timm.create_model("resnet10t", num_classes=0), [0])
    no_mlp = nn.Module()
    no_mlp.blocks = nn.Sequential(nn.Identity(), nn.Identity())
    with pytest.raises(ConfigError, match=r"no dense `\.mlp`"):
        moefy_vit(no_mlp, [1])
    vit = moefy_vit(timm.create_model("test_vit", num_classes=0), [1])
    with pytest.raises(ConfigError, match=r"no dense `\.mlp`"):
        moefy_vit(vit, [1])
    with pytest.raises(ConfigError, match="at least 4 blocks"):
        resolve_moe_blocks(None, 3)
    with pytest.raises(ConfigError, match=r"backbone\.top_k"):
        SparseMoE(Mlp(8, 16), num_experts=2, top_k=3)


def test_build_backbone_gmoe_shape_name_and_metrics() -> None:
    torch.manual_seed(0)
    feat = build_backbone({"arch": "gmoe", "name": "test_vit", "kwargs": VIT_32PX})
    assert feat.name == "gmoe_test_vit" and feat.n_outputs == 64
    layers = [b.mlp for b in feat.model.blocks if isinstance(b.mlp, SparseMoE)]
    assert [m.metric_prefix for m in layers] == ["moe/block2", "moe/block4"]
    assert layers[0].experts[0].drop1.p == 0.1
    out = feat.train()(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 64)
    for m in layers:
        metrics = m.metrics()
        names = {k.removeprefix(m.metric_prefix + "/") for k in metrics}
        assert names == {"dropped_fraction", "aux_loss", *(f"load_e{i}" for i in range(6))}
        assert sum(metrics[f"{m.metric_prefix}/load_e{i}"] for i in range(6)) == pytest.approx(1.0)
        assert 0.0 <= metrics[f"{m.metric_prefix}/dropped_fraction"] <= 1.0
    total = sum(m.metrics()[f"{m.metric_prefix}/aux_loss"] for m in layers)
    assert float(auxiliary_loss(feat).detach()) == pytest.approx(0.01 * total, rel=1e-5)


def test_pretrained_dense_weights_are_copied_into_every_expert(tmp_path: Path) -> None:
    """pretrained=true loads the dense checkpoint first, then every expert copies its block's MLP."""
    dense = timm.create_model("test_vit")
    state = {k: v + torch.randn_like(v) for k, v in dense.state_dict().items()}
    torch.save(state, tmp_path / "test_vit.pth")
    overlay = {"pretrained_cfg_overlay": {"file": str(tmp_path / "test_vit.pth")}}
    feat = build_backbone({"arch": "gmoe", "name": "test_vit", "pretrained": True, "kwargs": overlay})
    for index in (2, 4):
        layer = feat.model.blocks[index].mlp
        for expert in layer.experts:
            for name, tensor in expert.state_dict().items():
                assert torch.equal(tensor, state[f"blocks.{index}.mlp.{name}"]), (index, name)
        pointers = {e.fc1.weight.data_ptr() for e in layer.experts}
        assert len(pointers) == 6  # copies, not shared tensors
    assert torch.equal(feat.model.blocks[3].mlp.fc1.weight, state["blocks.3.mlp.fc1.weight"])


def test_presets_compose_and_build() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        small = compose(overrides=["+backbone=gmoe_vit_32px"]).backbone
        paper = compose(overrides=["+backbone=gmoe_deit_small"]).backbone
        custom = compose(
            overrides=["+backbone=gmoe", "backbone.name=test_vit", "backbone.moe_blocks=[1,3]"]
        ).backbone
    assert (paper.arch, paper.name, paper.pretrained, paper.moe_blocks) == (
        "gmoe",
        "deit_small_patch16_224.fb_in1k",
        True,
        None,
    )
    assert (paper.num_experts, paper.top_k, paper.capacity_factor, paper.kwargs.drop_path_rate) == (
        6,
        1,
        1.5,
        0.1,
    )
    assert small.kwargs.img_size == 32 and small.kwargs.drop_path_rate == 0.1 and not small.pretrained
    small_feat = build_backbone(small)
    assert small_feat.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 64)
    assert small_feat.model.blocks[5].drop_path2.drop_prob == pytest.approx(0.1)  # linear over depth
    feat = build_backbone(custom)
    assert [isinstance(b.mlp, SparseMoE) for b in feat.model.blocks] == [
        False,
        True,
        False,
        True,
        False,
        False,
    ]
