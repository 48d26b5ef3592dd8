"""Datasets as plug-ins: a toy dataset defined outside cirlib (tests/plugins/toy_dataset.py, a FashionIQ-layout
dataset with one category of its own) registered through CIRLIB_PLUGINS runs stage I, top-k, stage II and evaluation
through the public steps; and no code outside the dataset registry and classes compares a dataset name."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cirlib"
DATASET_NAMES = ("cirr", "fashioniq", "circo")
# The registry and the dataset classes own the names; the synthetic worlds are layouts of those classes.
OWNERS = ("data/dataset.py", "data/cirr.py", "data/fashioniq.py", "data/circo.py", "data/synth.py",
          "data/synth_circo.py")


def _is_name(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value in DATASET_NAMES


def _name_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of each comparison with a dataset name, `in (...)` over names, tuple of names, dict keyed by
    names, or conditional expression choosing a name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            inside = [e for o in operands if isinstance(o, (ast.Tuple, ast.List, ast.Set)) for e in o.elts]
            if any(_is_name(o) for o in operands + inside):
                found.append((node.lineno, "comparison with a dataset name"))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and sum(map(_is_name, node.elts)) >= 2:
            found.append((node.lineno, "a collection of dataset names"))
        elif isinstance(node, ast.Dict) and any(k is not None and _is_name(k) for k in node.keys):
            found.append((node.lineno, "a dict keyed by dataset names"))
        elif isinstance(node, ast.IfExp) and (_is_name(node.body) or _is_name(node.orelse)):
            found.append((node.lineno, "a conditional choosing a dataset name"))
    return found


def dataset_name_comparisons(package: Path = PACKAGE) -> list[str]:
    """'path:line: what source' for every dataset-name decision outside the registry and the dataset classes."""
    out = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel in OWNERS:
            continue
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for line, what in sorted(set(_name_uses(ast.parse(source)))):
            out.append(f"cirlib/{rel}:{line}: {what}: {lines[line - 1].strip()}")
    return out


def test_no_dataset_name_comparisons_outside_the_dataset_classes():
    found = dataset_name_comparisons()
    assert not found, ("dataset names compared outside cirlib/data/{dataset,cirr,fashioniq,circo}.py (ask the "
                       "dataset object, `cirlib.data.get_dataset(...)`, instead):\n" + "\n".join(found))


def test_the_name_check_finds_what_it_looks_for(tmp_path):
    """The check is real: each kind of name decision in a module is reported (main had 38 of them)."""
    pkg = tmp_path / "cirlib"
    (pkg / "workbook").mkdir(parents=True)
    (pkg / "workbook" / "x.py").write_text(
        'KS = {"cirr": 1}\n'
        'def f(sd, raw):\n'
        '    a = sd.dataset == "cirr"\n'
        '    b = sd.dataset in ("fashioniq", "circo")\n'
        '    c = "fashioniq" if "dress_types" in raw else "cirr"\n'
        '    return "cirr" != sd.dataset\n')
    (pkg / "data").mkdir()
    (pkg / "data" / "cirr.py").write_text('X = "cirr" == "cirr"\n')  # an owner: allowed
    found = dataset_name_comparisons(pkg)
    assert [f.split(":")[1] for f in found] == ["1", "3", "4", "4", "5", "6"], found
    assert all(f.startswith("cirlib/workbook/x.py:") for f in found)
