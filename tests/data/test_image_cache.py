"""Decoded-image cache: rows equal the reference eval resize, keyed on the files, crash-safe, verified.

Tiny generated folder datasets (JPEG and PNG, odd sizes, one non-RGB mode) in tmp dirs; the real
PACS (one class of one domain) when present.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dgbench.data import image_cache
from dgbench.data.folder import FolderDataset, FolderDomain, build_folder_dataset, manifest_fingerprint
from dgbench.data.image_cache import attach_arrays, cache_key, domain_arrays
from dgbench.data.transforms import EvalTransform
from dgbench.errors import DataError
from dgbench.records import read_records, without_timing
from dgbench.train import train

RES = 16
# (relative path, (width, height), mode): JPEG and PNG, larger and smaller than RES, non-square,
# grayscale and palette sources (converted to RGB before resizing, as the reference does).
FILES = [
    ("d0/cat/1.jpg", (23, 17), "RGB"),
    ("d0/cat/2.png", (16, 16), "RGB"),
    ("d0/cat/3.png", (9, 30), "L"),
    ("d0/dog/1.jpg", (40, 40), "RGB"),
    ("d0/dog/2.png", (12, 7), "P"),
    ("d1/cat/a.png", (20, 13), "RGB"),
    ("d1/cat/b.jpg", (31, 31), "RGB"),
    ("d1/dog/c.png", (16, 24), "RGBA"),
    ("d1/dog/d.jpg", (17, 16), "RGB"),
]


def write_image(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    """Random pixels, so that a resize error or a row mix-up cannot go unnoticed."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")


def make_images(root: Path, files: list[tuple[str, tuple[int, int], str]] = FILES) -> tuple[Path, dict]:
    """`<root>/Tiny/{d0,d1}/{cat,dog}/...` and its manifest (training resolution RES)."""
    for seed, (rel, size, mode) in enumerate(files):
        write_image(root / "Tiny" / rel, size, mode, seed)
    manifest = {
        "name": "tiny",
        "dir": "Tiny",
        "version": 1,
        "domains": ["d0", "d1"],
        "classes": ["cat", "dog"],
        "resolution": RES,
        "steps": 5,
        "checkpoint_freq": 2,
    }
    return root, manifest


def build(root: Path, manifest: dict) -> FolderDataset:
    """The dataset as `dataset=<name> dataset.root=<root>` builds it (as in test_folder.py)."""
    return build_folder_dataset({"name": manifest["name"], "root": str(root)}, manifest)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache root via $DGBENCH_CACHE."""
    path = tmp_path / "cache"
    monkeypatch.setenv("DGBENCH_CACHE", str(path))
    return path


@pytest.fixture
def tiny(tmp_path: Path, cache: Path) -> FolderDataset:
    return build(*make_images(tmp_path))


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every file the cache decodes (in-process builds only: workers=1)."""
    calls: list[str] = []
    real = image_cache.decode_image

    def counting(path: str, resolution: int) -> np.ndarray:
        calls.append(path)
        return real(path, resolution)

    monkeypatch.setattr(image_cache, "decode_image", counting)
    return calls


def arrays_of(domain: FolderDomain, dataset: FolderDataset, resolution: int = RES, **kwargs) -> np.ndarray:
    version = manifest_fingerprint(dataset.manifest)
    return domain_arrays(domain, dataset.name, version, resolution, progress=False, **kwargs)[0]


def cache_files(cache: Path) -> list[Path]:
    """Every file under the cache's image folder (temp files included, the lock file not)."""
    return sorted(p for p in (cache / "images").rglob("*") if p.is_file() and p.name != ".lock")


