"""Model and data builders of the workbook steps: presets sized to the tokenizer, the two stages' initialisations, the
saved runs' models, the dataset root and tokenizer a config names."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from cirlib import data as cdata
from cirlib import distributed as dist
from cirlib import paths
from cirlib.data.tokenizer import build_tokenizer
from cirlib.models import factory, loading
from cirlib.models.first_stage import FirstStage, require_blip_zt
from cirlib.models.config import ModelConfig, preset
from cirlib.models.stage2 import Stage2Model
from cirlib.run_folder import RunFolder, RunFolderError
from cirlib.workbook.config import Stage1Config, Stage2TrainConfig


def device() -> torch.device:
    """This process's device: its own GPU under a multi-process launch, else CUDA when available, else the CPU."""
    return dist.device()


def abs_path(p: str) -> Path:
    """A path from a config: `~` expanded, relative paths anchored at the repository (never the working directory)."""
    path = Path(p).expanduser()
    return path if path.is_absolute() else paths.REPO_ROOT / path


def dataset_root(text: str) -> Path:
    """A `data_root` setting resolved (else $CIR_DATA); an error names both when the folder is missing."""
    root = paths.data_root(text or None)
    if not root.is_dir():
        raise cdata.DatasetError(f"dataset root {root} does not exist (data_root={text!r}, "
                                 f"${paths.DATA_ENV_VAR}={os.environ.get(paths.DATA_ENV_VAR)!r})")
    return root


def data_root(cfg: Any) -> Path:
    """The dataset root a config names (its `data_root`, else $CIR_DATA)."""
    return dataset_root(cfg.data_root)


def tokenizer_for(cfg: Any, root: Path):
    """The tokenizer a config names (`tokenizer`, else <data_root>/vocab.txt)."""
    path = abs_path(cfg.tokenizer) if cfg.tokenizer else root / "vocab.txt"
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer not found at {path}: set tokenizer= to a vocab.txt or a local bert-base-uncased folder "
            "(the synthetic world writes <data_root>/vocab.txt)")
    return build_tokenizer(path)


def build_stage1(cfg: Stage1Config, tokenizer) -> FirstStage:
    """A stage-I model as `cfg` names it (preset, pre-trained file, checkpoint to start from, loss weights)."""
    model = factory.build_stage1(cfg.preset, tokenizer.vocab_size,
                                 pretrained=abs_path(cfg.pretrained) if cfg.pretrained else None,
                                 init_checkpoint=abs_path(cfg.init_checkpoint) if cfg.init_checkpoint else None)
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)
    model.set_loss_weights(parse_loss_weights(cfg.loss_weights))
    return model


