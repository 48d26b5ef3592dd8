"""Stage-I retrieval: gallery features computed once, query embeddings, full rankings and the top-K artifact."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cirlib import data as cdata
from cirlib.topk import TopK


@dataclass
class GalleryFeatures:
    """Image features of one gallery, in gallery (split-file) order."""

    names: list[str]  # (G,)
    embeds: torch.Tensor | None  # (G, P) stage-I normalised embeddings, or None (stage-II ViT tokens only)
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

    Args:
        encode: images (B,3,S,S) -> (tokens (B,T,Dv) | None, embeds (B,P) | None).
        split_data: the split whose gallery is encoded.
        keep_tokens: keep the token sequences (needed for query fusion and stage II); stored on CPU in token_dtype.
    """
    loader = DataLoader(cdata.GalleryDataset(split_data, transform), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    names: list[str] = []
    tokens, embeds = [], []
    for batch in tqdm(loader, desc=desc, leave=False):
        tok, emb = encode(batch["image"].to(device))
        names.extend(batch["name"])
        if keep_tokens and tok is not None:
            tokens.append(tok.to("cpu", token_dtype))
        if emb is not None:
            embeds.append(emb.float().cpu())
    return GalleryFeatures(
        names=names,
        embeds=torch.cat(embeds) if embeds else None,
        tokens=torch.cat(tokens) if tokens else None,
    )


def stage1_encoder(model) -> Callable:
    """Gallery encode function of a Stage1Model: (tokens, normalised embeddings)."""

    def encode(images: torch.Tensor):
        out = model.encode_image(images)
        return out.tokens, out.embeds

    return encode


def stage2_encoder(model) -> Callable:
    """Gallery encode function of a Stage2Model: its ViT tokens only."""

    def encode(images: torch.Tensor):
        return model.encode_image(images), None

    return encode


def query_texts(split_data: "cdata.SplitData", queries: Sequence["cdata.Query"]) -> list[str]:
    """Evaluation texts (FashionIQ: the fixed "c1 and c2" join; CIRR: the caption)."""
    return [cdata.query_text(q, split_data.dataset, split_data.split, None) for q in queries]


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
    """Stage-I query embeddings (N, P); reference tokens are looked up from the gallery by name, as the original."""
    queries = list(split_data.queries if queries is None else queries)
    texts = query_texts(split_data, queries)
    out = []
    for start in tqdm(range(0, len(queries), batch_size), desc=desc, leave=False):
        chunk = queries[start:start + batch_size]
        ref = gallery.tokens[gallery.positions([q.reference for q in chunk])].to(device, torch.float32)
        ids, mask = tokenizer(texts[start:start + batch_size])
        out.append(model.encode_query(ref, ids.to(device), mask.to(device)).embeds.float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def exclusion_mask(split_data: "cdata.SplitData", queries: Sequence["cdata.Query"], gallery: GalleryFeatures) -> torch.Tensor | None:
    """(N, G) bool, True where a gallery item must not be ranked: the reference itself for CIRR, nothing for FashionIQ."""
    if split_data.dataset != "cirr":
        return None
    mask = torch.zeros(len(queries), len(gallery.names), dtype=torch.bool)
    mask[torch.arange(len(queries)), gallery.positions([q.reference for q in queries])] = True
    return mask


def similarity(query_embeds: torch.Tensor, gallery_embeds: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    """(N, G) cosine similarity; excluded items get -inf so they rank last and are cut from the top-K."""
    sim = query_embeds.float() @ gallery_embeds.float().T
    if exclude is not None:
        sim = sim.masked_fill(exclude, float("-inf"))
    return sim


def target_ranks(sim: torch.Tensor, target_pos: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's target in its full ranking (ties broken by gallery order, as a stable sort)."""
    tgt = sim.gather(1, target_pos[:, None])
    above = (sim > tgt).sum(1)
    ties_before = ((sim == tgt) & (torch.arange(sim.shape[1])[None] < target_pos[:, None])).sum(1)
    return above + ties_before


def build_topk(
    split_data: "cdata.SplitData",
    queries: Sequence["cdata.Query"],
    gallery: GalleryFeatures,
    sim: torch.Tensor,
    k: int,
    *,
    stage1_run: str | None = None,
) -> TopK:
    """Rank the gallery for each query and keep the best k, with labels (and CIRR group labels) when targets exist."""
    removed = split_data.dataset == "cirr"
    k_eff = min(k, sim.shape[1] - (1 if removed else 0))
    scores, idx = torch.sort(sim, dim=1, descending=True, stable=True)
    scores, idx = scores[:, :k_eff], idx[:, :k_eff]
    names = np.asarray(gallery.names)
    sorted_names = names[idx.numpy()]
    has_targets = all(q.target is not None for q in queries)
    target_names = [q.target for q in queries] if has_targets else None
    labels = None
    if has_targets:
        labels = torch.from_numpy(sorted_names == np.asarray(target_names)[:, None])
    group_labels = group_names = None
    if removed and all(q.members for q in queries):
        group_names, group_labels = _subset_order(queries, gallery, sim)
        if not has_targets:
            group_labels = None
    return TopK(
        dataset=split_data.dataset,
        split=split_data.split,
        category=split_data.category,
        sorted_index_names=sorted_names,
        scores=scores.float(),
        index_names=list(gallery.names),
        target_names=target_names,
        labels=labels,
        group_labels=group_labels,
        group_names=group_names,
        reference_removed=removed,
        stage1_run=stage1_run,
    )


def _subset_order(queries, gallery: GalleryFeatures, sim: torch.Tensor):
    """The 5 non-reference img_set members of each CIRR query in stage-I order, and where the target is."""
    group_names, group_labels = [], []
    for i, q in enumerate(queries):
        members = [m for m in q.members if m != q.reference]
        pos = gallery.positions(members)
        order = torch.sort(sim[i, pos], descending=True, stable=True).indices
        ordered = [members[j] for j in order.tolist()]
        group_names.append(ordered)
        group_labels.append([m == q.target for m in ordered])
    return np.asarray(group_names), torch.tensor(group_labels, dtype=torch.bool)
