"""Image datasets stored in DomainBed's folder layout, described by a manifest.

Layout: `<data root>/<dir>/<domain>/<class>/.../<file>`. Each domain is indexed in
torchvision `ImageFolder` order (sorted classes; per class `sorted(os.walk(...))`,
then sorted file names; extension filter, case-insensitive), because DomainBed's
split keys are positions in that order: any other order gives other splits.

Unlike DomainBed, the domain and class lists come from the manifest
(`datasets_manifest/<name>.yaml`), not from whatever folders exist, and the tree is
checked against them: a stray `__MACOSX/` folder or a missing class folder would
silently shift DomainBed's env indices or labels, so here they are errors. A
manifest without `classes` falls back to the class folders of its first domain
(every other domain must then have the same ones).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import dgbench
from dgbench.data.base import DATA_ENV, DatasetConfig, DomainData, MultiDomainDataset, data_root
from dgbench.errors import ConfigError, DataError, one_line
from dgbench.registry import DATASETS

# torchvision's IMG_EXTENSIONS, which DomainBed's ImageFolder uses (matched lower-cased).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

ManifestSource = str | os.PathLike | Mapping[str, Any]


# ---------------------------------------------------------------- manifests


def manifest_dir() -> Path:
    """`datasets_manifest/` at the repository root (it ships with the source checkout)."""
    return Path(dgbench.__file__).resolve().parents[1] / "datasets_manifest"


def load_manifest(source: ManifestSource) -> dict[str, Any]:
    """A checked manifest, from a dataset name, a YAML file path, or a mapping (tests)."""
    if isinstance(source, DictConfig):
        source = OmegaConf.to_container(source, resolve=True)  # type: ignore[assignment]
    if isinstance(source, Mapping):
        manifest, where = dict(source), f"manifest {source.get('name', '?')!r}"
    else:
        path = _manifest_path(source)
        manifest, where = read_mapping(path), str(path)
        manifest.setdefault("_dir", str(path.parent))  # where its data files (checksum lists) live
    _check_manifest(manifest, where)
    return manifest


def manifest_data_file(manifest: Mapping[str, Any], file_name: str) -> Path:
    """A data file named by a manifest (checksum or duplicate list), beside the manifest file."""
    path = Path(manifest.get("_dir") or manifest_dir()) / file_name
    if not path.is_file():
        raise DataError(
            f"manifest {manifest.get('name', '?')!r} names data file {file_name!r}, but {path} does not "
            f"exist; restore it from the dgbench repository"
        )
    return path


def _manifest_path(source: str | os.PathLike) -> Path:
    """A name resolves inside `manifest_dir()`; anything that looks like a path is taken as one."""
    text = os.fspath(source)
    if isinstance(source, os.PathLike) or text.endswith((".yaml", ".yml")) or "/" in text or os.sep in text:
        return Path(text)
    folder = manifest_dir()
    if not folder.is_dir():
        raise DataError(
            f"dataset manifests not found: {folder} does not exist; dgbench reads them from its source "
            f"checkout, so install it from the repository (pip install -e .)"
        )
    path = folder / f"{text}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "(none)"
        raise ConfigError(f"no manifest for dataset {text!r} in {folder}; known: {known}")
    return path


def read_mapping(path: Path, what: str = "manifest") -> dict[str, Any]:
    """A YAML or `.json` file holding a mapping, as plain containers.

    Manifests and annotation files are data, not Hydra configs; JSON goes through `json`
    (TerraIncognita's annotation files are large). Errors name the file and what it is.
    """
    is_json = path.suffix.lower() == ".json"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f) if is_json else yaml.safe_load(f)
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        kind = "JSON" if is_json else "YAML"
        raise DataError(f"{what} {path} is not valid {kind}: {one_line(exc)}") from exc
    if not isinstance(data, dict):
        raise DataError(f"{what} {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _check_manifest(manifest: Mapping[str, Any], where: str) -> None:
    """Fail on manifests that would index a dataset differently from DomainBed."""
    for key in ("name", "dir"):
        if not isinstance(manifest.get(key), str) or not manifest[key]:
            raise DataError(f"{where}: key {key!r} must be a non-empty string")
    domains = manifest.get("domains")
    if not isinstance(domains, list) or not domains:
        raise DataError(f"{where}: key 'domains' must be a non-empty list")
    _check_names(domain_names(manifest), "domains", where)
    if manifest.get("classes") is not None:
        if not isinstance(manifest["classes"], list) or not manifest["classes"]:
            raise DataError(f"{where}: key 'classes' must be a non-empty list (or absent)")
        _check_names(manifest["classes"], "classes", where)
    counts = _per_domain(manifest.get("counts") or {})
    if not isinstance(counts, Mapping) or not all(_is_int(v) for v in counts.values()):
        raise DataError(f"{where}: 'counts' must map domain names to integers, got {counts}")
    if unknown := sorted(set(counts) - set(domain_names(manifest))):
        raise DataError(f"{where}: 'counts' names unknown domain(s) {', '.join(map(str, unknown))}")


def manifest_names() -> list[str]:
    """Every dataset described in `datasets_manifest/` (each is registered as a folder dataset)."""
    folder = manifest_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def manifest_fingerprint(manifest: Mapping[str, Any]) -> str:
    """A short hash of what decides how a tree is indexed: dir, version, domains and classes."""
    keys = {k: manifest.get(k) for k in ("name", "dir", "version", "domains", "classes")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def protocol_defaults(manifest: Mapping[str, Any], protocol: str) -> dict[str, int]:
    """`steps` and `checkpoint_freq` under `protocol`: `protocols.<protocol>` entry, else the top
    level, else DomainBed's (`MultiDomainDataset`'s), as `FolderDataset` takes its own."""
    defaults = {k: int(manifest.get(k, getattr(MultiDomainDataset, k))) for k in ("steps", "checkpoint_freq")}
    defaults.update((manifest.get("protocols") or {}).get(protocol) or {})
    return defaults


def _check_names(names: Sequence[Any], key: str, where: str) -> None:
    """Names must be unique strings in Python sort order: DomainBed numbers folders by that order."""
    if not all(isinstance(n, str) and n for n in names):
        raise DataError(
            f"{where}: every entry of {key!r} must be a non-empty string (quote YAML words "
            f"like yes/no/on/null), got {list(names)}"
        )
    if len(set(names)) != len(names):
        raise DataError(f"{where}: {key!r} lists a name twice: {list(names)}")
    if list(names) != sorted(names):
        raise DataError(
            f"{where}: {key!r} must be in Python sort order (DomainBed's index order), "
            f"expected {sorted(names)}"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def domain_names(manifest: Mapping[str, Any]) -> list[str]:
    """Domain names, whether listed as strings or as `{name: ..., label: ...}` entries."""
    return [d.get("name") if isinstance(d, Mapping) else d for d in manifest["domains"]]


def domain_counts(manifest: Mapping[str, Any]) -> dict[str, int]:
    """Expected images per domain, from `counts: {domain: n}` or `counts: {per_domain: {...}}`."""
    return dict(_per_domain(manifest.get("counts") or {}))


def _per_domain(counts: Any) -> Any:
    """The flat form `{domain: n}`, or `per_domain` of the structured form `{total, per_domain, ...}`."""
    if not isinstance(counts, Mapping):
        return counts
    if "per_domain" in counts or "total" in counts:
        return counts.get("per_domain") or {}
    return counts


# ---------------------------------------------------------------- indexing


def find_classes(domain_dir: str | os.PathLike) -> list[str]:
    """Sorted sub-folder names of a domain folder, as ImageFolder finds them."""
    with os.scandir(domain_dir) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def list_class_files(domain_dir: str | os.PathLike, class_name: str) -> list[str]:
    """Image paths `<class>/.../<file>` ('/'-separated) of one class folder, in ImageFolder order.

    ImageFolder sorts `os.walk` tuples, that is, whole directory path strings: `a-b/`
    comes before `a/c/` because '-' < '/'. Sorting path components would differ.
    """
    domain_dir = os.fspath(domain_dir)
    walk = sorted(os.walk(os.path.join(domain_dir, class_name), followlinks=True), key=lambda t: t[0])
    files = []
    for dirpath, _, filenames in walk:
        rel = os.path.relpath(dirpath, domain_dir).replace(os.sep, "/")
        files.extend(f"{rel}/{f}" for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    return files


def read_image(path: str) -> Image.Image:
    """The image at `path` as RGB; a file PIL cannot read raises a one-line DataError naming it.

    Shared by the per-sample loader and the decoded-image cache, so both fail (or skip) the same files.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot read image {path}: {one_line(exc)}; re-download or verify the dataset, "
            f"or delete this file"
        ) from exc


