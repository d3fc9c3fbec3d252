"""Smoke test of the benchmarks: every suite at the tiniest sizes, the harness, report files."""

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ticking
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import raydeq.bench.__main__ as bench_main
from raydeq import solve
from raydeq.bench.__main__ import MAX_THREADS, check_device, main, parse, parse_weights
from raydeq.bench.harness import cases, gradients, models, timing, training
from raydeq.bench.harness import report as report_module
from raydeq.bench.harness.cases import (
    Outcome,
    backward_case,
    forward_case,
    loosest,
    raydeq_implicit,
)
from raydeq.bench.harness.context import Checkpoint, Context
from raydeq.bench.harness.gradients import TOLERANCES, GradientSetup
from raydeq.bench.harness.memory import peak_memory
from raydeq.bench.harness.problems import SpectralProblem, Spectrum, gradient_error
from raydeq.bench.harness.report import Report, Section, Target, fmt, output_stem, table, write
from raydeq.bench.harness.timing import Timing, measure, paired_ratio, ratio, time_call
from raydeq.bench.suites import (
    MODULES,
    SUITES,
    adjoints,
    discrete,
    node,
    skip,
    skip_lambda,
    step_cost,
    torchdeq,
    train_step,
)
from raydeq.bench.suites import memory as memory_suite
from raydeq.bench.suites import overhead as overhead_suite
from raydeq.bench.suites import torchdiffeq as torchdiffeq_suite
from raydeq.models import PRESETS
from raydeq.training import storage
from raydeq.training.checkpoint import read_checkpoint, write_checkpoint
from raydeq.training.objective import Objective
from raydeq.training.storage import StorageError

CPU = torch.device("cpu")

# One pytest-xdist worker runs them all: whole_run, one tiny run of every benchmark, once.
pytestmark = pytest.mark.xdist_group("bench")


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Report, str, Path]:
    """One tiny run of every benchmark, shared by the tests of its suites' sections and output
    (each suite at its tiny size takes seconds to a minute): the report main returned, what it
    printed on stderr, and the folder it wrote to."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            report = main(["--size", "tiny", "--models", "mnist_dense", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
        sys.stderr.write(err.getvalue())
    return report, err.getvalue(), out


@pytest.fixture(scope="module")
def run(whole_run: tuple[Report, str, Path]) -> tuple[dict, str]:
    """The JSON and Markdown that the tiny run of every benchmark wrote."""
    out = whole_run[2]
    (json_path,) = out.glob("*-cpu.json")
    (md_path,) = out.glob("*-cpu.md")
    return json.loads(json_path.read_text()), md_path.read_text()


def test_every_benchmark_reports_rows_or_says_why_not(run):
    data, _ = run
    assert [s["name"] for s in data["sections"]] == list(SUITES)
    assert data["device"] == "cpu" and data["size"] == "tiny"
    for section in data["sections"]:
        assert section["rows"] or section["notes"], section["name"]
        for row in section["rows"]:
            assert set(row) <= set(section["columns"])


def test_targets_carry_measured_ratio_limit_and_verdict(run):
    data, markdown = run
    targets = [t for s in data["sections"] for t in s["targets"]]
    assert len(targets) >= 10
    for target in targets:
        assert target["passed"] in (True, False, None)
        if target["measured"] is not None and not math.isnan(target["measured"]):
            assert target["passed"] is not None
    assert "## Targets" in markdown
    assert markdown.count("| PASS |") + markdown.count("| FAIL |") + markdown.count(
        "| n/a |"
    ) == len(targets)


def test_solver_rows_reach_their_tolerance(run):
    data, _ = run
    (discrete,) = [s for s in data["sections"] if s["name"] == "discrete"]
    spectral = [r for r in discrete["rows"] if r["problem"] == "spectral"]
    assert {r["solver"] for r in spectral} == {
        "fixed_point",
        "anderson",
        "broyden",
        "vcab3",
        "tsit5",
        "euler",
    }
    assert all(r["max residual"] <= 1.0001e-5 for r in spectral)


def rows_by(section: dict, column: str, **where: str) -> dict:
    """The section's rows keyed by one column, those matching every `where` column only."""
    rows = [r for r in section["rows"] if all(r[k] == v for k, v in where.items())]
    return {row[column]: row for row in rows}


def target_named(section: dict, start: str) -> dict:
    """The one target of the section whose name starts with `start`."""
    (target,) = [t for t in section["targets"] if t["name"].startswith(start)]
    return target


def round_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the two cases' time ratio within each round."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def test_each_target_is_the_quotient_its_rows_and_raw_times_give(run):
    """Every ratio target is recomputed from the report itself: numerator and denominator the
    way round the target's name says, the fastest or fewest case chosen by min, and a time
    ratio as the median over rounds of the raw times written beside it."""
    data, _ = run
    sections = {s["name"]: s for s in data["sections"]}
    discrete = sections["discrete"]
    spectral = rows_by(discrete, "solver", problem="spectral")
    for solver in ("broyden", "anderson"):
        measured = target_named(discrete, f"{solver}: NFE")["measured"]
        assert measured == pytest.approx(spectral[solver]["NFE"] / spectral["fixed_point"]["NFE"])
    adjoints = rows_by(sections["adjoints"], "adjoint")
    measured = target_named(sections["adjoints"], "GMRES VJPs / Neumann VJPs")["measured"]
    assert measured == pytest.approx(adjoints["GMRES"]["VJPs"] / adjoints["Neumann"]["VJPs"])
    overhead = sections["overhead"]
    calls, times = overhead_suite.SIZES["tiny"].calls, overhead["timings"]
    for solver, row in rows_by(overhead, "solver").items():
        per_nfe = round_ratio(times[solver], times["f"]) * calls / row["NFE"]
        assert row["ratio"] == pytest.approx(per_nfe)
        if solver in overhead_suite.LIMITS:
            assert target_named(overhead, f"{solver}:")["measured"] == pytest.approx(per_nfe)
    ode = sections["torchdiffeq"]
    ours = rows_by(ode, "method", library="raydeq").values()
    fewest = min(row["NFE"] for row in ours if row["max residual"] <= torchdiffeq_suite.TOL)
    peers = rows_by(ode, "method", library="torchdiffeq")
    for label in ("odeint", "odeint_event"):
        measured = target_named(ode, f"raydeq best NFE / torchdiffeq dopri5 {label} ")["measured"]
        assert measured == pytest.approx(fewest / peers[f"dopri5 {label}"]["NFE"])
    deq = sections["torchdeq"]
    if not torchdeq.available():  # installed by the bench extra, which CI leaves out
        assert [t["measured"] for t in deq["targets"]] == [None, None]
    else:
        forward = {
            f"{r['library']} {r['method']}": r
            for r in deq["rows"]
            if r["part"] == "forward" and r["max residual"] <= torchdeq.TOL * 1.01
        }
        fastest = {
            library: min(
                (label for label in forward if label.startswith(library)),
                key=lambda label: statistics.median(deq["timings"][f"forward/{label}"]),
            )
            for library in ("raydeq", "torchdeq")
        }
        target = target_named(deq, "forward:")
        assert target["detail"] == f"{fastest['raydeq']} vs {fastest['torchdeq']}"
        assert target["measured"] == pytest.approx(
            round_ratio(*(deq["timings"][f"forward/{fastest[k]}"] for k in ("raydeq", "torchdeq")))
        )
        theirs = [f"torchdeq {method}" for method in rows_by(deq, "method", library="torchdeq")]
        peer = min(
            (label for label in theirs if f"backward/{label}" in deq["timings"]),
            key=lambda label: statistics.median(deq["timings"][f"backward/{label}"]),
        )
        target = target_named(deq, "backward")
        assert target["detail"] == f"vs {peer}"
        assert target["measured"] == pytest.approx(
            round_ratio(deq["timings"]["backward/raydeq gmres"], deq["timings"][f"backward/{peer}"])
        )
    variants = rows_by(sections["skip"], "variant")
    measured = sections["skip"]["targets"][0]["measured"]
    assert measured == pytest.approx(
        variants["skip_reg"]["test NFE"] / variants["vanilla"]["test NFE"]
    )
    for row in sections["memory"]["rows"]:
        assert row["unrolled / implicit"] == pytest.approx(
            row["unrolled MiB"] / row["implicit MiB"]
        )


def test_a_solver_stopped_short_of_the_tolerance_fails_its_nfe_target(monkeypatch):
    """Broyden cut off after 2 steps has a tiny NFE but has not solved the problem: its NFE
    target is a FAIL, not a PASS (nor the n/a of a target not measured), while Anderson's is
    measured as before."""
    full_run = discrete.raydeq_forward

    def cut_broyden(solver: str, tol: float, max_steps: int, **options: object):
        return full_run(solver, tol, 2 if solver == "broyden" else max_steps, **options)

    monkeypatch.setattr(discrete, "raydeq_forward", cut_broyden)
    columns = ["problem", "solver", "NFE", "NFE / fixed point", "time ms", "max residual"]
    section = Section("discrete", "t", columns)
    discrete.spectral_rows(Context(CPU, "tiny"), discrete.SIZES["tiny"], section)
    rows = {row["solver"]: row for row in section.rows}
    assert rows["broyden"]["NFE"] <= 3 and rows["broyden"]["max residual"] > discrete.TOL
    broyden, anderson = section.targets
    assert broyden.name.startswith("broyden") and broyden.verdict() == "FAIL"
    assert broyden.measured == math.inf
    assert anderson.measured == pytest.approx(rows["anderson"]["NFE"] / rows["fixed_point"]["NFE"])


def test_torchdiffeq_s_event_stops_within_the_tolerance_at_every_atol_of_the_search():
    """odeint_event returns the middle of its bracket around the event: at an event placed at
    TOL itself the worst residual came out a hair above TOL at several atols (129 NFE at
    0.3 TOL on the tiny problem), which the search then dropped for a costlier atol."""
    problem = SpectralProblem(torchdiffeq_suite.SIZES["tiny"].spectrum, CPU)
    tol = torchdiffeq_suite.TOL
    for factor in torchdiffeq_suite.ATOL_FACTORS:
        case = forward_case(problem, torchdiffeq_suite.event_run(problem, factor * tol))
        assert time_call(case(), CPU)[1].residual <= torchdiffeq_suite.TOL, factor


def test_a_raydeq_solve_stopped_short_of_the_tolerance_is_not_the_best_against_torchdiffeq(
    monkeypatch,
):
    """Euler cut off after 2 steps has the fewest evaluations but has not reached the steady
    state: the targets against torchdiffeq take the fewest NFE of the solves that meet the
    tolerance, as torchdiffeq's settings must."""
    full_run = torchdiffeq_suite.raydeq_forward

    def cut_euler(solver: str, tol: float, max_steps: int):
        return full_run(solver, tol, 2 if solver == "euler" else max_steps)

    monkeypatch.setattr(torchdiffeq_suite, "raydeq_forward", cut_euler)
    section = torchdiffeq_suite.run(Context(CPU, "tiny"))
    ours = rows_by(section.__dict__, "method", library="raydeq")
    assert ours["euler"]["NFE"] <= 3 and ours["euler"]["max residual"] > torchdiffeq_suite.TOL
    fewest = min(
        row["NFE"] for row in ours.values() if row["max residual"] <= torchdiffeq_suite.TOL
    )
    peers = rows_by(section.__dict__, "method", library="torchdiffeq")
    for target in section.targets:
        label = "odeint_event" if "odeint_event" in target.name else "odeint"
        assert "euler" not in target.detail
        assert target.measured == pytest.approx(fewest / peers[f"dopri5 {label}"]["NFE"])


def test_a_backward_case_counts_the_backwards_vjps_and_evaluations_apart():
    """Three unrolled applications of f from z0 = 0: the backward takes a VJP through each
    (the first's to W and x alone, its input needing no gradient) and evaluates f never; its
    error is relative to the reference passed in (here autograd's gradient, then twice it)."""
    problem = SpectralProblem(Spectrum(dim=6, batch=2), CPU, torch.float64)
    problem.weight.requires_grad_(True)
    problem.x.requires_grad_(True)
    cotangent = torch.ones(2, 6, dtype=torch.float64)

    def forward() -> torch.Tensor:
        return problem.f(problem.f(problem.f(problem.z0())))

    exact = torch.autograd.grad((cotangent * forward()).sum(), [problem.weight, problem.x])
    doubled = (2 * exact[0], 2 * exact[1])
    for reference, error in ((exact, 0.0), (doubled, 0.5)):
        outcome = time_call(backward_case(problem, forward, cotangent, reference)(), CPU)[1]
        assert (outcome.nfe, outcome.nvjp) == (0, 3)
        assert outcome.error == pytest.approx(error, abs=1e-12)


@pytest.mark.parametrize(("adjoint", "products"), [("gmres", 11), ("fixed_point", 60)])
def test_a_backward_case_counts_an_implicit_backwards_vjps_as_its_solve_does(adjoint, products):
    """The counter tapped f's input, so the implicit adjoint's last product, to W and x alone,
    went uncounted: the adjoints and torchdeq suites' VJPs read 10 and 59 here, where the
    solve's own backward_nvjp read 11 and 60. It taps f's output now: every product counts."""
    setup = GradientSetup.make(Context(CPU, "tiny"), Spectrum(dim=16, batch=4, slow_eig=0.8))
    problem, solved = setup.problem, []

    def forward() -> torch.Tensor:
        options = {"rtol": 1e-6, "max_iters": 2000}
        sol = solve(
            problem.f, problem.z0(), "anderson", adjoint, 1e-9, 0.0, adjoint_options=options
        )
        solved.append(sol)
        return solved[-1].z

    outcome = time_call(setup.case(forward)(), CPU)[1]
    assert outcome.nvjp == solved[-1].stats.backward_nvjp == products


def test_measure_interleaves_rotated_rounds_and_keeps_the_last_value():
    calls: list[str] = []

    def case(name: str):
        def prepare():
            calls.append(f"prepare {name}")
            return lambda: calls.append(name) or name

        return prepare

    timings = measure({n: case(n) for n in "abc"}, CPU, repeats=3, warmup=1)
    order = [c for c in calls if not c.startswith("prepare")]
    assert order == list("abcbcacababc")
    assert all(len(t.seconds) == 3 and t.value == n for n, t in timings.items())
    assert all(t.median >= 0 for t in timings.values())


def test_measure_with_a_label_says_each_round_it_has_timed(capsys):
    measure({"a": lambda: lambda: None}, CPU, repeats=2, warmup=1, label="[x] timing")
    assert capsys.readouterr().err.splitlines() == [f"[x] timing: round {i}/3" for i in (1, 2, 3)]
    measure({"a": lambda: lambda: None}, CPU, repeats=2)
    assert capsys.readouterr().err == ""


def test_measure_says_the_case_it_begins_within_a_long_round(capsys, monkeypatch):
    """A round of the node suite's cifar10_small cases at batch 16 took 47 s on 2 busy cores
    between two round lines; a case begun 5 s or more after the line before is a line naming
    it, with the time left to the timing's end."""
    ticking(monkeypatch, 10.0)
    measure({n: lambda: lambda: None for n in "ab"}, CPU, repeats=1, warmup=1, label="[x] timing")
    assert capsys.readouterr().err.splitlines() == [
        "[x] timing: 0/4, round 1/2, a",
        "[x] timing: 1/4, round 1/2, b, eta 1m00s",
        "[x] timing: round 1/2",
        "[x] timing: 2/4, round 2/2, b, eta 30s",
        "[x] timing: 3/4, round 2/2, a, eta 13s",
        "[x] timing: round 2/2",
    ]


def test_the_skip_suites_say_how_far_their_training_has_come(monkeypatch, capsys):
    """skip trained its three variants in turn (750 steps of each at --quick, 9 minutes here on
    busy cores) and skip_lambda each configuration (150 to 500 steps) between `[skip] running`
    and the timing's first round without a line; each said every tenth of its steps, which at
    skip's 54 s apart left it silent still, and now says a step begun 5 s or more after the
    line before, with the time left."""
    ticking(monkeypatch, 10.0)
    monkeypatch.setattr(skip, "adam", lambda net, lr: None)
    monkeypatch.setattr(skip, "train_step", lambda *args: None)
    nets = {variant: torch.nn.Linear(1, 1) for variant in skip.VARIANTS}
    train = (torch.zeros(6, 1), torch.zeros(6, dtype=torch.long))
    size = skip.SkipSize(epochs=2, train=6, test=2, batch=2, repeats=1)
    step_times = skip.train_lockstep(Context(CPU, "tiny"), nets, train, size)
    assert all(len(times) == 6 for times in step_times.values())
    said = "[skip] training the variants in turn"
    etas = ["", ", eta 1m40s", ", eta 1m00s", ", eta 40s", ", eta 25s", ", eta 12s"]
    assert capsys.readouterr().err.splitlines() == [f"{said}: {n}/6{e}" for n, e in enumerate(etas)]
    monkeypatch.setattr(training, "adam", lambda model, lr: None)
    monkeypatch.setattr(training, "train_step", lambda *args: None)
    monkeypatch.setattr(skip_lambda, "jacobian_norm", lambda model, batches: 0.0)
    columns = ["variant", "lambda_skip", "lambda_jac", "test NFE", "test accuracy"]
    section = Section(
        "skip_lambda", "t", [*columns, "Jacobian before", "Jacobian after", "train s"]
    )
    digits = (torch.zeros(2, 1, 28, 28), torch.tensor([0, 1]))
    config = skip_lambda.Config("skip_reg", 0.1, 1.0)
    skip_lambda.add_row(Context(CPU, "tiny"), section, config, digits, [digits])
    said = "[skip_lambda] training skip_reg, lambda_skip 0.1, lambda_jac 1"
    assert capsys.readouterr().err.splitlines() == [f"{said}: 0/2", f"{said}: 1/2, eta 20s"]


