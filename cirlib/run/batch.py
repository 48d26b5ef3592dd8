"""Run the numbered notebooks in order through papermill with one YAML of parameters.

    python -m cirlib.batch params/demo.yaml [--only 01,02] [--output-dir DIR]

The YAML's top-level keys are offered to every notebook; each notebook receives only the names its `parameters` cell
declares (read with `papermill.inspect_notebook`). Other top-level keys the batch itself reads:

    batch_name: demo              # executed copies go to outputs/runs/<batch_name>/ (default: the YAML file's stem)
    run_name_stage1: s1           # -> run_name of the Stage1Config notebooks, stage1_run of the others
    run_name_stage2: s2           # -> run_name of the Stage2Config notebooks, stage2_run of the AnalysisConfig ones
    notebooks:                    # per-notebook overrides, keyed by file stem or its number
      01_stage1_train: {epochs: 3}
    world: {...}                  # synthetic-world settings for `cirlib.demo`; ignored here

The two run-name keys exist because Stage1Config and Stage2Config both call their own run `run_name`: one top-level
`run_name` cannot name both runs of a batch. A key that no notebook declares is an error (a typo would otherwise be
silently dropped). Executed copies never overwrite the sources; the first failing notebook stops the batch.
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
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from cirlib import paths
from cirlib.workbook.config import AnalysisConfig, DataConfig, Stage1Config, Stage2Config

# Keys the batch consumes itself (never forwarded as such).
BATCH_KEYS = ("batch_name", "notebooks", "run_name_stage1", "run_name_stage2", "world")
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


def declared_parameters(notebook: Path) -> dict[str, str]:
    """Names assigned in a notebook's `parameters` cell and their annotated type names (papermill's inference)."""
    import papermill

    declared = {name: p["inferred_type_name"] for name, p in papermill.inspect_notebook(str(notebook)).items()}
    if not declared:
        raise BatchError(f"{notebook.name}: no cell tagged 'parameters' (or it assigns nothing)")
    return declared


# Values a YAML may give for each annotated type; an int is a fine float, a bool is not an int.
_ACCEPTS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def check_types(nb: Path, declared: Mapping[str, str], chosen: Mapping[str, Any]) -> None:
    """Refuse parameter values whose type does not match the notebook's annotation (e.g. YAML's string "2e-5")."""
    wrong = []
    for name, value in chosen.items():
        kinds = _ACCEPTS.get(declared.get(name, ""))
        if kinds is None:
            continue  # an unannotated or unusual type: papermill passes it through unchecked
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            wrong.append(f"{name}={value!r} ({type(value).__name__}, expected {declared[name]})")
    if wrong:
        raise BatchError(f"{nb.name}: wrongly typed parameters: {'; '.join(wrong)} "
                         "(YAML reads 2e-5 as a string: write 2.0e-5)")


def config_class(declared: Sequence[str]) -> type | None:
    """The config dataclass whose fields are exactly the declared names, or None."""
    for cls in (DataConfig, Stage1Config, Stage2Config, AnalysisConfig):
        if {f.name for f in dataclasses.fields(cls)} == set(declared):
            return cls
    return None


def _run_name_aliases(cls: type | None, params: Mapping[str, Any]) -> dict[str, Any]:
    """What run_name_stage1 / run_name_stage2 mean for a notebook fed by `cls`."""
    s1, s2 = params.get("run_name_stage1"), params.get("run_name_stage2")
    targets: dict[str, Any] = {}
    if cls is Stage1Config:
        targets["run_name"] = s1
    elif cls is Stage2Config:
        targets.update(run_name=s2, stage1_run=s1)
    elif cls is AnalysisConfig:
        targets.update(stage1_run=s1, stage2_run=s2)
    return {k: v for k, v in targets.items() if v is not None}


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


def _section_for(sections: Mapping[str, Any], notebook: Path) -> dict[str, Any]:
    number = notebook.stem.split("_", 1)[0]
    merged: dict[str, Any] = {}
    for key in (number, notebook.stem):  # the full stem wins over the bare number
        value = sections.get(key)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise BatchError(f"notebooks.{key} must be a mapping of parameter: value, got {type(value).__name__}")
        merged.update(value)
    return merged


def plan_batch(params: Mapping[str, Any], notebooks: Sequence[Path]) -> dict[Path, dict[str, Any]]:
    """The parameters each notebook receives; checks every key is declared by some notebook.

    Args:
        params: the YAML mapping (top-level keys + the batch keys in BATCH_KEYS).
        notebooks: the notebooks to run (validation of keys is against all numbered notebooks beside them).
    """
    sections = params.get("notebooks") or {}
    if not isinstance(sections, Mapping):
        raise BatchError(f"'notebooks' must map notebook names to parameter mappings, got {type(sections).__name__}")
    # YAML reads an unquoted 01 as the int 1: key 1 means notebook "01"
    sections = {(f"{k:02d}" if isinstance(k, int) else str(k)): v for k, v in sections.items()}
    if "run_name" in params and ("run_name_stage1" in params or "run_name_stage2" in params):
        raise BatchError("give either run_name or run_name_stage1/run_name_stage2 at the top level, not both")
    folder = notebooks[0].parent if notebooks else paths.NOTEBOOKS
    everything = {p: declared_parameters(p) for p in notebook_paths(folder)}
    known = {n for names in everything.values() for n in names}
    unknown = sorted(k for k in params if k not in BATCH_KEYS and k not in known)
    if unknown:
        raise BatchError(f"parameters {unknown} are declared by no notebook in {folder}")
    stems = {p.stem for p in everything} | {p.stem.split("_", 1)[0] for p in everything}
    bad_sections = sorted(str(k) for k in sections if str(k) not in stems)
    if bad_sections:
        raise BatchError(f"notebooks: {bad_sections} name no notebook; have {sorted(p.stem for p in everything)}")

    plan: dict[Path, dict[str, Any]] = {}
    for nb in notebooks:
        declared = everything.get(nb) or declared_parameters(nb)
        section = _section_for(sections, nb)
        undeclared = sorted(k for k in section if k not in declared)
        if undeclared:
            raise BatchError(f"notebooks.{nb.stem}: {undeclared} are not parameters of {nb.name} "
                             f"(it has {list(declared)})")
        chosen = {k: v for k, v in params.items() if k in declared and k not in BATCH_KEYS}
        chosen.update(_run_name_aliases(config_class(declared), params))
        chosen.update(section)
        check_types(nb, declared, chosen)
        plan[nb] = chosen
    return plan


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
        notebooks: numbers or stems to run (e.g. ["01", "02_stage1_topk"]); None = all, in order.
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
    selected = _select(sources, notebooks)
    out = Path(output_dir) if output_dir is not None else paths.OUTPUTS / "runs" / name
    if not out.is_absolute():
        out = paths.REPO_ROOT / out
    if out.resolve() == sources[0].parent.resolve():
        raise BatchError(f"output_dir {out} is the notebook folder: executed copies must not overwrite the sources")
    plan = plan_batch(data, selected)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for nb, nb_params in plan.items():
        target = out / nb.name
        print(f"[batch] {nb.name} -> {target} with {nb_params}", flush=True)
        try:
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
