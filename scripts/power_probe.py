"""SM clock and board power while the bf16 and the W4A16 expert GEMMs run back to back (Mixtral-8x7B shape).

    python scripts/power_probe.py --tokens 16384 --seconds 4 --phases 4

Why: at prefill an H200 runs at its power limit and lowers the SM clock; if the W4A16 kernel runs at a lower
clock than the bf16 one at the same power, its gap is energy per FLOP (dequant instructions), not scheduling.
Each phase replays one variant's graph (up + down) for --seconds while a thread samples nvidia-smi (clocks.sm,
power.draw) every ~100 ms; phases alternate bf16 / W4A16. Prints per phase: us per replay, TFLOP/s, mean SM MHz
and W over the samples of the phase's second half (the clock settles after a switch). Leaves clocks alone.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import threading
import time

import torch

from light_moe.bench.env import environment
from light_moe.bench.w4a16_experts import mixtral_experts, pair_replay, routed_batch


def _sampler(samples: list, stop: threading.Event) -> None:
    while not stop.is_set():
        out = subprocess.run(["nvidia-smi", "-i", str(torch.cuda.current_device()), "--query-gpu=clocks.sm,power.draw",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
        try:
            mhz, watts = (float(v) for v in out.strip().splitlines()[0].split(","))
        except (ValueError, IndexError):
            continue
        samples.append((time.monotonic(), mhz, watts))
        time.sleep(0.1)


def main() -> None:
    from light_moe.kernels import grouped_gemm as gg
    from light_moe.kernels import w4a16_gemm as w4

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--phases", type=int, default=4)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    E, H, inter, K, G, T = 8, 4096, 14336, 2, 128, args.tokens
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13p, w2p, q13, q2 = mixtral_experts(E, H, inter, G, gen)
    batch = routed_batch(T, E, H, inter, K, gen)
    variants = {"bf16": pair_replay(gg.expert_up, gg.expert_down, batch, w13p, w2p),
                "w4a16": pair_replay(w4.w4a16_expert_up, w4.w4a16_expert_down, batch, q13, q2)}
    flop = 2 * T * K * H * inter * 3
    samples: list = []
    stop = threading.Event()
    thread = threading.Thread(target=_sampler, args=(samples, stop), daemon=True)
    thread.start()
    phases = []
    for p in range(args.phases):
        name = list(variants)[p % 2]
        replay = variants[name]
        torch.cuda.synchronize()
        t0 = time.monotonic()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        n = 0
        while time.monotonic() - t0 < args.seconds:
            for _ in range(8):
                replay()
            n += 8
            torch.cuda.current_stream().synchronize()  # keeps the host's clock and the GPU's work together
        end.record()
        end.synchronize()
        t1 = time.monotonic()
        us = start.elapsed_time(end) * 1e3 / n
        settled = [s for s in samples if (t0 + t1) / 2 <= s[0] <= t1]
        row = dict(variant=name, replays=n, us=round(us, 1), tflops=round(flop / us / 1e6, 1),
                   sm_mhz=round(statistics.mean(s[1] for s in settled), 0) if settled else None,
                   watts=round(statistics.mean(s[2] for s in settled), 1) if settled else None,
                   samples=len(settled))
        phases.append(row)
        print(row, flush=True)
    stop.set()
    thread.join()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(benchmark="power_probe", env=environment(), tokens=T, phases=phases), f, indent=1)


if __name__ == "__main__":
    main()
