"""Every result says what produced it (issue 12, part 4): the provenance record has real values (the commit, the
weights' and annotation files' hashes, the package versions), every result file of a tiny run carries it, top-k reuse
does not compare it, and `python -m cirlib.reproduce` prints a command that makes the same run again."""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from cirlib import paths, provenance, run_folder
from cirlib.data import synth
from cirlib.retrieval.topk import TopK
from cirlib.run import launch, reproduce
from cirlib.run_folder import RunFolder
from cirlib.workbook import steps
from cirlib.workbook.config import (EvaluateConfig, Stage1Config, Stage2TrainConfig, SubmissionConfig, TopKConfig,
                                    identity)
from cirlib.workbook.evaluation import split_sets

HEX40 = re.compile(r"[0-9a-f]{40}")


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prov_world") / "cirr"
    synth.generate(synth.SynthConfig(layout="cirr", n_train=48, n_val=16, n_test=12, seed=7), root=root)
    return root


def _s1(world, outputs) -> Stage1Config:
    return Stage1Config(stage1_run="s1", data_root=str(world), preset="tiny", train_image_encoder=True, epochs=1,
                        max_epoch=1, lr=1e-3, batch_size=8, max_steps_per_epoch=2, validate_every=0, outputs=outputs)


def _topk(outputs) -> TopKConfig:
    return TopKConfig(stage1_run="s1", topk_k=60, topk_splits="val,test1", outputs=outputs)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """A tiny stage I with val and test1 top-k files, a stage II, its evaluation and a CIRR submission."""
    out = str(tmp_path_factory.mktemp("prov_runs") / "outputs")
    steps.train_stage1(_s1(world, out))
    steps.extract_topk(_topk(out))
    steps.train_stage2(Stage2TrainConfig(stage2_run="s2", stage1_run="s1", data_root=str(world), preset="tiny",
                                         reranker="joint", init="scratch", k=16, epochs=1, max_epoch=1, lr=1e-3,
                                         batch_size=4, max_steps_per_epoch=2, validate_every=0, scoring="pairs",
                                         outputs=out))
    steps.evaluate(EvaluateConfig(stage2_run="s2", k=16, scoring="pairs", outputs=out))
    steps.submit_cirr(SubmissionConfig(stage2_run="s2", k=16, scoring="pairs", submission_name="sub", outputs=out))
    return out


# ------------------------------------------------------------------------------------------------ the record


