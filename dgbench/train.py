"""One run: build -> train loop -> evaluate every domain -> records, checkpoints, `done`.

A run is (dataset, algorithm, backbone, test_envs, hparams_seed, trial_seed). Its
directory `<output_dir>/<name>/<run_id>` is named by a hash of what defines it, so
relaunching the same command finds it: a done run returns at once, an unfinished one
resumes from its last checkpoint and ends with the same records as an uninterrupted
run (on CPU; CUDA kernels are not bit-deterministic).
"""

from __future__ import annotations

import logging
import math
import numbers
import random
import resource
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from dgbench.algorithms.base import Algorithm
from dgbench.atomic import BackgroundWrites, atomic_write_json, atomic_write_text
from dgbench.averaging import Averaging, LossValley, recompute_batchnorm, swapped_in
from dgbench.backbones import build_backbone
from dgbench.backbones.auxiliary import auxiliary_metrics
from dgbench.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from dgbench.config import (
    Device,
    EvalSplits,
    Pipeline,
    Protocol,
    prepare_run_config,
    require_positive,
    run_id,
    training_seed,
)
from dgbench.data.base import MultiDomainDataset, resolve_test_envs
from dgbench.data.pipeline import PipelineSpec, build_streams
from dgbench.data.splits import split_indices
from dgbench.devices import synchronize
from dgbench.errors import ConfigError, DGBenchError
from dgbench.graphs import GraphedStep
from dgbench.loggers import build_sink, check_logger
from dgbench.meter import StepMeter, mean_metrics
from dgbench.records import (
    AVERAGED_FILE,
    RESULTS_FILE,
    append_record,
    read_records,
    truncate_records,
    write_records,
)
from dgbench.registry import ALGORITHMS, DATASETS
from dgbench.runs import CONFIG_FILE, DONE_FILE, STATUS_FILE, Heartbeat

log = logging.getLogger(__name__)


class DivergedError(DGBenchError):
    """The training loss became NaN or infinite."""


@dataclass
class RunResult:
    run_dir: Path
    record: dict[str, Any] | None  # the final record; None when the run was already done
    domains: list[str]
    test_envs: list[int]
    num_classes: int | None  # None when the run was already done (the dataset was not built)


def train(cfg: DictConfig, overrides: Sequence[str] = ()) -> RunResult:
    """Train (or resume, or skip) the run `cfg` describes. `overrides` are the command-line ones.

    A finished run is recognised before the dataset is built, so relaunching a sweep skips its
    done runs in milliseconds. Anything that fails once the run directory exists (building the
    dataset included) is recorded in `status.json`.
    """
    prepare_run_config(cfg, overrides)
    check_logger(cfg.logger)  # a missing wandb fails now, not after the dataset is built
    dataset_cfg = OmegaConf.to_object(cfg.dataset)
    domains = dataset_cfg.domain_names() if hasattr(dataset_cfg, "domain_names") else None
    dataset: MultiDomainDataset | None = None
    if domains is None:  # a dataset (plugin) that must be built to know its domains
        dataset = _build_dataset(cfg, dataset_cfg)
        domains = dataset.domains
    test_envs = resolve_test_envs(domains, cfg.dataset.test_envs, cfg.dataset.name)
    cfg.dataset.test_envs = test_envs  # indices, so `test_envs=[photo]` and `[2]` are one run
    run_dir = Path(cfg.output_dir) / cfg.name / run_id(cfg)
    if (run_dir / DONE_FILE).exists():
        log.info("run %s is already done (%s); nothing to train", run_dir.name, run_dir / DONE_FILE)
        return RunResult(run_dir, None, list(domains), test_envs, None)
    check_backbone_fits(cfg)  # after the done check: relaunching a finished sweep stays fast
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STATUS_FILE).unlink(missing_ok=True)
    handler = _log_to_file(run_dir / "train.log")
    try:
        with Heartbeat(run_dir):
            atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
            dataset = dataset or _build_dataset(cfg, dataset_cfg)
            if dataset.domains != list(domains):
                raise DGBenchError(
                    f"dataset {cfg.dataset.name}: built with domains {dataset.domains}, but its config "
                    f"announced {list(domains)}; fix the dataset's domain_names()"
                )
            record = _train(cfg, dataset, test_envs, run_dir)
        atomic_write_text(run_dir / DONE_FILE, "")
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)  # a done run never resumes; save the disk
        return RunResult(run_dir, record, dataset.domains, test_envs, dataset.num_classes)
    except BaseException as error:
        if not isinstance(error, KeyboardInterrupt):
            atomic_write_json(
                run_dir / STATUS_FILE, {"status": "failed", "error": f"{type(error).__name__}: {error}"}
            )
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def check_backbone_fits(cfg: DictConfig) -> None:
    """Refuse a backbone the algorithm cannot use before anything is downloaded or built.

    The check runs on a weightless copy built on the meta device (no memory, no download).
    """
    need = getattr(ALGORITHMS.get(cfg.algorithm.name).obj, "backbone_need", None)
    if need is None:
        return
    skeleton = OmegaConf.to_container(cfg.backbone, resolve=True)
    assert isinstance(skeleton, dict)
    skeleton.update(pretrained=False, weights=None)
    with torch.device("meta"):
        need.check(build_backbone(skeleton), cfg.algorithm.name)


