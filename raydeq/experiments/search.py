"""Optuna searchers for experiment files: TPE or NSGA-II through Ray Tune's `OptunaSearch`.

The space is define-by-run: the unconditional dimensions of `search.space` first, then each
rule of `search.conditional` whose `when` holds for the values drawn so far (Anderson's memory
only when the solver is anderson). The variants are the paper's points, evaluated first. A
search with a `cost` has two objectives: `metric` (its `mode`) and the cost (minimised).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils.util import unflatten_dict

from raydeq.experiments.primitives import dimensions, domain, is_primitive
from raydeq.solvers.options import parameters
from raydeq.solvers.solve import make_solver
from raydeq.training.config import (
    Config,
    ConfigError,
    SearchSection,
    apply_overrides,
    leaves,
    validate,
)

# Tune's OptunaSearch nests parameter names at "/": "model/solver" sets model.solver.
SEPARATOR = "/"
LABEL_KEY = f"variant{SEPARATOR}label"
SOLVER_OPTIONS = "model.solver_options."


def distribution(key: str, spec: Any) -> BaseDistribution | Any:
    """The Optuna distribution of a primitive (a constant stays as it is)."""
    if not is_primitive(spec):
        return spec
    if "grid_search" in spec:
        raise ConfigError(
            f"{key}.grid_search: a searcher draws every trial; use choice (or searcher random)",
            key=f"{key}.grid_search",
        )
    if "qloguniform" in spec:  # Tune's conversion drops q, and Optuna draws off its steps
        raise ConfigError(
            f"{key}.qloguniform: Optuna cannot quantize a log range; use loguniform, quniform "
            "(or searcher random)",
            key=f"{key}.qloguniform",
        )
    tune_domain = domain(key, spec)
    if "qrandint" in spec:
        _check_integer_steps(key, tune_domain.lower, tune_domain.upper, tune_domain.sampler.q)
    try:
        with optuna_silenced(WHOLE_CHOICES), tune_log_dropped(LOG_STEP_IGNORED):
            return OptunaSearch.convert_search_space({"x": tune_domain})["x"]
    except ValueError as err:
        raise ConfigError(f"{key}: Optuna cannot sample {spec!r} ({err})", key=key) from None


# Optuna's warning at each categorical of other than plain values (a choice of whole sections,
# dicts) that persistent storage cannot hold them: a search keeps its study in memory, and Tune
# pickles it, so the draws are right and the lines, one per choice at every draw, noise.
WHOLE_CHOICES = "Choices for a categorical distribution"
# Optuna's warning at a point's value outside its dimension's range, given in the middle of a
# run once per such value: `outside_notes` says it before the run, and the point runs at its
# value, as meant.
POINT_OUTSIDE = "Fixed parameter .* is out of range"


# Tune's warning at each conversion of a quantized log range that Optuna will probably ignore
# its step: a qlograndint's q of 1 is the step Optuna draws, and one above 1 is refused.
LOG_STEP_IGNORED = "Optuna does not handle quantization in loguniform"
TUNE_OPTUNA_LOGGER = "ray.tune.search.optuna.optuna_search"


@contextlib.contextmanager
def tune_log_dropped(message: str) -> Iterator[None]:
    """Drop the log records of Tune's Optuna searcher whose text starts with `message`."""
    logger = logging.getLogger(TUNE_OPTUNA_LOGGER)

    def kept(record: logging.LogRecord) -> bool:
        """False (dropped) for a record starting with `message`."""
        return not record.getMessage().startswith(message)

    logger.addFilter(kept)
    try:
        yield
    finally:
        logger.removeFilter(kept)


