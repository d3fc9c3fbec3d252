"""Local paths and URIs of the run's storage, its checkpoint folders, the run lock's record of
its holder, and TensorBoard events in a folder or at a file:// URI: no Ray, no S3 server."""

import errno
import fcntl
import importlib
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pyarrow.fs
import pytest
from conftest import WAIT_S
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raydeq import train
from raydeq.training import checkpoint, runlock, storage
from raydeq.training.config import (
    NAME_MAX,
    RUN_NAME_MAX,
    ConfigError,
    check_folder_name,
    validate,
)
from raydeq.training.eventlog import EventLog


def test_a_uri_of_any_scheme_is_kept_as_it_is_and_a_relative_path_made_absolute(
    tmp_path, monkeypatch
):
    for uri in ("s3://bucket/runs", "gs://bucket/runs", "abfs://container/runs"):
        assert storage.is_uri(uri) and storage.absolute(uri) == uri
    monkeypatch.chdir(tmp_path)
    assert not storage.is_uri("runs/a")
    assert storage.absolute("runs/a") == str(tmp_path / "runs" / "a")


def test_a_file_uri_in_its_short_form_is_kept_as_a_uri_and_writes_where_it_names(
    tmp_path, monkeypatch
):
    """file:/abs/path, pyarrow's and Ray's short form of file:///abs/path, was made a folder
    named 'file:' in the current one, where the run's files went instead of at the path."""
    monkeypatch.chdir(tmp_path)
    uri = f"file:{tmp_path / 'store'}"
    assert storage.is_uri(uri) and storage.absolute(uri) == uri
    assert validate({"storage_path": uri}).storage_path == uri
    storage.write_bytes(f"{uri}/run/a.json", b"{}")
    assert (tmp_path / "store" / "run" / "a.json").read_bytes() == b"{}"
    assert not (tmp_path / "file:").exists()


def test_a_folder_with_a_nul_character_is_one_line(tmp_path, capsys):
    """A NUL, which YAML writes as "\\0", ended raydeq.train in a traceback ("embedded null
    byte") and raydeq.tune --report in pyarrow's ArrowInvalid, where --dry-run took it."""
    data = {"dataset": "mnist", "data_dir": "/a\0b"}
    for raw in ({"storage_path": "/a\0b"}, {"data": data}):
        with pytest.raises(storage.StorageError) as err:
            validate(raw)
        assert (
            str(err.value) == "'/a\\x00b' holds a NUL character, which no path can hold; remove it"
        )
    config = tmp_path / "run.yaml"
    config.write_text('storage_path: "/a\\0b"\ndata: {dataset: digits}\n')
    assert train.main([str(config)]) == 2
    assert capsys.readouterr().err == (
        "error: '/a\\x00b' holds a NUL character, which no path can hold; remove it\n"
    )


def test_subfolders_are_the_folders_named_with_the_prefix_sorted_by_name(tmp_path):
    """The checkpoint folders of a run, oldest first (zero-padded steps), and nothing else: no
    file, and no folder whose name only contains the prefix."""
    steps = ("000012", "000003", "000099", "000006", "000001", "000050")
    for name in (*(f"checkpoint_{step}" for step in steps), "other"):
        (tmp_path / name).mkdir()
    (tmp_path / ".checkpoint_000020.partial").mkdir()
    (tmp_path / "checkpoint_000030").write_text("a file, not a checkpoint")
    found = storage.subfolders(str(tmp_path), storage.CHECKPOINT_PREFIX)
    assert found == [str(tmp_path / f"checkpoint_{step}") for step in sorted(steps)]
    assert storage.subfolders(str(tmp_path / "none"), storage.CHECKPOINT_PREFIX) == []


def test_write_bytes_creates_the_folders_on_the_way_and_read_text_reads_it_back(tmp_path):
    path = tmp_path / "a" / "b" / "settings.yaml"
    storage.write_bytes(str(path), b"name: x\n")
    assert path.read_bytes() == b"name: x\n"
    assert storage.read_text(str(path)) == "name: x\n"
    assert storage.exists(str(path)) and not storage.exists(str(tmp_path / "c"))


def test_a_local_write_cut_short_leaves_the_file_it_was_to_replace(tmp_path, monkeypatch, request):
    """A write that fails after 5 of its bytes (a process killed, a full disk) leaves the old
    file whole and no partial one beside it; a whole write replaces it."""
    path = tmp_path / "settings.yaml"
    storage.write_bytes(str(path), b"name: old\n")
    request.getfixturevalue("full_disk")
    with pytest.raises(
        storage.StorageError, match=f"^{path} could not be written: No space left on device$"
    ):
        storage.write_bytes(str(path), b"name: new\n")
    assert path.read_bytes() == b"name: old\n" and os.listdir(tmp_path) == ["settings.yaml"]
    monkeypatch.undo()
    storage.write_bytes(str(path), b"name: new\n")
    assert path.read_bytes() == b"name: new\n" and os.listdir(tmp_path) == ["settings.yaml"]


