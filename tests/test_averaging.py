"""Weight averaging (dgbench.averaging): SWAD's window rule and average, EMA/SMA, BatchNorm
re-estimation, and the trainer's averaged series (records, resume, result rows)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from dgbench.averaging import (
    Averaging,
    LossValley,
    Segment,
    WeightAverage,
    recompute_batchnorm,
    swapped_in,
)
from dgbench.errors import ConfigError
from dgbench.records import read_records, without_timing
from dgbench.results import load_results
from dgbench.train import train


def offline_window(losses: list[float], n_converge: int, n_tolerance: int, ratio: float) -> tuple[int, int]:
    """SWAD's window [first, last] segment index, from the whole loss curve at once (the rule as
    stated in dgbench.averaging's docstring, written independently of the online implementation)."""
    n = len(losses)
    converge = next(
        (k for k in range(n - n_converge + 1) if int(np.argmin(losses[k : k + n_converge])) == 0), None
    )
    if converge is None:
        return n - 1, n - 1
    threshold = np.mean(losses[converge : converge + n_converge]) * (1 + ratio)
    first = converge
    while first - 1 >= max(0, converge - (n_tolerance - n_converge)) and losses[first - 1] <= threshold:
        first -= 1
    last = converge
    for j in range(converge + 1, n):
        if min(losses[j : j + n_tolerance]) > threshold:
            break
        last = j
    return first, last


def run_valley(losses: list[float], lengths: list[int], **kwargs) -> tuple[LossValley, WeightAverage]:
    """Feed segments whose iterates are the scalars 0, 1, 2, ... (state {"w": step}) to a LossValley."""
    valley = LossValley(**kwargs)
    step = 0
    for loss, length in zip(losses, lengths, strict=True):
        segment = WeightAverage()
        start = step
        for _ in range(length):
            segment.add({"w": torch.tensor(float(step), dtype=torch.float64)})
            step += 1
        valley.add(Segment(segment, loss, start, step - 1))
    return valley, valley.finish()


def segment_steps(lengths: list[int], first: int, last: int) -> list[int]:
    ends = np.cumsum(lengths)
    return list(range(int(ends[first] - lengths[first]), int(ends[last])))


def test_weight_average_is_the_arithmetic_mean_and_merges_by_count():
    torch.manual_seed(0)
    states = [{"w": torch.randn(4, 3), "b": torch.randn(3), "n": torch.tensor(i)} for i in range(7)]
    whole = WeightAverage()
    for state in states:
        whole.add(state)
    expected = torch.stack([s["w"].double() for s in states]).mean(0)
    assert torch.allclose(whole.tensors["w"].double(), expected, atol=1e-6)
    assert whole.tensors["n"].item() == 6 and whole.count == 7  # integer buffers: the latest value

    parts = [WeightAverage(), WeightAverage()]  # segments of 3 and 4 iterates, merged by count
    for i, state in enumerate(states):
        parts[i >= 3].add(state)
    merged = WeightAverage()
    for part in parts:
        merged.merge(part)
    assert torch.allclose(merged.tensors["w"], whole.tensors["w"], atol=1e-6)
    assert torch.allclose(merged.tensors["b"], whole.tensors["b"], atol=1e-6)


def test_ema_follows_its_recursion():
    values = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 5.0])]
    ema = WeightAverage(decay=0.9)
    expected = values[0].clone()
    ema.add({"w": values[0]})
    for value in values[1:]:
        ema.add({"w": value})
        expected = 0.9 * expected + 0.1 * value
    assert torch.allclose(ema.tensors["w"], expected)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(decay=1.0)


def test_swad_window_on_a_hand_curve():
    # 0..9: falls, converges at 3 (2.0 <= 2.5, 2.1), stays under 1.3 x mean(2.0, 2.5, 2.1) = 2.86
    # until 6, then six segments above it: the valley is dead and the window is [2, 6] (2.6 <= 2.86
    # joins the look-back, 3.5 at 1 does not).
    losses = [4.0, 3.5, 2.6, 2.0, 2.5, 2.1, 2.7, 3.0, 3.1, 3.2, 3.3, 3.4, 3.5, 3.6]
    lengths = [1] + [5] * (len(losses) - 1)
    valley, average = run_valley(losses, lengths)
    assert offline_window(losses, 3, 6, 0.3) == (2, 6)
    steps = segment_steps(lengths, 2, 6)
    assert (valley.start_step, valley.end_step) == (steps[0], steps[-1])
    assert valley.dead
    assert average.tensors["w"].item() == pytest.approx(np.mean(steps))  # every iterate once
    assert average.count == len(steps)


def test_swad_window_matches_the_offline_rule_on_random_curves():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(1, 30)
        level, losses = 3.0, []
        for _ in range(n):  # a noisy descent into a valley and, sometimes, back out of it
            level = max(0.1, level + rng.choice([-0.4, -0.2, -0.1, 0.05, 0.3, 0.8]))
            losses.append(round(level + rng.uniform(-0.1, 0.1), 2))
        lengths = [1] + [rng.randint(1, 4) for _ in range(n - 1)]
        kwargs = {"n_converge": rng.randint(1, 3), "n_tolerance": rng.randint(3, 6), "tolerance_ratio": 0.2}
        valley, average = run_valley(losses, lengths, **kwargs)
        first, last = offline_window(losses, *kwargs.values())
        steps = segment_steps(lengths, first, last)
        assert (valley.start_step, valley.end_step) == (steps[0], steps[-1]), (trial, losses, kwargs)
        assert average.tensors["w"].item() == pytest.approx(np.mean(steps)), trial


