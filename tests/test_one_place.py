"""Things the package does in exactly one place: the atomic rename (cirlib.paths) and BLIP's mask value."""
from __future__ import annotations

import ast
import pytest

from cirlib import paths

PACKAGE = paths.REPO_ROOT / "cirlib"
RENAMING_FUNCTIONS = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("shutil", "move")}


def renames_in(source: str) -> list[int]:
    """The lines that rename a file or folder: `os.replace/rename/renames`, `shutil.move`, or a path's
    `.replace(target)`/`.rename(target)` (one positional argument and no keywords, unlike `str.replace(a, b)`,
    `dataclasses.replace(x, **changes)` or pandas' `rename(columns=...)`)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        if (owner, node.func.attr) in RENAMING_FUNCTIONS or (
                node.func.attr in ("replace", "rename") and len(node.args) == 1 and not node.keywords):
            lines.append(node.lineno)
    return lines


def test_only_paths_renames_files():
    found = [f"{p.relative_to(paths.REPO_ROOT)}:{line}" for p in sorted(PACKAGE.rglob("*.py"))
             if p != PACKAGE / "paths.py" for line in renames_in(p.read_text())]
    assert not found, "rename files through cirlib.paths (publish, atomic_write, atomic_dir), not here:\n" + \
        "\n".join(found)


def test_the_rename_check_sees_every_form():
    source = ("import os, shutil\nos.replace(a, b)\nos.rename(a, b)\nshutil.move(a, b)\nfound.replace(final)\n"
              "p.rename(q)\ns.replace('a', 'b')\ndataclasses.replace(c, x=1)\ndf.rename(columns={0: 'v'})\n")
    assert renames_in(source) == [2, 3, 4, 5, 6]


def test_publish_renames_a_written_file(tmp_path):
    partial, final = tmp_path / "a.partial.png", tmp_path / "a.png"
    partial.write_bytes(b"png")
    final.write_bytes(b"old")
    assert paths.publish(partial, final) == final
    assert final.read_bytes() == b"png" and not partial.exists()


def test_publish_names_the_file_it_could_not_write(tmp_path):
    with pytest.raises(paths.FileWriteError, match="out.png"):
        paths.publish(tmp_path / "never-written.partial", tmp_path / "out.png")


def test_mask_value_is_defined_once():
    definitions = []
    for p in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == "MASK_VALUE" for t in targets):
                definitions.append(str(p.relative_to(paths.REPO_ROOT)))
    assert definitions == ["cirlib/models/text.py"]


def test_the_rerankers_use_blips_mask_value():
    from cirlib.models import reranker_blocks, text

    assert reranker_blocks.MASK_VALUE is text.MASK_VALUE == -10000.0
