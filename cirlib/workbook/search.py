"""Search any folder of images with both stages (notebook 08, `python -m cirlib.search`).

- `index_folder`: build or update the gallery index of a folder (`retrieval.gallery_index`) with a trained stage I:
  our run (name under <outputs>/stage1/, or a run folder's path) or the original's released checkpoint file.
- `rank`: for a batch of (reference, text) queries, stage I over the whole index (the query = stage I's fusion of
  the reference image and the text, as the pipeline's `encode_queries`), then stage II re-ranking each query's top
  K (as the pipeline's `rerank`: z_t for the dual re-ranker, the reference's tokens for the joint one, the stage-II
  run's own scoring path). The candidates' stage-II ViT tokens are computed on demand for the K candidates, or read
  from (and added to) a feature store inside the index folder (`stage2_tokens="store"`).
- `SearchUI`: the notebook's widgets (upload or pick a reference, type the text, set K, press search).

A reference that is a name in the index, or a file at the same resolved path as an indexed one, is "in the gallery"
and excluded from its own results by default (CIRR-style; `exclude_reference=False` keeps it). Any other file or
PIL image is simply the query's reference.
"""
from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import PIL.Image
import torch

from cirlib import data as cdata
from cirlib import plots, provenance
from cirlib.data.tokenizer import build_tokenizer
from cirlib.models import factory, loading
from cirlib.models.first_stage import FirstStage
from cirlib.progress import progress_bar
from cirlib.retrieval import feature_store as fs
from cirlib.retrieval.rerank import build_rerank_query
from cirlib.retrieval.gallery_index import (IMAGE_SUFFIXES, GalleryIndex, GalleryIndexError, IndexMismatchError,
                                            IndexReport, build_index, list_images)
from cirlib.retrieval.topk import TopK
from cirlib.run_folder import RunFolder, RunFolderError
from cirlib.workbook.config import SearchConfig
from cirlib.workbook.published import resolve_run
from cirlib.workbook.steps import stage2_run_config
from cirlib.workbook.factories import abs_path, device as default_device, load_stage1_run, load_stages

ORIGINAL_TARGET_RATIO = 1.25  # the original's TargetPad threshold, for its released checkpoints
STAGE2_TOKENS = ("ondemand", "store")
SEARCH_SPLIT = "search"  # the `TopK.split` of a gallery index's ranked list (it has no dataset)


# ------------------------------------------------------------------------------------------------------ models
@dataclass
class Stage1Source:
    """A stage I ready to embed: the model (eval mode), its tokenizer and preprocessing, and what it is."""

    model: FirstStage
    tokenizer: Any
    preprocess: dict[str, Any]
    record: dict[str, Any]  # {"run": folder} | {"checkpoint": file, "preset": ..., "tokenizer": ...}
    weights_file: Path
    preset: str | None = None


@dataclass
class Stage2Source:
    """A stage-II run ready to re-rank: its model, the stage I giving z_t (dual re-ranker) and the tokenizer, its
    preprocessing and scoring path."""

    model: Any
    stage1: FirstStage
    tokenizer: Any
    preprocess: dict[str, Any]
    scoring: str
    max_pairs: int
    run: RunFolder


_MODELS: dict[tuple, Any] = {}  # loaded models, keyed by what was loaded and its weights file's (size, mtime)


def _cached(key: tuple, weights: Path, load):
    st = weights.stat()
    full = (*key, st.st_size, st.st_mtime_ns)
    if full not in _MODELS:
        for old in [k for k in _MODELS if k[:len(key)] == key]:
            del _MODELS[old]
        _MODELS[full] = load()
    return _MODELS[full]


def run_folder(stage: str, run: str, outputs: str) -> RunFolder:
    """A run given by name (under <outputs>/<stage>/), by its folder's path (relative = from the repository), as an
    exported folder or as `hf:<repo id>` (`published.resolve_run`)."""
    return resolve_run(stage, run, outputs or None)


