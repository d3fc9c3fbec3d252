"""Ray Tune experiments: `python -m raydeq.tune EXPERIMENT [options] [key=value ...]`.

EXPERIMENT names `tune_configs/EXPERIMENT.yaml` (or is the path of such a file): a training
config (`raydeq.config`) plus a `search` section. Each trial is a function trainable that fits a
Ray Train `TorchTrainer` (K DDP workers, one trial can span GPUs and nodes) and forwards its
reports to Tune; ASHA can stop poor trials early. Everything lands in `storage/name`: Tune's
trial folders (result.json and TensorBoard events), each trial's Train run in `<trial>/train`
(checkpoints and per-step TensorBoard scalars), and at the end `results.parquet`, `results.md`
and the plots. `--resume` continues an interrupted experiment: finished trials are kept,
running ones continue from their last Train checkpoints and pending ones start.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import math
import os
import re
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import ray
import ray.train
import ray.util.state
import yaml
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.variant_generator import generate_variants

from raydeq import data, models, train
from raydeq.config import Config, ConfigError, apply_overrides, parse_override, read_yaml, validate

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402  (the backend is chosen first)

CONFIG_DIR = Path(__file__).resolve().parent / "tune_configs"
SETTINGS_FILE = "experiment.yaml"
RESULT_FILE = "result.json"
ARCHIVE_PREFIX = "result-before-resume-"
SYNC_PERIOD_S = 60
TRAIN_RUN = "train"
TRIAL_CPU = 0.01
EXIT_BAD_INPUT = 2
UNBOUNDED_STEPS = 2**31
PRIMITIVES = (
    "grid_search",
    "choice",
    "uniform",
    "quniform",
    "loguniform",
    "qloguniform",
    "randn",
    "qrandn",
    "randint",
    "qrandint",
    "lograndint",
    "qlograndint",
)
VARIANT = "variant"
LABEL = "label"
SCHEDULERS = ("fifo", "asha")
MODES = ("max", "min")
PLOTS = {
    "test_accuracy": "test accuracy",
    "forward_time": "forward time per batch (s)",
    "backward_time": "backward time per batch (s)",
}
TABLE = (
    ("test_accuracy", "Test Accuracy (%)", 100.0),
    ("train_time", "Training Time (s/batch)", 1.0),
    ("backward_time", "Backward Time (s/batch)", 1.0),
    ("predict_time", "Prediction Time (s/batch)", 1.0),
    ("test_nfe", "NFE", 1.0),
)


# Experiment files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Search:
    """The `search` section: variants, a space over Tune's primitives, and trial scheduling."""

    variants: tuple[dict, ...] = ()
    space: dict = field(default_factory=dict)
    metric: str = "test_accuracy"
    mode: str = "max"
    num_samples: int = 1
    scheduler: str = "fifo"
    grace_period: int = 1
    reduction_factor: int = 2
    max_t: int = 0
    max_concurrent_trials: int = 0
    workers_per_trial: int = 0

    def param_space(self) -> dict[str, Any]:
        """Tune's param_space: the space, and a grid over the variants under VARIANT."""
        space = domain("search.space", self.space)
        return space | ({VARIANT: tune.grid_search(list(self.variants))} if self.variants else {})


_SEARCH_RULES: dict[str, tuple[type, Any]] = {
    "variants": (list, None),
    "space": (dict, None),
    "metric": (str, None),
    "mode": (str, MODES),
    "num_samples": (int, 1),
    "scheduler": (str, SCHEDULERS),
    "grace_period": (int, 1),
    "reduction_factor": (int, 2),
    "max_t": (int, 0),
    "max_concurrent_trials": (int, 0),
    "workers_per_trial": (int, 0),
}


@dataclass(frozen=True)
class Experiment:
    """A named experiment: the base training config and its search (`raw`: both as written)."""

    name: str
    base: dict
    search: Search
    raw: dict

    def trial_config(self, sampled: Mapping[str, Any]) -> Config:
        """The validated training config of one trial: base, then sampled values, then variant."""
        row = {k: v for k, v in sampled.get(VARIANT, {}).items() if k != LABEL}
        settings = merge(self.base, {k: v for k, v in sampled.items() if k != VARIANT})
        return validate(apply_overrides(settings, row))


