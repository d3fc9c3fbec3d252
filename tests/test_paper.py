"""The paper's published numbers, its tables and figures beside ours, and total training time."""

import io
import math

import matplotlib.image
import pandas as pd
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.legend import Legend

from raydeq.experiments import paper, results, spec
from raydeq.experiments.figures import png
from raydeq.training.config import ConfigError

NUMBERS = [
    "accuracy",
    "test_nfe",
    "training_minutes",
    "train_time",
    "backward_time",
    "predict_time",
]
CONTINUOUS = "Vanilla Continuous DEQ"


def test_the_published_numbers_have_every_row_and_column_of_tables_1_to_4():
    frame = pd.read_csv(paper.PUBLISHED)
    assert list(frame.columns) == [
        "table",
        "label",
        "params",
        *(f"{name}{suffix}" for name in NUMBERS for suffix in ("", "_std")),
        "source",
    ]
    assert frame.groupby("table").size().to_dict() == {1: 6, 2: 7, 3: 7, 4: 6}
    for table, columns in paper.COLUMNS.items():
        rows = paper.published(table)
        for column in columns:
            assert rows[column.paper].notna().all() and rows[f"{column.paper}_std"].notna().all()
        others = set(NUMBERS) - {c.paper for c in columns}
        assert rows[sorted(others)].isna().all().all()
        assert rows["source"].str.startswith(f"arXiv 2201.12240 Table {table},").all()
    assert "top-5" in paper.published(4)["source"].iloc[0]
    # Values as printed in the paper (Table 2's Neural ODE, Table 1's Skip Reg. row)
    assert paper.published(2).loc["Neural ODE", ["train_time", "backward_time"]].tolist() == [
        1.608,
        1.240,
    ]
    assert paper.published(1).loc["Skip Reg. Continuous DEQ", "accuracy"] == 97.973


# Tables 1-4 as the authors' LaTeX prints them (avik-pal/smthesis at 89d5977e,
# tex/content/chapters/infinite_time_neural_odes.tex): per row in the paper's order, the number
# of parameters, then mean and standard deviation of each column of the table.
LATEX = {
    1: """138K 97.926 0.107 18.345 0.732 5.197 1.106 0.038 0.009
138K 98.123 0.025 5.034 0.059 7.321 0.454 0.011 0.005
151K 97.759 0.080 4.001 0.001 1.711 0.202 0.010 0.001
151K 97.749 0.141 4.001 0.000 6.019 0.234 0.012 0.001
138K 97.973 0.134 4.001 0.000 1.295 0.222 0.010 0.001
138K 98.016 0.049 4.001 0.000 5.128 0.241 0.012 0.000""",
    2: """163546 81.233 0.097 0.651 0.009 0.075 0.001 0.282 0.005
163546 80.807 0.631 0.753 0.017 0.261 0.010 0.136 0.010
200122 82.013 0.306 0.717 0.022 0.115 0.004 0.274 0.005
200122 80.807 0.230 0.806 0.010 0.293 0.004 0.154 0.002
163546 81.170 0.356 0.709 0.005 0.114 0.002 0.283 0.007
163546 82.513 0.177 0.679 0.015 0.143 0.017 0.154 0.003
163546 83.543 0.393 1.608 0.026 1.240 0.021 0.207 0.006""",
    3: """10.63M 88.913 0.287 0.625 0.165 0.111 0.021 0.414 0.222
10.63M 89.367 0.832 1.284 0.011 0.739 0.003 0.606 0.010
11.19M 88.783 0.178 0.588 0.042 0.112 0.006 0.314 0.017
11.19M 89.600 0.947 0.697 0.012 0.150 0.013 0.625 0.004
10.63M 88.773 0.115 0.613 0.048 0.109 0.008 0.268 0.031
10.63M 90.107 0.837 0.660 0.019 0.125 0.003 0.634 0.019
10.63M 89.047 0.116 5.267 0.078 4.569 0.077 0.573 0.010""",
    4: """17.91M 81.809 0.115 2.057 0.138 0.195 0.007 1.963 0.189
17.91M 81.329 0.516 3.131 0.027 1.873 0.015 1.506 0.027
18.47M 81.717 0.452 1.956 0.012 0.194 0.001 1.843 0.025
18.47M 81.334 0.322 2.016 0.129 0.845 0.127 1.575 0.053
17.91M 81.611 0.369 1.996 0.035 0.539 0.023 1.752 0.093
17.91M 81.813 0.350 1.607 0.044 0.444 0.026 1.560 0.021""",
}
# The rows' methods: Table 1's are Continuous DEQs without and with Jacobian regularisation,
# the others' Discrete then Continuous DEQs (and Tables 2 and 3's Neural ODE last).
METHODS = ("Vanilla", "Skip", "Skip Reg.")
LABELS = {
    1: [f"{m} Continuous DEQ{jac}" for m in METHODS for jac in ("", " + Jac. Reg.")],
    2: [f"{m} {kind} DEQ" for m in METHODS for kind in ("Discrete", "Continuous")] + ["Neural ODE"],
}
LABELS |= {3: LABELS[2], 4: LABELS[2][:-1]}
# Each table's caption and columns, as the LaTeX heads them.
CAPTIONS = {
    1: "MNIST Classification with Fully Connected Layers",
    2: "CIFAR10 Classification with Small Neural Network",
    3: "CIFAR10 Classification with Large Neural Network",
    4: "ImageNet Classification",
}
TIMES = ["Training Time (s / batch)", "Backward Pass (s / batch)", "Prediction Time (s / batch)"]
HEADS = {
    1: ["Test Accuracy (%)", "Testing NFE", "Training Time (min)", "Prediction Time (s / batch)"],
    2: ["Test Accuracy (%)", *TIMES],
    3: ["Test Accuracy (%)", *TIMES],
    4: ["Test Accuracy (Top 5) (%)", *TIMES],
}


