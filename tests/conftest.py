"""Shared Ray cluster for the tests that need one.

Every Ray test of a session shares ONE local cluster (`ray_cluster`: 2 CPUs, dashboard on, so
the state API can list actors). Tests marked `multinode` build their own multi-node cluster,
so they run after all the others, once the shared cluster has been shut down. The suite runs
in two pytest-xdist processes (pyproject's addopts; `-n 0` runs it in one): one runs the
shared cluster's tests, one those that start Rays of their own.
"""

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest
import ray

# Importing setuptools (torch's C++ builds, inductor's among them, do) appends its vendored
# packages' folder to sys.path for good: done here, before any test's process_state is taken.
import setuptools  # noqa: F401
import torch
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer

from raydeq.training import console, interrupts, storage
from raydeq.training.launch import (
    API_SERVER,
    AUTH_LOGGER,
    COLOR_PREFIX,
    WORKER_LOGGERS,
    runtime_env,
)
from raydeq.tune import DROPPED_LOGS

# The S3 endpoint's port, bound for the whole session and never listened on: let go once found
# free, it was any socket's to take (Ray's, a connection's) until the S3 test's server bound
# it, whose start then waited for good. The server binds it too (both reuse the address), where
# the system allows it (`held_port`).
S3_PORT = socket.socket()


# The least time between progress lines that the commands keep (`console.Progress`).
PROGRESS_EVERY_S = console.PROGRESS_EVERY_S


@pytest.fixture(autouse=True)
def progress_unsaid(monkeypatch: pytest.MonkeyPatch) -> None:
    """No progress line in a test that sets no clock of its own (`ticking`): on a busy machine a
    task that passes 5 s would add one to the output that many tests assert whole."""
    monkeypatch.setattr(console, "PROGRESS_EVERY_S", math.inf)


def ticking(monkeypatch: pytest.MonkeyPatch, step_s: float) -> None:
    """The clock of the progress lines (`console.Progress`) at 0 s, then `step_s` later at each
    reading, with the commands' least time between two lines."""
    readings = iter(range(10**6))
    monkeypatch.setattr(console, "time", SimpleNamespace(monotonic=lambda: next(readings) * step_s))
    monkeypatch.setattr(console, "PROGRESS_EVERY_S", PROGRESS_EVERY_S)


def tensorboard_data(logdir: Path) -> data_provider.MultiplexerDataProvider:
    """TensorBoard's data provider of the event files under `logdir`, as its backend reads them."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    return data_provider.MultiplexerDataProvider(multiplexer, str(logdir))


def pytest_configure(config: pytest.Config) -> None:
    """Register the `multinode` marker."""
    config.addinivalue_line("markers", "multinode: builds its own multi-node Ray cluster")
    os.environ.update(local_s3_settings())


def pytest_unconfigure(config: pytest.Config) -> None:
    """Let the S3 endpoint's port go."""
    S3_PORT.close()


def local_s3_settings() -> dict[str, str]:
    """S3 settings for every process of the session, Ray's workers included (they inherit them
    when the first cluster starts): a local endpoint that the S3 test serves, so that no test
    ever reaches a real account."""
    port = held_port(S3_PORT)
    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def held_port(held: socket.socket) -> int:
    """A free port of 127.0.0.1, bound by `held` and reusable by a server; let go at once where
    no second socket can bind it beside (macOS and the BSDs refuse one address and port to two
    sockets that set SO_REUSEADDR alone), since the S3 server's start would wait for good."""
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(("127.0.0.1", 0))
    port = held.getsockname()[1]
    with socket.socket() as beside:
        beside.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            beside.bind(("127.0.0.1", port))
        except OSError:
            held.close()
    return port


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that start Ray (`ray`) and those that need a GPU (`cuda`), so that
    `-m "not ray"` leaves them out; run the multinode tests last, after every test that uses
    the shared cluster. Under pytest-xdist the tests of the shared cluster run in one worker,
    in order, and those that start Rays of their own (the multinode tests among them) in one
    other, each kept from a process that a Ray is connected to."""
    for item in items:
        shared = "ray_cluster" in item.fixturenames
        if shared or item.get_closest_marker("multinode"):
            item.add_marker(pytest.mark.ray)
        if item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group("ray-shared" if shared else "ray-own"))
        skips = item.iter_markers("skipif")
        if any("CUDA device" in mark.kwargs.get("reason", "") for mark in skips):
            item.add_marker(pytest.mark.cuda)
    items.sort(key=lambda item: item.get_closest_marker("multinode") is not None)


@pytest.fixture(scope="session", autouse=True)
def own_temp_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point the temporary folder of this process and those it starts at one of the session's:
    the run locks, data indexes and TensorBoard folders that the tests' runs leave there (by
    design, a lock file outlives its run) are not left in the user's for good. Ray's own
    (RAY_TMPDIR), whose sockets' paths have a length limit, is a short one of this process:
    there a multinode test's cluster, run by another pytest-xdist worker, names itself as a
    `ray start` cluster, which a run that should start a Ray of its own would join instead."""
    folder = str(tmp_path_factory.mktemp("tmp"))
    saved = {name: os.environ.get(name) for name in ("TMPDIR", "RAY_TMPDIR")}
    previous = tempfile.tempdir
    ray_folder = tempfile.mkdtemp(prefix="ray", dir=saved["RAY_TMPDIR"] or saved["TMPDIR"])
    os.environ["RAY_TMPDIR"] = ray_folder
    os.environ["TMPDIR"] = tempfile.tempdir = folder
    yield
    shutil.rmtree(ray_folder, ignore_errors=True)
    tempfile.tempdir = previous
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A local Ray cluster with 2 CPUs and raydeq's runtime environment, started once per
    session; yields the dashboard URL."""
    with signal_handlers_kept():  # ray.init's SIGTERM handler would outlive every later test
        context = ray.init(num_cpus=2, runtime_env=runtime_env(local=True))
    yield f"http://{context.dashboard_url}"
    ray.shutdown()


class CountedVJP(torch.autograd.Function):
    """The identity, counting the vector-Jacobian products that pass through it backwards."""

    calls = 0

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        CountedVJP.calls += 1
        return grad


@pytest.fixture
def connect_env_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, for the test, the variables launch.connect writes into this process's
    environment (a Ray of the run's own's state API, Ray's colour setting), and remove what it
    wrote after: a dashboard address left behind sent the session's Ray cluster, and every
    later Ray test, to a dashboard that never ran. The filter each start of a Ray of the run's
    own adds to Ray's token notice goes too."""
    for name in (API_SERVER, COLOR_PREFIX):
        monkeypatch.setenv(name, "")  # recorded as it was, so the undo removes it again
        monkeypatch.delenv(name)
    auth = logging.getLogger(AUTH_LOGGER)
    monkeypatch.setattr(auth, "filters", list(auth.filters))