def test_the_storage_check_leaves_the_folder_as_it_found_it(tmp_path):
    storage.check_storage(str(tmp_path / "runs"))
    assert (tmp_path / "runs").is_dir() and list((tmp_path / "runs").iterdir()) == []


def test_a_storage_check_on_a_full_disk_leaves_no_probe_file(tmp_path, full_disk):
    """The check's probe file, created before its write failed (a full disk, a quota), was
    left in the storage folder at each start refused so; it is removed as a written one is."""
    with pytest.raises(storage.StorageError, match="No space left on device"):
        storage.check_storage(str(tmp_path / "runs"))
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_storage_uri_of_no_known_scheme_is_a_storage_error_naming_it():
    with pytest.raises(
        storage.StorageError,
        match="^storage_path nosuch://bucket/runs is not writable: .*nosuch://bucket/runs",
    ):
        storage.check_storage("nosuch://bucket/runs")


@pytest.mark.parametrize(
    ("uri", "escaped"),
    [
        ("file:///data/my runs", "file:///data/my%20runs"),
        ("s3://bucket/résultats", "s3://bucket/r%C3%A9sultats"),
    ],
)
def test_a_storage_uri_with_a_space_or_non_ascii_character_is_refused_with_its_escaped_form(
    uri, escaped
):
    """pyarrow refuses such a URI unparsed; the error said the storage was not writable and
    showed a non-ASCII character as a byte of it ('\ufffd'). It now gives the URI to write."""
    with pytest.raises(storage.StorageError) as refused:
        storage.check_storage(uri)
    assert str(refused.value) == (
        f"storage_path {uri} is not a URI that pyarrow reads: a space or a non-ASCII character "
        f"in a URI is written percent-encoded, as in {escaped}"
    )


def test_the_commands_on_a_system_without_fcntl_say_in_one_line_to_run_them_in_wsl(monkeypatch):
    """Windows has no fcntl: the run lock's import, which raydeq.train and raydeq.tune make and
    raydeq.bench makes through the data module, exits with one line naming the platforms they
    run on, where each command ended in a ModuleNotFoundError traceback."""
    monkeypatch.setitem(sys.modules, "fcntl", None)
    monkeypatch.delitem(sys.modules, "raydeq.training.runlock")
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module("raydeq.training.runlock")
    assert stopped.value.code == runlock.NO_FCNTL
    assert "run on Linux and macOS, not on Windows" in runlock.NO_FCNTL
    assert runlock.NO_FCNTL.endswith("run them in WSL")


def test_the_first_lock_of_a_machine_makes_its_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "fresh"))
    with runlock.hold(str(tmp_path / "runs" / "a")):
        assert runlock.lock_file(str(tmp_path / "runs" / "a")).is_file()


def test_the_lock_names_its_holder_even_over_a_longer_earlier_holder(tmp_path, monkeypatch):
    """The lock file outlives its drivers: a new holder's process id replaces the old one's
    whole, so that a refused driver is told who holds the run now."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    run = str(tmp_path / "runs" / "a")
    path = runlock.lock_file(run)
    assert path.is_relative_to(tmp_path / "tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("process 99999999999999")
    with runlock.hold(run), pytest.raises(runlock.RunInUse) as refused:
        with runlock.hold(run):
            pass
    assert str(refused.value).startswith(f"{run} is being run by process {os.getpid()} on ")


def test_a_run_named_by_a_file_uri_or_its_local_path_takes_one_lock(tmp_path, monkeypatch):
    """storage_path=file:///data/runs on one command and /data/runs on another run one folder:
    each took a lock of its own, so two drivers wrote and pruned its checkpoints side by side.
    A URI of another scheme keeps its own lock, a trailing slash aside."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    run = tmp_path / "runs" / "a"
    forms = [str(run), f"{run}/", f"file://{run}", f"file://{run}/", f"file:{run}"]
    assert {runlock.lock_file(form) for form in forms} == {runlock.lock_file(str(run))}
    assert runlock.lock_file("s3://bucket/runs/a/") == runlock.lock_file("s3://bucket/runs/a")
    assert runlock.lock_file("gs://bucket/runs/a") != runlock.lock_file("s3://bucket/runs/a")
    with runlock.hold(f"file://{run}"), pytest.raises(runlock.RunInUse):
        with runlock.hold(str(run)):
            pass


