"""Running an experiment on Ray Tune: trials, Tuner, schedulers, concurrency and resume.

A trial with K > 1 workers is a function trainable that fits a Ray Train `TorchTrainer` (K DDP
workers; one trial can span GPUs and nodes) in `<trial>/train` and forwards its reports to Tune;
a trial with one worker runs the training loop in its own process (`session.TuneTrial`), its
checkpoints in the trial folder and its TensorBoard in `<trial>/train`. The settings a run
started with are stored in the experiment folder, so `--resume` and `--report` use the same ones.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import pickle
import posixpath
import re
from collections.abc import Callable, Collection
from dataclasses import MISSING, dataclass
from typing import Any

import pandas as pd
import pyarrow.fs
import ray
import ray.util.state
import yaml
from ray import tune
from ray._common.constants import HEAD_NODE_RESOURCE_NAME
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, SearchAlgorithm, Searcher, SearchGenerator

from raydeq.experiments import search as searchers
from raydeq.experiments.archive import archive_results, archive_unrecorded, history
from raydeq.experiments.results import (
    SUPERSEDED_FOLDER,
    check_saved_search,
    files_matching,
    recorded_trials,
    set_aside_superseded,
    trial_folder,
    unfetched_metrics_unsaid,
)
from raydeq.experiments.spec import (
    Experiment,
    from_dict,
    searched_keys,
    trial_config,
    trial_count,
    trial_label,
    trial_name,
)
from raydeq.training import capacity, launch
from raydeq.training.config import (
    DECIDED_BY,
    DEFAULTS,
    SCHEDULERS,
    Config,
    ConfigError,
    SearchSection,
    apply_overrides,
    leaves,
    parse_yaml,
    without_effect,
)
from raydeq.training.console import os_reason
from raydeq.training.reporting import progress_line
from raydeq.training.schema import build_section, option
from raydeq.training.session import TuneTrial
from raydeq.training.storage import StorageError, exists, filesystem, read_bytes, write_bytes

SETTINGS_FILE = "experiment.yaml"
# Tune's bound on the trials that wait for resources at once: `auto` or a whole number.
PENDING_LIMIT = "TUNE_MAX_PENDING_TRIALS_PG"
# A trial's own driver holds this much CPU; its workers' share is reduced by it.
TRIAL_CPU = 0.01
# ... and runs on the head node, with its Train controller: a GPU node that is lost takes only
# workers with it, which Ray Train restarts from the last checkpoint on another node.
TRIAL_RESOURCES = {"CPU": TRIAL_CPU, HEAD_NODE_RESOURCE_NAME: 0.001}
SYNC_PERIOD_S = 60
UNBOUNDED_STEPS = 2**31
# The search settings that only ASHA reads.
ASHA_SETTINGS = ("grace_period", "reduction_factor", "max_t")
UNFINISHED = (Trial.PENDING, Trial.RUNNING, Trial.PAUSED)
# Ray's account of a dead actor's process (`ActorDiedError`): its first line, then tab-indented
# facts (a pid line where the process had started), then the reason.
DIED = ray.exceptions.ActorDiedError.BASE_ERROR_MSG
DEAD_PID = re.compile(r"^\s+pid: (?P<pid>\d+)$")
ENDED = (Trial.TERMINATED, Trial.ERROR)
# The mode of a search that set none, in experiments stored before settings stored their mode.
OLD_MODE = "max"


@dataclass(frozen=True)
class Options:
    """How a run is carried out: GPUs per worker (None: decided by each trial when it starts),
    samples, scheduler, and a limit on trials at once (0: what the cluster can hold)."""

    gpus: float | None = option(MISSING, ge=0)
    num_samples: int = option(MISSING, ge=1)
    scheduler: str = option(MISSING, choices=SCHEDULERS)
    max_concurrent: int = option(MISSING, ge=0)


def run_trial(
    sampled: dict[str, Any],
    *,
    experiment: Experiment,
    path: str,
    gpus: float,
    threads: int | None = None,
) -> None:
    """One trial: train (or resume) in this process with one worker, on CUDA where the trial
    holds a GPU share (a resumed trial holds what it held at its start, whatever `gpus` says
    now), else fit its TorchTrainer in `<trial>/train`, its workers running `threads` threads
    (`launch.trial_threads`); either reports to Tune."""
    context = tune.get_context()
    trial_dir = f"{path.rstrip('/')}/{context.get_trial_name()}"
    cfg = trial_config(experiment, sampled, trial_dir)
    if in_process(cfg):
        from raydeq.training.loop import Loop  # the trial's process trains (see launch)

        archive_unrecorded(trial_dir)  # a restart's result file is the storage's copy
        held = context.get_trial_resources().required_resources.get("GPU", 0)
        Loop(cfg, TuneTrial(trial_dir, use_gpu=held > 0)).run()
        return
    scaling = launch.scaling_config(cfg, gpus, reserve_cpu=TRIAL_CPU)
    launch.fit(cfg, scaling, callbacks=[TuneReportCallback()], threads=threads)


def in_process(cfg: Config) -> bool:
    """True when a trial trains in its own process: it has one worker."""
    return cfg.scaling.num_workers == 1


def trial_resources(cfg: Config, gpus: float) -> dict[str, float]:
    """What a trial's process holds: its one worker's CPUs and GPU, or a sliver of the head
    node beside its Train run's workers."""
    if not in_process(cfg):
        return TRIAL_RESOURCES
    return {"CPU": cfg.scaling.cpus_per_worker} | ({"GPU": gpus} if gpus else {})


