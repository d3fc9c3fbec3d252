"""Accuracy against cost: the Pareto front of an experiment's trials, the cheapest trial within
half an accuracy point of the best, their table and their chart.

Two views of cost: test NFE (what the solver spends per prediction) and training time per step
(forward and backward, what a trial spends to learn), and a third where a search ranks by
another cost (its `cost`, such as the prediction time). Only trials that trained to their end
count (ASHA-stopped trials are cut short, so their cost and accuracy are not comparable); an
experiment without any counts all of its trials.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from raydeq.experiments.figures import legend_beside, nothing_drawn, png, spans_decades, subplots

# Cost columns of results.parquet and their words.
VIEWS = {"test_nfe": "test NFE", "train_time": "training time per step (s)"}
# The words of the other costs a search may rank by (config.COSTS): a view of its own there.
COST_WORDS = {
    "nfe": "training NFE per step",
    "forward_time": "forward time per step (s)",
    "backward_time": "backward time per step (s)",
    "predict_time": "prediction time per test batch (s)",
}
CHART = "pareto.png"
# How far below the lowest front or paper point (in accuracy points) the chart still shows.
ZOOM_POINTS = 10.0
# "Within 0.5 accuracy points of the best": accuracies are fractions, so 0.005.
MARGIN = 0.005
# Settings that name or place a trial rather than change it.
NOT_SETTINGS = ("config.name", "config.label", "config.storage_path")
# A front table's cell of a setting its trial did not draw (a conditional dimension whose rule
# it did not meet), empty rather than the experiment's value it ran at, and the line saying so.
NOT_DRAWN = ""
NOT_DRAWN_NOTE = (
    "\nAn empty setting: that trial did not draw it (a conditional dimension whose rule it did "
    "not meet)."
)
# A trial on the chart: its cost, its metric (in percent for an accuracy) and its row.
Point = tuple[float, float, Mapping[str, Any]]
# Settings under which trials measure accuracy or a cost on other batches: where they differ
# between the ranked trials, the front tables name them and what each changes.
MEASURED_BY = {
    "config.data.batch_size": (
        "training time, NFE, forward and backward time per step are per batch of that many images"
    ),
    "config.data.eval_batch_size": (
        "test NFE is a test batch's slowest sample's and prediction time a test batch's, in "
        "batches of that size"
    ),
    "config.train.eval_batches": "test accuracy and NFE are over that many test batches (0: all)",
}
# A front trial's share of test images whose solve ended unconverged (max_steps, diverged or
# non-finite), its last evaluation's: a trial whose solves stop short of z* (a max_steps of 5, a
# loose tolerance) looks cheap on a front without being the DEQ it names.
UNCONVERGED = "test_unconverged_fraction"
UNCONVERGED_TITLE = "unconverged (%)"
# The chart's name for the trials short of their last step (stopped by ASHA, failed, or still
# running under a report from a second terminal), which the front leaves out.
SHORT = "short of its last step"
# The most trials the line under the front tables names as not ranked (the paper's first): a
# search of 3,000 trials under ASHA left 1,300 short of their last step, a line of 16,000
# characters; the rest are counted, and results.parquet's `completed` column holds them.
NAMED_NOT_RANKED = 30


def front(accuracy: Sequence[float], cost: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points, cheapest first: no other point has at least the
    accuracy at no more cost and is better in one. Points with a NaN are never on it."""
    finite = [i for i in range(len(accuracy)) if math.isfinite(accuracy[i] + cost[i])]
    order = sorted(finite, key=lambda i: (cost[i], -accuracy[i]))
    kept, best_cheaper, group_cost, group_best = [], -math.inf, None, -math.inf
    for i in order:
        if cost[i] != group_cost:  # a new cost: everything seen so far is strictly cheaper
            best_cheaper = max(best_cheaper, group_best)
            group_cost, group_best = cost[i], accuracy[i]
        if accuracy[i] > best_cheaper and accuracy[i] == group_best:
            kept.append(i)
    return kept


