"""`light-moe bench ep` and `bench ep-scale` run end to end on CPU (gloo, a tiny model) and write their keys."""
import textwrap

import pytest

from tests.ep_helpers import run_script
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"))


BENCH_SCRIPT = textwrap.dedent("""
    import json, sys
    from light_moe.cli import main

    if __name__ == "__main__":
        out = sys.argv[2]
        assert main(["bench", "ep", "--model", sys.argv[1], "--device", "cpu", "--dtype", "float32", "--ep", "2",
                     "--batch-size", "1", "--input-len", "6", "--output-len", "4", "--time-exchange",
                     "--output", out]) == 0
        result = json.load(open(out))
        for key in ("env", "rows", "decode_per_gpu_vs_ep1", "overlap_saving", "all_to_all", "balance"):
            assert key in result, key
        assert [(r["ep"], r["overlap"]) for r in result["rows"]] == [(1, False), (2, False), (2, True)]
        for r in result["rows"]:
            assert r["decode_tok_s_per_gpu"] > 0 and r["prefill_tok_s_per_gpu"] > 0
        assert result["all_to_all"]["calls"] > 0 and result["all_to_all"]["dispatch_us_per_layer"] > 0
        fixed = result["fixed_exchange_us_per_layer"]["by_tokens_per_rank"]
        assert sorted(map(int, fixed)) == [1, 4] and all(us > 0 for us in fixed.values())
        balance = result["balance"]
        assert balance["measured_before"] >= 1.0 and balance["predicted_after"] <= balance["predicted_before"]
        print("OK")
""")


def test_bench_ep_runs_on_gloo_and_writes_its_keys(mixtral, tmp_path):
    run_script(tmp_path, BENCH_SCRIPT, str(mixtral), str(tmp_path / "ep.json"), timeout_s=300)


BENCH_SCALE_SCRIPT = textwrap.dedent("""
    import json, sys
    from light_moe.cli import main

    if __name__ == "__main__":
        out = sys.argv[2]
        assert main(["bench", "ep-scale", "--model", sys.argv[1], "--device", "cpu", "--dtype", "float32",
                     "--ep", "2", "3", "--baseline-quant", "w4a16", "--quant-group-size", "32", "--batch-size", "1",
                     "--input-len", "6",
                     "--output-len", "4", "--output", out]) == 0
        result = json.load(open(out))
        base = result["baseline"]
        assert base["ep"] == 1 and base["quantization"] == "w4a16" and base["decode_tok_s_per_gpu"] > 0
        assert [ep["ep"] for ep in result["by_ep"]] == [2, 3]
        for ep in result["by_ep"]:
            assert [(r["ep"], r["overlap"]) for r in ep["rows"]] == [(ep["ep"], False), (ep["ep"], True)]
            assert all(r["decode_tok_s_per_gpu"] > 0 and r["prefill_tok_s_per_gpu"] > 0 for r in ep["rows"])
            memory = ep["memory_per_rank"]
            assert len(memory) == ep["ep"] and all(m["kv_cache_gib"] > 0 for m in memory)
            assert sorted(map(int, ep["fixed_exchange_us_per_layer"])) == [1, 4]
            assert ep["balance"]["measured_before"] >= 1.0
        print("OK")
""")


def test_bench_ep_scale_runs_on_gloo_and_writes_its_keys(mixtral, tmp_path):
    """`bench ep-scale` (the EP=8 issue's comparison: several EP sizes and a one-GPU W4A16 baseline)."""
    run_script(tmp_path, BENCH_SCALE_SCRIPT, str(mixtral), str(tmp_path / "scale.json"), timeout_s=400)


