"""Discrete DEQ (Broyden, Anderson, fixed point) against continuous DEQ (VCAB3, Tsit5, Euler)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raydeq.bench.harness import models
from raydeq.bench.harness.cases import forward_case, raydeq_forward
from raydeq.bench.harness.context import Context
from raydeq.bench.harness.problems import SpectralProblem, Spectrum
from raydeq.bench.harness.report import MISSED, Section, Target
from raydeq.bench.harness.timing import measure, ratio


@dataclass(frozen=True)
class DiscreteSize:
    """The spectral problem, the model's batch of images, and the timed repeats."""

    spectrum: Spectrum
    batch: int
    repeats: int


SIZES = {
    "tiny": DiscreteSize(Spectrum(dim=32, batch=4, slow_eig=0.8), batch=8, repeats=1),
    "quick": DiscreteSize(Spectrum(dim=512, batch=64), batch=128, repeats=7),
    "full": DiscreteSize(Spectrum(dim=1024, batch=256), batch=256, repeats=15),
}
SOLVERS = ("fixed_point", "anderson", "broyden", "vcab3", "tsit5", "euler")
MODEL = "mnist_dense"
TOL = 1e-5


def spectral_rows(ctx: Context, size: DiscreteSize, section: Section) -> None:
    """Every solver on the spectral problem, and the NFE targets of Broyden and Anderson."""
    spec = size.spectrum
    problem = SpectralProblem(spec, ctx.device, torch.float32, ctx.seed)
    cases = {name: forward_case(problem, raydeq_forward(name, TOL, 3000)) for name in SOLVERS}
    timings = measure(cases, ctx.device, size.repeats, label="[discrete] timing the solvers")
    fixed_nfe = timings["fixed_point"].value.nfe
    for name in SOLVERS:
        outcome = timings[name].value
        section.add(
            problem="spectral",
            solver=name,
            NFE=outcome.nfe,
            **{
                "NFE / fixed point": ratio(outcome.nfe, fixed_nfe),
                "time ms": 1e3 * timings[name].median,
                "max residual": outcome.residual,
            },
        )
    # Both solves must reach the tolerance: a solver cut off short of it has not solved the
    # problem (FAIL), and a fixed point cut off at its step budget would divide by a budget,
    # not by the evaluations that reach the residual (n/a).
    fixed_residual = timings["fixed_point"].value.residual
    fixed_reached = fixed_residual <= TOL * 1.0001
    for name in ("broyden", "anderson"):
        outcome = timings[name].value
        detail = f"{outcome.nfe} vs {fixed_nfe} NFE, residual {outcome.residual:.2e}"
        if not fixed_reached:
            detail += f", fixed point's {fixed_residual:.2e}"
        if outcome.residual > TOL * 1.0001:
            measured = MISSED
        else:
            measured = ratio(outcome.nfe, fixed_nfe) if fixed_reached else float("nan")
        section.targets.append(
            Target(
                f"{name}: NFE / fixed-point NFE at the same residual", measured, 0.5, detail=detail
            )
        )
    section.notes.append(
        f"spectral: f(z) = W tanh(z) + x, width {spec.dim}, batch {spec.batch}, float32, "
        f"spectral radius of J_f(z*) {problem.spectral_radius():.3f} ({spec.slow} "
        f"eigenvalues of W near {spec.slow_eig}, the rest in [0, {spec.fast_max}]); "
        f"abstol {TOL:g} on the RMS residual, reltol 0; max residual = worst true RMS "
        "residual of the returned z."
    )
    section.timings |= {f"spectral/{k}": t.seconds for k, t in timings.items()}


def model_rows(ctx: Context, size: DiscreteSize, section: Section) -> None:
    """Every solver in the same untrained dense model, predicting one batch."""
    images, source = models.image_batch(MODEL, size.batch, ctx.device, ctx.data_dir, ctx.seed)
    nets = {s: models.build(MODEL, "vanilla", ctx.device, ctx.seed, solver=s) for s in SOLVERS}
    timings = measure(
        {s: models.predict_case(net, images) for s, net in nets.items()},
        ctx.device,
        size.repeats,
        label="[discrete] timing the models",
    )
    fixed_nfe = timings["fixed_point"].value.stats.nfe
    for name in SOLVERS:
        stats = timings[name].value.stats
        section.add(
            problem=MODEL,
            solver=name,
            NFE=stats.nfe,
            **{
                "NFE / fixed point": ratio(stats.nfe, fixed_nfe),
                "time ms": 1e3 * timings[name].median,
                "max residual": float(stats.residual.max()),
            },
        )
    section.notes.append(
        f"{MODEL}: untrained (seed {ctx.seed}), the same parameters for every solver, the "
        f"preset's tolerances, a batch of {len(images)} {source}, eval mode; time per batch."
    )
    section.timings |= {f"{MODEL}/{k}": t.seconds for k, t in timings.items()}


def run(ctx: Context) -> Section:
    """Forward NFE, time and true residual of each solver on the spectral problem and a model."""
    size = ctx.pick(SIZES)
    section = Section(
        name="discrete",
        title="Discrete vs continuous DEQ: forward solve",
        columns=["problem", "solver", "NFE", "NFE / fixed point", "time ms", "max residual"],
    )
    spectral_rows(ctx, size, section)
    model_rows(ctx, size, section)
    return section
