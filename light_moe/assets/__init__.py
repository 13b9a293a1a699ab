"""Files shipped with the package: the demo MoE checkpoint trained by scripts/train_demo_model.py.

demo-moe/ is a Hugging Face Mixtral checkpoint (bf16 safetensors, tokenizer, generation config)
plus heldout.txt and training_summary.json, which hold the perplexity bound and the greedy
samples that the regression tests compare against; see demo-moe/MODEL_CARD.md.
"""
import pathlib

DEMO_MODEL_DIR = pathlib.Path(__file__).parent / "demo-moe"
