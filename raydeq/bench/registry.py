"""The benchmarks by name, in the order a run reports them."""

from __future__ import annotations

from collections.abc import Callable

from raydeq.bench import (
    adjoints,
    depth_memory,
    discrete,
    node,
    overhead,
    peer_torchdeq,
    peer_torchdiffeq,
    skip,
    step_cost,
)
from raydeq.bench.context import Context
from raydeq.bench.report import Section

BENCHMARKS: dict[str, Callable[[Context], Section]] = {
    "node": node.run,
    "skip": skip.run,
    "discrete": discrete.run,
    "torchdeq": peer_torchdeq.run,
    "torchdiffeq": peer_torchdiffeq.run,
    "memory": depth_memory.run,
    "overhead": overhead.run,
    "adjoints": adjoints.run,
    "step_cost": step_cost.run,
}
