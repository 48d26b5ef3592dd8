"""Stage II at evaluation: score each query's first k stage-I candidates (and its CIRR image set) with stage II.

The result is a `TopK` in stage-I order holding both scores per candidate; `TopK.reranked(fusion_weight)` orders it
(the one place a ranked list is re-ordered), and the evaluation saves it as the run's re-ranked file, from which the
figures and the explorer recompute any k' <= k and any fusion weight without a model.

How pairs are grouped (the shared path): queries are encoded in batches of `batch_size` (text, and z_t from stage I
for the dual re-ranker), and the pairs of a whole *block* of queries are sorted by candidate and scored pass by pass,
so a gallery image that many queries rank computes its keys/values once per block instead of once per batch. For the
dual re-ranker the query side of a query is its text (L x H floats), so a block holds every query whose features fit
in `query_block_mib` (CIRR val's 4,181 queries at blip-base need ~0.2 GiB: one block). The joint re-ranker's query side
holds the reference's image tokens, whose keys/values would be recomputed in every pass a query appears in, so there
a block is one batch. A CIRR query's image-set members are scored in the same block as its top-k (a member that is also
in the top-k is scored once).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from cirlib import data as cdata
from cirlib import distributed as dist
from cirlib.models.first_stage import require_blip_zt
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
    query_block_mib: float = 256.0,
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
        batch_size: queries encoded at once (text encoder, stage I for z_t).
        max_pairs: most (query, candidate) pairs per forward pass of stage II.
        query_block_mib: most memory of encoded queries whose pairs are grouped by candidate together (the dual
            re-ranker; see the module docstring).
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
    is_cirr_sets = cdata.get_dataset(split_data).has_image_sets and all(q.members for q in queries)
    subset_names = None
    if is_cirr_sets:
        subset_names = (head.group_names if head.group_names is not None
                        else np.asarray([[m for m in q.members if m != q.reference] for q in queries]))
    # Several processes: each scores a contiguous share of the queries (whole batches), then all gather the scores.
    share = dist.shard_range(len(queries), batch_size)
    width = 0 if subset_names is None else subset_names.shape[1]
    index = torch.empty(len(share), k + width, dtype=torch.long)  # gallery rows: top-k, then the set's members
    for row, q in enumerate(share):
        index[row, :k] = gallery.positions(list(cand_names[q]))
        if subset_names is not None:
            index[row, k:] = gallery.positions(list(subset_names[q]))
    scores = torch.empty(len(share), k + width)
    bar = progress_bar(total=len(share) * (k + width), desc="re-rank", unit="pair", leave=False,
                       disable=not dist.is_main_process())

    def encode(s: int, e: int) -> RerankQuery:
        return _rerank_query(stage1, stage2, tokenizer, texts[s:e], queries[s:e], gallery, zt_gallery, device)

    for start, stop, query in query_blocks(stage2, share, batch_size, encode, query_block_mib):
        rows = slice(start - share.start, stop - share.start)
        before = bar.n
        scores[rows] = score_indexed(stage2, query, gallery.tokens, index[rows], max_pairs, scoring, device,
                                     on_pass=lambda pairs, before=before: bar.update(before + pairs - bar.n))
    bar.close()
    stage2_scores, subset_scores = [scores[:, :k]], [scores[:, k:]]
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


def query_blocks(stage2, rows: range, batch_size: int, encode: Callable[[int, int], RerankQuery],
                 query_block_mib: float) -> Iterator[tuple[int, int, RerankQuery]]:
    """The blocks whose pairs `rerank` groups by candidate together: (start, stop, the block's queries) over `rows`,
    each block made of whole batches `encode(start, stop)`. A re-ranker with `multi_batch_query_blocks` (the dual one):
    as many batches as fit in query_block_mib (at least one); any other (the joint one): one batch (see the module
    docstring)."""
    budget = query_block_mib * 2**20 if stage2.multi_batch_query_blocks else 0
    start = rows.start
    while start < rows.stop:
        parts, stop, held = [], start, 0
        while stop < rows.stop and (not parts or held < budget):
            end = min(stop + batch_size, rows.stop)
            parts.append(encode(stop, end))
            held += parts[-1].nbytes()
            stop = end
        yield start, stop, RerankQuery.cat(parts, pad_token_id=stage2.config.text.pad_token_id)
        start = stop


def score_indexed(stage2, query: RerankQuery, gallery_tokens: torch.Tensor, index: torch.Tensor, max_pairs: int,
                  scoring: str, device, on_pass=None) -> torch.Tensor:
    """(B, K) scores of each query against the gallery rows `index` (B, K), in chunks of at most max_pairs pairs
    (on the shared path grouped by candidate over all B queries); on_pass(pairs done) after each pass."""
    return stage2.score(query, gallery_tokens, index.to(device), scoring=scoring, max_pairs=max_pairs,
                        on_pass=on_pass).float().cpu()


def build_rerank_query(stage1, stage2, tokenizer, texts: Sequence[str], ref_tokens: torch.Tensor,
                       zt_ref_tokens: torch.Tensor | None = None) -> RerankQuery:
    """The stage-II query of B queries: the one construction that evaluation, training and search use.

    Args:
        stage1: the stage-I model; its text side gives z_t to a re-ranker that `needs_z_t` (else unused, may be None;
            never run for it: a joint re-ranker over SPRC computes no stage-I query). One that does not declare
            `gives_blip_zt` is refused for a re-ranker that needs z_t.
        stage2: the re-ranker (`Stage2Model`); what it declares it reads decides what is computed.
        tokenizer: texts -> (input_ids, attention_mask).
        texts: the B modification texts.
        ref_tokens: (B, T, Dv) stage-II ViT tokens of the references, on the device the query is built on.
        zt_ref_tokens: (B, T, Dv) the reference tokens stage I reads for z_t when they are not ref_tokens
            (`stage2.zt_from_stage1_vit`: stage I's ViT tokens); None = ref_tokens (the original).
    """
    device = ref_tokens.device
    ids, mask = tokenizer(list(texts))
    ids, mask = ids.to(device), mask.to(device)
    z_t = None
    if stage2.needs_z_t:
        require_blip_zt(stage1, stage2)
        zt_ref = ref_tokens if zt_ref_tokens is None else zt_ref_tokens.to(device)
        z_t = stage1.encode_query(zt_ref, ids, mask).hidden
    return stage2.make_query(ids, mask, ref_tokens=ref_tokens, z_t=z_t)


def _rerank_query(stage1, stage2, tokenizer, texts, chunk, gallery, zt_gallery, device) -> RerankQuery:
    """`build_rerank_query` for queries `chunk`, their reference tokens looked up in the galleries."""
    refs = [q.reference for q in chunk]
    ref_tokens = gallery.tokens[gallery.positions(refs)].to(device, torch.float32)
    zt_ref_tokens = None
    if stage2.needs_z_t and zt_gallery is not gallery:
        zt_ref_tokens = zt_gallery.tokens[zt_gallery.positions(refs)].to(device, torch.float32)
    return build_rerank_query(stage1, stage2, tokenizer, texts, ref_tokens, zt_ref_tokens)
