"""Expert parallelism on CPU over gloo: N processes (this pytest process is rank 0) give the same
greedy tokens and, within float32 rounding, the same logits as one process, for every family and
placement, through rebalances and the fixed-capacity exchange. (Failures and launches: test_ep_launch.py;
benchmarks: test_ep_bench.py; GPUs: test_ep_gpu.py.)

The worker processes are started once per world size (module-scoped, parametrized executor) and
reused by every engine: one process may belong to one process group at a time, so pytest
finishes all N=2 tests and tears that executor down before starting the N=4 one.
"""
import textwrap
import time

import pytest
import torch

from light_moe import LightMoEEngine, SamplingParams
from light_moe.engine.request import Request
from light_moe.engine.scheduler import ScheduledRequest
from light_moe.executor.workers import ExpertParallelExecutor
from light_moe.parallel import placement as pl
from light_moe.parallel.balancer import LOAD_SYNC_STEPS, ExpertLoadWindow
from light_moe.parallel.dispatch import LocalDispatcher
from tests.ep_helpers import ENGINE_ARGS, GREEDY, PROMPTS, run_script
from tests.tiny_models import FAMILIES, make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {f: make_tiny_checkpoint(f, tmp_path_factory.mktemp(f)) for f in FAMILIES}


@pytest.fixture(scope="module")
def single_process(checkpoints):
    """Per family: greedy tokens, prefill logits and recorded expert load of the 1-process engine."""
    results = {}
    for family, path in checkpoints.items():
        engine = LightMoEEngine(path, **ENGINE_ARGS)
        tokens = [o.token_ids for o in engine.generate_outputs(PROMPTS, GREEDY)]
        window = ExpertLoadWindow(len(engine.model.moe_blocks()), engine.model_config.num_experts, window_steps=8)
        engine.add_request(PROMPTS[3], GREEDY)
        while engine.has_unfinished_requests():
            engine.step()
            window.record(engine.runner.expert_load())
        assert window.num_steps == 8
        results[family] = (tokens, prefill_logits(engine), window)
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=["ep2", "ep4"])
def executor(request):
    ex = ExpertParallelExecutor(request.param, torch.device("cpu"), timeout_s=60.0)
    yield ex
    ex.shutdown()


def prefill_logits(engine, prompts=PROMPTS) -> torch.Tensor:
    """One step prefilling every prompt (spread over the ranks): logits of the last positions. [S, V]"""
    requests = [Request(f"probe-{i}", p, SamplingParams()) for i, p in enumerate(prompts)]
    for r in requests:
        assert engine.block_manager.allocate_slots(r, len(r.prompt_token_ids))
    try:
        scheduled = [ScheduledRequest(r, len(r.prompt_token_ids), True, True) for r in requests]
        run = engine.runner if engine.workers is None else engine.workers
        return run.execute(scheduled)
    finally:
        for r in requests:
            engine.block_manager.free(r)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["contiguous", "round_robin"])
def test_same_greedy_tokens_and_logits_as_one_process(executor, checkpoints, single_process, family, strategy):
    expected_tokens, expected_logits, _ = single_process[family]
    engine = LightMoEEngine(checkpoints[family], expert_parallel_size=executor.world_size,
                            expert_placement=strategy, expert_parallel_executor=executor, **ENGINE_ARGS)
    # rank 0 holds only its experts: E / N of them per MoE layer
    for block in engine.model.moe_blocks():
        assert block.experts.w13.shape[0] == engine.model_config.num_experts // executor.world_size
    got = [o.token_ids for o in engine.generate_outputs(PROMPTS, GREEDY)]
    assert got == expected_tokens
    assert engine.stats["max_batch_size"] > executor.world_size  # every rank had sequences
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
    logits = prefill_logits(engine)
    rel = (logits - expected_logits).norm() / expected_logits.norm()
    assert rel < 1e-5, f"relative logits error {rel:.2e}"


