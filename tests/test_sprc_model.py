"""SPRC's BLIP-2 retriever (first stage "sprc"): checkpoint formats, text rules, shapes, losses, Stage1Task."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from cirlib.data.synth import SynthConfig, vocabulary
from cirlib.data.tokenizer import build_tokenizer
from cirlib.models import factory, loading
from cirlib.models.config import ModelConfig, preset
from cirlib.models.first_stage import FIRST_STAGES
from cirlib.models.sprc import CHECKPOINT_KEY, SPRCRetriever, pre_caption
from cirlib.models.sprc_keys import to_lavis
from cirlib.models.stage1 import Stage1Model

VOCAB = len(vocabulary(SynthConfig())) + 1  # the synthetic words + [DEC]: SPRC's tokenizer (ours adds [ENC])


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(vocabulary(SynthConfig())) + "\n")
    return build_tokenizer(path)


def _model(vocab: int = VOCAB, seed: int = 0) -> SPRCRetriever:
    cfg = preset("sprc-tiny")
    torch.manual_seed(seed)
    return SPRCRetriever(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=vocab))).eval()


def _sprc_file(model: SPRCRetriever, path, drop: tuple[str, ...] = (), extra: dict | None = None) -> None:
    """`model` saved as SPRC's code saves it: LAVIS names, fp16 ViT, the unused LM/ITM heads and position ids."""
    sd = to_lavis(model.state_dict())
    sd = {k: (v.half() if k.startswith("visual_encoder.") else v) for k, v in sd.items() if k not in drop}
    h = model.config.text.hidden_size
    sd.update({"Qformer.cls.predictions.bias": torch.zeros(VOCAB), "itm_head.weight": torch.zeros(2, h),
               "itm_head.bias": torch.zeros(2),
               "Qformer.bert.embeddings.position_ids": torch.arange(model.config.text.max_position_embeddings)[None]},
              **(extra or {}))
    torch.save({"epoch": 3, CHECKPOINT_KEY: sd}, path)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, vit_fp16: bool) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        want = sa[k].half().float() if vit_fp16 and k.startswith("visual_encoder.") else sa[k]
        assert torch.equal(sb[k], want), k


def test_sprc_is_registered_and_configs_round_trip(tmp_path, tok):
    assert FIRST_STAGES.get("sprc") is SPRCRetriever
    assert ModelConfig.from_dict(preset("sprc-tiny").to_dict()) == preset("sprc-tiny")
    old = preset("tiny").to_dict()
    del old["qformer"]  # a config.json written before the field existed
    assert ModelConfig.from_dict(old).qformer is None
    model = factory.build_stage1("sprc-tiny", tok.vocab_size)
    assert type(model) is SPRCRetriever and model.trains_gallery_head and not Stage1Model.trains_gallery_head
    loading.save_pretrained(model, tmp_path / "m")
    _same_weights(model, SPRCRetriever.from_pretrained(str(tmp_path / "m")), vit_fp16=False)
    with pytest.raises(ValueError, match="needs ModelConfig.qformer"):
        SPRCRetriever(preset("tiny"))
    with pytest.raises(ValueError, match="no stochastic depth"):
        SPRCRetriever(dataclasses.replace(preset("sprc-tiny"), stage1_drop_path_rate=0.1))


def test_a_released_sprc_checkpoint_loads_every_key(tmp_path):
    source = _model(seed=1)
    _sprc_file(source, tmp_path / "sprc.pt")
    model = _model(seed=2)
    assert loading.load_original_checkpoint(model, tmp_path / "sprc.pt") == 3
    _same_weights(source, model, vit_fp16=True)
    # through the stage-I builder, into our tokenizer's one extra row ([ENC], never emitted by SPRC's rules)
    wider = factory.build_stage1("sprc-tiny", VOCAB + 1, init_checkpoint=tmp_path / "sprc.pt")
    assert torch.equal(wider.embeddings.word_embeddings.weight[:VOCAB], source.embeddings.word_embeddings.weight)


