"""Every way weights get into a model: BLIP pre-training files, the original code's checkpoints, and our own format.

- `load_blip_pretrained`: BLIP `{'model': state_dict}` (e.g. `model_base.pth`) into stage I or stage II, with the
  original's position-embedding interpolation and the re-ranker's own key names (the dual stream's key duplication).
- `load_original_checkpoint`: the original's `{'epoch', 'BLIP_Retrieval' | 'BLIP_NLVR', 'optimizer_state_dict'}`.
- `save_pretrained` / `from_pretrained`: `model.safetensors` + `config.json` (+ tokenizer files); `from_pretrained`
  also takes a Hub reference `hf:<repo id>[@revision]`, fetched through the standard Hub cache (`hub_snapshot`).

Pickles are only ever opened with `torch.load(..., weights_only=True)`. Every refusal raises `CheckpointError`
naming the file, what it holds, the offending keys with their shapes, and what to do; a file that cannot be read at
all (truncated download, interrupted copy) says so instead of torch's or safetensors' bare message, and tensors that
hold NaN or Inf are refused on load, naming the first such key.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cirlib.models.config import ModelConfig
from cirlib.models.first_stage import FirstStage, first_stage_class
from cirlib.models.reranker_dual import dual_stream_state_dict  # noqa: F401  (public here since before re-rankers)
from cirlib.models.stage1 import Stage1Model
from cirlib.registry import RegistryError
from cirlib.models.vit import interpolate_pos_embed

if TYPE_CHECKING:
    from cirlib.models.stage2 import Stage2Model

HUB_PREFIX = "hf:"  # a model on the Hugging Face Hub: hf:<org>/<name>[@revision]
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STAGE_KEYS = {1: "BLIP_Retrieval", 2: "BLIP_NLVR"}  # the original's state-dict key per stage (class names)
BERT_INIT_STD = 0.02  # BERT's initializer_range, used for the freshly created stage-II weights
_LIST_LIMIT = 10  # keys shown per list in error messages

# Keys of a BLIP pre-training file that neither stage uses: ITM head, momentum encoders, queues, captioning decoder.
_PRETRAIN_UNUSED = re.compile(
    r"^(itm_head\.|visual_encoder_m\.|text_encoder_m\.|vision_proj_m\.|text_proj_m\.|text_decoder\."
    r"|image_queue$|text_queue$|idx_queue$|ptr_queue$|queue_ptr$)"
)
# ... and those that stage II does not use either (the stage-I heads).
_STAGE1_ONLY = re.compile(r"^(temp$|vision_proj\.|text_proj\.)")
_POSITION_IDS = re.compile(r"(^|\.)embeddings\.position_ids$")
_POS_EMBED = "visual_encoder.pos_embed"
# What to do about a file that cannot be read, by who made it.
FETCH_AGAIN = "the file is damaged or incomplete (an interrupted download or copy?): download or copy it again"
RERUN_STEP = ("the model folder is damaged or incomplete: delete the folder and re-run the step that wrote it "
              "(training writes <run>/model and <run>/checkpoints/*)")


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit the model; the message says what the file holds."""


@dataclass(frozen=True)
class LoadReport:
    """What a non-strict load did, key by key."""

    loaded: tuple[str, ...]  # model keys filled from the file
    ignored: tuple[str, ...]  # file keys the model does not use
    initialised: tuple[str, ...]  # model keys absent from the file, freshly initialised
    interpolated: tuple[str, ...]  # model keys resized on the way in (pos_embed)


# ----------------------------------------------------------------------------------------------------- reading files


