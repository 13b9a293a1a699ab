"""The quantization scheme: one frozen object passed explicitly (never a boolean per scheme)."""
from __future__ import annotations

from dataclasses import dataclass

QUANTIZATION_METHODS = ("w4a16",)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class W4A16Config:
    """int4 weights, 16-bit activations, one scale (and, asymmetric, one zero point) per group of
    `group_size` consecutive input channels. Symmetric uses the fixed zero point 8."""

    group_size: int = 128
    symmetric: bool = True
    bits: int = 4

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise ValueError(f"W4A16 supports bits=4 only, got bits={self.bits}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"W4A16 group_size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size}")

    @property
    def name(self) -> str:
        return f"w4a16-g{self.group_size}-{'sym' if self.symmetric else 'asym'}"


def parse_quantization(quantization: str | W4A16Config | None, group_size: int = 128,
                       symmetric: bool = True) -> W4A16Config | None:
    """Engine / CLI arguments -> scheme object (None: no quantization on load)."""
    if quantization is None or isinstance(quantization, W4A16Config):
        return quantization
    if quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS} or None, got {quantization!r}")
    return W4A16Config(group_size=group_size, symmetric=symmetric)
