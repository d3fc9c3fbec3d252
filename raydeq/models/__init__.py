"""The paper's models, built by name from a plain config dict: `raydeq.models.build(cfg)`."""

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from raydeq.deq import DEQ
from raydeq.models.classifier import EquilibriumClassifier, Parts
from raydeq.models.dense import DenseCell, DenseConfig
from raydeq.models.mdeq import MDEQConfig, MultiscaleCell
from raydeq.models.presets import PRESETS, Preset
from raydeq.neural_ode import NODE_ADJOINTS, NODE_DYNAMICS, NeuralODE
from raydeq.solvers import ADJOINTS, CONTINUOUS, DISCRETE
from raydeq.solvers.adjoint import IMPLICIT_ADJOINTS
from raydeq.solvers.interval import INTERVAL_SOLVERS
from raydeq.solvers.options import choice, option_dict

VARIANTS = ("vanilla", "skip", "skip_reg", "neural_ode")
DEFAULT_VARIANT = "skip_reg"
DEFAULT_SOLVER = "vcab3"
INITS = {"vanilla": "zeros", "skip": "skip", "skip_reg": "skip_reg"}
# Options set by the variant and solver, not by the layer's keyword options.
FIXED = ("f", "init", "skip", "solver")


def _options(layer: type, options: dict[str, Any]) -> dict[str, Any]:
    """Check that every key is an option of `layer`, raising ValueError naming the bad ones."""
    allowed = set(inspect.signature(layer).parameters) - set(FIXED)
    unknown = sorted(set(options) - allowed)
    if unknown:
        keys = ", ".join(["model", "variant", "solver", *sorted(allowed)])
        raise ValueError(f"unknown {layer.__name__} option(s) {unknown}; allowed keys: {keys}")
    return options


def _defaults(layer: type) -> dict[str, Any]:
    """The keyword defaults of a layer's constructor."""
    parameters = inspect.signature(layer).parameters.values()
    return {p.name: p.default for p in parameters if p.name not in FIXED}


def resolve(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The complete options of the model a config names, checked without building it.

    Returns model, variant, solver and every option of the layer (DEQ or NeuralODE): the
    config's (a null one is unset), else the preset's (tolerances; for a DEQ also max_steps,
    the warm-up's steps and depth and the implicit adjoints' limits), else the layer's
    default (a Neural ODE takes NeuralODE's max_steps, not the preset's solve limit, and
    trains by the continuous adjoint, the paper's baseline). The one validator of model
    options, by the layer's own constructor: raises a TypeError (a value of the wrong type) or
    ValueError naming the key and the allowed values.
    """
    if not isinstance(cfg, Mapping):
        raise TypeError(
            f"a model config is a dict such as {{'model': 'mnist_dense'}}, got "
            f"{type(cfg).__name__} {cfg!r}"
        )
    options = dict(cfg)
    name = options.pop("model", None)
    choice("model", name, tuple(PRESETS))
    variant = options.pop("variant", DEFAULT_VARIANT)
    choice("variant", variant, VARIANTS)
    solver = options.pop("solver", DEFAULT_SOLVER)
    # A null option is unset, as in a config section and the one each checkpoint records.
    options = {k: v for k, v in options.items() if v is not None}
    preset = PRESETS[name]
    tolerances = {"abstol": preset.abstol, "reltol": preset.reltol}
    where = f" for variant {variant!r}"
    if variant == "neural_ode":
        choice("solver", solver, INTERVAL_SOLVERS, where)
        layer, defaults, adjoints = NeuralODE, tolerances, NODE_ADJOINTS
    else:
        choice("solver", solver, CONTINUOUS + DISCRETE, where)
        defaults = {
            **tolerances,
            "max_steps": preset.max_steps,
            "pretrain_steps": preset.pretrain_steps,
            "pretrain_depth": preset.pretrain_depth,
            # The preset's linear-solver limits apply to the implicit adjoints only; a copy,
            # which the caller may change without changing the preset.
            "adjoint_options": dict(preset.adjoint_options)
            if options.get("adjoint", "gmres") in IMPLICIT_ADJOINTS
            else {},
        }
        layer, adjoints = DEQ, ADJOINTS
    resolved = {**_defaults(layer), **defaults, **_options(layer, options)}
    if layer is DEQ and options.get("adjoint_options") is not None:  # given keys over the preset's
        given = option_dict("adjoint_options", options["adjoint_options"])
        resolved["adjoint_options"] = {**defaults["adjoint_options"], **given}
    choice("adjoint", resolved["adjoint"], adjoints, where)
    # The layer's constructor checks each option (t1, jac_reg, compile, divergence, ...) with
    # its own validator; a placeholder cell, which it never calls, builds nothing.
    layer(nn.Identity(), solver=solver, **resolved)
    return {"model": name, "variant": variant, "solver": solver, **resolved}


def build(cfg: Mapping[str, Any]) -> EquilibriumClassifier:
    """Build the classifier a config names: `logits, out = build(cfg)(images)`.

    cfg["model"] names a preset (see PRESETS), cfg["variant"] is "vanilla", "skip",
    "skip_reg" (default, DEFAULT_VARIANT) or "neural_ode", cfg["solver"] one of raydeq's
    solvers (default "vcab3"; a Neural ODE takes the continuous ones). Every other key is an
    option of the layer (DEQ or NeuralODE) and overrides the preset's, or is null, unset (see
    `resolve`): a checkpoint's recorded settings["model"] builds its model. The
    skip-loss weight is the training objective's (the preset's recommendation is
    PRESETS[name].lambda_skip).
    """
    options = resolve(cfg)
    parts = PRESETS[options.pop("model")].parts()
    variant, solver = options.pop("variant"), options.pop("solver")
    if variant == "neural_ode":
        layer = NeuralODE(parts.cell, solver=solver, **options)
    else:
        init = INITS[variant]
        skip = parts.skip if variant == "skip" else None
        layer = DEQ(parts.cell, init=init, skip=skip, solver=solver, **options)
    return EquilibriumClassifier(parts.stem, layer, parts.head)


__all__ = [
    "DEFAULT_SOLVER",
    "DEFAULT_VARIANT",
    "NODE_ADJOINTS",
    "NODE_DYNAMICS",
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
    "resolve",
]
