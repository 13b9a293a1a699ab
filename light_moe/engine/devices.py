"""Where and in what dtype an engine runs: device and dtype resolution, and the checks of the expert-parallel
exchange that must pass before any worker process is spawned. Public so that benchmarks resolve devices the
engine's way."""
from __future__ import annotations

import os

import torch

from light_moe.config import ParallelConfig, parse_dtype


def resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device}")
    return device


def check_ep_exchange(parallel: ParallelConfig, device: torch.device, launch) -> None:
    """ep_exchange='p2p' (parallel/p2p_exchange.py) maps every rank's buffers into every peer's GPU: all ranks
    must be CUDA GPUs of one host that can access each other (NVLink or PCIe peer-to-peer)."""
    if parallel.ep_exchange != "p2p":
        return
    n = parallel.expert_parallel_size
    local = os.environ.get("LOCAL_WORLD_SIZE") if launch is not None else None
    if local is not None and local != str(launch.world_size):
        raise ValueError(f"ep_exchange='p2p' needs every expert-parallel rank on one host, but torchrun started "
                         f"{local} of the {launch.world_size} ranks here (LOCAL_WORLD_SIZE); use ep_exchange='nccl' "
                         "across hosts")
    if device.type != "cuda":
        raise ValueError(f"ep_exchange='p2p' needs CUDA GPUs (device is {device.type}); use ep_exchange='nccl'")
    if torch.cuda.device_count() < n:
        raise ValueError(f"ep_exchange='p2p' needs {n} GPUs on this host, found {torch.cuda.device_count()}")
    for i in range(n):
        for j in range(n):
            if i != j and not torch.cuda.can_device_access_peer(i, j):
                raise ValueError(f"ep_exchange='p2p': cuda:{i} cannot access the memory of cuda:{j} (no "
                                 "peer-to-peer path between them); use ep_exchange='nccl'")


def resolve_dtype(dtype: str | torch.dtype, config_dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return parse_dtype(dtype)
    if device.type == "cpu":
        return torch.float32  # bf16 matmuls on CPU are slow and the CPU path is the reference
    checkpoint = parse_dtype(config_dtype) if config_dtype in ("bfloat16", "float16") else torch.bfloat16
    return checkpoint
