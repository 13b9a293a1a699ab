"""Where a benchmark ran: card, versions, commit. Written into every result JSON."""
from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> str:
    """The checkout's commit; a copy of the tree without .git (e.g. shipped to a GPU box) may name it
    in LIGHT_MOE_GIT_COMMIT instead."""
    import os

    if os.environ.get("LIGHT_MOE_GIT_COMMIT"):
        return os.environ["LIGHT_MOE_GIT_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["num_gpus"] = torch.cuda.device_count()
    try:
        from importlib.metadata import version

        env["nvidia_cutlass_dsl"] = version("nvidia-cutlass-dsl")
    except Exception:  # not installed (CPU machine) or not found from a source-tree run
        try:
            import cutlass

            env["nvidia_cutlass_dsl"] = getattr(cutlass, "__version__", "present")
        except ImportError:
            env["nvidia_cutlass_dsl"] = None
    return env


def portable_paths(text: str) -> str:
    """Text of a report to commit, with this machine's paths made portable: installed packages as
    <site-packages>/..., files of the repository relative to its root (committed logs must not carry a
    machine's paths)."""
    import re

    text = re.sub(r"[^\s:'\"(]*/(?:site|dist)-packages/", "<site-packages>/", text)
    return text.replace(str(Path(__file__).resolve().parents[2]) + "/", "")


def write_result(result: dict, output: str | None, echo: bool = True) -> None:
    """A benchmark's JSON result to `output` (parent folders created), or printed when there is none and echo."""
    import json

    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2))
    elif echo:
        print(json.dumps(result, indent=2))