def test_swad_without_convergence_averages_the_last_segment_and_bad_windows_are_refused():
    valley, average = run_valley([3.0, 2.0, 1.0], [1, 4, 4])  # still falling at the end
    assert (valley.start_step, valley.end_step) == (5, 8)
    assert average.tensors["w"].item() == pytest.approx(6.5)
    with pytest.raises(ValueError, match="n_converge <= n_tolerance"):
        LossValley(n_converge=4, n_tolerance=3)


def test_averaging_state_round_trips_mid_run():
    weights = torch.randn(40, 1, 3, generator=torch.Generator().manual_seed(0))
    losses = [3, 2.5, 2, 1.8, 1.9, 2.0, 1.7, 2.2, 2.5, 3, 3.5, 4]
    module = nn.Linear(3, 1)

    def drive(averaging: Averaging, steps: range) -> None:
        for step in steps:
            with torch.no_grad():
                module.weight.copy_(weights[step])
            averaging.after_step(module, step)
            if step % 3 == 0:
                averaging.after_evaluation(step, losses[step // 3])

    def make() -> Averaging:
        return Averaging("erm", LossValley(), ema=0.8, sma_start=5)

    whole = make()
    drive(whole, range(34))
    first = make()
    drive(first, range(17))
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    drive(resumed, range(17, 34))
    for label, average in whole.at_checkpoints().items():
        assert torch.equal(resumed.at_checkpoints()[label].tensors["weight"], average.tensors["weight"])
    ((label, average),) = whole.at_end().items()
    ((_, again),) = resumed.at_end().items()
    assert label == "erm + swad" and whole.valley.converged
    assert torch.equal(average.tensors["weight"], again.tensors["weight"])


def test_swapped_in_restores_the_live_weights():
    module = nn.Linear(2, 2)
    own = {k: v.clone() for k, v in module.state_dict().items()}
    average = WeightAverage()
    average.add({k: torch.zeros_like(v) for k, v in own.items()})
    with swapped_in(module, average):
        assert module.weight.abs().sum() == 0
    assert all(torch.equal(module.state_dict()[k], v) for k, v in own.items())


class BNNet(nn.Module):
    def __init__(self, frozen_second: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
        self.frozen_second = frozen_second

    def train(self, mode: bool = True) -> BNNet:
        super().train(mode)
        if self.frozen_second:
            self.b.eval()
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_batchnorm_statistics_are_the_plain_mean_over_the_batches_and_frozen_layers_stay():
    torch.manual_seed(0)
    batches = [torch.randn(5, 2) * 3 + 1 for _ in range(4)]
    net = BNNet(frozen_second=True)
    net.b.running_mean.fill_(7.0)
    assert recompute_batchnorm(net, iter(batches), steps=4) == 1
    expected_mean = torch.stack([b.mean(0) for b in batches]).mean(0)
    expected_var = torch.stack([b.var(0, unbiased=True) for b in batches]).mean(0)
    assert torch.allclose(net.a.running_mean, expected_mean, atol=1e-6)
    assert torch.allclose(net.a.running_var, expected_var, atol=1e-5)
    assert net.a.momentum == 0.1 and net.training  # restored
    assert torch.all(net.b.running_mean == 7.0)  # frozen by the policy: untouched


AVERAGING = ("trainer.swad=true", "trainer.ema=0.9", "trainer.sma_start=4", "trainer.swad_n_tolerance=4")
FAST = (
    "trainer.steps=13",
    "trainer.checkpoint_freq=2",
    "algorithm.batch_size=8",
    "dataset.images_per_domain=60",
    "data.resolution=16",
    "data.pipeline=fast",
    # a BatchNorm network, so SWAD re-estimates statistics (timm's tiny test model, random init)
    "backbone=timm",
    "backbone.name=test_resnet",
    "backbone.pretrained=false",
    "backbone.bn=train",
)


def _records(run_dir):
    return [without_timing(r) for r in read_records(run_dir / "averaged.jsonl")]


def test_trainer_records_averaged_series_that_resume_identically_and_become_table_rows(
    make_cfg, killed_at_checkpoint
):
    overrides = [*FAST, *AVERAGING]
    whole = train(make_cfg(*overrides, "name=whole"), overrides)
    records = _records(whole.run_dir)
    by_series: dict[str, list[int]] = {}
    for record in records:
        by_series.setdefault(record["algorithm"], []).append(record["step"])
    assert by_series["erm + ema"] == [0, 2, 4, 6, 8, 10, 12]
    assert by_series["erm + sma"] == [4, 6, 8, 10, 12]  # from sma_start on
    assert by_series["erm + swad"] == [12]  # once, after training
    swad = records[-1]
    start, end = swad["metrics"]["swad_start_step"], swad["metrics"]["swad_end_step"]
    assert 0 <= start <= end <= 12 and swad["loss"] == swad["metrics"]["val_loss"] > 0
    assert swad["metrics"]["bn_layers_recomputed"] > 0
    plain = read_records(whole.run_dir / "results.jsonl")
    assert all("val_loss" in r["metrics"] for r in plain)

    with killed_at_checkpoint(4):
        train(make_cfg(*overrides, "name=cut"), overrides)
    resumed = train(make_cfg(*overrides, "name=cut"), overrides)
    assert _records(resumed.run_dir) == records

    rows = {run.algorithm for run in load_results([whole.run_dir]).runs}
    assert rows == {"erm", "erm + ema", "erm + sma", "erm + swad"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.ema=1.5", r"trainer\.ema.*decay must be in \(0, 1\), got 1\.5"),
        ("trainer.swad_n_converge=9", r"trainer\.swad_n_converge.*got 9 and 6"),
    ],
)
def test_bad_averaging_settings_name_their_keys(make_cfg, override, message):
    overrides = [*FAST, "trainer.swad=true", override]
    with pytest.raises(ConfigError, match=message):
        train(make_cfg(*overrides), overrides)
