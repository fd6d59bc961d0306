"""Config schemas, hparams-seed sampling and the identity of a run.

The root config (`conf/config.yaml`) composes five groups: `dataset`, `algorithm`
and `backbone` come from the registries (each registered dataclass is a config
node), `trainer` and `logger` from the schemas below plus YAML presets in `conf/`.
Structured configs make Hydra reject unknown keys and wrong types at composition,
naming the key.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from dgbench.errors import ConfigError
from dgbench.hparams import Distribution, parse_distribution, sample_hparams, search_space, seed_hash
from dgbench.registry import ALGORITHMS, BACKBONES, DATASETS, Registry


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Pipeline(str, enum.Enum):
    reference = "reference"  # PIL decode + torchvision transforms per sample (DomainBed's path)
    fast = "fast"  # in-memory uint8 images, augmentation as batched tensor ops on the device


class Protocol(str, enum.Enum):
    """Named evaluation protocols: what is augmented, and the per-dataset step defaults.

    default: DomainBed's transforms and steps, every evaluated split unaugmented.
    domainbed: DomainBed's code exactly: the `out` split of training domains is evaluated with the
        training augmentation (DomainBed attaches the transform before splitting), which makes
        training-domain validation accuracy noisy; use it to reproduce DomainBed's numbers.
    swad: SWAD's schedule (DomainNet 15001 steps, evaluation every 200/500 steps), unaugmented
        validation.
    """

    default = "default"
    domainbed = "domainbed"
    swad = "swad"


class EvalSplits(str, enum.Enum):
    """Which splits each evaluation measures.

    all: the `in` and `out` split of every domain.
    selection: only what the model-selection methods read: every domain's `out` split and the test
        domains' `in` split (LODO validates on the other test domain's `in`). The training domains'
        `in` splits, 80% of the training data and most of the evaluation time, are recorded as null.
    """

    all = "all"
    selection = "selection"


@dataclass
class DataConfig:
    pipeline: Pipeline = Pipeline.reference
    resolution: int | None = None  # working resolution in px; default: the dataset's
    augment: bool = True  # DomainBed's training augmentation (crop, flip, colour jitter, grayscale)
    skip_corrupt: bool = False  # skip (warn, count) unreadable images instead of failing the run
    # data.pipeline=fast on folder datasets: side in px of the decoded-image cache; default: `resolution`
    # (evaluation then equals the reference pipeline's bit for bit).
    cache_resolution: int | None = None


@dataclass
class TrainerConfig:
    steps: int | None = None  # training steps; default: the dataset's (DomainBed: 5001)
    checkpoint_freq: int | None = None  # evaluate + checkpoint every N steps; default: the dataset's
    device: Device = Device.auto  # auto: CUDA when available, else CPU
    # DataLoader worker processes per training domain and for evaluation (data.pipeline=reference);
    # default: sized to the usable cores for datasets read from files, none for in-memory ones.
    num_workers: int | None = None
    eval_batch_size: int = 256
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # channels_last model and batches (faster convolutions on CUDA and CPU)
    deterministic: bool = False  # CUDA: deterministic kernels, no cudnn.benchmark autotuning (slower)
    compile: bool = False  # torch.compile the featurizer (its first steps compile: worth it for long runs)
    # CUDA: capture the training step as one CUDA graph and replay it (dgbench.graphs), for
    # algorithms that declare their step capturable (Algorithm.graph_safe); the others run eagerly
    cuda_graph: bool = False
    evaluate: EvalSplits = EvalSplits.all  # all | selection (skip the training domains' `in` splits)
    progress: bool = True  # progress bar with step, loss and ETA
    # Weight averaging (dgbench.averaging), each recorded as its own series "<algorithm> + <kind>":
    swad: bool = False  # SWAD: dense average over the validation-loss valley, evaluated after training
    swad_n_converge: int = 3  # evaluations whose loss minimum starts the window (SWAD's N_s)
    swad_n_tolerance: int = 6  # look-ahead of evaluations that ends it (SWAD's N_e)
    swad_tolerance_ratio: float = 0.3  # the window ends when the loss stays above (1 + r) x converged
    ema: float | None = None  # decay d of an exponential moving average, evaluated at every checkpoint
    sma_start: int | None = None  # uniform average of the weights from this step on (EoA / ERM++)


@dataclass
class JsonlLoggerConfig:
    kind: str = "jsonl"  # records go to results.jsonl only


@dataclass
class WandbLoggerConfig:
    kind: str = "wandb"  # results.jsonl plus a Weights & Biases run
    project: str = "dgbench"
    entity: str | None = None
    mode: str = "online"  # online | offline | disabled
    tags: list[str] = field(default_factory=list)


@dataclass
class RootConfig:
    dataset: Any = MISSING
    algorithm: Any = MISSING
    backbone: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    protocol: Protocol = Protocol.default  # default | domainbed | swad (see Protocol)
    hparams_seed: int = 0  # 0: defaults; k>0: DomainBed-style random search draw k
    trial_seed: int = 0  # selects the in/out splits and the training seed
    output_dir: str = "outputs"  # root of all run directories
    name: str = "default"  # experiment or sweep name: runs live in <output_dir>/<name>/<run_id>
    # Replacement search distributions, e.g. {algorithm: {lr: "10^U(-4.5, -2.5)"}} (see hparams.py).
    search: dict[str, dict[str, str]] = field(default_factory=dict)


def register_schemas() -> None:
    """Make the non-registry schemas visible to Hydra (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="config_schema", node=RootConfig)
    store.store(group="trainer", name="schema", node=TrainerConfig)
    store.store(group="logger", name="jsonl_schema", node=JsonlLoggerConfig)
    store.store(group="logger", name="wandb_schema", node=WandbLoggerConfig)


