"""The training config: defaults, deterministic run names, one-line errors, overrides, files."""

import functools
import math
import re
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raydeq.training import config
from raydeq.training.config import ConfigError, load, validate


def error_of(raw: dict) -> str:
    """The message of the ConfigError that validating `raw` raises."""
    with pytest.raises(ConfigError) as info:
        validate(raw)
    return str(info.value)


def test_defaults_are_a_dense_skip_reg_deq_on_digits():
    cfg = validate({})
    assert (cfg.data.dataset, cfg.model.model, cfg.model.variant) == (
        "digits",
        "mnist_dense",
        "skip_reg",
    )
    # Options left unset show the preset's and the layer's defaults (models.resolve).
    assert cfg.model_options() == {
        "model": "mnist_dense",
        "variant": "skip_reg",
        "solver": "vcab3",
        "adjoint": "gmres",
        "abstol": 5e-3,
        "reltol": 5e-3,
        "max_steps": 50,
        "jac_reg": False,
        "pretrain_steps": 0,
        "adjoint_options": {"rtol": 5e-3, "max_iters": 15},
        "compile": False,
    }
    assert cfg.storage_path.startswith("/")
    assert cfg.run_dir == f"{cfg.storage_path}/{cfg.name}"


def test_default_name_is_deterministic_and_follows_the_training_settings():
    first, again = validate({}), validate({})
    assert first.name == again.name
    assert first.name.startswith("digits-mnist_dense-skip_reg-")
    other = validate({"optim": {"lr": 3e-4}})
    assert other.name != first.name
    moved = validate({"storage_path": "/tmp/elsewhere", "scaling": {"num_workers": 1}})
    assert moved.name == first.name
    assert validate({"name": "my-run"}).name == "my-run"


def test_the_default_runs_name_stays_what_it_was_so_that_its_runs_resume():
    """A run resumes from the folder its name gives: settings added later and left unset
    (model.solver_options, model.dynamics) must not change the digest of older runs' names.
    A changed default does, as the run it names trains otherwise: mnist_dense's lambda_skip,
    1.0 until it became 0.1 and 0.1 until it became 0.2, names the older default runs where it
    is given."""
    assert validate({}).name == "digits-mnist_dense-skip_reg-69135dd3"
    older = validate({"train": {"lambda_skip": 1.0}}).name
    assert older == "digits-mnist_dense-skip_reg-e12ecada"
    assert validate({"train": {"lambda_skip": 0.1}}).name == "digits-mnist_dense-skip_reg-c37f775d"
    assert validate({"model": {"solver_options": {"kind": "i"}}}).name != validate({}).name
    preset = {"rtol": 5e-3, "max_iters": 15}  # mnist_dense's GMRES limits, written out
    assert validate({"model": {"adjoint_options": preset}}).name == validate({}).name
    assert validate({"model": {"adjoint_options": {"rtol": 1e-2}}}).name != validate({}).name


def test_adjoint_options_given_in_part_are_completed_by_the_presets_and_built():
    """model.adjoint_options.rtol=1e-2 keeps the preset's max_iters (15 for mnist_dense): the
    config shows both and the layer's GMRES runs with both; jfb takes no such option."""
    from raydeq import models

    cfg = validate(
        config.apply_overrides({}, config.parse_overrides(["model.adjoint_options.rtol=1e-2"]))
    )
    assert cfg.model.adjoint_options == {"rtol": 0.01, "max_iters": 15}
    layer = models.build(cfg.model_options()).layer
    assert layer.adjoint_options == {"rtol": 0.01, "max_iters": 15}
    assert validate({}).model.adjoint_options == {"rtol": 5e-3, "max_iters": 15}
    with pytest.raises(ConfigError, match=r"^model.adjoint='jfb' takes no option 'rtol'"):
        validate({"model": {"adjoint": "jfb", "adjoint_options": {"rtol": 0.1}}})
    with pytest.raises(ConfigError, match=r"^model.adjoint_options.max_iters=0 must be"):
        validate({"model": {"adjoint_options": {"max_iters": 0}}})


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "+1e-3", "1.e-3", ".1e-2", "1.0e-3"])
def test_a_number_in_exponent_form_is_a_number_inside_a_mapping_setting_too(tmp_path, text):
    """PyYAML reads 1e-3 as a string (YAML 1.1 wants a dot): a typed key converted it, but
    model.solver_options holds any value, and Euler's h0 refused '1e-3'. An override and a
    config file read it as 0.001."""
    override = config.parse_overrides([f"model.solver_options.h0={text}"])
    cfg = validate(config.apply_overrides({"model": {"solver": "euler"}}, override))
    assert cfg.model.solver_options == {"h0": 0.001}
    file = tmp_path / "run.yaml"
    file.write_text(f"model: {{solver: euler, solver_options: {{h0: {text}}}}}\n")
    assert load(str(file)).model.solver_options == {"h0": 0.001}
    assert config.load_yaml("[1e3, e3, 1e, 1e-3x, 007]") == [1000.0, "e3", "1e", "1e-3x", 7]


