"""Expert parallelism on 2 and 4 GPUs (NCCL): float32 tokens equal one GPU's (reference backend); bf16 with
the CuTe backend and decode CUDA graphs agrees with one GPU (near-ties excepted), through a rebalance and
with idle ranks. Marked gpu and multigpu; each case skips without enough GPUs."""
import textwrap

import pytest

from tests.ep_helpers import needs_gpus, run_script
from tests.tiny_models import FAMILIES, make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {f: make_tiny_checkpoint(f, tmp_path_factory.mktemp(f)) for f in FAMILIES}


GPU_SCRIPT = textwrap.dedent("""
    import sys
    from light_moe import LightMoEEngine, SamplingParams

    prompts = [[7, 3, 99], list(range(20, 31)), list(range(200, 247)), [42] * 9]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    # a fixed KV budget: the first engine's memory is still cached by this process when the second
    # one sizes its cache from gpu_memory_utilization
    args = dict(dtype="float32", device="cuda", moe_backend=sys.argv[2], max_num_batched_tokens=16,
                show_progress=False, kv_cache_memory_bytes=64 << 20)
    if __name__ == "__main__":
        one = LightMoEEngine(sys.argv[1], **args)
        expected = [o.token_ids for o in one.generate_outputs(prompts, params)]
        del one
        for strategy in ("contiguous", "round_robin"):
            engine = LightMoEEngine(sys.argv[1], expert_parallel_size=int(sys.argv[3]), expert_placement=strategy,
                                    **args)
            got = [o.token_ids for o in engine.generate_outputs(prompts, params)]
            engine.shutdown()
            assert got == expected, (strategy, got, expected)
        print("OK")
""")


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("gpus", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)  # one case each: ~2 min per family on 4 GPUs, so they run in parallel
@pytest.mark.parametrize("backend", ["reference"])  # CuTe under NCCL: the bf16 decode-graph test below
def test_gpus_over_nccl_give_the_same_greedy_tokens(checkpoints, tmp_path, backend, family, gpus):
    needs_gpus(gpus)
    run_script(tmp_path, GPU_SCRIPT, str(checkpoints[family]), backend, str(gpus), timeout_s=300)


GPU_GRAPH_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from light_moe import LightMoEEngine, SamplingParams
    from light_moe.engine.request import Request
    from light_moe.engine.scheduler import ScheduledRequest

    prompts = [[7, 3, 99], list(range(20, 31)), list(range(100, 157)), list(range(200, 240)), [42] * 9]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    args = dict(dtype="bfloat16", device="cuda", moe_backend="cute", max_num_batched_tokens=64,
                show_progress=False, kv_cache_memory_bytes=64 << 20)

    def prefill_logits(engine, ids):
        request = Request("probe", ids, SamplingParams())
        assert engine.block_manager.allocate_slots(request, len(ids))
        try:
            run = engine.runner if engine.workers is None else engine.workers
            return run.execute([ScheduledRequest(request, len(ids), True, True)])[-1].float()
        finally:
            engine.block_manager.free(request)

    def agree(one, ep, prompt, a, b):
        # bf16: a divergence is accepted only at a near-tie (margin within the two paths' logit difference)
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                la, lb = prefill_logits(one, prompt + a[:i]), prefill_logits(ep, prompt + a[:i])
                noise, margin = (la - lb).abs().max().item(), abs((lb[y] - lb[x]).item())
                assert margin <= 2 * noise, (i, x, y, margin, noise)
                return False
        assert len(a) == len(b)
        return True

    if __name__ == "__main__":
        import faulthandler
        faulthandler.dump_traceback_later(420, exit=True)  # a stuck collective: show where, then fail
        one = LightMoEEngine(sys.argv[1], **args)  # one GPU, decode graphs
        # argv[3]: "sync", or the EP engine with async_output_processing / async_scheduling (one GPU: sync)
        ep = LightMoEEngine(sys.argv[1], expert_parallel_size=int(sys.argv[2]), fixed_capacity_tokens=64,
                            **{"async_scheduling": sys.argv[3] == "async_scheduling",
                               **({} if sys.argv[3] == "sync" else {sys.argv[3]: True})},
                            collective_timeout_s=120, num_redundant_experts=1, **args)
        assert one.runner.decode_graphs is not None and ep.runner.decode_graphs is not None
        expected = [o.token_ids for o in one.generate_outputs(prompts, params)]
        got = [o.token_ids for o in ep.generate_outputs(prompts, params)]
        print("generated", flush=True)
        assert ep.runner.decode_graphs.graphs, "EP decode never replayed a graph"
        same = [agree(one, ep, p, a, b) for p, a, b in zip(prompts, expected, got)]
        again = [o.token_ids for o in ep.generate_outputs(prompts[:3], params)]  # other buckets, graphs reused
        for p, a, b in zip(prompts, expected, again):
            agree(one, ep, p, a, b)
        assert all(r >= 1.0 for r in ep.expert_rank_balance())
        # a rebalance (copies of hot experts) moves weights: the graphs must be captured again from them
        print("second batch agrees", flush=True)
        assert ep.rebalance(), "no load recorded to rebalance from"
        print("rebalanced", flush=True)
        placed = [o.token_ids for o in ep.generate_outputs(prompts, params)]
        for p, a, b in zip(prompts, expected, placed):
            agree(one, ep, p, a, b)
        print("rebalanced generation agrees", flush=True)
        # rank 0's short request ends first: rank 0 then idles, replaying its idle-exchange graph
        short, long = SamplingParams(max_tokens=4, temperature=0.0), SamplingParams(max_tokens=20, temperature=0.0)
        ids = [ep.add_request(prompts[0], short), ep.add_request(prompts[1], long)]
        final = {}
        while ep.has_unfinished_requests():
            final.update({o.request_id: o.token_ids for o in ep.step() if o.finished})
        assert any(k[0] == "callable" for k in ep.runner.decode_graphs.graphs), "rank 0 never idled in a graph"
        agree(one, ep, prompts[0], expected[0][:4], final[ids[0]])
        agree(one, ep, prompts[1], expected[1][:20], final[ids[1]])
        graphs = sorted(map(str, ep.runner.decode_graphs.graphs))
        print(f"identical sequences: {sum(same)}/{len(same)}; graphs: {graphs}")
        ep.shutdown()
        print("OK")
""")


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("gpus,mode", [(2, "sync"), (4, "sync"), (2, "async_output_processing"),
                                       (2, "async_scheduling")])
def test_gpus_decode_cuda_graphs_with_the_fixed_exchange(tmp_path, gpus, mode):
    """EP=2 and 4 on the CuTe backend, bf16: decode replays CUDA graphs holding the fixed-capacity
    all-to-alls, and agrees with one GPU (near-ties excepted); a second generation reuses the graphs; a
    rebalance recaptures them; idle ranks replay their exchange-only graph. Also with the EP engine's
    async output processing or async scheduling (placeholder inputs filled on the device in the graphs'
    input buffers, sampled tokens broadcast by rank 0)."""
    needs_gpus(gpus)
    path = make_tiny_checkpoint("mixtral", tmp_path / "ckpt", hidden_size=128, intermediate_size=128)
    print(run_script(tmp_path, GPU_GRAPH_SCRIPT, str(path), str(gpus), mode, timeout_s=600))


