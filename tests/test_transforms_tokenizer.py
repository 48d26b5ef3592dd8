"""Image transforms and the BLIP tokenizer, checked against the original code's tensors (fixtures/original-tiny)."""
from __future__ import annotations

import re
from pathlib import Path

import PIL.Image
import pytest
import torch

from cirlib.data import (
    CLIP_MEAN,
    CLIP_STD,
    SquarePad,
    TargetPad,
    load_image,
    squarepad_transform,
    targetpad_transform,
)
from cirlib.data.tokenizer import build_tokenizer

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SMALL_WORDS = ["a", "red", "dog", "blue", "is", "with", "##s", "sleeve", ",", "."]


@pytest.fixture(scope="module")
def original(shared_dir: Path) -> tuple[Path, dict]:
    folder = shared_dir / "fixtures" / "original-tiny"
    return folder, torch.load(folder / "inputs.pt", weights_only=True)


def _write_vocab(path: Path, tokens: list[str]) -> Path:
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------- transforms


def test_targetpad_matches_original_tensors(original):
    folder, inputs = original
    tf = targetpad_transform(1.25, 64)
    ours = torch.stack([tf(load_image(folder / f"{name}.png")) for name in inputs["image_names"]])  # (16, 3, 64, 64)
    theirs = torch.cat([inputs["ref_images"], inputs["gallery_images"]])
    assert ours.shape == theirs.shape == (16, 3, 64, 64)
    assert (ours - theirs).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    ("size", "padded"),
    [
        ((60, 50), (60, 50)),  # ratio 1.2 < 1.25: untouched
        ((125, 100), (125, 100)),  # ratio exactly 1.25: padded by int((100-100)/2) = 0
        ((100, 50), (100, 80)),  # 100/1.25 = 80 -> 15 rows top and bottom
        ((50, 131), (104, 131)),  # 131/1.25 = 104.8 -> int(27.4) = 27 columns each side
    ],
)
def test_targetpad_geometry(size, padded):
    image = PIL.Image.new("RGB", size, (255, 255, 255))
    out = TargetPad(1.25)(image)
    assert out.size == padded
    if padded != size:
        w, h = size
        hp, vp = (padded[0] - w) // 2, (padded[1] - h) // 2
        assert out.getpixel((0, 0)) == (0, 0, 0)  # black border
        assert out.getpixel((hp, vp)) == (255, 255, 255)  # the image itself, offset by the pad


def test_squarepad_geometry():
    assert SquarePad()(PIL.Image.new("RGB", (30, 20))).size == (30, 30)
    # odd gaps lose a pixel (int truncation on both sides), as in the original
    assert SquarePad()(PIL.Image.new("RGB", (31, 20))).size == (31, 30)


