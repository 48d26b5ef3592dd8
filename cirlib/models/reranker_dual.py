"""The original's stage-II re-ranker, registered as "dual" (`DualReranker`), and its dual-stream text encoder
(`BLIP_NLVR.text_encoder`, section 5.2 of original-system.md).

Stream 0 is stage I's last hidden state z_t, stream 1 the embedded text; each stream has its own self- and
cross-attention, the two cross-attention updates are merged (average below `merge_threshold`, `merge_layer` from it
on) and added to both streams; the FFN is shared. Module names reproduce the original state-dict keys exactly.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import nn

from cirlib.models.config import ModelConfig, TextConfig
from cirlib.models.reranker_blocks import (
    QKV, Dense, DenseNorm, LayerList, TextEmbeddings, additive_mask, ffn, maybe_dropout,
)
from cirlib.models.shared_attention import (
    PairTiles, group_pairs, grouped_attention, tile_pairs, tiled_attention,
)
from cirlib.models.stage2 import RERANKERS, RerankQuery, Stage2Model, init_bert_


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

    def forward_tile(self, h0, h1, mask_add, kv, calls, self_block: bool):
        """One tile of pairs sorted by key (inference): h0, h1 (n, L, H), mask_add (n, L), kv the layer's keys/values
        of every key ((k0, v0), (k1, v1)), each (U, heads, T, d) -> h0, h1 (n, L, H); `self_block=False` when the
        self-attention already ran (layer 0, once per query)."""
        if self_block:
            h0, h1 = self._self_block(h0, h1, mask_add, eager=False)
        c, p, tr = self.crossattention, self.attention_dropout, self.training
        ctx = []
        for proj, h, (k, v) in ((c.self0, h0, kv[0]), (c.self1, h1, kv[1])):
            q = proj.query(h)
            ctx.append(tiled_attention(q.view(*q.shape[:2], proj.num_heads, -1), k, v, calls, p, tr))
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

    def forward_tiled(self, z_t, input_ids, attention_mask, cand_tokens, pair_query, tiles: PairTiles) -> torch.Tensor:
        """The shared path layer by layer in tiles of pairs (inference): the same function as `forward_shared`, with
        each layer's text-side work done tile by tile into preallocated buffers, so its intermediates stay small and
        cache-resident and no gathers or padding are needed. Shapes as `forward_shared`; -> (P, 2H) in pair order."""
        layers = self.encoder.layer
        h0q, h1q = self._query_self_block(layers[0], z_t, self.embeddings(input_ids), attention_mask, tiles)
        rows = pair_query[tiles.order]
        mask = additive_mask(attention_mask, h1q.dtype)[rows]  # (P, L)
        bufs = [h1q.new_empty(2, rows.numel(), *h1q.shape[1:]) for _ in range(2)]  # [stream] x (P, L, H), ping-pong
        kv_bufs = (None, None) if torch.is_autocast_enabled(h1q.device.type) else cand_tokens.new_empty(
            2, 2, cand_tokens.shape[0] * cand_tokens.shape[1], h1q.shape[2])  # [stream][k, v], reused by every layer
        for i, layer in enumerate(layers):
            c = layer.crossattention
            kv = (c.self0.keys_values(cand_tokens, kv_bufs[0]), c.self1.keys_values(cand_tokens, kv_bufs[1]))
            src, dst = bufs[i % 2], bufs[(i + 1) % 2]
            for s, e, calls in tiles.tiles:
                t0, t1 = (h0q[rows[s:e]], h1q[rows[s:e]]) if i == 0 else (src[0, s:e], src[1, s:e])
                dst[0, s:e], dst[1, s:e] = layer.forward_tile(t0, t1, mask[s:e], kv, calls, self_block=i > 0)
        feats = torch.cat([dst[0, :, 0], dst[1, :, 0]], dim=-1)
        return torch.empty_like(feats).index_copy_(0, tiles.order, feats)

    @staticmethod
    def _query_self_block(layer, h0, h1, attention_mask, tiles: PairTiles):
        """Layer 0's self-attention block once per query (B rows), in tiles of the same size as the pairs'."""
        mask = additive_mask(attention_mask, h1.dtype)
        step = max(1, tiles.tiles[0][1] - tiles.tiles[0][0]) if tiles.tiles else 1
        out0, out1 = torch.empty_like(h1), torch.empty_like(h1)
        for s in range(0, h1.shape[0], step):
            out0[s:s + step], out1[s:s + step] = layer._self_block(
                h0[s:s + step], h1[s:s + step], mask[s:s + step], eager=False)
        return out0, out1


# ------------------------------------------------------------------------------------------- the re-ranker
@RERANKERS.register
class DualReranker(Stage2Model):
    """The original's stage II (`BLIP_NLVR`): the dual-stream encoder over stage I's z_t and the embedded text, both
    cross-attending to the candidate; the 2-way head reads cat(h0[:, 0], h1[:, 0])."""

    name = "dual"
    needs_z_t = True
    multi_batch_query_blocks = True  # a query's side is its text and z_t (L x H floats): many fit in a block
    text_streams = 2
    blip_fresh_keys = r"\.merge_layer\.|^cls_head\."
    # Without gradients the shared path runs each layer's text side in tiles of about this many text rows (pairs x L):
    # equal scores, intermediates that stay in cache; 0 = all pairs of a pass at once (the path training uses).
    shared_tile_rows = 1024

    def build_scorer(self, config: ModelConfig) -> None:
        hidden = config.text.hidden_size
        self.text_encoder = DualStreamEncoder(config.text, config.vision.width, config.merge_threshold)
        self.cls_head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        init_bert_(self.text_encoder)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.text_encoder.encoder.gradient_checkpointing = enabled

    def scores_per_pair(self, query: RerankQuery, cand: torch.Tensor) -> torch.Tensor:
        feats = self.text_encoder.forward_pairs(query.z_t, query.input_ids, query.attention_mask, cand)
        return self.cls_head(feats)[:, 0]

    def scores_shared(self, query: RerankQuery, cand: torch.Tensor, pair_query: torch.Tensor,
                      pair_cand: torch.Tensor) -> torch.Tensor:
        if self.shared_tile_rows > 0 and not torch.is_grad_enabled():
            tiles = tile_pairs(pair_cand, cand.shape[0], max(1, self.shared_tile_rows // query.input_ids.shape[1]))
            feats = self.text_encoder.forward_tiled(query.z_t, query.input_ids, query.attention_mask, cand,
                                                    pair_query, tiles)
            return self.cls_head(feats)[:, 0]
        feats = self.text_encoder.forward_shared(query.z_t, query.input_ids, query.attention_mask, cand, pair_query,
                                                 group_pairs(pair_cand, cand.shape[0]))
        return self.cls_head(feats)[:, 0]

    @classmethod
    def blip_pretrained_keys(cls, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The original's key duplication (every attention split into two streams); the un-split originals are
        consumed by it."""
        return dual_stream_state_dict(sd)[0]

    def init_from_stage1(self, stage1: nn.Module) -> list[str]:
        """Takes what fits of stage I's text encoder (the shared FFN and embeddings); the per-stream attention keys
        have other names and start fresh."""
        self.text_encoder.load_state_dict(stage1.text_encoder.state_dict(), strict=False)
        return []


