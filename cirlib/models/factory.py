"""Model builders with plain arguments: a preset sized to the tokenizer, then the stage's initialisation.

The workbook's configs name these things (preset, pretrained file, checkpoint, stage-II init mode); the workbook
resolves its paths (relative to the repository) and passes plain values here, so the models room needs nothing
else from cirlib.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cirlib.models import loading
from cirlib.models.config import ModelConfig, preset
from cirlib.models.first_stage import FirstStage, first_stage_class, require_blip_zt
from cirlib.models.stage2 import Stage2Model

STAGE2_INITS = ("pretrained", "scratch", "stage1")  # where a stage-II model's weights start from


def model_config(preset_name: str, vocab_size: int, **overrides: Any) -> ModelConfig:
    """A named preset with the text vocabulary set to `vocab_size` (the tokenizer's; 30524 for BLIP's BERT).

    Args:
        preset_name: a key of `cirlib.models.config.PRESETS` ("blip-base", "tiny").
        vocab_size: the tokenizer's vocabulary size.
        overrides: top-level ModelConfig fields (e.g. reranker="joint").
    """
    base = preset(preset_name)
    return dataclasses.replace(base, text=dataclasses.replace(base.text, vocab_size=vocab_size), **overrides)


def load_any_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Fill `model` from a folder written by `save_pretrained` (or a run folder holding `model/`), or from an original
    checkpoint file; a folder holding the other stage's model is refused."""
    path = Path(path)
    if path.is_dir():
        folder = path / "model" if (path / "model").is_dir() else path
        loaded = loading.from_pretrained(folder)
        stage = Stage2Model if isinstance(model, Stage2Model) else FirstStage
        if not isinstance(loaded, stage):
            raise loading.CheckpointError(
                f"{folder} holds a {type(loaded).__name__}, expected a {stage.__name__}: point to the other "
                "stage's run")
        model.load_state_dict(loaded.state_dict())
    else:
        loading.load_original_checkpoint(model, path)


def build_stage1(preset_name: str, vocab_size: int, *, pretrained: str | os.PathLike | None = None,
                 init_checkpoint: str | os.PathLike | None = None, first_stage: str | None = None) -> FirstStage:
    """A stage-I model: the registered first stage on the preset, then BLIP pre-trained weights and/or a checkpoint.

    Args:
        preset_name, vocab_size: as `model_config`.
        first_stage: a name in `first_stage.FIRST_STAGES` ("blip": `Stage1Model`, "sprc": `SPRCRetriever`);
            None = the preset's; RegistryError if unknown.
        pretrained: the first stage's pre-training file (BLIP `model_base.pth`, LAVIS BLIP-2 for "sprc"),
            absolute; None = random init.
        init_checkpoint: loaded after `pretrained` (`load_any_checkpoint`), absolute; None = none.
    """
    config = model_config(preset_name, vocab_size)
    if first_stage is not None:
        config = dataclasses.replace(config, first_stage=first_stage)
    model = first_stage_class(config.first_stage)(config)
    if pretrained:
        loading.load_blip_pretrained(model, pretrained)
    if init_checkpoint:
        load_any_checkpoint(model, init_checkpoint)
    return model