def load_stage1(stage1: str | Mapping[str, Any], *, outputs: str = "", preset: str = "blip-base",
                tokenizer: str = "", target_ratio: float | None = None) -> Stage1Source:
    """The stage I a setting names: a stage-I run (name or folder) or an original checkpoint file (.pt/.pth).

    Args:
        stage1: the run name / folder / checkpoint file, or an index's record ({"run": ...} | {"checkpoint": ...}).
        preset, tokenizer: for an original checkpoint only (its architecture and vocab.txt / bert-base-uncased
            folder); a run brings both.
        target_ratio: TargetPad threshold; None = the run's (1.25 for a checkpoint, the original's).
    """
    if isinstance(stage1, Mapping):
        if "checkpoint" in stage1:
            return load_stage1(stage1["checkpoint"], preset=stage1.get("preset", preset),
                               tokenizer=stage1.get("tokenizer", tokenizer),
                               target_ratio=stage1.get("target_ratio", target_ratio))
        if "run" not in stage1:
            raise GalleryIndexError(f"the index records no stage I it can reload ({dict(stage1)}): pass stage1=")
        return load_stage1(stage1["run"], target_ratio=target_ratio)
    path = abs_path(stage1)
    if path.is_file():  # an original released checkpoint, read into the preset's first stage (BLIP_Retrieval; SPRC's)
        if not tokenizer:
            raise ValueError(f"stage I {path} is a checkpoint file: give the tokenizer too (tokenizer= / --tokenizer: "
                             "a vocab.txt or a local bert-base-uncased folder)")
        tok = build_tokenizer(abs_path(tokenizer))

        def load() -> FirstStage:
            model = factory.build_stage1(preset, tok.vocab_size)
            loading.load_original_checkpoint(model, path)
            return model.eval()

        model = _cached(("checkpoint", str(path), preset), path, load)
        ratio = ORIGINAL_TARGET_RATIO if target_ratio is None else target_ratio
        return Stage1Source(model, tok, fs.preprocessing(ratio, model.config.vision.image_size),
                            {"checkpoint": str(path), "preset": preset, "tokenizer": str(abs_path(tokenizer)),
                             "target_ratio": ratio}, path, preset)
    run = run_folder("stage1", stage1, outputs)
    if not run.path.is_dir():
        raise RunFolderError(f"no stage-I run {stage1!r} at {run.path} (nor a checkpoint file at {path}): train one "
                             "with notebook 01, or give a run folder or an original checkpoint file")
    model, tok = _cached(("run1", str(run.path)), run.weights_file if run.weights_file.exists() else run.path,
                         lambda: load_stage1_run(run))
    model.eval()
    saved = run.saved_config()
    ratio = saved["target_ratio"] if target_ratio is None else target_ratio
    return Stage1Source(model, tok, fs.preprocessing(ratio, model.config.vision.image_size),
                        {"run": str(run.path)}, run.weights_file, saved.get("preset"))


def load_stage2(stage2: str, *, outputs: str = "") -> Stage2Source:
    """A finished stage-II run (name under <outputs>/stage2/ or its folder), with the stage I and tokenizer it was
    trained with (z_t) and its preprocessing and scoring (the demo's joint re-ranker with joint_difference needs
    "pairs", which its config holds)."""
    run = run_folder("stage2", stage2, outputs)
    trained = stage2_run_config(run, str(run.outputs))

    def load():
        s1, tok, model = load_stages(trained, run)
        return model.eval(), s1.eval(), tok

    model, s1, tok = _cached(("run2", str(run.path)), run.weights_file if run.weights_file.exists() else run.path,
                             load)
    return Stage2Source(model, s1, tok, fs.preprocessing(trained.target_ratio, model.config.vision.image_size),
                        trained.scoring, trained.max_pairs, run)