def test_the_holder_of_a_run_is_named_while_it_runs_and_none_before_or_after(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    run = str(tmp_path / "runs" / "a")
    assert runlock.holder(run) is None
    with runlock.hold(run):
        assert runlock.holder(run) == f"process {os.getpid()} on this machine"
    assert runlock.lock_file(run).is_file() and runlock.holder(run) is None
    with runlock.hold(run):  # the test took nothing over
        pass


def test_a_start_that_meets_a_readers_probe_waits_for_it_not_refused_by_an_ended_run(
    tmp_path, monkeypatch
):
    """A --report asks whether a driver runs the experiment by holding the lock shared for a
    moment; a start at that moment was refused, naming the driver that had already ended."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    # The probe's 0.2 s, on a loaded machine, may come seconds late: the start waits it out.
    monkeypatch.setattr(runlock, "PROBE_WAIT_S", WAIT_S)
    run = str(tmp_path / "runs" / "a")
    path = runlock.lock_file(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("process 99999999999999")
    with open(path) as probe:
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        reader = threading.Timer(0.2, fcntl.flock, (probe, fcntl.LOCK_UN))
        reader.start()
        try:
            with runlock.hold(run):
                assert runlock.holder(run) == f"process {os.getpid()} on this machine"
        finally:
            reader.join()


def driver_elsewhere(run: str, tmp: Path, host: str | None = None) -> subprocess.Popen:
    """A process holding the locks of `run` as a driver on another node of a shared disk does:
    its own temporary folder and, where `host` is given, its own host name."""
    tmp.mkdir(parents=True, exist_ok=True)
    rename = f"socket.gethostname = lambda: {host!r}\n" if host else ""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, time\nfrom raydeq.training import runlock\n"
            f"{rename}with runlock.hold({run!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_run_held_by_a_driver_of_another_temporary_folder_or_node_is_refused(
    tmp_path, monkeypatch
):
    """The lock lived in the user's temporary folder alone: a driver on another node of a
    shared disk (or another user, or a batch job's own TMPDIR) took a lock of its own, trained
    beside the first and failed on a checkpoint the first had pruned. The storage holds one
    too, naming the process and its node."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    run = str(tmp_path / "runs" / "a")
    here = driver_elsewhere(run, tmp_path / "other")
    node = driver_elsewhere(str(tmp_path / "runs" / "b"), tmp_path / "node-7", host="node-7")
    try:
        with pytest.raises(runlock.RunInUse) as refused:
            with runlock.hold(run):
                pass
        assert str(refused.value) == (
            f"{run} is being run by process {here.pid} on this machine; wait for it to end (or "
            "stop it), or give this run another name"
        )
        assert runlock.holder(run) == f"process {here.pid} on this machine"
        other = str(tmp_path / "runs" / "b")
        with pytest.raises(runlock.RunInUse, match=f"by process {node.pid} on node-7; wait"):
            with runlock.hold(f"file://{other}/"):
                pass
        assert runlock.holder(other) == f"process {node.pid} on node-7"
        with runlock.hold(str(tmp_path / "runs" / "c")) as left:  # another run is free
            assert left is None
    finally:
        for process in (here, node):
            process.kill()
            process.communicate()


def test_a_lock_left_by_a_killed_driver_is_taken_over_naming_it(tmp_path, monkeypatch):
    """A driver killed with SIGKILL leaves its lock file in the storage, unheld: the next start
    takes it, saying which driver left it; one that ended removes it, leaving the storage as
    it found it."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    run = str(tmp_path / "runs" / "a")
    killed = driver_elsewhere(run, tmp_path / "other", host="node-7")
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert runlock.holder(run) is None
    with runlock.hold(run) as left:
        assert left == (
            f"{run} was last run by process {killed.pid} on node-7, which ended without "
            f"releasing its lock {tmp_path / 'runs' / '.a.lock'} (killed); the lock is taken over"
        )
    assert os.listdir(tmp_path / "runs") == []
    with runlock.hold(run) as left:
        assert left is None
    with runlock.hold(str(tmp_path / "new" / "runs" / "a")):
        assert (tmp_path / "new" / "runs" / ".a.lock").is_file()
    assert not (tmp_path / "new").exists()  # a run that stored nothing leaves no folder


def test_a_name_whose_lock_files_would_not_fit_a_file_name_is_refused(tmp_path, monkeypatch):
    """A run of 250 characters ran without the lock file beside its folder (`.NAME.lock`, 256
    bytes, which the filesystem refuses), so a second driver of a shared disk was not refused,
    and one of 300 was refused as storage that 'cannot be read'; the longest experiment name
    taken holds both of an experiment's lock files, and a longer one is refused naming its
    length and the most allowed."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    name = "a" * NAME_MAX
    assert NAME_MAX == 241
    check_folder_name("--name", name)
    experiment = str(tmp_path / "runs" / name)
    (tmp_path / "runs").mkdir()
    with runlock.hold(experiment):
        assert os.listdir(tmp_path / "runs") == [f".{name}.lock"]
    with runlock.writing_results(experiment):
        assert os.listdir(tmp_path / "runs") == [f".{name}.results.lock"]
    for length in (NAME_MAX + 1, 250, 300):
        with pytest.raises(ConfigError) as refused:
            check_folder_name("--name", "a" * length)
        assert str(refused.value) == (
            f"--name: a name of {length} characters is too long; use at most 241, so that the "
            "lock files beside its folder fit in a file name (255 bytes)"
        )
    for length in (250, 300):
        with pytest.raises(ConfigError) as refused:
            validate({"name": "a" * length})
        assert str(refused.value) == (
            f"name: a name of {length} characters is too long; use at most 249, so that the "
            "lock files beside its folder fit in a file name (255 bytes)"
        )


@pytest.mark.parametrize("length", [NAME_MAX + 1, 245, RUN_NAME_MAX])
def test_a_run_whose_one_lock_file_fits_beside_its_folder_is_taken(tmp_path, monkeypatch, length):
    """A training run's folder has one lock file beside it (`.NAME.lock`), where an experiment's
    has a second (`.NAME.results.lock`); runs of 242 to 249 characters, started and stored with
    that lock, were refused by the experiments' limit of 241, so that running the same command
    again could not resume them; they are taken, and hold their lock."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    name = "a" * length
    assert RUN_NAME_MAX == 249 and validate({"name": name}).name == name
    (tmp_path / "runs").mkdir()
    with runlock.hold(str(tmp_path / "runs" / name)):
        assert os.listdir(tmp_path / "runs") == [f".{name}.lock"]
        assert len(f".{name}.lock") <= 255


def test_a_lock_file_of_bytes_no_driver_writes_is_named_in_one_line_not_a_traceback(
    tmp_path, monkeypatch
):
    """A lock file beside the run holding bytes that are no UTF-8 and several lines (damaged,
    or edited by hand) ended the next start, `--report`'s probe and a refusal in a
    UnicodeDecodeError; each now reads it as one line, undecodable bytes as U+FFFD."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    run = str(tmp_path / "runs" / "a")
    (tmp_path / "runs").mkdir()
    lock = tmp_path / "runs" / ".a.lock"
    lock.write_bytes(b"\xff\xfe process 7\n on node-7\n")
    with runlock.hold(run) as left:
        assert left == (
            f"{run} was last run by \ufffd\ufffd process 7 on node-7, which ended without "
            f"releasing its lock {lock} (killed); the lock is taken over"
        )
    lock.write_bytes(b"\xff\xfe process 7\n on node-7\n")
    with lock.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert runlock.holder(run) == "\ufffd\ufffd process 7 on node-7"
        with pytest.raises(runlock.RunInUse) as refused, runlock.hold(run):
            pass
    assert str(refused.value) == (
        f"{run} is being run by \ufffd\ufffd process 7 on node-7; wait for it to end (or stop "
        "it), or give this run another name"
    )


def test_a_lock_file_that_cannot_be_removed_is_emptied_not_left_naming_its_driver(
    tmp_path, monkeypatch
):
    """Another user's lock file in a folder with the sticky bit cannot be removed by the driver
    that took it over: removing it raised at the end of a run that had finished, and the file
    it left would name that driver as killed to the next start."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    run = str(tmp_path / "runs" / "a")
    (tmp_path / "runs").mkdir()

    def refused(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(1, "Operation not permitted", str(self))

    with monkeypatch.context() as patched, runlock.hold(run):
        patched.setattr(Path, "unlink", refused)
    assert (tmp_path / "runs" / ".a.lock").read_text() == ""
    with runlock.hold(run) as left:
        assert left is None


def test_a_storage_without_flock_keeps_no_lock_file_of_a_run_or_its_results(tmp_path, monkeypatch):
    """On a filesystem that refuses flock (ENOLCK: some NFS mounts, FUSE object stores) the
    lock files made in the storage stayed there, with the folders made for them: a run that
    stored nothing left its storage folder and .a.lock, and every --report a .e.results.lock.
    The machine's own locks still hold, and the storage is left as it was found."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    storage = tmp_path / "nfs"
    storage.mkdir()
    flock = fcntl.flock

    def refused_in_storage(file: object, operation: int) -> None:
        inode = os.fstat(file.fileno()).st_ino
        if any(inode == p.stat().st_ino for p in storage.rglob("*") if p.is_file()):
            raise OSError(errno.ENOLCK, "No locks available")
        flock(file, operation)

    monkeypatch.setattr(runlock.fcntl, "flock", refused_in_storage)
    with runlock.hold(str(storage / "runs" / "a")) as left:
        assert left is None
        with pytest.raises(runlock.RunInUse):
            with runlock.hold(str(storage / "runs" / "a")):
                pass
    assert os.listdir(storage) == []
    (storage / "e").mkdir()
    with runlock.writing_results(str(storage / "e")):
        pass
    assert os.listdir(storage) == ["e"]


def test_results_written_from_another_temporary_folder_wait_for_the_writer(tmp_path, monkeypatch):
    """A --report on another node of a shared disk and the run's end wrote the results side by
    side (the report's, read from a trial still running, could land last); the second writer
    now waits for the first, wherever it runs, and the storage keeps no lock file after."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    experiment, done = tmp_path / "runs" / "e", tmp_path / "written"
    experiment.mkdir(parents=True)
    (tmp_path / "other").mkdir()
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import pathlib, time\nfrom raydeq.training import runlock\n"
            f"with runlock.writing_results({str(experiment)!r}):\n"
            "    print('held', flush=True); time.sleep(1)\n"
            f"    pathlib.Path({str(done)!r}).write_text('done')",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path / "other")},
    )
    try:
        assert writer.stdout.readline() == "held\n"
        with runlock.writing_results(str(experiment)):
            assert done.read_text() == "done"
    finally:
        writer.kill()
        writer.communicate()
    assert os.listdir(tmp_path / "runs") == ["e"]


def test_drivers_of_many_temporary_folders_hold_a_run_one_at_a_time(tmp_path):
    """A driver removes its lock file in the storage as it ends; one that opened the file just
    before must not lock the removed file while a third locks the new one."""
    run = str(tmp_path / "runs" / "a")
    log = tmp_path / "held.log"
    script = (
        (
            "import os, time\nfrom raydeq.training import runlock\n"
            "end, took = time.monotonic() + 3, 0\n"
            "while time.monotonic() < end:\n"
            "    try:\n"
            "        with runlock.hold(RUN):\n"
            "            with open(LOG, 'a') as log: log.write(f'+{os.getpid()}\\n')\n"
            "            time.sleep(0.002)\n"
            "            with open(LOG, 'a') as log: log.write(f'-{os.getpid()}\\n')\n"
            "            took += 1\n"
            "    except runlock.RunInUse:\n"
            "        pass\n"
            "print(took)\n"
        )
        .replace("RUN", repr(run))
        .replace("LOG", repr(str(log)))
    )
    for k in range(4):
        (tmp_path / f"tmp{k}").mkdir()
    drivers = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "TMPDIR": str(tmp_path / f"tmp{k}")},
        )
        for k in range(4)
    ]
    took = [int(driver.communicate(timeout=120)[0]) for driver in drivers]
    lines = log.read_text().split()
    assert len(lines) == 2 * sum(took) and sum(took) >= 2
    assert all(a[0] == "+" and b == f"-{a[1:]}" for a, b in zip(lines[::2], lines[1::2]))


def test_a_driver_whose_storage_folder_is_removed_as_it_starts_still_locks_the_run(
    tmp_path, monkeypatch
):
    """A driver that found the run's parent folder, made by a driver that removed it as it
    ended, opened its lock file in no folder and ran without the storage's lock, beside a third
    driver; it now makes the folder again, holds the lock, and removes the folder after."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    runs = tmp_path / "runs"
    runs.mkdir()
    run, opened = str(runs / "a"), os.open

    def open_after_the_other_driver_ended(path, *args):
        if runs.exists():
            runs.rmdir()
        monkeypatch.setattr(runlock.os, "open", opened)
        return opened(path, *args)

    monkeypatch.setattr(runlock.os, "open", open_after_the_other_driver_ended)
    with runlock.hold(run):
        held = runlock.probe(runlock.shared_lock_file(run))
    assert held == f"process {os.getpid()} on {runlock.socket.gethostname()}"
    assert not runs.exists()


def test_a_driver_whose_storage_folders_are_removed_as_it_makes_them_still_locks_the_run(
    tmp_path, monkeypatch
):
    """A storage two folders deep that another driver made and removed as it ended: the
    driver found new/ there and runs/ gone, and making runs/ in the new/ removed meanwhile
    raised, so it ran without the storage's lock; it now looks again, makes both, holds the
    lock, and removes both after."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    new, runs = tmp_path / "new", tmp_path / "new" / "runs"
    new.mkdir()
    run, mkdir = str(runs / "a"), Path.mkdir

    def mkdir_after_the_other_driver_ended(folder: Path, *args: object, **kwargs: object) -> None:
        if folder == runs:
            new.rmdir()
            monkeypatch.setattr(Path, "mkdir", mkdir)
        mkdir(folder, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir_after_the_other_driver_ended)
    with runlock.hold(run):
        held = runlock.probe(runlock.shared_lock_file(run))
    assert held == f"process {os.getpid()} on {runlock.socket.gethostname()}"
    assert not new.exists()


def test_drivers_whose_storage_folders_crossed_leave_none_when_neither_run_started(
    tmp_path, monkeypatch
):
    """Two drivers of a run two folders down in a new storage: the first made new/, the second
    runs/ in it, and the first held the lock and refused the second, which could not remove
    runs/ (the first's lock file was in it) while the first removed only what it made, so
    new/runs/ stayed, empty; the last to end now removes every folder that was missing when
    it first looked."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    new, runs = tmp_path / "new", tmp_path / "new" / "runs"
    run, mkdir = str(runs / "a"), Path.mkdir

    def the_other_driver_makes_runs_first(folder: Path, *args: object, **kwargs: object) -> None:
        if folder == runs:
            mkdir(runs)
            monkeypatch.setattr(Path, "mkdir", mkdir)
        mkdir(folder, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", the_other_driver_makes_runs_first)
    with runlock.hold_shared(run):
        with pytest.raises(runlock.RunInUse), runlock.hold_shared(run):
            pass
        assert runs.is_dir()
    assert not new.exists()


def test_a_lock_file_that_links_to_no_file_is_an_error_naming_it(tmp_path, monkeypatch):
    """A link to no file in the lock file's place (a storage copied with its links): the
    driver found the file there, failed to open it, took it for one its holder removed and
    tried again for ever; it is now a StorageError naming the link, after one try each."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    run = tmp_path / "runs" / "a"
    run.parent.mkdir()
    link = runlock.shared_lock_file(str(run))
    link.symlink_to(tmp_path / "nowhere")
    opened, tries = os.open, []

    def counted_open(path, *args):
        tries.append(path)
        assert len(tries) <= 10, f"opened {len(tries)} times"
        return opened(path, *args)

    monkeypatch.setattr(runlock.os, "open", counted_open)
    with pytest.raises(storage.StorageError) as refused, runlock.hold(str(run)):
        pass
    assert str(refused.value) == (
        f"{link}, the lock file of {run}, is a link to {tmp_path / 'nowhere'}, which does not "
        "exist; remove the link"
    )
    assert len(tries) == 2 and link.is_symlink()


@pytest.mark.parametrize(
    ("suffix", "held"), [(".lock", runlock.hold), (".results.lock", runlock.writing_results)]
)
def test_a_lock_file_that_links_to_a_file_is_refused_leaving_the_file_as_it_was(
    tmp_path, monkeypatch, suffix, held
):
    """A link in a lock file's place, put there by a user who can write in a shared storage:
    the driver opened the file it links to, named its text as the killed driver, emptied it,
    wrote its own pid in it and made it writable by every user; it is now a StorageError."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    run = tmp_path / "runs" / "a"
    run.parent.mkdir()
    private = tmp_path / "private"
    private.write_text("export TOKEN=1\n")
    private.chmod(0o600)
    link = runlock.shared_lock_file(str(run), suffix)
    link.symlink_to(private)
    with pytest.raises(storage.StorageError) as refused, held(str(run)):
        pass
    assert str(refused.value) == (
        f"{link}, the lock file of {run}, is a link to {private}; remove the link"
    )
    assert private.read_text() == "export TOKEN=1\n"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and link.is_symlink()


@pytest.mark.parametrize("manifest", ["{}", "[1, 2]", "not json", '{"step": 1}'])
def test_a_manifest_without_its_checksum_is_a_checkpoint_error(tmp_path, manifest):
    folder = checkpoint.write_checkpoint({"step": 1}, tmp_path / "checkpoint_000001")
    (folder / checkpoint.MANIFEST_FILE).write_text(manifest)
    with pytest.raises(checkpoint.CheckpointError, match="no valid manifest.json"):
        checkpoint.read_checkpoint(folder)


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a tag in the event files of a folder, as TensorBoard reads them."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return (
        [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []
    )


def test_events_at_a_uri_are_uploaded_once_as_a_segment_per_flush(tmp_path):
    """A URI (here file://, which pyarrow writes like any other) gets a closed event file at
    each flush and at the end, each event in one of them only; the local folder the writer
    used is removed at the end."""
    folder = tmp_path / "tensorboard"
    log = EventLog(f"file://{folder}")
    for step in range(1, 7):
        log.add_scalars({"loss": 10.0 - step}, step)
        if step in (2, 4):
            log.flush()
    log.close()
    files = sorted(folder.iterdir())
    assert len(files) == 3 and all(f.name.startswith("events.out.tfevents.") for f in files)
    assert scalars(folder, "loss") == [(step, 10.0 - step) for step in range(1, 7)]
    assert not Path(log.local).exists()


def test_tensorboard_polling_a_uri_run_as_a_segment_is_written_keeps_every_event(
    tmp_path, monkeypatch
):
    """A file: URI's events go up as a segment per flush, written beside their file and
    renamed; TensorBoard polling as the first segment was begun took its temporary file, named
    after the event file and so holding "tfevents", for the newest event file, and failed on
    it once it was renamed at every poll after: a running TensorBoard showed none of the run's
    steps, those after the poll included. The temporary file is now none TensorBoard reads."""
    folder = tmp_path / "tensorboard"
    folder.mkdir()
    shown, polled, opened = EventAccumulator(str(folder)), [], storage.filesystem

    class PolledWhileWritten:
        """A filesystem whose output stream is polled by TensorBoard before it is written."""

        def __init__(self, fs: pyarrow.fs.FileSystem) -> None:
            self.fs = fs

        def __getattr__(self, name: str) -> object:
            return getattr(self.fs, name)

        def open_output_stream(self, path: str) -> object:
            stream = self.fs.open_output_stream(path)
            if not polled:
                polled.append(shown.Reload())
            return stream

    monkeypatch.setattr(
        storage, "filesystem", lambda path: (PolledWhileWritten(opened(path)[0]), opened(path)[1])
    )
    log = EventLog(folder.as_uri())
    for step in range(1, 5):
        log.add_scalars({"loss": 10.0 - step}, step)
        if step == 2:
            log.flush()
    log.close()
    shown.Reload()
    assert "loss" in shown.Tags()["scalars"]
    assert [(e.step, e.value) for e in shown.Scalars("loss")] == [
        (step, 10.0 - step) for step in range(1, 5)
    ]


def test_a_resumed_event_log_drops_every_tag_from_its_purge_step_on(tmp_path):
    """A run that died after step 5 (its events flushed) and resumed from the checkpoint of
    step 3: the dead run's events of step 4 on, of every tag, are hidden, so that a test
    accuracy it wrote at step 5 is not shown beside the resumed run's.

    The dead run's file is named as one started a minute earlier, as it would be: TensorBoard
    reads a folder's files in name order, and two writers of one process in one second are
    told apart by a counter that sorts 10 before 9, so after nine writers in the test process
    (any earlier test's) the resumed file came first and the dead run's steps 4 and 5 were
    shown after it."""
    folder = tmp_path / "tensorboard"
    dead = EventLog(str(folder))
    for step in range(1, 6):
        dead.add_scalars({"loss": 10.0 - step}, step)
    dead.add_scalars({"test_accuracy": 0.5}, 5)
    dead.flush()
    (written,) = folder.iterdir()
    parts = written.name.split(".", 4)  # events, out, tfevents, start time, host.pid.counter
    parts[3] = str(int(parts[3]) - 60)
    written.rename(folder / ".".join(parts))
    resumed = EventLog(str(folder), purge_step=4)
    resumed.add_scalars({"loss": 16.0}, 4)
    resumed.close()
    assert scalars(folder, "loss") == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 16.0)]
    assert scalars(folder, "test_accuracy") == []
    dead.writer.close()


@pytest.mark.parametrize("command", ["raydeq.train", "raydeq.bench"])
def test_a_non_ascii_path_under_a_locale_not_utf8_is_one_line_not_two_folders(tmp_path, command):
    """Under LC_ALL=C (or a Latin-1 locale) Python writes a path in the locale's encoding,
    pyarrow, Ray and TensorBoard in UTF-8: raydeq.train's storage_path=runs-é ended in a
    traceback (a Latin-1 locale made two folders first), and so did bench's --out."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env.pop("PYTHONIOENCODING", None)
    folder = tmp_path / "runs-é"
    digits = os.path.join(os.path.dirname(__file__), "..", "tune_configs", "digits.yaml")
    argv = {
        "raydeq.train": [digits, f"storage_path={folder}"],
        "raydeq.bench": ["--quick", "--only", "step_cost", "--out", str(folder)],
    }[command]
    done = subprocess.run(
        [sys.executable, "-m", command, *argv], env=env, capture_output=True, timeout=300
    )
    err = done.stderr.decode("utf-8").splitlines()
    expected = (
        f"{folder} is not ASCII, and this locale writes paths in ascii, pyarrow and Ray in "
        "UTF-8; run under a UTF-8 locale (LC_ALL=C.UTF-8) or with PYTHONUTF8=1"
    )
    assert done.returncode == 2 and err[-1].endswith(expected), err
    assert not list(tmp_path.iterdir())


def test_a_path_of_bytes_that_are_no_utf8_under_a_utf8_locale_is_named_as_such():
    """Under a UTF-8 locale a folder named in Latin-1 (runs-\\xe9) was refused with the advice
    to run under a UTF-8 locale, the one it ran under; the refusal now names its bytes."""
    assert sys.getfilesystemencoding() == "utf-8"
    with pytest.raises(storage.StorageError) as refused:
        storage.absolute(os.fsdecode(b"/data/runs-\xe9"))
    assert str(refused.value) == (
        "b'/data/runs-\\xe9' holds bytes that are no UTF-8 (a name written in another "
        "encoding), which pyarrow and Ray cannot name; rename it in UTF-8"
    )


def test_the_folder_of_a_users_run_locks_is_private_under_any_umask(tmp_path, monkeypatch):
    """Under umask 000 the folder of this user's lock files in the temporary folder was made
    writable by every user (mode 0777), and one that another user had made first was taken as
    it was: either could remove a driver's lock or link its name to a file of this user's,
    which the next start empties. It is now 0700, and another user's is refused."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run = str(tmp_path / "runs" / "a")
    folder = runlock.lock_file(run).parent
    umask = os.umask(0)
    try:
        with runlock.hold(run):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        folder.chmod(0o777)
        with runlock.writing_results(run):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    finally:
        os.umask(umask)
    monkeypatch.setattr(os, "getuid", lambda: 4321 if os.geteuid() != 4321 else 4322)
    other = runlock.lock_file(run).parent
    other.mkdir()
    with pytest.raises(storage.StorageError) as refused:
        with runlock.hold(run):
            pass
    assert str(refused.value) == (
        f"{other}, the folder of this user's run locks, is not a folder of this user's (owner "
        f"uid {os.geteuid()}); remove it, or set TMPDIR to a folder of your own"
    )


def test_a_results_writer_kept_waiting_names_the_lock_and_its_holder(
    tmp_path, monkeypatch, lock_waits
):
    """A --report that met the results lock held (by the run's end, another --report, or a dead
    NFS client until its server lets it go) waited without a word for as long as it was held;
    it now says at once what it waits for, where, and for whom, then takes the lock."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    experiment = tmp_path / "runs" / "e"
    experiment.mkdir(parents=True)
    entered = threading.Event()

    def report() -> None:
        with runlock.writing_results(str(experiment)):
            entered.set()

    with runlock.writing_results(str(experiment)):
        reporter = threading.Thread(target=report, daemon=True)
        reporter.start()
        waits = lock_waits(reporter)
        assert not entered.is_set()
    reporter.join(WAIT_S)
    assert entered.is_set()
    lock = runlock.lock_file(str(experiment)).with_suffix(".results")
    assert waits == [
        f"Waiting for the results of {experiment}: its lock {lock} is held by process "
        f"{os.getpid()} on this machine"
    ]


def test_results_are_written_under_a_lock_a_full_disk_leaves_unnamed(tmp_path):
    """A results writer names itself in its lock for the writers it keeps waiting; where no
    byte can be written (a full temporary folder, here a file size limit of 0) the naming
    failed the writer with EFBIG, where the lock alone is what it needs; it now holds it
    unnamed."""
    experiment = tmp_path / "runs" / "e"
    experiment.mkdir(parents=True)
    (tmp_path / "tmp").mkdir()
    script = (
        "import resource, signal, tempfile\nfrom raydeq.training import runlock\n"
        "tempfile.gettempdir()\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))\n"
        f"with runlock.writing_results({str(experiment)!r}):\n    print('held')"
    )
    done = subprocess.run(
        [sys.executable, "-B", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "held\n", "")
