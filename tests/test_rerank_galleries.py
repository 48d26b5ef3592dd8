"""The image tokens a re-ranking reads (`evaluation.rerank_galleries`), shared by evaluation and the CIRR submission
so that a submission ranks exactly as the evaluation did, including z_t taken from stage I's ViT."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from cirlib import data as cdata
from cirlib.data import synth
from cirlib.models.config import preset
from cirlib.models.stage1 import Stage1Model
from cirlib.models.stage2 import Stage2Model
from cirlib.workbook.evaluation import rerank_galleries


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = synth.generate(synth.SynthConfig(layout="cirr", n_train=4, n_val=4, n_test=2, seed=5),
                          root=tmp_path_factory.mktemp("w") / "cirr")
    return cdata.load_split("cirr", root, "val")


@pytest.mark.parametrize("zt_source", ["stage2_vit", "stage1_vit"])
def test_zt_gallery_comes_from_the_vit_the_model_names(split, zt_source):
    torch.manual_seed(0)
    stage1 = Stage1Model(preset("tiny")).eval()
    torch.manual_seed(1)  # a stage-II ViT with other weights, so the two galleries differ
    stage2 = Stage2Model(dataclasses.replace(preset("tiny", reranker="dual"), zt_source=zt_source)).eval()
    transform = cdata.targetpad_transform(1.25, stage2.config.vision.image_size)
    gallery, zt_gallery = rerank_galleries(stage1, stage2, split, transform, None, None, torch.device("cpu"))
    assert gallery.names == split.gallery
    images = torch.stack([transform(cdata.load_image(split.image_path(n))) for n in split.gallery])
    with torch.no_grad():
        assert torch.allclose(gallery.tokens, stage2.encode_image(images), atol=1e-5)
        if zt_source == "stage2_vit":
            assert zt_gallery is None  # the original: z_t from the stage-II tokens
        else:
            assert zt_gallery is not None and zt_gallery.names == split.gallery
            assert torch.allclose(zt_gallery.tokens, stage1.encode_image(images).tokens, atol=1e-5)
            assert not torch.allclose(zt_gallery.tokens, gallery.tokens, atol=1e-3)
