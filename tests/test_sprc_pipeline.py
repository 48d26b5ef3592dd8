"""Our stage II over SPRC's first stage: the refusals of what SPRC does not give (BLIP z_t, a BLIP text encoder or
ViT to copy), an SPRC-format checkpoint as stage I of a stage-II run, and SPRC top-k -> joint re-ranker ->
evaluation through `python -m cirlib.launch`."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from cirlib import paths
from cirlib.data import synth
from cirlib.data.synth import SynthConfig, vocabulary
from cirlib.models import factory, loading
from cirlib.models.config import preset
from cirlib.models.sprc import CHECKPOINT_KEY, SPRCRetriever
from cirlib.models.sprc_keys import to_lavis
from cirlib.models.stage1 import Stage1Model
from cirlib.retrieval.rerank import build_rerank_query
from cirlib.retrieval.topk import TopK
from cirlib.run_folder import RunFolder
from cirlib.workbook import factories, inputs, search
from cirlib.workbook.config import Stage1Config, Stage2TrainConfig
from cirlib.workbook.plan_check import PlanError, check_plan

ZT = "the re-ranker 'dual' needs BLIP z_t; first stage 'sprc' gives none: use `reranker: joint`"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder with the synthetic world's vocab.txt (what a stage-I checkpoint run reads as its tokenizer)."""
    root = tmp_path_factory.mktemp("vocab")
    (root / "vocab.txt").write_text("\n".join(vocabulary(SynthConfig())) + "\n")
    return root


@pytest.fixture(scope="module")
def tok(world):
    return factories.tokenizer_for(Stage2TrainConfig(data_root=str(world)), world)


def _sprc(vocab: int) -> SPRCRetriever:
    cfg = preset("sprc-tiny")
    torch.manual_seed(0)
    return SPRCRetriever(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=vocab))).eval()


def _sprc_file(model: SPRCRetriever, path) -> None:
    """`model` in SPRC's released format: {'epoch', 'Blip2QformerCirAlignPrompt': LAVIS names}, the ViT in fp16."""
    sd = {k: (v.half() if k.startswith("visual_encoder.") else v) for k, v in to_lavis(model.state_dict()).items()}
    torch.save({"epoch": 1, CHECKPOINT_KEY: sd}, path)


def test_dual_over_sprc_is_refused_when_built_when_queried_and_in_plans(tok):
    sprc = _sprc(tok.vocab_size)
    with pytest.raises(ValueError, match=ZT):
        factory.build_stage2("tiny", tok.vocab_size, reranker="dual", init="scratch", stage1=sprc)
    dual = factory.build_stage2("tiny", tok.vocab_size, reranker="dual", init="scratch")
    with pytest.raises(ValueError, match=ZT):
        build_rerank_query(sprc, dual, tok, ["a red cube"], torch.zeros(1, 10, 128))
    with pytest.raises(PlanError, match=ZT):
        check_plan([Stage1Config(stage1_run="s", preset="sprc-tiny"),
                    Stage2TrainConfig(stage1_run="s", preset="tiny", reranker="dual", init="scratch",
                                      vision_from_stage1=False)])
    # BLIP's first stage gives z_t: the same plan with it passes
    check_plan([Stage1Config(stage1_run="s", preset="tiny"),
                Stage2TrainConfig(stage1_run="s", preset="tiny", reranker="dual", init="scratch")])
    assert Stage1Model.gives_blip_zt and not SPRCRetriever.gives_blip_zt


