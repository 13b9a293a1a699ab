"""Build a model from a Hugging Face directory: config.json -> ModelConfig -> module -> weights.

Only safetensors are read (never pickle): model.safetensors, or the shards listed in
model.safetensors.index.json. Per-expert checkpoint tensors are stacked into the fused
mlp.experts.w13 [E, 2I, H] / w2 [E, H, I] parameters; checkpoints that already store stacked
experts (gate_up_proj / down_proj) load directly, in the family's layout (MoECausalLM.from_checkpoint:
gpt-oss's [E, K, N] with interleaved gate/up), and MXFP4 ones (<name>_blocks / _scales, OpenAI's gpt-oss
release) are dequantised to the model dtype (quant/mxfp4.py). Every missing or misshapen tensor is reported
by name together with the file it was looked for in.

W4A16 (docs/quantization.md): with a scheme, or a GPTQ / AWQ checkpoint, the routed experts of
every MoE layer are held in the canonical int4 format (light_moe/quant/w4a16.py), one layer at a
time: float experts are read, moved to the device and quantized with round-to-nearest; GPTQ / AWQ
experts are repacked. Other quantized linears of such checkpoints (attention, shared experts, dense
MLPs) are dequantized to the model dtype at load time.
"""
from __future__ import annotations

import dataclasses
import logging
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from light_moe.config import ModelConfig, read_hf_config
from light_moe.layers.attention import Attention
from light_moe.layers.linear import QuantizedLinear
from light_moe.layers.moe import QuantizedFusedExperts
from light_moe.layers.rotary import RotaryEmbedding
from light_moe.models.base import MoECausalLM
from light_moe.models.generation_config import read_generation_config
from light_moe.models.registry import resolve_architecture
from light_moe.models.validation import expert_prefixes, index_shards, validate_checkpoint
from light_moe.ops.backend import MoEOps
from light_moe.quant import mxfp4
from light_moe.quant.checkpoint import (
    CheckpointFormat,
    dequantize_linear,
    read_checkpoint_quantization,
    read_quantized_experts,
)
from light_moe.quant.scheme import W4A16Config
from light_moe.quant.w4a16 import rtn_quantize

logger = logging.getLogger(__name__)


def load_model_config(model_path: str | Path) -> tuple[type[MoECausalLM], ModelConfig]:
    """config.json and generation_config.json, both validated (nothing is allocated yet); the
    eos_token_ids are the two files' together."""
    hf = read_hf_config(model_path)
    model_cls = resolve_architecture(hf)
    cfg = model_cls.parse_config(hf)
    extra_eos = [i for i in read_generation_config(model_path).eos_token_ids if i not in cfg.eos_token_ids]
    if extra_eos:
        cfg = dataclasses.replace(cfg, eos_token_ids=cfg.eos_token_ids + tuple(dict.fromkeys(extra_eos)))
    return model_cls, cfg


class CheckpointIndex:
    """Which safetensors file holds which tensor, with lazily opened handles. The shards of an index
    are confined to the model directory (validation.shard_path)."""

    def __init__(self, model_path: Path):
        self.model_path = model_path
        index_file = model_path / "model.safetensors.index.json"
        single = model_path / "model.safetensors"
        if index_file.is_file():
            self.files = index_shards(model_path, index_file)
        elif single.is_file():
            self.files = {name: single for name in self._keys_of(single)}
        else:
            pickles = sorted(p.name for p in model_path.glob("*.bin")) + sorted(p.name for p in model_path.glob("*.pt"))
            hint = f" (found {pickles}: pickle checkpoints are never loaded; convert to safetensors)" if pickles else ""
            raise FileNotFoundError(f"{model_path}: no model.safetensors or model.safetensors.index.json{hint}")
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _keys_of(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _handle(self, name: str):
        path = self.files.get(name)
        if path is None:
            raise KeyError(name)
        if path not in self._handles:
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint shard {path} (holding {name}) is missing")
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as exc:
                raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
        return self._handles[path]

    def get(self, name: str) -> torch.Tensor:
        handle = self._handle(name)
        try:
            return handle.get_tensor(name)
        except Exception as exc:
            raise ValueError(f"tensor {name} in {self.files[name]} could not be read: {exc}") from exc

    def header(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype name such as "BF16", shape) of a tensor, from its file's header: no data is read."""
        tensor_slice = self._handle(name).get_slice(name)
        return tensor_slice.get_dtype(), tuple(tensor_slice.get_shape())

    def file_of(self, name: str) -> str:
        return self.files[name].name

    def describe(self) -> str:
        files = sorted({p.name for p in self.files.values()})
        return ", ".join(files) if files else str(self.model_path)


def _checked(name: str, tensor: torch.Tensor, expected: torch.Size, where: str) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"expected tensor {name} of shape {list(expected)}, found {list(tensor.shape)} in {where}")
    return tensor


