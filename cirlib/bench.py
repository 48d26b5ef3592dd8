"""Stage-II benchmark: the original's per-pair re-ranking against shared candidate keys/values, in one process.

    python -m cirlib.bench                      # blip-base, dual re-ranker, evaluation and training cases, CPU fp32
    python -m cirlib.bench --preset tiny        # a quick run
    python -m cirlib.bench --device cuda --dtype bf16 --reranker both

Each case prints one JSON line: wall time of each path, speedup, analytic FLOP ratio, max |score difference|, and
peak activation memory of each path. Both paths use the same model, weights and inputs; candidate and reference image
tokens come from the stage-II ViT once per image (not per pair), before either path runs.

- "eval": B queries each re-rank the same G-image gallery as their top-G. Per-pair path: one query at a time, its G
  pairs in one batch, each pair projecting its own candidate keys/values (`Stage2Model.score(..., scoring="pairs")`,
  the original's validate_stage2). Shared path: `Stage2Model.score(..., max_pairs=...)`. inference_mode.
- "train": one training step (forward + backward; the optimizer update is the same for both and left out) of the
  original's in-batch objective at batch B. Per-pair path: for each query its B pairs in one pass (`scoring="pairs"`,
  max_pairs=B: the original's loop). Shared path: `Stage2Model.forward`. Dropout is 0 in this benchmark
  so that losses and gradients can be compared exactly.

Peak activation memory: on CPU the process resident-set high-water mark (reset through /proc/self/clear_refs)
minus the resident set just before the path runs, after freed heap memory was returned to the system
(glibc malloc_trim); parameter gradients are allocated before the baseline, so only activations count. On CUDA the
allocator's peak minus its allocation before the path.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import platform
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from cirlib.models.config import ModelConfig, preset
from cirlib.models.stage2 import RerankQuery, Stage2Model

ENC_TOKEN_ID = 30523  # [ENC], replaces [CLS] at position 0 (the original's tokenisation)
SEP_TOKEN_ID = 102


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "blip-base"  # model preset: "blip-base" | "tiny"
    reranker: str = "dual"  # "dual" (the original) | "joint" | "both"
    cases: tuple[str, ...] = ("eval", "train")  # which cases to run
    queries: int = 16  # eval: queries
    gallery: int = 16  # eval: gallery images = each query's top-K
    text_len: int = 20  # longest text in tokens ([ENC] ... [SEP]); others are up to 4 shorter
    train_batch: int = 8  # train: batch size B (B x B pairs)
    device: str = "cpu"  # "cpu" | "cuda"
    dtype: str = "fp32"  # "fp32" | "bf16" | "fp16" (autocast; fp16 needs CUDA)
    max_pairs: int = 4096  # shared path: pairs per forward pass
    seed: int = 0  # weights and inputs
    threads: int = 0  # torch CPU threads; 0 = torch's default


# --------------------------------------------------------------------------------------------------- FLOPs
def analytic_flops(cfg: ModelConfig, *, queries: int, pairs: int, candidates: int, text_len: int,
                   train: bool = False) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of the per-pair and shared paths for one batch of pairs.

    Args:
        cfg: model configuration (text geometry, vision width/tokens, reranker, merge threshold).
        queries: distinct queries; pairs: (query, candidate) pairs; candidates: distinct candidates.
        text_len: L, tokens per text.
        train: forward + backward (3x forward; 2x for projections of frozen image tokens, which need no input
            gradient).
    Returns:
        {"per_pair": flops, "shared": flops}.
    """
    t = cfg.text
    h, inter, n_layers, length = t.hidden_size, t.intermediate_size, t.num_layers, text_len
    dv, n_tok = cfg.vision.width, cfg.vision.num_tokens
    dual = cfg.reranker == "dual"
    streams = 2 if dual else 1
    self_attn = 4 * length * h * h + 2 * length * length * h  # Q, K, V, dense; scores and weighted sum
    cross_text = 2 * length * h * h  # query and output dense
    ffn = 2 * length * h * inter
    kv_cand = 2 * n_tok * dv * h  # keys and values of one image
    kv_ref = 0 if dual else kv_cand
    image_tokens = n_tok if dual else 2 * n_tok
    attend = 2 * length * image_tokens * h
    head = streams * h * h + 2 * h
    pair_text = head  # per pair, excluding image projections and layer-0 self-attention
    for layer in range(n_layers):
        merge = length * 2 * h * h if dual and layer >= cfg.merge_threshold else 0
        pair_text += streams * (cross_text + attend + ffn) + merge + (streams * self_attn if layer > 0 else 0)
    layer0_self = streams * self_attn
    image_kv_per_pair = n_layers * (streams * kv_cand + kv_ref)
    per_pair_text = pairs * (pair_text + layer0_self)
    shared_text = pairs * pair_text + queries * layer0_self
    shared_kv = n_layers * (candidates * streams * kv_cand + queries * kv_ref)
    per_pair_kv = pairs * image_kv_per_pair
    text_mult, kv_mult = (3, 2) if train else (1, 1)
    return {
        "per_pair": 2.0 * (text_mult * per_pair_text + kv_mult * per_pair_kv),
        "shared": 2.0 * (text_mult * shared_text + kv_mult * shared_kv),
    }


