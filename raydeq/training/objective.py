"""The training objective and the test evaluation, shared by training and the benchmarks.

Loss (the paper's, section 3): cross-entropy + lambda_skip * skip_loss + lambda_jac * jac_loss,
where skip_loss is |f(z*, x) - z0| for Skip and Skip Reg. DEQ and jac_loss the Hutchinson
estimate of ||J_f(z*)||_F^2 / dim (both 0 when the layer does not compute them).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import astuple, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydeq.deq import LayerOutput, widened
from raydeq.solvers.options import number
from raydeq.solvers.termination import Status

# Per-step training metrics, averaged over a report interval; *_time in seconds per batch
# (step_time: the whole step, data wait and warm-up steps included, for total training time).
STEP_METRICS = (
    "train_loss",
    "train_accuracy",
    "nfe",
    "backward_nvjp",
    "forward_time",
    "backward_time",
    "optimizer_time",
    "data_time",
    "step_time",
    "skip_loss",
    "jac_loss",
    "residual",
    "unconverged_fraction",
    "backward_unconverged_fraction",  # implicit adjoints only
    "images_per_second",
)
# Metrics of one evaluation on the test set.
TEST_METRICS = (
    "test_accuracy",
    "test_top5_accuracy",
    "test_nfe",
    "predict_time",
    "test_unconverged_fraction",
)


@dataclass(frozen=True)
class Objective:
    """The loss of a classifier's output: `Objective(lambda_skip, lambda_jac)(logits, y, out)`."""

    lambda_skip: float
    lambda_jac: float = 0.0

    def __post_init__(self) -> None:
        """Refuse a weight that is no finite number >= 0: a negative one rewards the distance
        it should shrink (z0 from z*, or a large Jacobian) and NaN makes every loss NaN."""
        number("lambda_skip", self.lambda_skip)
        number("lambda_jac", self.lambda_jac)

    def __call__(self, logits: Tensor, labels: Tensor, out: LayerOutput) -> Tensor:
        """Cross-entropy (in float32 under autocast, float64 for a float64 model) plus the
        weighted layer losses; a Jacobian term of weight 0 is left out, as its gradient would
        cost a double backward for nothing (and an infinite estimate would make the loss NaN)."""
        loss = F.cross_entropy(widened(logits), labels) + self.lambda_skip * out.skip_loss
        return loss + self.lambda_jac * out.jac_loss if self.lambda_jac else loss


def clock(device: torch.device) -> float:
    """Seconds on a monotonic clock, after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Evaluation:
    """Sums over test batches, so that workers' shares add up before the means are taken."""

    correct: float = 0.0
    correct_top5: float = 0.0
    samples: float = 0.0
    nfe: float = 0.0
    seconds: float = 0.0
    batches: float = 0.0
    unconverged: float = 0.0

    def totals(self) -> list[float]:
        """The sums as a list (for an all-reduce)."""
        return list(astuple(self))

    def metrics(self) -> dict[str, float]:
        """Test accuracy (top-1 and top-5), mean NFE and prediction seconds per batch, and the
        fraction of test samples whose solve ended without converging (`failed`)."""
        samples, batches = max(self.samples, 1.0), max(self.batches, 1.0)
        values = (self.correct / samples, self.correct_top5 / samples)
        values += (self.nfe / batches, self.seconds / batches, self.unconverged / samples)
        return dict(zip(TEST_METRICS, values, strict=True))


def failed(status: Tensor) -> Tensor:
    """Which samples' solves ended without converging: max_steps, diverged or non-finite, not
    a Neural ODE's z(t1), which no solve to a tolerance reached (Status.UNSOLVED)."""
    return (status != int(Status.CONVERGED)) & (status != int(Status.UNSOLVED))


def top_hits(logits: Tensor, labels: Tensor) -> Tensor:
    """(batch, k) booleans: whether each sample's label is its i-th largest logit, of the five
    largest (or all classes, if fewer); a sample whose logits hold a NaN hits none, where topk
    ranks NaN above every number and so named its classes as predictions."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]) & ~logits.isnan().any(1, keepdim=True)


def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    autocast: AbstractContextManager | None = None,
) -> Evaluation:
    """Predict every batch in eval mode (no gradients) and sum the test statistics."""
    totals = Evaluation()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for images, labels in batches:
            start = clock(device)
            with autocast or nullcontext():
                logits, out = model(images)
            totals.seconds += clock(device) - start
            hits = top_hits(logits, labels)
            totals.correct += hits[:, 0].sum().item()
            totals.correct_top5 += hits.any(1).sum().item()
            totals.samples += len(labels)
            totals.nfe += out.stats.nfe
            totals.unconverged += failed(out.stats.status).sum().item()
            totals.batches += 1
    model.train(was_training)
    return totals
