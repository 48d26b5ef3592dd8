"""The two stages as training tasks for the one generic loop in `cirlib.train`.

A task owns a model, says which parameters train, turns a batch into a loss and validates; the loop knows nothing of
CIR. Stage I: the in-batch contrastive loss of the original. Stage II: each query against its target, negatives from
its own stage-I top-K (the setting it is tested in) and other targets of the batch (the original's B x B objective
when there are no top-K negatives).

With several processes (`cirlib.launch` under torchrun / accelerate launch) the batch of each process is its share of
one global batch: stage I scores each query against the targets of every process (gathered with gradient), stage II
takes its in-batch negatives from the targets of every process, and with the loop's gradient averaging N processes
with batch b train exactly as one process with batch N*b.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from cirlib import data as cdata
from cirlib import distributed as dist
from cirlib.models.first_stage import gallery_similarity
from cirlib.models.stage2 import RerankQuery
from cirlib.retrieval.rerank import build_rerank_query


def _loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int) -> DataLoader:
    # A generator seeded per epoch makes the shuffle (and so a resumed run) reproducible.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator,
                      num_workers=num_workers, collate_fn=cdata.collate)


def _global_batch(gathered: torch.Tensor, b: int) -> torch.Tensor:
    # Labels and candidate rows are offset by rank * b: every process must hold a full batch (the loaders drop the
    # last incomplete one).
    if gathered.shape[0] != dist.world_size() * b:
        raise ValueError(f"processes hold batches of different sizes ({gathered.shape[0]} rows gathered, expected "
                         f"{dist.world_size()} x {b}); the training loader must use drop_last=True")
    return gathered


class _NamedTriplets(Dataset):
    """A TripletDataset's items without the images ({"reference", "target", "text"}): with a feature store the
    images' encoder outputs are read from the store by name, so no image file is opened or decoded."""

    def __init__(self, triplets: "cdata.TripletDataset"):
        self.triplets = triplets

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, i: int) -> dict:
        q = self.triplets.data.queries[i]
        return {"reference": q.reference, "target": q.target, "text": self.triplets.text(i)}


SCORING = ("shared", "pairs")


def score_lists(model, query: RerankQuery, cand_tokens: torch.Tensor, index: torch.Tensor, scoring: str) -> torch.Tensor:
    """(B, M) stage-II scores of each query against its candidates `cand_tokens[index[b]]`.

    "shared" computes each candidate's cross-attention keys/values once (the fast path at blip-base size);
    "pairs" runs one full pass per (query, candidate) pair, the original's algorithm, which has less bookkeeping and
    is faster when the image tokens are few and narrow (the tiny preset).
    """
    return model.score(query, cand_tokens, index, scoring=scoring)  # the model chooses the path (Stage2Model.score)


class _StageTask:
    """What both stage tasks share: trainable = requires_grad, validation and checkpoint selection by a metric key."""

    model: torch.nn.Module
    selection_key: str
    _validate: Callable[[], dict]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def validate(self) -> dict[str, float]:
        return self._validate()

    def selection_metric(self, metrics: dict[str, float]) -> float:
        return float(metrics[self.selection_key])