def check_gpus(experiment: Experiment, gpus: float | None) -> None:
    """Raise a ConfigError for GPUs per worker that scaling.device contradicts (the workers
    train on a GPU where they hold one: device cpu with a GPU trained on it, device cuda with
    none on the CPU), or a fraction of a GPU in trials of several workers: Ray packs a trial's
    workers onto one GPU, where NCCL refuses to start DDP (two ranks on one device). One-worker
    trials share GPUs that way."""
    scaling = experiment.trial_config({}).scaling
    if gpus is not None and (scaling.device, gpus > 0) in (("cpu", True), ("cuda", False)):
        raise ConfigError(
            f"--gpus-per-worker {gpus:g}: not with scaling.device {scaling.device}, which the "
            f"workers would not train on; give one of them (scaling.device auto follows "
            "--gpus-per-worker)"
        )
    workers = scaling.num_workers
    if gpus is not None and 0 < gpus < 1 and workers > 1:
        raise ConfigError(
            f"--gpus-per-worker: {gpus:g} with {workers} workers per trial would put a trial's "
            "workers on one GPU, where DDP (NCCL) cannot run two ranks; give 1, or "
            "--workers-per-trial 1 to share GPUs between trials"
        )


def trial_gpus(experiment: Experiment, options: Options) -> float:
    """GPUs per worker: as given, else what the cluster's node types offer now (at every
    start and resume)."""
    if options.gpus is not None:
        return options.gpus
    return launch.gpus_per_worker(experiment.trial_config({}))


def concurrency(experiment: Experiment, gpus: float | None, limit: int = 0) -> int:
    """How many trials the nodes the cluster may have (the autoscaler's node types, not only the
    nodes up now) hold at once: at least one, at most `limit` when it is not 0."""
    workers, worker = trial_workers(experiment, gpus)
    fits = capacity.worker_slots(worker) // workers
    if fits < 1:
        print(
            f"note: one trial needs {workers} workers x {worker}, more than any node type of "
            "the cluster provides; trials wait for nodes that can hold them",
            flush=True,
        )
    return min(max(fits, 1), limit or capacity.UNBOUNDED)


def trial_workers(experiment: Experiment, gpus: float | None) -> tuple[int, dict[str, float]]:
    """A trial's workers and what each one needs: a one-worker trial's process holds its
    `trial_resources`; Train workers share their CPUs with the trial's process, and take a GPU
    when `gpus`, or by default when the cluster may have GPUs."""
    cfg = experiment.trial_config({})
    gpus = launch.gpus_per_worker(cfg) if gpus is None else gpus
    if in_process(cfg):
        return 1, trial_resources(cfg, gpus)
    worker = launch.scaling_config(cfg, gpus, reserve_cpu=TRIAL_CPU).resources_per_worker
    return cfg.scaling.num_workers, worker