def _check_search(raw: Any) -> Search:
    """The `search` section as a Search, or a one-line ConfigError naming the bad key."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"search: expected a mapping of keys to values, got {raw!r}")
    for key, value in raw.items():
        if key not in _SEARCH_RULES:
            allowed = ", ".join(_SEARCH_RULES)
            raise ConfigError(f"search.{key}: unknown key; allowed keys in search: {allowed}")
        kind, rule = _SEARCH_RULES[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"search.{key}: expected {kind.__name__}, got {value!r}")
        if isinstance(rule, tuple) and value not in rule:
            raise ConfigError(f"search.{key}: {value!r} is not allowed; choose one of {rule}")
        if isinstance(rule, int) and value < rule:
            raise ConfigError(f"search.{key}: must be >= {rule}, got {value!r}")
    for index, row in enumerate(raw.get("variants", [])):
        where = f"search.variants[{index}]"
        if not isinstance(row, Mapping) or not row:
            raise ConfigError(f"{where}: expected a mapping of dotted keys to values")
        if not isinstance(row.get(LABEL, ""), str):
            raise ConfigError(f"{where}.{LABEL}: expected a string")
        for key, value in row.items():
            if isinstance(value, Mapping):
                raise ConfigError(f"{where}.{key}: expected a value (variants take no primitives)")
    return Search(**{**raw, "variants": tuple(raw.get("variants", []))})


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` as a string; numeric arguments of a primitive become floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def domain(key: str, spec: Any) -> Any:
    """A Ray Tune search domain from its YAML form `{primitive: arguments}`; other values as is.

    Mappings that are no primitive are sections and are converted key by key. Tune's
    `{"eval": ...}` form would run code from the file, so it is refused.
    """
    if not isinstance(spec, Mapping):
        return spec
    if "eval" in spec:
        raise ConfigError(f"{key}.eval: code is not run from experiment files; use {PRIMITIVES}")
    if len(spec) != 1 or next(iter(spec)) not in PRIMITIVES:
        return {name: domain(f"{key}.{name}", value) for name, value in spec.items()}
    ((primitive, args),) = spec.items()
    if primitive in ("grid_search", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{key}.{primitive}: expected a non-empty list of values")
        return getattr(tune, primitive)(args)
    try:
        if isinstance(args, Mapping):
            return getattr(tune, primitive)(**{k: _number(v) for k, v in args.items()})
        return getattr(tune, primitive)(*map(_number, args if isinstance(args, list) else [args]))
    except (TypeError, ValueError, AssertionError) as err:
        raise ConfigError(f"{key}.{primitive}: bad arguments {args!r} ({err})") from None


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
    """The values of a nested dict by dotted key (empty sections have none)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= leaves(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def _without(tree: Mapping[str, Any], dotted: str) -> dict[str, Any]:
    """A copy of a nested dict without the dotted key (empty sections are dropped)."""
    head, _, rest = dotted.partition(".")
    result = dict(tree)
    if head in result and rest and isinstance(result[head], Mapping):
        result[head] = _without(result[head], rest)
        if not result[head]:
            del result[head]
    elif not rest:
        result.pop(head, None)
    return result


def locate(experiment: str) -> Path:
    """The YAML file of an experiment name (`tune_configs/NAME.yaml`) or path."""
    for candidate in (Path(experiment), Path("tune_configs") / f"{experiment}.yaml"):
        if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
            return candidate
    packaged = CONFIG_DIR / f"{experiment}.yaml"
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"{experiment}: no such experiment file; experiments: {known}")


