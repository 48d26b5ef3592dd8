"""Run the numbered notebooks in order through papermill with one YAML of parameters.

    python -m cirlib.batch params/demo.yaml [--only 01,02] [--output-dir DIR]

Each notebook's `parameters` cell mirrors one config of `cirlib.workbook.config` (its `from_namespace(<Config>,
globals())` line names it); the notebook receives the YAML's top-level keys that are fields of that config, then the
`notebooks:` section of its notebook. Other top-level keys the batch itself reads:

    batch_name: demo              # executed copies go to outputs/runs/<batch_name>/ (default: the YAML file's stem)
    notebooks:                    # per-notebook overrides, keyed by file stem or its number
      01_stage1_train: {epochs: 3}
    world: {...}                  # synthetic-world settings for `cirlib.demo`; ignored here
    run: [09_circo]               # the notebooks this file is for; --only overrides it

Without `run:` (or --only) the batch runs every notebook that applies to the file: a notebook whose metadata
declares parameters it needs (`"cirlib": {"needs": ["circo_root"]}`: 09 needs a CIRCO root, 08 the folder it
searches) runs only when the file gives each of them (top level or its `notebooks:` section); the others always run
(05 itself skips a dataset without a test server). A notebook named in `run:` or --only runs regardless.

The two runs have distinct field names, so one top-level `stage1_run: s1` / `stage2_run: s2` names the same run in
every notebook (the old `run_name`, `run_name_stage1` and `run_name_stage2` keys are refused, naming the new ones).
A key that no notebook declares is an error (a typo would otherwise be silently dropped). Executed copies never
overwrite the sources; the first failing notebook stops the batch. `cirlib.launch` builds its configs from the same
YAML with the same function (`step_parameters`).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import re
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from cirlib import paths
from cirlib.progress import PROGRESS_ENV
from cirlib.workbook import config as config_module

# Keys the batch consumes itself (never forwarded as such).
BATCH_KEYS = ("batch_name", "notebooks", "world", "run")
KERNEL = "python3"


class BatchError(RuntimeError):
    """A batch could not run: bad parameters, an unknown notebook, or a notebook that failed (named with its cell)."""


def notebook_paths(folder: Path | None = None) -> list[Path]:
    """The numbered notebooks (`NN_name.ipynb`) of the workbook, in run order.

    Args:
        folder: where the notebooks live (default: <repo>/notebooks).
    """
    folder = Path(folder) if folder is not None else paths.NOTEBOOKS
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb") if p.is_file())
    if not found:
        raise BatchError(f"no numbered notebooks (NN_name.ipynb) in {folder}")
    return found


_FROM_NAMESPACE = re.compile(r"from_namespace\((\w+), globals\(\)\)")


def notebook_config(notebook: Path) -> type | None:
    """The config class a notebook's `from_namespace(<Config>, globals())` line names, or None (a notebook that
    mirrors no config)."""
    import nbformat

    book = nbformat.read(notebook, as_version=4)
    names = {m.group(1) for c in book.cells if c.cell_type == "code" for m in _FROM_NAMESPACE.finditer(c.source)}
    if len(names) > 1:
        raise BatchError(f"{notebook.name}: builds several configs {sorted(names)}; a notebook mirrors one")
    if not names:
        return None
    cls = getattr(config_module, names.pop(), None)
    if cls is None or not dataclasses.is_dataclass(cls):
        raise BatchError(f"{notebook.name}: from_namespace names no config class of cirlib.workbook.config")
    return cls


def config_fields(cls: type) -> dict[str, str]:
    """A config's field names and their annotated type names."""
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}


def declared_parameters(notebook: Path) -> dict[str, str]:
    """The parameters a notebook takes and their type names: its config's fields, or (a notebook that mirrors no
    config) the names its `parameters` cell assigns, read by papermill."""
    cls = notebook_config(notebook)
    if cls is not None:
        return config_fields(cls)
    import papermill

    declared = {name: p["inferred_type_name"] for name, p in papermill.inspect_notebook(str(notebook)).items()}
    if not declared:
        raise BatchError(f"{notebook.name}: no cell tagged 'parameters' (or it assigns nothing)")
    return declared


