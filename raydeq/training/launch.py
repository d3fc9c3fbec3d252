"""The one place that connects to Ray and builds Ray Train's ScalingConfig, RunConfig and
TorchTrainer, for `raydeq.train` and for every Ray Tune trial alike.

This module stays light: Ray Train's controller and each Tune trial import it to unpickle
`train_loop`, and only the training workers import the loop, its models and its data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import ray._common.utils
import ray._private.services
import ray._private.utils
import ray.train
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
from ray._private.runtime_env.packaging import get_local_dir_from_uri
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.constants import V2_ENABLED_ENV_VAR, is_v2_enabled
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.train.v2._internal.execution.worker_group.poll import WorkerGroupPollStatus
from ray.train.v2.api.exceptions import ControllerError

from raydeq.training import capacity
from raydeq.training.config import WORKERS_KEY, Config, ConfigError, validate
from raydeq.training.console import first_line
from raydeq.training.errors import Recurring
from raydeq.training.interrupts import handlers_kept
from raydeq.training.storage import CHECKPOINT_PREFIX, filesystem, local_path, subfolders

# Ray's own INFO lines (per-report "Reporting training result", trial tables) are not shown;
# the run's progress lines and warnings are.
RAY_LOG_LEVEL = "WARNING"


# Ray Train's controller takes a worker's report when it polls the workers, every 2 s by
# default, and a worker that reports again before that waits for it: with a report every few
# steps that wait was most of a small trial's time. 0.2 s keeps it short at little cost.
# Ray Train's v2 API is the one raydeq runs on: its processes get it on a cluster whose nodes
# were started with the v1 API turned on for other jobs.
ENV_VARS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", V2_ENABLED_ENV_VAR: "1"}
# On a Ray of the run's own, one machine: Ray Train's preemption watcher (a process that polls
# the nodes for a cloud's notice that a spot node will be taken) has no node to lose but the
# one it runs on, and each run printed Ray's core error line about its actor's arguments.
LOCAL_ENV_VARS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


# The variable that turns the colour of Ray's prefix on forwarded worker lines off ("0").
COLOR_PREFIX = "RAY_COLOR_PREFIX"
# The variable that names a Ray's state API (its dashboard's URL); Ray's state API client reads
# it before RAY_ADDRESS.
API_SERVER = "RAY_API_SERVER_ADDRESS"
# Rays of the run's own started, each on a port found free, until one's dashboard binds its port.
DASHBOARD_TRIES = 3
# Ray's loggers of its notice that it enabled token authentication, and of a Ray Train
# worker's exception with its traceback.
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
TRAIN_FN_LOGGER = "ray.train.v2._internal.util"
# The loggers whose level or filters show_warnings_and_progress sets, in this order (root's
# name is "").
WORKER_LOGGERS = ("", "raydeq", TRAIN_FN_LOGGER)
# The line a traceback ends with, `package.module.Error: message`.
QUALIFIED_ERROR = re.compile(r"^(?P<module>(?:\w+\.)+)(?P<error>\w+: .*)$")
log = logging.getLogger("raydeq")


def runtime_env(local: bool = False) -> dict[str, Any]:
    """The job's runtime environment: ENV_VARS (and LOCAL_ENV_VARS on a `local` Ray of the
    run's own) unless set here, and a given RAY_ADDRESS and RAY_API_SERVER_ADDRESS.

    Both are handed on to every process: Ray Train's placement-group cleaner finds the state
    API by them, and where several Ray clusters run on one machine it cannot guess (a trial
    that ASHA stops would keep its workers' resources for good).
    """
    defaults = ENV_VARS | LOCAL_ENV_VARS if local else ENV_VARS
    env_vars = {key: os.environ.get(key, value) for key, value in defaults.items()}
    address = os.environ.get("RAY_ADDRESS", "")
    if address not in ("", "auto", "local"):
        env_vars["RAY_ADDRESS"] = address
    if API_SERVER in os.environ:
        env_vars[API_SERVER] = os.environ[API_SERVER]
    return {"env_vars": env_vars}


def connect(log_to_driver: bool = True) -> bool:
    """Join the cluster RAY_ADDRESS names or the one `ray start` runs here (the head node of
    `ray up`), else (or with RAY_ADDRESS=local) start a local one of this run's own; returns
    whether it started one.

    Never address="auto": it also joins a local Ray that another run's driver started, and
    that Ray ends with that driver. A second `python -m raydeq.tune` started beside a first
    one lost every running trial when the first one finished.
    Without `log_to_driver` the workers' output stays in Ray's log files (Tune runs print
    their progress from the reports instead).
    """
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"logging_level": RAY_LOG_LEVEL, "log_to_driver": log_to_driver}
    given = os.environ.get("RAY_ADDRESS") or None  # set empty, Ray takes it as unset
    # RAY_ADDRESS=local starts a Ray of its own, as no address and no `ray start` here do.
    own = given == "local" or (given is None and ray._private.utils.read_ray_address() is None)
    if own:
        # Ray starts a local cluster with token authentication and says so in a warning on
        # every start; the setting stays, the line goes.
        logging.getLogger(AUTH_LOGGER).addFilter(
            lambda record: not record.getMessage().startswith("Token authentication is enabled")
        )
    if not all(stream is not None and stream.isatty() for stream in (sys.stdout, sys.stderr)):
        # Ray wraps each forwarded worker line's "(RayTrainWorker pid=...)" in colour codes
        # whether or not a terminal shows them; in a log file they are noise.
        os.environ.setdefault(COLOR_PREFIX, "0")
    with handlers_kept():  # ray.init's SIGTERM handler aborts; the commands stop as on Ctrl-C
        for tries_left in reversed(range(DASHBOARD_TRIES)):
            if own:
                # A Ray of this run's own. Its processes, this driver included, find the state
                # API (the ASHA check here, Ray Train's placement-group cleaner) by looking for
                # the one Ray on this machine, and fail where another run's Ray runs too: name
                # its dashboard.
                port = free_port()
                options["dashboard_port"] = port
                os.environ[API_SERVER] = f"http://127.0.0.1:{port}"
            try:
                context = ray.init(**options, runtime_env=runtime_env(local=own))
            except (OSError, UnicodeError) as err:
                ray.shutdown()
                raise ConfigError(start_error(err)) from None
            # A port found free may be taken before the dashboard binds it; Ray then starts
            # without one (dashboard_url None), and the state API named above never answers.
            if not own or context.dashboard_url is not None or not tries_left:
                break
            ray.shutdown()
    return own


def start_error(err: OSError | UnicodeError) -> str:
    """One line saying why Ray could not start in this environment and what to set, where
    ray.init ends in a traceback: a HOME it cannot write its token into (~/.ray), a temporary
    folder it cannot write, one whose socket paths exceed Ray's limit (107 bytes, on macOS 103)
    or that is not ASCII. Ray reads TMPDIR on Linux alone (on macOS RAY_TMPDIR, else /tmp)."""
    temp = ray._common.utils.get_default_ray_temp_dir()
    variables = "RAY_TMPDIR (or TMPDIR)" if sys.platform.startswith("linux") else "RAY_TMPDIR"
    fix = f"set {variables} to a folder you can write"
    if not temp.isascii():
        return f"Ray cannot start: its temporary folder {temp} is not ASCII; {fix} in ASCII"
    reason = first_line(err)
    if isinstance(err, OSError) and err.filename is not None:
        file = Path(os.fsdecode(err.filename))
        reason = f"{file}: {err.strerror}"
        if file.is_relative_to(Path.home() / ".ray"):
            return (
                f"Ray cannot start: it keeps its token in ~/.ray, and {reason}; set HOME to a "
                "folder you can write, or RAY_AUTH_TOKEN_PATH to a file that holds a token"
            )
        if file.is_relative_to(temp) or Path(temp).is_relative_to(file):
            return f"Ray cannot start: {reason} (its temporary folder); {fix}"
    if "AF_UNIX path length" in reason:
        limit = re.search(r"exceed (\d+) bytes", reason)
        return (
            f"Ray cannot start: the socket paths in its temporary folder {temp} exceed "
            f"{limit[1] if limit else 107} bytes; {fix} with a shorter path"
        )
    return f"Ray cannot start: {reason}"


def check_fits(workers: int, need: Mapping[str, float], gpu_fix: str | None = None) -> None:
    """Raise a ConfigError unless `workers` workers needing `need` each fit on this machine's
    Ray, a Ray of the run's own that no node joins: Ray Train would wait for them for a minute,
    then fail and start waiting again, as many times as scaling.max_failures allows.
    `gpu_fix`: what to change where the machine has no GPU (else set scaling.device=cpu)."""
    slots = capacity.worker_slots(need)
    if slots >= workers:
        return
    have = {key: ray.cluster_resources().get(key, 0) for key in need}
    if have.get("GPU", 1) == 0:
        fix = gpu_fix or "set scaling.device=cpu"
    elif have["CPU"] < need["CPU"]:  # no number of workers fits: one alone does not
        fix = "lower scaling.cpus_per_worker"
    elif have.get("GPU", 0) < need.get("GPU", 0):  # only raydeq.tune asks more than 1 a worker
        fix = "lower --gpus-per-worker"
    else:
        fix = f"give at most {slots}"
    raise ConfigError(
        f"{WORKERS_KEY}={workers} with {amounts(need)} per worker does not fit on this "
        f"machine ({amounts(have)}), which holds {slots} such workers; {fix}, or run on a "
        "cluster (RAY_ADDRESS, or `ray start`)"
    )


def check_placement(
    own: bool,
    workers: int,
    need: Mapping[str, float],
    whose: str,
    cpus_per_worker: float,
    gpu_fix: str | None = None,
) -> list[str]:
    """Before `workers` workers needing `need` each (`whose`: "the run's", "a trial's") are
    placed: a ConfigError where they do not fit on a Ray of this process's `own` (check_fits,
    with `gpu_fix`), else the notes to print, that they wait on a cluster other jobs hold
    (waiting_note) and that OMP_NUM_THREADS gives each more threads than its CPUs
    (threads_note)."""
    if own:
        check_fits(workers, need, gpu_fix)
    notes = [None if own else waiting_note(workers, need, whose), threads_note(cpus_per_worker)]
    return [note for note in notes if note]


def waiting_note(workers: int, need: Mapping[str, float], whose: str) -> str | None:
    """A note where the nodes alive hold `workers` workers needing `need` each (`whose`: "the
    run's", "a trial's") but other jobs hold what they need now: Ray Tune waits for them
    without a word, and Ray Train with a traceback a minute. None where they fit, or where
    they wait for nodes that can hold them (an autoscaler's)."""
    free = capacity.slots_now(need, free=True)
    if free >= workers or capacity.slots_now(need) < workers:
        return None
    total = {key: ray.cluster_resources().get(key, 0) for key in need}
    needs = f"{workers} workers need {amounts(need)} each" if workers > 1 else "worker needs"
    needs += "" if workers > 1 else f" {amounts(need)}"
    fit = f"only {free} fits" if free == 1 else f"only {free} fit" if free else "none fits"
    return (
        f"note: {whose} {needs}, and other jobs hold so much of the cluster's {amounts(total)} "
        f"that {fit} now; it waits until they free it (`ray status` shows what is in use)"
    )


def threads_note(cpus_per_worker: float) -> str | None:
    """A note where OMP_NUM_THREADS, which Ray hands on to every worker, gives a worker more
    threads than Ray would give it (the whole CPUs it holds, at least 1; `ray exec` exports 1),
    or is no count (libgomp then takes every core): on 2 CPUs, digits trained at 150 img/s
    with 8 and 110 with 2, against 1,900 without it. A list (`1,1`, one count per nesting
    level) gives the first level's count."""
    value = os.environ.get("OMP_NUM_THREADS")
    first = "" if value is None else value.split(",")[0].strip()
    threads = int(first) if first.isdecimal() else 0
    if value is None or 0 < threads <= ray_threads(cpus_per_worker):
        return None
    runs = f"runs {threads} threads" if threads else "is no thread count, so libgomp runs one"
    runs += "" if threads else " thread per core"
    return (
        f"note: OMP_NUM_THREADS={value} {runs} in each worker, which holds "
        f"{cpus_per_worker:g} CPU (scaling.cpus_per_worker), and workers that share cores "
        "wait on each other's threads; unset it, and Ray gives each worker as many threads "
        "as the CPUs it holds"
    )


def ray_threads(cpus: float) -> int:
    """The threads Ray gives a worker that holds `cpus` CPUs where OMP_NUM_THREADS is unset:
    its whole CPUs, at least 1."""
    return max(math.floor(cpus), 1)


def trial_threads(cpus_per_worker: float) -> int | None:
    """The threads of a Tune trial's Train workers, decided where the run starts: as many as
    `ray_threads(cpus_per_worker)`, though the trial's driver takes its CPU out of their share
    (Ray gave workers of 2 CPUs 1 thread); None where OMP_NUM_THREADS is set here, which Ray
    hands on to them (`threads_note`)."""
    return None if "OMP_NUM_THREADS" in os.environ else ray_threads(cpus_per_worker)


def amounts(resources: Mapping[str, float]) -> str:
    """Resources as "1 CPU, 1 GPU"."""
    return ", ".join(f"{amount:g} {name}" for name, amount in resources.items())


def check_cluster() -> None:
    """Raise a ConfigError when the Ray that connect would use cannot run the job: the
    environment turns Ray Train's v2 API off, RAY_ADDRESS names a dashboard (ray.init raised in
    a traceback) or, as `auto`, finds no single Ray here (`auto_address`), or the cluster does
    not answer, where Ray retries a dead address for minutes (a `ray start` that ended without
    `ray stop` leaves its address behind)."""
    if not is_v2_enabled():  # ray.train then lacks LoggingConfig, and the run failed importing it
        raise ConfigError(
            f"{V2_ENABLED_ENV_VAR}={os.environ[V2_ENABLED_ENV_VAR]} turns off Ray Train's v2 API, "
            f"which raydeq runs on; unset {V2_ENABLED_ENV_VAR}, or set it to 1"
        )
    given = os.environ.get("RAY_ADDRESS", "")
    if given.startswith(("http://", "https://")):
        raise ConfigError(
            f"RAY_ADDRESS={given} is a dashboard's address, which `ray job submit` takes, where "
            "a run joins a cluster at its GCS address (host:6379, as `ray start --head` prints "
            f"it); submit the command with `ray job submit --address {given} -- python -m ...`, "
            "or set RAY_ADDRESS to the GCS address, or unset it"
        )
    if given == "auto":
        given = auto_address()
    address = given or ray._private.utils.read_ray_address()
    if not address or "://" in address or address == "local":
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
    except (OSError, ValueError):
        if given:
            raise ConfigError(
                f"no Ray answers at {address} (RAY_ADDRESS); start that cluster, or set "
                "RAY_ADDRESS to a running one"
            ) from None
        file = ray._private.utils.get_ray_address_file(None)
        raise ConfigError(
            f"no Ray answers at {address}, named by {file} (a `ray start` that ended without "
            "`ray stop` leaves it); start that cluster again, or delete the file"
        ) from None


def job_folder() -> str | None:
    """The folder that Ray unpacked the working directory of the Ray job that runs this command
    into (`ray job submit --working-dir`), None outside one: the PYTHONPATH entry Ray names
    after the working directory's package, where the job starts, else the current folder (an
    entrypoint that changes folder first, `cd DIR && python -m ...`, runs outside it). Ray
    deletes that copy with the job's files, and the next job of the same directory gets
    another."""
    job = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    uri = (job.get("runtime_env") or {}).get("working_dir")
    if not uri:
        return None
    name = get_local_dir_from_uri(uri, os.sep).name
    entries = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return next((entry for entry in entries if entry and Path(entry).name == name), os.getcwd())


def check_kept(storage: str) -> None:
    """Raise a ConfigError where the run's storage lies in the copy of a Ray job's working
    directory (a relative storage_path, `runs` by default, read in it): the runs stored there
    go with the copy, and the command submitted again finds none to resume."""
    copy, folder = job_folder(), local_path(storage)
    if copy is None or folder is None or in_copy(folder, copy) is None:
        return
    raise ConfigError(
        f"storage {folder} lies in {copy}, Ray's copy of this job's working directory, which "
        "Ray deletes with the job's files; give an absolute storage folder outside it "
        "(storage_path=..., or --storage for raydeq.tune), such as one on a shared disk"
    )


def as_submitted(path: str) -> str:
    """`path` as a command submitted again with the same working directory names it: relative
    to the Ray job's copy of it where it lies there, else as it is."""
    copy = job_folder()
    inside = None if copy is None else in_copy(path, copy)
    return path if inside is None else inside


def in_copy(path: str, copy: str) -> str | None:
    """`path` relative to the job's copy `copy` where it lies there, else None; the copy is
    taken by its name and by its real path, since the job's current folder reads as the latter
    (on macOS Ray unpacks it under /tmp, a link to /private/tmp)."""
    path = os.path.abspath(path)
    for base in dict.fromkeys([copy, os.path.realpath(copy)]):
        if os.path.commonpath([base, path]) == base:
            return os.path.relpath(path, base)
    return None


def auto_address() -> str:
    """The cluster that RAY_ADDRESS=auto joins: the one `ray start` ran here last, else the one
    Ray that runs on this machine; a ConfigError where none runs, or several and no `ray start`
    names one, where Ray joins any of them (a Ray that a run started ends with that run)."""
    started = ray._private.utils.read_ray_address()
    running = sorted(set(ray._private.services.find_gcs_addresses()))
    if started or len(running) == 1:
        return started or running[0]
    fix = "set RAY_ADDRESS to the cluster's address (host:port), or unset it to start a Ray of "
    if not running:
        raise ConfigError(f"RAY_ADDRESS=auto: no Ray runs on this machine; {fix}the run's own")
    raise ConfigError(
        f"RAY_ADDRESS=auto: {len(running)} Rays run on this machine ({', '.join(running)}) and "
        f"no `ray start` names one, so the run would join either, and a Ray that another run "
        f"started ends with it; {fix}the run's own"
    )


def free_port() -> int:
    """A TCP port that nothing listens on now, from the operating system."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: validate the config dict and run the loop."""
    from raydeq.training.loop import Loop  # in the workers only (see the module docstring)
    from raydeq.training.session import TrainWorker

    show_warnings_and_progress()
    cfg = validate(config)
    try:
        Loop(cfg, TrainWorker(cfg.run_dir)).run()
    except Exception as err:
        if type(err).__module__.startswith("raydeq."):
            log.error("%s: %s", type(err).__name__, err)  # one line where Ray logs a traceback
        raise


def own_error(traceback: str) -> str | None:
    """`Error: message` when a traceback ends in one of raydeq's own errors, which explain
    themselves (a run that diverged, a missing data folder, an unreadable checkpoint); else
    None."""
    lines = [line.strip() for line in traceback.splitlines() if line.strip()]
    match = QUALIFIED_ERROR.match(lines[-1]) if lines else None
    return match["error"] if match and match["module"].startswith("raydeq.") else None


def show_warnings_and_progress() -> None:
    """Let a worker log raydeq's progress lines and every logger's warnings, nothing else, and
    raydeq's own errors as the one line train_loop logs instead of Ray Train's traceback.

    Ray Train sets a worker's root logger to INFO and filters by RAY_LOG_LEVEL only the
    loggers under `ray.train`; the one that reports results is named by its file instead, so
    every report printed a line per worker with the whole metrics dict in it.
    """
    root, own, train_fn = (logging.getLogger(name) for name in WORKER_LOGGERS)
    root.setLevel(logging.WARNING)
    own.setLevel(logging.INFO)
    train_fn.addFilter(lambda record: not own_error(record.getMessage()))


def gpus_per_worker(cfg: Config) -> float:
    """One GPU per worker when the config asks for CUDA or, with `auto`, the cluster has or may
    start GPU nodes (the autoscaler's node types: the workers then wait for one to join)."""
    if cfg.scaling.device == "cpu":
        return 0.0
    return 1.0 if cfg.scaling.device == "cuda" or capacity.can_have("GPU") else 0.0


def scaling_config(cfg: Config, gpus: float, reserve_cpu: float = 0.0) -> ScalingConfig:
    """The run's workers; `reserve_cpu` (a Tune trial's own driver) comes out of their share."""
    workers = cfg.scaling.num_workers
    cpus = cfg.scaling.cpus_per_worker
    if reserve_cpu:
        cpus = max(cpus - reserve_cpu / workers, reserve_cpu)
    resources = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
    return ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources)


class NoRestart(WorkerGroupCallback):
    """Ray Train's restarts (scaling.max_failures) left out where a worker raised an error that
    a restart meets again (`Recurring`: no checkpoint readable, a divergence on record, a data
    folder missing): each took a Ray Train start to print the same error. Ray Train's failure
    policy restarts a run for a worker's error and ends it for its controller's, so that error
    ends the run as the controller's, with the workers' errors as Ray Train states them; a
    worker lost or killed, a download that failed, and any other error, is restarted as
    before."""

    def after_worker_group_poll_status(self, worker_group_status: WorkerGroupPollStatus) -> None:
        """Raise a ControllerError where a worker's error is `Recurring` and recurs."""
        errors = worker_group_status.errors.values()
        if any(isinstance(err, Recurring) and err.recurs for err in errors):
            raise ControllerError(worker_group_status.get_worker_group_error())


def trainer(
    cfg: Config,
    scaling: ScalingConfig,
    callbacks: Sequence[Any] = (),
    train_fn: Callable[[dict[str, Any]], None] = train_loop,
    threads: int | None = None,
) -> TorchTrainer:
    """The TorchTrainer of a run: `storage_path/name`, checkpoints kept, restarts allowed but
    for errors that recur (`NoRestart`); its workers run `threads` threads where given, else as
    many as Ray gives them."""
    env = {"env_vars": {"OMP_NUM_THREADS": str(threads)}} if threads else None
    return TorchTrainer(
        train_fn,
        train_loop_config=cfg.to_dict(),
        scaling_config=scaling,
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            callbacks=[*callbacks, NoRestart()],
            # Ray Train's v1 API lacks it, so it is looked up here: check_cluster names that.
            logging_config=ray.train.LoggingConfig(log_level=RAY_LOG_LEVEL),
            worker_runtime_env=env,
        ),
    )


