"""`cirlib.launch` builds each step's config from the config module and the YAML alone: no notebook files, no
papermill; the outputs root is a config field; old parameter names are refused with their new names."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cirlib import paths
from cirlib.data import synth
from cirlib.run import launch

# Runs `cirlib.launch` in a process where papermill and nbformat cannot be imported and the notebooks folder is absent.
WITHOUT_NOTEBOOKS = textwrap.dedent("""
    import sys
    sys.modules["papermill"] = None
    sys.modules["nbformat"] = None
    from pathlib import Path
    from cirlib import paths
    paths.NOTEBOOKS = Path(sys.argv[1])
    from cirlib.run import launch
    sys.exit(launch.main(sys.argv[2:]))
""")


@pytest.mark.e2e
def test_launch_all_runs_a_tiny_world_without_the_notebooks(tmp_path):
    world = synth.generate(synth.SynthConfig(layout="cirr", n_train=32, n_val=12, n_test=8, seed=3),
                           root=tmp_path / "cirr")
    params = {"data_root": str(world), "dataset": "cirr", "preset": "tiny", "stage1_run": "a", "stage2_run": "b",
              "precision": "fp32", "validate_every": 0, "topk_k": 12, "k": 8, "reranker": "joint", "init": "scratch",
              "scoring": "pairs", "epochs": 1, "max_epoch": 1, "lr": 1.0e-3, "batch_size": 4, "max_steps_per_epoch": 1,
              "notebooks": {"01_stage1_train": {"train_image_encoder": True}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-c", WITHOUT_NOTEBOOKS, str(tmp_path / "no_notebooks"), "all",
                           str(tmp_path / "params.yaml"), "--outputs", str(out), "--set", "fusion_weight=0.5"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["step"] for r in reports] == ["train-stage1", "topk", "train-stage2", "evaluate"]
    assert (out / "stage1/a/done.json").is_file() and (out / "stage2/b/done.json").is_file()
    record = json.loads((out / "stage2/b/metrics.json").read_text())
    assert record["fusion_weight"] == 0.5 and record["k"] == 8


def test_outputs_is_a_config_field_not_a_global(tmp_path):
    before = paths.OUTPUTS
    configs = launch.step_configs({"stage1_run": "a", "stage2_run": "b"}, launch.parse_steps("all,submit"), {},
                                  outputs=str(tmp_path))
    assert paths.OUTPUTS == before
    assert all(c.outputs == str(tmp_path) for c in configs)
    assert configs[0].stage1_folder.path == tmp_path / "stage1" / "a"
    assert configs[3].stage2_folder.path == tmp_path / "stage2" / "b"


@pytest.mark.parametrize("params, over, message", [
    ({"run_name_stage1": "a"}, {}, "'run_name_stage1' was renamed: use stage1_run"),
    ({"run_name_stage2": "a"}, {}, "'run_name_stage2' was renamed: use stage2_run"),
    ({}, {"run_name": "a"}, "'run_name' was renamed"),
    ({"epoch": 3}, {}, "declared by no notebook"),
    ({"lr": "2e-5"}, {}, "wrongly typed"),
    ({}, {"image_size": 48}, r"--set \['image_size'\]: not a parameter of the steps"),
])
def test_bad_or_renamed_parameters_are_refused(params, over, message):
    with pytest.raises(launch.LaunchError, match=message):
        launch.step_configs(params, launch.parse_steps("all"), over)


def test_evaluation_settings_go_to_evaluation_only():
    s1, topk, s2, ev = launch.step_configs({"k": 16, "fusion_weight": 0.25, "topk_k": 30}, launch.parse_steps("all"), {})
    assert (s2.k, ev.k, ev.fusion_weight, topk.topk_k) == (16, 16, 0.25, 30)
    assert not hasattr(s2, "fusion_weight") and not hasattr(s1, "topk_k")


@pytest.mark.slow
def test_the_shims_keep_their_command_lines():
    root = Path(paths.REPO_ROOT)
    for module in ("cirlib.launch", "cirlib.batch", "cirlib.demo"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                              cwd=root)
        assert proc.returncode == 0, (module, proc.stderr[-1000:])


@pytest.mark.parametrize("over, message", [
    (["--set", "dataset=fashioniq", "--set", "k=16"], r"Stage2TrainConfig: .*k=16: FashionIQ .* k must be >= 50"),
    (["--set", "batch_size=-3"], r"Stage1Config: TrainConfig: batch_size must be >= 1, got -3"),
])
def test_every_step_is_checked_before_the_first_one_runs(tmp_path, capsys, over, message):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"stage1_run": "a", "stage2_run": "b", "epochs": 1}))
    rc = launch.main(["all", str(tmp_path / "params.yaml"), "--outputs", str(tmp_path / "runs"), *over])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert re.search(message, err), err
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_a_later_step_is_checked_against_the_dataset_of_its_run(tmp_path):
    from cirlib.workbook.plan_check import PlanError, check_plan

    ev, = launch.step_configs({"stage2_run": "b", "k": 16}, ["evaluate"], {}, outputs=str(tmp_path))
    check_plan([ev])  # no such run yet: the step checks itself when it runs
    run = tmp_path / "stage2" / "b"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"dataset": "fashioniq", "categories": "dress"}))
    with pytest.raises(PlanError, match="EvaluateConfig: .*k must be >= 50"):
        check_plan([ev])
