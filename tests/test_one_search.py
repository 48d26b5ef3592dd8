"""One first stage interface, one search (issue 19, item 3).

The benchmark pipeline (top-K extraction: `rank_gallery`) and `cirlib.search` (`workbook.search.rank` over a gallery
index of the same images) rank the same queries the same way, both through `retrieval.search.search_gallery`; a first
stage is a registered class, and one with a multi-vector gallery (max over its vectors) is ranked by the same search.
Models are untrained tiny ones (epochs=0): the comparisons need the same function on both paths, not a good one.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cirlib import data as cdata
from cirlib.data import synth
from cirlib.models import factory, loading
from cirlib.models.first_stage import FIRST_STAGES, FirstStage, ImageFeatures, QueryFeatures
from cirlib.models.stage1 import Stage1Model
from cirlib.registry import RegistryError
from cirlib.retrieval import search
from cirlib.retrieval.topk import TopK
from cirlib.run_folder import RunFolder
from cirlib.workbook import search as S
from cirlib.workbook import steps
from cirlib.workbook.config import Stage1Config, TopKConfig

K = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny CIRR world, an untrained tiny stage I, and the gallery index of its val images (the dev folder)."""
    tmp = tmp_path_factory.mktemp("one_search")
    root, out = tmp / "cirr", tmp / "outputs"
    synth.generate(synth.SynthConfig(layout="cirr", n_train=8, n_val=6, n_test=4, seed=5), root=root)
    steps.train_stage1(Stage1Config(stage1_run="s1", data_root=str(root), preset="tiny", epochs=0, precision="fp32",
                                    trackers="none", outputs=str(out), validate_every=0))
    s1 = str(out / "stage1" / "s1")
    S.index_folder(str(root / "dev"), s1, str(tmp / "ix"), batch_size=4)
    return {"root": root, "out": out, "s1": s1, "index": str(tmp / "ix")}


@pytest.fixture()
def search_calls(monkeypatch):
    """Every call of the one search function, by whoever calls it (the wrapped original does the work)."""
    calls: list[tuple[int, int]] = []
    original = search.search_gallery

    def recording(query_embeds, gallery_embeds, k, **kw):
        calls.append((query_embeds.shape[0], gallery_embeds.shape[0]))
        return original(query_embeds, gallery_embeds, k, **kw)

    monkeypatch.setattr(search, "search_gallery", recording)
    return calls


def test_the_benchmark_and_cirlib_search_rank_alike_through_one_search(world, search_calls):
    sd = cdata.load_split("cirr", world["root"], "val")
    steps.extract_topk(TopKConfig(stage1_run="s1", topk_k=K, overwrite=True, outputs=str(world["out"])))
    assert search_calls == [(len(sd.queries), len(sd.gallery))], "top-K extraction ranks through search_gallery"
    topk = TopK.load(RunFolder.of("stage1", "s1", str(world["out"])).topk_file("val"), dataset="cirr", split="val")

    results = S.rank(world["index"], [f"{q.reference}.png" for q in sd.queries],
                     [cdata.query_text(q, "cirr", "val") for q in sd.queries], k=K, top=K, batch_size=3)
    assert search_calls[1:] == [(len(sd.queries), len(sd.gallery))], "cirlib.search ranks through search_gallery"
    assert len(results) == topk.num_queries == len(sd.queries)
    for i, r in enumerate(results):
        assert r.reference_excluded and r.k == topk.k == K
        assert [Path(h.name).stem for h in r.stage1] == topk.sorted_index_names[i].tolist()
        assert [h.stage1_score for h in r.stage1] == pytest.approx(topk.scores[i].tolist(), abs=1e-5)


def test_rank_results_are_rows_of_the_topk_it_makes(world, monkeypatch):
    """`rank`'s Hits are read from the TopK it makes (names, stage-I and stage-II scores), not computed beside it: a
    TopK given stage-II scores of its own shows them in the results."""
    seen: list[TopK] = []
    made = S.ranked_list

    def with_scores(idx, scores1, rows1, s2_scores, **kw):
        seen.append(made(idx, scores1, rows1, -2 * scores1, **kw))
        return seen[-1]

    monkeypatch.setattr(S, "ranked_list", with_scores)
    (result,) = S.rank(world["index"], [S.open_index(world["index"]).names[0]], ["add a red circle"], k=K, top=K)
    (topk,) = seen
    assert topk.dataset is None and topk.split == S.SEARCH_SPLIT and topk.reference_removed
    assert [h.name for h in result.candidates] == topk.sorted_index_names[0].tolist()
    assert [h.stage1_score for h in result.candidates] == topk.scores[0].tolist()
    assert [h.stage2_score for h in result.candidates] == topk.stage2_scores[0].tolist()
    assert result.stage2 is None, "no stage-II run: no stage-II list"


