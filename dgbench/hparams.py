"""Hyper-parameter declaration and DomainBed-style random search.

A component declares its hyper-parameters once, as dataclass fields. A searchable
field carries its random-search distribution in the field metadata:

    lr: float = hparam(5e-5, LogUniform(-5, -3.5))

`hparams_seed=0` keeps the defaults. For `hparams_seed=k>0` every searchable field is
drawn from its own `numpy.random.RandomState(seed_hash(seed_hash(k, trial_seed), name))`,
as DomainBed's `hparams_registry` does at HEAD: adding a field never shifts the values
sampled for the others, and the same (k, trial_seed) always gives the same config.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from dgbench.errors import ConfigError

SEARCH_KEY = "search"
E = TypeVar("E", bound=enum.Enum)


def seed_hash(*args: Any) -> int:
    """DomainBed's `misc.seed_hash`: md5 of the tuple repr, modulo 2**31.

    Arguments must be plain Python values: `str((np.int64(0),))` differs from `str((0,))`.
    """
    args = tuple(int(a) if isinstance(a, np.integer) else a for a in args)
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


class Distribution:
    """A random-search distribution; `sample` consumes the RandomState like DomainBed's lambdas."""

    def sample(self, rng: np.random.RandomState) -> Any:
        raise NotImplementedError

    def describe(self) -> str:
        return repr(self)


@dataclass(frozen=True)
class LogUniform(Distribution):
    """`base ** U(low, high)` (DomainBed: `10**r.uniform(-5, -3.5)`)."""

    low: float
    high: float
    base: float = 10.0

    def sample(self, rng: np.random.RandomState) -> float:
        return float(self.base ** rng.uniform(self.low, self.high))

    def describe(self) -> str:
        return f"{self.base:g}^U({self.low:g}, {self.high:g})"


@dataclass(frozen=True)
class Uniform(Distribution):
    low: float
    high: float

    def sample(self, rng: np.random.RandomState) -> float:
        return float(rng.uniform(self.low, self.high))

    def describe(self) -> str:
        return f"U({self.low:g}, {self.high:g})"


@dataclass(frozen=True)
class IntUniform(Uniform):
    """`int(U(low, high))` (DomainBed's Fishr warm-up: `int(r.uniform(0., 5000.))`); the same draw."""

    def sample(self, rng: np.random.RandomState) -> int:
        return int(super().sample(rng))

    def describe(self) -> str:
        return f"int({super().describe()})"


@dataclass(frozen=True)
class IntLogUniform(Distribution):
    """`int(base ** U(low, high))` (DomainBed batch size: `int(2**r.uniform(3, 5.5))`)."""

    low: float
    high: float
    base: float = 2.0

    def sample(self, rng: np.random.RandomState) -> int:
        return int(self.base ** rng.uniform(self.low, self.high))

    def describe(self) -> str:
        return f"int({self.base:g}^U({self.low:g}, {self.high:g}))"


@dataclass(frozen=True)
class Choice(Distribution):
    """Uniform choice among `options` (DomainBed: `r.choice([0., 0.1, 0.5])`)."""

    options: tuple[Any, ...]

    def __init__(self, options: Sequence[Any]) -> None:
        object.__setattr__(self, "options", tuple(options))

    def sample(self, rng: np.random.RandomState) -> Any:
        value = self.options[int(rng.choice(len(self.options)))]
        return value.item() if isinstance(value, np.generic) else value

    def describe(self) -> str:
        return "choice{" + ", ".join(repr(o) for o in self.options) + "}"


def enum_choice(enum_cls: type[E], value: Any, key: str, what: str = "a valid value") -> E:
    """`enum_cls` member from a member or its value; a ConfigError naming `key` and the valid values."""
    try:
        return enum_cls(getattr(value, "value", value))
    except ValueError:
        valid = ", ".join(str(member.value) for member in enum_cls)
        raise ConfigError(f"{key}={value!r} is not {what}; use one of: {valid}") from None


def hparam(default: Any, search: Distribution | None = None, help: str = "") -> Any:
    """Declare a dataclass field with a default and, if searchable, its distribution."""
    metadata = {SEARCH_KEY: search, "help": help}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_NUMBER = r"\s*(-?[\d.eE+-]+)\s*"
_SPECS: list[tuple[re.Pattern[str], Any]] = [
    (re.compile(rf"int\({_NUMBER}\^U\({_NUMBER},{_NUMBER}\)\)$"), lambda b, lo, hi: IntLogUniform(lo, hi, b)),
    (re.compile(rf"{_NUMBER}\^U\({_NUMBER},{_NUMBER}\)$"), lambda b, lo, hi: LogUniform(lo, hi, b)),
    (re.compile(rf"int\(U\({_NUMBER},{_NUMBER}\)\)$"), lambda lo, hi: IntUniform(lo, hi)),
    (re.compile(rf"U\({_NUMBER},{_NUMBER}\)$"), lambda lo, hi: Uniform(lo, hi)),
]


def parse_distribution(spec: str) -> Distribution:
    """Parse what `Distribution.describe()` prints: `10^U(-5, -3.5)`, `int(2^U(3, 5.5))`,
    `U(0, 1)`, `int(U(0, 5000))`, `choice{0.0, 0.1, 0.5}`; so search spaces can be changed from configs."""
    text = spec.strip()
    if text.startswith("choice{") and text.endswith("}"):
        try:
            return Choice(ast.literal_eval("[" + text[len("choice{") : -1] + "]"))
        except (ValueError, SyntaxError):
            pass
    for pattern, build in _SPECS:
        match = pattern.match(text)
        if match:
            return build(*(float(g) for g in match.groups()))
    raise ValueError(
        f"cannot parse search distribution {spec!r}; use one of 10^U(lo, hi), int(2^U(lo, hi)), "
        "U(lo, hi), int(U(lo, hi)), choice{a, b, ...}"
    )


def search_space(config_cls: type) -> dict[str, Distribution]:
    """The searchable fields of a config dataclass and their distributions."""
    return {
        f.name: f.metadata[SEARCH_KEY]
        for f in dataclasses.fields(config_cls)
        if f.metadata.get(SEARCH_KEY) is not None
    }


def sample_hparams(
    config_cls: type,
    hparams_seed: int,
    trial_seed: int,
    overrides: dict[str, Distribution] | None = None,
) -> dict[str, Any]:
    """Values for every searchable field of `config_cls`; empty for `hparams_seed == 0`.

    `overrides` replaces (or adds) the distributions of some fields, e.g. a dataset's
    own search range for the learning rate.
    """
    if hparams_seed == 0:
        return {}
    space = {**search_space(config_cls), **(overrides or {})}
    seed = seed_hash(hparams_seed, trial_seed)
    return {name: dist.sample(np.random.RandomState(seed_hash(seed, name))) for name, dist in space.items()}


def describe_fields(config_cls: type, skip: Iterable[str] = ()) -> list[tuple[str, Any, str, str]]:
    """(name, default, search description, help) per field, for `dgbench list`."""
    rows = []
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        default = getattr(default, "value", default)  # enums print as their value
        dist = f.metadata.get(SEARCH_KEY)
        rows.append((f.name, default, dist.describe() if dist else "", f.metadata.get("help", "")))
    return rows
