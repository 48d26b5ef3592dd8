"""A toy dataset defined outside cirlib: the FashionIQ layout with one category of its own ("skirt").

Registered by importing this file, which `CIRLIB_PLUGINS=tests/plugins/toy_dataset.py` does the first time a
registry is asked for the name "toyfashion" (see `cirlib.registry`). The whole dataset is the class below: the
reader, query text, metrics and refusals are FashionIQ's, the category and the public release are its own.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from cirlib.data import DATASETS, synth
from cirlib.data.fashioniq import FashionIQ

SOURCE_CATEGORY = "dress"  # the synthetic FashionIQ category whose files become the toy's "skirt"


@DATASETS.register
class ToyFashion(FashionIQ):
    """FashionIQ's layout and rules with the single category "skirt" (captions/cap.skirt.<split>.json, ...)."""

    name = "toyfashion"
    title = "ToyFashion"
    categories = ("skirt",)
    train_order = ("skirt",)
    public_sha256 = {}  # no public release to compare with
    public_counts = {}

    @staticmethod
    def write_synthetic_world(root: Path, *, n_train: int, n_val: int, seed: int = 0) -> Path:
        """A synthetic world of this layout at `root`: a FashionIQ world whose dress files are renamed to skirt
        (the other categories' annotation files removed). n_train / n_val: queries of the skirt category."""
        categories = len(synth.FIQ_CATEGORIES)
        synth.generate(synth.SynthConfig(layout="fashioniq", n_train=n_train * categories, n_val=n_val * categories,
                                         n_test=categories, seed=seed), root=root)
        for folder, stem in (("captions", "cap"), ("image_splits", "split")):
            for path in sorted((root / folder).glob(f"{stem}.*.json")):
                category = path.name.split(".")[1]
                if category == SOURCE_CATEGORY:
                    shutil.move(path, path.with_name(path.name.replace(f".{category}.", ".skirt.")))
                else:
                    path.unlink()
        return root
