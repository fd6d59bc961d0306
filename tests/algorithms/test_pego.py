"""PEGO invariants (reference/algorithms.md §7.5) on timm `test_vit` at 32 px, CPU, random init."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from dgbench.algorithms.pego import PEGO, PEGOHParams
from dgbench.backbones import build_backbone
from dgbench.backbones.lora import LoRAGroupQKV, orthogonality_terms
from dgbench.config import apply_dataset_defaults
from dgbench.errors import ConfigError
from dgbench.hparams import search_space
from dgbench.registry import ALGORITHMS

pytestmark = pytest.mark.algorithm("pego")

NUM_CLASSES = 5
PAPER_VIT = {k: v for k, v in PEGO.backbone_need.paper.items() if k != "pretrained"}  # no download


def build(seed: int = 0, **hparams) -> PEGO:
    torch.manual_seed(seed)
    backbone = build_backbone(dict(PEGO.backbone_need.small))
    return PEGO(backbone, NUM_CLASSES, 2, PEGOHParams(name="pego", **hparams)).train()


def batches(seed: int = 0, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g))
        for _ in range(2)
    ]


def lora_names(algorithm: PEGO) -> list[str]:
    return [n for n, _ in algorithm.named_parameters() if ".lora_" in n]


def test_registered_with_reference_hparams():
    assert ALGORITHMS.get("pego").obj is PEGO and ALGORITHMS.get("pego").config is PEGOHParams
    cfg = PEGOHParams()
    assert (cfg.num_lora, cfg.rank, cfg.ortho_weight, cfg.lr, cfg.weight_decay, cfg.batch_size) == (
        4,
        4,
        1e-3,
        5e-4,
        0.0,
        32,
    )
    assert cfg.merge_for_eval is True
    assert set(search_space(PEGOHParams)) == {"lr", "ortho_weight", "batch_size", "dropout"}


def test_pacs_uses_two_modules_unless_overridden():
    assert PEGOHParams.dataset_defaults == {"pacs": {"num_lora": 2}}
    cfg = OmegaConf.create({"algorithm": {"name": "pego", "num_lora": 4}, "dataset": {"name": "pacs"}})
    assert apply_dataset_defaults(cfg) == {"algorithm.num_lora": 2} and cfg.algorithm.num_lora == 2
    cfg.algorithm.num_lora = 3
    assert apply_dataset_defaults(cfg, ["algorithm.num_lora=3"]) == {} and cfg.algorithm.num_lora == 3
    cfg.dataset.name = "vlcs"
    assert apply_dataset_defaults(cfg) == {} and cfg.algorithm.num_lora == 3


def test_output_at_init_is_frozen_backbone_plus_head():
    algorithm = build()
    torch.manual_seed(0)
    plain = build_backbone(dict(PEGO.backbone_need.small))  # same seed: the same ViT weights
    x = torch.cat([x for x, _ in batches()])
    assert torch.equal(algorithm.predict(x), algorithm.classifier(plain(x)))


def test_only_lora_and_head_train():
    algorithm = build()
    trainable = {n for n, p in algorithm.named_parameters() if p.requires_grad}
    assert trainable == set(lora_names(algorithm)) | {"classifier.1.weight", "classifier.1.bias"}
    optimized = {id(p) for g in algorithm.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in algorithm.parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in algorithm.named_parameters()}
    for step in range(3):
        algorithm.update(batches(step))
    for name, p in algorithm.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert p.grad is None and torch.equal(p, before[name]), f"frozen {name} changed"


def test_update_minimises_ce_plus_weighted_regularizer():
    algorithm = build(ortho_weight=0.5)
    algorithm.update(batches(0))
    algorithm.update(batches(1))  # now B ≠ 0, so the regulariser is active
    reference = copy.deepcopy(algorithm)
    algorithm.optimizer.step = lambda *args, **kwargs: None  # keep the gradients of this step
    metrics = algorithm.update(batches(2))

    x = torch.cat([x for x, _ in batches(2)])
    y = torch.cat([y for _, y in batches(2)])
    ce = F.cross_entropy(reference.predict(x), y)
    preserve, diversify = orthogonality_terms(reference.lora_layers)
    (ce + 0.5 * (preserve + diversify)).backward()
    assert metrics["loss"] == pytest.approx(ce.item(), rel=1e-6)
    assert metrics["ortho_preserve"] == pytest.approx(preserve.item(), rel=1e-6) and preserve.item() > 0
    assert metrics["ortho_diversify"] == pytest.approx(diversify.item(), rel=1e-6) and diversify.item() > 0
    assert metrics["ortho_loss"] == pytest.approx(0.5 * (preserve + diversify).item(), rel=1e-6)
    for (name, p), q in zip(algorithm.named_parameters(), reference.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_eval_merged_predictions_match_unmerged_and_are_not_stale():
    algorithm = build()
    x = torch.cat([x for x, _ in batches(5)])
    for step in range(2):
        algorithm.update(batches(step))
        algorithm.eval()
        keys = set(algorithm.state_dict())
        with torch.no_grad():
            merged = algorithm.predict(x)
        assert all(layer._merged is not None for layer in algorithm.lora_layers)
        assert set(algorithm.state_dict()) == keys  # the merged weights are no checkpoint state
        with torch.enable_grad():
            unmerged = algorithm.predict(x).detach()
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)  # measured ≤ 2e-6
        algorithm.train()


def test_vit_b_trainable_parameter_count_matches_the_reference():
    dim, rank, blocks, num_classes = 768, 4, 12, 7
    for num_lora, expected in ((4, 589_824), (2, 294_912)):
        backbone = build_backbone(PAPER_VIT)
        total = sum(p.numel() for p in backbone.parameters())
        algorithm = PEGO(backbone, num_classes, 3, PEGOHParams(name="pego", num_lora=num_lora))
        lora = sum(p.numel() for n, p in algorithm.named_parameters() if ".lora_" in n)
        assert lora == blocks * num_lora * 2 * 2 * dim * rank == expected
        head = 512 * num_classes + num_classes
        assert sum(p.numel() for p in algorithm.parameters() if p.requires_grad) == lora + head
        assert sum(p.numel() for p in algorithm.parameters()) == total + lora + head
        layers = [m for m in algorithm.modules() if isinstance(m, LoRAGroupQKV)]
        assert len(layers) == blocks and all(m.targets == ("q", "v") for m in layers)


@pytest.mark.parametrize(
    "backbone",
    [{"arch": "small_cnn"}, {"arch": "timm", "name": "resnet18", "pretrained": False}],
    ids=["small_cnn", "timm_resnet18"],
)
def test_incompatible_backbone_is_refused_with_the_ones_that_fit(backbone):
    with pytest.raises(ConfigError) as error:
        PEGO(build_backbone(backbone), NUM_CLASSES, 2, PEGOHParams(name="pego"))
    message = str(error.value)
    assert "algorithm=pego" in message and "fused qkv" in message
    assert "vit_base_patch16_clip_quickgelu_224.openai" in message and "test_vit" in message
