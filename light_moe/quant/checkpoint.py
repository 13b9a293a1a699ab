"""Quantized checkpoints: detect GPTQ / AWQ settings, repack their expert tensors into the canonical
W4A16 format (w4a16.py), dequantize their other linears, and write our own checkpoints.

Act-order (GPTQ desc_act): the group of input channel k is g_idx[k], not k // g. Sorting the
channels by group (perm = stable argsort of g_idx) makes every group contiguous again without
touching a single code or scale, so the repack is lossless; the permutation is kept per expert in
QuantizedWeight.perm and applied to the activation (x[:, perm]) by whoever runs the GEMM. The gate
and up projections of one expert share their input, so their g_idx must agree (GPTQ derives both
from the same Hessian); a checkpoint where they differ is refused.
"""
from __future__ import annotations

from pathlib import Path

import torch

from light_moe.config import read_json_object
from light_moe.quant.awq import AWQFormat
from light_moe.quant.formats import UnpackedLinear
from light_moe.quant.gptq import GPTQFormat
from light_moe.quant.w4a16 import QuantizedWeight, pack_int4

CheckpointFormat = GPTQFormat | AWQFormat
_READERS = {"gptq": GPTQFormat, "awq": AWQFormat}


def read_checkpoint_quantization(model_path: str | Path) -> CheckpointFormat | None:
    """The quantization a checkpoint was saved with: config.json "quantization_config", else
    quantize_config.json (AutoGPTQ) or quant_config.json (AutoAWQ); None for a float checkpoint or an MXFP4 one
    (dequantised at load)."""
    model_path = Path(model_path)
    candidates = []
    config = model_path / "config.json"
    if config.is_file():
        qc = read_json_object(config).get("quantization_config")
        if qc is not None and not isinstance(qc, dict):
            raise ValueError(f"{config}: quantization_config must be an object, got {qc!r}")
        if qc:
            candidates.append((qc, f"{config} quantization_config"))
    for fname, default_method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        path = model_path / fname
        if not candidates and path.is_file():
            candidates.append(({"quant_method": default_method, **read_json_object(path)}, str(path)))
    if not candidates:
        return None
    cfg, source = candidates[0]
    method = str(cfg.get("quant_method", "gptq")).lower()
    if method == "mxfp4":  # gpt-oss's MXFP4 experts: the loader dequantises them, the model is float (quant/mxfp4.py)
        return None
    if method not in _READERS:
        raise ValueError(f"{source}: quant_method={method!r} is not supported (supported: {sorted(_READERS)})")
    return _READERS[method].from_config(cfg, source)


def dequantize_linear(fmt: CheckpointFormat, ckpt, prefix: str, out_features: int, in_features: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """A quantized non-expert linear (attention, shared expert, dense MLP) -> float [N, K]."""
    return fmt.read_linear(ckpt, prefix, out_features, in_features).dequantize(dtype)


def _act_order_perm(linear: UnpackedLinear, group_size: int, where: str) -> torch.Tensor | None:
    """Stable sort of the input channels by group; None when groups are already contiguous."""
    gidx = linear.group_of_column
    k = gidx.numel()
    if torch.equal(gidx, torch.arange(k) // group_size):
        return None
    counts = torch.bincount(gidx, minlength=-(-k // group_size))
    if bool((counts != group_size).any()):
        raise ValueError(f"{where}: g_idx assigns {counts.tolist()} channels to its groups; act-order repacking "
                         f"needs exactly group_size={group_size} channels per group")
    return torch.sort(gidx, stable=True).indices


def read_quantized_experts(fmt: CheckpointFormat, ckpt, parts_per_expert: list[list[str]],
                           part_out_features: list[int], in_features: int, dtype: torch.dtype) -> QuantizedWeight:
    """Stack per-expert quantized linears into one QuantizedWeight [E, sum(parts N), K].

    parts_per_expert[e] lists the checkpoint prefixes concatenated along N for expert e
    (w13: [gate, up]; w2: [down]). With fmt.desc_act every expert carries a permutation (the
    identity where its g_idx is already contiguous), so all layers have the same buffers."""
    g = fmt.group_size
    qs, scales, zeros, perms = [], [], [], []
    for prefixes in parts_per_expert:
        parts = [fmt.read_linear(ckpt, p, n, in_features) for p, n in zip(prefixes, part_out_features)]
        part_perms = [_act_order_perm(part, g, p) for part, p in zip(parts, prefixes)]
        perm = part_perms[0]
        for other, p in zip(part_perms[1:], prefixes[1:]):
            if (perm is None) != (other is None) or (perm is not None and not torch.equal(perm, other)):
                raise ValueError(f"{p} and {prefixes[0]} have different act-order g_idx; the fused "
                                 "gate/up GEMM needs one input-channel order per expert")
        q = torch.cat([part.q for part in parts])  # [N, K]
        qs.append(pack_int4(q if perm is None else q[:, perm]))
        scales.append(torch.cat([part.scales for part in parts]).to(dtype))
        if fmt.has_zeros:
            zeros.append(torch.cat([part.zeros for part in parts]))
        perms.append(perm)
    perm = None
    if fmt.desc_act or any(p is not None for p in perms):
        perm = torch.stack([torch.arange(in_features) if p is None else p for p in perms]).to(torch.int32)
    return QuantizedWeight(torch.stack(qs), torch.stack(scales), torch.stack(zeros) if fmt.has_zeros else None,
                           g, perm)