@pytest.fixture
def counted_vjp() -> type[CountedVJP]:
    """CountedVJP with its count at 0."""
    CountedVJP.calls = 0
    return CountedVJP


def _central_difference(
    value: Callable[[], float], tensor: torch.Tensor, direction: torch.Tensor, eps: float = 1e-5
) -> float:
    """d/dt value() at tensor + t direction, t = 0, by central differences (tensor is moved in
    place and put back): the reference for second derivatives."""
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            tensor.add_(sign * eps * direction)
        values.append(value())
        with torch.no_grad():
            tensor.sub_(sign * eps * direction)
    return (values[0] - values[1]) / (2 * eps)


@pytest.fixture
def central_difference() -> Callable[..., float]:
    """The central difference of a scalar along a direction of a tensor it reads."""
    return _central_difference


class CutStream:
    """An output stream that writes 5 bytes of its first write, then fails as a full disk."""

    def __init__(self, inner: pyarrow.NativeFile) -> None:
        self.inner = inner

    def __enter__(self) -> "CutStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.close()

    def write(self, payload: bytes) -> None:
        self.inner.write(payload[:5])
        raise OSError("No space left on device")


class FullDisk:
    """A local filesystem whose every file write stops after 5 bytes on a full disk."""

    type_name = "local"

    def __init__(self) -> None:
        self.local = pyarrow.fs.LocalFileSystem()

    def __getattr__(self, name: str) -> object:
        return getattr(self.local, name)

    def open_output_stream(self, inner: str) -> CutStream:
        return CutStream(self.local.open_output_stream(inner))


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local writes through raydeq.training.storage stop part way with ENOSPC (undo with
    monkeypatch.undo())."""
    monkeypatch.setattr(storage, "filesystem", lambda path: (FullDisk(), storage.absolute(path)))


@functools.cache
def _modules_after(statement: str) -> frozenset[str]:
    """Every module a fresh Python has loaded after running `statement`, found once a session
    for each statement (a Python's start and raydeq's imports: seconds)."""
    check = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    return frozenset(json.loads(done.stdout.splitlines()[-1]))


def _loaded(statement: str, modules: list[str]) -> list[str]:
    """Those of `modules` that a fresh Python has loaded after running `statement`."""
    return [m for m in modules if m in _modules_after(statement)]


@pytest.fixture
def loaded() -> Callable[[str, list[str]], list[str]]:
    """Which of some modules a statement run in a fresh Python loads: what an import costs."""
    return _loaded


# The longest a test waits for what a thread it started is about to do: a loaded machine (2
# slow cores, shared) may take seconds over what takes milliseconds alone, and the wait ends
# as soon as it is done.
WAIT_S = 60.0


def private_kb() -> int:
    """This process's private memory (kB): the pages it wrote since it was forked, and its own."""
    rows = Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]
    fields = dict(row.split(":") for row in rows)
    return sum(int(fields[name].split()[0]) for name in ("Private_Dirty", "Private_Clean"))


LINUX_PROC = pytest.mark.skipif(
    not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's /proc"
)


