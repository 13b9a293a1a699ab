"""Scheduler policy: token budget, chunked prefill, seats, FCFS, preemption by recompute, aborts.

The last test drives thousands of random steps through a small block pool, checking the pool and
budget invariants after every step and that every request ends with exactly its tokens.
"""
import random

import pytest

from light_moe.engine.kv_cache import BlockManager, PartitionedBlockManager
from light_moe.engine.request import Request, RequestStatus
from light_moe.engine.scheduler import Scheduler, SchedulerConfig
from light_moe.sampling_params import SamplingParams


def make_request(request_id: str, num_prompt_tokens: int, max_tokens: int = 16) -> Request:
    return Request(request_id, list(range(num_prompt_tokens)), SamplingParams(max_tokens=max_tokens))


def make_scheduler(num_blocks=64, block_size=4, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, block_size))


def plan(out):
    """{request_id: (num_new_tokens, is_prefill, samples)} for compact assertions."""
    return {s.request.request_id: (s.num_new_tokens, s.is_prefill, s.samples) for s in out.scheduled}


def step(scheduler, token=7):
    out = scheduler.schedule()
    sampled = {s.request.request_id: token for s in out.scheduled if s.samples}
    scheduler.update_from_output(out, sampled)
    return out


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=-1)


def test_chunked_prefill_respects_budget_and_chunk_sizes():
    s = make_scheduler(max_num_batched_tokens=8)
    s.add_request(make_request("a", 20))
    s.add_request(make_request("b", 5))

    out = step(s)
    assert plan(out) == {"a": (8, True, False)} and out.num_batched_tokens == 8
    out = step(s)
    assert plan(out) == {"a": (8, True, False)}
    out = step(s)  # a's last chunk samples; b starts with what is left of the budget
    assert plan(out) == {"a": (4, True, True), "b": (4, True, False)}
    assert s.get_request("a").output_token_ids == [7]
    out = step(s)
    assert plan(out) == {"a": (1, False, True), "b": (1, True, True)}
    assert out.num_batched_tokens == 2
    out = step(s)
    assert plan(out) == {"a": (1, False, True), "b": (1, False, True)}


def test_without_chunked_prefill_prompt_is_scheduled_whole_or_not_at_all():
    s = make_scheduler(max_num_batched_tokens=10, enable_chunked_prefill=False)
    s.add_request(make_request("a", 6))
    s.add_request(make_request("b", 6))
    s.add_request(make_request("c", 2))
    out = step(s)
    assert plan(out) == {"a": (6, True, True)}  # b does not fit the 4 left; c may not skip ahead
    out = step(s)
    assert plan(out) == {"a": (1, False, True), "b": (6, True, True), "c": (2, True, True)}
    with pytest.raises(ValueError, match="max_num_batched_tokens=10"):
        s.add_request(make_request("long", 11))


def test_max_num_seqs_respected_and_new_requests_join_running_batch():
    s = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        s.add_request(make_request(rid, 3))
    out = step(s)
    assert set(plan(out)) == {"a", "b"} and s.num_running == 2 and s.num_waiting == 1
    out = step(s)
    assert plan(out) == {"a": (1, False, True), "b": (1, False, True)}

    assert s.finish_request("a", "stop")
    out = step(s)  # c takes the freed seat while b keeps decoding
    assert plan(out) == {"b": (1, False, True), "c": (3, True, True)}
    assert s.num_running == 2 and s.num_waiting == 0


def test_preemption_recomputes_victim_from_zero_and_resumes_first():
    s = make_scheduler(num_blocks=4, block_size=4)
    a, b, c = make_request("a", 7), make_request("b", 7), make_request("c", 2)
    s.add_request(a)
    s.add_request(b)
    step(s, token=100)  # both prefilled: 2 blocks each, pool empty
    step(s, token=101)  # decode of token 7 still fits block 2 of each
    s.add_request(c)
    assert a.num_tokens == 9 and s.block_manager.num_free_blocks == 0

    out = step(s, token=102)  # a's token 8 needs a third block: the later arrival b is evicted
    assert plan(out) == {"a": (1, False, True)}
    assert out.preempted == [b]
    assert b.status is RequestStatus.WAITING and b.num_preemptions == 1
    assert b.num_computed_tokens == 0 and b.block_table == []
    assert b.output_token_ids == [100, 101]  # outputs survive preemption
    assert s.waiting == (b, c)  # victim goes in front of requests that were already waiting

    out = step(s, token=103)  # b needs 3 blocks, 1 is free: it waits and c may not skip it
    assert plan(out) == {"a": (1, False, True)}
    s.finish_request("a", "length")
    out = step(s, token=104)
    # b recomputes prompt + both outputs in one prefill, then samples its third token.
    assert plan(out) == {"b": (9, True, True), "c": (2, True, True)}
    assert b.num_computed_tokens == 9 and b.output_token_ids == [100, 101, 104]
    assert s.running == (b, c)  # resumed in arrival order, so c stays the next victim


