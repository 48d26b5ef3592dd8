"""The two-stage pipeline as the calls the notebooks make: train, extract, re-rank, evaluate, submit.

Every call takes one frozen config and writes only inside a run folder (`cirlib.run_folder.RunFolder`, which owns the
layout and file names). Nothing is reused unless everything that produced it is the same:

- a training run is finished when its completion record holds exactly this config (and, for stage II, the same
  stage-I weights and top-k files); a run (re)started drops that record first, so an interrupted extension is
  never taken for finished;
- a top-k file is reused when its provenance names the current stage-I weights (by hash) and the same settings;
- an evaluation record is reused when it was made with every same evaluation setting, the same top-k file (by
  content hash) and the same two models (by weights hash).

Evaluation and submission take only their own settings; models, data and preprocessing come from the stage-II run's
saved config, so changing an evaluation setting never retrains.

What is not computing (decisions the main process takes for all, the run folder's lock, reuse, provenance records,
writes by the main process only) is each step's `cirlib.workbook.bookkeeping.StepBook`.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cirlib import data as cdata
from cirlib import paths
from cirlib.eval import metrics as M
from cirlib.models import loading
from cirlib.retrieval.rerank import rerank
from cirlib.retrieval.topk import TopK
from cirlib.run_folder import RunFolder, RunFolderError, config_hash, file_sha256
from cirlib.train.loop import TrainConfig, fit, refuse_other_config, require_trackers
from cirlib.train.runtime import resolve_precision, seed_everything
from cirlib.train.tasks import MinedTripletDataset, Stage1Task, Stage2Task
from cirlib.workbook.bookkeeping import StepBook
from cirlib.workbook.config import (EvaluateConfig, Stage1Config, Stage2TrainConfig, SubmissionConfig, TopKConfig,
                                    identity, split_list)
from cirlib.workbook.evaluation import (EVAL_SPLIT, evaluate_stage1, evaluate_stage2, limit_queries, load_val_topks,
                                        match_rows, mining_subset, query_counts, refuse_unsupported,
                                        rerank_galleries, stage1_change_notes, step_sets, val_topk_paths)
from cirlib.workbook.factories import (abs_path, build_stage1, build_stage2, data_root, dataset_root, device,  # noqa: F401
                                       load_stage1_run,
                                       load_stage2_run, load_stages, stage1_for, stage1_weights_file, tokenizer_for)
from cirlib.workbook.stores import check_feature_store, provenance_of, stage1_store, stage2_stores

SUBMISSION_LENGTH = 50  # names per query in a CIRR recall submission

# smoke=True: a run of seconds that still goes through every code path.
SMOKE_OVERRIDES = dict(epochs=1, max_epoch=1, max_steps_per_epoch=2, max_val_queries=16, validate_every=1)


def resolve(cfg):
    """Apply the smoke overrides (a no-op unless cfg.smoke)."""
    if not getattr(cfg, "smoke", False):
        return cfg
    fields = {f.name for f in dataclasses.fields(cfg)}
    over = {k: v for k, v in SMOKE_OVERRIDES.items() if k in fields}
    if "batch_size" in fields:
        over["batch_size"] = min(cfg.batch_size, 8)
    return dataclasses.replace(cfg, **over)


def _train_config(cfg) -> TrainConfig:
    return TrainConfig(
        epochs=cfg.epochs, max_epoch=cfg.max_epoch, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps,
        lr=cfg.lr, weight_decay=cfg.weight_decay, grad_accumulation_steps=cfg.grad_accumulation_steps,
        max_grad_norm=cfg.max_grad_norm or None, batch_size=cfg.batch_size,  # the stage tasks batch with it (fit checks)
        precision=cfg.precision, validate_every=cfg.validate_every or None, seed=cfg.seed,
        max_steps_per_epoch=cfg.max_steps_per_epoch or None,
        time_budget_s=(cfg.time_budget_s or None), num_workers=cfg.num_workers, trackers=cfg.trackers,
    )


def _stage1_train_config(cfg: Stage1Config) -> TrainConfig:
    """The loop's settings of a stage-I run: `_train_config` plus its AdamW beta2 and epsilon and the onecycle
    schedule's settings."""
    return dataclasses.replace(
        _train_config(cfg), betas=(0.9, cfg.adam_beta2), eps=cfg.adam_eps,
        onecycle_pct_start=cfg.onecycle_pct_start, onecycle_div_factor=cfg.onecycle_div_factor,
        onecycle_final_div_factor=cfg.onecycle_final_div_factor, onecycle_momentum=cfg.onecycle_momentum,
    )


