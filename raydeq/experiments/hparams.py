"""TensorBoard's HParams view of an experiment: every finished trial's settings against its final
accuracy, test NFE, share of unconverged test images, training time per step and the search's
own metric and cost, in `<experiment>/hparams/<trial>`, so the experiment's
`tensorboard --logdir` shows it next to the trials' runs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs

from raydeq.experiments.pareto import UNCONVERGED
from raydeq.training.eventlog import EventLog
from raydeq.training.reporting import DESCRIPTIONS
from raydeq.training.storage import filesystem, write_bytes

FOLDER = "hparams"
# The unconverged share as the Pareto tables show it: a trial whose solves stop short of z* (a
# max_steps of 5) looks cheap against its test NFE without being the DEQ it names.
MEASURES = ("test_accuracy", "test_top5_accuracy", "test_nfe", UNCONVERGED, "train_time")
# How a trial's row sums up its reports into each measure an entry may hold (MEASURES and every
# metric and cost a search may optimise, config.METRICS: `results.trial_row`), said before what
# the runs' scalar of that name measures.
LAST_EVALUATION = "the trial's last evaluation"
PAST_WARM_UP = (
    "the trial's mean over its training steps past the unrolled warm-up (model.pretrain_steps)"
)
SUMMARIES = dict.fromkeys(
    ("test_accuracy", "test_top5_accuracy", "test_nfe", UNCONVERGED, "predict_time"),
    LAST_EVALUATION,
)
SUMMARIES |= dict.fromkeys(("train_time", "nfe", "forward_time", "backward_time"), PAST_WARM_UP)
SUMMARIES |= dict.fromkeys(
    ("train_loss", "train_accuracy"),
    "the trial's last report, a mean over the steps since the report before",
)
SUMMARIES |= {
    "step_time": "the trial's mean over all its training steps",
    "images_per_second": "the trial's rate over all its training steps (their images over "
    "their time)",
}
# What each measure is per step or image: the runs' scalars' words, and train_time's, which no
# run writes.
WHAT = DESCRIPTIONS | {
    "train_time": "seconds per training step, the forward and backward passes of its solves "
    "(forward_time + backward_time)"
}


def _hparam(value: Any) -> bool | int | float | str:
    """A setting as HParams takes it (numbers and strings; anything else as its text)."""
    return value if isinstance(value, bool | int | float | str) else str(value)


def _settings(row: Mapping[str, Any], settings: Sequence[str]) -> dict[str, Any]:
    """The settings of one trial's HParams entry: its name and its values of `settings` (the
    config columns of those it drew).

    A setting the trial does not have (None: a conditional dimension it did not draw) is left
    out rather than written as text, which would make the column text for every trial.
    """
    return {"trial": row["trial"]} | {
        key.removeprefix("config."): _hparam(row[key])
        for key in settings
        if row.get(key) is not None
    }


def _file_name(given: Mapping[str, Any], metrics: Mapping[str, float]) -> str:
    """The name of an entry's event file, which holds a digest of its settings and of which
    measures it has: a report that finds a setting varying that did not when the entry was
    written (a trial finished since drew another solver), or a measure it lacks, writes the
    entry again, where it kept the column blank for good."""
    named = json.dumps([given, sorted(metrics)], sort_keys=True)
    return f"events.out.tfevents.hparams.{hashlib.sha256(named.encode()).hexdigest()[:16]}"


def _measures(row: Mapping[str, Any], metric: str, cost: str | None) -> dict[str, float]:
    """A trial's finite measures, by their tags in the entry: MEASURES, then the search's own
    `metric` and `cost` where they are others (its prediction time, its images a second), which
    its searcher traded against each other."""
    names = dict.fromkeys([*MEASURES, metric, *([cost] if cost else [])])
    return {
        f"hparam/{name}": float(row[name])
        for name in names
        if row.get(name) is not None and math.isfinite(row[name])
    }


def _event_file(given: Mapping[str, Any], metrics: Mapping[str, float]) -> bytes:
    """The TensorBoard events of one trial's HParams entry: its settings `given` and measures.

    No trial writes the experiment's summary: TensorBoard takes the first one it finds for the
    whole tab, so one trial's types and measures stood for all; without it, TensorBoard
    derives the columns, their types and ranges from every trial's entry.
    """
    from torch.utils.tensorboard.summary import hparams  # a report's: not on every import

    _, start, end = hparams(dict(given), dict(metrics))
    with tempfile.TemporaryDirectory() as folder:
        # Closed however the writes end, which puts back the process's threading.excepthook.
        with contextlib.closing(EventLog(folder)) as log:
            log.writer.file_writer.add_summary(start)
            log.writer.file_writer.add_summary(end)
            log.add_scalars(metrics, 0, _description)
        (written,) = (p for p in Path(folder).iterdir() if p.is_file())
        return written.read_bytes()


def _description(tag: str) -> str:
    """What an entry's measure is, shown beside its chart as the runs' scalars are: how the
    trial's reports are summed up (SUMMARIES), then what the runs' scalar measures."""
    name = tag.removeprefix("hparam/")
    return f"{SUMMARIES[name]}: {WHAT[name]}"


def write(
    path: str,
    rows: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Sequence[str]],
    metric: str,
    cost: str | None,
) -> int:
    """Write the HParams entry of each finished trial (its `settings`, by trial; its measures:
    `_measures` of the search's `metric` and `cost`) that has none yet (its folder empty where
    a write failed), or one of other settings or measures (a rebuild or a resumed search adds
    the new ones and rewrites those whose columns changed); returns how many were written."""
    written = 0
    for row in rows:
        if not row.get("completed"):
            continue
        folder = f"{path}/{FOLDER}/{row['trial']}"
        given = _settings(row, settings[row["trial"]])
        metrics = _measures(row, metric, cost)
        name = _file_name(given, metrics)
        fs, inner = filesystem(folder)
        found = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
        held = [i.path for i in found if i.type == pyarrow.fs.FileType.File]
        if [Path(p).name for p in held] == [name]:
            continue
        for stale in held:  # before the new one: a stop between leaves no second entry
            fs.delete_file(stale)
        write_bytes(f"{folder}/{name}", _event_file(given, metrics))
        written += 1
    return written
