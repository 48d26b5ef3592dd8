"""A re-ranker is one registered class: a toy one defined outside cirlib (tests/plugins/toy_reranker.py) trains and
evaluates through the public steps and through `python -m cirlib.launch` with CIRLIB_PLUGINS, with no edit to cirlib;
and no code in cirlib outside the re-ranker classes compares a re-ranker's name."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cirlib import paths
from cirlib.data import synth
from cirlib.models import loading
from cirlib.models.config import preset
from cirlib.models.rerankers import RERANKERS, RerankQuery, Stage2Model
from cirlib.registry import PLUGINS_ENV, RegistryError
from cirlib.workbook import steps
from cirlib.workbook.config import EvaluateConfig, Stage1Config, Stage2TrainConfig, TopKConfig

TOY_FILE = Path(__file__).parent / "plugins" / "toy_reranker.py"
PACKAGE = paths.REPO_ROOT / "cirlib"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def toy():
    """The toy re-ranker's module, imported from its file as a plugin would be; unregistered afterwards."""
    spec = importlib.util.spec_from_file_location("toy_reranker_plugin", TOY_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    RERANKERS.unregister("toy")


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """A tiny CIRR-layout world and a finished stage-I run "s1" with its validation top-k: (world, outputs)."""
    root = tmp_path_factory.mktemp("toy")
    world = synth.generate(synth.SynthConfig(layout="cirr", n_train=32, n_val=12, n_test=8, seed=3),
                           root=root / "cirr")
    outputs = str(root / "outputs")
    steps.train_stage1(Stage1Config(stage1_run="s1", data_root=str(world), preset="tiny", train_image_encoder=True,
                                    epochs=1, max_epoch=1, lr=1e-3, batch_size=8, max_steps_per_epoch=2,
                                    precision="fp32", outputs=outputs))
    steps.extract_topk(TopKConfig(stage1_run="s1", topk_k=12, topk_splits="val", outputs=outputs))
    return world, outputs


def _toy_query(n: int) -> tuple[RerankQuery, torch.Tensor]:
    cfg = preset("tiny", reranker="toy")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (n, 6), generator=gen)
    tokens = torch.randn(n, cfg.vision.num_tokens, cfg.vision.width, generator=gen)
    return RerankQuery(ids, torch.ones_like(ids), ref_tokens=tokens), torch.randn(3, *tokens.shape[1:], generator=gen)


# ------------------------------------------------------------------------------------------------ the toy
def test_the_toy_is_built_by_name_and_declares_its_paths(toy):
    model = Stage2Model(preset("tiny", reranker="toy")).eval()
    assert isinstance(model, toy.ToyReranker) and "toy" in RERANKERS.names()
    query, cands = _toy_query(2)
    with torch.no_grad():
        scores = model.score(query, cands, scoring="pairs")
    assert scores.shape == (2, 3) and torch.isfinite(scores).all() and scores.std() > 0
    with pytest.raises(ValueError, match="per-pair path .scoring='pairs'."):
        model.score(query, cands)  # the shared path it declares it does not have
    with pytest.raises(ValueError, match="toy re-ranker needs ref_tokens"):
        model.make_query(query.input_ids, query.attention_mask, ref_tokens=None)
    with pytest.raises(RegistryError, match="unknown re-ranker 'nope': known are .*'toy'"):
        Stage2TrainConfig(reranker="nope")