def _training_precision(cfg, dev) -> str:
    """The precision a training run computes in ("auto" resolved); evaluation alone (epochs=0) runs in fp32."""
    return resolve_precision(cfg.precision, dev) if cfg.epochs > 0 else "fp32"


def _save_model(run: RunFolder, model, tok) -> str:
    """Write model/ atomically (a crash leaves the previous one); returns the weights' sha256."""
    with paths.atomic_dir(run.model_dir) as tmp:
        loading.save_pretrained(model, tmp, tokenizer=tok)
    return file_sha256(run.weights_file)


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


def train_stage1(cfg: Stage1Config) -> RunSummary:
    """Train stage I (or only evaluate it when epochs=0) into <outputs>/stage1/<stage1_run>/."""
    cfg = resolve(cfg)
    t0 = time.time()
    run, ident = cfg.stage1_folder, identity(cfg)
    book = StepBook("train_stage1", run)
    record = book.finished(ident, overwrite=cfg.overwrite)
    if record is not None:
        return RunSummary(run.path, record["metrics"], True, 0.0)
    check_feature_store(cfg)
    if cfg.epochs > 0:
        require_trackers(cfg.trackers)  # an unknown or uninstalled tracker is refused before any work
    seed_everything(cfg.seed)
    root = data_root(cfg)
    # every split this run reads, checked (or dropped from) before anything is built or trained
    data = step_sets("train_stage1", cfg.dataset, root, cfg.categories,
                     {EVAL_SPLIT: cfg.max_val_queries, **({"train": 0} if cfg.epochs > 0 else {})}, cfg.missing_images,
                     run)
    tok = tokenizer_for(cfg, root)
    dev = device()
    model = build_stage1(cfg, tok).to(dev)
    size = model.config.vision.image_size
    transform = cdata.targetpad_transform(cfg.target_ratio, size)
    val_sets = data[EVAL_SPLIT]
    train_sets = data.get("train", [])
    # The frozen ViT's outputs of every training and validation image, read instead of encoding them (a store of
    # these weights and preprocessing is reused; the first run builds it).
    store = stage1_store(model, cfg.feature_store, [*train_sets, *val_sets], target_ratio=cfg.target_ratio,
                         outputs=cfg.outputs, device=dev, training=cfg.epochs > 0)

    def validate() -> dict[str, float]:
        m, _ = evaluate_stage1(model, tok, val_sets, image_size=size, target_ratio=cfg.target_ratio, dev=dev,
                               search=cfg.search, store=store)
        return m

    read = {"pretrained": abs_path(cfg.pretrained) if cfg.pretrained else None,
            "init_checkpoint": abs_path(cfg.init_checkpoint) if cfg.init_checkpoint else None}

    precision = _training_precision(cfg, dev)  # on every process: a bad precision stops them all

    def record(**weights: Any) -> dict[str, Any]:
        return book.record(cfg, [*val_sets, *train_sets], dataset=cfg.dataset, root=root, preset=cfg.preset,
                           precision=precision, seed=cfg.seed, weights={**read, **weights}, **provenance_of(store))

    if cfg.epochs > 0 and not cfg.overwrite:
        refuse_other_config(run.path, _stage1_train_config(cfg))  # before config.json changes: a refusal changes nothing
    book.start(ident, record)
    epochs_completed = 0
    if cfg.epochs > 0:
        task = Stage1Task(model, tok, train_sets, transform,
                          batch_size=cfg.batch_size, train_image_encoder=cfg.train_image_encoder,
                          validate_fn=validate, selection_key="selection", symmetric_loss=cfg.symmetric_loss,
                          seed=cfg.seed, num_workers=cfg.num_workers, device=dev, store=store)
        result = fit(task, _stage1_train_config(cfg), run.path, overwrite=cfg.overwrite)
        result.load_best_into(model)
        epochs_completed = result.epochs_completed
    weights = book.decide(lambda: _save_model(run, model, tok))
    final = validate()

    def finish() -> None:
        made_by = record(stage1=run.weights_file)  # the weights evaluated are the ones this run wrote
        paths.write_json(run.evaluation_file, {"final": final, "split": EVAL_SPLIT, "config_hash": config_hash(ident),
                                               "weights_sha256": weights, "provenance": made_by,
                                               "query_counts": query_counts(val_sets, run)})
        run.complete(ident, epochs_completed=epochs_completed, metrics=final, weights_sha256=weights,
                     provenance=made_by)

    book.write(finish)
    return RunSummary(run.path, final, False, time.time() - t0)


