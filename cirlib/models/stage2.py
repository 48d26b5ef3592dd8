"""Stage II (candidate re-ranking): the original's dual-stream `BLIP_NLVR` and a single-stream "joint" re-ranker.

Both score a (query, candidate) pair with logit 0 of a 2-way head on top of a BERT whose text tokens cross-attend to
image tokens:

- `reranker="dual"` (the original, section 5.2 of original-system.md): stream 0 is stage I's last hidden state z_t,
  stream 1 the embedded text; each stream has its own self- and cross-attention, the two cross-attention updates are
  merged (average below `merge_threshold`, `merge_layer` from it on) and added to both streams; the FFN is shared;
  the head reads cat(h0[:, 0], h1[:, 0]). Module names reproduce the original state-dict keys exactly.
- `reranker="joint"`: one BLIP text stream cross-attending to [reference tokens + type 0 ; candidate tokens + type 1]
  (the design the synthetic-world prototype found necessary, and SPRC's re-ranking head). With
  `joint_difference=True` a third segment, (candidate - reference) tokens + type 2, shows what changed between the
  two images where it changed; on the synthetic world this is what lets a from-scratch re-ranker tell a target from
  its near-duplicates within minutes (README, "The demo"). It is computed per pair, so only the per-pair path has it.

Two code paths compute the same scores:

- the per-pair reference (`score_pairs`, `reference_logits`): every pair is a full pass that projects its own
  candidate tokens to keys/values in every layer, exactly like the original;
- the shared path (`score_candidates`, `score_topk`, `train_logits`, `candidate_logits`): cross-attention keys/values
  of each candidate (and, for the joint re-ranker, of each reference) are computed once per layer and stream and read
  by every pair that uses them. The text tokens of all pairs that share a candidate are stacked along the query axis
  of one attention call (cross-attention has no mask on the image side, so text tokens do not interact there), which
  needs neither copies of the candidate tokens nor of their keys/values. Everything before the first cross-attention
  (embeddings, layer-0 self-attention) is computed once per query.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cirlib.models.config import ModelConfig, TextConfig
from cirlib.models.vit import build_vit

RERANKERS = ("dual", "joint")
# BLIP's additive mask value for padded keys (med.py / nlvr_encoder.py: (1 - mask) * -10000), not finfo.min.
MASK_VALUE = -10000.0
# A bucket of candidates (or queries) shares one attention call padded to its largest pair count; a key joins the
# bucket while its count is at least this fraction of that largest count, which bounds the padding to 25 %.
_BUCKET_FILL = 0.75


# ----------------------------------------------------------------------------------------------------------- types
@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean equality
class RerankQuery:
    """The query side of stage II for B queries (text always; z_t for "dual", reference tokens for "joint")."""

    input_ids: torch.Tensor  # (B, L) int64 ids, [ENC] at position 0, padded with pad id
    attention_mask: torch.Tensor  # (B, L) 1 for tokens, 0 for padding
    z_t: torch.Tensor | None = None  # (B, L, H) stage-I last hidden state (dual re-ranker), pad rows included
    ref_tokens: torch.Tensor | None = None  # (B, T, Dv) stage-II ViT tokens of the reference (joint re-ranker)

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


@dataclass(frozen=True, eq=False)
class RerankOutput:
    scores: torch.Tensor  # (B, M) logit 0 of query b against its m-th candidate
    loss: torch.Tensor  # () cross-entropy of each row against its positive column


# ------------------------------------------------------------------------------------------- attention primitives
def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # Skipping the call at p = 0 keeps autograd from storing a mask that changes nothing.
    return F.dropout(x, p, training=True) if training and p > 0 else x


def _additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 mask -> (B, L) additive mask, 0 on tokens and -10000 on padding (the original's convention)."""
    return (1.0 - attention_mask.to(dtype)) * MASK_VALUE


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(N, L, H) -> (N, heads, L, d)."""
    n, length, width = x.shape
    return x.view(n, length, num_heads, width // num_heads).transpose(1, 2)


def _unheads(x: torch.Tensor) -> torch.Tensor:
    """(N, heads, L, d) -> (N, L, H)."""
    n, h, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, h * d)


def _eager_attention(q, k, v, mask_add, p: float, training: bool) -> torch.Tensor:
    """Explicit softmax attention as the original writes it: softmax(q k^T / sqrt(d) + mask) v.

    Args:
        q: (N, h, Lq, d); k, v: (N, h, Lk, d); mask_add: additive (N, 1, 1, Lk) or None.
    Returns:
        (N, h, Lq, d).
    """
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask_add is not None:
        scores = scores + mask_add
    probs = _dropout(scores.softmax(dim=-1), p, training)
    return probs @ v


def _sdpa(q, k, v, mask_add, p: float, training: bool) -> torch.Tensor:
    """The same attention through torch's fused kernel (mask added after the 1/sqrt(d) scaling, as the original)."""
    if mask_add is not None:
        mask_add = mask_add.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_add, dropout_p=p if training else 0.0)


