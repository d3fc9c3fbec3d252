"""Test NFE and accuracy of the dense MNIST DEQ: vanilla vs Skip Reg. vs Skip DEQ per lambda_skip.

Trains each variant on the 8,000 training digits of the embedded mnist10k (Adam 1e-3, batch
32) with loss = cross-entropy + lambda_skip * skip_loss (+ lambda_jac * jac_loss for the
Jacobian-regularised row), then reports on the 2,000 test digits the mean NFE per test batch of
32, the accuracy, and the Hutchinson estimate of ||J_f(z*)||_F^2 / dim (mean over test batches)
before and after training. Prints a Markdown table.

    python bench/skip_lambda.py [--steps 500] [--seed 0] [--lambdas 0.01 0.1 1.0] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from raydeq.data import mnist10k
from raydeq.deq import hutchinson_jacobian_loss
from raydeq.models import EquilibriumClassifier, build

MEAN, STD = 0.1307, 0.3081


@dataclass(frozen=True)
class Run:
    """One training configuration: variant, skip-loss weight, Jacobian-loss weight."""

    variant: str
    lambda_skip: float = 0.0
    lambda_jac: float = 0.0

    @property
    def label(self) -> str:
        """Row label for the table."""
        extra = f", lambda_jac={self.lambda_jac:g}" if self.lambda_jac else ""
        return f"{self.variant} (lambda_skip={self.lambda_skip:g}{extra})"


def load(train: bool) -> tuple[Tensor, Tensor]:
    """Normalised images (N, 1, 28, 28) and labels of one split."""
    pixels, labels = mnist10k(train)
    return pixels.float().div(255.0).sub(MEAN).div(STD).unsqueeze(1), labels


def evaluate(model: EquilibriumClassifier, images: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy, mean NFE per batch of 32, and mean Frobenius estimate at z* on a split."""
    model.eval()
    correct, nfe, frob, batches = 0, 0, 0.0, 0
    for xb, yb in zip(images.split(32), labels.split(32), strict=True):
        with torch.no_grad():
            logits, out = model(xb)
            x = model.stem(xb)
            frob += float(hutchinson_jacobian_loss(lambda z, x=x: model.layer.f(z, x), out.z))
        correct += int((logits.argmax(1) == yb).sum())
        nfe += out.stats.nfe
        batches += 1
    model.train()
    return {"acc": 100.0 * correct / len(labels), "nfe": nfe / batches, "frob": frob / batches}


def train(run: Run, data: tuple[Tensor, Tensor, Tensor, Tensor], steps: int, seed: int) -> dict:
    """Train one configuration and return its test metrics before and after training."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = build({"model": "mnist_dense", "variant": run.variant, "jac_reg": run.lambda_jac > 0})
    before = evaluate(model, x_test, y_test)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    for step in range(steps):
        idx = order[(step * 32) % len(order) :][:32]
        logits, out = model(x_train[idx])
        loss = F.cross_entropy(logits, y_train[idx])
        loss = loss + run.lambda_skip * out.skip_loss + run.lambda_jac * out.jac_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    return {"before": before, "after": evaluate(model, x_test, y_test), "seconds": seconds}


def main() -> None:
    """Run every configuration and print the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--lambda-jac", type=float, default=1.0)
    parser.add_argument("--variants", nargs="+", default=["vanilla", "jac_reg", "skip_reg", "skip"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (128-wide layers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x_train, y_train = load(train=True)
    x_test, y_test = load(train=False)
    data = (x_train, y_train, x_test, y_test)
    runs = [Run("vanilla")] if "vanilla" in args.variants else []
    runs += [Run("vanilla", lambda_jac=args.lambda_jac)] if "jac_reg" in args.variants else []
    runs += [
        Run(v, lam) for v in ("skip_reg", "skip") if v in args.variants for lam in args.lambdas
    ]
    print(f"dense MNIST DEQ (vcab3), {args.steps} steps of batch 32, seed {args.seed}\n")
    print("| run | test NFE | test acc. (%) | ||J||_F^2/dim before -> after | train s |")
    print("|---|---|---|---|---|")
    for run in runs:
        r = train(run, data, args.steps, args.seed)
        a, b = r["after"], r["before"]
        print(
            f"| {run.label} | {a['nfe']:.2f} | {a['acc']:.2f} | "
            f"{b['frob']:.4f} -> {a['frob']:.4f} | {r['seconds']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