def _topk_provenance(cfg: TopKConfig, trained: dict[str, Any], weights: str, sd: "cdata.SplitData") -> dict[str, Any]:
    """What makes a top-k file: the stage-I weights (by hash), the extraction settings, and the split it ranks."""
    return {"stage1_run": cfg.stage1_run, "stage1_weights_sha256": weights,
            "config": {"topk_k": cfg.topk_k, "search": cfg.search, "target_ratio": trained["target_ratio"],
                       "dataset": trained["dataset"], "split": sd.split, "category": sd.category,
                       "queries": len(sd.queries), "gallery": len(sd.gallery),
                       # only with a store (files made from decoded images keep their provenance)
                       **({"feature_store": trained["feature_store"]} if trained.get("feature_store") else {}),
                       # only when images were dropped, so files made from complete data keep their provenance
                       **({} if sd.dropped is None else {"dropped_images": config_hash({"missing": sd.dropped.missing})})}}


def _stale_reason(path: Path, want: dict[str, Any]) -> str | None:
    """None when the top-k file at `path` was made by `want`, else why it is (re)made."""
    if not path.exists():
        return "missing"
    have = TopK.load(path).provenance
    if have == want:
        return None
    if not have:
        return "it records no provenance"
    if have.get("stage1_weights_sha256") != want["stage1_weights_sha256"]:
        return "it was made by other stage-I weights (the run trained further or was retrained)"
    return f"it was made with other settings ({have.get('config')} != {want['config']})"


def _stale_topks(files: list[Path], wanted: list[dict[str, Any]], overwrite: bool) -> list[int]:
    """The indices of the top-k `files` to (re)make: each is reused only when its provenance is `wanted`'s."""
    todo = []
    for i, (path, want) in enumerate(zip(files, wanted)):
        reason = "overwrite=True" if overwrite else _stale_reason(path, want)
        if reason is not None:
            if reason != "missing":
                print(f"[extract_topk] re-extracting {path}: {reason}", flush=True)
            todo.append(i)
    return todo


def topk_records(run: RunFolder) -> dict[Path, dict[str, Any] | None]:
    """Each top-k file of a stage-I run and the provenance record it carries (`produced_by`; None: none recorded)."""
    return {path: TopK.load(path).produced_by for path in run.topk_files()}


def extract_topk(cfg: TopKConfig) -> pd.DataFrame:
    """Write the stage-I top-K file of each split in `topk_splits` and report candidate recall at several K.

    A file is reused only when its provenance names the current stage-I weights and these settings; otherwise it is
    re-extracted (and the step says why).
    """
    cfg = resolve(cfg)
    run = cfg.stage1_folder
    model, tok = load_stage1_run(run)
    trained = run.saved_config()
    refuse_unsupported(cfg, trained["dataset"], trained["categories"])
    book = StepBook("extract_topk", run)
    weights = book.decide(lambda: file_sha256(run.weights_file))
    book.check_writable(f"stage-I run folder {run.path} (its top-k files)")
    dev = device()
    model.to(dev).eval()
    root = dataset_root(trained["data_root"])
    rows = []
    splits = split_list(cfg.topk_splits)
    # the stage-I run's missing_images policy (runs of older versions: "error"), on every split at once
    data = step_sets("extract_topk", trained["dataset"], root, trained["categories"],
                     {split: cfg.max_val_queries if split == EVAL_SPLIT else 0 for split in splits},
                     trained.get("missing_images", "error"), run)
    for split in splits:
        sets = data[split]
        if split == "train":
            sets = [mining_subset(s, cfg.mining_queries) for s in sets]
        wanted = [_topk_provenance(cfg, trained, weights, sd) for sd in sets]
        todo = book.decide(lambda: _stale_topks([run.topk_file(split, sd.category) for sd in sets], wanted,
                                                cfg.overwrite))
        if todo:
            # a run trained with a store ranks with it too (its saved config; older runs: none)
            store = stage1_store(model, trained.get("feature_store", ""), [sets[i] for i in todo],
                                 target_ratio=trained["target_ratio"], outputs=cfg.outputs, device=dev)
            _, topks = evaluate_stage1(model, tok, [sets[i] for i in todo], image_size=model.config.vision.image_size,
                                       target_ratio=trained["target_ratio"], k=cfg.topk_k, stage1_run=cfg.stage1_run,
                                       dev=dev, search=cfg.search, store=store)

            def save() -> None:
                for i, tk in zip(todo, topks):
                    made_by = book.record(cfg, [sets[i]], dataset=trained["dataset"], root=root,
                                          preset=trained["preset"], precision="fp32", seed=None,
                                          weights={"stage1": run.weights_file}, first_stage=model.name,
                                          **provenance_of(store))
                    dataclasses.replace(tk, provenance=wanted[i], produced_by=made_by).save(
                        run.topk_file(split, sets[i].category))

            book.write(save)
        for sd in sets:
            path = run.topk_file(split, sd.category)
            tk = match_rows(TopK.load(path, dataset=trained["dataset"], split=split, category=sd.category), sd, path)
            row = {"split": split, "category": sd.category or "-", "queries": tk.num_queries, "K": tk.k}
            if tk.labels is not None:
                ks = [x for x in M.CANDIDATE_RECALL_KS if x <= tk.k]
                row.update({f"cand@{x}": v for x, v in zip(ks, M.candidate_recall_at_k(tk.labels.numpy(), ks).values())})
            rows.append(row)
    report = pd.DataFrame(rows)
    book.write_json(run.candidate_recall_file, lambda: report.to_dict(orient="records"))
    return report


