"""Stage II (candidate re-ranking): the re-ranker base class, its registry, its query and the one entry that scores
(query, candidate) pairs.

A re-ranker is a `Stage2Model` subclass registered in `RERANKERS` under the name `ModelConfig.reranker` says;
`Stage2Model(config)` builds it. It declares what it reads from the query (`needs_z_t`, `needs_ref_tokens`) and how it
is run, and implements the two execution paths with one signature (`scores_per_pair`, `scores_shared`). Both built-in
ones score a pair with logit 0 of a 2-way head on top of a BERT whose text tokens cross-attend to image tokens:

- "dual" (`DualReranker`, the original, section 5.2 of original-system.md; `reranker_dual.py`): stream 0 is stage
  I's last hidden state z_t, stream 1 the embedded text; the head reads cat(h0[:, 0], h1[:, 0]).
- "joint" (`JointReranker`, `reranker_joint.py`): one BLIP text stream cross-attending to [reference tokens + type 0 ;
  candidate tokens + type 1] (the design the synthetic-world prototype found necessary, and SPRC's re-ranking head).
  With `joint_difference=True` a third segment, (candidate - reference) tokens + type 2, shows what changed between
  the two images where it changed; on the synthetic world this is what lets a from-scratch re-ranker tell a target
  from its near-duplicates within minutes (README, "The demo"). It is computed per pair, so only the per-pair path
  has it.

`Stage2Model.score` is the one place that chooses between the two code paths, which compute the same scores:

- "pairs", the per-pair reference: every pair is a full pass that projects its own candidate tokens to keys/values
  in every layer, exactly like the original;
- "shared": cross-attention keys/values of each candidate (and, for the joint re-ranker, of each reference) are
  computed once per layer and stream and read by every pair that uses them (`shared_attention.py`). Everything before
  the first cross-attention (embeddings, layer-0 self-attention) is computed once per query.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cirlib.models.config import ModelConfig
from cirlib.models.shared_attention import order_by_count
from cirlib.models.vit import build_vit
from cirlib.registry import Registry

# name (ModelConfig.reranker) -> Stage2Model subclass; the built-ins register at the end of this module.
RERANKERS: Registry[type["Stage2Model"]] = Registry("re-ranker", "cirlib.models.rerankers")
# How `Stage2Model.score` computes the scores (the same up to float rounding; see the module docstring).
SCORING_PATHS = ("shared", "pairs")


# ----------------------------------------------------------------------------------------------------------- types
@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean equality
class RerankQuery:
    """The query side of stage II for B queries (text always; z_t and reference tokens where the re-ranker reads them)."""

    input_ids: torch.Tensor  # (B, L) int64 ids, [ENC] at position 0, padded with pad id
    attention_mask: torch.Tensor  # (B, L) 1 for tokens, 0 for padding
    z_t: torch.Tensor | None = None  # (B, L, H) stage-I last hidden state (needs_z_t), pad rows included
    ref_tokens: torch.Tensor | None = None  # (B, T, Dv) stage-II ViT tokens of the reference (needs_ref_tokens)

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise ValueError(f"RerankQuery.input_ids must be (B, L), got {tuple(self.input_ids.shape)}")
        if self.attention_mask.shape != self.input_ids.shape:
            raise ValueError(
                f"RerankQuery.attention_mask {tuple(self.attention_mask.shape)} does not match input_ids "
                f"{tuple(self.input_ids.shape)}")
        if self.z_t is not None and (self.z_t.dim() != 3 or self.z_t.shape[:2] != self.input_ids.shape):
            # The original asserts the same: stage I and stage II must tokenise to the same length.
            raise ValueError(
                f"RerankQuery.z_t must be (B, L, H) with (B, L) = {tuple(self.input_ids.shape)}, "
                f"got {tuple(self.z_t.shape)}")
        if self.ref_tokens is not None and (
                self.ref_tokens.dim() != 3 or self.ref_tokens.shape[0] != self.input_ids.shape[0]):
            raise ValueError(
                f"RerankQuery.ref_tokens must be (B, T, Dv) with B = {self.input_ids.shape[0]}, "
                f"got {tuple(self.ref_tokens.shape)}")

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor | list[int]) -> "RerankQuery":
        """Rows `index` (repeats allowed) as a new query: (B,...) -> (len(index),...)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.input_ids.device)
        return RerankQuery(
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            z_t=None if self.z_t is None else self.z_t[index],
            ref_tokens=None if self.ref_tokens is None else self.ref_tokens[index],
        )

    def trimmed(self) -> "RerankQuery":
        """The same queries without the trailing columns that are padding in every row: (B, L) -> (B, L') with L' the
        longest text among them. Scores do not change (padded positions are masked out of every attention and never
        reach position 0); only the work on padding goes, e.g. for a few queries selected from a block padded to the
        block's longest text."""
        used = self.attention_mask.any(0).nonzero()
        width = int(used.max()) + 1 if used.numel() else 1
        if width == self.input_ids.shape[1]:
            return self
        return RerankQuery(
            input_ids=self.input_ids[:, :width],
            attention_mask=self.attention_mask[:, :width],
            z_t=None if self.z_t is None else self.z_t[:, :width],
            ref_tokens=self.ref_tokens,
        )

    @staticmethod
    def cat(parts: Sequence["RerankQuery"], pad_token_id: int = 0) -> "RerankQuery":
        """Queries of several batches as one (sum of B, max of L), each padded on the right to the longest text
        (ids with pad_token_id, mask and z_t with zeros). All parts must carry the same fields."""
        if not parts:
            raise ValueError("RerankQuery.cat needs at least one part")
        if len({(p.z_t is None, p.ref_tokens is None) for p in parts}) > 1:
            raise ValueError("RerankQuery.cat: the parts carry different fields (z_t / ref_tokens)")
        if len(parts) == 1:
            return parts[0]
        width = max(p.input_ids.shape[1] for p in parts)

        def pad(t: torch.Tensor, value: float) -> torch.Tensor:
            extra = width - t.shape[1]
            return t if extra == 0 else F.pad(t, (0, 0) * (t.dim() - 2) + (0, extra), value=value)

        return RerankQuery(
            input_ids=torch.cat([pad(p.input_ids, pad_token_id) for p in parts]),
            attention_mask=torch.cat([pad(p.attention_mask, 0) for p in parts]),
            z_t=None if parts[0].z_t is None else torch.cat([pad(p.z_t, 0.0) for p in parts]),
            ref_tokens=None if parts[0].ref_tokens is None else torch.cat([p.ref_tokens for p in parts]),
        )

    def nbytes(self) -> int:
        """Bytes of the tensors this query holds."""
        return sum(t.numel() * t.element_size() for t in (self.input_ids, self.attention_mask, self.z_t,
                                                            self.ref_tokens) if t is not None)