# ------------------------------------------------------------------------------------------------------ index
def index_folder(image_dir: str, stage1: str, out: str, *, files: Mapping[str, Path] | None = None,
                 batch_size: int = 32, device: torch.device | str | None = None, outputs: str = "",
                 preset: str = "blip-base", tokenizer: str = "", target_ratio: float | None = None,
                 replace: bool = True) -> IndexReport:
    """Build or update the gallery index of `image_dir` at `out` with stage I `stage1` (see `load_stage1`).

    Args:
        image_dir: the folder (relative = from the repository); every jpg/jpeg/png/webp under it, recursively.
        files: name -> file instead of listing the folder (a subset, another naming).
        replace: the index was built with another stage I: True rebuilds it, False refuses (IndexMismatchError).
    """
    folder = abs_path(image_dir)
    files = list_images(folder) if files is None else dict(files)
    if not files:
        raise GalleryIndexError(f"no images to index under {folder} (looked for {', '.join(IMAGE_SUFFIXES)} files, "
                                "recursively): check the folder")
    s1 = load_stage1(stage1, outputs=outputs, preset=preset, tokenizer=tokenizer, target_ratio=target_ratio)
    dev = torch.device(device) if device is not None else default_device()
    s1.model.to(dev)
    made_by = provenance.record(
        "search_index", {"image_dir": str(folder), "stage1": s1.record, "preprocess": s1.preprocess,
                         "batch_size": batch_size}, weights={"stage1": s1.weights_file}, device=dev,
        precision="fp32", preset=s1.preset,
        outputs=outputs or None, images=len(files))
    return build_index(files, s1.model, preprocess=s1.preprocess, out_dir=abs_path(out), batch_size=batch_size,
                       device=dev, provenance=made_by, stage1=s1.record, replace=replace)


def open_index(index: str | GalleryIndex) -> GalleryIndex:
    """An opened index (a folder path, relative = from the repository)."""
    return index if isinstance(index, GalleryIndex) else GalleryIndex.open(abs_path(str(index)))


# ------------------------------------------------------------------------------------------------------ queries
@dataclass(frozen=True)
class Hit:
    name: str
    path: str
    stage1_score: float
    stage2_score: float | None = None


@dataclass
class QueryResult:
    """One query's results, best first: stage I's top `top` and stage II's re-ranking of the top K (first `top`).

    A display view of one row of the search's ranked list, a `TopK` (`from_topk`): its order, scores and stage-II
    re-ranking (`TopK.reranked`) are the TopK's, never computed here.
    """

    reference: str  # the reference as given (a name, a file, or "<image>")
    text: str
    reference_in_index: str | None  # its name in the index when it is one of the indexed files
    reference_excluded: bool  # whether that name was kept out of the results
    stage1: list[Hit]
    stage2: list[Hit] | None
    candidates: list[Hit]  # the K stage-I candidates in stage-I order, with stage-II scores when re-ranked
    k: int

    @classmethod
    def from_topk(cls, ranked: TopK | None, reranked: TopK | None, row: int, idx: GalleryIndex, *, reference: str,
                  text: str, reference_in_index: str | None, reference_excluded: bool, top: int,
                  stage2: bool) -> "QueryResult":
        """Row `row` of the search's ranked list (`ranked`, stage-I order; None when it holds no candidate) and of
        its stage-II re-ranking (`reranked`, None without stage II)."""
        cands = _hits(ranked, row, idx)
        second = _hits(reranked, row, idx)[:top] if stage2 else None
        return cls(reference=reference, text=text, reference_in_index=reference_in_index,
                   reference_excluded=reference_excluded, stage1=cands[:top], stage2=second, candidates=cands,
                   k=len(cands))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> pd.DataFrame:
        """Side-by-side: stage I's top names and scores, stage II's re-ranked names and scores."""
        out = pd.DataFrame({"stage I": [h.name for h in self.stage1],
                            "stage-I score": [round(h.stage1_score, 4) for h in self.stage1]})
        if self.stage2 is not None:
            n = len(out)
            out["stage II"] = [h.name for h in self.stage2][:n]
            out["stage-II score"] = [round(h.stage2_score, 4) for h in self.stage2][:n]
        out.index = pd.RangeIndex(1, len(out) + 1, name="rank")
        return out