# ----------------------------------------------------------------------------------------------------- stage II


def _topk_fingerprint(path: Path) -> str:
    """What made a top-k file: the hash of its provenance when it records one (the same for every process count),
    else of its bytes (an original file)."""
    provenance = TopK.load(path).provenance
    return config_hash(provenance) if provenance else file_sha256(path)


def _stage2_inputs(cfg: Stage2TrainConfig, val_files: list[Path]) -> dict[str, Any]:
    """The files a stage-II training run depends on, by hash: frozen stage I, validation and mining top-k files."""
    weights = stage1_weights_file(cfg)  # a missing file is reported by the loader, naming what makes it
    inputs: dict[str, Any] = {"stage1_weights_sha256": file_sha256(weights) if weights.exists() else None,
                              "val_topk": {p.name: _topk_fingerprint(p) for p in val_files if p.exists()}}
    if cfg.hard_negatives > 0:
        cats = cdata.get_dataset(cfg.dataset).split_categories(cfg.categories)
        train_files = [cfg.stage1_folder.topk_file("train", c) for c in cats]
        inputs["train_topk"] = {p.name: _topk_fingerprint(p) for p in train_files if p.exists()}
    return inputs


def train_stage2(cfg: Stage2TrainConfig) -> RunSummary:
    """Train the stage-II re-ranker (stage I frozen) into <outputs>/stage2/<stage2_run>/."""
    cfg = resolve(cfg)
    refuse_unsupported(cfg, cfg.dataset, cfg.categories)
    check_feature_store(cfg)
    t0 = time.time()
    run, ident = cfg.stage2_folder, identity(cfg)
    root = data_root(cfg)
    data = step_sets("train_stage2", cfg.dataset, root, cfg.categories,
                     {EVAL_SPLIT: cfg.max_val_queries, **({"train": 0} if cfg.epochs > 0 else {})}, cfg.missing_images,
                     run)
    val_sets = data[EVAL_SPLIT]
    val_files = val_topk_paths(cfg.stage1_folder, cfg.topk_path, val_sets)
    book = StepBook("train_stage2", run)
    inputs = book.decide(lambda: _stage2_inputs(cfg, val_files))
    record = book.finished(ident, overwrite=cfg.overwrite)
    fresh = cfg.overwrite
    if record is not None:
        if book.matching(record, "inputs", inputs) is not None:
            return RunSummary(run.path, record["metrics"], True, 0.0)
        book.say(f"[train_stage2] retraining {run.path}: its stage-I weights or top-k files changed since it finished")
        fresh = True
    if cfg.epochs > 0:
        require_trackers(cfg.trackers)  # an unknown or uninstalled tracker is refused before any training
    seed_everything(cfg.seed)
    dev = device()
    stage1, tok = stage1_for(cfg)
    stage1.to(dev).eval()
    model = build_stage2(cfg, tok, stage1).to(dev)
    val_topks = load_val_topks(val_files, val_sets, cfg.k)
    train_sets = data.get("train", [])
    # the frozen ViTs' tokens of every training and validation image (stage II's, and stage I's for z_t if needed)
    store, zt_store = stage2_stores(stage1, model, cfg.feature_store, [*train_sets, *val_sets],
                                    target_ratio=cfg.target_ratio, outputs=cfg.outputs, device=dev)

    def validate() -> dict[str, float]:
        # stage II alone (fusion weight 0, the original) selects the best epoch: fusion is an evaluation setting
        _, m2, _ = evaluate_stage2(stage1, model, tok, val_sets, val_topks, k=cfg.k, fusion_weight=0.0,
                                   max_pairs=cfg.max_pairs, scoring=cfg.scoring, target_ratio=cfg.target_ratio,
                                   dev=dev, store=store, zt_store=zt_store)
        return m2

    read = {"stage1": stage1_weights_file(cfg),
            "pretrained": abs_path(cfg.pretrained) if cfg.pretrained and cfg.init == "pretrained" else None,
            "init_checkpoint": abs_path(cfg.init_checkpoint) if cfg.init_checkpoint else None}
    topk_read = {p.name: p for p in val_files}
    if cfg.hard_negatives > 0:
        topk_read.update({p.name: p for p in (cfg.stage1_folder.topk_file("train", sd.category) for sd in train_sets)
                          if p.exists()})

    precision = _training_precision(cfg, dev)  # on every process: a bad precision stops them all

    def record(**weights: Any) -> dict[str, Any]:
        return book.record(cfg, [*val_sets, *train_sets], dataset=cfg.dataset, root=root, preset=cfg.preset,
                           precision=precision, seed=cfg.seed, weights={**read, **weights}, inputs=topk_read,
                           **provenance_of(store, zt_store))

    if cfg.epochs > 0 and not fresh:
        refuse_other_config(run.path, _train_config(cfg))  # before config.json changes: a refusal changes nothing
    book.start(ident, record)
    best: dict[str, float] = {}
    epochs_completed = 0
    if cfg.epochs > 0:
        transform = cdata.targetpad_transform(cfg.target_ratio, model.config.vision.image_size)
        dataset = _mined_triplets(train_sets, transform, cfg.stage1_folder, dataset=cfg.dataset,
                                  hard_negatives=cfg.hard_negatives, set_negatives=cfg.set_negatives,
                                  mining_k=cfg.mining_k, seed=cfg.seed, images=store is None)
        task = Stage2Task(model, stage1, tok, dataset, batch_size=cfg.batch_size,
                          hard_negatives=cfg.hard_negatives + cfg.set_negatives,
                          inbatch_negatives=cfg.inbatch_negatives, stage1_train_mode=cfg.stage1_train_mode,
                          zt_from_stage1_vit=model.config.zt_source == "stage1_vit", validate_fn=validate,
                          selection_key="selection", scoring=cfg.scoring, num_workers=cfg.num_workers, device=dev,
                          store=store, zt_store=zt_store)
        result = fit(task, _train_config(cfg), run.path, overwrite=fresh)
        result.load_best_into(model)
        best = result.best_metrics or {}
        epochs_completed = result.epochs_completed
    weights = book.decide(lambda: _save_model(run, model, tok))
    book.write(lambda: run.complete(ident, epochs_completed=epochs_completed, metrics=best, weights_sha256=weights,
                                    inputs=inputs, provenance=record(stage2=run.weights_file)))
    return RunSummary(run.path, best, False, time.time() - t0)


