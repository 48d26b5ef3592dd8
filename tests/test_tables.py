"""The paper's tables (`cirlib.workbook.tables`, notebook 11, `python -m cirlib.tables`): every finished result under an
outputs root collected, the rest listed with the reason; Markdown, booktabs LaTeX (checked by parsing) and CSV with
each row's run folder and commit; the published rows cite their sources and add up. The formatting tests read a
hand-written outputs root; the slow test tables a tiny run made by the real steps."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cirlib.data.dataset import get_dataset
from cirlib.run import tables as tables_cli
from cirlib.workbook import tables
from cirlib.workbook.config import TablesConfig

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CIRR_S1 = {"R@1": 30.0, "R@5": 60.25, "R@10": 70.0, "R@50": 90.0, "Rsubset@1": 55.75, "Rsubset@2": 75.0,
           "Rsubset@3": 88.0, "selection": 58.0}
CIRR_S2 = {"R@1": 40.5, "R@5": 70.0, "R@10": 80.0, "R@50": 90.0, "Rsubset@1": 66.0, "Rsubset@2": 80.0,
           "Rsubset@3": 90.0, "selection": 68.0}
FIQ_S2 = {"dress_R@10": 20.0, "dress_R@50": 40.0, "shirt_R@10": 22.0, "shirt_R@50": 44.0, "toptee_R@10": 24.0,
          "toptee_R@50": 48.0, "avg_R@10": 22.0, "avg_R@50": 44.0, "average_recall": 33.0}


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _finished(root: Path, stage: str, name: str, config: dict, weights: str) -> Path:
    run = root / stage / name
    (run / "model").mkdir(parents=True)
    _json(run / "config.json", config)
    _json(run / "done.json", {"config": config, "config_hash": "h", "weights_sha256": weights})
    return run


def _made_by(dirty: bool = False) -> dict:
    return {"code": {"commit": COMMIT, "dirty": dirty}, "data": {"root": "/data/cirr_dataset"}}


def _evaluation(stage1: dict, stage2: dict, k: int, weights2: str) -> dict:
    return {"stage1": stage1, "stage2": stage2, "k": k, "split": "val", "fusion_weight": 0.0, "queries": 100,
            "produced_by": {"stage1_weights_sha256": "a" * 64, "stage2_weights_sha256": weights2},
            "provenance": _made_by()}


@pytest.fixture()
def outputs(tmp_path) -> Path:
    """A hand-written outputs root: finished CIRR stage I and II (with CIRCO results), a FashionIQ stage II, and one
    folder of each kind the tables leave out."""
    root = tmp_path / "outputs"
    s1 = _finished(root, "stage1", "s1_base", {"dataset": "cirr", "data_root": ""}, "a" * 64)
    _json(s1 / "metrics.json", {"final": CIRR_S1, "split": "val", "weights_sha256": "a" * 64,
                                "query_counts": {"val": {"evaluated": 100}}, "provenance": _made_by(dirty=True)})
    s2 = _finished(root, "stage2", "s2_joint", {"dataset": "cirr", "stage1_run": "s1_base"}, "b" * 64)
    within_32 = [{k: v for k, v in m.items() if k != "R@50"} for m in (CIRR_S1, CIRR_S2)]  # K=32: no R@50
    _json(s2 / "metrics.json", _evaluation(*within_32, 32, "b" * 64))
    _json(s2 / "circo" / "metrics_circo.json", {
        "metrics": {"stage1": {"mAP@5": 10.0, "mAP@10": 11.0, "mAP@25": 12.0, "mAP@50": 13.0,
                               "semantic_mAP@10": {"addition": 5.0}},
                    "stage2": {"mAP@5": 20.0, "mAP@10": 21.0, "mAP@25": 22.0, "mAP@50": 23.0}},
        "queries": 7, "settings": {"k": 50},
        "provenance": {**_made_by(), "config": {"stage1_run": "s1_base", "stage2_run": "s2_joint"},
                       "data": {"dataset": "circo", "root": "/data/CIRCO"},
                       "weights": {"stage1": {"sha256": "a" * 64}, "stage2": {"sha256": "b" * 64}}}})
    fiq = _finished(root, "stage2", "fiq_s2", {"dataset": "fashioniq", "stage1_run": "fiq_s1"}, "c" * 64)
    _json(fiq / "metrics.json", _evaluation(FIQ_S2, FIQ_S2, 100, "c" * 64))
    # left out: training never finished; trained but not evaluated; evaluated before training again; a broken record
    (root / "stage1" / "unfinished").mkdir(parents=True)
    _json(root / "stage1" / "unfinished" / "config.json", {"dataset": "cirr"})
    _finished(root, "stage2", "not_evaluated", {"dataset": "cirr"}, "d" * 64)
    stale = _finished(root, "stage2", "stale", {"dataset": "cirr"}, "e" * 64)
    _json(stale / "metrics.json", _evaluation(CIRR_S1, CIRR_S2, 50, "f" * 64))
    broken = _finished(root, "stage2", "broken", {"dataset": "cirr"}, "g" * 64)
    (broken / "done.json").write_text('{"config": ')
    return root


def _cfg(root: Path, out: Path, **kw) -> TablesConfig:
    return TablesConfig(outputs=str(root), figures_dir=str(out), **kw)


def test_every_finished_result_is_collected_and_every_other_folder_listed_with_why(outputs):
    found = tables.collect(outputs)
    rows = found.rows.set_index(["run_path", "dataset", "stage"])
    s1, s2 = str(outputs / "stage1" / "s1_base"), str(outputs / "stage2" / "s2_joint")
    assert rows.loc[(s1, "cirr", "I"), "k"] == "all" and rows.loc[(s1, "cirr", "I"), "R@50"] == 90.0
    assert rows.loc[(s1, "cirr", "I"), "dirty"] and rows.loc[(s1, "cirr", "I"), "queries"] == 100
    second = rows.loc[(s2, "cirr", "II")]
    assert (second["run"], second["k"], second["fusion"], second["commit"]) == ("s2_joint", 32, 0.0, COMMIT)
    assert second["weights_sha256"] == "b" * 64 and rows.loc[(s2, "cirr", "I"), "weights_sha256"] == "a" * 64
    assert second["Avg"] == pytest.approx((70.0 + 66.0) / 2) and pd.isna(second["R@50"])
    assert rows.loc[(s2, "circo", "II"), "mAP@10"] == 21.0 and rows.loc[(s2, "circo", "I"), "k"] == "all"
    assert rows.loc[(str(outputs / "stage2" / "fiq_s2"), "fashioniq", "II"), "Avg"] == pytest.approx(33.0)
    reasons = {Path(p).name: r for p, r in found.skipped.itertuples(index=False)}
    assert sorted(reasons) == ["broken", "not_evaluated", "stale", "unfinished"]
    assert reasons["unfinished"].startswith("unfinished: no done.json")
    assert reasons["not_evaluated"].startswith("trained but not evaluated")
    assert reasons["stale"].startswith("stale: metrics.json evaluated other weights")
    assert reasons["broken"].startswith("damaged:") and "done.json" in reasons["broken"]
    assert list(tables.collect(outputs, ["fiq_s2"]).rows["dataset"]) == ["fashioniq", "fashioniq"]


def test_an_outputs_root_without_run_folders_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no run folders"):
        tables.collect(tmp_path)


def test_markdown_rows_link_to_their_run_folder_and_commit(outputs, tmp_path):
    out = tmp_path / "figures"
    tables.write_tables(_cfg(outputs, out, formats="md"))
    text = (out / "table_cirr.md").read_text()
    links = re.findall(r"\]\(([^)]+)\) @ (\w+)", text)
    assert {(str((out / link).resolve()), commit) for link, commit in links} == {
        (str((outputs / "stage1" / "s1_base").resolve()), COMMIT[:7]),
        (str((outputs / "stage2" / "s2_joint").resolve()), COMMIT[:7])}
    assert "(dirty)" in text  # the stage-I run was made from a dirty tree
    row = next(line for line in text.splitlines() if line.startswith("| s2_joint | II |"))
    assert row.split(" | ")[1:13] == ["II", "val", "32", "100", "40.50", "70.00", "80.00", "–", "66.00", "80.00",
                                      "90.00", "68.00"]
    assert "[1] Z. Liu, W. Sun, D. Teney, S. Gould." in text  # the original's row, cited under the table
    assert sorted(p.name for p in out.glob("table_*.md")) == ["table_circo.md", "table_cirr.md",
                                                              "table_fashioniq.md"]
    assert not list(out.glob("*.tex")) and not list(out.glob("*.csv"))


def _booktabs_rows(tex: str) -> tuple[str, list[list[str]]]:
    """Parse a booktabs tabular: its column spec and the cells of every row, checking the rules' order."""
    for env in ("table", "tabular", "minipage"):
        assert tex.count(rf"\begin{{{env}}}") == tex.count(rf"\end{{{env}}}") == 1, env
    assert tex.count("{") - tex.count(r"\{") == tex.count("}") - tex.count(r"\}")
    spec, body = re.search(r"\\begin\{tabular\}\{([lrc]+)\}\n(.*?)\n\\end\{tabular\}", tex, re.S).groups()
    lines = body.splitlines()
    assert lines[0] == r"\toprule" and lines[2] == r"\midrule" and lines[-1] == r"\bottomrule"
    assert r"\toprule" not in lines[1:] and r"\bottomrule" not in lines[:-1]
    rows = []
    for line in lines:
        if line in (r"\toprule", r"\midrule", r"\bottomrule"):
            continue
        assert line.endswith(r" \\"), line
        rows.append(re.split(r"(?<!\\)&", line[:-3]))
    return spec, rows