# ------------------------------------------------------------------------------------------------- pair grouping
@dataclass(frozen=True)
class _Bucket:
    start: int  # first key (candidate or query row) of the bucket
    end: int  # one past the last key
    slots: int  # S: pairs per key in this bucket's attention call (padded)
    offset: int  # position of the bucket's first slot in the flat slot list


@dataclass(frozen=True)
class _Grouping:
    """Pairs arranged as keys x slots: all pairs of one key (a candidate or a query) share one attention row.

    Keys are numbered by non-increasing pair count, so each bucket is a contiguous key range and reads a plain slice of
    the per-key keys/values.
    """

    buckets: tuple[_Bucket, ...]
    slot_pair: torch.Tensor  # (N_slots,) pair held by each slot; padding slots repeat their key's first pair
    pair_slot: torch.Tensor  # (P,) slot of each pair


def _order_by_count(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Renumber the used keys of `index` by non-increasing pair count.

    Args:
        index: (P,) key of each pair, in [0, n).
    Returns:
        order (U,) original key of each new key, and the new key of each pair (P,).
    """
    counts = torch.bincount(index, minlength=n)
    order = torch.argsort(-counts, stable=True)[: int((counts > 0).sum())]
    renumber = torch.full((n,), -1, dtype=torch.long, device=index.device)
    renumber[order] = torch.arange(order.numel(), device=index.device)
    return order, renumber[index]


def _group_pairs(keys: torch.Tensor, n_keys: int) -> _Grouping:
    """Bucket pairs by key; `keys` (P,) must come from `_order_by_count` (counts non-increasing, none zero)."""
    device = keys.device
    p = keys.numel()
    counts = torch.bincount(keys, minlength=n_keys)  # (n_keys,)
    by_key = torch.argsort(keys, stable=True)  # pairs sorted by key
    first = torch.cumsum(counts, 0) - counts  # sorted position of each key's first pair
    rank = torch.empty(p, dtype=torch.long, device=device)
    rank[by_key] = torch.arange(p, device=device) - first[keys[by_key]]
    # Buckets over runs of equal counts (few: counts are sorted).
    values, lengths = torch.unique_consecutive(counts, return_counts=True)
    buckets: list[_Bucket] = []
    start = offset = 0
    bucket_start, bucket_slots = 0, None
    slots_of_key = torch.empty(n_keys, dtype=torch.long)
    for value, length in zip(values.tolist(), lengths.tolist()):
        if bucket_slots is None or value < _BUCKET_FILL * bucket_slots:
            if bucket_slots is not None:
                buckets.append(_Bucket(bucket_start, start, bucket_slots, offset))
                offset += (start - bucket_start) * bucket_slots
            bucket_start, bucket_slots = start, value
        slots_of_key[start:start + length] = bucket_slots
        start += length
    buckets.append(_Bucket(bucket_start, start, bucket_slots, offset))
    slots_of_key = slots_of_key.to(device)
    key_base = torch.cumsum(slots_of_key, 0) - slots_of_key  # first slot of each key
    pair_slot = key_base[keys] + rank
    key_of_slot = torch.repeat_interleave(torch.arange(n_keys, device=device), slots_of_key)
    slot_pair = by_key[first][key_of_slot]  # default: the key's first pair (used by padding slots)
    slot_pair[pair_slot] = torch.arange(p, device=device)
    return _Grouping(tuple(buckets), slot_pair, pair_slot)


def _grouped_attention(
    q: torch.Tensor, rows: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, grouping: _Grouping,
    p: float, training: bool,
) -> torch.Tensor:
    """Cross-attention of every pair's text to its key's image tokens, keys/values computed once per key.

    Args:
        q: (R, L, heads, d) text queries, one row per pair or (layer 0) per query.
        rows: (P,) row of q for each pair, or None when q has one row per pair.
        k, v: (U, heads, T, d) keys/values of each key (candidate or reference), numbered as in `grouping`.
    Returns:
        (P, L, heads * d) attention output of each pair.
    """
    _, length, h, d = q.shape
    outs = []
    for b in grouping.buckets:
        n = b.end - b.start
        idx = grouping.slot_pair[b.offset: b.offset + n * b.slots]
        if rows is not None:
            idx = rows[idx]
        # (n*S, L, h, d) -> (n, h, S*L, d): the S pairs' text tokens become one query sequence for their key.
        qg = q[idx].view(n, b.slots * length, h, d).transpose(1, 2)
        o = _sdpa(qg, k[b.start:b.end], v[b.start:b.end], None, p, training)  # (n, h, S*L, d)
        outs.append(o.transpose(1, 2).reshape(n * b.slots, length, h * d))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out[grouping.pair_slot]


class _LogSumExp(torch.autograd.Function):
    """logsumexp over the last dim whose backward reuses the softmax the attention keeps anyway (d lse / ds = softmax),
    so autograd stores no second (pairs, heads, L, T) tensor for it."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(probs)
        ctx.scores_dtype = scores.dtype
        return torch.logsumexp(scores, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (probs,) = ctx.saved_tensors
        return (grad.unsqueeze(-1) * probs).to(ctx.scores_dtype), None


def _grouped_partial_attention(
    q: torch.Tensor, rows: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, grouping: _Grouping,
    p: float, training: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over one part of a pair's image tokens, with the part's log-sum-exp to merge the parts exactly.

    Args: as `_grouped_attention`.
    Returns:
        out (P, heads, L, d) normalised within the part, and lse (P, heads, L).
    """
    _, length, h, d = q.shape
    outs, lses = [], []
    for b in grouping.buckets:
        n = b.end - b.start
        idx = grouping.slot_pair[b.offset: b.offset + n * b.slots]
        if rows is not None:
            idx = rows[idx]
        qg = q[idx].view(n, b.slots * length, h, d).transpose(1, 2)  # (n, h, S*L, d)
        scores = qg @ k[b.start:b.end].transpose(-1, -2) / math.sqrt(d)  # (n, h, S*L, T)
        probs = scores.softmax(dim=-1)
        lse = _LogSumExp.apply(scores, probs.detach())  # (n, h, S*L)
        # Dropout on the part-local probabilities equals dropout on the joint ones: they differ by a per-row factor.
        o = _dropout(probs, p, training) @ v[b.start:b.end]  # (n, h, S*L, d)
        outs.append(o.view(n, h, b.slots, length, d).transpose(1, 2).reshape(n * b.slots, h, length, d))
        lses.append(lse.view(n, h, b.slots, length).transpose(1, 2).reshape(n * b.slots, h, length))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses)
    return out[grouping.pair_slot], lse[grouping.pair_slot]


# ----------------------------------------------------------------------------------------------------- modules
class _QKV(nn.Module):
    """Query (H -> H), key and value (kv_width -> H) projections: BLIP's `self` / the original's `self0`, `self1`."""

    def __init__(self, hidden: int, kv_width: int, num_heads: int):
        super().__init__()
        if hidden % num_heads != 0:
            raise ValueError(f"text hidden_size {hidden} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T, kv_width) -> keys, values (N, heads, T, d)."""
        return _heads(self.key(tokens), self.num_heads), _heads(self.value(tokens), self.num_heads)

    def self_attention(self, x: torch.Tensor, mask_add: torch.Tensor, p: float, training: bool, eager: bool):
        """Self-attention over x (N, L, H) with additive key mask (N, L); returns (N, L, H)."""
        q = _heads(self.query(x), self.num_heads)
        k, v = self.keys_values(x)
        attend = _eager_attention if eager else _sdpa
        return _unheads(attend(q, k, v, mask_add[:, None, None, :], p, training))

    def cross_attention_eager(self, x: torch.Tensor, tokens: torch.Tensor, p: float, training: bool):
        """Per-pair cross-attention of x (N, L, H) to its own image tokens (N, T, kv_width); returns (N, L, H)."""
        q = _heads(self.query(x), self.num_heads)
        k, v = self.keys_values(tokens)
        return _unheads(_eager_attention(q, k, v, None, p, training))


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm, dropout (no token types, as BLIP)."""

    def __init__(self, cfg: TextConfig, persistent_position_ids: bool):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        # The original BLIP_NLVR state dict carries this buffer; transformers 5's BlipText does not.
        self.register_buffer(
            "position_ids", torch.arange(cfg.max_position_embeddings).unsqueeze(0), persistent=persistent_position_ids)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, H)."""
        length = input_ids.shape[1]
        if length > self.position_ids.shape[1]:
            raise ValueError(f"text of {length} tokens exceeds max_position_embeddings {self.position_ids.shape[1]}")
        x = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:, :length])
        return self.dropout(self.LayerNorm(x))


class _Dense(nn.Module):
    """A module holding one `dense` Linear (BERT's `intermediate`)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _DenseNorm(nn.Module):
    """`dense` + `LayerNorm` (+ dropout): BERT's `output` and BLIP's `attention.output`."""

    def __init__(self, d_in: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + _dropout(self.dense(x), self.dropout.p, self.training))


def _ffn(intermediate: _Dense, output: _DenseNorm, x: torch.Tensor) -> torch.Tensor:
    """BERT FFN: LN(x + drop(W2 gelu(W1 x))), exact (erf) GELU."""
    return output(F.gelu(intermediate.dense(x)), x)


# ------------------------------------------------------------------------------------------- dual-stream encoder
class DualAttentionOutput(nn.Module):
    """Per-stream output dense and LayerNorm (`dense0/1`, `LayerNormA/B`), plus `merge_layer` where cross-attention
    updates are merged by a Linear(2H -> H) (no activation, as the original)."""

    def __init__(self, hidden: int, eps: float, dropout: float, merge_mlp: bool):
        super().__init__()
        self.dense0 = nn.Linear(hidden, hidden)
        self.dense1 = nn.Linear(hidden, hidden)
        self.LayerNormA = nn.LayerNorm(hidden, eps=eps)
        self.LayerNormB = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)
        if merge_mlp:
            self.merge_layer = nn.Linear(2 * hidden, hidden)

    def merge(self, u0: torch.Tensor, u1: torch.Tensor) -> torch.Tensor:
        """The update both streams receive: (u0 + u1) / 2 or merge_layer(cat(u0, u1)); (N, L, H)."""
        if hasattr(self, "merge_layer"):
            return self.merge_layer(torch.cat([u0, u1], dim=-1))
        return (u0 + u1) / 2


class DualAttention(nn.Module):
    """`self0`/`self1` projections of the two streams and their `output`."""

    def __init__(self, cfg: TextConfig, kv_width: int, merge_mlp: bool):
        super().__init__()
        self.self0 = _QKV(cfg.hidden_size, kv_width, cfg.num_heads)
        self.self1 = _QKV(cfg.hidden_size, kv_width, cfg.num_heads)
        self.output = DualAttentionOutput(cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout, merge_mlp)


class DualLayer(nn.Module):
    """One layer of the original's dual-stream encoder (numerics item 9)."""

    def __init__(self, cfg: TextConfig, encoder_width: int, merge_mlp: bool):
        super().__init__()
        self.attention = DualAttention(cfg, cfg.hidden_size, merge_mlp=False)
        self.crossattention = DualAttention(cfg, encoder_width, merge_mlp=merge_mlp)
        self.intermediate = _Dense(cfg.hidden_size, cfg.intermediate_size)
        self.output = _DenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout)
        self.attention_dropout = cfg.attention_dropout

    def _self_block(self, h0, h1, mask_add, eager: bool):
        a, p, tr = self.attention, self.attention_dropout, self.training
        o = a.output
        h0 = o.LayerNormA(h0 + _dropout(o.dense0(a.self0.self_attention(h0, mask_add, p, tr, eager)), o.dropout.p, tr))
        h1 = o.LayerNormB(h1 + _dropout(o.dense1(a.self1.self_attention(h1, mask_add, p, tr, eager)), o.dropout.p, tr))
        return h0, h1

    def _merge_block(self, h0, h1, c0, c1):
        """Merge the per-stream cross-attention contexts c_s (P, L, H) and add the update to both residuals."""
        o = self.crossattention.output
        m = _dropout(o.merge(o.dense0(c0), o.dense1(c1)), o.dropout.p, self.training)  # one mask for both
        h0, h1 = o.LayerNormA(h0 + m), o.LayerNormB(h1 + m)
        return _ffn(self.intermediate, self.output, h0), _ffn(self.intermediate, self.output, h1)

    def forward_pairs(self, h0, h1, mask_add, cand_tokens):
        """Per-pair reference: h0, h1 (P, L, H), mask_add (P, L), cand_tokens (P, T, Dv) -> h0, h1 (P, L, H)."""
        h0, h1 = self._self_block(h0, h1, mask_add, eager=True)
        c, p, tr = self.crossattention, self.attention_dropout, self.training
        c0 = c.self0.cross_attention_eager(h0, cand_tokens, p, tr)
        c1 = c.self1.cross_attention_eager(h1, cand_tokens, p, tr)
        return self._merge_block(h0, h1, c0, c1)

    def forward_shared(self, h0, h1, rows, mask_add, cand_tokens, grouping):
        """Shared keys/values: h0, h1 (R, L, H) with `rows` (P,) mapping pairs to rows (None = one row per pair),
        mask_add (R, L), cand_tokens (U, T, Dv) grouped by `grouping` -> h0, h1 (P, L, H)."""
        h0, h1 = self._self_block(h0, h1, mask_add, eager=False)
        c, p, tr = self.crossattention, self.attention_dropout, self.training
        ctx = []
        for proj, h in ((c.self0, h0), (c.self1, h1)):
            q = proj.query(h)
            q = q.view(*q.shape[:2], proj.num_heads, -1)  # (R, L, heads, d)
            k, v = proj.keys_values(cand_tokens)  # (U, heads, T, d): once per candidate
            ctx.append(_grouped_attention(q, rows, k, v, grouping, p, tr))
        if rows is not None:  # from here on every pair has its own hidden state
            h0, h1 = h0[rows], h1[rows]
        return self._merge_block(h0, h1, ctx[0], ctx[1])


