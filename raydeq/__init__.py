"""raydeq: Continuous Deep Equilibrium Models on PyTorch, orchestrated with Ray."""

from raydeq import models
from raydeq.deq import DEQ
from raydeq.neural_ode import NeuralODE
from raydeq.solvers import Solution, SolveStats, solve

__all__ = ["DEQ", "NeuralODE", "Solution", "SolveStats", "models", "solve"]
