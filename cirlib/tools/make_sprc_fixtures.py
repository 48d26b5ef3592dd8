"""Write the SPRC oracle fixtures (`tests/fixtures/sprc-tiny/`) by running SPRC's OWN code at a tiny configuration.

This is a recipe, not part of the library: nothing in cirlib or tests imports it, and it only runs in a SIDE virtual
environment that holds SPRC's dependencies (it imports SPRC's bundled LAVIS, which our venv does not have). Importing
this module is harmless anywhere: every side-env import happens inside `main()`.

The side environment (outside the repository), as it was made for the committed fixtures:

    mkdir -p /work/side/sprc-src
    # SPRC source: github chunmeifeng/SPRC at 2935a5397732260d1db6fa577e5926f963e36f0f (its bundled src/lavis is used)
    git --git-dir=<bare clone of chunmeifeng/SPRC> archive 2935a53 | tar -x -C /work/side/sprc-src
    python3.11 -m venv /work/side/sprc-venv
    /work/side/sprc-venv/bin/pip install torch==2.14.1
    /work/side/sprc-venv/bin/pip install transformers==4.36.2 timm==0.9.12 fairscale==0.4.13 omegaconf==2.3.0 \
        iopath==0.1.10 einops==0.7.0 pandas tqdm          # timm brings torchvision
    # then, from the repository root:
    /work/side/sprc-venv/bin/python cirlib/tools/make_sprc_fixtures.py --sprc-src /work/side/sprc-src \
        --out tests/fixtures/sprc-tiny

What it does (tests/fixtures/sprc-tiny/README.md has the details and the tensor list):
- imports SPRC's `lavis.models.blip2_models.blip2_qformer_cir_align_prompt`, `lavis.processors.blip_processors` and
  `src/data_utils.py` WITHOUT running the `lavis`, `lavis.models`, `lavis.processors` package `__init__`s (they import
  every LAVIS model and dataset: decord, webdataset, spacy, cv2, ...); `cv2` is stubbed for `randaugment` (train-time
  image augmentation, unused);
- monkeypatches `create_eva_vit_g` to a small EVA `VisionTransformer` (LAVIS's own class, fp32) and
  `Blip2Base.init_Qformer` / `init_tokenizer` to a small local `BertConfig` / a local `vocab.txt` (no hub access);
- re-randomises every parameter, saves the model in SPRC's `save_model` format, reloads it the way SPRC's
  validation does (`load_state_dict(ckpt[class name], strict=False)`) and records every intermediate of SPRC's
  gallery, query, loss and one AdamW step with forward hooks (the computation itself is SPRC's, unchanged).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.machinery
import platform
import random
import sys
import types
from functools import partial
from pathlib import Path
from typing import Any

SEED = 3
THREADS = 1
SPRC_COMMIT = "2935a5397732260d1db6fa577e5926f963e36f0f"
CLASS_NAME = "Blip2QformerCirAlignPrompt"  # SPRC saves {'epoch': e, model.__class__.__name__: state_dict}
VISION = {"img_size": 56, "patch_size": 14, "embed_dim": 48, "depth": 2, "num_heads": 4, "mlp_ratio": 4.3637,
          "qkv_bias": True, "layer_norm_eps": 1e-6}
QFORMER = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64,
           "max_position_embeddings": 64, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
           "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02, "type_vocab_size": 2, "pad_token_id": 0}
MODEL_ARGS = {"vit_model": "eva_clip_g", "img_size": 56, "drop_path_rate": 0, "use_grad_checkpoint": False,
              "vit_precision": "fp32", "freeze_vit": True, "num_query_token": 32, "cross_attention_freq": 2,
              "embed_dim": 256, "max_txt_len": 32}
TARGET_RATIO = 1.25  # SPRC's --target-ratio default
# SPRC's weightings, keyed by the expected tensor holding each total: CIRR itc + 0.4 rtc + 0.4 align; FashionIQ summed
LOSS_WEIGHTS = {"loss_total_cirr": {"itc": 1.0, "rtc": 0.4, "align": 0.4},
                "loss_total_fiq": {"itc": 1.0, "rtc": 1.0, "align": 1.0}}
OPTIMIZER = {"betas": (0.9, 0.98), "eps": 1e-7, "weight_decay": 0.05}  # blip_fine_tune_2.py
LR_STEP = 1e-3  # the recorded step's lr: large enough that the update is visible in fp32 (SPRC's first step is tiny)
CIRR_MAX_LR = 2e-5
TRAIN_TARGET_INDEX = [2, 0, 4]
CAPTIONS = [
    "Make the circle Blue, and add a red square.",
    "Is it bigger? Remove the (green) triangle!",
    "Change the cross to a purple diamond at the top left corner, then add a big yellow circle in the center "
    "and also insert a small green square at the bottom right corner; remove the rest.",
]
PROBE_CAPTIONS = [
    "  Move   the\tsquare\n to the LEFT.  ",
    "...!!! ???",
    "",
    "it's a red-ish circle?",
    "UPPER case: Words; with ~ odd * chars # and \"quotes\"",
    " ".join(["swap the red circle with a blue square,"] * 9),  # > 50 words (pre_caption) and > 32 tokens
]
IMAGE_SIZES = {"ref": [(80, 56), (56, 56), (60, 96)], "gal": [(56, 56), (100, 60), (64, 72), (56, 120), (90, 90),
                                                              (70, 56)]}


def save(obj: Any, path: Path) -> Path:
    """torch.save to memory (archive name "archive", whatever the file is called), then cirlib.paths'
    atomic write (the repository root is on sys.path once main() ran)."""
    import io

    import torch
    from cirlib import paths

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return paths.atomic_write_bytes(path, buffer.getvalue())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sprc-src", type=Path, required=True, help="SPRC source tree (holds src/lavis)")
    parser.add_argument("--out", type=Path, required=True, help="fixture folder to write")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads (the fixtures: 1)")
    return parser.parse_args(argv)


def import_sprc(src: Path) -> types.SimpleNamespace:
    """SPRC's model, processor and data_utils modules, imported without the LAVIS package __init__s."""
    import torch  # noqa: F401  (torch and transformers first: transformers probes cv2 when it is imported)
    import transformers.utils.import_utils  # noqa: F401

    lavis = src / "src" / "lavis"
    if not (lavis / "models" / "blip2_models" / "blip2_qformer_cir_align_prompt.py").is_file():
        raise FileNotFoundError(f"{src}: no src/lavis/models/blip2_models/blip2_qformer_cir_align_prompt.py")
    packages = {}
    for name in ("lavis", "lavis.models", "lavis.models.blip2_models", "lavis.models.blip_models", "lavis.processors"):
        module = types.ModuleType(name)
        module.__path__ = [str(lavis.parent / name.replace(".", "/"))]
        packages[name] = sys.modules[name] = module
    cv2 = types.ModuleType("cv2")  # randaugment's import only (train-time augmentation, unused)
    cv2.__spec__ = importlib.machinery.ModuleSpec("cv2", None)
    sys.modules.setdefault("cv2", cv2)
    # registry.register_model / register_processor do `from lavis.models import BaseModel` (resp. processors)
    packages["lavis.models"].BaseModel = importlib.import_module("lavis.models.base_model").BaseModel
    base_processor = importlib.import_module("lavis.processors.base_processor")
    packages["lavis.processors"].BaseProcessor = base_processor.BaseProcessor
    sys.path.insert(0, str(src / "src"))
    return types.SimpleNamespace(
        model=importlib.import_module("lavis.models.blip2_models.blip2_qformer_cir_align_prompt"),
        blip2=importlib.import_module("lavis.models.blip2_models.blip2"),
        qformer=importlib.import_module("lavis.models.blip2_models.Qformer"),
        eva_vit=importlib.import_module("lavis.models.eva_vit"),
        processors=importlib.import_module("lavis.processors.blip_processors"),
        data_utils=importlib.import_module("data_utils"),
        lavis_root=lavis,
    )


