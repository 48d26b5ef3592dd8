"""The fast parts of `make browser-test` (cirlib.run.browser_test): the one-line refusal without Chromium, its
parameters against the notebooks, and the progress-bar reading. The browser run itself is `make browser-test`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import nbformat
import pytest

from cirlib import paths
from cirlib.run import batch
from cirlib.run import browser_test as bt

HINT = "apt-get install chromium chromium-driver"


def _fake_binary(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_module_without_chromium_exits_nonzero_with_one_line(tmp_path):
    absent = tmp_path / "no-chromium"
    proc = subprocess.run([sys.executable, "-m", "cirlib.run.browser_test", "--chromium", str(absent)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert HINT in lines[0] and str(absent) in lines[0]


def test_make_target_without_chromium_fails_with_the_hint(tmp_path):
    """`make browser-test` runs the module (the venv's install step treated as done; the current interpreter)."""
    make = shutil.which("make")
    assert make is not None, "make is needed for the Makefile targets"
    env = dict(os.environ, CIRLIB_CHROMIUM=str(tmp_path / "absent-chromium"))
    proc = subprocess.run([make, "-s", "-o", ".venv/.installed", "browser-test", f"PY={sys.executable}"],
                          cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    first = proc.stderr.strip().splitlines()[0]
    assert HINT in first and "absent-chromium" in first


def test_missing_driver_and_missing_selenium_are_named(tmp_path, monkeypatch, capsys):
    chromium = _fake_binary(tmp_path / "chromium")
    monkeypatch.setenv(bt.CHROMEDRIVER_ENV, str(tmp_path / "no-driver"))
    assert bt.main([f"--chromium={chromium}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-driver" in err[0] and str(chromium) not in err[0] and HINT in err[0]

    driver = _fake_binary(tmp_path / "chromedriver")
    assert bt.missing_prerequisites(chromium, driver) is None  # selenium is installed here
    monkeypatch.setitem(sys.modules, "selenium", None)  # import selenium -> ImportError
    message = bt.missing_prerequisites(chromium, driver)
    assert message is not None and "selenium" in message and ".[browser]" in message and "\n" not in message


def test_paths_default_to_debian_and_follow_the_environment(monkeypatch):
    monkeypatch.delenv(bt.CHROMIUM_ENV, raising=False)
    monkeypatch.delenv(bt.CHROMEDRIVER_ENV, raising=False)
    assert bt.browser_paths() == (Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver"))
    monkeypatch.setenv(bt.CHROMIUM_ENV, "/opt/c")
    assert bt.browser_paths()[0] == Path("/opt/c")
    assert bt.browser_paths("/x/chromium", "/x/driver") == (Path("/x/chromium"), Path("/x/driver"))


def test_unknown_notebook_is_refused(tmp_path, capsys):
    chromium, driver = _fake_binary(tmp_path / "chromium"), _fake_binary(tmp_path / "chromedriver")
    with pytest.raises(SystemExit) as exit_:
        bt.main(["--only", "05", f"--chromium={chromium}", f"--chromedriver={driver}"])
    assert exit_.value.code == 2 and "the browser test drives ['07', '08']" in capsys.readouterr().err


@pytest.mark.parametrize("text, bars, unfinished", [
    ("epochs: 100%|##########| 3/3 [00:01<00:00]\nre-rank: 100%|###| 16/16", 2, 0),
    ("epochs:   0%|          | 0/3 [00:00<?, ?it/s]", 1, 1),
    ("epochs:  33%|###       | 1/3\repochs: 100%|##########| 3/3", 2, 1),  # an unrendered \r: both states seen
    ("feature store: 50%|#####     | 72/144", 1, 1),
    ("no bars here, 100% sure", 0, 0),
])
def test_progress_lines_are_read_as_finished_or_not(text, bars, unfinished):
    found, open_ = bt.unfinished_bars(text)
    assert (len(found), len(open_)) == (bars, unfinished)


def test_the_runs_parameters_plan_cleanly_for_notebooks_01_to_04():
    params = bt.batch_parameters(bt.OUT)
    sources = batch._select(batch.notebook_paths(), list(bt.EXECUTED))
    plan = {p.stem: v for p, v in batch.plan_batch(params, sources).items()}
    assert plan["01_stage1_train"]["preset"] == "tiny" and plan["01_stage1_train"]["smoke"] is True
    assert plan["03_stage2_train"]["scoring"] == "pairs" and plan["04_stage2_evaluate"]["scoring"] == "pairs"
    assert all(v["overwrite"] is True for v in plan.values())  # fresh runs: their copies show progress bars
    assert all(v["outputs"] == "outputs/browser-test/outputs" for v in plan.values())


def test_prepared_notebooks_point_at_the_tiny_world():
    out = paths.OUTPUTS / f"pytest_browser_{uuid.uuid4().hex[:8]}"
    try:
        written = bt.prepare_notebooks(out, list(bt.NOTEBOOKS))
        assert sorted(written) == ["07_explorer", "08_search"]
        rel = out.relative_to(paths.REPO_ROOT).as_posix()
        for stem, path in written.items():
            book = nbformat.read(path, as_version=4)
            (injected,) = [c for c in book.cells if "injected-parameters" in c.metadata.get("tags", [])]
            assert f'stage2_run = "{bt.STAGE2_RUN}"' in injected.source
            assert f'outputs = "{rel}/outputs"' in injected.source
            assert all(c.get("outputs", []) == [] for c in book.cells if c.cell_type == "code")  # nothing run
        search = nbformat.read(written["08_search"], as_version=4)
        injected = [c for c in search.cells if "injected-parameters" in c.metadata.get("tags", [])][0].source
        assert f'image_dir = "{rel}/cirr/dev"' in injected and f'index = "{rel}/index"' in injected
        assert not list(out.rglob("*.partial*"))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_a_folder_outside_the_repository_is_refused(tmp_path):
    with pytest.raises(bt.BrowserTestError, match="outside the repository"):
        bt.batch_parameters(tmp_path)