@pytest.mark.parametrize("table", [1, 2, 3, 4])
def test_the_published_numbers_are_the_papers_latex_row_by_row(table):
    rows = paper.published(table)
    assert list(rows.index) == LABELS[table]
    assert paper.TITLES[table] == f"Table {table}: {CAPTIONS[table]}"
    assert [column.title for column in paper.COLUMNS[table]] == HEADS[table]
    columns = [c for column in paper.COLUMNS[table] for c in (column.paper, f"{column.paper}_std")]
    printed = [
        " ".join([str(params), *(f"{value:.3f}" for value in values)])
        for params, *values in rows[["params", *columns]].itertuples(index=False)
    ]
    assert printed == LATEX[table].splitlines()


@pytest.mark.parametrize(
    ("name", "table"),
    [
        ("mnist_dense", 1),
        ("cifar10_small", 2),
        ("cifar10_large", 3),
        ("imagenet", 4),
        ("mnist_mdeq", 2),
    ],
)
def test_each_paper_experiment_names_its_table_and_runs_every_published_row(name, table):
    experiment = spec.load(name)
    assert experiment.search.paper == {"table": table}
    labels = {row["label"] for row in experiment.search.variants}
    assert set(paper.published(table).index) <= labels


@pytest.mark.parametrize(
    ("paper_section", "message"),
    [
        (
            {"table": 5},
            "search.paper.table: 5 is not a table of the paper; choose one of 1, 2, 3, 4",
        ),
        ({"table": True}, "search.paper.table: True is not a table"),
        ({"figure": 1}, "search.paper.figure: unknown key; allowed keys: table"),
    ],
)
def test_a_bad_paper_reference_is_a_one_line_error(paper_section, message):
    raw = {"data": {"dataset": "digits"}, "search": {"paper": paper_section}}
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        spec.from_dict("bad", raw)


def test_total_training_minutes_add_each_reports_steps_times_its_step_time():
    frame = pd.DataFrame({"step": [10, 20, 40], "step_time": [0.6, 1.2, 1.8]})
    assert results.total_minutes(frame) == pytest.approx((10 * 0.6 + 10 * 1.2 + 20 * 1.8) / 60)
    assert math.isnan(results.total_minutes(pd.DataFrame({"step": [10]})))


def _row(group: str, variant: str, solver: str, seed: int, **metrics: float) -> dict:
    """A results row of a finished trial, as results.trial_row writes it."""
    return {
        "group": group,
        "seed": seed,
        "completed": True,
        "config.model.variant": variant,
        "config.model.solver": solver,
        "config.model.jac_reg": None,
    } | metrics


