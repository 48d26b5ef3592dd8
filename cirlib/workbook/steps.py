"""The two-stage pipeline as the calls the notebooks make: train, extract, re-rank, evaluate, submit.

Every call takes one frozen config, writes only inside its run folder (`outputs/<stage>/<run_name>/`), and reuses a
finished run unless `overwrite=True`. Run folders hold `config.json`, `metrics.jsonl` (training log),
`metrics.json` (final evaluation), `checkpoints/`, the model in our format under `model/`, and top-k files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from cirlib import data as cdata
from cirlib import distributed as dist
from cirlib.eval import metrics as M
from cirlib import paths
from cirlib.workbook.config import Stage1Config, Stage2Config, split_list, to_json
from cirlib.models import loading
from cirlib.models.config import ModelConfig, preset
from cirlib.models.stage1 import Stage1Model
from cirlib.models.stage2 import Stage2Model
from cirlib.retrieval.rerank import RerankResult, rerank
from cirlib.retrieval.search import (Ranking, encode_gallery, encode_queries, rank_gallery, stage1_encoder, stage2_encoder,
                              topk_from_ranking)
from cirlib.train.runtime import seed_everything
from cirlib.train.tasks import MinedTripletDataset, Stage1Task, Stage2Task
from cirlib.data.tokenizer import build_tokenizer
from cirlib.retrieval.topk import TopK
from cirlib.train.loop import TrainConfig, fit

CIRR_KS = (1, 5, 10, 50)
FIQ_KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)
SUBMISSION_LENGTH = 50  # names per query in a CIRR recall submission

# smoke=True: a run of seconds that still goes through every code path.
SMOKE_OVERRIDES = dict(epochs=1, max_epoch=1, max_steps_per_epoch=2, max_val_queries=16, validate_every=1)


# ----------------------------------------------------------------------------------------------------- helpers


def device() -> torch.device:
    """This process's device: its own GPU under a multi-process launch, else CUDA when available, else the CPU."""
    return dist.device()


def resolve(cfg):
    """Apply the smoke overrides (a no-op unless cfg.smoke)."""
    if not cfg.smoke:
        return cfg
    fields = {f.name for f in dataclasses.fields(cfg)}
    over = {k: v for k, v in SMOKE_OVERRIDES.items() if k in fields}
    if "batch_size" in fields:
        over["batch_size"] = min(cfg.batch_size, 8)
    return dataclasses.replace(cfg, **over)


def data_root(cfg) -> Path:
    root = paths.data_root(cfg.data_root or None)
    if not root.is_dir():
        raise cdata.DatasetError(f"dataset root {root} does not exist (data_root={cfg.data_root!r}, "
                                 f"${paths.DATA_ENV_VAR}={os.environ.get(paths.DATA_ENV_VAR)!r})")
    return root


def tokenizer_for(cfg, root: Path):
    path = Path(cfg.tokenizer) if cfg.tokenizer else root / "vocab.txt"
    if not path.is_absolute():
        path = paths.REPO_ROOT / path
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer not found at {path}: set tokenizer= to a vocab.txt or a local bert-base-uncased folder "
            "(the synthetic world writes <data_root>/vocab.txt)")
    return build_tokenizer(path)


def model_config(name: str, tokenizer, **overrides: Any) -> ModelConfig:
    """A preset with the text vocabulary sized to the tokenizer (30524 for BLIP's BERT)."""
    base = preset(name)
    text = dataclasses.replace(base.text, vocab_size=tokenizer.vocab_size)
    return dataclasses.replace(base, text=text, **overrides)


def split_sets(cfg, root: Path, split: str) -> list["cdata.SplitData"]:
    """One SplitData per FashionIQ category (in the configured order), or the one CIRR split."""
    if cfg.dataset == "fashioniq":
        return [cdata.load_split("fashioniq", root, split, c) for c in split_list(cfg.categories)]
    return [cdata.load_split(cfg.dataset, root, split)]


def limit_queries(split_data: "cdata.SplitData", n: int) -> "cdata.SplitData":
    """The first n queries of a split (0 = all); the gallery is unchanged."""
    if n <= 0 or n >= len(split_data.queries):
        return split_data
    return dataclasses.replace(split_data, queries=list(split_data.queries[:n]))


