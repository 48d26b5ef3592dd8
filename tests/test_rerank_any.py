"""Re-rank anyone's candidates (`cirlib.workbook.rerank_any`, `python -m cirlib.rerank`): our own stage-I top-k file
re-ranked through this path gives exactly `steps.evaluate`'s metrics and re-ranked file; the gain analysis, reuse and
refusals. A tiny synthetic CIRR world with an untrained tiny stage I and stage II (epochs=0: random but fixed
weights, which is all equality needs)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from cirlib import paths
from cirlib.data import synth
from cirlib.retrieval.ranked_lists import RankedListError, split_query_ids, write_ranked_lists
from cirlib.retrieval.topk import TopK
from cirlib.run import rerank as cli
from cirlib.run_folder import RunFolder
from cirlib.workbook import steps
from cirlib.workbook.config import EvaluateConfig, RerankConfig, Stage1Config, Stage2TrainConfig, TopKConfig
from cirlib.workbook import rerank_any as rerank_any_module
from cirlib.workbook.rerank_any import rerank_any, result_folder

K = 16


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A world, stage I (evaluated only), its val top-20 file, stage II (initialised only)."""
    tmp = tmp_path_factory.mktemp("rerank_any")
    world = tmp / "cirr"
    synth.generate(synth.SynthConfig(layout="cirr", n_train=8, n_val=16, n_test=12, seed=7), root=world)
    out = str(tmp / "outputs")
    steps.train_stage1(Stage1Config(stage1_run="s1", data_root=str(world), preset="tiny", epochs=0, outputs=out))
    steps.extract_topk(TopKConfig(stage1_run="s1", topk_k=60, topk_splits="val,test1", outputs=out))
    steps.train_stage2(Stage2TrainConfig(stage2_run="s2", stage1_run="s1", data_root=str(world), preset="tiny",
                                         reranker="joint", joint_difference=True, init="scratch", k=K, epochs=0,
                                         scoring="pairs", outputs=out))
    return {"world": world, "outputs": out}


@pytest.fixture()
def outputs(base, tmp_path):
    copy = tmp_path / "outputs"
    shutil.copytree(base["outputs"], copy)
    return str(copy)


def _topk_file(outputs: str, split: str = "val"):
    return RunFolder.of("stage1", "s1", outputs).topk_file(split)


def _rerank(outputs: str, **kw):
    return rerank_any(RerankConfig(**{**dict(candidates=str(_topk_file(outputs)), stage2_run="s2", k=K,
                                             scoring="pairs", outputs=outputs), **kw}))


def test_our_own_top_k_re_ranked_here_equals_evaluate(outputs):
    weight = 0.5
    comparison = steps.evaluate(EvaluateConfig(stage2_run="s2", k=K, fusion_weight=weight, scoring="pairs",
                                               outputs=outputs))
    result = _rerank(outputs, fusion_weight=weight)
    assert result.imported == comparison.stage1 and result.reranked == comparison.stage2
    assert {"R@1", "Rsubset@1"} <= set(result.reranked)
    ours = TopK.load(result.out_dir / "reranked_val.pt")
    native = TopK.load(RunFolder.of("stage2", "s2", outputs).reranked_file("val"))
    assert torch.equal(ours.stage2_scores, native.stage2_scores) and torch.equal(ours.scores, native.scores)
    assert np.array_equal(ours.reranked(weight).sorted_index_names, native.reranked(weight).sorted_index_names)
    # the sweep's weight is native fusion at that weight
    sweep = result.record["analysis"]["fusion_sweep"]
    at = dict(zip(sweep["weights"], sweep["metrics"]))
    assert at[weight] == comparison.stage2


