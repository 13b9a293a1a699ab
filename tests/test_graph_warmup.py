"""CPU checks of the graph warm-up (EngineArgs.warmup_graphs; executor/cuda_graphs.py DecodeGraphs.warm_up,
executor/prefill_graphs.py PrefillGraphs.warm_up, ModelRunner.warm_up): which graphs are captured at start, that
the static decode inputs are reset to padding first, that nothing is captured twice, and that an engine without
graphs (the CPU) starts with the option on and generates as without it. Capturing itself needs CUDA: the GPU test
is tests/test_cute_engine_gpu.py::test_warmup_graphs_capture_at_start."""
import logging

import torch

from light_moe import LightMoEEngine, SamplingParams
from light_moe.assets import DEMO_MODEL_DIR
from light_moe.executor.cuda_graphs import DecodeGraphs
from light_moe.executor.model_runner import ModelRunner
from light_moe.executor.prefill_graphs import PrefillGraphs


def _decode_graphs(batch_buckets, max_blocks, block_size=16, scratch_slot=999):
    g = DecodeGraphs.__new__(DecodeGraphs)  # no CUDA: the buffers on the CPU, _capture recorded
    n = batch_buckets[-1]
    g.batch_buckets, g.max_batch, g.max_blocks, g.block_size, g.scratch_slot = batch_buckets, n, max_blocks, \
        block_size, scratch_slot
    g.input_ids = torch.full((n,), 5, dtype=torch.long)
    g.positions = torch.full((n,), 7, dtype=torch.long)
    g.query_pos = torch.full((n, 1), 7, dtype=torch.long)
    g.slots = torch.full((n,), 3, dtype=torch.long)
    g.ctx_lens = torch.full((n,), 40, dtype=torch.int32)
    g.tables, g.graphs = {}, {}
    seen = []

    def capture(fn, what):
        seen.append((what, g.ctx_lens.clone(), g.slots.clone(), g.input_ids.clone()))
        return "graph", None

    g._capture = capture
    return g, seen


def test_decode_warm_up_captures_every_batch_bucket_once_from_padding():
    g, seen = _decode_graphs((1, 2, 4, 8), max_blocks=64)
    assert g.warm_up(blocks=5) == 4  # 5 blocks -> the 8-block context bucket
    assert sorted(g.graphs) == [(b, 8, None) for b in (1, 2, 4, 8)]
    for _, ctx, slots, ids in seen:  # captured from padding: context 1, the scratch slot, token 0
        assert (ctx == 1).all() and (slots == 999).all() and (ids == 0).all()
    assert (g.tables[8] == 0).all() and g.tables[8].shape == (8, 8)
    assert g.warm_up(blocks=8) == 0 and len(seen) == 4  # nothing twice
    assert g.warm_up(blocks=10_000) == 4 and (1, 64, None) in g.graphs  # capped at the longest table


def test_prefill_warm_up_captures_the_missing_buckets():
    g = PrefillGraphs.__new__(PrefillGraphs)
    g.buckets, g.captured = (16, 32, 64), {32: "already"}
    g._capture = lambda tokens: (f"bucket {tokens}", torch.is_inference_mode_enabled())
    assert g.warm_up() == 2
    # in inference mode as run() captures: the MoE blocks' count buffers, made by the first (inference-mode)
    # forward, are updated in place (outside it the Mixtral-shape server died at start on the H100)
    assert g.captured == {16: ("bucket 16", True), 32: "already", 64: ("bucket 64", True)}
    assert g.warm_up() == 0


def test_runner_warm_up_sizes_the_decode_context_from_the_token_budget():
    calls = []

    class Fake:
        def __init__(self, n):
            self.n = n

        def warm_up(self, *args):
            calls.append(args)
            return self.n

    runner = ModelRunner.__new__(ModelRunner)
    runner.block_size, runner.max_num_batched_tokens = 16, 2000
    runner.prefill_graphs, runner.decode_graphs = Fake(13), Fake(9)
    assert runner.warm_up() == (13, 9) and calls == [(), (125,)]  # ceil(2000 / 16) blocks
    runner.prefill_graphs = runner.decode_graphs = None
    assert runner.warm_up() == (0, 0)


def test_engine_with_warmup_on_the_cpu_generates_as_without(caplog):
    params = SamplingParams(max_tokens=8, temperature=0.0)
    common = dict(device="cpu", dtype="float32", show_progress=False)
    with caplog.at_level(logging.INFO, logger="light_moe.engine.engine"):
        warm = LightMoEEngine(DEMO_MODEL_DIR, warmup_graphs=True, **common)
    assert "warmup: captured 0 prefill buckets and 0 decode graphs" in caplog.text
    cold = LightMoEEngine(DEMO_MODEL_DIR, **common)
    assert warm.config.warmup_graphs and not cold.config.warmup_graphs
    assert warm.generate("The capital of", params) == cold.generate("The capital of", params)
