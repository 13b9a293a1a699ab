"""`light-moe bench profile-step`: where the time of a decode step (and optionally of one prefill) goes.

Builds the engine like bench e2e (--shape mixtral --layers N, a checkpoint, or the bundled demo model),
runs one untimed batch over the same steps (kernel compilation, CUDA-graph capture for every batch and
context bucket met later), then starts a batch of --batch-size prompts, decodes --warmup-steps steps,
times --steps steps without the profiler (the step's wall time) and profiles --steps more with
torch.profiler. Kernels are grouped by classify_kernel (MoE, with its router / routing / grouped GEMM /
W4A16 / combine parts; attention; GEMM; elementwise; communication) and reported per step: kernel count
and GPU time per group, the sum of kernel times, the time the GPU was busy (the union of the kernels'
intervals) and the gap between the step's wall time and that busy time: host work and launch latency
that the GPU waits for.

CUDA graphs: the profiler (CUPTI) records the kernels of a graph replay like launched ones, under the
replay's cudaGraphLaunch; the report counts those launches per step. If a run reports graph launches but
no kernels, profile with --eager (the same step without graphs) and read its gap with that in mind.
Without a GPU the profiler records CPU activity only: the groups are then those of the top-level ATen ops
(aten::linear is GEMM, aten::scaled_dot_product_attention attention, ...) and their CPU time.
docs/performance.md says how to read the table.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from light_moe.bench.e2e import bench_model, first_token_seconds
from light_moe.bench.env import environment, write_result
from light_moe.bench.idle_gaps import host_spans, idle_report, phase_annotations
from light_moe.bench.shapes import SHAPES, shape_label

GROUPS = ("moe", "attention", "gemm", "elementwise", "communication")
MOE_PARTS = ("router", "routing", "grouped_gemm", "w4a16", "combine", "other")

# our CuTe DSL kernels are named kernel_cutlass_<method>_<module path><Class>_object_at_<args>
# (light_moe/kernels/*.py): the module and class name say which MoE stage a kernel is
_CUTE_PREFIX = "kernel_cutlass_"
_CUTE_MOE_PARTS = (("w4a16", "w4a16"), ("routerkernel", "router"), ("kernelsrouter", "router"),
                   ("routingkernel", "routing"), ("kernelsrouting", "routing"), ("groupedgemm", "grouped_gemm"),
                   ("grouped_gemm", "grouped_gemm"), ("combine", "combine"), ("expert", "other"))
_ATTENTION = ("attention", "attn", "flash", "fmha", "sdpa", "mha_")
_GEMM = ("gemm", "gemv", "nvjet", "splitkreduce", "xmma", "cublas", "cutlass")
WINDOW_SLACK_US = 1e6  # a kernel may end this long after the last host event of the profile and still count
_CPU_GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                 "aten::mv", "aten::addmv", "aten::dot", "aten::einsum"}


def classify_kernel(name: str) -> tuple[str, str | None]:
    """(group, MoE part) of a GPU kernel's name, or of a CPU op's (aten::...) when profiling on a CPU.
    The part is one of MOE_PARTS for the group "moe", else None. Elementwise is everything unmatched:
    norms, rotary, copies, index ops, fills, casts, memcpy / memset."""
    n = name.lower()
    if "nccl" in n:
        return "communication", None
    if n.startswith(_CUTE_PREFIX):
        if "skinny" in n:  # kernels/skinny_gemm.py: the decode projections (dense GEMMs, not MoE)
            return "gemm", None
        if any(key in n for key in _ATTENTION):  # first: the decode attention's split merge is a "combine_kernel"
            return "attention", None
        for key, part in _CUTE_MOE_PARTS:
            if key in n:
                return "moe", part
        return "elementwise", None  # our other kernels: fused norms, rotary, ...
    if any(key in n for key in _ATTENTION):
        return "attention", None
    if ("grouped" in n and ("gemm" in n or "mm" in n)) or "groupproblemshape" in n:
        return "moe", "grouped_gemm"  # torch._grouped_mm (CUTLASS grouped GEMM): only the experts run one
    if n in _CPU_GEMM_OPS or any(key in n for key in _GEMM):
        return "gemm", None
    return "elementwise", None


@dataclass(frozen=True)
class KernelRecord:
    name: str
    start_us: float
    duration_us: float


def busy_us(records: list[KernelRecord]) -> float:
    """Time covered by at least one record (kernels that overlap, e.g. under programmatic dependent
    launch, count once)."""
    total, end = 0.0, float("-inf")
    for r in sorted(records, key=lambda r: r.start_us):
        stop = r.start_us + r.duration_us
        if stop > end:
            total += stop - max(r.start_us, end)
            end = stop
    return total


def summarize(records: list[KernelRecord], steps: int, wall_us: float, top: int = 15) -> dict:
    """Per step (the records of `steps` steps, `wall_us` of wall time per step): kernel count and time per
    group and per MoE part, their sums, the busy time, the gap, and the `top` kernels by time."""
    groups = {g: dict(count_per_step=0.0, us_per_step=0.0) for g in GROUPS}
    parts = {p: dict(count_per_step=0.0, us_per_step=0.0) for p in MOE_PARTS}
    by_name: dict[str, list[float]] = {}
    for r in records:
        group, part = classify_kernel(r.name)
        for entry in (groups[group],) + ((parts[part],) if part is not None else ()):
            entry["count_per_step"] += 1 / steps
            entry["us_per_step"] += r.duration_us / steps
        by_name.setdefault(r.name, []).append(r.duration_us)
    kernel_us = sum(g["us_per_step"] for g in groups.values())
    for entry in list(groups.values()) + list(parts.values()):
        entry["share"] = entry["us_per_step"] / kernel_us if kernel_us else 0.0
    busy = busy_us(records) / steps
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return dict(steps=steps, kernels_per_step=len(records) / steps, kernel_us_per_step=kernel_us,
                busy_us_per_step=busy, wall_us_per_step=wall_us, gap_us_per_step=wall_us - busy,
                groups=groups, moe_parts=parts,
                top=[dict(name=name, group=classify_kernel(name)[0], part=classify_kernel(name)[1],
                          calls_per_step=len(d) / steps, us_per_step=sum(d) / steps,
                          median_us=statistics.median(d)) for name, d in ranked])


def kernel_records(prof, on_gpu: bool) -> tuple[list[KernelRecord], int]:
    """(records, records dropped). On a GPU the device events (kernels, memcpy, memset) that lie within the
    profiled host activity: CUPTI can hand back a kernel record on another clock, far outside the window
    (pytorch/pytorch#192021), which would swamp the busy time. Without a GPU the top-level ATen ops (an
    op's children are part of its time)."""
    from torch.autograd import DeviceType

    events = [e for e in prof.events()
              if not getattr(e, "is_user_annotation", False) and not e.name.startswith("ProfilerStep")]
    if not on_gpu:
        return [KernelRecord(e.name, e.time_range.start, e.time_range.end - e.time_range.start) for e in events
                if e.device_type == DeviceType.CPU and not e.is_async and e.name.startswith("aten::")
                and not _has_aten_parent(e)], 0
    host = [e.time_range for e in events if e.device_type == DeviceType.CPU]
    first = min((r.start for r in host), default=float("-inf")) - WINDOW_SLACK_US
    last = max((r.end for r in host), default=float("inf")) + WINDOW_SLACK_US
    device = [KernelRecord(e.name, e.time_range.start, e.time_range.end - e.time_range.start) for e in events
              if e.device_type == DeviceType.CUDA]
    kept = [r for r in device if r.duration_us >= 0 and first <= r.start_us and r.start_us + r.duration_us <= last]
    return kept, len(device) - len(kept)


def _has_aten_parent(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def graph_launches(prof) -> int:
    """CUDA-graph replays launched by the host (the runtime or driver API call)."""
    return sum(1 for e in prof.events() if e.name.startswith(("cudaGraphLaunch", "cuGraphLaunch")))


def _profiler(on_gpu: bool):
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else []))