def test_the_latex_is_a_booktabs_table_with_escaped_cells(outputs, tmp_path):
    out = tmp_path / "figures"
    tables.write_tables(_cfg(outputs, out, formats="latex"))
    for path in sorted(out.glob("table_*.tex")):
        tex = path.read_text()
        spec, rows = _booktabs_rows(tex)
        assert all(len(cells) == len(spec) for cells in rows), path.name
        for cells in rows:
            for cell in cells:
                assert not re.search(r"(?<!\\)[_%#$&]", cell), (path.name, cell)
        assert tex.count(r"\midrule") == (2 if path.stem != "table_circo" else 1)  # head | published | ours
        notes = [line for line in tex.splitlines() if line.startswith("[")]  # the references under the tabular
        assert notes and not [n for n in notes if re.search(r"(?<!\\)[_%#$&]", n)], path.name
    spec, rows = _booktabs_rows((out / "table_cirr.tex").read_text())
    ours = [cells for cells in rows if cells[0].strip() == r"s2\_joint"]
    assert len(ours) == 1 and [c.strip() for c in ours[0][5:13]] == ["40.50", "70.00", "80.00", "--", "66.00",
                                                                     "80.00", "90.00", "68.00"]
    ref = ours[0][-1].strip()  # the row's reference, listed under the tabular with run folder and commit
    listed = next(line for line in (out / "table_cirr.tex").read_text().splitlines() if line.startswith(ref + " "))
    assert r"stage2/s2\_joint" in listed and COMMIT[:7] in listed and "b" * 12 in listed


