"""File index cache: the same ids and labels as `list_class_files`, reused, invalidated, never fatal."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dgbench.data import index_cache
from dgbench.data.folder import list_class_files
from dgbench.data.index_cache import cache_dir, index_domains

DOMAINS = ["d0", "d1"]
CLASSES = ["Apple", "apple", "b", "b-c", "b_c"]  # Python sort order, as manifests require
FILES = [
    "d0/Apple/Z.JPG",  # upper-case extension: an image
    "d0/Apple/a.png",
    "d0/apple/.DS_Store",  # not an image
    "d0/apple/b.jpeg",
    "d0/b/z.png",
    "d0/b/notes.txt",
    "d0/b/s/1.png",  # walk order: b, b/s, b/s-t, b/s/t ('-' < '/')
    "d0/b/s/t/1.png",
    "d0/b/s-t/1.png",
    "d0/b-c/x_1.png",
    "d0/b-c/x-1.png",
    "d0/b_c/1.bmp",
    "d1/Apple/1.png",
    "d1/b/1.png",  # d1 lacks `apple`, `b-c` and `b_c`: those labels simply do not occur
]


def make_tree(root: Path, files: list[str] = FILES) -> Path:
    """Empty files (the index reads names only), with every folder mtime an hour old.

    Aged mtimes make "add a file" certain to change its folder's mtime, even where the file system
    clock is coarser than the time the test takes.
    """
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    old = time.time() - 3600
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        os.utime(folder, (old, old))
    return root


def expected(root: Path, domains: list[str] = DOMAINS, classes: list[str] = CLASSES) -> dict:
    """The uncached reference: `list_class_files` per class, labels by class position."""
    out = {}
    for d in domains:
        per_class = [list_class_files(root / d, c) for c in classes]
        labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(f) for f in per_class])
        out[d] = ([f for files in per_class for f in files], labels)
    return out


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for d in want:
        assert got[d][0] == want[d][0]
        assert got[d][1].dtype == np.int64
        np.testing.assert_array_equal(got[d][1], want[d][1])


def index(root: Path, version: str = "v1") -> dict:
    return index_domains(root, DOMAINS, CLASSES, version=version)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache root via $DGBENCH_CACHE; warnings about it are not deduplicated across tests."""
    path = tmp_path / "cache"
    monkeypatch.setenv("DGBENCH_CACHE", str(path))
    monkeypatch.setattr(index_cache, "_warned_dirs", set())
    return path


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every class folder the cache walks (a cache hit walks none)."""
    calls: list[str] = []

    def counting(domain_dir: str | os.PathLike, class_name: str) -> list[str]:
        calls.append(f"{Path(domain_dir).name}/{class_name}")
        return list_class_files(domain_dir, class_name)

    monkeypatch.setattr(index_cache, "list_class_files", counting)
    return calls


def cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "index").glob("*.npz"))


def test_cached_index_is_imagefolder_order(tmp_path: Path, cache: Path) -> None:
    root = make_tree(tmp_path / "data")
    want = expected(root)
    assert want["d0"][0][:2] == ["Apple/Z.JPG", "Apple/a.png"]
    assert want["d0"][0][4:7] == ["b/s/1.png", "b/s-t/1.png", "b/s/t/1.png"]
    assert want["d1"][1].tolist() == [0, 2]
    assert_same(index(root), want)  # built
    assert len(cache_files(cache)) == 1
    assert_same(index(root), want)  # loaded


def test_second_call_reads_the_cache(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tree(tmp_path / "data")
    first = index(root)

    def no_walk(*_: object) -> list[str]:
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(index_cache, "list_class_files", no_walk)
    assert_same(index(root), first)


def test_adding_a_file_invalidates(tmp_path: Path, cache: Path, walks: list[str]) -> None:
    root = make_tree(tmp_path / "data")
    index(root)
    (root / "d1" / "b" / "0.png").touch()
    walks.clear()
    got = index(root)
    assert walks, "stale cache used after a file was added"
    assert got["d1"][0] == ["Apple/1.png", "b/0.png", "b/1.png"]
    assert_same(got, expected(root))


def test_removing_a_class_folder_file_invalidates(tmp_path: Path, cache: Path) -> None:
    root = make_tree(tmp_path / "data")
    index(root)
    (root / "d0" / "b-c" / "x-1.png").unlink()
    assert "b-c/x-1.png" not in index(root)["d0"][0]


def test_other_version_misses(tmp_path: Path, cache: Path, walks: list[str]) -> None:
    root = make_tree(tmp_path / "data")
    index(root, "v1")
    walks.clear()
    assert_same(index(root, "v2"), expected(root))
    assert walks
    assert len(cache_files(cache)) == 2
    walks.clear()
    index(root, "v1")
    assert not walks


def corrupt_garbage(path: Path, _: Path) -> None:
    path.write_bytes(b"not a zip file")


def corrupt_truncated(path: Path, _: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def corrupt_other_index(path: Path, root: Path) -> None:
    """A valid cache file of another index under this key's name: its header gives it away."""
    other = index_domains(root, ["d1"], CLASSES, version="v1")
    assert other
    other_file = next(p for p in path.parent.glob("*.npz") if p != path)
    os.replace(other_file, path)


@pytest.mark.parametrize("corrupt", [corrupt_garbage, corrupt_truncated, corrupt_other_index])
def test_corrupt_cache_is_rebuilt(
    tmp_path: Path, cache: Path, walks: list[str], corrupt: Callable[[Path, Path], None]
) -> None:
    root = make_tree(tmp_path / "data")
    index(root)
    (path,) = cache_files(cache)
    corrupt(path, root)
    with pytest.warns(UserWarning, match="unreadable file index cache") as record:
        assert_same(index(root), expected(root))
    assert len(record) == 1
    walks.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(index(root), expected(root))  # the rebuilt file is good again
    assert not walks


def test_unwritable_cache_dir_still_indexes(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_tree(tmp_path / "data")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("DGBENCH_CACHE", str(blocker / "cache"))  # fails for root as well, unlike chmod
    with pytest.warns(UserWarning, match="cannot write the file index cache"):
        assert_same(index(root), expected(root))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per folder, not on every call
        assert_same(index(root), expected(root))


def test_odd_file_names_round_trip(tmp_path: Path, cache: Path) -> None:
    """Newlines and non-UTF-8 bytes are legal in POSIX names; the cache must keep them exactly."""
    root = make_tree(tmp_path / "data")
    try:
        (root / "d0" / "b" / "new\nline.png").touch()
        open(os.path.join(os.fsencode(root / "d0" / "b"), b"caf\xe9.png"), "w").close()
    except (OSError, ValueError):
        pytest.skip("this file system rejects such names")
    want = expected(root)
    assert "b/new\nline.png" in want["d0"][0]
    index(root)
    assert_same(index(root), want)


def test_stale_files_are_pruned(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_cache, "KEEP_PER_DATASET", 2)
    root = make_tree(tmp_path / "data")
    for version in ("v1", "v2", "v3", "v4"):
        index(root, version)
    assert len(cache_files(cache)) == 2


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DGBENCH_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "dgbench"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_dir() == tmp_path / "home" / ".cache" / "dgbench"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "dgbench"
    monkeypatch.setenv("DGBENCH_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
