"""Download a dataset from its manifest's sources: fetch, verify, extract safely, move into place.

Why it works this way:
- Mirrors die (DomainBed's Google Drive links answer with quota pages), so a manifest lists
  several sources; one that fails at any stage only moves on to the next, and the final
  error says why each one failed.
- Bytes go to `<file>.part` and resume with an HTTP Range request: some archives are GBs.
- Size, checksum and magic bytes are checked before anything is extracted, so an HTML
  error page or a corrupt file is reported as such, never unpacked.
- The dataset is built in `<root>/.dgbench-staging-<name>/` and appears at `<root>/<dir>`
  by a single rename after `check` passed: a crash never leaves a half-built dataset
  that looks complete, and the next run clears the leftover staging dir.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import parse_qs, urlparse
from urllib.request import Request, urlopen

from tqdm import tqdm

import dgbench
from dgbench.data.archives import archive_kind, describe_non_archive, safe_extract
from dgbench.data.folder import domain_names, read_mapping
from dgbench.data.folder import manifest_dir as default_manifest_dir
from dgbench.errors import DataError, one_line

DOWNLOADS_DIR = ".dgbench-downloads"  # <root>/.dgbench-downloads/<name>/<source id>/<file>
STAGING_PREFIX = ".dgbench-staging-"  # <root>/.dgbench-staging-<name>/
KINDS = ("http", "gdrive", "manual")
USER_AGENT = f"dgbench/{dgbench.__version__} (dataset downloader)"
TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 20
ATTEMPTS = 3  # transfers cut mid-stream are resumed this many times in one run
RETRY_DELAY_S = 2.0
LOCATE_DEPTH = 4
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # source ids and file names: one path component

Echo = Callable[[str], None]
Step = Mapping[str, Any]  # one manifest step: {op: ..., <args>}
Archives = Mapping[str, Path]  # manifest file name -> verified download


class _Interrupted(Exception):
    """A transfer that broke off and may be resumed (not shown to users)."""


@dataclass(frozen=True)
class _Context:
    """What every stage needs to know about the dataset being built."""

    name: str
    dir_name: str
    root: Path
    list_dir: Path
    domains: Sequence[str]
    echo: Echo

    @property
    def target(self) -> Path:
        return self.root / self.dir_name

    def say(self, message: str) -> None:
        self.echo(f"{self.name}: {message}")


# ---------------------------------------------------------------- public API


def file_digest(path: str | os.PathLike[str], algo: str = "sha256") -> str:
    """Hex digest of a file, read in chunks so multi-GB archives never sit in memory."""
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11
            return hashlib.file_digest(f, algo).hexdigest()
        digest = hashlib.new(algo)
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
        return digest.hexdigest()


def gdrive_id(url: str) -> str:
    """The file id of a Google Drive link (`uc?id=`, `open?id=`, `/file/d/<id>`), which gdown takes."""
    parsed = urlparse(url)
    ids = parse_qs(parsed.query).get("id")
    if ids and ids[0]:
        return ids[0]
    if match := re.search(r"/file/d/([\w-]+)", parsed.path):
        return match.group(1)
    raise DataError(
        f"cannot find a Google Drive file id in {url}; use a uc?id=<id>, open?id=<id> or /file/d/<id> link "
        f"in the manifest"
    )


def download_dataset(
    manifest: Mapping[str, Any],
    root: str | os.PathLike[str],
    *,
    check: Callable[[Path], None] | None = None,
    keep_archives: bool = False,
    echo: Echo = print,
    manifest_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Build `<root>/<dir>` from the first manifest source that works; return that path.

    `check(staged_dir)` runs on the finished tree before it is moved into place (raise
    DataError to reject it and try the next source). `manifest_dir` is where list files
    named by steps live (default: `datasets_manifest/`, beside the shipped manifests).
    """
    name, dir_name = _manifest_key(manifest, "name"), _manifest_key(manifest, "dir")
    ctx = _Context(
        name=name,
        dir_name=dir_name,
        root=Path(root),
        list_dir=Path(manifest_dir or manifest.get("_dir") or default_manifest_dir()),
        domains=domain_names(manifest) if manifest.get("domains") else [],
        echo=echo,
    )
    if ctx.target.exists():
        raise DataError(
            f"{name}: {ctx.target} already exists; run `dgbench data verify {name} --root {ctx.root}` to "
            f"check it, or delete it to download again"
        )
    failures = []
    for source in _sources(manifest, ctx):
        sid = source["id"]
        if skip := _skip_reason(source, ctx):
            ctx.say(f"source {sid}: {skip}")
            failures.append(f"{sid}: {skip}")
            continue
        ctx.say(f"trying source {sid} ({source['kind']})")
        try:
            _build_from(source, ctx, check)
        except (DataError, OSError) as exc:
            reason = one_line(exc)
            ctx.say(f"source {sid} failed: {reason}")
            failures.append(f"{sid}: {reason}")
            continue
        _finish(ctx, keep_archives)
        return ctx.target
    raise DataError(
        f"{name}: no download source worked ({'; '.join(failures)}); download it by hand into {ctx.target} "
        f"(see the manifest's notes), then run `dgbench data verify {name} --root {ctx.root}`"
    )