def _mined_triplets(train_sets: list["cdata.SplitData"], transform, stage1_run: RunFolder, *, dataset: str,
                    hard_negatives: int, set_negatives: int, mining_k: int, seed: int, images: bool):
    """Stage II's training triplets of every split, hard negatives mined from stage I's train top-k files."""
    datasets = []
    for sd in train_sets:
        names = None
        if hard_negatives > 0:
            p = stage1_run.topk_file("train", sd.category)
            if not p.exists():
                raise FileNotFoundError(f"hard negatives need {p}: extract top-K with topk_splits including 'train'")
            names = TopK.load(p, dataset=dataset, split="train", category=sd.category, k=mining_k).sorted_index_names
            sd = limit_queries(sd, len(names))  # a top-K mined for the first N queries trains on those
        datasets.append(MinedTripletDataset(sd, transform, names, hard_negatives, seed=seed, n_set=set_negatives,
                                            images=images))
    return datasets[0] if len(datasets) == 1 else _ConcatMined(datasets)


class _ConcatMined(torch.utils.data.ConcatDataset):
    def set_epoch_seed(self, seed: int) -> None:
        for d in self.datasets:
            d.set_epoch_seed(seed)


def trained_config(cfg: EvaluateConfig | SubmissionConfig) -> Stage2TrainConfig:
    """The stage-II run's training config (its config.json): the models, data and preprocessing evaluation uses."""
    return stage2_run_config(cfg.stage2_folder, cfg.outputs)


