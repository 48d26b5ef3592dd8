"""Run configurations: one frozen dataclass per notebook.

Defaults live here and only here; each notebook's `parameters` cell repeats the field names as plain literals (a test
keeps them in step), and `from_namespace` builds the config from the notebook's globals. Defaults are the original's
paper settings where one exists (section 1 of the original-system reference); `smoke=True` shrinks a run to seconds.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

from cirlib.models.rerankers import RERANKERS
from cirlib.run_folder import RunFolder
from cirlib.workbook.published import resolve_run



def check_dataset_field(cfg: Any) -> None:
    """Refuse a config whose `dataset` is not a registered dataset (`cirlib.data.DATASETS`; plugins are looked up
    first), naming the config, the value and the known names. The categories are the dataset class's."""
    from cirlib.data.dataset import get_dataset  # imports torch: only when a config is built
    from cirlib.data.readers import DatasetError

    try:
        get_dataset(cfg.dataset)
    except DatasetError as err:
        raise ValueError(f"{type(cfg).__name__}(dataset={cfg.dataset!r}): {err}") from None


@dataclass(frozen=True)
class DataConfig:
    """Data preview (notebook 00)."""

    dataset: str = "cirr"  # "cirr" | "fashioniq"
    data_root: str = ""  # dataset root (the cirr_dataset / fashionIQ_dataset folder); "" = $CIR_DATA
    split: str = "val"  # CIRR: train | val | test1; FashionIQ: train | val | test
    category: str = "dress"  # FashionIQ category (ignored for CIRR)
    missing_images: str = "error"  # "error": stop before training, listing every missing image | "drop": leave out queries whose images are missing (counts recorded)
    n_examples: int = 4  # triplets shown
    check_images: bool = True  # check the whole download first: every split's annotation files and images (as `python -m cirlib.data check`; minutes on real data)
    image_size: int = 384  # preprocessing output side in pixels
    seed: int = 0  # which examples are drawn
    smoke: bool = False  # tiny fast run (tests)

    def __post_init__(self) -> None:
        check_dataset_field(self)