def _reference_images(idx: GalleryIndex, references: Sequence[str | Path | PIL.Image.Image]
                      ) -> list[tuple[PIL.Image.Image, str | None, str]]:
    """(image, name in the index or None, label) per reference."""
    out = []
    for ref in references:
        if isinstance(ref, PIL.Image.Image):
            out.append((ref.convert("RGB"), None, "<image>"))
            continue
        text = str(ref)
        if not isinstance(ref, Path) and text in idx:
            out.append((cdata.load_image(idx.path(text)), text, text))
            continue
        path = abs_path(text)
        if not path.is_file():
            raise FileNotFoundError(f"reference {text!r} is neither a name in the index {idx.out_dir} "
                                    f"({len(idx)} images, e.g. {idx.names[:3]}) nor an image file ({path})")
        out.append((cdata.load_image(path), idx.name_of(path), text))
    return out


def _encode(encode, images: Sequence[PIL.Image.Image], transform, batch_size: int, dev) -> torch.Tensor:
    """encode(pixels (B,3,S,S)) of every image, in batches, concatenated on the CPU."""
    out = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([transform(im) for im in images[start:start + batch_size]]).to(dev)
        out.append(encode(pixels).float().cpu())
    return torch.cat(out)


def check_stage1(idx: GalleryIndex, s1: Stage1Source) -> None:
    """Refuse a stage I other than the one the index was built with (weights hash, preprocessing), saying both."""
    sha = fs.weights_sha256({"stage1": s1.model})
    if sha != idx.stage1_sha256:
        raise IndexMismatchError(
            f"gallery index {idx.out_dir} was built with stage I {idx.stage1 or '?'} (weights {idx.stage1_sha256[:12]}), "
            f"not with {s1.record} (weights {sha[:12]}): query with the index's stage I, or rebuild the index with "
            f"this one (python -m cirlib.search index IMAGE_DIR --stage1 ... --out {idx.out_dir})")
    if dict(s1.preprocess) != dict(idx.preprocess):
        raise IndexMismatchError(f"gallery index {idx.out_dir} was built with preprocessing {idx.preprocess}, this "
                                 f"stage I uses {s1.preprocess}: rebuild the index")


