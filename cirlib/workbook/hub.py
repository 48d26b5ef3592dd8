"""Publish a trained model: Hub-ready folders with checkable model cards (`python -m cirlib.hub`).

- `export_run`: a finished run folder (stage I, or stage II evaluated with notebook 04) -> a folder that
  `huggingface_hub` uploads as it is: `config.json`, `model.safetensors`, the tokenizer files, `cirlib.json` (stage,
  training config without local paths, evaluation, weights sha256, provenance), a stage-II model's validation top-k
  files and its stage I (`stage1/`), and `README.md`, a model card whose YAML metadata (`library_name: cirlib`, tags,
  datasets, `model-index`) holds the validation results of the run's metrics.json under their protocol.
- `export_original`: the original's released checkpoint (BLIP_Retrieval / BLIP_NLVR) -> the same model files and a
  card without results.
- `verify`: evaluate an exported folder or `hf:<repo id>` on the validation split under its card's protocol and
  compare with the card's numbers.
- `push`: upload a folder with `huggingface_hub`.

Loading an exported folder or `hf:<repo id>` wherever a run is named is `workbook.published.resolve_run`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from cirlib import data as cdata
from cirlib import paths
from cirlib.data.tokenizer import build_tokenizer
from cirlib.models import factory, loading
from cirlib.models.config import ModelConfig
from cirlib.models.stage1 import Stage1Model
from cirlib.models.stage2 import Stage2Model
from cirlib.retrieval.topk import TopK
from cirlib.run_folder import RunFolder, RunFolderError, file_sha256
from cirlib.workbook import published, steps
from cirlib.workbook.config import EvaluateConfig, Stage1Config, identity
from cirlib.workbook.evaluation import EVAL_SPLIT, evaluate_stage1, step_sets
from cirlib.workbook.factories import device, load_stage1_run, stage1_for, stage1_preset

TOLERANCE = 0.01  # percentage points a re-evaluated metric may differ from the card's (float summation order)
PROTOCOL_KEYS = ("stage", "k", "fusion_weight", "scoring", "max_val_queries")  # what verify re-evaluates with
TASK = ("image-retrieval", "Composed image retrieval")


class HubError(RuntimeError):
    """A run that cannot be exported, a card that cannot be read, or an upload that cannot happen."""


# ------------------------------------------------------------------------------------------------------ export
def export_run(run: RunFolder, out: str | os.PathLike, repo_id: str = "") -> Path:
    """Write the Hub folder of a finished run at `out` (replaced atomically when it exists).

    Args:
        run: a stage-I run (trained, with its metrics.json) or a stage-II run evaluated with notebook 04.
        out: the folder to write.
        repo_id: the Hub repo the card's instructions name ("" = a placeholder).
    """
    if not run.completion_file.is_file() or not run.evaluation_file.is_file():
        raise HubError(f"{run.stage} run {run.path} is not finished and evaluated (no {run.completion_file.name} or "
                       f"{run.evaluation_file.name}): run notebook {'01' if run.stage == 'stage1' else '03 and 04'}")
    evaluation = paths.read_json(run.evaluation_file, "evaluation record")
    with paths.atomic_dir(out) as tmp:
        info = _export_model_files(run, tmp, evaluation)
        if run.stage == "stage2":
            info = {**info, **_export_stage2_inputs(run, tmp, evaluation)}
        paths.write_json(tmp / published.EXPORT_FILE, info)
        paths.atomic_write_text(tmp / published.CARD_FILE, model_card(info, repo_id).content)
    return Path(out)


def _export_model_files(run: RunFolder, tmp: Path, evaluation: dict[str, Any]) -> dict[str, Any]:
    """Copy model/ into `tmp`; the export record of the run (cirlib.json) without stage-II inputs."""
    for name in published.MODEL_FILES:
        if (run.model_dir / name).is_file():
            shutil.copyfile(run.model_dir / name, tmp / name)  # copies: an export shares no file with its run
    stage = 1 if run.stage == "stage1" else 2
    metrics = evaluation["final"] if stage == 1 else evaluation["stage2"]
    settings = evaluation.get("produced_by", {}).get("settings", {})
    counts = evaluation.get("query_counts", {}).get(EVAL_SPLIT, {})
    config = run.saved_config()
    protocol = {"stage": stage, "split": evaluation.get("split", EVAL_SPLIT),
                "k": evaluation.get("k"), "fusion_weight": evaluation.get("fusion_weight"),
                "scoring": evaluation.get("scoring"), "max_val_queries": settings.get("max_val_queries",
                                                                                     config.get("max_val_queries", 0)),
                "gallery": counts.get("gallery"), "queries": counts.get("evaluated"),
                "dropped_queries": counts.get("dropped", 0),
                "reference_removed": cdata.get_dataset(config["dataset"]).excludes_reference}
    return {"format": published.FORMAT, "stage": stage, "run": run.name,
            "run_config": _public(config), "dataset": config["dataset"], "categories": _categories(config),
            "metrics": metrics, "protocol": protocol, "weights_sha256": file_sha256(tmp / loading.WEIGHTS_FILE),
            "provenance": evaluation.get("provenance")}


def _categories(config: dict[str, Any]) -> str:
    """The categories a run used, comma-separated ("" for a dataset without categories, e.g. CIRR)."""
    ds = cdata.get_dataset(config["dataset"])
    return ",".join(c for c in ds.split_categories(config.get("categories", "")) if c)


def _public(config: dict[str, Any]) -> dict[str, Any]:
    """A training config without this machine's paths (`published.LOCAL_FIELDS` left empty)."""
    return {**config, **{f: "" for f in published.LOCAL_FIELDS if f in config}}