NEEDS_KEY = "cirlib"  # the notebook metadata entry holding {"needs": [parameter, ...]}


def notebook_needs(notebook: Path) -> list[str]:
    """The parameters a batch must give for the notebook to apply to it (its metadata's `cirlib.needs`; none when
    absent), each checked to be one of its parameters."""
    import nbformat

    declared = nbformat.read(notebook, as_version=4).metadata.get(NEEDS_KEY, {})
    needs = declared.get("needs", []) if isinstance(declared, Mapping) else None
    if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
        raise BatchError(f"{notebook.name}: metadata {NEEDS_KEY!r} must be {{\"needs\": [parameter names]}}, "
                         f"got {declared!r}")
    unknown = sorted(set(needs) - set(declared_parameters(notebook)))
    if unknown:
        raise BatchError(f"{notebook.name}: metadata {NEEDS_KEY}.needs names {unknown}, which are not its parameters")
    return needs


def applicable(params: Mapping[str, Any], notebooks: Sequence[Path]) -> list[Path]:
    """The notebooks whose needs (`notebook_needs`) the parameters give a non-empty value for; says which it leaves
    out and why."""
    sections = sections_of(params, [p.stem for p in notebooks])
    chosen = []
    for nb in notebooks:
        given = {**params, **(sections.get(nb.stem.split("_", 1)[0]) or {}), **(sections.get(nb.stem) or {})}
        missing = [n for n in notebook_needs(nb) if given.get(n) in (None, "")]
        if missing:
            print(f"[batch] leaving out {nb.name}: it needs {', '.join(missing)}, which the parameters do not give "
                  "(name it in run: to run it anyway)", flush=True)
        else:
            chosen.append(nb)
    return chosen


# Values a YAML may give for each annotated type; an int is a fine float, a bool is not an int.
_ACCEPTS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def check_types(where: str, declared: Mapping[str, str], chosen: Mapping[str, Any]) -> None:
    """Refuse parameter values whose type does not match the declared type (e.g. YAML's string "2e-5")."""
    wrong = []
    for name, value in chosen.items():
        kinds = _ACCEPTS.get(declared.get(name, ""))
        if kinds is None:
            continue  # an unannotated or unusual type: passed through unchecked
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            wrong.append(f"{name}={value!r} ({type(value).__name__}, expected {declared[name]})")
    if wrong:
        raise BatchError(f"{where}: wrongly typed parameters: {'; '.join(wrong)} "
                         "(YAML reads 2e-5 as a string: write 2.0e-5)")


def check_renamed(keys: Sequence[str], where: str) -> None:
    """Refuse parameter names of earlier versions, saying what replaced them."""
    old = [k for k in keys if k in config_module.RENAMED]
    if old:
        raise BatchError("; ".join(f"{where}: '{k}' was renamed: use {config_module.RENAMED[k]}" for k in old))


