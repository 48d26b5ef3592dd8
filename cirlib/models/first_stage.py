"""The first stage (candidate filtering) as an interface: a query encoder, a gallery encoder and their similarity.

A first stage is a model class registered in `FIRST_STAGES` under the name `ModelConfig.first_stage` gives; the
stage-I build and load paths (`factory.build_stage1`, `loading.from_pretrained`) construct it as `cls(config)`, and
the benchmark pipeline and the gallery index rank with `retrieval.search.search_gallery`, which scores with the
interface's similarity, `gallery_similarity`. The built-in one is the BLIP fused retriever (`stage1.Stage1Model`,
name "blip").

    from cirlib.models.first_stage import FIRST_STAGES, FirstStage

    @FIRST_STAGES.register
    class MyRetriever(FirstStage, nn.Module):
        name = "mine"
        def __init__(self, config): ...
        def encode_image(self, images): ...   # ImageFeatures: tokens (B, T, Dv), embeds (B, D) or (B, V, D)
        def encode_query(self, ref_tokens, input_ids, attention_mask): ...   # QueryFeatures: embeds (B, D)

The gallery side may be single-vector ((G, D), cosine of unit vectors) or multi-vector ((G, V, D), e.g. SPRC's
BLIP-2 retriever with V = 32 query-token outputs per image): `gallery_similarity` is then the max over the V vectors
(late interaction). Exact search handles both; FAISS search (one vector per image) refuses a multi-vector gallery.
Not generic yet: the image feature store (`retrieval.feature_store`, hence the gallery index) keys on BLIP's
`visual_encoder`/`vision_proj` and stores one embedding vector per image.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from cirlib.registry import Registry

FIRST_STAGES: Registry = Registry("first stage", "cirlib.models.first_stage")
GALLERY_CHUNK = 4096  # gallery images scored at once for a multi-vector gallery ((N, chunk, V) floats)


@dataclass(frozen=True)
class ImageFeatures:
    tokens: torch.Tensor  # (B, T, Dv) image tokens; the reference's, for the query (and stage II's z_t)
    embeds: torch.Tensor  # (B, D) or (B, V, D) unit-norm gallery embedding(s) of each image


@dataclass(frozen=True)
class QueryFeatures:
    embeds: torch.Tensor  # (B, D) unit-norm retrieval query
    hidden: torch.Tensor  # (B, L, H) last hidden state z_t, stage II's stream-0 input (pad rows included)


def gallery_similarity(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """(N, G) float32 scores: query (N, D) against a gallery (G, D) (inner product: cosine of unit vectors) or
    (G, V, D) (the max over each image's V vectors)."""
    if query.dim() != 2:
        raise ValueError(f"query embeddings must be (N, D), got shape {tuple(query.shape)}")
    if gallery.dim() == 2:
        return query.float() @ gallery.float().T
    if gallery.dim() != 3:
        raise ValueError(f"gallery embeddings must be (G, D) or (G, V, D), got shape {tuple(gallery.shape)}")
    q = query.float()
    parts = [torch.einsum("nd,gvd->ngv", q, gallery[s:s + GALLERY_CHUNK].float()).amax(-1)
             for s in range(0, gallery.shape[0], GALLERY_CHUNK)]
    return torch.cat(parts, dim=1) if parts else q.new_empty(q.shape[0], 0)


class FirstStage(ABC):
    """What every first stage offers. Subclasses are nn.Modules built as `cls(config: ModelConfig)` and keep it as
    `self.config` (saved with the weights by `loading.save_pretrained`).

    Training (`train.tasks.Stage1Task`) also calls `model(ref_tokens, input_ids, attention_mask, target_embeds,
    label_offset)` -> an object with `logits`, `loss` and `query` (as `stage1.Stage1Output`), and reads `model.temp`.
    """

    name: str  # the registry name (`ModelConfig.first_stage`)

    @classmethod
    def from_pretrained(cls, source: str) -> "FirstStage":
        """A saved first stage: a folder written by `loading.save_pretrained` (a run's model/, an exported folder) or
        a Hub reference `hf:<repo id>[@revision]` (see `loading.from_pretrained`)."""
        from cirlib.models.loading import load_as

        return load_as(cls, source)

    @abstractmethod
    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """Gallery encoder. images: (B, 3, S, S) normalised pixels -> tokens (B, T, Dv), embeds (B, D) | (B, V, D)."""

    @abstractmethod
    def encode_query(self, ref_tokens: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> QueryFeatures:
        """Query encoder: the reference's tokens (B, T, Dv) composed with the text ids/mask (B, L) -> embeds (B, D)."""

    @staticmethod
    def similarity(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """(N, G) scores of queries against gallery embeddings: `gallery_similarity`, the rule the search applies
        (inner product of unit vectors; the max over V for a (G, V, D) gallery). The pipeline ranks embeddings
        without the model, so a first stage chooses its rule by the shape of its gallery embeddings, not by
        overriding this."""
        return gallery_similarity(query, gallery)


def first_stage_class(name: str) -> type:
    """The class registered as `name` (RegistryError listing the known names otherwise)."""
    return FIRST_STAGES.get(name)


import cirlib.models.stage1  # noqa: E402,F401  (registers the built-in "blip" first stage)
