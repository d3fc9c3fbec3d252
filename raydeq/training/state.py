"""Everything a resume restores (weights, optimizer, schedule, scaler, counters, RNG states),
the optimizer and schedule it is made of, and the trained model a run's folder holds."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from raydeq import models
from raydeq.training.checkpoint import (
    DIVERGED_FILE,
    CheckpointError,
    newest_checkpoint,
    own_report,
)
from raydeq.training.config import OptimSection
from raydeq.training.seeding import WORKER_STREAM, stream_seed
from raydeq.training.storage import is_uri, local_path, unparsed_uri

log = logging.getLogger(__name__)


def rng_state(device: torch.device) -> dict[str, Tensor]:
    """The random generator states of the CPU and, on a GPU worker, of its device."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    """Restore generator states saved by `rng_state`."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class TrainState:
    """The training state of one worker; `step` counts every step, skipped ones included."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    step: int = 0
    skipped_steps: int = 0
    nonfinite_in_row: int = 0
    overflow_steps: int = 0

    def state_dict(self, rng: list[dict[str, Tensor]]) -> dict[str, Any]:
        """The checkpoint payload, with every worker's RNG state (`rng`, by rank)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_row": self.nonfinite_in_row,
            "overflow_steps": self.overflow_steps,
            "rng": rng,
        }

    def misfits(self, state: dict[str, Any]) -> list[str]:
        """What of a checkpoint's payload the run's optimizer, schedule and GradScaler cannot
        take: another optimizer's or schedule's settings, a GradScaler's state where fp16 is
        off (torch would drop it) or none where it is on."""
        optimizer, scheduler = self.optimizer, self.scheduler
        saved_group, own_group = state["optimizer"]["param_groups"][0], optimizer.param_groups[0]
        misfits = _keys_misfit("optimizer state", saved_group, own_group, type(optimizer).__name__)
        misfits += _keys_misfit(
            "learning-rate schedule",
            state["scheduler"],
            scheduler.state_dict(),
            type(scheduler).__name__,
        )
        misfits += _values_misfit("optimizer state", saved_group, own_group)
        misfits += _values_misfit(
            "learning-rate schedule", state["scheduler"], scheduler.state_dict()
        )
        if self.scaler.is_enabled() and not state["scaler"]:
            misfits.append(
                "GradScaler state is empty (trained without fp16), where this run's train.amp "
                "is fp16"
            )
        if state["scaler"] and not self.scaler.is_enabled():
            misfits.append("GradScaler state is fp16's, where this run's train.amp is not fp16")
        return misfits

    def load(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's payload (the model's weights are loaded before DDP)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        self.nonfinite_in_row = state["nonfinite_in_row"]
        self.overflow_steps = state.get("overflow_steps", 0)

    def seed_workers(self, state: dict[str, Any] | None, seed: int, rank: int, world: int) -> None:
        """Restore this rank's RNG state, or seed it anew (a fresh run, or another world size)."""
        device = next(self.model.parameters()).device
        rng = state["rng"] if state is not None else []
        if len(rng) == world:
            set_rng_state(rng[rank], device)
        else:
            torch.manual_seed(stream_seed(seed, WORKER_STREAM, rank, self.step))


# Tensor names a refused checkpoint's model shows, of those that do not fit.
SHOWN_TENSORS = 3


def model_misfits(
    model: nn.Module, saved: dict[str, Tensor], whose: str = "this run's"
) -> list[str]:
    """What of a checkpoint's model weights `saved` `model` cannot take: tensors it lacks or
    has past the model's, or of another shape; `whose` names the model's in the message."""
    own = model.state_dict()
    lacked = [k for k in own if k not in saved]
    past = [k for k in saved if k not in own]
    reshaped = [k for k in own if k in saved and saved[k].shape != own[k].shape]
    misfits = [f"model lacks {len(lacked)} of {whose} tensors ({_names(lacked)})"] * bool(lacked)
    misfits += [f"model has {len(past)} tensors past {whose} ({_names(past)})"] * bool(past)
    return misfits + [
        f"model's {k} is {list(saved[k].shape)} where {whose} is {list(own[k].shape)}"
        for k in reshaped[:SHOWN_TENSORS]
    ]


def _names(keys: list[str]) -> str:
    """The first SHOWN_TENSORS of `keys`, and how many more."""
    more = len(keys) - SHOWN_TENSORS
    return ", ".join(keys[:SHOWN_TENSORS]) + (f", {more} more" if more > 0 else "")


