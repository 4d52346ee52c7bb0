"""The sampler on logits a broken adapter or an extreme parameter gives: no row fails the batch."""

from __future__ import annotations

import torch

from serving.sampling import RowState, SamplingParams, sample


def row(**params: object) -> RowState:
    return RowState(
        params=SamplingParams(max_tokens=8, **params),  # type: ignore[arg-type]
        seen_ids=torch.tensor([1, 2], dtype=torch.long),
    )


def test_non_finite_logits_leave_the_other_rows_alone() -> None:
    logits = torch.tensor(
        [
            [float("nan")] * 4,  # an adapter whose weights are NaN
            [0.0, float("inf"), 1.0, float("-inf")],
            [0.0, 0.0, 9.0, 0.0],
            [float("nan"), 1.0, 3.0, 2.0],
        ]
    )
    rows = [row(), row(), row(temperature=0.0), row(temperature=1e-30)]
    picked = sample(logits, rows)
    assert picked.tolist()[1:] == [1, 2, 2]
    assert 0 <= int(picked[0]) < 4


def test_top_k_beyond_64_bits_is_the_whole_vocabulary() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    rows = [row(top_k=10**30, seed=3), row(top_k=0, seed=3)]
    rows[0].generator, rows[1].generator = (torch.Generator().manual_seed(3) for _ in range(2))
    picked = sample(torch.cat([logits[:1], logits[:1]]), rows)
    assert picked[0] == picked[1]