def test_preemption_when_the_request_itself_is_the_latest():
    s = make_scheduler(num_blocks=5, block_size=2)
    a, b = make_request("a", 3), make_request("b", 3)
    s.add_request(a)
    s.add_request(b)
    step(s)  # 2 blocks each, 1 free
    step(s)  # token 3 fits block 1 of each
    out = step(s)  # a takes the last free block; b, the latest arrival, can only evict itself
    assert plan(out) == {"a": (1, False, True)} and out.preempted == [b]
    assert a.num_computed_tokens == 5 and len(a.block_table) == 3
    assert b.num_computed_tokens == 0 and s.waiting == (b,)


def test_abort_frees_blocks_and_ignores_unknown_ids():
    s = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=1)
    s.add_request(make_request("a", 10))
    s.add_request(make_request("b", 4))
    step(s)
    assert s.block_manager.num_free_blocks == 5
    assert s.abort_request("a")
    assert s.block_manager.num_free_blocks == 8
    assert s.abort_request("b")  # waiting requests can be aborted too
    assert not s.abort_request("a") and not s.abort_request("nope")
    assert not s.has_unfinished_requests() and s.get_request("a") is None
    with pytest.raises(ValueError, match="finish reason"):
        s.finish_request("x", "done")


def test_abort_between_schedule_and_update_is_skipped():
    s = make_scheduler()
    a = make_request("a", 4)
    s.add_request(a)
    out = s.schedule()
    s.abort_request("a")
    assert s.update_from_output(out, {"a": 5}) == []
    assert a.finish_reason == "abort" and a.output_token_ids == [] and a.block_table == []


def test_missing_sampled_token_names_the_request():
    s = make_scheduler()
    s.add_request(make_request("a", 4))
    out = s.schedule()
    with pytest.raises(ValueError, match="'a'"):
        s.update_from_output(out, {})


def test_too_big_or_duplicate_request_raises():
    s = make_scheduler(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="needs 3 KV blocks .* only 2 blocks"):
        s.add_request(make_request("big", 8))
    s.add_request(make_request("ok", 7))
    with pytest.raises(ValueError, match="already in the scheduler"):
        s.add_request(make_request("ok", 3))


def test_request_that_outgrows_the_whole_cache_is_finished_with_capacity():
    s = make_scheduler(num_blocks=2, block_size=4)
    r = make_request("r", 6)
    s.add_request(r)
    for _ in range(3):
        out = step(s)
        assert not out.finished
    out = step(s)  # computing token 8 would need a third block, and the pool has two
    assert out.finished == [r] and out.scheduled == []
    assert r.finish_reason == "capacity" and r.num_output_tokens == 3
    assert s.block_manager.num_free_blocks == 2 and not s.has_unfinished_requests()


