"""Which execution path makes an engine's greedy tokens leave its own eager tokens? (GPU, tiny checkpoints)

The GPU engine tests compare a CUDA-graph engine (async scheduling, decode graphs, piecewise prefill graphs, a
batch of prompts padded to a graph bucket) with an eager one. When they part, this runs the same prompts through
each path alone and reports, per configuration, the first token that differs from the eager, synchronous,
batched run of the same backend and dtype:
  - eager_async: async scheduling only;  graphs_sync: CUDA graphs only;  graphs: both (the test's engine);
  - *_alone: each prompt in a batch of its own (no padding rows from other prompts);
  - the reference backend in bf16 and in float32 through the same paths: a part that the float32 reference shows
    is in the engine's graph path itself, one only bf16 shows is rounding (a near-tie moved by padded shapes).

    python scripts/diagnose_graph_divergence.py --family gpt_oss [--max-tokens 32] [--output out.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from light_moe import LightMoEEngine, SamplingParams
from tests.test_cute_engine_gpu import PROMPTS
from tests.tiny_models import make_tiny_checkpoint

# the GPU tests' kernel-friendly sizes (tests/test_gpt_oss_gpu.py, tests/test_cute_engine_gpu.py)
SIZES = {"gpt_oss": dict(hidden_size=256, intermediate_size=128, head_dim=64, swiglu_limit=7.0),
         "mixtral": dict(hidden_size=256, intermediate_size=128),
         "qwen3_moe": dict(hidden_size=128, moe_intermediate_size=128, head_dim=64)}
PATHS = {"eager": dict(enforce_eager=True, async_scheduling=False),
         "eager_async": dict(enforce_eager=True, async_scheduling=True),
         "graphs_sync": dict(enforce_eager=False, async_scheduling=False),
         "graphs": dict(enforce_eager=False, async_scheduling=True)}


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def run(checkpoint: Path, backend: str, dtype: str, max_tokens: int) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    tokens: dict[str, list[list[int]]] = {}
    for name, path in PATHS.items():
        engine = LightMoEEngine(checkpoint, moe_backend=backend, dtype=dtype, device="cuda", show_progress=False,
                                kv_cache_memory_bytes=64 << 20, **path)
        tokens[name] = [o.token_ids for o in engine.generate_outputs(PROMPTS, params)]
        if name in ("eager", "graphs"):
            # computed again, not served from the batched run's prefix cache (a cached prefix would hide the path)
            assert engine.reset_prefix_cache()
            tokens[f"{name}_alone"] = [engine.generate_outputs([p], params)[0].token_ids for p in PROMPTS]
        engine.shutdown()
    base = tokens["eager"]
    return {name: [first_difference(b, t) for b, t in zip(base, rows)] for name, rows in tokens.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="gpt_oss", choices=sorted(SIZES))
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_tiny_checkpoint(args.family, Path(tmp), **SIZES[args.family])
        report = {f"{backend} {dtype}": run(checkpoint, backend, dtype, args.max_tokens)
                  for backend, dtype in (("cute", "bfloat16"), ("reference", "bfloat16"), ("reference", "float32"))}
    print("first token that differs from the eager batched run (None: identical), per prompt "
          f"(lengths {[len(p) for p in PROMPTS]})")
    for case, rows in report.items():
        for name, firsts in rows.items():
            print(f"{case:>20}  {name:<14} {firsts}")
    if args.output:
        args.output.write_text(json.dumps({"family": args.family, "prompts": [len(p) for p in PROMPTS],
                                           "first_difference": report}, indent=1))


if __name__ == "__main__":
    main()
