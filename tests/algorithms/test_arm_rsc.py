"""ARM and RSC (dgbench.algorithms.arm / rsc) against hand computations.

ARM runs on a tiny conv featurizer (a 1×1 conv, average pooling) and on small_cnn / timm's
test_resnet for the stem surgery; RSC on a linear featurizer, re-derived in float64 with NumPy's
percentile (DomainBed's `np.percentile`) and the closed-form gradient of a linear head.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.algorithms.arm import ARM, ARMHParams, stem_conv, support_sizes
from dgbench.algorithms.rsc import RSC, RSCHParams, feature_keep_mask, sample_keep_mask
from dgbench.backbones import Featurizer, build_backbone
from dgbench.errors import ConfigError
from dgbench.hparams import Uniform, search_space
from dgbench.registry import ALGORITHMS

IN, HIDDEN, CLASSES, DOMAINS, LR, PX = 5, 10, 3, 3, 1e-2, 4


def conv_featurizer() -> Featurizer:
    """A 1×1 conv on the 3 image channels, then global average pooling: HIDDEN features."""
    return Featurizer(nn.Sequential(nn.Conv2d(3, HIDDEN, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()), HIDDEN)


def make_arm(seed: int = 0, backbone: nn.Module | None = None, **hparams) -> ARM:
    torch.manual_seed(seed)
    cfg = ARMHParams(**{"name": "arm", "lr": LR, "batch_size": 4, **hparams})
    algorithm = ARM(backbone or conv_featurizer(), CLASSES, DOMAINS, cfg)
    algorithm.train()
    return algorithm


def image_batches(sizes=(4, 4, 4), seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, PX, PX, generator=g) + d, torch.randint(0, CLASSES, (n,), generator=g))
        for d, n in enumerate(sizes)
    ]


def first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


class Capture:
    """Records a module's output (forward hook) or first input (forward pre-hook), per call."""

    def __init__(self, module: nn.Module, inputs: bool = False) -> None:
        self.values: list[Tensor] = []
        if inputs:
            module.register_forward_pre_hook(lambda m, args: self.values.append(args[0].detach().clone()))
        else:
            module.register_forward_hook(lambda m, args, out: self.values.append(out.detach().clone()))


def hand_support_mean(context: Tensor, sizes: list[int]) -> Tensor:
    """Float64 mean of each run of `sizes` rows, written as a loop over rows."""
    context = context.double()
    out = torch.empty_like(context)
    start = 0
    for n in sizes:
        total = torch.zeros_like(context[0])
        for i in range(start, start + n):
            total += context[i]
        out[start : start + n] = total / n
        start += n
    return out


# --- ARM ------------------------------------------------------------------------------------------


@pytest.mark.algorithm("arm")
def test_arm_registration_and_domainbed_hparams():
    assert ALGORITHMS.get("arm").obj is ARM
    cfg = ARMHParams()
    assert cfg.batch_size == 8 and "batch_size" not in search_space(ARMHParams)  # DomainBed: lambda r: 8
    assert cfg.train_context is True
    assert ARMHParams.dataset_defaults["rotated_mnist"] == {"batch_size": 64}
    assert ARM.paper.endswith("arXiv:2007.02931") and ARM.reference.endswith("algorithms.py:ARM")


@pytest.mark.algorithm("arm")
@pytest.mark.parametrize(
    "backbone", [{"arch": "small_cnn", "width": 0.25}, {"arch": "timm", "name": "test_resnet"}]
)
def test_arm_widened_stem_keeps_the_original_conv(backbone):
    """Channels 0-2 keep their weights (zero context: the original network), channel 3 copies
    channel 0 (DomainBed's i mod 3 rule for its pretrained ResNet stem)."""
    torch.manual_seed(0)
    original = build_backbone(backbone).eval()
    before = stem_conv(original).weight.detach().clone()
    algorithm = make_arm(backbone=copy.deepcopy(original))
    algorithm.eval()
    stem = first_conv(algorithm.featurizer)
    assert stem.in_channels == 4 and stem.weight.shape[1] == 4
    assert torch.equal(stem.weight[:, :3], before) and torch.equal(stem.weight[:, 3], before[:, 0])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        widened = algorithm.featurizer(torch.cat([x, torch.zeros(2, 1, 16, 16)], dim=1))
        torch.testing.assert_close(widened, original(x), rtol=0, atol=1e-6)


