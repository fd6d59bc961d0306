"""The multi-domain dataset interface every registered dataset implements.

A `MultiDomainDataset` has ordered `domains`, sorted `classes`, and one map-style
`DomainData` per domain yielding `(PIL.Image RGB, label)`. Transforms, splits and
loaders are the trainer's business (see `dgbench.data.loaders`), so a dataset only
has to say what its images are and where they come from.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dgbench.errors import ConfigError

DATA_ENV = "DGBENCH_DATA"


@dataclass(kw_only=True)
class DatasetConfig:
    """Config keys shared by every dataset (`dataset.<key>=...`)."""

    name: str = "?"
    root: str | None = None  # data root; default: $DGBENCH_DATA, else ./data
    test_envs: list[Any] = field(default_factory=lambda: [0])  # indices or domain names
    holdout_fraction: float = 0.2  # share of each domain held out as its `out` split

    def domain_names(self) -> list[str] | None:
        """The domains, known without building the dataset (None: build it to find out).

        Lets a relaunched sweep recognise a finished run in milliseconds: its run id needs
        the test domains as indices, not the (possibly 586k-file) dataset itself.
        """
        return None

    def image_size(self) -> int:
        """The side in pixels of the images the network sees by default (before `data.resolution`).

        Known without building the dataset, so an algorithm's default backbone can be chosen
        for the input size before the run id is computed.
        """
        return MultiDomainDataset.resolution


def data_root(root: str | None) -> Path:
    """The data root: the configured one, else `$DGBENCH_DATA`, else `./data`."""
    return Path(root or os.environ.get(DATA_ENV) or "data").expanduser()


class DomainData:
    """One domain: a map-style dataset of `(PIL.Image, int)` pairs.

    Subclasses set `labels` (int64 array, one per sample) and `ids` (a stable
    identifier per sample, such as `<class>/<file>`, used to audit splits), and
    implement `load_image`.
    """

    name: str
    labels: np.ndarray
    ids: Sequence[str]

    def load_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load_image(index), int(self.labels[index])


class MultiDomainDataset:
    """Ordered domains of one classification task.

    Class attributes give the DomainBed protocol defaults for the dataset; the
    trainer uses them when the config leaves the matching key unset.
    """

    name: str = "?"
    resolution: int = 224  # working resolution of the images fed to the network
    steps: int = 5001  # DomainBed N_STEPS
    checkpoint_freq: int = 100  # evaluate every this many steps
    augment: bool = True  # False for datasets DomainBed never augments (e.g. the MNIST variants)

    def protocol_defaults(self, protocol: str) -> dict[str, int]:
        """`steps` and `checkpoint_freq` under a named protocol (see `dgbench.config.Protocol`)."""
        return {"steps": self.steps, "checkpoint_freq": self.checkpoint_freq}

    def __init__(self, domains: Sequence[DomainData], classes: Sequence[str]) -> None:
        self.domain_data = list(domains)
        self.classes = list(classes)

    @property
    def domains(self) -> list[str]:
        return [d.name for d in self.domain_data]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.domain_data)

    def __getitem__(self, index: int) -> DomainData:
        return self.domain_data[index]

    def resolve_test_envs(self, test_envs: Sequence[Any]) -> list[int]:
        """Map test environments given as indices or domain names to sorted indices."""
        return resolve_test_envs(self.domains, test_envs, self.name)


def resolve_test_envs(domains: Sequence[str], test_envs: Sequence[Any], dataset: str) -> list[int]:
    """Map test environments given as indices or domain names to sorted indices."""
    resolved = set()
    for env in test_envs:
        if isinstance(env, str) and env in domains:  # names first: RotatedMNIST's are "0", "15"...
            resolved.add(list(domains).index(env))
            continue
        if isinstance(env, str) and not env.lstrip("-").isdigit():
            raise ConfigError(
                f"dataset.test_envs: unknown domain {env!r} for {dataset}; "
                f"valid: {', '.join(domains)} or indices 0..{len(domains) - 1}"
            )
        index = int(env)
        if not 0 <= index < len(domains):
            raise ConfigError(
                f"dataset.test_envs: index {index} out of range for {dataset} "
                f"({len(domains)} domains: {', '.join(domains)})"
            )
        resolved.add(index)
    if len(resolved) >= len(domains):
        raise ConfigError(
            f"dataset.test_envs={list(test_envs)} leaves no training domain; "
            f"{dataset} has {len(domains)} domains"
        )
    return sorted(resolved)