class _LayerList(nn.Module):
    """`encoder.layer.{i}` container (BERT naming)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class DualStreamEncoder(nn.Module):
    """The original's `BLIP_NLVR.text_encoder`: embeddings for stream 1 and the dual-stream layers."""

    def __init__(self, cfg: TextConfig, encoder_width: int, merge_threshold: int):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg, persistent_position_ids=True)
        self.encoder = _LayerList(
            [DualLayer(cfg, encoder_width, merge_mlp=i >= merge_threshold) for i in range(cfg.num_layers)])

    def forward_pairs(self, z_t, input_ids, attention_mask, cand_tokens) -> torch.Tensor:
        """Per-pair reference: z_t (P, L, H), ids/mask (P, L), cand_tokens (P, T, Dv) -> (P, 2H) head input."""
        h0, h1 = z_t, self.embeddings(input_ids)  # stream 0 takes z_t as is: no embedding, LayerNorm or dropout
        mask_add = _additive_mask(attention_mask, h1.dtype)
        for layer in self.encoder.layer:
            h0, h1 = layer.forward_pairs(h0, h1, mask_add, cand_tokens)
        return torch.cat([h0[:, 0], h1[:, 0]], dim=-1)

    def forward_shared(self, z_t, input_ids, attention_mask, cand_tokens, pair_query, grouping) -> torch.Tensor:
        """Shared path: z_t (B, L, H), ids/mask (B, L), cand_tokens (U, T, Dv), pair_query (P,) -> (P, 2H)."""
        h0, h1 = z_t, self.embeddings(input_ids)
        mask_add = _additive_mask(attention_mask, h1.dtype)  # (B, L)
        rows: torch.Tensor | None = pair_query  # hidden states stay per query until the first cross-attention
        for layer in self.encoder.layer:
            h0, h1 = layer.forward_shared(h0, h1, rows, mask_add, cand_tokens, grouping)
            if rows is not None:
                mask_add, rows = mask_add[rows], None
        return torch.cat([h0[:, 0], h1[:, 0]], dim=-1)


