"""Packing encoded dialogues into padding-free rows, and the batches the model takes.

A packed batch is one row of several dialogues laid end to end. ``position_ids`` restart at 0
for every dialogue, which is what keeps them apart: with no attention mask given, transformers'
masking utilities read the restarts and build a block-causal mask for sdpa/eager, and the
varlen kernel (see `finetune.attention`) takes the matching ``cu_seq_lens``. The first label of
every dialogue is -100, so no token is ever trained to predict the next dialogue's start.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from finetune.template import IGNORE_INDEX, Encoded


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T) for padded batches, None when packed
    cu_seq_lens: torch.Tensor | None  # (n+1,) int32, packed only
    max_length: int
    n_tokens: int  # real (non-padding) tokens
    n_labels: int

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            self.input_ids.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            self.position_ids.to(device, non_blocking=True),
            move(self.attention_mask),
            move(self.cu_seq_lens),
            self.max_length,
            self.n_tokens,
            self.n_labels,
        )


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of at most `capacity` tokens (first-fit decreasing).

    Deterministic: ties keep the input order. A sample longer than `capacity` gets a bin of
    its own (the data checks keep such samples out of training in the first place).
    """
    if capacity <= 0:
        raise ValueError("capacity must be positive")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def collate_packed(samples: Sequence[Encoded]) -> Batch:
    """One padding-free row holding every sample, with per-sample positions."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    cu = [0]
    for s in samples:
        ids.extend(s.input_ids)
        labels.append(IGNORE_INDEX)
        labels.extend(s.labels[1:])
        positions.extend(range(len(s)))
        cu.append(cu[-1] + len(s))
    n_labels = sum(1 for x in labels if x != IGNORE_INDEX)
    return Batch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        labels=torch.tensor([labels], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        attention_mask=None,
        cu_seq_lens=torch.tensor(cu, dtype=torch.int32),
        max_length=max(len(s) for s in samples),
        n_tokens=len(ids),
        n_labels=n_labels,
    )


def collate_padded(samples: Sequence[Encoded], pad_id: int) -> Batch:
    """A right-padded batch with an attention mask: the plain way, for comparison and tests."""
    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        ids[row, : len(s)] = torch.tensor(s.input_ids)
        labels[row, 1 : len(s)] = torch.tensor(s.labels[1:])
        mask[row, : len(s)] = 1
    positions = torch.arange(width).expand(len(samples), width).clone()
    return Batch(
        input_ids=ids,
        labels=labels,
        position_ids=positions,
        attention_mask=mask,
        cu_seq_lens=None,
        max_length=width,
        n_tokens=int(mask.sum()),
        n_labels=int((labels != IGNORE_INDEX).sum()),
    )


def packed_batches(
    samples: Sequence[Encoded], batch_tokens: int, seed: int, epoch: int
) -> list[list[int]]:
    """The bins of one epoch, in a shuffled order that depends only on (seed, epoch)."""
    bins = pack_bins([len(s) for s in samples], batch_tokens)
    rng = random.Random(seed * 1_000_003 + epoch)
    for b in bins:
        b.sort()
    rng.shuffle(bins)
    return bins


def padded_batches(
    samples: Sequence[Encoded], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """Fixed-size batches in shuffled order, as a plain trainer makes them."""
    order = list(range(len(samples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
