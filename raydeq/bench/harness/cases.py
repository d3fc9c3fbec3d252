"""Timed cases on the spectral problem shared by the solver-level benchmarks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from raydeq import solve
from raydeq.bench.harness.problems import SpectralProblem, gradient_error
from raydeq.bench.harness.timing import After, Case


@dataclass
class Outcome:
    """What one run produced: evaluations of f, VJPs, the worst true residual, gradient error."""

    nfe: int = 0
    nvjp: int = 0
    residual: float = float("nan")
    error: float = float("nan")


def forward_case(
    problem: SpectralProblem, run: Callable[[Callable[[Tensor], Tensor], Tensor], Tensor]
) -> Case:
    """Time run(f, z0) -> z without autograd, z0 made before the clock starts; the outcome has
    NFE and the worst true residual, computed after the clock stops (it costs an evaluation
    of f)."""

    def prepare() -> Callable[[], After]:
        z0 = problem.z0()

        def thunk() -> After:
            problem.counter.reset()
            with torch.no_grad():
                z = run(problem.f, z0)
            nfe = problem.counter.nfe
            return After(lambda: Outcome(nfe, 0, float(problem.residual(z).max())))

        return thunk

    return prepare


def raydeq_forward(solver: str, tol: float, max_steps: int, **options: Any) -> Callable:
    """run(f, z0) for forward_case: raydeq.solve with an absolute RMS tolerance."""

    def run(f: Callable[[Tensor], Tensor], z0: Tensor) -> Tensor:
        return solve(
            f,
            z0,
            solver=solver,
            abstol=tol,
            reltol=0.0,
            max_steps=max_steps,
            solver_options=options,
        ).z

    return run


def backward_case(
    problem: SpectralProblem,
    forward: Callable[[], Tensor],
    cotangent: Tensor,
    reference: tuple[Tensor, Tensor],
) -> Case:
    """Time the backward pass of L = sum(cotangent * z*) after an untimed forward().

    The outcome has the VJPs through f and the evaluations of f made by the backward pass
    alone, and the relative error of (dL/dW, dL/dx) against the exact gradient, computed after
    the clock stops.
    """
    leaves = [problem.weight, problem.x]

    def prepare() -> Callable[[], After]:
        loss = (cotangent * forward()).sum()
        problem.counter.reset()

        def thunk() -> After:
            grads = torch.autograd.grad(loss, leaves)
            nfe, nvjp = problem.counter.nfe, problem.counter.nvjp
            return After(lambda: Outcome(nfe, nvjp, float("nan"), gradient_error(grads, reference)))

        return thunk

    return prepare


def raydeq_implicit(
    problem: SpectralProblem, adjoint: str, tol: float, forward_tol: float, max_iters: int
) -> Callable[[], Tensor]:
    """forward() for backward_case: a tight Anderson solve whose backward is `adjoint` at rtol."""

    def forward() -> Tensor:
        return solve(
            problem.f,
            problem.z0(),
            solver="anderson",
            adjoint=adjoint,
            abstol=forward_tol,
            reltol=0.0,
            max_steps=1000,
            adjoint_options={"rtol": tol, "max_iters": max_iters},
        ).z

    return forward


def loosest(
    tolerances: Iterable[float],
    evaluate: Callable[[float], Outcome],
    target: float,
    patience: int = 3,
) -> tuple[float | None, Outcome | None]:
    """The first tolerance (loosest first) whose outcome has error <= target, with that outcome.

    Gives up once `patience` tighter tolerances in a row have not lowered the error (a solver
    that stalls, e.g. at its iteration budget).
    """
    best, stalled = float("inf"), 0
    for tol in tolerances:
        outcome = evaluate(tol)
        if outcome.error <= target:
            return tol, outcome
        best, stalled = (outcome.error, 0) if outcome.error < best else (best, stalled + 1)
        if stalled >= patience:
            break
    return None, None
