"""The embedded synthetic CIR world, written in the real CIRR / FashionIQ on-disk layouts.

A scene is a grid of cells (3x3 cells of 16 px in a 48-px image by default, so one ViT patch of 16 px sees one cell)
holding 2-4 objects, each a (cell, colour, shape, size) plus a little pixel jitter; a (colour, shape) pair occurs at
most once per scene, so "the red circle" always names one object. A query is a reference scene, a natural-language
edit (add, remove, recolour, replace, resize, move, or two of them) and the target scene it produces. Each query also
gets near-duplicates of its target (one attribute of one object off, usually the edited object): with reference and
target they form the CIRR-style 6-image set and act as hard negatives. No two images of a gallery share a scene
signature, so the target is the unique correct answer.

`generate(cfg)` writes the dataset root that `cirlib.data.load_split` reads unchanged, plus `vocab.txt` (a WordPiece
vocabulary covering every text the grammar can produce), `world.json` (config and counts) and the sidecars
`synth/queries.*.json` (per-query edit kind, target and near-duplicates, also for test splits) and `synth/scenes.*.json`
(per-image scene signature), for breakdowns and checks. Everything is a deterministic function of the
config: each split draws from its own seeded generator, so the val world does not change with `n_train`.

Command line: `python -m cirlib.synth --layout cirr --out DIR --train N --val N --test N --seed S`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing
import os
import random
import re
import shutil
import struct
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

from cirlib import paths
from cirlib.data.readers import CIRR_SPLITS, FIQ_CATEGORIES, FIQ_SPLITS  # the layouts this world writes

# Bump when a change to this module changes the generated files, so that `generate` does not skip a stale world.
GENERATOR_VERSION = 2

LAYOUTS = ("cirr", "fashioniq")
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (50, 210, 220),
}
SIZES = ("small", "large")
EDIT_KINDS = ("add", "remove", "recolour", "replace", "resize", "move")
ATTRIBUTES = ("cell", "colour", "shape", "size")  # what a near-duplicate changes

# Image folders and name prefixes of the real CIRR release (val images live in ./dev/ and are named dev-*).
_CIRR_FOLDER = {"train": "train", "val": "dev", "test1": "test1"}
_CIRR_SET_SIZE = 6  # the original and our reader assume 6 img_set members
_CIRR_TRAIN_SUBDIRS = 100  # NLVR2 keeps train images in ./train/0 .. ./train/99
# Pair ids are offset per split so val and test1 never collide with train and do not move when n_train changes.
_PAIRID_BASE = {"train": 0, "val": 1_000_000, "test1": 2_000_000}
_FIQ_NAME_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

_BACKGROUND_CIRR = (20, 20, 24)
# One dark background per FashionIQ category, so the three "scene families" also look different.
_BACKGROUND_FIQ = {"dress": (28, 18, 30), "shirt": (16, 26, 32), "toptee": (30, 26, 16)}

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # BERT order; [PAD] must be id 0


# --------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a synthetic world; `generate` output is a pure function of it."""

    layout: str = "cirr"  # "cirr" | "fashioniq": which real on-disk layout to write
    seed: int = 0  # root of every random draw
    n_train: int = 20_000  # training queries (FashionIQ: in total, split evenly over the 3 categories)
    n_val: int = 1_000  # validation queries (FashionIQ: in total over the categories)
    n_test: int = 1_000  # test queries (CIRR test1 / FashionIQ test; no targets written)
    image_size: int = 48  # square image side in pixels
    grid: int = 3  # cells per side; image_size / grid = 16 px matches one ViT patch
    n_near_duplicates: int = 4  # hard negatives per query; CIRR needs 4 (reference + target + 4 = 6-member set)
    min_objects: int = 2  # objects in a reference scene, at least
    max_objects: int = 4  # ... and at most (an "add" can make one more)
    jitter: int = 1  # max pixel offset of an object from its cell centre, each axis (a large one fills the cell)
    shapes: tuple[str, ...] = SHAPES[:5]  # CIRR uses all; each FashionIQ category drops one (its own family)
    colours: tuple[str, ...] = tuple(COLOURS)
    p_combo: float = 0.3  # probability that a query applies two edits (of different kinds, on different objects)
    p_near_duplicate_on_edited: float = 0.6  # chance a near-duplicate alters the edited object rather than another

    def __post_init__(self) -> None:
        # Lists (from YAML or JSON) become tuples, so configs hash and compare equal whatever their source.
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(self, "colours", tuple(self.colours))
        problems = []
        if self.layout not in LAYOUTS:
            problems.append(f"layout={self.layout!r}, expected one of {list(LAYOUTS)}")
        for name in ("n_train", "n_val", "n_test", "n_near_duplicates", "jitter"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)!r}, expected an int >= 0")
        for name in ("n_train", "n_val", "n_test"):
            if isinstance(getattr(self, name), int) and getattr(self, name) >= 1_000_000:
                problems.append(f"{name}={getattr(self, name)}, expected < 1,000,000 (pair-id ranges)")
        if self.layout == "cirr" and self.n_near_duplicates != _CIRR_SET_SIZE - 2:
            problems.append(
                f"n_near_duplicates={self.n_near_duplicates} with layout 'cirr', expected {_CIRR_SET_SIZE - 2} "
                f"(CIRR img_sets have exactly {_CIRR_SET_SIZE} members)"
            )
        if not 1 <= self.grid <= 9:
            problems.append(f"grid={self.grid}, expected 1..9")
        elif self.image_size % self.grid or self.image_size // self.grid < 8:
            problems.append(
                f"image_size={self.image_size} with grid={self.grid}, expected a multiple of grid with cells >= 8 px"
            )
        elif _radius("large", self.cell_size) + self.jitter > self.cell_size // 2 - 1:
            # The centre is pixel cell//2 of the cell's pixels 0..cell-1, and a shape covers centre +- radius.
            limit = self.cell_size // 2 - 1 - _radius("large", self.cell_size)
            problems.append(
                f"jitter={self.jitter} lets a large object ({_radius('large', self.cell_size)} px radius) leave its "
                f"{self.cell_size}-px cell; expected jitter <= {limit}"
            )
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown or len(set(self.shapes)) != len(self.shapes):
            problems.append(f"shapes={self.shapes}, expected distinct names from {list(SHAPES)}")
        unknown = [c for c in self.colours if c not in COLOURS]
        if unknown or len(set(self.colours)) != len(self.colours) or len(self.colours) < 2:
            problems.append(f"colours={self.colours}, expected >= 2 distinct names from {list(COLOURS)}")
        min_shapes = 3 if self.layout == "fashioniq" else 2  # a FashionIQ family drops one and still needs 2
        if len(self.shapes) < min_shapes:
            problems.append(f"shapes={self.shapes}: layout {self.layout!r} needs at least {min_shapes}")
        if not 1 <= self.min_objects <= self.max_objects:
            problems.append(f"min_objects={self.min_objects}, max_objects={self.max_objects}: expected 1 <= min <= max")
        # An "add" needs a free cell and an unused (colour, shape) pair; a near-duplicate may need one more cell.
        elif self.max_objects + 2 > self.grid**2 or self.max_objects + 2 > len(self.colours) * (len(self.shapes) - 1):
            problems.append(
                f"max_objects={self.max_objects} leaves no room to add or move objects on a {self.grid}x{self.grid} "
                f"grid with {len(self.colours)} colours x {len(self.shapes)} shapes"
            )
        for name in ("p_combo", "p_near_duplicate_on_edited"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)}, expected a probability in [0, 1]")
        if problems:
            raise ValueError("invalid SynthConfig: " + "; ".join(problems))

    @property
    def cell_size(self) -> int:
        """Side of one grid cell in pixels."""
        return self.image_size // self.grid

    @property
    def splits(self) -> tuple[str, ...]:
        """Split names of the layout (CIRR: train/val/test1; FashionIQ: train/val/test)."""
        return CIRR_SPLITS if self.layout == "cirr" else FIQ_SPLITS

    def split_queries(self, split: str) -> int:
        """Number of queries requested for a split name of this layout."""
        if split not in self.splits:
            raise ValueError(f"unknown {self.layout} split {split!r}; expected one of {list(self.splits)}")
        return {"train": self.n_train, "val": self.n_val}.get(split, self.n_test)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SynthConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown SynthConfig fields: {sorted(unknown)}")
        # JSON turns tuples into lists; the config must compare equal after a round trip.
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _radius(size: str, cell: int) -> int:
    # Small and large are 3 and 6 px in a 16-px cell: far enough apart to see, small enough to stay in the cell.
    return max(1, round(cell * 3 / 16)) if size == "small" else max(2, round(cell * 6 / 16))