# ---------------------------------------------------------------- manifest checks


def _manifest_key(manifest: Mapping[str, Any], key: str) -> str:
    value = manifest.get(key)
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value):
        raise DataError(
            f"manifest {manifest.get('name', '?')!r}: key {key!r} must be a plain name, got {value!r}"
        )
    return value


def _sources(manifest: Mapping[str, Any], ctx: _Context) -> list[Mapping[str, Any]]:
    """The source list, checked up front: a manifest typo must not pass for a dead mirror."""
    where = f"manifest {ctx.name!r}"
    sources = manifest.get("sources")
    if not isinstance(sources, list) or not sources:
        raise DataError(
            f"{where} lists no download 'sources'; download the dataset by hand into {ctx.target}, then run "
            f"`dgbench data verify {ctx.name} --root {ctx.root}`"
        )
    ids: set[str] = set()
    for index, source in enumerate(sources, 1):
        if not isinstance(source, Mapping):
            raise DataError(f"{where}: source {index} must be a mapping, got {source!r}")
        sid = source.get("id")
        if not isinstance(sid, str) or not SAFE_NAME.fullmatch(sid) or sid in ids:
            raise DataError(
                f"{where}: source {index} needs a unique 'id' usable as a folder name, got {sid!r}"
            )
        ids.add(sid)
        if source.get("kind") not in KINDS:
            raise DataError(f"{where}: source {sid!r} has kind {source.get('kind')!r}; use one of {KINDS}")
        if not _is_dead(source) and source["kind"] != "manual":
            _check_files(source, f"{where}, source {sid!r}")
            _check_steps(source, f"{where}, source {sid!r}")
    return sources


def _check_files(source: Mapping[str, Any], where: str) -> None:
    files = source.get("files")
    if not isinstance(files, list) or not files:
        raise DataError(f"{where}: 'files' must be a non-empty list")
    names = set()
    for spec in files:
        if not isinstance(spec, Mapping) or not isinstance(spec.get("url"), str) or not spec["url"]:
            raise DataError(f"{where}: every file needs a 'url', got {spec!r}")
        name = spec.get("name")
        if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or name in names:
            raise DataError(f"{where}: file {spec['url']} needs a unique plain file 'name', got {name!r}")
        names.add(name)
        size = spec.get("size_bytes")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise DataError(f"{where}: file {name}: 'size_bytes' must be an integer or null, got {size!r}")
        for algo in ("sha256", "md5"):
            value = spec.get(algo)
            if value is not None and not (isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]+", value)):
                raise DataError(f"{where}: file {name}: {algo!r} must be a hex string or null, got {value!r}")


def _check_steps(source: Mapping[str, Any], where: str) -> None:
    steps = source.get("steps")
    if not isinstance(steps, list) or not steps:
        raise DataError(f"{where}: 'steps' must be a non-empty list (at least one extract)")
    for step in steps:
        if not isinstance(step, Mapping) or step.get("op") not in STEP_OPS:
            raise DataError(f"{where}: unknown step {step!r}; ops: {', '.join(STEP_OPS)}")


