"""The configuration schema: one YAML schema of dataclasses, validated before Ray starts.

A config file holds the sections `model`, `data`, `optim`, `train` and `scaling` plus the
top-level keys `name`, `storage_path`, `seed` and `label` (the name progress lines give the
run, its name where unset). Experiment files for Ray Tune add a `search`
section (variants, a space over Tune's primitives, trial scheduling), checked here too and
ignored by the trainer. Every error is a `ConfigError` with a one-line message that names the
key and what is allowed. Model defaults (variant, solver, the preset's tolerances and
lambda_skip) come from `raydeq.models`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import unicodedata
from collections.abc import Hashable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raydeq.models import (
    DEFAULT_SOLVER,
    DEFAULT_VARIANT,
    NODE_ADJOINTS,
    NODE_DYNAMICS,
    PRESETS,
    VARIANTS,
    resolve,
)
from raydeq.solvers import ADJOINTS, SOLVERS
from raydeq.solvers.solve import GRAPH
from raydeq.training.console import first_line
from raydeq.training.schema import ConfigError, build_section, listed, option
from raydeq.training.storage import absolute

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
SEARCHERS = ("random", "tpe", "nsga2")
MODES = ("max", "min")
PAPER_TABLES = (1, 2, 3, 4)  # the tables of section 4 that an experiment can reproduce
# Reported measures a search can minimise as its second objective, and those it can optimise
# as its metric (a name it is not reported under would leave every trial unranked).
COSTS = ("test_nfe", "nfe", "forward_time", "backward_time", "predict_time")
METRICS = (
    "test_accuracy",
    "test_top5_accuracy",
    "train_accuracy",
    "train_loss",
    "step_time",
    "images_per_second",
    *COSTS,
)
# The metrics a search maximises unless its mode says otherwise (the others are minimised).
MAXIMISED = ("test_accuracy", "test_top5_accuracy", "train_accuracy", "images_per_second")
DEQ_ONLY = ("jac_reg", "pretrain_steps", "solver_options", "adjoint_options", "compile")
ODE_ONLY = ("t1", "dynamics")
# Settings that do not change the trained model, so that changing them resumes the same run.
OUTSIDE_HASH = ("name", "label", "storage_path", "search", "scaling")
OUTSIDE_HASH += ("train.report_every", "train.checkpoint_every", "train.keep_checkpoints")
OUTSIDE_HASH += ("model.compile",)  # the same solves, compiled
OUTSIDE_HASH += ("train.eval_batches", "data.loader_workers", "data.pin_memory", "data.stage_to")
# Settings that change no trained weight either, which the digest reads at their defaults (so
# that runs at the defaults keep their names) and a resume does not compare: how many test
# images a worker predicts at once (lowering it is the way out of an evaluation that runs out
# of memory), how many non-finite steps stop a run (raising it is the way on after a stop),
# and whether missing files are downloaded (a run that downloaded them goes on without).
AT_DEFAULTS = ("data.eval_batch_size", "train.max_nonfinite_steps", "data.download")
STAGED_DATASETS = ("imagenet",)
# The datasets with a training augmentation (raydeq.training.vision), which data.augment switches.
AUGMENTED_DATASETS = ("mnist10k", "mnist", "cifar10", "imagenet")
# Settings that have an effect under some values of another key of their section alone:
# (that key, those values).
APPLIES_UNDER = {
    "optim.momentum": ("optimizer", ("sgd",)),
    "optim.eta_min": ("schedule", ("cosine",)),
    "optim.gamma": ("schedule", ("step",)),
    "optim.step_epochs": ("schedule", ("step",)),
    "data.data_dir": ("dataset", FILE_DATASETS),
    "data.image_size": ("dataset", ("imagenet",)),  # the one dataset it resizes
    "data.fake_samples": ("dataset", ("fake",)),
    "data.fake_shape": ("dataset", ("fake",)),
    "data.fake_classes": ("dataset", ("fake",)),
}
# Settings a refused resume names, of those that differ.
SHOWN_CHANGES = 3
# The key of a run's workers, which --workers-per-trial and search.workers_per_trial set.
WORKERS_KEY = "scaling.num_workers"
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# An option that the solver or adjoint does not take ("solver='vcab3' takes no option 'm'").
_UNKNOWN_OPTION = re.compile(r"(solver|adjoint)=\S+ takes no option ")
# A key, a colon and a value without the space between them that makes YAML read a pair.
_UNSPACED = re.compile(r"[A-Za-z_][\w.]*:(?!//)\S+")
# The longest name of an experiment: the lock files beside its folder (`.NAME.lock`,
# `.NAME.results.lock`) must fit in the 255 bytes of a file name that local filesystems take;
# a run's, whose folder has only the first.
NAME_MAX = 255 - len("..results.lock")
RUN_NAME_MAX = 255 - len("..lock")


@dataclass(frozen=True)
class ModelSection:
    """Arguments of `raydeq.models.build`; unset (null) options take the preset's and the
    layer's defaults (`raydeq.models.resolve`), which `validate` fills in."""

    model: str = option("mnist_dense", choices=MODELS)
    variant: str = option(DEFAULT_VARIANT, choices=VARIANTS)
    solver: str = option(DEFAULT_SOLVER, choices=SOLVERS)
    adjoint: str | None = option(None, choices=ADJOINTS + NODE_ADJOINTS)
    # 0 with reltol > 0 is a pure relative test, as the layers take it; both 0: resolve refuses
    abstol: float | None = option(None, ge=0)
    reltol: float | None = option(None, ge=0)
    max_steps: int | None = option(None, ge=1)
    jac_reg: bool | None = option(None)
    pretrain_steps: int | None = option(None, ge=0)
    t1: float | None = option(None, gt=0)
    dynamics: str | None = option(None, choices=NODE_DYNAMICS)
    solver_options: dict | None = option(None)  # e.g. Anderson's memory {m: 5}
    # the implicit adjoint's linear solver, e.g. GMRES's {rtol: 1e-2}; unset keys: the preset's
    adjoint_options: dict | None = option(None)
    # true: torch.compile f and the solver steps (CUDA graphs); graph: record each solve's
    # step as a CUDA graph and replay it (raydeq.solve's compile=)
    compile: bool | str | None = option(None, choices=(GRAPH,))