def family_shapes(cfg: SynthConfig, category: str | None) -> tuple[str, ...]:
    """Shapes of a scene family: all of cfg.shapes for CIRR, all but the category's own one for FashionIQ."""
    if category is None:
        return cfg.shapes
    k = FIQ_CATEGORIES.index(category)
    return tuple(s for i, s in enumerate(cfg.shapes) if i != k % len(cfg.shapes))


# --------------------------------------------------------------------------------------------------------------------
# Scenes and edits


class Obj(NamedTuple):
    """One object of a scene; fields in signature order (a scene sorted by cell is canonical)."""

    cell: int  # row-major cell index, 0 .. grid*grid-1
    colour: str
    shape: str
    size: str  # "small" | "large"


Scene = tuple[Obj, ...]  # sorted by cell (one object per cell): the scene signature, jitter excluded


def scene_to_str(scene: Scene) -> str:
    """Compact text form of a scene signature, e.g. '0:red:circle:large;4:blue:square:small'."""
    return ";".join(f"{o.cell}:{o.colour}:{o.shape}:{o.size}" for o in scene)


def scene_from_str(text: str) -> Scene:
    """Parse `scene_to_str` output back into a scene."""
    objs = []
    for part in text.split(";") if text else []:
        fields = part.split(":")
        if len(fields) != 4 or not fields[0].isdigit():
            raise ValueError(f"bad scene object {part!r} in {text!r}; expected 'cell:colour:shape:size'")
        objs.append(Obj(int(fields[0]), fields[1], fields[2], fields[3]))
    return tuple(sorted(objs))


@dataclass(frozen=True)
class Edit:
    """One atomic modification: `before` becomes `after` (None on the missing side for add / remove)."""

    kind: str  # one of EDIT_KINDS
    before: Obj | None
    after: Obj | None


@dataclass(frozen=True)
class SynthQuery:
    """A generated query: scenes, edits and texts (images are rendered from the scenes with fresh jitter)."""

    kind: str  # edit kinds in EDIT_KINDS order joined by '+', e.g. "move" or "add+recolour"
    edits: tuple[Edit, ...]
    reference: Scene
    target: Scene
    near_duplicates: tuple[Scene, ...]
    caption: str  # CIRR caption: the whole edit in one sentence
    captions: tuple[str, str]  # FashionIQ: two partial descriptions (the two halves, or two phrasings of one edit)


def _apply(scene: Scene, edit: Edit) -> Scene:
    objs = [o for o in scene if o != edit.before]
    if edit.after is not None:
        objs.append(edit.after)
    return tuple(sorted(objs))


def _free_cells(scene: Scene, n_cells: int) -> list[int]:
    used = {o.cell for o in scene}
    return [c for c in range(n_cells) if c not in used]


def _free_pairs(scene: Scene, colours: Sequence[str], shapes: Sequence[str]) -> list[tuple[str, str]]:
    used = {(o.colour, o.shape) for o in scene}
    return [(c, s) for c in colours for s in shapes if (c, s) not in used]


# The sampler draws ~1M values per world; int(random() * n) is several times cheaper than `random.choice` / `randint`
# (which loop over getrandbits) and uniform up to a 2**-53 bias.
def _below(rng: random.Random, n: int) -> int:
    return int(rng.random() * n)


def _pick(rng: random.Random, seq: Sequence):
    return seq[int(rng.random() * len(seq))]


def _sample(rng: random.Random, seq: Sequence, k: int) -> list:
    """k distinct elements of seq in random order (a partial Fisher-Yates shuffle)."""
    pool = list(seq)
    for i in range(k):
        j = i + int(rng.random() * (len(pool) - i))
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


