"""Options of the solver core and its layers: each value checked where it is given, with an
error that names it and what is allowed (a TypeError for a value of the wrong type, a
ValueError for one of the right type out of what is allowed), and options passed by name to a
constructor."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import reprlib
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any


def choice(name: str, value: Any, allowed: Collection[str], where: str = "") -> None:
    """Raise ValueError unless value is one of `allowed` (`where` ends the message)."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}{where}")


def integer(name: str, value: Any, low: int = 1) -> None:
    """Raise TypeError unless value is an integer (numpy's too, not a bool), ValueError unless
    it is >= low: a count or a limit."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={reprlib.repr(value)} must be an integer >= {low}")
    if value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def number(name: str, value: Any, interval: str = "[0, inf)") -> None:
    """Raise TypeError unless value is a real number (not a bool), ValueError unless it is in
    `interval`, written "[a, b)" with a bracket for a closed end and a parenthesis for an open
    one (NaN is in none)."""
    left, low, high, right = bounds(interval)
    bound = f"{'>=' if left == '[' else '>'} {low:g}" if math.isinf(high) else f"in {interval}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={reprlib.repr(value)} must be a number {bound}")
    inside = (low <= value if left == "[" else low < value) and (
        value <= high if right == "]" else value < high
    )
    if not inside:
        finite = "finite " if math.isinf(high) and right == ")" and value == math.inf else ""
        raise ValueError(f"{name}={value!r} must be a {finite}number {bound}")


def flag(name: str, value: Any, none: bool = False) -> None:
    """Raise TypeError unless value is True or False (or None, where `none` allows it): an
    int or a string such as "no" would read as true."""
    if not (isinstance(value, bool) or (none and value is None)):
        allowed = "True, False or None" if none else "True or False"
        raise TypeError(f"{name}={reprlib.repr(value)} must be {allowed}")


def function(name: str, value: Any, call: str) -> None:
    """Raise TypeError unless value can be called, as `call` describes."""
    if not callable(value):
        raise TypeError(f"{name}={reprlib.repr(value)} must be callable: {call}")


def option_dict(name: str, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Options given as a mapping (None: none) as a dict, or a TypeError naming `name`."""
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise TypeError(f"{name}={reprlib.repr(given)} must be a dict of options or None")
    return dict(given)


def construct(
    key: str, what: str, make: Callable[..., Any], options: dict, own: tuple[str, ...] = ()
) -> Any:
    """make(**options), or a ValueError naming the options that neither make nor the caller
    (`own`, taken out of options before) takes, and those they do: instead of a TypeError
    about an unexpected keyword argument of some class. A bad option's value is named by the
    key the caller wrote it under (`key`, e.g. solver_options.m=0)."""
    accepted = [*parameters(make), *own]
    unknown = sorted(set(options) - set(accepted), key=repr)
    if unknown:
        raise ValueError(
            f"{what} takes no option {', '.join(map(repr, unknown))}; "
            f"its options are {', '.join(accepted) or 'none'}"
        )
    with named(key, options):
        return make(**options)


@contextlib.contextmanager
def named(key: str, options: Mapping[str, Any]) -> Iterator[None]:
    """Re-raise an option's TypeError or ValueError ("m=0 must be ...") under the key that
    holds the options ("solver_options.m=0 must be ..."), of the same type."""
    try:
        yield
    except (TypeError, ValueError) as err:
        if type(err) not in (TypeError, ValueError) or str(err).split("=", 1)[0] not in options:
            raise
        raise type(err)(f"{key}.{err}") from None


def memoized(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """fn of one argument, each result computed once and kept in a dict: functools.cache's
    effect, without the UserWarning that torch.compile gives on tracing a functools.cache
    function (a compiled layer traces its solve's option checks)."""
    results: dict[Any, Any] = {}

    @functools.wraps(fn)
    def cached(key: Any) -> Any:
        if key not in results:
            results[key] = fn(key)
        return results[key]

    return cached


@memoized
def bounds(interval: str) -> tuple[str, float, float, str]:
    """An interval "[a, b)" as its left bracket, ends and right bracket, parsed once."""
    low, high = (float(end) for end in interval[1:-1].split(","))
    return interval[0], low, high, interval[-1]


@memoized
def parameters(make: Callable[..., Any]) -> tuple[str, ...]:
    """The parameter names of a constructor, read once: inspect.signature took about 15 us,
    on every solve, where a solve of a small layer takes a few hundred."""
    return tuple(inspect.signature(make).parameters)