def test_unmapped_extra_and_missing_keys_are_named(tmp_path):
    source = _model()
    _sprc_file(source, tmp_path / "extra.pt", extra={"Qformer.bert.pooler.dense.weight": torch.zeros(2, 2)})
    with pytest.raises(loading.CheckpointError, match=r"Qformer\.bert\.pooler\.dense\.weight"):
        loading.load_original_checkpoint(_model(), tmp_path / "extra.pt")
    _sprc_file(source, tmp_path / "missing.pt", drop=("text_proj.weight",))
    with pytest.raises(loading.CheckpointError, match=r"missing key.*text_proj\.weight"):
        loading.load_original_checkpoint(_model(), tmp_path / "missing.pt")
    _sprc_file(source, tmp_path / "half.pt", drop=("visual_encoder.blocks.0.attn.v_bias",))
    with pytest.raises(loading.CheckpointError, match=r"visual_encoder\.blocks\.0\.attn\.q_bias"):
        loading.load_original_checkpoint(_model(), tmp_path / "half.pt")
    torch.save({"epoch": 0, "BLIP_Retrieval": {}}, tmp_path / "blip.pt")
    with pytest.raises(loading.CheckpointError, match=CHECKPOINT_KEY):
        loading.load_original_checkpoint(_model(), tmp_path / "blip.pt")


def test_a_lavis_pretraining_file_loads_and_leaves_the_prompt_tokens_fresh(tmp_path):
    source = _model(seed=1)
    sd = {k: v for k, v in to_lavis(source.state_dict()).items() if k != "prompt_tokens"}
    torch.save({"model": sd}, tmp_path / "blip2.pth")
    model = _model(seed=2)
    fresh = model.prompt_tokens.detach().clone()
    report = loading.load_blip_pretrained(model, tmp_path / "blip2.pth")
    assert report.initialised == ("prompt_tokens",)
    assert torch.equal(model.prompt_tokens, fresh) and torch.equal(model.query_tokens, source.query_tokens)
    assert torch.equal(model.qformer.layernorm.weight, source.qformer.layernorm.weight)


def test_text_rules_are_sprcs(tok):
    assert pre_caption('Make it RED. (now)! "shiny";  ~ok') == "make it red now shiny ok"
    assert pre_caption(" ".join(["w"] * 60)) == " ".join(["w"] * 50)
    model = _model()
    words = [w for w in vocabulary(SynthConfig()) if w.isalpha()]
    ids, mask = model.tokenize_queries(tok, [f"{words[0].upper()}.", " ".join(words[:40])])
    assert ids.shape == (2, 32) and ids.dtype == torch.long
    assert (ids[:, 0] == tok.bert.cls_token_id).all() and ids[1, -1] == tok.sep_token_id  # [CLS] kept, [SEP] last
    assert ids[0, :3].tolist() == [tok.bert.cls_token_id, tok.bert.convert_tokens_to_ids(words[0]), tok.sep_token_id]
    assert mask[0].sum() == 3 and (ids[0, 3:] == tok.pad_token_id).all()
    short, _ = model.tokenize_queries(tok, [words[0]])
    assert short.shape == (1, 3)  # padded to the longest text of the batch, not to 32
    blip = Stage1Model(preset("tiny"))
    assert all(torch.equal(a, b) for a, b in zip(blip.tokenize_queries(tok, ["a b"]), tok(["a b"])))


def test_encoders_give_sprcs_shapes():
    model = _model()
    cfg = model.config
    images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    with torch.no_grad():
        feats = model.encode_image(images)
        ids = torch.tensor([[2, 10, 11, 3, 0], [2, 12, 13, 14, 3]])
        query = model.encode_query(feats.tokens, ids, (ids > 0).long())
    assert feats.tokens.shape == (2, cfg.vision.num_tokens, cfg.vision.width)
    assert feats.embeds.shape == (2, 32, cfg.projection_dim)
    assert torch.allclose(feats.embeds.norm(dim=-1), torch.ones(2, 32), atol=1e-6)
    assert query.embeds.shape == (2, cfg.projection_dim) and query.hidden.shape == (2, 32 + 5, cfg.text.hidden_size)
    assert model.similarity(query.embeds, feats.embeds).shape == (2, 2)
    assert set(model.image_weights(("tokens",))) == {"visual_encoder"}
    assert set(model.image_weights(("tokens", "embeds"))) == {"visual_encoder", "ln_vision", "qformer",
                                                              "query_tokens", "vision_proj"}


