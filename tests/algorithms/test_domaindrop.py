"""DomainDrop invariants (reference/algorithms.md §6.4) and the stage surgery, on tiny CPU models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dgbench.algorithms.domaindrop import DomainDrop, DomainDropHParams, symmetric_kl
from dgbench.backbones import Featurizer, build_backbone
from dgbench.backbones.stages import (
    apply_channel_mask,
    channel_scores,
    feature_stages,
    grad_reverse,
    has_feature_stages,
    stage_taps,
    weighted_channel_mask,
)
from dgbench.checkpoint import load_checkpoint, save_checkpoint
from dgbench.errors import ConfigError
from dgbench.hparams import search_space
from dgbench.registry import ALGORITHMS

pytestmark = pytest.mark.algorithm("domaindrop")

CLASSES, DOMAINS, PX = 3, 2, 8


class TwoStageCNN(nn.Module):
    """Stem (reduction 2, not a stage) and two conv stages, with timm's `feature_info` convention."""

    def __init__(self, flatten_last: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.Tanh())
        last: list[nn.Module] = [nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Tanh()]
        self.layer2 = nn.Sequential(*last, *([nn.Flatten(2)] if flatten_last else []))
        self.feature_info = [
            {"module": "stem", "num_chs": 4, "reduction": 2},
            {"module": "layer1", "num_chs": 6, "reduction": 4},
            {"module": "layer2", "num_chs": 8, "reduction": 4},
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer2(self.layer1(self.stem(x)))
        return out.mean(dim=(2, 3)) if out.ndim == 4 else out.mean(dim=2)


def _featurizer(**kw) -> Featurizer:
    return Featurizer(TwoStageCNN(**kw), 8, name="two_stage")


def _timm(name: str) -> Featurizer:
    return build_backbone({"arch": "timm", "name": name, "pretrained": False})


def _algorithm(seed: int = 0, backbone: Featurizer | None = None, **hp) -> DomainDrop:
    torch.manual_seed(seed)
    cfg = DomainDropHParams(name="domaindrop", **{"lr": 0.05, **hp})
    algorithm = DomainDrop(backbone or _featurizer(), CLASSES, DOMAINS, cfg)
    return algorithm.train()


def _batches(seed: int, n: int = 4, px: int = PX) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, px, px, generator=g), torch.randint(0, CLASSES, (n,), generator=g))
        for _ in range(DOMAINS)
    ]


def _pooled(batches):
    x = torch.cat([x for x, _ in batches])
    d = torch.cat([torch.full((len(y),), i) for i, (_, y) in enumerate(batches)])
    return x, torch.cat([y for _, y in batches]), d


def test_registered_with_reference_defaults():
    entry = ALGORITHMS.get("domaindrop")
    assert entry.obj is DomainDrop and entry.config is DomainDropHParams
    cfg = DomainDropHParams()
    assert (cfg.lr, cfg.weight_decay, cfg.optimizer, cfg.lr_decay_at) == (0.002, 5e-4, "sgd", 0.8)
    assert (cfg.drop_fraction, cfg.layer_prob, cfg.grl_lambda) == (0.33, 0.8, 0.25)
    assert (cfg.domain_weight, cfg.kl_weight, cfg.kl_temperature, cfg.stages) == (1.0, 1.5, 5.0, None)
    assert {"lr", "drop_fraction", "kl_weight"} <= set(search_space(DomainDropHParams))


def test_feature_stages_are_the_conv_stages_of_timm_cnns_only():
    stages = feature_stages(_timm("test_resnet"))
    assert [(s.name, s.channels) for s in stages] == [
        ("layer1", 32),
        ("layer2", 48),
        ("layer3", 192),
        ("layer4", 96),
    ]
    assert [s.name for s in feature_stages(_featurizer())] == ["layer1", "layer2"]  # stem skipped
    assert has_feature_stages(_timm("test_efficientnet"))
    assert not has_feature_stages(_timm("test_vit"))
    assert not has_feature_stages(build_backbone({"arch": "small_cnn", "width": 0.25}))
    with pytest.raises(ConfigError, match="test_vit"):
        feature_stages(_timm("test_vit"))


def test_stage_taps_route_outputs_only_inside_the_block():
    featurizer = _featurizer().eval()
    x = torch.randn(2, 3, PX, PX)
    plain = featurizer(x)
    seen = []

    def zero_second(i: int, f: torch.Tensor) -> torch.Tensor:
        seen.append((i, tuple(f.shape)))
        return torch.zeros_like(f) if i == 1 else f

    with stage_taps(featurizer, zero_second) as tapped:
        assert torch.equal(featurizer(x), torch.zeros_like(plain))
    assert [s.name for s in tapped] == ["layer1", "layer2"]
    assert seen == [(0, (2, 6, 2, 2)), (1, (2, 8, 2, 2))]
    assert not featurizer.model.layer1._forward_hooks and not featurizer.model.layer2._forward_hooks
    assert torch.equal(featurizer(x), plain)