def build_stage2(preset_name: str, vocab_size: int, *, reranker: str, joint_difference: bool = False,
                 init: str = "pretrained", pretrained: str | os.PathLike | None = None,
                 stage1: FirstStage | None = None, vision_from_stage1: bool = False,
                 init_checkpoint: str | os.PathLike | None = None) -> Stage2Model:
    """A stage-II model: the preset with its architecture, then its initialisation.

    Args:
        preset_name, vocab_size: as `model_config`.
        reranker: a registered re-ranker (`RERANKERS`): "dual" (the original), "joint", or a plugin's.
        joint_difference: the joint re-ranker's (candidate - reference) segment.
        init: "pretrained" (BLIP file `pretrained`), "scratch" (BERT init), or "stage1" (text side from `stage1`'s
            text encoder, as the re-ranker's `init_from_stage1` takes it).
        pretrained: the BLIP pre-training file for init="pretrained", absolute.
        stage1: the stage-I model, for init="stage1" or vision_from_stage1.
        vision_from_stage1: copy stage I's ViT into stage II after the init.
        init_checkpoint: loaded last (`load_any_checkpoint`), absolute; None = none.
    """
    if init not in STAGE2_INITS:
        raise ValueError(f"unknown stage-II init {init!r}: one of {STAGE2_INITS}")
    model = Stage2Model(model_config(preset_name, vocab_size, reranker=reranker, joint_difference=joint_difference))
    if stage1 is not None:
        check_stages_fit(stage1, model, init=init, vision_from_stage1=vision_from_stage1)
    if init == "pretrained":
        if not pretrained:
            raise ValueError("init='pretrained' needs a BLIP pre-training file (model_base.pth); "
                             "use init='scratch' without one")
        loading.load_blip_pretrained(model, pretrained)
    elif init == "stage1":
        if stage1 is None:
            raise ValueError("init='stage1' needs the stage-I model")
        left_out = model.init_from_stage1(stage1)
        if left_out:
            raise loading.CheckpointError(
                f"stage-I text encoder keys not in the {reranker} re-ranker: {left_out[:10]}")
    if vision_from_stage1:
        if stage1 is None:
            raise ValueError("vision_from_stage1=True needs the stage-I model")
        model.visual_encoder.load_state_dict(stage1.visual_encoder.state_dict())
    if init_checkpoint:
        load_any_checkpoint(model, init_checkpoint)
    return model


def _misfit(source: nn.Module | None, target: nn.Module, *, partial: bool) -> str | None:
    """Why `source`'s weights cannot be copied into `target` (None when they can): no such module, no weight names in
    common, a shape that differs, or (unless `partial`) weight names that differ."""
    if not isinstance(source, nn.Module):
        return "is missing"
    src = {k: tuple(v.shape) for k, v in source.state_dict().items()}
    dst = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    common = sorted(set(src) & set(dst))
    if not common:
        return "shares no weight names with it"
    if bad := [k for k in common if src[k] != dst[k]]:
        return f"has other shapes ({bad[0]}: {src[bad[0]]} vs {dst[bad[0]]})"
    if not partial and set(src) != set(dst):
        return f"has other weight names (e.g. {sorted(set(src) ^ set(dst))[:3]})"
    return None


def check_stages_fit(stage1: nn.Module, stage2: Stage2Model, *, init: str = "",
                     vision_from_stage1: bool = False) -> None:
    """Refuse (ValueError naming the option) a stage II that reads what this first stage does not give: BLIP z_t
    (`first_stage.require_blip_zt`), a text encoder to start from (init="stage1"), or a ViT of the stage-II ViT's
    names and shapes (vision_from_stage1). Works on meta-device models (`check_presets_fit`)."""
    require_blip_zt(stage1, stage2)
    name = getattr(stage1, "name", type(stage1).__name__)
    text = getattr(stage2, "text_encoder", None)
    if init == "stage1" and isinstance(text, nn.Module):
        if why := _misfit(getattr(stage1, "text_encoder", None), text, partial=True):
            raise ValueError(f"init='stage1' copies stage I's text encoder into the {stage2.name!r} re-ranker; first "
                             f"stage {name!r}: its text encoder {why}: use `init: pretrained` (or scratch)")
    if vision_from_stage1:
        if why := _misfit(getattr(stage1, "visual_encoder", None), stage2.visual_encoder, partial=False):
            raise ValueError(f"vision_from_stage1=True copies stage I's ViT into stage II; first stage {name!r}: "
                             f"its ViT {why}: set `vision_from_stage1: false` (stage II's ViT then comes from its init)")


def check_presets_fit(stage1: ModelConfig, stage2: ModelConfig, *, init: str = "",
                      vision_from_stage1: bool = False) -> None:
    """`check_stages_fit` on two model configs, without weights (both built on the meta device): for plans and input
    checks before any model exists."""
    with torch.device("meta"):
        first = first_stage_class(stage1.first_stage)(stage1)
        second = Stage2Model(stage2)
    check_stages_fit(first, second, init=init, vision_from_stage1=vision_from_stage1)
