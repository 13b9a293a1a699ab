"""What a checkpoint reader hands to the loader: one linear layer, unpacked, in input-channel order.

Shape legend: N output features, K input features, G = K // g groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from light_moe.quant.scheme import SUPPORTED_GROUP_SIZES


@dataclass
class UnpackedLinear:
    """q uint8 [N, K] (columns in input-channel order), scales [N, G], zeros uint8 [N, G] or None
    (zero point 8), group_of_column int64 [K] (act-order g_idx; column k uses group g_idx[k])."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_of_column: torch.Tensor

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """[N, K] float in `dtype`: (q - z) * s formed in float32, as the canonical format does."""
        gidx = self.group_of_column
        s = self.scales.float()[:, gidx]
        z = 8.0 if self.zeros is None else self.zeros.float()[:, gidx]
        return ((self.q.float() - z) * s).to(dtype)


def check_group_size(method: str, group_size, source: str) -> int:
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{source}: {method} group_size={group_size} is not supported "
                         f"(supported: {list(SUPPORTED_GROUP_SIZES)}; -1, per-channel, is not)")
    return group_size


def check_bits(method: str, bits, source: str) -> None:
    if bits != 4:
        raise ValueError(f"{source}: {method} bits={bits} is not supported (W4A16 loads 4-bit weights only)")


def fetch(ckpt, name: str) -> torch.Tensor:
    if name not in ckpt:
        raise ValueError(f"checkpoint tensor {name} is missing (looked in {ckpt.describe()})")
    return ckpt.get(name)


def expect_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"expected tensor {name} of shape {list(shape)}, found {list(tensor.shape)}")
    return tensor
