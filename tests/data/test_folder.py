"""Folder datasets: ImageFolder order, manifests, layout errors, and the real PACS when present."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from dgbench.data.folder import (
    FolderConfig,
    FolderDataset,
    FolderDomain,
    build_folder_dataset,
    domain_counts,
    domain_names,
    list_class_files,
    load_manifest,
    manifest_data_file,
    protocol_defaults,
)
from dgbench.errors import ConfigError, DataError
from dgbench.registry import DATASETS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def write_files(root: Path, relpaths: list[str]) -> None:
    """Tiny real images for image suffixes (any case), plain text for anything else."""
    for rel in relpaths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(suffix, suffix[1:].upper())
            Image.new("L", (4, 3), color=len(rel)).save(path, format=fmt)
        else:
            path.write_text("not an image")


def make_dataset(tmp_path: Path, name: str = "fake") -> tuple[Path, dict]:
    """`<tmp>/Fake/{d0,d1}/{cat,dog}/...` and its manifest."""
    write_files(
        tmp_path / "Fake",
        ["d0/cat/1.png", "d0/cat/2.png", "d0/dog/1.png", "d1/cat/a.jpg", "d1/dog/b.png", "d1/dog/c.png"],
    )
    manifest = {
        "name": name,
        "dir": "Fake",
        "domains": ["d0", "d1"],
        "classes": ["cat", "dog"],
        "counts": {"d0": 3, "d1": 3},
        "resolution": 32,
        "steps": 11,
        "checkpoint_freq": 5,
    }
    return tmp_path, manifest


def build(root: Path, manifest: dict) -> FolderDataset:
    return build_folder_dataset({"name": manifest["name"], "root": str(root)}, manifest)


# ------------------------------------------------------------------- ordering


TRICKY_FILES = [
    "k/a.png", "k/B.png", "k/_x.png", "k/-y.png", "k/Z.JPG", "k/c.jpeg", "k/notes.txt", "k/noext",
    "k/a/m.png", "k/a-b/n.png", "k/a/c/o.png", "k/Q/p.bmp",
]  # fmt: skip
# Code-point order: '-' < upper case < '_' < lower case; top-level files first, then directories
# by their whole path string, so `a-b/` precedes `a/c/` ('-' < '/'). No .txt, no extension-less file.
TRICKY_ORDER = [
    "k/-y.png", "k/B.png", "k/Z.JPG", "k/_x.png", "k/a.png", "k/c.jpeg",
    "k/Q/p.bmp", "k/a/m.png", "k/a-b/n.png", "k/a/c/o.png",
]  # fmt: skip


def test_imagefolder_file_order(tmp_path: Path) -> None:
    write_files(tmp_path, TRICKY_FILES)
    assert list_class_files(tmp_path, "k") == TRICKY_ORDER


def test_order_and_labels_match_torchvision_imagefolder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("torchvision.datasets")
    classes = ["Zebra", "_under", "ant", "ant-x", "ant_y"]  # already in code-point order
    write_files(tmp_path, [f.replace("k/", f"{c}/", 1) for c in classes for f in TRICKY_FILES])
    domain = FolderDomain(tmp_path)
    reference = datasets.ImageFolder(str(tmp_path))
    assert domain.classes == reference.classes == classes
    assert domain.ids == [os.path.relpath(p, tmp_path).replace(os.sep, "/") for p, _ in reference.samples]
    assert domain.labels.tolist() == reference.targets
    assert domain.labels.dtype == np.int64


def test_dataset_from_manifest(tmp_path: Path) -> None:
    root, manifest = make_dataset(tmp_path)
    ds = build(root, manifest)
    assert (ds.name, ds.domains, ds.classes, ds.num_classes) == ("fake", ["d0", "d1"], ["cat", "dog"], 2)
    assert (ds.resolution, ds.steps, ds.checkpoint_freq) == (32, 11, 5)
    assert ds[1].ids == ["cat/a.jpg", "dog/b.png", "dog/c.png"]
    assert ds[1].labels.tolist() == [0, 1, 1]
    assert ds[1].paths[2] == str(root / "Fake" / "d1" / "dog" / "c.png")
    image, label = ds[0][2]
    assert (image.mode, image.size, label) == ("RGB", (4, 3), 1)


def test_builder_accepts_dataclass_config_yaml_manifest_and_env_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = make_dataset(tmp_path)
    path = tmp_path / "fake.yaml"
    path.write_text("name: fake\ndir: Fake\ndomains: [d0, d1]\n")  # no classes: first domain's folders
    monkeypatch.setenv("DGBENCH_DATA", str(root))
    ds = build_folder_dataset(FolderConfig(name="fake"), path)
    assert ds.classes == ["cat", "dog"] and [len(d) for d in ds] == [3, 3]
    assert ds.steps == 5001  # protocol default when the manifest is silent


def test_manifest_variants(tmp_path: Path) -> None:
    """Domains as `{name, label}` entries and nested `counts.per_domain` (datasets.md proposal)."""
    root, manifest = make_dataset(tmp_path)
    manifest["domains"] = [{"name": "d0", "label": "A"}, {"name": "d1", "label": "B"}]
    manifest["counts"] = {"total": 6, "per_domain": {"d0": 3, "d1": 3}}
    assert build(root, OmegaConf.create(manifest)).domains == ["d0", "d1"]


def test_registered_manifests() -> None:
    """Every manifest is a registered folder dataset; names and orders as DomainBed (datasets.md)."""
    names = ("pacs", "vlcs", "domainnet", "officehome", "terra_incognita")
    assert set(names) <= set(DATASETS.names())
    assert DATASETS.get("pacs").config is FolderConfig
    pacs, vlcs, dnet, office, terra = (load_manifest(n) for n in names)
    assert pacs["dir"] == "PACS" and pacs["classes"][::3] == ["dog", "guitar", "person"]
    assert (
        pacs["counts"]["total"] == sum(domain_counts(pacs).values()) == 9991
        and pacs["checkpoint_freq"] == 300
    )
    for m in (pacs, vlcs):  # per-class tables add up to the per-domain counts
        assert {d: sum(c.values()) for d, c in m["counts"]["per_class"].items()} == domain_counts(m)
    assert domain_names(vlcs) == ["Caltech101", "LabelMe", "SUN09", "VOC2007"]
    assert sum(domain_counts(vlcs).values()) == 10729
    assert dnet["dir"] == "domain_net" and len(dnet["classes"]) == 345 and dnet["checkpoint_freq"] == 1000
    assert dnet["classes"][:3] == ["The_Eiffel_Tower", "The_Great_Wall_of_China", "The_Mona_Lisa"]
    assert protocol_defaults(dnet, "swad") == {"steps": 15001, "checkpoint_freq": 500}
    assert protocol_defaults(dnet, "default") == {"steps": 5001, "checkpoint_freq": 1000}
    bare = {k: v for k, v in dnet.items() if k not in ("steps", "checkpoint_freq", "protocols")}
    assert protocol_defaults(bare, "default") == {"steps": 5001, "checkpoint_freq": 100}  # DomainBed's
    assert protocol_defaults({**bare, "steps": 300}, "swad") == {"steps": 300, "checkpoint_freq": 100}
    assert domain_names(office)[-1] == "Real World" and len(office["classes"]) == 65
    assert office["classes"].index("TV") < office["classes"].index("Table")
    assert domain_names(terra)[:2] == ["location_100", "location_38"] and terra["allow_missing_classes"]
    assert sum(domain_counts(terra).values()) == 24788


def test_missing_class_folder_allowed_when_the_manifest_says_so(tmp_path: Path) -> None:
    """TerraIncognita-style: global class ids; a domain without a class keeps the other labels."""
    root, manifest = make_dataset(tmp_path)
    manifest["classes"] = ["bird", "cat", "dog"]
    manifest["counts"] = {}
    (root / "Fake" / "d0" / "bird").mkdir()
    write_files(root / "Fake", ["d0/bird/x.png"])
    with pytest.raises(DataError, match="d1 lacks class folder"):
        build(root, manifest)
    manifest["allow_missing_classes"] = True
    ds = build(root, manifest)
    assert ds[0].labels.tolist() == [0, 1, 1, 2] and ds[1].labels.tolist() == [1, 2, 2]


# ------------------------------------------------------------------- errors


def test_missing_dataset_dir_says_how_to_get_it(tmp_path: Path) -> None:
    _, manifest = make_dataset(tmp_path / "elsewhere")
    with pytest.raises(DataError) as err:
        build(tmp_path, manifest)
    message = str(err.value)
    assert str(tmp_path / "Fake") in message
    assert f"dgbench data download fake --root {tmp_path}" in message
    assert "dataset.root=" in message and "DGBENCH_DATA" in message


def test_missing_domain_dir(tmp_path: Path) -> None:
    root, manifest = make_dataset(tmp_path)
    manifest["domains"] = ["d0", "d1", "d2"]
    with pytest.raises(DataError, match=r"domain folder\(s\) missing: d2"):
        build(root, manifest)


def test_extra_dir_is_an_error_but_extra_files_are_not(tmp_path: Path) -> None:
    root, manifest = make_dataset(tmp_path)
    (root / "Fake" / "README.txt").write_text("ignored, as DomainBed ignores files")
    build(root, manifest)
    (root / "Fake" / "__MACOSX").mkdir()
    with pytest.raises(DataError, match=r"unexpected folder\(s\): __MACOSX.*shift every env index"):
        build(root, manifest)


@pytest.mark.parametrize(("change", "expected"), [
    ("rm d1/dog", r"d1 lacks class folder\(s\) dog"),
    ("add d0/cow", r"d0 has unexpected class folder\(s\) cow"),
])  # fmt: skip
def test_class_folders_must_match(tmp_path: Path, change: str, expected: str) -> None:
    root, manifest = make_dataset(tmp_path)
    op, rel = change.split()
    if op == "rm":
        for f in (root / "Fake" / rel).iterdir():
            f.unlink()
        (root / "Fake" / rel).rmdir()
    else:
        write_files(root / "Fake", [f"{rel}/x.png"])
    with pytest.raises(DataError, match=expected):
        build(root, manifest)


def test_no_class_folders_at_all(tmp_path: Path) -> None:
    root, manifest = make_dataset(tmp_path)
    del manifest["classes"]
    for rel in ("d0/cat", "d0/dog"):
        for f in (root / "Fake" / rel).iterdir():
            f.rename(root / "Fake" / "d0" / f"{rel[3:]}{f.name}")
        (root / "Fake" / rel).rmdir()
    with pytest.raises(DataError, match="no class folders in"):
        build(root, manifest)


def test_class_folder_without_images(tmp_path: Path) -> None:
    root, manifest = make_dataset(tmp_path)
    (root / "Fake" / "d1" / "cat" / "a.jpg").rename(root / "Fake" / "d1" / "cat" / "a.txt")
    with pytest.raises(DataError, match="no image files in d1/cat"):
        build(root, manifest)


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    root, manifest = make_dataset(tmp_path)
    bad = root / "Fake" / "d0" / "dog" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = build(root, manifest)  # indexing never opens images
    with pytest.raises(DataError) as err:
        ds[0][2]
    message = str(err.value)
    assert str(bad) in message and "re-download" in message and "delete" in message
    assert "\n" not in message


def test_count_mismatch_warns(tmp_path: Path) -> None:
    root, manifest = make_dataset(tmp_path)
    manifest["counts"] = {"d0": 4}
    with pytest.warns(UserWarning, match=r"d0 3 \(expected 4\).*splits will not match"):
        build(root, manifest)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("domains", ["d1", "d0"], "Python sort order"),
    ("classes", ["dog", "cat"], "Python sort order"),
    ("classes", ["cat", True], "non-empty string"),
    ("domains", ["d0", "d0"], "twice"),
    ("dir", None, "'dir'"),
    ("counts", {"d0": "3"}, "integers"),
    ("counts", {"d2": 3}, "unknown domain"),
])  # fmt: skip
def test_bad_manifest(tmp_path: Path, key: str, value: object, expected: str) -> None:
    root, manifest = make_dataset(tmp_path)
    manifest[key] = value
    with pytest.raises(DataError, match=expected):
        build(root, manifest)


def test_unknown_manifest_name() -> None:
    with pytest.raises(ConfigError, match=r"no manifest for dataset 'nope'.*known: .*pacs"):
        load_manifest("nope")


def test_invalid_yaml_manifest(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(DataError, match="not valid YAML"):
        load_manifest(path)


# ------------------------------------------------------------------- real PACS


def test_real_pacs(pacs_dir: Path) -> None:
    path = pacs_dir
    ds = FolderDataset(path, "pacs")
    assert ds.domains == ["art_painting", "cartoon", "photo", "sketch"]
    assert [len(d) for d in ds] == [2048, 2344, 1670, 3929]
    relpaths = [f"{d.name}/{i}" for d in ds for i in d.ids]
    # sha256 of the sorted path list (datasets.md §4.3); for PACS, ImageFolder order is sorted order.
    assert relpaths == sorted(relpaths)
    digest = hashlib.sha256("\n".join(relpaths).encode("utf-8")).hexdigest()
    assert digest == "35f53f0142797cb55c67cd8854e6e8c8d3dc8a76b976cc89c31b82a4439fa373"
    assert np.bincount(ds[3].labels).tolist() == [772, 740, 753, 608, 816, 80, 160]
    image, label = ds[3][ds[3].ids.index("dog/n02103406_4068-1.png")]  # the PNG Dassl skips
    assert (image.mode, image.size, label) == ("RGB", (227, 227), 0)


def test_second_build_reads_the_cached_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dataset indexes through the cache: a second start walks nothing, a new file is seen."""
    import dgbench.data.index_cache as index_cache

    monkeypatch.setenv("DGBENCH_CACHE", str(tmp_path / "cache"))
    root, manifest = make_dataset(tmp_path)
    first = build(root, manifest)

    def no_walk(*args: object) -> list[str]:
        raise AssertionError("walked the tree although the index is cached")

    with monkeypatch.context() as patch:
        patch.setattr(index_cache, "list_class_files", no_walk)
        second = build(root, manifest)
    assert [d.ids for d in second] == [d.ids for d in first]
    assert [d.labels.tolist() for d in second] == [d.labels.tolist() for d in first]
    write_files(root / "Fake", ["d1/cat/z.png"])  # changes d1/cat's mtime, so the key
    manifest["counts"] = {}
    assert build(root, manifest)[1].ids == ["cat/a.jpg", "cat/z.png", "dog/b.png", "dog/c.png"]


