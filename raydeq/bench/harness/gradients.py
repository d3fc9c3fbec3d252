"""The gradient-accuracy set-up shared by the adjoint and TorchDEQ comparisons."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from raydeq.bench.harness.cases import backward_case, loosest
from raydeq.bench.harness.context import Context
from raydeq.bench.harness.problems import SpectralProblem, Spectrum
from raydeq.bench.harness.timing import Case, part_line, time_call
from raydeq.training.console import Progress

TARGET_ERROR = 1e-4
FORWARD_TOL = 1e-9
TOLERANCES = (1e-2, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7, 1e-8)


def no_float64(device: torch.device) -> str:
    """Why the gradient comparisons are skipped on `device`, one without float64 (MPS)."""
    return (
        f"skipped on {device}: it has no float64, which these gradient comparisons run in (a "
        f"forward solved to RMS residual {FORWARD_TOL:g}, gradient errors to {TARGET_ERROR:g}); "
        "run them with --device cpu"
    )


@dataclass
class GradientSetup:
    """A float64 spectral problem with trainable W and x, a cotangent and the exact gradient."""

    problem: SpectralProblem
    cotangent: Tensor
    reference: tuple[Tensor, Tensor]

    @staticmethod
    def make(ctx: Context, spectrum: Spectrum) -> GradientSetup:
        """Build it for the run's device and seed."""
        problem = SpectralProblem(spectrum, ctx.device, torch.float64, ctx.seed)
        g = torch.Generator().manual_seed(ctx.seed + 1)
        cotangent = torch.randn(spectrum.batch, spectrum.dim, generator=g, dtype=torch.float64)
        cotangent = cotangent.to(ctx.device)
        reference = problem.exact_gradient(cotangent)
        problem.weight.requires_grad_(True)
        problem.x.requires_grad_(True)
        return GradientSetup(problem, cotangent, reference)

    def case(self, forward: Callable[[], Tensor]) -> Case:
        """The timed backward of L = sum(c * z*) after an untimed forward(), with its error
        against the exact gradient (backward_case)."""
        return backward_case(self.problem, forward, self.cotangent, self.reference)

    def tolerances(
        self,
        makers: Mapping[str, Callable[[float], Callable[[], Tensor]]],
        device: torch.device,
        suite: str,
    ) -> dict[str, float]:
        """Per label, the loosest of TOLERANCES at which the backward after makers[label](tol)()
        reaches TARGET_ERROR (see `loosest`); a label that reaches it at none is left out. Each
        label's search is a part of the `suite` said as it begins (TorchDEQ's took minutes), and
        each tolerance it tries 5 s or more after the line before (`console.Progress`)."""
        chosen = {}
        for number, (label, make) in enumerate(makers.items(), 1):
            what = f"[{suite}] choosing {label}'s tolerance for gradient error {TARGET_ERROR:g}"
            part_line(what, number, len(makers))
            # A search may stop before its last tolerance, so its time left is not said.
            tried = Progress(what, len(TOLERANCES), eta=False).over(TOLERANCES)
            tol, _ = loosest(
                tried, lambda t, m=make: time_call(self.case(m(t))(), device)[1], TARGET_ERROR
            )
            if tol is not None:
                chosen[label] = tol
        return chosen

    def note(self) -> str:
        """How the gradient errors are measured."""
        spec = self.problem.spec
        return (
            f"gradients of L = sum(c * z*) w.r.t. W and x for f(z) = W tanh(z) + x (width "
            f"{spec.dim}, batch {spec.batch}, float64, spectral radius of J_f(z*) "
            f"{self.problem.spectral_radius():.3f}); forward solved to RMS residual "
            f"{FORWARD_TOL:g}; error = ||g - g_exact|| / ||g_exact|| with g_exact from dense "
            f"per-sample solves; each backward runs at the loosest tolerance of "
            f"{', '.join(f'{t:g}' for t in TOLERANCES)} that reaches error {TARGET_ERROR:g}."
        )