def test_the_suites_say_each_part_outside_their_timing_rounds_as_it_begins(monkeypatch, capsys):
    """At --quick on 2 busy cores step_cost counted its 13 cases (5 of them compiling) for 185
    s, memory its 7 rows for 78 s and torchdiffeq searched its settings in hindsight for 93 s,
    each without a line; each part now says what it is on stderr as it begins."""
    cost = {"steps": 1, "nfe": 1, "ops": 1.0, "syncs": 0.0, "converged": True}
    for counter in ("step_cost", "compiled_step_cost", "arnoldi_step_cost"):
        monkeypatch.setattr(step_cost, counter, lambda *args, **options: cost)
    step_cost.run(Context(CPU, "tiny"))
    eager = ["vcab3", "tsit5", "bs3", "euler", "broyden", "anderson", "fixed_point"]
    compiled = [f"{s}, compile=True" for s in eager if s not in ("broyden", "anderson")]
    solvers = [*eager, *compiled, "gmres (backward)"]
    assert capsys.readouterr().err.splitlines() == [
        f"[step_cost] counting {solver} ({n}/13)" for n, solver in enumerate(solvers, 1)
    ]
    monkeypatch.setattr(memory_suite, "measure_row", lambda *args: None)
    memory_suite.run(Context(CPU, "tiny"))
    assert capsys.readouterr().err.splitlines() == [
        "[memory] batch 2, abstol 0.0001 (1/4)",
        "[memory] batch 4, abstol 0.0001 (2/4)",
        "[memory] batch 2, abstol 0.01 (3/4)",
        "[memory] batch 2, abstol 0.001 (4/4)",
    ]
    monkeypatch.setattr(torchdiffeq_suite, "best_event_atol", lambda problem: None)
    monkeypatch.setattr(torchdiffeq_suite, "best_fixed_time", lambda *args: None)
    assert torchdiffeq_suite.peer_cases(None, 1.0, 2) == ({}, {})
    said = "[torchdiffeq] choosing"
    assert capsys.readouterr().err.splitlines() == [
        f"{said} dopri5 odeint_event's atol in hindsight (1/3)",
        f"{said} dopri5 odeint's end time and atol in hindsight (2/3)",
        f"{said} adaptive_heun odeint's end time and atol in hindsight (3/3)",
    ]


def test_the_node_suite_says_each_round_of_its_timing(whole_run):
    """Its timing took minutes at --quick after the training's last progress line."""
    _, err, _ = whole_run
    assert "[node] timing mnist_dense: round 1/2\n[node] timing mnist_dense: round 2/2\n" in err


def test_time_ratios_pair_the_cases_within_each_round():
    # Rounds 4 and 5 are slow for both cases; in round 3 a spell slows only the second.
    first = Timing(seconds=[1.0, 1.0, 1.0, 2.0, 2.0])
    second = Timing(seconds=[2.0, 2.0, 4.0, 4.0, 4.0])
    assert first.median / second.median == 0.25
    assert paired_ratio(first, second) == 0.5
    with pytest.raises(ValueError):
        paired_ratio(first, Timing(seconds=[1.0]))


def test_target_verdicts():
    assert Target("t", 0.2, 0.5).passed is True
    assert Target("t", 0.7, 0.5).passed is False
    assert Target("t", 9.0, 8.0, at_least=True).passed is True
    assert Target("t", None, 0.5).passed is None
    assert Target("t", float("nan"), 0.5).verdict() == "n/a"
    assert fmt(None) == "" and fmt(0.000123) == "1.23e-04" and fmt(12.345) == "12.3"
    with pytest.raises(KeyError):
        Section("s", "S", ["a"]).add(b=1)


def test_a_cell_of_thousands_is_written_whole_not_in_scientific_notation():
    """Scientific notation is for the tiny and the huge: 3,000 NFE or 1,234.5 s read whole."""
    assert fmt(3000.0) == "3000" and fmt(1234.5) == "1234" and fmt(-99999.0) == "-99999"
    assert fmt(1e5) == "1.00e+05" and fmt(999.4) == "999" and fmt(2500.0, digits=4) == "2500"


def test_a_cell_that_rounds_up_to_thousands_is_written_whole():
    """999.7 to three digits rounds to 1000, which the g format wrote as 1e+03."""
    assert fmt(999.7) == "1000" and fmt(-999.5) == "-1000" and fmt(9999.6, digits=4) == "10000"


def test_a_measurement_on_its_limit_passes_and_the_table_shows_which_way_the_limit_binds():
    """Limits are inclusive both ways (syncs per step can land exactly on theirs), and the
    Markdown writes <= for an upper limit, >= for a lower one, beside the verdict."""
    assert Target("t", 0.25, 0.25).verdict() == "PASS"
    assert Target("t", 8.0, 8.0, at_least=True).verdict() == "PASS"
    assert Target("t", 7.5, 8.0, at_least=True).verdict() == "FAIL"
    targets = [Target("upper", 0.3, 0.25), Target("lower", 9.0, 8.0, at_least=True)]
    section = Section("s", "S", ["a"], targets=targets)
    report = Report(date="2026-12-03", device="cpu", size="tiny", machine={}, sections=[section])
    markdown = report.to_markdown()
    assert "| s | upper | 0.3 | <= 0.25 | FAIL |  |" in markdown
    assert "| s | lower | 9 | >= 8 | PASS |  |" in markdown
    assert [t["passed"] for t in json.loads(report.to_json())["sections"][0]["targets"]] == [
        False,
        True,
    ]


def refuse_constant(name: str) -> float:
    """parse_constant for a strict reader: NaN, Infinity and -Infinity are not JSON."""
    raise ValueError(f"not strict JSON: {name}")


def test_the_json_is_strict_with_every_nan_or_infinity_written_as_null():
    """jq and JavaScript refuse NaN and Infinity: the report writes them as null, and a
    target's verdict still says whether an infinite measurement failed."""
    section = Section(
        "s",
        "S",
        ["a", "b"],
        targets=[Target("inf", math.inf, 0.5), Target("nan", math.nan, 0.5)],
        timings={"case": [0.25, math.inf]},
    )
    section.add(a=math.nan, b=-math.inf)
    section.add(a=1.5, b="x")
    report = Report(date="2026-12-03", device="cpu", size="tiny", machine={}, sections=[section])
    data = json.loads(report.to_json(), parse_constant=refuse_constant)
    (raw,) = data["sections"]
    assert raw["rows"] == [{"a": None, "b": None}, {"a": 1.5, "b": "x"}]
    assert [(t["measured"], t["passed"]) for t in raw["targets"]] == [(None, False), (None, None)]
    assert raw["timings"] == {"case": [0.25, None]}


def test_spread_is_the_interquartile_range_over_the_median_and_a_zero_time_ratio_is_infinite():
    # Exclusive quartiles of 1, 2, 3, 4, 10: q1 halfway from 1 to 2, q3 halfway from 4 to 10.
    assert Timing(seconds=[4.0, 1.0, 10.0, 3.0, 2.0]).spread == pytest.approx((7.0 - 1.5) / 3.0)
    assert Timing(seconds=[1.0, 5.0, 9.0]).spread == 0.0
    assert ratio(3.0, 0.0) == math.inf and ratio(3.0, 2.0) == 1.5


def test_gradient_error_is_relative_to_the_exact_gradient():
    """||g - g_exact|| / ||g_exact|| over both leaves together, not over the computed g."""
    grads = (torch.tensor([2.0, 0.0]), torch.tensor([[1.0]]))
    exact = (torch.tensor([0.0, 1.0]), torch.tensor([[1.0]]))
    # difference (2, -1, 0): squared norm 5; exact gradient's squared norm 2.
    assert gradient_error(grads, exact) == pytest.approx(math.sqrt(5 / 2))


def test_peak_memory_counts_live_storages():
    def allocate():
        kept = torch.ones(1024, 256)  # 1 MiB, alive at the end
        for _ in range(3):
            torch.ones(2048, 256)  # 2 MiB each, freed at once
        return kept

    peak, kept = peak_memory(allocate, CPU)
    assert 3 * 2**20 <= peak < 4 * 2**20
    assert kept.shape == (1024, 256)


def test_without_torchdeq_its_targets_keep_the_names_they_have_with_it(run, monkeypatch):
    """Results of a run without TorchDEQ name its targets as a run with it does, so that the
    same target reads n/a there instead of appearing under another name."""
    data, _ = run
    (measured,) = [s for s in data["sections"] if s["name"] == "torchdeq"]
    monkeypatch.setattr(torchdeq, "available", lambda: False)
    missing = torchdeq.run(Context(CPU, "tiny"))
    assert [t.name for t in missing.targets] == [t["name"] for t in measured["targets"]]
    assert [t.verdict() for t in missing.targets] == ["n/a", "n/a"]


def test_missing_peer_and_data_are_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setattr(torchdeq, "available", lambda: False)
    ctx = Context(CPU, "tiny", data_dir=tmp_path)
    section = torchdeq.run(ctx)
    assert not section.rows and "not installed" in section.notes[0]
    assert all(t.passed is None for t in section.targets)
    section = skip.run(ctx)
    assert not section.rows and "MNIST not found" in section.notes[0]
    section = skip_lambda.run(ctx)
    assert not section.rows and "MNIST not found" in section.notes[-1]


def test_node_benchmark_on_a_gpu_times_the_graph_variants_and_takes_the_fastest(monkeypatch):
    """The GPU's variant list, run on a CPU (where compile="graph" solves eagerly): a row for
    each, the same NFE as its eager twin, and targets against the fastest DEQ of them all."""
    every = node.DEQ_SOLVERS + tuple(node.GRAPHED)
    monkeypatch.setattr(node, "deq_variants", lambda device: every)
    section = node.run(Context(CPU, "tiny", ("mnist_dense",)))
    rows = {row["layer"]: row for row in section.rows}
    assert len(rows) == len(node.VARIANTS)
    for graphed, solver in node.GRAPHED.items():
        assert rows[node.VARIANTS[graphed]]["NFE"] == rows[node.VARIANTS[solver]]["NFE"]
    timings = section.timings
    for target in section.targets:
        part = "train" if "training step" in target.name else "backward"
        medians = {v: statistics.median(timings[f"mnist_dense/{v}/{part}"]) for v in every}
        fastest = min(medians, key=medians.get)
        assert target.detail.startswith(f"DEQ with {node.GRAPHED.get(fastest, fastest).upper()}")


def test_a_graph_capture_that_fails_on_a_gpu_loses_its_own_rows_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, one_thread: None
):
    """compile="graph" has its rows in the node suite on a GPU, timed in one measure with the
    eager rows: a capture that failed there lost the whole section, every preset's eager DEQ
    and Neural ODE rows and targets with it. They are now timed again without the graph rows."""
    every = node.DEQ_SOLVERS + tuple(node.GRAPHED)
    monkeypatch.setattr(node, "deq_variants", lambda device: every)
    real_measure = node.measure

    def measure(cases: dict, device: torch.device, *args: object, **options: object) -> dict:
        if any(name.partition("/")[0] in node.GRAPHED for name in cases):
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        return real_measure(cases, device, repeats=1, warmup=0)

    monkeypatch.setattr(node, "measure", measure)
    section = node.run(Context(CPU, "tiny", ("mnist_dense",)))
    eager = [layer for variant, layer in node.VARIANTS.items() if variant not in node.GRAPHED]
    assert [row["layer"] for row in section.rows] == eager
    assert len(section.targets) == 4
    assert all(
        t.detail in ("DEQ with VCAB3", "DEQ with BS3", "DEQ with EULER") for t in section.targets
    )
    error = "RuntimeError: operation not permitted when stream is capturing"
    assert (
        f'mnist_dense: compile="graph" failed ({error}); timed again without its rows.'
        in section.notes
    )
    assert "Traceback" in capsys.readouterr().err


def test_the_node_note_says_which_untrained_preset_unrolls_its_first_steps():
    """The note on the CIFAR-10 and ImageNet DEQs, which run untrained, said that their presets
    pretrain thousands of unrolled steps; of them only cifar10_small's has a warm-up."""
    note = node.run(Context(CPU, "tiny", ())).notes[0]
    untrained = [name for name, p in PRESETS.items() if p.input_shape != (1, 28, 28)]
    assert untrained == ["cifar10_small", "cifar10_large", "imagenet_small"]
    assert [name for name in untrained if PRESETS[name].pretrain_steps] == ["cifar10_small"]
    steps = PRESETS["cifar10_small"].pretrain_steps
    assert f"only cifar10_small unrolls f in its first {steps:,} training steps" in note


def test_node_benchmark_times_the_weights_of_a_training_checkpoint(tmp_path, capsys):
    model = models.build("mnist_dense", "skip", CPU, seed=1)
    with torch.no_grad():
        model.head.weight.mul_(2.0)
    folder = write_checkpoint({"step": 7, "model": model.state_dict()}, tmp_path / "ckpt")
    checkpoint = Checkpoint(folder, read_checkpoint(folder)["model"])
    loaded = models.build("mnist_dense", "vanilla", CPU, seed=0)
    models.load_checkpoint(loaded, checkpoint)
    assert torch.equal(loaded.head.weight, model.head.weight)
    assert torch.equal(loaded.layer.f.state.weight, model.layer.f.state.weight)
    section = node.run(Context(CPU, "tiny", ("mnist_dense",), weights={"mnist_dense": checkpoint}))
    # The compile="graph" DEQs run on a GPU only, where the targets take the fastest of all.
    assert len(section.rows) == len(node.VARIANTS) - len(node.GRAPHED)
    assert node.deq_variants(CPU) == node.DEQ_SOLVERS
    assert node.deq_variants(torch.device("cuda")) == node.DEQ_SOLVERS + tuple(node.GRAPHED)
    assert all(node.GRAPHED[v] in node.DEQ_SOLVERS and v in node.VARIANTS for v in node.GRAPHED)
    assert f"weights of the checkpoint {folder}" in section.notes[1]
    assert "parameters identical" in section.notes[1]
    with pytest.raises(ValueError, match="checkpoint of another model"):
        models.load_checkpoint(models.build("cifar10_small", "vanilla", CPU, seed=0), checkpoint)
    cut = Checkpoint(folder, checkpoint.weights | {"head.weight": model.head.weight[:5]})
    with pytest.raises(ValueError, match="weights of another size"):
        models.load_checkpoint(loaded, cut)
    # A trial's folder: its newest readable checkpoint (the newest here is cut short).
    trial = tmp_path / "trial"
    write_checkpoint({"step": 7, "model": model.state_dict()}, trial / "checkpoint_000007")
    newest = write_checkpoint({"step": 9, "model": {}}, trial / "checkpoint_000009")
    (newest / "state.pt").write_bytes(b"cut")
    read = parse_weights(argparse.ArgumentParser(), [f"mnist_dense={trial}"], ["mnist_dense"])
    assert torch.equal(read["mnist_dense"].weights["head.weight"], model.head.weight)
    # A trial of several workers keeps its checkpoints in its Train run, a folder inside.
    (tmp_path / "workers").mkdir()
    (tmp_path / "trial").rename(tmp_path / "workers" / "train")
    read = parse_weights(
        argparse.ArgumentParser(), [f"mnist_dense={tmp_path}/workers"], ["mnist_dense"]
    )
    assert torch.equal(read["mnist_dense"].weights["head.weight"], model.head.weight)
    (tmp_path / "empty").mkdir()
    for bad, message in (
        ("mnist_dense", "expected MODEL=CHECKPOINT_FOLDER"),
        (f"cifar10_large={folder}", "'cifar10_large' is not among --models"),
        (f"mnist_dense={tmp_path / 'empty'}", f"{tmp_path / 'empty'}: holds no checkpoint"),
        (f"mnist_dense={tmp_path / 'nothing'}", f"{tmp_path / 'nothing'}: no such folder"),
    ):
        with pytest.raises(SystemExit):
            main(["--models", "mnist_dense", "--weights", bad, "--out", str(tmp_path / "out")])
        assert message in capsys.readouterr().err


def test_weights_are_read_from_a_file_uri_as_load_model_reads_them(tmp_path, capsys):
    """A run stored under a file: URI names its folder so (`run=file:///...`), which load_model
    reads; --weights refused it as 'file:/...: no such folder', and an S3 URI as a missing
    folder 's3:/bucket/...'."""
    model = models.build("mnist_dense", "vanilla", CPU, seed=1)
    write_checkpoint({"step": 7, "model": model.state_dict()}, tmp_path / "my run" / "checkpoint_7")
    uri = f"file://{tmp_path}/my%20run"
    read = parse_weights(argparse.ArgumentParser(), [f"mnist_dense={uri}"], ["mnist_dense"])
    assert read["mnist_dense"].folder == tmp_path / "my run"
    assert torch.equal(read["mnist_dense"].weights["head.weight"], model.head.weight)
    with pytest.raises(SystemExit):
        parse_weights(argparse.ArgumentParser(), ["mnist_dense=s3://b/run"], ["mnist_dense"])
    assert "s3://b/run: only a local folder or a file: URI is read" in capsys.readouterr().err


