"""Reuse that cannot lie: a saved run, top-k file or evaluation is returned only when everything that produced it is
the same; otherwise it is rebuilt or refused with the reason. Tiny synthetic world, CPU."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from cirlib.data import synth
from cirlib.retrieval.topk import TopK, TopKError, read_topk_dict
from cirlib.run_folder import RunFolder, file_sha256
from cirlib.workbook import factories, figures, preview, rerank_any, steps
from cirlib.workbook.config import (AnalysisConfig, DataConfig, EvaluateConfig, ExplorerConfig, RerankConfig,
                                    Stage1Config, Stage2TrainConfig, SubmissionConfig, TopKConfig)
from cirlib.workbook.explorer import Explorer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse_world") / "cirr"
    synth.generate(synth.SynthConfig(layout="cirr", n_train=48, n_val=16, n_test=8, seed=5), root=root)
    return root


def _s1(world, outputs, **kw) -> Stage1Config:
    return Stage1Config(**{**dict(stage1_run="s1", data_root=str(world), preset="tiny", train_image_encoder=True,
                                  epochs=1, max_epoch=2, lr=1e-3, batch_size=8, max_steps_per_epoch=2,
                                  validate_every=0, outputs=outputs), **kw})


def _s2(world, outputs, **kw) -> Stage2TrainConfig:
    return Stage2TrainConfig(**{**dict(stage2_run="s2", stage1_run="s1", data_root=str(world), preset="tiny",
                                       reranker="joint", init="scratch", k=16, epochs=1, max_epoch=2, lr=1e-3,
                                       batch_size=4, max_steps_per_epoch=2, validate_every=0, scoring="pairs",
                                       outputs=outputs), **kw})


def _topk(outputs, **kw) -> TopKConfig:
    return TopKConfig(**{**dict(stage1_run="s1", topk_k=20, topk_splits="val", outputs=outputs), **kw})


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """Stage I (1 epoch), its val top-k file, stage II (1 epoch): the outputs root each test copies."""
    out = str(tmp_path_factory.mktemp("reuse_base") / "outputs")
    steps.train_stage1(_s1(world, out))
    steps.extract_topk(_topk(out))
    steps.train_stage2(_s2(world, out))
    return out


@pytest.fixture()
def outputs(trained, tmp_path):
    copy = tmp_path / "outputs"
    shutil.copytree(trained, copy)
    return str(copy)


KILLED_TRAINING = textwrap.dedent("""
    import json, os, signal, sys
    from cirlib.workbook import steps
    from cirlib.workbook import config
    # SIGKILL at the first training step: config.json is rewritten, nothing else happens
    steps.fit = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    cfg = getattr(config, sys.argv[1])(**json.loads(sys.argv[2]))
    getattr(steps, sys.argv[3])(cfg)