def test_the_record_has_real_values(world, tmp_path):
    weights = tmp_path / "model_base.pth"
    weights.write_bytes(b"not really BLIP" * 1000)
    sets = split_sets("cirr", world, "val", "")
    rec = provenance.record("train_stage1", {"lr": 1e-3, "preset": "tiny"}, weights={"pretrained": weights,
                            "init_checkpoint": None}, splits=sets, preset="tiny", device="cpu", precision="fp32",
                            seed=3, outputs=tmp_path)
    json.loads(json.dumps(rec))  # JSON-able as it is
    assert HEX40.fullmatch(rec["code"]["commit"]) and isinstance(rec["code"]["dirty"], bool)
    head = subprocess.run(["git", "-C", str(paths.REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert rec["code"]["commit"] == head.stdout.strip()
    assert rec["weights"] == {"pretrained": {"path": str(weights.resolve()), "sha256": _sha(weights),
                                             "bytes": weights.stat().st_size}}
    assert sets[0].source_files and rec["data"]["annotations"] == {str(Path(f).resolve()): _sha(f)
                                                                    for f in sets[0].source_files}
    assert rec["data"]["dataset"] == "cirr" and rec["data"]["root"] == str(world)
    assert rec["data"]["splits"] == [{"split": "val", "category": None, "queries": len(sets[0].queries),
                                      "gallery": len(sets[0].gallery), "dropped": None}]
    for name in ("torch", "transformers", "timm", "accelerate", "numpy"):
        assert rec["packages"][name] == metadata.version(name)
    assert rec["cirlib_version"] == metadata.version("cirlib")
    assert rec["device"]["type"] == "cpu" and rec["processes"] == 1 and rec["seed"] == 3
    assert rec["precision"] == "fp32" and rec["preset"] == "tiny"
    assert rec["config_hash"] == run_folder.config_hash({"lr": 1e-3, "preset": "tiny"})


def test_dropped_counts_are_read_from_the_split(world):
    from cirlib.data.readers import DroppedImages

    import dataclasses

    sd = split_sets("cirr", world, "val", "")[0]
    gone = DroppedImages(missing=("a", "b"), queries=tuple(sd.queries[:3]), gallery=("a",),
                         queries_before=len(sd.queries) + 3, gallery_before=len(sd.gallery) + 1)
    rec = provenance.data_record([dataclasses.replace(sd, dropped=gone)])
    assert rec["splits"][0]["dropped"] == {"queries_dropped": 3, "queries_before": len(sd.queries) + 3,
                                           "gallery_dropped": 1, "gallery_before": len(sd.gallery) + 1,
                                           "missing_images": 2}


def test_no_git_or_no_checkout_is_said_not_raised(tmp_path, monkeypatch):
    outside = provenance.code_version(tmp_path)  # a folder that is not a git checkout
    assert outside["commit"] is None and outside["dirty"] is None and "not a git checkout" in outside["note"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git on the PATH
    (tmp_path / "other").mkdir()
    absent = provenance.code_version(tmp_path / "other")
    assert absent["commit"] is None and "git is not installed" in absent["note"]


def test_a_dirty_tree_records_which_files_changed(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "a")
    clean = provenance.code_version(tmp_path)
    assert clean["dirty"] is False and clean["changed"] == []
    (tmp_path / "a.py").write_text("x = 2\n")
    (tmp_path / "new.txt").write_text("n")
    provenance._git_state.cache_clear()
    dirty = provenance.code_version(tmp_path)
    assert dirty["dirty"] is True and sorted(dirty["changed"]) == ["a.py", "new.txt"]


def test_the_workbook_s_own_outputs_leave_the_tree_clean():
    """Figures (and outputs/) are written by the workbook: not tracked, so a run never makes the tree dirty."""
    tracked = subprocess.run(["git", "-C", str(paths.REPO_ROOT), "ls-files", "figures", "outputs"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert tracked == ["figures/README.md"], tracked
    probe = paths.REPO_ROOT / "figures" / "fig8_probe_cirr.png"
    probe.write_bytes(b"x")
    try:
        ignored = subprocess.run(["git", "-C", str(paths.REPO_ROOT), "check-ignore", "-q", str(probe)])
        assert ignored.returncode == 0, "figures/*.png must be git-ignored"
    finally:
        probe.unlink()


def test_large_files_are_hashed_once_per_machine(tmp_path):
    big = tmp_path / "weights.bin"
    big.write_bytes(b"x" * 4096)
    outputs = tmp_path / "outputs"
    assert provenance.file_sha256(big, outputs, min_bytes=1024) == _sha(big)
    cache_file = run_folder.hash_cache_file(outputs)
    cache = json.loads(cache_file.read_text())
    (key,) = cache
    assert key.startswith(f"{big.resolve()}|4096|")
    # another process (an empty in-process cache) takes the digest from disk without reading the file ...
    cache[key] = "f" * 64
    cache_file.write_text(json.dumps(cache))
    run_folder._SHA_CACHE.clear()
    assert provenance.file_sha256(big, outputs, min_bytes=1024) == "f" * 64
    # ... until the file changes (size or mtime): then it is hashed again and the stale entry replaced
    big.write_bytes(b"y" * 4097)
    assert provenance.file_sha256(big, outputs, min_bytes=1024) == _sha(big)
    assert list(json.loads(cache_file.read_text()).values()) == [_sha(big)]
    # small files never touch the cache
    small = tmp_path / "captions.json"
    small.write_text("[]")
    assert provenance.file_sha256(small, tmp_path / "elsewhere", min_bytes=1024) == _sha(small)
    assert not run_folder.hash_cache_file(tmp_path / "elsewhere").exists()


# ------------------------------------------------------------------------------------------------ result files


def _check(rec: dict, step: str, weights: dict[str, Path]) -> None:
    assert rec["step"] == step and HEX40.fullmatch(rec["code"]["commit"]) and isinstance(rec["code"]["dirty"], bool)
    assert {role: e["sha256"] for role, e in rec["weights"].items()} == {r: _sha(p) for r, p in weights.items()}
    assert rec["data"]["annotations"] and all(_sha(f) == h for f, h in rec["data"]["annotations"].items())
    assert rec["packages"]["torch"] == metadata.version("torch") and rec["processes"] == 1
    assert rec["config_hash"] == run_folder.config_hash(rec["config"])


@pytest.mark.slow
def test_every_result_file_of_a_run_says_what_produced_it(trained):
    s1, s2 = RunFolder.of("stage1", "s1", trained), RunFolder.of("stage2", "s2", trained)
    # config.json stays the bare config; provenance.json beside it says what produced the run
    config = json.loads(s1.config_file.read_text())
    assert "provenance" not in config and s1.saved_config() == config
    started = json.loads(s1.provenance_file.read_text())
    _check(started, "train_stage1", {})  # no pretrained file in this world: nothing read but the data
    assert started["config"] == config and started["seed"] == 0 and started["precision"] == "fp32"
    names = {Path(f).name for f in started["data"]["annotations"]}
    assert {"cap.rc2.val.json", "split.rc2.val.json", "cap.rc2.train.json", "split.rc2.train.json"} <= names
    # stage I: metrics.json and done.json name the weights evaluated
    for rec in (json.loads(s1.evaluation_file.read_text())["provenance"],
                json.loads(s1.completion_file.read_text())["provenance"]):
        _check(rec, "train_stage1", {"stage1": s1.weights_file})
    # top-k files: the full record as produced_by; the reuse key (provenance) holds no code or package version
    for split in ("val", "test1"):
        tk = TopK.load(s1.topk_file(split))
        _check(tk.produced_by, "extract_topk", {"stage1": s1.weights_file})
        assert tk.produced_by["data"]["splits"][0]["split"] == split
        assert "code" not in tk.provenance and "packages" not in tk.provenance
    # stage II: its start, completion, evaluation, label tensors, re-ranked files and submission
    s1w = {"stage1": s1.weights_file}
    _check(json.loads(s2.provenance_file.read_text()), "train_stage2", s1w)
    _check(json.loads(s2.completion_file.read_text())["provenance"], "train_stage2", {**s1w, "stage2": s2.weights_file})
    evaluation = json.loads(s2.evaluation_file.read_text())["provenance"]
    _check(evaluation, "evaluate", {**s1w, "stage2": s2.weights_file})
    assert evaluation["inputs"]["topk_val.pt"]["sha256"] == _sha(s1.topk_file("val"))
    assert evaluation["config"]["k"] == 16 and evaluation["stage2_config"] == s2.saved_config()
    sidecar = json.loads(s2.labels_provenance_file("val").read_text())
    assert sidecar["file"] == s2.labels_file("val").name and sidecar["sha256"] == _sha(s2.labels_file("val"))
    assert sidecar["provenance"] == evaluation
    assert TopK.load(s2.reranked_file("val")).produced_by == evaluation
    sub = json.loads(s2.submission_provenance_file("sub").read_text())
    _check(sub["provenance"], "submit_cirr", {**s1w, "stage2": s2.weights_file})
    assert sub["provenance"]["inputs"]["topk_test1.pt"]["sha256"] == _sha(s1.topk_file("test1"))
    assert len(sub["files"]) == 4 and all(_sha(s2.path / f["file"]) == f["sha256"] for f in sub["files"].values())
    # the submission folder holds the server's files only
    assert sorted(p.name for p in s2.submission_dir.iterdir()) == sorted(Path(f["file"]).name
                                                                          for f in sub["files"].values())


@pytest.mark.slow
def test_the_full_record_is_never_compared_for_top_k_reuse(trained, tmp_path, capsys):
    out = str(tmp_path / "outputs")
    shutil.copytree(trained, out)
    s1 = RunFolder.of("stage1", "s1", out)
    path = s1.topk_file("val")
    tk = TopK.load(path)
    # a file made by another commit, other package versions, another machine: still these weights and settings
    other = {**tk.produced_by, "code": {"commit": "0" * 40, "dirty": True}, "packages": {"torch": "0.0"}}
    import dataclasses

    dataclasses.replace(tk, produced_by=other).save(path)
    before = path.stat().st_mtime_ns
    steps.extract_topk(_topk(out))
    assert "re-extracting" not in capsys.readouterr().out
    assert path.stat().st_mtime_ns == before and TopK.load(path).produced_by == other


# ------------------------------------------------------------------------------------------------ reproduce


@pytest.mark.slow
def test_reproduce_prints_a_command_that_makes_the_same_stage1_run(trained, tmp_path, capsys):
    s1 = RunFolder.of("stage1", "s1", trained)
    params = tmp_path / "again.yaml"
    assert reproduce.main([str(s1.path), "--write", str(params)]) == 0
    out = capsys.readouterr().out
    record = json.loads(s1.provenance_file.read_text())
    assert f"git commit {record['code']['commit']}" in out
    assert ("WARNING: the run was made from a dirty working tree" in out) == record["code"]["dirty"]
    command = out.split("command:\n", 1)[1].splitlines()[0].strip()
    argv = shlex.split(command)
    assert argv[:5] == ["python", "-m", "cirlib.launch", "train-stage1,topk", str(params)]
    assert argv[5:] == ["--outputs", trained]
    # the YAML builds exactly the run's config (and the top-k files' extraction settings) in cirlib.launch
    loaded = yaml.safe_load(params.read_text())
    cfg1, cfg2 = launch.step_configs(loaded, launch.parse_steps(argv[3]), {}, outputs=trained)
    assert identity(cfg1) == s1.saved_config() and cfg1.stage1_folder == s1
    assert identity(cfg2) == TopK.load(s1.topk_file("val")).produced_by["config"] == identity(_topk(trained))
    # and the command itself runs: it finds the finished run and the top-k files made by exactly these settings
    proc = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=600,
                          cwd=paths.REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["step"] for r in reports] == ["train-stage1", "topk"] and reports[0]["reused"] is True
    assert "re-extracting" not in proc.stdout


@pytest.mark.slow
def test_reproduce_a_stage2_run_and_warn_about_a_dirty_tree(trained, tmp_path):
    out = tmp_path / "outputs"
    shutil.copytree(trained, out)
    s2 = RunFolder.of("stage2", "s2", out)
    rep = reproduce.reproduction(s2.path)
    assert rep.steps == ("train-stage2", "evaluate")
    cfg2, ev = launch.step_configs(rep.parameters, rep.steps, {}, outputs=str(out))
    assert identity(cfg2) == s2.saved_config() and identity(ev) == identity(EvaluateConfig(stage2_run="s2", k=16,
                                                                                          scoring="pairs"))
    assert any("reproduce" in n and "stage1" in n for n in rep.notes)  # its stage-I run comes first
    record = json.loads(s2.provenance_file.read_text())
    record["code"] = {"commit": "1" * 40, "dirty": True, "repository": "/elsewhere",
                      "changed": ["cirlib/models/stage2.py", "params/mine.yaml"]}
    s2.provenance_file.write_text(json.dumps(record))
    dirty = reproduce.reproduction(s2.path)
    assert dirty.commit == "1" * 40 and any(
        "dirty working tree" in w and "cirlib/models/stage2.py, params/mine.yaml" in w for w in dirty.warnings)
    s2.provenance_file.unlink()
    s2.completion_file.write_text(json.dumps({**json.loads(s2.completion_file.read_text()), "provenance": None}))
    assert any("code version is unknown" in w for w in reproduce.reproduction(s2.path).warnings)


def test_reproduce_refuses_a_folder_that_is_no_run(tmp_path):
    (tmp_path / "stage3" / "x").mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "cirlib.reproduce", str(tmp_path / "stage3" / "x")],
                          capture_output=True, text=True, timeout=300, cwd=paths.REPO_ROOT)
    assert proc.returncode == 2 and "is not a run folder" in proc.stderr