def _build_dataset(cfg: DictConfig, dataset_cfg: Any) -> MultiDomainDataset:
    return DATASETS.get(cfg.dataset.name).obj(dataset_cfg)


def _train(
    cfg: DictConfig, dataset: MultiDomainDataset, test_envs: list[int], run_dir: Path
) -> dict[str, Any]:
    device = _device(Device(cfg.trainer.device).value)
    on_cuda = device.type == "cuda"
    seed = training_seed(cfg.dataset.name, cfg.algorithm.name, test_envs, cfg.hparams_seed, cfg.trial_seed)
    _seed_everything(seed)

    hparams = OmegaConf.to_object(cfg.algorithm)
    backbone = build_backbone(OmegaConf.to_object(cfg.backbone))
    train_envs = [i for i in range(len(dataset)) if i not in test_envs]
    algorithm: Algorithm = ALGORITHMS.get(cfg.algorithm.name).obj(
        backbone, dataset.num_classes, len(train_envs), hparams
    )
    # channels_last: cuDNN's and oneDNN's convolutions both prefer it (tools/bench_channels_last.py)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.preserve_format
    algorithm.to(device=device, memory_format=memory_format)
    if on_cuda:
        _cuda_kernels(deterministic=cfg.trainer.deterministic)
    if cfg.trainer.compile:
        algorithm.featurizer.compile()  # in place: state_dict keys (and checkpoints) stay the same

    protocol = Protocol(cfg.protocol)
    defaults = dataset.protocol_defaults(protocol.value)
    steps = require_positive(cfg.trainer.steps or defaults["steps"], "trainer.steps")
    freq = require_positive(
        cfg.trainer.checkpoint_freq or defaults["checkpoint_freq"], "trainer.checkpoint_freq"
    )
    resolved = cfg.copy()  # what really runs: config.yaml and the logger get the dataset's defaults filled in
    resolved.trainer.steps, resolved.trainer.checkpoint_freq = steps, freq
    if cfg.trainer.steps is None or cfg.trainer.checkpoint_freq is None:
        atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(resolved, resolve=True))
    algorithm.total_steps = steps  # for schedules that depend on the run length (UDIM's warm-up)
    results = run_dir / RESULTS_FILE
    averaged = run_dir / AVERAGED_FILE
    averaging = _averaging(cfg)
    extras = {"averaging": averaging} if averaging.active else {}
    checkpoint = run_dir / CHECKPOINT_FILE
    start = 0
    if checkpoint.exists():
        last = load_checkpoint(checkpoint, algorithm, device, extras)
        truncate_records(results, last)
        truncate_records(averaged, last)
        start = last + 1
        log.info("resuming run %s after step %d", run_dir.name, last)
    else:
        write_records(results, [])  # a record without a checkpoint is from a run that died
        averaged.unlink(missing_ok=True)
    record: dict[str, Any] = (read_records(results) or [{}])[-1]  # the last one, when resuming

    splits = [
        split_indices(len(d), cfg.dataset.holdout_fraction, cfg.trial_seed, i) for i, d in enumerate(dataset)
    ]
    batch_size = require_positive(hparams.batch_size, "algorithm.batch_size")
    skip = cfg.data.skip_corrupt
    spec = PipelineSpec(
        pipeline=Pipeline(cfg.data.pipeline).value,
        resolution=cfg.data.resolution or dataset.resolution,
        cache_resolution=cfg.data.cache_resolution,
        mean=backbone.mean,
        std=backbone.std,
        augment=cfg.data.augment and dataset.augment,
        augment_train_out=protocol is Protocol.domainbed,
        batch_size=batch_size,
        eval_batch_size=cfg.trainer.eval_batch_size,
        seed=seed,
        start_step=start,
        num_workers=cfg.trainer.num_workers,
        skip_corrupt=skip,
        device=device,
        skip_train_in=EvalSplits(cfg.trainer.evaluate) is EvalSplits.selection,
    )
    streams = build_streams(dataset, splits, train_envs, spec)
    iterators, eval_sources = streams.train, streams.eval
    steps_per_epoch = min(len(splits[i][1]) / batch_size for i in train_envs)
    identity = {
        "run_id": run_dir.name,
        "dataset": cfg.dataset.name,
        "algorithm": cfg.algorithm.name,
        "backbone": backbone.name,  # the built model's name: gmoe_<vit> for a GMoE backbone
        "test_envs": test_envs,
        "hparams_seed": cfg.hparams_seed,
        "trial_seed": cfg.trial_seed,
        "hparams": {k: v for k, v in OmegaConf.to_container(cfg.algorithm).items() if k != "name"},
    }
    sink = build_sink(
        cfg.logger,
        run_dir,
        run_dir.name,
        OmegaConf.to_container(resolved, resolve=True, enum_to_str=True),
        [dataset.domains[i] for i in test_envs],
    )
    autocast = _autocast(device, cfg.trainer.amp)
    graphed: GraphedStep | None = None  # captured at the first step (trainer.cuda_graph)
    capture = on_cuda and cfg.trainer.cuda_graph and algorithm.graph_safe
    if on_cuda and cfg.trainer.cuda_graph and not capture:
        log.info("%s does not declare its step capturable (graph_safe): eager steps", cfg.algorithm.name)
    train_names = [dataset.domains[i] for i in train_envs]

    def evaluate(model: Algorithm) -> tuple[dict[str, dict[str, float]], float, int]:
        """Accuracies, the training-domain validation loss (SWAD's criterion), skipped images."""
        acc, losses, skipped = _evaluate(
            model, eval_sources, device, memory_format, autocast, cfg.trainer.eval_batch_size
        )
        # a split not evaluated (trainer.evaluate=selection) is recorded as null
        acc = {d: {"in": acc[d].get("in"), "out": acc[d]["out"]} for d in dataset.domains}
        return acc, float(np.mean([losses[d]["out"] for d in train_names])), skipped

    meter = StepMeter()
    step_seconds = 0.0
    skipped_images = 0  # unreadable images dropped since the last record (data.skip_corrupt)
    checkpoint_seconds: float | None = None  # the loop's share of the last checkpoint, for the next record
    writes = BackgroundWrites()  # checkpoints reach the disk while training goes on
    bar = tqdm(
        total=steps, initial=start, disable=not cfg.trainer.progress, desc=run_dir.name, dynamic_ncols=True
    )
    try:
        algorithm.train()
        for step in range(start, steps):
            tick = time.perf_counter()
            batches = []
            for it in iterators:
                x, y, skipped = next(it)
                batches.append(_to_device((x, y), device, memory_format))
                skipped_images += skipped
            if capture:
                graphed = graphed or GraphedStep(algorithm, batches, _amp_dtype(device, cfg.trainer.amp))
                metrics = _require_metrics(graphed(batches), cfg.algorithm.name)
            else:
                with autocast:
                    metrics = _require_metrics(algorithm.update(batches), cfg.algorithm.name)
            # read at the checkpoint, not now: a float per step would make the host wait for the GPU
            meter.add(step, {**metrics, **auxiliary_metrics(algorithm)})  # + e.g. MoE routing metrics
            averaging.after_step(algorithm, step)
            step_seconds += time.perf_counter() - tick
            bar.update(1)

            if step % freq == 0 or step == steps - 1:
                tick = time.perf_counter()
                synchronize(device)  # the queued steps' time belongs to the steps, not the evaluation
                step_seconds += time.perf_counter() - tick
                per_step = meter.read()
                _check_finite(per_step)
                means = mean_metrics(per_step.values())
                bar.set_postfix(loss=f"{means['loss']:.4f}", refresh=False)
                eval_start = time.perf_counter()
                acc, val_loss, eval_skipped = evaluate(algorithm)
                means["eval_time"] = time.perf_counter() - eval_start  # seconds, what trainer.evaluate saves
                means["val_loss"] = val_loss
                if checkpoint_seconds is not None:  # seconds: the checkpoint after the previous record
                    means["checkpoint_time"] = checkpoint_seconds
                if skip:
                    means["skipped_images"] = skipped_images + eval_skipped
                record = {
                    **identity,
                    "step": step,
                    "epoch": step / steps_per_epoch,  # DomainBed: step / min_domain(len(in) / batch)
                    "loss": means.pop("loss"),
                    "metrics": means,
                    "acc": acc,
                    "step_time": step_seconds / len(per_step),
                    "mem_gb": _peak_memory_gb(device),
                }
                # Record first, then checkpoint: a crash in between leaves a record newer than the
                # checkpoint, which the resumed run drops and recomputes identically.
                append_record(results, record)
                sink.log(record)
                averaging.after_evaluation(step, val_loss)
                for label, average in averaging.at_checkpoints().items():
                    with swapped_in(algorithm, average):
                        append_record(averaged, averaged_record(record, label, *evaluate(algorithm)[:2]))
                tick = time.perf_counter()  # the loop's share; the disk write runs in the background
                save_checkpoint(checkpoint, algorithm, step, extras, writes.write)
                checkpoint_seconds = time.perf_counter() - tick
                meter.clear()
                step_seconds = 0.0
                skipped_images = 0
        final = averaging.at_end()
        if final:  # SWAD: the window's average, with its BatchNorm statistics re-estimated
            ((label, average),) = final.items()
            algorithm.load_state_dict(average.tensors)  # training is over: the live weights can go
            layers = recompute_batchnorm(algorithm, _pooled_inputs(iterators, device, memory_format))
            swad = averaged_record(record, label, *evaluate(algorithm)[:2])
            swad["metrics"].update(averaging.swad_window(), bn_layers_recomputed=layers)
            kept = [r for r in read_records(averaged) if r["algorithm"] != label]  # a resumed run's
            write_records(averaged, [*kept, swad])
        writes.wait()
    except BaseException as error:
        try:
            writes.wait()  # a checkpoint being written still lands
        except Exception as failed:
            log.error("writing the last checkpoint failed too: %s", failed)
        sink.finish(exit_code=130 if isinstance(error, KeyboardInterrupt) else 1)
        raise
    bar.close()
    sink.finish()
    return record


