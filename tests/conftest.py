"""Shared pytest set-up.

CUTE_DSL_ARCH must be set before the first `import cutlass` (CuTe DSL 4.3.5 reads it once, at
import): with sm_90a every arch check (wgmma needs exactly sm_90a) passes when compiling on a
CPU-only CI machine, and it equals what a Hopper GPU reports, so GPU runs are unaffected.
"""
import os

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and torch.cuda.device_count() < 2:
            item.add_marker(pytest.mark.skip(reason="needs 2+ CUDA GPUs"))