def read_checkpoint(path: str | os.PathLike, remedy: str = FETCH_AGAIN) -> Any:
    """Open a torch pickle safely (tensors and plain containers only) on the CPU.

    Args:
        path: the file.
        remedy: what the message tells the user to do when the file cannot be read (default: fetch it again).
    Raises:
        CheckpointError: missing file, unreadable (truncated, corrupted) file, or a pickle that would need arbitrary
            code to load; the message names the file.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder, not a checkpoint file (folders written by save_pretrained load with from_pretrained)"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not a refused class: bytes that are no pickle (damaged file)
            raise CheckpointError(
                f"cannot read {path} as a torch checkpoint ({_first_line(err)}): {remedy}") from err
        first = _first_line(err)
        raise CheckpointError(
            f"refusing to load {path}: it is an unsafe pickle, i.e. it holds objects other than tensors and plain "
            f"containers, and unpickling it could run arbitrary code (torch.load(weights_only=True) said: {first}). "
            "If you trust its origin, open it once yourself with torch.load(path, weights_only=False) and re-save "
            "only the tensors, e.g. torch.save({'model': ckpt['model']}, new_path), then load new_path."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        # e.g. torch's "PytorchStreamReader failed reading zip archive" (inline_container.cc) for a truncated file
        raise CheckpointError(
            f"cannot read {path} as a torch checkpoint ({_first_line(err)}): {remedy}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else f"{type(err).__name__}, no message"


def describe_checkpoint(obj: Any) -> str:
    """One phrase saying what a loaded checkpoint object is (for error messages)."""
    if isinstance(obj, Mapping):
        for stage, key in STAGE_KEYS.items():
            if key in obj and isinstance(obj[key], Mapping):
                epoch = obj.get("epoch", "?")
                kind = "stage-I" if stage == 1 else "stage-II"
                geometry = describe_state_dict(obj[key])
                return f"a {kind} checkpoint of the original code ({key}, epoch {epoch}; {geometry})"
        if "model" in obj and isinstance(obj["model"], Mapping):
            return f"a BLIP pre-trained checkpoint ({{'model': state_dict}}; {describe_state_dict(obj['model'])})"
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return f"a bare state dict ({describe_state_dict(obj)})"
        return f"a dict with keys {_show(sorted(map(str, obj)))}"
    return f"a {type(obj).__name__}, not a dict"


def describe_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    """Geometry of a BLIP-style state dict: ViT width/tokens/depth, text width/layers/vocab, stream layout."""
    parts = []
    if "visual_encoder.pos_embed" in sd:
        pe = sd["visual_encoder.pos_embed"]
        depth = _count_indices(sd, r"^visual_encoder\.blocks\.(\d+)\.")
        parts.append(f"ViT width {pe.shape[-1]}, {pe.shape[1]} tokens, {depth} blocks")
    word = sd.get("text_encoder.embeddings.word_embeddings.weight")
    if word is not None:
        layers = _count_indices(sd, r"^text_encoder\.encoder\.layer\.(\d+)\.")
        dual = any(".self0." in k for k in sd)
        parts.append(
            f"text hidden {word.shape[1]}, {layers} layers, vocab {word.shape[0]}"
            + (", dual-stream (self0/self1) re-ranker" if dual else "")
        )
    return "; ".join(parts) if parts else f"{len(sd)} tensors"


def describe_model(model: nn.Module) -> str:
    """Stage and geometry of one of our models (for error messages)."""
    cfg: ModelConfig = model.config
    stage = _stage_of(model)
    kind = "stage-I model" if stage == 1 else f"stage-II model ({cfg.reranker} re-ranker)"
    return (
        f"{kind}: ViT width {cfg.vision.width}, {cfg.vision.num_tokens} tokens, {cfg.vision.depth} blocks; "
        f"text hidden {cfg.text.hidden_size}, {cfg.text.num_layers} layers, vocab {cfg.text.vocab_size}"
    )


# ------------------------------------------------------------------------------------------------ BLIP pre-training


def load_blip_pretrained(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Initialise stage I or stage II from a BLIP pre-training file `{'model': state_dict}` (e.g. model_base.pth).

    The ViT position embedding is interpolated to the model's grid. Stage II's keys are renamed by its re-ranker's
    `blip_pretrained_keys` (the dual stream: the original's key duplication); the keys its `blip_fresh_keys` names
    (merge layers, 2-way head, the joint re-ranker's type embeddings) are freshly initialised: normal(0, 0.02)
    weights and zero biases, PyTorch's default init for `cls_head`. Keys neither stage uses
    (ITM head, momentum encoders, queues, text decoder; stage-I heads for stage II) are reported as ignored.

    Args:
        model: a Stage1Model or Stage2Model.
        path: the BLIP file.
    Returns:
        LoadReport of loaded / ignored / initialised / interpolated keys.
    Raises:
        CheckpointError: not a BLIP pre-training file, missing keys, unknown keys, or shape mismatches.
    """
    path = Path(path)
    obj = read_checkpoint(path)
    if callable(own := getattr(model, "load_pretrained", None)):  # a first stage with its own pre-training format
        return own(obj, source=f"{path} ({describe_checkpoint(obj)})")
    if not (isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping)):
        hint = ""
        if isinstance(obj, Mapping) and any(k in obj for k in STAGE_KEYS.values()):
            hint = " Use load_original_checkpoint for the original code's checkpoints."
        raise CheckpointError(
            f"{path} is {describe_checkpoint(obj)}; a BLIP pre-trained checkpoint is a dict {{'model': state_dict}}."
            + hint
        )
    sd = dict(obj["model"])
    stage = _stage_of(model)
    model_sd = model.state_dict()
    ignored: list[str] = []

    interpolated: list[str] = []
    # Only the token count is resized; a width mismatch is left for the shape check to report.
    if (_POS_EMBED in sd and _POS_EMBED in model_sd and sd[_POS_EMBED].dim() == 3
            and sd[_POS_EMBED].shape[1] != model_sd[_POS_EMBED].shape[1]
            and sd[_POS_EMBED].shape[2] == model_sd[_POS_EMBED].shape[2]):
        try:
            sd[_POS_EMBED] = interpolate_pos_embed(sd[_POS_EMBED], model_sd[_POS_EMBED].shape[1])
        except ValueError as err:
            raise CheckpointError(f"{path}: cannot interpolate {_POS_EMBED}: {err}") from err
        interpolated.append(_POS_EMBED)

    if stage == 2:  # the re-ranker's own names for BLIP's keys (the dual stream duplicates its attention keys)
        sd = type(model).blip_pretrained_keys(sd)

    unused = _PRETRAIN_UNUSED if stage == 1 else re.compile(f"{_PRETRAIN_UNUSED.pattern}|{_STAGE1_ONLY.pattern}")
    for key in list(sd):
        if key not in model_sd and unused.match(key):
            ignored.append(key)
            del sd[key]
    report = load_checked(
        model, sd, source=f"{path} ({describe_checkpoint(obj)})",
        may_be_fresh=_fresh_keys_of(model) if stage == 2 else (lambda k: False),
    )
    _init_fresh(model, report.initialised)
    return LoadReport(
        loaded=report.loaded,
        ignored=tuple(ignored) + report.ignored,
        initialised=report.initialised,
        interpolated=tuple(interpolated),
    )


