"""Dotted overrides (`key=value`) of an experiment's settings fixed in its search section: a
searched key leaves the space, the variants that set it to another value go, and the
conditional rules are resolved for it (see `fix_search`)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from raydeq.experiments import search as searchers
from raydeq.experiments.primitives import dimensions, is_primitive, nested
from raydeq.training.config import ConfigError, apply_overrides, merge, without

# A variant or a conditional rule named by its place in its list.
_PLACED = re.compile(r"search\.(variants|conditional)\[(\d+)\]")


def fix_search(
    search: Mapping[str, Any], overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The search section with the overridden keys fixed, and the place as written of each
    variant and conditional rule it keeps, by list (`variants`, `conditional`).

    An override of a key that the space varies removes it from the space; an override of a key
    that variants set keeps only the variants with that value (a searcher's points without a
    label are labelled by their place as written); conditional rules are resolved for it (see
    `_fix_rules`).
    """
    space = search.get("space") or {}
    variants = search.get("variants") or []
    placed = tuple(range(len(variants)))
    rules = search.get("conditional")
    ruled = tuple(range(len(rules))) if isinstance(rules, list) else ()
    for dotted, value in overrides.items():
        space = _fix_dimension(space, dotted, value)
        if isinstance(rules, list):
            kept_rules, joined = _fix_rules(rules, dotted, value)
            rules, ruled = list(kept_rules.values()), tuple(ruled[i] for i in kept_rules)
            space = merge(space, joined)
        _check_not_within(variants, dotted, value)
        given = variants
        kept = [
            i
            for i, row in enumerate(variants)
            if dotted not in row or searchers.same(row[dotted], value)
        ]
        variants, placed = [variants[i] for i in kept], tuple(placed[i] for i in kept)
        searched = search.get("searcher", "random") != "random"
        if searched:  # a searcher's points lose the key
            variants = [
                {"label": searchers.point_label(place)} | row if "label" not in row else row
                for row, place in zip(variants, placed, strict=True)
            ]
            variants = [{k: v for k, v in row.items() if k != dotted} for row in variants]
        elif search.get("variants") and not variants:
            # A grid's variants are its trials; a searcher's are only its first points.
            values = ", ".join(dict.fromkeys(repr(row[dotted]) for row in given if dotted in row))
            raise ConfigError(
                f"{dotted}={value!r}: no variant of search.variants has that value; they have "
                f"{values}",
                key=dotted,
            )
    variants, placed = _without_made_alike(
        search.get("variants") or [], variants, placed, overrides
    )
    fixed = {**search, "space": space} | ({"variants": variants} if "variants" in search else {})
    fixed |= {"conditional": rules} if isinstance(rules, list) else {}
    if search.get("searcher", "random") != "random":
        _check_points_keep_rules(search, overrides, fixed)
    return fixed, {"variants": placed, "conditional": ruled}


def _without_made_alike(
    written: Sequence[Any], variants: list, placed: tuple[int, ...], overrides: Mapping[str, Any]
) -> tuple[list, tuple[int, ...]]:
    """The kept `variants` (at their `placed` places in those `written`) less each that the
    overrides made the same as an earlier one, its settings less the overridden keys and its
    label being that one's: it would run that one's trials again (mnist_dense's lambda_skip 1.0
    row under train.lambda_skip=1.0). Variants written alike are left to the check that
    refuses them."""
    kept: list[int] = []
    for i, row in enumerate(variants):
        if not any(
            _unfixed(row, overrides) == _unfixed(variants[j], overrides)
            and _unfixed(written[placed[i]], {}) != _unfixed(written[placed[j]], {})
            for j in kept
        ):
            kept.append(i)
    return [variants[i] for i in kept], tuple(placed[i] for i in kept)


def _unfixed(row: Any, overrides: Mapping[str, Any]) -> Any:
    """A variant's settings less its label and the keys that `overrides` fix."""
    if not isinstance(row, Mapping):
        return row
    return {k: v for k, v in row.items() if k != "label" and k not in overrides}


def as_written(text: str, places: Mapping[str, Sequence[int]]) -> str:
    """`text` with each `search.variants[i]`, the i-th variant that `fix_search` kept, named
    by that variant's place as written (`places["variants"][i]`), where the user finds it;
    likewise each `search.conditional[i]`."""
    return _PLACED.sub(lambda m: f"search.{m[1]}[{places[m[1]][int(m[2])]}]", text)


@contextlib.contextmanager
def placed_as_written(places: Mapping[str, Sequence[int]]) -> Iterator[None]:
    """Raise the ConfigError raised inside with its variants and rules named `as_written`."""
    try:
        yield
    except ConfigError as err:
        key = None if err.key is None else as_written(err.key, places)
        raise ConfigError(as_written(str(err), places), key=key) from None


def _check_points_keep_rules(
    search: Mapping[str, Any], overrides: Mapping[str, Any], fixed: Mapping[str, Any]
) -> None:
    """Raise a ConfigError for a searcher's point that the overrides keep and that sets a key
    only a conditional rule draws which an override drops (its `when` excludes the value): the
    key is no dimension of the fixed space, and a point is values of the space."""
    rules, rows = search.get("conditional"), search.get("variants")
    if not isinstance(rules, list) or not isinstance(rows, list):
        return
    drawn = rule_keys(fixed) | set(dimensions(fixed.get("space") or {})) | set(overrides)
    for index, row in enumerate(rows):
        kept = isinstance(row, Mapping) and all(
            k not in row or searchers.same(row[k], v) for k, v in overrides.items()
        )
        for r, rule in enumerate(rules if kept else []):
            try:
                when, space = searchers.rule_parts("search.conditional", rule)
            except ConfigError:
                continue  # malformed: validate_search names it
            lost = [k for k in dimensions(space, once=False) if k in row and k not in drawn]
            for dotted, value in overrides.items():
                if lost and _excludes(when, dotted, value):
                    allowed = _allowed(when[dotted])
                    raise ConfigError(
                        f"search.variants[{index}].{lost[0]}: {dotted}={value!r} drops "
                        f"search.conditional[{r}], the one rule that draws it (when {dotted} in "
                        f"{allowed}), so the point's trial could not run it; leave the key out "
                        f"of the point, or override {dotted} to one of {allowed}",
                        key=f"search.variants[{index}].{lost[0]}",
                    )