@pytest.mark.algorithm("arm")
@pytest.mark.parametrize("sizes", [(4, 4, 4), (3, 5, 4)])
def test_arm_training_context_is_the_mean_over_each_domain_batch(sizes):
    algorithm = make_arm()
    contexts = Capture(algorithm.context_net)
    inputs = Capture(algorithm.featurizer, inputs=True)
    batches = image_batches(sizes)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    reference = copy.deepcopy(algorithm)  # the weights of the step, for the logged loss

    metrics = algorithm.update(batches)

    (context,), (seen,) = contexts.values, inputs.values
    assert context.shape == (len(x), 1, PX, PX) and seen.shape == (len(x), 4, PX, PX)
    assert torch.equal(seen[:, :3], x)
    torch.testing.assert_close(
        seen[:, 3:].double(), hand_support_mean(context, list(sizes)), rtol=0, atol=1e-6
    )
    if len(set(sizes)) == 1:  # DomainBed's reshape by support_size = batch_size, written out
        n = sizes[0]
        domainbed = context.reshape(len(sizes), n, 1, PX, PX).mean(1).repeat_interleave(n, dim=0)
        torch.testing.assert_close(seen[:, 3:], domainbed)
    with torch.no_grad():
        logits = reference.classifier(reference.featurizer(seen))
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)


@pytest.mark.algorithm("arm")
def test_arm_predict_uses_domainbeds_support_sets():
    """A batch that is a multiple of batch_size is cut into independent support sets; any other
    batch is one support set, whose context is the mean over all its images."""
    algorithm = make_arm()
    algorithm.update(image_batches())
    algorithm.eval()
    x = torch.randn(8, 3, PX, PX, generator=torch.Generator().manual_seed(3))
    assert support_sizes(8, 4) == [4, 4] and support_sizes(6, 4) == [6] and support_sizes(256, 8) == [8] * 32
    with torch.no_grad():
        full = algorithm.predict(x)
        torch.testing.assert_close(full[:4], algorithm.predict(x[:4]))  # sets of 4 are independent
        torch.testing.assert_close(full[4:], algorithm.predict(x[4:]))
        changed = x.clone()
        changed[5] += 1.0
        assert torch.equal(algorithm.predict(changed)[:4], full[:4])

        contexts = Capture(algorithm.context_net)
        inputs = Capture(algorithm.featurizer, inputs=True)
        algorithm.predict(x[:6])  # 6 % 4 != 0: one support set of 6
    torch.testing.assert_close(
        inputs.values[0][:, 3:].double(), hand_support_mean(contexts.values[0], [6]), rtol=0, atol=1e-6
    )


@pytest.mark.algorithm("arm")
@pytest.mark.parametrize("train_context", [True, False])
def test_arm_context_network_is_trained_unless_domainbed_mode(train_context):
    algorithm = make_arm(train_context=train_context)
    weights = {k: v.clone() for k, v in algorithm.context_net.state_dict().items()}
    stem = first_conv(algorithm.featurizer).weight.detach().clone()
    algorithm.update(image_batches())
    after = algorithm.context_net.state_dict()
    conv_moved = not torch.equal(after["0.weight"], weights["0.weight"])
    assert conv_moved is train_context
    assert not torch.equal(after["1.running_mean"], weights["1.running_mean"])  # BN statistics update
    assert not torch.equal(first_conv(algorithm.featurizer).weight, stem)
    optimized = {id(p) for g in algorithm.optimizer.param_groups for p in g["params"]}
    assert all((id(p) in optimized) is train_context for p in algorithm.context_net.parameters())


@pytest.mark.algorithm("arm")
def test_arm_refuses_a_backbone_without_a_conv_stem():
    with pytest.raises(ConfigError, match=r"first nn\.Conv2d"):
        ARM(Featurizer(nn.Linear(IN, HIDDEN), HIDDEN), CLASSES, DOMAINS, ARMHParams(name="arm"))


