"""Notebook 00: what a split holds (counts) and what a few of its triplets look like after preprocessing."""
from __future__ import annotations

import random
import textwrap

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from cirlib import data as cdata
from cirlib import paths
from cirlib.data.check import CheckReport, check_dataset
from cirlib.workbook.config import DataConfig

SMOKE_EXAMPLES = 2  # triplets drawn when cfg.smoke


def load(cfg: DataConfig, *, apply_missing_images: bool = False) -> cdata.SplitData:
    """The split a DataConfig names (its category for FashionIQ, none for CIRR).

    Args:
        apply_missing_images: apply `cfg.missing_images` as the pipeline does: "error" raises one error listing every
            missing image of the split, "drop" leaves out the queries and gallery images whose files are missing.
    """
    root = paths.data_root(cfg.data_root or None)
    category = cfg.category if cdata.get_dataset(cfg.dataset).categories else None
    sd = cdata.load_split(cfg.dataset, root, cfg.split, category)
    if not apply_missing_images:
        return sd
    if cdata.check_missing_images_policy(cfg.missing_images) == "error":
        cdata.raise_if_missing([sd])
        return sd
    return cdata.drop_missing(sd)


def check_download(cfg: DataConfig) -> CheckReport | None:
    """Check the whole dataset folder (every split's annotation files and images) and print the report, as
    `python -m cirlib.data check` does; None when `cfg.check_images` is off.

    The full list of problems goes to outputs/data_check/<dataset>_image_problems.tsv (the report names it).
    """
    if not cfg.check_images:
        print("check_images=False: the download is not checked (python -m cirlib.data check does it)")
        return None
    report = check_dataset(cfg.dataset, paths.data_root(cfg.data_root or None))
    print(report.text())
    return report


def split_summary(cfg: DataConfig) -> pd.DataFrame:
    """Counts of one split: queries, gallery, distinct references/targets, and gallery images missing on disk.

    Args:
        cfg: the data configuration (dataset, data_root, split, category).
    """
    sd = load(cfg)
    targets = [q.target for q in sd.queries if q.target is not None]
    rows = {
        "dataset": sd.dataset,
        "split": sd.split,
        "category": sd.category or "-",
        "root": str(sd.root),
        "queries": len(sd.queries),
        "gallery images": len(sd.gallery),
        "distinct reference images": len({q.reference for q in sd.queries}),
        "distinct target images": len(set(targets)) if targets else "- (no targets on this split)",
        "captions per query": len(sd.queries[0].captions) if sd.queries else 0,
        # stats every gallery file: catches a half-copied image folder before a long run does
        "gallery images missing on disk": len(sd.missing_images()),
    }
    if cdata.check_missing_images_policy(cfg.missing_images) == "drop":
        dropped = cdata.drop_missing(sd).dropped
        rows["queries dropped (missing_images=\"drop\")"] = 0 if dropped is None else len(dropped.queries)
    return pd.DataFrame({"value": pd.Series(rows, dtype=object)})


def _to_display(image: torch.Tensor) -> np.ndarray:
    """(3, S, S) normalised tensor -> (S, S, 3) float image in [0, 1] (undo the CLIP normalisation)."""
    mean = torch.tensor(cdata.CLIP_MEAN)[:, None, None]
    std = torch.tensor(cdata.CLIP_STD)[:, None, None]
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _others(q: cdata.Query) -> list[str]:
    return [m for m in (q.members or ()) if m not in (q.reference, q.target)]


def show_triplets(cfg: DataConfig) -> Figure:
    """A grid of `n_examples` random queries: reference (with its text), target, and for CIRR the other img_set members.

    Images are shown as the model sees them (TargetPad, resize to `image_size`, centre crop).

    Args:
        cfg: the data configuration; `seed` picks the queries.
    """
    sd = load(cfg, apply_missing_images=True)  # "error": every missing image listed; "drop": kept queries only
    if not sd.queries:
        raise cdata.DatasetError(f"{sd.dataset} {sd.split} has no queries to show (root {sd.root})")
    n = min(cfg.n_examples, len(sd.queries), SMOKE_EXAMPLES if cfg.smoke else cfg.n_examples)
    if n < 1:
        raise ValueError(f"n_examples must be >= 1, got {cfg.n_examples}")
    rng = random.Random(cfg.seed)
    chosen = sorted(rng.sample(range(len(sd.queries)), n))
    transform = cdata.targetpad_transform(1.25, cfg.image_size)
    # CIRR rows: reference, target, then the img_set members that are neither (4, or 5 on test1 without a target)
    cols = 2 + max(len(_others(sd.queries[qi])) for qi in chosen)
    fig = Figure(figsize=(2.2 * cols, 2.6 * n), layout="constrained")
    axes = np.asarray(fig.subplots(n, cols, squeeze=False))
    for row, qi in enumerate(chosen):
        q = sd.queries[qi]
        text = cdata.query_text(q, sd.dataset, sd.split, random.Random(f"{cfg.seed}:{qi}"))
        cells = [("reference", q.reference), ("target", q.target)] + [("set member", m) for m in _others(q)]
        for col in range(cols):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(cells) or cells[col][1] is None:
                ax.set_title("no target (test split)" if col == 1 else "", fontsize=8)
                ax.axis("off")
                continue
            role, name = cells[col]
            ax.imshow(_to_display(transform(cdata.load_image(sd.image_path(name)))))
            ax.set_title(f"{role}\n{name}", fontsize=7)
            if role == "target":
                for side in ax.spines.values():  # the answer, outlined
                    side.set_edgecolor("green")
                    side.set_linewidth(3)
        axes[row, 0].set_ylabel("\n".join(textwrap.wrap(f"#{q.index}: {text!r}", 28)), fontsize=7)
    label = f"{sd.dataset} {sd.split}" + (f" {sd.category}" if sd.category else "")
    fig.suptitle(f"{label}: {n} of {len(sd.queries)} queries", fontsize=9)
    return fig
