"""Stage-I retrieval: gallery features computed once, query embeddings, full rankings and the top-K artifact."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from cirlib import data as cdata
from cirlib import distributed as dist
from cirlib.models.first_stage import gallery_similarity
from cirlib.progress import progress_bar
from cirlib.retrieval.topk import TopK


@dataclass
class GalleryFeatures:
    """Image features of one gallery, in gallery (split-file) order."""

    names: list[str]  # (G,)
    embeds: torch.Tensor | None  # (G, P) or (G, V, P) stage-I normalised embeddings, or None (tokens only)
    tokens: torch.Tensor | None  # (G, T, Dv) image tokens, or None when not kept

    def __post_init__(self) -> None:
        self.index = {n: i for i, n in enumerate(self.names)}

    def positions(self, names: Sequence[str]) -> torch.Tensor:
        """Gallery rows of the given names; an unknown name is an error that names it."""
        missing = [n for n in names if n not in self.index]
        if missing:
            raise cdata.DatasetError(f"{len(missing)} image(s) not in the gallery, e.g. {missing[:5]}")
        return torch.tensor([self.index[n] for n in names], dtype=torch.long)


@torch.inference_mode()
def encode_gallery(
    encode: Callable[[torch.Tensor], tuple[torch.Tensor | None, torch.Tensor | None]],
    split_data: "cdata.SplitData",
    transform: Callable,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    keep_tokens: bool = True,
    token_dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    desc: str = "gallery",
) -> GalleryFeatures:
    """Encode every gallery image once.

    Collective under several processes: each encodes a contiguous share of the gallery (whole batches, so each
    batch is the one a single process would encode) and every process receives the whole gallery, in order.

    Args:
        encode: images (B,3,S,S) -> (tokens (B,T,Dv) | None, embeds (B,P) | (B,V,P) | None).
        split_data: the split whose gallery is encoded.
        keep_tokens: keep the token sequences (needed for query fusion and stage II); stored on CPU in token_dtype.
    """
    dataset = cdata.GalleryDataset(split_data, transform)
    share = dist.shard_range(len(dataset), batch_size)
    loader = DataLoader(Subset(dataset, share), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    names: list[str] = []
    tokens, embeds = [], []
    for batch in progress_bar(loader, desc=desc, leave=False, disable=not dist.is_main_process()):
        tok, emb = encode(batch["image"].to(device))
        names.extend(batch["name"])
        if keep_tokens and tok is not None:
            tokens.append(tok.to("cpu", token_dtype))
        if emb is not None:
            embeds.append(emb.float().cpu())
    if dist.is_distributed():
        names = [n for part in dist.gather_objects(names) for n in part]
        gathered = [dist.all_gather_no_grad(torch.cat(x) if x else torch.empty(0)) for x in (tokens, embeds)]
        tokens, embeds = [[g] if g.shape[0] else [] for g in gathered]
    return GalleryFeatures(
        names=names,
        embeds=torch.cat(embeds) if embeds else None,
        tokens=torch.cat(tokens) if tokens else None,
    )


def stage1_encoder(model) -> Callable:
    """Gallery encode function of a first stage: (tokens, normalised embedding(s))."""

    def encode(images: torch.Tensor):
        out = model.encode_image(images)
        return out.tokens, out.embeds

    return encode


@torch.inference_mode()
def embed_gallery_tokens(model, gallery: GalleryFeatures, *, batch_size: int = 64,
                         device: torch.device | str = "cpu") -> GalleryFeatures:
    """The gallery with its embeddings made from its tokens by the first stage (`model.embed_tokens`): what a
    tokens-only store gives while the first stage's gallery head trains (`FirstStage.trains_gallery_head`)."""
    if gallery.tokens is None:
        raise ValueError("the gallery holds no tokens to embed (encode it, or read a store holding tokens)")
    parts = [model.embed_tokens(gallery.tokens[s:s + batch_size].to(device, torch.float32)).float().cpu()
             for s in range(0, len(gallery.names), batch_size)]
    embeds = torch.cat(parts) if parts else torch.empty(0)
    return GalleryFeatures(names=gallery.names, embeds=embeds, tokens=gallery.tokens)