@dataclass(frozen=True, eq=False)
class RerankOutput:
    scores: torch.Tensor  # (B, M) logit 0 of query b against its m-th candidate
    loss: torch.Tensor  # () cross-entropy of each row against its positive column


# ------------------------------------------------------------------------------------------------------ model
def init_bert_(module: nn.Module, std: float = 0.02) -> None:
    """BERT initialisation: normal(0, std) weights, zero biases, unit LayerNorms, zero padding embedding."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Stage2Model(nn.Module):
    """Stage-II re-ranker, the base of every registered one: a ViT (`visual_encoder`), the modules that score a
    (query, candidate) pair, and the one scoring entry (`score`) that chooses between the two execution paths.

    `Stage2Model(config)` builds the class registered as `config.reranker` (`RERANKERS`), so code that holds a
    config needs no name: `DualReranker` ("dual", the original) and `JointReranker` ("joint") ship with cirlib; a
    new re-ranker is one subclass in one file, registered with `@RERANKERS.register`, that sets the declarations
    below and implements `build_scorer`, `scores_per_pair` (and `scores_shared`, or `supports_shared_path = False`).
    """

    name: str = ""  # the registry name, what ModelConfig.reranker says
    # ---- what the re-ranker needs from the query (`make_query`, `build_rerank_query` read these)
    needs_z_t: bool = False  # stage I's last hidden state z_t of the text over the reference (`RerankQuery.z_t`)
    needs_ref_tokens: bool = False  # the reference's stage-II ViT tokens (`RerankQuery.ref_tokens`)
    # ---- how it is run
    supports_shared_path: bool = True  # `scores_shared` exists (keys/values once per candidate); else "pairs" only
    supports_joint_difference: bool = False  # accepts ModelConfig.joint_difference=True
    # `rerank` may put several batches of queries in one block (as many as fit in query_block_mib): right when a
    # query's side is cheap to hold and has no keys/values of its own; False makes a block one batch.
    multi_batch_query_blocks: bool = False
    text_streams: int = 1  # hidden states carried per pair by the text encoder (bench's FLOP and memory model)
    # ---- loading: keys that BLIP pre-training does not hold and that start fresh (a regular expression)
    blip_fresh_keys: str = r"^cls_head\."

    def __new__(cls, *args, **kwargs):
        """`Stage2Model(config, ...)` builds the class registered as config.reranker; a subclass builds itself."""
        if cls is Stage2Model:
            config = args[0] if args else kwargs.get("config")
            if not isinstance(config, ModelConfig):
                raise TypeError(f"Stage2Model needs a ModelConfig, got {type(config).__name__}")
            cls = RERANKERS.get(config.reranker)
            if not (isinstance(cls, type) and issubclass(cls, Stage2Model)):
                raise TypeError(f"re-ranker {config.reranker!r} is registered as {cls!r}, not a Stage2Model subclass")
        return super().__new__(cls)

    @classmethod
    def from_pretrained(cls, source: str) -> "Stage2Model":
        """A saved re-ranker: a folder written by `loading.save_pretrained` (a run's model/, an exported folder) or a
        Hub reference `hf:<repo id>[@revision]` (see `loading.from_pretrained`)."""
        from cirlib.models.loading import load_as

        return load_as(cls, source)

    def __init__(self, config: ModelConfig, gradient_checkpointing: bool = False):
        """Args: gradient_checkpointing: see `set_gradient_checkpointing` (not part of the config: it changes memory
        and speed, not the function)."""
        super().__init__()
        if config.reranker != self.name:  # a subclass built directly with another re-ranker's config
            raise ValueError(f"{type(self).__name__} is the {self.name!r} re-ranker; the config says "
                             f"{config.reranker!r}: build Stage2Model(config)")
        if config.joint_difference and not self.supports_joint_difference:
            have = [n for n in RERANKERS.names() if RERANKERS.get(n).supports_joint_difference]
            raise ValueError(f"ModelConfig.joint_difference is an option of the {' / '.join(have)} re-ranker, not "
                             f"of {self.name!r}")
        self.config = config
        self.visual_encoder = build_vit(config.vision, config.stage2_drop_path_rate)
        self.build_scorer(config)
        self.set_gradient_checkpointing(gradient_checkpointing)

    # ------------------------------------------------------------------ what a re-ranker implements
    def build_scorer(self, config: ModelConfig) -> None:
        """Create and initialise the modules that score a pair (text encoder, head, ...)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_scorer")

    def scores_per_pair(self, query: RerankQuery, cand: torch.Tensor) -> torch.Tensor:
        """Per-pair path: query row i against candidate i, a full pass each.

        Args:
            query: P checked query rows (`make_query`), on the model's device.
            cand: (P, T, Dv) stage-II ViT tokens of each row's candidate, on the query's device in the model's dtype.
        Returns:
            (P,) the score of each pair.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement scores_per_pair")

    def scores_shared(self, query: RerankQuery, cand: torch.Tensor, pair_query: torch.Tensor,
                      pair_cand: torch.Tensor) -> torch.Tensor:
        """Shared path: scores of pairs (query row pair_query[i], candidate pair_cand[i]), each candidate (and query)
        encoded once.

        Args:
            query: B checked query rows; cand: (U, T, Dv) candidate tokens (device and dtype as `scores_per_pair`).
            pair_query, pair_cand: (P,) rows of each pair, numbered by non-increasing pair count (`order_by_count`),
                so `group_pairs(pair_cand, U)` buckets them.
        Returns:
            (P,) the score of each pair, equal to `scores_per_pair` up to float rounding.
        """
        raise NotImplementedError(f"{type(self).__name__} has no shared path: score it with scoring='pairs'")

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the text encoder's layer activations in the backward pass of training (less activation memory,
        more compute per step); same losses and gradients. A re-ranker without it refuses enabled=True."""
        if enabled:
            raise ValueError(f"the {self.name!r} re-ranker has no gradient checkpointing")

    @classmethod
    def blip_pretrained_keys(cls, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A BLIP pre-training state dict renamed to this re-ranker's keys (default: as it is)."""
        return sd

    def init_from_stage1(self, stage1: nn.Module) -> list[str]:
        """Start the text side from stage I's text encoder (init="stage1"); returns the stage-I keys it had to leave
        out that it should have taken (the factory refuses the init when there are any)."""
        raise ValueError(f"the {self.name!r} re-ranker cannot start from stage I's text encoder (init='stage1')")

    # ------------------------------------------------------------------ inputs
    @property
    def zt_from_stage1_vit(self) -> bool:
        """Whether z_t is computed from stage I's ViT tokens of the reference (`zt_source="stage1_vit"`), so a
        re-ranking needs that gallery (or store) beside the stage-II one; never for a re-ranker without z_t."""
        return self.needs_z_t and self.config.zt_source == "stage1_vit"

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Stage-II ViT tokens: (B, 3, S, S) -> (B, T, Dv)."""
        return self.visual_encoder.forward_features(images)

    def _check_query(self, query: RerankQuery) -> None:
        if self.needs_z_t and query.z_t is None:
            raise ValueError(f"the {self.name} re-ranker needs RerankQuery.z_t (stage I's last hidden state)")
        if self.needs_ref_tokens and query.ref_tokens is None:
            raise ValueError(f"the {self.name} re-ranker needs RerankQuery.ref_tokens (stage-II ViT tokens of the "
                             "reference)")
        if query.z_t is not None and query.z_t.shape[-1] != self.config.text.hidden_size:
            raise ValueError(
                f"RerankQuery.z_t width {query.z_t.shape[-1]} != text hidden_size {self.config.text.hidden_size}")

    def _tokens(self, tokens: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
        """Image tokens on the query's device in the dtype of the scorer (the last registered parameters);
        checks (N, T, Dv)."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.config.vision.width:
            raise ValueError(f"{what} must be (N, T, {self.config.vision.width}), got {tuple(tokens.shape)}")
        return tokens.to(device=device, dtype=self._last_parameter.dtype)

    @property
    def _last_parameter(self) -> torch.Tensor:
        *_, last = self.parameters()
        return last

    # ------------------------------------------------------------------ the query
    def make_query(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, ref_tokens: torch.Tensor | None,
                   z_t: torch.Tensor | None = None) -> RerankQuery:
        """The query this re-ranker reads: the text always, z_t when `needs_z_t`, the reference's tokens when
        `needs_ref_tokens` (what it does not read is left out).

        Args:
            input_ids, attention_mask: (B, L) the modification texts.
            ref_tokens: (B, T, Dv) stage-II ViT tokens of the references.
            z_t: (B, L, H) stage I's last hidden state (`Stage1Model.encode_query(...).hidden`); required when
                `needs_z_t`, ignored otherwise (pass None to skip computing it).
        """
        if self.needs_z_t and z_t is None:
            raise ValueError(f"the {self.name} re-ranker needs z_t (stage I's last hidden state) to build its query")
        if self.needs_ref_tokens and ref_tokens is None:
            raise ValueError(f"the {self.name} re-ranker needs ref_tokens (stage-II ViT tokens of the references)")
        return RerankQuery(input_ids=input_ids, attention_mask=attention_mask, z_t=z_t if self.needs_z_t else None,
                           ref_tokens=ref_tokens if self.needs_ref_tokens else None)

    # ------------------------------------------------------------------ scoring: the one entry
    def score(self, query: RerankQuery, cand_tokens: torch.Tensor, index: torch.Tensor | None = None, *,
              scoring: str = "shared", max_pairs: int | None = None,
              on_pass: Callable[[int], None] | None = None) -> torch.Tensor:
        """Logit 0 of each query against each of its candidates `cand_tokens[index[b]]`; the one place that chooses
        the code path.

        Args:
            query: B queries (`make_query`).
            cand_tokens: (C, T, Dv) stage-II ViT tokens of the candidates: a gallery, or a batch's targets and
                negatives (any device/dtype; rows are moved to the query's device as they are used).
            index: (B, M) int rows of cand_tokens per query (repeats allowed); None = every query against all C.
            scoring: "shared" (keys/values once per candidate) or "pairs" (one full pass per pair, the original).
            max_pairs: most pairs per forward pass; None = all at once (training: one graph for the batch). With
                "shared" the pairs are sorted by candidate and cut between candidates where possible, so each
                candidate's keys/values are computed once, and only a chunk's candidates move to the query's device;
                with "pairs" they are cut in row order (max_pairs = M scores one query at a time, as the original).
                A (query, candidate) pair that occurs twice in `index` is scored once on the shared path.
            on_pass: called with the number of pairs of `index` scored so far after each pass (a progress bar).
        Returns:
            (B, M) scores on the query's device.
        """
        if scoring not in SCORING_PATHS:
            raise ValueError(f"unknown scoring {scoring!r}: one of {SCORING_PATHS}")
        if max_pairs is not None and max_pairs < 1:
            raise ValueError(f"max_pairs must be >= 1 (or None for all pairs at once), got {max_pairs}")
        b, device = query.batch_size, query.input_ids.device
        if index is None:
            index = torch.arange(cand_tokens.shape[0], device=device).expand(b, -1)
        if index.dim() != 2 or index.shape[0] != b:
            raise ValueError(f"index must be (B={b}, M), got {tuple(index.shape)}")
        _check_index(index, cand_tokens.shape[0], "index")
        m = index.shape[1]
        if scoring == "pairs":
            return self._score_pairs_chunked(query, cand_tokens, index, max_pairs or max(b * m, 1), on_pass)
        if max_pairs is None:
            pair_query = torch.arange(b, device=device).repeat_interleave(m)
            scores = self._score_shared(query, cand_tokens, pair_query, index.reshape(-1)).view(b, m)
            if on_pass is not None:
                on_pass(b * m)
            return scores
        return self._score_shared_chunked(query, cand_tokens, index.to(device), max_pairs, on_pass)

    # ------------------------------------------------------------------ per-pair reference
    def _score_pairs(self, query: RerankQuery, cand_tokens: torch.Tensor) -> torch.Tensor:
        """Per-pair reference path (the original's algorithm): query row i against candidate i, a full pass each.

        Args:
            query: P query rows.
            cand_tokens: (P, T, Dv) stage-II ViT tokens of each row's candidate.
        Returns:
            (P,) logit 0 of each pair.
        """
        self._check_query(query)
        cand = self._tokens(cand_tokens, query.input_ids.device, "cand_tokens")
        if cand.shape[0] != query.batch_size:
            raise ValueError(f"_score_pairs: {query.batch_size} query rows but {cand.shape[0]} candidates")
        return self.scores_per_pair(query, cand)

    def _score_pairs_chunked(self, query: RerankQuery, cand_tokens: torch.Tensor, index: torch.Tensor,
                             max_pairs: int, on_pass: Callable[[int], None] | None = None) -> torch.Tensor:
        """(B, M) per-pair scores, the B*M pairs taken in row order, at most max_pairs per pass."""
        b, m = index.shape
        if b * m == 0:
            return torch.empty(b, m, device=query.input_ids.device)
        flat = index.reshape(-1)
        rows = torch.arange(b, device=index.device).repeat_interleave(m)
        out = []
        for s in range(0, b * m, max_pairs):
            cand = cand_tokens[flat[s:s + max_pairs].to(cand_tokens.device)]
            out.append(self._score_pairs(query.select(rows[s:s + max_pairs]).trimmed(), cand))
            if on_pass is not None:
                on_pass(min(s + max_pairs, b * m))
        return (out[0] if len(out) == 1 else torch.cat(out)).view(b, m)

    # ------------------------------------------------------------------ shared keys/values
    def _score_shared(self, query: RerankQuery, cand_tokens: torch.Tensor, pair_query: torch.Tensor,
                      pair_cand: torch.Tensor) -> torch.Tensor:
        """Scores (P,) of pairs (pair_query[i], pair_cand[i]), every query/candidate encoded once per layer."""
        self._check_query(query)
        if not self.supports_shared_path:
            raise ValueError(f"the {self.name} re-ranker, as configured, scores each pair on its own (no shared path; "
                             "joint_difference=True, say): score it with the per-pair path (scoring='pairs')")
        device = query.input_ids.device
        pair_query, pair_cand = pair_query.to(device), pair_cand.to(device)
        q_order, pq = order_by_count(pair_query, query.batch_size)
        c_order, pc = order_by_count(pair_cand, cand_tokens.shape[0])
        if not _is_identity(q_order, query.batch_size):
            query = query.select(q_order)
        if not _is_identity(c_order, cand_tokens.shape[0]):
            cand_tokens = cand_tokens[c_order.to(cand_tokens.device)]
        return self.scores_shared(query, self._tokens(cand_tokens, device, "cand_tokens"), pq, pc)

    def score_pass(self, query: RerankQuery, cand_tokens: torch.Tensor, shared_pass: "SharedPass") -> torch.Tensor:
        """Scores (P,) of one pass of a `shared_passes` plan: its queries (trimmed to their longest text) against its
        candidates, each candidate's keys/values computed once."""
        chunk_tokens = cand_tokens[shared_pass.candidates.to(cand_tokens.device)]
        return self._score_shared(query.select(shared_pass.queries).trimmed(), chunk_tokens,
                                  shared_pass.local_query, shared_pass.local_cand)

    def _score_shared_chunked(self, query: RerankQuery, cand_tokens: torch.Tensor, index: torch.Tensor,
                              max_pairs: int, on_pass: Callable[[int], None] | None = None) -> torch.Tensor:
        """(B, K) shared-path scores of each query's candidates `index` (on the query's device), pass by pass of
        `shared_passes(index, max_pairs)`; only a pass's candidates are moved to the query's device."""
        b, k = index.shape
        plan = shared_passes(index, max_pairs)
        scores = torch.empty(plan.num_pairs, device=query.input_ids.device, dtype=torch.float32)
        done = 0
        for shared_pass in plan.passes:
            scores[shared_pass.start:shared_pass.end] = self.score_pass(query, cand_tokens, shared_pass).float()
            done += int(plan.repeats[shared_pass.start:shared_pass.end].sum())
            if on_pass is not None:
                on_pass(done)
        return scores[plan.inverse].view(b, k)

    # ------------------------------------------------------------------ training
    def forward(self, query: RerankQuery, cand_tokens: torch.Tensor, cand_index: torch.Tensor | None = None,
                positive: torch.Tensor | None = None) -> RerankOutput:
        """Training logits (shared path) and softmax cross-entropy over each row.

        Args:
            cand_tokens: (B, T, Dv) the batch's targets when cand_index is None (the original's in-batch objective,
                (B, B) logits, positive = arange(B)), else (C, T, Dv) unique candidates.
            cand_index: (B, M) candidate rows per query, or None.
            positive: (B,) column of each row's positive; required with cand_index.
        """
        if cand_index is None:
            if cand_tokens.shape[0] != query.batch_size:
                raise ValueError(f"forward: {query.batch_size} queries but {cand_tokens.shape[0]} targets")
            scores = self.score(query, cand_tokens)
            if positive is None:
                positive = torch.arange(query.batch_size, device=scores.device)
        else:
            if positive is None:
                raise ValueError("forward: give `positive` (B,) column indices together with cand_index")
            scores = self.score(query, cand_tokens, cand_index)
        return RerankOutput(scores=scores, loss=F.cross_entropy(scores.float(), positive.to(scores.device)))


def _is_identity(order: torch.Tensor, n: int) -> bool:
    return order.numel() == n and bool((order == torch.arange(n, device=order.device)).all())


def _check_index(index: torch.Tensor, n: int, what: str) -> None:
    if index.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise ValueError(f"{what} must be an integer tensor, got {index.dtype}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise ValueError(f"{what} holds rows outside [0, {n}): min {int(index.min())}, max {int(index.max())}")


def _chunks(run_lengths: list[int], max_pairs: int) -> list[tuple[int, int]]:
    """Split consecutive runs (pairs of one image) into [start, end) chunks of <= max_pairs, cutting between runs
    where possible and inside a run only when the run alone is too long."""
    chunks: list[tuple[int, int]] = []
    start = pos = 0
    for length in run_lengths:
        if pos + length - start > max_pairs and pos > start:
            chunks.append((start, pos))
            start = pos
        pos += length
        while pos - start > max_pairs:
            chunks.append((start, start + max_pairs))
            start += max_pairs
    if pos > start:
        chunks.append((start, pos))
    return chunks


@dataclass(frozen=True, eq=False)
class SharedPass:
    """One forward pass of the shared path: unique pairs [start, end) of a `SharedPlan` (all of a few candidates)."""

    start: int
    end: int
    queries: torch.Tensor  # (Q,) query rows of the pass
    local_query: torch.Tensor  # (P,) each pair's position in `queries`
    candidates: torch.Tensor  # (C,) candidate rows of the pass
    local_cand: torch.Tensor  # (P,) each pair's position in `candidates`


@dataclass(frozen=True, eq=False)
class SharedPlan:
    """How the shared path scores (B, M) pairs: the unique (query, candidate) pairs sorted by candidate, cut into
    passes of at most max_pairs at candidate boundaries (a candidate with more pairs is split)."""

    passes: list[SharedPass]
    num_pairs: int  # unique pairs
    inverse: torch.Tensor  # (B*M,) each pair of the index -> its unique pair
    repeats: torch.Tensor  # (num_pairs,) how many pairs of the index each unique pair stands for


def shared_passes(index: torch.Tensor, max_pairs: int) -> SharedPlan:
    """The passes `Stage2Model.score(..., scoring="shared", max_pairs=...)` makes for a (B, M) candidate index.

    Pairs are keyed candidate-major (candidate * B + query), so sorting them groups each candidate's pairs; a pair
    that occurs twice (e.g. a CIRR set member that is also in the query's top-k) is scored once."""
    b, m = index.shape
    flat = index.reshape(-1)
    pair_query = torch.arange(b, device=index.device).repeat_interleave(m)
    keys, inverse, repeats = torch.unique(flat * b + pair_query, return_inverse=True, return_counts=True)
    cand, query = keys // b, keys % b
    _, run_lengths = torch.unique_consecutive(cand, return_counts=True)
    passes = []
    for start, end in _chunks(run_lengths.tolist(), max_pairs):
        uq, local_q = torch.unique(query[start:end], return_inverse=True)
        uc, local_c = torch.unique(cand[start:end], return_inverse=True)
        passes.append(SharedPass(start, end, uq, local_q, uc, local_c))
    return SharedPlan(passes, int(keys.numel()), inverse, repeats)


# The built-in re-rankers register themselves here, so that every user of Stage2Model or RERANKERS sees them (they
# subclass Stage2Model, hence the import at the end).
from cirlib.models import reranker_dual, reranker_joint  # noqa: E402,F401
