"""Proof of equality with SPRC's code: recompute a fixture folder made by running SPRC (tests/fixtures/sprc-tiny).

The folder (format: its README) holds `config.json` (SPRC's sizes, `sprc_commit`), `vocab.txt`, `inputs.pt`,
`expected.pt` (flat: tensor name -> tensor, plus the dicts `grads`, `after_step`, `pretrain_loaded`), SPRC's
checkpoint `sprc_ckpt.pt` and a LAVIS BLIP-2 pre-training-like file `lavis_pretrain_like.pt`. `verify_original`
sends a folder here when its config.json names `sprc_commit`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from cirlib.data.tokenizer import build_tokenizer
from cirlib.models import loading
from cirlib.models.config import ModelConfig, QFormerConfig, TextConfig, VisionConfig
from cirlib.models.sprc import SPRCLossWeights, SPRCRetriever, pre_caption
from cirlib.models.sprc_keys import SPRC_UNUSED, lavis_key
from cirlib.models.first_stage import Stage1Output
from cirlib.tools.verify_original import Result, Tolerance, capture_outputs, compare

# fp32 on both sides, same operations in the same order except where transformers groups them differently (q*scale
# before vs after q.k); measured differences are ~1e-7 (see the fixture README / the report of issue 23).
SPRC_HIDDEN = Tolerance(1e-5, 0.0)  # ViT/Q-Former hidden states, losses, gradients
SPRC_UNIT = Tolerance(1e-6, 0.0)  # unit-norm embeddings and their dot products
SPRC_STEP = Tolerance(1e-7, 0.0)  # parameters after one AdamW step (a change of at most lr per value)
GRAD_FLOOR = 1e-4  # |grad| below which an AdamW step's sign is float noise (50x the measured gradient differences)
EXACT = Tolerance(0.0, 0.0)
PIXELS = Tolerance(1e-6, 0.0)


def is_sprc_fixture(raw_cfg: Mapping[str, Any]) -> bool:
    """Whether a fixture's config.json describes SPRC's model (it records SPRC's commit)."""
    return "sprc_commit" in raw_cfg


def sprc_config(cfg: Mapping[str, Any]) -> ModelConfig:
    """Our ModelConfig from an SPRC fixture's config.json (SPRC's names)."""
    try:
        v, q = cfg["vision"], cfg["qformer"]
        vision = VisionConfig(image_size=int(v["img_size"]), patch_size=int(v["patch_size"]),
                              width=int(v["embed_dim"]), depth=int(v["depth"]), num_heads=int(v["num_heads"]),
                              mlp_ratio=float(v["mlp_ratio"]), layer_norm_eps=float(v["layer_norm_eps"]))
        text = TextConfig(vocab_size=int(q["vocab_size"]), hidden_size=int(q["hidden_size"]),
                          num_layers=int(q["num_hidden_layers"]), num_heads=int(q["num_attention_heads"]),
                          intermediate_size=int(q["intermediate_size"]),
                          max_position_embeddings=int(q["max_position_embeddings"]),
                          layer_norm_eps=float(q["layer_norm_eps"]))
        qformer = QFormerConfig(num_query_tokens=int(cfg["qformer"].get("num_query_token", q["query_length"])),
                                cross_attention_frequency=int(q["cross_attention_freq"]),
                                ln_vision_eps=float(cfg["ln_vision_eps"]), max_text_length=int(cfg["max_txt_len"]))
    except KeyError as err:
        raise ValueError(f"SPRC fixture config.json lacks {err}") from err
    if int(v.get("mlp_hidden", int(vision.width * vision.mlp_ratio))) != int(vision.width * vision.mlp_ratio):
        raise ValueError(f"fixture ViT MLP hidden {v['mlp_hidden']} is not int(width * mlp_ratio)")
    return ModelConfig(vision=vision, text=text, projection_dim=int(cfg["embed_dim"]), first_stage="sprc",
                       reranker="joint", qformer=qformer)


class _Flat:
    """Compares our tensors with expected.pt's top-level entries; remembers which were compared."""

    def __init__(self, expected: Mapping[str, Any]):
        self.expected = expected
        self.results: list[Result] = []
        self.compared: set[str] = set()

    def check(self, key: str, actual: Callable[[], torch.Tensor] | torch.Tensor, tol: Tolerance) -> None:
        if key not in self.expected or key in self.compared:  # absent, or compared already
            return
        self.results.append(compare(key, actual() if callable(actual) else actual, self.expected[key], tol))
        self.compared.add(key)

    def check_dict(self, key: str, actual: Mapping[str, torch.Tensor], tol: Tolerance) -> None:
        """Every tensor of the dict expected[key] (SPRC names) against `actual` (SPRC names); the worst as one line."""
        if key not in self.expected:
            return
        want = self.expected[key]
        missing = sorted(set(want) - set(actual))
        parts = [compare(f"{key}[{n}]", actual[n], want[n], tol) for n in want if n in actual]
        worst = max((p.max_abs_diff for p in parts), default=0.0)
        bad = [p.name for p in parts if not p.ok]
        detail = (f"missing {missing[:5]}" if missing else "") + (f" too far: {bad[:5]}" if bad else "")
        self.results.append(Result(f"{key} ({len(parts)} tensors)", math.inf if missing else worst, tol,
                                   not missing and not bad, detail.strip()))
        self.compared.add(key)

    def same(self, name: str, ok: bool, detail: str = "") -> None:
        self.results.append(Result(name, 0.0 if ok else math.inf, EXACT, ok, detail))


def verify_sprc(directory: Path, raw_cfg: Mapping[str, Any]) -> tuple[list[Result], list[str]]:
    """Every tensor of an SPRC fixture recomputed with `SPRCRetriever`; (results, names not recomputed)."""
    inputs = loading.read_checkpoint(directory / "inputs.pt")
    expected = loading.read_checkpoint(directory / "expected.pt")
    if not isinstance(inputs, Mapping) or not isinstance(expected, Mapping):
        raise ValueError(f"{directory}: inputs.pt and expected.pt must hold dicts")
    config = sprc_config(raw_cfg)
    chk = _Flat(expected)
    model = SPRCRetriever(config).eval()
    _check_text_rules(chk, directory, inputs, model)
    _check_preprocessing(chk, directory, inputs, raw_cfg, config)
    loading.load_original_checkpoint(model, directory / "sprc_ckpt.pt")
    with torch.no_grad():
        _check_vision(chk, model, inputs)
        _check_query(chk, model, inputs)
        _check_padding_longest(chk, model, build_tokenizer(directory / "vocab.txt"), inputs,
                               model.encode_image(inputs["gallery_images"]).embeds)
    _check_losses_and_step(chk, model, inputs, raw_cfg)
    if (directory / "lavis_pretrain_like.pt").is_file():
        _check_pretrain(chk, directory, config, inputs, expected)
    skipped = [k for k, v in expected.items() if k != "meta" and k not in chk.compared
               and isinstance(v, (torch.Tensor, Mapping))]
    return chk.results, skipped


def _check_text_rules(chk: _Flat, directory: Path, inputs: Mapping, model: SPRCRetriever) -> None:
    """pre_caption and tokenize_queries (on a CIRTokenizer of the fixture's vocab.txt) against SPRC's processor and
    tokenizer; ours pads to the longest text, SPRC to 32: compared after padding ours to SPRC's length."""
    tok = build_tokenizer(directory / "vocab.txt")
    for prefix in ("", "probe_"):
        raw, want = inputs.get(f"{prefix}captions_raw"), inputs.get(f"{prefix}captions")
        if raw is None:
            continue
        got = [pre_caption(t) for t in raw]
        bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
        chk.same(f"inputs.{prefix}captions (pre_caption)", not bad and len(got) == len(want),
                 f"differ at {bad}" if bad else "")
        ids, mask = model.tokenize_queries(tok, list(raw))
        want_ids, want_mask = inputs[f"{prefix}input_ids"], inputs[f"{prefix}attention_mask"]
        pad = want_ids.shape[1] - ids.shape[1]
        ids = torch.nn.functional.pad(ids, (0, pad), value=tok.pad_token_id)
        mask = torch.nn.functional.pad(mask, (0, pad), value=0)
        chk.results.append(compare(f"inputs.{prefix}input_ids (tokenize_queries)", ids, want_ids, EXACT))
        chk.results.append(compare(f"inputs.{prefix}attention_mask (tokenize_queries)", mask, want_mask, EXACT))


def _check_preprocessing(chk: _Flat, directory: Path, inputs: Mapping, raw_cfg: Mapping, config: ModelConfig) -> None:
    """Our targetpad_transform on the PNGs against SPRC's pixels (when the fixture made them with SPRC's transform)."""
    from cirlib.data import load_image, targetpad_transform

    if "targetpad" not in str(raw_cfg.get("image_preprocess", "")):
        return
    transform = targetpad_transform(1.25, config.vision.image_size)
    for kind, key in (("ref", "ref_images"), ("gal", "gallery_images")):
        images = torch.stack([transform(load_image(directory / f"{kind}_{i}.png")) for i in range(len(inputs[key]))])
        chk.results.append(compare(f"inputs.{key} (preprocessing)", images, inputs[key], PIXELS))


def _check_vision(chk: _Flat, model: SPRCRetriever, inputs: Mapping) -> None:
    blocks = list(model.visual_encoder.encoder.layers)
    for side, key in (("ref", "ref_images"), ("gallery", "gallery_images")):
        with capture_outputs(blocks) as seen:
            feats = model.encode_image(inputs[key])
        chk.check(f"{side}_vit_blocks", lambda: torch.stack([calls[0] for calls in seen]), SPRC_HIDDEN)
        chk.check(f"{side}_vit_out", feats.tokens, SPRC_HIDDEN)
        chk.check(f"{side}_ln_vision", model.ln_vision(feats.tokens), SPRC_HIDDEN)
        if side == "gallery":
            layers = list(model.qformer.encoder.layer)
            with capture_outputs([model.qformer.dropout]) as emb, capture_outputs(layers) as seen_q:
                hidden = model.image_queries(feats.tokens)
            chk.check("gallery_embeddings", emb[0][0], SPRC_HIDDEN)
            chk.check("gallery_qformer_layers", lambda: torch.stack([c[0] for c in seen_q]), SPRC_HIDDEN)
            chk.check("gallery_qformer_out", hidden, SPRC_HIDDEN)
            chk.check("gallery_feats", feats.embeds, SPRC_UNIT)


def _check_padding_longest(chk: _Flat, model: SPRCRetriever, tok: Any, inputs: Mapping,
                           gallery: torch.Tensor) -> None:
    """SPRC's `inference` with padding="longest" on the first queries against ours (tokenize_queries pads so)."""
    want = chk.expected.get("padding_longest")
    if not isinstance(want, Mapping):
        return
    n = want["query_embeds"].shape[0]
    ids, mask = model.tokenize_queries(tok, list(inputs["captions_raw"][:n]))
    chk.same("padding_longest.text_length", ids.shape[1] == int(want["text_length"]),
             f"ours {ids.shape[1]}, SPRC {want['text_length']}")
    ref_tokens = model.encode_image(inputs["ref_images"][:n]).tokens
    query = model.encode_query(ref_tokens, ids, mask).embeds
    chk.results.append(compare("padding_longest.query_embeds", query, want["query_embeds"], SPRC_UNIT))
    chk.results.append(compare("padding_longest.similarity", model.similarity(query, gallery), want["similarity"],
                               SPRC_UNIT))
    chk.compared.add("padding_longest")


def _check_query(chk: _Flat, model: SPRCRetriever, inputs: Mapping) -> None:
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    ref, gallery = model.encode_image(inputs["ref_images"]), model.encode_image(inputs["gallery_images"])
    layers = list(model.qformer.encoder.layer)
    with capture_outputs([model.qformer.dropout]) as emb, capture_outputs(layers) as seen:
        fused = model.fuse(ref.tokens, ids, mask)
    for i, name in enumerate(("fusion", "text")):  # pass 1, pass 2
        chk.check(f"{name}_embeddings", emb[0][i], SPRC_HIDDEN)
        chk.check(f"{name}_layers", lambda i=i: torch.stack([c[i] for c in seen]), SPRC_HIDDEN)
    chk.check("fusion_hidden", seen[-1][0], SPRC_HIDDEN)
    with capture_outputs([model.qformer.dropout]) as emb, capture_outputs(layers) as seen:
        rtc_hidden = model.relative_hidden(ids, mask)
    chk.check("rtc_embeddings", emb[0][0], SPRC_HIDDEN)
    chk.check("rtc_layers", lambda: torch.stack([c[0] for c in seen]), SPRC_HIDDEN)
    chk.check("rtc_hidden", rtc_hidden, SPRC_HIDDEN)
    chk.check("rtc_feats", model.text_only(ids, mask), SPRC_UNIT)
    chk.check("prompt", fused.prompt, SPRC_HIDDEN)
    chk.check("text_hidden", fused.hidden, SPRC_HIDDEN)
    chk.check("query_embeds", fused.embeds, SPRC_UNIT)
    sim = model.similarity(fused.embeds, gallery.embeds)
    chk.check("similarity", sim, SPRC_UNIT)
    chk.check("distances", 1 - sim, SPRC_UNIT)
    chk.check("ranking", torch.argsort(1 - sim, dim=-1), EXACT)


def _losses(chk: _Flat, model: SPRCRetriever, inputs: Mapping, weights: SPRCLossWeights) -> Stage1Output:
    """SPRC's forward on the loss batch (each query's target from the gallery), checking its intermediates."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    target = inputs["gallery_images"][inputs["train_target_index"]]
    with torch.no_grad():
        ref_tokens = model.encode_image(inputs["ref_images"]).tokens
        target_tokens = model.encode_image(target).tokens
    model.loss_weights = weights
    target_embeds = model.embed_tokens(target_tokens)
    with capture_outputs(list(model.qformer.encoder.layer)) as seen:  # calls: pass 1, pass 2, the relative pass
        out = model(ref_tokens, ids, mask, target_embeds)
    chk.check("train_target_feats", target_embeds.detach(), SPRC_UNIT)
    chk.check("train_fusion_feats", out.query.detach(), SPRC_UNIT)
    chk.check("train_fusion_hidden", seen[-1][0], SPRC_HIDDEN)
    return out


def _loss_weights(raw_cfg: Mapping, total: str) -> SPRCLossWeights:
    """The weighting behind the expected tensor `total` (config.json's "loss_weights", keyed by tensor name)."""
    try:
        w = raw_cfg["loss_weights"][total]
        if float(w["itc"]) != 1.0:
            raise ValueError(f"itc weighs {w['itc']}, SPRC's weigh it 1")
        return SPRCLossWeights(rtc=float(w["rtc"]), align=float(w["align"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"config.json: loss_weights[{total!r}] should be {{'itc': 1, 'rtc': w, 'align': w}}: "
                         f"{err!r}") from err


def _check_losses_and_step(chk: _Flat, model: SPRCRetriever, inputs: Mapping, raw_cfg: Mapping) -> None:
    """The three losses, both weightings, the gradients of the CIRR total and one AdamW step (eval mode)."""
    cirr, fiq = (_loss_weights(raw_cfg, total) for total in ("loss_total_cirr", "loss_total_fiq"))
    with torch.no_grad():
        chk.check("loss_total_fiq", _losses(chk, model, inputs, fiq).loss, SPRC_HIDDEN)
    for p in model.visual_encoder.parameters():
        p.requires_grad_(False)
    out = _losses(chk, model, inputs, cirr)
    for name in ("itc", "rtc", "align"):
        chk.check(f"loss_{name}", out.parts[name].detach(), SPRC_HIDDEN)
    chk.check("loss_total_cirr", out.loss.detach(), SPRC_HIDDEN)
    out.loss.backward()
    trainable = {lavis_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    if "trainable" in chk.expected:
        theirs = {n for n in chk.expected["trainable"] if not SPRC_UNUSED.match(n)}
        chk.same("trainable (SPRC's, less its unused heads)", theirs == set(trainable),
                 f"only SPRC: {sorted(theirs - set(trainable))[:5]}, only ours: {sorted(set(trainable) - theirs)[:5]}")
        chk.compared.add("trainable")
    chk.check_dict("grads", {n: p.grad for n, p in trainable.items() if p.grad is not None}, SPRC_HIDDEN)
    opt = raw_cfg.get("optimizer", {})
    if "after_step" in chk.expected and "lr_step" in opt:
        start = {k: v.clone() for k, v in model.state_dict().items()}
        _adamw(list(trainable.values()), opt).step()
        _check_step(chk, {n: p.detach() for n, p in trainable.items()})
        _check_step_from_stored_grads(chk, model.config, start, opt)


def _adamw(params: list[torch.nn.Parameter], opt: Mapping[str, Any]) -> torch.optim.AdamW:
    """SPRC's optimizer as the fixture's config.json records it (one group, weight decay on every parameter)."""
    return torch.optim.AdamW(params, lr=float(opt["lr_step"]), betas=tuple(opt["betas"]), eps=float(opt["eps"]),
                             weight_decay=float(opt["weight_decay"]))


def _check_step_from_stored_grads(chk: _Flat, config: ModelConfig, start: Mapping[str, torch.Tensor],
                                  opt: Mapping[str, Any]) -> None:
    """The same AdamW step on SPRC's stored gradients, from the checkpoint's weights (`start`): every value."""
    fresh = SPRCRetriever(config)
    fresh.load_state_dict(start)
    params = {lavis_key(n): p for n, p in fresh.named_parameters() if not n.startswith("visual_encoder.")}
    params = {n: p for n, p in params.items() if n in chk.expected["grads"]}  # SPRC's frozen ViT has none
    for name, p in params.items():
        p.grad = chk.expected["grads"][name].clone()
    _adamw(list(params.values()), opt).step()
    want = chk.expected["after_step"]
    parts = [compare(n, p.detach(), want[n], SPRC_STEP) for n, p in params.items()]
    bad = [r.name for r in parts if not r.ok]
    chk.results.append(Result(f"after_step from SPRC's grads ({len(parts)} tensors)",
                              max((r.max_abs_diff for r in parts), default=math.inf), SPRC_STEP, bool(parts) and not bad,
                              f"too far: {bad[:5]}" if bad else "every value"))


def _check_step(chk: _Flat, ours: Mapping[str, torch.Tensor]) -> None:
    """Parameters after one AdamW step, where the step is determined by the gradient: Adam's first step moves each
    value by about lr * sign(grad), so where |grad| is at the level of float noise (e.g. attention key biases, whose
    true gradient is zero) either sign is right. Compared: the values whose SPRC gradient is >= GRAD_FLOOR, and the
    values without a gradient (unchanged); SPRC's unused heads have no counterpart."""
    want, grads = chk.expected["after_step"], chk.expected.get("grads", {})
    names = [n for n in want if not SPRC_UNUSED.match(n)]
    missing = [n for n in names if n not in ours]
    worst, bad, used, total = 0.0, [], 0, 0
    for n in (n for n in names if n in ours):
        keep = grads[n].abs() >= GRAD_FLOOR if n in grads else torch.ones_like(want[n], dtype=torch.bool)
        r = compare(n, ours[n][keep], want[n][keep], SPRC_STEP)
        worst, used, total = max(worst, r.max_abs_diff), used + int(keep.sum()), total + keep.numel()
        bad += [] if r.ok else [n]
    detail = f"{used}/{total} values with |grad| >= {GRAD_FLOOR:g}" + (f"; missing {missing[:5]}" if missing else "")
    chk.results.append(Result(f"after_step ({len(names)} tensors)", math.inf if missing else worst, SPRC_STEP,
                              not missing and not bad, detail + (f"; too far: {bad[:5]}" if bad else "")))
    chk.compared.add("after_step")


def _check_pretrain(chk: _Flat, directory: Path, config: ModelConfig, inputs: Mapping, expected: Mapping) -> None:
    """LAVIS's pre-training layout through `load_blip_pretrained`: the keys SPRC reports missing are the ones we
    initialise, and the loaded model's gallery, query and similarity equal SPRC's."""
    want = expected.get("pretrain_loaded")
    if not isinstance(want, Mapping):
        return
    model = SPRCRetriever(config).eval()
    report = loading.load_blip_pretrained(model, directory / "lavis_pretrain_like.pt")
    fresh = {k for k in report.initialised if "[" not in k}
    chk.same("pretrain_loaded.missing_keys", fresh == set(want.get("missing_keys", [])),
             f"ours {sorted(fresh)}, SPRC {sorted(want.get('missing_keys', []))}")
    unexpected = [k for k in want.get("unexpected_keys", [])]
    chk.same("pretrain_loaded.unexpected_keys", not unexpected, f"SPRC reports {unexpected[:5]}")
    with torch.no_grad():
        gallery = model.encode_image(inputs["gallery_images"]).embeds
        query = model.encode_query(model.encode_image(inputs["ref_images"]).tokens, inputs["input_ids"],
                                   inputs["attention_mask"]).embeds
    for key, value in (("gallery_feats", gallery), ("query_embeds", query),
                       ("similarity", model.similarity(query, gallery))):
        if key in want:
            chk.results.append(compare(f"pretrain_loaded.{key}", value, want[key], SPRC_UNIT))
    chk.compared.add("pretrain_loaded")

