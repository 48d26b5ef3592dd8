"""Re-rank anyone's candidates (notebook 10, `python -m cirlib.rerank`): a ranked list of one split, imported from
another system (or our own top-k file), re-ranked by any stage-II run; imported vs re-ranked metrics and where the
gain comes from (`cirlib.eval.gain`).

The dataset, data root, categories and models are the stage-II run's (its config.json; `data_root` and `categories`
override them). Scoring is `evaluate`'s: the split's `SplitData`, `rerank_galleries`, `retrieval.rerank.rerank`, then
`TopK.reranked(fusion_weight)`, so our own stage-I top-k file re-ranked here gives exactly `steps.evaluate`'s metrics.
Only `load_candidates` (the ranked-list readers: CIRR and CIRCO server JSON, TREC, JSONL, our and the original's
top-k files) knows the candidate file's format; everything after it holds a `TopK`.

Writes into the result folder (`<outputs>/rerank/<name>/`, or `out`; layout: `cirlib.run_folder`): the re-ranked
file per split (`reranked_<split>[_<category>].pt`, top-k format: the K imported candidates in imported order with the
imported `scores` when the file had them and the `stage2_scores`), `metrics.json` (imported vs re-ranked on a
validation split; the ceiling, outcomes, latency, fusion sweep; query counts; the candidate files' sha256; what
produced it), `provenance.json`, and on a test split with a server (CIRR) the server files in `submission/`, checked
by the dataset's validator first. A saved record is reused only when models, candidate files and settings are the
same.

A dataset without `SplitData` (`Dataset.has_split_data` False: CIRCO) takes `rerank_circo`: its split read by
`circo_eval.load_circo` at `data_root`, the candidates imported by `import_candidates` and scored by stage II through
notebook 09's gallery index, lists of 50 (stage II's order of the first k, then the imported order:
`TopK.reranked_then_rest`), the val metrics of the imported and the re-ranked lists with the same analysis (a query's
rank is its best-placed ground truth's; the fusion sweep's best weight by `Dataset.selection_key`, mAP@10), and on
test the server file once `validate_submission` accepts it; a saved record is reused as for `SplitData` splits.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from cirlib import data as cdata
from cirlib import paths, plots, provenance
from cirlib.eval import gain
from cirlib.eval import metrics as M
from cirlib.eval.rank_shift import rank_shift, rank_shift_of_ranks
from cirlib.retrieval.ranked_lists import SplitQueries, import_candidates, read_ranked_lists, split_query_ids
from cirlib.retrieval.rerank import rerank
from cirlib.retrieval.topk import TopK
from cirlib.run_folder import RERANK_STAGE, RunFolder, config_hash, file_sha256, sidecar_file
from cirlib.workbook import circo_eval, search
from cirlib.workbook.bookkeeping import StepBook
from cirlib.workbook.config import CircoConfig, RerankConfig, Stage2TrainConfig, identity, split_list
from cirlib.workbook.evaluation import (EVAL_SPLIT, query_counts, refuse_unsupported, rerank_galleries,
                                        step_sets)
from cirlib.workbook.factories import (abs_path, data_root, dataset_root, device, load_stage2_run, load_stages,
                                       stage1_weights_file)
from cirlib.workbook.steps import SUBMISSION_LENGTH, resolve, stage2_run_config, write_submissions
from cirlib.workbook.stores import provenance_of, stage2_stores

STEP = "rerank"
MISSING_QUERIES = ("error", "drop")


# ------------------------------------------------------------------------------------------------ inputs


def stage2_folder(cfg: RerankConfig) -> RunFolder:
    """The stage-II run: a name under <outputs>/stage2/, or a run folder's path."""
    if "/" in cfg.stage2_run or cfg.stage2_run.startswith("~"):
        return RunFolder.at(abs_path(cfg.stage2_run))
    return RunFolder.of("stage2", cfg.stage2_run, cfg.outputs)


def trained_config(cfg: RerankConfig) -> Stage2TrainConfig:
    """The stage-II run's training config with this config's overrides (data_root, categories)."""
    trained = stage2_run_config(stage2_folder(cfg), cfg.outputs)
    over = {k: getattr(cfg, k) for k in ("data_root", "categories") if getattr(cfg, k)}
    return dataclasses.replace(trained, **over)


def result_folder(cfg: RerankConfig) -> RunFolder:
    """Where the results go: `out`, else <outputs>/rerank/<name> (default <stage2 run>_<split>_<candidates stem>)."""
    if cfg.out:
        return RunFolder.at(abs_path(cfg.out))
    stem = Path(cfg.candidates).stem.replace("{category}", "all") if cfg.candidates else "stage1_topk"
    return RunFolder.of(RERANK_STAGE, cfg.name or f"{stage2_folder(cfg).name}_{cfg.split}_{stem}", cfg.outputs)