def parse_loss_weights(text: str) -> dict[str, float]:
    """`loss_weights` ("rtc:0.4,align:0.4"; "" = none) as {name: weight}; ValueError naming the bad item."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition(":")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"loss_weights={text!r}: {item!r} is not name:number (e.g. 'rtc:0.4,align:0.4')")
    return weights


def build_stage2(cfg: Stage2TrainConfig, tokenizer, stage1: FirstStage | None) -> Stage2Model:
    """A stage-II model as `cfg` names it: preset + architecture, then its initialisation (BLIP file, scratch, or a
    copy of stage I's text encoder), stage I's ViT when `vision_from_stage1`, and a checkpoint to start from."""
    if cfg.joint_difference and cfg.scoring != "pairs":
        raise ValueError("joint_difference=True scores (candidate - reference) tokens per pair: set scoring='pairs'")
    model = factory.build_stage2(
        cfg.preset, tokenizer.vocab_size, reranker=cfg.reranker, joint_difference=cfg.joint_difference,
        init=cfg.init, pretrained=abs_path(cfg.pretrained) if cfg.pretrained else None, stage1=stage1,
        vision_from_stage1=cfg.vision_from_stage1 and stage1 is not None,
        init_checkpoint=abs_path(cfg.init_checkpoint) if cfg.init_checkpoint else None)
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)
    return model


def _folder(run: RunFolder | str | os.PathLike) -> RunFolder:
    return run if isinstance(run, RunFolder) else RunFolder.at(run)


def finished_model_dir(run: RunFolder, made_by: str) -> Path:
    """The model folder of a run that finished (its completion record exists); an unfinished or interrupted run is
    refused: its model/ may predate the config it was last started with."""
    if not run.completion_file.is_file():
        state = "was started but did not finish" if run.config_file.is_file() else "does not exist"
        raise RunFolderError(f"{run.stage} run {run.name!r} at {run.path} {state} (no {run.completion_file.name}): "
                             f"run notebook {made_by} for it first")
    folder = paths.existing_dir(run.model_dir)
    if folder is None:
        raise RunFolderError(f"no model at {run.model_dir}: run notebook {made_by} for {run.stage} run {run.name!r}")
    return folder


def load_stage1_run(run: RunFolder | str | os.PathLike) -> tuple[FirstStage, Any]:
    """The stage-I model and tokenizer saved by `train_stage1` (a RunFolder, or a run folder's path)."""
    folder = finished_model_dir(_folder(run), "01_stage1_train")
    return loading.from_pretrained(folder), build_tokenizer(folder)


def load_stage2_run(run: RunFolder | str | os.PathLike) -> Stage2Model:
    """The stage-II model saved by `train_stage2` (a RunFolder, or a run folder's path)."""
    return loading.from_pretrained(finished_model_dir(_folder(run), "03_stage2_train"))


def stage1_weights_file(cfg: Stage2TrainConfig) -> Path:
    """The file holding the frozen stage-I weights a stage-II config uses (hashed into what stage II records)."""
    return abs_path(cfg.stage1_checkpoint) if cfg.stage1_checkpoint else cfg.stage1_folder.weights_file


def stage1_preset(cfg: Stage2TrainConfig) -> str:
    """The preset of the first stage an original checkpoint (`stage1_checkpoint`) is read into: `stage1_preset`, else
    the stage-II `preset`."""
    return cfg.stage1_preset or cfg.preset


def stage1_for(cfg: Stage2TrainConfig) -> tuple[FirstStage, Any]:
    """The frozen stage-I model and tokenizer: our run, or an original checkpoint file (BLIP's, or the format of the
    first stage `stage1_preset` names, e.g. SPRC's) read into that preset's first stage, with the run's tokenizer."""
    if cfg.stage1_checkpoint:
        root = data_root(cfg)
        tok = tokenizer_for(cfg, root)
        model = factory.build_stage1(stage1_preset(cfg), tok.vocab_size)
        loading.load_original_checkpoint(model, abs_path(cfg.stage1_checkpoint))
        return model, tok
    return load_stage1_run(cfg.stage1_folder)


def load_stages(trained: Stage2TrainConfig, run: RunFolder | str | os.PathLike) -> tuple[FirstStage, Any, Stage2Model]:
    """The frozen stage I and tokenizer a stage-II run was trained over (`stage1_for(trained)`) and the run's trained
    stage II; a re-ranker that reads BLIP z_t over a first stage that gives none is refused (ValueError)."""
    stage1, tok = stage1_for(trained)
    stage2 = load_stage2_run(run)
    require_blip_zt(stage1, stage2)
    return stage1, tok, stage2


def planned_stage1_config(cfg: Stage2TrainConfig, stage1: Stage1Config | None = None) -> ModelConfig | None:
    """The model config of the first stage a stage-II config will read, before any model is loaded: the preset of an
    original checkpoint, of the plan's stage-I step (`stage1`), or the finished run's saved config.json; None when
    none of these exists yet."""
    vocab = preset(cfg.preset).text.vocab_size  # one tokenizer serves both stages: any one vocabulary size will do
    if cfg.stage1_checkpoint:
        return factory.model_config(stage1_preset(cfg), vocab)
    if stage1 is not None:
        return factory.model_config(stage1.preset, vocab)
    saved = cfg.stage1_folder.model_dir / loading.CONFIG_FILE
    if not saved.is_file():
        return None
    raw = json.loads(saved.read_text(encoding="utf-8"))
    raw.pop("stage", None)
    return ModelConfig.from_dict(raw)


def check_stage2_fits(cfg: Stage2TrainConfig, stage1: Stage1Config | None = None) -> None:
    """Refuse (ValueError) a stage-II config whose re-ranker, init or `vision_from_stage1` reads what its first stage
    does not give (`factory.check_presets_fit`, on meta-device models); nothing to check while that first stage is
    unknown (no plan step, checkpoint or finished run)."""
    first = planned_stage1_config(cfg, stage1)
    if first is None:
        return
    second = factory.model_config(cfg.preset, first.text.vocab_size, reranker=cfg.reranker,
                                  joint_difference=cfg.joint_difference)
    factory.check_presets_fit(first, second, init=cfg.init, vision_from_stage1=cfg.vision_from_stage1)
