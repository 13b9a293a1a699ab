"""The decoder-only MoE transformer shared by every supported family.

Shape legend: N tokens in the step (all sequences flattened), H hidden, V vocabulary.
A family file (mixtral.py, qwen2_moe.py, ...) only parses its config.json dialect into a
ModelConfig and says how its checkpoint names map onto these modules; the math lives here and
in light_moe/layers. Module names mirror the HF checkpoints (model.layers.N.self_attn.q_proj ...)
except the stacked expert weights (mlp.experts.w13 / w2), which the loader assembles.
"""
from __future__ import annotations

import torch
from torch import nn

from light_moe.config import ModelConfig
from light_moe.layers.attention import Attention
from light_moe.layers.mla import MLAttention, YarnRotaryEmbedding
from light_moe.layers.mlp import SwiGLUMLP
from light_moe.layers.moe import MoEBlock
from light_moe.layers.norm import RMSNorm
from light_moe.layers.rotary import RotaryEmbedding
from light_moe.ops.attention import AttentionMetadata
from light_moe.ops.backend import MoEOps


class DecoderLayer(nn.Module):
    """Pre-norm layer in residual-stream form: it takes the previous sublayer's output and the residual
    stream, so that each "residual add + RMSNorm" pair is one op of the backend (one kernel on the GPU)."""

    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, ops: MoEOps, dtype, device):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, ops=ops)
        if cfg.mla is None:
            self.self_attn = Attention(cfg, rotary, ops, dtype, device, sliding_window=cfg.attention_window(layer))
        else:
            self.self_attn = MLAttention(cfg, rotary, ops, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, ops=ops)
        self.is_moe = cfg.is_moe_layer(layer)
        if self.is_moe:
            self.mlp = MoEBlock(cfg, ops, dtype, device)
        else:
            self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, ops, dtype, device)

    def forward(self, x, residual, positions, kv_cache, meta):
        """x: the previous layer's MLP output (the embeddings for layer 0, whose residual is None) -> (this
        layer's MLP output, the residual stream before it is added)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)  # residual += x; h = norm(residual)
        h = self.self_attn(h, positions, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        # a MoE layer may hand its output uncombined: the next layer's input norm (or the final norm) combines it
        return (self.mlp(h, defer_combine=True) if self.is_moe else self.mlp(h)), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: MoEOps, dtype, device):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        if cfg.mla is not None:  # only the rotary dims of MLA's queries and keys rotate
            rotary = YarnRotaryEmbedding(cfg.mla.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                         cfg.rope_scaling, device=device)
        elif cfg.rope_scaling is not None:
            rotary = YarnRotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling,
                                         device=device)
        else:
            rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, device=device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rotary, ops, dtype, device) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, ops=ops)

    def forward(self, input_ids, positions, kv_caches, meta):
        x, residual = self.embed_tokens(input_ids), None  # [N, H]
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, None if kv_caches is None else kv_caches[i], meta)
        if residual is None:  # no layers
            return self.norm(x)
        return self.norm(x, residual)[0]


class MoECausalLM(nn.Module):
    """Family-independent causal LM. Subclasses set the checkpoint-name tables below."""

    # how the family names its expert tensors in per-expert checkpoints
    moe_module_name = "mlp"  # Mixtral: "block_sparse_moe"
    expert_gate_name = "gate_proj"  # Mixtral: "w1"
    expert_up_name = "up_proj"  # Mixtral: "w3"
    expert_down_name = "down_proj"  # Mixtral: "w2"

    def __init__(self, cfg: ModelConfig, ops: MoEOps, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, ops, dtype, device)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, device=device)
        self.ops = ops  # compute_logits runs the lm_head on the backend's dense_linear (decode: the skinny GEMM)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def parse_config(hf: dict) -> ModelConfig:
        raise NotImplementedError

    def checkpoint_name(self, param_name: str) -> str:
        """Checkpoint tensor name of a (non-expert) parameter."""
        if self.moe_module_name != "mlp" and ".mlp." in param_name:
            layer = int(param_name.split(".")[2])
            if self.config.is_moe_layer(layer):
                return param_name.replace(".mlp.", f".{self.moe_module_name}.")
        return param_name

    def stacked_checkpoint_names(self, param_name: str) -> list[tuple[str, int]] | None:
        """For a parameter fused at load from several checkpoint tensors (attention's qkv_proj weight and
        bias: q_proj, k_proj, v_proj rows in that order), [(checkpoint name, rows)] of its parts; else None."""
        module_name, _, kind = param_name.rpartition(".")
        if not module_name.endswith(".self_attn.qkv_proj"):
            return None
        attn = self.get_submodule(module_name.removesuffix(".qkv_proj"))
        prefix = module_name.removesuffix("qkv_proj")
        return [(self.checkpoint_name(f"{prefix}{part}.{kind}"), rows)
                for part, rows in zip(attn.qkv_parts, attn.qkv_sizes)]

    def expert_checkpoint_names(self, param_name: str, expert: int) -> list[str]:
        """Per-expert checkpoint tensors stacked into mlp.experts.w13 ([gate; up]) or w2 ([down])."""
        prefix = param_name.rsplit(".experts.", 1)[0].replace(".mlp", f".{self.moe_module_name}")
        base = f"{prefix}.experts.{expert}."
        if param_name.endswith("w13"):
            return [base + self.expert_gate_name + ".weight", base + self.expert_up_name + ".weight"]
        return [base + self.expert_down_name + ".weight"]

    def fused_expert_checkpoint_name(self, param_name: str) -> str:
        """Name in checkpoints that already store stacked experts (transformers 5 layout)."""
        prefix = param_name.rsplit(".experts.", 1)[0].replace(".mlp", f".{self.moe_module_name}")
        return prefix + (".experts.gate_up_proj" if param_name.endswith("w13") else ".experts.down_proj")

    def checkpoint_shape(self, param_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the checkpoint tensor that parameter `param_name` (of `shape`; stacked experts: all of them) is
        read from: the same unless the family stores it in another layout (from_checkpoint converts it)."""
        return tuple(shape)

    def from_checkpoint(self, param_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor (stacked experts: the rows of the experts this rank holds) in the layout of
        parameter `param_name`; the identity unless the family stores it differently."""
        return tensor

    def kv_cache_shapes(self, num_blocks: int, block_size: int) -> list[tuple[tuple[int, ...], ...]]:
        """Per layer, the shapes of its paged cache tensors (ModelRunner allocates them, in the model dtype, and
        sizes the cache by them): a K and a V [blocks, block_size, g, D]; MLA one latent [blocks, block_size,
        kv_lora_rank + qk_rope_head_dim] (layers/mla.py)."""
        cfg = self.config
        if cfg.mla is not None:
            return [((num_blocks, block_size, cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim),)] * cfg.num_layers
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        return [(shape, shape)] * cfg.num_layers

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta: AttentionMetadata | None):
        """Returns final hidden states [N, H]; logits are computed only for the rows that sample."""
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ops.dense_linear(hidden, self.lm_head.weight).float()  # [rows, V]