def candidate_files(cfg: RerankConfig, trained: Stage2TrainConfig, categories: Sequence[str | None]) -> list[Path]:
    """The candidate file of each category (None: a dataset without categories): `candidates` ({category}
    replaced), else the stage-II run's stage-I top-k file of `cfg.split`."""
    if cfg.candidates:
        return [abs_path(cfg.candidates.replace("{category}", c or "")) for c in categories]
    return [trained.stage1_folder.topk_file(cfg.split, c) for c in categories]


def load_candidates(path: Path, fmt: str, queries: "cdata.SplitData", k: int, missing_queries: str
                    ) -> tuple[TopK, list[int], list[str], list[str]]:
    """The candidates of one split, read in any ranked-list format (`retrieval.ranked_lists`) and checked against the
    split, every problem listed at once: (TopK of the kept queries in split order, its first k names per query; the
    kept rows of `queries`; the ids of the queries dropped for lack of a list; warnings, e.g. references left in).
    """
    lists = read_ranked_lists(path, fmt)
    imported = import_candidates(lists, SplitQueries.from_split(queries), k=k, missing_queries=missing_queries)
    topk = imported.topk
    if lists.topk is not None and lists.topk.group_names is not None and topk.group_names is not None:
        # a top-k file ranks the CIRR subset too (stage I's order, what evaluate reports as its Rsubset): keep it
        topk = dataclasses.replace(topk, group_names=lists.topk.group_names[list(imported.rows)], group_labels=None)
    return topk, list(imported.rows), list(imported.dropped_queries), list(imported.warnings)


def dataset_of(cfg: RerankConfig, trained: Stage2TrainConfig) -> "cdata.Dataset":
    """The dataset the candidates rank: `cfg.dataset`, else the stage-II run's."""
    return cdata.get_dataset(cfg.dataset or trained.dataset)


def _check(cfg: RerankConfig, trained: Stage2TrainConfig) -> "cdata.Dataset":
    ds = dataset_of(cfg, trained)
    problems = []
    if cfg.split not in ds.splits:
        problems.append(f"split={cfg.split!r}: not a {ds.title} split; expected one of {list(ds.splits)}")
    if cfg.missing_queries not in MISSING_QUERIES:
        problems.append(f"missing_queries={cfg.missing_queries!r}: expected one of {MISSING_QUERIES}")
    if not 0.0 <= cfg.fusion_weight <= 1.0:
        problems.append(f"fusion_weight={cfg.fusion_weight}: expected a weight in [0, 1]")
    if cfg.k < 1:
        problems.append(f"k={cfg.k}: expected >= 1")
    try:
        weights = [float(w) for w in split_list(cfg.fusion_sweep)]
        if any(not 0.0 <= w <= 1.0 for w in weights):
            problems.append(f"fusion_sweep={cfg.fusion_sweep!r}: weights must lie in [0, 1]")
    except ValueError:
        problems.append(f"fusion_sweep={cfg.fusion_sweep!r}: expected comma-separated numbers")
    if problems:
        raise ValueError(f"RerankConfig on {ds.name}: " + "; ".join(problems))
    if cfg.split == EVAL_SPLIT and ds.has_split_data:
        refuse_unsupported(cfg, trained.dataset, trained.categories)  # k deep enough for the reported metrics
    return ds


# ------------------------------------------------------------------------------------------------ the step


@dataclass
class RerankResult:
    """Imported vs re-ranked (validation splits), the gain analysis, the files written."""

    imported: dict[str, float]
    reranked: dict[str, float]
    k: int
    out_dir: Path
    record: dict[str, Any]  # metrics.json
    reused: bool = False
    files: dict[str, str] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """Imported vs re-ranked metrics and their difference."""
        df = pd.DataFrame({"imported": _flat(self.imported), "re-ranked": _flat(self.reranked)})
        df["gain"] = df["re-ranked"] - df["imported"]
        return df.round(2)

    def outcome_table(self) -> pd.DataFrame:
        """Per split: the ceiling and how many targets were missing, moved up, moved down, or stayed."""
        analysis = self.record["analysis"]
        rows = {s: {"ceiling": analysis["ceiling"][s], **analysis["outcomes"][s]} for s in analysis["outcomes"]}
        return pd.DataFrame.from_dict(rows, orient="index")

    def summary(self) -> dict[str, Any]:
        """The command line's JSON: imported and re-ranked metrics, the analysis (less its per-query lists), counts,
        files."""
        analysis = {k: v for k, v in self.record["analysis"].items() if k not in ("outcomes_per_query", "rank_shift")}
        return {"imported": self.imported, "reranked": self.reranked, "k": self.k, "split": self.record["split"],
                "analysis": analysis, "query_counts": self.record["query_counts"],
                "warnings": self.record["warnings"], "out": str(self.out_dir), "reused": self.reused,
                "files": self.record.get("files", {})}


