"""The shared-keys kernel of stage II: cross-attention in which each image's keys/values are computed once and read
by every (query, candidate) pair that uses that image.

Pairs are grouped by key (a candidate, or for the joint re-ranker a reference); the text tokens of all pairs that share
a key are stacked along the query axis of one attention call (cross-attention has no mask on the image side, so text
tokens do not interact there), which needs neither copies of the image tokens nor of their keys/values. Keys with
similar pair counts share one call ("bucket"), padded to the bucket's largest count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cirlib.models.reranker_blocks import maybe_dropout, sdpa

# A bucket of candidates (or queries) shares one attention call padded to its largest pair count; a key joins the
# bucket while its count is at least this fraction of that largest count, which bounds the padding to 25 %.
_BUCKET_FILL = 0.75


# ------------------------------------------------------------------------------------------------- pair grouping
@dataclass(frozen=True)
class Bucket:
    start: int  # first key (candidate or query row) of the bucket
    end: int  # one past the last key
    slots: int  # S: pairs per key in this bucket's attention call (padded)
    offset: int  # position of the bucket's first slot in the flat slot list


@dataclass(frozen=True)
class Grouping:
    """Pairs arranged as keys x slots: all pairs of one key (a candidate or a query) share one attention row.

    Keys are numbered by non-increasing pair count, so each bucket is a contiguous key range and reads a plain slice of
    the per-key keys/values.
    """

    buckets: tuple[Bucket, ...]
    slot_pair: torch.Tensor  # (N_slots,) pair held by each slot; padding slots repeat their key's first pair
    pair_slot: torch.Tensor  # (P,) slot of each pair


def order_by_count(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Renumber the used keys of `index` by non-increasing pair count.

    Args:
        index: (P,) key of each pair, in [0, n).
    Returns:
        order (U,) original key of each new key, and the new key of each pair (P,).
    """
    counts = torch.bincount(index, minlength=n)
    order = torch.argsort(-counts, stable=True)[: int((counts > 0).sum())]
    renumber = torch.full((n,), -1, dtype=torch.long, device=index.device)
    renumber[order] = torch.arange(order.numel(), device=index.device)
    return order, renumber[index]


def group_pairs(keys: torch.Tensor, n_keys: int) -> Grouping:
    """Bucket pairs by key; `keys` (P,) must come from `order_by_count` (counts non-increasing, none zero)."""
    device = keys.device
    p = keys.numel()
    counts = torch.bincount(keys, minlength=n_keys)  # (n_keys,)
    by_key = torch.argsort(keys, stable=True)  # pairs sorted by key
    first = torch.cumsum(counts, 0) - counts  # sorted position of each key's first pair
    rank = torch.empty(p, dtype=torch.long, device=device)
    rank[by_key] = torch.arange(p, device=device) - first[keys[by_key]]
    # Buckets over runs of equal counts (few: counts are sorted).
    values, lengths = torch.unique_consecutive(counts, return_counts=True)
    buckets: list[Bucket] = []
    start = offset = 0
    bucket_start, bucket_slots = 0, None
    slots_of_key = torch.empty(n_keys, dtype=torch.long)
    for value, length in zip(values.tolist(), lengths.tolist()):
        if bucket_slots is None or value < _BUCKET_FILL * bucket_slots:
            if bucket_slots is not None:
                buckets.append(Bucket(bucket_start, start, bucket_slots, offset))
                offset += (start - bucket_start) * bucket_slots
            bucket_start, bucket_slots = start, value
        slots_of_key[start:start + length] = bucket_slots
        start += length
    buckets.append(Bucket(bucket_start, start, bucket_slots, offset))
    slots_of_key = slots_of_key.to(device)
    key_base = torch.cumsum(slots_of_key, 0) - slots_of_key  # first slot of each key
    pair_slot = key_base[keys] + rank
    key_of_slot = torch.repeat_interleave(torch.arange(n_keys, device=device), slots_of_key)
    slot_pair = by_key[first][key_of_slot]  # default: the key's first pair (used by padding slots)
    slot_pair[pair_slot] = torch.arange(p, device=device)
    return Grouping(tuple(buckets), slot_pair, pair_slot)


def grouped_attention(
    q: torch.Tensor, rows: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, grouping: Grouping,
    p: float, training: bool,
) -> torch.Tensor:
    """Cross-attention of every pair's text to its key's image tokens, keys/values computed once per key.

    Args:
        q: (R, L, heads, d) text queries, one row per pair or (layer 0) per query.
        rows: (P,) row of q for each pair, or None when q has one row per pair.
        k, v: (U, heads, T, d) keys/values of each key (candidate or reference), numbered as in `grouping`.
    Returns:
        (P, L, heads * d) attention output of each pair.
    """
    _, length, h, d = q.shape
    outs = []
    for b in grouping.buckets:
        n = b.end - b.start
        idx = grouping.slot_pair[b.offset: b.offset + n * b.slots]
        if rows is not None:
            idx = rows[idx]
        # (n*S, L, h, d) -> (n, h, S*L, d): the S pairs' text tokens become one query sequence for their key.
        qg = q[idx].view(n, b.slots * length, h, d).transpose(1, 2)
        o = sdpa(qg, k[b.start:b.end], v[b.start:b.end], None, p, training)  # (n, h, S*L, d)
        outs.append(o.transpose(1, 2).reshape(n * b.slots, length, h * d))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out[grouping.pair_slot]