def stage2_encoder(model) -> Callable:
    """Gallery encode function of a Stage2Model: its ViT tokens only."""

    def encode(images: torch.Tensor):
        return model.encode_image(images), None

    return encode


def query_texts(split_data: "cdata.SplitData", queries: Sequence["cdata.Query"]) -> list[str]:
    """Ranking texts, on every split: the dataset's `ranking_text` (FashionIQ: the fixed "C1 and c2" join; CIRR: the
    caption).

    Ranking is deterministic, also on the train split (mining stage-II negatives from its top-K): a FashionIQ train
    query is ranked with the validation join, as `QueryDataset` does, never with one of the four random training
    joins (`query_text` on "train" draws those and refuses without a generator). The original mines nothing and
    ranks FashionIQ val only, always with "C1 and c2".
    """
    ranking_text = cdata.get_dataset(split_data).ranking_text
    return [ranking_text(q) for q in queries]


@torch.inference_mode()
def encode_queries(
    model,
    tokenizer,
    split_data: "cdata.SplitData",
    gallery: GalleryFeatures,
    *,
    queries: Sequence["cdata.Query"] | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    desc: str = "queries",
) -> torch.Tensor:
    """Stage-I query embeddings (N, P); reference tokens are looked up from the gallery by name, as the original;
    texts tokenized by the first stage's own rules (`model.tokenize_queries`)."""
    queries = list(split_data.queries if queries is None else queries)
    texts = query_texts(split_data, queries)
    out = []
    for start in progress_bar(range(0, len(queries), batch_size), desc=desc, leave=False,
                              disable=not dist.is_main_process()):
        chunk = queries[start:start + batch_size]
        ref = gallery.tokens[gallery.positions([q.reference for q in chunk])].to(device, torch.float32)
        ids, mask = model.tokenize_queries(tokenizer, texts[start:start + batch_size])
        out.append(model.encode_query(ref, ids.to(device), mask.to(device)).embeds.float().cpu())
    if not out:
        return torch.empty(0, gallery.embeds.shape[-1] if gallery.embeds is not None else 0)
    return torch.cat(out)


def exclusion_mask(split_data: "cdata.SplitData", queries: Sequence["cdata.Query"],
                   gallery: GalleryFeatures) -> torch.Tensor | None:
    """(N, G) bool, True where a gallery item must not be ranked: the reference itself where the dataset excludes it
    (CIRR), none otherwise (FashionIQ)."""
    if not cdata.get_dataset(split_data).excludes_reference:
        return None
    mask = torch.zeros(len(queries), len(gallery.names), dtype=torch.bool)
    mask[torch.arange(len(queries)), gallery.positions([q.reference for q in queries])] = True
    return mask


