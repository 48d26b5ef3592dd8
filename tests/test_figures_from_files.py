"""Figures and the explorer read files only: on a finished tiny run whose model folders are deleted, Figure 8, the
recall curves, the qualitative grid, the rank-shift table and the explorer (any K up to the evaluated one, any fusion
weight) all work, and agree with what the evaluation saved."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from cirlib import paths
from cirlib.data import load_split, synth
from cirlib.eval import metrics as M
from cirlib.retrieval.topk import TopK
from cirlib.run_folder import RunFolder
from cirlib.workbook import figures, inputs, steps
from cirlib.workbook.config import (AnalysisConfig, EvaluateConfig, ExplorerConfig, Stage1Config,
                                    Stage2TrainConfig, TopKConfig)
from cirlib.workbook import explorer
from cirlib.workbook.explorer import SHOWN, Explorer

K, FUSION = 12, 0.25  # the evaluation's settings (fusion above 0, so the fused path is what gets checked)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny CIRR world taken through stage I, top-K, stage II and evaluation; then both model/ folders deleted."""
    tmp = tmp_path_factory.mktemp("files_only")
    world = synth.generate(synth.SynthConfig(layout="cirr", n_train=32, n_val=16, n_test=8, seed=3), root=tmp / "w")
    out = str(tmp / "outputs")  # every config's outputs root: nothing is written under the repository
    common = dict(data_root=str(world), preset="tiny", epochs=1, max_epoch=1, lr=1e-3, max_steps_per_epoch=2,
                  outputs=out)
    steps.train_stage1(Stage1Config(stage1_run="s1", train_image_encoder=True, batch_size=16, **common))
    steps.extract_topk(TopKConfig(stage1_run="s1", topk_k=20, topk_splits="val", outputs=out))
    steps.train_stage2(Stage2TrainConfig(stage2_run="s2", stage1_run="s1", reranker="joint", init="scratch", k=K,
                                         batch_size=8, scoring="pairs", **common))
    steps.evaluate(EvaluateConfig(stage2_run="s2", k=K, fusion_weight=FUSION, scoring="pairs", outputs=out))
    s1, s2 = RunFolder.of("stage1", "s1", out), RunFolder.of("stage2", "s2", out)
    for run in (s1, s2):
        shutil.rmtree(run.model_dir)
    cfg = AnalysisConfig(stage1_run="s1", stage2_run="s2", dataset="cirr", data_root=str(world),
                         figures_dir=str(tmp / "figures"), n_qualitative=3, outputs=out)
    explorer = ExplorerConfig(stage1_run="s1", stage2_run="s2", dataset="cirr", data_root=str(world), outputs=out)
    return {"cfg": cfg, "explorer": explorer, "s1": s1, "s2": s2}


@pytest.mark.slow
def test_figures_and_rank_shift_table_need_no_model(finished_run):
    cfg, s2 = finished_run["cfg"], finished_run["s2"]
    table = inputs.check_inputs(cfg, "make_figures")
    assert table["exists"].all() and not any("model" in p for p in table["path"])
    files = figures.make_figures(cfg)
    assert sorted(p.name for p in files) == sorted(f"{stem}.{ext}" for stem in
                                                   ("fig8_rank_shift_cirr", "recall_curves_cirr", "qualitative_cirr")
                                                   for ext in ("pdf", "png"))
    assert all(p.stat().st_size > 1000 for p in files)
    # the rank-shift table is the saved label tensor's (the original's format, still written)
    labels2 = torch.load(s2.labels_file("val"), weights_only=True)
    scored = TopK.load(s2.reranked_file("val"))
    row = figures.rank_shift_table(cfg).iloc[0]
    hit = labels2.any(1).numpy()
    assert row["queries"] == labels2.shape[0] and row["K"] == K
    assert row["mean rank, stage II"] == pytest.approx(M.ranks_from_labels(labels2.numpy())[hit].mean(), abs=1e-3)
    assert row["mean rank, stage I"] == pytest.approx(M.ranks_from_labels(scored.labels.numpy())[hit].mean(), abs=1e-3)


@pytest.mark.slow
def test_the_reranked_file_reproduces_the_evaluation(finished_run):
    s1, s2 = finished_run["s1"], finished_run["s2"]
    scored = TopK.load(s2.reranked_file("val"))
    stage1 = TopK.load(s1.topk_file("val"))
    # the stage-I top-K cut to the evaluated K, in stage-I order, with both scores and what produced it
    assert scored.k == K and np.array_equal(scored.sorted_index_names, stage1.sorted_index_names[:, :K])
    assert torch.equal(scored.scores, stage1.scores[:, :K]) and scored.stage2_scores.shape == (16, K)
    assert scored.provenance["stage2"]["fusion_weight"] == FUSION and scored.provenance["stage2"]["k"] == K
    labels2 = torch.load(s2.labels_file("val"), weights_only=True)
    assert torch.equal(scored.reranked(FUSION).labels, labels2)
    metrics = paths.read_json(s2.evaluation_file)
    recall = M.recall_at_k(scored.reranked(FUSION).labels.numpy(), [1, 5, 10])
    assert all(metrics["stage2"][key] == pytest.approx(value) for key, value in recall.items())


