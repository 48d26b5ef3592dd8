"""Model builders with plain arguments (cirlib.models.factory)."""
from __future__ import annotations

import pytest
import torch

from cirlib.models import factory, loading
from cirlib.models.stage1 import Stage1Model
from cirlib.models.stage2 import Stage2Model


def test_model_config_sizes_the_vocabulary_and_applies_overrides():
    cfg = factory.model_config("tiny", 99, reranker="dual")
    assert cfg.text.vocab_size == 99 and cfg.reranker == "dual" and cfg.text.hidden_size == 128
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        factory.model_config("huge", 99)


def test_build_stage1_from_pretrained_and_checkpoint(tmp_path, fixture_dir):
    model = factory.build_stage1("tiny", 50)
    assert isinstance(model, Stage1Model) and model.text_encoder.embeddings.word_embeddings.num_embeddings == 50
    torch.manual_seed(3)
    source = Stage1Model(model.config)
    loading.save_pretrained(source, tmp_path / "run" / "model")
    loaded = factory.build_stage1("tiny", 50, init_checkpoint=tmp_path / "run")  # a run folder holding model/
    assert torch.equal(loaded.text_proj.weight, source.text_proj.weight)
    with pytest.raises(loading.CheckpointError, match="holds a Stage1Model, expected a Stage2Model"):
        factory.build_stage2("tiny", 50, reranker="joint", init="scratch", init_checkpoint=tmp_path / "run")


def test_build_stage2_inits():
    stage1 = factory.build_stage1("tiny", 60)
    joint = factory.build_stage2("tiny", 60, reranker="joint", init="stage1", stage1=stage1, vision_from_stage1=True)
    assert isinstance(joint, Stage2Model)
    assert torch.equal(joint.text_encoder.encoder.layer[0].attention.self.query.weight,
                       stage1.text_encoder.state_dict()["encoder.layer.0.attention.self.query.weight"])
    assert torch.equal(joint.visual_encoder.pos_embed, stage1.visual_encoder.pos_embed)
    dual = factory.build_stage2("tiny", 60, reranker="dual", init="scratch")
    assert dual.needs_z_t
    with pytest.raises(ValueError, match="needs a BLIP pre-training file"):
        factory.build_stage2("tiny", 60, reranker="dual", init="pretrained")
    with pytest.raises(ValueError, match="unknown stage-II init 'warm'"):
        factory.build_stage2("tiny", 60, reranker="dual", init="warm")
    with pytest.raises(ValueError, match="needs the stage-I model"):
        factory.build_stage2("tiny", 60, reranker="dual", init="stage1")
