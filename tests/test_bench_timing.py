"""light_moe/bench/timing.py on the CPU: round_robin's alternating order and statistics, timing_entry's rates."""
from light_moe.bench.timing import round_robin, timing_entry


def test_round_robin_alternates_the_order_and_summarises_each_variant():
    order = []
    times = {"a": iter([3.0, 1.0, 2.0]), "b": iter([10.0, 30.0, 20.0])}
    stats = round_robin({"a": "a", "b": "b"}, 3, lambda name: (order.append(name), next(times[name]))[1])
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert stats == {"a": dict(median=2.0, min=1.0, max=3.0), "b": dict(median=20.0, min=10.0, max=30.0)}


def test_timing_entry_rates_from_the_median():
    entry = timing_entry(dict(median=20.0, min=18.0, max=25.0), 60_000_000)  # 60 MB in 20 us
    assert entry == dict(us=20.0, min_us=18.0, max_us=25.0, gbps=3000.0, tbps=3.0)
