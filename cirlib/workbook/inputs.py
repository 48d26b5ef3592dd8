"""Input checks: the files each notebook step reads, and a clear error naming every missing one and its maker."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cirlib import paths
from cirlib.workbook.config import AnalysisConfig, DataConfig, Stage1Config, Stage2Config
from cirlib.workbook.figures import _abs, _categories, _topk_file, label_sources

# ------------------------------------------------------------------------------------------------ input checks


@dataclass(frozen=True)
class Input:
    """A file or folder a notebook step reads."""

    what: str  # e.g. "stage-I model"
    path: Path
    made_by: str  # the notebook (or person) that produces it


def _data_inputs(cfg: Any) -> list[Input]:
    return [Input("dataset root", paths.data_root(cfg.data_root or None), "you (data_root= or $CIR_DATA)")]


def _stage1_model_inputs(cfg: Stage2Config) -> list[Input]:
    if cfg.stage1_checkpoint:
        return [Input("original stage-I checkpoint", _abs(cfg.stage1_checkpoint), "you (stage1_checkpoint=)")]
    return [Input("stage-I model", cfg.stage1_dir / "model", "01_stage1_train")]


def _val_topk_inputs(cfg: Stage2Config) -> list[Input]:
    out = []
    for cat in _categories(cfg):
        if cfg.topk_path:
            out.append(Input("validation top-k file", _abs(cfg.topk_path.replace("{category}", cat or "")),
                             "you (topk_path=)"))
        else:
            out.append(Input("validation top-k file", _topk_file(cfg.stage1_dir, "val", cat), "02_stage1_topk"))
    return out


def _tokenizer_input(cfg: Any) -> Input:
    root = paths.data_root(cfg.data_root or None)
    path = _abs(cfg.tokenizer) if cfg.tokenizer else root / "vocab.txt"
    return Input("tokenizer (vocab.txt or bert-base-uncased folder)", path, "you (tokenizer=) or cirlib.synth")


def _optional(what: str, value: str, made_by: str) -> list[Input]:
    return [Input(what, _abs(value), made_by)] if value else []


def required_inputs(cfg: Any, step: str) -> list[Input]:
    """The files a pipeline step reads for this config (nothing is opened).

    Args:
        cfg: the step's config (DataConfig, Stage1Config, Stage2Config or AnalysisConfig).
        step: "preview" | "train_stage1" | "extract_topk" | "train_stage2" | "evaluate" | "submit_cirr" |
            "make_figures" | "explorer".
    """
    expected = {"preview": DataConfig, "train_stage1": Stage1Config, "extract_topk": Stage1Config,
                "train_stage2": Stage2Config, "evaluate": Stage2Config, "submit_cirr": Stage2Config,
                "make_figures": AnalysisConfig, "explorer": AnalysisConfig}
    if step not in expected:
        raise ValueError(f"unknown step {step!r}; one of {list(expected)}")
    if not isinstance(cfg, expected[step]):
        raise TypeError(f"step {step!r} takes a {expected[step].__name__}, got {type(cfg).__name__}")
    if step == "preview":
        return _data_inputs(cfg)
    if step == "train_stage1":
        return (_data_inputs(cfg) + [_tokenizer_input(cfg)]
                + _optional("BLIP pre-trained weights", cfg.pretrained, "you (pretrained=)")
                + _optional("checkpoint to start from", cfg.init_checkpoint, "you (init_checkpoint=)"))
    if step == "extract_topk":
        return _data_inputs(cfg) + [Input("stage-I model", cfg.run_dir / "model", "01_stage1_train")]
    if step in ("train_stage2", "evaluate"):
        found = _data_inputs(cfg) + _stage1_model_inputs(cfg) + _val_topk_inputs(cfg)
        if cfg.stage1_checkpoint:
            found.append(_tokenizer_input(cfg))
        if step == "evaluate":
            return found + [Input("stage-II model", cfg.run_dir / "model", "03_stage2_train")]
        if cfg.init == "pretrained":
            found.append(Input("BLIP pre-trained weights (init='pretrained')", _abs(cfg.pretrained) if cfg.pretrained
                               else Path("<pretrained= is empty>"), "you (pretrained=, or init='scratch')"))
        if cfg.hard_negatives > 0:
            found += [Input("train top-k file (hard negatives)", _topk_file(cfg.stage1_dir, "train", c),
                            "02_stage1_topk with topk_splits including 'train'") for c in _categories(cfg)]
        return found + _optional("checkpoint to start from", cfg.init_checkpoint, "you (init_checkpoint=)")
    if step == "submit_cirr":
        return (_data_inputs(cfg) + _stage1_model_inputs(cfg)
                + [Input("stage-II model", cfg.run_dir / "model", "03_stage2_train"),
                   Input("test1 top-k file", _topk_file(cfg.stage1_dir, "test1", None),
                         "02_stage1_topk with topk_splits including 'test1'")])
    # make_figures / explorer (which re-ranks on demand, so needs no stage-II labels)
    found = [Input(f"{what} ({s.name}, {s.what})", p, made_by) for s in label_sources(cfg)
             for what, p, made_by in (("stage-I top-K file", s.stage1_path, s.stage1_made_by),
                                      ("stage-II label tensor", s.stage2_path, s.stage2_made_by))
             if step == "make_figures" or what == "stage-I top-K file"]
    if step == "explorer" or not cfg.original_dir:  # the grids / explorer look at images through our models
        found = (_data_inputs(cfg) + found
                 + [Input("stage-I model", paths.OUTPUTS / "stage1" / cfg.stage1_run / "model", "01_stage1_train"),
                    Input("stage-II model", paths.OUTPUTS / "stage2" / cfg.stage2_run / "model", "03_stage2_train")])
    return found


def check_inputs(cfg: Any, step: str) -> pd.DataFrame:
    """A table of the step's inputs; raises FileNotFoundError naming every missing one and what produces it.

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
    return table