def rank(index: str | GalleryIndex, references: Sequence[str | Path | PIL.Image.Image], texts: Sequence[str], *,
         stage1: str | None = None, stage2: str | None = None, k: int = 50, top: int = 10,
         exclude_reference: bool = True, search: str = "exact", batch_size: int = 32,
         device: torch.device | str | None = None, fusion_weight: float = 0.0, scoring: str | None = None,
         max_pairs: int | None = None, stage2_tokens: str = "ondemand", outputs: str = "") -> list[QueryResult]:
    """Rank the index for each (reference, text) with stage I and re-rank each top K with stage II.

    Args:
        references: per query a name in the index, an image file, or a PIL image.
        stage1: the stage I (run / folder / checkpoint); None = the one the index records. Must be the index's
            (weights hash checked: IndexMismatchError otherwise).
        stage2: a stage-II run (name or folder) or None (stage I only).
        k: stage-I candidates re-ranked per query; top: hits returned per stage.
        exclude_reference: keep a reference that is in the index out of its own results (CIRR-style).
        search: "exact" | "faiss" (see `GalleryIndex.search`).
        fusion_weight: stage II's order by w * z(stage I) + (1 - w) * z(stage II) (0 = stage II alone).
        scoring, max_pairs: stage II's scoring path and chunk; None = the stage-II run's own.
        stage2_tokens: "ondemand" (encode each query's K candidates) | "store" (a tokens store in the index
            folder, extended with the candidates it lacks, reused by later queries).
    """
    if len(references) != len(texts):
        raise ValueError(f"{len(references)} references for {len(texts)} texts")
    if stage2_tokens not in STAGE2_TOKENS:
        raise ValueError(f"stage2_tokens must be one of {STAGE2_TOKENS}, got {stage2_tokens!r}")
    idx = open_index(index)
    s1 = load_stage1(stage1 if stage1 else idx.stage1, outputs=outputs)
    check_stage1(idx, s1)
    dev = torch.device(device) if device is not None else default_device()
    s1.model.to(dev).eval()
    s2 = load_stage2(stage2, outputs=outputs) if stage2 else None  # loaded (and hashed) outside inference mode
    refs = _reference_images(idx, references)
    images = [r[0] for r in refs]
    # stage I: the reference's ViT tokens fused with the text, as `encode_queries`
    t1 = fs.transform_of(s1.preprocess)
    queries = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            tokens = _encode(lambda x: s1.model.encode_image(x).tokens, images[start:start + batch_size], t1,
                             batch_size, dev)
            ids, mask = s1.model.tokenize_queries(s1.tokenizer, texts[start:start + batch_size])
            queries.append(s1.model.encode_query(tokens.to(dev), ids.to(dev), mask.to(dev)).embeds.float().cpu())
    q = torch.cat(queries) if queries else torch.empty(0, idx.embeddings.shape[-1])
    exclude = [idx.positions[name] if exclude_reference and name is not None else None for _, name, _ in refs]
    scores1, rows1 = idx.search(q, k, exclude, method=search)
    s2_scores = None
    if s2 is not None:
        s2_scores = stage2_scores(idx, s2, images, texts, rows1, dev, batch_size,
                                  scoring or s2.scoring, max_pairs or s2.max_pairs, stage2_tokens)
    ranked = ranked_list(idx, scores1, rows1, s2_scores, reference_removed=any(e is not None for e in exclude))
    reranked = ranked.reranked(fusion_weight) if ranked is not None and s2_scores is not None else None
    return [QueryResult.from_topk(ranked, reranked, i, idx, reference=label, text=texts[i], reference_in_index=name,
                                  reference_excluded=exclude[i] is not None, top=top, stage2=s2 is not None)
            for i, (_, name, label) in enumerate(refs)]


def ranked_list(idx: GalleryIndex, scores1: torch.Tensor, rows1: torch.Tensor, s2_scores: torch.Tensor | None, *,
                reference_removed: bool) -> TopK | None:
    """The search's ranked list as the benchmark's type, a `TopK` over the index (no dataset: split "search"): each
    query's candidates (index rows `rows1`) in stage-I order with their stage-I and stage-II scores; None when no
    query has a candidate (an empty index, or one image that is the excluded reference)."""
    if rows1.shape[0] == 0 or rows1.shape[1] == 0:
        return None
    names = np.asarray(idx.names, dtype=str)
    return TopK(dataset=None, split=SEARCH_SPLIT, category=None, sorted_index_names=names[rows1.numpy()],
                index_names=tuple(idx.names), scores=scores1, stage2_scores=s2_scores,
                reference_removed=reference_removed)


def _hits(ranked: TopK | None, row: int, idx: GalleryIndex) -> list[Hit]:
    """Row `row` of a ranked list as Hits (file path, stage-I score, stage-II score when it has them)."""
    if ranked is None:
        return []
    s2 = None if ranked.stage2_scores is None else ranked.stage2_scores[row].tolist()
    return [Hit(str(name), str(idx.path(str(name))), s1, None if s2 is None else s2[j])
            for j, (name, s1) in enumerate(zip(ranked.sorted_index_names[row].tolist(), ranked.scores[row].tolist()))]


def stage2_scores(idx: GalleryIndex, s2: Stage2Source, images, texts, rows1: torch.Tensor, dev, batch_size: int,
                  scoring: str, max_pairs: int, stage2_tokens: str) -> torch.Tensor:
    """(N, K) stage-II scores of each query's candidates, index rows `rows1` (N, K), with reference `images` (PIL)
    and `texts` (as `rerank`: one `Stage2Model.score` call per `batch_size` queries, over the union of their
    candidates' tokens; `stage2_tokens` "ondemand" | "store", see `rank`)."""
    model = s2.model.to(dev).eval()
    transform = fs.transform_of(s2.preprocess)
    store = None
    if stage2_tokens == "store" and rows1.numel():
        names = list(dict.fromkeys(idx.names[r] for r in rows1.flatten().tolist()))
        store = fs.open_store(fs.stage2_image_encoder(model), s2.preprocess, [idx.identity(n) for n in names],
                              {idx.identity(n): idx.path(n) for n in names}, outputs_root=idx.out_dir,
                              batch_size=batch_size, device=dev)
    zt_from_stage1 = model.zt_from_stage1_vit
    with torch.inference_mode():
        return _score_batches(idx, s2, model, images, texts, rows1, dev, batch_size, scoring, max_pairs, store,
                              transform, zt_from_stage1)


