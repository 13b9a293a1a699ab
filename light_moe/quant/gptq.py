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

    def read_linear(self, ckpt, prefix: str, out_features: int, in_features: int) -> UnpackedLinear:
        n, k, g = out_features, in_features, self.group_size
        groups = -(-k // g)
        qweight = expect_shape(f"{prefix}.qweight", fetch(ckpt, f"{prefix}.qweight"), (k // 8, n))
        qzeros = expect_shape(f"{prefix}.qzeros", fetch(ckpt, f"{prefix}.qzeros"), (groups, n // 8))
        scales = expect_shape(f"{prefix}.scales", fetch(ckpt, f"{prefix}.scales"), (groups, n))
        if f"{prefix}.g_idx" in ckpt:
            g_idx = expect_shape(f"{prefix}.g_idx", fetch(ckpt, f"{prefix}.g_idx"), (k,)).long()
        else:
            g_idx = torch.arange(k) // g
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
