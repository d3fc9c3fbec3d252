"""Ray Tune experiments: experiment files, search spaces, reports, cluster.yaml, and end to end."""

import datetime
import errno
import io
import json
import logging
import math
import os
import re
import reprlib
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
import ray
import ray.cloudpickle as cloudpickle
import yaml
from conftest import WAIT_S, FullDisk, ticking
from PIL import Image
from ray._common.constants import HEAD_NODE_RESOURCE_NAME
from ray.train._internal.storage import StorageContext
from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
from ray.tune.experiment.trial import Trial
from ray.tune.search.sample import Categorical, Float
from ray.tune.utils.util import _load_newest_checkpoint
from ray.util.state import list_actors

from raydeq import datasets
from raydeq import tune as rt
from raydeq.experiments import archive, pareto, results, run, spec
from raydeq.models import PRESETS
from raydeq.training import capacity, launch, preflight, runlock, storage
from raydeq.training.checkpoint import (
    MANIFEST_FILE,
    REPORTS_FILE,
    CheckpointError,
    read_checkpoint,
    write_checkpoint,
)
from raydeq.training.config import (
    MAX_YAML_VALUES,
    NAME_MAX,
    ConfigError,
    check_settings,
    load,
    trained_settings,
    validate,
)

ROOT = Path(__file__).resolve().parent.parent
PAPER_TRIALS = {
    "digits": 6,
    "mnist_dense": 33,
    "mnist_mdeq": 7,
    "cifar10_small": 21,
    "cifar10_large": 21,
    "svhn": 48,
    "imagenet": 24,
    "digits_search": 24,
    "mnist_search": 24,
    "cifar10_small_search": 40,
}
TINY = {
    "model": {"model": "mnist_dense", "variant": "skip_reg", "solver": "vcab3"},
    "data": {"dataset": "digits", "batch_size": 8},
    "scaling": {"num_workers": 1},
}


@pytest.mark.parametrize(("name", "trials"), PAPER_TRIALS.items())
def test_each_experiment_validates_and_expands_to_its_trials(name, trials):
    experiment = spec.load(name)
    sampled = spec.expand(experiment)
    assert len(sampled) == trials
    configs = [experiment.trial_config(s) for s in sampled]
    per_group = Counter(spec.describe(s, leave_out=("seed",)) for s in sampled)
    assert set(per_group.values()) == {len({c.seed for c in configs})}
    for cfg in {repr(c.model): c for c in configs}.values():
        preflight.check_model(cfg)


def test_the_paper_settings_reach_the_trials():
    table2 = [
        spec.load("cifar10_small").trial_config(s) for s in spec.expand(spec.load("cifar10_small"))
    ]
    assert {(c.model.variant, c.model.solver) for c in table2} == {
        *((v, s) for v in ("vanilla", "skip", "skip_reg") for s in ("vcab3", "broyden")),
        ("neural_ode", "vcab3"),
    }
    assert {(c.optim.lr, c.data.batch_size, c.train.max_steps) for c in table2} == {
        (1e-3, 128, 20000)
    }
    table1 = [
        spec.load("mnist_dense").trial_config(s) for s in spec.expand(spec.load("mnist_dense"))
    ]
    assert {(c.model.variant, c.model.jac_reg, c.train.lambda_jac) for c in table1} == {
        *((v, False, 0.0) for v in ("vanilla", "skip", "skip_reg")),
        *((v, True, 1.0) for v in ("vanilla", "skip", "skip_reg")),
        ("neural_ode", None, 0.0),
    }
    for name in ("mnist_dense", "mnist_mdeq", "cifar10_small", "cifar10_large"):
        experiment = spec.load(name)
        trials = [experiment.trial_config(s).model for s in spec.expand(experiment)]
        assert {m.dynamics for m in trials if m.variant == "neural_ode"} == {"f"}, name


def test_random_primitives_are_sampled_once_per_sample_and_within_bounds():
    experiment = spec.load("svhn")
    space = experiment.param_space()
    assert isinstance(space["model"]["abstol"], Float)
    assert isinstance(space["variant"]["grid_search"], list)
    sampled = spec.expand(experiment)
    draws = {(s["model"]["abstol"], s["train"]["lambda_skip"]) for s in sampled}
    assert len(draws) == experiment.search.num_samples
    assert all(1e-2 <= s["model"]["abstol"] <= 1e-1 for s in sampled)
    assert all(1e-3 <= lam <= 1e-1 for _, lam in draws)
    choice = spec.domain("x", {"choice": [False, True]})
    assert isinstance(choice, Categorical)


def test_svhn_trains_with_the_reference_svhn_settings():
    """The settings of SciML/DeepEquilibriumNetworks.jl experiments/svhn/train.jl at 5170231:
    AdamW 1e-3 with weight decay 2.5e-6, cosine to 1e-6 over the run, batch 64, 50 epochs, at
    most 20 steps, no unrolled warm-up; cosine's default floor of 0 and the cifar10_small
    preset's 18 steps and 3,000 warm-up steps were not these."""
    experiment = spec.load("svhn")
    trials = [experiment.trial_config(s) for s in spec.expand(experiment)]
    settings = {
        (
            c.optim.optimizer,
            c.optim.lr,
            c.optim.weight_decay,
            c.optim.schedule,
            c.optim.eta_min,
            c.data.batch_size,
            c.train.epochs,
            c.model.max_steps,
            c.model.pretrain_steps,
        )
        for c in trials
    }
    assert settings == {("adamw", 1e-3, 2.5e-6, "cosine", 1e-6, 64, 50, 20, 0)}


# Settings the paper's text leaves out, from its reference code (SciML/DeepEquilibriumNetworks.jl:
# experiments/mnist/mnist_fc.jl at 5170231; experiments/cifar10/tiny.yml, large.yml and
# imagenet/small.yml at d18c610), as "section.key": value of each DEQ row.
REFERENCE_SETTINGS = {
    "mnist_dense": {"model.max_steps": 50},
    "cifar10_small": {"model.max_steps": 18, "model.pretrain_steps": 3000, "data.augment": False},
    "cifar10_large": {"model.max_steps": 18, "model.pretrain_steps": 0, "data.augment": True},
    "imagenet": {"model.max_steps": 27, "model.pretrain_steps": 0, "optim.nesterov": True},
}

# The paper's section 4, per experiment: solver of the continuous rows, reltol, optimizer
# settings, steps or epochs, global batch, lambda_skip, and the metric of its table.
PAPER_SETTINGS = {
    "mnist_dense": (
        "tsit5",
        5e-3,
        {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "constant"},
        {"epochs": 25, "lambda_skip": 0.01},
        32,
        "test_accuracy",
    ),
    "cifar10_small": (
        "vcab3",
        5e-2,
        {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 2.5e-6, "schedule": "cosine"}
        | {"eta_min": 1e-6},
        {"max_steps": 20000, "lambda_skip": 0.01},
        128,
        "test_accuracy",
    ),
    "cifar10_large": (
        "vcab3",
        5e-2,
        {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "cosine"}
        | {"eta_min": 1e-6},
        {"max_steps": 90000, "lambda_skip": 0.01},
        128,
        "test_accuracy",
    ),
    "imagenet": (
        "vcab3",
        5e-2,
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-6}
        | {"schedule": "step", "gamma": 0.1},
        {"max_steps": 500000, "lambda_skip": 0.01},
        64,
        "test_top5_accuracy",
    ),
}


@pytest.mark.parametrize("name", PAPER_SETTINGS)
def test_dry_run_pins_the_papers_settings(name, capsys):
    solver, reltol, optim, train, batch, metric = PAPER_SETTINGS[name]
    assert rt.main([name, "--dry-run"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    labels = {row.get("label") for row in spec.load(name).search.variants}
    paper = [row["config"] for row in rows if row["label"].split(",")[0] in labels]
    assert len(paper) >= 6
    # Discrete DEQs solve with (limited-memory) Broyden, continuous ones with the solver above.
    for row in rows:
        kind = row["label"].split(",")[0]
        if kind in labels and "Discrete" in kind:
            assert row["config"]["model"]["solver"] == "broyden", kind
        elif kind in labels and "Continuous" in kind:
            assert row["config"]["model"]["solver"] == solver, kind
    for config in paper:
        model = config["model"]
        if model["solver"] not in ("broyden", "anderson") and model["variant"] != "neural_ode":
            assert model["solver"] == solver, config["model"]
        assert (model["reltol"] or PRESETS[model["model"]].reltol) == reltol
        assert {k: config["optim"][k] for k in optim} == pytest.approx(optim)
        assert {k: config["train"][k] for k in train} == pytest.approx(train)
        assert config["data"]["batch_size"] == batch and "search" not in config
    nodes = [c["model"]["dynamics"] for c in paper if c["model"]["variant"] == "neural_ode"]
    # The reference's Neural ODE integrates dz/dt = f(z, x) (neuralode.jl @ d18c610).
    assert nodes == ([] if name == "imagenet" else ["f"] * len({c["seed"] for c in paper}))
    assert spec.load(name).search.metric == metric
    if name == "imagenet":
        assert paper[0]["optim"]["milestones"] == [100000, 150000, 250000]
    deqs = [config for config in paper if config["model"]["variant"] != "neural_ode"]
    for key, value in REFERENCE_SETTINGS[name].items():
        section, option = key.split(".")
        assert {config[section][option] for config in deqs} == {value}, key
    extra = [row["config"]["train"]["lambda_skip"] for row in rows if "(raydeq" in row["label"]]
    assert extra == ([1.0] * 3 if name == "mnist_dense" else [])


def test_workers_per_trial_sets_the_trials_workers():
    assert spec.load("digits").trial_config({}).scaling.num_workers == 1
    assert spec.load("digits", ["scaling.num_workers=2"]).trial_config({}).scaling.num_workers == 2
    imagenet = spec.load("imagenet")
    assert [imagenet.trial_config({}).scaling.num_workers, imagenet.base["data"]["batch_size"]] == [
        4,
        64,
    ]


def test_an_override_fixes_a_searched_key():
    assert len(spec.expand(spec.load("digits", ["model.variant=skip"]))) == 2
    fixed = spec.load("digits", ["seed=7"])
    assert [fixed.trial_config(s).seed for s in spec.expand(fixed)] == [7, 7, 7]
    assert len(spec.expand(spec.load("mnist_dense", ["model.solver=tsit5"]))) == 24
    with pytest.raises(ConfigError, match="'wide': no variant .* they have 'vanilla', 'skip', 's"):
        spec.load("digits", ["model.variant=wide"])


def test_an_override_inside_a_section_the_space_draws_whole_sets_it_in_each_value():
    """A space drawing `optim` as whole sections laid each one's lr over an optim.lr=0.5
    override, so that no trial ran it; the override now sets lr in each of them."""
    adam, sgd = {"optimizer": "adam", "lr": 1e-3}, {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9}
    search = {"space": {"optim": {"grid_search": [adam, sgd]}}}
    experiment = spec.from_dict("x", {**TINY, "search": search}, {"optim.lr": 0.5})
    optims = [experiment.trial_config(s).optim for s in spec.expand(experiment)]
    assert [(o.optimizer, o.lr, o.momentum) for o in optims] == [
        ("adam", 0.5, 0.9),
        ("sgd", 0.5, 0.9),
    ]
    assert search["space"]["optim"]["grid_search"][1]["lr"] == 0.1


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"sapce": {}}, r"^search.sapce: unknown key; allowed keys in search: variants, space"),
        ({"scheduler": "hyperband"}, r"^search.scheduler: 'hyperband' is not allowed"),
        ({"num_samples": 0}, r"^search.num_samples: must be >= 1"),
        (
            {"space": {"seed": {"eval": "1"}}},
            r"^search.space.seed.eval: code is not run from experiment files; use one of "
            r"grid_search, choice, uniform, ",
        ),
        ({"space": {"optim": {"lr": {"loguniform": [1]}}}}, r"^search.space.optim.lr.loguniform"),
        ({"space": {"seed": {"grid_search": []}}}, r"^search.space.seed.grid_search: expected"),
        ({"variants": [{"model.variant": {"choice": [1]}}]}, r"^search.variants\[0\].model"),
        (
            {"variants": [{"label": "a", "model.solver_options": {"m": 3}}]},
            r"^search.variants\[0\].model.solver_options: expected a value, got the mapping "
            r"\{'m': 3\}; a variant takes no primitives, and sets the keys of a section or of a "
            r"mapping setting one by one, dotted \(model.solver_options.m: 3\)$",
        ),
        ({"variants": [{1: 2}]}, r"^search.variants\[0\]: key 1 is not a dotted setting"),
        (
            {"variants": [{"model.variant": "wide"}]},
            r"^search.variants\[0\]: model.variant: 'wide' is not allowed",
        ),
        (
            {"space": {"model": {"abstol": {"grid_search": [-1]}}}},
            r"^search.space.model.abstol: the grid value -1: must be >= 0, got -1.0$",
        ),
        (
            {"space": {"optim.lr": {"gird_search": [1e-3]}}},
            r"^search.space.optim.lr: 'gird_search' is not a search primitive; use one of grid_",
        ),
        (
            {"space": {"optim.lr": {"loguniform": [1e-4, 1e-1], "base": 10}}},
            r"^search.space.optim.lr: 'loguniform' is given beside other keys; a dimension is one "
            r"primitive with its arguments inside it \(\{loguniform: \[...\]\}, or by name: ",
        ),
        (
            {"space": {"optim.optimizer": "sgd", "optim.momentum": {"uniform": [0.5, 1.5]}}},
            r"^search.space.optim.momentum: the upper bound 1.5: must be <= 1, got 1.5$",
        ),
        (
            # Named as seed's grid value 0, which the space tried first, with epochs at its first.
            {"space": {"seed": {"grid_search": [0, 1]}, "train.epochs": {"grid_search": [0, 1]}}},
            r"^search.space.train.epochs: the grid value 0: must be >= 1, got 0$",
        ),
        (
            {"space": {"model.abstol": {"uniform": [-0.1, 0.5]}}},
            r"^search.space.model.abstol: the lower bound -0.1: must be >= 0, got -0.1$",
        ),
        (
            {"space": {"train.epochs": {"randint": [0, 3]}}},
            r"^search.space.train.epochs: the lower bound 0: must be >= 1, got 0$",
        ),
        (
            {"space": {"train.epochs": {"randn": [10, 2]}}},
            r"^search.space.train.epochs: the mean 10.0: expected an integer, got 10.0$",
        ),
        (
            {"space": {"optim.lr": {"qrandn": [-0.1, 0.5, 0.1]}}},
            r"^search.space.optim.lr: the mean -0.1: must be > 0, got -0.1$",
        ),
        (
            # Drawn at 0.0 mostly: the mean as qrandn rounds it to its step.
            {"space": {"optim.lr": {"qrandn": [0.04, 0.01, 0.1]}}},
            r"^search.space.optim.lr: the mean 0.0: must be > 0, got 0.0$",
        ),
        (
            # A normal draws values without bound, a negative lambda_skip too, whatever its seed.
            {"space": {"train.lambda_skip": {"randn": [0.01, 0.1]}}},
            r"^search.space.train.lambda_skip: the draws of randn \[0.01, 0.1\], which have no "
            r"bound, reach -1e\+308: must be >= 0, got -1e\+308$",
        ),
        (
            {
                "space": {
                    "model.solver_options.safety": {"qrandn": {"mean": 0.9, "sd": 0.01, "q": 0.1}}
                }
            },
            r"^search.space.model.solver_options.safety: the draws of qrandn \{'mean': 0.9, 'sd': "
            r"0.01, 'q': 0.1\}, which have no bound, reach -1e\+308: model.solver_options.safety="
            r"-1e\+308 must be a number in \[0.1, 1\]$",
        ),
        (
            {"space": {"train.epochs": {"uniform": [1, 3]}}},
            r"^search.space.train.epochs: the lower bound 1.0: expected an integer, got 1.0$",
        ),
        ({"searcher": "nsga2", "population_size": 1}, r"^search.population_size: must be 0 \("),
        (
            {
                "searcher": "tpe",
                "space": {"model.solver": {"choice": ["vcab3", "anderson"]}},
                "conditional": [
                    {
                        "when": {"model.solver": "anderson"},
                        "space": {"model.solver_options.m": {"randint": [0, 9]}},
                    }
                ],
            },
            r"^search.conditional\[0\].space.model.solver_options.m: the lower bound 0: "
            r"model.solver_options.m=0",
        ),
        (
            {"space": {"model.solver": {"choice": ["vcab3", "rk4"]}}},
            r"^search.space.model.solver: the choice 'rk4': 'rk4' is not allowed; choose one of "
            r"vcab3, tsit5, bs3, euler, broyden, anderson, fixed_point$",
        ),
        (
            {"space": {"model.abstol": {"uniform": [0.1, 0.01]}}},
            r"^search.space.model.abstol.uniform: the lower bound 0.1 must be below 0.01",
        ),
        (
            {"variants": [{"label": "a", "seed": 1}, {"label": "a", "seed": 2, "optim.lr": 1.0}]},
            r"^search.variants\[1\]: sets other values than search.variants\[0\] under the same",
        ),
        (
            {"space": {"seed": {"grid_search": [6171, 3859, 6171]}}},
            r"^search.space.seed.grid_search: 6171 is listed twice; each value of a grid runs "
            r"trials of its own, which the results would count as more seeds of one "
            r"configuration; list it once$",
        ),
        (
            {"space": {"model.abstol": yaml.safe_load("{grid_search: [1e-3, 0.001]}")}},
            r"^search.space.model.abstol.grid_search: '1e-3' and 0.001 run the same trials \(their "
            r"trials run it at the same value\), which the results would count as more seeds of "
            r"one configuration; list one of them$",
        ),
        (
            {"space": {"model.max_steps": {"grid_search": [None, 50]}}},
            r"^search.space.model.max_steps.grid_search: None and 50 run the same trials",
        ),
        (
            {
                "variants": [
                    {"label": "a", "model.variant": "skip"},
                    {"label": "b", "model.variant": "vanilla"},
                ],
                "space": {"train.lambda_skip": {"grid_search": [0.1, 1.0]}},
            },
            r"^search.space.train.lambda_skip.grid_search: 0.1 and 1.0 run the same trials "
            r"\(\[b\]: a vanilla model trains no skip loss\), which the results would count as "
            r"more seeds of one configuration; set train.lambda_skip in search.variants, in those "
            r"that train a skip loss$",
        ),
        (
            {
                "space": {
                    "model.variant": {"grid_search": ["skip", "vanilla"]},
                    "train.lambda_skip": {"grid_search": [0.1, 1.0]},
                    "seed": {"grid_search": [0, 1]},
                }
            },
            r"^search.space.train.lambda_skip.grid_search: 0.1 and 1.0 run the same trials "
            r"\(\[variant=vanilla, seed=0\]: a vanilla model trains no skip loss\), which ",
        ),
        (
            {
                "variants": [
                    {"label": "a", "train.lambda_skip": 0.1},
                    {"label": "b", "train.lambda_skip": 1.0},
                ],
                "space": {"model.variant": {"grid_search": ["skip", "vanilla"]}},
            },
            r"^search.space: the trials \[a, variant=vanilla\] and \[b, variant=vanilla\] train "
            r"alike, which the results would count as more seeds of one configuration; change the "
            r"space or the variants so that they differ$",
        ),
        (
            {"variants": [{"label": "a", "seed": 1}, {"label": "a", "seed": 1}]},
            r"^search.variants\[1\]: runs the same trials as search.variants\[0\], which the "
            r"results would count as more seeds of one configuration; remove it, or change a "
            r"setting$",
        ),
        # The space's seeds ran over both variants' own: each would have run the same trials.
        (
            {
                "variants": [{"label": "a", "seed": 1}, {"label": "a", "seed": 2}],
                "space": {"seed": {"grid_search": [3, 4]}},
            },
            r"^search.variants\[0\].seed: search.space draws seed for every trial, over this "
            r"variant's 1, so this changes nothing; remove it from the variant or from "
            r"search.space$",
        ),
        (
            {
                "variants": [{"label": "a", "optim.lr": 0.1}, {"label": "b"}],
                "space": {"optim": {"lr": {"grid_search": [0.01, 0.001]}}},
            },
            r"^search.variants\[0\].optim.lr: search.space draws optim.lr for every trial, over "
            r"this variant's 0.1, so this changes nothing",
        ),
        (
            {"variants": [{"label": "a", "seed": 1}, {"label": "b", "seed": 1}]},
            r"^search.variants\[1\]: runs the same trials as search.variants\[0\], which the ",
        ),
        (
            {"variants": [{"label": "a", "model.solver": "vcab3", "seed": 0}, {"label": "b"}]},
            r"^search.variants\[1\]: runs the same trials as search.variants\[0\] \(their trials "
            r"run model.solver, seed at the same value\), which the results would count as more ",
        ),
        (
            {
                "variants": [
                    {"label": "a", "model.variant": "vanilla", "train.lambda_skip": 0.1},
                    {"label": "b", "model.variant": "vanilla", "train.lambda_skip": 1.0},
                ]
            },
            r"^search.variants\[0\]: train.lambda_skip: 0.1 weighs the skip loss, which variant "
            r"'vanilla' does not have",
        ),
        (
            {
                "searcher": "tpe",
                "space": {"model.max_steps": {"randint": [40, 60]}},
                "variants": [{"label": "a"}, {"label": "b", "model.max_steps": 50}],
                "num_samples": 2,
            },
            r"^search.variants\[1\]: runs the same trials as search.variants\[0\] \(their trials "
            r"run model.max_steps at the same value\), which the results would count as more ",
        ),
    ],
)
def test_bad_search_sections_are_one_line_errors(search, message):
    with pytest.raises(ConfigError, match=message) as err:
        rt.preflight(spec.from_dict("bad", {**TINY, "search": search}))
    assert "\n" not in str(err.value)


def test_a_variant_that_an_override_makes_the_same_as_an_earlier_one_goes():
    """mnist_dense train.lambda_skip=1.0 ran its row at lambda_skip 1.0 and its Skip Reg.
    Continuous DEQ row, then at 1.0 too, as 6 alike trials that the table showed as two rows;
    the later row goes, as the override's other variants do, and a row the override leaves
    apart stays."""
    variants = [
        {"label": "Skip Reg.", "model.variant": "skip_reg"},
        {"label": "Skip Reg. at 1", "model.variant": "skip_reg", "train.lambda_skip": 1.0},
        {"label": "Skip Reg. at 1 by Tsit5", "train.lambda_skip": 1.0, "model.solver": "tsit5"},
    ]
    raw = {**TINY, "search": {"variants": variants}}
    assert [s["variant"]["label"] for s in spec.expand(spec.from_dict("s", raw))] == [
        "Skip Reg.",
        "Skip Reg. at 1",
        "Skip Reg. at 1 by Tsit5",
    ]
    fixed = spec.from_dict("s", raw, {"train.lambda_skip": 1.0})
    assert [s["variant"]["label"] for s in spec.expand(fixed)] == [
        "Skip Reg.",
        "Skip Reg. at 1 by Tsit5",
    ]
    assert fixed.places["variants"] == (0, 2)
    assert {fixed.trial_config(s).train.lambda_skip for s in spec.expand(fixed)} == {1.0}


def test_a_setting_that_a_dimensions_value_refuses_is_named_under_it_without_variants():
    """Without variants, a fixed setting that a dimension's first value refuses is named under
    that dimension and value, not under a variant that the experiment does not have."""
    fixed = {**TINY, "optim": {"schedule": "step", "milestones": [10]}}
    fixed["search"] = {"space": {"optim.schedule": {"grid_search": ["constant", "step"]}}}
    with pytest.raises(ConfigError) as err:
        spec.from_dict("bad", fixed)
    assert str(err.value) == (
        "search.space.optim.schedule: the grid value 'constant': optim.milestones: [10] apply "
        "to optim.schedule=step only, not 'constant'; set optim.schedule=step or remove "
        "optim.milestones"
    )


@pytest.mark.parametrize(
    ("search", "overrides", "message"),
    [
        ({"space": [1, 2]}, {}, "search.space: expected a mapping, got [1, 2]"),
        ({"variants": [1]}, {"model.solver": "tsit5"}, "search.variants: expected a list of "),
        (
            {"space": {"optim.lr": {"uniform": [0.1, 0.2]}}},
            {"search.space": [1], "optim.lr": 0.1},
            "search.space: expected a mapping, got [1]",
        ),
    ],
)
def test_a_search_section_of_the_wrong_type_is_a_one_line_error(search, overrides, message):
    """A space written as a list, or variants that are no mappings with an override given,
    stopped the dry run with Python's traceback ('list' object has no attribute 'items')."""
    with pytest.raises(ConfigError) as err:
        spec.from_dict("bad", {**TINY, "search": search}, overrides)
    assert str(err.value).startswith(message)
    left_empty = spec.from_dict("ok", {**TINY, "search": {"space": None, "variants": None}})
    assert (left_empty.search.space, left_empty.search.variants) == ({}, ())


def test_a_search_that_varies_the_scaling_section_is_a_one_line_error():
    """Every trial's resources, and the trials at once, are reserved from the base config's
    scaling: a trial of 2 workers in a run of 1-worker trials held a worker's CPUs and GPU and
    waited for 2 more, a 1-worker trial of a larger base trained on a GPU it did not hold."""
    cpus = {"scaling.cpus_per_worker": {"randint": [1, 3]}}
    conditional = [{"when": {"model.solver": "anderson"}, "space": cpus}]
    solvers = {"model.solver": {"choice": ["vcab3", "anderson"]}}
    for search, where in [
        ({"space": {"scaling": {"num_workers": {"grid_search": [1, 2]}}}}, "search.space"),
        (
            {"variants": [{"label": "a"}, {"label": "b", "scaling.device": "cpu"}]},
            "search.variants[1]",
        ),
        (
            {"searcher": "tpe", "space": solvers, "conditional": conditional},
            "search.conditional[0].space",
        ),
    ]:
        with pytest.raises(ConfigError) as err:
            spec.from_dict("bad", {**TINY, "search": search})
        assert str(err.value).startswith(f"{where}.scaling.")
        assert str(err.value).split(": ", 1)[1] == (
            "the scaling section is the same for every trial (their resources are reserved from "
            "it); set it in the base config, or search.workers_per_trial, or run an experiment "
            "for each value"
        )
    workers = spec.from_dict("ok", {**TINY, "search": {"workers_per_trial": 2}})
    assert workers.trial_config({}).scaling.num_workers == 2


def test_a_search_that_sets_what_each_trial_sets_or_a_search_setting_is_a_one_line_error(
    tmp_path,
):
    """A variant's or a space's name, label or storage_path was taken and changed nothing (each
    trial runs as `train` in its trial folder, labelled by its values), nor did a search
    setting (a trial runs no search); a variant's search.conditional: [{eval: CODE}] ran CODE
    as Tune expanded the variants, where the file's eval is refused; nor did a variant's or
    a space's train.keep_checkpoints (Tune keeps each trial's by the base config's count)."""
    ran = tmp_path / "ran"
    code = f"open({str(ran)!r}, 'w').close() or 3"
    variants = [{"label": "a"}]
    for search, where, message in [
        (
            {"variants": [*variants, {"label": "b", "search.conditional": [{"eval": code}]}]},
            "search.variants[1].search.conditional",
            "a trial runs no search of its own",
        ),
        (
            {"variants": [*variants, {"label": "b", "name": "mine"}]},
            "search.variants[1].name",
            "each trial sets its own name (its run is 'train' in its trial folder)",
        ),
        (
            {"variants": [*variants, {"label": "b", "storage_path": str(tmp_path)}]},
            "search.variants[1].storage_path",
            "each trial sets its own storage_path (its trial folder)",
        ),
        (
            {"space": {"label": {"grid_search": ["x", "y"]}}},
            "search.space.label",
            "each trial sets its own label (its variant's label and its drawn values)",
        ),
        (
            {"space": {"search": {"metric": {"choice": ["test_nfe", "nfe"]}}}},
            "search.space.search.metric",
            "a trial runs no search of its own",
        ),
        # Kept by Tune at the base's count: a variant's 1 left 3 checkpoints in its folder.
        (
            {"variants": [*variants, {"label": "b", "train.keep_checkpoints": 1}]},
            "search.variants[1].train.keep_checkpoints",
            "Tune keeps every trial's checkpoints by the base config's train.keep_checkpoints, "
            "so this changes nothing; set it in the base config",
        ),
        (
            {"space": {"train": {"keep_checkpoints": {"grid_search": [1, 2]}}}},
            "search.space.train.keep_checkpoints",
            "Tune keeps every trial's checkpoints by the base config's train.keep_checkpoints",
        ),
    ]:
        with pytest.raises(ConfigError) as err:
            spec.from_dict("bad", {**TINY, "search": search})
        assert str(err.value).startswith(f"{where}: {message}")
        assert err.value.key == where
    assert not ran.exists()
    labelled = spec.from_dict("ok", {**TINY, "search": {"variants": variants}})
    assert [spec.describe(s) for s in spec.expand(labelled)] == ["a"]


SEED_TOO_HIGH = (
    r"^search.space.seed: the upper bound 4294967296: must be <= 4294967295, got 4294967296$"
)


def test_a_ranges_ends_are_checked_as_tune_draws_them():
    """An integer range's upper end is drawn only when quantized with a step above 1: seed's
    largest value, 2**32 - 1, is the last draw of randint(0, 2**32) and so is allowed, while
    qrandint(0, 2**32, 2) draws 2**32 itself and is refused; a range with equal ends is empty."""

    def check(space):
        return rt.preflight(spec.from_dict("x", {**TINY, "search": {"space": space}}))

    check({"seed": {"randint": [0, 2**32]}})
    with pytest.raises(ConfigError, match=SEED_TOO_HIGH):
        check({"seed": {"randint": [0, 2**32 + 1]}})  # draws 2**32 last
    with pytest.raises(ConfigError, match=SEED_TOO_HIGH):
        check({"seed": {"qrandint": [0, 2**32, 2]}})
    with pytest.raises(ConfigError, match=r"^search.space.optim.lr.uniform: the lower bound 0.1"):
        check({"optim.lr": {"uniform": [0.1, 0.1]}})


def test_a_quantized_integer_range_is_checked_at_the_values_tune_draws():
    """Tune's qrandint draws the multiples of q within its ends, and at q = 1 leaves out the
    upper end: [4, 64] with q 8 draws 8 to 64, so an image size of 4 (below the allowed 8) is
    never drawn, and [0, 2**32] with q 1 draws up to 2**32 - 1; a range without a multiple of q
    would fail its first draw. An image size applies to ImageNet alone, whose folder the
    preflight would read: its trials are validated without it."""

    def experiment(space, data=TINY["data"]):
        return spec.from_dict("x", {**TINY, "data": data, "search": {"space": space}})

    def check(space):
        return rt.preflight(experiment(space))

    def check_images(space):
        images = experiment(space, {"dataset": "imagenet", "data_dir": "images", "batch_size": 8})
        return [images.trial_config(sampled) for sampled in spec.expand(images, 20)]

    image_sizes = {"qrandint": [4, 64, 8]}
    drawn = ray.tune.search.sample.Integer(4, 64).uniform().quantized(8).sample(size=200)
    assert set(drawn) == set(range(8, 65, 8))
    check_images({"data.image_size": image_sizes, "seed": {"qrandint": [0, 2**32, 1]}})
    check_images({"data.image_size": {"qlograndint": [4, 64, 8]}, "seed": {"qrandint": [-3, 8, 4]}})
    check({"seed": {"qrandint": [0, 2**32, 1]}})
    check({"seed": {"qrandint": [-3, 8, 4]}})
    for bounds in ([0, 2**32 + 1, 1], [0, 2**32 + 3, 4]):
        with pytest.raises(ConfigError, match=SEED_TOO_HIGH):
            check({"seed": {"qrandint": bounds}})
    with pytest.raises(ConfigError) as err:
        check({"seed": {"qrandint": [1, 3, 4]}})
    assert str(err.value) == "search.space.seed.qrandint: no multiple of q = 4 lies in [1, 3]"


@pytest.mark.parametrize(
    ("space", "step"),
    [
        ({"optim.lr": {"quniform": [0.1, 0.5, 0]}}, "0"),
        ({"optim.lr": {"qloguniform": {"lower": 1e-3, "upper": 1e-2, "q": 0}}}, "0"),
        ({"train.epochs": {"qrandint": [1, 5, 0]}}, "0"),
        ({"optim.lr": {"quniform": [0.1, 0.5, -0.1]}}, "-0.1"),
    ],
)
def test_a_quantized_range_whose_step_is_not_above_0_is_a_one_line_error(space, step):
    """A float range with q=0 raised Python's ZeroDivisionError with a traceback, an integer
    range with q=0 failed at its first draw; a negative step is no step either."""
    ((key, spec_),) = space.items()
    ((primitive, _),) = spec_.items()
    with pytest.raises(ConfigError) as err:
        rt.preflight(spec.from_dict("x", {**TINY, "search": {"space": space}}))
    expected = f"search.space.{key}.{primitive}: the step q must be above 0, got {step}"
    assert str(err.value) == expected


def test_a_normal_distribution_without_spread_is_a_one_line_error():
    """Tune refuses a standard deviation of 0 with a bare assertion."""
    space = {"model.abstol": {"randn": [0.1, 0]}}
    with pytest.raises(ConfigError) as err:
        rt.preflight(spec.from_dict("x", {**TINY, "search": {"space": space}}))
    message = str(err.value)
    assert message.startswith("search.space.model.abstol.randn: bad arguments [0.1, 0] (")
    assert "\n" not in message


def test_arguments_by_names_a_primitive_does_not_take_are_refused_naming_those_it_takes():
    """loguniform: {low, high} (numpy's and scipy's names) got Python's "unexpected keyword
    argument 'low'" alone; the error now names Tune's arguments."""
    space = {"optim.lr": {"loguniform": {"low": 1e-4, "high": 0.1}}}
    with pytest.raises(ConfigError) as err:
        rt.preflight(spec.from_dict("x", {**TINY, "search": {"space": space}}))
    assert str(err.value).endswith("; loguniform takes lower, upper, base (a list, or by name)")


@pytest.mark.parametrize(
    ("space", "value"),
    [
        ({"optim.lr": {"randn": ["a", 1]}}, "'a'"),
        ({"optim.lr": {"randn": {"mean": "a"}}}, "'a'"),
        ({"optim.lr": {"qrandn": [0, 1, "a"]}}, "'a'"),
        ({"train.epochs": {"randint": ["a", 3]}}, "'a'"),
        ({"optim.lr": {"uniform": [0.1, ".inf"]}}, "'.inf'"),
        ({"optim.lr": {"randn": [True]}}, "True"),
    ],
)
def test_a_ranges_argument_that_is_no_number_is_a_one_line_error(space, value):
    """A normal's mean or an integer range's bound written as text stopped the dry run with
    Tune's or Python's traceback (a normal only at its first draw)."""
    ((key, spec_),) = space.items()
    ((primitive, _),) = spec_.items()
    with pytest.raises(ConfigError) as err:
        rt.preflight(spec.from_dict("x", {**TINY, "search": {"space": space}}))
    assert str(err.value) == (
        f"search.space.{key}.{primitive}: {value} is not a number; its arguments are numbers"
    )


@pytest.mark.parametrize(
    ("space", "value"),
    [
        ({"optim.lr": {"randn": [math.nan, 1]}}, "nan"),
        ({"optim.lr": {"randn": {"mean": "nan"}}}, "'nan'"),
        ({"optim.lr": {"uniform": [0.1, math.inf]}}, "inf"),
        ({"optim.lr": {"qloguniform": [1e-4, 1e-1, "-inf"]}}, "'-inf'"),
        ({"train.epochs": {"randint": [1, 10**400]}}, reprlib.repr(10**400)),
    ],
)
def test_a_ranges_argument_that_is_not_finite_is_a_one_line_error(space, value):
    """A normal's mean of .nan drew nan for every trial, which failed each at its start; an
    upper bound of .inf read as Tune's 'Uniform requires a upper bound', one of 10**400 as
    Python's OverflowError."""
    ((key, spec_),) = space.items()
    ((primitive, _),) = spec_.items()
    with pytest.raises(ConfigError) as err:
        spec.from_dict("x", {**TINY, "search": {"space": space}})
    assert str(err.value) == (
        f"search.space.{key}.{primitive}: {value} is not a finite number; its arguments are "
        "finite numbers"
    )


def test_range_bounds_written_as_yaml_text_are_read_as_numbers():
    """YAML 1.1 reads `1e-4` as a string: such bounds still make a log-uniform range, and its
    draws lie between them."""
    space = yaml.safe_load("optim.lr: {loguniform: [1e-4, 1e-2]}")
    assert space["optim.lr"]["loguniform"] == ["1e-4", "1e-2"]
    experiment = spec.from_dict("x", {**TINY, "search": {"space": space, "num_samples": 20}})
    rates = [experiment.trial_config(s).optim.lr for s in spec.expand(experiment)]
    assert len(set(rates)) == 20 and all(1e-4 <= lr <= 1e-2 for lr in rates)


def test_range_arguments_written_as_yaml_text_keywords_are_read_as_numbers():
    """The README allows a primitive's arguments as a mapping of keywords: YAML text bounds
    there are numbers too."""
    space = yaml.safe_load("optim.lr: {loguniform: {lower: 1e-4, upper: 1e-2}}")
    assert space["optim.lr"]["loguniform"] == {"lower": "1e-4", "upper": "1e-2"}
    experiment = spec.from_dict("x", {**TINY, "search": {"space": space, "num_samples": 20}})
    rates = [experiment.trial_config(s).optim.lr for s in spec.expand(experiment)]
    assert len(set(rates)) == 20 and all(1e-4 <= lr <= 1e-2 for lr in rates)


