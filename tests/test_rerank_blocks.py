"""Re-ranking groups the pairs of a whole block of queries by candidate (`rerank`, the dual re-ranker): the scores
equal those of per-batch grouping and of the per-pair path, every pair is scored exactly once, and a pass never holds
more than max_pairs pairs."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from cirlib import data as cdata
from cirlib.data import synth
from cirlib.data.tokenizer import build_tokenizer
from cirlib.models.config import preset
from cirlib.models.stage1 import Stage1Model
from cirlib.models.stage2 import RerankQuery, Stage2Model, shared_passes
from cirlib.retrieval.rerank import rerank
from cirlib.retrieval.search import encode_gallery, encode_queries, rank_gallery, stage1_encoder, stage2_encoder, \
    topk_from_ranking

ATOL = 2e-4


def _spread(model: torch.nn.Module, seed: int) -> None:
    """Weights far from the 0.02-std init, so that candidates get clearly different scores."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = synth.generate(synth.SynthConfig(layout="cirr", n_train=2, n_val=10, n_test=2, seed=3),
                          root=tmp_path_factory.mktemp("w") / "cirr")
    tok = build_tokenizer(root / "vocab.txt")
    base = preset("tiny", reranker="dual", merge_threshold=2)
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, vocab_size=tok.vocab_size, hidden_dropout=0.0,
                                                             attention_dropout=0.0))
    torch.manual_seed(0)
    stage1 = Stage1Model(cfg).eval()
    stage2 = Stage2Model(cfg).eval()
    _spread(stage2.text_encoder, 1)
    sd = cdata.load_split("cirr", root, "val")
    transform = cdata.targetpad_transform(1.25, cfg.vision.image_size)
    with torch.inference_mode():
        g1 = encode_gallery(stage1_encoder(stage1), sd, transform)
        ranking = rank_gallery(sd, sd.queries, g1, encode_queries(stage1, tok, sd, g1), 12)
        g2 = encode_gallery(stage2_encoder(stage2), sd, transform)
    return stage1, stage2, tok, sd, topk_from_ranking(sd, sd.queries, g1, ranking), g2


@pytest.mark.slow
def test_block_grouping_scores_equal_per_batch_and_per_pair(world):
    stage1, stage2, tok, sd, topk, gallery = world
    common = dict(k=12, batch_size=3, max_pairs=16)
    one_block = rerank(stage1, stage2, tok, sd, topk, gallery, **common)  # all 10 queries in one block
    per_batch = rerank(stage1, stage2, tok, sd, topk, gallery, query_block_mib=0, **common)  # a block per batch
    pairs = rerank(stage1, stage2, tok, sd, topk, gallery, scoring="pairs", **common)
    assert pairs.stage2_scores.std() > 0.05  # not a comparison between constants
    for got in (one_block, per_batch):
        torch.testing.assert_close(got.stage2_scores, pairs.stage2_scores, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.group_stage2_scores, pairs.group_stage2_scores, atol=ATOL, rtol=0)
    assert pairs.group_stage2_scores.shape == (len(sd.queries), 5)


def test_a_block_shares_each_candidate_across_batches():
    """The plan of 10 queries x 12 candidates: every pair once, repeats folded, passes <= max_pairs, and a candidate
    ranked by many queries is projected in fewer passes than per-batch grouping needs."""
    g = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(20, generator=g)[:12] for _ in range(10)])
    index[:, -1] = index[:, 0]  # one repeated pair per query
    plan = shared_passes(index, max_pairs=16)
    unique_pairs = {(q, int(c)) for q in range(10) for c in index[q]}
    assert plan.num_pairs == len(unique_pairs) == 110
    covered = []
    for p in plan.passes:
        assert p.end - p.start <= 16
        covered += [(int(p.queries[lq]), int(p.candidates[lc])) for lq, lc in zip(p.local_query, p.local_cand)]
    assert sorted(covered) == sorted(unique_pairs)
    assert int(plan.repeats.sum()) == index.numel()
    candidate_passes = sum(p.candidates.numel() for p in plan.passes)
    per_batch = sum(p.candidates.numel() for s in range(0, 10, 2) for p in shared_passes(index[s:s + 2], 16).passes)
    assert candidate_passes < per_batch


def test_query_cat_pads_and_trimmed_drops_padding_only():
    a = RerankQuery(torch.tensor([[5, 6, 7, 0]]), torch.tensor([[1, 1, 1, 0]]), z_t=torch.ones(1, 4, 2))
    b = RerankQuery(torch.tensor([[5, 6], [5, 0]]), torch.tensor([[1, 1], [1, 0]]), z_t=torch.ones(2, 2, 2))
    both = RerankQuery.cat([a, b], pad_token_id=0)
    assert both.input_ids.tolist() == [[5, 6, 7, 0], [5, 6, 0, 0], [5, 0, 0, 0]]
    assert both.z_t[1, 2:].abs().sum() == 0 and both.z_t.shape == (3, 4, 2)
    assert both.trimmed().input_ids.shape == (3, 3)  # the all-padding last column goes
    assert both.select([1, 2]).trimmed().input_ids.tolist() == [[5, 6], [5, 0]]
    with pytest.raises(ValueError, match="different fields"):
        RerankQuery.cat([a, RerankQuery(b.input_ids, b.attention_mask)])
