"""One training run on Ray Train: `python -m raydeq.train CONFIG.yaml [key=value ...]`.

The config is validated, the data folder and the storage folder are checked, and only then does
Ray start (or is joined, when a cluster runs). Each worker trains the model with DDP, rank 0
writes TensorBoard scalars under `storage_path/name/tensorboard`, and every worker reports its
metrics to Ray Train, with a checkpoint every `train.checkpoint_every` steps and at each epoch
end. Running the same command again (same `name` and `storage_path`) resumes from the newest
readable checkpoint, or says that the run had finished and trains nothing; a worker that dies
is restarted from it (`scaling.max_failures`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import yaml

from raydeq.training import data, runlock
from raydeq.training.caller import process_kept
from raydeq.training.checkpoint import final_report, newest_first
from raydeq.training.config import (
    SECTIONS,
    Config,
    ConfigError,
    check_given,
    given_settings,
    leaves,
    load,
    load_yaml,
    parse_override,
    parse_overrides,
)
from raydeq.training.console import output_kept, tensorboard_command
from raydeq.training.interrupts import interruptible
from raydeq.training.preflight import check_run
from raydeq.training.storage import CHECKPOINT_PREFIX, StorageError, filesystem, subfolders

# Ray, and the experiments module that finds a shipped file, are imported once the arguments
# are read: --help starts without them.

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def config_file(path: str) -> str:
    """`path`, or where it is missing the experiment file it names as `raydeq.tune` finds it:
    an experiment's name (`digits`: tune_configs/digits.yaml here, else the shipped file) or a
    `tune_configs/NAME.yaml` missing from here (the shipped file)."""
    from raydeq.experiments.spec import locate

    if path.strip() and Path(path).exists():  # Path("") is the current folder
        return path
    try:
        return str(locate(path))
    except ConfigError:  # read as given, which names the file that is missing
        if not path.strip():  # nothing to read as given: Path("") is the current folder
            raise
        return path


def summary(metrics: Mapping[str, Any], cfg: Config) -> str:
    """The final line of a run's last report: test accuracy, steps and run folder."""
    return (
        f"test_accuracy={metrics.get('test_accuracy', math.nan):.4f} "
        f"steps={metrics.get('step', 0)} run={cfg.run_dir}"
    )


def resume_command(cfg: Config, argv: Sequence[str]) -> str:
    """The command that resumes the run from any folder: its config file's absolute path, its
    overrides, and the run's name and absolute storage and data folders in place of any given,
    since a config file edited since, or a relative path read from another folder, would
    otherwise name another run, started from step 0, or other data (with them, settings that
    change the model are refused, naming them). In a Ray job, the paths in its working
    directory are relative to it, as the same command submitted again finds them."""
    from raydeq.training import launch

    config, *overrides = argv
    folders = {"data.data_dir": cfg.data.data_dir, "data.stage_to": cfg.data.stage_to}
    folders = {key: folder and launch.as_submitted(folder) for key, folder in folders.items()}
    pinned = {"name": cfg.name, "storage_path": cfg.storage_path, **folders}
    kept = unpinned(overrides, set(pinned))
    # A folder given as null (data.data_dir=null over the file's) is given as null again.
    given = {key for word in overrides for key in override_keys(word)}
    added = [
        f"{key}={'null' if value is None else as_yaml(value)}"
        for key, value in pinned.items()
        if value is not None or key in given
    ]
    read = config_file(config)  # a shipped file where tune_configs/NAME.yaml is not here
    config = launch.as_submitted(os.path.abspath(read)) if os.path.isfile(read) else config
    return shlex.join(["python", "-m", "raydeq.train", config, *kept, *added])


def override_keys(word: str) -> set[str]:
    """The dotted keys a `key=value` override sets: a section's mapping sets each of its keys."""
    key, value = parse_override(word)
    if key in SECTIONS and isinstance(value, Mapping):
        return {f"{key}.{name}" for name in value}
    return {key}


def unpinned(overrides: Sequence[str], pinned: set[str]) -> list[str]:
    """The `key=value` overrides without those of the `pinned` keys, which the resume command
    gives anew: a section's mapping (`data={stage_to: local, batch_size: 16}`) keeps its other
    keys, where kept whole it would give a pinned key twice, which is refused."""
    kept = []
    for word in overrides:
        key, value = parse_override(word)
        if key in SECTIONS and isinstance(value, Mapping):
            left = {name: given for name, given in value.items() if f"{key}.{name}" not in pinned}
            if len(left) < len(value):
                flow = yaml.safe_dump(left, default_flow_style=True, width=math.inf).strip()
                kept += [f"{key}={flow}"] if left else []
                continue
        if key not in pinned:
            kept.append(word)
    return kept


