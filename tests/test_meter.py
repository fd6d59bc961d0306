"""StepMeter: per-step metrics kept as returned and read back as floats at a checkpoint."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

from dgbench.meter import StepMeter, mean_metrics


def test_reads_floats_and_tensors_back_by_step_in_order() -> None:
    meter = StepMeter()
    meter.add(4, {"loss": torch.tensor(0.5), "lr": 0.1})
    meter.add(5, {"loss": torch.tensor(0.25, dtype=torch.bfloat16), "lr": 0.2, "extra": torch.tensor(3.0)})
    meter.add(6, {"loss": 1.0, "lr": torch.tensor(0.3, dtype=torch.float64)})
    per_step = meter.read()
    assert per_step == {
        4: {"loss": 0.5, "lr": 0.1},
        5: {"loss": 0.25, "lr": 0.2, "extra": 3.0},
        6: {"loss": 1.0, "lr": 0.3},  # a float64 tensor keeps its value: no rounding through float32
    }
    assert all(type(v) is float for metrics in per_step.values() for v in metrics.values())
    assert len(meter) == 3
    meter.clear()
    assert len(meter) == 0 and meter.read() == {}


def test_means_are_over_the_steps_that_reported_each_metric() -> None:
    means = mean_metrics([{"loss": 1.0, "penalty": 4.0}, {"loss": 2.0}, {"loss": 6.0, "penalty": 2.0}])
    assert means == {"loss": 3.0, "penalty": 3.0}
    assert list(means) == ["loss", "penalty"]  # first-seen order


def test_a_non_finite_value_reads_back_as_such() -> None:
    meter = StepMeter()
    meter.add(0, {"loss": torch.tensor(float("nan"))})
    meter.add(1, {"loss": torch.tensor(float("inf"))})
    values = meter.read()
    assert math.isnan(values[0]["loss"]) and values[1]["loss"] == math.inf


def test_a_metric_keeps_its_value_when_its_tensor_changes_later() -> None:
    """A metric that is a view of state updated in place (GroupDRO's q, a learned temperature)
    reads back as it was at its step, as a float taken at the step would have."""
    weights = torch.tensor([0.5, 0.5])
    meter = StepMeter()
    for step in range(3):
        meter.add(step, {"loss": 1.0, "w0": weights[0]})
        weights.mul_(2)
    assert [m["w0"] for m in meter.read().values()] == [0.5, 1.0, 2.0]


def test_a_kept_loss_does_not_keep_its_autograd_graph_alive() -> None:
    """An algorithm that returns `loss` undetached must not make the trainer hold every step's
    activations until the checkpoint."""
    meter = StepMeter()
    activation = torch.randn(1000, requires_grad=True) * 2
    loss = (activation * activation).sum()  # the graph saves `activation` for the backward
    alive = weakref.ref(activation)
    meter.add(0, {"loss": loss})
    del activation, loss
    gc.collect()
    assert alive() is None
    assert meter.read()[0]["loss"] > 0


def test_a_metric_that_is_not_a_scalar_is_refused() -> None:
    meter = StepMeter()
    meter.add(0, {"loss": torch.ones(2)})
    with pytest.raises(RuntimeError):
        meter.read()