@dataclass(frozen=True)
class Stage1Config:
    """Stage I training (notebook 01): the run's own final validation is part of it."""

    stage1_run: str = "stage1"  # run folder: <outputs>/stage1/<stage1_run>/
    dataset: str = "cirr"  # "cirr" | "fashioniq"
    data_root: str = ""  # dataset root; "" = $CIR_DATA
    categories: str = "dress,shirt,toptee"  # FashionIQ categories, comma-separated (ignored for CIRR)
    missing_images: str = "error"  # "error": stop before training, listing every missing image | "drop": leave out queries whose images are missing (counts recorded)
    tokenizer: str = ""  # vocab.txt or local bert-base-uncased folder; "" = <data_root>/vocab.txt
    preset: str = "blip-base"  # model preset: "blip-base" | "tiny" | "sprc-g" | "sprc-tiny" (SPRC's BLIP-2 first stage)
    pretrained: str = ""  # BLIP pre-trained file (model_base.pth; LAVIS's BLIP-2 file for sprc-*); "" = random initialisation
    init_checkpoint: str = ""  # an original stage-I checkpoint (BLIP_Retrieval .pt; SPRC's .pt for sprc-*) or our run folder to start from
    train_image_encoder: bool = False  # the original freezes the ViT; a world with no pre-trained ViT must train it
    feature_store: str = ""  # "" = off (images decoded and encoded every step, the original) | "float32" | "float16": read the frozen ViT's outputs from a store under <outputs>/features/ (built once; needs train_image_encoder=False)
    symmetric_loss: bool = False  # add the target-to-query direction to the in-batch loss (original: query-to-target only)
    epochs: int = 20  # training epochs (0 = evaluate only)
    max_epoch: int = 20  # cosine period in epochs (original: 20 FashionIQ, 10 CIRR); onecycle: the cycle's length, at least epochs (SPRC: 80 CIRR, its 30 epochs FashionIQ)
    schedule: str = "cosine_per_epoch"  # "cosine_per_epoch" (original, rises past max_epoch) | "cosine_per_epoch_clamped" | "cosine_per_step" | "onecycle" (SPRC's: torch's OneCycleLR over max_epoch epochs)
    warmup_steps: int = 0  # linear warm-up steps (cosine_per_step only)
    onecycle_pct_start: float = 0.3  # onecycle only: share of the cycle rising to lr (torch's default 0.3; SPRC: 0.02 CIRR, 1.5/epochs FashionIQ)
    onecycle_div_factor: float = 25.0  # onecycle only: the cycle starts at lr / div_factor (SPRC: 25 CIRR, 100 FashionIQ)
    onecycle_final_div_factor: float = 10000.0  # onecycle only: and ends at lr / (div_factor x final_div_factor) (torch's and SPRC's 1e4)
    onecycle_momentum: bool = True  # onecycle only: AdamW's beta1 cycles 0.95 -> 0.85 -> 0.95 against the lr, as torch and SPRC do (false: beta1 stays 0.9)
    lr: float = 2e-5  # peak AdamW learning rate
    weight_decay: float = 0.05  # AdamW weight decay
    adam_beta2: float = 0.999  # AdamW beta2 (original: torch's 0.999; SPRC: 0.98)
    adam_eps: float = 1e-8  # AdamW epsilon (original: torch's 1e-8; SPRC: 1e-7)
    loss_weights: str = ""  # the first stage's auxiliary loss weights "name:value,..." ("" = its defaults; SPRC: "rtc:0.4,align:0.4" CIRR, the default, "rtc:1,align:1" FashionIQ; BLIP has none)
    max_grad_norm: float = 0.0  # clip the global gradient norm to this (0 = off, the original)
    batch_size: int = 512  # training triplets per optimiser step and process (several processes: global batch is processes x batch_size)
    grad_accumulation_steps: int = 1  # micro-batches per optimiser step
    precision: str = "auto"  # "auto" (bf16/fp16 on GPU, fp32 on CPU) | "fp32" | "bf16" | "fp16"
    gradient_checkpointing: bool = False  # recompute text-encoder activations in the backward pass (less memory, ~30% slower steps)
    validate_every: int = 1  # epochs between validations (0 = never; the final evaluation still runs)
    time_budget_s: float = 0.0  # stop training after this many seconds (0 = no limit)
    max_steps_per_epoch: int = 0  # cap optimiser steps per epoch (0 = all)
    max_val_queries: int = 0  # cap validation queries (0 = all)
    search: str = "exact"  # validation gallery search: "exact" (one query x gallery product, full ranks) | "faiss" (a FAISS index; pip install -e '.[faiss]')
    target_ratio: float = 1.25  # TargetPad aspect-ratio threshold
    num_workers: int = 0  # DataLoader workers
    trackers: str = "tensorboard"  # where training curves go besides metrics.jsonl: "tensorboard" (event files in <run>/tensorboard/; `tensorboard --logdir outputs/`), "wandb" (pip install -e '.[wandb]'), "comet_ml" (pip install -e '.[comet]'), comma-separated, or "none"
    seed: int = 0  # python/numpy/torch seed
    overwrite: bool = False  # retrain even when the run finished with this config
    smoke: bool = False  # tiny fast run: 1 epoch of 2 steps, few validation queries
    outputs: str = ""  # outputs root holding the run folders ("" = <repo>/outputs; relative = from the repository)

    def __post_init__(self) -> None:
        check_dataset_field(self)

    @property
    def stage1_folder(self) -> RunFolder:
        return resolve_run("stage1", self.stage1_run, self.outputs)