def _run() -> tuple[list[dict], dict[str, list[pd.DataFrame]]]:
    """Rows and report histories of a tiny finished Table 2 run: two seeds of the Vanilla
    Continuous DEQ, one of Skip Reg. Discrete DEQ and of the Neural ODE."""
    times = {"train_time": 0.5, "predict_time": 0.1, "test_top5_accuracy": 0.99}
    rows = [
        _row(CONTINUOUS, "vanilla", "vcab3", 0, test_accuracy=0.80, backward_time=0.2, **times),
        _row(CONTINUOUS, "vanilla", "vcab3", 1, test_accuracy=0.82, backward_time=0.3, **times),
        _row("Skip Reg. Discrete DEQ", "skip_reg", "broyden", 0, test_accuracy=0.7, **times),
        _row("Neural ODE", "neural_ode", "tsit5", 0, test_accuracy=0.75, **times)
        | {"train_time": 3.216, "backward_time": 2.48},
    ]
    rows[2]["backward_time"] = 0.05
    curve = pd.DataFrame(
        {
            "step": [10, 20],
            "predict_time": [0.2, 0.1],
            "backward_time": [0.3, 0.2],
            "test_accuracy": [0.5, 0.8],
        }
    )
    curves = {row["group"]: [curve, curve * 1.1] for row in rows}
    return rows, curves


def test_the_table_puts_ours_beside_the_papers_with_the_ratio():
    rows, _ = _run()
    table = paper.markdown(2, rows)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    # ours | paper | ours / paper for accuracy, training, backward and prediction time
    assert lines[CONTINUOUS] == (
        f"| {CONTINUOUS} | 2 | 81.000 ± 1.414 | 80.807 ± 0.631 | 1 | 0.500 ± 0.000 | "
        "0.753 ± 0.017 | 0.664 | 0.250 ± 0.071 | 0.261 ± 0.010 | 0.958 | 0.100 ± 0.000 | "
        "0.136 ± 0.010 | 0.735 |"
    )
    assert lines["Neural ODE"].split(" | ")[5:11] == [
        "3.216",
        "1.608 ± 0.026",
        "2",
        "2.480",
        "1.240 ± 0.021",
        "2",
    ]
    assert lines["Skip Discrete DEQ"].startswith(
        "| Skip Discrete DEQ | 0 | - | 82.013 ± 0.306 | - |"
    )
    assert list(lines).index("Neural ODE") > list(lines).index("Skip Reg. Continuous DEQ")


def test_the_table_averages_the_finished_seeds_and_a_group_stopped_early_alone():
    """A seed stopped early (ASHA, an interrupted run) would pull the mean toward its
    half-trained numbers: a group's finished seeds are averaged (80 and 82: 81 ± sqrt 2), and
    a group with no finished seed shows its stopped ones, its Seeds cell saying that they are
    short of their last step: it read `1`, its 10 % beside the paper's final 80.807 as if
    trained to the end."""
    rows, _ = _run()
    stopped = rows[0] | {"seed": 2, "completed": False, "test_accuracy": 0.1}
    line = next(
        line for line in paper.markdown(2, [*rows, stopped]).splitlines() if CONTINUOUS in line
    )
    assert line.startswith(f"| {CONTINUOUS} | 2 | 81.000 ± 1.414 | 80.807 ± 0.631 |")
    alone = next(line for line in paper.markdown(2, [stopped]).splitlines() if CONTINUOUS in line)
    short = "1 (short of their last step)"
    assert alone.startswith(f"| {CONTINUOUS} | {short} | 10.000 | 80.807 ± 0.631 | 0.124 |")


