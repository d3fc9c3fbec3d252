"""Experiment files -> trials: a base training config plus a `search` section.

EXPERIMENT names `tune_configs/EXPERIMENT.yaml` (shipped with the package too) or is the path
of such a file. The search section (schema: `raydeq.training.config.SearchSection`) holds
labelled variants, a space over Ray Tune's primitives and the trial scheduling.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

import numpy as np
from ray import tune
from ray.tune.search.sample import Integer
from ray.tune.search.variant_generator import generate_variants

from raydeq.experiments import search as searchers
from raydeq.experiments.overrides import (
    check_fixed_in_rules,
    fix_search,
    fixed_in_rules,
    placed_as_written,
    rule_keys,
)
from raydeq.experiments.primitives import (
    PRIMITIVES,
    dimensions,
    domain,
    integer_ends,
    is_primitive,
    nested,
)
from raydeq.training import data
from raydeq.training.config import (
    GIVEN_DECIDED_BY,
    NO_SKIP_LOSS,
    WORKERS_KEY,
    Config,
    ConfigError,
    SearchSection,
    apply_overrides,
    check_given,
    in_file,
    leaves,
    merge,
    parse_overrides,
    read_yaml,
    validate,
    validate_search,
    without,
    workers_named,
)
from raydeq.training.preflight import as_begun
from raydeq.training.schema import build_section
from raydeq.training.storage import TRAIN_RUN, absolute, is_uri

CONFIG_DIR = Path(__file__).resolve().parents[1] / "tune_configs"
VARIANT = "variant"
# The settings that name a folder, made absolute where the experiment is read (see `pinned`).
PATH_KEYS = ("storage_path", "data.data_dir", "data.stage_to")
LABEL = "label"
# Settings that each trial sets for itself (`trial_config`): its Train run's name and label.
TRIAL_SETTINGS = ("name", LABEL)
# What `trial_config` sets them and the storage to, for each trial.
SET_BY_EACH_TRIAL = {
    "name": f"its run is {TRAIN_RUN!r} in its trial folder",
    LABEL: "its variant's label and its drawn values",
    "storage_path": "its trial folder",
}
STEPS_KEY = "train.max_steps"
# The checkpoints kept, which the experiment's one CheckpointConfig sets from the base config.
KEPT_KEY = "train.keep_checkpoints"
# The settings that decide how many steps a trial's epochs take (`trial_length`).
EPOCH_KEYS = ("train.epochs", "data.dataset", "data.batch_size", "data.fake_samples")


@dataclass(frozen=True)
class Experiment:
    """A named experiment: the base training config and its search (`raw`: both as written;
    `places`: the place as written of each variant and conditional rule, by list, where
    overrides dropped some)."""

    name: str
    base: dict
    search: SearchSection
    raw: dict
    places: dict[str, tuple[int, ...]]

    @property
    def searched(self) -> bool:
        """True when an Optuna searcher draws the trials (else Tune's grid and random sampling)."""
        return self.search.searcher != "random"

    def param_space(self) -> dict[str, Any]:
        """Tune's param_space: the space, and a grid over the variants under VARIANT (empty
        for a searcher, which draws every trial itself)."""
        if self.searched:
            return {}
        return domain("search.space", self.search.space) | self._variant_grid()

    def grid(self) -> dict[str, Any]:
        """The grid of `param_space` alone (its grid_search dimensions, by dotted key, and the
        variants), which decides how many trials a sample runs: a stored experiment's ranges
        may be ones that checks added since refuse."""
        grids = {
            key: domain(f"search.space.{key}", spec)
            for key, spec in dimensions(self.search.space).items()
            if is_primitive(spec) and "grid_search" in spec
        }
        return grids | self._variant_grid()

    def _variant_grid(self) -> dict[str, Any]:
        """A grid over the variants under VARIANT, empty without variants."""
        variants = list(self.search.variants)
        return {VARIANT: tune.grid_search(variants)} if variants else {}

    def space(self) -> searchers.Space:
        """The searcher's define-by-run space, the variants as its first points."""
        return searchers.space(self.base, self.search)

    def longest_trial(self) -> int:
        """The most training steps a trial takes (`longest`), 0 where that is unbounded."""
        return self.longest()[0]

    def longest(self) -> tuple[int, str]:
        """The most training steps a trial takes over the base or the variants (`trial_length`)
        and what ends that trial, (0, "") where that is unbounded: the search draws
        train.max_steps (as a dimension, or in a choice of whole `train` sections that sets it:
        `_draws`), or a trial trains for epochs of a size not known before its data is read
        (an image folder's, or one the search draws) and sets no train.max_steps."""
        search = self.search
        rules = (rule["space"] for rule in search.conditional)
        spaces = [dimensions(space) for space in (search.space, *rules)]
        if _drawn_in(spaces, STEPS_KEY):
            return 0, ""
        epochs_known = not any(_drawn_in(spaces, key) for key in EPOCH_KEYS)
        rows = [{VARIANT: row} for row in search.variants] or [{}]
        lengths = [trial_length(self.trial_config(row), epochs_known) for row in rows]
        return (0, "") if any(steps == 0 for steps, _ in lengths) else max(lengths)

    def drawn(self, settings: Mapping[str, Any]) -> list[str]:
        """The keys of `settings` (a trial's, dotted) that its search drew or its variant set:
        the space's and the variants' (in a choice of whole sections, those it sets: `_draws`),
        and a conditional rule's where the trial meets its `when`; a rule it does not meet drew
        nothing (train.lambda_skip of a vanilla DEQ, at the experiment's value to no effect),
        and a setting the drawn ones imply (a gmres adjoint's options) is none of them."""
        search = self.search
        rows = [{k: v for k, v in row.items() if k != LABEL} for row in search.variants]
        spaces = [dimensions(search.space), *rows]
        for rule in search.conditional:
            if all(
                _drawn_in(spaces, key)
                and any(searchers.same(a, settings.get(key)) for a in _as_list(allowed))
                for key, allowed in rule["when"].items()
            ):
                spaces.append(dimensions(rule["space"]))
        return [key for key in settings if _drawn_in(spaces, key)]

    def trial_config(self, sampled: Mapping[str, Any]) -> Config:
        """The validated training config of one trial (`trial_settings`)."""
        return validate(self.trial_settings(sampled))

    def trial_settings(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """The settings of one trial as given: base, then variant, then the sampled values (a
        dimension the space draws is honoured over a variant's setting)."""
        row = {k: v for k, v in sampled.get(VARIANT, {}).items() if k != LABEL}
        settings = apply_overrides(self.base, row)
        return merge(settings, {k: v for k, v in sampled.items() if k != VARIANT})


def trial_length(cfg: Config, epochs_known: bool) -> tuple[int, str]:
    """The steps a trial trains for, as its loop counts them, and what ends it, (0, "") where
    that is unbounded: train.max_steps, or its epochs where their steps are fewer and known
    before the data is read (the training set's size is, and `epochs_known`)."""
    samples = data.train_samples(cfg.data) if epochs_known else None
    per_epoch = samples // cfg.data.batch_size if samples else 0
    steps = cfg.train.max_steps
    if per_epoch and (not steps or cfg.train.epochs * per_epoch < steps):
        epochs = cfg.train.epochs * per_epoch
        return epochs, f"{epochs} steps (train.epochs: {cfg.train.epochs} of {per_epoch} steps)"
    return (steps, f"train.max_steps, {steps}") if steps else (0, "")


def _draws(key: str, spec: Any, dotted: str) -> bool:
    """Whether the space's dimension at `key` draws the setting `dotted`: it is that setting,
    or a choice of whole sections above it one of whose values sets it (a choice of
    `{lambda_skip: ...}` train sections leaves train.max_steps at the base's)."""
    if key == dotted:
        return True
    if not dotted.startswith(f"{key}."):
        return False
    values = next(iter(spec.values())) if is_primitive(spec) else None
    if not isinstance(values, list):
        return True
    inner = dotted.removeprefix(f"{key}.")
    return any(not isinstance(v, Mapping) or inner in leaves(v) for v in values)


def _drawn_in(spaces: Sequence[Mapping[str, Any]], dotted: str) -> bool:
    """Whether a dimension of `spaces` (dotted keys to primitives or values) draws `dotted`."""
    return any(_draws(key, spec, dotted) for dims in spaces for key, spec in dims.items())


def _as_list(value: Any) -> list[Any]:
    """A rule's `when` values: a list as it is, one value as a list of it."""
    return value if isinstance(value, list) else [value]


def shipped(path: Path) -> Path | None:
    """The experiment file shipped with raydeq that a `tune_configs/NAME.yaml` path names
    (found from a folder without tune_configs/ of its own), None for any other path."""
    packaged = CONFIG_DIR / path.name
    return packaged if path.parent == Path("tune_configs") and packaged.is_file() else None


def locate(experiment: str) -> Path:
    """The YAML file of an experiment name (`tune_configs/NAME.yaml`) or path."""
    for candidate in (Path(experiment), Path("tune_configs") / f"{experiment}.yaml"):
        if candidate.suffix.lower() in (".yaml", ".yml") and candidate.is_file():
            return candidate
    packaged = shipped(Path(experiment)) or CONFIG_DIR / f"{experiment}.yaml"
    if packaged.is_file():
        return packaged
    if experiment.strip() and Path(experiment).exists():  # Path("") is the current folder
        what = "a folder" if Path(experiment).is_dir() else "not a .yaml or .yml file"
        raise ConfigError(f"{experiment}: {what}; an experiment is a YAML file")
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    shown = experiment if experiment.strip() else repr(experiment)
    raise ConfigError(f"{shown}: no such experiment file; experiments: {known}")


def searched_keys(search: Any) -> set[str]:
    """The settings that a search section's space, conditional rules and variants set
    (malformed parts left to `validate_search`)."""
    if not isinstance(search, Mapping):
        return set()
    space, rules = search.get("space"), search.get("conditional")
    drawn = dimensions(space, once=False) if isinstance(space, Mapping) else ()
    keys = rule_keys(search) | set(drawn)
    for rule in rules if isinstance(rules, list) else []:
        when = rule.get("when") if isinstance(rule, Mapping) else None
        keys |= set(when) if isinstance(when, Mapping) else set()
    variants = search.get("variants")
    rows = variants if isinstance(variants, list) else []
    return keys | {k for row in rows if isinstance(row, Mapping) for k in row}


def from_dict(
    name: str,
    raw: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    *,
    stored: bool = False,
) -> Experiment:
    """An Experiment from a parsed YAML dict and dotted `key=value` overrides (see `fix_search`).

    `search.workers_per_trial`, the file's or an override's, sets the trials'
    `scaling.num_workers`; overrides of it come last.
    `stored`: the settings of a run that has started, read for --resume and --report, whose
    space is not checked for drawing (`check_draws`): results draw from no space, a resumed
    search from Tune's own state, so a check added since the run started must not refuse them.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}: expected a mapping of keys to values at the top level")
    # Pinned as the variants are, so that an override picks out the variant it names.
    overrides = _pinned_row(overrides or {})
    search = raw.get("search")
    workers = search.get("workers_per_trial") if isinstance(search, Mapping) else None
    workers = overrides.get("search.workers_per_trial", workers)
    if isinstance(workers, int) and workers > 0:
        raw = apply_overrides(raw, {WORKERS_KEY: workers})
    ruled = fixed_in_rules(search, overrides)
    raw = pinned(apply_overrides(raw, {k: v for k, v in overrides.items() if k not in ruled}))
    base = {key: value for key, value in raw.items() if key != "search"}
    search = raw.get("search") or {}
    places: dict[str, tuple[int, ...]] = {"variants": (), "conditional": ()}
    if isinstance(search, Mapping):
        given = {key: value for key, value in search.items() if value is not None}
        build_section(SearchSection, given, "search.")  # the types that `fix_search` reads
        space = search.get("space")
        search, places = fix_search(
            {**search, "space": nested(space, once=not stored)}
            if isinstance(space, Mapping)
            else search,
            overrides,
        )
        check_fixed_in_rules(search, {k: v for k, v in overrides.items() if k in ruled})
    # The base holds workers_per_trial's effect: the settings a run stores, read back for a
    # resume, must not apply it again over a --workers-per-trial or scaling.num_workers given.
    kept = search
    if isinstance(search, Mapping):
        kept = {k: v for k, v in search.items() if k != "workers_per_trial"}
    with placed_as_written(places):
        experiment = Experiment(
            name, base, validate_search(search), base | {"search": kept}, places
        )
        _check_searcher(experiment.search)
        try:
            experiment.trial_config({})
            if not stored:
                check_draws(experiment)
                _check_overrides_taken(experiment, overrides)
        except ConfigError as err:
            if leaves(base).get(WORKERS_KEY) != workers:  # set by scaling.num_workers
                raise
            raise workers_named(err, workers, f"search.workers_per_trial={workers}") from None
    return experiment


def _check_overrides_taken(experiment: Experiment, overrides: Mapping[str, Any]) -> None:
    """Raise `check_given`'s ConfigError for an override that takes effect in no variant (a
    `data.augment=true` for the digits), each override judged on its own, unless the space
    draws what decides it (the variant), for some trials: another variant's trials taking it,
    it is carried silently."""
    search = experiment.search
    spaces = [dimensions(search.space), *(dimensions(r["space"]) for r in search.conditional)]
    cfgs = []
    for row in search.variants or ({},):
        try:
            cfgs.append(experiment.trial_config({VARIANT: row}))
        except ConfigError:  # valid with the space's values only: some trials may take it
            return
    for key, value in overrides.items():
        if key not in GIVEN_DECIDED_BY or _drawn_in(spaces, GIVEN_DECIDED_BY[key]):
            continue
        refused = []
        for cfg in cfgs:
            try:
                check_given({key: value}, cfg)
            except ConfigError as err:
                refused.append(err)
        if len(refused) == len(cfgs):
            raise refused[0]


def pinned(raw: Mapping[str, Any]) -> dict[str, Any]:
    """`raw` with the relative folders of its base and variants (PATH_KEYS) made absolute here:
    a trial builds its config in a Ray worker that Tune runs in the trial's folder, and a
    stored experiment is resumed from any folder."""
    base = leaves({k: v for k, v in raw.items() if k != "search"})
    raw = apply_overrides(raw, {k: absolute(base[k]) for k in PATH_KEYS if _is_path(base.get(k))})
    search = raw.get("search")
    variants = search.get("variants") if isinstance(search, Mapping) else None
    if not isinstance(variants, list):
        return raw
    rows = [_pinned_row(row) if isinstance(row, Mapping) else row for row in variants]
    return raw | {"search": {**search, "variants": rows}}


def _pinned_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted settings (a variant, the overrides) with their relative folders made absolute."""
    return {k: absolute(v) if k in PATH_KEYS and _is_path(v) else v for k, v in row.items()}


def _is_path(value: Any) -> bool:
    """Whether a setting's value is a path to pin: a non-empty string (others are refused)."""
    return isinstance(value, str) and bool(value.strip())


def check_draws(experiment: Experiment) -> None:
    """Check that the space builds as Tune's domains or the searcher's distributions, and that
    every value it can draw makes a valid trial (`_check_space`)."""
    experiment.param_space()
    if experiment.searched:
        experiment.space()
    _check_space(experiment)


def _check_space(experiment: Experiment) -> None:
    """Check the space's keys, each variant (named in its error, the dimensions at their first
    values) and, in a trial config, the values the dimensions can take: each value of a
    `choice` or `grid_search` (each variant's, the other dimensions at their first values) and
    both ends of a range; a conditional dimension's with its rule's `when` met (at its first
    value). A trial draws its values at random, so a bad one would otherwise fail only the
    trials that draw it, after the run has started."""
    search = experiment.search
    for i, row in enumerate(search.variants):
        for key in [key for key in row if key != LABEL]:  # a variant's label labels its trials
            _check_per_trial(key, f"search.variants[{i}]")
            _check_not_drawn(experiment, key, row[key], f"search.variants[{i}]")
    spaces = [("search.space", {}, search.space)] + [
        (f"search.conditional[{i}].space", _first_values(rule["when"]), rule["space"])
        for i, rule in enumerate(search.conditional)
    ]
    tried = [(where, fixed, _space_values(where, space)) for where, fixed, space in spaces]
    firsts = {key: pairs[0][1] for key, pairs in tried[0][2].items()}
    # Without variants too, so that a dimension's bad first value is named, not the value of
    # another dimension that is tried first and fails with it.
    for i, row in enumerate(search.variants or ({},)):
        try:
            check_given(row, experiment.trial_config(apply_overrides({VARIANT: row}, firsts)))
        except ConfigError as err:
            if err.key in firsts and err.key not in row:  # the space's first value is bad
                what, value = tried[0][2][err.key][0]
                raise _value_error("search.space", err.key, what, value, err) from None
            if search.variants:
                key = f"search.variants[{i}]"
                raise ConfigError(f"{key}: {err}", key=key) from None
    _check_variants_differ(experiment, firsts)
    for where, fixed, values in tried:
        for row in search.variants or ({},):
            for key, pairs in values.items():
                for what, value in pairs:
                    sampled = apply_overrides({VARIANT: row}, firsts | fixed | {key: value})
                    try:
                        experiment.trial_config(sampled)
                    except ConfigError as err:
                        raise _value_error(where, key, what, value, err) from None
    if not experiment.searched:
        _check_grid_apart(experiment)


def _value_error(where: str, key: str, what: str, value: Any, err: ConfigError) -> ConfigError:
    """The refusal of a value the space at `where` can draw for `key`, naming the value."""
    return ConfigError(
        f"{where}.{key}: {what} {value!r}: {_unprefixed(err, key)}", key=f"{where}.{key}"
    )


def _check_not_drawn(experiment: Experiment, dotted: str, value: Any, where: str) -> None:
    """Raise a ConfigError for a variant's setting that the space of Tune's grid and random
    sampling draws too, over the variant's (a searcher's variants are points of its space):
    every trial of the variant would run the drawn values, not this one."""
    if not experiment.searched and dotted in dimensions(experiment.search.space):
        raise ConfigError(
            f"{where}.{dotted}: search.space draws {dotted} for every trial, over this "
            f"variant's {value!r}, so this changes nothing; remove it from the variant or from "
            "search.space",
            key=f"{where}.{dotted}",
        )


def _check_variants_differ(experiment: Experiment, firsts: Mapping[str, Any]) -> None:
    """Raise a ConfigError for a variant whose trials train as an earlier one's (`_as_run`),
    the space at its `firsts` values for both (Tune's grid and random sampling set its keys
    over a variant's; a searcher's points are its values): written alike, or alike once the
    base config, the overrides and the defaults fill in what one leaves unset, or differing in
    their labels alone. The results would average them as seeds."""
    search = experiment.search
    sampled = {} if experiment.searched else firsts
    runs = [
        _as_run(experiment.trial_config(apply_overrides({VARIANT: row}, sampled)))
        for row in search.variants
    ]
    for index, run in enumerate(runs):
        if run not in runs[:index]:
            continue
        first = runs.index(run)
        rows = (search.variants[first], search.variants[index])
        keys = sorted({k for row in rows for k in row if k != LABEL})
        differ = [k for k in keys if rows[0].get(k, rows) != rows[1].get(k, rows)]
        shown = f" (their trials run {', '.join(differ)} at the same value)" if differ else ""
        raise ConfigError(
            f"search.variants[{index}]: runs the same trials as search.variants[{first}]{shown}, "
            "which the results would count as more seeds of one configuration; remove it, or "
            "change a setting",
            key=f"search.variants[{index}]",
        )


def _as_run(cfg: Config) -> dict[str, Any]:
    """A trial's settings as it trains with them: its config, less the name and label that
    each trial sets for itself, and less train.lambda_skip where its variant trains no skip
    loss."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in TRIAL_SETTINGS}
    return without(settings, "train.lambda_skip") if cfg.model.variant in NO_SKIP_LOSS else settings


def _unprefixed(err: ConfigError, key: str) -> str:
    """The message of `err` without its leading `key`, which the space's error names already."""
    message = str(err)
    return message.removeprefix(f"{key}: ") if err.key == key else message


def _space_values(where: str, space: Mapping[str, Any]) -> dict[str, list[tuple[str, Any]]]:
    """The values `_check_space` tries of each dimension of a space written at `where` that
    has any, after checking its keys and the folders it draws (in PATH_KEYS' order)."""
    dims = dimensions(space)
    for key in dims:
        _check_key(key, where)
        _check_per_trial(key, where)
        _check_listed_once(f"{where}.{key}", dims[key])
    values = {key: _values(f"{where}.{key}", spec) for key, spec in dims.items()}
    for key in PATH_KEYS:
        for what, value in values.get(key, ()):
            _check_searched_folder(f"{where}.{key}", what, value)
    return {key: pairs for key, pairs in values.items() if pairs}


def _check_listed_once(where: str, spec: Any) -> None:
    """Raise a ConfigError for a grid value listed twice (a seed twice): Tune runs the same
    trials again, which the results would average as further seeds of one configuration."""
    values = spec.get("grid_search") if is_primitive(spec) else None
    for index, value in enumerate(values if isinstance(values, list) else ()):
        if value in values[:index]:
            raise ConfigError(
                f"{where}.grid_search: {value!r} is listed twice; each value of a grid runs "
                "trials of its own, which the results would count as more seeds of one "
                "configuration; list it once",
                key=f"{where}.grid_search",
            )


def _check_grid_apart(experiment: Experiment) -> None:
    """Raise a ConfigError for two trials of a sample of Tune's grid that train alike
    (`_as_run`), named by the grid dimension they differ in where they differ in one: a value
    written otherwise ("1e-3", quoted and so text, beside 0.001; null beside the preset's
    value), or a train.lambda_skip that their model trains without. Tune runs each trial of
    the grid, which the results would average as further seeds of one configuration."""
    trials = expand(experiment, 1)
    runs = [_as_run(experiment.trial_config(sampled)) for sampled in trials]
    for index, run in enumerate(runs):
        if run not in runs[:index]:
            continue
        seeds = "which the results would count as more seeds of one configuration"
        pair = (trials[runs.index(run)], trials[index])
        flat = [leaves({k: v for k, v in t.items() if k != VARIANT}) for t in pair]
        differ = sorted(
            k for k in flat[0].keys() | flat[1].keys() if flat[0].get(k) != flat[1].get(k)
        )
        if len(differ) != 1 or pair[0].get(VARIANT) != pair[1].get(VARIANT):
            raise ConfigError(
                f"search.space: the trials [{describe(pair[0])}] and [{describe(pair[1])}] "
                f"train alike, {seeds}; change the space or the variants so that they differ",
                key="search.space",
            )
        where = f"search.space.{differ[0]}.grid_search"
        values = f"{flat[0][differ[0]]!r} and {flat[1][differ[0]]!r}"
        variant = run["model"]["variant"]
        if differ == ["train.lambda_skip"] and variant in NO_SKIP_LOSS:
            shown = describe(pair[1], tuple(differ))
            raise ConfigError(
                f"{where}: {values} run the same trials ({f'[{shown}]' if shown else 'theirs'}: "
                f"a {variant} model trains no skip loss), {seeds}; set train.lambda_skip in "
                "search.variants, in those that train a skip loss",
                key=where,
            )
        raise ConfigError(
            f"{where}: {values} run the same trials (their trials run it at the same value), "
            f"{seeds}; list one of them",
            key=where,
        )


def _check_searched_folder(where: str, what: str, value: Any) -> None:
    """Raise a ConfigError for a relative folder that a space draws: a trial would read it
    from its own folder, where Tune runs it (the base's and the variants' are `pinned`)."""
    if _is_path(value) and not is_uri(value) and not os.path.isabs(os.path.expanduser(value)):
        raise ConfigError(
            f"{where}: {what} {value!r} is a relative folder, which each trial would read from "
            f"its own trial folder; write it absolute ({absolute(value)!r}) or set it in "
            "search.variants, whose folders are read from here",
            key=where,
        )


def _check_per_trial(dotted: str, where: str) -> None:
    """Raise a ConfigError for a setting that a trial would set and does not run: a `scaling`
    one (the resources of every trial, its process, its workers' CPUs and GPUs, and the trials
    at once are reserved from the base config's), a `search` one (a trial runs no search),
    and the name, label and folder that `trial_config` gives each trial; and the checkpoints
    kept, which Tune keeps by the base config's count for every trial."""
    section = dotted.split(".", 1)[0]
    if section == "scaling":
        raise ConfigError(
            f"{where}.{dotted}: the scaling section is the same for every trial (their resources "
            "are reserved from it); set it in the base config, or search.workers_per_trial, or "
            "run an experiment for each value",
            key=f"{where}.{dotted}",
        )
    if section == "search":
        raise ConfigError(
            f"{where}.{dotted}: a trial runs no search of its own, so this would change "
            "nothing; set it in the experiment's search section",
            key=f"{where}.{dotted}",
        )
    if dotted == KEPT_KEY:
        raise ConfigError(
            f"{where}.{dotted}: Tune keeps every trial's checkpoints by the base config's "
            f"{KEPT_KEY}, so this changes nothing; set it in the base config",
            key=f"{where}.{dotted}",
        )
    if dotted in SET_BY_EACH_TRIAL:
        raise set_by_each_trial(f"{where}.{dotted}", dotted, f"{where}.{dotted}")


def set_by_each_trial(shown: str, key: str, where: str) -> ConfigError:
    """The error for `key`, given as `shown` at the setting `where`, that `trial_config` sets
    for each trial (its run's name and label, and its folder), so that the given one would
    change nothing."""
    return ConfigError(
        f"{shown}: each trial sets its own {key} ({SET_BY_EACH_TRIAL[key]}), so this changes "
        "nothing; name the experiment with --name, store it with --storage, label trials in "
        "search.variants",
        key=where,
    )


def _first_values(when: Mapping[str, Any]) -> dict[str, Any]:
    """A conditional rule's `when` met at the first value it allows for each key."""
    return {key: _as_list(v)[0] for key, v in when.items()}


def _values(key: str, spec: Any) -> list[tuple[str, Any]]:
    """The values of a dimension that `_check_space` tries, each with its name: a choice's or a
    grid's values, a range's ends (an integer range's as Tune draws them: `integer_ends`),
    a constant (an override fixed in a rule), a normal's mean as it draws it (a float) and
    values far either side of it, which it draws too: it has no bound."""
    if not is_primitive(spec):
        return [("the value", spec)]
    ((primitive, args),) = spec.items()
    if primitive in ("choice", "grid_search"):
        what = "the choice" if primitive == "choice" else "the grid value"
        return [(what, value) for value in args]
    made = domain(key, spec)
    lower, upper = getattr(made, "lower", None), getattr(made, "upper", None)
    if not math.isfinite(lower) or not math.isfinite(upper):  # a normal, randn or qrandn
        sampler = made.get_sampler()
        q = getattr(sampler, "q", None)
        mean = sampler.sampler.mean if q else sampler.mean
        unbounded = f"the draws of {primitive} {args!r}, which have no bound, reach"
        return [
            ("the mean", float(np.round(mean / q) * q if q else mean)),
            (unbounded, -1e308),
            (unbounded, 1e308),
        ]
    if isinstance(made, Integer):
        lower, upper = integer_ends(made)
    else:  # a float range draws floats, also between whole ends (uniform [5, 51])
        lower, upper = float(lower), float(upper)
    return [("the lower bound", lower), ("the upper bound", upper)]


def _check_key(dotted: str, where: str = "search.space") -> None:
    """Raise a ConfigError naming a space's key that is no setting, or that goes below one
    (`optim.lr.gird_search`: a mapping under a setting is read as a primitive, and that one
    is no primitive's name)."""
    kind: Any = Config
    for i, part in enumerate(parts := dotted.split(".")):
        section = ".".join(parts[:i])
        if not is_dataclass(kind) and part in PRIMITIVES:
            raise ConfigError(
                f"{where}.{section}: {part!r} is given beside other keys; a dimension is one "
                f"primitive with its arguments inside it ({{{part}: [...]}}, or by name: "
                f"{{{part}: {{NAME: VALUE}}}})",
                key=f"{where}.{section}",
            )
        if not is_dataclass(kind):
            raise ConfigError(
                f"{where}.{section}: {part!r} is not a search primitive; use one of "
                f"{', '.join(PRIMITIVES)}",
                key=f"{where}.{section}",
            )
        names = [f.name for f in fields(kind)]
        if part not in names:
            raise ConfigError(
                f"{where}.{dotted}: unknown key; allowed keys in {section or 'config'}: "
                f"{', '.join(names)}",
                key=f"{where}.{dotted}",
            )
        kind = get_type_hints(kind)[part]
        if dict in (kind, *get_args(kind)):  # a mapping setting (solver_options) takes any key
            return


def _check_searcher(search: SearchSection) -> None:
    """Conditional dimensions and a second objective need an Optuna searcher."""
    for key, given in (("conditional", search.conditional), ("cost", search.cost)):
        if given and search.searcher == "random":
            raise ConfigError(
                f"search.{key}: needs searcher tpe or nsga2 (random sampling has no "
                "conditional dimensions and no objectives)",
                key=f"search.{key}",
            )


def _check_trial_settings(raw: Any) -> None:
    """Raise a ConfigError for a top-level `name:` or `label:` in an experiment file, which
    `raydeq.train` reads but each trial of `raydeq.tune` sets for itself."""
    for key in TRIAL_SETTINGS:
        if isinstance(raw, Mapping) and key in raw:
            raise set_by_each_trial(f"{key}: {raw[key]}", key, key)


def load(experiment: str, overrides: Sequence[str] = (), *, stored: bool = False) -> Experiment:
    """Read `tune_configs/EXPERIMENT.yaml` (or a path), apply overrides, check the base
    (`stored`: see `from_dict`)."""
    path = locate(experiment)
    parsed = parse_overrides(overrides)
    raw = read_yaml(path)
    try:
        if not stored:
            _check_trial_settings(raw)
        return from_dict(path.stem, raw, parsed, stored=stored)
    except ConfigError as err:
        raise in_file(err, path, parsed) from None


def expand(experiment: Experiment, num_samples: int | None = None) -> list[dict[str, Any]]:
    """The sampled values of every trial Tune would start (grid x samples), without running.

    Random values are drawn once per sample and shared by that sample's grid points, as the
    search algorithm does (`constant_grid_search`), so seeds repeat one configuration; they are
    drawn from the experiment's seed, as the run draws them. A searcher's trials are its
    points, then random draws from its space.
    """
    samples = num_samples or experiment.search.num_samples
    seed = experiment.trial_config({}).seed
    if experiment.searched:
        return searchers.sample(experiment.space(), samples, seed)
    draws = np.random.default_rng(seed)  # one stream for every sample, as Tune's generator
    return [
        resolved
        for _ in range(samples)
        for _, resolved in generate_variants(
            experiment.param_space(), constant_grid_search=True, random_state=draws
        )
    ]


def check_repeats(experiment: Experiment, num_samples: int | None = None) -> None:
    """Raise a ConfigError for more samples than the space has points to draw (`_points`; a
    searcher's, and its variants outside its ranges): past them, each sample of Tune's grid
    and random sampling repeats a point's trials, seeds and all, and a searcher's trials repeat
    a point; the results would average them as further seeds of one configuration."""
    search = experiment.search
    samples = num_samples or search.num_samples
    spaces = [search.space, *(rule["space"] for rule in search.conditional)]
    counts = [(k, _points(k, v)) for space in spaces for k, v in dimensions(space).items()]
    points = math.prod(count for _, count in counts)
    outside = searchers.points_outside(experiment.space()) if experiment.searched else 0
    where = "search.num_samples" if num_samples is None else "--num-samples"
    if samples <= points + outside:
        _check_repeats_without_skip_loss(experiment, samples, counts, where)
        if not experiment.searched and samples > 1 and math.isfinite(points):
            _check_draws_apart(experiment, samples, where)
        return
    seeds = "which the results would count as more seeds of one configuration"
    drawn = ", ".join(f"{key}: {count} values" for key, count in counts if count > 1)
    drawn += f"{', ' if drawn else ''}{outside} variants outside its ranges" if outside else ""
    if experiment.searched and points + outside > 1:
        raise ConfigError(
            f"{where}: {samples} trials of a search over {points + outside} points ({drawn}) "
            f"repeat one or more, {seeds}; set {points + outside} or fewer, or widen "
            "search.space",
            key=where,
        )
    if experiment.searched:
        raise ConfigError(
            f"{where}: {samples} trials of a search whose space draws nothing run {samples} "
            f"alike, {seeds}; set 1, or give search.space a dimension to draw",
            key=where,
        )
    if points > 1:
        repeat = _first_repeat(experiment, points)
        most = points if repeat is None else repeat[0]
        chance = (
            ""
            if repeat is None
            else f" (sample {most + 1} would draw sample {repeat[1] + 1}'s point again by "
            "chance: the draws come from the experiment's seed)"
        )
        raise ConfigError(
            f"{where}: {samples} samples of a space of {points} points at random ({drawn}) "
            f"draw a point again, its trials seeds and all, {seeds}; set {most}"
            f"{' or fewer' * (most > 1)}{chance}, or list the values in grid_search and set 1, "
            "to run each point once",
            key=where,
        )
    raise ConfigError(
        f"{where}: {samples} samples of a space that draws nothing at random run each trial "
        f"{samples} times alike, {seeds}; set 1, and list seeds in "
        "search.space.seed: {grid_search: [...]}",
        key=where,
    )


def _check_draws_apart(experiment: Experiment, samples: int, where: str) -> None:
    """Raise a ConfigError where Tune's random sampling of a space of few points draws one
    again by chance (a choice of 3 solvers, 3 samples: bs3 twice): the draws come from the
    experiment's seed (`expand`), so the repeat is known before the run, whose results would
    average its trials, seeds and all, as further seeds of one configuration."""
    repeat = _first_repeat(experiment, samples)
    if repeat is None:
        return
    index, first, drawn = repeat
    values = describe(drawn, leave_out=tuple(experiment.grid()))
    raise ConfigError(
        f"{where}: sample {index + 1} of {samples} draws {values} again, as sample "
        f"{first + 1} did (the draws come from the experiment's seed), and "
        "would run its trials again, seeds and all, which the results would count as more "
        f"seeds of one configuration; set {index}, or list the values in grid_search and "
        "set 1, to run each point once",
        key=where,
    )


def _first_repeat(
    experiment: Experiment, samples: int, leave_out: str | None = None
) -> tuple[int, int, dict[str, Any]] | None:
    """The first of `samples` samples of Tune's random sampling that draws an earlier one's
    point (the dotted key `leave_out` aside): its index, the earlier one's and its draws (the
    variant left out), or None. The draws come from one stream (`expand`), so fewer samples
    draw the same ones first."""
    trials = expand(experiment, samples)
    each = len(trials) // samples  # a sample's grid: its first trial holds its draws
    draws = [{k: v for k, v in trials[i * each].items() if k != VARIANT} for i in range(samples)]
    kept = [without(drawn, leave_out) if leave_out else drawn for drawn in draws]
    for index, point in enumerate(kept):
        if point in kept[:index]:
            return index, kept.index(point), draws[index]
    return None


def _check_repeats_without_skip_loss(
    experiment: Experiment, samples: int, counts: list[tuple[str, float]], where: str
) -> None:
    """Raise a ConfigError (naming `where` the sample count is set) where Tune's random
    sampling draws train.lambda_skip (of `counts`, the space's dimensions and their points)
    and a trial of its grid (a variant's, a grid value's of model.variant) is of a model
    without a skip loss, which trains the same at every value, and the samples are more than
    the other dimensions have points, or draw their values again by chance: its trials
    repeat, seeds and all (a space of lambda_skip alone runs a vanilla DEQ's trials `samples`
    times alike)."""
    drawn = dict(counts)
    if experiment.searched or "train.lambda_skip" not in drawn or drawn.get("model.variant", 1) > 1:
        return
    points = math.prod(count for key, count in counts if key != "train.lambda_skip")
    repeat = _first_repeat(experiment, min(samples, points), "train.lambda_skip")
    if samples <= points and repeat is None:
        return
    most = points if repeat is None else repeat[0]
    trials = expand(experiment, most + 1)
    each = len(trials) // (most + 1)
    for sampled in trials[-each:]:  # the grid of the sample that repeats
        variant = experiment.trial_config(sampled).model.variant
        if variant not in NO_SKIP_LOSS:
            continue
        shown = describe(sampled, leave_out=("train.lambda_skip",))
        drawn = f"the trials{f' of [{shown}]' if shown else ''}, a {variant} model,"
        if repeat is None:
            how = f"{samples} samples draw {drawn} from {points} point{'s' * (points != 1)} at most"
        else:
            how = (
                f"sample {most + 1} of {samples} draws {drawn} again, as sample {repeat[1] + 1} "
                "did (the draws come from the experiment's seed)"
            )
        raise ConfigError(
            f"{where}: {how}: it trains no skip loss, so train.lambda_skip changes nothing in "
            "them, and they repeat, seeds and all, which the results would count as more seeds "
            f"of one configuration; set {most}{' or fewer' * (most > 1)}, or draw "
            "train.lambda_skip for the skip variants alone (searcher tpe with a conditional rule)",
            key=where,
        )


def _points(key: str, spec: Any) -> float:
    """How many values a dimension draws at random: a choice's distinct ones, an integer
    range's or a quantized float range's steps, one for a grid (each sample runs all of it)
    and a constant, and infinitely many for a float range or a normal."""
    if not is_primitive(spec) or "grid_search" in spec:
        return 1
    if "choice" in spec:
        values = spec["choice"]
        return sum(1 for i, value in enumerate(values) if value not in values[:i])
    made = domain(key, spec)
    q = getattr(made.get_sampler(), "q", None)
    if isinstance(made, Integer):
        least, greatest = integer_ends(made)
        return int((greatest - least) // (q or 1)) + 1  # a whole count for a step of 1.0 too
    if q is None or not math.isfinite(made.lower) or not math.isfinite(made.upper):
        return math.inf
    return round(made.upper / q) - round(made.lower / q) + 1


def trial_count(experiment: Experiment, num_samples: int | None = None) -> int:
    """How many trials `expand` lists, without drawing them."""
    samples = num_samples or experiment.search.num_samples
    if experiment.searched:
        return samples
    grid = generate_variants(experiment.grid(), constant_grid_search=True)
    return samples * sum(1 for _ in grid)


def trial_config(
    experiment: Experiment, sampled: Mapping[str, Any], trial_dir: str, named: bool = True
) -> Config:
    """The config a trial trains with in its folder `trial_dir`: its Train run there
    (`<trial>/train`), labelled as its lines name it (`trial_label`), not named and stored as
    the file says; one that leaves train.lambda_skip to its preset at the value its checkpoints
    were trained with before the default's change (`preflight.as_begun`), read where the folder
    is `named` (not a placeholder for the name Tune gives a trial as it starts)."""
    label = trial_label(experiment, sampled)
    where = {"name": TRAIN_RUN, "label": label, "storage_path": trial_dir}
    settings = experiment.trial_settings(merge(sampled, where))
    cfg = validate(settings)
    if not named or leaves(settings).get("train.lambda_skip") is not None:
        return cfg
    return as_begun(cfg, [trial_dir, cfg.run_dir])


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


def trial_label(experiment: Experiment, sampled: Mapping[str, Any]) -> str:
    """A trial's label in its lines and config: its sampled values in words (`describe`), or
    the experiment's name where it samples none (a file of one point), which named it `[]`."""
    return describe(sampled) or experiment.name


def trial_name(trial: Any) -> str:
    """A readable, deterministic trial (and folder) name: its id and its sampled values."""
    words = describe(trial.config).replace(", ", "_").replace(" ", "-")
    return re.sub(r"[^A-Za-z0-9._=-]", "", f"{trial.trial_id}_{words}")[:100]


def _short(value: Any) -> str:
    """A value as it appears in names and table rows."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)