@contextlib.contextmanager
def optuna_silenced(message: str) -> Iterator[None]:
    """Silence Optuna's UserWarnings whose text starts with `message` (a regular expression)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message, UserWarning, "optuna")
        yield


def _check_integer_steps(key: str, lower: int, upper: int, q: int) -> None:
    """Raise a ConfigError for a qrandint that Optuna would draw otherwise than Tune does:
    Optuna steps from lower (1, 5, 9 for lower 1, q 4) where Tune rounds to multiples of q (4,
    8), and at q = 1 Tune leaves out the upper bound, which Optuna draws."""
    if q == 1:
        raise ConfigError(
            f"{key}.qrandint: q = 1 leaves out {upper} under searcher random and draws it under "
            f"Optuna; use randint [{lower}, {upper}] (upper left out) or [{lower}, {upper + 1}]",
            key=f"{key}.qrandint",
        )
    if lower % q:
        raise ConfigError(
            f"{key}.qrandint: lower bound {lower} is not a multiple of q = {q}, which Optuna "
            "steps from and Tune rounds to; use a lower bound that is a multiple of q",
            key=f"{key}.qrandint",
        )


def suggest(trial: optuna.Trial, name: str, dist: BaseDistribution | Any) -> Any:
    """Draw `name` from its distribution through the trial's public `suggest_*` methods (the
    ones Tune's OptunaSearch records); a constant is returned as it is."""
    if isinstance(dist, CategoricalDistribution):
        with optuna_silenced(WHOLE_CHOICES):
            return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return dist


def same(written: Any, value: Any) -> bool:
    """Whether a variant's or a rule's value is an override's, numbers compared as numbers: a
    value written as the text '1e-3' is the 0.001 of optim.lr=1e-3, as a trial reads it (two
    texts are compared as written)."""
    if isinstance(written, str) and isinstance(value, str):
        return written == value
    return _as_number(written) == _as_number(value)


def _as_number(value: Any) -> Any:
    """A text that is a number as that number (a float), any other value as it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


@dataclass(frozen=True)
class Rule:
    """Dimensions that exist only when every `when` key holds one of its values."""

    when: dict[str, tuple]
    space: dict[str, Any]

    def holds(self, drawn: Mapping[str, Any]) -> bool:
        """True when the values drawn so far satisfy `when`."""
        return all(
            _name(key) in drawn and any(same(a, drawn[_name(key)]) for a in allowed)
            for key, allowed in self.when.items()
        )

    def words(self) -> str:
        """The rule's `when` in words."""
        return " and ".join(f"{k} in {list(v)}" for k, v in self.when.items())


@dataclass(frozen=True)
class Space:
    """The define-by-run space (a plain object, so the searcher's state pickles with it).

    Called with an Optuna trial it returns every value by parameter name, and the label of the
    paper's point it is: the points are enqueued before any trial is asked, so they are the
    study's first trials (a later draw of a point's values is the searcher's, not the paper's).
    """

    space: dict[str, Any]
    rules: tuple[Rule, ...]
    points: tuple[tuple[str, dict[str, Any]], ...]

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        _sample_relative(trial)
        with optuna_silenced(POINT_OUTSIDE):
            drawn = {_name(key): suggest(trial, _name(key), d) for key, d in self.space.items()}
            for rule in self.rules:
                if rule.holds(drawn):
                    drawn |= {_name(k): suggest(trial, _name(k), d) for k, d in rule.space.items()}
        if trial.number < len(self.points):
            return drawn | {LABEL_KEY: self.points[trial.number][0]}
        return drawn

    def distributions(self) -> dict[str, Any]:
        """Every dotted key the space can set, with its distribution."""
        return self.space | {key: d for rule in self.rules for key, d in rule.space.items()}


def _sample_relative(trial: optuna.Trial) -> None:
    """Have the sampler see the trial, a point too: Optuna samples a trial's relative values
    (where NSGA-II records its generation) at its first value that is not given, so NSGA-II
    left every point out of its generations and never bred from them."""
    trial.relative_params  # noqa: B018 (the property samples them)


def _name(dotted: str) -> str:
    """An Optuna parameter name from a dotted config key."""
    return dotted.replace(".", SEPARATOR)


