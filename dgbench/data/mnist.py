"""DomainBed's two MNIST datasets: RotatedMNIST and ColoredMNIST.

Both follow `MultipleEnvironmentMNIST` in DomainBed's `domainbed/datasets.py`: the
MNIST train (60k) and test (10k) images are concatenated in that order, permuted once,
and environment `i` of `n` takes `permuted[i::n]`, so every digit lands in exactly one
environment.

- RotatedMNIST (Ghifary et al., "Domain Generalization for Object Recognition with
  Multi-task Autoencoders", ICCV 2015): environments "0", "15", ..., "75" rotate their
  digits counter-clockwise by that many degrees (torchvision `rotate` on the PIL image,
  bilinear, fill 0, as DomainBed does); 10 classes.
- ColoredMNIST (Arjovsky et al., "Invariant Risk Minimization", 2019): label 1 for
  digits 0-4, 0 for 5-9, flipped with probability 0.25; colour = label, flipped with
  the environment's probability (0.1, 0.2, 0.9 for "+90%", "+80%", "-90%"); the digit
  is drawn in the red channel for colour 0 and the green one for colour 1. So colour
  predicts the label better than the digit shape in the first two environments and
  worse in the third.

Deliberate differences from DomainBed:

- Randomness. DomainBed draws the permutation (and ColoredMNIST's label and colour
  noise) from the global torch RNG seeded with the run's seed (in its sweeps a hash of
  dataset, algorithm, test envs, hparams and trial seeds), so environments differ from
  run to run. Here the permutation is
  `numpy.random.RandomState(shuffle_seed).permutation(70000)` and the noise of
  environment `i` comes from `numpy.random.default_rng(SeedSequence([shuffle_seed, i]))`:
  the dataset is a function of its config, like every other dgbench dataset, and
  `ids` stay stable across runs (splits still vary with `trial_seed`). No seed
  reproduces DomainBed's exact environments: the generators differ.
- Channels. Our backbones take RGB: RotatedMNIST's grey digit is repeated in all three
  channels, and ColoredMNIST puts DomainBed's two channels in R and G with B zero.
- Resolution. Current DomainBed feeds ColoredMNIST at 2x28x28 (its 2x subsampling is
  commented out); `subsample=2` gives the 14x14 images of the IRM paper and of early
  DomainBed versions.

Images are held in memory (about 55 MB for all 70k) and rendered per sample in
`load_image`. MNIST itself lives in torchvision's layout, `<data root>/MNIST/raw/`, and is
downloaded by torchvision when its raw files are missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from dgbench.data.base import DatasetConfig, DomainData, MultiDomainDataset, data_root
from dgbench.errors import ConfigError, DataError, one_line
from dgbench.registry import DATASETS

log = logging.getLogger(__name__)

MNIST_SIZE = 70_000  # 60k train + 10k test: what DomainBed splits into environments
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
ROTATIONS = {"0": 0, "15": 15, "30": 30, "45": 45, "60": 60, "75": 75}  # environment -> degrees, CCW
DIGITS = tuple(str(d) for d in range(10))
COLOR_FLIPS = {"+90%": 0.1, "+80%": 0.2, "-90%": 0.9}  # DomainBed's order (not sorted)
LABEL_FLIP = 0.25  # ColoredMNIST label noise: the digit shape predicts the label 75% of the time
BINARY = ("0", "1")  # 1: digit < 5
MNIST_SIZE = 28


@dataclass(kw_only=True)
class MNISTConfig(DatasetConfig):
    """Keys shared by the MNIST datasets."""

    shuffle_seed: int = 0  # seeds the 70k permutation (and ColoredMNIST's noise); DomainBed uses the run seed

    def image_size(self) -> int:
        return MNIST_SIZE


@dataclass(kw_only=True)
class RotatedMNISTConfig(MNISTConfig):
    name: str = "rotated_mnist"

    def domain_names(self) -> list[str]:
        return list(ROTATIONS)


@dataclass(kw_only=True)
class ColoredMNISTConfig(MNISTConfig):
    name: str = "colored_mnist"
    subsample: int = 1  # keep every n-th row and column; 2: IRM's 14x14 images (current DomainBed: 1)

    def domain_names(self) -> list[str]:
        return list(COLOR_FLIPS)


# ---------------------------------------------------------------- MNIST and the environments


def load_mnist(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST train then test from `<root>/MNIST/raw/`: uint8 images (N, 28, 28), int64 digits.

    torchvision downloads the raw files when they are missing; any failure to get or
    read them becomes a one-line `DataError` saying where to put them.
    """
    raw = root / "MNIST" / "raw"
    parts = []
    try:
        for train in (True, False):
            mnist = torchvision.datasets.MNIST(str(root), train=train, download=True)
            parts.append((mnist.data.numpy(), mnist.targets.numpy()))
    except (RuntimeError, OSError, ValueError, TypeError, AssertionError) as err:
        detail = one_line(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
        missing = [name for name in RAW_FILES if not (raw / name).is_file()]
        if missing:  # every mirror failed (or was never tried): say where the files go
            absent = "no raw files in"
            if len(missing) < len(RAW_FILES):
                absent = f"{', '.join(missing)} missing from"
            raise DataError(
                f"MNIST: {absent} {raw} and the download failed "
                f"({detail}); place the four idx files {', '.join(RAW_FILES)} (uncompressed, "
                f"or the official .gz archives) under {raw}, or retry with network access"
            ) from err
        raise DataError(  # torchvision's idx reader asserts and reshapes: a truncated or foreign file
            f"MNIST: cannot read the idx files in {raw} ({detail}); "
            f"replace them with the official files (or delete them to download again)"
        ) from err
    for prefix, (x, y) in zip(("train", "t10k"), parts, strict=True):
        if x.shape[1:] != (28, 28) or len(x) != len(y):
            raise DataError(
                f"MNIST: {prefix}-images-idx3-ubyte holds images {tuple(x.shape)} but {prefix}-labels-"
                f"idx1-ubyte {len(y)} labels (in {raw}); replace them with the official files"
            )
    images = np.concatenate([x for x, _ in parts])
    digits = np.concatenate([y for _, y in parts]).astype(np.int64)
    if len(digits) and not 0 <= digits.min() <= digits.max() <= 9:
        raise DataError(f"MNIST: labels outside 0..9 in {raw}; replace the label files with official ones")
    if len(images) != MNIST_SIZE:
        log.warning(
            "MNIST at %s has %d images, not %d: environments differ from DomainBed's",
            raw,
            len(images),
            MNIST_SIZE,
        )
    return images, digits


def _check_seed(seed: Any) -> int:
    seed = int(seed)
    if not 0 <= seed < 2**32:
        raise ConfigError(f"dataset.shuffle_seed={seed} must be in [0, 2**32)")
    return seed


def environment_indices(n: int, n_envs: int, shuffle_seed: int) -> list[np.ndarray]:
    """Positions (in the train+test concatenation) of each environment's samples, in order.

    One permutation of all `n` images, dealt round-robin: environment `i` gets
    `permuted[i::n_envs]`, as in DomainBed.
    """
    permuted = np.random.RandomState(_check_seed(shuffle_seed)).permutation(n)
    return [permuted[i::n_envs] for i in range(n_envs)]


def _ids(digits: np.ndarray, positions: np.ndarray) -> list[str]:
    """`<digit>/<position in train+test>`: unique, stable, and traceable to the MNIST file."""
    return [f"{d}/{p:05d}" for d, p in zip(digits[positions].tolist(), positions.tolist(), strict=True)]


def _env_rng(shuffle_seed: int, env_index: int) -> np.random.Generator:
    """One independent stream per environment, so environments never share draws."""
    return np.random.default_rng(np.random.SeedSequence([_check_seed(shuffle_seed), env_index]))


# ---------------------------------------------------------------- RotatedMNIST


class RotatedDomain(DomainData):
    """One rotation angle; digits are rotated on access (cheap at 28x28, no second copy in memory)."""

    def __init__(
        self, name: str, angle: float, images: np.ndarray, digits: np.ndarray, ids: list[str]
    ) -> None:
        self.name = name
        self.angle = angle
        self.images = images
        self.labels = digits
        self.ids = ids

    def load_image(self, index: int) -> Image.Image:
        digit = Image.fromarray(self.images[index])  # mode "L", as DomainBed's ToPILImage
        rotated = TF.rotate(digit, self.angle, interpolation=InterpolationMode.BILINEAR, fill=0)
        return rotated.convert("RGB")


class RotatedMNIST(MultiDomainDataset):
    """Six rotations of MNIST digits, 10 classes; DomainBed trains it unaugmented at 28x28."""

    name = "rotated_mnist"
    resolution = MNIST_SIZE
    steps = 5001
    checkpoint_freq = 100
    augment = False


def build_rotated_mnist(cfg: Any) -> RotatedMNIST:
    """RotatedMNIST from a `RotatedMNISTConfig` or a DictConfig."""
    images, digits = load_mnist(data_root(getattr(cfg, "root", None)))
    envs = environment_indices(len(images), len(ROTATIONS), cfg.shuffle_seed)
    domains = [
        RotatedDomain(name, angle, images[pos], digits[pos], _ids(digits, pos))
        for (name, angle), pos in zip(ROTATIONS.items(), envs, strict=True)
    ]
    return RotatedMNIST(domains, DIGITS)


# ---------------------------------------------------------------- ColoredMNIST


class ColoredDomain(DomainData):
    """One colour-flip probability: the digit drawn in red (colour 0) or green (colour 1)."""

    def __init__(
        self, name: str, images: np.ndarray, labels: np.ndarray, colors: np.ndarray, ids: list[str]
    ) -> None:
        self.name = name
        self.images = images
        self.labels = labels
        self.colors = colors
        self.ids = ids

    def load_image(self, index: int) -> Image.Image:
        rgb = np.zeros((*self.images.shape[1:], 3), dtype=np.uint8)
        rgb[..., self.colors[index]] = self.images[index]  # DomainBed zeroes channel 1 - colour
        return Image.fromarray(rgb)


class ColoredMNIST(MultiDomainDataset):
    """Three environments where colour is a spurious label cue; DomainBed trains it unaugmented."""

    name = "colored_mnist"
    resolution = MNIST_SIZE
    steps = 5001
    checkpoint_freq = 100
    augment = False


def color_environment(
    digits: np.ndarray, flip: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels and colours of one environment (DomainBed's `color_dataset`).

    label = (digit < 5) XOR Bernoulli(0.25); colour = label XOR Bernoulli(flip). The
    label noise is drawn before the colour noise, for all samples at once.
    """
    labels = (digits < 5).astype(np.int64) ^ (rng.random(len(digits)) < LABEL_FLIP)
    colors = labels ^ (rng.random(len(digits)) < flip)
    return labels.astype(np.int64), colors.astype(np.intp)


def build_colored_mnist(cfg: Any) -> ColoredMNIST:
    """ColoredMNIST from a `ColoredMNISTConfig` or a DictConfig."""
    step = int(getattr(cfg, "subsample", 1))
    if not 1 <= step <= 28:
        raise ConfigError(f"dataset.subsample={step} must be in 1..28 (2 gives IRM's 14x14 images)")
    images, digits = load_mnist(data_root(getattr(cfg, "root", None)))
    images = np.ascontiguousarray(images[:, ::step, ::step])
    envs = environment_indices(len(images), len(COLOR_FLIPS), cfg.shuffle_seed)
    domains = []
    for i, ((name, flip), pos) in enumerate(zip(COLOR_FLIPS.items(), envs, strict=True)):
        labels, colors = color_environment(digits[pos], flip, _env_rng(cfg.shuffle_seed, i))
        domains.append(ColoredDomain(name, images[pos], labels, colors, _ids(digits, pos)))
    dataset = ColoredMNIST(domains, BINARY)
    dataset.resolution = images.shape[1]
    return dataset


DATASETS.register("rotated_mnist", RotatedMNISTConfig, build_rotated_mnist)
DATASETS.register("colored_mnist", ColoredMNISTConfig, build_colored_mnist)