def test_yaml_11_octal_and_base_60_numbers_are_read_as_written(tmp_path):
    """PyYAML reads `seed: 010` as 8 (YAML 1.1's octal) and `1:30` as 90 (base 60), so such a
    seed or batch size trained another run than written; 010 is now ten, as in YAML 1.2, and
    1:30 text."""
    assert config.load_yaml("[010, -07, +0_10, 1:30, 1:30.5, 0x10, 0b11, 1_000, 0, 1.5]") == [
        *(10, -7, 10, "1:30", "1:30.5", 16, 3, 1000, 0, 1.5)
    ]
    path = tmp_path / "run.yaml"
    path.write_text("seed: 010\ndata: {batch_size: 064}\n")
    cfg = load(path)
    assert (cfg.seed, cfg.data.batch_size) == (10, 64)
    path.write_text("seed: 1:30\n")
    in_path = re.escape(f" (in {path})")
    with pytest.raises(ConfigError, match=rf"^seed: expected an integer, got '1:30'{in_path}$"):
        load(path)


def test_validate_accepts_its_own_output():
    search = {"num_samples": 2, "variants": [{"label": "a", "seed": 1}]}
    cfg = validate({"data": {"dataset": "fake", "fake_shape": [3, 8, 8]}, "search": search})
    assert validate(cfg.to_dict()) == cfg
    assert cfg.data.fake_shape == (3, 8, 8)
    assert cfg.search.variants == ({"label": "a", "seed": 1},) and cfg.search.num_samples == 2


@pytest.mark.parametrize(
    "setting",
    [
        {"train": {"report_every": 50}},
        {"train": {"checkpoint_every": 7}},
        {"train": {"keep_checkpoints": 9}},
        {"train": {"eval_batches": 3}},
        {"data": {"loader_workers": 4}},
        {"data": {"pin_memory": True}},
        {"data": {"eval_batch_size": 64}},  # the way out of an evaluation out of memory
        {"train": {"max_nonfinite_steps": 20}},  # the way on after a run stopped by them
        {"storage_path": "/tmp/elsewhere"},
        {"label": "a trial"},
        {"scaling": {"num_workers": 1, "max_failures": 0}},
        {"model": {"compile": True}},  # the same solves, compiled
        {"search": {"num_samples": 4}},
    ],
)
def test_settings_that_do_not_change_the_trained_model_keep_the_run_name(setting):
    assert validate(setting).name == validate({}).name  # so that changing them resumes the run


@pytest.mark.parametrize(
    "setting",
    [
        {"train": {"epochs": 3}},
        {"train": {"lambda_skip": 0.5}},
        {"data": {"batch_size": 16}},
        {"data": {"augment": False}},
        {"model": {"abstol": 1e-4}},
        {"train": {"amp": "bf16"}},
        {"seed": 3},
        {"train": {"max_steps": 100}},  # the cosine schedule's length
        {"optim": {"grad_clip": 1.0}},
        {"optim": {"schedule": "constant"}},
        {"optim": {"optimizer": "sgd"}},
        {"model": {"solver": "tsit5"}},
    ],
)
def test_settings_that_change_the_trained_model_name_a_new_run(setting):
    assert validate(setting).name != validate({}).name


@pytest.mark.parametrize("variant", ["vanilla", "neural_ode"])
def test_a_lambda_skip_given_for_a_run_without_a_skip_loss_is_refused(variant):
    """A lambda_skip that a command or a search variant gave a vanilla DEQ or a Neural ODE
    trained it as if unset, unsaid; one that a config file carries for its skip variants (the
    paper experiments' 0.01) stays silent."""
    cfg = validate({"model": {"variant": variant}, "train": {"lambda_skip": 0.01}})
    assert cfg.train.lambda_skip == 0.01
    config.check_given({"model.variant": variant}, cfg)
    with pytest.raises(ConfigError) as err:
        config.check_given({"train.lambda_skip": 0.5}, cfg)
    assert str(err.value) == (
        f"train.lambda_skip: 0.5 weighs the skip loss, which variant {variant!r} does not "
        "have; set model.variant to skip or skip_reg, or remove train.lambda_skip"
    )
    assert err.value.key == "train.lambda_skip"
    skip = validate({"model": {"variant": "skip"}, "train": {"lambda_skip": 0.5}})
    config.check_given({"train.lambda_skip": 0.5}, skip)


def test_a_zero_lambda_skip_given_for_a_vanilla_run_is_refused():
    """A lambda_skip of 0 given a vanilla DEQ is refused as any other weight is: it sets a
    loss the variant does not train, however small."""
    cfg = validate({"model": {"variant": "vanilla"}})
    with pytest.raises(ConfigError) as err:
        config.check_given({"train.lambda_skip": 0.0}, cfg)
    assert err.value.key == "train.lambda_skip"
    assert str(err.value).startswith("train.lambda_skip: 0 weighs the skip loss")


@pytest.mark.parametrize("dataset", ["digits", "svhn", "fake"])
def test_augment_given_for_a_dataset_without_augmentation_is_refused(dataset, tmp_path):
    """data.augment=true given for the digits, SVHN or fake images trained without
    augmentation, unsaid; the default true, and false, stay silent, as does true for MNIST."""
    folder = {"data_dir": str(tmp_path)} if dataset == "svhn" else {}
    cfg = validate({"data": {"dataset": dataset, "augment": True, **folder}})
    config.check_given({"data.augment": False}, cfg)
    with pytest.raises(ConfigError) as err:
        config.check_given({"data.augment": True}, cfg)
    assert str(err.value) == (
        "data.augment: true applies to data.dataset=mnist10k, mnist, cifar10 or imagenet only, "
        f"not {dataset!r}, which has no augmentation; remove data.augment"
    )
    assert err.value.key == "data.augment"
    config.check_given({"data.augment": True}, validate({"data": {"dataset": "mnist10k"}}))


