"""GPU check: the measurements that need a CUDA device, in one command that prints ONE JSON summary.

    make gpu-check                   # = python -m cirlib.gpu_check
    python -m cirlib.gpu_check --require-cuda   # exit 2 instead of 0 where there is no CUDA device

On a CUDA machine (about 2 to 4 minutes on an H100-class GPU, most of it the fp32 benchmark and model set-up):

1. the stage-II benchmark (`cirlib.bench`: "eval", "train", "eval-cirr-shaped", "memory-stage2") at blip-base, dual
   re-ranker, in fp32 and in bf16 autocast; the memory case measures the CUDA allocator's peak, so its "what fits"
   table is the GPU's own;
2. the largest score difference bf16 vs fp32 on the same inputs: stage-II scores of 16 queries x 16 candidates and
   stage-I query embeddings (cosine scores against 64 targets);
3. a few training steps of stage I (B = 64) and stage II (B = 16) at blip-base with bf16 autocast and AdamW, random
   weights, tiny synthetic data (random pixels through the frozen ViT under no_grad, as training does without the
   feature store): seconds per step and peak memory;
4. the feature-store build (`cirlib.retrieval.feature_store.open_store`) of a 256-image synthetic gallery (random
   PNGs in a temporary folder) with the stage-I encoder, then its reuse: seconds, images per second, bytes per image.

Without CUDA it prints one line saying so and what it would run, and exits 0 (nothing failed; the check did not
apply), or 2 with --require-cuda (for automation that must know the check ran).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from cirlib.tools import bench
from cirlib.models.config import preset as model_preset
from cirlib.models.stage1 import Stage1Model
from cirlib.models.stage2 import Stage2Model

NO_CUDA_EXIT = 0  # no CUDA device: the check does not apply (see --require-cuda)
REQUIRE_CUDA_EXIT = 2  # no CUDA device and --require-cuda
WOULD_RUN = ("bench eval/train/eval-cirr-shaped/memory-stage2 in fp32 and bf16, bf16-vs-fp32 score differences, "
             "3 mixed-precision training steps of stage I and stage II at blip-base, the feature-store build of a "
             "256-image synthetic gallery")


@dataclasses.dataclass(frozen=True)
class CheckConfig:
    device: str = "cuda"  # where to run (tests use "cpu" with the tiny preset)
    preset: str = "blip-base"  # model preset
    steps: int = 3  # training steps per stage (the first includes warm-up)
    stage1_batch: int = 64  # stage-I training batch
    stage2_batch: int = 16  # stage-II training batch (B x B pairs)
    store_images: int = 256  # synthetic gallery of the store build
    cirr_queries: int = 512  # eval-cirr-shaped: queries (per-pair path on cirr_sample of them)
    cirr_sample: int = 64
    bench_cases: tuple[str, ...] = ("eval", "train", "eval-cirr-shaped", "memory-stage2")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    """Peak CUDA allocation since the last reset, in GiB (None on CPU: see bench.peak_memory for the CPU method)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def _autocast(device: torch.device, enabled: bool = True):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------------- parts
def run_bench(cfg: CheckConfig) -> dict[str, list[dict]]:
    """The benchmark cases in fp32 and bf16: {"fp32": [json rows], "bf16": [...]}."""
    out = {}
    for dtype in ("fp32", "bf16"):
        rows: list[dict] = []
        bench.run(bench.BenchConfig(preset=cfg.preset, reranker="dual", cases=cfg.bench_cases, device=cfg.device,
                                    dtype=dtype, cirr_queries=cfg.cirr_queries, cirr_sample=cfg.cirr_sample,
                                    cirr_token_pool=0, memory_batch=cfg.stage2_batch, train_batch=8),
                  emit=rows.append)
        out[dtype] = rows
    return out