def _prompts(gen, vocab: int, count: int, length: int) -> list[list[int]]:
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def _export(prof, trace: str | None) -> None:
    if trace:
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(trace)


def _drain(engine, ids) -> None:
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished_requests():
        engine.step()


def profile_decode(engine, batch: int, input_len: int, warmup_steps: int, steps: int, sync, on_gpu: bool,
                   trace: str | None = None, top: int = 15, seed: int = 0) -> dict:
    """Decode steps of `batch` sequences after an untimed batch over the same steps (compilation, graph
    capture): `steps` timed without the profiler, then `steps` profiled (see the module docstring)."""
    from light_moe import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=warmup_steps + 2 * steps + 2, temperature=0.0, ignore_eos=True)
    engine.generate_outputs(_prompts(gen, vocab, batch, input_len), params)
    ids = {engine.add_request(p, params) for p in _prompts(gen, vocab, batch, input_len)}
    first: set[str] = set()
    while len(first) < batch:
        if not engine.has_unfinished_requests():
            raise RuntimeError("the batch finished before every request had its first token")
        first.update(o.request_id for o in engine.step() if o.request_id in ids)
    for _ in range(warmup_steps):
        engine.step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    wall_us = 1e6 * (time.perf_counter() - start) / steps
    prof = _profiler(on_gpu)
    with prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        profiled_us = 1e6 * (time.perf_counter() - start) / steps
    _drain(engine, ids)
    _export(prof, trace)
    # the gap: on a GPU, the unprofiled wall time against the kernels' busy time (kernel durations barely
    # change under the profiler, host time does); on a CPU the ops are host time, so the profiled wall
    records, dropped = kernel_records(prof, on_gpu)
    summary = summarize(records, steps, wall_us if on_gpu else profiled_us, top)
    summary.update(wall_us_per_step_unprofiled=wall_us, records_dropped=dropped)
    context = input_len + 1 + warmup_steps + steps  # tokens cached before the first profiled step, about
    summary.update(batch=batch, input_len=input_len, context_first=context, context_last=context + steps - 1,
                   wall_us_per_step_profiled=profiled_us, graph_launches_per_step=graph_launches(prof) / steps)
    return summary


