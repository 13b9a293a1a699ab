"""Build a model from a Hugging Face directory: config.json -> ModelConfig -> module -> weights.

Only safetensors are read (never pickle): model.safetensors, or the shards listed in
model.safetensors.index.json. Per-expert checkpoint tensors are stacked into the fused
mlp.experts.w13 [E, 2I, H] / w2 [E, H, I] parameters; checkpoints that already store stacked
experts (gate_up_proj / down_proj) load directly. Every missing or misshapen tensor is reported
by name together with the file it was looked for in.
"""
from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from light_moe.config import ModelConfig, read_hf_config
from light_moe.layers.rotary import RotaryEmbedding
from light_moe.models.base import MoECausalLM
from light_moe.models.registry import resolve_architecture
from light_moe.ops.backend import MoEOps

logger = logging.getLogger(__name__)


def load_model_config(model_path: str | Path) -> tuple[type[MoECausalLM], ModelConfig]:
    hf = read_hf_config(model_path)
    model_cls = resolve_architecture(hf)
    return model_cls, model_cls.parse_config(hf)


class CheckpointIndex:
    """Which safetensors file holds which tensor, with lazily opened handles."""

    def __init__(self, model_path: Path):
        self.model_path = model_path
        index_file = model_path / "model.safetensors.index.json"
        single = model_path / "model.safetensors"
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as exc:
                raise ValueError(f"{index_file} is not a valid safetensors index: {exc}") from exc
            self.files = {name: model_path / fname for name, fname in weight_map.items()}
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

    def get(self, name: str) -> torch.Tensor:
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
        try:
            return self._handles[path].get_tensor(name)
        except Exception as exc:
            raise ValueError(f"tensor {name} in {path} could not be read: {exc}") from exc

    def describe(self) -> str:
        files = sorted({p.name for p in self.files.values()})
        return ", ".join(files) if files else str(self.model_path)


def _checked(name: str, tensor: torch.Tensor, expected: torch.Size, where: str) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"expected tensor {name} of shape {list(expected)}, found {list(tensor.shape)} in {where}")
    return tensor


def _read_param(ckpt: CheckpointIndex, model: MoECausalLM, name: str, shape: torch.Size) -> torch.Tensor:
    where = ckpt.describe()
    if name.endswith(("experts.w13", "experts.w2")):
        # with expert parallelism the block holds only its rank's experts (global ids, ascending)
        expert_ids = model.get_submodule(name.rsplit(".experts.", 1)[0]).local_expert_ids
        fused = model.fused_expert_checkpoint_name(name)
        if fused in ckpt:
            stacked = _checked(fused, ckpt.get(fused), (model.config.num_experts, *shape[1:]), where)
            return stacked if len(expert_ids) == stacked.shape[0] else stacked[list(expert_ids)]
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
    ckpt_name = model.checkpoint_name(name)
    if ckpt_name not in ckpt:
        raise ValueError(f"checkpoint tensor {ckpt_name} is missing (looked in {where})")
    return _checked(ckpt_name, ckpt.get(ckpt_name), shape, where)


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
        return torch.Generator(device=gen_device).manual_seed(zlib.crc32(repr((seed, *key)).encode()))

    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name in expert_ids:
            for row, expert in enumerate(expert_ids[name]):
                param.data[row].normal_(0.0, 0.02, generator=generator(name, expert))
        else:
            param.data.normal_(0.0, 0.02, generator=generator(name))


def build_model(model_path: str | Path, ops: MoEOps, dtype: torch.dtype, device: torch.device,
                load_format: str = "auto", seed: int = 0, progress: bool = True,
                expert_dispatchers: list | None = None) -> MoECausalLM:
    """expert_dispatchers: one per MoE layer (light_moe.parallel.dispatch) under expert parallelism;
    each layer then allocates and loads only the dispatcher's local experts."""
    model_path = Path(model_path)
    model_cls, cfg = load_model_config(model_path)
    with torch.device("meta"):
        model = model_cls(cfg, ops, dtype, torch.device("meta"))
    if expert_dispatchers is not None:
        blocks = model.moe_blocks()
        if len(expert_dispatchers) != len(blocks):
            raise ValueError(f"{len(expert_dispatchers)} expert dispatchers for {len(blocks)} MoE layers")
        for block, dispatcher in zip(blocks, expert_dispatchers):
            block.use_dispatcher(dispatcher)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build(device)
    model.requires_grad_(False)
    if load_format == "dummy":
        _fill_dummy(model, seed)
    else:
        ckpt = CheckpointIndex(model_path)
        params = [(n, p) for n, p in model.named_parameters()]  # tied lm_head appears once, as embed
        for name, param in tqdm(params, desc="Loading weights", unit="tensor", disable=not progress, leave=False):
            param.data.copy_(_read_param(ckpt, model, name, param.shape).to(dtype))
    for block in model.moe_blocks():
        block.prepare()
    model.eval()
    logger.info("loaded %s (%s) from %s", cfg.architecture, dtype, model_path)
    return model