def test_figure_1_of_table_1_shows_total_training_minutes_relative_to_the_vanilla_deq(
    monkeypatch,
):
    """Table 1 gives training time in total minutes, not per batch: Figure 1's training bars
    for it are those minutes over the Vanilla Continuous DEQ's, ours (2.5 / 10) beside the
    paper's (1.295 / 5.197), and the backward bars ours alone (0.1 / 0.4)."""
    monkeypatch.setattr(paper, "png", lambda figure, dpi: figure)
    skip_reg = "Skip Reg. Continuous DEQ"
    times = {"train_time": 1.0}
    rows = [
        _row(CONTINUOUS, "vanilla", "vcab3", 0, train_minutes=10.0, backward_time=0.4, **times),
        _row(skip_reg, "skip_reg", "vcab3", 0, train_minutes=2.5, backward_time=0.1, **times),
    ]
    figure = paper.figure1(1, rows)
    training, backward = figure.axes
    labels = [label.get_text() for label in training.get_yticklabels()]
    widths = [bar.get_width() for bar in training.patches]
    ours = dict(zip(labels, widths[: len(labels)], strict=True))
    theirs = dict(zip(labels, widths[len(labels) :], strict=True))
    assert ours[CONTINUOUS] == 1.0 and ours[skip_reg] == pytest.approx(0.25)
    assert theirs[CONTINUOUS] == 1.0 and theirs[skip_reg] == pytest.approx(1.295 / 5.197)
    widths = [bar.get_width() for bar in backward.patches]
    assert dict(zip(labels, widths, strict=True))[skip_reg] == pytest.approx(0.25)


def test_figure_1_without_our_reference_draws_no_bars_of_ours_and_says_why(monkeypatch):
    """Every Vanilla Continuous DEQ trial failed: none of our times can be put relative to it,
    so the panels draw the paper's bars alone, in the paper's colour, and their titles say
    that ours are missing, rather than a legend "ours" over bars of 0."""
    monkeypatch.setattr(paper, "png", lambda figure, dpi: figure)
    rows = [
        _row(CONTINUOUS, "vanilla", "vcab3", 0, train_time=math.nan, backward_time=math.nan),
        _row("Skip Continuous DEQ", "skip", "vcab3", 0, train_time=0.4, backward_time=0.1),
    ]
    figure = paper.figure1(2, rows)
    methods = len(figure.axes[0].get_yticklabels())  # the panels share them
    for axis in figure.axes:
        assert [text.get_text() for text in axis.get_legend().get_texts()] == ["paper"]
        assert len(axis.patches) == methods == 7
        assert {bar.get_facecolor() for bar in axis.patches} == {to_rgba("C1")}
        assert axis.get_title().endswith(f"(ours: no {CONTINUOUS} time to divide by)")


def test_table_1_reports_total_minutes_and_test_nfe_and_table_4_top5():
    row = _row("Skip Reg. Continuous DEQ", "skip_reg", "tsit5", 0, test_accuracy=0.9)
    row |= {"test_nfe": 8.002, "train_minutes": 2.59, "predict_time": 0.02}
    table = paper.markdown(1, [row])
    assert "Testing NFE | paper | ours / paper | Training Time (min) |" in table
    assert "| 8.002 | 4.001 ± 0.000 | 2 | 2.590 | 1.295 ± 0.222 | 2 |" in table
    row |= {"test_top5_accuracy": 0.8181, "train_time": 1.0, "backward_time": 0.1}
    assert "| 81.810 | 81.813 ± 0.350 | 1 |" in paper.markdown(4, [row])


def test_our_times_below_a_tenth_keep_three_significant_digits_beside_the_papers():
    """Prediction times of 2.63 and 2.91 ms a batch (a CPU's mnist_dense) read 0.00277 ±
    0.00020, and 0.41 ms (a GPU's) 0.000410, where the paper's three decimals wrote 0.003 ±
    0.000 and 0.000: one digit or none to tell the methods apart by."""
    rows = [
        _row(CONTINUOUS, "vanilla", "tsit5", seed, test_accuracy=0.9, predict_time=seconds)
        for seed, seconds in enumerate([0.00263, 0.00291])
    ]
    rows.append(_row("Skip DEQ", "skip", "tsit5", 0, test_accuracy=0.9, predict_time=0.00041))
    lines = paper.markdown(1, rows).splitlines()
    vanilla = next(line for line in lines if line.startswith(f"| {CONTINUOUS} |"))
    assert vanilla.endswith("| 0.00277 ± 0.00020 | 0.038 ± 0.009 | 0.0729 |")
    assert lines[-1].endswith("| 0.000410 | - | - |")