class _LogSumExp(torch.autograd.Function):
    """logsumexp over the last dim whose backward reuses the softmax the attention keeps anyway (d lse / ds = softmax),
    so autograd stores no second (pairs, heads, L, T) tensor for it."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(probs)
        ctx.scores_dtype = scores.dtype
        return torch.logsumexp(scores, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (probs,) = ctx.saved_tensors
        return (grad.unsqueeze(-1) * probs).to(ctx.scores_dtype), None


def grouped_partial_attention(
    q: torch.Tensor, rows: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, grouping: Grouping,
    p: float, training: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over one part of a pair's image tokens, with the part's log-sum-exp to merge the parts exactly.

    Args: as `grouped_attention`.
    Returns:
        out (P, heads, L, d) normalised within the part, and lse (P, heads, L).
    """
    _, length, h, d = q.shape
    outs, lses = [], []
    for b in grouping.buckets:
        n = b.end - b.start
        idx = grouping.slot_pair[b.offset: b.offset + n * b.slots]
        if rows is not None:
            idx = rows[idx]
        qg = q[idx].view(n, b.slots * length, h, d).transpose(1, 2)  # (n, h, S*L, d)
        scores = qg @ k[b.start:b.end].transpose(-1, -2) / math.sqrt(d)  # (n, h, S*L, T)
        probs = scores.softmax(dim=-1)
        lse = _LogSumExp.apply(scores, probs.detach())  # (n, h, S*L)
        # Dropout on the part-local probabilities equals dropout on the joint ones: they differ by a per-row factor.
        o = maybe_dropout(probs, p, training) @ v[b.start:b.end]  # (n, h, S*L, d)
        outs.append(o.view(n, h, b.slots, length, d).transpose(1, 2).reshape(n * b.slots, h, length, d))
        lses.append(lse.view(n, h, b.slots, length).transpose(1, 2).reshape(n * b.slots, h, length))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses)
    return out[grouping.pair_slot], lse[grouping.pair_slot]



# ------------------------------------------------------------------------------------------ tiled (inference)
@dataclass(frozen=True)
class Call:
    """One attention call of a tile: `keys` consecutive keys from `key`, `per_key` pairs each, at tile row `row`."""

    row: int
    key: int
    keys: int
    per_key: int


@dataclass(frozen=True)
class PairTiles:
    """Pairs sorted by key (stable), cut into tiles of at most `tile_pairs` pairs, each with its attention calls.

    A tile's pairs are a contiguous range of the sorted order; within it every key's pairs are contiguous, so a run of
    keys with equal pair counts is one attention call on a plain view of the tile's queries (no padding, no gather).
    """

    order: torch.Tensor  # (P,) original pair at each sorted position
    tiles: tuple[tuple[int, int, tuple[Call, ...]], ...]  # (start, end, calls) in sorted positions


def tile_pairs(keys: torch.Tensor, n_keys: int, tile_pairs: int) -> PairTiles:
    """Sort pairs by key and cut them into tiles; `keys` (P,) in [0, n_keys), every key used."""
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=n_keys).tolist()
    runs, pos, key = [], 0, 0  # (first key, keys, pairs per key, first sorted position) of equal-count key runs
    for value, length in zip(*(t.tolist() for t in torch.unique_consecutive(torch.tensor(counts),
                                                                            return_counts=True))):
        runs.append((key, length, value, pos))
        key, pos = key + length, pos + length * value
    tiles = tuple((s, min(s + tile_pairs, pos), tuple(_calls(runs, s, min(s + tile_pairs, pos))))
                  for s in range(0, pos, tile_pairs))
    return PairTiles(order, tiles)


def _calls(runs: list[tuple[int, int, int, int]], start: int, end: int):
    """The attention calls covering sorted pairs [start, end): whole keys of a run together, cut keys alone."""
    for first, n, count, pos in runs:
        a, b = max(start, pos), min(end, pos + n * count)
        while a < b:
            j, off = divmod(a - pos, count)
            if off or b - a < count:  # part of one key (the tile cuts it)
                m = min(count - off, b - a)
                yield Call(a - start, first + j, 1, m)
                a += m
            else:
                full = (b - a) // count
                yield Call(a - start, first + j, full, count)
                a += full * count


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, calls: tuple[Call, ...], p: float,
                    training: bool) -> torch.Tensor:
    """Cross-attention of a tile's pairs to their keys' image tokens.

    Args:
        q: (n, L, heads, d) text queries of the tile's pairs, sorted by key.
        k, v: (U, heads, T, d) keys/values of every key.
    Returns:
        (n, L, heads * d).
    """
    _, length, h, d = q.shape
    outs = []
    for c in calls:
        qg = q[c.row: c.row + c.keys * c.per_key].view(c.keys, c.per_key * length, h, d).transpose(1, 2)
        o = sdpa(qg, k[c.key: c.key + c.keys], v[c.key: c.key + c.keys], None, p, training)  # (keys, h, S*L, d)
        outs.append(o.transpose(1, 2).reshape(c.keys * c.per_key, length, h * d))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