def _score_batches(idx, s2, model, images, texts, rows1, dev, batch_size, scoring, max_pairs, store, transform,
                   zt_from_stage1) -> torch.Tensor:
    encode_vit = model.encode_image
    out = []
    step = max(1, min(batch_size, 16))
    for start in progress_bar(range(0, len(images), step), desc="re-rank", unit="batch", leave=False,
                              disable=len(images) <= step):
        chunk = images[start:start + step]
        ref_tokens = _encode(encode_vit, chunk, transform, batch_size, dev).to(dev)
        if model.needs_z_t:
            s2.stage1.to(dev).eval()
        zt_ref = (_encode(lambda x: s2.stage1.encode_image(x).tokens, chunk, transform, batch_size, dev)
                  if zt_from_stage1 else None)
        query = build_rerank_query(s2.stage1, model, s2.tokenizer, texts[start:start + step], ref_tokens, zt_ref)
        rows = rows1[start:start + step]
        union = list(dict.fromkeys(rows.flatten().tolist()))
        where = {r: i for i, r in enumerate(union)}
        names = [idx.names[r] for r in union]
        if store is not None:
            cand_tokens = store.tokens([idx.identity(n) for n in names])
        else:
            cand_tokens = _encode(encode_vit, [cdata.load_image(idx.path(n)) for n in names], transform,
                                  batch_size, dev)
        index = torch.tensor([[where[r] for r in row] for row in rows.tolist()], dtype=torch.long)
        out.append(model.score(query, cand_tokens.to(dev), index.to(dev), scoring=scoring,
                               max_pairs=max_pairs).float().cpu())
    return torch.cat(out) if out else torch.empty(0, rows1.shape[1])


# ------------------------------------------------------------------------------------------------------ notebook
def ensure_index(cfg: SearchConfig) -> IndexReport:
    """Notebook 08: build the index of `cfg.image_dir` at `cfg.index`, or bring it up to date (new, removed and
    changed files; another stage I rebuilds it, saying why)."""
    return index_folder(cfg.image_dir, cfg.stage1_run, cfg.index, batch_size=cfg.batch_size, outputs=cfg.outputs)


SHOWN = 8  # candidates drawn per stage (titles stay legible at this width)


def results_figure(result: QueryResult, reference: PIL.Image.Image, shown: int = SHOWN):
    """The reference with its text, stage I's top `shown` and stage II's (when re-ranked), scores in the titles."""
    n = min(shown, len(result.stage1))
    if n == 0:
        raise ValueError("no results to show (an empty index?)")
    load = lambda h: cdata.load_image(h.path)  # noqa: E731
    first = [(f"{h.name} {h.stage1_score:.3f}", load(h)) for h in result.stage1[:n]]
    second = ([(f"{h.name} {h.stage2_score:.3f}", load(h)) for h in result.stage2[:n]]
              if result.stage2 else first)
    row = plots.QualitativeRow(reference=np.asarray(reference), text=result.text, target=None,
                               reference_name=result.reference_in_index or "reference", stage1=first, stage2=second)
    return plots.plot_qualitative_grid([row])


