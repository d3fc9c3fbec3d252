"""What a worker tells the world: interval means, TensorBoard, a progress line, Ray reports.

Rank 0 writes TensorBoard scalars per step under `<run>/tensorboard` (`eventlog`: also on
s3://), each measured on its own share of the batch but for nfe and backward_nvjp (the whole
batch's, the most of any worker's), and prints one progress line per report; every worker
reports the interval's means to Ray (Train or Tune, through the session), with a checkpoint
written by rank 0 when asked.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ray.train import Checkpoint

from raydeq.training.checkpoint import write_checkpoint
from raydeq.training.console import duration
from raydeq.training.eventlog import EventLog

TENSORBOARD_DIR = "tensorboard"
log = logging.getLogger("raydeq")
SHOWN = {
    "train_loss": "loss",
    "train_accuracy": "acc",
    "nfe": "nfe",
    "images_per_second": "img/s",
    "test_accuracy": "test_acc",
    "test_nfe": "test_nfe",
}
# Shown in a progress line once they are not 0: the shares of samples whose forward solve and
# backward linear solve did not converge, of the test samples whose solve did not, and the
# updates skipped for a non-finite loss or gradient.
FLAGGED = {
    "unconverged_fraction": "unconverged",
    "backward_unconverged_fraction": "backward_unconverged",
    "test_unconverged_fraction": "test_unconverged",
    "skipped_steps": "skipped",
}
# What each TensorBoard scalar measures, in which unit, shown beside its chart: a name such as
# forward_time says neither that it is seconds nor of what. A step's scalars are rank 0's,
# measured on its share of the batch (batch_size / num_workers images).
DESCRIPTIONS = {
    "train_loss": "loss of the step: cross-entropy + lambda_skip * skip_loss + lambda_jac * "
    "jac_loss, mean over rank 0's share of the batch",
    "train_accuracy": "fraction (0 to 1) of rank 0's share of the step's batch classified right",
    "nfe": "evaluations of f by the step's forward solve (the whole batch's: its slowest "
    "sample's, the most of any worker's)",
    "backward_nvjp": "vector-Jacobian products of f in the step's backward pass through the "
    "solve's adjoint, an unrolled warm-up and skip_loss's f(z*, x), not through Skip Reg.'s "
    "z0 = f(0, x) nor jac_loss (the most of any worker's)",
    "forward_time": "seconds per training step: the forward pass and the loss",
    "backward_time": "seconds per training step: the backward pass",
    "optimizer_time": "seconds per training step: unscaling, clipping, the finiteness check "
    "and the update",
    "data_time": "seconds per training step waiting for the loader and copying the batch to "
    "the device",
    "step_time": "seconds per training step, the whole step (data wait included)",
    "skip_loss": "mean |f(z*, x) - z0| over rank 0's share of the batch (Skip and Skip Reg. "
    "DEQ, 0 otherwise), "
    "before its weight lambda_skip",
    "jac_loss": "Hutchinson estimate of ||J_f(z*)||_F^2 / dim (model.jac_reg, 0 otherwise), "
    "before its weight lambda_jac",
    "residual": "RMS of f(z) - z at the iterate each sample's forward solve returned, mean over "
    "rank 0's share of the batch",
    "unconverged_fraction": "fraction (0 to 1) of rank 0's share of the batch whose forward "
    "solve missed the tolerance (a Neural ODE's is near 1, as its z(t1) is no steady state: "
    "compare its test_unconverged_fraction)",
    "backward_unconverged_fraction": "fraction (0 to 1) of rank 0's share of the batch whose "
    "backward linear solve did not converge",
    "images_per_second": "training images a second: the batch over the whole step's time "
    "(data wait included)",
    "lr": "learning rate the step's update took (an fp16 overflow step's: the rate held)",
    "skipped_steps": "steps skipped so far for a non-finite loss or gradient (a running count)",
    "overflow_steps": "steps skipped so far for an fp16 overflow of the gradient scaler (a "
    "running count)",
    "test_accuracy": "fraction (0 to 1) of the test images whose largest logit is their label",
    "test_top5_accuracy": "fraction (0 to 1) of the test images whose label is among their 5 "
    "largest logits",
    "test_nfe": "evaluations of f per test batch of data.eval_batch_size (a batch's: its "
    "slowest sample's), mean over the test batches",
    "predict_time": "seconds per test batch of data.eval_batch_size: the forward pass, mean "
    "over the test batches",
    "test_unconverged_fraction": "fraction (0 to 1) of the test images whose forward solve "
    "ended without converging (max_steps, diverged or non-finite; for a Neural ODE, which "
    "solves to no tolerance, non-finite alone)",
}


def distributed() -> bool:
    """True inside a multi-worker process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sums of `values` over all workers."""
    return summed(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def summed(totals: torch.Tensor) -> torch.Tensor:
    """Element-wise sums of `totals` over all workers, left on the device (no host read)."""
    if distributed():
        dist.all_reduce(totals)
    return totals


def most(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maxima of `values` over all workers, left on the device (no host read)."""
    if distributed():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def all_gather(value: Any) -> list[Any]:
    """Every worker's `value`, by rank (a list of one outside a process group)."""
    if not distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def description(tag: str) -> str:
    """What a scalar measures and in which unit (DESCRIPTIONS), a warm-up step's pretrain_*
    scalar as its solve's, named so; empty for a tag not described."""
    base = tag.removeprefix("pretrain_")
    said = DESCRIPTIONS.get(base, "")
    return (
        f"unrolled warm-up steps (model.pretrain_steps): {said}" if said and base != tag else said
    )