def test_pin_memory_given_for_a_cpu_device_is_refused():
    """data.pin_memory=true given beside scaling.device=cpu pinned nothing (batches are pinned
    for a CUDA device alone), unsaid; a file's true (the CIFAR experiments') stays silent, and
    so does one given under device auto, which may train on a GPU."""
    cpu = validate({"data": {"pin_memory": True}, "scaling": {"device": "cpu"}})
    config.check_given({"scaling.device": "cpu"}, cpu)
    with pytest.raises(ConfigError) as err:
        config.check_given({"data.pin_memory": True}, cpu)
    assert str(err.value) == (
        "data.pin_memory: true pins batches for a GPU, which scaling.device=cpu trains on none "
        "of; set scaling.device to cuda or auto, or remove data.pin_memory"
    )
    assert err.value.key == "data.pin_memory"
    config.check_given({"data.pin_memory": True}, validate({"data": {"pin_memory": True}}))


def test_lambda_skip_defaults_to_the_presets_and_amp_reads_yaml_off():
    from raydeq.models import PRESETS

    assert validate({}).train.lambda_skip == PRESETS["mnist_dense"].lambda_skip
    assert validate({"model": {"model": "mnist_mdeq"}}).train.lambda_skip == 0.01
    assert validate({"train": {"lambda_skip": 0.25}}).train.lambda_skip == 0.25
    assert validate(yaml.safe_load("train: {amp: off}")).train.amp == "off"
    assert validate({"train": {"amp": "fp16"}}).train.amp == "fp16"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"modle": {}}, "modle: unknown key; allowed keys in config: name, storage_path"),
        ({"optim": {"lrr": 1}}, "optim.lrr: unknown key; allowed keys in optim: optimizer, lr,"),
        (
            {"model": {"solver": "rk4"}},
            "model.solver: 'rk4' is not allowed; choose one of vcab3, tsit5, bs3, euler, broyden, "
            "anderson, fixed_point",
        ),
        ({"model": {"model": "resnet"}}, "model.model: 'resnet' is not allowed; choose one"),
        ({"model": {"adjoint": "x"}}, "model.adjoint: 'x' is not allowed; choose one of gmres,"),
        ({"model": {"variant": "deep"}}, "model.variant: 'deep' is not allowed; choose one of van"),
        ({"data": {"dataset": "coco"}}, "data.dataset: 'coco' is not allowed; choose one"),
        ({"optim": {"optimizer": "lbfgs"}}, "optim.optimizer: 'lbfgs' is not allowed; choose one"),
        ({"model": {"abstol": -1e-3}}, "model.abstol: must be >= 0, got -0.001"),
        (
            {"model": {"abstol": 0, "reltol": 0}},
            "model: abstol and reltol cannot both be 0: the solve could never stop",
        ),
        ({"optim": {"lr": 0}}, "optim.lr: must be > 0, got 0.0"),
        ({"train": {"keep_checkpoints": 0}}, "train.keep_checkpoints: must be >= 1, got 0"),
        ({"train": {"lambda_skip": -1}}, "train.lambda_skip: must be >= 0, got -1.0"),
        ({"scaling": {"num_workers": 0}}, "scaling.num_workers: must be >= 1, got 0"),
        ({"optim": {"momentum": 1.5}}, "optim.momentum: must be <= 1, got 1.5"),
        ({"optim": {"gamma": 2}}, "optim.gamma: must be <= 1, got 2.0"),  # a decay
        ({"data": {"batch_size": "big"}}, "data.batch_size: expected an integer, got 'big'"),
        ({"data": {"batch_size": 3.5}}, "data.batch_size: expected an integer, got 3.5"),
        ({"train": {"amp": "yes"}}, "train.amp: 'yes' is not allowed; choose one of off, bf16,"),
        ({"train": {"amp": True}}, "train.amp: expected off, bf16 or fp16, got True"),
        (
            {"model": {"compile": "graphs"}},
            "model.compile: 'graphs' is not allowed; choose one of graph (or true or false)",
        ),
        ({"model": {"compile": 1}}, "model.compile: expected true, false or graph, got 1"),
        ({"model": {"adjoint": 5}}, "model.adjoint: expected gmres, fixed_point, jfb, "),
        ({"search": {"scheduler": "pbt"}}, "search.scheduler: 'pbt' is not allowed; choose one"),
        ({"search": {"num_samples": 0}}, "search.num_samples: must be >= 1, got 0"),
        ({"search": {"sample": 2}}, "search.sample: unknown key; allowed keys in search: var"),
        ({"search": {"variants": [1]}}, "search.variants: expected a list of mappings, got [1]"),
        ({"search": {"variants": [{}]}}, "search.variants[0]: expected a mapping of dotted keys"),
        ({"search": {"variants": [{"label": 3}]}}, "search.variants[0].label: expected a string"),
        ({"data": {"dataset": "mnist10k", "data_dir": "x"}}, "data.data_dir: dataset 'mnist10k'"),
        ({"optim": {"lr": "fast"}}, "optim.lr: expected a number, got 'fast'"),
        ({"optim": {"lr": math.inf}}, "optim.lr: expected a finite number, got inf"),
        ({"optim": {"lr": 2**1030}}, "optim.lr: expected a finite number, got 1"),  # overflows
        ({"model": [1, 2]}, "model: expected a mapping of keys to values, got [1, 2]"),
        ({"data": {"dataset": "mnist"}}, "data.data_dir: required for dataset 'mnist'"),
        ({"data": {"dataset": "cifar10"}}, "data.data_dir: required for dataset 'cifar10'"),
        ({"data": {"dataset": "svhn"}}, "data.data_dir: required for dataset 'svhn'"),
        ({"data": {"dataset": "imagenet"}}, "data.data_dir: required for dataset 'imagenet'"),
        ({"train": {"epochs": True}}, "train.epochs: expected an integer, got True"),
        ({"seed": False}, "seed: expected an integer, got False"),
        ({"optim": {"gamma": 0}}, "optim.gamma: must be > 0, got 0.0"),  # no rate after a decay
        ({"scaling": {"cpus_per_worker": 0}}, "scaling.cpus_per_worker: must be > 0, got 0.0"),
        ({"search": {"grace_period": 0}}, "search.grace_period: must be >= 1, got 0"),
        ({"search": {"reduction_factor": 1}}, "search.reduction_factor: must be >= 2, got 1"),
        ({"seed": -1}, "seed: must be >= 0, got -1"),
        ({"data": {"eval_batch_size": 0}}, "data.eval_batch_size: must be >= 1, got 0"),
        ({"name": ".."}, "name: '..' is not a folder name"),
        ({"name": "."}, "name: '.' is not a folder name"),
        ({"name": "-x"}, "name: '-x' is not a folder name"),
        (
            {"name": "_run"},  # of the listed characters, but one that may not come first
            "name: '_run' is not a folder name; use letters, digits, '.', '_' and '-', starting "
            "with a letter or a digit",
        ),
        (
            {"data": {"download": True}},
            "data.download: only mnist, cifar10, svhn can be downloaded, not dataset 'digits'; "
            "set data.download=false",
        ),
        (
            {"train": {"lambda_jac": 0.1}},
            "train.lambda_jac: needs model.jac_reg=true to have a Jacobian term, got 0.1 "
            "without it; set model.jac_reg=true or train.lambda_jac=0",
        ),
        ({"data": {"batch_size": 33}}, "data.batch_size: 33 does not split evenly over scaling"),
        ({"model": {"variant": "neural_ode", "jac_reg": True}}, "model.jac_reg: not an option"),
        (
            {"model": {"variant": "neural_ode", "adjoint": "gmres"}},
            "model.adjoint='gmres' is not one of 'continuous', 'backprop' for variant",
        ),
        (
            {"model": {"variant": "vanilla", "adjoint": "continuous"}},
            "model.adjoint='continuous' is not one of 'gmres', 'fixed_point', 'jfb', 'unrolled'",
        ),
        ({"model": {"t1": 2.0}}, "model.t1: not an option of variant 'skip_reg'"),
        ({"name": "a/b"}, "name: 'a/b' is not a folder name"),
        ({"data": {"fake_shape": [1, 8]}}, "data.fake_shape: expected [channels, height, width]"),
        ({"data": {"fake_shape": [1, 0, 8]}}, "data.fake_shape: expected a list of positive"),
        (
            {"optim": {"schedule": "step", "milestones": 5}},
            "optim.milestones: expected a list of positive integers, got 5",
        ),
        (
            # A list is shown cut short past 6 items, so the bad one is named.
            {"search": {"variants": [{"seed": i} for i in range(8)] + [None]}},
            "search.variants: expected a list of mappings, got [{'seed': 0}, {'seed': 1}, "
            "{'seed': 2}, {'seed': 3}, {'seed': 4}, {'seed': 5}, ...]: search.variants[8] is "
            "None, not a mapping",
        ),
        (
            {"optim": {"milestones": [10, 20, 30, 40, 50, 60, 70, -80]}},
            "optim.milestones: expected a list of positive integers, got [10, 20, 30, 40, 50, 60, "
            "...]: optim.milestones[7] is -80, not a positive integer",
        ),
        ({"seed": 2**64}, "seed: must be <= 4294967295, got 18446744073709551616"),
        ({"search": {"population_size": 1}}, "search.population_size: must be 0 (Optuna's"),
        (
            {"search": {"searcher": "tpe", "population_size": 10}},
            "search.population_size: 10 applies to search.searcher='nsga2' only, not 'tpe'; set",
        ),
        ({"optim": {"milestones": [10, 10]}}, "optim.milestones: expected increasing steps, got"),
        (
            {"optim": {"optimizer": "sgd", "nesterov": True, "momentum": 0}},
            "optim.nesterov: needs optim.momentum > 0",
        ),
        (
            {"optim": {"optimizer": "adamw", "nesterov": True}},
            "optim.nesterov: applies to optimizer 'sgd' only, not 'adamw'; set",
        ),
    ],
)
def test_bad_values_give_one_line_naming_the_key_and_what_is_allowed(raw, expected):
    message = error_of(raw)
    assert message.startswith(expected)
    assert "\n" not in message