def test_weights_of_another_model_stop_the_run_before_any_suite(tmp_path, capsys):
    """A checkpoint whose weights do not fit its preset is a usage error at once, not a failed
    node suite after the presets before it have trained, losing their rows."""
    model = models.build("mnist_dense", "vanilla", CPU, seed=1)
    folder = write_checkpoint({"step": 7, "model": model.state_dict()}, tmp_path / "ckpt")
    out = tmp_path / "out"
    for name, message in (
        ("cifar10_small", "holds no weights for stem.net.0.weight"),
        ("mnist_mdeq", "holds no weights for stem.net.0.weight"),
    ):
        argv = ["--models", "mnist_dense", name, "--weights", f"{name}={folder}"]
        with pytest.raises(SystemExit) as exit_info:
            main(["--size", "tiny", *argv, "--out", str(out)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"error: --weights '{name}={folder}': {folder} {message}" in err
        assert "it is a checkpoint of another model" in err and "running" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--models", "mnist"],
            "argument --models: invalid choice: 'mnist' (choose from 'mnist_dense'",
        ),
        (["--threads", "0"], f"argument --threads: '0' is not an integer from 1 to {MAX_THREADS}"),
        (
            ["--threads", str(2**64)],
            f"argument --threads: '{2**64}' is not an integer from 1 to {MAX_THREADS} (this",
        ),
        (["--threads", str(MAX_THREADS + 1)], f"'{MAX_THREADS + 1}' is not an integer from 1 to"),
        (["--device", "gpu"], "argument --device: 'gpu' is not a torch device"),
        (
            ["--seed", str(2**64)],
            f"argument --seed: '{2**64}' is not an integer from 0 to 4294967295",
        ),
        (["--seed", "-1"], "argument --seed: '-1' is not an integer from 0 to 4294967295"),
        # A digit to str.isdigit, no integer to int: "invalid seed value: '²'", no range.
        (["--seed", "²"], "argument --seed: '²' is not an integer from 0 to 4294967295"),
        (["--threads", "²"], f"argument --threads: '²' is not an integer from 1 to {MAX_THREADS}"),
        (["--only", "overhead", "overhead"], "--only: overhead given more than once; name each"),
        (
            ["--models", "mnist_dense", "cifar10_small", "mnist_dense"],
            "--models: mnist_dense given more than once; name each once",
        ),
        (
            ["--models", "mnist_dense", "--weights", "mnist_dense=a", "mnist_dense=b"],
            "--weights: mnist_dense given more than once; name each once",
        ),
        (
            ["--models", "cifar10_large"],
            "--models: no suite of --only overhead reads it, only node; drop it, or run one",
        ),
        (
            ["--weights", "mnist_dense=a"],
            "--weights: no suite of --only overhead reads it, only node, train_step; drop it",
        ),
        (  # train_step loads the weights of a preset of --models, which it then reads
            ["--only", "train_step", "--models", "cifar10_large", "--weights", "cifar10_large=a"],
            "--weights 'cifar10_large=a': ",
        ),
        (  # without node, a preset that train_step does not time would keep its weights unused
            ["--only", "train_step", "--models", "cifar10_small", "--weights", "cifar10_small=a"],
            "--weights 'cifar10_small=a': no suite of --only train_step times cifar10_small, "
            "train_step only mnist_dense, cifar10_large; add node to --only, or drop it",
        ),
    ],
)
def test_a_bad_argument_is_named_with_what_is_allowed(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        main(["--size", "tiny", "--only", "overhead", "--out", str(tmp_path), *args])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_models_left_out_or_given_to_a_suite_that_reads_them_are_taken(tmp_path):
    """--models, refused where no suite of --only reads it, is taken for one that does, and
    left out is the node suite's two presets."""
    out = ["--out", str(tmp_path)]
    assert parse(["--only", "overhead", *out]).models == ["mnist_dense", "cifar10_small"]
    assert parse(["--only", "skip", "node", "--models", "mnist_mdeq", *out]).models == [
        "mnist_mdeq"
    ]


def test_threads_up_to_the_machines_cpus_are_taken(tmp_path):
    """--threads takes each count from 1 to this machine's CPUs, both ends included."""
    for count in (1, MAX_THREADS):
        assert parse(["--threads", str(count), "--out", str(tmp_path)]).threads == count


def test_a_data_or_output_folder_that_cannot_serve_stops_the_run_before_any_suite(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\0\0\x08\x01\0\0\0\0")
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"<html>")
    long = tmp_path / ("a" * 300)  # a name longer than a file system's 255 bytes
    for args, message in (
        (
            ["--data", str(tmp_path / "none")],
            f"argument --data: '{tmp_path / 'none'}' does not hold the full MNIST: "
            "MNIST/raw/train-images-idx3-ubyte, MNIST/raw/train-labels-idx1-ubyte, "
            "MNIST/raw/t10k-images-idx3-ubyte, MNIST/raw/t10k-labels-idx1-ubyte missing",
        ),
        (
            ["--data", str(tmp_path / "mnist")],
            f"argument --data: '{tmp_path / 'mnist'}': MNIST/raw/train-images-idx3-ubyte is not "
            "an IDX image file: it starts with b'\\x00\\x00\\x08\\x01'",
        ),
        (
            ["--out", str(tmp_path / "file" / "results")],
            f"--out {tmp_path / 'file' / 'results'}: cannot write there (Not a directory)",
        ),
        # Each ended in an OSError traceback.
        (["--data", str(long)], f"argument --data: '{long}': cannot be read (File name too long)"),
        (["--out", str(long)], f"--out {long}: cannot write there (File name too long)"),
    ):
        with pytest.raises(SystemExit):
            main(["--size", "tiny", "--only", "step_cost", *args])
        err = capsys.readouterr().err
        assert message in err and "[step_cost] running" not in err


def test_a_compile_cache_folder_torch_cannot_make_stops_the_run_before_any_suite(
    tmp_path, monkeypatch, capsys
):
    """With TORCHINDUCTOR_CACHE_DIR where no folder can be made every suite failed, each in a
    traceback of torch._dynamo's import naming the folder alone."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "file" / "inductor"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--size", "tiny", "--only", "step_cost", "--out", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "[step_cost] running" not in err
    assert err.splitlines()[-1].endswith(
        f"error: torch cannot make or write its compile cache folder {tmp_path / 'file'}"
        "/inductor (Not a directory); set TORCHINDUCTOR_CACHE_DIR to a folder you can write"
    )


def test_an_empty_output_folder_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """--out "" is Path("") and wrote the results into the current folder; it is a usage error
    naming what --out takes, before any suite, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--size", "tiny", "--only", "step_cost", "--out", ""])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m raydeq.bench: error: argument --out: '' names no folder; name the folder for "
        "the results (default: benchmarks/results)"
    )
    assert not list(tmp_path.iterdir())


def test_a_remote_uri_for_a_folder_is_a_usage_error_and_a_file_uri_names_its_folder(
    tmp_path, monkeypatch, capsys
):
    """--out s3://bucket/results wrote the results into a local folder s3:/bucket/results in the
    current one, unsaid; a URI other than file: is a usage error naming it and what is taken,
    before anything is written, and a file: URI names its local folder."""
    monkeypatch.chdir(tmp_path)
    for flag in ("--out", "--data"):
        with pytest.raises(SystemExit) as exit_info:
            parse([flag, "s3://bucket/results"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"python -m raydeq.bench: error: argument {flag}: 's3://bucket/results' is a URI of "
            "remote storage; give a local folder or a file: URI"
        )
    assert not list(tmp_path.iterdir())
    assert parse(["--out", f"file://{tmp_path}/results"]).out == tmp_path / "results"


def test_a_failing_suite_is_reported_and_the_others_still_run(monkeypatch, tmp_path, capsys):
    """A suite that raises (a compiled step failing on a GPU, say) loses its own section only:
    the suites after it run, the report names the error, and the run exits with status 1."""

    def broken(ctx: Context) -> Section:
        raise RuntimeError("accessing tensor output of CUDAGraphs\nStack trace: ...")

    monkeypatch.setitem(SUITES, "train_step", broken)
    with pytest.raises(SystemExit, match="failed suites: train_step"):
        main(["--size", "tiny", "--only", "train_step", "overhead", "--out", str(tmp_path)])
    (md_path,) = tmp_path.glob("*-cpu.md")
    (json_path,) = tmp_path.glob("*-cpu.json")
    md = md_path.read_text()
    assert "- `train_step`: RuntimeError: accessing tensor output of CUDAGraphs\n" in md
    assert "Stack trace" not in md and "(`overhead`)" in md
    error = "RuntimeError: accessing tensor output of CUDAGraphs"
    assert json.loads(json_path.read_text())["failures"] == {"train_step": error}
    err = capsys.readouterr().err
    assert "Traceback" in err and f"[train_step] failed: {error}" in err
    assert "[overhead] running" in err


def test_a_report_names_the_command_and_the_commit_that_made_it(monkeypatch, tmp_path):
    """A report said its date and machine alone, neither its flags (--only, --seed, --weights,
    --threads) nor the code that ran: 15 reports in benchmarks/results name no command."""
    monkeypatch.setitem(SUITES, "overhead", lambda ctx: Section("overhead", "Overhead", ["a"]))
    report = main(["--size", "tiny", "--only", "overhead", "--seed", "3", "--out", str(tmp_path)])
    root = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    changed = subprocess.run([*git, "diff", "HEAD", "--quiet"]).returncode == 1
    expected = head.stdout.strip() + (" with uncommitted changes" if changed else "")
    assert report.commit == (expected if head.returncode == 0 else "")
    command = f"python -m raydeq.bench --size tiny --only overhead --seed 3 --out {tmp_path}"
    (md_path,) = tmp_path.glob("*-cpu.md")
    (json_path,) = tmp_path.glob("*-cpu.json")
    commit = report.commit or "unknown (the source is no git work tree)"
    assert f"\nRun as `{command}` on commit {commit}.\n" in md_path.read_text()
    assert json.loads(json_path.read_text())["command"] == command


def test_a_cpu_run_prints_no_cuda_warning(monkeypatch, tmp_path, capfd):
    """Compiling a step imports torch.utils.cpp_extension, which on a machine with a CUDA
    toolkit but no GPU warned 'No CUDA runtime is found' in a run that has no use for CUDA;
    such a run prints no CUDA warning (at that import or at a later look for CUDA)."""

    def compiling(ctx: Context) -> Section:
        from torch.utils import cpp_extension

        cpp_extension._find_cuda_home()
        return Section(name="step_cost", title="t", columns=["solver"])

    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(SUITES, "step_cost", compiling)
    main(["--size", "tiny", "--only", "step_cost", "--out", str(tmp_path)])
    err = capfd.readouterr().err
    assert "[step_cost] running" in err and "CUDA" not in err


def test_a_compiled_workload_that_fails_fails_its_own_target_only(capsys):
    """On a GPU the compiled row is timed apart: its error fails its target with the error's
    first line, and the eager rows keep their times."""

    def case():
        raise RuntimeError("accessing tensor output of CUDAGraphs\nStack trace: ...")

    size = train_step.SIZES["tiny"]
    error = train_step.measure_apart({"mnist_dense/compiled": lambda: case}, CPU, size)
    assert error == "failed: RuntimeError: accessing tensor output of CUDAGraphs"
    assert "Traceback" in capsys.readouterr().err
    section = Section(name="train_step", title="t", columns=list(train_step.COLUMNS))
    compiled = next(w for w in train_step.WORKLOADS if w.compile)
    train_step.add_row(Context(CPU, "tiny"), section, compiled, 256, error)
    (target,) = section.targets
    assert target.verdict() == "FAIL" and target.detail == error
    assert section.rows[0]["variant"] == compiled.label and "train step ms" not in section.rows[0]


def test_a_compiled_step_count_that_fails_fails_its_own_target_only(monkeypatch, capsys):
    """A CPU without a C++ compiler cannot run compile=True: each compiled row fails its target
    with the error's first line, and the eager rows are counted."""

    def broken(solver: str, *args: object) -> dict[str, float]:
        raise RuntimeError("InductorError: no C++ compiler found\nStack trace: ...")

    monkeypatch.setattr(step_cost, "compiled_step_cost", broken)
    section = step_cost.run(Context(CPU, "tiny"))
    failed = [t for t in section.targets if t.name.endswith("compile=True: syncs per step")]
    assert len(failed) == 5 and all(t.verdict() == "FAIL" for t in failed)
    assert failed[0].detail == "failed: RuntimeError: InductorError: no C++ compiler found"
    rows = {row["solver"]: row for row in section.rows}
    assert rows["euler"]["ops per step"] > 1 and rows["euler, compile=True"] == {
        "solver": "euler, compile=True"
    }
    assert "Traceback" in capsys.readouterr().err


def test_the_seed_is_any_of_those_a_training_config_takes():
    assert parse([]).seed == 0
    assert parse(["--seed", "4294967295"]).seed == 2**32 - 1


def test_the_size_is_full_unless_asked_otherwise():
    """--quick and --size write the same field: the default must survive both."""
    assert parse([]).size == "full"
    assert parse(["--quick"]).size == "quick"
    assert parse(["--size", "tiny"]).size == "tiny"


@pytest.mark.skipif(torch.cuda.device_count() > 3, reason="needs a missing CUDA device")
@pytest.mark.parametrize("device", ["cuda:3", "mps", "meta"])
def test_a_device_this_machine_lacks_stops_the_run_before_any_suite(device, tmp_path, capsys):
    """A usage error like any other bad argument: status 2, one line naming the device."""
    with pytest.raises(SystemExit) as stopped:
        main(["--size", "tiny", "--device", device, "--out", str(tmp_path)])
    assert stopped.value.code == 2
    assert f"--device {device}: not on this machine, which has cpu" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_every_suite_module_is_named_as_its_suite_and_section():
    names = [module.__name__.rpartition(".")[2] for module in MODULES]
    assert names == list(SUITES)
    for name, module in zip(names, MODULES, strict=True):
        assert SUITES[name] is module.run
        assert set(module.SIZES) == {"tiny", "quick", "full"}, name


def test_sizes_are_typed_so_a_misspelt_field_raises():
    size = Context(CPU, "tiny").pick(skip_lambda.SIZES)
    assert size.steps >= 1
    with pytest.raises(AttributeError):
        size.step  # noqa: B018
    with pytest.raises(AttributeError):
        size.steps = 3


def test_skip_lambda_runs_as_a_suite_of_the_cli(tmp_path):
    report = main(["--size", "tiny", "--only", "skip_lambda", "--out", str(tmp_path)])
    (section,) = report.sections
    assert section.name == "skip_lambda" and section.rows
    lambdas = skip_lambda.SIZES["tiny"].lambdas
    assert len(section.rows) == 2 + 2 * len(lambdas)
    for row in section.rows:
        assert 0 <= row["test accuracy"] <= 1 and row["test NFE"] >= 1
        assert row["Jacobian before"] > 0 and row["Jacobian after"] > 0


def test_train_step_runs_as_a_suite_of_the_cli(whole_run):
    report, _, _ = whole_run
    (section,) = [section for section in report.sections if section.name == "train_step"]
    dense, large = section.rows
    assert (dense["model"], large["model"]) == ("mnist_dense", "cifar10_large")
    for row in section.rows:
        assert row["batch"] == 2 and row["dtype"] == "float32"
        assert row["VJPs"] >= 1 and row["train step ms"] > 0
    # Briefly trained, the dense DEQ converges; the untrained MDEQ runs to its max_steps.
    assert dense["converged"] == 1 and dense["NFE"] < PRESETS["mnist_dense"].max_steps
    assert large["converged"] == 0 and large["NFE"] > PRESETS["cifar10_large"].max_steps
    # The note on the untrained MDEQ said its preset pretrains unrolled steps; it has none.
    (untrained,) = [note for note in section.notes if "is untrained" in note]
    assert PRESETS["cifar10_large"].pretrain_steps == 0 and "pretrain" not in untrained
    # The workloads' GPU limits, checked only on a CUDA device; there cifar10_large is bf16.
    assert [(r["GPU limit ms"], t.limit) for r, t in zip(section.rows, section.targets)] == [
        (10.0, 10.0),
        (150.0, 150.0),
    ]
    assert all(t.measured is None and t.verdict() == "n/a" for t in section.targets)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    workloads = train_step.WORKLOADS
    assert [train_step.amp_on(w, gpu) for w in workloads] == [None, None, None, torch.bfloat16]
    # The compiled dense row runs on a CPU at the sizes that time it, the graph one on a GPU
    # only, and both on every GPU.
    tiny, quick = train_step.SIZES["tiny"], train_step.SIZES["quick"]
    assert [train_step.runs_on(w, cpu, tiny) for w in workloads] == [True, False, False, True]
    assert [train_step.runs_on(w, cpu, quick) for w in workloads] == [True, True, False, True]
    assert all(train_step.runs_on(w, gpu, tiny) for w in workloads)


def test_a_second_run_of_the_day_writes_beside_the_first_instead_of_over_it(tmp_path):
    first = Report(date="2026-12-03", device="cpu", size="tiny", machine={})
    stem = output_stem(first, tmp_path)
    assert stem == tmp_path / "2026-12-03-cpu"
    write(first, stem)
    kept = (tmp_path / "2026-12-03-cpu.json").read_text()
    second = Report(date="2026-12-03", device="cpu", size="quick", machine={})
    assert output_stem(second, tmp_path) == tmp_path / "2026-12-03-cpu-2"
    write(second, tmp_path / "2026-12-03-cpu-2")
    assert (tmp_path / "2026-12-03-cpu.json").read_text() == kept
    assert json.loads((tmp_path / "2026-12-03-cpu-2.json").read_text())["size"] == "quick"
    assert output_stem(second, tmp_path) == tmp_path / "2026-12-03-cpu-3"


def test_two_runs_started_together_on_one_day_write_apart(tmp_path):
    """Each run takes its name before its first suite ends: a run started beside another (on
    another GPU of the machine, say) must not take the same name and overwrite its results."""
    first = Report(date="2026-12-03", device="cuda", size="tiny", machine={"gpu": "0"})
    second = Report(date="2026-12-03", device="cuda", size="tiny", machine={"gpu": "1"})
    stems = [output_stem(first, tmp_path), output_stem(second, tmp_path)]
    assert stems == [tmp_path / "2026-12-03-cuda", tmp_path / "2026-12-03-cuda-2"]
    for report, stem in zip((first, second), stems, strict=True):
        write(report, stem)
    for gpu, stem in zip("01", stems, strict=True):
        assert json.loads(stem.with_suffix(".json").read_text())["machine"] == {"gpu": gpu}


def test_a_report_read_while_a_suite_rewrites_it_is_the_old_or_the_new_one_whole(tmp_path):
    """The report is rewritten after each suite while another process may read it (a script
    watching the run): each read is a whole report, never a file emptied or cut short."""
    report = Report(date="2026-12-03", device="cpu", size="tiny", machine={"cpu": "x" * 400_000})
    stem = output_stem(report, tmp_path)
    write(report, stem)
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json, sys, time\n"
            "end, cut, reads = time.monotonic() + 1.5, 0, 0\n"
            "while time.monotonic() < end:\n"
            "    for name in sys.argv[1:]:\n"
            "        text, reads = open(name).read(), reads + 1\n"
            "        cut += not text.endswith(('}', '|\\n'))\n"
            "print(cut, reads)",
            str(stem.with_suffix(".json")),
            str(stem.with_suffix(".md")),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    while reader.poll() is None:
        write(report, stem)
    cut, reads = map(int, reader.communicate()[0].split())
    assert reads > 0 and cut == 0


def test_a_report_rewrite_on_a_full_disk_leaves_the_last_report_whole_and_nothing_beside_it(
    monkeypatch, request, tmp_path
):
    """A rewrite whose write fails half way (a full disk) raises, and the folder holds the
    report as the last suite left it, with no partial file beside it."""
    report = Report(date="2026-12-03", device="cpu", size="tiny", machine={"cpu": "x"})
    stem = output_stem(report, tmp_path)
    write(report, stem)
    before = {p.name: p.read_text() for p in stem.parent.iterdir()}
    request.getfixturevalue("full_disk")
    with pytest.raises(StorageError, match="could not be written: No space left on device$"):
        write(Report(date="2026-12-03", device="cpu", size="tiny", machine={"cpu": "y"}), stem)
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in stem.parent.iterdir()} == before


