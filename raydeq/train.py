"""One training run on Ray Train: `python -m raydeq.train CONFIG.yaml [key=value ...]`.

The config is validated, the data folder and the storage folder are checked, and only then does
Ray start (or is joined, when a cluster runs). Each worker trains the model with DDP, rank 0
writes TensorBoard scalars under `storage_path/name/tensorboard`, and every worker reports its
metrics to Ray Train, with a checkpoint every `train.checkpoint_every` steps and at each epoch
end. Running the same command again (same `name` and `storage_path`) resumes from the newest
readable checkpoint; a worker that dies is restarted from it (`scaling.max_failures`).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import pickle
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from raydeq import data, models
from raydeq.config import Config, ConfigError, load, validate

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
TENSORBOARD_DIR = "tensorboard"
EXIT_BAD_INPUT = 2
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete, corrupted, or holds something other than tensors."""


class StorageError(RuntimeError):
    """The storage folder cannot be created or written."""


class NonFiniteError(RuntimeError):
    """Training stopped after too many steps in a row with a non-finite loss or gradient."""


# Checkpoints -----------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint(state: dict[str, Any], directory: Path) -> Path:
    """Write `state` to the new folder `directory`, atomically: a temporary folder is renamed.

    The folder holds `state.pt` and `manifest.json` with its step and SHA-256, so a copy that
    was cut short or altered later is recognised when it is read.
    """
    staging = directory.with_name(f".{directory.name}.partial")
    staging.mkdir(parents=True)
    torch.save(state, staging / STATE_FILE)
    manifest = {"step": state["step"], "sha256": _sha256(staging / STATE_FILE)}
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest))
    staging.rename(directory)
    return directory


def read_checkpoint(directory: Path) -> dict[str, Any]:
    """The state in a checkpoint folder, checked against its manifest and loaded tensors-only."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        expected = manifest["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{directory}: no valid {MANIFEST_FILE} ({err})") from None
    state_path = directory / STATE_FILE
    if not state_path.is_file() or _sha256(state_path) != expected:
        raise CheckpointError(f"{directory}: {STATE_FILE} is missing or fails its checksum")
    try:
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        reason = str(err).splitlines()[0]
        raise CheckpointError(
            f"{directory}: {STATE_FILE} refused by the loader ({reason})"
        ) from None


def restore(candidates: Iterable[Checkpoint]) -> dict[str, Any] | None:
    """The state of the first readable checkpoint, newest first; None when there is none.

    A checkpoint that cannot be read is reported and the previous one is tried; when every
    checkpoint is unreadable the run stops instead of silently starting from scratch.
    """
    failures = []
    for checkpoint in candidates:
        try:
            with checkpoint.as_directory() as directory:
                state = read_checkpoint(Path(directory))
        except CheckpointError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
            failures.append(str(err))
            continue
        if failures:
            log.warning("resumed from the checkpoint of step %d", state["step"])
        return state
    if failures:
        raise CheckpointError(f"no readable checkpoint: {'; '.join(failures)}")
    return None


def checkpoint_candidates() -> list[Checkpoint]:
    """The run's checkpoints, newest first: Ray's latest, then the others it keeps, by step."""
    latest = ray.train.get_checkpoint()
    if latest is None:
        return []
    kept = ray.train.get_all_reported_checkpoints()
    older = [r for r in kept if r.checkpoint.path != latest.path]
    older.sort(key=lambda r: r.metrics.get("step", -1), reverse=True)
    return [latest, *(r.checkpoint for r in older)]


# Metrics ---------------------------------------------------------------------------------------


def _distributed() -> bool:
    """True inside a multi-worker process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sums of `values` over all workers."""
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(totals)
    return totals.tolist()


class Meter:
    """Sums of per-step metrics over one report interval, averaged over steps and workers."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.steps = 0

    def add(self, values: dict[str, float]) -> None:
        """Add one step's metrics."""
        for key, value in values.items():
            self.sums[key] += value
        self.steps += 1

    def means(self, keys: Sequence[str], device: torch.device) -> dict[str, float]:
        """Means over the interval's steps on every worker (none if all were skipped); reset."""
        totals = all_sum([self.steps, *(self.sums[k] for k in keys)], device)
        self.sums.clear()
        self.steps = 0
        if totals[0] == 0:
            return {}
        return {key: total / totals[0] for key, total in zip(keys, totals[1:], strict=True)}


