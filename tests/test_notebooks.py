"""The workbook: notebook hygiene, parameters cells in step with the configs, the batch runner, the figures from the
original's label files, and every notebook run end to end on a tiny synthetic world through `run_batch`."""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import papermill
import pytest
import torch
import yaml

from cirlib.workbook import figures, inputs
from cirlib.run import batch
from cirlib import paths
from cirlib.data import synth, synth_circo
from cirlib.workbook.config import NOTEBOOK_CONFIGS, AnalysisConfig, ExplorerConfig, Stage2TrainConfig

NOTEBOOKS = NOTEBOOK_CONFIGS


def _read(stem: str) -> nbformat.NotebookNode:
    return nbformat.read(paths.NOTEBOOKS / f"{stem}.ipynb", as_version=4)


def _parameters_cell(book: nbformat.NotebookNode) -> tuple[int, nbformat.NotebookNode]:
    tagged = [(i, c) for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


# ------------------------------------------------------------------------------------------------ hygiene


def test_the_workbook_is_exactly_the_numbered_notebooks():
    assert [p.stem for p in batch.notebook_paths()] == list(NOTEBOOKS)


@pytest.mark.parametrize("stem", list(NOTEBOOKS))
def test_notebook_is_clean_and_uses_the_python3_kernel(stem):
    book = _read(stem)
    nbformat.validate(book)
    assert book.metadata["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(book.cells):
        assert set(cell.metadata) <= {"tags"}, f"cell {i} carries metadata {dict(cell.metadata)}"
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {i} has outputs or a count"
    first = book.cells[0]
    assert first.cell_type == "markdown" and "**Reads:**" in first.source and "**Writes:**" in first.source


@pytest.mark.parametrize("stem", list(NOTEBOOKS))
def test_notebook_is_a_thin_driver(stem):
    book = _read(stem)
    code = [c for c in book.cells if c.cell_type == "code"]
    idx, _ = _parameters_cell(book)
    # imports, then parameters, then the config, then 3-8 short calls
    assert book.cells[idx - 1].source.startswith("%matplotlib inline\nfrom cirlib")
    cfg_cell = book.cells[idx + 1].source
    assert cfg_cell.splitlines()[0] == f"cfg = from_namespace({NOTEBOOKS[stem].__name__}, globals())"
    assert 3 <= len(code) - 3 <= 8
    for cell in code:
        tree = ast.parse(cell.source.replace("%matplotlib inline", ""))
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        assert not defs, f"{stem}: notebooks define nothing; move {[d.name for d in defs]} into cirlib"
        if "parameters" not in cell.metadata.get("tags", []):
            assert len(cell.source.splitlines()) <= 15


@pytest.mark.parametrize("stem", list(NOTEBOOKS))
def test_parameters_cell_mirrors_its_config(stem):
    cls = NOTEBOOKS[stem]
    _, cell = _parameters_cell(_read(stem))
    tree = ast.parse(cell.source)
    names, defaults, annotations = [], {}, {}
    for node in tree.body:
        assert isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name), (
            f"{stem}: the parameters cell holds only annotated assignments, found {ast.dump(node)[:80]}")
        names.append(node.target.id)
        defaults[node.target.id] = ast.literal_eval(node.value)  # plain literals only
        annotations[node.target.id] = ast.unparse(node.annotation)
    fields = dataclasses.fields(cls)
    assert names == [f.name for f in fields]
    assert defaults == {f.name: f.default for f in fields}
    assert annotations == {f.name: str(f.type) for f in fields}
    # every line documents itself, and papermill (--help-notebook, the batch) sees every name: it skips lines with
    # a second "=", so the comments must not contain one
    assert all("  # " in line for line in cell.source.splitlines())
    assert cell.source == batch.parameters_cell_source(cls)  # what `--sync-parameters` writes
    assert list(papermill.inspect_notebook(str(paths.NOTEBOOKS / f"{stem}.ipynb"))) == names


# ------------------------------------------------------------------------------------------------ batch planning


def _plan(params: dict) -> dict[str, dict]:
    return {p.stem: v for p, v in batch.plan_batch(params, batch.notebook_paths()).items()}


def test_plan_passes_each_notebook_only_what_it_declares():
    plan = _plan({"dataset": "cirr", "image_size": 48, "topk_k": 10, "k": 5, "n_qualitative": 2,
                  "stage1_run": "a", "stage2_run": "b",
                  "notebooks": {1: {"epochs": 3}, "03_stage2_train": {"epochs": 7}}})
    assert plan["00_data_preview"] == {"dataset": "cirr", "image_size": 48}
    assert plan["01_stage1_train"] == {"dataset": "cirr", "stage1_run": "a", "epochs": 3}
    assert plan["02_stage1_topk"] == {"topk_k": 10, "stage1_run": "a"}
    assert plan["03_stage2_train"] == {"dataset": "cirr", "k": 5, "stage2_run": "b", "stage1_run": "a", "epochs": 7}
    assert plan["04_stage2_evaluate"] == plan["05_cirr_submission"] == {"k": 5, "stage2_run": "b"}
    assert plan["06_figures"] == {"dataset": "cirr", "n_qualitative": 2, "stage1_run": "a", "stage2_run": "b"}
    assert plan["07_explorer"] == {"dataset": "cirr", "stage1_run": "a", "stage2_run": "b"}  # no figure settings


@pytest.mark.parametrize("params, message", [
    ({"epoch": 3}, "declared by no notebook"),
    ({"notebooks": {"09_nothing": {}}}, "name no notebook"),
    ({"notebooks": {"00_data_preview": {"epochs": 3}}}, "not parameters of 00_data_preview"),
    ({"lr": "2e-5"}, "wrongly typed"),
    ({"epochs": True}, "wrongly typed"),
    ({"run_name_stage1": "y"}, "'run_name_stage1' was renamed: use stage1_run"),
    ({"run_name": "x"}, "'run_name' was renamed: use stage1_run"),
    ({"notebooks": {"04": {"run_name": "x"}}}, "notebooks.04: 'run_name' was renamed"),
])
def test_plan_rejects_bad_parameters(params, message):
    with pytest.raises(batch.BatchError, match=message):
        _plan(params)


@pytest.mark.parametrize("name", ["demo", "cirr", "fashioniq"])
def test_committed_parameter_files_plan_cleanly(name):
    data, batch_name = batch.load_params(paths.REPO_ROOT / "params" / f"{name}.yaml")
    assert batch_name == name
    plan = _plan(data)
    stage2 = plan["03_stage2_train"]
    assert plan["01_stage1_train"]["stage1_run"] == stage2["stage1_run"] == plan["06_figures"]["stage1_run"]
    assert plan["02_stage1_topk"]["stage1_run"] == stage2["stage1_run"]
    assert stage2["stage2_run"] == plan["04_stage2_evaluate"]["stage2_run"] == plan["07_explorer"]["stage2_run"]
    assert plan["05_cirr_submission"]["stage2_run"] == stage2["stage2_run"]
    if name != "demo":  # the paper's settings
        k = {"cirr": 50, "fashioniq": 100}[name]
        assert (stage2["k"], stage2["batch_size"], stage2["lr"], plan["02_stage1_topk"]["topk_k"]) == (k, 16, 2e-5, 200)
        assert (plan["01_stage1_train"]["batch_size"], plan["01_stage1_train"]["lr"]) == (512, 2e-5)


def test_select_and_output_dir_guards(tmp_path):
    sources = batch.notebook_paths()
    assert [p.stem for p in batch._select(sources, ["02", "01_stage1_train"])] == ["01_stage1_train", "02_stage1_topk"]
    assert [p.stem for p in batch._select(sources, ["7"])] == ["07_explorer"]
    with pytest.raises(batch.BatchError, match="matches no notebook"):
        batch._select(sources, ["99"])
    with pytest.raises(batch.BatchError, match="must not overwrite the sources"):
        batch.run_batch({}, ["00"], output_dir=paths.NOTEBOOKS)
    bad = tmp_path / "p.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(batch.BatchError, match="expected a mapping"):
        batch.load_params(bad)


def test_sync_rewrites_only_stale_parameters_cells(tmp_path):
    for stem in ("00_data_preview", "06_figures"):
        shutil.copy(paths.NOTEBOOKS / f"{stem}.ipynb", tmp_path)
    assert batch.sync_parameters_cells(tmp_path) == []
    book = nbformat.read(tmp_path / "06_figures.ipynb", as_version=4)
    idx, cell = _parameters_cell(book)
    cell.source = cell.source.replace("n_qualitative: int = 4", "n_qualitative: int = 9")
    nbformat.write(book, str(tmp_path / "06_figures.ipynb"))
    assert batch.sync_parameters_cells(tmp_path) == [tmp_path / "06_figures.ipynb"]
    synced = nbformat.read(tmp_path / "06_figures.ipynb", as_version=4)
    assert synced.cells[idx].source == batch.parameters_cell_source(AnalysisConfig)
    assert [c.source for c in synced.cells] == [c.source for c in _read("06_figures").cells]


def test_cli_reports_bad_parameters_and_exits_nonzero(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("epoch: 3\n")
    assert batch.main([str(tmp_path / "p.yaml"), "--only", "00"]) == 1
    assert "['epoch'] are declared by no notebook" in capsys.readouterr().err


def _write_notebook(src: Path, stem: str, parameters: str, body: str) -> None:
    """A two-cell notebook for the batch runner: a `parameters` cell, then `body`."""
    src.mkdir(exist_ok=True)
    book = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                             "language": "python"}})
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    book.cells = [params, nbformat.v4.new_code_cell(body)]
    nbformat.write(book, str(src / f"{stem}.ipynb"))


