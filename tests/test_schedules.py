"""Learning-rate schedules against their closed forms: cosine to a floor, step decay at
explicit milestones or every few epochs, constant."""

import math

import pytest
import torch

from raydeq.training.config import ConfigError, notes, validate
from raydeq.training.state import make_scheduler


def rates(optim: dict, total_steps: int, steps_per_epoch: int = 10) -> list[float]:
    """The learning rate of each step 0..total_steps under the configured schedule."""
    cfg = validate({"optim": optim}).optim
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    schedule = make_scheduler(cfg, optimizer, total_steps, steps_per_epoch)
    seen = [schedule.get_last_lr()[0]]
    for _ in range(total_steps):
        optimizer.step()
        schedule.step()
        seen.append(schedule.get_last_lr()[0])
    return seen


def test_cosine_falls_from_lr_to_its_floor_over_the_run():
    seen = rates({"lr": 1e-3, "eta_min": 1e-6, "schedule": "cosine"}, 100)
    expected = [1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * t / 100)) / 2 for t in range(101)]
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert seen[-1] == pytest.approx(1e-6) and rates({"lr": 1e-3}, 10)[-1] == pytest.approx(0)


def test_step_decay_at_explicit_milestones_and_every_few_epochs():
    seen = rates({"lr": 0.05, "schedule": "step", "milestones": [10, 15, 25], "gamma": 0.1}, 30)
    expected = [0.05 * 0.1 ** sum(t >= m for m in (10, 15, 25)) for t in range(31)]
    assert seen == pytest.approx(expected, rel=1e-9)
    periodic = rates({"lr": 1.0, "schedule": "step", "step_epochs": 2, "gamma": 0.5}, 45)
    assert periodic == pytest.approx([0.5 ** (t // 20) for t in range(46)])
    assert rates({"lr": 0.1, "schedule": "constant"}, 5) == pytest.approx([0.1] * 6)


def test_a_step_schedule_that_decays_nothing_within_the_run_says_so_at_its_start():
    """optim.schedule=step at the default step_epochs of 30 trained a run of 10 epochs at
    optim.lr throughout, without a word; the run now says so, and says nothing where a decay
    comes within it."""
    cfg = validate({"optim": {"lr": 0.1, "schedule": "step"}})
    assert rates({"lr": 0.1, "schedule": "step"}, 220, 22) == pytest.approx([0.1] * 221)
    assert notes(cfg, 220, 22) == [
        "optim.schedule=step with optim.step_epochs=30: the first decay comes after step 660, "
        "past the run's last update (step 220), so every step trains at optim.lr=0.1; lower "
        "optim.step_epochs to decay within the run"
    ]
    assert notes(cfg, 661, 22) == []
    milestones = validate({"optim": {"schedule": "step", "milestones": [20, 30]}})
    assert notes(milestones, 20, 5)[0].startswith(
        "optim.schedule=step with optim.milestones=[20, 30]: the first decay comes after step "
        "20, past the run's last update (step 20)"
    )
    assert notes(milestones, 21, 5) == []


def test_an_unrolled_warm_up_as_long_as_the_run_says_so_at_its_start():
    """model.pretrain_steps of 500 in a run of 220 steps unrolled f in every training step,
    without a word, so that none trained through the solve that the test accuracy measured."""
    cfg = validate({"model": {"model": "mnist_dense", "pretrain_steps": 500}})
    assert notes(cfg, 220, 22) == [
        "model.pretrain_steps=500 unrolls f in all of the run's 220 steps, so none trains "
        "through the solve that the test evaluations run; lower model.pretrain_steps below "
        "220, or train longer"
    ]
    assert notes(cfg, 500, 22)[0].startswith(  # steps 0 to 499 unroll: each of the 500
        "model.pretrain_steps=500 unrolls f in all of the run's 500 steps"
    )
    assert notes(cfg, 501, 22) == []
    assert notes(validate({"model": {"variant": "neural_ode"}}), 1, 1) == []


@pytest.mark.parametrize(
    ("optim", "message"),
    [
        ({"milestones": [20, 10]}, "optim.milestones: expected increasing steps, got [20, 10]"),
        ({"milestones": [0]}, "optim.milestones: expected a list of positive integers"),
        ({"eta_min": 0.1, "lr": 0.01}, "optim.eta_min: 0.1 is above optim.lr=0.01"),
        (
            {"eta_min": 0.1, "lr": 0.01, "schedule": "step"},
            "optim.eta_min: 0.1 applies to optim.schedule=cosine only, not 'step'; set",
        ),
        (
            {"eta_min": 1e-6, "schedule": "constant"},
            "optim.eta_min: 1e-06 applies to optim.schedule=cosine only, not 'constant'; set",
        ),
        (
            {"milestones": [10, 20]},
            "optim.milestones: [10, 20] apply to optim.schedule=step only, not 'cosine'; set",
        ),
        (
            {"milestones": [10], "schedule": "constant"},
            "optim.milestones: [10] apply to optim.schedule=step only, not 'constant'; set",
        ),
        (
            {"gamma": 0.5},
            "optim.gamma: 0.5 applies to optim.schedule=step only, not 'cosine'; set",
        ),
        (
            {"step_epochs": 5, "schedule": "constant"},
            "optim.step_epochs: 5 applies to optim.schedule=step only, not 'constant'; set",
        ),
        (
            {"step_epochs": 5, "schedule": "step", "milestones": [10]},
            "optim.step_epochs: 5 is not used with optim.milestones, which set the steps",
        ),
        (
            {"momentum": 0.5, "optimizer": "adamw"},
            "optim.momentum: 0.5 applies to optim.optimizer=sgd only, not 'adamw'; set",
        ),
    ],
)
def test_bad_schedules_are_one_line_errors(optim, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace(".", r"\.")):
        validate({"optim": optim})


def test_settings_at_their_defaults_load_where_they_have_no_effect():
    """momentum (0.9), gamma and step_epochs left at their defaults, or given at them, load
    under Adam and a cosine schedule, so a config that never names them is not refused."""
    optim = {"optimizer": "adam", "momentum": 0.9, "gamma": 0.1, "step_epochs": 30}
    assert validate({"optim": optim}).optim.momentum == 0.9
    assert validate({"optim": {"optimizer": "adam", "schedule": "constant"}}).optim.gamma == 0.1