def test_stage_tap_rejects_outputs_that_are_not_feature_maps():
    featurizer = _featurizer(flatten_last=True)
    with pytest.raises(ConfigError, match=r"two_stage.*layer2"), stage_taps(featurizer, lambda i, f: f):
        featurizer(torch.randn(2, 3, PX, PX))


def test_zero_drop_fraction_is_a_no_op():
    f = torch.randn(4, 6, 3, 3)
    mask = weighted_channel_mask(channel_scores(f, torch.randn(4, 6)), 0.0)
    assert torch.equal(mask, torch.ones(4, 6))
    assert torch.equal(apply_channel_mask(f, mask), f)

    algorithm = _algorithm(drop_fraction=0.0).eval()
    x, _, d = _pooled(_batches(0))
    for stage in (0, 1):
        logits, _ = algorithm.forward_train(x, d, drop_at=stage)
        assert torch.equal(logits, algorithm.predict(x))


def test_drops_exactly_floor_cp_channels_and_rescale_keeps_the_mean():
    scores = torch.rand(16, 64)
    for p in (0.1, 0.33, 0.5):
        mask = weighted_channel_mask(scores, p)
        assert ((mask == 0).sum(dim=1) == math.floor(64 * p)).all()
        ones = torch.ones(16, 64, 1, 1)
        assert torch.allclose(apply_channel_mask(ones, mask).mean(), torch.tensor(1.0))

    algorithm = _algorithm()
    f, d = torch.randn(5, 8, 2, 2), torch.tensor([0, 1, 0, 1, 1])
    dropped = algorithm.drop_channels(1, f, d)
    zero_channels = (dropped.abs().sum(dim=(2, 3)) == 0).sum(dim=1)
    assert (zero_channels == math.floor(8 * 0.33)).all()


def test_the_mask_uses_the_discriminator_row_of_each_sample_s_domain():
    algorithm = _algorithm(drop_fraction=1 / 8)  # one channel of 8
    with torch.no_grad():
        algorithm.discriminators[1].weight.copy_(torch.eye(8)[[2, 5]])  # domain 0 -> channel 2, 1 -> 5
    d = torch.tensor([0, 1, 1, 0])
    dropped = algorithm.drop_channels(1, torch.ones(4, 8, 2, 2), d)
    zero = dropped.abs().sum(dim=(2, 3)) == 0
    assert zero.sum(dim=1).tolist() == [1] * 4 and zero.float().argmax(dim=1).tolist() == [2, 5, 5, 2]


def test_discriminators_see_the_stage_map_before_its_drop():
    algorithm = _algorithm(drop_fraction=0.5).eval()
    x, _, d = _pooled(_batches(0))
    with torch.no_grad():
        _, clean = algorithm.forward_train(x, d, drop_at=None)
        logits, dropped = algorithm.forward_train(x, d, drop_at=0)
    assert torch.equal(dropped[0], clean[0])  # the dropping stage: its map before the drop
    assert not torch.equal(dropped[1], clean[1])  # later stages see the dropped input
    assert not torch.equal(logits, algorithm.predict(x))


def test_the_consistency_loss_compares_two_copies_of_the_batch():
    metrics = _algorithm(layer_prob=0.0).update(_batches(0))  # no drop: the copies agree exactly
    assert metrics["kl_loss"] == 0 and metrics["dropped_stage"] == -1
    metrics = _algorithm(layer_prob=1.0, drop_fraction=0.5).update(_batches(0))
    assert metrics["kl_loss"] > 0 and metrics["dropped_stage"] in (1, 2)


def test_lowest_score_is_never_dropped_and_equal_scores_drop_nothing():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2000, 10, generator=g)
    lowest = scores.argmin(dim=1, keepdim=True)
    mask = weighted_channel_mask(scores, 0.9, generator=g)  # 9 of 10 dropped: only the lowest may stay
    assert (mask.gather(1, lowest) == 1).all() and (mask.sum(dim=1) == 1).all()

    flat = torch.ones(3, 5, 2, 2)  # F ⊙ w equal across channels at every position: 0/0 scores
    scores = channel_scores(flat, torch.ones(3, 5))
    assert scores.isnan().all()
    assert torch.equal(weighted_channel_mask(scores, 0.5), torch.ones(3, 5))
    assert torch.equal(weighted_channel_mask(torch.full((3, 5), 0.7), 0.5), torch.ones(3, 5))