def _allowed(written: Any) -> list:
    """The values a rule's `when` allows for a key (one written alone, as a list)."""
    return written if isinstance(written, list) else [written]


def _excludes(when: Mapping[str, Any], dotted: str, value: Any) -> bool:
    """Whether a rule's `when` tests `dotted` and allows no value that is `value`."""
    return dotted in when and not any(searchers.same(a, value) for a in _allowed(when[dotted]))


def _check_not_within(variants: list, dotted: str, value: Any) -> None:
    """Raise a ConfigError for an override of a mapping (`model.solver_options={m: 3}`) that
    holds a key a variant sets (`model.solver_options.m: 5`): each of the variant's trials
    would lay its own value over the override's, which would change nothing (a value that is
    no mapping is refused as the setting's)."""
    if value is not None and not isinstance(value, Mapping):
        return
    within = sorted(
        {k for row in variants for k in row if isinstance(k, str) and k.startswith(f"{dotted}.")}
    )
    if within:
        raise ConfigError(
            f"{dotted}={value!r}: search.variants set {within[0]}, which their trials would "
            f"take over this override; override {within[0]} itself, as a key of its own",
            key=dotted,
        )


def _fix_rules(rules: list, dotted: str, value: Any) -> tuple[dict[int, Any], dict[str, Any]]:
    """`search.conditional` with the key `dotted` fixed at `value`, each rule kept by its place
    in `rules`, and the dimensions that no longer depend on anything: a rule whose `when`
    allows the value loses that condition, and with none left its space joins the main one; a
    rule whose `when` excludes it is dropped; a rule's dimension of that key goes, as it does
    from the main space."""
    kept, joined = {}, {}
    for index, rule in enumerate(rules):
        try:
            when, space = searchers.rule_parts("search.conditional", rule)
        except ConfigError:
            kept[index] = rule  # malformed: validate_search names it
            continue
        when, space = dict(when), _fix_dimension(nested(space), dotted, value)
        if _excludes(when, dotted, value):
            continue
        when.pop(dotted, None)
        if space and when:
            kept[index] = {**rule, "when": when, "space": space}
        elif space:
            joined = merge(joined, space)
    return kept, joined


def _fix_dimension(space: Mapping[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A nested space without the dimension `dotted`, or with it fixed at `value` where it is
    `_rule_only`: a rule's space that joined the main one keeps its solver option there."""
    fixed = _fix_within(without(space, dotted), dotted, value)
    if dotted in dimensions(space) and _rule_only(dotted):
        fixed = apply_overrides(fixed, {dotted: value})
    return fixed


def _fix_within(space: Mapping[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A nested space with `dotted` set in each section that a choice or grid above it draws
    whole (optim.lr in `optim: {choice: [{optimizer: adam, lr: ...}, ...]}`), whose values a
    trial lays over the base's, the override's among them."""
    changes = {}
    for key, spec in dimensions(space).items():
        if not dotted.startswith(f"{key}.") or not is_primitive(spec):
            continue
        ((primitive, values),) = spec.items()
        if primitive in ("choice", "grid_search") and isinstance(values, list):
            inner = {dotted.removeprefix(f"{key}."): value}
            laid = [apply_overrides(v, inner) if isinstance(v, Mapping) else v for v in values]
            changes[key] = {primitive: laid}
    return apply_overrides(space, changes)


def _rule_only(dotted: str) -> bool:
    """Whether an override of a key that a conditional rule draws is fixed in that rule alone:
    a solver's option, which the base's solver may not take (Anderson's m under VCAB3)."""
    return dotted.startswith(searchers.SOLVER_OPTIONS)


def rule_keys(search: Any) -> set[str]:
    """The keys that the conditional rules of a search section draw (malformed rules left to
    `validate_search`, a key written both dotted and nested to the space's checks)."""
    rules = search.get("conditional") if isinstance(search, Mapping) else None
    spaces = (
        [r.get("space") for r in rules if isinstance(r, Mapping)] if isinstance(rules, list) else []
    )
    return {
        k for space in spaces if isinstance(space, Mapping) for k in dimensions(space, once=False)
    }


def fixed_in_rules(search: Any, overrides: Mapping[str, Any]) -> set[str]:
    """The overridden keys that `_rule_only` fixes in the conditional rules that draw them."""
    drawn = rule_keys(search)
    return {key for key in overrides if key in drawn and _rule_only(key)}


def check_fixed_in_rules(search: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """Raise a ConfigError for a `fixed_in_rules` override that no rule draws once the overrides
    have settled them (Anderson's m with model.solver=vcab3), which no trial would run."""
    drawn = rule_keys(search) | set(dimensions(search.get("space") or {}))
    for key, value in overrides.items():
        if key not in drawn:
            raise ConfigError(
                f"{key}={value!r}: no trial runs it, since the other overrides leave no rule "
                "of search.conditional that draws it; drop it, or override the setting it needs",
                key=key,
            )
