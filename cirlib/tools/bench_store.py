"""Feature-store benchmark cases of `python -m cirlib.bench` (issue 13, part 3): one training step with and without
the image feature store (`cirlib.retrieval.feature_store`), same model, weights and batch.

    python -m cirlib.bench --cases store-stage1,store-stage2 --train-batch 8        # blip-base, CPU fp32

- "store-stage1": `Stage1Task` (ViT frozen, the original) on a batch of B training triplets. Without the store: the
  task's own DataLoader decodes and pre-processes both images of every triplet (TargetPad to the model's size) and
  the step runs the ViT on them, as a real run does; with it: the DataLoader yields names and captions, and the
  step reads reference tokens and target embeddings from the store.
- "store-stage2": `Stage2Task` (dual re-ranker by default, z_t from stage I, H mined negatives per query) on a batch of
  B queries; without the store the reference, target and H negative images are decoded and encoded every step.

The images are a synthetic CIRR-layout world generated at the model's image size (384 px at blip-base) in a temporary
folder; the store is built for the batch's images before timing (its build time is reported, not part of the step).
A step = the batch from the task's loader + `training_step` + backward; the optimizer update (the same for both
paths) is timed once and reported apart (`optimizer_s`). Dropout is 0, the frozen encoders are in eval mode and the
store is float32, so both paths compute the same loss up to float rounding (`loss_abs_diff`, expected < 1e-5 in
fp32). The store path runs once untimed first (warm-up of the text encoder); each path is then timed once.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cirlib import data as cdata
from cirlib.data import synth
from cirlib.data.tokenizer import build_tokenizer
from cirlib.models.factory import model_config
from cirlib.models.stage1 import Stage1Model
from cirlib.models.stage2 import Stage2Model
from cirlib.retrieval import feature_store as fs
from cirlib.train.tasks import MinedTripletDataset, Stage1Task, Stage2Task

STORE_CASES = ("store-stage1", "store-stage2")
TARGET_RATIO = 1.25  # TargetPad threshold of the pipeline
STAGE2_NEGATIVES = 3  # mined negatives per query in store-stage2 (the demo's hard_negatives)


def _no_dropout(preset_name: str, vocab_size: int, **overrides: Any):
    cfg = model_config(preset_name, vocab_size, **overrides)
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, hidden_dropout=0.0, attention_dropout=0.0),
                               stage1_drop_path_rate=0.0, stage2_drop_path_rate=0.0)


def _world(root: Path, batch: int, image_size: int, seed: int) -> tuple["cdata.SplitData", Any]:
    """A synthetic CIRR world with at least `batch` training queries at `image_size` px, and its tokenizer."""
    synth.generate(synth.SynthConfig(layout="cirr", n_train=max(batch, 8), n_val=4, n_test=0, seed=seed,
                                     image_size=image_size), root=root)
    return cdata.load_split("cirr", root, "train"), build_tokenizer(root / "vocab.txt")


def _step(task, loader_seed: int) -> tuple[float, float]:
    """(seconds, loss) of one step: the first batch of the task's loader, the training step, backward."""
    t0 = time.perf_counter()
    batch = next(iter(task.train_loader(loader_seed)))
    task.train_mode()
    out = task.training_step(batch)
    out["loss"].backward()
    seconds = time.perf_counter() - t0
    loss = float(out["loss"].detach())
    for p in task.trainable_parameters():
        p.grad = None
    return seconds, loss


def _optimizer_seconds(task) -> float:
    params = task.trainable_parameters()
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-9)
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def _compare(make_task, store_name: str, store, build_s: float, extra: dict[str, Any]) -> dict[str, Any]:
    plain, stored = make_task(None), make_task(store)
    _step(stored, 0)  # warm-up (text encoder, allocator)
    with_s, with_loss = _step(stored, 0)
    without_s, without_loss = _step(plain, 0)
    return {**extra, "store": store_name, "store_build_s": round(build_s, 3),
            "store_bytes_per_image": store.manifest["bytes_per_image"],
            "without_store_s": round(without_s, 4), "with_store_s": round(with_s, 4),
            "speedup": round(without_s / with_s, 3), "optimizer_s": round(_optimizer_seconds(plain), 4),
            "loss_without_store": without_loss, "loss_with_store": with_loss,
            "loss_abs_diff": abs(without_loss - with_loss)}


def bench_store(case: str, cfg, device: torch.device) -> dict[str, Any]:
    """One of STORE_CASES at `cfg.preset`, batch `cfg.train_batch` (fp32 only: the comparison is exact there)."""
    if case not in STORE_CASES:
        raise ValueError(f"unknown store case {case!r}; choose from {STORE_CASES}")
    if cfg.dtype != "fp32":
        raise ValueError(f"{case} compares losses exactly and runs in fp32; got --dtype {cfg.dtype}")
    b = cfg.train_batch
    with tempfile.TemporaryDirectory(prefix="cirlib-bench-store-") as tmp:
        tmp = Path(tmp)
        size = model_config(cfg.preset, 30524).vision.image_size
        sd, tok = _world(tmp / "cirr", b, size, cfg.seed)
        transform = cdata.targetpad_transform(TARGET_RATIO, size)
        torch.manual_seed(cfg.seed)
        stage1 = Stage1Model(_no_dropout(cfg.preset, tok.vocab_size)).to(device)
        common = {"case": case, "preset": cfg.preset, "device": str(device), "dtype": cfg.dtype,
                  "threads": torch.get_num_threads(), "batch": b, "image_size": size,
                  "image_tokens": stage1.config.vision.num_tokens}
        if case == "store-stage1":
            names = list(dict.fromkeys(n for q in sd.queries for n in (q.reference, q.target)))
            t0 = time.perf_counter()
            store = fs.open_store(fs.stage1_image_encoder(stage1), fs.preprocessing(TARGET_RATIO, size), names, sd,
                                  outputs_root=tmp / "outputs", device=device, batch_size=8)
            build_s = time.perf_counter() - t0

            def make(s):
                return Stage1Task(stage1, tok, [sd], transform, batch_size=b, train_image_encoder=False,
                                  validate_fn=dict, selection_key="selection", seed=cfg.seed, device=device, store=s)

            return _compare(make, store.folder.name, store, build_s, {**common, "images_per_step": 2 * b})
        stage2 = Stage2Model(_no_dropout(cfg.preset, tok.vocab_size, reranker=cfg.reranker)).to(device)
        rng = np.random.default_rng(cfg.seed)
        topk = np.array([rng.choice(sd.gallery, size=8, replace=False) for _ in sd.queries])
        names = list(sd.gallery)
        t0 = time.perf_counter()
        store = fs.open_store(fs.stage2_image_encoder(stage2), fs.preprocessing(TARGET_RATIO, size), names, sd,
                              outputs_root=tmp / "outputs", device=device, batch_size=8)
        build_s = time.perf_counter() - t0

        def make(s):
            dataset = MinedTripletDataset(sd, transform, topk, STAGE2_NEGATIVES, seed=cfg.seed, images=s is None)
            return Stage2Task(stage2, stage1, tok, dataset, batch_size=b, hard_negatives=STAGE2_NEGATIVES,
                              inbatch_negatives=-1, stage1_train_mode=False, zt_from_stage1_vit=False,
                              validate_fn=dict, selection_key="selection", scoring="shared", device=device, store=s)

        return _compare(make, store.folder.name, store, build_s,
                        {**common, "reranker": stage2.config.reranker, "negatives": STAGE2_NEGATIVES,
                         "images_per_step": b * (2 + STAGE2_NEGATIVES)})