def score_differences(cfg: CheckConfig) -> dict[str, float]:
    """Largest |bf16 - fp32| of stage-II scores (16 x 16) and of stage-I cosine scores (16 queries x 64 targets)."""
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(0)
    mc = model_preset(cfg.preset, reranker="dual")
    n_tok, width = mc.vision.num_tokens, mc.vision.width
    torch.manual_seed(0)
    s2 = Stage2Model(mc).to(device).eval()
    s1 = Stage1Model(mc).to(device).eval()
    ids, mask, _ = bench._texts(16, 20, gen)
    ids, mask = ids.to(device), mask.to(device)
    ref = torch.randn(16, n_tok, width, generator=gen).to(device)
    gallery = torch.randn(16, n_tok, width, generator=gen).to(device)
    targets = F.normalize(torch.randn(64, mc.projection_dim, generator=gen), dim=-1).to(device)
    res = {}
    with torch.inference_mode():
        per_dtype = []
        for bf16 in (False, True):
            with _autocast(device, bf16):
                q = s1.encode_query(ref, ids, mask)
                query = s2.make_query(ids, mask, ref_tokens=ref, z_t=q.hidden.float())
                per_dtype.append((s2.score(query, gallery).float(), (q.embeds.float() @ targets.t())))
        (s2_32, s1_32), (s2_16, s1_16) = per_dtype
    res["stage2_max_abs_score_diff_bf16_vs_fp32"] = float((s2_32 - s2_16).abs().max())
    res["stage2_score_std_fp32"] = float(s2_32.std())
    res["stage1_max_abs_cosine_diff_bf16_vs_fp32"] = float((s1_32 - s1_16).abs().max())
    return res


def _train(model: torch.nn.Module, step: Callable[[], torch.Tensor], steps: int, device: torch.device) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.05)
    times, losses = [], []
    _peak_reset(device)
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        loss = step()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    finite = all(np.isfinite(losses))
    return {"step_s": [round(t, 4) for t in times], "steady_step_s": round(min(times), 4), "losses": losses,
            "finite": finite, "peak_gib": _peak_gib(device)}


def _stage1_steps(cfg: CheckConfig, device: torch.device, gen: torch.Generator) -> dict:
    mc = model_preset(cfg.preset, reranker="dual")
    size, b = mc.vision.image_size, cfg.stage1_batch
    torch.manual_seed(0)
    model = Stage1Model(mc).to(device).train()
    model.visual_encoder.requires_grad_(False).eval()
    model.vision_proj.requires_grad_(False)  # the original never updates vision_proj (targets under no_grad)
    ids, mask, _ = bench._texts(b, 20, gen)
    ids, mask = ids.to(device), mask.to(device)
    images = torch.randn(2 * b, 3, size, size, generator=gen).to(device)

    def step() -> torch.Tensor:
        with _autocast(device):
            with torch.no_grad():
                feats = model.encode_image(images)
            return model(feats.tokens[:b], ids, mask, feats.embeds[b:]).loss.float()

    return {"batch": b, **_train(model, step, cfg.steps, device)}


def _stage2_steps(cfg: CheckConfig, device: torch.device, gen: torch.Generator) -> dict:
    mc = model_preset(cfg.preset, reranker="dual")
    size, b = mc.vision.image_size, cfg.stage2_batch
    torch.manual_seed(0)
    model = Stage2Model(mc).to(device).train()
    model.visual_encoder.requires_grad_(False).eval()
    ids, mask, _ = bench._texts(b, 20, gen)
    ids, mask = ids.to(device), mask.to(device)
    images = torch.randn(b, 3, size, size, generator=gen).to(device)
    z_t = torch.randn(b, 20, mc.text.hidden_size, generator=gen).to(device)

    def step() -> torch.Tensor:
        with _autocast(device):
            with torch.no_grad():
                tokens = model.encode_image(images)
            return model(model.make_query(ids, mask, ref_tokens=None, z_t=z_t), tokens).loss.float()

    return {"batch": b, **_train(model, step, cfg.steps, device)}