@pytest.mark.parametrize("size", [32, 48])
def test_transform_output_and_normalisation(size):
    grey = PIL.Image.new("RGB", (40, 20), (128, 128, 128))  # ratio 2: target pad adds black bands
    out = targetpad_transform(1.25, size)(grey)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    mean, std = torch.tensor(CLIP_MEAN)[:, None], torch.tensor(CLIP_STD)[:, None]
    centre = out[:, size // 2, :]  # (3, S): a row through the image
    torch.testing.assert_close(centre, ((128 / 255 - mean) / std).expand_as(centre), atol=1e-5, rtol=0)
    top = out[:, 0, :]  # (3, S): inside the black pad
    torch.testing.assert_close(top, ((0 - mean) / std).expand_as(top), atol=1e-5, rtol=0)
    sq = squarepad_transform(size)(grey)
    assert sq.shape == (3, size, size)
    assert not torch.equal(sq, out)  # square pad adds more black than target pad


def test_load_image_converts_to_rgb(tmp_path):
    for mode, color in [("L", 7), ("RGBA", (1, 2, 3, 4)), ("P", 5)]:
        path = tmp_path / f"{mode}.png"
        PIL.Image.new(mode, (5, 4), color).save(path)
        assert load_image(path).mode == "RGB"


def test_transform_argument_checks():
    with pytest.raises(ValueError, match="image_size"):
        targetpad_transform(1.25, 0)
    with pytest.raises(ValueError, match="target_ratio"):
        targetpad_transform(0.5, 32)


# -------------------------------------------------------------------------------------------------------- tokenizer


def test_small_vocab_blip_convention(tmp_path):
    vocab = BERT_SPECIALS + SMALL_WORDS
    tok = build_tokenizer(_write_vocab(tmp_path / "vocab.txt", vocab))
    n = len(vocab)
    ids_of = (tok.vocab_size, len(tok), tok.dec_token_id, tok.enc_token_id, tok.pad_token_id)
    assert ids_of == (n + 2, n + 2, n, n + 1, 0)
    idx = {t: i for i, t in enumerate(vocab)}
    ids, mask = tok(["A red dogs, blue", "Zebra"])
    assert ids.dtype == torch.int64 and mask.dtype == torch.int64
    expected0 = [tok.enc_token_id, idx["a"], idx["red"], idx["dog"], idx["##s"], idx[","], idx["blue"], idx["[SEP]"]]
    expected1 = [tok.enc_token_id, idx["[UNK]"], idx["[SEP]"]] + [0] * 5
    assert ids.tolist() == [expected0, expected1]
    assert mask.tolist() == [[1] * 8, [1] * 3 + [0] * 5]
    # truncation only when asked; the final [SEP] survives
    short, short_mask = tok(["a red dog is with a blue dog"], max_length=4)
    assert short.tolist() == [[tok.enc_token_id, idx["a"], idx["red"], idx["[SEP]"]]] and short_mask.shape == (1, 4)
    assert tok(["a red dog is with a blue dog"])[0].shape == (1, 10)  # 8 words + [ENC] + [SEP]
    assert tok.decode(ids[0]) == "a red dogs, blue"


def test_save_and_rebuild(tmp_path):
    tok = build_tokenizer(_write_vocab(tmp_path / "vocab.txt", BERT_SPECIALS + SMALL_WORDS))
    out = tok.save(tmp_path / "saved")
    again = build_tokenizer(out)
    texts = ["is a red dog", "blue sleeves."]
    assert all(torch.equal(a, b) for a, b in zip(tok(texts), again(texts)))
    assert (again.vocab_size, again.enc_token_id) == (tok.vocab_size, tok.enc_token_id)
    # a vocabulary that already ends with the BLIP tokens is read as the same tokenizer
    full = _write_vocab(tmp_path / "full.txt", BERT_SPECIALS + SMALL_WORDS + ["[DEC]", "[ENC]"])
    assert torch.equal(build_tokenizer(full)(texts)[0], tok(texts)[0])


@pytest.mark.parametrize(
    ("tokens", "pattern"),
    [
        (BERT_SPECIALS + ["red", "", "dog"], "line 7 is empty"),
        (BERT_SPECIALS + ["red", "dog", "red"], "token 'red' on line 8 repeats line 6"),
        (["[PAD]", "[CLS]", "[SEP]", "red"], r"lacks the BERT special tokens \['\[UNK\]'\]"),
        (BERT_SPECIALS + ["[ENC]", "red", "[DEC]"], "must be absent or be the last two lines"),
    ],
)
def test_bad_vocabularies(tmp_path, tokens, pattern):
    path = _write_vocab(tmp_path / "vocab.txt", tokens)
    with pytest.raises(ValueError, match=pattern) as e:
        build_tokenizer(path)
    assert str(path) in str(e.value)


def test_missing_vocabulary_and_bad_calls(tmp_path):
    with pytest.raises(FileNotFoundError, match="no vocabulary"):
        build_tokenizer(tmp_path)
    tok = build_tokenizer(_write_vocab(tmp_path / "vocab.txt", BERT_SPECIALS + SMALL_WORDS))
    with pytest.raises(TypeError, match="list of strings"):
        tok("a red dog")
    with pytest.raises(ValueError, match="empty batch"):
        tok([])


def _bert_like_vocab(inputs: dict) -> list[str]:
    """A 30,522-entry vocabulary with BERT's special-token ids and, at their real bert-base-uncased ids, the words
    of the fixture captions (each is one WordPiece there), so the original's ids can be reproduced offline."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"filler{i}" for i in range(30522 - len(vocab))]
    for caption, ids in zip(inputs["captions"], inputs["per_query_input_ids"]):
        words = re.findall(r"\w+|[^\w\s]", caption.lower())  # BERT's basic split for these ASCII captions
        word_ids = ids.tolist()[1:-1]  # drop [ENC] and [SEP]
        assert len(words) == len(word_ids), (caption, word_ids)
        for word, i in zip(words, word_ids):
            assert vocab[i] in (word, f"filler{i - 104}"), (word, i)
            vocab[i] = word
    return vocab


def test_bert_like_vocab_reproduces_original_ids(tmp_path, original):
    _, inputs = original
    vocab = _bert_like_vocab(inputs)
    tok = build_tokenizer(_write_vocab(tmp_path / "vocab.txt", vocab))
    assert len(vocab) == 30522
    assert tok.vocab_size == 30524 == len(vocab) + 2  # the size the text embedding is built with
    assert tok.dec_token_id == len(vocab) == inputs["dec_token_id"]
    assert tok.enc_token_id == len(vocab) + 1 == inputs["enc_token_id"]
    assert tok.pad_token_id == inputs["pad_token_id"] and tok.sep_token_id == inputs["sep_token_id"]

    ids, mask = tok(inputs["captions"])  # (6, 19)
    assert torch.equal(ids, inputs["input_ids"]) and torch.equal(mask, inputs["attention_mask"])
    raw = tok.bert(inputs["captions"], padding="longest", return_tensors="pt")["input_ids"]
    assert torch.equal(raw, inputs["raw_input_ids_before_enc"])  # [CLS] before the [ENC] overwrite
    train_ids, train_mask = tok(inputs["captions"][:4])  # (4, 10)
    assert torch.equal(train_ids, inputs["train_input_ids"]) and torch.equal(train_mask, inputs["train_attention_mask"])
    for caption, expected in zip(inputs["captions"], inputs["per_query_input_ids"]):
        assert torch.equal(tok([caption])[0][0], expected)
