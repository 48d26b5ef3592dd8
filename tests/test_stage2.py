"""Stage II: original BLIP_NLVR fidelity (fixture), and the shared-key/value paths against the per-pair path."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from cirlib.models.config import ModelConfig, TextConfig, VisionConfig, preset
from cirlib.models.shared_attention import group_pairs, order_by_count, tile_pairs
from cirlib.models.stage2 import RerankOutput, RerankQuery, Stage2Model
from cirlib.registry import RegistryError

ATOL_FIXTURE = 2e-5  # fixture README: atol 2e-5 on scores and logits in fp32
ATOL_PATHS = 1e-4  # shared paths vs per-pair path


def _per_query(model: Stage2Model, query: RerankQuery, cands: torch.Tensor, index: torch.Tensor | None = None):
    """The original's algorithm: per-pair path, one query's candidates per pass."""
    m = cands.shape[0] if index is None else index.shape[1]
    return model.score(query, cands, index, scoring="pairs", max_pairs=m)


# --------------------------------------------------------------------------------------------------- fixtures
def _fixture_config() -> ModelConfig:
    """The configuration of fixtures/original-tiny/config.json."""
    return ModelConfig(
        vision=VisionConfig(image_size=64, patch_size=16, width=32, depth=2, num_heads=4, mlp_ratio=4.0),
        text=TextConfig(vocab_size=30524, hidden_size=32, num_layers=12, num_heads=4, intermediate_size=64,
                        max_position_embeddings=64),
        projection_dim=256, reranker="dual", merge_threshold=6)


@pytest.fixture(scope="module")
def original(shared_dir):
    fx = shared_dir / "fixtures" / "original-tiny"
    ckpt = torch.load(fx / "stage2_ckpt.pt", weights_only=True)
    model = Stage2Model(_fixture_config())
    model.load_state_dict(ckpt["BLIP_NLVR"], strict=True)
    return (model.eval(), ckpt["BLIP_NLVR"], torch.load(fx / "expected.pt", weights_only=True),
            torch.load(fx / "inputs.pt", weights_only=True))


class _HeadTap:
    """Records the input and output of `cls_head` (the original's logits2 were taken the same way)."""

    def __init__(self, model: Stage2Model):
        self.inputs, self.outputs = [], []
        self.handle = model.cls_head.register_forward_hook(self._record)

    def _record(self, module, args, out) -> None:  # returning None keeps the output unchanged
        self.inputs.append(args[0].detach())
        self.outputs.append(out.detach())

    def close(self) -> None:
        self.handle.remove()


# ------------------------------------------------------------------------------------------------ fidelity
def test_state_dict_keys_equal_original(original):
    model, sd, _, _ = original
    assert set(model.state_dict()) == set(sd)
    merge = sorted(int(k.split(".")[3]) for k in sd if k.endswith("merge_layer.weight"))
    assert merge == list(range(6, 12))  # the original's hard-coded threshold
    assert model.state_dict()["text_encoder.embeddings.position_ids"].shape == sd[
        "text_encoder.embeddings.position_ids"].shape


def test_stage2_vit_tokens_match_original(original):
    model, _, expected, inputs = original
    with torch.no_grad():
        gallery = model.encode_image(inputs["gallery_images"])
        ref = model.encode_image(inputs["ref_images"])
    torch.testing.assert_close(gallery, expected["stage2"]["gallery_tokens"], atol=ATOL_FIXTURE, rtol=1e-4)
    torch.testing.assert_close(ref, expected["stage2"]["ref_tokens"], atol=ATOL_FIXTURE, rtol=1e-4)


@pytest.mark.parametrize("path", ["per_pair", "shared"])
def test_validation_scores_match_original(original, path):
    """validate_stage2: one unpadded query at a time against the 10 gallery images."""
    model, _, expected, inputs = original
    s2 = expected["stage2"]
    gallery = s2["gallery_tokens"]
    tap = _HeadTap(model)
    scores = []
    with torch.no_grad():
        for i, ids in enumerate(inputs["per_query_input_ids"]):
            query = RerankQuery(ids[None], torch.ones_like(ids[None]), z_t=s2["z_t_per_query"][i][None])
            scores.append(model.score(query, gallery, scoring="pairs" if path == "per_pair" else "shared")[0])
    tap.close()
    scores = torch.stack(scores)
    torch.testing.assert_close(scores, s2["scores"], atol=ATOL_FIXTURE, rtol=1e-4)
    logits2 = torch.stack(tap.outputs)  # (6, 10, 2): one head call per query in both paths
    torch.testing.assert_close(logits2, s2["logits2"], atol=ATOL_FIXTURE, rtol=1e-4)
    torch.testing.assert_close(tap.inputs[0], expected["debug"]["stage2_q0_cls_head_input"],
                               atol=ATOL_FIXTURE, rtol=1e-4)
    assert torch.equal(torch.argsort(scores, dim=1, descending=True),
                       torch.argsort(s2["scores"], dim=1, descending=True))


def test_batched_padded_queries_match_original(original):
    """All six queries at once, padded to 19, through the shared path: every candidate, and chunked top-k lists."""
    model, _, expected, inputs = original
    s2 = expected["stage2"]
    query = RerankQuery(inputs["input_ids"], inputs["attention_mask"], z_t=s2["z_t_batched"])
    with torch.no_grad():
        all_scores = model.score(query, s2["gallery_tokens"])
        perm = torch.stack([torch.randperm(10, generator=torch.Generator().manual_seed(i)) for i in range(6)])
        topk = model.score(query, s2["gallery_tokens"], perm, max_pairs=16)
    torch.testing.assert_close(all_scores, s2["scores"], atol=ATOL_FIXTURE, rtol=1e-4)
    torch.testing.assert_close(topk, torch.gather(s2["scores"], 1, perm), atol=ATOL_FIXTURE, rtol=1e-4)


def test_train_logits_and_loss_match_original(original):
    """img_txt_fusion(train=True) in eval mode: queries 0-3 (padded to 10) against gallery 0-3."""
    model, _, expected, inputs = original
    s2 = expected["stage2"]
    ids, mask = inputs["train_input_ids"], inputs["train_attention_mask"]
    # z_t of the training batch = the batched z_t cut to this batch's length: the rows that matter (non-pad) agree
    # within 1.1e-6 (README), pad rows never reach the first token (masked keys get exp(-10000) = 0).
    query = RerankQuery(ids, mask, z_t=s2["z_t_batched"][:4, : ids.shape[1]])
    targets = s2["gallery_tokens"][inputs["train_target_gallery_index"]]
    tap = _HeadTap(model)
    with torch.no_grad():
        out = model(query, targets)
    tap.close()
    torch.testing.assert_close(out.scores, s2["train_logits"], atol=ATOL_FIXTURE, rtol=1e-4)
    torch.testing.assert_close(tap.outputs[0].view(4, 4, 2), s2["train_raw_logits2"], atol=ATOL_FIXTURE, rtol=1e-4)
    torch.testing.assert_close(out.loss, s2["train_loss"], atol=ATOL_FIXTURE, rtol=1e-4)
    with torch.no_grad():
        ref = _per_query(model, query, targets)
    torch.testing.assert_close(ref, s2["train_logits"], atol=ATOL_FIXTURE, rtol=1e-4)


# ------------------------------------------------------------------------------------- shared vs per-pair paths
def _tiny(reranker: str, dropout: float = 0.0) -> ModelConfig:
    cfg = preset("tiny", reranker=reranker, merge_threshold=2)  # 4 layers: 2 averaged, 2 merge_layer merges
    text = dataclasses.replace(cfg.text, hidden_dropout=dropout, attention_dropout=dropout)
    return dataclasses.replace(cfg, text=text)


def _randomized(cfg: ModelConfig, seed: int = 0) -> Stage2Model:
    """A model whose weights are far from the 0.02-std init, so candidates get clearly different scores."""
    torch.manual_seed(seed)
    model = Stage2Model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
            elif "LayerNorm" in name or "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def _query(cfg: ModelConfig, b: int, lengths: list[int], seed: int = 1) -> RerankQuery:
    g = torch.Generator().manual_seed(seed)
    length = max(lengths)
    ids = torch.randint(1000, 2000, (b, length), generator=g)
    mask = torch.zeros(b, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask  # pad id 0
    ids[:, 0] = 30523
    z_t = torch.randn(b, length, cfg.text.hidden_size, generator=g)
    ref = torch.randn(b, cfg.vision.num_tokens, cfg.vision.width, generator=g)
    return RerankQuery(ids, mask, z_t=z_t if cfg.reranker == "dual" else None,
                       ref_tokens=ref if cfg.reranker == "joint" else None)


def _tokens(cfg: ModelConfig, n: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, cfg.vision.num_tokens, cfg.vision.width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
@pytest.mark.parametrize("reranker", ["dual", "joint"])
def test_shared_paths_equal_per_pair_in_eval(reranker):
    cfg = _tiny(reranker)
    model = _randomized(cfg).eval()
    query = _query(cfg, 5, [7, 3, 9, 5, 9])
    cands = _tokens(cfg, 6)
    # Mixed lists: repeats, a popular candidate (bucket with padding), singletons, an unused candidate (5).
    index = torch.tensor([[0, 1, 2, 0], [0, 3, 3, 1], [0, 4, 1, 2], [0, 1, 3, 4], [0, 2, 2, 2]])
    with torch.inference_mode():
        ref_all = _per_query(model, query, cands)  # (5, 6)
        assert ref_all.std() > 0.05  # the comparison below is not between constants
        torch.testing.assert_close(model.score(query, cands), ref_all, atol=ATOL_PATHS, rtol=0)
        torch.testing.assert_close(model.score(query, cands, index), torch.gather(ref_all, 1, index),
                                   atol=ATOL_PATHS, rtol=0)
        torch.testing.assert_close(_per_query(model, query, cands, index), torch.gather(ref_all, 1, index),
                                   atol=ATOL_PATHS, rtol=0)
        for max_pairs in (3, 4096):  # 3: cuts between runs and inside the 6-pair run of candidate 0
            torch.testing.assert_close(model.score(query, cands, index, max_pairs=max_pairs),
                                       torch.gather(ref_all, 1, index), atol=ATOL_PATHS, rtol=0)
        pairs = torch.tensor([3, 0, 5, 1, 2])
        torch.testing.assert_close(model.score(query, cands, pairs[:, None], scoring="pairs")[:, 0],
                                   ref_all[torch.arange(5), pairs], atol=ATOL_PATHS, rtol=0)
        # The per-pair path cut anywhere (7 pairs per pass, across query boundaries) gives the same numbers.
        torch.testing.assert_close(model.score(query, cands, index, scoring="pairs", max_pairs=7),
                                   torch.gather(ref_all, 1, index), atol=ATOL_PATHS, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("reranker", ["dual", "joint"])
def test_training_step_equal_per_pair(reranker):
    """Train mode (dropout 0 so both paths are deterministic): logits, loss and every gradient agree."""
    cfg = _tiny(reranker)
    b = 4
    query = _query(cfg, b, [6, 8, 3, 8])
    targets = _tokens(cfg, b)
    grads = {}
    for path in ("per_pair", "shared"):
        model = _randomized(cfg).train()
        if path == "shared":
            out = model(query, targets)
        else:
            scores = _per_query(model, query, targets)
            out = RerankOutput(scores=scores, loss=torch.nn.functional.cross_entropy(scores, torch.arange(b)))
        out.loss.backward()
        grads[path] = (out.scores.detach(), out.loss.detach(),
                       {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (s_ref, l_ref, g_ref), (s_new, l_new, g_new) = grads["per_pair"], grads["shared"]
    torch.testing.assert_close(s_new, s_ref, atol=ATOL_PATHS, rtol=0)
    torch.testing.assert_close(l_new, l_ref, atol=ATOL_PATHS, rtol=0)
    assert set(g_new) == set(g_ref) and len(g_ref) > 20
    for name in g_ref:
        torch.testing.assert_close(g_new[name], g_ref[name], atol=ATOL_PATHS, rtol=1e-4, msg=name)
    assert max(g.abs().max() for g in g_ref.values()) > 1e-3  # gradients are not all zero


@pytest.mark.slow
@pytest.mark.parametrize("reranker", ["dual", "joint"])
def test_mixed_negatives_gradients_equal_per_pair(reranker):
    """Candidate lists with a positive per row (hard + in-batch negatives), train mode, dropout 0."""
    cfg = _tiny(reranker)
    query = _query(cfg, 3, [5, 9, 4])
    cands = _tokens(cfg, 7)
    index = torch.tensor([[0, 3, 4, 1, 2], [1, 5, 6, 2, 0], [2, 6, 3, 0, 1]])
    positive = torch.tensor([0, 0, 0])
    results = []
    for shared in (False, True):
        model = _randomized(cfg).train()
        if shared:
            out = model(query, cands, cand_index=index, positive=positive)
            scores, loss = out.scores, out.loss
        else:
            scores = _per_query(model, query, cands, index)
            loss = torch.nn.functional.cross_entropy(scores, positive)
        loss.backward()
        results.append((scores.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=ATOL_PATHS, rtol=0)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, atol=ATOL_PATHS, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_dropout_is_active_in_train_mode():
    cfg = _tiny("dual", dropout=0.5)
    model = _randomized(cfg).train()
    query, cands = _query(cfg, 2, [5, 7]), _tokens(cfg, 3)
    a, b = model.score(query, cands), model.score(query, cands)
    assert torch.isfinite(a).all() and not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model.score(query, cands), model.score(query, cands))


# ------------------------------------------------------------------------------------------------- structure
def test_joint_state_dict_names_are_blip_single_stream():
    model = Stage2Model(preset("tiny", reranker="joint"))
    keys = set(model.state_dict())
    for k in ("text_encoder.embeddings.word_embeddings.weight", "text_encoder.embeddings.LayerNorm.bias",
              "text_encoder.encoder.layer.0.attention.self.query.weight",
              "text_encoder.encoder.layer.3.crossattention.self.key.weight",
              "text_encoder.encoder.layer.3.crossattention.output.LayerNorm.weight",
              "text_encoder.encoder.layer.1.intermediate.dense.weight",
              "text_encoder.encoder.layer.1.output.dense.bias",
              "image_type_embeddings.weight", "cls_head.0.weight", "cls_head.2.bias", "visual_encoder.pos_embed"):
        assert k in keys, k
    assert not any("self0" in k or "merge_layer" in k or "position_ids" in k for k in keys)
    assert model.state_dict()["cls_head.0.weight"].shape == (128, 128)
    assert model.state_dict()["text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape == (128, 128)


def test_dual_merge_layers_follow_threshold():
    model = Stage2Model(preset("tiny", reranker="dual"))  # 4 layers < threshold 6: no merge layer at all
    assert not any("merge_layer" in k for k in model.state_dict())
    model = Stage2Model(_tiny("dual"))
    assert sorted({k.split(".")[3] for k in model.state_dict() if "merge_layer" in k}) == ["2", "3"]


def test_grouping_covers_every_pair_once_with_bounded_padding():
    keys = torch.tensor([4, 1, 1, 0, 4, 4, 2, 4, 1, 3, 4, 0, 4, 4])
    order, new_keys = order_by_count(keys, 6)
    assert order.tolist() == [4, 1, 0, 2, 3]  # by count, ties by key; key 5 is unused
    grouping = group_pairs(new_keys, order.numel())
    assert torch.equal(grouping.slot_pair[grouping.pair_slot], torch.arange(keys.numel()))
    for b in grouping.buckets:  # every slot of a key holds one of that key's pairs
        n = b.end - b.start
        slots = grouping.slot_pair[b.offset: b.offset + n * b.slots].view(n, b.slots)
        assert (new_keys[slots] == torch.arange(b.start, b.end)[:, None]).all()
    assert grouping.slot_pair.numel() <= keys.numel() / 0.75


def test_pair_tiles_cover_every_pair_once_with_calls_on_their_keys():
    keys = torch.tensor([4, 1, 1, 0, 4, 4, 2, 4, 1, 3, 4, 0, 4, 4, 5, 5])
    _, new_keys = order_by_count(keys, 6)  # counts 7, 3, 2, 2, 1, 1: runs of equal counts
    for size in (1, 3, 5, 16, 100):
        tiles = tile_pairs(new_keys, 6, size)
        assert sorted(tiles.order.tolist()) == list(range(keys.numel()))
        sorted_keys = new_keys[tiles.order]
        assert (sorted_keys[1:] >= sorted_keys[:-1]).all()
        assert [(s, e) for s, e, _ in tiles.tiles] == [(s, min(s + size, 16)) for s in range(0, 16, size)]
        for s, e, calls in tiles.tiles:
            rows = 0
            for c in calls:  # calls tile the tile's rows in order, each on keys [key, key + keys)
                assert c.row == rows
                block = sorted_keys[s + c.row: s + c.row + c.keys * c.per_key].view(c.keys, c.per_key)
                assert (block == torch.arange(c.key, c.key + c.keys)[:, None]).all()
                rows += c.keys * c.per_key
            assert rows == e - s


@pytest.mark.parametrize("tile_rows", [1, 20, 1024])
def test_tiled_shared_path_equals_untiled_and_per_pair(tile_rows):
    """Inference: tiles of 1 pair (every key cut), of a few pairs, and one tile for all give the untiled scores."""
    cfg = _tiny("dual")
    model = _randomized(cfg).eval()
    query, cands = _query(cfg, 4, [7, 3, 9, 5]), _tokens(cfg, 5)
    index = torch.tensor([[0, 1, 2, 0], [0, 3, 3, 1], [0, 4, 1, 2], [0, 1, 3, 4]])
    with torch.inference_mode():
        ref = _per_query(model, query, cands, index)
        model.shared_tile_rows = 0
        untiled = model.score(query, cands, index, max_pairs=7)
        model.shared_tile_rows = tile_rows
        tiled = model.score(query, cands, index, max_pairs=7)
    assert ref.std() > 0.05
    torch.testing.assert_close(tiled, untiled, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiled, ref, atol=ATOL_PATHS, rtol=0)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors():
    cfg = _tiny("dual")
    model = Stage2Model(cfg).eval()
    query, cands = _query(cfg, 2, [4, 6]), _tokens(cfg, 3)
    with pytest.raises(ValueError, match="z_t"):
        model.score(RerankQuery(query.input_ids, query.attention_mask), cands)
    with pytest.raises(ValueError, match="z_t must be"):
        RerankQuery(query.input_ids, query.attention_mask, z_t=query.z_t[:, :3])
    with pytest.raises(ValueError, match="attention_mask"):
        RerankQuery(query.input_ids, query.attention_mask[:, :2])
    with pytest.raises(ValueError, match="index holds rows outside"):
        model.score(query, cands, torch.tensor([[0, 3], [1, 2]]), max_pairs=4)
    with pytest.raises(ValueError, match="index must be"):
        model.score(query, cands, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="cand_tokens must be"):
        model.score(query, cands[..., :5])
    with pytest.raises(ValueError, match="unknown scoring 'fast'"):
        model.score(query, cands, scoring="fast")
    with pytest.raises(ValueError, match="max_pairs must be >= 1"):
        model.score(query, cands, max_pairs=0)
    with pytest.raises(RegistryError, match="unknown re-ranker .triple.: known are"):
        Stage2Model(dataclasses.replace(cfg, reranker="triple"))
    joint = Stage2Model(_tiny("joint"))
    with pytest.raises(ValueError, match="ref_tokens"):
        joint.score(query, cands)


# ------------------------------------------------------------------------------------- joint_difference option
def test_joint_difference_attends_to_candidate_minus_reference():
    """The third key segment is (candidate - reference) + type 2: the same scores as a plain joint model that is
    handed [ref + e0 ; cand + e1 ; cand - ref + e2] by hand through its text encoder, and different from leaving it out."""
    cfg = dataclasses.replace(_tiny("joint"), joint_difference=True)
    model = _randomized(cfg).eval()
    assert model.image_type_embeddings.weight.shape[0] == 3
    q = _query(cfg, 3, [5, 7, 4])
    cand = _tokens(cfg, 3)
    with torch.no_grad():
        got = model.score(q, cand, torch.arange(3)[:, None], scoring="pairs")[:, 0]
        e = model.image_type_embeddings.weight
        image = torch.cat([q.ref_tokens + e[0], cand + e[1], cand - q.ref_tokens + e[2]], dim=1)
        want = model.cls_head(model.text_encoder.forward_pairs(q.input_ids, q.attention_mask, image))[:, 0]
        without = model.cls_head(model.text_encoder.forward_pairs(q.input_ids, q.attention_mask, image[:, :-cand.shape[1]]))[:, 0]
    torch.testing.assert_close(got, want)
    assert (got - without).abs().max() > 1e-3
    # the flag survives the config round trip (saved runs reload with it)
    assert ModelConfig.from_dict(cfg.to_dict()).joint_difference is True


def test_joint_difference_errors_are_clear():
    cfg = dataclasses.replace(_tiny("joint"), joint_difference=True)
    model = _randomized(cfg).eval()
    with pytest.raises(ValueError, match="scoring='pairs'"):
        model.score(_query(cfg, 2, [4, 5]), _tokens(cfg, 3))
    with pytest.raises(ValueError, match="joint re-ranker"):
        Stage2Model(dataclasses.replace(_tiny("dual"), joint_difference=True))


def test_make_query_keeps_what_the_architecture_reads():
    """One place builds the re-ranking query: z_t for the dual re-ranker, reference tokens for the joint one."""
    base = _query(_tiny("dual"), 2, [4, 6])
    ref = _tokens(_tiny("dual"), 2)
    dual, joint = Stage2Model(_tiny("dual")), Stage2Model(_tiny("joint"))
    assert dual.needs_z_t and not joint.needs_z_t
    q = dual.make_query(base.input_ids, base.attention_mask, ref_tokens=ref, z_t=base.z_t)
    assert q.z_t is base.z_t and q.ref_tokens is None
    q = joint.make_query(base.input_ids, base.attention_mask, ref_tokens=ref, z_t=base.z_t)
    assert q.z_t is None and q.ref_tokens is ref
    with pytest.raises(ValueError, match="dual re-ranker needs z_t"):
        dual.make_query(base.input_ids, base.attention_mask, ref_tokens=ref)
    with pytest.raises(ValueError, match="joint re-ranker needs ref_tokens"):
        joint.make_query(base.input_ids, base.attention_mask, ref_tokens=None)
