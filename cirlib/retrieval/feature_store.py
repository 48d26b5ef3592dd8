"""Image feature store: a frozen image encoder's outputs, computed once per image and kept on disk, memory-mapped.

Why: with the ViT frozen, stage I re-runs ViT-B/16 at 384 px on both images of every triplet at every step, about
four fifths of its compute (issue 13). In eval mode the encoder is a fixed function of the image, so its outputs can
be computed once and read back, across epochs, runs and stages, for as long as what produced them is unchanged.

What is stored, per image (a store holds one or both, chosen by `outputs`):

- "tokens": the ViT token sequence (L, D) after the final norm, where a stage cross-attends to the image (stage-I
  references; stage-II references and candidates);
- "embeds": stage I's unit-norm gallery embedding(s), (E,) for a single-vector first stage (BLIP: the projected
  class token) or (V, E) for a multi-vector one (SPRC: 32 query-token outputs), where only that is used (stage-I
  targets and galleries).

What a first stage's outputs depend on comes from the model (`FirstStage.image_weights` / `image_architecture`:
"tokens" = its `visual_encoder` and vision config; "embeds" adds its gallery head). A first stage whose gallery head
trains in stage I (`FirstStage.trains_gallery_head`) gets tokens-only stores for training (`stage1_outputs`); after
training (top-k extraction, a gallery index) its weights are fixed and its embeddings may be stored.

Key: a store is reused only when all of this is identical (`store_key`): the encoder's architecture (its vision
config: heads, eps, ... are not in the weights), the sha256 of its weights (`weights_sha256`: names, shapes, dtypes
and bytes of every state-dict tensor of the modules that produce the outputs, whatever file they came from), the
preprocessing (a plain dict: transform name, target_ratio, image_size; the transform itself is built from that dict,
so the key and the pixels cannot disagree), which outputs, and the storage dtype. The image names are not part of
the key: a store of the same key grows when asked for names it lacks (only those are encoded).

Layout (this module owns it): `<outputs>/features/<encoder name>-<16 hex of the key's hash>/`, holding
`manifest.json` (the key, the status "building" | "complete", the shard plan = which names in which shard, in order,
and at completion the shapes and byte counts) and per shard `tokens-00000.npy` / `embeds-00000.npy`. The encoder
name is "vit" for a tokens-only store (its key covers `visual_encoder` alone, so a stage-I and a stage-II model with
the same ViT weights share one) and "stage1" when embeddings are stored (the key adds the gallery head: BLIP's
`vision_proj`).

Format: numpy .npy shards written with `np.lib.format.open_memmap` and read with `np.load(mmap_mode="r")`. Chosen
over safetensors because a shard is filled batch by batch in place (safetensors writes a whole file from tensors in
memory: a 256-image blip-base shard would first have to sit in RAM) and because reading a few rows of a memmap is
plain numpy fancy indexing; .npy's header carries shape and dtype, so a truncated or foreign file is detected at
open. Half precision is IEEE float16 (numpy has no bfloat16): 10 mantissa bits, so each stored value is within
2**-11 relative of the encoder's (plus 2**-25 absolute below 2**-14); ViT-B outputs after the final LayerNorm stay far
below float16's 65504 (a build refuses infinities). Half stores therefore do not give bit-identical scores: rankings
may swap near-ties. Use float32 where results must equal the encoder's exactly.

Building (`open_store`, collective under several processes): the main process reads the manifest, plans the shards
(fixed groups of `shard_size` names in the order given; names new to the store go into new shards appended at the
end; an interrupted build keeps its whole shards and plans the rest afresh) and writes the plan; process r of w
then builds the r-th, (r+w)-th, ... of the shards still to build, each written to `<file>.partial` and renamed into
place when full and flushed (the rename is the shard's completion record: an interrupted build leaves only whole
shards under final names, a resumed one skips them and rewrites the half-written one); after a barrier the main
process checks every shard and writes the manifest "complete". Completion is recorded per shard by the rename rather
than by rewriting the manifest because several processes finish shards concurrently and one JSON file written by all
of them would need a lock. The encoder runs in eval mode (restored afterwards), under inference_mode, with autocast
off: the store always holds the weights' own precision. One build per store at a time: `open_store` holds
`.<store>.lock` while it plans and builds, and another process asking for the same store waits for it.

Reading: `FeatureStore.tokens(names)` -> (B, L, D), `.embeddings(names)` -> (B, E) or (B, V, E), torch tensors in
the dtype asked for (float32 by default), rows in the order of `names`; only the rows read are touched
(memory-mapped). A store is picklable (DataLoader workers reopen the shards lazily).

How the pipeline will read it (issue 13, part 2; the wiring lives in train/tasks.py, workbook/steps.py,
workbook/evaluation.py and retrieval/search.py, not here):

- stage I training (ViT frozen): one "stage1" store (tokens + embeds) over the training galleries; a batch carries
  names only, and `Stage1Task.training_step` reads `store.tokens(references)` and `store.embeddings(targets)`
  instead of decoding and encoding both images (a first stage that trains its gallery head: a "vit" store, and
  targets `model.embed_tokens(store.tokens(targets))`);
- top-k extraction and stage-I validation: `search.encode_gallery` is replaced, when a store is given, by
  `gallery_features(store, split_data)` (embeds, and tokens for the query fusion) -> the same `GalleryFeatures`
  (from a tokens-only store, embeds made by `search.embed_gallery_tokens`);
- stage II training: a "vit" store over the training gallery; `MinedTripletDataset` yields names, and the task reads
  reference and candidate tokens (target + negatives) from the store; the frozen stage I's z_t still needs the
  stage-I reference tokens: from the "stage1" store (same ViT weights as stage I's);
- re-ranking: `rerank` gets its gallery tokens from the "vit" store of the evaluated split (and z_t's reference
  tokens from the "stage1" store) instead of `encode_gallery(stage2_encoder(...))`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cirlib import data as cdata
from cirlib import distributed as dist
from cirlib import paths
from cirlib.progress import progress_bar, progress_write
from cirlib.retrieval.search import GalleryFeatures, stage1_encoder, stage2_encoder
from cirlib.run_folder import config_hash, file_sha256, folder_lock, outputs_root as _outputs_root

# bump when the layout or the meaning of a stored value changes (part of the key). 2: every shard has a checksum record
FORMAT_VERSION = 2
FEATURES_DIR = "features"  # under the outputs root
MANIFEST_FILE = "manifest.json"
OUTPUTS = ("tokens", "embeds")
DTYPES = {"float32": np.float32, "float16": np.float16}
MODES = ("build", "reuse", "rebuild")
TRANSFORMS = ("targetpad", "squarepad")
DEFAULT_SHARD_SIZE = 256  # images per shard: 227 MB of blip-base tokens in half precision
FREE_SPACE_MARGIN = 16 * 2**20  # bytes left free on the disk beyond a shard being written


class FeatureStoreError(Exception):
    """A feature store cannot be used as asked; the message names the store (and file) and what to do."""


class StoreMismatchError(FeatureStoreError):
    """No valid store for this key (missing, incomplete, another key, lacking names) and mode="reuse" forbids
    building one; the message says which key field differs."""


class StoreCorruptError(FeatureStoreError):
    """A shard or the manifest is unreadable, of the wrong size or shape, or holds NaN/inf."""


class UnknownImageError(FeatureStoreError, LookupError):
    """Names asked for that the store does not hold."""


# ------------------------------------------------------------------------------------------------ encoder and key
@dataclass(frozen=True, eq=False)
class ImageEncoder:
    """A frozen image encoder as the store sees it: what it computes and which weights determine it."""

    name: str  # folder prefix: "vit" (tokens only) or "stage1" (with embeddings)
    encode: Callable[[torch.Tensor], tuple[torch.Tensor | None, torch.Tensor | None]]  # (B,3,S,S) -> (tokens, embeds)
    modules: Mapping[str, nn.Module | torch.Tensor]  # the weights the outputs depend on (hashed; modules put in eval
    # mode while building)
    architecture: Mapping[str, Any]  # config fields that change the outputs but are not weights (vision config)
    outputs: tuple[str, ...]  # what a store of this encoder holds, a subset of OUTPUTS (part of the key)


def _vision_config(model) -> dict[str, Any]:
    # Drop-path is inactive in eval mode, the only mode a store is built in; everything else of the ViT counts.
    return dataclasses.asdict(model.config.vision)


def stage1_outputs(model, training: bool) -> tuple[str, ...]:
    """What a store of first stage `model` may hold: tokens and embeds, or tokens only for training a first stage
    whose gallery head trains (`trains_gallery_head`: its embeddings change at every step)."""
    return ("tokens",) if training and model.trains_gallery_head else OUTPUTS


def stage1_image_encoder(model, outputs: Sequence[str] = OUTPUTS, *, training: bool = False) -> ImageEncoder:
    """The image side of a first stage (`search.stage1_encoder`: `encode_image`'s tokens and/or embeds), keyed by
    what the model says its outputs depend on (`image_weights`, `image_architecture`).

    A tokens-only encoder ("vit") hashes `visual_encoder` alone, so it keys the same store as a Stage2Model whose ViT
    has the same weights; with "embeds" ("stage1") the gallery head is hashed too (BLIP: `vision_proj`).

    Args:
        training: the store serves stage-I training: embeds of a first stage that `trains_gallery_head` are refused.
    Raises:
        FeatureStoreError: embeds asked for training a first stage whose gallery head trains.
    """
    outputs = _check_outputs(outputs)
    if "embeds" in outputs and "embeds" not in stage1_outputs(model, training):
        raise FeatureStoreError(f"first stage {model.name!r} trains the head that makes its gallery embeddings "
                                "(trains_gallery_head): a store for its training holds tokens only "
                                "(outputs=('tokens',), or stage1_outputs(model, training=True))")
    return ImageEncoder(name="stage1" if "embeds" in outputs else "vit", encode=stage1_encoder(model),
                        modules=model.image_weights(outputs), architecture=model.image_architecture(outputs),
                        outputs=outputs)


def stage2_image_encoder(model) -> ImageEncoder:
    """The image side of a Stage2Model (`search.stage2_encoder`): its ViT tokens ("vit")."""
    return ImageEncoder(name="vit", encode=stage2_encoder(model), modules={"visual_encoder": model.visual_encoder},
                        architecture=_vision_config(model), outputs=("tokens",))


# Per module object: (signature of its tensors, digest). The signature changes with any in-place update (optimizer
# step, load_state_dict: the tensor's version counter), a move (data_ptr) or a replaced tensor, so a stale digest is
# never returned; an unchanged module is hashed once (ViT-B: 344 MB of fp32 weights, about a second).
_HASH_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def _signature(state: Mapping[str, torch.Tensor]) -> tuple:
    return tuple((k, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype), str(t.device)) for k, t in state.items())


def _module_sha256(module: nn.Module | torch.Tensor) -> str:
    if not isinstance(module, nn.Module):  # a bare tensor (a query-token parameter): small, hashed each time
        return _state_sha256({"": module})
    state = module.state_dict(keep_vars=True)
    sig = _signature(state)
    cached = _HASH_CACHE.get(module)
    if cached is not None and cached[0] == sig:
        return cached[1]
    digest = _state_sha256(state)
    _HASH_CACHE[module] = (sig, digest)
    return digest


def _state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_sha256(modules: Mapping[str, nn.Module | torch.Tensor]) -> str:
    """sha256 over the named modules' state-dict tensors (module name + tensor name, shape, dtype, bytes), in sorted
    order (a bare tensor counts as a module holding it under the name ""): the same weights give the same hash
    whichever file or device they came from."""
    h = hashlib.sha256()
    for name in sorted(modules):
        h.update(f"{name}\0{_module_sha256(modules[name])}\0".encode())
    return h.hexdigest()


def _check_outputs(outputs: Sequence[str]) -> tuple[str, ...]:
    if isinstance(outputs, str):
        outputs = (outputs,)
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown or not outputs:
        raise ValueError(f"feature store outputs must be a non-empty subset of {OUTPUTS}, got {tuple(outputs)}")
    return tuple(o for o in OUTPUTS if o in outputs)  # canonical order


def _check_preprocess(preprocess: Mapping[str, Any]) -> dict[str, Any]:
    prep = dict(preprocess)
    name = prep.get("transform")
    if name not in TRANSFORMS:
        raise ValueError(f"preprocess['transform'] must be one of {TRANSFORMS}, got {name!r} (in {prep})")
    if not isinstance(prep.get("image_size"), int):
        raise ValueError(f"preprocess['image_size'] must be an int, got {prep.get('image_size')!r} (in {prep})")
    if name == "targetpad":
        if not isinstance(prep.get("target_ratio"), (int, float)):
            raise ValueError(f"preprocess['target_ratio'] must be a number for targetpad, got {prep} ")
        prep["target_ratio"] = float(prep["target_ratio"])
    extra = set(prep) - {"transform", "image_size", "target_ratio"}
    if extra:
        raise ValueError(f"preprocess has unknown fields {sorted(extra)}: expected transform, target_ratio, image_size")
    return prep


def preprocessing(target_ratio: float, image_size: int, transform: str = "targetpad") -> dict[str, Any]:
    """The preprocess dict of the pipeline's transform (`cdata.targetpad_transform(target_ratio, image_size)`)."""
    prep = {"transform": transform, "image_size": int(image_size)}
    if transform == "targetpad":
        prep["target_ratio"] = float(target_ratio)
    return _check_preprocess(prep)


def transform_of(preprocess: Mapping[str, Any]) -> Callable:
    """The data room's transform a preprocess dict names."""
    prep = _check_preprocess(preprocess)
    if prep["transform"] == "targetpad":
        return cdata.targetpad_transform(prep["target_ratio"], prep["image_size"])
    return cdata.squarepad_transform(prep["image_size"])


def store_key(encoder: ImageEncoder, preprocess: Mapping[str, Any], dtype: str = "float32") -> dict[str, Any]:
    """Everything a store's values depend on; a store is reused only under an identical key.

    Args:
        encoder: `stage1_image_encoder(model, outputs)` or `stage2_image_encoder(model)` (its outputs are stored).
        preprocess: {"transform": "targetpad" | "squarepad", "target_ratio": float, "image_size": int}.
        dtype: "float32" or "float16" (storage precision).
    """
    outputs = _check_outputs(encoder.outputs)
    if "embeds" in outputs and set(encoder.modules) <= {"visual_encoder"}:
        raise ValueError("stored embeddings depend on the gallery head too (BLIP: vision_proj): make the encoder with "
                         "stage1_image_encoder")
    if dtype not in DTYPES:
        raise ValueError(f"feature store dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return {"format": FORMAT_VERSION, "encoder": encoder.name, "architecture": dict(encoder.architecture),
            "weights_sha256": weights_sha256(encoder.modules), "preprocess": _check_preprocess(preprocess),
            "outputs": list(outputs), "dtype": dtype}


def store_folder(key: Mapping[str, Any], outputs: str | os.PathLike | None = None) -> Path:
    """`<outputs>/features/<encoder name>-<key hash>/` (outputs: the outputs root, default <repo>/outputs)."""
    return _outputs_root(outputs) / FEATURES_DIR / f"{key['encoder']}-{config_hash(key)}"


def key_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two keys: 'weights_sha256 (store 1a2b3c4d5e6f vs now 9f8e7d6c5b4a)'."""
    out = []
    for field in sorted(set(stored) | set(wanted)):
        a, b = stored.get(field, "<absent>"), wanted.get(field, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += key_differences(a, b, f"{prefix}{field}.")
        elif a != b:
            short = (lambda v: v[:12] if isinstance(v, str) and len(v) == 64 else v)
            out.append(f"{prefix}{field} (store {short(a)} vs now {short(b)})")
    return out


# ----------------------------------------------------------------------------------------------------- sizes
def bytes_per_image(token_shape: tuple[int, int] | None, embed_shape: int | Sequence[int] | None, dtype: str) -> int:
    """Data bytes one image takes in a store (shard headers aside: 128 bytes per .npy file); embed_shape: E or
    (V, E)."""
    item = np.dtype(DTYPES[dtype]).itemsize
    embeds = 0 if embed_shape is None else math.prod([embed_shape] if isinstance(embed_shape, int) else embed_shape)
    return item * ((math.prod(token_shape) if token_shape else 0) + embeds)


# ------------------------------------------------------------------------------------------------- shard files
def _shard_file(output: str, shard: int) -> str:
    return f"{output}-{shard:05d}.npy"


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


# A shard's checksum record, `<shard>.sha256.json` beside it: {"sha256", "size", "mtime_ns"}, written when the shard
# is finished. On open a shard whose size and mtime are the recorded ones is taken as written (a stat, no read); any
# other shard is hashed again and refused unless its sha256 is the recorded one. So a shard changed in place (same
# size, new mtime) is found at open without reading every shard every time; `FeatureStore.verify()` hashes them all.
SEAL_SUFFIX = ".sha256.json"


def _seal_file(path: Path) -> Path:
    return path.with_name(path.name + SEAL_SUFFIX)


def _seal(path: Path) -> None:
    """Write the checksum record of a finished shard (after its rename: the record names the final file)."""
    st = path.stat()
    paths.write_json(_seal_file(path), {"sha256": file_sha256(path), "size": st.st_size,
                                        "mtime_ns": st.st_mtime_ns})


def _seal_problem(path: Path, full: bool = False) -> str | None:
    """Why a shard does not match its checksum record (None when it does). full: hash it even when its size and
    mtime are the recorded ones."""
    seal = _seal_file(path)
    if not seal.is_file():
        return f"{path.name} has no checksum record ({seal.name}): its build was interrupted after writing it"
    try:
        record = paths.read_json(seal, "feature store checksum record")
        want, size, mtime_ns = record["sha256"], record["size"], record["mtime_ns"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{seal} is not a checksum record ({e})"
    st = path.stat()
    if not full and (st.st_size, st.st_mtime_ns) == (size, mtime_ns):
        return None
    got = file_sha256(path)
    if got != want:
        return (f"{path} changed since it was written (sha256 {got[:12]}, recorded {want[:12]}; size {st.st_size} "
                f"vs {size} bytes)")
    return None


def _check_free_space(folder: Path, nbytes: int, what: str) -> None:
    """Refuse to write `nbytes` into `folder` when the disk has less free: a memory-mapped write that runs out of
    space kills the process with SIGBUS, saying nothing."""
    free = shutil.disk_usage(folder).free
    if free < nbytes + FREE_SPACE_MARGIN:
        raise FeatureStoreError(f"not enough free disk space for {what}: it needs {nbytes / 2**20:.1f} MiB, "
                                f"{free / 2**20:.1f} MiB free under {folder} (keeping {FREE_SPACE_MARGIN // 2**20} "
                                "MiB spare); free some space or put the outputs elsewhere")


def _read_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file, after checking its size matches them; StoreCorruptError naming the file."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy format version {version}, not written by this store")
            offset = f.tell()
    except FileNotFoundError as e:
        raise StoreCorruptError(f"feature store shard missing: {path}") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise StoreCorruptError(f"feature store shard {path} has an unreadable header ({e})") from e
    if fortran:
        raise StoreCorruptError(f"feature store shard {path} is Fortran-ordered; this store did not write it")
    expected = offset + math.prod(shape) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise StoreCorruptError(f"feature store shard {path} is {actual} bytes, its header says {expected} "
                                f"(shape {shape}, {dtype}): truncated or overwritten")
    return tuple(shape), dtype


def _shard_problem(folder: Path, shard: Mapping[str, Any], outputs: Sequence[str], dtype: str,
                   shapes: Mapping[str, list[int]] | None, full: bool = False) -> str | None:
    """Why a shard is not complete and valid (None when it is): files, headers, sizes and checksum records (full:
    hash every file, see `_seal_problem`)."""
    for output in outputs:
        path = folder / _shard_file(output, shard["id"])
        if not path.exists():
            return f"{path.name} not written"
        try:
            shape, dt = _read_header(path)
        except StoreCorruptError as e:
            return str(e)
        if dt != np.dtype(DTYPES[dtype]):
            return f"{path} holds {dt}, the store {dtype}"
        if shape[0] != len(shard["names"]):
            return f"{path} holds {shape[0]} rows, its shard {len(shard['names'])} images"
        if shapes is not None and list(shape[1:]) != list(shapes[output]):
            return f"{path} rows are {list(shape[1:])}, the store's {list(shapes[output])}"
        problem = _seal_problem(path, full)
        if problem:
            return problem
    return None


# ------------------------------------------------------------------------------------------------- the store
class FeatureStore:
    """A complete store, opened for reading (memory-mapped). Build or find one with `open_store`.

    Attributes:
        folder: the store folder; key: its key; names: image names, in store order; outputs, dtype;
        token_shape: (L, D) or None; embed_shape: (E,) or (V, E) (multi-vector) or None; embed_dim: E or None;
        status: how `open_store` got it: "reused" | "built" | "resumed" | "extended" | "repaired" (None from `open`);
        reason: why it was (re)built, or "" when reused.
    """

    def __init__(self, folder: Path, manifest: Mapping[str, Any]):
        self.folder = Path(folder)
        self.manifest = dict(manifest)
        self.key: dict[str, Any] = dict(manifest["key"])
        self.outputs: tuple[str, ...] = tuple(self.key["outputs"])
        self.dtype: str = self.key["dtype"]
        shapes = manifest["shapes"]
        self.token_shape: tuple[int, int] | None = tuple(shapes["tokens"]) if "tokens" in shapes else None
        self.embed_shape: tuple[int, ...] | None = tuple(shapes["embeds"]) if "embeds" in shapes else None
        self.embed_dim: int | None = self.embed_shape[-1] if self.embed_shape else None
        self.shards: list[dict[str, Any]] = list(manifest["shards"])
        self.names: list[str] = [n for s in self.shards for n in s["names"]]
        self.index: dict[str, tuple[int, int]] = {n: (si, r) for si, s in enumerate(self.shards)
                                                  for r, n in enumerate(s["names"])}
        self.status: str | None = None
        self.reason: str = ""
        self._maps: dict[tuple[str, int], np.ndarray] = {}

    # -------------------------------------------------------------- opening
    @classmethod
    def open(cls, folder: str | os.PathLike, key: Mapping[str, Any] | None = None) -> "FeatureStore":
        """Open a complete store and check every shard's header and size (and the embeddings for NaN/inf).

        Args:
            key: the key the caller needs; a store of another key is refused (StoreMismatchError naming the fields).
        Raises:
            StoreMismatchError: missing, incomplete, or another key. StoreCorruptError: a bad shard or manifest.
        """
        folder = Path(folder)
        manifest = _read_manifest(folder)
        if manifest is None:
            raise StoreMismatchError(f"no feature store at {folder} (no {MANIFEST_FILE})")
        if key is not None and manifest["key"] != dict(key):
            raise StoreMismatchError(f"feature store {folder} was built for another key: "
                                     f"{'; '.join(key_differences(manifest['key'], key))}")
        if manifest.get("status") != "complete":
            done = sum(_shard_problem(folder, s, manifest["key"]["outputs"], manifest["key"]["dtype"], None) is None
                       for s in manifest["shards"])
            raise StoreMismatchError(f"feature store {folder} is incomplete ({done} of {len(manifest['shards'])} "
                                     "shards built): build it with open_store(..., mode='build') to resume")
        for shard in manifest["shards"]:
            problem = _shard_problem(folder, shard, manifest["key"]["outputs"], manifest["key"]["dtype"],
                                     manifest["shapes"])
            if problem:
                raise StoreCorruptError(f"feature store {folder} is damaged: {problem}. Build it again "
                                        "(open_store(..., mode='build'), or the command that made it) to repair "
                                        "that shard, or delete the folder")
        store = cls(folder, manifest)
        if "embeds" in store.outputs:  # small (4 KB per 1,000 images of E=256 in half): check them all at open
            for si in range(len(store.shards)):
                store._check_finite(store._map("embeds", si), "embeds", si)
        return store

    def verify(self) -> list[str]:
        """Hash every shard and compare with its checksum record (`open` only stats them): the problems found, one
        line per damaged shard (empty when every shard is as written)."""
        outputs, dtype = self.outputs, self.dtype
        shapes = self.manifest["shapes"]
        return [p for s in self.shards if (p := _shard_problem(self.folder, s, outputs, dtype, shapes, full=True))]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = {}  # memmaps are reopened in the receiving process (DataLoader workers)
        return state

    # -------------------------------------------------------------- reading
    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def missing(self, names: Iterable[str]) -> list[str]:
        """The names the store does not hold, in the order given."""
        return [n for n in names if n not in self.index]

    @property
    def nbytes(self) -> int:
        """Bytes of the shard files on disk (headers included)."""
        return sum((self.folder / _shard_file(o, s["id"])).stat().st_size for s in self.shards for o in self.outputs)

    def _map(self, output: str, shard: int) -> np.ndarray:
        key = (output, shard)
        if key not in self._maps:
            path = self.folder / _shard_file(output, self.shards[shard]["id"])
            try:
                self._maps[key] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise StoreCorruptError(f"cannot read feature store shard {path} ({e}); delete {self.folder} or "
                                        "rebuild it (open_store(..., mode='rebuild'))") from e
        return self._maps[key]

    def _check_finite(self, values: np.ndarray | torch.Tensor, output: str, shard: int) -> None:
        finite = torch.isfinite(values).all() if isinstance(values, torch.Tensor) else np.isfinite(values).all()
        if not finite:
            path = self.folder / _shard_file(output, self.shards[shard]["id"])
            raise StoreCorruptError(f"feature store shard {path} holds NaN or inf; delete {self.folder} or rebuild "
                                    "it (open_store(..., mode='rebuild'))")

    def _rows(self, output: str, names: Sequence[str], dtype: torch.dtype, select: Any = None) -> torch.Tensor:
        if output not in self.outputs:
            raise FeatureStoreError(f"feature store {self.folder} holds {self.outputs}, not {output!r}")
        names = list(names)
        unknown = self.missing(names)
        if unknown:
            raise UnknownImageError(f"{len(unknown)} image(s) not in feature store {self.folder} "
                                    f"({len(self.names)} images), e.g. {unknown[:5]}")
        trailing = self.token_shape if output == "tokens" else self.embed_shape
        if select is not None:  # e.g. slice(0, 1): the class token only, read without touching the other rows
            trailing = np.empty((1, *trailing), dtype=np.uint8)[:, select].shape[1:]
        out = torch.empty((len(names), *trailing), dtype=dtype)
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for i, n in enumerate(names):
            si, row = self.index[n]
            by_shard.setdefault(si, []).append((i, row))
        for si, pairs in by_shard.items():
            where, rows = zip(*pairs)
            order = np.argsort(rows, kind="stable")  # ascending rows: sequential reads of the mapped file
            rows_sorted = np.asarray(rows)[order]
            mapped = self._map(output, si)
            data = mapped[rows_sorted] if select is None else mapped[rows_sorted, select]
            values = torch.from_numpy(np.ascontiguousarray(data))
            if output == "tokens":  # embeds were checked at open
                self._check_finite(values, output, si)
            out[torch.as_tensor(np.asarray(where)[order])] = values.to(dtype)
        return out

    def tokens(self, names: Sequence[str], dtype: torch.dtype = torch.float32, select: Any = None) -> torch.Tensor:
        """(B, L, D) token sequences of `names`, in that order (repeats allowed).

        Args:
            dtype: the returned tensor's dtype (float32 by default, whatever the storage dtype).
            select: an index into the token axis, e.g. slice(0, 1) for the class token only: (B, 1, D).
        Raises:
            UnknownImageError naming the names and the store; StoreCorruptError naming the shard (NaN/inf).
        """
        return self._rows("tokens", names, dtype, select)

    def embeddings(self, names: Sequence[str], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, E) or (B, V, E) stage-I embeddings of `names`, in that order (as stored: unit norm up to the storage
        dtype)."""
        return self._rows("embeds", names, dtype)

    def gallery_features(self, names: Sequence[str], *, tokens: bool = True,
                         token_dtype: torch.dtype = torch.float32) -> GalleryFeatures:
        """The `GalleryFeatures` `search.encode_gallery` would return for these names (gallery order)."""
        return GalleryFeatures(
            names=list(names),
            embeds=self.embeddings(names) if "embeds" in self.outputs else None,
            tokens=self.tokens(names, token_dtype) if tokens and "tokens" in self.outputs else None,
        )


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        manifest = paths.read_json(path, "feature store manifest")
    except ValueError as e:
        raise StoreCorruptError(f"{e}. Delete {folder} or rebuild it (open_store(..., mode='rebuild'))") from e
    if not isinstance(manifest, dict) or not {"key", "status", "shards"} <= set(manifest):
        raise StoreCorruptError(f"{path} is not a feature store manifest (needs key, status, shards); delete {folder}")
    return manifest


# ------------------------------------------------------------------------------------------------- building
@dataclass
class BuildPlan:
    """What a build must do: the folder, its key, every shard (names, in order) and the shards still to build."""

    folder: Path
    key: dict[str, Any]
    shards: list[dict[str, Any]]  # {"id": int, "names": [str, ...]}
    todo: list[int]  # ids of the shards still to build
    status: str  # what the store will be: "reused" | "built" | "resumed" | "extended" | "repaired"
    reason: str  # why anything is built ("" when nothing is)


def plan_build(key: Mapping[str, Any], names: Sequence[str], *, outputs_root: str | os.PathLike | None = None,
               mode: str = "build", shard_size: int = DEFAULT_SHARD_SIZE) -> BuildPlan:
    """Decide what to build for `names` under `key` and write the plan into the manifest (main process only).

    Args:
        mode: "build": reuse a valid store, resume an interrupted one, add names it lacks, build a missing one;
            a folder at this key's path holding another key (or a damaged complete store) is refused;
            "reuse": never encode: refuse (StoreMismatchError, with the reason) unless a complete store holds all
            `names`; "rebuild": delete the folder and build from scratch.
    """
    if mode not in MODES:
        raise ValueError(f"feature store mode must be one of {MODES}, got {mode!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    key = dict(key)
    folder = store_folder(key, outputs_root)
    names = list(dict.fromkeys(names))  # each name once, first occurrence's order
    if mode == "rebuild" and folder.exists():
        shutil.rmtree(folder)
    manifest = _read_manifest(folder)
    if manifest is not None and manifest["key"] != key:
        raise StoreMismatchError(
            f"{folder} holds a feature store of another key ({'; '.join(key_differences(manifest['key'], key))}); "
            "delete the folder or pass mode='rebuild'")
    planned = [] if manifest is None else [dict(s) for s in manifest["shards"]]
    complete = manifest is not None and manifest.get("status") == "complete"
    outputs, dtype = key["outputs"], key["dtype"]
    shapes = manifest.get("shapes") if complete else None
    # Whole shards are kept; the names of an interrupted build's unbuilt shards are planned afresh with the names
    # asked for now (so a build that failed on an image can be finished without it).
    shards, unbuilt, damaged = [], 0, []
    for s in planned:
        problem = _shard_problem(folder, s, outputs, dtype, shapes)
        if problem and complete:
            if mode == "reuse":
                raise StoreCorruptError(f"feature store {folder} is damaged: {problem}. Build it (mode='build') to "
                                        "repair that shard, or delete the folder")
            damaged.append(problem)  # its images are encoded again into new shards
            _remove_shard(folder, s, outputs)
        elif problem:
            unbuilt += 1
        else:
            shards.append(s)
    held = {n for s in shards for n in s["names"]}
    new = [n for n in names if n not in held]
    todo = []
    next_id = max((s["id"] for s in shards), default=-1) + 1
    for start in range(0, len(new), shard_size):
        shards.append({"id": next_id, "names": new[start:start + shard_size]})
        todo.append(next_id)
        next_id += 1
    if manifest is None:
        status, reason = "built", _why_missing(folder, key)
    elif damaged:
        status = "repaired"
        reason = f"{len(damaged)} damaged shard(s) encoded again: {'; '.join(damaged)}"
    elif not complete:
        status = "resumed"
        reason = f"an interrupted build: {unbuilt} of {len(planned)} shards unbuilt ({len(new)} images to encode)"
    elif new:
        status, reason = "extended", f"{len(new)} image(s) not in the store, e.g. {new[:3]}"
    else:
        status, reason = "reused", ""
    if mode == "reuse" and (todo or not complete):
        raise StoreMismatchError(f"no complete feature store for this key holding these images ({reason}); "
                                 "build it with mode='build'")
    if todo or not complete:
        paths.write_json(folder / MANIFEST_FILE, {"format": FORMAT_VERSION, "key": key, "status": "building",
                                                  "shard_size": shard_size, "shards": shards})
    return BuildPlan(folder=folder, key=key, shards=shards, todo=todo, status=status, reason=reason)


def build_lock_file(folder: Path) -> Path:
    """The lock a build of the store `folder` holds: hidden, beside the folder (a rebuild deletes the folder)."""
    return folder.with_name(f".{folder.name}.lock")


def _remove_shard(folder: Path, shard: Mapping[str, Any], outputs: Sequence[str]) -> None:
    for output in outputs:
        path = folder / _shard_file(output, shard["id"])
        for f in (path, _seal_file(path), _partial(path)):
            f.unlink(missing_ok=True)


def _why_missing(folder: Path, key: Mapping[str, Any]) -> str:
    """Why no store exists for this key: the nearest store of the same encoder name here and how its key differs."""
    siblings = []
    for other in sorted(folder.parent.glob(f"{key['encoder']}-*/{MANIFEST_FILE}")):
        try:
            manifest = _read_manifest(other.parent)
        except StoreCorruptError:
            continue
        if manifest is not None:
            siblings.append((len(key_differences(manifest["key"], key)), other.parent.name,
                             key_differences(manifest["key"], key)))
    if not siblings:
        return f"no {key['encoder']} feature store under {folder.parent}"
    _, name, diffs = min(siblings)
    return f"no feature store for this key; the nearest, {name}, differs in {'; '.join(diffs)}"


class _ImageFiles(Dataset):
    """(name, transformed image) of given names; a missing or unreadable file raises naming it and the store."""

    def __init__(self, names: Sequence[str], image_paths: Mapping[str, Path], transform: Callable, folder: Path):
        self.names, self.image_paths, self.transform, self.folder = list(names), image_paths, transform, folder

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self.names[i]
        if name not in self.image_paths:
            raise cdata.DatasetError(f"no image file known for {name!r} (building feature store {self.folder}): "
                                     "pass the split(s) or a name -> path mapping that holds it")
        try:
            image = self.transform(cdata.load_image(self.image_paths[name]))
        except cdata.DatasetError as e:
            raise cdata.DatasetError(f"{e} (image {name!r}, building feature store {self.folder})") from e
        return {"name": name, "image": image}


def image_paths(images: "Mapping[str, str | os.PathLike] | cdata.SplitData | Sequence[cdata.SplitData]"
                ) -> dict[str, Path]:
    """name -> image file, from a mapping or the galleries of one or more splits (`SplitData.image_path`).

    Raises:
        DatasetError: one name at two different files.
    """
    if isinstance(images, Mapping):
        return {str(k): Path(v) for k, v in images.items()}
    sets = [images] if isinstance(images, cdata.SplitData) else list(images)
    out: dict[str, Path] = {}
    for sd in sets:
        for name in sd.gallery:
            path = sd.image_path(name)
            if out.setdefault(name, path) != path:
                raise cdata.DatasetError(f"image {name!r} is {out[name]} in one split and {path} in "
                                         f"{cdata.split_label(sd)}")
    return out


def build_shards(plan: BuildPlan, encoder: ImageEncoder, images, *, part: int = 0, parts: int = 1,
                 batch_size: int = 32, device: torch.device | str = "cpu", num_workers: int = 0) -> list[int]:
    """Build this process's shards of the plan: the j-th shard still to build for every j % parts == part.

    Each shard is written to `<file>.partial` and renamed into place when whole (its completion record). Returns
    the ids built. With parts > 1 call it on every process (or, in a test, once per simulated part), then
    `finish_build` on the main process after a barrier.

    Args:
        images: name -> file mapping, or the split(s) whose galleries hold the names (see `image_paths`).
    """
    mine = [sid for j, sid in enumerate(plan.todo) if j % parts == part]
    if not mine:
        return []
    by_id = {s["id"]: s for s in plan.shards}
    files = image_paths(images)
    transform = transform_of(plan.key["preprocess"])
    outputs, np_dtype = plan.key["outputs"], DTYPES[plan.key["dtype"]]
    names = [n for sid in mine for n in by_id[sid]["names"]]
    # Batches never straddle two shards, so a shard's rows come from whole batches.
    batches, start = [], 0
    for sid in mine:
        n = len(by_id[sid]["names"])
        batches += [list(range(start + b, start + min(b + batch_size, n))) for b in range(0, n, batch_size)]
        start += n
    loader = DataLoader(_ImageFiles(names, files, transform, plan.folder), batch_sampler=batches,
                        num_workers=num_workers)
    # every submodule's own mode, restored after (the listed modules may nest: the whole model and its ViT)
    modes = {sub: sub.training for m in encoder.modules.values() if isinstance(m, nn.Module) for sub in m.modules()}
    for sub in modes:
        sub.eval()
    device = torch.device(device)
    label = plan.folder.name + ("" if parts == 1 else f" (part {part + 1}/{parts})")
    bar = progress_bar(total=len(names), desc=f"feature store {label}", unit="img",
                       disable=dist.is_distributed() and not dist.is_main_process())
    built: list[int] = []
    try:
        it = iter(loader)
        for sid in mine:
            shard_names = by_id[sid]["names"]
            maps: dict[str, np.ndarray] = {}
            row = 0
            while row < len(shard_names):
                batch = next(it)
                assert list(batch["name"]) == shard_names[row:row + len(batch["name"])]
                with torch.inference_mode(), torch.autocast(device.type, enabled=False):
                    got = dict(zip(("tokens", "embeds"), encoder.encode(batch["image"].to(device))))
                for output in outputs:
                    if got[output] is None:
                        raise FeatureStoreError(
                            f"encoder {encoder.name!r} returned no {output} (building {plan.folder})")
                    values = got[output].float().cpu().numpy().astype(np_dtype)
                    if not np.isfinite(values).all():
                        bad = [n for n, v in zip(batch["name"], values) if not np.isfinite(v).all()]
                        raise FeatureStoreError(
                            f"encoder {output} of {bad[:5]} are NaN/inf in {plan.key['dtype']} (building "
                            f"{plan.folder})" + ("; use dtype='float32'" if np_dtype is np.float16 else ""))
                    if output not in maps:
                        shard_bytes = len(shard_names) * values[0].nbytes
                        _check_free_space(plan.folder, shard_bytes, f"shard {_shard_file(output, sid)}")
                        maps[output] = np.lib.format.open_memmap(
                            _partial(plan.folder / _shard_file(output, sid)), mode="w+", dtype=np_dtype,
                            shape=(len(shard_names), *values.shape[1:]))
                    maps[output][row:row + len(values)] = values
                row += len(batch["name"])
                bar.update(len(batch["name"]))
            for output in outputs:
                maps[output].flush()
                del maps[output]
                final = plan.folder / _shard_file(output, sid)
                paths.publish(_partial(final), final)  # the shard's completion record
                _seal(final)
            built.append(sid)
    finally:
        bar.close()
        for sub, mode in modes.items():
            sub.training = mode
    return built


def finish_build(plan: BuildPlan) -> FeatureStore:
    """Check every shard of the plan (main process, after every part is built), write the manifest "complete" and
    remove leftover `.partial` files; returns the opened store.

    Raises:
        FeatureStoreError: a shard is still missing (a part was not built) or its rows disagree in shape.
    """
    outputs, dtype = plan.key["outputs"], plan.key["dtype"]
    shapes: dict[str, list[int]] = {}
    for s in plan.shards:
        problem = _shard_problem(plan.folder, s, outputs, dtype, shapes or None)
        if problem:
            raise FeatureStoreError(f"feature store {plan.folder} is not finished: {problem} (shard {s['id']}); "
                                    "run the build again to resume it")
        if not shapes:
            shapes = {o: list(_read_header(plan.folder / _shard_file(o, s["id"]))[0][1:]) for o in outputs}
    n = sum(len(s["names"]) for s in plan.shards)
    manifest = {"format": FORMAT_VERSION, "key": plan.key, "status": "complete", "shards": plan.shards,
                "shapes": shapes, "images": n,
                "bytes_per_image": bytes_per_image(tuple(shapes["tokens"]) if "tokens" in shapes else None,
                                                   shapes.get("embeds"), dtype)}
    paths.write_json(plan.folder / MANIFEST_FILE, manifest)
    for leftover in plan.folder.glob("*.partial"):
        leftover.unlink(missing_ok=True)
    return FeatureStore.open(plan.folder, plan.key)


def open_store(encoder: ImageEncoder, preprocess: Mapping[str, Any], names: Sequence[str], images=None, *,
               dtype: str = "float32",
               outputs_root: str | os.PathLike | None = None, mode: str = "build",
               shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = 32, device: torch.device | str = "cpu",
               num_workers: int = 0) -> FeatureStore:
    """The store of this encoder, preprocessing, outputs and dtype holding `names`: reused when valid, else built
    (resumed, extended) or refused as `mode` says. Collective under several processes (each builds its share of the
    shards; every process returns the opened store).

    Args:
        encoder: `stage1_image_encoder(model, outputs)` / `stage2_image_encoder(model)`: what is stored and which
            weights it depends on (put in eval mode while building, its mode restored after).
        preprocess: {"transform", "target_ratio", "image_size"} (`preprocessing(...)` makes it).
        names: the images needed (a superset of a store's names adds only the new ones).
        images: name -> file, or the split(s) holding them; needed only when something is built.
        dtype: "float32" | "float16" (storage; reads return the dtype asked for).
        outputs_root: the outputs root (default <repo>/outputs); the store is <outputs>/features/<name>-<hash>/.
        mode: "build" | "reuse" | "rebuild" (see `plan_build`).
        shard_size: images per shard file; batch_size, device, num_workers: of the encoding.
    Returns:
        the store, with `.status` ("reused" | "built" | "resumed" | "extended" | "repaired") and `.reason`.
    """
    key = store_key(encoder, preprocess, dtype)
    folder = store_folder(key, outputs_root)
    # One build of a store at a time: the main process holds `.<store>.lock` (beside the folder, which a rebuild
    # deletes) from planning to the finished manifest; another process asking for the store meanwhile waits, then
    # reuses what was built.
    building = contextlib.nullcontext()
    if dist.is_main_process():
        folder.parent.mkdir(parents=True, exist_ok=True)
        building = folder_lock(build_lock_file(folder), f"feature store {folder}", wait=progress_write)
    with building:
        plan = _plan_and_build(key, names, images, outputs_root=outputs_root, mode=mode, shard_size=shard_size,
                               batch_size=batch_size, device=device, num_workers=num_workers, encoder=encoder)
    store = FeatureStore.open(plan.folder, key)
    store.status, store.reason = plan.status, plan.reason
    return store


def _plan_and_build(key, names, images, *, outputs_root, mode, shard_size, batch_size, device, num_workers,
                    encoder) -> BuildPlan:
    """`open_store`'s collective part: the main process plans, every process builds its shards, the main process
    finishes the build."""
    plan_or_error: BuildPlan | str
    if dist.is_main_process():
        try:
            plan_or_error = plan_build(key, names, outputs_root=outputs_root, mode=mode, shard_size=shard_size)
        except FeatureStoreError as e:
            if not dist.is_distributed():
                raise
            plan_or_error = f"{type(e).__name__}: {e}"
    else:
        plan_or_error = ""
    plan_or_error = dist.broadcast_object(plan_or_error)
    if isinstance(plan_or_error, str):  # every process raises the main process's refusal
        raise FeatureStoreError(plan_or_error)
    plan = plan_or_error
    if plan.status != "reused":  # something to build, or an interrupted build whose shards are all whole: finish it
        if plan.todo and images is None:
            raise FeatureStoreError(f"feature store {plan.folder} must be built ({plan.reason}) but no images were "
                                    "given: pass the split(s) or a name -> path mapping")
        if dist.is_main_process():
            progress_write(f"feature store {plan.folder.name}: {plan.status} ({plan.reason})")
        build_shards(plan, encoder, images, part=dist.rank(), parts=dist.world_size(), batch_size=batch_size,
                     device=device, num_workers=num_workers)
        dist.barrier()
        if dist.is_main_process():
            finish_build(plan)
        dist.barrier()
    return plan