class FolderDomain(DomainData):
    """One domain folder, indexed in ImageFolder order; images are read on demand.

    `ids` are paths relative to the domain folder (`<class>/<file>`), labels are
    positions in `classes` (default: the domain's sorted class folders).
    `arrays` and `unreadable` are set only for `data.pipeline=fast`, by
    `dgbench.data.image_cache.attach_arrays`: every image decoded once (a read-only
    memory map) and the rows whose file could not be read.
    """

    arrays: np.ndarray | None = None
    unreadable: np.ndarray | None = None

    def __init__(
        self,
        root: str | os.PathLike,
        classes: Sequence[str] | None = None,
        name: str | None = None,
        index: tuple[list[str], np.ndarray] | None = None,
    ) -> None:
        self.root = Path(root)
        self.name = name or self.root.name
        self.classes = list(classes) if classes is not None else find_classes(self.root)
        if index is None:  # walk now; FolderDataset passes a (cached) index instead
            per_class = [list_class_files(self.root, c) for c in self.classes]
            labels = np.repeat(np.arange(len(self.classes), dtype=np.int64), [len(f) for f in per_class])
            index = ([f for files in per_class for f in files], labels)
        self.ids: list[str] = index[0]
        self.labels = index[1]

    @cached_property
    def paths(self) -> list[str]:
        """Full file paths (built on first use: DomainNet has 586k of them)."""
        return [self.path(i) for i in range(len(self.ids))]

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.ids[index])

    def load_image(self, index: int) -> Image.Image:
        """The image as RGB; a file PIL cannot read raises a one-line DataError naming it."""
        return read_image(self.path(index))

    def __repr__(self) -> str:
        return f"FolderDomain({str(self.root)!r}, {len(self)} images, {len(self.classes)} classes)"


