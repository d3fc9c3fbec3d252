"""The configuration schema: one YAML schema of dataclasses, validated before Ray starts.

A config file holds the sections `model`, `data`, `optim`, `train` and `scaling` plus the
top-level keys `name`, `storage_path` and `seed`. Experiment files for Ray Tune add a `search`
section (variants, a space over Tune's primitives, trial scheduling), checked here too and
ignored by the trainer. Every error is a `ConfigError` with a one-line message that names the
key and what is allowed. Model defaults (variant, solver, the preset's tolerances and
lambda_skip) come from `raydeq.models`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import operator
import os
import re
import reprlib
import types
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from raydeq.models import DEFAULT_SOLVER, DEFAULT_VARIANT, PRESETS, VARIANTS
from raydeq.solvers import ADJOINTS, SOLVERS

MODELS = tuple(PRESETS)
DATASETS = ("digits", "mnist10k", "mnist", "cifar10", "svhn", "imagenet", "fake")
FILE_DATASETS = ("mnist", "cifar10", "svhn", "imagenet")
EMBEDDED_DATASETS = ("digits", "mnist10k")
DOWNLOADABLE = ("mnist", "cifar10", "svhn")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")
DEVICES = ("auto", "cpu", "cuda")
AMP = ("off", "bf16", "fp16")
SCHEDULERS = ("fifo", "asha")
MODES = ("max", "min")
DEQ_ONLY = ("adjoint", "max_steps", "jac_reg", "pretrain_steps")
ODE_ONLY = ("t1",)
# Settings that do not change the trained model, so that changing them resumes the same run.
OUTSIDE_HASH = ("name", "label", "storage_path", "search", "scaling")
OUTSIDE_HASH += ("train.report_every", "train.checkpoint_every", "train.keep_checkpoints")
OUTSIDE_HASH += ("train.eval_batches", "data.loader_workers", "data.pin_memory")
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le)}


class ConfigError(ValueError):
    """A configuration key is unknown, or its value has the wrong type or is out of range."""


def _opt(
    default: Any,
    *,
    choices: tuple[str, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
) -> Any:
    """A config field with its default and the values it allows."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelSection:
    """Arguments of `raydeq.models.build`; unset (null) options take the preset's defaults."""

    model: str = _opt("mnist_dense", choices=MODELS)
    variant: str = _opt(DEFAULT_VARIANT, choices=VARIANTS)
    solver: str = _opt(DEFAULT_SOLVER, choices=SOLVERS)
    adjoint: str | None = _opt(None, choices=ADJOINTS)
    abstol: float | None = _opt(None, gt=0)
    reltol: float | None = _opt(None, ge=0)
    max_steps: int | None = _opt(None, ge=1)
    jac_reg: bool | None = _opt(None)
    pretrain_steps: int | None = _opt(None, ge=0)
    t1: float | None = _opt(None, gt=0)


@dataclass(frozen=True)
class DataSection:
    """Which dataset to read, from where, and how to batch it."""

    dataset: str = _opt("digits", choices=DATASETS)
    data_dir: str | None = _opt(None)
    download: bool = _opt(False)
    augment: bool = _opt(True)  # the dataset's standard training augmentation (see data.py)
    batch_size: int = _opt(32, ge=1)  # global: split evenly over the workers
    eval_batch_size: int = _opt(256, ge=1)  # per worker
    loader_workers: int = _opt(0, ge=0)
    pin_memory: bool = _opt(False)
    image_size: int = _opt(224, ge=8)
    fake_samples: int = _opt(256, ge=1)
    fake_shape: tuple[int, ...] = _opt((1, 28, 28))
    fake_classes: int = _opt(10, ge=2)