# ------------------------------------------------------------------------------------------- the first-stage registry
class ToyMultiVector(FirstStage, nn.Module):
    """A first stage with VECTORS unit vectors per gallery image (as SPRC's BLIP-2 retriever: 32): image = mean
    pixel colour, projected; query = the reference's colour plus the mean token id, projected."""

    name = "toy-multivector"
    VECTORS = 4

    def __init__(self, config):
        super().__init__()
        self.config = config
        dim = config.projection_dim
        self.gallery_proj = nn.Linear(3, self.VECTORS * dim)
        self.query_proj = nn.Linear(4, dim)

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        colour = images.mean(dim=(2, 3))  # (B, 3)
        embeds = F.normalize(self.gallery_proj(colour).view(images.shape[0], self.VECTORS, -1), dim=-1)
        return ImageFeatures(tokens=colour[:, None, :], embeds=embeds)

    def encode_query(self, ref_tokens, input_ids, attention_mask) -> QueryFeatures:
        words = (input_ids.float() * attention_mask).sum(1, keepdim=True) / attention_mask.sum(1, keepdim=True)
        hidden = torch.cat([ref_tokens[:, 0], words / 1000], dim=1)  # (B, 4)
        return QueryFeatures(embeds=F.normalize(self.query_proj(hidden), dim=-1), hidden=hidden[:, None])


@pytest.fixture()
def toy_first_stage():
    FIRST_STAGES.register(ToyMultiVector)
    yield ToyMultiVector
    FIRST_STAGES.unregister(ToyMultiVector.name)


def test_a_registered_multi_vector_first_stage_is_ranked_by_the_one_search(toy_first_stage, tmp_path,
                                                                         brute_force_search):
    torch.manual_seed(0)
    model = factory.build_stage1("tiny", 30524, first_stage=toy_first_stage.name).eval()
    assert type(model) is toy_first_stage and model.config.first_stage == toy_first_stage.name
    with torch.no_grad():
        gallery = model.encode_image(torch.rand(12, 3, 8, 8)).embeds  # (G, V, D)
        query = model.encode_query(model.encode_image(torch.rand(5, 3, 8, 8)).tokens,
                                   torch.randint(1, 30000, (5, 6)), torch.ones(5, 6)).embeds  # (N, D)
    assert gallery.shape == (12, toy_first_stage.VECTORS, model.config.projection_dim)
    mask = torch.zeros(5, 12, dtype=torch.bool)
    mask[0, 3] = mask[1, [0, 7]] = mask[4, 11] = True  # up to two excluded rows per query
    scores, rows = search.search_gallery(query, gallery, 6, exclude=search.excluded_rows(mask))
    want_scores, want_rows = brute_force_search(query, gallery, [set(m.nonzero().flatten().tolist()) for m in mask], 6)
    assert rows.tolist() == want_rows
    assert scores.tolist() == [pytest.approx(s, abs=1e-5) for s in want_scores]
    # k is cut to what every query can get: 12 images less the most any query excludes (2)
    assert search.search_gallery(query, gallery, 50, exclude=search.excluded_rows(mask))[1].shape == (5, 10)
    if importlib.util.find_spec("faiss") is not None:  # FAISS: the same max over vectors (tests/test_multivector.py)
        fast = search.search_gallery(query, gallery, 6, exclude=search.excluded_rows(mask), method="faiss")
        assert fast[1].tolist() == want_rows
    # saved and loaded through the registry too
    loading.save_pretrained(model, tmp_path / "toy")
    loaded = loading.from_pretrained(tmp_path / "toy")
    assert type(loaded) is toy_first_stage
    assert torch.equal(loaded.gallery_proj.weight, model.gallery_proj.weight)


def test_the_registry_holds_blip_and_refuses_an_unknown_first_stage(tmp_path):
    assert FIRST_STAGES.get("blip") is Stage1Model and "blip" in FIRST_STAGES.names()
    assert type(factory.build_stage1("tiny", 30524)) is Stage1Model
    with pytest.raises(RegistryError, match=r"unknown first stage 'nonesuch'.*known are \[.*'blip'"):
        factory.build_stage1("tiny", 30524, first_stage="nonesuch")
    model = factory.build_stage1("tiny", 30524)
    loading.save_pretrained(model, tmp_path / "blip")
    config = tmp_path / "blip" / loading.CONFIG_FILE
    config.write_text(config.read_text().replace('"first_stage": "blip"', '"first_stage": "nonesuch"'))
    with pytest.raises(loading.CheckpointError, match="first_stage 'nonesuch' is not registered"):
        loading.from_pretrained(tmp_path / "blip")


def test_exact_and_faiss_search_agree_and_an_exclusion_mask_becomes_rows():
    pytest.importorskip("faiss", reason="the faiss extra (pip install -e '.[faiss]') is not installed")
    torch.manual_seed(1)
    gallery = F.normalize(torch.randn(40, 16), dim=-1)
    query = F.normalize(torch.randn(9, 16), dim=-1)
    mask = torch.zeros(9, 40, dtype=torch.bool)
    mask[torch.arange(9), torch.arange(9) * 4] = True
    rows = search.excluded_rows(mask)
    assert rows.tolist() == [[4 * i] for i in range(9)]
    exact = search.search_gallery(query, gallery, 10, exclude=rows)
    fast = search.search_gallery(query, gallery, 10, exclude=rows, method="faiss", chunk=4)
    assert torch.equal(exact[1], fast[1]) and torch.allclose(exact[0], fast[0], atol=1e-5)
    assert not (exact[1] == rows).any()