def _keys_misfit(what: str, saved: dict[str, Any], own: dict[str, Any], kind: str) -> list[str]:
    """`what` of a checkpoint where its settings `saved` have keys that the run's `own` of
    type `kind` lacks (another optimizer or schedule), with the keys each has alone. Keys of
    the run's alone are no misfit: a newer torch adds settings, which it defaults on load."""
    theirs, ours = sorted(saved.keys() - own.keys()), sorted(own.keys() - saved.keys())
    if not theirs:
        return []
    return [
        f"{what} has {', '.join(theirs)} where this run's {kind} has {', '.join(ours) or 'none'}"
    ]


# The optimizer's and the schedule's state that the settings decide, by key: what a checkpoint
# recording no settings holds of them, which loading it puts in place of the run's own.
SETTING_OF = {
    "initial_lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "momentum": "optim.momentum",
    "nesterov": "optim.nesterov",
    "decoupled_weight_decay": "optim.optimizer",
    "eta_min": "optim.eta_min",
    "gamma": "optim.gamma",
    "milestones": "optim.milestones",
    "step_size": "optim.step_epochs",
    "T_max": "the run's steps: train.epochs, train.max_steps",
}


def _values_misfit(what: str, saved: dict[str, Any], own: dict[str, Any]) -> list[str]:
    """`what` of a checkpoint where its value of a setting's state (SETTING_OF) differs from
    the run's `own`: loaded, it would replace the run's setting without a word."""
    return [
        f"{what}'s {key} is {saved[key]!r} where this run's is {own[key]!r} ({setting})"
        for key, setting in SETTING_OF.items()
        if key in saved and key in own and saved[key] != own[key]
    ]


def refuse_misfits(folder: str, saved: dict[str, Any], misfits: list[str]) -> None:
    """Raise a CheckpointError naming the `misfits` of the checkpoint `saved` in `folder` where
    it was written before checkpoints recorded their settings (config.check_settings checks a
    later one's), and the run cannot take it."""
    if misfits and "settings" not in saved:
        raise CheckpointError(
            f"{folder}: the checkpoint of step {saved['step']} records no settings (written "
            f"before checkpoints recorded them) and does not fit this run: its "
            f"{'; its '.join(misfits)}; run it with the settings it was trained with, or give "
            "this run another name="
        )


def load_model(folder: str | Path) -> nn.Module:
    """The trained model of a run's or a trial's folder, or of a checkpoint folder: built from
    the settings its newest readable checkpoint records, with that checkpoint's weights (read
    tensors-only, on the CPU), in eval mode, and its step as `checkpoint_step`; a warning says
    where that step is past the run's last test evaluation or before its first (a periodic
    checkpoint of a run stopped before its next one): no test accuracy it reported measured
    these weights. A
    CheckpointError names the folder and what it
    lacks: a checkpoint, recorded settings, a model section in them, or weights that fit the
    model they build; a file: URI is read as its folder, and another URI refused. The errors
    name the folder as given: a file: URI's local path is put back as the URI."""
    local = local_folder(folder)
    try:
        return _built(local)
    except CheckpointError as err:
        if not is_uri(str(folder)) or local == Path(local.anchor):
            raise
        given = str(folder).rstrip("/")
        raise type(err)(str(err).replace(str(local), given)) from None


def _built(folder: Path) -> nn.Module:
    """`load_model` of a local folder."""
    read, saved = newest_checkpoint(folder)
    try:
        with torch.random.fork_rng(devices=[]):  # initial weights the checkpoint's replace
            model = models.build(_model_options(folder, saved))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder}: its settings build no model ({err})") from None
    misfits = model_misfits(model, saved["model"], whose="the built model's")
    if misfits:
        raise CheckpointError(
            f"{folder}: the checkpoint of step {saved['step']} does not fit the model its "
            f"settings build: its {'; its '.join(misfits)}"
        )
    model.load_state_dict(saved["model"])
    model.checkpoint_step = saved["step"]
    warn_of_untested(read, saved["step"])
    return model.eval()


def warn_of_untested(read: Path, step: int) -> None:
    """Warn where the weights of step `step`, read from the checkpoint folder `read`, are not
    those the run last tested: the run diverged after them, or they are a periodic
    checkpoint's past its last test evaluation or, in its first epoch, before its first (a
    run stopped before its next)."""
    divergence = divergence_from(read.parent, step)
    if divergence is not None:
        log.warning(
            "%s: the weights of step %d, the run's newest checkpoint before it diverged; its "
            "%s records: %s",
            read.parent,
            step,
            DIVERGED_FILE,
            divergence,
        )
    report = own_report(read)
    if report is not None and "test_accuracy" not in report:
        when, measured = (
            ("before the run's first", "the run reported no test accuracy")
            if report.get("epoch", 1) < 1  # the first epoch's end is its first evaluation
            else ("past the run's last", "no test accuracy the run reported measured them")
        )
        log.warning(
            "%s: the weights of step %d of %s, a periodic checkpoint (train.checkpoint_every) "
            "%s test evaluation, which it makes at each epoch's end and its last step; %s",
            read,
            step,
            report.get("total_steps", "?"),
            when,
            measured,
        )


