"""Weight-only quantization: the canonical W4A16 format (w4a16.py), its scheme (scheme.py), and
readers that repack GPTQ / AWQ checkpoints into it (gptq.py, awq.py, checkpoint.py)."""
from light_moe.quant.scheme import W4A16Config, parse_quantization
from light_moe.quant.w4a16 import QuantizedWeight, dequantize, pack_int4, rtn_quantize, unpack_int4

__all__ = ["W4A16Config", "parse_quantization", "QuantizedWeight", "dequantize", "pack_int4", "rtn_quantize",
           "unpack_int4"]
