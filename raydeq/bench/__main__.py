"""`python -m raydeq.bench`: run the suites, print the Markdown, save it with the JSON."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from raydeq.bench.harness.context import SIZES, Checkpoint, Context
from raydeq.bench.harness.models import build, load_checkpoint
from raydeq.bench.harness.report import (
    Report,
    error_line,
    machine_info,
    output_stem,
    source_commit,
    usable_cpus,
    write,
)
from raydeq.bench.harness.timing import keep_freed_memory
from raydeq.bench.suites import SUITES, train_step
from raydeq.models import PRESETS
from raydeq.training.checkpoint import CheckpointError, read_newest
from raydeq.training.config import ConfigError
from raydeq.training.console import output_kept
from raydeq.training.data import EXPECTED_FILES, unreadable_file
from raydeq.training.interrupts import interruptible
from raydeq.training.preflight import check_compile_cache
from raydeq.training.state import local_folder
from raydeq.training.storage import StorageError, local_path

# The largest seed, as in a training config: raydeq.train's seeds are 0 to 2**32 - 1.
MAX_SEED = 2**32 - 1
# The most torch CPU threads a run takes: one per CPU it may run on (more only time the
# threads' contention, and past 2**31 - 1 torch fails every suite with an overflow).
MAX_THREADS = usable_cpus()
# What torch.utils.cpp_extension (imported by compile=True's C++ builds) warns on a machine
# with a CUDA toolkit but no GPU, where the run has no use for CUDA.
NO_CUDA_RUNTIME = "No CUDA runtime is found"
# What the report's failures say of the suite that Ctrl-C or SIGTERM stopped and of those after.
INTERRUPTED = "interrupted (Ctrl-C or SIGTERM) before it finished"
NOT_RUN = "not run: the run was interrupted before it"
# The presets the node suite times without --models: a dense and a convolutional DEQ.
DEFAULT_MODELS = ("mnist_dense", "cifar10_small")
# The suites that read each flag's value; the others run as they would without it.
READ_BY = {
    "--models": ("node",),
    "--weights": ("node", "train_step"),
    "--data": ("node", "skip", "skip_lambda", "discrete", "train_step"),
}


def _parser() -> argparse.ArgumentParser:
    """The command's flags, each read and checked alone (`parse` checks them together)."""
    parser = argparse.ArgumentParser(
        prog="python -m raydeq.bench",
        description="Side-by-side benchmarks of raydeq against its baselines and peers.",
    )
    sizes = parser.add_mutually_exclusive_group()  # else the last of the two won unsaid
    sizes.add_argument(
        "--quick",
        action="store_const",
        const="quick",
        dest="size",
        help="small sizes: a few minutes on a 2-core CPU (same as --size quick)",
    )
    sizes.add_argument(
        "--size",
        choices=SIZES,
        help="problem sizes and repeats: tiny (one repeat of the smallest, a smoke test), "
        "quick or full (default: full)",
    )
    parser.add_argument(
        "--device",
        type=torch_device,
        default="cpu",
        help="torch device, e.g. cpu, cuda or cuda:1 (default: cpu)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(SUITES),
        metavar="NAME",
        help=f"run only these suites (default: all, in this order): {', '.join(SUITES)}",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(PRESETS),
        metavar="MODEL",
        help=f"presets that the node suite times and --weights names, of {', '.join(PRESETS)} "
        "(default: "
        f"{' '.join(DEFAULT_MODELS)})",
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        default=[],
        metavar="MODEL=FOLDER",
        help="time these presets (of --models) in the node and train_step suites with the "
        "weights of a training checkpoint folder, or of a trial's or run's folder (its newest "
        "readable checkpoint; a path or a file: URI), instead of untrained or briefly trained "
        "(default: none)",
    )
    parser.add_argument(
        "--data",
        type=mnist_folder,
        metavar="FOLDER",
        help="folder holding the full MNIST's MNIST/raw, for the suites "
        f"{', '.join(READ_BY['--data'])} (default: the embedded 10k digits)",
    )
    parser.add_argument(
        "--threads",
        type=thread_count,
        metavar="N",
        help=f"torch CPU threads, 1 to {MAX_THREADS} (default: torch's, {torch.get_num_threads()})",
    )
    parser.add_argument(
        "--out",
        type=output_folder,
        default=Path("benchmarks/results"),
        metavar="FOLDER",
        help=(
            "folder for <date>-<device>.json and .md, -2, -3, ... after the first run of a "
            "day (default: benchmarks/results)"
        ),
    )
    parser.add_argument(
        "--seed",
        type=seed,
        default=0,
        metavar="N",
        help=f"seed of every problem and model, 0 to {MAX_SEED} (default: 0)",
    )
    return parser


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, checked before any suite runs: no suite, preset or checkpoint given
    twice, a usable device, each --weights checkpoint read (of a preset among --models), and
    an --out folder that can be written."""
    parser = _parser()
    args = parser.parse_args(argv)
    # Set here, not as the flags' default: argparse takes a value that is its default object
    # (a "full" in a script's list) as not given, which would let --quick --size full through;
    # and --models given is told from --models left out.
    args.size = args.size or "full"
    given = {"--models": args.models, "--weights": args.weights, "--data": args.data}
    args.models = args.models or list(DEFAULT_MODELS)
    check_once(parser, "--only", args.only or [])
    check_once(parser, "--models", args.models)
    check_once(parser, "--weights", [item.partition("=")[0] for item in args.weights])
    readers = dict(READ_BY)
    if args.weights:  # --weights picks its presets from --models, train_step's too
        readers["--models"] = (*READ_BY["--models"], "train_step")
    check_read(parser, args.only, {flag: readers[flag] for flag, value in given.items() if value})
    check_timed(parser, args.only, args.weights)
    try:
        check_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    args.weights = parse_weights(parser, args.weights, args.models)
    try:
        check_compile_cache()  # every suite's solve needs it
    except ConfigError as err:
        parser.error(str(err))
    try:  # here, not after the first suite has run
        if args.out.exists() and not args.out.is_dir():  # mkdir's "File exists" hid it
            parser.error(f"--out {args.out}: a file, not a folder; name the folder for the results")
        args.out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out).close()
    except OSError as err:
        parser.error(f"--out {args.out}: cannot write there ({err.strerror or err})")
    return args


def check_once(parser: argparse.ArgumentParser, flag: str, names: Sequence[str]) -> None:
    """A usage error naming what `flag` lists twice: a suite or preset run twice would report
    its rows and targets twice, and a second checkpoint of a preset would replace the first."""
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        parser.error(f"{flag}: {', '.join(twice)} given more than once; name each once")


def check_read(
    parser: argparse.ArgumentParser, only: Sequence[str] | None, readers: dict[str, Sequence[str]]
) -> None:
    """A usage error naming a flag given that no suite of --only reads (`readers`, the suites
    that read each flag given): --only train_step --models cifar10_large timed no
    cifar10_large, and said nothing."""
    for flag, suites in readers.items():
        if only and not set(suites) & set(only):
            parser.error(
                f"{flag}: no suite of --only {' '.join(only)} reads it, only "
                f"{', '.join(suites)}; drop it, or run one of those"
            )


def check_timed(
    parser: argparse.ArgumentParser, only: Sequence[str] | None, weights: Sequence[str]
) -> None:
    """A usage error naming a --weights preset that no suite of --only times: without node,
    train_step reads them and times its own presets alone, so --only train_step --weights
    cifar10_small=... timed none of those weights, and said nothing."""
    if not only or "node" in only:
        return
    timed = list(dict.fromkeys(workload.model for workload in train_step.WORKLOADS))
    for item in weights:
        name = item.partition("=")[0]
        if name not in timed:
            parser.error(
                f"--weights {item!r}: no suite of --only {' '.join(only)} times {name}, "
                f"train_step only {', '.join(timed)}; add node to --only, or drop it"
            )


def mnist_folder(text: str) -> Path:
    """A folder holding the full MNIST's IDX files in MNIST/raw, each looking whole (a wrong
    folder would leave the benchmarks on untrained weights and Gaussian images)."""
    root = folder(text)
    names = EXPECTED_FILES["mnist"]
    try:
        missing = [name for name in names if not (root / name).is_file()]
    except OSError as err:  # a name too long for the filesystem
        raise argparse.ArgumentTypeError(f"{text!r}: cannot be read ({err.strerror})") from None
    if missing:
        raise argparse.ArgumentTypeError(
            f"{text!r} does not hold the full MNIST: {', '.join(missing)} missing"
        )
    problem = unreadable_file(root, names)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return root


def output_folder(text: str) -> Path:
    """The folder for the results named on the command line; an empty name is refused, as
    Path("") is the current folder, which the results would fill."""
    if not text:
        raise argparse.ArgumentTypeError(
            f"{text!r} names no folder; name the folder for the results "
            "(default: benchmarks/results)"
        )
    return folder(text)


def folder(text: str) -> Path:
    """A folder named on the command line, absolute with ~ expanded as train and tune take
    theirs (the shell leaves a ~ after a flag's = as written), or a file: URI's; another URI
    is refused, which Path cut to a local folder (s3://bucket/results to ./s3:/bucket/results)."""
    try:
        local = local_path(text)
    except StorageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if local is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is a URI of remote storage; give a local folder or a file: URI"
        )
    return Path(local)


def torch_device(text: str) -> torch.device:
    """A torch device named on the command line."""
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
        ) from None