""")


def _killed(cfg, call: str) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_TRAINING, type(cfg).__name__,
                           json.dumps(dataclasses.asdict(cfg)), call], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_an_interrupted_extension_of_a_finished_run_is_not_reported_finished(world, outputs, stage):
    make, call = (_s1, "train_stage1") if stage == "stage1" else (_s2, "train_stage2")
    run = RunFolder.of(stage, "s1" if stage == "stage1" else "s2", outputs)
    assert json.loads(run.completion_file.read_text())["epochs_completed"] == 1
    longer = make(world, outputs, epochs=2)
    _killed(longer, call)
    assert json.loads(run.config_file.read_text())["epochs"] == 2  # it was killed after rewriting config.json
    assert not run.completion_file.exists()
    again = getattr(steps, call)(longer)
    assert not again.reused
    assert json.loads(run.completion_file.read_text())["epochs_completed"] == 2
    assert getattr(steps, call)(longer).reused


def _contents(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage, change", [("stage1", {"max_steps_per_epoch": 5}), ("stage2", {"lr": 0.5})])
@pytest.mark.slow
def test_a_refused_config_change_leaves_a_finished_run_byte_identical(world, outputs, stage, change):
    make, call = (_s1, "train_stage1") if stage == "stage1" else (_s2, "train_stage2")
    run = RunFolder.of(stage, "s1" if stage == "stage1" else "s2", outputs)
    before = _contents(run.path)
    with pytest.raises(ValueError, match="different TrainConfig"):
        getattr(steps, call)(make(world, outputs, **change))
    assert _contents(run.path) == before  # config.json, done.json and everything else as they were
    assert getattr(steps, call)(make(world, outputs)).reused  # still finished for its own config


@pytest.mark.parametrize("step", ["extract_topk", "evaluate"])
@pytest.mark.slow
def test_an_unwritable_run_folder_is_refused_before_the_work(world, outputs, step, monkeypatch):
    import errno
    from pathlib import Path

    from cirlib.paths import FileWriteError

    run = RunFolder.of("stage1" if step == "extract_topk" else "stage2", "s1" if step == "extract_topk" else "s2",
                       outputs)
    real_write_bytes = Path.write_bytes

    def read_only(self, data):  # tests run as root, where permissions do not stop writes
        if self.parent == run.path:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    monkeypatch.setattr(steps, "device", lambda: pytest.fail("the work started before the folder was checked"))
    cfg = _topk(outputs, overwrite=True) if step == "extract_topk" else EvaluateConfig(
        stage2_run="s2", k=16, scoring="pairs", outputs=outputs, overwrite=True)
    with pytest.raises(FileWriteError, match=rf"cannot write {run.path}.*read-only"):
        getattr(steps, step)(cfg)


@pytest.mark.slow
def test_two_evaluations_of_one_run_do_not_both_write(world, outputs):
    from cirlib.run_folder import LockedError

    run = RunFolder.of("stage2", "s2", outputs)
    with run.lock():  # another evaluation (or training) of this run is writing it
        with pytest.raises(LockedError, match=rf"{run.path} is in use by another process"):
            _evaluate(outputs, overwrite=True)
    assert not run.evaluation_file.exists()  # the refused one wrote nothing


def _evaluate(outputs, **kw):
    return steps.evaluate(EvaluateConfig(**{**dict(stage2_run="s2", k=16, scoring="pairs", outputs=outputs), **kw}))


def _files(folder) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_saved_evaluation_is_reused_only_for_the_same_settings_models_and_file(world, outputs):
    run = RunFolder.of("stage2", "s2", outputs)
    full = _evaluate(outputs)
    assert not full.reused and json.loads(run.evaluation_file.read_text())["queries"] == 16
    assert _evaluate(outputs).reused
    few = _evaluate(outputs, max_val_queries=5)  # HEAD returned the 16-query numbers here, in 0.0 s
    assert not few.reused and json.loads(run.evaluation_file.read_text())["queries"] == 5
    again = _evaluate(outputs)  # and after that, the 5-query numbers for a full evaluation
    assert not again.reused and again.stage1 == full.stage1 and again.stage2 == full.stage2
    # other stage-II weights (the same settings): evaluated again
    from safetensors.torch import load_file, save_file

    weights = load_file(run.weights_file)
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, run.weights_file, metadata={"format": "pt"})
    assert not _evaluate(outputs).reused


@pytest.mark.slow
def test_changing_only_k_or_fusion_weight_never_retrains(world, outputs):
    s2 = RunFolder.of("stage2", "s2", outputs)
    s1 = RunFolder.of("stage1", "s1", outputs)
    before = {**_files(s1.checkpoints_dir), **_files(s2.checkpoints_dir), **_files(s2.model_dir)}
    first = _evaluate(outputs, k=16)
    second = _evaluate(outputs, k=8, fusion_weight=0.5)
    assert not second.reused and second.k == 8 and first.k == 16
    assert steps.train_stage2(_s2(world, outputs)).reused
    after = {**_files(s1.checkpoints_dir), **_files(s2.checkpoints_dir), **_files(s2.model_dir)}
    assert after == before  # no checkpoint or model file written


def _shuffled_copy(src, dst) -> None:
    raw = read_topk_dict(src)
    n = len(raw["target_names"])
    perm = np.roll(np.arange(n), 1)
    raw["sorted_index_names"] = raw["sorted_index_names"][perm]
    raw["target_names"] = [raw["target_names"][i] for i in perm]
    raw["labels"] = raw["labels"][perm]
    raw["group_labels"] = raw["group_labels"][perm]
    raw["cirlib"]["scores"] = raw["cirlib"]["scores"][perm]
    raw["cirlib"]["group_names"] = raw["cirlib"]["group_names"][perm]
    torch.save(raw, dst)


@pytest.mark.slow
def test_a_top_k_file_whose_rows_are_not_the_queries_is_refused(world, outputs, tmp_path):
    src = RunFolder.of("stage1", "s1", outputs).topk_file("val")
    _shuffled_copy(src, tmp_path / "shuffled.pt")
    assert TopK.load(tmp_path / "shuffled.pt", dataset="cirr", split="val", k=16).num_queries == 16  # a valid file
    with pytest.raises(TopKError, match=r"shuffled\.pt: row \d+ is for target .* has target"):
        _evaluate(outputs, topk_path=str(tmp_path / "shuffled.pt"))


@pytest.mark.slow
def test_a_top_k_file_of_earlier_stage1_weights_is_re_extracted(world, outputs, capsys):
    run = RunFolder.of("stage1", "s1", outputs)
    old = TopK.load(run.topk_file("val"))
    assert old.provenance["stage1_weights_sha256"] == file_sha256(run.weights_file)
    steps.extract_topk(_topk(outputs))  # same weights, same settings: reused
    assert "re-extracting" not in capsys.readouterr().out
    steps.train_stage1(_s1(world, outputs, epochs=2))  # stage I trains further
    steps.extract_topk(_topk(outputs))
    assert "re-extracting" in capsys.readouterr().out
    new = TopK.load(run.topk_file("val"))
    assert new.provenance["stage1_weights_sha256"] == file_sha256(run.weights_file)
    assert new.provenance["stage1_weights_sha256"] != old.provenance["stage1_weights_sha256"]
    steps.extract_topk(_topk(outputs, topk_k=10))  # other settings: re-extracted too
    assert "other settings" in capsys.readouterr().out and TopK.load(run.topk_file("val")).k == 10


def test_candidates_of_other_stage1_weights_are_said_naming_both_hashes_and_files(tmp_path):
    from cirlib.workbook.evaluation import stage1_change_notes

    def topk(weights):
        return TopK(dataset=None, split="val", category=None, sorted_index_names=np.array([["a"]]),
                    index_names=("a",), provenance=None if weights is None else {"stage1_weights_sha256": weights})

    done = tmp_path / "done.json"
    record = {"inputs": {"stage1_weights_sha256": "a" * 64}}
    files = [tmp_path / "same.pt", tmp_path / "other.pt", tmp_path / "original.pt"]
    notes = stage1_change_notes(record, done, files, [topk("a" * 64), topk("b" * 64), topk(None)])
    assert len(notes) == 1 and notes[0].startswith(f"{files[1]}: its candidates come from stage-I weights bbbbbbbbbbbb,")
    assert f"trained and validated with stage-I weights aaaaaaaaaaaa ({done})" in notes[0] and "b" * 13 not in notes[0]
    assert stage1_change_notes({}, done, files[1:2], [topk("b" * 64)]) == []  # a run recording no inputs: no claim
    # stage I retrained but its top-k file not re-extracted: the weights loaded now (stage II's z_t) are said
    loaded = stage1_change_notes(record, done, files[:1], [topk("a" * 64)], stage1_now="c" * 64)
    assert len(loaded) == 1 and loaded[0].startswith("the stage-I weights loaded now (cccccccccccc)")
    assert f"(aaaaaaaaaaaa, {done})" in loaded[0]
    assert stage1_change_notes(record, done, files[:1], [topk("a" * 64)], stage1_now="a" * 64) == []


@pytest.mark.slow
def test_evaluating_after_stage1_was_retrained_says_so(world, outputs):
    s1, s2 = RunFolder.of("stage1", "s1", outputs), RunFolder.of("stage2", "s2", outputs)
    trained_with = json.loads(s2.completion_file.read_text())["inputs"]["stage1_weights_sha256"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*candidates come from")  # those it was trained with: not a word
        assert _evaluate(outputs).notes == []
    steps.train_stage1(_s1(world, outputs, epochs=2))  # stage I trains further; its top-k file is re-extracted
    steps.extract_topk(_topk(outputs))
    now = file_sha256(s1.weights_file)
    with pytest.warns(UserWarning, match=rf"{s1.topk_file('val')}: its candidates come from stage-I weights "
                                         rf"{now[:12]}, .* stage-I weights {trained_with[:12]} "
                                         rf"\({s2.completion_file}\)"):
        result = _evaluate(outputs)
    assert not result.reused and len(result.notes) == 2  # the weights loaded now, and the file's candidates
    assert json.loads(s2.evaluation_file.read_text())["notes"] == result.notes  # recorded beside the numbers
    with pytest.warns(UserWarning, match="its candidates come from stage-I weights"):
        assert _evaluate(outputs).reused  # said again when the saved record is returned


# ------------------------------------------------------------------------------------------------ configs


def _read_names(*functions) -> set[str]:
    """Attribute names and string constants read in the functions' source (AST)."""
    names: set[str] = set()
    for fn in functions:
        fn = fn.fget if isinstance(fn, property) else fn
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
    return names