class _Sampler:
    """Draws scenes, edits and near-duplicates of one scene family from one seeded generator."""

    def __init__(self, cfg: SynthConfig, shapes: tuple[str, ...], rng: random.Random):
        self.cfg, self.shapes, self.rng = cfg, shapes, rng
        self.colours = cfg.colours
        self.n_cells = cfg.grid**2
        self.pairs = [(c, s) for c in self.colours for s in shapes]

    def scene(self) -> Scene:
        rng = self.rng
        n = self.cfg.min_objects + _below(rng, self.cfg.max_objects - self.cfg.min_objects + 1)
        cells = _sample(rng, range(self.n_cells), n)
        pairs = _sample(rng, self.pairs, n)
        return tuple(sorted(Obj(cell, c, s, _pick(rng, SIZES)) for cell, (c, s) in zip(cells, pairs)))

    def edit(self, scene: Scene, kind: str, movable: Sequence[Obj], avoid: Sequence[Obj] = ()) -> Edit | None:
        """A random edit of `kind` on one of `movable` (objects of `scene`), or None when impossible.

        An "add" never uses the (colour, shape) of an object in `avoid`, so a pair of edits never reads "remove the
        red circle and add a red circle".
        """
        rng = self.rng
        if kind == "add":
            cells = _free_cells(scene, self.n_cells)
            pairs = _free_pairs((*scene, *avoid), self.colours, self.shapes)
            if len(scene) >= self.cfg.max_objects + 1 or not cells or not pairs:
                return None
            c, s = _pick(rng, pairs)
            return Edit("add", None, Obj(_pick(rng, cells), c, s, _pick(rng, SIZES)))
        if not movable or (kind == "remove" and len(scene) < 2):  # keep at least one object in the target
            return None
        obj = _pick(rng, movable)
        if kind == "remove":
            return Edit("remove", obj, None)
        if kind == "resize":
            return Edit("resize", obj, obj._replace(size="large" if obj.size == "small" else "small"))
        if kind == "move":
            cells = _free_cells(scene, self.n_cells)
            return Edit("move", obj, obj._replace(cell=_pick(rng, cells))) if cells else None
        used = {(o.colour, o.shape) for o in scene}
        if kind == "recolour":
            options = [c for c in self.colours if c != obj.colour and (c, obj.shape) not in used]
            return Edit("recolour", obj, obj._replace(colour=_pick(rng, options))) if options else None
        if kind == "replace":
            # Half the replacements keep the colour (a pure reshape), half change shape and colour together.
            colours = [obj.colour] if rng.random() < 0.5 else [c for c in self.colours if c != obj.colour]
            options = [(c, s) for c in colours for s in self.shapes if s != obj.shape and (c, s) not in used]
            if not options:
                return None
            c, s = _pick(rng, options)
            return Edit("replace", obj, obj._replace(colour=c, shape=s))
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {list(EDIT_KINDS)}")

    def edits(self, reference: Scene) -> tuple[Edit, ...] | None:
        """One edit, or with probability p_combo two of different kinds on different objects."""
        rng = self.rng
        n = 2 if rng.random() < self.cfg.p_combo else 1
        kinds = _sample(rng, EDIT_KINDS, n)
        edits: list[Edit] = []
        scene = reference
        touched: set[Obj] = set()
        for kind in kinds:
            # The second edit acts on an object the first left alone, so both texts name it as in the reference.
            movable = [o for o in reference if o not in touched]
            e = self.edit(scene, kind, movable, avoid=tuple(touched))
            if e is None:
                return None
            edits.append(e)
            touched.update(o for o in (e.before, e.after) if o is not None)
            scene = _apply(scene, e)
        return tuple(edits)

    def near_duplicate(self, target: Scene, edited: Sequence[Obj]) -> Scene | None:
        """The target with one attribute of one object changed (an edited object with p_near_duplicate_on_edited)."""
        rng = self.rng
        pool = edited if edited and rng.random() < self.cfg.p_near_duplicate_on_edited else target
        obj = _pick(rng, pool)
        attr = _pick(rng, ATTRIBUTES)
        if attr == "size":
            new = obj._replace(size="large" if obj.size == "small" else "small")
        elif attr == "cell":
            cells = _free_cells(target, self.n_cells)
            if not cells:
                return None
            new = obj._replace(cell=_pick(rng, cells))
        else:
            used = {(o.colour, o.shape) for o in target}
            if attr == "colour":
                options = [c for c in self.colours if c != obj.colour and (c, obj.shape) not in used]
                new = obj._replace(colour=_pick(rng, options)) if options else None
            else:
                options = [s for s in self.shapes if s != obj.shape and (obj.colour, s) not in used]
                new = obj._replace(shape=_pick(rng, options)) if options else None
            if new is None:
                return None
        return tuple(sorted([o for o in target if o != obj] + [new]))

    def query(self, used: set[Scene], phrasing: "_Phrasing") -> SynthQuery:
        """Draw one query whose images are all new to `used` (the split gallery so far); adds them to `used`."""
        n_nd = self.cfg.n_near_duplicates
        for _ in range(1000):
            reference = self.scene()
            if reference in used:
                continue
            edits = self.edits(reference)
            if edits is None:
                continue
            target = reference
            for e in edits:
                target = _apply(target, e)
            # Edits act on different objects and never cancel; the equality test only guards that invariant.
            if target == reference or target in used:
                continue
            edited = [e.after for e in edits if e.after is not None and e.after in target]
            taken = {reference, target}
            near: list[Scene] = []
            for _ in range(20 * n_nd):
                if len(near) == n_nd:
                    break
                nd = self.near_duplicate(target, edited)
                if nd is not None and nd not in taken and nd not in used:
                    near.append(nd)
                    taken.add(nd)
            if len(near) < n_nd:
                continue
            used.update(taken)
            caption, captions = phrasing.texts(edits, self.rng)
            # The kind names the edits in EDIT_KINDS order, so "add+move" and "move+add" count together.
            kind = "+".join(sorted((e.kind for e in edits), key=EDIT_KINDS.index))
            return SynthQuery(kind, edits, reference, target, tuple(near), caption, captions)
        raise RuntimeError(
            f"could not draw a query with {n_nd} unique near-duplicates in 1000 tries: the config is too small "
            f"({self.cfg.grid}x{self.cfg.grid} grid, {len(self.shapes)} shapes, {len(self.colours)} colours) "
            f"for a gallery of {len(used)} distinct scenes"
        )


# --------------------------------------------------------------------------------------------------------------------
# Language

