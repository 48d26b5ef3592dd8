"""The synthetic CIR world: determinism, real on-disk layouts, hard negatives, vocabulary and the reader round trip."""
from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import BertTokenizer

from cirlib import data
from cirlib.data import synth

SMALL = dict(n_train=24, n_val=12, n_test=9)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory) -> Path:
    return synth.generate(synth.SynthConfig(layout="cirr", seed=3, **SMALL), tmp_path_factory.mktemp("w") / "cirr")


@pytest.fixture(scope="module")
def fiq_root(tmp_path_factory) -> Path:
    return synth.generate(synth.SynthConfig(layout="fashioniq", seed=3, **SMALL), tmp_path_factory.mktemp("w") / "fiq")


def _fiq_parts(split: str) -> list[tuple[str, int]]:
    """(category, queries) of a SMALL FashionIQ split: the total shared out dress, shirt, toptee."""
    total = {"train": SMALL["n_train"], "val": SMALL["n_val"], "test": SMALL["n_test"]}[split]
    q, r = divmod(total, 3)
    return [(c, q + (i < r)) for i, c in enumerate(synth.FIQ_CATEGORIES)]


# --------------------------------------------------------------------------------------------------------------------
# Config, determinism, idempotence


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="layout='coco'"):
        synth.SynthConfig(layout="coco")
    with pytest.raises(ValueError, match="exactly 6 members"):
        synth.SynthConfig(layout="cirr", n_near_duplicates=3)
    with pytest.raises(ValueError, match="jitter=2"):
        synth.SynthConfig(jitter=2)
    with pytest.raises(ValueError, match="multiple of grid"):
        synth.SynthConfig(image_size=50)
    with pytest.raises(ValueError, match="shapes="):
        synth.SynthConfig(shapes=("circle", "hexagon"))
    # FashionIQ may use another number of near-duplicates (they are gallery distractors there).
    assert synth.SynthConfig(layout="fashioniq", n_near_duplicates=2).n_near_duplicates == 2


def test_config_round_trips_through_json():
    cfg = synth.SynthConfig(layout="fashioniq", seed=7, shapes=("circle", "square", "cross"))
    assert synth.SynthConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_same_seed_same_bytes_any_worker_count(tmp_path):
    cfg = synth.SynthConfig(n_train=8, n_val=4, n_test=3, seed=11)
    a = _files(synth.generate(cfg, tmp_path / "a", workers=1))
    b = _files(synth.generate(cfg, tmp_path / "b", workers=2))
    assert a.keys() == b.keys()
    assert len([k for k in a if k.endswith(".png")]) == 6 * (8 + 4 + 3)
    assert a == b
    c = _files(synth.generate(synth.SynthConfig(n_train=8, n_val=4, n_test=3, seed=12), tmp_path / "c", workers=1))
    assert a["cirr/captions/cap.rc2.val.json"] != c["cirr/captions/cap.rc2.val.json"]
    pngs = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != c.get(k) for k in pngs) > len(pngs) // 2


def test_val_world_does_not_depend_on_train_size(tmp_path):
    small = synth.generate(synth.SynthConfig(n_train=2, n_val=4, n_test=0), tmp_path / "a", workers=1)
    large = synth.generate(synth.SynthConfig(n_train=9, n_val=4, n_test=0), tmp_path / "b", workers=1)
    for rel in ("cirr/captions/cap.rc2.val.json", "cirr/image_splits/split.rc2.val.json", "dev/dev-3-1-img1.png"):
        assert (small / rel).read_bytes() == (large / rel).read_bytes()


def test_generate_is_idempotent_and_refuses_to_clobber(tmp_path):
    cfg = synth.SynthConfig(n_train=3, n_val=2, n_test=1)
    root = synth.generate(cfg, tmp_path / "w", workers=1)
    stamp = (root / "world.json").stat().st_mtime_ns
    (root / "dev" / "marker.txt").write_text("kept")
    assert synth.generate(cfg, root) == root  # same config: skipped
    assert (root / "world.json").stat().st_mtime_ns == stamp
    assert (root / "dev" / "marker.txt").exists()
    other = synth.SynthConfig(n_train=3, n_val=2, n_test=1, seed=1)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        synth.generate(other, root)
    synth.generate(other, root, overwrite=True, workers=1)
    assert not (root / "dev" / "marker.txt").exists()
    assert synth.read_world(root)["config"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no partial folder, no old world left beside it
    # A world of the same config from an older generator version is rebuilt without asking.
    world = json.loads((root / "world.json").read_text())
    world["generator_version"] -= 1
    (root / "world.json").write_text(json.dumps(world))
    (root / "dev" / "marker.txt").write_text("stale")
    synth.generate(other, root, workers=1)
    assert synth.read_world(root)["generator_version"] == synth.GENERATOR_VERSION
    assert not (root / "dev" / "marker.txt").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="without world.json"):
        synth.generate(cfg, foreign, overwrite=True)


