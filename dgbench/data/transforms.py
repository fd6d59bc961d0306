"""The reference (DomainBed) image pipeline: PIL image -> normalized float tensor.

Training domains get DomainBed's augmentation; evaluation resizes only. Unlike
DomainBed, the `out` split of a training domain is evaluated without augmentation
(DomainBed attaches the train transform to the whole domain before splitting, which
makes validation accuracy noisy); SWAD and later protocols do the same as dgbench.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PIL import Image
from torch import Tensor
from torchvision import transforms as T

ImageTransform = Callable[[Image.Image], Tensor]


def train_transform(
    resolution: int, mean: Sequence[float], std: Sequence[float], augment: bool
) -> ImageTransform:
    """DomainBed's training transform (or the eval one when `augment` is false)."""
    if not augment:
        return eval_transform(resolution, mean, std)
    return T.Compose(
        [
            T.RandomResizedCrop(resolution, scale=(0.7, 1.0)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.3, 0.3, 0.3, 0.3),
            T.RandomGrayscale(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def eval_transform(resolution: int, mean: Sequence[float], std: Sequence[float]) -> ImageTransform:
    return T.Compose([T.Resize((resolution, resolution)), T.ToTensor(), T.Normalize(mean, std)])
