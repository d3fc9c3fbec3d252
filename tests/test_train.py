"""The training run: CLI errors, the loop in the driver, checkpoints, and Ray end-to-end runs."""

import contextlib
import copy
import dataclasses
import errno
import functools
import hashlib
import io
import itertools
import json
import logging
import math
import operator
import os
import pickle
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pyarrow.fs
import pytest
import ray
import ray.cloudpickle
import torch
from conftest import tensorboard_data, ticking
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
from ray.cluster_utils import Cluster
from ray.train import Checkpoint, FailureConfig, ScalingConfig
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2._internal.execution.worker_group.poll import WorkerGroupPollStatus, WorkerStatus
from ray.util.state import list_actors
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.context import RequestContext
from tensorboard.data.provider import RunTagFilter
from tensorboard.summary.writer import record_writer
from tensorboard.util import tensor_util
from test_deq import tiny_mdeq
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from raydeq import deq, models, train, tune
from raydeq.experiments import results
from raydeq.experiments.run import SETTINGS_FILE
from raydeq.solvers import Status, adjoint, driver
from raydeq.solvers.state import Structure
from raydeq.training import (
    checkpoint,
    config,
    data,
    eventlog,
    launch,
    load_model,
    loop,
    objective,
    preflight,
    reporting,
    runlock,
    storage,
)
from raydeq.training.checkpoint import MANIFEST_FILE, REPORTS_FILE, STATE_FILE, read_checkpoint
from raydeq.training.config import Config, validate
from raydeq.training.interrupts import interruptible
from raydeq.training.launch import LOCAL_ENV_VARS
from raydeq.training.session import Session, TrainWorker, TuneTrial, stored_checkpoints
from raydeq.training.state import TrainState, rng_state

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

METRICS = (
    "train_loss",
    "train_accuracy",
    "nfe",
    "backward_nvjp",
    "forward_time",
    "backward_time",
    "optimizer_time",
    "data_time",
    "step_time",
    "images_per_second",
    "skip_loss",
    "jac_loss",
    "residual",
    "unconverged_fraction",
    "backward_unconverged_fraction",
    "skipped_steps",
    "overflow_steps",
    "test_accuracy",
    "test_top5_accuracy",
    "test_nfe",
    "predict_time",
    "test_unconverged_fraction",
)
LOCAL = ScalingConfig(num_workers=0)
pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(tmp_path: Path, **train_options: Any) -> Config:
    """A short digits run stored under tmp_path, named `run`."""
    return validate(
        {
            "name": "run",
            "storage_path": str(tmp_path),
            "train": {"epochs": 1, "report_every": 2, **train_options},
            "scaling": {"max_failures": 1},
        }
    )


def steps_by_tag(path: Path) -> dict[str, list[int]]:
    """The steps of every TensorBoard scalar in an event file or folder (after purges)."""
    events = EventAccumulator(str(path))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def event_files(cfg: Config) -> list[Path]:
    """The run's TensorBoard event files, oldest first."""
    return sorted(Path(cfg.run_dir, reporting.TENSORBOARD_DIR).glob("events.out.tfevents.*"))


# Command line ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.solver=rk4"], "error: model.solver: 'rk4' is not allowed; choose one of vcab3"),
        (["optim.lr=-1"], "error: optim.lr: must be > 0, got -1.0"),
        (["scaling.num_workers=0"], "error: scaling.num_workers: must be >= 1, got 0"),
        (["bogus=1"], "error: bogus: unknown key; allowed keys in config: name,"),
        (
            ["data.dataset=mnist", "data.data_dir=/nonexistent/mnist"],
            "error: dataset 'mnist' not found in /nonexistent/mnist: expected MNIST/raw/",
        ),
        (
            ["data.dataset=fake", "data.fake_shape=[3,8,8]"],
            "error: model: 'mnist_dense' does not fit 'fake' images of shape (3, 8, 8)",
        ),
        (
            ["data.dataset=fake", "data.fake_classes=20"],
            "error: model: 'mnist_dense' predicts 10 classes, fewer than the 20 of dataset 'fake'",
        ),
        (
            ["model.variant=neural_ode", "model.solver=broyden"],
            "error: model.solver='broyden' is not one of",
        ),
        (
            ["data.batch_size=4096"],
            "error: data.batch_size=4096 exceeds the 1438 training samples of 'digits'; lower it",
        ),
        (
            ["model.variant=vanilla", "train={lambda_skip: 0.5}"],
            "error: train.lambda_skip: 0.5 weighs the skip loss, which variant 'vanilla' does "
            "not have; set model.variant to skip or skip_reg, or remove train.lambda_skip",
        ),
        # Taken, and one run trained.
        (
            ["search.num_samples=4"],
            "error: search.num_samples=4: raydeq.train trains one run and reads no search "
            "section, so this changes nothing; give it to raydeq.tune, which runs the search",
        ),
    ],
)
def test_bad_input_exits_with_code_2_and_one_line_before_ray_starts(
    tmp_path, capsys, overrides, expected
):
    path = tmp_path / "run.yaml"
    path.write_text("data: {dataset: digits}\n")
    storage = tmp_path / "runs"
    assert train.main([str(path), f"storage_path={storage}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1
    assert not storage.exists() or not any(storage.iterdir())


@pytest.mark.parametrize("variant", ["vanilla", "skip", "neural_ode"])
def test_images_too_small_for_the_heads_group_norms_are_refused_before_training(variant):
    """mnist_mdeq strides 2x2 images to 1x1, where a group norm of its head holds one value
    per group: that took the preflight's stem and failed the first step of a batch of 1 in
    torch's 'Expected more than 1 value per channel' (or trained that group's output as its
    bias alone); the preflight now runs the head on the layer's zero state and refuses it."""
    cfg = validate(
        {
            "model": {"model": "mnist_mdeq", "variant": variant},
            "data": {"dataset": "fake", "fake_shape": [1, 2, 2], "batch_size": 1},
            "scaling": {"num_workers": 1},
        }
    )
    with pytest.raises(config.ConfigError) as caught:
        preflight.check_model(cfg)
    assert str(caught.value).startswith(
        "model: 'mnist_mdeq' does not fit 'fake' images of shape (1, 2, 2): "
    )
    fits = validate({"model": {"model": "mnist_mdeq"}, "data": {"dataset": "fake"}})
    preflight.check_model(fits)  # 28x28


def test_unwritable_storage_is_a_clear_error_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(storage.StorageError, match=f"storage_path {blocker}/runs is not writable"):
        storage.check_storage(str(blocker / "runs"))
    path = tmp_path / "run.yaml"
    path.write_text(f"storage_path: {blocker}/runs\n")
    assert train.main([str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: storage_path {blocker}/runs is not writable")


@pytest.mark.parametrize(
    ("uri", "error"),
    [
        ("file:///data/my runs", "is not a URI that pyarrow reads: a space or a non-ASCII "),
        ("nosuch://bucket/runs", "is not writable: Unrecognized filesystem type in URI: "),
    ],
)
def test_a_storage_uri_that_cannot_be_read_is_a_clear_error_before_the_run_is_read(
    tmp_path, capsys, uri, error
):
    """The preflight read the run's checkpoints before it checked the storage, so a URI
    pyarrow cannot parse (a space) or of no known scheme ended in a traceback (ArrowInvalid)
    where it was refused with exit status 2 naming the storage; it is refused so again."""
    path = tmp_path / "run.yaml"
    path.write_text(f"scaling: {{device: cpu}}\nstorage_path: '{uri}'\n")
    assert train.main([str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: storage_path {uri} {error}")


def test_the_command_exits_with_status_2_on_a_bad_config(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {lambda_skip: -1}\n")
    done = subprocess.run(
        [sys.executable, "-m", "raydeq.train", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr == f"error: train.lambda_skip: must be >= 0, got -1.0 (in {path})\n"


def test_a_shipped_experiment_file_is_found_from_a_folder_without_tune_configs(
    tmp_path, monkeypatch
):
    """`python -m raydeq.train tune_configs/digits.yaml`, as the README writes it, trains the
    shipped file when the folder it runs in has no tune_configs/ of its own."""
    started = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "run", lambda cfg, argv: started.append((cfg, argv)) or 0)
    assert train.main(["tune_configs/digits.yaml", "train.max_steps=20"]) == 0
    [(cfg, argv)] = started
    assert cfg.model.variant == "skip_reg" and cfg.scaling.num_workers == 2
    assert cfg.train.max_steps == 20 and argv == ["tune_configs/digits.yaml", "train.max_steps=20"]


def test_an_experiment_named_as_raydeq_tune_takes_it_is_its_file(tmp_path, monkeypatch):
    """`python -m raydeq.tune digits` runs tune_configs/digits.yaml, where `python -m
    raydeq.train digits` was refused ('digits: cannot read the config file'): both read the
    folder's own file, else the shipped one; a name of neither is still the missing file."""
    started = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "run", lambda cfg, argv: started.append(cfg) or 0)
    assert train.main(["digits", "train.max_steps=20"]) == 0
    assert started[0].model.variant == "skip_reg" and started[0].train.max_steps == 20
    assert train.config_file("digits") == str(
        Path(train.__file__).parent / "tune_configs/digits.yaml"
    )
    (tmp_path / "tune_configs").mkdir()
    (tmp_path / "tune_configs" / "digits.yaml").write_text("train: {max_steps: 3}\n")
    assert train.config_file("digits") == str(Path("tune_configs", "digits.yaml"))
    assert train.config_file("nothing") == "nothing"


@pytest.mark.parametrize("name", ["", " "])
def test_an_empty_config_name_is_refused_naming_it(name, capsys):
    """`python -m raydeq.train "$CONFIG"` with CONFIG unset read the current folder and said
    ': cannot read the config file (Is a directory)'; it names the empty name now."""
    assert train.main([name]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {name!r}: no such experiment file; experiments: cifar10_large, "
    )


def test_a_run_written_as_a_relative_or_an_absolute_path_has_one_lock(tmp_path, monkeypatch):
    """`runs/a` from its parent folder and the absolute path of that folder are one run: a
    driver of either spelling holds off the other; another run has its own lock."""
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "runs" / "a")
    assert runlock.lock_file("runs/a") == runlock.lock_file(absolute)
    assert runlock.lock_file("runs/a") != runlock.lock_file("runs/b")
    with runlock.hold("runs/a"), pytest.raises(runlock.RunInUse):
        with runlock.hold(absolute):
            pass


def test_a_run_reached_through_a_link_to_its_folder_has_the_lock_of_that_folder(tmp_path):
    """A storage folder named through a link (a home folder linked to a shared disk) and by
    its own path is one folder: the second driver of a run in it is refused, not let write
    and prune checkpoints beside the first."""
    (tmp_path / "disk" / "runs").mkdir(parents=True)
    (tmp_path / "home").symlink_to(tmp_path / "disk")
    linked, real = str(tmp_path / "home" / "runs" / "a"), str(tmp_path / "disk" / "runs" / "a")
    assert runlock.lock_file(linked) == runlock.lock_file(real)
    with runlock.hold(linked), pytest.raises(runlock.RunInUse):
        with runlock.hold(real):
            pass


def test_a_run_that_a_process_here_is_running_is_refused_until_it_ends(tmp_path, capsys):
    """Two drivers of one run folder would both resume from it and prune each other's
    checkpoints; the second is refused, naming the first, until the first ends (however it
    ends: the lock is the system's)."""
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{dataset: digits}}\nstorage_path: {tmp_path / 'runs'}\n")
    cfg = config.load(str(path))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from raydeq.training import runlock\n"
            f"with runlock.hold({cfg.run_dir!r}):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        assert train.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"error: {cfg.run_dir} is being run by process {holder.pid} on this machine; wait "
            "for it to end (or stop it), or give this run another name\n"
        )
        with pytest.raises(runlock.RunInUse):
            with runlock.hold(cfg.run_dir):
                pass
    finally:
        holder.kill()
        holder.communicate()
    with runlock.hold(cfg.run_dir), pytest.raises(runlock.RunInUse, match=f"{os.getpid()}"):
        with runlock.hold(cfg.run_dir):
            pass


def test_a_cluster_address_where_no_ray_answers_is_one_line_not_minutes_of_retries(
    tmp_path, capsys, monkeypatch
):
    """Ray retries a dead address for minutes; a `ray start` that ended without `ray stop`
    leaves its address in Ray's temporary folder, where connect would read it."""
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{dataset: digits}}\nstorage_path: {tmp_path / 'runs'}\n")
    dead = f"127.0.0.1:{launch.free_port()}"
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    monkeypatch.setenv("RAY_ADDRESS", dead)
    assert train.main([str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: no Ray answers at {dead} (RAY_ADDRESS); start that cluster, or set "
        "RAY_ADDRESS to a running one\n"
    )
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(ray._private.utils, "read_ray_address", lambda *args: dead)
    assert train.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert f"no Ray answers at {dead}, named by " in err and "or delete the file" in err


def test_ray_trains_v1_api_turned_on_is_one_line_naming_the_variable(tmp_path, capsys, monkeypatch):
    """RAY_TRAIN_V2_ENABLED=0 turns on Ray Train's v1 API, which lacks LoggingConfig: both
    commands ended in an ImportError's traceback (raydeq.tune as it imported). They stop in one
    line naming the setting, and a cluster's processes get the v2 API unless it is set here."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    line = (
        "error: RAY_TRAIN_V2_ENABLED={} turns off Ray Train's v2 API, which raydeq runs on; "
        "unset RAY_TRAIN_V2_ENABLED, or set it to 1"
    )
    tune_runs = {  # side by side: each is a Python's start and an import
        value: subprocess.Popen(
            [sys.executable, "-m", "raydeq.tune", "digits", "--storage", str(tmp_path / value)],
            env=env | {"RAY_TRAIN_V2_ENABLED": value},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for value in ("0", "false")
    }
    for value, tune_run in tune_runs.items():
        err = tune_run.communicate(timeout=120)[1]
        assert (tune_run.returncode, err) == (2, line.format(value) + "\n")
    assert not (tmp_path / "0" / "digits" / SETTINGS_FILE).exists()
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{dataset: digits}}\nstorage_path: {tmp_path / 'runs'}\n")
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "0")
    assert train.main([str(path)]) == 2
    assert capsys.readouterr().err == line.format("0") + "\n"
    monkeypatch.delenv("RAY_TRAIN_V2_ENABLED")
    assert launch.runtime_env()["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"


def test_a_dashboard_address_or_an_auto_that_finds_no_single_ray_is_one_line(
    tmp_path, capsys, monkeypatch
):
    """RAY_ADDRESS set to the dashboard's URL, as for `ray job submit`, and RAY_ADDRESS=auto
    where no Ray runs here ended in ray.init's traceback (31 lines for the URL); with several
    and no `ray start`, `auto` joined either. Each is one line naming the fix."""
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{dataset: digits}}\nstorage_path: {tmp_path / 'runs'}\n")
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    monkeypatch.setattr(ray._private.utils, "read_ray_address", lambda *args: None)
    dashboard = "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", dashboard)
    assert train.main([str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: RAY_ADDRESS={dashboard} is a dashboard's address, which `ray job submit` "
        "takes, where a run joins a cluster at its GCS address (host:6379, as `ray start "
        f"--head` prints it); submit the command with `ray job submit --address {dashboard} "
        "-- python -m ...`, or set RAY_ADDRESS to the GCS address, or unset it\n"
    )
    # With several, ray.init's `auto` joins any: one that another run started ends with it.
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    fix = "set RAY_ADDRESS to the cluster's address (host:port), or unset it to start a Ray of "
    dead = [f"127.0.0.1:{launch.free_port()}" for _ in range(2)]
    for found, reason in [
        ([], "no Ray runs on this machine; "),
        (dead, f"2 Rays run on this machine ({', '.join(sorted(dead))}) and no `ray start` "),
    ]:
        monkeypatch.setattr(ray._private.services, "find_gcs_addresses", lambda f=found: f)
        assert train.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: RAY_ADDRESS=auto: {reason}"), err
        assert err.endswith(f"{fix}the run's own\n") and err.count("\n") == 1
    for one, started in [(dead[:1], None), (dead, dead[1])]:  # the one, or `ray start`'s
        monkeypatch.setattr(ray._private.services, "find_gcs_addresses", lambda f=one: f)
        monkeypatch.setattr(ray._private.utils, "read_ray_address", lambda *args, s=started: s)
        assert train.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: no Ray answers at {started or one[0]} (RAY_ADDRESS)")


def test_a_ray_jobs_storage_in_its_working_dir_copy_is_refused_and_resumes_name_files_there(
    tmp_path, capsys, monkeypatch
):
    """`ray job submit --working-dir DIR` runs the command in Ray's copy of DIR, which Ray
    deletes: `tune digits` stored its runs in .../working_dir_files/_ray_pkg_<hash>/runs, and
    its resume command named the experiment file in that copy, which the next job's copy is
    not. Both commands refuse such a storage; a resume command names the files of the working
    directory relative to it, as a job submitted again with it has them."""
    copy = tmp_path / "working_dir_files" / "_ray_pkg_0123"
    shutil.copytree(Path(__file__).parents[1] / "tune_configs", copy / "tune_configs")
    monkeypatch.chdir(copy)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    monkeypatch.setattr(launch, "check_cluster", lambda: None)
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps(job))
    fix = (
        "Ray's copy of this job's working directory, which Ray deletes with the job's files; "
        "give an absolute storage folder outside it (storage_path=..., or --storage for "
        "raydeq.tune), such as one on a shared disk\n"
    )
    assert tune.main(["digits"]) == 2
    assert capsys.readouterr().err == f"error: storage {copy}/runs/digits lies in {copy}, {fix}"
    assert train.main(["tune_configs/digits.yaml", "storage_path=kept"]) == 2
    assert capsys.readouterr().err == f"error: storage {copy}/kept lies in {copy}, {fix}"
    kept = tmp_path / "runs"
    args = tune._parser().parse_intermixed_args(["digits", "--storage", str(kept)])
    assert shlex.split(tune.resume_command(args, f"{kept}/digits"))[3:] == [
        "tune_configs/digits.yaml",
        "--resume",
        "--storage",
        str(kept),
    ]
    argv = ["tune_configs/digits.yaml", "data.dataset=mnist", "data.data_dir=data"]
    cfg = config.load(argv[0], [*argv[1:], f"storage_path={kept}"])
    words = shlex.split(train.resume_command(cfg, argv))
    assert (words[3], words[-1]) == ("tune_configs/digits.yaml", "data.data_dir=data")
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR)  # outside a job: absolute, from anywhere
    words = shlex.split(train.resume_command(cfg, argv))
    assert (words[3], words[-1]) == (
        f"{copy}/tune_configs/digits.yaml",
        f"data.data_dir={copy}/data",
    )
    assert launch.job_folder() is None
    launch.check_kept(str(copy / "runs"))


def test_a_ray_job_that_changes_folder_first_stores_outside_its_working_dir_copy(
    tmp_path, capsys, monkeypatch
):
    """A job whose entrypoint changes folder (`cd SHARED && python -m raydeq.train ...`) was
    taken to run in Ray's copy of its working directory: its storage SHARED/runs was refused
    as lying in a copy that Ray deletes, naming SHARED as that copy. The copy is the
    PYTHONPATH entry Ray names after the working directory's package."""
    copy = tmp_path / "working_dir_files" / "_ray_pkg_0123"
    shared = tmp_path / "shared"
    copy.mkdir(parents=True)
    shared.mkdir()
    monkeypatch.chdir(shared)
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps(job))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(copy), str(tmp_path / "lib")]))
    assert launch.job_folder() == str(copy)
    launch.check_kept(str(shared / "runs"))
    assert launch.as_submitted(str(shared / "data")) == str(shared / "data")
    with pytest.raises(config.ConfigError) as refused:
        launch.check_kept(str(copy / "runs"))
    assert str(refused.value).startswith(f"storage {copy}/runs lies in {copy}, Ray's copy")
    assert launch.as_submitted(str(copy / "tune_configs")) == "tune_configs"


def test_a_ray_jobs_working_dir_copy_under_a_linked_temporary_folder_is_found(
    tmp_path, capsys, monkeypatch
):
    """On macOS Ray unpacks a job's working directory under /tmp/ray, /tmp being a link to
    /private/tmp: the PYTHONPATH entry names the copy through the link, the job's current folder
    reads as the real path. `tune digits` and raydeq.train then stored their runs in the copy,
    which Ray deletes, and the resume commands named its files by absolute path; the copy is now
    found by either path."""
    real = tmp_path / "private" / "tmp"
    (real / "working_dir_files" / "_ray_pkg_0123").mkdir(parents=True)
    (tmp_path / "tmp").symlink_to(real, target_is_directory=True)
    copy = tmp_path / "tmp" / "working_dir_files" / "_ray_pkg_0123"
    resolved = real / "working_dir_files" / "_ray_pkg_0123"
    shutil.copytree(Path(__file__).parents[1] / "tune_configs", copy / "tune_configs")
    monkeypatch.chdir(copy)
    assert os.getcwd() == str(resolved)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    monkeypatch.setattr(launch, "check_cluster", lambda: None)
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps(job))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(copy), str(tmp_path / "lib")]))
    assert launch.job_folder() == str(copy)
    assert tune.main(["digits"]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: storage {resolved}/runs/digits lies in {copy}, Ray's copy"
    )
    assert train.main(["tune_configs/digits.yaml", "storage_path=kept"]) == 2
    assert capsys.readouterr().err.startswith(f"error: storage {resolved}/kept lies in {copy},")
    with pytest.raises(config.ConfigError):
        launch.check_kept(str(copy / "runs"))
    launch.check_kept(str(tmp_path / "runs"))
    kept = tmp_path / "runs"
    args = tune._parser().parse_intermixed_args(["digits", "--storage", str(kept)])
    assert shlex.split(tune.resume_command(args, f"{kept}/digits"))[3] == "tune_configs/digits.yaml"
    argv = ["tune_configs/digits.yaml", "data.dataset=mnist", "data.data_dir=data"]
    cfg = config.load(argv[0], [*argv[1:], f"storage_path={kept}"])
    words = shlex.split(train.resume_command(cfg, argv))
    assert (words[3], words[-1]) == ("tune_configs/digits.yaml", "data.data_dir=data")
    assert launch.as_submitted(str(tmp_path / "data")) == str(tmp_path / "data")


def test_workers_that_other_jobs_keep_waiting_on_a_cluster_are_named_in_a_note(
    tmp_path, capsys, monkeypatch
):
    """On a cluster of 2 CPUs that another job held, `tune digits` waited without a word (150 s
    and counting) and raydeq.train printed Ray Train's traceback after a minute; both now say
    first that the workers wait for CPUs other jobs hold. Where the nodes alive cannot hold
    them at all (an autoscaler adds nodes), or they fit, there is no note."""
    nodes = {"a": {"CPU": 2.0}, "b": {"CPU": 1.0, "GPU": 1.0}}
    free = {"a": {"CPU": 0.0}, "b": {"CPU": 1.0, "GPU": 1.0}}
    state = ray._private.state
    monkeypatch.setattr(state, "total_resources_per_node", lambda: nodes)
    monkeypatch.setattr(state, "available_resources_per_node", lambda: free)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 3.0, "GPU": 1.0})
    assert launch.waiting_note(3, {"CPU": 1.0}, "the run's") == (
        "note: the run's 3 workers need 1 CPU each, and other jobs hold so much of the "
        "cluster's 3 CPU that only 1 fits now; it waits until they free it (`ray status` shows "
        "what is in use)"
    )
    free["b"]["CPU"] = 0.5
    assert launch.waiting_note(1, {"CPU": 0.5, "GPU": 1.0}, "a trial's") is None
    assert launch.waiting_note(1, {"CPU": 1.0, "GPU": 1.0}, "a trial's") == (
        "note: a trial's worker needs 1 CPU, 1 GPU, and other jobs hold so much of the "
        "cluster's 3 CPU, 1 GPU that none fits now; it waits until they free it (`ray status` "
        "shows what is in use)"
    )
    assert launch.waiting_note(4, {"CPU": 1.0}, "the run's") is None  # more than the nodes
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{dataset: digits}}\nstorage_path: {tmp_path / 'runs'}\n")
    monkeypatch.setattr(launch, "check_cluster", lambda: None)
    monkeypatch.setattr(launch, "connect", lambda: False)
    monkeypatch.setattr(launch, "gpus_per_worker", lambda cfg: 0.0)
    fits_recorded(monkeypatch)
    assert train.main([str(path)]) == 0
    note = capsys.readouterr().err.splitlines()[0]
    assert note.startswith("note: the run's 2 workers need 1 CPU each, and other jobs hold")
    assert note.endswith(
        "3 CPU that none fits now; it waits until they free it (`ray status` shows what is in use)"
    )


def test_more_threads_than_a_worker_holds_cpus_are_named_in_a_note(tmp_path, capsys, monkeypatch):
    """Ray hands OMP_NUM_THREADS on to every worker: with 8 (or 2), 2 workers of 1 CPU each
    trained digits at 150 (110) img/s on 2 CPUs, against 1,900 without it, and nothing said
    why; an invalid count (0) gave each process libgomp's warning and a thread per core."""
    fix = "wait on each other's threads; unset it, and Ray gives each worker as many threads "
    fix += "as the CPUs it holds"
    counts = [("8", "runs 8 threads"), ("0", "is no thread count, so libgomp runs ")]
    counts.append(("²", "is no thread count, so libgomp runs "))  # int() refused it: traceback
    for value, runs in counts:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        note = launch.threads_note(1.0)
        assert note.startswith(f"note: OMP_NUM_THREADS={value} {runs}") and note.endswith(fix)
    assert "which holds 1 CPU (scaling.cpus_per_worker), and workers that share cores" in note
    for value, cpus in [("2", 2.0), ("1", 4.0), ("1,1", 1.0), ("2, 1", 2.0)]:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert launch.threads_note(cpus) is None
    # Ray gives a worker of less than 1 CPU one thread, and `ray exec` exports
    # OMP_NUM_THREADS=1: the same count is no cause to unset it; 2 threads on 1.5 CPUs are.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert launch.threads_note(0.5) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert launch.threads_note(1.5).startswith("note: OMP_NUM_THREADS=2 runs 2 threads")
    # A list's first count is the threads a worker runs: OMP_NUM_THREADS=1,1 runs 1.
    monkeypatch.setenv("OMP_NUM_THREADS", "4,1")
    assert launch.threads_note(1.0).startswith("note: OMP_NUM_THREADS=4,1 runs 4 threads")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert launch.threads_note(1.0) is None
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{dataset: digits}}\nstorage_path: {tmp_path / 'runs'}\n")
    monkeypatch.setattr(launch, "check_cluster", lambda: None)
    monkeypatch.setattr(launch, "connect", lambda: False)
    monkeypatch.setattr(launch, "waiting_note", lambda *args: None)
    monkeypatch.setattr(launch, "gpus_per_worker", lambda cfg: 0.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    fits_recorded(monkeypatch)
    assert train.main([str(path)]) == 0
    assert capsys.readouterr().err.splitlines()[0] == launch.threads_note(1.0)


def test_a_temporary_folder_ray_cannot_start_in_on_macos_names_what_ray_reads_there(
    tmp_path, monkeypatch
):
    """On macOS Ray reads RAY_TMPDIR, else /tmp, never TMPDIR, and refuses socket paths past
    103 bytes: the refusal told a Mac's user to set TMPDIR, which changes nothing, and said
    107 bytes."""
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert ray._common.utils.get_default_ray_temp_dir() == "/tmp/ray"
    unwritable = OSError(errno.EACCES, "Permission denied", "/tmp/ray")
    assert launch.start_error(unwritable) == (
        "Ray cannot start: /tmp/ray: Permission denied (its temporary folder); set RAY_TMPDIR "
        "to a folder you can write"
    )
    long = tmp_path / ("x" * 90)
    monkeypatch.setenv("RAY_TMPDIR", str(long))
    socket = f"{long}/ray/session_2026-12-06_10-00-00_000000_1/sockets/plasma_store"
    refused = OSError(
        f"validate_socket_filename failed: AF_UNIX path length cannot exceed 103 bytes: {socket}"
    )
    assert launch.start_error(refused) == (
        f"Ray cannot start: the socket paths in its temporary folder {long}/ray exceed 103 "
        "bytes; set RAY_TMPDIR to a folder you can write with a shorter path"
    )


def test_a_home_or_temporary_folder_ray_cannot_start_in_is_one_line_naming_what_to_set(tmp_path):
    """ray.init ended both commands in a traceback where it could not make its temporary folder
    or its token's folder ~/.ray (a file stands at each here, as an unwritable folder would
    refuse), or where its temporary folder's socket paths were too long or not ASCII."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TMPDIR", "HOME"))}
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder is needed")
    long = tmp_path / ("x" * (120 - len(str(tmp_path))))
    long.mkdir()
    accented = tmp_path / "temp é"
    accented.mkdir()
    digits = Path(__file__).parents[1] / "tune_configs" / "digits.yaml"
    fix = "set RAY_TMPDIR (or TMPDIR) to a folder you can write"
    cases = [
        (
            ["raydeq.train", str(digits)],
            {"TMPDIR": str(blocked)},
            f"Ray cannot start: {blocked}/ray: Not a directory (its temporary folder); {fix}",
        ),
        (
            ["raydeq.tune", "digits", "--storage"],
            {"HOME": str(blocked), "TMPDIR": str(tmp_path)},
            f"Ray cannot start: it keeps its token in ~/.ray, and {blocked}/.ray: Not a "
            "directory; set HOME to a folder you can write, or RAY_AUTH_TOKEN_PATH to a file "
            "that holds a token",
        ),
        (
            ["raydeq.train", str(digits)],
            {"TMPDIR": str(long)},
            f"Ray cannot start: the socket paths in its temporary folder {long}/ray exceed 107 "
            f"bytes; {fix} with a shorter path",
        ),
        (
            ["raydeq.train", str(digits)],
            {"TMPDIR": str(accented)},
            f"Ray cannot start: its temporary folder {accented}/ray is not ASCII; {fix} in ASCII",
        ),
    ]
    started = {}  # the commands run side by side: each is a process's start and Ray's refusal
    for number, (command, settings, line) in enumerate(cases):
        runs = tmp_path / f"runs{number}"
        storage = [str(runs)] if command[-1] == "--storage" else [f"storage_path={runs}"]
        process = subprocess.Popen(
            [sys.executable, "-m", *command, *storage],
            env={"HOME": str(tmp_path), **env, **settings},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        started[process] = (runs, line)
    for process, (runs, line) in started.items():
        err = process.communicate(timeout=300)[1]
        assert (process.returncode, err.splitlines()[-1:]) == (2, [f"error: {line}"])
        assert "Traceback" not in err
        assert not list(runs.rglob("*.json")), "nothing stored"


def test_a_compile_cache_folder_torch_cannot_make_is_one_line_before_ray_starts(
    tmp_path, capsys, monkeypatch
):
    """Every solve imports torch._dynamo, which makes torch's compile cache folder: with
    TORCHINDUCTOR_CACHE_DIR where none can be made, each worker failed after Ray started (1 min
    42 s for digits), in a PermissionError naming the folder alone."""
    path = tmp_path / "run.yaml"
    path.write_text(f"data: {{dataset: digits}}\nstorage_path: {tmp_path / 'runs'}\n")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder is needed")
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(blocked / "inductor"))
    assert train.main([str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: torch cannot make or write its compile cache folder {blocked / 'inductor'} "
        "(Not a directory); set TORCHINDUCTOR_CACHE_DIR to a folder you can write\n"
    )
    assert not (tmp_path / "runs").exists()


def test_a_compile_cache_folder_of_another_user_is_refused(tmp_path, monkeypatch):
    """torch's default compile cache is torchinductor_USER in the temporary folder, which
    another user of a shared machine could make first, writable by all: torch loads compiled
    code and pickles from it (a pickle put there ran as the run's user); it is now refused."""
    folder = tmp_path / "torchinductor_someone"
    folder.mkdir()
    owner = os.getuid()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder))
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)
    with pytest.raises(config.ConfigError) as refused:
        preflight.check_compile_cache()
    assert str(refused.value) == (
        f"torch's compile cache folder {folder} is not this user's (owner uid {owner}), whose "
        "owner can put code there that a compiled solve runs; remove it, or set "
        "TORCHINDUCTOR_CACHE_DIR to a folder of your own"
    )
    monkeypatch.setattr(os, "getuid", lambda: owner)
    preflight.check_compile_cache()