def test_csv_rows_carry_run_folder_commit_weights_or_source(outputs, tmp_path):
    out = tmp_path / "figures"
    tables.write_tables(_cfg(outputs, out, formats="csv"))
    table = pd.read_csv(out / "table_cirr.csv")
    ours, theirs = table[table["run_path"].notna()], table[table["run_path"].isna()]
    assert set(ours["commit"]) == {COMMIT} and set(ours["weights_sha256"]) == {"a" * 64, "b" * 64}
    assert theirs["source"].str.len().min() > 20 and "Candidate Re-ranking (Liu et al., TMLR'24)" in set(
        theirs["Method"])
    assert list(table.columns[:13]) == ["Method", "Stage", "Split", "K", "N", "R@1", "R@5", "R@10", "R@50", "Rs@1",
                                        "Rs@2", "Rs@3", "Avg"]
    assert len(pd.read_csv(out / tables.ROWS_FILE)) == 7
    assert len(pd.read_csv(out / tables.SKIPPED_FILE)) == 4
    record = json.loads((out / tables.PROVENANCE_FILE).read_text())
    assert record["step"] == "tables" and len(record["inputs"]) == 4  # the four metrics files read


def test_published_rows_cite_their_source_and_their_averages_add_up():
    published = tables.load_published()
    assert published["source"].str.len().min() > 40 and published["checked"].str.len().min() > 5
    original = published[published["method"] == "Candidate Re-ranking (Liu et al., TMLR'24)"].set_index("dataset")
    assert original.loc["cirr", "Avg"] == 80.90 and original.loc["cirr", "R@1"] == 50.55
    assert original.loc["fashioniq", "Avg"] == 62.15 and original.loc["fashioniq", "k"] == 100
    for row in published.to_dict("records"):
        metrics = {k: v for k, v in row.items() if isinstance(v, float) and not pd.isna(v) and k != "k"}
        ds = get_dataset(row["dataset"])
        for k in getattr(ds, "headline_ks", ()) if ds.categories else ():
            parts = [metrics[f"{c}_R@{k}"] for c in ds.categories]
            assert metrics[f"avg_R@{k}"] == pytest.approx(sum(parts) / len(parts), abs=0.01), row["method"]
        if "Avg" in metrics:  # printed to two decimals: the parts' average within rounding
            assert metrics["Avg"] == pytest.approx(ds.table_average(metrics), abs=0.01), row["method"]


