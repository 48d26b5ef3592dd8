"""A multi-vector first stage with its own text rules through the pipeline (issue 23, item 2): exact and FAISS search
equal a brute-force max over each image's vectors; the feature store holds (V, E) embeddings and keys the gallery
head the model names; a first stage that trains its gallery head gets tokens-only stores for training; query texts
are tokenized by the first stage's rule (benchmark and gallery-index queries); BLIP's store keys are as before.

The toy first stage ("toy-blip2", registered per test) mimics SPRC's shape: a frozen "ViT" (one conv), a gallery head
(a linear layer and a query-token parameter) giving V unit vectors per image, and a text rule that truncates."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cirlib import data as cdata
from cirlib.data import synth
from cirlib.data.tokenizer import build_tokenizer
from cirlib.models import factory
from cirlib.models.first_stage import FIRST_STAGES, FirstStage, ImageFeatures, QueryFeatures
from cirlib.retrieval import feature_store as fs
from cirlib.retrieval import gallery_index as gi
from cirlib.retrieval import search
from cirlib.workbook import evaluation
from cirlib.workbook import search as S
from cirlib.workbook.evaluation import evaluate_stage1
from cirlib.workbook.stores import stage1_store

PREP = fs.preprocessing(1.25, 48)
MAX_WORDS = 3  # the toy's text rule: [ENC] + at most 1 word + [SEP] (a truncation BLIP's rule does not make)


class ToyBLIP2(FirstStage, nn.Module):
    """V unit vectors per image from the tokens of a frozen conv "ViT"; query = reference tokens' mean and the mean
    token id, projected. Its gallery head (head, query_tokens) trains in stage I, as SPRC's Q-Former."""

    name = "toy-blip2"
    VECTORS = 3
    trains_gallery_head = True

    def __init__(self, config):
        super().__init__()
        self.config = config
        dim = config.projection_dim
        self.visual_encoder = nn.Conv2d(3, 8, kernel_size=16, stride=16)
        self.head = nn.Linear(8, self.VECTORS * dim)
        self.query_tokens = nn.Parameter(torch.randn(self.VECTORS, dim))
        self.query_proj = nn.Linear(9, dim)

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        tokens = self.visual_encoder(images).flatten(2).transpose(1, 2)  # (B, 9, 8)
        return ImageFeatures(tokens=tokens, embeds=self.embed_tokens(tokens))

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.head(tokens.mean(1)).view(tokens.shape[0], self.VECTORS, -1) + self.query_tokens
        return F.normalize(x, dim=-1)

    def tokenize_queries(self, tokenizer, texts):
        return tokenizer(list(texts), max_length=MAX_WORDS)

    def image_weights(self, outputs):
        weights = {"visual_encoder": self.visual_encoder}
        if "embeds" in outputs:
            weights.update(head=self.head, query_tokens=self.query_tokens)
        return weights

    def encode_query(self, ref_tokens, input_ids, attention_mask) -> QueryFeatures:
        words = (input_ids.float() * attention_mask).sum(1, keepdim=True) / attention_mask.sum(1, keepdim=True)
        hidden = torch.cat([ref_tokens.mean(1), words / 1000], dim=1)  # (B, 9)
        return QueryFeatures(embeds=F.normalize(self.query_proj(hidden), dim=-1), hidden=hidden[:, None])


@pytest.fixture()
def toy():
    FIRST_STAGES.register(ToyBLIP2)
    torch.manual_seed(0)
    yield factory.build_stage1("tiny", 64, first_stage=ToyBLIP2.name).eval()
    FIRST_STAGES.unregister(ToyBLIP2.name)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return synth.generate(synth.SynthConfig(layout="cirr", n_train=4, n_val=6, n_test=2, seed=3),
                          root=tmp_path_factory.mktemp("multivector") / "cirr")


@pytest.fixture(scope="module")
def val(world) -> "cdata.SplitData":
    return cdata.load_split("cirr", world, "val")


def store_shape(model) -> tuple[int, int]:
    return ToyBLIP2.VECTORS, model.config.projection_dim