def test_a_run_interrupted_in_its_first_suite_leaves_a_report_without_sections(
    monkeypatch, tmp_path
):
    def interrupted(ctx: Context) -> Section:
        raise KeyboardInterrupt

    monkeypatch.setitem(SUITES, "skip", interrupted)
    with pytest.raises(SystemExit):
        main(["--size", "tiny", "--only", "skip", "--out", str(tmp_path)])
    (json_path,) = tmp_path.glob("*-cpu.json")
    assert json.loads(json_path.read_text())["sections"] == []
    assert (tmp_path / f"{json_path.stem}.md").read_text().startswith("# raydeq benchmarks")


@pytest.mark.parametrize("suffix", [".json", ".md"])
def test_a_result_of_one_kind_alone_still_keeps_its_name_from_the_next_run(tmp_path, suffix):
    """A run stopped between its two writes, or a result whose twin was deleted, leaves one
    file: the next run of the day writes -2 rather than over it."""
    (tmp_path / f"2026-12-03-cpu{suffix}").write_text("kept")
    report = Report(date="2026-12-03", device="cpu", size="tiny", machine={})
    assert output_stem(report, tmp_path) == tmp_path / "2026-12-03-cpu-2"


def test_an_adjoint_comparison_where_no_adjoint_reaches_the_error_reports_it_instead_of_raising(
    monkeypatch,
):
    """Neither GMRES nor Neumann reaching the gradient error leaves nothing to time: the
    section says so in its notes and its target fails, as GMRES missed, and timing no cases
    times nothing."""
    assert measure({}, CPU, repeats=3) == {}
    monkeypatch.setattr(gradients, "loosest", lambda *args, **kwargs: (None, None))
    section = adjoints.run(Context(CPU, "tiny"))
    assert section.rows == [] and section.timings == {}
    assert [note.split(" did not")[0] for note in section.notes[1:]] == ["GMRES", "Neumann"]
    (target,) = section.targets
    assert target.verdict() == "FAIL" and target.detail == "GMRES not reached"


def test_every_target_has_its_limit_bound_its_way(run):
    """Each target's limit and whether it is a floor (the Neural ODE at least so many times
    slower than the DEQ) or a ceiling (everything else)."""
    data, _ = run
    upper, lower = False, True
    expected = {
        ("node", "mnist_dense: Neural ODE (adjoint) / DEQ training step time"): (3.0, lower),
        ("node", "mnist_dense: Neural ODE (adjoint) / DEQ backward time"): (8.0, lower),
        ("node", "mnist_dense: Neural ODE (backprop) / DEQ training step time"): (3.0, lower),
        ("node", "mnist_dense: Neural ODE (backprop) / DEQ backward time"): (8.0, lower),
        ("skip", "skip_reg test NFE / vanilla test NFE after training"): (1 / 3, upper),
        ("discrete", "broyden: NFE / fixed-point NFE at the same residual"): (0.5, upper),
        ("discrete", "anderson: NFE / fixed-point NFE at the same residual"): (0.5, upper),
        ("overhead", "fixed_point: time per NFE / bare f call"): (1.5, upper),
        ("overhead", "anderson: time per NFE / bare f call"): (2.5, upper),
        ("overhead", "broyden: time per NFE / bare f call"): (2.5, upper),
        ("adjoints", "GMRES VJPs / Neumann VJPs at error 0.0001"): (0.5, upper),
        ("step_cost", "gmres: syncs per Arnoldi step"): (0.25, upper),
    }
    step_cost_rows = {r["solver"]: r for r in rows_by_name(data, "step_cost")}
    for label, row in step_cost_rows.items():
        if label != "gmres (backward)":
            expected["step_cost", f"{label}: syncs per step"] = (0.25, upper)
        solver = label.split(",")[0]
        if "ops per step" in row and solver in ("vcab3", "euler"):
            expected["step_cost", f"{label}: ops per step"] = (
                40.0 if solver == "vcab3" else 30.0,
                upper,
            )
    got = {
        (s["name"], t["name"]): (t["limit"], t["at_least"])
        for s in data["sections"]
        for t in s["targets"]
        if s["name"] not in ("torchdeq", "torchdiffeq", "train_step")
    }
    assert got == expected
    assert len(step_cost_rows) == 1 + 7 + 5  # every solver, the capturable ones compiled, GMRES
    for name in ("torchdeq", "torchdiffeq"):
        section = next(s for s in data["sections"] if s["name"] == name)
        assert [t["at_least"] for t in section["targets"]] == [False, False]
    torchdeq_limits = next(s for s in data["sections"] if s["name"] == "torchdeq")["targets"]
    assert [t["limit"] for t in torchdeq_limits] == [0.5, 0.3]


def rows_by_name(data: dict, name: str) -> list[dict]:
    """The rows of the run's section `name`."""
    return next(s for s in data["sections"] if s["name"] == name)["rows"]


def test_each_rows_ratios_and_times_are_those_its_own_rows_and_raw_times_give(run):
    """Every row's ratio column is its own count over its reference row's, and every time
    column is 1000 x the median of the raw seconds written beside it (per call or per NFE
    where the column says so); the memory rows sweep the batch, then the tolerance."""
    data, _ = run
    sections = {s["name"]: s for s in data["sections"]}
    discrete = sections["discrete"]
    for problem in ("spectral", "mnist_dense"):
        rows = rows_by(discrete, "solver", problem=problem)
        for solver, row in rows.items():
            assert row["NFE / fixed point"] == pytest.approx(
                row["NFE"] / rows["fixed_point"]["NFE"]
            )
            seconds = discrete["timings"][f"{problem}/{solver}"]
            assert row["time ms"] == pytest.approx(1e3 * statistics.median(seconds))
    overhead, calls = sections["overhead"], overhead_suite.SIZES["tiny"].calls
    for solver, row in rows_by(overhead, "solver").items():
        solve_ms = 1e3 * statistics.median(overhead["timings"][solver])
        assert row["solve ms"] == pytest.approx(solve_ms)
        assert row["ms per NFE"] == pytest.approx(solve_ms / row["NFE"])
        bare = 1e3 * statistics.median(overhead["timings"]["f"]) / calls
        assert row["bare f ms"] == pytest.approx(bare)
    skip_rows = rows_by(sections["skip"], "variant")
    for variant, row in skip_rows.items():
        assert row["NFE / vanilla"] == pytest.approx(
            row["test NFE"] / skip_rows["vanilla"]["test NFE"]
        )
        seconds = sections["skip"]["timings"][f"predict/{variant}"]
        assert row["predict ms"] == pytest.approx(1e3 * statistics.median(seconds))
    node_section = sections["node"]
    variant_of = {layer: variant for variant, layer in node.VARIANTS.items()}
    for row in node_section["rows"]:
        for part, column in (
            ("train", "train step ms"),
            ("backward", "backward ms"),
            ("predict", "predict ms"),
        ):
            seconds = node_section["timings"][f"mnist_dense/{variant_of[row['layer']]}/{part}"]
            assert row[column] == pytest.approx(1e3 * statistics.median(seconds))
    adjoint_key = {"GMRES": "gmres", "Neumann": "fixed_point"}
    for row in sections["adjoints"]["rows"]:
        seconds = sections["adjoints"]["timings"][adjoint_key[row["adjoint"]]]
        assert row["backward ms"] == pytest.approx(1e3 * statistics.median(seconds))
    memory_rows = [(r["batch"], r["abstol"]) for r in sections["memory"]["rows"]]
    assert memory_rows == [(2, 1e-4), (4, 1e-4), (2, 1e-2), (2, 1e-3)]


def fake_measure(seconds: dict[str, list[float]], values: dict[str, object]):
    """A stand-in for measure: the given seconds and value of each case it is handed."""

    def measure_cases(
        cases: dict, device: torch.device, repeats: int = 1, warmup: int = 1, label: str = ""
    ):
        return {name: Timing(list(seconds[name]), values[name]) for name in cases}

    return measure_cases


def test_the_node_targets_divide_the_neural_ode_by_the_fastest_deq_round_by_round():
    """Hand-made rounds: BS3 is the fastest DEQ's training step, VCAB3 its backward; each
    target is the median over rounds of Neural ODE time / that DEQ's, a floor of 3 or 8."""
    seconds = {
        "vcab3/train": [2.0, 2.0, 2.0],
        "bs3/train": [1.0, 1.0, 4.0],
        "euler/train": [3.0, 3.0, 3.0],
        "adjoint/train": [4.0, 6.0, 8.0],  # over bs3: 4, 6, 2
        "backprop/train": [3.0, 3.0, 3.0],  # over bs3: 3, 3, 0.75
        "vcab3/backward": [1.0, 1.0, 1.0],
        "bs3/backward": [2.0, 2.0, 2.0],
        "euler/backward": [5.0, 5.0, 5.0],
        "adjoint/backward": [8.0, 9.0, 10.0],
        "backprop/backward": [2.0, 2.0, 20.0],
    }
    timings = {name: Timing(s) for name, s in seconds.items()}
    section = Section("node", "t", ["model"])
    node.add_targets(section, "mnist_dense", timings, node.DEQ_SOLVERS)
    got = [
        (t.name, t.measured, t.limit, t.at_least, t.detail, t.verdict()) for t in section.targets
    ]
    head = "mnist_dense: Neural ODE"
    assert got == [
        (f"{head} (adjoint) / DEQ training step time", 4.0, 3.0, True, "DEQ with BS3", "PASS"),
        (f"{head} (adjoint) / DEQ backward time", 9.0, 8.0, True, "DEQ with VCAB3", "PASS"),
        (f"{head} (backprop) / DEQ training step time", 3.0, 3.0, True, "DEQ with BS3", "PASS"),
        (f"{head} (backprop) / DEQ backward time", 2.0, 8.0, True, "DEQ with VCAB3", "FAIL"),
    ]


def layer_stats(nfe: int, unconverged: float, nvjp: int, flags: list[bool]) -> SimpleNamespace:
    """A stand-in for a layer output: only the stats the node rows read."""
    stats = SimpleNamespace(
        nfe=nfe,
        unconverged_fraction=unconverged,
        backward_nvjp=nvjp,
        backward_unconverged_fraction=1 - sum(flags) / len(flags),
    )
    return SimpleNamespace(stats=stats)


def test_a_node_row_reads_nfe_and_convergence_from_training_and_vjps_from_the_backward():
    """converged is 1 - the unconverged fraction; VJPs converged is the backward's fraction
    for a DEQ and blank for a Neural ODE; each time is 1000 x its own part's median."""
    timings = {}
    for variant, nfe in (("vcab3", 30), ("adjoint", 50)):
        train = layer_stats(nfe, 0.25, 0, [True] * 4)
        backward = layer_stats(nfe + 1, 0.5, 7, [True, False, False, True])
        for part, seconds, value in (
            ("train", [0.004, 0.002, 0.003], train),
            ("backward", [0.001, 0.001, 0.005], backward),
            ("predict", [0.0005, 0.0007, 0.0006], None),
        ):
            timings[f"{variant}/{part}"] = Timing(seconds, value)
    section = Section("node", "t", node.COLUMNS)
    node.add_rows(section, "mnist_dense", 8, timings)
    deq, ode = section.rows
    assert deq["layer"] == node.VARIANTS["vcab3"] and ode["layer"] == node.VARIANTS["adjoint"]
    assert (deq["NFE"], deq["converged"], deq["VJPs"], deq["VJPs converged"]) == (30, 0.75, 7, 0.5)
    assert (ode["NFE"], ode["converged"], ode["VJPs"], ode["VJPs converged"]) == (50, 0.75, 7, None)
    assert deq["train step ms"] == pytest.approx(3.0) and deq["backward ms"] == pytest.approx(1.0)
    assert deq["predict ms"] == pytest.approx(0.6)


def test_a_prediction_case_times_the_model_in_eval_mode_and_a_step_case_in_train_mode(
    monkeypatch,
):
    """A prediction is timed in eval mode whatever mode the model was left in, a training step
    in train mode with its optimizer and under the case's autocast dtype."""
    model = models.build("mnist_dense", "vanilla", CPU, 0)
    images = torch.zeros(2, 1, 28, 28)
    model.train()
    models.predict_case(model, images)()
    assert not model.training
    steps = []
    monkeypatch.setattr(training, "adam", lambda net, lr: ("adam", lr))
    monkeypatch.setattr(training, "train_step", lambda *args: steps.append((model.training, args)))
    labels = torch.zeros(2, dtype=torch.long)
    objective = Objective(0.0)
    training.step_case(model, objective, images, labels, torch.bfloat16)()()
    assert steps == [(True, (model, objective, ("adam", 0.0), images, labels, torch.bfloat16))]


def test_every_variant_of_the_node_benchmark_carries_the_deqs_parameters():
    """Each DEQ and Neural ODE the suite times has the parameters of the DEQ it is handed,
    not those of its own seed."""
    ctx = Context(CPU, "tiny", ("mnist_dense",))
    deq = node.build_deq(ctx, "mnist_dense", "vcab3")
    with torch.no_grad():
        for parameter in deq.parameters():
            parameter.add_(0.5)
    nets = node.layers(ctx, "mnist_dense", deq)
    assert set(nets) == set(node.DEQ_SOLVERS) | {node.NEUMANN} | set(node.NODE_LAYERS)
    for variant, net in nets.items():
        pairs = list(zip(deq.parameters(), net.parameters(), strict=True))
        assert all(torch.equal(a, b) for a, b in pairs), variant


def test_spread_over_four_repeats_is_their_interquartile_range_over_their_median():
    # Exclusive quartiles of 1, 2, 3, 4: 1.25 and 3.75; median 2.5.
    assert Timing(seconds=[3.0, 1.0, 4.0, 2.0]).spread == pytest.approx(2.5 / 2.5)


def test_a_timed_call_waits_for_the_device_before_each_clock_reading(monkeypatch):
    """The clock starts after the queued work is done and stops after the call's is."""
    events: list[str] = []
    clock = iter([10.0, 12.5])

    def read_clock() -> float:
        events.append("clock")
        return next(clock)

    monkeypatch.setattr(timing, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(timing.time, "perf_counter", read_clock)
    seconds, value = time_call(lambda: events.append("call") or 7, CPU)
    assert (seconds, value) == (2.5, 7)
    assert events == ["sync", "clock", "call", "sync", "clock"]


@pytest.mark.parametrize(("device", "waits"), [("cpu", []), ("mps", ["mps"]), ("xpu:1", ["xpu:1"])])
def test_a_timed_call_waits_for_any_accelerator_the_run_accepts(device, waits, monkeypatch):
    """check_device admits the machine's accelerator whatever its kind; its queued work is
    waited for as CUDA's is, else the clock would time the launches only."""
    waited: list[str] = []
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda d: waited.append(str(d)))
    timing.synchronize(torch.device(device))
    assert waited == waits


