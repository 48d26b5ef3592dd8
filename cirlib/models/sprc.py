"""SPRC's retriever (chunmeifeng/SPRC, ICLR'24; model `Blip2QformerCirAlignPrompt`) as the first stage "sprc".

BLIP-2 on transformers' modules: the EVA ViT (`Blip2VisionModel` without its final LayerNorm), LAVIS's `ln_vision`
(eps 1e-5, trained), the Q-Former (`Blip2QFormerModel` with the text FFN) and its word/position embeddings, 32 query
tokens and SPRC's 32 prompt tokens.

- Gallery: the Q-Former's 32 query outputs over ln_vision(ViT tokens) -> vision_proj -> (B, 32, P), unit norm;
  a query scores an image by the max over the 32 (`first_stage.gallery_similarity`).
- Query: pass 1 = Q-Former(32 queries + text, cross-attending to the reference); its 32 query outputs are the
  "prompt"; pass 2 = Q-Former(prompt + text, no image: every position through the text FFN, no cross-attention);
  text_proj of position 32 (the text's [CLS]) -> (B, P), unit norm.
- Losses: itc (query vs targets, max over 32, / temp), rtc (SPRC's prompt tokens + text with no image: [CLS], the
  32 prompt tokens, text[1:], positions over all of them; position 0) and align (MSE of the pass-1 prompt's mean
  against the detached prompt tokens' mean); loss = itc + rtc_weight * rtc + align_weight * align.

Attention runs "eager" (the original's arithmetic). SPRC's text ids are padded to 32; ours to the longest text of the
batch: padded keys are masked, so every unpadded position is the same.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from cirlib.models.config import ModelConfig, QFormerConfig
from cirlib.models.first_stage import (FIRST_STAGES, INITIAL_TEMP, FirstStage, ImageFeatures, QueryFeatures,
                                       Stage1Output, gallery_similarity)
from cirlib.models.sprc_keys import from_lavis

if TYPE_CHECKING:
    from cirlib.models.loading import LoadReport

CHECKPOINT_KEY = "Blip2QformerCirAlignPrompt"  # SPRC's checkpoint: {'epoch', CHECKPOINT_KEY: state_dict}
_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")  # what LAVIS's pre_caption turns into spaces
_SPACES = re.compile(r"\s{2,}")
CAPTION_MAX_WORDS = 50  # BlipCaptionProcessor's default word limit


@dataclass(frozen=True)
class SPRCLossWeights:
    """Weights of SPRC's auxiliary losses (itc weighs 1). CIRR: 0.4 / 0.4 (the default); FashionIQ: 1 / 1."""

    rtc: float = 0.4
    align: float = 0.4


@dataclass(frozen=True)
class FusedQuery:
    embeds: torch.Tensor  # (B, P) unit-norm retrieval query
    prompt: torch.Tensor  # (B, Q, H) pass 1's query outputs (the reference and text's prompt)
    hidden: torch.Tensor  # (B, Q + L, H) pass 2's last hidden state


def pre_caption(caption: str, max_words: int = CAPTION_MAX_WORDS) -> str:
    """LAVIS BlipCaptionProcessor: lower case, .!"()*#:;~ to spaces, runs of spaces to one, at most max_words."""
    text = _SPACES.sub(" ", _PUNCTUATION.sub(" ", caption.lower())).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def blip2_vision_config(config: ModelConfig) -> Blip2VisionConfig:
    """transformers' config of the EVA ViT `config.vision` describes (eager attention, q/v biases)."""
    v = config.vision
    cfg = Blip2VisionConfig(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio),
                            num_hidden_layers=v.depth, num_attention_heads=v.num_heads, image_size=v.image_size,
                            patch_size=v.patch_size, hidden_act="gelu", layer_norm_eps=v.layer_norm_eps,
                            attention_dropout=0.0, initializer_range=0.02, qkv_bias=True)
    cfg._attn_implementation = "eager"
    return cfg