@pytest.mark.notebooks
def test_a_failing_notebook_stops_the_batch_naming_notebook_and_cell(tmp_path, capsys):
    src = tmp_path / "nbs"
    for stem, body in (("01_fails", 'raise ValueError("boom " + word)'), ("02_never", "print('unreachable')")):
        _write_notebook(src, stem, 'word: str = "x"  # a word', body)
    (tmp_path / "p.yaml").write_text("word: hello\n")
    with pytest.raises(batch.BatchError) as err:
        batch.run_batch(tmp_path / "p.yaml", output_dir=tmp_path / "out", notebook_dir=src)
    message = str(err.value)
    assert "01_fails.ipynb" in message and "In [" in message and "ValueError: boom hello" in message
    assert (tmp_path / "out" / "01_fails.ipynb").is_file()
    assert not (tmp_path / "out" / "02_never.ipynb").exists()


@pytest.mark.notebooks
def test_a_cell_over_the_timeout_stops_the_batch(tmp_path):
    src = tmp_path / "nbs"
    _write_notebook(src, "01_sleeps", 'word: str = "x"  # a word', "import time\ntime.sleep(60)")
    (tmp_path / "p.yaml").write_text("word: hello\n")
    with pytest.raises(batch.BatchError, match=r"01_sleeps.ipynb: a cell ran longer than cell_timeout_s=3"):
        batch.run_batch(tmp_path / "p.yaml", output_dir=tmp_path / "out", notebook_dir=src, cell_timeout_s=3)