@dataclass(frozen=True)
class TopKConfig:
    """Stage-I top-K extraction (notebook 02). Dataset, data root, categories and preprocessing are the stage-I run's
    (its config.json): the files rank the gallery the run was trained and validated on."""

    stage1_run: str = "stage1"  # stage-I run under <outputs>/stage1/ (its model; the top-k files are written there), or hf:<repo id> / an exported folder
    topk_k: int = 200  # candidates per query written to the top-k file
    topk_splits: str = "val"  # splits to extract top-K for, comma-separated (add "train" to mine stage-II negatives, "test1" for CIRR submissions)
    search: str = "exact"  # gallery search: "exact" (one query x gallery product) | "faiss" (a FAISS index, for galleries too big for that product)
    mining_queries: int = 0  # train top-K for the first N train queries only (0 = all, full gallery): CIRR ranks them among their img_set images, FashionIQ (no img_sets) in the full category gallery
    max_val_queries: int = 0  # val top-K for the first N validation queries only (0 = all)
    overwrite: bool = False  # re-extract even when a file made by these weights and settings exists
    smoke: bool = False  # tiny fast run: few validation queries
    outputs: str = ""  # outputs root holding the run folders ("" = <repo>/outputs)

    @property
    def stage1_folder(self) -> RunFolder:
        return resolve_run("stage1", self.stage1_run, self.outputs)


@dataclass(frozen=True)
class Stage2TrainConfig:
    """Stage II training (notebook 03), with the validation (re-ranking the top k) that selects its best epoch."""

    stage2_run: str = "stage2"  # run folder: <outputs>/stage2/<stage2_run>/
    stage1_run: str = "stage1"  # stage-I run under <outputs>/stage1/ (its model and top-k files), or hf:<repo id> / an exported folder
    stage1_checkpoint: str = ""  # or an original stage-I checkpoint file (BLIP_Retrieval; SPRC's .pt with stage1_preset sprc-g); overrides stage1_run's model
    stage1_preset: str = ""  # with stage1_checkpoint: the first stage's model preset, which names it (empty: preset; sprc-g for SPRC)
    topk_path: str = ""  # validation top-k file to re-rank ("" = the stage-I run's); original files accepted
    dataset: str = "cirr"  # "cirr" | "fashioniq"
    data_root: str = ""  # dataset root; "" = $CIR_DATA
    categories: str = "dress,shirt,toptee"  # FashionIQ categories, comma-separated (ignored for CIRR)
    missing_images: str = "error"  # "error": stop before training, listing every missing image | "drop": leave out queries whose images are missing (counts recorded)
    tokenizer: str = ""  # with stage1_checkpoint: vocab.txt or bert-base-uncased folder ("" = <data_root>/vocab.txt); else the stage-I run's
    preset: str = "blip-base"  # model preset: "blip-base" | "tiny"
    reranker: str = "dual"  # a registered re-ranker: dual (the original's dual stream) | joint (text over [reference; candidate] tokens) | ... (a plugin's)
    joint_difference: bool = False  # joint re-ranker: also attend to (candidate - reference) tokens, per pair (needs scoring "pairs")
    init: str = "pretrained"  # text encoder init: "pretrained" (BLIP file) | "scratch" | "stage1" (copy stage-I text encoder)
    pretrained: str = ""  # BLIP pre-trained file (model_base.pth) for init="pretrained"
    init_checkpoint: str = ""  # an original stage-II checkpoint (BLIP_NLVR .pt) or our run folder to start from
    vision_from_stage1: bool = True  # stage-II ViT weights copied from stage I (equal to BLIP's with real weights)
    k: int = 50  # candidates re-ranked per validation query (original: 100 FashionIQ, 50 CIRR)
    hard_negatives: int = 0  # negatives per query drawn from its stage-I train top-K (original: 0)
    set_negatives: int = 0  # negatives per query drawn from its own CIRR img_set, the target's near-duplicates (CIRR only; original: 0)
    inbatch_negatives: int = -1  # other targets of the global batch (all processes) used as negatives (-1 = all B-1, the original)
    mining_k: int = 50  # top-K of the train split from which hard negatives are drawn
    stage1_train_mode: bool = False  # original: True (dropout on z_t and drop-path in the frozen ViTs while training)
    feature_store: str = ""  # "" = off (images decoded and encoded every step, the original) | "float32" | "float16": read the frozen ViTs' tokens from stores under <outputs>/features/ (needs stage1_train_mode=False: a store holds eval-mode outputs)
    epochs: int = 50  # training epochs (0 = no training: the initialised model is saved)
    max_epoch: int = 50  # cosine period in epochs (original: 50 FashionIQ, 80 CIRR)
    schedule: str = "cosine_per_epoch"  # see Stage1Config.schedule
    warmup_steps: int = 0  # linear warm-up steps (cosine_per_step only)
    lr: float = 2e-5  # peak AdamW learning rate
    weight_decay: float = 0.05  # AdamW weight decay
    max_grad_norm: float = 0.0  # clip the global gradient norm to this (0 = off, the original)
    batch_size: int = 16  # queries per optimiser step and process (several processes: global batch is processes x batch_size)
    grad_accumulation_steps: int = 1  # micro-batches per optimiser step
    precision: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16"
    gradient_checkpointing: bool = False  # recompute text-encoder activations in the backward pass (less memory, ~30% slower steps)
    validate_every: int = 1  # epochs between validations (0 = never)
    time_budget_s: float = 0.0  # stop training after this many seconds (0 = no limit)
    max_steps_per_epoch: int = 0  # cap optimiser steps per epoch (0 = all)
    max_val_queries: int = 0  # cap validation queries (0 = all)
    max_pairs: int = 512  # (query, candidate) pairs scored per chunk at validation (bounds activation memory)
    scoring: str = "shared"  # "shared": candidate keys/values computed once per image (fast at blip-base) | "pairs": one pass per pair (the original; faster for tiny models)
    target_ratio: float = 1.25  # TargetPad aspect-ratio threshold
    num_workers: int = 0  # DataLoader workers
    trackers: str = "tensorboard"  # where training curves go besides metrics.jsonl: "tensorboard" (event files in <run>/tensorboard/; `tensorboard --logdir outputs/`), "wandb" (pip install -e '.[wandb]'), "comet_ml" (pip install -e '.[comet]'), comma-separated, or "none"
    seed: int = 0  # python/numpy/torch seed
    overwrite: bool = False  # retrain even when the run finished with this config and these inputs
    smoke: bool = False  # tiny fast run: 1 epoch of 2 steps, few validation queries
    outputs: str = ""  # outputs root holding the run folders ("" = <repo>/outputs)

    def __post_init__(self) -> None:
        check_dataset_field(self)
        RERANKERS.get(self.reranker)  # an unknown name: the registry's error, listing the known ones

    @property
    def stage1_folder(self) -> RunFolder:
        return resolve_run("stage1", self.stage1_run, self.outputs)

    @property
    def stage2_folder(self) -> RunFolder:
        return resolve_run("stage2", self.stage2_run, self.outputs)


