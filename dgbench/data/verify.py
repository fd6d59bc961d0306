"""Check a dataset tree against its manifest: layout, counts, file list, checksums, decoding.

Unlike the loader, which stops at the first layout problem, `verify_dataset` collects
every problem so one run tells the user everything that is wrong: missing or extra
domain and class folders, per-domain and per-class counts, the hash of the sorted
path list (equal paths mean equal DomainBed splits), and optionally every file's
sha256 (`checksums`) or whether every image decodes (`decode`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from dgbench.data.download import file_digest
from dgbench.data.folder import (
    domain_counts,
    domain_names,
    find_classes,
    list_class_files,
    manifest_data_file,
)
from dgbench.errors import DataError, one_line

HASH_WORKERS = 4  # hashlib and PIL decoding release the GIL; threads overlap disk and CPU


@dataclass
class VerifyReport:
    """What `verify_dataset` found. `ok` when nothing is missing, extra, corrupt or miscounted."""

    name: str
    dataset_dir: Path
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # domain -> class -> images
    problems: list[str] = field(default_factory=list)  # layout, counts, path-list hash
    missing_files: list[str] = field(default_factory=list)  # in the checksum list, not on disk
    extra_files: list[str] = field(default_factory=list)  # on disk, not in the checksum list
    corrupt_files: list[str] = field(default_factory=list)  # "<path>: <why>"
    path_list_sha256: str | None = None
    hashed: int = 0
    decoded: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.problems or self.missing_files or self.extra_files or self.corrupt_files)

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def domain_total(self, domain: str) -> int:
        return sum(self.counts.get(domain, {}).values())


def path_list_sha256(relpaths: Iterable[str]) -> str:
    """sha256 of the sorted `<domain>/<class>/<file>` paths joined by newlines (datasets.md §4.3)."""
    return hashlib.sha256("\n".join(sorted(relpaths)).encode("utf-8")).hexdigest()


def verify_dataset(
    manifest: Mapping[str, Any],
    dataset_dir: str | os.PathLike,
    *,
    checksums: bool = False,
    decode: bool = False,
    progress: bool = False,
) -> VerifyReport:
    """Compare `dataset_dir` (`<root>/<manifest dir>`) with `manifest`; never raises on content."""
    name = manifest["name"]
    report = VerifyReport(name, Path(dataset_dir))
    if not report.dataset_dir.is_dir():
        report.problems.append(
            f"{report.dataset_dir} does not exist: run `dgbench data download {name} --root "
            f"{report.dataset_dir.parent}`"
        )
        return report
    relpaths = _scan(manifest, report)
    _check_counts(manifest, report)
    report.path_list_sha256 = path_list_sha256(relpaths)
    expected_hash = (manifest.get("verify") or {}).get("relpath_list_sha256")
    if expected_hash and report.path_list_sha256 != expected_hash and not report.problems:
        report.problems.append(
            f"the sorted file list hashes to {report.path_list_sha256}, expected {expected_hash}: "
            f"file names differ from DomainBed's, so its splits would not be reproduced"
        )
    if checksums:
        _check_checksums(manifest, report, relpaths, progress)
    if decode:
        _check_decoding(report, relpaths, progress)
    return report


def _scan(manifest: Mapping[str, Any], report: VerifyReport) -> list[str]:
    """Count images per domain and class; record missing and unexpected folders."""
    domains, classes = domain_names(manifest), manifest.get("classes")
    present = set(find_classes(report.dataset_dir))
    for domain in domains:
        if domain not in present:
            report.problems.append(f"domain folder {domain}/ is missing")
    for extra in sorted(present - set(domains)):
        report.problems.append(
            f"unexpected folder {extra}/ (DomainBed would count it as a domain: delete or move it)"
        )
    relpaths = []
    for domain in (d for d in domains if d in present):
        domain_dir = report.dataset_dir / domain
        found = find_classes(domain_dir)
        expected = classes or found
        missing = [c for c in expected if c not in found]
        if missing and not manifest.get("allow_missing_classes"):
            report.problems.append(f"{domain}/ lacks class folder(s) {', '.join(missing)}")
        elif missing:
            report.notes.append(f"{domain}/ has no folder for class(es) {', '.join(missing)} (allowed)")
        for extra in sorted(set(found) - set(expected)):
            report.problems.append(f"unexpected class folder {domain}/{extra}/")
        report.counts[domain] = {}
        for class_name in (c for c in expected if c in found):
            files = list_class_files(domain_dir, class_name)
            report.counts[domain][class_name] = len(files)
            relpaths.extend(f"{domain}/{f}" for f in files)
    return relpaths


def _check_counts(manifest: Mapping[str, Any], report: VerifyReport) -> None:
    """Per-domain and per-class counts where the manifest knows them (`counts.total` is shown only:
    DomainNet's total depends on an unresolved clipart count)."""
    counts = manifest.get("counts") or {}
    for domain, expected in domain_counts(manifest).items():
        if domain in report.counts and report.domain_total(domain) != expected:
            report.problems.append(f"{domain}: {report.domain_total(domain)} images, expected {expected}")
    per_class = counts.get("per_class") if isinstance(counts, Mapping) else None
    for domain, expected_classes in (per_class or {}).items():
        for class_name, expected in expected_classes.items():
            found = report.counts.get(domain, {}).get(class_name)
            if found is not None and found != expected:
                report.problems.append(f"{domain}/{class_name}: {found} images, expected {expected}")


def read_checksum_list(path: Path) -> dict[str, str]:
    """`<sha256>  <relative path>` lines (sha256sum's format) as {path: digest}."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read checksum list {path}: {exc.strerror or exc}") from exc
    table = {}
    for number, line in enumerate(lines, 1):
        digest, sep, relpath = line.partition("  ")
        if not line.strip():
            continue
        if not sep or len(digest) != 64:
            raise DataError(f"{path}:{number}: expected '<sha256>  <path>', got {line[:80]!r}")
        table[relpath] = digest.lower()
    return table


def _check_checksums(
    manifest: Mapping[str, Any], report: VerifyReport, relpaths: list[str], progress: bool
) -> None:
    list_name = (manifest.get("verify") or {}).get("per_file_sha256")
    if not list_name:
        report.notes.append(
            f"no per-file checksums are known for {report.name}; `--decode` checks that every image decodes"
        )
        return
    expected = read_checksum_list(manifest_data_file(manifest, list_name))
    on_disk = set(relpaths)
    report.missing_files = sorted(set(expected) - on_disk)
    report.extra_files = sorted(on_disk - set(expected))
    common = sorted(on_disk & set(expected))

    def mismatch(relpath: str) -> str | None:
        digest = file_digest(report.dataset_dir / relpath, "sha256")
        return (
            None
            if digest == expected[relpath]
            else f"{relpath}: sha256 {digest}, expected {expected[relpath]}"
        )

    report.corrupt_files.extend(_parallel(mismatch, common, "sha256", progress))
    report.hashed = len(common)


def _check_decoding(report: VerifyReport, relpaths: list[str], progress: bool) -> None:
    def undecodable(relpath: str) -> str | None:
        try:
            with Image.open(report.dataset_dir / relpath) as image:
                image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            return f"{relpath}: {one_line(exc)}"
        return None

    failures = _parallel(undecodable, relpaths, "decode", progress)
    known = {f.split(": ", 1)[0] for f in report.corrupt_files}
    report.corrupt_files.extend(f for f in failures if f.split(": ", 1)[0] not in known)
    report.decoded = len(relpaths)


def _parallel(check: Callable[[str], str | None], items: list[str], what: str, progress: bool) -> list[str]:
    """Failures of `check` over `items`, in item order."""
    with ThreadPoolExecutor(HASH_WORKERS) as pool:
        results = tqdm(
            pool.map(check, items, chunksize=64), total=len(items), desc=what, disable=not progress
        )
        return [r for r in results if r is not None]


def format_report(report: VerifyReport, manifest: Mapping[str, Any]) -> str:
    """The report as the lines `dgbench data verify` prints."""
    expected = domain_counts(manifest)
    lines = [f"{report.name}: {report.dataset_dir}"]
    width = max([len(d) for d in report.counts] + [5])
    for domain, classes in report.counts.items():
        want = f" (expected {expected[domain]:,})" if domain in expected else ""
        lines.append(
            f"  {domain:<{width}}  {sum(classes.values()):>8,} images in {len(classes)} classes{want}"
        )
    if report.counts:
        total = (manifest.get("counts") or {}).get("total")
        want = f" (expected {total:,})" if isinstance(total, int) else ""
        lines.append(f"  {'total':<{width}}  {report.total:>8,} images{want}")
    if report.path_list_sha256:
        lines.append(f"  file list sha256 {report.path_list_sha256}")
    if report.hashed:
        lines.append(
            f"  checksums: {report.hashed:,} files hashed, {len(report.corrupt_files)} mismatched, "
            f"{len(report.missing_files)} missing, {len(report.extra_files)} extra"
        )
    if report.decoded:
        lines.append(f"  decoded {report.decoded:,} images")
    lines += [f"  note: {n}" for n in report.notes]
    lines += [f"  problem: {p}" for p in report.problems]
    lines += [f"  missing: {f}" for f in report.missing_files]
    lines += [f"  extra: {f}" for f in report.extra_files]
    lines += [f"  corrupt: {f}" for f in report.corrupt_files]
    lines.append("OK" if report.ok else "FAILED")
    return "\n".join(lines)


def require_valid(manifest: Mapping[str, Any], dataset_dir: Path, *, checksums: bool = False) -> None:
    """Raise a DataError summarizing the report unless the tree verifies (used after a download)."""
    report = verify_dataset(manifest, dataset_dir, checksums=checksums)
    if not report.ok:
        issues = (
            report.problems + report.missing_files[:3] + report.extra_files[:3] + report.corrupt_files[:3]
        )
        raise DataError(f"{manifest['name']} at {dataset_dir} does not verify: {'; '.join(issues[:8])}")
