"""The reference (DomainBed) image pipeline: PIL image -> normalized float tensor.

Training domains get DomainBed's augmentation (torchvision's `RandomResizedCrop(scale=
(0.7, 1))`, `RandomHorizontalFlip`, `ColorJitter(0.3, 0.3, 0.3, 0.3)`, `RandomGrayscale`),
with every random draw taken from an explicit `torch.Generator` instead of the global
RNG: a sample's augmentation is then a function of its seed, whichever process or
worker computes it, and seeding costs microseconds instead of a global-RNG fork.

Unlike DomainBed, the `out` split of a training domain is evaluated without
augmentation (DomainBed attaches the train transform to the whole domain before
splitting, which makes validation accuracy noisy); SWAD and later protocols do the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor


class ImageTransform(Protocol):
    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Tensor: ...


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` (top, left, height, width), with a generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    # Fallback: the largest central crop within the ratio bounds.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    """DomainBed's training augmentation at `resolution`, then normalization."""

    def __init__(self, resolution: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.resolution = resolution
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        top, left, h, w = resized_crop_box(image.width, image.height, (0.7, 1.0), (3 / 4, 4 / 3), generator)
        image = TF.resized_crop(image, top, left, h, w, [self.resolution, self.resolution], antialias=True)
        if _uniform(generator, 0, 1) < 0.5:
            image = TF.hflip(image)
        image = self._color_jitter(image, generator, strength=0.3)
        if _uniform(generator, 0, 1) < 0.1:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)

    @staticmethod
    def _color_jitter(image: Image.Image, generator: torch.Generator | None, strength: float) -> Image.Image:
        """torchvision's ColorJitter(s, s, s, s): four factors applied in a random order."""
        order = torch.randperm(4, generator=generator).tolist()
        brightness = _uniform(generator, 1 - strength, 1 + strength)
        contrast = _uniform(generator, 1 - strength, 1 + strength)
        saturation = _uniform(generator, 1 - strength, 1 + strength)
        hue = _uniform(generator, -strength, strength)
        for op in order:
            if op == 0:
                image = TF.adjust_brightness(image, brightness)
            elif op == 1:
                image = TF.adjust_contrast(image, contrast)
            elif op == 2:
                image = TF.adjust_saturation(image, saturation)
            else:
                image = TF.adjust_hue(image, hue)
        return image


class EvalTransform:
    """Resize to `resolution` x `resolution` and normalize (deterministic)."""

    def __init__(self, resolution: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.resolution = resolution
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        image = TF.resize(image, [self.resolution, self.resolution], antialias=True)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)


def train_transform(
    resolution: int, mean: Sequence[float], std: Sequence[float], augment: bool
) -> ImageTransform:
    """DomainBed's training transform (or the eval one when `augment` is false)."""
    return TrainTransform(resolution, mean, std) if augment else EvalTransform(resolution, mean, std)


def eval_transform(resolution: int, mean: Sequence[float], std: Sequence[float]) -> ImageTransform:
    return EvalTransform(resolution, mean, std)