def _fresh_keys_of(model: nn.Module) -> Callable[[str], bool]:
    """Which stage-II keys may start fresh when BLIP pre-training lacks them: the re-ranker's `blip_fresh_keys`
    (the 2-way head, the dual stream's merge layers, the joint re-ranker's type embeddings, ...)."""
    pattern = re.compile(type(model).blip_fresh_keys)
    return lambda key: bool(pattern.search(key))


# ------------------------------------------------------------------------------------ the original code's checkpoints


def load_original_checkpoint(model: nn.Module, path: str | os.PathLike, contents: Any = None) -> int:
    """Load the original code's `{'epoch', 'BLIP_Retrieval' | 'BLIP_NLVR', 'optimizer_state_dict'}` strictly.

    Args:
        model: Stage1Model (expects BLIP_Retrieval) or Stage2Model (expects BLIP_NLVR).
        path: the checkpoint file (e.g. saved_models/blip_mean.pt).
        contents: the file as `read_checkpoint(path)` returned it, when the caller has read it already.
    Returns:
        The checkpoint's epoch.
    Raises:
        CheckpointError: wrong stage, wrong size, missing or unexpected keys.
    """
    path = Path(path)
    obj = read_checkpoint(path) if contents is None else contents
    if callable(own := getattr(model, "load_original", None)):  # a first stage with its own checkpoint format
        return own(obj, source=f"{path} ({describe_checkpoint(obj)})")
    stage = _stage_of(model)
    want = STAGE_KEYS[stage]
    what = describe_checkpoint(obj)
    if not (isinstance(obj, Mapping) and want in obj and isinstance(obj[want], Mapping)):
        other = STAGE_KEYS[3 - stage]
        if isinstance(obj, Mapping) and other in obj:
            raise CheckpointError(
                f"{path} is {what}; stage {'I' if stage == 1 else 'II'} expects {want}. Load it into "
                f"{'Stage2Model' if stage == 1 else 'Stage1Model'} instead."
            )
        is_pretrain = isinstance(obj, Mapping) and "model" in obj
        hint = " Use load_blip_pretrained for BLIP pre-training files." if is_pretrain else ""
        raise CheckpointError(f"{path} is {what}; expected a dict with key {want!r} (and 'epoch').{hint}")
    epoch = obj.get("epoch")
    if not isinstance(epoch, int):
        raise CheckpointError(f"{path}: 'epoch' should be an int, found {epoch!r}")
    load_checked(model, dict(obj[want]), source=f"{path} ({what})", may_be_fresh=lambda k: False)
    return epoch