@dataclass(frozen=True)
class OptimSection:
    """Optimizer, learning-rate schedule and gradient clipping."""

    optimizer: str = _opt("adam", choices=OPTIMIZERS)
    lr: float = _opt(1e-3, gt=0)
    weight_decay: float = _opt(0.0, ge=0)
    momentum: float = _opt(0.9, ge=0, le=1)
    nesterov: bool = _opt(False)
    schedule: str = _opt("cosine", choices=SCHEDULES)
    step_epochs: int = _opt(30, ge=1)
    gamma: float = _opt(0.1, gt=0, le=1)
    grad_clip: float = _opt(0.0, ge=0)


@dataclass(frozen=True)
class TrainSection:
    """Length of training, loss weights, and the reporting and checkpoint cadence."""

    epochs: int = _opt(10, ge=1)
    max_steps: int = _opt(0, ge=0)
    lambda_skip: float | None = _opt(None, ge=0)  # None: the preset's (models.PRESETS)
    lambda_jac: float = _opt(0.0, ge=0)
    amp: str = _opt("off", choices=AMP)  # autocast dtype; fp16 adds a GradScaler
    report_every: int = _opt(20, ge=1)
    checkpoint_every: int = _opt(0, ge=0)
    keep_checkpoints: int = _opt(3, ge=1)
    eval_batches: int = _opt(0, ge=0)
    max_nonfinite_steps: int = _opt(5, ge=1)


@dataclass(frozen=True)
class ScalingSection:
    """How many Ray Train workers, on which device, and how many restarts after a failure."""

    num_workers: int = _opt(2, ge=1)
    device: str = _opt("auto", choices=DEVICES)
    cpus_per_worker: float = _opt(1.0, gt=0)
    max_failures: int = _opt(3, ge=-1)


@dataclass(frozen=True)
class SearchSection:
    """Ray Tune's side: variants (labelled rows of dotted settings), a space over Tune's
    primitives, the metric and scheduler, and the trials' size and concurrency."""

    variants: tuple[dict, ...] = _opt(())
    space: dict = _opt({})
    metric: str = _opt("test_accuracy")
    mode: str = _opt("max", choices=MODES)
    num_samples: int = _opt(1, ge=1)
    scheduler: str = _opt("fifo", choices=SCHEDULERS)
    grace_period: int = _opt(1, ge=1)
    reduction_factor: int = _opt(2, ge=2)
    max_t: int = _opt(0, ge=0)
    max_concurrent_trials: int = _opt(0, ge=0)
    workers_per_trial: int = _opt(0, ge=0)


@dataclass(frozen=True)
class Config:
    """One training run; `name` defaults to a deterministic name derived from the settings."""

    name: str | None = _opt(None)
    storage_path: str = _opt("runs")
    seed: int = _opt(0, ge=0)
    label: str | None = _opt(None)  # in progress lines (a Tune trial's variant); name if unset
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    search: SearchSection = field(default_factory=SearchSection)

    @property
    def run_dir(self) -> str:
        """The run's folder: `storage_path/name`."""
        return os.path.join(self.storage_path, self.name or "")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of the config (what `validate` accepts back)."""
        return dataclasses.asdict(self)

    def model_options(self) -> dict[str, Any]:
        """The model section as `raydeq.models.build` takes it, without unset options."""
        return {k: v for k, v in dataclasses.asdict(self.model).items() if v is not None}


def _is_int(value: Any) -> bool:
    """True for integers (YAML booleans excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


_ACCEPTS = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", _is_int),
    float: ("a number", lambda v: _is_int(v) or isinstance(v, float)),
    str: ("a string", lambda v: isinstance(v, str)),
    dict: ("a mapping", lambda v: isinstance(v, Mapping)),
    tuple[int, ...]: (
        "a list of positive integers",
        lambda v: isinstance(v, list | tuple) and all(_is_int(i) and i > 0 for i in v),
    ),
    tuple[dict, ...]: (
        "a list of mappings",
        lambda v: isinstance(v, list | tuple) and all(isinstance(i, Mapping) for i in v),
    ),
}