def stage2_run_config(run: RunFolder, outputs: str) -> Stage2TrainConfig:
    """A stage-II run folder's training config (config.json), its outputs root set to `outputs`."""
    saved = run.saved_config()
    known = {f.name for f in dataclasses.fields(Stage2TrainConfig)}
    unknown = sorted(set(saved) - known)
    if "stage2_run" not in saved and set(saved) <= {f.name for f in dataclasses.fields(Stage1Config)}:
        raise RunFolderError(f"{run.path} is a stage-I run (its {run.config_file.name} is a Stage1Config): give a "
                             "stage-II run (notebook 03's stage2_run) where a re-ranker is asked for")
    if unknown:
        raise RunFolderError(f"{run.config_file}: fields {unknown} are not Stage2TrainConfig fields (a run of an older "
                             "cirlib): retrain it with notebook 03")
    return Stage2TrainConfig(**{**saved, "outputs": outputs})


@dataclass
class Comparison:
    """Stage I vs stage II on the same validation queries."""

    stage1: dict[str, float]
    stage2: dict[str, float]
    k: int
    run_dir: Path
    reused: bool = False  # True when a saved evaluation record made by the same models, file and settings was returned
    query_counts: dict[str, Any] | None = None  # metrics.json's "query_counts": per split evaluated / in split / dropped
    notes: list[str] = dataclasses.field(default_factory=list)  # metrics.json's "notes": what the numbers rest on

    def dropped_line(self) -> str | None:
        """'evaluated on 90 of 100 validation queries; 10 dropped (missing images), listed in <file>', or None when
        nothing was dropped (missing_images="drop" found every image)."""
        counts = (self.query_counts or {}).get(EVAL_SPLIT)
        if not counts or not counts.get("dropped"):
            return None
        listed = f", listed in {self.run_dir / counts['dropped_file']}" if counts.get("dropped_file") else ""
        return (f"evaluated on {counts['evaluated']:,} of {counts['in_split']:,} validation queries; "
                f"{counts['dropped']:,} dropped (missing images){listed}; dropped queries are neither hits nor misses, "
                "so these numbers are not comparable with ones on the full split")

    def print_dropped(self) -> None:
        """Print `dropped_line` when queries were dropped; nothing otherwise (notebook 04, beside the metrics)."""
        line = self.dropped_line()
        if line:
            print(line)

    def table(self) -> pd.DataFrame:
        df = pd.DataFrame({"stage I": self.stage1, "stage II": self.stage2})
        df["gain"] = df["stage II"] - df["stage I"]
        return df.round(2)


def evaluate(cfg: EvaluateConfig) -> Comparison:
    """Re-rank the validation top-K with the trained stage II; write metrics.json and the stage-II label tensors.

    A saved record (metrics.json) is returned instead only when it was made with every same evaluation setting, the
    same top-k files (content hash) and the same stage-I and stage-II weights (hash).
    """
    cfg = resolve(cfg)
    run = cfg.stage2_folder
    trained = trained_config(cfg)
    refuse_unsupported(cfg, trained.dataset, trained.categories)
    load_stage2_run(run)  # refuses an unfinished run before anything is hashed
    root = data_root(trained)
    sets = step_sets("evaluate", trained.dataset, root, trained.categories, {EVAL_SPLIT: cfg.max_val_queries},
                     trained.missing_images, run)[EVAL_SPLIT]
    counts = query_counts(sets, run)
    files = val_topk_paths(trained.stage1_folder, cfg.topk_path or trained.topk_path, sets)
    book = StepBook("evaluate", run)

    def produced_by() -> dict[str, Any]:
        return {"settings": identity(cfg), "stage2_config_hash": config_hash(run.saved_config()),
                "stage1_weights_sha256": file_sha256(stage1_weights_file(trained)),
                "stage2_weights_sha256": file_sha256(run.weights_file),
                "topk_sha256": {str(p): file_sha256(p) for p in files if p.exists()},
                # only when images were dropped (records made from complete data stay valid)
                **({"query_counts": counts} if any(sd.dropped for sd in sets) else {})}

    reused = book.reuse_evaluation(produced_by, overwrite=cfg.overwrite)
    if reused is not None:
        book.on_main(lambda: _warn(reused.get("notes", [])))
        return Comparison(reused["stage1"], reused["stage2"], reused["k"], run.path, reused=True,
                          query_counts=reused.get("query_counts"), notes=reused.get("notes", []))
    book.check_writable(f"stage-II run folder {run.path} (its evaluation files)")
    with book.locked():  # one writer of the run folder
        return _evaluate_and_write(cfg, book, trained, root, sets, counts, files, produced_by)