# ------------------------------------------------------------------------------------------------ joint encoder
class _Attention(nn.Module):
    """BLIP single-stream attention: `self` projections and `output` (dense, LayerNorm)."""

    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.self = _QKV(cfg.hidden_size, kv_width, cfg.num_heads)
        self.output = _DenseNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout)


class JointLayer(nn.Module):
    """A BLIP text layer whose cross-attention reads [reference tokens ; candidate tokens]."""

    def __init__(self, cfg: TextConfig, encoder_width: int):
        super().__init__()
        self.attention = _Attention(cfg, cfg.hidden_size)
        self.crossattention = _Attention(cfg, encoder_width)
        self.intermediate = _Dense(cfg.hidden_size, cfg.intermediate_size)
        self.output = _DenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout)
        self.attention_dropout = cfg.attention_dropout

    def _self_block(self, h, mask_add, eager: bool):
        a = self.attention
        return a.output(a.self.self_attention(h, mask_add, self.attention_dropout, self.training, eager), h)

    def forward_pairs(self, h, mask_add, image_tokens):
        """Per-pair reference: h (P, L, H), mask_add (P, L), image_tokens (P, Tr + Tc, Dv) -> (P, L, H)."""
        h = self._self_block(h, mask_add, eager=True)
        c = self.crossattention
        h = c.output(c.self.cross_attention_eager(h, image_tokens, self.attention_dropout, self.training), h)
        return _ffn(self.intermediate, self.output, h)

    def forward_shared(self, h, rows, mask_add, ref_tokens, ref_grouping, cand_tokens, cand_grouping):
        """Shared path: h (R, L, H) with `rows` (P,) (None = one row per pair), mask_add (R, L), ref_tokens (B, Tr, Dv)
        grouped by `ref_grouping`, cand_tokens (U, Tc, Dv) grouped by `cand_grouping` -> (P, L, H)."""
        h = self._self_block(h, mask_add, eager=False)
        c, p, tr = self.crossattention, self.attention_dropout, self.training
        q = c.self.query(h)
        q = q.view(*q.shape[:2], c.self.num_heads, -1)  # (R, L, heads, d)
        k, v = c.self.keys_values(ref_tokens)  # (B, heads, Tr, d): once per query
        out_r, lse_r = _grouped_partial_attention(q, rows, k, v, ref_grouping, p, tr)
        k, v = c.self.keys_values(cand_tokens)  # (U, heads, Tc, d): once per candidate
        out_c, lse_c = _grouped_partial_attention(q, rows, k, v, cand_grouping, p, tr)
        # softmax over the union of both token sets = the two part-softmaxes weighted by their share of the mass
        lse = torch.logaddexp(lse_r, lse_c)  # (P, heads, L)
        ctx = out_r * torch.exp(lse_r - lse).unsqueeze(-1) + out_c * torch.exp(lse_c - lse).unsqueeze(-1)
        if rows is not None:
            h = h[rows]
        h = c.output(_unheads(ctx), h)
        return _ffn(self.intermediate, self.output, h)