def test_a_batch_without_run_runs_the_notebooks_that_apply_to_it():
    fiq, _ = batch.load_params(paths.REPO_ROOT / "params" / "fashioniq.yaml")
    del fiq["run"]
    sources = batch.notebook_paths()
    # no CIRCO root and no folder to search: 08 and 09 (whose metadata declares what they need) are left out
    assert [p.stem for p in batch.applicable(fiq, sources)] == [s for s in NOTEBOOKS if s not in ("08_search",
                                                                                                   "09_circo")]
    with_circo = {**fiq, "notebooks": {**fiq["notebooks"], "09": {"circo_root": "/data/CIRCO"}}}
    assert [p.stem for p in batch.applicable(with_circo, sources)] == [s for s in NOTEBOOKS if s != "08_search"]
    assert batch.notebook_needs(paths.NOTEBOOKS / "09_circo.ipynb") == ["circo_root"]
    assert batch.notebook_needs(paths.NOTEBOOKS / "05_cirr_submission.ipynb") == []  # it skips non-CIRR runs itself


@pytest.mark.notebooks
def test_a_notebook_needing_what_the_batch_does_not_give_is_left_out(tmp_path, capsys):
    src = tmp_path / "nbs"
    for stem in ("01_always", "02_needs_root"):
        _write_notebook(src, stem, 'root: str = ""  # a folder', "print('ran', root)")
    book = nbformat.read(src / "02_needs_root.ipynb", as_version=4)
    book.metadata["cirlib"] = {"needs": ["root"]}
    nbformat.write(book, str(src / "02_needs_root.ipynb"))
    (tmp_path / "p.yaml").write_text("batch_name: b\n")
    executed = batch.run_batch(tmp_path / "p.yaml", output_dir=tmp_path / "out", notebook_dir=src)
    assert [p.stem for p in executed] == ["01_always"]
    assert "leaving out 02_needs_root.ipynb: it needs root" in capsys.readouterr().out
    (tmp_path / "p.yaml").write_text("batch_name: b\nrun: [02]\n")  # named in run: it runs regardless
    assert [p.stem for p in batch.run_batch(tmp_path / "p.yaml", output_dir=tmp_path / "out", notebook_dir=src)
            ] == ["02_needs_root"]
    book.metadata["cirlib"] = {"needs": ["rot"]}
    nbformat.write(book, str(src / "02_needs_root.ipynb"))
    with pytest.raises(batch.BatchError, match=r"02_needs_root.ipynb: metadata cirlib.needs names \['rot'\]"):
        batch.notebook_needs(src / "02_needs_root.ipynb")