def finite_everywhere(loss: Tensor, grad_norm: Tensor, device: torch.device) -> bool:
    """True when the loss and the gradient norm are finite on every worker."""
    bad = not (torch.isfinite(loss).item() and torch.isfinite(grad_norm).item())
    return all_sum([float(bad)], device)[0] == 0


def clock(device: torch.device) -> float:
    """Seconds on a monotonic clock, after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


STEP_METRICS = (
    "train_loss",
    "train_accuracy",
    "nfe",
    "backward_nvjp",
    "forward_time",
    "backward_time",
    "skip_loss",
    "jac_loss",
    "residual",
    "unconverged_fraction",
    "images_per_second",
)


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


# Training loop ---------------------------------------------------------------------------------


def _optimizer(cfg: Config, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The configured optimizer."""
    o = cfg.optim
    if o.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
        )
    kind = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=o.lr, weight_decay=o.weight_decay)


def _scheduler(
    cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The configured learning-rate schedule, stepped once per training step."""
    schedule = cfg.optim.schedule
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    if schedule == "step":
        every = cfg.optim.step_epochs * steps_per_epoch
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=every, gamma=cfg.optim.gamma)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


class Loop:
    """The training loop of one Ray Train worker."""

    def __init__(self, cfg: Config) -> None:
        context = ray.train.get_context()
        self.cfg = cfg
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(cfg.seed)
        splits = data.load_splits(cfg.data)
        self.train_data = data.train_loader(splits.train, cfg.data, cfg.seed)
        self.test_data = data.eval_loader(splits.test, cfg.data)
        self.steps_per_epoch = data.steps_per_epoch(self.train_data)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"data.batch_size={cfg.data.batch_size} exceeds the "
                f"{len(splits.train)} training samples; lower it"
            )
        epochs_steps = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = min(cfg.train.max_steps or epochs_steps, epochs_steps)
        model = models.build(cfg.model_options())
        self.lambda_skip = (
            model.lambda_skip if cfg.train.lambda_skip is None else cfg.train.lambda_skip
        )
        state = restore(checkpoint_candidates())
        if state is not None:
            model.load_state_dict(state["model"])
        self.model = ray.train.torch.prepare_model(model)
        self.optimizer = _optimizer(cfg, self.model.parameters())
        self.scheduler = _scheduler(cfg, self.optimizer, self.total_steps, self.steps_per_epoch)
        self.amp = cfg.train.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.step = 0
        self.skipped_steps = 0
        self.nonfinite_in_row = 0
        if state is not None:
            self._load(state)
        else:
            torch.manual_seed(cfg.seed + 1 + self.rank)
        self.meter = Meter()
        self.writer = self._writer()

    @property
    def module(self) -> nn.Module:
        """The model without its DDP wrapper."""
        return getattr(self.model, "module", self.model)

    def _load(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's optimizer, schedule, scaler, counters and RNG states."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        self.nonfinite_in_row = state["nonfinite_in_row"]
        rng = state["rng"]
        if len(rng) == self.world_size:
            set_rng_state(rng[self.rank], self.device)
        else:
            torch.manual_seed(self.cfg.seed + 1 + self.rank + self.world_size * self.step)

    def _writer(self) -> SummaryWriter | None:
        """Rank 0's TensorBoard writer; events after the resumed step are purged."""
        if self.rank != 0:
            return None
        log_dir = os.path.join(self.cfg.run_dir, TENSORBOARD_DIR)
        return SummaryWriter(log_dir, purge_step=self.step + 1 if self.step else None)

    def log(self, values: dict[str, float], step: int) -> None:
        """Write scalars to TensorBoard (rank 0)."""
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def state(self) -> dict[str, Any]:
        """Everything needed to continue training exactly where it is (collective call)."""
        rng = [rng_state(self.device)]
        if _distributed():
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_row": self.nonfinite_in_row,
            "rng": rng,
        }

    def report(self, metrics: dict[str, float], checkpoint: bool) -> None:
        """Report metrics to Ray Train, with a checkpoint written by rank 0 when asked."""
        metrics = {"step": self.step, "epoch": self.step / self.steps_per_epoch, **metrics}
        if not checkpoint:
            ray.train.report(metrics)
            return
        state = self.state()
        if self.writer is not None:
            self.writer.flush()
        with tempfile.TemporaryDirectory() as root:
            saved = None
            if self.rank == 0:
                folder = write_checkpoint(state, Path(root) / "checkpoint")
                saved = Checkpoint.from_directory(str(folder))
            ray.train.report(metrics, checkpoint=saved)

    def train_step(self, images: Tensor, labels: Tensor) -> dict[str, float] | None:
        """One optimisation step; None when it was skipped for a non-finite loss or gradient."""
        start = clock(self.device)
        with torch.autocast(self.device.type, enabled=self.amp):
            logits, out = self.model(images)
        ce = F.cross_entropy(logits.float(), labels)
        loss = ce + self.lambda_skip * out.skip_loss + self.cfg.train.lambda_jac * out.jac_loss
        middle = clock(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip or math.inf
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        finite = finite_everywhere(loss, grad_norm, self.device)
        if finite:
            self.scaler.step(self.optimizer)
            self.scheduler.step()
        self.scaler.update()
        end = clock(self.device)
        if not finite:
            return None
        stats = out.stats
        return {
            "train_loss": loss.item(),
            "train_accuracy": (logits.argmax(1) == labels).float().mean().item(),
            "nfe": float(stats.nfe),
            "backward_nvjp": float(stats.backward_nvjp),
            "forward_time": middle - start,
            "backward_time": end - middle,
            "skip_loss": float(out.skip_loss.detach()),
            "jac_loss": float(out.jac_loss.detach()),
            "residual": stats.residual.float().mean().item(),
            "unconverged_fraction": stats.unconverged_fraction,
            "images_per_second": len(labels) * self.world_size / (end - start),
        }

    def evaluate(self) -> dict[str, float]:
        """Test accuracy, NFE and prediction time per batch over every worker's test shard."""
        module = self.module
        module.eval()
        correct = total = nfe = seconds = batches = 0.0
        with torch.no_grad():
            for index, (images, labels) in enumerate(self.test_data):
                if self.cfg.train.eval_batches and index >= self.cfg.train.eval_batches:
                    break
                start = clock(self.device)
                with torch.autocast(self.device.type, enabled=self.amp):
                    logits, out = module(images)
                seconds += clock(self.device) - start
                correct += (logits.argmax(1) == labels).sum().item()
                total += len(labels)
                nfe += out.stats.nfe
                batches += 1
        module.train()
        correct, total, nfe, seconds, batches = all_sum(
            [correct, total, nfe, seconds, batches], self.device
        )
        return {
            "test_accuracy": correct / max(total, 1),
            "test_nfe": nfe / max(batches, 1),
            "predict_time": seconds / max(batches, 1),
        }

    def progress(self, metrics: dict[str, float]) -> None:
        """One line of progress on rank 0."""
        if self.rank != 0:
            return
        line = (
            f"[{self.cfg.name}] epoch {self.step / self.steps_per_epoch:.2f}/"
            f"{self.cfg.train.epochs} step {self.step}/{self.total_steps}"
        )
        shown = {"train_loss": "loss", "train_accuracy": "acc", "nfe": "nfe"}
        shown |= {"images_per_second": "img/s", "test_accuracy": "test_acc"}
        for key, label in shown.items():
            if key in metrics:
                line += f" {label} {metrics[key]:.4g}"
        log.info(line)

    def record(self, metrics: dict[str, float] | None) -> None:
        """Count a finished step and log its metrics; stop after too many skipped in a row."""
        self.step += 1
        if metrics is None:
            self.skipped_steps += 1
            self.nonfinite_in_row += 1
        else:
            self.nonfinite_in_row = 0
            self.meter.add(metrics)
            self.log(metrics | {"lr": self.scheduler.get_last_lr()[0]}, self.step)
        self.log({"skipped_steps": self.skipped_steps}, self.step)
        limit = self.cfg.train.max_nonfinite_steps
        if self.nonfinite_in_row >= limit:
            raise NonFiniteError(
                f"training stopped at step {self.step}: {limit} steps in a row had a non-finite "
                f"loss or gradient (train.max_nonfinite_steps={limit})"
            )

    def end_step(self) -> None:
        """Report at interval ends; evaluate and checkpoint at epoch ends and the last step."""
        cfg = self.cfg.train
        last = self.step % self.steps_per_epoch == 0 or self.step >= self.total_steps
        periodic = bool(cfg.checkpoint_every) and self.step % cfg.checkpoint_every == 0
        if not (last or periodic or self.step % cfg.report_every == 0):
            return
        summary = self.meter.means(STEP_METRICS, self.device)
        summary["skipped_steps"] = self.skipped_steps
        if last:
            tested = self.evaluate()
            self.log(tested, self.step)
            summary |= tested
        self.progress(summary)
        self.report(summary, checkpoint=last or periodic)

    def run(self) -> None:
        """Train from the current step to the end, reporting and checkpointing on the way."""
        if self.step >= self.total_steps:
            tested = self.evaluate()
            self.progress(tested)
            self.report({"skipped_steps": self.skipped_steps, **tested}, checkpoint=True)
        while self.step < self.total_steps:
            data.set_position(self.train_data, *divmod(self.step, self.steps_per_epoch))
            for images, labels in itertools.islice(self.train_data, self.total_steps - self.step):
                self.record(self.train_step(images, labels))
                self.end_step()
        if self.writer is not None:
            self.writer.close()


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: validate the config dict and run the loop."""
    Loop(validate(config)).run()


# Driver ----------------------------------------------------------------------------------------


def check_storage(path: str) -> None:
    """Create the storage folder and write a probe file to it, or raise a StorageError."""
    try:
        filesystem, root = pyarrow.fs.FileSystem.from_uri(path)
        filesystem.create_dir(root, recursive=True)
        probe = f"{root.rstrip('/')}/.write-test-{uuid.uuid4().hex}"
        with filesystem.open_output_stream(probe) as stream:
            stream.write(b"ok")
        filesystem.delete_file(probe)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0]
        raise StorageError(f"storage_path {path} is not writable: {reason}") from None


def check_model(cfg: Config) -> None:
    """Build the model and pass one blank image through its stem, or raise a ConfigError."""
    try:
        model = models.build(cfg.model_options())
    except ValueError as err:
        raise ConfigError(f"model: {str(err).splitlines()[0]}") from None
    shape = data.image_shape(cfg.data)
    try:
        with torch.no_grad():
            model.stem(torch.zeros(1, *shape))
    except RuntimeError as err:
        raise ConfigError(
            f"model: {cfg.model.model!r} does not fit {cfg.data.dataset!r} images of shape "
            f"{shape}: {str(err).splitlines()[0]}"
        ) from None


def connect() -> None:
    """Join the cluster RAY_ADDRESS names or the one running here, else start a local one."""
    if ray.is_initialized():
        return
    if "RAY_ADDRESS" in os.environ:
        ray.init()
        return
    try:
        ray.init(address="auto")
    except ConnectionError:
        ray.init()


def scaling_config(cfg: Config) -> ScalingConfig:
    """Workers from the config; GPUs when asked, or with `auto` when the cluster has them."""
    device = cfg.scaling.device
    use_gpu = device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    resources = {"CPU": cfg.scaling.cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    return ScalingConfig(
        num_workers=cfg.scaling.num_workers, use_gpu=use_gpu, resources_per_worker=resources
    )


def fit(
    cfg: Config,
    scaling: ScalingConfig | None = None,
    train_fn: Callable[[dict[str, Any]], None] = train_loop,
) -> Result:
    """Train or resume the run on Ray Train (`scaling`, `train_fn`: other workers or loop)."""
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=cfg.to_dict(),
        scaling_config=scaling or scaling_config(cfg),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
        ),
    )
    return trainer.fit()


def summary(result: Result, cfg: Config) -> str:
    """The final lines: test accuracy, steps and run folder, then the TensorBoard command."""
    metrics = result.metrics or {}
    tensorboard = os.path.join(cfg.run_dir, TENSORBOARD_DIR)
    return (
        f"test_accuracy={metrics.get('test_accuracy', math.nan):.4f} "
        f"steps={metrics.get('step', 0)} run={cfg.run_dir}\n"
        f"tensorboard --logdir {tensorboard}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (2 for bad input, 1 for a failed run)."""
    parser = argparse.ArgumentParser(
        prog="python -m raydeq.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("config", help="YAML config (a tune_configs/ experiment file works too)")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. optim.lr=3e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
        data.check_files(cfg.data)
        check_model(cfg)
        check_storage(cfg.storage_path)
    except (ConfigError, data.DataError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    connect()
    try:
        result = fit(cfg)
    except ray.train.TrainingFailedError as err:
        print(f"error: run {cfg.run_dir} failed: {err}", file=sys.stderr)
        return 1
    print(summary(result, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
