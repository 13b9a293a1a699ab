"""Where the GPU waits for the host: the idle intervals of a profiled window and what the host was doing in them.

`bench profile-step` reports a step's gap (wall time - the kernels' busy time) as one number. This module splits
it: the intervals of the window that no device record covers (the GPU idle), the longest first, each with the
kernel before and after it and the host activity that overlaps it. Host activity is what torch.profiler records
on the CPU: CUDA runtime / driver calls, ATen ops, and the engine phases that `phase_annotations` marks for the
profiled span (scheduling, input preparation, the forward, sampling, read-back), so that an interval reads as
"the GPU idled 300 us while the host was in prepare and cudaMemcpyAsync". Nothing here changes the engine: the
annotations wrap its methods only inside the `with` block.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

# engine and runner methods whose time the prefill profile marks as phases ("phase::<name>" host ranges)
PHASES = (("scheduler", "schedule"), ("runner", "prepare"), ("runner", "execute"), ("engine", "_sample"),
          ("engine", "_read_back"))


@dataclass(frozen=True)
class Span:
    """A host span; device spans are step_profile.KernelRecord, which has the same fields."""
    name: str
    start_us: float
    duration_us: float


def _end(s) -> float:
    return s.start_us + s.duration_us


def idle_intervals(device: list[Span], start_us: float, end_us: float, min_us: float) -> list[tuple[float, float]]:
    """(start, end) of every stretch of at least min_us inside [start_us, end_us] that no device span covers."""
    gaps, cursor = [], start_us
    for s in sorted(device, key=lambda s: s.start_us):
        if s.start_us > cursor and min(s.start_us, end_us) - cursor >= min_us:
            gaps.append((cursor, min(s.start_us, end_us)))
        cursor = max(cursor, _end(s))
        if cursor >= end_us:
            break
    if end_us - cursor >= min_us:
        gaps.append((cursor, end_us))
    return gaps


def overlap_by_name(host: list[Span], start_us: float, end_us: float, top: int) -> list[dict]:
    """The host spans' time inside [start_us, end_us], summed per name, the largest `top` first."""
    totals: dict[str, float] = {}
    for s in host:
        inside = min(_end(s), end_us) - max(s.start_us, start_us)
        if inside > 0:
            totals[s.name] = totals.get(s.name, 0.0) + inside
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [dict(name=name, us=us) for name, us in ranked]


def idle_report(device: list[Span], host: list[Span], min_us: float = 10.0, top: int = 8, names: int = 4) -> dict:
    """The window runs from the first host span to the last end of any span. Returns the total idle time, the
    interval count and the `top` longest intervals (offset from the window's start, length, the device spans
    that end before and start after it, the host spans inside it by name)."""
    if not host:
        return dict(idle_us=0.0, intervals=0, min_us=min_us, longest=[])
    start = min(s.start_us for s in host)
    end = max(_end(s) for s in host + device)
    gaps = idle_intervals(device, start, end, min_us)
    by_end = sorted(device, key=_end)
    by_start = sorted(device, key=lambda s: s.start_us)
    longest = []
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        before = [s.name for s in by_end if _end(s) <= a + 1e-6]
        after = [s.name for s in by_start if s.start_us >= b - 1e-6]
        longest.append(dict(offset_us=a - start, idle_us=b - a, before=before[-1] if before else None,
                            after=after[0] if after else None, host=overlap_by_name(host, a, b, names)))
    return dict(idle_us=sum(b - a for a, b in gaps), intervals=len(gaps), min_us=min_us, longest=longest)


def host_spans(prof) -> list[Span]:
    """The CPU-side spans of a torch.profiler run worth naming in an interval: the phase annotations, CUDA runtime
    and driver calls, and top-level ATen ops (an op's children are inside it)."""
    from torch.autograd import DeviceType

    spans = []
    for e in prof.events():
        if e.device_type != DeviceType.CPU or e.is_async:
            continue
        name = e.name
        top_aten = name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        if name.startswith(("phase::", "cu")) or top_aten:  # cu: CUDA runtime (cuda*) and driver (cu*) calls
            spans.append(Span(name, e.time_range.start, e.time_range.end - e.time_range.start))
    return spans


@contextlib.contextmanager
def phase_annotations(engine):
    """Within the block, PHASES' methods of `engine` (its scheduler, its runner, itself) run inside
    torch.profiler.record_function("phase::<method>"); restored on exit. Skips what an engine does not have
    (an expert-parallel engine has workers, not a runner)."""
    import functools

    from torch.profiler import record_function

    owners = dict(engine=engine, scheduler=getattr(engine, "scheduler", None), runner=getattr(engine, "runner", None))
    patched = []
    for owner_name, method in PHASES:
        owner = owners[owner_name]
        if owner is None or not hasattr(owner, method):
            continue
        original = getattr(owner, method)
        own = method in vars(owner)  # an instance attribute (restored as it was), else the class's method

        def wrapped(*args, _original=original, _label=f"phase::{method.lstrip('_')}", **kwargs):
            with record_function(_label):
                return _original(*args, **kwargs)

        setattr(owner, method, functools.wraps(original)(wrapped))
        patched.append((owner, method, original if own else None))
    try:
        yield
    finally:
        for owner, method, own in patched:
            if own is None:
                delattr(owner, method)  # the class's method shows again
            else:
                setattr(owner, method, own)
