"""Host cost of one engine step per phase, without the model: what rank 0 does while the GPUs idle.

An expert-parallel decode step on 4 GPUs was found host-bound (scripts/profile_ep_step.py): rank 0 does
the Python work of every rank's sequences. This script runs the real engine step on CPU with the model
replaced by a stub (the runner's input preparation still runs; logits are random), so each phase's host
time per step can be measured and improved on any machine:

    python scripts/profile_host_step.py --batch 16 64 256 --steps 50

Phases: schedule, prepare (the runner's input tensors), sample, update (scheduler bookkeeping), accept
(per-request stop checks), emit (detokenisation, stop-string hold-back, RequestOutput: the part that
async_output_processing moves behind the next step's kernels), plan (the expert-parallel step plan built
and pickled as rank 0 does it, for the same batch; not part of an EP=1 step).
"""
from __future__ import annotations

import argparse
import cProfile
import pickle
import pstats
import time
from collections import defaultdict

import torch

from light_moe import LightMoEEngine, SamplingParams
from light_moe.assets import DEMO_MODEL_DIR
from light_moe.engine import engine as engine_module
from light_moe.engine.inflight import InflightStep
from light_moe.engine.request_state import RequestState
from light_moe.executor.step_plan import PlannedSequence, StepPlan


def _timed(owner, name: str, spent: dict, label: str) -> None:
    """Replace owner.name by a wrapper adding its wall time to spent[label]."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - begin

    setattr(owner, name, wrapper)


def _plan(scheduled, world: int = 4) -> bytes:
    """The StepPlan rank 0 would broadcast for these sequences (owners round-robin), pickled."""
    sequences = []
    for i, s in enumerate(scheduled):
        req = s.request
        start = req.num_computed_tokens
        sequences.append(PlannedSequence(i % world, start, req.tokens(start, start + s.num_new_tokens),
                                         list(req.block_table), s.is_prefill, s.samples))
    return pickle.dumps(StepPlan(sequences), protocol=pickle.HIGHEST_PROTOCOL)


def measure(batch: int, steps: int, input_len: int, model: str, profiler=None) -> dict:
    engine = LightMoEEngine(model, device="cpu", dtype="float32", show_progress=False, max_num_seqs=batch,
                            max_num_batched_tokens=max(8192, batch * input_len))
    runner, vocab = engine.runner, engine.model_config.vocab_size
    spent: dict[str, float] = defaultdict(float)
    plan_bytes = []
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(1))  # made once: not host work

    def stub_execute(scheduled, graph_tag=None, allow_graph=True, prev_tokens=None):
        runner.prepare(scheduled, prev_tokens)  # a real step's host part: ids, positions, tables
        begin = time.perf_counter()
        plan_bytes.append(len(_plan(scheduled)))
        spent["plan"] += time.perf_counter() - begin
        return logits[:sum(s.samples for s in scheduled)]

    runner.execute = stub_execute
    _timed(engine.scheduler, "schedule", spent, "schedule")
    _timed(runner, "prepare", spent, "prepare")
    _timed(engine_module, "sample_on_device", spent, "sample")  # the draw queued, then read back
    _timed(InflightStep, "read", spent, "sample")
    _timed(engine.scheduler, "update_from_output", spent, "update")
    _timed(RequestState, "accept", spent, "accept")
    _timed(RequestState, "emit", spent, "emit")
    try:
        gen = torch.Generator().manual_seed(0)
        params = SamplingParams(max_tokens=steps + 20, temperature=0.0, ignore_eos=True)
        for _ in range(batch):
            engine.add_request(torch.randint(0, vocab, (input_len,), generator=gen).tolist(), params)
        for _ in range(5):  # prefill and a few decode steps
            engine.step()
        spent.clear()
        plan_bytes.clear()
        if profiler is not None:
            profiler.enable()
        begin = time.perf_counter()
        for _ in range(steps):
            engine.step()
        total = time.perf_counter() - begin
        if profiler is not None:
            profiler.disable()
    finally:
        _untime(RequestState, "accept")
        _untime(RequestState, "emit")
        _untime(engine_module, "sample_on_device")
        _untime(InflightStep, "read")
        engine.shutdown()
    row = {phase: 1e3 * t / steps for phase, t in spent.items()}
    row.update(batch=batch, step_ms=1e3 * (total - spent["plan"]) / steps, plan_kib=plan_bytes[-1] / 1024)
    return row


def _untime(owner, name: str) -> None:
    """Undo _timed on a class or module attribute (instance attributes go with their engine)."""
    wrapper = getattr(owner, name)
    original = wrapper.__closure__[next(i for i, c in enumerate(wrapper.__code__.co_freevars) if c == "original")]
    setattr(owner, name, original.cell_contents)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--model", default=str(DEMO_MODEL_DIR))
    p.add_argument("--cprofile", type=int, default=0, help="also list the N functions with the most own time "
                   "over the measured steps of the largest batch (the timings of that batch then carry its overhead)")
    args = p.parse_args()
    profiler = cProfile.Profile() if args.cprofile else None
    rows = [measure(b, args.steps, args.input_len, args.model, profiler if b == max(args.batch) else None)
            for b in args.batch]
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)
    phases = ["schedule", "prepare", "sample", "update", "accept", "emit", "plan"]
    print("host ms per decode step (model stubbed out; plan: EP rank 0's step plan, pickled, not in step ms)")
    print(f"{'batch':>6} {'step':>7} " + " ".join(f"{p:>9}" for p in phases) + f" {'plan KiB':>9}")
    for r in rows:
        print(f"{r['batch']:>6} {r['step_ms']:>7.3f} " + " ".join(f"{r.get(p, 0.0):>9.3f}" for p in phases)
              + f" {r['plan_kib']:>9.1f}")


if __name__ == "__main__":
    main()