# Templates: {cs} is "<colour> <shape>" of the edited object, {new} the object it becomes / that is added, {pos} a
# position noun phrase. Placeholders stand apart from words and punctuation so the vocabulary is the union of the
# template words and the filler words.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "add a {size} {cs} at {pos}",
        "put a {size} {cs} at {pos}",
        "place a {size} {cs} at {pos}",
        "insert a {size} {cs} at {pos}",
        "there should also be a {size} {cs} at {pos}",
    ),
    "remove": (
        "remove the {cs}",
        "take away the {cs}",
        "delete the {cs}",
        "get rid of the {cs}",
        "the {cs} should be gone",
    ),
    "recolour": (
        "make the {cs} {colour}",
        "change the {cs} to {colour}",
        "paint the {cs} {colour}",
        "recolor the {cs} {colour}",
        "the {cs} should be {colour} instead",
    ),
    "replace": (
        "replace the {cs} with a {new}",
        "swap the {cs} for a {new}",
        "turn the {cs} into a {new}",
        "change the {cs} into a {new}",
        "put a {new} in place of the {cs}",
    ),
    "grow": (
        "make the {cs} bigger",
        "make the {cs} larger",
        "enlarge the {cs}",
        "increase the size of the {cs}",
        "the {cs} should be big",
    ),
    "shrink": (
        "make the {cs} smaller",
        "shrink the {cs}",
        "reduce the size of the {cs}",
        "scale down the {cs}",
        "the {cs} should be small",
    ),
    "move": (
        "move the {cs} to {pos}",
        "shift the {cs} to {pos}",
        "slide the {cs} to {pos}",
        "relocate the {cs} to {pos}",
        "the {cs} should be at {pos}",
    ),
}
_JOINERS = ("{a} and {b}", "{a}, then {b}", "{a} and also {b}", "first {a}, then {b}")
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
# Three noun phrases per cell of the 3x3 grid (row-major).
_POSITIONS_3X3 = (
    ("the top left corner", "the top left", "the upper left"),
    ("the top", "the top middle", "the top center"),
    ("the top right corner", "the top right", "the upper right"),
    ("the left", "the middle left", "the left side"),
    ("the center", "the middle", "the centre"),
    ("the right", "the middle right", "the right side"),
    ("the bottom left corner", "the bottom left", "the lower left"),
    ("the bottom", "the bottom middle", "the bottom center"),
    ("the bottom right corner", "the bottom right", "the lower right"),
)
_WORD_RE = re.compile(r"[a-z0-9]+|[^a-z0-9\s]")  # BERT's basic split for ASCII text: words, single punctuation


def position_phrases(grid: int) -> tuple[tuple[str, ...], ...]:
    """Noun phrases naming each cell (row-major): natural names on a 3x3 grid, row/column numbers otherwise."""
    if grid == 3:
        return _POSITIONS_3X3
    return tuple(
        (f"row {r + 1} column {c + 1}", f"row {r + 1} and column {c + 1}", f"the cell in row {r + 1} column {c + 1}")
        for r in range(grid)
        for c in range(grid)
    )


class _Phrasing:
    """Turns edits into text; every choice is drawn from the caller's generator."""

    def __init__(self, grid: int):
        self.positions = position_phrases(grid)

    def one(self, edit: Edit, rng: random.Random, exclude: int | None = None) -> tuple[str, int]:
        """One phrasing of an edit and its template index (`exclude` forces a different template)."""
        kind = edit.kind
        if kind == "resize":
            kind = "grow" if edit.after.size == "large" else "shrink"
        templates = _TEMPLATES[kind]
        choices = [i for i in range(len(templates)) if i != exclude]
        i = _pick(rng, choices)
        ref = edit.before if edit.before is not None else edit.after
        slots = {
            "cs": f"{ref.colour} {ref.shape}",
            "size": _pick(rng, _SIZE_WORDS[edit.after.size]) if edit.after is not None else "",
            "pos": _pick(rng, self.positions[edit.after.cell]) if edit.after is not None else "",
            "colour": edit.after.colour if edit.after is not None else "",
            "new": f"{edit.after.colour} {edit.after.shape}" if edit.after is not None else "",
        }
        return templates[i].format(**slots), i

    def texts(self, edits: Sequence[Edit], rng: random.Random) -> tuple[str, tuple[str, str]]:
        """(CIRR caption, FashionIQ captions) for one or two edits."""
        if len(edits) == 1:
            first, i = self.one(edits[0], rng)
            second, _ = self.one(edits[0], rng, exclude=i)
            return first, (first, second)
        a, _ = self.one(edits[0], rng)
        b, _ = self.one(edits[1], rng)
        return _pick(rng, _JOINERS).format(a=a, b=b), (a, b)


def text_words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks of a text, as BERT's basic tokenizer splits ASCII text."""
    return _WORD_RE.findall(text.lower())


def vocabulary(cfg: SynthConfig) -> list[str]:
    """The WordPiece vocabulary (BERT order: [PAD] 0, [UNK], [CLS], [SEP], [MASK], then sorted words).

    It is derived from the grammar, not from the drawn texts, so worlds that differ only in seed or size share token
    ids (a stage-II mining world from another seed reuses the stage-I tokenizer).
    """
    parts: list[str] = [re.sub(r"\{\w+\}", " ", t) for ts in _TEMPLATES.values() for t in ts]
    parts += [re.sub(r"\{\w+\}", " ", j) for j in _JOINERS]
    parts += list(cfg.colours) + list(cfg.shapes) + [w for ws in _SIZE_WORDS.values() for w in ws]
    parts += [p for ps in position_phrases(cfg.grid) for p in ps]
    words = sorted({w for part in parts for w in text_words(part)})
    return list(SPECIAL_TOKENS) + words


# --------------------------------------------------------------------------------------------------------------------
# Rendering