# --------------------------------------------------------------------------------------------------------------------
# CIRR layout


def test_cirr_layout_files_and_fields(cirr_root):
    counts = {"train": SMALL["n_train"], "val": SMALL["n_val"], "test1": SMALL["n_test"]}
    folders = {"train": "train", "val": "dev", "test1": "test1"}
    all_pairids: set[int] = set()
    for split, n in counts.items():
        records = json.loads((cirr_root / "cirr" / "captions" / f"cap.rc2.{split}.json").read_text())
        relpaths = json.loads((cirr_root / "cirr" / "image_splits" / f"split.rc2.{split}.json").read_text())
        assert len(records) == n and len(relpaths) == 6 * n
        folder = folders[split]
        for name, rel in relpaths.items():
            assert re.fullmatch(rf"{folder}-\d+-[0-2]-img[01]", name)
            if split == "train":
                n_query = int(name.split("-")[1])
                assert rel == f"./train/{n_query % 100}/{name}.png"
            else:
                assert rel == f"./{folder}/{name}.png"
        for rec in records:
            keys = ["pairid", "reference", "target_hard", "target_soft", "caption", "img_set"]
            set_keys = ["id", "members", "reference_rank", "target_rank"]
            if split == "test1":
                keys = [k for k in keys if not k.startswith("target")]
                set_keys = set_keys[:3]
            assert list(rec) == keys and list(rec["img_set"]) == set_keys
            assert isinstance(rec["pairid"], int) and rec["pairid"] not in all_pairids
            all_pairids.add(rec["pairid"])
            members = rec["img_set"]["members"]
            assert len(members) == 6 and len(set(members)) == 6
            assert rec["reference"] in members and all(m in relpaths for m in members)
            assert rec["caption"] and rec["caption"] == rec["caption"].strip()
            ranks = [rec["img_set"][k] for k in set_keys if k.endswith("_rank")]
            assert set(ranks) <= set(range(6))

            def slot(name: str) -> int:  # `<folder>-<n>-<k>-img<j>`: the set's fixed order is slot 2k + j
                _, _, k, j = name.split("-")
                return 2 * int(k) + int(j[3:])

            assert rec["img_set"]["reference_rank"] == slot(rec["reference"])
            if split != "test1":
                assert rec["img_set"]["target_rank"] == slot(rec["target_hard"])
            if split != "test1":
                assert rec["target_hard"] in members and rec["target_hard"] != rec["reference"]
                assert rec["target_soft"] == {rec["target_hard"]: 1.0}
                assert rec["img_set"]["reference_rank"] != rec["img_set"]["target_rank"]


def test_cirr_images_exist_and_decode(cirr_root):
    for split in synth.CIRR_SPLITS:
        relpaths = json.loads((cirr_root / "cirr" / "image_splits" / f"split.rc2.{split}.json").read_text())
        for rel in relpaths.values():
            with Image.open(cirr_root / rel) as im:
                rgb = im.convert("RGB")
            assert rgb.size == (48, 48)


# --------------------------------------------------------------------------------------------------------------------
# FashionIQ layout


def test_fiq_layout_files_and_fields(fiq_root):
    seen: set[str] = set()
    for split in synth.FIQ_SPLITS:
        for category, n in _fiq_parts(split):
            records = json.loads((fiq_root / "captions" / f"cap.{category}.{split}.json").read_text())
            gallery = json.loads((fiq_root / "image_splits" / f"split.{category}.{split}.json").read_text())
            assert len(records) == n and len(gallery) == 6 * n and len(set(gallery)) == len(gallery)
            assert not seen & set(gallery)  # names are unique across categories and splits
            seen |= set(gallery)
            for name in gallery:
                assert re.fullmatch(r"[A-Z0-9]{10}", name)
                with Image.open(fiq_root / "images" / f"{name}.png") as im:
                    assert im.convert("RGB").size == (48, 48)
            for rec in records:
                keys = ["candidate", "captions"] if split == "test" else ["target", "candidate", "captions"]
                assert list(rec) == keys
                assert rec["candidate"] in gallery
                assert len(rec["captions"]) == 2 and all(isinstance(c, str) and c for c in rec["captions"])
                # Two partial descriptions: the halves of a combination, or two phrasings of one edit.
                assert rec["captions"][0] != rec["captions"][1]
                if split != "test":
                    assert rec["target"] in gallery and rec["target"] != rec["candidate"]