def _is_dead(source: Mapping[str, Any]) -> bool:
    return str(source.get("status", "")).strip().lower() == "dead"


def _skip_reason(source: Mapping[str, Any], ctx: _Context) -> str | None:
    """Why a source is not tried (dead, or needs a person), with its note; None to try it."""
    note = str(source.get("note") or "").replace("<root>", str(ctx.root)).strip()
    if _is_dead(source):
        return "skipped: marked dead" + (f" ({note})" if note else "")
    if source["kind"] == "manual":
        url = f" from {source['url']}" if source.get("url") else ""
        return f"manual download{url}: {note or 'see the manifest'}"
    return None


# ---------------------------------------------------------------- one source


def _build_from(source: Mapping[str, Any], ctx: _Context, check: Callable[[Path], None] | None) -> None:
    """Fetch and verify every file, run the steps in staging, check, and rename into place."""
    downloads = ctx.root / DOWNLOADS_DIR / ctx.name / source["id"]
    archives = {spec["name"]: _obtain(source["kind"], spec, downloads, ctx) for spec in source["files"]}
    staging = ctx.root / f"{STAGING_PREFIX}{ctx.name}"
    if staging.exists():
        ctx.say(f"removing {staging}, left by an interrupted run")
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        for index, step in enumerate(source["steps"], 1):
            try:
                STEP_OPS[step["op"]](step, staging, archives, ctx)
            except DataError as exc:
                raise DataError(f"step {index} ({step['op']}): {exc}") from exc
        built = staging / ctx.dir_name
        if not built.is_dir():
            raise DataError(
                f"after the steps there is no {ctx.dir_name}/ in {staging} (top level: {_listing(staging)}); "
                f"the archive layout differs from what the manifest's steps expect"
            )
        if check is not None:
            check(built)
        if ctx.target.exists():  # rename would replace an empty directory silently
            raise DataError(f"{ctx.target} appeared while downloading; delete it or verify it, then retry")
        os.replace(built, ctx.target)
    except (DataError, OSError):
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _finish(ctx: _Context, keep_archives: bool) -> None:
    downloads = ctx.root / DOWNLOADS_DIR / ctx.name
    if keep_archives:
        ctx.say(f"archives kept in {downloads}")
    else:
        shutil.rmtree(downloads, ignore_errors=True)
        try:
            downloads.parent.rmdir()  # only when no other dataset's downloads are in there
        except OSError:
            pass
    ctx.say(f"ready at {ctx.target}")


def _obtain(kind: str, spec: Mapping[str, Any], downloads: Path, ctx: _Context) -> Path:
    """The verified archive for one manifest file: reused when already downloaded, else fetched."""
    final = downloads / spec["name"]
    if final.exists():
        ctx.say(f"using {final}, downloaded earlier")
    else:
        downloads.mkdir(parents=True, exist_ok=True)
        part = final.with_name(final.name + ".part")
        ctx.say(f"downloading {spec['url']}")
        if kind == "gdrive":
            _fetch_gdrive(spec["url"], part)
        else:
            _fetch_url(spec["url"], part, spec.get("size_bytes"), ctx)
        os.replace(part, final)
    _check_archive(final, spec["url"])
    _verify(final, spec, ctx)
    return final


def _check_archive(path: Path, url: str) -> None:
    """Magic bytes first: an HTML error page is worth naming as such, not as a checksum mismatch."""
    if archive_kind(path) is None:
        why = describe_non_archive(path)
        path.unlink()
        raise DataError(
            f"{path.name} from {url} is {why}; the host sent something else (Google Drive sends HTML "
            f"pages for quota limits and virus-scan warnings); deleted it"
        )


