"""raydeq against TorchDEQ (the PyTorch DEQ library) on the same f and tolerance."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from raydeq.bench.harness.cases import (
    Outcome,
    forward_case,
    raydeq_forward,
    raydeq_implicit,
)
from raydeq.bench.harness.context import Context
from raydeq.bench.harness.gradients import FORWARD_TOL, TARGET_ERROR, GradientSetup, no_float64
from raydeq.bench.harness.problems import SpectralProblem, Spectrum, has_float64
from raydeq.bench.harness.report import MISSED, Section, Target
from raydeq.bench.harness.timing import Timing, measure, paired_ratio


@dataclass(frozen=True)
class TorchDEQSize:
    """The spectral problems of the forward and of the backward comparison, timed repeats."""

    forward: Spectrum
    backward: Spectrum
    repeats: int


SIZES = {
    "tiny": TorchDEQSize(
        forward=Spectrum(dim=32, batch=4, slow_eig=0.8),
        backward=Spectrum(dim=16, batch=2, slow_eig=0.8),
        repeats=1,
    ),
    "quick": TorchDEQSize(
        forward=Spectrum(dim=512, batch=64), backward=Spectrum(dim=256, batch=32), repeats=7
    ),
    "full": TorchDEQSize(
        forward=Spectrum(dim=1024, batch=256), backward=Spectrum(dim=1024, batch=64), repeats=15
    ),
}
TOL = 1e-5
MEMORY = 5
BROYDEN_MEMORY = 30
# solver name in raydeq -> (name in TorchDEQ, raydeq options, TorchDEQ options, step budget)
FORWARD = {
    "fixed_point": ("fixed_point_iter", {}, {}, 3000),
    "anderson": ("anderson", {"m": MEMORY}, {"m": MEMORY}, 200),
    "broyden": ("broyden", {"memory": BROYDEN_MEMORY}, {"LBFGS_thres": BROYDEN_MEMORY}, 200),
}
# TorchDEQ backward solvers and their iteration budgets
BACKWARD = {"fixed_point_iter": 1000, "anderson": 200, "broyden": 200}
# TorchDEQ adds its Anderson regularisation lam to G G^T as it is, where raydeq scales its lam
# (1e-4) by the mean of G G^T's diagonal. Near the tolerance G G^T is about width x TOL^2
# (5e-8 at the quick size), so TorchDEQ's default of 1e-4 outweighs it and its mixing averages
# the last m iterates: its forward ran out of its 200 iterations there, where 1e-12 takes 11.
# Its Anderson runs at each of these lams, its default first; the targets take its fastest.
ANDERSON_LAMS = (1e-4, 1e-8, 1e-12)
MISSING = "TorchDEQ is not installed (pip install -e '.[bench]'); its rows are skipped"
FORWARD_TARGET = "forward: raydeq best / TorchDEQ best time"
BACKWARD_TARGET = f"backward at gradient error {TARGET_ERROR:g}: raydeq GMRES / TorchDEQ best time"


def available() -> bool:
    """Whether the torchdeq package can be imported."""
    return importlib.util.find_spec("torchdeq") is not None


def torchdeq_methods(solver: str, options: dict) -> dict[str, dict]:
    """A TorchDEQ solver's rows, by method name, and their options: Anderson's one per lam."""
    if solver != "anderson":
        return {solver: options}
    return {f"anderson lam={lam:g}": options | {"lam": lam} for lam in ANDERSON_LAMS}


def torchdeq_forward(name: str, tol: float, max_iter: int, **options) -> Callable:
    """run(f, z0) for forward_case: a TorchDEQ solver with its 'abs' (2-norm) stopping test."""
    from torchdeq.solver import get_solver

    solver = get_solver(name)

    def run(f: Callable[[Tensor], Tensor], z0: Tensor) -> Tensor:
        return solver(f, z0, max_iter=max_iter, tol=tol, stop_mode="abs", **options)[0]

    return run


def torchdeq_implicit(
    problem: SpectralProblem, b_solver: str, tol: float, max_iter: int, **options: float
) -> Callable[[], Tensor]:
    """forward() for backward_case: TorchDEQ's DEQ with implicit (IFT) backward by b_solver."""
    from torchdeq import get_deq

    if options:  # get_deq passes a backward solver its budget and tolerance alone
        from torchdeq.solver import get_solver, register_solver

        name = " ".join([b_solver, *(f"{key}={value:g}" for key, value in options.items())])
        register_solver(name, partial(get_solver(b_solver), **options))
        b_solver = name
    norm = problem.spec.dim**0.5
    deq = get_deq(
        core="indexing",
        ift=True,
        # The untimed forward must meet FORWARD_TOL as raydeq's does: TorchDEQ's Anderson, whose
        # lam (1e-4) is added to G G^T as it is and outweighs it near 1e-9, stopped at its 1,000
        # iterations at an RMS residual of 2.7e-8 at the quick size; Broyden meets it in 36.
        f_solver="broyden",
        f_max_iter=1000,
        f_tol=FORWARD_TOL * norm,
        b_solver=b_solver,
        b_max_iter=max_iter,
        b_tol=tol * norm,
    )
    deq.train()

    def forward() -> Tensor:
        return deq(problem.f, problem.z0())[0][-1]

    return forward