class FolderDataset(MultiDomainDataset):
    """The domains of one manifest, read from `dataset_dir` after checking its layout."""

    def __init__(self, dataset_dir: str | os.PathLike, manifest: ManifestSource) -> None:
        manifest = load_manifest(manifest)
        self.root = Path(dataset_dir)
        self.manifest = manifest
        name, domains = manifest["name"], domain_names(manifest)
        _check_domain_dirs(self.root, name, domains)
        classes = manifest.get("classes") or find_classes(self.root / domains[0])
        allow_missing = bool(manifest.get("allow_missing_classes", False))
        present = _check_class_dirs(self.root, name, domains, classes, allow_missing)
        from dgbench.data.index_cache import index_domains  # imports this module

        index = index_domains(self.root, domains, classes, version=manifest_fingerprint(manifest))
        super().__init__([FolderDomain(self.root / d, classes, d, index[d]) for d in domains], classes)
        self.name = name
        for key in ("resolution", "steps", "checkpoint_freq"):
            setattr(self, key, int(manifest.get(key, getattr(self, key))))
        _check_images(self, present)

    def protocol_defaults(self, protocol: str) -> dict[str, int]:
        return protocol_defaults(self.manifest, protocol)


def _check_domain_dirs(dataset_dir: Path, name: str, domains: Sequence[str]) -> None:
    """Exactly the manifest's domain folders: DomainBed would make any other folder an env."""
    if not dataset_dir.is_dir():
        raise DataError(
            f"{name}: dataset folder {dataset_dir} not found; run `dgbench data download {name} --root "
            f"{dataset_dir.parent}`, or set dataset.root= (or ${DATA_ENV}) to the folder that contains "
            f"{dataset_dir.name}/"
        )
    present = set(find_classes(dataset_dir))  # every sub-folder, as DomainBed lists envs
    problems = []
    if missing := [d for d in domains if d not in present]:
        problems.append(f"domain folder(s) missing: {', '.join(missing)} (incomplete: download it again)")
    if extra := sorted(present - set(domains)):
        problems.append(
            f"unexpected folder(s): {', '.join(extra)} (DomainBed would count each as a domain and "
            f"shift every env index: delete or move them)"
        )
    if problems:
        raise DataError(
            f"{name}: {dataset_dir} does not match the manifest's domains "
            f"[{', '.join(domains)}]: {'; '.join(problems)}"
        )


