"""Pure-PyTorch solver core: forward solvers, termination, GMRES, adjoints and statistics."""

from raydeq.solvers.adjoint import ImplicitAdjoint, JacobianFree, Unrolled
from raydeq.solvers.gmres import GMRES, LinearSolveInfo
from raydeq.solvers.linear import Neumann
from raydeq.solvers.solve import ADJOINTS, CONTINUOUS, DISCRETE, SOLVERS, Solution, solve
from raydeq.solvers.stats import SolveStats
from raydeq.solvers.termination import Status, Termination

__all__ = [
    "ADJOINTS",
    "CONTINUOUS",
    "DISCRETE",
    "GMRES",
    "SOLVERS",
    "ImplicitAdjoint",
    "JacobianFree",
    "LinearSolveInfo",
    "Neumann",
    "Solution",
    "SolveStats",
    "Status",
    "Termination",
    "Unrolled",
    "solve",
]