def test_a_cases_true_residual_and_gradient_error_are_computed_after_its_clock_stops(monkeypatch):
    """The residual of a forward case costs an evaluation of f that its NFE does not count, and
    the error of a backward case is bookkeeping: both come after the clock's second reading."""
    events: list[str] = []
    clock = iter([1.0, 3.0, 10.0, 14.0])

    def read_clock() -> float:
        events.append("clock")
        return next(clock)

    monkeypatch.setattr(timing.time, "perf_counter", read_clock)
    problem = SpectralProblem(Spectrum(dim=6, batch=2), CPU, torch.float64)
    residual = problem.residual
    monkeypatch.setattr(problem, "residual", lambda z: events.append("residual") or residual(z))
    seconds, outcome = time_call(forward_case(problem, lambda f, z0: f(z0))(), CPU)
    assert seconds == 2.0 and events == ["clock", "clock", "residual"]
    # f(0) = x: one evaluation, and the residual is that of x.
    assert outcome.nfe == 1
    assert outcome.residual == pytest.approx(float(residual(problem.x).max()))

    events.clear()
    problem.weight.requires_grad_(True)
    problem.x.requires_grad_(True)
    cotangent = torch.ones(2, 6, dtype=torch.float64)
    leaves = [problem.weight, problem.x]

    def forward() -> torch.Tensor:  # a VJP through each application
        return problem.f(problem.f(problem.z0()))

    exact = torch.autograd.grad((cotangent * forward()).sum(), leaves)

    def error(grads, reference) -> float:
        events.append("error")
        return gradient_error(grads, reference)

    monkeypatch.setattr(cases, "gradient_error", error)
    seconds, outcome = time_call(backward_case(problem, forward, cotangent, exact)(), CPU)
    assert seconds == 4.0 and events == ["clock", "clock", "error"]
    assert (outcome.nvjp, outcome.error) == (2, 0.0)


def test_a_markdown_table_has_a_rule_per_column_and_cells_in_column_order():
    lines = table(["solver", "NFE", "time ms"], [{"solver": "euler", "NFE": 12}, {"time ms": 0.5}])
    assert lines == [
        "| solver | NFE | time ms |",
        "| --- | --- | --- |",
        "| euler | 12 |  |",
        "|  |  | 0.5 |",
    ]


def test_a_test_accuracy_cell_keeps_the_steps_of_two_thousand_test_digits():
    """The skip suites' accuracies over 2,000 test digits move in steps of 0.0005: to three
    digits Skip Reg.'s 0.9225 read 0.922, vanilla's own, and 0.9255 read 0.925."""
    accuracies = {"vanilla": 0.922, "skip_reg": 0.9225, "skip": 0.9255}
    rows = [{"variant": v, "test accuracy": a, "test NFE": 11.65625} for v, a in accuracies.items()]
    lines = table(["variant", "test accuracy", "test NFE"], rows)
    assert lines[2:] == [
        "| vanilla | 0.922 | 11.7 |",
        "| skip_reg | 0.9225 | 11.7 |",
        "| skip | 0.9255 | 11.7 |",
    ]
    assert "test accuracy" in skip.COLUMNS


def test_a_forward_case_reports_the_worst_samples_true_residual_and_its_evaluations():
    """Two applications of f from 0, checked against the residual computed by numpy."""
    problem = SpectralProblem(Spectrum(dim=6, batch=3, input_scale=1.0), CPU, torch.float64)
    outcome = time_call(forward_case(problem, lambda f, z0: f(f(z0)))(), CPU)[1]
    w, x = problem.weight.numpy(), problem.x.numpy()
    z = np.tanh(x) @ w.T + x  # f(0) = x
    rms = np.sqrt(((np.tanh(z) @ w.T + x - z) ** 2).mean(axis=1))
    assert rms.max() - rms.mean() > 0.01  # the samples differ
    assert (outcome.nfe, outcome.nvjp) == (2, 0)
    assert outcome.residual == pytest.approx(rms.max(), rel=1e-12)


def test_the_loosest_tolerance_is_the_first_on_target_and_the_search_stops_after_three_stalls():
    def scripted(errors: list[float]):
        """An evaluate that returns the errors in turn, and the tolerances it was asked."""
        asked: list[float] = []

        def evaluate(tol: float) -> Outcome:
            asked.append(tol)
            return Outcome(error=errors[len(asked) - 1])

        return evaluate, asked

    tols = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6]
    evaluate, asked = scripted([3e-3, 1e-4, 1e-6, 1e-7, 1e-8])
    tol, outcome = loosest(tols, evaluate, 1e-4)
    assert (tol, outcome.error, asked) == (1e-3, 1e-4, [1e-2, 1e-3])
    for errors in ([1.0, 2.0, 2.0, 2.0, 1e-5], [1.0, 1.0, 1.0, 1.0, 1e-5]):
        evaluate, asked = scripted(errors)
        assert loosest(tols, evaluate, 1e-4) == (None, None)
        assert asked == tols[:4]


def test_peak_memory_counts_a_storage_once_whatever_writes_into_it_or_views_it():
    def allocate() -> torch.Tensor:
        kept = torch.ones(1024, 256)  # 1 MiB
        kept.add_(1.0).mul_(2.0)
        return kept.view(-1)

    peak, kept = peak_memory(allocate, CPU)
    assert peak == 2**20 and float(kept[0]) == 4.0


def test_peak_memory_leaves_out_tensors_made_before_that_the_call_views_or_writes_into():
    """A 1 MiB weight made before: its transpose and an in-place write allocate nothing, and a
    product with it allocates only its 4 x 1024 float32 result (16 KiB)."""
    weight, x = torch.ones(1024, 256), torch.ones(4, 256)
    assert peak_memory(lambda: weight.T, CPU)[0] == 0
    assert peak_memory(lambda: weight.mul_(1.0), CPU)[0] == 0
    assert peak_memory(lambda: x @ weight.T, CPU)[0] == 4 * 1024 * 4


def test_peak_memory_on_a_gpu_is_the_allocators_peak_above_what_was_allocated_before(monkeypatch):
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 5 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 12 * 2**20)
    peak, value = peak_memory(lambda: events.append("call") or "v", torch.device("cuda"))
    assert (peak, value) == (7 * 2**20, "v")
    assert events == ["sync", "reset", "call", "sync"]


def test_the_op_counter_counts_each_host_read_as_one_sync():
    t = torch.ones(3)
    with step_cost.OpCounter() as counter:
        t.sum().item()
        bool(t.sum() > 0)
        int(t[0])
    assert counter.syncs == 3
    assert (counter.ops["sum"], counter.ops["gt"], counter.ops["select"]) == (2, 1, 1)


def test_step_cost_divides_every_operation_and_sync_of_the_solve_by_its_steps(monkeypatch):
    """A stand-in solve of 4 steps and 7 evaluations that dispatches 10 additions, 2 sums
    and 2 host reads: 14 operations and 2 syncs, per step 3.5 and 0.5."""
    stats = SimpleNamespace(steps=4, nfe=7, converged=torch.tensor([True, True]))

    def solve(f, z0: torch.Tensor, **options: object) -> SimpleNamespace:
        z = z0
        for _ in range(10):
            z = z + 1
        for _ in range(2):
            float(z.sum())
        return SimpleNamespace(stats=stats)

    monkeypatch.setattr(step_cost.raydeq, "solve", solve)
    cost = step_cost.step_cost("euler", 2, 4)
    assert cost == {"steps": 4, "nfe": 7, "ops": 3.5, "syncs": 0.5, "converged": True}


def test_gmres_step_cost_divides_by_the_products_with_the_operator(monkeypatch):
    """A stand-in GMRES of 6 products that reads the host 3 times: 0.5 syncs per product."""
    info = SimpleNamespace(matvecs=6, converged=torch.tensor([True]))

    class ThreeReads:
        def __init__(self, rtol: float, check_every: int) -> None:
            pass

        def __call__(self, operator, b: torch.Tensor, x0: torch.Tensor):
            for _ in range(3):
                float(b.sum())
            return x0, info

    monkeypatch.setattr(step_cost, "GMRES", ThreeReads)
    cost = step_cost.arnoldi_step_cost(2, 4)
    assert cost == {"steps": 6, "ops": 1.0, "syncs": 0.5, "converged": True}


def test_a_profiler_event_is_a_launch_unless_an_operation_or_kernel_encloses_it():
    def event(name: str, parent: object = None) -> SimpleNamespace:
        """A profiler event with its name and enclosing event."""
        return SimpleNamespace(name=name, cpu_parent=parent)

    root = event("## solve ##")
    mm = event("aten::mm", root)
    inside_mm = event("aten::empty", mm)
    kernel = event("graph_0_cpp_fused_tanh_0", event("python frame", root))
    inside_kernel = event("aten::empty_strided", kernel)
    launches = [step_cost.outermost(e) for e in (mm, inside_mm, kernel, inside_kernel)]
    assert launches == [True, False, True, False]
    assert [step_cost.is_launch(e.name) for e in (root, mm, kernel)] == [False, True, True]


def test_torchdiffeqs_settings_in_hindsight_are_the_fewest_evaluations_that_meet_the_tolerance(
    monkeypatch,
):
    """Scripted outcomes by atol: the loosest misses the tolerance, then 0.1 x TOL takes the
    fewest evaluations among those that meet it (0.01 x TOL fewer still, but misses it)."""
    tol = torchdiffeq_suite.TOL
    nfe = {1.0: 10, 0.3: 50, 0.1: 40, 0.03: 45, 0.01: 30, 3e-3: 60, 1e-3: 70}
    missed = {1.0, 0.01}

    def outcome_of(atol: float) -> Outcome:
        """The scripted outcome of a run at this atol."""
        factor = min(nfe, key=lambda f: abs(f * tol - atol))
        return Outcome(nfe=nfe[factor], residual=2 * tol if factor in missed else tol / 2)

    def case(problem: SpectralProblem, atol: float):
        return lambda: lambda: outcome_of(atol)

    monkeypatch.setattr(torchdiffeq_suite, "forward_case", case)
    monkeypatch.setattr(torchdiffeq_suite, "event_run", lambda problem, atol: atol)
    monkeypatch.setattr(torchdiffeq_suite, "fixed_time_run", lambda p, m, atol, t1: atol)
    monkeypatch.setattr(torchdiffeq_suite, "first_steady_time", lambda p, m, atol, h, g: 1 / atol)
    problem = SpectralProblem(Spectrum(dim=4, batch=2), CPU)
    assert torchdiffeq_suite.best_event_atol(problem) == pytest.approx(0.1 * tol)
    atol, t1 = torchdiffeq_suite.best_fixed_time(problem, "dopri5", 100.0, 10)
    assert atol == pytest.approx(0.1 * tol) and t1 == pytest.approx(1 / (0.1 * tol))


def test_torchdiffeqs_settings_in_hindsight_say_each_atol_tried_after_5_s(monkeypatch, capsys):
    """Choosing adaptive_heun's atol took 10 s at --quick on 2 busy cores, a part said only as
    it began; an atol tried 5 s or more after the line before is a line on stderr."""
    monkeypatch.setattr(torchdiffeq_suite, "ATOL_FACTORS", (1.0, 0.1))
    monkeypatch.setattr(torchdiffeq_suite, "event_run", lambda problem, atol: atol)
    monkeypatch.setattr(torchdiffeq_suite, "fixed_time_run", lambda p, m, atol, t1: atol)
    monkeypatch.setattr(torchdiffeq_suite, "first_steady_time", lambda p, m, atol, h, g: 1.0)
    outcome = Outcome(nfe=10, residual=0.0)
    monkeypatch.setattr(torchdiffeq_suite, "forward_case", lambda p, run: lambda: lambda: outcome)
    problem = SpectralProblem(Spectrum(dim=4, batch=2), CPU)
    ticking(monkeypatch, 10.0)
    torchdiffeq_suite.best_event_atol(problem)
    torchdiffeq_suite.best_fixed_time(problem, "adaptive_heun", 100.0, 10)
    said = "[torchdiffeq] trying"
    assert capsys.readouterr().err.splitlines() == [
        f"{said} dopri5 odeint_event's atols: 0/2",
        f"{said} dopri5 odeint_event's atols: 1/2, eta 20s",
        f"{said} adaptive_heun odeint's atols: 0/2",
        f"{said} adaptive_heun odeint's atols: 1/2, eta 20s",
    ]


def test_discrete_rows_divide_by_fixed_point_and_a_residual_over_the_tolerance_fails(
    monkeypatch,
):
    """Hand-made outcomes: Anderson on the tolerance is measured, Broyden at twice it fails;
    the model rows report the worst sample's residual."""
    tol = discrete.TOL
    nfe = {"fixed_point": 100, "anderson": 20, "broyden": 10, "vcab3": 50, "tsit5": 40, "euler": 80}
    residual = dict.fromkeys(nfe, tol / 2) | {"anderson": tol, "broyden": 2 * tol}
    seconds = {name: [0.003, 0.001, 0.002] for name in nfe}
    values = {name: Outcome(nfe[name], 0, residual[name]) for name in nfe}
    monkeypatch.setattr(discrete, "measure", fake_measure(seconds, values))
    columns = ["problem", "solver", "NFE", "NFE / fixed point", "time ms", "max residual"]
    section = Section("discrete", "t", columns)
    discrete.spectral_rows(Context(CPU, "tiny"), discrete.SIZES["tiny"], section)
    for row in section.rows:
        assert row["NFE / fixed point"] == pytest.approx(nfe[row["solver"]] / 100)
        assert row["time ms"] == pytest.approx(2.0)
    broyden, anderson = section.targets
    assert broyden.verdict() == "FAIL" and (anderson.measured, anderson.verdict()) == (0.2, "PASS")
    stats = {
        name: SimpleNamespace(stats=SimpleNamespace(nfe=n, residual=torch.tensor([1e-6, 4e-6])))
        for name, n in nfe.items()
    }
    monkeypatch.setattr(discrete, "measure", fake_measure(seconds, stats))
    section = Section("discrete", "t", columns)
    discrete.model_rows(Context(CPU, "tiny"), discrete.SIZES["tiny"], section)
    for row in section.rows:
        assert row["NFE / fixed point"] == pytest.approx(nfe[row["solver"]] / 100)
        assert row["max residual"] == pytest.approx(4e-6)


def test_a_fixed_point_stopped_short_of_the_tolerance_gives_no_nfe_ratio(monkeypatch):
    """Hand-made outcomes: the fixed point stops at its budget of 3000 with 100 x TOL left,
    so Anderson's and Broyden's 20 and 10 NFE are at no residual it reached: n/a, not 1/150
    and 1/300 as PASS."""
    tol = discrete.TOL
    nfe = {"fixed_point": 3000, "anderson": 20, "broyden": 10, "vcab3": 50, "tsit5": 4, "euler": 8}
    residual = dict.fromkeys(nfe, tol / 2) | {"fixed_point": 100 * tol}
    seconds = {name: [0.001] for name in nfe}
    values = {name: Outcome(nfe[name], 0, residual[name]) for name in nfe}
    monkeypatch.setattr(discrete, "measure", fake_measure(seconds, values))
    columns = ["problem", "solver", "NFE", "NFE / fixed point", "time ms", "max residual"]
    section = Section("discrete", "t", columns)
    discrete.spectral_rows(Context(CPU, "tiny"), discrete.SIZES["tiny"], section)
    assert [t.verdict() for t in section.targets] == ["n/a", "n/a"]
    assert all("fixed point's 1.00e-03" in t.detail for t in section.targets)


def test_a_residual_within_the_rounding_slack_of_the_tolerance_meets_it(monkeypatch):
    """Hand-made outcomes: the fixed point and Anderson end 5e-5 x TOL over it, within the
    1e-4 slack for rounding of the residual: both reached it, Anderson's ratio is measured."""
    tol = discrete.TOL
    nfe = {"fixed_point": 100, "anderson": 20, "broyden": 10, "vcab3": 50, "tsit5": 4, "euler": 8}
    residual = dict.fromkeys(nfe, tol / 2) | dict.fromkeys(
        ("fixed_point", "anderson"), tol * 1.00005
    )
    values = {name: Outcome(nfe[name], 0, residual[name]) for name in nfe}
    monkeypatch.setattr(discrete, "measure", fake_measure(dict.fromkeys(nfe, [0.001]), values))
    columns = ["problem", "solver", "NFE", "NFE / fixed point", "time ms", "max residual"]
    section = Section("discrete", "t", columns)
    discrete.spectral_rows(Context(CPU, "tiny"), discrete.SIZES["tiny"], section)
    assert [(t.measured, t.verdict()) for t in section.targets] == [(0.1, "PASS"), (0.2, "PASS")]


def scripted_measure(outcome_of):
    """A stand-in for measure: one round of 1 ms per case, its value outcome_of(the case's name)."""

    def measure_cases(
        cases: dict, device: torch.device, repeats: int = 1, warmup: int = 1, label: str = ""
    ):
        return {name: Timing([1e-3], outcome_of(name)) for name in cases}

    return measure_cases