def stored_at(trial: Trial | None, path: str) -> Trial | None:
    """A new trial of a search, stored in the experiment's folder `path` as it is now: a
    search restored from its saved state makes its trials from the experiment it was given at
    the first start, which names the folder the experiment started in, so a copy resumed
    elsewhere stored its new trials' checkpoints there (Tune moves only the trials it
    restores, as set here)."""
    fs, inner = filesystem(path)
    if trial is None or (
        trial.storage.storage_filesystem.type_name == fs.type_name
        and trial.storage.experiment_fs_path == inner.rstrip("/")
    ):
        return trial
    storage = copy.copy(trial.storage)
    storage.storage_filesystem = fs
    storage.storage_fs_path, storage.experiment_dir_name = posixpath.split(inner.rstrip("/"))
    trial.set_storage(storage)
    return trial


class VariantsWithinCapacity(BasicVariantGenerator):
    """Tune's variant generator for the experiment at `path`, with its bound on live trials
    computed when a run starts and again when it is restored (Tune would restore the bound
    saved with the run, so a resumed run would keep the cluster of its first start)."""

    def __init__(self, path: str, bound: Callable[[], int], **options: Any) -> None:
        super().__init__(max_concurrent=bound(), **options)
        self.path = path
        self.bound = bound

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore the saved state, but the experiment's folder, then bound the live trials
        by the cluster of now."""
        super().set_state(state | {"path": self.path})
        self.max_concurrent = self.bound()

    def next_trial(self) -> Trial | None:
        """Tune's next trial, stored in the experiment's folder (`stored_at`)."""
        return stored_at(super().next_trial(), self.path)


class SearchHere(SearchGenerator):
    """Tune's wrapper of a searcher for the experiment at `path`, its trials stored there
    (`stored_at`)."""

    def __init__(self, path: str, searcher: Searcher) -> None:
        super().__init__(searcher)
        self.path = path

    def next_trial(self) -> Trial | None:
        """Tune's next trial, stored in the experiment's folder (`stored_at`)."""
        return stored_at(super().next_trial(), self.path)


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


def check_pending_limit() -> None:
    """Raise a ConfigError for a TUNE_MAX_PENDING_TRIALS_PG that Tune cannot run with: one that
    is no whole number failed the run in Tune's traceback once Ray had started, and 0 started no
    trial and waited without a word until stopped."""
    value = os.environ.get(PENDING_LIMIT, "auto")
    try:
        usable = value == "auto" or int(value) >= 1
    except ValueError:
        usable = False
    if not usable:
        raise ConfigError(
            f"{PENDING_LIMIT}={value}: Tune takes `auto` or a whole number of at least 1 (0 "
            "starts no trial); unset it, or give such a number"
        )


def save_settings(path: str, experiment: Experiment, options: Options) -> None:
    """Store what the experiment runs with, so `--resume` and `--report` use the same: its
    search's mode written out, which another default of an unset mode would change."""
    search = experiment.raw.get("search") or {}
    stored = experiment.raw | {"search": {**search, "mode": experiment.search.mode}}
    settings = {"experiment": stored, "options": vars(options)}
    write_bytes(f"{path}/{SETTINGS_FILE}", yaml.safe_dump(settings, sort_keys=False).encode())


def has_settings(path: str) -> bool:
    """True when an experiment was started at `path` (its settings are stored there)."""
    return exists(f"{path}/{SETTINGS_FILE}")


def load_settings(path: str) -> tuple[Experiment, Options]:
    """The experiment and run options stored in an experiment folder; a StorageError where the
    file cannot be read, a ConfigError where it is not such settings (no YAML text, cut short,
    or edited)."""
    file = f"{path}/{SETTINGS_FILE}"
    try:
        data = read_bytes(file)
    except OSError as err:
        raise StorageError(f"{file} cannot be read: {os_reason(err)}") from None
    settings = parse_yaml(file, data, yaml.SafeLoader)  # as safe_dump wrote them
    try:
        experiment, options = settings["experiment"], settings["options"]
        options = build_section(Options, options, "options.")
    except (KeyError, TypeError) as err:
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise ConfigError(f"{file} holds no experiment settings ({reason})") from None
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from None
    try:
        settings = settled(with_mode(experiment))
        name = path.rstrip("/").rsplit("/", 1)[-1]
        return from_dict(name, settings, stored=True), options
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from None


