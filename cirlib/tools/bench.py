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

- "eval-cirr-shaped" (`bench_eval_cirr`, opt-in: `--cases eval-cirr-shaped`): CIRR validation's shape. A 2,297-image
  gallery; N queries each with its own top-50 drawn without replacement from a Zipf popularity (`zipf_topk_lists`;
  exponent 1.2 = `calibrate_zipf()`: the most skewed popularity for which, at N = 4,181, the mean number of lists an
  image appears in is still CIRR val's 91, i.e. every image appears). Shared path: scored as `rerank` scores them
  (`query_blocks`: batches of 16 queries gathered into blocks, each block's pairs grouped by candidate,
  `score_indexed`, 512 pairs per pass). With `--cirr-pass-sample S` only S random passes of that plan run and the
  total is extrapolated by their measured seconds per analytic FLOP (for N where running every pass would take
  hours on a CPU). Per-pair path on the first `--cirr-sample` queries, extrapolated to N. Also "per-batch": the
  grouping before query blocks (pairs grouped within each batch of 16 only), timed the same way.
- "memory-stage2" (`bench_memory`, opt-in): activation memory of a stage-II training step at B (and B/2) with and
  without gradient checkpointing of the text encoder, stage I's per-sample memory, the frozen ViT's no_grad forward
  per image, and from them the largest per-GPU batch at 24/40/80 GB (`fits_table`).

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
from cirlib.models.stage2 import RERANKERS, RerankQuery, Stage2Model, shared_passes
from cirlib.retrieval.rerank import query_blocks, score_indexed

ENC_TOKEN_ID = 30523  # [ENC], replaces [CLS] at position 0 (the original's tokenisation)
SEP_TOKEN_ID = 102
# CIRR validation (the released split): queries, gallery images, candidates re-ranked per query (the original's k).
CIRR_VAL_QUERIES, CIRR_VAL_GALLERY, CIRR_K = 4181, 2297, 50
CIRR_VAL_REUSE = CIRR_VAL_QUERIES * CIRR_K / CIRR_VAL_GALLERY  # 91.0: lists per image if every image appears
from cirlib.tools.bench_store import STORE_CASES, bench_store  # noqa: E402  (feature-store cases, issue 13)
CASES = ("eval", "train", "eval-cirr-shaped", "memory-stage2", *STORE_CASES)
BOTH = ("dual", "joint")  # what --reranker both runs: the two built-in re-rankers


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "blip-base"  # model preset: "blip-base" | "tiny"
    reranker: str = "dual"  # a registered re-ranker: dual (the original) | joint | ...; or "both" (dual and joint)
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
    # eval-cirr-shaped (CIRR validation's shape; see bench_eval_cirr)
    cirr_queries: int = 64  # N simulated queries (CIRR val: 4,181)
    cirr_gallery: int = CIRR_VAL_GALLERY  # gallery images
    cirr_k: int = CIRR_K  # candidates per query (each query's own top-k)
    cirr_zipf: float = 1.2  # Zipf exponent of image popularity; calibrate_zipf() -> 1.2 (mean reuse 91 at N = 4,181)
    cirr_batch: int = 16  # queries per batch, as `rerank` batches them (its batch_size default)
    cirr_max_pairs: int = 512  # pairs per forward pass (EvaluateConfig.max_pairs default)
    cirr_text_len: int = 13  # longest text in tokens (CIRR captions with [ENC] and [SEP]); others up to 4 shorter
    cirr_sample: int = 16  # per-pair path: the first this many queries, extrapolated to N
    cirr_token_pool: int = 64  # distinct random token sets the gallery cycles through (memory); 0 = one per image
    cirr_query_block_mib: float = 256.0  # the pipeline's query blocks (`rerank`'s query_block_mib default)
    cirr_pass_sample: int = 0  # shared path: time this many random passes of its plan, extrapolate by FLOPs; 0 = all
    cirr_per_batch: bool = True  # also the grouping before blocks: pairs grouped by candidate within each batch only
    cirr_repeats: int = 1  # rounds of the shared path's timing (each figure is the median round)
    cirr_untiled: bool = False  # also time the untiled shared path (shared_tile_rows = 0), interleaved round by round
    shared_tile_rows: int = -1  # the dual re-ranker's tile rows for the shared path; -1 = its default
    memory_batch: int = 16  # memory-stage2: training batch B (also measured at B/2 to fit the memory model)


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
    kind = RERANKERS.get(cfg.reranker)  # its declarations: text streams, whether it attends to the reference
    streams, reads_ref = kind.text_streams, kind.needs_ref_tokens
    self_attn = 4 * length * h * h + 2 * length * length * h  # Q, K, V, dense; scores and weighted sum
    cross_text = 2 * length * h * h  # query and output dense
    ffn = 2 * length * h * inter
    kv_cand = 2 * n_tok * dv * h  # keys and values of one image
    kv_ref = kv_cand if reads_ref else 0
    image_tokens = 2 * n_tok if reads_ref else n_tok
    attend = 2 * length * image_tokens * h
    head = streams * h * h + 2 * h
    pair_text = head  # per pair, excluding image projections and layer-0 self-attention
    for layer in range(n_layers):
        merge = length * 2 * h * h if streams > 1 and layer >= cfg.merge_threshold else 0  # merging the streams
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
    if model.needs_z_t:
        # Stage I's last hidden state is a LayerNorm output; unit-variance noise has the same scale.
        z_t = torch.randn(n, text_len, model.config.text.hidden_size, generator=gen).to(device)
    return RerankQuery(ids.to(device), mask.to(device), z_t=z_t,
                       ref_tokens=ref_tokens if model.needs_ref_tokens else None), lengths


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
    if cfg.shared_tile_rows >= 0 and hasattr(type(model), "shared_tile_rows"):  # re-rankers without it: ignored
        model.shared_tile_rows = cfg.shared_tile_rows
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
    ref = _encode(model, b, gen, device, cfg) if model.needs_ref_tokens else None
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
    ref = _encode(model, b, gen, device, cfg) if model.needs_ref_tokens else None
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


# ------------------------------------------------------------------------------------- CIRR-shaped evaluation
def zipf_topk_lists(gallery: int, k: int, queries: int, exponent: float, gen: torch.Generator) -> torch.Tensor:
    """Simulated stage-I top-k lists: (queries, k) distinct gallery rows per query, drawn without replacement with
    probability proportional to a Zipf popularity rank**-exponent (image i has rank i + 1).

    Successive sampling without replacement is the Gumbel top-k trick: the k largest log p_i + Gumbel noise.
    """
    if not 0 < k <= gallery:
        raise ValueError(f"each list needs 0 < k <= gallery, got k={k}, gallery={gallery}")
    log_p = -exponent * torch.log(torch.arange(1, gallery + 1, dtype=torch.float32))
    lists = torch.empty(queries, k, dtype=torch.long)
    for s in range(0, queries, 1024):  # rows in blocks: a (4181, 2297) noise matrix at once is 38 MB, fine, but bounded
        n = min(1024, queries - s)
        u = torch.rand(n, gallery, generator=gen).clamp_min(1e-20)
        lists[s:s + n] = torch.topk(log_p - torch.log(-torch.log(u)), k, dim=1).indices
    return lists


def mean_reuse(lists: torch.Tensor) -> float:
    """Mean number of lists an image appears in, over the images that appear in any list."""
    return lists.numel() / max(1, torch.unique(lists).numel())


def calibrate_zipf(gallery: int = CIRR_VAL_GALLERY, k: int = CIRR_K, queries: int = CIRR_VAL_QUERIES,
                   target: float = CIRR_VAL_REUSE, tol: float = 0.001, seed: int = 0, steps: int = 12) -> float:
    """The largest Zipf exponent whose simulated lists have a mean reuse within `tol` of `target` (bisection).

    Mean reuse over the images that appear is at least queries * k / gallery (every image appears) and grows as a
    stronger skew leaves tail images out of every list. Real CIRR val's 4,181 x 50 / 2,297 = 91 says (nearly) every
    image appears, which bounds the skew from above; the most skewed popularity consistent with it is the one most
    favourable to sharing candidates between queries, so speedups measured with it are upper bounds of this model.
    """
    goal = max(target, queries * k / gallery) * (1 + tol)
    lo, hi = 0.0, 3.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        reuse = mean_reuse(zipf_topk_lists(gallery, k, queries, mid, torch.Generator().manual_seed(seed)))
        lo, hi = (mid, hi) if reuse <= goal else (lo, mid)
    return round(lo, 3)


class PooledTokens:
    """A (G, T, Dv) gallery of image tokens whose row g is pool[g % len(pool)]: the gallery's G distinct indices (what
    the pair grouping sees) at the memory of the pool (2,297 blip-base images in fp32 would hold 4 GiB). Supports what
    `Stage2Model.score` reads with max_pairs set: `shape`, `device`, and indexing by a row tensor."""

    def __init__(self, pool: torch.Tensor, rows: int):
        self.pool, self.shape, self.device, self.dtype = pool, (rows, *pool.shape[1:]), pool.device, pool.dtype

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.pool[index.to(self.device) % self.pool.shape[0]]


def bench_eval_cirr(cfg: BenchConfig, model: Stage2Model, device: torch.device) -> dict:
    """CIRR-validation-shaped evaluation: N queries, each with its own top-k of a G-image gallery drawn with a Zipf
    popularity (`zipf_topk_lists`), scored as `cirlib.retrieval.rerank.rerank` scores them (`query_blocks` of
    `cirr_batch`-query batches, each block through `score_indexed`). The per-pair path runs on the first `cirr_sample`
    queries and is extrapolated to N; the shared path runs every pass, or `cirr_pass_sample` random ones whose seconds
    per analytic FLOP extrapolate to all of its passes. "per_batch_*": the same with a block per batch (the pipeline
    before query blocks), for comparison."""
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    model.eval()
    n, k, g, batch, length = cfg.cirr_queries, cfg.cirr_k, cfg.cirr_gallery, cfg.cirr_batch, cfg.cirr_text_len
    lists = zipf_topk_lists(g, k, n, cfg.cirr_zipf, gen)
    reuse_val = mean_reuse(zipf_topk_lists(g, k, CIRR_VAL_QUERIES, cfg.cirr_zipf, torch.Generator().manual_seed(0)))
    width, n_tok = model.config.vision.width, model.config.vision.num_tokens
    # Random unit-variance tokens (the ViT's last LayerNorm output has that scale); the ViT is in neither path.
    pool = torch.randn(min(g, cfg.cirr_token_pool or g), n_tok, width, generator=gen).to(device)
    gallery = PooledTokens(pool, g)
    refs = torch.randint(0, g, (n,), generator=gen)  # each query's reference image
    ids, mask, _ = _texts(n, length, gen)
    z_t = (torch.randn(n, length, model.config.text.hidden_size, generator=gen).to(device)
           if model.needs_z_t else None)

    def query(start: int, stop: int) -> RerankQuery:
        # Padded to the batch's longest text, as the pipeline's tokenizer pads a batch.
        width_b = int(mask[start:stop].sum(1).max())
        return RerankQuery(ids[start:stop, :width_b].to(device), mask[start:stop, :width_b].to(device),
                           z_t=None if z_t is None else z_t[start:stop, :width_b],
                           ref_tokens=gallery[refs[start:stop]] if model.needs_ref_tokens else None)

    def pass_flops(p) -> float:
        return analytic_flops(model.config, queries=p.queries.numel(), pairs=p.end - p.start,
                              candidates=p.candidates.numel(), text_len=length)["shared"]

    def shared(block_mib: float, variants: tuple[int | None, ...] = (None,)) -> dict:
        """Seconds of the shared path over all N queries (measured, or extrapolated from sampled passes), FLOPs,
        pairs per candidate projection, and the scores (of every pass, or of the sampled ones). `variants`: the
        shared path's tile rows to time (None = the model's own), `cirr_repeats` rounds of each, interleaved; the
        figures are each variant's median round, "rounds_s" every round's."""
        blocks = list(query_blocks(model, range(n), batch, query, block_mib))
        plans = [(q, shared_passes(lists[s:e].to(device), cfg.cirr_max_pairs), s, e) for s, e, q in blocks]
        passes = [(q, p) for q, plan, _, _ in plans for p in plan.passes]
        flops = [pass_flops(p) for _, p in passes]
        projections = sum(p.candidates.numel() for _, p in passes)
        out = {"blocks": len(blocks), "passes": len(passes), "gflop": sum(flops) / 1e9,
               "pass_reuse": sum(p.end - p.start for _, p in passes) / projections}
        if cfg.cirr_pass_sample and cfg.cirr_pass_sample < len(passes):
            chosen = torch.randperm(len(passes), generator=torch.Generator().manual_seed(cfg.seed + 5))
            chosen = chosen[:cfg.cirr_pass_sample].tolist()

            def measure() -> dict:
                timed = [_timed(lambda i=i: model.score_pass(passes[i][0], gallery, passes[i][1]), device)
                         for i in chosen]
                seconds = [t for _, t in timed]
                rate = torch.tensor(seconds) / torch.tensor([flops[i] for i in chosen])  # s per FLOP of each pass
                return dict(seconds=sum(flops) * float(sum(seconds) / sum(flops[i] for i in chosen)),
                            sampled=len(chosen), sampled_seconds=sum(seconds),
                            s_per_tflop_cv=float(rate.std() / rate.mean()) if len(chosen) > 1 else 0.0,
                            scores=None, pass_scores=torch.cat([s.float() for s, _ in timed]))
        else:
            def measure() -> dict:
                scores, seconds = _timed(lambda: torch.cat([
                    score_indexed(model, q, gallery, lists[s:e], cfg.cirr_max_pairs, "shared", device)
                    for q, _, s, e in plans]), device)
                return dict(seconds=seconds, sampled=len(passes), sampled_seconds=seconds, s_per_tflop_cv=0.0,
                            scores=scores, pass_scores=scores)
        rounds: dict[int | None, list[dict]] = {v: [] for v in variants}
        for _ in range(max(1, cfg.cirr_repeats)):
            for v in variants:
                with _tile_rows(model, v):
                    rounds[v].append(measure())
        for v, runs in rounds.items():
            median = sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]
            target = out if v is None else out.setdefault(f"tile_rows_{v}", {})
            target.update(median, rounds_s=[r["seconds"] for r in runs])
        return out

    sample = min(n, max(1, cfg.cirr_sample))
    with torch.inference_mode(), _autocast(cfg, device):
        score_indexed(model, query(0, 2), gallery, lists[:2, :2], cfg.cirr_max_pairs, "pairs", device)  # warm-up
        score_indexed(model, query(0, 2), gallery, lists[:2, :2], cfg.cirr_max_pairs, "shared", device)
        main = shared(cfg.cirr_query_block_mib, (None, 0) if cfg.cirr_untiled else (None,))
        per_batch = shared(0.0) if cfg.cirr_per_batch else None
        pp_scores, pp_s = _timed(lambda: score_indexed(model, query(0, sample), gallery, lists[:sample],
                                                       cfg.cirr_max_pairs, "pairs", device), device)
        # the shared path's scores of the same queries, as the pipeline computes them (one block, untimed)
        check = score_indexed(model, query(0, sample), gallery, lists[:sample], cfg.cirr_max_pairs, "shared", device)
    flops_pp = analytic_flops(model.config, queries=1, pairs=n * k, candidates=1, text_len=length)["per_pair"]
    pp_extrapolated = pp_s * n / sample
    result = {
        "case": "eval-cirr-shaped", **_common(cfg, model, device), "text_len": length, "gallery": g, "queries": n,
        "candidates_per_query": k, "pairs": n * k, "query_batch": batch, "max_pairs": cfg.cirr_max_pairs,
        "query_block_mib": cfg.cirr_query_block_mib, "query_blocks": main["blocks"],
        "popularity": "zipf", "zipf_exponent": cfg.cirr_zipf, "mean_reuse": round(mean_reuse(lists), 2),
        "mean_reuse_at_cirr_val_n": round(reuse_val, 2), "unique_candidates": int(torch.unique(lists).numel()),
        "pass_reuse": round(main["pass_reuse"], 3), "shared_passes": main["passes"],
        "shared_passes_timed": main["sampled"], "shared_timed_s": round(main["sampled_seconds"], 4),
        "shared_s": round(main["seconds"], 4), "shared_extrapolated": main["sampled"] < main["passes"],
        "shared_s_per_tflop_cv": round(main["s_per_tflop_cv"], 4), "shared_s_per_query": round(main["seconds"] / n, 5),
        "per_pair_sample_queries": sample, "per_pair_sample_s": round(pp_s, 4),
        "per_pair_s_extrapolated": round(pp_extrapolated, 4), "per_pair_extrapolated": sample < n,
        "speedup": round(pp_extrapolated / main["seconds"], 3),
        "per_pair_gflop": round(flops_pp / 1e9, 3), "shared_gflop": round(main["gflop"], 3),
        "flop_ratio": round(flops_pp / (main["gflop"] * 1e9), 3),
        "max_abs_score_diff": float((check - pp_scores).abs().max()),
        "score_std": float(pp_scores.std()),
    }
    if main["scores"] is not None:
        result["max_abs_score_diff_all_passes"] = float((main["scores"][:sample] - pp_scores).abs().max())
    result["shared_tile_rows"] = getattr(model, "shared_tile_rows", None)
    if cfg.cirr_untiled:
        result.update(_untiled_fields(main, pp_extrapolated))
    if per_batch is not None:
        result.update({
            "per_batch_shared_s": round(per_batch["seconds"], 4),
            "per_batch_speedup": round(pp_extrapolated / per_batch["seconds"], 3),
            "per_batch_flop_ratio": round(flops_pp / (per_batch["gflop"] * 1e9), 3),
            "per_batch_pass_reuse": round(per_batch["pass_reuse"], 3),
            "per_batch_extrapolated": per_batch["sampled"] < per_batch["passes"],
        })
    return result