def check_invariants(s: Scheduler, out, config: SchedulerConfig):
    bm = s.block_manager
    live = list(s.running) + list(s.waiting)
    owned = [b for r in live for b in r.block_table]
    assert len(owned) == len(set(owned)), "a block is in two tables"
    assert bm.num_free_blocks + len(owned) == bm.num_total_blocks
    if isinstance(bm, PartitionedBlockManager):
        for r in live:
            assert len({b // bm.blocks_per_rank for b in r.block_table}) <= 1, "a request spans partitions"
    for r in s.waiting:
        assert r.block_table == [] and r.num_computed_tokens == 0 and r.status is RequestStatus.WAITING
    for r in s.running:
        assert r.status is RequestStatus.RUNNING
        assert len(r.block_table) >= bm.num_blocks_for_tokens(r.num_computed_tokens)
    assert len(s.running) <= config.max_num_seqs
    if out is None:
        return
    ids = [x.request.request_id for x in out.scheduled]
    assert len(ids) == len(set(ids)), "a request was scheduled twice"
    assert sum(x.num_new_tokens for x in out.scheduled) == out.num_batched_tokens <= config.max_num_batched_tokens
    for x in out.scheduled:
        r = x.request
        assert r.status is RequestStatus.RUNNING
        assert 1 <= x.num_new_tokens <= r.num_tokens - r.num_computed_tokens
        assert len(r.block_table) >= bm.num_blocks_for_tokens(r.num_computed_tokens + x.num_new_tokens)
        assert x.samples == (r.num_computed_tokens + x.num_new_tokens == r.num_tokens)
        if not config.enable_chunked_prefill and x.is_prefill and r.num_computed_tokens == 0:
            assert x.num_new_tokens == r.num_tokens
    assert not {r.request_id for r in out.preempted} & set(ids)


def fake_token(request_id: str, position: int) -> int:
    # Not hash(): str hashing is salted per process, and the test must be reproducible.
    return int(request_id[1:]) * 1000 + position


@pytest.mark.parametrize("ranks", [1, 2, 3], ids=["one-pool", "2-partitions", "3-partitions"])
@pytest.mark.parametrize("seed", range(4))
def test_random_steps_keep_invariants_and_lose_no_tokens(seed, ranks):
    """ranks > 1: the expert-parallel pool, one partition per rank (a request's blocks in one partition,
    preemption within it)."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    num_blocks = rng.randint(6, 16)  # per partition
    config = SchedulerConfig(
        max_num_seqs=rng.randint(3, 8) * ranks,  # several requests per partition, so they compete
        max_num_batched_tokens=rng.randint(8, 48),
        enable_chunked_prefill=seed % 2 == 0,
    )
    if ranks == 1:
        pool = BlockManager(num_blocks, block_size)
    else:
        pool = PartitionedBlockManager(num_blocks, block_size, ranks)
    s = Scheduler(config, pool)
    capacity = num_blocks * block_size  # one request fits one partition
    if not config.enable_chunked_prefill:
        capacity = min(capacity, config.max_num_batched_tokens)

    requests: dict[str, Request] = {}
    total_preemptions = 0
    next_id = 0

    def run_step():
        nonlocal total_preemptions
        out = s.schedule()
        check_invariants(s, out, config)
        assert not out.finished  # targets were chosen to fit the cache
        total_preemptions += len(out.preempted)
        if out.scheduled and rng.random() < 0.02:  # abort racing with the model step
            s.abort_request(rng.choice(out.scheduled).request.request_id)
        sampled = {
            x.request.request_id: fake_token(x.request.request_id, x.request.num_output_tokens)
            for x in out.scheduled
            if x.samples
        }
        for r in s.update_from_output(out, sampled):
            if r.num_output_tokens == r.sampling_params.max_tokens:
                s.finish_request(r.request_id, "length")
        check_invariants(s, None, config)

    for _ in range(1500):
        if rng.random() < 0.3 * ranks:  # partitions: more traffic, so that they fill up too
            # Largest length ever computed is prompt + max_tokens - 1; keep it within the cache.
            prompt_len = rng.randint(1, max(1, capacity // 2))
            max_tokens = rng.randint(1, capacity - prompt_len + 1)
            r = make_request(f"r{next_id}", prompt_len, max_tokens)
            r.prompt_token_ids = [rng.randrange(50_000) for _ in range(prompt_len)]
            next_id += 1
            requests[r.request_id] = r
            s.add_request(r)
        if rng.random() < 0.01 and requests:
            s.abort_request(rng.choice(list(requests)))
        run_step()

    for _ in range(20_000):  # drain: everything left must finish without new arrivals
        if not s.has_unfinished_requests():
            break
        run_step()
    assert not s.has_unfinished_requests()
    assert s.block_manager.num_free_blocks == num_blocks * ranks and s.block_manager.usage == 0.0

    assert total_preemptions > 0, "the pool was meant to be small enough to force preemption"
    finished_by_length = 0
    for r in requests.values():
        assert r.is_finished and r.block_table == []
        expected = [fake_token(r.request_id, i) for i in range(r.num_output_tokens)]
        assert r.output_token_ids == expected
        if r.finish_reason == "length":
            finished_by_length += 1
            assert r.num_output_tokens == r.sampling_params.max_tokens
        else:
            assert r.finish_reason == "abort" and r.num_output_tokens <= r.sampling_params.max_tokens
    assert finished_by_length > len(requests) // 2
