"""The embedded dataset: deterministic, cached atomically, balanced, and visibly multi-domain."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from dgbench.data import embedded
from dgbench.data.embedded import CLASSES, DOMAINS, EmbeddedConfig, build_embedded
from dgbench.registry import DATASETS

SMALL = 60  # images per domain: enough for every class, fast to render


def _build(root: Path, **kw: object) -> embedded.EmbeddedDataset:
    return build_embedded(EmbeddedConfig(root=str(root), images_per_domain=kw.pop("n", SMALL), **kw))


def _arrays(ds: embedded.EmbeddedDataset) -> list[np.ndarray]:
    return [d.arrays for d in ds.domain_data]


def test_same_seed_is_bit_identical_and_other_seed_differs(tmp_path: Path) -> None:
    a = _build(tmp_path / "a", seed=3)
    b = _build(tmp_path / "b", seed=3)
    c = _build(tmp_path / "c", seed=4)
    for x, y, z in zip(_arrays(a), _arrays(b), _arrays(c), strict=True):
        assert np.array_equal(x, y)
        assert not np.array_equal(x, z)
    ((cache_a,), (cache_b,)) = ((tmp_path / r / "embedded").glob("*.npz") for r in "ab")
    assert cache_a.name == cache_b.name and cache_a.read_bytes() == cache_b.read_bytes()


def test_second_build_loads_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _build(tmp_path)
    (cache,) = (tmp_path / "embedded").glob("embedded-*.npz")
    assert cache == embedded.cache_path(
        tmp_path, embedded.generation_params(EmbeddedConfig(images_per_domain=SMALL))
    )
    assert not list((tmp_path / "embedded").glob("*.tmp"))  # the temp file was renamed, not left behind

    def boom(params: dict) -> None:
        raise AssertionError("regenerated despite a valid cache")

    monkeypatch.setattr(embedded, "generate", boom)
    second = _build(tmp_path)
    for x, y in zip(_arrays(first), _arrays(second), strict=True):
        assert np.array_equal(x, y)


def test_cache_key_covers_generation_params(tmp_path: Path) -> None:
    base = embedded.generation_params(EmbeddedConfig())
    paths = {embedded.cache_path(tmp_path, {**base, k: v}) for k, v in [("seed", 1), ("resolution", 28)]}
    assert len(paths | {embedded.cache_path(tmp_path, base)}) == 3


def test_interrupted_write_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed while writing the cache leaves neither a torn cache nor a temp file."""

    def killed_midway(handle: object, **arrays: object) -> None:
        handle.write(b"PK\x03\x04 half an archive")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(embedded.np, "savez", killed_midway)
        with pytest.raises(KeyboardInterrupt):
            _build(tmp_path)
    assert list((tmp_path / "embedded").iterdir()) == []
    assert len(_build(tmp_path)[0]) == SMALL and len(list((tmp_path / "embedded").iterdir())) == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape"])
def test_corrupt_cache_is_rebuilt_with_a_warning(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = _arrays(_build(tmp_path))
    (cache,) = (tmp_path / "embedded").glob("embedded-*.npz")
    if damage == "garbage":
        cache.write_bytes(b"not an npz file")
    elif damage == "truncated":
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    else:
        np.savez(cache, **{f"{d}_{k}": np.zeros(3, np.int64) for d in DOMAINS for k in ("images", "labels")})
    with caplog.at_level(logging.WARNING, logger=embedded.__name__):
        rebuilt = _arrays(_build(tmp_path))
    assert "unreadable cache" in caplog.text
    assert all(np.array_equal(x, y) for x, y in zip(good, rebuilt, strict=True))
    embedded._load(cache, embedded.generation_params(EmbeddedConfig(images_per_domain=SMALL)))  # valid again


def test_shapes_dtypes_labels_and_ids(tmp_path: Path) -> None:
    ds = _build(tmp_path, resolution=24)
    assert ds.domains == list(DOMAINS) and ds.classes == sorted(CLASSES) and ds.resolution == 24
    for dom in ds.domain_data:
        assert dom.arrays.shape == (SMALL, 24, 24, 3) and dom.arrays.dtype == np.uint8
        assert dom.labels.dtype == np.int64 and dom.labels.min() == 0 and dom.labels.max() == len(CLASSES) - 1
        image, label = dom[7]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (24, 24)
        assert label == dom.labels[7] and dom.ids[7].startswith(CLASSES[label] + "/")
        assert len(set(dom.ids)) == len(dom) and dom.ids[0] == f"{CLASSES[0]}/00000"


def test_every_class_in_every_domain_balanced(tmp_path: Path) -> None:
    ds = _build(tmp_path, n=63)
    for dom in ds.domain_data:
        counts = np.bincount(dom.labels, minlength=len(CLASSES))
        assert counts.max() - counts.min() <= 1 and counts.sum() == 63


def _stats(x: np.ndarray) -> dict[str, float]:
    """Per-domain image statistics that the four styles are designed to move apart."""
    rgb = x.astype(np.float64) / 255
    grey = rgb.mean(-1)
    step = np.abs(np.diff(grey, axis=2))  # horizontal neighbour differences
    return {
        "chroma": float((rgb.max(-1) - rgb.min(-1)).mean()),  # colourfulness: ~0 for greyscale
        "brightness": float(grey.mean()),
        "texture": float(step.mean()),  # mean local contrast (texture, noise, lines)
        "hard_edges": float((step > 0.25).mean()),  # share of crisp edges (outlines, flat fills)
    }


def test_domains_differ_in_statistics(tmp_path: Path) -> None:
    """Measured on seed 0, 120 images (photo, painting, cartoon, sketch): chroma .23/.27/.23/.04,
    brightness .48/.47/.40/.69, texture .042/.020/.121/.150, hard_edges .02/.01/.20/.25."""
    s = {d.name: _stats(d.arrays) for d in _build(tmp_path, n=120).domain_data}
    photo, painting, cartoon, sketch = (s[d] for d in DOMAINS)
    assert sketch["chroma"] < 0.08 < 0.18 < min(photo["chroma"], painting["chroma"], cartoon["chroma"])
    brightest_other = max(photo["brightness"], painting["brightness"], cartoon["brightness"])
    assert sketch["brightness"] > brightest_other + 0.15  # pale paper
    assert painting["texture"] < 0.7 * photo["texture"] < 0.7 * cartoon["texture"]
    assert cartoon["hard_edges"] > 3 * photo["hard_edges"] > 3 * painting["hard_edges"]
    assert sketch["hard_edges"] > 2 * photo["hard_edges"]


def test_registry_builds_from_a_dictconfig(tmp_path: Path) -> None:
    entry = DATASETS.get("embedded")
    assert entry.config is EmbeddedConfig
    cfg = OmegaConf.structured(EmbeddedConfig(root=str(tmp_path), images_per_domain=SMALL, resolution=16))
    ds = entry.obj(cfg)
    assert ds.name == "embedded" and len(ds) == 4 and ds.num_classes == len(CLASSES)
    assert ds[0].arrays.shape == (SMALL, 16, 16, 3) and ds.resolve_test_envs(["sketch"]) == [3]