def _untiled_fields(main: dict, pp_extrapolated: float) -> dict:
    """The untiled shared path (`shared_tile_rows = 0`, timed round by round with the tiled one) against it."""
    untiled = main["tile_rows_0"]
    return {
        "shared_rounds_s": [round(x, 4) for x in main["rounds_s"]],
        "untiled_shared_s": round(untiled["seconds"], 4),
        "untiled_rounds_s": [round(x, 4) for x in untiled["rounds_s"]],
        "untiled_speedup": round(pp_extrapolated / untiled["seconds"], 3),
        "tiled_over_untiled_rounds": [round(u / t, 3) for u, t in zip(untiled["rounds_s"], main["rounds_s"])],
        "tiled_over_untiled": round(untiled["seconds"] / main["seconds"], 3),
        "max_abs_score_diff_untiled": float((main["pass_scores"] - untiled["pass_scores"]).abs().max()),
    }


@contextlib.contextmanager
def _tile_rows(model: Stage2Model, rows: int | None) -> Iterator[None]:
    """The model's `shared_tile_rows` set to `rows` for the block (None: left as it is)."""
    if rows is None:
        yield
        return
    if not hasattr(type(model), "shared_tile_rows"):
        raise ValueError(f"the {model.name} re-ranker has no tiled shared path (shared_tile_rows) to compare with")
    before = model.shared_tile_rows
    model.shared_tile_rows = rows
    try:
        yield
    finally:
        model.shared_tile_rows = before


