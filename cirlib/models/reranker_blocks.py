"""Building blocks of the stage-II text encoders: attention primitives (BLIP's additive mask, explicit and fused
softmax attention) and the BERT modules both re-rankers share (query/key/value projections, embeddings, FFN).

Module and attribute names follow BLIP/BERT, so the state-dict keys equal the original's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from cirlib.models.config import TextConfig
from cirlib.models.text import MASK_VALUE  # BLIP's additive mask value (nlvr_encoder.py too)


# ------------------------------------------------------------------------------------------- attention primitives
def maybe_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # Skipping the call at p = 0 keeps autograd from storing a mask that changes nothing.
    return F.dropout(x, p, training=True) if training and p > 0 else x


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 mask -> (B, L) additive mask, 0 on tokens and -10000 on padding (the original's convention)."""
    return (1.0 - attention_mask.to(dtype)) * MASK_VALUE


def heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(N, L, H) -> (N, heads, L, d)."""
    n, length, width = x.shape
    return x.view(n, length, num_heads, width // num_heads).transpose(1, 2)


def unheads(x: torch.Tensor) -> torch.Tensor:
    """(N, heads, L, d) -> (N, L, H)."""
    n, h, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, h * d)


def eager_attention(q, k, v, mask_add, p: float, training: bool) -> torch.Tensor:
    """Explicit softmax attention as the original writes it: softmax(q k^T / sqrt(d) + mask) v.

    Args:
        q: (N, h, Lq, d); k, v: (N, h, Lk, d); mask_add: additive (N, 1, 1, Lk) or None.
    Returns:
        (N, h, Lq, d).
    """
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask_add is not None:
        scores = scores + mask_add
    probs = maybe_dropout(scores.softmax(dim=-1), p, training)
    return probs @ v


def sdpa(q, k, v, mask_add, p: float, training: bool) -> torch.Tensor:
    """The same attention through torch's fused kernel (mask added after the 1/sqrt(d) scaling, as the original)."""
    if mask_add is not None:
        mask_add = mask_add.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_add, dropout_p=p if training else 0.0)


# ----------------------------------------------------------------------------------------------------- modules
class QKV(nn.Module):
    """Query (H -> H), key and value (kv_width -> H) projections: BLIP's `self` / the original's `self0`, `self1`."""

    def __init__(self, hidden: int, kv_width: int, num_heads: int):
        super().__init__()
        if hidden % num_heads != 0:
            raise ValueError(f"text hidden_size {hidden} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def keys_values(self, tokens: torch.Tensor,
                    out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T, kv_width) -> keys, values (N, heads, T, d); `out`: two (N * T, H) buffers to write them into (reused
        across layers, large projections then touch no fresh memory; no autograd)."""
        if out is None:
            return heads(self.key(tokens), self.num_heads), heads(self.value(tokens), self.num_heads)
        n, t, _ = tokens.shape
        flat = tokens.reshape(n * t, -1)
        k = torch.addmm(self.key.bias, flat, self.key.weight.t(), out=out[0])
        v = torch.addmm(self.value.bias, flat, self.value.weight.t(), out=out[1])
        return heads(k.view(n, t, -1), self.num_heads), heads(v.view(n, t, -1), self.num_heads)

    def self_attention(self, x: torch.Tensor, mask_add: torch.Tensor, p: float, training: bool, eager: bool):
        """Self-attention over x (N, L, H) with additive key mask (N, L); returns (N, L, H)."""
        q = heads(self.query(x), self.num_heads)
        k, v = self.keys_values(x)
        attend = eager_attention if eager else sdpa
        return unheads(attend(q, k, v, mask_add[:, None, None, :], p, training))

    def cross_attention_eager(self, x: torch.Tensor, tokens: torch.Tensor, p: float, training: bool):
        """Per-pair cross-attention of x (N, L, H) to its own image tokens (N, T, kv_width); returns (N, L, H)."""
        q = heads(self.query(x), self.num_heads)
        k, v = self.keys_values(tokens)
        return unheads(eager_attention(q, k, v, None, p, training))


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


class Dense(nn.Module):
    """A module holding one `dense` Linear (BERT's `intermediate`)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class DenseNorm(nn.Module):
    """`dense` + `LayerNorm` (+ dropout): BERT's `output` and BLIP's `attention.output`."""

    def __init__(self, d_in: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + maybe_dropout(self.dense(x), self.dropout.p, self.training))


def ffn(intermediate: Dense, output: DenseNorm, x: torch.Tensor) -> torch.Tensor:
    """BERT FFN: LN(x + drop(W2 gelu(W1 x))), exact (erf) GELU."""
    return output(F.gelu(intermediate.dense(x)), x)


class LayerList(nn.Module):
    """`encoder.layer.{i}` container (BERT naming), which runs the layers, optionally with gradient checkpointing."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layer = nn.ModuleList(layers)
        # Recompute each layer's activations in the backward pass instead of keeping them (training with gradients
        # only). use_reentrant=False keeps the RNG state, so dropout masks, losses and gradients are unchanged.
        self.gradient_checkpointing = False

    def run(self, method, *args):
        """`method(*args)` (a layer's bound forward_pairs / forward_shared), checkpointed when enabled and useful."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(method, *args, use_reentrant=False)
        return method(*args)