def test_a_published_file_that_cites_nothing_is_refused(tmp_path):
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump({"rows": [{"method": "M", "dataset": "cirr", "split": "val", "checked": "V",
                                              "metrics": {"R@1": 1.0}}]}))
    with pytest.raises(tables.TablesError, match=r"published\.yaml, row 1: lacks \['source'\]"):
        tables.load_published(path)
    path.write_text(yaml.safe_dump({"rows": [{"method": "M", "dataset": "cifar", "split": "val", "source": "S",
                                              "checked": "V", "metrics": {"R@1": 1.0}}]}))
    with pytest.raises(tables.TablesError, match="row 1: .*cifar"):
        tables.load_published(path)


def test_a_plugin_dataset_brings_its_own_table_columns(tmp_path, monkeypatch):
    from cirlib import data as cdata
    from cirlib import registry

    plugin = Path(__file__).parent / "plugins" / "toy_dataset.py"  # FashionIQ's rules, its own category "skirt"
    monkeypatch.setenv(registry.PLUGINS_ENV, str(plugin))
    try:
        run = _finished(tmp_path, "stage2", "toy_s2", {"dataset": "toyfashion", "stage1_run": "toy_s1"}, "t" * 64)
        skirt = {"skirt_R@10": 10.0, "skirt_R@50": 30.0, "avg_R@10": 10.0, "avg_R@50": 30.0}
        _json(run / "metrics.json", _evaluation(skirt, skirt, 50, "t" * 64))
        (table,) = tables.paper_tables(tables.collect(tmp_path), tables.load_published())
        assert [h for _, h in table.metrics] == ["Skirt R@10", "Skirt R@50", "Avg R@10", "Avg R@50", "Avg"]
        assert table.published_count == 0 and [r["Avg"] for r in table.rows] == [20.0, 20.0]
    finally:
        cdata.DATASETS.unregister("toyfashion")
        registry._loaded_plugins.discard(str(plugin))


