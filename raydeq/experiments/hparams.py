"""TensorBoard's HParams view of an experiment: every finished trial's settings against its final
accuracy, test NFE and training time per step, in `<experiment>/hparams/<trial>`, so the
experiment's `tensorboard --logdir` shows it next to the trials' runs."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from raydeq.training.storage import exists, write_bytes

FOLDER = "hparams"
MEASURES = ("test_accuracy", "test_top5_accuracy", "test_nfe", "train_time")


def _hparam(value: Any) -> bool | int | float | str:
    """A setting as HParams takes it (numbers and strings; anything else as its text)."""
    return value if isinstance(value, bool | int | float | str) else str(value)


def _event_files(row: Mapping[str, Any], settings: Sequence[str]) -> dict[str, bytes]:
    """The TensorBoard files of one trial's HParams entry, by name."""
    hparams = {"trial": row["trial"]} | {
        key.removeprefix("config."): _hparam(row.get(key)) for key in settings
    }
    metrics = {
        f"hparam/{name}": float(row[name])
        for name in MEASURES
        if row.get(name) is not None and math.isfinite(row[name])
    }
    with tempfile.TemporaryDirectory() as folder:
        with SummaryWriter(folder) as writer:
            writer.add_hparams(hparams, metrics, run_name=".")
        return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def write(path: str, rows: Sequence[Mapping[str, Any]], settings: Sequence[str]) -> int:
    """Write the HParams entry of each finished trial that has none yet (a rebuild or a resumed
    search adds the new ones only); returns how many were written."""
    written = 0
    for row in rows:
        folder = f"{path}/{FOLDER}/{row['trial']}"
        if not row.get("completed") or exists(folder):
            continue
        for name, payload in _event_files(row, settings).items():
            write_bytes(f"{folder}/{name}", payload)
        written += 1
    return written
