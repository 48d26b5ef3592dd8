"""The pipeline reading image feature stores (`feature_store` = "float32"): the same losses and metrics as decoding
and encoding the images (frozen ViT in eval mode, dropout off, fp32), a second run that encodes no image, and the
settings a store cannot serve refused with the reason (issue 13, part 2)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from cirlib.data import synth
from cirlib.models import config as model_config
from cirlib.train.metrics_log import read_metrics
from cirlib.workbook import steps
from cirlib.workbook.config import EvaluateConfig, Stage1Config, Stage2TrainConfig, TopKConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("store_world") / "cirr"
    synth.generate(synth.SynthConfig(layout="cirr", n_train=48, n_val=16, n_test=8, seed=7), root=root)
    return root


@pytest.fixture(autouse=True)
def no_dropout(monkeypatch):
    """The tiny preset without dropout: both paths then compute the same function (no random masks whose draws
    could differ with the number of DataLoaders each path creates)."""
    tiny = model_config.PRESETS["tiny"]
    monkeypatch.setitem(model_config.PRESETS, "tiny", dataclasses.replace(
        tiny, text=dataclasses.replace(tiny.text, hidden_dropout=0.0, attention_dropout=0.0),
        stage2_drop_path_rate=0.0))


def _s1(world, outputs, **kw) -> Stage1Config:
    return Stage1Config(**{**dict(stage1_run="s1", data_root=str(world), preset="tiny", train_image_encoder=False,
                                  epochs=1, max_epoch=1, lr=1e-3, batch_size=8, max_steps_per_epoch=3,
                                  validate_every=1, precision="fp32", trackers="none", outputs=str(outputs)), **kw})


def _s2(world, outputs, **kw) -> Stage2TrainConfig:
    return Stage2TrainConfig(**{**dict(stage2_run="s2", stage1_run="s1", data_root=str(world), preset="tiny",
                                       reranker="joint", init="scratch", k=8, epochs=1, max_epoch=1, lr=1e-3,
                                       batch_size=4, max_steps_per_epoch=3, validate_every=1, scoring="pairs",
                                       hard_negatives=2, mining_k=8, precision="fp32", trackers="none",
                                       outputs=str(outputs)), **kw})


def _losses(run_dir: Path) -> list[float]:
    """The logged training losses (the workbook logs each epoch's mean over its steps) and validation selections."""
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "epoch"] + [
        r["selection"] for r in read_metrics(run_dir) if r["kind"] == "val"]


def _assert_same_metrics(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-6), key


@pytest.mark.slow
def test_stage1_with_the_store_trains_and_validates_as_without_it_and_reuses_it(world, tmp_path, vit_calls):
    plain = steps.train_stage1(_s1(world, tmp_path / "plain"))
    assert vit_calls, "the path without a store encodes images"
    stored = steps.train_stage1(_s1(world, tmp_path / "stored", feature_store="float32"))
    losses_plain, losses_stored = _losses(plain.run_dir), _losses(stored.run_dir)
    assert len(losses_plain) == 2 and losses_stored == pytest.approx(losses_plain, abs=1e-5)
    _assert_same_metrics(plain.metrics, stored.metrics)
    folders = list((tmp_path / "stored" / "features").glob("stage1-*"))
    assert len(folders) == 1
    record = json.loads(stored.run_dir.joinpath("done.json").read_text())["provenance"]
    assert record["feature_stores"][0]["folder"] == str(folders[0])
    # A second run (another run folder, same frozen ViT and preprocessing) reads the store: no image is encoded.
    vit_calls.clear()
    again = steps.train_stage1(_s1(world, tmp_path / "stored", stage1_run="s1b", feature_store="float32"))
    assert vit_calls == []
    assert _losses(again.run_dir) == pytest.approx(losses_stored, abs=1e-6)
    # top-k extraction of a run trained with a store ranks with it: nothing encoded, the same top-k as without
    steps.extract_topk(TopKConfig(stage1_run="s1b", topk_k=8, outputs=str(tmp_path / "stored")))
    assert vit_calls == []


@pytest.mark.slow
def test_stage2_with_the_store_trains_and_evaluates_as_without_it(world, tmp_path, vit_calls):
    out = tmp_path / "out"
    steps.train_stage1(_s1(world, out, validate_every=0))
    steps.extract_topk(TopKConfig(stage1_run="s1", topk_k=8, topk_splits="train,val", outputs=str(out)))
    plain = steps.train_stage2(_s2(world, out, stage2_run="plain"))
    stored = steps.train_stage2(_s2(world, out, stage2_run="stored", feature_store="float32"))
    assert len(_losses(plain.run_dir)) == 2
    assert _losses(stored.run_dir) == pytest.approx(_losses(plain.run_dir), abs=1e-5)
    _assert_same_metrics(plain.metrics, stored.metrics)
    assert list((out / "features").glob("vit-*")), "stage II keeps its ViT tokens in a vit store"
    vit_calls.clear()
    a = steps.evaluate(EvaluateConfig(stage2_run="plain", k=8, outputs=str(out)))
    assert vit_calls, "the run trained without a store encodes its gallery"
    vit_calls.clear()
    b = steps.evaluate(EvaluateConfig(stage2_run="stored", k=8, outputs=str(out)))
    assert vit_calls == [], "the run trained with a store re-ranks from it"
    _assert_same_metrics(a.stage1, b.stage1)
    _assert_same_metrics(a.stage2, b.stage2)


@pytest.mark.parametrize("make, match", [
    (lambda w, o: _s1(w, o, feature_store="float32", train_image_encoder=True), "train_image_encoder=True"),
    (lambda w, o: _s1(w, o, feature_store="bf16"), "expected one of"),
])
def test_stage1_refuses_a_store_it_cannot_use(world, tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        steps.train_stage1(make(world, tmp_path))
    assert not (tmp_path / "stage1").exists(), "refused before any work"


def test_stage2_refuses_a_store_with_the_original_train_mode(world, tmp_path):
    with pytest.raises(ValueError, match="stage1_train_mode=True"):
        steps.train_stage2(_s2(world, tmp_path, feature_store="float16", stage1_train_mode=True))
    assert not (tmp_path / "stage2").exists()