@dataclass(frozen=True)
class EvaluateConfig:
    """Stage I vs stage II on the validation split (notebook 04). The models, data and preprocessing are the stage-II
    run's (its config.json); only what evaluation itself decides is here, so changing it never retrains."""

    stage2_run: str = "stage2"  # stage-II run under <outputs>/stage2/ (it names its stage-I run and data), or hf:<repo id> / an exported folder (python -m cirlib.hub export; data from $CIR_DATA)
    topk_path: str = ""  # validation top-k file to re-rank ("" = the one the stage-II run validated on); original files accepted
    k: int = 50  # candidates re-ranked per query (original: 100 FashionIQ, 50 CIRR)
    fusion_weight: float = 0.0  # final score = w * z(stage-I score) + (1 - w) * z(stage-II score), rows z-scored (0 = stage II alone, the original)
    scoring: str = "shared"  # "shared" (candidate keys/values once per image) | "pairs" (one pass per pair, the original)
    max_pairs: int = 512  # (query, candidate) pairs scored per chunk (bounds activation memory)
    max_val_queries: int = 0  # evaluate the first N validation queries only (0 = all)
    overwrite: bool = False  # re-evaluate even when a record made by these models, top-k file and settings exists
    smoke: bool = False  # tiny fast run: few validation queries
    outputs: str = ""  # outputs root holding the run folders ("" = <repo>/outputs)

    @property
    def stage2_folder(self) -> RunFolder:
        return resolve_run("stage2", self.stage2_run, self.outputs)


