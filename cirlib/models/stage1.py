"""Stage I (candidate filtering): the original's `BLIP_Retrieval`.

The query is the text encoder's [ENC] output while it cross-attends to all reference-image tokens, projected and
L2-normalised; a candidate is the projected, normalised ViT class token. Training is in-batch softmax over
cosine / temp (one direction, query -> target). Submodule names equal the original's, so its state dict loads
strictly.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cirlib.models.config import ModelConfig
from cirlib.models.first_stage import (  # noqa: F401  (Stage1Output is re-exported: the stage-I training output)
    FIRST_STAGES, INITIAL_TEMP, FirstStage, ImageFeatures, QueryFeatures, Stage1Output)
from cirlib.models.text import build_text_encoder, encode_text, set_gradient_checkpointing
from cirlib.models.vit import build_vit



@FIRST_STAGES.register
class Stage1Model(FirstStage, nn.Module):
    """BLIP_Retrieval: ViT, text encoder with cross-attention, two projections and a learnable temperature.

    The first stage "blip": ImageFeatures.tokens are the ViT tokens after the final norm, embeds (B, P)
    normalize(vision_proj(CLS)); QueryFeatures.embeds (B, P) normalize(text_proj([ENC] output)); cosine similarity.
    """

    name = "blip"
    gives_blip_zt = True  # encode_query(...).hidden is the text encoder's last hidden state: the dual re-ranker's z_t

    def __init__(self, config: ModelConfig, gradient_checkpointing: bool = False):
        """Args: gradient_checkpointing: see `set_gradient_checkpointing` (not part of the config: it changes memory
        and speed, not the function)."""
        super().__init__()
        self.config = config
        self.visual_encoder = build_vit(config.vision, config.stage1_drop_path_rate)
        self.text_encoder = build_text_encoder(config.text, encoder_width=config.vision.width)
        self.vision_proj = nn.Linear(config.vision.width, config.projection_dim)
        self.text_proj = nn.Linear(config.text.hidden_size, config.projection_dim)
        # Learnable, unclamped, used as a divisor (the original's behaviour; the trainer may decide otherwise).
        self.temp = nn.Parameter(torch.tensor(INITIAL_TEMP))
        self.set_gradient_checkpointing(gradient_checkpointing)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the text encoder's layer activations in the backward pass (less activation memory, about a
        third more text-encoder compute per training step); same losses and gradients. The ViT is not affected."""
        set_gradient_checkpointing(self.text_encoder, enabled)

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """Image tokens and candidate embeddings.

        Args:
            images: (B, 3, S, S) normalised pixels, S = config.vision.image_size exactly.
        Returns:
            ImageFeatures with tokens (B, T, Dv) and embeds (B, P).
        """
        tokens = self.visual_encoder.forward_features(images)  # (B, T, Dv)
        return ImageFeatures(tokens=tokens, embeds=self.embed_tokens(tokens))

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Candidate embedding from precomputed ViT tokens: (B, T, Dv) -> (B, P), unit norm."""
        return F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)

    def image_weights(self, outputs: Sequence[str]) -> dict[str, nn.Module]:
        """"tokens": the ViT; with "embeds" also vision_proj (the feature store's key hashes these)."""
        weights = {"visual_encoder": self.visual_encoder}
        if "embeds" in outputs:
            weights["vision_proj"] = self.vision_proj
        return weights

    def image_architecture(self, outputs: Sequence[str]) -> dict[str, Any]:
        """The vision config (vision_proj is a plain linear layer: its weights say all)."""
        return dataclasses.asdict(self.config.vision)

    def encode_query(
        self, ref_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> QueryFeatures:
        """Compose reference image and modification text into the retrieval query.

        Args:
            ref_tokens: (B, T, Dv) reference-image tokens (`encode_image(...).tokens`).
            input_ids: (B, L) ids with [ENC] at position 0.
            attention_mask: (B, L) 1 for tokens, 0 for padding.
        Returns:
            QueryFeatures with embeds (B, P) and hidden z_t (B, L, H).
        """
        if ref_tokens.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"batch mismatch: {ref_tokens.shape[0]} reference token sets for {input_ids.shape[0]} texts"
            )
        hidden = encode_text(self.text_encoder, input_ids, attention_mask, ref_tokens)  # (B, L, H)
        embeds = F.normalize(self.text_proj(hidden[:, 0]), dim=-1)  # (B, P)
        return QueryFeatures(embeds=embeds, hidden=hidden)

    def forward(
        self,
        ref_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        target_embeds: torch.Tensor,
        label_offset: int = 0,
    ) -> Stage1Output:
        """In-batch contrastive logits and loss; target label_offset + i is the positive of query i.

        Args:
            ref_tokens: (B, T, Dv) reference tokens.
            input_ids, attention_mask: (B, L) the modification texts.
            target_embeds: (C, P) unit-norm target embeddings (`encode_image(targets).embeds`): the batch's own
                (C = B, the original), or the targets of every process's batch gathered in rank order (C = N*B).
            label_offset: row of query 0's target in target_embeds (0; rank * B with gathered targets).
        Returns:
            Stage1Output with logits (B, C), the scalar loss and the query embeddings.
        """
        b = input_ids.shape[0]
        if label_offset < 0 or label_offset + b > target_embeds.shape[0]:
            raise ValueError(
                f"batch mismatch: {target_embeds.shape[0]} targets for {b} queries whose positives start at row "
                f"{label_offset}"
            )
        query = self.encode_query(ref_tokens, input_ids, attention_mask).embeds  # (B, P)
        logits = query @ target_embeds.t() / self.temp  # (B, C)
        labels = torch.arange(label_offset, label_offset + b, device=logits.device)
        return Stage1Output(logits=logits, loss=F.cross_entropy(logits, labels), query=query)
