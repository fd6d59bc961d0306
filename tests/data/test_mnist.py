"""RotatedMNIST and ColoredMNIST on a fake MNIST written as raw idx files (never the network)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torchvision
import torchvision.transforms.functional as TF
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms import InterpolationMode

from dgbench.data.mnist import (
    COLOR_FLIPS,
    RAW_FILES,
    ROTATIONS,
    ColoredMNISTConfig,
    RotatedMNISTConfig,
    build_colored_mnist,
    build_rotated_mnist,
)
from dgbench.errors import ConfigError, DataError
from dgbench.registry import DATASETS

FakeMNIST = tuple[np.ndarray, np.ndarray]  # train+test images (N, 28, 28) uint8 and digits, in file order


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed big-endian idx file of unsigned bytes (magic 0x00000800 + ndim)."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fake_mnist(root: Path, images: np.ndarray, digits: np.ndarray, n_train: int) -> FakeMNIST:
    """`images[:n_train]` as the training files and the rest as the test files, under `<root>/MNIST/raw/`."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, part in (("train", slice(None, n_train)), ("t10k", slice(n_train, None))):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[part])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", digits[part])
    return images, digits


def random_mnist(root: Path, n_train: int, n_test: int, seed: int = 0) -> FakeMNIST:
    """Noise images (asymmetric, so any rotation changes them) with known random digits."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return write_fake_mnist(root, images, rng.integers(0, 10, n, dtype=np.uint8), n_train)


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, FakeMNIST]:
    """60 train + 30 test images: 15 per RotatedMNIST environment, 30 per ColoredMNIST one."""
    return tmp_path, random_mnist(tmp_path, 60, 30)


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FakeMNIST]:
    """2400 train + 600 test images: 1000 per ColoredMNIST environment, enough for rate checks."""
    root = tmp_path_factory.mktemp("mnist")
    return root, random_mnist(root, 2400, 600, seed=1)


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


# ---------------------------------------------------------------- environments


@pytest.mark.parametrize("seed", [0, 5])
def test_environments_deal_one_permutation_of_train_then_test(small, seed: int) -> None:
    root, (_, digits) = small
    permuted = np.random.RandomState(seed).permutation(90)
    for build, config, names in (
        (build_rotated_mnist, RotatedMNISTConfig, list(ROTATIONS)),
        (build_colored_mnist, ColoredMNISTConfig, list(COLOR_FLIPS)),
    ):
        ds = build(config(root=str(root), shuffle_seed=seed))
        assert ds.domains == names and [len(d) for d in ds] == [90 // len(names)] * len(names)
        for i, domain in enumerate(ds):
            positions = permuted[i :: len(names)]
            assert list(domain.ids) == [f"{digits[p]}/{p:05d}" for p in positions]
        every = sorted(int(i.split("/")[1]) for d in ds for i in d.ids)
        assert every == list(range(90))  # a partition: each image in exactly one environment

    rotated = build_rotated_mnist(RotatedMNISTConfig(root=str(root), shuffle_seed=seed))
    for i, domain in enumerate(rotated):
        assert domain.labels.dtype == np.int64
        assert np.array_equal(domain.labels, digits[permuted[i::6]])


def test_dataset_protocol_attributes(small) -> None:
    root, _ = small
    rotated = build_rotated_mnist(RotatedMNISTConfig(root=str(root)))
    colored = build_colored_mnist(ColoredMNISTConfig(root=str(root)))
    assert rotated.classes == [str(d) for d in range(10)] and colored.classes == ["0", "1"]
    for ds in (rotated, colored):
        assert (ds.resolution, ds.steps, ds.checkpoint_freq, ds.augment) == (28, 5001, 100, False)
        assert ds.protocol_defaults("default") == {"steps": 5001, "checkpoint_freq": 100}
    assert colored.resolve_test_envs(["-90%"]) == [2]  # names with signs resolve as names


# ---------------------------------------------------------------- RotatedMNIST


def test_rotated_images_are_bilinear_torchvision_rotations_of_the_originals(small) -> None:
    root, (images, _) = small
    ds = build_rotated_mnist(RotatedMNISTConfig(root=str(root)))
    for domain, angle in zip(ds, ROTATIONS.values(), strict=True):
        for k, sample_id in enumerate(domain.ids):
            original = images[int(sample_id.split("/")[1])]
            pixels = _pixels(domain.load_image(k))
            assert pixels.shape == (28, 28, 3)
            assert (pixels == pixels[..., :1]).all()  # grey: the digit in all three channels
            expected = TF.rotate(
                Image.fromarray(original), angle, interpolation=InterpolationMode.BILINEAR, fill=0
            )
            assert np.array_equal(pixels[..., 0], np.asarray(expected))
            assert np.array_equal(pixels[..., 0], original) == (angle == 0)


def test_rotation_is_counter_clockwise_by_the_environment_angle(tmp_path: Path) -> None:
    blob = np.zeros((28, 28), dtype=np.uint8)
    blob[13:15, 22:26] = 255  # centroid 10 px right of the rotation centre (14, 14)
    write_fake_mnist(tmp_path, np.stack([blob] * 12), np.arange(12) % 10, n_train=8)
    ds = build_rotated_mnist(RotatedMNISTConfig(root=str(tmp_path)))
    rows, cols = np.mgrid[0:28, 0:28] + 0.5  # pixel centres
    for domain, angle in zip(ds, ROTATIONS.values(), strict=True):
        pixels = _pixels(domain.load_image(0))[..., 0].astype(np.float64)
        y, x = (rows * pixels).sum() / pixels.sum(), (cols * pixels).sum() / pixels.sum()
        theta = np.radians(angle)
        assert x == pytest.approx(14 + 10 * np.cos(theta), abs=0.5)
        assert y == pytest.approx(14 - 10 * np.sin(theta), abs=0.5)  # up: counter-clockwise


# ---------------------------------------------------------------- ColoredMNIST


@pytest.mark.parametrize("subsample", [1, 2])
def test_colored_images_draw_the_digit_in_red_or_green_only(large, subsample: int) -> None:
    root, (images, _) = large
    ds = build_colored_mnist(ColoredMNISTConfig(root=str(root), subsample=subsample))
    side = 28 // subsample
    assert ds.resolution == side
    for domain in ds:
        assert set(np.unique(domain.labels)) == {0, 1} and domain.labels.dtype == np.int64
        for k in range(0, len(domain), 7):
            pixels = _pixels(domain.load_image(k))
            assert pixels.shape == (side, side, 3)
            assert not pixels[..., 2].any()  # blue stays empty
            lit = [bool(pixels[..., c].any()) for c in (0, 1)]
            assert lit.count(True) == 1
            original = images[int(domain.ids[k].split("/")[1])][::subsample, ::subsample]
            assert np.array_equal(pixels[..., lit.index(True)], original)


def test_colored_label_and_color_noise_rates(large) -> None:
    root, (_, digits) = large
    ds = build_colored_mnist(ColoredMNISTConfig(root=str(root)))
    for domain, flip in zip(ds, COLOR_FLIPS.values(), strict=True):
        green = np.array([_pixels(domain.load_image(k))[..., 1].any() for k in range(len(domain))])
        shape_label = np.array([int(i.split("/")[0]) < 5 for i in domain.ids])  # 1: digit 0-4
        # ~1000 samples per environment: 0.05 is over 3.5 standard deviations of either rate
        assert np.mean(green == domain.labels) == pytest.approx(1 - flip, abs=0.05)
        assert np.mean(shape_label == domain.labels) == pytest.approx(0.75, abs=0.05)
    assert sorted(int(i.split("/")[0]) for d in ds for i in d.ids) == sorted(digits.tolist())


def test_shuffle_seed_makes_the_dataset(small) -> None:
    root, _ = small

    def snapshot(seed: int) -> list[tuple[list[str], list[int], list[bytes]]]:
        ds = build_colored_mnist(ColoredMNISTConfig(root=str(root), shuffle_seed=seed))
        return [
            (list(d.ids), d.labels.tolist(), [d.load_image(k).tobytes() for k in range(len(d))]) for d in ds
        ]

    assert snapshot(3) == snapshot(3)
    other = snapshot(4)
    for (ids_a, _, images_a), (ids_b, _, images_b) in zip(snapshot(3), other, strict=True):
        assert ids_a != ids_b and images_a != images_b
    rotated = [build_rotated_mnist(RotatedMNISTConfig(root=str(root), shuffle_seed=s)) for s in (3, 3, 4)]
    assert [list(d.ids) for d in rotated[0]] == [list(d.ids) for d in rotated[1]]
    assert [list(d.ids) for d in rotated[0]] != [list(d.ids) for d in rotated[2]]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ColoredMNISTConfig(shuffle_seed=-1), "shuffle_seed=-1"),
        (ColoredMNISTConfig(subsample=0), "subsample=0"),
        (RotatedMNISTConfig(shuffle_seed=2**32), "shuffle_seed=4294967296"),
    ],
)
def test_bad_config_values_raise_config_errors(small, config, message: str) -> None:
    root, _ = small
    config.root = str(root)
    build = DATASETS.get(config.name).obj
    with pytest.raises(ConfigError, match=message):
        build(config)


# ---------------------------------------------------------------- missing or broken files


def _offline(monkeypatch: pytest.MonkeyPatch, fail: bool) -> None:
    """Replace torchvision's download: when files are missing, raise as it does when every mirror
    fails, or do nothing (like the real one, it returns at once when the files are there)."""

    def download(self: torchvision.datasets.MNIST) -> None:
        if fail and not self._check_exists():
            raise RuntimeError(
                "Error downloading train-images-idx3-ubyte.gz:\nTried https://ossci-datasets.s3.amazonaws"
                ".com/mnist/, got:\n<urlopen error [Errno -3] Temporary failure in name resolution>\n"
            )

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", download)


@pytest.mark.parametrize("fail", [True, False], ids=["download-fails", "files-still-missing"])
def test_missing_files_without_network_raise_a_one_line_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: bool
) -> None:
    _offline(monkeypatch, fail)
    with pytest.raises(DataError) as info:
        build_rotated_mnist(RotatedMNISTConfig(root=str(tmp_path)))
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "MNIST" / "raw") in message and all(name in message for name in RAW_FILES)
    assert ("name resolution" if fail else "Dataset not found") in message


def test_the_data_root_defaults_to_the_environment_variable(small, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = small
    monkeypatch.setenv("DGBENCH_DATA", str(root))
    _offline(monkeypatch, fail=True)  # the files are found, so nothing is downloaded
    assert len(build_colored_mnist(ColoredMNISTConfig())) == 3


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("garbage", "cannot read the idx files"),
        ("short", "cannot read the idx files"),
        ("label-count", r"t10k-images-idx3-ubyte holds images \(30, 28, 28\) but t10k-labels-idx1-ubyte 29"),
    ],
)
def test_unreadable_or_inconsistent_files_raise_data_errors(
    small, monkeypatch: pytest.MonkeyPatch, broken: str, message: str
) -> None:
    root, (_, digits) = small
    raw = root / "MNIST" / "raw"
    if broken == "garbage":
        (raw / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00")
    elif broken == "short":  # a valid header for 30 images, the bytes of 29
        (raw / "t10k-images-idx3-ubyte").write_bytes((raw / "t10k-images-idx3-ubyte").read_bytes()[:-784])
    else:
        write_idx(raw / "t10k-labels-idx1-ubyte", digits[60:-1])
    _offline(monkeypatch, fail=True)
    with pytest.raises(DataError, match=message) as info:
        build_colored_mnist(ColoredMNISTConfig(root=str(root)))
    assert str(raw) in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- registry and trainer


def test_registered_datasets_build_through_the_registry_and_a_structured_config(small) -> None:
    root, _ = small
    for name, config in (("rotated_mnist", RotatedMNISTConfig), ("colored_mnist", ColoredMNISTConfig)):
        entry = DATASETS.get(name)
        assert entry.config is config
        structured = OmegaConf.to_object(OmegaConf.structured(config(root=str(root), shuffle_seed=2)))
        ds = entry.obj(structured)
        assert ds.name == name and sum(len(d) for d in ds) == 90
        image, label = ds[0][0]
        assert image.mode == "RGB" and image.size == (28, 28) and 0 <= label < ds.num_classes


@pytest.mark.parametrize("dataset", ["rotated_mnist", "colored_mnist"])
def test_training_runs_end_to_end(small, make_cfg, dataset: str) -> None:
    from dgbench.train import train

    root, _ = small
    overrides = [
        f"dataset={dataset}",
        f"dataset.root={root}",
        "dataset.test_envs=[1]",
        "trainer.steps=2",
        "trainer.checkpoint_freq=1",
        "algorithm.batch_size=4",
    ]
    result = train(make_cfg(*overrides), overrides)
    assert result.record is not None and result.record["dataset"] == dataset
    names = list(ROTATIONS if dataset == "rotated_mnist" else COLOR_FLIPS)
    assert result.domains == names and set(result.record["acc"]) == set(names)
    assert result.record["test_envs"] == [1]


def test_small_image_hparams_and_test_envs_by_name(small, make_cfg) -> None:
    """DomainBed's SMALL_IMAGES defaults apply; a domain named "15" is that domain, not index 15."""
    from dgbench.registry import DATASETS

    cfg = make_cfg("dataset=rotated_mnist")
    assert (cfg.algorithm.lr, cfg.algorithm.batch_size, cfg.algorithm.weight_decay) == (1e-3, 64, 0.0)
    assert cfg.search.algorithm.batch_size == "int(2^U(3, 9))"
    root, _ = small
    entry = DATASETS.get("rotated_mnist")
    dataset = entry.obj(entry.config(name="rotated_mnist", root=str(root)))
    assert dataset.resolve_test_envs(["15", "75"]) == [1, 5]
    assert dataset.resolve_test_envs([2]) == [2]
