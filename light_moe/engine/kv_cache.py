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
        for _ in range(needed):
            block_id = self._free_blocks.popleft()
            self._used_blocks.add(block_id)
            request.block_table.append(block_id)
        return True

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
            self._free_blocks.append(block_id)
        request.block_table.clear()