def test_the_report_writes_the_table_and_readable_figures_for_a_paper_experiment(tmp_path):
    rows, curves = _run()
    base = {"data": {"dataset": "digits"}, "model": {"model": "mnist_dense"}}
    experiment = spec.from_dict("table2", base | {"search": {"paper": {"table": 2}}})
    text = paper.write(str(tmp_path), experiment, rows, curves)
    assert (tmp_path / paper.TABLE_FILE).read_text() == text.lstrip("\n")
    assert text.startswith("\n### Table 2: CIFAR10 Classification with Small Neural Network")
    for name, (height, width) in [
        (paper.FIGURE1_FILE, (499, 1320)),  # seven methods, one bar row each
        (paper.CURVES_FILE, (759, 1970)),  # one legend per row, right of it
    ]:
        image = matplotlib.image.imread(tmp_path / name)
        assert image.shape[:2] == (height, width) and image.std() > 0.05
    named = paper.written(experiment)
    assert named == [paper.TABLE_FILE, paper.FIGURE1_FILE, paper.CURVES_FILE]
    assert all((tmp_path / name).is_file() for name in named)
    assert paper.written(spec.from_dict("plain", base)) == []
    assert paper.write(str(tmp_path / "none"), spec.from_dict("plain", base), rows, curves) == ""
    assert not (tmp_path / "none").exists()


def test_figures_4_6_name_a_searchs_many_groups_in_legends_that_neither_overlap_nor_get_cut(
    monkeypatch,
):
    """40 searched groups per kind: each row's legend, one column of the figure's height, ran
    over the other's and off the image; each now fills columns of paper.LEGEND_ROWS beside its
    row, and the image grows to hold them and keeps the figure's title."""
    rows, curves = _run()
    label = "variant=skip, solver=bs3, adjoint=gmres, abstol=0.00{}, max_steps=20"
    for solver, kind in [("vcab3", "Continuous"), ("broyden", "Discrete")]:
        for i in range(40):
            group = f"{kind} {label.format(i)}"
            rows.append(_row(group, "skip", solver, 0, test_accuracy=0.8))
            curves[group] = curves[CONTINUOUS]
    drawn = []

    def drawing(figure: Figure, dpi: int, outside: list[Legend]) -> bytes:
        drawn.append((figure, outside))
        return png(figure, dpi=dpi, outside=outside)

    monkeypatch.setattr(paper, "png", drawing)
    image = matplotlib.image.imread(io.BytesIO(paper.curves_figure(rows, curves)))
    [(figure, legends)] = drawn
    figure.canvas.draw()
    first, second = (legend.get_window_extent() for legend in legends)
    assert [legend._ncols for legend in legends] == [3, 3] and first.y0 > second.y1
    assert image.shape[1] / 110 > first.x1 / figure.dpi and image.shape[0] > 6.8 * 110


def test_the_curves_figure_s_time_panels_turn_logarithmic_where_the_variants_span_decades(
    monkeypatch,
):
    """A Skip DEQ's backward of 5 ms beside a Vanilla one's of 0.5 s read as 0 on a linear
    axis; the accuracy panels and the times of one decade stay linear."""
    monkeypatch.setattr(paper, "png", lambda figure, **layout: figure)
    rows = [
        _row("Vanilla Discrete DEQ", "vanilla", "broyden", 0),
        _row("Skip Discrete DEQ", "skip", "broyden", 0),
    ]
    steps = {"step": [10, 20], "predict_time": [0.1, 0.2], "test_accuracy": [0.01, 0.9]}
    curves = {
        "Vanilla Discrete DEQ": [pd.DataFrame(steps | {"backward_time": [0.5, 0.4]})],
        "Skip Discrete DEQ": [pd.DataFrame(steps | {"backward_time": [0.005, 0.004]})],
    }
    figure = paper.curves_figure(rows, curves)
    assert [axis.get_yscale() for axis in figure.axes[:3]] == ["linear", "log", "linear"]