def forward_rows(ctx: Context, spec: Spectrum, repeats: int, section: Section) -> None:
    """Forward solves of both libraries at the same tolerance: time, NFE, true residual."""
    problem = SpectralProblem(spec, ctx.device, torch.float32, ctx.seed)
    norm = spec.dim**0.5
    cases = {}
    for name, (peer, ours, theirs, budget) in FORWARD.items():
        cases[f"raydeq {name}"] = forward_case(problem, raydeq_forward(name, TOL, budget, **ours))
        for method, options in torchdeq_methods(peer, theirs).items():
            cases[f"torchdeq {method}"] = forward_case(
                problem, torchdeq_forward(peer, TOL * norm, budget, **options)
            )
    timings = measure(cases, ctx.device, repeats, label="[torchdeq] timing the forwards")
    for label, t in timings.items():
        outcome = t.value
        library, method = label.split(" ", 1)
        section.add(
            library=library,
            part="forward",
            method=method,
            NFE=outcome.nfe,
            **{"time ms": 1e3 * t.median, "max residual": outcome.residual},
        )
    ours_best, theirs_best = best(timings, "raydeq", TOL), best(timings, "torchdeq", TOL)
    if ours_best is None:
        measured, detail = MISSED, f"no raydeq solver met the residual {TOL:g}"
    elif theirs_best is None:
        measured, detail = None, f"no TorchDEQ solver met the residual {TOL:g}"
    else:
        measured = paired_ratio(timings[ours_best], timings[theirs_best])
        detail = f"{ours_best} vs {theirs_best}"
    section.targets.append(Target(FORWARD_TARGET, measured, 0.5, detail=detail))
    section.timings |= {f"forward/{k}": t.seconds for k, t in timings.items()}
    section.notes.append(
        f"forward: f(z) = W tanh(z) + x, width {spec.dim}, batch {spec.batch}, float32; RMS "
        f"residual {TOL:g} (TorchDEQ's 'abs' test on the 2-norm at {TOL:g} x sqrt(width)); "
        f"Anderson memory {MEMORY}, Broyden memory {BROYDEN_MEMORY} on both sides, TorchDEQ's "
        f"Anderson at lam {', '.join(f'{lam:g}' for lam in ANDERSON_LAMS)} (its default first: "
        "its lam is added to G G^T as it is, raydeq's is relative to its diagonal's mean); max "
        "residual = worst true RMS residual of the returned z."
    )


def best(timings: dict[str, Timing], library: str, tol: float) -> str | None:
    """The fastest (by median) case of a library among those whose worst residual meets
    tol * 1.01."""
    labels = [
        label
        for label, t in timings.items()
        if label.startswith(library) and t.value.residual <= tol * 1.01
    ]
    return min(labels, key=lambda label: timings[label].median) if labels else None


def backward_rows(ctx: Context, spec: Spectrum, repeats: int, section: Section) -> None:
    """Implicit backward passes of both libraries at the same gradient error; a note instead
    of rows on a device without float64."""
    if not has_float64(ctx.device):
        skipped = "backward: " + no_float64(ctx.device)
        section.notes.append(skipped)
        section.targets.append(Target(BACKWARD_TARGET, None, 0.3, detail=skipped))
        return
    setup = GradientSetup.make(ctx, spec)
    problem = setup.problem
    makers = {"raydeq gmres": lambda tol: raydeq_implicit(problem, "gmres", tol, FORWARD_TOL, 200)}
    for b_solver, budget in BACKWARD.items():
        for method, options in torchdeq_methods(b_solver, {}).items():
            makers[f"torchdeq {method}"] = lambda tol, s=b_solver, n=budget, o=options: (
                torchdeq_implicit(problem, s, tol, n, **o)
            )

    chosen = setup.tolerances(makers, ctx.device, "torchdeq")
    section.notes += [
        f"{label} backward did not reach error {TARGET_ERROR:g}"
        for label in makers
        if label not in chosen
    ]
    timings = measure(
        {k: setup.case(makers[k](tol)) for k, tol in chosen.items()},
        ctx.device,
        repeats,
        label="[torchdeq] timing the backwards",
    )
    for label, t in timings.items():
        outcome: Outcome = t.value
        library, method = label.split(" ", 1)
        section.add(
            library=library,
            part="backward",
            method=method,
            tol=chosen[label],
            NFE=outcome.nfe,
            VJPs=outcome.nvjp,
            **{"time ms": 1e3 * t.median, "gradient error": outcome.error},
        )
    ours = timings.get("raydeq gmres")
    theirs = [k for k in timings if k.startswith("torchdeq")]
    peer = min(theirs, key=lambda label: timings[label].median) if theirs else None
    if ours is None:
        measured, detail = MISSED, "raydeq GMRES reached no tolerance"
    elif peer is None:
        measured, detail = None, "TorchDEQ reached no tolerance"
    else:
        measured, detail = paired_ratio(ours, timings[peer]), f"vs {peer}"
    section.targets.append(Target(BACKWARD_TARGET, measured, 0.3, detail=detail))
    section.timings |= {f"backward/{k}": t.seconds for k, t in timings.items()}
    section.notes.append(
        "backward: " + setup.note() + " TorchDEQ: get_deq(core='indexing', ift=True), its "
        "forward by Broyden to the same residual, its b_tol on the 2-norm at tol x sqrt(width), "
        "its Anderson at each lam of the forward; NFE = evaluations of f during backward."
    )


def run(ctx: Context) -> Section:
    """Forward and backward comparison; a note instead of rows when TorchDEQ is missing."""
    size = ctx.pick(SIZES)
    section = Section(
        name="torchdeq",
        title="raydeq vs TorchDEQ",
        columns=[
            "library",
            "part",
            "method",
            "tol",
            "NFE",
            "VJPs",
            "time ms",
            "max residual",
            "gradient error",
        ],
    )
    if not available():
        section.notes.append(MISSING)
        section.targets += [
            Target(FORWARD_TARGET, None, 0.5, detail=MISSING),
            Target(BACKWARD_TARGET, None, 0.3, detail=MISSING),
        ]
        return section
    forward_rows(ctx, size.forward, size.repeats, section)
    backward_rows(ctx, size.backward, size.repeats, section)
    return section
