"""Attention for packed rows: PyTorch's variable-length flash kernel, registered with transformers.

transformers' own ``flash_attention_2`` path needs the separate flash-attn package. PyTorch
ships the same kind of kernel as ``torch.nn.attention.varlen.varlen_attn``; registered here as
an attention implementation, it takes the ``cu_seq_lens_q``/``max_length_q`` keyword arguments
that transformers passes down to every attention layer, so a packed row costs attention only
inside each dialogue. Where it is missing (a CPU, an older PyTorch) training uses ``sdpa`` with
the block-causal mask that transformers builds from the packed ``position_ids``.
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
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """(B, H, T, D) in, (B, T, H, D) out, like transformers' other attention functions."""
    varlen_attn = _varlen_fn()
    assert varlen_attn is not None
    batch, heads, length, dim = query.shape
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None:  # no packing information: every row is one sequence
        cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=query.device)
        max_len = length
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], dim)
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


def choose_attention(requested: str) -> str:
    """The attention implementation to load the model with: `auto` picks varlen on a GPU."""
    if requested == "auto":
        requested = "varlen" if varlen_available() else "sdpa"
    if requested == "varlen":
        if not varlen_available():
            log.warning("varlen attention needs CUDA and torch.nn.attention.varlen; using sdpa")
            return "sdpa"
        return register_varlen_attention()
    return requested
