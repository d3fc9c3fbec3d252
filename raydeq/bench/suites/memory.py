"""Peak memory of a training step: implicit backward against backpropagation through the solver."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raydeq import solve
from raydeq.bench.harness.context import Context
from raydeq.bench.harness.memory import peak_memory
from raydeq.bench.harness.problems import SpectralProblem, Spectrum
from raydeq.bench.harness.report import Section
from raydeq.bench.harness.timing import part_line, ratio


@dataclass(frozen=True)
class MemorySize:
    """Width; batches at a fixed tolerance; the batch and tolerances of the depth sweep."""

    dim: int
    batches: tuple[int, ...]
    batch: int
    tols: tuple[float, ...]
    slow_eig: float = 0.97


DEPTH_TOLS = (1e-2, 1e-3, 1e-4, 1e-5)
SIZES = {
    "tiny": MemorySize(dim=16, batches=(2, 4), batch=2, tols=(1e-2, 1e-3), slow_eig=0.8),
    "quick": MemorySize(dim=256, batches=(16, 64, 256), batch=64, tols=DEPTH_TOLS),
    "full": MemorySize(dim=1024, batches=(16, 64, 256, 1024), batch=256, tols=DEPTH_TOLS),
}
ADJOINTS = {"gmres": "implicit (GMRES)", "unrolled": "unrolled"}
SOLVER = "vcab3"
TOL = 1e-4


def step(problem: SpectralProblem, adjoint: str, tol: float) -> int:
    """One training step's forward and backward (gradients of W and x); returns the NFE."""
    sol = solve(
        problem.f,
        problem.z0(),
        solver=SOLVER,
        adjoint=adjoint,
        abstol=tol,
        reltol=0.0,
        max_steps=5000,
    )
    sol.z.pow(2).sum().backward()
    return sol.stats.nfe


def measure_row(ctx: Context, batch: int, tol: float, section: Section) -> None:
    """Both adjoints on the same problem: peak MiB, NFE and the ratio unrolled / implicit."""
    size = ctx.pick(SIZES)
    spec = Spectrum(dim=size.dim, batch=batch, slow_eig=size.slow_eig)
    problem = SpectralProblem(spec, ctx.device, torch.float32, ctx.seed)
    problem.weight.requires_grad_(True)
    problem.x.requires_grad_(True)
    peaks, nfe = {}, {}
    for adjoint in ADJOINTS:
        peaks[adjoint], nfe[adjoint] = peak_memory(
            lambda a=adjoint: step(problem, a, tol), ctx.device
        )
    section.add(
        batch=batch,
        abstol=tol,
        NFE=nfe["gmres"],
        **{
            "implicit MiB": peaks["gmres"] / 2**20,
            "unrolled MiB": peaks["unrolled"] / 2**20,
            "unrolled / implicit": ratio(peaks["unrolled"], peaks["gmres"]),
        },
    )


def run(ctx: Context) -> Section:
    """Memory as the batch grows at a fixed tolerance, then as the depth (NFE) grows."""
    size = ctx.pick(SIZES)
    kind = "CUDA caching allocator peak" if ctx.device.type == "cuda" else "tracked tensor storage"
    section = Section(
        name="memory",
        title="Peak memory of a training step: implicit vs unrolled backward",
        columns=["batch", "abstol", "NFE", "implicit MiB", "unrolled MiB", "unrolled / implicit"],
        notes=[
            f"f(z) = W tanh(z) + x, width {size.dim}, float32, solver {SOLVER}, one forward "
            f"and backward (gradients of W and x); peak = {kind} during the step above what was "
            f"allocated before it. Rows 1-{len(size.batches)}: batch grows at abstol "
            f"{TOL:g}; then batch {size.batch} with a growing depth (tighter tolerance, more "
            "NFE): the implicit backward stays flat in depth.",
        ],
    )
    rows = [(batch, TOL) for batch in size.batches] + [(size.batch, tol) for tol in size.tols]
    for number, (batch, tol) in enumerate(rows, 1):
        part_line(f"[memory] batch {batch}, abstol {tol:g}", number, len(rows))
        measure_row(ctx, batch, tol, section)
    return section
