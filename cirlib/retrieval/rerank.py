"""Stage II at evaluation: re-order each query's stage-I top-K, score CIRR image sets, fuse scores if asked."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from cirlib import data as cdata
from cirlib import distributed as dist
from cirlib.eval import metrics as M
from cirlib.models.stage2 import RerankQuery
from cirlib.retrieval.search import GalleryFeatures, query_texts
from cirlib.retrieval.topk import TopK


@dataclass
class RerankResult:
    """Stage-II scores and the re-ordered top-K of one split (rows = queries in caption-file order)."""

    stage2_scores: torch.Tensor  # (N, K) stage-II logit 0 of each stage-I candidate, in stage-I order
    final_scores: torch.Tensor  # (N, K) scores that define the final order (stage II, or fused with stage I)
    order: torch.Tensor  # (N, K) permutation of the stage-I columns, best first
    sorted_index_names: np.ndarray  # (N, K) re-ranked candidate names
    labels: torch.Tensor | None  # (N, K) bool, True at the target after re-ranking (the original's layout)
    group_names: np.ndarray | None  # (N, 5) CIRR non-reference members in stage-II order
    group_labels: torch.Tensor | None  # (N, 5) bool, True at the target


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
) -> RerankResult:
    """Score the first k stage-I candidates of every query with stage II and re-order them.

    Collective under several processes: each scores a contiguous share of the queries and every process receives
    the whole result, equal to one process's.

    Args:
        gallery: stage-II ViT tokens of the split's gallery (computed once; every candidate is looked up here).
        zt_gallery: gallery whose tokens feed stage I for z_t; None = `gallery` (the original: stage-II ViT tokens).
        fusion_weight: w in w * z(s1) + (1 - w) * z(s2), each score row z-scored (stage-I cosine from the top-k
            file, stage-II logit), 0 = stage II only (the original).
        queries: the rows of `topk` to score (default: all of the split's queries, which must match its rows).
        scoring: "shared" (each gallery image's keys/values computed once for all queries that rank it) or "pairs"
            (one full pass per pair, the original's algorithm); both give the same scores.
    """
    queries = list(split_data.queries if queries is None else queries)
    if len(queries) != topk.sorted_index_names.shape[0]:
        raise ValueError(f"top-k file has {topk.sorted_index_names.shape[0]} rows for {len(queries)} queries")
    if k > topk.k:
        raise ValueError(f"asked to re-rank K={k} but the top-k file holds only {topk.k} candidates")
    if fusion_weight > 0 and topk.scores is None:
        raise ValueError("score fusion needs stage-I scores, which this top-k file (an original one?) lacks")
    zt_gallery = gallery if zt_gallery is None else zt_gallery
    texts = query_texts(split_data, queries)
    cand_names = topk.sorted_index_names[:, :k]
    is_cirr_sets = split_data.dataset == "cirr" and all(q.members for q in queries)
    subset_names = [[m for m in q.members if m != q.reference] for q in queries] if is_cirr_sets else []
    # Several processes: each scores a contiguous share of the queries (whole batches), then all gather the scores.
    share = dist.shard_range(len(queries), batch_size)
    stage2_scores, subset_scores = [torch.empty(0, k)], [torch.empty(0, len(subset_names[0]) if subset_names else 0)]
    for start in tqdm(range(share.start, share.stop, batch_size), desc="re-rank", leave=False,
                      disable=not dist.is_main_process()):
        stop = min(start + batch_size, share.stop)
        chunk = queries[start:stop]
        query = _rerank_query(stage1, stage2, tokenizer, texts[start:stop], chunk, gallery, zt_gallery, device)
        idx = torch.stack([gallery.positions(list(row)) for row in cand_names[start:stop]])
        stage2_scores.append(score_indexed(stage2, query, gallery.tokens, idx, max_pairs, scoring, device))
        if is_cirr_sets:
            midx = torch.stack([gallery.positions(m) for m in subset_names[start:stop]])
            subset_scores.append(score_indexed(stage2, query, gallery.tokens, midx, max_pairs, scoring, device))
    s2 = dist.all_gather_no_grad(torch.cat(stage2_scores))
    final = s2 if fusion_weight == 0 else torch.as_tensor(
        M.fuse_scores(topk.scores[:, :k].numpy(), s2.numpy(), fusion_weight, normalize=True), dtype=torch.float32)
    order = torch.sort(final, dim=1, descending=True, stable=True).indices
    sorted_names = np.take_along_axis(cand_names, order.numpy(), axis=1)
    labels = None
    if topk.labels is not None:
        labels = torch.take_along_dim(topk.labels[:, :k], order, dim=1)
    group_names = group_labels = None
    if is_cirr_sets:
        sub = dist.all_gather_no_grad(torch.cat(subset_scores))
        sub_order = torch.sort(sub, dim=1, descending=True, stable=True).indices.numpy()
        group_names = np.take_along_axis(np.asarray(subset_names), sub_order, axis=1)
        if all(q.target is not None for q in queries):
            group_labels = torch.from_numpy(group_names == np.asarray([q.target for q in queries])[:, None])
    return RerankResult(stage2_scores=s2, final_scores=final, order=order, sorted_index_names=sorted_names,
                        labels=labels, group_names=group_names, group_labels=group_labels)


def score_indexed(stage2, query: RerankQuery, gallery_tokens: torch.Tensor, index: torch.Tensor, max_pairs: int,
                  scoring: str, device) -> torch.Tensor:
    """(B, K) scores of each query against the gallery rows `index` (B, K), in chunks of at most max_pairs pairs."""
    if scoring == "shared":
        return stage2.score_topk(query, gallery_tokens, index.to(device), max_pairs=max_pairs).float().cpu()
    if scoring != "pairs":
        raise ValueError(f"unknown scoring {scoring!r}: 'shared' | 'pairs'")
    b, k = index.shape
    flat = index.reshape(-1)
    rows = torch.arange(b).repeat_interleave(k)
    out = []
    for s in range(0, b * k, max_pairs):
        cand = gallery_tokens[flat[s:s + max_pairs]].to(device, torch.float32)
        out.append(stage2.score_pairs(query.select(rows[s:s + max_pairs].to(device)), cand).float().cpu())
    return torch.cat(out).view(b, k)


def _rerank_query(stage1, stage2, tokenizer, texts, chunk, gallery, zt_gallery, device) -> RerankQuery:
    ids, mask = tokenizer(texts)
    ids, mask = ids.to(device), mask.to(device)
    refs = [q.reference for q in chunk]
    ref_tokens = gallery.tokens[gallery.positions(refs)].to(device, torch.float32)
    z_t = None
    if stage2.config.reranker == "dual":
        zt_ref = zt_gallery.tokens[zt_gallery.positions(refs)].to(device, torch.float32)
        z_t = stage1.encode_query(zt_ref, ids, mask).hidden
    return RerankQuery(input_ids=ids, attention_mask=mask, z_t=z_t,
                       ref_tokens=ref_tokens if stage2.config.reranker == "joint" else None)