def _verify(path: Path, spec: Mapping[str, Any], ctx: _Context) -> None:
    """Size, then sha256 (else md5) when the manifest pins them; a mismatch deletes the file."""
    size = spec.get("size_bytes")
    if size is not None and (actual_size := path.stat().st_size) != size:
        path.unlink()
        raise DataError(
            f"{path.name} from {spec['url']}: size is {actual_size} bytes, expected {size}; deleted it "
            f"(truncated download, or the file changed upstream)"
        )
    algo = "sha256" if spec.get("sha256") else "md5" if spec.get("md5") else None
    if algo is None:
        ctx.say(
            f"warning: {path.name} has no checksum in the manifest; unverified until the files are checked"
        )
        return
    expected, actual = str(spec[algo]).lower(), file_digest(path, algo)
    if actual != expected:
        path.unlink()
        raise DataError(
            f"{path.name} from {spec['url']}: {algo} is {actual}, expected {expected}; deleted it "
            f"(corrupt download, or the file changed upstream)"
        )
    ctx.say(f"{path.name}: {algo} ok")


# ---------------------------------------------------------------- transfers


def _fetch_gdrive(url: str, part: Path) -> None:
    """Google Drive via gdown, which handles the confirm tokens that plain HTTP cannot."""
    gdown = _import_gdown()
    kwargs: dict[str, Any] = {"id": gdrive_id(url), "output": str(part), "quiet": not sys.stderr.isatty()}
    if "resume" in inspect.signature(gdown.download).parameters:
        kwargs["resume"] = True
    try:
        result = gdown.download(**kwargs)
    except Exception as exc:  # gdown raises its own types (quota, permission) and requests' errors
        raise DataError(f"Google Drive download of {url} failed: {one_line(exc)}") from exc
    if not result or not part.is_file():
        raise DataError(
            f"Google Drive download of {url} produced no file; it may be private, deleted or over quota"
        )


def _import_gdown() -> Any:
    """gdown is optional: only Google Drive sources need it."""
    try:
        return importlib.import_module("gdown")
    except ImportError as exc:
        raise DataError(
            'Google Drive sources need gdown, which is not installed: pip install "dgbench[download]" '
            "(or pip install gdown)"
        ) from exc


def _fetch_url(url: str, part: Path, expected_size: int | None, ctx: _Context) -> None:
    """Fetch into `part`, resuming a partial file, and retry a transfer that broke off."""
    if not _is_http(url):
        part.unlink(missing_ok=True)  # file:// and the like: no Range, copy from the start
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _fetch_once(url, part, expected_size, ctx)
            return
        except _Interrupted as exc:
            if attempt == ATTEMPTS:
                raise DataError(
                    f"download of {url} broke off {ATTEMPTS} times (last: {exc}); run again to resume {part}"
                ) from exc
            ctx.say(f"{part.name}: {exc}; retrying")
            time.sleep(RETRY_DELAY_S * attempt)


def _fetch_once(url: str, part: Path, expected_size: int | None, ctx: _Context) -> None:
    offset = part.stat().st_size if part.exists() else 0
    request = Request(url, headers={"User-Agent": USER_AGENT})
    if offset and _is_http(url):
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urlopen(request, timeout=TIMEOUT_S)
    except HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            _range_not_satisfiable(part, offset, exc.headers.get("Content-Range"), expected_size)
            return
        raise DataError(f"HTTP {exc.code} {exc.reason} for {url}") from exc
    except URLError as exc:
        raise DataError(f"cannot open {url}: {one_line(exc.reason)}") from exc
    except (OSError, HTTPException) as exc:
        raise _Interrupted(one_line(exc)) from exc
    with response:
        start = _resume_start(response, part, offset)
        if offset and not start:
            ctx.say(f"{part.name}: the server cannot resume; downloading from the start")
        length = _to_int(response.headers.get("Content-Length"))
        total = start + length if length is not None else expected_size
        with open(part, "ab" if start else "wb") as out, _progress(part.name, total, start) as bar:
            received = _copy(response, out, bar)
    if length is not None and received < length:
        raise _Interrupted(f"connection closed after {start + received} of {start + length} bytes")


def _range_not_satisfiable(part: Path, offset: int, content_range: str | None, expected: int | None) -> None:
    """A 416 means the part already reaches the end: fine when its size is the file's size."""
    match = re.fullmatch(r"bytes \*/(\d+)", (content_range or "").strip())
    total = int(match.group(1)) if match else expected
    if total is not None and total != offset:
        part.unlink()
        raise _Interrupted(f"server refused to resume at byte {offset} of {total}; restarting")


