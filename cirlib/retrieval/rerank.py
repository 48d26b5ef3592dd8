"""Stage II at evaluation: score each query's first k stage-I candidates (and its CIRR image set) with stage II.

The result is a `TopK` in stage-I order holding both scores per candidate; `TopK.reranked(fusion_weight)` orders it
(the one place a ranked list is re-ordered), and the evaluation saves it as the run's re-ranked file, from which the
figures and the explorer recompute any k' <= k and any fusion weight without a model.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch

from cirlib import data as cdata
from cirlib import distributed as dist
from cirlib.models.stage2 import RerankQuery
from cirlib.progress import progress_bar
from cirlib.retrieval.search import GalleryFeatures, query_texts
from cirlib.retrieval.topk import TopK


@torch.inference_mode()
def rerank(
    stage1,
    stage2,
    tokenizer,
    split_data: "cdata.SplitData",
    topk: TopK,
    gallery: GalleryFeatures,
    *,
    k: int,
    fusion_weight: float = 0.0,
    zt_gallery: GalleryFeatures | None = None,
    batch_size: int = 16,
    max_pairs: int = 4096,
    queries: Sequence["cdata.Query"] | None = None,
    scoring: str = "shared",
    device: torch.device | str = "cpu",
    provenance: dict[str, Any] | None = None,
) -> TopK:
    """Score the first k stage-I candidates of every query (and the CIRR subset members) with stage II.

    Collective under several processes: each scores a contiguous share of the queries and every process receives
    the whole result, equal to one process's.

    Args:
        gallery: stage-II ViT tokens of the split's gallery (computed once; every candidate is looked up here).
        zt_gallery: gallery whose tokens feed stage I for z_t; None = `gallery` (the original: stage-II ViT tokens).
        fusion_weight: the w the caller ranks by (`result.reranked(w)`: w * z(s1) + (1 - w) * z(s2), 0 = stage II
            only, the original); checked against the file (fusion needs stage-I scores) and recorded in provenance.
        queries: the rows of `topk` to score (default: all of the split's queries, which must match its rows).
        scoring: "shared" (each gallery image's keys/values computed once for all queries that rank it) or "pairs"
            (one full pass per pair, the original's algorithm); both give the same scores.
        provenance: more of what produced the result (e.g. the stage-II run and weights), stored under "stage2".
    Returns:
        `topk` cut to its first k columns, in stage-I order, with `stage2_scores` (N, k) and, for CIRR queries with
        image sets, `group_names` (stage-I order when the file has it, else the members' order) with
        `group_stage2_scores` (N, 5); provenance {"stage1": topk.provenance, "stage2": {k, fusion_weight, scoring,
        ...}}.
    """
    queries = list(split_data.queries if queries is None else queries)
    if len(queries) != topk.num_queries:
        raise ValueError(f"top-k file has {topk.num_queries} rows for {len(queries)} queries")
    if k > topk.k:
        raise ValueError(f"asked to re-rank K={k} but the top-k file holds only {topk.k} candidates")
    if fusion_weight > 0 and topk.scores is None:
        raise ValueError("score fusion needs stage-I scores, which this top-k file (an original one?) lacks")
    zt_gallery = gallery if zt_gallery is None else zt_gallery
    texts = query_texts(split_data, queries)
    head = topk.sliced(k)
    cand_names = head.sorted_index_names
    is_cirr_sets = split_data.dataset == "cirr" and all(q.members for q in queries)
    subset_names = None
    if is_cirr_sets:
        subset_names = (head.group_names if head.group_names is not None
                        else np.asarray([[m for m in q.members if m != q.reference] for q in queries]))
    # Several processes: each scores a contiguous share of the queries (whole batches), then all gather the scores.
    share = dist.shard_range(len(queries), batch_size)
    width = 0 if subset_names is None else subset_names.shape[1]
    stage2_scores, subset_scores = [torch.empty(0, k)], [torch.empty(0, width)]
    for start in progress_bar(range(share.start, share.stop, batch_size), desc="re-rank", leave=False,
                      disable=not dist.is_main_process()):
        stop = min(start + batch_size, share.stop)
        chunk = queries[start:stop]
        query = _rerank_query(stage1, stage2, tokenizer, texts[start:stop], chunk, gallery, zt_gallery, device)
        idx = torch.stack([gallery.positions(list(row)) for row in cand_names[start:stop]])
        stage2_scores.append(score_indexed(stage2, query, gallery.tokens, idx, max_pairs, scoring, device))
        if subset_names is not None:
            midx = torch.stack([gallery.positions(list(m)) for m in subset_names[start:stop]])
            subset_scores.append(score_indexed(stage2, query, gallery.tokens, midx, max_pairs, scoring, device))
    s2 = dist.all_gather_no_grad(torch.cat(stage2_scores))
    sub = None if subset_names is None else dist.all_gather_no_grad(torch.cat(subset_scores))
    stage2_record = {"k": int(k), "fusion_weight": float(fusion_weight), "scoring": scoring, **(provenance or {})}
    return dataclasses.replace(
        head,
        stage2_scores=s2,
        group_names=subset_names if subset_names is not None else head.group_names,
        # stage-I group labels of another order would not match the names; TopK derives them from the targets
        group_labels=None if subset_names is not None and head.target_names is not None else head.group_labels,
        group_stage2_scores=sub,
        provenance={"stage1": topk.provenance, "stage2": stage2_record},
    )


def score_indexed(stage2, query: RerankQuery, gallery_tokens: torch.Tensor, index: torch.Tensor, max_pairs: int,
                  scoring: str, device) -> torch.Tensor:
    """(B, K) scores of each query against the gallery rows `index` (B, K), in chunks of at most max_pairs pairs."""
    return stage2.score(query, gallery_tokens, index.to(device), scoring=scoring, max_pairs=max_pairs).float().cpu()


def _rerank_query(stage1, stage2, tokenizer, texts, chunk, gallery, zt_gallery, device) -> RerankQuery:
    ids, mask = tokenizer(texts)
    ids, mask = ids.to(device), mask.to(device)
    refs = [q.reference for q in chunk]
    ref_tokens = gallery.tokens[gallery.positions(refs)].to(device, torch.float32)
    z_t = None
    if stage2.needs_z_t:
        zt_ref = zt_gallery.tokens[zt_gallery.positions(refs)].to(device, torch.float32)
        z_t = stage1.encode_query(zt_ref, ids, mask).hidden
    return stage2.make_query(ids, mask, ref_tokens=ref_tokens, z_t=z_t)