def with_mode(stored: Any) -> Any:
    """Stored experiment settings with the search's mode that their run was started with: one
    stored without it was started when an unset mode meant max (its searcher and scheduler
    maximise), where it now means the metric's direction."""
    if not isinstance(stored, dict):
        return stored  # from_dict names it
    search = stored.get("search")
    if search is not None and not isinstance(search, dict):
        return stored
    if search is not None and search.get("mode") is not None:
        return stored
    return stored | {"search": {**(search or {}), "mode": OLD_MODE}}


def settled(stored: Any) -> Any:
    """Stored experiment settings with the base's settings that have no effect (momentum under
    Adam) at their defaults, as their trials ran them: an experiment stored before such a
    setting was refused could not be read back. One the search sets, or sets what decides it
    (a variant of SGD), is left to be refused, naming it."""
    if not isinstance(stored, dict):
        return stored
    flat = leaves({k: v for k, v in stored.items() if k != "search"})
    searched = searched_keys(stored.get("search"))
    idle = [
        key
        for key in without_effect(DEFAULTS | flat)
        if key in flat and searched.isdisjoint((key, *DECIDED_BY[key]))
    ]
    return apply_overrides(stored, {key: DEFAULTS[key] for key in idle})


def asha_max_t(experiment: Experiment) -> int:
    """ASHA's max_t: the search's, else past the longest trial's last step, so that no trial is
    stopped before it ends."""
    steps = experiment.longest_trial()
    return experiment.search.max_t or (steps + 1 if steps else UNBOUNDED_STEPS)


def check_scheduler(
    experiment: Experiment, scheduler: str, chosen: bool = False, given: Collection[str] = ()
) -> None:
    """Raise a ConfigError for an ASHA grace period past its max_t, which Ray's ASHA refuses,
    or at or past the longest trial's last step, where ASHA would stop no trial; for a max_t
    below that step, where it would stop every trial that reaches max_t short of its end; or
    for ASHA's settings under fifo, where they would stop no trial: an experiment file's whose
    scheduler is fifo (unless the command line `chosen` the scheduler: `--scheduler fifo` runs a
    search written for ASHA under FIFO), and any the command line's dotted settings `given`."""
    search, max_t = experiment.search, asha_max_t(experiment)
    if scheduler == "fifo":
        for key in ASHA_SETTINGS:
            value = getattr(search, key)
            written = search.scheduler == "fifo" and not chosen
            if value != getattr(SearchSection(), key) and (written or f"search.{key}" in given):
                raise ConfigError(
                    f"search.{key}: {value} applies to search.scheduler asha only, not fifo; "
                    f"set search.scheduler: asha (or --scheduler asha), or remove "
                    f"search.{key}",
                    key=f"search.{key}",
                )
    if scheduler != "asha":
        return
    longest, ending = experiment.longest()
    if search.grace_period > max_t and (search.max_t or not longest):
        why = "search.max_t" if search.max_t else "no trial's last step is known"
        raise ConfigError(
            f"search.grace_period: {search.grace_period} is past ASHA's max_t, {max_t} ({why}); "
            f"it must be at most {max_t}"
        )
    if longest and search.grace_period >= longest:
        raise ConfigError(
            f"search.grace_period: {search.grace_period} is not below the longest trial's "
            f"{ending}: ASHA's first rung would come at or after every trial's last step and "
            f"stop none; give less than {longest}"
        )
    if search.max_t and search.max_t < longest:
        raise ConfigError(
            f"search.max_t: {search.max_t} is below the longest trial's {ending}: ASHA would "
            f"stop every trial that reaches step {search.max_t} short of its end, as it stops "
            f"those it prunes; give at least {longest}, or leave it out, and set train.max_steps "
            "to shorten the trials"
        )


def _past_frame(path: str, trial: Trial) -> pd.DataFrame:
    """A trial's reports before a resume in step order (`history`), empty for a trial that has
    not started."""
    folder = trial_folder(path, trial)
    if folder is None:
        return pd.DataFrame()
    fs, inner = filesystem(folder)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.Directory:
        return pd.DataFrame()
    return history(folder)


def _measured(frame: pd.DataFrame, time_attr: str, metric: str) -> list[tuple]:
    """(time, metric) of each of the reports that has the metric, in their order."""
    if time_attr not in frame or metric not in frame:
        return []
    return list(frame[[time_attr, metric]].dropna().itertuples(index=False, name=None))


