"""Ray Tune experiments: `python -m raydeq.tune EXPERIMENT [options] [key=value ...]`.

EXPERIMENT names `tune_configs/EXPERIMENT.yaml` (or is the path of such a file): a training
config plus a `search` section (`raydeq.experiments.spec`). Everything lands in
`storage/name`: the trial folders with their checkpoints (a trial of several workers keeps them
in its Train run, `<trial>/train`) and TensorBoard scalars (`<trial>/train/tensorboard`), and
at the end `results.parquet`, `results.md` and the plots. `--resume`
continues an interrupted experiment: finished trials are kept, running ones continue from their
last checkpoints and pending ones start.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
from collections.abc import Sequence
from contextlib import ExitStack

from raydeq.experiments import run
from raydeq.experiments import search as searchers
from raydeq.experiments.overrides import as_written
from raydeq.experiments.results import report, written
from raydeq.experiments.spec import (
    TRIAL_SETTINGS,
    Experiment,
    check_draws,
    check_repeats,
    expand,
    load,
    locate,
    set_by_each_trial,
    trial_count,
    trial_label,
)
from raydeq.training import data, launch, runlock
from raydeq.training.caller import process_kept
from raydeq.training.config import (
    SCHEDULERS,
    WORKERS_KEY,
    Config,
    ConfigError,
    ScalingSection,
    check_folder_name,
    parse_overrides,
    workers_named,
)
from raydeq.training.console import Progress, output_kept, tensorboard_command
from raydeq.training.interrupts import interruptible
from raydeq.training.preflight import check_run
from raydeq.training.storage import (
    CHECKPOINT_PREFIX,
    StorageError,
    absolute,
    check_storage,
    unparsed_uri,
)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
# Tune's log records that this command replaces, by logger and starts: on Ctrl-C Tune names its
# Python API ("Resume experiment with: Tuner.restore(...)") where this command prints the
# command that resumes, and at the end lists the trials that did not finish by Tune's names of
# them, where it says how many failed and the command that retries them; a failed trial's
# traceback (20 to 60 lines, each time it fails) stays in its error.txt, which the trial's own
# line names with the error.
DROPPED_LOGS = {
    "ray.tune.tune": ("Experiment has been interrupted", "Trials did not complete"),
    "ray.tune.execution.tune_controller": ("Trial task failed for trial",),
}
# Tune's logger of a failed save of the experiment's state into the storage, with a traceback.
STATE_SAVE_LOGGER = "ray.tune.execution.experiment_state"
# Ray's logger of a failed sync of the experiment's folder into the storage, its traceback in
# the message.
SYNC_LOGGER = "ray.train._internal.syncer"
# A trial's folder in its experiment's, as a dry run shows it: Tune names it as the trial starts.
UNNAMED_TRIAL = "<trial>"
# Flags that shape a new run; an experiment that has started keeps the ones it started with.
NEW_RUN_FLAGS = {
    "overrides": "key=value overrides",
    "num_samples": "--num-samples",
    "scheduler": "--scheduler",
    "workers_per_trial": "--workers-per-trial",
    "gpus_per_worker": "--gpus-per-worker",
    "max_concurrent_trials": "--max-concurrent-trials",
}
# The settings each flag sets, which a key=value override of the same setting would contradict.
FLAG_SETTINGS = {
    "storage": ("storage_path",),
    "num_samples": ("search.num_samples",),
    "scheduler": ("search.scheduler",),
    "max_concurrent_trials": ("search.max_concurrent_trials",),
    "workers_per_trial": ("search.workers_per_trial", WORKERS_KEY),
}


def pruned_before_the_interruption(record: logging.LogRecord) -> bool:
    """Whether a log record is Tune failing to delete a trial's checkpoint that is gone already.

    A resumed experiment's record of each trial's checkpoints is the one saved last, and the
    interrupted driver may have pruned some of them after that save (Tune saves it once a
    trial has written train.keep_checkpoints more). When the resumed trial prunes them again,
    Tune logs an error with a traceback for each, though nothing is lost: the checkpoint is
    recorded and the trial goes on."""
    error = record.exc_info[1] if record.exc_info else None
    return (
        isinstance(error, FileNotFoundError)
        and "Error handling checkpoint" in record.getMessage()
        and f"/{CHECKPOINT_PREFIX}" in str(error)
    )


def without_traceback(record: logging.LogRecord) -> bool:
    """Keep a log record of Tune's failed save of the experiment's state into the storage (a
    full disk) as one line, its exception's type and first line after its message, in place
    of the 20-line traceback that every later save repeats; the record is always kept."""
    error = record.exc_info[1] if record.exc_info else None
    if error is not None:
        said = str(error).splitlines()
        record.msg = f"{record.getMessage()}{type(error).__name__}: {said[0] if said else ''}"
        record.args, record.exc_info, record.exc_text = None, None, None
    return True


def traceback_in_one_line(record: logging.LogRecord) -> bool:
    """Keep a log record whose message is a line and a traceback (Ray's syncer's "Last sync
    command failed", the experiment's state unsaved on a full disk, 25 lines at each sync) as
    that line and the last exception's type and first line; the record is always kept."""
    said, _, trace = record.getMessage().partition("\n")
    lines = trace.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    if starts:
        error = next((line for line in lines[starts[-1] + 1 :] if line[:1] not in " "), "")
        record.msg, record.args = f"{said} {error}", None
    return True


def drop_tune_logs() -> None:
    """Filter out Tune's log records that this command replaces (DROPPED_LOGS), and its errors
    over checkpoints pruned before an interruption; its failed saves and syncs of the
    experiment's state are a line each (`without_traceback`, `traceback_in_one_line`)."""
    for name, starts in DROPPED_LOGS.items():
        logging.getLogger(name).addFilter(
            lambda record, starts=starts: not record.getMessage().startswith(starts)
        )
    logging.getLogger("ray.tune.execution.tune_controller").addFilter(
        lambda record: not pruned_before_the_interruption(record)
    )
    logging.getLogger(STATE_SAVE_LOGGER).addFilter(without_traceback)
    logging.getLogger(SYNC_LOGGER).addFilter(traceback_in_one_line)


def _parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m raydeq.tune",
        description=(
            "Run a Ray Tune experiment: the trials of a training config's search section, "
            "stored in STORAGE/NAME with their results."
        ),
        epilog=(
            "A default named by a key (search.num_samples) is the experiment file's setting, "
            "else the value after it. Exit status 2 for bad input, 1 for failed trials or "
            "results that could not be written, 130 when interrupted (once the trials have "
            "started, with the command that resumes)."
        ),
    )
    parser.add_argument(
        "experiment",
        metavar="EXPERIMENT",
        help="tune_configs/EXPERIMENT.yaml, or the path of such a file",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="key=value",
        help="settings of the base config, e.g. train.epochs=2; one of a key that the search "
        "varies fixes it",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        metavar="N",
        help="samples of the space, each running every variant and grid point (with a "
        "searcher: its trials) (default: search.num_samples, 1)",
    )
    parser.add_argument(
        "--scheduler", choices=SCHEDULERS, help="trial scheduler (default: search.scheduler, fifo)"
    )
    parser.add_argument(
        "--storage",
        metavar="PATH",
        help="folder or URI (s3://bucket/runs) that holds the experiment's folder (default: "
        "storage_path, runs)",
    )
    parser.add_argument(
        "--name",
        help="the experiment's folder in the storage: letters, digits, '.', '_', '-', "
        "starting with a letter or digit (default: the file's name)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted experiment with the settings it started with",
    )
    parser.add_argument(
        "--workers-per-trial",
        type=int,
        metavar="K",
        help=f"DDP workers per trial; sets {WORKERS_KEY} (default: search.workers_per_trial, "
        f"else {WORKERS_KEY}, 2)",
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        metavar="G",
        help="GPUs per worker, a fraction below 1 (one-worker trials share a GPU) or a whole "
        "number (default: 1 with scaling.device cuda, or auto where the cluster may have "
        "GPUs; else 0)",
    )
    parser.add_argument(
        "--max-concurrent-trials",
        type=int,
        metavar="N",
        help="most trials at once, fewer where the cluster's nodes hold fewer (default: "
        "search.max_concurrent_trials, else as many as they hold)",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="write and print the results of the experiment as it stands; runs nothing",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print every trial's resolved config as JSON lines and exit, without Ray",
    )
    return parser


