"""A synthetic world in CIRCO's on-disk layout, with several correct answers per query.

The scenes, edits, captions and rendering are the synthetic CIRR world's (`cirlib.data.synth`), so a model trained
on that world is evaluated here zero-shot, as CIRR-trained models are on CIRCO. A query is a reference scene, a
caption (one or two edits, the CIRR grammar) and a *shared concept*: one object of the reference that no edit touches
("a red circle"). An image answers the query when it shows what the caption asks for and keeps the concept:

- every object an edit produces is there exactly (cell, colour, shape, size);
- an object an edit removes, recolours or replaces is gone (no object of its colour and shape);
- the concept object is there exactly (where it was in the reference).

Everything else may differ. The target (the reference with the edits applied: what the caption was written for) is
`target_img_id`; each query also gets 0..`max_extra_gts` designed further answers (the target with one or two of the
objects the query says nothing about moved, resized, recoloured, removed, or an unrelated object added) and
`n_hard_negatives` images that miss by one attribute of an edited or concept object. The gallery (shared by both
splits, as CIRCO's) holds every query's reference, answers and negatives and unrelated scenes up to `gallery_size`;
no two gallery images share a scene. `gt_img_ids` is then every gallery image that answers the query (the rule above
is checked on the whole gallery, so a chance match is a ground truth too), the target first. The reference is never
an answer: it still shows what the edits change.

Written files (CIRCO's names and schema; images as JPEG, 4:4:4 chroma, quality 95)::

    <root>/annotations/{val,test}.json
    <root>/COCO2017_unlabeled/unlabeled2017/<12-digit id>.jpg
    <root>/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json
    <root>/vocab.txt        the CIRR grammar's vocabulary (the same words as the CIRR world's vocab.txt)
    <root>/world.json       config, counts, generator version
    <root>/synth/queries.{val,test}.json   per query: edit kind, target and answers (also for test), scenes
    <root>/synth/scenes.json               image id -> scene signature

`semantic_aspects` name what each edit asks, in CIRCO's vocabulary: add -> addition + cardinality, remove -> negation
+ cardinality, recolour -> direct_addressing, replace -> compare_change, resize -> comparative_statement, move ->
spatial_relations_background, two edits -> + statement_with_conjunction (viewpoint never occurs).

    python -m cirlib.data.synth_circo --out outputs/synthetic/circo --val 40 --test 40 --gallery 600 --seed 0
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cirlib import paths
from cirlib.data import circo as circo_layout
from cirlib.data import synth
from cirlib.data.synth import COLOURS, SIZES, Edit, Obj, Scene

GENERATOR_VERSION = 1
SPLITS = ("val", "test")
JPEG_QUALITY = 95
# What each edit kind asks, in CIRCO's semantic-aspect names (cirlib.eval.circo.ASPECTS).
ASPECTS_OF_KIND = {
    "add": ("addition", "cardinality"),
    "remove": ("negation", "cardinality"),
    "recolour": ("direct_addressing",),
    "replace": ("compare_change",),
    "resize": ("comparative_statement",),
    "move": ("spatial_relations_background",),
}
TWO_EDITS_ASPECT = "statement_with_conjunction"
_ID_RANGE = (1, 600_000)  # COCO's unlabeled ids lie in this range


@dataclass(frozen=True)
class CircoSynthConfig:
    """Everything that determines a synthetic CIRCO world. The scene fields must equal those of the CIRR world whose
    models are evaluated here (its world.json `config`): the defaults are SynthConfig's, as `make demo` uses."""

    seed: int = 0  # root of every random draw
    n_val: int = 40  # val queries (with ground truths)
    n_test: int = 40  # test queries (answers only in the synth/ sidecar)
    gallery_size: int = 600  # unrelated scenes fill the gallery up to this many images
    max_extra_gts: int = 6  # designed answers besides the target: 0..max_extra_gts, uniform (mean 1 + 3 = 4 gts)
    n_hard_negatives: int = 2  # per query: near misses (an edited or the concept object one attribute off)
    image_size: int = 48  # scene grammar, as SynthConfig
    grid: int = 3
    jitter: int = 1
    min_objects: int = 2
    max_objects: int = 4
    shapes: tuple[str, ...] = synth.SHAPES[:5]
    colours: tuple[str, ...] = tuple(COLOURS)
    p_combo: float = 0.3  # probability of a two-edit caption

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(self, "colours", tuple(self.colours))
        problems = []
        for name in ("n_val", "n_test", "gallery_size", "max_extra_gts", "n_hard_negatives"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name}={value!r}, expected an int >= 0")
        if self.n_val + self.n_test < 1:
            problems.append("n_val + n_test must be at least 1")
        if problems:
            raise ValueError("invalid CircoSynthConfig: " + "; ".join(problems))
        self.grammar()  # SynthConfig checks the scene fields

    def grammar(self) -> synth.SynthConfig:
        """The scene grammar as a CIRR-world config (its vocabulary is the CIRR world's)."""
        return synth.SynthConfig(layout="cirr", seed=self.seed, n_train=0, n_val=0, n_test=0,
                                 image_size=self.image_size, grid=self.grid, jitter=self.jitter,
                                 min_objects=self.min_objects, max_objects=self.max_objects, shapes=self.shapes,
                                 colours=self.colours, p_combo=self.p_combo)

    @classmethod
    def like(cls, cirr_world: str | os.PathLike, **fields: Any) -> "CircoSynthConfig":
        """A config with the scene grammar of a generated CIRR world (its world.json), plus `fields`."""
        world = synth.read_world(cirr_world)["config"]
        grammar = {k: world[k] for k in ("image_size", "grid", "jitter", "min_objects", "max_objects", "shapes",
                                         "colours", "p_combo")}
        return cls(**{**grammar, **fields})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------------ the rule


