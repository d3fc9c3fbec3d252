"""raydeq: Continuous Deep Equilibrium Models on PyTorch, orchestrated with Ray."""

from raydeq.solvers import Solution, SolveStats, solve

__all__ = ["Solution", "SolveStats", "solve"]
