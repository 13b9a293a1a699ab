"""Rotary position embedding (default RoPE, rotate-half convention of the HF checkpoints).

Shape legend: N tokens in the step, h heads, D head_dim.
cos/sin are precomputed once in float32 for every position up to max_positions; the product
position * inv_freq is a single float32 multiply either way, so this matches computing it per call.
"""
import torch
from torch import nn

from light_moe.ops.reference import apply_rope


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, device=None):
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.build(device)

    def build(self, device) -> None:
        """(Re)compute the tables; the loader calls this after materialising a meta-device model."""
        head_dim, max_positions, theta = self.head_dim, self.max_positions, self.theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
        positions = torch.arange(max_positions, device=device).float()
        freqs = torch.outer(positions, inv_freq)  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q [N, h, D], k [N, h_kv, D], positions [N] -> rotated q, k (same dtype). The paged path rotates
        inside the backend's rope_write_kv instead (ops/backend.py), reading the same cos / sin tables."""
        cos = self.cos[positions].to(q.dtype)  # [N, D]
        sin = self.sin[positions].to(q.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