# Groups whose nodes come from a registry: the hparams_seed search draws their searchable fields.
SEARCHED_GROUPS: dict[str, tuple[Registry[Any], str]] = {
    "dataset": (DATASETS, "name"),
    "algorithm": (ALGORITHMS, "name"),
    "backbone": (BACKBONES, "arch"),
}

# Keys that say where or how to show a run, not what it computes: left out of the run id.
NON_DEFINING_KEYS = (
    "output_dir",
    "name",
    "dataset.root",
    "trainer.device",
    "trainer.num_workers",
    "trainer.eval_batch_size",
    "trainer.progress",
    "trainer.deterministic",  # CUDA kernels differ in rounding only
    "trainer.compile",
    "trainer.cuda_graph",
    "logger",
    "search",  # what it draws is in the config itself
)
# Keys added after runs were recorded, left out of the run id while they hold the value that
# reproduces those runs (the behaviour from before the key existed, not whatever the default becomes):
# adding them kept existing run ids, so a relaunched sweep still finds its finished runs.
OMITTED_AT_DEFAULT: dict[str, Any] = {
    "data.cache_resolution": None,
    "trainer.swad": False,
    "trainer.swad_n_converge": 3,
    "trainer.swad_n_tolerance": 6,
    "trainer.swad_tolerance_ratio": 0.3,
    "trainer.ema": None,
    "trainer.sma_start": None,
    "trainer.evaluate": "all",
}


def override_keys(overrides: Iterable[str]) -> set[str]:
    """Config keys set explicitly by command-line overrides (`a.b=1`, `+a.b=1`, `~a.b`)."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def prepare_run_config(cfg: DictConfig, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Complete a composed config the way every run (and `dgbench sweep --dry-run`) sees it.

    In order: the algorithm's own backbone when none was chosen, the algorithm's per-dataset
    defaults, then the hparams_seed draw. Returns what the draw sampled.
    """
    overrides = list(overrides)
    check_sizes(cfg)
    apply_backbone_default(cfg, overrides)
    apply_dataset_defaults(cfg, overrides)
    return apply_hparams_seed(cfg, overrides)


# Sizes taken from the dataset's protocol or resolution while unset (None); set, they must be positive.
OPTIONAL_SIZES = ("trainer.steps", "trainer.checkpoint_freq", "data.resolution", "data.cache_resolution")


def check_sizes(cfg: DictConfig) -> None:
    """Fail on a size no run can use, naming the key, before anything is built or written.

    An unset size takes its default; a 0 must not silently do the same through `value or default`
    (`trainer.steps=0` trained the dataset's default number of steps), nor fail mid-run (a zero
    evaluation batch size failed at the first evaluation).
    """
    for key in OPTIONAL_SIZES:
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {value}; unset, it takes the default")
    require_positive(cfg.trainer.eval_batch_size, "trainer.eval_batch_size")
    workers = cfg.trainer.num_workers
    if workers is not None and workers < 0:
        raise ConfigError(
            f"trainer.num_workers must be 0 (load in the main process) or more, got {workers}; "
            f"leave it unset to size the loaders to the usable cores"
        )