@dataclass(frozen=True)
class SubmissionConfig:
    """CIRR test-server files (notebook 05); the models and data are the stage-II run's (its config.json)."""

    stage2_run: str = "stage2"  # stage-II run under <outputs>/stage2/ (the files go to its submission/ folder), or hf:<repo id> / an exported folder
    k: int = 50  # candidates re-ranked per query; the rest of the 50 names keep their stage-I order
    fusion_weight: float = 0.0  # see EvaluateConfig.fusion_weight
    scoring: str = "shared"  # "shared" | "pairs" (see EvaluateConfig.scoring)
    max_pairs: int = 512  # (query, candidate) pairs scored per chunk
    submission_name: str = "stage2"  # file suffix: recall_submission_<name>.json (stage II), <name>_stage1 (stage I)
    outputs: str = ""  # outputs root holding the run folders ("" = <repo>/outputs)

    @property
    def stage2_folder(self) -> RunFolder:
        return resolve_run("stage2", self.stage2_run, self.outputs)


@dataclass(frozen=True)
class AnalysisConfig:
    """Figures (notebook 06) and the interactive explorer (07); they read saved artifacts only."""

    stage1_run: str = "stage1"  # stage-I run under outputs/stage1/
    stage2_run: str = "stage2"  # stage-II run under outputs/stage2/
    dataset: str = "cirr"  # "cirr" | "fashioniq"
    data_root: str = ""  # dataset root (qualitative grids, explorer); "" = $CIR_DATA
    original_dir: str = ""  # folder with the original's label tensors / top-200 files to plot instead ("" = ours)
    figures_dir: str = ""  # where figures go ("" = <repo>/figures)
    n_qualitative: int = 4  # rows in the qualitative grid
    seed: int = 0  # which queries the qualitative grid shows
    smoke: bool = False  # tiny fast run (tests)
    outputs: str = ""  # outputs root holding the run folders ("" = <repo>/outputs)

    def __post_init__(self) -> None:
        check_dataset_field(self)


@dataclass(frozen=True)
class ExplorerConfig:
    """The interactive explorer (notebook 07): the re-ranked files of an evaluation (notebook 04) and the images."""

    stage1_run: str = "stage1"  # stage-I run the stage-II run re-ranks (checked against the re-ranked files)
    stage2_run: str = "stage2"  # stage-II run under <outputs>/stage2/ (its reranked_val*.pt files)
    dataset: str = "cirr"  # "cirr" | "fashioniq"
    data_root: str = ""  # dataset root (the images shown); "" = $CIR_DATA
    outputs: str = ""  # outputs root holding the run folders ("" = <repo>/outputs)

    def __post_init__(self) -> None:
        check_dataset_field(self)


@dataclass(frozen=True)
class SearchConfig:
    """Search a folder of images with both stages (notebook 08): the folder's gallery index (built or updated here),
    then a reference image and a text ranked by stage I and re-ranked by stage II."""

    image_dir: str = "outputs/synthetic/cirr/dev"  # folder of images searched, recursively (jpg, jpeg, png, webp; relative: from the repository)
    stage1_run: str = "demo_stage1"  # stage-I run under <outputs>/stage1/, a run folder's path, or an original checkpoint file
    stage2_run: str = "demo_stage2"  # stage-II run under <outputs>/stage2/ ("": stage I only)
    index: str = "outputs/search/demo_dev"  # the index folder (built when missing, updated when the folder or stage I changed)
    reference: str = "dev-0-0-img1.png"  # the default search's reference: a name in the index (path under image_dir) or an image file ("": the first indexed image)
    text: str = "the cyan square should be gone"  # the default search's modification text
    k: int = 50  # stage-I candidates re-ranked by stage II
    top: int = 10  # results listed per stage
    exclude_reference: bool = True  # keep a reference that is in the gallery out of its own results (CIRR-style)
    search: str = "exact"  # "exact" (one query x gallery product) | "faiss" (a FAISS index, for large galleries)
    batch_size: int = 32  # images per encoder batch
    outputs: str = ""  # outputs root holding the run folders ("" = <repo>/outputs)


