"""Attention for packed rows: PyTorch's variable-length flash kernel, registered with transformers.

transformers' own ``flash_attention_2`` path needs the separate flash-attn package. PyTorch
ships the same kind of kernel as ``torch.nn.attention.varlen.varlen_attn``; registered here as
an attention implementation, it takes the ``cu_seq_lens_q``/``max_length_q`` keyword arguments
that transformers passes down to every attention layer, so a packed row costs attention only
inside each dialogue. Where it is missing (a CPU, an older PyTorch) training uses ``sdpa`` with
the block-causal mask that transformers builds from the packed ``position_ids``.

Models with attention sinks and sliding windows (gpt-oss) take the same kernel: the window is
the kernel's ``window_size``, and a sink is exact from the kernel's log-sum-exp (see
`SinkAttention`). transformers has no sdpa path for them and does not read packed positions
for their masks, so on a CPU (and in the tests) the same autograd function runs with a
reference kernel in plain PyTorch that builds the block-causal, windowed mask from
``cu_seq_lens`` itself.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

VARLEN = "rolecast_varlen"


def _varlen_fn() -> Any | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_available() -> bool:
    return torch.cuda.is_available() and _varlen_fn() is not None


def _varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """(B, H, T, D) in, (B, T, H, D) out, like transformers' other attention functions."""
    batch, heads, length, dim = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None:  # no packing information: every row is one sequence
        cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=query.device)
        max_len = length
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], dim)
    if s_aux is not None or sliding_window is not None:
        window = (int(sliding_window) - 1, 0) if sliding_window else (-1, 0)
        kernel = FLASH if query.is_cuda and _varlen_fn() is not None else REFERENCE
        assert max_len is not None
        out = sink_attention(
            q, k, v, s_aux, cu.to(torch.int32), int(max_len), scaling, window, kernel
        )
        return out.reshape(batch, length, heads, dim), None
    varlen_attn = _varlen_fn()
    assert varlen_attn is not None
    params = inspect.signature(varlen_attn).parameters
    extra: dict[str, Any] = {"scale": scaling}
    if "is_causal" in params:
        extra["is_causal"] = True
    else:
        extra["window_size"] = (-1, 0)
    if "enable_gqa" in params and k.shape[1] != heads:
        extra["enable_gqa"] = True
    in_dtype = q.dtype
    if in_dtype not in (
        torch.float16,
        torch.bfloat16,
    ):  # the flash kernel takes half precision only
        half = (
            torch.get_autocast_dtype("cuda")
            if torch.is_autocast_enabled("cuda")
            else torch.bfloat16
        )
        q, k, v = q.to(half), k.to(half), v.to(half)
    assert max_len is not None
    out = varlen_attn(
        q, k, v, cu.to(torch.int32), cu.to(torch.int32), int(max_len), int(max_len), **extra
    )
    return out.to(in_dtype).reshape(batch, length, heads, dim), None