def _lock_waits(caplog: pytest.LogCaptureFixture, worker: threading.Thread) -> list[str]:
    """The lines said by workers kept waiting for a lock, once `worker`, started to meet one
    held, has said its line; checking that it still waits."""
    deadline = time.monotonic() + WAIT_S
    while not _waiting(caplog) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.is_alive()
    return _waiting(caplog)


def _waiting(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The lines said so far by workers kept waiting for a lock."""
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Waiting")]


@pytest.fixture
def lock_waits(caplog: pytest.LogCaptureFixture) -> Callable[[threading.Thread], list[str]]:
    """`lock_waits(worker)`: the lines said by workers kept waiting for a lock, once the worker
    has said one (a loaded machine may take over a second to start it, where a fixed wait of
    one failed)."""
    return functools.partial(_lock_waits, caplog)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test with one PyTorch thread, as a Ray worker with one CPU does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def process_state() -> dict[str, object]:
    """What a test shares with the tests after it in this process: torch's default dtype,
    threads, grad mode, backend flags and modes, the SIGINT and SIGTERM handlers, sys.path, the
    working folder, the umask, and the loggers a run in this process sets (Optuna's, whose
    level is its verbosity, which a search's searcher sets, Tune's, which a search's filters
    quiet, and Ray's token notice's, which a start of a Ray of the run's own quiets)."""
    umask = os.umask(0o022)
    os.umask(umask)
    loggers = {
        name or "root": logging.getLogger(name)
        for name in (*WORKER_LOGGERS, "optuna", *DROPPED_LOGS, AUTH_LOGGER)
    }
    return {
        "default dtype": torch.get_default_dtype(),
        "threads": torch.get_num_threads(),
        "grad enabled": torch.is_grad_enabled(),
        "cudnn": (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32),
        "matmul": (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "autocast": torch.is_autocast_enabled("cpu"),
        "signals": signal_handlers(),
        "sys.path": list(sys.path),
        "cwd": os.getcwd(),
        "umask": umask,
        **{
            f"logger {name}": (
                logger.level,
                list(logger.filters),
                # The cached answer of Ray's loggers follows the "ray" logger, which ray.init
                # itself sets (the multinode tests' clusters).
                name.startswith("ray") or logger.isEnabledFor(logging.INFO),
            )
            for name, logger in loggers.items()
        },
    }


def signal_handlers() -> tuple[object, ...]:
    """The handlers of SIGINT and SIGTERM, the signals that stop a command."""
    return tuple(signal.getsignal(signum) for signum in interrupts.SIGNALS)


@contextlib.contextmanager
def signal_handlers_kept() -> Iterator[None]:
    """Put the SIGINT and SIGTERM handlers back on exit: ray.init sets SIGTERM's in its driver,
    and a TorchTrainer or Tuner fitted in the main thread sets SIGINT's for good."""
    handlers = signal_handlers()
    try:
        yield
    finally:
        for signum, handler in zip(interrupts.SIGNALS, handlers, strict=True):
            signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def process_state_kept(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves process_state changed (a logger's INFO answer included, which
    logging caches: monkeypatching a logger's level leaves it stale), so that no test passes
    or fails by the order it runs in. A Ray test gets the signal handlers back first: Ray sets
    them in the process that drives it."""
    before = process_state()
    ray_test = request.node.get_closest_marker("ray") is not None
    with signal_handlers_kept() if ray_test else contextlib.nullcontext():
        yield
    assert process_state() == before


def user_state() -> dict[str, object]:
    """The process-wide state a script that embeds raydeq keeps: process_state, and the RNG
    stream, the environment, the loggers' levels, filters and handlers, warnings filters,
    matplotlib's backend, the standard streams with their error handlers, and the hooks of
    exceptions Python drops and of tracing."""
    matplotlib = sys.modules.get("matplotlib")
    return process_state() | {
        "rng": torch.random.get_rng_state().tolist(),
        "environ": dict(os.environ),
        "loggers": {
            name: (logger.level, list(logger.filters), list(logger.handlers), logger.propagate)
            for name, logger in [("", logging.root), *logging.root.manager.loggerDict.items()]
            if isinstance(logger, logging.Logger)
        },
        "logging disabled": logging.root.manager.disable,
        "warnings": list(warnings.filters),
        "matplotlib backend": matplotlib.get_backend() if matplotlib else None,
        "streams": [
            (stream, getattr(stream, "errors", None)) for stream in (sys.stdout, sys.stderr)
        ],
        "hooks": (sys.unraisablehook, sys.gettrace()),
    }


@contextlib.contextmanager
def _state_kept() -> Iterator[None]:
    """Fail where the code run inside changes user_state (loggers created inside aside)."""
    before = user_state()
    yield
    after = user_state()
    after["loggers"] = {k: v for k, v in after["loggers"].items() if k in before["loggers"]}
    changed = [key for key in before if before[key] != after[key]]
    assert not changed, f"changed: {changed}"


@pytest.fixture
def state_kept() -> Callable[[], contextlib.AbstractContextManager[None]]:
    """`with state_kept(): ...` fails where the code inside changes the user's process state."""
    return _state_kept