def reference_rows(domain: FolderDomain, resolution: int) -> np.ndarray:
    """EvalTransform before normalisation (mean 0, std 1), back to uint8: what a row must hold."""
    transform = EvalTransform(resolution, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    rows = [transform(domain.load_image(i)) for i in range(len(domain))]
    return (torch.stack(rows) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------- content


@pytest.mark.parametrize("workers", [1, 2])
def test_rows_equal_the_reference_eval_resize_exactly(
    tiny: FolderDataset, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same PIL resize as EvalTransform: identical uint8 pixels (tolerance 0), pool or in-process."""
    monkeypatch.setattr(image_cache, "CHUNK", 2)  # several chunks, so workers=2 really uses the pool
    for domain in tiny:
        got = arrays_of(domain, tiny, workers=workers)
        assert (
            isinstance(got, np.memmap) and got.dtype == np.uint8 and got.shape == (len(domain), RES, RES, 3)
        )
        assert not got.flags.writeable
        np.testing.assert_array_equal(got, reference_rows(domain, RES))


def test_attach_arrays_feeds_the_fast_pipeline_the_reference_eval_batches(tiny: FolderDataset) -> None:
    """Through FastSplit + eval_batch, the normalised eval input equals EvalTransform's bit for bit."""
    from dgbench.data.fast import FastSplit, eval_batches

    attach_arrays(tiny, RES, skip_corrupt=False, progress=False)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    transform = EvalTransform(RES, mean, std)
    domain = tiny[1]
    indices = [3, 0, 2]
    (images, labels, skipped), *_ = eval_batches(
        FastSplit(domain, indices, torch.device("cpu")), 8, RES, mean, std
    )
    want = torch.stack([transform(domain.load_image(i)) for i in indices])
    assert torch.equal(images, want) and labels.tolist() == domain.labels[indices].tolist() and skipped == 0


# ------------------------------------------------------------------- reuse and keys


def test_second_load_decodes_nothing(
    tiny: FolderDataset, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attach_arrays(tiny, RES, skip_corrupt=False, progress=False)
    first = [np.array(d.arrays) for d in tiny]

    def no_decoding(*_: object) -> np.ndarray:
        raise AssertionError("decoded an image although the cache holds it")

    monkeypatch.setattr(image_cache, "decode_image", no_decoding)
    again = build(tiny.root.parent, tiny.manifest)  # as the next run of a sweep sees it
    attach_arrays(again, RES, skip_corrupt=False, progress=False)
    for domain, want in zip(again, first, strict=True):
        np.testing.assert_array_equal(domain.arrays, want)
    assert len(cache_files(cache)) == 4  # one .npy and one .json per domain


def test_key_follows_each_file_and_the_resolution(tiny: FolderDataset, decodes: list[str]) -> None:
    domain = tiny[0]
    version = manifest_fingerprint(tiny.manifest)
    key = cache_key(domain, tiny.name, version, RES)
    assert cache_key(domain, tiny.name, version, RES) == key
    assert cache_key(domain, tiny.name, version, RES + 1) != key
    assert cache_key(domain, tiny.name, "other manifest", RES) != key
    path = Path(domain.path(1))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: mtime only
    touched = cache_key(domain, tiny.name, version, RES)
    assert touched != key
    write_image(path, (30, 30), "RGB", seed=99)  # rewritten: new size and content
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime restored
    assert cache_key(domain, tiny.name, version, RES) not in (key, touched)


def test_a_changed_file_or_resolution_rebuilds(tiny: FolderDataset, cache: Path, decodes: list[str]) -> None:
    domain = tiny[0]
    arrays_of(domain, tiny, workers=1)
    arrays_of(domain, tiny, workers=1)
    assert len(decodes) == len(domain)  # built once
    write_image(Path(domain.path(0)), (50, 20), "RGB", seed=7)
    got = arrays_of(domain, tiny, workers=1)
    assert len(decodes) == 2 * len(domain)
    np.testing.assert_array_equal(got, reference_rows(domain, RES))
    assert arrays_of(domain, tiny, resolution=8, workers=1).shape[1:3] == (8, 8)
    assert len(decodes) == 3 * len(domain)


def test_old_keys_are_pruned(tiny: FolderDataset, cache: Path) -> None:
    domain = tiny[0]
    for seed in range(4):  # four file states, four keys
        write_image(Path(domain.path(0)), (20, 20), "RGB", seed=100 + seed)
        arrays_of(domain, tiny, workers=1)
        time.sleep(0.01)  # distinct mtimes for the newest-first order
    kept = [p for p in cache_files(cache) if p.suffix == ".npy"]
    assert len(kept) == image_cache.KEEP_PER_DOMAIN


def test_a_second_builder_waits_for_the_first(tiny: FolderDataset, cache: Path, decodes: list[str]) -> None:
    """Parallel runs of a sweep: one builds, the others wait on the lock and then open its file."""
    import fcntl
    import threading

    folder = cache / "images" / "tiny"
    folder.mkdir(parents=True)
    waiter = threading.Thread(target=arrays_of, args=(tiny[0], tiny), kwargs={"workers": 1})
    with open(folder / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # "another process" is building
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive() and decodes == []
    waiter.join(30)
    assert not waiter.is_alive() and len(decodes) == len(tiny[0])


# ------------------------------------------------------------------- interruption


def test_a_build_that_raises_midway_leaves_nothing(
    tiny: FolderDataset, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image_cache, "CHUNK", 2)
    real = image_cache._decode_chunk
    calls = {"n": 0}

    def dies_on_the_second_chunk(*args: object) -> list:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(image_cache, "_decode_chunk", dies_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        arrays_of(tiny[0], tiny, workers=1)
    assert cache_files(cache) == []  # no .npy, no sidecar, no temp file
    monkeypatch.setattr(image_cache, "_decode_chunk", real)
    np.testing.assert_array_equal(arrays_of(tiny[0], tiny, workers=1), reference_rows(tiny[0], RES))


KILLED_BUILDER = """
import multiprocessing, sys, time
multiprocessing.set_start_method("fork", force=True)  # the workers see the slowed decoder below
from dgbench.data import image_cache
from dgbench.data.folder import FolderDataset
real = image_cache.decode_image
def slow(path, resolution):
    time.sleep(0.3)
    return real(path, resolution)
image_cache.decode_image = slow
image_cache.CHUNK = 2  # several chunks: two pool workers write into the temp file
dataset = FolderDataset(sys.argv[1], sys.argv[2])
image_cache.attach_arrays(dataset, int(sys.argv[3]), skip_corrupt=False, workers=2, progress=False)
"""


def test_a_killed_build_leaves_no_cache_and_the_next_run_rebuilds(tmp_path: Path, cache: Path) -> None:
    """SIGKILL mid-build (pool workers writing): only a temp file remains; the next build removes it."""
    root, manifest = make_images(tmp_path)
    manifest_file = tmp_path / "tiny.yaml"
    manifest_file.write_text(yaml.safe_dump(manifest))
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILDER, str(root / "Tiny"), str(manifest_file), str(RES)],
        start_new_session=True,  # its pool workers die with it (killpg)
    )
    deadline = time.time() + 60
    while not list((cache / "images").rglob(".*.tmp")) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # a few rows written
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    left = cache_files(cache)
    assert left and all(p.name.endswith(".tmp") for p in left), left  # nothing that looks finished
    dataset = build(root, manifest)
    attach_arrays(dataset, RES, skip_corrupt=False, workers=1, progress=False)
    assert not any(p.name.endswith(".tmp") for p in cache_files(cache))
    np.testing.assert_array_equal(dataset[0].arrays, reference_rows(dataset[0], RES))


# ------------------------------------------------------------------- verification


def corrupt_truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 100)


def corrupt_flip_sampled_row(path: Path) -> None:
    """Flip one byte in the middle of the last row (always among the sampled rows)."""
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size - RES * RES * 3 // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def corrupt_sidecar(path: Path) -> None:
    path.with_suffix(".json").write_text("{not json")


def remove_sidecar(path: Path) -> None:
    path.with_suffix(".json").unlink()


def other_key_sidecar(path: Path) -> None:
    sidecar = path.with_suffix(".json")
    sidecar.write_text(sidecar.read_text().replace('"key": "', '"key": "0'))


@pytest.mark.parametrize(
    "corrupt",
    [corrupt_truncate, corrupt_flip_sampled_row, corrupt_sidecar, remove_sidecar, other_key_sidecar],
)
def test_a_corrupt_cache_is_logged_and_rebuilt(
    tiny: FolderDataset, cache: Path, decodes: list[str], caplog: pytest.LogCaptureFixture, corrupt
) -> None:
    domain = tiny[1]
    arrays_of(domain, tiny, workers=1)
    (path,) = (p for p in cache_files(cache) if p.suffix == ".npy")
    corrupt(path)
    with caplog.at_level(logging.WARNING, logger=image_cache.__name__):
        got = arrays_of(domain, tiny, workers=1)
    assert "is unusable" in caplog.text and "rebuilding" in caplog.text and str(path) in caplog.text
    assert len(decodes) == 2 * len(domain)
    np.testing.assert_array_equal(got, reference_rows(domain, RES))


def test_an_unwritable_cache_folder_says_what_to_do(tiny: FolderDataset, tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("DGBENCH_CACHE", str(blocker))  # a file: no folder can be made under it
    with pytest.raises(DataError, match=r"DGBENCH_CACHE.*data\.pipeline=reference"):
        attach_arrays(tiny, RES, skip_corrupt=False, progress=False)


# ------------------------------------------------------------------- unreadable images


def test_unreadable_image_fails_naming_it_unless_skipped(tiny: FolderDataset, decodes: list[str]) -> None:
    bad = Path(tiny[0].path(2))
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rebuilt = build(tiny.root.parent, tiny.manifest)
    with pytest.raises(DataError) as err:
        attach_arrays(rebuilt, RES, skip_corrupt=False, workers=1, progress=False)
    assert str(bad) in str(err.value) and "data.skip_corrupt=true" in str(err.value)
    first = len(decodes)
    attach_arrays(rebuilt, RES, skip_corrupt=True, workers=1, progress=False)
    assert len(decodes) == first + len(rebuilt[1])  # d0 (cached with its bad row) is not decoded again
    assert rebuilt[0].unreadable.tolist() == [2] and rebuilt[1].unreadable.tolist() == []
    assert not rebuilt[0].arrays[2].any()  # a zero row, never fed to a model (FastSplit drops it)


def test_fast_split_drops_and_counts_unreadable_rows(tiny: FolderDataset) -> None:
    from dgbench.data.fast import FastSplit

    Path(tiny[0].path(2)).write_bytes(b"not an image")
    dataset = build(tiny.root.parent, tiny.manifest)
    attach_arrays(dataset, RES, skip_corrupt=True, workers=1, progress=False)
    split = FastSplit(dataset[0], [4, 2, 0], torch.device("cpu"))
    images, labels, skipped = split.take(np.array([0, 1, 1, 2]))
    assert skipped == 2 and len(images) == 2 and labels.tolist() == dataset[0].labels[[4, 0]].tolist()
    with pytest.raises(DataError, match="all 1 images of a batch are unreadable"):
        split.take(np.array([1]))


def _resident_kb(path: str) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a mapping's first line
            inside = len(head) == 6 and head[5] == path
        elif inside and head[0] == "Rss:":
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_a_split_copied_to_a_device_releases_the_mapped_pages(tiny: FolderDataset) -> None:
    """Once on the device, a split's cache pages leave the process's RSS (they stay in the page cache)."""
    from dgbench.data.fast import FastSplit

    attach_arrays(tiny, RES, skip_corrupt=False, workers=1, progress=False)
    arrays = tiny[0].arrays
    assert int(arrays.sum()) > 0  # touches every page of the mapping
    assert _resident_kb(os.path.realpath(arrays.filename)) > 0
    split = FastSplit(tiny[0], range(len(tiny[0])), torch.device("meta"))  # a device copy, without a GPU
    assert split.images is not None and split.images.device.type == "meta"
    assert _resident_kb(os.path.realpath(arrays.filename)) == 0
    # The mapping still reads correctly afterwards (from the page cache).
    assert torch.equal(
        FastSplit(tiny[0], [1], torch.device("cpu")).take(np.array([0]))[0][0],
        torch.from_numpy(np.array(arrays[1])),
    )


# ------------------------------------------------------------------- end to end


PACS_DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
TRAIN = [
    "dataset=pacs",
    "dataset.test_envs=[photo]",
    f"data.resolution={RES}",
    "trainer.steps=5",
    "trainer.checkpoint_freq=2",
    "algorithm.batch_size=4",
]


pytestmark = pytest.mark.filterwarnings("ignore:pacs. image counts:UserWarning")  # the tiny PACS tree


@pytest.fixture
def fake_pacs(tmp_path: Path, cache: Path) -> Path:
    """A data root holding a tiny PACS tree (2 images per class, JPEG and PNG, odd sizes)."""
    files = [
        (f"{d}/{c}/{i}.{'png' if (d == 'sketch') == (i == 0) else 'jpg'}", (14 + 5 * i + k, 19 - i), "RGB")
        for d in PACS_DOMAINS
        for k, c in enumerate(PACS_CLASSES)
        for i in range(2)
    ]
    for seed, (rel, size, mode) in enumerate(files):
        write_image(tmp_path / "PACS" / rel, size, mode, seed)
    return tmp_path


def test_train_runs_end_to_end_with_the_fast_pipeline_on_a_folder_dataset(
    fake_pacs: Path, make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = [*TRAIN, f"dataset.root={fake_pacs}", "data.pipeline=fast"]
    result = train(make_cfg(*overrides), overrides)
    records = read_records(result.run_dir / "results.jsonl")
    assert [r["step"] for r in records] == [0, 2, 4] and np.isfinite(records[-1]["loss"])
    assert set(records[-1]["acc"]) == set(PACS_DOMAINS)

    def no_decoding(*_: object) -> np.ndarray:
        raise AssertionError("decoded an image although the cache holds it")

    monkeypatch.setattr(image_cache, "decode_image", no_decoding)  # the next run of a sweep
    again = train(make_cfg(*overrides, "trial_seed=1"), [*overrides, "trial_seed=1"])
    assert again.record is not None and again.record["step"] == 4


def test_data_cache_command_builds_what_training_then_reads(
    fake_pacs: Path, decodes: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from dgbench.data import commands

    bad = fake_pacs / "PACS" / "photo" / "dog" / "0.jpg"
    bad.write_bytes(b"not an image")
    args = ["cache", "pacs", "--root", str(fake_pacs), "--resolution", "12", "--workers", "1"]
    assert commands.main(args) == 0
    out = capsys.readouterr().out
    for domain in PACS_DOMAINS:
        unreadable = 1 if domain == "photo" else 0
        assert f"{domain}: {2 * len(PACS_CLASSES)} images at 12 px, " in out
        assert f"{unreadable} unreadable: " in out.split(f"{domain}: ")[1].splitlines()[0]
    assert "1 unreadable images" in out and "dgbench data verify pacs --decode" in out
    built = len(decodes)
    assert built == 4 * 2 * len(PACS_CLASSES)
    dataset = FolderDataset(fake_pacs / "PACS", "pacs")
    attach_arrays(dataset, 12, skip_corrupt=True)  # what a run with data.resolution=12 opens
    assert len(decodes) == built  # nothing decoded again


def test_data_cache_command_refuses_in_memory_datasets(capsys: pytest.CaptureFixture[str]) -> None:
    from dgbench.data import commands
    from dgbench.errors import ConfigError

    with pytest.raises(ConfigError, match="embedded is held in memory"):
        commands.main(["cache", "embedded"])


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--resolution", "0", "argument --resolution: must be a positive integer, got 0"),
        ("--resolution", "-3", "argument --resolution: must be a positive integer, got -3"),
        ("--workers", "0", "argument --workers: must be a positive integer, got 0"),
        ("--resolution", "big", "argument --resolution: expected a positive integer, got 'big'"),
    ],
)
def test_data_cache_command_names_a_size_that_cannot_work(
    fake_pacs: Path,
    decodes: list[str],
    capsys: pytest.CaptureFixture[str],
    option: str,
    value: str,
    message: str,
) -> None:
    """0 used to fall through to the default resolution; negative sizes failed in numpy."""
    from dgbench.data import commands

    with pytest.raises(SystemExit) as exit_:
        commands.main(["cache", "pacs", "--root", str(fake_pacs), option, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert decodes == []  # nothing built


@pytest.mark.parametrize("broken", [False, True])
def test_without_augmentation_fast_and_reference_runs_agree(fake_pacs: Path, make_cfg, broken: bool) -> None:
    """Same batches (the cache holds exactly the reference eval resize): the same final record.

    With an unreadable file and data.skip_corrupt=true, both drop it from the same batches and
    count it the same way (`skipped_images`).
    """
    base = [*TRAIN, f"dataset.root={fake_pacs}", "data.augment=false"]
    if broken:
        bad = fake_pacs / "PACS" / "cartoon" / "dog" / "1.jpg"
        bad.write_bytes(b"\xff\xd8 not really a JPEG")
        fast_args = [*base, "data.pipeline=fast"]
        with pytest.raises(DataError, match=str(bad)):
            train(make_cfg(*fast_args, "name=fails"), fast_args)
        base.append("data.skip_corrupt=true")
    ref = train(make_cfg(*base, "name=ref"), base).record
    fast = train(make_cfg(*base, "name=fast", "data.pipeline=fast"), [*base, "data.pipeline=fast"]).record
    assert ref is not None and fast is not None
    fast, ref = without_timing(fast), without_timing(ref)
    for key in ("step", "loss", "acc", "metrics"):
        assert fast[key] == ref[key], key  # bit for bit, as for the embedded dataset (test_train.py)
    assert (fast["metrics"].get("skipped_images", 0) > 0) == broken  # its split is evaluated every record


def test_a_cache_resolution_above_the_training_one_feeds_both_pipelines_shapes(tiny: FolderDataset) -> None:
    """`data.cache_resolution` (PipelineSpec.cache_resolution): rows at 24 px, batches resized to 16."""
    from dgbench.data.pipeline import PipelineSpec, build_streams
    from dgbench.data.splits import split_indices

    spec = PipelineSpec(
        pipeline="fast",
        resolution=RES,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        augment=True,
        augment_train_out=False,
        batch_size=3,
        eval_batch_size=4,
        seed=0,
        start_step=0,
        num_workers=0,
        skip_corrupt=False,
        device=torch.device("cpu"),
        cache_resolution=24,
    )
    splits = [split_indices(len(d), 0.2, 0, i) for i, d in enumerate(tiny)]
    streams = build_streams(tiny, splits, [0], spec)
    assert tiny[0].arrays.shape[1:] == (24, 24, 3)
    images, labels, skipped = next(streams.train[0])
    assert images.shape == (3, 3, RES, RES) and len(labels) == 3 and skipped == 0
    evaluated = [x for x, _, _ in streams.eval["d1", "in"]()]
    assert sum(len(x) for x in evaluated) == len(splits[1][1]) and evaluated[0].shape[1:] == (3, RES, RES)


# ------------------------------------------------------------------- real PACS


def test_real_pacs_rows_equal_the_reference_eval_resize(pacs_dir: Path, tmp_path: Path) -> None:
    """One PACS class (JPEG, 227 px) at 224 px: the cache equals EvalTransform's resize exactly."""
    dataset = FolderDataset(pacs_dir, "pacs")
    domain = dataset[0]
    keep = [i for i, rel in enumerate(domain.ids) if rel.startswith("guitar/")]
    subset = FolderDomain(
        domain.root, dataset.classes, domain.name, ([domain.ids[i] for i in keep], domain.labels[keep])
    )
    got, unreadable = domain_arrays(subset, "pacs-test", "v", 224, progress=False, cache=tmp_path)
    assert unreadable == [] and got.shape == (len(keep), 224, 224, 3) and len(keep) == 184
    np.testing.assert_array_equal(got, reference_rows(subset, 224))
