"""BlockManager accounting: block counts at boundaries, all-or-nothing allocation, free guards."""
import pytest

from light_moe.engine.kv_cache import BlockManager, PartitionedBlockManager
from light_moe.engine.request import Request
from light_moe.sampling_params import SamplingParams


def make_request(request_id: str, num_prompt_tokens: int = 4) -> Request:
    return Request(request_id, list(range(num_prompt_tokens)), SamplingParams())


def test_allocate_and_free_accounting():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_request("a", 10), make_request("b", 4)
    assert bm.allocate_slots(a, 10)
    assert a.block_table == [0, 1, 2]
    assert bm.allocate_slots(b, 4)
    assert b.block_table == [3]
    assert bm.num_free_blocks == 4 and bm.num_total_blocks == 8
    assert bm.usage == pytest.approx(0.5)

    bm.free(a)
    assert a.block_table == []
    assert bm.num_free_blocks == 7
    # FIFO free list: never-used blocks come before the ones just freed.
    c = make_request("c", 8)
    assert bm.allocate_slots(c, 8)
    assert c.block_table == [4, 5]
    bm.free(b)
    bm.free(c)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0


def test_blocks_needed_at_block_boundaries():
    bm = BlockManager(num_blocks=16, block_size=4)
    r = make_request("r", 20)
    assert bm.blocks_needed(r, 0) == 0
    assert bm.blocks_needed(r, 1) == 1
    assert bm.blocks_needed(r, 4) == 1
    assert bm.blocks_needed(r, 5) == 2
    assert bm.allocate_slots(r, 4)
    r.num_computed_tokens = 4
    assert bm.blocks_needed(r, 0) == 0
    assert bm.blocks_needed(r, 1) == 1  # token 4 starts block 2
    assert bm.allocate_slots(r, 1)
    r.num_computed_tokens = 5
    assert bm.blocks_needed(r, 3) == 0  # tokens 5..7 fill block 2
    assert bm.blocks_needed(r, 4) == 1
    assert len(r.block_table) == 2


def test_cannot_over_allocate_and_failure_allocates_nothing():
    bm = BlockManager(num_blocks=3, block_size=2)
    a, b = make_request("a"), make_request("b")
    assert bm.allocate_slots(a, 4)
    assert not bm.can_allocate(2)
    assert bm.can_allocate(1)
    assert not bm.allocate_slots(b, 3)  # needs 2 blocks, 1 free
    assert b.block_table == [] and bm.num_free_blocks == 1
    assert bm.allocate_slots(b, 2)
    assert bm.num_free_blocks == 0


def test_double_free_and_foreign_block_raise_naming_the_block():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make_request("a"), make_request("b")
    assert bm.allocate_slots(a, 4)
    b.block_table = list(a.block_table)
    bm.free(a)
    with pytest.raises(RuntimeError, match="double free of block 0"):
        bm.free(b)
    assert bm.num_free_blocks == 4  # the failed free changed nothing

    c = make_request("c")
    c.block_table = [99]
    with pytest.raises(RuntimeError, match="block 99"):
        bm.free(c)

    d = make_request("d")
    assert bm.allocate_slots(d, 2)
    d.block_table.append(d.block_table[0])
    with pytest.raises(RuntimeError, match="listed twice"):
        bm.free(d)
    assert bm.num_free_blocks == 3


def test_constructor_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)


def test_partitions_keep_each_request_on_one_rank_and_spread_new_ones():
    bm = PartitionedBlockManager(blocks_per_rank=4, block_size=2, num_ranks=3)
    assert bm.num_total_blocks == 12 and bm.num_free_blocks == 12 and bm.max_blocks_per_request == 4
    reqs = [Request(f"r{i}", [1] * 3, SamplingParams()) for i in range(4)]
    for r in reqs[:3]:
        assert bm.allocate_slots(r, 3)  # 2 blocks each
    assert [bm.owner(r) for r in reqs[:3]] == [0, 1, 2]  # fewest live requests first
    assert reqs[1].block_table == [4, 5]
    assert bm.allocate_slots(reqs[3], 3) and bm.owner(reqs[3]) == 0  # all tie on live: lowest rank
    reqs[0].num_computed_tokens = 3
    assert not bm.allocate_slots(reqs[0], 4)  # rank 0 is full although ranks 1 and 2 have room
    assert bm.can_allocate(2) and not bm.can_allocate(3)
    assert bm.same_pool(reqs[0], reqs[3]) and not bm.same_pool(reqs[0], reqs[1])
    bm.free(reqs[3])
    assert bm.allocate_slots(reqs[0], 4) and reqs[0].block_table == [0, 1, 2, 3]
    assert bm.num_free_blocks == 12 - 4 - 2 - 2
    assert bm.usage == pytest.approx(8 / 12)


def test_slot_ids_match_the_per_token_formula():
    """executor/model_runner.slot_ids (one range per block) equals table[p // bs] * bs + p % bs for every position."""
    import random

    from light_moe.executor.model_runner import slot_ids

    rng = random.Random(0)
    for _ in range(200):
        bs = rng.choice((1, 4, 16, 32))
        table = rng.sample(range(1000), 40)
        start = rng.randrange(0, 20 * bs)
        count = rng.randrange(0, 20 * bs)
        want = [table[p // bs] * bs + p % bs for p in range(start, start + count)]
        assert slot_ids(table, start, count, bs) == want