def test_exports_of_our_top_k_re_ranked_equal_evaluate_and_native_fusion(outputs, tmp_path, base):
    """The issue's check: the CIRR server JSON (names only) of the val top-k re-ranked gives evaluate's stage-II
    metrics; a TREC export (scores kept) fused at a weight equals native fusion at that weight."""
    from cirlib.data import load_split

    sd = load_split("cirr", base["world"], "val")
    tk = TopK.load(_topk_file(outputs))
    names_only = write_ranked_lists(tk, tmp_path / "val.json", "cirr", query_ids=split_query_ids(sd))
    trec = write_ranked_lists(tk, tmp_path / "val.trec", "trec", query_ids=split_query_ids(sd))
    native = {w: steps.evaluate(EvaluateConfig(stage2_run="s2", k=K, fusion_weight=w, scoring="pairs",
                                               outputs=outputs, overwrite=True)) for w in (0.0, 0.4)}
    from_json = _rerank(outputs, candidates=str(names_only))
    assert from_json.reranked == native[0.0].stage2 and from_json.record["analysis"]["fusion_sweep"] is None
    fused = _rerank(outputs, candidates=str(trec), fusion_weight=0.4)
    assert fused.reranked["R@1"] == native[0.4].stage2["R@1"] and fused.reranked["R@5"] == native[0.4].stage2["R@5"]
    sweep = fused.record["analysis"]["fusion_sweep"]
    assert dict(zip(sweep["weights"], sweep["metrics"]))[0.4]["R@10"] == native[0.4].stage2["R@10"]


def test_a_file_missing_queries_names_them_or_drops_them_recorded(outputs, tmp_path, base):
    from cirlib.data import load_split

    sd = load_split("cirr", base["world"], "val")
    ids = split_query_ids(sd)
    trec = write_ranked_lists(TopK.load(_topk_file(outputs)), tmp_path / "val.trec", "trec", query_ids=ids)
    lines = trec.read_text().splitlines()
    trec.write_text("\n".join(line for line in lines if line.split()[0] not in ids[:2]) + "\n")
    assert cli.main(["--candidates", str(trec), "--stage2", "s2", "--k", str(K), "--outputs", outputs]) == 2
    result = _rerank(outputs, candidates=str(trec), missing_queries="drop")
    counts = result.record["query_counts"]["val"]
    assert counts["dropped_from_candidates"] == ids[:2] and counts["evaluated"] == 14
    listed = json.loads((result.out_dir / "dropped_queries.json").read_text())["rerank_candidates"]["splits"][0]
    assert listed["query_ids"] == ids[:2]


def test_the_analysis_counts_every_query_and_records_what_produced_it(outputs):
    result = _rerank(outputs)
    analysis, n = result.record["analysis"], result.record["queries"]
    assert sum(analysis["outcomes"]["val"].values()) == n == 16
    per_query = analysis["outcomes_per_query"]["val"]
    assert len(per_query) == n and set(per_query.values()) <= {"missing", "up", "down", "unchanged"}
    cand = TopK.load(_topk_file(outputs)).sliced(K).labels.any(dim=1).float().mean().item() * 100
    assert analysis["ceiling"]["val"] == pytest.approx(cand)
    assert analysis["outcomes"]["val"]["missing"] == round(n * (1 - cand / 100))
    assert result.reranked["R@10"] <= analysis["ceiling"]["val"] and analysis["latency_ms_per_query"] > 0
    saved = json.loads((result.out_dir / "metrics.json").read_text())
    sha = saved["provenance"]["candidates_sha256"]
    assert list(sha.values()) == [paths_sha(_topk_file(outputs))]
    assert (result.out_dir / "provenance.json").is_file()
    assert saved["query_counts"]["val"]["missing_from_candidates"] == 0
    assert result.out_dir == result_folder(RerankConfig(candidates=str(_topk_file(outputs)), stage2_run="s2",
                                                        outputs=outputs)).path
    assert result.out_dir.parent.name == "rerank"


def paths_sha(p) -> str:
    from cirlib.run_folder import file_sha256
    return file_sha256(p)


