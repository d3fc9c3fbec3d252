"""What `pip install .` and a built wheel get: pyproject.toml's metadata as setuptools reads it."""

import ast
import re
import sys
import tomllib
import warnings
from pathlib import Path

from setuptools import Distribution
from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.warnings import SetuptoolsDeprecationWarning

ROOT = Path(__file__).resolve().parents[1]
# The distributions whose import names differ from their own.
DISTRIBUTIONS = {"PIL": "pillow", "sklearn": "scikit-learn", "yaml": "pyyaml"}


def test_the_metadata_uses_nothing_that_setuptools_stops_building():
    """`license = { text = "MIT" }` warned on every build that setuptools stops building it
    after 2027-02-18, and `pip install .` takes the newest setuptools; the license is the
    SPDX expression that setuptools >= 77 reads."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SetuptoolsDeprecationWarning)
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "MIT"


def imported_distributions(folder: Path, own: set[str]) -> set[str]:
    """The distributions of the modules that folder's Python files import, less the standard
    library's and own."""
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    names -= set(sys.stdlib_module_names) | own
    return {DISTRIBUTIONS.get(name, name).lower() for name in names}


def declared(requirements: list[str]) -> set[str]:
    """The distribution names of requirement strings."""
    return {re.match(r"[\w.-]+", r).group(0).lower() for r in requirements}


def test_every_distribution_the_code_imports_is_declared():
    """raydeq imported pandas, numpy and PIL, and the tests psutil, click and setuptools, which
    no requirement named (they came with Ray, torch or pip): each is now declared, raydeq's
    as dependencies (or the bench extra's), the tests' as dev's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dependencies = declared(project["dependencies"])
    extras = project["optional-dependencies"]
    tests = {path.stem for path in (ROOT / "tests").glob("*.py")}
    package = imported_distributions(ROOT / "raydeq", {"raydeq"})
    assert package - dependencies - declared(extras["bench"]) == set()
    own = {"raydeq"} | tests
    assert (
        imported_distributions(ROOT / "tests", own) - dependencies - declared(extras["dev"])
        == set()
    )
