"""The paper's models, built by name from a plain config dict: `raydeq.models.build(cfg)`."""

import inspect
from collections.abc import Mapping
from typing import Any

from raydeq.deq import DEQ, NeuralODE
from raydeq.models.classifier import EquilibriumClassifier, Parts
from raydeq.models.dense import DenseCell, DenseConfig
from raydeq.models.mdeq import MDEQConfig, MultiscaleCell
from raydeq.models.presets import PRESETS, Preset
from raydeq.solvers import CONTINUOUS, DISCRETE

VARIANTS = ("vanilla", "skip", "skip_reg", "neural_ode")
DEFAULT_VARIANT = "skip_reg"
DEFAULT_SOLVER = "vcab3"
INITS = {"vanilla": "zeros", "skip": "skip", "skip_reg": "skip_reg"}
# torchdiffeq's closest method to each continuous solver: bosh3 is BS3; dopri5 is, like
# Tsit5, a 5(4) FSAL pair; VCAB3 (variable-coefficient Adams) has no torchdiffeq equivalent,
# so it maps to the adaptive third-order bosh3; adaptive_heun is Euler's embedded pair.
ODE_METHODS = {"vcab3": "bosh3", "bs3": "bosh3", "tsit5": "dopri5", "euler": "adaptive_heun"}


def _options(layer: type, options: dict[str, Any]) -> dict[str, Any]:
    """Check that every key is an option of `layer`, raising ValueError naming the bad ones."""
    allowed = set(inspect.signature(layer).parameters) - {"f", "init", "skip", "solver"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"unknown {layer.__name__} option(s) {unknown}; allowed: {', '.join(sorted(allowed))}"
        )
    return options


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raise ValueError naming the bad config value and the allowed ones."""
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(map(repr, allowed))}")


def build(cfg: Mapping[str, Any]) -> EquilibriumClassifier:
    """Build the classifier a config names: `logits, out = build(cfg)(images)`.

    cfg["model"] names a preset (see PRESETS), cfg["variant"] is "vanilla", "skip",
    "skip_reg" (default, DEFAULT_VARIANT) or "neural_ode", cfg["solver"] one of raydeq's
    solvers (default "vcab3"; for neural_ode it picks the torchdiffeq method via ODE_METHODS
    unless cfg["method"] is given). Every other key is an option of the layer (DEQ or
    NeuralODE) and overrides the preset's. The skip-loss weight is the training objective's
    (the preset's recommendation is PRESETS[name].lambda_skip).
    """
    options = dict(cfg)
    name = options.pop("model", None)
    _choice("model", name, tuple(PRESETS))
    variant = options.pop("variant", DEFAULT_VARIANT)
    _choice("variant", variant, VARIANTS)
    solver = options.pop("solver", DEFAULT_SOLVER)
    preset = PRESETS[name]
    parts = preset.parts()
    tolerances = {"abstol": preset.abstol, "reltol": preset.reltol}
    if variant == "neural_ode":
        _choice("solver", solver, CONTINUOUS)
        defaults = {**tolerances, "method": ODE_METHODS[solver]}
        layer = NeuralODE(parts.cell, **_options(NeuralODE, {**defaults, **options}))
    else:
        _choice("solver", solver, CONTINUOUS + DISCRETE)
        defaults = {
            **tolerances,
            "max_steps": preset.max_steps,
            "pretrain_steps": preset.pretrain_steps,
            # The preset's linear-solver limits apply to the implicit adjoints only.
            "adjoint_options": preset.adjoint_options
            if options.get("adjoint", "gmres") in ("gmres", "fixed_point")
            else {},
        }
        layer = DEQ(
            parts.cell,
            init=INITS[variant],
            skip=parts.skip if variant == "skip" else None,
            solver=solver,
            **_options(DEQ, {**defaults, **options}),
        )
    return EquilibriumClassifier(parts.stem, layer, parts.head)


__all__ = [
    "DEFAULT_SOLVER",
    "DEFAULT_VARIANT",
    "ODE_METHODS",
    "PRESETS",
    "VARIANTS",
    "DenseCell",
    "DenseConfig",
    "EquilibriumClassifier",
    "MDEQConfig",
    "MultiscaleCell",
    "Parts",
    "Preset",
    "build",
]