def _check_class_dirs(
    dataset_dir: Path, name: str, domains: Sequence[str], classes: Sequence[str], allow_missing: bool
) -> dict[str, list[str]]:
    """The same class folders in every domain: ImageFolder labels are positions among them.

    With `allow_missing` (TerraIncognita: not every animal is seen at every camera), a domain may
    lack some class folders; labels still come from the global class list. Returns the classes
    present per domain.
    """
    if not classes:
        raise DataError(f"{name}: no class folders in {dataset_dir / domains[0]}; re-download the dataset")
    problems = []
    found = {}
    for domain in domains:
        present = set(find_classes(dataset_dir / domain))
        found[domain] = [c for c in classes if c in present]
        missing = [c for c in classes if c not in present]
        extra = sorted(present - set(classes))
        if missing and not allow_missing:
            problems.append(f"{domain} lacks class folder(s) {', '.join(missing)}")
        if extra:
            problems.append(f"{domain} has unexpected class folder(s) {', '.join(extra)}")
    if problems:
        raise DataError(
            f"{name}: class folders in {dataset_dir} differ from the {len(classes)} expected classes: "
            f"{'; '.join(problems)}; labels would not match DomainBed's: restore the missing folders "
            f"(re-download the dataset) and remove the unexpected ones"
        )
    return found


def _check_images(dataset: FolderDataset, present: Mapping[str, Sequence[str]]) -> None:
    """Fail on an empty class folder (ImageFolder does too); warn when a domain's count is off."""
    empty = [
        f"{d.name}/{dataset.classes[c]}"
        for d in dataset.domain_data
        for c in np.flatnonzero(np.bincount(d.labels, minlength=len(dataset.classes)) == 0)
        if dataset.classes[c] in present[d.name]  # an absent folder is allowed or already an error
    ]
    if empty:
        raise DataError(
            f"{dataset.name}: no image files in {', '.join(empty)} under {dataset.root} "
            f"(extensions: {' '.join(IMAGE_EXTENSIONS)}); re-download the dataset"
        )
    expected = domain_counts(dataset.manifest)
    wrong = [
        f"{d.name} {len(d)} (expected {expected[d.name]})"
        for d in dataset.domain_data
        if d.name in expected and len(d) != expected[d.name]
    ]
    if wrong:
        warnings.warn(
            f"{dataset.name}: image counts in {dataset.root} differ from the manifest: {', '.join(wrong)}; "
            f"in/out splits will not match DomainBed's: verify or re-download the dataset",
            stacklevel=3,
        )


# ---------------------------------------------------------------- registration


@dataclass(kw_only=True)
class FolderConfig(DatasetConfig):
    """Config of a folder dataset: only the shared keys; the manifest describes the data."""

    def domain_names(self) -> list[str]:
        return domain_names(load_manifest(self.name))


def build_folder_dataset(cfg: Any, manifest: ManifestSource | None = None) -> FolderDataset:
    """Build `<data root>/<manifest dir>` for `cfg.name` (or an explicit manifest, for tests)."""
    name = _cfg_get(cfg, "name")
    manifest = load_manifest(manifest if manifest is not None else name)
    return FolderDataset(data_root(_cfg_get(cfg, "root")) / manifest["dir"], manifest)


def _cfg_get(cfg: Any, key: str) -> Any:
    """Read a key from a DictConfig, a dataclass or a plain dict alike."""
    return cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)


def _register() -> None:
    for name in manifest_names():
        DATASETS.register(name, FolderConfig, build_folder_dataset)


_register()