def test_init_stage1_and_vision_from_stage1_over_sprc_are_refused_naming_the_option(tok):
    sprc = _sprc(tok.vocab_size)
    with pytest.raises(ValueError, match="init='stage1' .* first stage 'sprc': its text encoder is missing"):
        factory.build_stage2("tiny", tok.vocab_size, reranker="joint", init="stage1", stage1=sprc)
    with pytest.raises(ValueError, match="vision_from_stage1=True .* set `vision_from_stage1: false`"):
        factory.build_stage2("tiny", tok.vocab_size, reranker="joint", init="scratch", stage1=sprc,
                             vision_from_stage1=True)
    # a BLIP stage I of another width: its ViT's shapes do not fit (a shape check, not a name check)
    wide = Stage1Model(factory.model_config("tiny", tok.vocab_size))
    narrow = dataclasses.replace(preset("tiny"), vision=dataclasses.replace(preset("tiny").vision, width=64))
    with pytest.raises(ValueError, match="has other shapes"):
        factory.check_presets_fit(narrow, wide.config, vision_from_stage1=True)
    model = factory.build_stage2("tiny", tok.vocab_size, reranker="joint", init="scratch", stage1=sprc)
    assert model.name == "joint"


def test_a_joint_reranker_never_runs_sprc_for_z_t(tok, monkeypatch):
    sprc = _sprc(tok.vocab_size)
    joint = factory.build_stage2("tiny", tok.vocab_size, reranker="joint", init="scratch")

    def refuse(*args, **kwargs):
        raise AssertionError("SPRC's encoder ran for a re-ranker that reads no z_t")

    monkeypatch.setattr(SPRCRetriever, "encode_query", refuse)
    monkeypatch.setattr(SPRCRetriever, "encode_image", refuse)
    query = build_rerank_query(sprc, joint, tok, ["a red cube", "two blue balls"], torch.zeros(2, 10, 128))
    assert query.z_t is None and query.ref_tokens.shape == (2, 10, 128)


def test_a_stage2_run_reads_an_sprc_format_checkpoint_as_its_first_stage(tok, world, tmp_path):
    released = _sprc(tok.vocab_size)
    _sprc_file(released, tmp_path / "sprc_cirr.pt")
    cfg = Stage2TrainConfig(stage1_checkpoint=str(tmp_path / "sprc_cirr.pt"), stage1_preset="sprc-tiny",
                            data_root=str(world), preset="tiny", reranker="joint", init="scratch",
                            vision_from_stage1=False, topk_path=str(tmp_path / "topk_val.pt"))
    stage1, tok2 = factories.stage1_for(cfg)
    assert type(stage1) is SPRCRetriever and tok2.vocab_size == tok.vocab_size
    for k, v in released.state_dict().items():
        want = v.half().float() if k.startswith("visual_encoder.") else v
        assert torch.equal(stage1.state_dict()[k], want), k
    assert factories.build_stage2(cfg, tok2, stage1).name == "joint"
    # the search CLI's gallery index reads the same file into the preset's first stage
    found = search.load_stage1(str(tmp_path / "sprc_cirr.pt"), preset="sprc-tiny", tokenizer=str(world / "vocab.txt"))
    assert type(found.model) is SPRCRetriever and torch.equal(found.model.query_tokens, stage1.query_tokens)
    factories.check_stage2_fits(cfg)
    # the input check of notebook 03 refuses the dual re-ranker over it before anything is built
    (tmp_path / "topk_val.pt").write_bytes(b"")
    assert len(inputs.check_inputs(cfg, "train_stage2")) == 4
    with pytest.raises(ValueError, match=ZT):
        inputs.check_inputs(dataclasses.replace(cfg, reranker="dual"), "train_stage2")
    with pytest.raises(ValueError, match="vision_from_stage1=True"):
        factories.check_stage2_fits(dataclasses.replace(cfg, vision_from_stage1=True))


