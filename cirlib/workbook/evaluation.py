"""The evaluation loops of the workbook steps: stage I over the full gallery (metrics and top-K files) and stage II
re-ranking a top-K (stage I vs stage II on the same queries), plus the splits they run on and the check that a top-k
file's rows are the caption file's queries."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch

from cirlib import data as cdata
from cirlib import distributed as dist
from cirlib import paths
from cirlib.eval import metrics as M
from cirlib.retrieval.rerank import rerank
from cirlib.retrieval.search import (Ranking, encode_gallery, encode_queries, rank_gallery, stage1_encoder,
                                     stage2_encoder, topk_from_ranking)
from cirlib.retrieval.topk import TopK, TopKError
from cirlib.run_folder import RunFolder
from cirlib.workbook.config import split_list
from cirlib.workbook.factories import abs_path, device

EVAL_SPLIT = "val"  # both datasets are reported on their validation split (test labels are the servers')


def split_sets(dataset: str, root: Path, split: str, categories: str) -> list["cdata.SplitData"]:
    """One SplitData per FashionIQ category (in the configured order), or the one CIRR split."""
    if dataset == "fashioniq":
        return [cdata.load_split("fashioniq", root, split, c) for c in split_list(categories)]
    return [cdata.load_split(dataset, root, split)]


def limit_queries(split_data: "cdata.SplitData", n: int) -> "cdata.SplitData":
    """The first n queries of a split (0 = all); the gallery is unchanged."""
    if n <= 0 or n >= len(split_data.queries):
        return split_data
    return dataclasses.replace(split_data, queries=list(split_data.queries[:n]))


def mining_subset(split_data: "cdata.SplitData", n: int) -> "cdata.SplitData":
    """The first n queries with a gallery of only the images they use (reference, target, img_set members).

    Ranking a 120k-image train gallery to mine stage-II negatives costs minutes on a CPU; the images of a few
    thousand queries' own img_sets are a smaller pool that still holds every query's near-duplicates.
    """
    if n <= 0 or n >= len(split_data.queries):
        return split_data
    queries = list(split_data.queries[:n])
    used = {name for q in queries for name in (q.reference, q.target, *(q.members or ()))}
    gallery = [g for g in split_data.gallery if g in used]
    return dataclasses.replace(split_data, queries=queries, gallery=gallery)


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
    return tk


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
                    dev: torch.device | None = None, search: str = "exact") -> tuple[dict[str, float], list[TopK]]:
    """Rank each split's gallery for its queries: metrics over the full ranking, and (if k) the top-K artifacts.

    Collective under several processes: the gallery and the queries are split into contiguous shares (whole
    batches), each process ranks the gallery for its queries, and every process receives the same metrics and
    top-K files as one process would compute. `search="faiss"` ranks with a FAISS index (see
    `retrieval.rank_gallery`); recall is then computed within the searched head, which is at least 50 deep.
    """
    dev = dev or device()
    model.eval()
    transform = cdata.targetpad_transform(target_ratio, image_size)
    metrics: dict[str, float] = {}
    per_cat: dict[str, dict[str, float]] = {}
    topks: list[TopK] = []
    for sd in sets:
        ks = M.REPORTED_KS[sd.dataset]
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
        if sd.dataset == "fashioniq":
            per_cat[sd.category] = rec
        else:
            metrics.update(rec)
            metrics.update(M.subset_recall_at_k(head.group_labels.numpy(), M.SUBSET_KS))
            metrics["selection"] = M.cirr_selection_score(metrics)
    if per_cat:
        metrics.update(M.fashioniq_summary(per_cat))
        metrics["selection"] = metrics["average_recall"]
    return metrics, topks


def evaluate_stage2(stage1, stage2, tok, sets, topks, *, k: int, fusion_weight: float, max_pairs: int, scoring: str,
                    target_ratio: float, dev=None, save_to: RunFolder | None = None
                    ) -> tuple[dict[str, float], dict[str, float], list[TopK]]:
    """Stage-I and stage-II metrics on the same queries (stage II re-ranks the first k of each top-K).

    Returns the metrics and each split's re-ranked TopK (`TopK.reranked` of the scored top-K).

    Args:
        save_to: the stage-II run folder, or None (validation). The main process writes there, per split, the
            label tensor (`labels_file`, the original's bare (N, K) bool) and the re-ranked file (`reranked_file`:
            the scored top-K in stage-I order, from which the figures and the explorer re-rank without a model).
    """
    dev = dev or device()
    stage1.eval()
    stage2.eval()
    transform = cdata.targetpad_transform(target_ratio, stage2.config.vision.image_size)
    s1: dict[str, float] = {}
    s2: dict[str, float] = {}
    per1, per2 = {}, {}
    results = []
    if sets and sets[0].dataset == "fashioniq" and k < 50:
        raise ValueError(f"FashionIQ is reported as R@10 and R@50 over the re-ranked list, so k must be >= 50 "
                         f"(got k={k}; the paper uses 100)")
    for sd, tk in zip(sets, topks):
        gallery = encode_gallery(stage2_encoder(stage2), sd, transform, device=dev, desc="stage-II gallery")
        zt_gallery = None
        if stage2.config.zt_source == "stage1_vit" and stage2.config.reranker == "dual":
            zt_gallery = encode_gallery(stage1_encoder(stage1), sd, transform, device=dev, desc="stage-I gallery")
        scored = rerank(stage1, stage2, tok, sd, tk, gallery, k=k, fusion_weight=fusion_weight,
                        zt_gallery=zt_gallery, max_pairs=max_pairs, scoring=scoring, device=dev,
                        provenance=None if save_to is None else {"run": save_to.name})
        res = scored.reranked(fusion_weight)
        results.append(res)
        ks = [x for x in M.REPORTED_KS[sd.dataset] if x <= k]
        r1 = M.recall_at_k(tk.labels[:, :k].numpy(), ks)
        r2 = M.recall_at_k(res.labels.numpy(), ks)
        if sd.dataset == "fashioniq":
            per1[sd.category], per2[sd.category] = r1, r2
        else:
            s1.update(r1)
            s2.update(r2)
            s1.update(M.subset_recall_at_k(tk.group_labels.numpy(), M.SUBSET_KS))
            s2.update(M.subset_recall_at_k(res.group_labels.numpy(), M.SUBSET_KS))
            s1["selection"], s2["selection"] = M.cirr_selection_score(s1), M.cirr_selection_score(s2)
        if save_to is not None and dist.is_main_process():
            labels = res.labels.contiguous()
            paths.atomic_write(save_to.labels_file(sd.split, sd.category), lambda tmp: torch.save(labels, tmp))
            scored.save(save_to.reranked_file(sd.split, sd.category))
    if per1:
        s1.update(M.fashioniq_summary(per1))
        s2.update(M.fashioniq_summary(per2))
        s1["selection"], s2["selection"] = s1["average_recall"], s2["average_recall"]
    return s1, s2, results