def rule_parts(where: str, raw: Any) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """A `search.conditional` entry's `when` and `space`, or a ConfigError naming what is not
    a mapping of just those two keys, each a non-empty mapping."""
    if not isinstance(raw, Mapping) or set(raw) != {"when", "space"}:
        got = ", ".join(map(str, raw)) if isinstance(raw, Mapping) else repr(raw)
        raise ConfigError(f"{where}: expected the keys when and space, got {got}", key=where)
    when, space = raw["when"], raw["space"]
    if not isinstance(when, Mapping) or not when:
        raise ConfigError(
            f"{where}.when: expected a mapping of dotted keys to values", key=f"{where}.when"
        )
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(
            f"{where}.space: expected a mapping of keys to primitives", key=f"{where}.space"
        )
    return when, space


def _rule(index: int, raw: Mapping[str, Any]) -> Rule:
    """One `search.conditional` entry, checked."""
    where = f"search.conditional[{index}]"
    when, space = rule_parts(where, raw)
    allowed = {k: tuple(v) if isinstance(v, list) else (v,) for k, v in when.items()}
    dims = {k: distribution(f"{where}.space.{k}", v) for k, v in dimensions(space).items()}
    return Rule(allowed, dims)


def _default(cfg: Config, dotted: str) -> Any:
    """A setting's value as the trial runs it (`validate` resolves the model's defaults, and an
    unset solver option is the solver's own), or None where there is none."""
    value: Any = cfg.to_dict()
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None and dotted.startswith(SOLVER_OPTIONS):
        return _solver_default(cfg.model.solver, dotted.removeprefix(SOLVER_OPTIONS))
    return value


def _solver_default(solver: str, option: str) -> Any:
    """The value a solver (a continuous one: its step controller) takes for an option it is not
    given, or None for no such option (a method of its name is none: vcab3's `memory`)."""
    made = make_solver(solver, {})
    holder = getattr(made, "controller", made)
    return getattr(holder, option) if option in parameters(type(holder)) else None


def _defaults(cfg: Config, dims: Mapping[str, Any]) -> dict[str, Any]:
    """The values the trial runs with for these dimensions (a constant's own value)."""
    return {
        _name(k): _default(cfg, k) if isinstance(d, BaseDistribution) else d
        for k, d in dims.items()
    }


def _point(cfg: Config, space: Space, settings: Mapping[str, Any]) -> dict[str, Any]:
    """A variant's settings, and every other dimension it draws (the conditional ones whose
    rule holds for it) at the value the trial runs with where there is one."""
    given = {_name(k): v for k, v in settings.items()}
    point = _defaults(cfg, space.space) | given
    for rule in space.rules:
        if rule.holds(point):
            point |= _defaults(cfg, rule.space) | given
    return {name: value for name, value in point.items() if value is not None}


def _points(base: Mapping[str, Any], search: SearchSection, space: Space) -> tuple:
    """The variants as points of the space, each a (label, point)."""
    dists, drawn_in = space.distributions(), _drawn_in(space)
    points = []
    for index, row in enumerate(search.variants):
        settings = {k: v for k, v in row.items() if k != "label"}
        for key in settings:
            if key not in dists:
                raise ConfigError(
                    f"search.variants[{index}].{key}: not a dimension of the search space; a "
                    "searcher's variants are points of its space",
                    key=f"search.variants[{index}].{key}",
                )
        try:
            cfg = validate(apply_overrides(base, settings))
        except ConfigError as err:
            raise ConfigError(
                f"search.variants[{index}]: {err}", key=f"search.variants[{index}]"
            ) from None
        point = _point(cfg, space, settings)
        _check_rules_met(f"search.variants[{index}]", settings, point, space)
        for key, dist in dists.items():
            if _name(key) in point:
                where, dimension = f"search.variants[{index}].{key}", f"{drawn_in[key]} {key}"
                if key not in settings:
                    _check_unset_choice(where, dimension, dist, point[_name(key)])
                point[_name(key)] = _point_value(where, dimension, dist, point[_name(key)])
        points.append((row.get("label", point_label(index)), point))
    if len(points) > search.num_samples:
        raise ConfigError(
            f"search.num_samples: {search.num_samples} is fewer than the {len(points)} variants "
            "the search evaluates first",
            key="search.num_samples",
        )
    return tuple(points)


