"""`dgbench data`: verify, split, list, info and download end to end (real PACS when present)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dgbench.data import commands, folder
from dgbench.data.folder import load_manifest
from dgbench.data.verify import format_report, verify_dataset

# datasets.md §3.1: per (domain, trial): first five shuffled keys and sha256 of the sorted out paths.
PACS_VECTORS = {
    ("art_painting", 0): ([548, 677, 1997, 977, 1553], "6cfacc39ddb10d89887296bd14ee9ad460ebcad9d8f3a93ca9d721ea88be33bb"),  # noqa: E501
    ("art_painting", 1): ([1394, 1699, 1095, 19, 1757], "b1e74a20a9bf42aabd7fe537c6b631a09728763d805e83890ccca028133dfd13"),  # noqa: E501
    ("art_painting", 2): ([388, 1649, 941, 375, 1008], "87f8103fe8f7a702bc0411460e2ded6b9c66046fcffad04766df0ac0aa6ac9ec"),  # noqa: E501
    ("cartoon", 0): ([1488, 562, 461, 570, 2092], "73240f70c0dc1f1eec33178b44ef38a7b3577d3e8cb709dfdbf1b92b16b8b3fe"),  # noqa: E501
    ("cartoon", 1): ([2104, 1634, 329, 1581, 977], "5cad3267b034e3bc83d1c0d2309ec8dc4745c98079de4ce2a66788e7cd57456f"),  # noqa: E501
    ("cartoon", 2): ([655, 1275, 780, 1832, 1409], "6eb340bc5d3c17750724b3f17da244967bbd173292f4e943d4ac998954661534"),  # noqa: E501
    ("photo", 0): ([1441, 1432, 282, 669, 637], "8017dde3c81a678bacd085874e21e5b9faf049881a0d25dfd9075c226e2df59f"),  # noqa: E501
    ("photo", 1): ([1114, 1350, 1111, 1182, 826], "11907b7fcaf21a94d1ec45fbf828fa167679869e67ff1d17ee62fecd870f0fab"),  # noqa: E501
    ("photo", 2): ([969, 244, 626, 1517, 1645], "0d01f2dd5c33972783b16e7856ddb9b85d3270eacf0ec5ed72a8b39dba83dfdb"),  # noqa: E501
    ("sketch", 0): ([2743, 2083, 2744, 3449, 1159], "9eddc416a0592900e52bb7258ca9db878391ea41a656c00f1847c3b2ce009887"),  # noqa: E501
    ("sketch", 1): ([2181, 1642, 2965, 3408, 1653], "13364f73f123a82bbccb087e1d5a3644474831e93ad092d9ad7990091425429e"),  # noqa: E501
    ("sketch", 2): ([3714, 1165, 1672, 1675, 3541], "b8aee2bd02ccfbf186b40024f3f6728849dc4fbd4aae506d4fdbeb15a332e752"),  # noqa: E501
}  # fmt: skip


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = commands.main(list(argv))
    return status, capsys.readouterr().out


def domainbed_out_split(relpaths: list[str], trial_seed: int, env_i: int, fraction: float = 0.2) -> list[str]:
    """DomainBed's procedure written out independently: md5 seed_hash, shuffle of a Python list."""
    seed = int(hashlib.md5(str((trial_seed, env_i)).encode("utf-8")).hexdigest(), 16) % 2**31
    keys = list(range(len(relpaths)))
    np.random.RandomState(seed).shuffle(keys)
    return [relpaths[k] for k in keys[: int(len(relpaths) * fraction)]]


# ------------------------------------------------------------------- real PACS