@pytest.mark.parametrize("family", ["qwen2_moe"])
def test_fuse_combine_norm_leaves_expert_parallel_layers_combining_as_before(executor, checkpoints, single_process,
                                                                             family):
    """--fuse-combine-norm reaches every rank, but a layer whose experts sit on several processes combines after
    its exchange as before (only a one-process layer defers it): the same tokens as one process, no deferral."""
    expected_tokens, _, _ = single_process[family]
    engine = LightMoEEngine(checkpoints[family], expert_parallel_size=executor.world_size, fuse_combine_norm=True,
                            expert_parallel_executor=executor, **ENGINE_ARGS)
    blocks = engine.model.moe_blocks()
    assert all(b.ops is engine.ops and not isinstance(b.dispatcher, LocalDispatcher) for b in blocks)
    assert engine.ops.fuse_combine_norm
    deferred = []
    real = engine.ops.combine_rms_norm
    engine.ops.combine_rms_norm = lambda *args: deferred.append(1) or real(*args)
    assert [o.token_ids for o in engine.generate_outputs(PROMPTS, GREEDY)] == expected_tokens
    assert not deferred


@pytest.mark.parametrize("family,strategy", [("deepseek_v2", "contiguous"), ("deepseek_v3", "round_robin")])
def test_deepseek_same_greedy_tokens_and_logits_as_one_process(executor, tmp_path_factory, family, strategy):
    # MLA's latent cache, grouped routing with a correction bias, shared experts and a dense first layer
    path = make_tiny_checkpoint(family, tmp_path_factory.mktemp(family))
    single = LightMoEEngine(path, **ENGINE_ARGS)
    expected_tokens = [o.token_ids for o in single.generate_outputs(PROMPTS, GREEDY)]
    expected_logits = prefill_logits(single)
    engine = LightMoEEngine(path, expert_parallel_size=executor.world_size, expert_placement=strategy,
                            expert_parallel_executor=executor, **ENGINE_ARGS)
    for block in engine.model.moe_blocks():
        assert block.experts.w13.shape[0] == engine.model_config.num_experts // executor.world_size
    assert [o.token_ids for o in engine.generate_outputs(PROMPTS, GREEDY)] == expected_tokens
    assert engine.stats["max_batch_size"] > executor.world_size
    logits = prefill_logits(engine)
    rel = (logits - expected_logits).norm() / expected_logits.norm()
    assert rel < 1e-5, f"relative logits error {rel:.2e}"


def test_gpt_oss_same_tokens_and_logits_as_one_process_through_a_rebalance(executor, tmp_path_factory):
    # sinks, sliding-window layers, biased router and experts: every rank holds all experts' biases and picks its
    # experts' rows, so the copies a rebalance makes compute with the right biases
    path = make_tiny_checkpoint("gpt_oss", tmp_path_factory.mktemp("gpt_oss"))
    single = LightMoEEngine(path, **ENGINE_ARGS)
    expected_tokens = [o.token_ids for o in single.generate_outputs(PROMPTS, GREEDY)]
    expected_logits = prefill_logits(single)
    engine = LightMoEEngine(path, expert_parallel_size=executor.world_size, expert_placement="round_robin",
                            num_redundant_experts=1, expert_parallel_executor=executor, **ENGINE_ARGS)
    got = generate_with_rebalance(engine, rebalance_at=5,
                                  expert_load=[SKEWED_LOAD] * len(engine.model_config.moe_layers))
    assert got == expected_tokens
    assert engine.stats["rebalances"] == 1 and engine.stats["max_batch_size"] > executor.world_size
    for block, full in zip(engine.model.moe_blocks(), single.model.moe_blocks()):
        ids = list(block.local_expert_ids)
        assert len(ids) < engine.model_config.num_experts
        assert torch.equal(block.local_biases[0], full.expert_biases.b13[ids])
        assert torch.equal(block.local_biases[1], full.expert_biases.b2[ids])
    logits = prefill_logits(engine)
    rel = (logits - expected_logits).norm() / expected_logits.norm()
    assert rel < 1e-5, f"relative logits error {rel:.2e}"


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_load_aware_placement_gives_the_same_tokens(executor, checkpoints, single_process, family, tmp_path):
    expected_tokens, _, window = single_process[family]
    load_file = tmp_path / "expert_load.json"
    window.save(load_file)
    engine = LightMoEEngine(checkpoints[family], expert_parallel_size=executor.world_size,
                            expert_placement="load_aware", expert_load_file=str(load_file),
                            expert_parallel_executor=executor, **ENGINE_ARGS)
    got = [o.token_ids for o in engine.generate_outputs(PROMPTS, GREEDY)]
    assert got == expected_tokens
    placements = pl.place_experts("load_aware", 8, len(window.load()), executor.world_size, window.load())
    contiguous = [pl.contiguous(8, executor.world_size)] * len(placements)
    assert max(window.imbalance(placements)) <= max(window.imbalance(contiguous)) + 1e-9


