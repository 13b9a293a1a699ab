"""A W4A16 linear layer: y = x W^T (+ b) with W [N, K] held as int4 in the canonical format.

Shape legend: T tokens, N out features, K in features, g group size.

The weight is a one-expert stack of light_moe/quant/w4a16.py: buffers qweight int32 [1, N, K / 8],
scales [1, N, K / g] (model dtype), zeros uint8 [1, N, K / g] (asymmetric only). The bias, when there is
one, stays a float parameter (loaded like any other). The matmul runs on the ops backend:
MoEOps.prepare_linear_weight repacks the weight once after loading, MoEOps.linear runs it (the reference
dequantises; CuteOps runs the W4A16 grouped GEMM with one expert). Called like the nn.Linear it
replaces: the attention projections (layers/attention.py Attention.use_quantized_projections).

DenseLinear is the unquantized counterpart: an nn.Linear (same parameters, names and loading) whose matmul runs
on the ops backend's dense_linear (the reference: F.linear; CuteOps: the skinny GEMM for steps of few rows).
"""
from __future__ import annotations

import torch
from torch import nn

from light_moe.quant.scheme import W4A16Config
from light_moe.quant.w4a16 import PACK, QuantizedWeight


class QuantizedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: W4A16Config, ops,
                 dtype=None, device=None):
        super().__init__()
        g = scheme.group_size
        if in_features % g:
            raise ValueError(f"W4A16 linear: in_features {in_features} is not a multiple of group_size {g}")
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.ops = ops
        self.register_buffer("qweight", torch.empty(1, out_features, in_features // PACK, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("scales", torch.empty(1, out_features, in_features // g, dtype=dtype, device=device))
        zeros = None if scheme.symmetric else torch.empty(1, out_features, in_features // g, dtype=torch.uint8,
                                                           device=device)
        self.register_buffer("zeros", zeros)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.prepared = None  # the backend's layout (prepare()); None: the canonical buffers

    @classmethod
    def like(cls, linear: nn.Linear, scheme: W4A16Config, ops) -> QuantizedLinear:
        """An empty QuantizedLinear of `linear`'s shape, dtype and device (meta while building)."""
        return cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, ops,
                   linear.weight.dtype, linear.weight.device)

    def quantized_weight(self) -> QuantizedWeight:
        """The canonical weight, logical shape [1, N, K]."""
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.scheme.group_size)

    def load(self, weight: QuantizedWeight) -> None:
        """Copy a quantized [1, N, K] weight (RTN or repacked from a checkpoint) into the buffers."""
        if weight.perm is not None:
            raise ValueError("act-order (permuted) W4A16 weights are not supported for linear layers")
        if weight.group_size != self.scheme.group_size or (weight.zeros is None) != self.scheme.symmetric:
            raise ValueError(f"a {weight.scheme.name} weight for a {self.scheme.name} layer")
        for field in ("qweight", "scales", "zeros"):
            buffer, value = getattr(self, field), getattr(weight, field)
            if buffer is None:
                continue
            if tuple(buffer.shape) != tuple(value.shape):
                raise ValueError(f"expected {field} of shape {list(buffer.shape)}, found {list(value.shape)}")
            buffer.copy_(value)

    def prepare(self) -> None:
        """Let the backend repack the weight once, after loading; drop the canonical copy when it made its own."""
        canonical = self.quantized_weight()
        self.prepared = self.ops.prepare_linear_weight(canonical)
        if self.prepared is not canonical:
            for name in ("qweight", "scales", "zeros"):
                buffer = getattr(self, name)
                if buffer is not None:
                    setattr(self, name, buffer.new_empty(0))

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the weight as held: the backend's layout once prepared, else the canonical buffers."""
        weight = self.prepared if self.prepared is not None else self.quantized_weight()
        return sum(t.numel() * t.element_size() for t in vars(weight).values() if torch.is_tensor(t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N]
        weight = self.prepared if self.prepared is not None else self.quantized_weight()
        return self.ops.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, {self.scheme.name}"


class DenseLinear(nn.Linear):
    """nn.Linear whose forward is ops.dense_linear(x, weight, bias): the attention's q/k/v and o projections."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ops, dtype=None, device=None):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, device=device)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N]
        return self.ops.dense_linear(x, self.weight, self.bias)
