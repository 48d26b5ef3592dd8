"""The rooms of cirlib and the import rules between them (README "Architecture").

Every module of the package belongs to exactly one room; each room may import only the rooms its rule allows. The
graph is read from the source (every `import` and `from ... import`, also those inside functions), so a lazy import
cannot slip past.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cirlib import paths

PACKAGE = paths.REPO_ROOT / "cirlib"

# room -> module-name prefixes that belong to it (the longest matching prefix decides)
ROOMS: dict[str, tuple[str, ...]] = {
    "base": ("cirlib", "cirlib.paths", "cirlib.registry", "cirlib.run_folder", "cirlib.distributed", "cirlib.progress",
             "cirlib.provenance"),
    "data": ("cirlib.data",),
    "models": ("cirlib.models",),
    "loop": ("cirlib.train",),  # the loop and its parts (schedules, checkpoints, log, runtime); not the tasks
    "tasks": ("cirlib.train.tasks",),
    "retrieval": ("cirlib.retrieval",),
    "eval": ("cirlib.eval",),
    "plots": ("cirlib.plots",),
    "workbook": ("cirlib.workbook",),
    "runners": ("cirlib.run", "cirlib.batch", "cirlib.launch", "cirlib.demo", "cirlib.synth", "cirlib.submission",
                "cirlib.circo", "cirlib.reproduce", "cirlib.search", "cirlib.tables", "cirlib.hub",
                "cirlib.rerank"),
    # the tools themselves live in cirlib.tools; the modules at their old paths are entry-point shims
    "tools": ("cirlib.tools", "cirlib.verify_original", "cirlib.bench", "cirlib.bench_store", "cirlib.gpu_check"),
}

# room -> the rooms it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "base": set(),  # paths, run_folder, distributed: helpers every room above them uses (run_folder uses paths)
    "models": set(),  # the model library imports nothing else from cirlib
    # the leaf helpers (paths, progress bars: see LEAF_HELPERS) and eval's pure functions (metrics, submission
    # validators), which the dataset classes report with (eval imports nothing from cirlib: no cycle)
    "data": {"paths", "eval"},
    "eval": set(),  # metrics, rank shift, submissions: pure, nothing from cirlib
    "loop": {"base"},  # the training loop knows no models, data or retrieval
    "tasks": {"base", "loop", "models", "data", "retrieval"},
    "retrieval": {"base", "models", "data", "eval"},
    "plots": {"base", "eval"},
    "workbook": {"base", "data", "models", "loop", "tasks", "retrieval", "eval", "plots"},
    "runners": {"base", "data", "eval", "workbook", "loop"},
    # tasks: the feature-store bench (bench_store) times the real Stage1Task/Stage2Task batch path
    "tools": {"base", "data", "models", "retrieval", "eval", "tasks"},
}
PATH_HELPERS = "cirlib.paths"
LEAF_HELPERS = (PATH_HELPERS, "cirlib.progress")  # import nothing from cirlib; the data room may use them
# The registries of datasets, first stages and re-rankers: a leaf that every room may import (models and eval too).
REGISTRY = "cirlib.registry"


def room_of(module: str) -> str:
    best, best_len = None, -1
    for room, prefixes in ROOMS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = room, len(prefix)
    if best is None:
        raise KeyError(f"module {module} belongs to no room: add it to ROOMS (and README's architecture section)")
    return best


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The cirlib modules a source file imports (resolving `from cirlib.x import y` to cirlib.x.y when y is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "cirlib"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "cirlib":
                continue
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").is_file() or \
                    (PACKAGE.parent / Path(*candidate.split("."))).is_dir()
                found.add(candidate if is_module else node.module)
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks a room's rule, as 'importer -> imported (room a may not import room b)'."""
    bad = []
    for importer, imported in sorted(graph.items()):
        src = room_of(importer)
        for target in sorted(imported):
            dst = room_of(target)
            if dst == src or (importer in ("cirlib",) and dst == "base"):
                continue
            if src == "data" and target in LEAF_HELPERS:
                continue
            if target == REGISTRY:
                continue
            if src == "base" and importer == "cirlib.run_folder" and target == PATH_HELPERS:
                continue
            if dst not in ALLOWED[src]:
                bad.append(f"{importer} -> {target} ({src} may not import {dst})")
    return bad