def generate_with_rebalance(engine, rebalance_at: int, expert_load=None) -> list[list[int]]:
    """Greedy tokens of PROMPTS, calling engine.rebalance() after step `rebalance_at` (mid-generation)."""
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    done, steps = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        steps += 1
        if steps == rebalance_at:
            assert engine.has_unfinished_requests()
            report = engine.rebalance(expert_load)
            assert max(report["after"]) < max(report["before"])
    return [done[i] for i in ids]


SKEWED_LOAD = [100.0, 60.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # experts 0 and 1 hot: they get copies


@pytest.mark.parametrize("family,overlap", [("qwen2_moe", False), ("qwen2_moe", True), ("mixtral", True)])
def test_rebalance_with_copies_mid_generation_gives_the_same_tokens(executor, checkpoints, single_process, family,
                                                                    overlap):
    expected_tokens, _, _ = single_process[family]
    engine = LightMoEEngine(checkpoints[family], expert_parallel_size=executor.world_size, num_redundant_experts=1,
                            enable_overlap=overlap, expert_parallel_executor=executor, **ENGINE_ARGS)
    num_moe = len(engine.model_config.moe_layers)
    got = generate_with_rebalance(engine, rebalance_at=5, expert_load=[SKEWED_LOAD] * num_moe)
    assert got == expected_tokens
    assert engine.stats["rebalances"] == 1
    for placement, block in zip(engine.expert_placements, engine.model.moe_blocks()):
        assert placement.has_replicas and len(placement.expert_ranks()[0]) > 1  # the hot expert has copies
        assert block.local_expert_ids == placement.local_experts[0]
        assert block.experts.w13.shape[0] == len(placement.local_experts[0])
    # copies hold the same weights as the expert's home had: compare with the one-process checkpoint
    rebuilt = LightMoEEngine(checkpoints[family], **ENGINE_ARGS)
    for block, full in zip(engine.model.moe_blocks(), rebuilt.model.moe_blocks()):
        assert torch.equal(block.experts.w13, full.experts.w13[list(block.local_expert_ids)])
        assert torch.equal(block.experts.w2, full.experts.w2[list(block.local_expert_ids)])


def test_automatic_rebalance_from_global_statistics(executor, checkpoints, single_process):
    """rebalance_interval: rank 0 re-places from the window by itself; the window is global (equal to the
    one-process engine's) and the tokens are unchanged."""
    expected_tokens, _, _ = single_process["olmoe"]
    one = LightMoEEngine(checkpoints["olmoe"], **ENGINE_ARGS)
    assert [o.token_ids for o in one.generate_outputs(PROMPTS, GREEDY)] == expected_tokens
    engine = LightMoEEngine(checkpoints["olmoe"], expert_parallel_size=executor.world_size, num_redundant_experts=1,
                            rebalance_interval=8, rebalance_threshold=1.0, expert_parallel_executor=executor,
                            **ENGINE_ARGS)
    got = [o.token_ids for o in engine.generate_outputs(PROMPTS, GREEDY)]
    assert got == expected_tokens
    assert engine.stats["steps"] == one.stats["steps"] and engine.stats["rebalances"] >= 1
    assert engine.expert_load_stats() == one.expert_load_stats()  # every rank's tokens, not a sample
    assert sum(engine.expert_load_stats()[0]) > 0
    assert all(r >= 1.0 for r in engine.expert_rank_balance())


def test_load_window_slides():
    window = ExpertLoadWindow(1, 4, window_steps=2)
    for step in ([1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 0]):
        window.record([torch.tensor(step, dtype=torch.int32)])
    assert window.load() == [[0.0, 2.0, 3.0, 0.0]]
    assert window.imbalance([pl.contiguous(4, 2)]) == [3.0 / 2.5]  # ranks hold 2 and 3 tokens


def test_one_process_per_engine_and_clear_config_errors(executor, checkpoints):
    with pytest.raises(ValueError, match="expert_placement"):
        LightMoEEngine(checkpoints["mixtral"], expert_parallel_size=2, expert_placement="random", **ENGINE_ARGS)
    with pytest.raises(ValueError, match="expert_load_file"):
        LightMoEEngine(checkpoints["mixtral"], expert_parallel_size=2, expert_placement="load_aware", **ENGINE_ARGS)
    with pytest.raises(ValueError, match="exceeds the model's 8 experts"):
        LightMoEEngine(checkpoints["mixtral"], expert_parallel_size=16, **ENGINE_ARGS)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="already initialised"):  # the executor fixture holds the group
        LightMoEEngine(checkpoints["mixtral"], expert_parallel_size=2, **ENGINE_ARGS)
    assert time.monotonic() - start < 5  # refused before any process was started


