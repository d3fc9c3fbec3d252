"""Continuous DEQ against the Neural ODE on the same f, parameters and tolerance."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from raydeq.bench import models
from raydeq.bench.context import Context
from raydeq.bench.report import Section, Target
from raydeq.bench.timing import Case, measure, paired_ratio
from raydeq.bench.training import fit, loss_of, train_step

BATCH = {
    "tiny": {},
    "quick": {"mnist_dense": 128, "cifar10_small": 4, "cifar10_large": 2},
    "full": {"mnist_dense": 256, "cifar10_small": 64, "cifar10_large": 32},
}
REPEATS = {"tiny": 1, "quick": 7, "full": 9}
# Adam steps (batch 64) on MNIST before timing: the paper compares trained models.
TRAIN_STEPS = {"tiny": 2, "quick": 250, "full": 1000}
TRAIN_BATCH = 64
# The paper's VCAB3; BS3 (the Neural ODE's integrator here) takes fewer steps, which is faster
# where f is cheap next to a step's per-sample bookkeeping; Euler with its step-relative error
# control takes the fewest evaluations near a contractive steady state.
DEQ_SOLVERS = ("vcab3", "bs3", "euler")
VARIANTS = {
    "vcab3": "continuous DEQ (VCAB3, GMRES)",
    "bs3": "continuous DEQ (BS3, GMRES)",
    "euler": "continuous DEQ (Euler, GMRES)",
    "adjoint": "Neural ODE, continuous adjoint",
    "backprop": "Neural ODE, backprop through solver",
}


def cases(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Case]:
    """Training step, backward pass alone, and prediction of one model on one batch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)

    def train() -> Callable:
        model.train()
        return lambda: train_step(model, optimizer, images, labels)

    def backward() -> Callable:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss, out = loss_of(model, images, labels)
        return lambda: (loss.backward(), out)[1]

    def predict() -> Callable:
        model.eval()

        def thunk():
            with torch.no_grad():
                return model(images)[1]

        return thunk

    return {"train": train, "backward": backward, "predict": predict}


def converged_fraction(stats: object) -> float | None:
    """Fraction of samples whose adjoint linear solve converged (None if it did not run)."""
    flags = getattr(stats, "backward_converged", None)
    return None if flags is None else float(flags.float().mean())