def _evaluate_and_write(cfg: EvaluateConfig, book: StepBook, trained: Stage2TrainConfig, root: Path, sets, counts,
                        files: list[Path], produced_by) -> Comparison:
    run, dev = book.run, device()
    stage1, tok, stage2 = load_stages(trained, run)
    stage1.to(dev)
    stage2.to(dev)
    topks = load_val_topks(files, sets, cfg.k)
    notes = stage1_change_notes(paths.read_json(run.completion_file, "completion record"), run.completion_file,
                                files, topks, stage1_now=file_sha256(stage1_weights_file(trained)))
    book.on_main(lambda: _warn(notes))
    # a stage-II run trained with stores re-ranks from them (its saved config): reused, or built for this split
    store, zt_store = stage2_stores(stage1, stage2, trained.feature_store, sets, target_ratio=trained.target_ratio,
                                    outputs=cfg.outputs, device=dev)
    made_by = book.on_main(lambda: book.record(
        cfg, sets, dataset=trained.dataset, root=root, preset=trained.preset, precision="fp32", seed=None,
        inputs={p.name: p for p in files}, weights={"stage1": stage1_weights_file(trained), "stage2": run.weights_file},
        stage2_config=identity(trained), **provenance_of(store, zt_store)))
    s1, s2, _ = evaluate_stage2(stage1, stage2, tok, sets, topks, k=cfg.k, fusion_weight=cfg.fusion_weight,
                                max_pairs=cfg.max_pairs, scoring=cfg.scoring, target_ratio=trained.target_ratio,
                                dev=dev, save_to=run, provenance=made_by, store=store, zt_store=zt_store)
    book.write_json(run.evaluation_file, lambda: {
        "stage1": s1, "stage2": s2, "k": cfg.k, "split": EVAL_SPLIT, "fusion_weight": cfg.fusion_weight,
        "scoring": cfg.scoring, "queries": sum(len(s.queries) for s in sets), "query_counts": counts,
        "produced_by": produced_by(), "provenance": made_by, "notes": notes})
    return Comparison(s1, s2, cfg.k, run.path, query_counts=counts, notes=notes)


def _warn(notes: list[str]) -> None:
    """Each note of an evaluation as a warning (shown beside the numbers; also in metrics.json's "notes")."""
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=3)


