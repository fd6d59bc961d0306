"""`dgbench data list|info|download|verify|split|cache`: obtain, inspect and audit datasets.

`--root` is the data root, the folder that holds `PACS/`, `VLCS/`, `domain_net/`...
(default: `$DGBENCH_DATA`, else `./data`), the same one training reads through
`dataset.root`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dgbench.data.base import DATA_ENV, data_root
from dgbench.data.folder import domain_counts, domain_names, load_manifest, manifest_names
from dgbench.errors import ConfigError

PROG = "dgbench data"


def main(argv: Sequence[str]) -> int:
    """Run one `dgbench data` subcommand; returns the exit status."""
    args = _parser().parse_args(list(argv))
    return int(args.run(args) or 0)


def positive_int(text: str) -> int:
    """argparse type: an integer above 0 (a 0 would fall through to the default, or fail deep down)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    root_help = f"data root holding the dataset folders (default: ${DATA_ENV}, else ./data)"

    sub = commands.add_parser("list", help="datasets, whether present under the data root, size on disk")
    sub.add_argument("--root", help=root_help)
    sub.set_defaults(run=_list)

    sub = commands.add_parser("info", help="domains, classes, counts, sources, license of a dataset")
    sub.add_argument("name")
    sub.set_defaults(run=_info)

    sub = commands.add_parser("download", help="download, verify and unpack a dataset into the data root")
    sub.add_argument("name")
    sub.add_argument("--root", help=root_help)
    sub.add_argument("--keep-archives", action="store_true", help="keep the downloaded archives")
    sub.set_defaults(run=_download)

    sub = commands.add_parser("verify", help="check a dataset tree against its manifest")
    sub.add_argument("name")
    sub.add_argument("--root", help=root_help)
    sub.add_argument("--checksums", action="store_true", help="also compare every file's sha256")
    sub.add_argument("--decode", action="store_true", help="also decode every image")
    sub.set_defaults(run=_verify)

    sub = commands.add_parser(
        "split", help="the `out` (held-out) file list of every domain, as DomainBed splits"
    )
    sub.add_argument("name")
    sub.add_argument("--root", help=root_help)
    sub.add_argument("--trial-seed", type=int, default=0)
    sub.add_argument("--holdout-fraction", type=float, default=0.2)
    sub.add_argument("--format", choices=("json", "text"), default="json")
    sub.set_defaults(run=_split)

    sub = commands.add_parser(
        "cache", help="decode a dataset once into the image cache that data.pipeline=fast reads"
    )
    sub.add_argument("name")
    sub.add_argument("--root", help=root_help)
    sub.add_argument(
        "--resolution", type=positive_int, help="side in px (default: the dataset's, as training)"
    )
    sub.add_argument("--workers", type=positive_int, help="decoding processes (default: the usable cores)")
    sub.set_defaults(run=_cache)
    return parser


def _manifest(name: str) -> dict[str, Any]:
    if name not in manifest_names():
        raise ConfigError(
            f"no manifest for dataset {name!r}; datasets with manifests: {', '.join(manifest_names())}"
        )
    return load_manifest(name)


# ---------------------------------------------------------------- list / info


def _list(args: argparse.Namespace) -> int:
    root = data_root(args.root)
    print(f"data root: {root}")
    print(f"{'dataset':<16} {'folder':<16} {'domains':>7} {'classes':>7} {'images':>9}  status")
    for name in manifest_names():
        manifest = load_manifest(name)
        folder = root / manifest["dir"]
        images = (manifest.get("counts") or {}).get("total") or sum(domain_counts(manifest).values())
        print(
            f"{name:<16} {manifest['dir'] + '/':<16} {len(domain_names(manifest)):>7} "
            f"{len(manifest['classes']):>7} {images:>9,}  {_presence(folder, domain_names(manifest))}"
        )
    return 0


def _presence(folder: Path, domains: list[str]) -> str:
    if not folder.is_dir():
        return "not downloaded"
    missing = [d for d in domains if not (folder / d).is_dir()]
    if missing:
        return f"incomplete (missing {', '.join(missing)})"
    files, size = _tree_size(folder)
    return f"present, {files:,} files, {size / 2**30:.2f} GiB"


