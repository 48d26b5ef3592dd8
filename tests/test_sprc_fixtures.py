"""The SPRC oracle fixture (tests/fixtures/sprc-tiny, made by cirlib/tools/make_sprc_fixtures.py from SPRC's own code):
complete, loadable with weights_only=True, and internally consistent with the formulas its README states."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cirlib.paths import REPO_ROOT

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "sprc-tiny"
FILES = ("README.md", "config.json", "vocab.txt", "inputs.pt", "expected.pt", "sprc_ckpt.pt", "lavis_pretrain_like.pt",
         *(f"ref_{k}.png" for k in range(3)), *(f"gal_{k}.png" for k in range(6)))
CLASS_NAME = "Blip2QformerCirAlignPrompt"


def load(name: str) -> dict:
    return torch.load(FIXTURE / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def fx() -> dict:
    config = json.loads((FIXTURE / "config.json").read_text())
    return {"config": config, "inputs": load("inputs.pt"), "expected": load("expected.pt"),
            "state": load("sprc_ckpt.pt")[CLASS_NAME]}


def test_the_fixture_folder_is_complete_and_small():
    missing = [f for f in FILES if not (FIXTURE / f).is_file()]
    assert not missing, f"{FIXTURE}: missing {missing}"
    size = sum(p.stat().st_size for p in FIXTURE.iterdir())
    assert size < 6_000_000, f"{FIXTURE}: {size} bytes, over the few-MB budget"


def test_checkpoints_have_sprc_and_lavis_layouts():
    ckpt, pretrain = load("sprc_ckpt.pt"), load("lavis_pretrain_like.pt")
    assert set(ckpt) == {"epoch", CLASS_NAME} and set(pretrain) == {"model"}
    assert set(ckpt[CLASS_NAME]) - set(pretrain["model"]) == {"prompt_tokens"}
    assert set(pretrain["model"]) < set(ckpt[CLASS_NAME])


def test_shapes_follow_config(fx):
    c, i, e = fx["config"], fx["inputs"], fx["expected"]
    v, q = c["vision"], c["qformer"]
    tokens, nq, txt = v["num_tokens"], c["num_query_token"], c["max_txt_len"]
    assert i["ref_images"].shape == (3, 3, v["img_size"], v["img_size"])
    assert i["input_ids"].shape == i["attention_mask"].shape == (3, txt)
    assert e["ref_vit_blocks"].shape == (v["depth"], 3, tokens, v["embed_dim"])
    assert e["gallery_feats"].shape == (6, nq, c["embed_dim"])
    assert e["fusion_layers"].shape == (q["num_hidden_layers"], 3, nq + txt, q["hidden_size"])
    assert fx["state"]["Qformer.bert.embeddings.word_embeddings.weight"].shape[0] == i["vocab_size"] == q["vocab_size"]
    assert len((FIXTURE / "vocab.txt").read_text().split()) + 1 == i["vocab_size"]  # + [DEC]


def test_tokens_keep_cls_and_end_with_sep(fx):
    i = fx["inputs"]
    ids, mask = i["input_ids"], i["attention_mask"]
    assert (ids[:, 0] == i["cls_token_id"]).all()
    last = mask.sum(1) - 1
    assert (ids[torch.arange(len(ids)), last] == i["sep_token_id"]).all()
    assert mask[2].all(), "caption 2 is longer than 32 tokens: truncated to exactly 32"
    assert (ids[mask == 0] == i["pad_token_id"]).all()


def test_similarity_is_the_max_over_the_32_gallery_vectors(fx):
    e = fx["expected"]
    sim = torch.einsum("qd,njd->qnj", e["query_embeds"], e["gallery_feats"]).amax(-1)
    torch.testing.assert_close(sim, e["similarity"], atol=1e-6, rtol=0)
    assert torch.equal(e["ranking"], torch.argsort(1 - e["similarity"], dim=-1))
    assert torch.equal(e["prompt"], e["fusion_hidden"][:, :32])


def test_gallery_and_query_heads_are_the_stated_projections(fx):
    e, s = fx["expected"], fx["state"]
    ln = F.layer_norm(e["ref_vit_out"], (e["ref_vit_out"].shape[-1],), s["ln_vision.weight"], s["ln_vision.bias"],
                      eps=fx["config"]["ln_vision_eps"])
    torch.testing.assert_close(ln, e["ref_ln_vision"], atol=1e-5, rtol=0)
    gallery = F.normalize(F.linear(e["gallery_qformer_out"], s["vision_proj.weight"], s["vision_proj.bias"]), dim=-1)
    torch.testing.assert_close(gallery, e["gallery_feats"], atol=1e-6, rtol=0)
    query = F.normalize(F.linear(e["text_hidden"][:, 32], s["text_proj.weight"], s["text_proj.bias"]), dim=-1)
    torch.testing.assert_close(query, e["query_embeds"], atol=1e-6, rtol=0)


def test_embeddings_follow_sprc_rules(fx):
    """Queries/prompt enter without position embeddings; the no-image (rtc) pass puts the prompt after [CLS]."""
    e, s, ids = fx["expected"], fx["state"], fx["inputs"]["input_ids"]
    pre = "Qformer.bert.embeddings."

    def norm(x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), s[pre + "LayerNorm.weight"], s[pre + "LayerNorm.bias"], eps=1e-12)

    words, pos = s[pre + "word_embeddings.weight"][ids], s[pre + "position_embeddings.weight"]
    torch.testing.assert_close(e["fusion_embeddings"], norm(torch.cat([s["query_tokens"].expand(3, -1, -1),
                                                                      words + pos[:32]], 1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(e["text_embeddings"][:, :32], norm(e["prompt"]), atol=1e-5, rtol=0)
    rtc = torch.cat([words[:, :1], s["prompt_tokens"].expand(3, -1, -1), words[:, 1:]], 1) + pos[:64]
    torch.testing.assert_close(e["rtc_embeddings"], norm(rtc), atol=1e-5, rtol=0)


def test_losses_follow_the_stated_formulas(fx):
    e, s, c = fx["expected"], fx["state"], fx["config"]
    labels = torch.arange(3)
    itc = torch.einsum("qd,njd->qnj", e["train_fusion_feats"], e["train_target_feats"]).amax(-1) / s["temp"]
    rtc = torch.einsum("qd,njd->qnj", e["rtc_feats"], e["train_target_feats"]).amax(-1) / s["temp"]
    align = F.mse_loss(e["train_fusion_hidden"][:, :32].mean(1), s["prompt_tokens"].mean(1).expand(3, -1))
    for name, value in (("loss_itc", F.cross_entropy(itc, labels)), ("loss_rtc", F.cross_entropy(rtc, labels)),
                        ("loss_align", align)):
        torch.testing.assert_close(value, e[name], atol=1e-6, rtol=1e-5, msg=name)
    assert set(c["loss_weights"]) == {"loss_total_cirr", "loss_total_fiq"}
    for total, weights in c["loss_weights"].items():
        mix = sum(weights[k] * e[f"loss_{k}"] for k in ("itc", "rtc", "align"))
        torch.testing.assert_close(mix, e[total], atol=1e-6, rtol=0)


def test_adamw_step_from_the_stored_grads_gives_after_step(fx):
    """The recorded step is torch's AdamW with SPRC's settings applied to exactly the stored gradients."""
    e, s, opt = fx["expected"], fx["state"], fx["config"]["optimizer"]
    assert not any(n.startswith("visual_encoder.") for n in e["trainable"])
    assert set(e["grads"]) | set(e["no_grad"]) == set(e["trainable"])
    params = {n: torch.nn.Parameter(s[n].clone()) for n in e["trainable"]}
    for n, g in e["grads"].items():
        params[n].grad = g.clone()
    torch.optim.AdamW(list(params.values()), lr=opt["lr_step"], betas=tuple(opt["betas"]), eps=opt["eps"],
                      weight_decay=opt["weight_decay"]).step()
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), e["after_step"][n], atol=1e-7, rtol=0, msg=n)


def test_padding_to_the_longest_caption_changes_nothing(fx):
    e = fx["expected"]
    assert e["padding_longest"]["text_length"] == 12
    torch.testing.assert_close(e["padding_longest"]["query_embeds"], e["query_embeds"][:2], atol=1e-6, rtol=0)
    torch.testing.assert_close(e["padding_longest"]["similarity"], e["similarity"][:2], atol=1e-6, rtol=0)