def _check_flags(args: argparse.Namespace) -> None:
    """Raise a ConfigError for a count or a GPU share out of range on the command line, an
    experiment name that is no folder's name, an empty storage, --report with a flag that it
    would leave undone, or an override that a flag or each trial sets (`_check_overrides`)."""
    for given, flag in ((args.resume, "--resume"), (args.dry_run, "--dry-run")):
        if args.report and given:
            raise ConfigError(
                f"--report: not with {flag}; --report writes the results of the experiment as "
                "it stands and runs nothing, so give one of them"
            )
    if args.name is not None:
        check_folder_name("--name", args.name)
    if args.storage is not None and not args.storage.strip():
        raise ConfigError("--storage: empty; give a folder or a URI, or leave it out")
    gpus = args.gpus_per_worker
    if gpus is not None and not math.isfinite(gpus):
        # Ray takes no such share, and the run's stored options would refuse it on --resume.
        raise ConfigError(f"--gpus-per-worker: expected a finite number >= 0, got {gpus:g}")
    lowest = {
        "num_samples": 1,
        "max_concurrent_trials": 1,
        "workers_per_trial": 1,
        "gpus_per_worker": 0,
    }
    for option, least in lowest.items():
        value = getattr(args, option)
        if value is not None and value < least:
            flag = "--" + option.replace("_", "-")
            raise ConfigError(f"{flag}: must be >= {least}, got {value:g}")
    if gpus is not None and gpus > 1 and not gpus.is_integer():
        # Ray refuses a resource quantity above 1 that is not whole, in every trial.
        raise ConfigError(
            f"--gpus-per-worker: {gpus:g} is above 1 and not whole; give a fraction of one GPU "
            "(0.5: trials share it) or a whole number"
        )
    _check_overrides(args)


