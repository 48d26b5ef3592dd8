"""The GPU check: its one-line answer on a machine without CUDA (exit code documented in cirlib.gpu_check), and every
part of it on the CPU at the tiny preset, so the script is known to run before a GPU is lent."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cirlib.tools import gpu_check
from cirlib.paths import REPO_ROOT


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}  # no CUDA even where there is one
    return subprocess.run([sys.executable, "-m", "cirlib.gpu_check", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.mark.slow
def test_no_cuda_prints_one_line_and_exits_cleanly():
    proc = _run()
    assert proc.returncode == gpu_check.NO_CUDA_EXIT == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    assert lines[0].startswith("gpu-check: no CUDA device") and "feature-store build" in lines[0]
    required = _run("--require-cuda")
    assert required.returncode == gpu_check.REQUIRE_CUDA_EXIT == 2
    assert required.stdout.splitlines() == lines


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU stand-in of the GPU run; on a GPU run make gpu-check")
def test_every_part_runs_on_cpu_tiny(tmp_path):
    cfg = gpu_check.CheckConfig(device="cpu", preset="tiny", steps=2, stage1_batch=4, stage2_batch=4, store_images=6,
                                cirr_queries=4, cirr_sample=2, bench_cases=("eval",))
    summary = gpu_check.run_checks(cfg)
    assert summary["ok"], {k: v for k, v in summary.items() if isinstance(v, dict) and "error" in v}
    assert summary["score_diff"]["stage2_max_abs_score_diff_bf16_vs_fp32"] > 0  # bf16 really ran
    for stage in ("stage1", "stage2"):
        assert len(summary["training"][stage]["step_s"]) == 2 and summary["training"][stage]["finite"]
    assert summary["store"]["status"] == ["built", "reused"] and summary["store"]["images"] == 6
    assert [r["dtype"] for r in summary["bench"]["fp32"] + summary["bench"]["bf16"]] == ["fp32", "bf16"]
