"""Results of an experiment: results.parquet (a row per trial), results.md (the paper's table,
mean +- std over seeds) and plots of the metrics against step, rebuilt from the trial folders."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import json
import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Collection, Iterator
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import ray.cloudpickle
import yaml
from ray import tune
from ray.tune.callback import CallbackList
from ray.tune.execution.tune_controller import TuneController
from ray.tune.search import BasicVariantGenerator, Searcher, SearchGenerator

from raydeq import models
from raydeq.experiments import hparams, paper, pareto
from raydeq.experiments.archive import history
from raydeq.experiments.figures import legend_beside, png, step_curves, step_panel, subplots
from raydeq.experiments.spec import (
    LABEL,
    VARIANT,
    Experiment,
    describe,
    trial_config,
    trial_name,
)
from raydeq.training import runlock
from raydeq.training.config import ConfigError, leaves
from raydeq.training.console import Progress
from raydeq.training.storage import StorageError, exists, filesystem, reading, write_bytes

# The files `report` writes in the experiment's folder, besides the plots, the Pareto chart,
# the HParams folder and the paper's files.
RESULTS_FILE = "results.parquet"
MARKDOWN_FILE = "results.md"
PLOTS = {
    "test_accuracy": "test accuracy (%)",
    "forward_time": "forward time per batch (s)",
    "backward_time": "backward time per batch (s)",
}
# Rows of a plot's legend per column, and the most points of a curve drawn with markers.
LEGEND_ROWS = 30
MARKED_POINTS = 100
# The most variants a plot names: past them (a search of thousands of trials, each a variant
# of its own, filled 100 legend columns, an image 50,000 pixels wide, in 7 minutes a plot) it
# names the paper's and the Pareto fronts' and draws the others as thin grey lines.
NAMED_VARIANTS = 4 * LEGEND_ROWS
OTHERS_COLOUR = "0.75"
# Tune's record of an experiment's trials: a file per session, named by its start; Tune reads
# the newest and keeps those of the sessions before.
STATE_FILES = TuneController.CKPT_FILE_TMPL.format("*")
# What else Tune saves per session, named alike, and restores from the file named highest.
SESSION_FILES = (
    TuneController.CKPT_FILE_TMPL,
    BasicVariantGenerator.CKPT_FILE_TMPL,
    SearchGenerator.CKPT_FILE_TMPL,
    Searcher.CKPT_FILE_TMPL,
    CallbackList.CKPT_FILE_TMPL,
)
# Where a resume sets aside the files of sessions older than the newest that Tune would read.
SUPERSEDED_FOLDER = "superseded-state"
TABLE = (
    ("test_accuracy", "Test Accuracy (%)", 100.0),
    ("train_time", "Training Time (s/batch)", 1.0),
    ("backward_time", "Backward Time (s/batch)", 1.0),
    ("predict_time", "Prediction Time (s/batch)", 1.0),
    ("test_nfe", "Test NFE", 1.0),
)


def _last(frame: pd.DataFrame, column: str) -> float:
    """The last non-missing value of a column, or NaN."""
    if column not in frame:
        return math.nan
    values = frame[column].dropna()
    return float(values.iloc[-1]) if len(values) else math.nan


def _interval_steps(frame: pd.DataFrame) -> pd.Series:
    """The steps each report's interval means cover: its step less the step of the report
    before (one each where the reports name no step)."""
    if "step" not in frame:
        return pd.Series(1.0, index=frame.index)
    return frame["step"].diff().fillna(frame["step"])


def _reported(frame: pd.DataFrame, column: str) -> tuple[pd.Series, pd.Series] | None:
    """A column's reported (non-missing) values and the steps each covers (`_interval_steps`),
    or None where no report holds one."""
    if column not in frame or frame[column].dropna().empty:
        return None
    values = frame[column].dropna()
    return values, _interval_steps(frame)[values.index]


def _mean(frame: pd.DataFrame, column: str) -> float:
    """The per-step mean of a column of interval means, each weighed by the steps it covers
    (an epoch's short last interval counts for its few steps), or NaN."""
    reported = _reported(frame, column)
    if reported is None:
        return math.nan
    values, steps = reported
    return float((steps * values).sum() / steps.sum())


def _rate(frame: pd.DataFrame, column: str) -> float:
    """The run's rate from a column of interval rates (images a second): its steps over the
    time they took, each interval's time its steps over its rate, or NaN; the mean of the
    rates would weigh a slow interval's few seconds as a fast one's many."""
    reported = _reported(frame, column)
    if reported is None:
        return math.nan
    values, steps = reported
    return float(steps.sum() / (steps / values).sum())


def total_minutes(frame: pd.DataFrame) -> float:
    """Total training time in minutes (the paper's Table 1): each report's steps times its mean
    step time, summed over the reports."""
    if _reported(frame, "step_time") is None:
        return math.nan
    return float((_interval_steps(frame) * frame["step_time"]).sum()) / 60.0


@functools.cache
def parameter_count(model_section: str) -> int:
    """Trainable parameters of the model that a (YAML-dumped) model section builds."""
    options = yaml.safe_load(model_section)
    model = models.build({k: v for k, v in options.items() if v is not None})
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trial_row(
    experiment: Experiment, trial: Any, frame: pd.DataFrame, folder: str | None = None
) -> dict[str, Any]:
    """One row of results.parquet: the trial, its group, its config and its final metrics.

    The config is the one the trial trained with in its `folder` (`spec.trial_config`), where
    the experiment is now, read back from there whatever folder it started in; a trial that
    never started (no folder) has the experiment's. Its search section is left out: a trial
    has none, and its defaults (searcher random, scheduler fifo) would stand for the
    experiment's, which experiment.yaml holds.

    The training steps' time, rate, NFE and unconverged-fraction columns are per-step means of
    the reports' interval means (each weighed by its steps), images_per_second the steps'
    images over their time, the test columns (test_nfe, predict_time,
    test_unconverged_fraction) the last evaluation's; forward and backward times are the DEQ's
    solves only (the unrolled warm-up steps report pretrain_* times instead). Every metric a
    search can rank by (config.METRICS) has its column.
    """
    cfg = (
        experiment.trial_config(trial.config)
        if folder is None
        else trial_config(experiment, trial.config, folder)
    )
    model_section = yaml.safe_dump(dataclasses.asdict(cfg.model))
    step = int(_last(frame, "step")) if "step" in frame and len(frame) else 0
    epoch = _last(frame, "epoch")
    row = {
        "trial": trial_name(trial),
        "status": trial.status,
        "group": describe(trial.config, leave_out=("seed",)) or "all",
        "paper": LABEL in trial.config.get(VARIANT, {}),  # a labelled variant: the paper's
        "seed": cfg.seed,
        "completed": step >= (cfg.train.max_steps or math.inf) or epoch >= cfg.train.epochs,
        "step": step,
        "epoch": epoch,
        "test_accuracy": _last(frame, "test_accuracy"),
        "test_top5_accuracy": _last(frame, "test_top5_accuracy"),
        "test_nfe": _last(frame, "test_nfe"),
        "predict_time": _last(frame, "predict_time"),
        "test_unconverged_fraction": _last(frame, "test_unconverged_fraction"),
        "train_time": _mean(frame, "forward_time") + _mean(frame, "backward_time"),
        "train_minutes": total_minutes(frame),
        "forward_time": _mean(frame, "forward_time"),
        "backward_time": _mean(frame, "backward_time"),
        "optimizer_time": _mean(frame, "optimizer_time"),
        "data_time": _mean(frame, "data_time"),
        "step_time": _mean(frame, "step_time"),
        "images_per_second": _rate(frame, "images_per_second"),
        "pretrain_forward_time": _mean(frame, "pretrain_forward_time"),
        "pretrain_backward_time": _mean(frame, "pretrain_backward_time"),
        "nfe": _mean(frame, "nfe"),
        "backward_nvjp": _mean(frame, "backward_nvjp"),
        "unconverged_fraction": _mean(frame, "unconverged_fraction"),
        "backward_unconverged_fraction": _mean(frame, "backward_unconverged_fraction"),
        "skipped_steps": _last(frame, "skipped_steps"),
        "train_loss": _last(frame, "train_loss"),
        "train_accuracy": _last(frame, "train_accuracy"),
        "parameters": parameter_count(model_section),
    }
    settings = {k: v for k, v in cfg.to_dict().items() if k != "search"}
    return row | {f"config.{k}": v for k, v in leaves(settings).items()}


def drawn(experiment: Experiment, rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The config columns of the settings each row's trial drew or its variant set, by trial
    (`Experiment.drawn`)."""
    return {
        row["trial"]: [
            f"config.{key}"
            for key in experiment.drawn(
                {k.removeprefix("config."): v for k, v in row.items() if k.startswith("config.")}
            )
        ]
        for row in rows
    }


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


def _decimals(spread: float) -> int:
    """The decimal place of a positive spread's second significant digit, once rounded there
    (0.09956 rounds to 0.10: two places, not three)."""
    places = 1 - math.floor(math.log10(spread))
    return places - 1 if round(spread, places) >= 10.0 ** (2 - places) else places


def _rounded(value: float, places: int) -> str:
    """A value rounded to a decimal place (a negative one rounds to tens, hundreds...)."""
    return f"{round(value, places) + 0.0:.{max(places, 0)}f}"


def _cell(values: list[float], scale: float) -> str:
    """`mean +- std` of the finite values (the mean alone for one value): a percentage with two
    decimals, another measure with two significant digits of its std and the mean to match."""
    finite = [v * scale for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "-"
    digits = ".4g" if scale == 1.0 else ".2f"
    mean = statistics.fmean(finite)
    if len(finite) == 1:
        return f"{mean:{digits}}"
    spread = statistics.stdev(finite)
    if scale != 1.0 or spread == 0.0:
        return f"{mean:{digits}} ± {spread:{digits}}"
    places = _decimals(spread)
    return f"{_rounded(mean, places)} ± {_rounded(spread, places)}"


def markdown(rows: list[dict[str, Any]], unfinished: str = "stopped") -> str:
    """The paper's table: per variant, mean +- std over seeds of each measure.

    Trials that trained to the end are averaged; a variant whose trials were all stopped early
    (by ASHA, or an interrupted run) shows those, and the Seeds column counts those ASHA
    stopped, the unfinished ones (named `unfinished`: "running" while a driver runs the
    experiment, else "stopped" too) and, apart, the failed ones (a trial that ended in an
    error, its restarts spent).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    header = ["Variant", "Seeds", *(title for _, title, _ in TABLE), "# Params"]
    lines = [pareto.table_row(header), "|" + " --- |" * len(header)]
    for group, members in groups.items():
        done = [m for m in members if m["completed"]] or members
        short = [m for m in members if not m["completed"] and m.get("status") != "ERROR"]
        counts = Counter({"stopped": sum(m.get("status") == "TERMINATED" for m in short)})
        counts[unfinished] += len(short) - counts["stopped"]
        counts["failed"] = sum(m.get("status") == "ERROR" for m in members)
        notes = [f"{n} {what}" for what, n in counts.items() if n]
        seeds = f"{len(members)} ({', '.join(notes)})" if notes else str(len(members))
        cells = [_cell([m[key] for m in done], scale) for key, _, scale in TABLE]
        row = [group, seeds, *cells, f"{members[0]['parameters']:,}"]
        lines.append(pareto.table_row(row))
    return "\n".join(lines) + "\n" + _skipped(rows)


def _skipped(rows: list[dict[str, Any]]) -> str:
    """A line naming the trials that skipped steps for a non-finite loss or gradient (the
    training loop drops those updates and goes on, so the table alone would not show them)."""
    named = [
        f"{row['group']} seed {row['seed']}: {int(row['skipped_steps']):,} of {row['step']:,}"
        for row in rows
        if row.get("skipped_steps", 0) > 0
    ]
    if not named:
        return ""
    return f"\nSteps skipped for a non-finite loss or gradient: {'; '.join(named)}.\n"


def plot(
    metric: str,
    label: str,
    curves: dict[str, list[pd.DataFrame]],
    named: Collection[str] = (),
) -> bytes:
    """PNG of a metric against step: per variant, the mean over seeds with a +- std band; an
    accuracy in percent, as results.md, pareto.png and the paper's figures show it. Past
    NAMED_VARIANTS variants, those not `named` are thin grey lines, counted in the legend."""
    figure, axes = subplots(figsize=(9.6, 4.8))
    scale = 100.0 if pareto.in_percent(metric) else 1.0
    lines = list(step_curves(curves, metric))
    many = len(lines) > NAMED_VARIANTS
    handles, others = {}, []
    for group, stats in lines:
        mean, std = scale * stats["mean"], scale * stats["std"]
        if many and (group not in named or len(handles) == NAMED_VARIANTS):
            others += axes.plot(stats.index, mean, c=OTHERS_COLOUR, lw=0.6, zorder=1)
            continue
        # Matplotlib's 10 colours repeat from the 11th variant on: a new line style tells it.
        style = ("-", "--", ":")[len(handles) // 10 % 3]
        # A marker per report only where they stay apart: 5,000 merged into a band.
        marker = "o" if len(stats) <= MARKED_POINTS else None
        (handles[group],) = axes.plot(
            stats.index, mean, style, marker=marker, markersize=3, label=group
        )
        axes.fill_between(stats.index, mean - std, mean + std, alpha=0.2)
    if others:
        handles[f"{len(others)} other variants"] = others[0]
    axes.set_xlabel("step")
    axes.set_ylabel(label)
    step_panel(axes, f"no trial reported {metric}", linear=pareto.in_percent(metric))
    if not axes.lines:
        return png(figure)
    # Right of the axes: inside, Table 1's eleven variants covered half the curves. Outside
    # the layout, which cannot shrink the axes enough for a search's long labels: the image
    # grows to hold them, a column per LEGEND_ROWS variants. The axes keep their height: grown
    # by a row per variant, each curve was drawn on a canvas as tall (300 variants of 5,000
    # reports took 8 minutes, 30 s now).
    columns = math.ceil(len(handles) / LEGEND_ROWS)
    legend = legend_beside(axes, handles, columns, gap=0.02)
    return png(figure, outside=[legend])


def trial_folder(path: str, trial: Any) -> str | None:
    """A trial's folder in the experiment's, or None for a trial that never started (Tune names
    its folder when it starts it, and raises for its path before)."""
    try:
        return f"{path}/{trial.path.rstrip('/').rsplit('/', 1)[-1]}"
    except RuntimeError:  # "Should not access `trial_fs_path` without setting `trial_dir_name`"
        return None


# How long a state file that does not parse is read again: its copy by a running driver, a few
# kilobytes, takes milliseconds (8 of 10,187 reads during a digits run found it empty).
STATE_RETRY_S = 1.0


class RecordedExperiment(tune.ExperimentAnalysis):
    """Tune's record of an experiment, its trials alone: Tune's own reading of every trial's
    result file into a DataFrame (a second read of each, held for every trial) is left out,
    since raydeq reads those files itself (`history`)."""

    def __init__(self, path: str) -> None:
        self.path = path.rstrip("/")
        files = state_files(self.path)
        super().__init__(f"{self.path}/{files[-1]}" if files else self.path)

    def _fetch_trial_dataframes(self) -> dict[str, pd.DataFrame]:
        return {}

    def _load_trials(self) -> list[Any]:
        """Tune's trials from its newest state file, or a StorageError naming that file where
        it holds none (cut short, no JSON), in place of Tune's traceback. A running driver
        copies the file into the storage in place every few seconds, where a reader (--report
        from a second terminal) finds it empty or cut for a moment, so a damaged file is read
        again for STATE_RETRY_S before it is called damaged."""
        deadline = time.monotonic() + STATE_RETRY_S
        while True:
            try:
                return super()._load_trials()
            except (ValueError, KeyError, TypeError) as err:
                if time.monotonic() > deadline:
                    raise StorageError(self.damaged(err)) from None
            time.sleep(0.05)

    def damaged(self, err: Exception) -> str:
        """The line naming the damaged state file, why, and where an intact record may be."""
        name = self._experiment_json_fs_path.rsplit("/", 1)[-1]
        earlier = [other for other in state_files(self.path) if other != name]
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        fallback = (
            f"or move it out of the folder for Tune to read {earlier[-1]}, the record of the "
            "session before, without the trials' progress since"
            if earlier
            else "Tune keeps no earlier record here"
        )
        return (
            f"{self.path}/{name}, Tune's record of the experiment's trials, is damaged "
            f"({reason}): {restore_hint(self.path, name)}; {fallback}"
        )


def restore_hint(path: str, name: str) -> str:
    """How to restore Tune's damaged state file `name` of the experiment at `path`: from a
    backup, or from the copy in its driver's staging folder among Ray's session files."""
    staged = f"/tmp/ray/session_*/artifacts/*/{path.rsplit('/', 1)[-1]}/driver_artifacts"
    return (
        "restore it from a backup, or from the copy Tune wrote first on the machine that ran "
        f"the experiment ({staged}/{name}, while Ray keeps that session's files)"
    )


def check_saved_search(path: str) -> None:
    """Raise a StorageError naming the file where one of Tune's saved states of the search and
    callbacks at `path` that its restore reads (the newest by name of each) does not load: cut
    short, as a full storage leaves it. Tune's restore, failing on it, started the experiment
    again from nothing over its folder, with one trial of the base config."""
    fs, inner = filesystem(path)
    for template in SESSION_FILES[1:]:  # the record of the trials is read as RecordedExperiment
        names = files_matching(path, template.format("*"))
        if not names:
            continue
        name = max(names)
        with reading(f"{path}/{name}"), fs.open_input_stream(f"{inner}/{name}") as stream:
            saved = stream.readall()
        try:
            ray.cloudpickle.loads(saved)
        except Exception as err:  # whatever the file's unpickling raises, Tune's would too
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
            raise StorageError(
                f"{path}/{name}, Tune's saved state of the experiment's search, is damaged "
                f"({reason}): {restore_hint(path, name)}; resumed without it, Tune would "
                "start the experiment again from nothing"
            ) from None


def state_files(path: str) -> list[str]:
    """The names of Tune's state files in the experiment folder at `path`, oldest first by the
    start each records: Tune names them by their session's start in local time, so a resume in
    a time zone behind the first run's, or after the clocks went back, names its file below
    an older one's. One that does not parse or records no start goes last (by name), for its
    reader to read again or call damaged rather than pass over it."""
    fs, inner = filesystem(path)
    names = files_matching(path, STATE_FILES)
    return sorted(names, key=lambda name: (_started(fs, f"{inner}/{name}"), name))


def files_matching(path: str, pattern: str) -> list[str]:
    """The names of the files in the folder at `path` that match the glob `pattern`."""
    fs, inner = filesystem(path)
    found = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    return [
        i.base_name
        for i in found
        if i.type == pyarrow.fs.FileType.File and fnmatch.fnmatch(i.base_name, pattern)
    ]


def _started(fs: pyarrow.fs.FileSystem, file: str) -> float:
    """The start (seconds since the epoch) of the session whose state file is `file`, or
    infinity where it does not parse or records none; a StorageError naming it and why where
    it cannot be read."""
    with reading(file), fs.open_input_stream(file) as stream:
        saved = stream.readall()
    try:
        return float(json.loads(saved)["stats"]["start_time"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def set_aside_superseded(path: str) -> list[str]:
    """Move into SUPERSEDED_FOLDER the files of each older session (`state_files`) named
    above the newest, which Tune would restore in its place (its trials, searcher and
    variants), and return their names; older sessions named below stay, as Tune leaves them."""
    files = state_files(path)
    prefix, suffix = STATE_FILES.split("*")
    fs, inner = filesystem(path)
    moved = []
    for name in files[:-1]:
        if name < files[-1]:
            continue
        session = name.removeprefix(prefix).removesuffix(suffix)
        for kept in (template.format(session) for template in SESSION_FILES):
            if fs.get_file_info(f"{inner}/{kept}").type == pyarrow.fs.FileType.File:
                fs.create_dir(f"{inner}/{SUPERSEDED_FOLDER}")
                fs.move(f"{inner}/{kept}", f"{inner}/{SUPERSEDED_FOLDER}/{kept}")
                moved.append(kept)
    return moved


@contextlib.contextmanager
def unfetched_metrics_unsaid() -> Iterator[None]:
    """Hold back, inside, Tune's warning 'Failed to fetch metrics' naming each trial that never
    reported, given wherever Tune loads an experiment (Tuner.restore, the end of Tuner.fit,
    interrupted or not, `recorded_trials`): raydeq reads the result files itself (`history`)."""
    logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def recorded_trials(path: str) -> list[Any]:
    """Tune's trials of the experiment at `path` (a ValueError where it recorded none yet, a
    StorageError where its record is damaged), without Tune's warnings of their result files
    (`unfetched_metrics_unsaid`)."""
    with unfetched_metrics_unsaid():
        return RecordedExperiment(path).trials


def written(path: str, experiment: Experiment) -> list[str]:
    """The names of what `report` has written in the experiment's folder at `path`: the
    HParams folder where a trial has finished, the paper's files where it reproduces a table."""
    names = [RESULTS_FILE, MARKDOWN_FILE, *(f"{metric}.png" for metric in PLOTS), pareto.CHART]
    if exists(f"{path}/{hparams.FOLDER}"):
        names.append(f"{hparams.FOLDER}/")
    return names + paper.written(experiment)


def report(path: str, experiment: Experiment, unfinished: str = "stopped") -> str:
    """Write results.parquet, results.md and the plots for an experiment; return the table (a
    ConfigError for an experiment stopped before Tune recorded its first state). `unfinished`
    names its trials that have not ended (see `markdown`): "running" where a driver runs the
    experiment, whose first seconds record no trial yet. Two processes here report one at a
    time (`runlock.writing_results`)."""
    with runlock.writing_results(path):
        return _report(path, experiment, unfinished)


def _report(path: str, experiment: Experiment, unfinished: str) -> str:
    """`report`, without its lock."""
    try:
        trials = recorded_trials(path)
    except ValueError:  # Tune's "No experiment snapshot file" (no experiment_state-*.json)
        then = (
            "its run has just started: --report again once its trials have started"
            if unfinished == "running"
            else "--resume runs the experiment"
        )
        raise ConfigError(
            f"{path}: no trial has been recorded yet, so there is nothing to report; {then}"
        ) from None
    # A part per trial read and per file drawn: 300 trials took 48 s, each plot 12 s of it.
    papers = paper.written(experiment)
    parts = len(trials) + 2 + bool(papers) + len(PLOTS)
    shown = Progress(f"writing the results of {path}", parts, eta=False)
    rows, curves = [], {}
    for trial in sorted(trials, key=lambda t: t.trial_id):
        shown.next(f"reading the reports of {trial_name(trial)}")
        folder = trial_folder(path, trial)
        frame = pd.DataFrame() if folder is None else history(folder)
        row = trial_row(experiment, trial, frame, folder)
        rows.append(row)
        curves.setdefault(row["group"], []).append(frame)
    metric, mode = experiment.search.metric, experiment.search.mode
    costs = pareto.views(experiment.search.cost)
    rows = pareto.mark(rows, metric, mode, costs)
    buffer = pa.BufferOutputStream()
    pq.write_table(results_table(rows), buffer)
    write_bytes(f"{path}/{RESULTS_FILE}", buffer.getvalue().to_pybytes())
    shown.next(f"drawing {pareto.CHART}")
    write_bytes(f"{path}/{pareto.CHART}", pareto.chart(rows, metric, mode, costs))
    shown.next(f"writing {MARKDOWN_FILE}")
    settings = drawn(experiment, rows)
    hparams.write(path, rows, settings, metric, experiment.search.cost)
    table = markdown(rows, unfinished) + pareto.markdown(rows, metric, costs, settings)
    write_bytes(f"{path}/{MARKDOWN_FILE}", table.encode())
    if papers:
        shown.next(f"writing {', '.join(papers)}")
        table += paper.write(path, experiment, rows, curves)
    named = {row["group"] for row in rows if row["paper"] or any(row[f"pareto_{c}"] for c in costs)}
    for metric, label in PLOTS.items():
        shown.next(f"drawing {metric}.png")
        write_bytes(f"{path}/{metric}.png", plot(metric, label, curves, named))
    return table