@pytest.mark.notebooks
def test_executed_copies_show_finished_text_progress(tmp_path):
    """A batch run's kernels draw text bars: the executed copy ends at 100%, with no widget left at its first 0%."""
    src = tmp_path / "nbs"
    body = ("from cirlib.progress import progress_bar\nfor _ in progress_bar(range(steps), desc='epochs'):\n"
            "    for _ in progress_bar(range(2), desc='epoch', leave=False):\n        pass")  # a nested bar, as fit's
    _write_notebook(src, "01_bars", "steps: int = 3  # bar length", body)
    (tmp_path / "p.yaml").write_text("steps: 4\n")
    (executed,) = batch.run_batch(tmp_path / "p.yaml", output_dir=tmp_path / "out", notebook_dir=src)
    outputs = nbformat.read(executed, as_version=4).cells[-1].outputs
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    # What a notebook shows: each line as its last carriage return leaves it (cursor-up escapes are not interpreted,
    # so a bar drawn on a line of its own would leave every earlier state behind as a line).
    shown = [line.rsplit("\r", 1)[-1].strip() for line in text.split("\n")]
    bars = [line for line in shown if "%|" in line]
    assert bars and all("100%" in line for line in bars), bars
    assert any(line.startswith("epochs: 100%") and "4/4" in line for line in bars)
    assert os.environ.get("CIRLIB_PROGRESS") is None  # the runner's own environment is restored


# ------------------------------------------------------------------------------------------------ original's labels


def _fake_original_topk(stage2: torch.Tensor, k_gallery: int, seed: int) -> tuple[dict, np.ndarray]:
    """A CIRR top-K dict in the original's layout whose stage-I labels put each hit at a random position."""
    rng = np.random.default_rng(seed)
    n, k = stage2.shape
    gallery = np.array([f"dev-{i}-img0" for i in range(k_gallery)])
    names = np.stack([gallery[rng.permutation(k_gallery)[:k + 1]] for _ in range(n)])  # (N, K + 1)
    has_hit = stage2.any(dim=1).numpy()
    rank1 = np.where(has_hit, rng.integers(0, k, size=n), k)  # column K holds the target of a miss
    targets = names[np.arange(n), rank1]
    labels = torch.from_numpy(names[:, :k] == targets[:, None])
    return ({"sorted_index_names": names[:, :k], "target_names": targets.tolist(), "index_names": gallery.tolist(),
             "labels": labels, "split": "val"}, np.where(has_hit, rank1, -1))


@pytest.mark.slow
def test_figures_from_the_original_label_files(shared_dir, tmp_path):
    labels2 = torch.load(shared_dir / "data/original-artifacts/analysis_plot/cirr_stageII_labels_val.pt",
                         weights_only=True)
    assert labels2.shape == (4181, 200)
    raw, rank1 = _fake_original_topk(labels2, 400, seed=0)
    orig = tmp_path / "orig"
    orig.mkdir()
    torch.save(raw, orig / "cirr_top_200_val.pt")
    shutil.copy(shared_dir / "data/original-artifacts/analysis_plot/cirr_stageII_labels_val.pt", orig)
    cfg = AnalysisConfig(dataset="cirr", original_dir=str(orig), figures_dir=str(tmp_path / "figs"))

    table = inputs.check_inputs(cfg, "make_figures")
    assert table["exists"].all() and len(table) == 2  # no models or images needed for the original's files
    files = figures.make_figures(cfg)
    assert sorted(p.name for p in files) == sorted(f"{stem}.{ext}" for stem in ("fig8_rank_shift_cirr",
                                                                                   "recall_curves_cirr")
                                                     for ext in ("pdf", "png"))
    assert all(p.stat().st_size > 1000 for p in files)
    row = figures.rank_shift_table(cfg).iloc[0]
    # the stage-II mean rank of the released file (original-system.md section 6.4), and our stage-I construction
    assert row["queries"] == 4181 and row["not in top-K"] == 23
    assert row["mean rank, stage II"] == pytest.approx(4.0943, abs=1e-3)
    assert row["mean rank, stage I"] == pytest.approx(rank1[rank1 >= 0].mean(), abs=1e-3)