def _read_param(ckpt: CheckpointIndex, model: MoECausalLM, name: str, shape: torch.Size,
                quant: CheckpointFormat | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    where = ckpt.describe()
    if name.endswith(("experts.w13", "experts.w2")):
        # with expert parallelism the block holds only its rank's experts (global ids, ascending)
        expert_ids = model.get_submodule(name.rsplit(".experts.", 1)[0]).local_expert_ids
        fused = model.fused_expert_checkpoint_name(name)
        full_shape = model.checkpoint_shape(name, (model.config.num_experts, *shape[1:]))
        if fused in ckpt:
            stacked = _checked(fused, ckpt.get(fused), full_shape, where)
            stacked = stacked if len(expert_ids) == stacked.shape[0] else stacked[list(expert_ids)]
            return model.from_checkpoint(name, stacked)
        if fused + mxfp4.BLOCKS_SUFFIX in ckpt:  # dequantised at load (quant/mxfp4.py)
            blocks_shape, scales_shape = mxfp4.checkpoint_shapes(full_shape)
            rows = list(expert_ids)
            blocks = _checked(fused + mxfp4.BLOCKS_SUFFIX, ckpt.get(fused + mxfp4.BLOCKS_SUFFIX), blocks_shape, where)
            scales = _checked(fused + mxfp4.SCALES_SUFFIX, ckpt.get(fused + mxfp4.SCALES_SUFFIX), scales_shape, where)
            return model.from_checkpoint(name, mxfp4.dequantize(blocks[rows], scales[rows], dtype or torch.float32))
        per_expert = []
        for e in expert_ids:
            parts = []
            for part_name in model.expert_checkpoint_names(name, e):
                if part_name not in ckpt:
                    raise ValueError(f"checkpoint tensor {part_name} is missing (looked in {where})")
                parts.append(ckpt.get(part_name))
            stacked = torch.cat(parts, dim=0)
            per_expert.append(_checked(f"{'+'.join(model.expert_checkpoint_names(name, e))}", stacked, shape[1:],
                                       where))
        return torch.stack(per_expert)
    parts = model.stacked_checkpoint_names(name)
    if parts is not None:  # e.g. qkv_proj: the q, k, v rows concatenated
        if sum(rows for _, rows in parts) != shape[0]:
            raise ValueError(f"{name}: parts {parts} do not add up to {shape[0]} rows")
        return torch.cat([_read_linear(ckpt, part, (rows, *shape[1:]), quant, dtype) for part, rows in parts])
    tensor = _read_linear(ckpt, model.checkpoint_name(name), model.checkpoint_shape(name, shape), quant, dtype)
    return model.from_checkpoint(name, tensor)


def _read_linear(ckpt: CheckpointIndex, ckpt_name: str, shape, quant: CheckpointFormat | None,
                 dtype: torch.dtype | None) -> torch.Tensor:
    """One non-expert checkpoint tensor of `shape` (a quantized linear is dequantized)."""
    where = ckpt.describe()
    prefix = ckpt_name.removesuffix(".weight")
    if quant is not None and ckpt_name not in ckpt and f"{prefix}.qweight" in ckpt:
        return dequantize_linear(quant, ckpt, prefix, shape[0], shape[1], dtype)
    if ckpt_name not in ckpt:
        raise ValueError(f"checkpoint tensor {ckpt_name} is missing (looked in {where})")
    return _checked(ckpt_name, ckpt.get(ckpt_name), shape, where)


def _dummy_generator(device: torch.device, seed: int, *key) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(zlib.crc32(repr((seed, *key)).encode()))


def _fill_dummy(model: MoECausalLM, seed: int) -> None:
    """Random weights for benchmarks: N(0, 0.02), norms 1, generated on the model's device.

    Every tensor (and every expert of a stacked expert tensor, by its global id) draws from its own
    generator seeded by (seed, name, expert), so ranks of an expert-parallel run that hold different
    experts still build pieces of one and the same random model."""
    gen_device = next(model.parameters()).device
    expert_ids = {}
    for layer_name, module in model.named_modules():
        if hasattr(module, "local_expert_ids"):
            expert_ids[layer_name + ".experts.w13"] = module.local_expert_ids
            expert_ids[layer_name + ".experts.w2"] = module.local_expert_ids

    def generator(*key) -> torch.Generator:
        return _dummy_generator(gen_device, seed, *key)

    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name in expert_ids:
            for row, expert in enumerate(expert_ids[name]):
                param.data[row].normal_(0.0, 0.02, generator=generator(name, expert))
        else:
            param.data.normal_(0.0, 0.02, generator=generator(name))


def _load_quantized_experts(model: MoECausalLM, ckpt: CheckpointIndex | None, quant: CheckpointFormat | None,
                            scheme: W4A16Config, dtype: torch.dtype, seed: int) -> None:
    """Fill every QuantizedFusedExperts, one layer (and one of w13 / w2) at a time, so that at most
    one layer's float experts exist at once: repacked from a GPTQ / AWQ checkpoint, or read (random
    for load_format='dummy', as _fill_dummy would draw them) and quantized with RTN."""
    for layer_name, module in model.named_modules():
        if not isinstance(module, QuantizedFusedExperts):
            continue
        block = model.get_submodule(layer_name.rsplit(".", 1)[0])
        device = module.w13_qweight.device
        for part in ("w13", "w2"):
            name = f"{layer_name}.{part}"
            num_experts, out_features, in_features = module.weight(part).shape
            names = expert_prefixes(model, name)
            if quant is not None and f"{names[0][0]}.qweight" in ckpt:
                part_out = [out_features // len(names[0])] * len(names[0])
                weight = read_quantized_experts(quant, ckpt, names, part_out, in_features, dtype).to(device)
            else:
                if ckpt is None:
                    w = torch.empty(num_experts, out_features, in_features, dtype=dtype, device=device)
                    for row, expert in enumerate(block.local_expert_ids):
                        w[row].normal_(0.0, 0.02, generator=_dummy_generator(device, seed, name, expert))
                else:
                    w = _read_param(ckpt, model, name, (num_experts, out_features, in_features))
                weight = rtn_quantize(w.to(device=device, dtype=dtype), scheme)
            module.load(part, weight)


def _use_quantized_attention(model: MoECausalLM, requested: W4A16Config | None,
                             quant: CheckpointFormat | None) -> None:
    """A scheme with attention=True: every Attention holds qkv_proj / o_proj as W4A16 QuantizedLinear, built
    on the meta device before allocation; in the requested scheme, or a GPTQ / AWQ checkpoint's own."""
    if requested is None or not requested.attention:
        return
    scheme = requested
    if quant is not None:
        if quant.desc_act:
            raise ValueError(f"W4A16 attention projections (quant_attention) are not supported for act-order "
                             f"(desc_act) {quant.method.upper()} checkpoints")
        scheme = W4A16Config(group_size=quant.group_size, symmetric=not quant.has_zeros, attention=True)
    for module in model.modules():
        if isinstance(module, Attention):
            module.use_quantized_projections(scheme)


def _load_quantized_attention(model: MoECausalLM, ckpt: CheckpointIndex | None, quant: CheckpointFormat | None,
                              dtype: torch.dtype, seed: int) -> None:
    """Fill every QuantizedLinear, one at a time, then let the backend repack it: repacked (exactly) from a
    GPTQ / AWQ checkpoint's quantized linears (q, k, v rows stacked for qkv_proj), else the float weight
    (read as its nn.Linear would be, or drawn as _fill_dummy would draw it for load_format='dummy')
    quantized with RTN."""
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        weight_name, shape = f"{name}.weight", (module.out_features, module.in_features)
        device = module.qweight.device
        parts = model.stacked_checkpoint_names(weight_name) or [(model.checkpoint_name(weight_name), shape[0])]
        prefixes = [part.removesuffix(".weight") for part, _ in parts]
        if quant is not None and all(f"{prefix}.qweight" in ckpt for prefix in prefixes):
            weight = read_quantized_experts(quant, ckpt, [prefixes], [rows for _, rows in parts], shape[1], dtype)
        else:
            if ckpt is None:
                w = torch.empty(shape, dtype=dtype, device=device)
                w.normal_(0.0, 0.02, generator=_dummy_generator(device, seed, weight_name))
            else:
                w = _read_param(ckpt, model, weight_name, torch.Size(shape), quant, dtype)
            weight = rtn_quantize(w.to(device=device, dtype=dtype).unsqueeze(0), module.scheme)
        module.load(weight.to(device))
        module.prepare()


def build_model(model_path: str | Path, ops: MoEOps, dtype: torch.dtype, device: torch.device,
                load_format: str = "auto", seed: int = 0, progress: bool = True,
                expert_dispatchers: list | None = None, quantization: W4A16Config | None = None) -> MoECausalLM:
    """expert_dispatchers: one per MoE layer (light_moe.parallel.dispatch) under expert parallelism;
    each layer then allocates and loads only the dispatcher's local experts.
    quantization: hold the routed experts as W4A16, quantized on load with RTN. A GPTQ / AWQ
    checkpoint is always loaded as W4A16 with its own group size and zero points."""
    model_path = Path(model_path)
    model_cls, cfg = load_model_config(model_path)
    quant = None if load_format == "dummy" else read_checkpoint_quantization(model_path)
    scheme = quantization
    if quant is not None:
        scheme = W4A16Config(group_size=quant.group_size, symmetric=not quant.has_zeros)
        if quantization is not None and quantization != scheme:
            logger.info("%s checkpoint: using its own scheme %s, not %s", quant.method, scheme.name, quantization.name)
    with torch.device("meta"):
        model = model_cls(cfg, ops, dtype, torch.device("meta"))
    if scheme is not None and expert_dispatchers is not None:
        raise ValueError("W4A16 experts under expert parallelism are not supported yet")
    if scheme is not None:
        for block in model.moe_blocks():
            block.use_quantized_experts(scheme, act_order=quant is not None and quant.desc_act)
    _use_quantized_attention(model, quantization, quant)
    if expert_dispatchers is not None:
        blocks = model.moe_blocks()
        if len(expert_dispatchers) != len(blocks):
            raise ValueError(f"{len(expert_dispatchers)} expert dispatchers for {len(blocks)} MoE layers")
        for block, dispatcher in zip(blocks, expert_dispatchers):
            block.use_dispatcher(dispatcher)
    ckpt = None if load_format == "dummy" else CheckpointIndex(model_path)
    if ckpt is not None:
        validate_checkpoint(model, ckpt, quant)  # shapes and dtypes from the headers, before any allocation
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build(device)
    model.requires_grad_(False)
    if ckpt is None:
        _fill_dummy(model, seed)
    else:
        params = [(n, p) for n, p in model.named_parameters()]  # tied lm_head appears once, as embed
        for name, param in tqdm(params, desc="Loading weights", unit="tensor", disable=not progress, leave=False):
            # param.dtype: the model dtype, except parameters a layer keeps in float32 (DeepSeek's router bias)
            param.data.copy_(_read_param(ckpt, model, name, param.shape, quant, dtype).to(param.dtype))
    if scheme is not None:
        _load_quantized_experts(model, ckpt, quant, scheme, dtype, seed)
    _load_quantized_attention(model, ckpt, quant, dtype, seed)
    for block in model.moe_blocks():
        block.prepare()
    model.eval()
    logger.info("loaded %s (%s%s) from %s", cfg.architecture, dtype,
                "" if scheme is None else f", experts {scheme.name}", model_path)
    return model
