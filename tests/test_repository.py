"""The repository is self-contained: no code or test reads a path outside it."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"(^|[^.])\.\./|/shared/|^~|/mnt/|^/work/")


def _escapes(path: Path, node: ast.AST) -> str | None:
    """Why a node of `path` refers outside the repository, or None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        if OUTSIDE.search(node.value):
            return repr(node.value)
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "parents"
        and isinstance(node.slice, ast.Constant)
        and isinstance(node.slice.value, int)
    ):
        target = path.resolve().parents[node.slice.value]
        if not target.is_relative_to(ROOT):
            return f"parents[{node.slice.value}] = {target}"
    return None


def test_no_file_under_raydeq_or_tests_refers_to_a_path_outside_the_repository():
    files = sorted([*ROOT.joinpath("raydeq").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py")])
    assert len(files) > 20
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno}: {why}"
        for path in files
        if path != Path(__file__).resolve()
        for node in ast.walk(ast.parse(path.read_text()))
        if (why := _escapes(path, node))
    ]
    assert not found, "paths outside the repository:\n" + "\n".join(found)


def test_the_check_catches_the_forms_it_looks_for(tmp_path):
    here = ROOT / "tests" / "test_x.py"
    bad = [
        'Path("../elsewhere/data")',
        'Path(__file__).resolve().parents[2] / "data"',
        '"/mnt/shared/data/cifar10"',
    ]
    for code in bad:
        assert any(_escapes(here, node) for node in ast.walk(ast.parse(code))), code
    good = ['Path(__file__).resolve().parents[1] / "tune_configs"', '"s3://bucket/runs"', '"1.0"']
    for code in good:
        assert not any(_escapes(here, node) for node in ast.walk(ast.parse(code))), code
