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
from tests.test_fidelity import engine_prefill_logits
from tests.tiny_models import make_tiny_checkpoint

PROMPTS = [[7, 3, 99], list(range(20, 31)), list(range(100, 157)), list(range(200, 240))]
# op families that can run the reference implementation on CuTe-prepared tensors
SWAPS = {"attention": ("attention",), "router": ("router", "route", "routing_metadata"),
         "norm_rope": ("rms_norm", "rope_write_kv"), "linear": ("linear",)}


class Recorder:
    """Wraps an engine's ops.route and model.compute_logits to keep each call's top-k ids / logits."""

    def __init__(self, engine):
        self.routes: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.gaps: list[torch.Tensor] = []
        self.on = False
        ops, model = engine.ops, engine.model
        route, logits = ops.route, model.compute_logits

        def rec_route(x, gate_weight, top_k, renormalize, counts_out=None, **variant):
            out = route(x, gate_weight, top_k, renormalize, counts_out, **variant)
            if self.on:
                self.routes.append(out[1].detach().to("cpu", torch.int64).sort(-1).values)
                g = (x.float() @ gate_weight.float().t()).sort(-1, descending=True).values
                self.gaps.append(((g[:, top_k - 1] - g[:, top_k]) / g[:, 0].abs().clamp_min(1e-6)).cpu())
            return out

        def rec_logits(hidden):
            out = logits(hidden)
            if self.on:
                self.logits.append(out.detach().float().cpu())
            return out

        ops.route = rec_route
        model.compute_logits = rec_logits


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
    """(tokens, per-decode-step routes [L x [K]], decode logits per step) of one prompt alone."""
    rec = eng._diag
    rec.routes.clear(), rec.logits.clear(), rec.gaps.clear()
    rec.on = True
    out = eng.generate_outputs([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0))[0]
    rec.on = False
    layers = len(eng.model.moe_blocks())
    steps = [rec.routes[i:i + layers] for i in range(0, len(rec.routes), layers)]
    gaps = [rec.gaps[i:i + layers] for i in range(0, len(rec.gaps), layers)]
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
    ref._diag = Recorder(ref)
    ref_runs = [run_prompt(ref, pr, args.max_tokens) for pr in PROMPTS]
    report = {"family": args.family, "quantization": args.quantization, "variants": {}}
    for variant in args.variants:
        eng = make_engine(ckpt, args.backend, None if variant == "cute" else variant, args.quantization, args.device)
        eng._diag = Recorder(eng)
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