def mining_subset(split_data: "cdata.SplitData", n: int) -> "cdata.SplitData":
    """The first n queries with a gallery of only the images they use (reference, target, img_set members).

    Ranking a 120k-image train gallery to mine stage-II negatives costs minutes on a CPU; the images of a few
    thousand queries' own img_sets are a smaller pool that still holds every query's near-duplicates.
    """
    if n <= 0 or n >= len(split_data.queries):
        return split_data
    queries = list(split_data.queries[:n])
    used = {name for q in queries for name in (q.reference, q.target, *(q.members or ()))}
    gallery = [g for g in split_data.gallery if g in used]
    return dataclasses.replace(split_data, queries=queries, gallery=gallery)


def eval_split_name(dataset: str) -> str:
    return "val"


def test_split_name(dataset: str) -> str:
    return "test1" if dataset == "cirr" else "test"


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    _atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _finished(run_dir: Path, cfg, marker: str) -> bool:
    """A run is reused when it finished with this very config; a changed config (e.g. more epochs) resumes it.

    Decided by the main process for all (collective): the others must not see files it writes meanwhile.
    """
    return dist.broadcast_object(_finished_here(run_dir, cfg, marker) if dist.is_main_process() else None)


def _finished_here(run_dir: Path, cfg, marker: str) -> bool:
    if cfg.overwrite or not (run_dir / marker).exists() or not (run_dir / "model").is_dir():
        return False
    saved = run_dir / "config.json"
    return saved.exists() and json.loads(saved.read_text()) == json.loads(to_json(cfg))


def topk_name(split: str, category: str | None) -> str:
    return f"topk_{split}" + (f"_{category}" if category else "") + ".pt"


def label_name(split: str, category: str | None) -> str:
    return f"stage2_labels_{split}" + (f"_{category}" if category else "") + ".pt"


def _train_config(cfg, time_budget: float | None = None) -> TrainConfig:
    return TrainConfig(
        epochs=cfg.epochs, max_epoch=cfg.max_epoch, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps,
        lr=cfg.lr, weight_decay=cfg.weight_decay, grad_accumulation_steps=cfg.grad_accumulation_steps,
        max_grad_norm=cfg.max_grad_norm or None, batch_size=cfg.batch_size,  # recorded; the stage tasks batch with it
        precision=cfg.precision, validate_every=cfg.validate_every or None, seed=cfg.seed,
        max_steps_per_epoch=cfg.max_steps_per_epoch or None,
        time_budget_s=(cfg.time_budget_s or None), num_workers=cfg.num_workers,
    )


@dataclass
class RunSummary:
    """What a training call returns: where the run lives and its final validation metrics."""

    run_dir: Path
    metrics: dict[str, float]
    reused: bool  # True when a finished run was found and not retrained
    seconds: float

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([self.metrics]).T.rename(columns={0: "value"})


# ----------------------------------------------------------------------------------------------------- stage I


def build_stage1(cfg: Stage1Config, tokenizer) -> Stage1Model:
    """A stage-I model: preset, then BLIP pre-trained weights and/or a checkpoint to start from."""
    model = Stage1Model(model_config(cfg.preset, tokenizer))
    if cfg.pretrained:
        loading.load_blip_pretrained(model, _abs(cfg.pretrained))
    if cfg.init_checkpoint:
        _load_any_checkpoint(model, _abs(cfg.init_checkpoint))
    return model


