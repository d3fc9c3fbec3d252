"""Searches: Optuna's define-by-run space with conditional dimensions, its checks, the Pareto
front, and a search that resumes with its searcher's state after the driver is killed."""

import json
import logging
import math
import pickle
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import yaml
from conftest import tensorboard_data
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorboard import context as tb_context
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, backend_context, plugin_data_pb2
from test_tune import (
    TINY,
    _alive_actors,
    _reported_steps,
    _tune,
    _wait_for_the_end_of,
    write_reports,
)

from raydeq import tune as rt
from raydeq.experiments import archive, hparams, pareto, results, run, search, spec
from raydeq.experiments.figures import LOG_SPAN, subplots
from raydeq.models import PRESETS
from raydeq.training import reporting
from raydeq.training.config import COSTS, METRICS, ConfigError, parse_overrides

SEARCH = {
    "searcher": "tpe",
    "cost": "test_nfe",
    "num_samples": 40,
    "variants": [
        {"label": "Vanilla", "model.variant": "vanilla"},
        {"label": "Anderson", "model.variant": "skip_reg", "model.solver": "anderson"},
    ],
    "space": {
        "model": {
            "variant": {"choice": ["vanilla", "skip_reg"]},
            "solver": {"choice": ["vcab3", "anderson", "broyden"]},
            "abstol": {"loguniform": [1e-4, 1e-1]},
        },
    },
    "conditional": [
        {
            "when": {"model.solver": "anderson"},
            "space": {"model.solver_options.m": {"randint": [2, 9]}},
        },
        {
            "when": {"model.variant": ["skip_reg"]},
            "space": {"train.lambda_skip": {"loguniform": [1e-3, 10]}},
        },
    ],
}


@pytest.fixture(autouse=True)
def optuna_verbosity_kept() -> Iterator[None]:
    """Put Optuna's verbosity back after each test: search.searcher sets it for the command's
    process for good."""
    verbosity = optuna.logging.get_verbosity()
    yield
    optuna.logging.set_verbosity(verbosity)


def test_a_searchers_trials_are_its_points_then_draws_with_conditional_dimensions():
    experiment = spec.from_dict("s", {**TINY, "search": SEARCH})
    sampled = spec.expand(experiment)
    assert len(sampled) == 40 and experiment.param_space() == {}
    vanilla, anderson = sampled[:2]
    assert vanilla["variant"] == {"label": "Vanilla"} and anderson["variant"] == {
        "label": "Anderson"
    }
    # The points leave nothing to chance: the base's solver and the preset's abstol and lambda_skip.
    assert vanilla["model"] == {"variant": "vanilla", "solver": "vcab3", "abstol": 5e-3}
    assert anderson["train"] == {"lambda_skip": 0.2} and "m" in anderson["model"]["solver_options"]
    for draw in sampled:
        model = draw["model"]
        cfg = experiment.trial_config(draw)
        assert cfg.model.solver == model["solver"] and cfg.model.abstol == model["abstol"]
        assert ("solver_options" in model) == (model["solver"] == "anderson")
        assert ("train" in draw) == (model["variant"] == "skip_reg")
        if model["solver"] == "anderson":
            assert 2 <= cfg.model.solver_options["m"] <= 8
        assert 1e-4 <= model["abstol"] <= 1e-1
    assert {d["model"]["solver"] for d in sampled[2:]} == {"vcab3", "anderson", "broyden"}


@pytest.mark.parametrize(
    ("override", "always", "never"),
    [
        # The rule on the fixed solver applies to every trial; the others go.
        ({"model.solver": "anderson"}, {"m"}, {"solver"}),
        ({"model.solver": "vcab3"}, set(), {"solver", "m"}),
        # A rule's own dimension fixed: the rule has nothing left to draw.
        ({"train.lambda_skip": 0.5}, set(), {"lambda_skip"}),
    ],
)
def test_an_override_of_a_dimension_resolves_the_rules_that_depend_on_it(override, always, never):
    """A conditional rule on an overridden key used to stop the run ("not a dimension drawn
    before it"): fixing `model.solver` in a search over solvers was impossible."""
    experiment = spec.from_dict("s", {**TINY, "search": SEARCH}, override)
    keys = [set(spec.leaves(draw)) for draw in spec.expand(experiment)[2:]]
    drawn = [{key.rsplit(".", 1)[-1] for key in k} for k in keys]
    assert all(always <= d and not (never & d) for d in drawn), drawn
    for draw in spec.expand(experiment):
        cfg = experiment.trial_config(draw)
        for dotted, value in override.items():
            section, key = dotted.split(".")
            assert getattr(getattr(cfg, section), key) == value


def test_an_override_of_a_solver_option_that_a_rule_draws_fixes_it_in_that_rule():
    """Anderson's m=3 was set in the base config too, whose solver (VCAB3) takes no m, so the
    search stopped; now the trials that draw Anderson run m=3 and the others no m."""
    override = {"model.solver_options.m": 3}
    experiment = spec.from_dict("s", {**TINY, "search": SEARCH}, override)
    configs = [experiment.trial_config(draw) for draw in spec.expand(experiment)]
    anderson = [cfg for cfg in configs if cfg.model.solver == "anderson"]
    assert anderson and all(cfg.model.solver_options == {"m": 3} for cfg in anderson)
    assert all(cfg.model.solver_options is None for cfg in configs if cfg not in anderson)
    with pytest.raises(ConfigError, match=r"^model.solver_options.m=3: no trial runs it"):
        spec.from_dict("s", {**TINY, "search": SEARCH}, override | {"model.solver": "vcab3"})


@pytest.mark.parametrize("first", ["model.solver_options.m", "model.solver_options.memory"])
def test_of_two_solver_options_that_no_rule_draws_the_first_given_is_named(first):
    """The error named whichever of the two a set of their keys held first, so the message
    changed with PYTHONHASHSEED from one run of the same command to the next."""
    broyden = {"model.solver_options.memory": {"randint": [5, 31]}}
    rules = [*SEARCH["conditional"], {"when": {"model.solver": "broyden"}, "space": broyden}]
    options = {"model.solver_options.m": 4, "model.solver_options.memory": 10}
    overrides = {first: options[first]} | options | {"model.solver": "vcab3"}
    with pytest.raises(ConfigError, match=rf"^{first}={options[first]}: no trial runs it"):
        spec.from_dict("s", {**TINY, "search": {**SEARCH, "conditional": rules}}, overrides)


@pytest.mark.parametrize("memory", [{"lograndint": [5, 31]}, {"choice": [10, 20]}])
def test_a_dimension_of_an_option_the_points_solver_lacks_is_refused_naming_the_option(memory):
    """Broyden's memory drawn beside a point of vcab3 took vcab3's method `memory` for the
    point's value: a log range failed in a TypeError traceback, a choice named the bound method
    as the experiment's value; both are refused naming the option and those vcab3 takes."""
    search = {"searcher": "tpe", "num_samples": 2, "variants": [{"label": "a"}]}
    search["space"] = {"model.solver_options.memory": memory}
    with pytest.raises(ConfigError) as err:
        spec.from_dict("s", {**TINY, "search": search})
    assert str(err.value) == (
        "search.variants[0]: model.solver='vcab3' takes no option 'memory'; its options are "
        "kind, h0, safety, min_factor, max_factor, step_rtol, contraction, h_max, stalled_factor"
    )


def test_a_point_leaving_a_step_controllers_option_unset_runs_it_at_the_controllers_default():
    """A point of vcab3 that leaves a drawn option of its step controller unset runs it at the
    controller's own value (safety 0.9), as a point of Broyden runs Broyden's memory."""
    search = {"searcher": "tpe", "num_samples": 2, "variants": [{"label": "a"}]}
    search["space"] = {"model.solver_options.safety": {"uniform": [0.5, 0.95]}}
    (point,) = spec.expand(spec.from_dict("s", {**TINY, "search": search}), 1)
    assert point["model"]["solver_options"] == {"safety": 0.9}


@pytest.mark.parametrize(
    "order",
    [["model.solver", "model.solver_options.m"], ["model.solver_options.m", "model.solver"]],
)
def test_a_solver_option_overridden_with_the_solver_of_its_rule_runs_in_either_order(order):
    """`model.solver=anderson model.solver_options.m=4` was refused ("no trial runs it"): the
    solver's override moved the rule's m into the main space, which m's override then dropped;
    given the other way round they ran m=4. Now every trial runs Anderson with m=4 either way."""
    values = {"model.solver": "anderson", "model.solver_options.m": 4}
    experiment = spec.from_dict("s", {**TINY, "search": SEARCH}, {k: values[k] for k in order})
    configs = [experiment.trial_config(draw) for draw in spec.expand(experiment)]
    assert {(cfg.model.solver, repr(cfg.model.solver_options)) for cfg in configs} == {
        ("anderson", "{'m': 4}")
    }


def test_an_override_that_no_point_of_a_searcher_has_leaves_it_to_draw_every_trial():
    """It stopped the run ("not a dimension of the search space"): the points it excluded were
    kept whole when none was left."""
    experiment = spec.from_dict("s", {**TINY, "search": SEARCH}, {"model.variant": "skip"})
    sampled = spec.expand(experiment)
    assert len(sampled) == 40 and not any("label" in draw.get("variant", {}) for draw in sampled)
    assert {experiment.trial_config(draw).model.variant for draw in sampled} == {"skip"}


def test_an_override_that_drops_the_rule_drawing_a_points_key_names_both():
    """It said "search.variants[1].train.lambda_skip: not a dimension of the search space",
    though the file's rule draws it, and named the point by its place among those the override
    kept (1) rather than in the file (2)."""
    variants = [*SEARCH["variants"], {"label": "L", "train.lambda_skip": 0.1}]
    raw = {**TINY, "search": SEARCH | {"variants": variants}}
    with pytest.raises(ConfigError) as err:
        spec.from_dict("s", raw, {"model.variant": "vanilla"})
    assert str(err.value) == (
        "search.variants[2].train.lambda_skip: model.variant='vanilla' drops "
        "search.conditional[1], the one rule that draws it (when model.variant in "
        "['skip_reg']), so the point's trial could not run it; leave the key out of the point, "
        "or override model.variant to one of ['skip_reg']"
    )
    fixed = {"model.variant": "skip_reg", "train.lambda_skip": 0.1}
    assert [p.get("variant") for p in spec.expand(spec.from_dict("s", raw, fixed))[:2]] == [
        {"label": "Anderson"},
        {"label": "L"},
    ]
    # Every trial a vanilla DEQ, the lambda_skip given beside it would weigh nothing.
    with pytest.raises(ConfigError, match="^train.lambda_skip: 0.1 weighs the skip loss"):
        spec.from_dict("s", raw, {"model.variant": "vanilla", "train.lambda_skip": 0.1})


def test_a_variant_after_those_an_override_drops_is_named_by_its_place_in_the_file():
    """An override that dropped variants before a bad one had it named by its place among
    those kept: model.solver=vcab3 over [bs3, vcab3 with abstol -1] refused
    search.variants[0], which in the file is the good bs3 one."""
    bad = {"label": "b", "model.solver": "vcab3", "model.abstol": -1.0}
    raw = {**TINY, "search": {"variants": [{"label": "a", "model.solver": "bs3"}, bad]}}
    for overrides in ({}, {"model.solver": "vcab3"}):
        with pytest.raises(ConfigError) as err:
            spec.from_dict("s", raw, overrides)
        assert str(err.value) == "search.variants[1]: model.abstol: must be >= 0, got -1.0"
        assert err.value.key == "search.variants[1]"


def test_a_searchers_points_after_those_an_override_drops_keep_their_places_in_the_file():
    """With model.variant=skip_reg dropping the vanilla point 0, the skip_reg points 1 and 2
    were labelled 'point 0' and 'point 1', noted and refused as search.variants[0] and [1];
    and an unlabelled point that sets only the overridden key, left empty, was refused as
    'expected a mapping of dotted keys'. Each keeps its place as written, and the emptied
    point runs the experiment's own values, as a labelled one does."""
    rows = [
        {"model.variant": "vanilla"},
        {"model.variant": "skip_reg", "model.solver": "anderson"},
        {"model.variant": "skip_reg", "train.lambda_skip": 20.0},
    ]
    raw = {**TINY, "search": SEARCH | {"variants": rows}}
    experiment = spec.from_dict("s", raw, {"model.variant": "skip_reg"})
    assert [label for label, _ in experiment.space().points] == ["point 1", "point 2"]
    (note,) = rt.point_notes(experiment)
    assert note.startswith("note: point 2 (search.variants[2]) runs train.lambda_skip at 20.0")
    emptied = spec.from_dict("s", raw, {"model.variant": "vanilla"})
    assert spec.expand(emptied)[0]["variant"] == {"label": "point 0"}
    bad = [*rows, {"model.variant": "skip_reg", "data.batch_size": 16}]
    with pytest.raises(ConfigError) as err:
        spec.from_dict(
            "s", {**TINY, "search": SEARCH | {"variants": bad}}, {"model.variant": "skip_reg"}
        )
    assert str(err.value).startswith("search.variants[3].data.batch_size: not a dimension")
    assert err.value.key == "search.variants[3].data.batch_size"


def test_a_rule_after_those_an_override_drops_is_named_by_its_place_in_the_file():
    """model.solver=vcab3 drops the rule drawing Anderson's memory, search.conditional[0]: a
    bad range of the rule after it was refused as search.conditional[0], the dropped one."""
    bad = {"train.lambda_skip": {"loguniform": [-1, 10]}}
    rules = [SEARCH["conditional"][0], {**SEARCH["conditional"][1], "space": bad}]
    raw = {**TINY, "search": SEARCH | {"conditional": rules}}
    for overrides in ({}, {"model.solver": "vcab3"}):
        with pytest.raises(ConfigError) as err:
            spec.from_dict("s", raw, overrides)
        assert str(err.value).startswith(
            "search.conditional[1].space.train.lambda_skip.loguniform: bad arguments [-1, 10]"
        )
        assert err.value.key == "search.conditional[1].space.train.lambda_skip.loguniform"


