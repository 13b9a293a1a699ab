"""bench/idle_gaps.py: the GPU's idle intervals in a profiled window and the host spans inside them, on synthetic
spans; the engine phase annotations mark what they wrap and leave the engine as it was."""
from __future__ import annotations

import pytest
import torch

from light_moe.bench.idle_gaps import Span, host_spans, idle_intervals, idle_report, overlap_by_name, phase_annotations
from light_moe.bench.step_profile import KernelRecord


def test_idle_intervals_are_the_uncovered_stretches_of_the_window():
    device = [KernelRecord("a", 5, 10), KernelRecord("b", 10, 10), KernelRecord("c", 40, 10)]  # 5-20, 40-50
    assert idle_intervals(device, 0, 60, 5) == [(0, 5), (20, 40), (50, 60)]
    assert idle_intervals(device, 0, 60, 15) == [(20, 40)]
    assert idle_intervals(device, 10, 45, 1) == [(20, 40)]  # clipped to the window
    assert idle_intervals([], 3, 9, 1) == [(3, 9)]
    # a span inside another leaves no gap
    assert idle_intervals([KernelRecord("long", 0, 100), KernelRecord("short", 10, 5)], 0, 100, 1) == []


def test_overlap_by_name_sums_the_time_inside_per_name():
    host = [Span("cudaMemcpyAsync", 0, 10), Span("cudaMemcpyAsync", 15, 10), Span("phase::prepare", 0, 30),
            Span("aten::index_select", 40, 5)]
    assert overlap_by_name(host, 5, 20, 4) == [dict(name="phase::prepare", us=15), dict(name="cudaMemcpyAsync", us=10)]
    assert overlap_by_name(host, 5, 20, 1) == [dict(name="phase::prepare", us=15)]
    assert overlap_by_name(host, 30, 40, 4) == []


def test_idle_report_ranks_intervals_and_names_their_neighbours():
    device = [KernelRecord("first", 100, 50), KernelRecord("second", 400, 100), KernelRecord("third", 520, 10)]
    host = [Span("phase::schedule", 0, 60), Span("phase::prepare", 60, 40), Span("cudaGraphLaunch", 150, 20),
            Span("cuLaunchKernelEx", 300, 90), Span("phase::read_back", 530, 70)]
    report = idle_report(device, host, min_us=5, top=2)
    # window 0..600: idle 0-100, 150-400, 500-520, 530-600
    assert report["intervals"] == 4 and report["idle_us"] == pytest.approx(100 + 250 + 20 + 70)
    longest, second = report["longest"]
    assert (longest["offset_us"], longest["idle_us"]) == (150, 250)
    assert longest["before"] == "first" and longest["after"] == "second"
    assert longest["host"] == [dict(name="cuLaunchKernelEx", us=90), dict(name="cudaGraphLaunch", us=20)]
    assert (second["offset_us"], second["idle_us"], second["before"], second["after"]) == (0, 100, None, "first")
    assert [h["name"] for h in second["host"]] == ["phase::schedule", "phase::prepare"]
    assert idle_report(device, [])["intervals"] == 0


class _Runner:
    def prepare(self, x):
        return x + 1

    def execute(self, x):
        return self.prepare(x) * 2


class _Engine:
    def __init__(self):
        self.runner = _Runner()
        self.scheduler = None  # absent pieces are skipped
        self._read_back = lambda: "instance attribute"

    def _sample(self, x):
        return -x


def test_phase_annotations_mark_the_wrapped_methods_and_restore_them():
    engine = _Engine()
    own = engine._read_back
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, phase_annotations(engine):
        assert engine.runner.execute(3) == 8 and engine._sample(2) == -2 and engine._read_back() == "instance attribute"
        torch.ones(2).add_(1)
    names = [s.name for s in host_spans(prof)]
    for phase in ("phase::execute", "phase::prepare", "phase::sample", "phase::read_back"):
        assert phase in names
    assert "aten::add_" in names
    # restored: the class's methods again, the instance attribute as it was
    assert "prepare" not in vars(engine.runner) and "execute" not in vars(engine.runner)
    assert "_sample" not in vars(engine) and engine._read_back is own
    assert engine.runner.execute(3) == 8


def test_the_idle_intervals_print_with_their_host_spans(capsys):
    from light_moe.bench.step_profile import _print_idle

    report = idle_report([KernelRecord("kernel_after", 300, 50)], [Span("phase::prepare", 0, 200),
                                                                    Span("cudaMemcpyAsync", 200, 20)], min_us=10)
    _print_idle(report)
    out = capsys.readouterr().out
    assert "GPU idle under the profiler: 300.0 us in 1 intervals of >= 10 us" in out
    assert "idle   300.0 us  before kernel_after: phase::prepare 200, cudaMemcpyAsync 20" in out
