"""Where does the CuTe engine's greedy decode leave the reference engine's? (GPU, tiny checkpoints)

For each variant of the CuTe engine (all CuTe ops, or one op family swapped back to the reference
implementation on the same backend object) it generates greedily from the test prompts of
tests/test_cute_engine_gpu.py and reports, per prompt:
  - the first token that differs from the reference engine's,
  - self-consistency of the variant: at each decode step, the largest |decode logit - prefill logit| of the
    same engine on the same prefix (the decode path against its own prefill path; a jump here points at a
    decode-only op: decode attention, the KV write of one token, the decode router sizes),
  - routing: the decode steps and layers whose top-k expert set differs from the reference engine's on the
    same prefix (before the first differing token), with the reference's gap between its k-th and (k+1)-th
    router logit there (a flip inside bf16 rounding is a near-tie, not a bug).

    python scripts/diagnose_decode_divergence.py --family mixtral [--quantization w4a16] [--max-tokens 32]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import types
from pathlib import Path

import torch

from light_moe import LightMoEEngine, SamplingParams
from light_moe.ops.backend import MoEOps
from tests.test_cute_engine_gpu import RouteTrace
from tests.test_fidelity import engine_prefill_logits
from tests.tiny_models import make_tiny_checkpoint

PROMPTS = [[7, 3, 99], list(range(20, 31)), list(range(100, 157)), list(range(200, 240))]
# op families that can run the reference implementation on CuTe-prepared tensors
SWAPS = {"attention": ("attention",), "router": ("router", "route", "routing_metadata"),
         "norm_rope": ("rms_norm", "rope_write_kv"), "linear": ("linear",)}


class LogitsRecorder:
    """Wraps model.compute_logits to keep each call's logits while `on` (the generate loop's, not the probes')."""

    def __init__(self, engine):
        self.logits: list[torch.Tensor] = []
        self.on = False
        compute = engine.model.compute_logits

        def rec_logits(hidden):
            out = compute(hidden)
            if self.on:
                self.logits.append(out.detach().float().cpu())
            return out

        engine.model.compute_logits = rec_logits


def _gap(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Per row: the k-th minus the (k+1)-th router logit, relative to the largest magnitude."""
    g = logits.sort(-1, descending=True).values
    return (g[:, k - 1] - g[:, k]) / g[:, 0].abs().clamp_min(1e-6)


def make_engine(ckpt, backend: str, swap: str | None, quantization: str | None, device: str = "cuda"):
    common = dict(dtype="bfloat16", device=device, show_progress=False, kv_cache_memory_bytes=64 << 20,
                  enforce_eager=True, async_scheduling=False, enable_prefix_caching=False)
    if quantization:
        common["quantization"] = quantization
    eng = LightMoEEngine(ckpt, moe_backend=backend, **common)
    if swap:
        for name in SWAPS[swap]:
            setattr(eng.ops, name, types.MethodType(getattr(MoEOps, name), eng.ops))
    return eng


def run_prompt(eng, prompt, max_tokens):
    """(tokens, per-forward routes [L x [T, K]], their k-th / (k+1)-th router-logit gaps, decode logits per
    step) of one prompt alone."""
    rec = eng._diag
    rec.logits.clear()
    trace = RouteTrace(eng)  # tests/test_cute_engine_gpu.py: logits and sorted top-k ids per route call
    rec.on = True
    out = eng.generate_outputs([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0))[0]
    rec.on = False
    del eng.ops.route  # back to the class's method (the probes below are not recorded)
    layers = len(eng.model.moe_blocks())
    calls = trace.calls
    steps = [[ids for _, ids in calls[i:i + layers]] for i in range(0, len(calls), layers)]
    gaps = [[_gap(lg, ids.shape[1]) for lg, ids in calls[i:i + layers]] for i in range(0, len(calls), layers)]
    return list(out.token_ids), steps, gaps, [lg[-1] for lg in rec.logits]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--family", default="mixtral")
    p.add_argument("--quantization", default=None)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--variants", nargs="*", default=["cute", "attention", "router", "norm_rope", "linear"])
    p.add_argument("--output", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="cute", help="the engine under test (reference: a CPU dry run of this script)")
    args = p.parse_args()
    extra = dict(hidden_size=256, intermediate_size=128)
    if args.family == "qwen3_moe":
        extra.update(hidden_size=128, moe_intermediate_size=128, head_dim=64)
    ckpt = make_tiny_checkpoint(args.family, Path(tempfile.mkdtemp()) / args.family, **extra)
    ref = make_engine(ckpt, "reference", None, args.quantization, args.device)
    ref._diag = LogitsRecorder(ref)
    ref_runs = [run_prompt(ref, pr, args.max_tokens) for pr in PROMPTS]
    report = {"family": args.family, "quantization": args.quantization, "variants": {}}
    for variant in args.variants:
        eng = make_engine(ckpt, args.backend, None if variant == "cute" else variant, args.quantization, args.device)
        eng._diag = LogitsRecorder(eng)
        rows = []
        for pr, (rt, rsteps, rgaps, _) in zip(PROMPTS, ref_runs):
            ct, csteps, _, clogits = run_prompt(eng, pr, args.max_tokens)
            first = next((i for i, (a, b) in enumerate(zip(rt, ct)) if a != b), None)
            # self-consistency: decode logits of step i (the logits that chose token i+1) vs prefill logits
            drift = []
            for i in range(1, min(len(ct), 40)):
                pre = engine_prefill_logits(eng, pr + ct[:i])[-1].float().cpu()
                drift.append(round((clogits[i] - pre).abs().max().item(), 4))
            # routing flips vs the reference on the same prefix (steps before the first differing token)
            flips = []
            last = len(rsteps) if first is None else first + 1
            for s in range(min(last, len(rsteps), len(csteps))):
                for layer, (a, b) in enumerate(zip(rsteps[s], csteps[s])):
                    if a.shape == b.shape and not torch.equal(a, b):
                        rows_diff = (a != b).any(-1).nonzero().flatten().tolist()
                        flips.append({"step": s, "layer": layer, "rows": rows_diff,
                                      "ref_gap": [round(rgaps[s][layer][r].item(), 5) for r in rows_diff]})
            margin = None
            if first is not None:
                lr = engine_prefill_logits(ref, pr + rt[:first])[-1].float()
                margin = round(abs((lr[rt[first]] - lr[ct[first]]).item()), 4)
            rows.append({"prompt_len": len(pr), "first_diff": first, "ref_margin_at_diff": margin,
                         "decode_vs_prefill_max": max(drift) if drift else None, "drift": drift,
                         "routing_flips": flips[:12]})
            print(f"[{variant}] prompt {len(pr):3d}: first diff {first} margin {margin} "
                  f"decode-vs-prefill max {max(drift) if drift else None} flips {len(flips)} "
                  f"{flips[:3]}", flush=True)
        report["variants"][variant] = rows
        eng.shutdown()
    # control: the reference engine's own decode vs prefill
    ctl = []
    for pr, (rt, _, _, rlogits) in zip(PROMPTS, ref_runs):
        d = [round((rlogits[i] - engine_prefill_logits(ref, pr + rt[:i])[-1].float().cpu()).abs().max().item(), 4)
             for i in range(1, min(len(rt), 40))]
        ctl.append(max(d) if d else None)
    report["reference_decode_vs_prefill_max"] = ctl
    print("reference decode-vs-prefill max per prompt:", ctl)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
