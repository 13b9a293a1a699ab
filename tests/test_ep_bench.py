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
                     "--repeats", "2", "--output", out]) == 0
        result = json.load(open(out))
        for key in ("env", "rows", "decode_per_gpu_vs_ep1", "overlap_saving", "all_to_all", "balance"):
            assert key in result, key
        assert [(r["ep"], r["overlap"]) for r in result["rows"]] == [(1, False), (2, False), (2, True)]
        for r in result["rows"]:
            assert r["decode_tok_s_per_gpu"] > 0 and r["prefill_tok_s_per_gpu"] > 0
            runs = sorted(r["decode_tok_s_runs"])  # two measured batches; the figure is their median
            assert r["repeats"] == 2 and len(runs) == 2 and r["decode_tok_s"] == (runs[0] + runs[1]) / 2
        assert result["all_to_all"]["calls"] > 0 and result["all_to_all"]["dispatch_us_per_layer"] > 0
        fixed = result["fixed_exchange_us_per_layer"]["by_tokens_per_rank"]
        assert sorted(map(int, fixed)) == [1, 4] and all(us > 0 for us in fixed.values())
        stacked = result["fixed_exchange_us_per_layer"]["in_stacked_graph"]["nccl"]  # per layer, 8 per replay
        assert sorted(map(int, stacked)) == [1, 4] and all(us > 0 for us in stacked.values())
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
            assert sorted(map(int, ep["fixed_exchange_us_per_layer_stacked"]["us"])) == [1, 4]
            assert ep["balance"]["measured_before"] >= 1.0
        print("OK")
""")


def test_bench_ep_scale_runs_on_gloo_and_writes_its_keys(mixtral, tmp_path):
    """`bench ep-scale` (the EP=8 issue's comparison: several EP sizes and a one-GPU W4A16 baseline)."""
    run_script(tmp_path, BENCH_SCALE_SCRIPT, str(mixtral), str(tmp_path / "scale.json"), timeout_s=400)




def test_profile_ep_step_reports_every_rank(mixtral, tmp_path):
    """scripts/profile_ep_step.py (its rank_profile calls run on every rank through a RankCall): one report per
    rank, each with its model runner's execute time and its plan-broadcast time (CPU: no kernel times)."""
    import ast
    import subprocess
    import sys

    from tests.ep_helpers import REPO, repo_env

    proc = subprocess.run([sys.executable, str(REPO / "scripts/profile_ep_step.py"), "--model", str(mixtral),
                           "--ep", "1", "2", "--batch-size", "1", "--input-len", "6", "--steps", "3", "--device",
                           "cpu", "--dtype", "float32", "--report-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=repo_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = {p.name: ast.literal_eval(p.read_text().splitlines()[0]) for p in tmp_path.glob("ep*.rank*.txt")}
    assert sorted(reports) == ["ep1.rank0.txt", "ep2.rank0.txt", "ep2.rank1.txt"]
    assert [reports[f"ep2.rank{r}.txt"]["rank"] for r in (0, 1)] == [0, 1]
    assert all(s["execute_ms"] > 0 for s in reports.values())
    assert reports["ep2.rank1.txt"]["plan_broadcast_ms"] > 0  # rank 1 receives a plan every step
    assert "rank_executor.py" in (tmp_path / "ep2.rank1.txt").read_text()  # its cProfile tables (RankExecutor.run)
    table = proc.stdout[proc.stdout.index(" ep  seqs"):].splitlines()
    assert len(table) == 1 + 3, table


def test_overlap_saving_is_the_fraction_of_the_overlap_off_time_saved():
    from light_moe.bench.ep import overlap_saving

    saving = overlap_saving({"decode_s": 1.0, "prefill_s": 2.0}, {"decode_s": 0.8, "prefill_s": 2.5})
    assert saving["decode"] == pytest.approx(0.2) and saving["prefill"] == pytest.approx(-0.25)