class SearchUI:
    """Notebook 08's search box: reference (upload or a gallery name), text, K, a search button, the results.

    The widgets are attributes (`upload`, `source`, `gallery`, `text`, `k`, `button`, `output`, `status`), `run()`
    searches with their values and draws the results into `output`; `last` is the last `QueryResult`.
    """

    def __init__(self, cfg: SearchConfig):
        import ipywidgets as W

        self.cfg = cfg
        self.index = open_index(cfg.index)
        if not len(self.index):
            raise GalleryIndexError(f"gallery index {self.index.out_dir} holds no image")
        default = cfg.reference or self.index.names[0]
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="upload reference")
        self.source = W.ToggleButtons(options=["gallery", "upload"], value="gallery", description="reference")
        self.gallery = W.Combobox(value=default, options=self.index.names[:2000], ensure_option=False,
                                  description="gallery", placeholder="a name in the index")
        self.text = W.Text(value=cfg.text, description="text", placeholder="how the target differs",
                           layout=W.Layout(width="60%"))
        self.k = W.IntSlider(value=min(cfg.k, len(self.index)), min=1, max=max(1, min(200, len(self.index))),
                             description="K", continuous_update=False)
        self.button = W.Button(description="search", button_style="primary")
        self.status = W.HTML()
        self.output = W.Output()
        self.last: QueryResult | None = None
        self._last_image: PIL.Image.Image | None = None
        self.upload.observe(self._uploaded, names="value")
        self.button.on_click(lambda _b: self.run())

    def _uploaded(self, change: Any) -> None:
        if change["new"]:
            self.source.value = "upload"

    def reference(self) -> tuple[str | PIL.Image.Image, PIL.Image.Image]:
        """(what `rank` gets, the image shown) for the chosen source."""
        if self.source.value == "upload":
            if not self.upload.value:
                raise ValueError("no image uploaded: choose a file, or switch the reference to 'gallery'")
            item = self.upload.value[-1]
            image = PIL.Image.open(io.BytesIO(bytes(item["content"]))).convert("RGB")
            return image, image
        name = self.gallery.value.strip()
        ref = name if name in self.index else str(abs_path(name))
        return ref, cdata.load_image(self.index.path(name) if name in self.index else abs_path(name))

    def search(self) -> QueryResult:
        """Search with the widgets' values (no drawing)."""
        ref, _ = self.reference()
        return rank(self.index, [ref], [self.text.value], stage2=self.cfg.stage2_run or None, k=self.k.value,
                    top=self.cfg.top, exclude_reference=self.cfg.exclude_reference, search=self.cfg.search,
                    batch_size=self.cfg.batch_size, outputs=self.cfg.outputs)[0]

    def run(self) -> QueryResult | None:
        """Search and draw the grids into `output` (errors shown there too, and re-raised)."""
        from IPython.display import display

        self.status.value = "searching..."
        try:
            result = self.search()
            _, image = self.reference()
            fig = results_figure(result, image)
        except Exception as e:  # shown in the widget, then raised for the kernel's log
            self.status.value = f"<b>error:</b> {type(e).__name__}: {e}"
            raise
        self.last, self._last_image = result, image
        where = (f"in the index as {result.reference_in_index}"
                 + (", excluded from the results" if result.reference_excluded else ", kept in the results")
                 if result.reference_in_index else "not in the index")
        self.status.value = (f"<b>{result.text!r}</b>: reference {where}; stage I over {len(self.index)} images, "
                             + (f"stage II re-ranked the top {result.k}" if result.stage2 is not None
                                else "no stage II"))
        with self.output:
            self.output.clear_output(wait=True)
            display(fig)
            display(result.table())
        return result

    def show_last(self) -> None:
        """Display the last search's grids and table as plain outputs (what an executed copy keeps, where the
        widgets' own output is not saved)."""
        from IPython.display import display

        if self.last is None:
            raise ValueError("no search yet: press search (or call run())")
        display(results_figure(self.last, self._last_image))
        display(self.last.table())

    def widget(self) -> Any:
        """The controls and the output, after one search with the defaults (so a headless run shows results)."""
        import ipywidgets as W

        self.run()
        return W.VBox([W.HBox([self.source, self.upload]), self.gallery, self.text, W.HBox([self.k, self.button]),
                       self.status, self.output])