def as_yaml(text: str) -> str:
    """`text` as an override's value reads it back: as it is, or quoted where YAML would read
    something else (a name `007` is the number 7)."""
    try:
        plain = load_yaml(text) == text
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (2 for bad input, 1 for a failed run)."""
    parser = argparse.ArgumentParser(
        prog="python -m raydeq.train",
        description="One training run on Ray Train: DDP workers, checkpoints, TensorBoard.",
        epilog=(
            "The run is written to STORAGE_PATH/NAME (storage_path=DIR or s3://..., default "
            "runs; the name is derived from the settings unless name= is given). Running the "
            "same command again resumes it from its newest checkpoint (a finished run is only "
            "reported). Exit status 2 for a bad config, 1 for a failed run, 130 when "
            "interrupted."
        ),
    )
    parser.add_argument(
        "config",
        metavar="CONFIG.yaml",
        help="YAML config file, or an experiment's name as raydeq.tune takes it (digits: "
        "tune_configs/digits.yaml); tune_configs/NAME.yaml reads the shipped experiment file "
        "where this folder has none (its search section unused)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="key=value",
        help="settings over the config's, e.g. optim.lr=3e-4 train.epochs=5",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stopped:  # --help, or a bad argument that argparse names on stderr
        return int(stopped.code or 0)
    from raydeq.training import launch

    with ExitStack() as held:
        held.enter_context(process_kept())  # after Ray's import, whose loggers it puts back
        held.enter_context(output_kept())
        held.enter_context(interruptible())
        try:
            refuse_search(args.overrides)
            path = config_file(args.config)
            cfg = load(path, args.overrides)
            check_given(parse_overrides(args.overrides), cfg)
            left = held.enter_context(runlock.hold(cfg.run_dir))  # before checkpoints are read
            if left:
                print(f"note: {left}", file=sys.stderr)
            preset = leaves(given_settings(path, args.overrides)).get("train.lambda_skip") is None
            last = check_run(cfg, preset_lambda_skip=preset)
            if last is not None:
                print(f"the run had finished, so nothing was trained: {summary(last, cfg)}")
                return 0
            launch.check_cluster()
            launch.check_kept(cfg.storage_path)
        except (ConfigError, data.DataError, StorageError) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:  # in the preflight, which may list a large data folder
            print("\ninterrupted before training started", file=sys.stderr)
            return EXIT_INTERRUPTED
        held.enter_context(messages_shown())
        return run(cfg, argv)


def refuse_search(overrides: Sequence[str]) -> None:
    """Raise a ConfigError for an override of a search setting, which a training run does not
    read (search.num_samples=4 trained one run, unsaid)."""
    for key, value in parse_overrides(overrides).items():
        if key.split(".", 1)[0] == "search":
            raise ConfigError(
                f"{key}={value!r}: raydeq.train trains one run and reads no search section, so "
                "this changes nothing; give it to raydeq.tune, which runs the search",
                key=key,
            )


@contextmanager
def messages_shown() -> Iterator[None]:
    """Show INFO messages and above on stderr, each as its line alone, where the root logger
    has no handler (as logging.basicConfig would), and put the root logger back on exit: main
    called from a script leaves that script's logging as it found it."""
    root = logging.getLogger()
    if root.handlers:
        yield
        return
    handler, level = logging.StreamHandler(), root.level
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def run(cfg: Config, argv: Sequence[str]) -> int:
    """Train the run of a checked config; returns the exit status."""
    import ray.train

    from raydeq.training import launch
    from raydeq.training.reporting import TENSORBOARD_DIR

    earlier: frozenset[str] | None = None  # the checkpoints stored before the run trained
    try:
        own = launch.connect()
        scaling = launch.scaling_config(cfg, launch.gpus_per_worker(cfg))
        workers = scaling.num_workers, scaling.resources_per_worker
        for note in launch.check_placement(own, *workers, "the run's", cfg.scaling.cpus_per_worker):
            print(note, file=sys.stderr, flush=True)
        print(tensorboard_command(os.path.join(cfg.run_dir, TENSORBOARD_DIR)), flush=True)
        earlier = frozenset(subfolders(cfg.run_dir, CHECKPOINT_PREFIX))
        result = launch.fit(cfg, scaling)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ray.train.TrainingFailedError as err:
        reason = launch.own_error(str(err)) or err
        print(f"error: run {cfg.run_dir} failed: {reason}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C before training, or while Ray Train trains: its own handler aborts the run,
        # which then ends in a SystemExit out of Ray (status 1, and no word of why).
        last = None if earlier is None else finished(cfg.run_dir, earlier)
        if last is None:
            print(f"\ninterrupted; resume with: {resume_command(cfg, argv)}", file=sys.stderr)
        else:
            line = f"interrupted as it shut down; the run had finished: {summary(last, cfg)}"
            print(f"\n{line}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(summary(result.metrics or {}, cfg))
    return 0


def finished(run_dir: str, earlier: frozenset[str]) -> dict[str, Any] | None:
    """The last step's report where a whole checkpoint of the run's, stored since the folders
    `earlier`, holds it: a run interrupted as it shut down had finished, and running it again
    would only report; None otherwise (one stored before may be another length's last)."""
    fs = filesystem(run_dir)[0]
    stored = [p for p in subfolders(run_dir, CHECKPOINT_PREFIX) if p not in earlier]
    return next(filter(None, (final_report(fs, p) for p in newest_first(fs, stored))), None)


if __name__ == "__main__":
    sys.exit(main())