@dataclass(frozen=True)
class DataSection:
    """Which dataset to read, from where, and how to batch it."""

    dataset: str = option("digits", choices=DATASETS)
    data_dir: str | None = option(None)
    stage_to: str | None = option(None)  # node-local folder to copy data_dir's files to first
    download: bool = option(False)
    # the dataset's standard training augmentation (see vision.py); digits, svhn, fake: none
    augment: bool = option(True)
    batch_size: int = option(32, ge=1)  # global: split evenly over the workers
    eval_batch_size: int = option(256, ge=1)  # per worker
    loader_workers: int = option(0, ge=0)
    pin_memory: bool = option(False)
    image_size: int = option(224, ge=8)
    fake_samples: int = option(256, ge=1)
    fake_shape: tuple[int, ...] = option((1, 28, 28))
    fake_classes: int = option(10, ge=2)


@dataclass(frozen=True)
class OptimSection:
    """Optimizer, learning-rate schedule and gradient clipping."""

    optimizer: str = option("adam", choices=OPTIMIZERS)
    lr: float = option(1e-3, gt=0)
    weight_decay: float = option(0.0, ge=0)
    momentum: float = option(0.9, ge=0, le=1)
    nesterov: bool = option(False)
    schedule: str = option("cosine", choices=SCHEDULES)
    eta_min: float = option(0.0, ge=0)  # cosine: the learning rate it ends at
    milestones: tuple[int, ...] = option(())  # step: decay at these steps (else every step_epochs)
    step_epochs: int = option(30, ge=1)
    gamma: float = option(0.1, gt=0, le=1)
    grad_clip: float = option(0.0, ge=0)


@dataclass(frozen=True)
class TrainSection:
    """Length of training, loss weights, and the reporting and checkpoint cadence."""

    epochs: int = option(10, ge=1)
    max_steps: int = option(0, ge=0)
    lambda_skip: float | None = option(None, ge=0)  # None: the preset's (models.PRESETS)
    lambda_jac: float = option(0.0, ge=0)
    amp: str = option("off", choices=AMP)  # autocast dtype; fp16 adds a GradScaler
    report_every: int = option(20, ge=1)
    checkpoint_every: int = option(0, ge=0)
    keep_checkpoints: int = option(3, ge=1)
    eval_batches: int = option(0, ge=0)
    max_nonfinite_steps: int = option(5, ge=1)


@dataclass(frozen=True)
class ScalingSection:
    """How many Ray Train workers, on which device, and how many restarts after a failure."""

    num_workers: int = option(2, ge=1)
    device: str = option("auto", choices=DEVICES)
    cpus_per_worker: float = option(1.0, gt=0)
    max_failures: int = option(3, ge=-1)


@dataclass(frozen=True)
class SearchSection:
    """Ray Tune's side: variants (labelled rows of dotted settings), a space over Tune's
    primitives, the searcher (Tune's grid and random sampling, or Optuna's TPE or NSGA-II with
    conditional dimensions), the objectives, the scheduler, and the trials' size and concurrency.
    """

    variants: tuple[dict, ...] = option(())
    space: dict = option({})
    searcher: str = option("random", choices=SEARCHERS)
    conditional: tuple[dict, ...] = option(())  # [{when: {key: values}, space: {...}}]
    population_size: int = option(0, ge=0)  # nsga2's generation; 0: Optuna's default (50)
    metric: str = option("test_accuracy", choices=METRICS)
    mode: str | None = option(None, choices=MODES)  # None: the metric's (MAXIMISED)
    cost: str | None = option(None, choices=COSTS)  # minimised as a second objective
    num_samples: int = option(1, ge=1)
    scheduler: str = option("fifo", choices=SCHEDULERS)
    grace_period: int = option(1, ge=1)
    reduction_factor: int = option(2, ge=2)
    max_t: int = option(0, ge=0)
    max_concurrent_trials: int = option(0, ge=0)
    workers_per_trial: int = option(0, ge=0)
    paper: dict = option({})  # {table: N}: the paper's table this experiment reproduces

    def __post_init__(self) -> None:
        """Fill an unset mode with the metric's direction: max for MAXIMISED, else min."""
        if self.mode is None:
            object.__setattr__(self, "mode", "max" if self.metric in MAXIMISED else "min")


@dataclass(frozen=True)
class Config:
    """One training run; `name` defaults to a deterministic name derived from the settings."""

    name: str | None = option(None)
    storage_path: str = option("runs")
    # At most 2**32 - 1: the searchers' samplers (numpy) take no larger seed.
    seed: int = option(0, ge=0, le=2**32 - 1)
    label: str | None = option(None)  # in progress lines (a Tune trial's variant); name if unset
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
        return _given_options(self.model)


SECTIONS = tuple(
    f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)
)