@pytest.mark.parametrize(("raydeq_reaches", "verdicts"), [(False, "FAIL FAIL"), (True, "PASS n/a")])
def test_torchdiffeq_targets_fail_where_raydeq_misses_the_tolerance_and_not_where_a_peer_does(
    monkeypatch, raydeq_reaches, verdicts
):
    """Scripted outcomes, odeint_event meeting the tolerance at no atol: with no raydeq solve
    meeting it both targets fail (they read n/a, as a target not measured, and said 'TOL not met
    by torchdiffeq' where both missed); with raydeq meeting it the odeint target is measured
    and the odeint_event one is n/a."""
    tol = torchdiffeq_suite.TOL
    peer = "torchdiffeq dopri5 odeint"
    monkeypatch.setattr(
        torchdiffeq_suite, "peer_cases", lambda p, h, g: ({peer: None}, {peer: (tol, 1.0)})
    )

    def outcome_of(label: str) -> Outcome:
        if label == peer:
            return Outcome(nfe=100, residual=tol / 2)
        return Outcome(nfe=10, residual=tol / 2 if raydeq_reaches else 2 * tol)

    monkeypatch.setattr(torchdiffeq_suite, "measure", scripted_measure(outcome_of))
    odeint, event = torchdiffeq_suite.run(Context(CPU, "tiny")).targets
    assert " ".join(t.verdict() for t in (odeint, event)) == verdicts
    if raydeq_reaches:
        assert odeint.measured == pytest.approx(0.1) and event.measured is None
        assert odeint.detail == "raydeq bs3: 10 vs 100 NFE"
        assert event.detail == "TOL not met by torchdiffeq"
    else:
        assert odeint.measured == event.measured == math.inf
        assert odeint.detail == event.detail == "TOL not met by any raydeq solver"


def test_torchdeq_targets_fail_where_raydeq_misses_and_read_n_a_where_torchdeq_does(monkeypatch):
    """Scripted outcomes: raydeq's forwards miss the residual and its GMRES reaches the gradient
    error at no tolerance, so both targets fail (they read n/a); with TorchDEQ missing instead,
    both read n/a, naming TorchDEQ."""
    tol = torchdeq.TOL
    spec = torchdeq.SIZES["tiny"]
    monkeypatch.setattr(torchdeq, "torchdeq_implicit", lambda *args, **options: None)
    for loser in ("raydeq", "torchdeq"):

        def outcome_of(label: str, loser: str = loser) -> Outcome:
            library = label.split(" ")[0]
            return Outcome(nfe=10, nvjp=5, residual=2 * tol if library == loser else tol / 2)

        def chosen(self, makers: dict, device: torch.device, suite: str, loser: str = loser):
            return {label: 1e-4 for label in makers if not label.startswith(loser)}

        monkeypatch.setattr(torchdeq, "measure", scripted_measure(outcome_of))
        monkeypatch.setattr(GradientSetup, "tolerances", chosen)
        columns = ["library", "part", "method", "tol", "NFE", "VJPs", "time ms", "max residual"]
        section = Section("torchdeq", "raydeq vs TorchDEQ", [*columns, "gradient error"])
        torchdeq.forward_rows(Context(CPU, "tiny"), spec.forward, 1, section)
        torchdeq.backward_rows(Context(CPU, "tiny"), spec.backward, 1, section)
        forward, backward = section.targets
        if loser == "raydeq":
            assert (forward.verdict(), backward.verdict()) == ("FAIL", "FAIL")
            assert forward.measured == backward.measured == math.inf
            assert forward.detail == f"no raydeq solver met the residual {tol:g}"
            assert backward.detail == "raydeq GMRES reached no tolerance"
        else:
            assert (forward.measured, backward.measured) == (None, None)
            assert forward.detail == f"no TorchDEQ solver met the residual {tol:g}"
            assert backward.detail == "TorchDEQ reached no tolerance"


def test_torchdeq_targets_divide_raydeqs_fastest_case_by_torchdeqs(monkeypatch):
    """Hand-made times, every case meeting the residual and the gradient error: the forward
    target is raydeq's Anderson over TorchDEQ's Anderson at lam 1e-12 (2 / 4 ms) and the
    backward one GMRES over TorchDEQ's Anderson at lam 1e-4 (4 / 10 ms), over its limit of 0.3."""
    tol = torchdeq.TOL
    spec = torchdeq.SIZES["tiny"]
    forward_ms = {
        "raydeq fixed_point": 5,
        "raydeq anderson": 2,
        "raydeq broyden": 3,
        "torchdeq fixed_point_iter": 9,
        "torchdeq anderson lam=0.0001": 6,
        "torchdeq anderson lam=1e-08": 8,
        "torchdeq anderson lam=1e-12": 4,
        "torchdeq broyden": 7,
    }
    backward_ms = {
        "raydeq gmres": 4,
        "torchdeq fixed_point_iter": 20,
        "torchdeq anderson lam=0.0001": 10,
        "torchdeq anderson lam=1e-08": 12,
        "torchdeq anderson lam=1e-12": 30,
        "torchdeq broyden": 15,
    }
    monkeypatch.setattr(torchdeq, "torchdeq_forward", lambda *args, **options: None)
    monkeypatch.setattr(torchdeq, "torchdeq_implicit", lambda *args, **options: None)
    monkeypatch.setattr(
        GradientSetup, "tolerances", lambda self, makers, device, suite: dict.fromkeys(makers, 1e-4)
    )
    columns = ["library", "part", "method", "tol", "NFE", "VJPs", "time ms", "max residual"]
    section = Section("torchdeq", "raydeq vs TorchDEQ", [*columns, "gradient error"])
    parts = (
        (torchdeq.forward_rows, spec.forward, forward_ms),
        (torchdeq.backward_rows, spec.backward, backward_ms),
    )
    for rows, spectrum, ms in parts:
        seconds = {label: [1e-3 * t] for label, t in ms.items()}
        values = dict.fromkeys(ms, Outcome(nfe=10, nvjp=5, residual=tol / 2))
        monkeypatch.setattr(torchdeq, "measure", fake_measure(seconds, values))
        rows(Context(CPU, "tiny"), spectrum, 1, section)
    forward, backward = section.targets
    assert (forward.measured, forward.verdict()) == (pytest.approx(0.5), "PASS")
    assert forward.detail == "raydeq anderson vs torchdeq anderson lam=1e-12"
    assert (backward.measured, backward.verdict()) == (pytest.approx(0.4), "FAIL")
    assert backward.detail == "vs torchdeq anderson lam=0.0001"


def test_the_adjoint_target_fails_where_gmres_misses_the_error_and_not_where_neumann_does(
    monkeypatch,
):
    """Scripted searches: GMRES reaching the gradient error at no tolerance fails the target
    (it read n/a, 'not reached'), Neumann reaching it at none leaves it n/a."""
    monkeypatch.setattr(adjoints, "measure", scripted_measure(lambda label: Outcome(nvjp=7)))
    for missing, verdict, detail in (("gmres", "FAIL", "GMRES"), ("fixed_point", "n/a", "Neumann")):

        def chosen(self, makers: dict, device: torch.device, suite: str, missing: str = missing):
            return {label: 1e-4 for label in makers if label != missing}

        monkeypatch.setattr(GradientSetup, "tolerances", chosen)
        (target,) = adjoints.run(Context(CPU, "tiny")).targets
        assert (target.verdict(), target.detail) == (verdict, f"{detail} not reached")


def test_overhead_rows_are_time_per_evaluation_over_a_bare_call_paired_within_rounds(monkeypatch):
    """Hand-made rounds: every solve takes 5, 5, 5 and 10 times the 5 bare calls of its
    round, so its time per NFE is 25 / NFE bare calls; its spread is its own."""
    nfe = {"fixed_point": 50, "anderson": 10, "broyden": 5, "vcab3": 25, "euler": 100}
    solve = [0.05, 0.10, 0.15, 0.40]
    seconds = {"f": [0.01, 0.02, 0.03, 0.04]} | dict.fromkeys(nfe, solve)
    values = {"f": None} | {name: Outcome(n) for name, n in nfe.items()}
    monkeypatch.setattr(overhead_suite, "measure", fake_measure(seconds, values))
    section = overhead_suite.run(Context(CPU, "tiny"))
    assert overhead_suite.SIZES["tiny"].calls == 5
    for row in section.rows:
        n = nfe[row["solver"]]
        assert row["ratio"] == pytest.approx(25 / n)
        assert row["solve ms"] == pytest.approx(125.0)
        assert row["ms per NFE"] == pytest.approx(125.0 / n)
        assert row["bare f ms"] == pytest.approx(5.0)
        # Exclusive quartiles 0.0625 and 0.3375 over the median 0.125.
        assert row["spread"] == pytest.approx(2.2)
    got = [(t.name.split(":")[0], t.measured, t.verdict()) for t in section.targets]
    assert got == [
        ("fixed_point", 0.5, "PASS"),
        ("anderson", 2.5, "PASS"),
        ("broyden", 5.0, "FAIL"),
    ]


def test_skip_rows_take_the_median_training_step_and_skip_regs_nfe_over_vanillas():
    results = {
        "vanilla": {"test_nfe": 24.0, "test_accuracy": 0.5},
        "skip": {"test_nfe": 12.0, "test_accuracy": 0.6},
        "skip_reg": {"test_nfe": 6.0, "test_accuracy": 0.7},
    }
    step_times = {v: [0.001, 0.009, 0.002] for v in results}
    timings = {v: Timing([0.004, 0.001, 0.003 * (i + 1)]) for i, v in enumerate(results)}
    section = Section("skip", "t", skip.COLUMNS)
    skip.add_results(section, results, step_times, timings)
    rows = {row["variant"]: row for row in section.rows}
    assert [rows[v]["NFE / vanilla"] for v in skip.VARIANTS] == [1.0, 0.5, 0.25]
    assert all(row["train ms per batch"] == pytest.approx(2.0) for row in section.rows)
    assert [rows[v]["predict ms"] for v in skip.VARIANTS] == pytest.approx([3.0, 4.0, 4.0])
    (target,) = section.targets
    assert (target.measured, target.limit, target.verdict()) == (0.25, 1 / 3, "PASS")


def test_adjoint_rows_take_the_median_backward_and_divide_gmres_vjps_by_neumanns(monkeypatch):
    values = {"gmres": Outcome(nvjp=12, error=5e-5), "fixed_point": Outcome(nvjp=40, error=8e-5)}
    seconds = {"gmres": [0.004, 0.001, 0.002], "fixed_point": [0.010, 0.030, 0.020]}
    monkeypatch.setattr(gradients, "loosest", lambda *args, **kwargs: (1e-3, None))
    monkeypatch.setattr(adjoints, "measure", fake_measure(seconds, values))
    section = adjoints.run(Context(CPU, "tiny"))
    rows = {row["adjoint"]: row for row in section.rows}
    assert rows["GMRES"]["backward ms"] == pytest.approx(2.0)
    assert rows["Neumann"]["backward ms"] == pytest.approx(20.0)
    assert (rows["GMRES"]["VJPs"], rows["Neumann"]["VJPs"]) == (12, 40)
    assert rows["GMRES"]["rtol"] == rows["Neumann"]["rtol"] == 1e-3
    (target,) = section.targets
    assert (target.measured, target.detail, target.verdict()) == (0.3, "12 vs 40 VJPs", "PASS")


META = torch.device("meta")


class MetaWithoutFloat64(TorchDispatchMode):
    """The meta device standing in for MPS: a float64 tensor made there raises MPS's TypeError."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and (tensor.device, tensor.dtype) == (
                META,
                torch.float64,
            ):
                raise TypeError("Cannot convert a MPS Tensor to float64 dtype")
        return out


def test_a_problem_on_a_device_without_float64_takes_its_exact_references_from_the_cpu():
    """MPS has no float64: a float32 problem there has the exact fixed point, spectral radius
    and gradient of the same problem on the CPU, none of them made in float64 on the device."""
    spec = Spectrum(dim=8, batch=3, slow_eig=0.8)
    cotangent = torch.linspace(-1, 1, 24).reshape(3, 8)
    on_cpu = SpectralProblem(spec, CPU)
    with MetaWithoutFloat64():
        on_device = SpectralProblem(spec, META)
        z = on_device.exact_fixed_point()
        radius = on_device.spectral_radius()
        exact = on_device.exact_gradient(cotangent)
    assert (z.device, z.dtype, z.shape) == (META, torch.float32, (3, 8))
    assert radius == on_cpu.spectral_radius()
    assert 0.75 < radius < 0.8
    for got, want in zip(exact, on_cpu.exact_gradient(cotangent), strict=True):
        assert (got.device, got.dtype) == (CPU, torch.float64)
        assert torch.equal(got, want)


def test_the_gradient_comparisons_on_a_device_without_float64_say_they_are_skipped_and_why():
    """adjoints and TorchDEQ's backward run in float64: on MPS each says it is skipped, naming
    the device and what to run instead, where they raised a TypeError."""
    ctx = Context(META, "tiny")
    backward = Section("torchdeq", "raydeq vs TorchDEQ", [])
    with MetaWithoutFloat64():
        ours = adjoints.run(ctx)
        torchdeq.backward_rows(ctx, torchdeq.SIZES["tiny"].backward, 1, backward)
    for section in (ours, backward):
        (target,) = section.targets
        assert (section.rows, target.verdict()) == ([], "n/a")
        assert "skipped on meta: it has no float64" in target.detail
        assert target.detail.endswith("run them with --device cpu")
        assert target.detail in section.notes[-1]


def test_torchdeqs_fixed_point_iteration_stops_at_the_same_residual_as_raydeqs(run):
    """Both iterate the same f from 0 and stop at the first iterate whose worst per-sample RMS
    residual meets the tolerance (TorchDEQ's 2-norm at tol x sqrt(width)): the same NFE."""
    data, _ = run
    section = next(s for s in data["sections"] if s["name"] == "torchdeq")
    if not torchdeq.available():
        pytest.skip("TorchDEQ is not installed")
    forward = {(r["library"], r["method"]): r for r in section["rows"] if r["part"] == "forward"}
    theirs, ours = forward["torchdeq", "fixed_point_iter"], forward["raydeq", "fixed_point"]
    assert theirs["NFE"] == ours["NFE"]
    assert theirs["max residual"] <= torchdeq.TOL


def test_an_accelerator_index_past_the_last_device_stops_the_run(monkeypatch):
    """With two GPUs, cuda:0 and cuda:1 run, cuda:2 exits naming the devices there are."""
    monkeypatch.setattr(
        torch.accelerator, "current_accelerator", lambda check_available: torch.device("cuda")
    )
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)
    for device in ("cpu", "cuda", "cuda:0", "cuda:1"):
        check_device(torch.device(device))
    with pytest.raises(ValueError, match="--device cuda:2: not on this machine, which has cpu "):
        check_device(torch.device("cuda:2"))
    with pytest.raises(ValueError, match="and cuda:0 to cuda:1$"):
        check_device(torch.device("cuda:2"))


def test_a_device_past_the_only_gpu_is_refused_naming_that_gpu_alone(monkeypatch):
    """With one GPU the message names cuda:0, where it said 'cuda:0 to cuda:0'."""
    monkeypatch.setattr(
        torch.accelerator, "current_accelerator", lambda check_available: torch.device("cuda")
    )
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    check_device(torch.device("cuda:0"))
    with pytest.raises(ValueError) as refused:
        check_device(torch.device("cuda:1"))
    assert str(refused.value) == "--device cuda:1: not on this machine, which has cpu and cuda:0"


def run_interrupted_in_node(monkeypatch: pytest.MonkeyPatch, out: Path, *only: str) -> None:
    """Run the suites `only` into `out`, skip finishing and node stopped by Ctrl-C, and check
    that the run exits with status 130."""

    def finished(ctx: Context) -> Section:
        return Section("skip", "Finished first", ["a"], rows=[{"a": 1}])

    def interrupted(ctx: Context) -> Section:
        raise KeyboardInterrupt

    monkeypatch.setitem(SUITES, "skip", finished)
    monkeypatch.setitem(SUITES, "node", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["--size", "tiny", "--only", *only, "--out", str(out)])
    assert exit_info.value.code == 130


def test_an_interrupted_run_keeps_the_suites_that_finished_before_it(monkeypatch, tmp_path, capsys):
    """The report is rewritten after every suite: an interrupt in the second leaves the first's
    section on disk, where the message says it is."""
    run_interrupted_in_node(monkeypatch, tmp_path, "skip", "node")
    (md_path,) = tmp_path.glob("*-cpu.md")
    assert "## Finished first (`skip`)" in md_path.read_text()
    assert f"interrupted in [node]; the finished suites are in {md_path}" in capsys.readouterr().err


def test_mnist_pixels_are_scaled_to_one_then_standardised_by_the_training_mean_and_std(
    monkeypatch,
):
    pixels = torch.tensor([[[0, 255, 51]]], dtype=torch.uint8)
    monkeypatch.setattr(models, "mnist10k", lambda train: (pixels, torch.tensor([3])))
    images, labels = models.mnist(None, train=False)
    # (0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081, (0.2 - 0.1307) / 0.3081
    expected = torch.tensor([[[[-0.424213, 2.821487, 0.224927]]]])
    assert images.shape == (1, 1, 1, 3) and labels.tolist() == [3]
    assert torch.allclose(images, expected, atol=1e-6)


def test_a_preset_built_from_one_seed_has_the_same_parameters_every_time():
    """Every solver of a suite compares on the same f: the seed alone fixes the parameters."""
    torch.manual_seed(123)
    first = models.build("mnist_dense", "vanilla", CPU, seed=4, solver="euler")
    torch.manual_seed(456)
    again = models.build("mnist_dense", "vanilla", CPU, seed=4, solver="anderson")
    other = models.build("mnist_dense", "vanilla", CPU, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters()))


