"""The suite's pytest-xdist groups hold: a group's tests run in one worker, in order."""

import re
import subprocess
import sys

GROUPED = """
import os
import pytest

pytestmark = pytest.mark.xdist_group("{group}")


@pytest.mark.parametrize("i", range(4))
def test(i):
    print(os.environ["PYTEST_XDIST_WORKER"])
"""


def test_each_group_runs_in_one_worker_in_order(tmp_path):
    """pytest 9.2 keeps the node ids that pytest-xdist 3.8 rewrites to group tests: the groups
    fell apart without a word (the Ray tests then started a cluster in each worker)."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    for group in ("one", "two"):
        (tmp_path / f"test_{group}.py").write_text(GROUPED.format(group=group))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-n",
            "2",
            "--dist",
            "loadgroup",
            "-v",
            "-p",
            "no:cacheprovider",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    ran = re.findall(r"\[(gw\d)\] .* PASSED test_(\w+)\.py::test\[(\d)\]", done.stdout)
    assert len(ran) == 8, done.stdout[-3000:]
    for group in ("one", "two"):
        mine = [(worker, i) for worker, name, i in ran if name == group]
        assert len({worker for worker, _ in mine}) == 1, mine
        assert [i for _, i in mine] == ["0", "1", "2", "3"]