@pytest.mark.parametrize("name", ["digits", "digits_search", "mnist_dense", "svhn"])
def test_the_trial_count_that_the_progress_lines_show_is_what_expand_lists(name):
    experiment = spec.load(name)
    for samples in (None, 3):
        assert spec.trial_count(experiment, samples) == len(spec.expand(experiment, samples))


def test_a_point_runs_the_whole_section_choice_that_agrees_with_the_experiments_section():
    """A choice of whole sections compared the base's whole optim section, every setting of
    it, with each choice's two, so a point matched none and every such search was refused."""
    adam = {"optimizer": "adam", "lr": "1e-3", "milestones": [1, 2]}  # a trial's: (1, 2)
    space = {**SEARCH["space"], "optim": {"choice": [{"optimizer": "sgd", "lr": 0.1}, adam]}}
    optim = {"schedule": "step", "milestones": [1, 2]}
    raw = {**TINY, "optim": optim, "search": SEARCH | {"space": space}}
    experiment = spec.from_dict("s", raw)
    vanilla, anderson = spec.expand(experiment)[:2]
    assert vanilla["optim"] == anderson["optim"] == adam
    assert experiment.trial_config(vanilla).optim.lr == 1e-3  # the experiment's


def test_the_define_by_run_space_draws_the_same_values_through_optuna():
    space = spec.from_dict("s", {**TINY, "search": SEARCH}).space()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(30):
        trial = study.ask()
        drawn = space(trial)
        assert {k: v for k, v in drawn.items() if k != search.LABEL_KEY} == trial.params
    assert pickle.loads(pickle.dumps(space)) == space  # the searcher's state pickles with it


def test_a_draw_that_repeats_a_paper_point_is_not_labelled_as_that_point():
    """A searcher's draw of a point's values was given the point's label, so results counted
    it as the paper's configuration, a second seed of it that ran the same seed."""
    space = {
        "model.variant": {"choice": ["vanilla", "skip_reg"]},
        "model.adjoint": {"choice": ["gmres", "jfb"]},
    }
    variants = [{"label": "Vanilla", "model.variant": "vanilla"}]
    raw = {
        **TINY,
        "search": {"searcher": "tpe", "num_samples": 12, "variants": variants, "space": space},
    }
    experiment = spec.from_dict("s", raw)
    limiter = search.searcher(experiment.space(), experiment.search, seed=0, bound=lambda: 12)
    for draws in (spec.expand(experiment), [limiter.suggest(f"t{i}") for i in range(12)]):
        repeats = [draw for draw in draws[1:] if draw["model"] == draws[0]["model"]]
        assert draws[0]["variant"] == {"label": "Vanilla"} and repeats
        assert not any("variant" in draw for draw in draws[1:])


def test_a_sampled_dimension_is_honoured_over_a_variants_setting():
    """A new experiment that writes both is refused, the variant's setting changing nothing; one
    stored before that was refused runs the space's value, as it did."""
    raw = {
        **TINY,
        "search": {
            "variants": [{"label": "v", "model.solver": "broyden"}],
            "space": {"model": {"solver": {"choice": ["euler"]}}},
        },
    }
    with pytest.raises(ConfigError) as err:
        spec.from_dict("s", raw)
    assert str(err.value) == (
        "search.variants[0].model.solver: search.space draws model.solver for every trial, "
        "over this variant's 'broyden', so this changes nothing; remove it from the variant or "
        "from search.space"
    )
    experiment = spec.from_dict("s", raw, stored=True)
    (sampled,) = spec.expand(experiment)
    assert experiment.trial_config(sampled).model.solver == "euler"


# A rule drawing a dimension drawn elsewhere: Optuna kept the first value (an Anderson trial's
# abstol outside the rule's range) or refused the second kind of distribution mid-run.
BROYDEN = {"model.solver": "broyden"}
NARROW_ABSTOL = {"model.abstol": {"loguniform": [1e-3, 1e-2]}}
LAMBDA_SKIP = {"train.lambda_skip": {"uniform": [1, 10]}}
RELTOL = {"model.reltol": {"loguniform": [1e-4, 1e-1]}}
ANDERSON_OR_BROYDEN = {"choice": ["anderson", "broyden"]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"searcher": "grid"}, r"^search.searcher: 'grid' is not allowed; choose one of random"),
        ({"searcher": "random"}, r"^search.conditional: needs searcher tpe or nsga2"),
        ({"cost": "loss"}, r"^search.cost: 'loss' is not allowed; choose one of test_nfe"),
        ({"num_samples": 1}, r"^search.num_samples: 1 is fewer than the 2 variants"),
        (
            {"space": {"seed": {"grid_search": [0, 1]}}},
            r"^search.space.seed.grid_search: a searcher draws every trial",
        ),
        (
            {"space": {"model": {"abstol": {"randn": [0, 1]}}}},
            r"^search.space.model.abstol: Optuna cannot sample",
        ),
        (
            {"variants": [{"model.adjoint": "jfb"}]},
            r"^search.variants\[0\].model.adjoint: not a dimension of the search space",
        ),
        (
            {"variants": [{"model.solver": "euler"}]},
            r"^search.variants\[0\].model.solver: 'euler' is not a choice of search.space",
        ),
        (
            {"conditional": [{"when": {"model.adjoint": "jfb"}, "space": {"seed": 1}}]},
            r"^search.conditional\[0\].when.model.adjoint: not a dimension drawn before it",
        ),
        (  # the trial ran the preset's reltol of 0.005, not the point's 0.05
            {
                "conditional": [{"when": {"model.variant": "skip_reg"}, "space": RELTOL}],
                "variants": [{"label": "a", "model.variant": "vanilla", "model.reltol": 0.05}],
            },
            r"^search.variants\[0\].model.reltol: search.conditional\[0\] draws it only when "
            r"model.variant in \['skip_reg'\], which the point does not meet, so its trial would "
            r"run at the experiment's value, not at 0.05; leave the key out of the point, or meet "
            r"the rule's when$",
        ),
        (  # the trial ran seed 1, not the point's 2
            {"space": {**SEARCH["space"], "seed": 1}, "variants": [{"label": "a", "seed": 2}]},
            r"^search.variants\[0\].seed: 2 is not search.space seed, which is fixed at 1 for "
            r"every trial, the point's too; give the point 1, or leave the key out of it$",
        ),
        (  # the message showed the base's whole optim section, every setting of it
            {"space": {**SEARCH["space"], "optim": {"choice": [{"lr": 0.1}, {"lr": 0.2}]}}},
            r"^search.variants\[0\].optim: the point leaves it unset, and the experiment's "
            r"section differs in a setting from each of the 2 whole sections that search.space "
            r"optim chooses from; make the experiment's section agree with one of them$",
        ),
        (  # the message read as if the point had given the base's vcab3
            {"space": {"model": {**SEARCH["space"]["model"], "solver": ANDERSON_OR_BROYDEN}}},
            r"^search.variants\[0\].model.solver: the point leaves it unset, and the "
            r"experiment's 'vcab3' is none of the choices of search.space model.solver "
            r"\('anderson', 'broyden'\); give the point one of them$",
        ),
        (  # Optuna refused to record it: a traceback at --dry-run, at the start, in the run
            {"variants": [{"model.variant": "skip_reg", "train.lambda_skip": 0.0}]},
            r"^search.variants\[0\].train.lambda_skip: 0.0 is not a value of "
            r"search.conditional\[1\].space train.lambda_skip, a log float \[0.001, 10\], which "
            r"holds none of 0 or below, so the searcher could not record the point",
        ),
        (
            {"conditional": [*SEARCH["conditional"], {"when": BROYDEN, "space": NARROW_ABSTOL}]},
            r"^search.conditional\[2\].space.model.abstol: drawn by search.space too",
        ),
        (
            {"conditional": [*SEARCH["conditional"], {"when": BROYDEN, "space": LAMBDA_SKIP}]},
            r"^search.conditional\[2\].space.train.lambda_skip: drawn by search.conditional\[1\]",
        ),
        (
            {"conditional": [{"if": {"model.solver": "anderson"}}]},
            r"^search.conditional\[0\]: expected the keys when and space",
        ),
        (
            {"conditional": [{"when": {}, "space": {"seed": 1}}]},
            r"^search.conditional\[0\].when: expected a mapping of dotted keys to values$",
        ),
        (
            {"conditional": [{"when": {"model.solver": "anderson"}, "space": None}]},
            r"^search.conditional\[0\].space: expected a mapping of keys to primitives$",
        ),
        (
            {"conditional": [{"when": {"model.solver": ["andersen"]}, "space": {"seed": 1}}]},
            r"^search.conditional\[0\].when.model.solver: 'andersen' is not one of its choices "
            r"'vcab3', 'anderson', 'broyden', so the rule would never apply",
        ),
        ({"metric": "test_acc"}, r"^search.metric: 'test_acc' is not allowed; choose one of"),
        (
            {"metric": "test_nfe"},
            r"^search.cost: 'test_nfe' is search.metric too, .* choose another cost \(nfe, "
            r"forward_time, backward_time, predict_time\) or remove search.cost$",
        ),
        ({"searcher": "random", "conditional": []}, r"^search.cost: needs searcher tpe or nsga2"),
        (
            {
                "conditional": [
                    {
                        "when": {"model.solver": "anderson"},
                        "space": {"model.m": {"randint": [2, 9]}},
                    }
                ]
            },
            r"^search.conditional\[0\].space.model.m: unknown key; allowed keys in model: model,",
        ),
    ],
)
def test_bad_searches_are_one_line_errors(change, message):
    with pytest.raises(ConfigError, match=message) as err:
        rt.preflight(spec.from_dict("bad", {**TINY, "search": SEARCH | change}))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            {"when": {}, "space": {"seed": 1}},
            r"^search.conditional\[0\].when: expected a mapping of dotted keys to values$",
        ),
        (
            {"when": {"model.solver": "anderson"}, "space": {"seed": 1}, "if": 1},
            r"^search.conditional\[0\]: expected the keys when and space, got when, space, if$",
        ),
    ],
)
def test_a_malformed_rule_is_refused_under_an_override_as_without_one(rule, message):
    """An override resolves the rules for its key: a rule with an empty `when`, or a key beside
    when and space, lost it there and joined the main space, so that every trial ran seed 1
    where the same file without the override was refused; it is refused either way."""
    raw = {**TINY, "search": SEARCH | {"conditional": [rule]}}
    for overrides in ({}, {"model.solver": "anderson"}):
        with pytest.raises(ConfigError, match=message):
            rt.preflight(spec.from_dict("bad", raw, overrides))


