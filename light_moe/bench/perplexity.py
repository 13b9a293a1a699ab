"""Perplexity of the engine's own model (paged-cache prefill path) on a text: float vs W4A16.

Same scoring as scripts/train_demo_model.py text_perplexity (BOS + text, consecutive windows of
`window` tokens, each window scored from an empty cache), so float32 numbers match the recorded
training_summary.json. Writes JSON; `python -m light_moe.bench.perplexity --output FILE`.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from light_moe.bench.env import environment, write_result
from light_moe.engine.request import Request
from light_moe.executor.batch import ScheduledRequest
from light_moe.sampling_params import SamplingParams


@torch.inference_mode()
def _window_logits(engine, ids: list[int]) -> torch.Tensor:
    """Logits of every position of one window through the paged-cache prefill path. [S, V]"""
    request = Request("perplexity", ids, SamplingParams())
    if not engine.block_manager.allocate_slots(request, len(ids)):
        raise RuntimeError(f"no KV blocks for a window of {len(ids)} tokens")
    try:
        batch, positions, meta, _ = engine.runner.prepare([ScheduledRequest(request, len(ids), True, True)])
        return engine.model.compute_logits(engine.model(batch, positions, engine.runner.kv_caches, meta))
    finally:
        engine.block_manager.free(request)


def engine_perplexity(engine, text: str, window: int) -> tuple[float, int]:
    ids = engine.tokenizer.encode(text)
    total = 0.0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        logits = _window_logits(engine, chunk[:-1])
        total += F.cross_entropy(logits.float(), torch.tensor(chunk[1:], device=logits.device), reduction="sum").item()
    return math.exp(total / (len(ids) - 1)), len(ids) - 1


def expert_memory(engine) -> dict:
    """Bytes of the routed experts against the same experts in bf16. The ratio counts the scales as
    bf16 (as served on GPU), whatever dtype this run holds them in (float32 on CPU)."""
    deployed = bf16 = 0
    for block in engine.model.moe_blocks():
        if block.canonical_released:
            # the backend repacked the experts and the canonical copy was freed: count what it holds
            for w in block.prepared:
                bf16 += torch.Size(w.shape).numel() * 2
                deployed += sum(t.numel() * t.element_size() for t in vars(w).values() if torch.is_tensor(t)) \
                    if not torch.is_tensor(w) else w.numel() * 2
            continue
        for w in block.experts.weights():
            bf16 += w.shape.numel() * 2
            if isinstance(w, torch.Tensor):
                deployed += w.numel() * 2
            else:
                deployed += w.nbytes - w.scales.numel() * (w.scales.element_size() - 2)
    return {"expert_bytes_bf16": bf16, "expert_bytes_w4a16_bf16_scales": deployed,
            "ratio_to_bf16": round(deployed / bf16, 4)}


def main(argv=None) -> dict:
    from light_moe import LightMoEEngine
    from light_moe.assets import DEMO_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL_DIR))
    parser.add_argument("--text", default=str(DEMO_MODEL_DIR / "heldout.txt"))
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[128])
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    text = Path(args.text).read_text()
    configs = [("float", None, True)] + [(f"w4a16-g{g}-{'sym' if s else 'asym'}", g, s)
                                         for g in args.group_sizes for s in (True, False)]
    rows = []
    for label, group, sym in configs:
        kwargs = {} if group is None else dict(quantization="w4a16", quant_group_size=group, quant_symmetric=sym)
        engine = LightMoEEngine(args.model, dtype=args.dtype, device=args.device, show_progress=False,
                                max_model_len=args.window + 16, **kwargs)
        ppl, tokens = engine_perplexity(engine, text, args.window)
        rows.append({"config": label, "perplexity": round(ppl, 4), "tokens": tokens, **expert_memory(engine)})
        print(f"{label:>18}: perplexity {ppl:.4f} over {tokens} tokens; experts {rows[-1]['ratio_to_bf16']}x bf16")
    result = {"benchmark": "perplexity", "env": environment(), "model": args.model, "text": args.text,
              "window": args.window, "dtype": args.dtype, "device": args.device, "rows": rows}
    write_result(result, args.output, echo=False)
    return result


if __name__ == "__main__":
    main()
