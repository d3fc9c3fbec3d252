"""Training-step time of the paper's presets against the GPU targets of the solver-speed work.

One step is forward, loss, backward (the implicit GMRES adjoint) and an Adam step, timed with
the preset's own solver and adjoint settings: dense MNIST as a vanilla DEQ in float32 and the
large CIFAR-10 MDEQ as a Skip Reg. DEQ under bfloat16 autocast, as `train.amp: bf16` runs it.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from raydeq.bench.harness import models
from raydeq.bench.harness.context import Context
from raydeq.bench.harness.report import Section, Target, error_line
from raydeq.bench.harness.timing import Case, Timing, measure
from raydeq.bench.harness.training import step_case
from raydeq.bench.suites.node import trained_deq
from raydeq.models import EquilibriumClassifier
from raydeq.solvers.solve import GRAPH


@dataclass(frozen=True)
class TrainStepSize:
    """Timed batch per preset, interleaved repeats and untimed warm-up rounds, and whether a
    compile=True row is timed on a CPU (its first call there compiles for about 13 s)."""

    batches: Mapping[str, int]
    repeats: int
    warmup: int
    compile_on_cpu: bool = True


@dataclass(frozen=True)
class Workload:
    """A preset, its layer variant and autocast dtype on a GPU, the GPU limit of its step and
    the batch that limit is set for, and the layer's compile= (True: torch.compile, CUDA
    graphs on a GPU; "graph": each solve's step recorded as a CUDA graph and replayed)."""

    model: str
    variant: str
    label: str
    amp: torch.dtype | None
    limit_ms: float
    compile: bool | str = False

    @property
    def limit_batch(self) -> int:
        """The batch its limit is set for: the full size's, which the limits were set at."""
        return SIZES["full"].batches[self.model]

    @property
    def key(self) -> str:
        """The workload's name among the timed cases."""
        if self.compile == GRAPH:
            return f"{self.model}/graph"
        return f"{self.model}/compiled" if self.compile else self.model


# Three untimed rounds (warmup=3): torch.compile's mode "reduce-overhead" compiles on the first
# call and records its CUDA graphs on a later one.
SIZES = {
    "tiny": TrainStepSize(
        batches={"mnist_dense": 2, "cifar10_large": 2}, repeats=1, warmup=0, compile_on_cpu=False
    ),
    "quick": TrainStepSize(batches={"mnist_dense": 256, "cifar10_large": 2}, repeats=5, warmup=3),
    "full": TrainStepSize(batches={"mnist_dense": 256, "cifar10_large": 128}, repeats=9, warmup=3),
}
# The GPU limits of a step (limit_ms at limit_batch), for one NVIDIA H100 or H200.
WORKLOADS = (
    Workload("mnist_dense", "vanilla", "continuous DEQ (VCAB3, GMRES)", None, 10.0),
    Workload(
        "mnist_dense",
        "vanilla",
        "continuous DEQ (VCAB3, GMRES), compile=True",
        None,
        10.0,
        compile=True,
    ),
    Workload(
        "mnist_dense",
        "vanilla",
        'continuous DEQ (VCAB3, GMRES), compile="graph"',
        None,
        10.0,
        compile=GRAPH,
    ),
    Workload(
        "cifar10_large",
        "skip_reg",
        "Skip Reg. continuous DEQ (VCAB3, GMRES)",
        torch.bfloat16,
        150.0,
    ),
)

COLUMNS = (
    "model",
    "variant",
    "batch",
    "dtype",
    "NFE",
    "converged",
    "VJPs",
    "train step ms",
    "GPU limit ms",
)


def amp_on(workload: Workload, device: torch.device) -> torch.dtype | None:
    """The autocast dtype on `device`: the workload's on a GPU, none elsewhere.

    A CPU without bfloat16 units emulates it: the cifar10_large step at batch 1 takes 18 s
    under bfloat16 autocast and 1.7 s in float32 on one core of an AMD EPYC without AVX512-BF16.
    """
    return workload.amp if device.type == "cuda" else None


def runs_on(workload: Workload, device: torch.device, size: TrainStepSize) -> bool:
    """Whether the workload is timed on `device` at `size`: a compiled one on a CPU only where
    the size says so (torch.compile's C++ kernels there, CUDA graphs on a GPU), a graph one
    on a GPU only (a CPU runs its steps eagerly)."""
    if workload.compile == GRAPH:
        return device.type == "cuda"
    return not workload.compile or device.type == "cuda" or size.compile_on_cpu


def timed_model(
    ctx: Context, workload: Workload, digits: bool, trained: dict[str, tuple[dict, str]]
) -> tuple[EquilibriumClassifier, str]:
    """The preset as the workload's variant with the preset's solver and adjoint settings, and
    a description of its weights: mnist_dense takes those of node's trained DEQ (trained when
    its inputs are digits, or a --weights checkpoint; once, kept in `trained`), cifar10_large
    those of its --weights checkpoint, else it stays untrained."""
    model = models.build(
        workload.model, workload.variant, ctx.device, ctx.seed, compile=workload.compile
    )
    if workload.model != "mnist_dense":
        checkpoint = ctx.weights.get(workload.model)
        if checkpoint is None:
            return model, models.UNTRAINED
        return model, models.load_checkpoint(model, checkpoint)
    if workload.model not in trained:
        deq, weights = trained_deq(ctx, workload.model, digits, suite="train_step")
        trained[workload.model] = deq.state_dict(), weights
    state, weights = trained[workload.model]
    model.load_state_dict(state)
    return model, weights