def register_varlen_attention() -> str:
    """Register the varlen kernel under `VARLEN` and return that name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, _varlen_attention)
    return VARLEN


def choose_attention(requested: str, sinks: bool = False) -> str:
    """The attention implementation to load the model with: `auto` picks varlen on a GPU.

    `sinks`: the model has attention sinks (gpt-oss), which sdpa cannot take and whose packed
    rows transformers masks as one sequence; packed rows then always go through `VARLEN`,
    with the reference kernel where the flash kernel is missing.
    """
    if sinks:
        if requested not in ("auto", "varlen"):
            log.warning(
                "packed rows of a model with attention sinks need varlen; not %s", requested
            )
        if not varlen_available():
            log.info("attention sinks without the flash kernel: the reference kernel")
        return register_varlen_attention()
    if requested == "auto":
        requested = "varlen" if varlen_available() else "sdpa"
    if requested == "varlen":
        if not varlen_available():
            log.warning("varlen attention needs CUDA and torch.nn.attention.varlen; using sdpa")
            return "sdpa"
        return register_varlen_attention()
    return requested


def has_sinks(config: Any) -> bool:
    """Whether a model config has attention sinks (gpt-oss), which need `choose_attention`'s
    sink path for packed rows."""
    return getattr(config, "model_type", None) == "gpt_oss"


# --- attention sinks and sliding windows on packed rows --------------------------------------
#
# A sink is a per-head logit s with no value: softmax over [scores, s] and the sink's weight is
# dropped. With the kernel's log-sum-exp L of the real scores, the sink's share of the row is
# sigmoid(s - L), so
#
#     out_sink = out * sigmoid(L - s)        and its log-sum-exp is  L' = logaddexp(L, s).
#
# For the gradient, a flash backward given (out_sink, L') in place of (out, L) recomputes the
# probabilities with the sink in the denominator, P = exp(S - L'), and D = rowsum(dO * out_sink):
# exactly the gradients of q, k and v of attention with the sink (the sink's value is zero, so it
# adds nothing to dP). The sink's own gradient is -sum over the row of P_sink * D, with
# P_sink = exp(s - L'). No kernel change is needed, and nothing of size T x T is kept.


def _acc(x: torch.Tensor) -> torch.Tensor:
    """`x` in the precision sums are taken in: float32, or float64 for float64 inputs."""
    return x.double() if x.dtype == torch.float64 else x.float()


class Kernel:
    """A varlen attention kernel: `forward` -> (out (T, H, D), lse (H, T) float32, state) and
    `backward(dout, q, k, v, out, lse, ...)` -> (dq, dk, dv), as the flash kernel's ops are."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu: torch.Tensor,
        max_len: int,
        scale: float | None,
        window: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        cu: torch.Tensor,
        max_len: int,
        scale: float | None,
        window: tuple[int, int],
        state: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class FlashKernel(Kernel):
    """PyTorch's flash varlen ops (`torch_attn::_varlen_attn` and its backward, torch >= 2.10;
    the same ten leading arguments in 2.11 and 2.13). Half precision only."""

    def forward(self, q, k, v, cu, max_len, scale, window):  # type: ignore[no-untyped-def]
        _varlen_fn()  # importing the module registers the ops
        out, lse, state = torch.ops.torch_attn._varlen_attn(
            q, k, v, cu, cu, max_len, max_len, window == (-1, 0), scale, list(window)
        )
        return out, lse, state

    def backward(self, dout, q, k, v, out, lse, cu, max_len, scale, window, state):  # type: ignore[no-untyped-def]
        dq, dk, dv = torch.ops.torch_attn._varlen_attn_backward(
            dout.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            cu,
            cu,
            max_len,
            max_len,
            window == (-1, 0),
            state,
            scale,
            list(window),
        )
        return dq, dk, dv


