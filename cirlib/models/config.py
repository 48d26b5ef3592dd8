"""Model configuration: one frozen dataclass per component, plus named presets.

The defaults are BLIP ViT-B/16 at 384 px and BERT-base with cross-attention (`configs/med_config.json` of the
original), i.e. the `blip-base` preset. The `tiny` preset is sized for the synthetic world and the tests.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 384  # input side in pixels (square)
    patch_size: int = 16  # ViT patch side in pixels
    width: int = 768  # token width
    depth: int = 12  # transformer blocks
    num_heads: int = 12  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden = int(mlp_ratio * width) (EVA-g: 4.3637 -> 6144)
    layer_norm_eps: float = 1e-6  # LayerNorm epsilon (BLIP ViT)

    @property
    def num_tokens(self) -> int:
        """Class token + patches."""
        return 1 + (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 30524  # BERT uncased 30522 + [DEC] + [ENC]
    hidden_size: int = 768  # token width
    num_layers: int = 12  # transformer layers (each: self-attn, cross-attn, FFN)
    num_heads: int = 12  # attention heads
    intermediate_size: int = 3072  # FFN hidden size
    max_position_embeddings: int = 512  # absolute positions
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon (BERT)
    hidden_dropout: float = 0.1  # dropout on hidden states
    attention_dropout: float = 0.1  # dropout on attention probabilities
    pad_token_id: int = 0  # [PAD]


@dataclass(frozen=True)
class QFormerConfig:
    """SPRC's BLIP-2 Q-Former around `ModelConfig.text` (its BERT sizes) and `ModelConfig.vision` (the EVA ViT)."""

    num_query_tokens: int = 32  # learned queries; their outputs are an image's gallery vectors (V = 32)
    prompt_length: int = 32  # SPRC's prompt tokens (its no-image pass reads the fused query at this index)
    cross_attention_frequency: int = 2  # a cross-attention to the image in every 2nd layer (0, 2, ...)
    ln_vision_eps: float = 1e-5  # LAVIS ln_vision (the ViT's own LayerNorms use vision.layer_norm_eps, 1e-6)
    max_text_length: int = 32  # SPRC's tokenizer truncates texts to this many tokens ([CLS] ... [SEP])
    initializer_range: float = 0.02  # std of the query/prompt tokens' normal init


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projection_dim: int = 256  # stage-I joint embedding size
    first_stage: str = "blip"  # stage-I model: a name in models.first_stage.FIRST_STAGES (checked where it is built)
    stage1_drop_path_rate: float = 0.0  # stochastic depth of the stage-I ViT (original: 0)
    stage2_drop_path_rate: float = 0.1  # stochastic depth of the stage-II ViT (original: 0.1)
    reranker: str = "dual"  # stage-II architecture, a registered re-ranker (RERANKERS): dual | joint | ... (checked when built)
    merge_threshold: int = 6  # dual stream: layers >= this merge cross-attention with merge_layer (original hard-codes 6)
    # Joint re-ranker: add a third key segment, candidate minus reference tokens (+ type 2), so that what changed
    # between the two images is an input, not something to learn. Off = [reference ; candidate] only.
    joint_difference: bool = False
    zt_source: str = "stage2_vit"  # stage-II z_t from reference tokens of the "stage2_vit" (original) or "stage1_vit"
    qformer: QFormerConfig | None = None  # the Q-Former of a BLIP-2 first stage (SPRC); None for BLIP

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        vision = VisionConfig(**d.pop("vision", {}))
        text = TextConfig(**d.pop("text", {}))
        qformer = d.pop("qformer", None)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(vision=vision, text=text, qformer=None if qformer is None else QFormerConfig(**qformer), **d)


PRESETS: dict[str, ModelConfig] = {
    "blip-base": ModelConfig(),
    # One 16-px patch per synthetic grid cell (48 px = 3x3 cells), small widths: trains on 2 CPU cores in minutes.
    "tiny": ModelConfig(
        vision=VisionConfig(image_size=48, patch_size=16, width=128, depth=4, num_heads=4),
        text=TextConfig(
            vocab_size=30524, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
            max_position_embeddings=64,
        ),
        projection_dim=128,
        reranker="joint",
    ),
    # SPRC (chunmeifeng/SPRC): EVA-CLIP ViT-g/14 at 224 px without its last block, BERT-base Q-Former, [DEC] added.
    "sprc-g": ModelConfig(
        vision=VisionConfig(image_size=224, patch_size=14, width=1408, depth=39, num_heads=16, mlp_ratio=4.3637),
        text=TextConfig(vocab_size=30523),
        first_stage="sprc",
        reranker="joint",
        qformer=QFormerConfig(),
    ),
    # SPRC at the fixture's sizes (tests/fixtures/sprc-tiny): 32 queries and 32 text tokens kept, narrow widths.
    "sprc-tiny": ModelConfig(
        vision=VisionConfig(image_size=56, patch_size=14, width=48, depth=2, num_heads=4, mlp_ratio=4.3637),
        text=TextConfig(
            vocab_size=30523, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64,
            max_position_embeddings=64,
        ),
        first_stage="sprc",
        reranker="joint",
        qformer=QFormerConfig(),
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Return a named preset, optionally with top-level fields replaced (e.g. text vocab size via `text=`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