# -------------------------------------------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS so the next baseline is not inflated by the previous run (glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: the baseline then includes cached heap, which only makes the figures smaller
        return
    libc.malloc_trim(0)


@dataclass
class PeakMemory:
    """Result of `peak_memory`: bytes above the baseline at the peak."""

    peak_bytes: int = 0
    method: str = ""


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[PeakMemory]:
    """Measure the peak memory a block adds: CUDA allocator peak, or CPU resident-set high-water mark.

    On CPU the kernel's VmHWM is reset by writing 5 to /proc/self/clear_refs; where that is refused, RSS is sampled
    every millisecond by a thread instead.
    """
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.peak_bytes, result.method = torch.cuda.max_memory_allocated(device) - base, "cuda_max_allocated"
        return
    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm = True
    except OSError:
        hwm = False
    base = _proc_status_kb("VmRSS")
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _proc_status_kb("VmRSS"))
            stop.wait(0.001)

    sampler = None if hwm else threading.Thread(target=sample, daemon=True)
    if sampler is not None:
        sampler.start()
    try:
        yield result
    finally:
        if sampler is not None:
            stop.set()
            sampler.join()
    top = _proc_status_kb("VmHWM") if hwm else max(peak[0], _proc_status_kb("VmRSS"))
    result.peak_bytes = max(0, top - base) * 1024
    result.method = "cpu_vmhwm" if hwm else "cpu_rss_sampled"


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