def _require_metrics(metrics: Any, algorithm: str) -> Mapping[str, Any]:
    """`metrics` if it is what `Algorithm.update` must return; a message for a plugin author otherwise.

    Checked here, at the step, from metadata alone (no device sync): the values are read at the
    checkpoint, where a bad one would fail without naming its key.
    """
    if not isinstance(metrics, Mapping) or "loss" not in metrics:
        raise DGBenchError(
            f"algorithm {algorithm}: update() returned {metrics!r}; it must return a dict of metrics "
            f"with a 'loss' entry (floats or scalar tensors), e.g. {{'loss': loss.detach()}}"
        )
    for key, value in metrics.items():
        if not _is_scalar(value):
            tensor = isinstance(value, torch.Tensor)
            shown = f"a tensor of shape {tuple(value.shape)}" if tensor else repr(value)
            raise DGBenchError(
                f"algorithm {algorithm}: update() returned {shown} for metric {key!r}; each metric must "
                f"be a float or a one-element tensor (reduce it, e.g. `.mean().detach()`)"
            )
    return metrics


def _is_scalar(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, numbers.Real)


def _check_finite(per_step: dict[int, dict[str, float]]) -> None:
    """Fail at the first step whose training loss is NaN or infinite."""
    for step, metrics in per_step.items():
        if not math.isfinite(metrics["loss"]):
            raise DivergedError(f"training loss became {metrics['loss']} at step {step}; run marked failed")


