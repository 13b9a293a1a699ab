"""Process groups of one expert-parallel engine, created with a timeout on every collective.

Two groups over the same N ranks:
  device_group  the tensors of the MoE exchange and the logits gather: NCCL on CUDA, gloo on CPU
  cpu_group     step plans (pickled Python objects) from rank 0 and small control messages: gloo
On CPU both are the one gloo world group. The timeout is what turns a dead or stuck rank into an
error on the others instead of a hang: gloo raises when a peer's socket closes or when the
timeout passes; NCCL's watchdog aborts the communicator after the timeout
(TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default in torch >= 2.2).

Two launch modes: rank 0 spawns ranks 1..N-1 on this host (rendezvous tcp://127.0.0.1:<free port>,
rank r on cuda:r), or torchrun started every rank, on one or several hosts (`TorchrunLaunch`:
rendezvous env://, rank r on cuda:LOCAL_RANK).
"""
from __future__ import annotations

import os
import pickle
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


FRAME_BYTES = 16 * 1024  # the first broadcast of a message: 8-byte length + the pickle's head


def broadcast_bytes(data: bytes | None, rank: int, cpu_group) -> bytes:
    """Rank 0's data, on every rank of cpu_group (the argument of other ranks is ignored).

    One gloo broadcast of a fixed FRAME_BYTES frame (8-byte length + the head of data) when data fits,
    a second one with the rest when it does not. torch's broadcast_object_list always costs two
    (sizes, then data), and this runs once per engine step, where a gloo collective costs ~0.1-0.5 ms."""
    frame = torch.empty(FRAME_BYTES, dtype=torch.uint8)
    if rank == 0:
        frame[:8] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
        head = data[: FRAME_BYTES - 8]
        frame[8: 8 + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    dist.broadcast(frame, src=0, group=cpu_group)
    size = int(frame[:8].view(torch.int64)[0])
    rest = torch.empty(max(0, size - (FRAME_BYTES - 8)), dtype=torch.uint8)
    if rest.numel():
        if rank == 0:
            rest.copy_(torch.frombuffer(bytearray(data[FRAME_BYTES - 8:]), dtype=torch.uint8))
        dist.broadcast(rest, src=0, group=cpu_group)
    if rank == 0:
        return data
    return frame[8: 8 + min(size, FRAME_BYTES - 8)].numpy().tobytes() + rest.numpy().tobytes()


def broadcast_pickled(obj, rank: int, cpu_group):
    """broadcast_bytes of a pickle: rank 0's obj on every rank."""
    data = broadcast_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if rank == 0 else None, rank,
                           cpu_group)
    return obj if rank == 0 else pickle.loads(data)


def free_tcp_port() -> int:
    """A port that was free a moment ago, for the rendezvous of processes on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class TorchrunLaunch:
    """This process is one rank of a job that torchrun (or any launcher setting its variables) started."""

    rank: int
    world_size: int
    local_rank: int  # the GPU index on this host

    @property
    def is_worker(self) -> bool:
        return self.rank != 0


def torchrun_launch(environ=None) -> TorchrunLaunch | None:
    """The launch of this process if RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are all set
    (torchrun sets them for every rank), else None (a plain process: rank 0 spawns its workers)."""
    env = os.environ if environ is None else environ
    if not all(env.get(name) for name in TORCHRUN_VARS):
        return None
    try:
        rank, world_size, local_rank = (int(env[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError as exc:
        raise ValueError(f"torchrun variables RANK / WORLD_SIZE / LOCAL_RANK must be integers: {exc}") from None
    if not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"inconsistent torchrun variables: RANK={rank} WORLD_SIZE={world_size} "
                         f"LOCAL_RANK={local_rank}")
    return TorchrunLaunch(rank, world_size, local_rank)


def rank_device(device: torch.device, index: int) -> torch.device:
    """One GPU per rank (index: the rank, or LOCAL_RANK under torchrun); CPU ranks share the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"this rank wants cuda:{index} but the host has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def init_expert_parallel(rank: int, world_size: int, init_method: str, device: torch.device,
                         timeout_s: float, device_index: int | None = None) -> ExpertParallelGroup:
    """device_index: this rank's GPU (default: the rank; LOCAL_RANK under torchrun). init_method "env://"
    reads MASTER_ADDR / MASTER_PORT (torchrun's rendezvous)."""
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialised in this process: one expert-parallel engine per "
            "process (call shutdown() on the previous engine first)")
    device = rank_device(device, rank if device_index is None else device_index)
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timeout, device_id=device)
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
        return ExpertParallelGroup(rank, world_size, device, dist.group.WORLD, cpu_group)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
    return ExpertParallelGroup(rank, world_size, device, dist.group.WORLD, dist.group.WORLD)
