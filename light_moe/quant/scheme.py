"""The quantization scheme: one frozen object passed explicitly (never a boolean per scheme)."""
from __future__ import annotations

import dataclasses

# W4A16Config is a config like the others and lives with them (config.py, the bottom layer).
from light_moe.config import QUANTIZATION_METHODS, SUPPORTED_GROUP_SIZES, W4A16Config

__all__ = ["QUANTIZATION_METHODS", "SUPPORTED_GROUP_SIZES", "W4A16Config", "parse_quantization"]


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
