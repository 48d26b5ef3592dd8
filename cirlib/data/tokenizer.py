"""The BLIP text tokenizer: BERT WordPiece plus `[DEC]` (bos) and `[ENC]`, with [ENC] written over [CLS].

BLIP (and the original CIR code) builds `BertTokenizer.from_pretrained('bert-base-uncased')`, adds `[DEC]` as the bos
token (id = base vocabulary size, 30522) and `[ENC]` as an additional special token (id 30523), tokenizes with
`padding='longest'` and no truncation, then replaces position 0 ([CLS]) with [ENC]. [SEP] stays at the end of each
text and pads are id 0 with attention mask 0.

The vocabulary is read from a local `vocab.txt` (no hub access), explicitly: in transformers 5 `BertTokenizer`'s
`vocab_file=` argument is silently ignored, so the file is parsed here and the resulting size is asserted.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from transformers import BertTokenizer

DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"
REQUIRED_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
VOCAB_FILE = "vocab.txt"
CONFIG_FILE = "cir_tokenizer.json"


class CIRTokenizer:
    """A `transformers.BertTokenizer` (attribute `bert`) with the BLIP [DEC]/[ENC] convention.

    Calling it returns `(input_ids, attention_mask)`, both int64 (B, L), padded to the longest text, with
    `input_ids[:, 0] = enc_token_id`.
    """

    def __init__(self, bert: BertTokenizer, base_vocab: list[str], do_lower_case: bool = True):
        self.bert = bert
        self.base_vocab = base_vocab  # the vocab.txt entries, id order, without [DEC]/[ENC]
        self.do_lower_case = do_lower_case

    @property
    def vocab_size(self) -> int:
        """Number of token ids (base vocabulary + [DEC] + [ENC]); the text model's embedding rows."""
        return len(self.bert)

    @property
    def enc_token_id(self) -> int:
        return self.bert.convert_tokens_to_ids(ENC_TOKEN)

    @property
    def dec_token_id(self) -> int:
        return self.bert.bos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.bert.pad_token_id

    @property
    def sep_token_id(self) -> int:
        return self.bert.sep_token_id

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, texts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize a batch: [ENC] text [SEP], padded with 0 to the longest; truncated only if max_length is given.

        Args:
            texts: B strings.
            max_length: if given, longer sequences are cut to this many tokens (keeping the final [SEP]).
        Returns:
            input_ids (B, L) int64, attention_mask (B, L) int64.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"CIRTokenizer expects a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError("CIRTokenizer got an empty batch")
        enc = self.bert(
            list(texts),
            padding="longest",
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
        )
        input_ids = enc["input_ids"].long().clone()  # (B, L)
        attention_mask = enc["attention_mask"].long()  # (B, L)
        input_ids[:, 0] = self.enc_token_id  # BLIP's text encoder reads [ENC] where BERT puts [CLS]
        return input_ids, attention_mask

    def decode(self, ids: torch.Tensor | list[int], skip_special_tokens: bool = True) -> str:
        """Ids (L,) back to text."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.bert.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `vocab.txt` (base vocabulary) and `cir_tokenizer.json`; `build_tokenizer(directory)` rebuilds it.

        Args:
            directory: output folder (created if needed).
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / VOCAB_FILE).write_text("".join(f"{tok}\n" for tok in self.base_vocab), encoding="utf-8")
        meta = {
            "do_lower_case": self.do_lower_case,
            "base_vocab_size": len(self.base_vocab),
            "dec_token": DEC_TOKEN,
            "dec_token_id": self.dec_token_id,
            "enc_token": ENC_TOKEN,
            "enc_token_id": self.enc_token_id,
            "vocab_size": self.vocab_size,
        }
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return out

    def __repr__(self) -> str:
        return (
            f"CIRTokenizer(vocab_size={self.vocab_size}, enc_token_id={self.enc_token_id}, "
            f"dec_token_id={self.dec_token_id}, do_lower_case={self.do_lower_case})"
        )


def _read_vocab(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read vocabulary {path}: {e}") from e
    if lines and lines[-1] == "":
        lines.pop()  # the trailing newline of the last entry
    tokens = [line.rstrip("\r") for line in lines]
    seen: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok == "":
            raise ValueError(f"{path}: line {i + 1} is empty; expected one token per line")
        if tok in seen:
            raise ValueError(f"{path}: token {tok!r} on line {i + 1} repeats line {seen[tok] + 1}")
        seen[tok] = i
    missing = [t for t in REQUIRED_TOKENS if t not in seen]
    if missing:
        raise ValueError(f"{path}: vocabulary lacks the BERT special tokens {missing}")
    # A saved vocabulary may already end with the BLIP tokens; they must then be the last two, in BLIP's order.
    if DEC_TOKEN in seen or ENC_TOKEN in seen:
        if tokens[-2:] != [DEC_TOKEN, ENC_TOKEN]:
            raise ValueError(
                f"{path}: {DEC_TOKEN}/{ENC_TOKEN} must be absent or be the last two lines in that order "
                f"(BLIP ids base, base+1); found them on lines "
                f"{[seen[t] + 1 for t in (DEC_TOKEN, ENC_TOKEN) if t in seen]} of {len(tokens)}"
            )
        tokens = tokens[:-2]
    return tokens


def build_tokenizer(path: str | os.PathLike, do_lower_case: bool | None = None) -> CIRTokenizer:
    """Build the BLIP tokenizer from a `vocab.txt` file or a folder holding one (e.g. a local bert-base-uncased).

    Args:
        path: a vocab.txt file, or a folder with vocab.txt (and optionally our cir_tokenizer.json).
        do_lower_case: lowercase and strip accents (bert-base-uncased); default True, or as saved by `save`.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    vocab_path = path / VOCAB_FILE if path.is_dir() else path
    if not vocab_path.is_file():
        raise FileNotFoundError(
            f"no vocabulary at {vocab_path}: pass a vocab.txt file or a folder holding one "
            "(a local bert-base-uncased folder, or a folder written by CIRTokenizer.save)"
        )
    meta_path = folder / CONFIG_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if path.is_dir() and meta_path.is_file() else {}
    if do_lower_case is None:
        do_lower_case = bool(meta.get("do_lower_case", True))

    base_vocab = _read_vocab(vocab_path)
    bert = BertTokenizer(vocab=OrderedDict((tok, i) for i, tok in enumerate(base_vocab)), do_lower_case=do_lower_case)
    if len(bert) != len(base_vocab):
        raise RuntimeError(f"tokenizer built from {vocab_path} has {len(bert)} tokens, expected {len(base_vocab)}")
    bert.add_special_tokens({"bos_token": DEC_TOKEN})
    bert.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    tok = CIRTokenizer(bert, base_vocab, do_lower_case)
    n = len(base_vocab)
    if (tok.vocab_size, tok.dec_token_id, tok.enc_token_id) != (n + 2, n, n + 1):
        raise RuntimeError(
            f"tokenizer from {vocab_path}: vocab_size {tok.vocab_size}, [DEC] {tok.dec_token_id}, "
            f"[ENC] {tok.enc_token_id}; expected {n + 2}, {n}, {n + 1}"
        )
    if meta and meta.get("vocab_size") not in (None, tok.vocab_size):
        raise ValueError(f"{meta_path} records vocab_size {meta['vocab_size']} but {vocab_path} gives {tok.vocab_size}")
    return tok


__all__ = ["CIRTokenizer", "DEC_TOKEN", "ENC_TOKEN", "build_tokenizer"]