class ResumableASHA(ASHAScheduler):
    """Ray's ASHA, its rungs rebuilt from the trials' reports when a run is resumed: Tune
    restores the scheduler pickled at the run's start, with empty rungs, which let a resumed
    run's trials through where the first part's results would have stopped them.

    An unfinished trial whose last report carries the metric is judged on it once every trial
    is added, as ASHA judged it before the stop: Tune's record, saved every 10 s or more, can
    hold a trial that ASHA stopped since as unfinished, and the resume trained it to its end.
    It is judged against the rungs as they were when it reported (Tune's `timestamp`): the
    values other trials reported there later were not there when ASHA let it through.
    """

    def __init__(self, path: str, **options: Any) -> None:
        super().__init__(**options)
        # Ray's brackets judge a report at the highest rung it reached or, where the trial was
        # judged there already, at a lower one it skipped: a trial evaluated once an epoch,
        # whose first evaluation passed several rungs, was judged again at each of those by
        # later evaluations and its last result, cut at steps that are no rung. Brackets built
        # not to stop trials past their last rung judge a report at the highest rung it reached
        # alone; the scheduler still stops a trial at max_t.
        for bracket in self._brackets:
            bracket._stop_last_trials = False
        self.path = path
        self.unjudged: dict[str, tuple[Trial, dict[str, Any]]] = {}
        self.recorded_at: dict[tuple[str, float], float] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle, with no report to judge where a raydeq before them pickled it."""
        self.__dict__.update({"unjudged": {}, "recorded_at": {}} | state)

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        """Add the trial, and record at each rung what it reported there before a resume (an
        unfinished trial's last report with the metric kept for `choose_trial_to_run`)."""
        super().on_trial_add(tune_controller, trial)
        frame = _past_frame(self.path, trial)
        past = _measured(frame, self._time_attr, self._metric)
        stamps = _stamps(frame, self._time_attr, self._metric)
        last = _last_report(frame, self._metric)
        if past and last is not None and trial.status != Trial.TERMINATED:
            self.unjudged[trial.trial_id] = (trial, last)
            past = past[:-1]
        for (time, value), stamp in zip(past, stamps, strict=False):
            result = {self._time_attr: time, self._metric: value}
            self._record(tune_controller, trial, result, stamp)

    def _record(
        self, tune_controller: Any, trial: Trial, result: dict[str, Any], stamp: float | None
    ) -> str:
        """ASHA's decision on a report, noting when it was made (`stamp`) at the rung it is
        recorded in."""
        rungs = self._trial_info[trial.trial_id]._rungs
        before = {milestone for milestone, recorded in rungs if trial.trial_id in recorded}
        decision = self.on_trial_result(tune_controller, trial, result)
        for milestone, recorded in rungs:
            if stamp is not None and trial.trial_id in recorded and milestone not in before:
                self.recorded_at[trial.trial_id, milestone] = stamp
        return decision

    def _judge(self, tune_controller: Any, trial: Trial, report: dict[str, Any]) -> str:
        """ASHA's decision on an unfinished trial's last report against the rungs as they were
        when it was made: the values recorded from later reports are set aside meanwhile."""
        stamp = report.get("timestamp")
        rungs = self._trial_info[trial.trial_id]._rungs
        later = {}
        for milestone, recorded in rungs if stamp is not None else []:
            for other in list(recorded):
                if self.recorded_at.get((other, milestone), -math.inf) > stamp:
                    later[milestone, other] = recorded.pop(other)
        decision = self._record(tune_controller, trial, report, stamp)
        for (milestone, other), value in later.items():
            dict(rungs)[milestone][other] = value
        return decision

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        """Judge the unfinished trials' last reports against every trial's rungs, stopping
        those ASHA stops (the searcher told their report, as at a stop in a run), then FIFO;
        the reports are judged in the order they were made."""
        unjudged, self.unjudged = self.unjudged, {}
        made = sorted(unjudged.values(), key=lambda pair: pair[1].get("timestamp", -math.inf))
        for trial, report in made:
            decision = self._judge(tune_controller, trial, report)
            if decision == TrialScheduler.STOP and trial.status == Trial.PENDING:
                trial.update_last_result(report)
                tune_controller.search_alg.on_trial_complete(trial.trial_id, result=report)
                tune_controller.stop_trial(trial)
        return super().choose_trial_to_run(tune_controller)


def _last_report(frame: pd.DataFrame, metric: str) -> dict[str, Any] | None:
    """A trial's last report, where it has `metric`: each value as Python's of its column's
    type (a row of numbers alone would make the step a float), the missing ones left out."""
    if frame.empty or metric not in frame or pd.isna(frame[metric].iloc[-1]):
        return None
    values = {key: column.iloc[-1] for key, column in frame.items()}
    values = {key: v.item() if hasattr(v, "item") else v for key, v in values.items()}
    return {key: v for key, v in values.items() if not _missing(v)}


def _stamps(frame: pd.DataFrame, time_attr: str, metric: str) -> list[float | None]:
    """When each report `_measured` gives was made (Tune's `timestamp`), None where unknown."""
    if time_attr not in frame or metric not in frame:
        return []
    measured = frame[[time_attr, metric]].notna().all(axis=1)
    if "timestamp" not in frame:
        return [None] * int(measured.sum())
    return [None if _missing(v) else float(v) for v in frame.loc[measured, "timestamp"]]


def _missing(value: Any) -> bool:
    """Whether a frame's value is a missing one (None or NaN)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _scheduler(experiment: Experiment, options: Options, path: str) -> TrialScheduler:
    """FIFO, or ASHA on the training step (max_t: `asha_max_t`) for the experiment at `path`."""
    if options.scheduler != "asha":
        return FIFOScheduler()
    search = experiment.search
    return ResumableASHA(
        path,
        time_attr="step",
        max_t=asha_max_t(experiment),
        grace_period=search.grace_period,
        reduction_factor=search.reduction_factor,
    )


def search_algorithm(
    experiment: Experiment, options: Options, path: str, resume: bool = False
) -> SearchAlgorithm:
    """Tune's grid and random sampling, or an Optuna searcher (`search.searcher`), with as many
    trials at once as the cluster can hold (`concurrency`), for the experiment at `path` (to
    `resume` it: `searched_space`)."""
    bound = functools.partial(concurrency, experiment, options.gpus, options.max_concurrent)
    seed = experiment.trial_config({}).seed
    if not experiment.searched:
        return VariantsWithinCapacity(path, bound, constant_grid_search=True, random_state=seed)
    space = searched_space(experiment, resume)
    return SearchHere(path, searchers.searcher(space, experiment.search, seed, bound))


def searched_space(experiment: Experiment, resume: bool) -> searchers.Space:
    """The searcher's space; to resume a search whose stored space a check added since it
    started refuses, an empty one: Tune restores the searcher's saved state over it, with the
    space, points and study the search started with."""
    try:
        return experiment.space()
    except ConfigError:
        if not resume:
            raise
        return searchers.Space({}, (), ())


def check_resumable(experiment: Experiment, path: str) -> None:
    """Raise a ConfigError for a search whose stored space a check added since it started
    refuses, where Tune saved no state of its searcher at `path` to restore over the empty
    space of `searched_space`: the resume would run its new trials at the base's values."""
    saved = SearchGenerator.CKPT_FILE_TMPL.format("*")
    if not experiment.searched or files_matching(path, saved):
        return
    try:
        experiment.space()
    except ConfigError as err:
        raise ConfigError(
            f"{path}: --resume cannot go on with this search: its stored space is refused since "
            f"it started ({err}), and Tune saved no state of its searcher there to go on from; "
            "start the experiment again under another --name"
        ) from None


def tuner(experiment: Experiment, path: str, options: Options, resume: bool) -> tune.Tuner:
    """A new Tuner for the experiment, or the interrupted one restored from `path`.

    Tune's own TensorBoard logger is left out (JSON and CSV only): the trials' Train runs write
    TensorBoard themselves, and a second stream would restart its x-axis after a resume.
    """
    cfg = experiment.trial_config({})
    gpus = trial_gpus(experiment, options)
    trainable = tune.with_resources(
        functools.partial(
            run_trial,
            experiment=experiment,
            path=path,
            gpus=gpus,
            threads=launch.trial_threads(cfg.scaling.cpus_per_worker),
        ),
        trial_resources(cfg, gpus),
    )
    if resume:
        archive_results(path)
        moved = set_aside_superseded(path)
        if moved:
            print(
                f"Tune's state of an older session, named later by another time zone or "
                f"clock, set aside in {path}/{SUPERSEDED_FOLDER}: {', '.join(moved)}",
                flush=True,
            )
        check_saved_search(path)
        restored = tune.Tuner.restore(
            path, trainable, resume_unfinished=True, resume_errored=True, restart_errored=False
        )
        # Tune restores the callbacks pickled when the experiment started: this raydeq's
        # classes with the attributes of the raydeq that started it (an older TrialLines had
        # no total, and the first trial to end stopped the resumed run). It takes this one's.
        restored._local_tuner.get_run_config().callbacks = callbacks(experiment, options, path)
        # ... and the scheduler and search pickled with the folder the experiment started in:
        # a copy resumed elsewhere rebuilt ASHA's rungs from there, or from nothing once it
        # was gone, and stored its new trials there. It takes ones for the folder of now.
        tuned = restored._local_tuner._tune_config
        tuned.scheduler = _scheduler(experiment, options, path)
        tuned.search_alg = search_algorithm(experiment, options, path, resume=True)
        return restored
    storage, name = path.rstrip("/").rsplit("/", 1)
    search = experiment.search
    return tune.Tuner(
        trainable,
        param_space=experiment.param_space(),
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=search.mode,
            scheduler=_scheduler(experiment, options, path),
            num_samples=options.num_samples,
            search_alg=search_algorithm(experiment, options, path),
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
            # A trial's process takes seconds to start and import; under FIFO every trial runs
            # to its end, so the next one can take it over. ASHA stops trials mid-run, and a
            # stopped trial's process must end to free its Train run's workers.
            reuse_actors=options.scheduler == "fifo",
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            sync_config=tune.SyncConfig(sync_period=SYNC_PERIOD_S),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            # Restarts of a trial that trains in its own process (a Train run restarts its own).
            failure_config=tune.FailureConfig(
                max_failures=cfg.scaling.max_failures if in_process(cfg) else 0
            ),
            callbacks=callbacks(experiment, options, path),
            verbose=0,
        ),
    )