def test_dry_run_shows_the_space_and_the_paper_points_first(capsys):
    assert rt.main(["digits_search", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    labels = [json.loads(line)["label"] for line in out.splitlines()]
    assert len(labels) == 24
    assert [label.split(",")[0] for label in labels[:3]] == [
        "Vanilla DEQ",
        "Skip DEQ",
        "Skip Reg. DEQ",
    ]
    assert (
        "model.solver: choice ['vcab3', 'tsit5', 'bs3', 'euler', 'broyden', 'anderson', "
        "'fixed_point']" in err
    )
    assert "model.solver_options.m: int [2, 8] (when model.solver in ['anderson'])" in err
    # TPE learns from results after Optuna's 10 startup trials: a dry run cannot know those.
    assert err.splitlines()[-1] == (
        "trials 11 to 24: tpe draws them from the results of those before; listed here are "
        "random draws in their place"
    )


SKIP = {"label": "Skip", "model.variant": "skip_reg"}


@pytest.mark.parametrize(
    ("change", "last"),
    [
        ({"searcher": "nsga2", "population_size": 4}, "trials 5 to 6: nsga2 draws them"),
        # The paper's points past the first generation are listed as they run, not drawn.
        (
            {"searcher": "nsga2", "population_size": 2, "variants": [*SEARCH["variants"], SKIP]},
            "trials 4 to 6: nsga2 draws them",
        ),
        # 6 trials within the first generation of 50: a random search, which a note says
        (
            {"searcher": "nsga2"},
            "note: nsga2 learns from results after its first 50 trials, and this search runs 6, "
            "so it draws every trial at random; set search.num_samples above 50, or "
            "search.population_size below 6 for it to learn",
        ),
        (  # TPE's 10 startup trials are random draws
            {"num_samples": 10},
            "note: tpe learns from results after its first 10 trials, and this search runs 10, "
            "so it draws every trial at random; set search.num_samples above 10 for it to learn",
        ),
        # 2 trials: no population within them, which must be 2 or more, makes a generation
        (
            {"searcher": "nsga2", "num_samples": 2, "variants": [SKIP]},
            "note: nsga2 learns from results after its first 50 trials, and this search runs 2, "
            "so it draws every trial at random; set search.num_samples above 50 for it to learn",
        ),
        # Trials that are all listed points draw nothing: no note.
        ({"searcher": "nsga2", "num_samples": 2}, "first: "),
    ],
)
def test_a_dry_run_says_where_a_searcher_starts_learning_from_results(
    change, last, capsys, tmp_path
):
    file = tmp_path / "search.yaml"
    file.write_text(yaml.safe_dump({**TINY, "search": {**SEARCH, "num_samples": 6} | change}))
    assert rt.main([str(file), "--dry-run"]) == 0
    assert capsys.readouterr().err.splitlines()[-1].startswith(last)


def test_a_started_searchs_dry_run_gives_no_advice_on_its_trial_count(capsys, tmp_path):
    """--resume --dry-run of a started 6-trial NSGA-II search said to set search.num_samples
    above 50, which a started search cannot change; its listing now leaves the note out."""
    raw = {**TINY, "search": {**SEARCH, "num_samples": 6, "searcher": "nsga2"}}
    file = tmp_path / "search.yaml"
    file.write_text(yaml.safe_dump(raw))
    assert rt.main([str(file), "--dry-run"]) == 0
    assert "note: nsga2 learns from results" in capsys.readouterr().err
    experiment = spec.load(str(file))
    options = run.Options(None, 6, "fifo", 0)
    run.save_settings(str(tmp_path / "runs" / "search"), experiment, options)
    argv = [str(file), "--storage", str(tmp_path / "runs"), "--resume", "--dry-run"]
    assert rt.main(argv) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 6 and "note:" not in err


# Anderson's point takes mnist_dense's lambda_skip of 0.2, above this rule's range.
NARROW_SKIP = {
    "when": {"model.variant": ["skip_reg"]},
    "space": {"train.lambda_skip": {"loguniform": [1e-3, 0.1]}},
}
OUTSIDE_NOTE = (
    "note: Anderson (search.variants[1]) runs train.lambda_skip at 0.2, outside the log float "
    "[0.001, 0.1] that search.conditional[1].space draws it from: {} records the point as run "
    "and learns from it, but draws only within that range"
)


@pytest.mark.parametrize("searcher", ["tpe", "nsga2"])
def test_a_point_outside_its_range_is_noted_before_the_run_and_runs_without_warnings(
    searcher, capsys, tmp_path
):
    """digits_search's Skip DEQs ran lambda_skip 0.2 where its range ended at 0.1, and Optuna
    warned of it in its own words mid-run, once per point, while the dry run said nothing; the
    dry run and the start now say it once, and the run gives the point without a warning and
    records it at 0.2."""
    narrow = {
        "searcher": searcher,
        "num_samples": 4,
        "conditional": [SEARCH["conditional"][0], NARROW_SKIP],
    }
    raw = {**TINY, "search": SEARCH | narrow}
    file = tmp_path / "search.yaml"
    file.write_text(yaml.safe_dump(raw))
    assert rt.main([str(file), "--dry-run"]) == 0
    note = OUTSIDE_NOTE.format(searcher)
    assert [line for line in capsys.readouterr().err.splitlines() if "outside" in line] == [note]
    experiment = spec.from_dict("s", raw)
    assert rt.point_notes(experiment) == [note]
    optuna_search = search.searcher(experiment.space(), experiment.search, 0, lambda: 8).searcher
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drawn = [optuna_search.suggest(f"t{i}") for i in range(2)]
    assert drawn[1]["train"] == {"lambda_skip": 0.2}
    optuna_search.on_trial_complete("t1", {"test_accuracy": 0.9, "test_nfe": 8.0})
    assert optuna_search._ot_study.trials[1].params["train/lambda_skip"] == 0.2


@pytest.mark.parametrize(
    "name", ["digits_search", "mnist_search", "cifar10_small_search", "imagenet"]
)
def test_no_shipped_search_has_a_point_outside_its_space(name):
    assert rt.point_notes(spec.load(name)) == []


def _brute_front(accuracy, cost):
    """Indices no other point dominates, by comparing every pair."""
    finite = [i for i in range(len(accuracy)) if accuracy[i] == accuracy[i] and cost[i] == cost[i]]
    return sorted(
        i
        for i in finite
        if not any(
            accuracy[j] >= accuracy[i]
            and cost[j] <= cost[i]
            and (accuracy[j] > accuracy[i] or cost[j] < cost[i])
            for j in finite
        )
    )


values = st.one_of(st.sampled_from([0.5, 0.9, 1.0, 10.0, float("nan")]), st.floats(0, 100))


# No deadline: a loaded machine stalls an example past Hypothesis's 200 ms now and then.
@settings(deadline=None)
@given(st.lists(st.tuples(values, values), max_size=40))
def test_the_pareto_front_is_the_brute_force_one(points):
    accuracy, cost = [p[0] for p in points], [p[1] for p in points]
    assert sorted(pareto.front(accuracy, cost)) == _brute_front(accuracy, cost)
    cheapest = pareto.cheapest_within(accuracy, cost, margin=0.3)
    finite = [i for i in range(len(points)) if accuracy[i] == accuracy[i] and cost[i] == cost[i]]
    if not finite:
        assert cheapest is None
        return
    best = max(accuracy[i] for i in finite)
    close = [
        i for i in finite if best - accuracy[i] <= 0.3 or math.isclose(best - accuracy[i], 0.3)
    ]
    assert cheapest in close
    assert cost[cheapest] == min(cost[i] for i in close)


def test_the_front_table_names_the_paper_points_and_the_cheapest_trial():
    rows = [
        {
            "trial": "9db77_00000_solver=vcab3",
            "group": "Vanilla DEQ (ours, lambda 1.0), solver=vcab3",
            "paper": True,
            "completed": True,
            "test_accuracy": 0.95,
            "test_nfe": 30.0,
            "train_time": 0.02,
            "config.model.solver": "vcab3",
        },
        {
            "trial": "9a3b6bd8_solver=euler",
            "group": "solver=euler",
            "paper": False,
            "completed": True,
            "test_accuracy": 0.948,
            "test_nfe": 9.0,
            "train_time": 0.01,
            "config.model.solver": "euler",
        },
        {
            "trial": "9db77_00002_solver=bs3",
            "group": "solver=bs3",
            "paper": False,
            "completed": True,
            "test_accuracy": 0.90,
            "test_nfe": 40.0,
            "train_time": 0.03,
            "config.model.solver": "bs3",
        },
        {
            "trial": "9db77_00003_solver=bs3",
            "group": "solver=bs3",
            "paper": False,
            "completed": False,
            "test_accuracy": 0.99,
            "test_nfe": 1.0,
            "train_time": 0.001,
            "config.model.solver": "bs3",
        },
    ]
    marked = pareto.mark(rows, "test_accuracy")
    assert [r["pareto_test_nfe"] for r in marked] == [True, True, False, False]
    assert [r["cheapest_test_nfe"] for r in marked] == [False, True, False, False]
    text = pareto.markdown(marked, "test_accuracy")
    assert (
        "| 9a3b6bd8 | 94.80 | 9 | 0.01 | - | euler |" in text
        and "| Vanilla DEQ (ours, lambda 1.0) | 95.00 | 30 |" in text
    )
    assert (
        "Cheapest within 0.5 points of the best test_accuracy: 9a3b6bd8 (94.80%, test NFE 9)"
        in text
    )
    assert pareto.chart(marked, "test_accuracy").startswith(b"\x89PNG")
    # Tune's variant generator names a trial 9db77_00001, a searcher 9a3b6bd8; the values follow.
    for folder, name in [("9db77_00001_lr=0.001", "9db77_00001"), ("9a3b6bd8_m=5", "9a3b6bd8")]:
        assert pareto.table_name({"trial": folder}) == name


def test_the_front_is_marked_on_the_finished_trials_wherever_a_stopped_one_sits():
    """The rows are in trial order, so a stopped trial often comes first: the front and the
    cheapest pick are taken over the finished trials and marked on those rows. By hand: of
    equally cheap trials the more accurate one dominates and is the cheapest pick, and a
    trial exactly `margin` below the best is within it."""
    trials = [  # (completed, test_accuracy, test_nfe, train_time)
        (False, 0.99, 1.0, 0.001),
        (True, 0.95, 30.0, 0.02),
        (True, 0.948, 9.0, 0.03),
        (True, 0.90, 40.0, 0.01),
        (True, 0.947, 9.0, 0.05),
    ]
    rows = [
        {"trial": f"9db77_0000{i}", "group": f"t{i}", "completed": done}
        | {"test_accuracy": accuracy, "test_nfe": nfe, "train_time": time}
        for i, (done, accuracy, nfe, time) in enumerate(trials)
    ]
    marked = pareto.mark(rows, "test_accuracy")
    assert [r["pareto_test_nfe"] for r in marked] == [False, True, True, False, False]
    assert [r["cheapest_test_nfe"] for r in marked] == [False, False, True, False, False]
    assert [r["pareto_train_time"] for r in marked] == [False, True, False, True, False]
    assert [r["cheapest_train_time"] for r in marked] == [False, True, False, False, False]
    assert pareto.cheapest_within([0.75, 0.5], [2.0, 1.0], margin=0.25) == 1


def test_a_trial_exactly_half_a_point_below_the_best_counts_as_within():
    """Accuracies of counts on a test set are 0.5 points apart only up to rounding (21 and 11 of
    2,000: 0.0105 - 0.005 > 0.0055 in floats, 31 of 1,991 such pairs); the cheaper one counts."""
    assert 11 / 2000 < 21 / 2000 - pareto.MARGIN
    assert pareto.cheapest_within([21 / 2000, 11 / 2000], [2.0, 1.0]) == 1
    misses = [
        c
        for c in range(10, 2001)
        if pareto.cheapest_within([c / 2000, (c - 10) / 2000], [2, 1]) != 1
    ]
    assert misses == []


def test_every_metric_a_search_can_rank_by_is_a_results_column():
    """A search that ranks by images_per_second finds it in each trial's row (its reports'
    mean), so the front is taken on it rather than on another metric."""
    experiment = spec.from_dict("rate", {"data": {"dataset": "digits"}})
    trial = SimpleNamespace(trial_id="9db77_00000", status="TERMINATED", config={})
    frame = pd.DataFrame({name: [1.0, 3.0] for name in METRICS} | {"step": [10, 20]})
    row = results.trial_row(experiment, trial, frame)
    assert {name: row[name] in (1.5, 2.0, 3.0) for name in METRICS} == dict.fromkeys(METRICS, True)
    # Ten steps at 1 image a second and ten at 3: 20 steps' images in 10 + 10 / 3 seconds.
    assert row["images_per_second"] == pytest.approx(20 / (10 + 10 / 3))
    assert row["step_time"] == 2.0


def test_a_metric_in_mode_min_has_the_lowest_values_on_the_front():
    """metric train_loss, mode min: of (loss, test NFE) A (0.1, 10), B (0.5, 5) and C (0.3, 20),
    C is beaten by A (lower loss at less cost), so the front is B and A and the cheapest within
    half a point of the best loss is A; in training time (0.3, 0.1, 0.2) none beats another."""
    rows = [
        {"trial": f"9db77_0000{i}", "group": f"t{i}", "completed": True}
        | {"train_loss": loss, "test_nfe": nfe, "train_time": time}
        for i, (loss, nfe, time) in enumerate([(0.1, 10.0, 0.3), (0.5, 5.0, 0.1), (0.3, 20.0, 0.2)])
    ]
    marked = pareto.mark(rows, "train_loss", "min")
    assert [r["pareto_test_nfe"] for r in marked] == [True, True, False]
    assert [r["cheapest_test_nfe"] for r in marked] == [True, False, False]
    assert [r["pareto_train_time"] for r in marked] == [True, True, True]
    assert [r["cheapest_train_time"] for r in marked] == [True, False, False]
    assert pareto.chart(marked, "train_loss", "min").startswith(b"\x89PNG")


def test_a_metric_that_is_no_accuracy_is_shown_as_it_is_not_in_percent():
    """train_loss 0.1 is no 10 %: the front table's column and the cheapest line give the
    loss itself and a margin of 0.005, not 0.5 points; an accuracy stays in percent."""
    rows = [
        {"trial": f"9db77_0000{i}", "group": f"t{i}", "completed": True}
        | {"train_loss": loss, "test_accuracy": 1 - loss, "test_nfe": nfe, "train_time": 0.5}
        for i, (loss, nfe) in enumerate([(0.1, 10.0), (0.5, 5.0)])
    ]
    loss = pareto.markdown(pareto.mark(rows, "train_loss", "min"), "train_loss")
    assert "| Trial | train_loss | test NFE |" in loss and "| 9db77_00001 | 0.5 | 5 |" in loss
    assert "Cheapest within 0.005 of the best train_loss: 9db77_00000 (0.1, test NFE 10)" in loss
    accuracy = pareto.markdown(pareto.mark(rows, "test_accuracy"), "test_accuracy")
    assert "| Trial | test_accuracy (%) | test NFE |" in accuracy
    assert "| 9db77_00001 | 50.00 | 5 |" in accuracy
    assert "within 0.5 points of the best test_accuracy: 9db77_00000 (90.00%, test NFE 10)" in (
        accuracy
    )


def test_the_chart_leaves_off_a_front_end_at_chance_level_and_counts_it():
    """A cheap trial that collapsed to chance sits on the front; drawing it would squeeze the
    others into the top of the chart, so the panel shows the front within ZOOM_POINTS of the
    best and the paper's points, and its title counts what it leaves off."""
    figure, axes = subplots()
    accuracy, front = [10.6, 10.6, 96.9, 97.2, 95.8, 92.5], [10.6, 10.6, 96.9, 97.2]
    shown = [
        a
        for a, row in zip(
            accuracy, [{"pareto_c": a in front, "paper": a == 95.8} for a in accuracy]
        )
        if pareto._shown(row, "c", a, max(accuracy))
    ]
    assert shown == [96.9, 97.2, 95.8]
    pareto._zoom(axes, accuracy, shown, front)
    assert axes.get_ylim() == pytest.approx((95.8 - pareto.ZOOM_POINTS, 98.2))
    assert axes.get_title() == "2 trial(s) below 86% not shown (2 of them on the front)"
    assert pareto._shown({"paper": True}, "c", 10.0, 97.2)


def _finished(experiment: Path) -> set[str]:
    """The trial folders whose trial has reported its last step."""
    return {
        trial.name
        for trial in experiment.glob("*_*")
        if (trial / "result.json").is_file() and 6 in _reported_steps(trial)
    }


def _each(rows: list[dict], settings: list[str]) -> dict[str, list[str]]:
    """The same settings for each trial of `rows`, as `hparams.write` takes them."""
    return {row["trial"]: settings for row in rows}


def _hparams_entry(folder: Path) -> tuple[dict[str, float], dict[str, object]]:
    """The measures and the settings of a trial's TensorBoard HParams entry."""
    events = EventAccumulator(str(folder))
    events.Reload()
    measures = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    return measures, values


def test_the_hparams_view_has_each_finished_trials_settings_and_final_measures_once(tmp_path):
    """An entry per trial that trained to its end, with its searched settings by their config
    names (numbers as numbers) and its final accuracy, test NFE and time per step (a measure
    it lacks is left out, and the training NFE is none); a later report adds the trials
    finished since and leaves the entries written alone."""
    rows = [
        {"trial": "a", "completed": True, "config.optim.lr": 0.25, "config.model.solver": "vcab3"}
        | {"test_accuracy": 0.75, "test_top5_accuracy": math.nan, "test_nfe": 12.0}
        | {"train_time": 0.5, "nfe": 30.0},
        {"trial": "b", "completed": False, "config.optim.lr": 0.5, "config.model.solver": "euler"}
        | {"test_accuracy": 0.25, "test_nfe": 4.0, "train_time": 0.125},
    ]
    settings = ["config.optim.lr", "config.model.solver"]
    assert hparams.write(str(tmp_path), rows, _each(rows, settings), "test_accuracy", None) == 1
    folder = tmp_path / hparams.FOLDER
    assert [p.name for p in folder.iterdir()] == ["a"]
    measures, values = _hparams_entry(folder / "a")
    assert measures == {"hparam/test_accuracy": 0.75, "hparam/test_nfe": 12.0} | {
        "hparam/train_time": 0.5
    }
    assert values == {"trial": "a", "optim.lr": 0.25, "model.solver": "vcab3"}
    written = {p.name: p.read_bytes() for p in (folder / "a").iterdir()}
    later = [rows[0] | {"test_accuracy": 0.5}, rows[1] | {"completed": True}]
    assert hparams.write(str(tmp_path), later, _each(later, settings), "test_accuracy", None) == 1
    assert {p.name: p.read_bytes() for p in (folder / "a").iterdir()} == written
    measures, values = _hparams_entry(folder / "b")
    assert measures == {"hparam/test_accuracy": 0.25, "hparam/test_nfe": 4.0} | {
        "hparam/train_time": 0.125
    }
    assert values == {"trial": "b", "optim.lr": 0.5, "model.solver": "euler"}


def test_an_hparams_entry_whose_write_failed_is_written_by_the_next_report(tmp_path):
    """A write that failed (a full disk) left the trial's folder empty: the next report writes
    the entry, where it took the folder for the entry and skipped the trial for good."""
    rows = [{"trial": "a", "completed": True, "config.optim.lr": 0.25, "test_accuracy": 0.75}]
    (tmp_path / hparams.FOLDER / "a").mkdir(parents=True)
    assert (
        hparams.write(str(tmp_path), rows, _each(rows, ["config.optim.lr"]), "test_accuracy", None)
        == 1
    )
    measures, values = _hparams_entry(tmp_path / hparams.FOLDER / "a")
    assert measures == {"hparam/test_accuracy": 0.75}
    assert values == {"trial": "a", "optim.lr": 0.25}


def test_an_hparams_entry_whose_write_failed_puts_back_the_process_thread_hook(monkeypatch):
    """An entry's events that failed to be written left TensorBoard's writer open and the
    process's threading.excepthook replaced by its writer's for the rest of the process."""
    own = threading.excepthook

    def full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hparams.EventLog, "add_scalars", full)
    with pytest.raises(OSError, match="No space left"):
        hparams._event_file({"optim.lr": 0.25}, {"test_accuracy": 0.75})
    assert threading.excepthook is own


def test_an_hparams_entry_gains_a_setting_that_trials_finished_since_vary(tmp_path):
    """A report while trial b runs (`--report`) finds the solver the same in a and b and
    writes a's entry without it; once c, which drew euler, has finished, a's entry is written
    again with its solver, where the HParams tab left a's solver blank (and a filter on the
    solver hid a) for good. An entry whose settings did not change is left alone."""
    a = {"trial": "a", "completed": True, "config.optim.lr": 0.25, "test_accuracy": 0.75}
    a |= {"config.model.solver": "vcab3"}
    b = {"trial": "b", "completed": False, "config.optim.lr": 0.5, "config.model.solver": "vcab3"}
    c = {"trial": "c", "completed": True, "config.optim.lr": 0.125, "test_accuracy": 0.5}
    c |= {"config.model.solver": "euler"}
    early = [a, b]
    assert (
        hparams.write(
            str(tmp_path), early, _each(early, pareto.varying(early)), "test_accuracy", None
        )
        == 1
    )
    assert _hparams_entry(tmp_path / hparams.FOLDER / "a")[1] == {"trial": "a", "optim.lr": 0.25}
    later = [a, b | {"completed": True}, c]
    assert (
        hparams.write(
            str(tmp_path), later, _each(later, pareto.varying(later)), "test_accuracy", None
        )
        == 3
    )
    assert len(list((tmp_path / hparams.FOLDER / "a").iterdir())) == 1
    assert _hparams_entry(tmp_path / hparams.FOLDER / "a") == (
        {"hparam/test_accuracy": 0.75},
        {"trial": "a", "optim.lr": 0.25, "model.solver": "vcab3"},
    )
    assert _hparams_tab(tmp_path)["model.solver"] == ("DATA_TYPE_STRING", ["euler", "vcab3"])
    assert (
        hparams.write(
            str(tmp_path), later, _each(later, pareto.varying(later)), "test_accuracy", None
        )
        == 0
    )


def test_the_hparams_view_has_the_unconverged_share_that_the_pareto_tables_show(
    tmp_path, monkeypatch
):
    """The Pareto tables show each trial's share of unconverged test images beside its test
    NFE, as a trial whose solves stop short of z* looks cheap; the HParams view had no such
    measure, and an entry written before it gains it at the next report."""
    row = {"trial": "a", "completed": True, "config.optim.lr": 0.25, "test_accuracy": 0.75}
    row |= {"test_nfe": 5.0, "test_unconverged_fraction": 0.375}
    measures = tuple(m for m in hparams.MEASURES if m != pareto.UNCONVERGED)
    monkeypatch.setattr(hparams, "MEASURES", measures)
    assert (
        hparams.write(
            str(tmp_path), [row], _each([row], ["config.optim.lr"]), "test_accuracy", None
        )
        == 1
    )
    monkeypatch.undo()
    assert (
        hparams.write(
            str(tmp_path), [row], _each([row], ["config.optim.lr"]), "test_accuracy", None
        )
        == 1
    )
    assert len(list((tmp_path / hparams.FOLDER / "a").iterdir())) == 1
    assert _hparams_entry(tmp_path / hparams.FOLDER / "a")[0] == {
        "hparam/test_accuracy": 0.75,
        "hparam/test_nfe": 5.0,
        "hparam/test_unconverged_fraction": 0.375,
    }
    assert (
        hparams.write(
            str(tmp_path), [row], _each([row], ["config.optim.lr"]), "test_accuracy", None
        )
        == 0
    )


def test_each_hparams_measure_says_what_it_measures_and_in_which_unit(tmp_path):
    """The entries' measures are scalars of the experiment's TensorBoard too, each beside its
    chart with no description: hparam/train_time, a tag that no run writes, said neither that
    it is seconds per training step nor of which passes, nor that the unrolled warm-up's steps
    (which report pretrain_* times) are not among them; each now says, as the runs' do."""
    rows = [{"trial": "a", "completed": True, "config.optim.lr": 0.25, "test_accuracy": 0.75}]
    rows[0] |= {"test_top5_accuracy": 1.0, "test_nfe": 12.0, "train_time": 0.5}
    assert (
        hparams.write(str(tmp_path), rows, _each(rows, ["config.optim.lr"]), "test_accuracy", None)
        == 1
    )
    provider = tensorboard_data(tmp_path)
    (series,) = provider.list_scalars(
        tb_context.RequestContext(), experiment_id="", plugin_name="scalars"
    ).values()
    described = {tag: found.description for tag, found in series.items()}
    assert described["hparam/train_time"] == (
        "the trial's mean over its training steps past the unrolled warm-up "
        "(model.pretrain_steps): seconds per training step, the forward and backward passes "
        "of its solves (forward_time + backward_time)"
    )
    last = "the trial's last evaluation: "
    assert described["hparam/test_accuracy"] == last + reporting.DESCRIPTIONS["test_accuracy"]
    assert described["hparam/test_nfe"] == last + reporting.DESCRIPTIONS["test_nfe"]
    assert "fraction (0 to 1)" in described["hparam/test_top5_accuracy"]
    assert _hparams_entry(tmp_path / hparams.FOLDER / "a")[0] == {
        "hparam/test_accuracy": 0.75,
        "hparam/test_top5_accuracy": 1.0,
        "hparam/test_nfe": 12.0,
        "hparam/train_time": 0.5,
    }


def test_the_hparams_view_has_the_searchs_own_metric_and_cost(tmp_path):
    """A search for images a second against prediction time: the view listed accuracy, test
    NFE, the unconverged share and training time but neither of the searcher's objectives, so
    the view opened to compare its trials lacked the two it traded; an entry written before
    gains them at the next report, and a search whose objectives are among the fixed measures
    lists each once."""
    row = {"trial": "a", "completed": True, "config.optim.lr": 0.25, "test_accuracy": 0.75}
    row |= {"test_nfe": 12.0, "train_time": 0.5, "test_unconverged_fraction": 0.0}
    row |= {"images_per_second": 2048.0, "predict_time": 0.0625, "nfe": 30.0}
    settings = ["config.optim.lr"]
    assert (
        hparams.write(str(tmp_path), [row], _each([row], settings), "test_accuracy", "test_nfe")
        == 1
    )
    fixed = [f"hparam/{name}" for name in sorted(hparams.MEASURES) if name != "test_top5_accuracy"]
    assert sorted(_hparams_entry(tmp_path / hparams.FOLDER / "a")[0]) == fixed
    assert (
        hparams.write(
            str(tmp_path), [row], _each([row], settings), "images_per_second", "predict_time"
        )
        == 1
    )
    assert len(list((tmp_path / hparams.FOLDER / "a").iterdir())) == 1
    assert _hparams_entry(tmp_path / hparams.FOLDER / "a")[0] == {
        "hparam/test_accuracy": 0.75,
        "hparam/test_nfe": 12.0,
        "hparam/test_unconverged_fraction": 0.0,
        "hparam/train_time": 0.5,
        "hparam/images_per_second": 2048.0,
        "hparam/predict_time": 0.0625,
    }
    assert _hparams_tab(tmp_path)["measures"] == sorted(
        [*fixed, "hparam/images_per_second", "hparam/predict_time"]
    )
    assert (
        hparams.write(
            str(tmp_path), [row], _each([row], settings), "images_per_second", "predict_time"
        )
        == 0
    )


def test_every_metric_and_cost_a_search_may_rank_by_says_how_its_trial_sums_it_up(tmp_path):
    """Each metric and cost a search may optimise is in its entries with the words of the runs'
    scalar of that name, after how the trial's row sums up its reports: the last evaluation's
    test measures, the means over the steps past the unrolled warm-up of the solves' cost (those
    steps report pretrain_* instead), the means over all steps of the whole step's time, and
    the last report's training loss and accuracy."""
    rows = [
        {"trial": metric, "completed": True, "config.optim.lr": 0.25, metric: 0.5}
        for metric in METRICS
    ]
    for row in rows:
        assert (
            hparams.write(
                str(tmp_path), [row], _each([row], ["config.optim.lr"]), row["trial"], None
            )
            == 1
        )
    provider = tensorboard_data(tmp_path)
    listed = provider.list_scalars(
        tb_context.RequestContext(), experiment_id="", plugin_name="scalars"
    )
    described = {
        run.rsplit("/", 1)[-1]: {tag: found.description for tag, found in series.items()}
        for run, series in listed.items()
    }
    last = "the trial's last evaluation"
    solves = (
        "the trial's mean over its training steps past the unrolled warm-up (model.pretrain_steps)"
    )
    report = "the trial's last report, a mean over the steps since the report before"
    summed = dict.fromkeys(["test_accuracy", "test_top5_accuracy", "test_nfe"], last)
    summed |= {"predict_time": last, "train_loss": report, "train_accuracy": report}
    summed |= dict.fromkeys(["nfe", "forward_time", "backward_time"], solves)
    summed["step_time"] = "the trial's mean over all its training steps"
    summed["images_per_second"] = (
        "the trial's rate over all its training steps (their images over their time)"
    )
    assert described == {
        metric: {f"hparam/{metric}": f"{summed[metric]}: {reporting.DESCRIPTIONS[metric]}"}
        for metric in METRICS
    }


def _hparams_tab(logdir: Path) -> dict[str, object]:
    """What TensorBoard's HParams tab shows for `logdir`: each setting's type and range (or
    values), and the measures, as its backend works them out from the event files."""
    provider = tensorboard_data(logdir)
    backend = backend_context.Context(SimpleNamespace(data_provider=provider, logdir=str(logdir)))
    request = tb_context.RequestContext()
    found = backend.hparams_metadata(request, "")
    listed = backend.hparams_from_data_provider(request, "", 0)
    experiment = backend.experiment_from_metadata(request, "", True, found, listed)
    columns = {
        info.name: (
            api_pb2.DataType.Name(info.type),
            (info.domain_interval.min_value, info.domain_interval.max_value)
            if info.HasField("domain_interval")
            else sorted(v.string_value for v in info.domain_discrete.values),
        )
        for info in experiment.hparam_infos
    }
    return columns | {"measures": sorted(m.name.tag for m in experiment.metric_infos)}


def test_the_hparams_tab_types_and_measures_come_from_every_trial_not_one_of_them(tmp_path):
    """Anderson's memory drawn only where the solver is anderson (a conditional dimension):
    the trial without it leaves it out, and the column is a number from 3 to 5, where it was
    written as the text 'None' (a text column when the tab read that trial's types); each
    trial lacks one measure, and the tab has all five, where every entry declared the
    experiment and the tab took one trial's as the whole: its types, no range or values to
    filter by, and its measures alone."""
    rows = [
        {"trial": "a", "config.model.solver": "vcab3", "config.model.solver_options.m": None}
        | {"test_nfe": 8.0, "train_time": 0.25},
        {"trial": "b", "config.model.solver": "anderson", "config.model.solver_options.m": 5}
        | {"test_top5_accuracy": 0.75, "test_nfe": 6.0},
        {"trial": "c", "config.model.solver": "anderson", "config.model.solver_options.m": 3}
        | {"test_top5_accuracy": 1.0, "train_time": 0.5},
    ]
    done = {"completed": True, "test_accuracy": 0.5, "test_unconverged_fraction": 0.0}
    rows = [row | done for row in rows]
    assert (
        hparams.write(str(tmp_path), rows, _each(rows, pareto.varying(rows)), "test_accuracy", None)
        == 3
    )
    assert _hparams_tab(tmp_path) == {
        "trial": ("DATA_TYPE_STRING", ["a", "b", "c"]),
        "model.solver": ("DATA_TYPE_STRING", ["anderson", "vcab3"]),
        "model.solver_options.m": ("DATA_TYPE_FLOAT64", (3.0, 5.0)),
        "measures": [f"hparam/{name}" for name in sorted(hparams.MEASURES)],
    }
    assert _hparams_entry(tmp_path / hparams.FOLDER / "a")[1] == {
        "trial": "a",
        "model.solver": "vcab3",
    }


def _adjoint_search() -> tuple[spec.Experiment, dict[str, dict]]:
    """SEARCH with the adjoint drawn too, and three trials' configs as drawn: a labelled vanilla
    point, a vanilla and a skip_reg trial (which alone draws lambda_skip, and anderson's m)."""
    model = {**SEARCH["space"]["model"], "adjoint": {"choice": ["gmres", "jfb"]}}
    experiment = spec.from_dict("s", {**TINY, "search": {**SEARCH, "space": {"model": model}}})
    drawn = {
        "00000": {"variant": {"label": "Vanilla"}, "model": {"variant": "vanilla"}},
        "00001": {
            "model": {"variant": "vanilla", "solver": "vcab3", "abstol": 0.25, "adjoint": "gmres"}
        },
        "00002": {
            "model": {"variant": "skip_reg", "solver": "anderson", "abstol": 0.125}
            | {"adjoint": "jfb", "solver_options": {"m": 3}},
            "train": {"lambda_skip": 0.5},
        },
    }
    return experiment, drawn


def test_the_hparams_view_has_the_settings_each_trial_drew_at_their_drawn_values(tmp_path):
    """A search over variant, solver, abstol and adjoint that draws lambda_skip for skip_reg
    alone: the view took every setting that differed between trials, so the vanilla trial,
    which drew no lambda_skip, showed the base's 0.2 (inside the range a skip_reg trial draws
    from, filtered and plotted as if drawn), and the adjoint's options that a gmres adjoint
    implies (rtol 0.005, max_iters 15) showed as two searched columns; each entry now has the
    settings its trial drew, at their values, and an entry written before is written again."""
    experiment, drawn = _adjoint_search()
    frame = pd.DataFrame({"step": [10], "epoch": [100.0], "test_accuracy": [0.75]})
    rows = [
        results.trial_row(
            experiment, SimpleNamespace(trial_id=i, status="TERMINATED", config=c), frame
        )
        for i, c in drawn.items()
    ]
    folder = tmp_path / hparams.FOLDER
    assert (
        hparams.write(str(tmp_path), rows, _each(rows, pareto.varying(rows)), "test_accuracy", None)
        == 3
    )
    before = _hparams_entry(folder / rows[0]["trial"])[1]
    assert before["train.lambda_skip"] == 0.2
    assert (before["model.adjoint_options.rtol"], before["model.adjoint_options.max_iters"]) == (
        0.005,
        15,
    )
    assert (
        hparams.write(str(tmp_path), rows, results.drawn(experiment, rows), "test_accuracy", None)
        == 2
    )
    entries = [_hparams_entry(folder / row["trial"])[1] for row in rows]
    assert entries == [
        {"trial": rows[0]["trial"], "model.variant": "vanilla", "model.solver": "vcab3"}
        | {"model.abstol": 0.005, "model.adjoint": "gmres"},
        {"trial": rows[1]["trial"], "model.variant": "vanilla", "model.solver": "vcab3"}
        | {"model.abstol": 0.25, "model.adjoint": "gmres"},
        {"trial": rows[2]["trial"], "model.variant": "skip_reg", "model.solver": "anderson"}
        | {"model.abstol": 0.125, "model.adjoint": "jfb", "model.solver_options.m": 3}
        | {"train.lambda_skip": 0.5},
    ]
    assert (
        hparams.write(str(tmp_path), rows, results.drawn(experiment, rows), "test_accuracy", None)
        == 0
    )


def test_the_front_tables_show_each_trials_settings_where_it_drew_them():
    """The search of the HParams test above, its three trials on the test NFE front: the tables
    took their setting columns from every config column that differed between trials, so both
    vanilla trials read lambda_skip 0.2 (the base's, which only skip_reg trials draw) and the
    gmres ones the adjoint's rtol 0.005 and max_iters 15, which no dimension draws; a column now
    holds the values the trials drew, empty where a trial drew none, and the implied ones are
    gone."""
    experiment, drawn = _adjoint_search()
    measured = [(0.5, 4.0), (0.625, 8.0), (0.75, 16.0)]  # (test accuracy, test NFE)
    rows = [
        results.trial_row(
            experiment,
            SimpleNamespace(trial_id=i, status="TERMINATED", config=c),
            pd.DataFrame({"step": [10], "epoch": [100.0], "test_accuracy": [a], "test_nfe": [n]}),
        )
        for (i, c), (a, n) in zip(drawn.items(), measured, strict=True)
    ]
    marked = pareto.mark(rows, "test_accuracy")
    assert [row["config.train.lambda_skip"] for row in marked] == [0.2, 0.2, 0.5]
    text = pareto.markdown(marked, "test_accuracy", drawn=results.drawn(experiment, marked))
    nfe = text.split("## Pareto front")[1].splitlines()
    assert nfe[2:7] == [
        "| Trial | test_accuracy (%) | test NFE | training time per step (s) | unconverged (%) "
        "| variant | solver | adjoint | abstol | lambda_skip | m |",
        "|" + " --- |" * 11,
        "| Vanilla | 50.00 | 4 | - | - | vanilla | vcab3 | gmres | 0.005 |  |  |",
        "| 00001 | 62.50 | 8 | - | - | vanilla | vcab3 | gmres | 0.25 |  |  |",
        "| 00002 | 75.00 | 16 | - | - | skip_reg | anderson | jfb | 0.125 | 0.5 | 3 |",
    ]
    assert pareto.NOT_DRAWN_NOTE in text


def test_a_front_table_whose_trials_drew_every_setting_has_no_note_on_empty_cells():
    """The note on empty setting cells is for a trial that did not draw a setting: where every
    trial drew each column, as the solver of two trials that both drew one, it is not there."""
    rows = _trials((True, 0.9, 20.0, 0.1), (True, 0.8, 10.0, 0.2))
    drawn = {row["trial"]: ["config.model.solver"] for row in rows}
    text = pareto.markdown(pareto.mark(rows, "test_accuracy"), "test_accuracy", drawn=drawn)
    assert "| 9db77_00000 | 90.00 | 20 | 0.1 | - | euler |" in text
    assert pareto.NOT_DRAWN_NOTE not in text


def test_a_trial_drew_a_rules_settings_only_where_it_meets_every_key_of_its_when():
    """A rule drawing lambda_skip for vcab3 skip_reg trials: a vcab3 vanilla trial meets one of
    its two keys and drew no lambda_skip; a `when` written as the text '1e-3' (as YAML reads
    it) is met by a trial's learning rate 0.001; a variant's label is no setting it drew."""
    space = {"model.solver": {"choice": ["vcab3", "tsit5"]}}
    space["model.variant"] = {"choice": ["vanilla", "skip_reg"]}
    both = {"model.solver": "vcab3", "model.variant": "skip_reg"}
    rule = {"when": both, "space": {"train.lambda_skip": {"uniform": [0.1, 1.0]}}}
    search = {"searcher": "tpe", "space": space, "conditional": [rule]}
    experiment = spec.from_dict("s", {**TINY, "search": search})
    vanilla = {"model.solver": "vcab3", "model.variant": "vanilla", "train.lambda_skip": 0.2}
    assert experiment.drawn(vanilla) == ["model.solver", "model.variant"]
    assert experiment.drawn(vanilla | both) == [*both, "train.lambda_skip"]
    text = {"when": {"optim.lr": "1e-3"}, "space": {"model.abstol": {"uniform": [1e-3, 1e-2]}}}
    search = {"searcher": "tpe", "space": {"optim.lr": {"choice": [1e-3, 1e-2]}}}
    experiment = spec.from_dict("s", {**TINY, "search": search | {"conditional": [text]}})
    assert experiment.drawn({"optim.lr": 0.001, "model.abstol": 0.005}) == [
        "optim.lr",
        "model.abstol",
    ]
    variants = [{"label": "A", "model.solver": "tsit5"}, {"label": "B", "model.solver": "bs3"}]
    experiment = spec.from_dict("s", {**TINY, "search": {"variants": variants}})
    assert experiment.drawn({"label": "A", "model.solver": "tsit5"}) == ["model.solver"]


def test_variants_that_two_overrides_drop_in_turn_are_named_at_their_places_in_the_file():
    """Of four variants, model.variant=skip_reg keeps 1 to 3 and model.solver=vcab3 then 2 and
    3: the bad variant 3 is refused as search.variants[3], where the file has it, not by its
    place among those the first override kept."""
    rows = [
        {"model.variant": "vanilla", "model.solver": "bs3"},
        {"model.variant": "skip_reg", "model.solver": "bs3"},
        {"model.variant": "skip_reg", "model.solver": "vcab3"},
        {"model.variant": "skip_reg", "model.solver": "vcab3", "model.abstol": -1.0},
    ]
    overrides = {"model.variant": "skip_reg", "model.solver": "vcab3"}
    with pytest.raises(ConfigError) as err:
        spec.from_dict("s", {**TINY, "search": {"variants": rows}}, overrides)
    assert str(err.value) == "search.variants[3]: model.abstol: must be >= 0, got -1.0"
    assert err.value.key == "search.variants[3]"


def test_the_report_writes_the_settings_each_trial_drew_and_the_searchs_cost(tmp_path, monkeypatch):
    """The report of the search above, priced by prediction time: results.md's front tables
    leave empty the settings a trial did not draw, and each HParams entry has the search's
    cost beside the fixed measures."""
    experiment, drawn = _adjoint_search()
    experiment = replace(experiment, search=replace(experiment.search, cost="predict_time"))
    path = tmp_path / "s"
    trials = [
        SimpleNamespace(trial_id=i, status="TERMINATED", config=c, path=str(path / i))
        for i, c in drawn.items()
    ]
    for trial, (accuracy, nfe) in zip(trials, [(0.5, 4.0), (0.625, 8.0), (0.75, 16.0)]):
        Path(trial.path).mkdir(parents=True)
        report = {"step": 10, "epoch": 100.0, "test_accuracy": accuracy, "test_nfe": nfe}
        write_reports(Path(trial.path, archive.RESULT_FILE), [report | {"predict_time": nfe / 8}])
    monkeypatch.setattr(results, "RecordedExperiment", lambda given: SimpleNamespace(trials=trials))
    monkeypatch.setattr(results, "plot", lambda *args: b"")  # figures: not what this checks
    monkeypatch.setattr(pareto, "chart", lambda *args: b"")
    table = results.report(str(path), experiment)
    assert "| Vanilla | 50.00 | 4 | - | 0.5 | - | vanilla | vcab3 | gmres | 0.005 |  |  |" in table
    assert pareto.NOT_DRAWN_NOTE in table
    measures, _ = _hparams_entry(path / hparams.FOLDER / spec.trial_name(trials[2]))
    assert measures["hparam/predict_time"] == 2.0


def test_a_killed_search_resumes_with_its_searchers_history_and_repeats_no_trial(
    ray_cluster, tmp_path
):
    settings = TINY | {
        "train": {"epochs": 1, "max_steps": 6, "report_every": 3},
        "search": {
            "searcher": "tpe",
            "cost": "test_nfe",
            "num_samples": 4,
            "max_concurrent_trials": 1,
            "variants": [{"label": "paper", "model.solver": "vcab3"}],
            "space": {
                "model": {
                    "solver": {"choice": ["vcab3", "euler", "fixed_point"]},
                    "abstol": {"loguniform": [1e-3, 1e-1]},
                }
            },
        },
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(settings))
    argv = [str(tmp_path / "s.yaml"), "--storage", str(tmp_path / "runs")]
    experiment = tmp_path / "runs" / "s"
    earlier = _alive_actors(ray_cluster)
    driver = _tune(argv)
    deadline = time.monotonic() + 400
    while len(_finished(experiment)) < 2 or not list(experiment.glob("searcher-state-*.pkl")):
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "two trials did not finish in time"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    _wait_for_the_end_of(_alive_actors(ray_cluster) - earlier, ray_cluster)
    before = _finished(experiment)

    resumed = _tune([*argv, "--resume"])
    output = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0, output[-3000:]
    rows = pq.read_table(experiment / "results.parquet").to_pylist()
    assert len(rows) == 4 and before <= {row["trial"] for row in rows}
    assert all(row["status"] == "TERMINATED" for row in rows)
    drawn = [(row["config.model.solver"], row["config.model.abstol"]) for row in rows]
    assert len(set(drawn)) == 4  # no trial repeated
    state = max(experiment.glob("searcher-state-*.pkl"))  # the resumed session's
    study = pickle.loads(state.read_bytes())["_ot_study"]
    told = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(told) == 4 and all(len(t.values) == 2 for t in told)
    assert {(t.params["model/solver"], t.params["model/abstol"]) for t in told} == set(drawn)
    assert any(row["pareto_test_nfe"] for row in rows)
    assert "## Pareto front: test_accuracy against test NFE" in output
    assert len(list((experiment / "hparams").iterdir())) == 4


def test_a_searcher_reads_its_objectives_from_the_last_report_only():
    experiment = spec.from_dict("s", {**TINY, "search": SEARCH | {"cost": None}})
    limiter = search.searcher(experiment.space(), experiment.search, seed=0, bound=lambda: 2)
    optuna_search = limiter.searcher
    config = optuna_search.suggest("t0")
    assert config["variant"] == {"label": "Vanilla"}
    optuna_search.on_trial_result("t0", {"step": 3, "training_iteration": 1})  # no test metrics
    optuna_search.on_trial_complete("t0", {"test_accuracy": 0.9, "step": 6})
    (trial,) = optuna_search._ot_study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert trial.values == [0.9] and trial.params["model/solver"] == "vcab3"


CLUSTER = {"trials": 3}


def cluster_trials() -> int:
    """The trials the cluster holds now (a function pickled by reference, as Tune's bound is)."""
    return CLUSTER["trials"]


def test_a_restored_searcher_lets_in_as_many_trials_as_the_cluster_holds_now(monkeypatch):
    """Tune restores a search by unpickling the limiter pickled at its first start: a cluster
    grown from 3 trials to 5 since then lets 5 in after the resume, and the searcher keeps the
    trials it suggested."""
    experiment = spec.from_dict("s", {**TINY, "search": SEARCH})
    limiter = search.searcher(experiment.space(), experiment.search, seed=0, bound=cluster_trials)
    assert limiter.max_concurrent == 3
    limiter.suggest("t0")
    saved = ray.cloudpickle.dumps(limiter)
    monkeypatch.setitem(CLUSTER, "trials", 5)
    restored = ray.cloudpickle.loads(saved)
    assert restored.max_concurrent == 5 and set(restored.live_trials) == {"t0"}


def test_a_search_resumed_from_its_saved_state_lets_in_as_many_trials_as_the_cluster_holds_now(
    tmp_path, monkeypatch
):
    """A resume restores the search from the state Tune saved in the experiment's folder, which
    held the bound of the first start: a cluster grown from 3 trials to 5 since then lets 5 in
    after the resume, and the searcher keeps the trials it suggested."""
    experiment = spec.from_dict("s", {**TINY, "search": SEARCH})
    started = ray.tune.search.SearchGenerator(
        search.searcher(experiment.space(), experiment.search, seed=0, bound=cluster_trials)
    )
    started.searcher.suggest("t0")
    started.save_to_dir(str(tmp_path), "2026-01-01_00-00-00")
    monkeypatch.setitem(CLUSTER, "trials", 5)
    resumed = ray.tune.search.SearchGenerator(
        search.searcher(experiment.space(), experiment.search, seed=0, bound=cluster_trials)
    )
    resumed.restore_from_dir(str(tmp_path))
    assert resumed.searcher.max_concurrent == 5 and set(resumed.searcher.live_trials) == {"t0"}


def test_a_search_maximises_its_metric_minimises_its_cost_and_repeats_its_draws_per_seed():
    """The study's directions: test accuracy up and the cost down (a cost maximised would
    hunt for the slowest solvers); a searcher of the same seed suggests the same trials after
    the paper's points, another seed others, so that a search can be repeated."""
    experiment = spec.from_dict("s", {**TINY, "search": SEARCH})

    def suggestions(seed: int) -> tuple[list, list[dict]]:
        limiter = search.searcher(experiment.space(), experiment.search, seed, bound=lambda: 8)
        drawn = [limiter.searcher.suggest(f"t{i}") for i in range(5)]
        return limiter.searcher._ot_study.directions, drawn

    directions, drawn = suggestions(0)
    assert directions == [
        optuna.study.StudyDirection.MAXIMIZE,
        optuna.study.StudyDirection.MINIMIZE,
    ]
    assert [d["variant"] for d in drawn[:2]] == [{"label": "Vanilla"}, {"label": "Anderson"}]
    assert suggestions(0)[1] == drawn
    assert suggestions(1)[1][2:] != drawn[2:]


def _drawn_through_optuna(space: search.Space, count: int) -> list[optuna.trial.FrozenTrial]:
    """`count` trials of a random-sampling study, each asked through the define-by-run space."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(count):
        trial = study.ask()
        space(trial)
        study.tell(trial, 0.0)
    return study.trials


def test_a_searcher_draws_log_ranges_on_a_log_scale_and_quantized_ones_on_their_steps():
    ranges = {
        "optim.lr": {"loguniform": [1e-4, 1e-1]},
        "train.epochs": {"qrandint": [2, 10, 2]},
        "model.abstol": {"quniform": [0.01, 0.05, 0.01]},
    }
    space = spec.from_dict("s", {**TINY, "search": {"searcher": "tpe", "space": ranges}}).space()
    trials = _drawn_through_optuna(space, 30)
    lr, epochs, abstol = (
        [t.params[name] for t in trials] for name in ("optim/lr", "train/epochs", "model/abstol")
    )
    assert set(epochs) <= {2, 4, 6, 8, 10} and len(set(epochs)) > 2
    assert all(abs(a * 100 - round(a * 100)) < 1e-9 and 0.01 <= a <= 0.05 for a in abstol)
    # On a log scale two thirds of the draws lie below 1e-2, on a linear one a tenth.
    assert sum(r < 1e-2 for r in lr) >= 15
    assert search.lines(space)[:2] == [
        "optim.lr: log float [0.0001, 0.1]",
        "train.epochs: int [2, 10] step 2",
    ]


def test_the_space_in_words_gives_the_step_of_a_quantized_dimension():
    """A qrandint [2, 10] with q 2 read "int [2, 10]", every integer to the eye, where the
    searcher draws 2, 4, 6, 8 and 10 alone; the words now give the step of a quantized range."""
    ranges = {
        "train.epochs": {"qrandint": [2, 10, 2]},
        "train.lambda_skip": {"quniform": [0.01, 0.05, 0.01]},
        "train.report_every": {"randint": [1, 5]},
        "optim.grad_clip": {"quniform": [0, 5, 1]},
    }
    raw = {**TINY, "search": {"searcher": "tpe", "space": ranges}}
    assert search.lines(spec.from_dict("s", raw).space()) == [
        "train.epochs: int [2, 10] step 2",
        "train.lambda_skip: float [0.01, 0.05] step 0.01",
        "train.report_every: int [1, 4]",
        "optim.grad_clip: float [0, 5] step 1",
    ]


def test_a_rule_applies_only_when_every_key_of_its_when_holds():
    rule = {
        "when": {"model.solver": "anderson", "model.variant": "skip_reg"},
        "space": {"model.solver_options.m": {"randint": [2, 9]}},
    }
    raw = {**TINY, "search": SEARCH | {"variants": [], "conditional": [rule]}}
    trials = _drawn_through_optuna(spec.from_dict("s", raw).space(), 40)
    both = [
        t.params["model/solver"] == "anderson" and t.params["model/variant"] == "skip_reg"
        for t in trials
    ]
    assert [("model/solver_options/m" in t.params) for t in trials] == both
    assert 0 < sum(both) < sum(t.params["model/solver"] == "anderson" for t in trials)


def test_a_rule_may_depend_on_a_dimension_of_an_earlier_rule():
    rules = [
        {"when": {"model.solver": "anderson"}, "space": {"model.variant": {"choice": ["skip"]}}},
        {"when": {"model.variant": "skip"}, "space": {"train.lambda_skip": {"uniform": [0, 1]}}},
    ]
    space = {"model.solver": {"choice": ["vcab3", "anderson"]}}
    raw = {**TINY, "search": {"searcher": "tpe", "space": space, "conditional": rules}}
    trials = _drawn_through_optuna(spec.from_dict("s", raw).space(), 10)
    anderson = [t.params["model/solver"] == "anderson" for t in trials]
    assert [("train/lambda_skip" in t.params) for t in trials] == anderson and any(anderson)


def test_a_search_may_have_as_many_samples_as_points_and_unlabelled_points_are_numbered():
    """Each point is a group of its own in the results, so unlabelled ones get their index."""
    variants = [{"model.variant": "vanilla"}, {"model.variant": "skip_reg"}]
    raw = {**TINY, "search": SEARCH | {"num_samples": 2, "variants": variants}}
    labels = [draw["variant"]["label"] for draw in spec.expand(spec.from_dict("s", raw))]
    assert labels == ["point 0", "point 1"]


def test_the_samplers_take_the_searchs_population_and_a_constant_liar():
    """NSGA-II's generation is `population_size` (0: Optuna's 50); TPE models the dimensions
    jointly, conditional ones in groups, and counts running trials as bad (constant liar)."""
    section = spec.from_dict("s", {**TINY, "search": SEARCH}).search
    nsga2 = replace(section, searcher="nsga2", population_size=6)
    assert search.sampler(nsga2, seed=0)._population_size == 6
    assert search.sampler(replace(nsga2, population_size=0), seed=0)._population_size == 50
    tpe = search.sampler(section, seed=0)
    assert (tpe._multivariate, tpe._group, tpe._constant_liar) == (True, True, True)


def test_nsga2s_first_generation_holds_the_papers_points_so_it_breeds_from_them():
    """NSGA-II left the points out of every generation (Optuna records a trial's generation as
    it samples a value the trial is not given, and a point is given all), so it never bred from
    them and its first generation was the 4 draws after the 2 points, where the dry run says
    that trials 5 on are bred."""
    raw = {**TINY, "search": SEARCH | {"searcher": "nsga2", "population_size": 4}}
    experiment = spec.from_dict("s", raw)
    optuna_search = search.searcher(experiment.space(), experiment.search, 0, lambda: 8).searcher
    for i in range(6):
        optuna_search.suggest(f"t{i}")
        optuna_search.on_trial_complete(f"t{i}", {"test_accuracy": 0.9, "test_nfe": 10.0 - i})
    study = optuna_search._ot_study
    first = [trial.number for trial in study.sampler.get_population(study, 0)]
    assert first == [0, 1, 2, 3] and search.first_learned(experiment.search) == 4


def test_a_searcher_suggests_no_more_trials_at_once_than_its_limit():
    experiment = spec.from_dict("s", {**TINY, "search": SEARCH})
    limiter = search.searcher(experiment.space(), experiment.search, seed=0, bound=lambda: 1)
    assert limiter.suggest("t0")["variant"] == {"label": "Vanilla"}
    assert limiter.suggest("t1") is None  # until t0 ends
    limiter.on_trial_complete("t0", {"test_accuracy": 0.9, "test_nfe": 8.0})
    assert limiter.suggest("t1")["variant"] == {"label": "Anderson"}


def test_a_dry_run_draws_from_the_experiments_seed():
    """The same seed draws the same trials and another seed others, with random sampling and
    with a searcher (after its points)."""
    space = {"optim.lr": {"loguniform": [1e-4, 1e-1]}}

    def rates(seed: int, searcher: str) -> list[float]:
        raw = {**TINY, "seed": seed, "search": {"searcher": searcher, "space": space}}
        return [draw["optim"]["lr"] for draw in spec.expand(spec.from_dict("s", raw), 3)]

    for searcher in ("random", "tpe"):
        assert rates(1, searcher) == rates(1, searcher) != rates(2, searcher)


def test_a_searcher_over_a_choice_of_whole_sections_draws_them_without_warnings(recwarn):
    """Optuna warns at each categorical of dicts that persistent storage needs plain values; a
    search keeps its study in memory (and Tune pickles it), so the draws are right and the
    lines noise: one per choice per draw, on every dry run and trial."""
    sections = [{"optimizer": "adam", "lr": 0.001}, {"optimizer": "sgd", "lr": 0.1}]
    raw = {**TINY, "search": {"searcher": "tpe", "space": {"optim": {"choice": sections}}}}
    draws = spec.expand(spec.from_dict("s", raw), 6)
    assert {d["optim"]["optimizer"] for d in draws} == {"adam", "sgd"}
    assert [str(w.message) for w in recwarn if "categorical" in str(w.message)] == []


def _trials(*points: tuple[bool, float, float, float]) -> list[dict]:
    """Results rows of trials (completed, test_accuracy, test_nfe, train_time) that searched
    the solver (euler, then bs3, ...) at one learning rate."""
    solvers = ["euler", "bs3", "vcab3", "tsit5"]
    return [
        {"trial": f"9db77_0000{i}", "group": f"t{i}", "completed": done, "config.optim.lr": 0.001}
        | {"config.model.solver": solvers[i], "config.name": "train"}
        | {"test_accuracy": accuracy, "test_nfe": nfe, "train_time": time}
        for i, (done, accuracy, nfe, time) in enumerate(points)
    ]


def test_an_experiment_without_finished_trials_takes_its_front_over_all_of_them():
    marked = pareto.mark(_trials((False, 0.9, 20.0, 0.1), (False, 0.8, 10.0, 0.2)), "test_accuracy")
    assert [r["pareto_test_nfe"] for r in marked] == [True, True]
    assert [r["pareto_train_time"] for r in marked] == [True, False]
    assert [r["cheapest_test_nfe"] for r in marked] == [True, False]


def test_a_front_trial_without_the_other_view_s_cost_shows_a_dash_not_nan():
    """A trial whose steps all unrolled has a test NFE but no training time per step: on the
    NFE front its time cell reads '-', as a missing setting does."""
    rows = _trials((True, 0.9, 20.0, math.nan), (True, 0.8, 10.0, 0.2))
    text = pareto.markdown(pareto.mark(rows, "test_accuracy"), "test_accuracy")
    assert "| 9db77_00000 | 90.00 | 20 | - | - | euler |" in text and "nan" not in text


def test_the_front_table_lists_the_cheapest_first_with_the_settings_that_vary_only():
    rows = _trials((True, 0.9, 20.0, 0.1), (True, 0.8, 10.0, 0.2), (True, 0.95, 30.0, 0.3))
    text = pareto.markdown(pareto.mark(rows, "test_accuracy"), "test_accuracy")
    nfe = text.split("## Pareto front: test_accuracy against training time per step (s)")[0]
    header = (
        "| Trial | test_accuracy (%) | test NFE | training time per step (s) | unconverged (%) "
        "| solver |"
    )
    assert header in nfe
    assert [line.split(" | ")[2] for line in nfe.splitlines() if line.startswith("| 9db77")] == [
        "10",
        "20",
        "30",
    ]


def test_the_front_tables_show_each_trial_s_share_of_unconverged_test_solves():
    """A trial whose test solves end at max_steps looks cheap on a front without being at its
    equilibrium, and the tables did not say so: each front row now gives the last
    evaluation's test_unconverged_fraction in percent (1 of 300 images: 0.333; 60 of 300: 20),
    '-' for a trial that reported none."""
    rows = _trials((True, 0.9, 20.0, 0.1), (True, 0.8, 5.0, 0.2), (True, 0.85, 10.0, 0.05))
    for row, unconverged in zip(rows, (1 / 300, 60 / 300, None), strict=True):
        if unconverged is not None:
            row["test_unconverged_fraction"] = unconverged
    text = pareto.markdown(pareto.mark(rows, "test_accuracy"), "test_accuracy")
    nfe, time = text.split("## Pareto front")[1:]
    header = "| test NFE | training time per step (s) | unconverged (%) |"
    assert header in nfe and header in time
    assert [line.split(" | ")[4] for line in nfe.splitlines() if line.startswith("| 9db77")] == [
        "20",
        "-",
        "0.333",
    ]
    assert [line.split(" | ")[4] for line in time.splitlines() if line.startswith("| 9db77")] == [
        "-",
        "0.333",
    ]


def test_the_chart_shows_a_front_point_exactly_zoom_points_below_the_best():
    best = 100.0
    assert pareto._shown({"pareto_c": True}, "c", best - pareto.ZOOM_POINTS, best)
    assert not pareto._shown({"pareto_c": True}, "c", best - pareto.ZOOM_POINTS - 0.5, best)
    assert not pareto._shown({"pareto_c": False}, "c", best, best)


def test_the_chart_legend_names_only_what_a_panel_draws(monkeypatch):
    """An interrupted run: the paper's Skip DEQ failed before its first report, so no panel
    draws it and the legend leaves it out; the Vanilla DEQ has a test NFE only, and is named
    though only the first panel draws it."""
    monkeypatch.setattr(pareto, "png", lambda figure: figure)
    rows = _trials((False, 0.9, 20.0, 0.1), (False, 0.8, 10.0, math.nan), (False, *[math.nan] * 3))
    rows[1] |= {"paper": True, "group": "Vanilla DEQ"}
    rows[2] |= {"paper": True, "group": "Skip DEQ"}
    figure = pareto.chart(pareto.mark(rows, "test_accuracy"), "test_accuracy")
    legend = figure.legends[0] if figure.legends else figure.axes[-1].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == [
        "trial",
        "Vanilla DEQ",
        "Pareto front",
    ]
    assert [len(collection.get_offsets()) for collection in figure.axes[1].collections] == [1]


@pytest.mark.parametrize(
    ("rows", "said"),
    [
        # Every trial failed before its first report: both panels were bare 0-1 axes.
        (
            _trials((False, math.nan, math.nan, math.nan), (False, math.nan, math.nan, math.nan)),
            ["no trial reported test_accuracy", "no trial reported test_accuracy"],
        ),
        # One trial, its steps all unrolled: a test NFE and no training time per step.
        (
            _trials((True, 0.9, 20.0, math.nan)),
            [None, "no trial reported training time per step (s)"],
        ),
        (
            _trials((True, 0.9, math.nan, 0.1), (True, math.nan, 20.0, 0.1)),
            ["no trial reported both test_accuracy and test NFE", None],
        ),
    ],
)
def test_a_pareto_panel_without_a_point_says_what_no_trial_reported(monkeypatch, rows, said):
    monkeypatch.setattr(pareto, "png", lambda figure: figure)
    figure = pareto.chart(pareto.mark(rows, "test_accuracy"), "test_accuracy")
    for axes, text in zip(figure.axes, said, strict=True):
        assert [t.get_text() for t in axes.texts] == ([] if text is None else [text])
        assert axes.axison == (text is None)
        assert len(axes.collections) == (text is None)  # the one trial's point, or none
    legends = [axes.get_legend() for axes in figure.axes if axes.get_legend()]
    assert [len(legend.get_texts()) for legend in legends] == ([] if None not in said else [2])


def test_a_front_table_without_a_trial_says_what_no_trial_reported():
    """Every trial failed before its first report: each front table was a bare header; it now
    says what none reported, and a view whose front holds a trial says nothing of the kind."""
    failed = _trials((False, math.nan, math.nan, math.nan), (False, math.nan, math.nan, math.nan))
    text = pareto.markdown(pareto.mark(failed, "test_accuracy"), "test_accuracy")
    assert text.count("\nNo front: no trial reported test_accuracy.\n") == 2
    untimed = pareto.mark(_trials((True, 0.9, 20.0, math.nan)), "test_accuracy")
    nfe, time = pareto.markdown(untimed, "test_accuracy").split("## Pareto front")[1:]
    assert "No front" not in nfe
    assert "No front: no trial reported training time per step (s)." in time


def test_a_cost_spanning_decades_is_drawn_on_a_log_axis(monkeypatch):
    """Training times from 1e-3 to 1e-1 s on a linear axis crushed every cheap trial, the front
    among them, into the left edge: that panel is logarithmic, and test NFE from 5 to 60 is
    not."""
    monkeypatch.setattr(pareto, "png", lambda figure: figure)
    rows = _trials((True, 0.9, 5.0, 0.001), (True, 0.95, 20.0, 0.003), (True, 0.97, 60.0, 0.1))
    figure = pareto.chart(pareto.mark(rows, "test_accuracy"), "test_accuracy")
    assert [axes.get_xscale() for axes in figure.axes[:2]] == ["linear", "log"]


def test_a_cost_axis_is_logarithmic_from_a_span_of_exactly_log_span(monkeypatch):
    """The test NFE axis turns logarithmic at a span of LOG_SPAN itself (20), not just past it."""
    monkeypatch.setattr(pareto, "png", lambda figure: figure)
    scales = []
    for top in (0.95 * LOG_SPAN, LOG_SPAN):
        rows = _trials((True, 0.9, 1.0, 0.01), (True, 0.95, top, 0.01))
        figure = pareto.chart(pareto.mark(rows, "test_accuracy"), "test_accuracy")
        scales.append(figure.axes[0].get_xscale())
    assert scales == ["linear", "log"]


def test_a_trial_without_a_measure_is_never_on_the_front_or_the_cheapest():
    """A trial that reported no test NFE (it failed before its evaluation) costs nothing known,
    not nothing."""
    rows = _trials((True, 0.9, 20.0, 0.1), (True, 0.95, 30.0, 0.2))
    rows.append(rows[0] | {"trial": "9db77_00002", "test_nfe": None, "test_accuracy": 0.99})
    marked = pareto.mark(rows, "test_accuracy")
    assert [r["pareto_test_nfe"] for r in marked] == [True, True, False]
    assert [r["cheapest_test_nfe"] for r in marked] == [False, True, False]


def test_a_searcher_refuses_a_quantized_log_range_that_optuna_would_draw_unrounded():
    """Optuna has no quantized log distribution: Tune's conversion drops q and a searcher would
    draw off the steps that qloguniform declares (0.000123... for q = 1e-4)."""
    space = {"optim.lr": {"qloguniform": [1e-4, 1e-1, 1e-4]}}
    raw = {**TINY, "search": {"searcher": "tpe", "space": space}}
    with pytest.raises(ConfigError, match=r"^search.space.optim.lr.qloguniform: ") as err:
        spec.from_dict("s", raw)
    assert "loguniform" in str(err.value).split(": ", 1)[1] and "\n" not in str(err.value)
    random = {**TINY, "search": {"space": space, "num_samples": 20}}
    drawn = [d["optim"]["lr"] for d in spec.expand(spec.from_dict("s", random))]
    assert all(abs(lr / 1e-4 - round(lr / 1e-4)) < 1e-6 for lr in drawn)


def test_a_searcher_refuses_a_quantized_integer_range_that_optuna_would_draw_otherwise():
    """Tune's qrandint [1, 9] with q 4 draws 4 and 8 (multiples of q), Optuna 1, 5 and 9 (steps
    from the lower bound); at q 1 Tune leaves out the upper bound and Optuna draws it. Both
    are refused under a searcher; [0, 8] with q 4 draws 0, 4 and 8 under either."""
    for bounds, message in [
        ([1, 9, 4], "lower bound 1 is not a multiple of q = 4"),
        ([1, 5, 1], "q = 1 leaves out 5 under searcher random and draws it under Optuna"),
    ]:
        space = {"train.max_steps": {"qrandint": bounds}}
        raw = {**TINY, "search": {"searcher": "tpe", "space": space}}
        with pytest.raises(ConfigError, match=r"^search.space.train.max_steps.qrandint: ") as err:
            spec.from_dict("s", raw)
        assert message in str(err.value) and "\n" not in str(err.value)
    space = {"optim.lr": {"quniform": [0.1, 0.2, 0.1]}, "train.max_steps": {"qrandint": [0, 8, 4]}}
    dist = search.distribution("search.space.train.max_steps", space["train.max_steps"])
    assert (dist.low, dist.high, dist.step) == (0, 8, 4)
    tune_draws = {
        d["train"]["max_steps"]
        for d in spec.expand(
            spec.from_dict("s", {**TINY, "search": {"space": space, "num_samples": 40}})
        )
    }
    assert tune_draws == {0, 4, 8}


def test_a_paper_point_runs_a_conditional_solver_option_at_the_solvers_default():
    """mnist_search draws Broyden's memory only with Broyden: its Discrete DEQ points leave it
    unset, as Table 1's rows do, so they run at Broyden's own memory of 30, not at a draw."""
    from raydeq.solvers.discrete import Broyden

    experiment = spec.load("mnist_search")
    points = [d for d in spec.expand(experiment, 6) if "Discrete" in d["variant"]["label"]]
    assert len(points) == 3
    for drawn in points:
        cfg = experiment.trial_config(drawn)
        assert cfg.model.solver == "broyden"
        assert cfg.model.solver_options == {"memory": 30} and Broyden().memory == 30


@pytest.mark.parametrize("name", ["digits_search", "mnist_search"])
def test_the_dense_searches_draw_no_lambda_skip_that_makes_skip_reg_explicit(name):
    """Above 0.2, mnist_dense's default, the skip loss drives the dense Skip Reg. DEQ's
    relu(W1 z*) to zero (at 7.0 in every unit: f(z, x) = relu(W2 x), 2 NFE), so its trials led
    the front as explicit layers; the range ends at the default, which digits_search's points
    take, so that no point lies outside it."""
    (rule,) = [r for r in spec.load(name).search.conditional if "train.lambda_skip" in r["space"]]
    assert rule["when"] == {"model.variant": ["skip", "skip_reg"]}
    assert rule["space"]["train.lambda_skip"] == {"loguniform": [1e-3, 0.2]}
    assert PRESETS["mnist_dense"].lambda_skip == 0.2


@pytest.mark.parametrize("name", ["cifar10_small_search", "imagenet"])
def test_the_multiscale_searches_draw_no_lambda_skip_that_leaves_skip_reg_unsolved(name):
    """At 1.0 mnist_mdeq's Skip Reg. DEQ learned f(0, x) as its fixed point: its prediction met
    the tolerance for every test digit, so its 2 NFE ran no solver step; at 0.1 none did."""
    (rule,) = [r for r in spec.load(name).search.conditional if "train.lambda_skip" in r["space"]]
    assert rule["space"]["train.lambda_skip"] == {"loguniform": [1e-3, 0.1]}


def test_num_samples_on_the_command_line_is_refused_below_the_points_as_in_the_file(capsys):
    """mnist_search's six paper points go first: --num-samples 2 would run two of them and
    leave the other four off the chart, which `search.num_samples: 2` is refused for."""
    assert rt.main(["mnist_search", "--num-samples", "2", "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        "error: --num-samples: 2 is fewer than the 6 variants the search evaluates first\n"
    )
    assert rt.main(["mnist_search", "--num-samples", "6", "--dry-run"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6


def test_a_bad_value_in_an_experiment_file_names_the_file(tmp_path):
    """An experiment's bad value named its key alone, not the file that held it."""
    path = tmp_path / "exp.yaml"
    path.write_text("search:\n  space:\n    optim.lr: {uniform: [0.2, 0.1]}\n")
    with pytest.raises(ConfigError) as err:
        spec.load(str(path))
    assert str(err.value) == (
        f"search.space.optim.lr.uniform: the lower bound 0.2 must be below 0.1 (in {path})"
    )
    with pytest.raises(ConfigError, match=r"^optim.lr: must be > 0, got -1.0$"):
        spec.load(str(path), ["optim.lr=-1"])