def _fix(search: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The search section with the overridden keys fixed.

    An override of a key that the space varies removes it from the space; an override of a key
    that variants set keeps only the variants with that value.
    """
    space = search.get("space") or {}
    variants = search.get("variants") or []
    for dotted, value in overrides.items():
        space = _without(space, dotted)
        variants = [row for row in variants if row.get(dotted, value) == value]
        if search.get("variants") and not variants:
            raise ConfigError(f"{dotted}={value!r}: no variant of search.variants has that value")
    return {**search, "space": space} | ({"variants": variants} if variants else {})


def from_dict(
    name: str, raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> Experiment:
    """An Experiment from a parsed YAML dict and dotted `key=value` overrides (see `_fix`).

    `search.workers_per_trial` sets the trials' `scaling.num_workers`; overrides come last.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}: expected a mapping of keys to values at the top level")
    overrides = overrides or {}
    search = raw.get("search")
    workers = search.get("workers_per_trial") if isinstance(search, Mapping) else None
    if isinstance(workers, int) and workers > 0:
        raw = apply_overrides(raw, {"scaling.num_workers": workers})
    raw = apply_overrides(raw, overrides)
    base = {key: value for key, value in raw.items() if key != "search"}
    search = raw.get("search") or {}
    if isinstance(search, Mapping):
        search = _fix(search, overrides)
    experiment = Experiment(name, base, _check_search(search), base | {"search": search})
    experiment.search.param_space()
    experiment.trial_config({})
    return experiment


def load(experiment: str, overrides: Sequence[str] = ()) -> Experiment:
    """Read `tune_configs/EXPERIMENT.yaml` (or a path), apply overrides, check the base."""
    path = locate(experiment)
    parsed = dict(parse_override(text) for text in overrides)
    return from_dict(path.stem, read_yaml(path), parsed)


def expand(experiment: Experiment, num_samples: int | None = None) -> list[dict[str, Any]]:
    """The sampled values of every trial Tune would start (grid x samples), without running.

    Random values are drawn once per sample and shared by that sample's grid points, as the
    search algorithm does (`constant_grid_search`), so seeds repeat one configuration.
    """
    samples = num_samples or experiment.search.num_samples
    return [
        resolved
        for _ in range(samples)
        for _, resolved in generate_variants(
            experiment.search.param_space(), constant_grid_search=True
        )
    ]


def preflight(experiment: Experiment, num_samples: int | None = None) -> None:
    """Validate every trial's config, its data folder and its model before Ray starts."""
    checked: set[str] = set()
    for sampled in expand(experiment, num_samples):
        cfg = experiment.trial_config(sampled)
        key = repr((cfg.model, cfg.data))
        if key not in checked:
            data.check_files(cfg.data)
            train.check_model(cfg)
            checked.add(key)


# Trials ----------------------------------------------------------------------------------------


def describe(sampled: Mapping[str, Any], leave_out: tuple[str, ...] = ()) -> str:
    """The sampled values in words: the variant's label (or its settings), then the rest."""
    row = dict(sampled.get(VARIANT, {}))
    words = [row.pop(LABEL)] if LABEL in row else []
    values = ({} if words else row) | leaves({k: v for k, v in sampled.items() if k != VARIANT})
    words += [
        f"{key.rsplit('.', 1)[-1]}={_short(value)}"
        for key, value in values.items()
        if key not in leave_out
    ]
    return ", ".join(words)


def trial_name(trial: Any) -> str:
    """A readable, deterministic trial (and folder) name: its id and its sampled values."""
    words = describe(trial.config).replace(", ", "_").replace(" ", "-")
    return re.sub(r"[^A-Za-z0-9._=-]", "", f"{trial.trial_id}_{words}")[:100]


def _short(value: Any) -> str:
    """A value as it appears in names and table rows."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def scaling(cfg: Config, gpus: float) -> ray.train.ScalingConfig:
    """A trial's workers; the trial's own driver reserve comes out of their CPU share."""
    workers = cfg.scaling.num_workers
    cpus = max(cfg.scaling.cpus_per_worker - TRIAL_CPU / workers, TRIAL_CPU)
    resources = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
    return ray.train.ScalingConfig(
        num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources
    )


def run_trial(sampled: dict[str, Any], *, experiment: Experiment, path: str, gpus: float) -> None:
    """One trial: fit (or resume) its TorchTrainer in `<trial>/train`, reporting to Tune."""
    trial_dir = f"{path.rstrip('/')}/{tune.get_context().get_trial_name()}"
    settings = merge(sampled, {"name": TRAIN_RUN, "storage_path": trial_dir})
    cfg = experiment.trial_config(settings)
    trainer = TorchTrainer(
        train.train_loop,
        train_loop_config=cfg.to_dict(),
        scaling_config=scaling(cfg, gpus),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


# Cluster ---------------------------------------------------------------------------------------


def default_gpus(cfg: Config) -> float:
    """One GPU per worker when the config asks for CUDA or the cluster has GPUs, else none."""
    if cfg.scaling.device == "cpu":
        return 0.0
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    return 1.0 if cfg.scaling.device == "cuda" or has_gpus else 0.0


def concurrency(cfg: Config, gpus: float) -> int:
    """How many trials the cluster's CPUs and GPUs hold at once (at least one)."""
    workers = cfg.scaling.num_workers
    total = ray.cluster_resources()
    fits = total.get("CPU", 0) // (workers * cfg.scaling.cpus_per_worker)
    if gpus:
        fits = min(fits, total.get("GPU", 0) // (workers * gpus))
    if fits < 1:
        print(
            f"note: one trial needs {workers} workers x {cfg.scaling.cpus_per_worker:g} CPU"
            f"{f' + {gpus:g} GPU' if gpus else ''}, more than the cluster has now; trials wait "
            "for nodes (the autoscaler adds them)",
            flush=True,
        )
    return max(int(fits), 1)


def connect() -> None:
    """Join Ray as `raydeq.train` does, handing a given RAY_ADDRESS on to every trial process.

    Ray Train's placement-group cleaner finds the state API by RAY_ADDRESS; where several Ray
    clusters run on one machine it cannot guess, and a trial that ASHA stops keeps its workers'
    resources for good.
    """
    address = os.environ.get("RAY_ADDRESS", "")
    if address not in ("", "auto", "local") and not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"RAY_ADDRESS": address}})
    train.connect()


