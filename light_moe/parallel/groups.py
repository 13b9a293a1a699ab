"""Process groups of one expert-parallel engine, created with a timeout on every collective.

Two groups over the same N ranks:
  device_group  the tensors of the MoE exchange and the logits gather: NCCL on CUDA, gloo on CPU
  cpu_group     step plans (pickled Python objects) from rank 0 and small control messages: gloo
On CPU both are the one gloo world group. The timeout is what turns a dead or stuck rank into an
error on the others instead of a hang: gloo raises when a peer's socket closes or when the
timeout passes; NCCL's watchdog aborts the communicator after the timeout
(TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default in torch >= 2.2).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class ExpertParallelGroup:
    rank: int
    world_size: int
    device: torch.device  # this rank's device (cuda:<rank> on GPU)
    device_group: object
    cpu_group: object

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_tcp_port() -> int:
    """A port that was free a moment ago, for the rendezvous of processes on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_device(device: torch.device, rank: int) -> torch.device:
    """One GPU per rank on one host; CPU ranks share the CPU."""
    return torch.device("cuda", rank) if device.type == "cuda" else torch.device("cpu")


def init_expert_parallel(rank: int, world_size: int, init_method: str, device: torch.device,
                         timeout_s: float) -> ExpertParallelGroup:
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialised in this process: one expert-parallel engine per "
            "process (call shutdown() on the previous engine first)")
    device = rank_device(device, rank)
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timeout, device_id=device)
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
        return ExpertParallelGroup(rank, world_size, device, dist.group.WORLD, cpu_group)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
    return ExpertParallelGroup(rank, world_size, device, dist.group.WORLD, dist.group.WORLD)