def _check_overrides(args: argparse.Namespace) -> None:
    """Raise a ConfigError naming a key=value override of a setting that a flag given too sets
    (the flag won unsaid: --storage a storage_path=b stored in a), or that each trial sets for
    itself (name=x, label=x changed nothing)."""
    overrides = parse_overrides(args.overrides)
    for key in TRIAL_SETTINGS:
        if key in overrides:
            raise set_by_each_trial(f"{key}={overrides[key]}", key, key)
    for option, keys in FLAG_SETTINGS.items():
        value = getattr(args, option)
        for key in keys:
            if value is not None and key in overrides:
                flag = "--" + option.replace("_", "-")
                raise ConfigError(
                    f"{flag} {value}: not with {key}={overrides[key]}, which sets the same; "
                    "give one of them",
                    key=key,
                )


def _path(args: argparse.Namespace, experiment: Experiment) -> str:
    """`storage/name` of the experiment; a ConfigError where the file's name, which names the
    experiment without --name, names no one folder inside the storage (`...yaml` would name the
    storage's parent), or one that a URI storage takes only percent-encoded; a StorageError
    where the storage is a URI that pyarrow cannot parse."""
    storage = absolute(args.storage or experiment.trial_config({}).storage_path)
    problem = unparsed_uri(storage)
    if problem:  # before anything is read there
        raise StorageError(f"storage_path {problem}")
    path = f"{storage.rstrip('/')}/{args.name or experiment.name}"
    if args.name is None:
        try:
            check_folder_name(f"{args.experiment}: experiment name", experiment.name, strict=False)
        except ConfigError as err:
            raise ConfigError(f"{err}; rename the file or give --name") from None
        if unparsed_uri(path):
            raise ConfigError(
                f"{args.experiment}: experiment name: {experiment.name!r} holds a space or a "
                f"non-ASCII character, which the URI storage {storage} takes only "
                "percent-encoded; rename the file or give --name"
            )
    return path


