"""GPTQ checkpoints (AutoGPTQ / optimum / GPTQModel layout), read into UnpackedLinear.

Per quantized linear W [N, K] with group size g, G = ceil(K / g):
  {prefix}.qweight  int32 [K // 8, N]  8 values of consecutive input rows per int32, row 8i + j at
                                        bits 4j (low nibble first): packed along K
  {prefix}.qzeros   int32 [G, N // 8]  packed the same way along N; checkpoint_format "gptq" (v1,
                                        AutoGPTQ and optimum) stores zero - 1 (so symmetric 8 is
                                        stored as 7: 0x77777777), "gptq_v2" (GPTQModel) stores zero
  {prefix}.scales   float16 [G, N]
  {prefix}.g_idx    int32 [K]          group of each input channel; k // g without act-order,
                                        a permuted assignment with desc_act (act-order)
Settings come from config.json "quantization_config" (quant_method "gptq") or quantize_config.json:
bits, group_size, desc_act, sym, checkpoint_format.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from light_moe.quant.formats import UnpackedLinear, check_bits, check_group_size, expect_shape, fetch
from light_moe.quant.w4a16 import unpack_int4

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
SCALE_DTYPES = ("F16", "BF16", "F32")  # safetensors dtype names; light-moe quantize writes the model's dtype


@dataclass(frozen=True)
class GPTQFormat:
    group_size: int
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"
    method = "gptq"

    @classmethod
    def from_config(cls, cfg: dict, source: str) -> GPTQFormat:
        check_bits("GPTQ", cfg.get("bits", 4), source)
        fmt = str(cfg.get("checkpoint_format", "gptq")).lower()
        if fmt not in CHECKPOINT_FORMATS:
            raise ValueError(f"{source}: GPTQ checkpoint_format={fmt!r} is not supported "
                             f"(supported: {list(CHECKPOINT_FORMATS)})")
        return cls(check_group_size("GPTQ", cfg.get("group_size"), source), bool(cfg.get("sym", True)),
                   bool(cfg.get("desc_act", False)), fmt)

    @property
    def has_zeros(self) -> bool:
        return not self.sym

    def to_config(self) -> dict:
        return {"quant_method": "gptq", "bits": 4, "group_size": self.group_size, "desc_act": self.desc_act,
                "sym": self.sym, "checkpoint_format": self.checkpoint_format}

    def expected_tensors(self, prefix: str, out_features: int, in_features: int) -> list[tuple]:
        """(name, shape, accepted safetensors dtypes, required) of each tensor read_linear reads, checked
        from the headers before anything loads (models/validation.py): codes and zero points packed in
        int32, scales float, g_idx int32 (int64 accepted) and optional."""
        n, k = out_features, in_features
        groups = -(-k // self.group_size)
        return [(f"{prefix}.qweight", (k // 8, n), ("I32",), True),
                (f"{prefix}.qzeros", (groups, n // 8), ("I32",), True),
                (f"{prefix}.scales", (groups, n), SCALE_DTYPES, True),
                (f"{prefix}.g_idx", (k,), ("I32", "I64"), False)]

    def read_linear(self, ckpt, prefix: str, out_features: int, in_features: int) -> UnpackedLinear:
        qweight, qzeros, scales, g_idx = (
            expect_shape(name, fetch(ckpt, name), shape) if required or name in ckpt else None
            for name, shape, _, required in self.expected_tensors(prefix, out_features, in_features))
        g_idx = torch.arange(in_features) // self.group_size if g_idx is None else g_idx.long()
        q = unpack_int4(qweight.t().contiguous())  # [N, K]
        zeros = unpack_int4(qzeros).t().contiguous()  # [N, G] as stored
        if self.checkpoint_format == "gptq":
            zeros = (zeros + 1) & 0xF  # v1 stores zero - 1 (a stored 15 is a zero point of 0)
        if self.sym:
            if not bool((zeros == 8).all()):
                raise ValueError(f"{prefix}: the GPTQ config says sym=true but qzeros hold zero points other "
                                 f"than 8 (checkpoint_format={self.checkpoint_format!r}: is it the right one?)")
            zeros = None
        return UnpackedLinear(q, scales.t().contiguous(), zeros, g_idx)
