"""A toy re-ranker defined outside cirlib, as a research project would: one file, found through
CIRLIB_PLUGINS=<this file> (tests/test_plugin_reranker.py trains and evaluates it through the public steps and
`python -m cirlib.launch`).

It scores a pair with a linear head over the mean-pooled text embedding, the mean reference and candidate tokens,
and the text-projected change (candidate - reference). It reads the reference tokens (not stage I's z_t) and has only
the per-pair path, which it declares.
"""
from __future__ import annotations

import torch
from torch import nn

from cirlib.models.config import ModelConfig
from cirlib.models.rerankers import RERANKERS, RerankQuery, Stage2Model


@RERANKERS.register
class ToyReranker(Stage2Model):
    name = "toy"
    needs_ref_tokens = True
    supports_shared_path = False

    def build_scorer(self, config: ModelConfig) -> None:
        hidden, width = config.text.hidden_size, config.vision.width
        self.word_embeddings = nn.Embedding(config.text.vocab_size, hidden, padding_idx=config.text.pad_token_id)
        self.text_to_image = nn.Linear(hidden, width)
        self.head = nn.Linear(hidden + 3 * width, 1)

    def scores_per_pair(self, query: RerankQuery, cand: torch.Tensor) -> torch.Tensor:
        mask = query.attention_mask.unsqueeze(-1).to(cand.dtype)  # (P, L, 1)
        text = (self.word_embeddings(query.input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (P, H)
        ref = self._tokens(query.ref_tokens, cand.device, "ref_tokens").mean(1)  # (P, Dv)
        cand = cand.mean(1)  # (P, Dv)
        change = self.text_to_image(text) * (cand - ref)
        return self.head(torch.cat([text, ref, cand, change], dim=-1))[:, 0]