# ------------------------------------------------------------------------------------------------------- own format


def save_pretrained(model: nn.Module, directory: str | os.PathLike, tokenizer: Any | None = None) -> Path:
    """Write `model.safetensors` and `config.json` (ModelConfig + {"stage": 1|2}), plus the tokenizer if given.

    The files are written straight into `directory`. A crash can leave it half written, so callers write into a
    temporary folder that replaces the final one only when complete (the one implementation of that is in
    `cirlib.paths`, which models may not import):

        with paths.atomic_dir(run_dir / "model") as tmp:
            save_pretrained(model, tmp, tokenizer=tok)

    Args:
        model: Stage1Model or Stage2Model.
        directory: created if needed.
        tokenizer: anything with `save(directory)` (a `cirlib.data.tokenizer.CIRTokenizer`).
    Returns:
        The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stage = _stage_of(model)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share storage; give each key its own copy in that case.
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            value = value.clone()
        seen.add(ptr)
        tensors[key] = value
    config = {**model.config.to_dict(), "stage": stage}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "stage": str(stage)})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def parse_hub_reference(text: str) -> tuple[str, str | None] | None:
    """("org/name", revision or None) of `hf:org/name[@revision]`; None for anything else (a folder, a run name).

    Raises:
        CheckpointError: an `hf:` reference whose repo id is not `<org>/<name>`.
    """
    if not str(text).startswith(HUB_PREFIX):
        return None
    repo_id, _, revision = str(text)[len(HUB_PREFIX):].partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise CheckpointError(f"{text!r}: a Hub reference is hf:<org>/<name>[@revision], e.g. hf:me/cirr-stage2")
    return repo_id, revision or None


def hub_snapshot(reference: str) -> tuple[Path, dict[str, Any]]:
    """The local folder of a Hub model `hf:<repo id>[@revision]` and where it came from.

    Files come through `huggingface_hub.snapshot_download` and its cache ($HF_HOME/hub): with HF_HUB_OFFLINE=1 only
    from that cache. Returns (snapshot folder, {"repo_id", "revision", "commit"}).

    Raises:
        CheckpointError: not a Hub reference, or the repo cannot be fetched (offline and not cached, unknown repo or
            revision, no network); the message says which and what to do.
    """
    parsed = parse_hub_reference(reference)
    if parsed is None:
        raise CheckpointError(f"{reference!r} is not a Hub reference (hf:<org>/<name>[@revision])")
    repo_id, revision = parsed
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision))
    except LocalEntryNotFoundError as err:
        raise CheckpointError(
            f"cannot fetch {reference}: it is not in the Hub cache and the Hub cannot be reached (offline: "
            "HF_HUB_OFFLINE=1, or no network); download it once online, or give an exported folder") from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot fetch {reference} from the Hub ({_first_line(err)})") from err
    return folder, {"repo_id": repo_id, "revision": revision or "main", "commit": folder.name}


def model_folder(source: str | os.PathLike) -> Path:
    """The local folder of a model source: a folder as given, or the Hub cache's snapshot of `hf:<repo id>`."""
    return hub_snapshot(str(source))[0] if parse_hub_reference(str(source)) else Path(source)


