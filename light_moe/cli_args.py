"""Argument helpers shared by the CLI (cli.py), `light-moe serve` (server/serve.py) and the benchmarks (bench/*).
The engine's flags themselves come from EngineArgs (engine/args.py: add_cli_args / from_cli_args). Below all
three of them (docs/architecture.md, import rules), so none imports another."""
from __future__ import annotations

import argparse

from light_moe.engine.args import EngineArgs

# A benchmark builds its model (--shape: random weights, load_format="dummy") and sizes its batches itself.
BENCH_DECIDES = ("load_format", "max_num_seqs")


def add_bench_engine_args(p: argparse.ArgumentParser, exclude: tuple[str, ...] = (), aliases: dict | None = None,
                          **defaults) -> None:
    """The engine flags of a benchmark, but those it decides (BENCH_DECIDES, exclude); without --model it uses
    the bundled demo model. A benchmark's defaults: a larger step budget (whole batches of prompts prefill in
    one step), no progress bar."""
    EngineArgs.add_cli_args(p, exclude=BENCH_DECIDES + exclude, aliases=aliases, defaults=dict(
        model=None, max_num_batched_tokens=8192, show_progress=False, **defaults))


def async_kwargs(args) -> dict:
    """The async flags, as benchmark results record them."""
    return dict(async_output_processing=args.async_output_processing, async_scheduling=args.async_scheduling)
