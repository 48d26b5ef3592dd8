"""Proof of equality with the original code: recompute an oracle fixture folder with our models and compare.

A fixture folder (like `shared/fixtures/original-tiny/`) holds tensors produced by running the original code
(a folder made by running SPRC's code, whose config.json names `sprc_commit`, is checked by `verify_sprc`):
`config.json`, `inputs.pt`, `expected.pt`, the original checkpoints `stage1_ckpt.pt` / `stage2_ckpt.pt`, a BLIP-like
pre-training file `blip_pretrain_like.pt`, the stage-II state the original built from it
(`stage2_from_pretrain_state.pt`) and the PNGs behind `inputs.pt`. Nothing here is specific to one fixture's sizes.

    python -m cirlib.verify_original DIR      # one line per tensor; exit status 1 if any comparison fails
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cirlib.models import loading
from cirlib.models.config import ModelConfig, TextConfig, VisionConfig
from cirlib.models.stage1 import Stage1Model
from cirlib.models.text import MASK_VALUE


@dataclass(frozen=True)
class Tolerance:
    atol: float  # absolute
    rtol: float  # relative to the expected value (torch.allclose convention)

    def __str__(self) -> str:
        if self.atol == 0 and self.rtol == 0:
            return "exact"
        return f"atol {self.atol:g}" + (f" rtol {self.rtol:g}" if self.rtol else "")


# From the fixture README: fp32 re-runs of the original differ by at most ~5e-6 on these quantities.
HIDDEN = Tolerance(2e-5, 1e-4)  # tokens, z_t, hidden states, scores, logits, losses
UNIT = Tolerance(1e-6, 0.0)  # unit-normalised embeddings and their dot products
EXACT = Tolerance(0.0, 0.0)  # rankings, copied weights
PIXELS = Tolerance(1e-6, 0.0)  # preprocessing: same PIL resampling, so equal up to float rounding
TARGET_RATIO = 1.25  # the original's --target-ratio default, with which the fixture PNGs were preprocessed


@dataclass(frozen=True)
class Result:
    name: str  # e.g. "stage1.query_embeds"
    max_abs_diff: float  # max |ours - expected| (inf on a shape mismatch)
    tolerance: Tolerance
    ok: bool
    detail: str = ""  # shape mismatch or other explanation

    def line(self) -> str:
        status = "ok" if self.ok else "FAIL"
        extra = f"  ({self.detail})" if self.detail else ""
        return f"{self.name:<52} max|diff| {self.max_abs_diff:.3e}  tol {str(self.tolerance):<20} {status}{extra}"


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance) -> Result:
    """Compare two tensors elementwise: ok iff |a - e| <= atol + rtol * |e| everywhere (and shapes agree)."""
    actual = actual.detach().cpu()
    expected = expected.detach().cpu()
    if tuple(actual.shape) != tuple(expected.shape):
        return Result(name, math.inf, tol, False, f"shape {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    if actual.numel() == 0:
        return Result(name, 0.0, tol, True)
    if not actual.is_floating_point() and not expected.is_floating_point():
        diff = (actual.long() - expected.long()).abs()
        return Result(name, float(diff.max()), tol, bool(torch.equal(actual.long(), expected.long())))
    a, e = actual.double(), expected.double()
    diff = (a - e).abs()
    if not torch.isfinite(a).all():
        return Result(name, math.inf, tol, False, "non-finite values")
    ok = bool((diff <= tol.atol + tol.rtol * e.abs()).all())
    return Result(name, float(diff.max()), tol, ok)


# ------------------------------------------------------------------------------------------------------- config


def config_from_fixture(cfg: Mapping[str, Any]) -> ModelConfig:
    """Map a fixture's `config.json` (original-code names) to our ModelConfig.

    Args:
        cfg: the parsed config.json (keys vision, text, projection_dim, stage2_merge).
    Raises:
        ValueError: a setting our models cannot express (e.g. a non-GELU activation or an encoder width that is
            not the ViT width).
    """
    try:
        v, t = cfg["vision"], cfg["text"]
        vision = VisionConfig(
            image_size=int(v["img_size"]),
            patch_size=int(v["patch_size"]),
            width=int(v["embed_dim"]),
            depth=int(v["depth"]),
            num_heads=int(v["num_heads"]),
            mlp_ratio=float(v.get("mlp_ratio", 4.0)),
            layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
        )
        text = TextConfig(
            vocab_size=int(t["vocab_size"]),
            hidden_size=int(t["hidden_size"]),
            num_layers=int(t["num_hidden_layers"]),
            num_heads=int(t["num_attention_heads"]),
            intermediate_size=int(t["intermediate_size"]),
            max_position_embeddings=int(t["max_position_embeddings"]),
            layer_norm_eps=float(t.get("layer_norm_eps", 1e-12)),
            hidden_dropout=float(t.get("hidden_dropout_prob", 0.1)),
            attention_dropout=float(t.get("attention_probs_dropout_prob", 0.1)),
            pad_token_id=int(t.get("pad_token_id", 0)),
        )
    except KeyError as err:
        raise ValueError(f"fixture config.json lacks {err}") from err
    if t.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"fixture text hidden_act {t['hidden_act']!r}: only exact 'gelu' is supported")
    if int(t.get("encoder_width", vision.width)) != vision.width:
        raise ValueError(f"fixture text encoder_width {t['encoder_width']} differs from the ViT width {vision.width}")
    if "num_tokens" in v and int(v["num_tokens"]) != vision.num_tokens:
        raise ValueError(f"fixture says {v['num_tokens']} ViT tokens, its sizes give {vision.num_tokens}")
    merge = cfg.get("stage2_merge", {})
    if "threshold_hard_coded" in merge:
        threshold = int(merge["threshold_hard_coded"])
    elif merge.get("mergeMLP_layers"):
        threshold = min(int(i) for i in merge["mergeMLP_layers"])
    else:
        threshold = 6  # the original's literal
    return ModelConfig(
        vision=vision,
        text=text,
        projection_dim=int(cfg.get("projection_dim", 256)),
        stage1_drop_path_rate=float(v.get("stage1_drop_path_rate", 0.0)),
        stage2_drop_path_rate=float(v.get("stage2_drop_path_rate", 0.1)),
        reranker="dual",
        merge_threshold=threshold,
        zt_source="stage2_vit",
    )


# ------------------------------------------------------------------------------------------------------- helpers


@contextmanager
def capture_outputs(modules: Sequence[nn.Module], *, inputs: bool = False) -> Iterator[list[list[torch.Tensor]]]:
    """Record each module's first output (or first input) per call: store[i] lists the calls of modules[i]."""
    store: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = []
    for i, mod in enumerate(modules):
        if inputs:
            handles.append(mod.register_forward_pre_hook(lambda _m, args, i=i: store[i].append(_first(args))))
        else:
            handles.append(mod.register_forward_hook(lambda _m, _a, out, i=i: store[i].append(_first(out))))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _first(x: Any) -> torch.Tensor:
    while isinstance(x, (tuple, list)):
        x = x[0]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"hooked module produced {type(x).__name__}, expected a tensor")
    return x.detach().clone()


