"""The paper's tables and figures beside ours: the table an experiment reproduces
(`search.paper.table`) with the published numbers and the ratio ours / paper, Figure 1 (training
and backward time relative to the Vanilla Continuous DEQ) and Figures 4-6 (test forward time,
backward time and test accuracy against step, Discrete and Continuous DEQ).

The published numbers (`paper_numbers.csv`) are Tables 1-4 of arXiv 2201.12240 as printed (mean
and standard deviation; Table 4's accuracy is top-5), copied from the authors' LaTeX of those
tables (avik-pal/smthesis, tex/content/chapters/infinite_time_neural_odes.tex, commit 89d5977e).
Figure 1 prints no numbers, so its paper bars are the ratios of the tables' means.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from raydeq.experiments import pareto
from raydeq.experiments.figures import legend_beside, png, step_curves, step_panel, subplots
from raydeq.experiments.spec import Experiment
from raydeq.solvers import DISCRETE
from raydeq.training.storage import write_bytes

PUBLISHED = Path(__file__).with_name("paper_numbers.csv")
REFERENCE = "Vanilla Continuous DEQ"  # Figure 1's unit: every time is relative to its
TABLE_FILE = "paper_table.md"
FIGURE1_FILE = "paper_figure1.png"
CURVES_FILE = "paper_curves.png"
VARIANTS = ("vanilla", "skip", "skip_reg")  # the lines of Figures 4-6
# Rows of a Figures 4-6 legend per column: a column as tall as its row of panels.
LEGEND_ROWS = 14


@dataclass(frozen=True)
class Column:
    """A column of a paper table: our results key, the CSV column, its title and our unit's
    factor to the paper's (fractions to percent)."""

    ours: str
    paper: str
    title: str
    scale: float = 1.0


ACCURACY = Column("test_accuracy", "accuracy", "Test Accuracy (%)", 100.0)
TOP5 = Column("test_top5_accuracy", "accuracy", "Test Accuracy (Top 5) (%)", 100.0)
NFE = Column("test_nfe", "test_nfe", "Testing NFE")
MINUTES = Column("train_minutes", "training_minutes", "Training Time (min)")
TRAIN = Column("train_time", "train_time", "Training Time (s / batch)")
BACKWARD = Column("backward_time", "backward_time", "Backward Pass (s / batch)")
PREDICT = Column("predict_time", "predict_time", "Prediction Time (s / batch)")
COLUMNS = {
    1: (ACCURACY, NFE, MINUTES, PREDICT),
    2: (ACCURACY, TRAIN, BACKWARD, PREDICT),
    3: (ACCURACY, TRAIN, BACKWARD, PREDICT),
    4: (TOP5, TRAIN, BACKWARD, PREDICT),
}
TITLES = {
    1: "Table 1: MNIST Classification with Fully Connected Layers",
    2: "Table 2: CIFAR10 Classification with Small Neural Network",
    3: "Table 3: CIFAR10 Classification with Large Neural Network",
    4: "Table 4: ImageNet Classification",
}


def published(table: int) -> pd.DataFrame:
    """The paper's rows of one table, indexed by method label, in the paper's order."""
    frame = pd.read_csv(PUBLISHED)
    return frame[frame["table"] == table].set_index("label")