def check_dashboard() -> None:
    """Raise a ConfigError when the state API is down: ASHA-stopped trials would hang then."""
    try:
        ray.util.state.list_nodes(limit=1, timeout=30)
    except Exception as err:  # whatever the failure, the API is unusable
        raise ConfigError(
            "scheduler asha: the Ray dashboard (state API) is not reachable, so workers of "
            f"stopped trials would never be released ({type(err).__name__}); start Ray with "
            "the dashboard (ray[default]) or use --scheduler fifo"
        ) from None


# Storage ---------------------------------------------------------------------------------------


def _filesystem(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem and the path within it for a local path or a URI."""
    return pyarrow.fs.FileSystem.from_uri(path if "://" in path else os.path.abspath(path))


def exists(path: str) -> bool:
    """True when a file or folder is at `path`."""
    filesystem, inner = _filesystem(path)
    return filesystem.get_file_info(inner).type != pyarrow.fs.FileType.NotFound


def write_bytes(path: str, payload: bytes) -> None:
    """Write a file at a local path or URI."""
    filesystem, inner = _filesystem(path)
    filesystem.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(inner) as stream:
        stream.write(payload)


def read_text(path: str) -> str:
    """Read a text file at a local path or URI."""
    filesystem, inner = _filesystem(path)
    with filesystem.open_input_stream(inner) as stream:
        return stream.readall().decode()


def save_settings(path: str, experiment: Experiment, options: dict) -> None:
    """Store what the experiment runs with, so `--resume` and `--report` use the same."""
    settings = {"experiment": experiment.raw, "options": options}
    write_bytes(f"{path}/{SETTINGS_FILE}", yaml.safe_dump(settings, sort_keys=False).encode())


def load_settings(path: str) -> tuple[Experiment, dict]:
    """The experiment and run options stored in an experiment folder."""
    settings = yaml.safe_load(read_text(f"{path}/{SETTINGS_FILE}"))
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return from_dict(name, settings["experiment"]), settings["options"]


def _trial_folders(path: str) -> list[str]:
    """The trial folders of an experiment."""
    filesystem, inner = _filesystem(path)
    selector = pyarrow.fs.FileSelector(inner)
    infos = filesystem.get_file_info(selector)
    return [i.path for i in infos if i.type == pyarrow.fs.FileType.Directory]


def archive_results(path: str) -> None:
    """Keep each trial's reports before a resume: in a new Ray session Tune starts them anew."""
    filesystem, _ = _filesystem(path)
    for folder in _trial_folders(path):
        current = filesystem.get_file_info(f"{folder}/{RESULT_FILE}")
        if current.type == pyarrow.fs.FileType.File and current.size:
            kept = len(_archived(filesystem, folder))
            filesystem.copy_file(current.path, f"{folder}/{ARCHIVE_PREFIX}{kept}.json")


def _archived(filesystem: pyarrow.fs.FileSystem, folder: str) -> list[str]:
    """A trial folder's archived result files, oldest first."""
    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(folder))
    names = [i.path for i in infos if i.base_name.startswith(ARCHIVE_PREFIX)]
    return sorted(names, key=lambda p: int(p.rsplit("-", 1)[-1].removesuffix(".json")))


