"""Options passed by name to a solver's or an adjoint's constructor, checked before it is built."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def construct(what: str, make: Callable[..., Any], options: dict, own: tuple[str, ...] = ()) -> Any:
    """make(**options), or a ValueError naming the options that neither make nor the caller
    (`own`, taken out of options before) takes, and those they do: instead of a TypeError
    about an unexpected keyword argument of some class."""
    accepted = [*inspect.signature(make).parameters, *own]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"{what} takes no option {', '.join(map(repr, unknown))}; "
            f"its options are {', '.join(accepted) or 'none'}"
        )
    return make(**options)