def sections_of(params: Mapping[str, Any], stems: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The `notebooks:` section, keyed by notebook stem or number (YAML's 1 means "01"); unknown names are refused."""
    sections = params.get("notebooks") or {}
    if not isinstance(sections, Mapping):
        raise BatchError(f"'notebooks' must map notebook names to parameter mappings, got {type(sections).__name__}")
    sections = {(f"{k:02d}" if isinstance(k, int) else str(k)): v for k, v in sections.items()}
    known = set(stems) | {s.split("_", 1)[0] for s in stems}
    bad = sorted(k for k in sections if k not in known)
    if bad:
        raise BatchError(f"notebooks: {bad} name no notebook; have {sorted(stems)}")
    for key, value in sections.items():
        if not isinstance(value, Mapping):
            raise BatchError(f"notebooks.{key} must be a mapping of parameter: value, got {type(value).__name__}")
        check_renamed(list(value), f"notebooks.{key}")
    return sections


def check_known(params: Mapping[str, Any], known: set[str], where: str) -> None:
    """Every top-level key is a batch key or a parameter of some notebook (old names get their new name)."""
    check_renamed(list(params), "parameters")
    unknown = sorted(k for k in params if k not in BATCH_KEYS and k not in known)
    if unknown:
        raise BatchError(f"parameters {unknown} are declared by no notebook in {where}")


def step_parameters(params: Mapping[str, Any], sections: Mapping[str, Mapping[str, Any]], stem: str,
                    declared: Mapping[str, str], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The parameters one notebook (or `cirlib.launch` step) receives: the top-level keys it declares, then its
    `notebooks:` section (by number, then by stem), then `overrides` it declares; type-checked.

    Args:
        params: the YAML mapping; sections: from `sections_of`; stem: the notebook stem (e.g. "03_stage2_train").
        declared: its parameter names and type names (`config_fields` / `declared_parameters`).
        overrides: values set on the command line (`cirlib.launch --set`); keys it does not declare are skipped.
    """
    chosen = {k: v for k, v in params.items() if k in declared and k not in BATCH_KEYS}
    for key in (stem.split("_", 1)[0], stem):  # the full stem wins over the bare number
        section = sections.get(key) or {}
        undeclared = sorted(k for k in section if k not in declared)
        if undeclared:
            raise BatchError(f"notebooks.{key}: {undeclared} are not parameters of {stem} (it has {list(declared)})")
        chosen.update(section)
    chosen.update({k: v for k, v in (overrides or {}).items() if k in declared})
    check_types(stem, declared, chosen)
    return chosen


def _listed(run: Any) -> list[str] | None:
    """The YAML's `run:` key (a list of numbers or stems, or one comma-separated string), or None."""
    if run is None:
        return None
    if isinstance(run, str):
        return [t for t in run.split(",") if t.strip()] or None
    if isinstance(run, list) and all(isinstance(t, (str, int)) for t in run):
        return [str(t) for t in run] or None
    raise BatchError(f"run: expected a list of notebook numbers or stems (e.g. [09_circo]), got {run!r}")


def _select(all_paths: list[Path], only: Sequence[str] | None) -> list[Path]:
    if not only:
        return all_paths
    chosen = []
    for token in only:
        token = token.strip().removesuffix(".ipynb")
        token = f"{int(token):02d}" if token.isdigit() else token  # "1" means "01"
        hits = [p for p in all_paths if p.stem == token or p.stem.split("_", 1)[0] == token]
        if not hits:
            raise BatchError(f"--only {token!r} matches no notebook; have {[p.stem for p in all_paths]}")
        chosen.extend(h for h in hits if h not in chosen)
    return [p for p in all_paths if p in chosen]  # always run order, whatever order was asked


def plan_batch(params: Mapping[str, Any], notebooks: Sequence[Path]) -> dict[Path, dict[str, Any]]:
    """The parameters each notebook receives; checks every key is declared by some notebook.

    Args:
        params: the YAML mapping (top-level keys + the batch keys in BATCH_KEYS).
        notebooks: the notebooks to run (validation of keys is against all numbered notebooks beside them).
    """
    folder = notebooks[0].parent if notebooks else paths.NOTEBOOKS
    everything = {p: declared_parameters(p) for p in notebook_paths(folder)}
    check_known(params, {n for names in everything.values() for n in names}, str(folder))
    sections = sections_of(params, [p.stem for p in everything])
    return {nb: step_parameters(params, sections, nb.stem, everything.get(nb) or declared_parameters(nb))
            for nb in notebooks}


def load_params(params: Mapping[str, Any] | str | os.PathLike) -> tuple[dict[str, Any], str]:
    """A parameters mapping and the batch name (`batch_name`, else the YAML stem, else "batch")."""
    if isinstance(params, Mapping):
        data, default_name = dict(params), "batch"
    else:
        path = Path(params)
        if not path.is_file():
            raise BatchError(f"parameters file {path} not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise BatchError(f"{path}: not valid YAML ({e})") from e
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise BatchError(f"{path}: expected a mapping of parameter: value at the top level, "
                             f"got {type(data).__name__}")
        default_name = path.stem
    return data, str(data.get("batch_name") or default_name)


def _describe_failure(nb: Path, err: Exception) -> str:
    cell = getattr(err, "exec_count", None)
    source = (getattr(err, "source", "") or "").strip().splitlines()
    first = source[0] if source else ""
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    where = f"cell In [{cell}]" if cell is not None else "a cell"
    return f"notebook {nb.name} failed at {where} ({first!r}): {ename}: {evalue}"


def parameters_cell_source(cls: type) -> str:
    """The `parameters` cell for a config class: each field's line of `cirlib/config.py`, in field order.

    papermill's introspection (and so `--help-notebook` and this runner) skips any line holding a second "=", so
    "=" inside a trailing comment is written ":".

    Args:
        cls: a config dataclass of `cirlib.config`.
    """
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    out = []
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            code, _, comment = lines[node.lineno - 1].strip().partition("  # ")
            comment = re.sub(r"\s*=\s*", ": ", comment)
            out.append(f"{code}  # {comment}" if comment else code)
    return "\n".join(out)


def sync_parameters_cells(notebook_dir: str | os.PathLike | None = None) -> list[Path]:
    """Rewrite each notebook's `parameters` cell from the config its `from_namespace(...)` line names.

    Run after changing a config's fields or defaults (`python -m cirlib.batch --sync-parameters`); returns the
    notebooks that changed. Nothing else in a notebook is touched.
    """
    import nbformat

    from cirlib.workbook import config

    changed = []
    for nb_path in notebook_paths(Path(notebook_dir) if notebook_dir is not None else None):
        book = nbformat.read(nb_path, as_version=4)
        names = [m.group(1) for c in book.cells if c.cell_type == "code"
                 for m in [re.search(r"from_namespace\((\w+), globals\(\)\)", c.source)] if m]
        tagged = [c for c in book.cells if "parameters" in c.metadata.get("tags", [])]
        if len(names) != 1 or len(tagged) != 1 or not hasattr(config, names[0]):
            raise BatchError(f"{nb_path.name}: expected one parameters cell and one `cfg = from_namespace(<Config>, "
                             f"globals())` cell naming a cirlib.config class, found {len(tagged)} and {names}")
        wanted = parameters_cell_source(getattr(config, names[0]))
        if tagged[0].source != wanted:
            tagged[0].source = wanted
            nbformat.write(book, str(nb_path))
            changed.append(nb_path)
    return changed


@contextmanager
def _text_progress_in_kernels() -> Iterator[None]:
    """Kernels started meanwhile draw plain text progress bars (cirlib.progress): nobody watches a widget in a batch
    run, and an executed copy keeps a widget only as its first text form ("0%"). The kernel inherits this process's
    environment; the previous value is restored afterwards."""
    before = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "text"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = before


def run_batch(
    params: Mapping[str, Any] | str | os.PathLike,
    notebooks: Sequence[str] | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    notebook_dir: str | os.PathLike | None = None,
    log_output: bool = False,
    cell_timeout_s: float | None = None,
) -> list[Path]:
    """Execute the notebooks in order with papermill; returns the executed copies' paths.

    Args:
        params: a mapping or a YAML file (see the module docstring for its keys).
        notebooks: numbers or stems to run (e.g. ["01", "02_stage1_topk"]); None = the YAML's `run:`, else every
            notebook that applies to the parameters (`applicable`), in order.
        output_dir: where executed copies go (default: outputs/runs/<batch name>/); never the source folder.
        notebook_dir: the source notebooks (default: <repo>/notebooks); also the kernel's working directory.
        log_output: stream cell output to this process's log (papermill --log-output).
        cell_timeout_s: fail a cell that runs longer than this (None = no limit, for real training runs); turns a
            kernel that stops answering into an error that names the notebook instead of a batch that never ends.
    Raises:
        BatchError: bad parameters, or the first failing notebook (named with its failing cell).
    """
    import papermill
    from nbclient.exceptions import CellTimeoutError
    from papermill.exceptions import PapermillExecutionError

    data, name = load_params(params)
    sources = notebook_paths(Path(notebook_dir) if notebook_dir is not None else None)
    listed = notebooks or _listed(data.get("run"))
    selected = _select(sources, listed) if listed else applicable(data, sources)
    out = Path(output_dir) if output_dir is not None else paths.OUTPUTS / "runs" / name
    if not out.is_absolute():
        out = paths.REPO_ROOT / out
    if out.resolve() == sources[0].parent.resolve():
        raise BatchError(f"output_dir {out} is the notebook folder: executed copies must not overwrite the sources")
    plan = plan_batch(data, selected)
    _check_before_running(plan)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for nb, nb_params in plan.items():
        target = out / nb.name
        print(f"[batch] {nb.name} -> {target} with {nb_params}", flush=True)
        try:
            with _text_progress_in_kernels():
                papermill.execute_notebook(str(nb), str(target), parameters=nb_params, kernel_name=KERNEL,
                                           cwd=str(nb.parent), progress_bar=False, log_output=log_output,
                                           execution_timeout=cell_timeout_s)
        except PapermillExecutionError as e:
            raise BatchError(_describe_failure(nb, e) + f"; executed copy with the traceback: {target}") from e
        except CellTimeoutError as e:
            raise BatchError(f"{nb.name}: a cell ran longer than cell_timeout_s={cell_timeout_s} s ({e}); executed "
                             f"copy up to that cell: {target}") from e
        written.append(target)
    return written


def _check_before_running(plan: Mapping[Path, Mapping[str, Any]]) -> None:
    """Every notebook's settings checked before the first one runs (`workbook.plan_check`, as `cirlib.launch`)."""
    from cirlib.workbook.plan_check import PlanError, check_plan

    configs = []
    for nb, nb_params in plan.items():
        cls = notebook_config(nb)
        if cls is None:
            continue
        try:
            configs.append(cls(**nb_params))
        except (TypeError, ValueError) as err:
            raise BatchError(f"{nb.name}: {err}") from err
    try:
        check_plan(configs)
    except PlanError as err:
        raise BatchError(str(err)) from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("params", type=Path, nargs="?", help="YAML parameters file")
    parser.add_argument("--only", default="", help="comma-separated notebook numbers or stems, e.g. 01,02")
    parser.add_argument("--output-dir", type=Path, default=None, help="executed copies (default outputs/runs/<name>)")
    parser.add_argument("--log-output", action="store_true", help="stream the notebooks' output")
    parser.add_argument("--cell-timeout", type=float, default=None,
                        help="fail any cell that runs longer than this many seconds (default: no limit)")
    parser.add_argument("--sync-parameters", action="store_true",
                        help="rewrite the notebooks' parameters cells from cirlib/config.py and exit")
    args = parser.parse_args(argv)
    if args.sync_parameters:
        for p in sync_parameters_cells():
            print(f"updated {p}")
        return 0
    if args.params is None:
        parser.error("a parameters file is required (or --sync-parameters)")
    only = [t for t in args.only.split(",") if t.strip()] or None
    try:
        written = run_batch(args.params, only, args.output_dir, log_output=args.log_output,
                            cell_timeout_s=args.cell_timeout)
    except BatchError as e:
        print(f"batch failed: {e}", file=sys.stderr)
        return 1
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