# Results ---------------------------------------------------------------------------------------


def _last(frame: pd.DataFrame, column: str) -> float:
    """The last non-missing value of a column, or NaN."""
    if column not in frame:
        return math.nan
    values = frame[column].dropna()
    return float(values.iloc[-1]) if len(values) else math.nan


def _mean(frame: pd.DataFrame, column: str) -> float:
    """The mean of a column's values, or NaN."""
    if column not in frame or frame[column].dropna().empty:
        return math.nan
    return float(frame[column].dropna().mean())


@functools.cache
def parameter_count(model_section: str) -> int:
    """Trainable parameters of the model that a (YAML-dumped) model section builds."""
    options = yaml.safe_load(model_section)
    model = models.build({k: v for k, v in options.items() if v is not None})
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def history(trial_path: str, frame: pd.DataFrame) -> pd.DataFrame:
    """A trial's reports in step order, archived ones first; the latest report of a step wins."""
    filesystem, folder = _filesystem(trial_path)
    parts = []
    for archived in _archived(filesystem, folder):
        with filesystem.open_input_stream(archived) as stream:
            parts.append(pd.read_json(io.BytesIO(stream.readall()), lines=True))
    frame = pd.concat([*parts, frame], ignore_index=True)
    if frame.empty or "step" not in frame:
        return frame
    return frame.dropna(subset=["step"]).drop_duplicates("step", keep="last").sort_values("step")


def trial_row(experiment: Experiment, trial: Any, frame: pd.DataFrame) -> dict[str, Any]:
    """One row of results.parquet: the trial, its group, its config and its final metrics."""
    cfg = experiment.trial_config(trial.config)
    model_section = yaml.safe_dump(dataclasses.asdict(cfg.model))
    step = int(_last(frame, "step")) if "step" in frame and len(frame) else 0
    epoch = _last(frame, "epoch")
    row = {
        "trial": trial_name(trial),
        "status": trial.status,
        "group": describe(trial.config, leave_out=("seed",)) or "all",
        "seed": cfg.seed,
        "completed": step >= (cfg.train.max_steps or math.inf) or epoch >= cfg.train.epochs,
        "step": step,
        "epoch": epoch,
        "test_accuracy": _last(frame, "test_accuracy"),
        "test_nfe": _last(frame, "test_nfe"),
        "predict_time": _last(frame, "predict_time"),
        "train_time": _mean(frame, "forward_time") + _mean(frame, "backward_time"),
        "forward_time": _mean(frame, "forward_time"),
        "backward_time": _mean(frame, "backward_time"),
        "nfe": _mean(frame, "nfe"),
        "backward_nvjp": _mean(frame, "backward_nvjp"),
        "train_loss": _last(frame, "train_loss"),
        "train_accuracy": _last(frame, "train_accuracy"),
        "parameters": parameter_count(model_section),
    }
    return row | {f"config.{k}": v for k, v in leaves(cfg.to_dict()).items()}


def _column(values: list[Any]) -> pa.Array:
    """A pyarrow column; mixed or list values are stored as their text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values])


def results_table(rows: list[dict[str, Any]]) -> pa.Table:
    """The rows as a pyarrow table (one row per trial)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return pa.table({c: _column([row.get(c) for row in rows]) for c in columns})


