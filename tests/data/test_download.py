"""Dataset downloader and safe extraction, against a local HTTP server and file:// URLs (no network)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import sys
import tarfile
import threading
import types
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dgbench.data import download
from dgbench.data.archives import archive_kind, safe_extract
from dgbench.data.download import DOWNLOADS_DIR, download_dataset, file_digest, gdrive_id
from dgbench.errors import DataError

STAGING = ".dgbench-staging-toy"
TOY_FILES = ("Toy/d1/c1/a.jpg", "Toy/d1/c2/b.jpg", "Toy/d2/c1/c.jpg", "Toy/d2/c2/d.jpg")


# ---------------------------------------------------------------- fixtures and builders


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy may capture 127.0.0.1, and retries must not sleep."""
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.setattr(download, "RETRY_DELAY_S", 0.0)


@dataclass
class Served:
    """A folder served over HTTP on 127.0.0.1, with a log of Range headers and bytes sent."""

    folder: Path
    base: str = ""
    ranges: list[str | None] = field(default_factory=list)
    bytes_sent: int = 0
    ignore_range: bool = False  # answer 200 with the whole file, as servers without Range support do
    cut_first_at: int | None = None  # close the first response after this many body bytes

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def put(self, name: str, data: bytes) -> bytes:
        (self.folder / name).write_bytes(data)
        return data


def _handler(state: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested = self.headers.get("Range")
            state.ranges.append(requested)
            path = state.folder / self.path.lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            data, start = path.read_bytes(), 0
            if requested and not state.ignore_range:
                match = re.fullmatch(r"bytes=(\d+)-", requested)
                assert match, requested
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if state.cut_first_at is not None:
                body, state.cut_first_at = body[: state.cut_first_at], None
            self.wfile.write(body)
            state.bytes_sent += len(body)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Served]:
    state = Served(tmp_path / "served")
    state.folder.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{httpd.server_port}"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def jpeg(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), color=(shade, 0, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def toy_zip(padding: int = 0) -> bytes:
    """The toy dataset as DomainBed-style zip; `padding` adds incompressible bytes for resume tests."""
    members = {name: jpeg(10 * i) for i, name in enumerate(TOY_FILES)}
    if padding:
        members["Toy/d1/c1/pad.jpg"] = os.urandom(padding)
    return zip_bytes(members)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source(sid: str, url: str, name: str = "Toy.zip", kind: str = "http", **file_keys: Any) -> dict:
    files = [{"url": url, "name": name, "size_bytes": None, "md5": None, "sha256": None, **file_keys}]
    return {"id": sid, "kind": kind, "files": files, "steps": [{"op": "extract", "archive": name}]}


def manifest(*sources: dict, dir: str = "Toy") -> dict:
    return {"name": "toy", "dir": dir, "domains": ["d1", "d2"], "sources": list(sources)}