def failure_reason(text: str) -> str | None:
    """The newest failure of a trial's error.txt, where Tune appends `Failure # N` and the
    error of each, as one line: where a process of the trial died (Ray's account after the
    last frame, or without a traceback: a Train trial's worker's below Train's
    WorkerGroupError), its pid where Ray has one and the first sentence of Ray's reason; else
    the exception after the traceback's last frame (a Train trial's: its worker's), without
    its module or the lines of its message after the first (a CUDA error's hints); else the
    last line; None where there is no text."""
    block = re.split(r"^Failure # \d+.*$", text, flags=re.MULTILINE)[-1]
    lines = [line.rstrip() for line in block.splitlines() if line.strip()]
    if not lines:
        return None
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    tail = lines[frames[-1] + 1 :] if frames else lines
    account = tail[tail.index(DIED) + 1 :] if DIED in tail else []
    pid = next((found["pid"] for line in account if (found := DEAD_PID.match(line))), None)
    told = [line for line in account if not line[0].isspace()]
    if told:
        process = f"its process (pid {pid})" if pid else "its process"
        return f"{process} died: {told[0].split('. ')[0].rstrip('.')}"
    after = [line for line in tail if not line[0].isspace()] if frames else []
    error = after[0] if after else lines[-1].strip()
    match = launch.QUALIFIED_ERROR.match(error)
    return match["error"] if match and frames else error