def check_device(device: torch.device) -> None:
    """Raise a ValueError naming the devices this machine has unless `device` is one of them
    (the CPU, or an available accelerator's device): a usage error, status 2."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    count = torch.accelerator.device_count() if accelerator is not None else 0
    if device.type == "cpu" or (
        accelerator is not None and device.type == accelerator.type and (device.index or 0) < count
    ):
        return
    last = f" to {accelerator.type}:{count - 1}" if count > 1 else ""
    devices = f" and {accelerator.type}:0{last}" if count else ""
    raise ValueError(f"--device {device}: not on this machine, which has cpu{devices}")


def thread_count(text: str) -> int:
    """A number of torch CPU threads named on the command line, 1 to the CPUs this process
    may run on."""
    if not text.isdecimal() or not 1 <= int(text) <= MAX_THREADS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an integer from 1 to {MAX_THREADS} (this process's CPUs)"
        )
    return int(text)


def seed(text: str) -> int:
    """A seed named on the command line, in the range raydeq.train takes (torch refuses one
    past 2**64 - 1 in every suite, and a suite seeds its cotangents with seed + 1)."""
    if not text.isdecimal() or int(text) > MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer from 0 to {MAX_SEED}")
    return int(text)


def parse_weights(
    parser: argparse.ArgumentParser, items: Sequence[str], models: Sequence[str]
) -> dict[str, Checkpoint]:
    """MODEL=CHECKPOINT pairs, each checkpoint read once, a folder or a file: URI (a run's
    `run=` line names one under such a storage), as load_model reads them; a usage error names
    a bad pair."""
    weights = {}
    for item in items:
        name, sep, given = item.partition("=")
        if not sep or not given:
            parser.error(f"--weights {item!r}: expected MODEL=CHECKPOINT_FOLDER")
        if name not in models:
            parser.error(f"--weights {item!r}: {name!r} is not among --models {' '.join(models)}")
        try:
            place = folder(str(local_folder(given)))
            weights[name] = fitting(name, Checkpoint(place, read_newest(place)["model"]))
        except (CheckpointError, ValueError) as err:
            parser.error(f"--weights {item!r}: {err}")
    return weights


def fitting(name: str, checkpoint: Checkpoint) -> Checkpoint:
    """The checkpoint, once its weights load into the preset (a ValueError naming what does not
    fit otherwise): a misfit found by the node suite would lose the presets timed before it."""
    load_checkpoint(build(name, "vanilla", torch.device("cpu"), 0), checkpoint)
    return checkpoint


def drop_no_cuda_runtime(record: logging.LogRecord) -> bool:
    """False (dropped) for torch's warning that no CUDA runtime is found, True otherwise."""
    return not record.getMessage().startswith(NO_CUDA_RUNTIME)