@pytest.mark.slow
def test_the_toy_trains_and_evaluates_through_the_public_steps(toy, stage1_run):
    world, outputs = stage1_run
    cfg = Stage2TrainConfig(stage2_run="toy", stage1_run="s1", data_root=str(world), preset="tiny", reranker="toy",
                            init="scratch", scoring="pairs", k=8, epochs=1, max_epoch=1, lr=1e-2, batch_size=4,
                            max_steps_per_epoch=3, precision="fp32", outputs=outputs)
    trained = steps.train_stage2(cfg)
    log = [json.loads(line) for line in (trained.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["kind"] == "epoch"]
    assert len(losses) == 1 and losses[0] > 0 and torch.isfinite(torch.tensor(losses)).all()
    saved = loading.from_pretrained(trained.run_dir / "model")
    assert isinstance(saved, toy.ToyReranker) and saved.config.reranker == "toy"

    steps.evaluate(EvaluateConfig(stage2_run="toy", k=8, scoring="pairs", outputs=outputs))
    record = json.loads((trained.run_dir / "metrics.json").read_text())
    assert record["k"] == 8 and 0.0 <= record["stage2"]["R@1"] <= 100.0
    labels = torch.load(trained.run_dir / "stage2_labels_val.pt", weights_only=True)
    assert labels.shape == (12, 8)


@pytest.mark.e2e
def test_the_toy_runs_through_launch_with_cirlib_plugins(stage1_run, tmp_path):
    world, outputs = stage1_run
    params = {"data_root": str(world), "dataset": "cirr", "preset": "tiny", "stage1_run": "s1",
              "stage2_run": "toy-launch", "precision": "fp32", "validate_every": 0, "k": 8, "reranker": "toy",
              "init": "scratch", "scoring": "pairs", "epochs": 1, "max_epoch": 1, "lr": 1.0e-3, "batch_size": 4,
              "max_steps_per_epoch": 1}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "cirlib.launch", "train-stage2,evaluate", str(tmp_path / "params.yaml"),
               "--outputs", outputs]
    env = {**os.environ, "PYTHONPATH": str(paths.REPO_ROOT), PLUGINS_ENV: str(TOY_FILE)}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["step"] for r in reports] == ["train-stage2", "evaluate"]
    run = Path(outputs) / "stage2" / "toy-launch"
    assert json.loads((run / "model" / "config.json").read_text())["reranker"] == "toy"
    assert json.loads((run / "metrics.json").read_text())["k"] == 8

    env.pop(PLUGINS_ENV)  # without the plugin the name is unknown, and the registry says how to add it
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode != 0 and "unknown re-ranker 'toy'" in proc.stderr and PLUGINS_ENV in proc.stderr


# ------------------------------------------------------------------------------------------------ no name compares
BUILT_IN = ("dual", "joint")
# Files holding the re-ranker classes (a class may name itself); the registry has no names of its own.
OWNERS = ("cirlib/models/reranker_dual.py", "cirlib/models/reranker_joint.py")
# `--reranker both` of the bench is an option of the bench, not a re-ranker name.
NOT_NAMES = {"both"}


def _is_name(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value in BUILT_IN


def _names_reranker(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "reranker") or (
        isinstance(node, ast.Name) and node.id == "reranker")


def name_comparisons(source: str, filename: str) -> list[str]:
    """'file:line: code' of every comparison with a re-ranker name (`== "dual"`, `in ("dual", ...)`), of
    `reranker` with a string, every `case "joint":` and every dict keyed by a re-ranker name."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        hit = False
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            literals = [e for o in operands for e in (o.elts if isinstance(o, (ast.Tuple, ast.List, ast.Set)) else [o])]
            strings = [o for o in operands if isinstance(o, ast.Constant) and isinstance(o.value, str)]
            hit = any(_is_name(e) for e in literals) or (
                any(_names_reranker(o) for o in operands) and any(s.value not in NOT_NAMES for s in strings))
        elif isinstance(node, ast.MatchValue):
            hit = _is_name(node.value)
        elif isinstance(node, ast.Dict):
            hit = any(k is not None and _is_name(k) for k in node.keys)
        if hit:
            found.append(f"{filename}:{node.lineno}: {ast.get_source_segment(source, node)}")
    return found


def test_the_check_finds_every_kind_of_name_comparison():
    source = ('if cfg.reranker == "dual":\n    pass\n'
              'x = 1 if model.config.reranker != "joint" else 2\n'
              'y = reranker in ("dual", "joint")\n'
              'z = "joint" == name\n'
              'match name:\n    case "dual":\n        pass\n'
              'table = {"dual": 1}\n'
              'fine = cfg.reranker == "both" or model.needs_z_t or name == "other"\n')
    assert sorted(int(f.split(":")[1]) for f in name_comparisons(source, "example.py")) == [1, 3, 4, 5, 7, 9]


def test_no_reranker_name_is_compared_outside_the_reranker_classes():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(paths.REPO_ROOT).as_posix()
        if rel not in OWNERS:
            found += name_comparisons(path.read_text(), rel)
    assert not found, "re-ranker names compared outside the re-ranker classes (ask the model's declarations):\n" + \
        "\n".join(found)
