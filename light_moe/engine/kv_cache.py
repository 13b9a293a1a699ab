"""Paged KV-cache bookkeeping: which physical blocks each request owns. No tensors here.

A request's tokens [0, n) live in its block_table: token i sits in block
block_table[i // block_size] at slot i % block_size. No prefix caching, so every block has
exactly one owner, which is what lets `free` detect double frees and foreign ids.

The pool may be split into equal partitions (expert parallelism: one per rank, whose KV cache holds
only that partition; global block id = partition * blocks per partition + local id). Every block of a
request comes from one partition, so the partition is the request's owner. One process: one partition.
"""
from __future__ import annotations

from collections import deque

from light_moe.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_partitions: int = 1) -> None:
        """num_blocks per partition."""
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if num_partitions <= 0:
            raise ValueError(f"num_partitions must be positive, got {num_partitions}")
        self.block_size = block_size
        self.partition_blocks, self.num_partitions = num_blocks, num_partitions
        # FIFO per partition: freed blocks go to the back, so allocation order is deterministic and a block
        # just freed is the last to be reused (stale KV in it survives longer for debugging).
        self._free = [deque(range(p * num_blocks, (p + 1) * num_blocks)) for p in range(num_partitions)]
        self._live = [0] * num_partitions  # requests holding blocks, per partition
        self._used_blocks: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return sum(len(free) for free in self._free)

    @property
    def num_total_blocks(self) -> int:
        return self.partition_blocks * self.num_partitions

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return len(self._used_blocks) / self.num_total_blocks

    @property
    def max_blocks_per_request(self) -> int:
        """The most blocks one request can ever hold: one partition."""
        return self.partition_blocks

    def owner(self, request: Request) -> int:
        """The partition holding request's blocks (it must hold some)."""
        return request.block_table[0] // self.partition_blocks

    def same_pool(self, a: Request, b: Request) -> bool:
        """Whether freeing a's blocks can make room for b."""
        if a is b or self.num_partitions == 1:
            return True
        return bool(a.block_table) and bool(b.block_table) and self.owner(a) == self.owner(b)

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """More blocks `request` needs so that slots for tokens [0, computed + num_new_tokens) exist."""
        target = self.num_blocks_for_tokens(request.num_computed_tokens + num_new_tokens)
        return max(0, target - len(request.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        """Whether some partition could take a new request of num_blocks blocks."""
        return any(num_blocks <= len(free) for free in self._free)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Append blocks to request.block_table; all or nothing. False if its partition is short.

        A request's first blocks choose its partition: among those with room, the one with the fewest live
        requests (then the most free blocks, then the lowest index), so data-parallel attention stays
        balanced. After a preemption it may land elsewhere (its KV is recomputed anyway)."""
        needed = self.blocks_needed(request, num_new_tokens)
        if request.block_table:
            part = self.owner(request)
            if needed > len(self._free[part]):
                return False
        else:
            fits = [p for p in range(self.num_partitions) if needed <= len(self._free[p])]
            if not fits:
                return False
            if needed == 0:  # nothing to hold yet: no owner either
                return True
            part = min(fits, key=lambda p: (self._live[p], -len(self._free[p]), p))
            self._live[part] += 1
        free = self._free[part]
        for _ in range(needed):
            block_id = free.popleft()
            self._used_blocks.add(block_id)
            request.block_table.append(block_id)
        return True

    def free(self, request: Request) -> None:
        """Return every block of `request` to the pool and clear its block_table."""
        # Check the whole table before releasing anything, so a bad table leaves the pool intact.
        seen: set[int] = set()
        for block_id in request.block_table:
            if not 0 <= block_id < self.num_total_blocks:
                raise RuntimeError(
                    f"request {request.request_id!r} holds block {block_id}, which is not in this pool "
                    f"(valid ids 0..{self.num_total_blocks - 1})"
                )
            if block_id not in self._used_blocks or block_id in seen:
                raise RuntimeError(
                    f"double free of block {block_id} by request {request.request_id!r}: the block is "
                    "already free or listed twice in its block_table"
                )
            seen.add(block_id)
        if request.block_table:
            self._live[self.owner(request)] -= 1
        for block_id in request.block_table:
            self._used_blocks.remove(block_id)
            self._free[block_id // self.partition_blocks].append(block_id)
        request.block_table.clear()


class PartitionedBlockManager(BlockManager):
    """The expert-parallel pool: one partition per rank (executor/workers.py reads a request's owner rank off
    its blocks)."""

    def __init__(self, blocks_per_rank: int, block_size: int, num_ranks: int) -> None:
        super().__init__(blocks_per_rank, block_size, num_ranks)

    @property
    def blocks_per_rank(self) -> int:
        return self.partition_blocks