def _flat(metrics: dict[str, Any]) -> dict[str, float]:
    """Metrics with nested ones spread out ({"semantic_mAP@10": {"cardinality": x}} -> "semantic_mAP@10 cardinality")."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        out.update({f"{key} {k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    return out


def rerank_any(cfg: RerankConfig) -> RerankResult:
    """Re-rank the imported candidates of `cfg.split` with the stage-II run; write and return the results.

    The dataset says how its split is read (`Dataset.has_split_data`): through `SplitData` (CIRR, FashionIQ,
    plug-ins: `rerank_split`) or, without it, through CIRCO's gallery index (`rerank_circo`).
    """
    cfg = resolve(cfg)
    ds = _check(cfg, trained_config(cfg))
    return (rerank_split if ds.has_split_data else rerank_circo)(cfg)


def rerank_split(cfg: RerankConfig) -> RerankResult:
    """Re-rank a split read as `SplitData` (CIRR, FashionIQ, plug-in datasets).

    A saved record (metrics.json) is returned instead when it was made with the same settings, candidate files
    (content hash), stage-II run config and both models' weights (hash).
    """
    s2 = stage2_folder(cfg)
    trained = trained_config(cfg)
    ds = _check(cfg, trained)
    load_stage2_run(s2)  # refuses an unfinished run before anything is hashed
    root = data_root(trained)
    run = result_folder(cfg)
    limit = cfg.max_val_queries if cfg.split == EVAL_SPLIT else 0
    sets = step_sets(STEP, trained.dataset, root, trained.categories, {cfg.split: limit}, trained.missing_images,
                     run)[cfg.split]
    files = candidate_files(cfg, trained, [sd.category for sd in sets])
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"candidate file(s) not found: {', '.join(missing)}")
    book = StepBook(STEP, run)

    def produced_by() -> dict[str, Any]:
        # the candidates by content (a copy elsewhere is the same input), the models by weights
        return {"settings": {k: v for k, v in identity(cfg).items() if k not in ("candidates", "name", "out")},
                "stage2_config_hash": config_hash(s2.saved_config()),
                "stage1_weights_sha256": file_sha256(stage1_weights_file(trained)),
                "stage2_weights_sha256": file_sha256(s2.weights_file),
                "candidates_sha256": [file_sha256(p) for p in files],
                # only when images were dropped (records made from complete data stay valid)
                **({"query_counts": query_counts(sets, run)} if any(sd.dropped for sd in sets) else {})}

    saved = book.reuse_evaluation(produced_by, overwrite=cfg.overwrite)
    if saved is not None:
        return RerankResult(saved["imported"], saved["reranked"], saved["k"], run.path, saved, reused=True)
    book.check_writable(f"re-ranking folder {run.path}")
    with book.locked():
        return _rerank_and_write(cfg, book, ds, trained, s2, root, sets, files, produced_by)


@dataclass
class _Split:
    """One split (category) re-ranked: its kept queries, the imported and the scored candidates."""

    sd: "cdata.SplitData"
    imported: TopK
    scored: TopK
    dropped: list[str]
    warnings: list[str]

    @property
    def name(self) -> str:
        return self.sd.category or self.sd.split

    def reranked(self, fusion_weight: float) -> TopK:
        return self.scored.reranked(fusion_weight)


def _score_splits(cfg: RerankConfig, trained: Stage2TrainConfig, s2: RunFolder, sets, files: list[Path], dev
                  ) -> tuple[list[_Split], float, Any]:
    """Import and re-rank every split; returns the splits, the seconds spent re-ranking, and the stores used."""
    stage1, tok, stage2 = load_stages(trained, s2)
    stage1.to(dev)
    stage2.to(dev)
    ds = cdata.get_dataset(trained.dataset)
    # a test server needs whole lists: the first k re-ranked, the rest in the imported order
    depth = max(cfg.k, SUBMISSION_LENGTH) if cfg.split == ds.test_split and ds.has_test_server else cfg.k
    loaded = [load_candidates(p, cfg.format, sd, depth, cfg.missing_queries) for p, sd in zip(files, sets)]
    kept = [dataclasses.replace(sd, queries=[sd.queries[i] for i in rows]) for sd, (_, rows, _, _) in zip(sets, loaded)]
    store, zt_store = stage2_stores(stage1, stage2, trained.feature_store, kept, target_ratio=trained.target_ratio,
                                    outputs=cfg.outputs, device=dev)
    transform = cdata.targetpad_transform(trained.target_ratio, stage2.config.vision.image_size)
    out, seconds = [], 0.0
    for sd, (tk, _, dropped, warnings) in zip(kept, loaded):
        gallery, zt_gallery = rerank_galleries(stage1, stage2, sd, transform, store, zt_store, dev)
        t0 = time.perf_counter()
        scored = rerank(stage1, stage2, tok, sd, tk, gallery, k=cfg.k, fusion_weight=cfg.fusion_weight,
                        zt_gallery=zt_gallery, max_pairs=cfg.max_pairs, scoring=cfg.scoring, device=dev,
                        provenance={"run": s2.name})
        seconds += time.perf_counter() - t0
        out.append(_Split(sd, tk, scored, dropped, warnings))
    return out, seconds, (store, zt_store)


def _metrics(ds: "cdata.Dataset", splits: list[_Split], k: int, ordered) -> dict[str, float]:
    """The dataset's summary metrics of `ordered(split)` -> (labels (N, k'), group labels or None) per split."""
    ks = [x for x in ds.reported_ks if x <= k]
    per = []
    for s in splits:
        labels, group = ordered(s)
        per.append((s.sd.category, ds.split_metrics(M.recall_at_k(labels, ks), group)))
    return ds.summary_metrics(per)


def _has_labels(splits: list[_Split]) -> bool:
    return all(s.imported.labels is not None for s in splits)


def _analysis(cfg: RerankConfig, ds, splits: list[_Split], seconds: float) -> dict[str, Any]:
    """Ceiling, outcomes (counts and per query), latency and, with imported scores, the fusion sweep."""
    queries = sum(len(s.sd.queries) for s in splits)
    out: dict[str, Any] = {"latency_ms_per_query": 1000.0 * seconds / max(queries, 1), "rerank_seconds": seconds,
                           "ceiling": {}, "outcomes": {}, "outcomes_per_query": {}, "fusion_sweep": None}
    if not _has_labels(splits):
        return out
    for s in splits:
        before = gain.first_ranks(s.scored.labels.numpy())
        after = gain.first_ranks(s.reranked(cfg.fusion_weight).labels.numpy())
        labels = gain.outcomes(before, after)
        out["ceiling"][s.name] = gain.ceiling(gain.first_ranks(s.imported.labels.numpy()), cfg.k)
        out["outcomes"][s.name] = gain.outcome_counts(labels)
        out["outcomes_per_query"][s.name] = dict(zip(split_query_ids(s.sd), labels.tolist()))
    weights = [float(w) for w in split_list(cfg.fusion_sweep)]
    if weights and all(s.scored.scores is not None for s in splits):
        def score(w: float) -> dict[str, float]:
            def ordered(s: _Split):
                order = gain.fused_order(s.scored.scores.numpy(), s.scored.stage2_scores.numpy(), w)
                res = s.reranked(cfg.fusion_weight)  # the subset is ranked by stage II alone, at any weight
                return np.take_along_axis(s.scored.labels.numpy(), order, axis=1), res.group_labels
            return _metrics(ds, splits, cfg.k, ordered)
        out["fusion_sweep"] = gain.fusion_sweep(weights, score, ds.selection_key).to_dict()
    return out


def _counts(sets, splits: list[_Split], run: RunFolder) -> dict[str, Any]:
    """`query_counts` of the split with the queries the candidate file lacked (dropped) taken out."""
    counts = query_counts(sets, run)
    for split, c in counts.items():
        lacked = sum(len(s.dropped) for s in splits if s.sd.split == split)
        c["evaluated"] -= lacked
        c["missing_from_candidates"] = lacked
        c["dropped_from_candidates"] = [qid for s in splits if s.sd.split == split for qid in s.dropped]
    return counts


def _rerank_and_write(cfg: RerankConfig, book: StepBook, ds, trained: Stage2TrainConfig, s2: RunFolder, root: Path,
                      sets, files: list[Path], produced_by) -> RerankResult:
    run, dev = book.run, device()
    splits, seconds, stores = _score_splits(cfg, trained, s2, sets, files, dev)
    made_by = book.on_main(lambda: book.record(
        cfg, sets, dataset=trained.dataset, root=root, preset=trained.preset, precision="fp32", seed=None,
        inputs={f"candidates_{i}": p for i, p in enumerate(files)},
        weights={"stage1": stage1_weights_file(trained), "stage2": s2.weights_file},
        stage2_config=identity(trained), candidates_sha256={str(p): file_sha256(p) for p in files},
        **provenance_of(*stores)))
    imported = reranked = {}
    if _has_labels(splits):
        imported = _metrics(ds, splits, cfg.k, lambda s: (s.scored.labels.numpy(), s.imported.group_labels))
        reranked = _metrics(ds, splits, cfg.k, lambda s: (s.reranked(cfg.fusion_weight).labels.numpy(),
                                                          s.reranked(cfg.fusion_weight).group_labels))
    record = {"imported": imported, "reranked": reranked, "k": cfg.k, "split": cfg.split,
              "fusion_weight": cfg.fusion_weight, "scoring": cfg.scoring, "format": cfg.format,
              "stage2_run": s2.name, "candidates": [str(p) for p in files],
              "queries": sum(len(s.sd.queries) for s in splits), "query_counts": _counts(sets, splits, run),
              "analysis": _analysis(cfg, ds, splits, seconds),
              "warnings": [w for s in splits for w in s.warnings], "produced_by": produced_by(), "provenance": made_by}

    def write() -> dict[str, Any]:
        written = {s.name: str(dataclasses.replace(s.scored, produced_by=made_by).save(
            run.reranked_file(s.sd.split, s.sd.category))) for s in splits}
        if cfg.split == ds.test_split and ds.has_test_server:
            written.update({k: str(p) for k, p in _server_files(cfg, splits, run).items()})
        if any(s.dropped for s in splits):
            written["dropped_queries"] = str(_record_lacking(run, [(s.sd.split, s.sd.category, s.dropped) for s in splits]))
        paths.write_json(run.provenance_file, made_by)
        paths.write_json(run.evaluation_file, {**record, "files": written})
        return {**record, "files": written}

    saved = book.write(write, share=True)
    return RerankResult(imported, reranked, cfg.k, run.path, saved, files=saved["files"])


def _record_lacking(run: RunFolder, lacking: list[tuple[str, str | None, list[str]]]) -> Path:
    """Add the queries the candidate file lacked (missing_queries="drop"; (split, category, query ids) each) to the
    folder's dropped-queries record, beside any images dropped (`record_dropped`), under "rerank_candidates"."""
    path = run.dropped_queries_file
    record = paths.read_json(path, "dropped-queries record") if path.exists() else {}
    record[f"{STEP}_candidates"] = {"missing_queries": "drop", "splits": [
        {"split": split, "category": category, "queries_dropped": len(ids), "query_ids": ids}
        for split, category, ids in lacking]}
    return paths.write_json(path, record)


