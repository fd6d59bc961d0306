"""Fish (dgbench.algorithms.fish) against the invariants of reference/algorithms.md §2.5.

Tiny CPU models: an MLP featurizer with BatchNorm1d (so buffers, including the integer
`num_batches_tracked`, take part in the meta update) and a linear head, on random data.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.algorithms.fish import Fish, FishHParams
from dgbench.backbones import Featurizer
from dgbench.checkpoint import load_checkpoint, save_checkpoint
from dgbench.hparams import Choice, search_space
from dgbench.registry import ALGORITHMS

pytestmark = pytest.mark.algorithm("fish")

IN, HIDDEN, CLASSES, DOMAINS = 6, 8, 3, 3
BN = "featurizer.model.2."  # the BatchNorm1d layer


def make_fish(seed: int = 0, bn: bool = True, **hparams) -> Fish:
    torch.manual_seed(seed)
    # BatchNorm after the ReLU: a bias right before BatchNorm has a zero gradient, whose rounding
    # noise Adam would blow up to ±lr steps and make exact comparisons ill-conditioned.
    layers: list[nn.Module] = [nn.Linear(IN, HIDDEN), nn.ReLU()]
    if bn:
        layers.append(nn.BatchNorm1d(HIDDEN))
    backbone = Featurizer(nn.Sequential(*layers), HIDDEN)
    cfg = FishHParams(name="fish", **{"lr": 1e-2, **hparams})
    fish = Fish(backbone, CLASSES, DOMAINS, cfg)
    fish.train()
    return fish


def make_batches(steps: int, seed: int = 1, sizes: tuple[int, ...] = (4, 5, 6)) -> list[list[tuple]]:
    """`steps` lists of one (x, y) per domain; domains differ in size and input shift."""
    g = torch.Generator().manual_seed(seed)
    return [
        [
            (torch.randn(n, IN, generator=g) + d, torch.randint(0, CLASSES, (n,), generator=g))
            for d, n in enumerate(sizes)
        ]
        for _ in range(steps)
    ]


def state(fish: Fish) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in fish.state_dict().items()}


def network_keys(fish: Fish) -> list[str]:
    return [k for k in fish.state_dict() if k.startswith(("featurizer.", "classifier."))]


def set_meta_lr(fish: Fish, meta_lr: float) -> None:
    fish.cfg = dataclasses.replace(fish.cfg, meta_lr=meta_lr)


def inner_step_count(fish: Fish) -> int:
    steps = {int(s["step"]) for s in fish.inner_optimizer.state.values()}
    assert len(steps) == 1
    return steps.pop()


def test_registered_with_domainbed_hparams():
    entry = ALGORITHMS.get("fish")
    assert entry.obj is Fish and entry.config is FishHParams
    cfg = FishHParams()
    assert cfg.meta_lr == 0.5 and cfg.shuffle_domains is False
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.dropout) == (5e-5, 0.0, 32, 0.0)
    space = search_space(FishHParams)
    assert space["meta_lr"] == Choice([0.05, 0.1, 0.5]) and "shuffle_domains" not in space


def test_meta_lr_one_is_sequential_per_domain_adam_with_persistent_state():
    """ε = 1: θ_new = θ̃, so Fish is S consecutive Adam steps, one per domain batch, on one
    model, with one Adam whose state persists across iterations (DomainBed reloads it)."""
    fish = make_fish(meta_lr=1.0)
    reference = nn.Sequential(copy.deepcopy(fish.featurizer), copy.deepcopy(fish.classifier))
    adam = torch.optim.Adam(reference.parameters(), lr=fish.cfg.lr, weight_decay=fish.cfg.weight_decay)
    for batches in make_batches(3):
        metrics = fish.update(batches)
        losses = []
        for x, y in batches:
            loss = F.cross_entropy(reference(x), y)
            adam.zero_grad()
            loss.backward()
            adam.step()
            losses.append(loss.item())
        assert metrics["loss"] == pytest.approx(losses[-1], rel=1e-5)  # DomainBed logs the last domain
        assert metrics["inner_loss_mean"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    ours = {k: v for k, v in fish.state_dict().items() if k in network_keys(fish)}
    theirs = {"featurizer." + k: v for k, v in reference[0].state_dict().items()}
    theirs |= {"classifier." + k: v for k, v in reference[1].state_dict().items()}
    assert ours.keys() == theirs.keys()
    for key in ours:  # θ + 1·(θ̃ − θ) equals θ̃ up to one rounding
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-6, msg=key)
    assert inner_step_count(fish) == 3 * DOMAINS


def test_meta_lr_zero_leaves_parameters_and_buffers_but_advances_inner_adam():
    fish = make_fish(meta_lr=0.0)
    before = state(fish)
    for batches in make_batches(2):
        fish.update(batches)
    after = fish.state_dict()
    for key in network_keys(fish):
        assert torch.equal(after[key], before[key]), key
    assert inner_step_count(fish) == 2 * DOMAINS
    assert all(s["exp_avg"].abs().sum() > 0 for s in fish.inner_optimizer.state.values())


@pytest.mark.parametrize("meta_lr", [0.05, 0.1, 0.5, 0.73])
def test_interpolation_identity_parameters_and_buffers(meta_lr):
    """θ_new − θ = ε(θ̃ − θ) entrywise, with θ̃ from the same inner loop run on a copy (ε = 1).
    Holds for BatchNorm running statistics too; num_batches_tracked is computed in floating
    point and truncated, as DomainBed's ParamDict + load_state_dict do."""
    fish = make_fish(meta_lr=meta_lr)
    batches = make_batches(3)
    fish.update(batches[0])  # non-trivial Adam state and running statistics first
    twin = copy.deepcopy(fish)
    set_meta_lr(twin, 1.0)
    theta = state(fish)
    fish.update(batches[1])
    twin.update(batches[1])
    new, inner = fish.state_dict(), twin.state_dict()
    keys = network_keys(fish)
    assert any("running_mean" in k for k in keys) and any("num_batches_tracked" in k for k in keys)
    for key in keys:
        t, t_inner = theta[key], inner[key]
        if t.is_floating_point():
            assert not torch.equal(t_inner, t), key  # the inner loop moved every entry
            expected = t + meta_lr * (t_inner - t)
            assert torch.equal(new[key], expected), key
        else:
            assert int(t_inner - t) == DOMAINS  # one train-mode BatchNorm pass per domain
            assert int(new[key]) == int(t + meta_lr * (t_inner - t)), key  # truncated toward zero