def test_missing_inputs_fail_early_naming_what_makes_them(tmp_path):
    cfg = AnalysisConfig(dataset="fashioniq", original_dir=str(tmp_path))
    expected = (r"(?s)6 input\(s\) missing.*"
                r"stage-I top-K file \(fashioniq_dress, original\): \S*fiq_top_200_val_dress\.pt")
    with pytest.raises(FileNotFoundError, match=expected):
        inputs.check_inputs(cfg, "make_figures")
    s2 = Stage2TrainConfig(stage1_run=f"pytest_absent_{uuid.uuid4().hex[:6]}", data_root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="(?s)stage-I model: .*(made by 01_stage1_train)"):
        inputs.check_inputs(s2, "train_stage2")
    with pytest.raises(TypeError, match="takes a TopKConfig"):
        inputs.check_inputs(s2, "extract_topk")


def test_the_sprc_parameter_file_makes_every_notebooks_config_and_passes_the_plan_check():
    """params/sprc_cirr.yaml: SPRC's retriever (sprc-g, SPRC's CIRR settings) as stage I, the joint re-ranker at
    blip-base over its train/val/test1 top-K as stage II; every planned notebook's config builds from it."""
    from cirlib.run import launch
    from cirlib.workbook.plan_check import check_plan

    data, batch_name = batch.load_params(paths.REPO_ROOT / "params" / "sprc_cirr.yaml")
    assert batch_name == "sprc_cirr"
    plan = _plan(data)
    configs = {stem: NOTEBOOKS[stem](**values) for stem, values in plan.items()}
    s1, s2 = configs["01_stage1_train"], configs["03_stage2_train"]
    assert (s1.preset, s1.batch_size, s1.lr, s1.adam_beta2, s1.adam_eps, s1.weight_decay, s1.loss_weights) == (
        "sprc-g", 128, 1e-5, 0.98, 1e-7, 0.05, "")
    assert (s1.schedule, s1.epochs, s1.max_epoch, s1.onecycle_pct_start, s1.onecycle_div_factor) == (
        "onecycle", 50, 80, 0.02, 25.0)
    assert (s2.preset, s2.reranker, s2.init, s2.vision_from_stage1, s2.stage1_run) == (
        "blip-base", "joint", "pretrained", False, s1.stage1_run)
    assert s2.hard_negatives > 0 and configs["02_stage1_topk"].topk_splits == "train,val,test1"
    check_plan(launch.step_configs(data, launch.parse_steps("all"), {}))
    with pytest.raises(ValueError, match="needs BLIP z_t; first stage 'sprc' gives none"):
        check_plan(launch.step_configs(data, launch.parse_steps("all"), {"reranker": "dual"}))


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def smoke_batch(tmp_path_factory):
    """A tiny synthetic CIRR world and every notebook run on it with smoke=True; run folders removed afterwards."""
    tmp = tmp_path_factory.mktemp("workbook")
    world = synth.generate(synth.SynthConfig(layout="cirr", n_train=32, n_val=24, n_test=12, seed=3),
                           root=tmp / "cirr_dataset")
    tag = uuid.uuid4().hex[:8]
    s1, s2 = f"pytest_smoke_{tag}_s1", f"pytest_smoke_{tag}_s2"
    params = {
        "batch_name": f"pytest_smoke_{tag}", "smoke": True, "dataset": "cirr", "data_root": str(world),
        "preset": "tiny", "precision": "fp32", "stage1_run": s1, "stage2_run": s2,
        "train_image_encoder": True, "reranker": "joint", "init": "scratch",
        "joint_difference": True, "scoring": "pairs",  # the demo's stage II, through every notebook that loads it
        "topk_k": 50, "topk_splits": "val,test1", "k": 50, "figures_dir": str(tmp / "figures"),
        "notebooks": {"00_data_preview": {"image_size": 48},
                      "08_search": {"image_dir": str(world / "dev"), "index": str(tmp / "search_index")},
                      # a CIRCO-layout world of the same scene grammar (60 images: 50 ids besides the reference)
                      "09_circo": {"circo_root": str(synth_circo.generate_circo(
                          synth_circo.CircoSynthConfig(n_val=4, n_test=4, gallery_size=60, seed=3), tmp / "CIRCO")),
                          "index": str(tmp / "circo_index")}},
    }
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    run_dirs = [paths.OUTPUTS / "stage1" / s1, paths.OUTPUTS / "stage2" / s2,
                paths.OUTPUTS / "rerank" / f"{s2}_val_stage1_topk"]  # notebook 10's default result folder
    try:
        # a kernel that stops answering fails the test (naming the notebook) instead of hanging the suite
        executed = batch.run_batch(tmp / "params.yaml", output_dir=tmp / "executed", cell_timeout_s=600)
        yield {"tmp": tmp, "world": world, "executed": executed, "s1": run_dirs[0], "s2": run_dirs[1],
               "params": params, "run_dirs": run_dirs}
    finally:
        for d in run_dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.mark.notebooks