# ------------------------------------------------------------------------------------------ training memory
GIB = 2**30
ADAMW_BYTES_PER_TRAINABLE = 16  # fp32 weight + gradient + AdamW's two moments
FROZEN_BYTES_PER_PARAM = 4  # fp32 weight
CUDA_RESERVE_BYTES = 1.5 * GIB  # CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation (rule of thumb)


def _params_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * (ADAMW_BYTES_PER_TRAINABLE if p.requires_grad else FROZEN_BYTES_PER_PARAM)
               for p in model.parameters())


def fits_table(fixed_bytes: float, per_sample_bytes: float, per_sample_sq_bytes: float = 0.0,
               budgets_gb: tuple[float, ...] = (24, 40, 80), reserve_bytes: float = CUDA_RESERVE_BYTES) -> dict:
    """Largest per-GPU batch B whose training step fits each memory budget:
    fixed + per_sample * B + per_sample_sq * B^2 + reserve <= budget (GB = 10^9 bytes, as GPUs are sold).

    Args:
        fixed_bytes: weights, gradients and optimizer state (`_params_bytes`).
        per_sample_bytes, per_sample_sq_bytes: measured activation memory per sample and per sample squared (stage
            II's in-batch objective scores B x B pairs, so its text activations grow with B^2).
    Returns:
        {"24GB": B, ...}; 0 where not even one sample fits.
    """
    out = {}
    for gb in budgets_gb:
        room = gb * 1e9 - fixed_bytes - reserve_bytes
        b = 0
        if room > 0:
            a, c = per_sample_sq_bytes, per_sample_bytes
            b = int(room // c) if a <= 0 else int((-c + (c * c + 4 * a * room) ** 0.5) / (2 * a))
        out[f"{gb:g}GB"] = max(b, 0)
    return out


def _train_peak(model: torch.nn.Module, step: Callable[[], torch.Tensor], device: torch.device) -> tuple[int, float]:
    """Peak activation bytes and seconds of one forward + backward (`step` returns the loss); gradients of the
    trainable parameters are allocated before the baseline, so only activations count."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    with peak_memory(device) as mem:
        _, seconds = _timed(lambda: step().backward(), device)
    for p in params:
        p.grad = None
    return mem.peak_bytes, seconds


def bench_memory(cfg: BenchConfig, model: Stage2Model, device: torch.device) -> dict:
    """Activation memory of a stage-II training step (the shared path's in-batch objective) at batch B with and without
    gradient checkpointing of the text encoder, and at B/2 to separate the per-pair (B^2) and per-candidate (B)
    terms; the same for stage I (text encoder over precomputed reference tokens, linear in B) and the peak of the
    frozen ViT's no_grad forward per image; from these, the largest per-GPU batch at 24, 40 and 80 GB (`fits_table`).
    """
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    b = cfg.memory_batch
    half = max(1, b // 2)
    mc = model.config
    n_tok, width = mc.vision.num_tokens, mc.vision.width
    model.train()
    model.visual_encoder.eval()  # frozen: its tokens are an input here

    def stage2_step(n: int, checkpointing: bool) -> tuple[int, float]:
        model.set_gradient_checkpointing(checkpointing)
        tokens = torch.randn(n, n_tok, width, generator=gen).to(device)
        query, _ = _query(model, n, cfg.text_len, torch.randn(n, n_tok, width, generator=gen).to(device), gen, device)

        def step() -> torch.Tensor:
            with _autocast(cfg, device):
                return model(query, tokens).loss
        return _train_peak(model, step, device)

    s2 = {(n, ck): stage2_step(n, ck) for n in (b, half) for ck in (False, True)}
    model.set_gradient_checkpointing(False)
    # M(B) = a B^2 + c B through the two measured points (without checkpointing)
    m_b, m_h = s2[(b, False)][0], s2[(half, False)][0]
    a2 = max(0.0, (m_b / b - m_h / half) / (b - half)) if b != half else 0.0
    c2 = max(0.0, m_b / b - a2 * b)
    mk_b, mk_h = s2[(b, True)][0], s2[(half, True)][0]
    a2k = max(0.0, (mk_b / b - mk_h / half) / (b - half)) if b != half else 0.0
    c2k = max(0.0, mk_b / b - a2k * b)
    # With checkpointing the per-sample terms are a few MiB, below what RSS resolves at a small B: floor them at what
    # checkpointing must hold, one layer's activations (the recompute) plus every layer's input hidden states.
    layers, streams = mc.text.num_layers, RERANKERS.get(mc.reranker).text_streams
    boundary = layers * streams * cfg.text_len * mc.text.hidden_size * 4  # fp32 bytes per pair
    a2k, c2k = max(a2k, a2 / layers + boundary), max(c2k, c2 / layers)

    # Stage I: a fresh model of the same geometry (the ViT is frozen and reads no gradient).
    from cirlib.models.stage1 import Stage1Model
    torch.manual_seed(cfg.seed)
    s1_model = Stage1Model(mc).to(device).train()
    s1_model.visual_encoder.requires_grad_(False).eval()

    def stage1_step(n: int, checkpointing: bool) -> tuple[int, float]:
        s1_model.set_gradient_checkpointing(checkpointing)
        ref = torch.randn(n, n_tok, width, generator=gen).to(device)
        ids, mask, _ = _texts(n, cfg.text_len, gen)
        ids, mask = ids.to(device), mask.to(device)
        targets = F.normalize(torch.randn(n, mc.projection_dim, generator=gen), dim=-1).to(device)

        def step() -> torch.Tensor:
            with _autocast(cfg, device):
                return s1_model(ref, ids, mask, targets).loss
        return _train_peak(s1_model, step, device)

    s1 = {(n, ck): stage1_step(n, ck) for n in (b, half) for ck in (False, True)}
    per1 = max(0.0, (s1[(b, False)][0] - s1[(half, False)][0]) / max(1, b - half)) or s1[(b, False)][0] / b
    per1k = max(0.0, (s1[(b, True)][0] - s1[(half, True)][0]) / max(1, b - half)) or s1[(b, True)][0] / b
    per1k = max(per1k, per1 / layers + layers * cfg.text_len * mc.text.hidden_size * 4)  # floor, as for stage II
    vit_images = 2
    with torch.no_grad(), peak_memory(device) as vit_mem:
        s1_model.encode_image(torch.randn(vit_images, 3, mc.vision.image_size, mc.vision.image_size, generator=gen)
                              .to(device))
    vit_per_image = vit_mem.peak_bytes / vit_images
    fixed1, fixed2 = _params_bytes(s1_model), _params_bytes(model)
    # The fits also hold each sample's input image tokens (the reference for stage I, the candidate for stage II),
    # which the measurement allocated before its baseline: fp32 (T, Dv) per sample.
    token_bytes = n_tok * width * 4
    per1, per1k, c2, c2k = per1 + token_bytes, per1k + token_bytes, c2 + token_bytes, c2k + token_bytes
    # Without the feature store each sample also decodes and encodes 2 images (stage I) or 2 + negatives (stage II)
    # under no_grad: a transient peak before the text encoder's activations build up, so the larger of the two counts.
    mib = 2**20
    return {
        "case": "memory-stage2", **_common(cfg, model, device), "batch": b, "half_batch": half,
        "stage2_peak_mib": round(s2[(b, False)][0] / mib, 1),
        "stage2_peak_checkpointed_mib": round(s2[(b, True)][0] / mib, 1),
        "stage2_checkpointing_memory_ratio": round(s2[(b, True)][0] / max(1, s2[(b, False)][0]), 3),
        "stage2_step_s": round(s2[(b, False)][1], 3), "stage2_step_checkpointed_s": round(s2[(b, True)][1], 3),
        "stage2_half_batch_peak_mib": round(s2[(half, False)][0] / mib, 1),
        "stage2_half_batch_peak_checkpointed_mib": round(s2[(half, True)][0] / mib, 1),
        "stage2_per_pair_mib": round(a2 / mib, 3), "stage2_per_sample_mib": round(c2 / mib, 3),
        "stage2_per_pair_checkpointed_mib": round(a2k / mib, 3),
        "stage2_per_sample_checkpointed_mib": round(c2k / mib, 3),
        "stage1_peak_mib": round(s1[(b, False)][0] / mib, 1),
        "stage1_peak_checkpointed_mib": round(s1[(b, True)][0] / mib, 1),
        "stage1_step_s": round(s1[(b, False)][1], 3), "stage1_step_checkpointed_s": round(s1[(b, True)][1], 3),
        "stage1_per_sample_mib": round(per1 / mib, 3), "stage1_per_sample_checkpointed_mib": round(per1k / mib, 3),
        "vit_no_grad_forward_per_image_mib": round(vit_per_image / mib, 3),
        "stage1_fixed_gib": round(fixed1 / GIB, 3), "stage2_fixed_gib": round(fixed2 / GIB, 3),
        "fits_reserve_gib": round(CUDA_RESERVE_BYTES / GIB, 2),
        "fits_stage1": fits_table(fixed1, per1), "fits_stage1_checkpointed": fits_table(fixed1, per1k),
        "fits_stage2": fits_table(fixed2, c2, a2), "fits_stage2_checkpointed": fits_table(fixed2, c2k, a2k),
        "memory_method": vit_mem.method,
    }


# ------------------------------------------------------------------------------------------------------ CLI
def run(cfg: BenchConfig, emit: Callable[[dict], None] = lambda r: print(json.dumps(r), flush=True)) -> list[dict]:
    """Run every requested case and reranker; each result is passed to `emit` (default: one JSON line on stdout)."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA device")
    if cfg.dtype == "fp16" and device.type != "cuda":
        raise ValueError("--dtype fp16 needs --device cuda (CPU autocast supports bf16)")
    unknown = set(cfg.cases) - set(CASES)
    if unknown:
        raise ValueError(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rerankers = BOTH if cfg.reranker == "both" else (cfg.reranker,)
    results = []
    for reranker in rerankers:
        model = _build(cfg, reranker, device)
        for case in cfg.cases:
            result = bench_store(case, cfg, device) if case in STORE_CASES else {
                "eval": bench_eval, "train": bench_train, "eval-cirr-shaped": bench_eval_cirr,
                "memory-stage2": bench_memory}[case](cfg, model, device)
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
    p.add_argument("--reranker", default=d.reranker, choices=[*RERANKERS.names(), "both"])
    p.add_argument("--cases", default=",".join(d.cases), help=f"comma-separated: {','.join(CASES)}")
    p.add_argument("--queries", type=int, default=d.queries)
    p.add_argument("--gallery", type=int, default=d.gallery)
    p.add_argument("--text-len", type=int, default=d.text_len)
    p.add_argument("--train-batch", type=int, default=d.train_batch)
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--max-pairs", type=int, default=d.max_pairs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--memory-batch", type=int, default=d.memory_batch)
    p.add_argument("--shared-tile-rows", type=int, default=d.shared_tile_rows,
                   help="shared-path tile rows at inference of re-rankers that tile (dual): 0 = untiled, -1 = the default")
    for f in dataclasses.fields(BenchConfig):  # the eval-cirr-shaped options: --cirr-queries, ...
        if f.name.startswith("cirr_"):
            kind = (lambda v: v.lower() in ("1", "true", "yes")) if f.type in (bool, "bool") else type(f.default)
            p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    a = p.parse_args(argv)
    if a.text_len < 3:
        p.error("--text-len must be at least 3 ([ENC], a word, [SEP])")
    return BenchConfig(preset=a.preset, reranker=a.reranker, cases=tuple(c for c in a.cases.split(",") if c),
                       queries=a.queries, gallery=a.gallery, text_len=a.text_len, train_batch=a.train_batch,
                       device=a.device, dtype=a.dtype, max_pairs=a.max_pairs, seed=a.seed, threads=a.threads,
                       memory_batch=a.memory_batch, shared_tile_rows=a.shared_tile_rows,
                       **{f.name: getattr(a, f.name) for f in dataclasses.fields(BenchConfig)
                          if f.name.startswith("cirr_")})


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