def test_padding_does_not_change_the_query_or_the_relative_feature():
    model = _model()
    tokens = torch.randn(1, model.config.vision.num_tokens, model.config.vision.width)
    ids = torch.tensor([[2, 10, 11, 3]])
    padded = torch.cat([ids, torch.zeros(1, 28, dtype=torch.long)], dim=1)  # SPRC pads to 32
    with torch.no_grad():
        a = model.encode_query(tokens, ids, torch.ones_like(ids)).embeds
        b = model.encode_query(tokens, padded, (padded > 0).long()).embeds
        c, d = model.text_only(ids, torch.ones_like(ids)), model.text_only(padded, (padded > 0).long())
    assert (a - b).abs().max() < 1e-6 and (c - d).abs().max() < 1e-6


def test_the_three_losses_train(tok):
    model = _model()  # eval mode: no dropout, so the loss may only fall
    with torch.no_grad():  # BERT's 0.02 init makes every image's 32 vectors alike; widen it so images differ
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.2 / p.shape[-1] ** 0.5)
    for p in model.visual_encoder.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    size = model.config.vision.image_size
    refs, targets = torch.randn(4, 3, size, size), torch.randn(4, 3, size, size)
    words = [w for w in vocabulary(SynthConfig()) if w.isalpha()]
    ids, mask = model.tokenize_queries(tok, [" ".join(words[i:i + 3]) for i in range(4)])
    assert not bool((ids == tok.enc_token_id).any())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.98), eps=1e-7,
                            weight_decay=0.05)
    losses = []
    for _ in range(8):
        with torch.no_grad():
            ref_tokens, target_tokens = model.encode_image(refs).tokens, model.encode_image(targets).tokens
        out = model(ref_tokens, ids, mask, model.embed_tokens(target_tokens))
        assert set(out.parts) == {"itc", "rtc", "align"} and torch.isfinite(out.loss)
        w = model.loss_weights
        assert torch.allclose(out.loss, out.parts["itc"] + w.rtc * out.parts["rtc"] + w.align * out.parts["align"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert model.vision_proj.weight.grad is not None and model.ln_vision.weight.grad is not None
    assert model.prompt_tokens.grad is not None
    assert all(p.grad is None for p in model.visual_encoder.parameters())


class _TokenStore:
    """A stage-I store holding ViT tokens only (what a first stage that trains its gallery head may read)."""

    def __init__(self, shape: tuple[int, int]):
        self.shape, self.seen = shape, {}

    def tokens(self, names):
        return torch.stack([self.seen.setdefault(n, torch.randn(*self.shape)) for n in names])

    def embeddings(self, names):
        raise AssertionError("a store's embeddings are stale for a first stage that trains its gallery head")


def test_stage1_task_trains_the_gallery_head(tmp_path, tok):
    from cirlib import data as cdata
    from cirlib.data import synth
    from cirlib.train.tasks import Stage1Task

    root = synth.generate(synth.SynthConfig(layout="cirr", n_train=8, n_val=2, n_test=2, seed=1), root=tmp_path / "w")
    sd = cdata.load_split("cirr", root, "train")
    model = factory.build_stage1("sprc-tiny", tok.vocab_size)
    task = Stage1Task(model, tok, [sd], cdata.targetpad_transform(1.25, model.config.vision.image_size), batch_size=4,
                      train_image_encoder=False, validate_fn=dict, selection_key="x")
    assert model.vision_proj.weight.requires_grad and not any(
        p.requires_grad for p in model.visual_encoder.parameters())
    task.train_mode()
    step = task.training_step(next(iter(task.train_loader(0))))
    step["loss"].backward()
    assert {"loss_itc", "loss_rtc", "loss_align"} <= set(step)
    assert model.vision_proj.weight.grad.abs().sum() > 0 and model.ln_vision.weight.grad.abs().sum() > 0
    model.zero_grad()
    store = _TokenStore((model.config.vision.num_tokens, model.config.vision.width))
    task = Stage1Task(model, tok, [sd], None, batch_size=4, train_image_encoder=False, validate_fn=dict,
                      selection_key="x", store=store)
    task.training_step(next(iter(task.train_loader(0))))["loss"].backward()
    assert model.vision_proj.weight.grad.abs().sum() > 0 and len(store.seen) >= 5
    task.symmetric_loss = True  # targets against queries: the max over each target's 32 vectors
    both = task.training_step(next(iter(task.train_loader(0))))
    assert torch.isfinite(both["loss"]) and not torch.allclose(both["loss"], both["loss_itc"] + 0.4 * (
        both["loss_rtc"] + both["loss_align"]))


def test_loss_weights_and_sprcs_adam_settings_reach_the_model_and_the_loop():
    from cirlib.models.sprc import SPRCLossWeights
    from cirlib.workbook import steps
    from cirlib.workbook.config import Stage1Config
    from cirlib.workbook.factories import parse_loss_weights

    assert parse_loss_weights("rtc:1, align:0.5") == {"rtc": 1.0, "align": 0.5} and parse_loss_weights("") == {}
    with pytest.raises(ValueError, match="'rtc' is not name:number"):
        parse_loss_weights("rtc")
    model = _model()
    model.set_loss_weights({"rtc": 1.0})
    assert model.loss_weights == SPRCLossWeights(rtc=1.0, align=0.4)
    with pytest.raises(ValueError, match=r"unknown SPRC loss weight\(s\) \['itm'\]"):
        model.set_loss_weights({"itm": 1.0})
    blip = Stage1Model(preset("tiny"))
    blip.set_loss_weights({})
    with pytest.raises(ValueError, match="'blip' first stage has no auxiliary losses"):
        blip.set_loss_weights({"rtc": 1.0})
    loop = steps._stage1_train_config(Stage1Config(adam_beta2=0.98, adam_eps=1e-7))
    assert loop.betas == (0.9, 0.98) and loop.eps == 1e-7 and loop.weight_decay == 0.05


def test_gradient_checkpointing_keeps_the_loss_and_the_gradients():
    model = _model().train()
    for module in model.modules():  # dropout off (its draws would differ), training mode kept (checkpointing needs it)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0
    tokens = torch.randn(2, model.config.vision.num_tokens, model.config.vision.width)
    ids = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]])

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(tokens, ids, (ids > 0).long(), model.embed_tokens(tokens.flip(0))).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_gradient_checkpointing(True)
    assert model.qformer.encoder.layer[0].gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and all(torch.equal(plain[k], checkpointed[k]) for k in plain)