def _server_files(cfg: RerankConfig, splits: list[_Split], run: RunFolder) -> dict[str, Path]:
    """The test server's files of the re-ranked lists (the first k re-ranked, then the imported order), checked by
    the dataset's validator before they count as written."""
    (s,) = splits  # a dataset with a test server has no categories (CIRR)
    if s.dropped or s.sd.dropped is not None:
        raise ValueError(f"refusing to write the {s.sd.split} server files: {len(s.dropped)} queries lack candidates "
                         "and the server scores every query; import a complete file")
    if s.imported.k < SUBMISSION_LENGTH:
        raise ValueError(f"the server needs {SUBMISSION_LENGTH} names per query, the candidate file holds "
                         f"{s.imported.k}")
    lists = s.scored.reranked_then_rest(s.imported, cfg.fusion_weight, SUBMISSION_LENGTH)
    group = s.reranked(cfg.fusion_weight).group_names[:, :3]
    return write_submissions(s.sd, {"reranked": (run.name, lists, group)},
                              run.submission_dir)


# ------------------------------------------------------------------------------------------------ the notebook


def rank_shift_panels(result: RerankResult) -> list[Any]:
    """Figure 8's panel of each split: how the re-ranking moved the imported lists' targets (from the saved files;
    with several ground truths per query, CIRCO, from the ranks of the best-placed one the record holds)."""
    figs = []
    for name, ranks in result.record["analysis"].get("rank_shift", {}).items():
        shift = rank_shift_of_ranks(np.asarray(ranks["imported"]), np.asarray(ranks["reranked"]), ranks["k"])
        figs.append(plots.plot_rank_shift(shift, title=f"{name}: imported -> re-ranked (best-placed ground truth)"))
    fusion_weight = result.record["fusion_weight"]
    for name, path in result.record.get("files", {}).items():
        if not str(path).endswith(".pt"):
            continue
        scored = TopK.load(path)
        if scored.labels is None:
            continue
        after = scored.reranked(fusion_weight)
        figs.append(plots.plot_rank_shift(rank_shift(scored.labels, after.labels), title=f"{name}: imported -> re-ranked"))
    return figs