# --------------------------------------------------------------------------- BLIP pre-training's keys, duplicated
# A BLIP text-encoder attention key that the dual stream splits per stream (original blip_stage2.load_checkpoint).
_DUAL_SPLIT = re.compile(
    r"^(text_encoder\.encoder\.layer\.\d+\.(?:attention|crossattention)\.)"
    r"(self|output\.dense|output\.LayerNorm)(\..+)$"
)
_DUAL_NAMES = {"self": ("self0", "self1"), "output.dense": ("output.dense0", "output.dense1"),
               "output.LayerNorm": ("output.LayerNormA", "output.LayerNormB")}


def dual_stream_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The original stage-II key duplication of a BLIP text encoder (every attention split into two streams).

    Each `text_encoder.encoder.layer.N.{attention,crossattention}.` key under `self.` goes to `self0.` and `self1.`,
    under `output.dense.` to `dense0`/`dense1`, under `output.LayerNorm.` to `LayerNormA`/`LayerNormB`; the same
    tensor feeds both streams. Everything else (FFN, embeddings, ViT, ...) is passed through unchanged.

    Args:
        sd: a BLIP state dict.
    Returns:
        (new state dict, the source keys that were split).
    """
    out: dict[str, torch.Tensor] = {}
    split: list[str] = []
    for key, value in sd.items():
        m = _DUAL_SPLIT.match(key)
        if m is None:
            out[key] = value
            continue
        prefix, part, rest = m.groups()
        for name in _DUAL_NAMES[part]:
            out[f"{prefix}{name}{rest}"] = value
        split.append(key)
    return out, split
