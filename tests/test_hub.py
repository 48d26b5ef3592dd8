"""Publishing models (issue 21, items 1-3): Hub-ready folders with model cards, loading by folder or `hf:<repo id>`
(through a Hub cache laid out as huggingface_hub lays it out, offline), the card checked by `verify`, `--push`
refused in one line without network, and the original's checkpoint format exported and loaded back. Models are
untrained tiny ones (epochs=0): the comparisons need the same numbers on both paths, not good ones."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants

from cirlib import paths
from cirlib.data import synth
from cirlib.models import loading
from cirlib.models.first_stage import FirstStage
from cirlib.models.stage1 import Stage1Model
from cirlib.models.stage2 import Stage2Model
from cirlib.run import hub as cli
from cirlib.run import launch
from cirlib.run import search as search_cli
from cirlib.run_folder import RunFolder, RunFolderError
from cirlib.tools.verify_original import config_from_fixture
from cirlib.workbook import hub, published, steps
from cirlib.workbook.config import EvaluateConfig, Stage1Config, Stage2TrainConfig, TopKConfig

K = 8
REPO = "me/cir-a"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _put_in_hub_cache(folder: Path, cache: Path, repo_id: str, commit: str) -> None:
    """Lay `folder` out as huggingface_hub caches a download: models--<org>--<name>/blobs/<hash> (the contents),
    snapshots/<commit>/<path> (relative symlinks to the blobs) and refs/main (the commit)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = repo / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny CIRR world, a stage I with its top-k files, two evaluated stage-II runs of different seeds (a, b),
    a's export, and a Hub cache holding it as me/cir-a."""
    tmp = tmp_path_factory.mktemp("hub")
    root = tmp / "cirr"
    synth.generate(synth.SynthConfig(layout="cirr", n_train=8, n_val=12, n_test=4, seed=5), root=root)
    out = tmp / "outputs"
    common = dict(data_root=str(root), preset="tiny", epochs=0, precision="fp32", trackers="none", outputs=str(out))
    steps.train_stage1(Stage1Config(stage1_run="s1", validate_every=0, **common))
    steps.extract_topk(TopKConfig(stage1_run="s1", topk_k=20, outputs=str(out)))
    for name, seed in (("a", 0), ("b", 1)):
        steps.train_stage2(Stage2TrainConfig(stage2_run=name, stage1_run="s1", init="scratch", k=K, seed=seed,
                                             reranker="dual", validate_every=0, **common))
        steps.evaluate(EvaluateConfig(stage2_run=name, k=K, outputs=str(out)))
    export = hub.export_run(RunFolder.of("stage2", "a", out), tmp / "export-a")
    _put_in_hub_cache(export, tmp / "hf_home" / "hub", REPO, COMMIT)
    return {"root": root, "out": out, "tmp": tmp, "export": export, "cache": tmp / "hf_home" / "hub"}