def submit_cirr(cfg: SubmissionConfig) -> dict[str, Path]:
    """Re-rank the CIRR test1 top-K and write both server files (stage I and stage II), validated before upload.

    Returns {} (and says so) when the stage-II run is not on CIRR: FashionIQ has no test server.
    """
    run = cfg.stage2_folder
    book = StepBook("submit_cirr", run)
    trained = trained_config(cfg)
    ds = cdata.get_dataset(trained.dataset)
    if not ds.has_test_server:
        book.say(f"stage-II run {cfg.stage2_run!r} is on {trained.dataset!r}: test submissions exist for CIRR only")
        return {}
    root = data_root(trained)
    sd = step_sets("submit_cirr", trained.dataset, root, trained.categories, {ds.test_split: 0}, trained.missing_images,
                   run)[ds.test_split][0]
    _refuse_dropped_queries(sd, run, root)
    dev = device()
    stage1, tok, stage2 = load_stages(trained, run)
    stage1.to(dev).eval()
    stage2.to(dev).eval()
    p = trained.stage1_folder.topk_file(sd.split)
    tk = _test_topk(p, trained.dataset, sd)
    transform = cdata.targetpad_transform(trained.target_ratio, stage2.config.vision.image_size)
    # a stage-II run trained with stores re-ranks from them (its saved config), as its evaluation did
    store, zt_store = stage2_stores(stage1, stage2, trained.feature_store, [sd], target_ratio=trained.target_ratio,
                                    outputs=cfg.outputs, device=dev)
    gallery, zt_gallery = rerank_galleries(stage1, stage2, sd, transform, store, zt_store, dev)
    scored = rerank(stage1, stage2, tok, sd, tk, gallery, k=min(cfg.k, tk.k), fusion_weight=cfg.fusion_weight,
                    zt_gallery=zt_gallery, max_pairs=cfg.max_pairs, scoring=cfg.scoring, device=dev)
    res = scored.reranked(cfg.fusion_weight)
    # Stage II re-orders the first k; the rest of the 50 keep their stage-I order (k = 50 is the original).
    stage2_lists = scored.reranked_then_rest(tk, cfg.fusion_weight, SUBMISSION_LENGTH)
    lists = {
        "stage1": (f"{cfg.submission_name}_stage1", tk.sorted_index_names[:, :SUBMISSION_LENGTH], tk.group_names[:, :3]),
        "stage2": (cfg.submission_name, stage2_lists, res.group_names[:, :3]),
    }

    def write() -> dict[str, Path]:
        written = write_submissions(sd, lists, run.submission_dir)
        # the server's files hold the server's format only: what produced them goes in a sidecar beside the folder
        made_by = book.record(cfg, [sd], dataset=trained.dataset, root=root, preset=trained.preset, precision="fp32",
                              seed=None, inputs={p.name: p},
                              weights={"stage1": stage1_weights_file(trained), "stage2": run.weights_file},
                              stage2_config=identity(trained), **provenance_of(store))
        paths.write_json(run.submission_provenance_file(cfg.submission_name), {
            "files": {label: {"file": f"{run.submission_dir.name}/{path.name}", "sha256": file_sha256(path)}
                      for label, path in written.items()},
            "provenance": made_by})
        return written

    # The main process writes and checks the files; the others learn where they are.
    return book.write(write, share=True)


def _refuse_dropped_queries(sd: "cdata.SplitData", run: RunFolder, root: Path) -> None:
    """Refuse a test split whose queries were dropped for missing images: the server scores every pair id."""
    if sd.dropped is not None:
        d = sd.dropped
        raise cdata.DatasetError(
            f"refusing to write a CIRR test submission: {len(d.missing):,} test1 images are missing, so "
            f"{len(d.queries):,} of {d.queries_before:,} test1 queries were dropped (missing_images=\"drop\"; listed "
            f"in {run.dropped_queries_file}). The server scores every pair id, and no honest answer exists for a "
            "dropped query: without its reference image there is no query to encode, and without one of its img_set "
            "members the set cannot be ranked. Restore the images (`python -m cirlib.data check --dataset cirr "
            f"{root}` lists them), extract the test1 top-K again (notebook 02) and submit then.")


def _test_topk(p: Path, dataset: str, sd: "cdata.SplitData") -> TopK:
    """The test split's stage-I top-k file at `p`, checked: its rows are `sd`'s queries, with enough candidates."""
    if not p.exists():
        raise FileNotFoundError(f"no test1 top-k file at {p}: extract it with topk_splits including 'test1'")
    tk = match_rows(TopK.load(p, dataset=dataset, split=sd.split, index_names=sd.gallery), sd, p)
    if tk.k < SUBMISSION_LENGTH:
        raise ValueError(f"the test1 top-k file {p} holds {tk.k} candidates; the server needs "
                         f"{SUBMISSION_LENGTH} per query: extract it with topk_k >= {SUBMISSION_LENGTH}")
    return tk


def write_submissions(sd: "cdata.SplitData", lists: dict[str, tuple[str, np.ndarray, np.ndarray]],
                      out_dir: Path) -> dict[str, Path]:
    """Write the test server's files of each list set into `out_dir`, each checked by the dataset's
    `check_submission` after it is written (an error names the file and the problem).

    Args:
        sd: the test split (every query, in caption-file order).
        lists: {label: (submission name, (N, 50) names best first, (N, 3) subset names best first)}.

    Returns:
        {"<label>_recall": path, "<label>_subset": path} per label.
    """
    ds = cdata.get_dataset(sd)
    written: dict[str, Path] = {}
    for label, (name, recall_lists, subset_lists) in lists.items():
        files = ds.submission_files(sd, recall_lists.tolist(), subset_lists.tolist(), name)
        # The server's exact text (no indent, so not paths.write_json), written atomically.
        pr, ps = (paths.atomic_write_text(out_dir / f.file_name, f.text()) for f in files)
        for path in (pr, ps):
            ds.check_submission(path, sd)
        written[f"{label}_recall"], written[f"{label}_subset"] = pr, ps
    return written
