"""The operator API of the MoE layer: one object per backend, chosen once by capability.

Every backend implements the same five ops with the signatures of ops/reference.py
(router, routing_metadata, expert_up, expert_down, combine) plus `prepare_expert_weights`,
which turns the canonical expert weights (w13 [E, 2I, H], w2 [E, H, I]) into whatever layout
the backend's kernels want, once at load time. `moe_forward` chains them; a backend may
override any single op or the whole chain.
"""
from light_moe.ops.backend import MoEOps, ReferenceOps
from light_moe.ops.select import select_backend

__all__ = ["MoEOps", "ReferenceOps", "select_backend"]