class JointEncoder(nn.Module):
    """Single-stream BLIP text encoder (stage-I `text_encoder` names) for the joint re-ranker."""

    def __init__(self, cfg: TextConfig, encoder_width: int):
        super().__init__()
        # Non-persistent like transformers' BlipText, so a stage-I text-encoder state dict loads strictly.
        self.embeddings = TextEmbeddings(cfg, persistent_position_ids=False)
        self.encoder = _LayerList([JointLayer(cfg, encoder_width) for _ in range(cfg.num_layers)])

    def forward_pairs(self, input_ids, attention_mask, image_tokens) -> torch.Tensor:
        """Per-pair reference: ids/mask (P, L), image_tokens (P, Tr + Tc, Dv) -> (P, H) first-token state."""
        h = self.embeddings(input_ids)
        mask_add = _additive_mask(attention_mask, h.dtype)
        for layer in self.encoder.layer:
            h = layer.forward_pairs(h, mask_add, image_tokens)
        return h[:, 0]

    def forward_shared(self, input_ids, attention_mask, ref_tokens, ref_grouping, cand_tokens, cand_grouping,
                       pair_query) -> torch.Tensor:
        """Shared path: ids/mask (B, L), ref_tokens (B, Tr, Dv), cand_tokens (U, Tc, Dv), pair_query (P,) -> (P, H)."""
        h = self.embeddings(input_ids)
        mask_add = _additive_mask(attention_mask, h.dtype)
        rows: torch.Tensor | None = pair_query
        for layer in self.encoder.layer:
            h = layer.forward_shared(h, rows, mask_add, ref_tokens, ref_grouping, cand_tokens, cand_grouping)
            if rows is not None:
                mask_add, rows = mask_add[rows], None
        return h[:, 0]


