"""`light-moe bench e2e` on CPU with the bundled model: medians over repeated measured batches."""
import json

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