def test_an_override_matches_a_variants_number_written_as_text():
    """A variant's lr written '1e-3' (quoted, text) trains at 0.001, but the override
    optim.lr=1e-3 found no variant of that value; numbers are now compared as numbers."""
    variants = [{"label": "a", "optim.lr": "1e-3"}, {"label": "b", "optim.lr": 0.01}]
    raw = {"data": {"dataset": "fake"}, "search": {"variants": variants}}
    experiment = spec.from_dict("x", raw, parse_overrides(["optim.lr=1e-3"]))
    assert [row["label"] for row in experiment.search.variants] == ["a"]
    assert experiment.trial_config({"variant": experiment.search.variants[0]}).optim.lr == 1e-3
    with pytest.raises(ConfigError, match="^optim.lr=0.002: no variant of search.variants"):
        spec.from_dict("x", raw, {"optim.lr": 0.002})


def test_a_rules_number_written_as_text_holds_for_that_number_as_an_override_finds_it():
    """A rule's when optim.lr '1e-3' (quoted, text) was refused as no choice of [0.001, 0.01],
    where the override optim.lr=1e-3 resolved the same rule as holding (a variant so written
    was no choice either); the rule now holds for the trials that draw 0.001 alone, and the
    variant is the point 0.001."""
    rule = {"when": {"optim.lr": ["1e-3"]}, "space": {"optim.weight_decay": {"uniform": [0, 1]}}}
    space = {"optim.lr": {"choice": [1e-3, 1e-2]}}
    raw = {**TINY, "search": {"searcher": "tpe", "space": space, "conditional": [rule]}}
    trials = _drawn_through_optuna(spec.from_dict("s", raw).space(), 20)
    low = [t.params["optim/lr"] == 1e-3 for t in trials]
    assert [("optim/weight_decay" in t.params) for t in trials] == low and 0 < sum(low) < 20
    fixed = spec.from_dict("s", raw, parse_overrides(["optim.lr=1e-3"])).search
    assert fixed.conditional == () and "weight_decay" in fixed.space["optim"]
    point = {"label": "p", "optim.lr": "1e-3"}  # a variant so written is the choice 0.001
    raw["search"] |= {"variants": [point]}
    assert spec.from_dict("s", raw).space().points[0][1]["optim/lr"] == 1e-3