class ReferenceKernel(Kernel):
    """The same maths in plain PyTorch with an explicit block-causal, windowed mask: for CPUs
    and for checking the flash composition. Memory grows with the square of the row."""

    @staticmethod
    def _mask(cu: torch.Tensor, window: tuple[int, int], device: torch.device) -> torch.Tensor:
        lengths = cu.diff().long()
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths.to(device))
        starts = torch.repeat_interleave(cu[:-1].long().to(device), lengths.to(device))
        pos = torch.arange(int(cu[-1]), device=device) - starts
        allowed = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
        if window[0] >= 0:
            allowed &= pos[:, None] - pos[None, :] <= window[0]
        return allowed  # (query, key)

    @staticmethod
    def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.repeat_interleave(heads // x.shape[1], dim=1)

    def _probs(self, q, k, cu, scale, window):  # type: ignore[no-untyped-def]
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        scores = torch.einsum("thd,shd->hts", _acc(q), _acc(self._expand(k, q.shape[1])))
        scores = scores * scale
        return scores.masked_fill(~self._mask(cu, window, q.device), float("-inf")), scale

    def forward(self, q, k, v, cu, max_len, scale, window):  # type: ignore[no-untyped-def]
        scores, _ = self._probs(q, k, cu, scale, window)
        lse = torch.logsumexp(scores, dim=-1)  # (H, T)
        probs = torch.exp(scores - lse[..., None])
        out = torch.einsum("hts,shd->thd", probs, _acc(self._expand(v, q.shape[1])))
        return out.to(q.dtype), lse, torch.zeros(2, dtype=torch.int64)

    def backward(self, dout, q, k, v, out, lse, cu, max_len, scale, window, state):  # type: ignore[no-untyped-def]
        heads, kv_heads = q.shape[1], k.shape[1]
        scores, scale = self._probs(q, k, cu, scale, window)
        probs = torch.exp(scores - lse[..., None])  # (H, T, S), the sink in lse if it has one
        dout32 = _acc(dout)
        vv = _acc(self._expand(v, heads))
        dv = torch.einsum("hts,thd->shd", probs, dout32)
        dp = torch.einsum("thd,shd->hts", dout32, vv)
        row = (dout32 * _acc(out)).sum(-1).transpose(0, 1)  # (H, T)
        ds = probs * (dp - row[..., None])
        dq = torch.einsum("hts,shd->thd", ds, _acc(self._expand(k, heads))) * scale
        dk = torch.einsum("hts,thd->shd", ds, _acc(q)) * scale
        group = heads // kv_heads
        dk = dk.reshape(dk.shape[0], kv_heads, group, -1).sum(2)
        dv = dv.reshape(dv.shape[0], kv_heads, group, -1).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


FLASH = FlashKernel()
REFERENCE = ReferenceKernel()


class SinkAttention(torch.autograd.Function):
    """Varlen attention with per-head sinks, from a kernel that knows nothing of sinks."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        sinks: torch.Tensor,
        cu: torch.Tensor,
        max_len: int,
        scale: float | None,
        window: tuple[int, int],
        kernel: Kernel,
    ) -> torch.Tensor:
        out, lse, state = kernel.forward(q, k, v, cu, max_len, scale, window)
        sink = _acc(sinks)[:, None]  # (H, 1)
        lse_sink = torch.logaddexp(lse, sink)  # (H, T)
        out_sink = (_acc(out) * torch.exp(lse - lse_sink).transpose(0, 1)[..., None]).to(q.dtype)
        ctx.save_for_backward(q, k, v, out_sink, lse_sink, sinks, cu, state)
        ctx.max_len, ctx.scale, ctx.window, ctx.kernel = max_len, scale, window, kernel
        return out_sink

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, v, out_sink, lse_sink, sinks, cu, state = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(
            dout, q, k, v, out_sink, lse_sink, cu, ctx.max_len, ctx.scale, ctx.window, state
        )
        row = (_acc(dout) * _acc(out_sink)).sum(-1).transpose(0, 1)  # (H, T)
        p_sink = torch.exp(_acc(sinks)[:, None] - lse_sink)
        dsinks = -(p_sink * row).sum(-1).to(sinks.dtype)
        return dq, dk, dv, dsinks, None, None, None, None, None


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor | None,
    cu: torch.Tensor,
    max_len: int,
    scale: float | None,
    window: tuple[int, int],
    kernel: Kernel,
) -> torch.Tensor:
    """(T, H, D) packed attention with a per-head sink (None: a sink at -inf, i.e. none) and a
    causal window `(left, 0)` (`(-1, 0)`: no window), through `kernel`."""
    if kernel is FLASH and q.dtype not in (torch.float16, torch.bfloat16):
        half = (
            torch.get_autocast_dtype("cuda")
            if torch.is_autocast_enabled("cuda")
            else torch.bfloat16
        )
        out_dtype = q.dtype
        q, k, v = q.to(half), k.to(half), v.to(half)
    else:
        out_dtype = q.dtype
    if sinks is None:
        sinks = torch.full((q.shape[1],), float("-inf"), device=q.device)
    out = SinkAttention.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), sinks, cu, max_len, scale, window, kernel
    )
    return out.to(out_dtype)  # type: ignore[no-any-return]