def test_a_line_of_figures_4_6_is_the_mean_over_seeds_at_each_step_accuracy_in_percent(
    monkeypatch,
):
    """Two seeds of a Skip Continuous DEQ, one missing a report: each step's point is the mean
    of the seeds that reported it, an accuracy in percent and a time as it is."""
    monkeypatch.setattr(paper, "png", lambda figure, **layout: figure)
    rows = [_row("Skip Continuous DEQ", "skip", "vcab3", seed) for seed in (0, 1)]
    seeds = [
        pd.DataFrame({"step": [10, 20], "test_accuracy": [0.5, 0.7], "backward_time": 0.2}),
        pd.DataFrame({"step": [10, 20], "test_accuracy": [0.6, math.nan], "backward_time": 0.4}),
    ]
    figure = paper.curves_figure(rows, {"Skip Continuous DEQ": seeds})
    backward, accuracy = figure.axes[4].lines[0], figure.axes[5].lines[0]
    assert list(accuracy.get_xdata()) == [10, 20]
    assert list(accuracy.get_ydata()) == pytest.approx([55.0, 70.0])
    assert list(backward.get_ydata()) == pytest.approx([0.3, 0.3])
    assert [len(axis.lines) for axis in figure.axes[:3]] == [0, 0, 0]


def test_a_panel_of_figures_4_6_that_no_trial_reported_says_so(monkeypatch):
    """A Continuous DEQ alone whose tests all failed: the Discrete row and the test panels of
    the Continuous one were bare 0-1 axes; each says what no trial reported, and the drawn
    backward panel keeps its step ticks though the empty panels share its x axis."""
    monkeypatch.setattr(paper, "png", lambda figure, **layout: figure)
    rows = [_row("Vanilla Continuous DEQ", "vanilla", "vcab3", 0)]
    curves = {"Vanilla Continuous DEQ": [pd.DataFrame({"step": [10, 20], "backward_time": 0.1})]}
    figure = paper.curves_figure(rows, curves)
    said = [[t.get_text() for t in axis.texts] for axis in figure.axes[:6]]
    assert said == [
        ["no Discrete DEQ trial reported predict_time"],
        ["no Discrete DEQ trial reported backward_time"],
        ["no Discrete DEQ trial reported test_accuracy"],
        ["no Continuous DEQ trial reported predict_time"],
        [],
        ["no Continuous DEQ trial reported test_accuracy"],
    ]
    backward = figure.axes[4]
    assert backward.axison and [len(line.get_xdata()) for line in backward.lines] == [2]
    assert list(backward.get_xticks()) != []


def test_figure_1_is_relative_to_the_vanilla_continuous_deq_and_figures_4_6_skip_the_node():
    rows, _ = _run()
    means = {"Vanilla Continuous DEQ": 0.25, "Neural ODE": 2.48, "Skip DEQ": math.nan}
    assert paper._relative(means) == {CONTINUOUS: 1.0, "Neural ODE": pytest.approx(9.92)}
    assert paper._relative({"Neural ODE": 2.0}) == {}
    assert [paper._kind(r) for r in rows] == [
        ("Continuous", "vanilla"),
        ("Continuous", "vanilla"),
        ("Discrete", "skip_reg"),
        None,
    ]
    jacobian = {"config.model.jac_reg": True, "config.train.lambda_jac": 1.0}
    assert paper._kind(rows[0] | jacobian) is None
    # An estimate logged alone (lambda_jac 0) trains and times as the plain DEQ does.
    logged = rows[0] | jacobian | {"config.train.lambda_jac": 0.0}
    assert paper._kind(logged) == ("Continuous", "vanilla")


def test_a_seed_whose_measure_is_not_finite_is_left_out_of_the_mean():
    """A seed that diverged reports NaN: the cell averages the others, as with a missing one,
    and a ratio to a reference of 0 is no number rather than an error."""
    rows, _ = _run()
    diverged = rows[0] | {"seed": 2, "test_accuracy": math.nan, "backward_time": math.inf}
    line = next(
        line for line in paper.markdown(2, [*rows, diverged]).splitlines() if CONTINUOUS in line
    )
    assert line.startswith(f"| {CONTINUOUS} | 3 | 81.000 ± 1.414 | 80.807 ± 0.631 |")
    assert "| 0.250 ± 0.071 | 0.261 ± 0.010 |" in line
    assert math.isnan(paper.ratio(1.0, 0.0)) and paper._relative({CONTINUOUS: 0.0}) == {}