def patch_sprc(sprc: types.SimpleNamespace, vocab_file: Path) -> None:
    """Replace the hub/weight downloads of Blip2Base with the tiny local configuration (the model code is untouched)."""
    import torch
    from torch import nn
    from transformers import BertTokenizer

    def tiny_eva_vit(img_size: int, drop_path_rate: float, use_checkpoint: bool, precision: str) -> nn.Module:
        if (img_size, precision) != (VISION["img_size"], "fp32"):
            raise ValueError(f"tiny EVA ViT: expected img_size {VISION['img_size']} in fp32, "
                             f"got {img_size} {precision}")
        return sprc.eva_vit.VisionTransformer(
            img_size=img_size, patch_size=VISION["patch_size"], use_mean_pooling=False, embed_dim=VISION["embed_dim"],
            depth=VISION["depth"], num_heads=VISION["num_heads"], mlp_ratio=VISION["mlp_ratio"], qkv_bias=True,
            drop_path_rate=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=VISION["layer_norm_eps"]),
            use_checkpoint=use_checkpoint)

    def init_tokenizer(cls: type, truncation_side: str = "right") -> Any:
        tokenizer = BertTokenizer(str(vocab_file), truncation_side=truncation_side)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        return tokenizer

    def init_Qformer(cls: type, num_query_token: int, vision_width: int, cross_attention_freq: int = 2) -> Any:
        encoder_config = sprc.qformer.BertConfig(vocab_size=len(init_tokenizer(cls)), **QFORMER)
        encoder_config.encoder_width = vision_width
        encoder_config.add_cross_attention = True
        encoder_config.cross_attention_freq = cross_attention_freq
        encoder_config.query_length = num_query_token
        qformer = sprc.qformer.BertLMHeadModel(encoder_config)
        query_tokens = nn.Parameter(torch.zeros(1, num_query_token, encoder_config.hidden_size))
        query_tokens.data.normal_(mean=0.0, std=encoder_config.initializer_range)
        return qformer, query_tokens

    sprc.blip2.create_eva_vit_g = tiny_eva_vit
    sprc.blip2.Blip2Base.init_tokenizer = classmethod(init_tokenizer)
    sprc.blip2.Blip2Base.init_Qformer = classmethod(init_Qformer)