# --- RSC ------------------------------------------------------------------------------------------


def make_rsc(seed: int = 0, **hparams) -> RSC:
    torch.manual_seed(seed)
    cfg = RSCHParams(**{"name": "rsc", "lr": LR, **hparams})
    algorithm = RSC(Featurizer(nn.Linear(IN, HIDDEN), HIDDEN), CLASSES, DOMAINS, cfg)
    algorithm.train()
    return algorithm


def vector_batches(sizes=(6, 6, 6), seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, IN, generator=g) + d, torch.randint(0, CLASSES, (n,), generator=g))
        for d, n in enumerate(sizes)
    ]


def hand_rsc(algorithm: RSC, batches, f: float, b: float) -> dict[str, np.ndarray | float | Tensor]:
    """DomainBed's RSC step re-derived in float64: masks, losses and parameter gradients."""
    params = {k: v.detach().double().requires_grad_() for k, v in algorithm.named_parameters()}
    w1, b1 = params["featurizer.model.weight"], params["featurizer.model.bias"]
    w2, b2 = params["classifier.1.weight"], params["classifier.1.bias"]
    x = torch.cat([x for x, _ in batches]).double()
    y = torch.cat([y for _, y in batches])
    z = x @ w1.T + b1
    zn, w2n, b2n, yn = z.detach().numpy(), w2.detach().numpy(), b2.detach().numpy(), y.numpy()

    def p_true(features: np.ndarray) -> np.ndarray:
        logits = features @ w2n.T + b2n
        e = np.exp(logits - logits.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True))[np.arange(len(yn)), yn]

    g = w2n[yn].astype(np.float32)  # ∂ logit_y / ∂ z of a linear head (fp32, as in DomainBed)
    keep_f = g < np.percentile(g, (1 - f) * 100, axis=1)[:, None]
    drop = p_true(zn) - p_true(zn * keep_f)
    keep_b = drop < np.percentile(drop, (1 - b) * 100)
    keep = keep_f | keep_b[:, None]
    rsc_loss = F.cross_entropy((z * torch.from_numpy(keep)) @ w2.T + b2, y)
    grads = dict(zip(params, torch.autograd.grad(rsc_loss, list(params.values())), strict=True))
    loss = float(F.cross_entropy(z @ w2.T + b2, y).detach())
    return {
        "keep_f": keep_f,
        "keep_b": keep_b,
        "keep": keep,
        "rsc_loss": float(rsc_loss.detach()),
        "loss": loss,
        "grads": grads,
    }


def head_inputs(algorithm: RSC) -> Capture:
    """Inputs of the linear head: z, z ⊙ m_f and z ⊙ m, in that order."""
    return Capture(algorithm.classifier[1], inputs=True)


@pytest.mark.algorithm("rsc")
def test_rsc_registration_and_domainbed_hparams():
    assert ALGORITHMS.get("rsc").obj is RSC
    cfg = RSCHParams()
    assert cfg.rsc_f_drop_factor == pytest.approx(1 / 3) and cfg.rsc_b_drop_factor == pytest.approx(1 / 3)
    space = search_space(RSCHParams)
    assert space["rsc_f_drop_factor"] == Uniform(0, 0.5) and space["rsc_b_drop_factor"] == Uniform(0, 0.5)
    assert RSC.paper.endswith("arXiv:2007.02454") and RSC.reference.endswith("algorithms.py:RSC")
    with pytest.raises(ConfigError, match="rsc_b_drop_factor"):
        make_rsc(rsc_b_drop_factor=1.5)