def _refuse_new_run_flags(args: argparse.Namespace) -> None:
    """Raise a ConfigError naming a flag that --resume or --report cannot honour."""
    mode = "--resume" if args.resume else "--report"
    for option, flag in NEW_RUN_FLAGS.items():
        if getattr(args, option) not in (None, []):  # --gpus-per-worker 0 is given too
            raise ConfigError(
                f"{mode}: {flag} cannot change an experiment that has started; drop it, or "
                "start a new experiment with another --name"
            )


def preflight(experiment: Experiment, num_samples: int | None = None) -> None:
    """Validate every trial's config, data folder and model before Ray starts, each distinct
    model and data section once, saying how far it has come."""
    check_repeats(experiment, num_samples)
    distinct: dict[str, Config] = {}
    for sampled in expand(experiment, num_samples):
        cfg = experiment.trial_config(sampled)
        distinct.setdefault(repr((cfg.model, cfg.data)), cfg)
    # Each check builds its model: the 24 imagenet trials took 176 s on 2 busy cores.
    what = f"checking the data and models of the trials of {experiment.name}"
    for cfg in Progress(what, len(distinct)).over(distinct.values()):
        check_run(cfg, storage=False)


def start(args: argparse.Namespace) -> tuple[Experiment, str, run.Options | None]:
    """Check everything that can be checked before Ray starts; (experiment, path, options of an
    experiment that has started, else None)."""
    _check_flags(args)
    if args.resume or args.report:
        _refuse_new_run_flags(args)
        # The file is read for its name and storage, the run's settings from its folder.
        path = _path(args, load(args.experiment, stored=True))
        if not run.has_settings(path):
            flag = "--resume" if args.resume else "--report"
            refuse_starting(path, flag)
            raise ConfigError(
                f"{path}: no experiment to resume or report there (one stopped before its "
                f"trials started has saved nothing); start it without {flag}"
            )
        experiment, options = run.load_settings(path)
        if args.resume:
            run.check_resumable(experiment, path)
        if args.dry_run:
            check_listable(experiment, path)
        return experiment, path, options
    experiment = load_experiment(args)
    points = len(experiment.search.variants) if experiment.searched else 0
    if args.num_samples is not None and args.num_samples < points:
        raise ConfigError(
            f"--num-samples: {args.num_samples} is fewer than the {points} variants the search "
            "evaluates first"
        )
    given = parse_overrides(args.overrides)
    chosen = args.scheduler is not None or "search.scheduler" in given
    run.check_scheduler(experiment, args.scheduler or experiment.search.scheduler, chosen, given)
    run.check_gpus(experiment, args.gpus_per_worker)
    path = _path(args, experiment)
    if args.dry_run:
        check_repeats(experiment, args.num_samples)
        return experiment, path, None
    refuse_started(path, runlock.holder(path))
    preflight(experiment, args.num_samples)
    check_storage(path)
    return experiment, path, None


def refuse_starting(path: str, flag: str) -> None:
    """Raise a ConfigError where a driver holds the experiment at `path` that has stored no
    settings yet (in its first seconds, its preflight and Ray's start), which `flag` (--resume,
    --report) cannot read: told to start it without the flag, the user was refused there."""
    running = runlock.holder(path)
    if running is None:
        return
    then = (
        "wait for it to end (or stop it)"
        if flag == "--resume"
        else "--report again once its trials have started"
    )
    raise ConfigError(
        f"{path}: {running} has just started this experiment and stored nothing yet; {then}"
    )


def load_experiment(args: argparse.Namespace) -> Experiment:
    """The experiment of a new run: its file, the overrides, and --workers-per-trial over the
    file's workers, named in an error it causes (a batch size it does not divide)."""
    workers = args.workers_per_trial
    if workers is None:
        return load(args.experiment, args.overrides)
    try:
        return load(args.experiment, [*args.overrides, f"{WORKERS_KEY}={workers}"])
    except ConfigError as err:
        raise workers_named(err, workers, f"--workers-per-trial {workers}") from None