def build_model(sprc: types.SimpleNamespace) -> Any:
    """SPRC's Blip2QformerCirAlignPrompt at the tiny sizes, fp32 (load_model_and_preprocess calls .float() on CPU)."""
    return getattr(sprc.model, CLASS_NAME)(**MODEL_ARGS).float()


def rerandomise(model: Any, seed: int) -> None:
    """Give every parameter small non-trivial random values (so the *_query FFN copies differ from the text FFN)."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name == "temp":
                p.copy_(0.05 + 0.05 * torch.rand((), generator=gen))
            elif id(p) in norm_params:
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.05 * noise)
            elif name.endswith(("cls_token", "pos_embed", "query_tokens", "prompt_tokens")) or "embeddings" in name:
                p.copy_(0.5 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)  # N(0, 1/fan_in)
            else:
                p.copy_(0.05 * noise)


def make_images(out: Path) -> dict[str, list[Path]]:
    """Synthetic PNGs of varied aspect ratios (most trigger SPRC's TargetPad), drawn with a seeded RNG."""
    from PIL import Image, ImageDraw

    from cirlib import paths

    rng = random.Random(SEED)
    files: dict[str, list[Path]] = {}
    for kind, sizes in IMAGE_SIZES.items():
        files[kind] = []
        for k, (w, h) in enumerate(sizes):
            img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(img)
            for _ in range(3):
                x0, y0 = rng.randrange(w // 2), rng.randrange(h // 2)
                box = (x0, y0, x0 + rng.randrange(8, w // 2 + 8), y0 + rng.randrange(8, h // 2 + 8))
                colour = tuple(rng.randrange(256) for _ in range(3))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
            path = paths.atomic_write(out / f"{kind}_{k}.png", lambda tmp: img.save(tmp, format="PNG"))
            files[kind].append(path)
    return files


def preprocess_images(sprc: types.SimpleNamespace, paths: list[Path]) -> Any:
    """SPRC's data_utils.targetpad_transform(1.25, 56) over the PNGs, stacked."""
    import PIL.Image
    import torch

    transform = sprc.data_utils.targetpad_transform(TARGET_RATIO, VISION["img_size"])
    return torch.stack([transform(PIL.Image.open(p)) for p in paths])


def text_processor(sprc: types.SimpleNamespace) -> Any:
    """The eval text processor that load_model_and_preprocess builds from the model's yaml (blip_caption)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(sprc.lavis_root / "configs" / "models" / "blip2" / "blip2_pretrain.yaml")
    proc_cfg = cfg.preprocess.text_processor.eval
    if proc_cfg.name != "blip_caption":
        raise ValueError(f"{sprc.lavis_root}/configs/models/blip2/blip2_pretrain.yaml: eval text processor "
                         f"{proc_cfg.name!r}, expected 'blip_caption'")
    return sprc.processors.BlipCaptionProcessor.from_config(proc_cfg)


def tokenize(model: Any, captions: list[str]) -> tuple[Any, Any]:
    """SPRC's own tokenizer call (inference and forward use the same one)."""
    tokens = model.tokenizer(captions, padding="max_length", truncation=True, max_length=model.max_txt_len,
                             return_tensors="pt")
    return tokens.input_ids, tokens.attention_mask


class Recorder:
    """Forward hooks that keep a detached copy of chosen modules' outputs, in call order."""

    def __init__(self, modules: dict[str, Any]) -> None:
        self.calls: dict[str, list[Any]] = {name: [] for name in modules}
        for name, module in modules.items():
            module.register_forward_hook(partial(self._keep, name))

    def _keep(self, name: str, module: Any, args: Any, output: Any) -> None:
        tensor = output[0] if isinstance(output, tuple) else output
        self.calls[name].append(tensor.detach().clone())

    def clear(self) -> None:
        for calls in self.calls.values():
            calls.clear()

    def layers(self, prefix: str, n_layers: int, call: int) -> Any:
        """(n_layers, ...) stack of the `call`-th pass through layers prefix0..prefix{n-1}."""
        import torch

        return torch.stack([self.calls[f"{prefix}{i}"][call] for i in range(n_layers)])


def recorder_for(model: Any) -> Recorder:
    modules = {"vit": model.visual_encoder, "ln_vision": model.ln_vision, "embeddings": model.Qformer.bert.embeddings,
               "text_proj": model.text_proj, "vision_proj": model.vision_proj}
    modules.update({f"vit_block{i}": b for i, b in enumerate(model.visual_encoder.blocks)})
    modules.update({f"layer{i}": b for i, b in enumerate(model.Qformer.bert.encoder.layer)})
    return Recorder(modules)


def vision_expected(model: Any, rec: Recorder, ref_images: Any, gallery_images: Any) -> dict[str, Any]:
    """ViT blocks, ViT output and ln_vision for the references; SPRC's extract_target_features for the gallery."""
    import torch

    out: dict[str, Any] = {}
    depth, layers = VISION["depth"], QFORMER["num_hidden_layers"]
    with torch.no_grad():
        rec.clear()
        out["ref_ln_vision"] = model.ln_vision(model.visual_encoder(ref_images))
        out["ref_vit_out"], out["ref_vit_blocks"] = rec.calls["vit"][0], rec.layers("vit_block", depth, 0)
        rec.clear()
        out["gallery_feats"], out["gallery_ln_vision"] = model.extract_target_features(gallery_images, mode="mean")
        out["gallery_vit_out"], out["gallery_vit_blocks"] = rec.calls["vit"][0], rec.layers("vit_block", depth, 0)
        out["gallery_qformer_layers"] = rec.layers("layer", layers, 0)
        out["gallery_qformer_out"] = out["gallery_qformer_layers"][-1]
        out["gallery_embeddings"] = rec.calls["embeddings"][0]
    return out


def query_expected(model: Any, rec: Recorder, ref_ln_vision: Any, gallery_feats: Any,
                   captions: list[str]) -> dict[str, Any]:
    """SPRC's inference(): the two Q-Former passes, the fused query, the similarity and the ranking."""
    import torch
    import torch.nn.functional as F

    layers = QFORMER["num_hidden_layers"]
    with torch.no_grad():
        rec.clear()
        similarity = model.inference(ref_ln_vision, gallery_feats, captions)
    out = {"fusion_layers": rec.layers("layer", layers, 0), "text_layers": rec.layers("layer", layers, 1),
           "fusion_embeddings": rec.calls["embeddings"][0], "text_embeddings": rec.calls["embeddings"][1],
           "similarity": similarity}
    out["fusion_hidden"], out["text_hidden"] = out["fusion_layers"][-1], out["text_layers"][-1]
    out["prompt"] = out["fusion_hidden"][:, :MODEL_ARGS["num_query_token"]]
    out["query_embeds"] = F.normalize(rec.calls["text_proj"][0], dim=-1)
    out["distances"] = 1 - similarity
    out["ranking"] = torch.argsort(out["distances"], dim=-1)  # validate_blip.py
    return out


def longest_padding_expected(model: Any, rec: Recorder, ref_ln_vision: Any, gallery_feats: Any,
                             captions: list[str]) -> dict[str, Any]:
    """inference() with its tokenizer call switched to padding="longest" (NOT SPRC's rule): records what padding
    to the longest caption instead of to 32 changes in the query embeddings and the similarity."""
    import torch
    import torch.nn.functional as F

    tokenizer = model.tokenizer

    def longest(texts: list[str], **kwargs: Any) -> Any:
        return tokenizer(texts, **{**kwargs, "padding": "longest"})

    model.tokenizer = longest
    try:
        with torch.no_grad():
            rec.clear()
            similarity = model.inference(ref_ln_vision, gallery_feats, captions)
    finally:
        model.tokenizer = tokenizer
    return {"query_embeds": F.normalize(rec.calls["text_proj"][0], dim=-1), "similarity": similarity,
            "text_length": rec.calls["embeddings"][0].shape[1] - MODEL_ARGS["num_query_token"]}


def loss_and_step(model: Any, rec: Recorder, samples: dict[str, Any]) -> dict[str, Any]:
    """SPRC's forward() losses (eval mode), the CIRR-weighted backward and one AdamW step with SPRC's settings."""
    import torch
    import torch.nn.functional as F

    rec.clear()
    losses = model(samples)
    w = LOSS_WEIGHTS["loss_total_cirr"]
    total = w["itc"] * losses["loss_itc"] + w["rtc"] * losses["loss_rtc"] + w["align"] * losses["loss_align"]
    out: dict[str, Any] = {k: v.detach().clone() for k, v in losses.items()}
    out["loss_total_cirr"] = total.detach().clone()
    out["loss_total_fiq"] = sum(losses.values()).detach().clone()
    layers = QFORMER["num_hidden_layers"]
    out["rtc_layers"], out["rtc_embeddings"] = rec.layers("layer", layers, 3), rec.calls["embeddings"][3]
    out["rtc_hidden"] = out["rtc_layers"][-1]
    out["rtc_feats"] = F.normalize(rec.calls["text_proj"][1], dim=-1)
    out["train_fusion_feats"] = F.normalize(rec.calls["text_proj"][0], dim=-1)
    out["train_target_feats"] = F.normalize(rec.calls["vision_proj"][0], dim=-1)
    out["train_fusion_hidden"] = rec.layers("layer", layers, 0)[-1]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": filter(lambda p: p.requires_grad, model.parameters()), "lr": LR_STEP,
                                    **OPTIMIZER}])
    optimizer.zero_grad()
    total.backward()
    out["trainable"] = [n for n, _ in trainable]
    out["grads"] = {n: p.grad.detach().clone() for n, p in trainable if p.grad is not None}
    out["no_grad"] = [n for n, p in trainable if p.grad is None]
    optimizer.step()
    out["after_step"] = {n: p.detach().clone() for n, p in trainable}
    return out


def onecycle_first_lr(max_lr: float) -> float:
    """The lr of SPRC's first CIRR step: OneCycleLR(max_lr, pct_start=1/50, epochs=80) before any scheduler.step()."""
    import torch

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, pct_start=1 / 50, steps_per_epoch=10, epochs=80)
    return float(opt.param_groups[0]["lr"])


