"""FashionIQ end to end through the library's entry points, as tests/test_pipeline_e2e.py does for CIRR: a synthetic
FashionIQ-layout world with three categories, stage I, top-K of val and train (the train top-K supplies stage II's
hard negatives), stage II, evaluation (per-category metrics and the average the paper reports) and Figure 8 per
category; and the options FashionIQ cannot honour refused before any work, with the reason."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cirlib import data as cdata
from cirlib.data import synth
from cirlib.retrieval.search import query_texts
from cirlib.retrieval.topk import TopK
from cirlib.run_folder import RunFolder
from cirlib.workbook import figures, steps
from cirlib.workbook.config import (AnalysisConfig, EvaluateConfig, Stage1Config, Stage2TrainConfig,
                                    SubmissionConfig, TopKConfig)

CATEGORIES = ("dress", "shirt", "toptee")
K = 50  # FashionIQ reports R@50 of the re-ranked list, so stage II re-ranks at least 50 (the paper: 100)
TOPK_K = 60  # the synthetic val galleries hold 60 images per category
MINING_QUERIES = 24  # of 32 train queries per category


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "fashionIQ_dataset"
    # 32 train and 10 val queries per category; each query brings its reference, target and 4 near-duplicates, so
    # a val gallery holds 60 images: enough for K = 50
    return synth.generate(synth.SynthConfig(layout="fashioniq", n_train=96, n_val=30, n_test=12, seed=3), root=root)


@pytest.fixture(scope="module")
def pipeline(world, tmp_path_factory):
    """Stage I, top-K of val and train, stage II with hard negatives, evaluation and figures, once for the module."""
    tmp = tmp_path_factory.mktemp("fiq_runs")
    out = str(tmp / "outputs")
    common = dict(dataset="fashioniq", data_root=str(world), categories=",".join(CATEGORIES), preset="tiny",
                  epochs=1, max_epoch=1, lr=1e-3, max_steps_per_epoch=2, outputs=out)
    s1 = steps.train_stage1(Stage1Config(stage1_run="s1", train_image_encoder=True, batch_size=16, **common))
    report = steps.extract_topk(TopKConfig(stage1_run="s1", topk_k=TOPK_K, topk_splits="val,train",
                                           mining_queries=MINING_QUERIES, outputs=out))
    # validate_every=0: re-ranking 3 x 10 x 50 pairs on two CPU cores is the slow part; evaluate() does it once
    s2 = steps.train_stage2(Stage2TrainConfig(stage2_run="s2", stage1_run="s1", reranker="joint", init="scratch", k=K,
                                              hard_negatives=2, mining_k=20, batch_size=4, scoring="pairs",
                                              validate_every=0, **common))
    comparison = steps.evaluate(EvaluateConfig(stage2_run="s2", k=K, scoring="pairs", outputs=out))
    analysis = AnalysisConfig(stage1_run="s1", stage2_run="s2", dataset="fashioniq", data_root=str(world),
                              figures_dir=str(tmp / "figures"), n_qualitative=2, outputs=out)
    return {"out": out, "s1": s1, "report": report, "s2": s2, "comparison": comparison, "analysis": analysis,
            "figures": figures.make_figures(analysis)}


def _check_fiq_summary(metrics: dict[str, float]) -> None:
    """Per-category R@10/R@50, their means over the three categories, and average_recall = (avg R@10 + R@50) / 2."""
    for key in ("R@10", "R@50"):
        per_cat = [metrics[f"{c}_{key}"] for c in CATEGORIES]
        assert all(0.0 <= v <= 100.0 for v in per_cat)
        assert metrics[f"avg_{key}"] == pytest.approx(np.mean(per_cat))
    assert metrics["average_recall"] == pytest.approx((metrics["avg_R@10"] + metrics["avg_R@50"]) / 2)


@pytest.mark.e2e
def test_stage1_reports_each_category_and_the_papers_average(pipeline):
    s1 = pipeline["s1"]
    assert not s1.reused and (s1.run_dir / "model" / "model.safetensors").exists()
    _check_fiq_summary(s1.metrics)
    assert s1.metrics["selection"] == s1.metrics["average_recall"]


@pytest.mark.e2e
def test_train_and_val_topk_per_category(pipeline, world):
    s1_dir = pipeline["s1"].run_dir
    report = pipeline["report"]
    assert sorted(zip(report["split"], report["category"])) == sorted(
        (s, c) for s in ("train", "val") for c in CATEGORIES)
    for cat in CATEGORIES:
        val_sd = cdata.load_split("fashioniq", world, "val", cat)
        val = TopK.load(s1_dir / f"topk_val_{cat}.pt", dataset="fashioniq", split="val", category=cat,
                        index_names=val_sd.gallery)
        assert val.k == TOPK_K and val.labels.shape == (10, TOPK_K)
        # the top-k file's stage-I recall agrees with the metrics computed over the full ranking
        r10 = 100.0 * val.labels[:, :10].any(1).float().mean().item()
        assert r10 == pytest.approx(pipeline["s1"].metrics[f"{cat}_R@10"])
        train_sd = cdata.load_split("fashioniq", world, "train", cat)
        train = TopK.load(s1_dir / f"topk_train_{cat}.pt", dataset="fashioniq", split="train", category=cat)
        # mining_queries cuts the queries; FashionIQ has no img_sets, so they are ranked in the whole category gallery
        assert train.num_queries == MINING_QUERIES and list(train.index_names) == list(train_sd.gallery)
        assert list(train.target_names) == [q.target for q in train_sd.queries[:MINING_QUERIES]]


def test_train_queries_are_ranked_with_the_fixed_join():
    # the regression behind "FashionIQ training text is randomised: pass a seeded random.Random as rng": ranking
    # (top-K mining) uses the validation text "C1 and c2", deterministically, on the train split too
    q = cdata.Query(index=0, pair_id=None, reference="B0A", target="B0B", captions=("is red.", " has sleeves"),
                    members=None, category="dress")
    sd = cdata.SplitData(dataset="fashioniq", split="train", category="dress", root=Path("."), queries=[q],
                         gallery=["B0A", "B0B"])
    assert query_texts(sd, [q]) == ["Is red and has sleeves"] == [cdata.query_text(q, "fashioniq", "val")]


@pytest.mark.e2e
def test_stage2_trains_on_hard_negatives_from_the_train_topk(pipeline):
    s2 = pipeline["s2"]
    assert (s2.run_dir / "model" / "model.safetensors").exists()
    record = json.loads(RunFolder.at(s2.run_dir).completion_file.read_text())
    assert sorted(record["inputs"]["train_topk"]) == sorted(f"topk_train_{c}.pt" for c in CATEGORIES)
    assert record["config"]["hard_negatives"] == 2


@pytest.mark.e2e
def test_evaluation_per_category_and_average(pipeline):
    s1, s2, comparison = pipeline["s1"], pipeline["s2"], pipeline["comparison"]
    metrics = json.loads((s2.run_dir / "metrics.json").read_text())
    assert metrics["k"] == K
    for stage in ("stage1", "stage2"):
        _check_fiq_summary(metrics[stage])
    # stage I's numbers here are its own run's (same queries, K >= 50 covers R@50)
    for key in ("R@10", "R@50"):
        for cat in CATEGORIES:
            assert metrics["stage1"][f"{cat}_{key}"] == pytest.approx(s1.metrics[f"{cat}_{key}"])
    assert {"average_recall", "avg_R@10", "avg_R@50"} <= set(comparison.table().index)
    for cat in CATEGORIES:
        # re-ranking only permutes the top K: the same queries have their target within it
        labels2 = torch.load(s2.run_dir / f"stage2_labels_val_{cat}.pt", weights_only=True)
        stage1 = TopK.load(s1.run_dir / f"topk_val_{cat}.pt")
        assert labels2.dtype == torch.bool and labels2.shape == (10, K)
        assert torch.equal(labels2.any(1), stage1.labels[:, :K].any(1))
    # FashionIQ has no test server
    assert steps.submit_cirr(SubmissionConfig(stage2_run="s2", k=K, outputs=pipeline["out"])) == {}


@pytest.mark.e2e
def test_figure8_and_recall_curves_per_category(pipeline):
    written = {p.name for p in pipeline["figures"]}
    for cat in CATEGORIES:
        for stem in (f"fig8_rank_shift_fashioniq_{cat}", f"recall_curves_fashioniq_{cat}",
                     f"qualitative_fashioniq_{cat}"):
            assert {f"{stem}.pdf", f"{stem}.png"} <= written
    assert all(p.stat().st_size > 1000 for p in pipeline["figures"])
    table = figures.rank_shift_table(pipeline["analysis"])
    assert len(table) == 3 and (table["queries"] == 10).all() and (table["K"] == K).all()


# ------------------------------------------------------------------------------------------------ refusals


def test_options_fashioniq_cannot_honour_are_refused_before_any_work(world, tmp_path):
    out = str(tmp_path / "outputs")
    base = dict(stage2_run="never", stage1_run="absent", dataset="fashioniq", data_root=str(world), preset="tiny",
                outputs=out)
    with pytest.raises(ValueError, match=r"set_negatives=2: .*CIRR's image sets; FashionIQ has none"):
        steps.train_stage2(Stage2TrainConfig(**base, k=K, set_negatives=2))
    with pytest.raises(ValueError, match=r"k=20: FashionIQ is reported as R@10 and R@50 .* k must be >= 50"):
        steps.train_stage2(Stage2TrainConfig(**base, k=20))
    with pytest.raises(ValueError, match=r"topk_path='/x/fiq_top_200_val.pt': FashionIQ has one top-k file per "
                                         r"category; write \{category\}"):
        steps.train_stage2(Stage2TrainConfig(**base, k=K, topk_path="/x/fiq_top_200_val.pt"))
    # nothing was started: no stage-II run folder, no stage-I model was looked for
    assert not (tmp_path / "outputs").exists()


@pytest.mark.e2e
def test_topk_and_evaluation_refusals_on_a_fashioniq_run(pipeline):
    out = pipeline["out"]
    s1_dir = pipeline["s1"].run_dir
    before = {p.name: p.stat().st_mtime_ns for p in s1_dir.iterdir()}
    with pytest.raises(ValueError, match=r"\['test1'\] are not fashioniq splits; expected some of \['train', 'val', "
                                         r"'test'\] \(\"test1\" is CIRR's test split\)"):
        steps.extract_topk(TopKConfig(stage1_run="s1", topk_k=TOPK_K, topk_splits="val,test1", overwrite=True,
                                      outputs=out))
    assert {p.name: p.stat().st_mtime_ns for p in s1_dir.iterdir()} == before  # refused before re-extracting val
    with pytest.raises(ValueError, match=r"EvaluateConfig on fashioniq: k=40"):
        steps.evaluate(EvaluateConfig(stage2_run="s2", k=40, outputs=out))