# ------------------------------------------------------------------------------------------------------ model
def _init_bert_(module: nn.Module, std: float = 0.02) -> None:
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
    """Stage-II re-ranker: ViT, text encoder ("dual" or "joint") and a 2-way `cls_head`; score = logit 0."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.reranker not in RERANKERS:
            raise ValueError(f"ModelConfig.reranker must be one of {RERANKERS}, got {config.reranker!r}")
        self.config = config
        text, width, hidden = config.text, config.vision.width, config.text.hidden_size
        self.visual_encoder = build_vit(config.vision, config.stage2_drop_path_rate)
        if config.joint_difference and config.reranker != "joint":
            raise ValueError("ModelConfig.joint_difference is an option of the joint re-ranker (reranker='joint')")
        if config.reranker == "dual":
            self.text_encoder = DualStreamEncoder(text, width, config.merge_threshold)
            head_in = 2 * hidden
        else:
            self.text_encoder = JointEncoder(text, width)
            # Added to the image tokens before the keys/values: 0 marks the reference, 1 the candidate,
            # 2 the difference tokens (joint_difference).
            self.image_type_embeddings = nn.Embedding(3 if config.joint_difference else 2, width)
            head_in = hidden
        self.cls_head = nn.Sequential(nn.Linear(head_in, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        _init_bert_(self.text_encoder)
        if config.reranker == "joint":
            _init_bert_(self.image_type_embeddings)

    # ------------------------------------------------------------------ inputs
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Stage-II ViT tokens: (B, 3, S, S) -> (B, T, Dv)."""
        return self.visual_encoder.forward_features(images)

    def _check_query(self, query: RerankQuery) -> None:
        if self.config.reranker == "dual" and query.z_t is None:
            raise ValueError("the dual re-ranker needs RerankQuery.z_t (stage I's last hidden state)")
        if self.config.reranker == "joint" and query.ref_tokens is None:
            raise ValueError("the joint re-ranker needs RerankQuery.ref_tokens (stage-II ViT tokens of the reference)")
        if query.z_t is not None and query.z_t.shape[-1] != self.config.text.hidden_size:
            raise ValueError(
                f"RerankQuery.z_t width {query.z_t.shape[-1]} != text hidden_size {self.config.text.hidden_size}")

    def _tokens(self, tokens: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
        """Image tokens on the query's device in the model's dtype; checks (N, T, Dv)."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.config.vision.width:
            raise ValueError(f"{what} must be (N, T, {self.config.vision.width}), got {tuple(tokens.shape)}")
        return tokens.to(device=device, dtype=self.cls_head[0].weight.dtype)

    def _typed(self, tokens: torch.Tensor, kind: int) -> torch.Tensor:
        """Image tokens plus type embedding `kind` (0 reference, 1 candidate): (N, T, Dv)."""
        return tokens + self.image_type_embeddings.weight[kind]

    # ------------------------------------------------------------------ per-pair reference
    def score_pairs(self, query: RerankQuery, cand_tokens: torch.Tensor) -> torch.Tensor:
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
            raise ValueError(f"score_pairs: {query.batch_size} query rows but {cand.shape[0]} candidates")
        if self.config.reranker == "dual":
            feats = self.text_encoder.forward_pairs(query.z_t, query.input_ids, query.attention_mask, cand)
        else:
            ref = self._tokens(query.ref_tokens, query.input_ids.device, "ref_tokens")
            parts = [self._typed(ref, 0), self._typed(cand, 1)]
            if self.config.joint_difference:
                parts.append(self._typed(cand - ref, 2))
            image = torch.cat(parts, dim=1)  # (P, Tr + Tc [+ Tc], Dv)
            feats = self.text_encoder.forward_pairs(query.input_ids, query.attention_mask, image)
        return self.cls_head(feats)[:, 0]

    def reference_logits(self, query: RerankQuery, cand_tokens: torch.Tensor,
                         cand_index: torch.Tensor | None = None) -> torch.Tensor:
        """(B, M) logits through the per-pair path, one query at a time against its M candidates (as the original).

        Args:
            cand_tokens: (C, T, Dv) candidate tokens.
            cand_index: (B, M) rows of cand_tokens per query; None = every query against all C (M = C).
        """
        b = query.batch_size
        if cand_index is None:
            cand_index = torch.arange(cand_tokens.shape[0], device=cand_tokens.device).expand(b, -1)
        rows = []
        for i in range(b):
            m = cand_index.shape[1]
            rows.append(self.score_pairs(query.select([i] * m), cand_tokens[cand_index[i].to(cand_tokens.device)]))
        return torch.stack(rows)

    # ------------------------------------------------------------------ shared keys/values
    def _score_shared(self, query: RerankQuery, cand_tokens: torch.Tensor, pair_query: torch.Tensor,
                      pair_cand: torch.Tensor) -> torch.Tensor:
        """Scores (P,) of pairs (pair_query[i], pair_cand[i]), every query/candidate encoded once per layer."""
        self._check_query(query)
        if self.config.joint_difference:
            raise ValueError("this joint re-ranker has joint_difference=True, whose (candidate - reference) tokens "
                             "are per pair: score it with the per-pair path (scoring='pairs'), not the shared one")
        device = query.input_ids.device
        pair_query, pair_cand = pair_query.to(device), pair_cand.to(device)
        q_order, pq = _order_by_count(pair_query, query.batch_size)
        c_order, pc = _order_by_count(pair_cand, cand_tokens.shape[0])
        if not _is_identity(q_order, query.batch_size):
            query = query.select(q_order)
        if not _is_identity(c_order, cand_tokens.shape[0]):
            cand_tokens = cand_tokens[c_order.to(cand_tokens.device)]
        cand = self._tokens(cand_tokens, device, "cand_tokens")
        cand_grouping = _group_pairs(pc, c_order.numel())
        if self.config.reranker == "dual":
            feats = self.text_encoder.forward_shared(
                query.z_t, query.input_ids, query.attention_mask, cand, pq, cand_grouping)
        else:
            ref = self._tokens(query.ref_tokens, device, "ref_tokens")
            feats = self.text_encoder.forward_shared(
                query.input_ids, query.attention_mask, self._typed(ref, 0), _group_pairs(pq, q_order.numel()),
                self._typed(cand, 1), cand_grouping, pq)
        return self.cls_head(feats)[:, 0]

    def score_candidates(self, query: RerankQuery, cand_tokens: torch.Tensor) -> torch.Tensor:
        """Every query against every candidate, each candidate's keys/values computed once per layer.

        Args:
            query: B queries.
            cand_tokens: (C, T, Dv) candidate tokens.
        Returns:
            (B, C) scores.
        """
        b, c = query.batch_size, cand_tokens.shape[0]
        device = query.input_ids.device
        pair_query = torch.arange(b, device=device).repeat_interleave(c)
        pair_cand = torch.arange(c, device=device).repeat(b)
        return self._score_shared(query, cand_tokens, pair_query, pair_cand).view(b, c)

    def candidate_logits(self, query: RerankQuery, cand_tokens: torch.Tensor, cand_index: torch.Tensor) -> torch.Tensor:
        """Each query against its own list of M candidates among C unique ones (mixed hard/in-batch negatives).

        Args:
            cand_tokens: (C, T, Dv) the unique candidates.
            cand_index: (B, M) int rows of cand_tokens (repeats allowed).
        Returns:
            (B, M) scores.
        """
        b = query.batch_size
        if cand_index.dim() != 2 or cand_index.shape[0] != b:
            raise ValueError(f"cand_index must be (B={b}, M), got {tuple(cand_index.shape)}")
        _check_index(cand_index, cand_tokens.shape[0], "cand_index")
        m = cand_index.shape[1]
        pair_query = torch.arange(b, device=query.input_ids.device).repeat_interleave(m)
        return self._score_shared(query, cand_tokens, pair_query, cand_index.reshape(-1)).view(b, m)

    def train_logits(self, query: RerankQuery, target_tokens: torch.Tensor) -> torch.Tensor:
        """The original's in-batch logits: (B, B), row i = query i against every target of the batch."""
        if target_tokens.shape[0] != query.batch_size:
            raise ValueError(f"train_logits: {query.batch_size} queries but {target_tokens.shape[0]} targets")
        return self.score_candidates(query, target_tokens)

    def score_topk(self, query: RerankQuery, gallery_tokens: torch.Tensor, topk_index: torch.Tensor,
                   max_pairs: int = 4096) -> torch.Tensor:
        """Scores of each query's K candidates, looked up by gallery index.

        Pairs are sorted by gallery image and cut into chunks of at most `max_pairs` at image boundaries, so each
        image's keys/values are computed once (an image with more than max_pairs pairs is split). Only the chunk's
        images are moved to the query's device.

        Args:
            query: B queries.
            gallery_tokens: (G, T, Dv) stage-II ViT tokens of the gallery (any device/dtype).
            topk_index: (B, K) int gallery rows.
            max_pairs: most (query, candidate) pairs per forward pass.
        Returns:
            (B, K) scores.
        """
        b = query.batch_size
        if topk_index.dim() != 2 or topk_index.shape[0] != b:
            raise ValueError(f"topk_index must be (B={b}, K), got {tuple(topk_index.shape)}")
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
        _check_index(topk_index, gallery_tokens.shape[0], "topk_index")
        k = topk_index.shape[1]
        device = query.input_ids.device
        flat = topk_index.reshape(-1).to(device)
        pair_query = torch.arange(b, device=device).repeat_interleave(k)
        order = torch.argsort(flat, stable=True)  # pairs by gallery image
        _, run_lengths = torch.unique_consecutive(flat[order], return_counts=True)
        scores = torch.empty(b * k, device=device, dtype=torch.float32)
        for start, end in _chunks(run_lengths.tolist(), max_pairs):
            pairs = order[start:end]
            uq, local_q = torch.unique(pair_query[pairs], return_inverse=True)
            uc, local_c = torch.unique(flat[pairs], return_inverse=True)
            chunk_tokens = gallery_tokens[uc.to(gallery_tokens.device)]
            s = self._score_shared(query.select(uq), chunk_tokens, local_q, local_c)
            scores[pairs] = s.float()
        return scores.view(b, k)

    # ------------------------------------------------------------------ training
    def forward(self, query: RerankQuery, cand_tokens: torch.Tensor, cand_index: torch.Tensor | None = None,
                positive: torch.Tensor | None = None) -> RerankOutput:
        """Training logits and softmax cross-entropy over each row.

        Args:
            cand_tokens: (B, T, Dv) the batch's targets when cand_index is None (the original's in-batch objective,
                positive = arange(B)), else (C, T, Dv) unique candidates.
            cand_index: (B, M) candidate rows per query, or None.
            positive: (B,) column of each row's positive; required with cand_index.
        """
        if cand_index is None:
            scores = self.train_logits(query, cand_tokens)
            if positive is None:
                positive = torch.arange(query.batch_size, device=scores.device)
        else:
            if positive is None:
                raise ValueError("forward: give `positive` (B,) column indices together with cand_index")
            scores = self.candidate_logits(query, cand_tokens, cand_index)
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