@pytest.mark.slow
def test_explorer_changes_k_and_fusion_weight_from_the_files(finished_run):
    cfg, s2 = finished_run["explorer"], finished_run["s2"]
    assert inputs.check_inputs(cfg, "explorer")["exists"].all()
    labels2 = torch.load(s2.labels_file("val"), weights_only=True)
    scored = TopK.load(s2.reranked_file("val"))
    ex = Explorer(cfg)
    assert ex.default_settings() == (K, FUSION)
    shown = ex.queries()["stage-II rank"].fillna(0).to_numpy()  # <NA>: not in the top-K
    assert (shown == M.ranks_from_labels(labels2.numpy()) + 1).all()
    for row in range(labels2.shape[0]):  # at the evaluated settings: the saved stage-II ranking
        view = ex.ranking(row, K, FUSION)
        saved = int(labels2[row].int().argmax()) + 1 if labels2[row].any() else None
        assert view.rank_of_target()[1] == saved
        assert sorted(view.final_names) == sorted(view.stage1_names)
    # a smaller K and stage II alone: the first 5 stage-I candidates sorted by their stage-II scores
    view = ex.ranking(2, 5, 0.0)
    order = np.argsort(-scored.stage2_scores[2, :5].numpy(), kind="stable")
    assert list(view.final_names) == list(scored.sorted_index_names[2, :5][order])
    assert "stage-II score" in view.table().columns
    shown = np.round(scored.stage2_scores[2, :5].numpy()[order], 4)
    assert view.table()["stage-II score"].tolist() == pytest.approx(shown)
    assert "fused z-score (w=0.5)" in ex.ranking(2, 5, 0.5).table().columns
    assert list(ex.ranking(0, 10, 1.0).final_names) == list(scored.sorted_index_names[0, :10])  # stage I alone
    with pytest.raises(ValueError, match=f"k must lie in 1..{K}"):
        ex.ranking(0, K + 1)
    assert len(ex.figure(1, 8, FUSION).axes) == 1 + 2 * SHOWN  # K = 8 re-ranked, the first SHOWN drawn
    assert len(ex.figure(1, 3, FUSION).axes) == 1 + 2 * 3  # fewer re-ranked than SHOWN: all of them


@pytest.mark.slow
def test_missing_reranked_file_is_named_with_its_maker(finished_run, tmp_path):
    cfg = AnalysisConfig(stage1_run="s1", stage2_run="absent_run", dataset="cirr",
                         data_root=finished_run["cfg"].data_root, outputs=finished_run["cfg"].outputs)
    with pytest.raises(FileNotFoundError, match=r"(?s)re-ranked top-K file \(cirr, ours\): \S*reranked_val\.pt "
                                                r"\(made by 04_stage2_evaluate\)"):
        inputs.check_inputs(cfg, "make_figures")
    with pytest.raises(FileNotFoundError, match="run notebook 04"):
        Explorer(ExplorerConfig(stage2_run="absent_run", data_root=cfg.data_root, outputs=cfg.outputs))


def test_a_target_outside_the_top_k_shows_the_same_mark_in_the_table_and_the_widget(tmp_path):
    world = synth.generate(synth.SynthConfig(layout="cirr", n_train=4, n_val=3, n_test=0, seed=3), root=tmp_path / "w")
    sd = load_split("cirr", world, "val")
    others = lambda q: [n for n in sd.gallery if n not in (q.target, q.reference)][:3]  # noqa: E731
    q0 = sd.queries[0]
    names = [[others(q0)[0], q0.target, others(q0)[1]]] + [others(q) for q in sd.queries[1:]]
    n = len(names)
    tk = TopK(dataset="cirr", split="val", category=None, sorted_index_names=np.array(names),
              index_names=tuple(sd.gallery), target_names=tuple(q.target for q in sd.queries),
              scores=torch.tensor([[3.0, 2.0, 1.0]] * n), stage2_scores=torch.tensor([[0.0, 1.0, 0.5]] * n))
    table = explorer.query_ranks(tk, sd, 0.0)
    # query 0: target 2nd in stage I, 1st after re-ranking; the others: not among the 3 candidates
    assert str(table["stage-I rank"].dtype) == "Int64"
    assert table["stage-I rank"].tolist()[0] == 2 and table["stage-II rank"].tolist()[0] == 1
    assert table[["stage-I rank", "stage-II rank"]].iloc[1:].isna().all().all()
    assert table.sort_values("stage-II rank").index[0] == 0  # sorts as numbers; a missing rank is never the top
    seen = explorer.show_ranks(table).to_string().splitlines()
    assert seen[1].split()[-2:] == ["2", "1"] and all(line.split()[-2:] == ["-", "-"] for line in seen[2:])
    view = lambda row: explorer.QueryView(row=row, text="t", reference=sd.queries[row].reference,  # noqa: E731
                                          target=sd.queries[row].target, stage1=tk.rows([row]),
                                          reranked=tk.rows([row]).reranked(0.0), fusion_weight=0.0)
    assert "stage-I rank 2, re-ranked 1 (of 3" in explorer.status_line(view(0), 3)
    assert f"stage-I rank {explorer.NOT_IN_TOPK}, re-ranked {explorer.NOT_IN_TOPK} (of 3" in \
        explorer.status_line(view(1), 3)
    assert explorer.NOT_IN_TOPK == "-" and "- = not in the top-K" in explorer.show_ranks(table).to_html()