@pytest.fixture()
def offline_hub(world, monkeypatch):
    """huggingface_hub offline, its cache the world's (HF_HOME as the environment would set it)."""
    monkeypatch.setenv("HF_HOME", str(world["cache"].parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(world["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in sa.items())


def _metrics(world, run: str) -> dict:
    return json.loads(RunFolder.of("stage2", run, world["out"]).evaluation_file.read_text())


# ---------------------------------------------------------------------------------------------------------- fast
def test_hub_references_are_parsed_and_bad_ones_refused():
    assert loading.parse_hub_reference("hf:me/model@v1") == ("me/model", "v1")
    assert loading.parse_hub_reference("hf:me/model") == ("me/model", None)
    assert loading.parse_hub_reference("my_run") is None
    with pytest.raises(loading.CheckpointError, match="hf:<org>/<name>"):
        loading.parse_hub_reference("hf:no-org")


def test_an_uncached_hub_model_offline_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RunFolderError, match="not in the Hub cache") as err:
        published.resolve_run("stage2", "hf:me/never-downloaded", tmp_path / "outputs")
    assert "\n" not in str(err.value)


def test_a_run_another_process_materialized_meanwhile_is_kept_and_ours_dropped(tmp_path):
    run = RunFolder.of("stage2", "x", tmp_path)

    def fill(tmp: RunFolder) -> None:  # another rank of the launch publishes the same run while this one writes
        paths.write_json(tmp.completion_file, {"by": "us"})
        paths.write_json(run.completion_file, {"by": "them"})

    published._publish_once(run, fill)
    assert json.loads(run.completion_file.read_text()) == {"by": "them"}
    assert [p.name for p in run.path.parent.iterdir()] == ["x"], "no temporary folder is left behind"


# ---------------------------------------------------------------------------------------------------------- export
def test_the_export_holds_the_hub_files_and_a_card_equal_to_metrics_json(world):
    export = world["export"]
    names = {p.name for p in export.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.txt", "README.md", "cirlib.json", "topk_val.pt",
            "stage1"} <= names
    card = ModelCard.load(export / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "cirlib" and data["datasets"] == ["cirr"] and "stage2" in data["tags"]
    metrics = _metrics(world, "a")
    assert hub.card_results(card) == metrics["stage2"]
    protocol = card.data.eval_results[0].dataset_args
    counts = metrics["query_counts"]["val"]
    assert (protocol["k"], protocol["gallery"], protocol["queries"], protocol["dropped_queries"],
            protocol["reference_removed"]) == (K, counts["gallery"], counts["evaluated"], 0, True)
    assert {r.dataset_split for r in card.data.eval_results} == {"val"}
    run = RunFolder.of("stage2", "a", world["out"])
    weights = hashlib.sha256(run.weights_file.read_bytes()).hexdigest()
    assert weights in card.text and data["cirlib"]["weights_sha256"] == weights
    assert '"step": "evaluate"' in card.text, "the card shows the provenance record"
    info = json.loads((export / "cirlib.json").read_text())
    assert info["run_config"]["data_root"] == "" and info["topk_files"] == ["topk_val.pt"]


def test_a_stage1_export_carries_its_validation_and_is_used_as_a_run(world, tmp_path):
    own = RunFolder.of("stage1", "s1", world["out"])
    export = hub.export_run(own, tmp_path / "export-s1")
    card = ModelCard.load(export / "README.md")
    assert hub.card_results(card) == json.loads(own.evaluation_file.read_text())["final"]
    assert card.data.to_dict()["cirlib"]["protocol"]["stage"] == 1 and "stage1" in card.data.to_dict()["tags"]
    run = published.resolve_run("stage1", str(export), tmp_path / "outputs", data_root=str(world["root"]))
    assert run.saved_config()["data_root"] == str(world["root"]) and run.completion_file.is_file()
    assert run.weights_file.read_bytes() == own.weights_file.read_bytes()
    with pytest.raises(RunFolderError, match="stage-I model, but a stage2 run"):
        published.resolve_run("stage2", str(export), tmp_path / "outputs")


def test_load_back_by_folder_and_through_the_hub_cache(world, offline_hub):
    run_model = loading.from_pretrained(RunFolder.of("stage2", "a", world["out"]).model_dir)
    for source in (world["export"], f"hf:{REPO}", f"hf:{REPO}@{COMMIT}"):
        model = Stage2Model.from_pretrained(str(source))
        assert _same_weights(model, run_model)
    stage1 = FirstStage.from_pretrained(str(world["export"] / published.STAGE1_DIR))
    assert isinstance(stage1, Stage1Model)
    with pytest.raises(loading.CheckpointError, match="not a Stage1Model|not a FirstStage"):
        FirstStage.from_pretrained(f"hf:{REPO}")


def test_a_pipeline_step_and_search_run_from_the_hub_cache(world, offline_hub, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CIR_DATA", str(world["root"]))
    out = tmp_path / "outputs"
    (tmp_path / "params.yaml").write_text(f"stage2_run: hf:{REPO}\nk: {K}\n")  # a YAML naming the Hub model
    assert launch.main(["evaluate", str(tmp_path / "params.yaml"), "--outputs", str(out)]) == 0
    own = RunFolder.of("stage2", "a", world["out"])
    run = EvaluateConfig(stage2_run=f"hf:{REPO}", outputs=str(out)).stage2_folder
    assert run.path.parent == out / "stage2" and run.name.startswith("hf--me--cir-a--")
    got = json.loads(run.evaluation_file.read_text())["stage2"]
    assert got == pytest.approx(_metrics(world, "a")["stage2"], abs=1e-6)
    labels, own_labels = (torch.load(r.labels_file("val"), weights_only=True) for r in (run, own))
    assert torch.allclose(labels.float(), own_labels.float(), atol=1e-6)
    record = json.loads(run.evaluation_file.read_text())["provenance"]["weights"]["stage2"]["source"]
    assert (record["repo_id"], record["revision"], record["commit"]) == (REPO, "main", COMMIT)
    # python -m cirlib.search query ... --stage2 hf:<repo id> == --stage2 <the run folder>
    index = tmp_path / "ix"
    assert search_cli.main(["index", str(world["root"] / "dev"), "--stage1", str(own.outputs / "stage1" / "s1"),
                            "--out", str(index), "--batch-size", "8"]) == 0
    image = sorted((world["root"] / "dev").glob("*.png"))[0].name
    answers = []
    for stage2 in (str(own.path), f"hf:{REPO}"):
        capsys.readouterr()
        assert search_cli.main(["query", str(index), "--image", image, "--text", "make it red", "--stage2", stage2,
                                "--k", "6", "--json"]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert answers[0]["stage2"] == answers[1]["stage2"] and answers[0]["stage2"]


# ---------------------------------------------------------------------------------------------------------- verify
@pytest.mark.slow
def test_verify_passes_on_the_right_weights_and_names_what_differs_otherwise(world, tmp_path, capsys):
    assert cli.main(["verify", str(world["export"]), "--data-root", str(world["root"])]) == 0
    assert "OK (tolerance" in capsys.readouterr().out
    # another run's weights under a's card
    wrong = tmp_path / "wrong"
    shutil.copytree(world["export"], wrong)
    shutil.copyfile(RunFolder.of("stage2", "b", world["out"]).weights_file, wrong / "model.safetensors")
    a, b = _metrics(world, "a")["stage2"], _metrics(world, "b")["stage2"]
    expected = [m for m in a if abs(a[m] - b[m]) > hub.TOLERANCE]
    assert expected, "the two seeds' runs should differ somewhere for this test to mean anything"
    result = hub.verify(str(wrong), world["root"])
    assert not result.ok and result.differing == expected and "sha256" in result.weights_problem
    # a card whose numbers were changed
    edited = tmp_path / "edited"
    shutil.copytree(world["export"], edited)
    card = ModelCard.load(edited / "README.md")
    card.data.eval_results[1].metric_value += 1.0
    card.save(edited / "README.md")
    capsys.readouterr()
    assert cli.main(["verify", str(edited), "--data-root", str(world["root"])]) == 1
    out = capsys.readouterr().out
    assert f"FAILED: {card.data.eval_results[1].metric_type} differ" in out


def test_push_without_network_or_token_fails_in_one_line(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    args = ["export", "a", "--outputs", str(world["out"]), "--out", str(tmp_path / "x"), "--push", "me/x"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_HUB_OFFLINE" in err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "empty_home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "empty_home" / "stored_tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Hugging Face token" in err


# ---------------------------------------------------------------------------------------------------------- original
def test_the_originals_checkpoints_export_and_load_back_with_equal_scores(fixture_dir, fixture_config, tmp_path):
    pixels = torch.randn(2, 3, fixture_config.vision.image_size, fixture_config.vision.image_size,
                         generator=torch.Generator().manual_seed(0))
    for name, cls in (("stage1_ckpt.pt", Stage1Model), ("stage2_ckpt.pt", Stage2Model)):
        direct = cls(fixture_config)
        loading.load_original_checkpoint(direct, fixture_dir / name)
        out = hub.export_original(fixture_dir / name, tmp_path / name, config=fixture_config)
        back = cls.from_pretrained(str(out))
        assert _same_weights(back, direct)
        if cls is Stage1Model:
            assert torch.allclose(back.encode_image(pixels).embeds, direct.eval().encode_image(pixels).embeds,
                                  atol=1e-6)
        assert ModelCard.load(out / "README.md").data.to_dict()["library_name"] == "cirlib"
        with pytest.raises(RunFolderError, match="without a training run"):
            published.resolve_run("stage1" if cls is Stage1Model else "stage2", str(out), tmp_path / "o")
