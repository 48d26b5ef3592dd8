"""Stage tasks: candidate lists of the stage-II objective, and the two scoring paths agree."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from cirlib.models.config import preset
from cirlib.models.stage2 import RerankQuery, Stage2Model
from cirlib.train.tasks import Stage2Task, score_lists


def _tiny(reranker: str) -> Stage2Model:
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, reranker=reranker, text=dataclasses.replace(cfg.text, vocab_size=60))
    torch.manual_seed(0)
    return Stage2Model(cfg)


@pytest.mark.parametrize("reranker", ["joint", "dual"])
def test_shared_and_per_pair_scoring_agree_with_gradients(reranker):
    model = _tiny(reranker).train()
    b, h, tokens = 4, 2, model.config.vision.num_tokens
    width, hidden = model.config.vision.width, model.config.text.hidden_size
    ids = torch.randint(5, 60, (b, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    query = RerankQuery(input_ids=ids, attention_mask=mask,
                        z_t=torch.randn(b, 7, hidden) if reranker == "dual" else None,
                        ref_tokens=torch.randn(b, tokens, width) if reranker == "joint" else None)
    cand = torch.randn(b + b * h, tokens, width)
    task = Stage2Task.__new__(Stage2Task)  # only candidate_index's arithmetic is used here
    task.hard_negatives, task.inbatch_negatives = h, 2
    index = task.candidate_index(b)
    assert index.shape == (b, 1 + h + 2) and index[:, 0].tolist() == list(range(b))
    assert index[2, 1:1 + h].tolist() == [b + 2 * h, b + 2 * h + 1]  # own hard negatives follow the target
    model.eval()  # dropout off so both paths see the same function
    grads = {}
    for scoring in ("shared", "pairs"):
        model.zero_grad()
        logits = score_lists(model, query, cand, index, scoring)
        logits.logsumexp(1).sum().backward()
        grads[scoring] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (a, ga), (c, gc) = grads["shared"], grads["pairs"]
    assert (a - c).abs().max() <= 1e-4
    assert ga.keys() == gc.keys() and len(ga) > 0
    assert max((ga[n] - gc[n]).abs().max().item() for n in ga) <= 1e-4
    with pytest.raises(ValueError, match="unknown scoring"):
        score_lists(model, query, cand, index, "fast")


def test_mined_negatives_come_from_the_img_set_and_the_topk(tmp_path, monkeypatch):
    import numpy as np

    from cirlib import data as cdata
    from cirlib.data import synth
    from cirlib.train.tasks import MinedTripletDataset

    root = synth.generate(synth.SynthConfig(layout="cirr", n_train=12, n_val=2, n_test=2, seed=1), root=tmp_path / "w")
    sd = cdata.load_split("cirr", root, "train")
    transform = cdata.targetpad_transform(1.25, 48)
    # a "top-K" whose rows list 20 gallery images plus the query's own reference and target (both must be skipped)
    topk = np.asarray([sd.gallery[:20] + [q.reference, q.target] for q in sd.queries])
    ds = MinedTripletDataset(sd, transform, topk, n_topk=3, seed=0, n_set=2)
    opened: list[str] = []
    original = cdata.load_image

    def spy(path):
        opened.append(path.name.removesuffix(".png"))
        return original(path)

    monkeypatch.setattr(cdata, "load_image", spy)  # negatives (the task)
    monkeypatch.setattr(cdata.datasets, "load_image", spy)  # reference and target (the triplet dataset)
    for i, q in enumerate(sd.queries):
        opened.clear()
        item = ds[i]
        assert item["negative_images"].shape == (5, 3, 48, 48)
        negatives = opened[-5:]  # reference and target are opened first
        assert set(negatives[:2]) <= set(q.members) - {q.reference, q.target}
        assert not {q.reference, q.target} & set(negatives)
        assert len(set(negatives)) == 5
    opened.clear()
    ds[3]
    first = list(opened)
    opened.clear()
    ds[3]
    assert opened == first  # the same (seed, epoch, index) draws the same negatives
    ds.set_epoch_seed(1)
    opened.clear()
    ds[3]
    assert opened[:2] == first[:2]  # reference and target stay; negatives are redrawn per epoch (may coincide)
    with pytest.raises(ValueError, match="top-K"):
        MinedTripletDataset(sd, transform, None, n_topk=1)