def test_every_notebook_runs_and_writes_its_artifacts(smoke_batch):
    tmp, s1, s2 = smoke_batch["tmp"], smoke_batch["s1"], smoke_batch["s2"]
    assert [p.name for p in smoke_batch["executed"]] == [f"{stem}.ipynb" for stem in NOTEBOOKS]
    for p in smoke_batch["executed"]:
        book = nbformat.read(p, as_version=4)
        injected = [c for c in book.cells if "injected-parameters" in c.metadata.get("tags", [])]
        takes_smoke = "smoke" in {f.name for f in dataclasses.fields(NOTEBOOKS[p.stem])}  # 05 has nothing to shrink
        assert len(injected) == 1 and ("smoke = True" in injected[0].source) == takes_smoke
        errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors
    # the sources stay clean
    assert all(c.get("outputs", []) == [] for c in _read("01_stage1_train").cells)
    for f in ("model/config.json", "metrics.json", "metrics.jsonl", "topk_val.pt", "topk_test1.pt"):
        assert (s1 / f).is_file(), f
    for f in ("model/config.json", "metrics.json", "stage2_labels_val.pt",
              "submission/recall_submission_stage2.json", "submission/recall_subset_submission_stage2_stage1.json"):
        assert (s2 / f).is_file(), f
    metrics = json.loads((s2 / "metrics.json").read_text())
    assert set(metrics["stage1"]) >= {"R@1", "R@5", "Rsubset@1"} and metrics["k"] == 50
    # notebook 10 re-ranked the stage-I val top-k file as imported candidates: exactly notebook 04's numbers
    reranked = json.loads((smoke_batch["run_dirs"][2] / "metrics.json").read_text())
    assert (reranked["imported"], reranked["reranked"]) == (metrics["stage1"], metrics["stage2"])
    for stem in ("fig8_rank_shift_cirr", "recall_curves_cirr", "qualitative_cirr"):
        for ext in ("pdf", "png"):
            assert (tmp / "figures" / f"{stem}.{ext}").stat().st_size > 1000
    # the four submission files pass the server's checks (what notebook 05 shows)
    files = {f.stem: f for f in sorted((s2 / "submission").glob("*.json"))}
    report = figures.submission_report(Stage2TrainConfig(data_root=str(smoke_batch["world"])), files)
    assert len(report) == 4 and (report["problems"] == "none").all()
    assert sorted(map(tuple, report["names per list"])) == [(3,), (3,), (50,), (50,)]


@pytest.mark.notebooks
def test_the_tables_notebook_tables_the_smoke_runs_stage_i_beside_stage_ii(smoke_batch):
    s2, figs = smoke_batch["s2"], smoke_batch["tmp"] / "figures"
    metrics = json.loads((s2 / "metrics.json").read_text())
    table = pd.read_csv(figs / "table_cirr.csv")
    ours = table[table["run_path"].astype(str).str.endswith(f"stage2/{s2.name}")].set_index("Stage")
    for stage, label in (("stage1", "I"), ("stage2", "II")):
        assert ours.loc[label, "R@1"] == pytest.approx(metrics[stage]["R@1"])
        assert ours.loc[label, "Avg"] == pytest.approx((metrics[stage]["R@5"] + metrics[stage]["Rsubset@1"]) / 2)
    assert f"]({os.path.relpath(s2, figs)}) @ " in (figs / "table_cirr.md").read_text()
    assert (figs / "table_cirr.tex").read_text().count(r"\bottomrule") == 1