@dataclass(frozen=True)
class CircoConfig:
    """CIRCO (notebook 09): a stage I and stage II (CIRR-trained: zero-shot transfer) ranking CIRCO's gallery through
    a gallery index; val: mAP@5/10/25/50, Recall@5/10/25/50 and semantic mAP@10 of both stages; test: the
    test-server files of both stages, checked before they are written."""

    circo_root: str = ""  # CIRCO root (annotations/, COCO2017_unlabeled/); "" = $CIR_DATA; relative: from the repository
    stage1_run: str = "stage1"  # stage-I run under <outputs>/stage1/ (or a run folder's path): ranks the whole gallery
    stage2_run: str = "stage2"  # stage-II run under <outputs>/stage2/ re-ranking stage I's top k ("": stage I only); the results go to its circo/ folder (else the stage-I run's)
    index: str = ""  # gallery index folder ("": <outputs>/search/<CIRCO root folder name>_<stage1_run>); built once, then updated incrementally
    splits: str = "val,test"  # "val": metrics of both stages | "test": the test-server files of both stages (comma-separated)
    k: int = 50  # stage-I candidates re-ranked by stage II; the lists are 50 long (past k they keep stage I's order)
    use_shared_concept: bool = False  # query text "<shared_concept>, <relative_caption>" (False: the caption alone, as most methods)
    exclude_reference: bool = True  # keep each query's reference out of its results (CIRCO's reference is never a ground truth)
    missing_images: str = "error"  # "error": stop, listing every missing image | "drop": leave out the images and the queries that name them (counted; a test file then cannot be complete)
    max_val_queries: int = 0  # evaluate the first N val queries only (0 = all; test always takes all)
    search: str = "exact"  # "exact" (one query x gallery product) | "faiss" (a FAISS index, for the 123k-image gallery)
    batch_size: int = 32  # images per encoder batch (index build, references, candidates)
    result_name: str = "circo"  # file names: circo/metrics_<name>.json, circo/<split>_<name>_<stage>.json
    outputs: str = ""  # outputs root holding the run folders ("" = <repo>/outputs)


@dataclass(frozen=True)
class RerankConfig:
    """Re-rank another system's candidates (notebook 10): an imported ranked list of one split re-ranked by a stage-II
    run, imported vs re-ranked metrics and where the gain comes from. Dataset, data root, categories and models are
    the stage-II run's (its config.json); `data_root` and `categories` override them."""

    candidates: str = ""  # the ranked-list file to re-rank ("": the stage-II run's stage-I val top-k file); FashionIQ top-k files: write {category} where the category goes
    format: str = "auto"  # "auto" (from the file) | "cirr" | "circo" | "trec" | "topk" | "jsonl"
    stage2_run: str = "stage2"  # stage-II run under <outputs>/stage2/, or a run folder's path
    split: str = "val"  # the split the candidates rank (validation splits get metrics; test splits a server file)
    k: int = 50  # candidates re-ranked per query (the first k of each imported list)
    fusion_weight: float = 0.0  # final score: w * z(imported score) + (1 - w) * z(stage-II score), rows z-scored (0: stage II alone; > 0 needs imported scores)
    fusion_sweep: str = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1"  # weights of the fusion sweep, comma-separated, when the file has scores ("": no sweep)
    missing_queries: str = "error"  # "error": stop, naming the split's queries missing from the file | "drop": leave them out (counted)
    dataset: str = ""  # the dataset the candidates rank ("": the stage-II run's; "circo": CIRCO, ranked through a gallery index by a CIRR-trained run)
    data_root: str = ""  # dataset root ("": the stage-II run's; CIRCO: its root)
    index: str = ""  # CIRCO's gallery index folder ("": <outputs>/search/<CIRCO root folder name>_<the run's stage-I run>, notebook 09's)
    categories: str = ""  # FashionIQ categories, comma-separated ("": the stage-II run's)
    scoring: str = "shared"  # "shared" (candidate keys/values once per image) | "pairs" (one pass per pair, the original)
    max_pairs: int = 512  # (query, candidate) pairs scored per chunk (bounds activation memory)
    max_val_queries: int = 0  # re-rank the first N validation queries only (0: all)
    name: str = ""  # result folder <outputs>/rerank/<name>/ ("": <stage2_run>_<split>_<candidate file stem>)
    out: str = ""  # result folder path, instead of <outputs>/rerank/<name>/
    overwrite: bool = False  # re-rank even when a record made by these models, candidates and settings exists
    smoke: bool = False  # tiny fast run: few validation queries
    outputs: str = ""  # outputs root holding the run folders ("": <repo>/outputs)


