"""Shared by the expert-parallel tests: the prompts and engine arguments of the CPU comparisons, and
running a script in a fresh process (its own process group, a hard timeout)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from light_moe import SamplingParams

PROMPTS = [[7, 3, 99], list(range(20, 31)), [5] * 2 + list(range(100, 127)), list(range(200, 247)), [42] * 9]
NEW_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
ENGINE_ARGS = dict(dtype="float32", device="cpu", max_num_batched_tokens=16, show_progress=False)


REPO = Path(__file__).parents[1]


def repo_env(**extra) -> dict:
    """This process's environment with the repository on PYTHONPATH (and `extra` set)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            **extra}


def run_script(tmp_path, text: str, *args: str, timeout_s: float = 120) -> str:
    """Run text as a script in a fresh process; it must exit 0 and print OK. Returns its stdout."""
    script = tmp_path / "script.py"
    script.write_text(text)
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout_s,
                          cwd=REPO, env=repo_env())
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    return proc.stdout


def needs_gpus(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} CUDA GPUs, found {torch.cuda.device_count()}")
