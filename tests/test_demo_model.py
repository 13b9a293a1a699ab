"""The shipped demo checkpoint (light_moe/assets/demo-moe) against what its training run recorded.

Both checks run transformers on CPU in float32 (the bf16 weights upcast exactly), a second or two
each. training_summary.json is written by scripts/train_demo_model.py from the same computations.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from light_moe.assets import DEMO_MODEL_DIR

transformers = pytest.importorskip("transformers")

MAX_DIR_BYTES = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def summary() -> dict:
    return json.loads((DEMO_MODEL_DIR / "training_summary.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()


def test_directory_is_a_small_mixtral_checkpoint(model, tokenizer):
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir() if p.is_file())
    assert size <= MAX_DIR_BYTES, f"demo-moe is {size} bytes, expected <= {MAX_DIR_BYTES}"
    assert model.config.architectures == ["MixtralForCausalLM"]
    assert model.config.num_local_experts >= 8 and model.config.num_experts_per_tok == 2
    assert tokenizer.bos_token_id == model.config.bos_token_id
    assert tokenizer.eos_token_id == model.config.eos_token_id
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt == "<s><|user|>\nhi\n<|assistant|>\n"


@torch.no_grad()
def test_heldout_perplexity_below_recorded_bound(model, tokenizer, summary):
    # Same computation as text_perplexity() in scripts/train_demo_model.py.
    record = summary["heldout_txt"]
    text = (DEMO_MODEL_DIR / "heldout.txt").read_text()
    ids = torch.tensor(tokenizer(text, verbose=False).input_ids)
    assert len(ids) - 1 == record["tokens"]
    total = 0.0
    for start in range(0, len(ids) - 1, record["window"]):
        chunk = ids[start:start + record["window"] + 1]
        logits = model(input_ids=chunk[None, :-1]).logits[0]  # [S, V]
        total += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
    perplexity = math.exp(total / (len(ids) - 1))
    assert perplexity < record["perplexity_bound"], (
        f"held-out perplexity {perplexity:.3f} exceeds the recorded bound {record['perplexity_bound']} "
        f"(measured at training: {record['perplexity']})")


@torch.no_grad()
def test_greedy_samples_match_recorded_ids(model, tokenizer, summary):
    for sample in summary["samples"]:
        prompt_ids = tokenizer(sample["prompt"], return_tensors="pt").input_ids
        assert prompt_ids[0].tolist() == sample["prompt_ids"]
        out = model.generate(prompt_ids, do_sample=False, max_new_tokens=len(sample["generated_ids"]))
        generated = out[0, prompt_ids.shape[1]:].tolist()
        assert generated == sample["generated_ids"], (
            f"greedy continuation of {sample['prompt']!r} differs from the recorded one:\n"
            f"got      {tokenizer.decode(generated)!r}\nexpected {sample['generated_text']!r}")