def test_the_released_size_is_eva_vit_g_and_a_bert_base_qformer():
    from transformers import Blip2VisionConfig

    from cirlib.models.sprc import blip2_vision_config

    ours, eva_g = blip2_vision_config(preset("sprc-g")), Blip2VisionConfig()  # transformers' defaults are BLIP-2's EVA-g
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size", "layer_norm_eps", "qkv_bias", "hidden_act"):
        assert getattr(ours, name) == getattr(eva_g, name), name
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = SPRCRetriever(preset("sprc-g"))
    assert sum(p.numel() for p in model.visual_encoder.parameters()) == 985_949_440  # 39 of EVA-CLIP-g's 40 blocks
    assert model.embeddings.word_embeddings.weight.shape == (30523, 768) and model.query_tokens.shape == (1, 32, 768)
    assert model.ln_vision.eps == 1e-5 and model.vision_proj.weight.shape == (256, 768)


def test_the_workbook_trains_validates_and_ranks_with_sprc(tmp_path):
    import json

    from cirlib.data import synth
    from cirlib.workbook import steps
    from cirlib.workbook.config import Stage1Config, TopKConfig

    root = synth.generate(synth.SynthConfig(layout="cirr", n_train=16, n_val=6, n_test=2, seed=1), root=tmp_path / "w")
    out = str(tmp_path / "out")
    cfg = Stage1Config(stage1_run="sprc", dataset="cirr", data_root=str(root), preset="sprc-tiny", epochs=1,
                       batch_size=8, lr=1e-4, adam_beta2=0.98, adam_eps=1e-7, loss_weights="rtc:1,align:1",
                       feature_store="float32", outputs=out, trackers="none", max_steps_per_epoch=2)
    summary = steps.train_stage1(cfg)
    assert 0 <= summary.metrics["R@1"] <= 100
    step = next(json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "epoch")
    assert step["loss"] == pytest.approx(step["loss_itc"] + step["loss_rtc"] + step["loss_align"], rel=1e-5)
    assert type(loading.from_pretrained(summary.run_dir / "model")) is SPRCRetriever
    table = steps.extract_topk(TopKConfig(stage1_run="sprc", topk_k=5, outputs=out))
    assert table["queries"].tolist() == [6]
