"""End to end through the library's entry points on a small synthetic world (tiny models, CPU, about a minute):
train stage I, write and reload the top-k files, train stage II on top-K + in-batch negatives, re-rank, evaluate,
write a CIRR-format test submission that the validator accepts, and resume an interrupted run exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cirlib.workbook import steps
from cirlib.eval import submission
from cirlib.data import synth
from cirlib.workbook.config import EvaluateConfig, Stage1Config, Stage2TrainConfig, SubmissionConfig, TopKConfig
from cirlib.retrieval.topk import TopK, TopKError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "cirr"
    synth.generate(synth.SynthConfig(layout="cirr", n_train=96, n_val=24, n_test=24, seed=3), root=root)
    return root


@pytest.fixture()
def outputs(tmp_path):
    """Run folders go to a temporary outputs root (every config's `outputs` field)."""
    return str(tmp_path / "outputs")


def _stage1(world, outputs, **kw) -> Stage1Config:
    base = dict(stage1_run="s1", data_root=str(world), preset="tiny", train_image_encoder=True, epochs=2, max_epoch=2,
                lr=1e-3, batch_size=16, max_steps_per_epoch=3, seed=0, outputs=outputs)
    base.update(kw)
    return Stage1Config(**base)


def _topk(outputs, **kw) -> TopKConfig:
    return TopKConfig(**{**dict(stage1_run="s1", topk_k=60, topk_splits="train,val,test1", mining_queries=48,
                                outputs=outputs), **kw})


@pytest.mark.e2e
def test_two_stage_pipeline(world, outputs):
    s1 = steps.train_stage1(_stage1(world, outputs))
    assert not s1.reused and (s1.run_dir / "model" / "model.safetensors").exists()
    for key in ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3"):
        assert 0.0 <= s1.metrics[key] <= 100.0
    log = [json.loads(line) for line in (s1.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == [0, 1] and all("loss" in r for r in log if r["kind"] == "epoch")
    assert [r["kind"] for r in log].count("val") == 2 and (s1.run_dir / "metrics.csv").exists()
    # the same records as TensorBoard curves in the run folder (tests/test_tracking.py compares every value)
    tb = EventAccumulator(str(s1.run_dir / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in tb.Scalars("val/R@1")] == [(r["step"], pytest.approx(r["val/R@1"]))
                                                                   for r in log if r["kind"] == "val"]
    # a finished run with the same config is reused, not retrained
    assert steps.train_stage1(_stage1(world, outputs)).reused

    report = steps.extract_topk(_topk(outputs))
    assert set(report["split"]) == {"train", "val", "test1"}
    val = TopK.load(s1.run_dir / "topk_val.pt", dataset="cirr", split="val")
    assert val.k == 60 and val.labels.shape == (24, 60) and val.group_labels.shape == (24, 5)
    # the reference is removed from every CIRR ranking
    refs = json.loads((world / "cirr" / "captions" / "cap.rc2.val.json").read_text())
    assert all(r["reference"] not in row for r, row in zip(refs, val.sorted_index_names.tolist()))
    # the top-k file's stage-I recall agrees with the metrics computed over the full ranking
    r10 = 100.0 * val.labels[:, :10].any(1).float().mean().item()
    assert r10 == pytest.approx(s1.metrics["R@10"])
    with pytest.raises(TopKError):
        TopK.load(s1.run_dir / "topk_val.pt", dataset="cirr", split="test1")
    with pytest.raises(TopKError):
        TopK.load(s1.run_dir / "topk_val.pt", k=61)
    train_topk = TopK.load(s1.run_dir / "topk_train.pt", split="train")
    assert train_topk.sorted_index_names.shape[0] == 48

    cfg2 = Stage2TrainConfig(stage2_run="s2", stage1_run="s1", data_root=str(world), preset="tiny", reranker="joint",
                             init="scratch", k=32, hard_negatives=3, set_negatives=2, inbatch_negatives=4, mining_k=20,
                             epochs=1, max_epoch=1, lr=1e-3, batch_size=8, max_steps_per_epoch=3, outputs=outputs)
    s2 = steps.train_stage2(cfg2)
    assert (s2.run_dir / "model" / "model.safetensors").exists()
    assert "epoch/loss" in EventAccumulator(str(s2.run_dir / "tensorboard")).Reload().Tags()["scalars"]
    comparison = steps.evaluate(EvaluateConfig(stage2_run="s2", k=32, outputs=outputs))
    table = comparison.table()
    assert {"R@1", "R@5", "R@10", "Rsubset@1"} <= set(table.index)
    metrics = json.loads((s2.run_dir / "metrics.json").read_text())
    assert metrics["k"] == 32 and metrics["stage1"]["R@1"] == pytest.approx(s1.metrics["R@1"])
    # re-ranking only permutes the top-K: recall at K is unchanged, and the label tensor is the original's layout
    labels2 = torch.load(s2.run_dir / "stage2_labels_val.pt", weights_only=True)
    assert labels2.dtype == torch.bool and labels2.shape == (24, 32)
    assert labels2.any(1).sum() == val.labels[:, :32].any(1).sum()

    files = steps.submit_cirr(SubmissionConfig(stage2_run="s2", k=32, submission_name="e2e", outputs=outputs))
    test_queries = json.loads((world / "cirr" / "captions" / "cap.rc2.test1.json").read_text())
    gallery = list(json.loads((world / "cirr" / "image_splits" / "split.rc2.test1.json").read_text()))
    for path in files.values():
        assert submission.validate_cirr_submission(path, test_queries, gallery) == []
    recall = json.loads(files["stage2_recall"].read_text())
    stage1_recall = json.loads(files["stage1_recall"].read_text())
    assert recall["version"] == "rc2" and recall["metric"] == "recall"
    # the same 50 names per query, re-ordered only inside the re-ranked head
    some = str(test_queries[0]["pairid"])
    assert set(recall[some]) == set(stage1_recall[some]) and recall[some][32:] == stage1_recall[some][32:]


@pytest.mark.e2e
def test_interrupted_stage1_resumes_to_the_same_weights(world, outputs):
    straight = steps.train_stage1(_stage1(world, outputs, stage1_run="straight"))
    steps.train_stage1(_stage1(world, outputs, stage1_run="resumed", epochs=1))
    resumed = steps.train_stage1(_stage1(world, outputs, stage1_run="resumed"))
    assert not resumed.reused
    a = load_file(straight.run_dir / "checkpoints" / "last" / "model.safetensors")
    b = load_file(resumed.run_dir / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert max(diffs.values()) == 0.0, {k: v for k, v in diffs.items() if v}
    assert not np.isnan(sum(diffs.values()))
