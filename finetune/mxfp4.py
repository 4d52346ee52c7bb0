"""MXFP4, the format gpt-oss ships its expert weights in: packing and unpacking.

A checkpoint stores each expert projection `<proj>` (transformers' layout `[experts, in, out]`)
as `<proj>_blocks` (`[experts, out, in / 32, 16]` uint8: 32 FP4 E2M1 codes per block, two per
byte, the even element in the low nibble) and `<proj>_scales` (`[experts, out, in / 32]` uint8:
one power-of-two scale per block, stored as its exponent + 127). That is the layout
transformers' MXFP4 integration reads (`Mxfp4Config`, `dequantize=True` for training in bf16)
and vLLM's gpt-oss loader takes.

`quantize` rounds weights to the nearest representable value (used to write small test
checkpoints whose dequantized weights are known exactly); `random_codes` makes random blocks
and scales directly, which is how a full-size stand-in checkpoint is written in seconds.
"""

from __future__ import annotations

import torch

BLOCK = 32
#: The FP4 (E2M1) values of codes 0..15: the sign is the high bit of the nibble.
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
SCALE_BIAS = 127


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` (`[experts, in, out]`) as (blocks, scales), rounded to the nearest MXFP4 value."""
    experts, fan_in, fan_out = weight.shape
    if fan_in % BLOCK:
        raise ValueError(f"the input dimension {fan_in} is not a multiple of {BLOCK}")
    w = weight.detach().float().transpose(1, 2).reshape(experts, fan_out, fan_in // BLOCK, BLOCK)
    amax = w.abs().amax(dim=-1, keepdim=True)
    # the smallest power of two that brings the block's largest magnitude within FP4's 6.0
    exponent = torch.ceil(torch.log2(amax.clamp(min=2.0**-126) / 6.0)).clamp(-127, 127)
    scaled = w / torch.exp2(exponent)
    magnitudes = torch.tensor(FP4_VALUES[:8])
    code = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)
    code = code + 8 * (scaled < 0).long() * (code > 0).long()
    code = code.to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    scales = (exponent.squeeze(-1) + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The `[experts, in, out]` float32 weight that (blocks, scales) encode."""
    lut = torch.tensor(FP4_VALUES)
    low = lut[(blocks & 0x0F).long()]
    high = lut[(blocks >> 4).long()]
    values = torch.stack([low, high], dim=-1).flatten(-2)  # [experts, out, groups, 32]
    values = values * torch.exp2(scales.float() - SCALE_BIAS).unsqueeze(-1)
    experts, fan_out = blocks.shape[:2]
    return values.reshape(experts, fan_out, -1).transpose(1, 2).contiguous()


def random_codes(
    shape: tuple[int, int, int], rms: float, generator: torch.Generator, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (blocks, scales) for a `[experts, in, out]` weight whose values have about `rms`:
    uniform random codes (rms 2.93) under one power-of-two scale."""
    experts, fan_in, fan_out = shape
    blocks = torch.randint(
        0, 256, (experts, fan_out, fan_in // BLOCK, BLOCK // 2), generator=generator, device=device
    ).to(torch.uint8)
    code_rms = (sum(v * v for v in FP4_VALUES) / len(FP4_VALUES)) ** 0.5
    exponent = round(float(torch.log2(torch.tensor(rms / code_rms))))
    scales = torch.full(
        (experts, fan_out, fan_in // BLOCK), exponent + SCALE_BIAS, dtype=torch.uint8, device=device
    )
    return blocks, scales