def run_suite(name: str, ctx: Context, report: Report) -> None:
    """Run one suite into the report; a suite that raises is reported (its traceback on stderr,
    its error in the report's failures) so that the others still run."""
    start = time.perf_counter()
    print(f"[{name}] running", file=sys.stderr, flush=True)
    try:
        report.sections.append(SUITES[name](ctx))
    except Exception as err:  # one suite's failure must not lose the others
        traceback.print_exc()
        report.failures[name] = error_line(err)
        print(f"[{name}] failed: {report.failures[name]}", file=sys.stderr, flush=True)
    else:
        print(f"[{name}] {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def interrupted(name: str, report: Report, stem: Path, requested: Sequence[str]) -> None:
    """End a run that Ctrl-C stopped in suite `name`, or in the rewrite after it, with status
    130: the report is written again, naming among its failures `name` unless it finished and
    each of the `requested` suites after it (a cut report otherwise reads as a whole run of
    fewer suites), so that a suite that finished before a cut rewrite is in both files, and
    one line says where."""
    finished = {section.name for section in report.sections} | set(report.failures)
    for suite in requested[requested.index(name) :]:
        if suite not in finished:
            report.failures[suite] = INTERRUPTED if suite == name else NOT_RUN
    write(report, stem)
    kept = f"the finished suites are in {stem}.md" if report.sections else "none finished"
    print(f"\ninterrupted in [{name}]; {kept}", file=sys.stderr)
    sys.exit(130)


def main(argv: Sequence[str] | None = None) -> Report:
    """Run the selected suites, rewriting the report after each one; returns it.

    A suite that raises is reported (its traceback on stderr, its error in the report) and the
    others still run; the run then exits with status 1.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    with output_kept():
        args = parse(argv)
        with settings_of_the_run(args.threads, args.device):
            return run(args, f"python -m raydeq.bench {shlex.join(argv)}".rstrip())


@contextlib.contextmanager
def settings_of_the_run(threads: int | None, device: torch.device) -> Iterator[None]:
    """Ctrl-C and SIGTERM raising KeyboardInterrupt (SIGTERM's default killed a run without a
    word, a cut rewrite leaving its partial file), the run's threads, its own RNG streams (the
    CPU's and `device`'s) and no word of a missing CUDA runtime, the caller's back on return:
    main called from a script leaves the script's process as it was."""
    cpp_extension = logging.getLogger("torch.utils.cpp_extension")
    kept_threads = torch.get_num_threads()
    cpp_extension.addFilter(drop_no_cuda_runtime)
    try:
        with interruptible(), forked_rng(device):
            if threads:
                torch.set_num_threads(threads)
            yield
    finally:
        torch.set_num_threads(kept_threads)
        cpp_extension.removeFilter(drop_no_cuda_runtime)