def test_a_training_step_takes_the_gradient_of_its_own_batch_only():
    """Two steps at learning rate 0 leave the gradient of one loss, as autograd gives it."""
    model = models.build("mnist_dense", "vanilla", CPU, seed=0, max_steps=4)
    images = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1])
    objective = models.preset_objective("mnist_dense")
    model.train()
    loss, _ = training.loss_of(model, objective, images, labels)
    reference = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    optimizer = training.adam(model, 0.0)
    for _ in range(2):
        training.train_step(model, objective, optimizer, images, labels)
    for parameter, expected in zip(model.parameters(), reference, strict=True):
        if expected is not None:
            assert torch.allclose(parameter.grad, expected, rtol=1e-4, atol=1e-7)


def test_fitting_takes_adam_at_1e_3_over_batches_that_cover_each_epoch_once(monkeypatch):
    """8 samples in batches of 4: each pair of steps is one epoch, every sample once."""
    rates: list[float] = []
    batches: list[list[int]] = []

    def adam(model: torch.nn.Module, lr: float) -> None:
        rates.append(lr)

    def step(model, objective, optimizer, images: torch.Tensor, labels: torch.Tensor) -> None:
        batches.append(images.flatten().tolist())

    monkeypatch.setattr(training, "adam", adam)
    monkeypatch.setattr(training, "train_step", step)
    data = (torch.arange(8.0), torch.arange(8))
    training.fit(torch.nn.Linear(1, 1), Objective(0.0), data, steps=6, batch=4, seed=0)
    assert rates == [1e-3] and len(batches) == 6
    for epoch in range(3):
        assert sorted(batches[2 * epoch] + batches[2 * epoch + 1]) == list(range(8))


def test_the_cifar10_large_training_step_times_the_weights_given_for_it():
    """--weights cifar10_large=... times that checkpoint's model in train_step as in node,
    instead of the untrained one whose forward stops at max_steps."""
    large = next(w for w in train_step.WORKLOADS if w.model == "cifar10_large")
    ctx = Context(CPU, "tiny", ("cifar10_large",))
    model, weights = train_step.timed_model(ctx, large, False, {})
    assert weights == "untrained weights"
    trained = models.build("cifar10_large", "vanilla", CPU, seed=1)
    with torch.no_grad():
        next(trained.head.parameters()).mul_(2.0)
    checkpoint = Checkpoint(Path("ckpt"), trained.state_dict())
    ctx = Context(CPU, "tiny", ("cifar10_large",), weights={"cifar10_large": checkpoint})
    model, weights = train_step.timed_model(ctx, large, False, {})
    assert weights == "weights of the checkpoint ckpt"
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in checkpoint.weights.items() if k in own)
    assert torch.equal(next(model.head.parameters()), next(trained.head.parameters()))


def test_a_train_step_row_takes_the_median_step_and_the_backwards_vjps(capsys):
    stats = SimpleNamespace(nfe=40, unconverged_fraction=0.25, backward_nvjp=9)
    timing_of_step = Timing([0.012, 0.008, 0.004], SimpleNamespace(stats=stats))
    section = Section(name="train_step", title="t", columns=list(train_step.COLUMNS))
    dense = train_step.WORKLOADS[0]
    train_step.add_row(Context(CPU, "tiny"), section, dense, 256, timing_of_step)
    (row,) = section.rows
    assert (row["NFE"], row["converged"], row["VJPs"]) == (40, 0.75, 9)
    assert row["train step ms"] == pytest.approx(8.0)


def test_the_steady_time_is_the_first_grid_time_at_which_every_sample_meets_the_tolerance(
    monkeypatch,
):
    """A path at z0 for two grid points, then at z*: the third point's time, horizon x 2/4."""
    problem = SpectralProblem(Spectrum(dim=6, batch=3), CPU, torch.float64)
    start, steady = problem.z0(), problem.exact_fixed_point()
    assert float(problem.residual(start).max()) > torchdiffeq_suite.TOL

    def odeint(field, z0: torch.Tensor, t: torch.Tensor, **options: object) -> torch.Tensor:
        return torch.stack([start, start, steady, steady, steady])

    monkeypatch.setattr(torchdiffeq_suite, "odeint", odeint)
    assert torchdiffeq_suite.first_steady_time(problem, "dopri5", 1e-5, 8.0, 5) == 4.0
    monkeypatch.setattr(torchdiffeq_suite, "odeint", lambda f, z0, t, **o: start.expand(5, -1, -1))
    assert torchdiffeq_suite.first_steady_time(problem, "dopri5", 1e-5, 8.0, 5) == math.inf


def test_the_fastest_torchdeq_comparison_case_is_by_median_among_those_meeting_the_tolerance():
    tol = torchdeq.TOL
    timings = {
        "raydeq fixed_point": Timing([0.001, 0.009, 0.008], Outcome(residual=tol)),
        "raydeq anderson": Timing([0.005, 0.004, 0.006], Outcome(residual=tol * 1.01)),
        "raydeq broyden": Timing([0.001, 0.001, 0.001], Outcome(residual=tol * 1.02)),
        "torchdeq anderson": Timing([0.002, 0.002, 0.002], Outcome(residual=tol / 2)),
    }
    assert torchdeq.best(timings, "raydeq", tol) == "raydeq anderson"
    assert torchdeq.best(timings, "torchdeq", tol) == "torchdeq anderson"
    assert torchdeq.best(timings, "raydeq", tol / 10) is None


def test_a_compiled_step_count_counts_the_outermost_launches_and_every_host_read(monkeypatch):
    """Profiler events of a stand-in second solve of 2 steps: a matrix product, a fused kernel
    and an item (each a launch, what they call not), and two host reads (one inside item)."""

    def event(name: str, parent: object = None) -> SimpleNamespace:
        """A profiler event with its name and enclosing event."""
        return SimpleNamespace(name=name, cpu_parent=parent)

    item = event("aten::item")
    kernel = event("graph_0_cpp_fused_tanh_0")
    events = [
        event("aten::mm"),
        kernel,
        event("aten::empty", kernel),
        item,
        event("aten::_local_scalar_dense", item),
        event("aten::_local_scalar_dense"),
    ]

    class Profile:
        def __init__(self, activities: object) -> None:
            pass

        def __enter__(self) -> "Profile":
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def events(self) -> list[SimpleNamespace]:
            return events

    stats = SimpleNamespace(steps=2, nfe=3, converged=torch.tensor([True]))
    monkeypatch.setattr(step_cost, "profile", Profile)
    monkeypatch.setattr(step_cost.raydeq, "solve", lambda *a, **k: SimpleNamespace(stats=stats))
    cost = step_cost.compiled_step_cost("euler", 2, 4)
    # Launches: mm, the kernel, item, the read outside item: 4 over 2 steps; reads: 2.
    assert cost == {"steps": 2, "nfe": 3, "ops": 2.0, "syncs": 1.0, "converged": True}


def test_a_size_profile_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="size='huge' is not one of 'tiny', 'quick', 'full'"):
        Context(CPU, "huge")


def test_the_skip_loss_sweep_trains_vanilla_then_the_jacobian_loss_then_each_weight():
    config = skip_lambda.Config
    assert skip_lambda.configs((0.1, 1.0)) == [
        config("vanilla", 0.0, 0.0),
        config("vanilla", 0.0, 1.0),
        config("skip_reg", 0.1, 0.0),
        config("skip_reg", 1.0, 0.0),
        config("skip", 0.1, 0.0),
        config("skip", 1.0, 0.0),
    ]


def test_the_jacobian_norm_is_the_mean_over_test_batches_and_is_measured_again_after_training(
    monkeypatch,
):
    """Stand-in estimates 1, 2 and 6 over three batches give 3; a row's after-training value
    is measured on the trained model (here: its head scaled by 2 by a stand-in training)."""
    estimates = iter([1.0, 2.0, 6.0])
    monkeypatch.setattr(
        skip_lambda, "hutchinson_jacobian_loss", lambda f, z: torch.tensor(next(estimates))
    )
    model = models.build("mnist_dense", "vanilla", CPU, seed=0, max_steps=2)
    batches = [(torch.zeros(1, 1, 28, 28), torch.tensor([0]))] * 3
    assert skip_lambda.jacobian_norm(model, batches) == pytest.approx(3.0)

    def fit(model: torch.nn.Module, *args: object) -> None:
        with torch.no_grad():
            model.head.weight.mul_(2.0)

    def head_sum(model: torch.nn.Module, batches: list) -> float:
        return float(model.head.weight.detach().sum())

    monkeypatch.setattr(skip_lambda, "fit", fit)
    monkeypatch.setattr(skip_lambda, "jacobian_norm", head_sum)
    monkeypatch.setattr(training, "adam", lambda model, lr: None)
    monkeypatch.setattr(training, "train_step", lambda *args: None)
    monkeypatch.setattr(skip_lambda, "jacobian_norm", lambda model, batches: 0.0)
    columns = ["variant", "lambda_skip", "lambda_jac", "test NFE", "test accuracy"]
    columns += ["Jacobian before", "Jacobian after", "train s"]
    section = Section("skip_lambda", "t", columns)
    train = (torch.zeros(2, 1, 28, 28), torch.tensor([0, 1]))
    skip_lambda.add_row(
        Context(CPU, "tiny"), section, skip_lambda.Config("vanilla"), train, batches[:1]
    )
    (row,) = section.rows
    assert row["Jacobian after"] == pytest.approx(2 * row["Jacobian before"])


def test_each_search_of_a_gradient_tolerance_is_said_as_it_begins(monkeypatch, capsys):
    """torchdeq searched the tolerance of each backward for 174 s at --quick on 2 busy cores
    between its forward timing's last round and its backward timing's first without a line;
    each search now says what it is on stderr as it begins."""
    found = iter([(None, None), (1e-3, None)])
    monkeypatch.setattr(gradients, "loosest", lambda tols, error_at, target: next(found))
    setup = GradientSetup(problem=None, cotangent=None, reference=None)
    makers = {"Neumann": lambda tol: None, "GMRES": lambda tol: None}
    assert setup.tolerances(makers, CPU, "adjoints") == {"GMRES": 1e-3}
    said = "[adjoints] choosing {}'s tolerance for gradient error 0.0001 ({}/2)"
    assert capsys.readouterr() == ("", f"{said.format('Neumann', 1)}\n{said.format('GMRES', 2)}\n")


def test_a_search_of_a_gradient_tolerance_says_each_tolerance_tried_after_5_s(monkeypatch, capsys):
    """A search tries up to 11 tolerances, each a backward at the suite's size: torchdeq's took
    1.7 s at --quick on 2 busy cores, and 32 times the work a product at the full size, said
    only as it began; a tolerance tried 5 s or more after the line before is a line on stderr,
    without a time left, as the search may stop sooner."""

    def three_tried(tols, error_at, target):
        """Try the three loosest tolerances, reaching the target at none."""
        list(itertools.islice(tols, 3))
        return None, None

    monkeypatch.setattr(gradients, "loosest", three_tried)
    setup = GradientSetup(problem=None, cotangent=None, reference=None)
    ticking(monkeypatch, 10.0)
    assert setup.tolerances({"GMRES": lambda tol: None}, CPU, "adjoints") == {}
    said = "[adjoints] choosing GMRES's tolerance for gradient error 0.0001"
    assert capsys.readouterr().err.splitlines() == [
        f"{said} (1/1)",
        f"{said}: 0/11",
        f"{said}: 1/11",
        f"{said}: 2/11",
    ]


def test_gradient_tolerances_are_tried_loosest_first():
    assert list(TOLERANCES) == sorted(TOLERANCES, reverse=True)


def test_the_bare_f_case_calls_f_as_often_as_the_ratio_divides_by(monkeypatch):
    problems: list[SpectralProblem] = []
    calls: list[int] = []

    class Recorded(SpectralProblem):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)
            problems.append(self)

    def measure_bare(cases: dict, device: torch.device, repeats: int = 1, label: str = "") -> dict:
        (problem,) = problems
        problem.counter.reset()
        cases["f"]()()
        calls.append(problem.counter.nfe)
        return {name: Timing([1.0], Outcome(nfe=1)) for name in cases}

    monkeypatch.setattr(overhead_suite, "SpectralProblem", Recorded)
    monkeypatch.setattr(overhead_suite, "measure", measure_bare)
    overhead_suite.run(Context(CPU, "tiny"))
    assert calls == [overhead_suite.SIZES["tiny"].calls]


def test_a_memory_step_computes_the_implicit_gradient_of_w_and_x():
    """The step measured is forward and backward: after it W and x hold the gradient of
    sum(z*^2), which dense solves give exactly."""
    problem = SpectralProblem(Spectrum(dim=8, batch=2, slow_eig=0.8), CPU, torch.float64)
    exact = problem.exact_gradient(2 * problem.exact_fixed_point())
    problem.weight.requires_grad_(True)
    problem.x.requires_grad_(True)
    assert memory_suite.step(problem, "gmres", 1e-10) > 1
    assert gradient_error((problem.weight.grad, problem.x.grad), exact) < 1e-5


def test_a_workload_timed_apart_runs_its_warm_up_rounds_untimed_first(capsys):
    """Each round is said on stderr: the compiled step's, timed apart, were not (17 s after
    the eager timing's last round at --quick on 2 busy cores, its first call compiling)."""
    calls: list[int] = []

    def case():
        return lambda: calls.append(len(calls))

    size = train_step.TrainStepSize(batches={}, repeats=1, warmup=2)
    timed = train_step.measure_apart({"mnist_dense/compiled": case}, CPU, size)
    assert len(calls) == 2 + 1 and len(timed.seconds) == 1
    said = "[train_step] timing mnist_dense/compiled: round"
    assert capsys.readouterr().err.splitlines() == [f"{said} {n}/3" for n in (1, 2, 3)]


def test_the_implicit_backward_runs_at_the_tolerance_it_is_given():
    """GMRES at rtol 1e-2 takes fewer products and leaves a larger gradient error than at
    1e-8, with the same tight forward solve."""
    spectrum = Spectrum(dim=16, batch=2, slow_eig=0.9)
    setup = GradientSetup.make(Context(CPU, "tiny"), spectrum)
    outcomes = {}
    for tol in (1e-2, 1e-8):
        forward = raydeq_implicit(setup.problem, "gmres", tol, 1e-10, 200)
        case = backward_case(setup.problem, forward, setup.cotangent, setup.reference)
        outcomes[tol] = time_call(case(), CPU)[1]
    loose, tight = outcomes[1e-2], outcomes[1e-8]
    assert loose.nvjp < tight.nvjp
    assert tight.error < 1e-6 < loose.error


def test_the_graph_variants_of_the_node_benchmark_run_on_cuda_only():
    assert node.deq_variants(torch.device("mps")) == node.DEQ_SOLVERS
    assert node.deq_variants(torch.device("meta")) == node.DEQ_SOLVERS


def test_each_step_cost_target_is_its_rows_count_per_step(run):
    data, _ = run
    section = next(s for s in data["sections"] if s["name"] == "step_cost")
    rows = {row["solver"]: row for row in section["rows"]}
    rows["gmres"] = rows["gmres (backward)"]
    for target in section["targets"]:
        label, _, what = target["name"].partition(": ")
        column = "ops per step" if what == "ops per step" else "syncs per step"
        if target["detail"].startswith("failed"):  # inf, which the strict JSON writes null
            assert target["measured"] is None and target["passed"] is False
        else:
            assert target["measured"] == rows[label][column], target["name"]


def test_the_step_cost_layer_is_tanh_of_a_gaussian_w_scaled_by_0_9_over_root_width():
    """W read back through f from unit vectors: its entries' mean square is 0.81 / width."""
    dim = 128
    f, z0 = step_cost.dense_layer(1, dim)
    assert torch.equal(z0, torch.zeros(1, dim))
    x = torch.atanh(f(z0).double())
    w_transposed = torch.atanh(f(torch.eye(dim)).double()) - x
    assert float(w_transposed.pow(2).mean()) * dim == pytest.approx(0.81, rel=0.05)


def test_the_markdown_lists_every_note_of_a_section_under_its_table():
    section = Section("s", "S", ["a"], rows=[{"a": 1}], notes=["first note", "second note"])
    report = Report(date="2026-12-03", device="cpu", size="tiny", machine={}, sections=[section])
    assert report.to_markdown().endswith("| a |\n| --- |\n| 1 |\n\n- first note\n- second note\n")


def test_torchdeqs_implicit_backward_stops_on_the_2_norm_at_the_tolerance_times_sqrt_width(
    monkeypatch,
):
    """TorchDEQ's tolerances are on the 2-norm, raydeq's on the RMS: both scaled by sqrt(16)."""
    seen: dict[str, object] = {}

    def get_deq(**options: object) -> SimpleNamespace:
        seen.update(options)
        return SimpleNamespace(train=lambda: None)

    monkeypatch.setitem(sys.modules, "torchdeq", SimpleNamespace(get_deq=get_deq))
    problem = SpectralProblem(Spectrum(dim=16, batch=2), CPU)
    torchdeq.torchdeq_implicit(problem, "broyden", 1e-5, 30)
    assert seen["b_tol"] == pytest.approx(4e-5, rel=1e-12)
    assert seen["f_tol"] == pytest.approx(4 * torchdeq.FORWARD_TOL, rel=1e-12)
    assert (seen["b_solver"], seen["b_max_iter"], seen["ift"]) == ("broyden", 30, True)