@pytest.mark.parametrize(
    ("primitive", "args", "message"),
    [
        ("randint", [1.5, 3], "the lower bound 1.5 is not an integer"),
        ("lograndint", [1, 9.5], "the upper bound 9.5 is not an integer"),
        ("qrandint", [2, 8, 1.5], "the q 1.5 is not an integer"),
    ],
)
def test_an_integer_range_of_a_bound_or_step_that_is_no_integer_is_refused(
    primitive, args, message
):
    """randint [1.5, 3] was taken and drew the integers Tune rounds to; it is one line now."""
    space = {"search": {"space": {"data.batch_size": {primitive: args}}}}
    with pytest.raises(ConfigError) as err:
        spec.from_dict("x", {"data": {"dataset": "fake"}, **space})
    assert (
        str(err.value) == f"search.space.data.batch_size.{primitive}: {message}; use whole numbers"
    )


def test_a_log_range_of_integers_with_q_1_is_drawn_without_a_warning_that_q_is_ignored():
    """Tune warned, at each of the five conversions of a dry run, that Optuna would probably
    ignore the quantization of a qlograndint of q 1, which it draws as it is."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(search.TUNE_OPTUNA_LOGGER)
    logger.addHandler(handler)
    try:
        dist = search.distribution("search.space.x", {"qlograndint": [9, 28, 1]})
    finally:
        logger.removeHandler(handler)
    assert dist == optuna.distributions.IntDistribution(9, 27, log=True)
    assert [record.getMessage() for record in records] == []
    assert logger.filters == []  # for the conversion alone, not Tune's later records


def test_an_integer_range_of_whole_floats_is_taken():
    """1.0 is a whole number, as YAML's 1.0 or 1e0 reads."""
    space = {"search": {"space": {"data.batch_size": {"randint": [1.0, 3]}}}}
    base = {"data": {"dataset": "fake"}, "scaling": {"num_workers": 1}}
    experiment = spec.from_dict("x", {**base, **space})
    assert {row["data"]["batch_size"] for row in spec.expand(experiment, 20)} == {1, 2}


