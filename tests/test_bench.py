"""The stage-II benchmark at the tiny preset: fields, path equality, FLOP model and memory probe (no timing claims)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from cirlib.tools.bench import BenchConfig, analytic_flops, parse_args, peak_memory, run
from cirlib.models.config import preset
from cirlib.paths import REPO_ROOT

COMMON = {"case", "preset", "reranker", "device", "dtype", "threads", "text_len", "image_tokens", "pairs",
          "per_pair_s", "shared_s", "speedup", "per_pair_gflop", "shared_gflop", "flop_ratio", "per_pair_peak_mib",
          "shared_peak_mib", "memory_ratio", "memory_method", "max_abs_score_diff", "machine"}


@pytest.mark.slow
def test_bench_tiny_both_rerankers_agree():
    cfg = BenchConfig(preset="tiny", reranker="both", queries=3, gallery=4, train_batch=3, text_len=8)
    lines: list[str] = []
    results = run(cfg, emit=lambda r: lines.append(json.dumps(r)))
    assert [(r["reranker"], r["case"]) for r in results] == [
        ("dual", "eval"), ("dual", "train"), ("joint", "eval"), ("joint", "train")]
    for line, r in zip(lines, results):
        assert json.loads(line) == r  # one JSON object per case
        assert COMMON <= set(r), COMMON - set(r)
        assert r["max_abs_score_diff"] <= 1e-4
        assert r["per_pair_s"] > 0 and r["shared_s"] > 0 and r["per_pair_peak_mib"] >= 0
        assert r["flop_ratio"] == pytest.approx(r["per_pair_gflop"] / r["shared_gflop"], rel=1e-2)
    for r in results:
        if r["case"] == "eval":
            assert r["pairs"] == 12 and r["unique_candidates"] == 4 and r["score_std"] > 0
        else:
            assert r["pairs"] == 9 and r["batch"] == 3
            assert r["loss_abs_diff"] <= 1e-5
            assert r["max_abs_grad_diff"] <= 1e-4 and r["max_abs_grad"] > 0


@pytest.mark.slow
def test_bench_cli_prints_json_lines():
    proc = subprocess.run(
        [sys.executable, "-m", "cirlib.bench", "--preset", "tiny", "--reranker", "joint", "--cases", "eval",
         "--queries", "2", "--gallery", "2", "--text-len", "6"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(rows) == 1 and rows[0]["case"] == "eval" and rows[0]["reranker"] == "joint"
    assert rows[0]["max_abs_score_diff"] <= 1e-4


def test_flop_model_counts_sharing_only():
    for reranker in ("dual", "joint"):
        cfg = preset("blip-base", reranker=reranker)
        # Nothing shared (every pair its own query and candidate): both paths cost the same.
        same = analytic_flops(cfg, queries=10, pairs=10, candidates=10, text_len=20)
        assert same["per_pair"] == pytest.approx(same["shared"])
        # 16 queries x the same 16 candidates: the candidate projections dominate a pair at blip-base.
        shared = analytic_flops(cfg, queries=16, pairs=256, candidates=16, text_len=20)
        assert shared["per_pair"] > 3 * shared["shared"]
        train = analytic_flops(cfg, queries=8, pairs=64, candidates=8, text_len=20, train=True)
        fwd = analytic_flops(cfg, queries=8, pairs=64, candidates=8, text_len=20)
        assert 2 * fwd["shared"] < train["shared"] < 3 * fwd["shared"]


def test_peak_memory_sees_an_allocation():
    with peak_memory(torch.device("cpu")) as mem:
        x = torch.ones(50 * 2**20)  # 200 MiB, touched
        del x
    assert mem.peak_bytes >= 150 * 2**20
    assert mem.method in ("cpu_vmhwm", "cpu_rss_sampled")


def test_parse_args_and_bad_options():
    cfg = parse_args(["--preset", "tiny", "--cases", "train", "--train-batch", "4", "--dtype", "bf16"])
    assert cfg == BenchConfig(preset="tiny", cases=("train",), train_batch=4, dtype="bf16")
    with pytest.raises(ValueError, match="fp16 needs --device cuda"):
        run(BenchConfig(preset="tiny", dtype="fp16"))
    with pytest.raises(ValueError, match="unknown cases"):
        run(BenchConfig(preset="tiny", cases=("speed",)))


# ------------------------------------------------------------------------------- CIRR-shaped evaluation, memory
def test_zipf_lists_and_calibration():
    from cirlib.tools.bench import calibrate_zipf, mean_reuse, zipf_topk_lists
    lists = zipf_topk_lists(100, 10, 300, 1.0, torch.Generator().manual_seed(0))
    assert lists.shape == (300, 10)
    assert all(len(set(row.tolist())) == 10 for row in lists)  # each query's top-k holds distinct images
    counts = torch.bincount(lists.reshape(-1), minlength=100)
    assert counts[:10].sum() > 3 * counts[-10:].sum()  # skewed: popular images are in many more lists
    assert mean_reuse(lists) == pytest.approx(3000 / torch.unique(lists).numel())
    assert mean_reuse(zipf_topk_lists(100, 10, 300, 3.0, torch.Generator().manual_seed(0))) > mean_reuse(lists)
    # calibrated exponent: every image still appears (reuse = 300 x 10 / 100 = 30) but a stronger skew would not
    s = calibrate_zipf(gallery=100, k=10, queries=300, target=30.0, steps=8)
    assert 0 < s < 3
    assert mean_reuse(zipf_topk_lists(100, 10, 300, s, torch.Generator().manual_seed(0))) <= 30 * 1.001
    assert mean_reuse(zipf_topk_lists(100, 10, 300, s + 0.5, torch.Generator().manual_seed(0))) > 30 * 1.001


def test_bench_eval_cirr_shaped_tiny():
    cfg = BenchConfig(preset="tiny", reranker="dual", cases=("eval-cirr-shaped",), cirr_gallery=60, cirr_queries=12,
                      cirr_k=5, cirr_batch=4, cirr_sample=3, cirr_max_pairs=8, cirr_token_pool=7)
    (r,) = run(cfg, emit=lambda _: None)
    assert r["case"] == "eval-cirr-shaped" and r["pairs"] == 60 and r["gallery"] == 60
    assert r["per_pair_sample_queries"] == 3 and r["per_pair_extrapolated"]
    # the JSON rounds seconds to 4 decimals: x4 of the sample's rounding error is 2e-4
    assert r["per_pair_s_extrapolated"] == pytest.approx(r["per_pair_sample_s"] * 12 / 3, rel=1e-3, abs=3e-4)
    assert r["speedup"] == pytest.approx(r["per_pair_s_extrapolated"] / r["shared_s"], rel=2e-2)
    assert not r["shared_extrapolated"] and r["shared_passes_timed"] == r["shared_passes"]
    assert r["query_blocks"] == 1  # the dual re-ranker's 12 queries fit one block, as in `rerank`
    assert r["max_abs_score_diff"] <= 1e-4 and r["max_abs_score_diff_all_passes"] <= 1e-4 and r["score_std"] > 0
    assert r["mean_reuse"] >= 1 and r["mean_reuse_at_cirr_val_n"] > 1
    # grouping over the whole block shares each candidate projection among more pairs than within batches of 4 (the
    # FLOPs need not drop at this size: each pass also runs layer 0 once per query it holds, and tiny projections
    # are cheap)
    assert r["pass_reuse"] > r["per_batch_pass_reuse"] >= 1 and r["per_batch_flop_ratio"] > 0


def test_bench_eval_cirr_shaped_sampled_passes_extrapolate():
    cfg = BenchConfig(preset="tiny", reranker="dual", cases=("eval-cirr-shaped",), cirr_gallery=60, cirr_queries=12,
                      cirr_k=5, cirr_batch=4, cirr_sample=2, cirr_max_pairs=8, cirr_token_pool=7, cirr_pass_sample=3,
                      cirr_per_batch=False)
    (r,) = run(cfg, emit=lambda _: None)
    assert r["shared_extrapolated"] and r["shared_passes_timed"] == 3 < r["shared_passes"]
    assert r["shared_s"] > r["shared_timed_s"] > 0 and r["shared_s_per_tflop_cv"] >= 0
    assert "per_batch_shared_s" not in r and r["max_abs_score_diff"] <= 1e-4


def test_bench_eval_cirr_shaped_times_untiled_rounds_side_by_side():
    cfg = BenchConfig(preset="tiny", reranker="dual", cases=("eval-cirr-shaped",), cirr_gallery=60, cirr_queries=12,
                      cirr_k=5, cirr_batch=4, cirr_sample=2, cirr_max_pairs=8, cirr_token_pool=7, cirr_pass_sample=2,
                      cirr_per_batch=False, cirr_untiled=True, cirr_repeats=2, shared_tile_rows=26)
    (r,) = run(cfg, emit=lambda _: None)
    assert r["shared_tile_rows"] == 26 and len(r["shared_rounds_s"]) == len(r["untiled_rounds_s"]) == 2
    assert len(r["tiled_over_untiled_rounds"]) == 2 and r["untiled_shared_s"] > 0 and r["untiled_speedup"] > 0
    assert r["max_abs_score_diff_untiled"] <= 1e-5 and r["max_abs_score_diff"] <= 1e-4
    with pytest.raises(ValueError, match="no tiled shared path"):
        run(dataclasses.replace(cfg, reranker="joint", cirr_query_block_mib=0.0), emit=lambda _: None)


def test_fits_table_solves_the_memory_model():
    from cirlib.tools.bench import fits_table
    gib = 2**30
    linear = fits_table(2e9, 0.5e9, budgets_gb=(24,), reserve_bytes=0)
    assert linear == {"24GB": 44}  # (24 - 2) / 0.5
    quad = fits_table(0, 0, 1e9, budgets_gb=(16, 80), reserve_bytes=0)
    assert quad == {"16GB": 4, "80GB": 8}  # B^2 <= budget
    assert fits_table(30 * gib, 1e6, budgets_gb=(24,)) == {"24GB": 0}


@pytest.mark.slow
def test_bench_memory_case_tiny():
    (r,) = run(BenchConfig(preset="tiny", cases=("memory-stage2",), memory_batch=4, text_len=8), emit=lambda _: None)
    assert r["case"] == "memory-stage2" and r["batch"] == 4 and r["half_batch"] == 2
    assert r["stage2_peak_mib"] > 0 and r["stage1_peak_mib"] > 0 and r["vit_no_grad_forward_per_image_mib"] >= 0
    for table in ("fits_stage1", "fits_stage2", "fits_stage2_checkpointed"):
        assert set(r[table]) == {"24GB", "40GB", "80GB"}
        assert r[table]["24GB"] <= r[table]["40GB"] <= r[table]["80GB"]


@pytest.mark.slow
def test_bench_store_cases_tiny_print_json_with_equal_losses():
    """store-stage1 / store-stage2 through the CLI: one JSON line each, the step with and without the feature store
    (issue 13), the same loss in fp32 (timings are not asserted: the tiny preset proves nothing about speed)."""
    proc = subprocess.run(
        [sys.executable, "-m", "cirlib.bench", "--preset", "tiny", "--cases", "store-stage1,store-stage2",
         "--train-batch", "4"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == ["store-stage1", "store-stage2"]
    for r in rows:
        assert {"speedup", "loss_abs_diff", "without_store_s", "with_store_s", "store_build_s", "optimizer_s",
                "store_bytes_per_image", "batch", "machine"} <= set(r)
        assert r["batch"] == 4 and r["without_store_s"] > 0 and r["with_store_s"] > 0
        assert r["speedup"] == pytest.approx(r["without_store_s"] / r["with_store_s"], rel=1e-2)
        assert r["loss_abs_diff"] <= 1e-5 and r["loss_with_store"] > 0
    assert rows[0]["images_per_step"] == 8 and rows[1]["images_per_step"] == 4 * 5
