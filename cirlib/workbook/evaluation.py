"""The evaluation loops of the workbook steps: stage I over the full gallery (metrics and top-K files) and stage II
re-ranking a top-K (stage I vs stage II on the same queries), plus the splits they run on and the check that a top-k
file's rows are the caption file's queries."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from cirlib import data as cdata
from cirlib import distributed as dist
from cirlib import paths
from cirlib.eval import metrics as M
from cirlib.eval.protocol import rows_holding_reference
from cirlib.retrieval.rerank import rerank
from cirlib.retrieval.search import (GalleryFeatures, Ranking, embed_gallery_tokens, encode_gallery, encode_queries,
                                     rank_gallery, stage1_encoder, stage2_encoder, topk_from_ranking)
from cirlib.retrieval.topk import TopK, TopKError
from cirlib.run_folder import RunFolder, file_sha256
from cirlib.workbook.config import split_list
from cirlib.workbook.factories import abs_path, device

EVAL_SPLIT = "val"  # both datasets are reported on their validation split (test labels are the servers')


def split_sets(dataset: str, root: Path, split: str, categories: str, *, max_queries: int = 0,
               missing_images: str | None = None, list_file: Path | None = None) -> list["cdata.SplitData"]:
    """One SplitData per category (FashionIQ's, in the configured order), or the one split of a dataset without
    categories (CIRR).

    Args:
        max_queries: keep the first N queries of each caption file (0 = all), before any is dropped.
        missing_images: None reads the annotation files only (no image is looked at); "error" raises one
            `DatasetError` listing every missing image of these splits; "drop" leaves out the queries and gallery
            images whose files are missing (`cdata.drop_missing`; `SplitData.dropped` says what).
        list_file: where "error" writes the full list of missing files (default: a temporary file).
    """
    sets = [cdata.load_split(dataset, root, split, c)
            for c in cdata.get_dataset(dataset).split_categories(categories)]
    sets = [limit_queries(sd, max_queries) for sd in sets]
    if missing_images is None:
        return sets
    if cdata.check_missing_images_policy(missing_images) == "error":
        cdata.raise_if_missing(sets, list_file)
        return sets
    return [cdata.drop_missing(sd) for sd in sets]


def step_sets(step: str, dataset: str, root: Path, categories: str, splits: dict[str, int], missing_images: str,
              run: RunFolder | None) -> dict[str, list["cdata.SplitData"]]:
    """Every split a step reads, with the `missing_images` policy applied to all of them at once, before any work.

    "error": one `DatasetError` lists every missing image of all the splits (the full list goes to the run folder's
    `missing_images_file`, or a temporary file without a run folder). "drop": the queries and gallery images whose
    files are missing are left out; what was left out is printed and recorded under `step` in the run folder's
    `dropped_queries_file` (nothing is written when nothing is missing and no earlier record exists).

    Args:
        step: the step's name, the key of its record ("train_stage1", "extract_topk", ...).
        splits: split -> how many of its first queries to read (0 = all).
        run: the run folder the step writes (where the record and the list go), or None.
    """
    policy = cdata.check_missing_images_policy(missing_images)
    sets = {split: split_sets(dataset, root, split, categories, max_queries=n) for split, n in splits.items()}
    if policy == "error":
        cdata.raise_if_missing([sd for ss in sets.values() for sd in ss],
                               None if run is None else run.missing_images_file)
        return sets
    sets = {split: [cdata.drop_missing(sd) for sd in ss] for split, ss in sets.items()}
    if dist.is_main_process():
        for ss in sets.values():
            for sd in ss:
                line = dropped_line(sd, run)
                if line:
                    print(f"{step}: {line}", flush=True)
        if run is not None:
            record_dropped(run, step, [sd for ss in sets.values() for sd in ss])
    return sets


def _split_name(sd: "cdata.SplitData") -> str:
    return sd.split + (f" {sd.category}" if sd.category else "")


def dropped_line(sd: "cdata.SplitData", run: RunFolder | None = None) -> str | None:
    """'val: evaluated on 4,103 of 4,181 queries; 78 dropped (missing images), listed in dropped_queries.json; 80 of
    2,297 gallery images missing, left out of the gallery', or None when nothing was dropped."""
    d = sd.dropped
    if d is None:
        return None
    verb = "evaluated on" if sd.split == EVAL_SPLIT else "uses"
    where = f", listed in {run.dropped_queries_file}" if run is not None else ""
    return (f"{_split_name(sd)}: {verb} {len(sd.queries):,} of {d.queries_before:,} queries; {len(d.queries):,} "
            f"dropped (missing images){where}; {len(d.gallery):,} of {d.gallery_before:,} gallery images missing, "
            "left out of the gallery")


def record_dropped(run: RunFolder, step: str, sets: Sequence["cdata.SplitData"]) -> Path | None:
    """Write (or update) the run folder's `dropped_queries_file`: under `step`, per split and category the counts and
    missing images, and each dropped query (split, category, caption-file row, pair id, its missing images).

    Other steps' records in the file are kept. Nothing is written when nothing was dropped and no file exists.
    """
    path = run.dropped_queries_file
    if all(sd.dropped is None for sd in sets) and not path.exists():
        return None
    record = paths.read_json(path, "dropped-queries record") if path.exists() else {}
    splits, queries = [], []
    for sd in sets:
        d = sd.dropped
        splits.append({"split": sd.split, "category": sd.category, "queries_in_split": len(sd.queries) + (
            len(d.queries) if d else 0), "queries_kept": len(sd.queries), "queries_dropped": len(d.queries) if d else 0,
            "gallery_in_split": d.gallery_before if d else len(sd.gallery),
            "gallery_removed": len(d.gallery) if d else 0, "missing_images": list(d.missing) if d else []})
        for q in (d.queries if d else ()):
            queries.append({"split": sd.split, "category": q.category or sd.category, "row": q.index,
                            "pair_id": q.pair_id, "reference": q.reference, "target": q.target,
                            "missing": d.missing_of(q)})
    record[step] = {"missing_images": "drop", "splits": splits, "queries": queries}
    return paths.write_json(path, record)


def query_counts(sets: Sequence["cdata.SplitData"], run: RunFolder | None) -> dict[str, dict[str, Any]]:
    """The counts a metrics.json records, per split: queries evaluated, in the split (after any query limit),
    dropped for missing images, the gallery before and after, and the file listing the dropped queries (None when
    none); FashionIQ adds the same per category under "by_category"."""
    def counts(ss: Sequence["cdata.SplitData"]) -> dict[str, Any]:
        dropped = sum(len(sd.dropped.queries) for sd in ss if sd.dropped)
        return {"evaluated": sum(len(sd.queries) for sd in ss), "in_split": sum(len(sd.queries) for sd in ss) + dropped,
                "dropped": dropped, "gallery": sum(len(sd.gallery) for sd in ss),
                "gallery_in_split": sum(sd.dropped.gallery_before if sd.dropped else len(sd.gallery) for sd in ss),
                "dropped_file": (run.dropped_queries_file.name if run is not None and any(sd.dropped for sd in ss)
                                 else None)}

    out: dict[str, dict[str, Any]] = {}
    for split in dict.fromkeys(sd.split for sd in sets):
        ss = [sd for sd in sets if sd.split == split]
        out[split] = counts(ss)
        if any(sd.category for sd in ss):
            out[split]["by_category"] = {sd.category: counts([sd]) for sd in ss}
    return out


def limit_queries(split_data: "cdata.SplitData", n: int) -> "cdata.SplitData":
    """The first n queries of a split (0 = all); the gallery is unchanged."""
    if n <= 0 or n >= len(split_data.queries):
        return split_data
    return dataclasses.replace(split_data, queries=list(split_data.queries[:n]))


def mining_subset(split_data: "cdata.SplitData", n: int) -> "cdata.SplitData":
    """The first n queries, ranked (CIRR) among only the images they use: reference, target, img_set members.

    Ranking a 17k-image train gallery to mine stage-II negatives costs minutes on a CPU; the images of a few
    thousand queries' own img_sets are a smaller pool that still holds every query's near-duplicates. FashionIQ has
    no img_sets: the references and targets of n queries alone would be an arbitrary sample of the category, and
    negatives mined from it no harder than random ones, so a FashionIQ query keeps its category's whole gallery
    (the one stage II re-ranks at inference) and only the queries are cut.
    """
    if n <= 0 or n >= len(split_data.queries):
        return split_data
    if not cdata.get_dataset(split_data).has_image_sets:
        return limit_queries(split_data, n)
    queries = list(split_data.queries[:n])
    used = {name for q in queries for name in (q.reference, q.target, *(q.members or ()))}
    gallery = [g for g in split_data.gallery if g in used]
    return dataclasses.replace(split_data, queries=queries, gallery=gallery)


def refuse_unsupported(cfg: Any, dataset: str, categories: str = "") -> None:
    """Refuse, before any work, settings that the dataset cannot honour, each with the reason (one error for all).

    Checks the fields a config has: `topk_splits` (the dataset's split names), `set_negatives` (datasets with image
    sets only: CIRR), `k` (at least the dataset's `min_rerank_k`: FashionIQ's R@50 needs k >= 50) and `topk_path`
    (several categories need "{category}" in it).

    Args:
        cfg: a TopKConfig, Stage2TrainConfig or EvaluateConfig (any object with some of those fields).
        dataset: the dataset the step runs on (a registered name): the stage-I or stage-II run's, for the steps
            that take it from a run folder.
        categories: the categories the step runs on (comma-separated; datasets with categories).
    Raises:
        ValueError: naming each refused field, its value and why.
    """
    ds = cdata.get_dataset(dataset)
    problems = []
    if hasattr(cfg, "topk_splits"):
        unknown = [s for s in split_list(cfg.topk_splits) if s not in ds.splits]
        if unknown:
            problems.append(f"topk_splits={cfg.topk_splits!r}: {unknown} are not {dataset} splits; expected some of "
                            f"{list(ds.splits)}" + _test_split_hint(unknown, ds))
    if not ds.has_image_sets and getattr(cfg, "set_negatives", 0) > 0:
        problems.append(f"set_negatives={cfg.set_negatives}: negatives from the query's img_set need CIRR's image "
                        f"sets; {ds.title} has none (use hard_negatives, drawn from the train top-K, instead)")
    if hasattr(cfg, "k") and cfg.k < ds.min_rerank_k:
        problems.append(f"k={cfg.k}: {_rerank_depth_reason(ds)}")
    if (ds.categories and getattr(cfg, "topk_path", "") and "{category}" not in cfg.topk_path
            and len(ds.split_categories(categories)) > 1):
        problems.append(f"topk_path={cfg.topk_path!r}: {ds.title} has one top-k file per category; write "
                        "{category} where the category goes (e.g. .../fiq_top_200_val_{category}.pt)")
    if problems:
        raise ValueError(f"{type(cfg).__name__} on {dataset}: " + "; ".join(problems))


def _test_split_hint(unknown: Sequence[str], ds: "cdata.Dataset") -> str:
    """' ("test1" is CIRR's test split)' when an unknown split is another dataset's test split, else ''."""
    for split in unknown:
        owners = [o.title for o in map(cdata.get_dataset, cdata.dataset_names())
                  if o.test_split == split and o.name != ds.name]
        if len(owners) == 1:
            return f' ("{split}" is {owners[0]}\'s test split)'
        if owners:
            return f' ("{split}" is the test split of {", ".join(owners)})'
    return ""


def _rerank_depth_reason(ds: "cdata.Dataset") -> str:
    reported = " and ".join(f"R@{x}" for x in ds.headline_ks or ds.reported_ks)
    return (f"{ds.title} is reported as {reported} over the re-ranked list, so k must be >= {ds.min_rerank_k} "
            "(the paper uses 100)")


def match_rows(tk: TopK, sd: "cdata.SplitData", path: Path) -> TopK:
    """The top-k rows of the split's queries, refused unless row i is query i of the caption file.

    A file with more rows (made for more queries) is cut to the first len(queries); one with fewer rows, or whose
    targets differ from the caption file's row by row, is refused naming the first differing row.
    """
    n = len(sd.queries)
    if tk.num_queries < n:
        raise TopKError(f"{path}: {tk.num_queries} rows, but the {sd.split} caption file has {n} queries "
                        f"(max_val_queries?): re-extract it (notebook 02) for these queries")
    if tk.num_queries > n:
        tk = tk.head(n)
    if tk.target_names is not None and all(q.target is not None for q in sd.queries):
        for i, (have, q) in enumerate(zip(tk.target_names, sd.queries)):
            if have != q.target:
                raise TopKError(f"{path}: row {i} is for target {have!r}, but query {i} of the {sd.split} caption "
                                f"file (pair id {q.pair_id}) has target {q.target!r}: the file's rows are not the "
                                "caption file's queries in order; re-extract it (notebook 02)")
    warn_rows_holding_reference(tk, sd, path)
    return tk


def warn_rows_holding_reference(tk: TopK, sd: "cdata.SplitData", path: Path) -> None:
    """Warn when the dataset removes each query's reference from its own ranking and rows of `tk` still hold it."""
    ds = cdata.get_dataset(sd)
    if not ds.excludes_reference:
        return
    rows = rows_holding_reference(tk.sorted_index_names, [q.reference for q in sd.queries[:tk.num_queries]])
    if len(rows):
        first = sd.queries[int(rows[0])]
        warnings.warn(
            f"{path}: {len(rows):,} of {tk.num_queries:,} rows hold their own query's reference image (first: row "
            f"{int(rows[0])}, pair id {first.pair_id}, reference {first.reference!r}). {ds.title} removes the "
            "reference from its own ranking; a list that keeps it scores R@1 near 0 and R@5 high, and its numbers are "
            "not comparable with published ones. Re-extract the file (notebook 02), or remove each row's reference "
            "from a file made elsewhere", UserWarning, stacklevel=2)


def stage1_change_notes(completion: dict[str, Any], completion_file: Path, files: Sequence[Path],
                        topks: Sequence[TopK], stage1_now: str | None = None) -> list[str]:
    """One line per top-k file whose candidates come from other stage-I weights than the ones a stage-II run was
    trained and validated with (its completion record's `inputs`, written by `train_stage2`): stage I was retrained
    since. Files recording no weights (the original's) and runs recording none say nothing.

    Args:
        completion: the stage-II run's completion record; completion_file: where it is (for the message).
        files, topks: the validation top-k files and what they hold (`TopK.provenance`).
        stage1_now: the sha256 of the stage-I weights this evaluation loads (they compute stage II's z_t), or None.
    """
    trained_with = (completion.get("inputs") or {}).get("stage1_weights_sha256")
    notes = []
    if trained_with and stage1_now and stage1_now != trained_with:
        notes.append(f"the stage-I weights loaded now ({stage1_now[:12]}) are not the ones the stage-II run was "
                     f"trained with ({trained_with[:12]}, {completion_file}): stage I was retrained since, so stage "
                     "II's inputs from stage I differ from what it learned on; retrain stage II (notebook 03) to "
                     "evaluate the two stages as trained together")
    for path, tk in zip(files, topks):
        made_by = (tk.provenance or {}).get("stage1_weights_sha256")
        if trained_with and made_by and made_by != trained_with:
            notes.append(f"{path}: its candidates come from stage-I weights {made_by[:12]}, but the stage-II run was "
                         f"trained and validated with stage-I weights {trained_with[:12]} ({completion_file}): "
                         "stage I was retrained since (or the file was made by other weights), so these numbers are "
                         "of stage II re-ranking candidates it did not learn on; retrain stage II (notebook 03) to "
                         "evaluate the two stages as trained together")
    return notes


def val_topk_paths(stage1: RunFolder, topk_path: str, sets: Sequence["cdata.SplitData"]) -> list[Path]:
    """The validation top-k file of each split: `topk_path` (with {category}) when given, else the stage-I run's."""
    if topk_path:
        return [abs_path(topk_path.replace("{category}", sd.category or "")) for sd in sets]
    return [stage1.topk_file(sd.split, sd.category) for sd in sets]


def load_val_topks(files: Sequence[Path], sets: Sequence["cdata.SplitData"], k: int) -> list[TopK]:
    """The top-k files, checked against their splits (gallery, K, and row by row against the queries)."""
    out = []
    for p, sd in zip(files, sets):
        if not p.exists():
            raise FileNotFoundError(f"no top-k file at {p}: run notebook 02 (extract_topk) with topk_splits "
                                    f"including '{sd.split}', or set topk_path=")
        tk = TopK.load(p, dataset=sd.dataset, split=sd.split, category=sd.category, index_names=sd.gallery, k=k)
        out.append(match_rows(tk, sd, p))
    return out


def evaluate_stage1(model, tokenizer, sets: Sequence["cdata.SplitData"], *, image_size: int, target_ratio: float,
                    k: int | None = None, stage1_run: str | None = None, batch_size: int = 64,
                    dev: torch.device | None = None, search: str = "exact", store=None
                    ) -> tuple[dict[str, float], list[TopK]]:
    """Rank each split's gallery for its queries: metrics over the full ranking, and (if k) the top-K artifacts.

    Collective under several processes: the gallery and the queries are split into contiguous shares (whole
    batches), each process ranks the gallery for its queries, and every process receives the same metrics and
    top-K files as one process would compute. `search="faiss"` ranks with a FAISS index (see
    `retrieval.rank_gallery`); recall is then computed within the searched head, which is at least 50 deep.
    `store`: a stage-I `FeatureStore` holding every gallery image of `sets` (`workbook.stores.stage1_store`): the
    gallery's tokens and embeddings are read from it instead of decoding and encoding the images (a tokens-only
    store, a first stage training its gallery head: the embeddings are made from the tokens by the model).
    """
    dev = dev or device()
    model.eval()
    transform = cdata.targetpad_transform(target_ratio, image_size)
    per_split: list[tuple[str | None, dict[str, float]]] = []
    topks: list[TopK] = []
    for sd in sets:
        ks = cdata.get_dataset(sd).reported_ks
        if store is not None:
            gallery = store.gallery_features(sd.gallery)
            if gallery.embeds is None:
                gallery = embed_gallery_tokens(model, gallery, batch_size=batch_size, device=dev)
        else:
            gallery = encode_gallery(stage1_encoder(model), sd, transform, batch_size=batch_size, device=dev,
                                     desc=f"gallery {sd.category or sd.split}")
        share = dist.shard_range(len(sd.queries), batch_size)
        mine = sd.queries[share.start:share.stop]
        q_emb = encode_queries(model, tokenizer, sd, gallery, queries=mine, batch_size=batch_size, device=dev)
        depth = max(k or 1, max(ks)) if search == "faiss" else (k or 1)
        ranking = Ranking.cat(dist.gather_objects(rank_gallery(sd, mine, gallery, q_emb, depth, search=search)))
        head = topk_from_ranking(sd, sd.queries, gallery, ranking, stage1_run=stage1_run)
        if k:
            topks.append(head.sliced(min(k, head.k)) if head.k > k else head)
        if not all(q.target is not None for q in sd.queries):
            continue
        rec = M.recall_from_ranks(ranking.target_rank.numpy(), ks)
        per_split.append((sd.category, cdata.get_dataset(sd).split_metrics(rec, head.group_labels)))
    metrics = cdata.get_dataset(sets[0]).summary_metrics(per_split) if per_split else {}
    return metrics, topks


def rerank_galleries(stage1, stage2, sd: "cdata.SplitData", transform, store, zt_store, dev: torch.device
                     ) -> tuple[GalleryFeatures, GalleryFeatures | None]:
    """The image tokens a re-ranking of `sd` reads: the stage-II ViT's gallery, and the gallery whose tokens feed
    stage I for z_t when the model takes them from stage I's ViT (else None: the stage-II tokens, the original).
    From the feature stores when given (a run trained with them), else encoded now. Evaluation and the CIRR
    submission both call this, so a submission ranks exactly as the evaluation did."""
    if store is not None:
        gallery = store.gallery_features(sd.gallery)
    else:
        gallery = encode_gallery(stage2_encoder(stage2), sd, transform, device=dev, desc=f"{sd.split} gallery")
    if not stage2.zt_from_stage1_vit:
        return gallery, None
    if zt_store is not None:
        return gallery, zt_store.gallery_features(sd.gallery)
    if store is not None:
        raise ValueError("z_t from stage I's ViT with a feature store needs zt_store (stage I's ViT tokens)")
    return gallery, encode_gallery(stage1_encoder(stage1), sd, transform, device=dev, desc="stage-I gallery")


def evaluate_stage2(stage1, stage2, tok, sets, topks, *, k: int, fusion_weight: float, max_pairs: int, scoring: str,
                    target_ratio: float, dev=None, save_to: RunFolder | None = None,
                    provenance: dict[str, Any] | None = None, store=None, zt_store=None
                    ) -> tuple[dict[str, float], dict[str, float], list[TopK]]:
    """Stage-I and stage-II metrics on the same queries (stage II re-ranks the first k of each top-K).

    Returns the metrics and each split's re-ranked TopK (`TopK.reranked` of the scored top-K).

    Args:
        save_to: the stage-II run folder, or None (validation). The main process writes there, per split, the
            label tensor (`labels_file`, the original's bare (N, K) bool) and the re-ranked file (`reranked_file`:
            the scored top-K in stage-I order, from which the figures and the explorer re-rank without a model).
        provenance: with save_to, the `cirlib.provenance` record of this evaluation: written beside each label
            tensor (`labels_provenance_file`, the bare tensor has no room for it) and as each re-ranked file's
            `produced_by`.
        store, zt_store: the tokens stores of stage II's ViT and (z_t from stage I's ViT) stage I's
            (`workbook.stores.stage2_stores`) holding every gallery image of `sets`, or None: the galleries are
            encoded from the images.
    """
    dev = dev or device()
    stage1.eval()
    stage2.eval()
    transform = cdata.targetpad_transform(target_ratio, stage2.config.vision.image_size)
    per1: list[tuple[str | None, dict[str, float]]] = []
    per2: list[tuple[str | None, dict[str, float]]] = []
    results = []
    if sets and k < cdata.get_dataset(sets[0]).min_rerank_k:
        raise ValueError(f"{_rerank_depth_reason(cdata.get_dataset(sets[0]))} (got k={k})")
    for sd, tk in zip(sets, topks):
        gallery, zt_gallery = rerank_galleries(stage1, stage2, sd, transform, store, zt_store, dev)
        scored = rerank(stage1, stage2, tok, sd, tk, gallery, k=k, fusion_weight=fusion_weight,
                        zt_gallery=zt_gallery, max_pairs=max_pairs, scoring=scoring, device=dev,
                        provenance=None if save_to is None else {"run": save_to.name})
        res = scored.reranked(fusion_weight)
        results.append(res)
        ds = cdata.get_dataset(sd)
        ks = [x for x in ds.reported_ks if x <= k]
        per1.append((sd.category, ds.split_metrics(M.recall_at_k(tk.labels[:, :k].numpy(), ks), tk.group_labels)))
        per2.append((sd.category, ds.split_metrics(M.recall_at_k(res.labels.numpy(), ks), res.group_labels)))
        if save_to is not None and dist.is_main_process():
            labels = res.labels.contiguous()
            paths.atomic_write(save_to.labels_file(sd.split, sd.category), lambda tmp: torch.save(labels, tmp))
            if provenance is not None:  # the sidecar names its tensor by content, so a stale pair shows
                written = save_to.labels_file(sd.split, sd.category)
                paths.write_json(save_to.labels_provenance_file(sd.split, sd.category),
                                 {"file": written.name, "sha256": file_sha256(written), "provenance": provenance})
            dataclasses.replace(scored, produced_by=provenance).save(save_to.reranked_file(sd.split, sd.category))
    s1 = cdata.get_dataset(sets[0]).summary_metrics(per1) if per1 else {}
    s2 = cdata.get_dataset(sets[0]).summary_metrics(per2) if per2 else {}
    return s1, s2, results