def callbacks(experiment: Experiment, options: Options, path: str) -> list[tune.Callback]:
    """What Tune calls on the trials' events: result.json (the reports the results read),
    progress.csv and the lines of the trials of the experiment at `path`."""
    total = trial_count(experiment, options.num_samples)
    return [JsonLoggerCallback(), CSVLoggerCallback(), TrialLines(total, experiment, path)]


class TrialLines(tune.Callback):
    """One line per trial event, named by the trial's label: started, each report, finished and
    failed with how many of the experiment's `total` trials have ended (the workers' own
    output stays in Ray's logs) and where, in the experiment's folder `path`, its error.txt is."""

    def __init__(self, total: int, experiment: Experiment, path: str) -> None:
        """Lines for `experiment` at `path` (a folder or a URI), of `total` trials."""
        self.total, self.experiment, self.path = total, experiment, path

    def label(self, trial: Trial) -> str:
        """The trial's label in its lines (`trial_label`)."""
        return trial_label(self.experiment, trial.config)

    def ended(self, trials: list, trial: Trial) -> str:
        """' (n of total trials done)', counting `trial` as ended."""
        done = 1 + sum(other.status in ENDED for other in trials if other is not trial)
        return f" ({done} of {self.total} trials done)"

    @staticmethod
    def failure(trial: Trial) -> str:
        """`failed (Error: message)`: the newest failure in the trial's error.txt
        (`failure_reason`)."""
        try:
            with open(trial.error_file) as stream:
                reason = failure_reason(stream.read())
        except (OSError, TypeError):
            reason = None
        return f"failed ({reason})" if reason else "failed"

    def on_trial_start(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        """Say that the trial started."""
        print(f"trial {self.label(trial)}: started", flush=True)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Trial, result: dict, **info: Any
    ) -> None:
        """Print a progress line for each training report of the trial (one with total_steps),
        as its training prints it (a Neural ODE's leaves out its unconverged_fraction)."""
        if "total_steps" in result:
            variant = self.experiment.trial_config(trial.config).model.variant
            line = progress_line(self.label(trial), result, variant == "neural_ode")
            print(line, flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        """Say where the trial ended (its last step, or a scheduler's stop) and its accuracy."""
        result = trial.last_result or {}
        accuracy = result.get("test_accuracy")
        shown = f", test_accuracy {accuracy:.4f}" if accuracy is not None else ""
        step, total = result.get("step", 0), result.get("total_steps", 0)
        # A trial that a scheduler (ASHA) stopped also ends here, before its last step.
        ended = (
            f"stopped early at step {step} of {total}"
            if step < total
            else f"finished at step {step}"
        )
        done = self.ended(trials, trial)
        print(f"trial {self.label(trial)}: {ended}{shown}{done}", flush=True)

    def on_trial_recover(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        """Say why the trial failed and which of its allowed restarts follows."""
        limit = f"of {trial.max_failures}" if trial.max_failures >= 0 else "(no limit)"
        failed, count = self.failure(trial), f"{trial.num_failures} {limit}"
        print(f"trial {self.label(trial)}: {failed}; restart {count}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        """Say why the trial failed for good and where its traceback is: in its folder in the
        experiment's, a URI's too (Tune's trial.path has no scheme: `bucket/runs/...`)."""
        failed, done = self.failure(trial), self.ended(trials, trial)
        where = f"{trial_folder(self.path, trial)}/error.txt"
        print(f"trial {self.label(trial)}: {failed}, see {where}{done}", flush=True)


def finished(path: str, experiment: Experiment, options: Options) -> bool:
    """True when Tune's record at `path`, read from storage without Ray, holds every trial of
    the experiment and each one terminated, so that a resume would run nothing: a trial that
    failed is resumed from its checkpoint (`tuner`), and a search adds its trials as it runs."""
    try:
        trials = recorded_trials(path)
    except ValueError:  # Tune's "No experiment snapshot file": no trial recorded yet
        return False
    total = trial_count(experiment, options.num_samples)
    return len(trials) >= total and all(trial.status == Trial.TERMINATED for trial in trials)


def fit(experiment: Experiment, path: str, options: Options, resume: bool) -> tuple[int, int]:
    """Run (or resume) the experiment; (errored trials, unfinished trials) at its end, those
    that Tune had not added yet when it was stopped among the unfinished. A failed trial's
    error.pkl that Tune cannot read back as the run ends (empty, as a full storage leaves it)
    is a StorageError naming the folder and why."""
    with unfetched_metrics_unsaid():
        fitted = tuner(experiment, path, options, resume and tune.Tuner.can_restore(path))
        try:
            results = fitted.fit()
        except (EOFError, pickle.UnpicklingError) as err:
            raise StorageError(
                f"Tune could not read back the error of a failed trial in {path} "
                f"({type(err).__name__}: {err}): its error.pkl is cut short, as a full storage "
                "leaves it; once there is room, --resume retries the failed trials"
            ) from None
    trials = recorded_trials(path)
    unadded = max(trial_count(experiment, options.num_samples) - len(trials), 0)
    return len(results.errors), unadded + sum(trial.status in UNFINISHED for trial in trials)
