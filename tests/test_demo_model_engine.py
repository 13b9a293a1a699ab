"""The engine on the shipped demo model: the same tokens as transformers (float32, CPU), a stable
greedy output (regression against the ids recorded at training time, which transformers also
reproduces in test_demo_model.py), and the same tokenizer and chat template."""
import json

import pytest

from light_moe import LightMoEEngine, SamplingParams
from light_moe.assets import DEMO_MODEL_DIR

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def engine():
    return LightMoEEngine(DEMO_MODEL_DIR, dtype="float32", device="cpu", show_progress=False)


@pytest.fixture(scope="module")
def summary() -> dict:
    return json.loads((DEMO_MODEL_DIR / "training_summary.json").read_text())


def test_engine_greedy_matches_recorded_transformers_output(engine, summary):
    samples = summary["samples"]
    params = SamplingParams(max_tokens=max(len(s["generated_ids"]) for s in samples), temperature=0.0,
                            ignore_eos=True)
    outs = engine.generate_outputs([s["prompt"] for s in samples], params)
    for sample, out in zip(samples, outs):
        assert out.prompt_token_ids == sample["prompt_ids"]
        n = len(sample["generated_ids"])
        assert out.token_ids[:n] == sample["generated_ids"], sample["prompt"]


def test_tokenizer_and_chat_template_match_transformers(engine):
    hf = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    for text in ["def fibonacci(n):", "import os\n\nclass Stack:\n    pass\n", "naïve → unicode ✓"]:
        assert engine.tokenizer.encode(text) == hf(text).input_ids
        assert engine.tokenizer.decode(hf(text).input_ids) == hf.decode(hf(text).input_ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": "Write a function."}]
    assert engine.apply_chat_template(messages) == hf.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_cli_generate_uses_the_demo_model(capsys):
    from light_moe.cli import main

    assert main(["generate", "def add(a, b):", "--max-tokens", "8", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def add(a, b):") and len(captured.out.strip()) > len("def add(a, b):")
    assert "tokens/s" in captured.err and "demo model" in captured.err
    # the host/GPU overlap flags give the same text
    for flags in (["--async-output-processing"], ["--async-scheduling"], ["--stream", "--async-scheduling"]):
        assert main(["generate", "def add(a, b):", "--max-tokens", "8", "--device", "cpu", *flags]) == 0
        assert capsys.readouterr().out == captured.out, flags