def _export_stage2_inputs(run: RunFolder, tmp: Path, evaluation: dict[str, Any]) -> dict[str, Any]:
    """A stage-II export's validation top-k files (named as in a stage-I run) and its stage I (`stage1/`)."""
    trained = steps.stage2_run_config(run, str(run.outputs))
    topks = []
    for path, digest in evaluation["produced_by"]["topk_sha256"].items():
        if file_sha256(path) != digest:
            raise HubError(f"{path} changed since {run.evaluation_file} was written: evaluate the run again")
        tk = TopK.load(path)
        name = RunFolder.at(tmp).topk_file(tk.split, tk.category).name
        shutil.copyfile(Path(path), tmp / name)
        topks.append(name)
    stage1, tok = stage1_for(trained)
    s1_dir = tmp / published.STAGE1_DIR
    loading.save_pretrained(stage1, s1_dir, tokenizer=tok)
    if trained.stage1_checkpoint:  # the original's stage I: a run config of its own settings
        s1_config = identity(Stage1Config(stage1_run="original", dataset=trained.dataset,
                                          categories=trained.categories, preset=stage1_preset(trained),
                                          target_ratio=trained.target_ratio, epochs=0))
        s1_name = Path(trained.stage1_checkpoint).name
    else:
        s1_config, s1_name = trained.stage1_folder.saved_config(), trained.stage1_folder.name
    s1_info = {"format": published.FORMAT, "stage": 1, "run": s1_name, "run_config": _public(s1_config),
               "dataset": trained.dataset, "weights_sha256": file_sha256(s1_dir / loading.WEIGHTS_FILE)}
    paths.write_json(s1_dir / published.EXPORT_FILE, s1_info)
    return {"topk_files": topks, "stage1": {"run": s1_name, "weights_sha256": s1_info["weights_sha256"],
                                            "metrics": evaluation.get("stage1")}}


def export_original(checkpoint: str | os.PathLike, out: str | os.PathLike, *, config: ModelConfig,
                    tokenizer: str | os.PathLike | None = None, preset: str = "", repo_id: str = "") -> Path:
    """Write the Hub folder of an original released checkpoint (stage I: BLIP_Retrieval, stage II: BLIP_NLVR, read
    into the re-ranker `config.reranker` names); its card has no results (the checkpoint carries none).

    Args:
        config: the architecture (`original_config` of a preset name, or any ModelConfig).
        tokenizer: vocab.txt or a bert-base-uncased folder, saved beside the weights (None: no tokenizer files).
        preset: the preset's name, for the card.
    """
    checkpoint = Path(checkpoint)
    obj = loading.read_checkpoint(checkpoint)
    stage = 2 if isinstance(obj, dict) and loading.STAGE_KEYS[2] in obj else 1
    model = Stage1Model(config) if stage == 1 else Stage2Model(config)
    epoch = loading.load_original_checkpoint(model, checkpoint, obj)
    with paths.atomic_dir(out) as tmp:
        loading.save_pretrained(model, tmp, tokenizer=build_tokenizer(Path(tokenizer)) if tokenizer else None)
        info = {"format": published.FORMAT, "stage": stage, "run": None, "run_config": None, "metrics": {},
                "original": {"file": checkpoint.name, "sha256": file_sha256(checkpoint), "epoch": epoch,
                             "preset": preset or "custom"},
                "weights_sha256": file_sha256(tmp / loading.WEIGHTS_FILE), "provenance": None}
        paths.write_json(tmp / published.EXPORT_FILE, info)
        paths.atomic_write_text(tmp / published.CARD_FILE, model_card(info, repo_id).content)
    return Path(out)