def test_drop_probability_follows_the_scores():
    g = torch.Generator().manual_seed(0)
    draws = 20000
    # one drop (⌊4·0.25⌋ = 1): Efraimidis–Spirakis picks channel c with probability s_c / Σs
    scores = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]).expand(draws, 4)
    frequency = (weighted_channel_mask(scores, 0.25, generator=g) == 0).float().mean(dim=0)
    assert torch.allclose(frequency, torch.tensor([0.0, 1 / 6, 2 / 6, 3 / 6]), atol=0.015)
    # three drops of ten: the highest-scoring channels are dropped far more often
    scores = torch.linspace(0, 1, 10).expand(draws, 10)
    frequency = (weighted_channel_mask(scores, 0.3, generator=g) == 0).float().mean(dim=0)
    assert (
        frequency[0] == 0
        and frequency[9] > 6 * frequency[1]
        and torch.isclose(frequency.sum(), torch.tensor(3.0))
    )
    assert (frequency[1:].diff() > 0).all()


def test_channel_scores_match_a_hand_computation():
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]], [[2.0, 4.0]]]])  # (1, 3, 1, 2)
    w = torch.tensor([[1.0, -1.0, 0.5]])
    # S per position: (1, -3, 1) and (2, 0, 2); channel min-max: (1, 0, 1) and (1, 0, 1)
    assert torch.allclose(channel_scores(f, w), torch.tensor([[1.0, 0.0, 1.0]]))
    f = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.5, 0.5]]]])
    # S (1, 0, 0.5) and (0, 1, 0.5) are already in [0, 1]; GAP (0.5, 0.5, 0.5) -> all equal -> NaN
    assert channel_scores(f, torch.ones(1, 3)).isnan().all()
    f = torch.tensor([[[[4.0]], [[2.0]], [[1.0]], [[0.0]]]])
    assert torch.allclose(channel_scores(f, torch.ones(4)), torch.tensor([[1.0, 0.5, 0.25, 0.0]]))
    f = torch.tensor([[[[10.0, 0.0]], [[0.0, 1.0]], [[5.0, 0.9]]]])
    # per position (1, 0, .5) and (0, 1, .9); GAP (.5, .5, .7); per sample (0, 0, 1)
    assert torch.allclose(channel_scores(f, torch.ones(3)), torch.tensor([[0.0, 0.0, 1.0]]))


def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward():
    x = torch.randn(3, 4, requires_grad=True)
    weight = torch.randn(3, 4)
    out = grad_reverse(x, 0.25)
    assert torch.equal(out, x)
    (plain,) = torch.autograd.grad((x * weight).sum(), x)
    (reversed_,) = torch.autograd.grad((grad_reverse(x, 0.25) * weight).sum(), x)
    assert torch.allclose(reversed_, -0.25 * plain)


def test_symmetric_kl_is_zero_on_equal_halves_symmetric_and_as_computed_by_hand():
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    assert symmetric_kl(a, a.clone(), 5.0) == 0
    assert torch.allclose(symmetric_kl(a, b, 5.0), symmetric_kl(b, a, 5.0))
    p, q = F.softmax(a / 5, dim=1), F.softmax(b / 5, dim=1)
    by_hand = ((p * (p / q).log()).sum() + (q * (q / p).log()).sum()) / (2 * a.numel())
    assert torch.allclose(symmetric_kl(a, b, 5.0), by_hand)


