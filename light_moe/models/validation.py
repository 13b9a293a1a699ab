"""Checkpoint checks that run before any weight is allocated (docs/model_loading.md lists them all).

build_model makes the model on the meta device, then calls validate_checkpoint: every tensor the
loader will read is looked up in its safetensors header (dtype and shape; no data is read) and
compared with the shape the config implies and the dtypes its reader accepts. Only then is device
memory allocated, so a config.json that disagrees with its weights (hidden_size against the shape
of model.embed_tokens.weight, ...) fails at once, naming the tensor and both shapes, and an int8
lm_head fails instead of generating garbage. index_shards confines the shard paths of
model.safetensors.index.json to the model directory.

The tensor names and shapes mirror the loader's read path (loader._read_param,
_load_quantized_experts, _load_quantized_attention): a parameter, a stacked one (qkv_proj from
q/k/v_proj rows), float experts per expert or already stacked (or stacked MXFP4 blocks and scales),
GPTQ / AWQ linears and experts (their readers list their tensors), W4A16 layers (buffers, not
parameters) by their sources.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from light_moe.config import read_json_object
from light_moe.layers.linear import QuantizedLinear
from light_moe.layers.moe import QuantizedFusedExperts
from light_moe.models.base import MoECausalLM
from light_moe.quant import mxfp4
from light_moe.quant.checkpoint import CheckpointFormat

# float parameters (the loader casts them to the model dtype); safetensors' dtype names
FLOAT_DTYPES = ("F16", "BF16", "F32")


def index_shards(model_path: Path, index_file: Path) -> dict[str, Path]:
    """model.safetensors.index.json's weight_map as tensor name -> shard path, every path checked
    by shard_path."""
    weight_map = read_json_object(index_file).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_file}: weight_map must map tensor names to shard files, got {weight_map!r:.80}")
    for fname in weight_map.values():
        if not isinstance(fname, str):
            raise ValueError(f"{index_file}: shard file name {fname!r} is not a file name")
    shards = {fname: shard_path(model_path, fname, index_file) for fname in set(weight_map.values())}
    return {name: shards[fname] for name, fname in weight_map.items()}


def shard_path(model_path: Path, name: str, index_file: Path) -> Path:
    """The shard `name` of the index, refused unless it lies in the model directory: a relative path
    without '..' whose target, symlinks resolved, is inside the directory (its own symlinks resolved).
    One kind of link out is accepted: the Hugging Face cache's, from snapshots/<revision>/<file> to
    blobs/<hash> of the same repository."""
    if not name:
        raise ValueError(f"{index_file}: a shard file name is empty")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise ValueError(f"{index_file}: shard path {name!r} must be relative to the model directory, "
                         "without '..' (or '\\')")
    root = model_path.resolve()
    path = model_path / rel
    target = path.resolve()
    if target.is_relative_to(root) and target != root:
        return path
    in_hf_cache = (root.parent.name == "snapshots" and path.parent.resolve().is_relative_to(root)
                   and target.parent == root.parent.parent / "blobs")
    if in_hf_cache:
        return path
    raise ValueError(f"{index_file}: shard {name!r} resolves to {target}, outside the model directory {root}")


def check_tensor(ckpt, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...], role: str = "float") -> None:
    """`name` is in the checkpoint with exactly `shape` and one of `dtypes` (from its header)."""
    if name not in ckpt:
        raise ValueError(f"checkpoint tensor {name} is missing (looked in {ckpt.describe()})")
    dtype, found = ckpt.header(name)
    where = ckpt.file_of(name)
    if tuple(found) != tuple(shape):
        raise ValueError(f"expected tensor {name} of shape {list(shape)}, found {list(found)} in {where} "
                         "(the expected shape follows from config.json)")
    if dtype not in dtypes:
        raise ValueError(f"checkpoint tensor {name} in {where} has dtype {dtype}; a {role} tensor must be one "
                         f"of {', '.join(dtypes)}")


def check_quantized_linear(ckpt, quant: CheckpointFormat, prefix: str, out_features: int, in_features: int) -> None:
    for name, shape, dtypes, required in quant.expected_tensors(prefix, out_features, in_features):
        if required or name in ckpt:
            check_tensor(ckpt, name, shape, dtypes, role=f"{quant.method.upper()} {name.rsplit('.', 1)[1]}")


def _check_float_experts(model: MoECausalLM, ckpt, name: str, shape: tuple[int, int, int]) -> None:
    """experts.w13 [E, 2I, H] / w2 [E, H, I]: stacked (gate_up_proj / down_proj over all experts, in the family's
    layout: model.checkpoint_shape), its MXFP4 blocks and scales (uint8, quant/mxfp4.py), or per expert, each
    part ([I, H] gate and up, [H, I] down) of this rank's experts."""
    fused = model.fused_expert_checkpoint_name(name)
    full_shape = model.checkpoint_shape(name, (model.config.num_experts, *shape[1:]))
    if fused in ckpt:
        check_tensor(ckpt, fused, full_shape, FLOAT_DTYPES)
        return
    if fused + mxfp4.BLOCKS_SUFFIX in ckpt or fused + mxfp4.SCALES_SUFFIX in ckpt:
        for suffix, mx_shape in zip((mxfp4.BLOCKS_SUFFIX, mxfp4.SCALES_SUFFIX), mxfp4.checkpoint_shapes(full_shape)):
            check_tensor(ckpt, fused + suffix, mx_shape, ("U8",), role=f"MXFP4 {suffix.lstrip('_')}")
        return
    experts = model.get_submodule(name.rsplit(".experts.", 1)[0]).local_expert_ids
    first = model.expert_checkpoint_names(name, experts[0])[0]
    if first not in ckpt:  # name every layout the loader would take
        raise ValueError(f"checkpoint tensor {fused} is missing, and so are its MXFP4 {fused}{mxfp4.BLOCKS_SUFFIX} / "
                         f"{mxfp4.SCALES_SUFFIX} and per-expert tensors such as {first} (looked in {ckpt.describe()})")
    for expert in experts:
        parts = model.expert_checkpoint_names(name, expert)
        for part in parts:
            check_tensor(ckpt, part, (shape[1] // len(parts), shape[2]), FLOAT_DTYPES)


def expert_prefixes(model: MoECausalLM, name: str) -> list[list[str]]:
    """Checkpoint prefixes (names without .weight) of the linears stacked into experts.w13 / w2 `name`,
    for each expert its block holds: [[gate, up], ...] or [[down], ...]."""
    block = model.get_submodule(name.rsplit(".experts.", 1)[0])
    return [[n.removesuffix(".weight") for n in model.expert_checkpoint_names(name, e)] for e in block.local_expert_ids]


def _check_quantized_experts(model: MoECausalLM, ckpt, quant: CheckpointFormat | None, layer_name: str,
                             module: QuantizedFusedExperts) -> None:
    """W4A16 experts come from GPTQ / AWQ expert linears when the checkpoint has them, else from
    float experts quantized on load (as loader._load_quantized_experts decides)."""
    for part in ("w13", "w2"):
        name = f"{layer_name}.{part}"
        num_experts, out_features, in_features = module.weight(part).shape
        prefixes = expert_prefixes(model, name)
        if quant is not None and f"{prefixes[0][0]}.qweight" in ckpt:
            for expert in prefixes:
                for prefix in expert:
                    check_quantized_linear(ckpt, quant, prefix, out_features // len(expert), in_features)
        else:
            _check_float_experts(model, ckpt, name, (num_experts, out_features, in_features))


def _check_linear(model: MoECausalLM, ckpt, quant: CheckpointFormat | None, name: str,
                  shape: tuple[int, ...]) -> None:
    """A non-expert weight or bias: its checkpoint tensor, or the parts stacked into it (qkv_proj), each
    float or, where only its .qweight is there, a GPTQ / AWQ linear (as loader._read_param reads them)."""
    stacked = model.stacked_checkpoint_names(name)
    parts = stacked or [(model.checkpoint_name(name), model.checkpoint_shape(name, shape)[0])]
    for ckpt_name, rows in parts:
        prefix = ckpt_name.removesuffix(".weight")
        if quant is not None and ckpt_name not in ckpt and f"{prefix}.qweight" in ckpt:
            check_quantized_linear(ckpt, quant, prefix, rows, shape[1])
        else:
            expected = (rows, *shape[1:]) if stacked else model.checkpoint_shape(name, shape)
            check_tensor(ckpt, ckpt_name, expected, FLOAT_DTYPES)


def validate_checkpoint(model: MoECausalLM, ckpt, quant: CheckpointFormat | None) -> None:
    """Every tensor `model` (on the meta device) will load: present, of the shape the config implies,
    of a dtype its reader accepts. ckpt: a loader.CheckpointIndex (header(name), file_of(name))."""
    for name, param in model.named_parameters():  # a tied lm_head appears once, as the embedding
        if name.endswith(("experts.w13", "experts.w2")):
            _check_float_experts(model, ckpt, name, tuple(param.shape))
        else:
            _check_linear(model, ckpt, quant, name, tuple(param.shape))
    for module_name, module in model.named_modules():  # W4A16 layers hold buffers, not parameters
        if isinstance(module, QuantizedFusedExperts):
            _check_quantized_experts(model, ckpt, quant, module_name, module)
        elif isinstance(module, QuantizedLinear):
            _check_linear(model, ckpt, quant, f"{module_name}.weight", (module.out_features, module.in_features))