def case(
    model: EquilibriumClassifier, images: torch.Tensor, amp: torch.dtype | None, name: str
) -> Case:
    """One training step of `model` on `images` under the preset's objective."""
    labels = torch.arange(len(images), device=images.device) % 10
    return step_case(model, models.preset_objective(name), images, labels, amp)


def add_row(
    ctx: Context, section: Section, workload: Workload, batch: int, timing: Timing | str
) -> None:
    """The workload's row and its target, measured on a GPU at the batch its limit is set for
    only (the limits are GPU ones, each for one batch); `timing` is the error of a workload
    that failed, which fails its target."""
    amp = amp_on(workload, ctx.device)
    dtype = "float32" if amp is None else f"{str(amp).removeprefix('torch.')} autocast"
    name = f"{workload.key} ({workload.variant}) training step ms at batch {batch}"
    row = dict(model=workload.model, variant=workload.label, batch=batch, dtype=dtype)
    if isinstance(timing, str):
        section.add(**row, **{"GPU limit ms": workload.limit_ms})
        section.targets.append(Target(name, math.inf, workload.limit_ms, detail=timing))
        return
    out = timing.value
    ms = 1e3 * timing.median
    section.add(
        **row,
        NFE=out.stats.nfe,
        converged=1 - out.stats.unconverged_fraction,
        VJPs=out.stats.backward_nvjp,
        **{"train step ms": ms, "GPU limit ms": workload.limit_ms},
    )
    if ctx.device.type != "cuda":
        unchecked = f"a GPU limit, not checked on {ctx.device.type}"
    elif batch != workload.limit_batch:
        unchecked = f"the limit is for batch {workload.limit_batch}, not checked at batch {batch}"
    else:
        detail = f"NFE {out.stats.nfe}, VJPs {out.stats.backward_nvjp}"
        section.targets.append(Target(name, ms, workload.limit_ms, detail=detail))
        return
    detail = f"{unchecked} (time in the table)"
    section.targets.append(Target(name, None, workload.limit_ms, detail=detail))


def measure_apart(
    cases: dict[str, Case], device: torch.device, size: TrainStepSize
) -> Timing | str:
    """Time one case on its own, each round said on stderr; the error, in one line, if it
    fails (a compiled step whose capture fails on this GPU or torch must not lose the eager
    rows)."""
    label = f"[train_step] timing {', '.join(cases)}"
    try:
        return measure(cases, device, size.repeats, size.warmup, label).popitem()[1]
    except Exception as err:  # reported in the row's target
        traceback.print_exc()
        return f"failed: {error_line(err)}"


def run(ctx: Context) -> Section:
    """Time a training step of each workload: the eager ones interleaved, each compiled one
    after them on its own."""
    size = ctx.pick(SIZES)
    limit_batches = " and ".join(f"{b} ({m})" for m, b in SIZES["full"].batches.items())
    section = Section(
        name="train_step",
        title="Training step against the GPU targets",
        columns=list(COLUMNS),
        notes=[
            "train step = forward, loss (cross-entropy in float32, plus the preset's lambda_skip "
            "times the skip loss), backward and an Adam step (learning rate 0, so every repeat "
            "sees the same parameters), in training mode, with each preset's tolerances, "
            "max_steps and GMRES limits; NFE = forward evaluations of f, converged = fraction "
            "of samples whose forward met the tolerance, VJPs = vector-Jacobian products of the "
            "backward. The limits are the targets for one NVIDIA H100 or H200 at batch "
            f"{limit_batches}, the full size's, and are checked only on a CUDA device (the "
            "machine is in the header) at that batch; elsewhere the targets read n/a and the "
            "table holds the time. cifar10_large runs under bfloat16 autocast "
            "on a GPU and in float32 on a CPU (one without bfloat16 units runs it about 10x "
            "slower in bfloat16).",
        ],
    )
    cases: dict[str, Case] = {}
    trained: dict[str, tuple[dict, str]] = {}
    workloads = [w for w in WORKLOADS if runs_on(w, ctx.device, size)]
    for workload in workloads:
        batch = size.batches[workload.model]
        images, source = models.image_batch(
            workload.model, batch, ctx.device, ctx.data_dir, ctx.seed
        )
        digits = source == models.DIGITS
        model, weights = timed_model(ctx, workload, digits, trained)
        cases[workload.key] = case(model, images, amp_on(workload, ctx.device), workload.model)
        section.notes.append(f"{workload.key}: batch of {batch} {source}, {weights}.")
        if weights == models.UNTRAINED:
            section.notes.append(
                f"{workload.model} is untrained: at initialisation its f has no attracting "
                "equilibrium, so its forward stops at max_steps (converged 0) and its time is "
                "that of a step at the NFE shown."
            )
    if any(w.compile for w in workloads):
        section.notes.append(
            "The compile= rows are timed after the others, each on its own; where a capture "
            "fails, the row's target names the error and fails."
        )
    if ctx.device.type != "cuda":
        section.notes.append(
            'The compile="graph" row runs on a GPU only (a CPU has no CUDA graphs)'
            + (
                "; the compile=True row is not timed on a CPU at this size (its first call "
                "compiles for about 13 s)."
                if not size.compile_on_cpu
                else "."
            )
        )
    eager = {w.key: cases[w.key] for w in workloads if not w.compile}
    timings: dict[str, Timing | str] = dict(
        measure(eager, ctx.device, size.repeats, size.warmup, "[train_step] timing")
    )
    for workload in workloads:
        if workload.compile:
            timings[workload.key] = measure_apart(
                {workload.key: cases[workload.key]}, ctx.device, size
            )
    for workload in workloads:
        add_row(ctx, section, workload, size.batches[workload.model], timings[workload.key])
    section.timings |= {n: t.seconds for n, t in timings.items() if isinstance(t, Timing)}
    return section
