"""Checkpoint loading: BLIP pre-training files, the original's checkpoints, our own format, and every refusal."""
from __future__ import annotations

import json

import pytest
import torch

from cirlib.models import loading
from cirlib.models.config import preset
from cirlib.models.loading import CheckpointError
from cirlib.models.stage1 import Stage1Model
from cirlib.models.stage2 import RerankQuery, Stage2Model
from cirlib.data.tokenizer import build_tokenizer
from cirlib.tools.verify_original import config_from_fixture

UNPICKLED: list[str] = []  # a custom class records here if it is ever unpickled (it must not be)


class _Payload:
    """Stands for arbitrary code in a pickle: unpickling it would append to UNPICKLED."""

    def __setstate__(self, state):
        UNPICKLED.append("ran")


@pytest.fixture(scope="module")
def pretrain_sd(fixture_dir):
    return torch.load(fixture_dir / "blip_pretrain_like.pt", map_location="cpu", weights_only=True)["model"]


def _inputs(cfg, batch=2, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    images = torch.randn(batch, 3, s, s, generator=g)
    ids = torch.randint(1000, 2000, (batch, length), generator=g)
    ids[:, 0] = cfg.text.vocab_size - 1
    mask = torch.ones_like(ids)
    mask[-1, length - 2:] = 0
    return images, ids, mask


# ------------------------------------------------------------------------------------------------- own format


def test_stage1_round_trip_gives_identical_outputs(tmp_path):
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = Stage1Model(cfg).eval()
    with torch.no_grad():
        model.temp.fill_(0.05)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "shirt"]) + "\n")
    out_dir = loading.save_pretrained(model, tmp_path / "run" / "model", tokenizer=build_tokenizer(vocab))
    assert sorted(p.name for p in out_dir.iterdir() if p.suffix == ".tmp") == []
    stored = json.loads((out_dir / "config.json").read_text())
    assert stored["stage"] == 1 and stored["text"]["hidden_size"] == cfg.text.hidden_size
    assert (out_dir / "vocab.txt").is_file()  # tokenizer saved alongside

    loaded = loading.from_pretrained(out_dir)
    assert isinstance(loaded, Stage1Model) and loaded.config == cfg and not loaded.training
    images, ids, mask = _inputs(cfg)
    with torch.no_grad():
        a, b = model.encode_image(images), loaded.encode_image(images)
        qa = model.encode_query(a.tokens, ids, mask)
        qb = loaded.encode_query(b.tokens, ids, mask)
        la = model(a.tokens, ids, mask, a.embeds).logits
        lb = loaded(b.tokens, ids, mask, b.embeds).logits
    assert torch.equal(a.tokens, b.tokens) and torch.equal(qa.embeds, qb.embeds) and torch.equal(la, lb)
    assert build_tokenizer(out_dir).vocab_size == 9


@pytest.mark.slow
@pytest.mark.parametrize("reranker", ["dual", "joint"])
def test_stage2_round_trip_gives_identical_scores(tmp_path, reranker):
    cfg = preset("tiny", reranker=reranker)
    torch.manual_seed(0)
    model = Stage2Model(cfg).eval()
    loading.save_pretrained(model, tmp_path)
    loaded = loading.from_pretrained(tmp_path)
    assert isinstance(loaded, Stage2Model) and loaded.config == cfg
    assert json.loads((tmp_path / "config.json").read_text())["stage"] == 2
    images, ids, mask = _inputs(cfg, batch=3)
    with torch.no_grad():
        tokens = model.encode_image(images)
        z_t = torch.randn(3, ids.shape[1], cfg.text.hidden_size) if reranker == "dual" else None
        query = RerankQuery(ids, mask, z_t=z_t, ref_tokens=tokens if reranker == "joint" else None)
        assert torch.equal(model.score(query, tokens), loaded.score(query, tokens))


def test_from_pretrained_refusals(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        loading.from_pretrained(tmp_path)
    model = Stage1Model(preset("tiny"))
    loading.save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vision"]["width"] = 64  # the weights no longer fit the stored config
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"visual_encoder.cls_token: file \(1, 1, 128\) vs model \(1, 1, 64\)"):
        loading.from_pretrained(tmp_path)
    cfg["stage"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match='"stage": 1 or 2'):
        loading.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------- pickles


def test_unsafe_pickle_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _Payload()}, path)
    model = Stage1Model(preset("tiny"))
    for load in (loading.load_blip_pretrained, loading.load_original_checkpoint):
        with pytest.raises(CheckpointError, match="unsafe pickle") as info:
            load(model, path)
        assert str(path) in str(info.value) and "weights_only=False" in str(info.value)
    assert UNPICKLED == []


