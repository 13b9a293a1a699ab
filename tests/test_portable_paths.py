"""Reports and logs that get committed carry no machine paths (bench.env.portable_paths, used by the per-rank
step profiles; scripts/gpu_checks.sh applies the same rewrite to its step logs)."""
import os
import subprocess
from pathlib import Path

import torch

from light_moe.bench.env import portable_paths

REPO = Path(__file__).resolve().parents[1]


def test_repository_files_become_relative_and_packages_portable():
    text = (f"File \"{REPO / 'light_moe' / 'cli.py'}\", line 3\n{torch.__file__}:10\n"
            "(/opt/x/.venv/lib/python3.12/site-packages/cutlass/base.py:7) /usr/lib/python3/dist-packages/a.py")
    out = portable_paths(text)
    assert f"File \"light_moe{os.sep}cli.py\", line 3" in out
    assert "<site-packages>/torch/__init__.py:10" in out
    assert "(<site-packages>/cutlass/base.py:7) <site-packages>/a.py" in out
    assert str(REPO) not in out and "/opt/" not in out and "/usr/" not in out


def test_gpu_checks_step_logs_are_rewritten(tmp_path):
    """The step() function of scripts/gpu_checks.sh, run on a command that prints machine paths."""
    script = (REPO / "scripts" / "gpu_checks.sh").read_text()
    step = script[script.index("step() {"):script.index("\n}\n", script.index("step() {")) + 3]
    cmd = (f"out={tmp_path}; {step}\nstep demo 10 echo {REPO}/light_moe/x.py /opt/v/lib/python3.12/site-packages/t.py")
    subprocess.run(["bash", "-c", cmd], cwd=REPO, check=True, capture_output=True)
    assert (tmp_path / "demo.log").read_text().strip() == "light_moe/x.py <site-packages>/t.py"
