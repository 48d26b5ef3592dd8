"""Search with SPRC's 32 vectors per gallery image: exact and FAISS equal a brute-force max over each image's vectors."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from cirlib.data.synth import SynthConfig, vocabulary
from cirlib.data.tokenizer import build_tokenizer
from cirlib.models.config import preset
from cirlib.models.sprc import SPRCRetriever
from cirlib.retrieval import search

TEXTS = ["make it red.", "the same, but larger!", "remove the ball", "add two cubes: left and right"]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """sprc-tiny at random weights: gallery vectors (G, 32, 256) of 12 images and 4 queries whose references are
    gallery rows 0, 3, 5 and 9 (each excluded from its own results, as CIRR's protocol does)."""
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(vocabulary(SynthConfig())) + "\n")
    tok = build_tokenizer(vocab)
    cfg = preset("sprc-tiny")
    torch.manual_seed(0)
    model = SPRCRetriever(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=len(tok)))).eval()
    size = cfg.vision.image_size
    with torch.no_grad():
        gallery = model.encode_image(torch.randn(12, 3, size, size))
        refs = [0, 3, 5, 9]
        ids, mask = model.tokenize_queries(tok, TEXTS)
        query = model.encode_query(gallery.tokens[refs], ids, mask).embeds
    return query, gallery.embeds, refs


def test_sprc_gallery_is_32_unit_vectors_per_image(encoded):
    query, gallery, _ = encoded
    assert gallery.shape == (12, 32, 256) and query.shape == (4, 256)
    assert torch.allclose(gallery.norm(dim=-1), torch.ones(12, 32), atol=1e-5)


@pytest.mark.parametrize("method", search.SEARCH)
def test_sprc_search_equals_a_brute_force_max_over_the_32_vectors(method, encoded, brute_force_search):
    if method == "faiss":
        pytest.importorskip("faiss", reason="the faiss extra (pip install -e '.[faiss]') is not installed")
    query, gallery, refs = encoded
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[torch.arange(4), refs] = True
    excluded = [{r} for r in refs]
    for k in (1, 5, 11):
        scores, rows = search.search_gallery(query, gallery, k, exclude=search.excluded_rows(mask), method=method,
                                             chunk=3)
        want_scores, want_rows = brute_force_search(query, gallery, excluded, k)
        assert rows.tolist() == want_rows
        assert scores.tolist() == [pytest.approx(s, abs=1e-5) for s in want_scores]
    # The max over vectors is not the mean: a search on each image's mean vector ranks otherwise here.
    mean_rows = search.search_gallery(query, torch.nn.functional.normalize(gallery.mean(1), dim=-1), 11,
                                      exclude=search.excluded_rows(mask))[1]
    assert mean_rows.tolist() != want_rows
