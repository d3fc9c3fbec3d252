"""Search spaces as written in experiment files: Ray Tune primitives in YAML form,
`{primitive: arguments}`, nested by section or under dotted keys."""

from __future__ import annotations

import inspect
import reprlib
from collections.abc import Mapping
from typing import Any

from ray import tune
from ray.tune.search.sample import Integer

from raydeq.training.config import ConfigError, apply_overrides

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


def is_primitive(spec: Any) -> bool:
    """True for the YAML form of a Tune primitive, `{primitive: arguments}`."""
    return isinstance(spec, Mapping) and len(spec) == 1 and next(iter(spec)) in PRIMITIVES


def dimensions(tree: Mapping[str, Any], prefix: str = "", *, once: bool = True) -> dict[str, Any]:
    """A space written nested (`model: {solver: ...}`) or dotted (`model.solver: ...`) as
    {dotted key: primitive or constant}; a key written in both forms is a ConfigError, or with
    `once` False the one written last (as a run stored before that check drew it)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and not is_primitive(value):
            found = dimensions(value, f"{prefix}{key}.", once=once)
        else:
            found = {f"{prefix}{key}": value}
        for dotted in found.keys() & flat.keys() if once else ():
            raise ConfigError(
                f"{dotted}: written twice in one search space, dotted and under its section; "
                "keep one",
                key=dotted,
            )
        flat |= found
    return flat


def nested(tree: Mapping[str, Any], *, once: bool = True) -> dict[str, Any]:
    """The space with its dotted keys written as sections (`optim.lr: x` as `optim: {lr: x}`),
    the one form that Tune's variants and the trial configs merge key by key (`once`: see
    `dimensions`)."""
    return apply_overrides({}, dimensions(tree, once=once))


def _number(key: str, value: Any) -> float | int:
    """A numeric argument of the primitive at `key` (a quoted "1e-3" is text, which becomes a
    float); a ConfigError for any other value, which Tune would take and fail on
    with a traceback (a normal's mean at its first draw), and for nan, an infinity or an
    integer past a float's range, which Tune draws as nan, refuses as a missing bound or
    fails on with Python's OverflowError."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if not isinstance(number, int | float) or isinstance(number, bool):
        raise ConfigError(f"{key}: {value!r} is not a number; its arguments are numbers", key=key)
    if abs(number) < 2**1000:  # within a float's range: false for nan and the infinities
        return number
    raise ConfigError(
        f"{key}: {reprlib.repr(value)} is not a finite number; its arguments are finite numbers",
        key=key,
    )


def domain(key: str, spec: Any) -> Any:
    """A Ray Tune search domain from its YAML form `{primitive: arguments}`; other values as is.

    Mappings that are no primitive are sections and are converted key by key. Tune's
    `{"eval": ...}` form would run code from the file, so it is refused.
    """
    if not isinstance(spec, Mapping):
        return spec
    if "eval" in spec:
        raise ConfigError(
            f"{key}.eval: code is not run from experiment files; "
            f"use one of {', '.join(PRIMITIVES)}",
            key=f"{key}.eval",
        )
    if not is_primitive(spec):
        return {name: domain(f"{key}.{name}", value) for name, value in spec.items()}
    ((primitive, args),) = spec.items()
    if primitive in ("grid_search", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(
                f"{key}.{primitive}: expected a non-empty list of values", key=f"{key}.{primitive}"
            )
        return getattr(tune, primitive)(args)
    return _sampled(f"{key}.{primitive}", primitive, args)


def _sampled(where: str, primitive: str, args: Any) -> Any:
    """The domain of a sampling primitive (uniform, randint, ...) given its arguments at
    `where` as a list or by name, refusing what Tune would take and then fail on or draw
    without a word (a step q of 0, a reversed range, an integer range with a fractional bound
    or step, or with no value to draw)."""
    if isinstance(args, Mapping):
        keywords, positional = {k: _number(where, v) for k, v in args.items()}, []
    else:
        listed = args if isinstance(args, list) else [args]
        keywords, positional = {}, [_number(where, v) for v in listed]
    try:
        made = getattr(tune, primitive)(*positional, **keywords)
    except ZeroDivisionError:  # Tune divides a float range's ends by its step q
        raise ConfigError(f"{where}: the step q must be above 0, got 0", key=where) from None
    except (TypeError, ValueError, AssertionError) as err:
        takes = ", ".join(inspect.signature(getattr(tune, primitive)).parameters)
        raise ConfigError(
            f"{where}: bad arguments {args!r} ({err}); {primitive} takes {takes} "
            "(a list, or by name)",
            key=where,
        ) from None
    step = getattr(made.get_sampler(), "q", None)
    if step is not None and not step > 0:
        # Tune takes an integer range's step of 0 and fails on the first draw.
        raise ConfigError(f"{where}: the step q must be above 0, got {step!r}", key=where)
    lower, upper = getattr(made, "lower", None), getattr(made, "upper", None)
    if lower is not None and upper is not None and not lower < upper:
        # Tune samples a reversed or empty range without a word (Optuna refuses it).
        raise ConfigError(f"{where}: the lower bound {lower!r} must be below {upper!r}", key=where)
    if isinstance(made, Integer):
        _check_whole(where, made)
        _check_drawable(where, made)
    return made


def _check_whole(where: str, made: Integer) -> None:
    """Raise a ConfigError for an integer range whose bound or step q is no whole number
    (randint [1.5, 3]), which Tune takes and draws from as it rounds."""
    step = getattr(made.get_sampler(), "q", 1)
    for name, value in (("lower bound", made.lower), ("upper bound", made.upper), ("q", step)):
        if not float(value).is_integer():
            raise ConfigError(
                f"{where}: the {name} {value!r} is not an integer; use whole numbers", key=where
            )


def _check_drawable(where: str, made: Integer) -> None:
    """Raise a ConfigError for an integer range without a value to draw (qrandint [1, 3] with
    q 4), which Tune takes and fails on at the first draw, after the run has started."""
    least, greatest = integer_ends(made)
    if least > greatest:
        step = made.get_sampler().q
        raise ConfigError(
            f"{where}: no multiple of q = {step} lies in [{made.lower}, {made.upper}]", key=where
        )


def integer_ends(made: Integer) -> tuple[int, int]:
    """The least and greatest values that Tune draws from an integer range: a quantized one
    draws the multiples of its step q within its ends, and the upper end is left out at q = 1
    as in an unquantized range."""
    q = getattr(made.get_sampler(), "q", 1)
    upper = made.upper // q * q
    return made.cast(-(-made.lower // q) * q), made.cast(upper - 1 if q == 1 else upper)
