"""CIRCO with our two stages (notebook 09): read the real layout, rank the gallery through a gallery index, score val,
write the test-server files.

- `load_circo`: one split: the records parsed by `cirlib.eval.circo.read_annotations` (the one parser), the gallery
  and the missing-image checks of `cirlib.data.circo` (the layout reader).
- `rank_circo`: every query of a split ranked by stage I over the whole gallery index, and stage I's top k
  re-ranked by stage II (`cirlib.workbook.search.rank`); 50 image ids per query and stage.
- `evaluate_circo`: the step: index (built once, then updated incrementally), val metrics of both stages
  (`circo_metrics`: mAP@5/10/25/50, Recall@5/10/25/50, semantic mAP@10), the lists of both stages checked by
  `validate_submission` (the test server's rule, gallery ids included) before they are written or scored; everything
  with its provenance in the run folder's `circo/`.

Choices, as CIRCO asks methods to state them: the query text is the relative caption alone (`use_shared_concept`
prepends the shared concept: "<shared_concept>, <relative_caption>"); the reference image is excluded from its own
results (`exclude_reference`; CIRCO's reference is never a ground truth, so keeping it only costs a rank); stage II
re-ranks stage I's top k, and ranks past k keep stage I's order.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cirlib import paths, provenance
from cirlib.data import get_dataset
from cirlib.data import circo as layout
from cirlib.eval import circo
from cirlib.progress import progress_bar
from cirlib.retrieval.topk import TopK
from cirlib.run_folder import RunFolder, outputs_root, sidecar_file
from cirlib.workbook import search
from cirlib.workbook.config import CircoConfig, identity, split_list
from cirlib.workbook.factories import abs_path, dataset_root, device

LIST_LENGTH = circo.SUBMISSION_LENGTH  # ids per query and stage (the server's 50)
QUERY_CHUNK = 64  # queries ranked per call (their reference images are held in memory together)
STAGES = ("stage1", "stage2")
CIRCO = get_dataset("circo")  # its splits, query text, metrics and test-server format


@dataclass(frozen=True)
class CircoDropped:
    """What missing_images="drop" left out of a split (the fields `cirlib.provenance.dropped_counts` reads)."""

    missing: tuple[int, ...]  # image ids of the gallery list whose file is missing
    queries: tuple[layout.DroppedQuery, ...]  # queries left out, with their missing image ids
    gallery: tuple[int, ...]  # gallery ids left out (= missing)
    queries_before: int
    gallery_before: int


@dataclass(frozen=True)
class CircoSplit:
    """One CIRCO split ready to rank: queries (annotation-file order), the gallery, what was dropped."""

    split: str  # "val" | "test"
    root: Path
    queries: list[circo.CircoQuery]
    gallery: layout.CircoGallery
    annotation_file: Path
    source_files: tuple[Path, ...]
    dropped: CircoDropped | None = None
    dataset: str = "circo"  # dataset and category: what `cirlib.provenance.data_record` reads of a split
    category: None = None


def load_circo(root: str | Path, split: str, *, missing_images: str = "error",
               gallery: layout.CircoGallery | None = None) -> CircoSplit:
    """One split of the CIRCO layout at `root`: records checked against the gallery (every image a query names in
    the gallery and on disk; see `cirlib.data.circo`).

    Args:
        root: the CIRCO root (relative: from the repository).
        split: "val" | "test".
        missing_images: "error" | "drop" (see `cirlib.data.circo.read_gallery`).
        gallery: the gallery when already read (both splits share it).
    """
    root = abs_path(str(root))
    file = layout.annotation_file(root, split)
    gallery = gallery if gallery is not None else layout.read_gallery(root, missing_images=missing_images)
    queries = circo.read_annotations(file)
    kept, dropped = layout.check_query_images(queries, gallery, file, missing_images=missing_images)
    record = None
    if dropped or gallery.missing:
        record = CircoDropped(gallery.missing, tuple(dropped), gallery.missing, len(queries),
                              len(gallery) + len(gallery.missing))
    return CircoSplit(split, root, kept, gallery, file, tuple(layout.source_files(root, [split])), record)


def query_text(query: circo.CircoQuery, use_shared_concept: bool = False) -> str:
    """The text a query gives the models: the relative caption, or "<shared concept>, <relative caption>"."""
    return CIRCO.ranking_text(query, use_shared_concept)


def default_index(cfg: CircoConfig) -> Path:
    """The gallery index folder: `cfg.index`, or when empty <outputs>/search/<CIRCO root's folder name>_<stage-I run
    name> (one index per gallery and stage I; rankings of other settings reuse it)."""
    if cfg.index:
        return abs_path(cfg.index)
    return outputs_root(cfg.outputs) / "search" / f"{dataset_root(cfg.circo_root).name}_{Path(cfg.stage1_run).name}"


def _final_order(results: list[search.QueryResult], idx: search.GalleryIndex, k: int) -> np.ndarray:
    """(queries, 50) names of stage II's lists: its order of the first k candidates, then stage I's order."""
    ranked = TopK(dataset=None, split=search.SEARCH_SPLIT, category=None, index_names=tuple(idx.names),
                  sorted_index_names=[[h.name for h in r.candidates] for r in results],
                  stage2_scores=[[h.stage2_score for h in r.candidates] for r in results])
    return ranked.sliced(k).reranked_then_rest(ranked, 0.0, LIST_LENGTH)


def rank_circo(index: str | Path | search.GalleryIndex, data: CircoSplit, *, stage1: str, stage2: str | None,
               k: int = 50, use_shared_concept: bool = False, exclude_reference: bool = True,
               search_method: str = "exact", batch_size: int = 32, outputs: str = ""
               ) -> dict[str, dict[int, list[int]]]:
    """Every query of a split ranked: {"stage1": {query id: 50 image ids}, "stage2": {...}} ("stage2" only with a
    stage-II run).

    Stage II scores the first max(k, 50) stage-I candidates; with k < 50 its order is applied to the first k only.

    Raises:
        CircoError: a reference that is not in the index (left out as unreadable: see the index's report.json), or
            a gallery smaller than 51 images (a list needs 50 ids besides the reference).
    """
    if k < 1:
        raise circo.CircoError(f"k={k}: stage II re-ranks at least one candidate")
    idx = search.open_index(index)
    absent = [(q.id, q.reference_img_id) for q in data.queries if data.gallery.name(q.reference_img_id) not in idx]
    if absent:
        raise circo.CircoError(f"{data.annotation_file}: {len(absent)} reference image(s) are not in the gallery index "
                               f"{idx.out_dir} (first: query {absent[0][0]}, image {absent[0][1]}); the index's "
                               "report.json lists the files it could not read")
    if len(idx) < LIST_LENGTH + int(exclude_reference):
        raise circo.CircoError(f"the gallery index {idx.out_dir} holds {len(idx)} images: a CIRCO list needs "
                               f"{LIST_LENGTH} besides the reference")
    out: dict[str, dict[int, list[int]]] = {"stage1": {}}
    if stage2:
        out["stage2"] = {}
    queries = data.queries
    for start in progress_bar(range(0, len(queries), QUERY_CHUNK), desc=f"circo {data.split}", unit="chunk"):
        chunk = queries[start:start + QUERY_CHUNK]
        results = search.rank(idx, [data.gallery.name(q.reference_img_id) for q in chunk],
                              [query_text(q, use_shared_concept) for q in chunk], stage1=stage1,
                              stage2=stage2 or None, k=max(k, LIST_LENGTH), top=LIST_LENGTH,
                              exclude_reference=exclude_reference, search=search_method, batch_size=batch_size,
                              outputs=outputs)
        final = _final_order(results, idx, min(k, results[0].k)).tolist() if stage2 else None
        for i, (q, r) in enumerate(zip(chunk, results)):
            out["stage1"][q.id] = [data.gallery.id_of(h.name) for h in r.candidates[:LIST_LENGTH]]
            if stage2:
                out["stage2"][q.id] = [data.gallery.id_of(n) for n in final[i]]
    return out


# ------------------------------------------------------------------------------------------------------ the step


@dataclass
class CircoResult:
    """What `evaluate_circo` did: metrics per stage (val), the files written, the index report."""

    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> circo_metrics (val)
    files: dict[str, Path] = field(default_factory=dict)  # what -> file
    index: Any = None  # the gallery index's IndexReport
    queries: dict[str, int] = field(default_factory=dict)  # split -> queries ranked
    notes: list[str] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        """The val metrics, one row per stage (percent; semantic mAP@10 per aspect as columns)."""
        rows = {}
        for stage, m in self.metrics.items():
            row = {key: round(v, 2) for key, v in m.items() if not isinstance(v, dict)}
            row.update({f"sem. {a}": round(v, 2) for a, v in m[f"semantic_mAP@{circo.SEMANTIC_K}"].items()})
            rows["stage I" if stage == "stage1" else "stage II"] = row
        return pd.DataFrame.from_dict(rows, orient="index")


def result_folder(cfg: CircoConfig) -> RunFolder:
    """The run folder the results go to: the stage-II run's (else the stage-I run's)."""
    stage, run = ("stage2", cfg.stage2_run) if cfg.stage2_run else ("stage1", cfg.stage1_run)
    return search.run_folder(stage, run, cfg.outputs)


def _check(cfg: CircoConfig) -> list[str]:
    splits = split_list(cfg.splits)
    unknown = [s for s in splits if s not in CIRCO.splits]
    if not splits or unknown:
        raise ValueError(f"splits={cfg.splits!r}: expected a comma-separated subset of {list(CIRCO.splits)}")
    if cfg.max_val_queries < 0:
        raise ValueError(f"max_val_queries={cfg.max_val_queries}, expected >= 0 (0 = all)")
    return splits


def evaluate_circo(cfg: CircoConfig) -> CircoResult:
    """Notebook 09: index CIRCO's gallery with the stage I, rank every query of `cfg.splits`, write the results.

    Writes, in the run folder's `circo/` (`result_folder`; names from `cirlib.run_folder`):
      `metrics_<name>.json` (val: both stages' metrics, settings, query counts, dropped images, provenance);
      `<split>_<name>_<stage>.json` (each stage's lists in the server's format; `python -m cirlib.circo evaluate`
      recomputes the val metrics from them; on test they are the files to submit; every one checked by
      `validate_submission` before it is written), each with a `.provenance.json` sidecar.
    Every run recomputes the rankings (cheap beside the index, which is reused when its images and stage I are
    unchanged).
    """
    splits = _check(cfg)
    root = dataset_root(cfg.circo_root)
    gallery = layout.read_gallery(root, missing_images=cfg.missing_images)
    data = {s: load_circo(root, s, missing_images=cfg.missing_images, gallery=gallery) for s in splits}
    if "val" in data and cfg.max_val_queries:
        data["val"] = dataclasses.replace(data["val"], queries=data["val"].queries[:cfg.max_val_queries])
    if "test" in data and data["test"].dropped is not None and data["test"].dropped.queries:
        raise circo.CircoError(f"{len(data['test'].dropped.queries)} test queries name missing images: the test "
                               "server needs every test query; restore the images or leave 'test' out of splits")
    index_dir = default_index(cfg)
    report = search.index_folder(str(gallery.image_dir), cfg.stage1_run, str(index_dir), files=gallery.names,
                                 batch_size=cfg.batch_size, outputs=cfg.outputs)
    run = result_folder(cfg)
    stages = ["stage1"] + (["stage2"] if cfg.stage2_run else [])
    s2_run = search.run_folder("stage2", cfg.stage2_run, cfg.outputs) if cfg.stage2_run else None
    s1 = search.load_stage1(cfg.stage1_run, outputs=cfg.outputs)
    settings = {"text": "shared_concept, relative_caption" if cfg.use_shared_concept else "relative_caption",
                "reference_excluded": cfg.exclude_reference, "k": cfg.k, "list_length": LIST_LENGTH,
                "index": str(index_dir), "index_images": report.images, "unreadable_images": len(report.unreadable)}
    made_by = provenance.record(
        "evaluate_circo", identity(cfg), weights={"stage1": s1.weights_file,
                                                  "stage2": s2_run.weights_file if s2_run else None},
        inputs={"index": index_dir / "index.json"}, splits=list(data.values()), dataset=CIRCO.name, data_root=root,
        preset=s1.preset, device=device(), precision="fp32", outputs=cfg.outputs or None, settings=settings)
    result = CircoResult(index=report)
    trained_on = s2_run.saved_config().get("stage1_run") if s2_run else None
    if s2_run and trained_on != Path(cfg.stage1_run).name:
        result.notes.append(f"stage II {cfg.stage2_run!r} was trained with stage-I run {trained_on!r}; its candidates "
                            f"here come from stage-I run {cfg.stage1_run!r}")
    if report.unreadable:
        result.notes.append(f"{len(report.unreadable)} gallery images could not be read and are not ranked "
                            f"(listed in {index_dir / 'report.json'})")
    for split, d in data.items():
        ranked = rank_circo(index_dir, d, stage1=cfg.stage1_run, stage2=cfg.stage2_run or None, k=cfg.k,
                            use_shared_concept=cfg.use_shared_concept, exclude_reference=cfg.exclude_reference,
                            search_method=cfg.search, batch_size=cfg.batch_size, outputs=cfg.outputs)
        result.queries[split] = len(d.queries)
        for stage in stages:
            doc = CIRCO.submission_document(ranked[stage])
            problems = CIRCO.validate_submission(doc, d.queries, set(gallery.files))  # val lists too: one rule
            if problems:
                raise circo.CircoError(f"the {stage} {split} file would be refused by the server: "
                                       + "; ".join(problems[:5]))
            path = run.circo_predictions_file(split, cfg.result_name, stage)
            paths.write_json(path, doc)
            paths.write_json(sidecar_file(path), {**made_by, "split": split, "stage": stage})
            result.files[f"{split} {stage}"] = path
            if split == "val":
                result.metrics[stage] = CIRCO.metrics(ranked[stage], d.queries)
    if "val" in data:
        val = data["val"]
        record = {"metrics": result.metrics, "queries": len(val.queries), "settings": settings,
                  "dropped": provenance.dropped_counts(val), "provenance": made_by,
                  "predictions": {s: str(result.files[f"val {s}"]) for s in stages}}
        result.files["metrics"] = paths.write_json(run.circo_metrics_file(cfg.result_name), record)
    return result


def command(cfg: CircoConfig, result: CircoResult) -> str:
    """The command line that recomputes the val metrics of stage II (else stage I) from the written files."""
    stage = "stage2" if "val stage2" in result.files else "stage1"
    if f"val {stage}" not in result.files:
        return "(val was not evaluated: add it to splits for metrics)"
    root = dataset_root(cfg.circo_root)
    return (f"python -m cirlib.circo evaluate --annotations {layout.annotation_file(root, 'val')} "
            f"--predictions {result.files[f'val {stage}']}")


def summary(cfg: CircoConfig, result: CircoResult) -> pd.DataFrame:
    """Notebook 09's table: what was ranked, then the val metrics of both stages (when val was evaluated)."""
    for note in result.notes:
        print(note)
    print(result.index.summary().splitlines()[0])
    for what, path in result.files.items():
        print(f"{what}: {path}")
    return result.table() if result.metrics else pd.DataFrame({"queries": result.queries})


def check_inputs(cfg: CircoConfig) -> pd.DataFrame:
    """What the step reads and whether it exists (stops early, naming what is missing)."""
    root = dataset_root(cfg.circo_root)
    rows = [("CIRCO annotations " + s, root / layout.ANNOTATIONS_DIR / f"{s}.json") for s in _check(cfg)]
    rows.append(("gallery (COCO image list, else the image folder)",
                 root / layout.IMAGE_LIST if (root / layout.IMAGE_LIST).is_file() else root / layout.IMAGE_DIR))
    rows.append(("stage-I run", search.run_folder("stage1", cfg.stage1_run, cfg.outputs).completion_file))
    if cfg.stage2_run:
        rows.append(("stage-II run", search.run_folder("stage2", cfg.stage2_run, cfg.outputs).completion_file))
    table = pd.DataFrame(rows, columns=["input", "path"])
    table["exists"] = [Path(p).exists() for p in table["path"]]
    missing = table[~table["exists"]]
    if len(missing):
        raise FileNotFoundError(f"{len(missing)} input(s) missing:\n" + "\n".join(
            f"  {r.input}: {r.path}" for r in missing.itertuples()))
    return table

