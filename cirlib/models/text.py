"""BLIP's text encoder (BERT with cross-attention to image tokens), built from transformers' `BlipTextModel`.

Parameter names equal BLIP's `text_encoder.*` without the prefix (embeddings.{word,position}_embeddings,
embeddings.LayerNorm, encoder.layer.N.{attention,crossattention}.{self.{query,key,value}, output.{dense,LayerNorm}},
encoder.layer.N.{intermediate.dense, output.{dense,LayerNorm}}). There is no token-type embedding and no pooler.
"""
from __future__ import annotations

import functools

import torch
import torch.utils.checkpoint
from transformers import BlipTextConfig, BlipTextModel

from cirlib.models.config import TextConfig

# BLIP's additive mask value for padded keys (med.py: (1 - mask) * -10000), not finfo.min.
MASK_VALUE = -10000.0


def blip_text_config(cfg: TextConfig, encoder_width: int) -> BlipTextConfig:
    """The transformers config for BLIP's bidirectional text encoder with cross-attention of width `encoder_width`."""
    if cfg.hidden_size % cfg.num_heads != 0:
        raise ValueError(f"text hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    return BlipTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        encoder_hidden_size=encoder_width,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act="gelu",  # exact erf GELU, as BERT/BLIP
        layer_norm_eps=cfg.layer_norm_eps,
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        pad_token_id=cfg.pad_token_id,
        # Generation-only ids: unused by an encoder, and BLIP's defaults (30522, ...) fall outside small vocabularies.
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        # BlipTextLayer only builds `crossattention` when the config says decoder; the forward pass is still run
        # with is_decoder=False (bidirectional self-attention), which is BLIP's "multimodal" encoder mode.
        is_decoder=True,
        use_cache=False,
        attn_implementation="eager",
    )


def build_text_encoder(cfg: TextConfig, encoder_width: int) -> BlipTextModel:
    """Build BLIP's text encoder (no pooler); forward it through `encode_text`.

    Args:
        cfg: BERT geometry, vocabulary and dropout.
        encoder_width: width Dv of the image tokens its cross-attention reads (keys/values Dv -> hidden).
    """
    return BlipTextModel(blip_text_config(cfg, encoder_width), add_pooling_layer=False)


def set_gradient_checkpointing(text_encoder: BlipTextModel, enabled: bool) -> None:
    """Recompute each text layer's activations in the backward pass instead of keeping them (training mode only).

    transformers' `BlipTextModel` does not offer `gradient_checkpointing_enable`, but its layers are
    `GradientCheckpointingLayer`s, which checkpoint through the function their `_gradient_checkpointing_func` holds
    when `gradient_checkpointing` is set (what `PreTrainedModel.gradient_checkpointing_enable` assigns): here
    `torch.utils.checkpoint.checkpoint` with use_reentrant=False, which keeps the RNG state, so dropout masks and
    therefore losses and gradients are the same as without it.
    """
    for layer in text_encoder.encoder.layer:
        layer.gradient_checkpointing = enabled
        layer._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


def extended_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """BLIP's additive self-attention mask: 0 on tokens, -10000 on padding.

    Args:
        attention_mask: (B, L) 1 for tokens, 0 for padding.
        dtype: float dtype of the attention scores.
    Returns:
        (B, 1, 1, L) additive mask, broadcast over heads and query positions.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, L), got {tuple(attention_mask.shape)}")
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * MASK_VALUE


def encode_text(
    text_encoder: BlipTextModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
) -> torch.Tensor:
    """Run the text encoder bidirectionally, cross-attending to image tokens when given.

    Args:
        text_encoder: from `build_text_encoder`.
        input_ids: (B, L) token ids ([ENC] first).
        attention_mask: (B, L) 1 for tokens, 0 for padding.
        encoder_hidden_states: (B, T, Dv) image tokens, all attended (BLIP's all-ones image mask), or None for
            text-only mode (no cross-attention).
    Returns:
        (B, L, H) last hidden state (output of the last layer's final LayerNorm), pad rows included.
    """
    dtype = text_encoder.embeddings.word_embeddings.weight.dtype
    # A 4-D float mask is used as given by transformers, so the exact BLIP -10000 convention is kept.
    mask = extended_attention_mask(attention_mask, dtype)
    out = text_encoder(
        input_ids=input_ids,
        attention_mask=mask,
        encoder_hidden_states=encoder_hidden_states,
        # An all-ones image mask adds 0 to every score; None skips the addition with the same result.
        encoder_attention_mask=None,
        is_decoder=False,
        use_cache=False,
    )
    return out.last_hidden_state