def from_pretrained(source: str | os.PathLike) -> "Stage1Model | Stage2Model":
    """Rebuild a model written by `save_pretrained` (in eval mode, on the CPU): a folder (a run's model/, an exported
    folder) or a Hub reference `hf:<repo id>[@revision]` (through the Hub cache).

    Raises:
        CheckpointError: missing, unreadable or malformed files, weights that do not fit the stored config, or
            weights that hold NaN/Inf; the message names the file and says what to do.
    """
    directory = model_folder(source)
    cfg_path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for f in (cfg_path, weights):
        if not f.is_file():
            raise CheckpointError(f"{f} not found: {directory} is not a folder written by save_pretrained")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({err}): {RERUN_STEP}") from err
    if not isinstance(raw, dict) or raw.get("stage") not in (1, 2):
        raise CheckpointError(
            f"{cfg_path}: expected a JSON object with \"stage\": 1 or 2, found {raw!r:.200}: {RERUN_STEP}")
    stage = raw.pop("stage")
    try:
        config = ModelConfig.from_dict(raw)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{cfg_path}: not a valid ModelConfig ({err}): {RERUN_STEP}") from err
    if stage == 1:
        model: nn.Module = _first_stage_class(config.first_stage, cfg_path)(config)
    else:
        from cirlib.models.stage2 import Stage2Model

        model = Stage2Model(config)
    sd = read_safetensors(weights, remedy=RERUN_STEP)
    load_checked(model, sd, source=str(weights), may_be_fresh=lambda k: False)
    return model.eval()


def load_as(cls: type, source: str | os.PathLike) -> Any:
    """`from_pretrained(source)`, refused (CheckpointError naming the source) unless the model is a `cls`."""
    model = from_pretrained(source)
    if not isinstance(model, cls):
        raise CheckpointError(f"{source} holds a {describe_model(model)}, not a {cls.__name__}")
    return model


def read_safetensors(path: str | os.PathLike, remedy: str = RERUN_STEP) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU; an unreadable (truncated, corrupted) file raises CheckpointError
    naming it and saying what to do (`remedy`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path} as safetensors ({_first_line(err)}): {remedy}") from err


