"""The proof of equality with the original: the public oracle fixture passes, and a perturbed copy fails."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cirlib.tools import verify_original as V


@pytest.fixture
def one_thread():
    """Run tiny models single-threaded: on a shared 2-core machine thread hand-offs dominate such small ops.

    The fixture README measures 1 thread against its 2-thread values: at most 2.5e-6 apart, far inside tolerance.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_public_fixture_verifies(fixture_dir, one_thread, capsys):
    assert V.main([str(fixture_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    results = [line for line in lines[:-1] if not line.startswith("not recomputed")]
    assert lines[-1] == f"{len(results)}/{len(results)} comparisons ok"
    assert all(line.endswith(" ok") for line in results)
    names = {line.split()[0] for line in results}
    expected = torch.load(fixture_dir / "expected.pt", map_location="cpu", weights_only=True)
    # Every tensor of the fixture is recomputed (metadata aside), plus preprocessing and the key duplication.
    for group in ("stage1", "stage2", "debug", "pretrain_loaded"):
        for key, value in expected[group].items():
            tensors = isinstance(value, list) and value and isinstance(value[0], torch.Tensor)
            if isinstance(value, torch.Tensor) or tensors:
                assert f"{group}.{key}" in names, f"{group}.{key} not verified"
    assert {"inputs.ref_images", "inputs.gallery_images", "pretrain_loaded.stage2"} <= names
    assert not any(line.startswith("not recomputed") for line in lines)


def test_perturbed_weight_fails(fixture_dir, tmp_path, one_thread, capsys):
    for f in fixture_dir.iterdir():
        if f.name != "stage2_ckpt.pt":
            (tmp_path / f.name).symlink_to(f)
    ckpt = torch.load(fixture_dir / "stage2_ckpt.pt", map_location="cpu", weights_only=True)
    with torch.no_grad():
        ckpt["BLIP_NLVR"]["text_encoder.encoder.layer.7.crossattention.output.merge_layer.weight"][0, 0] += 0.05
    torch.save(ckpt, tmp_path / "stage2_ckpt.pt")

    assert V.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    status = {line.split()[0]: "FAIL" if " FAIL" in line else "ok" for line in out.splitlines() if "max|diff|" in line}
    assert status["stage2.scores"] == "FAIL" and status["stage2.train_logits"] == "FAIL"
    # The untouched stage I and the ViT still agree: the failure points at the perturbed part.
    assert status["stage1.query_embeds"] == "ok" and status["stage2.gallery_tokens"] == "ok"
    assert "FAILED:" in out.splitlines()[-1]


def test_config_mapping_is_generic(fixture_dir):
    raw = json.loads((fixture_dir / "config.json").read_text())
    raw["vision"].update(img_size=48, patch_size=8, embed_dim=24, depth=3, num_heads=3, num_tokens=37, mlp_ratio=2)
    raw["text"].update(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=40,
                       encoder_width=24, vocab_size=100, max_position_embeddings=32)
    raw["projection_dim"] = 8
    del raw["stage2_merge"]["threshold_hard_coded"]
    raw["stage2_merge"]["mergeMLP_layers"] = [3]
    cfg = V.config_from_fixture(raw)
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.width, cfg.vision.depth) == (48, 8, 24, 3)
    assert cfg.vision.num_heads == 3 and cfg.vision.mlp_ratio == 2 and cfg.vision.num_tokens == 37
    assert (cfg.text.hidden_size, cfg.text.num_layers, cfg.text.num_heads, cfg.text.intermediate_size) == (16, 4, 2, 40)
    assert cfg.text.vocab_size == 100 and cfg.text.max_position_embeddings == 32
    assert cfg.projection_dim == 8 and cfg.merge_threshold == 3 and cfg.reranker == "dual"
    raw["text"]["hidden_act"] = "relu"
    with pytest.raises(ValueError, match="hidden_act"):
        V.config_from_fixture(raw)


def test_compare_semantics():
    e = torch.tensor([0.0, 100.0])
    assert V.compare("x", e + torch.tensor([1.5e-5, 5e-3]), e, V.HIDDEN).ok  # atol + rtol * |expected|
    assert not V.compare("x", e + torch.tensor([3e-5, 0.0]), e, V.HIDDEN).ok
    bad = V.compare("x", torch.zeros(3), torch.zeros(2), V.UNIT)
    assert not bad.ok and math.isinf(bad.max_abs_diff) and "shape" in bad.detail
    assert not V.compare("r", torch.tensor([0, 2, 1]), torch.tensor([0, 1, 2]), V.EXACT).ok
    assert not V.compare("n", torch.tensor([float("nan")]), torch.tensor([0.0]), V.HIDDEN).ok


def _write_fixture_of_other_sizes(src, out) -> None:
    """A fixture folder at sizes unlike the public one (ViT 32 px / patch 8 / 1 block, 4 text layers, merge from layer
    2, pre-training grid 2 -> 4), its 'expected' values made by our own models. Circular for equality; it checks that
    nothing in verify_original is specialised to the public fixture's geometry."""
    from PIL import Image

    from cirlib.data import load_image, targetpad_transform
    from cirlib.models import loading
    from cirlib.models.stage1 import Stage1Model
    from cirlib.models.stage2 import RerankQuery, Stage2Model

    raw = json.loads((src / "config.json").read_text())
    raw["vision"].update(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_tokens=17, mlp_ratio=2)
    raw["text"].update(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=40,
                       encoder_width=24, vocab_size=300, max_position_embeddings=32)
    raw["projection_dim"] = 8
    raw["stage2_merge"] = {"threshold_hard_coded": 2}
    (out / "config.json").write_text(json.dumps(raw))
    cfg = V.config_from_fixture(raw)
    g = torch.Generator().manual_seed(0)
    names = [f"ref_{i}" for i in range(3)] + [f"gal_{i}" for i in range(4)]
    for i, name in enumerate(names):
        h, w = 20 + 7 * i, 50 - 4 * i  # varied aspect ratios, some padded by TargetPad
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(out / f"{name}.png")
    transform = targetpad_transform(V.TARGET_RATIO, 32)
    images = torch.stack([transform(load_image(out / f"{n}.png")) for n in names])
    ids = torch.randint(5, 298, (3, 6), generator=g)
    ids[:, 0] = 299
    mask = torch.ones_like(ids)
    ids[2, 4:], mask[2, 4:] = 0, 0
    per_query = [ids[0], ids[1], ids[2, :4]]
    torch.save({"ref_images": images[:3], "gallery_images": images[3:], "image_names": names, "input_ids": ids,
                "attention_mask": mask, "per_query_input_ids": per_query}, out / "inputs.pt")
    torch.manual_seed(0)
    s1, s2 = Stage1Model(cfg).eval(), Stage2Model(cfg).eval()
    sd1 = {**s1.state_dict(), "text_encoder.embeddings.position_ids": torch.arange(32)[None]}
    torch.save({"epoch": 1, "BLIP_Retrieval": sd1, "optimizer_state_dict": {}}, out / "stage1_ckpt.pt")
    torch.save({"epoch": 2, "BLIP_NLVR": s2.state_dict(), "optimizer_state_dict": {}}, out / "stage2_ckpt.pt")
    pre = {**sd1, "visual_encoder.pos_embed": sd1["visual_encoder.pos_embed"][:, :5].clone(),
           "itm_head.weight": torch.zeros(2, 16)}
    torch.save({"model": pre}, out / "blip_pretrain_like.pt")
    with torch.no_grad():
        ref, gal = s1.encode_image(images[:3]), s1.encode_image(images[3:])
        query = s1.encode_query(ref.tokens, ids, mask)
        ref2, gal2 = s2.encode_image(images[:3]), s2.encode_image(images[3:])
        scores = []
        for i, q in enumerate(per_query):
            one = torch.ones(1, len(q), dtype=torch.long)
            z_t = s1.encode_query(ref2[i:i + 1], q[None], one).hidden
            scores.append(s2.score(RerankQuery(q[None], one, z_t=z_t), gal2)[0])
        fresh = Stage2Model(cfg)
        report = loading.load_blip_pretrained(fresh, out / "blip_pretrain_like.pt")
        torch.save(fresh.state_dict(), out / "stage2_from_pretrain_state.pt")
    torch.save({
        "stage1": {"ref_tokens": ref.tokens, "gallery_embeds": gal.embeds, "query_embeds": query.embeds,
                   "z_t": query.hidden, "ranking": torch.argsort(1 - query.embeds @ gal.embeds.t(), dim=-1)},
        "stage2": {"scores": torch.stack(scores)},
        "pretrain_loaded": {"stage2_new_keys_reinitialised": list(report.initialised)},
    }, out / "expected.pt")


def test_verify_handles_other_sizes(fixture_dir, tmp_path, one_thread):
    _write_fixture_of_other_sizes(fixture_dir, tmp_path)
    results = {r.name: r for r in V.verify(tmp_path)}
    assert all(r.ok for r in results.values()), [r.line() for r in results.values() if not r.ok]
    assert {"stage1.ranking", "stage2.scores", "stage2.scores (per-pair path)",
            "pretrain_loaded.stage2 fresh keys (set)"} <= set(results)
    assert any(name.startswith("pretrain_loaded.stage2 key duplication") for name in results)


def test_a_folder_that_is_no_fixture_is_one_line(tmp_path, capsys):
    assert V.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path}/config.json not found" in err and "Traceback" not in err
