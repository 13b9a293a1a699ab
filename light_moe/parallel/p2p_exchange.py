"""The fixed-capacity expert exchange over NVLink: every rank writes straight into its peers' memory.

Why. The fixed-capacity path of AllToAllDispatcher (parallel/dispatch.py) moves a [N * C, row] buffer with
one NCCL all_to_all_single each way. On 2 H100s one layer's dispatch + combine cost 83-108 us, about the
NCCL floor of ~40 us per call; the goal is <= 40 us for both. With PyTorch symmetric memory
(torch.distributed._symmetric_memory, backend "CUDA": cuMem allocations mapped into every peer's address
space) an exchange is one copy kernel whose stores go over NVLink into the peers' inboxes and one
device-side barrier kernel: no NCCL, no host work, and both are plain kernels on the current stream, so a
decode CUDA graph captures them like any other.

One exchange on rank r (world N, capacity C rows of B bytes per rank pair, send block p = the C rows for p):
  write    send block p -> slot r of rank p's inbox, for every p (one _foreach_copy_ launch, N stores)
  barrier  handle.barrier(channel): r signals every peer, then waits for every peer's signal. The signal
           follows r's writes in stream order, so once r passes it every peer's block is in r's inbox
  read     r's inbox is the received [N * C, row] buffer (slot p = rank p's block for r): a view, no copy
The layout equals NCCL's all_to_all_single with equal splits, so the dispatcher's packing and unpacking are
shared by both exchanges and the received bytes are identical.

Two inboxes per rank, DISPATCH (packed hidden rows + local expert ids) and COMBINE (expert outputs), in one
allocation shared by every MoE layer of the rank: layers run one after another, so one set of buffers
serves them all (sized for the largest capacity, fixed_capacity_tokens rows per rank pair).

Why one barrier per exchange is enough (no "free to overwrite" barrier before the writes, no per-layer
double buffering): on every rank the exchanges alternate DISPATCH, COMBINE, DISPATCH, ... (dispatch then
combine of each layer, layer after layer, in the same order on all ranks; idle ranks included). A rank
reads its DISPATCH inbox (the experts read the received rows in place) only before it enters the next
COMBINE barrier, and its COMBINE inbox (the weighted sum) only before the next DISPATCH barrier. A peer
writes the next DISPATCH only after passing that COMBINE barrier, which it passes only once this rank has
entered it, i.e. once every kernel queued before it on this rank, the readers of the inbox included, has
finished (stream order). Likewise for COMBINE. So each exchange's barrier is also the release of the other
inbox. The price: a received buffer is valid only until the next exchange of the other kind is issued,
which is how the dispatcher uses it (dispatch -> experts -> combine -> finish). Each kind has its own
barrier channel, so the two barriers never share signal slots.
A barrier spins on the device; timeout_ms bounds it (a dead peer traps the kernel: a CUDA error on this
rank instead of a silent hang).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

DISPATCH, COMBINE = 0, 1  # inbox index and barrier channel of each kind of exchange
INBOX_ALIGN = 256  # bytes: the COMBINE inbox starts aligned like a caching-allocator tensor
DEFAULT_TIMEOUT_S = 300.0  # the default collective_timeout_s


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _copy_width(nbytes: int, offset_bytes: int) -> torch.dtype:
    """The widest integer type that tiles a block and its start: the copy kernel then moves 8 bytes per
    element instead of 1 (fewer, wider stores over NVLink)."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = dtype.itemsize
        if nbytes % size == 0 and offset_bytes % size == 0:
            return dtype
    return torch.uint8