class Stage1Task(_StageTask):
    """Stage I: text encoder (and optionally the ViT) trained with in-batch cross-entropy on q . p / temp."""

    def __init__(self, model, tokenizer, train_sets: Sequence["cdata.SplitData"], transform: Callable, *,
                 batch_size: int, train_image_encoder: bool, validate_fn: Callable[[], dict], selection_key: str,
                 symmetric_loss: bool = False, seed: int = 0, num_workers: int = 0,
                 device: torch.device | str = "cpu", store=None):
        """store: a stage-I `FeatureStore` (tokens + embeds of the frozen ViT and vision_proj) holding every training
        image, or None (the original: both images decoded and encoded at every step). A first stage that
        `trains_gallery_head` (SPRC) reads only tokens from it and embeds the targets under grad.

        The texts go through `model.tokenize_queries` (the first stage's text rules)."""
        if store is not None and train_image_encoder:
            raise ValueError("a feature store holds a frozen ViT's outputs; it cannot serve train_image_encoder=True")
        self.model = model
        self.store = store
        self.symmetric_loss = symmetric_loss
        self.tokenizer = tokenizer
        self.train_image_encoder = train_image_encoder
        self.triplets = [cdata.TripletDataset(s, transform, seed=seed) for s in train_sets]
        self.dataset = ConcatDataset(self.triplets if store is None else [_NamedTriplets(t) for t in self.triplets])
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._validate = validate_fn
        self.selection_key = selection_key
        self.device = device
        for p in model.visual_encoder.parameters():
            p.requires_grad_(train_image_encoder)
        # The original never updates vision_proj (targets are embedded under no_grad); keep that unless the ViT trains
        # or the first stage's gallery head is part of what it learns (SPRC: ln_vision, Q-Former, vision_proj).
        for p in model.vision_proj.parameters():
            p.requires_grad_(train_image_encoder or model.trains_gallery_head)

    def train_mode(self) -> None:
        self.model.train()
        if not self.train_image_encoder:
            self.model.visual_encoder.eval()

    def train_loader(self, seed: int) -> DataLoader:
        for d in self.triplets:  # fresh FashionIQ caption joins each epoch, reproducibly
            d.set_epoch(seed)
        return _loader(self.dataset, self.batch_size, seed, self.num_workers)

    def _store_features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference tokens and target embeddings from the store (the frozen ViT's eval-mode outputs)."""
        ref_tokens = self.store.tokens(batch["reference"]).to(self.device)
        if self.model.trains_gallery_head:  # the gallery head trains: embed the stored target tokens under grad
            return ref_tokens, self.model.embed_tokens(self.store.tokens(batch["target"]).to(self.device))
        return ref_tokens, self.store.embeddings(batch["target"]).to(self.device)

    def _image_features(self, batch: dict, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference tokens and target embeddings, both images encoded now. Under grad when the ViT or the gallery
        head trains (a frozen ViT records no graph either way)."""
        images = torch.cat([batch["reference_image"], batch["target_image"]]).to(self.device)
        with torch.set_grad_enabled(self.train_image_encoder or self.model.trains_gallery_head):
            feats = self.model.encode_image(images)
        return feats.tokens[:b], feats.embeds[b:]

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        ids, mask = self.model.tokenize_queries(self.tokenizer, list(batch["text"]))
        ids, mask = ids.to(self.device), mask.to(self.device)
        b = ids.shape[0]
        if self.store is not None:  # the frozen ViT's eval-mode outputs, computed once per image
            ref_tokens, target_embeds = self._store_features(batch)
        else:
            ref_tokens, target_embeds = self._image_features(batch, b)
        # Several processes: each scores its own queries against the targets of ALL processes (gathered with
        # gradient), labels offset by its rank; the loop averages gradients, so N x b trains as one process with N*b.
        all_targets = _global_batch(dist.all_gather_with_grad(target_embeds), b)  # (N*b, P)
        out = self.model(ref_tokens, ids, mask, all_targets, label_offset=dist.rank() * b)
        loss = out.loss
        if self.symmetric_loss:  # also each target against every query of the batch (CLIP-style InfoNCE)
            all_queries = dist.all_gather_with_grad(out.query)
            if target_embeds.dim() == 3:  # several vectors per image: the max over them (gallery_similarity)
                logits_t = (gallery_similarity(all_queries, target_embeds) / self.model.temp).t()
            else:
                logits_t = (all_queries @ target_embeds.t() / self.model.temp).t()  # (b, N*b)
            labels = torch.arange(dist.rank() * b, dist.rank() * b + b, device=logits_t.device)
            loss = (loss + F.cross_entropy(logits_t, labels)) / 2
        parts = {f"loss_{name}": value.detach() for name, value in out.parts.items()}
        return {"loss": loss, "temp": self.model.temp.detach(), **parts}


class MinedTripletDataset(Dataset):
    """Training triplets plus negatives: drawn from the query's own CIRR img_set (the target's near-duplicates) and
    from its stage-I top-K of the train split (the candidates stage II will have to re-rank).

    Negatives exclude the target and the reference; the draw depends only on (seed, epoch seed, index), so a resumed
    run sees the same negatives. Item key "negative_images": (n_set + n_topk, 3, S, S), set negatives first.
    """

    def __init__(self, split_data: "cdata.SplitData", transform: Callable, topk_names: np.ndarray | None,
                 n_topk: int, seed: int = 0, n_set: int = 0, images: bool = True):
        """images=False: items carry names only ("reference", "target", "text", "negatives": [names]) for a task
        that reads the images' encoder outputs from a feature store; no image file is opened."""
        self.base = cdata.TripletDataset(split_data, transform, seed=seed)
        self.images = images
        self.split_data = split_data
        self.transform = transform
        self.topk_names = topk_names
        self.n_topk = n_topk
        self.n_set = n_set
        self.seed = seed
        self.epoch_seed = 0
        if n_topk > 0:
            if topk_names is None:
                raise ValueError("top-K negatives need the stage-I top-K of the train split (topk_splits must include 'train')")
            if len(topk_names) != len(split_data.queries):
                raise ValueError(f"train top-K has {len(topk_names)} rows but the train split has "
                                 f"{len(split_data.queries)} queries; re-extract it")
        if n_set > 0 and not all(q.members for q in split_data.queries):
            raise ValueError("img_set negatives need CIRR-style image sets (members) on every training query")

    @property
    def n_negatives(self) -> int:
        return self.n_set + self.n_topk

    def set_epoch_seed(self, seed: int) -> None:
        self.epoch_seed = seed
        self.base.set_epoch(seed)

    def __len__(self) -> int:
        return len(self.base)

    def _draw(self, rng: random.Random, pool: list[str], n: int) -> list[str]:
        if not pool:
            raise ValueError("no negative candidates left for a training query (gallery too small?)")
        picks = rng.sample(pool, min(n, len(pool)))
        while len(picks) < n:  # a tiny pool: repeat rather than change the batch shape
            picks.append(rng.choice(pool))
        return picks

    def __getitem__(self, i: int) -> dict:
        if self.images:
            item = self.base[i]
        else:
            q = self.split_data.queries[i]
            item = {"reference": q.reference, "target": q.target, "text": self.base.text(i)}
        if self.n_negatives > 0:
            q = self.split_data.queries[i]
            rng = random.Random(f"neg:{self.seed}:{self.epoch_seed}:{i}")
            picks: list[str] = []
            if self.n_set > 0:
                picks += self._draw(rng, [m for m in q.members if m not in (q.target, q.reference)], self.n_set)
            if self.n_topk > 0:
                pool = [n for n in self.topk_names[i] if n not in (q.target, q.reference) and n not in picks]
                picks += self._draw(rng, pool, self.n_topk)
            if not self.images:
                item["negatives"] = picks
            else:
                item["negative_images"] = torch.stack(
                    [self.transform(cdata.load_image(self.split_data.image_path(n))) for n in picks])
        return item


class Stage2Task(_StageTask):
    """Stage II: re-ranker trained with softmax cross-entropy over each query's candidate list (positive first)."""

    def __init__(self, model, stage1, tokenizer, dataset: Dataset, *, batch_size: int, hard_negatives: int,
                 inbatch_negatives: int, stage1_train_mode: bool, zt_from_stage1_vit: bool,
                 validate_fn: Callable[[], dict], selection_key: str, scoring: str = "shared",
                 num_workers: int = 0, device: torch.device | str = "cpu", store=None, zt_store=None):
        """store: a tokens `FeatureStore` of stage II's frozen ViT holding every training image (the dataset then
        yields names: `MinedTripletDataset(..., images=False)`), or None (images encoded at every step);
        zt_from_stage1_vit: z_t from stage I's ViT tokens (zt_source="stage1_vit"); only for a re-ranker that
        `needs_z_t`; zt_store: the store of stage I's ViT tokens, needed with a store when z_t comes from them."""
        if store is not None and stage1_train_mode:
            raise ValueError("a feature store holds the frozen ViT's eval-mode outputs; stage1_train_mode=True "
                             "(drop-path active, the original) needs the images encoded at every step")
        zt_from_stage1_vit = zt_from_stage1_vit and model.needs_z_t
        if store is not None and zt_from_stage1_vit and zt_store is None:
            raise ValueError("z_t from stage I's ViT with a feature store needs zt_store (stage I's ViT tokens)")
        self.model = model
        self.store = store
        self.zt_store = zt_store
        self.stage1 = stage1
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.batch_size = batch_size
        self.hard_negatives = hard_negatives
        self.inbatch_negatives = inbatch_negatives  # -1 = every other target of the (global) batch
        self.stage1_train_mode = stage1_train_mode
        self.zt_from_stage1_vit = zt_from_stage1_vit
        self.scoring = scoring
        self._validate = validate_fn
        self.selection_key = selection_key
        self.num_workers = num_workers
        self.device = device
        for p in stage1.parameters():
            p.requires_grad_(False)
        for p in model.visual_encoder.parameters():
            p.requires_grad_(False)

    def train_mode(self) -> None:
        self.model.train()
        if self.stage1_train_mode:  # the original: dropout on z_t and drop-path in the frozen ViT stay active
            self.stage1.train()
        else:
            self.stage1.eval()
            self.model.visual_encoder.eval()

    def eval_mode(self) -> None:
        self.model.eval()
        self.stage1.eval()

    def train_loader(self, seed: int) -> DataLoader:
        if hasattr(self.dataset, "set_epoch_seed"):
            self.dataset.set_epoch_seed(seed)
        return _loader(self.dataset, self.batch_size, seed, self.num_workers)

    def candidate_index(self, b: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """(b, M) rows into [targets of the global batch (world*b) ; this process's hard negatives (b*H)].

        Row i is local query i, global query g = rank*b + i: its own target g first, its own hard negatives, then the
        next `inbatch_negatives` targets of the global batch (cyclically; -1 = all others), so every row has the
        same length and every process builds the rows one process with batch world*b would build.
        """
        h, n = self.hard_negatives, world * b
        n_in = n - 1 if self.inbatch_negatives < 0 else min(self.inbatch_negatives, n - 1)
        rows = []
        for i in range(b):
            g = rank * b + i
            own = [g] + [n + i * h + j for j in range(h)]
            others = [(g + j) % n for j in range(1, n_in + 1)]
            rows.append(own + others)
        return torch.tensor(rows, dtype=torch.long)

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        texts = list(batch["text"])
        b = len(texts)
        with torch.no_grad():
            if self.store is not None:  # the frozen ViT's eval-mode tokens, computed once per image
                names = list(batch["reference"]) + list(batch["target"])
                if self.hard_negatives > 0:
                    names += [n for row in batch["negatives"] for n in row]
                tokens = self.store.tokens(names).to(self.device)  # (B + B + B*H, T, Dv)
            else:
                images = [batch["reference_image"], batch["target_image"]]
                if self.hard_negatives > 0:
                    images.append(batch["negative_images"].flatten(0, 1))
                tokens = self.model.encode_image(torch.cat(images).to(self.device))  # (B + B + B*H, T, Dv)
            ref_tokens = tokens[:b]
            # Several processes: the targets of every process are candidates (in-batch negatives of the global
            # batch); hard negatives stay with their own query. One process: [targets (B); hard negatives (B*H)].
            cand_tokens = torch.cat([_global_batch(dist.all_gather_no_grad(tokens[b:2 * b]), b), tokens[2 * b:]])
            zt_ref = None  # stage I reads the stage-II tokens for z_t, unless they come from its own ViT
            if self.zt_from_stage1_vit and self.zt_store is not None:
                zt_ref = self.zt_store.tokens(batch["reference"]).to(self.device)
            elif self.zt_from_stage1_vit:
                zt_ref = self.stage1.encode_image(batch["reference_image"].to(self.device)).tokens
            query = build_rerank_query(self.stage1, self.model, self.tokenizer, texts, ref_tokens, zt_ref)
        index = self.candidate_index(b, dist.rank(), dist.world_size()).to(self.device)
        logits = score_lists(self.model, query, cand_tokens, index, self.scoring)  # (B, M), positive at column 0
        loss = F.cross_entropy(logits, torch.zeros(b, dtype=torch.long, device=logits.device))
        return {"loss": loss}