def _check_together(cfg: Config) -> None:
    """Rules that involve more than one key; the first one broken is raised."""
    _check_data(cfg.data)
    _check_variant_options(cfg.model)
    _check_graphs(cfg)
    batch, workers = cfg.data.batch_size, cfg.scaling.num_workers
    if batch % workers:
        low = [d for d in range(1, math.isqrt(batch) + 1) if batch % d == 0]
        divisors = sorted({*low, *(batch // d for d in low)})
        raise ConfigError(
            f"data.batch_size: {batch} does not split evenly over {WORKERS_KEY}={workers}; "
            f"give a batch size that is a multiple of {workers}, or workers that divide {batch} "
            f"({', '.join(map(str, divisors))})",
            key="data.batch_size",
        )
    if cfg.train.lambda_jac > 0 and not cfg.model.jac_reg:
        raise ConfigError(
            "train.lambda_jac: needs model.jac_reg=true to have a Jacobian term, got "
            f"{cfg.train.lambda_jac:g} without it; set model.jac_reg=true or train.lambda_jac=0",
            key="train.lambda_jac",
        )
    _check_search(cfg.search)
    _check_milestones(cfg.optim)
    _check_applies(cfg)
    _check_optim(cfg.optim)
    if cfg.name is not None:
        check_folder_name("name", cfg.name, longest=RUN_NAME_MAX)


def workers_named(err: ConfigError, workers: int, given: str) -> ConfigError:
    """`err` naming `given`, the option the user wrote, where it names the workers that this
    option set (`scaling.num_workers=K`, which a command's option or a search's setting sets)."""
    return ConfigError(str(err).replace(f"{WORKERS_KEY}={workers}", given), key=err.key)


def _check_data(data: DataSection) -> None:
    """The dataset's folder, download and staging, and the fake dataset's image shape."""
    if data.dataset in FILE_DATASETS and data.data_dir is None:
        raise ConfigError(
            f"data.data_dir: required for dataset {data.dataset!r} (the folder with its files)",
            key="data.data_dir",
        )
    if data.dataset in EMBEDDED_DATASETS and data.data_dir is not None:
        raise ConfigError(
            f"data.data_dir: dataset {data.dataset!r} ships with raydeq and reads no folder; "
            "remove data_dir (or use dataset 'mnist' for MNIST files of your own)",
            key="data.data_dir",
        )
    if data.download and data.dataset not in DOWNLOADABLE:
        raise ConfigError(
            f"data.download: only {', '.join(DOWNLOADABLE)} can be downloaded, not dataset "
            f"{data.dataset!r}; set data.download=false",
            key="data.download",
        )
    if data.stage_to is not None and data.dataset not in STAGED_DATASETS:
        raise ConfigError(
            f"data.stage_to: dataset {data.dataset!r} is read in place; only "
            f"{', '.join(STAGED_DATASETS)} (many small files) is staged to local disk",
            key="data.stage_to",
        )
    if len(data.fake_shape) != 3:
        raise ConfigError(
            f"data.fake_shape: expected [channels, height, width], got {data.fake_shape}",
            key="data.fake_shape",
        )


def _check_variant_options(model: ModelSection) -> None:
    """Refuse a Neural ODE's option under a DEQ variant, and a DEQ's under neural_ode."""
    neural_ode = model.variant == "neural_ode"
    for key in ODE_ONLY if not neural_ode else DEQ_ONLY:
        if getattr(model, key) is not None:
            raise ConfigError(
                f"model.{key}: not an option of variant {model.variant!r}; "
                f"DEQ variants take {', '.join(DEQ_ONLY)}, neural_ode takes {', '.join(ODE_ONLY)}",
                key=f"model.{key}",
            )


def _check_graphs(cfg: Config) -> None:
    """Refuse CUDA graphs asked of scaling.device=cpu (model.compile=graph, GMRES's
    adjoint_options.graph): a CPU has none to record, so the solves would run eagerly, as
    without them (model.compile=true compiles kernels there)."""
    asked = {
        "model.compile": _shown(GRAPH) if cfg.model.compile == GRAPH else None,
        "model.adjoint_options.graph": "true"
        if (cfg.model.adjoint_options or {}).get("graph") is True
        else None,
    }
    for key, value in asked.items():
        if value is not None and cfg.scaling.device == "cpu":
            raise ConfigError(
                f"{key}: {value} records CUDA graphs, which scaling.device=cpu has none of, "
                "so the solves would run eagerly; set scaling.device to cuda or auto, or "
                f"remove {key}",
                key=key,
            )


def _check_milestones(optim: OptimSection) -> None:
    """A step schedule's milestones: increasing, and under optim.schedule=step alone."""
    if list(optim.milestones) != sorted(set(optim.milestones)):
        raise ConfigError(
            f"optim.milestones: expected increasing steps, got {list(optim.milestones)}",
            key="optim.milestones",
        )
    if optim.milestones and optim.schedule != "step":
        raise ConfigError(
            f"optim.milestones: {list(optim.milestones)} apply to optim.schedule=step only, not "
            f"{optim.schedule!r}; set optim.schedule=step or remove optim.milestones",
            key="optim.milestones",
        )


def _check_optim(optim: OptimSection) -> None:
    """The cosine schedule's floor and SGD's Nesterov momentum."""
    if optim.schedule == "cosine" and optim.eta_min > optim.lr:
        raise ConfigError(
            f"optim.eta_min: {optim.eta_min:g} is above optim.lr={optim.lr:g}", key="optim.eta_min"
        )
    if optim.nesterov and optim.optimizer != "sgd":
        raise ConfigError(
            f"optim.nesterov: applies to optimizer 'sgd' only, not {optim.optimizer!r}; "
            "set optim.nesterov=false or optim.optimizer=sgd",
            key="optim.nesterov",
        )
    if optim.nesterov and optim.momentum == 0:
        raise ConfigError(
            "optim.nesterov: needs optim.momentum > 0 (Nesterov momentum of 0)",
            key="optim.nesterov",
        )


def _check_applies(cfg: Config) -> None:
    """Refuse a setting of `APPLIES_UNDER` set off its default where it has no effect (a step
    schedule's eta_min, digits' image_size), which the run would ignore without a word; a
    default stays silent."""
    for dotted, (under, needed) in APPLIES_UNDER.items():
        name, key = dotted.split(".")
        section = getattr(cfg, name)
        value, actual = getattr(section, key), getattr(section, under)
        if value != getattr(type(section), key) and actual not in needed:
            allowed = f"{name}.{under}={listed(needed)}"
            raise ConfigError(
                f"{dotted}: {_shown(value)} applies to {allowed} only, not {actual!r}; set "
                f"{allowed}, or remove {dotted}",
                key=dotted,
            )
    optim = cfg.optim
    if optim.milestones and optim.step_epochs != OptimSection.step_epochs:
        raise ConfigError(
            f"optim.step_epochs: {optim.step_epochs} is not used with optim.milestones, which "
            "set the steps of decay; remove one of them",
            key="optim.step_epochs",
        )


def _shown(value: Any) -> str:
    """A setting's value as a config writes it: 1e-06, [3, 8, 8], 'data'."""
    if isinstance(value, float):
        return f"{value:g}"
    return repr(list(value) if isinstance(value, tuple) else value)


def notes(cfg: Config, total_steps: int, steps_per_epoch: int) -> list[str]:
    """Lines a run of `total_steps` steps says at its start about settings that are taken but
    do less than they may seem to: a Jacobian estimate of weight 0 is logged as jac_loss and
    penalises nothing, a step schedule whose first decay comes after the last update decays
    nothing, and an unrolled warm-up as long as the run leaves no step to train the solve."""
    said = []
    if cfg.model.jac_reg and cfg.train.lambda_jac == 0:
        said.append(
            "model.jac_reg=true with train.lambda_jac=0: jac_loss is estimated and logged, not "
            "penalised; set train.lambda_jac above 0 to penalise it"
        )
    optim = cfg.optim
    if optim.schedule == "step":
        key, given = "optim.step_epochs", optim.step_epochs
        first = optim.step_epochs * steps_per_epoch
        if optim.milestones:
            key, given, first = "optim.milestones", list(optim.milestones), optim.milestones[0]
        if first >= total_steps:
            said.append(
                f"optim.schedule=step with {key}={given}: the first decay comes after step "
                f"{first}, past the run's last update (step {total_steps}), so every step trains "
                f"at optim.lr={optim.lr:g}; lower {key} to decay within the run"
            )
    warm_up = cfg.model.pretrain_steps or 0
    if warm_up >= total_steps:
        said.append(
            f"model.pretrain_steps={warm_up} unrolls f in all of the run's {total_steps} steps, "
            "so none trains through the solve that the test evaluations run; lower "
            f"model.pretrain_steps below {total_steps}, or train longer"
        )
    return said


def check_folder_name(key: str, name: str, *, strict: bool = True, longest: int = NAME_MAX) -> None:
    """Raise a ConfigError unless `name` is one folder's name (a run's or an experiment's) of at
    most `longest` bytes: `strict`, of the letters --name and name= take; else any name of one
    folder inside the storage (an experiment file's `my exp` or `_x`, which named stored
    experiments before)."""
    unsafe = name in ("", ".", "..") or any(
        char in "/\\" or unicodedata.category(char) in ("Cc", "Cs") for char in name
    )
    if unsafe or (strict and not _NAME_PATTERN.fullmatch(name)):
        raise ConfigError(
            f"{key}: {name!r} is not a folder name; use letters, digits, '.', '_' and '-', "
            "starting with a letter or a digit",
            key=key,
        )
    size = len(name.encode())
    if size > longest:
        length = f"{len(name)} characters" + ("" if size == len(name) else f" ({size} bytes)")
        raise ConfigError(
            f"{key}: a name of {length} is too long; use at most {longest}, so that the lock "
            "files beside its folder fit in a file name (255 bytes)",
            key=key,
        )


def model_error(err: TypeError | ValueError) -> ConfigError:
    """A model option's error under the key a config writes it as: "m=0 must be ..." from the
    solver's options reads "model.solver_options.m=0 must be ...", an option the solver or
    adjoint does not take is keyed by the options that hold it (model.solver_options), not by
    model.solver, another "model: ..."."""
    message = first_line(err)
    unknown = _UNKNOWN_OPTION.match(message)
    if unknown:
        return ConfigError(f"model.{message}", key=f"model.{unknown.group(1)}_options")
    option = re.match(r"[A-Za-z_][\w.]*(?==)", message)
    if option:
        return ConfigError(f"model.{message}", key=f"model.{option.group()}")
    return ConfigError(f"model: {message}", key="model")


def _given_options(model: ModelSection) -> dict[str, Any]:
    """The options a model section sets, its unset (None) ones left out."""
    return {k: v for k, v in dataclasses.asdict(model).items() if v is not None}


def _resolve_model(model: ModelSection) -> ModelSection:
    """The model section with its unset options filled in by `raydeq.models.resolve`, the
    model options' one validator, so that a printed or stored config shows what is built."""
    options = _given_options(model)
    try:
        resolved = resolve(options)
    except (TypeError, ValueError) as err:  # the options' type or value
        raise model_error(err) from None
    unset = [f.name for f in dataclasses.fields(model) if getattr(model, f.name) is None]
    # Adjoint options given in part are completed by the preset's.
    filled = [*unset, "adjoint_options"]
    return dataclasses.replace(model, **{k: resolved[k] for k in filled if k in resolved})


def _preset_adjoint_options(model: ModelSection) -> dict | None:
    """The adjoint options a model takes where none are given (its preset's)."""
    options = _given_options(model)
    options.pop("adjoint_options", None)
    return resolve(options).get("adjoint_options")


def _check_search(search: SearchSection) -> None:
    """The variants' rows, the objectives and the paper reference of a search section."""
    _check_variants(search.variants)
    if search.population_size == 1:
        raise ConfigError(
            "search.population_size: must be 0 (Optuna's default, 50) or >= 2, got 1",
            key="search.population_size",
        )
    if search.population_size and search.searcher != "nsga2":
        raise ConfigError(
            f"search.population_size: {search.population_size} applies to "
            f"search.searcher='nsga2' only, not {search.searcher!r}; set search.searcher=nsga2, "
            "or remove search.population_size",
            key="search.population_size",
        )
    if search.cost is not None and search.cost == search.metric:
        others = ", ".join(c for c in COSTS if c != search.cost)
        raise ConfigError(
            f"search.cost: {search.cost!r} is search.metric too, so a searcher would rank by "
            f"one objective twice; choose another cost ({others}) or remove search.cost",
            key="search.cost",
        )
    unknown = set(search.paper) - {"table"}
    if unknown:
        key = f"search.paper.{sorted(unknown)[0]}"
        raise ConfigError(f"{key}: unknown key; allowed keys: table", key=key)
    table = search.paper.get("table", PAPER_TABLES[0])
    if isinstance(table, bool) or table not in PAPER_TABLES:
        raise ConfigError(
            f"search.paper.table: {table!r} is not a table of the paper; "
            f"choose one of {', '.join(map(str, PAPER_TABLES))}",
            key="search.paper.table",
        )


def _check_variants(variants: Sequence[Mapping[str, Any]]) -> None:
    """Each search variant is a non-empty row of dotted keys to plain values, label a string;
    rows with one label differ in their seed alone (the results average a label's trials as
    the seeds of one configuration)."""
    labelled: dict[str, int] = {}
    for index, row in enumerate(variants):
        where = f"search.variants[{index}]"
        if not row:
            raise ConfigError(f"{where}: expected a mapping of dotted keys to values", key=where)
        label = row.get("label", "")
        if not isinstance(label, str):
            raise ConfigError(f"{where}.label: expected a string", key=f"{where}.label")
        first = labelled.setdefault(label, index) if label else index
        settings = [{k: v for k, v in r.items() if k != "seed"} for r in (variants[first], row)]
        if settings[0] != settings[1]:
            raise ConfigError(
                f"{where}: sets other values than search.variants[{first}] under the same label "
                f"{label!r} (the results average a label's trials as seeds); give it its own label",
                key=where,
            )
        for key, value in row.items():
            if not isinstance(key, str):
                raise ConfigError(
                    f"{where}: key {key!r} is not a dotted setting (model.solver)", key=where
                )
            if isinstance(value, Mapping):
                raise ConfigError(
                    f"{where}.{key}: expected a value, got the mapping {value!r}; a variant "
                    "takes no primitives, and sets the keys of a section or of a mapping "
                    "setting one by one, dotted (model.solver_options.m: 3)",
                    key=f"{where}.{key}",
                )


def without(tree: Mapping[str, Any], dotted: str) -> dict[str, Any]:
    """A copy of a nested dict without the dotted key (sections left empty are dropped)."""
    head, _, rest = dotted.partition(".")
    result = dict(tree)
    if rest and isinstance(result.get(head), Mapping):
        result[head] = without(result[head], rest)
        if not result[head]:
            del result[head]
    elif not rest:
        result.pop(head, None)
    return result


def merge(base: Mapping[str, Any], sampled: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `sampled` laid over it; sections are merged key by key."""
    result = dict(base)
    for key, value in sampled.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


def leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The values of a nested dict by dotted key (empty sections have none); a key YAML read
    as other than text (`1:`, `2024-01-01:`) is written as text, for validation to name."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= leaves(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def default_name(cfg: Config, as_former: bool = True) -> str:
    """A readable, deterministic run name: dataset, model, variant and a digest of the settings
    that change the trained model (`trained_settings`, with `as_former`)."""
    return _named(cfg, trained_settings(cfg, as_former))


def _named(cfg: Config, settings: Mapping[str, Any]) -> str:
    """`cfg`'s run name with the digest of `settings`."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.data.dataset}-{cfg.model.model}-{cfg.model.variant}-{digest}"


# Presets' former lambda_skip defaults, oldest first, each with when it was the default.
FORMER_LAMBDA_SKIP = {"mnist_dense": ((1.0, "before 2026-12-07"), (0.1, "on 2026-12-07"))}
# The variants that train no skip loss, whatever train.lambda_skip says.
NO_SKIP_LOSS = ("vanilla", "neural_ode")


# The settings `check_given` checks, each with the one that decides whether it has an effect.
GIVEN_DECIDED_BY = {
    "train.lambda_skip": "model.variant",
    "data.augment": "data.dataset",
    "data.pin_memory": "scaling.device",
}


def check_given(given: Mapping[str, Any], cfg: Config) -> None:
    """Raise a ConfigError where `given`, dotted settings written for this run alone (a
    command's overrides, a search variant's row), sets one that `cfg`'s other settings leave
    without effect: train.lambda_skip under a variant that trains no skip loss, data.augment
    true for a dataset that has no augmentation, data.pin_memory true on scaling.device=cpu.
    A config file's, which its other variants, datasets and devices take, is carried
    silently."""
    weight = given.get("train.lambda_skip")
    if weight is not None and cfg.model.variant in NO_SKIP_LOSS:
        raise ConfigError(
            f"train.lambda_skip: {_shown(weight)} weighs the skip loss, which variant "
            f"{cfg.model.variant!r} does not have; set model.variant to skip or skip_reg, or "
            "remove train.lambda_skip",
            key="train.lambda_skip",
        )
    if given.get("data.augment") is True and cfg.data.dataset not in AUGMENTED_DATASETS:
        raise ConfigError(
            f"data.augment: true applies to data.dataset={listed(AUGMENTED_DATASETS)} only, "
            f"not {cfg.data.dataset!r}, which has no augmentation; remove data.augment",
            key="data.augment",
        )
    if given.get("data.pin_memory") is True and cfg.scaling.device == "cpu":
        raise ConfigError(
            "data.pin_memory: true pins batches for a GPU, which scaling.device=cpu trains on "
            "none of; set scaling.device to cuda or auto, or remove data.pin_memory",
            key="data.pin_memory",
        )


def trained_settings(cfg: Config, as_former: bool = True) -> dict[str, Any]:
    """The settings that change the trained model, as plain JSON values: not those in
    OUTSIDE_HASH, so that changing them resumes the same run. A variant without a skip loss
    takes its preset's lambda_skip as it read before the default first changed (trained the
    same; not where `as_former` is False), so that its runs keep their names and resume."""
    settings = cfg.to_dict()
    formers = FORMER_LAMBDA_SKIP.get(cfg.model.model)
    if formers and as_former and cfg.model.variant in NO_SKIP_LOSS:
        if cfg.train.lambda_skip == PRESETS[cfg.model.model].lambda_skip:
            settings["train"]["lambda_skip"] = formers[0][0]
    for key in ("solver_options", "dynamics"):  # unset, they leave older runs' names unchanged
        if getattr(cfg.model, key) is None:
            settings = without(settings, f"model.{key}")
    if cfg.model.adjoint_options in (None, _preset_adjoint_options(cfg.model)):  # likewise
        settings = without(settings, "model.adjoint_options")
    for dotted in OUTSIDE_HASH:
        settings = without(settings, dotted)
    settings = apply_overrides(settings, {dotted: DEFAULTS[dotted] for dotted in AT_DEFAULTS})
    return json.loads(json.dumps(settings))


def evaluation_settings(cfg: Config) -> dict[str, Any]:
    """The test batch settings of the run's evaluations, which `trained_settings` records at
    their defaults or not at all (they change no trained weight): a checkpoint records them
    apart, since the test NFE reported is per batch of data.eval_batch_size and the accuracy
    over train.eval_batches batches (0: all)."""
    return {
        "data": {"eval_batch_size": cfg.data.eval_batch_size},
        "train": {"eval_batches": cfg.train.eval_batches},
    }


def former_names(cfg: Config, preset_lambda_skip: bool = True) -> dict[str, tuple[str, str]]:
    """The names raydeq derived from `cfg`'s settings before a change of how or from what it
    names a run, each with what it took otherwise and the setting that resumes its run. Before
    2026-12-02 a name digested the model options as the config gave them, unset ones as null,
    not as `validate` fills them in from the preset and the layer: one name for each set of the
    filled-in options that the config may have left unset. And a run that leaves lambda_skip
    to its preset (`preset_lambda_skip`) was named at each former default (FORMER_LAMBDA_SKIP)
    while it was the default; one of a variant without a skip loss was named at the
    lambda_skip it gave, and while that was a later former default, at the first. The later
    former defaults came after 2026-12-02, so that their names count every option. Each name
    digested data.download as given, true or false (`_former_digests`)."""
    model = cfg.model
    filled = [
        f.name
        for f in dataclasses.fields(ModelSection)
        if f.default is None
        and f"model.{f.name}" not in OUTSIDE_HASH
        and getattr(model, f.name) is not None
        and getattr(model, f.name)
        == getattr(_resolve_model(dataclasses.replace(model, **{f.name: None})), f.name)
    ]
    bases = [(cfg, True, [], [], True)]
    formers = FORMER_LAMBDA_SKIP.get(model.model, ())
    weight = cfg.train.lambda_skip
    preset = weight == PRESETS[model.model].lambda_skip

    def at(value: float) -> Config:
        """cfg at train.lambda_skip `value`."""
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lambda_skip=value))

    for i, (value, when) in enumerate(formers):
        if model.variant not in NO_SKIP_LOSS:
            if preset and preset_lambda_skip:
                taken = f"at train.lambda_skip {value:g}, {model.model}'s default {when}"
                fix = [f"train.lambda_skip={value:g}"]
                bases.append((at(value), True, [taken], fix, i == 0))
        elif preset and i == 0:
            was = " or ".join(f"{v:g}" for v, _ in formers)
            taken = f"under the name raydeq gave it while {model.model}'s default was {was}, "
            taken += f"from its train.lambda_skip {weight:g}, which {model.variant} does not "
            taken += "train with"
            bases.append((cfg, False, [taken], [], True))
        elif i and weight == value:
            first = formers[0][0]
            taken = f"under the name raydeq gave it {when}, at train.lambda_skip {first:g} "
            taken += f"for its {weight:g}, then {model.model}'s default, which {model.variant} "
            taken += "does not train with"
            bases.append((at(first), True, [taken], [], False))
    found = []
    for base, as_former, taken, fix, early in bases:
        found.append((base, as_former, taken, fix, not fix))
        for count in range(1, len(filled) + 1) if early else ():
            for unset in itertools.combinations(filled, count):
                given = dataclasses.replace(
                    base, model=dataclasses.replace(model, **dict.fromkeys(unset))
                )
                options = ", ".join(f"model.{k}: {getattr(model, k)!r}" for k in unset)
                named = "under the name raydeq gave it before run names counted the model's "
                named += f"default options ({options})"
                found.append((given, as_former, [*taken, named], fix, True))
    return _former_digests(cfg, found)


def _former_digests(
    cfg: Config, found: Sequence[tuple[Config, bool, list[str], list[str], bool]]
) -> dict[str, tuple[str, str]]:
    """The names of the configs that `former_names` found (each with `as_former`, what it took
    otherwise, the settings that resume it and whether name= must join them), `cfg`'s own
    left out, each digested with data.download false and true: until 2026-12-07 a name
    digested it as given, though it changes no trained weight."""
    names: dict[str, tuple[str, str]] = {}
    for named, as_former, taken, fix, by_name in found:
        settings = trained_settings(named, as_former)
        for download in (False, True):
            name = _named(named, apply_overrides(settings, {"data.download": download}))
            said = [*taken, "with data.download=true in its name's digest"] if download else taken
            resume = [*fix, f"name={name}"] if by_name or download else fix
            names.setdefault(name, (", ".join(said), " ".join(resume)))
    names.pop(default_name(cfg), None)
    return names


def check_settings(folder: str, stored: Any, cfg: Config) -> None:
    """Raise a ConfigError naming the settings in which `stored`, the trained_settings of a
    checkpoint in the run folder `folder`, differ from `cfg`'s: resumed, the run would go on
    from that checkpoint under settings it was not trained with (an older checkpoint that
    records none, not a mapping, is not checked)."""
    if not isinstance(stored, dict):
        return
    there, here = (_in_effect(leaves(s)) for s in (stored, trained_settings(cfg)))
    # A checkpoint stored before a setting was read at its default (AT_DEFAULTS) holds its value.
    there |= {dotted: DEFAULTS[dotted] for dotted in AT_DEFAULTS if dotted in there}
    # The skip loss's weight trains nothing where neither side has a skip loss.
    weighed = {there.get("model.variant"), cfg.model.variant} - set(NO_SKIP_LOSS)
    changed = [
        k
        for k in dict.fromkeys([*there, *here])
        if there.get(k) != here.get(k) and (weighed or k != "train.lambda_skip")
    ]
    if changed:
        shown = [f"{k}: {there.get(k)!r} there, {here.get(k)!r} here" for k in changed]
        more = len(shown) - SHOWN_CHANGES
        changes = "; ".join(shown[:SHOWN_CHANGES]) + (f"; {more} more" if more > 0 else "")
        raise ConfigError(
            f"{folder}: holds a run trained with other settings ({changes}); run it with "
            "those to resume it, or give this run another name="
        )


def _deciding(dotted: str) -> str:
    """The dotted key whose value decides whether a setting of `APPLIES_UNDER` has an effect."""
    return f"{dotted.split('.')[0]}.{APPLIES_UNDER[dotted][0]}"


# Every setting's default, by dotted key, as plain JSON values.
DEFAULTS = leaves(json.loads(json.dumps(dataclasses.asdict(Config()))))
# The keys that decide whether a setting of `without_effect` has an effect.
DECIDED_BY = {dotted: (_deciding(dotted),) for dotted in APPLIES_UNDER}
DECIDED_BY["optim.step_epochs"] += ("optim.milestones",)


def without_effect(flat: Mapping[str, Any]) -> list[str]:
    """The settings that have no effect under the others of flat settings (`APPLIES_UNDER`, a
    step_epochs beside milestones), which a config now refuses set off their defaults."""
    idle = [
        dotted
        for dotted, (_, needed) in APPLIES_UNDER.items()
        if flat.get(_deciding(dotted), needed[0]) not in needed
    ]
    return idle + (["optim.step_epochs"] if flat.get("optim.milestones") else [])


def _in_effect(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Flat settings with each one `without_effect` at its default: a checkpoint stored when
    such a setting was taken (momentum 0.95 under Adam) was trained as one at the default,
    which now refuses it."""
    return {**flat, **{key: DEFAULTS[key] for key in without_effect(flat) if key in flat}}


def validate(raw: Mapping[str, Any]) -> Config:
    """Check a nested dict of settings and return the complete Config (or raise ConfigError)."""
    cfg = build_section(Config, raw, "")
    _check_together(cfg)
    data_dir = None if cfg.data.data_dir is None else absolute(cfg.data.data_dir)
    stage_to = None if cfg.data.stage_to is None else absolute(cfg.data.stage_to)
    lambda_skip = cfg.train.lambda_skip
    cfg = dataclasses.replace(
        cfg,
        storage_path=absolute(cfg.storage_path),
        model=_resolve_model(cfg.model),
        data=dataclasses.replace(cfg.data, data_dir=data_dir, stage_to=stage_to),
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
    search = build_section(SearchSection, {} if raw is None else raw, "search.")
    _check_search(search)
    return search


def parse_override(text: str) -> tuple[str, Any]:
    """Split `key=value`; the value is read as YAML (`lr=3e-4`, `jac_reg=true`, `x=[1, 2]`)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value, e.g. optim.lr=3e-4")
    try:
        parsed = load_yaml(value)
    except yaml.YAMLError:
        parsed = value
    unspaced = _unspaced_key(parsed)
    if unspaced is not None:
        raise ConfigError(
            f"override {text!r}: YAML reads {unspaced!r} as a key without a value; put a space "
            f"after the colon: {{{unspaced.replace(':', ': ', 1)}}}"
        )
    return key.strip(), parsed


def _unspaced_key(value: Any) -> str | None:
    """A key of a mapping in `value` that YAML read from `key:value` written without a space
    after the colon (`{lr:0.1}` is the key 'lr:0.1' with no value), or None."""
    if not isinstance(value, Mapping):
        return None
    for key, given in value.items():
        if given is None and isinstance(key, str) and _UNSPACED.fullmatch(key):
            return key
        found = _unspaced_key(given)
        if found is not None:
            return found
    return None


def _section_keys(key: str, value: Any) -> dict[str, Any]:
    """An override by dotted key: a section's mapping (`optim={lr: 0.2}`) sets its keys, where
    setting the section itself would drop every other key the file gives it; an empty one
    (`optim=`), which would drop them all, is refused."""
    if key in SECTIONS and value is None:
        raise ConfigError(
            f"override {key}: an empty value sets no key of section {key}; set its keys "
            f"({key}.KEY=VALUE or {key}={{KEY: VALUE}})"
        )
    if key in SECTIONS and isinstance(value, Mapping):
        return {f"{key}.{name}": given for name, given in value.items()}
    return {key: value}


def parse_overrides(texts: Sequence[str]) -> dict[str, Any]:
    """`key=value` overrides as a mapping; a key given twice is an error, not a silent choice,
    and so is a key given beside a mapping that holds it (`model.solver_options={m: 3}` and
    `model.solver_options.m=4`), which replaces it whole: the one given last would win."""
    overrides: dict[str, Any] = {}
    for text in texts:
        for key, value in _section_keys(*parse_override(text)).items():
            if key in overrides:
                raise ConfigError(
                    f"override {key}: given twice ({overrides[key]!r}, then {value!r}); keep one"
                )
            for given in overrides:
                outer, inner = sorted((given, key), key=len)
                if inner.startswith(f"{outer}."):
                    raise ConfigError(
                        f"override {inner}: given beside {outer}, which replaces all of it "
                        f"({overrides[given]!r}, then {value!r}); give {inner} within "
                        f"{outer}'s value, or leave one out"
                    )
            overrides[key] = value
    return overrides


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `raw` with dotted keys (`optim.lr`) set to the given values."""
    result = copy.deepcopy(dict(raw))
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        node = result
        for i, part in enumerate(path):
            if node.get(part) is None:  # a section left empty in YAML (`model:`) is null
                node[part] = {}
            child = node[part]
            if not isinstance(child, MutableMapping):
                key = ".".join(path[: i + 1])
                raise ConfigError(f"{key}: is a value, not a section", key=key)
            node = child
        node[last] = value
    return result


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, which reads 1e-3 as a string (YAML 1.1 wants 1.0e-3), reading it
    as the number YAML 1.2 and a user mean; a typed key converted it, but not a value inside a
    mapping setting such as model.solver_options. A key given twice in one mapping is an
    error, where PyYAML keeps the last (a second `optim:` section dropped the first). A key
    written `on`, `yes` or `true` is that text, where YAML 1.1 reads a boolean (`optim.True`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """The mapping of `node`, refusing a key written twice in it (merge keys aside)."""
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.tag == "tag:yaml.org,2002:bool":
                key_node.tag = "tag:yaml.org,2002:str"
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # PyYAML's own error names it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (first at line {seen[key].line + 1}); keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _construct_number(loader: _Loader, node: yaml.ScalarNode) -> Any:
    """An int or float scalar as YAML 1.2 reads it: 010 is ten (YAML 1.1's octal: eight), and
    1:30 text (YAML 1.1's base 60: ninety), as a config means them."""
    text = loader.construct_scalar(node)
    if ":" in text:
        return text
    if re.fullmatch(r"[-+]?0[0-9_]+", text):
        return int(text.replace("_", ""), 10)
    return yaml.SafeLoader.yaml_constructors[node.tag](loader, node)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_number)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_number)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


# The most keys and values a YAML document's aliases may expand it to, past those it writes: a
# config holds hundreds, but aliases of aliases multiply (nine lists of nine aliases, eight
# deep, are 9^9 values), which hung a config's validation expanding them.
MAX_YAML_VALUES = 100_000


def _expanded_values(node: yaml.Node, counted: dict[int, int], written: set[int]) -> int:
    """How many keys and values `node` holds with its aliases expanded, itself included, with
    every node it holds added to `written`; a ComposerError where it holds itself (`&a [*a]`),
    which no expansion ends."""
    if isinstance(node, yaml.ScalarNode):
        written.add(id(node))
        return 1
    if counted.get(id(node)) == 0:
        raise yaml.composer.ComposerError(
            None,
            None,
            "an alias within the value it names (&a [*a]) repeats it endlessly",
            node.start_mark,
        )
    if id(node) not in counted:
        written.add(id(node))
        counted[id(node)] = 0  # being counted
        children = (
            [c for pair in node.value for c in pair]
            if isinstance(node, yaml.MappingNode)
            else node.value
        )
        counted[id(node)] = 1 + sum(_expanded_values(child, counted, written) for child in children)
    return counted[id(node)]


def load_yaml(text: str, reader: type[yaml.SafeLoader] = _Loader) -> Any:
    """A YAML document as raydeq reads configs and overrides (numbers such as 1e-3 are floats),
    or as `reader` reads it; a ComposerError where its aliases expand it by more than
    MAX_YAML_VALUES keys and values, or without end, or where it nests past Python's recursion
    limit."""
    loader = reader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        written: set[int] = set()
        values = _expanded_values(node, {}, written)
        if values > len(written) + MAX_YAML_VALUES:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"its aliases expand its {len(written)} keys and values to {values}, past "
                f"the {MAX_YAML_VALUES} more that aliases may add; write the repeated values "
                "out",
                node.start_mark,
            )
        return loader.construct_document(node)
    except RecursionError:  # PyYAML reads a nested value by recursion: 600 levels of [ exceed it
        raise yaml.composer.ComposerError(
            None, None, "its values are nested deeper than the reader's recursion limit", None
        ) from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> Any:
    """Read a YAML config file (its top-level value, {} for an empty file; the callers check
    that it is a mapping), turning every failure into a one-line ConfigError."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    raw = parse_yaml(path, data)
    return {} if raw is None else raw


def parse_yaml(path: str | Path, data: bytes, reader: type[yaml.SafeLoader] = _Loader) -> Any:
    """The YAML document `data`, read from the file `path`, as `load_yaml` reads it (None for
    an empty one), or a one-line ConfigError naming the file and why it is no YAML text."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not a YAML text file (byte {err.object[err.start]:#04x} at offset "
            f"{err.start} is not UTF-8)"
        ) from None
    try:
        return load_yaml(text, reader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None)
        raise ConfigError(
            f"{path}: invalid YAML{line}" + (f": {problem}" if problem else "") + _tab_hint(problem)
        ) from None


def _tab_hint(problem: str | None) -> str:
    """What to write instead where PyYAML's problem is a tab, which it names without saying that
    YAML indents with spaces only."""
    return "; indent with spaces (YAML takes no tabs there)" if "'\\t'" in (problem or "") else ""


def in_file(err: ConfigError, path: str | Path, overrides: Mapping[str, Any]) -> ConfigError:
    """`err` with the file `path` named after it, unless an override set its key (or one in
    it: a rule's `search.conditional[0].space.model.solver_options.m`): a user of several
    files sees which one holds the bad value."""
    # An index names an entry of the list an override sets whole (search.variants[0]).
    key = None if err.key is None else re.sub(r"\[\d+\]", "", err.key)
    if key is not None and any(
        f".{k}." in f".{key}." or k.startswith(f"{key}.") for k in overrides
    ):
        return err
    return ConfigError(f"{err} (in {path})")


def given_settings(
    path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> dict[str, Any]:
    """The settings of a YAML file with `key=value` overrides (strings or a mapping) applied,
    before `validate` fills in what they leave unset."""
    raw = read_yaml(path)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    try:
        return apply_overrides(raw, overrides)
    except ConfigError as err:
        raise in_file(err, path, overrides) from None


def load(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()) -> Config:
    """Read a YAML file, apply `key=value` overrides (strings or a mapping) and validate."""
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    settings = given_settings(path, overrides)
    try:
        return validate(settings)
    except ConfigError as err:
        raise in_file(err, path, overrides) from None
