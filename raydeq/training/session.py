"""Where the training loop runs: a Ray Train worker, or a Ray Tune trial's own process.

A run with K workers is a Ray Train run (DDP, worker restarts). A Tune trial with one worker
needs none of that: Ray Train would start a controller, a worker and four helper actors for it,
most of a small trial's cost, so the loop runs in the trial's process and reports to Tune.
The loop sees one interface either way: rank, world size, device, checkpoints, report.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any

import ray.train
import ray.train.torch
import ray.tune
import torch
from ray.train import Checkpoint
from torch import nn

from raydeq.training.checkpoint import newest_first
from raydeq.training.storage import CHECKPOINT_PREFIX, TRAIN_RUN, filesystem, subfolders


class Session(ABC):
    """The loop's view of the process it runs in; `folder` holds the run's checkpoints (a path
    or URI)."""

    rank: int
    world: int
    device: torch.device
    folder: str

    @abstractmethod
    def checkpoints(self) -> list[AbstractContextManager[str]]:
        """The run's checkpoints as local folders, newest first."""

    @abstractmethod
    def prepare_model(self, module: nn.Module) -> nn.Module:
        """The module on this process's device (wrapped for DDP across workers)."""

    @abstractmethod
    def report(self, metrics: dict[str, Any], checkpoint: Checkpoint | None) -> None:
        """Report the metrics, with the checkpoint when one is given."""


class TrainWorker(Session):
    """One worker of a Ray Train run, stored in `run_dir`."""

    def __init__(self, run_dir: str) -> None:
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.folder = run_dir

    def checkpoints(self) -> list[AbstractContextManager[str]]:
        """Every checkpoint in the run's folder, newest first.

        Read from storage rather than from Ray Train's state: its driver saves that state after
        a checkpoint is written, and a driver stopped by Ctrl-C (Ray Train's own handler aborts
        the run) had not saved it for the last checkpoints, or for any: the run started again
        from step 1 with its checkpoints of steps 22 and 44 on disk.
        """
        return stored_checkpoints(self.folder)

    def prepare_model(self, module: nn.Module) -> nn.Module:
        """Ray Train's device placement and DDP wrapping."""
        return ray.train.torch.prepare_model(module)

    def report(self, metrics: dict[str, Any], checkpoint: Checkpoint | None) -> None:
        """Report to Ray Train (every worker calls it; rank 0 gives the checkpoint)."""
        ray.train.report(metrics, checkpoint=checkpoint)


class TuneTrial(Session):
    """The process of a Ray Tune trial that trains with one worker, in `trial_dir`."""

    def __init__(self, trial_dir: str, use_gpu: bool) -> None:
        self.folder = trial_dir.rstrip("/")
        self.rank, self.world = 0, 1
        self.device = torch.device("cuda" if use_gpu else "cpu")

    def checkpoints(self) -> list[AbstractContextManager[str]]:
        """Every checkpoint in the trial's folder and in its TRAIN_RUN folder, newest first.

        Read from storage rather than from Tune's trial state: the driver saves that state
        only now and then, so after the driver is killed it can name an older checkpoint than
        the newest one written, and the steps between would be trained twice. TRAIN_RUN holds
        the checkpoints of a trial that an older raydeq trained through Ray Train: resumed
        without them, it trained again from step 1.
        """
        return stored_checkpoints(self.folder, f"{self.folder}/{TRAIN_RUN}")

    def prepare_model(self, module: nn.Module) -> nn.Module:
        """The module on the trial's device."""
        return module.to(self.device)

    def report(self, metrics: dict[str, Any], checkpoint: Checkpoint | None) -> None:
        """Report to Ray Tune, which stores the checkpoint in the trial's folder (as Tune's own
        Checkpoint: it warns of a deprecation, in every trial, for Ray Train's)."""
        saved = (
            None
            if checkpoint is None
            else ray.tune.Checkpoint(checkpoint.path, checkpoint.filesystem)
        )
        ray.tune.report(metrics, checkpoint=saved)


def stored_checkpoints(*folders: str) -> list[AbstractContextManager[str]]:
    """The `checkpoint_*` folders in `folders` (paths or URIs of one filesystem) as local
    folders, newest first (see `newest_first`)."""
    fs = filesystem(folders[0])[0]
    paths = newest_first(fs, [path for f in folders for path in subfolders(f, CHECKPOINT_PREFIX)])
    return [Checkpoint(path, filesystem=fs).as_directory() for path in paths]