@pytest.mark.ray  # a Ray of its own
def test_workers_that_this_machine_cannot_hold_are_refused_not_waited_for(tmp_path):
    """On a Ray of the run's own no node ever joins: Ray Train waited a minute for the workers,
    failed, and waited again. Both commands now stop at once, before anything is stored."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cpus = os.cpu_count() + 1
    runs = tmp_path / "runs"
    digits = Path(__file__).parents[1] / "tune_configs" / "digits.yaml"
    # The digits experiment's trials have one worker: the trial's own process holds its CPUs.
    commands = {
        ("raydeq.train", str(digits), f"storage_path={runs}"): (2, cpus),
        ("raydeq.tune", "digits", "--storage", str(runs)): (1, cpus),
    }
    started = {
        subprocess.Popen(
            [sys.executable, "-m", *command, f"scaling.cpus_per_worker={cpus}"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        ): need
        for command, need in commands.items()
    }
    for process, (workers, need) in started.items():
        err = process.communicate(timeout=120)[1]
        assert process.returncode == 2, err[-2000:]
        assert err.splitlines()[-1] == (
            f"error: scaling.num_workers={workers} with {need:g} CPU per worker does not fit "
            f"on this machine ({os.cpu_count():g} CPU), which holds 0 such workers; lower "
            "scaling.cpus_per_worker, or run on a cluster (RAY_ADDRESS, or `ray start`)"
        )
    assert not (runs / "digits" / SETTINGS_FILE).exists()  # so the command can run again


def test_ctrl_c_in_the_preflight_exits_130_in_one_line(tmp_path, capsys, monkeypatch):
    """The preflight may list a large data folder: Ctrl-C there ends with 130 and a line, not
    a traceback, and leaves the run lock free."""

    def interrupt(cfg, preset_lambda_skip):
        raise KeyboardInterrupt

    path = tmp_path / "run.yaml"
    path.write_text(f"scaling: {{device: cpu}}\nstorage_path: {tmp_path / 'runs'}\n")
    monkeypatch.setattr(train, "check_run", interrupt)
    assert train.main([str(path)]) == 130
    assert capsys.readouterr().err == "\ninterrupted before training started\n"
    assert not (tmp_path / "runs").exists()
    assert runlock.holder(config.load(str(path)).run_dir) is None


def test_a_run_stored_under_the_name_an_older_raydeq_gave_its_settings_is_named_not_redone(
    tmp_path, capsys
):
    """raydeq of 2026-12-02 named `train tune_configs/digits.yaml` digits-mnist_dense-skip_reg-
    25a1a1ca, a digest of the model options it left unset as null; names now digest them
    filled in, so after an update the same command started the run again from step 1 under a
    new name (an old run's 396 steps left beside it). It is refused naming the folder, the
    options and both names, creating nothing; name= the old one resumes it, another name=
    starts anew, and a folder of the old name without checkpoints blocks nothing. Its
    lambda_skip was mnist_dense's default of then, 1.0, which the refusal names beside it
    since the default changed."""
    digits = Path(__file__).parents[1] / "tune_configs" / "digits.yaml"
    argv = [str(digits), f"storage_path={tmp_path}"]
    cfg = config.load(argv[0], argv[1:])
    assert cfg.name == "digits-mnist_dense-skip_reg-dcaaf276"
    at_then = [*argv[1:], "train.lambda_skip=1.0"]
    assert config.load(argv[0], at_then).name == "digits-mnist_dense-skip_reg-aa17a09a"
    old = tmp_path / "digits-mnist_dense-skip_reg-25a1a1ca"
    old.mkdir()
    preflight.check_resume(cfg)
    checkpoint.write_checkpoint({"step": 396}, old / "checkpoint_000396")
    assert train.main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: {old}: holds the run of these settings at train.lambda_skip 1, mnist_dense's "
        "default before 2026-12-07, under the name raydeq gave it before run names counted the "
        "model's default options (model.abstol: 0.005, model.reltol: 0.005, model.max_steps: "
        f"50, model.jac_reg: False, model.pretrain_steps: 0), where this run is named {cfg.name}; "
        f"resume it with train.lambda_skip=1 name={old.name}, or give this run another name= to "
        "start anew\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == [old.name]
    preflight.check_resume(config.load(argv[0], [*at_then, f"name={old.name}"]))
    preflight.check_resume(config.load(argv[0], [*argv[1:], "name=fresh"]))


@pytest.mark.parametrize(
    "value, when",
    [("1.0", "1, mnist_dense's default before"), ("0.1", "0.1, mnist_dense's default on")],
)
def test_a_run_at_a_presets_former_lambda_skip_is_named_not_redone(tmp_path, capsys, value, when):
    """mnist_dense's lambda_skip was 1.0 until 2026-12-07, then 0.1 until it became 0.2:
    `train tune_configs/digits.yaml` (Skip Reg.) after a change would have started anew beside
    the run of a former default. It is refused naming the setting that resumes it, which
    gives the old name; a vanilla run, which no lambda_skip trains, keeps its name."""
    digits = Path(__file__).parents[1] / "tune_configs" / "digits.yaml"
    argv = [str(digits), f"storage_path={tmp_path}"]
    cfg = config.load(argv[0], argv[1:])
    before = config.load(argv[0], [*argv[1:], f"train.lambda_skip={value}"])
    assert (cfg.train.lambda_skip, before.name != cfg.name) == (0.2, True)
    checkpoint.write_checkpoint(
        {"step": 22, "settings": config.trained_settings(before)},
        Path(before.run_dir) / "checkpoint_000022",
    )
    assert train.main(argv) == 2
    fix = value.removesuffix(".0")
    assert capsys.readouterr().err == (
        f"error: {before.run_dir}: holds the run of these settings at train.lambda_skip {when} "
        f"2026-12-07, where this run is named {cfg.name}; resume it with "
        f"train.lambda_skip={fix}, or give this run another name= to start anew\n"
    )
    preflight.check_resume(before)
    vanilla = [*argv[1:], "model.variant=vanilla"]
    assert (
        config.load(argv[0], vanilla).name
        == config.load(argv[0], [*vanilla, "train.lambda_skip=1.0"]).name
    )


def test_a_run_that_downloads_its_dataset_is_named_and_resumed_as_one_that_does_not(tmp_path):
    """data.download, which changes no trained weight, was in the run name's digest: a run
    started with data.download=true (mnist-mnist_dense-skip_reg-c1cb020b) and run again once
    its files were there started anew under a038e9a7, and name=c1cb020b was refused as
    'data.download: True there, False here'. Both settings now name a038e9a7, a start finds
    the run stored under the older name and says how to resume it, and that resumes."""
    mnist = {"dataset": "mnist", "data_dir": "/data/mnist"}
    base = {"storage_path": str(tmp_path), "data": mnist}
    downloading = validate({**base, "data": mnist | {"download": True}})
    plain = validate(base)
    assert downloading.name == plain.name == "mnist-mnist_dense-skip_reg-a038e9a7"
    old = tmp_path / "mnist-mnist_dense-skip_reg-c1cb020b"
    stored = config.trained_settings(downloading)
    stored["data"]["download"] = True  # as checkpoints recorded it before
    checkpoint.write_checkpoint({"step": 22, "settings": stored}, old / "checkpoint_000022")
    for cfg in (downloading, plain):
        with pytest.raises(config.ConfigError) as err:
            preflight.check_resume(cfg)
        assert str(err.value) == (
            f"{old}: holds the run of these settings with data.download=true in its name's "
            f"digest, where this run is named {plain.name}; resume it with name={old.name}, "
            "or give this run another name= to start anew"
        )
    for cfg in (downloading, plain):
        preflight.check_resume(dataclasses.replace(cfg, name=old.name))


def test_a_former_default_runs_name_with_data_download_resumes_with_that_name_too():
    """A run at mnist_dense's former default lambda_skip 0.1 resumes with
    train.lambda_skip=0.1 alone; the same run started with data.download=true has another
    name, which that setting does not give back: its hint adds name= too. The run's own name
    is none of its former ones."""
    cfg = validate({"data": {"dataset": "mnist", "data_dir": "/data/mnist"}})
    names = config.former_names(cfg)
    (plain, _), (downloaded, said) = [
        (name, said)
        for name, said in names.items()
        if said[0].startswith("at train.lambda_skip 0.1,")
    ]
    assert said[0].endswith(", with data.download=true in its name's digest")
    assert names[plain][1] == "train.lambda_skip=0.1"
    assert said[1] == f"train.lambda_skip=0.1 name={downloaded}"
    assert cfg.name not in names


def test_a_run_named_before_options_counted_is_no_former_run_of_a_later_default(
    tmp_path, capsys, monkeypatch
):
    """Run names counted the model's default options from 2026-12-02, and mnist_dense's
    default lambda_skip was 0.1 on 2026-12-07 only: a run given train.lambda_skip=0.1 before
    12-02 (digits-mnist_dense-skip_reg-2fcd89a2, its options unset) was never the default
    command's, which was refused beside it as holding 'the run of these settings at
    train.lambda_skip 0.1, mnist_dense's default on 2026-12-07, under the name raydeq gave it
    before run names counted the model's default options'. It now starts, while the command
    that made that run still finds it, as a vanilla one given 0.2 finds its run of before 12-02."""
    digits = Path(__file__).parents[1] / "tune_configs" / "digits.yaml"
    argv = [str(digits), f"storage_path={tmp_path}"]
    sweep = tmp_path / "digits-mnist_dense-skip_reg-2fcd89a2"
    checkpoint.write_checkpoint({"step": 22}, sweep / "checkpoint_000022")
    unset = dict.fromkeys(["abstol", "reltol", "max_steps", "jac_reg", "pretrain_steps"])
    given = config.load(argv[0], [*argv[1:], "train.lambda_skip=0.1"])
    given = dataclasses.replace(given, model=dataclasses.replace(given.model, **unset))
    assert config.default_name(given, as_former=False) == sweep.name
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(launch, "check_cluster", lambda: None)
    started = []
    monkeypatch.setattr(train, "run", lambda cfg, argv: started.append(cfg.name) or 0)
    assert train.main(argv) == 0
    assert started == ["digits-mnist_dense-skip_reg-dcaaf276"]
    assert train.main([*argv, "train.lambda_skip=0.1"]) == 2
    assert f"resume it with name={sweep.name}, or" in capsys.readouterr().err
    vanilla = config.load(argv[0], [*argv[1:], "model.variant=vanilla", "train.lambda_skip=0.2"])
    named = dataclasses.replace(vanilla, model=dataclasses.replace(vanilla.model, **unset))
    assert config.default_name(named, as_former=False) in config.former_names(vanilla, False)


def test_a_run_that_gives_lambda_skip_is_not_taken_for_one_at_the_former_default(
    tmp_path, capsys, monkeypatch
):
    """`train tune_configs/digits.yaml train.lambda_skip=0.2` beside a stored run of
    train.lambda_skip=1.0 (a sweep over the weight) was refused as holding 'the run of these
    settings at train.lambda_skip 1, mnist_dense's default before 2026-12-07', though it gave
    0.2, and a run given 0.2 was named at 0.2 before the change too. A run that gives
    lambda_skip, by an override or in its file, now starts; one that leaves it to the preset
    is still refused."""
    digits = Path(__file__).parents[1] / "tune_configs" / "digits.yaml"
    argv = [str(digits), f"storage_path={tmp_path}"]
    before = config.load(argv[0], [*argv[1:], "train.lambda_skip=1.0"])
    checkpoint.write_checkpoint(
        {"step": 22, "settings": config.trained_settings(before)},
        Path(before.run_dir) / "checkpoint_000022",
    )
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(launch, "check_cluster", lambda: None)
    started = []
    monkeypatch.setattr(train, "run", lambda cfg, argv: started.append(cfg.name) or 0)
    in_file = tmp_path / "at_0.2.yaml"
    in_file.write_text(digits.read_text().replace("\ntrain:\n", "\ntrain:\n  lambda_skip: 0.2\n"))
    assert train.main([*argv, "train.lambda_skip=0.2"]) == 0
    assert train.main([str(in_file), *argv[1:]]) == 0
    name = config.load(argv[0], argv[1:]).name
    assert started == [name, name] == ["digits-mnist_dense-skip_reg-dcaaf276"] * 2
    assert train.main(argv) == 2
    assert "resume it with train.lambda_skip=1, or" in capsys.readouterr().err


@pytest.mark.parametrize(
    "value, old, taken",
    [
        (
            "0.2",
            "ae1efa8d",
            "while mnist_dense's default was 1 or 0.1, from its train.lambda_skip 0.2, which "
            "vanilla does not train with",
        ),
        (
            "0.1",
            "8f7891e6",
            "on 2026-12-07, at train.lambda_skip 1 for its 0.1, then mnist_dense's default, "
            "which vanilla does not train with",
        ),
    ],
)
def test_a_vanilla_run_given_the_new_lambda_skip_before_the_change_is_named_not_redone(
    tmp_path, capsys, value, old, taken
):
    """A vanilla run given train.lambda_skip=0.2 before mnist_dense's default became 0.2 was
    named at 0.2 (digits-mnist_dense-vanilla-ae1efa8d), while the default was 1.0 and while it
    was 0.1, on 2026-12-07; since, such a run is named at the first former default, 1.0, which
    it trains no differently, and the same command started it anew beside its stored run. One
    given 0.1 while that was the default was named at 1.0 and is now named at 0.1. Each is
    refused naming the old name and when raydeq gave it (the first refusal said 'before
    2026-12-07' of a run that may have been named on that day), its settings given in a file;
    given on the command line, the lambda_skip, which vanilla does not train with, is refused
    saying so."""
    digits = Path(__file__).parents[1] / "tune_configs" / "digits.yaml"
    argv = [str(digits), f"storage_path={tmp_path}", "model.variant=vanilla"]
    given = [*argv, f"train.lambda_skip={value}"]
    cfg = config.load(given[0], given[1:])
    default = config.load(argv[0], argv[1:])
    assert (cfg.name == default.name) == (value == "0.2")
    old = tmp_path / f"digits-mnist_dense-vanilla-{old}"
    checkpoint.write_checkpoint({"step": 22}, old / "checkpoint_000022")
    assert train.main(given) == 2
    assert capsys.readouterr().err == (
        f"error: train.lambda_skip: {value} weighs the skip loss, which variant 'vanilla' does "
        "not have; set model.variant to skip or skip_reg, or remove train.lambda_skip\n"
    )
    in_file = tmp_path / "vanilla.yaml"
    in_file.write_text(json.dumps(config.given_settings(given[0], given[1:])))
    assert config.load(in_file).name == cfg.name
    assert train.main([str(in_file)]) == 2
    assert capsys.readouterr().err == (
        f"error: {old}: holds the run of these settings under the name raydeq gave it {taken}, "
        f"where this run is named {cfg.name}; resume it with name={old.name}, or give this run "
        "another name= to start anew\n"
    )
    preflight.check_resume(config.load(given[0], [*given[1:], f"name={old.name}"]))


def test_a_variant_without_a_skip_loss_resumes_at_the_lambda_skip_its_checkpoint_recorded(
    tmp_path,
):
    """A vanilla run given train.lambda_skip=0.2 before mnist_dense's default became 0.2 is
    refused naming name=digits-mnist_dense-vanilla-ae1efa8d that resumes it, but its checkpoints
    record lambda_skip 0.2 where its settings now read the first former default, 1.0, so that
    resume was refused in turn ('train.lambda_skip: 0.2 there, 1.0 here'), as was such a Tune
    trial, which takes no name=. A variant without a skip loss now resumes at any lambda_skip;
    a checkpoint of another variant still names it."""
    digits = Path(__file__).parents[1] / "tune_configs" / "digits.yaml"
    name = "name=digits-mnist_dense-vanilla-ae1efa8d"
    argv = [f"storage_path={tmp_path}", name]
    cfg = config.load(digits, [*argv, "model.variant=vanilla", "train.lambda_skip=0.2"])
    stored = config.trained_settings(cfg)
    assert stored["train"]["lambda_skip"] == 1.0
    stored["train"]["lambda_skip"] = 0.2  # as raydeq recorded it before the change
    checkpoint.write_checkpoint(
        {"step": 22, "settings": stored}, Path(cfg.run_dir) / "checkpoint_000022"
    )
    preflight.check_resume(cfg)
    preflight.check_resume(
        config.load(digits, [*argv, "model.variant=vanilla", "train.lambda_skip=0.5"])
    )
    skip_reg = config.load(digits, [*argv, "model.variant=skip_reg", "train.lambda_skip=0.5"])
    changes = r"\(model\.variant: 'vanilla' there, 'skip_reg' here; "
    changes += r"train\.lambda_skip: 0\.2 there, 0\.5 here\)"
    with pytest.raises(config.ConfigError, match=changes):
        preflight.check_resume(skip_reg)


def test_the_settings_a_resume_must_match_are_read_past_a_manifest_cut_short(tmp_path):
    """The newest checkpoint's manifest cut short (a copy killed while writing it, which the
    run passes over as it resumes) holds no settings to compare: those of the checkpoint
    before it are compared instead, so that a run of other settings is refused and one of
    the same settings resumes."""
    cfg = make_config(tmp_path)
    settings = config.trained_settings(cfg)
    checkpoint.write_checkpoint(
        {"step": 2, "settings": settings}, Path(cfg.run_dir) / "checkpoint_000002"
    )
    cut = checkpoint.write_checkpoint(
        {"step": 4, "settings": settings}, Path(cfg.run_dir) / "checkpoint_000004"
    )
    (cut / MANIFEST_FILE).write_text((cut / MANIFEST_FILE).read_text()[:20])
    path, manifest = preflight.newest_manifest(cfg.run_dir)
    assert (Path(path).name, manifest["step"]) == ("checkpoint_000002", 2)
    preflight.check_resume(cfg)
    other = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=0.1))
    with pytest.raises(config.ConfigError, match=r"optim.lr: 0.001 there, 0.1 here\)"):
        preflight.check_resume(other)


def test_a_name_given_again_with_other_settings_is_refused_naming_them(tmp_path, capsys):
    """A run's checkpoints record the settings that change its model; the same name= with
    more epochs (which would go on from them under the old schedule) is refused before Ray
    starts, naming the setting, while one with another reporting cadence resumes."""
    path = tmp_path / "run.yaml"
    path.write_text(f"name: run\nstorage_path: {tmp_path}\nscaling: {{device: cpu}}\n")
    short = {"epochs": 1, "max_steps": 2, "report_every": 2}
    cfg = config.load(str(path), [f"train.{k}={v}" for k, v in short.items()])
    loop.Loop(cfg, FolderSession(tmp_path / "run")).run()
    [saved] = (tmp_path / "run").glob("checkpoint_*")
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    assert manifest["settings"] == config.trained_settings(cfg)
    assert manifest["settings"]["train"]["epochs"] == 1
    resumed = ["train.epochs=1", "train.max_steps=2", "train.report_every=1"]
    preflight.check_resume(config.load(str(path), resumed))
    argv = [str(path), "train.epochs=3", "train.max_steps=2"]
    assert train.main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'run'}: holds a run trained with other settings (train.epochs: 1 "
        "there, 3 here); run it with those to resume it, or give this run another name=\n"
    )


@pytest.mark.parametrize(
    ("written", "now"),
    [
        ({"optim": {"optimizer": "adam", "momentum": 0.95}}, {"optim": {"optimizer": "adam"}}),
        (
            {"optim": {"schedule": "step", "milestones": [4], "step_epochs": 7, "eta_min": 0.1}},
            {"optim": {"schedule": "step", "milestones": [4]}},
        ),
        ({"data": {"fake_classes": 3, "image_size": 64}}, {}),
    ],
)
def test_a_checkpoint_of_a_setting_that_had_no_effect_resumes_without_it(tmp_path, written, now):
    """A checkpoint stored when a setting that has no effect was taken (momentum 0.95 under
    Adam, a step schedule's eta_min and step_epochs beside milestones, digits' fake_classes)
    trained as one at its default: the run resumes without that setting, which is now refused,
    while a setting that does take effect still differs."""
    base = {"name": "run", "storage_path": str(tmp_path), "scaling": {"device": "cpu"}}
    stored = config.trained_settings(config.validate(base))
    for section, values in written.items():
        stored[section].update(values)
    cfg = config.validate({**base, **now})
    config.check_settings("run", stored, cfg)
    stored["optim"]["lr"] = 0.5
    with pytest.raises(config.ConfigError, match=r"optim.lr: 0.5 there, 0.001 here\)"):
        config.check_settings("run", stored, cfg)


def test_the_settings_of_a_runs_checkpoints_are_checked_under_its_lock(tmp_path, monkeypatch):
    """The check that a run's checkpoints hold its settings ran before its lock was taken, up
    to 3 s earlier with the cluster's check between, so another driver could write checkpoints
    of other settings after the check; it now runs while this driver holds the lock."""
    checked = []
    path = tmp_path / "run.yaml"
    path.write_text(f"name: run\nstorage_path: {tmp_path}\nscaling: {{device: cpu}}\n")
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(launch, "check_cluster", lambda: None)
    monkeypatch.setattr(
        preflight, "check_resume", lambda cfg, preset: checked.append(runlock.holder(cfg.run_dir))
    )
    monkeypatch.setattr(train, "run", lambda cfg, argv: 0)
    assert train.main([str(path)]) == 0
    assert checked == [f"process {os.getpid()} on this machine"]


def test_a_loop_resuming_a_checkpoint_of_other_settings_refuses_it_naming_them(tmp_path):
    """The driver's check before Ray starts is not the only way into a run's folder (a Tune
    trial's process resumes without it): a Loop given a checkpoint of another lr went on under
    the checkpoint's lr of 0.001, where its config says 0.1; it is refused as the driver
    refuses it, naming the setting, before any of the checkpoint is loaded."""
    cfg = make_config(tmp_path, max_steps=2)
    loop.Loop(cfg, FolderSession(tmp_path / "run")).run()
    raised = dataclasses.replace(
        cfg,
        optim=dataclasses.replace(cfg.optim, lr=0.1),
        train=dataclasses.replace(cfg.train, max_steps=4),
    )
    with pytest.raises(config.ConfigError) as caught:
        loop.Loop(raised, FolderSession(tmp_path / "run"))
    assert str(caught.value) == (
        f"{tmp_path / 'run'}: holds a run trained with other settings (optim.lr: 0.001 there, "
        "0.1 here; train.max_steps: 2 there, 4 here); run it with those to resume it, or give "
        "this run another name="
    )


def written_before_settings(folder: Path) -> None:
    """Rewrite each checkpoint in `folder` as one written before checkpoints recorded their
    settings."""
    for saved in folder.glob("checkpoint_*"):
        state = read_checkpoint(saved)
        del state["settings"]
        shutil.rmtree(saved)
        checkpoint.write_checkpoint(state, saved)


@pytest.mark.parametrize(
    ("section", "changed", "named"),
    [
        ("optim", {"optimizer": "sgd"}, "optimizer state has amsgrad, betas"),
        ("optim", {"schedule": "step"}, "learning-rate schedule has T_max, eta_min"),
        (
            "optim",
            {"lr": 0.01},
            "optimizer state's initial_lr is 0.001 where this run's is 0.01 (optim.lr)",
        ),
        (
            "optim",
            {"weight_decay": 0.1},
            "optimizer state's weight_decay is 0.0 where this run's is 0.1 (optim.weight_decay)",
        ),
        (
            "optim",
            {"optimizer": "adamw"},
            "optimizer state's decoupled_weight_decay is False "
            "where this run's is True (optim.optimizer)",
        ),
        (
            "optim",
            {"eta_min": 1e-5},
            "learning-rate schedule's eta_min is 0.0 where this run's is 1e-05 (optim.eta_min)",
        ),
        (
            "train",
            {"max_steps": 4},
            "learning-rate schedule's T_max is 2 where this run's is 4 "
            "(the run's steps: train.epochs, train.max_steps)",
        ),
        (
            "train",
            {"amp": "fp16"},
            "GradScaler state is empty (trained without fp16), where this run's train.amp is fp16",
        ),
        (
            "model",
            {"variant": "skip"},
            "model lacks 2 of this run's tensors (layer.skip.0.weight, layer.skip.0.bias)",
        ),
    ],
)
def test_a_checkpoint_recording_no_settings_that_this_run_cannot_take_is_refused_naming_it(
    tmp_path, section, changed, named
):
    """A checkpoint written before checkpoints recorded their settings is not checked against
    them: one of Adam resumed with SGD stopped at its first step in torch's KeyError 'momentum',
    one of a cosine schedule went on under a StepLR holding the cosine's T_max, one without
    fp16 ended in torch's GradScaler error, another model in torch's list of keys; another
    lr, weight decay, AdamW for Adam, eta_min or length went on under the checkpoint's, which
    loading it put in place of the run's. Each is refused naming the checkpoint, its step and
    the part that does not fit."""
    cfg = make_config(tmp_path, max_steps=2)
    folder = tmp_path / "run"
    loop.Loop(cfg, FolderSession(folder)).run()
    written_before_settings(folder)
    other = dataclasses.replace(
        cfg, **{section: dataclasses.replace(getattr(cfg, section), **changed)}
    )
    with pytest.raises(checkpoint.CheckpointError) as caught:
        loop.Loop(other, FolderSession(folder))
    message = str(caught.value)
    assert message.startswith(
        f"{folder}: the checkpoint of step 2 records no settings (written before checkpoints "
        "recorded them) and does not fit this run: its "
    )
    assert named in message
    assert message.endswith(
        "; run it with the settings it was trained with, or give this run another name="
    )


def test_a_checkpoint_recording_no_settings_trained_in_fp16_is_refused_by_a_run_without_it(
    tmp_path,
):
    """The converse of an fp16 run resuming a checkpoint without a GradScaler's state: a
    checkpoint of an fp16 run, recording no settings, resumed without fp16 is refused naming
    its GradScaler state, before any of it is loaded."""
    cfg = make_config(tmp_path, max_steps=2, amp="fp16")
    folder = tmp_path / "run"
    loop.Loop(cfg, FolderSession(folder)).run()
    written_before_settings(folder)
    plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, amp="off"))
    with pytest.raises(checkpoint.CheckpointError) as caught:
        loop.Loop(plain, FolderSession(folder))
    assert str(caught.value) == (
        f"{folder}: the checkpoint of step 2 records no settings (written before checkpoints "
        "recorded them) and does not fit this run: its GradScaler state is fp16's, where this "
        "run's train.amp is not fp16; run it with the settings it was trained with, or give "
        "this run another name="
    )


def test_a_failed_run_exits_1_with_its_own_error_and_an_interrupted_one_130_with_its_command(
    tmp_path, capsys, monkeypatch
):
    """A run that Ray Train reports failed ends with status 1 and raydeq's own error in one
    line; Ctrl-C ends it with 130 and the command that resumes it, its settings included (the
    run's name comes from them: without them the command would start another run); a run
    that finishes ends with 0 and a line of its test accuracy, steps and folder."""
    path = tmp_path / "run.yaml"
    path.write_text(f"scaling: {{device: cpu}}\nstorage_path: {tmp_path / 'runs'}\n")
    argv = [str(path), "optim.lr=0.003"]
    cfg = config.load(str(path), argv[1:])
    traceback = (
        "Traceback (most recent call last):\n  File loop.py, line 154, in record\n"
        "raydeq.training.loop.NonFiniteError: training stopped at step 4: 3 steps in a row\n"
    )

    def fail(*args, **kwargs):
        raise ray.train.TrainingFailedError(traceback)

    monkeypatch.setattr(launch, "check_cluster", lambda: None)
    monkeypatch.setattr(launch, "connect", lambda: False)
    monkeypatch.setattr(launch, "waiting_note", lambda *args: None)
    monkeypatch.setattr(launch, "fit", fail)
    assert train.main(argv) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: run {cfg.run_dir} failed: NonFiniteError: training stopped at step 4: 3 steps "
        "in a row"
    )

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "fit", interrupt)
    assert train.main(argv) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted; resume with: python -m raydeq.train {path} optim.lr=0.003 "
        f"name={cfg.name} storage_path={tmp_path / 'runs'}"
    )
    finished = SimpleNamespace(metrics={"test_accuracy": 0.98765, "step": 44})
    monkeypatch.setattr(launch, "fit", lambda *args, **kwargs: finished)
    assert train.main(argv) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"test_accuracy=0.9877 steps=44 run={cfg.run_dir}"


def test_a_run_interrupted_after_its_last_checkpoint_is_stored_says_it_finished(
    tmp_path, capsys, monkeypatch
):
    """Ctrl-C as a run shut down after its last step printed 'interrupted; resume with', though
    the step's checkpoint was stored and the command would only report; a whole checkpoint
    stored by the run with its last step's report now ends it saying it finished, and where.
    One short of its steps, cut short, or stored before the run (another length's last) still
    gives the command that resumes."""
    path = tmp_path / "run.yaml"
    path.write_text(f"scaling: {{device: cpu}}\nstorage_path: {tmp_path / 'runs'}\n")
    cfg = config.load(str(path), [])
    monkeypatch.setattr(launch, "check_cluster", lambda: None)
    monkeypatch.setattr(launch, "connect", lambda: False)
    monkeypatch.setattr(launch, "waiting_note", lambda *args: None)
    last = {"step": 44, "total_steps": 44, "test_accuracy": 0.98765}
    numbers = itertools.count()

    def stored(report: dict) -> Path:
        state = {"step": report["step"], "model": {"w": torch.zeros(2)}}
        folder = Path(cfg.run_dir, f"checkpoint_{next(numbers):03d}")
        return checkpoint.write_checkpoint(state, folder, [report])

    def ended(*reports: dict, cut: bool = False) -> str:
        def fit(*args, **kwargs):
            folders = [stored(report) for report in reports]
            if cut:
                (folders[-1] / STATE_FILE).write_bytes(b"cut")
            raise KeyboardInterrupt

        monkeypatch.setattr(launch, "fit", fit)
        assert train.main([str(path)]) == 130
        return capsys.readouterr().err.splitlines()[-1]

    resume = f"interrupted; resume with: python -m raydeq.train {path} name={cfg.name} "
    assert ended(last | {"step": 43}).startswith(resume)
    assert ended(last, cut=True).startswith(resume)
    assert ended({"step": 22, "total_steps": 44}, last) == (
        f"interrupted as it shut down; the run had finished: test_accuracy=0.9877 steps=44 "
        f"run={cfg.run_dir}"
    )
    assert ended().startswith(resume)  # the last step's checkpoint was there before the run


def test_a_finished_run_run_again_says_so_and_stores_nothing(tmp_path, capsys, monkeypatch):
    """The same command run again after the run's last step evaluated it again and stored a
    second checkpoint of that step (digits, 3 steps: two folders of step 3 after two runs); it
    now says the run had finished, with its test accuracy, and starts nothing. A last step of
    another run in the folder (no recorded settings), or a newest checkpoint one step short of
    the end or cut short, still trains."""
    path = tmp_path / "run.yaml"
    path.write_text(f"scaling: {{device: cpu}}\nstorage_path: {tmp_path / 'runs'}\n")
    cfg = config.load(str(path), [])
    monkeypatch.setattr(launch, "check_cluster", lambda: None)
    monkeypatch.setattr(launch, "connect", lambda: False)
    monkeypatch.setattr(launch, "waiting_note", lambda *args: None)
    resumed = fits_recorded(monkeypatch)
    last = {"step": 44, "total_steps": 44, "test_accuracy": 0.98765}
    settings = {"settings": config.trained_settings(cfg)}

    def trains(report: dict, number: int, recorded: dict, cut: bool = False) -> bool:
        state = {"step": report["step"], "model": {"w": torch.zeros(2)}} | recorded
        folder = Path(cfg.run_dir, f"checkpoint_{number:03d}")
        checkpoint.write_checkpoint(state, folder, [report])
        if cut:
            (folder / REPORTS_FILE).write_text("{}\n")
        before = len(resumed)
        assert train.main([str(path)]) == 0
        return len(resumed) > before

    assert trains(last, 0, {})
    assert trains(last | {"step": 43}, 1, settings)
    assert trains(last, 2, settings, cut=True)
    folders = sorted(os.listdir(cfg.run_dir))
    assert not trains(last, 3, settings)
    assert sorted(os.listdir(cfg.run_dir)) == [*folders, "checkpoint_003"]
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"the run had finished, so nothing was trained: test_accuracy=0.9877 steps=44 "
        f"run={cfg.run_dir}"
    )


class ReadOnlyFileSystem:
    """A storage filesystem that lists and reads as `fs` does and refuses every write, as an
    archived folder mounted read-only does (root writes through a chmod)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fs, name)

    def open_output_stream(self, path: str) -> Any:
        raise OSError(errno.EROFS, f"Read-only file system: {path}")


def test_a_finished_run_on_read_only_storage_says_so_where_one_that_trains_is_refused(
    tmp_path, capsys, monkeypatch
):
    """The same command of a finished run whose storage had become read-only ended with
    status 2 and "storage_path ... is not writable", though it writes nothing; it now says the
    run had finished, with its accuracy and folder, as on writable storage. The run one step
    short of its end, which would train, is still refused before Ray starts."""
    path = tmp_path / "run.yaml"
    path.write_text(f"scaling: {{device: cpu}}\nstorage_path: {tmp_path / 'runs'}\n")
    cfg = config.load(str(path), [])
    monkeypatch.setattr(launch, "check_cluster", lambda: None)
    resumed = fits_recorded(monkeypatch)
    last = {"step": 44, "total_steps": 44, "test_accuracy": 0.98765}
    state = {"step": 44, "model": {"w": torch.zeros(2)}, "settings": config.trained_settings(cfg)}
    checkpoint.write_checkpoint(state, Path(cfg.run_dir, "checkpoint_000"), [last | {"step": 43}])
    real = storage.filesystem
    monkeypatch.setattr(
        storage, "filesystem", lambda p: (ReadOnlyFileSystem(real(p)[0]), real(p)[1])
    )
    assert train.main([str(path)]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: storage_path {tmp_path / 'runs'} is not writable: [Errno 30] Read-only"
    )
    checkpoint.write_checkpoint(state, Path(cfg.run_dir, "checkpoint_001"), [last])
    folders = sorted(os.listdir(cfg.run_dir))
    assert train.main([str(path)]) == 0
    assert capsys.readouterr().out == (
        f"the run had finished, so nothing was trained: test_accuracy=0.9877 steps=44 "
        f"run={cfg.run_dir}\n"
    )
    assert sorted(os.listdir(cfg.run_dir)) == folders
    assert resumed == []


def fits_recorded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The run folders launch.fit is called with from now on, each fit ending at once."""
    resumed: list[str] = []

    def fit(cfg, scaling):
        resumed.append(cfg.run_dir)
        return SimpleNamespace(metrics={"test_accuracy": 0.5, "step": 2})

    monkeypatch.setattr(launch, "fit", fit)
    return resumed


def test_the_resume_command_resumes_its_run_after_its_config_file_changed(
    tmp_path, capsys, monkeypatch
):
    """The command an interrupted run prints names its run: with the config file edited since
    (another learning rate, which would derive another name and start another run from step 0)
    it is refused naming the change, and run from another folder (a relative storage_path)
    after a change of reporting cadence it resumes the same run; a name YAML would read as a
    number, or a folder it would not read, is quoted."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "run.yaml"
    text = "scaling: {device: cpu}\nstorage_path: runs\n"
    text += "train: {epochs: 1, max_steps: 2, checkpoint_every: 1}\n"
    text += "data: {dataset: fake, fake_samples: 16, batch_size: 8}\n"
    path.write_text(text)
    cfg = config.load(str(path))
    loop.Loop(cfg, FolderSession(Path(cfg.run_dir))).run()
    shutil.rmtree(Path(cfg.run_dir, "checkpoint_000002"))  # interrupted one step short
    monkeypatch.setattr(launch, "check_cluster", lambda: None)
    monkeypatch.setattr(launch, "connect", lambda: False)
    monkeypatch.setattr(launch, "waiting_note", lambda *args: None)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "fit", interrupt)
    assert train.main([str(path)]) == 130
    command = capsys.readouterr().err.splitlines()[-1].removeprefix("interrupted; resume with: ")
    argv = shlex.split(command)[3:]
    path.write_text(text + "optim: {lr: 0.003}\n")
    assert train.main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: {cfg.run_dir}: holds a run trained with other settings (optim.lr: 0.001 there, "
        "0.003 here); run it with those to resume it, or give this run another name=\n"
    )
    path.write_text(text.replace("checkpoint_every: 1}", "checkpoint_every: 1, report_every: 1}"))
    monkeypatch.chdir(tmp_path.parent)
    resumed = fits_recorded(monkeypatch)
    assert train.main(argv) == 0
    assert resumed == [cfg.run_dir]
    odd = dataclasses.replace(cfg, name="007")
    assert shlex.split(train.resume_command(odd, ["run.yaml"]))[4] == 'name="007"'
    # A folder YAML cannot read at all (a mapping inside a mapping's value) is quoted too.
    colons = dataclasses.replace(cfg, storage_path="/data/a: b: c")
    words = shlex.split(train.resume_command(colons, ["run.yaml"]))
    [storage] = [word for word in words if word.startswith("storage_path=")]
    assert config.parse_override(storage) == ("storage_path", "/data/a: b: c")
    shipped = shlex.split(train.resume_command(cfg, ["tune_configs/digits.yaml"]))[3]
    assert shipped == str(Path(train.__file__).parent / "tune_configs" / "digits.yaml")


def test_the_resume_command_of_a_run_started_with_relative_paths_resumes_it_from_elsewhere(
    tmp_path, capsys, monkeypatch
):
    """A run started as `python -m raydeq.train run.yaml storage_path=runs` prints a resume
    command that names the config file and the storage absolutely: run from another folder,
    it resumes that run, not a missing file or a new run under another `runs`."""
    monkeypatch.chdir(tmp_path)
    text = "scaling: {device: cpu}\ntrain: {epochs: 1, max_steps: 2}\n"
    text += "data: {dataset: fake, fake_samples: 16, batch_size: 8}\n"
    (tmp_path / "run.yaml").write_text(text)
    monkeypatch.setattr(launch, "check_cluster", lambda: None)
    monkeypatch.setattr(launch, "connect", lambda: False)
    monkeypatch.setattr(launch, "waiting_note", lambda *args: None)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "fit", interrupt)
    assert train.main(["run.yaml", "storage_path=runs", "train.report_every=1"]) == 130
    command = capsys.readouterr().err.splitlines()[-1].removeprefix("interrupted; resume with: ")
    argv = shlex.split(command)[3:]
    name = config.load(str(tmp_path / "run.yaml")).name
    assert argv[0] == str(tmp_path / "run.yaml")
    assert f"storage_path={tmp_path / 'runs'}" in argv
    assert "train.report_every=1" in argv
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resumed = fits_recorded(monkeypatch)
    assert train.main(argv) == 0
    assert resumed == [str(tmp_path / "runs" / name)]


def test_the_resume_command_names_relative_data_folders_absolutely(tmp_path, monkeypatch):
    """A data_dir relative in the config file and a stage_to relative on the command line are
    read from the folder the run started in: the resume command names both absolutely, so
    that run from another folder it reads the same data, not a folder of that one."""
    monkeypatch.chdir(tmp_path)
    text = "scaling: {device: cpu}\ndata: {dataset: imagenet, data_dir: images}\n"
    (tmp_path / "run.yaml").write_text(text)
    argv = ["run.yaml", "data.stage_to=local"]
    cfg = config.load("run.yaml", argv[1:])
    words = shlex.split(train.resume_command(cfg, argv))
    assert f"data.data_dir={tmp_path / 'images'}" in words
    assert f"data.stage_to={tmp_path / 'local'}" in words
    assert "data.stage_to=local" not in words


def test_the_resume_command_keeps_a_data_mapping_override_without_its_folders(
    tmp_path, monkeypatch
):
    """`data={stage_to: local, batch_size: 16}` was kept whole beside the absolute
    data.stage_to the command adds, giving that key twice, which the command then refused; the
    mapping keeps its other keys, and the command reads back the run's config."""
    monkeypatch.chdir(tmp_path)
    text = "scaling: {device: cpu}\ndata: {dataset: imagenet, data_dir: images}\n"
    (tmp_path / "run.yaml").write_text(text)
    argv = ["run.yaml", "data={stage_to: local, batch_size: 16}", "optim={lr: 0.01}"]
    cfg = config.load("run.yaml", argv[1:])
    words = shlex.split(train.resume_command(cfg, argv))
    assert words[4:6] == ["data={batch_size: 16}", "optim={lr: 0.01}"]
    assert f"data.stage_to={tmp_path / 'local'}" in words
    monkeypatch.chdir(tmp_path.parent)
    assert config.load(words[3], words[4:]) == cfg


@pytest.mark.parametrize("given", ["data.data_dir=null", "data={data_dir: null}"])
def test_the_resume_command_gives_a_data_folder_given_as_null_as_null_again(
    tmp_path, monkeypatch, given
):
    """data.data_dir=null over a file's folder (its dataset switched to digits) was left out
    of the resume command, so the file's folder came back and the command was refused (digits
    reads no folder); it is given as null again, and the command reads back the run's config."""
    monkeypatch.chdir(tmp_path)
    text = "scaling: {device: cpu}\ndata: {dataset: mnist, data_dir: images}\n"
    (tmp_path / "run.yaml").write_text(text)
    argv = ["run.yaml", "data.dataset=digits", given]
    cfg = config.load("run.yaml", argv[1:])
    words = shlex.split(train.resume_command(cfg, argv))
    assert "data.data_dir=null" in words
    assert config.load(words[3], words[4:]) == cfg


def test_workers_that_just_fit_are_taken_and_one_more_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.setattr(launch.capacity, "worker_slots", lambda need: 2)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    launch.check_fits(2, {"CPU": 2.0})
    with pytest.raises(config.ConfigError) as err:
        launch.check_fits(3, {"CPU": 2.0})
    assert str(err.value) == (
        "scaling.num_workers=3 with 2 CPU per worker does not fit on this machine (4 CPU), "
        "which holds 2 such workers; give at most 2, or run on a cluster "
        "(RAY_ADDRESS, or `ray start`)"
    )
    with pytest.raises(config.ConfigError, match=r"\(4 CPU, 0 GPU\), .*; set scaling.device=cpu"):
        launch.check_fits(3, {"CPU": 1.0, "GPU": 1.0})
    # One worker of 8 CPUs does not fit on 4 however few there are: only its share helps.
    monkeypatch.setattr(launch.capacity, "worker_slots", lambda need: 0)
    with pytest.raises(config.ConfigError) as err:
        launch.check_fits(1, {"CPU": 8.0})
    assert str(err.value) == (
        "scaling.num_workers=1 with 8 CPU per worker does not fit on this machine (4 CPU), "
        "which holds 0 such workers; lower scaling.cpus_per_worker, or run on a cluster "
        "(RAY_ADDRESS, or `ray start`)"
    )
    # Nor does one of 2 GPUs (raydeq.tune's --gpus-per-worker 2) on a machine of 1.
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 1.0})
    with pytest.raises(config.ConfigError) as err:
        launch.check_fits(1, {"CPU": 1.0, "GPU": 2.0})
    assert str(err.value) == (
        "scaling.num_workers=1 with 1 CPU, 2 GPU per worker does not fit on this machine "
        "(4 CPU, 1 GPU), which holds 0 such workers; lower --gpus-per-worker, or run on a "
        "cluster (RAY_ADDRESS, or `ray start`)"
    )