def check_listable(experiment: Experiment, path: str) -> None:
    """Raise a ConfigError where the stored experiment at `path` has a space that checks added
    since it started refuse: --dry-run cannot draw its trials, though --resume goes on from
    Tune's own state of the search."""
    try:
        check_draws(experiment)
    except ConfigError as err:
        raise ConfigError(
            f"{path}: --dry-run cannot list the trials of this experiment, its stored search "
            f"space being refused since it started ({err}); --resume goes on from Tune's own "
            "state of the search, and --report summarises the trials so far"
        ) from None


def refuse_started(path: str, running: str | None = None) -> None:
    """Raise a ConfigError where an experiment was started at `path` already, naming the
    driver `running` it where one does (--resume would be refused while it runs)."""
    if not run.has_settings(path):
        return
    if running is not None:
        raise ConfigError(
            f"experiment {path} already exists and is being run by {running}; wait for it to "
            "end (or stop it), add --report to summarise it meanwhile, or choose another --name"
        )
    raise ConfigError(
        f"experiment {path} already exists; add --resume to continue it, --report to "
        "summarise it, or choose another --name"
    )


def new_options(args: argparse.Namespace, experiment: Experiment) -> run.Options:
    """GPUs, samples, scheduler and concurrency limit of a new run; the GPUs (unless given) and
    the trials at once follow the cluster, at every start and resume."""
    search = experiment.search
    return run.Options(
        gpus=args.gpus_per_worker,
        num_samples=args.num_samples or search.num_samples,
        scheduler=args.scheduler or search.scheduler,
        max_concurrent=args.max_concurrent_trials or search.max_concurrent_trials or 0,
    )


def point_notes(experiment: Experiment) -> list[str]:
    """A searcher's notes on its points' values outside the ranges of its space
    (`searchers.outside_notes`, naming them as written), said once before the trials start."""
    if not experiment.searched:
        return []
    notes = searchers.outside_notes(experiment.space(), experiment.search.searcher)
    return [as_written(note, experiment.places) for note in notes]


def unlearned_notes(experiment: Experiment, trials: int) -> list[str]:
    """A note where a searcher runs no trial drawn from results: all `trials` past the listed
    points fall within TPE's random start-up draws or NSGA-II's first generation, so the
    search is a random one."""
    search = experiment.search
    if not experiment.searched:
        return []
    first, points = searchers.first_learned(search), len(experiment.space().points)
    if not points < trials <= first:
        return []
    # A population of 2 or more (Optuna's least) within the trials makes a second generation.
    within = search.searcher == "nsga2" and trials > 2
    fewer = f", or search.population_size below {trials}" if within else ""
    return [
        f"note: {search.searcher} learns from results after its first {first} trials, and this "
        f"search runs {trials}, so it draws every trial at random; set search.num_samples "
        f"above {first}{fewer} for it to learn"
    ]


def dry_run(
    experiment: Experiment, num_samples: int | None, path: str, started: bool = False
) -> None:
    """Print each trial's label, the experiment's folder (where each trial gets a folder of its
    own, named by Tune when it starts: UNNAMED_TRIAL here) and the fully resolved training
    config the trial runs with, one JSON object a line (and a searcher's space, a dimension a
    line, on stderr, with `unlearned_notes` unless the search has `started`)."""
    trials = expand(experiment, num_samples)
    if experiment.searched:
        space = experiment.space()
        shown = searchers.lines(space)
        # The paper's points run as listed, also those past the searcher's first draws.
        learned = max(searchers.first_learned(experiment.search), len(space.points))
        if len(trials) > learned:
            shown.append(
                f"trials {learned + 1} to {len(trials)}: {experiment.search.searcher} draws them "
                "from the results of those before; listed here are random draws in their place"
            )
        shown += point_notes(experiment)
        if not started:  # a started search's trial count is the one it started with
            shown += unlearned_notes(experiment, len(trials))
        print("\n".join(shown), file=sys.stderr)
    lines = []  # every trial checked before the first is printed
    for sampled in trials:
        trial_dir = f"{path.rstrip('/')}/{UNNAMED_TRIAL}"
        cfg = run.trial_config(experiment, sampled, trial_dir, named=False)
        label = trial_label(experiment, sampled)
        config = {k: v for k, v in cfg.to_dict().items() if k != "search"}  # a trial has none
        lines.append(json.dumps({"label": label, "experiment": path, "config": config}))
    print("\n".join(lines))


