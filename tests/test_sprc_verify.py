"""`python -m cirlib.verify_original tests/fixtures/sprc-tiny`: our SPRC first stage against SPRC's own code."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from cirlib.models.sprc import CHECKPOINT_KEY, SPRCRetriever
from cirlib.models.sprc_keys import SPRC_UNUSED, to_lavis
from cirlib.tools.verify_original import main, verify
from cirlib.tools.verify_sprc import sprc_config

FIXTURE = Path(__file__).parent / "fixtures" / "sprc-tiny"


def test_the_sprc_fixture_verifies_from_the_command_line(capsys):
    code = main([str(FIXTURE)])  # what `python -m cirlib.verify_original tests/fixtures/sprc-tiny` runs
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    for name in ("ref_vit_blocks", "gallery_feats", "query_embeds", "rtc_feats", "loss_total_cirr", "grads",
                 "after_step", "after_step from SPRC", "padding_longest.query_embeds", "pretrain_loaded.similarity",
                 "inputs.input_ids (tokenize_queries)"):
        assert any(line.startswith(name) and line.rstrip().split("  (")[0].endswith("ok") for line in lines), name
    assert "not recomputed" not in out


def test_a_changed_expected_tensor_fails(tmp_path):
    folder = tmp_path / "sprc-tiny"
    shutil.copytree(FIXTURE, folder)
    expected = torch.load(folder / "expected.pt", weights_only=True)
    expected["query_embeds"] = expected["query_embeds"] + 1e-5
    torch.save(expected, folder / "expected.pt")
    bad = [r.name for r in verify(folder) if not r.ok]
    assert bad == ["query_embeds"]


def test_our_names_map_onto_sprcs_checkpoint_keys_exactly():
    theirs = torch.load(FIXTURE / "sprc_ckpt.pt", weights_only=True)[CHECKPOINT_KEY]
    ours = to_lavis(SPRCRetriever(sprc_config(json.loads((FIXTURE / "config.json").read_text()))).state_dict())
    assert set(ours) == {k for k in theirs if not SPRC_UNUSED.match(k)}
    assert all(ours[k].shape == theirs[k].shape for k in ours)