def profile_prefill(engine, input_len: int, sync, on_gpu: bool, trace: str | None = None, top: int = 15,
                    seed: int = 1) -> dict:
    """One prompt of input_len alone (max_tokens=1), from add_request to its token on the host: after an
    untimed prompt, one timed without the profiler (the wall time), one profiled; figures are per prompt
    (all of its engine steps together)."""
    from light_moe import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.generate_outputs(_prompts(gen, vocab, 1, input_len), params)
    wall_s, _ = first_token_seconds(engine, _prompts(gen, vocab, 1, input_len)[0], params, sync)
    prof = _profiler(on_gpu)
    with prof, phase_annotations(engine):
        profiled_s, calls = first_token_seconds(engine, _prompts(gen, vocab, 1, input_len)[0], params, sync)
    wall_us, profiled_us = 1e6 * wall_s, 1e6 * profiled_s
    _export(prof, trace)
    records, dropped = kernel_records(prof, on_gpu)
    summary = summarize(records, 1, wall_us if on_gpu else profiled_us, top)
    summary.update(wall_us_per_step_unprofiled=wall_us, records_dropped=dropped)
    if on_gpu:  # the gap split into the GPU's idle intervals, with what the host did in each (under the profiler)
        summary.update(idle=idle_report(records, host_spans(prof)))
    summary.update(input_len=input_len, engine_step_calls=calls, wall_us_per_step_profiled=profiled_us)
    return summary


