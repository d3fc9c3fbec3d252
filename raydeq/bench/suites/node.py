"""Continuous DEQ against the Neural ODE on the same f, parameters and tolerance."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from raydeq.bench.harness import models
from raydeq.bench.harness.context import Context
from raydeq.bench.harness.report import Section, Target, error_line
from raydeq.bench.harness.timing import Case, Timing, measure, paired_ratio
from raydeq.bench.harness.training import fit, loss_of, step_case
from raydeq.models import PRESETS, EquilibriumClassifier
from raydeq.solvers.solve import GRAPH
from raydeq.training.objective import Objective


@dataclass(frozen=True)
class NodeSize:
    """Timed batch per preset, interleaved repeats, and Adam steps on MNIST before timing."""

    batches: Mapping[str, int]
    repeats: int
    train_steps: int

    def batch(self, name: str) -> int:
        """The batch of a preset; 2 (the smallest that exercises batching) when not listed."""
        return self.batches.get(name, 2)


SIZES = {
    "tiny": NodeSize(batches={}, repeats=1, train_steps=2),
    "quick": NodeSize(
        batches={"mnist_dense": 128, "mnist_mdeq": 32, "cifar10_small": 4, "cifar10_large": 2},
        repeats=7,
        train_steps=250,
    ),
    "full": NodeSize(
        batches={"mnist_dense": 256, "mnist_mdeq": 32, "cifar10_small": 64, "cifar10_large": 32},
        repeats=9,
        train_steps=1000,
    ),
}
COLUMNS = [
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
]
# Batch of the Adam steps on MNIST before timing: the paper compares trained models.
TRAIN_BATCH = 64
# The paper's VCAB3 (the Neural ODE's integrator here too); BS3 takes fewer steps, which is
# faster where f is cheap next to a step's per-sample bookkeeping; Euler with its step-relative
# error control takes the fewest evaluations near a contractive steady state.
DEQ_SOLVERS = ("vcab3", "bs3", "euler")
# On a GPU the same DEQs again with compile="graph" (each solve's step recorded as a CUDA
# graph and replayed: the eager step there is bound by launching its kernels).
GRAPHED = {f"{solver}_graph": solver for solver in DEQ_SOLVERS}
# For information, outside the targets (the continuous DEQ's backward is GMRES): the same
# system solved by Neumann iteration, whose step is one product and a few vector operations
# where a GMRES step also orthogonalises; it needs more products, and diverges where f does not
# contract at z*.
NEUMANN = "euler_neumann"
VARIANTS = {
    "vcab3": "continuous DEQ (VCAB3, GMRES)",
    "bs3": "continuous DEQ (BS3, GMRES)",
    "euler": "continuous DEQ (Euler, GMRES)",
    "vcab3_graph": 'continuous DEQ (VCAB3, GMRES), compile="graph"',
    "bs3_graph": 'continuous DEQ (BS3, GMRES), compile="graph"',
    "euler_graph": 'continuous DEQ (Euler, GMRES), compile="graph"',
    NEUMANN: "continuous DEQ (Euler, Neumann adjoint)",
    "adjoint": "Neural ODE, continuous adjoint",
    "backprop": "Neural ODE, backprop through solver",
    "adjoint_f_minus_z": "Neural ODE (dz/dt = f - z), continuous adjoint",
}
# Adjoint and dynamics of each Neural ODE variant: the paper's dz/dt = f(z, x) (reference
# 0.2.x src/layers/neuralode.jl) for the targets, the later library's f - z for information.
NODE_LAYERS = {
    "adjoint": ("continuous", "f"),
    "backprop": ("backprop", "f"),
    "adjoint_f_minus_z": ("continuous", "f_minus_z"),
}


def cases(
    model: EquilibriumClassifier, objective: Objective, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, Case]:
    """Training step, backward pass alone, and prediction of one model on one batch."""

    def backward() -> Callable:
        model.train()
        model.zero_grad(set_to_none=True)
        loss, out = loss_of(model, objective, images, labels)
        return lambda: (loss.backward(), out)[1]

    return {
        "train": step_case(model, objective, images, labels),
        "backward": backward,
        "predict": models.predict_case(model, images),
    }


def build_deq(
    ctx: Context, name: str, solver: str, adjoint: str = "gmres", compile: bool | str = False
) -> EquilibriumClassifier:
    """A vanilla DEQ of the preset with its implicit adjoint's limits (rtol the forward's reltol,
    max_iters), as training runs it."""
    return models.build(
        name, "vanilla", ctx.device, ctx.seed, solver=solver, adjoint=adjoint, compile=compile
    )


def deq_variants(device: torch.device) -> tuple[str, ...]:
    """The DEQ variants the targets compare: every solver, and on a GPU each with
    compile="graph" too."""
    return DEQ_SOLVERS + (tuple(GRAPHED) if device.type == "cuda" else ())


def trained_deq(
    ctx: Context, name: str, digits: bool, suite: str = "node"
) -> tuple[EquilibriumClassifier, str]:
    """The VCAB3 DEQ with the checkpoint's weights, or briefly trained on MNIST when the inputs
    are digits, else untrained; and a description of its weights. `suite` names the training's
    progress lines."""
    deq = build_deq(ctx, name, "vcab3")
    checkpoint = ctx.weights.get(name)
    train = models.mnist(ctx.data_dir, train=True) if digits else None
    if checkpoint is not None:
        return deq, models.load_checkpoint(deq, checkpoint)
    if train is None:
        return deq, models.UNTRAINED
    steps = ctx.pick(SIZES).train_steps
    data = (train[0].to(ctx.device), train[1].to(ctx.device))
    label = f"[{suite}] training {name} on the digits"
    fit(deq, models.preset_objective(name), data, steps, TRAIN_BATCH, ctx.seed, label)
    return deq, (
        f"weights of the DEQ after {steps} Adam steps (lr 1e-3, batch {TRAIN_BATCH}) on the "
        "MNIST training digits"
    )


def layers(ctx: Context, name: str, deq: EquilibriumClassifier) -> dict[str, EquilibriumClassifier]:
    """Every variant of VARIANTS timed on the device, with the parameters of `deq`."""
    trained = {k: v for k, v in deq.state_dict().items() if not k.startswith("layer.step")}
    nets = {"vcab3": deq}
    for solver in DEQ_SOLVERS[1:]:
        nets[solver] = build_deq(ctx, name, solver)
    nets[NEUMANN] = build_deq(ctx, name, "euler", adjoint="fixed_point")
    for variant in deq_variants(ctx.device)[len(DEQ_SOLVERS) :]:
        nets[variant] = build_deq(ctx, name, GRAPHED[variant], compile=GRAPH)
    for variant in (*deq_variants(ctx.device)[1:], NEUMANN):
        nets[variant].load_state_dict(deq.state_dict())
    for variant, (adjoint, dynamics) in NODE_LAYERS.items():
        nets[variant] = models.build(
            name,
            "neural_ode",
            ctx.device,
            ctx.seed,
            solver="vcab3",
            adjoint=adjoint,
            dynamics=dynamics,
        )
        nets[variant].load_state_dict(trained)
    return nets


def add_rows(section: Section, name: str, batch: int, timings: dict[str, Timing]) -> None:
    """One row per variant timed: NFE, convergence, VJPs and the median times."""
    for variant, layer in VARIANTS.items():
        if f"{variant}/train" not in timings:
            continue
        train_out = timings[f"{variant}/train"].value
        back_out = timings[f"{variant}/backward"].value
        # A DEQ's implicit backward's fraction of samples whose linear solve did not converge.
        unconverged = (
            back_out.stats.backward_unconverged_fraction if variant not in NODE_LAYERS else None
        )
        section.add(
            model=name,
            layer=layer,
            batch=batch,
            NFE=train_out.stats.nfe,
            converged=1 - train_out.stats.unconverged_fraction,
            VJPs=back_out.stats.backward_nvjp,
            **{
                "VJPs converged": None if unconverged is None else 1 - unconverged,
                "train step ms": 1e3 * timings[f"{variant}/train"].median,
                "backward ms": 1e3 * timings[f"{variant}/backward"].median,
                "predict ms": 1e3 * timings[f"{variant}/predict"].median,
            },
        )


def add_targets(
    section: Section, name: str, timings: dict[str, Timing], deqs: tuple[str, ...]
) -> None:
    """Neural ODE time over the fastest DEQ's (of `deqs`), for the training step and the
    backward."""
    for variant in ("adjoint", "backprop"):
        label = f"{name}: Neural ODE ({variant}) / DEQ"
        for part, what, limit in (("train", "training step", 3.0), ("backward", "backward", 8.0)):
            fastest = min(deqs, key=lambda deq: timings[f"{deq}/{part}"].median)
            solver = GRAPHED.get(fastest, fastest).upper()
            graphed = ', compile="graph"' if fastest in GRAPHED else ""
            section.targets.append(
                Target(
                    f"{label} {what} time",
                    paired_ratio(timings[f"{variant}/{part}"], timings[f"{fastest}/{part}"]),
                    limit,
                    at_least=True,
                    detail=f"DEQ with {solver}{graphed}",
                )
            )


def compare(ctx: Context, name: str, section: Section) -> None:
    """Rows, targets and the note of one preset."""
    batch = ctx.pick(SIZES).batch(name)
    images, source = models.image_batch(name, batch, ctx.device, ctx.data_dir, ctx.seed)
    labels = torch.arange(batch, device=ctx.device) % 10
    deq, weights = trained_deq(ctx, name, digits=source == models.DIGITS)
    nets = layers(ctx, name, deq)
    node = nets["adjoint"]
    same = all(torch.equal(a, b) for a, b in zip(deq.parameters(), node.parameters()))
    objective = models.preset_objective(name)

    def timed(variants: list[str]) -> dict[str, Timing]:
        all_cases = {
            f"{variant}/{part}": case
            for variant in variants
            for part, case in cases(nets[variant], objective, images, labels).items()
        }
        repeats = ctx.pick(SIZES).repeats
        return measure(all_cases, ctx.device, repeats, label=f"[node] timing {name}")

    try:
        timings = timed(list(nets))
    except Exception as err:  # a capture that fails on this GPU must not lose the eager rows
        if not GRAPHED.keys() & nets.keys():
            raise
        traceback.print_exc()
        section.notes.append(
            f'{name}: compile="graph" failed ({error_line(err)}); timed again without its rows.'
        )
        timings = timed([variant for variant in nets if variant not in GRAPHED])
    add_rows(section, name, batch, timings)
    timed_deqs = tuple(v for v in deq_variants(ctx.device) if f"{v}/train" in timings)
    add_targets(section, name, timings, timed_deqs)
    term, limits = deq.layer.termination, PRESETS[name].adjoint_options
    section.notes.append(
        f"{name}: batch of {batch} {source}, seed {ctx.seed}, {weights}, parameters "
        f"{'identical' if same else 'NOT identical'} in every layer; tolerances of the preset "
        f"(abstol {term.abstol:g}, reltol {term.reltol:g}) for all, and the implicit adjoints "
        f"stop at the preset's rtol {term.reltol:g} or max_iters {limits.get('max_iters')}; "
        f"Neural ODE: dz/dt = f(z, x) from z(0) = 0 by {node.layer.solver.upper()} over "
        f"[0, {node.layer.t1:g}], output f(z({node.layer.t1:g}), x) (the paper's baseline, "
        "reference DeepEquilibriumNetworks.jl 0.2.x src/layers/neuralode.jl), trained by the "
        "continuous adjoint or by backpropagation through the solver's steps; the row "
        "'dz/dt = f - z' (the later reference library's flow) is for information, no target."
    )
    section.timings |= {f"{name}/{label}": t.seconds for label, t in timings.items()}


def run(ctx: Context) -> Section:
    """Every requested preset."""
    section = Section(
        name="node",
        title="Continuous DEQ vs Neural ODE",
        columns=COLUMNS,
        notes=[
            "train step = forward, loss, backward and an Adam step (learning rate 0, so every "
            "repeat sees the same parameters); NFE = forward evaluations of f in training mode; "
            "converged = fraction of samples whose residual ||f(z) - z|| met the tolerance (at "
            "t1 for the Neural ODE); VJPs = vector-Jacobian products of the backward pass, "
            "VJPs converged = fraction of samples whose adjoint solve met its rtol. The paper's "
            "ratios are for trained models: a model of MNIST digits (mnist_dense, mnist_mdeq) "
            "is trained briefly as a DEQ on the digits first, unless --weights gives a training "
            "checkpoint (without the digits it stays untrained). The CIFAR-10 and ImageNet "
            "DEQs run untrained unless --weights gives a checkpoint: at initialisation they "
            "have no attracting equilibrium (of their presets only cifar10_small unrolls f in "
            "its first 3,000 training steps), so their forward stops at max_steps and GMRES at "
            "max_iters, and their ratios say little. The targets "
            "compare the Neural ODE with the fastest of the DEQ solvers (named in detail), "
            'each with GMRES (on a GPU also with compile="graph", each solve\'s step '
            "recorded as a CUDA graph and replayed); the row with the Neumann adjoint (the "
            "same linear system by fixed-point iteration, adjoint='fixed_point') is for "
            "information."
        ],
    )
    for name in ctx.models:
        compare(ctx, name, section)
    return section
