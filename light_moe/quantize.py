"""`light-moe quantize`: write a W4A16 checkpoint in the GPTQ tensor layout (gptq.py), RTN-quantized.

Only the routed experts are quantized; every other tensor is copied unchanged. Per expert linear
{prefix}: qweight int32 [K // 8, N], qzeros int32 [G, N // 8], scales [G, N] (in the checkpoint's
float dtype, so the file loads back bit-identical to quantize-on-load), g_idx int32 [K] = k // g.
config.json gets "quantization_config" {"quant_method": "gptq", "bits": 4, "group_size", "sym",
"desc_act": false, "checkpoint_format"}: "gptq" (zero - 1 stored, 0x77777777 when symmetric) for
symmetric; "gptq_v2" (zero stored as is) for asymmetric, because v1 cannot store a zero point of 0.
Stacked-expert checkpoints (experts.gate_up_proj / down_proj) are written per expert.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from light_moe.quant.gptq import GPTQFormat
from light_moe.quant.scheme import W4A16Config
from light_moe.quant.w4a16 import pack_int4, rtn_quantize, unpack_int4


def encode_gptq(weight: torch.Tensor, scheme: W4A16Config, fmt: GPTQFormat) -> dict[str, torch.Tensor]:
    """RTN of one float linear [N, K] -> GPTQ tensors (suffix -> tensor)."""
    qw = rtn_quantize(weight.unsqueeze(0), scheme)
    q = unpack_int4(qw.qweight[0])  # [N, K]
    n, k = q.shape
    zeros = torch.full_like(qw.scales[0], 8, dtype=torch.uint8) if qw.zeros is None else qw.zeros[0]
    stored_zeros = (zeros.to(torch.int32) - 1) & 0xF if fmt.checkpoint_format == "gptq" else zeros
    return {
        "qweight": pack_int4(q).t().contiguous(),  # [K // 8, N]
        "qzeros": pack_int4(stored_zeros.t().contiguous()),  # [G, N // 8]
        "scales": qw.scales[0].t().contiguous(),  # [G, N]
        "g_idx": (torch.arange(k, dtype=torch.int32) // scheme.group_size),
    }


def _expert_linears(model_in: Path) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """Checkpoint names of the routed experts: per-expert weight -> its prefix, and stacked tensors
    (gate_up_proj / down_proj) -> the per-expert prefixes their rows split into."""
    from light_moe.models.loader import load_model_config
    from light_moe.ops.backend import ReferenceOps

    model_cls, cfg = load_model_config(model_in)
    with torch.device("meta"):
        model = model_cls(cfg, ReferenceOps(), torch.float32, torch.device("meta"))
    per_expert, stacked = {}, {}
    for layer in cfg.moe_layers:
        for part in ("w13", "w2"):
            name = f"model.layers.{layer}.mlp.experts.{part}"
            for e in range(cfg.num_experts):
                for ckpt_name in model.expert_checkpoint_names(name, e):
                    per_expert[ckpt_name] = ckpt_name.removesuffix(".weight")
            stacked[model.fused_expert_checkpoint_name(name)] = tuple(
                tuple(n.removesuffix(".weight") for n in model.expert_checkpoint_names(name, e))
                for e in range(cfg.num_experts))
    return per_expert, stacked


def quantize_checkpoint(model_in: str | Path, out: str | Path, scheme: W4A16Config) -> Path:
    """Write the W4A16 (GPTQ-layout) checkpoint of `model_in` to `out`, shard by shard."""
    model_in, out = Path(model_in), Path(out)
    if out.resolve() == model_in.resolve():
        raise ValueError("--out must differ from --model")
    config = json.loads((model_in / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(f"{model_in} is already quantized ({config['quantization_config'].get('quant_method')})")
    fmt = GPTQFormat(scheme.group_size, sym=scheme.symmetric, desc_act=False,
                     checkpoint_format="gptq" if scheme.symmetric else "gptq_v2")
    per_expert, stacked = _expert_linears(model_in)
    index_file = model_in / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values())) if index_file.is_file() \
        else ["model.safetensors"]
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard in shards:
        tensors = {}
        with safe_open(str(model_in / shard), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if name in per_expert:
                    linears = {per_expert[name]: tensor}
                elif name in stacked:
                    linears = {}
                    for e, prefixes in enumerate(stacked[name]):
                        rows = tensor[e].chunk(len(prefixes), dim=0)  # gate_up_proj: [gate; up]
                        linears.update(dict(zip(prefixes, rows)))
                else:
                    tensors[name] = tensor
                    continue
                for prefix, weight in linears.items():
                    for suffix, value in encode_gptq(weight, scheme, fmt).items():
                        tensors[f"{prefix}.{suffix}"] = value
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
    if index_file.is_file():
        (out / index_file.name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    config["quantization_config"] = {**fmt.to_config(), "quant_tool": "light-moe (RTN, routed experts only)"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in model_in.iterdir():
        if extra.is_file() and extra.name not in ("config.json", index_file.name) and extra.suffix != ".safetensors":
            shutil.copy2(extra, out / extra.name)
    return out
