"""The per-worker training loop: data, model, steps, evaluation, reports and checkpoints.

Timings follow the paper's columns: `forward_time` is the forward pass and the loss,
`backward_time` the backward pass alone, `optimizer_time` unscaling, clipping, the cross-worker
finiteness check and the update, `data_time` the wait for the loader and the batch's copy to
the device (all synchronised on CUDA). Steps of the unrolled warm-up (`pretrain_steps`) report
`pretrain_*` metrics instead, so the DEQ columns never mix the two.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from raydeq import models
from raydeq.deq import LayerOutput
from raydeq.solvers.stats import unconverged
from raydeq.training import data
from raydeq.training.checkpoint import DIVERGED_FILE, restore
from raydeq.training.config import (
    Config,
    check_settings,
    evaluation_settings,
    notes,
    trained_settings,
)
from raydeq.training.console import Progress, first_line
from raydeq.training.errors import Recurring
from raydeq.training.objective import STEP_METRICS, Evaluation, Objective, clock, evaluate
from raydeq.training.reporting import Meter, Reporter, all_gather, all_sum, most
from raydeq.training.session import Session
from raydeq.training.state import (
    TrainState,
    make_optimizer,
    make_scheduler,
    model_misfits,
    refuse_misfits,
    rng_state,
    set_rng_state,
)
from raydeq.training.storage import StorageError, exists, read_text, reading, write_bytes

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Named pretrain_* in a step of the unrolled warm-up, which runs no solve, so that the DEQ's
# curves and interval means of its solves' cost and state hold solves only.
PRETRAIN_METRICS = ("nfe", "backward_nvjp", "forward_time", "backward_time")
PRETRAIN_METRICS += ("residual", "unconverged_fraction", "backward_unconverged_fraction")

log = logging.getLogger("raydeq")


class NonFiniteError(Recurring, RuntimeError):
    """Training stopped after too many steps in a row with a non-finite loss or gradient."""


class OutOfMemory(RuntimeError):
    """A training step or an evaluation did not fit in the device's memory."""


