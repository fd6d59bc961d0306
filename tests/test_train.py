"""The trainer: records, done marker, resume equality, hparams_seed, run identity, failures."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch._dynamo.utils import counters

from dgbench.algorithms.erm import ERM, ERMHParams
from dgbench.backbones import Featurizer
from dgbench.checkpoint import CHECKPOINT_FILE
from dgbench.config import OMITTED_AT_DEFAULT, run_id
from dgbench.errors import ConfigError, DGBenchError
from dgbench.hparams import sample_hparams
from dgbench.records import RECORD_KEYS, read_records, without_timing
from dgbench.results import aggregate, load_results
from dgbench.runs import DONE_FILE, STATUS_FILE
from dgbench.train import DivergedError, _evaluate, train

FAST = ("trainer.steps=7", "trainer.checkpoint_freq=3", "algorithm.batch_size=8")
ERM_UPDATE = ERM.update


def test_run_writes_records_for_every_domain_and_a_done_marker(make_cfg):
    overrides = [*FAST, "dataset.test_envs=[sketch]"]
    cfg = make_cfg(*overrides)
    result = train(cfg, overrides)
    records = read_records(result.run_dir / "results.jsonl")
    assert [r["step"] for r in records] == [0, 3, 6]  # every checkpoint_freq steps and the last step
    final = records[-1]
    assert tuple(sorted(final)) == tuple(sorted(RECORD_KEYS))
    assert final["test_envs"] == [result.domains.index("sketch")]
    assert final["algorithm"] == "erm" and final["dataset"] == "embedded" and final["backbone"] == "small_cnn"
    assert set(final["acc"]) == set(result.domains) and len(result.domains) >= 4
    for splits in final["acc"].values():
        assert set(splits) == {"in", "out"} and all(0.0 <= a <= 1.0 for a in splits.values())
    assert final["hparams"]["batch_size"] == 8
    assert final["hparams"]["lr"] == 1e-3  # conf/dataset_hparams/embedded.yaml
    assert final["loss"] > 0 and final["step_time"] > 0 and final["mem_gb"] > 0
    # each record after the first tells how long the checkpoint written after the one before took
    assert "checkpoint_time" not in records[0]["metrics"]
    assert all(r["metrics"]["checkpoint_time"] > 0 for r in records[1:])
    n = cfg.dataset.images_per_domain
    assert final["epoch"] == pytest.approx(6 * 8 / (n - int(n * 0.2)))  # step * batch / smallest `in`
    assert (result.run_dir / DONE_FILE).exists() and (result.run_dir / "config.yaml").exists()
    assert not (result.run_dir / CHECKPOINT_FILE).exists()

    again = train(make_cfg(*overrides), overrides)  # relaunch: nothing to do
    assert again.record is None and again.run_dir == result.run_dir
    assert len(read_records(result.run_dir / "results.jsonl")) == 3


@pytest.mark.parametrize("pipeline", ["reference", "fast"])
def test_interrupted_run_resumes_to_the_same_final_record(make_cfg, killed_at_checkpoint, pipeline):
    overrides = [*FAST, f"data.pipeline={pipeline}"]
    reference = train(make_cfg(*overrides, "name=uninterrupted"), overrides).record

    cfg = make_cfg(*overrides, "name=interrupted")
    with killed_at_checkpoint(2):  # the checkpoint at step 3 stays
        train(cfg, overrides)
    run_dir = cfg.output_dir + "/interrupted"
    resumed = train(make_cfg(*overrides, "name=interrupted"), overrides)
    assert str(resumed.run_dir).startswith(run_dir)
    assert [r["step"] for r in read_records(resumed.run_dir / "results.jsonl")] == [0, 3, 6]
    assert without_timing(resumed.record) == without_timing(reference)


def test_a_run_interrupted_under_compile_resumes_without_it(make_cfg, killed_at_checkpoint):
    """`trainer.compile` compiles the featurizer in place, so its checkpoint keeps the plain model's
    state_dict keys; the key is not part of the run id, so the same run resumes without it."""
    overrides = [*FAST, "data.pipeline=fast"]
    plain = train(make_cfg(*overrides, "name=plain"), overrides).record
    compiled = [*overrides, "trainer.compile=true"]
    with killed_at_checkpoint(2):  # the checkpoint at step 3, written by the compiled model
        train(make_cfg(*compiled, "name=run"), compiled)
    resumed = train(make_cfg(*overrides, "name=run"), overrides)
    assert [r["step"] for r in read_records(resumed.run_dir / "results.jsonl")] == [0, 3, 6]
    # the compiled kernels may round differently; nothing else differs
    assert resumed.record["loss"] == pytest.approx(plain["loss"], rel=1e-3)


def test_evaluation_is_never_compiled():
    """Under trainer.compile only the training step compiles: compiling evaluation's eval-mode
    forward and batch shapes cost 22 s on an H100 to save 0.1 s per evaluation."""
    algorithm = ERM(Featurizer(nn.Linear(5, 4), 4), 3, 2, ERMHParams())
    algorithm.featurizer.compile()
    counters.clear()
    batch = (torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2]), 0)
    sources = {("a", "out"): lambda: [batch]}
    acc, _, _ = _evaluate(algorithm, sources, torch.device("cpu"), torch.preserve_format, nullcontext(), 6)
    assert 0 <= acc["a"]["out"] <= 1
    assert not counters["frames"]
    assert algorithm.training  # evaluation put train mode back


@pytest.mark.parametrize("autotuning", [True, False])
def test_evaluation_autotunes_full_batches_only(autotuning: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each split's last, smaller batch would be one more shape for cudnn to autotune."""
    algorithm = ERM(Featurizer(nn.Linear(5, 4), 4), 3, 2, ERMHParams())
    seen: list[tuple[int, bool]] = []
    predict = algorithm.predict

    def recording(x: torch.Tensor) -> torch.Tensor:
        seen.append((len(x), torch.backends.cudnn.benchmark))
        return predict(x)

    monkeypatch.setattr(algorithm, "predict", recording)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", autotuning)

    def batches(*sizes: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        return [(torch.randn(n, 5), torch.arange(n) % 3, 0) for n in sizes]

    sources = {("a", "in"): lambda: batches(4, 4, 3), ("a", "out"): lambda: batches(2)}
    acc, _, _ = _evaluate(algorithm, sources, torch.device("cpu"), torch.preserve_format, nullcontext(), 4)
    assert seen == [(4, autotuning), (4, autotuning), (3, False), (2, False)]
    assert torch.backends.cudnn.benchmark is autotuning  # put back
    assert set(acc["a"]) == {"in", "out"}


def test_cuda_graph_is_not_part_of_the_run_and_changes_nothing_off_cuda(make_cfg):
    """`trainer.cuda_graph` says how a step runs on CUDA, not what it computes: the same run id, and
    on CPU the same records (its CUDA behaviour: tests/test_graphs.py and the sync test below)."""
    graphed = [*FAST, "trainer.cuda_graph=true"]
    plain = train(make_cfg(*FAST, "name=plain"), FAST).record
    record = train(make_cfg(*graphed, "name=graphed"), graphed).record
    assert record["run_id"] == plain["run_id"]
    assert without_timing(record) == without_timing(plain)


def test_hparams_seed_samples_and_explicit_overrides_win(make_cfg):
    overrides = ["trainer.steps=2", "trainer.checkpoint_freq=5", "hparams_seed=3", "algorithm.lr=0.0002"]
    cfg = make_cfg(*overrides)
    result = train(cfg, overrides)
    sampled = sample_hparams(ERMHParams, 3, 0)
    hparams = result.record["hparams"]
    assert hparams["lr"] == 0.0002
    assert hparams["batch_size"] == sampled["batch_size"]
    assert hparams["dropout"] == sampled["dropout"]
    assert hparams["weight_decay"] == pytest.approx(sampled["weight_decay"])


def test_dataset_search_range_applies_and_bad_search_keys_are_named(make_cfg):
    from dgbench.config import apply_hparams_seed

    cfg = make_cfg("hparams_seed=5")
    apply_hparams_seed(cfg)
    assert 10**-4.5 <= cfg.algorithm.lr <= 10**-2.5  # conf/dataset_hparams/embedded.yaml's range
    with pytest.raises(ConfigError, match=r"search\.algorithm\.momentum: 'momentum' is not a searchable"):
        apply_hparams_seed(make_cfg("hparams_seed=5", "+search.algorithm.momentum='U(0, 1)'"))
    with pytest.raises(ConfigError, match=r"search\.algorithm\.lr: cannot parse"):
        apply_hparams_seed(make_cfg("hparams_seed=5", "search.algorithm.lr=wide"))


def test_run_id_ignores_paths_and_devices_but_not_hparams(make_cfg):
    base = make_cfg("dataset.test_envs=[0]")
    assert run_id(base) == run_id(
        make_cfg("dataset.test_envs=[0]", "output_dir=/elsewhere", "trainer.device=cpu")
    )
    assert run_id(base) != run_id(make_cfg("dataset.test_envs=[0]", "algorithm.lr=0.002"))
    assert run_id(base) != run_id(make_cfg("dataset.test_envs=[0]", "trial_seed=1"))


def test_keys_added_later_keep_run_ids_while_at_their_defaults(make_cfg):
    # a config as it was before these keys existed (untyped: structured configs refuse deletion)
    before = OmegaConf.create(OmegaConf.to_container(make_cfg(), resolve=True, enum_to_str=True))
    for dotted in OMITTED_AT_DEFAULT:
        parent, leaf = dotted.rsplit(".", 1)
        del OmegaConf.select(before, parent)[leaf]
    assert run_id(before) == run_id(make_cfg())
    for override in (
        "trainer.swad=true",
        "trainer.ema=0.9",
        "trainer.sma_start=5",
        "data.cache_resolution=64",
    ):
        assert run_id(make_cfg(override)) != run_id(make_cfg()), override


def test_test_envs_by_name_and_by_index_are_the_same_run(make_cfg):
    by_index = train(make_cfg(*FAST, "dataset.test_envs=[0]"), FAST)
    by_name = train(make_cfg(*FAST, f"dataset.test_envs=[{by_index.domains[0]}]"), FAST)
    assert by_name.run_dir == by_index.run_dir and by_name.record is None


@pytest.mark.parametrize(
    ("test_envs", "message"),
    [
        ("[nowhere]", "unknown domain 'nowhere'"),
        ("[9]", "index 9 out of range"),
        ("[0,1,2,3]", "no training"),
    ],
)
def test_bad_test_envs_are_named(make_cfg, test_envs, message):
    with pytest.raises(ConfigError, match=message):
        train(make_cfg(*FAST, f"dataset.test_envs={test_envs}"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.steps=0", "trainer.steps must be a positive integer, got 0; unset, it takes the default"),
        ("trainer.checkpoint_freq=-1", "trainer.checkpoint_freq must be a positive integer, got -1"),
        ("data.resolution=0", "data.resolution must be a positive integer, got 0"),
        ("data.cache_resolution=0", "data.cache_resolution must be a positive integer, got 0"),
        ("trainer.eval_batch_size=0", "trainer.eval_batch_size must be a positive integer, got 0"),
        ("trainer.num_workers=-1", "trainer.num_workers must be 0 (load in the main process) or more"),
    ],
)
def test_sizes_that_cannot_work_fail_before_the_run_starts(make_cfg, override, message):
    """A 0 used to fall through `value or default` (steps=0 trained the default steps) or fail mid-run."""
    cfg = make_cfg(*FAST, override)
    with pytest.raises(ConfigError) as error:
        train(cfg, [override])
    assert str(error.value).startswith(message)
    assert not (Path(cfg.output_dir) / "default").exists()  # no run directory, nothing recorded


def test_diverging_run_is_marked_failed(make_cfg):
    overrides = [*FAST, "algorithm.lr=1e12"]
    cfg = make_cfg(*overrides)
    with pytest.raises(DivergedError, match="training loss became"):
        train(cfg, overrides)
    (run_dir,) = (Path(cfg.output_dir) / "default").iterdir()
    status = (run_dir / STATUS_FILE).read_text()
    assert '"failed"' in status and "DivergedError" in status
    assert not (run_dir / DONE_FILE).exists()


def test_a_checkpoint_that_cannot_be_written_fails_the_run(make_cfg, monkeypatch):
    """Checkpoints reach the disk in the background; a failed write still stops the run, named."""
    import dgbench.atomic as atomic

    real_write = atomic.atomic_write_bytes

    def disk_full_for_checkpoints(path, data):
        if Path(path).name == CHECKPOINT_FILE:
            raise OSError(28, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(atomic, "atomic_write_bytes", disk_full_for_checkpoints)
    cfg = make_cfg(*FAST)
    with pytest.raises(OSError, match="No space left"):
        train(cfg, FAST)
    (run_dir,) = (Path(cfg.output_dir) / "default").iterdir()
    assert "No space left on device" in (run_dir / STATUS_FILE).read_text()
    assert [r["step"] for r in read_records(run_dir / "results.jsonl")] == [0, 3]  # found at the 2nd


def _counting_update(monkeypatch, metrics_at):
    """ERM whose step-th update (from 0) also returns `metrics_at(step)`, merged over its own."""
    steps = iter(range(10**6))

    def update(self, batches):
        return {**ERM_UPDATE(self, batches), **metrics_at(next(steps))}

    monkeypatch.setattr(ERM, "update", update)


def test_records_hold_each_metric_averaged_over_the_steps_since_the_last_record(make_cfg, monkeypatch):
    """Metrics returned as device scalars or floats are read at the checkpoint, each step's once."""
    _counting_update(monkeypatch, lambda step: {"step_as_tensor": torch.tensor(float(step)), "step": step})
    result = train(make_cfg(*FAST), FAST)
    records = read_records(result.run_dir / "results.jsonl")
    # steps 0 | 1, 2, 3 | 4, 5, 6
    assert [r["metrics"]["step_as_tensor"] for r in records] == [0.0, 2.0, 5.0]
    assert [r["metrics"]["step"] for r in records] == [0.0, 2.0, 5.0]
    assert all(isinstance(r["loss"], float) and r["loss"] > 0 for r in records)


def test_divergence_between_records_names_the_first_bad_step_and_writes_no_record_for_it(
    make_cfg, monkeypatch
):
    _counting_update(monkeypatch, lambda step: {"loss": torch.tensor(math.nan)} if step >= 4 else {})
    cfg = make_cfg(*FAST)
    with pytest.raises(DivergedError, match="training loss became nan at step 4;"):
        train(cfg, FAST)
    (run_dir,) = (Path(cfg.output_dir) / "default").iterdir()
    assert [r["step"] for r in read_records(run_dir / "results.jsonl")] == [0, 3]


def _layout(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "nchw"
    return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "other"


@pytest.mark.parametrize(("setting", "layout"), [("true", "channels_last"), ("false", "nchw")])
def test_channels_last_reaches_the_model_and_the_batches_on_cpu(make_cfg, monkeypatch, setting, layout):
    seen = set()

    def update(self, batches):
        conv = next(m for m in self.modules() if isinstance(m, torch.nn.Conv2d))
        seen.update(_layout(t) for t in [conv.weight, *(x for x, _ in batches)])
        return ERM_UPDATE(self, batches)

    monkeypatch.setattr(ERM, "update", update)
    overrides = [*FAST, "trainer.steps=2", f"trainer.channels_last={setting}"]
    train(make_cfg(*overrides), overrides)
    assert seen == {layout}


@pytest.mark.parametrize("returned", [None, {"objective": 1.0}])
def test_an_update_without_a_loss_is_named(make_cfg, monkeypatch, returned):
    monkeypatch.setattr(ERM, "update", lambda self, batches: returned)
    with pytest.raises(DGBenchError, match=r"algorithm erm: update\(\) returned .*'loss' entry"):
        train(make_cfg(*FAST), FAST)


@pytest.mark.parametrize(
    ("metric", "shown"),
    [(torch.ones(3), r"a tensor of shape \(3,\)"), ("0.5", "'0.5'"), (None, "None")],
)
def test_a_metric_that_is_not_a_scalar_is_named_at_its_step(make_cfg, monkeypatch, metric, shown):
    """Named when returned, with its key: at the checkpoint it would fail in torch or float()."""
    update = ERM.update
    steps = []

    def update_with(self, batches):
        steps.append(len(steps))
        return {**update(self, batches), "margin": metric}

    monkeypatch.setattr(ERM, "update", update_with)
    match = rf"algorithm erm: update\(\) returned {shown} for metric 'margin'; each metric must be a float"
    with pytest.raises(DGBenchError, match=match):
        train(make_cfg(*FAST), FAST)
    assert steps == [0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graph", ["false", "true"])
def test_fast_path_steps_between_checkpoints_never_wait_for_the_gpu(make_cfg, monkeypatch, graph):
    """No `.item()`, no blocking copy, no other host sync from one checkpoint to the next, so the
    host queues the next batch's kernels while the GPU still runs the current step. Any sync in
    the steps raises (`torch.cuda.set_sync_debug_mode("error")`); the checkpoints' syncs are allowed."""
    import dgbench.train as train_module

    real_synchronize, real_save = train_module.synchronize, train_module.save_checkpoint

    def synchronize(device):  # the first thing a checkpoint does
        torch.cuda.set_sync_debug_mode("default")
        real_synchronize(device)

    def save_checkpoint(*args, **kwargs):  # the last thing a checkpoint does
        real_save(*args, **kwargs)
        torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(train_module, "synchronize", synchronize)
    monkeypatch.setattr(train_module, "save_checkpoint", save_checkpoint)
    overrides = [*FAST, "data.pipeline=fast", "trainer.device=cuda", f"trainer.cuda_graph={graph}"]
    try:
        result = train(make_cfg(*overrides), overrides)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [r["step"] for r in read_records(result.run_dir / "results.jsonl")] == [0, 3, 6]


def test_domainbed_protocol_augments_only_training_domains_out_split(make_cfg):
    """Training is the same; only the `out` accuracy of training domains sees the augmentation."""
    overrides = [*FAST, "dataset.test_envs=[sketch]", "trainer.steps=2", "trainer.checkpoint_freq=100"]
    plain = train(make_cfg(*overrides), overrides).record
    quirk = train(make_cfg(*overrides, "protocol=domainbed"), [*overrides, "protocol=domainbed"]).record
    assert quirk["run_id"] != plain["run_id"] and quirk["loss"] == plain["loss"]
    for domain in plain["acc"]:
        assert quirk["acc"][domain]["in"] == plain["acc"][domain]["in"]
    assert quirk["acc"]["sketch"] == plain["acc"]["sketch"]
    train_domains = [d for d in plain["acc"] if d != "sketch"]
    assert any(quirk["acc"][d]["out"] != plain["acc"][d]["out"] for d in train_domains)
    again = train(make_cfg(*overrides, "protocol=domainbed", "name=again"), overrides).record
    assert again["acc"] == quirk["acc"]  # the augmented evaluation is seeded, so repeatable


def test_unreadable_image_fails_naming_the_file_or_is_skipped_and_counted(make_cfg, monkeypatch):
    from dgbench.data.embedded import EmbeddedDomain
    from dgbench.errors import DataError

    real_load = EmbeddedDomain.load_image

    def load_image(self, index):
        if index % 50 == 7:
            raise DataError(f"cannot read image {self.name}/{index}.png: broken")
        return real_load(self, index)

    monkeypatch.setattr(EmbeddedDomain, "load_image", load_image)
    with pytest.raises(DataError, match=r"cannot read image \w+/\d+\.png"):
        train(make_cfg(*FAST), list(FAST))
    overrides = [*FAST, "data.skip_corrupt=true"]
    record = train(make_cfg(*overrides), overrides).record
    per_domain = 600 // 50  # indices 7, 57, ... in each of the 4 domains, all evaluated once
    assert record["metrics"]["skipped_images"] >= 4 * per_domain
    assert all(0.0 <= a <= 1.0 for splits in record["acc"].values() for a in splits.values())


def test_real_pacs_trains_and_records_all_four_domains(make_cfg, pacs_dir):
    """A reduced-resolution run on the real PACS: DomainBed's domains, splits and record layout."""
    overrides = [
        "dataset=pacs",
        f"dataset.root={pacs_dir.parent}",
        "dataset.test_envs=[sketch]",
        "data.resolution=32",
        "trainer.steps=1",
        "algorithm.batch_size=8",
    ]
    result = train(make_cfg(*overrides), overrides)
    record = read_records(result.run_dir / "results.jsonl")[-1]
    assert result.domains == ["art_painting", "cartoon", "photo", "sketch"] and record["test_envs"] == [3]
    assert set(record["acc"]) == set(result.domains) and result.num_classes == 7
    assert record["epoch"] == 0 and record["hparams"]["batch_size"] == 8
    for splits in record["acc"].values():
        assert 0.0 <= splits["in"] <= 1.0 and 0.0 <= splits["out"] <= 1.0


def test_fast_and_reference_pipelines_feed_identical_batches_without_augmentation(make_cfg):
    """Same indices per step, and the batched resize+normalize equals the PIL path bit for bit."""
    overrides = [*FAST, "data.augment=false"]
    ref = train(make_cfg(*overrides, "name=ref"), overrides).record
    fast = train(make_cfg(*overrides, "data.pipeline=fast", "name=fast"), [*overrides, "data.pipeline=fast"])
    assert fast.record["run_id"] != ref["run_id"]
    assert without_timing({**fast.record, "run_id": None}) == without_timing({**ref, "run_id": None})


def test_fast_pipeline_with_augmentation_learns_and_is_repeatable(make_cfg):
    overrides = [*FAST, "data.pipeline=fast"]
    first = train(make_cfg(*overrides, "name=a"), overrides).record
    second = train(make_cfg(*overrides, "name=b"), overrides).record
    assert without_timing(first) == without_timing(second)
    reference = train(make_cfg(*FAST, "name=c"), list(FAST)).record
    assert first["loss"] != reference["loss"]  # other augmentation draws, same distributions


def test_fast_pipeline_needs_images_in_memory(tmp_path, make_cfg, monkeypatch):
    from dgbench.data.embedded import EmbeddedDomain

    monkeypatch.delattr(EmbeddedDomain, "arrays", raising=False)
    monkeypatch.setattr(EmbeddedDomain, "__init__", _init_without_arrays(EmbeddedDomain.__init__))
    with pytest.raises(ConfigError, match=r"data\.pipeline=fast needs the images of embedded"):
        train(make_cfg(*FAST, "data.pipeline=fast"), [*FAST, "data.pipeline=fast"])


def _init_without_arrays(init):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.arrays = None  # like a folder dataset that decodes files on demand

    return wrapped


NEED_SMALL = {"arch": "timm", "name": "test_resnet", "pretrained": False, "bn": "train"}
NEED_PAPER = {"arch": "timm", "name": "resnet18.tv_in1k", "pretrained": True}


def _needs_a_timm_model(monkeypatch):
    """Make ERM declare a BackboneNeed (restored after the test) that small_cnn does not fit."""
    from dgbench.algorithms.base import BackboneNeed
    from dgbench.algorithms.erm import ERM

    need = BackboneNeed(
        family="a timm CNN",
        fits=lambda featurizer: featurizer.name.startswith(("test_resnet", "resnet")),
        paper=NEED_PAPER,
        small=NEED_SMALL,
        examples=("backbone=resnet18",),
    )
    monkeypatch.setattr(ERM, "backbone_need", need)


def test_an_algorithm_needing_a_backbone_family_gets_its_default_unless_one_is_chosen(make_cfg, monkeypatch):
    from dgbench.config import prepare_run_config

    _needs_a_timm_model(monkeypatch)
    cfg = make_cfg()
    prepare_run_config(cfg, [])
    assert (cfg.backbone.arch, cfg.backbone.name, cfg.backbone.bn) == ("timm", "test_resnet", "train")
    cfg = make_cfg("data.resolution=224")  # large images: the paper's backbone
    prepare_run_config(cfg, ["data.resolution=224"])
    assert (cfg.backbone.name, cfg.backbone.pretrained) == ("resnet18.tv_in1k", True)
    for explicit in (["backbone=small_cnn"], ["backbone.width=0.5"]):
        cfg = make_cfg(*explicit)
        prepare_run_config(cfg, explicit)
        assert cfg.backbone.arch == "small_cnn"  # the user's choice stays, and is checked at build time


def test_a_backbone_that_does_not_fit_is_refused_naming_those_that_do(make_cfg, monkeypatch):
    _needs_a_timm_model(monkeypatch)
    overrides = [*FAST, "backbone=small_cnn"]
    with pytest.raises(ConfigError) as error:
        train(make_cfg(*overrides), overrides)
    message = str(error.value)
    assert "algorithm=erm needs a timm CNN, but backbone 'small_cnn' is not one" in message
    assert "backbone=resnet18" in message and "backbone=timm backbone.name=test_resnet" in message
    # refused before any download: pretrained weights of an unfitting model are never fetched
    overrides = [*FAST, "backbone=timm", "backbone.name=convnext_atto", "backbone.pretrained=true"]
    with pytest.raises(ConfigError, match="backbone 'convnext_atto' is not one"):
        train(make_cfg(*overrides), overrides)
    result = train(make_cfg(*FAST), list(FAST))  # no backbone chosen: the small default trains
    assert read_records(result.run_dir / "results.jsonl")[-1]["backbone"] == "test_resnet"


def test_dataset_defaults_apply_unless_overridden(make_cfg, monkeypatch):
    from dgbench.config import prepare_run_config

    defaults = {"embedded": {"dropout": 0.5}, "pacs": {"dropout": 0.1}}
    monkeypatch.setattr(ERMHParams, "dataset_defaults", defaults)
    cfg = make_cfg()
    prepare_run_config(cfg, [])
    assert cfg.algorithm.dropout == 0.5
    cfg = make_cfg("algorithm.dropout=0.0")
    prepare_run_config(cfg, ["algorithm.dropout=0.0"])
    assert cfg.algorithm.dropout == 0.0


def test_evaluating_only_the_selection_splits_gives_the_same_tables(make_cfg):
    small = (*FAST, "dataset.images_per_domain=60", "data.pipeline=fast", "dataset.test_envs=[sketch]")
    full = train(make_cfg(*small, "name=all"), small)
    lean = train(make_cfg(*small, "trainer.evaluate=selection", "name=lean"), small)
    assert full.run_dir.name != lean.run_dir.name  # what is recorded differs: another run
    test_domain = full.domains[full.test_envs[0]]
    records = [read_records(result.run_dir / "results.jsonl") for result in (full, lean)]
    for a, b in zip(*records, strict=True):
        assert list(b["acc"]) == list(a["acc"]) and b["metrics"]["val_loss"] == a["metrics"]["val_loss"]
        for domain, splits in b["acc"].items():
            assert splits["out"] == a["acc"][domain]["out"]
            assert splits["in"] == (a["acc"][domain]["in"] if domain == test_domain else None)
    cells = {
        run: [(c.selection, c.test_env, c.mean) for c in aggregate(load_results([run])).cells]
        for run in (full.run_dir, lean.run_dir)
    }
    assert cells[full.run_dir] == cells[lean.run_dir] and cells[full.run_dir]