def test_expanding_a_search_leaves_the_callers_optuna_verbosity(state_kept):
    """spec.expand of a searched experiment (--dry-run, the checks before a run) called from a
    script puts back the script's Optuna verbosity, where it left Optuna at WARNING for good,
    silencing the script's own studies."""
    experiment = spec.load("mnist_search")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        with state_kept():
            assert len(spec.expand(experiment, 3)) == 3
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
    finally:
        optuna.logging.set_verbosity(verbosity)


def test_a_trial_stopped_before_its_end_is_drawn_apart_and_named_not_left_off(monkeypatch):
    """ASHA stopped the paper's Vanilla DEQ and a drawn trial at a rung: the chart drew only the
    finished trials, so the paper's point, which its variant puts on the chart, was missing
    without a word. Both are now drawn apart from the ranked trials, in the legend as
    stopped, and the front tables name them as left out."""
    monkeypatch.setattr(pareto, "png", lambda figure: figure)
    rows = _trials(
        (False, 0.9136, 25.0, 0.037), (True, 0.9526, 8.0, 0.020), (False, 0.7465, 4.0, 0.014)
    )
    rows[0] |= {"paper": True, "group": "Vanilla DEQ"}
    marked = pareto.mark(rows, "test_accuracy")
    assert [r["pareto_test_nfe"] for r in marked] == [False, True, False]
    figure = pareto.chart(marked, "test_accuracy")
    for axes in figure.axes[:2]:
        drawn = sorted(tuple(xy) for c in axes.collections for xy in c.get_offsets().tolist())
        costs = ([4.0, 8.0, 25.0], [0.014, 0.020, 0.037])[figure.axes.index(axes)]
        assert [x for x, _ in drawn] == pytest.approx(costs)
        assert [y for _, y in drawn] == pytest.approx([74.65, 95.26, 91.36])
    legend = figure.legends[0] if figure.legends else figure.axes[-1].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == [
        "trial",
        "short of its last step (not ranked)",
        "Vanilla DEQ (short of its last step)",
        "Pareto front",
    ]
    text = pareto.markdown(marked, "test_accuracy")
    assert text.count("Not ranked, short of their last step: Vanilla DEQ, 9db77_00002.") == 1