def plot_fusion_sweep(result: RerankResult) -> Any:
    """Metrics against the fusion weight (None without a sweep: the imported file had no scores)."""
    sweep = result.record["analysis"].get("fusion_sweep")
    if not sweep:
        print("no fusion sweep: the candidate file holds no scores")
        return None
    return plots.plot_fusion_sweep(sweep["weights"], sweep["metrics"], best=sweep["best_weight"])


def check_inputs(cfg: RerankConfig) -> pd.DataFrame:
    """What the step reads and whether it exists (stops early, naming what is missing and what makes it)."""
    s2 = stage2_folder(cfg)
    if not s2.completion_file.is_file():
        raise FileNotFoundError(f"stage-II run: {s2.completion_file} missing (made by 03_stage2_train)")
    trained = trained_config(cfg)
    categories = cdata.get_dataset(trained.dataset).split_categories(trained.categories)
    rows = [("stage-II run", s2.completion_file)]
    for category, path in zip(categories, candidate_files(cfg, trained, categories)):
        rows.append((f"candidates{' ' + category if category else ''}", path))
    table = pd.DataFrame(rows, columns=["input", "path"])
    table["exists"] = [Path(p).is_file() for p in table["path"]]
    missing = table[~table["exists"]]
    if len(missing):
        raise FileNotFoundError(f"{len(missing)} input(s) missing (a stage-I top-k file is made by 02_stage1_topk):\n"
                                + "\n".join(f"  {r.input}: {r.path}" for r in missing.itertuples()))
    return table


