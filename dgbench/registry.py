"""Name -> component registries for algorithms, datasets and backbones.

One `Registry` type serves every kind of component. Registering a component also
registers its config dataclass with Hydra's ConfigStore under the registry's config
group, so `algorithm=fish algorithm.meta_lr=0.3` works for built-ins and plugins
alike, and the dataclass is the single place where hyper-parameters are declared.
Duplicate names raise: a silent override would make two benchmarks disagree.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, is_dataclass
from typing import Any, Generic, TypeVar

from hydra.core.config_store import ConfigStore

from dgbench.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered component: the object to build and its config dataclass."""

    name: str
    obj: T
    config: type


class Registry(Generic[T]):
    """Maps names to components (classes or factories) and their config dataclasses.

    Args:
        kind: singular name of the component kind, e.g. "algorithm"; also the Hydra
            config group the components' configs are stored under.
        name_field: the config field that carries the registry name, so a composed
            config says which component it selects.
    """

    def __init__(self, kind: str, name_field: str = "name") -> None:
        self.kind = kind
        self.name_field = name_field
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, config: type, obj: T | None = None) -> Any:
        """Register `obj` under `name` with its config dataclass.

        Usable as a decorator (`@REG.register("erm", ERMHParams)`) or as a call
        (`REG.register("erm", ERMHParams, ERM)`).
        """

        def _add(target: T) -> T:
            if name in self._entries:
                raise ConfigError(
                    f"{self.kind} {name!r} is already registered "
                    f"(by {_describe(self._entries[name].obj)}); choose another name"
                )
            if not is_dataclass(config):
                raise TypeError(f"config for {self.kind} {name!r} must be a dataclass, got {config!r}")
            self._entries[name] = Entry(name, target, config)
            node = config(**{self.name_field: name}) if _has_field(config, self.name_field) else config()
            ConfigStore.instance().store(group=self.kind, name=name, node=node)
            return target

        return _add if obj is None else _add(obj)

    def get(self, name: str) -> Entry[T]:
        """Return the entry for `name`, or raise listing the known names and the closest match."""
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} Known {self.kind}s: {', '.join(known) or '(none)'}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return (self._entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)


def _has_field(config: type, field_name: str) -> bool:
    return field_name in getattr(config, "__dataclass_fields__", {})


def _describe(obj: object) -> str:
    module = getattr(obj, "__module__", "?")
    qualname = getattr(obj, "__qualname__", repr(obj))
    return f"{module}.{qualname}"


ALGORITHMS: Registry[Callable[..., Any]] = Registry("algorithm")
ALGORITHMS.__doc__ = (
    "Algorithms: classes `Algorithm(backbone, num_classes, num_domains, cfg)` with "
    "`update(batches) -> dict[str, float]` and `predict(x) -> logits`."
)
DATASETS: Registry[Callable[..., Any]] = Registry("dataset")
DATASETS.__doc__ = "Datasets: factories `build(cfg) -> MultiDomainDataset`."
BACKBONES: Registry[Callable[..., Any]] = Registry("backbone", name_field="arch")
BACKBONES.__doc__ = "Backbones: factories `build(cfg) -> nn.Module` with an `n_outputs` attribute."