def test_a_saved_dual_run_over_sprc_is_refused_when_loaded(tok, world, tmp_path):
    """A finished dual run naming an SPRC stage I (made before this check, or by hand): evaluation, submission,
    search and re-ranking load it through `load_stages`, which refuses it; a joint run over it loads."""
    _sprc_file(_sprc(tok.vocab_size), tmp_path / "sprc_cirr.pt")
    trained = Stage2TrainConfig(stage1_checkpoint=str(tmp_path / "sprc_cirr.pt"), stage1_preset="sprc-tiny",
                                data_root=str(world), preset="tiny", init="scratch")
    runs = {}
    for reranker in ("dual", "joint"):
        runs[reranker] = RunFolder.of("stage2", reranker, tmp_path / "runs")
        model = factory.build_stage2("tiny", tok.vocab_size, reranker=reranker, init="scratch")
        loading.save_pretrained(model, runs[reranker].model_dir)
        runs[reranker].completion_file.write_text("{}")
    with pytest.raises(ValueError, match=ZT):
        factories.load_stages(dataclasses.replace(trained, reranker="dual"), runs["dual"])
    stage1, _, stage2 = factories.load_stages(dataclasses.replace(trained, reranker="joint"), runs["joint"])
    assert (stage1.name, stage2.name) == ("sprc", "joint")


def _launch(params: dict, tmp_path, steps: str) -> subprocess.CompletedProcess:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(paths.REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "cirlib.launch", steps, str(tmp_path / "params.yaml"),
                           "--outputs", str(tmp_path / "runs")], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=env)


# SPRC (sprc-tiny) as stage I, our joint re-ranker (tiny) as stage II trained on SPRC's train top-K negatives.
SPRC_THEN_JOINT = {
    "dataset": "cirr", "stage1_run": "sprc", "stage2_run": "joint", "precision": "fp32", "validate_every": 0,
    "topk_k": 10, "topk_splits": "train,val", "k": 8, "epochs": 1, "max_epoch": 1, "batch_size": 4,
    "max_steps_per_epoch": 2,
    "notebooks": {
        "01_stage1_train": {"preset": "sprc-tiny", "lr": 1.0e-4, "adam_beta2": 0.98, "adam_eps": 1.0e-7,
                            "feature_store": "float32"},
        "03_stage2_train": {"preset": "tiny", "reranker": "joint", "init": "scratch", "vision_from_stage1": False,
                            "scoring": "pairs", "lr": 1.0e-3, "hard_negatives": 1, "mining_k": 5}},
}


@pytest.mark.slow
def test_sprc_topk_is_reranked_by_our_stage2_through_launch(tmp_path):
    world = synth.generate(synth.SynthConfig(layout="cirr", n_train=16, n_val=8, n_test=2, seed=1),
                           root=tmp_path / "cirr")
    proc = _launch({**SPRC_THEN_JOINT, "data_root": str(world)}, tmp_path, "all")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["step"] for r in reports] == ["train-stage1", "topk", "train-stage2", "evaluate"]
    runs = tmp_path / "runs"
    assert json.loads((runs / "stage1/sprc/model/config.json").read_text())["first_stage"] == "sprc"
    made_by = TopK.load(runs / "stage1/sprc/topk_val.pt").produced_by
    assert (made_by["first_stage"], made_by["preset"]) == ("sprc", "sprc-tiny")
    record = json.loads((runs / "stage2/joint/metrics.json").read_text())
    assert record["k"] == 8 and set(record["stage2"]) >= {"R@1", "R@5", "Rsubset@1"}
    assert json.loads((runs / "stage2/joint/model/config.json").read_text())["reranker"] == "joint"
    print("stage I", record["stage1"], "stage II", record["stage2"])
    # the dual re-ranker over the same SPRC run is refused by the plan check, before anything runs
    params = {**SPRC_THEN_JOINT, "data_root": str(world), "stage2_run": "dual",
              "notebooks": {**SPRC_THEN_JOINT["notebooks"],
                            "03_stage2_train": {**SPRC_THEN_JOINT["notebooks"]["03_stage2_train"], "reranker": "dual"}}}
    proc = _launch(params, tmp_path, "train-stage2")
    assert proc.returncode != 0 and "needs BLIP z_t; first stage 'sprc' gives none" in proc.stderr
    assert not (runs / "stage2/dual").exists()
