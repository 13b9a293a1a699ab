"""AWQ checkpoints (AutoAWQ "gemm" version), read into UnpackedLinear.

Per quantized linear W [N, K] with group size g, G = K // g:
  {prefix}.qweight  int32 [K, N // 8]  packed along N: nibble i (bits 4i) of word c holds output
                                        column 8c + AWQ_ORDER[i], AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
  {prefix}.qzeros   int32 [G, N // 8]  same packing; the zero point itself (no "minus one")
  {prefix}.scales   float16 [G, N]
  dequant: W[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]
Settings: config.json "quantization_config" (quant_method "awq": bits, group_size, zero_point,
version) or AutoAWQ's quant_config.json (w_bit, q_group_size, zero_point, version).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from light_moe.quant.formats import UnpackedLinear, check_bits, check_group_size, expect_shape, fetch
from light_moe.quant.gptq import SCALE_DTYPES
from light_moe.quant.w4a16 import unpack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # nibble holding column j of each group of 8


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N // 8] in AWQ order -> uint8 [R, N] in column order."""
    nibbles = unpack_int4(packed).view(packed.shape[0], -1, 8)  # [R, N // 8, 8] nibble order
    return nibbles[..., list(AWQ_REVERSE_ORDER)].reshape(packed.shape[0], -1)


@dataclass(frozen=True)
class AWQFormat:
    group_size: int
    method = "awq"
    has_zeros = True
    desc_act = False

    @classmethod
    def from_config(cls, cfg: dict, source: str) -> AWQFormat:
        check_bits("AWQ", cfg.get("bits", cfg.get("w_bit", 4)), source)
        version = str(cfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"{source}: AWQ version={version!r} is not supported (only the GEMM packing)")
        if not cfg.get("zero_point", True):
            raise ValueError(f"{source}: AWQ zero_point=false is not supported (only AWQ with zero points)")
        return cls(check_group_size("AWQ", cfg.get("group_size", cfg.get("q_group_size")), source))

    def expected_tensors(self, prefix: str, out_features: int, in_features: int) -> list[tuple]:
        """(name, shape, accepted safetensors dtypes, required) of each tensor read_linear reads, checked
        from the headers before anything loads (models/validation.py)."""
        n, k, g = out_features, in_features, self.group_size
        return [(f"{prefix}.qweight", (k, n // 8), ("I32",), True),
                (f"{prefix}.qzeros", (k // g, n // 8), ("I32",), True),
                (f"{prefix}.scales", (k // g, n), SCALE_DTYPES, True)]

    def read_linear(self, ckpt, prefix: str, out_features: int, in_features: int) -> UnpackedLinear:
        qweight, qzeros, scales = (expect_shape(name, fetch(ckpt, name), shape)
                                   for name, shape, _, _ in self.expected_tensors(prefix, out_features, in_features))
        q = unpack_awq(qweight).t().contiguous()  # [N, K]
        zeros = unpack_awq(qzeros).t().contiguous()  # [N, G]
        return UnpackedLinear(q, scales.t().contiguous(), zeros, torch.arange(in_features) // self.group_size)
