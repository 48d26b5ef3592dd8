"""Backbones and the stage-I model: names, shapes, BLIP's numerics conventions and the paper-size parameter counts."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from cirlib.models.config import preset
from cirlib.models.stage1 import ImageFeatures, QueryFeatures, Stage1Model, Stage1Output
from cirlib.models.stage2 import Stage2Model
from cirlib.models.text import MASK_VALUE, build_text_encoder, encode_text, extended_attention_mask
from cirlib.models.vit import build_vit, interpolate_pos_embed

# Exact parameter counts of the paper-size models (ViT-B/16 @ 384 + BERT-base with cross-attention, vocab 30524).
BLIP_VIT_PARAMS = 86_090_496
BLIP_TEXT_PARAMS = 137_258_496  # stage-I text encoder (original-system.md 3.3)
STAGE1_PARAMS = 223_742_721  # ViT + text + vision_proj + text_proj + temp (~223.74 M, section 3.3)
STAGE2_TRAINABLE_PARAMS = 202_256_642  # dual-stream text encoder + cls_head (~202.26 M, section 5.4)
STAGE2_PARAMS = 288_347_138  # + ViT (~288.35 M, section 5.4)


@pytest.fixture(scope="module")
def stage1_keys(fixture_dir):
    return list(torch.load(fixture_dir / "stage1_ckpt.pt", map_location="cpu", weights_only=True)["BLIP_Retrieval"])


def _ids(batch: int, length: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab - 2, (batch, length), generator=g)
    ids[:, 0] = vocab - 1  # [ENC]
    return ids, torch.ones_like(ids)


# ----------------------------------------------------------------------------------------------------------- ViT


def test_vit_parameter_names_are_blips(fixture_config, stage1_keys):
    vit = build_vit(fixture_config.vision, 0.0)
    theirs = {k.removeprefix("visual_encoder.") for k in stage1_keys if k.startswith("visual_encoder.")}
    assert set(vit.state_dict()) == theirs


def test_vit_tokens_shape_and_exact_input_size():
    cfg = preset("tiny").vision
    vit = build_vit(cfg, drop_path_rate=0.1).eval()
    tokens = vit.forward_features(torch.randn(2, 3, cfg.image_size, cfg.image_size))
    assert tokens.shape == (2, cfg.num_tokens, cfg.width) and tokens.dtype == torch.float32
    # Like the original's PatchEmbed, another input size is refused rather than silently re-gridded.
    with pytest.raises(AssertionError, match="doesn't match model"):
        vit.forward_features(torch.randn(1, 3, cfg.image_size + 16, cfg.image_size + 16))


def test_vit_drop_path_spacing_and_final_norm():
    cfg = preset("tiny").vision
    vit = build_vit(cfg, drop_path_rate=0.1)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in vit.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, cfg.depth).tolist())
    assert isinstance(vit.norm, torch.nn.LayerNorm) and vit.norm.eps == cfg.layer_norm_eps


def test_interpolate_pos_embed_matches_original(fixture_dir):
    pre = torch.load(fixture_dir / "expected.pt", map_location="cpu", weights_only=True)["pretrain_loaded"]
    out = interpolate_pos_embed(pre["pretrain_pos_embed"], pre["interpolated_pos_embed"].shape[1])
    assert torch.equal(out, pre["interpolated_pos_embed"])


def test_interpolate_pos_embed_properties():
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, 1 + 9, 8, generator=g)
    same = interpolate_pos_embed(pe, 10)
    assert torch.equal(same, pe) and same.data_ptr() != pe.data_ptr()  # no-op, but a copy
    up = interpolate_pos_embed(pe, 1 + 36)
    assert up.shape == (1, 37, 8)
    assert torch.equal(up[:, 0], pe[:, 0])  # the class token is kept as is
    flat = torch.cat([pe[:, :1], torch.full((1, 9, 8), 0.25)], dim=1)
    assert torch.allclose(interpolate_pos_embed(flat, 1 + 49)[:, 1:], torch.tensor(0.25))  # constant grid stays
    with pytest.raises(ValueError, match="square grid"):
        interpolate_pos_embed(pe, 1 + 10)


# ---------------------------------------------------------------------------------------------------- text encoder


def test_text_encoder_names_and_structure(fixture_config, stage1_keys):
    enc = build_text_encoder(fixture_config.text, encoder_width=fixture_config.vision.width)
    theirs = {k.removeprefix("text_encoder.") for k in stage1_keys if k.startswith("text_encoder.")}
    # position_ids is a persistent buffer in transformers 4.25 only; the loaders check and drop it.
    assert set(enc.state_dict()) == theirs - {"embeddings.position_ids"}
    assert not any("token_type" in k for k in enc.state_dict())  # BLIP adds no token-type embedding
    assert enc.pooler is None
    assert all(hasattr(layer, "crossattention") for layer in enc.encoder.layer)
    assert enc.config.hidden_act == "gelu"
    key = enc.encoder.layer[0].crossattention.self.key
    assert key.in_features == fixture_config.vision.width


def test_extended_mask_is_blips_additive_convention():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ext = extended_attention_mask(mask, torch.float32)
    assert ext.shape == (2, 1, 1, 3)
    assert torch.equal(ext[:, 0, 0], torch.tensor([[0.0, 0.0, MASK_VALUE], [0.0, MASK_VALUE, MASK_VALUE]]))


def test_padding_does_not_change_token_states():
    cfg = preset("tiny")
    enc = build_text_encoder(cfg.text, cfg.vision.width).eval()
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, cfg.vision.num_tokens, cfg.vision.width, generator=g)
    ids, mask = _ids(2, 9, cfg.text.vocab_size)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    with torch.no_grad():
        padded = encode_text(enc, ids, mask, image)
        alone = encode_text(enc, ids[1:, :5], mask[1:, :5], image[1:])
        # transformers' own 2-D mask path (finfo.min) agrees with the -10000 convention
        hf = enc(input_ids=ids, attention_mask=mask, encoder_hidden_states=image, is_decoder=False).last_hidden_state
    assert torch.allclose(padded[1, :5], alone[0], atol=1e-5)
    assert torch.allclose(padded, hf, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------- stage I


def test_stage1_shapes_dtypes_and_definitions():
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = Stage1Model(cfg).eval()
    s, t = cfg.vision.image_size, cfg.vision.num_tokens
    images = torch.randn(3, 3, s, s)
    ids, mask = _ids(3, 7, cfg.text.vocab_size)
    with torch.no_grad():
        img = model.encode_image(images)
        query = model.encode_query(img.tokens, ids, mask)
        out = model(img.tokens, ids, mask, img.embeds)
    assert isinstance(img, ImageFeatures) and isinstance(query, QueryFeatures) and isinstance(out, Stage1Output)
    assert img.tokens.shape == (3, t, cfg.vision.width) and img.embeds.shape == (3, cfg.projection_dim)
    assert query.embeds.shape == (3, cfg.projection_dim) and query.hidden.shape == (3, 7, cfg.text.hidden_size)
    assert out.logits.shape == (3, 3) and out.loss.shape == ()
    for x in (img.tokens, img.embeds, query.embeds, query.hidden, out.logits, out.loss):
        assert x.dtype == torch.float32
    assert torch.allclose(img.embeds.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(query.embeds.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert model.temp.item() == pytest.approx(0.07) and model.temp.requires_grad
    assert torch.allclose(out.logits, query.embeds @ img.embeds.t() / model.temp, atol=1e-6)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, torch.arange(3)), atol=1e-6)
    assert torch.allclose(img.embeds, model.embed_tokens(img.tokens))


def test_stage1_gradients_reach_text_side_only_when_targets_are_fixed():
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = Stage1Model(cfg).train()
    s = cfg.vision.image_size
    ids, mask = _ids(2, 6, cfg.text.vocab_size)
    with torch.no_grad():  # as the original: reference and target features from the frozen ViT, no gradient
        img = model.encode_image(torch.randn(2, 3, s, s))
    model(img.tokens, ids, mask, img.embeds).loss.backward()
    assert model.temp.grad is not None and model.text_proj.weight.grad is not None
    assert model.text_encoder.encoder.layer[0].crossattention.self.key.weight.grad is not None
    assert model.vision_proj.weight.grad is None and model.visual_encoder.cls_token.grad is None


def test_stage1_batch_mismatch_is_refused():
    cfg = preset("tiny")
    model = Stage1Model(cfg)
    ids, mask = _ids(2, 5, cfg.text.vocab_size)
    with pytest.raises(ValueError, match="batch mismatch"):
        model.encode_query(torch.zeros(3, cfg.vision.num_tokens, cfg.vision.width), ids, mask)
    tokens = torch.zeros(2, cfg.vision.num_tokens, cfg.vision.width)
    with pytest.raises(ValueError, match="batch mismatch"):  # positives at rows 2, 3 of only 3 targets
        model(tokens, ids, mask, torch.zeros(3, cfg.projection_dim), label_offset=2)


@pytest.mark.slow
def test_stage2_shapes_at_tiny_preset():
    # The re-ranker belongs to the stage-II module; here only the interface the loaders and verify rely on.
    from cirlib.models.stage2 import RerankQuery

    for reranker in ("dual", "joint"):
        cfg = preset("tiny", reranker=reranker)
        torch.manual_seed(0)
        model = Stage2Model(cfg).eval()
        s, t, w, h = cfg.vision.image_size, cfg.vision.num_tokens, cfg.vision.width, cfg.text.hidden_size
        ids, mask = _ids(2, 5, cfg.text.vocab_size)
        with torch.no_grad():
            tokens = model.encode_image(torch.randn(4, 3, s, s))
            query = RerankQuery(ids, mask, z_t=torch.randn(2, 5, h) if reranker == "dual" else None,
                                ref_tokens=tokens[:2] if reranker == "joint" else None)
            scores = model.score(query, tokens)
            pairs = model.score(query, tokens, torch.tensor([[2], [3]]), scoring="pairs")[:, 0]
        assert tokens.shape == (4, t, w)
        assert scores.shape == (2, 4) and pairs.shape == (2,) and scores.dtype == torch.float32
        assert torch.allclose(pairs, scores[torch.arange(2), torch.arange(2, 4)], atol=1e-5)


@pytest.mark.slow
def test_blip_base_parameter_counts_on_meta():
    cfg = preset("blip-base")
    with torch.device("meta"):
        s1 = Stage1Model(cfg)
        s2 = Stage2Model(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(s1.visual_encoder) == BLIP_VIT_PARAMS
    assert count(s1.text_encoder) == BLIP_TEXT_PARAMS
    assert count(s1) == STAGE1_PARAMS
    assert count(s2.text_encoder) + count(s2.cls_head) == STAGE2_TRAINABLE_PARAMS
    assert count(s2) == STAGE2_PARAMS
    assert s1.visual_encoder.pos_embed.shape == (1, 577, 768)