def test_with_everything_off_a_step_is_plain_sgd_on_cross_entropy():
    algorithm = _algorithm(drop_fraction=0.0, kl_weight=0.0, domain_weight=0.0, weight_decay=1e-2)
    network = nn.Sequential(copy.deepcopy(algorithm.featurizer), copy.deepcopy(algorithm.classifier))
    batches = _batches(0)
    x, y, _ = _pooled(batches)
    params = list(network.parameters())
    grads = torch.autograd.grad(F.cross_entropy(network(x), y), params)
    metrics = algorithm.update(batches)
    lr, wd, momentum = 0.05, 1e-2, 0.9
    # first nesterov step: buf = g + wd·θ, θ ← θ − lr·(g + wd·θ + momentum·buf)
    expected = [p - lr * (1 + momentum) * (g + wd * p) for p, g in zip(params, grads, strict=True)]
    mine = [*algorithm.featurizer.parameters(), *algorithm.classifier.parameters()]
    for got, want in zip(mine, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    assert metrics["kl_loss"] == 0 and metrics["loss"] == metrics["total_loss"]
    assert all(p.grad is None for p in algorithm.discriminators.parameters())


def test_eval_output_ignores_discriminators_and_rng():
    algorithm = _algorithm()
    algorithm.update(_batches(0))
    algorithm.eval()
    x = torch.randn(3, 3, PX, PX)
    with torch.no_grad():
        before = algorithm.predict(x)
        for p in algorithm.discriminators.parameters():
            p.normal_()
        torch.manual_seed(123)
        assert torch.equal(algorithm.predict(x), before)
        assert torch.equal(algorithm.classifier(algorithm.featurizer(x)), before)


def test_discriminators_learn_and_the_backbone_gets_the_reversed_domain_gradient():
    algorithm = _algorithm().eval()
    x, _, d = _pooled(_batches(0))
    backbone = [p for p in algorithm.featurizer.parameters()]

    _, domain_logits = algorithm.forward_train(x, d, drop_at=None)
    loss = torch.stack([F.cross_entropy(z, d) for z in domain_logits]).mean()
    grads = torch.autograd.grad(loss, [*backbone, *algorithm.discriminators.parameters()])
    reversed_, disc = grads[: len(backbone)], grads[len(backbone) :]
    assert all(g.abs().sum() > 0 for g in disc)

    features: list[torch.Tensor] = []  # the same losses without gradient reversal
    with stage_taps(algorithm.featurizer, lambda i, f: features.append(f) or f):
        algorithm.featurizer(x)
    plain_logits = [D(f.mean(dim=(2, 3))) for D, f in zip(algorithm.discriminators, features, strict=True)]
    loss = torch.stack([F.cross_entropy(z, d) for z in plain_logits]).mean()
    plain = torch.autograd.grad(loss, backbone)
    for r, p in zip(reversed_, plain, strict=True):
        assert torch.allclose(r, -0.25 * p, atol=1e-7)
    assert any(p.abs().sum() > 0 for p in plain)

    algorithm.train().update(_batches(1))
    assert all(p.grad.abs().sum() > 0 for p in algorithm.discriminators.parameters())


def test_lr_drops_tenfold_at_lr_decay_at_of_total_steps():
    algorithm = _algorithm()
    algorithm.total_steps = 10
    used = []
    for step in range(10):
        algorithm.update(_batches(step))
        used.append(algorithm.optimizer.param_groups[0]["lr"])
    assert used == [0.05] * 8 + [pytest.approx(0.005)] * 2
    assert int(algorithm.state_dict()["update_count"]) == 10

    adam = _algorithm(optimizer="adam", lr=1e-3)
    adam.total_steps = 2
    for step in range(3):
        adam.update(_batches(step))
    assert isinstance(adam.optimizer, torch.optim.Adam) and adam.optimizer.param_groups[0]["lr"] == 1e-3


def test_incompatible_backbones_and_bad_settings_raise_config_errors():
    with pytest.raises(ConfigError, match=r"domaindrop.*test_vit.*resnet18\.tv_in1k.*test_resnet"):
        _algorithm(backbone=_timm("test_vit"))
    with pytest.raises(ConfigError, match=r"algorithm\.stages.*1=layer1, 2=layer2"):
        _algorithm(stages=[3])
    with pytest.raises(ConfigError, match=r"algorithm\.optimizer"):
        _algorithm(optimizer="lamb")
    with pytest.raises(ConfigError, match=r"algorithm\.drop_fraction"):
        _algorithm(drop_fraction=1.0)
    assert _algorithm(stages=[2]).drop_stages == [1]


def test_timm_resnet_updates_and_resumes_bit_identically(tmp_path):
    steps = [_batches(i, n=3, px=16) for i in range(3)]
    original = _algorithm(backbone=_timm("test_resnet"), layer_prob=1.0)
    original.total_steps = 3  # the lr steps down before the last update
    metrics = original.update(steps[0])
    assert metrics["dropped_stage"] in (1, 2, 3, 4) and metrics["kl_loss"] > 0
    assert set(metrics) == {"loss", "total_loss", "domain_loss", "domain_acc", "kl_loss", "dropped_stage"}
    save_checkpoint(tmp_path / "checkpoint.pt", original, step=0)
    expected = [original.update(b) for b in steps[1:]]

    resumed = _algorithm(seed=1, backbone=_timm("test_resnet"), layer_prob=1.0)
    resumed.total_steps = 3
    load_checkpoint(tmp_path / "checkpoint.pt", resumed, torch.device("cpu"))
    assert [resumed.update(b) for b in steps[1:]] == expected
    for (name, a), b in zip(original.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