@pytest.mark.notebooks
def test_explorer_reproduces_the_saved_stage2_ranking(smoke_batch):
    from cirlib.workbook.explorer import Explorer

    p = smoke_batch["params"]
    cfg = ExplorerConfig(stage1_run=smoke_batch["s1"].name, stage2_run=smoke_batch["s2"].name, dataset="cirr",
                         data_root=p["data_root"])
    labels2 = torch.load(smoke_batch["s2"] / "stage2_labels_val.pt", weights_only=True)
    ex = Explorer(cfg)
    k, w = ex.default_settings()
    assert (k, w) == (50, 0.0)
    for row in range(3):
        ranking = ex.ranking(row, k)
        saved = int(labels2[row].int().argmax()) + 1 if labels2[row].any() else None
        assert ranking.rank_of_target()[1] == saved
        assert sorted(ranking.final_names) == sorted(ranking.stage1_names)
    fused = ex.ranking(0, 10, fusion_weight=1.0)  # stage I alone: the file's order back
    assert list(fused.final_names) == list(fused.stage1_names)


# ------------------------------------------------------------------------------------------------ SPRC end to end


@pytest.fixture(scope="module")
def sprc_smoke_batch(tmp_path_factory):
    """SPRC (sprc-tiny) as stage I through notebooks 01 and 02, the tiny joint re-ranker over its top-k through 03
    and 04; a small CIRR world, smoke=True (notebook 10 is left out: it re-ranks any top-k file alike, and its
    kernel would add a fifth to the batch's time)."""
    tmp = tmp_path_factory.mktemp("sprc_workbook")
    world = synth.generate(synth.SynthConfig(layout="cirr", n_train=16, n_val=8, n_test=2, seed=1),
                           root=tmp / "cirr_dataset")
    params = {
        "batch_name": "pytest_sprc_smoke", "run": "01,02,03,04", "smoke": True, "dataset": "cirr",
        "data_root": str(world), "outputs": str(tmp / "outputs"), "precision": "fp32", "stage1_run": "sprc",
        "stage2_run": "joint", "topk_k": 10, "topk_splits": "val", "k": 8,
        "notebooks": {"01_stage1_train": {"preset": "sprc-tiny", "feature_store": "float32"},
                      "03_stage2_train": {"preset": "tiny", "reranker": "joint", "init": "scratch",
                                          "vision_from_stage1": False, "scoring": "pairs"}},
    }
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    executed = batch.run_batch(tmp / "params.yaml", output_dir=tmp / "executed", cell_timeout_s=600)
    return {"executed": executed, "outputs": tmp / "outputs"}