def original_config(preset: str, tokenizer: str | os.PathLike, reranker: str = "dual") -> ModelConfig:
    """The architecture of an original checkpoint: a preset sized to the tokenizer's vocabulary, or (a .json file)
    the ModelConfig fields a `config.json` written by `save_pretrained` holds."""
    if preset.endswith(".json"):
        raw = paths.read_json(Path(preset), "model config")
        return ModelConfig.from_dict({k: v for k, v in raw.items() if k != "stage"})
    return factory.model_config(preset, build_tokenizer(Path(tokenizer)).vocab_size, reranker=reranker)


# ------------------------------------------------------------------------------------------------------ the card
def model_card(info: dict[str, Any], repo_id: str = "") -> ModelCard:
    """The model card of an export record: Hub metadata (model-index from its metrics) and how to use it."""
    stage = info["stage"]
    dataset = info.get("dataset")
    results = [EvalResult(task_type=TASK[0], task_name=TASK[1], dataset_type=dataset, dataset_name=dataset,
                          dataset_split=info["protocol"]["split"], dataset_config=info.get("categories") or None,
                          dataset_args={k: v for k, v in info["protocol"].items() if v is not None},
                          metric_type=name, metric_name=name, metric_value=value)
               for name, value in info["metrics"].items()]
    name = info.get("run") or (info.get("original") or {}).get("file", "model")
    data = ModelCardData(
        library_name="cirlib", model_name=name, datasets=[dataset] if dataset else None,
        tags=["composed-image-retrieval", "image-retrieval", "blip", f"stage{stage}",
              *([info["run_config"]["reranker"] + "-reranker"] if stage == 2 and info.get("run_config") else [])],
        eval_results=results or None,
        cirlib={"stage": stage, "weights_sha256": info["weights_sha256"],
                **({"protocol": info["protocol"]} if "protocol" in info else {})})
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + _card_text(info, repo_id or "<repo id>"))