def package_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_belongs_to_a_room():
    for module in package_graph():
        room_of(module)  # raises naming the module


def test_the_import_rules_hold():
    bad = violations(package_graph())
    assert not bad, "import rules broken:\n" + "\n".join(bad)


def test_nothing_imports_the_runners_or_the_tools():
    graph = package_graph()
    for importer, imported in graph.items():
        src = room_of(importer)
        for target in imported:
            if room_of(target) in ("runners", "tools") and src not in ("runners", "tools"):
                pytest.fail(f"{importer} imports {target}: nothing imports the runners or the tools")


@pytest.mark.parametrize("importer, target", [
    ("cirlib.models.stage1", "cirlib.data.readers"),  # models import nothing else from cirlib
    ("cirlib.eval.metrics", "cirlib.paths"),  # eval imports nothing from cirlib
    ("cirlib.data.readers", "cirlib.run_folder"),  # data: the path helpers only
    ("cirlib.train.loop", "cirlib.models.stage1"),  # the loop knows no models
    ("cirlib.train.loop", "cirlib.retrieval.topk"),  # ... nor retrieval
    ("cirlib.retrieval.rerank", "cirlib.workbook.steps"),  # workbook sits above retrieval
    ("cirlib.workbook.steps", "cirlib.run.batch"),  # nothing imports the runners
])
def test_the_checker_catches_a_broken_rule(importer, target):
    assert violations({importer: {target}}), f"{importer} -> {target} should break a rule"


def test_the_registry_is_a_leaf():
    graph = package_graph()
    assert not graph[REGISTRY], f"cirlib.registry imports {graph[REGISTRY]}: it must import nothing from cirlib"
    assert not violations({"cirlib.models.stage2": {REGISTRY}, "cirlib.eval.metrics": {REGISTRY}})


def test_the_checker_reads_lazy_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from cirlib.workbook import steps\n    import cirlib.run.batch\n")
    assert imports_of(src) == {"cirlib.workbook.steps", "cirlib.run.batch"}


TOOL_SHIMS = ("bench", "bench_store", "gpu_check", "verify_original")


@pytest.mark.parametrize("tool", TOOL_SHIMS)
def test_each_tool_lives_in_the_tools_folder_behind_a_shim(tool):
    # `python -m cirlib.<tool>` keeps working (README, Makefile); the old module only forwards to cirlib.tools.<tool>
    shim = PACKAGE / f"{tool}.py"
    assert (PACKAGE / "tools" / f"{tool}.py").is_file()
    assert imports_of(shim) == {f"cirlib.tools.{tool}"}, f"{shim} should only import cirlib.tools.{tool}"
    assert len(shim.read_text().splitlines()) <= 5


def private_imports(path: Path, name: str) -> list[str]:
    """`from cirlib.x import _name` in `path` (module `name`): a module reaching into another's private helpers."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [f"{name} imports {node.module}.{alias.name}" for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cirlib")
            for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]


def test_no_module_imports_another_modules_private_names(tmp_path):
    found = [line for p in sorted(PACKAGE.rglob("*.py")) for line in private_imports(p, module_name(p))]
    assert found == [], "make these public helpers (with docstrings) where they belong:\n" + "\n".join(found)
    (tmp_path / "m.py").write_text("from cirlib.workbook.steps import resolve, _hidden\n")
    assert private_imports(tmp_path / "m.py", "m") == ["m imports cirlib.workbook.steps._hidden"]


FRESH_IMPORT = """
import importlib, pkgutil, sys
import cirlib.data, cirlib.models
names = [m.name for pkg in (cirlib.models, cirlib.data) for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + ".")]
failed = []
for name in names:
    for loaded in [k for k in sys.modules if k.startswith("cirlib")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as err:
        failed.append(f"{name}: {type(err).__name__}: {err}")
print(len(names), "modules")
sys.exit("\\n".join(failed) if failed else 0)
"""


def test_every_model_and_data_module_imports_first_in_a_fresh_interpreter():
    """Registration imports at the ends of modules (first stages, re-rankers, datasets) must not make a circle that
    only shows when a given module is the first one imported (a worker script importing `cirlib.models.stage1`)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FRESH_IMPORT], capture_output=True, text=True, timeout=300,
                          cwd=paths.REPO_ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    assert int(done.stdout.split()[0]) > 20