def test_verify_real_pacs_with_checksums(pacs_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = run(capsys, "verify", "pacs", "--root", str(pacs_dir.parent), "--checksums")
    assert status == 0 and out.rstrip().endswith("OK")
    for domain, count in (("art_painting", 2048), ("cartoon", 2344), ("photo", 1670), ("sketch", 3929)):
        assert re.search(rf"\n  {domain} +{count:,} images in 7 classes \(expected {count:,}\)\n", out)
    assert re.search(r"\n  total +9,991 images \(expected 9,991\)\n", out)
    assert "checksums: 9,991 files hashed, 0 mismatched, 0 missing, 0 extra" in out


def _linked_copy(source: Path, target: Path) -> None:
    """A copy of the tree that costs no disk where hard links work (files are replaced, never edited)."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)


def test_verify_names_exactly_the_corrupt_missing_and_extra_files(pacs_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "PACS"
    _linked_copy(pacs_dir, copy)
    victim = copy / "photo" / "dog" / "056_0001.jpg"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.unlink()  # a new file: the hard-linked original stays intact
    victim.write_bytes(bytes(data))
    manifest = load_manifest("pacs")
    report = verify_dataset(manifest, copy, checksums=True)
    assert [f.split(":")[0] for f in report.corrupt_files] == ["photo/dog/056_0001.jpg"]
    assert report.hashed == 9991 and not report.problems and not report.ok

    (copy / "sketch" / "house" / "8801.png").unlink()
    shutil.copy(copy / "cartoon" / "dog" / "pic_001.jpg", copy / "cartoon" / "dog" / "zz_extra.jpg")
    report = verify_dataset(manifest, copy, checksums=True)
    assert report.missing_files == ["sketch/house/8801.png"]
    assert report.extra_files == ["cartoon/dog/zz_extra.jpg"]
    assert "sketch: 3928 images, expected 3929" in report.problems
    assert "sketch/house: 79 images, expected 80" in report.problems
    text = format_report(report, manifest)
    assert "missing: sketch/house/8801.png" in text and text.endswith("FAILED")


@pytest.mark.parametrize("trial_seed", [0, 1, 2])
def test_split_file_lists_equal_domainbeds(
    pacs_dir: Path, capsys: pytest.CaptureFixture[str], trial_seed: int
) -> None:
    status, out = run(
        capsys, "split", "pacs", "--root", str(pacs_dir.parent), "--trial-seed", str(trial_seed)
    )
    assert status == 0
    splits = json.loads(out)
    dataset = folder.FolderDataset(pacs_dir, "pacs")
    assert list(splits) == dataset.domains
    for env_i, domain in enumerate(dataset):
        keys, digest = PACS_VECTORS[domain.name, trial_seed]
        out_ids = splits[domain.name]
        assert out_ids[:5] == [domain.ids[k] for k in keys]
        assert (
            hashlib.sha256("\n".join(sorted(f"{domain.name}/{i}" for i in out_ids)).encode()).hexdigest()
            == digest
        )
        assert out_ids == domainbed_out_split(list(domain.ids), trial_seed, env_i)


def test_split_holdout_fraction_and_text_format(pacs_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("split", "pacs", "--root", str(pacs_dir.parent), "--holdout-fraction", "0.1", "--format", "text")
    status, out = run(capsys, *args)
    lines = out.split()
    assert status == 0 and len(lines) == 204 + 234 + 167 + 392
    assert lines[0].startswith("art_painting/") and lines[-1].startswith("sketch/")


# ------------------------------------------------------------------- list / info


def test_list_and_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "PACS" / "photo").mkdir(parents=True)
    status, out = run(capsys, "list", "--root", str(tmp_path))
    assert status == 0
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(rows) == {"pacs", "vlcs", "domainnet", "officehome", "terra_incognita"}
    assert "incomplete (missing art_painting, cartoon, sketch)" in rows["pacs"]
    assert "586,575  not downloaded" in rows["domainnet"]

    status, out = run(capsys, "info", "pacs")
    assert "  3  sketch           3,929 images" in out
    assert "fd5db817f7cdafeef3bfd525aaf9b42e" in out and "status: dead" in out
    assert "protocol=swad: steps 5001, checkpoint_freq 200" in out
    with pytest.raises(Exception, match="no manifest for dataset 'pcas'"):
        commands.main(["info", "pcas"])


# ------------------------------------------------------------------- download


def _fake_dataset_zip(path: Path, evil: bool = False) -> dict[str, int]:
    """A zip holding `top/<domain>/<class>/<n>.png`, as PACS.zip holds kfold/."""
    counts = {"d0": 3, "d1": 2}
    with zipfile.ZipFile(path, "w") as archive:
        for domain, n in counts.items():
            for i in range(n):
                buffer = io.BytesIO()
                Image.new("RGB", (4, 4), color=(i, 0, 0)).save(buffer, format="PNG")
                archive.writestr(f"top/{domain}/{'cat' if i % 2 else 'dog'}/{i}.png", buffer.getvalue())
        if evil:
            archive.writestr("../escaped.txt", "gotcha")
    return counts


def _install_manifest(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: dict) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    manifest = {
        "name": "fake",
        "dir": "Fake",
        "domains": ["d0", "d1"],
        "classes": ["cat", "dog"],
        "counts": {"per_domain": {"d0": 3, "d1": 2}},
        "sources": [source],
    }
    (manifests / "fake.yaml").write_text(yaml.safe_dump(manifest))
    monkeypatch.setattr(folder, "manifest_dir", lambda: manifests)


def _zip_source(archive: Path, **checks: object) -> dict:
    return {
        "id": "local",
        "kind": "http",
        "files": [{"url": archive.as_uri(), "name": "fake.zip", **checks}],
        "steps": [{"op": "extract", "archive": "fake.zip"}, {"op": "move", "from": "top", "to": "Fake"}],
    }


def test_download_verifies_then_installs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "served" / "fake.zip"
    archive.parent.mkdir()
    _fake_dataset_zip(archive)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    _install_manifest(monkeypatch, tmp_path, _zip_source(archive, sha256=digest))
    root = tmp_path / "data"
    status, out = run(capsys, "download", "fake", "--root", str(root))
    assert status == 0 and f"fake is ready at {root / 'Fake'}" in out
    status, out = run(capsys, "verify", "fake", "--root", str(root))
    assert status == 0 and re.search(r"\n  d0 +3 images in 2 classes \(expected 3\)\n", out)
    assert sorted(p.name for p in root.iterdir()) == ["Fake"]  # no staging or download leftovers


def test_download_with_wrong_checksum_extracts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "fake.zip"
    _fake_dataset_zip(archive)
    _install_manifest(monkeypatch, tmp_path, _zip_source(archive, sha256="0" * 64))
    root = tmp_path / "data"
    with pytest.raises(Exception, match="sha256") as error:
        commands.main(["download", "fake", "--root", str(root)])
    assert "0" * 64 in str(error.value)
    assert not (root / "Fake").exists() and not list(root.glob(".dgbench-staging-*/**/*.png"))


def test_download_rejects_an_archive_escaping_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "fake.zip"
    _fake_dataset_zip(archive, evil=True)
    _install_manifest(monkeypatch, tmp_path, _zip_source(archive))
    root = tmp_path / "data"
    with pytest.raises(Exception, match=r"\.\./escaped\.txt"):
        commands.main(["download", "fake", "--root", str(root)])
    assert not (root / "Fake").exists() and not list(tmp_path.rglob("escaped.txt"))


def test_download_refuses_a_build_that_does_not_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts are checked on the staged tree, before it is moved into place."""
    archive = tmp_path / "fake.zip"
    _fake_dataset_zip(archive)
    _install_manifest(monkeypatch, tmp_path, _zip_source(archive))
    manifest_file = tmp_path / "manifests" / "fake.yaml"
    manifest = yaml.safe_load(manifest_file.read_text())
    manifest["counts"]["per_domain"]["d0"] = 4
    manifest_file.write_text(yaml.safe_dump(manifest))
    root = tmp_path / "data"
    with pytest.raises(Exception, match="d0: 3 images, expected 4"):
        commands.main(["download", "fake", "--root", str(root)])
    assert not (root / "Fake").exists()