def test_a_saved_re_ranking_is_reused_only_for_the_same_inputs(outputs, tmp_path):
    first = _rerank(outputs)
    copy = tmp_path / "candidates.pt"
    shutil.copy(_topk_file(outputs), copy)
    # the same content elsewhere is the same input
    assert not first.reused and _rerank(outputs, candidates=str(copy), out=str(first.out_dir)).reused
    tk = TopK.load(copy)
    dataclasses.replace(tk, scores=tk.scores + 1).save(copy)  # other content
    again = _rerank(outputs, candidates=str(copy), out=str(first.out_dir))
    assert not again.reused and again.imported == first.imported  # scores moved, not the order
    assert not _rerank(outputs, fusion_weight=0.3).reused  # another setting


def test_queries_the_file_lacks_are_dropped_and_recorded(outputs, monkeypatch):
    """Whatever reads the file (the seam `load_candidates`) hands over kept rows and dropped ids; the rest follows."""
    real = rerank_any_module.load_candidates

    def lacking_odd_rows(path, fmt, sd, k, missing_queries):
        tk, rows, _, _ = real(path, fmt, sd, k, missing_queries)
        kept = [r for r in rows if r % 2 == 0]
        return tk.rows(kept), kept, [str(sd.queries[r].pair_id) for r in rows if r % 2], ["a warning"]

    monkeypatch.setattr(rerank_any_module, "load_candidates", lacking_odd_rows)
    result = _rerank(outputs, missing_queries="drop")
    counts = result.record["query_counts"]["val"]
    assert (counts["evaluated"], counts["in_split"], counts["missing_from_candidates"]) == (8, 16, 8)
    assert len(counts["dropped_from_candidates"]) == 8 and result.record["warnings"] == ["a warning"]
    listed = json.loads((result.out_dir / "dropped_queries.json").read_text())["rerank_candidates"]["splits"][0]
    assert listed["query_ids"] == counts["dropped_from_candidates"] and listed["queries_dropped"] == 8
    labels = TopK.load(_topk_file(outputs)).sliced(K).labels[::2]
    assert result.imported["R@5"] == pytest.approx(100 * labels[:, :5].any(dim=1).float().mean().item())
    assert sum(result.record["analysis"]["outcomes"]["val"].values()) == 8


def test_a_cirr_test_split_import_yields_checked_server_files(outputs):
    result = _rerank(outputs, candidates=str(_topk_file(outputs, "test1")), split="test1")
    assert result.imported == {} and result.reranked == {}
    files = result.record["files"]
    recall = json.loads(open(files["reranked_recall"]).read())
    assert recall["metric"] == "recall" and len(recall) == 2 + 12
    assert all(len(v) == 50 for k, v in recall.items() if k not in ("version", "metric"))


def test_refusals_name_what_is_wrong(outputs, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"split='dev': not a CIRR split"):
        _rerank(outputs, split="dev")
    with pytest.raises(RankedListError, match="shorter than"):
        _rerank(outputs, k=61)
    with pytest.raises(FileNotFoundError, match=r"1 input\(s\) missing.*\n  candidates: \S*absent.pt"):
        rerank_any_module.check_inputs(RerankConfig(candidates=str(tmp_path / "absent.pt"), stage2_run="s2",
                                                    outputs=outputs))
    # the command line: one line on stderr, exit status 2
    assert cli.main(["--candidates", str(tmp_path / "absent.pt"), "--stage2", "s2", "--outputs", outputs]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "candidate file(s) not found" in err and "absent.pt" in err


@pytest.mark.slow
def test_the_command_line_prints_imported_and_re_ranked_metrics(outputs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(paths.REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "cirlib.rerank", "--candidates", str(_topk_file(outputs)),
                           "--stage2", "s2", "--k", str(K), "--scoring", "pairs", "--outputs", outputs,
                           "--out", str(tmp_path / "out"), "--json"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert summary["imported"] == saved["imported"] and summary["reranked"] == saved["reranked"]
    assert {"R@1", "R@5", "Rsubset@1"} <= set(summary["reranked"])
    assert summary["analysis"]["outcomes"]["val"] and summary["query_counts"]["val"]["evaluated"] == 16