def test_missing_and_corrupt_files(tmp_path):
    model = Stage1Model(preset("tiny"))
    with pytest.raises(CheckpointError, match="not found"):
        loading.load_original_checkpoint(model, tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="bad.pt") as info:
        loading.load_original_checkpoint(model, bad)
    assert "unsafe" not in str(info.value) and "download or copy it again" in str(info.value)


def test_truncated_original_checkpoint_names_the_file_and_what_to_do(tmp_path):
    """Reuse case: torch's own message for a truncated zip (inline_container.cc) names no file."""
    model = Stage1Model(preset("tiny"))
    path = tmp_path / "blip_mean.pt"
    torch.save({"epoch": 1, "BLIP_Retrieval": model.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        loading.load_original_checkpoint(model, path)
    assert str(path) in str(info.value) and "download or copy it again" in str(info.value)
    with pytest.raises(CheckpointError, match="blip_mean.pt.*download or copy it again"):
        loading.load_blip_pretrained(model, path)


def test_damaged_model_folder_names_the_file_and_what_to_do(tmp_path):
    model = Stage2Model(preset("tiny"))
    loading.save_pretrained(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])  # truncated: the header promises more bytes than the file has
    with pytest.raises(CheckpointError) as info:
        loading.from_pretrained(tmp_path)
    assert str(weights) in str(info.value) and "re-run the step that wrote it" in str(info.value)
    weights.write_bytes(data)
    config = tmp_path / "config.json"
    for broken in (b'{"stage": 2, "vision": {', b"\xff\xfe\x00garbage"):  # cut short; not even text
        config.write_bytes(broken)
        with pytest.raises(CheckpointError) as info:
            loading.from_pretrained(tmp_path)
        assert str(config) in str(info.value) and "re-run the step that wrote it" in str(info.value)


def test_save_pretrained_writes_only_into_the_folder_it_is_given(tmp_path):
    """Atomic writing is the caller's (cirlib.paths.atomic_dir): no temporary files of its own beside the folder."""
    from cirlib import paths

    with paths.atomic_dir(tmp_path / "model") as tmp:
        loading.save_pretrained(Stage1Model(preset("tiny")), tmp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]
    assert isinstance(loading.from_pretrained(tmp_path / "model"), Stage1Model)


# ------------------------------------------------------------------------------------------- NaN / Inf weights


def test_non_finite_weights_are_refused_naming_file_and_tensor(tmp_path, fixture_dir, fixture_config):
    """Reuse case: a checkpoint whose tensors hold NaN/Inf used to load silently."""
    key = "text_encoder.encoder.layer.1.attention.self.query.weight"
    # the original's checkpoint format
    ckpt = torch.load(fixture_dir / "stage1_ckpt.pt", map_location="cpu", weights_only=True)
    ckpt["BLIP_Retrieval"][key][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=rf"nan.pt.*tensor {key} .* 1 NaN and 0 Inf"):
        loading.load_original_checkpoint(Stage1Model(fixture_config), tmp_path / "nan.pt")
    # BLIP pre-training file
    pre = torch.load(fixture_dir / "blip_pretrain_like.pt", map_location="cpu", weights_only=True)
    pre["model"]["vision_proj.bias"][1] = float("inf")
    torch.save(pre, tmp_path / "inf.pth")
    with pytest.raises(CheckpointError, match=r"inf.pth.*tensor vision_proj.bias .* 0 NaN and 1 Inf"):
        loading.load_blip_pretrained(Stage1Model(fixture_config), tmp_path / "inf.pth")
    # our own format
    model = Stage1Model(preset("tiny"))
    with torch.no_grad():
        model.text_proj.weight[2, 3] = float("-inf")
    loading.save_pretrained(model, tmp_path / "ours")
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor text_proj.weight .* 1 Inf"):
        loading.from_pretrained(tmp_path / "ours")


# ------------------------------------------------------------------------------------------------- original code


def test_original_checkpoints_load_strictly(fixture_dir, fixture_config):
    s1 = Stage1Model(fixture_config)
    assert loading.load_original_checkpoint(s1, fixture_dir / "stage1_ckpt.pt") == 3
    theirs = torch.load(fixture_dir / "stage1_ckpt.pt", map_location="cpu", weights_only=True)["BLIP_Retrieval"]
    assert all(torch.equal(v, theirs[k]) for k, v in s1.state_dict().items())
    s2 = Stage2Model(fixture_config)
    assert loading.load_original_checkpoint(s2, fixture_dir / "stage2_ckpt.pt") == 5


def test_stage1_file_into_stage2_is_refused(fixture_dir, fixture_config):
    with pytest.raises(CheckpointError, match=r"stage-I checkpoint .*BLIP_Retrieval.*stage II expects BLIP_NLVR"):
        loading.load_original_checkpoint(Stage2Model(fixture_config), fixture_dir / "stage1_ckpt.pt")
    with pytest.raises(CheckpointError, match=r"stage-II checkpoint .*BLIP_NLVR.*stage I expects BLIP_Retrieval"):
        loading.load_original_checkpoint(Stage1Model(fixture_config), fixture_dir / "stage2_ckpt.pt")
    with pytest.raises(CheckpointError, match="use load_blip_pretrained|Use load_blip_pretrained"):
        loading.load_original_checkpoint(Stage1Model(fixture_config), fixture_dir / "blip_pretrain_like.pt")
    with pytest.raises(CheckpointError, match="Use load_original_checkpoint"):
        loading.load_blip_pretrained(Stage1Model(fixture_config), fixture_dir / "stage1_ckpt.pt")


def test_file_of_another_size_is_refused(fixture_dir):
    with pytest.raises(CheckpointError) as info:
        loading.load_original_checkpoint(Stage1Model(preset("tiny")), fixture_dir / "stage1_ckpt.pt")
    msg = str(info.value)
    assert "shape mismatch" in msg and "visual_encoder.cls_token: file (1, 1, 32) vs model (1, 1, 128)" in msg
    assert "ViT width 32" in msg and "ViT width 128" in msg  # what the file is, what the model is
    assert "missing key(s)" in msg or "unexpected key(s)" in msg  # 12 text layers in the file, 4 in the model


def test_dual_checkpoint_into_joint_reranker_is_refused(fixture_dir, fixture_config):
    joint = Stage2Model(fixture_config.__class__(**{**fixture_config.__dict__, "reranker": "joint"}))
    with pytest.raises(CheckpointError, match=r"(?s)dual-stream .* re-ranker.*joint re-ranker.*missing key"):
        loading.load_original_checkpoint(joint, fixture_dir / "stage2_ckpt.pt")


def test_bad_position_ids_are_refused(tmp_path, fixture_dir):
    ckpt = torch.load(fixture_dir / "stage1_ckpt.pt", map_location="cpu", weights_only=True)
    ckpt["BLIP_Retrieval"]["text_encoder.embeddings.position_ids"] = torch.zeros(1, 64, dtype=torch.long)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    cfg = config_from_fixture(json.loads((fixture_dir / "config.json").read_text()))
    with pytest.raises(CheckpointError, match="position_ids is not arange"):
        loading.load_original_checkpoint(Stage1Model(cfg), tmp_path / "ckpt.pt")


# ------------------------------------------------------------------------------------------------- BLIP pre-training


def test_blip_pretrained_into_stage1(fixture_dir, fixture_config, pretrain_sd):
    model = Stage1Model(fixture_config)
    report = loading.load_blip_pretrained(model, fixture_dir / "blip_pretrain_like.pt")
    assert set(report.ignored) == {"itm_head.weight", "itm_head.bias", "text_encoder.embeddings.position_ids"}
    assert report.initialised == () and report.interpolated == ("visual_encoder.pos_embed",)
    assert set(report.loaded) == set(model.state_dict())
    assert model.visual_encoder.pos_embed.shape == (1, fixture_config.vision.num_tokens, fixture_config.vision.width)
    assert torch.equal(model.text_proj.weight, pretrain_sd["text_proj.weight"]) and model.temp == pretrain_sd["temp"]


def test_blip_pretrained_into_dual_stage2(fixture_dir, fixture_config, pretrain_sd):
    torch.manual_seed(0)
    model = Stage2Model(fixture_config)
    report = loading.load_blip_pretrained(model, fixture_dir / "blip_pretrain_like.pt")
    layers = fixture_config.text.num_layers
    expected_new = {f"text_encoder.encoder.layer.{i}.crossattention.output.merge_layer.{p}"
                    for i in range(fixture_config.merge_threshold, layers) for p in ("weight", "bias")}
    expected_new |= {f"cls_head.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert set(report.initialised) == expected_new
    assert {"temp", "vision_proj.weight", "text_proj.bias", "itm_head.weight"} <= set(report.ignored)
    sd = model.state_dict()
    pre = "text_encoder.encoder.layer.3."
    for part in ("attention", "crossattention"):
        src = pretrain_sd[f"{pre}{part}.self.query.weight"]
        assert torch.equal(sd[f"{pre}{part}.self0.query.weight"], src)
        assert torch.equal(sd[f"{pre}{part}.self1.query.weight"], src)
        assert torch.equal(sd[f"{pre}{part}.output.dense1.bias"], pretrain_sd[f"{pre}{part}.output.dense.bias"])
        assert torch.equal(sd[f"{pre}{part}.output.LayerNormA.weight"],
                           pretrain_sd[f"{pre}{part}.output.LayerNorm.weight"])
    assert torch.equal(sd[f"{pre}intermediate.dense.weight"], pretrain_sd[f"{pre}intermediate.dense.weight"])
    merge = model.text_encoder.encoder.layer[layers - 1].crossattention.output.merge_layer
    assert torch.count_nonzero(merge.bias) == 0 and 0.015 < merge.weight.std().item() < 0.025  # BERT init


def test_blip_pretrained_into_joint_stage2(fixture_dir, fixture_config, pretrain_sd):
    cfg = fixture_config.__class__(**{**fixture_config.__dict__, "reranker": "joint"})
    model = Stage2Model(cfg)
    report = loading.load_blip_pretrained(model, fixture_dir / "blip_pretrain_like.pt")
    assert {k for k in report.initialised if not k.startswith("cls_head.")} == {"image_type_embeddings.weight"}
    key = "text_encoder.encoder.layer.0.crossattention.self.key.weight"
    assert torch.equal(model.state_dict()[key], pretrain_sd[key])


def test_blip_pretrained_missing_or_unknown_keys_are_listed(tmp_path, fixture_dir, fixture_config, pretrain_sd):
    sd = dict(pretrain_sd)
    del sd["text_proj.weight"]
    sd["some_new_head.weight"] = torch.zeros(3)
    torch.save({"model": sd}, tmp_path / "pre.pth")
    with pytest.raises(CheckpointError) as info:
        loading.load_blip_pretrained(Stage1Model(fixture_config), tmp_path / "pre.pth")
    msg = str(info.value)
    assert "1 missing key(s)" in msg and "text_proj.weight" in msg
    assert "1 unexpected key(s)" in msg and "some_new_head.weight" in msg


def test_dual_stream_duplication_is_pure():
    sd = {
        "text_encoder.encoder.layer.0.attention.self.query.weight": torch.ones(1),
        "text_encoder.encoder.layer.0.crossattention.output.dense.bias": torch.full((1,), 2.0),
        "text_encoder.encoder.layer.0.crossattention.output.LayerNorm.weight": torch.full((1,), 3.0),
        "text_encoder.encoder.layer.0.output.LayerNorm.weight": torch.full((1,), 4.0),  # FFN: unchanged
    }
    out, split = loading.dual_stream_state_dict(sd)
    assert set(out) == {
        "text_encoder.encoder.layer.0.attention.self0.query.weight",
        "text_encoder.encoder.layer.0.attention.self1.query.weight",
        "text_encoder.encoder.layer.0.crossattention.output.dense0.bias",
        "text_encoder.encoder.layer.0.crossattention.output.dense1.bias",
        "text_encoder.encoder.layer.0.crossattention.output.LayerNormA.weight",
        "text_encoder.encoder.layer.0.crossattention.output.LayerNormB.weight",
        "text_encoder.encoder.layer.0.output.LayerNorm.weight",
    }
    assert len(split) == 3 and len(sd) == 4  # the input is not modified


def test_position_ids_may_be_absent_and_folders_are_pointed_to_from_pretrained(tmp_path, fixture_dir,
                                                                               fixture_config, pretrain_sd):
    sd = {k: v for k, v in pretrain_sd.items() if not k.endswith("position_ids")}
    torch.save({"model": sd}, tmp_path / "pre.pth")
    model = Stage2Model(fixture_config)  # the dual re-ranker keeps position_ids in its state dict
    loading.load_blip_pretrained(model, tmp_path / "pre.pth")
    ids = model.state_dict()["text_encoder.embeddings.position_ids"]
    assert torch.equal(ids[0], torch.arange(fixture_config.text.max_position_embeddings))
    with pytest.raises(CheckpointError, match="is a folder.*from_pretrained"):
        loading.load_original_checkpoint(model, tmp_path)