def test_the_formats_setting_is_checked_when_the_config_is_built():
    with pytest.raises(ValueError, match=r"formats='md,pdf'"):
        TablesConfig(formats="md,pdf")
    assert tables.formats_of("all") == ["md", "latex", "csv"]


def test_the_command_line_prints_the_tables_and_says_what_it_left_out(outputs, tmp_path, capsys):
    out = tmp_path / "figs"
    assert tables_cli.main([str(outputs), "--out", str(out), "--published", "none"]) == 0
    printed = capsys.readouterr().out
    assert "| s2_joint | II | val | 32 | 100 | 40.50 |" in printed and "Candidate Re-ranking" not in printed
    assert re.search(r"- \S*stage2/stale: stale: ", printed)
    assert {p.name for p in out.iterdir()} >= {"table_cirr.md", "table_cirr.tex", "table_cirr.csv"}
    assert tables_cli.main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith("tables failed: ") and not os.path.exists(tmp_path / "empty")


@pytest.mark.slow
def test_a_tiny_run_made_by_the_steps_prints_the_numbers_of_its_evaluation(tmp_path, capsys):
    """The demo's shape on a tiny world: stage I, top-k, stage II, evaluation through the real steps; the row printed
    by `python -m cirlib.tables` equals what the demo's summary.json holds (metrics.json's stage1 and stage2)."""
    from cirlib.data import synth
    from cirlib.workbook import steps
    from cirlib.workbook.config import EvaluateConfig, Stage1Config, Stage2TrainConfig, TopKConfig

    world = synth.generate(synth.SynthConfig(layout="cirr", n_train=24, n_val=12, n_test=4, seed=2),
                           root=tmp_path / "cirr")
    out = str(tmp_path / "outputs")
    common = dict(data_root=str(world), preset="tiny", epochs=1, max_epoch=1, lr=1e-3, max_steps_per_epoch=1,
                  validate_every=0, outputs=out, trackers="none")
    steps.train_stage1(Stage1Config(stage1_run="demo_stage1", train_image_encoder=True, batch_size=8, **common))
    steps.extract_topk(TopKConfig(stage1_run="demo_stage1", topk_k=20, topk_splits="val", outputs=out))
    steps.train_stage2(Stage2TrainConfig(stage2_run="demo_stage2", stage1_run="demo_stage1", reranker="joint",
                                         init="scratch", k=16, batch_size=4, scoring="pairs", **common))
    steps.evaluate(EvaluateConfig(stage2_run="demo_stage2", k=16, scoring="pairs", outputs=out))
    evaluation = json.loads((Path(out) / "stage2" / "demo_stage2" / "metrics.json").read_text())
    summary = {"k": evaluation["k"], "stage1": evaluation["stage1"], "stage2": evaluation["stage2"]}  # as the demo

    assert tables_cli.main([out, "--out", str(tmp_path / "figures")]) == 0
    printed = capsys.readouterr().out.splitlines()
    header = next(line for line in printed if line.startswith("| Method |")).strip("| ").split(" | ")
    for run, stage in (("demo_stage1", "stage1"), ("demo_stage2", "stage2")):
        label = "I" if stage == "stage1" else "II"
        line = next(x for x in printed if x.startswith(f"| {run} | {label} | val | {summary['k']} |"))
        cells = dict(zip(header, line.strip("| ").split(" | ")))
        for key, value in summary[stage].items():
            column = key.replace("Rsubset", "Rs")
            if column in cells:
                assert float(cells[column]) == pytest.approx(value, abs=0.005), (stage, key)
        assert float(cells["Avg"]) == pytest.approx((summary[stage]["R@5"] + summary[stage]["Rsubset@1"]) / 2,
                                                    abs=0.005)
