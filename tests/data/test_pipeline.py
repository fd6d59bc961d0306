"""Data pipeline set-up: DataLoader workers sized to the machine unless asked for."""

from __future__ import annotations

import pytest

from dgbench.data import pipeline
from dgbench.data.embedded import EmbeddedDataset
from dgbench.data.folder import FolderDataset


@pytest.mark.parametrize(("cores", "loaders", "expected"), [(2, 3, (1, 2)), (16, 3, (5, 16)), (1, 3, (1, 1))])
def test_folder_datasets_share_the_cores_among_training_loaders(
    monkeypatch: pytest.MonkeyPatch, cores: int, loaders: int, expected: tuple[int, int]
) -> None:
    monkeypatch.setattr(pipeline, "available_cores", lambda: cores)
    folder = FolderDataset.__new__(FolderDataset)  # only its type matters here
    assert pipeline.loader_workers(None, folder, loaders) == expected


def test_in_memory_datasets_get_no_workers_and_a_request_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "available_cores", lambda: 8)
    in_memory = EmbeddedDataset.__new__(EmbeddedDataset)
    assert pipeline.loader_workers(None, in_memory, 3) == (0, 0)
    assert pipeline.loader_workers(3, in_memory, 3) == (3, 3)
    assert pipeline.loader_workers(0, FolderDataset.__new__(FolderDataset), 3) == (0, 0)