def resume_command(args: argparse.Namespace, path: str) -> str:
    """The command that resumes this experiment at `path` (storage/name) from any folder: its
    file and storage absolute (a `storage_path=` override, which --resume refuses, given as
    --storage), since a relative one read from another folder would name no experiment."""
    # A name too (tune_configs/ is here); in a Ray job, as its working directory has it.
    experiment = launch.as_submitted(str(locate(args.experiment).resolve()))
    words = ["python", "-m", "raydeq.tune", experiment, "--resume"]
    words += ["--storage", path.rstrip("/").rsplit("/", 1)[0]]
    words += ["--name", args.name] if args.name else []
    return shlex.join(words)


def nothing_to_resume(
    args: argparse.Namespace, experiment: Experiment, path: str, options: run.Options | None
) -> bool:
    """Whether this is a --resume, not a --dry-run, of an experiment whose trials have all
    finished (`run.finished`, read without Ray): it only writes the results again."""
    return args.resume and not args.dry_run and run.finished(path, experiment, options)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (2 bad input, 1 failed trials or
    results that could not be written, 130 interrupted)."""
    try:
        args = _parser().parse_intermixed_args(argv)
    except SystemExit as stopped:  # --help, or a bad argument that argparse names on stderr
        return int(stopped.code or 0)
    with ExitStack() as held:
        held.enter_context(process_kept())
        held.enter_context(output_kept())
        held.enter_context(interruptible())
        try:
            experiment, path, options = start(args)
            ended = nothing_to_resume(args, experiment, path, options)
            if not (args.dry_run or args.report):
                if not ended:
                    launch.check_cluster()
                    launch.check_kept(path)
                    run.check_pending_limit()
                left = held.enter_context(runlock.hold(path))
                if left:
                    print(f"note: {left}", file=sys.stderr)
                if options is None:  # another start may have run it during the preflight
                    refuse_started(path)
        except (ConfigError, data.DataError, StorageError) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:  # in the preflight, which may list a large data folder
            print("\ninterrupted before the trials started", file=sys.stderr)
            return EXIT_INTERRUPTED
        if ended:
            print(
                f"note: every trial of {path} has finished; its results are written again",
                file=sys.stderr,
            )
            return write_results(path, experiment, errors=0)
        return run_experiment(args, experiment, path, options)


def report_while_running(path: str) -> str:
    """How --report names the trials that have not ended: "running" (with a note on stderr)
    while a driver runs the experiment, else "stopped"."""
    running = runlock.holder(path)
    if running is None:
        return "stopped"
    print(
        f"note: {path} is still being run by {running}: its unfinished trials "
        "are counted as running, and the run writes its results again when it ends",
        file=sys.stderr,
    )
    return "running"


def run_experiment(
    args: argparse.Namespace, experiment: Experiment, path: str, options: run.Options | None
) -> int:
    """Dry-run, report, start or resume the experiment of checked arguments; returns the exit
    status."""
    if args.dry_run:
        samples = options.num_samples if options is not None else args.num_samples
        return dry_run_command(experiment, samples, path, started=options is not None)
    if args.report:
        return report_command(experiment, path)
    return launch_experiment(args, experiment, path, options)


def dry_run_command(
    experiment: Experiment, num_samples: int | None, path: str, started: bool = False
) -> int:
    """List the trials of `--dry-run` on stdout (`started`: of a --resume); returns the exit
    status."""
    try:
        dry_run(experiment, num_samples, path, started)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # a search's long listing, which stores nothing
        print("\ninterrupted while listing the trials", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def report_command(experiment: Experiment, path: str) -> int:
    """Rebuild and print the results of `--report` from the trials' reports; returns the exit
    status."""
    try:
        print(report(path, experiment, unfinished=report_while_running(path)))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return results_interrupted(path)
    return 0


def launch_experiment(
    args: argparse.Namespace, experiment: Experiment, path: str, options: run.Options | None
) -> int:
    """Start the experiment on Ray (or resume it, with its stored `options`), run its trials
    and write its results; returns the exit status."""
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # no second TensorBoard stream
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # with verbose=0: no tables, the trial lines only
    # Tune saves the experiment's state whenever a trial has written keep_checkpoints
    # checkpoints since the last save, so that the state never names a deleted checkpoint, and
    # warns in five lines each time two saves come within 5 s: eleven times in `tune digits`,
    # for a 240 kB file. Its warning for a save that takes over 30 s stays.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    drop_tune_logs()
    try:
        own = launch.connect(log_to_driver=False)
    except ConfigError as err:  # an environment Ray cannot start in
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\ninterrupted while Ray started; nothing ran yet", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        fresh = options is None
        if fresh:
            options = new_options(args, experiment)
        # Before the settings are stored: the same command may then run again.
        workers = run.trial_workers(experiment, options.gpus)
        notes = placement_notes(args, own, *workers, experiment.trial_config({}).scaling)
        if fresh:
            notes += point_notes(experiment)
            notes += unlearned_notes(experiment, trial_count(experiment, options.num_samples))
        for note in notes:
            print(note, file=sys.stderr, flush=True)
        if options.scheduler == "asha":
            run.check_dashboard()
        if fresh:
            run.save_settings(path, experiment, options)
    except (ConfigError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # in the ASHA check, which may wait 30 s for the dashboard
        print("\ninterrupted before the trials started", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(tensorboard_command(path), flush=True)
    try:
        errors, unfinished = run.fit(experiment, path, options, args.resume)
    except KeyboardInterrupt:
        errors, unfinished = 0, 1
    except StorageError as err:  # Tune's record or an error file, read at the end, is damaged
        print(f"error: {err}", file=sys.stderr)
        return 1
    if unfinished:
        print(f"interrupted; resume with: {resume_command(args, path)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    status = write_results(path, experiment, errors)
    if errors and status != EXIT_INTERRUPTED:
        print(
            f"failed trials: {errors}, each named above with its error; --resume retries them "
            f"from their last checkpoints: {resume_command(args, path)}",
            file=sys.stderr,
        )
    return status


def placement_notes(
    args: argparse.Namespace,
    own: bool,
    workers: int,
    need: dict[str, float],
    scaling: ScalingSection,
) -> list[str]:
    """`launch.check_placement` of a trial's workers (of `scaling`), its error naming
    --workers-per-trial and --gpus-per-worker where those flags set them: on a machine without
    a GPU the flag is left out (or given 0), and with scaling.device cuda, which asks a GPU
    without it and refuses 0, the device is set to cpu too."""
    gpus, gpu_fix = args.gpus_per_worker, None
    if gpus is not None:
        flag = f"--gpus-per-worker {gpus:g}"
        gpu_fix = f"leave out {flag} (or give 0)"
        if scaling.device == "cuda":
            gpu_fix = f"set scaling.device=cpu and leave out {flag}"
    try:
        return launch.check_placement(
            own, workers, need, "a trial's", scaling.cpus_per_worker, gpu_fix
        )
    except ConfigError as err:
        if args.workers_per_trial is None:
            raise
        given = f"--workers-per-trial {args.workers_per_trial}"
        raise workers_named(err, args.workers_per_trial, given) from None


def write_results(path: str, experiment: Experiment, errors: int) -> int:
    """Write and print the results of the experiment at `path` whose trials have all ended,
    `errors` of them failed; returns the exit status (1 for failed trials or results that could
    not be written)."""
    try:
        print(report(path, experiment))
    except StorageError as err:
        print(
            f"error: {err}; the trials' reports are kept: --report writes the results from them",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return results_interrupted(path)
    print(f"results in {path}: {', '.join(written(path, experiment))}")
    return 1 if errors else 0


def results_interrupted(path: str) -> int:
    """Say that Ctrl-C stopped the writing of the results of the experiment at `path`, which
    writes each file beside it and renames it into place; returns the exit status."""
    print(
        f"\ninterrupted while writing the results of {path}; each file is whole, old or new: "
        "--report writes them all again",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
