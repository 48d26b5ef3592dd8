"""The conda environment and pyproject declare the same dependencies."""
from __future__ import annotations

import re
import tomllib

import yaml

from cirlib.paths import REPO_ROOT


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r): r.replace(" ", "") for r in project["dependencies"]}
    for extra in ("test", "browser"):  # what the Makefile installs: .[test,browser]
        declared.update({_name(r): r.replace(" ", "") for r in project["optional-dependencies"][extra]})

    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_reqs = {_name(r): r.replace(" ", "") for r in pip_section if not r.startswith("-e")}

    assert conda_reqs == declared, (
        f"only in environment.yml: {sorted(set(conda_reqs) - set(declared))}; "
        f"only in pyproject: {sorted(set(declared) - set(conda_reqs))}; "
        f"differing pins: {[k for k in declared if k in conda_reqs and conda_reqs[k] != declared[k]]}"
    )
    assert "-e ." in pip_section, "environment.yml must install cirlib itself (pip: -e .)"


def test_no_local_version_labels_pinned():
    text = (REPO_ROOT / "pyproject.toml").read_text() + (REPO_ROOT / "environment.yml").read_text()
    assert "+cpu" not in text and "+cu" not in text
