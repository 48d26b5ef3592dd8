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

# Tensors in LAVIS / SPRC files that SPRC's retrieval and losses never read: the Q-Former's masked-LM head, the ITM
# head, and BERT's position-ids buffer (checked to be arange by the loader).
SPRC_UNUSED = re.compile(r"^(Qformer\.cls\.|itm_head\.|Qformer\.bert\.embeddings\.position_ids$)")

# (LAVIS pattern, our replacement), applied in order, first match wins; names left unchanged are listed in _SAME.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^visual_encoder\.cls_token$", "visual_encoder.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "visual_encoder.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "visual_encoder.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm(\d)\.", r"visual_encoder.encoder.layers.\1.layer_norm\2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight$", r"visual_encoder.encoder.layers.\1.self_attn.qkv.weight"),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"visual_encoder.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"visual_encoder.encoder.layers.\1.mlp."),
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (r"^Qformer\.bert\.embeddings\.(word|position)_embeddings\.", r"embeddings.\1_embeddings."),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.",
     r"qformer.encoder.layer.\1.\2.attention."),
    (r"^Qformer\.bert\.encoder\.layer\.", "qformer.encoder.layer."),
)
_SAME = re.compile(r"^(ln_vision|vision_proj|text_proj)\.(weight|bias)$|^(query_tokens|prompt_tokens|temp)$")
_QV_BIAS = re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias$")
_OURS_QKV_BIAS = "visual_encoder.encoder.layers.{}.self_attn.qkv.bias"  # one block's merged q/k/v bias


def rename_key(key: str) -> str | None:
    """Our name of a LAVIS key (None if it has none; the q/v biases are merged by `from_lavis`, not renamed)."""
    if _SAME.match(key):
        return key
    for pattern, repl in _RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


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


# Ours -> LAVIS, for `to_lavis` (each checked to come back through `rename_key`).
_BACK: tuple[tuple[str, str], ...] = (
    (r"^visual_encoder\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^visual_encoder\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^visual_encoder\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^visual_encoder\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"visual_encoder.blocks.\1.norm\2."),
    (r"^visual_encoder\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$", r"visual_encoder.blocks.\1.attn.qkv.weight"),
    (r"^visual_encoder\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"^visual_encoder\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
    (r"^qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
    (r"^embeddings\.(word|position)_embeddings\.", r"Qformer.bert.embeddings.\1_embeddings."),
    (r"^qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.",
     r"Qformer.bert.encoder.layer.\1.\2.self."),
    (r"^qformer\.encoder\.layer\.", "Qformer.bert.encoder.layer."),
)
_OUR_QKV_BIAS = re.compile(r"^visual_encoder\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$")


def lavis_key(key: str) -> str:
    """The LAVIS name of one of our keys (not the merged qkv bias); ValueError if it has none."""
    name = key if _SAME.match(key) else next(
        (re.sub(p, r, key) for p, r in _BACK if re.match(p, key)), None)
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