# The code path of each step: the step and the helpers it hands its config to.
CODE_PATHS = {
    Stage1Config: (steps.train_stage1, steps.resolve, steps._train_config, steps._stage1_train_config,
                   factories.build_stage1,
                   factories.tokenizer_for, factories.data_root, Stage1Config.stage1_folder),
    TopKConfig: (steps.extract_topk, steps.resolve, steps._topk_provenance, TopKConfig.stage1_folder),
    Stage2TrainConfig: (steps.train_stage2, steps.resolve, steps._train_config, steps._stage2_inputs,
                        factories.build_stage2, factories.stage1_for, factories.stage1_preset,
                        factories.stage1_weights_file, factories.tokenizer_for, factories.data_root,
                        Stage2TrainConfig.stage1_folder, Stage2TrainConfig.stage2_folder),
    EvaluateConfig: (steps.evaluate, steps._evaluate_and_write, steps.resolve, EvaluateConfig.stage2_folder),
    SubmissionConfig: (steps.submit_cirr, SubmissionConfig.stage2_folder),
    RerankConfig: (rerank_any.rerank_any, rerank_any.rerank_split, rerank_any.rerank_circo, rerank_any.dataset_of,
                   rerank_any._circo_index, rerank_any._score_index_split, rerank_any._rerank_and_write, rerank_any._score_splits, rerank_any._analysis,
                   rerank_any._check, rerank_any.trained_config, rerank_any.stage2_folder, rerank_any.result_folder,
                   rerank_any.candidate_files, steps.resolve),
    DataConfig: (preview.load, preview.check_download, preview.split_summary, preview.show_triplets),
    AnalysisConfig: (figures.make_figures, figures.label_sources, figures._stage2_folder, figures.load_label_pair,
                     figures.qualitative_rows, figures.val_split, figures.rank_shift_table),
    ExplorerConfig: (Explorer.__init__, Explorer.split, Explorer.topk, Explorer.widget, figures.label_sources,
                     figures._stage2_folder, figures.val_split),
}


@pytest.mark.parametrize("cls", list(CODE_PATHS), ids=lambda c: c.__name__)
def test_every_config_field_is_read_by_the_step_it_feeds(cls):
    read = _read_names(*CODE_PATHS[cls])
    unread = [f.name for f in dataclasses.fields(cls) if f.name not in read]
    assert not unread, f"{cls.__name__}: {unread} are read by no code of its step"


def test_evaluation_and_submission_show_no_training_parameter():
    training_only = {"lr", "epochs", "reranker", "init", "preset", "batch_size", "data_root", "stage1_run"}
    for cls in (EvaluateConfig, SubmissionConfig):
        assert not training_only & {f.name for f in dataclasses.fields(cls)}, cls.__name__


@pytest.mark.slow
def test_an_unfinished_run_is_refused_by_the_steps_that_read_it(world, outputs):
    run = RunFolder.of("stage2", "s2", outputs)
    os.remove(run.completion_file)
    with pytest.raises(Exception, match="did not finish"):
        _evaluate(outputs)
    with pytest.raises(Exception, match="did not finish"):
        factories.load_stage2_run(run)