def apply_backbone_default(cfg: DictConfig, overrides: Iterable[str] = ()) -> bool:
    """Give an algorithm that needs a backbone family (`BackboneNeed`) its default backbone.

    Only when no `backbone` or `backbone.*` key was set on the command line: the composed
    default (small_cnn) is a placeholder for such algorithms, an explicit choice is the user's
    and is checked when the algorithm is built. Small images (embedded, MNIST) get the need's
    small backbone, others the paper's. Returns whether the backbone was replaced.
    """
    need = getattr(ALGORITHMS.get(cfg.algorithm.name).obj, "backbone_need", None)
    if need is None or any(k.split(".")[0] == "backbone" for k in override_keys(overrides)):
        return False
    image_size = cfg.data.resolution or OmegaConf.to_object(cfg.dataset).image_size()
    values = need.default_for(int(image_size))
    schema = BACKBONES.get(values["arch"]).config
    cfg.backbone = OmegaConf.structured(schema(**values))
    return True


def apply_dataset_defaults(cfg: DictConfig, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The algorithm's `dataset_defaults` for this dataset, except keys set explicitly."""
    config_cls = ALGORITHMS.get(cfg.algorithm.name).config
    defaults = getattr(config_cls, "dataset_defaults", {}).get(cfg.dataset.name, {})
    explicit = override_keys(overrides)
    applied = {}
    for key, value in defaults.items():
        if f"algorithm.{key}" not in explicit:
            cfg.algorithm[key] = value
            applied[f"algorithm.{key}"] = value
    return applied


def apply_hparams_seed(cfg: DictConfig, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Replace searchable hparams by their draw for `cfg.hparams_seed` (in place).

    Explicit overrides win over sampled values. Returns what was sampled, keyed `group.field`.
    """
    explicit = override_keys(overrides)
    applied: dict[str, Any] = {}
    for group, (registry, name_field) in SEARCHED_GROUPS.items():
        node = cfg[group]
        config_cls = registry.get(node[name_field]).config
        replaced = search_overrides(cfg, group, config_cls)
        for key, value in sample_hparams(config_cls, cfg.hparams_seed, cfg.trial_seed, replaced).items():
            if f"{group}.{key}" not in explicit:
                node[key] = value
                applied[f"{group}.{key}"] = value
    return applied


def search_overrides(cfg: DictConfig, group: str, config_cls: type) -> dict[str, Distribution]:
    """The `search.<group>` distributions, validated against the group's searchable fields."""
    replaced = {}
    for key, spec in cfg.get("search", {}).get(group, {}).items():
        if key not in search_space(config_cls):
            raise ConfigError(
                f"search.{group}.{key}: {key!r} is not a searchable hparam of {config_cls.__name__}; "
                f"searchable: {', '.join(search_space(config_cls)) or '(none)'}"
            )
        try:
            replaced[key] = parse_distribution(spec)
        except ValueError as error:
            raise ConfigError(f"search.{group}.{key}: {error}") from None
    return replaced


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config minus the keys that do not change what the run computes."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(container, dict)
    missing = object()
    for dotted in (*NON_DEFINING_KEYS, *OMITTED_AT_DEFAULT):
        *parents, leaf = dotted.split(".")
        node = container
        for parent in parents:
            node = node.get(parent, {})
        if dotted in NON_DEFINING_KEYS or node.get(leaf, missing) == OMITTED_AT_DEFAULT[dotted]:
            node.pop(leaf, None)
    return container


def run_id(cfg: DictConfig) -> str:
    """Stable 16-hex id of what defines the run (not paths, devices or launcher settings)."""
    payload = json.dumps(run_identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def training_seed(
    dataset: str, algorithm: str, test_envs: list[int], hparams_seed: int, trial_seed: int
) -> int:
    """Seed of model init, sampling and augmentation, as DomainBed's sweep derives it."""
    return seed_hash(dataset, algorithm, tuple(test_envs), hparams_seed, trial_seed)


def require_positive(value: int, key: str) -> int:
    if value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value}")
    return value