def test_dimensions_that_are_valid_only_together_are_checked_together():
    """A space may draw a setting that needs another one it draws (lambda_jac needs jac_reg):
    each value is checked with the other dimensions at their first values, not the base's."""
    space = {"model.jac_reg": {"choice": [True]}, "train.lambda_jac": {"grid_search": [0.5, 1.0]}}
    experiment = spec.from_dict("x", {**TINY, "search": {"space": space}})
    configs = [experiment.trial_config(s) for s in spec.expand(experiment)]
    assert [(c.model.jac_reg, c.train.lambda_jac) for c in configs] == [(True, 0.5), (True, 1.0)]


def test_an_override_of_workers_per_trial_sets_the_trials_workers():
    """`search.workers_per_trial=2` on the command line was read after the file's value had
    set the trials' workers: they kept the file's 1, and a value that does not divide the
    batch was not refused."""
    assert (
        spec.load("digits", ["search.workers_per_trial=2"]).trial_config({}).scaling.num_workers
        == 2
    )
    message = "data.batch_size: 64 does not split evenly over search.workers_per_trial=3;"
    with pytest.raises(ConfigError, match=message):
        spec.load("digits", ["search.workers_per_trial=3"])
    both = spec.load("digits", ["search.workers_per_trial=2", "scaling.num_workers=4"])
    assert both.trial_config({}).scaling.num_workers == 4


def test_workers_that_do_not_divide_the_batch_are_named_as_the_user_gave_them(tmp_path, capsys):
    """`--workers-per-trial 3` with a batch of 64 was refused for `scaling.num_workers=3`, a
    key the user never wrote, and `search.workers_per_trial: 3` in a file the same; the error
    names what was given and the worker counts that divide the batch."""
    divisors = "(1, 2, 4, 8, 16, 32, 64)"  # 64 = 2**6
    assert rt.main(["digits", "--workers-per-trial", "3", "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        "error: data.batch_size: 64 does not split evenly over --workers-per-trial 3; give a "
        f"batch size that is a multiple of 3, or workers that divide 64 {divisors} (in "
        "tune_configs/digits.yaml)\n"
    )
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump({**TINY, "search": {"workers_per_trial": 3}}))
    assert rt.main([str(file), "--dry-run"]) == 2
    assert "batch_size: 8 does not split evenly over search.workers_per_trial=3; give a " in (
        capsys.readouterr().err
    )
    assert rt.main([str(file), "scaling.num_workers=5", "--dry-run"]) == 2
    assert (
        "over scaling.num_workers=5; give a batch size that is a multiple of 5, or workers "
        "that divide 8 (1, 2, 4, 8)"
    ) in capsys.readouterr().err
    variant = {"variants": [{"label": "a", "data.batch_size": 30}]}
    file.write_text(yaml.safe_dump({**TINY, "search": variant}))
    assert rt.main([str(file), "--workers-per-trial", "4", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: search.variants[0]: data.batch_size: 30 does not split evenly over "
        "--workers-per-trial 4; give a batch size that is a multiple of 4, or workers that "
        "divide 30 (1, 2, 3, 5, 6, 10, 15, 30)"
    )


def test_trials_of_more_workers_than_fit_name_the_flag_that_gave_them(
    tmp_path, capsys, monkeypatch
):
    """A trial of --workers-per-trial 4 that a Ray of its own could not hold was refused for
    `scaling.num_workers=4` ('lower scaling.num_workers'); it names the flag and how many fit."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(rt.launch, "check_cluster", lambda: None)
    monkeypatch.setattr(rt.launch, "connect", lambda **kwargs: True)
    monkeypatch.setattr(rt.launch.capacity, "worker_slots", lambda need: 2)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump(TINY))
    argv = [str(file), "--storage", str(tmp_path / "runs"), "--gpus-per-worker", "0"]
    assert rt.main([*argv, "--workers-per-trial", "4"]) == 2
    # Each worker's CPU less its share of the trial's process: 1 - 0.01 / 4.
    assert capsys.readouterr().err.startswith(
        "error: --workers-per-trial 4 with 0.9975 CPU per worker does not fit on this machine "
        "(4 CPU), which holds 2 such workers; give at most 2, or run on a cluster"
    )
    assert not run.has_settings(str(tmp_path / "runs" / "tiny"))


@pytest.mark.parametrize(
    ("device", "fix"),
    [
        ("auto", "leave out --gpus-per-worker 1 (or give 0)"),
        ("cuda", "set scaling.device=cpu and leave out --gpus-per-worker 1"),
    ],
)
def test_a_gpu_asked_by_the_flag_on_a_machine_without_one_names_the_flag(
    tmp_path, capsys, monkeypatch, device, fix
):
    """--gpus-per-worker 1 on a machine without a GPU (a laptop) said 'set scaling.device=cpu',
    which the same command then refused beside the flag ('not with scaling.device cpu'); it
    names the flag to leave out. With scaling.device cuda, which asks the GPU without the flag
    and refuses 0 beside it, it names the device too."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(rt.launch, "check_cluster", lambda: None)
    monkeypatch.setattr(rt.launch, "connect", lambda **kwargs: True)
    monkeypatch.setattr(rt.launch.capacity, "worker_slots", lambda need: 0)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump({**TINY, "scaling": {"num_workers": 1, "device": device}}))
    argv = [str(file), "--storage", str(tmp_path / "runs"), "--gpus-per-worker", "1"]
    assert rt.main(argv) == 2
    assert capsys.readouterr().err == (
        "error: scaling.num_workers=1 with 1 CPU, 1 GPU per worker does not fit on this machine "
        f"(2 CPU, 0 GPU), which holds 0 such workers; {fix}, or run on a cluster (RAY_ADDRESS, "
        "or `ray start`)\n"
    )
    assert not run.has_settings(str(tmp_path / "runs" / "tiny"))


def test_a_bad_variant_from_an_override_is_not_blamed_on_the_file(tmp_path):
    """An error's key `search.variants[0]` did not match the override `search.variants` for
    its index, so a variant given on the command line was reported as in the file; one the
    file gives still names the file."""
    with pytest.raises(ConfigError) as err:
        spec.load("digits", ["search.variants=[{model.solver: rk4}]"])
    message = str(err.value)
    assert message.startswith("search.variants[0]: model.solver: 'rk4' is not allowed; choose")
    assert message.endswith("vcab3, tsit5, bs3, euler, broyden, anderson, fixed_point")
    path = tmp_path / "bad.yaml"
    path.write_text("search: {variants: [{model.solver: rk4}]}\n")
    with pytest.raises(ConfigError) as err:
        spec.load(str(path))
    assert str(err.value).endswith(f"fixed_point (in {path})")


def test_a_bad_first_value_of_the_space_is_named_in_the_space_not_in_a_variant(tmp_path):
    """The variants are checked with the space's first values: a bad first one was refused
    as `search.variants[0]: model.solver: 'rk4' ...`, naming a variant that sets no solver
    (and, from an override, the file); it names the space's dimension and value."""
    with pytest.raises(ConfigError) as err:
        spec.load("digits", ["search.space={model.solver: {choice: [rk4, euler]}}"])
    assert str(err.value) == (
        "search.space.model.solver: the choice 'rk4': 'rk4' is not allowed; choose one of "
        "vcab3, tsit5, bs3, euler, broyden, anderson, fixed_point"
    )
    variant = "search.variants=[{model.solver: rk4}]"  # a variant's own value is the variant's
    with pytest.raises(ConfigError, match=r"^search.variants\[0\]: model.solver: 'rk4' is not"):
        spec.load("digits", [variant])


def test_workers_per_trial_0_keeps_the_bases_workers():
    """0 is the default, "not set": the base's scaling.num_workers stays."""
    raw = {**TINY, "scaling": {"num_workers": 2}, "search": {"workers_per_trial": 0}}
    assert spec.from_dict("x", raw).trial_config({}).scaling.num_workers == 2


def test_a_random_space_takes_dotted_keys_as_sections():
    """The README lets a space be written nested or dotted: both give the same trials, and an
    override of the key fixes it in either form."""
    grid = {"grid_search": [0.1, 0.2]}
    forms = [{"optim": {"lr": grid}}, {"optim.lr": grid}]

    def rates(space, overrides=None):
        experiment = spec.from_dict("x", {**TINY, "search": {"space": space}}, overrides)
        return [experiment.trial_config(s).optim.lr for s in spec.expand(experiment)]

    assert [rates(space) for space in forms] == [[0.1, 0.2], [0.1, 0.2]]
    assert [rates(space, {"optim.lr": 0.3}) for space in forms] == [[0.3], [0.3]]


@pytest.mark.parametrize("where", ["space", "conditional"])
def test_a_dimension_written_both_dotted_and_nested_is_a_one_line_error(where):
    """`optim.lr` and `optim: {lr: ...}` in one space are two YAML keys for one dimension:
    the one written last was drawn and the other dropped without a word."""
    twice = {"optim.lr": {"choice": [0.1]}, "optim": {"lr": {"choice": [0.2]}}}
    search = {"space": twice}
    if where == "conditional":
        search = {
            "searcher": "tpe",
            "space": {"model.solver": {"choice": ["vcab3", "anderson"]}},
            "conditional": [{"when": {"model.solver": "anderson"}, "space": twice}],
        }
    with pytest.raises(ConfigError) as err:
        spec.from_dict("x", {**TINY, "search": search})
    assert str(err.value) == (
        "optim.lr: written twice in one search space, dotted and under its section; keep one"
    )


def test_an_experiment_file_may_end_in_yml(tmp_path):
    experiment = tmp_path / "tiny.yml"
    experiment.write_text(yaml.safe_dump(TINY))
    loaded = spec.load(str(experiment))
    assert loaded.name == "tiny" and loaded.trial_config({}).data.batch_size == 8


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({1: "x"}, "1: unknown key; allowed keys in config: name, storage_path, seed, label,"),
        ({None: "x"}, "None: unknown key; allowed keys in config: name, storage_path, seed,"),
        (
            {"model": {**TINY["model"], "solver_options": {datetime.date(2024, 1, 1): 3}}},
            "model.solver='vcab3' takes no option datetime.date(2024, 1, 1); its options are",
        ),
    ],
)
def test_a_key_yaml_reads_as_no_text_is_a_one_line_error_as_the_trainer_gives_it(
    tmp_path, capsys, keys, message
):
    """A key that YAML reads as a number, null or a date (`1:`, `null:`, `2024-01-01:`) ended
    `python -m raydeq.tune` in a TypeError ('can only concatenate str (not "int") to str')
    where `python -m raydeq.train` named it; both now give the same line, naming the file."""
    file = tmp_path / "keys.yaml"
    file.write_text(yaml.safe_dump({**TINY, **keys}))
    with pytest.raises(ConfigError) as trainer:
        load(file)
    assert str(trainer.value).startswith(message)
    assert str(trainer.value).endswith(f"(in {file})")
    assert rt.main([str(file), "--dry-run"]) == 2
    assert capsys.readouterr() == ("", f"error: {trainer.value}\n")


