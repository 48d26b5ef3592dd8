"""The original's dual-stream stage-II text encoder (`BLIP_NLVR.text_encoder`, section 5.2 of original-system.md).

Stream 0 is stage I's last hidden state z_t, stream 1 the embedded text; each stream has its own self- and
cross-attention, the two cross-attention updates are merged (average below `merge_threshold`, `merge_layer` from it
on) and added to both streams; the FFN is shared. Module names reproduce the original state-dict keys exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from cirlib.models.config import TextConfig
from cirlib.models.reranker_blocks import (
    QKV, Dense, DenseNorm, LayerList, TextEmbeddings, additive_mask, ffn, maybe_dropout,
)
from cirlib.models.shared_attention import grouped_attention


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
        self.self0 = QKV(cfg.hidden_size, kv_width, cfg.num_heads)
        self.self1 = QKV(cfg.hidden_size, kv_width, cfg.num_heads)
        self.output = DualAttentionOutput(cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout, merge_mlp)


class DualLayer(nn.Module):
    """One layer of the original's dual-stream encoder (numerics item 9)."""

    def __init__(self, cfg: TextConfig, encoder_width: int, merge_mlp: bool):
        super().__init__()
        self.attention = DualAttention(cfg, cfg.hidden_size, merge_mlp=False)
        self.crossattention = DualAttention(cfg, encoder_width, merge_mlp=merge_mlp)
        self.intermediate = Dense(cfg.hidden_size, cfg.intermediate_size)
        self.output = DenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout)
        self.attention_dropout = cfg.attention_dropout

    def _self_block(self, h0, h1, mask_add, eager: bool):
        a, p, tr = self.attention, self.attention_dropout, self.training
        o = a.output
        h0 = o.LayerNormA(h0 + maybe_dropout(
            o.dense0(a.self0.self_attention(h0, mask_add, p, tr, eager)), o.dropout.p, tr))
        h1 = o.LayerNormB(h1 + maybe_dropout(
            o.dense1(a.self1.self_attention(h1, mask_add, p, tr, eager)), o.dropout.p, tr))
        return h0, h1

    def _merge_block(self, h0, h1, c0, c1):
        """Merge the per-stream cross-attention contexts c_s (P, L, H) and add the update to both residuals."""
        o = self.crossattention.output
        m = maybe_dropout(o.merge(o.dense0(c0), o.dense1(c1)), o.dropout.p, self.training)  # one mask for both
        h0, h1 = o.LayerNormA(h0 + m), o.LayerNormB(h1 + m)
        return ffn(self.intermediate, self.output, h0), ffn(self.intermediate, self.output, h1)

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
            ctx.append(grouped_attention(q, rows, k, v, grouping, p, tr))
        if rows is not None:  # from here on every pair has its own hidden state
            h0, h1 = h0[rows], h1[rows]
        return self._merge_block(h0, h1, ctx[0], ctx[1])


class DualStreamEncoder(nn.Module):
    """The original's `BLIP_NLVR.text_encoder`: embeddings for stream 1 and the dual-stream layers."""

    def __init__(self, cfg: TextConfig, encoder_width: int, merge_threshold: int):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg, persistent_position_ids=True)
        self.encoder = LayerList(
            [DualLayer(cfg, encoder_width, merge_mlp=i >= merge_threshold) for i in range(cfg.num_layers)])

    def forward_pairs(self, z_t, input_ids, attention_mask, cand_tokens) -> torch.Tensor:
        """Per-pair reference: z_t (P, L, H), ids/mask (P, L), cand_tokens (P, T, Dv) -> (P, 2H) head input."""
        h0, h1 = z_t, self.embeddings(input_ids)  # stream 0 takes z_t as is: no embedding, LayerNorm or dropout
        mask_add = additive_mask(attention_mask, h1.dtype)
        for layer in self.encoder.layer:
            h0, h1 = self.encoder.run(layer.forward_pairs, h0, h1, mask_add, cand_tokens)
        return torch.cat([h0[:, 0], h1[:, 0]], dim=-1)

    def forward_shared(self, z_t, input_ids, attention_mask, cand_tokens, pair_query, grouping) -> torch.Tensor:
        """Shared path: z_t (B, L, H), ids/mask (B, L), cand_tokens (U, T, Dv), pair_query (P,) -> (P, 2H)."""
        h0, h1 = z_t, self.embeddings(input_ids)
        mask_add = additive_mask(attention_mask, h1.dtype)  # (B, L)
        rows: torch.Tensor | None = pair_query  # hidden states stay per query until the first cross-attention
        for layer in self.encoder.layer:
            h0, h1 = self.encoder.run(layer.forward_shared, h0, h1, rows, mask_add, cand_tokens, grouping)
            if rows is not None:
                mask_add, rows = mask_add[rows], None
        return torch.cat([h0[:, 0], h1[:, 0]], dim=-1)