def test_values_on_a_bound_are_allowed():
    """Bounds are inclusive where the schema says so: the largest seed, one kept checkpoint,
    SGD at momentum 1, no restarts (-1: unlimited), a cosine schedule that ends at its own rate, and
    variants of one label that differ in their seed alone (the seeds of one configuration)."""
    cfg = validate(
        {
            "seed": 2**32 - 1,
            "train": {"keep_checkpoints": 1, "max_steps": 0},
            "optim": {"optimizer": "sgd", "momentum": 1, "lr": 0.01, "eta_min": 0.01},
            "scaling": {"max_failures": -1},
            "search": {"variants": [{"label": "a", "seed": 1}, {"label": "a", "seed": 2}]},
        }
    )
    assert (cfg.seed, cfg.train.keep_checkpoints, cfg.optim.momentum) == (2**32 - 1, 1, 1.0)
    assert (cfg.optim.eta_min, cfg.scaling.max_failures, len(cfg.search.variants)) == (0.01, -1, 2)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"fake_samples": 64},
            "data.fake_samples: 64 applies to data.dataset=fake only, not 'digits'; set "
            "data.dataset=fake, or remove data.fake_samples",
        ),
        (
            {"dataset": "mnist10k", "fake_shape": [3, 8, 8]},
            "data.fake_shape: [3, 8, 8] applies to data.dataset=fake only, not 'mnist10k'; set "
            "data.dataset=fake, or remove data.fake_shape",
        ),
        (
            {"dataset": "mnist", "data_dir": "d", "fake_classes": 4},
            "data.fake_classes: 4 applies to data.dataset=fake only, not 'mnist'; set "
            "data.dataset=fake, or remove data.fake_classes",
        ),
        (
            {"dataset": "cifar10", "data_dir": "d", "image_size": 32},
            "data.image_size: 32 applies to data.dataset=imagenet only, not 'cifar10'; set "
            "data.dataset=imagenet, or remove data.image_size",
        ),
        (
            {"dataset": "fake", "data_dir": "d"},
            "data.data_dir: 'd' applies to data.dataset=mnist, cifar10, svhn or imagenet only, "
            "not 'fake'; set data.dataset=mnist, cifar10, svhn or imagenet, or remove "
            "data.data_dir",
        ),
    ],
)
def test_a_data_setting_where_it_has_no_effect_is_refused(data, expected):
    """A FakeData setting outside `fake`, an image size outside ImageNet (the one dataset it
    resizes) and a folder for `fake` (which reads none) would be ignored without a word."""
    assert error_of({"data": data}) == expected