# ------------------------------------------------------------------------------------------------ through an index


@dataclass
class _IndexSplit:
    """A split without `SplitData` (CIRCO) re-ranked through its gallery index."""

    data: Any  # circo_eval.CircoSplit, its queries the ones the candidate file has a list for
    imported: TopK  # the first max(k, 50) imported names per query, split order
    scored: TopK  # its first k with the stage-II scores
    seconds: float
    dropped: list[str]  # ids of the queries the file lacked (missing_queries="drop")
    warnings: list[str]

    def lists(self, names: np.ndarray) -> dict[int, list[int]]:
        """{query id: the first 50 image ids of `names`} (the server's lists)."""
        gallery = self.data.gallery
        return {q.id: [gallery.id_of(n) for n in row[:circo_eval.LIST_LENGTH]]
                for q, row in zip(self.data.queries, names.tolist())}

    def final_names(self, fusion_weight: float) -> np.ndarray:
        """Stage II's order of the first k, then the imported order: the server's 50 names per query."""
        return self.scored.reranked_then_rest(self.imported, fusion_weight, circo_eval.LIST_LENGTH)

    def first_ranks(self, names: np.ndarray) -> np.ndarray:
        """(N,) 0-based rank of each query's best-placed ground truth in `names` (-1: none)."""
        gallery = self.data.gallery
        return gain.first_ranks(np.array([[gallery.id_of(n) in set(q.gt_img_ids) for n in row]
                                          for q, row in zip(self.data.queries, names.tolist())], dtype=bool))


def _circo_index(cfg: RerankConfig, trained: Stage2TrainConfig, data: Any) -> Any:
    """The gallery index of notebook 09 (`circo_eval.default_index`), built or updated with the run's stage I."""
    circo_cfg = CircoConfig(circo_root=str(data.root), stage1_run=trained.stage1_run, index=cfg.index,
                            outputs=cfg.outputs)
    folder = circo_eval.default_index(circo_cfg)
    search.index_folder(str(data.gallery.image_dir), trained.stage1_run, str(folder), files=data.gallery.names,
                        batch_size=circo_cfg.batch_size, outputs=cfg.outputs)
    return search.open_index(folder)


def _score_index_split(cfg: RerankConfig, ds: "cdata.Dataset", trained: Stage2TrainConfig, data: Any, file: Path
                       ) -> _IndexSplit:
    """Import the candidate file (lists of at least max(k, 50); queries without one dropped when
    `missing_queries` says so) and score the first k with stage II."""
    depth = max(cfg.k, circo_eval.LIST_LENGTH)
    lists = read_ranked_lists(file, cfg.format)
    queries = SplitQueries.from_circo(data.queries, list(data.gallery.names), cfg.split)
    got = import_candidates(lists, queries, k=depth, missing_queries=cfg.missing_queries)
    imported, data = got.topk, dataclasses.replace(data, queries=[data.queries[i] for i in got.rows])
    idx = _circo_index(cfg, trained, data)
    head = imported.sorted_index_names[:, :cfg.k]
    absent = sorted({n for n in head.ravel().tolist() if n not in idx})
    if absent:
        raise ValueError(f"{file}: {len(absent)} candidate image(s) are not in the gallery index {idx.out_dir} "
                         f"(first: {absent[0]}); its report.json lists the files it could not read")
    refs = [cdata.load_image(idx.path(data.gallery.name(q.reference_img_id))) for q in data.queries]
    texts = [ds.ranking_text(q) for q in data.queries]
    rows = torch.as_tensor([[idx.positions[n] for n in row] for row in head.tolist()], dtype=torch.long)
    s2 = search.load_stage2(cfg.stage2_run, outputs=cfg.outputs)
    t0 = time.perf_counter()
    scores = search.stage2_scores(idx, s2, refs, texts, rows, device(), CircoConfig.batch_size,
                                  cfg.scoring, cfg.max_pairs, "ondemand")
    seconds = time.perf_counter() - t0
    first = None if imported.scores is None else imported.scores[:, :cfg.k]  # TREC / JSONL scores: the fusion
    scored = dataclasses.replace(imported, sorted_index_names=head, scores=first, stage2_scores=scores.float())
    return _IndexSplit(data, imported, scored, seconds, list(got.dropped_queries), list(got.warnings))


