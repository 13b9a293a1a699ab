"""Paged KV-cache bookkeeping: which physical blocks each request owns. No tensors here.

A request's tokens [0, n) live in its block_table: token i sits in block
block_table[i // block_size] at slot i % block_size. No prefix caching, so every block has
exactly one owner, which is what lets `free` detect double frees and foreign ids.
"""
from __future__ import annotations

from collections import deque

from light_moe.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self._num_blocks = num_blocks
        # FIFO: freed blocks go to the back, so allocation order is deterministic and a block
        # just freed is the last to be reused (stale KV in it survives longer for debugging).
        self._free_blocks: deque[int] = deque(range(num_blocks))
        self._used_blocks: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_total_blocks(self) -> int:
        return self._num_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return len(self._used_blocks) / self._num_blocks

    @property
    def max_blocks_per_request(self) -> int:
        """The most blocks one request can ever hold (the whole pool here; one partition when partitioned)."""
        return self._num_blocks

    def same_pool(self, a: Request, b: Request) -> bool:
        """Whether freeing a's blocks can make room for b (always, with one pool)."""
        return True

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """More blocks `request` needs so that slots for tokens [0, computed + num_new_tokens) exist."""
        target = self.num_blocks_for_tokens(request.num_computed_tokens + num_new_tokens)
        return max(0, target - len(request.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free_blocks)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Append blocks to request.block_table; all or nothing. False if the pool is short."""
        needed = self.blocks_needed(request, num_new_tokens)
        if not self.can_allocate(needed):
            return False
        self._take(self._free_blocks, needed, request)
        return True

    def _take(self, free: deque[int], count: int, request: Request) -> None:
        for _ in range(count):
            block_id = free.popleft()
            self._used_blocks.add(block_id)
            request.block_table.append(block_id)

    def free(self, request: Request) -> None:
        """Return every block of `request` to the pool and clear its block_table."""
        # Check the whole table before releasing anything, so a bad table leaves the pool intact.
        seen: set[int] = set()
        for block_id in request.block_table:
            if not 0 <= block_id < self._num_blocks:
                raise RuntimeError(
                    f"request {request.request_id!r} holds block {block_id}, which is not in this pool "
                    f"(valid ids 0..{self._num_blocks - 1})"
                )
            if block_id not in self._used_blocks or block_id in seen:
                raise RuntimeError(
                    f"double free of block {block_id} by request {request.request_id!r}: the block is "
                    "already free or listed twice in its block_table"
                )
            seen.add(block_id)
        for block_id in request.block_table:
            self._used_blocks.remove(block_id)
            self._release(block_id)
        request.block_table.clear()

    def _release(self, block_id: int) -> None:
        self._free_blocks.append(block_id)


class PartitionedBlockManager(BlockManager):
    """One pool per expert-parallel rank, so the KV capacity grows with the ranks (each rank's KV cache
    holds only its own partition). Global block id = rank * blocks_per_rank + local id; every block of a
    request comes from one partition, which makes the partition the request's owner rank: attention for
    it runs there (executor/workers.py reads the owner off block_table[0]).

    A request's partition is chosen at its first allocation: among the partitions with room, the one with
    the fewest live requests (then the most free blocks, then the lowest rank), so data-parallel attention
    stays balanced. After a preemption it may land elsewhere (its KV is recomputed anyway)."""

    def __init__(self, blocks_per_rank: int, block_size: int, num_ranks: int) -> None:
        if num_ranks <= 0:
            raise ValueError(f"num_ranks must be positive, got {num_ranks}")
        super().__init__(blocks_per_rank * num_ranks, block_size)
        self.blocks_per_rank, self.num_ranks = blocks_per_rank, num_ranks
        self._partition_free = [deque(range(r * blocks_per_rank, (r + 1) * blocks_per_rank)) for r in range(num_ranks)]
        self._live = [0] * num_ranks  # requests holding blocks, per partition
        self._free_blocks = deque()  # unused: the partitions hold the free ids (num_free_blocks is overridden)

    @property
    def num_free_blocks(self) -> int:
        return sum(len(f) for f in self._partition_free)

    @property
    def max_blocks_per_request(self) -> int:
        return self.blocks_per_rank

    def owner(self, request: Request) -> int:
        """The rank whose partition holds request's blocks (it must hold some)."""
        return request.block_table[0] // self.blocks_per_rank

    def same_pool(self, a: Request, b: Request) -> bool:
        return a is b or (bool(a.block_table) and bool(b.block_table) and self.owner(a) == self.owner(b))

    def can_allocate(self, num_blocks: int) -> bool:
        """Whether some partition could take a new request of num_blocks blocks."""
        return any(num_blocks <= len(f) for f in self._partition_free)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(request, num_new_tokens)
        if request.block_table:
            rank = self.owner(request)
            if needed > len(self._partition_free[rank]):
                return False
        else:
            fits = [r for r in range(self.num_ranks) if needed <= len(self._partition_free[r])]
            if not fits:
                return False
            rank = min(fits, key=lambda r: (self._live[r], -len(self._partition_free[r]), r))
            if needed == 0:  # nothing to hold yet: no owner either
                return True
            self._live[rank] += 1
        self._take(self._partition_free[rank], needed, request)
        return True

    def free(self, request: Request) -> None:
        rank = self.owner(request) if request.block_table else None
        super().free(request)
        if rank is not None:
            self._live[rank] -= 1

    def _release(self, block_id: int) -> None:
        self._partition_free[block_id // self.blocks_per_rank].append(block_id)
