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
        def __init__(self, config): ...       # keeps the frozen ViT as `self.visual_encoder`
        def encode_image(self, images): ...   # ImageFeatures: tokens (B, T, Dv), embeds (B, D) or (B, V, D)
        def embed_tokens(self, tokens): ...   # embeds from tokens (a tokens-only feature store's)
        def encode_query(self, ref_tokens, input_ids, attention_mask): ...   # QueryFeatures: embeds (B, D)

The gallery side may be single-vector ((G, D), cosine of unit vectors) or multi-vector ((G, V, D), e.g. SPRC's
BLIP-2 retriever with V = 32 query-token outputs per image): `gallery_similarity` is then the max over the V vectors
(late interaction).

What the pipeline asks of a first stage beyond encoding, with defaults a subclass overrides (`FirstStage`):

- `tokenize_queries(tokenizer, texts)`: its text rules, applied wherever stage-I queries are tokenized (the
  benchmark's `search.encode_queries`, the gallery index's queries in `workbook.search.rank`, stage-I training);
  default: the run's `CIRTokenizer` as is (BLIP: [ENC] over [CLS], no truncation);
- `image_weights(outputs)` and `image_architecture(outputs)`: what a feature store's values depend on (hashed into
  its key): "tokens" = the ViT (`visual_encoder`) and the vision config; with "embeds" also the gallery head
  (default: every weight and the whole model config; BLIP: `vision_proj` and the vision config alone);
- `trains_gallery_head`: False when gallery embeddings are a frozen function of the image during stage-I training
  (BLIP: frozen ViT + frozen vision_proj), so a training store may hold them; True when the head that makes them
  trains (SPRC: ln_vision, Q-Former, vision_proj), so a training store holds the ViT tokens only and targets are
  `embed_tokens(tokens)`. After training the weights are fixed: top-k extraction and the gallery index store
  embeddings of either kind.

Generic in the pipeline: exact and FAISS search of single- and multi-vector galleries (`search.search_gallery`),
the feature store (any per-image embedding shape, (E,) or (V, E); key from the hooks above), the gallery index and
top-k files. Not generic: stage II's z_t. `QueryFeatures.hidden` is what the dual re-ranker reads as z_t only where a
first stage declares it a BLIP text encoder's last hidden state (`gives_blip_zt`, BLIP: True); over any other first
stage (SPRC: its Q-Former's no-image pass) a re-ranker that `needs_z_t` is refused (`require_blip_zt`) and the joint
re-ranker, which reads no z_t, is the one to use.
"""
from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

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


INITIAL_TEMP = 0.07  # the contrastive temperature's init (BLIP's and BLIP-2's); a checkpoint overwrites it


@dataclass(frozen=True)
class Stage1Output:
    """What a first stage's training forward returns (`FirstStage` below)."""

    logits: torch.Tensor  # (B, C) query-target scores / temp; row i = query i against every target given
    loss: torch.Tensor  # () the training loss (cross-entropy of each row against column label_offset + i, plus terms)
    query: torch.Tensor  # (B, P) the normalised query embeddings the logits were computed from
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # named loss terms, when loss is a sum (logged)


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
    label_offset)` -> an object with `logits`, `loss` and `query` (`Stage1Output`), and reads `model.temp`.
    """

    name: str  # the registry name (`ModelConfig.first_stage`)
    # True when stage-I training updates the weights that make gallery embeddings from the ViT tokens (a training
    # feature store then holds tokens only, and targets are `embed_tokens(tokens)` with grad); False (BLIP) when
    # they are frozen there, so stored embeddings stay valid through training.
    trains_gallery_head: bool = False
    # True when `encode_query(...).hidden` is a BLIP text encoder's last hidden state over the reference (z_t, the
    # dual re-ranker's stream-0 input, hidden size = the re-ranker's text width); False for any other hidden state.
    gives_blip_zt: bool = False

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

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Gallery embedding(s) from image tokens (`encode_image(x).tokens`): (B, D) or (B, V, D), unit norm. What a
        tokens-only feature store's images are embedded with (stage-I validation while the gallery head trains)."""
        raise NotImplementedError(f"first stage {type(self).__name__} ({self.name!r}) does not embed stored tokens: "
                                  "define embed_tokens(tokens), or use a feature store holding embeds")

    def tokenize_queries(self, tokenizer, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) (B, L) of stage-I query texts under this first stage's text rules, with the
        run's `CIRTokenizer`. Default: the tokenizer as is (BLIP's rule: [ENC] over [CLS], padded to the longest, no
        truncation)."""
        return tokenizer(list(texts))

    def set_loss_weights(self, weights: Mapping[str, float]) -> None:
        """Weights of the training loss's auxiliary terms by name. Default: none to weigh (an error unless empty)."""
        if weights:
            raise ValueError(f"the {self.name!r} first stage has no auxiliary losses to weigh; got {dict(weights)}")

    def image_weights(self, outputs: Sequence[str]) -> dict[str, nn.Module | torch.Tensor]:
        """The modules and tensors an image's stored `outputs` ("tokens", "embeds") depend on, by name: hashed into a
        feature store's key and put in eval mode while it is built. "tokens": {"visual_encoder"}. With "embeds",
        default: the whole model besides (every weight, safe); override to name the gallery head alone, so that a
        store survives changes to the text side (BLIP: vision_proj)."""
        weights: dict[str, nn.Module | torch.Tensor] = {"visual_encoder": self.visual_encoder}
        if "embeds" in outputs:
            weights["first_stage"] = self
        return weights

    def image_architecture(self, outputs: Sequence[str]) -> dict[str, Any]:
        """The configuration (not weights) an image's stored `outputs` depend on, JSON values (part of a feature
        store's key). "tokens": the vision config. With "embeds", default: also the whole model config (safe);
        override to narrow it (BLIP: the vision config alone)."""
        arch = dataclasses.asdict(self.config.vision)
        if "embeds" in outputs:
            arch["model"] = dataclasses.asdict(self.config)
        return json.loads(json.dumps(arch))  # as a key read back from JSON (tuples are lists)

    @staticmethod
    def similarity(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """(N, G) scores of queries against gallery embeddings: `gallery_similarity`, the rule the search applies
        (inner product of unit vectors; the max over V for a (G, V, D) gallery). The pipeline ranks embeddings
        without the model, so a first stage chooses its rule by the shape of its gallery embeddings, not by
        overriding this."""
        return gallery_similarity(query, gallery)


def require_blip_zt(stage1: Any, stage2: Any) -> None:
    """Refuse (ValueError) a re-ranker that `needs_z_t` over a first stage that does not declare `gives_blip_zt`.

    Args:
        stage1: the first stage (an instance or its class).
        stage2: the re-ranker (a `Stage2Model`, or any object with `name` and `needs_z_t`).
    """
    if getattr(stage2, "needs_z_t", False) and not getattr(stage1, "gives_blip_zt", False):
        name = getattr(stage1, "name", type(stage1).__name__)
        raise ValueError(f"the re-ranker {stage2.name!r} needs BLIP z_t; first stage {name!r} gives none: "
                         "use `reranker: joint` (which needs no z_t)")


def first_stage_class(name: str) -> type:
    """The class registered as `name` (RegistryError listing the known names otherwise)."""
    return FIRST_STAGES.get(name)


import cirlib.models.stage1  # noqa: E402,F401  (registers the built-in "blip" first stage)
import cirlib.models.sprc  # noqa: E402,F401  (registers SPRC's BLIP-2 retriever, "sprc")