def test_a_tune_trials_process_takes_its_cpu_from_its_workers_share_but_never_all_of_it():
    """A trial of two workers of 2 CPUs whose own process needs 1 CPU: each worker asks 1.5,
    so the trial holds the 4 CPUs it was given; a worker of 1 CPU keeps 1 (0 would let Ray
    place any number of them on a node); GPUs are asked for only when given."""
    two = validate({"scaling": {"num_workers": 2, "cpus_per_worker": 2.0}})
    scaling = launch.scaling_config(two, 0.0, reserve_cpu=1.0)
    assert (scaling.resources_per_worker, scaling.use_gpu) == ({"CPU": 1.5}, False)
    one = validate({"scaling": {"num_workers": 1, "cpus_per_worker": 1.0}})
    assert launch.scaling_config(one, 0.0, reserve_cpu=1.0).resources_per_worker == {"CPU": 1.0}
    scaling = launch.scaling_config(two, 1.0)
    assert (scaling.resources_per_worker, scaling.use_gpu) == ({"CPU": 2.0, "GPU": 1.0}, True)


def test_device_cpu_takes_no_gpu_even_where_the_cluster_has_gpus(monkeypatch):
    monkeypatch.setattr(launch.capacity, "can_have", lambda resource: True)
    gpus = {
        device: launch.gpus_per_worker(validate({"scaling": {"device": device}}))
        for device in ("cpu", "auto", "cuda")
    }
    assert gpus == {"cpu": 0.0, "auto": 1.0, "cuda": 1.0}


def test_a_ray_client_address_is_left_to_ray_and_only_raydeqs_errors_are_shortened(monkeypatch):
    """`ray://host:port` names a Ray Client server, no host and port to probe here; a
    traceback that ends in another package's error (PyTorch's) keeps its traceback."""
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{launch.free_port()}")
    launch.check_cluster()
    torch_error = "Traceback\n  File x\ntorch.OutOfMemoryError: CUDA out of memory.\n"
    assert launch.own_error(torch_error) is None