_PALETTE_INDEX = {name: i + 1 for i, name in enumerate(COLOURS)}  # palette entry 0 is the background


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, r: int, fill: int) -> None:
    """Draw one shape of radius r centred at (x, y); everything stays inside the box [x-r, x+r] x [y-r, y+r]."""
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        h = max(1, round(r * 0.85))  # a little smaller than the circle, so both cover similar areas
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    elif shape == "cross":
        w = max(1, r // 3)
        draw.rectangle((x - r, y - w, x + r, y + w), fill=fill)
        draw.rectangle((x - w, y - r, x + w, y + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((x - r, y - r, x + r, y + r), outline=fill, width=max(1, r // 3))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")


@functools.lru_cache(maxsize=None)
def _sprite(shape: str, r: int) -> tuple[np.ndarray, int, int]:
    """(mask (h, w) bool, dy, dx): the shape drawn once by PIL, cropped, and its top-left offset from the centre.

    PIL rasterises integer coordinates the same wherever they are, so stamping this mask gives the pixels that
    drawing in place would, at a fraction of the cost (~100k images per world).
    """
    c = r + 2
    image = Image.new("L", (2 * c + 1, 2 * c + 1), 0)
    _draw_shape(ImageDraw.Draw(image), shape, c, c, r, 255)
    mask = np.asarray(image) > 0
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1], int(ys.min()) - c, int(xs.min()) - c


def render_indices(
    scene: Scene, jitter: Sequence[tuple[int, int]], image_size: int = 48, grid: int = 3
) -> np.ndarray:
    """Draw a scene as palette indices: 0 background, 1 + position in COLOURS for an object; no anti-aliasing.

    Args:
        scene: objects to draw.
        jitter: one (dx, dy) pixel offset per object, in scene order.
        image_size: side in pixels; grid: cells per side.
    Returns:
        (image_size, image_size) uint8 array.
    """
    if len(jitter) != len(scene):
        raise ValueError(f"got {len(jitter)} jitter offsets for a scene of {len(scene)} objects")
    cell = image_size // grid
    canvas = np.zeros((image_size, image_size), dtype=np.uint8)
    for obj, (dx, dy) in zip(scene, jitter):
        row, col = divmod(obj.cell, grid)
        mask, oy, ox = _sprite(obj.shape, _radius(obj.size, cell))
        y0, x0 = row * cell + cell // 2 + dy + oy, col * cell + cell // 2 + dx + ox
        if y0 < 0 or x0 < 0 or y0 + mask.shape[0] > image_size or x0 + mask.shape[1] > image_size:
            raise ValueError(f"object {obj} with jitter {(dx, dy)} leaves the {image_size}-px image")
        canvas[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = _PALETTE_INDEX[obj.colour]
    return canvas


def _palette(background: tuple[int, int, int]) -> np.ndarray:
    return np.array([background, *COLOURS.values()], dtype=np.uint8)  # (1 + len(COLOURS), 3)


def render(
    scene: Scene,
    jitter: Sequence[tuple[int, int]],
    image_size: int = 48,
    grid: int = 3,
    background: tuple[int, int, int] = _BACKGROUND_CIRR,
) -> Image.Image:
    """Draw a scene as an RGB image: the pixels a reader gets from the written PNG. Args as `render_indices`."""
    return Image.fromarray(_palette(background)[render_indices(scene, jitter, image_size, grid)], "RGB")


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


@functools.lru_cache(maxsize=16)
def _png_head(height: int, width: int, background: tuple[int, int, int]) -> bytes:
    """Signature, IHDR and PLTE: the same for every image of one size and background, so computed once."""
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)  # 8-bit, colour type 3 (indexed), no interlace
    plte = _png_chunk(b"PLTE", _palette(background).tobytes())
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + plte


_PNG_END = _png_chunk(b"IEND", b"")


def png_bytes(indices: np.ndarray, background: tuple[int, int, int] = _BACKGROUND_CIRR) -> bytes:
    """Encode palette indices (from `render_indices`) as an 8-bit indexed PNG (no filter, zlib level 1).

    PIL's PNG writer costs ~150 us per 48-px image, several times the drawing; this minimal encoder of the one format
    we write is much faster, and its bytes depend only on the pixels, the palette and zlib.

    Args:
        indices: (H, W) uint8 palette indices; background: RGB of palette entry 0.
    """
    h, w = indices.shape
    scanlines = np.zeros((h, w + 1), dtype=np.uint8)  # column 0: filter type 0 (none) for every row
    scanlines[:, 1:] = indices
    return _png_head(h, w, tuple(background)) + _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 1)) + _PNG_END


# An image job: (path relative to the root, scene, jitter, background).
_Job = tuple[str, Scene, tuple[tuple[int, int], ...], tuple[int, int, int]]


def _render_chunk(args: tuple[str, int, int, list[_Job]]) -> int:
    """Worker: render and write one chunk of images; returns how many were written."""
    root, image_size, grid, jobs = args
    for rel, scene, jitter, background in jobs:
        data = png_bytes(render_indices(scene, jitter, image_size, grid), background)
        path = os.path.join(root, rel)
        # os-level calls: Path.write_bytes' buffered file object costs more than encoding these small images.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(f"short write to {path} (disk full?)")
        finally:
            os.close(fd)
    return len(jobs)


# --------------------------------------------------------------------------------------------------------------------
# Drawing a split


def _split_rng(cfg: SynthConfig, stream: str, split: str) -> random.Random:
    """The generator of one named stream of one split (queries of a family, or rendering choices)."""
    # A string seed is hashed with SHA-512 by `random`, so it is stable across runs and PYTHONHASHSEED.
    return random.Random(f"cirlib.synth/v{GENERATOR_VERSION}/{cfg.seed}/{cfg.layout}/{stream}/{split}")


def iter_queries(cfg: SynthConfig, split: str, n: int, category: str | None = None) -> Iterator[SynthQuery]:
    """Draw the n queries of one split (one FashionIQ category), lazily; all their scenes are distinct.

    Args:
        cfg: world config; split: a split name of cfg.layout; n: number of queries; category: FashionIQ only.
    """
    rng = _split_rng(cfg, f"queries-{category or 'all'}", split)
    sampler = _Sampler(cfg, family_shapes(cfg, category), rng)
    phrasing = _Phrasing(cfg.grid)
    used: set[Scene] = set()
    for _ in range(n):
        yield sampler.query(used, phrasing)


def sample_queries(cfg: SynthConfig, split: str, n: int, category: str | None = None) -> list[SynthQuery]:
    """The list of `iter_queries` (same arguments)."""
    return list(iter_queries(cfg, split, n, category))


def _fiq_counts(n: int) -> dict[str, int]:
    """Split a FashionIQ query total evenly over the categories (earlier categories take the remainder)."""
    q, r = divmod(n, len(FIQ_CATEGORIES))
    return {c: q + (i < r) for i, c in enumerate(FIQ_CATEGORIES)}


def _jitters(rng: random.Random, scene: Scene, j: int) -> tuple[tuple[int, int], ...]:
    k = 2 * j + 1
    # One draw per object: its (dx, dy) pair indexed on the k x k offsets.
    return tuple((v // k - j, v % k - j) for v in (_below(rng, k * k) for _ in scene))


# Receives image jobs as soon as a batch of queries is drawn, so rendering overlaps with drawing.
_Emit = Callable[[list[_Job]], None]
_EMIT_EVERY = 2048  # images per render job


@dataclass
class _SplitOutput:
    """One split's JSON documents by path relative to the root, and its counts (images went to `emit`)."""

    documents: dict[str, Any] = field(default_factory=dict)
    queries: int = 0
    images: int = 0


def _sidecar(kind: str, split: str, category: str | None) -> str:
    """Path (relative to the root) of a sidecar: kind "queries" or "scenes"."""
    return f"synth/{kind}.{split}.json" if category is None else f"synth/{kind}.{category}.{split}.json"


def _sidecar_docs(
    split: str, category: str | None, queries: list[dict[str, Any]], scenes: dict[str, Scene]
) -> dict[str, Any]:
    # Two files, so that summaries need not parse ~100k scene signatures to count edit kinds.
    return {
        _sidecar("queries", split, category): queries,
        _sidecar("scenes", split, category): {name: scene_to_str(s) for name, s in scenes.items()},
    }


class _JobBuffer:
    """Collects image jobs and hands them to `emit` in batches of _EMIT_EVERY."""

    def __init__(self, emit: _Emit):
        self.emit, self.jobs, self.count = emit, [], 0

    def add(self, job: _Job) -> None:
        self.jobs.append(job)
        self.count += 1
        if len(self.jobs) >= _EMIT_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.jobs:
            self.emit(self.jobs)
            self.jobs = []


def _cirr_split(cfg: SynthConfig, split: str, emit: _Emit) -> _SplitOutput:
    """CIRR: caption records, name -> path split file and sidecar meta of one split; image jobs go to `emit`."""
    out, buffer = _SplitOutput(), _JobBuffer(emit)
    rng = _split_rng(cfg, "render-all", split)  # jitter and slot shuffles: a stream separate from the queries
    folder = _CIRR_FOLDER[split]
    records, relpaths, meta_queries, scenes = [], {}, [], {}
    for n, q in enumerate(iter_queries(cfg, split, cfg.split_queries(split))):
        # Slots (k, j) in the NLVR2-style name `<folder>-<n>-<k>-img<j>` are shuffled so names do not reveal roles.
        slots = list(range(_CIRR_SET_SIZE))
        rng.shuffle(slots)
        images = [q.reference, q.target, *q.near_duplicates]
        names = [f"{folder}-{n}-{s // 2}-img{s % 2}" for s in slots]
        sub = f"{folder}/{n % _CIRR_TRAIN_SUBDIRS}" if split == "train" else folder
        for name, slot, scene in sorted(zip(names, slots, images), key=lambda t: t[1]):
            relpaths[name] = f"./{sub}/{name}.png"
            scenes[name] = scene
            buffer.add((relpaths[name], scene, _jitters(rng, scene, cfg.jitter), _BACKGROUND_CIRR))
        members = list(names)
        rng.shuffle(members)
        # reference_rank / target_rank index a fixed per-set order (here: the slot), not the shuffled member list.
        img_set: dict[str, Any] = {"id": n, "members": members, "reference_rank": slots[0]}
        record: dict[str, Any] = {"pairid": _PAIRID_BASE[split] + n, "reference": names[0]}
        if split != "test1":
            record["target_hard"] = names[1]
            record["target_soft"] = {names[1]: 1.0}
            img_set["target_rank"] = slots[1]
        record["caption"] = q.caption
        record["img_set"] = img_set
        records.append(record)
        meta_queries.append(
            {"index": n, "kind": q.kind, "reference": names[0], "target": names[1], "near_duplicates": names[2:]}
        )
    buffer.flush()
    out.documents[f"cirr/captions/cap.rc2.{split}.json"] = records
    out.documents[f"cirr/image_splits/split.rc2.{split}.json"] = relpaths
    out.documents.update(_sidecar_docs(split, None, meta_queries, scenes))
    out.queries, out.images = len(records), buffer.count
    return out


def _fiq_name(rng: random.Random, taken: set[str]) -> str:
    # ASIN-like: "B0" + 8 random characters, as most real FashionIQ names; redrawn on the rare collision.
    while True:
        name = "B0" + "".join(rng.choices(_FIQ_NAME_ALPHABET, k=8))
        if name not in taken:
            taken.add(name)
            return name


def _fiq_split(cfg: SynthConfig, split: str, category: str, taken: set[str], emit: _Emit) -> _SplitOutput:
    """FashionIQ: caption records, name list and sidecar meta of one category and split; image jobs go to `emit`."""
    out, buffer = _SplitOutput(), _JobBuffer(emit)
    rng = _split_rng(cfg, f"render-{category}", split)
    background = _BACKGROUND_FIQ[category]
    records, meta_queries, scenes, gallery = [], [], {}, []
    n = _fiq_counts(cfg.split_queries(split))[category]
    for i, q in enumerate(iter_queries(cfg, split, n, category)):
        images = [q.reference, q.target, *q.near_duplicates]
        names = [_fiq_name(rng, taken) for _ in images]
        for name, scene in zip(names, images):
            scenes[name] = scene
            buffer.add((f"images/{name}.png", scene, _jitters(rng, scene, cfg.jitter), background))
        gallery.extend(names)
        record: dict[str, Any] = {"target": names[1], "candidate": names[0], "captions": list(q.captions)}
        if split == "test":
            del record["target"]
        records.append(record)
        meta_queries.append(
            {"index": i, "kind": q.kind, "reference": names[0], "target": names[1], "near_duplicates": names[2:]}
        )
    buffer.flush()
    # The names are random, so shuffling the list hides which images belong together without changing anything else.
    rng.shuffle(gallery)
    out.documents[f"captions/cap.{category}.{split}.json"] = records
    out.documents[f"image_splits/split.{category}.{split}.json"] = gallery
    out.documents.update(_sidecar_docs(split, category, meta_queries, scenes))
    out.queries, out.images = len(records), buffer.count
    return out


def _iter_splits(cfg: SynthConfig, emit: _Emit) -> Iterator[tuple[str, str | None, _SplitOutput]]:
    """(split, category, output) for every caption file of the layout, drawn lazily in file order."""
    if cfg.layout == "cirr":
        for split in CIRR_SPLITS:
            yield split, None, _cirr_split(cfg, split, emit)
        return
    taken: set[str] = set()  # FashionIQ names are unique across all categories and splits
    for split in FIQ_SPLITS:
        for category in FIQ_CATEGORIES:
            yield split, category, _fiq_split(cfg, split, category, taken, emit)


def _image_dirs(cfg: SynthConfig) -> list[str]:
    """Folders (relative to the root) that receive images; made before any worker writes."""
    if cfg.layout == "fashioniq":
        return ["images"]
    dirs = [f"train/{i}" for i in range(min(cfg.n_train, _CIRR_TRAIN_SUBDIRS))]
    return dirs + [_CIRR_FOLDER[s] for s in ("val", "test1") if cfg.split_queries(s) > 0]


def _check_texts(documents: dict[str, Any], vocab: set[str]) -> None:
    """Every caption must tokenise without [UNK]; a miss is a bug in the grammar, not bad input."""
    for rel, doc in documents.items():
        if rel.startswith("cirr/captions/"):
            texts = [r["caption"] for r in doc]
        elif rel.startswith("captions/"):
            texts = [c for r in doc for c in r["captions"]]
        else:
            continue
        for text in texts:
            missing = [w for w in text_words(text) if w not in vocab]
            if missing:
                raise RuntimeError(f"{rel}: text {text!r} has words {missing} outside the generated vocabulary")


def _write_json(path: Path, doc: Any, pretty: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The real files: CIRR single-line JSON, FashionIQ 4-space indented; both ASCII without a trailing newline.
    path.write_text(json.dumps(doc, indent=4 if pretty else None), encoding="ascii")


# --------------------------------------------------------------------------------------------------------------------
# Public entry points


def default_root(layout: str) -> Path:
    """Where `generate` writes a layout when no root is given: `cirlib.paths.SYNTHETIC_ROOT / layout`."""
    return paths.SYNTHETIC_ROOT / layout


def _resolve(root: str | os.PathLike | None, layout: str) -> Path:
    if root is None:
        return default_root(layout)
    path = Path(root).expanduser()
    return path if path.is_absolute() else paths.REPO_ROOT / path


def read_world(root: str | os.PathLike) -> dict[str, Any]:
    """The `world.json` of a generated world (config, counts, generator version)."""
    path = Path(root) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {root} is not a world written by cirlib.synth.generate")
    try:
        world = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(world, dict) or "config" not in world or "generator_version" not in world:
        raise ValueError(f"{path}: expected an object with 'config' and 'generator_version' (written by generate)")
    return world


def generate(
    cfg: SynthConfig, root: str | os.PathLike | None = None, overwrite: bool = False, workers: int = 2
) -> Path:
    """Write a synthetic world in cfg.layout's real on-disk layout; skip if `root` already holds this exact world.

    The world is built in `<root>.partial` and renamed into place when complete, so an interrupted run never looks
    finished. A world of the same config from an older generator version is rebuilt; a world of another config is an
    error unless overwrite=True (models and top-K files may have been made from it).

    Args:
        cfg: the world config.
        root: dataset root to write; None means cirlib.paths.SYNTHETIC_ROOT / cfg.layout; relative paths are
            anchored at the repository root.
        overwrite: replace an existing world (of any config) at root.
        workers: rendering processes (the output does not depend on it).
    Returns:
        the dataset root.
    """
    root = _resolve(root, cfg.layout)
    if root.exists():
        if not root.is_dir():
            raise FileExistsError(f"{root} exists and is not a folder; cannot write a synthetic world there")
        if (root / "world.json").is_file():
            world = read_world(root)
            same_config = world["config"] == json.loads(json.dumps(cfg.to_dict()))
            if same_config and world["generator_version"] == GENERATOR_VERSION and not overwrite:
                return root
            if not same_config and not overwrite:
                raise FileExistsError(
                    f"{root} holds a synthetic world of another config (see {root / 'world.json'}); "
                    "pass overwrite=True to replace it"
                )
        elif any(root.iterdir()):
            raise FileExistsError(
                f"{root} is a non-empty folder without world.json: not a synthetic world, refusing to replace it"
            )
    if workers < 1:
        raise ValueError(f"workers={workers}, expected >= 1")
    if cfg.n_train + cfg.n_val + cfg.n_test == 0:
        raise ValueError(EMPTY_WORLD)

    partial = root.with_name(root.name + ".partial")
    marker = partial / ".cirlib-synth-partial"
    if partial.exists():
        if not marker.is_file():
            raise FileExistsError(
                f"{partial} exists and was not made by cirlib.synth; remove it or choose another root"
            )
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    marker.touch()

    vocab = vocabulary(cfg)
    vocab_set = set(vocab)
    counts: dict[str, Any] = {}
    pool = _pool(workers)
    pending = []
    try:
        for rel in _image_dirs(cfg):
            (partial / rel).mkdir(parents=True, exist_ok=True)

        def emit(jobs: list[_Job]) -> None:
            # Rendering runs in the workers while the main process keeps drawing queries.
            args = (str(partial), cfg.image_size, cfg.grid, jobs)
            pending.append(pool.apply_async(_render_chunk, (args,)) if pool else _render_chunk(args))

        for split, category, out in _iter_splits(cfg, emit):
            _check_texts(out.documents, vocab_set)
            for rel, doc in out.documents.items():
                _write_json(partial / rel, doc, pretty=cfg.layout == "fashioniq" and not rel.startswith("synth/"))
            entry = {"queries": out.queries, "images": out.images}
            if category is None:
                counts[split] = entry
            else:
                counts.setdefault(split, {})[category] = entry
        written = sum(p.get() if pool else p for p in pending)
    except BaseException:
        if pool:
            pool.terminate()  # do not wait for renders of a world that will not be finished
        raise
    finally:
        if pool:
            pool.close()
            pool.join()
    expected = sum(
        e["images"] for v in counts.values() for e in (v.values() if cfg.layout == "fashioniq" else [v])
    )
    if written != expected:
        raise RuntimeError(f"rendered {written} images, expected {expected}")

    (partial / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="ascii")
    world = {
        "generator": "cirlib.synth",
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "layout": cfg.layout,
        "config": cfg.to_dict(),
        "counts": counts,
        "vocab_size": len(vocab),
    }
    # world.json last: its presence marks a finished world.
    (partial / "world.json").write_text(json.dumps(world, indent=2), encoding="ascii")
    marker.unlink()
    # Swap by renames (the one implementation, in cirlib.paths) so the root is missing only for an instant; deleting
    # ~100k old files comes after.
    return paths.swap_in_dir(partial, root)


def _pool(workers: int) -> "multiprocessing.pool.Pool | None":
    if workers == 1:
        return None
    # fork starts instantly and needs no __main__ guard in the caller; the workers only use PIL and zlib.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers)


@dataclass(frozen=True)
class QueryMeta:
    """Sidecar facts about one query (row `index` of its caption file)."""

    index: int
    kind: str  # edit kinds in EDIT_KINDS order joined by '+'
    reference: str
    target: str  # also on test splits, whose caption files hold no target: the synthetic answer key
    near_duplicates: tuple[str, ...]


@dataclass(frozen=True)
class SplitMeta:
    """Sidecar of one split (one FashionIQ category): query facts and every gallery image's scene."""

    split: str
    category: str | None
    queries: list[QueryMeta]
    scenes: dict[str, Scene]  # image name -> scene signature


def _read_sidecar(root: Path, kind: str, split: str, category: str | None) -> tuple[Path, Any]:
    path = root / _sidecar(kind, split, category)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: no synthetic {kind} sidecar for split {split!r}, category {category!r} "
            "(is this a world written by cirlib.synth.generate?)"
        )
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e


def _query_metas(root: Path, split: str, category: str | None) -> list[QueryMeta]:
    path, records = _read_sidecar(root, "queries", split, category)
    queries = []
    for i, q in enumerate(records):
        try:
            queries.append(QueryMeta(q["index"], q["kind"], q["reference"], q["target"], tuple(q["near_duplicates"])))
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"{path} record {i}: {e!r}; expected index, kind, reference, target, near_duplicates"
            ) from e
    return queries


def read_meta(root: str | os.PathLike, split: str, category: str | None = None) -> SplitMeta:
    """Load a split's sidecars `synth/{queries,scenes}.[<category>.]<split>.json`.

    Args:
        root: a generated world; split: a split name; category: FashionIQ category, None for CIRR.
    """
    root = Path(root)
    path, scenes = _read_sidecar(root, "scenes", split, category)
    parsed = {}
    for name, text in scenes.items():
        try:
            parsed[name] = scene_from_str(text)
        except ValueError as e:
            raise ValueError(f"{path} image {name!r}: {e}") from e
    return SplitMeta(split, category, _query_metas(root, split, category), parsed)


def summarize(root: str | os.PathLike | None = None, layout: str = "cirr") -> dict[str, Any]:
    """Counts of a generated world, read back from its files: queries and gallery per split, edit-kind histogram.

    Args:
        root: a generated world (None: the default root of `layout`).
        layout: only used when root is None.
    """
    root = _resolve(root, layout)
    world = read_world(root)
    cfg = SynthConfig.from_dict(world["config"])
    summary: dict[str, Any] = {
        "root": str(root),
        "layout": cfg.layout,
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "grid": cfg.grid,
        "vocab_size": len((root / "vocab.txt").read_text(encoding="ascii").split()),
        "splits": {},
    }
    for split in cfg.splits:
        categories = [None] if cfg.layout == "cirr" else list(FIQ_CATEGORIES)
        entry: dict[str, Any] = {"queries": 0, "gallery": 0}
        kinds: Counter[str] = Counter()
        for category in categories:
            if category is None:
                caps = root / "cirr" / "captions" / f"cap.rc2.{split}.json"
                gallery = root / "cirr" / "image_splits" / f"split.rc2.{split}.json"
            else:
                caps = root / "captions" / f"cap.{category}.{split}.json"
                gallery = root / "image_splits" / f"split.{category}.{split}.json"
            n_q = len(json.loads(caps.read_text(encoding="utf-8")))
            n_g = len(json.loads(gallery.read_text(encoding="utf-8")))
            entry["queries"] += n_q
            entry["gallery"] += n_g
            if category is not None:
                entry.setdefault("categories", {})[category] = {"queries": n_q, "gallery": n_g}
            kinds.update(q.kind for q in _query_metas(root, split, category))
        entry["kinds"] = dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
        summary["splits"][split] = entry
    return summary


EMPTY_WORLD = "n_train, n_val and n_test are all 0: a world needs at least one query"


def main(argv: list[str] | None = None) -> int:
    """Command line: generate a world and print its summary."""
    parser = argparse.ArgumentParser(prog="cirlib-synth", description="Generate the synthetic CIR world.")
    parser.add_argument("--layout", choices=LAYOUTS, default="cirr")
    parser.add_argument("--out", type=Path, default=None,
                        help="dataset root to write (relative to the current directory); "
                             "default outputs/synthetic/<layout> in the repository")
    parser.add_argument("--train", type=int, default=SynthConfig.n_train, help="training queries")
    parser.add_argument("--val", type=int, default=SynthConfig.n_val, help="validation queries")
    parser.add_argument("--test", type=int, default=SynthConfig.n_test, help="test queries")
    parser.add_argument("--seed", type=int, default=SynthConfig.seed)
    parser.add_argument("--image-size", type=int, default=SynthConfig.image_size)
    parser.add_argument("--grid", type=int, default=SynthConfig.grid)
    parser.add_argument("--near-duplicates", type=int, default=SynthConfig.n_near_duplicates)
    parser.add_argument("--jitter", type=int, default=SynthConfig.jitter, help="max object offset in pixels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing world at --out")
    args = parser.parse_args(argv)
    try:
        cfg = SynthConfig(
            layout=args.layout, seed=args.seed, n_train=args.train, n_val=args.val, n_test=args.test,
            image_size=args.image_size, grid=args.grid, n_near_duplicates=args.near_duplicates, jitter=args.jitter,
        )
    except ValueError as e:
        parser.error(str(e))
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: expected >= 1 (rendering processes)")
    if cfg.n_train + cfg.n_val + cfg.n_test == 0:
        parser.error(EMPTY_WORLD)
    # A path typed on the command line means the shell's current directory, unlike library paths.
    out = None if args.out is None else args.out.expanduser().absolute()
    root = generate(cfg, out, overwrite=args.overwrite, workers=args.workers)
    print(json.dumps(summarize(root), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