def test_torchdeqs_backward_starts_from_a_forward_that_meets_the_forward_tolerance(
    one_thread: None,
):
    """TorchDEQ's untimed forward (Anderson, whose lam of 1e-4 is added to G G^T as it is)
    stopped at its 1,000 iterations with a worst RMS residual of 2.7e-8 at the quick size, 27
    times raydeq's FORWARD_TOL, so its gradient errors were measured from another z*."""
    pytest.importorskip("torchdeq")
    problem = SpectralProblem(torchdeq.SIZES["quick"].backward, CPU, torch.float64)
    z = torchdeq.torchdeq_implicit(problem, "broyden", 1e-5, 200)().detach()
    assert float(problem.residual(z).max()) <= torchdeq.FORWARD_TOL


def test_torchdeqs_anderson_runs_at_each_regularisation_so_that_the_targets_take_its_fastest(
    one_thread: None,
):
    """TorchDEQ adds its Anderson lam to G G^T as it is (raydeq scales its own by the mean of
    the diagonal): at its default 1e-4, which outweighs G G^T near the tolerance, its forward
    ran out of its 200 iterations at --quick and its backward reached the gradient error at no
    tolerance, so the targets compared raydeq with TorchDEQ's Broyden alone (0.36 and 0.24, both
    met), where against its Anderson at lam 1e-12 they read 0.88 and 0.57. Each lam has a row."""
    pytest.importorskip("torchdeq")
    from torchdeq.solver.anderson import anderson_solver

    spec = torchdeq.SIZES["tiny"].forward
    columns = ["library", "part", "method", "NFE", "time ms", "max residual"]
    section = Section("torchdeq", "raydeq vs TorchDEQ", columns)
    torchdeq.forward_rows(Context(CPU, "tiny"), spec, 1, section)
    rows = {r["method"]: r for r in section.rows if r["library"] == "torchdeq"}
    problem = SpectralProblem(spec, CPU)
    for lam in torchdeq.ANDERSON_LAMS:
        problem.counter.reset()
        tol = torchdeq.TOL * spec.dim**0.5
        options = {"m": torchdeq.MEMORY, "lam": lam}
        anderson_solver(problem.f, problem.z0(), max_iter=200, tol=tol, stop_mode="abs", **options)
        assert rows[f"anderson lam={lam:g}"]["NFE"] == problem.counter.nfe
    assert rows["anderson lam=1e-12"]["NFE"] * 4 <= rows["anderson lam=0.0001"]["NFE"]
    assert rows["anderson lam=1e-12"]["max residual"] <= torchdeq.TOL
    setup = GradientSetup.make(Context(CPU, "tiny"), torchdeq.SIZES["tiny"].backward)
    default, small = (
        time_call(
            setup.case(torchdeq.torchdeq_implicit(setup.problem, "anderson", 1e-4, 200, lam=lam))(),
            CPU,
        )[1]
        for lam in (1e-4, 1e-12)
    )
    assert small.nvjp * 4 <= default.nvjp
    assert small.error <= gradients.TARGET_ERROR


def test_ctrl_c_before_any_suite_starts_exits_130_in_one_line(monkeypatch, tmp_path, capsys):
    """Ctrl-C while the machine is described, before the first suite, ends in one line and
    status 130, not Python's traceback."""

    def interrupted(device: torch.device) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_main, "machine_info", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["--size", "tiny", "--only", "skip", "--out", str(tmp_path)])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "interrupted before any suite started"
    assert "Traceback" not in err


def test_ctrl_c_while_the_report_is_rewritten_keeps_the_suite_that_finished(
    monkeypatch, tmp_path, capsys
):
    """Ctrl-C while the report is rewritten after a suite (its JSON written, its Markdown not
    yet) ends in one line and status 130, not Python's traceback, with that suite in both
    files and nothing half-written beside them."""
    sent = []

    def finished(ctx: Context) -> Section:
        return Section("skip", "Finished first", ["a"], rows=[{"a": 1}])

    def interrupted_once(path: str, payload: bytes) -> None:
        if path.endswith(".md") and b"Finished first" in payload and not sent:
            sent.append(path)
            os.kill(os.getpid(), signal.SIGINT)
        storage.write_bytes(path, payload)

    monkeypatch.setitem(SUITES, "skip", finished)
    monkeypatch.setattr(report_module, "write_bytes", interrupted_once)
    with pytest.raises(SystemExit) as exit_info:
        main(["--size", "tiny", "--only", "skip", "node", "--out", str(tmp_path)])
    assert exit_info.value.code == 130
    (md_path,) = tmp_path.glob("*-cpu.md")
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"interrupted in [skip]; the finished suites are in {md_path}"
    assert "Traceback" not in err
    assert "## Finished first (`skip`)" in md_path.read_text()
    assert json.loads(md_path.with_suffix(".json").read_text())["sections"][0]["name"] == "skip"
    assert sorted(p.name for p in tmp_path.iterdir()) == [md_path.stem + ".json", md_path.name]


def test_sigterm_ends_a_run_as_ctrl_c_does_keeping_the_suites_that_finished(
    monkeypatch, tmp_path, capsys
):
    """A batch scheduler's time limit sends SIGTERM: the run ends as on Ctrl-C, in one line
    naming the report that holds the finished suites and status 130, where SIGTERM's default
    killed it without a word (and a rewrite it cut left its partial file beside the report)."""

    def finished(ctx: Context) -> Section:
        return Section("skip", "Finished first", ["a"], rows=[{"a": 1}])

    def terminated(ctx: Context) -> Section:
        os.kill(os.getpid(), signal.SIGTERM)
        return Section("node", "Never", ["a"])

    def killed(signum: int, frame: object) -> None:
        pytest.fail("SIGTERM killed the run")

    monkeypatch.setitem(SUITES, "skip", finished)
    monkeypatch.setitem(SUITES, "node", terminated)
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["--size", "tiny", "--only", "skip", "node", "--out", str(tmp_path)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 130
    (md_path,) = tmp_path.glob("*-cpu.md")
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"interrupted in [node]; the finished suites are in {md_path}"
    assert "## Finished first (`skip`)" in md_path.read_text()


def test_sigterm_landing_in_a_weakref_callback_still_ends_the_run_as_ctrl_c_does(
    monkeypatch, tmp_path, capsys
):
    """SIGTERM handled while a weakref callback runs raised KeyboardInterrupt there, where
    Python drops it ('Exception ignored in'): `timeout` did not stop the bench, which ran on to
    its end. The stop is raised again as the suite goes on: status 130, in one line."""

    class Dropped:
        pass

    def terminated(ctx: Context) -> Section:
        dropped = Dropped()
        weakref.finalize(dropped, os.kill, os.getpid(), signal.SIGTERM)
        del dropped
        return Section("node", "Never", ["a"])

    monkeypatch.setitem(SUITES, "node", terminated)
    with pytest.raises(SystemExit) as exit_info:
        main(["--size", "tiny", "--only", "node", "--out", str(tmp_path)])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "interrupted in [node]; none finished"
    assert "Exception ignored" not in err
    assert sys.gettrace() is None


def test_the_bench_command_loads_no_compile_stack_before_a_suite_compiles(loaded):
    """`python -m raydeq.bench --help` and any suite but step_cost's compiled counts pay for no
    import of torch.compile's inductor (and sympy under it): step_cost imports it where used."""
    heavy = ["torch._inductor", "torch._dynamo", "sympy"]
    assert loaded("import raydeq.bench.__main__", heavy) == []


def test_the_command_called_from_python_leaves_the_callers_process_as_it_found_it(
    monkeypatch, tmp_path, state_kept, capsys
):
    """main called from a script puts back the script's SIGTERM handler, torch threads, RNG
    stream and torch's loggers, where a run left SIGTERM raising KeyboardInterrupt, --threads'
    count, a reseeded RNG and one more log filter in the script for good."""

    def seeded(ctx: Context) -> Section:
        torch.manual_seed(ctx.seed)
        return Section("skip", "Seeded", ["a"], rows=[{"a": torch.rand(()).item()}])

    monkeypatch.setitem(SUITES, "skip", seeded)
    threads = torch.get_num_threads()
    with state_kept():
        main(
            [
                "--size",
                "tiny",
                "--only",
                "skip",
                "--threads",
                str(threads % 2 + 1),
                "--out",
                str(tmp_path),
            ]
        )
    assert capsys.readouterr().out.startswith("#")


def test_a_cpu_run_on_a_machine_with_gpus_forks_no_gpus_rng(monkeypatch, tmp_path, capsys):
    """The run's RNG fork covers the CPU and --device alone: fork_rng's default read the RNG of
    every GPU, initialising CUDA on each for a CPU run and warning where there are several."""

    def no_gpu_rng(device: object = "cuda") -> torch.Tensor:
        raise AssertionError(f"the RNG of {device} read for a CPU run")

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", no_gpu_rng)
    monkeypatch.setitem(SUITES, "skip", lambda ctx: Section("skip", "Skip", ["a"], rows=[]))
    main(["--size", "tiny", "--only", "skip", "--device", "cpu", "--out", str(tmp_path)])
    assert capsys.readouterr().out.startswith("#")


def test_a_folder_in_the_home_given_after_a_flags_equals_sign_is_read_there(tmp_path, monkeypatch):
    """The shell leaves a tilde after --out= as written: --out=TILDE/results wrote into a
    folder named TILDE in the current one, and --data=TILDE/mnist or --weights=M=TILDE/run
    found none; each is now the folder in the home, as train's and tune's folders are."""
    home, here = tmp_path / "home", tmp_path / "here"
    here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    model = models.build("mnist_dense", "vanilla", CPU, seed=1)
    write_checkpoint({"step": 7, "model": model.state_dict()}, home / "run" / "checkpoint_000007")
    raw = home / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\0\0\x08\x01\0\0\0\0")  # no labels
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (raw / name).write_bytes(b"\0\0\x08\x03" + (0).to_bytes(4) + (28).to_bytes(4) * 2)
    home_of = f"{chr(126)}/"
    argv = [f"--out={home_of}results", f"--data={home_of}mnist", "--models", "mnist_dense"]
    args = parse([*argv, f"--weights=mnist_dense={home_of}run"])
    assert args.out == home / "results" and args.out.is_dir()
    assert args.data == home / "mnist"
    assert args.weights["mnist_dense"].folder == home / "run"
    assert torch.equal(args.weights["mnist_dense"].weights["head.weight"], model.head.weight)
    assert not list(here.iterdir())


def test_a_gpu_limit_is_checked_only_at_the_batch_it_is_set_for():
    """The GPU limits are for a dense step at batch 256 and a cifar10_large one at batch 128:
    --quick on a GPU times cifar10_large at batch 2, whose 50 ms passed the 150 ms limit of
    batch 128; a step at another batch keeps its time in the table and its target is n/a."""
    stats = SimpleNamespace(nfe=25, unconverged_fraction=0.0, backward_nvjp=23)
    step = Timing([0.05], SimpleNamespace(stats=stats))
    large = next(w for w in train_step.WORKLOADS if w.model == "cifar10_large")
    gpu = Context(torch.device("cuda"), "quick")
    section = Section(name="train_step", title="t", columns=list(train_step.COLUMNS))
    train_step.add_row(gpu, section, large, 2, step)
    train_step.add_row(gpu, section, large, 128, step)
    at_2, at_128 = section.targets
    assert (at_2.measured, at_2.verdict()) == (None, "n/a")
    assert at_2.detail == "the limit is for batch 128, not checked at batch 2 (time in the table)"
    assert section.rows[0]["train step ms"] == pytest.approx(50.0)
    assert (at_128.measured, at_128.verdict()) == (pytest.approx(50.0), "PASS")
    assert at_128.detail == "NFE 25, VJPs 23"


def test_an_interrupted_run_says_in_its_report_which_suites_did_not_finish(
    monkeypatch, tmp_path, capsys
):
    """A report cut by Ctrl-C read as a whole run of fewer suites (its failures empty): it now
    names the suite interrupted and each requested suite that never ran."""
    run_interrupted_in_node(monkeypatch, tmp_path, "skip", "node", "overhead")
    (json_path,) = tmp_path.glob("*-cpu.json")
    data = json.loads(json_path.read_text())
    assert [s["name"] for s in data["sections"]] == ["skip"]
    assert data["failures"] == {
        "node": "interrupted (Ctrl-C or SIGTERM) before it finished",
        "overhead": "not run: the run was interrupted before it",
    }
    md = json_path.with_suffix(".md").read_text()
    assert "- `node`: interrupted (Ctrl-C or SIGTERM) before it finished\n" in md
    assert "- `overhead`: not run: the run was interrupted before it\n" in md


def test_an_output_folder_that_is_a_file_is_named_as_one(tmp_path, capsys):
    """--out naming a file said "cannot write there (File exists)", which reads as a folder
    that holds a result already; it says the name is a file, not a folder."""
    (tmp_path / "results.md").write_text("kept")
    with pytest.raises(SystemExit) as exit_info:
        main(["--size", "tiny", "--only", "step_cost", "--out", str(tmp_path / "results.md")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m raydeq.bench: error: --out {tmp_path / 'results.md'}: a file, not a folder; "
        "name the folder for the results"
    )
    assert (tmp_path / "results.md").read_text() == "kept"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quick", "--size", "full"], "argument --size: not allowed with argument --quick"),
        (["--size", "tiny", "--quick"], "argument --quick: not allowed with argument --size"),
    ],
)
def test_quick_and_a_size_given_together_are_refused(args, message, tmp_path, capsys):
    """--quick --size full ran the full sizes (still in its first suite after 10 minutes on 2
    cores) and --size tiny --quick the quick ones: whichever came last won without a word."""
    with pytest.raises(SystemExit) as exit_info:
        parse([*args, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(message)


def test_a_limit_is_written_to_as_many_digits_as_the_measurement_beside_it():
    """Skip Reg.'s NFE ratio on its limit of 1/3 (5 against 15 NFE) read "0.3333 | <= 0.333 |
    PASS", a measurement over its ceiling that passed; both now show four digits."""
    section = Section("skip", "S", ["a"], targets=[Target("nfe", 5 / 15, 1 / 3)])
    report = Report(date="2026-12-03", device="cpu", size="tiny", machine={}, sections=[section])
    assert "| skip | nfe | 0.3333 | <= 0.3333 | PASS |  |" in report.to_markdown()


def test_a_forward_cases_inputs_are_made_before_its_clock_starts(monkeypatch):
    """The timed call made the solve's z0 (and for torchdiffeq its time points, a copy to the
    device on a GPU) between the clock's readings; both are made before it."""
    events: list[str] = []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: events.append("clock") or 0.0)
    problem = SpectralProblem(Spectrum(dim=6, batch=2), CPU, torch.float64)
    zeros = problem.z0
    monkeypatch.setattr(problem, "z0", lambda: events.append("z0") or zeros())
    times: list[torch.Tensor] = []

    def odeint(func, y0: torch.Tensor, t: torch.Tensor, **options: object) -> torch.Tensor:
        times.append(t)
        return torch.stack([y0, y0 + func(t[0], y0)])

    monkeypatch.setattr(torchdiffeq_suite, "odeint", odeint)
    case = forward_case(problem, torchdiffeq_suite.fixed_time_run(problem, "dopri5", 1e-4, 2.0))
    for _ in range(2):
        events.clear()
        seconds, outcome = time_call(case(), CPU)
        assert events == ["z0", "clock", "clock"] and outcome.nfe == 1
    assert times[0] is times[1] and times[0].tolist() == [0.0, 2.0]


def test_threads_are_bounded_by_the_cpus_this_process_may_run_on(monkeypatch):
    """Under taskset -c 0 on 2 CPUs, --threads 2 was taken (os.cpu_count ignores the affinity
    that torch's own default of 1 follows) and timed two threads contending for one CPU."""
    if hasattr(os, "sched_getaffinity"):  # Linux; macOS has no affinity to read
        assert MAX_THREADS == len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert bench_main.usable_cpus() == 1
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert bench_main.usable_cpus() == 2


def test_the_report_header_counts_the_cores_this_process_may_run_on(monkeypatch):
    """Under taskset -c 0 on 2 CPUs the header said 'cores: 2' (os.cpu_count), so a run timed
    on one CPU read as a run on two; it now counts the CPUs the run may use, the bound of
    --threads."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert report_module.machine_info(torch.device("cpu"))["cores"] == 1


def test_skips_training_step_times_are_in_the_json_beside_the_median_they_give():
    """Its "train ms per batch" was the one time column whose raw seconds the JSON lacked (it
    kept the predictions' alone), so no reader could check it or take another statistic."""
    results = {v: {"test_nfe": 10.0, "test_accuracy": 0.5} for v in skip.VARIANTS}
    step_times = {v: [0.001 * (i + 1), 0.009, 0.002] for i, v in enumerate(skip.VARIANTS)}
    timings = {v: Timing([0.004, 0.001, 0.003]) for v in skip.VARIANTS}
    section = Section("skip", "t", skip.COLUMNS)
    skip.add_results(section, results, step_times, timings)
    report = Report(date="2026-12-03", device="cpu", size="tiny", machine={}, sections=[section])
    (raw,) = json.loads(report.to_json())["sections"]
    for row in raw["rows"]:
        seconds = raw["timings"][f"train/{row['variant']}"]
        assert seconds == step_times[row["variant"]]
        assert row["train ms per batch"] == pytest.approx(1e3 * statistics.median(seconds))
        assert raw["timings"][f"predict/{row['variant']}"] == [0.004, 0.001, 0.003]