def blip2_qformer_config(config: ModelConfig, q: QFormerConfig) -> Blip2QFormerConfig:
    """transformers' config of the Q-Former: BERT sizes from `config.text`, its text FFN on (SPRC feeds it text)."""
    t = config.text
    cfg = Blip2QFormerConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, intermediate_size=t.intermediate_size, hidden_act="gelu",
        hidden_dropout_prob=t.hidden_dropout, attention_probs_dropout_prob=t.attention_dropout,
        max_position_embeddings=t.max_position_embeddings, initializer_range=q.initializer_range,
        layer_norm_eps=t.layer_norm_eps, pad_token_id=t.pad_token_id,
        cross_attention_frequency=q.cross_attention_frequency, encoder_hidden_size=config.vision.width,
        use_qformer_text_input=True)
    cfg._attn_implementation = "eager"
    return cfg


def _learned_tokens(n: int, width: int, std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(1, n, width) * std)


@FIRST_STAGES.register
class SPRCRetriever(FirstStage, nn.Module):
    """SPRC's BLIP-2 retriever; `config.qformer` gives the Q-Former's settings (its BERT sizes: `config.text`)."""

    name = "sprc"
    trains_gallery_head = True  # ln_vision, the Q-Former and vision_proj make the gallery vectors and train
    gives_blip_zt = False  # encode_query(...).hidden is the Q-Former's no-image pass, not a BLIP z_t

    def __init__(self, config: ModelConfig, loss_weights: SPRCLossWeights = SPRCLossWeights()):
        super().__init__()
        if config.qformer is None:
            raise ValueError("the sprc first stage needs ModelConfig.qformer (a QFormerConfig); use a sprc-* preset")
        if config.stage1_drop_path_rate:
            raise ValueError(f"stage1_drop_path_rate={config.stage1_drop_path_rate}: the sprc first stage's ViT "
                             "(transformers' BLIP-2 vision model) has no stochastic depth; SPRC uses 0")
        q = config.qformer
        self.config = config
        self.loss_weights = loss_weights
        self.visual_encoder = Blip2VisionModel(blip2_vision_config(config))
        self.visual_encoder.post_layernorm = nn.Identity()  # LAVIS's EVA ViT ends without a norm; ln_vision follows
        self.ln_vision = nn.LayerNorm(config.vision.width, eps=q.ln_vision_eps)
        qcfg = blip2_qformer_config(config, q)
        self.embeddings = Blip2TextEmbeddings(qcfg)
        self.qformer = Blip2QFormerModel(qcfg)
        self.query_tokens = _learned_tokens(q.num_query_tokens, config.text.hidden_size, q.initializer_range)
        self.prompt_tokens = _learned_tokens(q.prompt_length, config.text.hidden_size, q.initializer_range)
        self.vision_proj = nn.Linear(config.text.hidden_size, config.projection_dim)
        self.text_proj = nn.Linear(config.text.hidden_size, config.projection_dim)
        self.temp = nn.Parameter(torch.tensor(INITIAL_TEMP))  # unclamped, a divisor (SPRC's)

    def set_loss_weights(self, weights: Mapping[str, float]) -> None:
        """Weights of rtc and align (itc weighs 1); names left out keep the current weight."""
        known = {f.name for f in dataclasses.fields(SPRCLossWeights)}
        if unknown := set(weights) - known:
            raise ValueError(f"unknown SPRC loss weight(s) {sorted(unknown)}: the weighted terms are {sorted(known)}")
        self.loss_weights = dataclasses.replace(self.loss_weights, **weights)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the Q-Former's layer activations in the backward pass (same losses and gradients)."""
        if enabled:
            self.qformer.activation_checkpointing_enable()
        else:
            self.qformer.activation_checkpointing_disable()

    # ------------------------------------------------------------------------------------------------------ images

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """images (B, 3, S, S) -> tokens (B, T, Dv) (the ViT's output before ln_vision), embeds (B, Q, P)."""
        tokens = self.visual_encoder(pixel_values=images).last_hidden_state
        return ImageFeatures(tokens=tokens, embeds=self.embed_tokens(tokens))

    def image_queries(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, Q, H) the Q-Former's query outputs over ln_vision(tokens) (the gallery side before vision_proj)."""
        image = self.ln_vision(tokens)
        queries = self.query_tokens.expand(tokens.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Gallery vectors from ViT tokens: (B, T, Dv) -> (B, Q, P), unit norm."""
        return F.normalize(self.vision_proj(self.image_queries(tokens)), dim=-1)

    def image_weights(self, outputs: tuple[str, ...]) -> dict[str, nn.Module | torch.Tensor]:
        """What the image outputs depend on: the ViT for "tokens"; with "embeds" also ln_vision, the Q-Former, the
        query tokens and vision_proj."""
        weights: dict[str, nn.Module | torch.Tensor] = {"visual_encoder": self.visual_encoder}
        if "embeds" in outputs:
            weights.update(ln_vision=self.ln_vision, qformer=self.qformer, query_tokens=self.query_tokens,
                           vision_proj=self.vision_proj)
        return weights

    # ------------------------------------------------------------------------------------------------------- texts

    def tokenize_queries(self, tokenizer: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SPRC's text rules on the run's CIRTokenizer: LAVIS pre_caption, [CLS] kept, at most max_text_length
        tokens ([SEP] kept), padded to the longest. Returns input_ids, attention_mask (B, L) int64."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"tokenize_queries expects a sequence of strings, got {type(texts).__name__}")
        enc = tokenizer.bert([pre_caption(t) for t in texts], padding="longest", truncation=True,
                             max_length=self.config.qformer.max_text_length, return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def _qformer_text(self, embeds: torch.Tensor, mask: torch.Tensor,
                      image: torch.Tensor | None = None, query_length: int = 0) -> torch.Tensor:
        return self.qformer(query_embeds=embeds, query_length=query_length, attention_mask=mask,
                            encoder_hidden_states=image).last_hidden_state

    def fuse(self, ref_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> FusedQuery:
        """SPRC's two passes (module docstring): the prompt from the reference and text, then the query."""
        b, nq = input_ids.shape[0], self.query_tokens.shape[1]
        queries = self.query_tokens.expand(b, -1, -1)
        mask = torch.cat([attention_mask.new_ones(b, nq), attention_mask], dim=1)
        first = self._qformer_text(self.embeddings(input_ids, query_embeds=queries), mask,
                                   image=self.ln_vision(ref_tokens), query_length=nq)
        prompt = first[:, :nq]
        hidden = self._qformer_text(self.embeddings(input_ids, query_embeds=prompt), mask)
        # SPRC reads index 32 (hard-coded): the text's [CLS], right after its 32 query tokens.
        return FusedQuery(embeds=F.normalize(self.text_proj(hidden[:, nq]), dim=-1), prompt=prompt, hidden=hidden)

    def relative_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, 1 + R + L - 1, H) SPRC's no-image pass: [CLS], the R prompt tokens, text[1:], positions over all."""
        b = input_ids.shape[0]
        words = self.embeddings.word_embeddings(input_ids)
        prompts = self.prompt_tokens.expand(b, -1, -1)
        seq = torch.cat([words[:, :1], prompts, words[:, 1:]], dim=1)
        seq = seq + self.embeddings.position_embeddings(torch.arange(seq.shape[1], device=seq.device))
        mask = torch.cat([attention_mask[:, :1], attention_mask.new_ones(b, prompts.shape[1]),
                          attention_mask[:, 1:]], dim=1)
        return self._qformer_text(seq, mask)

    def text_only(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, P) the relative (no-image) query of the rtc loss: position 0 of `relative_hidden`."""
        return F.normalize(self.text_proj(self.relative_hidden(input_ids, attention_mask)[:, 0]), dim=-1)

    def encode_query(self, ref_tokens: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> QueryFeatures:
        """ref_tokens (B, T, Dv) (`encode_image(...).tokens`), ids/mask (B, L) from `tokenize_queries` ->
        embeds (B, P); hidden (B, Q + L, H) is pass 2's last hidden state (not a BLIP z_t)."""
        if ref_tokens.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"batch mismatch: {ref_tokens.shape[0]} reference token sets for {input_ids.shape[0]} texts")
        fused = self.fuse(ref_tokens, input_ids, attention_mask)
        return QueryFeatures(embeds=fused.embeds, hidden=fused.hidden)

    # ---------------------------------------------------------------------------------------------------- training

    def forward(self, ref_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                target_embeds: torch.Tensor, label_offset: int = 0) -> Stage1Output:
        """SPRC's losses against target_embeds (C, Q, P) (`embed_tokens` of the targets, with grad); query i's
        positive is row label_offset + i. Stage1Output.parts holds itc, rtc and align."""
        b = input_ids.shape[0]
        if label_offset < 0 or label_offset + b > target_embeds.shape[0]:
            raise ValueError(f"batch mismatch: {target_embeds.shape[0]} targets for {b} queries whose positives "
                             f"start at row {label_offset}")
        fused = self.fuse(ref_tokens, input_ids, attention_mask)
        labels = torch.arange(label_offset, label_offset + b, device=input_ids.device)
        logits = gallery_similarity(fused.embeds, target_embeds) / self.temp
        itc = F.cross_entropy(logits, labels)
        rtc_logits = gallery_similarity(self.text_only(input_ids, attention_mask), target_embeds) / self.temp
        rtc = F.cross_entropy(rtc_logits, labels)
        anchor = self.prompt_tokens.detach().mean(1).expand(b, -1)
        align = F.mse_loss(fused.prompt.mean(1), anchor)
        loss = itc + self.loss_weights.rtc * rtc + self.loss_weights.align * align
        return Stage1Output(logits=logits, loss=loss, query=fused.embeds,
                            parts={"itc": itc, "rtc": rtc, "align": align})

    # ----------------------------------------------------------------------------------------------------- loading

    def load_original(self, obj: Any, source: str) -> int:
        """Load SPRC's checkpoint `{'epoch', 'Blip2QformerCirAlignPrompt': state_dict}` (every tensor, the fp16
        ViT cast); returns its epoch. Raises loading.CheckpointError on anything unmapped, missing or mis-shaped."""
        from cirlib.models.loading import CheckpointError

        if not (isinstance(obj, Mapping) and isinstance(obj.get(CHECKPOINT_KEY), Mapping)):
            raise CheckpointError(f"{source}: expected SPRC's checkpoint, a dict with key {CHECKPOINT_KEY!r} "
                                  "(and 'epoch')")
        epoch = obj.get("epoch")
        if not isinstance(epoch, int):
            raise CheckpointError(f"{source}: 'epoch' should be an int, found {epoch!r}")
        self._load_lavis(obj[CHECKPOINT_KEY], source, fresh=())
        return epoch

    def load_pretrained(self, obj: Any, source: str) -> "LoadReport":
        """Load LAVIS's BLIP-2 pre-training file `{'model': state_dict}`; SPRC's prompt tokens keep their init."""
        from cirlib.models.loading import CheckpointError

        if not (isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping)):
            raise CheckpointError(f"{source}: expected LAVIS's BLIP-2 pre-training file, a dict {{'model': ...}}")
        return self._load_lavis(obj["model"], source, fresh=("prompt_tokens",))

    def _load_lavis(self, sd: Mapping[str, torch.Tensor], source: str, fresh: tuple[str, ...]) -> "LoadReport":
        """Every key of `sd` mapped (or in `sprc_keys.SPRC_UNUSED`), every model key filled (or in `fresh`)."""
        from cirlib.models.loading import CheckpointError, LoadReport, load_checked

        ours, ignored, unmapped = from_lavis(sd)
        if unmapped:
            raise CheckpointError(f"{source}: {len(unmapped)} key(s) with no counterpart in the sprc first stage: "
                                  f"{sorted(unmapped)[:10]}")
        kept = self._keep_extra_word_rows(ours)
        done = load_checked(self, ours, source=source, may_be_fresh=lambda k: k in fresh)
        return LoadReport(loaded=done.loaded, ignored=tuple(ignored) + done.ignored,
                          initialised=done.initialised + kept, interpolated=())

    def _keep_extra_word_rows(self, ours: dict[str, torch.Tensor]) -> tuple[str, ...]:
        """Our tokenizer has [ENC] after SPRC's [DEC] (one more row); SPRC's text rules never emit it, so a file with
        fewer word-embedding rows fills the first ones and the rest keep their init. Returns what was kept."""
        key = "embeddings.word_embeddings.weight"
        have, mine = ours.get(key), self.embeddings.word_embeddings.weight
        if have is None or have.dim() != 2 or have.shape[1] != mine.shape[1] or have.shape[0] >= mine.shape[0]:
            return ()
        ours[key] = torch.cat([have, mine.detach()[have.shape[0]:].to(have.dtype)])
        return (f"{key}[{have.shape[0]}:{mine.shape[0]}]",)