def _refuse_index_config(cfg: RerankConfig, ds: "cdata.Dataset") -> None:
    """What a split read through an index cannot do: no candidate file, or queries dropped from a test split."""
    if not cfg.candidates:
        raise ValueError(f"RerankConfig on {ds.title}: candidates is empty; expected a ranked-list file")
    if cfg.split == ds.test_split and cfg.missing_queries == "drop":
        raise ValueError(f"RerankConfig on {ds.title}: missing_queries='drop' on the {cfg.split} split: the server "
                         "scores every query, so the file needs a list for each (missing_queries='error' names "
                         "the ones it lacks)")


def rerank_circo(cfg: RerankConfig) -> RerankResult:
    """Re-rank imported candidates of a split without `SplitData` (CIRCO) through its gallery index.

    The split is read by `circo_eval.load_circo` at `data_root`; the candidate file (lists of at least max(k, 50)
    gallery images; every query, or on val `missing_queries="drop"` leaves queries without one out, recorded) is
    imported by `import_candidates`; stage II scores its first k with the references and candidates of notebook
    09's gallery index (`index`, built when missing); the final lists are 50 long: stage II's order of the first k,
    then the imported order. Val: the dataset's metrics of the imported and the re-ranked lists and the analysis;
    test: the server file, written once `validate_submission` accepts it. A saved record is returned instead when
    it was made with the same settings, candidate file (content hash), annotation file, stage-II run config and
    both models' weights (hash).
    """
    s2 = stage2_folder(cfg)
    trained = stage2_run_config(s2, cfg.outputs)
    ds = _check(cfg, trained)
    _refuse_index_config(cfg, ds)
    load_stage2_run(s2)  # refuses an unfinished run before anything is hashed
    (file,) = candidate_files(cfg, trained, [None])
    if not file.is_file():
        raise FileNotFoundError(f"candidate file not found: {file}")
    data = circo_eval.load_circo(dataset_root(cfg.data_root), cfg.split)
    if cfg.split == ds.eval_split and cfg.max_val_queries:
        data = dataclasses.replace(data, queries=data.queries[:cfg.max_val_queries])
    run = result_folder(cfg)
    book = StepBook(f"{STEP}_{ds.name}", run)

    def produced_by() -> dict[str, Any]:
        return {"settings": {k: v for k, v in identity(cfg).items() if k not in ("candidates", "name", "out")},
                "stage2_config_hash": config_hash(s2.saved_config()),
                "stage1_weights_sha256": file_sha256(stage1_weights_file(trained)),
                "stage2_weights_sha256": file_sha256(s2.weights_file),
                "candidates_sha256": [file_sha256(file)], "annotations_sha256": file_sha256(data.annotation_file)}

    saved = book.reuse_evaluation(produced_by, overwrite=cfg.overwrite)
    if saved is not None:
        return RerankResult(saved["imported"], saved["reranked"], saved["k"], run.path, saved, reused=True)
    book.check_writable(f"re-ranking folder {run.path}")
    with book.locked():
        return _rerank_index_and_write(cfg, ds, trained, s2, data, file, run, produced_by())


