"""The single-stream stage-II re-ranker, registered as "joint" (`JointReranker`), and its text encoder: one BLIP text
stream cross-attending to the reference and the candidate tokens (and, with `joint_difference`, their difference),
each marked by a type embedding.
"""
from __future__ import annotations

import torch
from torch import nn

from cirlib.models.config import ModelConfig, TextConfig
from cirlib.models.reranker_blocks import QKV, Dense, DenseNorm, LayerList, TextEmbeddings, additive_mask, ffn, unheads
from cirlib.models.shared_attention import group_pairs, grouped_partial_attention
from cirlib.models.stage2 import RERANKERS, RerankQuery, Stage2Model, init_bert_


# ------------------------------------------------------------------------------------------------ joint encoder
class Attention(nn.Module):
    """BLIP single-stream attention: `self` projections and `output` (dense, LayerNorm)."""

    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.self = QKV(cfg.hidden_size, kv_width, cfg.num_heads)
        self.output = DenseNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout)


class JointLayer(nn.Module):
    """A BLIP text layer whose cross-attention reads [reference tokens ; candidate tokens]."""

    def __init__(self, cfg: TextConfig, encoder_width: int):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size)
        self.crossattention = Attention(cfg, encoder_width)
        self.intermediate = Dense(cfg.hidden_size, cfg.intermediate_size)
        self.output = DenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout)
        self.attention_dropout = cfg.attention_dropout

    def _self_block(self, h, mask_add, eager: bool):
        a = self.attention
        return a.output(a.self.self_attention(h, mask_add, self.attention_dropout, self.training, eager), h)

    def forward_pairs(self, h, mask_add, image_tokens):
        """Per-pair reference: h (P, L, H), mask_add (P, L), image_tokens (P, Tr + Tc, Dv) -> (P, L, H)."""
        h = self._self_block(h, mask_add, eager=True)
        c = self.crossattention
        h = c.output(c.self.cross_attention_eager(h, image_tokens, self.attention_dropout, self.training), h)
        return ffn(self.intermediate, self.output, h)

    def forward_shared(self, h, rows, mask_add, ref_tokens, ref_grouping, cand_tokens, cand_grouping):
        """Shared path: h (R, L, H) with `rows` (P,) (None = one row per pair), mask_add (R, L), ref_tokens (B, Tr, Dv)
        grouped by `ref_grouping`, cand_tokens (U, Tc, Dv) grouped by `cand_grouping` -> (P, L, H)."""
        h = self._self_block(h, mask_add, eager=False)
        c, p, tr = self.crossattention, self.attention_dropout, self.training
        q = c.self.query(h)
        q = q.view(*q.shape[:2], c.self.num_heads, -1)  # (R, L, heads, d)
        k, v = c.self.keys_values(ref_tokens)  # (B, heads, Tr, d): once per query
        out_r, lse_r = grouped_partial_attention(q, rows, k, v, ref_grouping, p, tr)
        k, v = c.self.keys_values(cand_tokens)  # (U, heads, Tc, d): once per candidate
        out_c, lse_c = grouped_partial_attention(q, rows, k, v, cand_grouping, p, tr)
        # softmax over the union of both token sets = the two part-softmaxes weighted by their share of the mass
        lse = torch.logaddexp(lse_r, lse_c)  # (P, heads, L)
        ctx = out_r * torch.exp(lse_r - lse).unsqueeze(-1) + out_c * torch.exp(lse_c - lse).unsqueeze(-1)
        if rows is not None:
            h = h[rows]
        h = c.output(unheads(ctx), h)
        return ffn(self.intermediate, self.output, h)


