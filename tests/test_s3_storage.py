"""storage_path s3://...: a Tune experiment stores its checkpoints, TensorBoard events and
results in an S3 bucket, served by a local S3-compatible server (moto) at the endpoint that
tests/conftest.py gives every process of the session."""

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import conftest
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raydeq.training import checkpoint, reporting
from raydeq.training.eventlog import EventLog

moto_server = pytest.importorskip("moto.server")
BUCKET = "raydeq-runs"


@pytest.fixture
def s3() -> pyarrow.fs.S3FileSystem:
    """An empty bucket on a local S3 server; the filesystem that reads it."""
    endpoint = urlparse(os.environ["AWS_ENDPOINT_URL"])
    server = moto_server.ThreadedMotoServer(
        ip_address=endpoint.hostname, port=endpoint.port, verbose=False
    )
    server.start()
    filesystem = pyarrow.fs.S3FileSystem(
        endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True
    )
    filesystem.create_dir(BUCKET)
    yield filesystem
    server.stop()


def test_the_endpoints_port_is_kept_from_other_sockets_while_no_server_runs() -> None:
    """The endpoint's port, found free as the session began and let go, could be taken by any
    socket before the S3 server bound it, which then never started; no other socket binds it."""
    if conftest.S3_PORT.fileno() == -1:
        pytest.skip("this system lets no server bind a port that another socket holds")
    port = urlparse(os.environ["AWS_ENDPOINT_URL"]).port
    with socket.socket() as other, pytest.raises(OSError) as refused:
        other.bind(("127.0.0.1", port))
    assert refused.value.errno == errno.EADDRINUSE


def test_the_endpoints_port_is_let_go_where_no_server_could_bind_it_beside(monkeypatch) -> None:
    """On macOS and the BSDs a socket that sets SO_REUSEADDR cannot bind the address and port
    of another one that did (here: sockets that set nothing, which Linux refuses so too), so
    the S3 server's start on the held port waited for good; the port is then let go, and the
    server binds it."""
    held = socket.socket()
    with monkeypatch.context() as bsd:
        bsd.setattr(socket.socket, "setsockopt", lambda *args: None)
        port = conftest.held_port(held)
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
    assert held.fileno() == -1


def download(s3: pyarrow.fs.S3FileSystem, folder: str, target: Path) -> list[Path]:
    """Copy a folder of the bucket to `target`; the local files."""
    target.mkdir(parents=True)
    pyarrow.fs.copy_files(folder, str(target), source_filesystem=s3)
    return sorted(path for path in target.rglob("*") if path.is_file())


def test_an_experiment_on_s3_keeps_checkpoints_tensorboard_and_results_there(
    ray_cluster, s3, tmp_path
):
    settings = {
        "model": {"model": "mnist_dense", "variant": "skip_reg"},
        "data": {"dataset": "digits", "batch_size": 8},
        "train": {"epochs": 1, "max_steps": 6, "report_every": 2, "checkpoint_every": 3},
        "scaling": {"num_workers": 1},
    }
    (tmp_path / "s3run.yaml").write_text(yaml.safe_dump(settings))
    command = [sys.executable, "-m", "raydeq.tune", str(tmp_path / "s3run.yaml")]
    command += ["--storage", f"s3://{BUCKET}/experiments"]
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert f"tensorboard --logdir s3://{BUCKET}/experiments/s3run" in done.stdout

    experiment = f"{BUCKET}/experiments/s3run"
    (row,) = pq.read_table(f"{experiment}/results.parquet", filesystem=s3).to_pylist()
    assert row["status"] == "TERMINATED" and row["step"] == 6
    with s3.open_input_stream(f"{experiment}/results.md") as stream:
        assert "| all | 1 |" in stream.readall().decode()
    with s3.open_input_stream(f"{experiment}/test_accuracy.png") as stream:
        assert stream.read(4) == b"\x89PNG"
    trial = f"{experiment}/{row['trial']}"
    files = download(s3, trial, tmp_path / "trial")
    states = [p.parent for p in files if p.name == checkpoint.STATE_FILE]
    steps = sorted(checkpoint.read_checkpoint(folder)["step"] for folder in states)
    assert steps == [3, 6]
    events = EventAccumulator(str(tmp_path / "trial" / "train" / reporting.TENSORBOARD_DIR))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("test_accuracy")] == [6]
    assert events.Scalars("test_accuracy")[0].value == pytest.approx(row["test_accuracy"])


def test_events_on_s3_are_segments_up_to_each_flush_and_a_resume_replaces_the_rest(s3, tmp_path):
    folder = f"s3://{BUCKET}/run/tensorboard"
    first = EventLog(folder)
    for step in range(1, 6):
        first.add_scalars({"loss": 10.0 - step}, step)
        if step == 3:
            first.flush()  # a checkpoint at step 3
    assert len(download(s3, f"{BUCKET}/run/tensorboard", tmp_path / "early")) == 1
    resumed = EventLog(folder, purge_step=4)  # the first writer died after step 5
    for step in range(4, 7):
        resumed.add_scalars({"loss": 20.0 - step}, step)
    resumed.close()
    files = download(s3, f"{BUCKET}/run/tensorboard", tmp_path / "events")
    assert len(files) == 2 and files == sorted(files)
    events = EventAccumulator(str(tmp_path / "events"))
    events.Reload()
    values = [(e.step, e.value) for e in events.Scalars("loss")]
    assert values == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 16.0), (5, 15.0), (6, 14.0)]
    first.writer.close()