def compare(ctx: Context, name: str, section: Section) -> None:
    """Rows and targets of one preset."""
    batch = BATCH[ctx.size].get(name, 2)
    images, source = models.image_batch(name, batch, ctx.device, ctx.data_dir, ctx.seed)
    labels = torch.arange(batch, device=ctx.device) % 10
    deq = models.build(name, "vanilla", ctx.device, ctx.seed, solver="vcab3")
    deq.layer.adjoint_options = {"rtol": deq.layer.termination.reltol}
    checkpoint = ctx.weights.get(name)
    digits = models.mnist(ctx.data_dir, train=True) if source == "MNIST test digits" else None
    steps = ctx.pick(TRAIN_STEPS) if digits is not None and checkpoint is None else 0
    if checkpoint is not None:
        models.load_checkpoint(deq, checkpoint)
    elif steps:
        fit(deq, *(t.to(ctx.device) for t in digits), steps, TRAIN_BATCH, ctx.seed)
    trained = {k: v for k, v in deq.state_dict().items() if not k.startswith("layer.step")}
    nets = {"vcab3": deq}
    for solver in DEQ_SOLVERS[1:]:
        nets[solver] = models.build(name, "vanilla", ctx.device, ctx.seed, solver=solver)
        nets[solver].layer.adjoint_options = deq.layer.adjoint_options
        nets[solver].load_state_dict(deq.state_dict())
    for variant, adjoint in (("adjoint", True), ("backprop", False)):
        nets[variant] = models.build(
            name, "neural_ode", ctx.device, ctx.seed, solver="vcab3", adjoint=adjoint
        )
        nets[variant].load_state_dict(trained)
    node = nets["adjoint"]
    same = all(torch.equal(a, b) for a, b in zip(deq.parameters(), node.parameters()))
    all_cases = {
        f"{variant}/{part}": case
        for variant, model in nets.items()
        for part, case in cases(model, images, labels).items()
    }
    timings = measure(all_cases, ctx.device, repeats=REPEATS[ctx.size])
    medians = {label: t.median for label, t in timings.items()}
    for variant in VARIANTS:
        train_out = timings[f"{variant}/train"].values[-1]
        back_out = timings[f"{variant}/backward"].values[-1]
        section.add(
            model=name,
            layer=VARIANTS[variant],
            batch=batch,
            NFE=train_out.stats.nfe,
            converged=1 - train_out.stats.unconverged_fraction,
            VJPs=back_out.stats.backward_nvjp if variant in DEQ_SOLVERS else None,
            **{
                "VJPs converged": converged_fraction(back_out.stats)
                if variant in DEQ_SOLVERS
                else None
            },
            **{
                "train step ms": 1e3 * medians[f"{variant}/train"],
                "backward ms": 1e3 * medians[f"{variant}/backward"],
                "predict ms": 1e3 * medians[f"{variant}/predict"],
            },
        )
    for variant in ("adjoint", "backprop"):
        label = f"{name}: Neural ODE ({variant}) / DEQ"
        for part, what, limit in (("train", "training step", 3.0), ("backward", "backward", 8.0)):
            fastest = min(DEQ_SOLVERS, key=lambda solver: medians[f"{solver}/{part}"])
            section.targets.append(
                Target(
                    f"{label} {what} time",
                    paired_ratio(timings[f"{variant}/{part}"], timings[f"{fastest}/{part}"]),
                    limit,
                    at_least=True,
                    detail=f"DEQ with {fastest.upper()}",
                )
            )
    term = deq.layer.termination
    if checkpoint is not None:
        weights = f"weights of the checkpoint {checkpoint.folder}"
    elif steps:
        weights = (
            f"weights of the DEQ after {steps} Adam steps (lr 1e-3, batch {TRAIN_BATCH}) on the "
            "MNIST training digits"
        )
    else:
        weights = "untrained weights"
    section.notes.append(
        f"{name}: batch of {batch} {source}, seed {ctx.seed}, {weights}, parameters "
        f"{'identical' if same else 'NOT identical'} in every layer; tolerances of the preset "
        f"(abstol {term.abstol:g}, reltol {term.reltol:g}) for all, GMRES rtol {term.reltol:g}; "
        f"Neural ODE: torchdiffeq {node.layer.method} over [0, {node.layer.t1:g}], trained by "
        "the continuous adjoint (odeint_adjoint, the paper's baseline) or by backpropagation "
        "through the solver."
    )
    section.timings |= {f"{name}/{label}": t.seconds for label, t in timings.items()}


def run(ctx: Context) -> Section:
    """Every requested preset; a note when the models package is missing."""
    section = Section(
        name="node",
        title="Continuous DEQ vs Neural ODE",
        columns=[
            "model",
            "layer",
            "batch",
            "NFE",
            "converged",
            "VJPs",
            "VJPs converged",
            "train step ms",
            "backward ms",
            "predict ms",
        ],
        notes=[
            "train step = forward, loss, backward and an Adam step (learning rate 0, so every "
            "repeat sees the same parameters); NFE = forward evaluations of f in training mode; "
            "converged = fraction of samples whose residual ||f(z) - z|| met the tolerance (at "
            "t1 for the Neural ODE); VJPs = vector-Jacobian products of the GMRES adjoint, "
            "VJPs converged = fraction of samples whose adjoint solve met its rtol. The paper's "
            "ratios are for trained models: the dense model is trained briefly as a DEQ on the "
            "MNIST digits first (without the digits it stays untrained). The multiscale DEQs "
            "run untrained unless --weights gives a training checkpoint: at initialisation they "
            "have no attracting equilibrium (their presets pretrain thousands of unrolled steps "
            "first), so their forward stops at max_steps and GMRES at max_iters, and their "
            "ratios say little. The targets "
            "compare the Neural ODE with the fastest of the DEQ solvers (named in detail)."
        ],
    )
    missing = models.models_available()
    if missing:
        section.notes.append(missing)
        return section
    for name in ctx.models:
        compare(ctx, name, section)
    return section