def similarity(query_embeds: torch.Tensor, gallery_embeds: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    """(N, G) first-stage scores (`gallery_similarity`: cosine, or the max over a multi-vector gallery's vectors);
    excluded items (an (N, G) bool mask) get -inf so they rank last and are cut from the top-K."""
    sim = gallery_similarity(query_embeds, gallery_embeds)
    if exclude is not None:
        sim = sim.masked_fill(exclude, float("-inf"))
    return sim


def target_ranks(sim: torch.Tensor, target_pos: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's target in its full ranking (ties broken by gallery order, as a stable sort)."""
    tgt = sim.gather(1, target_pos[:, None])
    above = (sim > tgt).sum(1)
    ties_before = ((sim == tgt) & (torch.arange(sim.shape[1])[None] < target_pos[:, None])).sum(1)
    return above + ties_before


SEARCH = ("exact", "faiss")
FAISS_RESULTS = 2**22  # (query, neighbour) results one FAISS search call returns at most (~50 MB with the dedup)


def excluded_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """An (N, G) bool exclusion mask as the (N, E) int64 rows `search_gallery` takes (-1 pads rows with fewer)."""
    if mask is None:
        return None
    counts = mask.sum(1)
    width = int(counts.max()) if mask.shape[0] else 0
    rows = torch.full((mask.shape[0], width), -1, dtype=torch.long)
    q, g = mask.nonzero(as_tuple=True)
    slot = torch.arange(q.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rows[q, slot] = g
    return rows


def search_gallery(query_embeds: torch.Tensor, gallery_embeds: torch.Tensor, k: int, *,
                   exclude: torch.Tensor | None = None, method: str = "exact",
                   chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """THE first-stage search: the k best gallery rows per query, (scores (N, k') float32, rows (N, k') int64), best
    first, scored by the first-stage interface's similarity (`first_stage.gallery_similarity`: inner product of unit
    vectors; the max over V for a (G, V, D) multi-vector gallery). The benchmark pipeline (`rank_gallery`: top-K
    files, evaluation, submission) and the gallery index (`GalleryIndex.search`: `cirlib.search`, notebook 08,
    CIRCO) both rank through it.

    k' = min(k, G - E), E = the most rows any query excludes (so every query gets k' candidates).

    Args:
        query_embeds: (N, D) first-stage query embeddings.
        gallery_embeds: (G, D), or (G, V, D) for a multi-vector first stage.
        exclude: (N, E) int64 gallery rows never returned per query (-1 = none; `excluded_rows` makes it from a
            mask), or None.
        method: "exact" (default): the (N, G) scores and a stable sort (ties in gallery order). "faiss": an exact
            inner-product index (faiss.IndexFlatIP) over the G*V vectors, searched at most `chunk` queries at a
            time (fewer when the results would exceed FAISS_RESULTS) for the (k' + E) * V best vectors; each image
            keeps its first (best) vector, which is its max-over-V score, and the first k' + E distinct images are
            exactly the best k' + E (V vectors per image: (k' + E) * V vectors hold at least k' + E images); the
            excluded rows are then dropped. For galleries whose (N, G) scores do not fit in memory; same candidates
            and scores as exact search, ties may order differently. Needs `pip install -e '.[faiss]'`.
    """
    n, size = query_embeds.shape[0], gallery_embeds.shape[0]
    if exclude is not None and (exclude.dim() != 2 or exclude.shape[0] != n):
        raise ValueError(f"exclude must be (N, E) = ({n}, E) gallery rows, got shape {tuple(exclude.shape)}")
    width = int((exclude >= 0).sum(1).max()) if exclude is not None and exclude.numel() else 0
    k_eff = max(0, min(k, size - width))
    if method == "exact":
        sim = gallery_similarity(query_embeds, gallery_embeds)
        if width:
            sim = sim.masked_fill(_row_mask(exclude, size), float("-inf"))
        scores, rows = torch.sort(sim, dim=1, descending=True, stable=True)
        return scores[:, :k_eff].float(), rows[:, :k_eff]
    if method == "faiss":
        return _faiss_search(query_embeds, gallery_embeds, k_eff, exclude if width else None, width, chunk)
    raise ValueError(f"unknown search {method!r}: one of {SEARCH}")


def _row_mask(rows: torch.Tensor, size: int) -> torch.Tensor:
    """(N, E) rows (-1 pads) as an (N, size) bool mask."""
    mask = torch.zeros(rows.shape[0], size + 1, dtype=torch.bool)
    mask.scatter_(1, torch.where(rows >= 0, rows, size), True)
    return mask[:, :size]


def _faiss_search(query_embeds: torch.Tensor, gallery_embeds: torch.Tensor, k_eff: int,
                  exclude: torch.Tensor | None, width: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    if gallery_embeds.dim() not in (2, 3):
        raise ValueError(f"gallery embeddings must be (G, D) or (G, V, D), got shape {tuple(gallery_embeds.shape)}")
    try:
        import faiss
    except ImportError as e:
        raise ImportError("search='faiss' needs the faiss package: pip install -e '.[faiss]' (faiss-cpu), or use "
                          "search='exact'") from e
    n = query_embeds.shape[0]
    if k_eff == 0 or n == 0:
        return torch.empty(n, k_eff), torch.empty(n, k_eff, dtype=torch.long)
    vectors = 1 if gallery_embeds.dim() == 2 else gallery_embeds.shape[1]
    flat = gallery_embeds.float().reshape(-1, gallery_embeds.shape[-1]).contiguous()  # (G*V, D)
    index = faiss.IndexFlatIP(flat.shape[1])
    index.add(flat.numpy())
    depth = min((k_eff + width) * vectors, flat.shape[0])  # vectors searched per query
    step = max(1, min(chunk, FAISS_RESULTS // depth))
    q_all = query_embeds.float().contiguous()
    scores, rows = [], []
    for start in range(0, n, step):
        d, i = index.search(q_all[start:start + step].numpy(), depth)
        d, i = torch.from_numpy(d), torch.from_numpy(i).long()
        if vectors > 1:
            d, i = best_vector_per_image(d, i // vectors, k_eff + width)
        if exclude is not None:  # drop the excluded rows wherever they came, then keep the first k_eff of the rest
            keep = ~(i[:, :, None] == exclude[start:start + step, None, :]).any(-1)
            keep &= keep.cumsum(1) <= k_eff
            d, i = d[keep].view(-1, k_eff), i[keep].view(-1, k_eff)
        scores.append(d)
        rows.append(i)
    return torch.cat(scores).float(), torch.cat(rows)


def best_vector_per_image(scores: torch.Tensor, images: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first m distinct images of each row of a vector ranking, with their first (best) score.

    Args:
        scores: (R, M) vector scores, best first per row; images: (R, M) the gallery row of each vector.
        m: images kept per row (every row must hold at least m distinct images).
    Returns:
        (scores (R, m), images (R, m)), best first: each image's max over its vectors in the ranking.
    """
    order = torch.sort(images, dim=1, stable=True).indices  # groups an image's vectors, best (leftmost) first
    grouped = images.gather(1, order)
    first = torch.ones_like(grouped, dtype=torch.bool)
    first[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    keep = torch.zeros_like(first).scatter_(1, order, first)  # back in ranking order
    if (keep.sum(1) < m).any():
        raise ValueError(f"a vector ranking holds fewer than {m} distinct images: search deeper")
    keep &= keep.cumsum(1) <= m
    return scores[keep].view(-1, m), images[keep].view(-1, m)


def _has_targets(queries: Sequence["cdata.Query"]) -> bool:
    return bool(queries) and all(q.target is not None for q in queries)


def _has_cirr_sets(split_data: "cdata.SplitData", queries: Sequence["cdata.Query"]) -> bool:
    return cdata.get_dataset(split_data).has_image_sets and bool(queries) and all(q.members for q in queries)


@dataclass
class Ranking:
    """The head of each query's gallery ranking, as gallery rows (rows = queries, in the order given).

    This is the search's raw output, not a second ranked-list type: `topk_from_ranking` turns it into the one ranked
    list, `TopK`, right after the search. It stays separate because it carries what a TopK cannot: each target's
    rank over the whole gallery (far beyond K, for recall@50 with a top-20 file) and gallery rows rather than names,
    which processes gather cheaply (`Ranking.cat`) before the names are looked up once.
    """

    scores: torch.Tensor  # (N, k) float32 first-stage scores (`gallery_similarity`), best first
    index: torch.Tensor  # (N, k) int64 gallery rows, best first
    target_rank: torch.Tensor | None  # (N,) 0-based rank of the target (None without targets); `depth` when the
    # target lies beyond the searched head (faiss search only: exact search ranks the whole gallery)
    depth: int  # how far ranks are known: the gallery size (exact) or the searched head (faiss)
    subset_index: torch.Tensor | None  # (N, 5) int64 gallery rows of the CIRR img_set members (reference excluded)
    # in stage-I order; None without CIRR sets

    @staticmethod
    def cat(parts: Sequence["Ranking"]) -> "Ranking":
        """Rankings of consecutive query blocks joined in order (empty blocks are skipped)."""
        full = [p for p in parts if p.index.shape[0] > 0] or list(parts[:1])
        if not full:
            raise ValueError("Ranking.cat needs at least one part")
        join = lambda name: None if getattr(full[0], name) is None else torch.cat([getattr(p, name) for p in full])  # noqa: E731
        return Ranking(scores=join("scores"), index=join("index"), target_rank=join("target_rank"),
                       depth=full[0].depth, subset_index=join("subset_index"))


def rank_gallery(
    split_data: "cdata.SplitData",
    queries: Sequence["cdata.Query"],
    gallery: GalleryFeatures,
    query_embeds: torch.Tensor,
    k: int,
    *,
    search: str = "exact",
    chunk: int = 4096,
) -> Ranking:
    """Rank the gallery for each query and keep the best k (CIRR: never the query's own reference), through
    `search_gallery`.

    Args:
        query_embeds: (N, P) stage-I query embeddings of `queries`.
        k: candidates kept per query (at most the gallery size, less the reference for CIRR).
        search: "exact" (default), which also ranks every target however far down, or "faiss" (see
            `search_gallery`), which knows target ranks only within the top k.
    """
    mask = exclusion_mask(split_data, queries, gallery)
    scores, rows = search_gallery(query_embeds, gallery.embeds, k, exclude=excluded_rows(mask), method=search,
                                  chunk=chunk)
    if search == "exact":
        return _exact_ranking(split_data, queries, gallery, similarity(query_embeds, gallery.embeds, mask),
                              scores, rows)
    return _faiss_ranking(split_data, queries, gallery, query_embeds, scores, rows)


def _exact_ranking(split_data, queries, gallery: GalleryFeatures, sim: torch.Tensor, scores: torch.Tensor,
                   rows: torch.Tensor) -> Ranking:
    """The search's head, with each target's rank and the CIRR subset order from the full (N, G) scores."""
    target_rank = None
    if _has_targets(queries):
        target_rank = target_ranks(sim, gallery.positions([q.target for q in queries]))
    subset = None
    if _has_cirr_sets(split_data, queries):
        subset = _subset_index(queries, gallery, lambda i, pos: sim[i, pos])
    return Ranking(scores=scores, index=rows, target_rank=target_rank, depth=sim.shape[1], subset_index=subset)


def _faiss_ranking(split_data, queries, gallery: GalleryFeatures, query_embeds: torch.Tensor, scores: torch.Tensor,
                   rows: torch.Tensor) -> Ranking:
    """The search's head, with target ranks known within it (`depth` = beyond it)."""
    depth = rows.shape[1]
    target_rank = None
    if _has_targets(queries):
        hits = rows == gallery.positions([q.target for q in queries])[:, None]
        target_rank = torch.where(hits.any(1), hits.float().argmax(1), torch.full((len(queries),), depth))
    subset = None
    if _has_cirr_sets(split_data, queries):
        g, q_all = gallery.embeds, query_embeds.float()
        subset = _subset_index(queries, gallery, lambda i, pos: gallery_similarity(q_all[i:i + 1], g[pos])[0])
    return Ranking(scores=scores, index=rows, target_rank=target_rank, depth=depth, subset_index=subset)


def _subset_index(queries, gallery: GalleryFeatures, member_scores: Callable) -> torch.Tensor:
    """The 5 non-reference img_set members of each CIRR query (gallery rows) in stage-I order."""
    out = []
    for i, q in enumerate(queries):
        pos = gallery.positions([m for m in q.members if m != q.reference])
        order = torch.sort(member_scores(i, pos), descending=True, stable=True).indices
        out.append(pos[order])
    return torch.stack(out)


def topk_from_ranking(
    split_data: "cdata.SplitData",
    queries: Sequence["cdata.Query"],
    gallery: GalleryFeatures,
    ranking: Ranking,
    *,
    stage1_run: str | None = None,
) -> TopK:
    """The top-K artifact of a ranking, with labels (and CIRR group labels) when targets exist."""
    names = np.asarray(gallery.names)
    has_targets = all(q.target is not None for q in queries)
    target_names = [q.target for q in queries] if has_targets else None
    group_names = None
    if ranking.subset_index is not None:
        group_names = names[ranking.subset_index.numpy()]
    return TopK(
        dataset=split_data.dataset,
        split=split_data.split,
        category=split_data.category,
        sorted_index_names=names[ranking.index.numpy()],
        scores=ranking.scores.float(),
        index_names=list(gallery.names),
        target_names=target_names,
        group_names=group_names,
        reference_removed=cdata.get_dataset(split_data).excludes_reference,
        stage1_run=stage1_run,
    )

