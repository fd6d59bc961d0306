"""Shared fixtures: compose dgbench configs the way the CLI does, with outputs in tmp dirs."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see dgbench.cli.quiet_openmp
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dgbench.cli import conf_dir
from dgbench.components import load_components

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pacs_dir() -> Path:
    """The real PACS folder ($DGBENCH_TEST_PACS, else ../shared/datasets/PACS beside the repo), or skip."""
    env = os.environ.get("DGBENCH_TEST_PACS")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "datasets" / "PACS"
    if not path.is_dir():
        pytest.skip(
            f"real PACS not found at {path} (set DGBENCH_TEST_PACS to a DomainBed-layout PACS folder)"
        )
    return path


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Index caches go to a session temp dir, never the user's ~/.cache (subprocesses inherit it)."""
    os.environ["DGBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data root per test session, so the embedded dataset is generated once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def make_cfg(tmp_path: Path, data_root: Path) -> Callable[..., DictConfig]:
    """Compose the root config with overrides; returns (cfg, overrides) like the Hydra app sees them."""
    load_components()

    def _make(*overrides: str) -> DictConfig:
        base = [f"output_dir={tmp_path / 'outputs'}", f"dataset.root={data_root}", "trainer.progress=false"]
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose("config", overrides=[*base, *overrides])

    return _make


@pytest.fixture
def killed_at_checkpoint() -> Callable[[int], AbstractContextManager[None]]:
    """`with killed_at_checkpoint(n): train(...)`: the trainer stops right after its n-th checkpoint
    as if killed (KeyboardInterrupt: no failure status, the checkpoint stays), and the block
    expects that stop."""
    import dgbench.train as train_module

    @contextmanager
    def killed(n: int) -> Iterator[None]:
        real_save = train_module.save_checkpoint
        calls = {"n": 0}

        def save_then_die(*args: Any, **kwargs: Any) -> None:
            real_save(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt

        with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
            patch.setattr(train_module, "save_checkpoint", save_then_die)
            yield

    return killed


@pytest.fixture
def host_reads() -> type:
    """`with host_reads() as reads: ...` records (op, args) of the ops that, on CUDA, make the host
    wait for the GPU: reading a value (`.item()`, `int()`, `float()`, `bool()` all dispatch
    `_local_scalar_dense`) or making an output whose shape depends on values (nonzero, a
    boolean-mask gather, bincount, unique). Runs on CPU, so the tests can count what check_cuda's
    `syncs` column counts on a GPU (blocking host-to-device copies excepted)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    shaped_by_values = {"aten::nonzero", "aten::masked_select", "aten::bincount", "aten::_unique2"}
    shaped_by_values.add("aten::unique_dim")

    class HostReads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.reads: list[tuple[str, tuple[Any, ...]]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = func._schema.name
            mask_gather = func is torch.ops.aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
            )
            if name == "aten::_local_scalar_dense" or name in shaped_by_values or mask_gather:
                self.reads.append((name, args))
            return func(*args, **(kwargs or {}))

    return HostReads