@pytest.mark.parametrize("method", search.SEARCH)
def test_multi_vector_search_equals_a_brute_force_max_over_each_images_vectors(method, brute_force_search):
    if method == "faiss":
        pytest.importorskip("faiss", reason="the faiss extra (pip install -e '.[faiss]') is not installed")
    torch.manual_seed(2)
    gallery = F.normalize(torch.randn(25, 4, 8), dim=-1)
    query = F.normalize(torch.randn(6, 8), dim=-1)
    mask = torch.zeros(6, 25, dtype=torch.bool)
    mask[0, 3] = mask[1, [0, 7]] = mask[4, 24] = True
    excluded = [set(m.nonzero().flatten().tolist()) for m in mask]
    for k in (1, 7, 50):  # 50: cut to 25 less the most any query excludes (2)
        scores, rows = search.search_gallery(query, gallery, k, exclude=search.excluded_rows(mask), method=method,
                                             chunk=2)
        want_scores, want_rows = brute_force_search(query, gallery, excluded, k)
        assert rows.tolist() == [r[:rows.shape[1]] for r in want_rows] and rows.shape[1] == min(k, 23)
        assert scores.tolist() == [pytest.approx(s[:rows.shape[1]], abs=1e-5) for s in want_scores]


def test_the_best_vector_of_each_image_is_kept_in_ranking_order():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    images = torch.tensor([[2, 2, 0, 2, 1, 0]])
    got = search.best_vector_per_image(scores, images, 3)
    assert got[1].tolist() == [[2, 0, 1]] and torch.equal(got[0], scores[:, [0, 2, 4]])
    with pytest.raises(ValueError, match="fewer than 4 distinct images"):
        search.best_vector_per_image(scores, images, 4)


def test_a_multi_vector_store_round_trips_and_keys_the_gallery_head_the_model_names(toy, val, tmp_path):
    names = val.gallery
    store = fs.open_store(fs.stage1_image_encoder(toy), PREP, names, val, outputs_root=tmp_path, shard_size=6,
                          batch_size=3)
    want = search.encode_gallery(search.stage1_encoder(toy), val, fs.transform_of(PREP), batch_size=3)
    assert store.embed_shape == store_shape(toy) and store.embed_dim == toy.config.projection_dim
    assert torch.equal(store.embeddings(names[::-1]), want.embeds[want.positions(names[::-1])])
    assert torch.equal(store.gallery_features(names).tokens, want.tokens)
    assert store.manifest["bytes_per_image"] == 4 * (9 * 8 + ToyBLIP2.VECTORS * toy.config.projection_dim)
    again = fs.open_store(fs.stage1_image_encoder(toy), PREP, names, outputs_root=tmp_path)
    assert again.status == "reused" and again.folder == store.folder
    # the key hashes what image_weights names (the query_tokens tensor included) and the whole model config
    assert store.key["architecture"]["model"]["first_stage"] == ToyBLIP2.name
    tokens_key = fs.store_key(fs.stage1_image_encoder(toy, ("tokens",)), PREP)
    # the interface's default (not the toy's override): the ViT, and with embeds every weight of the model
    assert set(FirstStage.image_weights(toy, ("tokens",))) == {"visual_encoder"}
    assert FirstStage.image_weights(toy, fs.OUTPUTS) == {"visual_encoder": toy.visual_encoder, "first_stage": toy}
    with torch.no_grad():
        toy.query_tokens.add_(0.5)
    assert fs.store_key(fs.stage1_image_encoder(toy), PREP)["weights_sha256"] != store.key["weights_sha256"]
    assert fs.store_key(fs.stage1_image_encoder(toy, ("tokens",)), PREP) == tokens_key


def test_a_first_stage_training_its_gallery_head_gets_tokens_only_stores_for_training(toy, world, val, tmp_path,
                                                                                     monkeypatch):
    with pytest.raises(fs.FeatureStoreError, match="trains_gallery_head.*tokens only"):
        fs.stage1_image_encoder(toy, fs.OUTPUTS, training=True)
    assert fs.stage1_outputs(toy, training=True) == ("tokens",) and fs.stage1_outputs(toy, False) == fs.OUTPUTS
    assert fs.stage1_outputs(factory.build_stage1("tiny", 64), training=True) == fs.OUTPUTS  # BLIP: frozen head
    store = stage1_store(toy, "float32", [val], target_ratio=1.25, outputs=str(tmp_path), training=True)
    assert store.outputs == ("tokens",) and store.folder.name.startswith("vit-")
    tok = build_tokenizer(world / "vocab.txt")
    kw = dict(image_size=48, target_ratio=1.25, k=5, batch_size=32)
    direct, (tk_direct,) = evaluate_stage1(toy, tok, [val], **kw)

    def no_encoding(*a, **k):
        raise AssertionError("a store's gallery is not encoded from the images")

    monkeypatch.setattr(evaluation, "encode_gallery", no_encoding)
    with_store, (tk_store,) = evaluate_stage1(toy, tok, [val], store=store, **kw)  # embeds made from the tokens
    assert set(with_store) == set(direct) and direct
    # the same scores (to float rounding: an untrained toy's near-ties may swap places, so names are not compared)
    torch.testing.assert_close(tk_store.scores, tk_direct.scores)
    inference = stage1_store(toy, "float32", [val], target_ratio=1.25, outputs=str(tmp_path))  # weights fixed
    assert inference.outputs == fs.OUTPUTS and inference.embed_shape == store_shape(toy)


