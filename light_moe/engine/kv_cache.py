"""Paged KV-cache bookkeeping: which physical blocks each request holds, and the prefix cache. No tensors.

A request's tokens [0, n) live in its block_table: token i sits in block
block_table[i // block_size] at slot i % block_size.

Prefix caching (enable_prefix_caching): a block whose block_size tokens all have their KV written is
registered under a hash chained over (parent block's hash, its token ids), so the hash names the whole
prefix up to and including the block; nothing else changes a block's KV today (no LoRA, no multimodal
inputs; one model per engine). Blocks are reference-counted: a new request whose leading full blocks
hash to registered blocks shares them (its first computed token is the one after them, and at least one
token is always left to compute so the request gets logits), and only blocks past them are new.
A block whose count drops to 0 keeps its KV and its hash in an LRU of cached blocks; allocation takes
never-cached free blocks first and evicts the least recently freed cached block only when there are none.
A request's blocks are released tail first, so its last blocks (the least shared) are evicted first.

When a block's KV counts as written: the scheduler registers a request's full blocks in
update_from_output, after the step that computed them was launched, possibly before it finished (async
scheduling; GPU kernels are asynchronous anyway). That is safe because every step runs on one stream (per
rank): a later step that reads the block through another request's table is launched after, so stream
order puts its reads after the writes. A block never changes once full: a request only writes the
positions it computes, which are past its full blocks (a shared block is never written by a sharer, whose
first computed position starts a block of its own). Placeholder tokens of async scheduling (negative ids
until the step's tokens reach the host) are never hashed: a block is hashed only when all its token ids are
final, and a block still holding a placeholder is registered at a later update.

Without prefix caching every block has exactly one owner, which is what lets `free` detect double frees and
foreign ids; with it, a request still never lists a block twice and never frees a block it does not hold.

The pool may be split into equal partitions (expert parallelism: one per rank, whose KV cache holds
only that partition; global block id = partition * blocks per partition + local id). Every block of a
request comes from one partition, so the partition is the request's owner. One process: one partition.
Prefix caching needs one partition (PREFIX_CACHING_EP_REASON).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from light_moe.engine.request import Request

PREFIX_CACHING_EP_REASON = (
    "prefix caching is off under expert parallelism: each rank's partition would need its own cache, and "
    "placing a request on the rank that holds its prefix conflicts with balancing data-parallel attention "
    "across ranks (not designed yet)")


def chain_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """The hash of a full block: over its parent's hash (b"" for the first block) and its token ids.
    128-bit BLAKE2b, so two different prefixes sharing a block by accident is not a practical concern."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_partitions: int = 1,
                 enable_prefix_caching: bool = False) -> None:
        """num_blocks per partition."""
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if num_partitions <= 0:
            raise ValueError(f"num_partitions must be positive, got {num_partitions}")
        if enable_prefix_caching and num_partitions > 1:
            raise ValueError(PREFIX_CACHING_EP_REASON)
        self.block_size = block_size
        self.partition_blocks, self.num_partitions = num_blocks, num_partitions
        self.enable_prefix_caching = enable_prefix_caching
        # FIFO per partition: freed blocks go to the back, so allocation order is deterministic and a block
        # just freed is the last to be reused (stale KV in it survives longer for debugging).
        self._free = [deque(range(p * num_blocks, (p + 1) * num_blocks)) for p in range(num_partitions)]
        self._live = [0] * num_partitions  # requests holding blocks, per partition
        self._refs = [0] * (num_blocks * num_partitions)  # requests holding each block
        self._num_used = 0  # blocks with refs > 0
        # prefix cache: hash -> block and back, for blocks whose KV is complete; those no request holds sit in
        # _evictable (least recently freed first) and count as free
        self._cached: dict[bytes, int] = {}
        self._block_hash: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        # prefix-cache statistics in tokens: looked up on admission, found cached
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached ones included: they are evicted when needed)."""
        return sum(len(free) for free in self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, held or not."""
        return len(self._cached)

    @property
    def num_total_blocks(self) -> int:
        return self.partition_blocks * self.num_partitions

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests, 0..1 (cached blocks nobody holds are free)."""
        return self._num_used / self.num_total_blocks

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
        return any(num_blocks <= self._room(p) for p in range(self.num_partitions))

    def _room(self, part: int) -> int:
        return len(self._free[part]) + (len(self._evictable) if self.enable_prefix_caching else 0)

    # ---- prefix cache ------------------------------------------------------------------------
    def find_cached_prefix(self, request: Request) -> list[int]:
        """The cached blocks holding the longest run of request's leading full blocks (a new request: no
        blocks yet), leaving at least its last token to compute; [] without prefix caching."""
        if not self.enable_prefix_caching or request.block_table:
            return []
        hashes = self._hashes(request, (request.num_tokens - 1) // self.block_size)
        blocks = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def cache_full_blocks(self, request: Request) -> None:
        """Register request's blocks that are full and computed (after request.num_computed_tokens advanced,
        once the step computing them was launched; see the module docstring for why that is soon enough)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_table))
        if request.num_cached_blocks >= num_full:
            return
        hashes = self._hashes(request, num_full)
        for i in range(request.num_cached_blocks, len(hashes)):
            block = request.block_table[i]
            # a shared block is registered already; a block whose prefix another request registered first
            # (both computed it) stays private and returns to the free list
            if block not in self._block_hash and hashes[i] not in self._cached:
                self._cached[hashes[i]] = block
                self._block_hash[block] = hashes[i]
        request.num_cached_blocks = len(hashes)

    def _hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """The chained hashes of request's first num_blocks full blocks, or of fewer: up to the first block
        that is not full or holds a placeholder token. Extends request.block_hashes."""
        bs, hashes = self.block_size, request.block_hashes
        while len(hashes) < num_blocks:
            start = len(hashes) * bs
            tokens = request.tokens(start, start + bs)
            if len(tokens) < bs or min(tokens) < 0:
                break
            hashes.append(chain_hash(hashes[-1] if hashes else b"", tokens))
        return hashes[:num_blocks]

    # ---- allocation ----------------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int, cached_prefix: list[int] = ()) -> bool:
        """Append blocks to request.block_table; all or nothing. False if its partition is short.

        cached_prefix (a new request only: find_cached_prefix's answer) are shared first; num_new_tokens then
        count from the end of that prefix, and the caller sets num_computed_tokens to its length in tokens.
        A request's first blocks choose its partition: among those with room, the one with the fewest live
        requests (then the most free blocks, then the lowest index), so data-parallel attention stays
        balanced. After a preemption it may land elsewhere (its KV is recomputed anyway)."""
        if cached_prefix and (request.block_table or request.num_computed_tokens):
            raise ValueError(f"request {request.request_id!r}: a cached prefix is only for a new request")
        new = not request.block_table
        prefix_tokens = len(cached_prefix) * self.block_size
        needed = max(0, self.num_blocks_for_tokens(request.num_computed_tokens + prefix_tokens + num_new_tokens)
                     - len(request.block_table) - len(cached_prefix))
        # cached blocks nobody holds count as room, except those this request is about to take
        pinned = sum(1 for b in cached_prefix if self._refs[b] == 0)
        if request.block_table:
            part = self.owner(request)
            if needed > self._room(part):
                return False
        else:
            fits = [p for p in range(self.num_partitions) if needed + pinned <= self._room(p)]
            if not fits:
                return False
            if needed == 0 and not cached_prefix:  # nothing to hold yet: no owner either
                return True
            part = min(fits, key=lambda p: (self._live[p], -self._room(p), p))
            self._live[part] += 1
        if new and self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += prefix_tokens
        for block_id in cached_prefix:
            if self._refs[block_id] == 0:
                del self._evictable[block_id]
            self._hold(block_id)
            request.block_table.append(block_id)
        request.num_cached_blocks = len(cached_prefix) if new else request.num_cached_blocks
        for _ in range(needed):
            block_id = self._take(part)
            self._hold(block_id)
            request.block_table.append(block_id)
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (their KV is no longer found by later requests; the blocks return to the
        free lists). Only while no request holds a block: False, and nothing changed, otherwise."""
        if self._num_used:
            return False
        for block_id in self._evictable:  # least recently freed first, as eviction would have taken them
            self._free[block_id // self.partition_blocks].append(block_id)
        self._evictable.clear()
        self._cached.clear()
        self._block_hash.clear()
        return True

    def _hold(self, block_id: int) -> None:
        if self._refs[block_id] == 0:
            self._num_used += 1
        self._refs[block_id] += 1

    def _take(self, part: int) -> int:
        """A block nobody holds: a never-cached one, else the least recently freed cached one (evicted)."""
        if self._free[part]:
            return self._free[part].popleft()
        block_id, _ = self._evictable.popitem(last=False)
        del self._cached[self._block_hash.pop(block_id)]
        return block_id

    def free(self, request: Request) -> None:
        """Release every block of `request` (shared ones stay with their other holders) and clear its
        block_table. Cached blocks nobody holds any more keep their KV in the LRU."""
        # Check the whole table before releasing anything, so a bad table leaves the pool intact.
        seen: set[int] = set()
        for block_id in request.block_table:
            if not 0 <= block_id < self.num_total_blocks:
                raise RuntimeError(
                    f"request {request.request_id!r} holds block {block_id}, which is not in this pool "
                    f"(valid ids 0..{self.num_total_blocks - 1})"
                )
            if self._refs[block_id] == 0 or block_id in seen:
                raise RuntimeError(
                    f"double free of block {block_id} by request {request.request_id!r}: the block is "
                    "already free or listed twice in its block_table"
                )
            seen.add(block_id)
        if request.block_table:
            self._live[self.owner(request)] -= 1
        # with prefix caching tail first, so a request's last blocks (the least shared) are evicted first
        table = request.block_table[::-1] if self.enable_prefix_caching else request.block_table
        for block_id in table:
            self._refs[block_id] -= 1
            if self._refs[block_id]:
                continue
            self._num_used -= 1
            if block_id in self._block_hash:
                self._evictable[block_id] = None
            else:
                self._free[block_id // self.partition_blocks].append(block_id)
        request.block_table.clear()
        request.num_cached_blocks = 0


class PartitionedBlockManager(BlockManager):
    """The expert-parallel pool: one partition per rank (executor/workers.py reads a request's owner rank off
    its blocks). No prefix caching (PREFIX_CACHING_EP_REASON)."""

    def __init__(self, blocks_per_rank: int, block_size: int, num_ranks: int) -> None:
        super().__init__(blocks_per_rank, block_size, num_ranks)

    @property
    def blocks_per_rank(self) -> int:
        return self.partition_blocks