class PeerExchange:
    """Equal-block all-to-all through inboxes that every rank can write (see the module docstring).

    inboxes[kind][p]: rank p's inbox of that kind (DISPATCH or COMBINE) as this rank sees it, flat uint8,
    all of one size; barrier(channel) waits for every rank (a device-side barrier on CUDA). `owner` keeps
    the memory behind the views alive. `symmetric()` builds one from PyTorch symmetric memory; the
    constructor takes any inboxes, e.g. shared CPU memory in the tests."""

    def __init__(self, inboxes: Sequence[Sequence[torch.Tensor]], rank: int, barrier: Callable[[int], None],
                 owner: object = None):
        if len(inboxes) != 2 or len({len(kind) for kind in inboxes}) != 1:
            raise ValueError("PeerExchange needs a DISPATCH and a COMBINE inbox per rank")
        self.world_size = len(inboxes[0])
        self.inbox_bytes = inboxes[0][0].numel()
        for kind in inboxes:
            for inbox in kind:
                if inbox.dtype != torch.uint8 or inbox.dim() != 1 or inbox.numel() != self.inbox_bytes:
                    raise ValueError("every inbox must be a flat uint8 tensor of one size")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        self.inboxes = [list(kind) for kind in inboxes]
        self.rank = rank
        self.barrier = barrier
        self._owner = owner

    @classmethod
    def symmetric(cls, group, device: torch.device, max_rows: int, row_bytes: int,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> PeerExchange:
        """Collective over `group` (every rank, the same arguments): allocate this rank's two inboxes of
        N x max_rows x row_bytes bytes in symmetric memory and map every peer's.

        The allocation is _SymmetricMemory.empty_strided_p2p (what symm_mem.empty called before it took
        its blocks from a cached memory pool, and what torch's own workspace still uses): a block of our
        own, freed with the exchange. From the pool, a later exchange (a new engine and process group in
        the same process) could get a freed block back whose rendezvous torch caches per group name: this
        rank would skip the collective that fresh peers run, and hang."""
        from torch._C._distributed_c10d import _SymmetricMemory
        from torch.distributed import _symmetric_memory as symm_mem

        if device.type != "cuda":
            raise ValueError(f"the peer-to-peer exchange needs CUDA devices, got {device}")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        inbox_bytes = _round_up(world * max_rows * row_bytes, INBOX_ALIGN)
        buffer = _SymmetricMemory.empty_strided_p2p((2 * inbox_bytes,), (1,), torch.uint8, device)
        handle = symm_mem.rendezvous(buffer, group)  # collective: maps every peer's buffer here
        if handle is None:
            raise RuntimeError("symmetric-memory rendezvous returned no handle (is TORCH_SYMMMEM set to a "
                               "backend without peer buffers?)")
        if (handle.rank, handle.world_size) != (rank, world):
            raise RuntimeError(f"symmetric memory sees rank {handle.rank} of {handle.world_size}, the process "
                               f"group rank {rank} of {world}")
        inboxes = [[handle.get_buffer(p, (inbox_bytes,), torch.uint8, kind * inbox_bytes) for p in range(world)]
                   for kind in (DISPATCH, COMBINE)]
        # get_buffer(rank, ...) must address our own tensor: the storage offsets above assume it starts the block
        if inboxes[DISPATCH][rank].data_ptr() != buffer.data_ptr():
            raise RuntimeError("symmetric memory: this rank's buffer does not start its block (unexpected layout)")
        timeout_ms = max(1, int(timeout_s * 1000))

        def barrier(channel: int) -> None:
            handle.barrier(channel=channel, timeout_ms=timeout_ms)

        return cls(inboxes, rank, barrier, owner=(buffer, handle))

    def max_rows(self, row_bytes: int) -> int:
        """The largest capacity (rows per rank pair) of rows of `row_bytes` that fits the inboxes."""
        return self.inbox_bytes // (self.world_size * row_bytes)

    def check(self, send: torch.Tensor) -> None:
        """Raise unless `send` ([N * C, ...]) fits an inbox. Shapes only (host-known): call it in a graph's
        warm-up too, so that a capacity beyond the buffers fails there and not inside a capture."""
        nbytes = send.numel() * send.element_size()
        if send.dim() == 0 or send.shape[0] % self.world_size:
            raise RuntimeError(f"peer exchange: {tuple(send.shape)} is not {self.world_size} equal blocks of rows")
        if nbytes > self.inbox_bytes:
            raise RuntimeError(f"peer exchange: {nbytes} bytes exceed the {self.inbox_bytes}-byte inboxes (sized "
                               "for fixed_capacity_tokens rows per rank pair)")

    def exchange(self, send: torch.Tensor, kind: int) -> torch.Tensor:
        """send [N * C, ...] (block p: the rows for rank p) -> [N * C, ...] of send's dtype (block p: rank p's
        block for this rank), like all_to_all_single with equal splits. The result is a view of this rank's
        inbox `kind`: valid until this rank issues the next exchange of the other kind."""
        self.check(send)
        send = send.contiguous()
        world, rank = self.world_size, self.rank
        nbytes = send.numel() * send.element_size()
        block = nbytes // world
        width = _copy_width(block, send.storage_offset() * send.element_size())
        blocks = send.view(-1).view(torch.uint8).view(world, block).view(width).unbind(0)  # [N] x [block]
        # slot `rank` of every rank's inbox, this one's included (rows this rank keeps for its own experts)
        slots = [inbox[rank * block:(rank + 1) * block].view(width) for inbox in self.inboxes[kind]]
        torch._foreach_copy_(slots, list(blocks))
        self.barrier(kind)  # after it, every peer's block is in this rank's inbox
        return self.inboxes[kind][rank][:nbytes].view(send.dtype).view(send.shape)