def tree(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- archives


@pytest.mark.parametrize(
    ("mode", "kind"), [("zip", "zip"), ("w:gz", "gzip"), ("w:bz2", "bzip2"), ("w:xz", "xz"), ("w", "tar")]
)
def test_safe_extract_detects_format_by_magic_bytes(tmp_path: Path, mode: str, kind: str) -> None:
    members = {"top/a.txt": b"alpha", "top/sub/b.txt": b"beta"}
    archive = tmp_path / "download.bin"  # the extension says nothing: detection must use the bytes
    archive.write_bytes(zip_bytes(members) if mode == "zip" else tar_bytes(members, mode))
    assert archive_kind(archive) == kind
    names = safe_extract(archive, tmp_path / "out")
    assert sorted(names) == sorted(members)
    assert {n: (tmp_path / "out" / n).read_bytes() for n in members} == members


def test_archive_kind_rejects_html(tmp_path: Path) -> None:
    page = tmp_path / "PACS.zip"
    page.write_text("<!DOCTYPE html><html><title>Google Drive - Quota exceeded</title></html>")
    assert archive_kind(page) is None
    with pytest.raises(DataError, match=r"not an archive \(HTML page\?\)"):
        safe_extract(page, tmp_path / "out")


@pytest.mark.parametrize("fmt", ["zip", "tar"])
@pytest.mark.parametrize("bad", ["../evil", "/abs/evil", "a/../../evil"])
def test_safe_extract_rejects_escaping_paths(tmp_path: Path, fmt: str, bad: str) -> None:
    members = {"ok.txt": b"fine", bad: b"pwned"}  # the good member first: nothing may be written
    archive = tmp_path / "bad.archive"
    archive.write_bytes(zip_bytes(members) if fmt == "zip" else tar_bytes(members))
    dest = tmp_path / "sandbox" / "out"
    with pytest.raises(DataError) as info:
        safe_extract(archive, dest)
    assert str(archive) in str(info.value) and repr(bad) in str(info.value)
    assert not dest.exists()
    assert not (tmp_path / "sandbox" / "evil").exists() and not (tmp_path / "evil").exists()


def _tar_with(member: tarfile.TarInfo) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        ok = tarfile.TarInfo("ok.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        tf.addfile(member)
    return buffer.getvalue()


def _tar_member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (_tar_member("link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
        (_tar_member("hard", tarfile.LNKTYPE, "ok.txt"), "hard link"),
        (_tar_member("tty", tarfile.CHRTYPE), "character device"),
        (_tar_member("disk", tarfile.BLKTYPE), "block device"),
        (_tar_member("pipe", tarfile.FIFOTYPE), "FIFO"),
    ],
)
def test_safe_extract_rejects_tar_links_and_devices(
    tmp_path: Path, member: tarfile.TarInfo, why: str
) -> None:
    archive = tmp_path / "bad.tar"
    archive.write_bytes(_tar_with(member))
    with pytest.raises(DataError, match=why) as info:
        safe_extract(archive, tmp_path / "out")
    assert "bad.tar" in str(info.value) and repr(member.name) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_safe_extract_rejects_zip_symlink(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("ok.txt", b"ok")
        link = zipfile.ZipInfo("link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    archive = tmp_path / "bad.zip"
    archive.write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match="'link' is a symbolic link"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_safe_extract_drops_setuid_bits(tmp_path: Path) -> None:
    info = tarfile.TarInfo("tool")
    info.size, info.mode = 2, 0o6777
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        tf.addfile(info, io.BytesIO(b"#!"))
    archive = tmp_path / "a.tgz"
    archive.write_bytes(buffer.getvalue())
    safe_extract(archive, tmp_path / "out")
    mode = (tmp_path / "out" / "tool").stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH)


def test_safe_extract_reports_truncated_archive(tmp_path: Path) -> None:
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(tar_bytes({"a.bin": os.urandom(50_000)})[:20_000])
    with pytest.raises(DataError, match=r"cut\.tar\.gz.*download again"):
        safe_extract(archive, tmp_path / "out")


@pytest.mark.parametrize("algo", ["sha256", "md5"])
def test_file_digest_matches_hashlib(tmp_path: Path, algo: str) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom(3 * download.CHUNK_BYTES // 2)
    path.write_bytes(data)
    assert file_digest(path, algo) == hashlib.new(algo, data).hexdigest()


# ---------------------------------------------------------------- verification before extraction


@pytest.mark.parametrize(("key", "wrong"), [("sha256", "0" * 64), ("md5", "f" * 32), ("size_bytes", 12345)])
def test_mismatch_refuses_to_extract(tmp_path: Path, server: Served, key: str, wrong: Any) -> None:
    data = server.put("Toy.zip", toy_zip())
    actual = {"sha256": sha256(data), "md5": hashlib.md5(data).hexdigest(), "size_bytes": len(data)}[key]
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        download_dataset(manifest(source("mirror", server.url("Toy.zip"), **{key: wrong})), root, echo=print)
    message = str(info.value)
    assert "Toy.zip" in message and str(wrong) in message and str(actual) in message and "mirror" in message
    assert not (root / "Toy").exists() and not (root / STAGING).exists()
    assert not (
        root / DOWNLOADS_DIR / "toy" / "mirror" / "Toy.zip"
    ).exists()  # deleted: a rerun fetches again


def test_html_page_is_reported_not_extracted(tmp_path: Path, server: Served) -> None:
    server.put("Toy.zip", b"\n<!DOCTYPE html>\n<html><body>Google Drive can't scan this file for viruses.")
    root = tmp_path / "data"
    with pytest.raises(DataError, match=r"Toy\.zip from \S+ is not an archive \(HTML page\?\)"):
        download_dataset(manifest(source("gd", server.url("Toy.zip"))), root, echo=print)
    assert not (root / "Toy").exists() and not (root / STAGING).exists()


# ---------------------------------------------------------------- sources in order


def test_falls_back_to_the_next_source(tmp_path: Path, server: Served) -> None:
    data = server.put("Toy.zip", toy_zip())
    dead = {**source("old", server.url("Toy.zip")), "status": "dead", "note": "gone since 2020"}
    manual = {"id": "by-hand", "kind": "manual", "note": "fetch it yourself into <root>/Toy"}
    good = source("good", server.url("Toy.zip"), sha256=sha256(data))
    staged: list[Path] = []
    messages: list[str] = []
    root = tmp_path / "data"
    result = download_dataset(
        manifest(dead, source("broken", server.url("missing.zip")), manual, good),
        root,
        check=lambda path: staged.append(path) or None,
        echo=messages.append,
    )
    assert result == root / "Toy"
    assert tree(result) == {name.removeprefix("Toy/") for name in TOY_FILES}
    assert staged == [root / STAGING / "Toy"]  # checked before it was moved into place
    assert server.ranges == [None, None]  # the dead and the manual source were never requested
    assert not (root / DOWNLOADS_DIR).exists() and not (root / STAGING).exists()
    text = "\n".join(messages)
    assert "old: skipped: marked dead (gone since 2020)" in text
    assert "HTTP 404" in text and f"fetch it yourself into {root}/Toy" in text
    assert "sha256 ok" in text


def test_all_sources_failing_lists_each(tmp_path: Path, server: Served) -> None:
    dead = {**source("old", server.url("Toy.zip")), "status": "dead"}
    manual = {"id": "by-hand", "kind": "manual", "note": "ask the authors"}
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        download_dataset(manifest(source("broken", server.url("nope.zip")), dead, manual), root, echo=print)
    message = str(info.value)
    assert "\n" not in message
    for expected in (
        "broken: HTTP 404",
        "old: skipped: marked dead",
        "by-hand: manual download: ask the authors",
    ):
        assert expected in message
    assert f"by hand into {root / 'Toy'}" in message and "dgbench data verify toy" in message


def test_check_rejecting_a_build_tries_the_next_source(tmp_path: Path, server: Served) -> None:
    server.put("Toy.zip", toy_zip())
    calls: list[Path] = []

    def check(path: Path) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise DataError("wrong image count")

    root = tmp_path / "data"
    both = manifest(source("first", server.url("Toy.zip")), source("second", server.url("Toy.zip")))
    download_dataset(both, root, check=check, echo=print)
    assert len(calls) == 2 and (root / "Toy" / "d1").is_dir() and not (root / STAGING).exists()


def test_refuses_an_existing_dataset(tmp_path: Path, server: Served) -> None:
    (tmp_path / "Toy").mkdir()
    with pytest.raises(DataError, match=r"already exists; run `dgbench data verify toy"):
        download_dataset(manifest(source("m", server.url("Toy.zip"))), tmp_path, echo=print)
    assert server.ranges == []


def test_crash_leaves_no_dataset_and_rerun_succeeds(tmp_path: Path, server: Served) -> None:
    server.put("Toy.zip", toy_zip())
    spec, root = manifest(source("m", server.url("Toy.zip"))), tmp_path / "data"

    def crash(path: Path) -> None:
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        download_dataset(spec, root, check=crash, echo=print)
    assert not (root / "Toy").exists()
    assert (root / STAGING).is_dir()  # what a crash leaves behind
    messages: list[str] = []
    download_dataset(spec, root, echo=messages.append)
    assert tree(root / "Toy") == {name.removeprefix("Toy/") for name in TOY_FILES}
    assert not (root / STAGING).exists()
    assert any("left by an interrupted run" in m for m in messages)
    assert any("downloaded earlier" in m for m in messages)  # the verified archive was reused


# ---------------------------------------------------------------- resuming


def _part(root: Path, sid: str = "m", name: str = "Toy.zip") -> Path:
    path = root / DOWNLOADS_DIR / "toy" / sid / f"{name}.part"
    path.parent.mkdir(parents=True)
    return path


def test_resume_requests_only_the_remainder(tmp_path: Path, server: Served) -> None:
    data = server.put("Toy.zip", toy_zip(padding=200_000))
    half, root = len(data) // 2, tmp_path / "data"
    _part(root).write_bytes(data[:half])
    spec = manifest(source("m", server.url("Toy.zip"), sha256=sha256(data), size_bytes=len(data)))
    download_dataset(spec, root, echo=print)
    assert server.ranges == [f"bytes={half}-"]
    assert server.bytes_sent == len(data) - half
    assert (root / "Toy" / "d1" / "c1" / "pad.jpg").is_file()


def test_server_without_range_support_restarts_from_zero(tmp_path: Path, server: Served) -> None:
    data = server.put("Toy.zip", toy_zip(padding=50_000))
    root = tmp_path / "data"
    _part(root).write_bytes(b"x" * 1000)  # would corrupt the file if appended to
    server.ignore_range = True
    messages: list[str] = []
    download_dataset(
        manifest(source("m", server.url("Toy.zip"), sha256=sha256(data))), root, echo=messages.append
    )
    assert server.bytes_sent == len(data)
    assert any("cannot resume" in m for m in messages)


def test_complete_part_answered_416_is_kept(tmp_path: Path, server: Served) -> None:
    data = server.put("Toy.zip", toy_zip())
    root = tmp_path / "data"
    _part(root).write_bytes(data)
    download_dataset(manifest(source("m", server.url("Toy.zip"), sha256=sha256(data))), root, echo=print)
    assert server.ranges == [f"bytes={len(data)}-"] and server.bytes_sent == 0
    assert (root / "Toy" / "d2" / "c2" / "d.jpg").is_file()


def test_broken_transfer_is_resumed_in_the_same_run(tmp_path: Path, server: Served) -> None:
    data = server.put("Toy.zip", toy_zip(padding=100_000))
    server.cut_first_at = 30_000
    root = tmp_path / "data"
    download_dataset(manifest(source("m", server.url("Toy.zip"), sha256=sha256(data))), root, echo=print)
    assert server.ranges == [None, "bytes=30000-"]
    assert server.bytes_sent == len(data)


# ---------------------------------------------------------------- steps


def test_multi_file_source_with_move_delete_listed_and_extract_into(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / "a.zip").write_bytes(
        zip_bytes({"raw/d1/c1/x.jpg": jpeg(1), "raw/d1/c1/dup.jpg": jpeg(2), "raw/README.txt": b"hi"})
    )
    (files / "b.tgz").write_bytes(tar_bytes({"d2/c1/y.jpg": jpeg(3)}))
    lists = tmp_path / "manifests"
    lists.mkdir()
    (lists / "dups.txt").write_text("d1/c1/dup.jpg\n\nd2/c1/gone.jpg\n")
    spec = {
        "id": "local",
        "kind": "http",
        "files": [
            {"url": (files / "a.zip").as_uri(), "name": "a.zip"},
            {"url": (files / "b.tgz").as_uri(), "name": "b.tgz"},
        ],
        "steps": [
            {"op": "extract", "archive": "a.zip"},
            {"op": "extract", "archive": "b.tgz", "into": "raw"},
            {"op": "move", "from": "raw", "to": "Toy"},
            {"op": "delete_listed", "list": "dups.txt", "under": "Toy"},
            {"op": "delete", "paths": ["Toy/README.txt", "not/there"]},
        ],
    }
    messages: list[str] = []
    root = tmp_path / "data"
    download_dataset(manifest(spec), root, manifest_dir=lists, keep_archives=True, echo=messages.append)
    assert tree(root / "Toy") == {"d1/c1/x.jpg", "d2/c1/y.jpg"}
    assert any("deleted 1 files listed in dups.txt; 1 listed files were not present" in m for m in messages)
    assert sum("no checksum in the manifest" in m for m in messages) == 2
    assert {p.name for p in (root / DOWNLOADS_DIR / "toy" / "local").iterdir()} == {"a.zip", "b.tgz"}


def test_move_of_a_missing_folder_names_what_was_found(tmp_path: Path, server: Served) -> None:
    server.put("Toy.zip", toy_zip())
    spec = source("m", server.url("Toy.zip"))
    spec["steps"].append({"op": "move", "from": "kfold", "to": "Toy2"})
    with pytest.raises(DataError, match=r"step 2 \(move\): 'kfold' not found .*top level: Toy/"):
        download_dataset(manifest(spec), tmp_path, echo=print)
    assert not (tmp_path / STAGING).exists()


@pytest.mark.parametrize("prefix", ["wrapper/inner/", "Toy/kfold/", ""])
def test_locate_moves_the_folder_holding_the_domains(tmp_path: Path, server: Served, prefix: str) -> None:
    members = {f"{prefix}{name.removeprefix('Toy/')}": jpeg(5) for name in TOY_FILES}
    server.put("m.zip", zip_bytes({**members, f"{prefix}LICENSE": b"l", "__MACOSX/d1/d2/x": b""}))
    spec = source("m", server.url("m.zip"), name="m.zip")
    spec["steps"].append({"op": "locate", "to": "Toy"})
    download_dataset(manifest(spec), tmp_path, echo=print)
    assert tree(tmp_path / "Toy") == {name.removeprefix("Toy/") for name in TOY_FILES}


def test_terra_incognita_op(tmp_path: Path) -> None:
    images = {f"i{i}.jpg": jpeg(40 * i) for i in range(1, 6)}
    first = {
        "images": [
            {"id": 1, "file_name": "i1.jpg", "location": 38},  # int location: compared as str
            {"id": 2, "file_name": "i2.jpg", "location": "46"},
            {"id": 3, "file_name": "i3.jpg", "location": 99},  # location not kept
            {"id": 5, "file_name": "i5.jpg", "location": 38},  # only a category not kept
        ],
        "categories": [{"id": 1, "name": "bird"}, {"id": 2, "name": "car"}, {"id": 3, "name": "dog"}],
        "annotations": [
            {"image_id": 1, "category_id": 1},
            {"image_id": 1, "category_id": 3},  # two categories: copied twice
            {"image_id": 1, "category_id": 1},  # repeated: same file again
            {"image_id": 3, "category_id": 1},
            {"image_id": 5, "category_id": 2},
        ],
    }
    second = {  # its annotations use the first file's categories: lists are concatenated
        "images": [{"id": 4, "file_name": "i4.jpg", "location": "100"}],
        "categories": [],
        "annotations": [{"image_id": 4, "category_id": 3}, {"image_id": 2, "category_id": 1}],
    }
    files = tmp_path / "files"
    files.mkdir()
    (files / "ann.zip").write_bytes(
        zip_bytes({"ann/a.json": json.dumps(first).encode(), "ann/b.json": json.dumps(second).encode()})
    )
    (files / "img.tar.gz").write_bytes(tar_bytes({f"imgs/{k}": v for k, v in images.items()}))
    spec = {
        "id": "lila",
        "kind": "http",
        "files": [{"url": (files / n).as_uri(), "name": n} for n in ("img.tar.gz", "ann.zip")],
        "steps": [
            {"op": "extract", "archive": "img.tar.gz"},
            {"op": "extract", "archive": "ann.zip"},
            {
                "op": "terra_incognita",
                "annotations": "ann",
                "images": "imgs",
                "files": ["a.json", "b.json"],
                "locations": ["38", "46", "100", "43"],
                "categories": ["bird", "dog"],
                "into": "terra_incognita",
            },
            {"op": "delete", "paths": ["imgs", "ann"]},
        ],
    }
    root = tmp_path / "data"
    out = download_dataset(manifest(spec, dir="terra_incognita"), root, echo=print)
    expected = {
        "location_38/bird/i1.jpg": "i1.jpg",
        "location_38/dog/i1.jpg": "i1.jpg",
        "location_46/bird/i2.jpg": "i2.jpg",
        "location_100/dog/i4.jpg": "i4.jpg",
    }
    assert tree(out) == set(expected)
    assert all((out / rel).read_bytes() == images[src] for rel, src in expected.items())
    assert sorted(p.name for p in root.iterdir()) == ["terra_incognita"]


def test_manifest_errors_are_raised_up_front(tmp_path: Path) -> None:
    bad_op = source("m", "http://127.0.0.1:9/x.zip")
    bad_op["steps"] = [{"op": "unzip", "archive": "Toy.zip"}]
    with pytest.raises(DataError, match=r"source 'm': unknown step .*unzip"):
        download_dataset(manifest(bad_op), tmp_path, echo=print)
    with pytest.raises(DataError, match=r"needs a unique plain file 'name', got '\.\./x\.zip'"):
        download_dataset(manifest(source("m", "http://127.0.0.1:9/x", name="../x.zip")), tmp_path, echo=print)


# ---------------------------------------------------------------- Google Drive


@pytest.mark.parametrize(
    "url",
    [
        "https://drive.google.com/uc?id=1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd",
        "https://drive.google.com/uc?export=download&id=1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd",
        "https://drive.google.com/open?id=1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd",
        "https://drive.google.com/file/d/1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd",
        "https://drive.google.com/file/d/1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd/view?usp=sharing",
    ],
)
def test_gdrive_id(url: str) -> None:
    assert gdrive_id(url) == "1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd"


def test_gdrive_id_missing() -> None:
    with pytest.raises(DataError, match="no-id-here"):
        gdrive_id("https://drive.google.com/drive/folders/no-id-here")


def test_missing_gdown_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gdown", None)  # makes `import gdown` fail
    spec = source("gd", "https://drive.google.com/uc?id=abc", kind="gdrive")
    with pytest.raises(DataError, match=r'gd: .*pip install "dgbench\[download\]" \(or pip install gdown\)'):
        download_dataset(manifest(spec), tmp_path, echo=print)


def test_gdrive_source_goes_through_gdown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, calls = toy_zip(), []

    def fake_download(id: str, output: str, quiet: bool = False, resume: bool = False) -> str:
        calls.append((id, Path(output).name, resume))
        Path(output).write_bytes(data)
        return output

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=fake_download))
    spec = source(
        "gd", "https://drive.google.com/file/d/abc-123/view", kind="gdrive", md5=hashlib.md5(data).hexdigest()
    )
    download_dataset(manifest(spec), tmp_path, echo=print)
    assert calls == [("abc-123", "Toy.zip.part", True)]
    assert (tmp_path / "Toy" / "d1" / "c2" / "b.jpg").is_file()