def training_steps(cfg: CheckConfig) -> dict[str, dict]:
    """A few bf16-autocast AdamW steps of each stage on random pixels (the frozen ViT under no_grad, as training
    without the feature store runs it); each stage's model is freed before the next one's peak is measured."""
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(1)
    out = {"stage1": _stage1_steps(cfg, device, gen)}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out["stage2"] = _stage2_steps(cfg, device, gen)
    return out


def store_build(cfg: CheckConfig) -> dict[str, Any]:
    """Build, then reuse, the stage-I feature store of a synthetic gallery; {"skipped": why} without the module."""
    try:
        from cirlib.retrieval import feature_store as fs
    except ImportError as e:  # the store is issue 13's part 1; the check runs without it
        return {"skipped": f"cirlib.retrieval.feature_store not importable: {e}"}
    from PIL import Image

    device = torch.device(cfg.device)
    mc = model_preset(cfg.preset)
    torch.manual_seed(0)
    model = Stage1Model(mc).to(device).eval()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="cirlib-gpu-check-") as tmp:
        files = {}
        for i in range(cfg.store_images):
            path = Path(tmp) / f"img{i:05d}.png"
            Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)).save(path)
            files[path.stem] = path
        encoder = fs.stage1_image_encoder(model)
        prep = fs.preprocessing(1.25, mc.vision.image_size)
        names = list(files)
        _peak_reset(device)
        start = time.perf_counter()
        store = fs.open_store(encoder, prep, names, files, outputs_root=Path(tmp) / "outputs", device=device,
                              batch_size=64, num_workers=4 if device.type == "cuda" else 0)
        _sync(device)
        build_s = time.perf_counter() - start
        peak = _peak_gib(device)
        start = time.perf_counter()
        again = fs.open_store(encoder, prep, names, files, outputs_root=Path(tmp) / "outputs", device=device)
        reuse_s = time.perf_counter() - start
        tokens = again.tokens(names[:8])
        size = sum(f.stat().st_size for f in Path(store.folder).rglob("*.npy")) if hasattr(store, "folder") else None
        return {"images": len(names), "build_s": round(build_s, 3),
                "images_per_s": round(len(names) / build_s, 1), "build_peak_gib": peak,
                "status": [store.status, again.status], "reuse_s": round(reuse_s, 3),
                "tokens_shape": list(tokens.shape),
                "bytes_per_image": None if size is None else int(size / len(names))}


# ---------------------------------------------------------------------------------------------------------- CLI
def run_checks(cfg: CheckConfig) -> dict[str, Any]:
    """Every part, timed; a part that raises is recorded as {"error": ...} and the others still run."""
    device = torch.device(cfg.device)
    summary: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "preset": cfg.preset}
    if device.type == "cuda":
        summary["cuda"] = torch.version.cuda
        summary["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    total = time.perf_counter()
    for name, part in (("score_diff", score_differences), ("training", training_steps), ("store", store_build),
                       ("bench", run_bench)):
        start = time.perf_counter()
        try:
            summary[name] = part(cfg)
        except Exception as e:  # noqa: BLE001 - recorded in the summary, which is the check's output
            summary[name] = {"error": f"{type(e).__name__}: {e}"}
        summary[f"{name}_s"] = round(time.perf_counter() - start, 2)
    summary["total_s"] = round(time.perf_counter() - total, 2)
    summary["ok"] = not any(isinstance(v, dict) and "error" in v for v in summary.values())
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cirlib.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--require-cuda", action="store_true",
                   help=f"exit {REQUIRE_CUDA_EXIT} (not {NO_CUDA_EXIT}) when there is no CUDA device")
    p.add_argument("--steps", type=int, default=CheckConfig.steps)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device (torch {torch.__version__} sees none); on a CUDA machine it runs: "
              f"{WOULD_RUN}", flush=True)
        return REQUIRE_CUDA_EXIT if a.require_cuda else NO_CUDA_EXIT
    summary = run_checks(CheckConfig(steps=a.steps))
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