def fit(
    cfg: Config,
    scaling: ScalingConfig | None = None,
    train_fn: Callable[[dict[str, Any]], None] = train_loop,
    callbacks: Sequence[Any] = (),
    threads: int | None = None,
) -> Result:
    """Train or resume the run on Ray Train (`scaling`, `train_fn`, `threads`: other workers,
    loop or threads per worker); once it has finished, the checkpoints Ray Train kept no record
    of are deleted (see `drop_unrecorded_checkpoints`)."""
    scaling = scaling or scaling_config(cfg, gpus_per_worker(cfg))
    with loggers_kept(WORKER_LOGGERS):
        result = trainer(cfg, scaling, callbacks, train_fn, threads).fit()
    drop_unrecorded_checkpoints(result, cfg.run_dir)
    return result


@contextlib.contextmanager
def loggers_kept(names: Sequence[str]) -> Iterator[None]:
    """Put the named loggers' levels and filters back on exit: with num_workers=0 Ray Train
    runs train_fn in this process, where show_warnings_and_progress sets them for a worker."""
    loggers = [logging.getLogger(name) for name in names]
    kept = [(logger.level, list(logger.filters)) for logger in loggers]
    try:
        yield
    finally:
        for logger, (level, filters) in zip(loggers, kept, strict=True):
            logger.setLevel(level)
            logger.filters = filters


def drop_unrecorded_checkpoints(result: Result, run_dir: str) -> list[str]:
    """Delete the checkpoint folders in the folder (path or URI) of a finished run that are
    not among those Ray Train kept, and return their names.

    A driver stopped by Ctrl-C had not saved Ray Train's record of its last checkpoints, so
    Ray Train never pruned them (train.keep_checkpoints): an interrupted run kept up to that
    many more on every resume. Done only once the run has finished, since Ray Train raises
    deleting a checkpoint it recorded whose folder is gone; nothing is deleted where it kept
    none."""
    kept = {c.path.rstrip("/").rsplit("/", 1)[-1] for c, _ in result.best_checkpoints or ()}
    if not kept:
        return []
    stale = [p for p in subfolders(run_dir, CHECKPOINT_PREFIX) if p.rsplit("/", 1)[-1] not in kept]
    fs = filesystem(run_dir)[0]
    for path in stale:
        fs.delete_dir(path)
    return [p.rsplit("/", 1)[-1] for p in stale]