def reload(sprc: types.SimpleNamespace, path: Path) -> Any:
    """A fresh model loading the checkpoint as SPRC's validation does (strict=False), in eval mode."""
    import torch

    model = build_model(sprc)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    msg = model.load_state_dict(ckpt[CLASS_NAME], strict=False)
    if msg.missing_keys or msg.unexpected_keys:
        raise RuntimeError(f"{path}: reload mismatch {msg}")
    return model.eval()


def pretrain_expected(sprc: types.SimpleNamespace, path: Path, pixels: dict[str, Any],
                      captions: list[str]) -> dict[str, Any]:
    """A LAVIS BLIP-2 pretrain-like file ({'model': state_dict} without prompt_tokens), loaded by SPRC's
    load_from_pretrained into a fresh model, and that model's gallery features, query embeddings and similarity."""
    import torch
    import torch.nn.functional as F

    source = build_model(sprc)
    rerandomise(source, SEED + 1)
    state = {k: v for k, v in source.state_dict().items() if k != "prompt_tokens"}
    save({"model": state}, path)
    model = build_model(sprc)
    msg = model.load_from_pretrained(str(path))
    model.eval()
    rec = recorder_for(model)
    with torch.no_grad():
        gallery_feats, _ = model.extract_target_features(pixels["gallery_images"], mode="mean")
        ref_ln = model.ln_vision(model.visual_encoder(pixels["ref_images"]))
        rec.clear()
        similarity = model.inference(ref_ln, gallery_feats, captions)
    return {"missing_keys": list(msg.missing_keys), "unexpected_keys": list(msg.unexpected_keys),
            "gallery_feats": gallery_feats, "query_embeds": F.normalize(rec.calls["text_proj"][0], dim=-1),
            "similarity": similarity}