def point_label(index: int) -> str:
    """The label of a point whose variant gives none: its place in search.variants."""
    return f"point {index}"


def _check_rules_met(
    where: str, settings: Mapping[str, Any], point: Mapping[str, Any], space: Space
) -> None:
    """Raise a ConfigError for a point's setting of a conditional dimension whose rule's `when`
    the point does not meet: the searcher draws the dimension only where its rule holds, so the
    point's trial would run at the experiment's value."""
    drawn = {_name(k): point[_name(k)] for k in space.space if _name(k) in point}
    for index, rule in enumerate(space.rules):
        if rule.holds(drawn):
            drawn |= {_name(k): point[_name(k)] for k in rule.space if _name(k) in point}
            continue
        for key in [key for key in rule.space if key in settings]:
            raise ConfigError(
                f"{where}.{key}: search.conditional[{index}] draws it only when {rule.words()}, "
                f"which the point does not meet, so its trial would run at the experiment's "
                f"value, not at {settings[key]!r}; leave the key out of the point, or meet the "
                "rule's when",
                key=f"{where}.{key}",
            )


def _check_unset_choice(
    where: str, dimension: str, dist: BaseDistribution | Any, value: Any
) -> None:
    """Raise a ConfigError for a categorical dimension that a point leaves unset at the
    experiment's value, which is none of its choices (a whole section, `optim`, is not shown:
    the base's whole section, every setting of it, is too long to read)."""
    if not isinstance(dist, CategoricalDistribution) or _point_choices(value, dist.choices):
        return
    if any(isinstance(choice, Mapping) for choice in dist.choices):
        raise ConfigError(
            f"{where}: the point leaves it unset, and the experiment's section differs in a "
            f"setting from each of the {len(dist.choices)} whole sections that {dimension} "
            "chooses from; make the experiment's section agree with one of them",
            key=where,
        )
    raise ConfigError(
        f"{where}: the point leaves it unset, and the experiment's {value!r} is none of the "
        f"choices of {dimension} ({', '.join(map(repr, dist.choices))}); give the point one "
        "of them",
        key=where,
    )


def _point_value(where: str, dimension: str, dist: BaseDistribution | Any, value: Any) -> Any:
    """A point's value of a dimension as it is enqueued (a choice as the choice Optuna draws),
    or a ConfigError at `where` for one the searcher cannot give: no choice of a categorical
    dimension, another value than a fixed one's, or 0 or below in a log range, which Optuna
    refuses to record."""
    if isinstance(dist, CategoricalDistribution):
        found = _point_choices(value, dist.choices)
        if not found:
            raise ConfigError(
                f"{where}: {value!r} is not a choice of {dimension} "
                f"({', '.join(map(str, dist.choices))})",
                key=where,
            )
        return found[0]
    if not isinstance(dist, BaseDistribution) and not same(value, dist):
        raise ConfigError(
            f"{where}: {value!r} is not {dimension}, which is fixed at {dist!r} for every trial, "
            f"the point's too; give the point {dist!r}, or leave the key out of it",
            key=where,
        )
    if isinstance(dist, FloatDistribution | IntDistribution) and dist.log and float(value) <= 0:
        raise ConfigError(
            f"{where}: {value!r} is not a value of {dimension}, a {_words(dist)}, which holds "
            "none of 0 or below, so the searcher could not record the point; give the point a "
            "value above 0, or draw the key from a range that is not logarithmic",
            key=where,
        )
    return value


def _matches(value: Any, choices: Sequence[Any] | None) -> list[Any]:
    """The choices of a categorical dimension that `value` is, numbers compared as numbers as
    `same` does ('1e-3' is the choice 0.001); [value] for a dimension without choices."""
    return [value] if choices is None else [c for c in choices if same(value, c)]