TABLE_FORMATS = ("md", "latex", "csv")  # what TablesConfig.formats may name (or "all")


@dataclass(frozen=True)
class TablesConfig:
    """The paper's tables (notebook 11): every finished run's metrics under `outputs`, stage I beside stage II, with
    published results for comparison; written next to the figures. Reads result files only, never a model."""

    runs: str = ""  # run folders to table, comma-separated names under <outputs>/stage1 or stage2 ("" = every finished run)
    formats: str = "md,latex,csv"  # files written: "md" (Markdown), "latex" (booktabs), "csv", comma-separated, or "all"
    published: str = ""  # published results printed beside ours ("" = the packaged cirlib/workbook/published_results.yaml; "none" = none)
    figures_dir: str = ""  # where the tables go, next to the figures ("" = <repo>/figures)
    outputs: str = ""  # outputs root holding the run folders ("" = <repo>/outputs)

    def __post_init__(self) -> None:
        chosen = split_list(self.formats)
        if self.formats.strip() != "all" and (not chosen or set(chosen) - set(TABLE_FORMATS)):
            raise ValueError(f"TablesConfig(formats={self.formats!r}): expected some of {', '.join(TABLE_FORMATS)} "
                             "(comma-separated) or all")


C = TypeVar("C")

# The config each numbered notebook mirrors (its parameters cell and its `from_namespace(<Config>, globals())` line);
# `cirlib.launch` builds a step's config from this table and the YAML, without the notebook files.
NOTEBOOK_CONFIGS: dict[str, type] = {
    "00_data_preview": DataConfig,
    "01_stage1_train": Stage1Config,
    "02_stage1_topk": TopKConfig,
    "03_stage2_train": Stage2TrainConfig,
    "04_stage2_evaluate": EvaluateConfig,
    "05_cirr_submission": SubmissionConfig,
    "06_figures": AnalysisConfig,
    "07_explorer": ExplorerConfig,
    "08_search": SearchConfig,
    "09_circo": CircoConfig,
    "10_rerank_any": RerankConfig,
    "11_tables": TablesConfig,
}
CONFIGS: tuple[type, ...] = tuple(dict.fromkeys(NOTEBOOK_CONFIGS.values()))

# Parameter names of earlier versions and what replaced them (a YAML still using one gets an error saying so).
RENAMED = {
    "run_name": "stage1_run (the stage-I run) or stage2_run (the stage-II run)",
    "run_name_stage1": "stage1_run",
    "run_name_stage2": "stage2_run",
}

# Fields that say how to run, not what a run is: a run finished with overwrite=True, written under another outputs
# root, or logged to other experiment trackers, is the same run (changing `trackers` never retrains); gradient
# checkpointing changes memory and speed, not the losses or gradients.
NOT_IDENTITY = ("overwrite", "outputs", "trackers", "gradient_checkpointing")


def identity(cfg: Any) -> dict[str, Any]:
    """The fields that define what a run or artifact is (all but NOT_IDENTITY), as its completion record holds them."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IDENTITY}


def from_namespace(cls: type[C], namespace: Mapping[str, Any]) -> C:
    """Build a config from a notebook's globals: every field must be present; nothing is guessed.

    Args:
        cls: the config dataclass.
        namespace: usually `globals()` of a notebook after its parameters cell (and papermill's injected cell).
    Raises:
        ValueError: listing the missing field names.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in namespace]
    if missing:
        raise ValueError(f"{cls.__name__}: the parameters cell does not define {missing}")
    return cls(**{n: namespace[n] for n in names})


def to_json(cfg: Any) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)


def split_list(text: str) -> list[str]:
    """'a, b' -> ['a', 'b'] (comma-separated config fields)."""
    return [t.strip() for t in text.split(",") if t.strip()]
