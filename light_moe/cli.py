"""`light-moe` command line: generate | serve | bench {e2e, serve, profile-step, moe-layer, ep, ep-scale} | quantize."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from light_moe.bench.shapes import SHAPES
from light_moe.cli_args import add_bench_engine_args
from light_moe.engine.args import EngineArgs

__all__ = ["build_parser", "main"]


def is_rank_zero() -> bool:
    """False on ranks 1..N-1 of a torchrun job (RANK set and not 0)."""
    return os.environ.get("RANK", "0") == "0"


def _default_model(path):
    if path is not None:
        return path
    from light_moe.assets import DEMO_MODEL_DIR

    return DEMO_MODEL_DIR


def cmd_generate(args) -> int:
    from light_moe import LightMoEEngine, SamplingParams

    # every argument is checked before the weights load (a bad flag should not cost the load time)
    if not args.prompt.strip():
        print("light-moe generate: the prompt is empty (pass some text, e.g. 'def fibonacci(n):')", file=sys.stderr)
        return 2
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                            seed=args.seed if args.temperature > 0 else None)
    engine_args = EngineArgs.from_cli_args(args, model=_default_model(args.model))
    if args.model is None and is_rank_zero():
        print(f"(using the bundled demo model: {engine_args.model})", file=sys.stderr)
    # under torchrun only rank 0 returns from the constructor: the other ranks serve it, then exit
    engine = LightMoEEngine.from_engine_args(engine_args)
    prompt = args.prompt
    if args.chat:
        prompt = engine.apply_chat_template([{"role": "user", "content": args.prompt}])
    start = time.perf_counter()
    if args.stream:
        if not args.chat:
            print(args.prompt, end="", flush=True)
        count = 0
        rid = engine.add_request(prompt, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == rid:
                    print(out.delta_text, end="", flush=True)
                    count = len(out.token_ids)
        print()
    else:
        out = engine.generate_outputs(prompt, params)[0]
        count = len(out.token_ids)
        print(out.text if args.chat else args.prompt + out.text)
    elapsed = time.perf_counter() - start
    print(f"[{count} tokens in {elapsed:.2f} s: {count / elapsed:.1f} tokens/s]", file=sys.stderr)
    engine.shutdown()
    return 0


def cmd_bench_e2e(args) -> int:
    from light_moe.bench import e2e

    e2e.main(args)
    return 0


def cmd_bench_ep(args) -> int:
    from light_moe.bench import ep

    ep.main(args)
    return 0


def cmd_bench_ep_scale(args) -> int:
    from light_moe.bench import ep_scale

    ep_scale.main(args)
    return 0


def cmd_bench_profile_step(args) -> int:
    from light_moe.bench import step_profile

    step_profile.main(args)
    return 0


def cmd_bench_serve(args) -> int:
    from light_moe.bench import serve

    serve.main(args)
    return 0


def cmd_bench_moe_layer(args) -> int:
    from light_moe.bench import moe_layer

    moe_layer.main(args)
    return 0


def cmd_quantize(args) -> int:
    from light_moe.quant.scheme import W4A16Config
    from light_moe.quantize import quantize_checkpoint

    if args.quant_attention:  # the writer quantizes routed experts only; say so rather than ignore the flag
        print("light-moe quantize: --quant-attention is not supported (the checkpoint writer quantizes the routed "
              "experts only; quantize attention on load with `--quantization w4a16 --quant-attention`)",
              file=sys.stderr)
        return 2
    scheme = W4A16Config(group_size=args.quant_group_size, symmetric=args.quant_symmetric)
    out = quantize_checkpoint(args.model, args.out, scheme)
    print(f"wrote {scheme.name} checkpoint (GPTQ layout, routed experts quantized) to {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="light-moe", description="Light-MoE: fast inference for MoE models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt",
                         description="Generate text from a prompt; without --model, with the bundled demo model.")
    EngineArgs.add_cli_args(gen, defaults={"model": None})
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0,
                     help="> 1 makes tokens already in the text less likely (make demo uses 1.2: the small demo "
                          "model loops without it)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    from light_moe.server.serve import add_serve_args  # imports without the server extra

    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks (JSON results)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    e2e = bsub.add_parser("e2e", help="prefill and decode tokens/s of the whole engine")
    add_bench_engine_args(e2e)
    e2e.add_argument("--shape", choices=sorted(SHAPES), default=None,
                     help="ignore --model: a released model's shape with random weights (bench/shapes.py)")
    e2e.add_argument("--layers", type=int, default=4, help="layers of the --shape model")
    e2e.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    e2e.add_argument("--input-len", type=int, default=128)
    e2e.add_argument("--output-len", type=int, default=64)
    e2e.add_argument("--repeats", type=int, default=3,
                     help="measured batches per batch size after the warm-up; tokens/s are their median")
    from light_moe.bench.bytes_model import DEFAULT_BANDWIDTH_TBPS

    e2e.add_argument("--bandwidth-tbps", type=float, default=DEFAULT_BANDWIDTH_TBPS,
                     help="memory bandwidth (TB/s) of the decode bound: bytes per step / bandwidth "
                          "(default: the H100 SXM copy rate; docs/performance.md)")
    e2e.add_argument("--ttft-repeats", type=int, default=5,
                     help="time to first token of one --input-len prompt alone: the median of this many after "
                          "a warm-up (0: skip)")
    e2e.add_argument("--output", default=None, help="write the JSON result here (default: print it)")
    e2e.set_defaults(func=cmd_bench_e2e)

    from light_moe.bench.serve import add_bench_serve_args

    bserve = bsub.add_parser("serve", help="serving benchmark: a request stream against `light-moe serve` (started "
                                           "here or --base-url); TTFT / TPOT / ITL / e2e percentiles, throughput, "
                                           "goodput; --sweep-rates plots latency against throughput")
    add_bench_serve_args(bserve)
    bserve.set_defaults(func=cmd_bench_serve)

    from light_moe.bench.step_profile import add_profile_step_args

    profile = bsub.add_parser("profile-step", help="kernels of a decode step (and a prefill) by group: MoE, "
                                                   "attention, GEMM, elementwise; GPU time vs wall time")
    add_bench_engine_args(profile, aliases={"enforce_eager": ("--eager",)})
    add_profile_step_args(profile)
    profile.set_defaults(func=cmd_bench_profile_step)

    layer = bsub.add_parser("moe-layer", help="the MoE layer against torch._grouped_mm and a per-expert loop")
    layer.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096, 16384])
    layer.add_argument("--quant", choices=["w4a16"], default=None,
                       help="also time the layer with W4A16 experts (RTN g128) in the same run")
    layer.add_argument("--experts", type=int, default=8)
    layer.add_argument("--hidden", type=int, default=4096)
    layer.add_argument("--intermediate", type=int, default=14336)
    layer.add_argument("--top-k", type=int, default=2)
    layer.add_argument("--rounds", type=int, default=1,
                       help="time every case once per round, alternating, and report the medians (clock drift)")
    layer.add_argument("--output", default=None)
    layer.set_defaults(func=cmd_bench_moe_layer)

    quant = sub.add_parser("quantize", help="write a W4A16 checkpoint (RTN, GPTQ layout) that loads back")
    quant.add_argument("--model", required=True, help="float Hugging Face model directory")
    quant.add_argument("--out", required=True, help="output directory")
    EngineArgs.add_cli_args(quant, only=("quant_group_size", "quant_symmetric", "quant_attention"))
    quant.set_defaults(func=cmd_quantize)

    from light_moe.bench.ep import add_ep_args

    ep = bsub.add_parser("ep", help="expert parallelism: tokens/s per GPU, all-to-all time, overlap, load balance")
    add_ep_args(ep)
    ep.set_defaults(func=cmd_bench_ep)

    from light_moe.bench.ep_scale import add_ep_scale_args

    scale = bsub.add_parser("ep-scale", help="EP at several sizes (e.g. 8 and 4) against one GPU (W4A16) in one run: "
                                             "tokens/s, memory per GPU, exchange time, overlap, load balance")
    add_ep_scale_args(scale)
    scale.set_defaults(func=cmd_bench_ep_scale)
    return parser


SERVER_EXTRA = ("fastapi", "uvicorn")


def cmd_serve(args) -> int:
    """Checks for the server extra before anything loads (the model takes minutes; the import error came after)."""
    import importlib.util

    missing = [name for name in SERVER_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        print(f"light-moe serve needs {' and '.join(missing)}: pip install 'light-moe[server]'", file=sys.stderr)
        return 2
    from light_moe.server.serve import serve

    return serve(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