def _cell(values: list[float], scale: float) -> str:
    """`mean +- std` of the finite values (the mean alone for one value)."""
    finite = [v * scale for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "-"
    digits = ".4g" if scale == 1.0 else ".2f"
    mean = statistics.fmean(finite)
    if len(finite) == 1:
        return f"{mean:{digits}}"
    return f"{mean:{digits}} ± {statistics.stdev(finite):{digits}}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The paper's table: per variant, mean +- std over seeds of each measure.

    Trials that trained to the end are averaged; a variant whose trials were all stopped early
    (by ASHA, or an interrupted run) shows those, and the Seeds column counts the stopped ones.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    header = ["Variant", "Seeds", *(title for _, title, _ in TABLE), "# Params"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for group, members in groups.items():
        done = [m for m in members if m["completed"]] or members
        stopped = sum(not m["completed"] for m in members)
        seeds = f"{len(members)} ({stopped} stopped)" if stopped else str(len(members))
        cells = [_cell([m[key] for m in done], scale) for key, _, scale in TABLE]
        row = [group, seeds, *cells, f"{members[0]['parameters']:,}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(metric: str, label: str, curves: dict[str, list[pd.DataFrame]]) -> bytes:
    """PNG of a metric against step: per variant, the mean over seeds with a +- std band."""
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for group, frames in curves.items():
        usable = [f[["step", metric]].dropna() for f in frames if metric in f]
        if not any(len(f) for f in usable):
            continue
        joined = pd.concat(usable)
        stats = joined.groupby("step")[metric].agg(["mean", "std"]).fillna(0.0)
        axes.plot(stats.index, stats["mean"], marker="o", markersize=3, label=group)
        axes.fill_between(
            stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.2
        )
    axes.set_xlabel("step")
    axes.set_ylabel(label)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def report(path: str, experiment: Experiment) -> str:
    """Write results.parquet, results.md and the plots for an experiment; return the table."""
    analysis = tune.ExperimentAnalysis(path)
    frames = analysis.trial_dataframes
    rows, curves = [], {}
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        folder = f"{path}/{trial.path.rstrip('/').rsplit('/', 1)[-1]}"
        frame = history(folder, frames.get(trial.trial_id, pd.DataFrame()))
        row = trial_row(experiment, trial, frame)
        rows.append(row)
        curves.setdefault(row["group"], []).append(frame)
    buffer = pa.BufferOutputStream()
    pq.write_table(results_table(rows), buffer)
    write_bytes(f"{path}/results.parquet", buffer.getvalue().to_pybytes())
    table = markdown(rows)
    write_bytes(f"{path}/results.md", table.encode())
    for metric, label in PLOTS.items():
        write_bytes(f"{path}/{metric}.png", plot(metric, label, curves))
    return table


# Command line ----------------------------------------------------------------------------------


def _tuner(experiment: Experiment, path: str, options: dict, resume: bool) -> tune.Tuner:
    """A new Tuner for the experiment, or the interrupted one restored from `path`."""
    trainable = tune.with_resources(
        functools.partial(
            run_trial,
            experiment=experiment,
            path=path,
            gpus=options["gpus"],
        ),
        {"CPU": TRIAL_CPU},
    )
    if resume:
        archive_results(path)
        return tune.Tuner.restore(
            path, trainable, resume_unfinished=True, resume_errored=True, restart_errored=False
        )
    search = experiment.search
    scheduler: TrialScheduler = FIFOScheduler()
    if options["scheduler"] == "asha":
        steps = experiment.trial_config({}).train.max_steps
        max_t = search.max_t or (steps + 1 if steps else UNBOUNDED_STEPS)
        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=max_t,
            grace_period=search.grace_period,
            reduction_factor=search.reduction_factor,
        )
    storage, name = path.rstrip("/").rsplit("/", 1)
    return tune.Tuner(
        trainable,
        param_space=search.param_space(),
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=search.mode,
            scheduler=scheduler,
            num_samples=options["num_samples"],
            search_alg=BasicVariantGenerator(
                constant_grid_search=True, max_concurrent=options["max_concurrent"]
            ),
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            sync_config=tune.SyncConfig(sync_period=SYNC_PERIOD_S),
        ),
    )


def _parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m raydeq.tune", description=__doc__.split("\n")[0]
    )
    parser.add_argument("experiment", help="tune_configs/EXPERIMENT.yaml, or a path to one")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. train.epochs=2")
    parser.add_argument("--num-samples", type=int, help="samples of the space (default: YAML)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, help="trial scheduler (default: YAML)")
    parser.add_argument("--storage", help="storage folder or URI (default: storage_path)")
    parser.add_argument("--name", help="experiment name (default: the file's name)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument(
        "--workers-per-trial", type=int, help="DDP workers per trial (sets scaling.num_workers)"
    )
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (default: auto)")
    parser.add_argument(
        "--max-concurrent-trials", type=int, help="trials at once (default: what the cluster holds)"
    )
    parser.add_argument("--report", action="store_true", help="only write the results report")
    return parser


def _experiment_path(args: argparse.Namespace, experiment: Experiment) -> str:
    """`storage/name` of the experiment."""
    storage = args.storage or experiment.trial_config({}).storage_path
    storage = storage if "://" in storage else os.path.abspath(storage)
    return f"{storage.rstrip('/')}/{args.name or experiment.name}"


def _check_numbers(args: argparse.Namespace) -> None:
    """Raise a ConfigError for a count or a GPU share out of range on the command line."""
    for option, least in [("num_samples", 1), ("max_concurrent_trials", 1), ("gpus_per_worker", 0)]:
        value = getattr(args, option)
        if value is not None and value < least:
            flag = "--" + option.replace("_", "-")
            raise ConfigError(f"{flag}: must be >= {least}, got {value:g}")


def _options(args: argparse.Namespace, experiment: Experiment) -> dict[str, Any]:
    """GPUs, samples, scheduler and concurrency of a new run (Ray is up)."""
    search = experiment.search
    cfg = experiment.trial_config({})
    gpus = default_gpus(cfg) if args.gpus_per_worker is None else args.gpus_per_worker
    return {
        "gpus": gpus,
        "num_samples": args.num_samples or search.num_samples,
        "scheduler": args.scheduler or search.scheduler,
        "max_concurrent": args.max_concurrent_trials
        or search.max_concurrent_trials
        or concurrency(cfg, gpus),
    }


def start(args: argparse.Namespace) -> tuple[Experiment, str, dict | None]:
    """Check everything that can be checked before Ray starts; (experiment, path, options)."""
    _check_numbers(args)
    workers = [] if args.workers_per_trial is None else [args.workers_per_trial]
    overrides = [*args.overrides, *(f"scaling.num_workers={k}" for k in workers)]
    experiment = load(args.experiment, overrides)
    path = _experiment_path(args, experiment)
    if args.resume or args.report:
        if overrides:
            raise ConfigError("key=value overrides cannot change an existing experiment")
        if not exists(f"{path}/{SETTINGS_FILE}"):
            raise ConfigError(f"{path}: no experiment to resume or report there")
        experiment, options = load_settings(path)
        return experiment, path, options
    if exists(path):
        raise ConfigError(
            f"experiment {path} already exists; add --resume to continue it, --report to "
            "summarise it, or choose another --name"
        )
    preflight(experiment, args.num_samples)
    train.check_storage(path)
    return experiment, path, None


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (2 for bad input)."""
    args = _parser().parse_intermixed_args(argv)
    try:
        experiment, path, options = start(args)
    except (ConfigError, data.DataError, train.StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.report:
        print(report(path, experiment))
        return 0
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    connect()
    try:
        if options is None:
            options = _options(args, experiment)
            save_settings(path, experiment, options)
        if options["scheduler"] == "asha":
            check_dashboard()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"tensorboard --logdir {path}", flush=True)
    resume = args.resume and tune.Tuner.can_restore(path)
    results = _tuner(experiment, path, options, resume).fit()
    print(report(path, experiment))
    print(f"results: {path}/results.parquet, {path}/results.md, plots {', '.join(PLOTS)} (.png)")
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