def _finite(key: str, value: int | float) -> float:
    """`value` as a finite float, or a ConfigError."""
    if isinstance(value, float) or abs(value) < 2**1000:
        value = float(value)
        if math.isfinite(value):
            return value
    raise ConfigError(f"{key}: expected a finite number, got {reprlib.repr(value)}")


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check `value` against the annotated type `kind` and return it in that type."""
    if get_origin(kind) in (Union, types.UnionType):
        if value is None:
            return None
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    expected, accepts = _ACCEPTS[kind]
    if not accepts(value):
        raise ConfigError(f"{key}: expected {expected}, got {reprlib.repr(value)}")
    if kind is float:
        return _finite(key, value)
    if kind == tuple[dict, ...]:
        return tuple(dict(row) for row in value)
    return kind(value) if kind is dict else tuple(value) if kind == tuple[int, ...] else value


def _check_range(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Raise a ConfigError when `value` is outside the field's allowed values."""
    if value is None:
        return
    if meta["choices"] is not None and value not in meta["choices"]:
        allowed = ", ".join(meta["choices"])
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {allowed}")
    for name, (sign, holds) in _BOUNDS.items():
        bound = meta[name]
        if bound is not None and not holds(value, bound):
            raise ConfigError(f"{key}: must be {sign} {bound:g}, got {reprlib.repr(value)}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Build the dataclass `cls` from the mapping `raw`, checking every key and value."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {reprlib.repr(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            allowed = ", ".join(fields)
            shown = key if isinstance(key, str) and key.isprintable() else reprlib.repr(key)
            raise ConfigError(f"{prefix}{shown}: unknown key; allowed keys in {where}: {allowed}")
    hints = get_type_hints(cls)
    values = {}
    for name, spec in fields.items():
        if name not in raw:
            continue
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, raw[name] if raw[name] is not None else {}, f"{name}.")
            continue
        value = raw[name]
        if value is False and "off" in (spec.metadata["choices"] or ()):
            value = "off"  # YAML 1.1 reads an unquoted `off` as false
        values[name] = _coerce(prefix + name, value, kind)
        _check_range(prefix + name, values[name], spec.metadata)
    return cls(**values)


def _check_together(cfg: Config) -> None:
    """Rules that involve more than one key."""
    data = cfg.data
    if data.dataset in FILE_DATASETS and data.data_dir is None:
        raise ConfigError(
            f"data.data_dir: required for dataset {data.dataset!r} (the folder with its files)"
        )
    if data.dataset in EMBEDDED_DATASETS and data.data_dir is not None:
        raise ConfigError(
            f"data.data_dir: dataset {data.dataset!r} ships with raydeq and reads no folder; "
            "remove data_dir (or use dataset 'mnist' for MNIST files of your own)"
        )
    if data.download and data.dataset not in DOWNLOADABLE:
        raise ConfigError(f"data.download: only {', '.join(DOWNLOADABLE)} can be downloaded")
    if len(data.fake_shape) != 3:
        raise ConfigError(
            f"data.fake_shape: expected [channels, height, width], got {data.fake_shape}"
        )
    neural_ode = cfg.model.variant == "neural_ode"
    for key in ODE_ONLY if not neural_ode else DEQ_ONLY:
        if getattr(cfg.model, key) is not None:
            raise ConfigError(
                f"model.{key}: not an option of variant {cfg.model.variant!r}; "
                f"DEQ variants take {', '.join(DEQ_ONLY)}, neural_ode takes {', '.join(ODE_ONLY)}"
            )
    if data.batch_size % cfg.scaling.num_workers:
        raise ConfigError(
            f"data.batch_size: {data.batch_size} does not split evenly over "
            f"scaling.num_workers={cfg.scaling.num_workers}; use a multiple of it"
        )
    if cfg.train.lambda_jac > 0 and not cfg.model.jac_reg:
        raise ConfigError("train.lambda_jac: needs model.jac_reg=true to have a Jacobian term")
    _check_variants(cfg.search.variants)
    if cfg.name is not None and not _NAME_PATTERN.fullmatch(cfg.name):
        raise ConfigError(
            f"name: {cfg.name!r} is not a folder name; use letters, digits, '.', '_' and '-'"
        )


def _check_variants(variants: Sequence[Mapping[str, Any]]) -> None:
    """Each search variant is a non-empty row of dotted keys to plain values, label a string."""
    for index, row in enumerate(variants):
        where = f"search.variants[{index}]"
        if not row:
            raise ConfigError(f"{where}: expected a mapping of dotted keys to values")
        if not isinstance(row.get("label", ""), str):
            raise ConfigError(f"{where}.label: expected a string")
        for key, value in row.items():
            if isinstance(value, Mapping):
                raise ConfigError(f"{where}.{key}: expected a value (variants take no primitives)")


def _absolute(path: str) -> str:
    """An absolute local path, or the URI unchanged (so workers see the same place)."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _without(tree: Mapping[str, Any], dotted: str) -> dict[str, Any]:
    """A copy of a nested dict without the dotted key."""
    head, _, rest = dotted.partition(".")
    result = dict(tree)
    if rest and isinstance(result.get(head), Mapping):
        result[head] = _without(result[head], rest)
    elif not rest:
        result.pop(head, None)
    return result


def default_name(cfg: Config) -> str:
    """A readable, deterministic run name: dataset, model, variant and a digest of the settings
    that change the trained model (not those in OUTSIDE_HASH, so that changing them resumes)."""
    settings = cfg.to_dict()
    for dotted in OUTSIDE_HASH:
        settings = _without(settings, dotted)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.data.dataset}-{cfg.model.model}-{cfg.model.variant}-{digest}"


def validate(raw: Mapping[str, Any]) -> Config:
    """Check a nested dict of settings and return the complete Config (or raise ConfigError)."""
    cfg = _build(Config, raw, "")
    _check_together(cfg)
    data_dir = None if cfg.data.data_dir is None else _absolute(cfg.data.data_dir)
    lambda_skip = cfg.train.lambda_skip
    cfg = dataclasses.replace(
        cfg,
        storage_path=_absolute(cfg.storage_path),
        data=dataclasses.replace(cfg.data, data_dir=data_dir),
        train=dataclasses.replace(
            cfg.train,
            lambda_skip=PRESETS[cfg.model.model].lambda_skip
            if lambda_skip is None
            else lambda_skip,
        ),
    )
    return dataclasses.replace(cfg, name=cfg.name or default_name(cfg))


def validate_search(raw: Any) -> SearchSection:
    """Check an experiment's `search` section (or raise a ConfigError naming the key)."""
    search = _build(SearchSection, {} if raw is None else raw, "search.")
    _check_variants(search.variants)
    return search


def parse_override(text: str) -> tuple[str, Any]:
    """Split `key=value`; the value is read as YAML (`lr=3e-4`, `jac_reg=true`, `x=[1, 2]`)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optim.lr=3e-4")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `raw` with dotted keys (`optim.lr`) set to the given values."""
    result = copy.deepcopy(dict(raw))
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        node = result
        for i, part in enumerate(path):
            child = node.setdefault(part, {})
            if not isinstance(child, MutableMapping):
                raise ConfigError(f"{'.'.join(path[: i + 1])}: is a value, not a section")
            node = child
        node[last] = value
    return result


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, turning every failure into a one-line ConfigError."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{line}") from None
    return {} if raw is None else raw


def load(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()) -> Config:
    """Read a YAML file, apply `key=value` overrides (strings or a mapping) and validate."""
    raw = read_yaml(path)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    if not isinstance(overrides, Mapping):
        overrides = dict(parse_override(text) for text in overrides)
    return validate(apply_overrides(raw, overrides))
