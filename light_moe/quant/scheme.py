"""The quantization scheme: one frozen object passed explicitly (never a boolean per scheme)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

QUANTIZATION_METHODS = ("w4a16",)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class W4A16Config:
    """int4 weights, 16-bit activations, one scale (and, asymmetric, one zero point) per group of
    `group_size` consecutive input channels. Symmetric uses the fixed zero point 8.

    The routed experts are always quantized; attention=True quantizes the attention projections
    (qkv_proj, o_proj) as well, run as one-expert W4A16 GEMMs (layers/linear.py)."""

    group_size: int = 128
    symmetric: bool = True
    bits: int = 4
    attention: bool = False

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise ValueError(f"W4A16 supports bits=4 only, got bits={self.bits}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"W4A16 group_size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size}")

    @property
    def name(self) -> str:
        return f"w4a16-g{self.group_size}-{'sym' if self.symmetric else 'asym'}{'-attn' if self.attention else ''}"


def parse_quantization(quantization: str | W4A16Config | None, group_size: int = 128,
                       symmetric: bool = True, quantize_attention: bool = False) -> W4A16Config | None:
    """Engine / CLI arguments -> scheme object (None: no quantization on load).
    quantize_attention needs a W4A16 scheme: it adds the attention projections to the experts."""
    if quantization is None:
        if quantize_attention:
            raise ValueError("quant_attention=True (--quant-attention) needs quantization='w4a16'")
        return None
    if isinstance(quantization, W4A16Config):
        return dataclasses.replace(quantization, attention=True) if quantize_attention else quantization
    if quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS} or None, got {quantization!r}")
    return W4A16Config(group_size=group_size, symmetric=symmetric, attention=quantize_attention)
