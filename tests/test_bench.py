"""The stage-II benchmark at the tiny preset: fields, path equality, FLOP model and memory probe (no timing claims)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cirlib.bench import BenchConfig, analytic_flops, parse_args, peak_memory, run
from cirlib.models.config import preset
from cirlib.paths import REPO_ROOT

COMMON = {"case", "preset", "reranker", "device", "dtype", "threads", "text_len", "image_tokens", "pairs",
          "per_pair_s", "shared_s", "speedup", "per_pair_gflop", "shared_gflop", "flop_ratio", "per_pair_peak_mib",
          "shared_peak_mib", "memory_ratio", "memory_method", "max_abs_score_diff", "machine"}


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
