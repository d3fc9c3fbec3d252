"""Solver overhead: wall time per evaluation of f inside a solve against a bare call of f."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raydeq.bench.harness.cases import forward_case, raydeq_forward
from raydeq.bench.harness.context import Context
from raydeq.bench.harness.problems import SpectralProblem, Spectrum
from raydeq.bench.harness.report import Section, Target
from raydeq.bench.harness.timing import measure, paired_ratio


@dataclass(frozen=True)
class OverheadSize:
    """The spectral problem, the timed repeats, and the bare f calls timed together."""

    spectrum: Spectrum
    repeats: int
    calls: int


SIZES = {
    "tiny": OverheadSize(Spectrum(dim=32, batch=4, slow_eig=0.8), repeats=1, calls=5),
    "quick": OverheadSize(Spectrum(dim=512, batch=64), repeats=25, calls=20),
    "full": OverheadSize(Spectrum(dim=1024, batch=256), repeats=15, calls=20),
}
SOLVERS = ("fixed_point", "anderson", "broyden", "vcab3", "euler")
LIMITS = {"fixed_point": 1.5, "anderson": 2.5, "broyden": 2.5}
TOL = 1e-4


def run(ctx: Context) -> Section:
    """Time a bare f call and each solver's forward solve, and report time per NFE."""
    size = ctx.pick(SIZES)
    spec = size.spectrum
    problem = SpectralProblem(spec, ctx.device, torch.float32, ctx.seed)
    z = problem.exact_fixed_point()
    calls = size.calls

    def bare():
        def thunk() -> None:
            with torch.no_grad():
                for _ in range(calls):
                    problem.f(z)

        return thunk

    cases = {"f": bare} | {
        name: forward_case(problem, raydeq_forward(name, TOL, 2000)) for name in SOLVERS
    }
    timings = measure(cases, ctx.device, size.repeats, label="[overhead] timing")
    per_call = timings["f"].median / calls
    section = Section(
        name="overhead",
        title="Solver overhead per evaluation of f",
        columns=["solver", "NFE", "solve ms", "ms per NFE", "bare f ms", "ratio", "spread"],
        notes=[
            f"f(z) = W tanh(z) + x, width {spec.dim}, batch {spec.batch}, float32, no autograd; "
            f"abstol {TOL:g} on the RMS residual, reltol 0. ratio = (solve time / NFE) / (time "
            "of one bare f call), paired within rounds; spread = interquartile range / median "
            "of the solve times.",
        ],
        timings={name: t.seconds for name, t in timings.items()},
    )
    for name in SOLVERS:
        t = timings[name]
        nfe = t.value.nfe
        per_nfe = t.median / nfe
        # Time per NFE over time per bare call, paired within rounds like every time ratio.
        measured = paired_ratio(t, timings["f"]) * calls / nfe
        section.add(
            solver=name,
            NFE=nfe,
            **{
                "solve ms": 1e3 * t.median,
                "ms per NFE": 1e3 * per_nfe,
                "bare f ms": 1e3 * per_call,
                "ratio": measured,
                "spread": t.spread,
            },
        )
        if name in LIMITS:
            section.targets.append(
                Target(f"{name}: time per NFE / bare f call", measured, LIMITS[name])
            )
    return section