@dataclass(frozen=True)
class Requirement:
    """What an answer to a query must show (see the module docstring)."""

    present: tuple[Obj, ...]  # edit results and the concept object, exactly
    absent: tuple[tuple[str, str], ...]  # (colour, shape) pairs that must not occur

    def holds(self, scene: Scene) -> bool:
        pairs = {(o.colour, o.shape) for o in scene}
        objs = set(scene)
        return all(o in objs for o in self.present) and not any(p in pairs for p in self.absent)


def requirement(edits: Sequence[Edit], concept: Obj) -> Requirement:
    present = [e.after for e in edits if e.after is not None] + [concept]
    absent = [(e.before.colour, e.before.shape) for e in edits
              if e.before is not None and (e.after is None or (e.after.colour, e.after.shape)
                                           != (e.before.colour, e.before.shape))]
    return Requirement(tuple(present), tuple(absent))


@dataclass(frozen=True)
class _Drawn:
    kind: str
    edits: tuple[Edit, ...]
    concept: Obj
    caption: str
    reference: Scene
    target: Scene
    answers: tuple[Scene, ...]  # designed answers besides the target
    negatives: tuple[Scene, ...]
    rule: Requirement


class _CircoSampler:
    """Draws CIRCO queries from the CIRR grammar (`synth._Sampler` scenes and edits, `synth._Phrasing` captions)."""

    def __init__(self, cfg: CircoSynthConfig, rng: random.Random):
        grammar = cfg.grammar()
        self.cfg, self.rng = cfg, rng
        self.scenes = synth._Sampler(grammar, grammar.shapes, rng)
        self.phrasing = synth._Phrasing(cfg.grid)
        self.n_cells = cfg.grid ** 2

    def _free_cells(self, scene: Scene) -> list[int]:
        used = {o.cell for o in scene}
        return [c for c in range(self.n_cells) if c not in used]

    def _free_pairs(self, scene: Scene, banned: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        used = {(o.colour, o.shape) for o in scene} | set(banned)
        return [(c, s) for c in self.cfg.colours for s in self.cfg.shapes if (c, s) not in used]

    def _vary(self, scene: Scene, fixed: Sequence[Obj], banned: Sequence[tuple[str, str]]) -> Scene | None:
        """The scene with one object the query says nothing about changed, or an unrelated object added."""
        rng = self.rng
        free = [o for o in scene if o not in fixed]
        ops = ["add"] if len(scene) <= self.cfg.max_objects else []
        if free:
            ops += ["move", "resize", "recolour", "remove"]
        if not ops:
            return None
        op = synth._pick(rng, ops)
        cells = self._free_cells(scene)
        if op == "add":
            pairs = self._free_pairs(scene, banned)
            if not cells or not pairs:
                return None
            c, s = synth._pick(rng, pairs)
            return tuple(sorted((*scene, Obj(synth._pick(rng, cells), c, s, synth._pick(rng, SIZES)))))
        obj = synth._pick(rng, free)
        rest = [o for o in scene if o != obj]
        if op == "remove":
            return tuple(sorted(rest))
        if op == "move":
            new = obj._replace(cell=synth._pick(rng, cells)) if cells else None
        elif op == "resize":
            new = obj._replace(size="large" if obj.size == "small" else "small")
        else:
            pairs = self._free_pairs(scene, banned)
            if not pairs:
                return None
            c, s = synth._pick(rng, pairs)
            new = obj._replace(colour=c, shape=s)
        return None if new is None else tuple(sorted((*rest, new)))

    def _near_miss(self, scene: Scene, pool: Sequence[Obj], banned: Sequence[tuple[str, str]]) -> Scene | None:
        """The scene with one attribute of one of `pool` (edit results, the concept) changed."""
        rng = self.rng
        obj = synth._pick(rng, pool)
        attr = synth._pick(rng, synth.ATTRIBUTES)
        used = {(o.colour, o.shape) for o in scene}
        if attr == "size":
            new = obj._replace(size="large" if obj.size == "small" else "small")
        elif attr == "cell":
            cells = self._free_cells(scene)
            new = obj._replace(cell=synth._pick(rng, cells)) if cells else None
        elif attr == "colour":
            options = [c for c in self.cfg.colours if (c, obj.shape) not in used]
            new = obj._replace(colour=synth._pick(rng, options)) if options else None
        else:
            options = [s for s in self.cfg.shapes if (obj.colour, s) not in used]
            new = obj._replace(shape=synth._pick(rng, options)) if options else None
        return None if new is None else tuple(sorted([o for o in scene if o != obj] + [new]))

    def query(self, used: set[Scene]) -> _Drawn:
        cfg, rng = self.cfg, self.rng
        for _ in range(1000):
            reference = self.scenes.scene()
            if reference in used:
                continue
            edits = self.scenes.edits(reference)
            if edits is None:
                continue
            touched = {e.before for e in edits if e.before is not None}
            kept = [o for o in reference if o not in touched]
            if not kept:
                continue
            concept = synth._pick(rng, kept)
            target = reference
            for e in edits:
                target = synth._apply(target, e)
            rule = requirement(edits, concept)
            if target in used or not rule.holds(target) or rule.holds(reference):
                continue
            taken = {reference, target}
            fixed = rule.present
            banned = rule.absent
            answers: list[Scene] = []
            want = synth._below(rng, cfg.max_extra_gts + 1)
            for _ in range(20 * want):
                if len(answers) == want:
                    break
                scene = self._vary(target, fixed, banned)
                if scene is not None and rng.random() < 0.5:  # now and then a second change
                    scene = self._vary(scene, fixed, banned) or scene
                if scene is not None and scene not in taken and scene not in used and rule.holds(scene):
                    answers.append(scene)
                    taken.add(scene)
            negatives: list[Scene] = []
            for _ in range(20 * cfg.n_hard_negatives):
                if len(negatives) == cfg.n_hard_negatives:
                    break
                scene = self._near_miss(target, fixed, banned)
                if scene is not None and scene not in taken and scene not in used and not rule.holds(scene):
                    negatives.append(scene)
                    taken.add(scene)
            used.update(taken)
            caption, _ = self.phrasing.texts(edits, rng)
            kind = "+".join(sorted((e.kind for e in edits), key=synth.EDIT_KINDS.index))
            return _Drawn(kind, edits, concept, caption, reference, target, tuple(answers), tuple(negatives), rule)
        raise RuntimeError(f"could not draw a CIRCO query in 1000 tries with {len(used)} scenes taken: the scene "
                           f"grammar ({cfg.grid}x{cfg.grid} grid, {len(cfg.shapes)} shapes, {len(cfg.colours)} "
                           "colours) is too small")


def aspects_of(kind: str) -> list[str]:
    """CIRCO semantic aspects of an edit kind ("move" or "add+recolour")."""
    kinds = kind.split("+")
    out = [a for k in kinds for a in ASPECTS_OF_KIND[k]]
    if len(kinds) > 1:
        out.append(TWO_EDITS_ASPECT)
    return list(dict.fromkeys(out))


def concept_text(concept: Obj) -> str:
    """The shared concept as CIRCO writes it: "a red circle"."""
    return f"a {concept.colour} {concept.shape}"


# ------------------------------------------------------------------------------------------------------ writing


def default_root() -> Path:
    """`outputs/synthetic/circo` in the repository."""
    return paths.SYNTHETIC_ROOT / "circo"


def _resolve(root: str | os.PathLike | None) -> Path:
    if root is None:
        return default_root()
    path = Path(root).expanduser()
    return path if path.is_absolute() else paths.REPO_ROOT / path


def _rng(cfg: CircoSynthConfig, stream: str) -> random.Random:
    return random.Random(f"cirlib.synth_circo/v{GENERATOR_VERSION}/{cfg.seed}/{stream}")


def _draw(cfg: CircoSynthConfig) -> tuple[dict[str, list[_Drawn]], list[Scene]]:
    """The queries of both splits and the gallery's scenes (queries' images, then unrelated scenes)."""
    used: set[Scene] = set()
    drawn: dict[str, list[_Drawn]] = {}
    order: list[Scene] = []
    for split, n in (("val", cfg.n_val), ("test", cfg.n_test)):
        sampler = _CircoSampler(cfg, _rng(cfg, f"queries/{split}"))
        drawn[split] = [sampler.query(used) for _ in range(n)]
        for q in drawn[split]:
            order += [q.reference, q.target, *q.answers, *q.negatives]
    fill = synth._Sampler(cfg.grammar(), cfg.shapes, _rng(cfg, "fill"))
    tries = 0
    while len(order) < cfg.gallery_size:
        scene = fill.scene()
        tries += 1
        if scene not in used:
            used.add(scene)
            order.append(scene)
        elif tries > 100 * cfg.gallery_size:
            raise RuntimeError(f"gallery_size={cfg.gallery_size}: the scene grammar has too few distinct scenes")
    return drawn, order


def _check_texts(texts: Sequence[str], vocab: set[str]) -> None:
    for text in texts:
        outside = [w for w in synth.text_words(text) if w not in vocab]
        if outside:
            raise RuntimeError(f"text {text!r} has words {outside} outside the CIRR grammar's vocabulary")


def _write(path: Path, doc: Any) -> None:
    """JSON as the real files hold it (keys in their order, indented), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.atomic_write_text(path, json.dumps(doc, indent=4))


def words_outside(root: str | os.PathLike, vocab_file: str | os.PathLike) -> list[str]:
    """Words of a CIRCO world's captions and concepts that a tokenizer's vocab.txt lacks (e.g. a CIRR world's)."""
    vocab = set(Path(vocab_file).read_text(encoding="utf-8").split())
    words: set[str] = set()
    for split in SPLITS:
        path = Path(root) / circo_layout.ANNOTATIONS_DIR / f"{split}.json"
        for r in json.loads(path.read_text(encoding="utf-8")):
            words.update(synth.text_words(r["relative_caption"]) + synth.text_words(r["shared_concept"]))
    return sorted(words - vocab)


def generate_circo(cfg: CircoSynthConfig = CircoSynthConfig(), root: str | os.PathLike | None = None,
                   overwrite: bool = False) -> Path:
    """Write a synthetic CIRCO world; skip when `root` already holds this exact world.

    Built in `<root>.partial` and swapped into place when complete. A world of another config at `root` is an error
    unless overwrite=True.

    Args:
        cfg: the world config.
        root: where to write (None: outputs/synthetic/circo; relative paths are anchored at the repository).
        overwrite: replace a world of another config.
    Returns:
        the CIRCO root.
    """
    root = _resolve(root)
    want = json.loads(json.dumps(cfg.to_dict()))
    if root.exists():
        world_file = root / "world.json"
        if world_file.is_file():
            world = paths.read_json(world_file, "synthetic CIRCO world record")
            same = world.get("config") == want and world.get("generator") == "cirlib.synth_circo"
            if same and world.get("generator_version") == GENERATOR_VERSION and not overwrite:
                return root
            if not same and not overwrite:
                raise FileExistsError(f"{root} holds another world (see {world_file}); pass overwrite=True to "
                                      "replace it")
        elif not root.is_dir() or any(root.iterdir()):
            raise FileExistsError(f"{root} exists and is not a synthetic CIRCO world; refusing to replace it")
    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        if not (partial / ".cirlib-synth-partial").is_file():
            raise FileExistsError(f"{partial} exists and was not made by cirlib; remove it or choose another root")
        shutil.rmtree(partial)
    (partial / circo_layout.IMAGE_DIR).mkdir(parents=True)
    (partial / ".cirlib-synth-partial").touch()

    drawn, scenes = _draw(cfg)
    ids = _rng(cfg, "ids").sample(range(*_ID_RANGE), len(scenes))
    id_of = dict(zip(scenes, ids))
    render_rng = _rng(cfg, "render")
    images = []
    for scene, image_id in sorted(zip(scenes, ids), key=lambda t: t[1]):
        name = circo_layout.image_name(image_id)
        jitter = synth._jitters(render_rng, scene, cfg.jitter)
        synth.render(scene, jitter, cfg.image_size, cfg.grid).save(
            partial / circo_layout.IMAGE_DIR / name, "JPEG", quality=JPEG_QUALITY, subsampling=0)
        images.append({"license": 0, "file_name": name, "coco_url": "", "height": cfg.image_size,
                       "width": cfg.image_size, "date_captured": "", "id": image_id})

    vocab = synth.vocabulary(cfg.grammar())
    counts: dict[str, Any] = {"gallery": len(scenes)}
    for split in SPLITS:
        records, meta = [], []
        for n, q in enumerate(drawn[split]):
            gts = [id_of[q.target]] + [id_of[s] for s in q.answers]
            gts += [id_of[s] for s in scenes if q.rule.holds(s) and id_of[s] not in gts]  # chance matches
            assert id_of[q.reference] not in gts  # the rule fails on the reference by construction
            record: dict[str, Any] = {"reference_img_id": id_of[q.reference]}
            if split == "val":
                record["target_img_id"] = gts[0]
            record["relative_caption"] = q.caption
            record["shared_concept"] = concept_text(q.concept)
            if split == "val":
                record["gt_img_ids"] = gts
            record["id"] = n
            if split == "val":
                record["semantic_aspects"] = aspects_of(q.kind)
            records.append(record)
            meta.append({"id": n, "kind": q.kind, "target_img_id": gts[0], "gt_img_ids": gts,
                         "negative_img_ids": [id_of[s] for s in q.negatives],
                         "reference": synth.scene_to_str(q.reference), "target": synth.scene_to_str(q.target),
                         "concept": synth.scene_to_str((q.concept,)),
                         "present": synth.scene_to_str(q.rule.present), "absent": [list(p) for p in q.rule.absent]})
        _check_texts([r["relative_caption"] for r in records] + [r["shared_concept"] for r in records], set(vocab))
        _write(partial / circo_layout.ANNOTATIONS_DIR / f"{split}.json", records)  # CIRCO's key order
        paths.write_json(partial / "synth" / f"queries.{split}.json", meta)
        counts[split] = {"queries": len(records), "ground_truths": sum(len(m["gt_img_ids"]) for m in meta)}
    _write(partial / circo_layout.IMAGE_LIST,
                     {"info": {"description": "synthetic CIRCO world (cirlib.data.synth_circo)", "version": "1.0"},
                      "licenses": [], "images": images})
    paths.write_json(partial / "synth" / "scenes.json", {str(id_of[s]): synth.scene_to_str(s) for s in scenes})
    (partial / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="ascii")
    paths.write_json(partial / "world.json", {"generator": "cirlib.synth_circo", "generator_version": GENERATOR_VERSION,
                                              "seed": cfg.seed, "layout": "circo", "config": want, "counts": counts})
    (partial / ".cirlib-synth-partial").unlink()
    return paths.swap_in_dir(partial, root)


def main(argv: list[str] | None = None) -> int:
    """Command line: write a synthetic CIRCO world and print its counts."""
    parser = argparse.ArgumentParser(prog="python -m cirlib.data.synth_circo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="CIRCO root to write (default outputs/synthetic/circo)")
    parser.add_argument("--like", type=Path, default=None,
                        help="a CIRR world (its world.json) whose scene grammar to use (default: SynthConfig's)")
    parser.add_argument("--val", type=int, default=CircoSynthConfig.n_val)
    parser.add_argument("--test", type=int, default=CircoSynthConfig.n_test)
    parser.add_argument("--gallery", type=int, default=CircoSynthConfig.gallery_size)
    parser.add_argument("--seed", type=int, default=CircoSynthConfig.seed)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    fields = dict(n_val=args.val, n_test=args.test, gallery_size=args.gallery, seed=args.seed)
    try:
        cfg = CircoSynthConfig.like(args.like, **fields) if args.like else CircoSynthConfig(**fields)
    except ValueError as e:
        parser.error(str(e))
    out = None if args.out is None else args.out.expanduser().absolute()
    root = generate_circo(cfg, out, overwrite=args.overwrite)
    print(json.dumps({"root": str(root), **paths.read_json(root / "world.json")["counts"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