def divergence_from(run: Path, step: int) -> str | None:
    """The reason recorded in the run folder `run` where the run stopped diverged after its
    checkpoint of `step`; None where it records no divergence or one after another step (a
    resume with a higher train.max_nonfinite_steps trained on past it)."""
    try:
        record = json.loads((run / DIVERGED_FILE).read_text())
        return str(record["reason"]) if record["from_step"] == step else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:  # the loop refuses it so too
        return f"a record it cannot read ({type(err).__name__})"


def local_folder(folder: str | Path) -> Path:
    """The local folder of a path or a file: URI; a CheckpointError naming another URI, which
    Path would cut to a missing folder (s3://bucket/run to s3:/bucket/run), or a URI that
    pyarrow does not read, giving its escaped form; a TypeError naming a folder that is no
    path (None, a number), which pathlib refused without naming it."""
    if not isinstance(folder, str | os.PathLike):
        raise TypeError(
            f"folder={folder!r} must be a path (a str or pathlib.Path) of a run's, a trial's "
            "or a checkpoint's folder, or a file: URI"
        )
    if not is_uri(str(folder)):
        return Path(folder)
    problem = unparsed_uri(str(folder))
    if problem:
        raise CheckpointError(problem)
    local = local_path(str(folder))
    if local is None:
        raise CheckpointError(
            f"{folder}: only a local folder or a file: URI is read; copy the run to a local "
            f"folder (for S3: aws s3 sync {folder} DIR) and give that folder"
        )
    return Path(local)


# How a refusal of a checkpoint without a model to build says to load its weights instead.
BUILD_BY_HAND = (
    "build it with raydeq.models.build and load into it the weights of "
    "raydeq.training.checkpoint.read_newest(folder)['model']"
)


def _model_options(folder: Path, saved: dict[str, Any]) -> dict[str, Any]:
    """The model options (null where unset, as build takes them) that the settings of the
    checkpoint `saved` in `folder` record; a CheckpointError where it records no settings (an
    older checkpoint) or no model section as a mapping among them, naming the step and what it
    records."""
    settings = saved.get("settings")
    if not isinstance(settings, dict):
        raise CheckpointError(
            f"{folder}: the checkpoint of step {saved['step']} records no settings (written "
            "before checkpoints recorded them), so the model it holds cannot be built from "
            f"them; {BUILD_BY_HAND}"
        )
    options = settings.get("model")
    if not isinstance(options, dict):
        shown = repr(options) if "model" in settings else "missing"
        raise CheckpointError(
            f"{folder}: the checkpoint of step {saved['step']} records settings without a "
            f"model section to build from (model: {shown}; sections: "
            f"{', '.join(map(str, settings)) or 'none'}); {BUILD_BY_HAND}"
        )
    return options


# Devices whose optimizer update torch runs as one fused kernel per step rather than about a
# dozen foreach kernels: Adam's update for mnist_dense takes 0.17 ms against 0.39 ms on a CPU.
FUSED_DEVICES = ("cpu", "cuda")


def fusable(params: list[nn.Parameter]) -> bool | None:
    """True when every parameter is a floating tensor on one device with fused optimizer
    kernels; None (torch's default implementation) otherwise."""
    devices = {p.device.type for p in params}
    floating = all(torch.is_floating_point(p) for p in params)
    return True if floating and len(devices) == 1 and devices <= set(FUSED_DEVICES) else None


def make_optimizer(cfg: OptimSection, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The configured optimizer, fused where the parameters allow."""
    params = list(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            fused=fusable(params),
        )
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fusable(params))


def make_scheduler(
    cfg: OptimSection, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The configured learning-rate schedule, stepped once per update (a skipped step leaves
    it): cosine from lr to eta_min over the run, step decay by gamma at the milestones (or
    every step_epochs epochs), or constant."""
    schedulers = torch.optim.lr_scheduler
    if cfg.schedule == "cosine":
        return schedulers.CosineAnnealingLR(
            optimizer, T_max=max(total_steps, 1), eta_min=cfg.eta_min
        )
    if cfg.schedule == "step" and cfg.milestones:
        return schedulers.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    if cfg.schedule == "step":
        every = cfg.step_epochs * steps_per_epoch
        return schedulers.StepLR(optimizer, step_size=every, gamma=cfg.gamma)
    return schedulers.ConstantLR(optimizer, factor=1.0, total_iters=0)
