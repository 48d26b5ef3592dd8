"""Gradient checkpointing of the text encoders (stage I: BLIP's text model; stage II: our re-rankers): the same loss and
gradients with and without it, and the layers really are recomputed in the backward pass when it is on."""
from __future__ import annotations

import pytest
import torch

from cirlib.models.config import preset
from cirlib.models.stage1 import Stage1Model
from cirlib.models.stage2 import RerankQuery, Stage2Model


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, loss_fn, probe: torch.nn.Module, seed: int = 0) -> tuple[torch.Tensor, dict, int]:
    """Loss, gradients and how often `probe` ran during the backward pass (dropout on: the RNG must be replayed)."""
    model.zero_grad(set_to_none=True)
    calls = _count_calls(probe)
    torch.manual_seed(seed)
    loss = loss_fn()
    before = calls[0]
    loss.backward()
    return loss.detach(), _grads(model), calls[0] - before


def _assert_same(a, b):
    loss_a, grads_a, _ = a
    loss_b, grads_b, _ = b
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-4), name


@pytest.mark.slow
def test_stage1_checkpointing_same_gradients_and_recomputes():
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = Stage1Model(cfg).train()
    model.visual_encoder.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, cfg.vision.num_tokens, cfg.vision.width, generator=gen)
    ids = torch.randint(1000, 2000, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    targets = torch.nn.functional.normalize(torch.randn(3, cfg.projection_dim, generator=gen), dim=-1)
    probe = model.text_encoder.encoder.layer[1].intermediate.dense

    def loss():
        return model(tokens, ids, mask, targets).loss

    plain = _step(model, loss, probe)
    model.set_gradient_checkpointing(True)
    ckpt = _step(model, loss, probe)
    _assert_same(plain, ckpt)
    assert plain[2] == 0 and ckpt[2] == 1  # the layer ran again in the backward pass only with checkpointing
    with torch.no_grad():  # no backward to replay: no checkpointing either (and no error)
        model(tokens, ids, mask, targets)


@pytest.mark.slow
@pytest.mark.parametrize("reranker", ["dual", "joint"])
@pytest.mark.parametrize("scoring", ["shared", "pairs"])
def test_stage2_checkpointing_same_gradients_and_recomputes(reranker, scoring):
    cfg = preset("tiny", reranker=reranker)
    torch.manual_seed(0)
    model = Stage2Model(cfg).train()
    model.visual_encoder.requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    b, length = 3, 6
    ids = torch.randint(1000, 2000, (b, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ref = torch.randn(b, cfg.vision.num_tokens, cfg.vision.width, generator=gen)
    z_t = torch.randn(b, length, cfg.text.hidden_size, generator=gen)
    query = model.make_query(ids, mask, ref_tokens=ref, z_t=z_t)
    assert isinstance(query, RerankQuery)
    targets = torch.randn(b, cfg.vision.num_tokens, cfg.vision.width, generator=gen)
    probe = model.text_encoder.encoder.layer[2].intermediate.dense

    def loss():
        scores = model.score(query, targets, scoring=scoring)
        return torch.nn.functional.cross_entropy(scores, torch.arange(b))

    plain = _step(model, loss, probe)
    model.set_gradient_checkpointing(True)
    ckpt = _step(model, loss, probe)
    _assert_same(plain, ckpt)
    assert plain[2] == 0 and ckpt[2] >= 1
    Stage2Model(cfg, gradient_checkpointing=True)  # the constructor option


def test_config_fields_and_factories_wire_checkpointing():
    from cirlib.workbook.config import NOT_IDENTITY, Stage1Config, Stage2TrainConfig
    assert Stage1Config().gradient_checkpointing is False and Stage2TrainConfig().gradient_checkpointing is False
    assert "gradient_checkpointing" in NOT_IDENTITY  # same losses and gradients: a finished run is still reused
    from cirlib.workbook import factories

    class Tokenizer:
        vocab_size = 30524

    s1 = factories.build_stage1(Stage1Config(preset="tiny", gradient_checkpointing=True), Tokenizer())
    assert all(layer.gradient_checkpointing for layer in s1.text_encoder.encoder.layer)
    s2 = factories.build_stage2(Stage2TrainConfig(preset="tiny", init="scratch", gradient_checkpointing=True),
                                Tokenizer(), None)
    assert s2.text_encoder.encoder.gradient_checkpointing
    off = factories.build_stage2(Stage2TrainConfig(preset="tiny", init="scratch"), Tokenizer(), None)
    assert not off.text_encoder.encoder.gradient_checkpointing
