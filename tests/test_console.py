"""The commands' output on standard streams that are closed, cannot encode it, or lose their
reader."""

import io
import os
import shlex
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import ray
from conftest import ticking

from raydeq.training import console, launch
from raydeq.training.console import output_kept


def test_a_character_the_stream_cannot_encode_is_written_in_ascii_not_a_traceback(monkeypatch):
    """An ASCII stdout (LC_ALL=C, PYTHONUTF8=0) ended `tune` in a UnicodeEncodeError on the
    results table's ±, after the run; a path's undecodable bytes go out as they came in."""
    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    with output_kept():
        print("| Skip DEQ | 2 | 74.79 ± 2.17 |")
        print("results in /tmp/s\udcc3\udca9, \u2192 done")
        sys.stdout.flush()
    assert sys.stdout is stdout and stdout.errors == "strict"
    assert raw.getvalue() == (
        b"| Skip DEQ | 2 | 74.79 +- 2.17 |\nresults in /tmp/s\xc3\xa9, \\u2192 done\n"
    )


def test_output_whose_reader_went_away_is_dropped_and_the_command_goes_on(monkeypatch):
    """`python -m raydeq.tune digits | head -1` ended in a BrokenPipeError raised in Tune's
    trial callback, with the trials left unfinished; the lines after the reader went are
    dropped, and the descriptor points at /dev/null after."""
    read, write = os.pipe()
    stdout = io.TextIOWrapper(os.fdopen(write, "wb", buffering=0), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        with output_kept():
            print("tensorboard --logdir runs/digits", flush=True)
            assert os.read(read, 100) == b"tensorboard --logdir runs/digits\n"
            os.close(read)
            for step in range(3):
                print(f"step {step}", flush=True)
            print("table", end="")
        assert os.path.samestat(os.fstat(write), os.stat(os.devnull))
    finally:
        stdout.close()


def test_a_closed_stdout_neither_stops_connect_nor_lends_its_number_to_a_file(
    monkeypatch, connect_env_kept
):
    """With stdout closed (`>&-`) Python's sys.stdout is None: connect's terminal check ended
    both commands in an AttributeError, and the next file opened took descriptor 1."""
    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    context = SimpleNamespace(dashboard_url="127.0.0.1:8265")  # what ray.init returns
    monkeypatch.setattr(ray, "init", lambda **options: started.append(options) or context)
    monkeypatch.setattr(sys, "stdout", None)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    monkeypatch.setenv(launch.COLOR_PREFIX, "1")
    launch.connect()
    assert len(started) == 1


def test_a_closed_descriptor_is_opened_on_dev_null_for_the_command(tmp_path):
    """A file the run opens never takes the number of a closed stdout or stderr, where what
    Ray's processes print would be written into it."""
    script = textwrap.dedent(
        """
        import os
        from raydeq.training.console import output_kept
        with output_kept():
            fd = os.open(os.path.join(os.environ["FOLDER"], "state"), os.O_WRONLY | os.O_CREAT)
            null = os.stat(os.devnull)
            same = [os.path.samestat(os.fstat(n), null) for n in (1, 2)]
            with open(os.path.join(os.environ["FOLDER"], "out"), "w") as out:
                print(fd > 2, *same, file=out)
        """
    )
    subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "FOLDER": str(tmp_path)},
        preexec_fn=lambda: (os.close(1), os.close(2)),
        check=True,
    )
    assert (tmp_path / "out").read_text() == "True True True\n"


def test_the_tensorboard_command_quotes_a_folder_the_shell_would_split():
    """A run folder with a space was printed unquoted, so the line pasted into a shell gave
    TensorBoard two arguments; folders and URIs without one are printed as they are."""
    assert console.tensorboard_command("/data/my runs/digits") == (
        "tensorboard --logdir '/data/my runs/digits'"
    )
    assert shlex.split(console.tensorboard_command("/data/it's")) == [
        "tensorboard",
        "--logdir",
        "/data/it's",
    ]
    for plain in ("runs/digits", "s3://bucket/experiments/s3run"):
        assert console.tensorboard_command(plain) == f"tensorboard --logdir {plain}"


def test_a_long_task_says_how_far_it_has_come_on_stderr_at_most_every_five_seconds(
    monkeypatch, capsys
):
    """Parts 2 s apart: a line at the start of each part begun 5 s or more after the line
    before, with the part it starts and the time left at the pace so far; nothing on stdout,
    and nothing at all from a task whose parts come faster."""
    ticking(monkeypatch, 2.0)
    shown = console.Progress("copying", 6)
    for name in "abcdef":
        shown.next(f"file {name}")
    assert capsys.readouterr() == (
        "",
        "copying: 2/6, file c, eta 12s\ncopying: 5/6, file f, eta 2s\n",
    )
    ticking(monkeypatch, 0.5)
    quick = console.Progress("copying", 9)
    for _ in range(9):
        quick.next()
    assert capsys.readouterr() == ("", "")


def test_first_line_is_a_messages_first_line_or_its_types_name_where_it_has_none():
    """The one-line reason of an error: an empty message gave an IndexError."""
    assert console.first_line(OSError("no space\n/arrow/cpp/src/io.cc:12")) == "no space"
    assert console.first_line(OSError()) == "OSError"
    assert console.first_line(ValueError(" \n")) == "ValueError"
