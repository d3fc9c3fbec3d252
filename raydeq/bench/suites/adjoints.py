"""Implicit backward: GMRES against Neumann (fixed-point) iteration at equal gradient error."""

from __future__ import annotations

from dataclasses import dataclass

from raydeq.bench.harness.cases import Outcome, raydeq_implicit
from raydeq.bench.harness.context import Context
from raydeq.bench.harness.gradients import FORWARD_TOL, TARGET_ERROR, GradientSetup, no_float64
from raydeq.bench.harness.problems import Spectrum, has_float64
from raydeq.bench.harness.report import MISSED, Section, Target
from raydeq.bench.harness.timing import measure, ratio


@dataclass(frozen=True)
class AdjointsSize:
    """The float64 spectral problem and the timed repeats."""

    spectrum: Spectrum
    repeats: int


SIZES = {
    "tiny": AdjointsSize(Spectrum(dim=32, batch=4, slow_eig=0.8), repeats=1),
    "quick": AdjointsSize(Spectrum(dim=256, batch=32), repeats=7),
    "full": AdjointsSize(Spectrum(dim=1024, batch=128), repeats=15),
}
ADJOINTS = {"gmres": "GMRES", "fixed_point": "Neumann"}
MAX_ITERS = 2000
TARGET = f"GMRES VJPs / Neumann VJPs at error {TARGET_ERROR:g}"
TITLE = f"Implicit backward: GMRES vs Neumann to gradient error {TARGET_ERROR:g}"
COLUMNS = ["adjoint", "rtol", "VJPs", "gradient error", "backward ms"]


def run(ctx: Context) -> Section:
    """VJPs and backward time of each adjoint at the loosest tolerance reaching the target."""
    size = ctx.pick(SIZES)
    if not has_float64(ctx.device):
        skipped = no_float64(ctx.device)
        targets = [Target(TARGET, None, 0.5, detail=skipped)]
        return Section("adjoints", TITLE, COLUMNS, targets=targets, notes=[skipped])
    setup = GradientSetup.make(ctx, size.spectrum)
    section = Section(name="adjoints", title=TITLE, columns=COLUMNS, notes=[setup.note()])

    makers = {
        adjoint: lambda tol, a=adjoint: raydeq_implicit(
            setup.problem, a, tol, FORWARD_TOL, MAX_ITERS
        )
        for adjoint in ADJOINTS
    }
    chosen = setup.tolerances(makers, ctx.device, "adjoints")
    section.notes += [
        f"{label} did not reach {TARGET_ERROR:g} at any tolerance"
        for adjoint, label in ADJOINTS.items()
        if adjoint not in chosen
    ]
    timings = measure(
        {a: setup.case(makers[a](tol)) for a, tol in chosen.items()},
        ctx.device,
        repeats=size.repeats,
        label="[adjoints] timing",
    )
    outcomes: dict[str, Outcome] = {}
    for adjoint, t in timings.items():
        outcomes[adjoint] = outcome = t.value
        section.add(
            adjoint=ADJOINTS[adjoint],
            rtol=chosen[adjoint],
            VJPs=outcome.nvjp,
            **{"gradient error": outcome.error, "backward ms": 1e3 * t.median},
        )
    gmres, neumann = outcomes.get("gmres"), outcomes.get("fixed_point")
    if gmres is None:
        measured, detail = MISSED, "GMRES not reached"
    elif neumann is None:
        measured, detail = None, "Neumann not reached"
    else:
        measured, detail = ratio(gmres.nvjp, neumann.nvjp), f"{gmres.nvjp} vs {neumann.nvjp} VJPs"
    section.targets.append(Target(TARGET, measured, 0.5, detail=detail))
    section.timings = {name: t.seconds for name, t in timings.items()}
    return section