def add_profile_step_args(p: argparse.ArgumentParser) -> None:
    """The flags after the engine's (cli_args.add_bench_engine_args; --eager is --enforce-eager)."""
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="ignore --model: a released model's shape with random weights (bench/shapes.py)")
    p.add_argument("--layers", type=int, default=4, help="layers of the --shape model")
    p.add_argument("--batch-size", type=int, default=16, help="sequences in each profiled decode step")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (decode context; the prefill)")
    p.add_argument("--steps", type=int, default=8, help="decode steps timed, then as many profiled")
    p.add_argument("--warmup-steps", type=int, default=4, help="decode steps before the timed ones")
    p.add_argument("--prefill", action="store_true", help="also profile one prompt of --input-len alone")
    p.add_argument("--top", type=int, default=15, help="kernels listed by time")
    p.add_argument("--trace", default=None,
                   help="write the decode profile as a chrome trace here (the prefill's beside it, .prefill added)")
    p.add_argument("--output", default=None, help="write the JSON summary here")


def _prefill_trace(trace: str | None) -> str | None:
    if not trace:
        return None
    path = Path(trace)
    return str(path.with_name(path.stem + ".prefill" + path.suffix))


def main(args) -> dict:
    from light_moe import LightMoEEngine
    from light_moe.cli_args import async_kwargs
    from light_moe.engine.args import EngineArgs

    if args.expert_parallel_size > 1:
        raise ValueError("profile-step profiles one process; for expert parallelism use scripts/profile_ep_step.py")
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be >= 1, got {args.steps} and {args.batch_size}")
    model_path, load_format, tmp = bench_model(args)
    max_len = args.max_model_len or args.input_len + args.warmup_steps + 2 * args.steps + 16
    try:
        engine = LightMoEEngine.from_engine_args(EngineArgs.from_cli_args(
            args, model=model_path, load_format=load_format, max_model_len=max_len, max_num_seqs=args.batch_size))
        on_gpu = engine.config.device.type == "cuda"
        sync = (lambda: torch.cuda.synchronize(engine.config.device)) if on_gpu else (lambda: None)
        graphs = getattr(engine.runner, "decode_graphs", None) is not None
        decode = profile_decode(engine, args.batch_size, args.input_len, args.warmup_steps, args.steps, sync,
                                on_gpu, args.trace, args.top)
        prefill = (profile_prefill(engine, args.input_len, sync, on_gpu, _prefill_trace(args.trace), args.top)
                   if args.prefill else None)
        engine.shutdown()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    notes = _notes(on_gpu, graphs, args.enforce_eager, decode, prefill)
    result = dict(benchmark="profile-step", env=environment(), model=str(model_path) if tmp is None else
                  shape_label(args.shape, args.layers), dtype=str(engine.config.dtype),
                  moe_backend=engine.ops.name, quantization=None if engine.config.quantization is None
                  else engine.config.quantization.name, activity="cuda" if on_gpu else "cpu",
                  cuda_graphs=graphs, eager=args.enforce_eager, decode=decode, prefill=prefill, notes=notes,
                  **async_kwargs(args))
    print_report(result)
    if args.output:
        write_result(result, args.output)
    return result