def cheapest_within(
    accuracy: Sequence[float], cost: Sequence[float], margin: float = MARGIN
) -> int | None:
    """Index of the cheapest point within `margin` of the best accuracy (the more accurate of
    equally cheap ones), or None without finite points; a point `margin` below up to float
    rounding (11 against 21 of 2,000 at 0.005) counts as within."""
    finite = [i for i in range(len(accuracy)) if math.isfinite(accuracy[i] + cost[i])]
    if not finite:
        return None
    best = max(accuracy[i] for i in finite)
    close = [i for i in finite if within(best - accuracy[i], margin)]
    return min(close, key=lambda i: (cost[i], -accuracy[i]))


def within(gap: float, margin: float) -> bool:
    """True where an accuracy `gap` below the best is at most `margin`, equal up to rounding."""
    return gap <= margin or math.isclose(gap, margin, rel_tol=1e-9)


def counted(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the rows the front is taken over: trials that trained to their end, else all."""
    done = [i for i, row in enumerate(rows) if row.get("completed")]
    return done or list(range(len(rows)))


def not_ranked(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows left out of the front: trials short of their last step (stopped by ASHA, failed,
    interrupted or still running) where others trained to theirs."""
    ranked = set(counted(rows))
    return [row for i, row in enumerate(rows) if i not in ranked]


def views(cost: str | None) -> dict[str, str]:
    """A report's cost views, by column: test NFE, training time per step, and the search's own
    `cost` where it is another, which the searcher traded against the metric."""
    return VIEWS | ({cost: COST_WORDS[cost]} if cost in COST_WORDS else {})


def mark(
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    mode: str = "max",
    costs: Mapping[str, str] = VIEWS,
) -> list[dict[str, Any]]:
    """The rows with, per cost view of `costs`, `pareto_<cost>` (on the front) and
    `cheapest_<cost>` (the cheapest within half a point of the best `metric`, the lowest in
    mode min)."""
    marked = [dict(row) for row in rows]
    members = counted(rows)
    sign = -1.0 if mode == "min" else 1.0
    for cost in costs:
        accuracy = [sign * _number(rows[i].get(metric)) for i in members]
        spent = [_number(rows[i].get(cost)) for i in members]
        on_front = {members[i] for i in front(accuracy, spent)}
        cheapest = cheapest_within(accuracy, spent)
        for i, row in enumerate(marked):
            row[f"pareto_{cost}"] = i in on_front
            row[f"cheapest_{cost}"] = cheapest is not None and i == members[cheapest]
    return marked


def varying(
    rows: Sequence[Mapping[str, Any]], drawn: Mapping[str, Sequence[str]] | None = None
) -> list[str]:
    """The config columns whose values differ between trials: the settings searched, each
    trial's counted only where it drew it (`drawn`: its config columns, by trial; every column
    without), so that a column no trial drew is none."""
    keys = dict.fromkeys(k for row in rows for k in row if k.startswith("config."))
    return [
        k
        for k in keys
        if k not in NOT_SETTINGS
        and len({repr(row.get(k)) if _drew(row, k, drawn) else None for row in rows}) > 1
    ]


def _drew(row: Mapping[str, Any], key: str, drawn: Mapping[str, Sequence[str]] | None) -> bool:
    """Whether the row's trial drew the config column `key` (any column without `drawn`)."""
    return drawn is None or key in drawn[row["trial"]]


def _number(value: Any) -> float:
    """A metric as a float (NaN when missing)."""
    return math.nan if value is None else float(value)


def table_row(cells: Sequence[str]) -> str:
    """A Markdown table's line of `cells`, a `|` in one escaped and its line breaks made
    spaces: a label holding them (`lr | 1e-3`) split its row into more columns than the
    header's."""
    escaped = [" ".join(cell.split()).replace("|", "\\|") for cell in cells]
    return "| " + " | ".join(escaped) + " |"


def table_name(row: Mapping[str, Any]) -> str:
    """A trial as the tables name it: the paper's label (its group up to the first ", key=",
    so that a label may hold a comma), else its Tune id: `9db77_00001` (the experiment's part,
    then the trial's) from Tune's variant generator, `9a3b6bd8` from a searcher; the folder
    name goes on with the trial's values, `_key=value`."""
    if row.get("paper"):
        return re.split(r", (?=[\w.]+=)", row["group"])[0]
    return re.match(r"[^_]+(_\d+(?=_|$))?", row["trial"]).group(0)


def left_out_name(row: Mapping[str, Any], shared: bool) -> str:
    """A trial short of its last step as the line under the front tables names it: its table
    name, with its seed where that name is `shared` with other trials (a paper label over
    seeds, one of which may be on the front), and `(failed)` for one that failed."""
    name = f"{table_name(row)} seed {row.get('seed')}" if shared else table_name(row)
    return f"{name} (failed)" if row.get("status") == "ERROR" else name


def in_percent(metric: str) -> bool:
    """Whether a metric is an accuracy, a fraction shown in percent (and its margin and the
    chart's zoom in accuracy points); others are shown as they are."""
    return metric.endswith("accuracy")


def _value(value: Any) -> str:
    """A setting or a cost in a table cell: '-' where there is none (None, or a NaN measure)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _metric_value(value: Any, percent: bool) -> str:
    """The searched metric in a table cell: an accuracy in percent to two decimals."""
    return f"{100 * _number(value):.2f}" if percent else _value(_number(value))


def markdown(
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    costs: Mapping[str, str] = VIEWS,
    drawn: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Per cost view of `costs`: the front with its unconverged share and the settings its
    trials drew (`drawn`, by trial: `varying`), and the cheapest trial within half a point."""
    settings = varying(rows, drawn)
    undrawn = False
    percent = in_percent(metric)
    column = f"{metric} (%)" if percent else metric
    names = (k.rsplit(".", 1)[-1] for k in settings)
    header = ["Trial", column, *costs.values(), UNCONVERGED_TITLE, *names]
    margin = f"{100 * MARGIN:g} points" if percent else f"{MARGIN:g}"
    text = []
    for cost, words in costs.items():
        text += [f"\n## Pareto front: {metric} against {words}\n"]
        text += [table_row(header), "|" + " --- |" * len(header)]
        members = sorted(
            (row for row in rows if row.get(f"pareto_{cost}")), key=lambda r: _number(r[cost])
        )
        for row in members:
            cells = [table_name(row), _metric_value(row[metric], percent)]
            cells += [_value(_number(row.get(c))) for c in costs]
            cells.append(_value(100 * _number(row.get(UNCONVERGED))))
            drew = [_drew(row, k, drawn) for k in settings]
            undrawn = undrawn or not all(drew)
            cells += [
                _value(row.get(k)) if d else NOT_DRAWN for k, d in zip(settings, drew, strict=True)
            ]
            text.append(table_row(cells))
        if not members:
            counted_rows = [rows[i] for i in counted(rows)]
            text.append(f"\nNo front: {_unreported(counted_rows, metric, cost, words)}.")
        chosen = [row for row in rows if row.get(f"cheapest_{cost}")]
        if chosen:
            row = chosen[0]
            text.append(
                f"\nCheapest within {margin} of the best {metric}: {table_name(row)} "
                f"({_metric_value(row[metric], percent)}{'%' if percent else ''}, "
                f"{words} {_value(_number(row[cost]))})"
            )
    text += [NOT_DRAWN_NOTE] if undrawn else []
    text += _not_comparable([rows[i] for i in counted(rows)])
    left_out = sorted(not_ranked(rows), key=lambda row: not row.get("paper"))
    if left_out:
        names = Counter(table_name(row) for row in rows)
        named = list(
            dict.fromkeys(left_out_name(row, names[table_name(row)] > 1) for row in left_out)
        )
        more = len(named) - NAMED_NOT_RANKED
        rest = f" and {more:,} more (results.parquet's `completed` column)" if more > 0 else ""
        listed = ", ".join(named[:NAMED_NOT_RANKED])
        text.append(f"\nNot ranked, short of their last step: {listed}{rest}.")
    return "\n".join(text) + "\n"


def _not_comparable(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A line per setting of MEASURED_BY whose values differ between `rows`: their accuracy or
    cost is measured on other batches, which one front ranks as if alike."""
    lines = []
    for key, changes in MEASURED_BY.items():
        values = list(dict.fromkeys(_value(row.get(key)) for row in rows))
        if len(values) > 1:
            lines.append(
                f"\nNot comparable across trials: {key.removeprefix('config.')} differs "
                f"({', '.join(values)}): {changes}."
            )
    return lines


def _shown(row: Mapping[str, Any], cost: str, accuracy: float, best: float) -> bool:
    """True for the points a chart must show: the paper's configurations, and the front within
    ZOOM_POINTS of the best accuracy (below that the front's cheapest end holds trials at chance
    level, which would squeeze every other point into the top of the chart)."""
    front = row.get(f"pareto_{cost}") and accuracy >= best - ZOOM_POINTS
    return bool(front or row.get("paper"))


def _zoom(axes: Any, accuracy: list[float], shown: list[float], front: list[float]) -> None:
    """Keep the points that must show readable (see _shown): trials far below them (diverged
    ones) are left off the chart and counted in a note."""
    if not shown:
        return
    floor = min(shown) - ZOOM_POINTS
    below = sum(a < floor for a in accuracy)
    if below:
        on_front = sum(a < floor for a in front)
        of_front = f" ({on_front} of them on the front)" if on_front else ""
        axes.set_ylim(floor, max(accuracy) + 1)
        axes.set_title(f"{below} trial(s) below {floor:.0f}% not shown{of_front}", fontsize="small")


def _scale(axes: Any, costs: list[float]) -> None:
    """A logarithmic cost axis where the positive costs drawn span LOG_SPAN or more."""
    if spans_decades(costs):
        axes.set_xscale("log")


def chart(
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    mode: str = "max",
    costs: Mapping[str, str] = VIEWS,
) -> bytes:
    """PNG of `metric` against each cost view: every trial, the front joined, each of the
    paper's configurations in its own colour, one legend right of the panels (the trials far
    below the best left off for an accuracy in mode max only: in mode min the best trials sit
    lowest, and other metrics have no accuracy points to zoom by)."""
    figure, panels = subplots(1, len(costs), figsize=(7.0 * len(costs), 4.6))
    members = [rows[i] for i in counted(rows)]
    stopped = not_ranked(rows)
    # One colour (and past ten, another marker) per configuration, the same in every view,
    # rather than a name beside each point, which overlaps where the configurations crowd
    # (Table 1's eleven).
    names = list(dict.fromkeys(table_name(r) for r in [*members, *stopped] if r.get("paper")))
    styles = {n: (f"C{i % 10}", "*PXD"[i // 10 % 4]) for i, n in enumerate(names)}
    zoom = mode == "max" and in_percent(metric)
    for axes, (cost, words) in zip(panels, costs.items()):
        _view(axes, members, stopped, metric, cost, words, styles, zoom)
    # One legend for every view: what any of them draws, once.
    drawn = {
        label: handle
        for axes in panels
        for handle, label in zip(*axes.get_legend_handles_labels(), strict=True)
    }
    if drawn:
        legend_beside(panels[-1], drawn)
    return png(figure)


def _view(
    axes: Any,
    members: Sequence[Mapping[str, Any]],
    stopped: Sequence[Mapping[str, Any]],
    metric: str,
    cost: str,
    words: str,
    styles: Mapping[str, tuple[str, str]],
    zoom: bool,
) -> None:
    """Draw one cost view of the chart: the ranked trials (`members`) with a finite `metric`
    and `cost`, the front joined over them, the `stopped` ones apart, the trials far below the
    best left off where `zoom`, or why none shows."""
    percent = in_percent(metric)
    scale = 100 if percent else 1
    points = _drawable(members, metric, cost, scale)
    stopped_points = _drawable(stopped, metric, cost, scale)
    _trials(axes, points, styles)
    _trials(axes, stopped_points, styles, stopped=True)
    axes.set_xlabel(words)
    axes.set_ylabel(f"{metric} (%)" if percent else metric)
    if not points and not stopped_points:
        axes.set_title(f"{metric} against {words}", fontsize="medium")
        nothing_drawn(axes, _unreported([*members, *stopped], metric, cost, words))
        return
    drawn = [*points, *stopped_points]
    front_points = sorted((p for p in points if p[2].get(f"pareto_{cost}")), key=lambda p: p[0])
    # Open circles over the markers, so that a front point that is also a paper point
    # shows both.
    if front_points:  # none where only stopped trials reported both measures
        axes.plot(
            *_xy(front_points),
            "o-",
            c="C3",
            ms=9,
            mfc="none",
            mew=1.5,
            label="Pareto front",
            zorder=4,
        )
    best_accuracy = max((p[1] for p in points), default=math.nan)
    shown = [p[1] for p in drawn if _shown(p[2], cost, p[1], best_accuracy)]
    if zoom:
        _zoom(axes, [p[1] for p in drawn], shown, [p[1] for p in front_points])
    _scale(axes, [p[0] for p in drawn])
    axes.grid(alpha=0.3)


def _drawable(
    rows: Sequence[Mapping[str, Any]], metric: str, cost: str, scale: float
) -> list[Point]:
    """The rows with a finite `metric` (times `scale`) and `cost`, as chart points."""
    points = [(_number(r.get(cost)), scale * _number(r.get(metric)), r) for r in rows]
    return [p for p in points if math.isfinite(p[0] + p[1])]


def _trials(
    axes: Any,
    points: Sequence[Point],
    styles: Mapping[str, tuple[str, str]],
    stopped: bool = False,
) -> None:
    """Scatter the trials: grey dots, and each of the paper's configurations in its style
    (colour, marker), named in the legend only where this view draws it; those `stopped` before
    their end, which the front leaves out, as grey crosses and open markers named so."""
    plain = [p for p in points if not p[2].get("paper")]
    if plain:
        look = {"marker": "x", "s": 30, "c": "0.5"} if stopped else {"s": 18, "c": "0.6"}
        axes.scatter(*_xy(plain), label=f"{SHORT} (not ranked)" if stopped else "trial", **look)
    for name, (colour, marker) in styles.items():
        mine = [p for p in points if table_name(p[2]) == name and p[2].get("paper")]
        if mine:  # none without a finite measure in this view: nothing to name in its legend
            fill = {"facecolors": "none", "edgecolors": colour} if stopped else {"c": colour}
            label = f"{name} ({SHORT})" if stopped else name
            axes.scatter(*_xy(mine), marker=marker, s=110, label=label, zorder=3, **fill)


def _xy(points: Sequence[Point]) -> tuple[list[float], list[float]]:
    """The costs and the metric's values of chart points, as two lists."""
    return [p[0] for p in points], [p[1] for p in points]


def _unreported(rows: Sequence[Mapping[str, Any]], metric: str, cost: str, words: str) -> str:
    """Why a cost view draws no point: what none of the trials reported."""
    reported = [any(math.isfinite(_number(r.get(key))) for r in rows) for key in (metric, cost)]
    if not reported[0]:
        return f"no trial reported {metric}"
    if not reported[1]:
        return f"no trial reported {words}"
    return f"no trial reported both {metric} and {words}"