def test_a_neural_ode_short_of_max_steps_is_one_line_at_the_command_line():
    """model.max_steps too few for a Neural ODE's tolerance raised a builtin RuntimeError in
    the worker, which the command printed as Ray's traceback of 60 lines; it is raydeq's own
    error, one line naming the steps and the settings to change."""
    cfg = validate({"model": {"variant": "neural_ode", "adjoint": "backprop", "max_steps": 2}})
    model = models.build(cfg.model_options())
    with pytest.raises(RuntimeError) as refused:
        model(torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    lines = "".join(traceback.format_exception(refused.value))
    line = launch.own_error(lines)
    assert line == f"IntegrationError: {refused.value}"
    assert re.fullmatch(
        r"IntegrationError: the vcab3 integration reached t=\S+ of t1=1 in max_steps=2 steps; "
        r"raise max_steps or loosen abstol / reltol",
        line,
    )


def test_a_ray_of_the_runs_own_has_no_preemption_watcher_and_the_settings_given_are_kept(
    monkeypatch,
):
    for name in ("RAY_ADDRESS", launch.API_SERVER, *launch.ENV_VARS, *LOCAL_ENV_VARS):
        monkeypatch.delenv(name, raising=False)
    watcher = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
    assert launch.runtime_env(local=True)["env_vars"][watcher] == "0"
    assert watcher not in launch.runtime_env(local=False)["env_vars"]
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv(watcher, "1")
    env_vars = launch.runtime_env(local=True)["env_vars"]
    assert (env_vars["RAY_ADDRESS"], env_vars[watcher]) == ("10.0.0.1:6379", "1")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert "RAY_ADDRESS" not in launch.runtime_env()["env_vars"]


def test_ray_address_local_starts_a_ray_of_the_runs_own_as_no_address_does(
    monkeypatch, connect_env_kept
):
    """RAY_ADDRESS=local starts a new local Ray, which connect took for a cluster: no check
    that the workers fit (scaling.num_workers=4 on 2 CPUs waited past 100 s, with Ray Train's
    placement-group cleaner's tracebacks, as it could not tell which Ray's state API to ask),
    and the preemption watcher on. It is now the run's own Ray, as without RAY_ADDRESS."""
    for name in ("RAY_ADDRESS", launch.API_SERVER, launch.COLOR_PREFIX, *LOCAL_ENV_VARS):
        monkeypatch.delenv(name, raising=False)
    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    context = SimpleNamespace(dashboard_url="127.0.0.1:8265")  # what ray.init returns
    monkeypatch.setattr(ray, "init", lambda **options: started.append(options) or context)
    monkeypatch.setattr(ray._private.utils, "read_ray_address", lambda *args: None)
    assert launch.connect()
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert launch.connect()
    alone, local = started
    assert local.keys() == alone.keys() and "dashboard_port" in local
    assert os.environ[launch.API_SERVER] == f"http://127.0.0.1:{local['dashboard_port']}"
    assert local["runtime_env"]["env_vars"].keys() == alone["runtime_env"]["env_vars"].keys()
    assert "RAY_ADDRESS" not in local["runtime_env"]["env_vars"]
    assert local["runtime_env"]["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert not launch.connect()
    # Set empty (`RAY_ADDRESS= python -m ...`, to leave an exported one out) Ray reads it as
    # unset and starts a Ray here, which was taken for a cluster's: no check that the workers
    # fit, and the preemption watcher on.
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert launch.connect()
    assert started[-1]["runtime_env"]["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"


def test_a_progress_line_shows_each_headline_metric_under_its_own_name():
    """The shares of samples whose forward or backward solve did not converge and of the test
    samples whose solve did not, which the line left to TensorBoard, and the skipped steps are
    shown once they are not 0."""
    metrics = {"epoch": 0.5, "step": 10, "total_steps": 20, "train_loss": 1.5}
    metrics |= {"train_accuracy": 0.25, "nfe": 12.0, "images_per_second": 12345.6}
    metrics |= {"test_accuracy": 0.75, "test_nfe": 8.0, "skipped_steps": 0, "time_left_s": 65}
    metrics |= {"unconverged_fraction": 0.0, "backward_unconverged_fraction": 0.0}
    metrics |= {"test_unconverged_fraction": 0.0}
    assert reporting.progress_line("run", metrics) == (
        "[run] epoch 0.50 step 10/20 loss 1.5 acc 0.25 nfe 12 img/s 12346 test_acc 0.75 "
        "test_nfe 8 eta 1m05s"
    )
    metrics |= {"unconverged_fraction": 0.125, "backward_unconverged_fraction": 0.0625}
    metrics |= {"test_unconverged_fraction": 0.03125, "skipped_steps": 3}
    assert reporting.progress_line("run", metrics) == (
        "[run] epoch 0.50 step 10/20 loss 1.5 acc 0.25 nfe 12 img/s 12346 test_acc 0.75 "
        "test_nfe 8 unconverged 0.125 backward_unconverged 0.0625 test_unconverged 0.03125 "
        "skipped 3 eta 1m05s"
    )
    # A Neural ODE's training share, near 1 at every step (its z(t1) is no steady state).
    assert reporting.progress_line("run", metrics | {"unconverged_fraction": 1.0}, True) == (
        "[run] epoch 0.50 step 10/20 loss 1.5 acc 0.25 nfe 12 img/s 12346 test_acc 0.75 "
        "test_nfe 8 backward_unconverged 0.0625 test_unconverged 0.03125 skipped 3 eta 1m05s"
    )


@pytest.mark.parametrize(
    ("value", "shown"),
    [(9999.4, "9999"), (9999.5, "10000"), (9999.7, "10000"), (-9999.7, "-10000"), (0.5, "0.5")],
)
def test_a_metric_that_rounds_to_five_digits_is_shown_whole_not_in_exponent_form(value, shown):
    assert reporting.figure(value) == shown


# Checkpoints -----------------------------------------------------------------------------------


def test_checkpoints_round_trip_and_corruption_is_detected(tmp_path):
    state = {
        "step": 7,
        "model": {"w": torch.arange(4.0)},
        "rng": [rng_state(torch.device("cpu"))],
    }
    folder = checkpoint.write_checkpoint(state, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded = checkpoint.read_checkpoint(folder)
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert json.loads((folder / MANIFEST_FILE).read_text())["step"] == 7
    corrupt(folder / STATE_FILE)
    with pytest.raises(checkpoint.CheckpointError, match="state.pt fails its checksum"):
        checkpoint.read_checkpoint(folder)
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no valid manifest.json"):
        checkpoint.read_checkpoint(folder)


def corrupt(path: Path) -> None:
    """Flip one bit of a file's last byte: damage that keeps its size."""
    blob = path.read_bytes()
    path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))


def test_a_state_cut_short_under_a_whole_manifest_is_a_copy_cut_short(tmp_path):
    """The manifest records state.pt's size: a state.pt shorter than that (a copy cut short
    after the manifest's) is an IncompleteCheckpoint, one of the recorded size that fails its
    checksum a damaged checkpoint, and a manifest written before sizes were recorded still
    reads."""
    folder = checkpoint.write_checkpoint({"step": 7, "w": torch.arange(4.0)}, tmp_path / "ckpt")
    state, manifest = folder / STATE_FILE, json.loads((folder / MANIFEST_FILE).read_text())
    blob = state.read_bytes()
    assert manifest["bytes"] == len(blob) and manifest["sha256"] == hashlib.sha256(blob).hexdigest()
    state.write_bytes(blob[:100])
    with pytest.raises(
        checkpoint.IncompleteCheckpoint,
        match=f"state.pt is cut short: 100 of the {len(blob)} bytes its manifest.json records",
    ):
        checkpoint.read_checkpoint(folder)
    state.write_bytes(blob)
    corrupt(state)
    with pytest.raises(checkpoint.CheckpointError, match="fails its checksum") as caught:
        checkpoint.read_checkpoint(folder)
    assert not isinstance(caught.value, checkpoint.IncompleteCheckpoint)
    state.write_bytes(blob)
    del manifest["bytes"]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert checkpoint.read_checkpoint(folder)["step"] == 7


def test_a_checkpoints_reports_are_checked_as_its_state_is(tmp_path):
    """reports.jsonl is listed in the manifest with its size and SHA-256: a copy of it cut
    short is an IncompleteCheckpoint, one of its size that fails its checksum a damaged
    checkpoint, as for state.pt; a manifest written before it was listed still reads."""
    rows = [{"step": 6, "loss": 0.5}, {"step": 7, "loss": 0.25}]
    folder = checkpoint.write_checkpoint({"step": 7}, tmp_path / "ckpt", rows)
    reports, manifest = folder / REPORTS_FILE, json.loads((folder / MANIFEST_FILE).read_text())
    blob = reports.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    assert manifest["reports"] == {"bytes": len(blob), "sha256": digest}
    reports.write_bytes(blob[:10])
    with pytest.raises(
        checkpoint.IncompleteCheckpoint,
        match=f"reports.jsonl is cut short: 10 of the {len(blob)} bytes its manifest.json records",
    ):
        checkpoint.read_checkpoint(folder)
    reports.unlink()
    with pytest.raises(checkpoint.IncompleteCheckpoint, match="reports.jsonl is missing"):
        checkpoint.read_checkpoint(folder)
    reports.write_bytes(blob)
    corrupt(reports)
    with pytest.raises(
        checkpoint.CheckpointError, match="reports.jsonl fails its checksum"
    ) as caught:
        checkpoint.read_checkpoint(folder)
    assert not isinstance(caught.value, checkpoint.IncompleteCheckpoint)
    del manifest["reports"]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert checkpoint.read_checkpoint(folder)["step"] == 7


def test_a_checkpoint_without_reports_lists_none(tmp_path):
    """A checkpoint made before any report holds no reports.jsonl and its manifest lists none."""
    folder = checkpoint.write_checkpoint({"step": 0}, tmp_path / "ckpt")
    assert not (folder / REPORTS_FILE).exists()
    assert "reports" not in json.loads((folder / MANIFEST_FILE).read_text())
    assert checkpoint.read_checkpoint(folder)["step"] == 0


def test_a_manifest_records_its_format_and_a_newer_one_is_refused_not_passed_over(
    tmp_path, capsys, monkeypatch
):
    """Manifests recorded no format, so a layout changed later would read as a damaged file,
    and restore fell back past it to an older checkpoint: a resume by an older raydeq trained
    the newer steps again. A manifest now records format 1 (one without it, every run before,
    reads as 1); a higher one is refused naming the file, the format found and the one read,
    and the run's command stops before Ray starts. A format that is no positive integer is a
    damaged manifest, passed over as one."""
    older = checkpoint.write_checkpoint({"step": 3}, tmp_path / "checkpoint_000")
    folder = checkpoint.write_checkpoint({"step": 7}, tmp_path / "checkpoint_001")
    file = folder / MANIFEST_FILE
    manifest = json.loads(file.read_text())
    assert manifest["format"] == checkpoint.MANIFEST_FORMAT == 1
    del manifest["format"]
    file.write_text(json.dumps(manifest))
    assert checkpoint.read_checkpoint(folder)["step"] == 7
    file.write_text(json.dumps(manifest | {"format": 2}))
    refusal = (
        f"{file}: format 2, written by a newer raydeq; this raydeq reads formats up to 1; "
        "update raydeq"
    )
    with pytest.raises(checkpoint.NewerFormat) as caught:
        checkpoint.read_checkpoint(folder)
    assert str(caught.value) == refusal
    local = pyarrow.fs.LocalFileSystem()
    with pytest.raises(checkpoint.NewerFormat, match=re.escape(refusal)):
        checkpoint.read_manifest(local, str(folder))
    with pytest.raises(checkpoint.NewerFormat, match=re.escape(refusal)):
        checkpoint.restore(contextlib.nullcontext(str(p)) for p in (folder, older))
    with pytest.raises(checkpoint.NewerFormat, match=re.escape(refusal)):
        checkpoint.read_newest(tmp_path)
    for damaged in ("2", 0, True, 1.5):
        file.write_text(json.dumps(manifest | {"format": damaged}))
        with pytest.raises(checkpoint.CheckpointError, match="is not a positive integer"):
            checkpoint.read_checkpoint(folder)
        restored = checkpoint.restore(contextlib.nullcontext(str(p)) for p in (folder, older))
        assert restored == {"step": 3}

    path = tmp_path / "run.yaml"
    path.write_text(f"scaling: {{device: cpu}}\nstorage_path: {tmp_path / 'runs'}\n")
    cfg = config.load(str(path), [])
    monkeypatch.setattr(launch, "check_cluster", lambda: None)
    resumed = fits_recorded(monkeypatch)
    state = {"step": 5, "settings": config.trained_settings(cfg)}
    newer = checkpoint.write_checkpoint(state, Path(cfg.run_dir, "checkpoint_000"))
    written = json.loads((newer / MANIFEST_FILE).read_text())
    (newer / MANIFEST_FILE).write_text(json.dumps(written | {"format": 2}))
    assert train.main([str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {newer / MANIFEST_FILE}: format 2, written by a newer raydeq; this raydeq "
        "reads formats up to 1; update raydeq\n"
    )
    assert resumed == []


def test_a_record_of_ray_train_naming_a_checkpoint_that_is_gone_is_one_line_before_ray_starts(
    tmp_path, capsys, monkeypatch
):
    """A checkpoint folder deleted by hand, or Ray Train's record of the checkpoints cut short,
    made Ray Train's controller refuse to start at every run of the command, in a traceback
    that said to delete the run's folder; the command now names the record and what is gone,
    exit code 2, before Ray starts, and the run resumes from its checkpoints once the record
    alone is deleted."""
    path = tmp_path / "run.yaml"
    path.write_text(f"scaling: {{device: cpu}}\nstorage_path: {tmp_path / 'runs'}\n")
    cfg = config.load(str(path), [])
    monkeypatch.setattr(launch, "check_cluster", lambda: None)
    monkeypatch.setattr(launch, "connect", lambda: False)
    monkeypatch.setattr(launch, "waiting_note", lambda *args: None)
    resumed = fits_recorded(monkeypatch)
    settings = config.trained_settings(cfg)
    for step in (2, 4):
        state = {"step": step, "settings": settings}
        checkpoint.write_checkpoint(state, Path(cfg.run_dir, f"checkpoint_00000{step}"))
    record = Path(cfg.run_dir, preflight.RAY_RECORD)
    assert record.name == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    names = [{"checkpoint_dir_name": f"checkpoint_00000{step}"} for step in (2, 4)]
    record.write_text(json.dumps({"checkpoint_results": names}))
    assert train.main([str(path)]) == 0 and resumed == [cfg.run_dir]
    shutil.rmtree(Path(cfg.run_dir, "checkpoint_000004"))
    assert train.main([str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {record}, Ray Train's record of the run's checkpoints, names "
        "checkpoint_000004, which is not there; delete it, and the run resumes from the "
        "checkpoints in its folder\n"
    )
    record.write_text(json.dumps({"checkpoint_results": names})[:30])
    assert train.main([str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {record}, Ray Train's record of the run's checkpoints, cannot be read "
        "(JSONDecodeError: Unterminated string starting at: line 1 column 26 (char 25)); "
        "delete it, and the run resumes from the checkpoints in its folder\n"
    )
    record.unlink()
    assert train.main([str(path)]) == 0 and resumed == [cfg.run_dir] * 2


def test_a_crash_while_saving_leaves_no_checkpoint_folder(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(storage.StorageError, match="step 1 could not be written to .*: disk full$"):
        checkpoint.write_checkpoint({"step": 1}, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    folder = checkpoint.write_checkpoint({"step": 1}, tmp_path / "ckpt")
    assert checkpoint.read_checkpoint(folder)["step"] == 1


class Payload:
    """An object whose unpickling runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_in_a_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "executed"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / STATE_FILE).write_bytes(pickle.dumps({"step": Payload(marker)}, protocol=2))
    digest = checkpoint._sha256(folder / STATE_FILE)
    (folder / MANIFEST_FILE).write_text(json.dumps({"step": 1, "sha256": digest}))
    with pytest.raises(checkpoint.CheckpointError, match="refused by the loader"):
        checkpoint.read_checkpoint(folder)
    assert not marker.exists()


def test_restore_falls_back_to_the_previous_checkpoint_and_never_silently_restarts(
    tmp_path, caplog
):
    """A checkpoint failing its checksum is named, with the fallback and the step resumed."""
    good = checkpoint.write_checkpoint({"step": 4}, tmp_path / "a")
    bad = checkpoint.write_checkpoint({"step": 6}, tmp_path / "b")
    corrupt(bad / STATE_FILE)
    checkpoints = [Checkpoint.from_directory(str(p)) for p in (bad, good)]
    with caplog.at_level(logging.WARNING):
        assert checkpoint.restore(c.as_directory() for c in checkpoints)["step"] == 4
    said, resumed = caplog.messages[-2:]
    assert "b: state.pt" in said and said.endswith("; falling back to the previous checkpoint")
    assert resumed == "resumed from the checkpoint of step 4"
    assert checkpoint.restore([]) is None
    with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint: .*b: state.pt"):
        checkpoint.restore([checkpoints[0].as_directory()])


@pytest.mark.parametrize(
    ("reading", "code"), [("_sha256", errno.EACCES), ("_load_state", errno.EIO)]
)
def test_a_checkpoint_that_cannot_be_read_is_named_and_fallen_back_past(
    tmp_path, caplog, monkeypatch, reading, code
):
    """An OSError reading a checkpoint's state (EACCES as its checksum is read, EIO as it is
    loaded) ended the resume in its traceback, where a damaged checkpoint is fallen back past:
    it is named with why, the run resumes from the checkpoint before, and where no checkpoint
    is readable it stops, never starting from step 0."""
    good = checkpoint.write_checkpoint({"step": 4}, tmp_path / "a")
    unreadable = checkpoint.write_checkpoint({"step": 6}, tmp_path / "b")
    read = getattr(checkpoint, reading)

    def failing(path: Path) -> Any:
        if unreadable in (path, path.parent):
            raise OSError(code, os.strerror(code), str(path))
        return read(path)

    monkeypatch.setattr(checkpoint, reading, failing)
    said = f"{unreadable}: state.pt cannot be read ({os.strerror(code)})"
    assert_passed_over(unreadable, good, said, caplog)


def assert_passed_over(bad: Path, good: Path, said: str, caplog: Any) -> None:
    """Reading checkpoint `bad` is refused as `said` (not as a copy cut short), a resume falls
    back past it to `good` (step 4) saying so, and with no other checkpoint the run stops."""
    with pytest.raises(checkpoint.CheckpointError) as caught:
        read_checkpoint(bad)
    assert str(caught.value) == said
    assert not isinstance(caught.value, checkpoint.IncompleteCheckpoint)
    with caplog.at_level(logging.WARNING):
        restored = checkpoint.restore(contextlib.nullcontext(str(p)) for p in (bad, good))
    assert restored == {"step": 4}
    assert caplog.messages[-2:] == [
        f"{said}; falling back to the previous checkpoint",
        "resumed from the checkpoint of step 4",
    ]
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.restore([contextlib.nullcontext(str(bad))])
    assert str(caught.value) == f"no readable checkpoint: {said}"


@pytest.mark.parametrize("name", [STATE_FILE, MANIFEST_FILE, REPORTS_FILE])
@pytest.mark.parametrize("put", ["folder", "link"])
def test_a_folder_or_a_dangling_link_in_a_checkpoint_files_place_is_no_copy_cut_short(
    tmp_path, caplog, name, put
):
    """A checkpoint's file that is a folder, or a link to nothing, was read as missing, a copy
    cut short, so that a run whose only checkpoint held one started from step 0, to prune it:
    it is a checkpoint that cannot be read, named with what is there, fallen back past, and
    where it is the only one the run stops."""
    good = checkpoint.write_checkpoint({"step": 4}, tmp_path / "a")
    odd = checkpoint.write_checkpoint({"step": 6}, tmp_path / "b", [{"step": 6}])
    (odd / name).unlink()
    if put == "folder":
        (odd / name).mkdir()
        said = f"{odd}: {name} is a folder, not a file"
    else:
        (odd / name).symlink_to(tmp_path / "gone")
        said = f"{odd}: {name} is a link to {tmp_path / 'gone'}, which does not exist"
    assert_passed_over(odd, good, said, caplog)


def test_a_checkpoint_folder_missing_a_file_is_a_copy_cut_short_and_passed_over(tmp_path, caplog):
    """Ray copies a checkpoint's files side by side, so a driver killed mid-copy can leave a
    folder without its manifest or without state.pt, which write_checkpoint never does (it
    renames a whole folder into place): such a folder is passed over, not counted as a bad
    checkpoint. With an older one the run resumes from it; a trial whose only checkpoint was
    cut starts from step 0 with a warning instead of failing on every restart; a state.pt
    of its recorded size that fails its checksum still stops the run."""
    good = checkpoint.write_checkpoint({"step": 4}, tmp_path / "a")
    no_manifest = checkpoint.write_checkpoint({"step": 8}, tmp_path / "b")
    (no_manifest / MANIFEST_FILE).unlink()
    no_state = checkpoint.write_checkpoint({"step": 8}, tmp_path / "c")
    (no_state / STATE_FILE).unlink()
    bad = checkpoint.write_checkpoint({"step": 8}, tmp_path / "d")
    corrupt(bad / STATE_FILE)
    short = checkpoint.write_checkpoint({"step": 8}, tmp_path / "e")
    (short / STATE_FILE).write_bytes((short / STATE_FILE).read_bytes()[:50])
    folders = {
        f.name: Checkpoint.from_directory(str(f)) for f in (good, no_manifest, no_state, bad, short)
    }

    def restore(*names):
        return checkpoint.restore(folders[name].as_directory() for name in names)

    assert restore("b", "c", "e", "a")["step"] == 4
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert restore("b", "c", "e") is None
    assert caplog.messages[-1] == "no whole checkpoint, only copies cut short: starting from step 0"
    with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint: .*d: state.pt"):
        restore("b", "d")


@pytest.mark.parametrize("kept", [0, 20], ids=["empty", "cut-inside"])
def test_a_manifest_cut_short_is_a_copy_cut_short_and_passed_over(tmp_path, caplog, kept):
    """A copy killed while it wrote manifest.json, before state.pt: the manifest is empty or
    cut inside its JSON. The run resumes from the older checkpoint, or where the cut copy is
    its only one starts from step 0 with a warning, as for a copy without its manifest,
    instead of failing on every restart; a whole manifest without its sha256 still stops it."""
    good = checkpoint.write_checkpoint({"step": 4}, tmp_path / "a")
    cut = checkpoint.write_checkpoint({"step": 8}, tmp_path / "b")
    manifest = cut / MANIFEST_FILE
    manifest.write_text(manifest.read_text()[:kept])
    (cut / STATE_FILE).unlink()
    with pytest.raises(checkpoint.IncompleteCheckpoint, match="b: no valid manifest.json"):
        read_checkpoint(cut)
    assert checkpoint.restore(contextlib.nullcontext(str(p)) for p in (cut, good))["step"] == 4
    with caplog.at_level(logging.WARNING):
        assert checkpoint.restore([contextlib.nullcontext(str(cut))]) is None
    assert caplog.messages[-1] == "no whole checkpoint, only copies cut short: starting from step 0"
    (good / MANIFEST_FILE).write_text(json.dumps({"step": 4}))
    with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint: .*a: no valid"):
        checkpoint.restore(contextlib.nullcontext(str(p)) for p in (cut, good))


def test_read_newest_says_which_checkpoint_it_read_and_starts_nothing(tmp_path, caplog):
    """read_newest (load_model's, the benchmarks') passed over a cut copy logging 'resumed from
    the checkpoint of step 4', and past only cut copies 'starting from step 0' before refusing
    the folder: it resumes and starts nothing, so it says which checkpoint it read."""
    checkpoint.write_checkpoint({"step": 4}, tmp_path / "run" / "checkpoint_000004")
    cut = checkpoint.write_checkpoint({"step": 8}, tmp_path / "run" / "checkpoint_000008")
    (cut / STATE_FILE).unlink()
    with caplog.at_level(logging.WARNING):
        assert checkpoint.read_newest(tmp_path / "run")["step"] == 4
    assert caplog.messages[-1] == "read the checkpoint of step 4"
    shutil.rmtree(tmp_path / "run" / "checkpoint_000004")
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(checkpoint.CheckpointError, match="cut"):
        checkpoint.read_newest(tmp_path / "run")
    assert not any("step 0" in message for message in caplog.messages)


def test_read_newest_takes_the_newest_readable_checkpoint_of_a_run_or_of_a_folder_in_it(tmp_path):
    """The benchmarks time a run's newest weights: of checkpoint_000003, _000006 and _000012
    (zero-padded, so that 12 sorts after 6) the newest, the one before where it is cut short,
    and the same where the checkpoints lie in a folder inside (a trial of several workers)."""
    for folder in (tmp_path / "run", tmp_path / "trial" / "train"):
        for step in (3, 12, 6):
            checkpoint.write_checkpoint({"step": step}, folder / f"checkpoint_{step:06d}")
    assert checkpoint.read_newest(tmp_path / "run")["step"] == 12
    assert checkpoint.read_newest(tmp_path / "trial")["step"] == 12
    for folder in (tmp_path / "run", tmp_path / "trial" / "train"):
        (folder / "checkpoint_000012" / STATE_FILE).write_bytes(b"cut")
    assert checkpoint.read_newest(tmp_path / "run")["step"] == 6
    assert checkpoint.read_newest(tmp_path / "trial")["step"] == 6


def test_read_newest_of_a_run_holding_only_copies_cut_short_is_a_checkpoint_error(tmp_path):
    """A run whose one checkpoint is a copy cut short (no state.pt) has no weights to time: a
    CheckpointError naming the folder, the copies and what to do (it named the folder alone),
    which --weights reports as a usage error, not the 'NoneType' TypeError of indexing the
    None that restore gives there."""
    cut = checkpoint.write_checkpoint({"step": 3}, tmp_path / "run" / "checkpoint_000003")
    (cut / STATE_FILE).unlink()
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.read_newest(tmp_path / "run")
    assert str(err.value) == (
        f"{tmp_path / 'run'}: no whole checkpoint, only copies cut short (checkpoint_000003): "
        "one that its run is copying now is whole once the copy ends, so load it again then; a "
        "run stopped mid-copy has none until it is resumed (from step 0) and writes one"
    )
    # Of the folder above the run: each copy by its path in that folder, the newest first.
    cut = checkpoint.write_checkpoint({"step": 6}, tmp_path / "run" / "checkpoint_000006")
    (cut / STATE_FILE).unlink()
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.read_newest(tmp_path)
    assert str(err.value).startswith(
        f"{tmp_path}: no whole checkpoint, only copies cut short (run/checkpoint_000006, "
        "run/checkpoint_000003): "
    )


def test_read_newest_of_a_folder_of_several_runs_refuses_to_pick_one(tmp_path):
    """An experiment's folder holds a trial per folder, each with its checkpoints: its newest
    step was taken across the trials, the weights of whichever trial ran longest, as if they
    were the folder's; it is refused naming the runs."""
    for trial, steps in (("trial_a", (4, 8)), ("trial_b", (12,)), ("trial_c", (2,))):
        for step in steps:
            checkpoint.write_checkpoint({"step": step}, tmp_path / trial / f"checkpoint_{step:06d}")
    with pytest.raises(checkpoint.CheckpointError) as refused:
        checkpoint.read_newest(tmp_path)
    assert str(refused.value) == (
        f"{tmp_path}: holds the checkpoints of 3 runs (trial_a, trial_b, trial_c); "
        "name the folder of one"
    )
    assert checkpoint.read_newest(tmp_path / "trial_a")["step"] == 8


@pytest.mark.parametrize(
    ("count", "named"), [(2, "trial_0, trial_1"), (4, "trial_0, trial_1, trial_2, ...")]
)
def test_read_newest_refuses_two_runs_and_names_three_of_many(tmp_path, count, named):
    """Two trials are as many runs to pick from as three; past three the message names the
    first three and says there are more."""
    for trial in range(count):
        checkpoint.write_checkpoint({"step": trial}, tmp_path / f"trial_{trial}" / "checkpoint_1")
    with pytest.raises(checkpoint.CheckpointError) as refused:
        checkpoint.read_newest(tmp_path)
    assert str(refused.value) == (
        f"{tmp_path}: holds the checkpoints of {count} runs ({named}); name the folder of one"
    )


def test_read_newest_passes_over_ray_trains_checkpoint_record_without_a_warning(tmp_path, caplog):
    """Ray Train keeps its record of a run's checkpoints in the file
    checkpoint_manager_snapshot.json beside them: it is no checkpoint, so reading the run's
    (or its trial's) newest weights takes step 12 with no word of a fallback."""
    for folder in (tmp_path / "run", tmp_path / "trial" / "train"):
        for step in (3, 12):
            checkpoint.write_checkpoint({"step": step}, folder / f"checkpoint_{step:06d}")
        (folder / "checkpoint_manager_snapshot.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        assert checkpoint.read_newest(tmp_path / "run")["step"] == 12
        assert checkpoint.read_newest(tmp_path / "trial")["step"] == 12
    assert caplog.records == []


def test_read_newest_takes_the_checkpoint_of_the_latest_step_whatever_the_clock_named_it(
    tmp_path,
):
    """As a resume does: Ray Train names checkpoints by local time, so step 30 written after
    the clock was set back an hour is named before step 20, in a run's folder and in a folder
    inside it."""
    names = {10: "02-10-00", 20: "02-50-00", 30: "02-20-00"}
    for folder in (tmp_path / "run", tmp_path / "trial" / "train"):
        for step, time_of_day in names.items():
            name = f"checkpoint_2026-10-25_{time_of_day}.000000"
            checkpoint.write_checkpoint({"step": step}, folder / name)
    assert checkpoint.read_newest(tmp_path / "run")["step"] == 30
    assert checkpoint.read_newest(tmp_path / "trial")["step"] == 30


@pytest.mark.parametrize("when", ["listed", "reading"])
def test_read_newest_of_a_run_that_prunes_the_checkpoint_it_reads_takes_the_new_one(
    tmp_path, monkeypatch, caplog, when
):
    """load_model from a notebook beside a run of train.keep_checkpoints=1: the run wrote step
    3 and pruned step 2 after the reader listed step 2 (it called the run's folder one of
    copies cut short) or as it hashed step 2's state (a FileNotFoundError of its state.pt); it
    lists the folder again and reads step 3, with no word of a cut copy."""
    run = tmp_path / "run"
    checkpoint.write_checkpoint({"step": 2}, run / "checkpoint_000002")
    listed, hashed = checkpoint.newest_first, checkpoint._sha256

    def driver_step() -> None:
        checkpoint.write_checkpoint({"step": 3}, run / "checkpoint_000003")
        shutil.rmtree(run / "checkpoint_000002")

    def newest_first(*args):
        found = listed(*args)
        monkeypatch.setattr(checkpoint, "newest_first", listed)
        driver_step()
        return found

    def sha256(path):
        monkeypatch.setattr(checkpoint, "_sha256", hashed)
        driver_step()
        return hashed(path)

    if when == "listed":
        monkeypatch.setattr(checkpoint, "newest_first", newest_first)
    else:
        monkeypatch.setattr(checkpoint, "_sha256", sha256)
    with caplog.at_level(logging.WARNING):
        read, state = checkpoint.newest_checkpoint(run)
    assert (read, state["step"]) == (run / "checkpoint_000003", 3)
    assert caplog.messages == []


def fresh() -> TrainState:
    """The training state of a linear model at step 0."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return TrainState(model, optimizer, schedule, torch.amp.GradScaler("cpu", enabled=False))


def test_a_resume_restores_the_counters_and_each_worker_draws_from_its_own_stream():
    """The skipped and overflow steps reported after a resume count the steps before it too;
    a fresh start seeds each rank apart (the same Hutchinson probes on every worker would
    average to fewer probes), the same way each time, and a resume with as many workers gives
    each rank back its own saved stream."""
    saved = fresh()
    saved.step, saved.skipped_steps, saved.nonfinite_in_row, saved.overflow_steps = 40, 3, 1, 2
    with torch.random.fork_rng():
        streams, expected = [], []
        for seed in (5, 6):
            torch.manual_seed(seed)
            streams.append(rng_state(torch.device("cpu")))
            expected.append(torch.rand(4))
        payload = saved.state_dict(streams)
        resumed = fresh()
        resumed.load(payload)
        counters = (resumed.skipped_steps, resumed.nonfinite_in_row, resumed.overflow_steps)
        assert resumed.step == 40 and counters == (3, 1, 2)
        for rank in (1, 0):
            resumed.seed_workers(payload, seed=0, rank=rank, world=2)
            assert torch.equal(torch.rand(4), expected[rank]), rank
        draws = []
        for rank in (0, 1, 0):
            resumed.seed_workers(None, seed=0, rank=rank, world=2)
            draws.append(torch.rand(4))
        assert not torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])


def test_no_two_seeds_share_a_workers_stream_nor_one_seeds_weights_and_anothers_probes():
    """A fresh start seeded rank r at step t with seed + 1 + r + world * t: seed 0's rank 1
    drew the dropout masks and Hutchinson probes of seed 1's rank 0 on two workers, and seed
    0's one worker those of seed 1's initial weights (torch.manual_seed(1), as the loop draws
    them). Each (seed, rank, step) now has a stream of its own, none a seed's own."""
    state = fresh()
    with torch.random.fork_rng(devices=[]):
        draws = {}
        for seed, rank in itertools.product((0, 1, 2), (0, 1)):
            state.seed_workers(None, seed=seed, rank=rank, world=2)
            draws[seed, rank] = tuple(torch.rand(4).tolist())
        for seed in (0, 1, 2, 3):
            torch.manual_seed(seed)
            draws[seed] = tuple(torch.rand(4).tolist())
        state.step = 3
        state.seed_workers(None, seed=0, rank=0, world=1)
        draws["step 3"] = tuple(torch.rand(4).tolist())
        state.step = 0
        state.seed_workers(None, seed=0, rank=0, world=1)
        assert tuple(torch.rand(4).tolist()) == draws[0, 0]
    assert len(set(draws.values())) == len(draws) == 11


def test_the_loss_is_the_mean_cross_entropy_plus_the_weighted_skip_and_jacobian_terms():
    """The paper's loss (section 3): cross-entropy averaged over the batch, plus lambda_skip
    times the skip loss and lambda_jac times the Jacobian term; the cross-entropy here is
    -log softmax written out."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 2])
    out = SimpleNamespace(skip_loss=torch.tensor(0.3), jac_loss=torch.tensor(0.7))
    log_softmax = [
        row[label] - math.log(sum(math.exp(v) for v in row))
        for row, label in zip(logits.tolist(), labels.tolist(), strict=True)
    ]
    cross_entropy = -sum(log_softmax) / len(log_softmax)
    loss = objective.Objective(lambda_skip=0.5, lambda_jac=2.0)(logits, labels, out)
    assert loss.item() == pytest.approx(cross_entropy + 0.5 * 0.3 + 2.0 * 0.7, rel=1e-6)
    plain = objective.Objective(lambda_skip=0.0)(logits, labels, out)
    assert plain.item() == pytest.approx(cross_entropy, rel=1e-6)


@pytest.mark.parametrize(
    ("weights", "error", "message"),
    [
        ({"lambda_skip": -0.5}, ValueError, "lambda_skip=-0.5 must be a number >= 0"),
        ({"lambda_skip": float("nan")}, ValueError, "lambda_skip=nan must be a number >= 0"),
        ({"lambda_skip": "1"}, TypeError, "lambda_skip='1' must be a number >= 0"),
        ({"lambda_skip": 1, "lambda_jac": -2.0}, ValueError, "lambda_jac=-2.0 must be a number"),
        ({"lambda_skip": 1, "lambda_jac": math.inf}, ValueError, "lambda_jac=inf must be a finite"),
    ],
)
def test_a_loss_weight_that_is_no_finite_number_at_least_zero_is_refused(weights, error, message):
    """Objective(lambda_skip=-0.5) trained with loss cross_entropy - 0.5 * skip_loss, pushing
    z0 away from z*, and NaN made every loss NaN, both silently; each weight is now refused
    where the objective is made, naming it (an int weight is a number)."""
    with pytest.raises(error, match=re.escape(message)):
        objective.Objective(**weights)
    logits, labels = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([1])
    out = SimpleNamespace(skip_loss=torch.tensor(0.25), jac_loss=torch.tensor(0.0))
    loss = objective.Objective(lambda_skip=2)(logits, labels, out)
    assert loss.item() == pytest.approx(-math.log(0.75) + 0.5, rel=1e-6)


def _implicit_gradients(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    z_star: deq.State,
    weights: dict[str, float],
    probe: torch.Tensor,
) -> list[torch.Tensor]:
    """The objective's gradient in every parameter and in the images by the implicit function
    theorem: the explicit terms at a constant z*, plus (df/dtheta)^T (I - J)^-T dL/dz* with J
    the dense Jacobian of f over the whole batch's flattened state at z*; the Jacobian term at
    z* held constant, its probe drawn from the random state `probe`, as the forward pass's."""
    images = images.detach().requires_grad_()
    inputs = [*model.parameters(), images]
    layer, x = model.layer, model.stem(images)
    structure = Structure.of(z_star)
    flat_star = structure.flatten(z_star).detach()
    flat = flat_star.clone().requires_grad_()
    z = structure.unflatten(flat)
    loss = nn.functional.cross_entropy(model.head(z), labels)
    if layer.init != "zeros":  # z0: the predictor's, or Skip Reg.'s one step from zero
        z0 = layer.skip(x) if layer.init == "skip" else layer.f(deq.initial_state(layer.f, x), x)
        loss = loss + weights["lambda_skip"] * deq.skip_loss(layer.f(z, x), z0)
    torch.set_rng_state(probe)
    jac = deq.hutchinson_jacobian_loss(lambda v: layer.f(v, x), structure.unflatten(flat_star))
    loss = loss + weights["lambda_jac"] * jac
    *explicit, v = torch.autograd.grad(loss, [*inputs, flat], retain_graph=True, allow_unused=True)
    n = flat_star.numel()
    jacobian = torch.autograd.functional.jacobian(
        lambda u: structure.flatten(layer.f(structure.unflatten(u.view_as(flat_star)), x.detach())),
        flat_star,
        vectorize=True,
    ).reshape(n, n)
    g = torch.linalg.solve((torch.eye(n, dtype=v.dtype) - jacobian).T, v.reshape(-1))
    image = structure.flatten(layer.f(structure.unflatten(flat_star), x))
    through = torch.autograd.grad(image, inputs, g.view_as(flat_star), allow_unused=True)
    zero = torch.zeros((), dtype=v.dtype)
    return [
        (e if e is not None else zero) + (t if t is not None else zero)
        for e, t in zip(explicit, through, strict=True)
    ]


def _recording_probes(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """Where the layer estimates its Jacobian term, the random state its probe is drawn from
    (after the dropout masks the forward pass draws), under "probe"."""
    recorded, estimate = {}, deq.hutchinson_jacobian_loss

    def recording(f: Callable, z: deq.State) -> torch.Tensor:
        recorded["probe"] = torch.get_rng_state()
        return estimate(f, z)

    monkeypatch.setattr(deq, "hutchinson_jacobian_loss", recording)
    return recorded


@pytest.mark.parametrize("variant", ["vanilla", "skip", "skip_reg"])
@pytest.mark.parametrize("lambda_skip", [0.0, 1.0])
def test_the_objective_s_gradient_in_every_parameter_is_the_implicit_function_theorem_s(
    variant, lambda_skip, monkeypatch
):
    """The training objective (cross-entropy + lambda_skip skip_loss + lambda_jac jac_loss)
    of mnist_dense in float64, solved to 1e-11, has in every parameter (stem, f, predictor,
    head) and in the images the gradient of the implicit function theorem with a dense
    Jacobian, skip_loss reaching the predictor or f(0, x) through z0 and f through z*, and the
    Jacobian term at z* held constant (its documented gradient); at lambda_skip = 0 the
    predictor gets 0."""
    options = {"abstol": 1e-11, "reltol": 1e-11, "max_steps": 2000, "jac_reg": True}
    options["adjoint_options"] = {"rtol": 1e-13, "max_iters": 200}
    torch.manual_seed(0)
    model = models.build({"model": "mnist_dense", "variant": variant, **options}).double()
    images, labels = torch.randn(3, 784, dtype=torch.float64), torch.tensor([0, 4, 9])
    weights = {"lambda_skip": lambda_skip, "lambda_jac": 0.5}
    recorded = _recording_probes(monkeypatch)
    images.requires_grad_()
    logits, out = model(images)
    loss = objective.Objective(**weights)(logits, labels, out)
    grads = torch.autograd.grad(loss, [*model.parameters(), images])
    expected = _implicit_gradients(model, images, labels, out.z, weights, recorded["probe"])
    names = [name for name, _ in model.named_parameters()] + ["images"]
    for name, got, want in zip(names, grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11, msg=name)
        if name.startswith("layer.skip.") and lambda_skip == 0.0:
            assert not got.any(), name


@pytest.mark.parametrize(
    ("variant", "solver", "mode"),
    [("vanilla", "bs3", "train"), ("skip", "broyden", "train"), ("skip_reg", "euler", "train")]
    + [("skip", "anderson", "eval")],
)
def test_a_multiscale_objective_s_gradient_is_the_implicit_function_theorem_s(
    variant, solver, mode, monkeypatch
):
    """The objective of a two-scale MDEQ (group norms, weight norm, up- and down-sampling,
    variational dropout) in float64, solved to 1e-10 and differentiated by GMRES, has in every
    parameter (stem, cell, predictor, head) and in the images the gradient of the implicit
    function theorem with a dense Jacobian of f over the flattened two-part state of the
    batch: in training mode with the dropout masks of the forward pass, which its backward
    keeps, and the Jacobian term, in evaluation mode without either."""
    torch.manual_seed(0)
    stem, cell, head, skip = tiny_mdeq(dropout=0.3, gain=0.05)  # 60 to 300 evaluations
    init = {"vanilla": "zeros", "skip": "skip", "skip_reg": "skip_reg"}[variant]
    layer = deq.DEQ(
        cell,
        init=init,
        skip=skip if init == "skip" else None,
        solver=solver,
        abstol=1e-10,
        reltol=0.0,
        max_steps=1000,
        jac_reg=True,
        adjoint_options={"rtol": 1e-13, "restart": 100, "max_iters": 100},
    )
    model = models.EquilibriumClassifier(stem, layer, head).train(mode == "train")
    images = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, 7])
    weights = {"lambda_skip": 1.0, "lambda_jac": 0.5}
    recorded = _recording_probes(monkeypatch)
    logits, out = model(images)
    loss = objective.Objective(**weights)(logits, labels, out)
    grads = torch.autograd.grad(loss, [*model.parameters(), images])
    assert bool(out.stats.converged.all()) and bool(out.stats.backward_converged.all())
    weights["lambda_jac"] *= mode == "train"
    probe = recorded.get("probe", torch.get_rng_state())
    expected = _implicit_gradients(model, images, labels, out.z, weights, probe)
    names = [name for name, _ in model.named_parameters()] + ["images"]
    for name, got, want in zip(names, grads, expected, strict=True):
        # z* is within 1e-10: the gradient carries a relative error of about that order
        assert float((got - want).norm()) <= 1e-8 * float(want.norm()), name
        assert float(want.norm()) > 0, name


def test_the_loss_of_bfloat16_logits_is_their_cross_entropy_in_float32():
    """Under autocast the logits come in bfloat16: the cross-entropy is taken of their values
    in float32, not rounded to bfloat16's three digits."""
    logits = torch.tensor([[1.5, -0.25, 0.75], [0.125, 2.0, -1.0]], dtype=torch.bfloat16)
    labels = torch.tensor([2, 0])
    out = SimpleNamespace(skip_loss=torch.tensor(0.0), jac_loss=torch.tensor(0.0))
    rows = logits.double().tolist()
    log_softmax = [
        row[label] - math.log(sum(math.exp(v) for v in row))
        for row, label in zip(rows, labels.tolist(), strict=True)
    ]
    loss = objective.Objective(lambda_skip=1.0)(logits, labels, out)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(-sum(log_softmax) / len(log_softmax), rel=1e-6)


def test_the_loss_of_float64_logits_is_their_cross_entropy_in_float64():
    """A float64 model (`.double()`) keeps its precision through the loss: the cross-entropy
    of float64 logits is taken in float64, not rounded to float32's seven digits."""
    logits = torch.tensor([[0.1, 0.2, 0.3], [1.7, -0.4, 0.9]], dtype=torch.float64)
    labels = torch.tensor([2, 0])
    zero = torch.tensor(0.0, dtype=torch.float64)
    out = SimpleNamespace(skip_loss=zero, jac_loss=zero)
    log_softmax = [
        row[label] - math.log(sum(math.exp(v) for v in row))
        for row, label in zip(logits.tolist(), labels.tolist(), strict=True)
    ]
    loss = objective.Objective(lambda_skip=1.0)(logits, labels, out)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(-sum(log_softmax) / len(log_softmax), rel=1e-15)


class GivenLogits(nn.Module):
    """A classifier whose logits are its input, with the NFE of each call from `nfes` and the
    status of each sample's solve from `statuses` (all converged if not given); it notes the
    mode, whether gradients were on and the CPU autocast dtype (or None) of each call."""

    def __init__(self, nfes: list[int], statuses: list[list[Status]] | None = None) -> None:
        super().__init__()
        self.nfes, self.modes, self.grads, self.autocasts = iter(nfes), [], [], []
        self.statuses = iter(statuses) if statuses else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, SimpleNamespace]:
        self.modes.append(self.training)
        self.grads.append(torch.is_grad_enabled())
        autocast = torch.is_autocast_enabled("cpu")
        self.autocasts.append(torch.get_autocast_dtype("cpu") if autocast else None)
        given = next(self.statuses) if self.statuses else [Status.CONVERGED] * len(images)
        status = torch.tensor([int(code) for code in given])
        return images, SimpleNamespace(stats=SimpleNamespace(nfe=next(self.nfes), status=status))


def test_evaluation_counts_top1_and_top5_hits_over_all_samples_and_averages_nfe_per_batch():
    """Five test samples in two batches, six classes: the top-1 hits are the samples whose label
    has the largest logit (2 of 5), the top-5 hits those whose label is among the five largest
    (4 of 5); the NFE is the mean over the batches (7 and 11), predicted in eval mode; the
    samples whose solve ended without converging, which no metric of an evaluation counted,
    are 3 of 5 (max_steps, diverged, non-finite), where a Neural ODE's state, which no solve
    to a tolerance reached (UNSOLVED), is none."""
    down, up = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    batches = [
        (torch.tensor([down, down, down]), torch.tensor([0, 4, 5])),  # 1st, 5th, 6th largest
        (torch.tensor([up, up]), torch.tensor([5, 2])),  # 1st, 4th largest
    ]
    ended = [
        [Status.MAX_STEPS, Status.CONVERGED, Status.UNSOLVED],
        [Status.DIVERGED, Status.NONFINITE],
    ]
    model = GivenLogits([7, 11], ended)
    totals = objective.evaluate(model, batches, torch.device("cpu"))
    metrics = totals.metrics()
    assert metrics["test_unconverged_fraction"] == pytest.approx(3 / 5)
    assert metrics["test_accuracy"] == pytest.approx(2 / 5)
    assert metrics["test_top5_accuracy"] == pytest.approx(4 / 5)
    assert metrics["test_nfe"] == pytest.approx((7 + 11) / 2)
    assert metrics["predict_time"] > 0
    assert model.modes == [False, False] and model.training
    assert model.grads == [False, False] and model.autocasts == [None, None]


class SlowestSample(nn.Module):
    """A classifier whose logits are its input and whose NFE is its batch's largest first
    feature, as a solve's NFE is that of the batch's slowest sample."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, SimpleNamespace]:
        nfe = int(images[:, 0].max())
        status = torch.full((len(images),), int(Status.CONVERGED))
        return images, SimpleNamespace(stats=SimpleNamespace(nfe=nfe, status=status))


def test_test_nfe_is_the_same_on_any_number_of_workers():
    """A batch's NFE is its slowest sample's, so test_nfe depends on which samples share a
    batch: every world_size-th sample per worker gave the digits model 5 on one worker and 8
    on two; the workers now share the test set's batches of data.eval_batch_size, the same
    batches (9, 1, 1 here) on any number of workers."""
    features = torch.tensor([2.0, 9.0, 1.0, 1.0, 1.0, 1.0, 1.0])[:, None].repeat(1, 3)
    dataset = torch.utils.data.TensorDataset(features, torch.zeros(7, dtype=torch.long))
    cfg = data.DataSection(dataset="digits", eval_batch_size=3)
    for world in (1, 2, 3, 4):
        totals = objective.Evaluation()
        for rank in range(world):
            loader = data.eval_loader(dataset, cfg, rank, world)
            part = objective.evaluate(SlowestSample(), loader, torch.device("cpu"))
            totals = objective.Evaluation(*map(sum, zip(totals.totals(), part.totals())))
        assert (totals.samples, totals.batches) == (7, 3)
        assert totals.metrics()["test_nfe"] == pytest.approx((9 + 1 + 1) / 3), world


def test_evaluation_predicts_under_the_given_autocast_and_leaves_an_eval_model_in_eval_mode():
    """The autocast handed to evaluate (a run's train.amp) covers each prediction; a model that
    was in eval mode (a benchmark's) is still in eval mode afterwards."""
    model = GivenLogits([3, 3]).eval()
    batches = [(torch.eye(6)[:2], torch.tensor([0, 1]))] * 2
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    objective.evaluate(model, batches, torch.device("cpu"), autocast)
    assert model.autocasts == [torch.bfloat16, torch.bfloat16] and not model.training


def test_evaluation_with_fewer_than_five_classes_counts_every_sample_a_top5_hit():
    """Three classes (data.fake_classes may be as few as 2): every label is among the top five,
    and the top-1 hits are those whose label has the largest logit (1 of 2)."""
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    batches = [(logits, torch.tensor([2, 0]))]
    metrics = objective.evaluate(GivenLogits([4]), batches, torch.device("cpu")).metrics()
    assert (metrics["test_accuracy"], metrics["test_top5_accuracy"]) == (0.5, 1.0)


def test_a_label_ranked_fifth_is_a_top5_hit_and_one_ranked_sixth_is_not():
    """Of six classes, the label with the fifth largest logit is among the top five and the
    one with the smallest is not; neither is a top-1 hit."""
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]] * 2)
    batches = [(logits, torch.tensor([4, 5]))]
    metrics = objective.evaluate(GivenLogits([4]), batches, torch.device("cpu")).metrics()
    assert (metrics["test_accuracy"], metrics["test_top5_accuracy"]) == (0.0, 0.5)


def test_a_sample_whose_logits_hold_a_nan_is_no_hit_where_an_infinite_logit_is_a_prediction():
    """topk ranks NaN above every number, so a model with a NaN weight had its NaN logits read
    as predictions (5 of 6 labels a top-5 hit); such a sample now hits nothing, while a
    sample whose label's logit is +inf (a finite ranking) is still a hit."""
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor(
        [[nan] * 6, [0.0, 1.0, nan, 2.0, 3.0, 4.0], [inf, 0.0, 1.0, 2.0, 3.0, -inf]]
    )
    batches = [(logits, torch.tensor([3, 2, 0]))]
    metrics = objective.evaluate(GivenLogits([4]), batches, torch.device("cpu")).metrics()
    assert (metrics["test_accuracy"], metrics["test_top5_accuracy"]) == (1 / 3, 1 / 3)


def test_predict_time_is_the_mean_of_each_batchs_seconds_on_the_clock(monkeypatch):
    """Three batches read the clock at (0, 1), (5, 8) and (8, 10): predict_time is
    (1 + 3 + 2) / 3 = 2 seconds per batch, whatever the batches' sizes."""
    ticks = iter([0.0, 1.0, 5.0, 8.0, 8.0, 10.0])
    monkeypatch.setattr(objective, "clock", lambda device: next(ticks))
    batches = [(torch.zeros(n, 10), torch.zeros(n, dtype=torch.long)) for n in (4, 1, 2)]
    totals = objective.evaluate(GivenLogits([1, 1, 1]), batches, torch.device("cpu"))
    assert totals.metrics()["predict_time"] == 2.0


def test_interval_means_average_each_metric_over_the_steps_that_recorded_it_then_reset():
    """A report's train_loss is the mean over the interval's steps; a metric that only some
    steps recorded (the solver's, apart for the unrolled warm-up steps) is the mean over those;
    the next interval starts afresh."""
    meter = reporting.Meter(("train_loss", "nfe", "pretrain_nfe"))
    steps = [
        {"train_loss": 2.0, "pretrain_nfe": 4.0},
        {"train_loss": 1.0, "nfe": 10.0},
        {"train_loss": 0.0, "nfe": 14.0},
    ]
    for step in steps:
        meter.add(step)
    cpu = torch.device("cpu")
    assert meter.means(cpu) == {"train_loss": 1.0, "nfe": 12.0, "pretrain_nfe": 4.0}
    meter.add({"train_loss": 0.5})
    assert meter.means(cpu) == {"train_loss": 0.5}
    assert meter.means(cpu) == {}


def test_a_worker_logs_the_progress_and_warnings_but_not_ray_s_info_lines(monkeypatch):
    """Ray Train sets a worker's root logger to INFO with a console handler, and its report
    logger is named by its file: each report printed a line per worker with every metric."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    with launch.loggers_kept(launch.WORKER_LOGGERS):
        root.setLevel(logging.INFO)
        logging.getLogger("raydeq").setLevel(logging.NOTSET)
        launch.show_warnings_and_progress()
        logging.getLogger("/ray/train/v2/_internal/execution/context.py").info("Reporting result 1")
        logging.getLogger("raydeq").info("[run] epoch 1.00 step 2/4")
        logging.getLogger(checkpoint.__name__).warning("falling back to the previous checkpoint")
    assert records == ["[run] epoch 1.00 step 2/4", "falling back to the previous checkpoint"]


# The loop in the driver (num_workers=0) ------------------------------------------------------


def test_the_loop_trains_reports_every_metric_and_writes_tensorboard(tmp_path, caplog):
    cfg = make_config(tmp_path, max_steps=6, checkpoint_every=3)
    with caplog.at_level(logging.INFO, logger="raydeq"):
        result = launch.fit(cfg, LOCAL)
    said = [r.getMessage() for r in caplog.records if r.name == "raydeq"]
    assert said[0] == "[run] training 6 steps on 1 worker"
    metrics = result.metrics
    assert metrics["step"] == 6 and set(METRICS) <= set(metrics)
    assert metrics["epoch"] == pytest.approx(6 / 44)  # 1,438 digits: 44 steps of 32
    assert set(config.METRICS) <= set(metrics)  # every metric a search may name is reported
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["nfe"] > 0
    assert metrics["skipped_steps"] == 0 and metrics["backward_nvjp"] > 0
    assert 0 <= metrics["backward_unconverged_fraction"] <= 1
    steps = steps_by_tag(Path(cfg.run_dir, reporting.TENSORBOARD_DIR))
    assert set(METRICS) <= set(steps)
    assert steps["train_loss"] == [1, 2, 3, 4, 5, 6]
    assert steps["test_accuracy"] == [6]
    assert metrics["test_accuracy"] <= metrics["test_top5_accuracy"] <= 1
    assert "pretrain_forward_time" not in metrics  # the preset does not unroll
    summary = train.summary(result.metrics, cfg)
    assert summary == f"test_accuracy={metrics['test_accuracy']:.4f} steps=6 run={cfg.run_dir}"


class FolderSession(Session):
    """A session without Ray: checkpoints are copied into `folder`, as Ray Train stores them."""

    def __init__(self, folder: Path) -> None:
        self.rank, self.world, self.device, self.folder = 0, 1, torch.device("cpu"), str(folder)

    def checkpoints(self):
        return stored_checkpoints(self.folder)

    def prepare_model(self, module):
        return module

    def report(self, metrics, checkpoint):
        if checkpoint is not None:
            target = Path(self.folder, f"checkpoint_{metrics['step']:06d}")
            shutil.copytree(checkpoint.path, target)


class RecordingSession(FolderSession):
    """A FolderSession that keeps each report's metrics and the step of its checkpoint (None
    without one) instead of storing the checkpoint."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.reports: list[tuple[dict, int | None]] = []

    def report(self, metrics, checkpoint):
        saved = checkpoint and read_checkpoint(Path(checkpoint.path))["step"]
        self.reports.append((dict(metrics), saved))


def test_load_model_gives_the_trained_model_of_a_run_a_trial_or_a_checkpoint_folder(tmp_path):
    """A run stored as a trial of several workers stores it (its Train run in the trial's
    folder): the model loaded from the trial's folder, the run's or its newest checkpoint's
    is the trained one, in eval mode on the CPU, its logits those of the run's model to the
    bit and its test accuracy the one the run reported with that checkpoint."""
    cfg = make_config(tmp_path, max_steps=3, eval_batches=1)
    run = loop.Loop(cfg, FolderSession(tmp_path / "trial" / "train"))
    run.run()
    model = run.state.model.eval()
    newest = tmp_path / "trial" / "train" / "checkpoint_000003"
    reported = json.loads((newest / REPORTS_FILE).read_text().splitlines()[-1])
    splits = data.load_splits(cfg.data)
    images = torch.stack([splits.test[i][0] for i in range(64)])
    with torch.no_grad():
        logits = model(images)[0]
    for folder in (tmp_path / "trial", newest.parent, newest):
        loaded = load_model(folder)
        assert not loaded.training and next(loaded.parameters()).device.type == "cpu"
        with torch.no_grad():
            assert torch.equal(loaded(images)[0], logits)
    test_data = itertools.islice(data.eval_loader(splits.test, cfg.data, 0, 1), 1)
    totals = objective.evaluate(load_model(tmp_path / "trial"), test_data, torch.device("cpu"))
    tested = objective.Evaluation(*totals.totals()).metrics()
    assert tested["test_accuracy"] == reported["test_accuracy"] > 0.1


def test_an_evaluation_says_on_stderr_how_far_it_has_come(tmp_path, monkeypatch, capsys):
    """An evaluation printed nothing until the progress line after it (one batch of 128 test
    images took 84 s on 2 busy cores with cifar10_small, of CIFAR-10's 79); a test batch begun
    5 s or more after the line before is a line on stderr, with the time left, and the
    metrics are those of the same batches evaluated without it."""
    settings = {"name": "run", "storage_path": str(tmp_path), "train": {"eval_batches": 3}}
    cfg = validate(settings | {"data": {"eval_batch_size": 16}})
    run = loop.Loop(cfg, FolderSession(tmp_path / "run"))
    ticking(monkeypatch, 10.0)
    tested = run.evaluate()
    assert capsys.readouterr().err == (
        "[run] evaluating at step 0: 0/3\n[run] evaluating at step 0: 1/3, eta 40s\n"
        "[run] evaluating at step 0: 2/3, eta 15s\n"
    )
    totals = objective.evaluate(run.state.model, itertools.islice(run.test_data, 3), run.device)
    direct = objective.Evaluation(*totals.totals()).metrics()
    assert direct["test_nfe"] > 0 and 0 < direct["test_accuracy"] < 1
    assert (tested["test_accuracy"], tested["test_nfe"]) == (
        direct["test_accuracy"],
        direct["test_nfe"],
    )


def test_training_says_on_stderr_how_far_it_has_come_between_two_reports(
    tmp_path, monkeypatch, capsys
):
    """Nothing was said between two progress lines, train.report_every steps apart (100 of
    cifar10_small, a minute each on 2 busy cores); a step begun 5 s or more after the line
    before is a line on stderr, with the time left to the epoch's end or the run's."""
    cfg = make_config(tmp_path, max_steps=3, eval_batches=1)
    ticking(monkeypatch, 10.0)
    loop.Loop(cfg, FolderSession(tmp_path / "run")).run()
    what = "[run] training steps 1 to 3"
    said = [line for line in capsys.readouterr().err.splitlines() if "training" in line]
    assert said == [f"{what}: 0/3", f"{what}: 1/3, eta 40s", f"{what}: 2/3, eta 15s"]


def test_load_model_leaves_the_callers_random_stream_as_it_found_it(tmp_path):
    """load_model drew the built model's initial weights, which the checkpoint's replace,
    from the caller's global torch stream: a notebook seeded with torch.manual_seed(0) drew
    other numbers after loading a model; it now draws the same."""
    loop.Loop(make_config(tmp_path, max_steps=1), FolderSession(tmp_path / "run")).run()
    torch.manual_seed(0)
    expected = torch.rand(8)
    torch.manual_seed(0)
    load_model(tmp_path / "run")
    assert torch.equal(torch.rand(8), expected)


def test_load_model_reads_a_file_uri_and_refuses_another_uri_naming_it(tmp_path):
    """Path() made file:///abs/run 'file:/abs/run' and s3://bucket/run 's3:/bucket/run', each
    refused as 'no such folder', the first though it was there; a file: URI is now read as
    its folder, escapes decoded, and another URI refused naming it as given."""
    model = models.build({"model": "mnist_dense"})
    state = {
        "step": 4,
        "model": model.state_dict(),
        "settings": {"model": {"model": "mnist_dense"}},
    }
    checkpoint.write_checkpoint(state, tmp_path / "my run" / "checkpoint_000004")
    images = torch.rand(2, 1, 28, 28)
    for uri in (f"file://{tmp_path}/my%20run", f"file:{tmp_path}/my%20run/"):
        with torch.no_grad():
            assert torch.equal(load_model(uri)(images)[0], model.eval()(images)[0])
    with pytest.raises(checkpoint.CheckpointError) as refused:
        load_model("s3://bucket/runs/a")
    assert str(refused.value) == (
        "s3://bucket/runs/a: only a local folder or a file: URI is read; copy the run to a "
        "local folder (for S3: aws s3 sync s3://bucket/runs/a DIR) and give that folder"
    )


def test_load_model_names_a_file_uri_as_given_in_its_errors(tmp_path):
    """Given a file: URI, load_model's errors named the local path it reads ('/abs/my run: no
    such folder' for file:///abs/my%20run), not what the caller passed; they name the URI, and
    a checkpoint inside it by the URI's path."""
    uri = f"file://{tmp_path}/my%20run"
    (tmp_path / "my run" / "empty").mkdir(parents=True)
    checkpoint.write_checkpoint({"step": 3, "model": {}}, tmp_path / "my run" / "old")
    refusals = []
    for given in (f"{uri}/absent", f"{uri}/empty/", f"{uri}/old"):
        with pytest.raises(checkpoint.CheckpointError) as refused:
            load_model(given)
        refusals.append(str(refused.value).split(": ", 1)[0])
    assert refusals == [f"{uri}/absent", f"{uri}/empty", f"{uri}/old"]
    (tmp_path / "my run" / "old" / STATE_FILE).write_bytes(b"cut")
    with pytest.raises(checkpoint.IncompleteCheckpoint) as cut:
        load_model(f"{uri}/old")
    assert str(cut.value).startswith(f"{uri}/old: {STATE_FILE} is cut short: 3 of the ")
    with pytest.raises(checkpoint.CheckpointError, match=f"^{tmp_path}/my run/absent: no such"):
        load_model(tmp_path / "my run" / "absent")


@pytest.mark.parametrize("folder", [None, 3, b"runs/a"])
def test_load_model_given_no_path_names_it_and_what_it_takes(folder, tmp_path):
    """load_model(None) or (3) failed in pathlib with "expected str, bytes or os.PathLike
    object, not NoneType", naming no argument; it is a TypeError naming the folder given and
    the paths it takes, a pathlib.Path among them, which loads the checkpoint's weights."""
    with pytest.raises(TypeError) as refused:
        load_model(folder)
    assert str(refused.value) == (
        f"folder={folder!r} must be a path (a str or pathlib.Path) of a run's, a trial's or "
        "a checkpoint's folder, or a file: URI"
    )
    model = models.build({"model": "mnist_dense"})
    settings = {"model": {"model": "mnist_dense"}}
    state = {"step": 1, "model": model.state_dict(), "settings": settings}
    checkpoint.write_checkpoint(state, tmp_path / "checkpoint_000001")
    loaded = load_model(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters()))


def test_load_model_refuses_a_file_uri_pyarrow_does_not_read_giving_its_escaped_form():
    """A file: URI with a space, which pyarrow refuses unparsed, was refused as another
    scheme's URI, told to copy the run down with aws s3 sync."""
    with pytest.raises(checkpoint.CheckpointError) as refused:
        load_model("file:///data/my run")
    assert str(refused.value) == (
        "file:///data/my run is not a URI that pyarrow reads: a space or a non-ASCII character "
        "in a URI is written percent-encoded, as in file:///data/my%20run"
    )


def test_load_model_refuses_a_folder_without_a_checkpoint_or_settings_in_one_line(tmp_path):
    """A folder without a checkpoint, a checkpoint written before checkpoints recorded their
    settings, and one whose weights do not fit the model its settings build are refused
    naming the folder and what is missing."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError) as refused:
        load_model(tmp_path / "empty")
    assert str(refused.value) == (
        f"{tmp_path / 'empty'}: holds no checkpoint (no checkpoint_* folder in it or in a "
        "folder in it, and no manifest.json)"
    )
    weights = models.build({"model": "mnist_dense"}).state_dict()
    old = tmp_path / "old" / "checkpoint_000004"
    checkpoint.write_checkpoint({"step": 4, "model": weights}, old)
    with pytest.raises(checkpoint.CheckpointError) as refused:
        load_model(tmp_path / "old")
    assert str(refused.value) == (
        f"{tmp_path / 'old'}: the checkpoint of step 4 records no settings (written before "
        "checkpoints recorded them), so the model it holds cannot be built from them; build it "
        "with raydeq.models.build and load into it the weights of "
        "raydeq.training.checkpoint.read_newest(folder)['model']"
    )
    settings = config.trained_settings(make_config(tmp_path))
    other = tmp_path / "other" / "checkpoint_000004"
    checkpoint.write_checkpoint(
        {"step": 4, "model": {"w": torch.ones(2)}, "settings": settings}, other
    )
    with pytest.raises(checkpoint.CheckpointError) as refused:
        load_model(other)
    assert str(refused.value) == (
        f"{other}: the checkpoint of step 4 does not fit the model its settings build: its model "
        "lacks 7 of the built model's tensors (stem.1.weight, stem.1.bias, layer.step, 4 more); "
        "its model has 1 tensors past the built model's (w)"
    )


def test_load_model_given_a_checkpoint_file_names_it_a_file_and_its_folder(tmp_path):
    """A checkpoint's state.pt or manifest.json given for its folder was refused as 'no such
    folder', though it exists; it is refused as a file, naming the folder that holds it. Any
    other file (a model.pt from elsewhere) was told to name its folder, which holds none."""
    cfg = make_config(tmp_path)
    settings = config.trained_settings(cfg)
    weights = models.build(cfg.model_options()).state_dict()
    written = tmp_path / "run" / "checkpoint_000002"
    checkpoint.write_checkpoint({"step": 2, "model": weights, "settings": settings}, written)
    for name in (STATE_FILE, MANIFEST_FILE):
        with pytest.raises(checkpoint.CheckpointError) as refused:
            load_model(written / name)
        assert str(refused.value) == (
            f"{written / name}: a file, not a folder; name the folder that holds it ({written})"
        )
    assert load_model(f"{written}/").layer.step == 0
    # Weights torch.save wrote elsewhere: their folder holds no checkpoint, so it is not named.
    saved = tmp_path / "shared" / "model.pt"
    saved.parent.mkdir()
    torch.save(weights, saved)
    with pytest.raises(checkpoint.CheckpointError) as refused:
        load_model(saved)
    assert str(refused.value) == (
        f"{saved}: a file, not a folder; name a run's, a trial's or a checkpoint's folder (one "
        f"with {MANIFEST_FILE} and {STATE_FILE})"
    )


@pytest.mark.parametrize(
    ("settings", "shown"),
    [
        ({"optim": {"optimizer": "sgd", "schedule": "step"}}, "missing"),
        ({"model": None, "optim": {"optimizer": "adam"}}, "None"),
        ({"model": "mnist_dense"}, "'mnist_dense'"),
    ],
)
def test_load_model_refuses_settings_without_a_model_section_in_one_line(tmp_path, settings, shown):
    """A checkpoint whose settings hold no model section as a mapping (an optimizer's or a
    schedule's alone, or a model that is not one) was refused as 'build no model ('model')'
    or crashed with an AttributeError; it is refused naming the folder, the step, the model
    section and the sections it records."""
    weights = models.build({"model": "mnist_dense"}).state_dict()
    written = tmp_path / "run" / "checkpoint_000002"
    checkpoint.write_checkpoint({"step": 2, "model": weights, "settings": settings}, written)
    with pytest.raises(checkpoint.CheckpointError) as refused:
        load_model(tmp_path / "run")
    assert str(refused.value) == (
        f"{tmp_path / 'run'}: the checkpoint of step 2 records settings without a model section "
        f"to build from (model: {shown}; sections: {', '.join(settings)}); build it with "
        "raydeq.models.build and load into it the weights of "
        "raydeq.training.checkpoint.read_newest(folder)['model']"
    )


def test_each_checkpoint_keeps_the_reports_since_the_one_before_for_a_stopped_driver(tmp_path):
    """Tune records a trial's reports on its driver, and a driver stopped before it recorded
    them lost them for good (the resumed trial starts after the checkpoint). Each checkpoint
    keeps the reports since the one before, its own included, as sent; a trial folder that
    holds only the checkpoints gives every report's step in its history."""
    from raydeq.experiments import archive

    cfg = make_config(tmp_path, max_steps=8, checkpoint_every=4)
    recorded = RecordingSession(tmp_path / "recorded")
    loop.Loop(cfg, recorded).run()
    session = FolderSession(tmp_path / "trial")
    loop.Loop(cfg, session).run()
    folders = sorted(Path(session.folder).iterdir())
    assert [p.name for p in folders] == ["checkpoint_000004", "checkpoint_000008"]
    kept = [
        [json.loads(line) for line in (p / checkpoint.REPORTS_FILE).read_text().splitlines()]
        for p in folders
    ]
    assert [[row["step"] for row in rows] for rows in kept] == [[2, 4], [6, 8]]
    sent = [metrics for metrics, _ in recorded.reports]
    timed = ("time", "second", "time_left_s")  # measured, not the same across two runs
    for row, metrics in zip(kept[0] + kept[1], sent, strict=True):
        assert row.keys() == metrics.keys()
        assert {k: v for k, v in row.items() if not k.endswith(timed)} == {
            k: v for k, v in metrics.items() if not k.endswith(timed)
        }
    history = archive.history(session.folder)
    assert history["step"].tolist() == [2, 4, 6, 8]
    assert history["test_accuracy"].dropna().tolist() == [kept[1][-1]["test_accuracy"]]


def test_a_checkpoint_cut_by_a_full_disk_stops_the_run_in_one_line_and_the_one_before_stays(
    tmp_path, monkeypatch
):
    """A full disk under the checkpoint of step 8: torch.save given a path said only
    'unexpected pos 704 vs 598', a traceback naming neither the disk nor the folder; the run
    stops with raydeq's one line naming the step, the folder and the cause, and a resume
    starts from the checkpoint of step 4, whole."""
    save, saved = torch.save, []

    def full_disk(state, target):
        saved.append(state["step"])
        if state["step"] < 8:
            return save(state, target)
        if isinstance(target, str | os.PathLike):  # as torch's zip writer reports it
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704")
        target.write(b"PK")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    cfg = make_config(tmp_path, max_steps=8, checkpoint_every=4)
    session = FolderSession(tmp_path / "trial")
    with pytest.raises(storage.StorageError) as stopped:
        loop.Loop(cfg, session).run()
    said = "the checkpoint of step 8 could not be written to /.+/.checkpoint.partial: "
    assert re.fullmatch(said + r"\[Errno 28\] No space left on device", str(stopped.value))
    error = f"raydeq.training.storage.StorageError: {stopped.value}"
    assert launch.own_error(error) == f"StorageError: {stopped.value}" and saved == [4, 8]
    assert sorted(p.name for p in Path(session.folder).iterdir()) == ["checkpoint_000004"]
    assert checkpoint.restore(session.checkpoints())["step"] == 4


class FullFile(io.RawIOBase):
    """A file on a disk with room for 100 bytes: a write past them fails with ENOSPC."""

    def __init__(self) -> None:
        super().__init__()
        self.room = 100

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return size


def test_a_full_disk_under_a_checkpoints_state_is_a_storage_error_that_leaves_nothing(
    tmp_path, monkeypatch
):
    """torch.save into a file that a full disk cuts short (a write past its first fails) drops
    the OSError and raises 'unexpected pos 704 vs 598': write_checkpoint ended in that
    RuntimeError and left its .partial folder behind. It is a StorageError naming the step
    and the cause, and nothing is left, so the same write can be tried again."""
    opened = Path.open

    def full(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        state = self.name == checkpoint.STATE_FILE and "w" in mode
        return FullFile() if state else opened(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full)
    folder = tmp_path / "checkpoint_000003"
    with pytest.raises(storage.StorageError) as stopped:
        checkpoint.write_checkpoint({"step": 3, "w": torch.ones(1000)}, folder)
    said = f"the checkpoint of step 3 could not be written to {tmp_path}/.checkpoint_000003.partial"
    assert str(stopped.value) == f"{said}: [Errno 28] No space left on device"
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert checkpoint.read_checkpoint(checkpoint.write_checkpoint({"step": 3}, folder))["step"] == 3


class FullStorage(FolderSession):
    """A FolderSession whose storage is full: a checkpoint's copy stops after its manifest with
    the error pyarrow's copy gives Ray Train and Tune, which names neither file nor folder."""

    def report(self, metrics, checkpoint):
        if checkpoint is not None:
            cut = Path(self.folder, f"checkpoint_{metrics['step']:06d}")
            cut.mkdir(parents=True)
            shutil.copy(Path(checkpoint.path, MANIFEST_FILE), cut)
            detail = "Error writing bytes to file. Detail: [errno 28] No space left on device"
            raise OSError(errno.ENOSPC, detail)


def test_a_checkpoint_the_storage_cannot_take_stops_the_run_in_one_line_naming_it(tmp_path):
    """A full storage under Ray's copy of a checkpoint: the run stopped with pyarrow's OSError,
    naming neither the step nor the folder, in a traceback from the worker and again from the
    driver, cut there before its last line; it stops with raydeq's one line naming both and
    the cause, and the copy cut short is passed over for the checkpoint before it."""
    cfg = make_config(tmp_path, max_steps=2)
    session = FullStorage(tmp_path / "run")
    run = loop.Loop(cfg, session)
    checkpoint.write_checkpoint(run.checkpoint_state(), Path(session.folder, "checkpoint_000000"))
    run.state.step = 1
    with pytest.raises(storage.StorageError) as stopped:
        run.report({}, checkpoint=True)
    assert str(stopped.value) == (
        f"the checkpoint of step 1 could not be stored in {session.folder}: [Errno 28] Error "
        "writing bytes to file. Detail: [errno 28] No space left on device"
    )
    error = f"raydeq.training.storage.StorageError: {stopped.value}"
    assert launch.own_error(error) == f"StorageError: {stopped.value}"
    assert run.checkpointed == 0 and checkpoint.restore(session.checkpoints())["step"] == 0


class UnreachableStorage(FolderSession):
    """A FolderSession whose storage refuses a checkpoint with an error of several lines, as
    pyarrow's are with the Arrow source lines they passed through."""

    def report(self, metrics, checkpoint):
        if checkpoint is not None:
            raise OSError(
                "When uploading part for key 'run/checkpoint_000001/model.pt' in bucket 'runs': "
                "AWS Error NETWORK_CONNECTION during UploadPart operation: curlCode: 28, Timeout "
                "was reached\n/arrow/cpp/src/arrow/filesystem/s3fs.cc:1848  UploadPart(part)\n"
                "/arrow/cpp/src/arrow/filesystem/filesystem.cc:636  dest->Close()"
            )


def test_a_checkpoint_error_of_several_lines_is_stored_in_one_line_naming_it(tmp_path):
    """The StorageError of a checkpoint the storage refuses keeps its error's first line: the
    Arrow source lines after it would break raydeq's one line of why the run stopped."""
    cfg = make_config(tmp_path, max_steps=2)
    session = UnreachableStorage(tmp_path / "run")
    run = loop.Loop(cfg, session)
    run.state.step = 1
    with pytest.raises(storage.StorageError) as stopped:
        run.report({}, checkpoint=True)
    assert str(stopped.value) == (
        f"the checkpoint of step 1 could not be stored in {session.folder}: When uploading part "
        "for key 'run/checkpoint_000001/model.pt' in bucket 'runs': AWS Error NETWORK_CONNECTION "
        "during UploadPart operation: curlCode: 28, Timeout was reached"
    )


class SilentStorage(FolderSession):
    """A FolderSession whose storage refuses a checkpoint with an OSError of no text."""

    def report(self, metrics, checkpoint):
        if checkpoint is not None:
            raise OSError()


def test_a_checkpoint_error_of_no_text_is_stored_in_one_line_naming_its_type(tmp_path):
    """An OSError() of no message under a checkpoint's copy: taking its first line raised an
    IndexError in place of the StorageError naming the step and the folder."""
    cfg = make_config(tmp_path, max_steps=2)
    session = SilentStorage(tmp_path / "run")
    run = loop.Loop(cfg, session)
    run.state.step = 1
    with pytest.raises(storage.StorageError) as stopped:
        run.report({}, checkpoint=True)
    assert str(stopped.value) == (
        f"the checkpoint of step 1 could not be stored in {session.folder}: OSError"
    )


def crash_in_step_5(cfg: Config, session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run cfg in session until its optimizer's fifth step raises, as a machine going down."""
    step, steps = torch.optim.Adam.step, []

    def crash(self, *args, **kwargs):
        steps.append(len(steps) + 1)
        if len(steps) == 5:
            raise RuntimeError("the machine went down")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", crash)
    with pytest.raises(RuntimeError, match="the machine went down"):
        loop.Loop(cfg, session).run()
    monkeypatch.setattr(torch.optim.Adam, "step", step)


@pytest.mark.parametrize(
    "settings",
    [
        {"model": {"jac_reg": True}, "train": {"lambda_jac": 1.0}},
        {"data": {"dataset": "mnist10k", "augment": True, "loader_workers": 2}},
    ],
    ids=["hutchinson-probes", "augmentation-in-loader-processes"],
)
def test_a_run_stopped_by_a_crash_resumes_to_the_uninterrupted_runs_weights_to_the_bit(
    tmp_path, monkeypatch, settings
):
    """Model, optimizer, schedule, random draws and the data order all resume: a run that
    crashed in step 5 and was resumed from its checkpoint of step 3 ends with the weights of
    the run that was never stopped, and the optimizer and schedule in the same state; with
    the Jacobian penalty's random probes (the process's stream, which the checkpoint holds),
    and with augmentation read by loader processes that the resume starts anew."""
    train = {"epochs": 1, "max_steps": 6, "checkpoint_every": 3}
    cfg = validate(
        {"name": "run", "storage_path": str(tmp_path), **settings}
        | {"train": train | settings.get("train", {})}
    )
    loop.Loop(cfg, FolderSession(tmp_path / "straight")).run()
    stopped = FolderSession(tmp_path / "stopped")
    crash_in_step_5(cfg, stopped, monkeypatch)
    assert sorted(p.name for p in Path(stopped.folder).iterdir()) == ["checkpoint_000003"]
    loop.Loop(cfg, stopped).run()
    straight = checkpoint.read_checkpoint(tmp_path / "straight" / "checkpoint_000006")
    resumed = checkpoint.read_checkpoint(tmp_path / "stopped" / "checkpoint_000006")
    for name, weights in straight["model"].items():
        assert torch.equal(resumed["model"][name], weights), name
    assert resumed["optimizer"]["state"].keys() == straight["optimizer"]["state"].keys()
    for key, moments in straight["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(resumed["optimizer"]["state"][key][name], value), (key, name)
    assert resumed["scheduler"] == straight["scheduler"]


def test_a_resume_starts_at_the_newest_of_several_checkpoints_and_tensorboard_keeps_one_history(
    tmp_path, caplog
):
    """A run stopped after step 6 before its checkpoint of step 6 was stored: the resume
    starts at step 4 (not at the older step 2), says so, and TensorBoard holds each step once,
    the steps after 4 of the first session replaced by those of the second."""
    cfg = make_config(tmp_path, max_steps=6, checkpoint_every=2)
    session = FolderSession(tmp_path / "checkpoints")
    loop.Loop(cfg, session).run()
    stored = sorted(p.name for p in Path(session.folder).iterdir())
    assert stored == [f"checkpoint_00000{step}" for step in (2, 4, 6)]
    shutil.rmtree(Path(session.folder, stored[-1]))
    with caplog.at_level(logging.INFO, logger="raydeq"):
        resumed = loop.Loop(cfg, session)
        assert resumed.state.step == 4
        resumed.run()
    said = [r.getMessage() for r in caplog.records if r.name == "raydeq"]
    assert said[0] == "[run] resumed at step 4 of 6 on 1 worker"
    steps = steps_by_tag(Path(cfg.run_dir, reporting.TENSORBOARD_DIR))
    assert steps["train_loss"] == [1, 2, 3, 4, 5, 6]


def test_a_run_restarted_before_its_first_checkpoint_keeps_one_tensorboard_history(
    tmp_path, monkeypatch
):
    """A run that crashed in step 5 with no checkpoint yet starts again at step 1: TensorBoard
    holds each step once, the first session's steps 1 to 4 replaced by the second's."""
    cfg = make_config(tmp_path, max_steps=6)
    session = FolderSession(tmp_path / "checkpoints")
    crash_in_step_5(cfg, session, monkeypatch)
    assert not Path(session.folder).exists()  # no checkpoint to resume from
    time.sleep(1)  # event files are named by their second (and in one process, a counter)
    loop.Loop(cfg, session).run()
    steps = steps_by_tag(Path(cfg.run_dir, reporting.TENSORBOARD_DIR))
    assert steps["train_loss"] == [1, 2, 3, 4, 5, 6]


def test_a_resume_takes_the_checkpoint_of_the_latest_step_whatever_the_clock_named_it(tmp_path):
    """Ray Train names a checkpoint by its worker's local time: steps 10 and 20 written at 02:10
    and 02:50, then the clock set back an hour (daylight saving time ends) and step 30 written
    at 02:20. The resume takes step 30, after a folder with no manifest (a copy cut short),
    which is tried first and named."""
    names = {10: "02-10-00", 20: "02-50-00", 30: "02-20-00"}
    for step, time_of_day in names.items():
        name = f"checkpoint_2026-10-25_{time_of_day}.000000"
        checkpoint.write_checkpoint({"step": step}, tmp_path / name)
    (tmp_path / "checkpoint_2026-10-25_01-00-00.000000").mkdir()
    order = []
    for held in stored_checkpoints(str(tmp_path)):
        with held as folder:
            order.append(Path(folder).name[len("checkpoint_2026-10-25_") :][:8])
    assert order == ["01-00-00", "02-20-00", "02-50-00", "02-10-00"]
    assert checkpoint.restore(stored_checkpoints(str(tmp_path)))["step"] == 30


def test_a_manifest_whose_step_is_edited_to_no_integer_is_read_as_an_unreadable_one(tmp_path):
    """A manifest whose step was edited to 1e999 (JSON's infinity) ended the ordering of the
    checkpoints, and so the preflight of the run, in an OverflowError; it is ordered first
    with the manifests that cannot be read, and restore, which checks the state against the
    manifest's checksum, reads its state of step 12."""
    for step in (3, 12):
        checkpoint.write_checkpoint({"step": step}, tmp_path / f"checkpoint_{step:06d}")
    manifest = tmp_path / "checkpoint_000012" / checkpoint.MANIFEST_FILE
    for edited in ("1e999", "-1e999", "NaN", '"twelve"'):
        manifest.write_text(manifest.read_text().replace('"step": 12', f'"step": {edited}'))
        folders = [str(tmp_path / f"checkpoint_{step:06d}") for step in (3, 12)]
        assert checkpoint.newest_first(pyarrow.fs.LocalFileSystem(), folders) == folders[::-1]
        assert checkpoint.read_newest(tmp_path)["step"] == 12
        manifest.write_text(manifest.read_text().replace(f'"step": {edited}', '"step": 12'))
    assert checkpoint.manifest_step(pyarrow.fs.LocalFileSystem(), folders[1]) == 12


def test_a_tune_trials_session_is_rank_0_of_1_and_reports_its_checkpoints(tmp_path, monkeypatch):
    """The process of a one-worker Tune trial: on the CPU unless given a GPU, its checkpoints
    newest first (Tune numbers them), and each report hands its checkpoint to Tune as a
    ray.tune.Checkpoint (with a ray.train one, Tune warned of a deprecation in every trial)."""
    for step in (3, 12, 100):
        (tmp_path / f"checkpoint_{step:06d}").mkdir()
    (tmp_path / "tensorboard").mkdir()
    trial = TuneTrial(f"{tmp_path}/", use_gpu=False)
    assert (trial.rank, trial.world, trial.device, trial.folder) == (
        0,
        1,
        torch.device("cpu"),
        str(tmp_path),
    )
    assert TuneTrial(str(tmp_path), use_gpu=True).device == torch.device("cuda")
    newest_first = []
    for held in trial.checkpoints():
        with held as folder:
            newest_first.append(Path(folder).name)
    assert newest_first == ["checkpoint_000100", "checkpoint_000012", "checkpoint_000003"]
    sent = []
    tune_session = SimpleNamespace(report=lambda metrics, checkpoint: sent.append(checkpoint))
    monkeypatch.setattr(ray.train._internal.session, "_session", tune_session)
    saved = Checkpoint.from_directory(str(tmp_path / "checkpoint_000100"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trial.report({"step": 100}, saved)
        trial.report({"step": 101}, None)
    assert isinstance(sent[0], ray.tune.Checkpoint) and sent[1] is None
    assert (sent[0].path, sent[0].filesystem) == (saved.path, saved.filesystem)


def written_in_the_first_format(folder: Path) -> None:
    """Rewrite each checkpoint in `folder` as raydeq wrote them until 2026-12-02: a manifest
    of the step and the state's SHA-256 alone, no settings, no reports."""
    for saved in folder.glob("checkpoint_*"):
        state = read_checkpoint(saved)
        del state["settings"]
        shutil.rmtree(saved)
        saved.mkdir()
        torch.save(state, saved / STATE_FILE)
        digest = hashlib.sha256((saved / STATE_FILE).read_bytes()).hexdigest()
        (saved / MANIFEST_FILE).write_text(json.dumps({"step": state["step"], "sha256": digest}))


class RecordingTrial(TuneTrial):
    """A one-worker Tune trial's session that keeps its reports' steps instead of sending them
    to Tune, and stores its checkpoints in its folder as Tune does."""

    def __init__(self, trial_dir: Path) -> None:
        super().__init__(str(trial_dir), use_gpu=False)
        self.steps: list[int] = []

    def report(self, metrics, checkpoint):
        self.steps.append(metrics["step"])
        if checkpoint is not None:
            shutil.copytree(checkpoint.path, Path(self.folder, f"checkpoint_{len(self.steps):06d}"))


def test_a_one_worker_trial_of_an_older_raydeq_resumes_from_its_train_runs_checkpoints(
    tmp_path, monkeypatch
):
    """Until 2026-12-02 every Tune trial trained through Ray Train, which kept a one-worker
    trial's checkpoints in the trial's TRAIN_RUN folder; a trial now trains in its own process
    and read its own folder alone, so `tune --resume` of such an experiment trained every
    trial again from step 1 (digits stopped at step 198: steps 22 to 198 trained and reported
    twice). It now resumes from the newest of either folder, and the old checkpoints stay."""
    trial = tmp_path / "trial"
    cfg = validate(
        {
            "name": storage.TRAIN_RUN,
            "storage_path": str(trial),
            "train": {"epochs": 1, "max_steps": 6, "report_every": 2, "checkpoint_every": 2},
        }
    )
    crash_in_step_5(cfg, FolderSession(trial / storage.TRAIN_RUN), monkeypatch)
    written_in_the_first_format(trial / storage.TRAIN_RUN)
    old = sorted(p.name for p in (trial / storage.TRAIN_RUN).glob("checkpoint_*"))
    assert old == ["checkpoint_000002", "checkpoint_000004"]
    session = RecordingTrial(trial)
    resumed = loop.Loop(cfg, session)
    assert resumed.state.step == 4
    resumed.run()
    assert session.steps == [6]
    assert sorted(p.name for p in (trial / storage.TRAIN_RUN).glob("checkpoint_*")) == old
    assert read_checkpoint(trial / "checkpoint_000001")["step"] == 6


def test_a_worker_of_two_steps_through_each_epoch_as_one_worker_does(tmp_path, monkeypatch):
    """11 samples in global batches of 4: worker 0 of 2 takes two steps an epoch, as one worker
    would (its shard of 6, evened out by DistributedSampler, holds three batches of 2, the
    third of them a repeat), and each epoch starts at the head of that epoch's shard."""
    data_section = {"dataset": "fake", "fake_samples": 11, "batch_size": 4}
    raw = {"name": "run", "storage_path": str(tmp_path), "data": data_section}
    cfg = validate(raw | {"train": {"epochs": 2}, "scaling": {"num_workers": 2}})
    session = RecordingSession(tmp_path / "run")
    session.world = 2
    seen, step = [], loop.Loop.train_step

    def record(self, images, labels, data_time):
        seen.append((self.state.step, images))
        return step(self, images, labels, data_time)

    monkeypatch.setattr(loop.Loop, "train_step", record)
    loop.Loop(cfg, session).run()
    splits = data.load_splits(cfg.data)
    shard = data.train_loader(splits.train, cfg.data, cfg.seed, rank=0, world_size=2)
    expected = []
    for epoch in (0, 1):
        data.set_position(shard, epoch, 0)
        expected += [images for images, _ in itertools.islice(shard, 2)]
    assert [s for s, _ in seen] == [0, 1, 2, 3]
    assert all(torch.equal(a, b) for (_, a), b in zip(seen, expected, strict=True))
    assert [(m["step"], m["epoch"]) for m, _ in session.reports] == [(2, 1.0), (4, 2.0)]


# One worker of two (gloo on this machine): its Loop's step on its half of the batch in
# batch.pt, the step's metrics printed as JSON.
HALF_A_BATCH = """
import json, sys, torch, torch.distributed as dist
from raydeq.training import loop
from raydeq.training.config import validate
from raydeq.training.session import Session
rank, address, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=address, rank=rank, world_size=2)
class Worker(Session):
    def __init__(self):
        self.rank, self.world, self.device, self.folder = rank, 2, torch.device("cpu"), folder
    def checkpoints(self):
        return []
    def prepare_model(self, module):
        return module
    def report(self, metrics, checkpoint):
        pass
cfg = validate(json.loads(sys.argv[4]))
images, labels = torch.load(f"{folder}/batch.pt")
share = slice(rank * len(labels) // 2, (rank + 1) * len(labels) // 2)
print(json.dumps(loop.Loop(cfg, Worker()).train_step(images[share], labels[share], 0.0)))
dist.destroy_process_group()
"""


def test_a_steps_nfe_on_two_workers_is_the_whole_batchs_slowest_samples(tmp_path):
    """A batch's NFE is its slowest sample's: a batch whose second half takes 17 evaluations of
    f and first half 13 takes 17 on one worker. Two workers, a half each, reported the mean of
    their halves' counts, 15, so a run's nfe fell with its workers (digits, the same model and
    losses on 1 and 2 workers: 14.77 and 14.48); each step's count is now the batch's, the most
    of any worker's, on either worker."""
    raw = {"name": "run", "storage_path": str(tmp_path), "train": {"epochs": 1, "max_steps": 1}}
    run = loop.Loop(validate(raw), FolderSession(tmp_path / "run"))
    images, labels = next(iter(run.train_data))
    images[16:] *= 4.0  # a harder half
    with torch.random.fork_rng():
        halves = [run.state.model(images[half])[1].stats.nfe for half in (slice(16), slice(16, 32))]
    assert halves == [13, 17]
    whole = run.train_step(images, labels, 0.0)
    assert whole["nfe"] == 17
    torch.save((images, labels), tmp_path / "batch.pt")
    # A file rendezvous: a port found free here could be taken before rank 0 listens on it.
    address = f"file://{tmp_path / 'rendezvous'}"
    two = json.dumps(raw | {"scaling": {"num_workers": 2}})
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", HALF_A_BATCH, str(rank), address, str(tmp_path), two],
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    steps = [json.loads(worker.communicate(timeout=300)[0]) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0]
    assert [step["nfe"] for step in steps] == [whole["nfe"]] * 2
    assert [step["backward_nvjp"] for step in steps] == [whole["backward_nvjp"]] * 2


def test_eval_batches_tests_the_same_images_on_any_number_of_workers(tmp_path, monkeypatch):
    """train.eval_batches=3 took 3 batches of each worker's shard: 600 test images on two
    workers where one worker tests 300, so a shortened evaluation's accuracy and NFE moved with
    the workers. The workers now share the test set's first 3 batches as they share the whole:
    worker 0 the first and third (200 images), worker 1 the second, and between them they
    count the hits and evaluations that one worker counts."""
    totals: list[objective.Evaluation] = []

    def recorded(*args: Any, **kwargs: Any) -> objective.Evaluation:
        totals.append(objective.evaluate(*args, **kwargs))
        return totals[-1]

    monkeypatch.setattr(loop, "evaluate", recorded)
    train = {"epochs": 1, "max_steps": 1, "eval_batches": 3}
    raw = {"name": "run", "storage_path": str(tmp_path), "train": train}
    raw["data"] = {"eval_batch_size": 100}
    loop.Loop(validate(raw), FolderSession(tmp_path / "one")).evaluate()
    for rank in (0, 1):
        session = FolderSession(tmp_path / "two")
        session.rank, session.world = rank, 2
        loop.Loop(validate(raw | {"scaling": {"num_workers": 2}}), session).evaluate()
    alone, *shares = totals
    assert (alone.samples, alone.batches) == (300, 3)
    assert [(share.samples, share.batches) for share in shares] == [(200, 2), (100, 1)]
    assert sum(share.correct for share in shares) == alone.correct
    assert sum(share.nfe for share in shares) == alone.nfe


def test_a_step_reports_its_loss_and_accuracy_and_clips_the_gradient_to_grad_clip(tmp_path):
    """A step's train_loss is the cross-entropy (-log softmax at the label, averaged) plus
    lambda_skip times the skip loss of its forward pass, its train_accuracy the fraction of the
    batch whose largest logit is the label's; with plain SGD at lr 1 the update is the clipped
    gradient itself, so the weights move by exactly optim.grad_clip in norm."""
    optim = {"optimizer": "sgd", "momentum": 0.0, "lr": 1.0, "schedule": "constant"}
    cfg = validate(
        {
            "name": "run",
            "storage_path": str(tmp_path),
            "optim": optim | {"grad_clip": 1e-3},
            "train": {"epochs": 1, "max_steps": 1},
        }
    )
    run = loop.Loop(cfg, FolderSession(tmp_path / "run"))
    images, labels = next(iter(run.train_data))
    model = run.state.model
    logits, out = model(images)
    picked = logits.detach().log_softmax(1)[torch.arange(len(labels)), labels]
    loss = -picked.mean().item() + cfg.train.lambda_skip * out.skip_loss.item()
    hits = sum(int(row.argmax() == label) for row, label in zip(logits, labels, strict=True))
    before = [p.detach().clone() for p in model.parameters()]
    metrics = run.train_step(images, labels, 0.0)
    assert metrics["train_loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["train_accuracy"] == pytest.approx(hits / len(labels))
    moved = [(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]
    assert torch.cat(moved).norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_a_step_reports_the_solve_of_its_own_forward_pass_and_adds_the_jacobian_term(tmp_path):
    """With the Jacobian penalty on (lambda_jac 2, the preset's lambda_skip 0.2), a step's
    train_loss is the cross-entropy plus 0.2 x skip_loss plus 2 x jac_loss, and its nfe, residual
    (the batch mean), skip_loss and jac_loss are those of the same forward pass run beforehand
    with the same Hutchinson probes."""
    cfg = validate(
        {
            "name": "run",
            "storage_path": str(tmp_path),
            "model": {"jac_reg": True},
            "train": {"epochs": 1, "max_steps": 1, "lambda_jac": 2.0},
        }
    )
    run = loop.Loop(cfg, FolderSession(tmp_path / "run"))
    images, labels = next(iter(run.train_data))
    with torch.random.fork_rng():  # the step draws the same probes
        logits, out = run.state.model(images)
    picked = logits.detach().log_softmax(1)[torch.arange(len(labels)), labels]
    skip, jac = out.skip_loss.item(), out.jac_loss.item()
    assert skip > 0 and jac > 0 and cfg.train.lambda_skip == 0.2
    metrics = run.train_step(images, labels, 0.0)
    expected = -picked.mean().item() + 0.2 * skip + 2 * jac
    assert metrics["train_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["skip_loss"] == pytest.approx(skip, rel=1e-5)
    assert metrics["jac_loss"] == pytest.approx(jac, rel=1e-5)
    assert metrics["nfe"] == out.stats.nfe and metrics["backward_nvjp"] > 0
    residuals = out.stats.residual.tolist()
    assert metrics["residual"] == pytest.approx(sum(residuals) / len(residuals), rel=1e-5)


def test_a_jacobian_term_of_weight_0_is_logged_and_noted_but_left_out_of_the_loss(tmp_path, caplog):
    """model.jac_reg with train.lambda_jac 0 logs jac_loss alone: the loss is the cross-entropy
    plus the skip term (weighed by the preset's 0.2), whose gradient pays no double backward
    through the estimate (and an infinite estimate no longer turns the loss into NaN), and the
    run says so at its start (beside a step schedule's first decay, after 30 epochs of 44
    steps, past the run's one)."""
    cfg = validate(
        {
            "name": "run",
            "storage_path": str(tmp_path),
            "model": {"jac_reg": True},
            "optim": {"schedule": "step"},
            "train": {"epochs": 1, "max_steps": 1},
        }
    )
    with caplog.at_level(logging.INFO, logger="raydeq"):
        run = loop.Loop(cfg, FolderSession(tmp_path / "run"))
    said = [r.getMessage() for r in caplog.records if r.name == "raydeq"]
    assert said == [
        "[run] training 1 steps on 1 worker",
        "[run] model.jac_reg=true with train.lambda_jac=0: jac_loss is estimated and logged, "
        "not penalised; set train.lambda_jac above 0 to penalise it",
        "[run] optim.schedule=step with optim.step_epochs=30: the first decay comes after step "
        "1320, past the run's last update (step 1), so every step trains at optim.lr=0.001; "
        "lower optim.step_epochs to decay within the run",
    ]
    images, labels = next(iter(run.train_data))
    with torch.random.fork_rng():  # the step draws the same probes
        logits, out = run.state.model(images)
    picked = logits.detach().log_softmax(1)[torch.arange(len(labels)), labels]
    skip, jac = out.skip_loss.item(), out.jac_loss.item()
    assert jac > 0 and out.jac_loss.requires_grad
    metrics = run.train_step(images, labels, 0.0)
    assert metrics["train_loss"] == pytest.approx(-picked.mean().item() + 0.2 * skip, rel=1e-5)
    assert metrics["jac_loss"] == pytest.approx(jac, rel=1e-5)
    estimate = torch.tensor(math.inf, requires_grad=True)
    logits = torch.zeros(2, 3, requires_grad=True)
    layer = SimpleNamespace(skip_loss=torch.tensor(0.0), jac_loss=estimate)
    loss = objective.Objective(lambda_skip=1.0)(logits, torch.tensor([0, 1]), layer)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(3)) and estimate.grad is None


def test_a_steps_times_split_it_at_the_loss_the_gradients_and_the_update(tmp_path, monkeypatch):
    """A step that waited 0.75 s for its batch and read the clock at 10, 10.5, 12 and 12.25 s
    (start, loss, gradients, update): forward 0.5 s, backward 1.5 s, optimizer 0.25 s, the step
    3 s with the wait, and the batch of 32 at 32 / 3 images per second."""
    run = loop.Loop(make_config(tmp_path, max_steps=1), FolderSession(tmp_path / "run"))
    images, labels = next(iter(run.train_data))
    ticks = iter([10.0, 10.5, 12.0, 12.25])
    monkeypatch.setattr(loop, "clock", lambda device: next(ticks))
    metrics = run.train_step(images, labels, 0.75)
    times = {k: metrics[k] for k in ("forward_time", "backward_time", "optimizer_time")}
    assert times == {"forward_time": 0.5, "backward_time": 1.5, "optimizer_time": 0.25}
    assert (metrics["data_time"], metrics["step_time"]) == (0.75, 3.0)
    assert metrics["images_per_second"] == pytest.approx(32 / 3.0)


def test_a_reports_images_per_second_are_its_images_over_its_time(tmp_path, monkeypatch):
    """Two steps of 32 images that took 0.25 s and 1.75 s: the report says 64 / 2 = 32 images
    per second, not the mean of the steps' rates (128 and 18.3: 73.1)."""
    ticks = iter([0.0, 0.0, 0.0, 0.0, 0.0, 0.25, 1.0, 1.0, 1.0, 1.0, 1.0, 2.75, 3.0])
    monkeypatch.setattr(loop, "clock", lambda device: next(ticks))
    session = RecordingSession(tmp_path / "run")
    loop.Loop(make_config(tmp_path, max_steps=2, eval_batches=1), session).run()
    ((metrics, _),) = session.reports
    assert metrics["step_time"] == pytest.approx(1.0, rel=1e-2)
    assert metrics["images_per_second"] == pytest.approx(32.0, rel=1e-2)


def test_a_steps_data_time_is_its_wait_for_the_batch(tmp_path, monkeypatch):
    """Batches that each take 50 ms to arrive: the reported data_time is at least 50 ms a step
    and the step_time includes it."""
    on_device = loop.on_device

    def slow(batches: Iterable, device: torch.device) -> Iterator:
        for batch in on_device(batches, device):
            time.sleep(0.05)
            yield batch

    monkeypatch.setattr(loop, "on_device", slow)
    session = RecordingSession(tmp_path / "run")
    loop.Loop(make_config(tmp_path, max_steps=2, eval_batches=1), session).run()
    ((metrics, _),) = session.reports
    assert metrics["data_time"] >= 0.05
    assert metrics["step_time"] >= metrics["data_time"] + metrics["forward_time"]


def test_a_steps_data_time_includes_the_copy_of_its_batch_to_the_device(tmp_path, monkeypatch):
    """A batch copied to a GPU from pinned memory is there only once the device is synchronised:
    a copy that the first synchronisation after it waits 50 ms for is part of the step's wait
    for data, and of its step_time, not time before its clock starts."""
    copying = []
    on_device = loop.on_device

    def copied(batches: Iterable, device: torch.device) -> Iterator:
        for batch in on_device(batches, device):
            copying.append(batch)
            yield batch

    def synchronised(device: torch.device) -> float:
        if copying:
            copying.clear()
            time.sleep(0.05)
        return time.perf_counter()

    monkeypatch.setattr(loop, "on_device", copied)
    monkeypatch.setattr(loop, "clock", synchronised)
    session = RecordingSession(tmp_path / "run")
    loop.Loop(make_config(tmp_path, max_steps=2, eval_batches=1), session).run()
    ((metrics, _),) = session.reports
    assert metrics["data_time"] >= 0.05
    assert metrics["step_time"] >= metrics["data_time"] + metrics["forward_time"]


def test_a_run_trains_on_its_shards_batches_in_order_from_the_first(tmp_path, monkeypatch):
    """The steps of a fresh run take the train loader's batches of epoch 0 in its order, the
    first one included, and only the finite steps move the learning-rate schedule on."""
    cfg = make_config(tmp_path, max_steps=3)
    run = loop.Loop(cfg, FolderSession(tmp_path / "run"))
    splits = data.load_splits(cfg.data)
    loader = data.train_loader(splits.train, cfg.data, cfg.seed, rank=0, world_size=1)
    data.set_position(loader, 0, 0)
    expected = [labels for _, labels in itertools.islice(loader, 3)]
    seen, step = [], run.train_step

    def recorded(images: torch.Tensor, labels: torch.Tensor, data_time: float) -> dict | None:
        seen.append(labels)
        return step(images, labels, data_time)

    monkeypatch.setattr(run, "train_step", recorded)
    run.run()
    assert len(seen) == 3 and all(map(torch.equal, seen, expected))
    assert run.state.scheduler.last_epoch == 3
    images, labels = next(iter(loader))
    assert run.train_step(torch.full_like(images, math.nan), labels, 0.0) is None
    assert run.state.scheduler.last_epoch == 3


class HostReads(TorchDispatchMode):
    """Counts the host reads of tensor values (`.item()`, `float(t)`, `bool(t)`, `.tolist()`)
    that the loop makes outside the solver core, whose own reads tests/test_solvers.py counts:
    on an accelerator each one waits for the device's queued work."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.reads = 0
        tolist = torch.Tensor.tolist

        def counted(tensor: torch.Tensor) -> Any:
            self.count()
            return tolist(tensor)

        monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def count(self) -> None:
        """Count a read unless the solver core makes it: a forward solve's steps or an adjoint."""
        core = {driver.__file__, adjoint.__file__}
        frame = sys._getframe()
        while frame is not None and frame.f_code.co_filename not in core:
            frame = frame.f_back
        self.reads += frame is None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count()
        return func(*args, **(kwargs or {}))


def reads_per_step(run: loop.Loop, monkeypatch: pytest.MonkeyPatch, steps: int = 3) -> float:
    """Host reads outside the solver core per step of `run`'s loop (step, record, end of step)
    between its reports, after a first step."""
    batches = loop.on_device(iter(run.train_data), run.device)

    def step() -> None:
        run.record(run.train_step(*next(batches), 0.0))
        run.end_step()

    step()
    with HostReads(monkeypatch) as counter:
        for _ in range(steps):
            step()
    monkeypatch.undo()
    return counter.reads / steps


@pytest.mark.parametrize(
    "model", [{"variant": "vanilla"}, {"variant": "skip", "jac_reg": True}, {"variant": "skip_reg"}]
)
def test_a_training_step_reads_the_device_once_for_its_finiteness_and_its_metrics(
    tmp_path, monkeypatch, model
):
    """Whether a step is finite decides on the host whether the optimizer steps: that one read
    also brings the step's loss, accuracy, layer losses and solver statistics, where each was
    a read of its own (ten a step, each a stall of the device's queue)."""
    train = {"epochs": 1, "report_every": 20, "lambda_jac": float(model.get("jac_reg", False))}
    raw = {"name": "run", "storage_path": str(tmp_path), "model": model, "train": train}
    run = loop.Loop(validate(raw), FolderSession(tmp_path / "run"))
    assert reads_per_step(run, monkeypatch) == 1


def test_an_unrolled_warm_up_step_asks_the_layer_once_whether_a_step_unrolls(tmp_path, monkeypatch):
    """A warm-up step reads the device three times: the step's finiteness and metrics, and the
    layer's call count twice, for the loop's question whether the step unrolls and the layer's
    own in its call. The report at the warm-up's last step asked again at each step's end
    whether the next unrolls, the question the next step then read once more (4 reads a step);
    the step's end and the next step now share one answer."""
    train = {"epochs": 1, "report_every": 20}
    model = {"pretrain_steps": 10}
    raw = {"name": "run", "storage_path": str(tmp_path), "model": model, "train": train}
    run = loop.Loop(validate(raw), FolderSession(tmp_path / "run"))
    assert reads_per_step(run, monkeypatch) == 3
    assert run.unrolled and run.state.model.layer.pretraining()


def test_non_finite_steps_stop_the_run_only_when_max_nonfinite_steps_come_in_a_row(tmp_path):
    """A finite step between non-finite ones starts the count again: with
    max_nonfinite_steps=3, two skipped steps, a good one and two more skipped go on, and the
    third in a row stops the run at its step."""
    run = loop.Loop(make_config(tmp_path, max_nonfinite_steps=3), FolderSession(tmp_path / "run"))
    for metrics in (None, None, {"train_loss": 1.0}, None, None):
        run.record(metrics)
    assert (run.state.step, run.state.skipped_steps) == (5, 4)
    with pytest.raises(loop.NonFiniteError, match="^training stopped at step 6: 3 steps in a row"):
        run.record(None)


def test_a_non_finite_gradient_of_a_finite_loss_skips_the_step_without_fp16(tmp_path):
    """Without a GradScaler an infinite gradient is no overflow to step past: the update and the
    schedule are skipped, the weights stay as they were and the step counts as skipped."""
    run = loop.Loop(make_config(tmp_path, max_steps=2), FolderSession(tmp_path / "run"))
    images, labels = next(iter(run.train_data))
    model = run.state.model
    next(model.parameters()).register_hook(lambda grad: torch.full_like(grad, math.inf))
    before = [p.detach().clone() for p in model.parameters()]
    assert run.train_step(images, labels, 0.0) is None
    assert all(map(torch.equal, model.parameters(), before))
    assert run.state.scheduler.last_epoch == 0
    run.record(None)
    assert (run.state.skipped_steps, run.state.overflow_steps) == (1, 0)


def test_fp16_overflows_at_a_scale_of_1_are_non_finite_steps_that_stop_the_run(tmp_path):
    """A gradient infinite at any scale: the scaler halves 2**16 to 1 in 16 overflow steps, and
    the overflows after it, which no lower scale owes to scaling, are non-finite steps that stop
    the run at step 19 (max_nonfinite_steps=3), where each was an overflow and 30 steps of no
    update finished as a trained run."""
    cfg = make_config(tmp_path, max_steps=30, amp="fp16", max_nonfinite_steps=3)
    run = loop.Loop(cfg, FolderSession(tmp_path / "run"))
    next(run.state.model.parameters()).register_hook(lambda grad: torch.full_like(grad, math.inf))
    with pytest.raises(loop.NonFiniteError, match="^training stopped at step 19: 3 steps in a"):
        run.train()
    state = run.state
    assert (state.overflow_steps, state.skipped_steps, state.scaler.get_scale()) == (16, 3, 1.0)


def test_fp16_steps_with_a_non_finite_loss_are_skipped_not_counted_as_overflows(tmp_path):
    """Under fp16 a NaN loss is no scaler overflow (a lower scale cannot make it finite): the
    step is skipped at the scale it had, so that max_nonfinite_steps of them stop the run."""
    cfg = make_config(tmp_path, max_steps=2, amp="fp16", max_nonfinite_steps=1)
    run = loop.Loop(cfg, FolderSession(tmp_path / "run"))
    images, labels = next(iter(run.train_data))
    assert run.train_step(torch.full_like(images, math.nan), labels, 0.0) is None
    assert run.state.overflow_steps == 0 and run.state.scaler.get_scale() == 2.0**16
    assert run.train_step(images, labels, 0.0) is not None  # the scaler goes on
    with pytest.raises(loop.NonFiniteError, match="^training stopped at step 1"):
        run.record(None)


def test_an_fp16_overflow_step_halves_the_scale_and_moves_neither_weights_nor_schedule(
    tmp_path, monkeypatch
):
    """A scale of 2**127 overflows the fp16 gradients of a finite loss: the step reports its
    loss, counts one overflow, leaves the weights and the learning-rate schedule where they
    were, and the next step runs at the scale 2**126."""
    huge = functools.partial(torch.amp.GradScaler, init_scale=2.0**127)
    monkeypatch.setattr(torch.amp, "GradScaler", huge)
    cfg = make_config(tmp_path, max_steps=2, amp="fp16")
    run = loop.Loop(cfg, FolderSession(tmp_path / "run"))
    images, labels = next(iter(run.train_data))
    model = run.state.model
    before = [p.detach().clone() for p in model.parameters()]
    metrics = run.train_step(images, labels, 0.0)
    assert math.isfinite(metrics["train_loss"]) and run.state.overflow_steps == 1
    assert all(map(torch.equal, model.parameters(), before))
    assert run.state.scheduler.last_epoch == 0
    assert run.state.scaler.get_scale() == 2.0**126


def test_an_fp16_overflow_step_leaves_sgds_momentum_unset_for_the_next_step(tmp_path):
    """SGD with momentum under fp16, its first step an overflow: the optimizer holds no
    momentum yet, and the next step moves each weight by lr times its own gradient, where
    torch's fused SGD, handed the overflow, had made its momentum of uninitialised memory."""
    optim = {"optimizer": "sgd", "momentum": 0.9, "lr": 0.1, "schedule": "constant"}
    raw = {"name": "run", "storage_path": str(tmp_path), "optim": optim}
    cfg = validate(raw | {"train": {"epochs": 1, "max_steps": 2, "amp": "fp16"}})
    run = loop.Loop(cfg, FolderSession(tmp_path / "run"))
    (images, labels), second = itertools.islice(run.train_data, 2)
    model = run.state.model
    hook = next(model.parameters()).register_hook(lambda grad: torch.full_like(grad, math.inf))
    run.train_step(images, labels, 0.0)
    hook.remove()
    assert run.state.overflow_steps == 1 and not run.state.optimizer.state
    before = [p.detach().clone() for p in model.parameters()]
    assert run.train_step(*second, 0.0) is not None
    for weight, was in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(weight.detach(), was - 0.1 * weight.grad)


def test_an_fp16_run_resumes_at_the_scale_its_overflows_lowered(tmp_path, monkeypatch):
    """Two overflow steps from 2**127 leave the scale at 2**125; the run resumed from its
    checkpoint of step 2 goes on at 2**125 with its 2 overflows, not at a fresh scaler's."""
    huge = functools.partial(torch.amp.GradScaler, init_scale=2.0**127)
    monkeypatch.setattr(torch.amp, "GradScaler", huge)
    cfg = make_config(tmp_path, max_steps=4, amp="fp16", checkpoint_every=2, eval_batches=1)
    session = FolderSession(tmp_path / "run")
    run = loop.Loop(cfg, session)
    for images, labels in itertools.islice(run.train_data, 2):
        run.record(run.train_step(images, labels, 0.0))
        run.end_step()
    resumed = loop.Loop(cfg, session)
    assert (resumed.state.step, resumed.state.overflow_steps) == (2, 2)
    assert resumed.state.scaler.get_scale() == 2.0**125


def test_fp16_gradients_are_clipped_at_their_unscaled_norm(tmp_path):
    """Under fp16 the gradient is unscaled before clipping: with plain SGD at lr 1 and
    grad_clip 1e-3 the weights move by 1e-3 in norm, not by 1e-3 over the scale 2**16."""
    optim = {"optimizer": "sgd", "momentum": 0.0, "lr": 1.0, "schedule": "constant"}
    cfg = validate(
        {
            "name": "run",
            "storage_path": str(tmp_path),
            "optim": optim | {"grad_clip": 1e-3},
            "train": {"epochs": 1, "max_steps": 1, "amp": "fp16"},
        }
    )
    run = loop.Loop(cfg, FolderSession(tmp_path / "run"))
    images, labels = next(iter(run.train_data))
    model = run.state.model
    before = [p.detach().clone() for p in model.parameters()]
    assert run.train_step(images, labels, 0.0) is not None
    assert run.state.scaler.get_scale() == 2.0**16  # no overflow
    moved = [(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]
    assert torch.cat(moved).norm().item() == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("resumed", [False, True])
def test_a_run_that_diverged_after_a_checkpoint_is_not_trained_again_from_it(tmp_path, resumed):
    """The divergence record names the step of the newest checkpoint, also where the run had
    resumed from it and diverged before the next one, so that the restart that would resume
    there (and replay the same steps) is refused."""
    cfg = make_config(tmp_path, max_steps=10, checkpoint_every=2, max_nonfinite_steps=1)
    session = FolderSession(tmp_path / "run")
    run = loop.Loop(cfg, session)
    for images, labels in itertools.islice(run.train_data, 2):
        run.record(run.train_step(images, labels, 0.0))
        run.end_step()
    if resumed:
        run = loop.Loop(cfg, session)
        assert run.state.step == 2
    with pytest.raises(loop.NonFiniteError, match="^training stopped at step 3"):
        run.record(None)
    record = json.loads(Path(session.folder, loop.DIVERGED_FILE).read_text())
    assert (record["from_step"], record["workers"], record["limit"]) == (2, 1, 1)
    with pytest.raises(loop.NonFiniteError, match="it diverged like this from step 2"):
        loop.Loop(cfg, session)
    # A higher limit is the way on: the same run (its name unchanged) resumes from step 2.
    raised = make_config(tmp_path, max_steps=10, checkpoint_every=2, max_nonfinite_steps=3)
    assert raised.name == cfg.name
    assert loop.Loop(raised, session).state.step == 2


def test_a_run_whose_loss_turns_infinite_stops_naming_the_step_and_the_values(tmp_path):
    """A loss that is +inf from step 3 on stops the run at step 4 (max_nonfinite_steps=2), in
    its error and in its divergence record, with the last skipped step's loss and gradient
    norm, where both named the step alone: whether it was the loss or the gradient, NaN or
    inf, was left to a rerun."""
    cfg = make_config(tmp_path, max_steps=10, max_nonfinite_steps=2)
    run = loop.Loop(cfg, FolderSession(tmp_path / "run"))
    losses = iter([1.0, 1.0, math.inf, math.inf])
    objective_of = run.objective
    run.objective = lambda *args: objective_of(*args) * next(losses)
    reason = (
        "training stopped at step 4: 2 steps in a row had a non-finite loss or gradient "
        "(train.max_nonfinite_steps=2); the last had loss inf on worker 0 and gradient norm nan"
    )
    with pytest.raises(loop.NonFiniteError, match=f"^{re.escape(reason)}$"):
        run.train()
    record = json.loads(Path(run.session.folder, loop.DIVERGED_FILE).read_text())
    assert record["reason"] == reason


def test_a_divergence_whose_record_cannot_be_written_still_says_why_the_run_stopped(
    tmp_path, monkeypatch
):
    """A full disk under the divergence record: the run stops with the divergence's reason and
    says that its record was not kept, instead of a storage error alone."""
    cfg = make_config(tmp_path, max_steps=10, max_nonfinite_steps=1)
    run = loop.Loop(cfg, FolderSession(tmp_path / "run"))

    def full(path, payload):
        raise storage.StorageError(f"{path} could not be written: No space left on device")

    monkeypatch.setattr(loop, "write_bytes", full)
    with pytest.raises(loop.NonFiniteError) as info:
        run.record(None)
    message = str(info.value)
    assert message.startswith("training stopped at step 1")
    assert message.endswith(
        f"; its record for restarts could not be kept ({tmp_path / 'run'}/{loop.DIVERGED_FILE} "
        "could not be written: No space left on device)"
    )


def test_a_divergence_recorded_with_other_workers_does_not_stop_a_start_with_one(tmp_path):
    """The record of a run that diverged from step 0 on 2 workers refuses a start from step 0
    on 2 workers only: one worker replays other batches, so it starts."""
    cfg = make_config(tmp_path, max_steps=2)
    folder = tmp_path / "run"
    folder.mkdir()
    record = {"from_step": 0, "workers": 2, "reason": "diverged"}
    (folder / loop.DIVERGED_FILE).write_text(json.dumps(record))
    assert loop.Loop(cfg, FolderSession(folder)).state.step == 0
    (folder / loop.DIVERGED_FILE).write_text(json.dumps(record | {"workers": 1}))
    with pytest.raises(loop.NonFiniteError, match="^diverged; it diverged like this from step 0"):
        loop.Loop(cfg, FolderSession(folder))


@pytest.mark.parametrize(
    ("written", "why"),
    [
        (b"", "JSONDecodeError: Expecting value: line 1 column 1 (char 0)"),
        (b'{"from_step": 0, "workers"', "JSONDecodeError: Expecting ':' delimiter"),
        (b"[0, 1]", "TypeError: list indices must be integers or slices, not str"),
        (b'{"from_step": 0}', "KeyError: 'workers'"),
        (b'{"from_step": 0, "workers": 1, "reason": "x", "limit": []}', "TypeError: '<=' not"),
        (b"\xff", "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0"),
    ],
)
def test_a_divergence_record_edited_by_hand_is_one_line_naming_it(tmp_path, written, why):
    """A diverged.json edited by hand (empty, cut, of other JSON, other keys, other bytes)
    stopped every start of the run's workers in a traceback of json's or Python's error; it
    is now a StorageError naming the file and why, which a run prints as its one line."""
    cfg = make_config(tmp_path, max_steps=2)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / loop.DIVERGED_FILE).write_bytes(written)
    with pytest.raises(storage.StorageError) as refused:
        loop.Loop(cfg, FolderSession(folder))
    assert str(refused.value).startswith(f"{folder / loop.DIVERGED_FILE} is no record of a ")
    assert f"divergence ({why}" in str(refused.value)
    assert str(refused.value).endswith("); delete it to train on")
    lines = "".join(traceback.format_exception(refused.value))
    assert launch.own_error(lines) == f"StorageError: {refused.value}"


def test_a_divergence_record_that_cannot_be_read_is_one_line_naming_it(tmp_path, monkeypatch):
    """A diverged.json that cannot be read (Permission denied) stopped every start of the run's
    workers in pyarrow's traceback; it is a StorageError naming the file and why, which a run
    prints as its one line, not one calling the record edited, to be deleted."""
    cfg = make_config(tmp_path, max_steps=2)
    folder = tmp_path / "run"
    folder.mkdir()
    file = folder / loop.DIVERGED_FILE
    file.write_text(json.dumps({"from_step": 0, "workers": 1, "reason": "diverged"}))

    def denied(path: str) -> str:
        detail = f"[errno {errno.EACCES}] {os.strerror(errno.EACCES)}"
        raise OSError(errno.EACCES, f"Failed to open local file '{path}'. Detail: {detail}")

    monkeypatch.setattr(loop, "read_text", denied)
    with pytest.raises(storage.StorageError) as refused:
        loop.Loop(cfg, FolderSession(folder))
    assert str(refused.value) == f"{file} cannot be read: Permission denied"
    lines = "".join(traceback.format_exception(refused.value))
    assert launch.own_error(lines) == f"StorageError: {refused.value}"


@pytest.mark.parametrize(
    ("epochs", "max_steps", "total"), [(1, 10**6, 44), (2, 0, 88), (2, 50, 50)]
)
def test_a_run_trains_max_steps_but_never_past_its_epochs(tmp_path, epochs, max_steps, total):
    """The 1,438 training digits in batches of 32 are 44 full steps an epoch: max_steps
    shortens a run (0: no limit) and the epochs bound it."""
    cfg = make_config(tmp_path, epochs=epochs, max_steps=max_steps)
    run = loop.Loop(cfg, FolderSession(tmp_path / "run"))
    assert (run.steps_per_epoch, run.total_steps) == (44, total)


def hand_evaluation(model: nn.Module, batches: Iterable) -> tuple[float, float, float, int]:
    """Top-1 and top-5 accuracy (ranks by sorting the logits), mean NFE per batch and the
    samples of `model` in eval mode over `batches`."""
    model.eval()
    hits = hits5 = samples = 0
    nfes = []
    with torch.no_grad():
        for images, labels in batches:
            logits, out = model(images)
            order = logits.argsort(dim=1, descending=True)
            for row, label in zip(order.tolist(), labels.tolist(), strict=True):
                hits += row[0] == label
                hits5 += label in row[:5]
            samples += len(labels)
            nfes.append(out.stats.nfe)
    model.train()
    return hits / samples, hits5 / samples, sum(nfes) / len(nfes), samples


@pytest.mark.parametrize(("eval_batches", "samples"), [(0, 359), (1, 256)])
def test_a_runs_evaluation_takes_eval_batches_of_the_test_set_or_all_of_it(
    tmp_path, eval_batches, samples
):
    """The 359 test digits come in batches of 256 and 103: eval_batches=0 evaluates them all,
    eval_batches=1 the first batch; accuracies and NFE as counted by hand in eval mode."""
    cfg = make_config(tmp_path, max_steps=1, eval_batches=eval_batches)
    run = loop.Loop(cfg, FolderSession(tmp_path / "run"))
    images, labels = next(iter(run.train_data))
    run.train_step(images, labels, 0.0)  # away from the initial weights
    taken = itertools.islice(run.test_data, eval_batches or None)
    top1, top5, nfe, counted = hand_evaluation(run.state.model, taken)
    assert counted == samples
    metrics = run.evaluate()
    assert metrics["test_accuracy"] == pytest.approx(top1)
    assert metrics["test_top5_accuracy"] == pytest.approx(top5)
    assert metrics["test_nfe"] == pytest.approx(nfe)
    assert run.state.model.training


def test_a_runs_evaluation_runs_under_its_bf16_autocast(tmp_path):
    """train.amp=bf16: the test predictions run under the autocast as the steps do, so the
    classifier's last layer computes in bfloat16."""
    cfg = make_config(tmp_path, max_steps=1, amp="bf16", eval_batches=1)
    run = loop.Loop(cfg, FolderSession(tmp_path / "run"))
    dtypes = []
    last = [m for m in run.state.model.modules() if isinstance(m, nn.Linear)][-1]
    last.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    run.evaluate()
    assert dtypes == [torch.bfloat16]


def test_the_weights_a_run_trains_do_not_depend_on_how_its_evaluations_are_batched(tmp_path):
    """A run of 2 epochs of one step of a Jacobian-regularised layer (whose training draws
    Hutchinson probes) that evaluates its 16 test images trains the same weights as the run of
    that name that evaluates 2 batches of 4 of them (neither setting is one that changes the
    model), and an evaluation leaves the random stream where it found it."""
    fake = {"dataset": "fake", "fake_samples": 64, "batch_size": 64}
    train = {"epochs": 2, "lambda_jac": 1.0}
    settings = [(fake, train), (fake | {"eval_batch_size": 4}, train | {"eval_batches": 2})]
    names, weights = set(), []
    for i, (data_section, train_section) in enumerate(settings):
        raw = {"storage_path": str(tmp_path / str(i)), "model": {"jac_reg": True}}
        cfg = validate(raw | {"data": data_section, "train": train_section})
        run = loop.Loop(cfg, FolderSession(tmp_path / str(i)))
        before = torch.get_rng_state()
        run.evaluate()
        assert torch.equal(torch.get_rng_state(), before)
        run.run()
        names.add(cfg.name)
        weights.append(run.state.model.state_dict())
    assert len(names) == 1
    for name, value in weights[0].items():
        assert torch.equal(weights[1][name], value), name


def test_each_epochs_end_is_evaluated_and_checkpointed(tmp_path):
    """Batches of 512 of the 1,438 digits are 2 steps an epoch: a run of 2 epochs reports test
    metrics with a checkpoint at steps 2 and 4 (epochs 1 and 2), and only there."""
    cfg = validate(
        {
            "name": "run",
            "storage_path": str(tmp_path),
            "data": {"batch_size": 512},
            "train": {"epochs": 2, "report_every": 100, "eval_batches": 1},
        }
    )
    session = RecordingSession(tmp_path / "run")
    loop.Loop(cfg, session).run()
    reported = [(m["step"], m["epoch"], saved) for m, saved in session.reports]
    assert reported == [(2, 1.0, 2), (4, 2.0, 4)]
    assert all("test_accuracy" in metrics for metrics, _ in session.reports)


def test_a_finished_run_started_again_reports_its_test_metrics_and_a_checkpoint_once(tmp_path):
    """A run started again after its last step trains nothing: it evaluates the stored weights
    and reports that once, with a checkpoint of its last step."""
    cfg = make_config(tmp_path, max_steps=2, eval_batches=1)
    loop.Loop(cfg, FolderSession(tmp_path / "run")).run()
    session = RecordingSession(tmp_path / "run")
    again = loop.Loop(cfg, session)
    again.run()
    ((metrics, saved),) = session.reports
    assert (metrics["step"], saved, again.state.step) == (2, 2, 2)
    assert set(objective.TEST_METRICS) <= set(metrics) and "train_loss" not in metrics


def rates_used(schedule: Callable[[torch.optim.Optimizer], Any], steps: int) -> list[float]:
    """The rate each of `steps` updates takes under torch's `schedule` of an optimizer of lr
    0.01, read before the update as it is taken."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    scheduler = schedule(optimizer)
    used = []
    for _ in range(steps):
        used.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return used


LR_SCHEDULES = {
    "cosine": (
        {"eta_min": 0.0, "schedule": "cosine"},
        lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4),
        [0.005 * (1 + math.cos(math.pi * k / 4)) for k in range(4)],
    ),
    "step": (
        {"schedule": "step", "milestones": [2], "gamma": 0.1},
        lambda optimizer: torch.optim.lr_scheduler.MultiStepLR(optimizer, [2], gamma=0.1),
        [0.01, 0.01, 0.001, 0.001],
    ),
}


@pytest.mark.parametrize(
    ("schedule", "torch_schedule", "expected"), LR_SCHEDULES.values(), ids=LR_SCHEDULES
)
def test_the_learning_rate_in_tensorboard_at_a_step_is_the_rate_that_step_took(
    tmp_path, schedule, torch_schedule, expected
):
    """optim.lr 0.01 over 4 steps: step k is logged with the rate its update took, lr at step
    1 (not the first step's after it), and a cosine's floor, reached after the last update,
    at none; a milestone at 2 lowers the rate of step 3, the third update."""
    assert rates_used(torch_schedule, 4) == pytest.approx(expected, abs=1e-12)
    cfg = validate(
        {
            "name": "run",
            "storage_path": str(tmp_path),
            "optim": {"lr": 0.01, **schedule},
            "train": {"epochs": 1, "max_steps": 4, "report_every": 4, "eval_batches": 1},
        }
    )
    loop.Loop(cfg, FolderSession(tmp_path / "run")).run()
    events = EventAccumulator(str(Path(cfg.run_dir, reporting.TENSORBOARD_DIR)))
    events.Reload()
    rates = [(e.step, e.value) for e in events.Scalars("lr")]
    assert [step for step, _ in rates] == [1, 2, 3, 4]
    assert [rate for _, rate in rates] == pytest.approx(expected, abs=1e-9)


def test_pretraining_steps_report_their_own_times_apart_from_the_deq_solves(tmp_path):
    cfg = validate(
        {
            "name": "run",
            "storage_path": str(tmp_path),
            "model": {"pretrain_steps": 2},
            "train": {"epochs": 1, "max_steps": 4, "report_every": 4},
        }
    )
    session = RecordingSession(tmp_path / "run")
    loop.Loop(cfg, session).run()
    (warm_up, _), (metrics, _) = session.reports  # the warm-up's last step reports too
    assert (warm_up["step"], metrics["step"]) == (2, 4)
    assert warm_up["pretrain_forward_time"] > 0 and metrics["forward_time"] > 0
    # The unrolled steps backpropagate through f's calls: one VJP of f per unrolled evaluation
    # (the layer's pretrain_depth, 10), as the unrolled adjoint counts them.
    assert warm_up["pretrain_backward_time"] > 0 and warm_up["pretrain_backward_nvjp"] == 10
    assert warm_up["pretrain_nfe"] > 0
    steps = steps_by_tag(Path(cfg.run_dir, reporting.TENSORBOARD_DIR))
    assert steps["pretrain_forward_time"] == steps["pretrain_backward_time"] == [1, 2]
    assert steps["forward_time"] == steps["backward_time"] == steps["nfe"] == [3, 4]
    # The solves' state too: the warm-up runs none, and the DEQ's curves hold solves only.
    assert steps["pretrain_residual"] == steps["pretrain_unconverged_fraction"] == [1, 2]
    assert steps["residual"] == steps["unconverged_fraction"] == [3, 4]
    assert steps["optimizer_time"] == steps["data_time"] == [1, 2, 3, 4]


def test_no_report_mixes_warm_up_steps_and_solves_so_the_results_mean_is_per_solve(tmp_path):
    """The results weigh each report's interval means by the steps it covers: a report of 3
    unrolled steps and 1 solve gave that solve's forward_time the weight of 4 steps (110 steps
    of mnist_mdeq, 60 unrolled, a report every 25: the Training Time 5% high). The warm-up's
    last step reports, so the results' mean of each solve's and each unrolled step's metric is
    the mean of the steps' own values, TensorBoard's per-step scalars."""
    cfg = validate(
        {
            "name": "run",
            "storage_path": str(tmp_path),
            "model": {"pretrain_steps": 3},
            "train": {"epochs": 1, "max_steps": 8, "report_every": 4, "eval_batches": 1},
        }
    )
    session = RecordingSession(tmp_path / "run")
    loop.Loop(cfg, session).run()
    reported = [metrics for metrics, _ in session.reports]
    assert [metrics["step"] for metrics in reported] == [3, 4, 8]
    frame = pd.DataFrame(reported)
    events = EventAccumulator(str(Path(cfg.run_dir, reporting.TENSORBOARD_DIR)))
    events.Reload()
    for key in ("forward_time", "backward_time", "nfe", "pretrain_forward_time"):
        per_step = [event.value for event in events.Scalars(key)]
        assert len(per_step) == (3 if key.startswith("pretrain_") else 5)
        assert results._mean(frame, key) == pytest.approx(statistics.fmean(per_step), rel=1e-6)


def test_a_training_step_writes_its_scalars_to_tensorboard_as_one_event(tmp_path):
    """A step's 18 scalars went to TensorBoard as 18 events, each handed to the writer's thread
    through a queue, which cost a digits step 5 to 6 ms of its 55 on 2 cores; they are one event
    of the step now, with the values it reported."""
    cfg = make_config(tmp_path, max_steps=3, report_every=1, eval_batches=1)
    session = RecordingSession(tmp_path / "run")
    loop.Loop(cfg, session).run()
    (file,) = event_files(cfg)
    events = [event for event in EventFileLoader(str(file)).Load() if event.summary.value]
    assert [event.step for event in events] == [1, 2, 3, 3]  # the last: its test metrics
    expected = set(objective.STEP_METRICS) | {"lr", "skipped_steps", "overflow_steps"}
    for event, (reported, _) in zip(events, session.reports, strict=False):
        values = {v.tag: float(tensor_util.make_ndarray(v.tensor)) for v in event.summary.value}
        assert set(values) == expected
        assert values["train_loss"] == pytest.approx(reported["train_loss"], rel=1e-6)
        assert values["nfe"] == reported["nfe"] > 0
    assert {value.tag for value in events[3].summary.value} == set(objective.TEST_METRICS)


def test_every_tensorboard_scalar_says_what_it_measures_and_in_which_unit(tmp_path):
    """A tag such as forward_time says neither that it is seconds nor of what: each scalar a
    run writes, the warm-up's included, carries a description that TensorBoard's data provider
    gives beside its chart (the times in seconds, accuracies and shares as fractions), held
    once per tag in the file; a resumed run's file holds them again."""
    train = {"epochs": 1, "max_steps": 3, "report_every": 3, "eval_batches": 1}
    cfg = validate(
        {
            "name": "run",
            "storage_path": str(tmp_path),
            "model": {"pretrain_steps": 1},
            "train": train,
        }
    )
    loop.Loop(cfg, FolderSession(tmp_path / "run")).run()
    folder = Path(cfg.run_dir, reporting.TENSORBOARD_DIR)
    provider = tensorboard_data(folder)
    (series,) = provider.list_scalars(
        RequestContext(), experiment_id="", plugin_name="scalars"
    ).values()
    described = {tag: found.description for tag, found in series.items()}
    assert {"pretrain_forward_time", "forward_time", "lr", "test_nfe", "skipped_steps"} < set(
        described
    )
    assert [tag for tag, text in described.items() if not text] == []
    times = [tag for tag in described if tag.endswith("_time")]
    assert len(times) == 8 and all("seconds per" in described[tag] for tag in times)
    shares = [tag for tag in described if "accuracy" in tag or "fraction" in tag]
    assert len(shares) == 7 and all("fraction (0 to 1)" in described[tag] for tag in shares)
    assert described["pretrain_nfe"] == (
        f"unrolled warm-up steps (model.pretrain_steps): {described['nfe']}"
    )
    assert "per test batch of data.eval_batch_size" in described["predict_time"]
    (file,) = event_files(cfg)
    carried = [
        value.tag
        for event in EventFileLoader(str(file)).Load()
        for value in event.summary.value
        if value.metadata.summary_description
    ]
    assert sorted(carried) == sorted(described)  # once each, not at every step
    resumed = eventlog.EventLog(str(folder), purge_step=4)
    resumed.add_scalars({"lr": 0.5}, 4, reporting.description)
    resumed.add_scalars({"lr": 0.25}, 5, reporting.description)
    resumed.close()
    newest = max(event_files(cfg), key=lambda path: path.stat().st_mtime_ns)
    again = [
        value.metadata.summary_description
        for event in EventFileLoader(str(newest)).Load()
        for value in event.summary.value
    ]
    assert again == [described["lr"], ""]


def test_a_report_without_a_checkpoint_keeps_its_own_os_error(tmp_path):
    """An OSError from a report that carries no checkpoint is no checkpoint's failure: it is
    raised as it was, not said as a checkpoint of the step that could not be stored."""
    failed = OSError(errno.EIO, "Input/output error")

    def report(metrics, checkpoint):
        raise failed

    session = FolderSession(tmp_path / "run")
    session.report = report
    run = loop.Loop(make_config(tmp_path, max_steps=2), session)
    run.state.step = 1
    with pytest.raises(OSError) as stopped:
        run.report({}, checkpoint=False)
    assert stopped.value is failed and run.checkpointed == 0


def full_disk_under_tensorboard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every record TensorBoard's writer thread writes fail as on a full disk."""

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)


def test_a_tensorboard_write_that_fails_is_a_storage_error_naming_the_folder(tmp_path, monkeypatch):
    """A full disk under TensorBoard's events: its writer thread's OSError came back at the
    next write, flush or close as '[Errno 28] No space left on device', naming no file, in a
    worker's traceback; each is a StorageError naming the folder and the cause. The thread
    printed its own traceback of the OSError besides, which it now leaves to that error."""
    unhandled = []
    monkeypatch.setattr(threading, "excepthook", unhandled.append)
    folder = tmp_path / "tensorboard"
    events = eventlog.EventLog(str(folder))
    full_disk_under_tensorboard(monkeypatch)
    events.add_scalars({"train_loss": 1.0}, 1)
    said = f"TensorBoard's events could not be written to {folder}: [Errno 28] No space left"
    for call in (events.flush, lambda: events.add_scalars({"train_loss": 0.5}, 2), events.close):
        with pytest.raises(storage.StorageError, match=f"^{re.escape(said)} on device$"):
            call()
    thread = events.writer.file_writer.event_writer._async_writer._worker
    thread.join()
    assert isinstance(thread.exception, OSError) and unhandled == []
    assert threading.excepthook == unhandled.append  # the process's hook, back after close
    other = threading.Thread(target=operator.truediv, args=(1, 0))
    other.start()
    other.join()  # another thread's error is passed on as before
    assert [type(args.exc_value) for args in unhandled] == [ZeroDivisionError]


def test_another_threads_error_goes_to_the_processs_hook_while_tensorboard_is_open(
    tmp_path, monkeypatch
):
    """While TensorBoard's events are open, only its writer thread's traceback is left out: an
    error of any other thread reaches the hook the process had (a user's, a test runner's), not
    Python's default hook."""
    unhandled = []
    monkeypatch.setattr(threading, "excepthook", unhandled.append)
    events = eventlog.EventLog(str(tmp_path / "tensorboard"))
    other = threading.Thread(target=operator.truediv, args=(1, 0))
    other.start()
    other.join()
    events.close()
    assert [type(args.exc_value) for args in unhandled] == [ZeroDivisionError]


def test_tensorboard_events_that_cannot_be_opened_are_a_storage_error_naming_the_folder(
    tmp_path, monkeypatch
):
    """A full disk as TensorBoard's events file is created: its OSError names no folder; it is
    a StorageError naming the folder and the cause, as a failed write is, and the process's
    threading.excepthook is left as it was."""

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(eventlog, "_writer", full)
    hook = threading.excepthook
    folder = tmp_path / "tensorboard"
    with pytest.raises(storage.StorageError) as stopped:
        eventlog.EventLog(str(folder))
    assert str(stopped.value) == (
        f"TensorBoard's events could not be written to {folder}: [Errno 28] No space left on device"
    )
    assert threading.excepthook is hook  # no log to close puts it back: it was never changed


def test_tensorboard_events_whose_first_event_fails_print_no_traceback_of_the_writer(
    tmp_path, monkeypatch
):
    """A full disk under a resumed run's new events file (a Ray Train restart on a full
    storage): TensorBoard's writer writes a first event as it opens, and its thread printed
    the OSError's traceback beside the StorageError naming the folder; it now says nothing,
    and the process's threading.excepthook is left as it was."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    unhandled = []
    monkeypatch.setattr(threading, "excepthook", unhandled.append)
    full_disk_under_tensorboard(monkeypatch)
    folder = tmp_path / "tensorboard"
    running = set(threading.enumerate())  # other tests' open writers, which run on
    with pytest.raises(storage.StorageError) as stopped:
        eventlog.EventLog(str(folder))
    assert str(stopped.value) == (
        f"TensorBoard's events could not be written to {folder}: [Errno 28] No space left on device"
    )
    # The failed writer's thread has ended, its error said to the hook set at open.
    assert not [
        t for t in threading.enumerate() if isinstance(t, _AsyncWriterThread) and t not in running
    ]
    assert unhandled == [] and threading.excepthook == unhandled.append


def test_a_uris_next_tensorboard_events_file_that_cannot_be_opened_is_a_storage_error(
    tmp_path, monkeypatch
):
    """A URI's flush uploads the closed events file and opens the next one locally: a full
    disk at that open is a StorageError naming the local folder and the cause, as at the
    first open, after the events so far went up."""

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    folder = tmp_path / "tensorboard"
    events = eventlog.EventLog(folder.as_uri())
    events.add_scalars({"train_loss": 1.0}, 1)
    monkeypatch.setattr(eventlog, "_writer", full)
    with pytest.raises(storage.StorageError) as stopped:
        events.flush()
    assert str(stopped.value) == (
        f"TensorBoard's events could not be written to {events.local}: [Errno 28] No space left "
        "on device"
    )
    uploaded = EventAccumulator(str(folder)).Reload().Scalars("train_loss")
    assert [(event.step, event.value) for event in uploaded] == [(1, 1.0)]
    shutil.rmtree(events.local)


def test_a_run_stopped_by_a_tensorboard_write_says_so_once(tmp_path, monkeypatch, caplog):
    """The run that a failed TensorBoard write stops ends with that StorageError, which its
    close of TensorBoard, raising it again, does not repeat as events not kept."""
    cfg = make_config(tmp_path, max_steps=2, eval_batches=1)
    run = loop.Loop(cfg, FolderSession(tmp_path / "run"))
    full_disk_under_tensorboard(monkeypatch)
    with pytest.raises(storage.StorageError, match="^TensorBoard's events could not be written"):
        run.run()
    assert [r.getMessage() for r in caplog.records if "were not kept" in r.getMessage()] == []


def test_a_neural_odes_unconverged_fraction_says_beside_its_chart_why_it_is_1(tmp_path):
    """A Neural ODE's z(t1) is no steady state, so its training unconverged_fraction is 1 at
    every step; its description said only 'whose forward solve missed the tolerance', which
    read as a Neural ODE that never converged beside the DEQs' curves near 0."""
    cfg = validate(
        {
            "name": "run",
            "storage_path": str(tmp_path),
            "model": {"variant": "neural_ode", "adjoint": "continuous"},
            "train": {"epochs": 1, "max_steps": 1, "report_every": 1, "eval_batches": 1},
        }
    )
    loop.Loop(cfg, FolderSession(tmp_path / "run")).run()
    folder = Path(cfg.run_dir, reporting.TENSORBOARD_DIR)
    provider = tensorboard_data(folder)
    context = RequestContext()
    (series,) = provider.list_scalars(context, experiment_id="", plugin_name="scalars").values()
    ((points,),) = (
        by_tag.values()
        for by_tag in provider.read_scalars(
            context,
            experiment_id="",
            plugin_name="scalars",
            downsample=10,
            run_tag_filter=RunTagFilter(tags=["unconverged_fraction"]),
        ).values()
    )
    assert [(point.step, point.value) for point in points] == [(1, 1.0)]
    assert "a Neural ODE's is near 1" in series["unconverged_fraction"].description


def record_threads_and_train(config: dict) -> None:
    """Save this worker's OMP_NUM_THREADS and torch's thread count next to the run folder,
    then train."""
    threads = {"omp": os.environ.get("OMP_NUM_THREADS"), "torch": torch.get_num_threads()}
    Path(config["storage_path"], "threads.json").write_text(json.dumps(threads))
    launch.train_loop(config)


def test_a_changed_reporting_setting_resumes_the_run_instead_of_starting_anew(
    ray_cluster, tmp_path
):
    """The first run's worker holds 1.995 CPU (a Tune trial's of 2, less its share of the
    trial's driver), with which it ran 1 thread, as Ray counts whole CPUs; given 2 threads,
    torch runs 2 in it."""
    base = {"storage_path": str(tmp_path), "scaling": {"num_workers": 1}}
    first = validate(base | {"train": {"epochs": 1, "max_steps": 4, "report_every": 2}})
    scaling = ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1.995})
    result = launch.fit(first, scaling, train_fn=record_threads_and_train, threads=2)
    assert result.error is None and result.metrics["step"] == 4
    threads = json.loads((tmp_path / "threads.json").read_text())
    assert threads == {"omp": "2", "torch": 2}
    again = {"epochs": 1, "max_steps": 4, "report_every": 50, "checkpoint_every": 3}
    again |= {"eval_batches": 1, "keep_checkpoints": 5}
    second = validate(base | {"train": again, "data": {"loader_workers": 1, "pin_memory": True}})
    assert second.run_dir == first.run_dir
    result = launch.fit(second)
    assert result.metrics["step"] == 4  # resumed at its end, not trained again from step 0
    history = steps_by_tag(Path(first.run_dir, reporting.TENSORBOARD_DIR))
    assert history["train_loss"] == [1, 2, 3, 4]


def test_fp16_overflow_steps_are_the_scalers_not_non_finite_steps(tmp_path, monkeypatch):
    huge = functools.partial(torch.amp.GradScaler, init_scale=2.0**127)
    monkeypatch.setattr(torch.amp, "GradScaler", huge)
    cfg = make_config(tmp_path, max_steps=4, amp="fp16", max_nonfinite_steps=1)
    metrics = launch.fit(cfg, LOCAL).metrics
    assert metrics["step"] == 4 and metrics["skipped_steps"] == 0
    assert metrics["overflow_steps"] >= 1 and math.isfinite(metrics["train_loss"])


@pytest.mark.parametrize("variant", ["skip_reg", "neural_ode"])
def test_bf16_autocast_trains_the_deq_and_the_neural_ode(tmp_path, variant, caplog):
    """train.amp=bf16: the solves keep float32 states (bfloat16 has no triangular solve for
    GMRES) and the Neural ODE's adjoint runs f under the forward's autocast. A Neural ODE's
    z(t1) is no steady state (its training share above the tolerance is 1 here, its test
    solves' failed share 0): its progress line leaves the training share out."""
    train = {"epochs": 1, "max_steps": 2, "report_every": 2, "amp": "bf16", "eval_batches": 1}
    cfg = validate({"storage_path": str(tmp_path), "model": {"variant": variant}, "train": train})
    with caplog.at_level(logging.INFO, logger="raydeq"):
        metrics = launch.fit(cfg, LOCAL).metrics
    assert metrics["step"] == 2 and metrics["skipped_steps"] == 0
    assert math.isfinite(metrics["train_loss"]) and metrics["backward_nvjp"] > 0
    if variant == "neural_ode":
        assert metrics["unconverged_fraction"] == 1 and metrics["test_unconverged_fraction"] == 0
        (line,) = [m for m in caplog.messages if "step 2/2" in m]
        assert " unconverged" not in line


def test_model_compile_runs_the_layers_solves_compiled_and_trains_as_eager(tmp_path, monkeypatch):
    """model.compile=true reaches solve(compile=True) (run here with dynamo's eager backend, no
    C++ toolchain needed) and resumes the run of the same settings: it is outside the run's name."""
    solve_module = sys.modules["raydeq.solvers.solve"]  # raydeq.solvers.solve is also a function
    seen = []

    def eager_backend(compile: bool | dict | str, device: torch.device) -> dict | None:
        seen.append(compile)
        return {"backend": "eager"} if compile else None

    monkeypatch.setattr(solve_module, "compile_options", eager_backend)
    train = {"epochs": 1, "max_steps": 2, "report_every": 2, "eval_batches": 1}
    runs = {}
    for compiled in (False, True):
        raw = {"storage_path": str(tmp_path / str(compiled)), "train": train}
        cfg = validate(raw | {"model": {"compile": compiled}})
        runs[compiled] = launch.fit(cfg, LOCAL).metrics
    assert set(seen) == {False, True}
    assert runs[True]["nfe"] == runs[False]["nfe"]
    assert runs[True]["train_loss"] == pytest.approx(runs[False]["train_loss"], rel=1e-5)
    assert validate({"model": {"compile": True}}).name == validate({}).name


def test_each_report_before_the_last_says_the_time_left_at_the_runs_pace(tmp_path, monkeypatch):
    shown: list[dict] = []
    monkeypatch.setattr(
        reporting.Reporter, "progress", lambda self, m, neural_ode: shown.append(dict(m))
    )
    launch.fit(make_config(tmp_path, max_steps=8), LOCAL)
    assert [m["step"] for m in shown] == [2, 4, 6, 8]
    assert all(m["time_left_s"] > 0 for m in shown[:-1]) and shown[-1]["time_left_s"] == 0
    assert " eta " in reporting.progress_line("t", shown[0])
    assert " eta" not in reporting.progress_line("t", shown[-1])
    line = reporting.progress_line("t", shown[0] | {"time_left_s": 3725.4})
    assert line.endswith(" eta 1h02m")
    assert reporting.duration(249.2) == "4m09s" and reporting.duration(12.4) == "12s"
    figures = [reporting.figure(v) for v in (0.97213, 33.5, 9999.4, 10530.2, 2.5e-5, float("nan"))]
    assert figures == ["0.9721", "33.5", "9999", "10530", "2.5e-05", "nan"]


def test_a_run_in_this_process_leaves_its_loggers_as_it_found_them(tmp_path):
    """num_workers=0 runs train_loop in the caller's process, whose logging it set up for a
    worker for good: raydeq's logger at INFO, so that a later run's lines reached the log of a
    caller that had not asked for them, the root logger at WARNING, and one more filter each run."""
    loggers = [logging.getLogger(name) for name in launch.WORKER_LOGGERS]
    with launch.loggers_kept(launch.WORKER_LOGGERS):
        loggers[0].setLevel(logging.INFO)  # as `raydeq.train` sets it up
        before = [(logger.level, list(logger.filters)) for logger in loggers]
        launch.fit(make_config(tmp_path, max_steps=2), LOCAL)
        assert [(logger.level, list(logger.filters)) for logger in loggers] == before


def test_raydeqs_own_errors_are_one_line_and_other_tracebacks_stay():
    """A run that diverged printed Ray Train's traceback per worker and per restart, and again
    in the final error (65 lines); raydeq's errors explain themselves in their message."""
    traceback = (
        "Traceback (most recent call last):\n  File loop.py, line 154, in record\n"
        "raydeq.training.loop.NonFiniteError: training stopped at step 4: 3 steps in a row\n"
    )
    assert (
        launch.own_error(traceback)
        == "NonFiniteError: training stopped at step 4: 3 steps in a row"
    )
    bug = "Traceback (most recent call last):\n  File x\nKeyError: 'raydeq.training'\n"
    assert launch.own_error(bug) is None
    logger = logging.getLogger(launch.TRAIN_FN_LOGGER)
    with launch.loggers_kept(launch.WORKER_LOGGERS):
        launch.show_warnings_and_progress()
        assert not logger.filter(
            logging.makeLogRecord({"msg": f"Error in training function:\n{traceback}"})
        )
        assert logger.filter(logging.makeLogRecord({"msg": f"Error in training function:\n{bug}"}))


def worker_failed(err: Exception, running: bool = False) -> WorkerStatus:
    """A worker's status as Ray Train polls it after its training function raised `err`."""
    try:
        raise err
    except Exception:
        return WorkerStatus(running, UserExceptionWithTraceback(err, traceback.format_exc()))


def test_an_error_that_a_restart_meets_again_ends_the_run_without_restarts(tmp_path):
    """A worker's error that recurs (no readable checkpoint, a config refused, a divergence on
    record) took each of scaling.max_failures restarts, a Ray Train start each, to print again;
    it now ends the run at once, as a controller error that Ray Train's failure policy does not
    retry, naming raydeq's error in one line. A lost worker, a storage error (an interrupted
    copy) or a bug is restarted as before."""
    folder = tmp_path / "checkpoint_1"
    checkpoint.write_checkpoint({"step": 1, "model": {"w": torch.zeros(2)}}, folder)
    state = (folder / STATE_FILE).read_bytes()
    (folder / STATE_FILE).write_bytes(bytes(len(state)))  # whole in size, failing its checksum
    with pytest.raises(checkpoint.CheckpointError) as unreadable:
        checkpoint.restore([contextlib.nullcontext(str(folder))])
    with pytest.raises(config.ConfigError) as refused:
        validate({"optim": {"lr": -1.0}})
    recurring = [unreadable.value, refused.value, loop.NonFiniteError("training stopped at step 4")]
    transient = [
        ray.exceptions.ActorDiedError(),
        storage.StorageError("the checkpoint of step 4 could not be stored in s3://b/run: reset"),
        RuntimeError("a bug"),
    ]
    trainer = launch.trainer(make_config(tmp_path), LOCAL)
    stop = next(c for c in trainer.run_config.callbacks if isinstance(c, launch.NoRestart))
    policy = DefaultFailurePolicy(FailureConfig(max_failures=3))
    for err in recurring:
        status = WorkerGroupPollStatus({0: worker_failed(err), 1: WorkerStatus(running=True)})
        with pytest.raises(ray.train.ControllerError) as ended:
            stop.after_worker_group_poll_status(status)
        assert policy.make_decision(ended.value) == FailureDecision.RAISE
        assert launch.own_error(str(ended.value)) == f"{type(err).__name__}: {err}"
    # One worker's recurring error ends the run whatever another worker's error is.
    mixed = {0: worker_failed(transient[0]), 1: worker_failed(recurring[0])}
    with pytest.raises(ray.train.ControllerError):
        stop.after_worker_group_poll_status(WorkerGroupPollStatus(mixed))
    for err in transient:
        status = WorkerGroupPollStatus({0: worker_failed(err), 1: worker_failed(err)})
        stop.after_worker_group_poll_status(status)
        assert policy.make_decision(status.get_worker_group_error()) == FailureDecision.RETRY


def test_a_data_folder_as_a_restart_finds_it_again_ends_the_run_without_restarts(
    tmp_path, monkeypatch
):
    """A worker's DataError for a data folder missing or a file that does not read took each of
    scaling.max_failures restarts, a Ray Train start each, to print again: a restart finds the
    folder as it was. It now ends the run at once; a download that failed and a read that the
    system failed (an OSError: a network folder's) may pass, and are restarted as before."""

    def data_error(cause: Exception | None, **options: Any) -> data.DataError:
        def reader(cfg: data.DataSection) -> data.Splits:
            raise cause

        # torchvision's readers, without the seconds of its import
        vision = SimpleNamespace(BUILDERS={"mnist": reader})
        monkeypatch.setitem(sys.modules, "raydeq.training.vision", vision)
        with pytest.raises(data.DataError) as raised:
            data.load_splits(validate({"data": {"dataset": "mnist", **options}}).data)
        return raised.value

    missing = data_error(None, data_dir=str(tmp_path / "absent"))
    assert str(missing).startswith(f"dataset 'mnist' not found in {tmp_path / 'absent'}")
    monkeypatch.setattr(data, "check_files", lambda cfg: None)  # the files as the check saw them
    malformed = data_error(AssertionError(), data_dir=str(tmp_path))
    failed_read = data_error(OSError(errno.EIO, os.strerror(errno.EIO)), data_dir=str(tmp_path))
    download = data_error(TimeoutError("timed out"), data_dir=str(tmp_path), download=True)
    assert str(download).startswith(f"dataset 'mnist' could not be downloaded to {tmp_path}")
    stop, policy = launch.NoRestart(), DefaultFailurePolicy(FailureConfig(max_failures=3))
    for err in (missing, malformed):
        status = WorkerGroupPollStatus({0: worker_failed(err), 1: WorkerStatus(running=True)})
        with pytest.raises(ray.train.ControllerError) as ended:
            stop.after_worker_group_poll_status(status)
        assert launch.own_error(str(ended.value)) == f"DataError: {err}"
    for err in (failed_read, download):
        status = WorkerGroupPollStatus({0: worker_failed(err)})
        stop.after_worker_group_poll_status(status)
        assert policy.make_decision(status.get_worker_group_error()) == FailureDecision.RETRY
    # As a worker's error reaches Ray Train's controller: pickled, its mark kept.
    assert not pickle.loads(pickle.dumps(download)).recurs
    assert pickle.loads(pickle.dumps(missing)).recurs


def nan_splits(cfg: data.DataSection, load=data.load_splits) -> data.Splits:
    """Digits whose training images are all NaN."""
    splits = load(cfg)
    images, labels = splits.train.tensors
    poisoned = torch.utils.data.TensorDataset(torch.full_like(images, torch.nan), labels)
    return data.Splits(poisoned, splits.test, splits.shape, splits.num_classes)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run_when_they_persist(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(data, "load_splits", nan_splits)
    seen = {}

    def train_fn(config: dict) -> None:
        cfg = validate(config)
        run = loop.Loop(cfg, TrainWorker(cfg.run_dir))
        seen["before"] = copy.deepcopy(dict(run.state.model.named_parameters()))
        run.run()
        seen["after"] = dict(run.state.model.named_parameters())

    cfg = make_config(tmp_path, max_steps=4, max_nonfinite_steps=10)
    result = launch.fit(cfg, LOCAL, train_fn)
    assert result.metrics["skipped_steps"] == 4 and "train_loss" not in result.metrics
    assert reporting.progress_line("t", result.metrics).endswith(" skipped 4")
    for name, value in seen["before"].items():
        assert torch.equal(value, seen["after"][name]), name
    diverging = make_config(tmp_path / "b", max_steps=8, max_nonfinite_steps=3)
    with pytest.raises(loop.NonFiniteError, match="3 steps in a row had a non-finite loss"):
        launch.fit(diverging, LOCAL)
    # A restart from where it diverged (no checkpoint yet: step 0) replays the same steps: it
    # is refused before a step, and before TensorBoard gets a second file.
    marker = Path(diverging.run_dir, loop.DIVERGED_FILE)
    with pytest.raises(loop.NonFiniteError, match="from step 0, where it would resume, so it is"):
        launch.fit(diverging, LOCAL)
    assert len(event_files(diverging)) == 1
    marker.unlink()  # as the message says: delete it to try anyway
    with pytest.raises(loop.NonFiniteError, match="3 steps in a row had a non-finite loss"):
        launch.fit(diverging, LOCAL)


def test_a_run_at_a_uri_that_stops_with_an_error_uploads_its_events_and_removes_its_folder(
    tmp_path, monkeypatch
):
    """Events at a URI go to a local folder until a checkpoint or the end uploads them: a run
    stopped by an error (here non-finite steps) never uploaded the steps that led to it and
    left its local folder in the temporary folder; both are now done as at the end."""
    monkeypatch.setattr(data, "load_splits", nan_splits)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    cfg = make_config(tmp_path, max_steps=8, max_nonfinite_steps=3)
    cfg = dataclasses.replace(cfg, storage_path=f"file://{tmp_path / 'store'}")
    run = loop.Loop(cfg, FolderSession(tmp_path / "run"))
    with pytest.raises(loop.NonFiniteError, match="3 steps in a row"):
        run.run()
    assert not list((tmp_path / "tmp").glob("raydeq-events-*"))
    steps = steps_by_tag(tmp_path / "store" / "run" / reporting.TENSORBOARD_DIR)
    assert steps["skipped_steps"] == [1, 2, 3]


def test_a_batch_that_does_not_fit_in_memory_is_one_line_naming_the_setting(tmp_path, monkeypatch):
    torch_says = (
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB "
        "of which 1.06 GiB is free. Including non-PyTorch memory, this process has ..."
    )

    def no_memory(*args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError(torch_says)

    def train_fn(config: dict) -> None:
        run = loop.Loop(validate(config), TrainWorker(config["storage_path"] + "/run"))
        monkeypatch.setattr(run, "train_step", no_memory)
        run.run()

    cfg = make_config(tmp_path, max_steps=2)
    with pytest.raises(loop.OutOfMemory) as info:
        launch.fit(cfg, LOCAL, train_fn)
    assert str(info.value) == (
        "cpu out of memory at step 1 with data.batch_size=32 (32 per worker, model "
        "mnist_dense): lower data.batch_size, or set train.amp=bf16 (CUDA out of memory. "
        "Tried to allocate 2.00 GiB)"
    )
    assert launch.own_error(f"Traceback ...\nraydeq.training.loop.OutOfMemory: {info.value}")
    monkeypatch.setattr(loop, "evaluate", no_memory)
    late = make_config(tmp_path / "b", max_steps=2, amp="bf16")
    with pytest.raises(loop.OutOfMemory) as info:
        launch.fit(late, LOCAL)
    assert str(info.value) == (
        "cpu out of memory evaluating with data.eval_batch_size=256 (256 per worker, model "
        "mnist_dense): lower data.eval_batch_size (CUDA out of memory. Tried to allocate 2.00 GiB)"
    )


# Ray end-to-end ----------------------------------------------------------------------------------


def kill_a_worker_after_the_first_checkpoint(
    dashboard: str, run_dir: Path, killed: list[int]
) -> None:
    """Wait for both workers and a checkpoint, then SIGKILL the worker that is not rank 0."""
    deadline = time.monotonic() + 180
    pids: list[int] = []
    while len(pids) < 2 and time.monotonic() < deadline:
        alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
        pids = [actor.pid for actor in list_actors(address=dashboard, filters=alive)]
        time.sleep(0.2)
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while not snapshot.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    writer = next((run_dir / reporting.TENSORBOARD_DIR).glob("events.out.tfevents.*")).name
    victim = next(pid for pid in pids if f".{pid}." not in writer)
    os.kill(victim, signal.SIGKILL)
    killed.append(victim)


def test_a_killed_worker_is_restarted_from_the_last_checkpoint_without_gaps(ray_cluster, tmp_path):
    cfg = make_config(tmp_path, epochs=3, max_steps=60, checkpoint_every=10, report_every=10)
    killed: list[int] = []
    killer = threading.Thread(
        target=kill_a_worker_after_the_first_checkpoint,
        args=(ray_cluster, Path(cfg.run_dir), killed),
    )
    killer.start()
    result = launch.fit(cfg)
    killer.join()
    assert len(killed) == 1
    assert result.error is None and result.metrics["step"] == 60
    assert len(event_files(cfg)) == 2
    history = steps_by_tag(Path(cfg.run_dir, reporting.TENSORBOARD_DIR))
    assert history["train_loss"] == list(range(1, 61))
    assert history["skipped_steps"] == list(range(1, 61))


def test_sigterm_ends_a_run_with_status_130_and_its_resume_command_continues_past_a_bad_checkpoint(
    ray_cluster, tmp_path
):
    """Ray Train's own Ctrl-C handler aborts the run: it ended with status 1 and no word, and
    without Ray Train's record of the checkpoints the next run began again at step 1. SIGTERM
    (a scheduler's preemption), sent here, stops it as Ctrl-C does: Ray's handler aborted it.
    The resume reads the checkpoints in the run's folder, and where the newest is damaged it
    continues from the one before; TensorBoard keeps one history of every metric."""
    path = tmp_path / "run.yaml"
    settings = {"name": "run", "storage_path": str(tmp_path / "runs")}
    settings |= {"train": {"epochs": 10, "max_steps": 120, "checkpoint_every": 10}}
    path.write_text(json.dumps(settings))  # YAML reads JSON
    cfg = validate(settings)
    command = [sys.executable, "-m", "raydeq.train", str(path)]
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)

    def checkpoints() -> dict[int, Path]:
        """Step -> folder of each checkpoint whose manifest Ray has finished copying."""
        steps = {}
        for manifest in Path(cfg.run_dir).glob(f"checkpoint_*/{MANIFEST_FILE}"):
            with contextlib.suppress(json.JSONDecodeError):
                steps[json.loads(manifest.read_text())["step"]] = manifest.parent
        return steps

    deadline = time.monotonic() + 150
    while max(checkpoints(), default=0) < 20:
        assert driver.poll() is None and time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.1)
    driver.send_signal(signal.SIGTERM)
    err = driver.communicate(timeout=120)[1]
    assert driver.returncode == 130, err[-2000:]
    assert err.splitlines()[-1] == (
        f"interrupted; resume with: python -m raydeq.train {path} name=run "
        f"storage_path={tmp_path / 'runs'}"
    )
    written = sorted(checkpoints())
    *_, before, newest = written
    assert newest < 120
    folder = checkpoints()[newest]
    assert sorted(os.listdir(folder)) == [MANIFEST_FILE, REPORTS_FILE, STATE_FILE]
    state = folder / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=200)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.splitlines()[-1].startswith("test_accuracy=")
    assert "[run] training 120 steps on 2 workers" in err
    assert f"[run] resumed at step {before} of 120 on 2 workers" in resumed.stderr
    # Output to a pipe or a log file carries no terminal colour codes (Ray's worker prefix).
    assert "\x1b[" not in err + resumed.stderr
    first, second = event_files(cfg)
    assert steps_by_tag(second)["train_loss"][0] == before + 1, written
    history = steps_by_tag(Path(cfg.run_dir, reporting.TENSORBOARD_DIR))
    assert set(METRICS) <= set(history)
    assert history["train_loss"] == list(range(1, 121))
    # The checkpoints the interrupted driver wrote after its last record of them are gone too:
    # Ray Train kept train.keep_checkpoints of the ones it knew, and would never prune those.
    assert sorted(checkpoints()) == [100, 110, 120]


def test_a_finished_run_keeps_only_the_checkpoints_that_ray_train_kept(tmp_path):
    names = [f"checkpoint_2026-12-03_10-00-0{i}.000000" for i in range(5)]
    for name in [*names, "tensorboard"]:
        (tmp_path / name).mkdir()
    (tmp_path / names[0] / "state.pt").write_bytes(b"")
    kept = [(Checkpoint(str(tmp_path / name)), {}) for name in names[3:]]
    result = SimpleNamespace(best_checkpoints=kept)
    dropped = launch.drop_unrecorded_checkpoints(result, str(tmp_path))
    assert dropped == names[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [*names[3:], "tensorboard"]
    # A run that kept no checkpoint (none reported) deletes nothing.
    assert (
        launch.drop_unrecorded_checkpoints(SimpleNamespace(best_checkpoints=None), str(tmp_path))
        == []
    )
    assert len(list(tmp_path.iterdir())) == 3


def train_and_save_parameters(config: dict) -> None:
    """Train, then save this worker's parameters and node id next to the run folder."""
    cfg = validate(config)
    run = loop.Loop(cfg, TrainWorker(cfg.run_dir))
    run.run()
    rank = ray.train.get_context().get_world_rank()
    record = {
        "node": ray.get_runtime_context().get_node_id(),
        "params": run.state.model.state_dict(),
    }
    torch.save(record, Path(config["storage_path"], f"worker-{rank}.pt"))


@pytest.fixture(scope="module")
def joined(ray_cluster: str) -> Iterator[subprocess.Popen[str]]:
    """A driver that RAY_ADDRESS sends to the session's Ray, started before own_ray's and
    running beside it (each a Python's start and a Ray's, seconds apiece): connect joins that
    Ray, and its driver and a task list the actors through the state API; it prints the
    task's RAY_TRAIN_ENABLE_PREEMPTION_WATCHER and its GCS address."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *LOCAL_ENV_VARS)}
    # Its processes, the driver too, also find its state API, which Ray Train's placement-group
    # cleaner and the ASHA check use.
    script = (
        "import ray; from ray.util.state import list_actors; from raydeq.training import launch\n"
        "launch.connect()\n"
        "list_actors()\n"
        "ray.get(ray.remote(lambda: list_actors()).remote())\n"
        "import os; name = 'RAY_TRAIN_ENABLE_PREEMPTION_WATCHER'\n"
        "print(ray.get(ray.remote(lambda: os.environ.get(name)).remote()))\n"
        "print(ray.get_runtime_context().gcs_address)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield process
    if process.returncode is None:  # no test read it
        process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def own_ray(ray_cluster: str) -> subprocess.CompletedProcess[str]:
    """A driver run where neither RAY_ADDRESS nor a `ray start` cluster names a Ray, so that
    connect starts one of its own, with the first port it finds free for that Ray's dashboard
    one that a socket listens on; its driver and a task then list the actors through the state
    API, and it prints the task's RAY_TRAIN_ENABLE_PREEMPTION_WATCHER, its GCS address, the
    taken port and the state API's address. One driver (two Ray starts, ten seconds and more)
    for the tests of both."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *LOCAL_ENV_VARS)}
    # This session's ray.init set RAY_AUTH_MODE for its own cluster.
    env.pop("RAY_AUTH_MODE", None)
    script = (
        "import os, socket, ray; from ray.util.state import list_actors\n"
        "from raydeq.training import launch\n"
        "taken = socket.create_server(('127.0.0.1', 0))\n"
        "port = taken.getsockname()[1]; ports = [port]\n"
        "found = launch.free_port\n"
        "launch.free_port = lambda: ports.pop() if ports else found()\n"
        "launch.connect()\n"
        "taken.close()\n"
        "list_actors()\n"
        "ray.get(ray.remote(lambda: list_actors()).remote())\n"
        "name = 'RAY_TRAIN_ENABLE_PREEMPTION_WATCHER'\n"
        "print(ray.get(ray.remote(lambda: os.environ.get(name)).remote()))\n"
        "print(ray.get_runtime_context().gcs_address)\n"
        "print(port, os.environ[launch.API_SERVER])\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180
    )


def test_a_second_run_beside_another_starts_its_own_ray_instead_of_joining_it(
    ray_cluster, joined, own_ray
):
    """A local Ray started by another driver (here the test session's) ends with that driver:
    joining it, a second run lost its trials when the first finished. Without RAY_ADDRESS
    and without a `ray start` cluster, connect starts a Ray of its own, whose workers run
    without Ray Train's preemption watcher (no spot node to lose); on a cluster it stays."""
    assert own_ray.returncode == 0, own_ray.stderr[-2000:]
    own = ray.get_runtime_context().gcs_address
    assert own_ray.stdout.strip().splitlines()[-3] == "0"
    assert "Token authentication" not in own_ray.stderr  # on, as Ray's default, and unannounced
    assert own_ray.stdout.strip().splitlines()[-2] != own
    out, err = joined.communicate(timeout=120)
    assert out.strip().splitlines()[-1] == own, err[-2000:]
    assert out.strip().splitlines()[-2] == "None"


def test_a_ray_of_the_runs_own_whose_dashboard_port_was_taken_starts_again_on_another(own_ray):
    """The port connect finds free for its Ray's dashboard may be taken before the dashboard
    binds it (another process found the same one): Ray started without a dashboard, and the
    state API the run's processes were told of refused them (list_actors: ServerUnavailable).
    Here the first port handed out is one a socket listens on; connect starts Ray again."""
    assert own_ray.returncode == 0, own_ray.stderr[-2000:]
    taken, api_server = own_ray.stdout.split()[-2:]
    assert f"127.0.0.1:{taken} because it's already occupied" in own_ray.stderr
    assert api_server != f"http://127.0.0.1:{taken}"


@pytest.mark.multinode
def test_ddp_keeps_the_workers_on_two_nodes_identical(tmp_path):
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        # With the job's environment, as connect joins a cluster: without it Ray Train's
        # controller polls the workers every 2 s, and the run waited seconds for its reports.
        ray.init(address=cluster.address, runtime_env=launch.runtime_env())
        cfg = make_config(tmp_path, max_steps=6)
        result = launch.fit(cfg, train_fn=train_and_save_parameters)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert result.error is None and result.metrics["step"] == 6
    workers = [torch.load(tmp_path / f"worker-{r}.pt", weights_only=True) for r in (0, 1)]
    assert workers[0]["node"] != workers[1]["node"]
    initial = models.build(cfg.model_options()).state_dict()
    for name, value in workers[0]["params"].items():
        assert torch.equal(value, workers[1]["params"][name]), name
    assert any(not torch.equal(v, initial[k]) for k, v in workers[0]["params"].items())


def test_sigterm_in_the_preflight_exits_130_in_one_line_as_ctrl_c_does(
    tmp_path, capsys, monkeypatch
):
    """A batch scheduler's SIGTERM before Ray starts (the preflight may list a large data
    folder) ends the run as Ctrl-C does, in one line and status 130, where its default killed
    it without a word."""

    def terminated(cfg, preset_lambda_skip):
        os.kill(os.getpid(), signal.SIGTERM)

    def killed(signum: int, frame: object) -> None:
        pytest.fail("SIGTERM killed the run")

    path = tmp_path / "run.yaml"
    path.write_text(f"scaling: {{device: cpu}}\nstorage_path: {tmp_path / 'runs'}\n")
    monkeypatch.setattr(train, "check_run", terminated)
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        assert train.main([str(path)]) == 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err == "\ninterrupted before training started\n"
    assert runlock.holder(config.load(str(path)).run_dir) is None


def test_the_commands_load_no_tensorboard_until_a_run_writes_events(loaded):
    """`python -m raydeq.train --help` and `python -m raydeq.tune X --dry-run` pay for no import
    of TensorBoard: its writer is imported where a run's events or a report's hparams are
    written."""
    heavy = ["tensorboard", "torch.utils.tensorboard"]
    assert loaded("import raydeq.train, raydeq.tune, raydeq.experiments.run", heavy) == []


def test_the_train_command_loads_no_ray_before_its_arguments_are_read(loaded):
    """`python -m raydeq.train --help` pays for no import of Ray Train (over a second), Tune or
    optuna: the command imports them once its arguments are read."""
    assert loaded("import raydeq.train", ["ray", "ray.train", "ray.tune", "optuna"]) == []


def test_the_command_called_from_python_leaves_the_callers_process_as_it_found_it(
    tmp_path, state_kept, capsys
):
    """train.main called from a script with a bad config puts back the script's SIGTERM
    handler, where it left SIGTERM raising KeyboardInterrupt in the script for good."""
    path = tmp_path / "run.yaml"
    path.write_text(f"storage_path: {tmp_path / 'runs'}\nbogus: 1\n")
    with state_kept():
        assert train.main([str(path)]) == 2
    with state_kept():
        assert train.main([str(tmp_path / "absent.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_connect_called_from_python_leaves_the_callers_signal_handlers(monkeypatch):
    """launch.connect called from a script set SIGTERM to stop the driver as Ctrl-C does and
    left it so once it returned, as ray.init leaves its own; the script's handlers are now back
    on return, and the commands alone, while they run, stop on SIGTERM as on Ctrl-C."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv(launch.COLOR_PREFIX, "0")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    own = signal.getsignal(signal.SIGTERM)
    try:
        # ray.init sets a SIGTERM handler of its own in the driver.
        monkeypatch.setattr(ray, "init", lambda **kwargs: signal.signal(signal.SIGTERM, print))
        assert launch.connect() is False
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, own)


def test_sigterm_in_a_command_stops_it_as_ctrl_c_does_through_the_sigint_handler_set_inside():
    """SIGTERM while a command runs goes to the SIGINT handler of the moment: Ray Train's or
    Tune's while they fit (which stop the run and save what it has), else KeyboardInterrupt."""
    stops = []
    with interruptible():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        signal.signal(signal.SIGINT, lambda signum, frame: stops.append(signum))
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        except KeyboardInterrupt:
            pytest.fail("SIGTERM raised KeyboardInterrupt past the SIGINT handler")
    assert stops == [signal.SIGINT]


def test_the_command_called_from_python_leaves_the_callers_logging_as_it_found_it(
    tmp_path, monkeypatch, capsys
):
    """train.main called from a script that configured no logging called logging.basicConfig,
    leaving the script's root logger at INFO with a handler of the command's for good; it now
    shows the run's messages while it runs alone."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # pytest's own aside, as in a plain script
    level = root.level
    path = tmp_path / "run.yaml"
    path.write_text(f"scaling: {{device: cpu}}\nstorage_path: {tmp_path / 'runs'}\n")

    def fit(*args, **kwargs):
        logging.getLogger("raydeq.training").info("a message of the run")
        return SimpleNamespace(metrics={"test_accuracy": 0.5, "step": 2})

    monkeypatch.setattr(launch, "check_cluster", lambda: None)
    monkeypatch.setattr(launch, "connect", lambda: False)
    monkeypatch.setattr(launch, "waiting_note", lambda *args: None)
    monkeypatch.setattr(launch, "fit", fit)
    assert train.main([str(path)]) == 0
    assert (root.handlers, root.level) == ([], level)
    assert "a message of the run\n" in capsys.readouterr().err


def test_load_model_gives_its_weights_step_and_warns_where_no_evaluation_measured_them(
    tmp_path, caplog
):
    """A run stopped after a periodic checkpoint written past its last test evaluation gave
    that checkpoint's weights without a word: their step was nowhere on the model, and the
    test accuracy the run last reported was another step's. The model carries its step, and
    loading weights that no evaluation measured warns, naming the step and the run's last;
    here the run stopped in its first epoch, before any evaluation, and the warning says so."""
    cfg = make_config(tmp_path, max_steps=3, checkpoint_every=2, eval_batches=1)
    loop.Loop(cfg, FolderSession(tmp_path / "run")).run()
    with caplog.at_level(logging.WARNING):
        assert load_model(tmp_path / "run").checkpoint_step == 3
    assert caplog.records == []
    shutil.rmtree(tmp_path / "run" / "checkpoint_000003")  # stopped before its last step
    with caplog.at_level(logging.WARNING):
        assert load_model(tmp_path / "run").checkpoint_step == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'run' / 'checkpoint_000002'}: the weights of step 2 of 3, a periodic "
        "checkpoint (train.checkpoint_every) before the run's first test evaluation, which it "
        "makes at each epoch's end and its last step; the run reported no test accuracy"
    ]


def test_load_model_of_a_periodic_checkpoint_after_an_evaluation_says_it_is_past_the_last(
    tmp_path, caplog
):
    """The warning for a periodic checkpoint's weights said they were past the run's last test
    evaluation also where the run had made none (a stop in its first epoch); past one, it says
    so. The 1,438 digits in batches of 718 are 2 steps an epoch: evaluations at steps 2 and 4, a
    periodic checkpoint at 3."""
    cfg = validate(
        {
            "name": "run",
            "storage_path": str(tmp_path),
            "data": {"batch_size": 718},
            "train": {"epochs": 2, "checkpoint_every": 3, "eval_batches": 1},
        }
    )
    loop.Loop(cfg, FolderSession(tmp_path / "run")).run()
    shutil.rmtree(tmp_path / "run" / "checkpoint_000004")  # stopped before its last step
    with caplog.at_level(logging.WARNING):
        assert load_model(tmp_path / "run").checkpoint_step == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'run' / 'checkpoint_000003'}: the weights of step 3 of 4, a periodic "
        "checkpoint (train.checkpoint_every) past the run's last test evaluation, which it "
        "makes at each epoch's end and its last step; no test accuracy the run reported "
        "measured them"
    ]


def test_a_checkpoint_records_its_evaluations_test_batches_which_reproduce_its_report(tmp_path):
    """A run's data.eval_batch_size and train.eval_batches were recorded nowhere (its
    checkpoints' settings give eval_batch_size at its default, 256, for the name's digest),
    though the test NFE it reports is per batch of that size and its accuracy over that many
    batches; each checkpoint records them under "evaluation", in its manifest as in its state,
    and evaluating the loaded model on those batches gives the reported numbers."""
    cfg = validate(
        {
            "name": "run",
            "storage_path": str(tmp_path),
            "data": {"eval_batch_size": 50},
            "train": {"epochs": 1, "max_steps": 3, "eval_batches": 2},
        }
    )
    loop.Loop(cfg, FolderSession(tmp_path / "run")).run()
    newest = tmp_path / "run" / "checkpoint_000003"
    manifest = json.loads((newest / MANIFEST_FILE).read_text())
    recorded = {"data": {"eval_batch_size": 50}, "train": {"eval_batches": 2}}
    assert manifest["evaluation"] == read_checkpoint(newest)["evaluation"] == recorded
    assert manifest["settings"]["data"]["eval_batch_size"] == 256
    reported = json.loads((newest / REPORTS_FILE).read_text().splitlines()[-1])
    splits = data.load_splits(cfg.data)
    test_data = itertools.islice(data.eval_loader(splits.test, cfg.data, 0, 1), 2)
    totals = objective.evaluate(load_model(newest), test_data, torch.device("cpu"))
    assert totals.samples == 100
    tested = objective.Evaluation(*totals.totals()).metrics()
    for key in ("test_accuracy", "test_nfe"):
        assert tested[key] == reported[key]


def test_load_model_of_a_run_that_diverged_after_its_newest_checkpoint_says_so(tmp_path, caplog):
    """A run that stopped diverged gave its newest checkpoint's weights without a word of the
    divergence its folder records (a real digits run at lr 1e30 loaded step 3's weights, of
    1e30, whose logits are NaN); loading them warns, naming the step and the recorded reason,
    and says nothing where the run trained on past the step it diverged from."""
    cfg = make_config(tmp_path, max_steps=10, checkpoint_every=2, max_nonfinite_steps=1)
    run = loop.Loop(cfg, FolderSession(tmp_path / "run"))
    for images, labels in itertools.islice(run.train_data, 2):
        run.record(run.train_step(images, labels, 0.0))
        run.end_step()
    with pytest.raises(loop.NonFiniteError):
        run.record(None)
    reason = json.loads((tmp_path / "run" / loop.DIVERGED_FILE).read_text())["reason"]
    assert reason.startswith("training stopped at step 3")
    with caplog.at_level(logging.WARNING):
        assert load_model(tmp_path / "run").checkpoint_step == 2
    assert caplog.records[0].getMessage() == (
        f"{tmp_path / 'run'}: the weights of step 2, the run's newest checkpoint before it "
        f"diverged; its diverged.json records: {reason}"
    )
    caplog.clear()
    record = {"from_step": 1, "workers": 1, "reason": reason, "limit": 1}
    (tmp_path / "run" / loop.DIVERGED_FILE).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        load_model(tmp_path / "run")
    assert not any("diverged" in r.getMessage() for r in caplog.records)


def test_a_folder_whose_runs_lie_deeper_is_refused_naming_them_not_as_holding_none(tmp_path):
    """An experiment of trials of two workers keeps each trial's checkpoints in its Train run
    (trial/train/checkpoint_*), and a storage folder its experiments' trials one level down:
    load_model refused either as holding no checkpoint (a real digits search of two such
    trials held four); it is refused naming the runs that hold them, the folders to name."""
    weights = models.build({"model": "mnist_dense"}).state_dict()
    state = {"step": 6, "model": weights, "settings": {"model": {"model": "mnist_dense"}}}
    for trial in ("t0_seed=0", "t1_seed=1"):
        for step in (4, 6):
            written = tmp_path / "exp" / trial / "train" / f"checkpoint_{step:06d}"
            checkpoint.write_checkpoint(state | {"step": step}, written)
    for folder, prefix in ((tmp_path / "exp", ""), (tmp_path, "exp/")):
        with pytest.raises(checkpoint.CheckpointError) as refused:
            load_model(folder)
        assert str(refused.value) == (
            f"{folder}: holds no checkpoint in it or in a folder in it, but folders deeper in it "
            f"hold the checkpoints of 2 runs ({prefix}t0_seed=0/train, {prefix}t1_seed=1/train); "
            "name the folder of one"
        )
    assert load_model(tmp_path / "exp" / "t1_seed=1").checkpoint_step == 6
    shutil.rmtree(tmp_path / "exp" / "t0_seed=0")
    with pytest.raises(checkpoint.CheckpointError, match=r"of 1 run \(t1_seed=1/train\); name"):
        load_model(tmp_path / "exp")


def test_load_model_reads_a_one_worker_trials_train_run_as_its_trial(tmp_path):
    """A results row names each trial's Train run (`<trial>/train`) as its run; a trial of one
    worker keeps only its TensorBoard there and its checkpoints in the trial folder, so
    load_model of the row's run said it held no checkpoint. It now reads the trial's."""
    weights = models.build({"model": "mnist_dense"}).state_dict()
    state = {"step": 6, "model": weights, "settings": {"model": {"model": "mnist_dense"}}}
    trial = tmp_path / "exp" / "t0_seed=0"
    for step in (4, 6):
        checkpoint.write_checkpoint(state | {"step": step}, trial / f"checkpoint_{step:06d}")
    (trial / "train").mkdir()
    (trial / "train" / "events.out.tfevents.1.host").write_bytes(b"")
    assert load_model(trial / "train").checkpoint_step == 6
    shutil.rmtree(trial / "checkpoint_000004")
    shutil.rmtree(trial / "checkpoint_000006")
    with pytest.raises(checkpoint.CheckpointError, match="train: holds no checkpoint"):
        load_model(trial / "train")


def test_a_file_named_like_a_checkpoint_deeper_in_a_folder_names_no_run(tmp_path):
    """A file named like a checkpoint two levels down (an archive of one left beside the
    runs) added its folder to the runs that load_model's refusal of an experiment's folder
    named (2 runs, one of them the archive's folder); only checkpoint folders name a run, and
    a folder holding such files alone holds no checkpoint."""
    weights = models.build({"model": "mnist_dense"}).state_dict()
    state = {"step": 4, "model": weights, "settings": {"model": {"model": "mnist_dense"}}}
    checkpoint.write_checkpoint(state, tmp_path / "exp" / "t0_seed=0" / "train" / "checkpoint_4")
    stray = tmp_path / "exp" / "old" / "copies" / "checkpoint_000004.tar.gz"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError) as refused:
        load_model(tmp_path / "exp")
    assert str(refused.value) == (
        f"{tmp_path / 'exp'}: holds no checkpoint in it or in a folder in it, but folders deeper "
        "in it hold the checkpoints of 1 run (t0_seed=0/train); name the folder of one"
    )
    shutil.rmtree(tmp_path / "exp" / "t0_seed=0")
    with pytest.raises(checkpoint.CheckpointError) as refused:
        load_model(tmp_path / "exp")
    assert str(refused.value) == (
        f"{tmp_path / 'exp'}: holds no checkpoint (no checkpoint_* folder in it or in a folder "
        "in it, and no manifest.json)"
    )