def test_queries_are_tokenized_by_the_first_stages_rule_and_faiss_ranks_as_exact(toy, world, val):
    tok = build_tokenizer(world / "vocab.txt")
    gallery = search.encode_gallery(search.stage1_encoder(toy), val, fs.transform_of(PREP), batch_size=4)
    got = search.encode_queries(toy, tok, val, gallery, batch_size=4)
    texts = search.query_texts(val, val.queries)
    refs = gallery.tokens[gallery.positions([q.reference for q in val.queries])]
    with torch.no_grad():
        want = toy.encode_query(refs, *tok(texts, max_length=MAX_WORDS)).embeds
        plain = toy.encode_query(refs, *tok(texts)).embeds  # BLIP's rule: no truncation
    assert max(len(t.split()) for t in texts) > 1, "the toy rule must cut something"
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, plain)
    pytest.importorskip("faiss", reason="the faiss extra (pip install -e '.[faiss]') is not installed")
    exact = search.rank_gallery(val, val.queries, gallery, got, 5)
    fast = search.rank_gallery(val, val.queries, gallery, got, 5, search="faiss")
    assert torch.equal(exact.index, fast.index)
    torch.testing.assert_close(exact.scores, fast.scores)
    # the CIRR subset: the same members, best first by the max over vectors (near-ties may swap at float rounding)
    sim = search.gallery_similarity(got, gallery.embeds)
    assert (exact.subset_index.sort(1).values == fast.subset_index.sort(1).values).all()
    assert (sim.gather(1, fast.subset_index).diff(dim=1) <= 1e-6).all()


def test_a_multi_vector_gallery_index_is_searched_with_the_first_stages_rule(toy, world, val, tmp_path,
                                                                            monkeypatch, brute_force_search):
    files = gi.list_images(world / "dev")
    report = gi.build_index(files, toy, preprocess=PREP, out_dir=tmp_path / "ix", batch_size=4)
    idx = gi.GalleryIndex.open(tmp_path / "ix")
    assert report.images == len(files) and idx.embeddings.shape == (len(files), *store_shape(toy))
    tok = build_tokenizer(world / "vocab.txt")
    source = S.Stage1Source(toy, tok, PREP, {"run": "toy"}, tmp_path / "ix" / gi.INDEX_FILE)
    monkeypatch.setattr(S, "load_stage1", lambda *a, **kw: source)
    refs, texts = idx.names[:3], ["add two red circles", "make it blue please", "remove everything"]
    results = S.rank(idx, refs, texts, k=4, top=4, device="cpu")
    with torch.no_grad():
        pixels = torch.stack([fs.transform_of(PREP)(cdata.load_image(idx.path(n))) for n in refs])
        q = toy.encode_query(toy.encode_image(pixels).tokens, *tok(texts, max_length=MAX_WORDS)).embeds
    want_scores, want_rows = brute_force_search(q, idx.embeddings, [{idx.positions[n]} for n in refs], 4)
    for r, scores, rows in zip(results, want_scores, want_rows):
        assert [h.name for h in r.stage1] == [idx.names[g] for g in rows]
        assert [h.stage1_score for h in r.stage1] == pytest.approx(scores, abs=1e-5)


def test_blip_store_keys_are_as_before_the_hooks(tmp_path):
    """Stage1Model's keys: the same fields, the vision config alone, and the weights of visual_encoder (+ vision_proj
    with embeddings) hashed under those names, so stores built before keep their folders."""
    torch.manual_seed(0)
    model = factory.build_stage1("tiny", 64)
    for outputs, name, modules in ((("tokens",), "vit", ("visual_encoder",)),
                                   (fs.OUTPUTS, "stage1", ("visual_encoder", "vision_proj"))):
        key = fs.store_key(fs.stage1_image_encoder(model, outputs), PREP)
        assert key == {"format": 2, "encoder": name, "architecture": dataclasses.asdict(model.config.vision),
                       "weights_sha256": fs.weights_sha256({m: getattr(model, m) for m in modules}),
                       "preprocess": PREP, "outputs": list(outputs), "dtype": "float32"}