def test_a_paper_trial_short_of_its_end_is_named_with_its_seed_beside_another_seeds():
    """ASHA stopped seed 1 of the paper's Vanilla DEQ at a rung and seed 0 trained to its end:
    the front showed Vanilla DEQ and the line under it named Vanilla DEQ as not ranked, which
    of the two unsaid. A name that several trials share now takes the trial's seed; a name of
    one trial is left as it is."""
    rows = _trials((True, 0.97, 31.0, 0.08), (False, 0.92, 22.0, 0.07), (False, 0.5, 9.0, 0.1))
    for row, seed in zip(rows[:2], (0, 1), strict=True):
        row |= {"paper": True, "group": f"Vanilla DEQ, seed={seed}", "seed": seed}
    rows[2] |= {"status": "ERROR", "seed": 0}
    text = pareto.markdown(pareto.mark(rows, "test_accuracy"), "test_accuracy")
    assert "| Vanilla DEQ | 97.00 | 31 |" in text
    line = "Not ranked, short of their last step: Vanilla DEQ seed 1, 9db77_00002 (failed)."
    assert text.count(line) == 1


def test_the_front_tables_say_where_trials_measured_a_cost_on_other_batches():
    """A search drawing data.batch_size (32 or 128) and data.eval_batch_size (64 or 256) ranked
    training time per batch of 32 images beside time per batch of 128, and test NFE (a test
    batch's slowest sample's) over batches of 64 beside 256, as one front without a word; the
    tables now name each setting that differs and what it changes. A stopped trial's setting
    is not among them."""
    rows = _trials((True, 0.9, 20.0, 0.1), (True, 0.8, 10.0, 0.2), (False, 0.7, 5.0, 0.3))
    for row, batch, test_batch in zip(rows, (32, 128, 64), (64, 256, 64), strict=True):
        row |= {"config.data.batch_size": batch, "config.data.eval_batch_size": test_batch}
        row |= {"config.train.eval_batches": 0}
    rows[2]["config.train.eval_batches"] = 1
    text = pareto.markdown(pareto.mark(rows, "test_accuracy"), "test_accuracy")
    notes = [line for line in text.splitlines() if line.startswith("Not comparable")]
    assert notes == [
        "Not comparable across trials: data.batch_size differs (32, 128): training time, NFE, "
        "forward and backward time per step are per batch of that many images.",
        "Not comparable across trials: data.eval_batch_size differs (64, 256): test NFE is a "
        "test batch's slowest sample's and prediction time a test batch's, in batches of that "
        "size.",
    ]
    same = pareto.markdown(pareto.mark(rows[:1] * 2, "test_accuracy"), "test_accuracy")
    assert "Not comparable" not in same