def _point_choices(value: Any, choices: Sequence[Any]) -> list[Any]:
    """The choices a point's value is (`_matches`), or for a whole section (the trial's every
    setting of it, its tuples read as the lists a choice writes) those whose settings it
    holds: laid over it, they change none."""
    found = _matches(value, choices)
    if found or not isinstance(value, Mapping):
        return found
    held = {k: list(v) if isinstance(v, tuple) else v for k, v in leaves(value).items()}
    return [
        c
        for c in choices
        if isinstance(c, Mapping)
        and all(k in held and same(v, held[k]) for k, v in leaves(c).items())
    ]


def space(base: Mapping[str, Any], search: SearchSection) -> Space:
    """The checked define-by-run space of a searcher experiment, its variants as points."""
    dims = {k: distribution(f"search.space.{k}", v) for k, v in dimensions(search.space).items()}
    rules = tuple(_rule(i, raw) for i, raw in enumerate(search.conditional))
    known = dict(dims)
    drawn_in = dict.fromkeys(dims, "search.space")
    for index, rule in enumerate(rules):
        _check_drawn_once(index, rule, drawn_in)
        for key, values in rule.when.items():
            where = f"search.conditional[{index}].when.{key}"
            if key not in known:
                raise ConfigError(f"{where}: not a dimension drawn before it", key=where)
            choices = getattr(known[key], "choices", None)  # a categorical dimension's values
            missing = [v for v in values if not _matches(v, choices)]
            if missing:
                raise ConfigError(
                    f"{where}: {missing[0]!r} is not one of its choices "
                    f"{', '.join(map(repr, choices))}, so the rule would never apply",
                    key=where,
                )
        known |= rule.space
    unconditional = Space(dims, rules, ())
    return Space(dims, rules, _points(base, search, unconditional))


def _check_drawn_once(index: int, rule: Rule, drawn_in: dict[str, str]) -> None:
    """Raise a ConfigError for a rule's dimension that the space or an earlier rule draws too:
    Optuna keeps a trial's first value of a name (a value outside the rule's range) and refuses
    a name's second kind of distribution, failing trials after the run has started."""
    where = f"search.conditional[{index}]"
    for key in rule.space:
        if key in drawn_in:
            raise ConfigError(
                f"{where}.space.{key}: drawn by {drawn_in[key]} too; Optuna draws a setting "
                "once a trial from one distribution, so draw it in one place",
                key=f"{where}.space.{key}",
            )
        drawn_in[key] = where


def objectives(search: SearchSection) -> tuple[list[str], list[str]]:
    """The searcher's metrics and modes: [metric], or [metric, cost] with [mode, min].

    Always lists: OptunaSearch then reads the metrics from a trial's last report only, where
    with one metric it would read each report, and reports between evaluations have none.
    """
    costs = [] if search.cost is None else [search.cost]
    return [search.metric, *costs], [search.mode, *(["min"] if costs else [])]


def sampler(search: SearchSection, seed: int) -> optuna.samplers.BaseSampler:
    """TPE (conditional-aware, with a constant liar for trials that run at once) or NSGA-II."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if search.searcher == "nsga2":
            population = search.population_size or None
            return optuna.samplers.NSGAIISampler(
                seed=seed, **({"population_size": population} if population else {})
            )
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True
        )


class LimitWithinCapacity(ConcurrencyLimiter):
    """Tune's ConcurrencyLimiter, with its bound on live trials computed when a run starts and
    again when a resume unpickles it (Tune restores the limiter pickled at the first start, so
    a resumed search would keep the cluster of its first start)."""

    def __init__(self, searcher: Searcher, bound: Callable[[], int]) -> None:
        super().__init__(searcher, max_concurrent=bound())
        self.bound = bound

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle, then bound the live trials by the cluster of now."""
        self.__dict__.update(state)
        self.max_concurrent = self.bound()

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore the state Tune saved with the run (how a resume restores the search), but
        this raydeq's bound, then bound the live trials by the cluster of now."""
        super().set_state(state | {"bound": self.bound})
        self.max_concurrent = self.bound()


