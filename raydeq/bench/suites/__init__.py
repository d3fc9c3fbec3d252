"""The suites by name (each module's name), in the order a run reports them."""

from __future__ import annotations

from collections.abc import Callable

from raydeq.bench.harness.context import Context
from raydeq.bench.harness.report import Section
from raydeq.bench.suites import (
    adjoints,
    discrete,
    memory,
    node,
    overhead,
    skip,
    skip_lambda,
    step_cost,
    torchdeq,
    torchdiffeq,
    train_step,
)

MODULES = (
    node,
    skip,
    skip_lambda,
    discrete,
    torchdeq,
    torchdiffeq,
    memory,
    overhead,
    adjoints,
    step_cost,
    train_step,
)
SUITES: dict[str, Callable[[Context], Section]] = {
    module.__name__.rpartition(".")[2]: module.run for module in MODULES
}