def _tree_size(folder: Path) -> tuple[int, int]:
    files = size = 0
    stack = [os.fspath(folder)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    files += 1
                    size += entry.stat(follow_symlinks=False).st_size
    return files, size


def _info(args: argparse.Namespace) -> int:
    manifest = _manifest(args.name)
    counts = manifest.get("counts") or {}
    per_domain, per_class = domain_counts(manifest), counts.get("per_class") or {}
    print(f"{manifest['name']}: <root>/{manifest['dir']}/<domain>/<class>/<image>")
    print(f"domains ({len(domain_names(manifest))}, env index order):")
    for index, domain in enumerate(domain_names(manifest)):
        count = f"{per_domain[domain]:,} images" if domain in per_domain else "count not established"
        print(f"  {index}  {domain:<16} {count}")
    if counts.get("total"):
        print(f"  total {counts['total']:,} images")
    classes = manifest["classes"]
    print(f"classes ({len(classes)}, label order): {', '.join(classes)}")
    if per_class:
        _print_class_table(per_class, classes)
    defaults = {k: manifest.get(k) for k in ("resolution", "steps", "checkpoint_freq")}
    print("protocol defaults: " + ", ".join(f"{k} {v}" for k, v in defaults.items()))
    for protocol, values in (manifest.get("protocols") or {}).items():
        print(f"  protocol={protocol}: " + ", ".join(f"{k} {v}" for k, v in values.items()))
    print("sources (tried in this order by `dgbench data download`):")
    for source in manifest.get("sources") or []:
        print(f"  - {source.get('id')} [{source.get('kind')}] status: {source.get('status', 'unknown')}")
        for file in source.get("files") or []:
            checks = ", ".join(
                f"{key} {file[key]}" for key in ("size_bytes", "sha256", "md5") if file.get(key) is not None
            )
            print(f"      {file.get('url')}" + (f"  ({checks})" if checks else "  (no checksum known)"))
        if source.get("url"):
            print(f"      {source['url']}")
        if source.get("note"):
            print(f"      note: {' '.join(str(source['note']).split())}")
    for key in ("license", "citation"):
        if manifest.get(key):
            print(f"{key}: {' '.join(str(manifest[key]).split())}")
    return 0


def _print_class_table(per_class: Mapping[str, Mapping[str, int]], classes: list[str]) -> None:
    width = max(len(d) for d in per_class)
    print(f"  {'':<{width}}  " + " ".join(f"{c[:8]:>8}" for c in classes))
    for domain, row in per_class.items():
        print(f"  {domain:<{width}}  " + " ".join(f"{row.get(c, 0):>8,}" for c in classes))


# ---------------------------------------------------------------- download / verify


def _download(args: argparse.Namespace) -> int:
    from dgbench.data.download import download_dataset
    from dgbench.data.verify import require_valid

    manifest = _manifest(args.name)
    checksums = bool((manifest.get("verify") or {}).get("per_file_sha256"))
    target = download_dataset(
        manifest,
        data_root(args.root),
        check=lambda staged: require_valid(manifest, staged, checksums=checksums),
        keep_archives=args.keep_archives,
    )
    print(f"{manifest['name']} is ready at {target}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from dgbench.data.verify import format_report, verify_dataset

    manifest = _manifest(args.name)
    report = verify_dataset(
        manifest,
        data_root(args.root) / manifest["dir"],
        checksums=args.checksums,
        decode=args.decode,
        progress=sys.stderr.isatty(),
    )
    print(format_report(report, manifest))
    return 0 if report.ok else 1


# ---------------------------------------------------------------- split / cache


def _dataset(args: argparse.Namespace) -> Any:
    from dgbench.components import load_components
    from dgbench.registry import DATASETS

    load_components()
    entry = DATASETS.get(args.name)
    return entry.obj(entry.config(name=args.name, root=args.root))


def _split(args: argparse.Namespace) -> int:
    from dgbench.data.splits import split_indices

    dataset = _dataset(args)
    out = {}
    for index, domain in enumerate(dataset):
        held_out, _ = split_indices(len(domain), args.holdout_fraction, args.trial_seed, index)
        out[domain.name] = [domain.ids[i] for i in held_out]
    if args.format == "json":
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        for domain, ids in out.items():
            print("\n".join(f"{domain}/{i}" for i in ids))
    return 0


def _cache(args: argparse.Namespace) -> int:
    """Build (or find and verify) the decoded-image cache of every domain, as a training run would."""
    from dgbench.data.folder import FolderDataset
    from dgbench.data.image_cache import attach_arrays

    dataset = _dataset(args)
    if not isinstance(dataset, FolderDataset):
        raise ConfigError(f"{args.name} is held in memory already: data.pipeline=fast needs no cache for it")
    resolution = args.resolution or dataset.resolution
    attach_arrays(dataset, resolution, skip_corrupt=True, workers=args.workers)
    unreadable = 0
    for domain in dataset.domain_data:
        arrays = domain.arrays
        unreadable += len(domain.unreadable)
        print(
            f"{domain.name}: {len(arrays):,} images at {resolution} px, {arrays.nbytes / 1e9:.2f} GB, "
            f"{len(domain.unreadable)} unreadable: {arrays.filename}"
        )
    if unreadable:
        print(
            f"{unreadable} unreadable images: training stops on them unless data.skip_corrupt=true; "
            f"`dgbench data verify {args.name} --decode` lists them"
        )
    return 0
