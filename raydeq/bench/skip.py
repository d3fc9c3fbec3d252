"""Skip DEQ and Skip Reg. DEQ against the vanilla DEQ after the same short training on MNIST."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from raydeq.bench import models
from raydeq.bench.context import Context
from raydeq.bench.report import Section, Target
from raydeq.bench.timing import Case, measure, ratio, time_call
from raydeq.bench.training import train_step

MODEL = "mnist_dense"
VARIANTS = ("vanilla", "skip", "skip_reg")
SIZES = {
    "tiny": dict(epochs=1, train=64, test=256, batch=32, repeats=1),
    "quick": dict(epochs=2, train=8000, test=2000, batch=64, repeats=7),
    "full": dict(epochs=3, train=8000, test=2000, batch=64, repeats=15),
}
LEARNING_RATE = 1e-3


def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch: int) -> tuple[float, float]:
    """Test accuracy and mean forward NFE per batch (eval mode, no autograd)."""
    model.eval()
    correct, nfe, batches = 0, 0, 0
    with torch.no_grad():
        for start in range(0, len(labels), batch):
            logits, out = model(images[start : start + batch])
            correct += int((logits.argmax(1) == labels[start : start + batch]).sum())
            nfe += out.stats.nfe
            batches += 1
    return correct / len(labels), nfe / batches


def predict_case(model: nn.Module, images: Tensor) -> Case:
    """Time one prediction of a batch."""

    def prepare() -> Callable:
        model.eval()

        def thunk():
            with torch.no_grad():
                return model(images)

        return thunk

    return prepare


def run(ctx: Context) -> Section:
    """Train the three variants in lockstep, then compare NFE, times and accuracy."""
    size = ctx.pick(SIZES)
    section = Section(
        name="skip",
        title="Skip / Skip Reg. DEQ vs vanilla DEQ after the same training",
        columns=[
            "variant",
            "test NFE",
            "NFE / vanilla",
            "train ms per batch",
            "predict ms",
            "test accuracy",
        ],
    )
    missing = models.models_available()
    train = models.mnist(ctx.data_dir, train=True) if not missing else None
    test = models.mnist(ctx.data_dir, train=False) if not missing else None
    if missing or train is None or test is None:
        reason = missing or f"MNIST not found in {ctx.data_dir} (MNIST/raw in the IDX layout)"
        section.notes.append(f"skipped: {reason}")
        section.targets.append(Target("skip_reg NFE / vanilla NFE", None, 1 / 3, detail=reason))
        return section
    images, labels = (t[: size["train"]].to(ctx.device) for t in train)
    test_images, test_labels = (t[: size["test"]].to(ctx.device) for t in test)
    nets = {v: models.build(MODEL, v, ctx.device, ctx.seed) for v in VARIANTS}
    optimizers = {v: torch.optim.Adam(n.parameters(), lr=LEARNING_RATE) for v, n in nets.items()}
    step_times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    g = torch.Generator().manual_seed(ctx.seed)
    for _ in range(size["epochs"]):
        order = torch.randperm(len(labels), generator=g).to(ctx.device)
        for start in range(0, len(labels), size["batch"]):
            index = order[start : start + size["batch"]]
            x, y = images[index], labels[index]
            for variant, net in nets.items():
                net.train()
                step = partial(train_step, net, optimizers[variant], x, y)
                seconds, _ = time_call(step, ctx.device)
                step_times[variant].append(seconds)
    batch = test_images[: size["batch"]]
    timings = measure(
        {v: predict_case(n, batch) for v, n in nets.items()}, ctx.device, size["repeats"]
    )
    results = {v: evaluate(n, test_images, test_labels, size["batch"]) for v, n in nets.items()}
    vanilla_nfe = results["vanilla"][1]
    for variant in VARIANTS:
        accuracy, nfe = results[variant]
        section.add(
            variant=variant,
            **{
                "test NFE": nfe,
                "NFE / vanilla": ratio(nfe, vanilla_nfe),
                "train ms per batch": 1e3 * statistics.median(step_times[variant]),
                "predict ms": 1e3 * timings[variant].median,
                "test accuracy": accuracy,
            },
        )
    section.targets.append(
        Target(
            "skip_reg test NFE / vanilla test NFE after training",
            ratio(results["skip_reg"][1], vanilla_nfe),
            1 / 3,
            detail=f"{results['skip_reg'][1]:.1f} vs {vanilla_nfe:.1f} NFE",
        )
    )
    steps = len(step_times["vanilla"])
    section.notes.append(
        f"{MODEL} (VCAB3, GMRES, the preset's tolerances and skip-loss weight), the same seed "
        f"({ctx.seed}) and batches for every variant: {size['epochs']} epoch(s) over "
        f"{len(labels)} training digits of {ctx.data_dir or 'mnist10k'}, "
        f"batch {size['batch']}, Adam "
        f"{LEARNING_RATE:g} ({steps} steps, interleaved across variants); test NFE and accuracy "
        f"over {len(test_labels)} test digits; NFE includes the evaluation that gives Skip "
        "Reg.'s initial guess f(0, x); predict = one test batch."
    )
    section.timings = {f"predict/{v}": t.seconds for v, t in timings.items()}
    return section
