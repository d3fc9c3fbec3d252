"""The commands called from one long-lived Python process, as a notebook calls them."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from raydeq import train, tune
from raydeq.bench import __main__ as bench
from raydeq.training.launch import LOCAL_ENV_VARS

# A process that runs train.main, tune.main, train.main again, one interrupted and one that
# raises, each on a Ray of its own and trained by a stand-in for the fit (the commands' own Ray
# and state are what count here), and prints what each call left changed.
SCRIPT = textwrap.dedent(
    """
    import hashlib, json, logging, os, random, sys
    import numpy as np, ray, torch
    from raydeq import train, tune
    from raydeq.experiments import run
    from raydeq.training import launch

    class Result:
        metrics = {"test_accuracy": 0.5, "step": 1}

    def fit(cfg, scaling):
        if cfg.name in failures:
            raise failures[cfg.name]
        return Result()

    failures = {"stopped": KeyboardInterrupt(), "failed": RuntimeError("a bug")}
    launch.fit = fit
    run.fit = lambda *args: (0, 1)  # the trials interrupted: the command returns 130

    def state():
        streams = [
            torch.random.get_rng_state().numpy().tobytes(),
            repr(random.getstate()).encode(),
            repr(np.random.get_state()).encode(),
        ]
        made = logging.root.manager.loggerDict.items()
        return {
            "ray": ray.is_initialized(),
            "environ": dict(os.environ),
            "loggers": {
                name: [logger.level, len(logger.filters)]
                for name, logger in made
                if isinstance(logger, logging.Logger)
            },
            "random": [hashlib.sha1(s).hexdigest() for s in streams],
        }

    def changed(before, after):
        for key in ("environ", "loggers"):  # the names whose value changed, or that came or went
            names = before[key].keys() | (after[key].keys() if key == "environ" else set())
            after[key] = sorted(n for n in names if before[key].get(n) != after[key].get(n))
            before[key] = []
        return {k: after[k] for k in before if before[k] != after[k]}

    config, experiment, storage = sys.argv[1:]
    calls = {
        "train": lambda: train.main([config, "name=a"]),
        "tune": lambda: tune.main([experiment, "--storage", storage]),
        "train again": lambda: train.main([config, "name=b"]),
        "train interrupted": lambda: train.main([config, "name=stopped"]),
        "train that raised": lambda: train.main([config, "name=failed"]),
    }
    for name, call in calls.items():
        before = state()
        try:
            status = call()
        except RuntimeError as err:
            status = str(err)
        print(json.dumps({"call": name, "status": status, "changed": changed(before, state())}))
    # The caller's own Ray, which the command joins and keeps (no dashboard: 2 s less to start).
    ray.init(num_cpus=1, include_dashboard=False)
    address = ray.get_runtime_context().gcs_address
    status = train.main([config, "name=c"])
    kept = ray.is_initialized() and ray.get_runtime_context().gcs_address == address
    print(json.dumps({"call": "train on the caller's Ray", "status": status, "kept": kept}))
    """
)


@pytest.mark.ray
def test_the_commands_called_from_one_process_leave_it_as_they_found_it(tmp_path):
    """train.main and tune.main called from a notebook that had no Ray left the Ray each
    started running, ray.init's PYTHONBREAKPOINT (breakpoint() then opened Ray's remote
    debugger) and the commands' RAY_* and TUNE_* variables set, the `ray` logger at WARNING,
    one more log filter per call and the caller's torch and Python random draws moved; each
    call now leaves none of it, also one interrupted or one that raised, and a caller's own
    Ray is joined and kept."""
    config = tmp_path / "run.yaml"
    storage = tmp_path / "runs"
    settings = {
        "data": {"dataset": "digits"},
        "scaling": {"num_workers": 1},
        "storage_path": str(storage),
    }
    config.write_text(yaml.safe_dump(settings))
    experiment = tmp_path / "tiny.yaml"
    search = {"variants": [{"label": "a", "seed": 0}]}
    experiment.write_text(yaml.safe_dump({**settings, "search": search}))
    leave_out = ("RAY_ADDRESS", "RAY_AUTH_MODE", *LOCAL_ENV_VARS)
    env = {k: v for k, v in os.environ.items() if k not in leave_out}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(config), str(experiment), str(storage)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    calls = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert calls == [
        {"call": "train", "status": 0, "changed": {}},
        {"call": "tune", "status": 130, "changed": {}},
        {"call": "train again", "status": 0, "changed": {}},
        {"call": "train interrupted", "status": 130, "changed": {}},
        {"call": "train that raised", "status": "a bug", "changed": {}},
        {"call": "train on the caller's Ray", "status": 0, "kept": True},
    ]


def test_a_bad_argument_or_help_returns_the_status_where_it_raised_system_exit(capsys):
    """train.main and tune.main return the exit status (2 for bad input) to a Python caller,
    but a flag argparse refuses, a missing argument or --help raised SystemExit, which ends a
    notebook cell or a script that reads the status; each now returns 2 or 0, after argparse's
    usage line on stderr (or the help on stdout)."""
    assert train.main(["tune_configs/digits.yaml", "--epochs", "3"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m raydeq.train: error: unrecognized arguments: --epochs 3"
    )
    assert tune.main([]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m raydeq.tune: error: the following arguments are required: EXPERIMENT"
    )
    assert tune.main(["digits", "--num-samples", "many"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m raydeq.tune: error: argument --num-samples: invalid int value: 'many'"
    )
    assert train.main(["--help"]) == 0 and tune.main(["--help"]) == 0
    assert capsys.readouterr().out.count("usage: python -m raydeq.") == 2


@pytest.mark.parametrize("command", ["train", "tune", "bench"])
def test_each_commands_help_fits_80_columns_naming_it_and_each_options_default(
    command, capsys, monkeypatch
):
    """`--help` in an 80-column terminal: bench's usage line for --weights ran to 81 columns,
    and its --device, --models, --only and --seed left out their defaults (cpu, mnist_dense
    cifar10_small, every suite, 0), as tune's flags said only "default: YAML"; every line now
    fits, the usage names the command as typed, and each option taking a value names its
    default."""
    monkeypatch.setenv("COLUMNS", "80")
    main = {"train": train.main, "tune": tune.main, "bench": bench.main}[command]
    with contextlib.suppress(SystemExit):
        assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m raydeq.{command} [-h] ")
    assert max(len(line) for line in text.splitlines()) <= 80
    parsers = {"tune": tune._parser, "bench": bench._parser}
    actions = parsers[command]()._actions if command in parsers else []
    for action in actions:
        if action.option_strings and action.nargs != 0:
            assert "(default: " in action.help, action.option_strings


def test_the_experiments_figures_leave_the_callers_matplotlib_backend(tmp_path):
    """Writing an experiment's figures (tune's results, --report) chose matplotlib's Agg
    backend for the whole process: a notebook's inline figures stopped showing after a run.
    The figures are now drawn without pyplot, on a figure of their own, and are PNG images of
    the size asked (4 x 3 inches at 120 dpi: 480 x 360 pixels)."""
    script = textwrap.dedent(
        """
        import json, struct, matplotlib
        matplotlib.use("svg")  # a backend of the caller's, as a notebook's inline one
        from matplotlib import pyplot as plt
        from raydeq.experiments.figures import png, subplots
        own = plt.figure()
        figure, axes = subplots(figsize=(4.0, 3.0))
        axes.plot([0, 1], [0, 1])
        image = png(figure)
        size = struct.unpack(">II", image[16:24])
        kept = plt.get_fignums() == [own.number]
        print(json.dumps([matplotlib.get_backend(), image[:8].hex(), size, kept]))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == ["svg", "89504e470d0a1a0a", [480, 360], True]
