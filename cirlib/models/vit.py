"""BLIP's image encoder: a plain ViT (class token, pre-norm blocks, final norm) built from timm.

Parameter names match BLIP's `visual_encoder.*` (cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}, norm), so BLIP and original-code checkpoints load without renaming.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cirlib.models.config import VisionConfig


def build_vit(cfg: VisionConfig, drop_path_rate: float = 0.0) -> VisionTransformer:
    """Build the BLIP ViT; image tokens are `vit.forward_features(images)`.

    Args:
        cfg: vision geometry (image/patch size, width, depth, heads, MLP ratio, LayerNorm eps).
        drop_path_rate: stochastic depth at the last block, spaced linearly from 0 over the blocks (original:
            0 in stage I, 0.1 in stage II).
    Returns:
        A timm VisionTransformer without head; `forward_features` maps (B, 3, S, S) to (B, T, Dv) tokens,
        T = 1 + (S / patch)^2, after the final LayerNorm.
    """
    if cfg.image_size % cfg.patch_size != 0:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    if cfg.width % cfg.num_heads != 0:
        raise ValueError(f"ViT width {cfg.width} is not divisible by num_heads {cfg.num_heads}")
    return VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_classes=0,  # no head: both stages consume the token sequence
        global_pool="",  # keep every token; pooling (CLS) is done by the stage models
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        class_token=True,
        pre_norm=False,  # timm's `pre_norm` is a LayerNorm after the patch embedding (CLIP); BLIP has none
        final_norm=True,
        # The original (timm 0.4.12 PatchEmbed) asserts the exact input size; keep that check on.
        dynamic_img_size=False,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps),
        act_layer=nn.GELU,  # exact (erf) GELU as BLIP
    )


def interpolate_pos_embed(
    pos_embed: torch.Tensor, num_tokens: int, num_extra_tokens: int = 1
) -> torch.Tensor:
    """Resize a ViT position embedding to another square patch grid, as BLIP does when loading a checkpoint.

    The extra (CLS) rows are kept; the grid rows are reshaped row-major to (g, g), resized with PyTorch bicubic
    (align_corners=False, no antialias) in fp32, and flattened back. No-op (same values) when the sizes agree.

    Args:
        pos_embed: (1, N, D) position embedding of the checkpoint, N = extra + g*g.
        num_tokens: token count of the model, extra + g'*g'.
        num_extra_tokens: leading non-grid rows (1: the class token).
    Returns:
        (1, num_tokens, D) tensor in the dtype of `pos_embed`.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, N, D), got {tuple(pos_embed.shape)}")
    n = pos_embed.shape[1]
    if n == num_tokens:
        return pos_embed.clone()
    old_grid = _grid_side(n - num_extra_tokens, "checkpoint pos_embed")
    new_grid = _grid_side(num_tokens - num_extra_tokens, "model")
    dim = pos_embed.shape[2]
    extra = pos_embed[:, :num_extra_tokens]
    grid = pos_embed[:, num_extra_tokens:].float()
    grid = grid.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)  # (1, g'*g', D)
    return torch.cat([extra, grid], dim=1)


def _grid_side(num_patches: int, what: str) -> int:
    side = math.isqrt(max(num_patches, 0))
    if side * side != num_patches or side == 0:
        raise ValueError(f"{what}: {num_patches} patch positions do not form a square grid")
    return side