# ---- placement strategies (no processes) -----------------------------------------------------
def test_contiguous_and_round_robin_placements():
    c = pl.contiguous(10, 4)
    assert c.local_experts == ((0, 1), (2, 3, 4), (5, 6), (7, 8, 9))
    r = pl.round_robin(10, 4)
    assert r.local_experts == ((0, 4, 8), (1, 5, 9), (2, 6), (3, 7))
    for p in (c, r):
        local = p.expert_to_local()
        for rank, experts in enumerate(p.local_experts):
            assert [p.expert_to_rank[e] for e in experts] == [rank] * len(experts)
            assert [local[e] for e in experts] == list(range(len(experts)))


def test_load_aware_separates_hot_experts_and_keeps_counts_equal():
    load = [100, 90, 1, 1, 1, 1, 80, 70]
    p = pl.load_aware(load, 2)
    assert [len(x) for x in p.local_experts] == [4, 4]
    assert p.expert_to_rank[0] != p.expert_to_rank[1]
    totals = [sum(load[e] for e in x) for x in p.local_experts]
    assert max(totals) - min(totals) <= 20  # contiguous would give 192 vs 152
    with pytest.raises(ValueError, match="expected \\[2, 8\\]"):
        pl.place_experts("load_aware", 8, 2, 2, [load])


