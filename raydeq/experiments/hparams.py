"""TensorBoard's HParams view of an experiment: every finished trial's settings against its final
accuracy, test NFE and training time per step, in `<experiment>/hparams/<trial>`, so the
experiment's `tensorboard --logdir` shows it next to the trials' runs."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs

from raydeq.training.storage import filesystem, write_bytes

FOLDER = "hparams"
MEASURES = ("test_accuracy", "test_top5_accuracy", "test_nfe", "train_time")


def _hparam(value: Any) -> bool | int | float | str:
    """A setting as HParams takes it (numbers and strings; anything else as its text)."""
    return value if isinstance(value, bool | int | float | str) else str(value)


def _event_files(row: Mapping[str, Any], settings: Sequence[str]) -> dict[str, bytes]:
    """The TensorBoard files of one trial's HParams entry, by name.

    A setting the trial does not have (None: a conditional dimension it did not draw) is left
    out rather than written as text, which would make the column text for every trial. No
    trial writes the experiment's summary: TensorBoard takes the first one it finds for the
    whole tab, so one trial's types and measures stood for all; without it, TensorBoard
    derives the columns, their types and ranges from every trial's entry.
    """
    given = {"trial": row["trial"]} | {
        key.removeprefix("config."): _hparam(row[key])
        for key in settings
        if row.get(key) is not None
    }
    metrics = {
        f"hparam/{name}": float(row[name])
        for name in MEASURES
        if row.get(name) is not None and math.isfinite(row[name])
    }
    from torch.utils.tensorboard import SummaryWriter  # a report's alone: not on every import
    from torch.utils.tensorboard.summary import hparams

    _, start, end = hparams(given, metrics)
    with tempfile.TemporaryDirectory() as folder:
        with SummaryWriter(folder) as writer:
            writer.file_writer.add_summary(start)
            writer.file_writer.add_summary(end)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value)
        return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def _written(folder: str) -> bool:
    """Whether a trial's entry is there: a folder that a failed write left empty is not."""
    fs, inner = filesystem(folder)
    found = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    return any(i.type == pyarrow.fs.FileType.File for i in found)


def write(path: str, rows: Sequence[Mapping[str, Any]], settings: Sequence[str]) -> int:
    """Write the HParams entry of each finished trial that has none yet (a rebuild or a resumed
    search adds the new ones only); returns how many were written."""
    written = 0
    for row in rows:
        folder = f"{path}/{FOLDER}/{row['trial']}"
        if not row.get("completed") or _written(folder):
            continue
        for name, payload in _event_files(row, settings).items():
            write_bytes(f"{folder}/{name}", payload)
        written += 1
    return written