def _resume_start(response: Any, part: Path, offset: int) -> int:
    """`offset` when the server sent 206 from that byte; 0 when it sent the whole file (200)."""
    if not offset or getattr(response, "status", None) != 206:
        return 0
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range") or "")
    if not match or int(match.group(1)) != offset:
        part.unlink()
        raise _Interrupted(f"server resumed at the wrong byte ({response.headers.get('Content-Range')})")
    return offset


def _copy(response: Any, out: Any, bar: Any) -> int:
    """Copy in chunks; a failed read is an interruption to resume, a failed write is not."""
    received = 0
    while True:
        try:
            chunk = response.read(CHUNK_BYTES)
        except (OSError, HTTPException) as exc:
            raise _Interrupted(f"{one_line(exc)} after {received} bytes") from exc
        if not chunk:
            return received
        out.write(chunk)
        received += len(chunk)
        bar.update(len(chunk))


def _progress(label: str, total: int | None, initial: int) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        desc=label,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not sys.stderr.isatty(),
    )


def _is_http(url: str) -> bool:
    return urlparse(url).scheme.lower() in ("http", "https")


def _to_int(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


# ---------------------------------------------------------------- steps


def _extract(step: Step, staging: Path, archives: Archives, ctx: _Context) -> None:
    name = _arg(step, "archive")
    if name not in archives:
        raise DataError(f"archive {name!r} is not one of this source's files ({', '.join(archives)})")
    dest = _inside(staging, step["into"], "into") if step.get("into") else staging
    names = safe_extract(archives[name], dest)
    ctx.say(f"extracted {len(names)} files from {name}")


def _move(step: Step, staging: Path, archives: Archives, ctx: _Context) -> None:
    src, dst = _inside(staging, _arg(step, "from"), "from"), _inside(staging, _arg(step, "to"), "to")
    if not src.exists():
        raise DataError(
            f"{step['from']!r} not found after extraction (top level: {_listing(staging)}); the archive "
            f"layout changed: fix the manifest's steps"
        )
    if dst.exists():
        raise DataError(f"cannot move {step['from']!r} to {step['to']!r}: the destination already exists")
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def _delete(step: Step, staging: Path, archives: Archives, ctx: _Context) -> None:
    for rel in _arg(step, "paths", list):
        path = _inside(staging, rel, "paths entry")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _delete_listed(step: Step, staging: Path, archives: Archives, ctx: _Context) -> None:
    """DomainBed's duplicate removal: a listed file that is not there is skipped, but counted."""
    list_path = _inside(ctx.list_dir, _arg(step, "list"), "list")
    under = _inside(staging, _arg(step, "under"), "under")
    try:
        lines = list_path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(
            f"cannot read list file {list_path}: {exc.strerror or exc}; check the manifest dir"
        ) from exc
    deleted = missing = 0
    for line in lines:
        rel = line.strip()
        if not rel or rel.startswith("#"):
            continue
        path = _inside(under, rel, f"line of {list_path.name}")
        if path.is_file():
            path.unlink()
            deleted += 1
        else:
            missing += 1
    ctx.say(f"deleted {deleted} files listed in {list_path.name}; {missing} listed files were not present")


def _terra_incognita(step: Step, staging: Path, archives: Archives, ctx: _Context) -> None:
    """DomainBed's Terra Incognita build: images of chosen locations and categories, by COCO annotations."""
    annotations_dir = _inside(staging, _arg(step, "annotations"), "annotations")
    images_dir = _inside(staging, _arg(step, "images"), "images")
    out = _inside(staging, _arg(step, "into"), "into")
    locations = {str(x) for x in _arg(step, "locations", list)}
    categories = {str(x) for x in _arg(step, "categories", list)}
    coco: dict[str, list[Any]] = {"images": [], "annotations": [], "categories": []}
    for file_name in _arg(step, "files", list):
        data = read_mapping(_inside(annotations_dir, file_name, "files entry"), "annotation file")
        for key, items in coco.items():
            items.extend(data.get(key) or [])
    try:
        copied = _copy_terra(coco, images_dir, out, locations, categories)
    except (KeyError, TypeError) as exc:
        raise DataError(f"unexpected annotation structure in {annotations_dir} (missing {exc})") from exc
    ctx.say(f"terra_incognita: copied {sum(copied.values())} images ({dict(sorted(copied.items()))})")


def _copy_terra(
    coco: Mapping[str, list[Any]], images_dir: Path, out: Path, locations: set[str], categories: set[str]
) -> Counter[str]:
    """Copy `<images>/<file>` to `<out>/location_<loc>/<category>/<file>`, once per annotated category."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    by_image: defaultdict[Any, list[Any]] = defaultdict(list)
    for annotation in coco["annotations"]:
        by_image[annotation["image_id"]].append(annotation["category_id"])
    copied: Counter[str] = Counter()
    for image in coco["images"]:
        location = str(image["location"])
        if location not in locations:
            continue
        for category in {names[c] for c in by_image.get(image["id"], [])} & categories:
            src = _inside(images_dir, image["file_name"], "file_name")
            dst = _inside(out / f"location_{location}" / category, image["file_name"], "file_name")
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(src, dst)
            except FileNotFoundError as exc:
                raise DataError(f"annotated image {src} is missing; the image archive is incomplete") from exc
            copied[f"location_{location}"] += 1
    return copied


def _locate(step: Step, staging: Path, archives: Archives, ctx: _Context) -> None:
    """Move the one folder that holds every domain folder to `to`: for mirrors of unknown layout."""
    dst = _inside(staging, _arg(step, "to"), "to")
    if not ctx.domains:
        raise DataError("op locate needs the manifest's 'domains' list")
    found = _find_domain_parents(staging, ctx.domains, LOCATE_DEPTH)
    if len(found) != 1:
        where = ", ".join(str(d.relative_to(staging)) for d in found) or "none"
        raise DataError(
            f"need exactly one folder holding the domain folders {list(ctx.domains)}, found: {where}"
        )
    if found[0] == dst:
        return
    if dst.exists() and dst not in found[0].parents:
        raise DataError(f"cannot move {found[0].relative_to(staging)} to {step['to']!r}: it already exists")
    parked = staging / ".dgbench-located"
    parked.mkdir()
    for domain in ctx.domains:  # only the domains: siblings (READMEs, __MACOSX) are left behind
        os.replace(found[0] / domain, parked / domain)
    if dst.exists():
        shutil.rmtree(dst)  # what is left of the wrapper folder the dataset was found in
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(parked, dst)


def _find_domain_parents(top: Path, domains: Sequence[str], depth: int) -> list[Path]:
    """Folders (down to `depth` levels) that contain every domain folder; matches are not descended."""
    found, level = [], [top]
    for _ in range(depth + 1):
        found.extend(d for d in level if all((d / x).is_dir() for x in domains))
        level = [
            child
            for parent in level
            if parent not in found
            for child in sorted(parent.iterdir())
            if child.is_dir() and not child.is_symlink() and not child.name.startswith((".", "__MACOSX"))
        ]
    return found


STEP_OPS: dict[str, Callable[[Step, Path, Archives, _Context], None]] = {
    "extract": _extract,
    "move": _move,
    "delete": _delete,
    "delete_listed": _delete_listed,
    "terra_incognita": _terra_incognita,
    "locate": _locate,
}


# ---------------------------------------------------------------- helpers


def _arg(step: Mapping[str, Any], key: str, kind: type = str) -> Any:
    value = step.get(key)
    if not isinstance(value, kind) or not value:
        raise DataError(f"needs a non-empty {kind.__name__} {key!r}, got {value!r}; fix the manifest")
    return value


def _inside(base: Path, rel: Any, what: str) -> Path:
    """`base / rel` for a relative manifest path; no manifest path may reach outside `base`."""
    if not isinstance(rel, str) or not rel:
        raise DataError(f"{what} must be a non-empty relative path, got {rel!r}")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts:
        raise DataError(f"{what} {rel!r} must be a relative path without '..'")
    return base.joinpath(*pure.parts)


def _listing(path: Path, limit: int = 10) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return (", ".join(names[:limit]) or "empty") + more