def averaged_record(
    record: dict[str, Any], label: str, acc: dict[str, Any], val_loss: float
) -> dict[str, Any]:
    """The record of an averaged model evaluated at `record`'s step (see records.AVERAGED_FILE)."""
    return {**record, "algorithm": label, "loss": val_loss, "metrics": {"val_loss": val_loss}, "acc": acc}


@torch.inference_mode()
@torch.compiler.set_stance("force_eager")  # trainer.compile: see the docstring
def _evaluate(
    algorithm: Algorithm,
    sources: dict[tuple[str, str], Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor, int]]]],
    device: torch.device,
    memory_format: torch.memory_format,
    autocast: AbstractContextManager[Any],
    full_batch: int,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], int]:
    """Accuracy and mean cross-entropy of the `in` and `out` split of every domain, in large batches
    under inference mode (no autograd bookkeeping at all, not even version counters). Also returns
    how many unreadable images were skipped (`data.skip_corrupt`).

    cudnn autotunes (`cudnn.benchmark`) the `full_batch`-sized batches only: each split's last,
    smaller batch is a shape of its own, which autotuning would time anew for every convolution,
    once per split; it runs cudnn's heuristic choice instead. (An H100's first evaluation of
    ResNet-50 took 7.3 s against 0.31 s for later ones, mostly autotuning six shapes.)

    Always eager, also under `trainer.compile`: compiling the evaluation's eval-mode forward and
    its batch shapes (the large ones and each split's last) took 22 s on an H100 for ResNet-50, to
    save 0.1 s per evaluation (`tools/bench_train.py`), 2 s of a PACS run.
    """
    algorithm.eval()
    acc: dict[str, dict[str, float]] = defaultdict(dict)
    loss: dict[str, dict[str, float]] = defaultdict(dict)
    skipped_images = 0
    for (domain, split), batches in sources.items():
        total = 0
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # correct, loss: read once per split
        for x, y, skipped in batches():
            skipped_images += skipped
            x, y = _to_device((x, y), device, memory_format)
            with autocast, _cudnn_autotuning(len(y) == full_batch):
                logits = algorithm.predict(x)
            sums[0] += (logits.argmax(dim=1) == y).sum()
            sums[1] += F.cross_entropy(logits.float(), y, reduction="sum")
            total += len(y)
        correct, loss_sum = sums.tolist()
        acc[domain][split] = correct / total if total else float("nan")
        loss[domain][split] = loss_sum / total if total else float("nan")
    algorithm.train()
    return dict(acc), dict(loss), skipped_images