def test_a_dry_run_of_a_bad_space_is_a_one_line_error(tmp_path, capsys):
    experiment = tmp_path / "bad.yaml"
    experiment.write_text(yaml.safe_dump({**TINY, "search": {"space": {"optim.lr": {"f": [1]}}}}))
    assert rt.main([str(experiment), "--dry-run"]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("error: search.space.optim.lr: 'f' is not a search primitive; use")
    assert out.err.count("\n") == 1 and out.out == ""


def test_samples_of_a_space_that_draws_nothing_at_random_are_refused(tmp_path, capsys):
    """Several samples of a grid alone repeat its trials, seed and all, which the table then
    counted as seeds of one configuration; a dry run and a run refuse them in one line."""
    grid = {"space": {"seed": {"grid_search": [1, 2]}}, "num_samples": 2}
    experiment = tmp_path / "grid.yaml"
    experiment.write_text(yaml.safe_dump({**TINY, "search": grid}))
    assert rt.main([str(experiment), "--dry-run"]) == 2
    out = capsys.readouterr()
    assert out.err == (
        "error: search.num_samples: 2 samples of a space that draws nothing at random run each "
        "trial 2 times alike, which the results would count as more seeds of one "
        "configuration; set 1, and list seeds in search.space.seed: {grid_search: [...]}\n"
    )
    assert out.out == ""
    assert rt.main([str(experiment), "search.num_samples=1", "--dry-run"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    with pytest.raises(ConfigError, match=r"^--num-samples: 3 samples of a space that draws"):
        rt.preflight(spec.from_dict("grid", {**TINY, "search": {**grid, "num_samples": 1}}), 3)


def test_more_samples_than_a_space_has_points_to_draw_are_refused_naming_both_counts():
    """A random search over choices alone (model.solver of 2, seed's grid) ran 6 samples as 3
    repeats of each point, seeds and all, without a word, which the table counted as seeds of
    one configuration; more samples than the points, and a searcher's trials past its
    variants and points, are refused in one line naming both counts. As many pass (a
    searcher's; Tune's where they draw no point twice)."""
    space = {"model.solver": {"choice": ["vcab3", "bs3"]}, "seed": {"grid_search": [0, 1]}}
    choices = spec.from_dict("choices", {**TINY, "search": {"space": space, "num_samples": 6}})
    with pytest.raises(ConfigError) as err:
        spec.check_repeats(choices)
    assert str(err.value) == (
        "search.num_samples: 6 samples of a space of 2 points at random (model.solver: 2 "
        "values) draw a point again, its trials seeds and all, which the results would count "
        "as more seeds of one configuration; set 1 (sample 2 would draw sample 1's point again "
        "by chance: the draws come from the experiment's seed), or list the values in "
        "grid_search and set 1, to run each point once"
    )
    spec.check_repeats(choices, 1)
    # Seed 1 draws vcab3 then bs3: as many samples as points draw none again, by chance or not.
    apart = spec.from_dict("apart", {**TINY, "seed": 1, "search": {"space": space}})
    with pytest.raises(ConfigError) as err:
        spec.check_repeats(apart, 3)
    assert str(err.value) == (
        "--num-samples: 3 samples of a space of 2 points at random (model.solver: 2 values) "
        "draw a point again, its trials seeds and all, which the results would count as more "
        "seeds of one configuration; set 2 or fewer, or list the values in grid_search and set "
        "1, to run each point once"
    )
    spec.check_repeats(apart, 2)
    ranges = {"train.epochs": {"qrandint": [1, 3, 1]}, "optim.lr": {"quniform": [0.1, 0.3, 0.1]}}
    with pytest.raises(ConfigError, match=r"^--num-samples: 7 samples of a space of 6 points "):
        spec.check_repeats(spec.from_dict("ranges", {**TINY, "search": {"space": ranges}}), 7)
    # A step written 1.0 counts the same points (it stopped the check with a TypeError).
    ranges["train.epochs"] = {"qrandint": [1, 3, 1.0]}
    with pytest.raises(ConfigError, match=r"^--num-samples: 7 samples of a space of 6 points "):
        spec.check_repeats(spec.from_dict("ranges", {**TINY, "search": {"space": ranges}}), 7)
    space = {"model.solver": {"choice": ["vcab3", "bs3"]}, "model.max_steps": {"randint": [9, 11]}}
    variants = [{"model.solver": "bs3", "model.max_steps": 9}, {"model.max_steps": 40}]
    search = {"searcher": "tpe", "space": space, "variants": variants, "num_samples": 6}
    with pytest.raises(ConfigError) as err:
        spec.check_repeats(spec.from_dict("tpe", {**TINY, "search": search}))
    assert str(err.value) == (
        "search.num_samples: 6 trials of a search over 5 points (model.solver: 2 values, "
        "model.max_steps: 2 values, 1 variants outside its ranges) repeat one or more, which the "
        "results would count as more seeds of one configuration; set 5 or fewer, or widen "
        "search.space"
    )
    spec.check_repeats(spec.from_dict("tpe", {**TINY, "search": search}), 5)


def test_a_sample_that_draws_a_point_of_a_small_space_again_by_chance_is_refused():
    """3 samples of a choice of 3 solvers drew euler, bs3 and bs3 (the experiment's seed draws
    them), so bs3's trials ran twice and vcab3's never, without a word; the repeat is refused
    naming the samples and the value, and the samples before it pass. 4 samples were told to
    set 3 or fewer, which repeat too."""
    space = {"model.solver": {"choice": ["vcab3", "bs3", "euler"]}, "seed": {"grid_search": [0, 1]}}
    experiment = spec.from_dict("three", {**TINY, "search": {"space": space, "num_samples": 3}})
    assert [s["model"]["solver"] for s in spec.expand(experiment)] == [
        *["euler", "euler", "bs3", "bs3", "bs3", "bs3"]
    ]
    with pytest.raises(ConfigError) as err:
        spec.check_repeats(experiment)
    assert str(err.value) == (
        "search.num_samples: sample 3 of 3 draws solver=bs3 again, as sample 2 did (the draws "
        "come from the experiment's seed), and would run its trials again, seeds and all, which "
        "the results would count as more seeds of one configuration; set 2, or list the values "
        "in grid_search and set 1, to run each point once"
    )
    spec.check_repeats(experiment, 2)
    # More samples than points: the count suggested is the one that draws no point again.
    with pytest.raises(ConfigError) as err:
        spec.check_repeats(experiment, 4)
    assert str(err.value) == (
        "--num-samples: 4 samples of a space of 3 points at random (model.solver: 3 values) "
        "draw a point again, its trials seeds and all, which the results would count as more "
        "seeds of one configuration; set 2 or fewer (sample 3 would draw sample 2's point "
        "again by chance: the draws come from the experiment's seed), or list the values in "
        "grid_search and set 1, to run each point once"
    )


def test_two_samples_that_draw_one_point_are_refused_and_two_apart_pass():
    """Two samples are the fewest that can repeat: seed 1 draws bs3 twice from a choice of 3
    solvers, refused naming both samples; seed 0 draws euler and bs3, which pass."""
    space = {"model.solver": {"choice": ["vcab3", "bs3", "euler"]}}
    search = {"space": space, "num_samples": 2}
    with pytest.raises(ConfigError, match=r"^search.num_samples: sample 2 of 2 draws solver=bs3 "):
        spec.check_repeats(spec.from_dict("two", {**TINY, "seed": 1, "search": search}))
    spec.check_repeats(spec.from_dict("two", {**TINY, "seed": 0, "search": search}))


def test_samples_that_repeat_a_vanilla_variants_trials_at_other_lambda_skips_are_refused():
    """train.lambda_skip drawn at random over a vanilla and a skip variant (or grid value of
    model.variant) ran 3 samples of the vanilla DEQ's trials at 3 values it trains without,
    alike, seeds and all; they are refused naming the trials, and pass where the space draws
    another dimension too, unless its draws repeat by chance for the vanilla trials."""
    space = {"train.lambda_skip": {"loguniform": [1e-3, 1e-1]}, "seed": {"grid_search": [0, 1]}}
    variants = [{"label": "S", "model.variant": "skip"}, {"label": "V", "model.variant": "vanilla"}]
    search = {"space": space, "variants": variants, "num_samples": 3}
    with pytest.raises(ConfigError) as err:
        spec.check_repeats(spec.from_dict("lambda", {**TINY, "search": search}))
    assert str(err.value) == (
        "search.num_samples: 3 samples draw the trials of [V, seed=0], a vanilla model, from 1 "
        "point at most: it trains no skip loss, so train.lambda_skip changes nothing in them, "
        "and they repeat, seeds and all, which the results would count as more seeds of one "
        "configuration; set 1, or draw train.lambda_skip for the skip variants alone (searcher "
        "tpe with a conditional rule)"
    )
    spec.check_repeats(spec.from_dict("lambda", {**TINY, "search": search}), 1)
    grid = {"model.variant": {"grid_search": ["skip", "vanilla"]}, **space}
    with pytest.raises(ConfigError, match=r"trials of \[variant=vanilla, seed=0\], a vanilla "):
        spec.check_repeats(
            spec.from_dict("grid", {**TINY, "search": {"space": grid, "num_samples": 3}})
        )
    space["model.abstol"] = {"loguniform": [1e-3, 1e-1]}
    spec.check_repeats(spec.from_dict("lambda", {**TINY, "search": search}))
    # By chance: seed 1 draws bs3 for the first two samples, whose vanilla trials train alike.
    space = {"model.solver": {"choice": ["vcab3", "bs3", "tsit5"]}, **space}
    del space["model.abstol"]
    search = {"space": space, "variants": variants, "num_samples": 3}
    with pytest.raises(ConfigError) as err:
        spec.check_repeats(spec.from_dict("lambda", {**TINY, "seed": 1, "search": search}))
    assert str(err.value) == (
        "search.num_samples: sample 2 of 3 draws the trials of [V, solver=bs3, seed=0], a "
        "vanilla model, again, as sample 1 did (the draws come from the experiment's seed): it "
        "trains no skip loss, so train.lambda_skip changes nothing in them, and they repeat, "
        "seeds and all, which the results would count as more seeds of one configuration; set "
        "1, or draw train.lambda_skip for the skip variants alone (searcher tpe with a "
        "conditional rule)"
    )
    spec.check_repeats(spec.from_dict("lambda", {**TINY, "seed": 0, "search": search}))
    # The trials named are the repeating sample's: seed 3 draws tsit5, vcab3, tsit5 ...
    with pytest.raises(ConfigError) as err:
        spec.check_repeats(spec.from_dict("lambda", {**TINY, "seed": 3, "search": search}))
    assert str(err.value).startswith(
        "search.num_samples: sample 3 of 3 draws the trials of [V, solver=tsit5, seed=0], a "
        "vanilla model, again, as sample 1 did "
    )
    # ... and of two solvers seed 1 draws vcab3, bs3, bs3: the third sample repeats bs3's.
    space["model.solver"] = {"choice": ["vcab3", "bs3"]}
    with pytest.raises(ConfigError) as err:
        spec.check_repeats(spec.from_dict("lambda", {**TINY, "seed": 1, "search": search}))
    assert str(err.value).startswith(
        "search.num_samples: 3 samples draw the trials of [V, solver=bs3, seed=0], a vanilla "
        "model, from 2 points at most: "
    )


def test_the_preflight_checks_each_model_and_data_once_saying_how_far_it_has_come(
    monkeypatch, capsys
):
    """tune's checks before Ray build each trial's model: the 24 imagenet trials took 176 s on
    2 busy cores without a line; a check begun 5 s or more after the line before is a line on
    stderr, with the time left, and each model and data section is still checked once."""
    checked = []
    monkeypatch.setattr(rt, "check_run", lambda cfg, storage: checked.append(cfg.model.solver))
    space = {"model.solver": {"grid_search": ["vcab3", "bs3", "euler"]}}
    space["seed"] = {"grid_search": [0, 1]}
    experiment = spec.from_dict("grid", {**TINY, "search": {"space": space}})
    ticking(monkeypatch, 10.0)
    rt.preflight(experiment)
    assert sorted(checked) == ["bs3", "euler", "vcab3"]
    what = "checking the data and models of the trials of grid"
    assert capsys.readouterr() == (
        "",
        f"{what}: 0/3\n{what}: 1/3, eta 40s\n{what}: 2/3, eta 15s\n",
    )


def test_a_searcher_with_nothing_to_draw_is_refused_more_trials_than_one_past_its_points(
    tmp_path, capsys
):
    """searcher tpe with an empty space and num_samples 3 listed, and ran, three trials of the
    base config with seed 0, which the table would count as 3 seeds of one configuration; it is
    refused in one line, as the same samples of Tune's grid are. One trial runs."""
    experiment = tmp_path / "empty.yaml"
    experiment.write_text(yaml.safe_dump({**TINY, "search": {"searcher": "tpe", "num_samples": 3}}))
    assert rt.main([str(experiment), "--dry-run"]) == 2
    assert capsys.readouterr() == (
        "",
        "error: search.num_samples: 3 trials of a search whose space draws nothing run 3 "
        "alike, which the results would count as more seeds of one configuration; set 1, or "
        "give search.space a dimension to draw\n",
    )
    assert rt.main([str(experiment), "search.num_samples=1", "--dry-run"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    drawn = {"searcher": "nsga2", "num_samples": 3, "space": {"seed": {"randint": [0, 9]}}}
    spec.check_repeats(spec.from_dict("drawn", {**TINY, "search": drawn}))


def test_a_bad_solver_option_override_that_a_rule_draws_is_a_one_line_error(capsys):
    """`model.solver_options.m=x` passed the checks before a run (a rule's fixed value went
    untried) and then stopped the dry run after the space's lines, and a run's Anderson trials;
    it is now refused before anything is printed, in one line naming it."""
    assert rt.main(["digits_search", "model.solver_options.m=x", "--dry-run"]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("error: search.conditional[0].space.model.solver_options.m: ")
    assert out.err.endswith("m='x' must be an integer >= 1\n")
    assert out.err.count("\n") == 1 and out.out == ""


def test_the_command_refuses_bad_input_and_an_existing_experiment_with_status_2(tmp_path, capsys):
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(yaml.safe_dump(TINY))
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    argv = [str(experiment), "--storage", str(tmp_path / "runs")]
    rt.start(rt._parser().parse_args(argv))  # a folder left without settings blocks nothing
    (tmp_path / "runs" / "tiny" / run.SETTINGS_FILE).write_text("{}")
    assert rt.main(argv) == 2
    assert "already exists; add --resume to continue it" in capsys.readouterr().err
    assert rt.main([*argv, "--name", "other", "--resume"]) == 2
    assert "no experiment to resume or report there" in (err := capsys.readouterr().err)
    assert "start it without --resume" in err
    assert rt.main(["no_such_experiment"]) == 2
    assert "no such experiment file; experiments: cifar10_large" in capsys.readouterr().err
    assert rt.main(["", "--dry-run"]) == 2  # not the current folder, Path("")
    assert "error: '': no such experiment file; experiments: cifar10" in capsys.readouterr().err
    (tmp_path / "tiny.txt").write_text(yaml.safe_dump(TINY))
    assert rt.main([str(tmp_path / "tiny.txt"), "--dry-run"]) == 2
    assert "tiny.txt: not a .yaml or .yml file; an experiment is a YAML" in capsys.readouterr().err
    assert rt.main([str(tmp_path), "--dry-run"]) == 2
    assert f"{tmp_path}: a folder; an experiment is a YAML file" in capsys.readouterr().err
    assert rt.main([*argv, "--name", "other", "--num-samples", "0"]) == 2
    assert "--num-samples: must be >= 1, got 0" in capsys.readouterr().err
    assert rt.main([*argv, "--name", "other", "--workers-per-trial", "0"]) == 2
    assert "--workers-per-trial: must be >= 1, got 0" in capsys.readouterr().err
    assert rt.main([*argv, "--name", "other", "--workers-per-trial", "3"]) == 2
    assert "data.batch_size: 8 does not split evenly" in capsys.readouterr().err
    for flags, named in [
        (["train.epochs=2"], "key=value overrides"),
        (["--num-samples", "2"], "--num-samples"),
        (["--scheduler", "asha"], "--scheduler"),
        (["--workers-per-trial", "1"], "--workers-per-trial"),
        (["--gpus-per-worker", "1"], "--gpus-per-worker"),
        (["--gpus-per-worker", "0"], "--gpus-per-worker"),
        (["--max-concurrent-trials", "1"], "--max-concurrent-trials"),
    ]:
        assert rt.main([*argv, "--resume", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --resume: {named} cannot change an experiment that has")
    assert rt.main([*argv, "--report", "--num-samples", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: --report: --num-samples cannot change")
    assert rt.main([*argv, "--name", "sub/out"]) == 2
    assert capsys.readouterr().err.startswith("error: --name: 'sub/out' is not a folder name")
    assert not (tmp_path / "runs" / "sub").exists()
    assert rt.main([str(experiment), "--storage", " "]) == 2
    assert capsys.readouterr().err.startswith("error: --storage: empty; give a folder or a URI")


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (
            ["--storage", "/tmp/a", "storage_path=/tmp/b"],
            "--storage /tmp/a: not with storage_path=/tmp/b",
        ),
        (["--num-samples", "2", "search.num_samples=3"], "--num-samples 2: not with search."),
        (["--scheduler", "asha", "search.scheduler=fifo"], "--scheduler asha: not with search."),
        (
            ["--max-concurrent-trials", "2", "search={max_concurrent_trials: 3}"],
            "--max-concurrent-trials 2: not with search.max_concurrent_trials=3",
        ),
        (
            ["--workers-per-trial", "2", "scaling.num_workers=1"],
            "--workers-per-trial 2: not with scaling.num_workers=1",
        ),
        (
            ["--workers-per-trial", "1", "search.workers_per_trial=2"],
            "--workers-per-trial 1: not with search.workers_per_trial=2",
        ),
        (
            ["name=mine"],
            "name=mine: each trial sets its own name (its run is 'train' in its trial folder), so "
            "this changes nothing",
        ),
        (
            ["label=mine"],
            "label=mine: each trial sets its own label (its variant's label and its drawn values), "
            "so this changes nothing",
        ),
    ],
)
def test_an_override_that_a_flag_or_each_trial_sets_is_refused_naming_both(flags, line, capsys):
    """A flag and a key=value override of the setting it sets (--storage a storage_path=b)
    ran with the flag's value unsaid, and name= or label=, which each trial sets for itself,
    changed nothing; each is refused in one line naming both, exit code 2, as --dry-run."""
    assert rt.main(["digits", "--dry-run", *flags]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith(f"error: {line}") and out.err.count("\n") == 1


@pytest.mark.parametrize("key", ["name", "label"])
def test_a_files_own_name_or_label_is_refused_naming_it(tmp_path, capsys, key):
    """A tune file's top-level name: or label:, which `raydeq.train` reads, changed nothing in
    a tune run (each trial sets its own, the experiment is named by --name or the file), as
    the same override is refused; it is refused in one line naming the key, value and file."""
    text = (spec.CONFIG_DIR / "digits.yaml").read_text()
    path = tmp_path / "mine.yaml"
    path.write_text(f"{key}: theirs\n{text}")
    assert rt.main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key}: theirs: each trial sets its own {key}")
    assert err.rstrip().endswith(f"(in {path})") and err.count("\n") == 1


@pytest.mark.parametrize("stem", [".", "..", "a\\b", "a\tb", "a\x7f"])
def test_an_experiment_file_whose_name_is_no_folder_name_is_refused_naming_it(
    tmp_path, capsys, monkeypatch, stem
):
    """Without --name an experiment is named by its file, whose name went unchecked: `...yaml`
    named the folder `..`, the storage's parent, where a start would store its settings and
    trials; a name that is no one folder inside the storage (`.`, `..`, a separator, a control
    character) is refused in one line naming the file, before Ray, and the same file runs
    under a --name."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    monkeypatch.setattr(rt.launch, "check_cluster", lambda: pytest.fail("the cluster was asked"))
    (tmp_path / "runs").mkdir()
    file = tmp_path / f"{stem}.yaml"
    file.write_text(yaml.safe_dump(TINY))
    argv = [str(file), "--storage", str(tmp_path / "runs")]
    for flags in ([], ["--dry-run"], ["--resume"], ["--report"]):
        assert rt.main([*argv, *flags]) == 2, flags
        assert capsys.readouterr() == (
            "",
            f"error: {file}: experiment name: {stem!r} is not a folder name; use letters, "
            "digits, '.', '_' and '-', starting with a letter or a digit; rename the file or "
            "give --name\n",
        ), flags
    assert sorted(os.listdir(tmp_path)) == sorted([file.name, "runs"])
    assert os.listdir(tmp_path / "runs") == []
    assert rt.main([*argv, "--name", "tiny", "--dry-run"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


@pytest.mark.parametrize("stem", ["my exp", "_x", "-x", "résumé", "a" * NAME_MAX])
def test_an_experiment_file_whose_name_is_one_folder_starts_resumes_and_reports_in_it(
    tmp_path, capsys, monkeypatch, stem
):
    """An experiment started from `my exp.yaml` or `_x.yaml`, stored in a folder of that name,
    was refused by --resume and --report for a name that --name would refuse, so its runs could
    not be reached without renaming them; a file's name that is one folder inside the storage
    names the experiment's folder, new or stored."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    monkeypatch.setattr(rt.launch, "check_cluster", lambda: pytest.fail("the cluster was asked"))
    file = tmp_path / f"{stem}.yaml"
    file.write_text(yaml.safe_dump(TINY))
    folder = tmp_path / "runs" / stem
    argv = [str(file), "--storage", str(tmp_path / "runs")]
    assert rt.main([*argv, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["experiment"] == str(folder)
    run.save_settings(str(folder), spec.load(str(file)), run.Options(None, 1, "fifo", 0))
    assert rt.main([*argv, "--resume", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["experiment"] == str(folder)
    assert rt.main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: experiment {folder} already exists; add --resume to continue it, --report "
        "to summarise it, or choose another --name\n"
    )
    assert rt.main([*argv, "--report"]) == 2  # it reads the stored folder, with no trial yet
    assert capsys.readouterr().err.startswith(f"error: {folder}: no trial has been recorded yet")
    with runlock.hold(str(folder)):
        assert set(os.listdir(tmp_path / "runs")) == {f".{stem}.lock", stem}
    with runlock.writing_results(str(folder)):
        assert set(os.listdir(tmp_path / "runs")) == {f".{stem}.results.lock", stem}


@pytest.mark.parametrize("stem", ["a" * (NAME_MAX + 1), "é" * (NAME_MAX // 2 + 1)])
def test_an_experiment_file_whose_name_leaves_no_room_for_its_lock_files_is_refused(
    tmp_path, capsys, stem
):
    """A file's name of more than 241 bytes (121 `é` are 242) leaves the lock files beside the
    experiment's folder no room in a file name of 255 bytes; it is refused naming its length."""
    file = tmp_path / f"{stem}.yaml"
    file.write_text(yaml.safe_dump(TINY))
    assert rt.main([str(file), "--storage", str(tmp_path / "runs"), "--dry-run"]) == 2
    size = "" if stem.isascii() else " (242 bytes)"
    assert capsys.readouterr().err == (
        f"error: {file}: experiment name: a name of {len(stem)} characters{size} is too long; "
        "use at most 241, so that the lock files beside its folder fit in a file name (255 "
        "bytes); rename the file or give --name\n"
    )


def test_an_experiment_file_whose_name_a_uri_storage_takes_only_escaped_is_refused(
    tmp_path, capsys
):
    """`my exp.yaml` under a URI storage names a URI that pyarrow cannot parse (a space is
    written %20 in a URI), where --resume ended in pyarrow's traceback; it is refused naming
    the file."""
    file = tmp_path / "my exp.yaml"
    file.write_text(yaml.safe_dump(TINY))
    storage = f"file:{tmp_path}/runs"
    for flags in ([], ["--resume"], ["--report"]):
        assert rt.main([str(file), "--storage", storage, *flags]) == 2
        assert capsys.readouterr().err == (
            f"error: {file}: experiment name: 'my exp' holds a space or a non-ASCII character, "
            f"which the URI storage {storage} takes only percent-encoded; rename the file or "
            "give --name\n"
        )


def test_a_uri_storage_that_pyarrow_cannot_parse_is_one_line_before_anything_is_read(
    tmp_path, capsys
):
    """A storage URI with a space (file:///data/my runs) ended a start, --resume, --report and
    --dry-run in pyarrow's ArrowInvalid traceback, read for a stored experiment before the
    storage was checked; each now exits 2 giving the URI's percent-encoded form."""
    storage = f"file://{tmp_path}/my runs"
    for flags in ([], ["--resume"], ["--report"], ["--dry-run"]):
        assert rt.main(["digits", "--storage", storage, *flags]) == 2
        assert capsys.readouterr().err == (
            f"error: storage_path {storage} is not a URI that pyarrow reads: a space or a "
            "non-ASCII character in a URI is written percent-encoded, as in "
            f"file://{tmp_path}/my%20runs\n"
        )
    assert not (tmp_path / "my runs").exists()


def test_the_flags_of_a_new_run_override_the_experiment_files_search_settings(capsys):
    search = {"num_samples": 3, "scheduler": "fifo", "max_concurrent_trials": 2}
    experiment = spec.from_dict("x", {**TINY, "search": search})
    flags = ["--num-samples", "5", "--scheduler", "asha", "--max-concurrent-trials", "4"]
    args = rt._parser().parse_intermixed_args(["x", *flags, "--gpus-per-worker", "0.5"])
    given = run.Options(gpus=0.5, num_samples=5, scheduler="asha", max_concurrent=4)
    assert rt.new_options(args, experiment) == given
    plain = rt._parser().parse_intermixed_args(["x"])
    assert rt.new_options(plain, experiment) == run.Options(None, 3, "fifo", 2)
    assert rt.main(["x", "--gpus-per-worker", "-1"]) == 2
    assert capsys.readouterr().err == "error: --gpus-per-worker: must be >= 0, got -1\n"


def test_gpu_shares_ray_or_nccl_would_refuse_in_every_trial_are_one_line(tmp_path, capsys):
    """A fraction of a GPU per worker shares GPUs between one-worker trials, but puts a
    trial's DDP workers on one GPU, which NCCL refuses; Ray refuses 1.5 GPUs outright. GPUs
    that scaling.device contradicts (the workers train on the GPU they hold, or the CPU) are
    refused naming both."""
    experiment = tmp_path / "x.yaml"
    experiment.write_text(yaml.safe_dump(TINY))
    flags = ["--dry-run", "--storage", str(tmp_path)]
    assert rt.main([str(experiment), *flags, "--gpus-per-worker", "0.5"]) == 0
    capsys.readouterr()
    two = ["--workers-per-trial", "2", "--gpus-per-worker", "0.5"]
    assert rt.main([str(experiment), *flags, *two]) == 2
    assert capsys.readouterr().err == (
        "error: --gpus-per-worker: 0.5 with 2 workers per trial would put a trial's workers on "
        "one GPU, where DDP (NCCL) cannot run two ranks; give 1, or --workers-per-trial 1 to "
        "share GPUs between trials\n"
    )
    assert rt.main([str(experiment), *flags, "--gpus-per-worker", "1.5"]) == 2
    assert capsys.readouterr().err.startswith("error: --gpus-per-worker: 1.5 is above 1 and not")
    assert rt.main([str(experiment), *flags, "--gpus-per-worker", "2"]) == 0
    capsys.readouterr()
    for share in ("nan", "inf"):  # a stored share of nan or inf could not be resumed
        assert rt.main([str(experiment), *flags, "--gpus-per-worker", share]) == 2
        assert capsys.readouterr().err == (
            f"error: --gpus-per-worker: expected a finite number >= 0, got {share}\n"
        )
    # scaling.device cpu with a GPU trained on the GPU, cuda with none on the CPU.
    for share, device in (("1", "cpu"), ("0.5", "cpu"), ("0", "cuda")):
        argv = [str(experiment), *flags, "--gpus-per-worker", share, f"scaling.device={device}"]
        assert rt.main(argv) == 2
        assert capsys.readouterr().err == (
            f"error: --gpus-per-worker {share}: not with scaling.device {device}, which the "
            "workers would not train on; give one of them (scaling.device auto follows "
            "--gpus-per-worker)\n"
        )
    for share, device in (("0", "cpu"), ("1", "cuda"), ("0", "auto")):
        argv = [str(experiment), *flags, "--gpus-per-worker", share, f"scaling.device={device}"]
        assert rt.main(argv) == 0


def run_without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the command run to its end without a cluster: the variables it sets are undone after
    the test, it connects to nothing and its report is `table of <path>`."""
    for variable in ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "RAY_AIR_NEW_OUTPUT"):
        monkeypatch.setenv(variable, os.environ.get(variable, "set by the command"))
    monkeypatch.setenv("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    monkeypatch.setenv("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    monkeypatch.setattr(rt.launch, "check_cluster", lambda: None)
    monkeypatch.setattr(rt.launch, "connect", lambda log_to_driver: False)
    monkeypatch.setattr(run, "trial_workers", lambda *args: (1, {"CPU": 1.0}))
    monkeypatch.setattr(rt.launch, "waiting_note", lambda *args: None)
    monkeypatch.setattr(rt, "report", lambda path, experiment: f"table of {path}")


def test_a_pending_trial_limit_tune_cannot_run_with_is_one_line_before_ray_starts(
    tmp_path, capsys, monkeypatch
):
    """TUNE_MAX_PENDING_TRIALS_PG=abc failed `tune digits` in Tune's 38-line traceback after Ray
    started, and 0 started no trial, waiting without a word until stopped (100 s here)."""
    monkeypatch.setattr(rt.launch, "check_cluster", lambda: None)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    argv = ["digits", "--storage", str(tmp_path)]
    for value in ("abc", "0", "-1", "1.5"):
        monkeypatch.setenv(run.PENDING_LIMIT, value)
        assert rt.main(argv) == 2
        assert capsys.readouterr().err == (
            f"error: TUNE_MAX_PENDING_TRIALS_PG={value}: Tune takes `auto` or a whole number of "
            "at least 1 (0 starts no trial); unset it, or give such a number\n"
        )
    assert not (tmp_path / "digits" / run.SETTINGS_FILE).exists()
    for value in ("auto", "1", "16"):
        monkeypatch.setenv(run.PENDING_LIMIT, value)
        run.check_pending_limit()


def test_trials_tune_had_not_added_when_it_was_stopped_count_as_unfinished(monkeypatch):
    """`tune digits` stopped before Tune had added its trials (TUNE_MAX_PENDING_TRIALS_PG=0
    added none) printed an empty results table as the experiment's end and no resume command;
    the trials not added count as unfinished, so it exits 130 with the resume command."""
    experiment = spec.load("digits")
    options = run.Options(gpus=0, num_samples=1, scheduler="fifo", max_concurrent=0)
    done = SimpleNamespace(status=Trial.TERMINATED)
    monkeypatch.setattr(
        run, "tuner", lambda *args: SimpleNamespace(fit=lambda: SimpleNamespace(errors=[]))
    )
    for recorded, unfinished in [([], 6), ([done] * 2, 4), ([done] * 6, 0)]:
        monkeypatch.setattr(run, "recorded_trials", lambda path, r=recorded: r)
        assert run.fit(experiment, "runs/digits", options, resume=False) == (0, unfinished)


def test_a_run_with_failed_trials_exits_1_and_an_interrupted_one_130_with_its_resume_command(
    tmp_path, capsys, monkeypatch
):
    """The command's status once Tune returns: 0 when every trial finished, 1 when some failed
    (the report is written either way), with a last line counting them and naming the command
    that retries them (the run ended on Tune's list of their ids), 130 with the command that
    resumes this experiment, its storage and its name, when trials are left unfinished."""
    run_without_ray(monkeypatch)
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump(TINY))
    storage = tmp_path / "runs"
    for name, (errors, unfinished), status in [
        ("done", (0, 0), 0),
        ("failed", (2, 0), 1),
        ("stopped", (0, 1), 130),
    ]:
        monkeypatch.setattr(run, "fit", lambda *args, ended=(errors, unfinished): ended)
        argv = [str(file), "--storage", str(storage), "--name", name]
        assert rt.main(argv) == status, name
        out, err = capsys.readouterr()
        resume = f"python -m raydeq.tune {file} --resume --storage {storage} --name {name}"
        if errors:
            assert err.splitlines()[-1] == (
                f"failed trials: {errors}, each named above with its error; --resume retries "
                f"them from their last checkpoints: {resume}"
            )
        if unfinished:
            assert err.splitlines()[-1] == f"interrupted; resume with: {resume}"
            assert "table of" not in out
            # The command printed resumes the experiment it started (its settings are kept).
            monkeypatch.setattr(run, "fit", lambda *args: (0, 0))
            assert rt.main(shlex.split(resume)[3:]) == 0
            assert f"table of {storage}/{name}\n" in capsys.readouterr().out
        else:
            assert f"table of {storage}/{name}\n" in out


def test_the_resume_command_of_a_run_stored_by_a_storage_path_override_finds_it(
    tmp_path, capsys, monkeypatch
):
    """`storage_path=FOLDER` places the run in FOLDER, and --resume refuses key=value: the
    printed command names FOLDER with --storage, and it resumes that run."""
    run_without_ray(monkeypatch)
    monkeypatch.setattr(run, "fit", lambda *args: (0, 1))
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump(TINY))
    storage = tmp_path / "elsewhere"
    assert rt.main([str(file), f"storage_path={storage}"]) == 130
    resume = f"python -m raydeq.tune {file} --resume --storage {storage}"
    assert capsys.readouterr().err.splitlines()[-1] == f"interrupted; resume with: {resume}"
    monkeypatch.setattr(run, "fit", lambda *args: (0, 0))
    assert rt.main(shlex.split(resume)[3:]) == 0
    assert f"table of {storage}/tiny\n" in capsys.readouterr().out


def test_the_resume_command_of_a_relative_file_and_storage_path_resumes_from_another_folder(
    tmp_path, capsys, monkeypatch
):
    """A file and a storage_path relative to the folder the run started in: the printed
    command names both absolute, so that run from another folder it resumes that run."""
    run_without_ray(monkeypatch)
    monkeypatch.setattr(run, "fit", lambda *args: (0, 1))
    (tmp_path / "start").mkdir()
    (tmp_path / "start" / "tiny.yaml").write_text(yaml.safe_dump(TINY | {"storage_path": "runs"}))
    monkeypatch.chdir(tmp_path / "start")
    assert rt.main(["tiny.yaml"]) == 130
    command = capsys.readouterr().err.splitlines()[-1].removeprefix("interrupted; resume with: ")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run, "fit", lambda *args: (0, 0))
    assert rt.main(shlex.split(command)[3:]) == 0
    assert f"table of {tmp_path}/start/runs/tiny\n" in capsys.readouterr().out


def test_the_resume_command_of_an_experiment_given_by_name_resumes_from_another_folder(
    tmp_path, capsys, monkeypatch
):
    """An experiment named as `tiny` (its file tune_configs/tiny.yaml in the folder the run
    started in): the printed command names that file absolute, so that run from another
    folder, which has no tune_configs/, it resumes that run."""
    run_without_ray(monkeypatch)
    monkeypatch.setattr(run, "fit", lambda *args: (0, 1))
    (tmp_path / "start" / "tune_configs").mkdir(parents=True)
    file = tmp_path / "start" / "tune_configs" / "tiny.yaml"
    file.write_text(yaml.safe_dump(TINY | {"storage_path": "runs"}))
    monkeypatch.chdir(tmp_path / "start")
    assert rt.main(["tiny"]) == 130
    command = capsys.readouterr().err.splitlines()[-1].removeprefix("interrupted; resume with: ")
    assert shlex.split(command)[3] == str(file)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run, "fit", lambda *args: (0, 0))
    assert rt.main(shlex.split(command)[3:]) == 0
    assert f"table of {tmp_path}/start/runs/tiny\n" in capsys.readouterr().out


def test_ctrl_c_in_the_preflight_exits_130_in_one_line(tmp_path, capsys, monkeypatch):
    """Checking every trial's data and model before Ray starts may take a while: Ctrl-C there
    ends with 130 and a line, not a traceback, and stores no settings."""

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(yaml.safe_dump(TINY))
    monkeypatch.setattr(rt, "check_run", interrupt)
    assert rt.main([str(experiment), "--storage", str(tmp_path / "runs")]) == 130
    assert capsys.readouterr().err == "\ninterrupted before the trials started\n"
    assert not run.has_settings(str(tmp_path / "runs" / "tiny"))


def test_ctrl_c_in_a_dry_run_exits_130_in_one_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C (or SIGTERM) while --dry-run lists a search's trials ends with 130 and a line,
    not a traceback."""
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(yaml.safe_dump(TINY))
    monkeypatch.setattr(rt, "expand", lambda *args: os.kill(os.getpid(), signal.SIGTERM))
    assert rt.main([str(experiment), "--storage", str(tmp_path / "runs"), "--dry-run"]) == 130
    assert capsys.readouterr().err == "\ninterrupted while listing the trials\n"


def test_stored_settings_whose_aliases_expand_past_the_limit_or_without_end_are_refused(tmp_path):
    """Stored settings from elsewhere whose aliases nest (nine lists of nine, eight deep) hung
    --report and --resume, and an alias within its own value ended in a RecursionError; each
    is refused, naming the file, as the safe loader that wrote them reads them otherwise."""
    stored = tmp_path / run.SETTINGS_FILE
    options = "options: {gpus: null, num_samples: 1, scheduler: fifo, max_concurrent: 0}\n"
    nested = (
        "experiment:\n  model:\n    solver_options:\n      x0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
    )
    for depth in range(1, 9):
        nested += f"      x{depth}: &a{depth} [{', '.join([f'*a{depth - 1}'] * 9)}]\n"
    stored.write_text(nested + options)
    lists = [10]  # a list of nine is itself and its nine values; each next one, nine of these
    for _ in range(8):
        lists.append(1 + 9 * lists[-1])
    # The root, three keys and three mappings to the lists, options' key, mapping and 8 values.
    expanded = 7 + 10 + sum(1 + size for size in lists)
    with pytest.raises(ConfigError) as err:
        run.load_settings(str(tmp_path))
    written = 7 + 9 + 10 + 8 + 10  # as above, x0 to x8, the lists, and options' 10
    assert str(err.value) == (
        f"{stored}: invalid YAML at line 1: its aliases expand its {written} keys and values to "
        f"{expanded}, past the {MAX_YAML_VALUES} more that aliases may add; write the repeated "
        "values out"
    )
    stored.write_text("experiment: &a\n  model: {solver_options: *a}\n" + options)
    with pytest.raises(ConfigError) as err:
        run.load_settings(str(tmp_path))
    assert str(err.value) == (
        f"{stored}: invalid YAML at line 1: an alias within the value it names (&a [*a]) "
        "repeats it endlessly"
    )
    stored.write_text(
        yaml.safe_dump({"experiment": TINY, "options": yaml.safe_load(options)["options"]})
    )
    raw = run.load_settings(str(tmp_path))[0].raw
    assert {key: raw[key] for key in TINY} == TINY


def test_stored_settings_that_are_no_text_or_bad_name_the_file_with_status_2(
    tmp_path, capsys, monkeypatch
):
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(yaml.safe_dump(TINY))
    folder = tmp_path / "runs" / "tiny"
    folder.mkdir(parents=True)
    argv = [str(experiment), "--storage", str(tmp_path / "runs"), "--report"]
    stored = folder / run.SETTINGS_FILE
    stored.write_bytes(b"\x1f\x8b\x08\x00")
    assert rt.main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: {stored}: not a YAML text file (byte 0x8b at offset 1 is not UTF-8)\n"
    )
    stored.unlink()
    stored.mkdir()
    assert rt.main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: {stored} cannot be read: Cannot open for reading: path '{stored}' is a directory\n"
    )
    stored.rmdir()
    stored.write_text("experiment: {}\n")

    def failing(path: str) -> bytes:
        """A read that the disk fails."""
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as patched:
        patched.setattr(run, "read_bytes", failing)
        assert rt.main(argv) == 2
    assert capsys.readouterr().err == f"error: {stored} cannot be read: Input/output error\n"
    stored.unlink()
    # Cut short: before anything was written, and inside a quoted value (a YAML error of many
    # lines, given by its first).
    stored.write_text("")
    assert rt.main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: {stored} holds no experiment settings (TypeError: 'NoneType' object is not "
        "subscriptable)\n"
    )
    stored.write_text('experiment:\n  model:\n    model: "mnist_de')
    assert rt.main(argv) == 2
    assert capsys.readouterr().err == (
        f"error: {stored}: invalid YAML at line 3: found unexpected end of stream\n"
    )
    stored.unlink()
    bad = {**TINY, "model": {**TINY["model"], "solver": "nope"}}
    options = vars(run.Options(None, 1, "fifo", 0))
    stored.write_text(yaml.safe_dump({"experiment": bad, "options": options}))
    assert rt.main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: {stored}: model.solver: 'nope' is not")
    # Edited into no mapping (a traceback, "unsupported operand type(s) for |: 'list'", and
    # "'int' object is not iterable" for the variants).
    for edited, named in [
        ([1, 2], "tiny: expected a mapping"),
        ({**TINY, "search": [1]}, "search"),
        ({**TINY, "search": {"variants": 3}}, "search.variants: expected a list of mappings"),
    ]:
        stored.write_text(yaml.safe_dump({"experiment": edited, "options": options}))
        assert rt.main(argv) == 2
        assert capsys.readouterr().err.startswith(f"error: {stored}: {named}")


def test_the_stored_settings_give_back_the_experiment_and_every_option(tmp_path):
    """Each option the run started with (GPUs, samples, scheduler, limit), and the experiment
    named by its folder with its overrides."""
    experiment = spec.from_dict("tiny", {**TINY, "search": {"num_samples": 2}}, {"seed": 4})
    options = run.Options(gpus=0.25, num_samples=5, scheduler="asha", max_concurrent=3)
    folder = str(tmp_path / "runs" / "mine")
    assert not run.has_settings(folder)
    run.save_settings(folder, experiment, options)
    assert run.has_settings(folder)
    loaded, stored = run.load_settings(folder)
    assert stored == options
    assert loaded.name == "mine" and loaded.trial_config({}).seed == 4
    assert loaded.search.num_samples == 2


def test_stored_settings_read_back_a_text_that_looks_like_a_number_as_text(tmp_path):
    """safe_dump writes the text "1e-3" unquoted, which PyYAML's safe loader reads as text and
    raydeq's config reader as the number 0.001: the stored settings are read as written."""
    variants = [{"label": "1e-3", "optim.lr": 0.001}, {"label": "1e-2", "optim.lr": 0.01}]
    experiment = spec.from_dict("labels", {**TINY, "search": {"variants": variants}})
    folder = str(tmp_path / "labels")
    run.save_settings(folder, experiment, run.Options(None, 1, "fifo", 0))
    loaded, _ = run.load_settings(folder)
    assert loaded.raw["search"]["variants"] == variants


def test_a_stored_search_of_no_mode_keeps_the_max_it_was_started_with(tmp_path):
    """An experiment stored when an unset mode meant max (its Tune searcher and scheduler built
    with max) is read back in mode max, not its metric's min, so that --resume and --report
    rank as the search ran; one stored now keeps its metric's min."""
    old = tmp_path / "old"
    old.mkdir()
    search = {"metric": "train_loss", "num_samples": 2}
    options = vars(run.Options(None, 2, "fifo", 0))
    stored = {"experiment": {**TINY, "search": search}, "options": options}
    (old / run.SETTINGS_FILE).write_text(yaml.safe_dump(stored))
    assert run.load_settings(str(old))[0].search.mode == "max"
    new = str(tmp_path / "new")
    run.save_settings(
        new, spec.from_dict("new", {**TINY, "search": search}), run.Options(**options)
    )
    assert run.load_settings(new)[0].search.mode == "min"


def test_a_stored_experiment_of_a_setting_without_effect_resumes_at_its_default(tmp_path):
    """An experiment stored when momentum under Adam was taken (and had no effect) is read
    back with momentum at its default, where its settings were refused and --resume could
    not go on; one whose variant runs SGD, where that momentum took effect, is refused still."""
    base = {**TINY, "optim": {"optimizer": "adam", "momentum": 0.95}}
    options = vars(run.Options(None, 1, "fifo", 0))
    space = {"search": {"space": {"optim.lr": {"choice": [0.001, 0.01]}}}}
    (tmp_path / run.SETTINGS_FILE).write_text(
        yaml.safe_dump({"experiment": base | space, "options": options})
    )
    experiment, _ = run.load_settings(str(tmp_path))
    optim = experiment.trial_config({"optim": {"lr": 0.01}}).optim
    assert (optim.optimizer, optim.lr, optim.momentum) == ("adam", 0.01, 0.9)
    variants = {"search": {"variants": [{"optim.optimizer": "sgd"}]}}
    (tmp_path / run.SETTINGS_FILE).write_text(
        yaml.safe_dump({"experiment": base | variants, "options": options})
    )
    with pytest.raises(ConfigError, match="optim.momentum: 0.95 applies to optim.optimizer=sgd"):
        run.load_settings(str(tmp_path))


def test_the_stored_settings_keep_the_workers_given_over_workers_per_trial(tmp_path):
    """`--workers-per-trial 2` (scaling.num_workers=2) over a file's workers_per_trial 1: the
    resumed or reported experiment's trials have 2 workers, as the run's had, not 1."""
    raw = {**TINY, "search": {"workers_per_trial": 1}}
    experiment = spec.from_dict("tiny", raw, {"scaling.num_workers": 2})
    folder = str(tmp_path / "runs" / "tiny")
    run.save_settings(folder, experiment, run.Options(None, 1, "fifo", 0))
    loaded, _ = run.load_settings(folder)
    assert loaded.trial_config({}).scaling.num_workers == 2
    assert spec.from_dict("tiny", raw).trial_config({}).scaling.num_workers == 1


def test_stored_options_edited_out_of_range_are_one_line_errors_naming_the_option(tmp_path):
    """The options a resume reads back are checked as the command line's are: an unknown
    scheduler would run FIFO and a negative limit no limit, so each names the file and the
    option; a missing option is no settings at all."""
    folder = tmp_path / "runs" / "tiny"
    stored = folder / run.SETTINGS_FILE
    good = {"gpus": None, "num_samples": 1, "scheduler": "fifo", "max_concurrent": 0}
    errors = {
        "scheduler": (
            "ashaa",
            "options.scheduler: 'ashaa' is not allowed; choose one of fifo, asha",
        ),
        "max_concurrent": (-1, "options.max_concurrent: must be >= 0, got -1"),
        "num_samples": (0, "options.num_samples: must be >= 1, got 0"),
        "gpus": (-0.5, "options.gpus: must be >= 0, got -0.5"),
    }
    run.save_settings(str(folder), spec.from_dict("tiny", TINY), run.Options(**good))
    for key, (value, message) in errors.items():
        stored.write_text(yaml.safe_dump({"experiment": TINY, "options": good | {key: value}}))
        with pytest.raises(ConfigError) as err:
            run.load_settings(str(folder))
        assert str(err.value) == f"{stored}: {message}"
    stored.write_text(
        yaml.safe_dump(
            {"experiment": TINY, "options": {k: v for k, v in good.items() if k != "gpus"}}
        )
    )
    with pytest.raises(ConfigError, match="holds no experiment settings .*'gpus'"):
        run.load_settings(str(folder))


def test_asha_lets_the_longest_variant_finish_and_a_drawn_length_run_unbounded():
    """max_t is past the longest trial's last step: variants of 40 and 90 steps over a base of
    60 give 91, so the 90-step trial is not stopped at 61; a search that draws train.max_steps
    has no bound it can know before the run (2**31)."""
    variants = [{"train.max_steps": 40}, {"train.max_steps": 90}]
    search = {"scheduler": "asha", "variants": variants}
    raw = {**TINY, "train": {"max_steps": 60}, "search": search}
    options = run.Options(gpus=0, num_samples=1, scheduler="asha", max_concurrent=0)
    assert run._scheduler(spec.from_dict("a", raw), options, "runs/a")._max_t == 91
    drawn = {"scheduler": "asha", "space": {"train": {"max_steps": {"choice": [30, 120]}}}}
    assert spec.from_dict("a", raw | {"search": drawn}).longest_trial() == 0
    assert (
        run._scheduler(spec.from_dict("a", raw | {"search": drawn}), options, "runs/a")._max_t
        == 2**31
    )
    rule = {"when": {"model.solver": "vcab3"}, "space": {"train.max_steps": {"randint": [9, 99]}}}
    solvers = {"model.solver": {"choice": ["vcab3", "tsit5"]}}
    conditional = {"searcher": "tpe", "space": solvers, "conditional": [rule]}
    assert spec.from_dict("a", raw | {"search": conditional}).longest_trial() == 0
    assert spec.from_dict("a", raw | {"search": {"scheduler": "asha"}}).longest_trial() == 60


def test_asha_lets_a_trial_whose_section_choice_draws_its_length_run_to_its_end():
    """A choice of whole train sections drew train.max_steps 120 over the base's 60, which the
    longest trial did not see: max_t was 61, and ASHA stopped the 120-step trial at its report
    at step 66 as past max_t, and a grace_period of 70 would be refused as past every trial's
    last step. Its length is drawn, as a dimension's is (max_t 2**31)."""
    space = {"train": {"choice": [{"max_steps": 30}, {"max_steps": 120}]}}
    search = {"scheduler": "asha", "space": space, "grace_period": 10}
    experiment = spec.from_dict("a", {**TINY, "train": {"max_steps": 60}, "search": search})
    assert [s["train"]["max_steps"] for s in spec.expand(experiment, 2)] == [120, 120]
    assert experiment.longest_trial() == 0
    options = run.Options(gpus=0, num_samples=2, scheduler="asha", max_concurrent=0)
    scheduler = run._scheduler(experiment, options, "runs/a")
    scheduler.set_search_properties("test_accuracy", "max")
    trial = SimpleNamespace(trial_id="t0", path="runs/a/t0")
    scheduler.on_trial_add(None, trial)
    action = scheduler.on_trial_result(None, trial, {"step": 66, "test_accuracy": 0.9})
    assert action == run.TrialScheduler.CONTINUE
    later = search | {"grace_period": 70}
    run.check_scheduler(
        spec.from_dict("a", {**TINY, "train": {"max_steps": 60}, "search": later}), "asha"
    )


def test_asha_checks_a_search_whose_section_choice_leaves_the_length_to_the_base():
    """A choice of whole train sections that set lambda_skip alone counted as drawing
    train.max_steps: the trials' 60 steps went unread, so a max_t of 30, which stops every
    trial at step 30, and a grace_period of 60, which stops none, were run unrefused."""
    space = {"train": {"choice": [{"lambda_skip": 0.1}, {"lambda_skip": 1.0}]}}
    search = {"scheduler": "asha", "space": space, "grace_period": 10}
    raw = {**TINY, "train": {"max_steps": 60}}
    experiment = spec.from_dict("a", raw | {"search": search})
    assert experiment.longest_trial() == 60
    assert run.asha_max_t(experiment) == 61
    for bad, message in [
        ({"max_t": 30}, "search.max_t: 30 is below the longest trial's train.max_steps, 60"),
        ({"grace_period": 60}, "search.grace_period: 60 is not below the longest trial's"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            run.check_scheduler(spec.from_dict("a", raw | {"search": search | bad}), "asha")
    mixed = {"train": {"choice": [{"lambda_skip": 0.1}, {"max_steps": 120}]}}
    assert spec.from_dict("a", raw | {"search": {"space": mixed}}).longest_trial() == 0


def test_an_asha_grace_period_or_max_t_past_a_trial_of_epochs_is_refused():
    """Trials of 2 epochs of 179 batches of 8 digits end at step 358: a grace_period of 358 or
    500 stopped none and a max_t of 300 cut every one, unrefused, where a train.max_steps of
    358 was refused; the epochs' steps count as the trial's length, and as its end where a
    train.max_steps past them never comes. Epochs the search draws leave it unknown."""
    base = {**TINY, "train": {"epochs": 2}}
    asha = {"scheduler": "asha"}
    experiment = spec.from_dict("a", base | {"search": asha})
    assert experiment.longest() == (358, "358 steps (train.epochs: 2 of 179 steps)")
    assert run.asha_max_t(experiment) == 359
    for bad, message in [
        (
            {"grace_period": 358},
            "search.grace_period: 358 is not below the longest trial's "
            "358 steps (train.epochs: 2 of 179 steps): ASHA's first rung would come at or after "
            "every trial's last step and stop none; give less than 358",
        ),
        ({"grace_period": 500}, "search.grace_period: 500 is not below"),
        ({"max_t": 300}, "search.max_t: 300 is below the longest trial's 358 steps"),
    ]:
        for train in ({"epochs": 2}, {"epochs": 2, "max_steps": 1000}):
            with pytest.raises(ConfigError, match=re.escape(message)):
                search = asha | bad
                run.check_scheduler(
                    spec.from_dict("a", base | {"train": train, "search": search}), "asha"
                )
    run.check_scheduler(
        spec.from_dict("a", base | {"search": asha | {"grace_period": 357}}), "asha"
    )
    capped = spec.from_dict("a", {**TINY, "train": {"epochs": 2, "max_steps": 100}})
    assert capped.longest() == (100, "train.max_steps, 100")
    batches = {"data.batch_size": {"grid_search": [8, 16]}}
    assert spec.from_dict("a", base | {"search": {"space": batches}}).longest() == (0, "")


def test_asha_bounds_trials_of_epochs_beside_a_variant_of_steps_by_their_epochs():
    """A variant of 40 steps beside one that trains for its epochs (no max_steps): ASHA's
    max_t is past the epochs' 1,790 steps (10 of 179 batches of 8 digits), not 41, which
    stopped the trial of epochs at step 41; beside an image folder's epochs, of a size not
    known before its data is read, it is unbounded; a grace period past a search's max_t for
    trials of epochs names that max_t."""
    variants = [{"train.max_steps": 40}, {"optim.lr": 0.01}]
    experiment = spec.from_dict("a", {**TINY, "search": {"variants": variants}})
    assert experiment.longest_trial() == 1790
    assert run.asha_max_t(experiment) == 1791
    folder = {"data.dataset": "imagenet", "data.data_dir": "/x", "model.model": "imagenet_small"}
    unsized = spec.from_dict("a", {**TINY, "search": {"variants": [variants[0], folder]}})
    assert unsized.longest() == (0, "")
    assert run.asha_max_t(unsized) == 2**31
    past = spec.from_dict("a", {**TINY, "search": {"max_t": 30, "grace_period": 50}})
    with pytest.raises(ConfigError) as err:
        run.check_scheduler(past, "asha")
    assert str(err.value) == (
        "search.grace_period: 50 is past ASHA's max_t, 30 (search.max_t); it must be at most 30"
    )


def test_asha_without_a_reachable_dashboard_is_an_error_naming_the_fix(monkeypatch):
    def down(**kwargs):
        raise TimeoutError("no answer")

    monkeypatch.setattr(ray.util.state, "list_nodes", down)
    with pytest.raises(ConfigError) as err:
        run.check_dashboard()
    assert str(err.value) == (
        "scheduler asha: the Ray dashboard (state API) is not reachable, so workers of stopped "
        "trials would never be released (TimeoutError); start Ray with the dashboard "
        "(ray[default]) or use --scheduler fifo"
    )
    monkeypatch.setattr(ray.util.state, "list_nodes", lambda **kwargs: [])
    run.check_dashboard()


def test_a_dry_run_lists_the_trials_the_run_draws_and_a_resumed_one_its_stored_count(
    tmp_path, capsys, monkeypatch
):
    """Random values come from the experiment's seed, in the dry run as in Tune's generator;
    --resume --dry-run lists the sample count the experiment was started with."""
    space = {"optim.lr": {"loguniform": [1e-4, 1e-2]}, "seed": {"grid_search": [0, 1]}}
    raw = {**TINY, "search": {"num_samples": 3, "space": space}}
    experiment = spec.from_dict("tiny", raw)
    listed = [s["optim"]["lr"] for s in spec.expand(experiment)]
    assert listed == [s["optim"]["lr"] for s in spec.expand(experiment)]
    assert len(set(listed)) == 3 and listed[0] == listed[1]
    monkeypatch.setattr(run, "concurrency", lambda *args, **kwargs: 6)
    generator = run.search_algorithm(experiment, run.Options(None, 3, "fifo", 0), "runs/tiny")
    ray.tune.register_trainable("tiny", lambda config: None)
    generator.add_configurations(
        {"tiny": {"config": experiment.param_space(), "num_samples": 3, "run": "tiny"}}
    )
    drawn = []
    while (trial := generator.next_trial()) is not None:
        drawn.append(trial.config["optim"]["lr"])
    assert drawn == listed
    path = tmp_path / "runs" / "tiny"
    run.save_settings(str(path), experiment, run.Options(None, 1, "fifo", 0))
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump(raw))
    argv = [str(file), "--storage", str(tmp_path / "runs"), "--resume", "--dry-run"]
    assert rt.main(argv) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_the_trials_at_once_follow_the_runs_gpus_and_limit_and_draws_the_experiments_seed(
    monkeypatch,
):
    """The bound on live trials is the concurrency for the run's GPUs and limit; Tune's random
    sampling draws from the experiment's seed (7) as the dry run lists; an Optuna searcher
    gets the seed and the bound."""
    asked = []

    def concurrency(experiment, gpus, limit=0):
        asked.append((gpus, limit))
        return 4

    monkeypatch.setattr(run, "concurrency", concurrency)
    space = {"optim.lr": {"loguniform": [1e-4, 1e-2]}}
    grid = spec.from_dict("g", {**TINY, "seed": 7, "search": {"num_samples": 3, "space": space}})
    generator = run.search_algorithm(grid, run.Options(0.5, 3, "fifo", 2), "runs/g")
    assert generator.max_concurrent == 4 and asked == [(0.5, 2)]
    ray.tune.register_trainable("g", lambda config: None)
    configurations = {"config": grid.param_space(), "num_samples": 3, "run": "g"}
    generator.add_configurations({"g": configurations})
    drawn = []
    while (trial := generator.next_trial()) is not None:
        drawn.append(trial.config["optim"]["lr"])
    assert drawn == [sampled["optim"]["lr"] for sampled in spec.expand(grid)]
    given = []

    def searcher(space, search, seed, bound):
        given.append((seed, bound()))
        return ray.tune.search.Searcher()

    monkeypatch.setattr(run.searchers, "searcher", searcher)
    optuna = spec.from_dict("o", {**TINY, "seed": 7, "search": {"searcher": "tpe", "space": space}})
    assert isinstance(
        run.search_algorithm(optuna, run.Options(None, 3, "fifo", 0), "o"), run.SearchHere
    )
    assert given == [(7, 4)]
    assert asked[-1] == (None, 0)


def test_a_restored_variant_generator_lets_in_as_many_trials_as_the_cluster_holds_now():
    """Tune restores the bound saved with the run: a cluster grown from 3 trials to 5 since
    the run started lets 5 in after a resume."""
    cluster = {"trials": 3}

    def bound():
        return cluster["trials"]

    generator = run.VariantsWithinCapacity("e", bound, constant_grid_search=True, random_state=0)
    assert generator.max_concurrent == 3
    state = generator.get_state()
    cluster["trials"] = 5
    restored = run.VariantsWithinCapacity("e", bound, constant_grid_search=True, random_state=0)
    restored.set_state(state)
    assert restored.max_concurrent == 5


def test_an_experiment_running_here_is_not_started_or_resumed_twice(tmp_path, capsys, monkeypatch):
    """While a process here runs an experiment, a second start or --resume of it is refused
    before Ray starts; --dry-run and --report, which train nothing, still run."""
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(yaml.safe_dump(TINY))
    argv = [str(experiment), "--storage", str(tmp_path / "runs")]
    with runlock.hold(str(tmp_path / "runs" / "tiny")):
        assert rt.main(argv) == 2
        assert f"is being run by process {os.getpid()} on this machine" in capsys.readouterr().err
        assert rt.main([*argv, "--dry-run"]) == 0
        options = run.Options(gpus=None, num_samples=1, scheduler="fifo", max_concurrent=0)
        run.save_settings(str(tmp_path / "runs" / "tiny"), spec.load(str(experiment)), options)
        assert rt.main([*argv, "--resume"]) == 2
        assert "is being run by process" in capsys.readouterr().err
        # Stopped before Tune recorded a trial: nothing to report, and said so.
        assert rt.main([*argv, "--report"]) == 2
        assert "no trial has been recorded yet" in capsys.readouterr().err
    (tmp_path / "runs" / "tiny" / run.SETTINGS_FILE).write_text("{}")
    assert rt.main([*argv, "--resume"]) == 2
    assert f"{run.SETTINGS_FILE} holds no experiment settings (KeyError" in capsys.readouterr().err


def test_dry_run_prints_every_trials_resolved_config_without_ray(capsys, monkeypatch):
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    assert rt.main(["digits", "--dry-run"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["label"] for line in lines] == [
        f"{variant}, seed={seed}"
        for variant in ("Vanilla DEQ", "Skip DEQ", "Skip Reg. DEQ")
        for seed in (0, 1)
    ]
    assert {line["experiment"] for line in lines} == {str(Path("runs", "digits").absolute())}
    config = lines[0]["config"]
    assert config["model"]["variant"] == "vanilla" and config["seed"] == 0
    assert config["train"]["lambda_skip"] == 0.2 and config["scaling"]["num_workers"] == 1


def test_a_dry_run_prints_the_folder_name_and_workers_each_trial_runs_with(
    tmp_path, capsys, monkeypatch
):
    """--dry-run --storage DIR printed each trial's config with the file's storage_path and a
    train run's name, where the trial writes its Train run `train` in its own folder of
    DIR/NAME; it now prints the config the trial runs with, as run_trial builds it."""
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump({**TINY, "storage_path": str(tmp_path / "file")}))
    argv = [str(file), "--storage", str(tmp_path / "runs"), "--name", "other"]
    assert rt.main([*argv, "--workers-per-trial", "2", "--dry-run"]) == 0
    (line,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    folder = tmp_path / "runs" / "other"
    assert line["experiment"] == str(folder)
    config = line["config"]
    assert config["storage_path"] == f"{folder}/{rt.UNNAMED_TRIAL}"
    assert config["name"] == storage.TRAIN_RUN and config["scaling"]["num_workers"] == 2
    experiment = spec.load(str(file), ["scaling.num_workers=2"])
    ran = run.trial_config(experiment, {}, f"{folder}/{rt.UNNAMED_TRIAL}").to_dict()
    assert config == json.loads(json.dumps({k: v for k, v in ran.items() if k != "search"}))


def test_a_dry_run_into_a_uri_storage_prints_each_trial(tmp_path, capsys, monkeypatch):
    """--dry-run --storage URI ended in pyarrow's traceback ("Cannot parse URI ... at
    character '<'") for a trial that leaves lambda_skip to its preset: its checkpoints were
    looked for in the placeholder of its folder, which Tune names as the trial starts."""
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump(TINY))
    uri = f"file://{tmp_path}/runs"
    assert rt.main([str(file), "--storage", uri, "--dry-run"]) == 0
    (line,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert line["config"]["storage_path"] == f"{uri}/tiny/{rt.UNNAMED_TRIAL}"
    assert line["config"]["train"]["lambda_skip"] == PRESETS["mnist_dense"].lambda_skip


def test_an_experiment_written_as_its_tune_configs_path_is_found_from_any_folder(
    tmp_path, monkeypatch
):
    """`python -m raydeq.tune tune_configs/digits.yaml`, as the help writes it and as
    `raydeq.train` takes it, was 'no such experiment file' in a folder without tune_configs/
    of its own (an installed raydeq); it reads the shipped file, as the name `digits` does."""
    monkeypatch.chdir(tmp_path)
    assert spec.locate("tune_configs/digits.yaml") == spec.locate("digits")
    assert spec.locate("digits") == spec.CONFIG_DIR / "digits.yaml"
    own = tmp_path / "tune_configs" / "digits.yaml"
    own.parent.mkdir()
    own.write_text(yaml.safe_dump(TINY))
    assert spec.locate("tune_configs/digits.yaml") == Path("tune_configs/digits.yaml")
    with pytest.raises(ConfigError, match="tune_configs/nosuch.yaml: no such experiment file"):
        spec.locate("tune_configs/nosuch.yaml")


def test_a_dry_run_read_only_in_part_exits_0_without_a_traceback():
    command = [sys.executable, "-m", "raydeq.tune", "imagenet", "--dry-run"]  # 24 lines
    dry = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(dry.stdout.readline())["label"].startswith("Vanilla Continuous DEQ")
    dry.stdout.close()  # as `| head -1` does
    assert dry.wait(timeout=60) == 0 and b"Traceback" not in dry.communicate()[1]


def source_copy(folder: Path) -> Path:
    """A copy of the files that a wheel is built from, in `folder`: a build in the checkout
    packs whatever its build/ holds from the builds before, files no longer shipped included."""
    folder.mkdir()
    for name in ("pyproject.toml", "README.md", "raydeq", "tune_configs"):
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(ROOT / name, folder / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy(ROOT / name, folder / name)
    return folder


def test_an_installed_raydeq_finds_its_experiments_from_any_folder(tmp_path):
    """The wheel holds every file raydeq reads at run time; it is built from a copy, since one
    built in the checkout passed with them dropped from the package data once it had run."""
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    source = source_copy(tmp_path / "source")
    subprocess.run([*build, "-w", str(wheels), str(source)], check=True, capture_output=True)
    (wheel,) = wheels.glob("raydeq-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(site)  # what installing a pure-Python wheel does
    assert {f"raydeq/tune_configs/{p.name}" for p in (ROOT / "tune_configs").glob("*.yaml")} <= set(
        names
    )
    assert {f"raydeq/datasets/mnist10k/{n}" for n in datasets.MNIST10K_FILES} <= set(names)
    assert "raydeq/experiments/paper_numbers.csv" in names
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.yaml").write_text(yaml.safe_dump(TINY))
    env = os.environ | {"PYTHONPATH": str(site)}
    probe = "import raydeq, raydeq.datasets as d; print(raydeq.__file__, len(d.mnist10k(False)[1]))"
    commands = {
        "digits": [sys.executable, "-m", "raydeq.tune", "digits", "--dry-run"],
        "mine.yaml": [sys.executable, "-m", "raydeq.tune", "mine.yaml", "--dry-run"],
        "probe": [sys.executable, "-c", probe],
    }
    started = {  # side by side: each is a process's start and its imports
        name: subprocess.Popen(
            command,
            cwd=elsewhere,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, command in commands.items()
    }
    out = {}
    for name, process in started.items():
        out[name], err = process.communicate()
        assert process.returncode == 0, err[-2000:]
    assert len(out["digits"].splitlines()) == 6 and len(out["mine.yaml"].splitlines()) == 1
    assert out["probe"].startswith(str(site)) and out["probe"].split()[1] == "2000"


def test_a_failed_trial_is_one_line_with_its_error_and_the_count_of_trials_done(
    tmp_path, capsys, monkeypatch
):
    """Tune printed each failure's whole traceback (678 lines for four diverging trials); the
    traceback stays in the trial's error.txt."""
    (tmp_path / "error.txt").write_text(
        "Failure # 1\nTraceback (most recent call last):\n  File x, line 1\n"
        "raydeq.training.loop.NonFiniteError: training stopped at step 4\n\n"
    )
    trial = SimpleNamespace(
        config={"variant": {"label": "Skip"}},
        error_file=str(tmp_path / "error.txt"),
        path=str(tmp_path),
        num_failures=1,
        max_failures=3,
        status="RUNNING",
    )
    done = SimpleNamespace(status="TERMINATED")
    lines = run.TrialLines(3, spec.from_dict("x", TINY), str(tmp_path.parent))
    lines.on_trial_recover(0, [done, trial], trial)
    lines.on_trial_error(0, [done, trial], trial)
    recovered, failed = capsys.readouterr().out.splitlines()
    error = "failed (NonFiniteError: training stopped at step 4)"
    assert recovered == f"trial Skip: {error}; restart 1 of 3"
    assert failed == f"trial Skip: {error}, see {tmp_path}/error.txt (2 of 3 trials done)"
    record = logging.LogRecord(
        "ray.tune.execution.tune_controller",
        logging.ERROR,
        "",
        0,
        "Trial task failed for trial t",
        None,
        None,
    )
    other = logging.makeLogRecord({"name": record.name, "msg": "Trial t errored"})
    tune_filters_kept(monkeypatch)
    rt.drop_tune_logs()
    tune_logger = logging.getLogger(record.name)
    assert not tune_logger.filter(record) and tune_logger.filter(other)
    listed = logging.makeLogRecord(
        {"name": "ray.tune.tune", "msg": "Trials did not complete: %s", "args": (["t"],)}
    )
    assert not logging.getLogger(listed.name).filter(listed)
    # A resumed trial pruning a checkpoint its interrupted driver pruned already: nothing is
    # lost, and the record goes; any other failure over a checkpoint stays.
    gone = FileNotFoundError(f"Path not found: (fs, {tmp_path}/t/checkpoint_000132)")
    for error, kept in [(gone, False), (OSError("disk full"), True)]:
        pruned = logging.makeLogRecord(
            {
                "name": record.name,
                "msg": "Trial %s: Error handling checkpoint %s",
                "args": ("t", "TrainingResult(...)"),
                "exc_info": (type(error), error, None),
            }
        )
        assert tune_logger.filter(pruned) == kept


def tune_filters_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the filters that drop_tune_logs adds to Tune's loggers go with the test."""
    for name in (*rt.DROPPED_LOGS, rt.STATE_SAVE_LOGGER, rt.SYNC_LOGGER):
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "filters", list(logger.filters))


def test_tunes_failed_save_of_the_experiments_state_is_one_line_naming_the_cause(monkeypatch):
    """A full storage under Tune's save of the experiment's state: Tune logged the path and a
    20-line traceback ending in pyarrow's OSError, again at every later save; it is one line,
    the path and the error, and a record without an exception is left as it was."""
    logger = logging.getLogger(rt.STATE_SAVE_LOGGER)
    tune_filters_kept(monkeypatch)
    rt.drop_tune_logs()
    full = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left")
    said = "Saving experiment state to storage at '/runs/digits' failed with exception: "
    failed = logging.makeLogRecord(
        {"name": logger.name, "msg": said, "exc_info": (OSError, full, None)}
    )
    assert logger.filter(failed) and failed.exc_info is None
    assert logging.Formatter().format(failed) == (
        f"{said}OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left"
    )
    other = logging.makeLogRecord({"name": logger.name, "msg": "Saving took %d s", "args": (31,)})
    assert logger.filter(other) and other.getMessage() == "Saving took 31 s"


def test_rays_failed_sync_of_the_experiments_state_is_one_line_naming_the_cause(monkeypatch):
    """A full storage under Ray's periodic sync of the experiment's folder: Ray's syncer logged
    'Last sync command failed with the following error:' and the 25-line traceback of
    pyarrow's OSError in the message, at every sync (5 times in `tune digits` on a 5 MB
    tmpfs); it is one line, ending in the error, and a record without a traceback is left."""
    logger = logging.getLogger(rt.SYNC_LOGGER)
    tune_filters_kept(monkeypatch)
    rt.drop_tune_logs()
    full = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left")

    def copy() -> None:
        raise ValueError("an error the copy handled")

    try:
        try:
            copy()
        except ValueError:
            raise full  # noqa: B904 (a chained traceback: the last error is the one said)
    except OSError:
        trace = traceback.format_exc()
    said = "Last sync command failed with the following error:"
    failed = logging.makeLogRecord({"name": logger.name, "msg": f"{said}\n{trace}"})
    assert trace.count("\n") > 5 and logger.filter(failed)
    assert logging.Formatter().format(failed) == (
        f"{said} OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left"
    )
    other = logging.makeLogRecord({"name": logger.name, "msg": "Synced %d files", "args": (3,)})
    assert logger.filter(other) and other.getMessage() == "Synced 3 files"


def test_tunes_failed_save_with_a_many_line_error_keeps_the_errors_first_line(monkeypatch):
    """An error of several lines under Tune's failed save of the experiment's state is said by
    its first line, the one that names the cause, after its type."""
    logger = logging.getLogger(rt.STATE_SAVE_LOGGER)
    tune_filters_kept(monkeypatch)
    rt.drop_tune_logs()
    error = OSError("Error writing bytes to file\nDetail: [errno 28] No space left on device")
    failed = logging.makeLogRecord(
        {"name": logger.name, "msg": "Saving failed: ", "exc_info": (OSError, error, None)}
    )
    assert logger.filter(failed)
    assert (
        logging.Formatter().format(failed) == "Saving failed: OSError: Error writing bytes to file"
    )


def test_a_failed_trials_line_names_its_exception_not_the_last_line_of_error_txt():
    """The line took error.txt's last line as the error: a CUDA error's last hint
    (`Compile with TORCH_USE_CUDA_DSA ...`), and for a trial whose process was killed a
    paragraph of 1,100 characters from Ray's account; it names the newest failure's exception
    (a Train trial's worker's), or the dead process's pid and Ray's first sentence."""
    frames = '  File "/x/loop.py", line 426, in train\n    self.step()\n           ^^^^^^\n'
    cuda = (
        "Failure # 1 (occurred at 2026-12-07_15-01-22)\n"
        f"ray::ImplicitFunc.train() (pid=3445, ip=10.0.0.1)\n{frames}"
        "ValueError: an earlier failure\n"
        "Failure # 2 (occurred at 2026-12-07_15-01-33)\n"
        f"ray::ImplicitFunc.train() (pid=3800, ip=10.0.0.1)\n{frames}"
        "torch.AcceleratorError: CUDA error: device-side assert triggered\n"
        "CUDA kernel errors might be asynchronously reported at some other API call\n"
        "For debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
        "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n\n"
    )
    train = (
        f"Failure # 1 (occurred at 2026-12-07_15-01-22)\nray::ImplicitFunc.train()\n{frames}"
        "ray.train.v2.api.exceptions.TrainingFailedError: Training failed due to worker errors:\n"
        f"[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n{frames}"
        "raydeq.training.data.DataError: /data/cifar10 is missing\n"
    )
    killed = (
        "Failure # 1 (occurred at 2026-12-07_15-04-35)\n"
        "The actor died unexpectedly before finishing this task.\n"
        "\tclass_name: ImplicitFunc\n\tactor_id: c18a42413b14a22ac3e9921501000000\n"
        "\tpid: 7239\n\tip: 192.0.2.2\n"
        "The actor is dead because its worker process has died. Worker exit type: "
        "SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error "
        "code 2. End of file. Some common causes include: (1) the process was killed by the "
        "OOM killer due to high memory usage, (2) ray stop --force was called\n"
    )
    assert run.failure_reason(cuda) == "AcceleratorError: CUDA error: device-side assert triggered"
    assert run.failure_reason(train) == "DataError: /data/cifar10 is missing"
    assert run.failure_reason(killed) == (
        "its process (pid 7239) died: The actor is dead because its worker process has died"
    )
    assert run.failure_reason("\n") is None


def test_a_trial_of_several_workers_whose_worker_died_names_its_pid_not_trains_wrapper():
    """A trial of two workers whose second worker was killed (SIGKILL, the OOM killer) failed
    with Train's `WorkerGroupError: Training failed due to worker errors:` after the trial's
    own frames, its worker's account of the death below it; the line named that wrapper,
    neither the worker's pid nor why it died. It names them, as for a trial of one process."""
    frames = '  File "/x/run.py", line 120, in run_trial\n    launch.fit(cfg)\n'
    died = (
        "Failure # 1 (occurred at 2026-12-07_15-04-35)\n"
        f"ray::ImplicitFunc.train() (pid=3445, ip=10.0.0.1)\n{frames}"
        "ray.train.v2.api.exceptions.WorkerGroupError: Training failed due to worker errors:\n"
        "[Rank 1 Error Snippet]:\nA worker health check failed.\n"
        "Worker info: Worker(actor=Actor(RayTrainWorker, 5e1f), metadata=...)\n"
        "The actor died unexpectedly before finishing this task.\n"
        "\tclass_name: RayTrainWorker\n\tactor_id: 5e1f\n\tpid: 8123\n\tip: 192.0.2.2\n"
        "The actor is dead because its worker process has died. Worker exit type: "
        "SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error\n"
    )
    assert run.failure_reason(died) == (
        "its process (pid 8123) died: The actor is dead because its worker process has died"
    )


def test_a_trial_whose_two_workers_died_names_the_first_ones_pid_and_reason():
    """Two workers of a trial died: Train lists each one's account in turn under its
    WorkerGroupError; the line names the first worker's pid and reason, not the last's."""
    account = "The actor died unexpectedly before finishing this task.\n"
    died = (
        "Failure # 1 (occurred at 2026-12-07_15-04-35)\n"
        "ray.train.v2.api.exceptions.WorkerGroupError: Training failed due to worker errors:\n"
        f"[Rank 0 Error Snippet]:\n{account}\tclass_name: RayTrainWorker\n\tpid: 8123\n"
        "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR\n"
        f"[Rank 1 Error Snippet]:\n{account}\tclass_name: RayTrainWorker\n\tpid: 8124\n"
        "The actor died because its node has died. Node ID: 8a1f.\n"
    )
    assert run.failure_reason(died) == (
        "its process (pid 8123) died: The actor is dead because its worker process has died"
    )


def test_a_trial_whose_process_died_without_a_pid_names_the_first_sentence_of_rays_reason():
    """Ray writes no pid line for an actor whose process it never saw start (its node died
    first); the line then named the last line of Ray's account, its node's reason of 500
    characters. It names the first sentence of the reason, without a pid."""
    node = "The actor died because its node has died. Node ID: 8a1f. " + "x" * 500
    died = (
        "Failure # 1 (occurred at 2026-12-07_15-04-35)\n"
        "The actor died unexpectedly before finishing this task.\n"
        f"\tclass_name: ImplicitFunc\n\tactor_id: c18a\n\tip: 192.0.2.2\n{node}\n"
    )
    assert run.failure_reason(died) == (
        "its process died: The actor died because its node has died"
    )


def test_a_failed_trials_error_file_is_named_at_its_experiments_uri(capsys):
    """Tune's trial.path has no URI scheme: a failed trial of an experiment on S3 named its
    traceback `bucket/runs/x/t1_seed=1/error.txt`, no file a reader could open; the line names
    it in the experiment's folder, `s3://bucket/runs/x/t1_seed=1/error.txt`."""
    trial = SimpleNamespace(
        config={"seed": 1}, error_file=None, path="bucket/runs/x/t1_seed=1", status="ERROR"
    )
    lines = run.TrialLines(1, spec.from_dict("x", TINY), "s3://bucket/runs/x")
    lines.on_trial_error(0, [trial], trial)
    where = "s3://bucket/runs/x/t1_seed=1/error.txt"
    assert capsys.readouterr().out == f"trial seed=1: failed, see {where} (1 of 1 trials done)\n"


def test_a_trial_asha_stopped_is_counted_stopped_while_the_run_goes_on():
    """A --report while the driver runs: of three seeds, one trained to its end, ASHA stopped
    one (Tune's TERMINATED, short of its last step) and one still runs. The Seeds cell read
    `3 (2 running)`, the stopped trial among them; it reads `3 (1 stopped, 1 running)`, and
    once no driver runs, `3 (2 stopped)`."""
    rows = [
        {"group": "Skip DEQ", "seed": seed, "completed": done, "status": status}
        | dict.fromkeys(("train_time", "backward_time", "predict_time", "test_nfe"), 0.5)
        | {"parameters": 1234, "test_accuracy": accuracy}
        for seed, done, status, accuracy in [
            (0, True, "TERMINATED", 0.97),
            (1, False, "TERMINATED", 0.42),
            (2, False, "RUNNING", 0.61),
        ]
    ]
    assert "| Skip DEQ | 3 (1 stopped, 1 running) | 97.00 |" in results.markdown(rows, "running")
    assert "| Skip DEQ | 3 (2 stopped) | 97.00 |" in results.markdown(rows)


def test_the_table_averages_finished_seeds_per_variant_and_the_parquet_round_trips(tmp_path):
    rows = [
        {"group": "Skip DEQ", "seed": seed, "completed": done, "parameters": 1234, "step": step}
        | dict.fromkeys(("train_time", "backward_time", "predict_time"), 0.5)
        | {"test_accuracy": accuracy, "test_nfe": nfe}
        for seed, done, step, accuracy, nfe in [
            (0, True, 100, 0.97, 10.0),
            (1, True, 100, 0.98, 12.0),
            (2, False, 20, 0.10, 30.0),
        ]
    ]
    table = results.markdown(rows)
    assert "| Skip DEQ | 3 (1 stopped) | 97.50 ± 0.71 | 0.5 ± 0 | 0.5 ± 0 | 0.5 ± 0 |" in table
    assert "| 11.0 ± 1.4 | 1,234 |" in table
    assert "skipped" not in table
    # A trial that ended in an error is counted as failed, not as stopped early.
    failed = results.markdown([*rows, rows[2] | {"seed": 3, "status": "ERROR"}])
    assert "| Skip DEQ | 4 (1 stopped, 1 failed) | 97.50 ± 0.71 |" in failed
    assert "| Skip DEQ | 3 (1 running) | 97.50 ± 0.71 |" in results.markdown(rows, "running")
    skipped = [row | {"skipped_steps": 3.0 * (row["seed"] == 1)} for row in rows]
    assert results.markdown(skipped).endswith(
        "\nSteps skipped for a non-finite loss or gradient: Skip DEQ seed 1: 3 of 100.\n"
    )
    path = tmp_path / "results.parquet"
    pq.write_table(results.results_table(rows), path)
    assert pq.read_table(path).to_pylist() == rows
    # A setting of values of several types (compile searched over False and "graph") is one
    # column of their text, which pyarrow cannot type otherwise; a missing value stays null.
    mixed = [row | {"config.model.compile": c} for row, c in zip(rows, [False, "graph", None])]
    pq.write_table(results.results_table(mixed), path)
    stored = [row["config.model.compile"] for row in pq.read_table(path).to_pylist()]
    assert stored == ["False", "graph", None]


def test_a_trials_row_holds_its_last_evaluation_and_its_reports_mean_solve_times():
    """A trial's row in results.parquet: its group without its seed (the table averages a
    group's seeds), the test metrics of its last evaluation (the reports between evaluations
    carry none), the forward and backward times averaged over its reports and the training
    time per step their sum, and `completed` once it reached max_steps."""
    variant = {"label": "Skip", "model.variant": "skip"}
    search = {"variants": [variant], "space": {"seed": {"grid_search": [6171, 3859]}}}
    settings = TINY | {"train": {"epochs": 1, "max_steps": 30}, "search": search}
    experiment = spec.from_dict("rows", settings)
    sampled = {"seed": 3859, "variant": variant}
    trial = SimpleNamespace(trial_id="abc12_00001", status="TERMINATED", config=sampled)
    frame = pd.DataFrame(
        {
            "step": [10, 20, 30],
            "epoch": [10 / 179, 20 / 179, 30 / 179],
            "test_accuracy": [0.5, math.nan, 0.9],
            "forward_time": [0.1, 0.2, 0.6],
            "backward_time": [0.3, 0.3, 0.6],
            "skipped_steps": [0.0, 1.0, 2.0],
        }
    )
    row = results.trial_row(experiment, trial, frame)
    assert (row["group"], row["seed"], row["paper"], row["step"]) == ("Skip", 3859, True, 30)
    assert row["completed"] and row["test_accuracy"] == 0.9 and row["skipped_steps"] == 2.0
    assert row["forward_time"] == pytest.approx(0.3) and row["backward_time"] == pytest.approx(0.4)
    assert row["train_time"] == pytest.approx(0.7)
    cut = results.trial_row(experiment, trial, frame.iloc[:2])
    assert not cut["completed"] and cut["test_accuracy"] == 0.5 and cut["step"] == 20


def test_a_trials_row_holds_no_search_settings_that_stand_for_the_experiments():
    """A TPE search with ASHA and a cost: a trial's config has no search section of its own,
    and its row held that section's defaults (config.search.searcher 'random',
    config.search.scheduler 'fifo', config.search.cost None) as if the trial had run so."""
    search = {
        "searcher": "tpe",
        "scheduler": "asha",
        "grace_period": 5,
        "cost": "test_nfe",
        "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}},
    }
    experiment = spec.from_dict("rows", TINY | {"search": search})
    trial = SimpleNamespace(trial_id="abc12", status="TERMINATED", config={"optim": {"lr": 2e-3}})
    row = results.trial_row(experiment, trial, pd.DataFrame({"step": [10], "test_accuracy": [0.5]}))
    assert [key for key in row if key.startswith("config.search")] == []
    assert (row["config.optim.lr"], row["config.model.solver"]) == (2e-3, "vcab3")


def write_reports(file: Path, reports: list[dict]) -> None:
    """Write reports as Tune's result.json holds them, one JSON object per line."""
    file.write_text("".join(json.dumps(report) + "\n" for report in reports))


def test_a_trials_history_joins_the_reports_archived_before_each_resume_in_step_order(tmp_path):
    """Tune starts result.json anew in each session: the archived reports come first, in the
    order they were archived (the 10th after the 2nd), and where two report a step the later
    one wins."""
    trial = tmp_path / "trial"
    trial.mkdir()
    for number, reports in [
        (2, [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}]),
        (10, [{"step": 20, "loss": 1.5}, {"step": 30, "loss": 1.0}]),
    ]:
        lines = "".join(json.dumps(report) + "\n" for report in reports)
        (trial / f"{archive.ARCHIVE_PREFIX}{number}.json").write_text(lines)
    write_reports(
        trial / archive.RESULT_FILE, [{"step": 30, "loss": 0.9}, {"step": 40, "loss": 0.5}]
    )
    frame = archive.history(str(trial))
    assert frame["step"].tolist() == [10, 20, 30, 40]
    assert frame["loss"].tolist() == [3.0, 1.5, 0.9, 0.5]


def test_a_step_the_driver_never_recorded_comes_from_the_checkpoint_that_kept_it(tmp_path):
    """A driver stopped after a trial's checkpoint of step 20 was stored and before it recorded
    that report: the step comes from the checkpoint's reports, and where the result files have
    a step too their row wins (a resumed trial's later report of it)."""
    kept = tmp_path / "checkpoint_000001"
    kept.mkdir()
    write_reports(kept / REPORTS_FILE, [{"step": 10, "loss": 9.0}, {"step": 20, "loss": 2.0}])
    write_reports(tmp_path / archive.RESULT_FILE, [{"step": 10, "loss": 3.0}])
    frame = archive.history(str(tmp_path))
    assert frame["step"].tolist() == [10, 20]
    assert frame["loss"].tolist() == [3.0, 2.0]


def test_a_trial_folder_removed_from_a_local_experiment_holds_no_reports_as_on_s3(tmp_path):
    """A trial's folder removed from a local experiment stopped --report in pyarrow's
    FileNotFoundError traceback, where S3, which has no folders, finds no reports in it; it
    is read as S3 reads it, and the report names the trial as short of its last step."""
    (tmp_path / "kept").mkdir()
    write_reports(tmp_path / "kept" / archive.RESULT_FILE, [{"step": 10, "loss": 3.0}])
    assert archive.history(str(tmp_path / "kept"))["step"].tolist() == [10]
    gone = archive.history(str(tmp_path / "gone"))
    assert gone.empty and list(gone.columns) == []


@pytest.mark.parametrize(
    ("altered", "steps", "losses"), [(False, [10, 20], [3.0, 2.0]), (True, [10], [3.0])]
)
def test_a_checkpoints_reports_that_fail_its_manifests_checksum_are_left_out(
    tmp_path, caplog, altered, steps, losses
):
    """A checkpoint's reports.jsonl is checked against the size and SHA-256 its manifest
    records, as loading the checkpoint checks it: a copy altered since (step 20's loss 2.0
    read 7.0 in the tables) is left out as a missing one is, with a warning naming it."""
    kept = write_checkpoint(
        {"step": 20},
        tmp_path / "checkpoint_000001",
        [{"step": 10, "loss": 9.0}, {"step": 20, "loss": 2.0}],
    )
    if altered:
        text = (kept / REPORTS_FILE).read_text()
        (kept / REPORTS_FILE).write_text(text.replace("2.0", "7.0"))
    write_reports(tmp_path / archive.RESULT_FILE, [{"step": 10, "loss": 3.0}])
    with caplog.at_level(logging.WARNING):
        frame = archive.history(str(tmp_path))
    assert frame["step"].tolist() == steps
    assert frame["loss"].tolist() == losses
    warned = [r.getMessage() for r in caplog.records]
    assert warned == (
        [f"{kept / REPORTS_FILE} fails the checksum its {MANIFEST_FILE} records: left out"]
        if altered
        else []
    )


def test_a_checkpoints_reports_read_while_ray_copies_them_after_its_manifest_are_kept(
    tmp_path, caplog, monkeypatch
):
    """Ray copies a checkpoint into the trial's folder file by file, its manifest often
    first: a --report that found the reports file there still empty warned that it failed
    its manifest's checksum and left out its reports, which the driver has not recorded yet;
    a file just written that fails it is read again once the copy has gone on."""
    whole = write_checkpoint(
        {"step": 20}, tmp_path / "source", [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}]
    )
    copied = tmp_path / "checkpoint_000001"
    copied.mkdir()
    shutil.copy(whole / MANIFEST_FILE, copied)
    (copied / REPORTS_FILE).write_bytes(b"")
    waits = []

    def copy_goes_on(seconds: float) -> None:
        waits.append(seconds)
        shutil.copy(whole / REPORTS_FILE, copied)

    monkeypatch.setattr(time, "sleep", copy_goes_on)
    with caplog.at_level(logging.WARNING):
        frame = archive.history(str(tmp_path))
    assert frame["step"].tolist() == [10, 20]
    assert frame["loss"].tolist() == [3.0, 2.0]
    assert caplog.records == [] and len(waits) == 1


def test_a_report_while_a_trial_prunes_a_checkpoint_it_is_reading_keeps_the_trials_steps(
    tmp_path, monkeypatch
):
    """--report beside a running trial, which pruned its checkpoint of step 20 (having stored
    step 40's) after the report found that checkpoint's reports.jsonl and before it opened it:
    the report ended in pyarrow's FileNotFoundError of that file; the checkpoint is now read
    as one pruned before the listing, and the trial's steps come from its other files."""
    pruned = write_checkpoint(
        {"step": 20}, tmp_path / "checkpoint_000001", [{"step": 10}, {"step": 20, "loss": 2.0}]
    )
    write_checkpoint(
        {"step": 40},
        tmp_path / "checkpoint_000002",
        [{"step": 30, "loss": 1.5}, {"step": 40, "loss": 1.0}],
    )
    write_reports(
        tmp_path / archive.RESULT_FILE, [{"step": s, "loss": 5.0 - s / 10} for s in (10, 20)]
    )
    opened = archive.filesystem

    class PrunedOnceFound:
        """The trial's filesystem, whose driver prunes step 20's checkpoint once a reader has
        found its reports."""

        def __init__(self, fs: pyarrow.fs.FileSystem) -> None:
            self.fs = fs

        def __getattr__(self, name: str) -> object:
            return getattr(self.fs, name)

        def get_file_info(self, path: object) -> object:
            found = self.fs.get_file_info(path)
            if path == f"{pruned}/{REPORTS_FILE}":
                shutil.rmtree(pruned)
            return found

    monkeypatch.setattr(
        archive, "filesystem", lambda path: (PrunedOnceFound(opened(path)[0]), opened(path)[1])
    )
    frame = archive.history(str(tmp_path))
    assert frame["step"].tolist() == [10, 20, 30, 40]
    assert frame["loss"].tolist() == [4.0, 3.0, 1.5, 1.0]


def test_the_reports_of_a_trial_of_several_workers_are_read_from_its_train_runs_checkpoints(
    tmp_path,
):
    """A trial of K > 1 workers keeps its checkpoints in its Train run (`train/`): the reports
    they keep for a driver stopped before it recorded them were read from the trial folder's
    own checkpoints alone, none, so the history lost steps 20 and 30; they are read there
    too, as they are for a trial of one worker."""
    write_reports(tmp_path / archive.RESULT_FILE, [{"step": 10, "loss": 3.0}])
    reports = [{"step": 20, "loss": 2.0}, {"step": 30, "loss": 1.0}]
    write_checkpoint({"step": 30}, tmp_path / storage.TRAIN_RUN / "checkpoint_000001", reports)
    frame = archive.history(str(tmp_path))
    assert frame["step"].tolist() == [10, 20, 30]
    assert frame["loss"].tolist() == [3.0, 2.0, 1.0]


def test_a_result_file_cut_in_its_last_line_keeps_every_whole_report(tmp_path):
    """A driver stopped while writing a report leaves result.json's last line cut short, and
    a resume archives it so: the trial's history keeps every whole report of both files and
    their nested config flattened as Tune names it (Tune's own reader drops such a file)."""
    lines = [{"step": 10, "loss": 2.0, "config": {"model": {"solver": "vcab3"}}}, {"step": 20}]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (tmp_path / f"{archive.ARCHIVE_PREFIX}0.json").write_text(text[:-6])
    (tmp_path / archive.RESULT_FILE).write_text(text.replace("10", "30")[:-3])
    frame = archive.history(str(tmp_path))
    assert frame["step"].tolist() == [10, 30]
    assert frame["loss"].tolist() == [2.0, 2.0]
    assert frame["config/model/solver"].tolist() == ["vcab3", "vcab3"]


def test_a_resume_leaves_out_a_cut_last_line_that_tune_would_join_to_the_next_report(tmp_path):
    """Tune resumes a trial with a checkpoint by appending to a copy of its result file: a
    last line a stopped driver cut short was joined to the first report after the resume,
    a line before the last that is no report, and every report and run's end after named it
    and wrote nothing. The resume archives that line and leaves it out of the result file."""
    trial = tmp_path / "trial"
    trial.mkdir()
    write_checkpoint({"step": 20}, trial / "checkpoint_000001", [{"step": 20, "loss": 8.0}])
    text = "".join(json.dumps({"step": s, "loss": 10.0 - s / 10}) + "\n" for s in (10, 20, 30))
    file = trial / archive.RESULT_FILE
    file.write_text(text[:-6])
    os.utime(file, (time.time() - 60, time.time() - 60))  # stopped a while ago
    archive.archive_results(str(tmp_path))
    assert file.read_text() == text[: text.index('{"step": 30')]
    assert (trial / f"{archive.ARCHIVE_PREFIX}0.json").read_text() == text[:-6]
    with file.open("a") as tune_goes_on:  # Tune's JSON logger, on its copy of the file
        tune_goes_on.write(json.dumps({"step": 30, "loss": 6.5}) + "\n")
    frame = archive.history(str(trial))
    assert frame["step"].tolist() == [10, 20, 30]
    assert frame["loss"].tolist() == [9.0, 8.0, 6.5]


@pytest.mark.parametrize("found", [0, 1000], ids=["emptied", "cut-mid-line"])
def test_a_result_file_read_while_its_driver_copies_it_in_place_keeps_every_report(
    tmp_path, monkeypatch, found
):
    """A running driver copies result.json into the storage in place, emptying it first: a
    --report that read it mid-copy counted the trial as one with no reports (no step, no
    accuracy) or without those past the cut; a file just written that is empty or cut short
    is read again once the copy has gone on."""
    reports = [{"step": 10 * i, "test_accuracy": i / 100} for i in range(1, 101)]
    text = "".join(json.dumps(report) + "\n" for report in reports)
    file = tmp_path / archive.RESULT_FILE
    file.write_text(text[:found])
    assert not text[:found].endswith("\n")
    waits = []

    def copy_goes_on(seconds: float) -> None:
        waits.append(seconds)
        file.write_text(text)

    monkeypatch.setattr(time, "sleep", copy_goes_on)
    frame = archive.history(str(tmp_path))
    assert frame["step"].tolist() == [10 * i for i in range(1, 101)]
    assert frame["test_accuracy"].iloc[-1] == 1.0
    assert len(waits) == 1


@pytest.mark.parametrize(("text", "steps"), [("", []), ('{"step": 10}\n{"step": 2', [10])])
def test_a_result_file_empty_or_cut_and_left_alone_is_read_once_without_waiting(
    tmp_path, monkeypatch, text, steps
):
    """A trial yet to report, or a driver stopped mid-line, leaves its result file so for good:
    one not written to for a while is read at once, its cut last line left out, as is an
    archive written just now by a resume, which keeps such a line."""
    file = tmp_path / archive.RESULT_FILE
    file.write_text(text)
    os.utime(file, (time.time() - 60, time.time() - 60))
    (tmp_path / f"{archive.ARCHIVE_PREFIX}0.json").write_text(text.replace("1", "2"))
    monkeypatch.setattr(time, "sleep", lambda seconds: pytest.fail("waited"))
    frame = archive.history(str(tmp_path))
    assert frame.get("step", pd.Series(dtype=int)).tolist() == sorted(
        {*steps, *(s * 2 for s in steps)}
    )


def test_a_result_file_whose_last_line_is_cut_in_a_character_keeps_every_whole_report(tmp_path):
    """A last line cut inside a character of two bytes (a file with text beyond ASCII, or one
    damaged to hold a byte that is no UTF-8) ended --report and a run's end in a
    UnicodeDecodeError traceback, where a last line cut anywhere else is left out; it is left
    out as those are."""
    text = '{"step": 10, "loss": 2.0}\n{"step": 20, "label": "é"}\n'.encode()
    file = tmp_path / archive.RESULT_FILE
    file.write_bytes(text[: text.index("é".encode()) + 1])
    os.utime(file, (time.time() - 60, time.time() - 60))  # cut a while ago: read at once
    frame = archive.history(str(tmp_path))
    assert frame["step"].tolist() == [10] and frame["loss"].tolist() == [2.0]


def test_a_result_file_with_a_broken_line_before_its_last_names_the_file_and_line(tmp_path):
    """Only a last line can be cut by a stop; a broken line before it is named, not skipped."""
    (tmp_path / archive.RESULT_FILE).write_text('{"step": 10}\n{"step": 2\n{"step": 30}\n')
    with pytest.raises(ValueError, match=r"result.json, line 2: not a JSON report"):
        archive.history(str(tmp_path))


@pytest.mark.parametrize(
    ("edited", "shown"),
    [(b"[1, 2]\n", "'[1, 2]'"), (b'{"step": 2\n', "'{\"step\": 2'"), (b"\xff\n", "'\ufffd'")],
)
def test_a_result_file_edited_by_hand_is_one_line_naming_its_line_in_report_and_a_runs_end(
    tmp_path, capsys, monkeypatch, edited, shown
):
    """A trial's result.json with a line that is JSON but no report, no JSON, or no UTF-8
    before its last ended --report and the results at a run's end in a traceback (TypeError
    'All items in data must be of type dict', ValueError, UnicodeDecodeError); each is one
    line naming the file and line, the trials' files as they were."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(results, "plot", lambda *args: b"")
    file, folder = stored_tiny_experiment(tmp_path)
    [trial, _] = recorded_tiny_trials(folder, ["TERMINATED", "TERMINATED"], monkeypatch)
    result = Path(trial.path, archive.RESULT_FILE)
    result.write_bytes(b'{"step": 10}\n' + edited + result.read_bytes())
    kept = sorted(folder.rglob("*"))
    line = f"{result}, line 2: not a JSON report: {shown}"
    assert rt.main([str(file), "--storage", str(tmp_path / "runs"), "--report"]) == 1
    assert capsys.readouterr() == ("", f"error: {line}\n")
    assert rt.write_results(str(folder), spec.from_dict("tiny", TINY), errors=0) == 1
    assert capsys.readouterr() == (
        "",
        f"error: {line}; the trials' reports are kept: --report writes the results from them\n",
    )
    assert sorted(folder.rglob("*")) == kept


def test_a_finished_trial_started_again_keeps_its_last_steps_training_measures(tmp_path):
    """A trial resumed from its last checkpoint reports that step's evaluation alone: its row
    keeps the step's training times, 10 x 0.5 + 10 x 1.0 = 15 s in all and forward time
    (0.1 + 0.3) / 2, and its last training loss, 0.2, beside the evaluation's accuracy."""
    trial = tmp_path / "trial"
    trial.mkdir()
    reports = [
        {"step": 10, "step_time": 0.5, "forward_time": 0.1, "train_loss": 0.5},
        {"step": 20, "step_time": 1.0, "forward_time": 0.3, "train_loss": 0.2},
    ]
    lines = "".join(json.dumps(report) + "\n" for report in reports)
    (trial / f"{archive.ARCHIVE_PREFIX}0.json").write_text(lines)
    write_reports(trial / archive.RESULT_FILE, [{"step": 20, "test_accuracy": 0.9}])
    frame = archive.history(str(trial))
    assert frame["step"].tolist() == [10, 20]
    experiment = spec.from_dict("again", TINY | {"train": {"epochs": 1, "max_steps": 20}})
    trial = SimpleNamespace(trial_id="abc12_00000", status="TERMINATED", config={})
    row = results.trial_row(experiment, trial, frame)
    assert row["train_minutes"] == pytest.approx(15 / 60)
    assert row["forward_time"] == pytest.approx(0.2)
    assert (row["train_loss"], row["test_accuracy"]) == (0.2, 0.9)


def test_each_resume_archives_the_reports_of_the_session_before_it_beside_the_earlier_ones(
    tmp_path,
):
    """Three sessions of a trial: the first two sessions' reports are kept in two archives (the
    second does not overwrite the first), an empty result.json is not archived, and the
    trial's history holds every step once."""
    experiment = tmp_path / "experiment"
    trial = experiment / "trial_0"
    trial.mkdir(parents=True)
    (experiment / "empty_trial").mkdir()
    (experiment / "empty_trial" / archive.RESULT_FILE).write_text("")
    for steps in ([10, 20], [30, 40]):
        reports = "".join(json.dumps({"step": step, "loss": 1 / step}) + "\n" for step in steps)
        (trial / archive.RESULT_FILE).write_text(reports)
        archive.archive_results(str(experiment))
    archived = sorted(p.name for p in trial.iterdir() if p.name != archive.RESULT_FILE)
    assert archived == [f"{archive.ARCHIVE_PREFIX}{n}.json" for n in (0, 1)]
    assert os.listdir(experiment / "empty_trial") == [archive.RESULT_FILE]
    write_reports(trial / archive.RESULT_FILE, [{"step": 50, "loss": 1 / 50}])
    frame = archive.history(str(trial))
    assert frame["step"].tolist() == [10, 20, 30, 40, 50]
    assert frame["loss"].tolist() == pytest.approx([1 / 10, 1 / 20, 1 / 30, 1 / 40, 1 / 50])


def test_a_resume_archives_only_the_reports_no_earlier_archive_holds(tmp_path):
    """Tune goes on from a copy of the result.json of a trial with a checkpoint, so after k
    resumes it holds every session's reports: archiving the whole file each time kept the
    first session's reports k times (quadratic in the resumes, for hundreds of trials); each
    archive now holds the reports no earlier one does, and the history is unchanged."""
    experiment = tmp_path / "experiment"
    trial = experiment / "trial_0"
    trial.mkdir(parents=True)
    sessions = [[{"step": s, "loss": 1 / s} for s in steps] for steps in ([10, 20], [30], [40])]
    for n in range(len(sessions)):
        write_reports(trial / archive.RESULT_FILE, [r for s in sessions[: n + 1] for r in s])
        archive.archive_results(str(experiment))
    archived = [
        (trial / f"{archive.ARCHIVE_PREFIX}{n}.json").read_text().splitlines() for n in range(3)
    ]
    assert [[json.loads(line)["step"] for line in lines] for lines in archived] == [
        [10, 20],
        [30],
        [40],
    ]
    archive.archive_results(str(experiment))  # no report since: no archive
    assert len(list(trial.glob(f"{archive.ARCHIVE_PREFIX}*"))) == 3
    assert archive.history(str(trial))["step"].tolist() == [10, 20, 30, 40]


def test_a_resume_says_how_far_archiving_the_trials_reports_has_come(tmp_path, capsys, monkeypatch):
    """--resume archived every trial's reports before Tune restored the experiment without a
    word: 3,000 trials of 200 reports took 54 s on 2 busy cores; a trial begun 5 s or more
    after the line before is a line on stderr, with the time left."""
    experiment = tmp_path / "experiment"
    for number in range(3):
        (experiment / f"trial_{number}").mkdir(parents=True)
        write_reports(experiment / f"trial_{number}" / archive.RESULT_FILE, [{"step": number}])
    ticking(monkeypatch, 10.0)
    archive.archive_results(str(experiment))
    assert len(list(experiment.glob(f"*/{archive.ARCHIVE_PREFIX}0.json"))) == 3
    what = f"archiving the reports of the trials of {experiment} before the resume"
    assert capsys.readouterr() == (
        "",
        f"{what}: 0/3\n{what}: 1/3, eta 40s\n{what}: 2/3, eta 15s\n",
    )


def test_a_copy_beside_the_archives_is_passed_over_and_a_gap_written_past(tmp_path):
    """A copy of an archive (`result-before-resume-0 copy.json`, a file manager's duplicate)
    failed --report and --resume with `invalid literal for int() ... '0 copy'`; it is now no
    archive. With archive 0 deleted and 1 there, the next archive was named 1 (their count),
    written over archive 1's steps; it is now 2, past the highest."""
    experiment = tmp_path / "experiment"
    trial = experiment / "trial_0"
    trial.mkdir(parents=True)
    write_reports(trial / f"{archive.ARCHIVE_PREFIX}1.json", [{"step": 10, "loss": 0.5}])
    write_reports(trial / f"{archive.ARCHIVE_PREFIX}1 copy.json", [{"step": 10, "loss": 0.25}])
    write_reports(trial / archive.RESULT_FILE, [{"step": 20, "loss": 0.125}])
    archive.archive_results(str(experiment))
    assert sorted(path.name for path in trial.iterdir()) == [
        f"{archive.ARCHIVE_PREFIX}1 copy.json",
        f"{archive.ARCHIVE_PREFIX}1.json",
        f"{archive.ARCHIVE_PREFIX}2.json",
        archive.RESULT_FILE,
    ]
    frame = archive.history(str(trial))
    assert frame["step"].tolist() == [10, 20]
    assert frame["loss"].tolist() == [0.5, 0.125]


def test_a_resume_archives_the_reports_only_a_checkpoint_kept_before_they_are_pruned(tmp_path):
    """A driver stopped before it recorded steps 30 and 40 left them only in the checkpoints
    that kept them, which the resumed trial prunes as it goes on (train.keep_checkpoints):
    tune digits killed twice lost 61 of a trial's 300 reports so; a resume now archives them
    beside the reports of the result file, each value as the checkpoint kept it."""
    experiment = tmp_path / "experiment"
    trial = experiment / "trial_0"
    trial.mkdir(parents=True)
    write_reports(trial / archive.RESULT_FILE, [{"step": 10, "loss": 1 / 10}])
    unrecorded = [{"step": 20, "loss": 1 / 20}, {"step": 30, "loss": 1 / 30}]
    for n, reports in enumerate((unrecorded, [{"step": 40, "loss": 1 / 40}])):
        write_checkpoint({"step": 20 * n + 20}, trial / f"checkpoint_00000{n}", reports)
    archive.archive_results(str(experiment))
    archive.archive_results(str(experiment))  # nothing new: no second archive
    for folder in trial.glob("checkpoint_*"):
        shutil.rmtree(folder)
    assert len(list(trial.glob(f"{archive.ARCHIVE_PREFIX}*"))) == 1
    frame = archive.history(str(trial))
    assert frame["step"].tolist() == [10, 20, 30, 40]
    assert frame["loss"].tolist() == [1 / 10, 1 / 20, 1 / 30, 1 / 40]


def test_a_full_disk_as_a_resume_archives_reports_is_one_line_naming_the_archive(
    tmp_path, full_disk, monkeypatch
):
    """A full disk as a resume archived a trial's reports ended `tune --resume` in pyarrow's
    OSError, which names no file, in a traceback, and left the archive cut short; it is a
    StorageError naming the archive, and no archive is left."""
    monkeypatch.setattr(archive, "filesystem", storage.filesystem)
    trial = tmp_path / "experiment" / "trial_0"
    trial.mkdir(parents=True)
    write_reports(trial / archive.RESULT_FILE, [{"step": 10, "loss": 1 / 10}])
    with pytest.raises(storage.StorageError) as stopped:
        archive.archive_results(str(tmp_path / "experiment"))
    said = f"{trial}/{archive.ARCHIVE_PREFIX}0.json could not be written: No space left on device"
    assert str(stopped.value) == said
    assert [p.name for p in trial.iterdir()] == [archive.RESULT_FILE]


def test_a_trial_restarted_after_a_failure_archives_the_reports_only_its_checkpoints_kept(
    tmp_path,
):
    """Tune restarts a failed trial with the storage's copy of its result.json, which the
    driver syncs every 10 s or more: a trial killed 8 steps after its checkpoint of step 22
    ended with an empty result.json, its report of step 22 kept only in that checkpoint,
    which a trial going on prunes. The trial's start archives such reports, once; a trial's
    first start, with no folder yet, writes nothing."""
    trial = tmp_path / "trial_0"
    archive.archive_unrecorded(str(trial))
    assert not trial.exists()
    trial.mkdir()
    write_reports(trial / archive.RESULT_FILE, [{"step": 10, "loss": 1 / 10}])
    reports = [{"step": 10, "loss": 1 / 10}, {"step": 20, "loss": 1 / 20}]
    write_checkpoint({"step": 20}, trial / "checkpoint_000000", reports)
    write_checkpoint({"step": 30}, trial / "checkpoint_000001", [{"step": 30, "loss": 1 / 30}])
    archive.archive_unrecorded(str(trial))
    archive.archive_unrecorded(str(trial))  # nothing new: no second archive
    archived = (trial / f"{archive.ARCHIVE_PREFIX}0.json").read_text().splitlines()
    assert [json.loads(line)["step"] for line in archived] == [20, 30]
    for folder in trial.glob("checkpoint_*"):
        shutil.rmtree(folder)
    assert len(list(trial.glob(f"{archive.ARCHIVE_PREFIX}*"))) == 1
    frame = archive.history(str(trial))
    assert frame["step"].tolist() == [10, 20, 30]
    assert frame["loss"].tolist() == [1 / 10, 1 / 20, 1 / 30]


def test_a_resume_archives_the_whole_reports_of_a_checkpoint_copy_cut_short_without_a_manifest(
    tmp_path,
):
    """A checkpoint copy cut short before its manifest, its reports.jsonl cut inside its last
    line, leaves nothing to check that file against: a resume failed on it with json's
    'Unterminated string', where the history left that line out. The resume now archives its
    whole reports (step 20), as the history reads them, and names a line before the last that
    is no report."""
    experiment = tmp_path / "experiment"
    trial = experiment / "trial_0"
    copy = trial / "checkpoint_000000"
    copy.mkdir(parents=True)
    write_reports(trial / archive.RESULT_FILE, [{"step": 10, "loss": 0.5}])
    (copy / REPORTS_FILE).write_text('{"step": 20, "loss": 0.25}\n{"step": 30, "lo')
    archive.archive_results(str(experiment))
    archived = (trial / f"{archive.ARCHIVE_PREFIX}0.json").read_text().splitlines()
    assert [json.loads(line) for line in archived] == [
        {"step": 20, "loss": 0.25},
        {"step": 10, "loss": 0.5},
    ]
    shutil.rmtree(copy)
    assert archive.history(str(trial))["loss"].tolist() == [0.5, 0.25]
    copy.mkdir()
    (copy / REPORTS_FILE).write_text('{"step": 40, "lo\n{"step": 50, "loss": 0.125}\n')
    with pytest.raises(archive.DamagedReports) as err:
        archive.archive_results(str(experiment))
    assert str(err.value) == (
        f'{copy / REPORTS_FILE}, line 1: not a JSON report: \'{{"step": 40, "lo\''
    )


def test_a_trial_that_recorded_no_report_archives_what_its_checkpoint_kept_and_none_else(
    tmp_path,
):
    """A trial whose driver stopped before it recorded any report has no result.json: a resume
    archives the reports its checkpoint kept (steps 10 and 20), which its history keeps once
    the checkpoint is pruned; a trial folder with neither gets no archive and an empty
    history."""
    experiment = tmp_path / "experiment"
    trial, empty = experiment / "trial_0", experiment / "trial_1"
    empty.mkdir(parents=True)
    reports = [{"step": 10, "loss": 1 / 10}, {"step": 20, "loss": 1 / 20}]
    write_checkpoint({"step": 20}, trial / "checkpoint_000000", reports)
    archive.archive_results(str(experiment))
    shutil.rmtree(trial / "checkpoint_000000")
    assert os.listdir(trial) == [f"{archive.ARCHIVE_PREFIX}0.json"]
    frame = archive.history(str(trial))
    assert frame["step"].tolist() == [10, 20]
    assert frame["loss"].tolist() == [1 / 10, 1 / 20]
    assert os.listdir(empty) == []
    assert archive.history(str(empty)).empty


def test_a_search_s_many_long_labels_all_fit_in_the_plot_without_a_layout_warning():
    """24 search variants named by their settings: the legend ran off the figure's right and
    bottom, cut mid-label, and matplotlib warned that it could not lay the figure out."""
    label = "variant=skip_reg, solver=broyden, adjoint=gmres, abstol=0.005, memory=28, seed={}"
    frame = pd.DataFrame({"step": [250, 500], "test_accuracy": [0.9, 0.93]})
    curves = {label.format(i): [frame] for i in range(24)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = Image.open(io.BytesIO(results.plot("test_accuracy", "test accuracy", curves)))
    # The image holds the legend's 24 rows (at the plot's dpi; one column, as tall as the
    # axes) and grows right of the figure's 9.6 inches to hold its labels.
    assert image.height >= 24 * 0.19 * 120 and image.width > 9.6 * 120
    short = Image.open(io.BytesIO(results.plot("test_accuracy", "acc", {"Skip DEQ": [frame]})))
    assert short.height <= image.height and short.width < image.width


def test_a_search_s_hundred_variants_fill_legend_columns_beside_axes_of_a_fixed_height(
    monkeypatch,
):
    """100 variants: the figure stays 4.8 inches tall, as for one (grown by a row per variant,
    every curve was drawn on a canvas that tall, and 300 variants took minutes), and the
    legend names them all in columns of results.LEGEND_ROWS."""
    monkeypatch.setattr(results, "png", lambda figure, **layout: figure)
    frame = pd.DataFrame({"step": [250, 500], "test_accuracy": [0.9, 0.93]})
    figure = results.plot("test_accuracy", "acc", {f"seed={i}": [frame] for i in range(100)})
    legend = figure.axes[0].get_legend()
    assert tuple(figure.get_size_inches()) == (9.6, 4.8)
    assert len(legend.get_texts()) == 100 and legend._ncols == 4


def test_past_the_named_variants_a_plot_names_those_asked_and_draws_the_rest_grey(monkeypatch):
    """A search of thousands of trials, each its own variant, filled a legend column per 30 of
    them (an image 50,000 pixels wide): past results.NAMED_VARIANTS the plot names the paper's
    and the fronts' variants and draws the others grey, counted in one legend entry."""
    monkeypatch.setattr(results, "png", lambda figure, **layout: figure)
    frame = pd.DataFrame({"step": [250, 500], "test_accuracy": [0.9, 0.93]})
    curves = {f"seed={i}": [frame] for i in range(results.NAMED_VARIANTS + 30)}
    figure = results.plot("test_accuracy", "acc", curves, named={"seed=3", "seed=140"})
    axes = figure.axes[0]
    texts = [text.get_text() for text in axes.get_legend().get_texts()]
    assert texts == ["seed=3", "seed=140", f"{results.NAMED_VARIANTS + 28} other variants"]
    grey = [line for line in axes.lines if line.get_color() == results.OTHERS_COLOUR]
    assert len(axes.lines) == results.NAMED_VARIANTS + 30 and len(grey) == len(axes.lines) - 2
    assert len(axes.collections) == 2  # the named variants' bands alone


def test_a_curve_of_many_reports_is_a_line_and_one_of_few_marks_each(monkeypatch):
    """A marker per point up to results.MARKED_POINTS: 5,000 reports' markers merged into one
    band in which only the last curve's colour showed."""
    monkeypatch.setattr(results, "png", lambda figure, **layout: figure)
    steps = {"few": 100, "many": 101}
    curves = {
        name: [pd.DataFrame({"step": range(n), "forward_time": [0.01] * n})]
        for name, n in steps.items()
    }
    figure = results.plot("forward_time", "forward time", curves)
    assert [line.get_marker() for line in figure.axes[0].lines] == ["o", "None"]


def test_a_trials_row_takes_its_test_metrics_from_the_last_evaluation_and_the_rest_as_means():
    """The test metrics of a row (NFE, top-5, prediction time, unconverged share) are those of
    the trial's last evaluation, not of the training solves; the training NFE and the shares
    of samples whose forward and backward solves did not converge are the means of the
    reports (the row had neither share, which TensorBoard alone showed), and the total minutes
    add each report's steps times its step time."""
    settings = TINY | {"train": {"epochs": 1, "max_steps": 30}}
    experiment = spec.from_dict("rows", settings)
    trial = SimpleNamespace(trial_id="abc12_00000", status="TERMINATED", config={})
    frame = pd.DataFrame(
        {
            "step": [10, 20, 30],
            "test_accuracy": [0.5, math.nan, 0.9],
            "test_top5_accuracy": [0.8, math.nan, 0.95],
            "test_nfe": [14.0, math.nan, 9.0],
            "predict_time": [0.04, math.nan, 0.02],
            "test_unconverged_fraction": [0.25, math.nan, 0.0625],
            "nfe": [20.0, 16.0, 12.0],
            "step_time": [0.5, 0.25, 1.0],
            "unconverged_fraction": [0.25, 0.0, 0.125],
            "backward_unconverged_fraction": [0.5, 0.25, 0.0],
        }
    )
    row = results.trial_row(experiment, trial, frame)
    assert (row["test_nfe"], row["test_top5_accuracy"], row["predict_time"]) == (9.0, 0.95, 0.02)
    assert row["test_unconverged_fraction"] == 0.0625
    assert row["nfe"] == pytest.approx(16.0)
    assert row["unconverged_fraction"] == pytest.approx(0.125)
    assert row["backward_unconverged_fraction"] == pytest.approx(0.25)
    assert row["train_minutes"] == pytest.approx((10 * 0.5 + 10 * 0.25 + 10 * 1.0) / 60)


def test_a_trials_per_step_means_weigh_each_report_by_the_steps_it_covers():
    """An epoch of 110 steps reported every 100: a report of 100 steps at 0.12 s and one of
    the epoch's last 10 at 0.1 s took 13 s over 110 steps, 13 / 110 s a step (the row's total
    minutes times 60 over its steps), not the reports' plain mean 0.11; forward time and NFE
    are weighed alike."""
    settings = TINY | {"train": {"epochs": 1, "max_steps": 110}}
    experiment = spec.from_dict("weighed", settings)
    trial = SimpleNamespace(trial_id="abc12_00000", status="TERMINATED", config={})
    frame = pd.DataFrame(
        {
            "step": [100, 110],
            "step_time": [0.12, 0.1],
            "forward_time": [0.05, 0.02],
            "nfe": [20.0, 9.0],
        }
    )
    row = results.trial_row(experiment, trial, frame)
    assert row["step_time"] == pytest.approx(13 / 110)
    assert row["step_time"] == pytest.approx(row["train_minutes"] * 60 / row["step"])
    assert row["forward_time"] == pytest.approx((100 * 0.05 + 10 * 0.02) / 110)
    assert row["nfe"] == pytest.approx((100 * 20 + 10 * 9) / 110)


def test_a_run_of_epochs_alone_is_complete_at_its_last_epoch_and_counts_its_models_parameters():
    """train.max_steps=0 trains by epochs only (the paper's MNIST runs): such a trial is
    complete once it has reported its last epoch. The row counts the model's trainable
    parameters: mnist_dense's Skip Reg. variant has the vanilla one's 134,538 (the count of the
    paper's reference code)."""
    settings = TINY | {"train": {"epochs": 2, "max_steps": 0}}
    experiment = spec.from_dict("epochs", settings)
    trial = SimpleNamespace(trial_id="abc12_00000", status="TERMINATED", config={})
    frame = pd.DataFrame({"step": [179, 358], "epoch": [1.0, 2.0]})
    row = results.trial_row(experiment, trial, frame)
    assert row["completed"] and row["parameters"] == 134_538
    assert not results.trial_row(experiment, trial, frame.iloc[:1])["completed"]


def test_a_variant_whose_every_trial_stopped_early_shows_their_mean():
    """Where ASHA stopped every seed of a variant short of its last step, its row averages
    those seeds (none finished to stand for it), its Seeds cell saying they stopped."""
    rows = [
        {"group": "Skip DEQ", "seed": seed, "completed": False, "status": "TERMINATED"}
        | dict.fromkeys(("train_time", "backward_time", "predict_time"), 0.5)
        | {"parameters": 1234, "step": 20, "test_accuracy": accuracy, "test_nfe": 10.0}
        for seed, accuracy in [(0, 0.4), (1, 0.5)]
    ]
    assert "| Skip DEQ | 2 (2 stopped) | 45.00 ± 7.07 | 0.5 ± 0 |" in results.markdown(rows)


def test_the_tables_nfe_column_is_named_test_nfe_apart_from_the_training_nfe():
    """The column holds test_nfe, a test batch's: headed `NFE`, it read as the training steps'
    `nfe` of the progress lines (30.47 for digits' vanilla seed 0, whose test NFE was 31)."""
    row = {"group": "Vanilla", "seed": 0, "completed": True, "parameters": 10, "step": 220}
    row |= {"test_accuracy": 0.9749, "train_time": 0.048, "backward_time": 0.013}
    row |= {"predict_time": 0.05, "test_nfe": 31.0, "nfe": 30.47}
    header, _, line = results.markdown([row]).splitlines()
    assert header == (
        "| Variant | Seeds | Test Accuracy (%) | Training Time (s/batch) | Backward Time (s/batch) "
        "| Prediction Time (s/batch) | Test NFE | # Params |"
    )
    assert line == "| Vanilla | 1 | 97.49 | 0.048 | 0.013 | 0.05 | 31 | 10 |"


def test_a_table_cell_leaves_out_a_seed_that_lacks_the_measure():
    rows = [
        {"group": "Skip", "seed": seed, "completed": True, "parameters": 10, "step": 5}
        | dict.fromkeys(("train_time", "backward_time", "predict_time"), math.nan)
        | {"test_accuracy": 0.5, "test_nfe": nfe}
        for seed, nfe in [(0, 10.0), (1, math.nan), (2, 14.0)]
    ]
    assert "| Skip | 3 | 50.00 ± 0.00 | - | - | - | 12.0 ± 2.8 | 10 |" in results.markdown(rows)


def test_a_label_holding_a_pipe_or_a_line_break_keeps_the_tables_columns():
    """A variant's label is the table's first cell: `lr | 1e-3` split its row of results.md
    into 9 columns under a header of 8, and a line break in one ended the row; the pipe is
    now escaped and the break a space, as in the paper's and the Pareto tables."""
    rows = [
        {"group": "lr | 1e-3\nwarm", "seed": 0, "completed": True, "parameters": 10, "step": 5}
        | dict.fromkeys(("train_time", "backward_time", "predict_time"), math.nan)
        | {"test_accuracy": 0.5, "test_nfe": 10.0}
    ]
    header, rule, row = results.markdown(rows).splitlines()
    assert row == "| lr \\| 1e-3 warm | 1 | 50.00 | - | - | - | 10 | 10 |"
    assert [len(re.findall(r"(?<!\\)\|", line)) for line in (header, rule, row)] == [9, 9, 9]
    assert pareto.table_row(["a|b", "c\r\n d"]) == "| a\\|b | c d |"


def test_a_time_cell_rounds_the_mean_to_the_two_significant_digits_of_its_std():
    """A time or NFE cell reads `mean ± std` with two significant digits of the std and the
    mean to the same decimal place (0.01645 ± 0.0003357 read with the std's four digits)."""
    rows = [
        {"group": "g", "seed": seed, "completed": True, "parameters": 1, "step": 1}
        | {"test_accuracy": accuracy, "train_time": train, "backward_time": backward}
        | {"predict_time": predict, "test_nfe": nfe}
        for seed, accuracy, train, backward, predict, nfe in [
            (0, 0.9721, 0.016213, 0.00224, 0.34, 2000.0),
            (1, 0.9749, 0.016687, 0.002366, 0.48, 3750.0),
        ]
    ]
    line = results.markdown(rows).splitlines()[2]
    # std: 0.0003352, 8.91e-05, 0.0990, 1237.4; accuracy keeps its two decimals.
    assert line == (
        "| g | 2 | 97.35 ± 0.20 | 0.01645 ± 0.00034 | 0.002303 ± 0.000089 | 0.410 ± 0.099 "
        "| 2900 ± 1200 | 1 |"
    )
    wide = results.markdown([rows[0] | {"predict_time": 0.3}, rows[1] | {"predict_time": 0.4408}])
    # 0.3 and 0.4408 have std 0.09956, which rounds up to 0.10: two digits, not 0.100.
    assert "| 0.37 ± 0.10 |" in wide


def test_the_parquet_keeps_a_column_that_only_a_later_trial_has():
    """Trials of one search may have different config keys (a solver's options): every key of
    every row is a column, empty where a row has none."""
    rows = [
        {"trial": "a", "test_accuracy": 0.5},
        {"trial": "b", "test_accuracy": 0.7, "config.model.solver_options.m": 5},
    ]
    table = results.results_table(rows)
    assert table.column_names == ["trial", "test_accuracy", "config.model.solver_options.m"]
    assert table.to_pylist() == [rows[0] | {"config.model.solver_options.m": None}, rows[1]]


def test_a_trials_reports_are_read_as_columns_with_the_values_a_line_by_line_reading_gives(
    tmp_path, monkeypatch
):
    """Tune's result files of a long trial (thousands of reports) are read as columns, not a
    JSON parse and a flattening per report: every file is parsed once, and the history is
    the one pandas makes of the reports line by line, nested config, NaN, missing values,
    lists and a last line cut short included."""
    config = {"model": {"solver": "vcab3", "solver_options": {"m": 5}}, "variant": {"label": "S"}}
    reports = [
        {"step": 10 * i, "loss": 1.0 / i, "done": False, "config": config, "dims": [1, i]}
        | ({"test_accuracy": math.nan if i == 40 else i / 100, "best": i > 2} if i % 4 else {})
        for i in range(1, 201)
    ]
    text = "".join(json.dumps(report) + "\n" for report in reports)
    (tmp_path / f"{archive.ARCHIVE_PREFIX}0.json").write_text(text[: len(text) // 2])
    write_reports(tmp_path / archive.RESULT_FILE, reports[90:])
    parsed = []
    monkeypatch.setattr(
        archive.json, "loads", lambda line, loads=json.loads: parsed.append(line) or loads(line)
    )
    frame = archive.history(str(tmp_path))
    assert len(parsed) <= 2
    monkeypatch.undo()
    expected = pd.json_normalize(reports, sep="/")
    pd.testing.assert_frame_equal(frame, expected, check_exact=True)


def test_a_history_cut_short_after_a_resume_is_in_step_order(tmp_path):
    """A trial resumed from a checkpoint older than its last report, then stopped again: the
    new session's report of step 30 replaces the old one, and the old step 40 still comes
    last, so that the trial's last step and its step counts read right."""
    reports = [(10, 4.0), (20, 3.0), (30, 2.0), (40, 1.0)]
    lines = "".join(json.dumps({"step": step, "loss": loss}) + "\n" for step, loss in reports)
    (tmp_path / f"{archive.ARCHIVE_PREFIX}0.json").write_text(lines)
    write_reports(tmp_path / archive.RESULT_FILE, [{"step": 30, "loss": 2.5}])
    frame = archive.history(str(tmp_path))
    assert frame["step"].tolist() == [10, 20, 30, 40]
    assert frame["loss"].tolist() == [4.0, 3.0, 2.5, 1.0]


def test_a_plot_shows_per_variant_the_mean_over_seeds_with_a_band_of_one_std(monkeypatch):
    """An accuracy in percent, as results.md, pareto.png and paper_curves.png show it: its
    fractions, on an axis that named no unit, read 0.97 beside their 97.49."""
    monkeypatch.setattr(results, "png", lambda figure, **layout: figure)
    seeds = [
        pd.DataFrame({"step": [10, 20], "test_accuracy": [0.5, 0.7]}),
        pd.DataFrame({"step": [10, 20], "test_accuracy": [0.7, 0.9]}),
    ]
    single = pd.DataFrame({"step": [10, 20, 30], "test_accuracy": [0.2, math.nan, 0.4]})
    untested = pd.DataFrame({"step": [10], "train_loss": [1.0]})
    curves = {"Two seeds": seeds, "One seed": [single], "No evaluation": [untested]}
    label = results.PLOTS["test_accuracy"]
    figure = results.plot("test_accuracy", label, curves)
    (axes,) = figure.axes
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("step", "test accuracy (%)")
    lines = {line.get_label(): line for line in axes.lines}
    assert list(lines) == ["Two seeds", "One seed"]
    assert list(lines["Two seeds"].get_xdata()) == [10, 20]
    assert list(lines["Two seeds"].get_ydata()) == pytest.approx([60.0, 80.0])
    assert list(lines["One seed"].get_xdata()) == [10, 30]
    assert list(lines["One seed"].get_ydata()) == pytest.approx([20.0, 40.0])
    # The band: mean -+ the sample std of 50 and 70 (and of 70 and 90), sqrt(200).
    band = axes.collections[0].get_paths()[0].vertices
    for step, mean in [(10, 60.0), (20, 80.0)]:
        heights = band[band[:, 0] == step][:, 1]
        assert (heights.min(), heights.max()) == pytest.approx((mean - 200**0.5, mean + 200**0.5))
    # A time stays in seconds.
    timed = pd.DataFrame({"step": [10, 20], "forward_time": [0.002, 0.004]})
    figure = results.plot("forward_time", results.PLOTS["forward_time"], {"DEQ": [timed]})
    assert list(figure.axes[0].lines[0].get_ydata()) == pytest.approx([0.002, 0.004])
    assert [label.get_text() for label in axes.get_legend().get_texts()] == list(lines)


def test_a_plot_of_times_that_span_decades_has_a_log_axis_and_one_of_accuracy_not(monkeypatch):
    """A Neural ODE's 2 s a batch beside a DEQ's 2 ms flattened the DEQ's curve to 0 on a
    linear axis; accuracies, fractions, stay linear whatever their span."""
    monkeypatch.setattr(results, "png", lambda figure, **layout: figure)
    fast = pd.DataFrame({"step": [10, 20], "forward_time": [0.002, 0.003], "test_accuracy": 0.01})
    slow = pd.DataFrame({"step": [10, 20], "forward_time": [2.0, 2.5], "test_accuracy": 0.9})
    scales = {}
    for metric, curves in [
        ("forward_time", {"DEQ": [fast], "Neural ODE": [slow]}),
        ("backward_time", {"DEQ": [fast.rename(columns={"forward_time": "backward_time"})]}),
        ("test_accuracy", {"DEQ": [fast], "Neural ODE": [slow]}),
    ]:
        figure = results.plot(metric, metric, curves)
        scales[metric] = figure.axes[0].get_yscale()
    assert scales == {"forward_time": "log", "backward_time": "linear", "test_accuracy": "linear"}


def test_a_plot_of_a_metric_no_trial_reported_says_so_on_bare_axes(monkeypatch):
    """Every trial failed before its first report: the plot was bare 0-1 axes with no word of
    why; it now says which metric none reported, with no ticks or legend."""
    monkeypatch.setattr(results, "png", lambda figure, **layout: figure)
    curves = {"Skip DEQ": [pd.DataFrame()], "Vanilla DEQ": [pd.DataFrame({"step": [10]})]}
    figure = results.plot("test_accuracy", "test accuracy", curves)
    (axes,) = figure.axes
    assert [text.get_text() for text in axes.texts] == ["no trial reported test_accuracy"]
    assert not axes.axison and axes.get_legend() is None and len(axes.lines) == 0


def test_a_plot_closes_its_figure():
    """A search writes a plot per metric at each report: figures left open add up (matplotlib
    warns past 20) and hold their memory."""
    from matplotlib import pyplot as plt

    frame = pd.DataFrame({"step": [1, 2], "test_accuracy": [0.5, 0.6]})
    open_before = plt.get_fignums()
    results.plot("test_accuracy", "test accuracy", {"Skip": [frame]})
    results.plot("test_accuracy", "test accuracy", {})
    assert plt.get_fignums() == open_before


def test_the_report_has_a_row_per_trial_from_every_session_and_writes_its_files(
    tmp_path, monkeypatch
):
    """The report of a finished two-variant experiment, Tune's record of it stood in by its
    trials and their current result files: a row per trial in trial id order, from the
    reports of every session (the archived ones too); results.md holds the table and the
    Pareto front by the search's metric; a TensorBoard HParams entry per trial, and each plot
    of its own metric with a curve per variant."""
    variants = [
        {"label": "Slow", "model.variant": "vanilla"},
        {"label": "Fast", "model.variant": "skip"},
    ]
    search = {"variants": variants, "metric": "train_accuracy"}
    settings = TINY | {"train": {"epochs": 1, "max_steps": 30}, "search": search}
    experiment = spec.from_dict("rep", settings)
    path = tmp_path / "rep"
    trials = [
        SimpleNamespace(
            trial_id=f"ab_0000{i}",
            status="TERMINATED",
            config={"variant": variant},
            path=str(path / f"ab_0000{i}_{variant['label']}"),
        )
        for i, variant in enumerate(variants)
    ]
    for trial in trials:
        Path(trial.path).mkdir(parents=True)
    # The slow trial was resumed once: its first session's reports were archived.
    earlier = [{"step": 10, "forward_time": 0.1}, {"step": 20, "forward_time": 0.2}]
    archived = Path(trials[0].path, f"{archive.ARCHIVE_PREFIX}0.json")
    archived.write_text("".join(json.dumps(report) + "\n" for report in earlier))
    last = {"backward_time": 0.1, "train_accuracy": 0.6}
    slow = [{"step": 30, "forward_time": 0.6, "test_accuracy": 0.9} | last]
    write_reports(Path(trials[0].path, archive.RESULT_FILE), slow)
    fast = [
        {"step": step, "forward_time": 0.1, "test_accuracy": accuracy, "backward_time": 0.1}
        | {"train_accuracy": train}
        for step, accuracy, train in [(10, 0.5, 0.5), (20, 0.7, 0.6), (30, 0.8, 0.7)]
    ]
    write_reports(Path(trials[1].path, archive.RESULT_FILE), fast)
    analysis = SimpleNamespace(trials=trials[::-1])
    monkeypatch.setattr(results, "RecordedExperiment", lambda given: analysis)
    plotted, plot = [], results.plot

    def recorded(metric, label, curves, named):
        plotted.append(
            (metric, {group: [f["step"].tolist() for f in c] for group, c in curves.items()})
        )
        return plot(metric, label, curves, named)

    monkeypatch.setattr(results, "plot", recorded)
    table = results.report(str(path), experiment)
    rows = pq.read_table(path / "results.parquet").to_pylist()
    assert [(row["group"], row["step"]) for row in rows] == [("Slow", 30), ("Fast", 30)]
    assert [row["trial"] for row in rows] == [spec.trial_name(t) for t in trials]
    assert rows[0]["forward_time"] == pytest.approx((0.1 + 0.2 + 0.6) / 3)
    assert rows[0]["test_accuracy"] == 0.9 and rows[1]["test_accuracy"] == 0.8
    assert "| Slow | 1 | 90.00 |" in table and "| Fast | 1 | 80.00 |" in table
    assert "## Pareto front: train_accuracy against" in table
    assert (path / "results.md").read_text() == table
    assert sorted(p.name for p in (path / "hparams").iterdir()) == sorted(r["trial"] for r in rows)
    steps = {"Slow": [[10, 20, 30]], "Fast": [[10, 20, 30]]}
    assert plotted == [(metric, steps) for metric in results.PLOTS]
    for metric in results.PLOTS:
        assert (path / f"{metric}.png").read_bytes().startswith(b"\x89PNG")


def test_the_results_of_an_experiment_copied_elsewhere_name_the_trials_folders_in_the_copy(
    tmp_path, monkeypatch
):
    """results.parquet holds each trial's config as it trained: its Train run (`train`) in its
    folder where the experiment is now. It held the experiment's stored storage (the file's
    `runs` made absolute where it started, though --storage put it elsewhere) and a run name
    no trial had, a folder that never existed, and kept naming it after a copy."""
    monkeypatch.setattr(results, "plot", lambda *args: b"")
    experiment = spec.from_dict("a", {**TINY, "train": {"epochs": 1, "max_steps": 30}})
    first, copy = tmp_path / "cluster" / "a", tmp_path / "laptop" / "a"
    trial = SimpleNamespace(trial_id="ab_00000", status="TERMINATED", config={}, path="")
    trial.path = str(first / spec.trial_name(trial))
    Path(trial.path).mkdir(parents=True)
    write_reports(Path(trial.path, archive.RESULT_FILE), [{"step": 30, "test_accuracy": 0.75}])
    shutil.copytree(first, copy)
    shutil.rmtree(first)
    monkeypatch.setattr(results, "RecordedExperiment", lambda path: SimpleNamespace(trials=[trial]))
    results.report(str(copy), experiment)
    [row] = pq.read_table(copy / results.RESULTS_FILE).to_pylist()
    folder = copy / spec.trial_name(trial)
    assert (row["config.storage_path"], row["config.name"]) == (str(folder), storage.TRAIN_RUN)
    assert not first.exists()


def test_the_report_of_an_interrupted_run_has_a_row_for_a_trial_that_never_started(
    tmp_path, monkeypatch
):
    """A trial still waiting for resources when the run stopped has no folder (Tune names it
    when the trial starts), and Tune's trial refuses to give its path: the report rows it as
    one stopped before its first report beside the trials that ran."""
    variants = [{"label": "Ran", "model.variant": "skip"}, {"label": "Waited"}]
    settings = TINY | {"train": {"epochs": 1, "max_steps": 30}, "search": {"variants": variants}}
    path = tmp_path / "interrupted"
    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name=path.name)
    config = {"variant": variants[1]}
    waited = Trial("trainable", config=config, storage=storage, stub=True, trial_id="ab_00001")
    ran = SimpleNamespace(
        trial_id="ab_00000", status="TERMINATED", config={"variant": variants[0]}, path=""
    )
    ran.path = str(path / spec.trial_name(ran))
    Path(ran.path).mkdir(parents=True)
    write_reports(Path(ran.path, archive.RESULT_FILE), [{"step": 30, "test_accuracy": 0.75}])
    analysis = SimpleNamespace(trials=[ran, waited])
    monkeypatch.setattr(results, "RecordedExperiment", lambda given: analysis)
    monkeypatch.setattr(results, "plot", lambda *args: b"")
    table = results.report(str(path), spec.from_dict("interrupted", settings))
    rows = pq.read_table(path / "results.parquet").to_pylist()
    assert [(r["group"], r["status"], r["step"]) for r in rows] == [
        ("Ran", "TERMINATED", 30),
        ("Waited", "PENDING", 0),
    ]
    assert "| Ran | 1 | 75.00 |" in table and "| Waited | 1 (1 stopped) | - |" in table


# End to end on the shared Ray cluster ----------------------------------------------------------


def _tune(args: list[str], **popen) -> subprocess.Popen:
    """Start `python -m raydeq.tune` on the session's Ray cluster."""
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "raydeq.tune", *args]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen
    )


def _whole_step(folder: Path) -> int | None:
    """A checkpoint's step, or None while Ray is still copying it into storage (or a kill cut
    the copy short, of its manifest or of its state): a resume passes over it then."""
    try:
        return read_checkpoint(folder)["step"]
    except CheckpointError:
        return None


def _checkpoint_steps(experiment: Path) -> dict[tuple[Path, int], str]:
    """Every checkpoint folder the trials wrote whole and its step, with the trial it belongs to."""
    steps = {
        m.parent: _whole_step(m.parent) for m in experiment.glob(f"**/checkpoint_*/{MANIFEST_FILE}")
    }
    return {
        (folder, step): folder.relative_to(experiment).parts[0]
        for folder, step in steps.items()
        if step is not None
    }


def _newest_steps(experiment: Path) -> dict[str, int]:
    """Per trial, the step of its newest checkpoint."""
    steps: dict[str, int] = {}
    for (_, step), trial in _checkpoint_steps(experiment).items():
        steps[trial] = max(step, steps.get(trial, 0))
    return steps


def _alive_actors(dashboard: str) -> set[str]:
    """The ids of the actors alive on the cluster."""
    alive = [("state", "=", "ALIVE")]
    return {actor.actor_id for actor in list_actors(address=dashboard, filters=alive)}


def _wait_for_the_end_of(actors: set[str], dashboard: str) -> None:
    """Wait until Ray has ended these actors (those of a killed driver's trials)."""
    deadline = time.monotonic() + 60
    while actors & _alive_actors(dashboard):
        assert time.monotonic() < deadline, "the killed driver's trials live on"
        time.sleep(0.5)


def _reported_steps(trial: Path) -> list[int]:
    """The steps in a trial's result file, up to its last whole line (the driver may be
    writing the next one)."""
    text = (trial / archive.RESULT_FILE).read_text()
    lines = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]
    return [line["step"] for line in lines if "step" in line]


def test_a_killed_driver_resumes_every_trial_without_training_a_step_twice(ray_cluster, tmp_path):
    settings = TINY | {
        "train": {
            "epochs": 1,
            "max_steps": 160,
            "report_every": 40,
            "checkpoint_every": 40,
            "keep_checkpoints": 100,
        },
        "search": {
            "variants": [{"model.variant": "vanilla"}, {"model.variant": "skip_reg"}],
            "workers_per_trial": 1,
            "max_concurrent_trials": 2,
        },
    }
    (tmp_path / "e2e.yaml").write_text(yaml.safe_dump(settings))
    argv = [str(tmp_path / "e2e.yaml"), "--storage", str(tmp_path / "runs")]
    experiment = tmp_path / "runs" / "e2e"
    earlier = _alive_actors(ray_cluster)
    driver = _tune(argv)
    deadline = time.monotonic() + 150
    while not (
        list(experiment.glob("experiment_state-*.json"))
        and max(_newest_steps(experiment).values(), default=0) >= 80
    ):
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 80 in time"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    _wait_for_the_end_of(_alive_actors(ray_cluster) - earlier, ray_cluster)
    before = _newest_steps(experiment)
    assert 80 <= max(before.values()) < 160
    written = set(_checkpoint_steps(experiment))

    resumed = _tune([*argv, "--resume"])
    output = resumed.communicate(timeout=200)[0].decode()
    assert resumed.returncode == 0, output[-3000:]

    rows = pq.read_table(experiment / "results.parquet").to_pylist()
    assert len(rows) == 2
    assert all(row["status"] == "TERMINATED" and row["step"] == 160 for row in rows)
    for trial, step in before.items():
        checkpoints = _checkpoint_steps(experiment).items()
        new = [n for (path, n), owner in checkpoints if (path, n) not in written and owner == trial]
        assert min(new) == step + 40, f"{trial} did not continue from step {step}"
    for trial in before:
        steps = _reported_steps(experiment / trial)
        assert steps == sorted(set(steps)) and steps[-1] == 160, steps
        # Every report once, those the killed driver never recorded from their checkpoints.
        assert archive.history(str(experiment / trial))["step"].tolist() == [40, 80, 120, 160]
    assert "| variant=skip_reg | 1 |" in output
    assert f"tensorboard --logdir {experiment}" in output
    # The restored run counts the experiment's trials as the first one did.
    assert sorted(re.findall(r"finished at step 160, .*\((\d) of 2 trials done\)", output)) == [
        "1",
        "2",
    ]
    for plot in results.PLOTS:
        assert (experiment / f"{plot}.png").read_bytes().startswith(b"\x89PNG")


def test_ctrl_c_exits_130_with_the_resume_command_and_that_command_finishes(ray_cluster, tmp_path):
    # Two workers: the trial is a Ray Train run inside Tune (one-worker trials are the others').
    settings = TINY | {
        "train": {"epochs": 1, "max_steps": 60, "checkpoint_every": 20},
        "scaling": {"num_workers": 2},
    }
    (tmp_path / "stop.yaml").write_text(yaml.safe_dump(settings))
    experiment = tmp_path / "runs" / "stop"
    driver = _tune([str(tmp_path / "stop.yaml"), "--storage", str(tmp_path / "runs")])
    deadline = time.monotonic() + 150
    while max(_newest_steps(experiment).values(), default=0) < 20:
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 20 in time"
        time.sleep(0.2)
    driver.send_signal(signal.SIGINT)
    output = driver.communicate(timeout=120)[0].decode()
    assert driver.returncode == 130, output[-3000:]
    *_, last = output.strip().splitlines()
    command = f"python -m raydeq.tune {tmp_path / 'stop.yaml'} --resume --storage {tmp_path}/runs"
    assert last == f"interrupted; resume with: {command}"
    assert "Tuner.restore" not in output  # Tune's hint at its Python API
    resumed = _tune(shlex.split(command)[3:])
    output = resumed.communicate(timeout=200)[0].decode()
    assert resumed.returncode == 0, output[-3000:]
    (row,) = pq.read_table(experiment / "results.parquet").to_pylist()
    assert row["status"] == "TERMINATED" and row["step"] == 60


def test_asha_stops_a_trial_and_the_next_trial_gets_its_resources(ray_cluster, tmp_path):
    settings = TINY | {
        "train": {"epochs": 1, "max_steps": 60, "report_every": 20},
        "scaling": {"num_workers": 1, "cpus_per_worker": 2},
        "search": {
            "variants": [
                {"label": "fast", "optim.lr": 3.0e-3, "seed": 0},
                {"label": "frozen", "optim.lr": 1.0e-9, "seed": 0},
                {"label": "fast", "optim.lr": 3.0e-3, "seed": 1},
            ],
            "metric": "train_accuracy",
            "scheduler": "asha",
            "grace_period": 20,
        },
    }
    (tmp_path / "asha.yaml").write_text(yaml.safe_dump(settings))
    driver = _tune([str(tmp_path / "asha.yaml"), "--storage", str(tmp_path / "runs")])
    output = driver.communicate(timeout=240)[0].decode()
    assert driver.returncode == 0, output[-3000:]
    rows = pq.read_table(tmp_path / "runs" / "asha" / "results.parquet").to_pylist()
    assert [(row["group"], row["status"]) for row in rows] == [
        ("fast", "TERMINATED"),
        ("frozen", "TERMINATED"),
        ("fast", "TERMINATED"),
    ]
    assert rows[0]["step"] == 60 and rows[1]["step"] == 20 and rows[2]["step"] >= 20
    assert "| frozen | 1 (1 stopped) |" in output
    assert "trial frozen: stopped early at step 20 of 60 (2 of 3 trials done)" in output
    assert "trial fast: finished at step 60" in output
    quiet = [line for line in output.splitlines() if "Reporting training result" in line]
    assert not quiet and "Trial status" not in output and output.count("tensorboard --logdir") == 1
    assert "[fast] epoch 0.11 step 20/60 loss" in output  # one line per report
    # Nothing but raydeq's own lines: a trial's start, reports and end before the results,
    # whose report (a front's rows vary with the draws) ends the output.
    progress = output.split("\n| Variant |")[0].splitlines()
    own = re.compile(r"tensorboard --logdir |trial (fast|frozen): |\[(fast|frozen)\] epoch ")
    assert [line for line in progress if not own.match(line)] == [], output
    assert len(progress) <= 14 and output.splitlines()[-1].startswith("results in "), output


def test_dry_run_shows_the_model_defaults_the_preset_and_the_layer_give(capsys):
    assert rt.main(["cifar10_small", "--dry-run"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    models = {row["label"].split(",")[0]: row["config"]["model"] for row in rows}
    preset = {"abstol": 5e-2, "reltol": 5e-2}
    assert models["Skip Reg. Continuous DEQ"] == {
        "model": "cifar10_small",
        "variant": "skip_reg",
        "solver": "vcab3",
        "adjoint": "gmres",
        **preset,
        "max_steps": 18,
        "jac_reg": False,
        "pretrain_steps": 3000,
        "t1": None,
        "dynamics": None,
        "solver_options": None,
        "adjoint_options": {"rtol": 5e-2, "max_iters": 20},
        "compile": False,
    }
    assert models["Neural ODE"] == {
        "model": "cifar10_small",
        "variant": "neural_ode",
        "solver": "vcab3",
        "adjoint": "continuous",
        **preset,
        "max_steps": 10_000,
        "jac_reg": None,
        "pretrain_steps": None,
        "t1": 1.0,
        "dynamics": "f",
        "solver_options": None,
        "adjoint_options": None,
        "compile": None,
    }


def test_asha_rungs_follow_the_search_and_a_trial_is_not_stopped_at_its_last_step():
    """Rungs at grace_period x reduction_factor**k steps (5, 15, 45 within 60 steps); the last
    report at step 60, with the trial's final evaluation, reaches the trial."""
    search = {"scheduler": "asha", "grace_period": 5, "reduction_factor": 3}
    experiment = spec.from_dict("a", {**TINY, "train": {"max_steps": 60}, "search": search})
    options = run.Options(gpus=0, num_samples=1, scheduler="asha", max_concurrent=0)
    scheduler = run._scheduler(experiment, options, "runs/a")
    assert sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs) == [5, 15, 45]
    scheduler.set_search_properties("test_accuracy", "max")
    trial = SimpleNamespace(trial_id="t0", path="runs/a/t0")
    scheduler.on_trial_add(None, trial)
    action = scheduler.on_trial_result(None, trial, {"step": 60, "test_accuracy": 0.5})
    assert action == run.TrialScheduler.CONTINUE


def test_asha_compares_trials_at_the_same_step_and_stops_at_the_searchs_max_t():
    """At rung 5 a trial below the one recorded there stops; rungs at 5 and 15 below a max_t
    of 30 (max_steps 60 is not used then); a run of epochs (no max_steps) without max_t has
    rungs up to its 1,790 steps; fifo lets every trial run to its end."""
    search = {"scheduler": "asha", "grace_period": 5, "reduction_factor": 3, "max_t": 30}
    capped = spec.from_dict("a", {**TINY, "train": {"max_steps": 60}, "search": search})
    options = run.Options(gpus=0, num_samples=1, scheduler="asha", max_concurrent=0)
    scheduler = run._scheduler(capped, options, "runs/a")
    assert sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs) == [5, 15]
    scheduler.set_search_properties("test_accuracy", "max")
    good = SimpleNamespace(trial_id="good", path="runs/a/good")
    bad = SimpleNamespace(trial_id="bad", path="runs/a/bad")
    scheduler.on_trial_add(None, good)
    scheduler.on_trial_add(None, bad)
    result = {"step": 5, "training_iteration": 1}
    action = scheduler.on_trial_result(None, good, result | {"test_accuracy": 0.9})
    assert action == run.TrialScheduler.CONTINUE
    action = scheduler.on_trial_result(None, bad, result | {"test_accuracy": 0.1})
    assert action == run.TrialScheduler.STOP
    search = {"scheduler": "asha", "grace_period": 1, "reduction_factor": 2}
    epochs = spec.from_dict("a", {**TINY, "search": search})
    rungs = run._scheduler(epochs, options, "runs/a")._brackets[0]._rungs
    assert sorted(milestone for milestone, _ in rungs) == [2**k for k in range(11)]
    fifo = run.Options(gpus=0, num_samples=1, scheduler="fifo", max_concurrent=0)
    assert type(run._scheduler(capped, fifo, "runs/a")) is run.FIFOScheduler


def test_asha_judges_each_report_once_at_the_highest_rung_it_reached():
    """Rungs at 10, 20, 40, 80 and 160 steps, the test accuracy reported once an epoch of 22
    steps: the report at 22 is judged at rung 20, the one at 44 at 40, and the one at 66, past
    no new rung, nowhere. Ray's brackets judged it at rung 10, which the report at 22 had
    skipped, and stopped at step 66 a trial that had passed rungs 20 and 40 (0.62 below the
    other's 0.65); a trial's last result recorded there too."""
    search = {"scheduler": "asha", "grace_period": 10, "reduction_factor": 2}
    experiment = spec.from_dict("a", {**TINY, "train": {"max_steps": 220}, "search": search})
    options = run.Options(gpus=0, num_samples=2, scheduler="asha", max_concurrent=0)
    scheduler = run._scheduler(experiment, options, "runs/a")
    scheduler.set_search_properties("test_accuracy", "max")
    rungs = scheduler._brackets[0]._rungs
    assert sorted(milestone for milestone, _ in rungs) == [10, 20, 40, 80, 160]
    first = SimpleNamespace(trial_id="first", path="runs/a/first")
    second = SimpleNamespace(trial_id="second", path="runs/a/second")
    scheduler.on_trial_add(None, first)
    scheduler.on_trial_add(None, second)
    for step, ahead, behind in [(22, 0.5, 0.6), (44, 0.6, 0.7), (66, 0.65, 0.62)]:
        action = scheduler.on_trial_result(None, first, {"step": step, "test_accuracy": ahead})
        assert action == run.TrialScheduler.CONTINUE
        action = scheduler.on_trial_result(None, second, {"step": step, "test_accuracy": behind})
        assert action == run.TrialScheduler.CONTINUE
    scheduler.on_trial_complete(None, first, {"step": 66, "test_accuracy": 0.65})
    assert dict(rungs) == {
        160: {},
        80: {},
        40: {"first": 0.6, "second": 0.7},
        20: {"first": 0.5, "second": 0.6},
        10: {},
    }
    stopped = scheduler.on_trial_result(None, second, {"step": 221, "test_accuracy": 0.9})
    assert stopped == run.TrialScheduler.STOP


def test_asha_resumed_keeps_the_rungs_of_the_reports_before_the_resume(tmp_path):
    """Tune restores the ASHA pickled at the run's start (empty rungs): a trial that reported
    0.9 at rung 20 before the resume, archived, stops a new trial's 0.1 there, as it did in an
    uninterrupted run; a trial not yet started (no folder) replays nothing."""
    search = {"scheduler": "asha", "grace_period": 10, "reduction_factor": 2}
    experiment = spec.from_dict("a", {**TINY, "train": {"max_steps": 60}, "search": search})
    options = run.Options(gpus=0, num_samples=3, scheduler="asha", max_concurrent=0)
    folder = tmp_path / "good"
    folder.mkdir()
    reports = [{"step": 10}, {"step": 22, "test_accuracy": 0.9}]
    lines = "".join(json.dumps(report) + "\n" for report in reports)
    (folder / f"{archive.ARCHIVE_PREFIX}0.json").write_text(lines)
    scheduler = run._scheduler(experiment, options, str(tmp_path))
    scheduler.set_search_properties("test_accuracy", "max")
    good = SimpleNamespace(trial_id="good", path=str(folder), status=run.Trial.TERMINATED)
    bad = SimpleNamespace(trial_id="bad", path=str(tmp_path / "bad"))
    scheduler.on_trial_add(None, good)
    scheduler.on_trial_add(None, bad)
    rungs = dict(scheduler._brackets[0]._rungs)
    assert rungs[20] == {"good": 0.9} and rungs[10] == {}
    action = scheduler.on_trial_result(None, bad, {"step": 22, "test_accuracy": 0.1})
    assert action == run.TrialScheduler.STOP


def test_asha_of_an_experiment_copied_elsewhere_rebuilds_its_rungs_from_the_copy(
    tmp_path, monkeypatch
):
    """An experiment copied to another storage, its first folder then deleted, and resumed
    there: ASHA's rungs hold the copy's reports. Tune restores the scheduler pickled at the
    first start, which read them from the folder it started in: none, once that was gone."""
    monkeypatch.setattr(run, "concurrency", lambda *args, **kwargs: 1)
    search = {"scheduler": "asha", "grace_period": 10, "reduction_factor": 2}
    experiment = spec.from_dict("a", {**TINY, "train": {"max_steps": 60}, "search": search})
    options = run.Options(gpus=0, num_samples=3, scheduler="asha", max_concurrent=0)
    first, copy = tmp_path / "cluster" / "a", tmp_path / "laptop" / "a"
    run.tuner(experiment, str(first), options, resume=False)  # Tune pickles it in tuner.pkl
    (first / "good").mkdir()
    write_reports(first / "good" / archive.RESULT_FILE, [{"step": 22, "test_accuracy": 0.9}])
    shutil.copytree(first, copy)
    shutil.rmtree(first)
    scheduler = run.tuner(
        experiment, str(copy), options, resume=True
    )._local_tuner._tune_config.scheduler
    scheduler.set_search_properties("test_accuracy", "max")
    good = SimpleNamespace(trial_id="good", path=str(copy / "good"), status=run.Trial.TERMINATED)
    scheduler.on_trial_add(None, good)
    assert dict(scheduler._brackets[0]._rungs)[20] == {"good": 0.9}
    assert not first.exists()


def searched_as_tune_runs(tuner: ray.tune.Tuner) -> ray.tune.search.SearchAlgorithm:
    """The search algorithm of a Tuner as Tune runs it: a searcher wrapped in a generator."""
    found = tuner._local_tuner._tune_config.search_alg
    searcher = isinstance(found, ray.tune.search.Searcher)
    return ray.tune.search.SearchGenerator(found) if searcher else found


@pytest.mark.parametrize("search", [{}, {"searcher": "tpe"}], ids=["variants", "optuna"])
def test_new_trials_of_an_experiment_copied_elsewhere_are_stored_in_the_copy(
    tmp_path, monkeypatch, search
):
    """An experiment copied to another storage, its first folder then deleted, and resumed
    there: a trial its search adds is stored in the copy. The search's state, saved at the
    first start, makes trials from the experiment it was given then, which stored their
    checkpoints in the folder the experiment started in (recreated after its deletion)."""
    # The Optuna searcher sets Optuna's verbosity for the process: it is put back.
    with run.searchers.optuna_warnings_only():
        monkeypatch.setattr(run, "concurrency", lambda *args, **kwargs: 2)
        space = {"optim.lr": {"loguniform": [1e-4, 1e-2]}}
        experiment = spec.from_dict("a", {**TINY, "search": search | {"space": space}})
        options = run.Options(gpus=0, num_samples=3, scheduler="fifo", max_concurrent=0)
        first, copy = tmp_path / "cluster" / "a", tmp_path / "laptop" / "a"
        ray.tune.register_trainable("a", lambda config: None)
        started = searched_as_tune_runs(run.tuner(experiment, str(first), options, resume=False))
        started.set_search_properties("test_accuracy", "max", {})
        given = ray.tune.Experiment(
            "a", "a", config=experiment.param_space(), num_samples=3, storage_path=str(first.parent)
        )
        started.add_configurations([given])
        assert started.next_trial().storage.experiment_fs_path == str(first)
        started.save_to_dir(str(first), "2026-01-01_00-00-00")  # Tune saves it with the trials
        shutil.copytree(first, copy)
        shutil.rmtree(first)
        resumed = searched_as_tune_runs(run.tuner(experiment, str(copy), options, resume=True))
        resumed.set_search_properties("test_accuracy", "max", {})
        resumed.restore_from_dir(str(copy))
        trial = resumed.next_trial()
        assert trial.storage.experiment_fs_path == str(copy)
        assert trial.storage.storage_filesystem.type_name == "local"


class RestoredTrial(SimpleNamespace):
    """A trial as Tune restores it: its status and folder, and the last result it is given."""

    def update_last_result(self, result: dict) -> None:
        """Keep the result as Tune's trial does."""
        self.last_result = result


def test_a_trial_asha_stopped_after_tunes_last_save_stays_stopped_on_resume(tmp_path, capsys):
    """A trial whose last report before the kill fell below its rung's cutoff was stopped by
    ASHA, but Tune's record, saved before, resumed it as unfinished and trained it to its last
    step: it is stopped again before it starts, the searcher told that report's accuracy and
    cost, its line the one of a stop; a trial that reported past its rung (it passed) is
    resumed and not judged again."""
    search = {"scheduler": "asha", "grace_period": 10, "reduction_factor": 2}
    experiment = spec.from_dict("a", {**TINY, "train": {"max_steps": 60}, "search": search})
    options = run.Options(gpus=0, num_samples=3, scheduler="asha", max_concurrent=0)
    written = {
        "good": [{"step": 20, "test_accuracy": 0.9, "test_nfe": 8.0, "total_steps": 60}],
        "stopped": [
            {"step": 10, "total_steps": 60},
            {"step": 20, "test_accuracy": 0.5, "test_nfe": 4.0, "total_steps": 60},
        ],
        "passed": [
            {"step": 20, "test_accuracy": 0.4, "test_nfe": 3.0, "total_steps": 60},
            {"step": 30, "total_steps": 60},
        ],
    }
    trials = {}
    for name, reports in written.items():
        (tmp_path / name).mkdir()
        write_reports(tmp_path / name / f"{archive.ARCHIVE_PREFIX}0.json", reports)
        status = run.Trial.TERMINATED if name == "good" else run.Trial.PENDING
        where = {"path": str(tmp_path / name), "config": {"variant": {"label": name}}}
        trials[name] = RestoredTrial(trial_id=name, status=status, **where)
    told, stopped = [], []

    def stop(trial: RestoredTrial) -> None:
        """Stop the trial as Tune does, its line printed."""
        stopped.append(trial.trial_id)
        run.TrialLines(3, spec.from_dict("x", TINY), "runs/x").on_trial_complete(
            0, list(trials.values()), trial
        )
        trial.status = run.Trial.TERMINATED

    controller = SimpleNamespace(
        get_trials=lambda: list(trials.values()),
        search_alg=SimpleNamespace(on_trial_complete=lambda *a, **k: told.append((a, k))),
        stop_trial=stop,
    )
    scheduler = run._scheduler(experiment, options, str(tmp_path))
    scheduler.set_search_properties("test_accuracy", "max")
    for trial in trials.values():
        scheduler.on_trial_add(controller, trial)
    assert scheduler.choose_trial_to_run(controller) is trials["passed"]
    assert stopped == ["stopped"] and trials["stopped"].status == run.Trial.TERMINATED
    line = (
        "trial stopped: stopped early at step 20 of 60, test_accuracy 0.5000 (2 of 3 trials done)"
    )
    assert capsys.readouterr().out == line + "\n"
    assert told == [(("stopped",), {"result": written["stopped"][1]})]
    assert dict(scheduler._brackets[0]._rungs)[20] == {"good": 0.9, "stopped": 0.5, "passed": 0.4}


def test_a_trial_asha_let_through_before_the_kill_is_resumed_though_later_reports_beat_it(
    tmp_path,
):
    """ASHA let a trial through its rung 20 with 0.6 (the rung held 0.5, its cutoff 0.5), then
    another trial reported 0.9 there and the driver was killed: the resume judges the trial's
    last report against the rung as it was then, and resumes it. Judged against both values
    (cutoff 0.7) it was stopped, a trial the run had let through."""
    search = {"scheduler": "asha", "grace_period": 10, "reduction_factor": 2}
    experiment = spec.from_dict("a", {**TINY, "train": {"max_steps": 60}, "search": search})
    options = run.Options(gpus=0, num_samples=3, scheduler="asha", max_concurrent=0)
    written = {
        "first": [{"step": 20, "test_accuracy": 0.5, "timestamp": 100}],
        "through": [{"step": 20, "test_accuracy": 0.6, "timestamp": 200}],
        "later": [
            {"step": 20, "test_accuracy": 0.9, "timestamp": 300},
            {"step": 30, "timestamp": 310},
        ],
    }
    trials = {}
    for name, reports in written.items():
        (tmp_path / name).mkdir()
        write_reports(tmp_path / name / f"{archive.ARCHIVE_PREFIX}0.json", reports)
        status = run.Trial.TERMINATED if name == "first" else run.Trial.PENDING
        trials[name] = RestoredTrial(trial_id=name, status=status, path=str(tmp_path / name))
    stopped = []
    controller = SimpleNamespace(
        get_trials=lambda: list(trials.values()),
        search_alg=SimpleNamespace(on_trial_complete=lambda *a, **k: None),
        stop_trial=lambda trial: stopped.append(trial.trial_id),
    )
    scheduler = run._scheduler(experiment, options, str(tmp_path))
    scheduler.set_search_properties("test_accuracy", "max")
    for trial in trials.values():
        scheduler.on_trial_add(controller, trial)
    assert scheduler.choose_trial_to_run(controller) is trials["through"]
    assert stopped == []
    assert dict(scheduler._brackets[0]._rungs)[20] == {"first": 0.5, "through": 0.6, "later": 0.9}


def test_a_trial_that_reaches_its_last_step_finished_and_one_cut_short_stopped_early(capsys):
    lines = run.TrialLines(2, spec.from_dict("x", TINY), "runs/x")
    for step in (6, 3):
        result = {"step": step, "total_steps": 6, "test_accuracy": 0.5}
        trial = SimpleNamespace(config={"variant": {"label": "Skip"}}, last_result=result)
        lines.on_trial_complete(0, [trial], trial)
    assert capsys.readouterr().out.splitlines() == [
        "trial Skip: finished at step 6, test_accuracy 0.5000 (1 of 2 trials done)",
        "trial Skip: stopped early at step 3 of 6, test_accuracy 0.5000 (1 of 2 trials done)",
    ]


def test_a_trial_has_a_line_when_it_starts_and_for_each_report_of_its_training(capsys):
    """Tune's own results (without the training's position) have none; a trial that ended
    without a report, or without a test accuracy, ends with its step alone; an accuracy of 0 is
    shown. A Neural ODE's line leaves out its training unconverged_fraction, 1 at every step
    (its z(t1) is no steady state), as its training's own line does: each of its lines showed
    'unconverged 1'."""
    lines = run.TrialLines(4, spec.from_dict("x", TINY), "runs/x")
    trial = SimpleNamespace(config={"variant": {"label": "Skip"}}, last_result=None)
    lines.on_trial_start(0, [trial], trial)
    report = {"epoch": 0.5, "step": 3, "total_steps": 6, "train_loss": 0.25}
    lines.on_trial_result(0, [trial], trial, report | {"unconverged_fraction": 0.5})
    ode = {"label": "ODE", "model.variant": "neural_ode", "model.solver": "tsit5"}
    ode_trial = SimpleNamespace(config={"variant": ode})
    ode_report = report | {"unconverged_fraction": 1.0, "test_unconverged_fraction": 0.25}
    lines.on_trial_result(0, [trial, ode_trial], ode_trial, ode_report)
    lines.on_trial_result(0, [trial], trial, {"done": True, "training_iteration": 1})
    lines.on_trial_complete(0, [trial], trial)
    trial.last_result = {"step": 6, "total_steps": 6}
    lines.on_trial_complete(0, [trial], trial)
    trial.last_result = {"step": 6, "total_steps": 6, "test_accuracy": 0.0}
    lines.on_trial_complete(0, [trial], trial)
    assert capsys.readouterr().out.splitlines() == [
        "trial Skip: started",
        "[Skip] epoch 0.50 step 3/6 loss 0.25 unconverged 0.5",
        "[ODE] epoch 0.50 step 3/6 loss 0.25 test_unconverged 0.25",
        "trial Skip: finished at step 0 (1 of 4 trials done)",
        "trial Skip: finished at step 6 (1 of 4 trials done)",
        "trial Skip: finished at step 6, test_accuracy 0.0000 (1 of 4 trials done)",
    ]


def test_the_trial_of_a_file_of_one_point_is_named_by_the_experiment(capsys):
    """A file without variants or a space samples nothing to name its trial by: its lines read
    `trial : started` and `[] epoch ...`, where its --dry-run line named it by the experiment;
    both, and the trial's config, name it so."""
    experiment = spec.from_dict("one", TINY)
    lines = run.TrialLines(1, experiment, "runs/one")
    trial = SimpleNamespace(config={}, last_result={"step": 6, "total_steps": 6})
    lines.on_trial_start(0, [trial], trial)
    report = {"epoch": 0.5, "step": 3, "total_steps": 6, "train_loss": 0.25}
    lines.on_trial_result(0, [trial], trial, report)
    lines.on_trial_complete(0, [trial], trial)
    assert capsys.readouterr().out.splitlines() == [
        "trial one: started",
        "[one] epoch 0.50 step 3/6 loss 0.25",
        "trial one: finished at step 6 (1 of 1 trials done)",
    ]
    assert run.trial_config(experiment, {}, "runs/one/t").label == "one"


def test_a_failed_trial_counts_once_among_the_trials_done_and_fails_without_an_error_file(
    tmp_path, capsys
):
    """Tune marks a trial ERROR before its line: it counts once, with the other failed trial
    and the finished one (not the running or pending ones); a trial without an error file, or
    with an empty one, failed; a last line that names no exception is shown as it is."""
    others = [SimpleNamespace(status=s) for s in ("TERMINATED", "ERROR", "RUNNING", "PENDING")]
    trial = SimpleNamespace(
        config={"variant": {"label": "Skip"}}, error_file=None, path=str(tmp_path), status="ERROR"
    )
    lines = run.TrialLines(5, spec.from_dict("x", TINY), str(tmp_path.parent))
    lines.on_trial_error(0, [*others, trial], trial)
    (tmp_path / "error.txt").write_text("\n \n")
    trial.error_file = str(tmp_path / "error.txt")
    lines.on_trial_error(0, [*others, trial], trial)
    (tmp_path / "error.txt").write_text("Failure # 1\nTraceback (most recent call last):\nKilled\n")
    lines.on_trial_error(0, [*others, trial], trial)
    where = f"see {tmp_path}/error.txt (3 of 5 trials done)"
    assert capsys.readouterr().out.splitlines() == [
        f"trial Skip: failed, {where}",
        f"trial Skip: failed, {where}",
        f"trial Skip: failed (Killed), {where}",
    ]


def test_a_one_worker_trial_holds_its_workers_cpus_and_gpu_and_a_larger_one_a_sliver():
    scaling = {"num_workers": 1, "cpus_per_worker": 3}
    one = spec.from_dict("x", {**TINY, "scaling": scaling}).trial_config({})
    assert run.trial_resources(one, 0.5) == {"CPU": 3.0, "GPU": 0.5}
    assert run.trial_resources(one, 0) == {"CPU": 3.0}
    two = spec.from_dict("x", {**TINY, "scaling": {"num_workers": 2}}).trial_config({})
    assert run.trial_resources(two, 1) == {"CPU": 0.01, HEAD_NODE_RESOURCE_NAME: 0.001}


def test_a_trial_restarted_in_its_own_process_archives_its_checkpoints_reports_first(
    tmp_path, monkeypatch
):
    """A trial of one worker that Tune restarts with a result.json short of its checkpoint's
    reports archives those reports as it starts, before its loop prunes that checkpoint."""
    from raydeq.training import loop

    resources = SimpleNamespace(required_resources={"CPU": 1})
    context = SimpleNamespace(get_trial_name=lambda: "t1", get_trial_resources=lambda: resources)
    monkeypatch.setattr(run.tune, "get_context", lambda: context)
    monkeypatch.setattr(loop, "Loop", lambda cfg, session: SimpleNamespace(run=lambda: None))
    trial = tmp_path / "t1"
    trial.mkdir()
    write_reports(trial / archive.RESULT_FILE, [{"step": 10, "loss": 0.5}])
    reports = [{"step": 10, "loss": 0.5}, {"step": 20, "loss": 0.25}]
    write_checkpoint({"step": 20}, trial / "checkpoint_000000", reports)
    one = spec.from_dict("x", TINY)
    run.run_trial({"seed": 3}, experiment=one, path=str(tmp_path), gpus=0)
    archived = (trial / f"{archive.ARCHIVE_PREFIX}0.json").read_text().splitlines()
    assert [json.loads(line) for line in archived] == [{"step": 20, "loss": 0.25}]


def test_a_trial_trains_in_its_folder_in_its_own_process_or_fits_its_train_run_there(
    tmp_path, monkeypatch
):
    """One worker: the trial's process trains in `<experiment>/<trial>` (on CUDA when it holds
    a GPU share), its run named `train`; more: a TorchTrainer there, its workers giving up the
    trial's 0.01 CPU between them and reporting to Tune."""
    from raydeq.training import loop

    held = {"CPU": 2}
    resources = SimpleNamespace(required_resources=held)
    context = SimpleNamespace(
        get_trial_name=lambda: "t1_seed=3", get_trial_resources=lambda: resources
    )
    monkeypatch.setattr(run.tune, "get_context", lambda: context)
    trained = []
    monkeypatch.setattr(
        loop,
        "Loop",
        lambda cfg, session: SimpleNamespace(run=lambda: trained.append((cfg, session))),
    )
    monkeypatch.setattr(run, "TuneReportCallback", lambda: "reports to Tune")
    fitted = []
    monkeypatch.setattr(run.launch, "fit", lambda *args, **kwargs: fitted.append((args, kwargs)))
    folder = f"{tmp_path}/t1_seed=3"
    one = spec.from_dict("x", {**TINY, "scaling": {"num_workers": 1, "cpus_per_worker": 2}})
    # A resumed trial holds what it held at its start: its device follows that, not `gpus`.
    for share, gpus, device in [(0.5, 0.5, "cuda"), (0, 0, "cpu"), (0, 1, "cpu"), (1, 0, "cuda")]:
        held.pop("GPU", None)
        held.update({"GPU": share} if share else {})
        run.run_trial({"seed": 3}, experiment=one, path=str(tmp_path), gpus=gpus)
        cfg, session = trained[-1]
        assert (session.folder, session.device.type) == (folder, device)
        assert (cfg.name, cfg.storage_path, cfg.label, cfg.seed) == ("train", folder, "seed=3", 3)
    assert not fitted
    two = spec.from_dict("x", {**TINY, "scaling": {"num_workers": 2, "cpus_per_worker": 2}})
    run.run_trial({"seed": 3}, experiment=two, path=str(tmp_path), gpus=1, threads=2)
    (((cfg, scaling), kwargs),) = fitted
    assert (cfg.name, cfg.storage_path, cfg.label) == ("train", folder, "seed=3")
    assert scaling.num_workers == 2 and scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": 2 - 0.01 / 2, "GPU": 1}
    assert kwargs["callbacks"] == ["reports to Tune"] and len(trained) == 4
    assert kwargs["threads"] == 2


def test_a_trials_workers_run_as_many_threads_as_their_cpus_per_worker_unless_set_here(
    tmp_path, monkeypatch
):
    """Ray gives a worker the whole CPUs it holds as threads, and a trial's driver takes its
    0.01 CPU out of its workers' share: workers of 2 CPUs ran 1 thread, of 12 ran 11, where a
    `raydeq.train` run's ran 2 and 12. The tuner gives the trials' workers the threads of
    cpus_per_worker, which their TorchTrainer hands on; OMP_NUM_THREADS set here is Ray's to
    hand on, so none is given then."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(run, "concurrency", lambda *args, **kwargs: 1)
    path = f"{tmp_path}/runs/x"
    options = run.Options(gpus=0, num_samples=1, scheduler="fifo", max_concurrent=0)
    for cpus, held, threads in [(0.5, 1, 1), (1, 1, 1), (2, 1, 2), (2.5, 2, 2), (12, 11, 12)]:
        scaling = {"num_workers": 2, "cpus_per_worker": cpus}
        experiment = spec.from_dict("x", {**TINY, "scaling": scaling})
        cfg = experiment.trial_config({})
        share = launch.scaling_config(cfg, 0, reserve_cpu=run.TRIAL_CPU).resources_per_worker
        assert launch.ray_threads(share["CPU"]) == held  # what Ray would give them
        trainable = run.tuner(experiment, path, options, resume=False)._local_tuner._trainable
        assert trainable.keywords["threads"] == threads
        trainer = launch.trainer(cfg, launch.scaling_config(cfg, 0), threads=threads)
        env = {"OMP_NUM_THREADS": str(threads)}
        assert trainer.run_config.worker_runtime_env == {"env_vars": env}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    trainable = run.tuner(experiment, path, options, resume=False)._local_tuner._trainable
    assert trainable.keywords["threads"] is None
    assert launch.trainer(cfg, launch.scaling_config(cfg, 0)).run_config.worker_runtime_env == {}


def test_the_tuner_runs_the_trials_with_the_runs_options_in_the_experiments_folder(
    tmp_path, monkeypatch
):
    """Metric and mode of the search, its space, the run's samples (2 seeds x 5 in the trial
    lines' count), trials named by their id and values, ASHA without reused processes (FIFO
    with), checkpoints kept and restarts of a trial that trains in its process (a Train run
    restarts its own), and the GPUs decided here when not given: one per worker where a node
    type has GPUs."""
    monkeypatch.setattr(run, "concurrency", lambda *args, **kwargs: 3)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    gpu_nodes = [capacity.NodeType({"CPU": 8, "GPU": 1}, 1)]
    monkeypatch.setattr(capacity, "node_types", lambda: gpu_nodes)
    search = {"metric": "train_loss", "mode": "min", "space": {"seed": {"grid_search": [0, 1]}}}
    settings = {
        **TINY,
        "train": {"keep_checkpoints": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 2, "max_failures": 5},
        "search": search,
    }
    experiment = spec.from_dict("x", settings)
    path = f"{tmp_path}/runs/x"
    options = run.Options(gpus=None, num_samples=5, scheduler="asha", max_concurrent=0)
    internal = run.tuner(experiment, path, options, resume=False)._local_tuner
    tune_config, run_config = internal._tune_config, internal._run_config
    assert (tune_config.metric, tune_config.mode) == ("train_loss", "min")
    assert tune_config.num_samples == 5 and not tune_config.reuse_actors
    assert type(tune_config.scheduler) is run.ResumableASHA
    assert tune_config.search_alg.max_concurrent == 3
    assert (run_config.name, run_config.storage_path) == ("x", f"{tmp_path}/runs")
    assert run_config.checkpoint_config.num_to_keep == 2
    assert run_config.failure_config.max_failures == 5
    # result.json (the reports the results read) and progress.csv, no TensorBoard of Tune's,
    # the trial lines and no tables
    loggers = [type(callback) for callback in run_config.callbacks]
    assert loggers == [run.JsonLoggerCallback, run.CSVLoggerCallback, run.TrialLines]
    assert run_config.callbacks[-1].total == 10 and run_config.verbose == 0
    assert internal._param_space == {"seed": {"grid_search": [0, 1]}}
    trial = SimpleNamespace(trial_id="a1b2", config={"seed": 1})
    assert tune_config.trial_name_creator(trial) == "a1b2_seed=1"
    assert tune_config.trial_dirname_creator(trial) == "a1b2_seed=1"
    assert internal._trainable._resources.bundles == [{"CPU": 2.0, "GPU": 1.0}]
    keywords = {"experiment": experiment, "path": path, "gpus": 1.0, "threads": 2}
    assert internal._trainable.keywords == keywords
    fifo = run.Options(gpus=0, num_samples=1, scheduler="fifo", max_concurrent=0)
    scaling = {"num_workers": 2, "max_failures": 5}
    two = spec.from_dict("x", {**settings, "scaling": scaling, "search": {}})
    internal = run.tuner(two, path, fifo, resume=False)._local_tuner
    assert (internal._tune_config.metric, internal._tune_config.mode) == ("test_accuracy", "max")
    assert internal._tune_config.reuse_actors
    assert type(internal._tune_config.scheduler) is run.FIFOScheduler
    assert internal._run_config.failure_config.max_failures == 0
    assert internal._trainable.keywords["gpus"] == 0


def test_a_resumed_tuner_archives_the_reports_and_continues_errored_trials_from_checkpoints(
    tmp_path, monkeypatch
):
    """Unfinished and errored trials continue (not from scratch), once the reports of the
    session before are archived."""
    calls = []
    monkeypatch.setattr(run, "archive_results", lambda path: calls.append(("archive", path)))
    monkeypatch.setattr(run, "concurrency", lambda *args, **kwargs: 1)  # no cluster asked
    restored = restored_tuner([])

    def restore(path, trainable, **kwargs):
        calls.append(("restore", path, kwargs))
        return restored

    monkeypatch.setattr(run.tune.Tuner, "restore", restore)
    options = run.Options(gpus=0, num_samples=1, scheduler="fifo", max_concurrent=0)
    path = f"{tmp_path}/x"
    assert run.tuner(spec.from_dict("x", TINY), path, options, resume=True) is restored
    flags = {"resume_unfinished": True, "resume_errored": True, "restart_errored": False}
    assert calls == [("archive", path), ("restore", path, flags)]


def restored_tuner(callbacks: list) -> SimpleNamespace:
    """A stand-in for the Tuner that Tune restores, its run config holding `callbacks`, its
    Tune config a scheduler and a search algorithm."""
    run_config = SimpleNamespace(callbacks=callbacks)
    tune_config = SimpleNamespace(scheduler=None, search_alg=None)
    return SimpleNamespace(
        _local_tuner=SimpleNamespace(get_run_config=lambda: run_config, _tune_config=tune_config)
    )


def test_a_resume_reports_through_this_raydeqs_callbacks_not_those_the_experiment_pickled(
    tmp_path, monkeypatch
):
    """Tune restores the callbacks pickled in tuner.pkl when the experiment started; those of
    raydeq of 2026-12-02 unpickle as TrialLines without the total of trials, so a resume of
    its digits experiment ended at its first finished trial in AttributeError 'TrialLines'
    object has no attribute 'total'. The resumed run reports through this raydeq's callbacks:
    the first of 6 trials to end is counted as 1 of 6."""
    old = object.__new__(run.TrialLines)  # what unpickling the older tuner.pkl gives
    restored = restored_tuner([run.JsonLoggerCallback(), run.CSVLoggerCallback(), old])
    monkeypatch.setattr(run, "archive_results", lambda path: None)
    monkeypatch.setattr(run.tune.Tuner, "restore", lambda path, trainable, **kwargs: restored)
    monkeypatch.setattr(run, "concurrency", lambda *args, **kwargs: 1)  # no cluster asked
    options = run.Options(gpus=0, num_samples=1, scheduler="fifo", max_concurrent=0)
    settings = {**TINY, "search": {"space": {"seed": {"grid_search": [0, 1, 2, 3, 4, 5]}}}}
    run.tuner(spec.from_dict("x", settings), f"{tmp_path}/x", options, resume=True)
    callbacks = restored._local_tuner.get_run_config().callbacks
    loggers = [type(callback) for callback in callbacks]
    assert loggers == [run.JsonLoggerCallback, run.CSVLoggerCallback, run.TrialLines]
    trials = [SimpleNamespace(status="RUNNING") for _ in range(6)]
    assert callbacks[-1].ended(trials, trials[0]) == " (1 of 6 trials done)"


def test_fit_counts_the_errored_trials_and_those_left_pending_running_or_paused(
    tmp_path, monkeypatch
):
    """A resume restores the experiment only where Tune can (else starts it anew)."""
    started = []

    def tuner(experiment, path, options, resume):
        started.append(resume)
        return SimpleNamespace(fit=lambda: SimpleNamespace(errors=["e1", "e2"]))

    monkeypatch.setattr(run, "tuner", tuner)
    statuses = ["TERMINATED", "ERROR", "ERROR", "PENDING", "RUNNING", "PAUSED", "TERMINATED"]
    trials = [SimpleNamespace(status=status) for status in statuses]
    monkeypatch.setattr(results, "RecordedExperiment", lambda path: SimpleNamespace(trials=trials))
    old = f"{tmp_path}/old"
    monkeypatch.setattr(run.tune.Tuner, "can_restore", lambda path: path == old)
    options = run.Options(gpus=0, num_samples=1, scheduler="fifo", max_concurrent=0)
    experiment = spec.from_dict("x", TINY)
    assert run.fit(experiment, old, options, resume=True) == (2, 3)
    assert run.fit(experiment, f"{tmp_path}/new", options, resume=True) == (2, 3)
    assert run.fit(experiment, old, options, resume=False) == (2, 3)
    assert started == [True, False, False]


def test_an_override_that_no_variant_has_names_each_value_they_have_once():
    variants = [{"label": "a", "seed": seed, "model.variant": "vanilla"} for seed in (1, 2)]
    variants.append({"label": "b", "model.variant": "skip"})
    with pytest.raises(ConfigError) as err:
        spec.from_dict(
            "x", {**TINY, "search": {"variants": variants}}, {"model.variant": "skip_reg"}
        )
    assert str(err.value) == (
        "model.variant='skip_reg': no variant of search.variants has that value; they have "
        "'vanilla', 'skip'"
    )


def test_an_override_of_a_mapping_that_holds_a_variants_key_is_refused():
    """model.solver_options={m: 3} over variants of m 5 and 6 was taken, and their trials ran
    m 5 and 6 (each variant's key laid over it), where model.solver_options.m=3 picks the
    variants of m 3."""
    model = {**TINY["model"], "solver": "anderson"}
    variants = [{"label": "a", "model.solver_options.m": m} for m in (5, 6)]
    variants[1]["label"] = "b"
    raw = {**TINY, "model": model, "search": {"variants": variants}}
    for value in ({"m": 3}, {"tol": 1}, None):
        overrides = {"model.solver_options": value}
        with pytest.raises(ConfigError) as err:
            spec.from_dict("x", raw, overrides)
        assert str(err.value) == (
            f"model.solver_options={value!r}: search.variants set model.solver_options.m, "
            "which their trials would take over this override; override "
            "model.solver_options.m itself, as a key of its own"
        )
        assert err.value.key == "model.solver_options"
    picked = spec.from_dict("x", raw, {"model.solver_options.m": 5})
    assert [picked.trial_config(s).model.solver_options for s in spec.expand(picked)] == [{"m": 5}]
    with pytest.raises(ConfigError, match=r"^model\.solver_options: expected a mapping"):
        spec.from_dict("x", raw, {"model.solver_options": 3})
    others = spec.from_dict("x", raw, {"model.adjoint_options": {"rtol": 0.1}})
    assert len(spec.expand(others)) == 2


@pytest.mark.parametrize("searcher", ["random", "tpe"])
@pytest.mark.parametrize(
    ("space", "bad", "message"),
    [
        ({}, {"model.variant": "bogus"}, "model.variant: 'bogus' is not allowed; choose one of"),
        ({"seed": {"grid_search": [0, 1]}}, {"model.abstol": -1.0}, "model.abstol: must be >= 0"),
    ],
)
def test_a_variants_bad_setting_is_named_by_its_variant(searcher, space, bad, message):
    """A variant's bad value was named alone (`model.variant: 'bogus' ...`, no variant) or
    under the space's first dimension (`search.space.seed: the grid value 0: ...`); the error
    now names the variant that sets it."""
    dims = {"model.variant": {"choice": ["vanilla", "skip"]}, "model.abstol": 0.1}
    variants = [{"label": "a", "model.variant": "skip"}, {"label": "b", **bad}]
    search = {"space": space, "variants": variants}
    if searcher == "tpe":  # a searcher's variants are points of its space
        search |= {"searcher": searcher, "space": dims, "num_samples": 2}
    with pytest.raises(ConfigError) as err:
        spec.from_dict("x", {**TINY, "search": search})
    assert str(err.value).startswith(f"search.variants[1]: {message}")


def test_a_variant_giving_lambda_skip_to_a_variant_without_a_skip_loss_is_named():
    """A vanilla variant's own lambda_skip trained nothing, unsaid; the base's, which the skip
    variants take, stays silent under it."""
    base = {**TINY, "train": {"lambda_skip": 0.01}}
    variants = [{"label": "a", "model.variant": "skip"}, {"label": "b", "model.variant": "vanilla"}]
    spec.from_dict("x", {**base, "search": {"variants": variants}})
    variants[1]["train.lambda_skip"] = 0.5
    with pytest.raises(ConfigError) as err:
        spec.from_dict("x", {**base, "search": {"variants": variants}})
    assert str(err.value).startswith(
        "search.variants[1]: train.lambda_skip: 0.5 weighs the skip loss, which variant "
        "'vanilla' does not have"
    )


def test_an_override_that_no_variant_takes_is_refused_and_one_some_take_is_silent():
    """raydeq.tune digits data.augment=true trained every trial without augmentation, unsaid;
    a lambda_skip override, which the skip variants take, stays silent beside a vanilla one,
    and so does an override whose deciding setting the space draws."""
    variants = [{"label": "a", "model.variant": "skip"}, {"label": "b", "model.variant": "vanilla"}]
    raw = {**TINY, "search": {"variants": variants}}
    with pytest.raises(ConfigError) as err:
        spec.from_dict("x", raw, {"data.augment": True})
    assert str(err.value).startswith(
        "data.augment: true applies to data.dataset=mnist10k, mnist, cifar10 or imagenet only, "
        "not 'digits'"
    )
    spec.from_dict("x", raw, {"train.lambda_skip": 0.5})
    with pytest.raises(ConfigError, match="^train.lambda_skip: 0.5 weighs the skip loss"):
        spec.from_dict("x", raw, {"train.lambda_skip": 0.5, "model.variant": "vanilla"})
    datasets = {"data.dataset": {"grid_search": ["digits", "mnist10k"]}}
    spec.from_dict("x", {**TINY, "search": {"space": datasets}}, {"data.augment": True})
    # Each override is judged on its own: the vanilla variant refusing lambda_skip, which the
    # skip variant takes, is not the reason when no variant takes data.augment.
    vanilla_first = {**TINY, "search": {"variants": variants[::-1]}}
    with pytest.raises(ConfigError, match="^data.augment: true applies to "):
        spec.from_dict("x", vanilla_first, {"train.lambda_skip": 0.5, "data.augment": True})


def test_a_trials_words_show_its_label_then_its_draws_to_three_significant_digits():
    """Draws that differ in the third digit are told apart (the results group trials by them)."""
    sampled = {"variant": {"label": "Skip", "seed": 1}, "optim": {"lr": 0.00125}, "seed": 2}
    assert spec.describe(sampled) == "Skip, lr=0.00125, seed=2"
    assert spec.describe(sampled | {"optim": {"lr": 0.00135}}, leave_out=("seed",)) == (
        "Skip, lr=0.00135"
    )


def test_leaves_name_each_setting_by_its_dotted_key():
    """Settings of one name in two sections (max_steps) stay apart, as the results' columns."""
    tree = {"model": {"max_steps": 50, "solver_options": {"m": 5}}, "train": {"max_steps": 0}}
    assert spec.leaves(tree | {"seed": 1, "data": {}}) == {
        "model.max_steps": 50,
        "model.solver_options.m": 5,
        "train.max_steps": 0,
        "seed": 1,
    }


def stored_tiny_experiment(tmp_path: Path) -> tuple[Path, Path]:
    """The TINY experiment's file, and its folder under tmp_path/runs with its stored settings,
    as a run started from that file leaves them."""
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump(TINY))
    folder = tmp_path / "runs" / "tiny"
    experiment = spec.from_dict("tiny", TINY)
    run.save_settings(
        str(folder), experiment, rt.new_options(rt._parser().parse_args([""]), experiment)
    )
    return file, folder


def test_a_report_while_a_driver_here_runs_the_experiment_counts_its_trials_as_running(
    tmp_path, capsys, monkeypatch
):
    """--report from a second terminal: the trials that have not ended are running, not
    stopped (as in an interrupted run), and a note says the run writes its results again."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    file, folder = stored_tiny_experiment(tmp_path)
    called = []
    monkeypatch.setattr(
        rt, "report", lambda path, experiment, unfinished: called.append(unfinished)
    )
    argv = [str(file), "--storage", str(tmp_path / "runs"), "--report"]
    assert rt.main(argv) == 0 and called == ["stopped"]
    assert capsys.readouterr().err == ""
    with runlock.hold(str(folder)):
        assert rt.main(argv) == 0 and called == ["stopped", "running"]
    assert capsys.readouterr().err == (
        f"note: {folder} is still being run by process {os.getpid()} on this machine: its "
        "unfinished trials are counted as running, and the run writes its results again when "
        "it ends\n"
    )


def test_a_report_in_a_runs_first_seconds_says_it_has_just_started_not_to_start_or_resume_it(
    tmp_path, capsys, monkeypatch
):
    """--report (or --resume) while a driver that has stored no settings, or recorded no
    trial, runs the experiment was told to start it without the flag, or to --resume it,
    which that driver's lock refuses; it says the run has just started."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    file, folder = stored_tiny_experiment(tmp_path)
    settings = (folder / run.SETTINGS_FILE).read_bytes()
    (folder / run.SETTINGS_FILE).unlink()
    argv = [str(file), "--storage", str(tmp_path / "runs")]
    driver = f"process {os.getpid()} on this machine"
    with runlock.hold(str(folder)):
        assert rt.main([*argv, "--report"]) == 2
        assert capsys.readouterr().err == (
            f"error: {folder}: {driver} has just started this experiment and stored nothing "
            "yet; --report again once its trials have started\n"
        )
        assert rt.main([*argv, "--resume"]) == 2
        assert capsys.readouterr().err == (
            f"error: {folder}: {driver} has just started this experiment and stored nothing "
            "yet; wait for it to end (or stop it)\n"
        )
        (folder / run.SETTINGS_FILE).write_bytes(settings)
        assert rt.main([*argv, "--report"]) == 2
        assert capsys.readouterr().err.endswith(
            f"error: {folder}: no trial has been recorded yet, so there is nothing to report; "
            "its run has just started: --report again once its trials have started\n"
        )
    assert rt.main([*argv, "--report"]) == 2
    assert capsys.readouterr().err == (
        f"error: {folder}: no trial has been recorded yet, so there is nothing to report; "
        "--resume runs the experiment\n"
    )
    (folder / run.SETTINGS_FILE).unlink()
    assert rt.main([*argv, "--report"]) == 2
    assert "start it without --report" in capsys.readouterr().err


def test_a_start_of_an_experiment_that_is_running_names_its_driver_not_resume(
    tmp_path, capsys, monkeypatch
):
    """A second start of an experiment that has stored its settings and still runs was told
    to add --resume, which the running driver's lock then refused; it names the driver."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    file, folder = stored_tiny_experiment(tmp_path)
    with runlock.hold(str(folder)):
        assert rt.main([str(file), "--storage", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err == (
        f"error: experiment {folder} already exists and is being run by process {os.getpid()} "
        "on this machine; wait for it to end (or stop it), add --report to summarise it "
        "meanwhile, or choose another --name\n"
    )


def test_a_start_refuses_an_experiment_another_one_started_during_its_preflight(
    tmp_path, capsys, monkeypatch
):
    """Two starts of one experiment: the first that ends (a short run) while the second still
    checks its data leaves its settings and trials there; the second, holding the folder only
    then, is refused instead of storing its own settings and training over the first's."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    monkeypatch.setattr(rt.launch, "check_cluster", lambda: None)
    file, folder = stored_tiny_experiment(tmp_path)
    first = (folder / run.SETTINGS_FILE).read_bytes()
    (folder / run.SETTINGS_FILE).unlink()

    def first_run_ends(*args: object) -> None:
        """The first start, run and ended while this one checks its data."""
        with runlock.hold(str(folder)):
            (folder / run.SETTINGS_FILE).write_bytes(first)

    monkeypatch.setattr(rt, "preflight", first_run_ends)
    monkeypatch.setattr(rt, "run_experiment", lambda *args: pytest.fail("the first was run over"))
    assert rt.main([str(file), "--storage", str(tmp_path / "runs"), "--num-samples", "3"]) == 2
    assert capsys.readouterr().err == (
        f"error: experiment {folder} already exists; add --resume to continue it, --report to "
        "summarise it, or choose another --name\n"
    )
    assert (folder / run.SETTINGS_FILE).read_bytes() == first


def recorded_tiny_trials(
    folder: Path, statuses: list[str], monkeypatch: pytest.MonkeyPatch
) -> list[SimpleNamespace]:
    """Tune's record of the stored tiny experiment's trials, stood in by trials of `statuses`,
    each with a folder whose result file holds one report, of its last epoch."""
    epochs = spec.from_dict("tiny", TINY).trial_config({}).train.epochs
    trials = []
    for number, status in enumerate(statuses):
        trial = SimpleNamespace(trial_id=f"ab_0000{number}", status=status, config={}, path="")
        trial.path = str(folder / spec.trial_name(trial))
        Path(trial.path).mkdir(parents=True)
        report = {"step": 30, "epoch": epochs, "test_accuracy": 0.75 - 0.25 * number}
        write_reports(Path(trial.path, archive.RESULT_FILE), [report])
        trials.append(trial)
    analysis = SimpleNamespace(trials=trials)
    monkeypatch.setattr(results, "RecordedExperiment", lambda path: analysis)
    return trials


def test_a_report_says_on_stderr_how_far_it_has_come_and_prints_the_table_on_stdout(
    tmp_path, capsys, monkeypatch
):
    """--report of 300 trials of 200 reports took 48 s without a word (reading the trials 18
    s, each of the 3 plots 12 s); a part (a trial read, a file drawn) begun 5 s or more after
    the line before is a line on stderr, naming it, and stdout holds the table alone."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(results, "plot", lambda *args: b"")
    file, folder = stored_tiny_experiment(tmp_path)
    trials = recorded_tiny_trials(folder, ["TERMINATED", "TERMINATED"], monkeypatch)
    ticking(monkeypatch, 10.0)
    assert rt.main([str(file), "--storage", str(tmp_path / "runs"), "--report"]) == 0
    out, err = capsys.readouterr()
    what = f"writing the results of {folder}"
    parts = [f"reading the reports of {spec.trial_name(trial)}" for trial in trials]
    parts += ["drawing pareto.png", "writing results.md"]
    parts += [f"drawing {metric}.png" for metric in results.PLOTS]
    assert err.splitlines() == [f"{what}: {n}/7, {part}" for n, part in enumerate(parts)]
    assert out == (folder / results.MARKDOWN_FILE).read_text() + "\n"


class Unreadable:
    """A local filesystem on which opening or listing the path `denied` fails as pyarrow's
    does, with the errno `code`."""

    type_name = "local"

    def __init__(self, denied: str, code: int) -> None:
        self.local, self.denied, self.code = pyarrow.fs.LocalFileSystem(), denied, code

    def __getattr__(self, name: str) -> object:
        return getattr(self.local, name)

    def refuse(self, path: str) -> None:
        if path == self.denied:
            detail = f"[errno {self.code}] {os.strerror(self.code)}"
            raise OSError(self.code, f"Cannot read '{path}'. Detail: {detail}")

    def open_input_stream(self, path: str) -> pyarrow.NativeFile:
        self.refuse(path)
        return self.local.open_input_stream(path)

    def get_file_info(self, what: str | pyarrow.fs.FileSelector) -> object:
        if isinstance(what, pyarrow.fs.FileSelector):
            self.refuse(what.base_dir)
        return self.local.get_file_info(what)


@pytest.mark.parametrize(("denied", "code"), [("result.json", errno.EACCES), ("", errno.EIO)])
def test_a_trials_file_or_folder_that_cannot_be_read_is_one_line_naming_it(
    tmp_path, capsys, monkeypatch, denied, code
):
    """--report of an experiment with a trial's result.json that cannot be read (Permission
    denied) or a trial folder that cannot be listed (Input/output error) ended in pyarrow's
    traceback; it is one line naming the file or folder and why, exit 1, and no results are
    written without that trial's reports."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(results, "plot", lambda *args: b"")
    file, folder = stored_tiny_experiment(tmp_path)
    trials = recorded_tiny_trials(folder, ["TERMINATED", "TERMINATED"], monkeypatch)
    path = str(Path(trials[1].path, denied))
    unreadable = Unreadable(path, code)
    monkeypatch.setattr(archive, "filesystem", lambda p: (unreadable, storage.absolute(p)))
    assert rt.main([str(file), "--storage", str(tmp_path / "runs"), "--report"]) == 1
    assert capsys.readouterr() == ("", f"error: {path} cannot be read: {os.strerror(code)}\n")
    assert not (folder / results.MARKDOWN_FILE).exists()


def test_a_report_that_read_the_trials_before_the_run_ended_leaves_the_final_results(
    tmp_path, monkeypatch
):
    """--report from a second terminal reads a trial still running, then the run ends and
    writes its results: the report's, written after, must not replace them (a running trial
    in the results of a finished run); the run's report waits for it, then reads the end."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(results, "plot", lambda *args: b"")
    _, folder = stored_tiny_experiment(tmp_path)
    experiment = spec.from_dict("tiny", TINY)
    [trial] = recorded_tiny_trials(folder, ["RUNNING"], monkeypatch)
    statuses, read, final_read, ended = ["RUNNING"], *(threading.Event() for _ in range(3))

    def recorded(path: str) -> SimpleNamespace:
        """Tune's record as it stands; the run's end is read by the report after it."""
        if statuses[-1] == "TERMINATED":
            final_read.set()
        return SimpleNamespace(trials=[SimpleNamespace(**{**vars(trial), "status": statuses[-1]})])

    def history(path: str) -> pd.DataFrame:
        """The trial's reports, the first read held until the run has ended."""
        if not read.is_set():
            read.set()
            ended.wait(WAIT_S)
        return archive.history(path)

    monkeypatch.setattr(results, "RecordedExperiment", recorded)
    monkeypatch.setattr(results, "history", history)
    early = threading.Thread(target=results.report, args=(str(folder), experiment, "running"))
    early.start()
    assert read.wait(WAIT_S)
    statuses.append("TERMINATED")
    final = threading.Thread(target=results.report, args=(str(folder), experiment))
    final.start()
    held_off = not final_read.wait(1)
    ended.set()
    early.join()
    final.join()
    assert held_off
    table = (folder / "results.md").read_text()
    assert "running" not in table and "| all | 1 | 75.00 |" in table


def test_a_resume_of_a_finished_experiment_writes_its_results_without_starting_ray(
    tmp_path, capsys, monkeypatch
):
    """--resume of an experiment whose trials all terminated, as its folder records them,
    has nothing to run: the results are written and printed as at the end of a run, exit 0,
    without Ray (nor the cluster's address asked), and no trial's reports are archived."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    monkeypatch.setattr(rt.launch, "check_cluster", lambda: pytest.fail("the cluster was asked"))
    monkeypatch.setattr(results, "plot", lambda *args: b"")
    file, folder = stored_tiny_experiment(tmp_path)
    options = run.Options(gpus=None, num_samples=2, scheduler="fifo", max_concurrent=0)
    run.save_settings(str(folder), spec.from_dict("tiny", TINY), options)
    trials = recorded_tiny_trials(folder, ["TERMINATED", "TERMINATED"], monkeypatch)
    assert rt.main([str(file), "--storage", str(tmp_path / "runs"), "--resume"]) == 0
    out, err = capsys.readouterr()
    table = (folder / "results.md").read_text()
    assert "| all | 2 | 62.50 ± 17.68 |" in table
    named = "results.parquet, results.md, test_accuracy.png, forward_time.png, backward_time.png"
    assert out == f"{table}\nresults in {folder}: {named}, pareto.png, hparams/\n"
    assert all(
        (folder / name).exists()
        for name in results.written(str(folder), spec.from_dict("tiny", TINY))
    )
    assert err == f"note: every trial of {folder} has finished; its results are written again\n"
    assert [list(Path(t.path).glob(f"{archive.ARCHIVE_PREFIX}*")) for t in trials] == [[], []]
    (folder / "results.md").unlink()
    argv = [str(file), "--storage", str(tmp_path / "runs"), "--resume", "--dry-run"]
    assert rt.main(argv) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # the trials, as a dry run lists them
    assert not (folder / "results.md").exists()


REFUSED_SINCE = {
    "a rule drawing what the space draws": {
        "searcher": "tpe",
        "space": {"model": {"solver": {"choice": ["vcab3", "anderson"]}}, "optim.lr": 0.01},
        "conditional": [
            {"when": {"model.solver": "anderson"}, "space": {"model.solver": {"choice": ["vcab3"]}}}
        ],
    },
    "an integer range of a bound no integer": {"space": {"seed": {"randint": [1.5, 3]}}},
    "a range of a bound no finite number": {"space": {"optim.lr": {"randn": [math.nan, 1]}}},
    "a key written dotted and nested": {
        "searcher": "tpe",
        "space": {"model.solver": {"choice": ["vcab3", "anderson"]}},
        "conditional": [
            {
                "when": {"model.solver": "anderson"},
                "space": {
                    "model.solver_options.m": {"choice": [3]},
                    "model": {"solver_options": {"m": {"choice": [4]}}},
                },
            }
        ],
    },
}


@pytest.mark.parametrize("search", REFUSED_SINCE.values(), ids=REFUSED_SINCE)
def test_an_experiment_stored_with_a_space_refused_since_is_reported_and_resumed(
    tmp_path, capsys, monkeypatch, search
):
    """A run started before a check of its space (whose file and stored settings hold that
    space) is still reported and resumed without an edit: its results draw from no space, and
    Tune resumes its search from its own state; --dry-run, which would draw from the space,
    says in one line why it cannot list the trials."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(results, "plot", lambda *args: b"")
    file, folder = stored_tiny_experiment(tmp_path)
    with pytest.raises(ConfigError) as refused:
        spec.from_dict("tiny", {**TINY, "search": search})
    options = run.Options(gpus=None, num_samples=2, scheduler="fifo", max_concurrent=0)
    run.save_settings(str(folder), spec.from_dict("tiny", TINY), options)
    settings = yaml.safe_load((folder / run.SETTINGS_FILE).read_text())
    settings["experiment"]["search"] |= search
    (folder / run.SETTINGS_FILE).write_text(yaml.safe_dump(settings))
    file.write_text(yaml.safe_dump({**TINY, "search": search}))
    recorded_tiny_trials(folder, ["TERMINATED", "RUNNING"], monkeypatch)
    (folder / SEARCHER_SAVED).write_text("{}")  # as Tune saves it with its record of the trials
    assert rt.main([str(file), "--storage", str(tmp_path / "runs"), "--report"]) == 0
    assert "| all | 2 | 62.50 ± 17.68 |" in (folder / "results.md").read_text()
    capsys.readouterr()
    argv = [str(file), "--storage", str(tmp_path / "runs"), "--resume", "--dry-run"]
    assert rt.main(argv) == 2
    assert capsys.readouterr() == (
        "",
        f"error: {folder}: --dry-run cannot list the trials of this experiment, its stored "
        f"search space being refused since it started ({refused.value}); --resume goes on from "
        "Tune's own state of the search, and --report summarises the trials so far\n",
    )
    run_without_ray(monkeypatch)
    resumed = []
    monkeypatch.setattr(run, "fit", lambda *args: resumed.append(args[3]) or (0, 0))
    assert rt.main([str(file), "--storage", str(tmp_path / "runs"), "--resume"]) == 0
    assert resumed == [True] and capsys.readouterr().err == ""


SEARCHER_SAVED = run.SearchGenerator.CKPT_FILE_TMPL.format("2026-01-01_00-00-00")


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_a_search_stored_with_a_space_refused_since_without_a_saved_searcher_is_not_resumed(
    tmp_path, capsys, monkeypatch, dry_run
):
    """Tune records the trials before it saves the searcher, so a driver stopped between the two
    left no searcher to restore over the empty space a refused stored space resumes with: every
    trial past those recorded would have run at the base's values, unlabelled, and a resume
    before Tune recorded anything stopped in a traceback; both now end in one line."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    run_without_ray(monkeypatch)
    monkeypatch.setattr(run, "fit", lambda *args: pytest.fail("the resume went on"))
    search = REFUSED_SINCE["a rule drawing what the space draws"]
    file, folder = stored_tiny_experiment(tmp_path)
    with pytest.raises(ConfigError) as refused:
        spec.from_dict("tiny", {**TINY, "search": search})
    settings = yaml.safe_load((folder / run.SETTINGS_FILE).read_text())
    settings["experiment"]["search"] |= search
    (folder / run.SETTINGS_FILE).write_text(yaml.safe_dump(settings))
    file.write_text(yaml.safe_dump({**TINY, "search": search}))
    recorded_tiny_trials(folder, ["TERMINATED", "RUNNING"], monkeypatch)
    argv = [str(file), "--storage", str(tmp_path / "runs"), "--resume", *dry_run]
    assert rt.main(argv) == 2
    assert capsys.readouterr() == (
        "",
        f"error: {folder}: --resume cannot go on with this search: its stored space is refused "
        f"since it started ({refused.value}), and Tune saved no state of its searcher there to "
        "go on from; start the experiment again under another --name\n",
    )


def test_a_search_stored_with_a_space_refused_since_resumes_with_its_saved_searcher(
    tmp_path, monkeypatch
):
    """--resume of a TPE search whose stored space a check added since refuses (a rule drawing
    what the space draws) failed as Tune started, with that check's error, though the dry run
    says that --resume goes on; Tune's saved searcher goes on with the points it started with."""
    monkeypatch.setattr(run, "concurrency", lambda *args, **kwargs: 2)
    options = run.Options(gpus=None, num_samples=4, scheduler="fifo", max_concurrent=0)
    space = {"model": {"solver": {"choice": ["vcab3", "anderson"]}}}
    points = [{"label": "p0", "model.solver": "vcab3"}, {"label": "p1", "model.solver": "anderson"}]
    search = {"searcher": "tpe", "num_samples": 4, "space": space, "variants": points}
    raw = {**TINY, "search": search}
    refused = {**TINY, "search": REFUSED_SINCE["a rule drawing what the space draws"]}
    with run.searchers.optuna_warnings_only():
        started = run.search_algorithm(spec.from_dict("a", raw), options, str(tmp_path))
        assert started.searcher.suggest("t0")["variant"] == {"label": "p0"}
        started.save_to_dir(str(tmp_path), "2026-01-01_00-00-00")
        stored = spec.from_dict("a", refused, stored=True)
        with pytest.raises(ConfigError, match="drawn by search.space too"):
            run.search_algorithm(stored, options, str(tmp_path))
        resumed = run.search_algorithm(stored, options, str(tmp_path), resume=True)
        resumed.restore_from_dir(str(tmp_path))
        assert resumed.searcher.suggest("t1") == {
            "model": {"solver": "anderson"},
            "variant": {"label": "p1"},
        }


@pytest.mark.parametrize(
    "statuses",
    [["TERMINATED", "RUNNING"], ["TERMINATED", "PENDING"], ["TERMINATED", "ERROR"], ["TERMINATED"]],
)
def test_a_resume_of_an_experiment_with_a_trial_to_run_runs_it_on_ray(
    tmp_path, capsys, monkeypatch, statuses
):
    """A trial that has not ended, one that failed (a resume continues it from its checkpoint)
    or one that the search has yet to add (1 of 2 recorded): --resume runs the experiment."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    run_without_ray(monkeypatch)
    resumed = []
    monkeypatch.setattr(run, "fit", lambda *args: resumed.append(args[3]) or (0, 0))
    file, folder = stored_tiny_experiment(tmp_path)
    options = run.Options(gpus=None, num_samples=2, scheduler="fifo", max_concurrent=0)
    run.save_settings(str(folder), spec.from_dict("tiny", TINY), options)
    recorded_tiny_trials(folder, statuses, monkeypatch)
    assert rt.main([str(file), "--storage", str(tmp_path / "runs"), "--resume"]) == 0
    assert resumed == [True]
    assert capsys.readouterr().out == f"tensorboard --logdir {folder}\ntable of {folder}\n" + (
        f"results in {folder}: results.parquet, results.md, test_accuracy.png, forward_time.png, "
        "backward_time.png, pareto.png\n"  # no hparams/: no trial has finished
    )


def test_asha_rebuilds_its_rungs_from_the_reports_of_trials_that_reported_the_metric(tmp_path):
    """ResumableASHA's rungs after a resume: a trial's (step, metric) reports in step order,
    those without the metric left out; none for a trial that never started (no folder named
    yet), one whose folder holds no report, or one whose reports never name the metric."""
    path = tmp_path / "experiment"
    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name=path.name)
    waited = Trial("trainable", config={}, storage=storage, stub=True, trial_id="ab_00002")
    trials = [SimpleNamespace(path=str(path / name)) for name in ("ran", "quiet", "unmeasured")]
    for trial in trials:
        Path(trial.path).mkdir(parents=True)
    write_reports(
        Path(trials[0].path, archive.RESULT_FILE),
        [{"step": 20, "test_accuracy": 0.5}, {"step": 10}, {"step": 30, "test_accuracy": 0.7}],
    )
    write_reports(Path(trials[2].path, archive.RESULT_FILE), [{"step": 10, "train_loss": 2.0}])
    frames = [run._past_frame(str(path), t) for t in [*trials, waited]]
    found = [run._measured(frame, "step", "test_accuracy") for frame in frames]
    assert found == [[(20, 0.5), (30, 0.7)], [], [], []]


def write_tune_state(folder: Path, session: str, cut: bool) -> Path:
    """Tune's record of one pending trial in the experiment's folder, as its session `session`
    saves it, or the first half of it (`cut`: a copy that stopped)."""
    storage = StorageContext(storage_path=str(folder.parent), experiment_dir_name=folder.name)
    trial = Trial("trainable", config={}, storage=storage, stub=True, trial_id="ab_00000")
    trial.create_placement_group_factory()
    state = json.dumps({"trial_data": [trial.get_json_state()], "runner_data": {}, "stats": {}})
    file = folder / f"experiment_state-{session}.json"
    file.write_text(state[: len(state) // 2] if cut else state)
    return file


def test_a_resume_refuses_tunes_saved_search_cut_short_rather_than_start_the_experiment_anew(
    tmp_path, capsys, monkeypatch
):
    """A full storage cut the newest of Tune's saved states of the search (basic-variant-state,
    a pickle) to nothing: --resume, its record of the trials whole, had Tune log 'Failed to
    restore the run state' and 'Restarting experiment', run one trial of the base config in
    the experiment's folder and exit 130 as interrupted. It is refused in one line naming the
    file and where a whole copy may be, before Tune restores anything."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    run_without_ray(monkeypatch)
    monkeypatch.setattr(run.tune.Tuner, "restore", lambda *args, **kwargs: pytest.fail("restored"))
    monkeypatch.setattr(run, "trial_gpus", lambda *args: 0.0)
    file, folder = stored_tiny_experiment(tmp_path)
    write_tune_state(folder, "2024-01-02_00-00-00", cut=False)
    (folder / "tuner.pkl").write_bytes(b"")  # read by the restore alone
    saved = ray.cloudpickle.dumps({"name": "the search's state"})
    (folder / "basic-variant-state-2024-01-01_00-00-00.json").write_bytes(saved)
    cut = folder / "basic-variant-state-2024-01-02_00-00-00.json"
    cut.write_bytes(b"")
    argv = [str(file), "--storage", str(tmp_path / "runs"), "--resume"]
    assert rt.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: {cut}, Tune's saved state of the experiment's search, is damaged (EOFError: "
    )
    assert err.endswith(
        "/tiny/driver_artifacts/basic-variant-state-2024-01-02_00-00-00.json, while Ray keeps "
        "that session's files); resumed without it, Tune would start the experiment again "
        "from nothing\n"
    )
    assert err.count("\n") == 1
    cut.write_bytes(saved)
    results.check_saved_search(str(folder))


def test_a_record_of_tune_read_while_its_driver_copies_it_is_read_whole(tmp_path, monkeypatch):
    """A running driver copies Tune's record into the storage in place, so a --report from a
    second terminal found it empty for a moment (8 of 10,187 reads during a digits run) and
    failed calling it damaged, to be restored from a backup; it is read again once copied."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    # The copy's 0.3 s, on a loaded machine, may come seconds late: the read waits it out.
    monkeypatch.setattr(results, "STATE_RETRY_S", WAIT_S)
    _, folder = stored_tiny_experiment(tmp_path)
    state = write_tune_state(folder, "2024-01-02_00-00-00", cut=False)
    whole = state.read_text()
    state.write_text("")
    copy = threading.Timer(0.3, state.write_text, (whole,))
    copy.start()
    try:
        [trial] = results.recorded_trials(str(folder))
    finally:
        copy.join()
    assert trial.trial_id == "ab_00000"


def write_tune_session(folder: Path, session: str, start: float, trial_id: str) -> None:
    """Tune's files of a session named `session` (its local time) that started at `start`
    (seconds since the epoch): its record of one trial `trial_id`, and its variants' and
    callbacks' states, each naming that trial."""
    storage = StorageContext(storage_path=str(folder.parent), experiment_dir_name=folder.name)
    trial = Trial("trainable", config={}, storage=storage, stub=True, trial_id=trial_id)
    trial.create_placement_group_factory()
    state = {"trial_data": [trial.get_json_state()], "runner_data": {}, "stats": {}}
    state["stats"]["start_time"] = start
    (folder / f"experiment_state-{session}.json").write_text(json.dumps(state))
    (folder / f"basic-variant-state-{session}.json").write_bytes(cloudpickle.dumps(trial_id))
    (folder / f"callback-states-{session}.pkl").write_bytes(cloudpickle.dumps(trial_id))


def test_a_resume_restores_tunes_newest_state_whatever_time_zone_named_it(
    tmp_path, capsys, monkeypatch
):
    """Tune names a session's state files by its start in local time and restores those named
    highest: a run started in Tokyo at 17:00 and resumed in Los Angeles five minutes later
    (00:05 there) named the resumed session's files below the first's, so --report and the
    next resume read the first session's record. Both read the newest by the start it
    records; the resume sets the older session's files aside, kept, for Tune to restore it."""
    folder = tmp_path / "runs" / "x"
    folder.mkdir(parents=True)
    start = datetime.datetime(2026, 12, 6, 8, 0, tzinfo=datetime.UTC).timestamp()
    write_tune_session(folder, "2026-12-06_17-00-00", start, "ab_00000")
    write_tune_session(folder, "2026-12-06_00-05-00", start + 300, "ab_00001")
    older = {p.name: p.read_bytes() for p in folder.glob("*-2026-12-06_17-00-00.*")}
    assert [trial.trial_id for trial in results.recorded_trials(str(folder))] == ["ab_00001"]
    monkeypatch.setattr(run, "archive_results", lambda path: None)
    monkeypatch.setattr(run, "concurrency", lambda *args, **kwargs: 1)  # no cluster asked
    restored = restored_tuner([])
    seen = []

    def restore(path: str, trainable: object, **kwargs: object) -> SimpleNamespace:
        state = _find_newest_experiment_checkpoint(path).rsplit("/", 1)[-1]
        variants = _load_newest_checkpoint(path, "basic-variant-state-*.json")
        callbacks = _load_newest_checkpoint(path, "callback-states-*.pkl")
        seen.append((state, variants, callbacks))
        return restored

    monkeypatch.setattr(run.tune.Tuner, "restore", restore)
    options = run.Options(gpus=0, num_samples=1, scheduler="fifo", max_concurrent=0)
    for _ in range(2):
        assert run.tuner(spec.from_dict("x", TINY), str(folder), options, True) is restored
    state = "experiment_state-2026-12-06_00-05-00.json"
    assert seen == [(state, "ab_00001", "ab_00001")] * 2
    aside = folder / results.SUPERSEDED_FOLDER
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == older
    assert capsys.readouterr().out == (
        "Tune's state of an older session, named later by another time zone or clock, set "
        f"aside in {folder}/superseded-state: experiment_state-2026-12-06_17-00-00.json, "
        "basic-variant-state-2026-12-06_17-00-00.json, callback-states-2026-12-06_17-00-00.pkl\n"
    )
    assert [trial.trial_id for trial in results.recorded_trials(str(folder))] == ["ab_00001"]


def test_a_saved_search_cut_mid_pickle_is_damaged_and_its_hint_names_the_experiments_folder(
    tmp_path,
):
    """A save of the search's state cut partway (not to nothing) fails Tune's unpickling with
    an UnpicklingError, not an EOFError: it is refused as damaged all the same, and the copy
    to restore from is looked for under the experiment's folder name among Ray's sessions."""
    folder = tmp_path / "runs" / "tiny"
    folder.mkdir(parents=True)
    saved = cloudpickle.dumps({"name": "the search's state"})
    cut = folder / "basic-variant-state-2024-01-02_00-00-00.json"
    cut.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(storage.StorageError) as refused:
        results.check_saved_search(str(folder))
    assert str(refused.value).startswith(
        f"{cut}, Tune's saved state of the experiment's search, is damaged (UnpicklingError: "
        "pickle data was truncated): restore it from a backup, or from the copy Tune wrote "
        "first on the machine that ran the experiment (/tmp/ray/session_*/artifacts/*/tiny/"
        f"driver_artifacts/{cut.name}, "
    )


def test_a_failed_trials_error_file_cut_by_a_full_storage_is_one_line_naming_the_folder(
    tmp_path, capsys, monkeypatch
):
    """A full storage left a failed trial's error.pkl empty: Tune's reading of it back as the
    run ended raised an EOFError ('Ran out of input') out of the command, in a traceback of
    40 lines with no word of the storage nor of a resume; it is one line naming the folder,
    the cause and --resume, exit 1."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    run_without_ray(monkeypatch)

    def fit() -> SimpleNamespace:
        raise EOFError("Ran out of input")

    monkeypatch.setattr(run, "tuner", lambda *args: SimpleNamespace(fit=fit))
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump(TINY))
    assert rt.main([str(file), "--storage", str(tmp_path / "runs")]) == 1
    assert capsys.readouterr().err == (
        f"error: Tune could not read back the error of a failed trial in {tmp_path}/runs/tiny "
        "(EOFError: Ran out of input): its error.pkl is cut short, as a full storage leaves "
        "it; once there is room, --resume retries the failed trials\n"
    )


def test_a_damaged_record_of_tune_is_one_line_naming_it_in_report_resume_and_a_runs_end(
    tmp_path, capsys, monkeypatch
):
    """Tune's record of the trials cut short (a copy that stopped) is read by --report,
    --resume and the end of a run: each fails in one line naming the file and where an intact
    record may be (the session before's, which Tune keeps), with the status of the command's
    other storage errors there, without Ray nor Tune's traceback."""
    # The records here stay damaged: no read again waits out a copy in progress.
    monkeypatch.setattr(results, "STATE_RETRY_S", 0.0)
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    monkeypatch.setattr(rt.launch, "check_cluster", lambda: pytest.fail("the cluster was asked"))
    file, folder = stored_tiny_experiment(tmp_path)
    write_tune_state(folder, "2024-01-01_00-00-00", cut=False)
    state = write_tune_state(folder, "2024-01-02_00-00-00", cut=True)
    argv = [str(file), "--storage", str(tmp_path / "runs")]
    for flag, status in [("--report", 1), ("--resume", 2)]:
        assert rt.main([*argv, flag]) == status, flag
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1, flag
        assert err.startswith(
            f"error: {state}, Tune's record of the experiment's trials, is damaged "
            "(JSONDecodeError: Unterminated string"
        ), flag
        assert err.endswith(
            "or move it out of the folder for Tune to read experiment_state-2024-01-01_00-00-00"
            ".json, the record of the session before, without the trials' progress since\n"
        ), flag
    run_without_ray(monkeypatch)
    new = tmp_path / "runs" / "new"

    def fit() -> SimpleNamespace:
        write_tune_state(new, "now", cut=True)
        return SimpleNamespace(errors=[])

    monkeypatch.setattr(run, "tuner", lambda *args: SimpleNamespace(fit=fit))
    assert rt.main([*argv, "--name", "new"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {new}/experiment_state-now.json, Tune's record"), err
    assert err.endswith("; Tune keeps no earlier record here\n") and len(err.splitlines()) == 1


def test_tunes_files_that_cannot_be_read_are_one_line_naming_them_not_called_damaged(
    tmp_path, capsys, monkeypatch
):
    """Tune's record of the trials that cannot be read (Permission denied) ended --report and
    --resume in pyarrow's traceback, and its saved state of the search that cannot be read
    was called damaged, to be restored from a backup: each is one line naming the file and
    why, with the status of the command's other storage errors."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    monkeypatch.setattr(rt.launch, "check_cluster", lambda: pytest.fail("the cluster was asked"))
    file, folder = stored_tiny_experiment(tmp_path)
    state = str(write_tune_state(folder, "2024-01-02_00-00-00", cut=False))
    unreadable = Unreadable(state, errno.EACCES)
    monkeypatch.setattr(results, "filesystem", lambda p: (unreadable, storage.absolute(p)))
    argv = [str(file), "--storage", str(tmp_path / "runs")]
    for flag, status in [("--report", 1), ("--resume", 2)]:
        assert rt.main([*argv, flag]) == status, flag
        assert capsys.readouterr() == ("", f"error: {state} cannot be read: Permission denied\n")
    saved = folder / "basic-variant-state-2024-01-02_00-00-00.json"
    saved.write_bytes(ray.cloudpickle.dumps({"name": "the search's state"}))
    unreadable.denied = str(saved)
    with pytest.raises(storage.StorageError) as refused:
        results.check_saved_search(str(folder))
    assert str(refused.value) == f"{saved} cannot be read: Permission denied"


def test_a_report_that_cannot_write_its_table_is_one_line_and_keeps_the_previous_one(
    tmp_path, capsys, monkeypatch
):
    """--report on a full disk: pyarrow's error named no file and came as a traceback; it is
    one line naming results.md and why, exit 1, and the previous results.md is left whole, as
    at the end of a run, which says the trials' reports are kept."""
    monkeypatch.setattr(runlock.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    run_without_ray(monkeypatch)
    monkeypatch.setattr(rt, "report", results.report)
    monkeypatch.setattr(run, "fit", lambda *args: (0, 0))
    file, folder = stored_tiny_experiment(tmp_path)
    (folder / "results.md").write_text("the previous table\n")
    analysis = SimpleNamespace(trials=[])
    monkeypatch.setattr(results, "RecordedExperiment", lambda path: analysis)

    def write_on_a_disk_full_at_results_md(path: str, payload: bytes) -> None:
        with monkeypatch.context() as disk:
            if path.endswith("/results.md"):
                disk.setattr(storage, "filesystem", lambda path: (FullDisk(), path))
            storage.write_bytes(path, payload)

    monkeypatch.setattr(results, "write_bytes", write_on_a_disk_full_at_results_md)
    argv = [str(file), "--storage", str(tmp_path / "runs")]
    assert rt.main([*argv, "--report"]) == 1
    said = f"error: {folder}/results.md could not be written: No space left on device"
    assert capsys.readouterr().err.startswith(said)
    assert (folder / "results.md").read_text() == "the previous table\n"
    assert sorted(p.name for p in folder.iterdir()) == [
        "experiment.yaml",
        "pareto.png",
        "results.md",
        "results.parquet",
    ]
    assert rt.main([*argv, "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(said) and err.endswith(
        "; the trials' reports are kept: --report writes the results from them\n"
    )
    assert err.count("\n") == 1 and (folder / "results.md").read_text() == "the previous table\n"


@pytest.mark.parametrize("other", ["--resume", "--dry-run"])
def test_report_with_resume_or_dry_run_is_refused_rather_than_one_of_them_ignored(
    tmp_path, capsys, monkeypatch, other
):
    """--report writes the results of the experiment as it stands and exits: given with
    --resume it left the interrupted trials unrun (status 0), with --dry-run it wrote nothing."""
    run_without_ray(monkeypatch)
    file, folder = stored_tiny_experiment(tmp_path)
    argv = [str(file), "--storage", str(tmp_path / "runs"), "--report", other]
    assert rt.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --report: not with {other}; ") and err.count("\n") == 1


def test_an_asha_grace_period_past_max_t_is_a_one_line_error_before_ray_starts(
    tmp_path, capsys, monkeypatch
):
    """Ray's ASHA refuses grace_period > max_t with an assertion, which came after the settings
    were stored, so neither a second start nor --resume could go on; it is refused first: past
    the longest trial's 60 steps (max_t 61), or past a search's max_t of 30. A grace period of
    60 or 61, which Ray takes, puts the first rung at or past the trials' last step, where ASHA
    stops no trial: refused too. Under FIFO, or with grace_period == max_t for trials whose
    epochs the search draws, ASHA's bounds do not matter or hold."""
    with pytest.raises(AssertionError):
        run.ASHAScheduler(time_attr="step", max_t=61, grace_period=100)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    experiment = tmp_path / "tiny.yaml"
    search = {"scheduler": "asha", "grace_period": 100}
    experiment.write_text(yaml.safe_dump({**TINY, "train": {"max_steps": 60}, "search": search}))
    argv = [str(experiment), "--storage", str(tmp_path / "runs")]
    for grace in (100, 61, 60):
        assert rt.main([*argv, f"search.grace_period={grace}"]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: search.grace_period: {grace} is not below the longest trial's "
            "train.max_steps, 60: ASHA's first rung would come at or after every trial's last "
            "step and stop none; give less than 60"
        ]
    assert not run.has_settings(str(tmp_path / "runs" / "tiny"))
    run.check_scheduler(spec.from_dict("tiny", {**TINY, "train": {"max_steps": 60}}), "asha")
    assert rt.main([*argv, "search.max_t=30", "search.grace_period=50"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: search.grace_period: 50 is past ASHA's max_t, 30 (search.max_t); it must be at "
        "most 30"
    ]
    fifo = spec.from_dict("tiny", {**TINY, "train": {"max_steps": 60}, "search": search})
    run.check_scheduler(fifo, "fifo")
    drawn = {"train.epochs": {"grid_search": [1, 2]}}
    fits = {"max_t": 30, "grace_period": 30, "space": drawn}
    fits = spec.from_dict("tiny", {**TINY, "search": fits})
    run.check_scheduler(fits, "asha")


def test_an_asha_max_t_below_the_longest_trial_is_a_one_line_error_before_ray_starts(
    tmp_path, capsys, monkeypatch
):
    """ASHA stops a trial at its first report past max_t: a max_t of 30 for trials of 60 steps
    cut every trial that reached step 30 short of its end, stopped early as a pruned one is, so
    the results ranked none as trained to its end; it is refused. A max_t of the trials' 60
    steps, past a variant's 40, or with trials whose epochs the search draws (no known length)
    is run."""
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    experiment = tmp_path / "tiny.yaml"
    search = {"scheduler": "asha", "grace_period": 10, "max_t": 30}
    experiment.write_text(yaml.safe_dump({**TINY, "train": {"max_steps": 60}, "search": search}))
    assert rt.main([str(experiment), "--storage", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: search.max_t: 30 is below the longest trial's train.max_steps, 60: ASHA would "
        "stop every trial that reaches step 30 short of its end, as it stops those it prunes; "
        "give at least 60, or leave it out, and set train.max_steps to shorten the trials"
    ]
    assert not run.has_settings(str(tmp_path / "runs" / "tiny"))
    steps = {"train": {"max_steps": 60}}
    whole = spec.from_dict("tiny", {**TINY, **steps, "search": search | {"max_t": 60}})
    run.check_scheduler(whole, "asha")
    shorter = {**search, "variants": [{"train.max_steps": 40}], "max_t": 50}
    run.check_scheduler(spec.from_dict("tiny", {**TINY, **steps, "search": shorter}), "asha")
    drawn = search | {"space": {"train.epochs": {"grid_search": [1, 2]}}}
    run.check_scheduler(spec.from_dict("tiny", {**TINY, "search": drawn}), "asha")
    run.check_scheduler(spec.from_dict("tiny", {**TINY, **steps, "search": search}), "fifo", True)


def test_asha_settings_under_a_fifo_scheduler_are_a_one_line_error_unless_chosen_so(
    tmp_path, capsys, monkeypatch
):
    """grace_period 20 written without scheduler asha ran every trial to its end under FIFO,
    without a word; it is refused, naming it. The command line may choose FIFO for a search
    written for ASHA (--scheduler fifo, search.scheduler=fifo), or ASHA for these settings,
    but not give an ASHA setting of its own beside FIFO."""
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    experiment = tmp_path / "tiny.yaml"
    search = {"grace_period": 20, "reduction_factor": 3}
    experiment.write_text(yaml.safe_dump({**TINY, "train": {"max_steps": 60}, "search": search}))
    argv = [str(experiment), "--storage", str(tmp_path / "runs"), "--dry-run"]
    assert rt.main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: search.grace_period: 20 applies to search.scheduler asha only, not fifo; set "
        "search.scheduler: asha (or --scheduler asha), or remove search.grace_period"
    ]
    assert rt.main([*argv, "search.grace_period=1"]) == 2
    assert "error: search.reduction_factor: 3 applies to" in capsys.readouterr().err
    for chosen in (["--scheduler", "asha"], ["--scheduler", "fifo"], ["search.scheduler=fifo"]):
        assert rt.main([*argv, *chosen]) == 0, chosen
        capsys.readouterr()
    # An ASHA setting given beside the command line's FIFO would stop no trial either.
    for chosen in (["--scheduler", "fifo"], ["search.scheduler=fifo"]):
        assert rt.main([*argv, *chosen, "search={reduction_factor: 4}"]) == 2, chosen
        assert capsys.readouterr().err.splitlines() == [
            "error: search.reduction_factor: 4 applies to search.scheduler asha only, not fifo; "
            "set search.scheduler: asha (or --scheduler asha), or remove search.reduction_factor"
        ]


def test_a_restart_without_a_limit_says_so_rather_than_of_minus_1(tmp_path, capsys):
    """scaling.max_failures -1 lets Tune restart a trial without limit (Trial.should_recover:
    max_failures < 0); its line counts the restarts and names no limit."""
    trial = SimpleNamespace(
        config={"variant": {"label": "Skip"}},
        error_file=None,
        path=str(tmp_path),
        num_failures=4,
        max_failures=-1,
        status="RUNNING",
    )
    run.TrialLines(1, spec.from_dict("x", TINY), str(tmp_path.parent)).on_trial_recover(
        0, [trial], trial
    )
    assert capsys.readouterr().out == "trial Skip: failed; restart 4 (no limit)\n"


def test_the_trials_are_read_from_tunes_record_without_a_second_read_of_each_result_file(
    tmp_path, monkeypatch
):
    """Tune's analysis of an experiment reads every trial's result file into a DataFrame
    (a second read of each, held for all of them, where `history` reads them for the report):
    the trials come from Tune's record alone, and no trial's result file is read for them."""
    trials = [SimpleNamespace(trial_id=f"ab_{i:05d}", config={}) for i in range(3)]
    analysis = sys.modules[ray.tune.ExperimentAnalysis.__module__]
    monkeypatch.setattr(analysis, "_find_newest_experiment_checkpoint", lambda **kw: "state.json")
    monkeypatch.setattr(ray.tune.ExperimentAnalysis, "_load_trials", lambda self: trials)
    fetched = []
    monkeypatch.setattr(
        ray.tune.ExperimentAnalysis, "_fetch_trial_dataframe", lambda self, t: fetched.append(t)
    )
    assert results.recorded_trials(str(tmp_path)) == trials
    assert fetched == []


def test_the_trials_are_read_without_tunes_warning_over_trials_that_never_reported(
    monkeypatch, caplog
):
    """Tune reads every trial's result file when it loads an experiment and warns 'Failed to
    fetch metrics' for each trial that never reported (three lines after every interrupt,
    --report and --resume), though raydeq reads those files itself: the warning is not shown,
    and Tune's logger is left at its level."""
    logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    trials = [SimpleNamespace(trial_id="ab_00000")]

    def analysis(path):
        logger.warning("Failed to fetch metrics for 1 trial(s)")
        logger.error("an error still shows")
        return SimpleNamespace(trials=trials)

    monkeypatch.setattr(results, "RecordedExperiment", analysis)
    level = logger.level
    with caplog.at_level(logging.WARNING):
        assert results.recorded_trials("somewhere") == trials
    assert [r.getMessage() for r in caplog.records] == ["an error still shows"]
    assert logger.level == level


def test_a_run_resumed_or_interrupted_shows_no_tune_warning_over_trials_that_never_reported(
    monkeypatch, caplog
):
    """Tune loads the experiment as it restores it (--resume) and as its run ends (Ctrl-C
    included), and warned 'Failed to fetch metrics' there, a line per trial that had not
    reported, after every interrupt and at every resume of one; neither warns now, an error
    still shows, and Tune's logger is left at its level."""
    logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    experiment = spec.load("digits")
    options = run.Options(gpus=0, num_samples=1, scheduler="fifo", max_concurrent=0)

    def fit():
        logger.warning("Failed to fetch metrics for 2 trial(s)")  # tune.run's, as it ends
        logger.error("an error still shows")
        return SimpleNamespace(errors=[])

    def tuner(*args):
        logger.warning("Failed to fetch metrics for 2 trial(s)")  # Tuner.restore's
        return SimpleNamespace(fit=fit)

    monkeypatch.setattr(run, "tuner", tuner)
    monkeypatch.setattr(run, "recorded_trials", lambda path: [])
    monkeypatch.setattr(run.tune.Tuner, "can_restore", lambda path: True)
    level = logger.level
    with caplog.at_level(logging.WARNING):
        for resume in (False, True):
            assert run.fit(experiment, "runs/digits", options, resume) == (0, 6)
    assert [r.getMessage() for r in caplog.records] == ["an error still shows"] * 2
    assert logger.level == level


def test_relative_paths_stay_where_the_experiment_was_started_from(tmp_path, monkeypatch):
    """A trial builds its config in a Ray worker, which Tune moves into the trial's folder, and
    --resume may run from another folder: relative data folders (the base's, a variant's) and
    storage are read from the folder the experiment was started in, not from theirs."""
    start, elsewhere = tmp_path / "start", tmp_path / "trial"
    start.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(start)
    data = {"dataset": "imagenet", "data_dir": "images", "stage_to": "staged", "batch_size": 8}
    raw = {**TINY, "data": data, "search": {"variants": [{"seed": 0}, {"data.data_dir": "other"}]}}
    experiment = spec.from_dict("tiny", raw, {"storage_path": "runs"})
    folder = str(tmp_path / "runs" / "tiny")
    run.save_settings(folder, experiment, run.Options(None, 1, "fifo", 0))
    monkeypatch.chdir(elsewhere)
    for read in (experiment, run.load_settings(folder)[0]):
        configs = [read.trial_config(sampled) for sampled in spec.expand(read)]
        assert [c.data.data_dir for c in configs] == [str(start / "images"), str(start / "other")]
        assert {(c.data.stage_to, c.storage_path) for c in configs} == {
            (str(start / "staged"), str(start / "runs"))
        }


def test_an_override_of_a_relative_folder_picks_out_the_variant_that_names_it(
    tmp_path, monkeypatch
):
    """The variants' folders are made absolute where the experiment is read, and an override
    `data.data_dir=a` naming one as written was compared with them as it was, refused as
    'no variant of search.variants has that value'; it now keeps that variant alone."""
    monkeypatch.chdir(tmp_path)
    data = {"dataset": "imagenet", "data_dir": "images", "batch_size": 8}
    rows = [{"data.data_dir": "a"}, {"data.data_dir": "b"}]
    raw = {**TINY, "data": data, "search": {"variants": rows}}
    experiment = spec.from_dict("tiny", raw, {"data.data_dir": "a"})
    configs = [experiment.trial_config(sampled) for sampled in spec.expand(experiment)]
    assert [c.data.data_dir for c in configs] == [str(tmp_path / "a")]


@pytest.mark.parametrize("primitive", ["grid_search", "choice"])
def test_a_relative_folder_drawn_from_the_space_is_refused_and_an_absolute_one_kept(
    tmp_path, monkeypatch, primitive
):
    """A folder drawn from search.space is no base's or variant's, which are made absolute
    where the experiment is read: a relative one was read by each trial from its own folder;
    it is now refused, naming the value and its absolute form, and an absolute one is kept."""
    monkeypatch.chdir(tmp_path)
    data = {"dataset": "imagenet", "data_dir": "images", "batch_size": 8}
    drawn = {primitive: [str(tmp_path / "a"), "b"]}
    raw = {**TINY, "data": data, "search": {"space": {"data": {"data_dir": drawn}}}}
    what = "grid value" if primitive == "grid_search" else "choice"
    message = f"search.space.data.data_dir: the {what} 'b' is a relative folder, which each"
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        spec.from_dict("tiny", raw)
    assert repr(str(tmp_path / "b")) in str(err.value)
    drawn[primitive] = [str(tmp_path / "a"), "s3://bucket/b"]
    experiment = spec.from_dict("tiny", raw)
    monkeypatch.chdir(tmp_path.parent)
    assert experiment.trial_config({"data": {"data_dir": drawn[primitive][0]}}).data.data_dir == (
        str(tmp_path / "a")
    )


def test_an_experiment_file_of_an_upper_case_suffix_is_read_as_a_yaml_file(tmp_path):
    """`Tiny.YAML` or `tiny.Yml` (as saved on systems that write suffixes in capitals) is a
    YAML file, which `python -m raydeq.train` reads too, not 'not a .yaml or .yml file'."""
    for name in ("Tiny.YAML", "tiny.Yml"):
        (tmp_path / name).write_text(yaml.safe_dump(TINY))
        experiment = spec.load(str(tmp_path / name))
        assert experiment.name == name.split(".")[0]
        assert experiment.trial_config({}).data.dataset == "digits"


def test_ctrl_c_while_the_results_are_written_exits_130_in_one_line_and_keeps_them_whole(
    tmp_path, capsys, monkeypatch
):
    """Ctrl-C while --report writes the results, or a resume of an ended experiment writes
    them again, ends in one line and status 130, not Python's traceback; the files written
    before are whole, none is left half-written beside them, and --report then writes them."""
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(yaml.safe_dump(TINY))
    folder = tmp_path / "runs" / "tiny"
    run.save_settings(str(folder), spec.from_dict("tiny", TINY), run.Options(None, 1, "fifo", 0))
    trial = SimpleNamespace(trial_id="ab_00000", status="TERMINATED", config={}, path="")
    trial.path = str(folder / "trial_0")
    Path(trial.path).mkdir()
    write_reports(Path(trial.path, archive.RESULT_FILE), [{"step": 30, "test_accuracy": 0.75}])
    monkeypatch.setattr(
        results, "RecordedExperiment", lambda given: SimpleNamespace(trials=[trial])
    )
    monkeypatch.setattr(run, "finished", lambda *args: True)
    drawn = results.plot

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)

    argv = [str(experiment), "--storage", str(tmp_path / "runs")]
    monkeypatch.setattr(results, "plot", interrupted)
    for flag in ("--report", "--resume"):
        assert rt.main([*argv, flag]) == 130, flag
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == (
            f"interrupted while writing the results of {folder}; each file is whole, old or "
            "new: --report writes them all again"
        ), flag
        assert pq.read_table(folder / "results.parquet").num_rows == 1
        assert not list(folder.glob("*.partial"))
    monkeypatch.setattr(results, "plot", drawn)
    assert rt.main([*argv, "--report"]) == 0
    assert (folder / "test_accuracy.png").read_bytes().startswith(b"\x89PNG")


def test_an_asha_run_refused_for_its_dashboard_is_not_stored_and_runs_again_with_fifo(
    tmp_path, capsys, monkeypatch
):
    """The ASHA check's error asks for --scheduler fifo: the experiment it refused is not
    stored, so the same command with --scheduler fifo starts it rather than finding it
    started with asha (and --resume refuses --scheduler)."""
    run_without_ray(monkeypatch)

    def down() -> None:
        raise ConfigError("scheduler asha: the Ray dashboard (state API) is not reachable")

    monkeypatch.setattr(run, "check_dashboard", down)
    monkeypatch.setattr(run, "fit", lambda *args: (0, 0))
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump(TINY))
    argv = [str(file), "--storage", str(tmp_path / "runs")]
    assert rt.main([*argv, "--scheduler", "asha"]) == 2
    assert capsys.readouterr().err.startswith("error: scheduler asha: the Ray dashboard")
    assert not run.has_settings(str(tmp_path / "runs" / "tiny"))
    assert rt.main([*argv, "--scheduler", "fifo"]) == 0
    assert run.load_settings(str(tmp_path / "runs" / "tiny"))[1].scheduler == "fifo"


def test_ctrl_c_in_the_checks_after_ray_starts_exits_130_in_one_line_with_nothing_stored(
    tmp_path, capsys, monkeypatch
):
    """The ASHA check waits up to 30 s for Ray's dashboard: Ctrl-C there ends in one line and
    status 130, not Python's traceback, and stores nothing, so the same command starts it."""
    run_without_ray(monkeypatch)

    def interrupted() -> None:
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(run, "check_dashboard", interrupted)
    monkeypatch.setattr(run, "fit", lambda *args: (0, 0))
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump(TINY))
    argv = [str(file), "--storage", str(tmp_path / "runs"), "--scheduler", "asha"]
    assert rt.main(argv) == 130
    assert capsys.readouterr().err == "\ninterrupted before the trials started\n"
    assert not run.has_settings(str(tmp_path / "runs" / "tiny"))
    monkeypatch.setattr(run, "check_dashboard", lambda: None)
    assert rt.main(argv) == 0


def test_ctrl_c_stops_the_command_where_the_process_had_a_handler_swallowing_it(
    tmp_path, capsys, monkeypatch
):
    """A SIGINT handler left in the process (Ray Train's, after a trainer ran in it, logs and
    returns) swallowed Ctrl-C in a command's main called there; the command's own Ctrl-C
    stops it, and the caller's handler is back on return."""
    run_without_ray(monkeypatch)
    swallowed = []
    monkeypatch.setattr(run, "check_dashboard", lambda: os.kill(os.getpid(), signal.SIGINT))
    monkeypatch.setattr(run, "fit", lambda *args: (0, 0))
    file = tmp_path / "tiny.yaml"
    file.write_text(yaml.safe_dump(TINY))
    argv = [str(file), "--storage", str(tmp_path / "runs"), "--scheduler", "asha"]

    def swallow(signum: int, frame: object) -> None:
        swallowed.append(signum)

    previous = signal.signal(signal.SIGINT, swallow)
    try:
        assert rt.main(argv) == 130
        assert signal.getsignal(signal.SIGINT) is swallow
    finally:
        signal.signal(signal.SIGINT, previous)
    assert swallowed == []
    assert capsys.readouterr().err == "\ninterrupted before the trials started\n"


def test_sigterm_while_the_results_are_written_exits_130_in_one_line_as_ctrl_c_does(
    tmp_path, capsys, monkeypatch
):
    """A batch scheduler's SIGTERM while --report writes the results ends it as Ctrl-C does,
    in one line and status 130, where its default killed it without a word (a rewrite it cut
    leaving its partial file beside the results)."""
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(yaml.safe_dump(TINY))
    folder = tmp_path / "runs" / "tiny"
    run.save_settings(str(folder), spec.from_dict("tiny", TINY), run.Options(None, 1, "fifo", 0))
    monkeypatch.setattr(results, "RecordedExperiment", lambda given: SimpleNamespace(trials=[]))

    def terminated(*args):
        os.kill(os.getpid(), signal.SIGTERM)

    def killed(signum: int, frame: object) -> None:
        pytest.fail("SIGTERM killed the report")

    monkeypatch.setattr(results, "plot", terminated)
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        assert rt.main([str(experiment), "--storage", str(tmp_path / "runs"), "--report"]) == 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err.splitlines()[-1].startswith("interrupted while writing")
    assert not list(folder.glob("*.partial"))


def test_the_tune_command_loads_no_matplotlib_until_it_draws(loaded):
    """`python -m raydeq.tune X --dry-run` and --help, and each trial's worker, pay for no
    import of matplotlib: it is imported at the first chart a report draws. (With raydeq.train
    imported too, the statement of the TensorBoard check, whose Python it shares.)"""
    statement = "import raydeq.train, raydeq.tune, raydeq.experiments.run"
    assert loaded(statement, ["matplotlib"]) == []


def test_the_command_called_from_python_leaves_the_callers_process_as_it_found_it(
    tmp_path, state_kept, capsys
):
    """rt.main called from a script, on a dry run or a bad experiment, puts back the script's
    SIGTERM handler, where it left SIGTERM raising KeyboardInterrupt in the script for good."""
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(yaml.safe_dump(TINY))
    with state_kept():
        assert rt.main([str(experiment), "--storage", str(tmp_path / "runs"), "--dry-run"]) == 0
    with state_kept():
        assert rt.main([str(tmp_path / "absent.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_relative_folders_drawn_from_the_space_are_refused_in_the_order_of_the_settings(
    tmp_path, monkeypatch
):
    """Of several relative folders a space draws, the refusal names the first setting of
    PATH_KEYS in every run, not whichever a set of the keys, hashed anew per process, gave."""
    monkeypatch.chdir(tmp_path)
    data = {"dataset": "imagenet", "data_dir": "images", "batch_size": 8}
    folders = {"data_dir": {"choice": ["a"]}, "stage_to": {"choice": ["s"]}}
    space = {"storage_path": {"choice": ["r"]}, "data": folders}
    raw = {**TINY, "data": data, "search": {"space": space}}
    with pytest.raises(ConfigError, match=r"^search\.space\.storage_path: each trial sets"):
        spec.from_dict("tiny", raw)
    del space["storage_path"]
    with pytest.raises(ConfigError, match=r"^search\.space\.data\.data_dir: the choice 'a' is"):
        spec.from_dict("tiny", raw)


@pytest.mark.parametrize("former", [1.0, 0.1])
def test_a_trial_begun_at_the_former_lambda_skip_resumes_and_is_reported_at_it(tmp_path, former):
    """digits' Skip Reg. DEQ trials take mnist_dense's lambda_skip, 1.0 until its default became
    0.1 and 0.1 until it became 0.2: a trial begun before, resumed after, was refused as one of
    other settings ('train.lambda_skip: 1.0 there, 0.1 here'), naming fixes a trial cannot take,
    and --report gave it the new default; its trial config is now at the former default its
    checkpoint was trained with."""
    experiment = spec.load("digits")
    skip_reg = [s for s in spec.expand(experiment) if "skip_reg" in str(s[spec.VARIANT])][0]
    folder = str(tmp_path / "trial")
    fresh = run.trial_config(experiment, skip_reg, folder)
    assert fresh.train.lambda_skip == PRESETS["mnist_dense"].lambda_skip == 0.2
    begun = fresh.to_dict() | {"train": fresh.to_dict()["train"] | {"lambda_skip": former}}
    settings = {"step": 22, "settings": trained_settings(validate(begun))}
    write_checkpoint(settings, tmp_path / "trial" / "checkpoint_000022")
    with pytest.raises(ConfigError, match=re.escape(f"lambda_skip: {former} there, 0.2 here")):
        check_settings(folder, settings["settings"], fresh)
    resumed = run.trial_config(experiment, skip_reg, folder)
    assert resumed.train.lambda_skip == former
    check_settings(folder, settings["settings"], resumed)
    given = spec.load("digits", ["train.lambda_skip=0.2"])
    assert run.trial_config(given, skip_reg, folder).train.lambda_skip == 0.2
    vanilla = [s for s in spec.expand(experiment) if "vanilla" in str(s[spec.VARIANT])][0]
    assert run.trial_config(experiment, vanilla, folder).train.lambda_skip == 0.2