def test_data_settings_load_at_their_defaults_and_where_they_apply():
    """Defaults stay silent (a stored config writes every key), and each setting is taken by
    the datasets it applies to."""
    stored = validate({}).to_dict()
    assert validate(stored).data == validate({}).data
    assert validate({"data": {"image_size": 224, "fake_samples": 256}}).data.dataset == "digits"
    fake = {"dataset": "fake", "fake_samples": 64, "fake_shape": [3, 8, 8], "fake_classes": 4}
    assert validate({"data": fake}).data.fake_shape == (3, 8, 8)
    images = {"dataset": "imagenet", "data_dir": "d", "image_size": 64}
    assert validate({"data": images}).data.image_size == 64


def test_abstol_0_with_a_relative_tolerance_is_a_pure_relative_test_as_the_layers_take_it():
    """model.abstol had to be > 0 where DEQ and NeuralODE take 0 with reltol > 0 (the test
    ||f(z) - z|| <= reltol ||z||, the reference code's rel_norm); the config now builds it."""
    from raydeq import models

    for variant in ("skip_reg", "neural_ode"):
        cfg = validate({"model": {"variant": variant, "abstol": 0, "reltol": 1e-2}})
        model = models.build(cfg.model_options())
        assert (model.layer.termination.abstol, model.layer.termination.reltol) == (0, 1e-2)


def test_an_empty_section_or_file_takes_the_defaults(tmp_path):
    """YAML reads a section with nothing under it (`model:`) and an empty file as null."""
    sections = ["model", "data", "optim", "train", "scaling", "search"]
    assert validate(dict.fromkeys(sections)) == validate({})
    path = tmp_path / "empty.yaml"
    path.write_text("# every setting at its default\n")
    assert load(path) == validate({})


def test_variants_without_a_label_may_set_different_values():
    """Only rows of one label must differ in their seed alone; unlabelled rows are trials of
    their own."""
    rows = [{"optim.lr": 0.1}, {"optim.lr": 0.2, "seed": 1}, {"label": "", "train.epochs": 2}]
    assert validate({"search": {"variants": rows}}).search.variants == tuple(rows)


def test_trials_at_once_are_unlimited_and_searches_maximise_by_default():
    """0 trials at once means as many as the cluster holds (README, Ray Tune experiments)."""
    search = validate({}).search
    assert (search.max_concurrent_trials, search.workers_per_trial) == (0, 0)
    assert (search.metric, search.mode, search.num_samples) == ("test_accuracy", "max", 1)
    assert (search.scheduler, search.searcher, search.cost) == ("fifo", "random", None)


@pytest.mark.parametrize(
    ("metric", "mode"),
    [
        ("test_accuracy", "max"),
        ("test_top5_accuracy", "max"),
        ("train_accuracy", "max"),
        ("images_per_second", "max"),
        ("train_loss", "min"),
        ("step_time", "min"),
        ("test_nfe", "min"),
        ("backward_time", "min"),
    ],
)
def test_a_search_s_mode_defaults_to_its_metric_s_direction(metric, mode):
    """A search of train_loss or a time with no mode minimises it (it maximised it: the worst
    trials ranked first); an accuracy or a throughput is maximised, and a mode given stays."""
    assert validate({"search": {"metric": metric}}).search.mode == mode
    other = "max" if mode == "min" else "min"
    assert validate({"search": {"metric": metric, "mode": other}}).search.mode == other


def test_a_search_may_optimise_its_costs_alone():
    """A search may minimise test NFE or a time per batch as its one metric."""
    measures = ["test_top5_accuracy", "test_nfe", "nfe", "forward_time", "predict_time"]
    for metric in measures:
        mode = "max" if "accuracy" in metric else "min"
        assert validate({"search": {"metric": metric, "mode": mode}}).search.metric == metric