def on_device(batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> Iterator:
    """The batches moved to `device` (asynchronously from pinned memory)."""
    for images, labels in batches:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def step_values(loss: Tensor, logits: Tensor, labels: Tensor, out: LayerOutput) -> dict:
    """A step's metrics that live on the device, as float64 scalars there, to be read with one
    transfer: its loss and accuracy, the layer's losses and the solves' statistics."""
    stats = out.stats
    values = {
        "train_loss": loss.detach(),
        "train_accuracy": (logits.argmax(1) == labels).float().mean(),
        "skip_loss": out.skip_loss.detach(),
        "jac_loss": out.jac_loss.detach(),
        "residual": stats.residual.float().mean(),
        "unconverged_fraction": unconverged(stats.converged),
    }
    if stats.backward_converged is not None:
        values["backward_unconverged_fraction"] = unconverged(stats.backward_converged)
    return {key: value.double() for key, value in values.items()}


def read_step(
    loss: Tensor, grad_norm: Tensor, logits: Tensor, labels: Tensor, out: LayerOutput
) -> tuple[float, float, dict[str, float]]:
    """Whether any worker has a non-finite loss and a non-finite gradient, the step's metrics
    with grad_norm, this worker's but for nfe and backward_nvjp, the whole batch's, in one
    read of the device: whether the step is finite decides on the host whether the optimizer
    steps, and that read brings the metrics too. A batch's counts are its slowest sample's,
    the most of any worker's share (one collective maximum with the flags), so that a step
    counts the same on any number of workers, where each worker's share counts fewer."""
    flags = torch.stack([loss.detach().double(), grad_norm.double()]).isfinite().logical_not()
    counts = torch.tensor([out.stats.nfe, out.stats.backward_nvjp], dtype=torch.float64)
    counts = counts.to(flags.device, non_blocking=True)  # no wait for the step's queue
    measured = step_values(loss, logits, labels, out) | {"grad_norm": grad_norm.double()}
    shared = most(torch.cat([flags.double(), counts]))
    read = torch.cat([shared, torch.stack(list(measured.values()))]).tolist()
    (bad_loss, bad_grad, nfe, nvjp), values = read[:4], dict(zip(measured, read[4:], strict=True))
    return bad_loss, bad_grad, values | {"nfe": nfe, "backward_nvjp": nvjp}


class Loop:
    """The training loop of one worker, in a Ray Train worker or a Tune trial (`session`)."""

    def __init__(self, cfg: Config, session: Session) -> None:
        """Load the data, build the model and optimizer, resume from the session's latest
        checkpoint (refusing one trained with other settings) and report the run's start."""
        self.cfg = cfg
        self.session = session
        self.rank, self.world, self.device = session.rank, session.world, session.device
        torch.manual_seed(cfg.seed)
        splits = data.load_splits(cfg.data)
        data.check_batch(cfg.data, len(splits.train))  # an image folder's size is known here
        self.train_data = data.train_loader(
            splits.train, cfg.data, cfg.seed, self.rank, self.world, splits.augmented, self.device
        )
        self.test_data = data.eval_loader(splits.test, cfg.data, self.rank, self.world, self.device)
        self.steps_per_epoch = data.steps_per_epoch(self.train_data)
        epochs_steps = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = min(cfg.train.max_steps or epochs_steps, epochs_steps)
        self.objective = Objective(cfg.train.lambda_skip, cfg.train.lambda_jac)
        module = models.build(cfg.model_options())
        saved = restore(session.checkpoints())
        if saved is not None:
            check_settings(session.folder, saved.get("settings"), cfg)
            refuse_misfits(session.folder, saved, model_misfits(module, saved["model"]))
            module.load_state_dict(saved["model"])
        self.model = session.prepare_model(module)
        optimizer = make_optimizer(cfg.optim, self.model.parameters())
        scheduler = make_scheduler(cfg.optim, optimizer, self.total_steps, self.steps_per_epoch)
        scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        self.state = TrainState(module, optimizer, scheduler, scaler)
        if saved is not None:
            refuse_misfits(session.folder, saved, self.state.misfits(saved))
            self.state.load(saved)
        self.state.seed_workers(saved, cfg.seed, self.rank, self.world)
        self.checkpointed = self.state.step  # where a restart would resume
        self.skipped_values: tuple[float, float] | None = None  # a skipped step's loss, norm
        self.unrolled = False  # whether the last step was one of the unrolled warm-up's
        self.unrolling: bool | None = None  # whether the next step unrolls, once asked
        self.refuse_a_known_divergence()
        keys = STEP_METRICS + tuple(f"pretrain_{k}" for k in PRETRAIN_METRICS)
        self.meter = Meter(keys)
        name = cfg.label or cfg.name
        self.reporter = Reporter(cfg.run_dir, name, self.rank, self.state.step, session.report)
        self.neural_ode = cfg.model.variant == "neural_ode"  # see progress_line
        self.reporter.begin(
            self.state.step,
            self.total_steps,
            self.world,
            notes(cfg, self.total_steps, self.steps_per_epoch),
        )
        self.started = (time.monotonic(), self.state.step)

    def autocast(self) -> torch.autocast:
        """Mixed precision as configured (train.amp), or a disabled autocast."""
        dtype = AMP_DTYPES.get(self.cfg.train.amp)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def train_step(self, images: Tensor, labels: Tensor, data_time: float) -> dict | None:
        """One optimisation step's metrics; None when it was skipped for a non-finite loss or
        gradient, but for an fp16 overflow, whose update is skipped too but which returns them.

        Under fp16 a non-finite gradient with a finite loss is the GradScaler's overflow: the
        update is skipped, the scaler lowers its scale and the step counts in overflow_steps (its
        metrics are logged, and it does not count among the non-finite steps in a row);
        a non-finite loss, or a gradient that overflows at a scale of 1 or below (which scales
        nothing up, so the gradient itself is past fp16's range), leaves the scale as it was.
        """
        state = self.state
        pretraining = self.unrolls()  # before the layer's call, which it counts
        self.unrolled, self.unrolling = pretraining, None  # the call moves the count on
        start = clock(self.device)
        with self.autocast():
            logits, out = self.model(images)
        loss = self.objective(logits, labels, out)
        forward_end = clock(self.device)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        backward_end = clock(self.device)
        state.scaler.unscale_(state.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(
            self.model.parameters(), self.cfg.optim.grad_clip or math.inf
        )
        bad_loss, bad_grad, values = read_step(loss, grad_norm, logits, labels, out)
        norm = values.pop("grad_norm")
        finite = not (bad_loss or bad_grad)
        overflow = state.scaler.is_enabled() and bad_grad > 0 and bad_loss == 0
        overflow = overflow and state.scaler.get_scale() > 1  # read for an overflow alone
        rate = state.scheduler.get_last_lr()[0]  # this step's, logged with it
        # An overflow never reaches the optimizer: the scaler would hand a fused one the step
        # with its found_inf flag, and torch's fused SGD then leaves the momentum of a first
        # step as uninitialised memory (torch.empty_like), which the next update adds in.
        if finite:
            state.scaler.step(state.optimizer)
            state.scheduler.step()
        # A non-finite loss owes nothing to the scale, which update() would lower: it is kept.
        state.scaler.update(None if finite or overflow else state.scaler.get_scale())
        end = clock(self.device)
        state.overflow_steps += overflow
        if not (finite or overflow):
            self.skipped_values = (values["train_loss"], norm)
            return None
        times = {"forward_time": forward_end - start, "backward_time": backward_end - forward_end}
        took = end - start + data_time
        rest = {"optimizer_time": end - backward_end, "data_time": data_time, "step_time": took}
        rest["images_per_second"] = len(labels) * self.world / took
        rest["lr"] = rate
        metrics = times | values | rest
        if pretraining:
            return {f"pretrain_{k}" if k in PRETRAIN_METRICS else k: v for k, v in metrics.items()}
        return metrics

    def unrolls(self) -> bool:
        """Whether the next step is one of the unrolled warm-up's (a DEQ's pretrain_steps): the
        layer's answer, a host read of its call count during the warm-up, asked once between
        two steps, so that the end of a step and the next step share it."""
        if self.unrolling is None:
            pretraining = getattr(self.state.model.layer, "pretraining", None)  # DEQ only
            self.unrolling = pretraining is not None and pretraining()
        return self.unrolling

    def record(self, metrics: dict[str, float] | None) -> None:
        """Count a finished step and log its metrics; stop after too many skipped in a row."""
        state = self.state
        state.step += 1
        if metrics is None:
            state.skipped_steps += 1
            state.nonfinite_in_row += 1
        else:
            state.nonfinite_in_row = 0
            self.meter.add(metrics)
        self.reporter.scalars((metrics or {}) | self.counters(), state.step)
        limit = self.cfg.train.max_nonfinite_steps
        if state.nonfinite_in_row >= limit:
            raise self.diverged(
                f"training stopped at step {state.step}: {limit} steps in a row had a non-finite "
                f"loss or gradient (train.max_nonfinite_steps={limit}){self.skipped_note()}"
            )

    def counters(self) -> dict[str, int]:
        """The run's skipped (non-finite) and fp16 overflow steps so far, logged at every step
        and in every report."""
        return {
            "skipped_steps": self.state.skipped_steps,
            "overflow_steps": self.state.overflow_steps,
        }

    def skipped_note(self) -> str:
        """'; the last had loss L on worker R and gradient norm G', the values of the newest
        skipped step, or nothing where none was measured here."""
        if self.skipped_values is None:
            return ""
        loss, norm = self.skipped_values
        return f"; the last had loss {loss:g} on worker {self.rank} and gradient norm {norm:g}"

    def diverged(self, reason: str) -> NonFiniteError:
        """The error that stops a diverged run, recorded (by rank 0) in its folder with the step
        of its newest checkpoint, the workers and the limit: a restart from there with as many
        workers and no higher limit (Ray's scaling.max_failures, a resume) replays the same data
        from the same state and stops again."""
        if self.rank == 0:
            record = {"from_step": self.checkpointed, "workers": self.world, "reason": reason}
            record["limit"] = self.cfg.train.max_nonfinite_steps
            try:
                write_bytes(f"{self.session.folder}/{DIVERGED_FILE}", json.dumps(record).encode())
            except StorageError as err:  # the divergence is the news, not the record's write
                reason += f"; its record for restarts could not be kept ({err})"
        return NonFiniteError(reason)

    def refuse_a_known_divergence(self) -> None:
        """Raise the recorded NonFiniteError when this start resumes from the step where the
        run diverged before, with as many workers and no higher train.max_nonfinite_steps,
        instead of training those steps again."""
        path = f"{self.session.folder}/{DIVERGED_FILE}"
        if not exists(path):
            return
        limit = self.cfg.train.max_nonfinite_steps
        try:
            with reading(path):  # one that cannot be read is no edited record, to be deleted
                record = json.loads(read_text(path))
            same = (record["from_step"], record["workers"]) == (self.state.step, self.world)
            stopped, reason = limit <= record.get("limit", limit), str(record["reason"])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise StorageError(
                f"{path} is no record of a divergence ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); delete it to train on"
            ) from None
        if same and stopped:
            raise NonFiniteError(
                f"{reason}; it diverged like this from step {self.state.step}, where "
                f"it would resume, so it is not trained again (raise train.max_nonfinite_steps "
                f"above {limit}, or delete {path}, to try anyway)"
            )

    def evaluate(self) -> dict[str, float]:
        """Test metrics over the test set, or its first train.eval_batches batches (0 = all),
        which the workers share as they share the whole (every world-th batch from the rank's,
        `data.eval_shard`), so that they are the same on any number of workers.

        The random stream is left where it was: a cell that draws random numbers in eval mode
        would otherwise make the steps after an evaluation depend on the test batch settings,
        which are not settings that change the trained model.
        """
        first = self.cfg.train.eval_batches
        mine = len(range(self.rank, first, self.world)) if first else None
        batches = on_device(itertools.islice(self.test_data, mine), self.device)
        if self.rank == 0:  # CIFAR-10's test set takes minutes on a CPU
            count = len(self.test_data) if mine is None else min(mine, len(self.test_data))
            what = f"[{self.reporter.name}] evaluating at step {self.state.step}"
            batches = Progress(what, count).over(batches)
        saved = rng_state(self.device)
        try:
            totals = evaluate(self.state.model, batches, self.device, self.autocast())
        except torch.OutOfMemoryError as err:
            raise self.out_of_memory(err, evaluating=True) from None
        finally:
            set_rng_state(saved, self.device)
        return Evaluation(*all_sum(totals.totals(), self.device)).metrics()

    def checkpoint_state(self) -> dict[str, Any]:
        """The checkpoint payload with every worker's RNG state (a collective call), the
        run's settings (see `preflight.check_resume`) and its evaluations' test batches."""
        payload = self.state.state_dict(all_gather(rng_state(self.device)))
        settings = {"settings": trained_settings(self.cfg)}
        return payload | settings | {"evaluation": evaluation_settings(self.cfg)}

    def report(self, metrics: dict[str, float], checkpoint: bool) -> None:
        """Print progress and report to Ray Train, with a checkpoint when asked; one that the
        storage cannot take is a StorageError naming its step, the folder and why."""
        step = self.state.step
        epoch = step / self.steps_per_epoch
        position = {"step": step, "epoch": epoch, "total_steps": self.total_steps}
        metrics = position | self.counters() | self.time_left(step) | metrics
        self.reporter.progress(metrics, self.neural_ode)
        try:
            self.reporter.report(metrics, self.checkpoint_state if checkpoint else None)
        except OSError as err:
            if not checkpoint:
                raise
            # Ray's copy of the checkpoint into the storage (a full disk), whose error names
            # neither the folder nor the step, in a traceback from every worker and restart.
            reason = first_line(err)
            raise StorageError(
                f"the checkpoint of step {step} could not be stored in {self.session.folder}: "
                f"{reason}"
            ) from None
        if checkpoint:
            self.checkpointed = step

    def time_left(self, step: int) -> dict[str, float]:
        """`time_left_s`: the steps to go at this run's pace so far (its steps, evaluations and
        checkpoints since it started or resumed), or nothing before its first step."""
        began, first = self.started
        if step <= first:
            return {}
        return {
            "time_left_s": (time.monotonic() - began) / (step - first) * (self.total_steps - step)
        }

    def end_step(self) -> None:
        """Report at interval ends and at the unrolled warm-up's last step; evaluate and
        checkpoint at epoch ends and the last step. No interval mixes unrolled steps and
        solves: the results weigh an interval's means by all its steps, and a solve's metrics
        are means over the solves alone."""
        cfg, step = self.cfg.train, self.state.step
        last = step % self.steps_per_epoch == 0 or step >= self.total_steps
        periodic = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0
        warmed_up = self.unrolled and not self.unrolls()
        if not (last or periodic or warmed_up or step % cfg.report_every == 0):
            return
        summary = self.meter.means(self.device)
        if "step_time" in summary:  # the interval's images over its time, not a mean of rates
            summary["images_per_second"] = self.cfg.data.batch_size / summary["step_time"]
        if last:
            tested = self.evaluate()
            self.reporter.scalars(tested, step)
            summary |= tested
        self.report(summary, checkpoint=last or periodic)

    def out_of_memory(self, err: torch.OutOfMemoryError, evaluating: bool) -> OutOfMemory:
        """torch's error as one line that names the batch that did not fit and what to change
        (torch's own message is a paragraph about the allocator, once per worker and restart)."""
        data_cfg, world = self.cfg.data, self.world
        key, batch, share = (
            ("data.eval_batch_size", data_cfg.eval_batch_size, data_cfg.eval_batch_size)
            if evaluating  # a worker's own batch
            else ("data.batch_size", data_cfg.batch_size, data_cfg.batch_size // world)
        )
        what = "evaluating" if evaluating else f"at step {self.state.step + 1}"
        amp = "" if self.cfg.train.amp != "off" else ", or set train.amp=bf16"
        torch_says = ". ".join(str(err).split(". ")[:2]).strip()  # how much it asked for
        return OutOfMemory(
            f"{self.device} out of memory {what} with {key}={batch} ({share} per worker, model "
            f"{self.cfg.model.model}): lower {key}{amp} ({torch_says})"
        )

    def run(self) -> None:
        """Train from the current step to the end, reporting and checkpointing on the way; a
        batch that does not fit in memory stops it with an OutOfMemory naming the setting.
        TensorBoard is closed however it ends, so a run stopped by an error keeps the events
        of the steps that led to it (at a URI, uploaded from a local folder then removed)."""
        try:
            self.train()
        except torch.OutOfMemoryError as err:  # a step's (evaluate raises its own)
            self.close_after_error(err)
            raise self.out_of_memory(err, evaluating=False) from None
        except BaseException as err:
            self.close_after_error(err)
            raise
        self.reporter.close()

    def close_after_error(self, stopped: BaseException) -> None:
        """Close TensorBoard after the error that stopped the run, which a failed write or
        upload of its events is said beside rather than put in place of (not again where it
        is that error: TensorBoard's writer raises its failure at every call)."""
        try:
            self.reporter.close()
        except StorageError as err:
            if str(err) != str(stopped):
                log.warning(
                    "[%s] TensorBoard's last events were not kept: %s", self.reporter.name, err
                )

    def train(self) -> None:
        """The steps, reports and checkpoints of `run`."""
        if self.state.step >= self.total_steps:
            self.report(self.evaluate(), checkpoint=True)
        while self.state.step < self.total_steps:
            epoch, position = divmod(self.state.step, self.steps_per_epoch)
            data.set_position(self.train_data, epoch, position)
            steps = min(self.total_steps - self.state.step, self.steps_per_epoch - position)
            left = itertools.islice(self.train_data, steps)
            if self.rank == 0:  # train.report_every steps of cifar10_small take minutes on a CPU
                first = self.state.step + 1
                what = f"[{self.reporter.name}] training steps {first} to {first + steps - 1}"
                left = Progress(what, steps).over(left)
            batches = on_device(left, self.device)
            while True:
                waited = clock(self.device)
                batch = next(batches, None)
                if batch is None:
                    break
                data_time = clock(self.device) - waited  # its copy to the device included
                self.record(self.train_step(*batch, data_time))
                self.end_step()
