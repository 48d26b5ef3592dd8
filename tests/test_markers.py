"""The test tiers: every marker the tests use is registered in pyproject.toml, `make test-fast` leaves out exactly the
registered tiers, and every test module keeps its quick tests in the fast tier (or is named here as wholly slow)."""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

from cirlib.paths import REPO_ROOT

TESTS = REPO_ROOT / "tests"
PYTEST_OWN_MARKERS = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}
# Modules all of whose tests are inherently slow (each runs a pipeline, a kernel, a browser or several processes).
WHOLLY_SLOW = {"test_gpu_check", "test_pipeline_e2e"}


def registered_markers() -> set[str]:
    pytest_options = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in pytest_options["addopts"], "an unregistered marker must be an error"
    return {line.split(":", 1)[0].strip() for line in pytest_options["markers"]}


def fast_expression() -> str:
    """The Makefile's FAST_TESTS marker expression, checked to be what `test-fast` runs."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    (expression,) = re.findall(r"^FAST_TESTS := (.+)$", makefile, flags=re.M)
    recipe = makefile.split("\ntest-fast:", 1)[1].split("\n\n", 1)[0]
    assert '-m pytest -q -m "$(FAST_TESTS)"' in recipe, f"test-fast must run FAST_TESTS:{recipe}"
    return expression


def marks_in(node: ast.AST) -> set[str]:
    """The names X of every `pytest.mark.X` under `node`."""
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
            and n.value.attr == "mark" and isinstance(n.value.value, ast.Name) and n.value.value.id == "pytest"}


def _test_modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), filename=str(p)) for p in sorted(TESTS.glob("test_*.py"))}


def test_every_marker_used_is_registered():
    used = set().union(*(marks_in(tree) for tree in _test_modules().values())) - PYTEST_OWN_MARKERS
    assert used <= registered_markers(), f"unregistered markers {sorted(used - registered_markers())}: add them to " \
                                         "pyproject.toml's [tool.pytest.ini_options] markers"


def test_the_fast_tier_leaves_out_exactly_the_registered_tiers():
    words = set(re.findall(r"\w+", fast_expression())) - {"and", "or", "not"}
    assert words == registered_markers(), f"FAST_TESTS names {sorted(words)}, registered: {sorted(registered_markers())}"


def _module_marks(tree: ast.Module) -> set[str]:
    return set().union(*(marks_in(node.value) for node in tree.body if isinstance(node, ast.Assign)
                         and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)))


def _has_fast_test(tree: ast.Module, tiers: set[str]) -> bool:
    return any(isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
               and not set().union(*(marks_in(d) for d in node.decorator_list)) & tiers for node in tree.body)


def test_every_module_keeps_its_quick_tests_in_the_fast_tier():
    tiers = registered_markers()
    wholly_slow = {name for name, tree in _test_modules().items()
                   if _module_marks(tree) & tiers or not _has_fast_test(tree, tiers)}
    assert wholly_slow == WHOLLY_SLOW, (
        f"modules without a fast test: {sorted(wholly_slow)}; expected {sorted(WHOLLY_SLOW)} (mark single tests, not "
        "a whole module that has quick ones)")


def test_the_tier_checks_read_marks_and_module_marks():
    tree = ast.parse("import pytest\npytestmark = [pytest.mark.slow, pytest.mark.notebooks]\n"
                     "@pytest.mark.e2e\ndef test_a(): pass\n@pytest.mark.parametrize('x', [1])\ndef test_b(x): pass\n")
    assert _module_marks(tree) == {"slow", "notebooks"} and marks_in(tree) == {"slow", "notebooks", "e2e",
                                                                                 "parametrize"}
    assert _has_fast_test(tree, {"e2e"}) and not _has_fast_test(tree, {"e2e", "parametrize"})