@pytest.mark.notebooks
def test_the_notebooks_rerank_sprcs_topk_with_our_stage2(sprc_smoke_batch):
    out = sprc_smoke_batch["outputs"]
    assert [p.stem for p in sprc_smoke_batch["executed"]] == ["01_stage1_train", "02_stage1_topk", "03_stage2_train",
                                                              "04_stage2_evaluate"]
    for p in sprc_smoke_batch["executed"]:
        book = nbformat.read(p, as_version=4)
        assert not [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert json.loads((out / "stage1/sprc/model/config.json").read_text())["first_stage"] == "sprc"
    from cirlib.retrieval.topk import TopK

    made_by = TopK.load(out / "stage1/sprc/topk_val.pt").produced_by
    assert (made_by["first_stage"], made_by["preset"]) == ("sprc", "sprc-tiny")
    record = json.loads((out / "stage2/joint/metrics.json").read_text())
    assert record["k"] == 8 and set(record["stage1"]) >= {"R@1", "R@5", "Rsubset@1"}
    assert set(record["stage2"]) >= {"R@1", "R@5", "Rsubset@1"}
    assert str(out / "stage1/sprc/topk_val.pt") in json.dumps(record["produced_by"])
    print("stage I", record["stage1"], "stage II", record["stage2"])


# ------------------------------------------------------------------------------------------------ FashionIQ end to end


@pytest.mark.notebooks
def test_every_notebook_runs_on_a_fashioniq_world_with_hard_negatives(tmp_path):
    """The batch on a FashionIQ-layout world (three categories) as a user runs it with the paper's file, made tiny:
    train top-K for stage-II hard negatives (notebook 02 used to fail ranking train queries), per-category
    evaluation, Figure 8 per category; notebook 05 says FashionIQ has no test server and writes nothing."""
    # 10 val queries per category: a 60-image val gallery, enough for K = 50 (FashionIQ's R@50 needs k >= 50)
    world = synth.generate(synth.SynthConfig(layout="fashioniq", n_train=48, n_val=30, n_test=6, seed=3),
                           root=tmp_path / "fashionIQ_dataset")
    data, _ = batch.load_params(paths.REPO_ROOT / "params" / "fashioniq.yaml")
    params = {k: v for k, v in data.items() if k not in ("notebooks", "tokenizer", "pretrained", "num_workers")}
    params.update({
        "batch_name": "pytest_fiq", "smoke": True, "data_root": str(world), "outputs": str(tmp_path / "outputs"),
        "figures_dir": str(tmp_path / "figures"), "preset": "tiny", "precision": "fp32", "train_image_encoder": True,
        "reranker": "joint", "init": "scratch", "scoring": "pairs",
        "topk_k": 60, "topk_splits": "val,train", "k": 50, "hard_negatives": 2, "mining_k": 20,
        # stage II without its per-epoch validation (3 x 10 x 50 pairs re-ranked on two CPU cores): notebook 04 re-ranks
        # them once; smoke would force validation on
        "notebooks": {"00_data_preview": {"image_size": 48},
                      "03_stage2_train": {"smoke": False, "epochs": 1, "max_epoch": 1, "max_steps_per_epoch": 1,
                                          "batch_size": 4, "validate_every": 0},
                      "08_search": {"image_dir": str(world / "images"), "index": str(tmp_path / "search_index"),
                                    "reference": ""}},
    })
    assert (params["dataset"], params["categories"]) == ("fashioniq", "dress,shirt,toptee")
    # the paper's file runs the benchmark notebooks 00-07; here also 08, searching the world's images (09 is CIRCO's),
    # 10, re-ranking the stage-I top-k files per category as imported candidates, and 11, the FashionIQ table
    assert params["run"] == "00,01,02,03,04,05,06,07"
    params["run"] += ",08,10,11"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    executed = batch.run_batch(tmp_path / "params.yaml", output_dir=tmp_path / "executed", cell_timeout_s=600)
    assert [p.name for p in executed] == [f"{stem}.ipynb" for stem in NOTEBOOKS if stem != "09_circo"]
    for p in executed:
        book = nbformat.read(p, as_version=4)
        assert not [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    s1 = tmp_path / "outputs" / "stage1" / params["stage1_run"]
    s2 = tmp_path / "outputs" / "stage2" / params["stage2_run"]
    for cat in ("dress", "shirt", "toptee"):
        assert (s1 / f"topk_val_{cat}.pt").is_file() and (s1 / f"topk_train_{cat}.pt").is_file()
        assert (s2 / f"stage2_labels_val_{cat}.pt").is_file()
        for stem in (f"fig8_rank_shift_fashioniq_{cat}", f"recall_curves_fashioniq_{cat}"):
            assert (tmp_path / "figures" / f"{stem}.png").stat().st_size > 1000
    record = json.loads((s2 / "done.json").read_text())
    assert record["config"]["hard_negatives"] == 2 and len(record["inputs"]["train_topk"]) == 3
    metrics = json.loads((s2 / "metrics.json").read_text())
    assert metrics["k"] == 50 and {"dress_R@10", "avg_R@50", "average_recall"} <= set(metrics["stage2"])
    assert not (s2 / "submission").exists()
    reranked = json.loads((tmp_path / "outputs" / "rerank" / f"{params['stage2_run']}_val_stage1_topk" / "metrics.json"
                           ).read_text())
    assert reranked["reranked"] == metrics["stage2"] and set(reranked["analysis"]["outcomes"]) == {"dress", "shirt",
                                                                                                  "toptee"}
    # notebook 11: the FashionIQ table holds the evaluation's stage-II row, per-category columns and Avg
    table = pd.read_csv(tmp_path / "figures" / "table_fashioniq.csv")
    ours = table[table["run_path"].astype(str).str.endswith(f"stage2/{params['stage2_run']}")].set_index("Stage")
    assert ours.loc["II", "Dress R@10"] == pytest.approx(metrics["stage2"]["dress_R@10"])
    assert ours.loc["II", "Avg"] == pytest.approx(metrics["stage2"]["average_recall"])


def test_a_batch_is_checked_before_its_first_notebook_runs(tmp_path):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"dataset": "fashioniq", "k": 16, "stage1_run": "a",
                                                     "stage2_run": "b", "epochs": 1}))
    with pytest.raises(batch.BatchError, match=r"refused before any step ran: Stage2TrainConfig: .*k must be >= 50"):
        batch.run_batch(tmp_path / "p.yaml", ["01", "02", "03"], output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # no notebook ran