@pytest.mark.algorithm("rsc")
def test_rsc_masks_match_numpys_percentile():
    g = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(0))
    for f in (0.3, 1 / 3, 0.45):  # 1/3: rank (1 − f)·9 = 6 is an entry, muted by `<` on fp32 data
        expected = g.numpy() < np.percentile(g.numpy(), (1 - f) * 100, axis=1)[:, None]
        assert np.array_equal(feature_keep_mask(g, f).numpy(), expected)
    # The top f fraction of each row is muted: with 10 distinct entries, f = 0.3 mutes 3 per row.
    assert (~feature_keep_mask(g, 0.3)).sum(1).tolist() == [3] * 7
    assert (~feature_keep_mask(g, 0.0)).sum(1).tolist() == [1] * 7  # f = 0: the max is still muted
    assert not feature_keep_mask(g, 1.0).any()

    drop = torch.randn(18, generator=torch.Generator().manual_seed(1))
    for b in (1 / 3, 0.2):
        expected = drop.double().numpy() < np.percentile(drop.double().numpy(), (1 - b) * 100)
        assert np.array_equal(sample_keep_mask(drop, b)[:, 0].numpy(), expected)
    challenged = ~sample_keep_mask(drop, 1 / 3)[:, 0]
    assert challenged.sum() == 6 and set(torch.topk(drop, 6).indices.tolist()) == set(
        challenged.nonzero()[:, 0].tolist()
    )


@pytest.mark.algorithm("rsc")
@pytest.mark.parametrize(("f", "b"), [(0.3, 1 / 3), (0.45, 0.2)])
def test_rsc_step_matches_a_float64_derivation(f, b):
    algorithm = make_rsc(rsc_f_drop_factor=f, rsc_b_drop_factor=b)
    batches = vector_batches()
    hand = hand_rsc(algorithm, batches, f, b)
    seen = head_inputs(algorithm)

    metrics = algorithm.update(batches)

    z, z_f, z_m = seen.values
    assert torch.equal(z_f == z, torch.from_numpy(hand["keep_f"]))
    assert torch.equal(z_m == z, torch.from_numpy(hand["keep"]))
    challenged = ~hand["keep_b"]
    assert 0 < challenged.sum() < len(challenged)
    # Exactly the challenged samples are masked; their mask is the feature mask.
    assert (z_m == z)[torch.from_numpy(~challenged)].all()
    assert torch.equal((z_m == z)[torch.from_numpy(challenged)], torch.from_numpy(hand["keep_f"][challenged]))
    assert metrics["rsc_loss"] == pytest.approx(hand["rsc_loss"], rel=1e-5)
    assert metrics["loss"] == pytest.approx(hand["loss"], rel=1e-5)
    assert metrics["challenged"] == pytest.approx(challenged.mean())
    for name, p in algorithm.named_parameters():
        torch.testing.assert_close(p.grad.double(), hand["grads"][name], rtol=1e-5, atol=1e-6)


@pytest.mark.algorithm("rsc")
def test_rsc_zero_drop_factors_still_mute_one_feature_of_one_sample():
    """DomainBed's `<` against the 100th percentile (the max): f = b = 0 is not ERM."""
    algorithm = make_rsc(rsc_f_drop_factor=0.0, rsc_b_drop_factor=0.0)
    batches = vector_batches()
    hand = hand_rsc(algorithm, batches, 0.0, 0.0)
    seen = head_inputs(algorithm)
    algorithm.update(batches)
    z, _, z_m = seen.values
    muted = (z_m != z).nonzero().tolist()
    assert len(muted) == 1 and np.array_equal(z_m == z, hand["keep"])
    (row, col) = muted[0]
    w2 = algorithm.classifier[1].weight  # (after the step; the muted index was chosen before it)
    assert hand["keep_b"].tolist().count(False) == 1 and not hand["keep_b"][row]
    assert not hand["keep_f"][row, col] and hand["keep_f"][row].sum() == w2.shape[1] - 1


@pytest.mark.algorithm("rsc")
def test_rsc_applies_dropout_once_per_step():
    """As DomainBed's featurizer dropout: the masked head inputs are the same dropped features."""
    algorithm = make_rsc(dropout=0.5)
    seen = head_inputs(algorithm)
    algorithm.update(vector_batches())
    z, z_f, z_m = seen.values
    assert (z == 0).any()  # dropout acted
    for masked in (z_f, z_m):
        assert ((masked == z) | (masked == 0)).all()