def packed(value: Any) -> Any:
    """Contiguous clones (no shared storages, so the files hold exactly what they name), recursively."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().clone().contiguous()
    if isinstance(value, dict):
        return {k: packed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [packed(v) for v in value]
    return value


def versions() -> dict[str, Any]:
    import fairscale
    import numpy
    import PIL
    import timm
    import torch
    import torchvision
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "timm": timm.__version__, "fairscale": fairscale.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "pillow": PIL.__version__, "threads": torch.get_num_threads(),
            "sprc": f"chunmeifeng/SPRC@{SPRC_COMMIT}", "lavis": "SPRC's bundled src/lavis"}


def write_vocab(out: Path) -> Path:
    """The synthetic world's WordPiece vocabulary (cirlib.data.synth, default SynthConfig) as the fixture's vocab."""
    from cirlib import paths
    from cirlib.data.synth import SynthConfig, vocabulary

    return paths.atomic_write_text(out / "vocab.txt", "\n".join(vocabulary(SynthConfig())) + "\n")


def config_json(model: Any, vocab: Path) -> dict[str, Any]:
    tok = model.tokenizer
    qcfg = model.Qformer.config
    return {
        "sprc_commit": SPRC_COMMIT, "lavis_source": "SPRC's bundled src/lavis (not PyPI salesforce-lavis)",
        "seed": SEED,
        "vision": {**VISION, "mlp_hidden": int(VISION["embed_dim"] * VISION["mlp_ratio"]),
                   "num_tokens": (VISION["img_size"] // VISION["patch_size"]) ** 2 + 1, "final_norm": False,
                   "attention_bias": "cat(q_bias, zeros, v_bias)", "drop_path_rate": MODEL_ARGS["drop_path_rate"]},
        "ln_vision_eps": model.ln_vision.eps,
        "qformer": {**QFORMER, "vocab_size": qcfg.vocab_size, "encoder_width": qcfg.encoder_width,
                    "cross_attention_freq": qcfg.cross_attention_freq, "query_length": qcfg.query_length,
                    "cross_attention_layers": [i for i, l in enumerate(model.Qformer.bert.encoder.layer)
                                               if l.has_cross_attention]},
        "num_query_token": MODEL_ARGS["num_query_token"], "embed_dim": MODEL_ARGS["embed_dim"],
        "max_txt_len": MODEL_ARGS["max_txt_len"],
        "tokens": {"vocab_file": vocab.name, "vocab_entries": len(vocab.read_text().split()),
                   "vocab_sha256": hashlib.sha256(vocab.read_bytes()).hexdigest(),
                   "vocab_source": "cirlib.data.synth.vocabulary(SynthConfig()) (default synthetic world)",
                   "do_lower_case": True, "cls_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id,
                   "pad_token_id": tok.pad_token_id, "unk_token_id": tok.unk_token_id, "dec_token": "[DEC]",
                   "dec_token_id": tok.bos_token_id, "tokenizer_len": len(tok),
                   "rule": "BlipCaptionProcessor (pre_caption: lower-case, each of .!\"()*#:;~ -> space, every run "
                           "of 2+ whitespace characters -> one space (a lone tab or newline stays), strip spaces, "
                           "first 50 space-separated words) then tokenizer(texts, padding='max_length', "
                           "truncation=True, max_length=32): [CLS] kept at 0, [SEP] last (also when truncated), "
                           "pad 0 with attention_mask 0"},
        "loss_weights": LOSS_WEIGHTS,
        "optimizer": {"type": "AdamW", "betas": list(OPTIMIZER["betas"]), "eps": OPTIMIZER["eps"],
                      "weight_decay": OPTIMIZER["weight_decay"], "param_groups": "one group: every requires_grad "
                      "parameter (all but visual_encoder.*), weight decay on all", "lr_step": LR_STEP,
                      "sprc_first_step_lr_cirr_at_max_lr_2e-5": onecycle_first_lr(CIRR_MAX_LR)},
        "train_target_index": TRAIN_TARGET_INDEX, "checkpoint_epoch": 0,
        "image_preprocess": {"transform": f"SPRC data_utils.targetpad_transform({TARGET_RATIO}, "
                                          f"{VISION['img_size']}) on the PNGs",
                             "mean": [0.48145466, 0.4578275, 0.40821073],
                             "std": [0.26862954, 0.26130258, 0.27577711]},
        "mode": "fp32, model.eval() (dropout off) for every expected value, the losses and the gradients",
        "versions": versions(),
    }


def make_inputs(sprc: types.SimpleNamespace, model: Any, images: dict[str, list[Path]]) -> dict[str, Any]:
    import torch

    proc = text_processor(sprc)
    captions = [proc(c) for c in CAPTIONS]
    probes = [proc(c) for c in PROBE_CAPTIONS]
    ids, mask = tokenize(model, captions)
    probe_ids, probe_mask = tokenize(model, probes)
    tok = model.tokenizer
    return {"ref_images": preprocess_images(sprc, images["ref"]),
            "gallery_images": preprocess_images(sprc, images["gal"]),
            "image_names": [p.name for p in images["ref"] + images["gal"]],
            "captions_raw": list(CAPTIONS), "captions": captions, "input_ids": ids, "attention_mask": mask,
            "probe_captions_raw": list(PROBE_CAPTIONS), "probe_captions": probes, "probe_input_ids": probe_ids,
            "probe_attention_mask": probe_mask, "train_target_index": torch.tensor(TRAIN_TARGET_INDEX),
            "cls_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id, "pad_token_id": tok.pad_token_id,
            "unk_token_id": tok.unk_token_id, "dec_token_id": tok.bos_token_id, "vocab_size": len(tok)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's cirlib (paths, data.synth)
    import torch

    from cirlib import paths

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    random.seed(SEED)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    sprc = import_sprc(args.sprc_src.resolve())
    vocab = write_vocab(out)
    patch_sprc(sprc, vocab)

    model = build_model(sprc)
    rerandomise(model, SEED)
    ckpt = out / "sprc_ckpt.pt"
    save({"epoch": 0, CLASS_NAME: model.state_dict()}, ckpt)
    model = reload(sprc, ckpt)
    rec = recorder_for(model)

    inputs = make_inputs(sprc, model, make_images(out))
    expected = vision_expected(model, rec, inputs["ref_images"], inputs["gallery_images"])
    expected.update(query_expected(model, rec, expected["ref_ln_vision"], expected["gallery_feats"],
                                   inputs["captions"]))
    expected["padding_longest"] = longest_padding_expected(  # queries 0-1: 12 and 10 tokens, so padded to 12
        model, rec, expected["ref_ln_vision"][:2], expected["gallery_feats"], inputs["captions"][:2])
    samples = {"image": inputs["ref_images"], "target": inputs["gallery_images"][inputs["train_target_index"]],
               "text_input": inputs["captions"]}
    expected.update(loss_and_step(model, rec, samples))
    if not torch.equal(expected["train_fusion_hidden"], expected["fusion_hidden"]):
        raise RuntimeError("forward() and inference() disagree on the fusion pass")
    expected["pretrain_loaded"] = pretrain_expected(sprc, out / "lavis_pretrain_like.pt", inputs,
                                                    inputs["captions"])
    expected["meta"] = {k: str(v) for k, v in versions().items()}
    save(packed(inputs), out / "inputs.pt")
    save(packed(expected), out / "expected.pt")
    paths.write_json(out / "config.json", config_json(model, vocab))
    print(f"wrote {sorted(p.name for p in out.iterdir())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