def _methods(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each group's method: a labelled variant's label where it names one group (a searcher's
    group of a paper point also lists the point's values, `Vanilla Continuous DEQ,
    variant=vanilla, ...`), else the group."""
    labelled: dict[str, set[str]] = {}
    for row in rows:
        if row.get("paper"):
            labelled.setdefault(pareto.table_name(row), set()).add(row["group"])
    named = {next(iter(groups)): label for label, groups in labelled.items() if len(groups) == 1}
    return {row["group"]: named.get(row["group"], row["group"]) for row in rows}


def _groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows by method (`_methods`); trials that trained to the end when a method has any, else
    all of them."""
    methods = _methods(rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(methods[row["group"]], []).append(row)
    return {g: [m for m in ms if m["completed"]] or ms for g, ms in groups.items()}


def _values(members: list[dict[str, Any]], column: Column) -> list[float]:
    """The finite values of a column over a group's trials, in the paper's unit."""
    values = [m.get(column.ours) for m in members]
    return [v * column.scale for v in values if v is not None and math.isfinite(v)]


def _mean(values: list[float]) -> float:
    """The mean, or NaN for no values."""
    return statistics.fmean(values) if values else math.nan


def _places(mean: float) -> int:
    """The paper's three decimals, or more for a mean below 0.1 to keep three significant
    digits (a time of milliseconds a batch, which three decimals wrote 0.002 or 0.000)."""
    if mean == 0 or not math.isfinite(mean):
        return 3
    return max(3, 2 - math.floor(math.log10(abs(mean))))


def _ours(values: list[float]) -> str:
    """`mean ± std` to `_places` decimals (the mean alone for one trial)."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    places = _places(mean)
    if len(values) == 1:
        return f"{mean:.{places}f}"
    return f"{mean:.{places}f} ± {statistics.stdev(values):.{places}f}"


def _paper(paper: pd.DataFrame, label: str, column: str) -> str:
    """The published `mean ± std` of a row and column, or "-" where the paper has none."""
    if label not in paper.index or pd.isna(paper.at[label, column]):
        return "-"
    return f"{paper.at[label, column]:.3f} ± {paper.at[label, f'{column}_std']:.3f}"


def ratio(ours: float, paper: float) -> float:
    """ours / paper, NaN where either is missing or the paper's is 0."""
    if not (math.isfinite(ours) and math.isfinite(paper)) or paper == 0:
        return math.nan
    return ours / paper


def markdown(table: int, rows: list[dict[str, Any]]) -> str:
    """The paper's table with our mean ± std, the published one and ours / paper per column;
    the paper's rows first, in its order, then our rows that it does not have."""
    paper = published(table)
    groups = _groups(rows)
    header = ["Method", "Seeds"]
    for column in COLUMNS[table]:
        header += [column.title, "paper", "ours / paper"]
    lines = [
        f"### {TITLES[table]}, ours beside the paper's",
        "",
        pareto.table_row(header),
        "|" + " --- |" * len(header),
    ]
    for label in [*paper.index, *(g for g in groups if g not in paper.index)]:
        members = groups.get(label, [])
        cells = [label, _seeds(members)]
        for column in COLUMNS[table]:
            values = _values(members, column)
            published_mean = paper.at[label, column.paper] if label in paper.index else math.nan
            share = ratio(_mean(values), float(published_mean))
            cells += [_ours(values), _paper(paper, label, column.paper)]
            cells.append("-" if math.isnan(share) else f"{share:.3g}")
        lines.append(pareto.table_row(cells))
    return "\n".join(lines) + "\n"


def _seeds(members: list[dict[str, Any]]) -> str:
    """The Seeds cell: the trials a row averages, said to be short of their last step where
    they are (a method whose every trial ASHA stopped, failed or was interrupted): their
    accuracy is a shorter run's than the paper's."""
    done = all(member["completed"] for member in members)
    return f"{len(members)}{'' if done else ' (short of their last step)'}"


def _relative(means: dict[str, float]) -> dict[str, float]:
    """Each method's value over the reference method's (empty without the reference)."""
    unit = means.get(REFERENCE, math.nan)
    return {k: ratio(v, unit) for k, v in means.items() if math.isfinite(ratio(v, unit))}


def _points(paper: pd.DataFrame, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials of the table's points, those Figure 1 draws: the labelled variants (a
    searcher's first points) and the groups named as the paper's rows; a searcher's drawn
    trials, a bar row each, would bury the paper's methods (pareto.png and the table show them)."""
    return [row for row in rows if row.get("paper") or row["group"] in paper.index]


def _left_out(trials: int) -> str:
    """Figure 1's title line for the trials it does not draw, where there are any."""
    if not trials:
        return ""
    return (
        f"\n({trials} trials of no labelled variant left out: see {pareto.CHART} and {TABLE_FILE})"
    )


def figure1(table: int, rows: list[dict[str, Any]]) -> bytes:
    """PNG of Figure 1's measure for this experiment: training and backward time of each of the
    paper's methods relative to the Vanilla Continuous DEQ, ours beside the paper's (from its
    table); the title counts the trials it leaves out, a search's drawn ones."""
    paper = published(table)
    points = _points(paper, rows)
    groups = _groups(points)
    training = MINUTES if table == 1 else TRAIN
    measures = [(training, "training"), (BACKWARD, "backward")]
    ours = {
        name: _relative({g: _mean(_values(ms, column)) for g, ms in groups.items()})
        for column, name in measures
    }
    theirs = {
        name: _relative({k: float(v) for k, v in paper[column.paper].dropna().items()})
        for column, name in measures
    }
    labels = [
        *dict.fromkeys(k for name in ("training", "backward") for k in [*theirs[name], *ours[name]])
    ]
    # Horizontal bars, one row per method: the methods' long names read without rotation.
    height = 1.6 + 0.42 * len(labels)
    figure, axes = subplots(1, 2, figsize=(12.0, height), sharey=True)
    where = range(len(labels))
    # Each side keeps its colour where the other has no bars; a side without bars says why.
    sides = [
        ("ours", ours, -0.2, f"ours: no {REFERENCE} time to divide by"),
        ("paper", theirs, 0.2, "the paper's table gives none"),
    ]
    for axis, (_, name) in zip(axes, measures, strict=True):
        missing = ""
        for colour, (side, values, shift, why) in enumerate(sides):
            if not values[name]:
                missing += f"\n({why})"
                continue
            heights = [values[name].get(k, 0.0) for k in labels]
            axis.barh([i + shift for i in where], heights, 0.4, color=f"C{colour}", label=side)
        axis.axvline(1.0, color="grey", linewidth=0.8)
        axis.set_yticks(list(where), labels, fontsize="small")
        axis.set_xlabel(f"{name} time / {REFERENCE}")
        axis.set_title(f"{name.capitalize()} time, relative (lower is better){missing}")
        axis.grid(axis="x", alpha=0.3)
        if axis.patches:
            axis.legend(fontsize="small")
    axes[0].invert_yaxis()
    figure.suptitle(
        f"Figure 1 for {TITLES[table].split(':')[0]}{_left_out(len(rows) - len(points))}"
    )
    return png(figure, dpi=110)


def _kind(row: dict[str, Any]) -> tuple[str, str] | None:
    """("Discrete" or "Continuous", variant) of a plain DEQ trial; None for the Neural ODE and
    Jacobian-regularised trials, which Figures 4-6 leave out (a Jacobian estimate of weight 0
    is only logged: the trial trains, and its figures' times are measured, as a plain DEQ's)."""
    variant = row.get("config.model.variant")
    regularised = row.get("config.model.jac_reg") and row.get("config.train.lambda_jac")
    if variant not in VARIANTS or regularised:
        return None
    return ("Discrete" if row.get("config.model.solver") in DISCRETE else "Continuous", variant)


# The columns of Figures 4-6: a metric, its words and our unit's factor to the figure's.
CURVE_PANELS = (
    ("predict_time", "test forward time (s / batch)", 1.0),
    ("backward_time", "backward time (s / batch)", 1.0),
    ("test_accuracy", "test accuracy (%)", 100.0),
)


def curves_figure(rows: list[dict[str, Any]], curves: dict[str, list[pd.DataFrame]]) -> bytes:
    """PNG of Figures 4-6: rows Discrete / Continuous DEQ, columns test forward time, backward
    time and test accuracy against step; one line per variant (mean over seeds)."""
    kinds = {row["group"]: _kind(row) for row in rows}
    figure, axes = subplots(2, 3, figsize=(16.0, 7.0), sharex=True)
    for r, kind in enumerate(("Discrete", "Continuous")):
        variants = {g: k[1] for g, k in kinds.items() if k is not None and k[0] == kind}
        mine = {g: frames for g, frames in curves.items() if g in variants}
        for axis, (metric, label, scale) in zip(axes[r], CURVE_PANELS, strict=True):
            _variant_lines(axis, mine, variants, metric, scale)
            unreported = f"no {kind} DEQ trial reported {metric}"
            step_panel(axis, unreported, linear=metric == ACCURACY.ours)
            axis.set_title(f"{kind} DEQ: {label}", fontsize="medium")
            if r == 1:
                axis.set_xlabel("training step")
        # One legend per row, right of it: a row's panels draw the same variants, and a legend
        # inside a panel covered its curves.
        # A search's many groups fill columns, and the image grows right to hold them: in one
        # column of the figure's width, the first row's legend ran over the second's and both
        # were cut at the figure's edges.
        handles = {line.get_label(): line for axis in axes[r] for line in axis.lines}
        if handles:
            legend_beside(axes[r][-1], handles, math.ceil(len(handles) / LEGEND_ROWS))
    figure.suptitle("Figures 4-6: Discrete and Continuous DEQ against training step")
    legends = [axis.get_legend() for axis in axes[:, -1] if axis.get_legend()]
    return png(figure, dpi=110, outside=legends)


def _variant_lines(
    axis: Any,
    curves: dict[str, list[pd.DataFrame]],
    variants: dict[str, str],
    metric: str,
    scale: float,
) -> None:
    """Draw a panel of Figures 4-6: per group, its mean over seeds against step in the colour
    of its variant (`variants`), a second group of one variant dashed."""
    drawn: list[str] = []
    for group, stats in step_curves(curves, metric):
        mean = stats["mean"] * scale
        variant = variants[group]
        color = f"C{VARIANTS.index(variant)}"  # a variant's colour in every panel
        # A second row of the same variant (an extra, labelled setting) is dashed.
        style = "--" if variant in drawn else "-"
        drawn.append(variant)
        axis.plot(
            mean.index,
            mean.values,
            color=color,
            linestyle=style,
            marker="o",
            markersize=3,
            label=group,
        )


def written(experiment: Experiment) -> list[str]:
    """The names of the files `write` writes for the experiment (none where it reproduces no
    paper table)."""
    if experiment.search.paper.get("table") is None:
        return []
    return [TABLE_FILE, FIGURE1_FILE, CURVES_FILE]


def write(
    path: str,
    experiment: Experiment,
    rows: list[dict[str, Any]],
    curves: dict[str, list[pd.DataFrame]],
) -> str:
    """Write the paper's table and figures for an experiment that names a paper table; return
    the table's Markdown ("" for an experiment that reproduces none)."""
    table = experiment.search.paper.get("table")
    if table is None:
        return ""
    text = markdown(table, rows)
    write_bytes(f"{path}/{TABLE_FILE}", text.encode())
    write_bytes(f"{path}/{FIGURE1_FILE}", figure1(table, rows))
    write_bytes(f"{path}/{CURVES_FILE}", curves_figure(rows, curves))
    return "\n" + text
