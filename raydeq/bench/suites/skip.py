"""Skip DEQ and Skip Reg. DEQ against the vanilla DEQ after the same short training on MNIST."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from functools import partial

import torch

from raydeq.bench.harness import models
from raydeq.bench.harness.context import Context
from raydeq.bench.harness.models import Split
from raydeq.bench.harness.report import Section, Target
from raydeq.bench.harness.timing import Timing, measure, ratio, time_call
from raydeq.bench.harness.training import adam, train_step
from raydeq.models import EquilibriumClassifier
from raydeq.training.console import Progress
from raydeq.training.objective import evaluate


@dataclass(frozen=True)
class SkipSize:
    """Epochs over the first `train` training digits, test digits, batch, prediction repeats."""

    epochs: int
    train: int
    test: int
    batch: int
    repeats: int


SIZES = {
    "tiny": SkipSize(epochs=1, train=64, test=256, batch=32, repeats=1),
    "quick": SkipSize(epochs=2, train=8000, test=2000, batch=64, repeats=7),
    "full": SkipSize(epochs=3, train=8000, test=2000, batch=64, repeats=15),
}
MODEL = "mnist_dense"
VARIANTS = ("vanilla", "skip", "skip_reg")
LEARNING_RATE = 1e-3
TARGET = "skip_reg test NFE / vanilla test NFE after training"
COLUMNS = [
    "variant",
    "test NFE",
    "NFE / vanilla",
    "train ms per batch",
    "predict ms",
    "test accuracy",
]


def train_lockstep(
    ctx: Context, nets: dict[str, EquilibriumClassifier], train: Split, size: SkipSize
) -> dict[str, list[float]]:
    """Train every variant on the same batches, one step each in turn; seconds of each step."""
    images, labels = train
    objective = models.preset_objective(MODEL)
    optimizers = {v: adam(n, LEARNING_RATE) for v, n in nets.items()}
    step_times: dict[str, list[float]] = {v: [] for v in nets}
    g = torch.Generator().manual_seed(ctx.seed)
    starts = range(0, len(labels), size.batch)
    shown = Progress("[skip] training the variants in turn", size.epochs * len(starts))
    for _ in range(size.epochs):
        order = torch.randperm(len(labels), generator=g).to(ctx.device)
        for start in starts:
            shown.next()
            index = order[start : start + size.batch]
            x, y = images[index], labels[index]
            for variant, net in nets.items():
                net.train()
                step = partial(train_step, net, objective, optimizers[variant], x, y)
                seconds, _ = time_call(step, ctx.device)
                step_times[variant].append(seconds)
    return step_times


def add_results(
    section: Section,
    results: dict[str, dict[str, float]],
    step_times: dict[str, list[float]],
    timings: dict[str, Timing],
) -> None:
    """One row per variant, Skip Reg.'s test NFE over vanilla's as the target, and the raw
    seconds of every training step and prediction timed."""
    vanilla_nfe = results["vanilla"]["test_nfe"]
    for variant in VARIANTS:
        nfe = results[variant]["test_nfe"]
        section.add(
            variant=variant,
            **{
                "test NFE": nfe,
                "NFE / vanilla": ratio(nfe, vanilla_nfe),
                "train ms per batch": 1e3 * statistics.median(step_times[variant]),
                "predict ms": 1e3 * timings[variant].median,
                "test accuracy": results[variant]["test_accuracy"],
            },
        )
    skip_reg_nfe = results["skip_reg"]["test_nfe"]
    section.targets.append(
        Target(
            TARGET,
            ratio(skip_reg_nfe, vanilla_nfe),
            1 / 3,
            detail=f"{skip_reg_nfe:.1f} vs {vanilla_nfe:.1f} NFE",
        )
    )
    section.timings = {f"predict/{v}": t.seconds for v, t in timings.items()} | {
        f"train/{v}": seconds for v, seconds in step_times.items()
    }


def run(ctx: Context) -> Section:
    """Train the three variants in lockstep, then compare NFE, times and accuracy."""
    size = ctx.pick(SIZES)
    section = Section(
        name="skip",
        title="Skip / Skip Reg. DEQ vs vanilla DEQ after the same training",
        columns=COLUMNS,
    )
    splits = models.mnist_splits(ctx.data_dir)
    if isinstance(splits, str):
        section.notes.append(f"skipped: {splits}")
        section.targets.append(Target(TARGET, None, 1 / 3, detail=splits))
        return section
    train = tuple(t[: size.train].to(ctx.device) for t in splits[0])
    test_images, test_labels = (t[: size.test].to(ctx.device) for t in splits[1])
    nets = {v: models.build(MODEL, v, ctx.device, ctx.seed) for v in VARIANTS}
    step_times = train_lockstep(ctx, nets, train, size)
    batch = test_images[: size.batch]
    timings = measure(
        {v: models.predict_case(n, batch) for v, n in nets.items()},
        ctx.device,
        size.repeats,
        label="[skip] timing",
    )
    batches = list(zip(test_images.split(size.batch), test_labels.split(size.batch), strict=True))
    results = {v: evaluate(n, batches, ctx.device).metrics() for v, n in nets.items()}
    add_results(section, results, step_times, timings)
    section.notes.append(
        f"{MODEL} (VCAB3, GMRES, the preset's tolerances and skip-loss weight), the same seed "
        f"({ctx.seed}) and batches for every variant: {size.epochs} epoch(s) over "
        f"{len(train[1])} training digits of {ctx.data_dir or 'mnist10k'}, batch {size.batch}, "
        f"Adam {LEARNING_RATE:g} ({len(step_times['vanilla'])} steps, interleaved across "
        f"variants); test NFE and accuracy over {len(test_labels)} test digits; NFE includes the "
        "evaluation that gives Skip Reg.'s initial guess f(0, x); predict = one test batch."
    )
    return section