def check_finite(sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict whose floating-point tensors hold NaN or Inf, naming `source` and the first bad key.

    A diverged training run saves such weights without complaint; loading them would only show up later as NaN
    scores (or as a retrieval that ranks at random), far from the file that caused it.
    """
    for key, value in sd.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            n_nan = int(torch.isnan(value).sum())
            n_inf = int(torch.isinf(value).sum())
            raise CheckpointError(
                f"{source}: tensor {key} {tuple(value.shape)} holds {n_nan} NaN and {n_inf} Inf value(s); the "
                "weights are broken (a diverged run, or a damaged file): use an earlier checkpoint, or re-run the "
                "step that wrote them with a lower learning rate")


# --------------------------------------------------------------------------------------------------------- internals


def _first_stage_class(name: str, cfg_path: Path) -> type:
    try:
        return first_stage_class(name)
    except RegistryError as err:
        raise CheckpointError(f"{cfg_path}: first_stage {name!r} is not registered ({err})") from err


def _stage_of(model: nn.Module) -> int:
    if isinstance(model, FirstStage):
        return 1
    from cirlib.models.stage2 import Stage2Model

    if isinstance(model, Stage2Model):
        return 2
    raise TypeError(f"expected a Stage1Model or Stage2Model, got {type(model).__name__}")


@dataclass(frozen=True)
class _Checked:
    loaded: tuple[str, ...]
    ignored: tuple[str, ...]
    initialised: tuple[str, ...]


def load_checked(
    model: nn.Module, sd: dict[str, torch.Tensor], *, source: str, may_be_fresh: Callable[[str], bool]
) -> _Checked:
    """Load `sd` into `model`: every model key must come from `sd` (or be allowed fresh), every `sd` key must be used.

    Position ids of BERT embeddings are a persistent buffer in the original (transformers 4.25) but not always in
    ours: when the model has no such key, the file's must equal arange and is dropped; when the file has none, the
    model keeps its own arange.
    """
    model_sd = model.state_dict()
    ignored: list[str] = []
    for key in [k for k in sd if _POSITION_IDS.search(k) and k not in model_sd]:
        value = sd.pop(key)
        expected = torch.arange(value.shape[-1]).expand_as(value)
        if not torch.equal(value.to(torch.long), expected):
            raise CheckpointError(
                f"{source}: {key} is not arange({value.shape[-1]}); custom position ids are not supported")
        ignored.append(key)

    missing = [k for k in model_sd if k not in sd and not _POSITION_IDS.search(k)]
    unexpected = [k for k in sd if k not in model_sd]
    mismatched = [k for k in model_sd if k in sd and tuple(sd[k].shape) != tuple(model_sd[k].shape)]
    fresh = [k for k in missing if may_be_fresh(k)]
    missing = [k for k in missing if not may_be_fresh(k)]
    if mismatched or missing or unexpected:
        lines = [f"{source} does not fit the {describe_model(model)}:"]
        if mismatched:
            first = f", first {_LIST_LIMIT}" if len(mismatched) > _LIST_LIMIT else ""
            lines.append(f"  {len(mismatched)} shape mismatch(es){first}:")
            lines += [f"    {k}: file {tuple(sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
                      for k in mismatched[:_LIST_LIMIT]]
        if missing:
            lines.append(f"  {len(missing)} missing key(s) (in the model, not in the file): {_show(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s) (in the file, not in the model): {_show(unexpected)}")
        raise CheckpointError("\n".join(lines))
    check_finite(sd, source)
    result = model.load_state_dict(sd, strict=False)
    # Everything was checked above; this guards against a model whose state_dict and load_state_dict disagree.
    if result.unexpected_keys or {k for k in result.missing_keys if not _POSITION_IDS.search(k)} - set(fresh):
        raise CheckpointError(f"{source}: load_state_dict disagreed with the key check: {result}")
    return _Checked(loaded=tuple(sd), ignored=tuple(ignored), initialised=tuple(fresh))


def _init_fresh(model: nn.Module, keys: tuple[str, ...]) -> None:
    """BERT init for new stage-II weights (normal 0.02, zero bias); PyTorch's default Linear init for cls_head."""
    params = dict(model.named_parameters())
    reset: set[str] = set()
    with torch.no_grad():
        for key in keys:
            owner_name = key.rsplit(".", 1)[0]
            if key.startswith("cls_head."):
                owner = model.get_submodule(owner_name)
                if hasattr(owner, "reset_parameters"):
                    if owner_name not in reset:  # weight and bias together, once per layer
                        owner.reset_parameters()
                        reset.add(owner_name)
                    continue
            if key not in params:
                raise CheckpointError(f"cannot initialise {key}: it is a buffer, not a parameter")
            if key.endswith("bias"):
                params[key].zero_()
            else:
                params[key].normal_(0.0, BERT_INIT_STD)


def _count_indices(sd: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def _show(keys: list[str]) -> str:
    if not keys:
        return "[]"
    more = f" ... and {len(keys) - _LIST_LIMIT} more" if len(keys) > _LIST_LIMIT else ""
    return "[" + ", ".join(keys[:_LIST_LIMIT]) + "]" + more
