"""Per-request sampling over a batch of logits: repetition penalty, temperature, top-k, top-p,
seeded or not. Every row has its own parameters, since each row is another conversation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """vLLM's sampling fields that the embedded server honours."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class RowState:
    """What sampling needs to remember about one request between steps."""

    params: SamplingParams
    seen_ids: torch.Tensor  # 1-D, prompt + generated, on the logits device (for the penalty)
    generator: torch.Generator | None = field(default=None)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def sample(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """Pick one token per row of `logits` ([batch, vocab]); returns a [batch] int64 tensor."""
    logits = logits.float()
    batch = logits.shape[0]
    device = logits.device

    for i, row in enumerate(rows):
        penalty = row.params.repetition_penalty
        if penalty != 1.0 and row.seen_ids.numel():
            # The CTRL / Hugging Face / vLLM rule: divide positive logits, multiply negative ones.
            picked = logits[i].gather(0, row.seen_ids)
            picked = torch.where(picked > 0, picked / penalty, picked * penalty)
            logits[i].scatter_(0, row.seen_ids, picked)

    greedy = torch.tensor([r.params.greedy for r in rows], device=device)
    temps = torch.tensor(
        [r.params.temperature if not r.params.greedy else 1.0 for r in rows], device=device
    )
    # A temperature near 0 or a penalty that is 0 or infinite in float32 overflows the logits:
    # an infinite logit is the largest finite one (so a tiny temperature samples what greedy
    # picks), and a NaN one is never picked.
    top = torch.finfo(logits.dtype).max
    scaled = torch.nan_to_num(
        logits / temps[:, None], nan=-torch.inf, posinf=top, neginf=-torch.inf
    )
    best = scaled.argmax(dim=-1)  # greedy rows: temperature 1 here, so their argmax

    top_ks = [r.params.top_k for r in rows]
    if any(k > 0 for k in top_ks):
        vocab = logits.shape[-1]
        ks = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_ks], device=device)
        sorted_vals = scaled.sort(dim=-1, descending=True).values
        kth = sorted_vals.gather(1, (ks - 1)[:, None])
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))

    top_ps = torch.tensor([r.params.top_p for r in rows], device=device)
    if bool((top_ps < 1.0).any()):
        sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top one stays.
        drop = (probs.cumsum(dim=-1) - probs) > top_ps[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(1, sorted_idx, sorted_logits)

    probs = scaled.softmax(dim=-1)
    # A row with no finite logit left (NaN from a broken adapter, say) takes its argmax rather
    # than failing every request of the batch in `torch.multinomial`.
    dead = ~probs.isfinite().all(dim=-1)
    if bool(dead.any()):
        probs[dead] = torch.nn.functional.one_hot(best[dead], probs.shape[-1]).to(probs.dtype)
    out = torch.empty(batch, dtype=torch.long, device=device)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if unseeded:
        idx = torch.tensor(unseeded, device=device)
        out[idx] = torch.multinomial(probs[idx], 1).squeeze(1)
    for i, row in enumerate(rows):
        if row.generator is not None:
            out[i] = torch.multinomial(probs[i], 1, generator=row.generator)[0]
    return torch.where(greedy, best, out)
