"""LAVIS / SPRC state-dict names -> `SPRCRetriever`'s (transformers BLIP-2 module names), and back.

The map is the one of transformers' `convert_blip_2_original_to_pytorch.py` (the EVA ViT, the Q-Former's BERT) plus
SPRC's own tensors. The ViT's separate `q_bias` / `v_bias` become one `qkv.bias` with a zero key part (EVA adds a zero
key bias; so does transformers). Every key of a file is either mapped or in `SPRC_UNUSED` (tensors SPRC's checkpoint
holds but its model never reads); anything else is an error naming it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# Tensors in LAVIS / SPRC files that SPRC's retrieval and losses never read: the Q-Former's masked-LM head (its
# decoder weight is tied to the word embeddings), the ITM head, and BERT's position-ids buffer (an arange).
SPRC_UNUSED = re.compile(r"^(Qformer\.cls\.|itm_head\.|Qformer\.bert\.embeddings\.position_ids$)")

# (LAVIS name, our name), first match wins: "{}" stands for a block/layer number; a name ending in "." is a prefix
# (the rest of the key is kept), any other name is the whole key. Used in both directions.
_PAIRS: tuple[tuple[str, str], ...] = (
    ("visual_encoder.cls_token", "visual_encoder.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "visual_encoder.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "visual_encoder.embeddings.patch_embedding."),
    ("visual_encoder.blocks.{}.norm{}.", "visual_encoder.encoder.layers.{}.layer_norm{}."),
    ("visual_encoder.blocks.{}.attn.qkv.weight", "visual_encoder.encoder.layers.{}.self_attn.qkv.weight"),
    ("visual_encoder.blocks.{}.attn.proj.", "visual_encoder.encoder.layers.{}.self_attn.projection."),
    ("visual_encoder.blocks.{}.mlp.", "visual_encoder.encoder.layers.{}.mlp."),
    ("Qformer.bert.embeddings.LayerNorm.", "qformer.layernorm."),
    ("Qformer.bert.embeddings.word_embeddings.", "embeddings.word_embeddings."),
    ("Qformer.bert.embeddings.position_embeddings.", "embeddings.position_embeddings."),
    ("Qformer.bert.encoder.layer.{}.attention.self.", "qformer.encoder.layer.{}.attention.attention."),
    ("Qformer.bert.encoder.layer.{}.crossattention.self.", "qformer.encoder.layer.{}.crossattention.attention."),
    ("Qformer.bert.encoder.layer.{}.", "qformer.encoder.layer.{}."),
    *((name, name) for name in ("ln_vision.", "vision_proj.", "text_proj.", "query_tokens", "prompt_tokens", "temp")),
)
_QV_BIAS = re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias$")
_OURS_QKV_BIAS = "visual_encoder.encoder.layers.{}.self_attn.qkv.bias"  # one block's merged q/k/v bias
_OUR_QKV_BIAS = re.compile(r"^visual_encoder\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$")


def _translate(key: str, column: int) -> str | None:
    """`key` renamed from column `column` of _PAIRS (0: LAVIS) to the other one; None if no pair matches."""
    for pair in _PAIRS:
        src, dst = pair[column], pair[1 - column]
        pattern = "^" + re.escape(src).replace(re.escape("{}"), r"(\d+)") + ("" if src.endswith(".") else "$")
        if m := re.match(pattern, key):
            return dst.format(*m.groups()) + key[m.end():]
    return None


def rename_key(key: str) -> str | None:
    """Our name of a LAVIS key (None if it has none; the q/v biases are merged by `from_lavis`, not renamed)."""
    return _translate(key, 0)


def from_lavis(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Rename a LAVIS/SPRC state dict to ours.

    Returns:
        (ours, ignored, unmapped): ours in float32 where the file held fp16/bf16 (SPRC saves its ViT in fp16), the
        `SPRC_UNUSED` keys left out, and the keys with no counterpart (the caller refuses them).
    """
    ours: dict[str, torch.Tensor] = {}
    ignored, unmapped = [], []
    biases: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if value.is_floating_point():
            value = value.float()
        if SPRC_UNUSED.match(key):
            ignored.append(key)
        elif m := _QV_BIAS.match(key):
            biases.setdefault(m.group(1), {})[m.group(2)] = value
        elif (name := rename_key(key)) is not None:
            ours[name] = value
        else:
            unmapped.append(key)
    for block, qv in biases.items():
        if set(qv) != {"q", "v"}:
            unmapped += [f"visual_encoder.blocks.{block}.attn.{k}_bias" for k in qv]
            continue
        ours[_OURS_QKV_BIAS.format(block)] = torch.cat([qv["q"], torch.zeros_like(qv["q"]), qv["v"]])
    return ours, ignored, unmapped


def lavis_key(key: str) -> str:
    """The LAVIS name of one of our keys (not the merged qkv bias); ValueError if it has none."""
    name = _translate(key, 1)
    if name is None or rename_key(name) != key:
        raise ValueError(f"{key} has no LAVIS name")
    return name


def to_lavis(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in LAVIS/SPRC names (the inverse of `from_lavis`; the qkv bias's key part must be zero)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if m := _OUR_QKV_BIAS.match(key):
            q, k, v = value.chunk(3)
            if bool(k.any()):
                raise ValueError(f"{key}: the key bias is not zero; EVA's attention has no key bias")
            out[f"visual_encoder.blocks.{m.group(1)}.attn.q_bias"] = q.clone()
            out[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] = v.clone()
        else:
            out[lavis_key(key)] = value.clone()
    return out
