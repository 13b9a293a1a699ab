"""Prefix caching: hash-chained full blocks shared between requests, reference counts, LRU eviction
(BlockManager); admission from the longest cached prefix (Scheduler); and the engine's greedy outputs,
identical with and without it, through shared prefixes among concurrent requests, chunked prefill,
preemption and async scheduling, with no block leaked."""
import random

import pytest

from light_moe import LightMoEEngine, SamplingParams
from light_moe.engine.kv_cache import BlockManager, PartitionedBlockManager, chain_hash
from light_moe.engine.request import Request, RequestStatus
from light_moe.engine.scheduler import Scheduler, SchedulerConfig
from tests.tiny_models import make_tiny_checkpoint


def req(rid: str, tokens: list[int], max_tokens: int = 16) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens))


def admit(bm: BlockManager, r: Request) -> int:
    """What the scheduler does for a new request: share its cached prefix, allocate the rest; -> hit tokens."""
    prefix = bm.find_cached_prefix(r)
    hit = len(prefix) * bm.block_size
    assert bm.allocate_slots(r, r.num_tokens - hit, prefix)
    r.num_computed_tokens = r.num_tokens
    bm.cache_full_blocks(r)
    return hit


# ---- BlockManager --------------------------------------------------------------------------------
def test_hash_is_chained_over_the_parent():
    a = chain_hash(b"", [1, 2, 3, 4])
    assert a == chain_hash(b"", [1, 2, 3, 4])
    assert chain_hash(a, [5, 6, 7, 8]) != chain_hash(chain_hash(b"", [0, 2, 3, 4]), [5, 6, 7, 8])
    assert chain_hash(b"", [1, 2]) != chain_hash(b"", [2, 1])


def test_shared_prefix_blocks_are_reference_counted_and_kept_after_free():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    a = req("a", list(range(10)))  # blocks 0, 1 full; block 2 holds tokens 8, 9
    assert admit(bm, a) == 0
    assert bm.num_cached_blocks == 2 and bm.prefix_cache_queries == 10 and bm.prefix_cache_hits == 0
    b = req("b", list(range(8)) + [99, 98, 97])
    assert admit(bm, b) == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] not in a.block_table
    assert b.num_cached_blocks == 2
    assert bm.prefix_cache_hits == 8 and bm.prefix_cache_queries == 21
    assert bm.usage == pytest.approx(4 / 16)  # 0, 1 shared; a's and b's third blocks
    bm.free(a)
    assert bm.usage == pytest.approx(3 / 16)  # the shared blocks stay with b
    bm.free(b)
    assert bm.usage == 0 and bm.num_free_blocks == 16 and bm.num_cached_blocks == 2
    c = req("c", list(range(12)))
    assert admit(bm, c) == 8  # cached blocks survive their holders
    bm.free(c)
    assert bm.num_cached_blocks == 3 and bm.num_free_blocks == 16


def test_at_least_one_token_is_left_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    admit(bm, req("a", list(range(8))))
    same = req("b", list(range(8)))
    assert len(bm.find_cached_prefix(same)) == 1  # the second block holds the last token: recomputed
    assert admit(bm, same) == 4
    longer = req("c", list(range(9)))
    assert len(bm.find_cached_prefix(longer)) == 2


def test_placeholder_tokens_are_never_hashed():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    r = req("r", [1, 2, 3])
    assert bm.allocate_slots(r, 3)
    r.output_token_ids.append(-1)  # async scheduling: the sampled token is still on the device
    r.num_computed_tokens = 4
    bm.cache_full_blocks(r)
    assert bm.num_cached_blocks == 0 and r.block_hashes == []
    r.output_token_ids[-1] = 7  # read back
    r.num_computed_tokens = 4
    bm.cache_full_blocks(r)
    assert bm.num_cached_blocks == 1 and r.block_hashes == [chain_hash(b"", [1, 2, 3, 7])]


def test_free_blocks_before_eviction_then_least_recently_freed_tail_first():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=True)
    a = req("a", [1, 2, 3, 4, 5])  # 3 blocks, the first two full
    b = req("b", [9, 8, 7, 6, 5])
    admit(bm, a)
    admit(bm, b)
    bm.free(a)
    bm.free(b)
    assert bm.num_cached_blocks == 4 and bm.num_free_blocks == 6
    # a new request first takes the two never-cached blocks (a's and b's third, in the order freed), then
    # evicts the least recently freed cached block: a's, and of a's its second (released tail first)
    c = req("c", [20, 21, 22, 23, 24])
    assert admit(bm, c) == 0
    assert c.block_table == [2, 5, 1]
    assert len(bm.find_cached_prefix(req("a2", [1, 2, 3, 4, 5]))) == 1  # a's first block is still cached
    assert len(bm.find_cached_prefix(req("b2", [9, 8, 7, 6, 5]))) == 2  # b untouched
    bm.free(c)
    assert bm.usage == 0


