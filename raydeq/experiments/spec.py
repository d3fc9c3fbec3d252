"""Experiment files -> trials: a base training config plus a `search` section.

EXPERIMENT names `tune_configs/EXPERIMENT.yaml` (shipped with the package too) or is the path
of such a file. The search section (schema: `raydeq.training.config.SearchSection`) holds
labelled variants, a space over Ray Tune's primitives and the trial scheduling.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.search.variant_generator import generate_variants

from raydeq.training.config import (
    Config,
    ConfigError,
    SearchSection,
    apply_overrides,
    parse_override,
    read_yaml,
    validate,
    validate_search,
    without,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "tune_configs"
VARIANT = "variant"
LABEL = "label"
PRIMITIVES = (
    "grid_search",
    "choice",
    "uniform",
    "quniform",
    "loguniform",
    "qloguniform",
    "randn",
    "qrandn",
    "randint",
    "qrandint",
    "lograndint",
    "qlograndint",
)


@dataclass(frozen=True)
class Experiment:
    """A named experiment: the base training config and its search (`raw`: both as written)."""

    name: str
    base: dict
    search: SearchSection
    raw: dict

    def param_space(self) -> dict[str, Any]:
        """Tune's param_space: the space, and a grid over the variants under VARIANT."""
        space = domain("search.space", self.search.space)
        variants = list(self.search.variants)
        return space | ({VARIANT: tune.grid_search(variants)} if variants else {})

    def trial_config(self, sampled: Mapping[str, Any]) -> Config:
        """The validated training config of one trial: base, then sampled values, then variant."""
        row = {k: v for k, v in sampled.get(VARIANT, {}).items() if k != LABEL}
        settings = merge(self.base, {k: v for k, v in sampled.items() if k != VARIANT})
        return validate(apply_overrides(settings, row))


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` as a string; numeric arguments of a primitive become floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def domain(key: str, spec: Any) -> Any:
    """A Ray Tune search domain from its YAML form `{primitive: arguments}`; other values as is.

    Mappings that are no primitive are sections and are converted key by key. Tune's
    `{"eval": ...}` form would run code from the file, so it is refused.
    """
    if not isinstance(spec, Mapping):
        return spec
    if "eval" in spec:
        raise ConfigError(f"{key}.eval: code is not run from experiment files; use {PRIMITIVES}")
    if len(spec) != 1 or next(iter(spec)) not in PRIMITIVES:
        return {name: domain(f"{key}.{name}", value) for name, value in spec.items()}
    ((primitive, args),) = spec.items()
    if primitive in ("grid_search", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{key}.{primitive}: expected a non-empty list of values")
        return getattr(tune, primitive)(args)
    try:
        if isinstance(args, Mapping):
            return getattr(tune, primitive)(**{k: _number(v) for k, v in args.items()})
        return getattr(tune, primitive)(*map(_number, args if isinstance(args, list) else [args]))
    except (TypeError, ValueError, AssertionError) as err:
        raise ConfigError(f"{key}.{primitive}: bad arguments {args!r} ({err})") from None


def merge(base: Mapping[str, Any], sampled: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `sampled` laid over it; sections are merged key by key."""
    result = dict(base)
    for key, value in sampled.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


def leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The values of a nested dict by dotted key (empty sections have none)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= leaves(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def locate(experiment: str) -> Path:
    """The YAML file of an experiment name (`tune_configs/NAME.yaml`) or path."""
    for candidate in (Path(experiment), Path("tune_configs") / f"{experiment}.yaml"):
        if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
            return candidate
    packaged = CONFIG_DIR / f"{experiment}.yaml"
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"{experiment}: no such experiment file; experiments: {known}")


def _fix(search: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The search section with the overridden keys fixed.

    An override of a key that the space varies removes it from the space; an override of a key
    that variants set keeps only the variants with that value.
    """
    space = search.get("space") or {}
    variants = search.get("variants") or []
    for dotted, value in overrides.items():
        space = without(space, dotted)
        variants = [row for row in variants if row.get(dotted, value) == value]
        if search.get("variants") and not variants:
            raise ConfigError(f"{dotted}={value!r}: no variant of search.variants has that value")
    return {**search, "space": space} | ({"variants": variants} if variants else {})


def from_dict(
    name: str, raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> Experiment:
    """An Experiment from a parsed YAML dict and dotted `key=value` overrides (see `_fix`).

    `search.workers_per_trial` sets the trials' `scaling.num_workers`; overrides come last.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}: expected a mapping of keys to values at the top level")
    overrides = overrides or {}
    search = raw.get("search")
    workers = search.get("workers_per_trial") if isinstance(search, Mapping) else None
    if isinstance(workers, int) and workers > 0:
        raw = apply_overrides(raw, {"scaling.num_workers": workers})
    raw = apply_overrides(raw, overrides)
    base = {key: value for key, value in raw.items() if key != "search"}
    search = raw.get("search") or {}
    if isinstance(search, Mapping):
        search = _fix(search, overrides)
    experiment = Experiment(name, base, validate_search(search), base | {"search": search})
    experiment.param_space()
    experiment.trial_config({})
    return experiment


def load(experiment: str, overrides: Sequence[str] = ()) -> Experiment:
    """Read `tune_configs/EXPERIMENT.yaml` (or a path), apply overrides, check the base."""
    path = locate(experiment)
    parsed = dict(parse_override(text) for text in overrides)
    return from_dict(path.stem, read_yaml(path), parsed)


def expand(experiment: Experiment, num_samples: int | None = None) -> list[dict[str, Any]]:
    """The sampled values of every trial Tune would start (grid x samples), without running.

    Random values are drawn once per sample and shared by that sample's grid points, as the
    search algorithm does (`constant_grid_search`), so seeds repeat one configuration.
    """
    samples = num_samples or experiment.search.num_samples
    return [
        resolved
        for _ in range(samples)
        for _, resolved in generate_variants(experiment.param_space(), constant_grid_search=True)
    ]


def describe(sampled: Mapping[str, Any], leave_out: tuple[str, ...] = ()) -> str:
    """The sampled values in words: the variant's label (or its settings), then the rest."""
    row = dict(sampled.get(VARIANT, {}))
    words = [row.pop(LABEL)] if LABEL in row else []
    values = ({} if words else row) | leaves({k: v for k, v in sampled.items() if k != VARIANT})
    words += [
        f"{key.rsplit('.', 1)[-1]}={_short(value)}"
        for key, value in values.items()
        if key not in leave_out
    ]
    return ", ".join(words)


def trial_name(trial: Any) -> str:
    """A readable, deterministic trial (and folder) name: its id and its sampled values."""
    words = describe(trial.config).replace(", ", "_").replace(" ", "-")
    return re.sub(r"[^A-Za-z0-9._=-]", "", f"{trial.trial_id}_{words}")[:100]


def _short(value: Any) -> str:
    """A value as it appears in names and table rows."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)
