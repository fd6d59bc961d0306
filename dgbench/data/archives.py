"""Archive type detection and extraction that refuses unsafe members.

Downloads come from third-party mirrors, so an archive is treated as untrusted: every
member is checked before anything is written, and one bad member (a path that leaves
the destination, a link, a device) rejects the whole archive. The type comes from the
magic bytes, not the file name: mirrors rename files, and a Google Drive quota page
saved as `PACS.zip` must not reach the unzipper.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from dgbench.errors import DataError, one_line

# (kind, offset, magic bytes); kinds other than zip are tar streams with that compression.
MAGIC: tuple[tuple[str, int, bytes], ...] = (
    ("zip", 0, b"PK\x03\x04"),
    ("gzip", 0, b"\x1f\x8b"),
    ("bzip2", 0, b"BZh"),
    ("xz", 0, b"\xfd7zXZ\x00"),
    ("tar", 257, b"ustar"),
)
TAR_MODES = {"gzip": "r:gz", "bzip2": "r:bz2", "xz": "r:xz", "tar": "r:"}
HEAD_BYTES = 1024


def read_head(path: Path, size: int = HEAD_BYTES) -> bytes:
    """The first bytes of a file, enough for every magic number and an HTML sniff."""
    with open(path, "rb") as f:
        return f.read(size)


def archive_kind(path: Path) -> str | None:
    """'zip', 'gzip', 'bzip2', 'xz' or 'tar' from the magic bytes; None for anything else."""
    head = read_head(path)
    for kind, offset, magic in MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return kind
    return None


def looks_like_html(head: bytes) -> bool:
    """True for the error pages that file hosts (Google Drive quota, virus scan) send instead of files."""
    text = head.lstrip().lower()
    return text.startswith((b"<!doctype html", b"<html", b"<head")) or b"<html" in text


def describe_non_archive(path: Path) -> str:
    """Why a file is not extracted: 'HTML page?' when it looks like one, else its first bytes."""
    head = read_head(path)
    if looks_like_html(head):
        return "not an archive (HTML page?)"
    return f"not an archive (unknown format, starts with {head[:16]!r})"


def safe_extract(archive: Path, dest: Path) -> list[str]:
    """Extract a zip or tar archive into `dest` after checking every member; return its file names."""
    archive, dest = Path(archive), Path(dest)
    kind = archive_kind(archive)
    if kind is None:
        raise DataError(
            f"cannot extract {archive}: {describe_non_archive(archive)}; delete it and download again"
        )
    try:
        if kind == "zip":
            return _extract_zip(archive, dest)
        return _extract_tar(archive, dest, TAR_MODES[kind])
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(
            f"cannot extract {archive} into {dest}: {one_line(exc)}; if the archive is corrupt or "
            f"truncated, delete it and download again"
        ) from exc


def _extract_zip(archive: Path, dest: Path) -> list[str]:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            _check_name(archive, info.filename, dest)
            if stat.S_ISLNK(info.external_attr >> 16):
                _reject(archive, info.filename, "is a symbolic link")
        dest.mkdir(parents=True, exist_ok=True)
        zf.extractall(dest)  # zipfile applies no permission bits, so no setuid survives
    return [info.filename for info in infos if not info.is_dir()]


def _extract_tar(archive: Path, dest: Path, mode: str) -> list[str]:
    with tarfile.open(archive, mode) as tf:
        members = tf.getmembers()
        for member in members:
            _check_name(archive, member.name, dest)
            _check_tar_type(archive, member)
        dest.mkdir(parents=True, exist_ok=True)
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, members=members, filter="data")
        else:  # Python without extraction filters: keep only plain permission bits
            for member in members:
                member.mode = 0o755 if member.isdir() else 0o644
            tf.extractall(dest, members=members)
    return [member.name for member in members if member.isfile()]


def _check_tar_type(archive: Path, member: tarfile.TarInfo) -> None:
    """Only regular files and directories: links and devices can write or point outside `dest`."""
    for test, what in (
        (member.issym, "is a symbolic link"),
        (member.islnk, "is a hard link"),
        (member.ischr, "is a character device"),
        (member.isblk, "is a block device"),
        (member.isfifo, "is a FIFO"),
    ):
        if test():
            _reject(archive, member.name, what)
    if not (member.isfile() or member.isdir()):
        _reject(archive, member.name, f"has unsupported tar type {member.type!r}")


def _check_name(archive: Path, name: str, dest: Path) -> None:
    """Relative paths only, without `..`, that stay inside `dest` once resolved."""
    if not name:
        _reject(archive, name, "has an empty name")
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or (len(name) > 1 and name[1] == ":"):
        _reject(archive, name, "has an absolute path")
    if ".." in posix.parts:
        _reject(archive, name, "has a '..' component (path traversal)")
    root = os.path.realpath(dest)
    target = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, target]) != root:
        _reject(archive, name, f"resolves outside {dest}")


def _reject(archive: Path, name: str, why: str) -> None:
    raise DataError(
        f"unsafe archive {archive}: member {name!r} {why}; nothing was extracted: delete the archive "
        f"and get it from another source"
    )