def test_copies_balance_skewed_load_that_no_placement_can():
    """Synthetic skew: one expert takes ~30% of the tokens, so no placement of single copies can get
    max/mean below ~1.2-2 on 4 ranks; copies of the hot experts in one extra slot per rank reach <= 1.1."""
    gen = torch.Generator().manual_seed(0)
    for num_experts, world, redundant in [(8, 2, 1), (8, 4, 1), (16, 4, 1), (64, 8, 1), (128, 8, 2)]:
        zipf = [1000.0 / (i + 1) ** 1.2 for i in range(num_experts)]
        load = [zipf[i] for i in torch.randperm(num_experts, generator=gen).tolist()]
        contiguous = pl.contiguous(num_experts, world).imbalance(load)
        load_aware = pl.load_aware(load, world).imbalance(load)
        p = pl.replicated(load, world, redundant)
        assert p.imbalance(load) <= 1.1, (num_experts, world, p.imbalance(load))
        assert load_aware > 1.1 and contiguous > 1.1
        assert [len(x) for x in p.local_experts] == [num_experts // world + redundant] * world
        assert all(len(set(r)) == len(r) for r in p.expert_ranks())  # never two copies on one rank
    p = pl.replicated([40, 20, 10, 10, 5, 5, 5, 5], 4, 1)
    assert pl.load_aware([40, 20, 10, 10, 5, 5, 5, 5], 4).imbalance([40, 20, 10, 10, 5, 5, 5, 5]) >= 1.6
    assert p.imbalance([40, 20, 10, 10, 5, 5, 5, 5]) == 1.0
    assert p.expert_ranks()[0] == (0, 1, 2, 3)


def test_tokens_of_a_copied_expert_split_evenly_over_its_copies():
    from light_moe.ops.backend import ReferenceOps
    from light_moe.parallel.dispatch import AllToAllDispatcher

    placement = pl.ExpertPlacement.from_local([[0, 1, 2], [0, 3, 4], [0, 5, 6], [0, 7]], 8)  # expert 0 x4
    topk_ids = torch.tensor([[0, e] for e in range(1, 8)] * 4, dtype=torch.int32)  # [28, 2]
    for rank in range(4):
        d = AllToAllDispatcher(placement, rank, None, ReferenceOps(), torch.device("cpu"))
        route = d.route(topk_ids)
        dest = torch.empty_like(route.order)
        dest[route.order] = torch.repeat_interleave(torch.arange(4), route.send_counts)
        to_expert_0 = dest.view(-1, 2)[:, 0]  # [T] rank serving each token's expert 0
        assert torch.bincount(to_expert_0, minlength=4).tolist() == [7, 7, 7, 7]
        assert to_expert_0[0] == rank  # the round robin starts at this rank: decode tokens spread
        local = placement.local_experts
        for row in range(route.order.numel()):
            r = int(torch.searchsorted(torch.cumsum(route.send_counts, 0), row, right=True))
            assert local[r][route.local_ids[row]] == topk_ids.view(-1)[route.order[row]]


# ---- failures: run in a child process so a hang would be caught by a hard timeout -------------
# ---- fixed-capacity exchange (no host sync, decode-sized steps) ----------------------------------
@pytest.mark.parametrize("family,overlap,mode", [("qwen2_moe", False, "sync"), ("mixtral", True, "sync"),
                                                 ("mixtral", False, "async_output_processing"),
                                                 ("qwen2_moe", False, "async_scheduling")])
def test_fixed_capacity_exchange_gives_the_same_tokens(executor, checkpoints, single_process, family, overlap, mode):
    """Capacity 8 rows (top-2): decode steps (<= 3 tokens per rank) take the fixed exchange, prefill chunks
    of more than 4 tokens on a rank the variable one; the tokens equal the one-process engine's. Also with
    async output processing (rank 0 makes a step's outputs while the ranks run the next one) and async
    scheduling (steps launched before the last one's tokens are read: rank 0 broadcasts them on the device
    and each rank fills its placeholder inputs from them)."""
    expected_tokens, _, _ = single_process[family]
    flags = {"async_scheduling": mode == "async_scheduling"}  # async scheduling is the default
    if mode == "async_output_processing":
        flags[mode] = True
    engine = LightMoEEngine(checkpoints[family], expert_parallel_size=executor.world_size, fixed_capacity_tokens=8,
                            enable_overlap=overlap, expert_parallel_executor=executor, **flags, **ENGINE_ARGS)
    got = [o.token_ids for o in engine.generate_outputs(PROMPTS, GREEDY)]
    assert got == expected_tokens
    for d in engine.workers.rank.dispatchers:  # every rank takes the mode of the plan: rank 0 stands for all
        assert d.exchanges["fixed"] > 0 and d.exchanges["variable"] > 0, d.exchanges
    assert engine.stats["steps"] > LOAD_SYNC_STEPS  # load statistics were reduced, fixed steps included
    assert (engine.stats["steps_ahead"] > 0) == (mode == "async_scheduling")
    assert all(r >= 1.0 for r in engine.expert_rank_balance())


def test_each_rank_holds_its_own_kv_partition_and_preempts_within_it(executor, checkpoints, single_process):
    """4 KV blocks per rank: the requests of a rank outgrow its partition and get preempted there (while
    other ranks may have room); the tokens still equal the one-process engine's."""
    from light_moe.engine.kv_cache import PartitionedBlockManager

    expected_tokens, _, _ = single_process["mixtral"]
    engine = LightMoEEngine(checkpoints["mixtral"], expert_parallel_size=executor.world_size, num_kv_blocks=4,
                            block_size=16, expert_parallel_executor=executor, **ENGINE_ARGS)
    bm = engine.block_manager
    assert isinstance(bm, PartitionedBlockManager) and bm.num_total_blocks == 4 * executor.world_size
    assert engine.runner.num_blocks == 4  # rank 0's cache holds its partition only
    got = [o.token_ids for o in engine.generate_outputs(PROMPTS, GREEDY)]
    assert got == expected_tokens
    if executor.world_size == 2:  # (with 4 ranks every request has a partition of its own)
        assert engine.stats["preemptions"] > 0
    assert bm.num_free_blocks == bm.num_total_blocks


def test_exchange_capacity_is_chosen_from_the_plan():
    from light_moe.executor.step_plan import exchange_capacity

    assert exchange_capacity([3, 2], top_k=2, limit=0) == 0  # disabled
    assert exchange_capacity([3, 2], top_k=2, limit=256) == 8  # power of two >= 6 rows
    assert exchange_capacity([0, 1], top_k=8, limit=256) == 8
    assert exchange_capacity([0, 0], top_k=8, limit=256) == 1  # all idle: still one exchange per layer
    assert exchange_capacity([32, 1], top_k=8, limit=256) == 256
    assert exchange_capacity([30, 1], top_k=8, limit=256) == 256  # 30 tokens pad to a graph batch of 32
    assert exchange_capacity([5, 1], top_k=3, limit=256) == 32  # 8 padded tokens x 3 = 24 rows -> 32
    assert exchange_capacity([15, 1], top_k=8, limit=250) == 128  # capped at the limit only when it must be
    assert exchange_capacity([16, 1], top_k=8, limit=100) == 0  # 128 rows above the limit: variable splits
    assert exchange_capacity([33, 1], top_k=8, limit=256) == 0  # prefill-sized: variable splits


FIXED_EXCHANGE_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from light_moe.ops.backend import ReferenceOps
    from light_moe.parallel import placement as pl
    from light_moe.parallel.dispatch import AllToAllDispatcher

    SYNC_OPS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")

    class NoHostSync:
        # raise on any Tensor method that reads a device value on the host (and on torch.bincount,
        # which syncs on CUDA), while active
        def __enter__(self):
            self.saved = {name: getattr(torch.Tensor, name) for name in SYNC_OPS}
            self.saved_bincount = torch.bincount
            def trap(name):
                def raiser(*args, **kwargs):
                    raise AssertionError(f"host sync in the fixed path: Tensor.{name}")
                return raiser
            for name in SYNC_OPS:
                setattr(torch.Tensor, name, trap(name))
            torch.bincount = trap("bincount")
        def __exit__(self, *exc):
            for name, fn in self.saved.items():
                setattr(torch.Tensor, name, fn)
            torch.bincount = self.saved_bincount

    def layer(d, ops, x, w, ids, w13, w2, fixed):
        d.capacity = fixed
        if fixed:
            with NoHostSync():
                routed = d.dispatch(x, w, ids)
            y = ops.experts(routed.x, routed.topk_weights, routed.topk_ids, w13, w2, padded=routed.padded)
            with NoHostSync():
                return d.combine(y, routed)
        routed = d.dispatch(x, w, ids)
        return d.combine(ops.experts(routed.x, routed.topk_weights, routed.topk_ids, w13, w2), routed)

    def main(rank, world, port):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        torch.manual_seed(0)  # the same weights on every rank: each takes its experts' rows
        num_experts, hidden, inter, top_k = 8, 24, 16, 2
        w13_all, w2_all = torch.randn(num_experts, 2 * inter, hidden), torch.randn(num_experts, hidden, inter)
        ops = ReferenceOps()
        placements = [pl.contiguous(num_experts, world), pl.round_robin(num_experts, world),
                      pl.ExpertPlacement.from_local([[0, 1, 2, 3, 4], [0, 5, 6, 7]], num_experts)]  # a copy of 0
        gen = torch.Generator().manual_seed(100 + rank)
        for placement in placements:
            d = AllToAllDispatcher(placement, rank, None, ops, torch.device("cpu"))
            local = list(placement.local_experts[rank])
            w13, w2 = w13_all[local], w2_all[local]
            # rank 1 idle in one case; a full capacity; every row to one expert (all to one rank)
            for tokens, capacity, skew in [(5, 16, False), (8, 16, False), (0 if rank else 3, 8, False),
                                           (4, 8, True)]:
                x = torch.randn(tokens, hidden, generator=gen)
                logits = torch.randn(tokens, num_experts, generator=gen)
                if skew:
                    logits[:, 5:] += 100.0  # experts 5..7 (rank 1's in contiguous) take every row
                w, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
                ids = ids.to(torch.int32)
                before = int(d.rows_received)  # a device counter updated in place: copy its value
                expected = layer(d, ops, x, w, ids, w13, w2, 0)
                rows_variable = int(d.rows_received) - before
                got = layer(d, ops, x, w, ids, w13, w2, capacity)
                assert torch.equal(got, expected), (rank, placement, tokens, (got - expected).abs().max())
                assert int(d.rows_received) - before == 2 * rows_variable  # padding rows are not counted
                # a dry run (graph warm-up) runs the same kernels, but no collective, and counts nothing
                d.capacity, d.dry_run = capacity, True
                real_all_to_all, dist.all_to_all_single = dist.all_to_all_single, None  # a call would raise
                try:
                    routed = d.dispatch(x, w, ids)
                    y = ops.experts(routed.x, routed.topk_weights, routed.topk_ids, w13, w2, padded=True)
                    dry = d.combine(y, routed)
                finally:
                    d.capacity, d.dry_run, dist.all_to_all_single = 0, False, real_all_to_all
                assert dry.shape == got.shape and int(d.rows_received) - before == 2 * rows_variable
        assert d.exchanges["fixed"] == d.exchanges["variable"] == 4
        dist.barrier()
        dist.destroy_process_group()
        if rank == 0:
            print("OK", flush=True)

    if __name__ == "__main__":
        from light_moe.parallel.groups import free_tcp_port
        mp.spawn(main, args=(2, free_tcp_port()), nprocs=2)
""")


def test_fixed_exchange_is_bit_identical_and_never_syncs_with_the_host(tmp_path):
    """Two gloo ranks, float32: the fixed-capacity exchange gives bit for bit the variable path's output
    (padding skipped, every expert's rows in the same order), for contiguous, round-robin and copied
    experts, an idle rank, a full capacity and all rows to one rank; its dispatch and combine call no
    host-sync op (trapped)."""
    assert "OK" in run_script(tmp_path, FIXED_EXCHANGE_SCRIPT, timeout_s=120)


# ---- launched by torchrun: every rank runs the script, rank 0 is the engine --------------------------