def test_batchnorm_statistics_follow_the_meta_rule():
    """Running stats of θ̃ come from S train-mode passes; θ's move a fraction ε towards them."""
    meta_lr = 0.5
    fish = make_fish(meta_lr=meta_lr)
    twin = copy.deepcopy(fish)
    set_meta_lr(twin, 1.0)
    batches = make_batches(1)[0]
    fish.update(batches)
    twin.update(batches)
    bn_key = BN + "running_mean"
    initial = torch.zeros(HIDDEN)
    assert not torch.equal(twin.state_dict()[bn_key], initial)
    torch.testing.assert_close(fish.state_dict()[bn_key], meta_lr * twin.state_dict()[bn_key])
    assert int(fish.state_dict()[BN + "num_batches_tracked"]) == int(meta_lr * DOMAINS)  # 1


def test_one_domain_with_sgd_inner_is_sgd_with_lr_eps_alpha():
    alpha, meta_lr = 0.1, 0.3
    fish = make_fish(bn=False, meta_lr=meta_lr)
    fish.inner_optimizer = torch.optim.SGD(fish.parameters(), lr=alpha)
    ((x, y),) = batch = [make_batches(1)[0][0]]
    params = [p.detach().clone() for p in fish.parameters()]
    grads = torch.autograd.grad(F.cross_entropy(fish.predict(x), y), list(fish.parameters()))
    fish.update(batch)
    for p, p0, g in zip(fish.parameters(), params, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - meta_lr * alpha * g)