def _card_text(info: dict[str, Any], repo_id: str) -> str:
    stage = info["stage"]
    what = "stage I (fused BLIP retriever)" if stage == 1 else "stage II (re-ranker of stage I's top K)"
    lines = [f"# {info.get('run') or 'original checkpoint'}: cirlib {what}", "",
             "Composed image retrieval, from *Candidate Set Re-ranking for Composed Image Retrieval with Dual "
             "Multi-modal Encoder* (Liu et al., TMLR 2024), as re-implemented by cirlib.", "",
             "## Load", "", "```python",
             f"from cirlib.models.{'first_stage import FirstStage' if stage == 1 else 'stage2 import Stage2Model'}",
             f"model = {'FirstStage' if stage == 1 else 'Stage2Model'}.from_pretrained(\"hf:{repo_id}\")", "```", "",
             f"In a notebook, a YAML file or a command line, `{'stage1_run' if stage == 1 else 'stage2_run'}: "
             f"hf:{repo_id}` (`--stage{stage} hf:{repo_id}`) uses it as a finished run.", ""]
    if info.get("metrics"):
        p = info["protocol"]
        lines += ["## Evaluate", "", "```bash", f"python -m cirlib.hub verify hf:{repo_id} --data-root /path/to/"
                  f"{info['dataset']}", "```", "",
                  f"re-evaluates it on the {info['dataset']} {p['split']} split under the protocol below and compares "
                  f"with these numbers (tolerance {TOLERANCE} points).", "",
                  f"Protocol: K = {p['k']}, gallery {p['gallery']} images, {p['queries']} queries "
                  f"({p['dropped_queries']} dropped), reference removed from its ranking: {p['reference_removed']}, "
                  f"fusion weight {p['fusion_weight']}, scoring {p['scoring']}.", "",
                  "| metric | value |", "|---|---|", *[f"| {k} | {v:.2f} |" for k, v in info["metrics"].items()], ""]
    if stage == 2 and info.get("stage1"):
        lines += [f"The validation top-k files ({', '.join(info['topk_files'])}) were made by stage I "
                  f"`{info['stage1']['run']}` (in `stage1/`, sha256 {info['stage1']['weights_sha256']}).", ""]
    if info.get("original"):
        lines += [f"Converted from the original's released checkpoint `{info['original']['file']}` (sha256 "
                  f"{info['original']['sha256']}, epoch {info['original']['epoch']}, preset "
                  f"{info['original']['preset']}).", ""]
    lines += ["## Weights and provenance", "", f"`model.safetensors` sha256: `{info['weights_sha256']}`", "",
              "```json", json.dumps(info.get("provenance"), indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)


def card_results(card: ModelCard) -> dict[str, float]:
    """metric -> value of a card's model-index."""
    return {r.metric_type: float(r.metric_value) for r in (card.data.eval_results or [])}


# ------------------------------------------------------------------------------------------------------ verify
@dataclass(frozen=True)
class Verification:
    """A card's numbers against a fresh evaluation: rows (metric, card, measured), and what differs."""

    rows: list[tuple[str, float, float | None]]
    weights_problem: str | None
    tolerance: float

    @property
    def differing(self) -> list[str]:
        return [m for m, card, got in self.rows if got is None or abs(card - got) > self.tolerance]

    @property
    def ok(self) -> bool:
        return not self.differing and self.weights_problem is None

    def lines(self) -> list[str]:
        out = [f"{m:>12}: card {card:8.3f}  measured " + ("missing" if got is None else f"{got:8.3f}") +
               ("" if m not in self.differing else "  DIFFERS") for m, card, got in self.rows]
        if self.weights_problem:
            out.append(self.weights_problem)
        verdict = "OK" if self.ok else f"FAILED: {', '.join(self.differing) or 'weights'} differ"
        return out + [f"{verdict} (tolerance {self.tolerance} points)"]


def verify(source: str, data_root: str | os.PathLike, *, tolerance: float = TOLERANCE) -> Verification:
    """Evaluate an exported folder or `hf:<repo id>` on its card's split and protocol; compare with the card."""
    folder = loading.model_folder(source)
    card = ModelCard.load(folder / published.CARD_FILE)
    expected = card_results(card)
    protocol = (card.data.to_dict().get("cirlib") or {}).get("protocol")
    if not expected or not protocol:
        raise HubError(f"{folder / published.CARD_FILE}: no model-index results or cirlib protocol to verify")
    info = published.read_export(folder)
    got_sha = file_sha256(folder / loading.WEIGHTS_FILE)
    problem = None if got_sha == card.data.to_dict()["cirlib"]["weights_sha256"] else (
        f"model.safetensors sha256 {got_sha} is not the card's {card.data.to_dict()['cirlib']['weights_sha256']}")
    with tempfile.TemporaryDirectory(prefix="cirlib-verify-") as outputs:
        stage = published.STAGE_NAMES[info["stage"]]
        ref = source if loading.parse_hub_reference(source) else str(folder.resolve())
        run = published.resolve_run(stage, ref, outputs, data_root=str(Path(data_root).resolve()))
        measured = _evaluate(run, protocol, outputs)
    rows = [(m, v, measured.get(m)) for m, v in expected.items()]
    return Verification(rows, problem, tolerance)


def _evaluate(run: RunFolder, protocol: dict[str, Any], outputs: str) -> dict[str, float]:
    if run.stage == "stage2":
        cfg = EvaluateConfig(stage2_run=run.name, k=protocol["k"], fusion_weight=protocol["fusion_weight"],
                             scoring=protocol["scoring"], max_val_queries=protocol.get("max_val_queries", 0),
                             outputs=outputs)
        return steps.evaluate(cfg).stage2
    trained = run.saved_config()
    sets = step_sets("verify", trained["dataset"], Path(trained["data_root"]), trained["categories"],
                     {EVAL_SPLIT: protocol.get("max_val_queries", 0)}, trained["missing_images"], run)[EVAL_SPLIT]
    model, tok = load_stage1_run(run)
    dev = device()
    metrics, _ = evaluate_stage1(model.to(dev).eval(), tok, sets, image_size=model.config.vision.image_size,
                                 target_ratio=trained["target_ratio"], dev=dev, search=trained.get("search", "exact"))
    return metrics


# ------------------------------------------------------------------------------------------------------ push
def push(folder: str | os.PathLike, repo_id: str) -> str:
    """Upload `folder` to the Hub model repo `repo_id` (created when missing); returns the commit's URL.

    Raises:
        HubError: one line when offline (HF_HUB_OFFLINE=1), without a token, or when the Hub refuses.
    """
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if constants.HF_HUB_OFFLINE:
        raise HubError(f"cannot push to {repo_id}: HF_HUB_OFFLINE=1 (no network); unset it and log in "
                       "(hf auth login) to upload")
    if get_token() is None:
        raise HubError(f"cannot push to {repo_id}: no Hugging Face token (hf auth login, or set HF_TOKEN)")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        return str(api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model").commit_url)
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HubError(f"cannot push to {repo_id}: {first}") from err