def forked_rng(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The RNG streams of the CPU and of `device` alone, forked: fork_rng's default reads every
    GPU's, initialising CUDA on each for a run on one device or the CPU."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def run(args: argparse.Namespace, command: str) -> Report:
    """Run the suites of parsed arguments, as main does; `command` is the command line."""
    device = args.device
    try:
        keep_freed_memory()
        ctx = Context(device, args.size, tuple(args.models), args.data, args.seed, args.weights)
        report = Report(
            date=datetime.date.today().isoformat(),
            device=device.type,
            size=args.size,
            machine=machine_info(device),
            command=command,
            commit=source_commit(),
        )
        stem = output_stem(report, args.out)
        json_path, md_path = write(report, stem)
    except KeyboardInterrupt:  # in the machine's description or the first, empty report
        print("\ninterrupted before any suite started", file=sys.stderr)
        sys.exit(130)
    requested = list(args.only or SUITES)
    for name in requested:
        try:
            run_suite(name, ctx, report)
            json_path, md_path = write(report, stem)
        except KeyboardInterrupt:
            interrupted(name, report, stem, requested)
    print(report.to_markdown())
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    if report.failures:
        sys.exit(f"failed suites: {', '.join(report.failures)} (see the report's 'Failed suites')")
    return report


if __name__ == "__main__":
    main()