def test_allocation_is_all_or_nothing_with_a_pinned_prefix():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = req("a", [1, 2, 3, 4, 5])  # blocks: [1,2] [3,4] cached, [5] not
    admit(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    big = req("big", [1, 2, 3, 4] + list(range(10, 15)))  # 2 cached + 3 new blocks > 4 blocks in all
    prefix = bm.find_cached_prefix(big)
    assert len(prefix) == 2
    assert not bm.allocate_slots(big, big.num_tokens - 4, prefix)
    assert big.block_table == [] and bm.num_free_blocks == 4 and bm.prefix_cache_queries == 5
    assert bm.num_cached_blocks == 2


def test_a_block_listed_twice_or_freed_twice_still_raises():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = req("a", [1, 2, 3])
    admit(bm, a)
    twin = req("t", [1, 2, 3])
    twin.block_table = [a.block_table[0], a.block_table[0]]
    with pytest.raises(RuntimeError, match="listed twice"):
        bm.free(twin)
    bm.free(a)
    a.block_table = [0]
    with pytest.raises(RuntimeError, match="double free of block 0"):
        bm.free(a)


def test_reset_forgets_cached_blocks_only_when_none_is_held():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = req("a", list(range(10)))
    admit(bm, a)
    assert bm.num_cached_blocks == 2
    assert not bm.reset_prefix_cache()  # a holds its blocks: nothing changes
    assert bm.num_cached_blocks == 2
    bm.free(a)
    assert bm.num_free_blocks == 8 and bm.find_cached_prefix(req("b", list(range(10))))
    assert bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 8
    b = req("b", list(range(10)))
    assert admit(bm, b) == 0  # computed again
    assert sorted(b.block_table) == sorted(set(b.block_table)) and len(b.block_table) == 3
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_engine_reset_prefix_cache(ckpt):
    engine = LightMoEEngine(ckpt, dtype="float32", device="cpu", show_progress=False)
    prompt = list(range(3, 40))
    params = SamplingParams(max_tokens=4, temperature=0.0)
    first = engine.generate_outputs([prompt], params)[0].token_ids
    assert engine.block_manager.num_cached_blocks > 0
    engine.add_request(prompt, params)
    assert not engine.reset_prefix_cache()  # a request is unfinished
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.reset_prefix_cache() and engine.block_manager.num_cached_blocks == 0
    hits = engine.block_manager.prefix_cache_hits
    assert engine.generate_outputs([prompt], params)[0].token_ids == first
    assert engine.block_manager.prefix_cache_hits == hits  # nothing found: the prompt was computed again


def test_partitions_refuse_prefix_caching_with_the_reason():
    with pytest.raises(ValueError, match="expert parallelism"):
        BlockManager(4, 2, num_partitions=2, enable_prefix_caching=True)
    assert not PartitionedBlockManager(4, 2, 2).enable_prefix_caching


# ---- Scheduler -----------------------------------------------------------------------------------
def test_scheduler_admits_after_the_cached_prefix_and_stamps_queue_time():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), BlockManager(32, 4, enable_prefix_caching=True))
    first = req("a", list(range(18)))
    s.add_request(first)
    out = s.schedule()
    assert out.scheduled[0].num_new_tokens == 18 and first.num_cached_tokens == 0
    assert first.first_scheduled_time is not None and first.first_scheduled_time >= first.arrival_time
    s.update_from_output(out, {"a": 5})
    second = req("b", list(range(16)) + [40, 41])
    s.add_request(second)
    out = s.schedule()
    new = {x.request.request_id: x for x in out.scheduled}
    assert new["b"].num_new_tokens == 2 and new["b"].is_prefill and new["b"].samples
    assert second.num_computed_tokens == 16 and second.num_cached_tokens == 16
    s.update_from_output(out, {"a": 6, "b": 7})
    for rid in ("a", "b"):
        s.finish_request(rid, "stop")
    assert s.block_manager.usage == 0


def test_preempted_request_resumes_from_its_own_cached_blocks():
    bm = BlockManager(6, 4, enable_prefix_caching=True)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), bm)
    a, b = req("a", list(range(11)), 40), req("b", list(range(100, 111)), 40)
    s.add_request(a)
    s.add_request(b)
    preempted_at = None
    for step in range(30):
        out = s.schedule()
        if out.preempted and preempted_at is None:
            preempted_at = step
            victim = out.preempted[0]
            assert victim is b and b.status is RequestStatus.WAITING and b.block_table == []
        if preempted_at is not None and b in [x.request for x in out.scheduled] and b.num_computed_tokens:
            assert b.num_computed_tokens % 4 == 0  # resumed after its cached blocks, not from zero
            break
        s.update_from_output(out, {x.request.request_id: 1 for x in out.scheduled if x.samples})
        if a.num_output_tokens >= 8 and not a.is_finished:
            s.finish_request("a", "length")  # frees room so b comes back
    else:
        pytest.fail("b was never preempted and resumed")


