"""Compile a CuTe DSL 4.3.5 host function for sm_90a on a machine without a GPU (CI).

The whole pipeline runs (trace, MLIR passes, NVVM, ptxas) and writes <name>.sm_90a.cubin.
What happens after that depends on CUTE_DSL_ARCH, which 4.3.5 reads once, at `import cutlass`
(tests/conftest.py sets it to sm_90a):
  * the first compile in a process raises DSLRuntimeError caused by CudaDriverDependencyError;
  * later ones raise RuntimeError("Unknown function cutlass_...") because the driver check runs
    once per process.
Both count as success only if a fresh, non-empty cubin was written.
A launch with min_blocks_per_mp > 1 asks the device for its shared memory per SM (the DSL turns it into a
carveout hint) while tracing; without a driver, the sm_90 value answers (device_attributes_of_sm90).
"""
import contextlib
import glob
import os
import re
import shlex
import tempfile
import time


def _is_missing_driver(exc: BaseException) -> bool:
    seen = exc
    while seen is not None:
        if type(seen).__name__ == "CudaDriverDependencyError":
            return True
        if isinstance(seen, RuntimeError) and str(seen).startswith("Unknown function cutlass_"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


SM90_DEVICE_ATTRIBUTES = {"CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR": 233472}  # 228 KB


@contextlib.contextmanager
def device_attributes_of_sm90():
    """While tracing: a device attribute query the driver cannot answer (no GPU) gets the H100's value, if it is one
    of SM90_DEVICE_ATTRIBUTES; anything else still raises."""
    from cutlass.base_dsl.runtime import cuda as cuda_helpers

    real = cuda_helpers.get_device_attribute

    def query(attribute, device_id: int = 0):
        try:
            return real(attribute, device_id)
        except Exception:  # noqa: BLE001 - no driver: answer for sm_90 or re-raise
            name = getattr(attribute, "name", str(attribute))
            if name not in SM90_DEVICE_ATTRIBUTES:
                raise
            return SM90_DEVICE_ATTRIBUTES[name]

    cuda_helpers.get_device_attribute = query
    try:
        yield
    finally:
        cuda_helpers.get_device_attribute = real


def _compile(jit_fn, args, dump_root: str, keep: str) -> tuple[str, float]:
    """cute.compile for sm_90a keeping `keep` ("--keep-cubin", plus "--keep-ptx") in a fresh dump directory;
    returns (that directory, seconds). Raises on any real compile error."""
    import cutlass.cute as cute

    os.makedirs(dump_root, exist_ok=True)
    dump_dir = tempfile.mkdtemp(prefix="cubin-", dir=dump_root)  # 4.3.5 writes nothing into a missing dir
    options = f"--gpu-arch sm_90a {keep} --dump-dir {shlex.quote(str(dump_dir))}"
    start = time.perf_counter()
    try:
        with device_attributes_of_sm90():
            cute.compile(jit_fn, *args, options=options)
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is the missing driver
        if not _is_missing_driver(exc):
            raise
    return dump_dir, time.perf_counter() - start


def _one(dump_dir: str, pattern: str) -> str:
    found = glob.glob(os.path.join(dump_dir, pattern))
    assert len(found) == 1 and os.path.getsize(found[0]) > 0, f"no {pattern} in {dump_dir}: {os.listdir(dump_dir)}"
    return found[0]


def compile_sm90a(jit_fn, *args, dump_root: str):
    """Returns (cubin_path, seconds). Raises on any real compile error."""
    dump_dir, seconds = _compile(jit_fn, args, dump_root, "--keep-cubin")
    return _one(dump_dir, "*.sm_90a.cubin"), seconds


def compile_sm90a_ptx(jit_fn, *args, dump_root: str) -> str:
    """Like compile_sm90a, keeping the PTX as well; returns its text."""
    dump_dir, _ = _compile(jit_fn, args, dump_root, "--keep-ptx --keep-cubin")
    _one(dump_dir, "*.sm_90a.cubin")
    with open(_one(dump_dir, "*.ptx")) as f:
        return f.read()


def ptx_entries(ptx: str) -> dict[str, str]:
    """Kernel name -> body of each .entry in the PTX."""
    parts = re.split(r"\.entry\s+(\S+?)\s*\(", ptx)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def assert_waits_before_loads(entries: dict[str, str], loads: tuple[str, ...] = ("ld.global", "cp.async")) -> None:
    """Programmatic dependent launch: every kernel waits for its predecessor (griddepcontrol.wait) before its first
    global load of the kinds in `loads`."""
    for name, body in entries.items():
        wait = body.find("griddepcontrol.wait")
        assert wait >= 0, f"{name}: no griddepcontrol.wait"
        first_load = min((i for i in (body.find(kind) for kind in loads) if i >= 0), default=len(body))
        assert wait < first_load, f"{name}: a global load ({' / '.join(loads)}) comes before griddepcontrol.wait"