def test_fiq_categories_use_different_shape_families(fiq_root):
    shapes = {}
    for category in synth.FIQ_CATEGORIES:
        meta = synth.read_meta(fiq_root, "train", category)
        shapes[category] = {o.shape for s in meta.scenes.values() for o in s}
    assert len({frozenset(s) for s in shapes.values()}) == 3


# --------------------------------------------------------------------------------------------------------------------
# Scene semantics: edits, near-duplicates, unique signatures


def _metas(cirr_root, fiq_root):
    yield from (synth.read_meta(cirr_root, s) for s in synth.CIRR_SPLITS)
    yield from (synth.read_meta(fiq_root, s, c) for s in synth.FIQ_SPLITS for c in synth.FIQ_CATEGORIES)


def _one_attribute_off(a, b) -> bool:
    """Scenes a and b differ in exactly one attribute of exactly one object."""
    only_a, only_b = set(a) - set(b), set(b) - set(a)
    if len(only_a) != 1 or len(only_b) != 1:
        return False
    (x,), (y,) = only_a, only_b
    return sum(getattr(x, f) != getattr(y, f) for f in synth.Obj._fields) == 1


def test_sets_hold_reference_target_and_four_near_duplicates(cirr_root, fiq_root):
    records = {s: json.loads((cirr_root / "cirr" / "captions" / f"cap.rc2.{s}.json").read_text())
               for s in synth.CIRR_SPLITS}
    for split in synth.CIRR_SPLITS:
        meta = synth.read_meta(cirr_root, split)
        for q, rec in zip(meta.queries, records[split], strict=True):
            assert q.reference == rec["reference"]
            assert set(rec["img_set"]["members"]) == {q.reference, q.target, *q.near_duplicates}
            if split != "test1":
                assert q.target == rec["target_hard"]


def test_near_duplicates_are_one_attribute_off_the_target(cirr_root, fiq_root):
    n_checked = 0
    on_edited = 0
    for meta in _metas(cirr_root, fiq_root):
        for q in meta.queries:
            ref, tgt = meta.scenes[q.reference], meta.scenes[q.target]
            assert len(q.near_duplicates) == 4
            nds = [meta.scenes[n] for n in q.near_duplicates]
            assert len({ref, tgt, *nds}) == 6
            for nd in nds:
                assert _one_attribute_off(nd, tgt)
                assert nd != ref
                n_checked += 1
                changed = (set(tgt) - set(nd)).pop()
                on_edited += changed not in set(ref)
    assert n_checked == 4 * 2 * sum(SMALL.values())  # every query of both worlds
    assert on_edited > n_checked // 4  # "usually the modified one"


def test_edit_kind_matches_the_scene_change(cirr_root, fiq_root):
    field_of = {"recolour": {"colour"}, "resize": {"size"}, "move": {"cell"}, "replace": {"shape", "colour"}}
    kinds = Counter()
    for meta in _metas(cirr_root, fiq_root):
        for q in meta.queries:
            ref, tgt = set(meta.scenes[q.reference]), set(meta.scenes[q.target])
            assert ref != tgt
            kinds[q.kind] += 1
            if q.kind == "add":
                assert ref < tgt and len(tgt) == len(ref) + 1
            elif q.kind == "remove":
                assert tgt < ref and len(tgt) == len(ref) - 1
            elif "+" not in q.kind:
                (a,), (b,) = ref - tgt, tgt - ref
                changed = {f for f in synth.Obj._fields if getattr(a, f) != getattr(b, f)}
                assert changed and changed <= field_of[q.kind]
                if q.kind == "replace":
                    assert "shape" in changed
            else:
                assert len(q.kind.split("+")) == 2 and len(ref ^ tgt) <= 4
    assert {k for k in kinds if "+" not in k} == set(synth.EDIT_KINDS)
    assert any("+" in k for k in kinds)


def test_gallery_signatures_are_unique(cirr_root, fiq_root):
    for meta in _metas(cirr_root, fiq_root):
        sigs = list(meta.scenes.values())
        assert len(set(sigs)) == len(sigs)
        for scene in sigs:
            pairs = [(o.colour, o.shape) for o in scene]
            cells = [o.cell for o in scene]
            assert len(set(pairs)) == len(pairs) and len(set(cells)) == len(cells)
            assert 1 <= len(scene) <= 5
    relpaths = json.loads((cirr_root / "cirr" / "image_splits" / "split.rc2.val.json").read_text())
    assert set(synth.read_meta(cirr_root, "val").scenes) == set(relpaths)


def test_render_draws_the_scene():
    scene = synth.scene_from_str("4:red:circle:large;0:blue:square:small")
    assert synth.scene_to_str(scene) == "0:blue:square:small;4:red:circle:large"
    img = np.asarray(synth.render(scene, [(0, 0), (0, 0)]))
    assert img.shape == (48, 48, 3)
    assert tuple(img[24, 24]) == synth.COLOURS["red"]  # centre of cell 4
    assert tuple(img[8, 8]) == synth.COLOURS["blue"]  # centre of cell 0
    assert tuple(img[40, 40]) == (20, 20, 24)  # empty cell 8: background
    # The written PNG decodes to exactly these pixels.
    png = synth.png_bytes(synth.render_indices(scene, [(0, 0), (0, 0)]))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), img)


@pytest.mark.parametrize("shape", synth.SHAPES)
def test_stamped_sprites_match_drawing_in_place(shape):
    # render_indices stamps each shape drawn once; PIL drawing it at its final place must give the same pixels.
    from PIL import ImageDraw

    cfg = synth.SynthConfig(shapes=synth.SHAPES)
    for size in synth.SIZES:
        for cell, (dx, dy) in [(0, (-1, -1)), (4, (0, 1)), (8, (1, 1)), (2, (1, -1))]:
            obj = synth.Obj(cell, "green", shape, size)
            direct = Image.new("L", (48, 48), 0)
            row, col = divmod(cell, 3)
            r = 3 if size == "small" else 6
            synth._draw_shape(ImageDraw.Draw(direct), shape, col * 16 + 8 + dx, row * 16 + 8 + dy, r, 255)
            stamped = synth.render_indices((obj,), [(dx, dy)], cfg.image_size, cfg.grid)
            assert np.array_equal(np.asarray(direct) > 0, stamped > 0), (shape, size, cell)
            # The object stays inside its own 16-px cell (one ViT patch).
            ys, xs = np.nonzero(stamped)
            assert row * 16 <= ys.min() and ys.max() < row * 16 + 16
            assert col * 16 <= xs.min() and xs.max() < col * 16 + 16


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="world.json"):
        synth.summarize(tmp_path)
    with pytest.raises(FileNotFoundError, match="scenes.val.json"):
        synth.read_meta(tmp_path, "val")
    with pytest.raises(ValueError, match="2 jitter offsets for a scene of 1 objects"):
        synth.render_indices(synth.scene_from_str("0:red:circle:large"), [(0, 0), (0, 0)])
    with pytest.raises(ValueError, match="bad scene object"):
        synth.scene_from_str("0:red:circle")


# --------------------------------------------------------------------------------------------------------------------
# Language and vocabulary


def _all_texts(cirr_root, fiq_root) -> list[str]:
    texts = [r["caption"] for s in synth.CIRR_SPLITS
             for r in json.loads((cirr_root / "cirr" / "captions" / f"cap.rc2.{s}.json").read_text())]
    texts += [c for s in synth.FIQ_SPLITS for cat in synth.FIQ_CATEGORIES
              for r in json.loads((fiq_root / "captions" / f"cap.{cat}.{s}.json").read_text()) for c in r["captions"]]
    return texts


@pytest.mark.parametrize("which", ["cirr", "fiq"])
def test_vocab_tokenises_every_text_without_unk(cirr_root, fiq_root, which):
    root = cirr_root if which == "cirr" else fiq_root
    path = root / "vocab.txt"
    lines = path.read_text().splitlines()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(set(lines)) == len(lines)
    tok = BertTokenizer(vocab=str(path))
    assert len(tok) == len(lines)  # the file was read (an ignored vocab would give 5 tokens)
    assert tok.pad_token_id == 0
    texts = _all_texts(cirr_root, fiq_root)
    ids = tok(texts)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    assert max(len(row) for row in ids) <= 40


def test_vocab_is_fixed_by_the_grammar_not_the_seed():
    a = synth.vocabulary(synth.SynthConfig(seed=0))
    assert a == synth.vocabulary(synth.SynthConfig(seed=5, n_train=1))
    assert "ring" in synth.vocabulary(synth.SynthConfig(shapes=synth.SHAPES)) and "ring" not in a


def test_phrasings_vary():
    queries = synth.sample_queries(synth.SynthConfig(p_combo=0.0), "train", 400)
    openings: dict[str, set[str]] = {}
    for q in queries:
        openings.setdefault(q.kind, set()).add(" ".join(q.caption.split()[:2]))
        assert q.captions[0] == q.caption and q.captions[1] != q.caption
    assert set(openings) == set(synth.EDIT_KINDS)
    assert all(len(v) >= 4 for v in openings.values()), openings


# --------------------------------------------------------------------------------------------------------------------
# Summary, command line, reader round trip


def test_summarize_counts(cirr_root, fiq_root):
    s = synth.summarize(cirr_root)
    assert s["layout"] == "cirr" and s["vocab_size"] == len((cirr_root / "vocab.txt").read_text().split())
    for split, n in zip(synth.CIRR_SPLITS, (SMALL["n_train"], SMALL["n_val"], SMALL["n_test"])):
        assert s["splits"][split]["queries"] == n and s["splits"][split]["gallery"] == 6 * n
        assert sum(s["splits"][split]["kinds"].values()) == n
    f = synth.summarize(fiq_root)
    assert f["splits"]["val"]["queries"] == SMALL["n_val"]
    assert f["splits"]["val"]["categories"] == {c: {"queries": n, "gallery": 6 * n} for c, n in _fiq_parts("val")}


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert synth.main(["--layout", "fashioniq", "--out", str(out), "--train", "3", "--val", "3", "--test", "3",
                       "--seed", "2", "--workers", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["layout"] == "fashioniq" and printed["seed"] == 2
    assert printed["splits"]["test"]["gallery"] == 18
    assert (out / "world.json").is_file()
    for bad, said in ((["--workers", "0"], "--workers 0: expected >= 1"),
                      (["--train", "0", "--val", "0", "--test", "0"], "at least one query")):
        with pytest.raises(SystemExit) as stop:
            synth.main(["--out", str(tmp_path / "bad"), *bad])
        assert stop.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cirr_round_trip_through_reader(cirr_root):
    for split in synth.CIRR_SPLITS:
        sd = data.load_split("cirr", cirr_root, split)
        relpaths = json.loads((cirr_root / "cirr" / "image_splits" / f"split.rc2.{split}.json").read_text())
        assert sd.gallery == list(relpaths)
        assert len(sd.queries) == {"train": SMALL["n_train"], "val": SMALL["n_val"], "test1": SMALL["n_test"]}[split]
        assert sd.missing_images() == []
        q = sd.queries[0]
        assert (q.target is None) == (split == "test1")
        assert data.load_image(sd.image_path(q.reference)).size == (48, 48)
        assert data.query_text(q, "cirr", split, None) == q.captions[0]
    train = data.load_split("cirr", cirr_root, "train")
    item = data.TripletDataset(train, data.squarepad_transform(48), seed=0)[0]
    assert item["reference_image"].shape == item["target_image"].shape == (3, 48, 48)
    assert item["text"] == train.queries[0].captions[0]


def test_fiq_round_trip_through_reader(fiq_root):
    for split in synth.FIQ_SPLITS:
        for category, n in _fiq_parts(split):
            sd = data.load_split("fashioniq", fiq_root, split, category)
            assert len(sd.queries) == n and len(sd.gallery) == 6 * n
            assert sd.missing_images() == []
            assert sd.image_path(sd.gallery[0]).suffix == ".png"
        joint = data.load_split("fashioniq", fiq_root, split)
        assert len(joint.queries) == {"train": SMALL["n_train"], "val": SMALL["n_val"], "test": SMALL["n_test"]}[split]
    val = data.load_split("fashioniq", fiq_root, "val", "dress")
    text = data.query_text(val.queries[0], "fashioniq", "val", None)
    assert " and " in text