@pytest.mark.parametrize("seed", range(6))
def test_random_steps_with_shared_prefixes_keep_refcounts_and_leak_nothing(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4])
    bm = BlockManager(rng.randint(16, 24), block_size, enable_prefix_caching=True)
    config = SchedulerConfig(max_num_seqs=rng.randint(2, 6), max_num_batched_tokens=rng.randint(6, 32),
                             enable_chunked_prefill=True)
    s = Scheduler(config, bm)
    stems = [[rng.randrange(50) for _ in range(rng.randint(1, 8))] for _ in range(3)]
    capacity = bm.partition_blocks * block_size
    done = 0
    for i in range(25):
        prompt = rng.choice(stems) + [rng.randrange(50) for _ in range(rng.randint(1, 4))]
        s.add_request(req(f"r{i}", prompt, max_tokens=max(1, min(rng.randint(1, 10), capacity - len(prompt) - 1))))
    for _ in range(2000):
        if not s.has_unfinished_requests():
            break
        out = s.schedule()
        held: dict[int, int] = {}
        for r in s.running:
            for b in r.block_table:
                held[b] = held.get(b, 0) + 1
            assert len(set(r.block_table)) == len(r.block_table)
        assert bm.usage == pytest.approx(len(held) / bm.num_total_blocks)
        assert all(bm._refs[b] == n for b, n in held.items())
        assert bm.num_free_blocks + len(held) == bm.num_total_blocks
        sampled = {x.request.request_id: 3 for x in out.scheduled if x.samples}
        for r in s.update_from_output(out, sampled):
            if r.num_output_tokens >= r.sampling_params.max_tokens:
                s.finish_request(r.request_id, "length")
                done += 1
    assert not s.has_unfinished_requests() and done == 25
    assert bm.usage == 0 and bm.num_free_blocks == bm.num_total_blocks
    assert bm.prefix_cache_hits > 0


# ---- the engine: the same greedy tokens with and without it ---------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"))


SYSTEM = list(range(20, 61))  # 41 tokens: 5 full blocks of 8 and one more token
# the last prompt differs from SYSTEM in its first block only: none of its blocks may be shared
PROMPTS = ([SYSTEM + [100 + i, 110 + i, 120 + i] for i in range(5)] + [SYSTEM, SYSTEM + [100, 110, 120]]
           + [[7] * 8 + SYSTEM[8:] + [100, 110]])


def run(engine, prompts, max_tokens=12, staggered=True) -> dict[str, tuple]:
    """Greedy token ids per prompt; with `staggered` the first prompt runs a few steps alone first, so
    the others find its blocks cached while it still runs (shared by concurrent requests)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=True)
    done: dict[str, tuple] = {}
    ids = [engine.add_request(prompts[0], params, request_id="p0")]
    for _ in range(3 if staggered else 0):
        for o in engine.step():
            assert not o.finished
    ids += [engine.add_request(p, params, request_id=f"p{i}") for i, p in enumerate(prompts[1:], 1)]
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = (tuple(o.token_ids), o.logprobs)
    assert sorted(done) == sorted(ids)
    return done


def same_tokens(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k][0] == want[k][0], k
        assert got[k][1] == pytest.approx(want[k][1], abs=1e-4), k


CASES = {
    "concurrent": dict(),
    "chunked-prefill": dict(max_num_batched_tokens=16),
    "preemption": dict(num_kv_blocks=14),
}


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("case", list(CASES))
def test_engine_outputs_identical_with_and_without_prefix_caching(ckpt, case, async_scheduling):
    common = dict(dtype="float32", device="cpu", show_progress=False, block_size=8,
                  async_scheduling=async_scheduling, **CASES[case])
    plain = LightMoEEngine(ckpt, enable_prefix_caching=False, **common)
    cached = LightMoEEngine(ckpt, **common)
    assert cached.config.cache.enable_prefix_caching and not plain.block_manager.enable_prefix_caching
    want = run(plain, PROMPTS)
    got = run(cached, PROMPTS)
    same_tokens(got, want)
    # a second round finds everything cached (the whole prompt but its last block)
    same_tokens(run(cached, PROMPTS, staggered=False), want)
    bm = cached.block_manager
    assert bm.prefix_cache_hits >= 40 * (len(PROMPTS) - 1)
    assert plain.block_manager.prefix_cache_queries == 0
    if case == "preemption":
        assert cached.stats["preemptions"] > 0
    for engine in (plain, cached):
        assert engine.block_manager.usage == 0
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
