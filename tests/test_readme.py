"""The README's first example, the one a reader runs first, runs as written and computes what
it says: z* = f(z*) and the implicit gradient of sum(z*), against a dense reference."""

import contextlib
import io
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def solver_example() -> str:
    """The Python block of the README's section on `raydeq.solve`."""
    section = README.read_text().split("## The solver core: `raydeq.solve`", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_solve_example_runs_and_its_gradient_is_the_implicit_one():
    """Run the block with stdout captured; its z* is a fixed point of tanh(W z + x), and its
    x.grad equals D (I - W^T D)^{-1} 1 per sample, D = diag(1 - z*^2), solved densely."""
    torch.manual_seed(0)
    scope: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(solver_example(), str(README), "exec"), scope)
    nfe, converged, nvjp = printed.getvalue().split()
    assert int(nfe) > 0 and converged == "tensor(True)" and int(nvjp) > 0
    W, x, z = scope["W"].double(), scope["x"].detach().double(), scope["sol"].z.detach().double()
    assert (z - torch.tanh(z @ W.T + x)).abs().max() < 1e-2
    D = 1 - torch.tanh(z @ W.T + x) ** 2
    eye = torch.eye(W.shape[0], dtype=torch.float64)
    expected = torch.stack([d * torch.linalg.solve(eye - W.T * d, torch.ones_like(d)) for d in D])
    assert torch.allclose(scope["x"].grad.double(), expected, rtol=1e-2, atol=1e-2)