def progress_line(label: str, metrics: dict[str, Any], neural_ode: bool = False) -> str:
    """`[label] epoch E step S/N` and the headline metrics of a report; a Neural ODE's leaves
    out its training unconverged_fraction, near 1 at every step as its z(t1) is no steady
    state (TensorBoard and the results keep it)."""
    position = f"epoch {metrics['epoch']:.2f} step {metrics['step']}/{metrics['total_steps']}"
    shown = " ".join(f"{name} {figure(metrics[k])}" for k, name in SHOWN.items() if k in metrics)
    unflagged = ("unconverged_fraction",) if neural_ode else ()
    flagged = "".join(
        f" {name} {figure(metrics[k])}"
        for k, name in FLAGGED.items()
        if metrics.get(k) and k not in unflagged
    )
    left = metrics.get("time_left_s")
    eta = f" eta {duration(left)}" if left and metrics["step"] < metrics["total_steps"] else ""
    return f"[{label}] {position} {shown}{flagged}{eta}"


def figure(value: float) -> str:
    """A metric to 4 significant digits, one that rounds to 5 digits whole: `0.9721`, `33.5`,
    `10000`, `10530`, where 4 digits alone wrote `1e+04`, `1.053e+04` (a fast trial's img/s)."""
    return f"{value:.0f}" if abs(value) >= 9999.5 else f"{value:.4g}"


class Meter:
    """Sums of per-step metrics over one report interval; each metric is averaged over the steps
    (on every worker) that recorded it, so that pretraining steps keep their own means."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = tuple(keys)
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, values: dict[str, float]) -> None:
        """Add one step's metrics."""
        for key, value in values.items():
            self.sums[key] += value
            self.counts[key] += 1

    def means(self, device: torch.device) -> dict[str, float]:
        """Means over the interval on every worker, for the metrics recorded at all; reset."""
        local = [self.counts[k] for k in self.keys] + [self.sums[k] for k in self.keys]
        totals = all_sum(local, device)
        self.sums.clear()
        self.counts.clear()
        n = len(self.keys)
        return {
            key: total / count
            for key, count, total in zip(self.keys, totals[:n], totals[n:], strict=True)
            if count
        }


Report = Callable[[dict[str, float], Checkpoint | None], None]


class Reporter:
    """TensorBoard and progress lines on rank 0, and reports (with checkpoints) to Ray."""

    def __init__(self, run_dir: str, name: str, rank: int, resumed_step: int, send: Report) -> None:
        self.name = name
        self.rank = rank
        self.send = send
        self.unsaved: list[dict[str, float]] = []  # reports since the last checkpoint
        self.writer = None
        if rank == 0:
            # From the step after the resumed one, also at 1: a run restarted before its first
            # checkpoint writes steps 1, 2, ... again over those of the session that crashed.
            self.writer = EventLog(os.path.join(run_dir, TENSORBOARD_DIR), resumed_step + 1)

    def begin(self, step: int, total: int, workers: int, notes: Sequence[str] = ()) -> None:
        """Say on rank 0 where training starts (the first progress line can be many steps and,
        behind Ray's worker start, half a minute away), then each note on the settings."""
        if self.rank == 0:
            where = f"resumed at step {step} of {total}" if step else f"training {total} steps"
            log.info(f"[{self.name}] {where} on {workers} worker{'s' * (workers > 1)}")
            for note in notes:
                log.info(f"[{self.name}] {note}")

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Write scalars to TensorBoard (rank 0)."""
        if self.writer is not None:
            self.writer.add_scalars(values, step, description)

    def progress(self, metrics: dict[str, float], neural_ode: bool) -> None:
        """One progress line on rank 0 (see `progress_line`)."""
        if self.rank == 0:
            log.info(progress_line(self.name, metrics, neural_ode))

    def report(
        self, metrics: dict[str, float], state: Callable[[], dict[str, Any]] | None = None
    ) -> None:
        """Report to Ray; with `state` (a collective call), also a checkpoint of it, which keeps
        the reports since the one before (a stopped driver may not have recorded them)."""
        if state is None:
            if self.rank == 0:
                self.unsaved.append(metrics)
            self.send(metrics, None)
            return
        payload = state()
        if self.writer is not None:
            self.writer.flush()
        with tempfile.TemporaryDirectory() as root:
            saved = None
            if self.rank == 0:
                reports = [*self.unsaved, metrics]
                folder = write_checkpoint(payload, Path(root) / "checkpoint", reports)
                saved = Checkpoint.from_directory(str(folder))
            self.send(metrics, saved)
        self.unsaved.clear()

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.writer is not None:
            self.writer.close()