class JointEncoder(nn.Module):
    """Single-stream BLIP text encoder (stage-I `text_encoder` names) for the joint re-ranker."""

    def __init__(self, cfg: TextConfig, encoder_width: int):
        super().__init__()
        # Non-persistent like transformers' BlipText, so a stage-I text-encoder state dict loads strictly.
        self.embeddings = TextEmbeddings(cfg, persistent_position_ids=False)
        self.encoder = LayerList([JointLayer(cfg, encoder_width) for _ in range(cfg.num_layers)])

    def forward_pairs(self, input_ids, attention_mask, image_tokens) -> torch.Tensor:
        """Per-pair reference: ids/mask (P, L), image_tokens (P, Tr + Tc, Dv) -> (P, H) first-token state."""
        h = self.embeddings(input_ids)
        mask_add = additive_mask(attention_mask, h.dtype)
        for layer in self.encoder.layer:
            h = self.encoder.run(layer.forward_pairs, h, mask_add, image_tokens)
        return h[:, 0]

    def forward_shared(self, input_ids, attention_mask, ref_tokens, ref_grouping, cand_tokens, cand_grouping,
                       pair_query) -> torch.Tensor:
        """Shared path: ids/mask (B, L), ref_tokens (B, Tr, Dv), cand_tokens (U, Tc, Dv), pair_query (P,) -> (P, H)."""
        h = self.embeddings(input_ids)
        mask_add = additive_mask(attention_mask, h.dtype)
        rows: torch.Tensor | None = pair_query
        for layer in self.encoder.layer:
            h = self.encoder.run(layer.forward_shared, h, rows, mask_add, ref_tokens, ref_grouping, cand_tokens,
                                 cand_grouping)
            if rows is not None:
                mask_add, rows = mask_add[rows], None
        return h[:, 0]



# ------------------------------------------------------------------------------------------------ the re-ranker
@RERANKERS.register
class JointReranker(Stage2Model):
    """One BLIP text stream cross-attending to [reference tokens + type 0 ; candidate tokens + type 1] (and, with
    `joint_difference`, (candidate - reference) tokens + type 2); the 2-way head reads h[:, 0]."""

    name = "joint"
    needs_ref_tokens = True
    supports_joint_difference = True
    # a query's side holds the reference's tokens, whose keys/values every pass a query is in would recompute
    multi_batch_query_blocks = False
    blip_fresh_keys = r"^cls_head\.|^image_type_embeddings\."

    @property
    def supports_shared_path(self) -> bool:
        """The difference tokens are per pair: with joint_difference only the per-pair path has them."""
        return not self.config.joint_difference

    def build_scorer(self, config: ModelConfig) -> None:
        hidden, width = config.text.hidden_size, config.vision.width
        self.text_encoder = JointEncoder(config.text, width)
        # Added to the image tokens before the keys/values: 0 marks the reference, 1 the candidate,
        # 2 the difference tokens (joint_difference).
        self.image_type_embeddings = nn.Embedding(3 if config.joint_difference else 2, width)
        self.cls_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        init_bert_(self.text_encoder)
        init_bert_(self.image_type_embeddings)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.text_encoder.encoder.gradient_checkpointing = enabled

    def _typed(self, tokens: torch.Tensor, kind: int) -> torch.Tensor:
        """Image tokens plus type embedding `kind` (0 reference, 1 candidate, 2 difference): (N, T, Dv)."""
        return tokens + self.image_type_embeddings.weight[kind]

    def scores_per_pair(self, query: RerankQuery, cand: torch.Tensor) -> torch.Tensor:
        ref = self._tokens(query.ref_tokens, query.input_ids.device, "ref_tokens")
        parts = [self._typed(ref, 0), self._typed(cand, 1)]
        if self.config.joint_difference:
            parts.append(self._typed(cand - ref, 2))
        image = torch.cat(parts, dim=1)  # (P, Tr + Tc [+ Tc], Dv)
        return self.cls_head(self.text_encoder.forward_pairs(query.input_ids, query.attention_mask, image))[:, 0]

    def scores_shared(self, query: RerankQuery, cand: torch.Tensor, pair_query: torch.Tensor,
                      pair_cand: torch.Tensor) -> torch.Tensor:
        ref = self._tokens(query.ref_tokens, query.input_ids.device, "ref_tokens")
        feats = self.text_encoder.forward_shared(
            query.input_ids, query.attention_mask, self._typed(ref, 0), group_pairs(pair_query, query.batch_size),
            self._typed(cand, 1), group_pairs(pair_cand, cand.shape[0]), pair_query)
        return self.cls_head(feats)[:, 0]

    def init_from_stage1(self, stage1: nn.Module) -> list[str]:
        """Takes all of stage I's text encoder (the same BLIP names); returns the stage-I keys it has no place for."""
        _, unexpected = self.text_encoder.load_state_dict(stage1.text_encoder.state_dict(), strict=False)
        return list(unexpected)