def test_a_search_ranking_by_prediction_time_is_told_when_test_batches_differ(monkeypatch):
    """A search with cost predict_time drawing data.eval_batch_size (64 or 256) ranked the
    prediction time of a test batch of 64 beside one of 256, and the note under its fronts
    named test NFE alone, not the cost of the front it searched; it names both."""
    rows = _trials((True, 0.9, 20.0, 0.1), (True, 0.8, 10.0, 0.2))
    for row, test_batch, seconds in zip(rows, (64, 256), (0.004, 0.001), strict=True):
        row |= {"config.data.eval_batch_size": test_batch, "predict_time": seconds}
    costs = pareto.views("predict_time")
    text = pareto.markdown(pareto.mark(rows, "test_accuracy", "max", costs), "test_accuracy", costs)
    (note,) = [line for line in text.splitlines() if line.startswith("Not comparable")]
    assert note.startswith("Not comparable across trials: data.eval_batch_size differs (64, 256)")
    assert "prediction time" in note and "test NFE" in note


def test_the_trials_left_off_the_front_are_not_called_stopped_while_running_or_failed():
    """A report from a second terminal while a search ran named its running trial and one that
    had failed as 'stopped before their end'; they are now short of their last step, the
    failed one said to be failed."""
    rows = _trials((False, 0.9, 20.0, 0.1), (True, 0.8, 10.0, 0.2), (False, math.nan, 5.0, 0.3))
    rows[0]["status"], rows[1]["status"], rows[2]["status"] = "RUNNING", "TERMINATED", "ERROR"
    text = pareto.markdown(pareto.mark(rows, "test_accuracy"), "test_accuracy")
    assert "stopped" not in text
    assert text.count("Not ranked, short of their last step: 9db77_00000, 9db77_00002 (failed).")


def test_the_line_of_trials_not_ranked_names_the_paper_s_first_and_counts_past_its_limit():
    """3,000 trials under ASHA left 1,300 short of their last step, all named in one line of
    16,000 characters; it now names pareto.NAMED_NOT_RANKED, the paper's configurations first,
    and counts the rest."""
    done, short = _trials((True, 0.9, 20.0, 0.1), (False, 0.5, 9.0, 0.1))
    rows = [done, *(dict(short) for _ in range(40))]
    for i, row in enumerate(rows):
        row["trial"] = f"9db77_{i:05d}"
    rows[35] |= {"paper": True, "group": "Skip DEQ"}
    text = pareto.markdown(pareto.mark(rows, "test_accuracy"), "test_accuracy")
    (line,) = [line for line in text.splitlines() if line.startswith("Not ranked")]
    named = [f"9db77_{i:05d}" for i in range(1, pareto.NAMED_NOT_RANKED) if i != 35]
    listed = ", ".join(["Skip DEQ", *named])
    more = 40 - pareto.NAMED_NOT_RANKED
    assert line == (
        f"Not ranked, short of their last step: {listed} and {more} more (results.parquet's "
        "`completed` column)."
    )


def test_a_search_that_trades_accuracy_against_another_cost_gets_its_front(monkeypatch):
    """A TPE search with cost predict_time drew its trials to trade accuracy against the
    prediction time, and the report's fronts were test NFE and training time only, so the
    trade it searched had no front; that cost is now a third view (here its front is the
    cheapest trial and the most accurate one, where test NFE's is the most accurate alone)."""
    monkeypatch.setattr(pareto, "png", lambda figure: figure)
    rows = _trials((True, 0.9, 20.0, 0.1), (True, 0.95, 10.0, 0.2), (True, 0.8, 30.0, 0.3))
    for row, seconds in zip(rows, (0.001, 0.004, 0.002), strict=True):
        row["predict_time"] = seconds
    costs = pareto.views("predict_time")
    assert list(costs) == ["test_nfe", "train_time", "predict_time"]
    assert pareto.views("test_nfe") == pareto.VIEWS == pareto.views(None)
    assert set(COSTS) - {"test_nfe"} == set(pareto.COST_WORDS)
    marked = pareto.mark(rows, "test_accuracy", "max", costs)
    assert [r["pareto_predict_time"] for r in marked] == [True, True, False]
    assert [r["pareto_test_nfe"] for r in marked] == [False, True, False]
    text = pareto.markdown(marked, "test_accuracy", costs)
    assert "## Pareto front: test_accuracy against prediction time per test batch (s)" in text
    assert "| 9db77_00000 | 90.00 | 20 | 0.1 | 0.001 | - | euler |" in text
    figure = pareto.chart(marked, "test_accuracy", "max", costs)
    labels = [axes.get_xlabel() for axes in figure.axes]
    assert labels == ["test NFE", "training time per step (s)", costs["predict_time"]]