@contextmanager
def _cudnn_autotuning(wanted: bool) -> Iterator[None]:
    """cudnn autotuning off inside unless `wanted` (it stays off where it was off)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before and wanted
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _averaging(cfg: DictConfig) -> Averaging:
    trainer = cfg.trainer
    try:
        valley = None
        if trainer.swad:
            valley = LossValley(
                trainer.swad_n_converge, trainer.swad_n_tolerance, trainer.swad_tolerance_ratio
            )
        return Averaging(cfg.algorithm.name, valley, ema=trainer.ema, sma_start=trainer.sma_start)
    except ValueError as error:
        keys = "trainer.ema, trainer.swad_n_converge, trainer.swad_n_tolerance"
        raise ConfigError(f"weight averaging ({keys}): {error}") from None


def _pooled_inputs(
    iterators: Sequence[Iterator[tuple[torch.Tensor, torch.Tensor, int]]],
    device: torch.device,
    memory_format: torch.memory_format,
) -> Iterator[torch.Tensor]:
    """The training domains' next minibatches, concatenated: SWAD's BatchNorm re-estimation input."""
    while True:
        batches = [_to_device(next(it)[:2], device, memory_format)[0] for it in iterators]
        yield torch.cat(batches)


def _to_device(
    batch: Any, device: torch.device, memory_format: torch.memory_format
) -> tuple[torch.Tensor, ...]:
    x, y = batch
    x = x.to(device, non_blocking=True, memory_format=memory_format)
    return x, y.to(device, non_blocking=True)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DGBenchError(
            "trainer.device=cuda but no CUDA device is available; use trainer.device=auto or cpu"
        )
    return torch.device(name)


def _cuda_kernels(deterministic: bool) -> None:
    """cudnn autotuning (fastest kernels for fixed shapes) unless deterministic kernels are asked for."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def _amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    return torch.bfloat16 if device.type == "cuda" and amp else None


def _autocast(device: torch.device, amp: bool) -> AbstractContextManager[Any]:
    dtype = _amp_dtype(device, amp)
    return nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def _log_to_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler
