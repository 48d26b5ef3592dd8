"""The image feature store (cirlib.retrieval.feature_store): built once and reused without an encoder call, keyed by
the encoder's weights and the preprocessing, resumable, shardable across processes, equal to the encoder's outputs,
and loud about damage. Tiny preset on a synthetic CIRR world; CPU, seconds."""
from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cirlib import data as cdata
from cirlib.data import synth
from cirlib.models import factory
from cirlib.retrieval import feature_store as fs
from cirlib.retrieval.search import encode_gallery

SHARD = 16  # 72 training images -> shards of 16, 16, 16, 16, 8
BATCH = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return synth.generate(synth.SynthConfig(layout="cirr", n_train=12, n_val=2, n_test=2, seed=1),
                          root=tmp_path_factory.mktemp("fs") / "w")


@pytest.fixture(scope="module")
def train(world) -> "cdata.SplitData":
    return cdata.load_split("cirr", world, "train")


@pytest.fixture()
def model():
    torch.manual_seed(0)
    m = factory.build_stage1("tiny", 64)
    m.train()  # the store must switch the encoder to eval (drop-path off) and back
    return m


PREP = fs.preprocessing(1.25, 48)


class Counting:
    """An encode function that counts the images it encodes and can fail after a number of calls."""

    def __init__(self, encode, fail_after_calls: int | None = None):
        self.encode, self.fail_after_calls, self.images, self.calls = encode, fail_after_calls, 0, 0

    def __call__(self, images):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.images += images.shape[0]
        return self.encode(images)


def counted(encoder: fs.ImageEncoder, fail_after_calls: int | None = None) -> tuple[fs.ImageEncoder, Counting]:
    counter = Counting(encoder.encode, fail_after_calls)
    return dataclasses.replace(encoder, encode=counter), counter


def build(encoder, names, images, tmp_path, **kw):
    return fs.open_store(encoder, kw.pop("preprocess", PREP), names, images, outputs_root=tmp_path,
                         shard_size=SHARD, batch_size=BATCH, **kw)


def direct(model, train, names) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's own outputs, through the pipeline's gallery encoder, in the store's batches."""
    model.eval()
    g = encode_gallery(fs.stage1_encoder(model), train, fs.transform_of(PREP), batch_size=BATCH)
    rows = g.positions(names)
    return g.tokens[rows], g.embeds[rows]


@pytest.mark.slow
def test_built_once_then_reused_without_an_encoder_call_and_equal_to_the_encoder(model, train, tmp_path):
    enc, counter = counted(fs.stage1_image_encoder(model))
    store = build(enc, train.gallery, train, tmp_path)
    assert store.status == "built" and counter.images == len(train.gallery)
    assert model.training and model.visual_encoder.training  # its mode is restored after the build
    assert store.folder.parent == tmp_path / "features" and store.folder.name.startswith("stage1-")
    manifest = json.loads((store.folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["key"]["weights_sha256"] == store.key["weights_sha256"]
    assert [len(s["names"]) for s in manifest["shards"]] == [16, 16, 16, 16, 8]

    again, counter2 = counted(fs.stage1_image_encoder(model))
    reused = build(again, train.gallery, None, tmp_path)  # no images needed: nothing is encoded
    assert reused.status == "reused" and reused.folder == store.folder
    assert counter2.calls == 0
    reused = build(again, train.gallery[::-1], None, tmp_path, mode="reuse")
    assert counter2.calls == 0

    names = [train.gallery[i] for i in (5, 70, 3, 5, 33)]  # across shards, out of order, a repeat
    tokens, embeds = direct(model, train, names)
    got_t, got_e = reused.tokens(names), reused.embeddings(names)
    assert got_t.dtype == torch.float32 and got_t.shape == (5, 10, 128) and got_e.shape == (5, 128)
    torch.testing.assert_close(got_t, tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_e, embeds, rtol=0, atol=1e-6)
    assert torch.equal(got_t, tokens)  # the same batches: bit for bit
    assert reused.tokens(names, dtype=torch.float64).dtype == torch.float64
    torch.testing.assert_close(reused.tokens(names, select=slice(0, 1)), tokens[:, :1], rtol=0, atol=0)
    gallery = reused.gallery_features(train.gallery)
    assert gallery.names == train.gallery and gallery.tokens.shape == (72, 10, 128)
    assert torch.equal(pickle.loads(pickle.dumps(reused)).tokens(names), tokens)  # as DataLoader workers get it


@pytest.mark.slow
def test_half_precision_is_within_halfs_rounding(model, train, tmp_path):
    store = build(fs.stage1_image_encoder(model), train.gallery, train, tmp_path, dtype="float16")
    assert store.dtype == "float16" and store.folder.name != build(
        fs.stage1_image_encoder(model), train.gallery, train, tmp_path).folder.name  # dtype is in the key
    tokens, embeds = direct(model, train, train.gallery)
    for got, want in ((store.tokens(train.gallery), tokens), (store.embeddings(train.gallery), embeds)):
        err = (got - want).abs()
        bound = want.abs() * 2.0 ** -11 + 2.0 ** -25  # round to nearest: half an ulp (10-bit mantissa), subnormals
        assert (err <= bound).all()
        assert err.max() > 0  # it is rounded, not stored in float32
    assert store.tokens(train.gallery[:2], dtype=torch.float16).dtype == torch.float16


@pytest.mark.slow
def test_a_changed_weight_invalidates_the_store_and_the_reason_names_the_weights_hash(model, train, tmp_path):
    first = build(fs.stage1_image_encoder(model), train.gallery, train, tmp_path)
    with torch.no_grad():
        model.visual_encoder.blocks[0].mlp.fc1.weight[0, 0] += 1e-3  # in place: the cached hash must notice
    enc, counter = counted(fs.stage1_image_encoder(model))
    with pytest.raises(fs.StoreMismatchError, match="weights_sha256"):
        build(enc, train.gallery, train, tmp_path, mode="reuse")
    assert counter.calls == 0
    second = build(enc, train.gallery, train, tmp_path)
    assert second.status == "built" and "weights_sha256" in second.reason and first.folder.name in second.reason
    assert second.folder != first.folder and counter.images == len(train.gallery)
    assert first.folder.exists()  # the old store is another key's: left alone
    # vision_proj is in a stage-I (embeddings) key, not in a tokens-only one
    vit_before = fs.store_key(fs.stage1_image_encoder(model, ("tokens",)), PREP)
    stage1_before = fs.store_key(fs.stage1_image_encoder(model), PREP)
    with torch.no_grad():
        model.vision_proj.bias += 1.0
    assert fs.store_key(fs.stage1_image_encoder(model, ("tokens",)), PREP) == vit_before
    assert fs.store_key(fs.stage1_image_encoder(model), PREP) != stage1_before


def test_the_weights_hash_is_the_tensors_not_the_object_or_file(model, tmp_path):
    twin = factory.build_stage1("tiny", 64)
    assert fs.weights_sha256({"v": twin.visual_encoder}) != fs.weights_sha256({"v": model.visual_encoder})
    twin.load_state_dict(model.state_dict())  # same tensors via another object (as from another file)
    assert fs.weights_sha256({"v": twin.visual_encoder}) == fs.weights_sha256({"v": model.visual_encoder})
    # a tokens-only stage-II key equals a tokens-only stage-I key when the ViT weights are the same
    stage2 = factory.build_stage2("tiny", 64, reranker="joint", init="scratch")
    stage2.visual_encoder.load_state_dict(model.visual_encoder.state_dict())
    assert fs.store_key(fs.stage2_image_encoder(stage2), PREP) == fs.store_key(
        fs.stage1_image_encoder(model, ("tokens",)), PREP)


@pytest.mark.slow
def test_a_changed_preprocessing_invalidates_the_store(model, train, tmp_path):
    build(fs.stage1_image_encoder(model), train.gallery, train, tmp_path)
    other = fs.preprocessing(1.5, 48)
    with pytest.raises(fs.StoreMismatchError, match=r"preprocess\.target_ratio \(store 1\.25 vs now 1\.5\)"):
        build(fs.stage1_image_encoder(model), train.gallery, train, tmp_path, preprocess=other, mode="reuse")
    square = build(fs.stage1_image_encoder(model), train.gallery, train, tmp_path,
                   preprocess=fs.preprocessing(1.25, 48, "squarepad"))
    assert square.status == "built" and "preprocess.transform" in square.reason
    with pytest.raises(ValueError, match="transform"):
        fs.preprocessing(1.25, 48, "centercrop")


@pytest.mark.slow
def test_an_interrupted_build_resumes_with_only_the_rest(model, train, tmp_path):
    # 2 batches per shard: failing on the 6th call leaves shards 0-1 whole and shard 2 half-written
    enc, counter = counted(fs.stage1_image_encoder(model), fail_after_calls=5)
    with pytest.raises(KeyboardInterrupt):
        build(enc, train.gallery, train, tmp_path)
    folder = fs.store_folder(fs.store_key(enc, PREP), tmp_path)
    assert json.loads((folder / "manifest.json").read_text())["status"] == "building"
    assert (folder / "tokens-00001.npy").exists() and not (folder / "tokens-00002.npy").exists()
    assert (folder / "tokens-00002.npy.partial").exists()
    with pytest.raises(fs.StoreMismatchError, match="incomplete"):
        fs.FeatureStore.open(folder)
    with pytest.raises(fs.StoreMismatchError, match="interrupted"):
        build(enc, train.gallery, train, tmp_path, mode="reuse")

    enc2, counter2 = counted(fs.stage1_image_encoder(model))
    store = build(enc2, train.gallery, train, tmp_path)
    assert store.status == "resumed" and counter2.images == len(train.gallery) - 2 * SHARD
    assert not list(folder.glob("*.partial"))
    tokens, embeds = direct(model, train, train.gallery)
    assert torch.equal(store.tokens(train.gallery), tokens) and torch.equal(store.embeddings(train.gallery), embeds)


@pytest.mark.slow
def test_more_names_embed_only_the_new_ones(model, train, world, tmp_path):
    val = cdata.load_split("cirr", world, "val")
    first = build(fs.stage1_image_encoder(model), train.gallery[:40], train, tmp_path)
    assert len(first) == 40
    enc, counter = counted(fs.stage1_image_encoder(model))
    names = train.gallery + val.gallery
    store = build(enc, names, [train, val], tmp_path)
    assert store.status == "extended" and store.folder == first.folder
    assert counter.images == len(names) - 40
    tokens, _ = direct(model, train, train.gallery)
    torch.testing.assert_close(store.tokens(train.gallery), tokens, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_process_sharded_build_equals_one_process(model, train, tmp_path):
    one = build(fs.stage1_image_encoder(model), train.gallery, train, tmp_path / "one")
    key = fs.store_key(fs.stage1_image_encoder(model), PREP)
    plan = fs.plan_build(key, train.gallery, outputs_root=tmp_path / "two", shard_size=SHARD)
    built = [fs.build_shards(plan, fs.stage1_image_encoder(model), train, part=r, parts=2, batch_size=BATCH)
             for r in (1, 0)]
    assert built == [[1, 3], [0, 2, 4]]  # process r of 2 builds the shards i with i % 2 == r
    two = fs.finish_build(plan)
    assert two.folder.name == one.folder.name and two.names == one.names
    for output in ("tokens", "embeds"):
        for s in range(5):
            a = (one.folder / f"{output}-{s:05d}.npy").read_bytes()
            assert a == (two.folder / f"{output}-{s:05d}.npy").read_bytes()
    # finishing before every part is built is refused
    plan = fs.plan_build(key, train.gallery, outputs_root=tmp_path / "half", shard_size=SHARD)
    fs.build_shards(plan, fs.stage1_image_encoder(model), train, part=0, parts=2, batch_size=BATCH)
    with pytest.raises(fs.FeatureStoreError, match="tokens-00001.npy not written"):
        fs.finish_build(plan)


@pytest.mark.slow
def test_a_corrupt_shard_is_an_error_naming_the_file_and_a_build_repairs_it(model, train, tmp_path):
    store = build(fs.stage1_image_encoder(model), train.gallery, train, tmp_path)
    want = store.tokens(train.gallery)
    shard = store.folder / "tokens-00002.npy"
    good = shard.read_bytes()
    shard.write_bytes(good[:-100])  # truncated
    with pytest.raises(fs.StoreCorruptError, match=r"tokens-00002\.npy.*truncated.*repair"):
        fs.FeatureStore.open(store.folder)
    with pytest.raises(fs.StoreCorruptError, match=r"tokens-00002\.npy"):  # "reuse" never encodes: refused
        build(fs.stage1_image_encoder(model), train.gallery, train, tmp_path, mode="reuse")
    repaired = build(fs.stage1_image_encoder(model), train.gallery, train, tmp_path)  # never silently: named
    assert repaired.status == "repaired" and "tokens-00002.npy" in repaired.reason
    torch.testing.assert_close(repaired.tokens(train.gallery), want, rtol=0, atol=0)
    shard = repaired.folder / "tokens-00000.npy"
    shard.write_bytes(b"not a numpy file" + shard.read_bytes()[16:])
    with pytest.raises(fs.StoreCorruptError, match=r"tokens-00000\.npy has an unreadable header"):
        fs.FeatureStore.open(store.folder)


@pytest.mark.slow
def test_a_shard_changed_in_place_fails_its_checksum_at_open(model, train, tmp_path):
    store = build(fs.stage1_image_encoder(model), train.gallery, train, tmp_path)
    shard = store.folder / "embeds-00001.npy"
    size = shard.stat().st_size
    arr = np.load(shard, mmap_mode="r+")
    arr[2:4] = 0.5  # same size, other values (finite: no NaN check would see it)
    arr.flush()
    del arr
    assert shard.stat().st_size == size
    with pytest.raises(fs.StoreCorruptError, match=r"embeds-00001\.npy changed since it was written"):
        fs.FeatureStore.open(store.folder)
    assert any("embeds-00001.npy" in p for p in _unchecked(store.folder).verify())
    repaired = build(fs.stage1_image_encoder(model), train.gallery, train, tmp_path)
    assert repaired.status == "repaired" and repaired.verify() == []
    # NaN in a token row of a shard whose checksum matches (a build that wrote it): found when the row is read
    tokens = repaired.folder / "tokens-00000.npy"
    arr = np.load(tokens, mmap_mode="r+")
    arr[3, 0, 0] = np.nan
    arr.flush()
    del arr
    fs._seal(tokens)
    reopened = fs.FeatureStore.open(repaired.folder)
    reopened.tokens(train.gallery[4:6])
    with pytest.raises(fs.StoreCorruptError, match=r"tokens-00000\.npy holds NaN"):
        reopened.tokens(train.gallery[2:4])


def _unchecked(folder):
    """A store object over `folder` without open's checks (to call verify on a damaged store)."""
    return fs.FeatureStore(folder, json.loads((folder / fs.MANIFEST_FILE).read_text()))


@pytest.mark.slow
def test_a_shard_is_not_written_without_the_disk_space_for_it(model, train, tmp_path, monkeypatch):
    import shutil as sh
    real = sh.disk_usage
    monkeypatch.setattr(fs.shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    with pytest.raises(fs.FeatureStoreError, match=r"not enough free disk space for shard tokens-00000\.npy"):
        build(fs.stage1_image_encoder(model), train.gallery, train, tmp_path)
    assert not list((tmp_path / "features").rglob("*.npy*"))  # nothing half-written


@pytest.mark.slow
def test_a_second_process_waits_for_a_build_then_reuses_it(model, train, tmp_path, capsys):
    import threading
    import time

    from cirlib.run_folder import folder_lock

    encoder = fs.stage1_image_encoder(model)
    folder = fs.store_folder(fs.store_key(encoder, PREP), tmp_path)
    folder.parent.mkdir(parents=True)
    got = {}
    with folder_lock(fs.build_lock_file(folder), "a build"):  # another process is building it
        waiter = threading.Thread(target=lambda: got.update(store=build(encoder, train.gallery[:8], train, tmp_path)))
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive() and not folder.exists()  # waiting, nothing planned or written meanwhile
        built = build(fs.stage1_image_encoder(model), train.gallery[:8], train, tmp_path / "other")
    waiter.join(timeout=120)
    assert got["store"].status == "built" and built.names == got["store"].names
    assert "in use by another process" in capsys.readouterr().out + capsys.readouterr().err


@pytest.mark.slow
def test_unknown_names_and_missing_images_are_errors_naming_them(model, train, tmp_path):
    store = build(fs.stage1_image_encoder(model), train.gallery[:20], train, tmp_path)
    with pytest.raises(fs.UnknownImageError, match=r"not in feature store .*stage1-.*'no-such-image'"):
        store.tokens([train.gallery[0], "no-such-image"])
    gone = train.image_path(train.gallery[30])
    paths = {n: train.image_path(n) for n in train.gallery}
    paths[train.gallery[30]] = gone.with_name("missing.png")
    with pytest.raises(cdata.DatasetError, match=r"missing\.png.*" + train.gallery[30]):
        build(fs.stage1_image_encoder(model), train.gallery, paths, tmp_path)
    # the failed build is finished without that image (e.g. after missing_images="drop"): its unbuilt shards are
    # planned afresh, its whole ones kept
    kept = [n for n in train.gallery if n != train.gallery[30]]
    enc, counter = counted(fs.stage1_image_encoder(model))
    store = build(enc, kept, paths, tmp_path)
    assert store.status == "resumed" and train.gallery[30] not in store and len(store) == 71
    assert counter.images == 71 - 20  # shards 0-1 (the first 20 names) stayed whole; shard 2 failed at image 30
    with pytest.raises(cdata.DatasetError, match="no image file known for 'elsewhere'"):
        build(fs.stage1_image_encoder(model), ["elsewhere"], paths, tmp_path)


@pytest.mark.slow
def test_store_size_follows_the_layout(model, train, tmp_path):
    for dtype, item in (("float32", 4), ("float16", 2)):
        store = build(fs.stage1_image_encoder(model), train.gallery, train, tmp_path, dtype=dtype)
        per_image = fs.bytes_per_image(store.token_shape, store.embed_dim, dtype)
        assert per_image == item * (10 * 128 + 128)
        headers = 128 * 2 * len(store.shards)  # one 128-byte .npy header per shard file
        assert store.nbytes == per_image * len(store) + headers
        assert json.loads((store.folder / "manifest.json").read_text())["bytes_per_image"] == per_image
    # blip-base: ViT-B/16 at 384 px, 577 tokens x 768, embeddings of 256
    assert fs.bytes_per_image((577, 768), 256, "float16") == 886_784
    assert fs.bytes_per_image((577, 768), None, "float32") == 1_772_544