def test_two_domains_with_sgd_inner_follow_the_domain_order():
    """θ₁ = θ − α∇L₁(θ), θ̃ = θ₁ − α∇L₂(θ₁), θ_new = θ + ε(θ̃ − θ); reversing the order differs."""
    alpha, meta_lr = 0.5, 0.5
    batches = make_batches(1, sizes=(5, 7))[0]

    def expected(order: list[int]) -> list[Tensor]:
        model = make_fish(bn=False)
        params = list(model.parameters())
        theta = [p.detach().clone() for p in params]
        for i in order:
            x, y = batches[i]
            grads = torch.autograd.grad(F.cross_entropy(model.predict(x), y), params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p -= alpha * g
        return [t + meta_lr * (p.detach() - t) for t, p in zip(theta, params, strict=True)]

    fish = make_fish(bn=False, meta_lr=meta_lr)
    fish.inner_optimizer = torch.optim.SGD(fish.parameters(), lr=alpha)
    fish.update(batches)
    ours, forward, backward = list(fish.parameters()), expected([0, 1]), expected([1, 0])
    for p, e in zip(ours, forward, strict=True):
        torch.testing.assert_close(p.detach(), e)
    assert any(not torch.allclose(f, b, atol=1e-6) for f, b in zip(forward, backward, strict=True))


def record_inputs(fish: Fish) -> list[Tensor]:
    seen: list[Tensor] = []
    fish.featurizer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    return seen


def test_each_inner_step_sees_exactly_one_domain_in_environment_order():
    fish = make_fish()
    seen = record_inputs(fish)
    batches = make_batches(1)[0]
    fish.update(batches)
    assert len(seen) == DOMAINS
    for x_seen, (x, _) in zip(seen, batches, strict=True):
        assert x_seen is x


def test_no_outer_optimizer_and_the_inner_one_is_checkpointed():
    fish = make_fish()
    assert list(fish.optimizers()) == ["inner_optimizer"]
    assert not hasattr(fish, "optimizer")
    optimized = {id(p) for group in fish.inner_optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in fish.parameters()}
    # state_dict holds θ and the two counters, no inner copy of the network
    extra = set(fish.state_dict()) - set(network_keys(fish))
    assert extra == {"update_count", "order_seed"}
    fish.update(make_batches(1)[0])
    assert int(fish.update_count) == 1
    saved = fish.optimizer_state()["inner_optimizer"]
    assert {int(s["step"]) for s in saved["state"].values()} == {DOMAINS}


def test_shuffle_domains_permutes_deterministically():
    batches = make_batches(12)

    def orders(fish: Fish) -> list[list[int]]:
        seen = record_inputs(fish)
        result = []
        for step in batches:
            seen.clear()
            fish.update(step)
            ids = [id(x) for x, _ in step]
            result.append([ids.index(id(x)) for x in seen])
        return result

    fixed = orders(make_fish())
    assert fixed == [[0, 1, 2]] * len(batches)
    shuffled = orders(make_fish(shuffle_domains=True))
    assert all(sorted(order) == [0, 1, 2] for order in shuffled)
    assert len({tuple(order) for order in shuffled}) > 1
    assert orders(make_fish(shuffle_domains=True)) == shuffled  # same seed, same orders
    assert orders(make_fish(seed=5, shuffle_domains=True)) != shuffled  # order_seed follows the run seed
    probe = make_fish(shuffle_domains=True)
    rng = torch.get_rng_state()
    assert probe.domain_order(3) == probe.domain_order(3) == shuffled[0]  # a function of the counters
    assert torch.equal(torch.get_rng_state(), rng)  # draws nothing from the global RNG


@pytest.mark.parametrize("shuffle", [False, True])
def test_exact_resume_from_checkpoint(tmp_path, shuffle):
    batches = make_batches(5)
    straight = make_fish(shuffle_domains=shuffle, dropout=0.5)  # dropout: the RNGs are restored too
    for step in batches:
        straight.update(step)

    first = make_fish(shuffle_domains=shuffle, dropout=0.5)
    for step in batches[:2]:
        first.update(step)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, first, step=1)
    torch.manual_seed(1234)  # scramble the RNGs: the checkpoint must restore them
    resumed = make_fish(seed=99, shuffle_domains=shuffle, dropout=0.5)
    assert load_checkpoint(path, resumed, torch.device("cpu")) == 1
    for step in batches[2:]:
        resumed.update(step)

    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    a, b = straight.optimizer_state()["inner_optimizer"], resumed.optimizer_state()["inner_optimizer"]
    for index, entry in a["state"].items():
        for name, value in entry.items():
            assert torch.equal(b["state"][index][name], value), (index, name)


def test_device_or_dtype_change_reallocates_the_snapshot():
    fish = make_fish(meta_lr=0.0)
    fish.update(make_batches(1)[0])
    fish.double()
    fish.inner_optimizer = fish.make_optimizer()  # Adam state cannot change dtype; the snapshot can
    before = state(fish)
    fish.update([(x.double(), y) for x, y in make_batches(1, seed=3)[0]])
    assert all(t.dtype == torch.float64 for t in fish._theta if t.is_floating_point())
    for key in network_keys(fish):
        assert torch.equal(fish.state_dict()[key], before[key]), key