def _rerank_index_and_write(cfg: RerankConfig, ds: "cdata.Dataset", trained: Stage2TrainConfig, s2: RunFolder,
                            data: Any, file: Path, run: RunFolder, produced_by: dict[str, Any]) -> RerankResult:
    in_split = len(data.queries)
    split = _score_index_split(cfg, ds, trained, data, file)
    data = split.data
    made_by = provenance.record(
        f"{STEP}_{ds.name}", identity(cfg), weights={"stage2": s2.weights_file}, inputs={"candidates": file},
        splits=[data], dataset=ds.name, data_root=data.root, device=device(), precision="fp32",
        outputs=cfg.outputs or None)
    final = split.lists(split.final_names(cfg.fusion_weight))
    imported = reranked = {}
    analysis: dict[str, Any] = {"ceiling": {}, "outcomes": {}, "outcomes_per_query": {}, "fusion_sweep": None}
    if cfg.split == ds.eval_split:
        before = split.lists(split.imported.sorted_index_names)
        imported = ds.metrics({q: ids[:len(final[q])] for q, ids in before.items()}, data.queries)
        reranked = ds.metrics(final, data.queries)
        analysis = {**_index_analysis(split, cfg.fusion_weight, cfg.split), "fusion_sweep": _index_sweep(cfg, ds, split)}
    run.path.mkdir(parents=True, exist_ok=True)
    files = {split.data.split: str(dataclasses.replace(split.scored, produced_by=made_by).save(
        run.reranked_file(cfg.split)))}
    if cfg.split == ds.test_split:
        files["reranked"] = str(_index_server_file(ds, data, final, run, made_by))
    if split.dropped:
        files["dropped_queries"] = str(_record_lacking(run, [(cfg.split, None, split.dropped)]))
    queries = len(data.queries)
    record = {"imported": imported, "reranked": reranked, "k": cfg.k, "split": cfg.split, "dataset": ds.name,
              "fusion_weight": cfg.fusion_weight, "scoring": cfg.scoring, "format": cfg.format,
              "stage2_run": s2.name, "candidates": [str(file)], "queries": queries,
              "query_counts": {cfg.split: {"in_split": in_split, "evaluated": queries,
                                           "missing_from_candidates": len(split.dropped),
                                           "dropped_from_candidates": split.dropped}},
              "warnings": split.warnings,
              "analysis": {"latency_ms_per_query": 1000.0 * split.seconds / max(queries, 1),
                           "rerank_seconds": split.seconds, **analysis},
              "produced_by": produced_by, "provenance": made_by, "files": files}
    paths.write_json(run.provenance_file, made_by)
    paths.write_json(run.evaluation_file, record)
    return RerankResult(imported, reranked, cfg.k, run.path, record, files=files)


def _index_sweep(cfg: RerankConfig, ds: "cdata.Dataset", split: _IndexSplit) -> dict[str, Any] | None:
    """The fusion sweep of the final lists (the imported scores fused with stage II's, as `TopK.reranked`), the best
    weight by the dataset's `selection_key`; None without imported scores or weights."""
    weights = [float(w) for w in split_list(cfg.fusion_sweep)]
    if not weights or split.scored.scores is None:
        return None
    score = lambda w: ds.metrics(split.lists(split.final_names(w)), split.data.queries)  # noqa: E731
    return gain.fusion_sweep(weights, score, ds.selection_key).to_dict()


def _index_analysis(split: _IndexSplit, fusion_weight: float, name: str) -> dict[str, Any]:
    """Ceiling, outcomes and Figure 8's data of a split with several ground truths per query (`gt_img_ids`): a
    query's rank is its best-placed ground truth's (`cirlib.eval.gain`). Outcomes compare the imported and the final
    lists (50 long; past k they agree); the rank shift, the imported order and stage II's of the first k."""
    k, width = split.scored.k, circo_eval.LIST_LENGTH
    head = split.scored.sorted_index_names
    labels = gain.outcomes(split.first_ranks(split.imported.sorted_index_names[:, :width]),
                           split.first_ranks(split.final_names(fusion_weight)))
    shift = {"k": k, "imported": split.first_ranks(head).tolist(),
             "reranked": split.first_ranks(split.scored.reranked(fusion_weight).sorted_index_names).tolist()}
    return {"ceiling": {name: gain.ceiling(split.first_ranks(head), k)},
            "outcomes": {name: gain.outcome_counts(labels)},
            "outcomes_per_query": {name: dict(zip((str(q.id) for q in split.data.queries), labels.tolist()))},
            "rank_shift": {name: shift}}


def _index_server_file(ds: "cdata.Dataset", data: Any, lists: dict[int, list[int]], run: RunFolder,
                       made_by: dict[str, Any]) -> Path:
    """The test server's file of the re-ranked lists, written only once the dataset's validator accepts it."""
    doc = ds.submission_document(lists)
    problems = ds.validate_submission(doc, data.queries, set(data.gallery.files))
    if problems:
        raise ValueError(f"refusing to write the {ds.title} {data.split} server file: " + "; ".join(problems[:5]))
    path = paths.write_json(run.submission_dir / f"{run.name}_{ds.name}_{data.split}.json", doc)
    paths.write_json(sidecar_file(path), made_by)
    return path
