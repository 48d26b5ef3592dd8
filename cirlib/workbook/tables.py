"""The paper's tables from the runs under an outputs root (notebook 11, `python -m cirlib.tables`).

`collect` reads every folder under `<outputs>/stage1/` and `<outputs>/stage2/` (the layout is `cirlib.run_folder`'s)
into one pandas table, one row per result and stage:

- a finished stage-I run: its final validation (`metrics.json`: the full gallery ranked, K "all");
- a finished and evaluated stage-II run: stage I and stage II on the same queries (`metrics.json` of notebook 04:
  stage I's top K and stage II's re-ranking of it), one row each;
- CIRCO results (`circo/metrics_<name>.json` of notebook 09) in either run folder, one row per stage.

Each row holds the run, dataset, split, stage, K, fusion weight, query count, the metrics (one column each, with the
paper's "Avg"), the git commit that made the numbers and the weights' sha256 (from the provenance records). A folder
that is not finished, is damaged, or whose metrics were measured on other weights than its model is listed in
`Collection.skipped` with the reason, never left out silently.

`paper_tables` turns the rows into one table per dataset, with the columns the dataset class declares
(`Dataset.table_columns`: CIRR's R@1/5/10/50, Rs@1/2/3, Avg; FashionIQ's R@10/R@50 per category, their means, Avg),
published rows first (`published_results.yaml` beside this module, each citing its source), then ours, stage I beside
stage II. `write_tables` writes each as Markdown, LaTeX (booktabs) and CSV; every row names the run folder and commit
it came from (Markdown: a relative link; LaTeX: a reference under the table; CSV: columns).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import yaml

from cirlib import paths, provenance
from cirlib.data.dataset import get_dataset
from cirlib.data.readers import DatasetError
from cirlib.run_folder import CIRCO_DIR, STAGES, RunFolder, outputs_root
from cirlib.workbook.config import TABLE_FORMATS, TablesConfig, identity, split_list

PUBLISHED_FILE = Path(__file__).with_name("published_results.yaml")
FORMATS = TABLE_FORMATS
SUFFIX = {"md": ".md", "latex": ".tex", "csv": ".csv"}
ROWS_FILE = "tables_runs.csv"  # every collected row, all metric columns (beside the per-dataset tables)
SKIPPED_FILE = "tables_skipped.csv"
PROVENANCE_FILE = "tables.provenance.json"
# the collected table's leading columns; one column per metric follows
ROW_FIELDS = ("run", "stage", "dataset", "split", "k", "fusion", "queries", "stage1_run", "stage2_run", "commit",
              "dirty", "weights_sha256", "data_root", "run_path", "metrics_file")
FULL_RANKING = "all"  # K of a stage-I validation: the whole gallery ranked


class TablesError(ValueError):
    """The published-results file or the settings cannot be used (the message names the file or field)."""


class _Skip(Exception):
    """Why a run folder (or one of its result files) is not in the tables."""


@dataclass(frozen=True)
class Collection:
    """Every finished result under an outputs root, and every folder left out with why."""

    root: Path  # the outputs root read
    rows: pd.DataFrame  # ROW_FIELDS, then one column per metric (NaN where a result has none)
    skipped: pd.DataFrame  # run_path, reason

    def metrics_files(self) -> list[Path]:
        return sorted({Path(p) for p in self.rows["metrics_file"]}) if len(self.rows) else []


# ------------------------------------------------------------------------------------------------------- reading


def _read(path: Path, what: str) -> dict[str, Any]:
    try:
        record = paths.read_json(path, what)
    except (OSError, ValueError) as err:
        raise _Skip(f"damaged: {err}") from None
    if not isinstance(record, dict):
        raise _Skip(f"damaged: {path} holds {type(record).__name__}, expected a JSON object ({what})")
    return record


def _completion(run: RunFolder) -> dict[str, Any]:
    """The completion record of a finished run (the run folder's definition of finished, for any config)."""
    if not run.completion_file.is_file():
        raise _Skip(f"unfinished: no {run.completion_file.name} (training has not finished, was interrupted, or "
                    "was started again)")
    done = _read(run.completion_file, "completion record")
    if not run.model_dir.is_dir():
        raise _Skip(f"damaged: {run.completion_file.name} is there but the model folder {run.model_dir} is not")
    if not isinstance(done.get("config"), dict) or not done["config"].get("dataset"):
        raise _Skip(f"damaged: {run.completion_file} holds no config naming its dataset")
    return done


def _code(record: Mapping[str, Any] | None) -> tuple[str | None, bool | None]:
    code = (record or {}).get("code") or {}
    return code.get("commit"), code.get("dirty")


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics (CIRCO's per-aspect semantic mAP, a mapping, is left to its own file)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _with_average(dataset: str, metrics: Mapping[str, float]) -> dict[str, float]:
    out = dict(metrics)
    average = get_dataset(dataset).table_average(out)
    if average is not None:
        out["Avg"] = average
    return out


def _queries(record: Mapping[str, Any]) -> int | None:
    if isinstance(record.get("queries"), int):
        return record["queries"]
    counts = record.get("query_counts") or {}
    evaluated = [c.get("evaluated") for c in counts.values() if isinstance(c, dict)]
    return sum(evaluated) if evaluated and all(isinstance(e, int) for e in evaluated) else None


def _data_root(record: Mapping[str, Any] | None, config: Mapping[str, Any]) -> str:
    root = ((record or {}).get("data") or {}).get("root") or config.get("data_root") or ""
    return _shown(Path(root)) if root else ""


def _shown(path: Path) -> str:
    """A path relative to the repository when inside it (how the README names outputs), else absolute."""
    try:
        return Path(path).resolve().relative_to(paths.REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def _stage1_name(config: Mapping[str, Any]) -> str:
    checkpoint = config.get("stage1_checkpoint") or ""
    return Path(checkpoint).name if checkpoint else str(config.get("stage1_run", ""))


STAGE_LABEL = {"stage1": "I", "stage2": "II"}


def _row(folder: RunFolder, metrics_file: Path, made_by: Mapping[str, Any] | None, config: Mapping[str, Any],
         dataset: str, metrics: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """One collected row: where it comes from (`folder`, the file, its provenance record), the given fields (run,
    stage, split, k, ...), the metrics with "Avg"."""
    commit, dirty = _code(made_by)
    return {"dataset": dataset, "commit": commit, "dirty": dirty, "data_root": _data_root(made_by, config),
            "run_path": str(folder.path), "metrics_file": str(metrics_file), **fields,
            **_with_average(dataset, _scalars(metrics))}


def _stage1_rows(run: RunFolder) -> list[dict[str, Any]]:
    """A stage-I run's final validation (the full gallery ranked)."""
    done = _completion(run)
    if not run.evaluation_file.is_file():
        raise _Skip(f"finished, but its final validation {run.evaluation_file.name} is missing")
    record = _read(run.evaluation_file, "stage-I validation record")
    if record.get("weights_sha256") != done.get("weights_sha256"):
        raise _Skip(f"stale: {run.evaluation_file.name} was measured on other weights than the run's model "
                    f"({str(record.get('weights_sha256'))[:12]} vs {str(done.get('weights_sha256'))[:12]})")
    if not isinstance(record.get("final"), dict):
        raise _Skip(f"damaged: {run.evaluation_file} holds no 'final' metrics")
    config = done["config"]
    return [_row(run, run.evaluation_file, record.get("provenance"), config, config["dataset"], record["final"],
                 run=run.name, stage="I", split=record.get("split", ""), k=FULL_RANKING, fusion=None,
                 queries=_queries(record), stage1_run=run.name, stage2_run="",
                 weights_sha256=record.get("weights_sha256"))]


def _stage2_rows(run: RunFolder) -> list[dict[str, Any]]:
    """A stage-II run's evaluation: stage I (its top K) and stage II (the re-ranking) on the same queries."""
    done = _completion(run)
    if not run.evaluation_file.is_file():
        raise _Skip(f"trained but not evaluated: no {run.evaluation_file.name} (run notebook 04, or "
                    "`python -m cirlib.launch evaluate`)")
    record = _read(run.evaluation_file, "stage-II evaluation record")
    made = record.get("produced_by") or {}
    if made.get("stage2_weights_sha256") != done.get("weights_sha256"):
        raise _Skip(f"stale: {run.evaluation_file.name} evaluated other weights than the run's model (trained "
                    "again after the evaluation): run notebook 04 again")
    if not all(isinstance(record.get(s), dict) for s in STAGES):
        raise _Skip(f"damaged: {run.evaluation_file} lacks the stage1/stage2 metrics")
    config = done["config"]
    names = {"stage1": _stage1_name(config), "stage2": run.name}
    fusion = {"stage1": None, "stage2": record.get("fusion_weight")}
    return [_row(run, run.evaluation_file, record.get("provenance"), config, config["dataset"], record[stage],
                 run=names[stage], stage=STAGE_LABEL[stage], split=record.get("split", ""), k=record.get("k"),
                 fusion=fusion[stage], queries=_queries(record), stage1_run=names["stage1"], stage2_run=run.name,
                 weights_sha256=made.get(f"{stage}_weights_sha256")) for stage in STAGES]


def _circo_rows(run: RunFolder, path: Path) -> list[dict[str, Any]]:
    """A CIRCO evaluation (notebook 09): stage I ranks the whole gallery, stage II re-ranks its top k."""
    record = _read(path, "CIRCO metrics record")
    made_by = record.get("provenance") or {}
    config, weights = made_by.get("config") or {}, made_by.get("weights") or {}
    dataset = (made_by.get("data") or {}).get("dataset") or ""
    if not dataset or not isinstance(record.get("metrics"), dict) or "stage1" not in record["metrics"]:
        raise _Skip(f"damaged: {path} lacks its dataset or the stage-I metrics")
    names = {stage: Path(str(config.get(f"{stage}_run", ""))).name for stage in STAGES}
    depth = {"stage1": FULL_RANKING, "stage2": (record.get("settings") or {}).get("k")}
    return [_row(run, path, made_by, {}, dataset, metrics, run=names[stage], stage=STAGE_LABEL[stage], split="val",
                 k=depth[stage], fusion=None, queries=record.get("queries"), stage1_run=names["stage1"],
                 stage2_run=names["stage2"], weights_sha256=(weights.get(stage) or {}).get("sha256"))
            for stage, metrics in record["metrics"].items() if stage in STAGE_LABEL]


def _run_rows(stage: str, folder: Path, skipped: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The rows of one run folder; its CIRCO results are read even when the folder itself is skipped."""
    run = RunFolder.at(folder)
    rows: list[dict[str, Any]] = []
    try:
        rows += _stage1_rows(run) if stage == "stage1" else _stage2_rows(run)
    except (_Skip, DatasetError) as why:
        skipped.append({"run_path": str(folder), "reason": str(why)})
    for path in sorted((folder / CIRCO_DIR).glob("metrics_*.json")):
        try:
            rows += _circo_rows(run, path)
        except (_Skip, DatasetError) as why:
            skipped.append({"run_path": str(path), "reason": str(why)})
    return rows


def collect(outputs: str | os.PathLike | None = None, runs: Sequence[str] = ()) -> Collection:
    """Every finished result under the outputs root (see the module docstring), and every folder left out.

    Args:
        outputs: the outputs root ("" or None: <repo>/outputs; relative: from the repository).
        runs: only these run folders (names under stage1/ or stage2/); empty: all of them.
    Raises:
        FileNotFoundError: the outputs root holds neither stage1/ nor stage2/.
    """
    root = outputs_root(outputs)
    if not any((root / s).is_dir() for s in STAGES):
        raise FileNotFoundError(f"{root} holds no run folders (no {' or '.join(f'{s}/' for s in STAGES)}): give the "
                                "outputs root the steps wrote to (their `outputs` setting)")
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for stage in STAGES:
        for folder in sorted(p for p in (root / stage).glob("*") if p.is_dir()):
            if not runs or folder.name in runs:
                rows += _run_rows(stage, folder, skipped)
    table = pd.DataFrame(rows)
    table = table.reindex(columns=[*ROW_FIELDS, *[c for c in table.columns if c not in ROW_FIELDS]])
    return Collection(root, table, pd.DataFrame(skipped, columns=["run_path", "reason"]))


def collect_runs(cfg: TablesConfig) -> Collection:
    """Notebook 11: `collect` with the config's outputs root and run names."""
    return collect(cfg.outputs, split_list(cfg.runs))


# ------------------------------------------------------------------------------------------------------ published


def load_published(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """The published rows (default: the packaged `published_results.yaml`): method, dataset, split, stage, k,
    source, checked, then one column per metric. Each row must cite its source and name a registered dataset."""
    path = Path(path) if path else PUBLISHED_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise TablesError(f"published results {path}: cannot be read ({err})") from err
    entries = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise TablesError(f"published results {path}: expected a mapping with a 'rows' list")
    return pd.DataFrame([_published_row(path, i, e) for i, e in enumerate(entries)])


def _published_row(path: Path, index: int, entry: Any) -> dict[str, Any]:
    where = f"published results {path}, row {index + 1}"
    needed = ("method", "dataset", "split", "source", "checked", "metrics")
    missing = [k for k in needed if not isinstance(entry, dict) or not entry.get(k)]
    if missing:
        raise TablesError(f"{where}: lacks {missing} (each row needs {list(needed)}; the source is what it cites)")
    try:
        get_dataset(entry["dataset"])
    except DatasetError as err:
        raise TablesError(f"{where}: {err}") from None
    metrics = entry["metrics"]
    bad = [k for k, v in metrics.items() if not isinstance(v, (int, float)) or isinstance(v, bool)] if isinstance(
        metrics, dict) else [repr(metrics)]
    if bad:
        raise TablesError(f"{where} ({entry['method']}): metrics must map names to numbers; not numbers: {bad}")
    return {"method": str(entry["method"]), "dataset": entry["dataset"], "split": str(entry["split"]),
            "stage": str(entry.get("stage", "-")), "k": entry.get("k"),
            "source": " ".join(str(entry["source"]).split()), "checked": " ".join(str(entry["checked"]).split()),
            **{k: float(v) for k, v in metrics.items()}}


def published_of(cfg: TablesConfig) -> pd.DataFrame:
    """The published rows the config asks for ("none": no rows)."""
    if cfg.published.strip().lower() == "none":
        return pd.DataFrame(columns=["method", "dataset", "split", "stage", "k", "source", "checked"])
    return load_published(_abs(cfg.published) if cfg.published else None)


# ------------------------------------------------------------------------------------------------------- tables


@dataclass
class PaperTable:
    """One dataset's table: leading columns, metric columns, then one row per result (published ones first).

    Each row holds the LEADING keys, the metric keys and `ref`, where it came from: {"kind": "published", "source",
    "checked"} or {"kind": "run", "path", "commit", "dirty", "data_root", "weights_sha256", "metrics_file"}.
    """

    dataset: str
    title: str
    note: str  # the dataset's `table_note` (how Avg is computed)
    metrics: list[tuple[str, str]]  # (metric key, header)
    rows: list[dict[str, Any]] = field(default_factory=list)
    published_count: int = 0  # the first rows are published ones


LEADING = (("method", "Method"), ("stage", "Stage"), ("split", "Split"), ("k", "K"), ("queries", "N"))


def _cell(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _our_order(row: Mapping[str, Any]) -> tuple:
    # a stage-I run's own validation, then each evaluation of it, stage I beside stage II
    evaluation = 0 if row["stage2_run"] == "" and row["stage"] == "I" and row["k"] == FULL_RANKING else 1
    return (row["stage1_run"], evaluation, row["stage2_run"], row["metrics_file"], row["stage"])


def _our_row(row: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    fusion = _cell(row["fusion"])
    stage = row["stage"] + (f" (fused, w={fusion:g})" if fusion else "")
    return {"method": row["run"], "stage": stage, "split": row["split"], "k": _cell(row["k"]),
            "queries": _cell(row["queries"]), **{k: _cell(row.get(k)) for k in keys},
            "ref": {"kind": "run", "path": row["run_path"], "commit": _cell(row["commit"]),
                    "dirty": bool(_cell(row["dirty"])), "data_root": row["data_root"],
                    "weights_sha256": _cell(row["weights_sha256"]), "metrics_file": row["metrics_file"]}}


def _published_rows(published: pd.DataFrame, dataset: str, keys: Iterable[str]) -> list[dict[str, Any]]:
    chosen = published[published["dataset"] == dataset] if len(published) else published
    return [{"method": r["method"], "stage": r["stage"], "split": r["split"], "k": _cell(r["k"]), "queries": None,
             **{k: _cell(r.get(k)) for k in keys},
             "ref": {"kind": "published", "source": r["source"], "checked": r["checked"]}}
            for r in chosen.to_dict("records")]


def paper_tables(collection: Collection, published: pd.DataFrame) -> list[PaperTable]:
    """One table per dataset with results of ours (published rows of other datasets are not tabled alone)."""
    out = []
    rows = collection.rows.to_dict("records")
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        ds = get_dataset(dataset)
        columns = list(ds.table_columns())
        keys = [k for k, _ in columns]
        ours = sorted((r for r in rows if r["dataset"] == dataset), key=_our_order)
        theirs = _published_rows(published, dataset, keys)
        out.append(PaperTable(dataset, ds.title, ds.table_note, columns,
                              theirs + [_our_row(r, keys) for r in ours], len(theirs)))
    return out


# ----------------------------------------------------------------------------------------------------- rendering


def _number(value: Any) -> str:
    return "" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def _leading(row: Mapping[str, Any]) -> list[str]:
    """Method, stage and split as they are; K and N as integers ("all": the full gallery)."""
    def shown(value: Any) -> str:
        if value is None:
            return ""
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    return [shown(row[k]) for k, _ in LEADING]


def _short(commit: str | None, dirty: bool) -> str:
    return (commit[:7] if commit else "unknown commit") + (" (dirty)" if dirty else "")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _published_ref(ref: Mapping[str, Any]) -> str:
    return f"{ref['source']} [checked: {ref['checked']}]"


def _md_source(ref: Mapping[str, Any], out_dir: Path, refs: dict[str, int]) -> str:
    if ref["kind"] == "published":
        return f"[{refs.setdefault(_published_ref(ref), len(refs) + 1)}]"
    link = Path(os.path.relpath(ref["path"], out_dir)).as_posix()
    shown = _shown(Path(ref["path"]))
    data = f"; data {ref['data_root']}" if ref["data_root"] else ""
    return _md_escape(f"[{shown}]({link}) @ {_short(ref['commit'], ref['dirty'])}{data}")


def to_markdown(table: PaperTable, out_dir: Path) -> str:
    """A Markdown table; each row's source is a link (relative to `out_dir`) to its run folder with the commit, or
    a numbered citation listed under the table."""
    headers = [h for _, h in LEADING] + [h for _, h in table.metrics] + ["Source"]
    align = ["---"] * 3 + ["---:"] * (len(LEADING) - 3 + len(table.metrics)) + ["---"]
    lines = [f"### {table.title}", "", f"{table.note}." if table.note else "", "",
             "| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    refs: dict[str, int] = {}
    for row in table.rows:
        cells = [_md_escape(c) for c in _leading(row)] + [_number(row[k]) or "–" for k, _ in table.metrics]
        lines.append("| " + " | ".join(cells + [_md_source(row["ref"], out_dir, refs)]) + " |")
    if refs:
        lines += ["", *(f"[{n}] {text}  " for text, n in refs.items())]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """Text with LaTeX's special characters escaped (underscores of run names, % and & of citations, ...)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _latex_ref(ref: Mapping[str, Any]) -> str:
    if ref["kind"] == "published":
        return latex_escape(_published_ref(ref))
    weights = f", weights sha256 {ref['weights_sha256'][:12]}" if ref["weights_sha256"] else ""
    data = f", data {ref['data_root']}" if ref["data_root"] else ""
    return (rf"\texttt{{{latex_escape(_shown(Path(ref['path'])))}}}, commit "
            rf"\texttt{{{latex_escape(_short(ref['commit'], ref['dirty']))}}}{latex_escape(data + weights)}")


def to_latex(table: PaperTable) -> str:
    """A booktabs `table` (needs `\\usepackage{booktabs}`): published rows, a \\midrule, ours; the last column numbers
    each row's reference, listed under the tabular (citation, or run folder, commit and weights hash)."""
    refs: dict[str, int] = {}
    body = []
    for i, row in enumerate(table.rows):
        text = _latex_ref(row["ref"])
        number = refs.setdefault(text, len(refs) + 1)
        if i == table.published_count and i > 0:
            body.append(r"\midrule")
        cells = [latex_escape(c) for c in _leading(row)] + [_number(row[k]) or "--" for k, _ in table.metrics]
        body.append(" & ".join(cells + [f"[{number}]"]) + r" \\")
    headers = [h for _, h in LEADING] + [h for _, h in table.metrics] + ["Ref."]
    spec = "l" * 3 + "r" * (len(LEADING) - 3 + len(table.metrics)) + "l"
    caption = f"{table.title}: published results and ours (stage I beside stage II)." + (
        f" {table.note}." if table.note else "")
    return "\n".join([
        "% Made by `python -m cirlib.tables` (cirlib.workbook.tables); needs \\usepackage{booktabs}.",
        r"\begin{table}[htbp]", r"\centering", rf"\caption{{{latex_escape(caption)}}}",
        rf"\label{{tab:cirlib-{latex_escape(table.dataset)}}}", r"\small", rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule", " & ".join(latex_escape(h) for h in headers) + r" \\", r"\midrule", *body, r"\bottomrule",
        r"\end{tabular}", r"\par\smallskip", r"\begin{minipage}{\linewidth}\footnotesize",
        *(f"[{n}] {text}\\par" for text, n in refs.items()), r"\end{minipage}", r"\end{table}", ""])


def to_frame(table: PaperTable) -> pd.DataFrame:
    """The table as a DataFrame (the CSV): the leading columns, the metrics under their headers, then source,
    checked (published rows), run_path, commit, dirty, weights_sha256, data_root (our rows)."""
    out = []
    for row in table.rows:
        ref = row["ref"]
        source = {"source": ref.get("source", ""), "checked": ref.get("checked", ""),
                  "run_path": _shown(Path(ref["path"])) if ref["kind"] == "run" else "",
                  **{k: ref.get(k) for k in ("commit", "dirty", "weights_sha256", "data_root")}}
        leading = dict(zip((h for _, h in LEADING), _leading(row)))
        out.append({**leading, **{h: row[k] for k, h in table.metrics}, **source})
    return pd.DataFrame(out)


# ------------------------------------------------------------------------------------------------------- writing


def _abs(p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else paths.REPO_ROOT / path


def formats_of(text: str) -> list[str]:
    """'md,latex' -> ['md', 'latex']; 'all' -> every format; refuses an unknown name."""
    chosen = list(FORMATS) if text.strip() == "all" else split_list(text)
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise TablesError(f"formats={text!r}: expected some of {', '.join(FORMATS)} (comma-separated) or all")
    return chosen


def out_dir_of(cfg: TablesConfig) -> Path:
    return _abs(cfg.figures_dir) if cfg.figures_dir else paths.FIGURES


def _render(table: PaperTable, fmt: str, out_dir: Path) -> str:
    if fmt == "md":
        return to_markdown(table, out_dir)
    if fmt == "latex":
        return to_latex(table)
    return to_frame(table).to_csv(index=False)


def write_tables(cfg: TablesConfig, collection: Collection | None = None) -> list[Path]:
    """Notebook 11: write `table_<dataset>.{md,tex,csv}` (the formats asked for), and with csv every collected row
    (`tables_runs.csv`) and every folder left out (`tables_skipped.csv`), into `figures_dir`; beside them
    `tables.provenance.json` (the code, the settings and the sha256 of every metrics file read)."""
    formats = formats_of(cfg.formats)
    collection = collection if collection is not None else collect_runs(cfg)
    out_dir = out_dir_of(cfg)
    written = []
    for table in paper_tables(collection, published_of(cfg)):
        for fmt in formats:
            written.append(paths.atomic_write_text(out_dir / f"table_{table.dataset}{SUFFIX[fmt]}",
                                                   _render(table, fmt, out_dir)))
    if "csv" in formats:
        written.append(paths.atomic_write_text(out_dir / ROWS_FILE, collection.rows.to_csv(index=False)))
        written.append(paths.atomic_write_text(out_dir / SKIPPED_FILE, collection.skipped.to_csv(index=False)))
    inputs = {str(p): p for p in collection.metrics_files()}
    record = provenance.record("tables", identity(cfg), inputs=inputs, outputs=collection.root,
                               files=[p.name for p in written], published=str(_abs(cfg.published) if cfg.published
                                                                               else PUBLISHED_FILE))
    paths.write_json(out_dir / PROVENANCE_FILE, record)
    return written


def report(cfg: TablesConfig, collection: Collection) -> str:
    """What the command line prints: every table in Markdown, then the folders left out and why."""
    out_dir = out_dir_of(cfg)
    parts = [to_markdown(t, out_dir) for t in paper_tables(collection, published_of(cfg))]
    if not parts:
        parts.append(f"no finished results under {collection.root}\n")
    if len(collection.skipped):
        parts.append("Left out:\n" + "\n".join(f"- {_shown(Path(r['run_path']))}: {r['reason']}"
                                               for r in collection.skipped.to_dict("records")) + "\n")
    return "\n".join(parts)


def show(cfg: TablesConfig, collection: Collection):
    """Notebook 11: the tables (and what was left out) rendered as Markdown in the notebook."""
    from IPython.display import Markdown

    return Markdown(report(cfg, collection))
