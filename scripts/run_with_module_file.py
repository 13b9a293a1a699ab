"""Run a module with one of the package's modules replaced by another file: same-run A/B of a kernel change.

    git show HEAD~1:light_moe/kernels/w4a16_gemm.py > /tmp/w4a16_gemm_base.py
    python scripts/run_with_module_file.py light_moe.kernels.w4a16_gemm /tmp/w4a16_gemm_base.py \\
        light_moe.bench.w4a16_experts --tokens 1 4 16 64

Both runs (the module as it is, and this one) then go in one device call, alternated, so that their
timings compare (the cards and their clocks differ between calls).
"""
from __future__ import annotations

import importlib
import importlib.util
import runpy
import sys


def main() -> None:
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    name, path, module = sys.argv[1:4]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    replacement = importlib.util.module_from_spec(spec)
    sys.modules[name] = replacement  # before the package imports it, so every importer gets this one
    spec.loader.exec_module(replacement)
    parent, _, leaf = name.rpartition(".")
    if parent:
        setattr(importlib.import_module(parent), leaf, replacement)
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__")


if __name__ == "__main__":
    main()