# -------------------------------------------------------------------------------------------------- inputs
def _autocast(cfg: BenchConfig, device: torch.device):
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _texts(n: int, text_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Random token ids (n, L) with [ENC] first and [SEP] last, lengths L-4..L, padded with 0."""
    lengths = [text_len - int(x) for x in torch.randint(0, min(5, text_len - 2), (n,), generator=gen)]
    lengths[0] = text_len
    ids = torch.zeros(n, text_len, dtype=torch.long)
    mask = torch.zeros(n, text_len, dtype=torch.long)
    for i, n_tok in enumerate(lengths):
        ids[i, :n_tok] = torch.randint(1999, 29000, (n_tok,), generator=gen)
        ids[i, 0], ids[i, n_tok - 1] = ENC_TOKEN_ID, SEP_TOKEN_ID
        mask[i, :n_tok] = 1
    return ids, mask, lengths


def _query(model: Stage2Model, n: int, text_len: int, ref_tokens: torch.Tensor | None, gen: torch.Generator,
           device: torch.device) -> tuple[RerankQuery, list[int]]:
    ids, mask, lengths = _texts(n, text_len, gen)
    z_t = None
    if model.config.reranker == "dual":
        # Stage I's last hidden state is a LayerNorm output; unit-variance noise has the same scale.
        z_t = torch.randn(n, text_len, model.config.text.hidden_size, generator=gen).to(device)
    return RerankQuery(ids.to(device), mask.to(device), z_t=z_t,
                       ref_tokens=ref_tokens if model.config.reranker == "joint" else None), lengths


def _encode(model: Stage2Model, n: int, gen: torch.Generator, device: torch.device, cfg: BenchConfig) -> torch.Tensor:
    """Stage-II ViT tokens of n random images, once per image: (n, T, Dv) fp32."""
    size = model.config.vision.image_size
    images = torch.randn(n, 3, size, size, generator=gen).to(device)
    # no_grad, not inference_mode: the training case feeds these tokens to autograd-tracked computations.
    with torch.no_grad(), _autocast(cfg, device):
        return torch.cat([model.encode_image(images[i:i + 16]) for i in range(0, n, 16)]).float()


def _unpadded(query: RerankQuery, i: int, length: int) -> RerankQuery:
    """Query row i without padding (the original validates one query at a time)."""
    return RerankQuery(
        input_ids=query.input_ids[i:i + 1, :length],
        attention_mask=query.attention_mask[i:i + 1, :length],
        z_t=None if query.z_t is None else query.z_t[i:i + 1, :length],
        ref_tokens=None if query.ref_tokens is None else query.ref_tokens[i:i + 1],
    )


def _build(cfg: BenchConfig, reranker: str, device: torch.device) -> Stage2Model:
    base = preset(cfg.preset)
    model_cfg = dataclasses.replace(
        base, reranker=reranker, text=dataclasses.replace(base.text, hidden_dropout=0.0, attention_dropout=0.0))
    torch.manual_seed(cfg.seed)
    model = Stage2Model(model_cfg).to(device)
    model.visual_encoder.requires_grad_(False)
    return model


def _common(cfg: BenchConfig, model: Stage2Model, device: torch.device) -> dict:
    return {"preset": cfg.preset, "reranker": model.config.reranker, "device": str(device), "dtype": cfg.dtype,
            "threads": torch.get_num_threads(), "text_len": cfg.text_len,
            "image_tokens": model.config.vision.num_tokens}


# ---------------------------------------------------------------------------------------------------- cases
def bench_eval(cfg: BenchConfig, model: Stage2Model, device: torch.device) -> dict:
    """Evaluation case: B queries x the same G candidates (each query's top-G in its own order)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    model.eval()
    b, g = cfg.queries, cfg.gallery
    (gallery, vit_s) = _timed(lambda: _encode(model, g, gen, device, cfg), device)
    ref = _encode(model, b, gen, device, cfg) if model.config.reranker == "joint" else None
    query, lengths = _query(model, b, cfg.text_len, ref, gen, device)
    topk = torch.stack([torch.randperm(g, generator=gen) for _ in range(b)]).to(device)  # (B, G)

    def per_pair() -> torch.Tensor:
        return torch.cat([model.score(_unpadded(query, i, lengths[i]), gallery, topk[i:i + 1], scoring="pairs").float()
                          for i in range(b)])

    def shared() -> torch.Tensor:
        return model.score(query, gallery, topk, max_pairs=cfg.max_pairs)

    with torch.inference_mode(), _autocast(cfg, device):
        small = query.select([0])  # warm-up of both code paths (thread pools, kernels) on one tiny problem
        model.score(_unpadded(small, 0, lengths[0]), gallery, topk[:1, :2], scoring="pairs")
        model.score(small, gallery, topk[:1, :2], max_pairs=cfg.max_pairs)
        with peak_memory(device) as mem_shared:  # shared first: any heap the first run leaves cached can only
            shared_scores, shared_s = _timed(shared, device)  # lower the per-pair figure
        with peak_memory(device) as mem_pp:
            pp_scores, pp_s = _timed(per_pair, device)
    flops = analytic_flops(model.config, queries=b, pairs=b * g, candidates=g, text_len=cfg.text_len)
    return {"case": "eval", **_common(cfg, model, device), "queries": b, "candidates_per_query": g,
            "unique_candidates": g, "pairs": b * g, "vit_encode_s": round(vit_s, 4),
            **_result(pp_s, shared_s, flops, mem_pp, mem_shared),
            "max_abs_score_diff": float((shared_scores.float() - pp_scores.float()).abs().max()),
            "score_std": float(pp_scores.float().std())}


def bench_train(cfg: BenchConfig, model: Stage2Model, device: torch.device) -> dict:
    """Training case: one forward + backward of the in-batch objective at batch B (B x B pairs)."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    b = cfg.train_batch
    targets = _encode(model, b, gen, device, cfg)
    ref = _encode(model, b, gen, device, cfg) if model.config.reranker == "joint" else None
    query, _ = _query(model, b, cfg.text_len, ref, gen, device)
    model.train()
    model.visual_encoder.eval()  # frozen; its tokens are computed above
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # gradients exist before the baseline, so the figures are activations only
        p.grad = torch.zeros_like(p)
    labels = torch.arange(b, device=device)

    def per_pair() -> tuple[torch.Tensor, torch.Tensor]:
        with _autocast(cfg, device):
            logits = model.score(query, targets, scoring="pairs", max_pairs=b)  # one query's B pairs per pass
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        return logits.detach(), loss.detach()

    def shared() -> tuple[torch.Tensor, torch.Tensor]:
        with _autocast(cfg, device):
            out = model(query, targets)
        out.loss.backward()
        return out.scores.detach(), out.loss.detach()

    small = query.select([0, 1])  # warm-up of both paths, forward and backward, on 2 x 2 pairs
    with _autocast(cfg, device):
        pairs = torch.arange(2, device=device)[:, None]  # query i against target i
        (model.score(small, targets[:2], pairs, scoring="pairs").sum() + model(small, targets[:2]).loss).backward()
    results = {}
    for name, fn in (("shared", shared), ("per_pair", per_pair)):
        for p in params:
            p.grad.zero_()
        with peak_memory(device) as mem:
            (logits, loss), seconds = _timed(fn, device)
        results[name] = (logits.float(), loss.float(), seconds, mem,
                         [p.grad.detach().float().clone() for p in params] if name == "shared" else None)
    grads_shared = results["shared"][4]
    grad_diff = max(float((p.grad.float() - gs).abs().max()) for p, gs in zip(params, grads_shared))
    grad_max = max(float(p.grad.float().abs().max()) for p in params)
    for p in params:
        p.grad = None
    flops = analytic_flops(model.config, queries=b, pairs=b * b, candidates=b, text_len=cfg.text_len, train=True)
    pp_logits, pp_loss, pp_s, mem_pp, _ = results["per_pair"]
    sh_logits, sh_loss, sh_s, mem_sh, _ = results["shared"]
    return {"case": "train", **_common(cfg, model, device), "batch": b, "pairs": b * b,
            **_result(pp_s, sh_s, flops, mem_pp, mem_sh),
            "max_abs_score_diff": float((sh_logits - pp_logits).abs().max()),
            "loss_per_pair": float(pp_loss), "loss_abs_diff": float((sh_loss - pp_loss).abs()),
            "max_abs_grad_diff": grad_diff, "max_abs_grad": grad_max}


def _result(pp_s: float, shared_s: float, flops: dict, mem_pp: PeakMemory, mem_shared: PeakMemory) -> dict:
    return {
        "per_pair_s": round(pp_s, 4), "shared_s": round(shared_s, 4), "speedup": round(pp_s / shared_s, 3),
        "per_pair_gflop": round(flops["per_pair"] / 1e9, 3), "shared_gflop": round(flops["shared"] / 1e9, 3),
        "flop_ratio": round(flops["per_pair"] / flops["shared"], 3),
        "per_pair_peak_mib": round(mem_pp.peak_bytes / 2**20, 1),
        "shared_peak_mib": round(mem_shared.peak_bytes / 2**20, 1),
        "memory_ratio": round(mem_shared.peak_bytes / mem_pp.peak_bytes, 3) if mem_pp.peak_bytes else None,
        "memory_method": mem_pp.method,
    }


# ------------------------------------------------------------------------------------------------------ CLI
def run(cfg: BenchConfig, emit: Callable[[dict], None] = lambda r: print(json.dumps(r), flush=True)) -> list[dict]:
    """Run every requested case and reranker; each result is passed to `emit` (default: one JSON line on stdout)."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA device")
    if cfg.dtype == "fp16" and device.type != "cuda":
        raise ValueError("--dtype fp16 needs --device cuda (CPU autocast supports bf16)")
    unknown = set(cfg.cases) - {"eval", "train"}
    if unknown:
        raise ValueError(f"unknown cases {sorted(unknown)}; choose from eval, train")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rerankers = ("dual", "joint") if cfg.reranker == "both" else (cfg.reranker,)
    results = []
    for reranker in rerankers:
        model = _build(cfg, reranker, device)
        for case in cfg.cases:
            result = (bench_eval if case == "eval" else bench_train)(cfg, model, device)
            result["machine"] = _machine(device)
            emit(result)
            results.append(result)
        del model
        gc.collect()
    return results


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model_name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
    return f"{model_name}, {os.cpu_count()} cores"


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    """Command-line options -> BenchConfig."""
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m cirlib.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=d.preset, choices=["blip-base", "tiny"])
    p.add_argument("--reranker", default=d.reranker, choices=["dual", "joint", "both"])
    p.add_argument("--cases", default=",".join(d.cases), help="comma-separated: eval,train")
    p.add_argument("--queries", type=int, default=d.queries)
    p.add_argument("--gallery", type=int, default=d.gallery)
    p.add_argument("--text-len", type=int, default=d.text_len)
    p.add_argument("--train-batch", type=int, default=d.train_batch)
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--max-pairs", type=int, default=d.max_pairs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    a = p.parse_args(argv)
    if a.text_len < 3:
        p.error("--text-len must be at least 3 ([ENC], a word, [SEP])")
    return BenchConfig(preset=a.preset, reranker=a.reranker, cases=tuple(c for c in a.cases.split(",") if c),
                       queries=a.queries, gallery=a.gallery, text_len=a.text_len, train_batch=a.train_batch,
                       device=a.device, dtype=a.dtype, max_pairs=a.max_pairs, seed=a.seed, threads=a.threads)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