def test_our_rows_that_the_paper_lacks_follow_its_rows():
    """Table 4 has no Neural ODE and no raydeq row: they come after the paper's six, in the
    order of our results."""
    rows, _ = _run()
    label = "Skip Reg. Continuous DEQ (raydeq, lambda_skip 1.0)"
    extra = _row(label, "skip_reg", "vcab3", 0, test_top5_accuracy=0.5)
    lines = paper.markdown(4, [*rows, extra]).splitlines()[4:]
    methods = [line.split(" | ")[0].removeprefix("| ") for line in lines]
    assert methods == [*LABELS[4], "Neural ODE", label]
    assert lines[-1].startswith(f"| {label} | 1 | 50.000 | - | - |")


def test_a_searchers_paper_points_fill_the_papers_rows():
    """A searcher's group of a paper point lists the point's values after its label (ImageNet's
    Table 4 search): the point fills its label's row, 80 / 81.329 = 0.984, and a drawn trial
    follows the paper's rows; a label that names two groups keeps them apart."""
    rows, _ = _run()
    point = f"{CONTINUOUS}, variant=vanilla, solver=vcab3, abstol=0.05"
    drawn = "variant=skip, solver=tsit5, abstol=0.0123"
    searched = [
        rows[0] | {"group": point, "paper": True, "test_top5_accuracy": 0.80},
        rows[0] | {"group": drawn, "paper": False, "test_top5_accuracy": 0.90},
    ]
    lines = paper.markdown(4, searched).splitlines()[4:]
    assert lines[1].startswith(f"| {CONTINUOUS} | 1 | 80.000 | 81.329 ± 0.516 | 0.984 |")
    assert [line.split(" | ")[0].removeprefix("| ") for line in lines] == [*LABELS[4], drawn]
    twice = [searched[0], searched[0] | {"group": f"{point}1"}]
    assert list(paper._groups(twice)) == [point, f"{point}1"]


def test_the_ratio_to_the_paper_is_of_our_mean_over_the_seeds():
    """Three seeds at 80, 82 and 90 %: ours is their mean, 84, and 84 / 80.807 = 1.04."""
    rows, _ = _run()
    third = rows[0] | {"seed": 2, "test_accuracy": 0.90}
    line = next(
        line for line in paper.markdown(2, [*rows, third]).splitlines() if CONTINUOUS in line
    )
    assert line.startswith(f"| {CONTINUOUS} | 3 | 84.000 ± 5.292 | 80.807 ± 0.631 | 1.04 |")


def test_figure_1_of_a_search_beside_the_table_draws_the_papers_methods_alone(monkeypatch):
    """A searcher's 100 drawn trials each drew a bar row, a 5,119 px image in which the paper's
    methods were lost: Figure 1 draws the table's points (the paper's seven rows and a labelled
    variant of ours), as tall as without the search, and its title counts the trials it leaves
    to pareto.png and the table."""
    point = f"{CONTINUOUS}, variant=vanilla, solver=vcab3, abstol=0.05"
    extra = "Skip Reg. Continuous DEQ (raydeq, lambda_skip 1.0)"
    times = {"train_time": 0.5, "backward_time": 0.2}
    rows = [
        _row(point, "vanilla", "vcab3", 0, **times) | {"paper": True},
        _row(extra, "skip_reg", "vcab3", 0, train_time=0.4, backward_time=0.1) | {"paper": True},
    ]
    for i in range(100):
        group = f"variant=skip, solver=tsit5, abstol=0.{i:04d}"
        rows.append(_row(group, "skip", "tsit5", 0, **times) | {"paper": False})
    image = matplotlib.image.imread(io.BytesIO(paper.figure1(2, rows)))
    assert image.shape[:2] == (545, 1320)  # eight bar rows: one more than the 499 px of seven
    monkeypatch.setattr(paper, "png", lambda figure, dpi: figure)
    figure = paper.figure1(2, rows)
    labels = [label.get_text() for label in figure.axes[0].get_yticklabels()]
    assert labels == [*LABELS[2], extra]  # the panels share them
    for axis, relative in zip(figure.axes, (0.8, 0.5), strict=True):
        assert len(axis.patches) == 2 * len(labels)
        widths = [bar.get_width() for bar in axis.patches[: len(labels)]]
        ours = {label: width for label, width in zip(labels, widths, strict=True) if width}
        assert ours == {CONTINUOUS: 1.0, extra: pytest.approx(relative)}
    assert figure._suptitle.get_text().endswith(
        "(100 trials of no labelled variant left out: see pareto.png and paper_table.md)"
    )