def _ones_like_ids(ids: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(ids, dtype=torch.long)


def _row(ids: torch.Tensor) -> torch.Tensor:
    """One unpadded query as a batch of one: (L,) -> (1, L)."""
    return ids.reshape(1, -1).long()


class _Checker:
    """Collects results; `check` compares only when the expected tensor exists in the fixture."""

    def __init__(self, expected: Mapping[str, Any]):
        self.expected = expected
        self.results: list[Result] = []
        self.compared: set[str] = set()

    def has(self, group: str, key: str) -> bool:
        return isinstance(self.expected.get(group), Mapping) and key in self.expected[group]

    def get(self, group: str, key: str) -> Any:
        return self.expected[group][key]

    def check(self, group: str, key: str, actual: Callable[[], torch.Tensor] | torch.Tensor, tol: Tolerance) -> None:
        if not self.has(group, key):
            return
        value = actual() if callable(actual) else actual
        exp = self.get(group, key)
        if isinstance(exp, (list, tuple)):  # per-query lists of tensors (different lengths)
            if not isinstance(value, (list, tuple)) or len(value) != len(exp):
                self.results.append(Result(f"{group}.{key}", math.inf, tol, False, "list length differs"))
            else:
                parts = [compare(f"{group}.{key}[{i}]", a, e, tol) for i, (a, e) in enumerate(zip(value, exp))]
                worst = max(p.max_abs_diff for p in parts) if parts else 0.0
                bad = [p for p in parts if not p.ok]
                self.results.append(Result(f"{group}.{key}", worst, tol, not bad,
                                           "; ".join(f"{p.name}: {p.detail or 'too far'}" for p in bad)))
        else:
            self.results.append(compare(f"{group}.{key}", value, exp, tol))
        self.compared.add(f"{group}.{key}")

    def add(self, result: Result) -> None:
        self.results.append(result)


# ------------------------------------------------------------------------------------------------------- verify


def verify(directory: str | Path) -> list[Result]:
    """Recompute every tensor of a fixture folder's `expected.pt` that our code can produce, and compare.

    Models run in eval mode, fp32, without gradients; inputs come from `inputs.pt`.

    Args:
        directory: the fixture folder.
    Returns:
        One Result per compared tensor (plus image preprocessing and the stage-II key duplication).
    """
    return _verify(directory)[0]


def _verify(directory: str | Path) -> tuple[list[Result], list[str]]:
    """`verify`, plus the names of expected tensors that were not recomputed."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {directory} is not an oracle fixture folder")
    raw_cfg = json.loads(cfg_path.read_text())
    from cirlib.tools.verify_sprc import is_sprc_fixture, verify_sprc  # imports this module's helpers

    if is_sprc_fixture(raw_cfg):
        return verify_sprc(directory, raw_cfg)
    config = config_from_fixture(raw_cfg)
    inputs = loading.read_checkpoint(directory / "inputs.pt")
    expected = loading.read_checkpoint(directory / "expected.pt")
    if not isinstance(inputs, Mapping) or not isinstance(expected, Mapping):
        raise ValueError(f"{directory}: inputs.pt and expected.pt must hold dicts")
    chk = _Checker(expected)

    _check_preprocessing(chk, directory, inputs, raw_cfg, config)
    with torch.no_grad():
        stage1 = Stage1Model(config).float().eval()
        loading.load_original_checkpoint(stage1, directory / "stage1_ckpt.pt")
        _check_stage1(chk, stage1, inputs)
        if (directory / "stage2_ckpt.pt").is_file() or chk.has("stage2", "scores"):
            stage2 = _stage2_model(config)
            loading.load_original_checkpoint(stage2, directory / "stage2_ckpt.pt")
            _check_stage2(chk, stage1, stage2, inputs, config)
        if (directory / "blip_pretrain_like.pt").is_file() or "pretrain_loaded" in expected:
            _check_pretrain(chk, directory, config, inputs)
    skipped = [name for name in _tensor_names(expected) if name not in chk.compared]
    return chk.results, skipped


def _tensor_names(expected: Mapping[str, Any]) -> list[str]:
    """`group.key` of every tensor (or list of tensors) in expected.pt, metadata excluded."""
    names = []
    for group, entries in expected.items():
        if not isinstance(entries, Mapping) or group == "meta":
            continue
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) or (
                    isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value)):
                names.append(f"{group}.{key}")
    return names


def _stage2_model(config: ModelConfig) -> nn.Module:
    from cirlib.models.stage2 import Stage2Model

    return Stage2Model(config).float().eval()


def _check_preprocessing(
    chk: _Checker, directory: Path, inputs: Mapping, raw_cfg: Mapping, config: ModelConfig
) -> None:
    """Our `targetpad_transform` on the fixture PNGs against the original's tensors in inputs.pt."""
    from cirlib.data import load_image, targetpad_transform

    names = inputs.get("image_names")
    if not names:
        return
    n_ref = len(inputs["ref_images"])
    size = int(raw_cfg.get("vision", {}).get("img_size", config.vision.image_size))
    transform = targetpad_transform(TARGET_RATIO, size)
    images = torch.stack([transform(load_image(directory / f"{name}.png")) for name in names])
    chk.add(compare("inputs.ref_images (preprocessing)", images[:n_ref], inputs["ref_images"], PIXELS))
    chk.add(compare("inputs.gallery_images (preprocessing)", images[n_ref:], inputs["gallery_images"], PIXELS))


def _check_stage1(chk: _Checker, model: Stage1Model, inputs: Mapping) -> None:
    """The validate.py path (gallery, batched and single queries, ranking) and the training logits."""
    vit_blocks = list(model.visual_encoder.blocks)
    with capture_outputs(vit_blocks) as blocks_out:
        gallery = model.encode_image(inputs["gallery_images"])
    ref = model.encode_image(inputs["ref_images"])
    text_layers = list(model.text_encoder.encoder.layer)
    with capture_outputs([model.text_encoder.embeddings]) as emb_out, capture_outputs(text_layers) as layers_out:
        query = model.encode_query(ref.tokens, inputs["input_ids"], inputs["attention_mask"])

    chk.check("stage1", "ref_tokens", ref.tokens, HIDDEN)
    chk.check("stage1", "gallery_tokens", gallery.tokens, HIDDEN)
    chk.check("stage1", "gallery_embeds", gallery.embeds, UNIT)
    chk.check("stage1", "query_embeds", query.embeds, UNIT)
    chk.check("stage1", "z_t", query.hidden, HIDDEN)
    chk.check("stage1", "query_embeds_single", lambda: torch.cat([
        model.encode_query(ref.tokens[i:i + 1], _row(ids), _ones_like_ids(_row(ids))).embeds
        for i, ids in enumerate(inputs["per_query_input_ids"])
    ]), UNIT)
    similarity = query.embeds @ gallery.embeds.t()  # (Q, G)
    distances = 1 - similarity
    chk.check("stage1", "similarity", similarity, UNIT)
    chk.check("stage1", "distances", distances, UNIT)
    chk.check("stage1", "ranking", torch.argsort(distances, dim=-1), EXACT)
    chk.check("stage1", "temp", model.temp, EXACT)
    if "train_input_ids" in inputs:
        qi, ti = _train_indices(inputs)
        out = model(ref.tokens[qi], inputs["train_input_ids"], inputs["train_attention_mask"], gallery.embeds[ti])
        chk.check("stage1", "train_logits", out.logits, HIDDEN)
        chk.check("stage1", "train_loss", out.loss, HIDDEN)

    chk.check("debug", "stage1_vit_block_outputs_gallery", lambda: torch.stack([c[0] for c in blocks_out]), HIDDEN)
    chk.check("debug", "stage1_text_embeddings_out", lambda: emb_out[0][0], HIDDEN)
    chk.check("debug", "stage1_text_layer_outputs", lambda: torch.stack([c[0] for c in layers_out]), HIDDEN)


def _train_indices(inputs: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    n = inputs["train_input_ids"].shape[0]
    qi = torch.as_tensor(inputs.get("train_query_index", list(range(n))), dtype=torch.long)
    ti = torch.as_tensor(inputs.get("train_target_gallery_index", list(range(n))), dtype=torch.long)
    return qi, ti


def _per_query_scores(
    stage1: Stage1Model, stage2: nn.Module, zt_ref_tokens: torch.Tensor, gallery_tokens: torch.Tensor,
    per_query_ids: Sequence[torch.Tensor], with_pairs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """validate_stage2: one query at a time (unpadded), z_t from `zt_ref_tokens`, every gallery item scored.

    Returns:
        scores (Q, G) from the shared path, logits2 (Q, G, 2) from the head, z_t per query [(L_i, H)], and (if
        with_pairs) the scores (Q, G) of the per-pair path (scoring='pairs').
    """
    from cirlib.models.stage2 import RerankQuery

    n_gal = gallery_tokens.shape[0]
    scores, logits2, zts, pair_scores = [], [], [], []
    for i, ids in enumerate(per_query_ids):
        ids = _row(ids)
        mask = _ones_like_ids(ids)
        z_t = stage1.encode_query(zt_ref_tokens[i:i + 1], ids, mask).hidden  # (1, L, H)
        query = RerankQuery(input_ids=ids, attention_mask=mask, z_t=z_t, ref_tokens=None)
        with capture_outputs([stage2.cls_head]) as head_out:
            s = stage2.score(query, gallery_tokens)  # (1, G)
        scores.append(s.reshape(n_gal))
        logits2.append(torch.cat([h.reshape(-1, 2) for h in head_out[0]]).reshape(n_gal, 2))
        zts.append(z_t[0])
        if not with_pairs:
            continue
        pair_scores.append(stage2.score(query, gallery_tokens, scoring="pairs")[0])  # (G,)
    return torch.stack(scores), torch.stack(logits2), zts, torch.stack(pair_scores) if with_pairs else None


def _check_stage2(chk: _Checker, stage1: Stage1Model, stage2: nn.Module, inputs: Mapping, config: ModelConfig) -> None:
    """validate_stage2 (batch 1, z_t from the stage-II ViT as the original, or the stage-I ViT) and training logits."""
    from cirlib.models.stage2 import RerankQuery

    ref_tokens = stage2.encode_image(inputs["ref_images"])  # (Q, T, Dv)
    gallery_tokens = stage2.encode_image(inputs["gallery_images"])  # (G, T, Dv)
    chk.check("stage2", "ref_tokens", ref_tokens, HIDDEN)
    chk.check("stage2", "gallery_tokens", gallery_tokens, HIDDEN)

    per_query = inputs["per_query_input_ids"]
    for source, suffix in (("stage2_vit", ""), ("stage1_vit", "_zt_from_stage1_vit")):
        if not (chk.has("stage2", "scores" + suffix) or (not suffix and chk.has("stage2", "z_t_per_query"))):
            continue
        zt_config = dataclasses.replace(config, zt_source=source)
        zt_ref = _zt_reference_tokens(zt_config, stage1, ref_tokens, inputs["ref_images"])
        scores, logits2, zts, pair_scores = _per_query_scores(
            stage1, stage2, zt_ref, gallery_tokens, per_query, with_pairs=not suffix)
        chk.check("stage2", "scores" + suffix, scores, HIDDEN)
        chk.check("stage2", "logits2" + suffix, logits2, HIDDEN)
        if not suffix:
            chk.check("stage2", "z_t_per_query", zts, HIDDEN)
            # The per-pair reference path must give the same scores as the batched candidate path.
            if chk.has("stage2", "scores") and pair_scores is not None:
                chk.add(compare("stage2.scores (per-pair path)", pair_scores, chk.get("stage2", "scores"), HIDDEN))
    chk.check("stage2", "z_t_batched", lambda: stage1.encode_query(
        ref_tokens, inputs["input_ids"], inputs["attention_mask"]).hidden, HIDDEN)

    if "train_input_ids" in inputs and chk.has("stage2", "train_logits"):
        qi, ti = _train_indices(inputs)
        ids, mask = inputs["train_input_ids"], inputs["train_attention_mask"]
        z_t = stage1.encode_query(ref_tokens[qi], ids, mask).hidden  # (B, L, H), padded batch as in training
        query = RerankQuery(input_ids=ids, attention_mask=mask, z_t=z_t, ref_tokens=None)
        with capture_outputs([stage2.cls_head]) as head_out:
            logits = stage2.score(query, gallery_tokens[ti])  # (B, B)
        b = logits.shape[0]
        chk.check("stage2", "train_logits", logits, HIDDEN)
        chk.check("stage2", "train_raw_logits2",
                  lambda: torch.cat([h.reshape(-1, 2) for h in head_out[0]]).reshape(b, b, 2), HIDDEN)
        chk.check("stage2", "train_loss", F.cross_entropy(logits, torch.arange(b)), HIDDEN)

    _check_stage2_debug(chk, stage1, stage2, ref_tokens, gallery_tokens, per_query)


def _zt_reference_tokens(
    config: ModelConfig, stage1: Stage1Model, stage2_ref_tokens: torch.Tensor, ref_images: torch.Tensor
) -> torch.Tensor:
    """Reference tokens z_t is computed from: the stage-II ViT's (the original) or the stage-I ViT's."""
    if config.zt_source == "stage2_vit":
        return stage2_ref_tokens
    if config.zt_source == "stage1_vit":
        return stage1.encode_image(ref_images).tokens
    raise ValueError(f"unknown zt_source {config.zt_source!r}; expected 'stage2_vit' or 'stage1_vit'")


def _check_stage2_debug(
    chk: _Checker, stage1: Stage1Model, stage2: nn.Module, ref_tokens: torch.Tensor, gallery_tokens: torch.Tensor,
    per_query: Sequence[torch.Tensor],
) -> None:
    """Query 0 against every gallery item on the per-pair path, with hooks on the stream inputs and the head input."""
    from cirlib.models.stage2 import RerankQuery

    debug = chk.expected.get("debug")
    if not isinstance(debug, Mapping) or not any(k.startswith("stage2_q0_") for k in debug):
        return
    n_gal = gallery_tokens.shape[0]
    ids = _row(per_query[0])
    mask = _ones_like_ids(ids)
    z_t = stage1.encode_query(ref_tokens[:1], ids, mask).hidden  # (1, L, H)
    chk.check("debug", "stage2_q0_stream0_input_z_t", z_t, HIDDEN)
    query = RerankQuery(input_ids=ids, attention_mask=mask, z_t=z_t, ref_tokens=None)
    embeddings = getattr(stage2.text_encoder, "embeddings", None)
    hooked = [stage2.cls_head] + ([embeddings] if isinstance(embeddings, nn.Module) else [])
    with capture_outputs(hooked, inputs=False) as outs, capture_outputs([stage2.cls_head], inputs=True) as head_in:
        stage2.score(query, gallery_tokens, scoring="pairs")
    chk.check("debug", "stage2_q0_cls_head_input", lambda: head_in[0][0], HIDDEN)
    if len(hooked) > 1:
        chk.check("debug", "stage2_q0_text_embeddings_out_stream1_input",
                  lambda: outs[1][0].expand(n_gal, -1, -1), HIDDEN)
    if chk.has("debug", "stage2_q0_layer_outputs_stream0") or chk.has("debug", "stage2_q0_layer_outputs_stream1"):
        # Layer outputs are (h0, h1) pairs returned by DualLayer.forward_pairs, not module outputs: step the
        # per-pair reference loop of DualStreamEncoder layer by layer.
        many = query.select([0] * n_gal)  # query 0 once per gallery item, as the per-pair path runs it
        h0 = many.z_t
        h1 = stage2.text_encoder.embeddings(many.input_ids)
        mask_add = (1.0 - many.attention_mask.to(h1.dtype)) * MASK_VALUE  # (P, L)
        per_layer: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in stage2.text_encoder.encoder.layer:
            h0, h1 = layer.forward_pairs(h0, h1, mask_add, gallery_tokens)
            per_layer.append((h0, h1))
        chk.check("debug", "stage2_q0_layer_outputs_stream0", lambda: torch.stack([h[0] for h in per_layer]), HIDDEN)
        chk.check("debug", "stage2_q0_layer_outputs_stream1", lambda: torch.stack([h[1] for h in per_layer]), HIDDEN)


def _check_pretrain(chk: _Checker, directory: Path, config: ModelConfig, inputs: Mapping) -> None:
    """Both stages built from the BLIP-like pre-training file; the stage-II key duplication checked bit for bit."""
    stage1 = Stage1Model(config).float().eval()
    loading.load_blip_pretrained(stage1, directory / "blip_pretrain_like.pt")
    chk.check("pretrain_loaded", "interpolated_pos_embed", stage1.visual_encoder.pos_embed, HIDDEN)
    if chk.has("pretrain_loaded", "pretrain_pos_embed"):
        source = loading.read_checkpoint(directory / "blip_pretrain_like.pt")["model"]["visual_encoder.pos_embed"]
        chk.check("pretrain_loaded", "pretrain_pos_embed", source, EXACT)
    gallery = stage1.encode_image(inputs["gallery_images"])
    ref = stage1.encode_image(inputs["ref_images"])
    query = stage1.encode_query(ref.tokens, inputs["input_ids"], inputs["attention_mask"])
    chk.check("pretrain_loaded", "stage1_gallery_embeds", gallery.embeds, UNIT)
    chk.check("pretrain_loaded", "stage1_query_embeds", query.embeds, UNIT)
    chk.check("pretrain_loaded", "stage1_z_t", query.hidden, HIDDEN)
    chk.check("pretrain_loaded", "stage1_similarity", query.embeds @ gallery.embeds.t(), UNIT)

    state_path = directory / "stage2_from_pretrain_state.pt"
    if not state_path.is_file():
        return
    stage2 = _stage2_model(config)
    report = loading.load_blip_pretrained(stage2, directory / "blip_pretrain_like.pt")
    chk.add(compare("pretrain_loaded.stage2 pos_embed (both stages)", stage2.visual_encoder.pos_embed,
                    stage1.visual_encoder.pos_embed, EXACT))
    original = loading.read_checkpoint(state_path)
    new_keys = set(report.initialised)
    if chk.has("pretrain_loaded", "stage2_new_keys_reinitialised"):
        theirs = set(chk.get("pretrain_loaded", "stage2_new_keys_reinitialised"))
        chk.add(Result("pretrain_loaded.stage2 fresh keys (set)", 0.0 if theirs == new_keys else math.inf, EXACT,
                       theirs == new_keys, "" if theirs == new_keys else
                       f"ours only {sorted(new_keys - theirs)[:5]}, original only {sorted(theirs - new_keys)[:5]}"))
    ours = stage2.state_dict()
    _check_duplication(chk, ours, original, new_keys)
    # The fresh weights were drawn at random in the original run; take them from its state to compare outputs.
    missing_new = [k for k in new_keys if k not in original]
    if missing_new:
        chk.add(Result("pretrain_loaded.stage2 fresh keys in state file", math.inf, EXACT, False,
                       f"{len(missing_new)} not in {state_path.name}: {missing_new[:5]}"))
        return
    stage2.load_state_dict({k: original[k] for k in new_keys}, strict=False)
    if chk.has("pretrain_loaded", "stage2_scores"):
        ref2 = stage2.encode_image(inputs["ref_images"])
        gal2 = stage2.encode_image(inputs["gallery_images"])
        scores, logits2, _, _ = _per_query_scores(stage1, stage2, ref2, gal2, inputs["per_query_input_ids"])
        chk.check("pretrain_loaded", "stage2_scores", scores, HIDDEN)
        chk.check("pretrain_loaded", "stage2_logits2", logits2, HIDDEN)


def _check_duplication(chk: _Checker, ours: Mapping[str, torch.Tensor], original: Mapping[str, torch.Tensor],
                       new_keys: set[str]) -> None:
    """Every key of the original's stage-II state (except the fresh ones) must equal ours bit for bit."""
    compared = [k for k in original if k not in new_keys and not k.endswith("embeddings.position_ids")]
    absent = [k for k in compared if k not in ours]
    extra = [k for k in ours if k not in original and k not in new_keys]
    differing = [k for k in compared if k in ours and not (
        ours[k].shape == original[k].shape and torch.equal(ours[k].cpu(), original[k].cpu()))]
    worst = 0.0
    for k in compared:
        if k in ours and ours[k].shape == original[k].shape and ours[k].is_floating_point():
            worst = max(worst, float((ours[k].double() - original[k].double()).abs().max()) if ours[k].numel() else 0.0)
    problems = []
    if absent:
        problems.append(f"{len(absent)} key(s) missing in ours, e.g. {absent[:3]}")
    if extra:
        problems.append(f"{len(extra)} extra key(s) in ours, e.g. {extra[:3]}")
    if differing:
        problems.append(f"{len(differing)} key(s) differ, e.g. {differing[:3]}")
    chk.add(Result(f"pretrain_loaded.stage2 key duplication ({len(compared)} keys)", math.inf if absent else worst,
                   EXACT, not problems, "; ".join(problems)))


# ------------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print one line per comparison; exit status 0 iff all pass."""
    parser = argparse.ArgumentParser(prog="python -m cirlib.verify_original", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="oracle fixture folder (config.json, inputs.pt, expected.pt, ...)")
    args = parser.parse_args(argv)
    try:
        results, skipped = _verify(args.directory)
    except (FileNotFoundError, loading.CheckpointError) as err:  # not a fixture folder, or a damaged file in it: one line
        print(f"verify_original: {err}", file=sys.stderr)
        return 2
    for r in results:
        print(r.line())
    if skipped:
        print(f"not recomputed ({len(skipped)}): {', '.join(skipped)}")
    failed = [r for r in results if not r.ok]
    summary = f"{len(results) - len(failed)}/{len(results)} comparisons ok"
    print(summary + (f"; FAILED: {', '.join(r.name for r in failed)}" if failed else ""))
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
