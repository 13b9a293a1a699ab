"""`light-moe bench e2e` on CPU with the bundled model: medians over repeated measured batches, the decode
bytes model and bound of each row, and the time to first token."""
import json

import pytest

from light_moe.cli import main


def test_bench_e2e_reports_the_median_of_its_repeats(tmp_path):
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--device", "cpu", "--dtype", "float32", "--batch-sizes", "1", "3",
                 "--input-len", "8", "--output-len", "4", "--repeats", "3", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["repeats"] == 3 and len(r["decode_tok_s_runs"]) == 3 and len(r["prefill_tok_s_runs"]) == 3
        assert r["decode_tok_s"] == sorted(r["decode_tok_s_runs"])[1] > 0
        assert r["prefill_tok_s"] == sorted(r["prefill_tok_s_runs"])[1] > 0


def test_bench_e2e_rows_carry_the_bytes_model_bound_and_ttft(tmp_path, capsys):
    """A longer prompt than output: the bound's KV bytes use the mean decode context input + output / 2."""
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--device", "cpu", "--dtype", "float32", "--batch-sizes", "4",
                 "--input-len", "300", "--output-len", "6", "--repeats", "1", "--ttft-repeats", "3",
                 "--bandwidth-tbps", "2.0", "--no-fuse-combine-norm", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["engine_options"] == dict(  # the A/B side this JSON is
        skinny_gemm=True, skinny_gemm_max_rows=16, fuse_combine_norm=False, fuse_attention_merge=True,
        w4a16_decode_kernel="direct", w4a16_prefetch_down=False, w4a16_fused_decode=False, enable_cuda_graphs=True)
    weights = result["bytes_model"]
    assert result["bandwidth_tbps"] == 2.0 and weights["num_experts"] == 8 and weights["top_k"] == 2
    (row,) = result["rows"]
    parts = row["bytes_per_step_parts"]
    assert row["mean_context"] == 303
    assert parts["kv_read"] == 4 * 303 * weights["kv_token_bytes"]
    assert parts["kv_write"] == 4 * weights["kv_token_bytes"]
    hit = 8 * (1 - (1 - 2 / 8) ** 4)
    assert row["experts_hit_uniform"] == pytest.approx(hit)
    assert parts["experts"] == pytest.approx(hit * sum(weights["expert_bytes"]))
    assert row["bytes_per_step"] == pytest.approx(weights["dense"] + 4 * weights["row_bytes"] + parts["experts"]
                                                  + parts["kv_read"] + parts["kv_write"])
    assert row["bound_tok_s"] == pytest.approx(4 * 2.0e12 / row["bytes_per_step"])
    assert row["pct_of_bound"] == pytest.approx(100 * row["decode_tok_s"] / row["bound_tok_s"])
    # routing measured in the warm-up: 2..4 * 2 distinct experts per layer for 4 tokens (more with padding rows)
    measured = row["experts_hit_measured"]
    assert len(measured) == len(weights["expert_bytes"]) and all(2 <= m <= 8 for m in measured)
    assert row["pct_of_bound_measured_routing"] > 0
    ttft = result["ttft"]
    assert ttft["repeats"] == 3 and len(ttft["ttft_ms_runs"]) == 3
    assert ttft["ttft_ms_p50"] == sorted(ttft["ttft_ms_runs"])[1] > 0
    assert ttft["weights_stream_ms"] == pytest.approx(1e3 * ttft["prefill_bytes"] / 2.0e12)
    printed = capsys.readouterr().out
    assert "% bound" in printed and "TTFT (one prompt of 300 tokens alone, p50 of 3)" in printed
