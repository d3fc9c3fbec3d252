"""What `pip install .` and a built wheel get: pyproject.toml's metadata as setuptools reads it."""

import warnings
from pathlib import Path

from setuptools import Distribution
from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.warnings import SetuptoolsDeprecationWarning

ROOT = Path(__file__).resolve().parents[1]


def test_the_metadata_uses_nothing_that_setuptools_stops_building():
    """`license = { text = "MIT" }` warned on every build that setuptools stops building it
    after 2027-02-18, and `pip install .` takes the newest setuptools; the license is the
    SPDX expression that setuptools >= 77 reads."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SetuptoolsDeprecationWarning)
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "MIT"