def _notes(on_gpu: bool, graphs: bool, eager: bool, decode: dict, prefill: dict | None) -> list[str]:
    if not on_gpu:
        return ["no GPU: the groups are the top-level ATen ops of the step and their CPU time; wall and gap are "
                "under the profiler (the gap is host time outside ATen ops)"]
    notes = []
    dropped = decode["records_dropped"] + (prefill["records_dropped"] if prefill else 0)
    if dropped:
        notes.append(f"{dropped} device records outside the profiled window were dropped (CUPTI timestamps on "
                     "another clock, pytorch/pytorch#192021)")
    if eager or not graphs:
        why = "--eager" if eager else "the MoE backend is not graph-safe"
        notes.append(f"CUDA graphs off ({why}): every kernel is launched by the host")
    elif decode["graph_launches_per_step"] == 0:
        notes.append("CUDA graphs captured but no profiled decode step replayed one (a batch or context beyond the "
                     "captured buckets?)")
    elif decode["kernels_per_step"] == 0:
        notes.append("the profiler recorded the graph replays but none of their kernels: rerun with --eager to see "
                     "the kernels (of the same step launched without graphs)")
    else:
        notes.append("CUDA graphs on: the decode kernels listed ran inside graph replays (the profiler reports "
                     "them one by one)")
    return notes


def _print_groups(title: str, s: dict, unit: str) -> None:
    print(f"\n{title}")
    print(f"{'group':<16} {unit + 's/step':>13} {'us/step':>10} {'share':>7}")
    for group in GROUPS:
        g = s["groups"][group]
        if group == "communication" and g["count_per_step"] == 0:
            continue
        print(f"{group:<16} {g['count_per_step']:>13.1f} {g['us_per_step']:>10.1f} {100 * g['share']:>6.1f}%")
        if group == "moe":
            for part in MOE_PARTS:
                p = s["moe_parts"][part]
                if p["count_per_step"]:
                    print(f"  {part:<14} {p['count_per_step']:>13.1f} {p['us_per_step']:>10.1f} "
                          f"{100 * p['share']:>6.1f}%")
    print(f"{'all ' + unit + 's':<16} {s['kernels_per_step']:>13.1f} {s['kernel_us_per_step']:>10.1f}")
    print(f"wall {s['wall_us_per_step']:.1f} us/step; {unit}s busy {s['busy_us_per_step']:.1f} us; "
          f"gap (wall - busy: host and launch time the {unit}s wait for) {s['gap_us_per_step']:.1f} us")
    print(f"top {unit}s:  us/step  calls/step  group")
    for k in s["top"]:
        name = k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "..."
        group = k["group"] + (f"/{k['part']}" if k["part"] else "")
        print(f"  {k['us_per_step']:>9.1f} {k['calls_per_step']:>10.1f}  {group:<20} {name}")


def _print_idle(idle: dict) -> None:
    print(f"GPU idle under the profiler: {idle['idle_us']:.1f} us in {idle['intervals']} intervals of "
          f">= {idle['min_us']:.0f} us; the longest, with the host's spans inside them:")
    for gap in idle["longest"]:
        host = ", ".join(f"{h['name']} {h['us']:.0f}" for h in gap["host"]) or "-"
        after = (gap["after"] or "-")[:60]
        print(f"  +{gap['offset_us']:>8.1f} us  idle {gap['idle_us']:>7.1f} us  before {after}: {host}")


def print_report(result: dict) -> None:
    unit = "kernel" if result["activity"] == "cuda" else "op"
    d = result["decode"]
    _print_groups(f"decode step: batch {d['batch']}, context {d['context_first']}..{d['context_last']}, "
                  f"{d['steps']} steps profiled ({d['graph_launches_per_step']:.1f} CUDA-graph launches per step; "
                  f"wall {d['wall_us_per_step_unprofiled']:.1f} us/step unprofiled, "
                  f"{d['wall_us_per_step_profiled']:.1f} profiled)", d, unit)
    if result["prefill"] is not None:
        p = result["prefill"]
        _print_groups(f"prefill: one prompt of {p['input_len']} tokens alone, add_request to first token "
                      f"({p['engine_step_calls']} engine.step calls; figures per prompt; wall "
                      f"{p['wall_us_per_step_unprofiled']:.1f} us unprofiled, {p['wall_us_per_step_profiled']:.1f} "
                      "profiled)", p, unit)
        if "idle" in p:
            _print_idle(p["idle"])
    for note in result["notes"]:
        print(f"note: {note}")