def test_an_overrides_key_ends_at_the_first_equals_sign():
    """Only the first `=` separates the key (spaces around it go): the rest, `=` included, is
    the value, read as YAML where it is YAML and kept as written where it is not."""
    assert config.parse_override("label=lr=3e-4") == ("label", "lr=3e-4")
    assert config.parse_override(" model.jac_reg = true") == ("model.jac_reg", True)
    assert config.parse_override("label=[unclosed") == ("label", "[unclosed")


def test_numbers_written_as_yaml_strings_are_read_as_numbers():
    cfg = validate({"optim": {"lr": "1e-3"}, "model": {"abstol": "5e-3"}})
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.abstol == pytest.approx(5e-3)


def test_overrides_set_dotted_keys_read_as_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0.01}, "search": {"space": {"seed": 1}}}))
    cfg = load(path, ["optim.lr=3e-4", "model.jac_reg=true", "train.lambda_jac=0.5", "name=x1"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.jac_reg is True
    assert cfg.train.lambda_jac == 0.5
    assert cfg.name == "x1"
    assert cfg.search.space == {"seed": 1}
    assert load(path, {"data.batch_size": 8}).data.batch_size == 8
    assert load(path, ["model.compile=graph"]).model_options()["compile"] == "graph"
    assert load(path, ["model.compile=true"]).model_options()["compile"] is True


@pytest.mark.parametrize("device", ["cpu", "auto", "cuda"])
@pytest.mark.parametrize(
    ("model", "key", "value"),
    [
        ({"compile": "graph"}, "model.compile", "'graph'"),
        ({"adjoint_options": {"graph": True}}, "model.adjoint_options.graph", "true"),
    ],
)
def test_cuda_graphs_on_a_cpu_device_are_refused(device, model, key, value):
    """model.compile=graph or GMRES's adjoint_options.graph under scaling.device=cpu ran every
    solve eagerly (a CPU records no CUDA graph), unsaid; compile=true compiles kernels there
    and stays taken."""
    raw = {"model": model, "scaling": {"device": device}}
    if device != "cpu":
        validate(raw)
        return
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert str(err.value) == (
        f"{key}: {value} records CUDA graphs, which scaling.device=cpu has none of, so the "
        f"solves would run eagerly; set scaling.device to cuda or auto, or remove {key}"
    )
    assert err.value.key == key
    assert validate(raw | {"model": {"compile": True}}).model.compile is True


def test_overrides_set_keys_of_a_section_left_empty_in_the_file(tmp_path):
    """A section written with no keys (`model:`, which YAML reads as null) takes overrides."""
    path = tmp_path / "run.yaml"
    path.write_text("model:\ntrain: {epochs: 2}\n")
    cfg = load(path, ["model.variant=skip", "train.epochs=4"])
    assert (cfg.model.variant, cfg.train.epochs) == ("skip", 4)


def test_an_override_of_a_section_sets_its_keys_and_keeps_the_files_others(tmp_path):
    """`optim={lr: 0.2}` replaced the file's whole optim section: the run trained with Adam
    and a cosine schedule where the file set SGD and a constant one."""
    path = tmp_path / "run.yaml"
    path.write_text("optim: {optimizer: sgd, lr: 0.1, schedule: constant}\n")
    optim = load(path, ["optim={lr: 0.2, momentum: 0.5}"]).optim
    assert (optim.optimizer, optim.schedule, optim.lr, optim.momentum) == (
        "sgd",
        "constant",
        0.2,
        0.5,
    )
    with pytest.raises(ConfigError, match=r"^override optim.lr: given twice \(0.3, then 0.2\)"):
        load(path, ["optim.lr=0.3", "optim={lr: 0.2}"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr", "override 'optim.lr': expected key=value"),
        ("=3", "override '=3': expected key=value"),
        ("optim.lr.x=1", "optim.lr: is a value, not a section"),
        ("optim.bogus=1", "optim.bogus: unknown key"),
        (["train.epochs=1", "train.epochs=3"], "override train.epochs: given twice (1, then 3)"),
        # The one given last won: m 3 here, m 4 in the other order.
        (
            ["model.solver_options.m=4", "model.solver_options={m: 3}"],
            "override model.solver_options.m: given beside model.solver_options, which replaces "
            "all of it (4, then {'m': 3}); give model.solver_options.m within "
            "model.solver_options's value, or leave one out",
        ),
        (
            ["model={solver_options: {m: 3}}", "model.solver_options.m=4"],
            "override model.solver_options.m: given beside model.solver_options, which replaces "
            "all of it ({'m': 3}, then 4); give model.solver_options.m within "
            "model.solver_options's value, or leave one out",
        ),
        # Not given twice: m was dropped in this order, kept in the other.
        (
            ["model.solver_options.m=4", "model.solver_options={tol: 1}"],
            "override model.solver_options.m: given beside model.solver_options, which replaces "
            "all of it (4, then {'tol': 1}); give model.solver_options.m within "
            "model.solver_options's value, or leave one out",
        ),
        ("optim=", "override optim: an empty value sets no key of section optim; set its keys"),
        ("search=null", "override search: an empty value sets no key of section search"),
        # YAML reads {lr:0.1} as the key 'lr:0.1' with no value: it was refused as the mangled
        # key optim.lr:0 (its dots split as sections), {m:5} as an option 'm:5'.
        (
            "optim={lr:0.1}",
            "override 'optim={lr:0.1}': YAML reads 'lr:0.1' as a key without a value; put a "
            "space after the colon: {lr: 0.1}",
        ),
        (
            "model.solver_options={kind: fixed, h0:0.5}",
            "override 'model.solver_options={kind: fixed, h0:0.5}': YAML reads 'h0:0.5' as a "
            "key without a value; put a space after the colon: {h0: 0.5}",
        ),
    ],
)
def test_bad_overrides_are_config_errors(tmp_path, override, expected):
    path = tmp_path / "run.yaml"
    path.write_text("optim: {lr: 0.01}\n")
    with pytest.raises(ConfigError, match="^" + re.escape(expected)):
        load(path, [override] if isinstance(override, str) else override)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: [unclosed\n", "invalid YAML at line 2"),
        ("- 1\n- 2\n", "expected a mapping of keys to values at the top level"),
    ],
)
def test_unreadable_files_are_config_errors(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load(path)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("text", "line", "key", "first"),
    [
        ("optim:\n  lr: 0.1\n  lr: 0.01\n", 3, "lr", 2),
        ("optim: {lr: 0.1}\ntrain: {epochs: 2}\noptim: {momentum: 0.5}\n", 3, "optim", 1),
        (
            "search:\n  variants:\n    - {label: a, optim.lr: 0.1, optim.lr: 0.2}\n",
            3,
            "optim.lr",
            3,
        ),
    ],
)
def test_a_key_given_twice_in_a_mapping_is_refused_with_its_lines(tmp_path, text, line, key, first):
    """PyYAML keeps the last of two equal keys: a second `optim:` section dropped the first's
    lr without a word, and the run trained at the default."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        config.read_yaml(path)
    assert str(err.value) == (
        f"{path}: invalid YAML at line {line}: key {key!r} is given twice (first at line "
        f"{first}); keep one"
    )


def test_a_merge_key_s_values_are_laid_under_the_keys_given_beside_it(tmp_path):
    """A variant merged from another's anchor (`<<: *fast`) that sets some of its keys again
    gives no key twice: the keys written beside the merge win, the others come from the
    anchor; a key that no mapping can hold (a list) is named as PyYAML names it, at its line."""
    path = tmp_path / "run.yaml"
    path.write_text(
        "search:\n  variants:\n"
        "    - &fast {label: fast, model.solver: bs3, model.abstol: 0.01}\n"
        "    - {<<: *fast, label: tight, model.abstol: 0.001}\n"
    )
    assert load(path).search.variants == (
        {"label": "fast", "model.solver": "bs3", "model.abstol": 0.01},
        {"label": "tight", "model.solver": "bs3", "model.abstol": 0.001},
    )
    path.write_text("optim:\n  ? [lr, momentum]\n  : 0.1\n")
    with pytest.raises(ConfigError) as err:
        config.read_yaml(path)
    assert str(err.value) == f"{path}: invalid YAML at line 2: found unhashable key"


def test_invalid_yaml_names_the_problem(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n\tlr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value) == (
        f"{path}: invalid YAML at line 2: found character '\\t' that cannot start any token; "
        "indent with spaces (YAML takes no tabs there)"
    )


def test_a_binary_file_is_named_as_no_yaml_text(tmp_path):
    path = tmp_path / "images.yaml"
    path.write_bytes(b"\x1f\x8b\x08\x00binary")
    with pytest.raises(ConfigError, match=r"images.yaml: not a YAML text file \(byte 0x8b at"):
        load(path)


def test_relative_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = validate({"storage_path": "out", "data": {"dataset": "mnist", "data_dir": "d"}})
    assert cfg.storage_path == str(tmp_path / "out")
    assert cfg.data.data_dir == str(tmp_path / "d")
    assert validate({"storage_path": "s3://bucket/runs"}).storage_path == "s3://bucket/runs"


SECTIONS = {
    "model": config.ModelSection,
    "data": config.DataSection,
    "optim": config.OptimSection,
    "train": config.TrainSection,
    "scaling": config.ScalingSection,
}
KEYS = st.sampled_from(
    [f.name for cls in SECTIONS.values() for f in config.dataclasses.fields(cls)] + ["bogus"]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**1100), max_value=2**1100)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(config.SOLVERS + config.DATASETS + config.MODELS + ("1e-3", "nan"))
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner)
)
SECTION_DICTS = st.dictionaries(KEYS, VALUES, max_size=5)
CONFIGS = st.dictionaries(
    st.sampled_from([*SECTIONS, "name", "storage_path", "seed", "search", "extra"]),
    SECTION_DICTS | VALUES,
    max_size=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CONFIGS)
def test_random_configs_validate_or_raise_config_error(raw):
    try:
        cfg = validate(raw)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    assert validate(cfg.to_dict()) == cfg


def test_a_bad_value_from_a_file_names_the_file_and_one_from_an_override_does_not(tmp_path):
    """A bad value named its key alone, so a user of several files could not tell which file
    held it; an override's value is not the file's."""
    path = tmp_path / "run.yaml"
    path.write_text("optim: {lr: -1, optimizer: sgd}\ndata: {batch_size: 3}\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value) == f"optim.lr: must be > 0, got -1.0 (in {path})"
    with pytest.raises(ConfigError) as err:
        load(path, ["optim.lr=0.1", "optim.optimizer=sgdd"])
    assert str(err.value).startswith("optim.optimizer: 'sgdd' is not allowed; choose one of")
    assert str(path) not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load(path, ["optim.lr=0.1"])
    assert str(err.value).startswith("data.batch_size: 3 does not split evenly")
    assert str(err.value).endswith(f" (in {path})")


def test_an_override_of_a_key_spelt_with_other_characters_is_not_blamed_on_the_file(tmp_path):
    """The key of an error was read back from its message up to a character other than a
    letter, a digit, '_', '.' or brackets, so an unknown override `data.batch-size` or `2nd`
    was reported as in the file; an error carries its key."""
    path = tmp_path / "run.yaml"
    path.write_text("optim: {lr: 0.1}\n")
    for key, section in (("data.batch-size", "data"), ("2nd", "config")):
        with pytest.raises(ConfigError) as err:
            load(path, [f"{key}=3"])
        assert err.value.key == key
        assert str(err.value).startswith(f"{key}: unknown key; allowed keys in {section}: ")
        assert str(path) not in str(err.value)
    path.write_text("data: {batch-size: 3}\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value).endswith(f" (in {path})")


def test_an_option_the_solver_does_not_take_is_blamed_on_where_its_options_are_given(tmp_path):
    """An unknown solver or adjoint option was keyed by model.solver (model.adjoint), which the
    file sets, so one given by an override read `(in FILE)`, sending the user to a file that
    has no such option; it is keyed by the options that hold it."""
    path = tmp_path / "run.yaml"
    path.write_text("model: {solver: vcab3, adjoint: gmres}\n")
    for override, key in (
        ("model.solver_options={m: 3}", "model.solver_options"),
        ("model.adjoint_options.restrt=5", "model.adjoint_options"),
    ):
        with pytest.raises(ConfigError) as err:
            load(path, [override])
        assert err.value.key == key
        assert " takes no option " in str(err.value) and str(path) not in str(err.value)
    path.write_text("model: {solver: vcab3, solver_options: {m: 3}}\n")
    with pytest.raises(ConfigError) as err:
        load(path, ["model.abstol=0.01"])
    assert str(err.value).startswith("model.solver='vcab3' takes no option 'm'; its options are")
    assert str(err.value).endswith(f" (in {path})")


def test_a_key_written_as_a_yaml_11_boolean_is_named_as_written(tmp_path):
    """YAML 1.1 reads a key `on:` as true, so it was reported as `optim.True`; a key is its
    text, a value written so stays a boolean."""
    assert config.load_yaml("{on: yes, No: off, true: 1}") == {"on": True, "No": False, "true": 1}
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  on: 1\n")
    with pytest.raises(ConfigError, match="^optim.on: unknown key; allowed keys in optim: "):
        load(path)
    path.write_text("optim:\n  yes: 1\n  true: 2\n")
    with pytest.raises(ConfigError, match="^optim.yes: unknown key"):
        load(path)


def test_yaml_aliases_that_expand_past_the_limit_or_without_end_are_refused_at_once(
    tmp_path, monkeypatch
):
    """Aliases of aliases (nine lists of nine, eight deep: 9^9 values) hung validation, which
    expanded them, and an alias within its own value (`&a {m: *a}`) ended in a RecursionError;
    both are refused as invalid YAML, reading the document as written, and merges still read."""
    path = tmp_path / "run.yaml"
    text = "model:\n  solver_options:\n    x0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
    for depth in range(1, 9):
        text += f"    x{depth}: &a{depth} [{', '.join([f'*a{depth - 1}'] * 9)}]\n"
    path.write_text(text)
    lists = [10]  # a list of nine is itself and its nine values; each next one, nine of these
    for _ in range(8):
        lists.append(1 + 9 * lists[-1])
    expanded = 5 + sum(1 + size for size in lists)  # two mappings in the root, and the keys
    with pytest.raises(ConfigError) as err:
        load(path)
    written = 5 + 9 + 10 + 8  # as above, the keys x0 to x8, x0's list and the 8 lists of aliases
    assert str(err.value) == (
        f"{path}: invalid YAML at line 1: its aliases expand its {written} keys and values to "
        f"{expanded}, past the {config.MAX_YAML_VALUES} more that aliases may add; write the "
        "repeated values out"
    )
    path.write_text("model:\n  model: mnist_dense\n  solver_options: &a {m: *a}\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value) == (
        f"{path}: invalid YAML at line 3: an alias within the value it names (&a [*a]) repeats "
        "it endlessly"
    )
    assert config.load_yaml("a: &x {b: 1}\nc: {<<: *x, d: 2}") == {
        "a": {"b": 1},
        "c": {"b": 1, "d": 2},
    }
    # Past the limit by what aliases add alone: 30 values written, or 2 aliases of a list of 9
    # (14 written, 34 expanded), are read; a third alias (44) is refused.
    monkeypatch.setattr(config, "MAX_YAML_VALUES", 20)
    assert config.load_yaml(f"seed: {list(range(30))}") == {"seed": list(range(30))}
    nine = list(range(9))
    assert config.load_yaml(f"a: &x {nine}\nb: [*x, *x]") == {"a": nine, "b": [nine, nine]}
    with pytest.raises(yaml.YAMLError, match="expand its 14 keys and values to 44, past the 20"):
        config.load_yaml(f"a: &x {nine}\nb: [*x, *x, *x]")


def test_a_yaml_file_nested_past_the_recursion_limit_is_invalid_yaml_in_one_line(tmp_path):
    """700 nested lists ended the read in a RecursionError deep in PyYAML's parser; 100 read.
    Nested as deep as the recursion limit, the file exceeds it in a process whose limit a
    compile raised (inductor sets at least 2,000), where 700 levels read."""
    depth = sys.getrecursionlimit()
    path = tmp_path / "run.yaml"
    path.write_text("model: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value) == (
        f"{path}: invalid YAML: its values are nested deeper than the reader's recursion limit"
    )
    assert config.load_yaml("a: " + "[" * 100 + "]" * 100) == {
        "a": functools.reduce(lambda v, _: [v], range(99), [])
    }
