"""The skip-loss weight of the dense MNIST DEQ: vanilla, Jacobian-regularised, Skip Reg. and Skip.

Each configuration trains from the same seed on the MNIST training digits (Adam 1e-3, batch
32) under the training objective with its lambda_skip (and lambda_jac for the row with the
Jacobian loss), then reports on the test digits the mean NFE per test batch of 32, the
accuracy, and the Hutchinson estimate of ||J_f(z*)||_F^2 / dim (mean over test batches) before
and after training. The full sweep chose mnist_dense's lambda_skip of 0.2, the weight at which
Skip Reg. needs at most half of vanilla's test NFE at its accuracy while the trained layer keeps
a Jacobian (at 1.0 it falls to 1e-4: an explicit layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from raydeq.bench.harness import models
from raydeq.bench.harness.context import Context
from raydeq.bench.harness.models import Split
from raydeq.bench.harness.report import Section
from raydeq.bench.harness.timing import time_call
from raydeq.bench.harness.training import fit
from raydeq.deq import hutchinson_jacobian_loss
from raydeq.models import EquilibriumClassifier
from raydeq.training.objective import Objective, evaluate


@dataclass(frozen=True)
class SkipLambdaSize:
    """Adam steps, training and test digits used, and the skip-loss weights swept."""

    steps: int
    train: int
    test: int
    lambdas: tuple[float, ...]


SIZES = {
    "tiny": SkipLambdaSize(steps=2, train=64, test=64, lambdas=(1.0,)),
    "quick": SkipLambdaSize(steps=150, train=8000, test=1000, lambdas=(0.1, 0.2, 1.0)),
    "full": SkipLambdaSize(steps=500, train=8000, test=2000, lambdas=(0.01, 0.1, 0.2, 0.3, 1.0)),
}
MODEL = "mnist_dense"
BATCH = 32
LAMBDA_JAC = 1.0


@dataclass(frozen=True)
class Config:
    """One trained configuration: variant, skip-loss weight, Jacobian-loss weight."""

    variant: str
    lambda_skip: float = 0.0
    lambda_jac: float = 0.0


def configs(lambdas: tuple[float, ...]) -> list[Config]:
    """Vanilla, vanilla with the Jacobian loss, then Skip Reg. and Skip at every weight."""
    swept = [Config(variant, lam) for variant in ("skip_reg", "skip") for lam in lambdas]
    return [Config("vanilla"), Config("vanilla", lambda_jac=LAMBDA_JAC), *swept]


def jacobian_norm(model: EquilibriumClassifier, batches: list[tuple[Tensor, Tensor]]) -> float:
    """Mean over the batches of the Hutchinson estimate of ||J_f(z*)||_F^2 / dim (eval mode)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for images, _ in batches:
        with torch.no_grad():
            _, out = model(images)
            x = model.stem(images)
            total += hutchinson_jacobian_loss(lambda z, x=x: model.layer.f(z, x), out.z).item()
    model.train(was_training)
    return total / len(batches)


def add_row(
    ctx: Context, section: Section, config: Config, train: Split, test: list[tuple[Tensor, Tensor]]
) -> None:
    """Train one configuration and add its test metrics before and after training."""
    jac_reg = config.lambda_jac > 0
    model = models.build(MODEL, config.variant, ctx.device, ctx.seed, jac_reg=jac_reg)
    before = jacobian_norm(model, test)
    objective = Objective(config.lambda_skip, config.lambda_jac)
    steps = ctx.pick(SIZES).steps
    label = f"[skip_lambda] training {config.variant}, lambda_skip {config.lambda_skip:g}"
    label += f", lambda_jac {config.lambda_jac:g}" if config.lambda_jac else ""
    seconds, _ = time_call(
        partial(fit, model, objective, train, steps, BATCH, ctx.seed, label), ctx.device
    )
    metrics = evaluate(model, test, ctx.device).metrics()
    section.add(
        variant=config.variant,
        lambda_skip=config.lambda_skip,
        lambda_jac=config.lambda_jac,
        **{
            "test NFE": metrics["test_nfe"],
            "test accuracy": metrics["test_accuracy"],
            "Jacobian before": before,
            "Jacobian after": jacobian_norm(model, test),
            "train s": seconds,
        },
    )


def run(ctx: Context) -> Section:
    """Every configuration, trained on the same batches; a note when MNIST is missing."""
    size = ctx.pick(SIZES)
    section = Section(
        name="skip_lambda",
        title="Skip-loss weight: test NFE and accuracy of the dense MNIST DEQ after training",
        columns=[
            "variant",
            "lambda_skip",
            "lambda_jac",
            "test NFE",
            "test accuracy",
            "Jacobian before",
            "Jacobian after",
            "train s",
        ],
        notes=[__doc__.split("\n\n")[1].replace("\n", " ").strip()],
    )
    splits = models.mnist_splits(ctx.data_dir)
    if isinstance(splits, str):
        section.notes.append(f"skipped: {splits}")
        return section
    train = (splits[0][0][: size.train].to(ctx.device), splits[0][1][: size.train].to(ctx.device))
    images, labels = (t[: size.test].to(ctx.device) for t in splits[1])
    test = list(zip(images.split(BATCH), labels.split(BATCH), strict=True))
    for config in configs(size.lambdas):
        add_row(ctx, section, config, train, test)
    section.notes.append(
        f"{MODEL} (VCAB3, GMRES, the preset's tolerances), seed {ctx.seed}: {size.steps} steps "
        f"over {len(train[1])} training digits of {ctx.data_dir or 'mnist10k'}, "
        f"{len(labels)} test digits; Jacobian = ||J_f(z*)||_F^2 / dim."
    )
    return section