def test_manifest_data_files_are_intact_and_agree_with_the_counts() -> None:
    """Vendored lists hash to the values the manifests record; their contents match the counts."""
    dnet, vlcs, pacs = (load_manifest(n) for n in ("domainnet", "vlcs", "pacs"))
    duplicates = manifest_data_file(dnet, "domainnet_duplicates.txt").read_bytes()
    assert hashlib.sha256(duplicates).hexdigest() == dnet["verify"]["duplicates_list_sha256"]
    listed = Counter(line.split("/")[0] for line in duplicates.decode().splitlines())
    # DomainBed deletes these from the original zips: original - listed = cleaned (clipart unresolved)
    originals = dnet["counts"]["original_per_domain"]
    for domain, cleaned in domain_counts(dnet).items():
        assert originals[domain] - listed[domain] == cleaned, domain

    (source,) = [s for s in vlcs["sources"] if s["id"] == "from-source"]
    files = manifest_data_file(vlcs, source["file_list"]).read_bytes()
    assert hashlib.sha256(files).hexdigest() == source["file_list_sha256"]
    per_class = Counter(tuple(line.split()[1].split("/")[1:3]) for line in files.decode().splitlines())
    assert {f"{d}/{c}": n for (d, c), n in per_class.items()} == {
        f"{d}/{c}": n for d, row in vlcs["counts"]["per_class"].items() for c, n in row.items()
    }

    checksums = manifest_data_file(pacs, pacs["verify"]["per_file_sha256"]).read_text().splitlines()
    paths = [line.split("  ", 1)[1] for line in checksums]
    assert len(paths) == 9991
    assert (
        hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest() == pacs["verify"]["relpath_list_sha256"]
    )