def _abs(p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else paths.REPO_ROOT / path


def _load_any_checkpoint(model, path: Path) -> None:
    """Our run folder / model folder (safetensors) or an original checkpoint file."""
    if path.is_dir():
        folder = path / "model" if (path / "model").is_dir() else path
        loaded = loading.from_pretrained(folder)
        if type(loaded) is not type(model):
            raise loading.CheckpointError(f"{folder} holds a {type(loaded).__name__}, expected {type(model).__name__}")
        model.load_state_dict(loaded.state_dict())
    else:
        loading.load_original_checkpoint(model, path)


def evaluate_stage1(model, tokenizer, sets: Sequence["cdata.SplitData"], *, image_size: int, target_ratio: float,
                    k: int | None = None, stage1_run: str | None = None, batch_size: int = 64,
                    dev: torch.device | None = None, search: str = "exact") -> tuple[dict[str, float], list[TopK]]:
    """Rank each split's gallery for its queries: metrics over the full ranking, and (if k) the top-K artifacts.

    Collective under several processes: the gallery and the queries are split into contiguous shares (whole
    batches), each process ranks the gallery for its queries, and every process receives the same metrics and
    top-K files as one process would compute. `search="faiss"` ranks with a FAISS index (see
    `retrieval.rank_gallery`); recall is then computed within the searched head, which is at least 50 deep.
    """
    dev = dev or device()
    model.eval()
    transform = cdata.targetpad_transform(target_ratio, image_size)
    metrics: dict[str, float] = {}
    per_cat: dict[str, dict[str, float]] = {}
    topks: list[TopK] = []
    for sd in sets:
        ks = FIQ_KS if sd.dataset == "fashioniq" else CIRR_KS
        gallery = encode_gallery(stage1_encoder(model), sd, transform, batch_size=batch_size, device=dev,
                                 desc=f"gallery {sd.category or sd.split}")
        share = dist.shard_range(len(sd.queries), batch_size)
        mine = sd.queries[share.start:share.stop]
        q_emb = encode_queries(model, tokenizer, sd, gallery, queries=mine, batch_size=batch_size, device=dev)
        depth = max(k or 1, max(ks)) if search == "faiss" else (k or 1)
        ranking = Ranking.cat(dist.gather_objects(rank_gallery(sd, mine, gallery, q_emb, depth, search=search)))
        head = topk_from_ranking(sd, sd.queries, gallery, ranking, stage1_run=stage1_run)
        if k:
            topks.append(head.sliced(min(k, head.k)) if head.k > k else head)
        if not all(q.target is not None for q in sd.queries):
            continue
        rec = M.recall_from_ranks(ranking.target_rank.numpy(), ks)
        if sd.dataset == "fashioniq":
            per_cat[sd.category] = rec
        else:
            metrics.update(rec)
            metrics.update(M.subset_recall_at_k(head.group_labels.numpy(), SUBSET_KS))
            metrics["selection"] = M.cirr_selection_score(metrics)
    if per_cat:
        metrics.update(M.fashioniq_summary(per_cat))
        metrics["selection"] = metrics["average_recall"]
    return metrics, topks


def train_stage1(cfg: Stage1Config) -> RunSummary:
    """Train stage I (or only evaluate it when epochs=0) into outputs/stage1/<run_name>/."""
    cfg = resolve(cfg)
    t0 = time.time()
    run_dir = cfg.run_dir
    if _finished(run_dir, cfg, "metrics.json"):
        return RunSummary(run_dir, read_json(run_dir / "metrics.json")["final"], True, 0.0)
    seed_everything(cfg.seed)
    root = data_root(cfg)
    tok = tokenizer_for(cfg, root)
    dev = device()
    model = build_stage1(cfg, tok).to(dev)
    size = model.config.vision.image_size
    transform = cdata.targetpad_transform(cfg.target_ratio, size)
    val_sets = [limit_queries(s, cfg.max_val_queries) for s in split_sets(cfg, root, eval_split_name(cfg.dataset))]
    if dist.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(run_dir / "config.json", to_json(cfg))

    def validate() -> dict[str, float]:
        m, _ = evaluate_stage1(model, tok, val_sets, image_size=size, target_ratio=cfg.target_ratio, dev=dev,
                               search=cfg.search)
        return m

    if cfg.epochs > 0:
        task = Stage1Task(model, tok, split_sets(cfg, root, "train"), transform, batch_size=cfg.batch_size,
                          train_image_encoder=cfg.train_image_encoder, validate_fn=validate,
                          selection_key="selection", symmetric_loss=cfg.symmetric_loss, seed=cfg.seed,
                          num_workers=cfg.num_workers, device=dev)
        result = fit(task, _train_config(cfg), run_dir, overwrite=cfg.overwrite)
        result.load_best_into(model)
    if dist.is_main_process():
        loading.save_pretrained(model, run_dir / "model", tokenizer=tok)
    final = validate()
    if dist.is_main_process():
        write_json(run_dir / "metrics.json", {"final": final, "split": eval_split_name(cfg.dataset)})
    dist.barrier()
    return RunSummary(run_dir, final, False, time.time() - t0)


def load_stage1_run(run_dir: Path) -> tuple[Stage1Model, Any]:
    """The stage-I model and tokenizer saved by `train_stage1`."""
    folder = Path(run_dir) / "model"
    if not folder.is_dir():
        raise FileNotFoundError(f"no stage-I model at {folder}: run notebook 01 (train_stage1) for this run first")
    model = loading.from_pretrained(folder)
    return model, build_tokenizer(folder)


def extract_topk(cfg: Stage1Config) -> pd.DataFrame:
    """Write the stage-I top-K file of each split in `topk_splits` and report candidate recall at several K."""
    cfg = resolve(cfg)
    run_dir = cfg.run_dir
    model, tok = load_stage1_run(run_dir)
    dev = device()
    model.to(dev).eval()
    root = data_root(cfg)
    rows = []
    for split in split_list(cfg.topk_splits):
        sets = split_sets(cfg, root, split)
        if split == eval_split_name(cfg.dataset):
            sets = [limit_queries(s, cfg.max_val_queries) for s in sets]
        if split == "train":
            sets = [mining_subset(s, cfg.mining_queries) for s in sets]
        missing = [i for i, s in enumerate(sets) if cfg.overwrite or not (run_dir / topk_name(split, s.category)).exists()]
        todo = [sets[i] for i in dist.broadcast_object(missing)]  # the main process's view, for all
        if todo:
            _, topks = evaluate_stage1(model, tok, todo, image_size=model.config.vision.image_size,
                                       target_ratio=cfg.target_ratio, k=cfg.topk_k, stage1_run=cfg.run_name, dev=dev,
                                       search=cfg.search)
            if dist.is_main_process():
                for sd, tk in zip(todo, topks):
                    tk.save(run_dir / topk_name(split, sd.category))
            dist.barrier()
        for sd in sets:
            tk = TopK.load(run_dir / topk_name(split, sd.category), dataset=cfg.dataset, split=split,
                           category=sd.category)
            row = {"split": split, "category": sd.category or "-", "queries": tk.sorted_index_names.shape[0],
                   "K": tk.k}
            if tk.labels is not None:
                ks = [x for x in (1, 5, 10, 20, 32, 50, 100, 200) if x <= tk.k]
                row.update({f"cand@{x}": v for x, v in zip(ks, M.candidate_recall_at_k(tk.labels.numpy(), ks).values())})
            rows.append(row)
    report = pd.DataFrame(rows)
    if dist.is_main_process():
        write_json(run_dir / "candidate_recall.json", report.to_dict(orient="records"))
    dist.barrier()
    return report


# ----------------------------------------------------------------------------------------------------- stage II


def build_stage2(cfg: Stage2Config, tokenizer, stage1: Stage1Model | None) -> Stage2Model:
    """A stage-II model: preset + architecture, then its initialisation (BLIP file, scratch, or stage-I copy)."""
    if cfg.joint_difference and cfg.scoring != "pairs":
        raise ValueError("joint_difference=True scores (candidate - reference) tokens per pair: set scoring='pairs'")
    mc = model_config(cfg.preset, tokenizer, reranker=cfg.reranker, joint_difference=cfg.joint_difference)
    model = Stage2Model(mc)
    if cfg.init == "pretrained":
        if not cfg.pretrained:
            raise ValueError("init='pretrained' needs pretrained= (BLIP model_base.pth); use init='scratch' without one")
        loading.load_blip_pretrained(model, _abs(cfg.pretrained))
    elif cfg.init == "stage1":
        if stage1 is None:
            raise ValueError("init='stage1' needs the stage-I model")
        missing, unexpected = model.text_encoder.load_state_dict(stage1.text_encoder.state_dict(), strict=False)
        if cfg.reranker == "joint" and unexpected:
            raise loading.CheckpointError(f"stage-I text encoder keys not in the joint re-ranker: {unexpected[:10]}")
    elif cfg.init != "scratch":
        raise ValueError(f"unknown init {cfg.init!r}: 'pretrained' | 'scratch' | 'stage1'")
    if cfg.vision_from_stage1 and stage1 is not None:
        model.visual_encoder.load_state_dict(stage1.visual_encoder.state_dict())
    if cfg.init_checkpoint:
        _load_any_checkpoint(model, _abs(cfg.init_checkpoint))
    return model


def stage1_for(cfg: Stage2Config):
    """The frozen stage-I model and tokenizer: our run, or an original checkpoint file with the run's tokenizer."""
    if cfg.stage1_checkpoint:
        root = data_root(cfg)
        tok = tokenizer_for(cfg, root)
        model = Stage1Model(model_config(cfg.preset, tok))
        loading.load_original_checkpoint(model, _abs(cfg.stage1_checkpoint))
        return model, tok
    return load_stage1_run(cfg.stage1_dir)


def _val_topks(cfg: Stage2Config, sets: Sequence["cdata.SplitData"], split: str) -> list[TopK]:
    out = []
    for sd in sets:
        if cfg.topk_path:
            p = _abs(cfg.topk_path.replace("{category}", sd.category or ""))
        else:
            p = cfg.stage1_dir / topk_name(split, sd.category)
        if not p.exists():
            raise FileNotFoundError(f"no top-k file at {p}: run notebook 02 (extract_topk) with topk_splits "
                                    f"including '{split}', or set topk_path=")
        tk = TopK.load(p, dataset=cfg.dataset, split=split, category=sd.category, index_names=sd.gallery, k=cfg.k)
        if tk.sorted_index_names.shape[0] > len(sd.queries):  # a run validated on fewer queries
            tk = tk.head(len(sd.queries))
        out.append(tk)
    return out


def evaluate_stage2(stage1, stage2, tok, sets, topks, cfg: Stage2Config, *, dev=None,
                    save_dir: Path | None = None) -> tuple[dict[str, float], dict[str, float], list[RerankResult]]:
    """Stage-I and stage-II metrics on the same queries (stage II re-ranks the first cfg.k of each top-K)."""
    dev = dev or device()
    stage1.eval()
    stage2.eval()
    transform = cdata.targetpad_transform(cfg.target_ratio, stage2.config.vision.image_size)
    s1: dict[str, float] = {}
    s2: dict[str, float] = {}
    per1, per2 = {}, {}
    results = []
    if sets and sets[0].dataset == "fashioniq" and cfg.k < 50:
        raise ValueError(f"FashionIQ is reported as R@10 and R@50 over the re-ranked list, so k must be >= 50 "
                         f"(got k={cfg.k}; the paper uses 100)")
    for sd, tk in zip(sets, topks):
        gallery = encode_gallery(stage2_encoder(stage2), sd, transform, device=dev, desc="stage-II gallery")
        zt_gallery = None
        if stage2.config.zt_source == "stage1_vit" and stage2.config.reranker == "dual":
            zt_gallery = encode_gallery(stage1_encoder(stage1), sd, transform, device=dev, desc="stage-I gallery")
        res = rerank(stage1, stage2, tok, sd, tk, gallery, k=cfg.k, fusion_weight=cfg.fusion_weight,
                     zt_gallery=zt_gallery, max_pairs=cfg.max_pairs, scoring=cfg.scoring, device=dev)
        results.append(res)
        ks = [x for x in (1, 5, 10, 50) if x <= cfg.k]
        r1 = M.recall_at_k(tk.labels[:, :cfg.k].numpy(), ks)
        r2 = M.recall_at_k(res.labels.numpy(), ks)
        if sd.dataset == "fashioniq":
            per1[sd.category], per2[sd.category] = r1, r2
        else:
            s1.update(r1)
            s2.update(r2)
            s1.update(M.subset_recall_at_k(tk.group_labels.numpy(), SUBSET_KS))
            s2.update(M.subset_recall_at_k(res.group_labels.numpy(), SUBSET_KS))
            s1["selection"], s2["selection"] = M.cirr_selection_score(s1), M.cirr_selection_score(s2)
        if save_dir is not None and dist.is_main_process():
            torch.save(res.labels.contiguous(), save_dir / label_name(sd.split, sd.category))
    if per1:
        s1.update(M.fashioniq_summary(per1))
        s2.update(M.fashioniq_summary(per2))
        s1["selection"], s2["selection"] = s1["average_recall"], s2["average_recall"]
    return s1, s2, results


def train_stage2(cfg: Stage2Config) -> RunSummary:
    """Train the stage-II re-ranker (stage I frozen) into outputs/stage2/<run_name>/."""
    cfg = resolve(cfg)
    t0 = time.time()
    run_dir = cfg.run_dir
    if _finished(run_dir, cfg, "train_done.json"):
        return RunSummary(run_dir, read_json(run_dir / "train_done.json")["best"], True, 0.0)
    seed_everything(cfg.seed)
    root = data_root(cfg)
    dev = device()
    stage1, tok = stage1_for(cfg)
    stage1.to(dev).eval()
    model = build_stage2(cfg, tok, stage1).to(dev)
    split = eval_split_name(cfg.dataset)
    val_sets = [limit_queries(s, cfg.max_val_queries) for s in split_sets(cfg, root, split)]
    val_topks = _val_topks(cfg, val_sets, split)
    if dist.is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(run_dir / "config.json", to_json(cfg))

    def validate() -> dict[str, float]:
        _, m2, _ = evaluate_stage2(stage1, model, tok, val_sets, val_topks, cfg, dev=dev)
        return m2

    best: dict[str, float] = {}
    if cfg.epochs > 0:
        transform = cdata.targetpad_transform(cfg.target_ratio, model.config.vision.image_size)
        train_sets = split_sets(cfg, root, "train")
        datasets = []
        for sd in train_sets:
            names = None
            if cfg.hard_negatives > 0:
                p = cfg.stage1_dir / topk_name("train", sd.category)
                if not p.exists():
                    raise FileNotFoundError(f"hard negatives need {p}: extract top-K with topk_splits including 'train'")
                names = TopK.load(p, dataset=cfg.dataset, split="train", category=sd.category,
                                  k=cfg.mining_k).sorted_index_names
                sd = limit_queries(sd, len(names))  # a top-K mined for the first N queries trains on those
            datasets.append(MinedTripletDataset(sd, transform, names, cfg.hard_negatives, seed=cfg.seed,
                                                n_set=cfg.set_negatives))
        dataset = datasets[0] if len(datasets) == 1 else _ConcatMined(datasets)
        task = Stage2Task(model, stage1, tok, dataset, batch_size=cfg.batch_size,
                          hard_negatives=cfg.hard_negatives + cfg.set_negatives,
                          inbatch_negatives=cfg.inbatch_negatives, stage1_train_mode=cfg.stage1_train_mode,
                          zt_from_stage1_vit=model.config.zt_source == "stage1_vit", validate_fn=validate,
                          selection_key="selection", scoring=cfg.scoring, num_workers=cfg.num_workers, device=dev)
        result = fit(task, _train_config(cfg), run_dir, overwrite=cfg.overwrite)
        result.load_best_into(model)
        best = result.best_metrics or {}
    if dist.is_main_process():
        loading.save_pretrained(model, run_dir / "model", tokenizer=tok)
        write_json(run_dir / "train_done.json", {"best": best})
    dist.barrier()
    return RunSummary(run_dir, best, False, time.time() - t0)


class _ConcatMined(torch.utils.data.ConcatDataset):
    def set_epoch_seed(self, seed: int) -> None:
        for d in self.datasets:
            d.set_epoch_seed(seed)


def load_stage2_run(run_dir: Path) -> Stage2Model:
    folder = Path(run_dir) / "model"
    if not folder.is_dir():
        raise FileNotFoundError(f"no stage-II model at {folder}: run notebook 03 (train_stage2) for this run first")
    return loading.from_pretrained(folder)


@dataclass
class Comparison:
    """Stage I vs stage II on the same validation queries."""

    stage1: dict[str, float]
    stage2: dict[str, float]
    k: int
    run_dir: Path

    def table(self) -> pd.DataFrame:
        df = pd.DataFrame({"stage I": self.stage1, "stage II": self.stage2})
        df["gain"] = df["stage II"] - df["stage I"]
        return df.round(2)


def evaluate(cfg: Stage2Config) -> Comparison:
    """Re-rank the validation top-K with the trained stage II; write metrics.json and the stage-II label tensors."""
    cfg = resolve(cfg)
    run_dir = cfg.run_dir
    reused = dist.broadcast_object(_saved_evaluation(cfg) if dist.is_main_process() else None)
    if reused is not None:
        return Comparison(reused["stage1"], reused["stage2"], reused["k"], run_dir)
    root = data_root(cfg)
    dev = device()
    stage1, tok = stage1_for(cfg)
    stage2 = load_stage2_run(run_dir)
    stage1.to(dev)
    stage2.to(dev)
    split = eval_split_name(cfg.dataset)
    sets = [limit_queries(s, cfg.max_val_queries) for s in split_sets(cfg, root, split)]
    topks = _val_topks(cfg, sets, split)
    s1, s2, _ = evaluate_stage2(stage1, stage2, tok, sets, topks, cfg, dev=dev, save_dir=run_dir)
    if dist.is_main_process():
        write_json(run_dir / "metrics.json", {"stage1": s1, "stage2": s2, "k": cfg.k, "split": split,
                                              "fusion_weight": cfg.fusion_weight, "scoring": cfg.scoring,
                                              "queries": sum(len(s.queries) for s in sets)})
    dist.barrier()
    return Comparison(s1, s2, cfg.k, run_dir)


def _saved_evaluation(cfg: Stage2Config) -> dict[str, Any] | None:
    """metrics.json when it evaluated the current weights with the same K, fusion weight and scoring, else None."""
    saved, weights = cfg.run_dir / "metrics.json", cfg.run_dir / "model" / "model.safetensors"
    if saved.exists() and not cfg.overwrite and weights.exists() and saved.stat().st_mtime >= weights.stat().st_mtime:
        m = read_json(saved)
        if m.get("k") == cfg.k and m.get("fusion_weight") == cfg.fusion_weight and m.get("scoring") == cfg.scoring:
            return m
    return None


def submit_cirr(cfg: Stage2Config) -> dict[str, Path]:
    """Re-rank the CIRR test1 top-K and write both server files (stage I and stage II), validated before upload."""
    cfg = resolve(dataclasses.replace(cfg, max_val_queries=0))
    if cfg.dataset != "cirr":
        raise ValueError("test submissions exist for CIRR only (FashionIQ reports on val)")
    root = data_root(cfg)
    dev = device()
    stage1, tok = stage1_for(cfg)
    stage2 = load_stage2_run(cfg.run_dir)
    stage1.to(dev).eval()
    stage2.to(dev).eval()
    sd = cdata.load_split("cirr", root, "test1")
    p = cfg.stage1_dir / topk_name("test1", None)
    if not p.exists():
        raise FileNotFoundError(f"no test1 top-k file at {p}: extract it with topk_splits including 'test1'")
    tk = TopK.load(p, dataset="cirr", split="test1", index_names=sd.gallery)
    transform = cdata.targetpad_transform(cfg.target_ratio, stage2.config.vision.image_size)
    gallery = encode_gallery(stage2_encoder(stage2), sd, transform, device=dev, desc="test1 gallery")
    res = rerank(stage1, stage2, tok, sd, tk, gallery, k=min(cfg.k, tk.k), fusion_weight=cfg.fusion_weight,
                 max_pairs=cfg.max_pairs, scoring=cfg.scoring, device=dev)
    if tk.k < SUBMISSION_LENGTH:
        raise ValueError(f"the test1 top-k file {p} holds {tk.k} candidates; the server needs "
                         f"{SUBMISSION_LENGTH} per query: extract it with topk_k >= {SUBMISSION_LENGTH}")
    # Stage II re-orders the first k; the rest of the 50 keep their stage-I order (k = 50 is the original).
    stage2_lists = np.concatenate([res.sorted_index_names, tk.sorted_index_names[:, res.sorted_index_names.shape[1]:]],
                                  axis=1)[:, :SUBMISSION_LENGTH]
    lists = {
        "stage1": (f"{cfg.submission_name}_stage1", tk.sorted_index_names[:, :SUBMISSION_LENGTH], tk.group_names[:, :3]),
        "stage2": (cfg.submission_name, stage2_lists, res.group_names[:, :3]),
    }
    # The main process writes and checks the files; the others learn where they are.
    written = _write_submissions(sd, lists, cfg.run_dir / "submission") if dist.is_main_process() else None
    dist.barrier()
    return dist.broadcast_object(written)


def _write_submissions(sd: "cdata.SplitData", lists: dict[str, tuple[str, np.ndarray, np.ndarray]],
                       out_dir: Path) -> dict[str, Path]:
    from cirlib.eval import submission

    pair_ids = [q.pair_id for q in sd.queries]
    written: dict[str, Path] = {}
    for label, (name, recall_lists, subset_lists) in lists.items():
        pr, ps = submission.write_cirr_submission(pair_ids, recall_lists.tolist(), subset_lists.tolist(), out_dir, name)
        for path in (pr, ps):
            submission.check_cirr_submission(path, sd.queries, sd.gallery)
        written[f"{label}_recall"], written[f"{label}_subset"] = pr, ps
    return written
