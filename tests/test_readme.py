"""The README's Python examples run as written and compute what the text around them says: the
first, the one a reader runs first, z* = f(z*) and the implicit gradient of sum(z*), against a
dense reference; the next two load a run's model and tighten its gradients. Its tables keep
every cell where GitHub renders them, and the tests, paths and reports it cites exist."""

import contextlib
import copy
import io
import re
from pathlib import Path

import pytest
import torch

from raydeq import models
from raydeq.training import checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: thread sync dominates

README = Path(__file__).resolve().parents[1] / "README.md"
# The run folder the loading example names, relative to the folder the command ran in.
RUN = "runs/digits-mnist_dense-skip_reg-1a2b3c4d"


def python_blocks() -> list[str]:
    """The README's Python blocks, in order."""
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def solver_example() -> str:
    """The Python block of the README's section on `raydeq.solve`."""
    section = README.read_text().split("## The solver core: `raydeq.solve`", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_every_python_block_of_the_readme_is_one_these_tests_run():
    """A new example is run here too: the blocks are the solver's, loading and tightening."""
    blocks = python_blocks()
    assert len(blocks) == 3 and blocks[0] == solver_example()
    assert "load_model(" in blocks[1] and "layer.adjoint_options" in blocks[2]


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


def test_every_row_of_a_readme_table_has_its_headers_cells():
    """A pipe left unescaped in a cell (a norm's ||x||) splits it, and GitHub drops the cells
    past the header's: the paper-settings row on termination lost its source's end and its
    reason. Cells split where GitHub splits them, at each pipe without a backslash."""
    rows = []
    for table in re.findall(r"(?:^\|.*\n)+", README.read_text(), re.MULTILINE):
        header, *body = table.splitlines()
        count = len(re.split(r"(?<!\\)\|", header.strip("|")))
        rows += [row for row in body if len(re.split(r"(?<!\\)\|", row.strip("|"))) != count]
    assert rows == []


def test_every_test_path_and_benchmark_report_the_readme_cites_exists():
    """The README cites tests by name or file, repository paths, and dated reports of
    benchmarks/results (some as `...-<suffix>.md`, after one named in full); a rename leaves a
    citation that leads nowhere. A `test_` name that no test defines is a metric the code
    reports (`test_nfe`); an upper-case path (`tune_configs/EXPERIMENT.yaml`) a placeholder."""
    root, text = README.parent, README.read_text()
    results = {path.name for path in (root / "benchmarks/results").iterdir()}
    tests = "".join(path.read_text() for path in (root / "tests").glob("test_*.py"))
    code = "".join(path.read_text() for path in (root / "raydeq").rglob("*.py"))
    cited = re.findall(r"\btest_\w+", text)
    roots = r"(?<![\w/.~-])(?:raydeq|tests|tune_configs|cluster|benchmarks)/"
    paths = re.findall(roots + r"[a-z0-9_./-]*[a-z0-9_]", text)
    reports = re.findall(r"\b20\d\d-\d\d-\d\d-[\w.-]*\w", text)
    endings = re.findall(r"\.\.\.(-[\w.-]*\w)", text)
    missing = [
        name
        for name in cited
        if f"def {name}(" not in tests
        and not (root / "tests" / f"{name}.py").exists()
        and f'"{name}' not in code
    ]
    missing += [path for path in paths if not (root / path).exists()]
    missing += [name for name in reports if name not in results]
    missing += [end for end in endings if not any(name.endswith(end) for name in results)]
    assert len(cited) > 100 and len(paths) > 20 and len(reports) > 20 and missing == []


def stored_run(folder: Path, variant: str) -> torch.nn.Module:
    """A run of the dense model stored in `folder` (its checkpoint of step 1), as built."""
    torch.manual_seed(1)
    settings = {"model": {"model": "mnist_dense", "variant": variant}}
    model = models.build(settings["model"])
    state = {"step": 1, "model": model.state_dict(), "settings": settings}
    checkpoint.write_checkpoint(state, folder / "checkpoint_000001")
    return model.eval()


def run_block(block: str, scope: dict) -> dict:
    """Run a README block with the names in scope (a block's names stay in it)."""
    exec(compile(block, str(README), "exec"), scope)
    return scope


def test_the_readme_loading_example_gives_the_stored_runs_model(tmp_path, monkeypatch):
    """Run in the folder that holds the run it names, the example's logits and NFE are those of
    the model the run stored, evaluated as a run evaluates it: without gradients, where the
    example's call with them gave f(z*, x) and one evaluation more."""
    model = stored_run(tmp_path / RUN, "skip_reg")
    monkeypatch.chdir(tmp_path)
    images = torch.randn(4, 1, 28, 28)
    scope = run_block(python_blocks()[1], {"images": images})
    with torch.no_grad():
        logits, out = model(images)
    assert torch.equal(scope["logits"], logits) and not scope["logits"].requires_grad
    assert scope["out"].stats.nfe == out.stats.nfe > 0


def image_gradient_error(model: torch.nn.Module) -> float:
    """The relative error, along a random direction, of the float64 model's gradient of one
    logit with respect to its images, against central differences of its logits solved to
    1e-11 (by a copy, so that the model keeps its settings)."""
    model = model.double()
    images = torch.randn(2, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    model(images)[0][:, 3].sum().backward()
    direction = torch.randn_like(images)
    reference = copy.deepcopy(model)
    reference.layer.abstol, reference.layer.reltol, reference.layer.max_steps = 1e-11, 1e-11, 10**5
    with torch.no_grad():
        ahead = reference(images + 1e-3 * direction)[0][:, 3].sum()
        behind = reference(images - 1e-3 * direction)[0][:, 3].sum()
    differences = float(ahead - behind) / 2e-3
    return abs(float((images.grad * direction).sum()) - differences) / abs(differences)


def test_the_readme_tightening_example_makes_a_loaded_deqs_gradients_accurate(
    tmp_path, monkeypatch
):
    """Run on a loaded DEQ, the example takes the float64 gradients with respect to its images
    from 2% or more off central differences to about 1e-6."""
    stored_run(tmp_path / RUN, "skip_reg")
    monkeypatch.chdir(tmp_path)
    loaded = run_block(python_blocks()[1], {"images": torch.randn(4, 1, 28, 28)})["model"]
    assert image_gradient_error(loaded) > 1e-2
    tightened = run_block(python_blocks()[2], {"model": loaded})["model"]
    assert image_gradient_error(tightened) < 1e-6


def test_the_readme_tightening_example_runs_on_a_loaded_neural_ode(tmp_path, monkeypatch):
    """A Neural ODE of the mnist_dense experiment has no adjoint_options, which the example
    read and failed on ('NeuralODE' object has no attribute 'adjoint_options'), and its
    max_steps of 10,000 steps, which the example cut to 1,000; the example now sets its
    tolerances, at which its continuous adjoint integrates too, and leaves its max_steps."""
    stored_run(tmp_path / RUN, "neural_ode")
    monkeypatch.chdir(tmp_path)
    loaded = run_block(python_blocks()[1], {"images": torch.randn(4, 1, 28, 28)})["model"]
    layer = run_block(python_blocks()[2], {"model": loaded})["layer"]
    assert (layer.abstol, layer.reltol, layer.max_steps) == (1e-8, 1e-8, 10_000)
