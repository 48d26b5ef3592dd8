"""Which image feature stores (`cirlib.retrieval.feature_store`) a pipeline step reads, and when it may.

A config's `feature_store` field ("" | "float32" | "float16") turns them on. A store holds the eval-mode outputs of a
frozen encoder, so it is refused where the encoder is not frozen or not deterministic:

- stage I with `train_image_encoder=True` (the ViT changes every step: nothing to reuse);
- stage II with `stage1_train_mode=True` (the original's behaviour: drop-path stays active in the frozen ViTs while
  training, so an image's tokens differ at every step; keep the store off to reproduce it).

Stores of a step (all under `<outputs>/features/`, keyed by weights hash and preprocessing, so a second run, a
top-k extraction and a stage-II run with the same ViT weights reuse them):

- stage I (`stage1_store`): tokens and embeddings of stage I's ViT + gallery head ("stage1-..."): training references
  and targets, validation and top-k galleries; for training a first stage whose gallery head trains
  (`trains_gallery_head`), its ViT tokens only ("vit-...": the embeddings are made from them at every use);
- stage II (`vit_store`): the tokens of a ViT alone ("vit-..."): stage II's own (references and candidates) and, when
  z_t is computed from stage I's ViT, stage I's (the same store when the weights are equal).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from cirlib import data as cdata
from cirlib.retrieval import feature_store as fs

STORE_SETTINGS = ("", "float32", "float16")


def check_feature_store(cfg: Any) -> None:
    """Refuse a `feature_store` setting the config cannot honour, with the reason (before any work).

    Args:
        cfg: a Stage1Config or Stage2TrainConfig (reads feature_store and, where present, train_image_encoder and
            stage1_train_mode).
    Raises:
        ValueError: naming the field, its value and why.
    """
    setting = cfg.feature_store
    name = type(cfg).__name__
    if setting not in STORE_SETTINGS:
        raise ValueError(f"{name}: feature_store={setting!r}; expected one of {STORE_SETTINGS} (\"\" = off)")
    if not setting:
        return
    if getattr(cfg, "train_image_encoder", False):
        raise ValueError(f"{name}: feature_store={setting!r} with train_image_encoder=True: a store holds a frozen "
                         "encoder's outputs, and this run trains the ViT; set feature_store=\"\"")
    if getattr(cfg, "stage1_train_mode", False):
        raise ValueError(f"{name}: feature_store={setting!r} with stage1_train_mode=True: the store holds the "
                         "frozen ViTs' eval-mode outputs, while stage1_train_mode keeps drop-path active in them "
                         "(the original's behaviour, a different value at every step); set feature_store=\"\" to "
                         "reproduce the original, or stage1_train_mode=False to use the store")


def _names(sets: Sequence["cdata.SplitData"]) -> list[str]:
    # The galleries hold every image a query names (references, targets, img_set members, top-k candidates).
    return list(dict.fromkeys(n for sd in sets for n in sd.gallery))


def stage1_store(model, setting: str, sets: Sequence["cdata.SplitData"], *, target_ratio: float,
                 outputs: str = "", device: torch.device | str = "cpu", training: bool = False
                 ) -> fs.FeatureStore | None:
    """The stage-I store (tokens + embeddings) holding every gallery image of `sets`, or None when `setting` is "".

    Built (or extended) on first use, reused after; collective under several processes.

    Args:
        training: the store serves stage-I training (and its validation): tokens only when the first stage trains
            its gallery head (`fs.stage1_outputs`; readers then embed the tokens, `search.embed_gallery_tokens`).
    """
    if not setting:
        return None
    return fs.open_store(fs.stage1_image_encoder(model, fs.stage1_outputs(model, training), training=training),
                         fs.preprocessing(target_ratio, model.config.vision.image_size), _names(sets), list(sets),
                         dtype=setting, outputs_root=outputs or None, device=device)


def vit_store(encoder: "fs.ImageEncoder", image_size: int, setting: str, sets: Sequence["cdata.SplitData"], *,
              target_ratio: float, outputs: str = "", device: torch.device | str = "cpu") -> fs.FeatureStore | None:
    """A tokens-only store of `encoder` (`fs.stage2_image_encoder(stage2)` or `fs.stage1_image_encoder(stage1,
    ("tokens",))`) over the galleries of `sets`, or None when `setting` is ""."""
    if not setting:
        return None
    return fs.open_store(encoder, fs.preprocessing(target_ratio, image_size), _names(sets), list(sets),
                         dtype=setting, outputs_root=outputs or None, device=device)


def stage2_stores(stage1, stage2, setting: str, sets: Sequence["cdata.SplitData"], *, target_ratio: float,
                  outputs: str = "", device: torch.device | str = "cpu"
                  ) -> tuple[fs.FeatureStore | None, fs.FeatureStore | None]:
    """(stage II's ViT store, stage I's ViT store for z_t or None when z_t does not need it); (None, None) when off.

    Stage I's ViT tokens are needed only by a re-ranker whose z_t comes from them (`zt_from_stage1_vit`: the dual one
    with `zt_source="stage1_vit"`); with equal ViT weights (`vision_from_stage1`) both are the same store, opened once.
    """
    if not setting:
        return None, None
    size = stage2.config.vision.image_size
    own = vit_store(fs.stage2_image_encoder(stage2), size, setting, sets, target_ratio=target_ratio,
                    outputs=outputs, device=device)
    zt = None
    if stage2.zt_from_stage1_vit:
        zt_encoder = fs.stage1_image_encoder(stage1, ("tokens",))
        if fs.store_key(zt_encoder, fs.preprocessing(target_ratio, size), setting) == own.key:
            zt = own
        else:
            zt = vit_store(zt_encoder, size, setting, sets, target_ratio=target_ratio, outputs=outputs, device=device)
    return own, zt


def provenance_of(*stores: fs.FeatureStore | None) -> dict[str, Any]:
    """What a provenance record says of the stores a step read: {"feature_stores": [{folder, status, weights}]}
    ({} when none)."""
    used = [s for s in dict.fromkeys(stores) if s is not None]
    if not used:
        return {}
    return {"feature_stores": [{"folder": str(s.folder), "status": s.status, "dtype": s.dtype,
                                "weights_sha256": s.key["weights_sha256"], "images": len(s)} for s in used]}
