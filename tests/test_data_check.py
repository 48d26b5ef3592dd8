"""`python -m cirlib.data check`: every problem of a dataset folder in one run, against the public release."""
from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cirlib import paths
from cirlib.data import load_split, synth
from cirlib.data.check import check_dataset
from cirlib.data.dataset import get_dataset


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return synth.generate(synth.SynthConfig(layout="cirr", n_train=12, n_val=6, n_test=4, seed=3),
                          root=tmp_path_factory.mktemp("w") / "cirr")


def _damaged_copy(world: Path, tmp: Path) -> tuple[Path, dict[str, str]]:
    root = tmp / "cirr"
    shutil.copytree(world, root)
    val = load_split("cirr", root, "val")
    q0, q1 = val.queries[0], val.queries[1]
    damage = {q0.reference: "missing", q1.target: "unreadable", val.gallery[-1]: "empty file"}
    val.image_path(q0.reference).unlink()
    data = val.image_path(q1.target).read_bytes()
    val.image_path(q1.target).write_bytes(data[: len(data) // 2])  # truncated: opens, fails to decode
    val.image_path(val.gallery[-1]).write_bytes(b"")
    train = load_split("cirr", root, "train")
    train.image_path(train.gallery[0]).write_text("not an image")
    damage[train.gallery[0]] = "unreadable"
    return root, damage


def test_every_problem_is_listed_in_one_run(world, tmp_path):
    root, damage = _damaged_copy(world, tmp_path)
    report = check_dataset("cirr", root, workers=2, progress=False, problems_file=tmp_path / "problems.tsv")
    found = {p.name: p.problem for p in report.problems}
    assert set(found) == set(damage)
    for name, kind in damage.items():
        assert found[name].startswith(kind), (name, found[name])
    assert report.blocking
    val = load_split("cirr", world, "val")
    broken = set(list(damage)[:3])
    by_split = {s.split: s for s in report.splits}
    assert by_split["val"].missing == 1 and by_split["val"].unreadable == 2
    assert by_split["val"].queries_affected == sum(bool({q.reference, q.target} & broken) for q in val.queries)
    assert by_split["val"].queries == len(val.queries) and by_split["val"].images == len(val.gallery)
    listed = (tmp_path / "problems.tsv").read_text().splitlines()
    assert len(listed) == 1 + len(damage)  # header + every problem, not a sample
    assert "restore the 4 images" in report.text()


def test_queries_affected_counts_queries_not_images(world, tmp_path):
    root = tmp_path / "cirr"
    shutil.copytree(world, root)
    val = load_split("cirr", root, "val")
    for name in val.gallery:  # every reference and every target of val missing: each query once, not twice
        val.image_path(name).unlink()
    report = check_dataset("cirr", root, workers=0, progress=False, problems_file=tmp_path / "p.tsv")
    s = {x.split: x for x in report.splits}["val"]
    assert s.missing == len(val.gallery) and s.queries_affected == len(val.queries)
    assert f"queries affected {len(val.queries):,}" in report.text()


def test_an_unwritable_problems_file_is_refused_before_the_check(world, tmp_path, monkeypatch, capsys):
    from cirlib.data import check

    monkeypatch.setattr(check, "_inspect_chunk", lambda chunk: pytest.fail("images were read before the refusal"))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for target in (blocker / "p.tsv", tmp_path):  # a folder that cannot be made; a folder given as the file
        rc = check.main(["--dataset", "cirr", "--workers", "0", str(world), "--problems-file", str(target)])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and len(err.splitlines()) == 1, err
        assert f"cannot write the problems file {target}" in err and "Traceback" not in err
    real_write_bytes = Path.write_bytes

    def read_only(self, data):  # tests run as root, where permissions do not stop writes
        if self.parent == tmp_path / "ro":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(paths.FileWriteError, match=rf"problems file {tmp_path / 'ro' / 'p.tsv'}: .*read-only"):
        check_dataset("cirr", world, workers=0, progress=False, problems_file=tmp_path / "ro" / "p.tsv")


@pytest.mark.slow
def test_the_command_exits_non_zero_on_problems_and_zero_on_a_clean_folder(world, tmp_path):
    root, _ = _damaged_copy(world, tmp_path)
    cmd = [sys.executable, "-m", "cirlib.data", "check", "--dataset", "cirr", "--workers", "2"]
    bad = subprocess.run(cmd + [str(root), "--problems-file", str(tmp_path / "p.tsv")], capture_output=True,
                         text=True, cwd=paths.REPO_ROOT, timeout=300)
    assert bad.returncode == 1, bad.stderr
    assert "4 image problems" in bad.stdout
    good = subprocess.run(cmd + [str(world)], capture_output=True, text=True, cwd=paths.REPO_ROOT, timeout=300)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "image problems" not in good.stdout and "a synthetic world written by cirlib.synth" in good.stdout


def _real_roots(real: Path, base: Path) -> tuple[Path, Path]:
    cirr = base / "cirr_dataset"
    (cirr / "cirr").mkdir(parents=True)
    for sub in ("captions", "image_splits"):
        shutil.copytree(real / "cirr" / sub, cirr / "cirr" / sub)
    fiq = base / "fashionIQ_dataset"
    fiq.mkdir()
    for sub in ("captions", "image_splits"):
        shutil.copytree(real / "fashioniq" / sub, fiq / sub)
    return cirr, fiq


@pytest.mark.slow
def test_real_annotations_counts_and_identical_verdicts(real, tmp_path):
    cirr, fiq = _real_roots(real, tmp_path)
    # stand-in images for a sample of CIRR val; the rest are absent
    val = load_split("cirr", cirr, "val")
    from PIL import Image
    for name in val.gallery[:5]:
        val.image_path(name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(val.image_path(name))
    report = check_dataset("cirr", cirr, workers=2, progress=False, problems_file=tmp_path / "cirr.tsv")
    status = {f["file"]: f["status"] for f in report.annotation_files}
    assert status["cirr/captions/cap.rc2.val.json"] == "identical"
    assert status["cirr/image_splits/split.rc2.train.json"] == "identical"
    assert status["cirr/captions/cap.rc2.train.json"] == "missing"  # not in the public reference copy
    s = {x.split: x for x in report.splits}
    assert (s["val"].queries, s["val"].images) == get_dataset("cirr").public_counts[("val", None)]
    assert (s["test1"].queries, s["test1"].images) == get_dataset("cirr").public_counts[("test1", None)]
    assert s["train"].images == 16939 and s["train"].queries is None and s["train"].error
    assert s["val"].missing == 2297 - 5 and s["val"].queries_affected > 0
    assert report.blocking

    fiq_report = check_dataset("fashioniq", fiq, workers=0, progress=False, problems_file=tmp_path / "fiq.tsv")
    assert all(f["status"] == "identical" for f in fiq_report.annotation_files)
    for x in fiq_report.splits:
        assert (x.queries, x.images) == get_dataset("fashioniq").public_counts[(x.split, x.category)]


def test_an_edited_caption_file_is_modified(real, tmp_path):
    cirr, _ = _real_roots(real, tmp_path)
    cap = cirr / "cirr/captions/cap.rc2.val.json"
    cap.write_text(cap.read_text().replace('"caption": "', '"caption": "a ', 1))
    report = check_dataset("cirr", cirr, workers=0, progress=False, problems_file=tmp_path / "x.tsv")
    status = {f["file"]: f["status"] for f in report.annotation_files}
    assert status["cirr/captions/cap.rc2.val.json"] == "modified"
    assert status["cirr/captions/cap.rc2.test1.json"] == "identical"
    assert "not comparable with published ones" in report.text()


def test_notebook_00_checks_the_whole_download(world, tmp_path, monkeypatch, capsys):
    from cirlib.workbook import preview
    from cirlib.workbook.config import DataConfig

    root, damage = _damaged_copy(world, tmp_path)
    monkeypatch.setattr(paths, "OUTPUTS", tmp_path / "outputs")  # where the problems list goes by default
    report = preview.check_download(DataConfig(dataset="cirr", data_root=str(root), smoke=True))
    printed = capsys.readouterr().out
    assert report is not None and report.blocking
    assert {p.name for p in report.problems} == set(damage)
    assert report.problems_file == tmp_path / "outputs" / "data_check" / "cirr_image_problems.tsv"
    assert str(report.problems_file) in printed and "what to do:" in printed
    clean = preview.check_download(DataConfig(dataset="cirr", data_root=str(world), smoke=True))
    assert clean is not None and not clean.blocking
    assert preview.check_download(DataConfig(dataset="cirr", data_root=str(root), check_images=False)) is None
    assert "not checked" in capsys.readouterr().out
