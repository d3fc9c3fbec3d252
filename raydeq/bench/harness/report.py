"""Benchmark results: sections of rows and pass/fail targets, written as JSON and Markdown."""

from __future__ import annotations

import json
import math
import operator
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from raydeq.training.storage import write_bytes

Value = float | int | str | bool | None
# Significant digits of a column's cells where the default three hide what it measures: a test
# accuracy over 2,000 test digits moves in steps of 0.0005, and three digits wrote 0.9225 as
# 0.922, vanilla's in the same table, and 0.9255 as 0.925.
DIGITS = {"test accuracy": 4}
# The measured value of a target whose raydeq side missed what the comparison is made at (a
# tolerance, a gradient error): its claim does not hold, a FAIL; a peer's or a baseline's miss
# leaves the target unmeasured (None or NaN), n/a.
MISSED = math.inf


@dataclass
class Target:
    """A claim checked against a measured value: measured <= limit (or >= with at_least)."""

    name: str
    measured: float | None
    limit: float
    at_least: bool = False
    detail: str = ""

    @property
    def passed(self) -> bool | None:
        """Whether the measurement meets the limit; None when it could not be measured."""
        if self.measured is None or math.isnan(self.measured):
            return None
        compare = operator.ge if self.at_least else operator.le
        return bool(compare(self.measured, self.limit))

    def verdict(self) -> str:
        """PASS, FAIL or n/a."""
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]


@dataclass
class Section:
    """One comparison: a table (columns, rows), its targets, notes and raw timings."""

    name: str
    title: str
    columns: list[str]
    rows: list[dict[str, Value]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, list[float]] = field(default_factory=dict)

    def add(self, **row: Value) -> None:
        """Append a row given by column name (missing columns print as blank)."""
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"{self.name}: unknown columns {sorted(unknown)}")
        self.rows.append(row)


@dataclass
class Report:
    """Every section of one run, with the machine and settings it ran with."""

    date: str
    device: str
    size: str
    machine: dict[str, Value]
    command: str = ""  # the command line that made the report
    commit: str = ""  # source_commit() of the code that ran
    sections: list[Section] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # suite -> its error, one line

    def to_json(self) -> str:
        """All of it, including each target's verdict and the raw timings, as strict JSON: a
        NaN or infinite number is null (the verdict stays in each target's `passed`)."""
        data = asdict(self)
        for section, raw in zip(self.sections, data["sections"], strict=True):
            for target, out in zip(section.targets, raw["targets"], strict=True):
                out["passed"] = target.passed
        return json.dumps(finite_or_null(data), indent=2, default=str, allow_nan=False)

    def to_markdown(self) -> str:
        """The targets summary, then one table per section."""
        lines = [
            f"# raydeq benchmarks, {self.date}, {self.device} ({self.size})",
            "",
            ", ".join(f"{k}: {v}" for k, v in self.machine.items()),
            "",
        ]
        if self.command:
            commit = self.commit or "unknown (the source is no git work tree)"
            lines += [f"Run as `{self.command}` on commit {commit}.", ""]
        lines += [
            "## Targets",
            "",
            "Times are medians over interleaved repeats; a ratio of two times is the median over "
            "the repeats of their ratio within one round, where a slow spell of the machine "
            "slows both.",
            "",
            "| benchmark | target | measured | limit | result | detail |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for section in self.sections:
            for t in section.targets:
                bound = (">= " if t.at_least else "<= ") + fmt(t.limit, digits=4)
                measured = fmt(t.measured, digits=4)
                lines.append(
                    f"| {section.name} | {t.name} | {measured} | {bound} | {t.verdict()} "
                    f"| {t.detail} |"
                )
        if self.failures:
            lines += ["", "## Failed suites", ""]
            lines += [f"- `{name}`: {error}" for name, error in self.failures.items()]
        for section in self.sections:
            lines += ["", f"## {section.title} (`{section.name}`)", ""]
            lines += table(section.columns, section.rows)
            if section.notes:
                lines += [""] + [f"- {note}" for note in section.notes]
        return "\n".join(lines) + "\n"


def finite_or_null(value: object) -> object:
    """`value` with every NaN or infinite float inside it replaced by None: JSON has no
    NaN or Infinity, and jq, JavaScript and most readers refuse Python's."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(item) for item in value]
    return value


def error_line(err: BaseException) -> str:
    """An exception as one line for a report: its type and its message's first line."""
    return f"{type(err).__name__}: {next(iter(str(err).splitlines()), '')}"


def fmt(value: Value, digits: int = 3) -> str:
    """A cell: floats to `digits` significant digits (scientific when tiny or huge; a whole number
    of more digits below 1e5, or one that rounds to them, whole, where the g format wrote 3000
    and 999.7 as 3e+03 and 1e+03), None blank."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value != 0 and not 1e-2 <= abs(value) < 1e5:
        return f"{value:.{digits - 1}e}"
    text = f"{value:.{digits}g}"
    return f"{value:.0f}" if "e" in text else text


def table(columns: list[str], rows: list[dict[str, Value]]) -> list[str]:
    """A Markdown table of the rows, each column's cells to its DIGITS (three unset)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c), DIGITS.get(c, 3)) for c in columns) + " |")
    return lines


def output_stem(report: Report, out_dir: Path) -> Path:
    """out_dir/<date>-<device>, or with -2, -3, ... the first that names no written result,
    reserved by creating its JSON file at once: a second run on one day, or one started beside
    it (another GPU of the machine), would overwrite the first's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem, number = out_dir / f"{report.date}-{report.device}", 1
    while not reserve(stem):
        number += 1
        stem = out_dir / f"{report.date}-{report.device}-{number}"
    return stem


def reserve(stem: Path) -> bool:
    """Create stem.json unless it or stem.md exists; whether this call created it (creating
    the file is atomic, so of two runs taking the same name one only succeeds)."""
    if stem.with_suffix(".md").exists():
        return False
    try:
        stem.with_suffix(".json").open("x").close()
    except FileExistsError:
        return False
    return True


def write(report: Report, stem: Path) -> tuple[Path, Path]:
    """Write the report to stem.json and stem.md (see output_stem), each beside it and renamed
    into place (storage.write_bytes): a reader during a rewrite, or a full disk, finds the
    previous suites' report whole; returns both paths."""
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    write_bytes(str(json_path), report.to_json().encode())
    write_bytes(str(md_path), report.to_markdown().encode())
    return json_path, md_path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else the platform's machine type."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity where the system keeps one (taskset, a
    batch scheduler's cpuset), which os.cpu_count ignores, else the machine's CPUs."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def source_commit() -> str:
    """The git commit of the raydeq source that runs, with a word where its tracked files differ
    from it; empty where that source is no git work tree of its own (an installed package)."""
    root = Path(__file__).resolve().parents[3]

    def git(*args: str) -> str:
        command = ["git", "-C", str(root), *args]
        done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
        return done.stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return ""  # a package installed inside some other repository's folder
        changed = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD") + (" with uncommitted changes" if changed else "")
    except (OSError, subprocess.SubprocessError):  # no git, or it failed or hung
        return ""


def machine_info(device: torch.device) -> dict[str, Value]:
    """What the numbers were measured on: CPU, the cores the run may use, threads, GPU, library
    versions."""
    info: dict[str, Value] = {
        "cpu": cpu_name(),
        "cores": usable_cpus(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