def searcher(space: Space, search: SearchSection, seed: int, bound: Callable[[], int]) -> Searcher:
    """Tune's OptunaSearch over the space, the points enqueued first, limited to bound()
    trials at once (TPE learns from the finished ones)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metric, mode = objectives(search)
    optuna_search = OptunaSearch(
        space=space,
        metric=metric,
        mode=mode,
        points_to_evaluate=[dict(point) for _, point in space.points],
        sampler=sampler(search, seed),
    )
    return LimitWithinCapacity(optuna_search, bound)


def sample(space: Space, count: int, seed: int) -> list[dict[str, Any]]:
    """What a search would start with, without Ray: the points, then random draws (`--dry-run`
    and the checks before a run)."""
    with optuna_warnings_only():
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        for _, point in space.points:
            study.enqueue_trial(dict(point))
        return [unflatten_dict(space(study.ask()), SEPARATOR) for _ in range(count)]


@contextlib.contextmanager
def optuna_warnings_only() -> Iterator[None]:
    """Optuna logs its warnings only (no line per study) inside, and at the caller's verbosity
    again on exit: a dry run or a check called from a script leaves the script's Optuna as it
    was."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def first_learned(search: SearchSection) -> int:
    """How many trials a searcher draws before it learns from results (Optuna's defaults: TPE's
    startup trials, NSGA-II's first generation); from there on a dry run cannot know them."""
    if search.searcher == "nsga2":
        default = inspect.signature(optuna.samplers.NSGAIISampler).parameters["population_size"]
        return search.population_size or default.default
    return inspect.signature(optuna.samplers.TPESampler).parameters["n_startup_trials"].default


def outside_notes(space: Space, searcher: str) -> list[str]:
    """A note for each value of a point outside the range of its dimension (or off its steps):
    the point runs at it, and the searcher records it as run and learns from it, but draws
    only within the range."""
    drawn_in = _drawn_in(space)
    return [
        f"note: {label} (search.variants[{index}]) runs {key} at {value!r}, outside the "
        f"{_words(dist)} that {drawn_in[key]} draws it from: {searcher} records the point "
        "as run and learns from it, but draws only within that range"
        for index, label, key, value, dist in _outside(space)
    ]


def points_outside(space: Space) -> int:
    """How many of the space's points have a value outside the range of its dimension."""
    return len({index for index, *_ in _outside(space)})


def _outside(space: Space) -> Iterator[tuple[int, str, str, Any, BaseDistribution]]:
    """Each value of a point outside the range of its dimension (or off its steps): the point's
    index and label, the dimension's key, the value and the dimension."""
    dists = space.distributions()
    for index, (label, point) in enumerate(space.points):
        for key, dist in dists.items():
            value = point.get(_name(key))
            numeric = isinstance(dist, FloatDistribution | IntDistribution)
            # The test by which Optuna warns when the run gives the value.
            if numeric and value is not None and not dist._contains(dist.to_internal_repr(value)):
                yield index, label, key, value, dist


def _drawn_in(space: Space) -> dict[str, str]:
    """The section that draws each dimension of the space, by dotted key."""
    ruled = {
        k: f"search.conditional[{i}].space" for i, r in enumerate(space.rules) for k in r.space
    }
    return dict.fromkeys(space.space, "search.space") | ruled


def lines(space: Space) -> list[str]:
    """The space in words, one dimension a line."""
    shown = [f"{key}: {_words(d)}" for key, d in space.space.items()]
    for rule in space.rules:
        shown += [f"{key}: {_words(d)} (when {rule.words()})" for key, d in rule.space.items()]
    return shown + [f"first: {label}" for label, _ in space.points]


def _words(dist: BaseDistribution | Any) -> str:
    """A distribution in words."""
    if isinstance(dist, CategoricalDistribution):
        return f"choice {list(dist.choices)}"
    if isinstance(dist, FloatDistribution | IntDistribution):
        kind, unit = ("int", 1) if isinstance(dist, IntDistribution) else ("float", None)
        step = "" if dist.step == unit else f" step {dist.step:g}"
        return f"{'log ' if dist.log else ''}{kind} [{dist.low:g}, {dist.high:g}]{step}"
    return f"fixed {dist!r}"
