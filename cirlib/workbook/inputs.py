"""Input checks: the files each notebook step reads, and a clear error naming every missing one and its maker."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cirlib import data as cdata
from cirlib import paths
from cirlib.run_folder import RunFolder
from cirlib.workbook.config import (AnalysisConfig, DataConfig, EvaluateConfig, ExplorerConfig, Stage1Config, Stage2TrainConfig,
                                    SubmissionConfig, TopKConfig)
from cirlib.workbook.factories import abs_path, check_stage2_fits
from cirlib.workbook.figures import label_sources

# ------------------------------------------------------------------------------------------------ input checks


@dataclass(frozen=True)
class Input:
    """A file or folder a notebook step reads."""

    what: str  # e.g. "stage-I model"
    path: Path
    made_by: str  # the notebook (or person) that produces it


def _data_inputs(cfg: Any) -> list[Input]:
    return [Input("dataset root", paths.data_root(cfg.data_root or None), "you (data_root= or $CIR_DATA)")]


def _categories(cfg: Any) -> list[str | None]:
    return list(cdata.get_dataset(cfg.dataset).split_categories(cfg.categories))


def _finished_run(run: RunFolder, made_by: str) -> list[Input]:
    """A trained run: its completion record (written last) and its model."""
    what = "stage-I" if run.stage == "stage1" else "stage-II"
    return [Input(f"{what} run completion record", run.completion_file, made_by),
            Input(f"{what} model", run.model_dir, made_by)]


def _stage1_model_inputs(cfg: Stage2TrainConfig) -> list[Input]:
    if cfg.stage1_checkpoint:
        return [Input("original stage-I checkpoint", abs_path(cfg.stage1_checkpoint), "you (stage1_checkpoint=)")]
    return _finished_run(cfg.stage1_folder, "01_stage1_train")


def _val_topk_inputs(cfg: Stage2TrainConfig, topk_path: str) -> list[Input]:
    out = []
    for cat in _categories(cfg):
        if topk_path:
            out.append(Input("validation top-k file", abs_path(topk_path.replace("{category}", cat or "")),
                             "you (topk_path=)"))
        else:
            out.append(Input("validation top-k file", cfg.stage1_folder.topk_file("val", cat), "02_stage1_topk"))
    return out


def _tokenizer_input(cfg: Any) -> Input:
    root = paths.data_root(cfg.data_root or None)
    path = abs_path(cfg.tokenizer) if cfg.tokenizer else root / "vocab.txt"
    return Input("tokenizer (vocab.txt or bert-base-uncased folder)", path, "you (tokenizer=) or cirlib.synth")


def _optional(what: str, value: str, made_by: str) -> list[Input]:
    return [Input(what, abs_path(value), made_by)] if value else []


def _trained_stage2(cfg: EvaluateConfig | SubmissionConfig) -> Stage2TrainConfig | None:
    """The stage-II run's training config, or None when it has none yet (its config file is then the missing input)."""
    from cirlib.workbook.steps import trained_config

    return trained_config(cfg) if cfg.stage2_folder.config_file.is_file() else None


EXPECTED = {"preview": DataConfig, "train_stage1": Stage1Config, "extract_topk": TopKConfig,
            "train_stage2": Stage2TrainConfig, "evaluate": EvaluateConfig, "submit_cirr": SubmissionConfig,
            "make_figures": AnalysisConfig, "explorer": ExplorerConfig}


def required_inputs(cfg: Any, step: str) -> list[Input]:
    """The files a pipeline step reads for this config (nothing is opened but saved run configs).

    Args:
        cfg: the step's config (see EXPECTED).
        step: "preview" | "train_stage1" | "extract_topk" | "train_stage2" | "evaluate" | "submit_cirr" |
            "make_figures" | "explorer".
    """
    if step not in EXPECTED:
        raise ValueError(f"unknown step {step!r}; one of {list(EXPECTED)}")
    if not isinstance(cfg, EXPECTED[step]):
        raise TypeError(f"step {step!r} takes a {EXPECTED[step].__name__}, got {type(cfg).__name__}")
    if step == "preview":
        return _data_inputs(cfg)
    if step == "train_stage1":
        return (_data_inputs(cfg) + [_tokenizer_input(cfg)]
                + _optional("BLIP pre-trained weights", cfg.pretrained, "you (pretrained=)")
                + _optional("checkpoint to start from", cfg.init_checkpoint, "you (init_checkpoint=)"))
    if step == "extract_topk":
        return _finished_run(cfg.stage1_folder, "01_stage1_train")
    if step == "train_stage2":
        found = _data_inputs(cfg) + _stage1_model_inputs(cfg) + _val_topk_inputs(cfg, cfg.topk_path)
        if cfg.stage1_checkpoint:
            found.append(_tokenizer_input(cfg))
        if cfg.init == "pretrained":
            found.append(Input("BLIP pre-trained weights (init='pretrained')", abs_path(cfg.pretrained)
                               if cfg.pretrained else Path("<pretrained= is empty>"),
                               "you (pretrained=, or init='scratch')"))
        if cfg.hard_negatives > 0:
            found += [Input("train top-k file (hard negatives)", cfg.stage1_folder.topk_file("train", c),
                            "02_stage1_topk with topk_splits including 'train'") for c in _categories(cfg)]
        return found + _optional("checkpoint to start from", cfg.init_checkpoint, "you (init_checkpoint=)")
    if step in ("evaluate", "submit_cirr"):
        trained = _trained_stage2(cfg)
        if trained is None:
            return [Input("stage-II run config", cfg.stage2_folder.config_file, "03_stage2_train")]
        found = _data_inputs(trained) + _stage1_model_inputs(trained) + _finished_run(cfg.stage2_folder,
                                                                                      "03_stage2_train")
        if step == "evaluate":
            return found + _val_topk_inputs(trained, cfg.topk_path or trained.topk_path)
        if not cdata.get_dataset(trained.dataset).has_test_server:
            return found[:0]  # nothing to submit: FashionIQ has no test server
        return found + [Input("test1 top-k file", trained.stage1_folder.topk_file("test1"),
                              "02_stage1_topk with topk_splits including 'test1'")]
    # make_figures / explorer: saved files only, never a model (ours: the re-ranked files; or the original's files)
    found = [Input(f"{what} ({s.name}, {s.what})", p, made_by) for s in label_sources(cfg)
             for what, p, made_by in s.inputs()]
    if step == "explorer" or not cfg.original_dir:  # the qualitative grids and the explorer show the images
        found = _data_inputs(cfg) + found
    return found


def check_inputs(cfg: Any, step: str) -> pd.DataFrame:
    """A table of the step's inputs; raises FileNotFoundError naming every missing one and what produces it, and
    ValueError when a stage II reads what its first stage does not give (`factories.check_stage2_fits`).

    Args:
        cfg: the step's config.
        step: see `required_inputs`.
    """
    inputs = required_inputs(cfg, step)
    table = pd.DataFrame([{"input": i.what, "path": str(i.path), "exists": i.path.exists(), "made by": i.made_by}
                          for i in inputs])
    missing = [i for i in inputs if not i.path.exists()]
    if missing:
        lines = "\n".join(f"  - {i.what}: {i.path} (made by {i.made_by})" for i in missing)
        raise FileNotFoundError(f"{step}: {len(missing)} input(s) missing:\n{lines}")
    trained = cfg if step == "train_stage2" else _trained_stage2(cfg) if step in ("evaluate", "submit_cirr") else None
    if trained is not None:
        check_stage2_fits(trained)
    return table
